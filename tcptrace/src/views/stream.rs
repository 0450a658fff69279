//! The live transition stream (`tcptrace` with no subcommand): every transition, reset,
//! close and TIME_WAIT end the filter keeps, as text lines in time order or JSON lines.

use std::io::{self, Write};

use super::{Flow, View};
use crate::{
    analysis::{closes::Close, pipeline::Pipeline, timewait::Exit},
    model::{
        event::{Event, RawEvent, State},
        filter::CompiledFilter,
    },
    output::{
        Renderer,
        reorder::{Sink, TimeOrder},
    },
};

/// The live transition stream (`tcptrace` with no subcommand).
pub struct Stream<W: Write> {
    /// Classifies closes when the stream sees whole lifecycles (no state filter); follows
    /// timewait sockets when it shows TIME_WAIT.
    pipe: Pipeline,
    renderer: Renderer,
    out: W,
    limit: Option<u64>,
    shown: u64,
    /// Text lines wait here while a close dated before them may still come, so that people
    /// read them in time order (JSON lines go out as concluded, each with its time).
    order: Option<TimeOrder>,
}

impl<W: Write> Stream<W> {
    /// Prints what `filter` keeps, stopping after `limit` transitions if given.
    ///
    /// Without a state filter the stream sees every transition of the sockets it shows, so it
    /// also prints each connection's classified close; with one it only has fragments.
    pub fn new(filter: CompiledFilter, renderer: Renderer, out: W, limit: Option<u64>) -> Self {
        let whole = filter.state_mask() == 0;
        let pipe = Pipeline::new(filter);
        let order = renderer.is_text().then(TimeOrder::default);
        Stream {
            pipe: if whole { pipe.tracking() } else { pipe },
            renderer,
            out,
            limit,
            shown: 0,
            order,
        }
    }

    /// Whether timewait sockets' timers are traced: the stream then also shows each timewait
    /// socket's end (`TIME_WAIT → CLOSE`, with its residency), when it shows TIME_WAIT at all.
    pub fn timers(mut self, traced: bool) -> Self {
        let mask = self.pipe.filter().state_mask();
        let shows_tw = mask == 0 || mask & (1 << State::TimeWait as u8) != 0;
        self.pipe = if shows_tw {
            self.pipe.timewaits(traced)
        } else {
            self.pipe.without_timewaits()
        };
        self
    }

    /// Connections open when tracing began (from the backfill): their closes get the role
    /// and owner found then.
    pub fn known_at_start(mut self, found: crate::model::atstart::OpenAtStart) -> Self {
        self.pipe = self.pipe.known_at_start(found);
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// Prints the closes and timewait ends concluded; true when the count limit is reached.
    /// The buffers are reused: a close costs no allocation.
    fn print_closes(&mut self) -> io::Result<bool> {
        if self.pipe.exits.is_empty() && self.pipe.closes.is_empty() {
            return Ok(false);
        }
        let mut exits = std::mem::take(&mut self.pipe.exits);
        let mut closes = std::mem::take(&mut self.pipe.closes);
        let done = self.print(&exits, &closes);
        exits.clear();
        closes.clear();
        self.pipe.exits = exits;
        self.pipe.closes = closes;
        done
    }

    fn print(&mut self, exits: &[Exit], closes: &[Close]) -> io::Result<bool> {
        for x in exits {
            if self.pipe.filter().keeps_exit(x)
                && self.emit(x.ts_ns, true, |r, out| r.timewait_exit(out, x))?
            {
                return Ok(true);
            }
        }
        for c in closes {
            if self.pipe.filter().keeps_close(c)
                && self.emit(c.ts_ns, true, |r, out| r.close(out, c))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes one line (`render`), dated `ts_ns` — or holds it, for text (see
    /// [`Stream::release`]); true when a line that `counts` reached the limit.
    fn emit(
        &mut self,
        ts_ns: u64,
        counts: bool,
        render: impl FnOnce(&mut Renderer, &mut Sink<W>) -> io::Result<()>,
    ) -> io::Result<bool> {
        // Past the limit nothing more is written, whatever comes (the run's end included).
        if self.limit_reached() {
            return Ok(true);
        }
        match &mut self.order {
            None => {
                render(&mut self.renderer, &mut Sink::Out(&mut self.out))?;
                Ok(counts && self.counted())
            }
            Some(order) => {
                let mut line = order.buffer();
                render(&mut self.renderer, &mut Sink::Held(&mut line))?;
                order.hold(ts_ns, counts, line);
                Ok(false)
            }
        }
    }

    /// Writes the held text lines that no close still waiting can precede (every one when
    /// `all`, at the end); true when the limit is reached.
    fn release(&mut self, all: bool) -> io::Result<bool> {
        if self.limit_reached() {
            return Ok(true);
        }
        let Some(order) = &mut self.order else {
            return Ok(false);
        };
        let until = if all { None } else { self.pipe.waiting_since() };
        let (shown, limit) = (&mut self.shown, self.limit);
        order.release(until, &mut self.out, || {
            *shown += 1;
            limit.is_some_and(|l| *shown >= l)
        })
    }

    /// Counts one printed record; true when the limit is reached.
    fn counted(&mut self) -> bool {
        self.shown += 1;
        self.limit_reached()
    }

    /// Whether `limit` records were printed.
    fn limit_reached(&self) -> bool {
        self.limit.is_some_and(|l| self.shown >= l)
    }

    /// Transitions printed so far.
    pub fn shown(&self) -> u64 {
        self.shown
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> View for Stream<W> {
    fn start(&mut self) -> io::Result<()> {
        self.renderer.header(&mut self.out)
    }

    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        let mut flow = Flow::More;
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            let filter = self.pipe.filter();
            let done = match &ev {
                Event::Lost { ts_ns, count } => {
                    self.emit(*ts_ns, false, |r, out| r.lost(out, *ts_ns, *count))?
                }
                Event::Transition(t) if filter.shows(t) && filter.keeps(t) => {
                    self.emit(t.ts_ns, true, |r, out| r.transition(out, t))?
                }
                Event::Reset(r) if filter.keeps_reset(r) => {
                    self.emit(r.ts_ns, true, |re, out| re.reset(out, r))?
                }
                _ => false,
            };
            self.pipe.fold(&ev);
            if done || self.print_closes()? {
                flow = Flow::Done;
                break;
            }
        }
        if self.release(flow == Flow::Done)? {
            flow = Flow::Done;
        }
        self.out.flush()?;
        Ok(flow)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        let done = self.print_closes()? || self.release(false)?;
        self.out.flush()?;
        Ok(if done { Flow::Done } else { Flow::More })
    }

    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        Some(&mut self.pipe)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.print_closes()?;
        self.release(true)?;
        self.out.flush()
    }
}
