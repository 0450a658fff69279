//! Views consume batches of raw events, from the live probe or from a recording alike.
//! The stream view prints them; reports and histograms aggregate them.

use std::io::{self, Write};

use crate::{
    event::{Event, RawEvent, State, decode},
    filter::CompiledFilter,
    output::Renderer,
    timewait::{Exit, Timewaits},
    track::{Close, Tracker},
};

/// Whether a view wants more events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep feeding.
    More,
    /// Done (e.g. `--count` reached): stop the source.
    Done,
}

/// Something that consumes the event stream.
pub trait View {
    /// Called once before the first batch.
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// One batch of events, in the order the source produced them.
    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow>;
    /// Called on the live source's tick with the current CLOCK_MONOTONIC time, so views can
    /// act on time passing without events (e.g. print a report every interval).
    fn tick(&mut self, _now_ns: u64) -> io::Result<Flow> {
        Ok(Flow::More)
    }
    /// Called once at the end (the source ran dry, was stopped, or the view said Done).
    fn finish(&mut self) -> io::Result<()>;
    /// Sockets forgotten so far because `--max-sockets` was reached.
    fn evicted(&self) -> u64 {
        0
    }
}

/// The live transition stream (`tcptrace` with no subcommand).
pub struct Stream<W: Write> {
    filter: CompiledFilter,
    renderer: Renderer,
    out: W,
    limit: Option<u64>,
    shown: u64,
    undecodable: u64,
    /// Classifies closes, when the stream sees whole lifecycles (no state filter).
    tracker: Option<Tracker>,
    closes: Vec<Close>,
    /// Follows timewait sockets, when the stream shows TIME_WAIT.
    timewaits: Option<Timewaits>,
    exits: Vec<Exit>,
    /// The most sockets followed at once.
    cap: usize,
}

impl<W: Write> Stream<W> {
    /// Prints what `filter` keeps, stopping after `limit` transitions if given.
    ///
    /// Without a state filter the stream sees every transition of the sockets it shows, so it
    /// also prints each connection's classified close; with one it only has fragments.
    pub fn new(filter: CompiledFilter, renderer: Renderer, out: W, limit: Option<u64>) -> Self {
        let tracker = (filter.state_mask() == 0).then(Tracker::default);
        Stream {
            filter,
            renderer,
            out,
            limit,
            shown: 0,
            undecodable: 0,
            tracker,
            closes: Vec::new(),
            timewaits: None,
            exits: Vec::new(),
            cap: crate::track::DEFAULT_CAP,
        }
    }

    /// Whether timewait sockets' timers are traced: the stream then also shows each timewait
    /// socket's end (`TIME_WAIT → CLOSE`, with its residency), when it shows TIME_WAIT at all.
    pub fn timers(mut self, traced: bool) -> Self {
        let mask = self.filter.state_mask();
        let shows_tw = mask == 0 || mask & (1 << State::TimeWait as u8) != 0;
        self.timewaits = shows_tw.then(|| Timewaits::new(traced).with_cap(self.cap));
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.cap = n;
        if self.tracker.is_some() {
            self.tracker = Some(Tracker::new(n));
        }
        self.timewaits = self.timewaits.take().map(|t| t.with_cap(n));
        self
    }

    /// Prints the closes and timewait ends concluded; true when the count limit is reached.
    /// The buffers are reused: a close costs no allocation.
    fn print_closes(&mut self) -> io::Result<bool> {
        if self.exits.is_empty() && self.closes.is_empty() {
            return Ok(false);
        }
        let mut exits = std::mem::take(&mut self.exits);
        let mut closes = std::mem::take(&mut self.closes);
        let done = self.print(&exits, &closes);
        exits.clear();
        closes.clear();
        self.exits = exits;
        self.closes = closes;
        done
    }

    fn print(&mut self, exits: &[Exit], closes: &[Close]) -> io::Result<bool> {
        for x in exits {
            if self.filter.keeps_exit(x) {
                self.renderer.timewait_exit(&mut self.out, x)?;
                if self.counted() {
                    return Ok(true);
                }
            }
        }
        for c in closes {
            if self.filter.keeps_close(c) {
                self.renderer.close(&mut self.out, c)?;
                if self.counted() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Counts one printed record; true when the limit is reached.
    fn counted(&mut self) -> bool {
        self.shown += 1;
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
            if !self.filter.kernel_keeps(raw) {
                continue;
            }
            let Ok(ev) = decode(raw) else {
                self.undecodable += 1;
                continue;
            };
            let done = match &ev {
                Event::Lost { ts_ns, count } => {
                    self.renderer.lost(&mut self.out, *ts_ns, *count)?;
                    false
                }
                Event::Transition(t) if self.filter.shows(t) && self.filter.keeps(t) => {
                    self.renderer.transition(&mut self.out, t)?;
                    self.counted()
                }
                Event::Reset(r) if self.filter.keeps_reset(r) => {
                    self.renderer.reset(&mut self.out, r)?;
                    self.counted()
                }
                _ => false,
            };
            if let Some(tr) = &mut self.tracker {
                tr.observe(&ev, &mut self.closes);
            }
            if let Some(tw) = &mut self.timewaits {
                tw.observe(&ev, &mut self.exits);
            }
            if done || self.print_closes()? {
                flow = Flow::Done;
                break;
            }
        }
        self.out.flush()?;
        Ok(flow)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        if let Some(tr) = &mut self.tracker {
            tr.expire(now_ns, &mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            tw.expire(now_ns, &mut self.exits);
        }
        let done = self.print_closes()?;
        self.out.flush()?;
        Ok(if done { Flow::Done } else { Flow::More })
    }

    fn evicted(&self) -> u64 {
        self.tracker.as_ref().map_or(0, Tracker::evicted)
            + self.timewaits.as_ref().map_or(0, Timewaits::evicted)
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(tr) = &mut self.tracker {
            tr.flush(&mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            tw.flush(&mut self.exits);
        }
        self.print_closes()?;
        if self.undecodable > 0 {
            log::warn!(
                "{} events could not be decoded and were skipped",
                self.undecodable
            );
        }
        self.out.flush()
    }
}
