//! The views: what each subcommand makes of the analysed events — the live stream
//! ([`stream`]), who closes first ([`report`], live in [`top`]), time in each state
//! ([`hist`]), the TIME_WAIT population ([`timewait`]), local ports ([`ports`]), stuck
//! sockets ([`stuck`]), the settings judged ([`doctor`]) and Prometheus metrics
//! ([`serve`]); and the [`View`] trait they all implement.
//!
//! Layer: above the output; a view may use [`crate::output`], [`crate::analysis`],
//! [`crate::model`], [`crate::shared`], the source's plain facts (what sock_diag found at
//! start, the host's settings) and another view's parts (top and doctor count ports as
//! ports does; serve exports what doctor and stuck find); never [`crate::cli`] or
//! [`crate::app`].

pub mod doctor;
pub mod hist;
pub mod ports;
pub mod report;
pub mod serve;
pub mod stream;
pub mod stuck;
pub mod timewait;
pub mod top;

use std::io;

use crate::{analysis::pipeline::Pipeline, model::event::RawEvent};

/// Whether a view wants more events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep feeding.
    More,
    /// Done (e.g. `--count` reached): stop the source.
    Done,
}

/// The clock of a view that prints every interval: the latest time seen (never going back)
/// and when the interval under way began.
#[derive(Clone, Copy, Debug)]
pub struct Interval {
    length_ns: u64,
    start: Option<u64>,
    now: u64,
}

impl Interval {
    /// Intervals of `length_ns` (at least 1); the first begins at the first time seen.
    pub fn new(length_ns: u64) -> Self {
        Interval {
            length_ns: length_ns.max(1),
            start: None,
            now: 0,
        }
    }

    /// Moves the clock to `ts` (never back); whether the interval under way has run its
    /// length.
    pub fn advance(&mut self, ts: u64) -> bool {
        self.now = self.now.max(ts);
        let start = *self.start.get_or_insert(ts);
        self.now >= start + self.length_ns
    }

    /// The latest time seen.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Sets the clock to `ts` before anything is seen (what existed at start); with `begin`,
    /// the first interval begins then too.
    pub fn set(&mut self, ts: u64, begin: bool) {
        self.now = ts;
        if begin {
            self.start = Some(ts);
        }
    }

    /// Ends the interval under way now and begins the next; returns when the ended one
    /// began (None before anything was seen).
    pub fn restart(&mut self) -> Option<u64> {
        self.start.replace(self.now)
    }
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
    /// The view's pipeline, for what the host can tell it (proof of refused timewait
    /// sockets); None for a view without one.
    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Interval;

    #[test]
    fn an_interval_ends_after_its_length_from_the_first_time_seen_and_never_goes_back() {
        let mut c = Interval::new(10);
        assert!(!c.advance(100), "the first time seen begins the interval");
        assert!(!c.advance(105));
        assert!(
            !c.advance(50),
            "an earlier time does not move the clock back"
        );
        assert_eq!(c.now(), 105);
        assert!(c.advance(110));
        assert_eq!(c.restart(), Some(100), "the ended interval began at 100");
        assert!(!c.advance(119) && c.advance(120), "the next began at 110");
        let mut seeded = Interval::new(10);
        seeded.set(500, true);
        assert_eq!((seeded.now(), seeded.advance(510)), (500, true));
    }
}
