//! Views consume batches of raw events, from the live probe or from a recording alike.
//! The stream view prints them; reports and histograms aggregate them.

use std::io::{self, Write};

use crate::{
    event::{Event, RawEvent, decode},
    filter::CompiledFilter,
    output::Renderer,
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
    /// Called once at the end (the source ran dry, was stopped, or the view said Done).
    fn finish(&mut self) -> io::Result<()>;
}

/// The live transition stream (`tcptrace` with no subcommand).
pub struct Stream<W: Write> {
    filter: CompiledFilter,
    renderer: Renderer,
    out: W,
    limit: Option<u64>,
    shown: u64,
    undecodable: u64,
}

impl<W: Write> Stream<W> {
    /// Prints what `filter` keeps, stopping after `limit` transitions if given.
    pub fn new(filter: CompiledFilter, renderer: Renderer, out: W, limit: Option<u64>) -> Self {
        Stream {
            filter,
            renderer,
            out,
            limit,
            shown: 0,
            undecodable: 0,
        }
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
            match decode(raw) {
                Ok(Event::Lost { ts_ns, count }) => {
                    self.renderer.lost(&mut self.out, ts_ns, count)?
                }
                Ok(Event::Transition(t)) => {
                    if !self.filter.kernel_keeps(raw) || !self.filter.keeps(&t) {
                        continue;
                    }
                    self.renderer.transition(&mut self.out, &t)?;
                    self.shown += 1;
                    if self.limit.is_some_and(|l| self.shown >= l) {
                        flow = Flow::Done;
                        break;
                    }
                }
                Err(_) => self.undecodable += 1,
            }
        }
        self.out.flush()?;
        Ok(flow)
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.undecodable > 0 {
            log::warn!(
                "{} events could not be decoded and were skipped",
                self.undecodable
            );
        }
        self.out.flush()
    }
}
