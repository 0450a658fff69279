//! The one path every view's events take: kernel-side filter (for recordings made without
//! it) → decode → fold into connection lifecycles ([`Tracker`]: closes) and timewait sockets
//! ([`Timewaits`]: exits). Views hold a [`Pipeline`], act on each event it decodes, then let it
//! fold the event, and read the closes and exits it concluded.

use crate::{
    event::{Event, RawEvent, decode},
    filter::CompiledFilter,
    timewait::{Exit, Timewaits},
    track::{Close, DEFAULT_CAP, Tracker},
};

/// Decode, filter, track and timewait, once.
#[derive(Debug)]
pub struct Pipeline {
    filter: CompiledFilter,
    tracker: Option<Tracker>,
    timewaits: Option<Timewaits>,
    /// The most sockets, and timewait sockets, followed at once.
    cap: usize,
    undecodable: u64,
    /// Closes concluded and not yet taken by the view.
    pub closes: Vec<Close>,
    /// Timewait ends concluded and not yet taken by the view.
    pub exits: Vec<Exit>,
}

impl Pipeline {
    /// Decodes what `filter`'s kernel part keeps; follows nothing until asked.
    pub fn new(filter: CompiledFilter) -> Pipeline {
        Pipeline {
            filter,
            tracker: None,
            timewaits: None,
            cap: DEFAULT_CAP,
            undecodable: 0,
            closes: Vec::new(),
            exits: Vec::new(),
        }
    }

    /// Also follows each socket's life and classifies its close.
    pub fn tracking(mut self) -> Pipeline {
        self.tracker = Some(Tracker::new(self.cap));
        self
    }

    /// Also follows timewait sockets (`traced`: their timers are traced, so their ends are).
    pub fn timewaits(mut self, traced: bool) -> Pipeline {
        self.timewaits = Some(Timewaits::new(traced).with_cap(self.cap));
        self
    }

    /// Follows no timewait sockets.
    pub fn without_timewaits(mut self) -> Pipeline {
        self.timewaits = None;
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Pipeline {
        self.cap = n;
        if self.tracker.is_some() {
            self.tracker = Some(Tracker::new(n));
        }
        self.timewaits = self.timewaits.take().map(|t| t.with_cap(n));
        self
    }

    /// The filter the view was asked for.
    pub fn filter(&self) -> &CompiledFilter {
        &self.filter
    }

    /// The lifecycles followed, if they are.
    pub fn tracker(&self) -> Option<&Tracker> {
        self.tracker.as_ref()
    }

    /// The timewait sockets followed, if they are.
    pub fn timewait_sockets(&self) -> Option<&Timewaits> {
        self.timewaits.as_ref()
    }

    /// The event in `raw`, when the filter's kernel part keeps it (a recording holds what
    /// the kernel kept for its own run) and it decodes (counted otherwise).
    pub fn decode(&mut self, raw: &RawEvent) -> Option<Event> {
        if !self.filter.kernel_keeps(raw) {
            return None;
        }
        match decode(raw) {
            Ok(ev) => Some(ev),
            Err(_) => {
                self.undecodable += 1;
                None
            }
        }
    }

    /// Folds a decoded event into the lifecycles and timewait sockets followed.
    pub fn fold(&mut self, ev: &Event) {
        if let Some(tr) = &mut self.tracker {
            tr.observe(ev, &mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            tw.observe(ev, &mut self.exits);
        }
    }

    /// Time passes without events (CLOSE_MONOTONIC `now_ns`): aborts whose reset never came
    /// and timewait sockets past their expiry conclude.
    pub fn tick(&mut self, now_ns: u64) {
        self.expire_closes(now_ns);
        self.expire_exits(now_ns);
    }

    /// Aborts whose reset never came by `now_ns` conclude (timewait sockets wait for
    /// [`Pipeline::tick`]).
    pub fn expire_closes(&mut self, now_ns: u64) {
        if let Some(tr) = &mut self.tracker {
            tr.expire(now_ns, &mut self.closes);
        }
    }

    /// Timewait sockets past their expiry by `now_ns` conclude (aborts wait for
    /// [`Pipeline::tick`]).
    pub fn expire_exits(&mut self, now_ns: u64) {
        if let Some(tw) = &mut self.timewaits {
            tw.expire(now_ns, &mut self.exits);
        }
    }

    /// Whether timewait sockets are followed with their timers traced (their ends known).
    pub fn timewaits_traced(&self) -> bool {
        self.timewaits.as_ref().is_some_and(Timewaits::traced)
    }

    /// The end of the run: whatever waits concludes.
    pub fn finish(&mut self) {
        if let Some(tr) = &mut self.tracker {
            tr.flush(&mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            tw.flush(&mut self.exits);
        }
        if self.undecodable > 0 {
            log::warn!(
                "{} events could not be decoded and were skipped",
                self.undecodable
            );
        }
    }

    /// Sockets forgotten because `--max-sockets` was reached.
    pub fn evicted(&self) -> u64 {
        self.tracker.as_ref().map_or(0, Tracker::evicted)
            + self.timewaits.as_ref().map_or(0, Timewaits::evicted)
    }

    /// Records skipped because they did not decode.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    /// Sockets followed now.
    pub fn tracked(&self) -> usize {
        self.tracker.as_ref().map_or(0, Tracker::tracked)
    }

    /// The most sockets followed at once.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{State, Transition, encode},
        filter::Filter,
        track::Initiator,
    };

    fn transition(ts_ns: u64, from: State, to: State) -> RawEvent {
        encode(&Transition {
            ts_ns,
            skaddr: 0xffff_8881_0000_0040,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            from,
            to,
            in_from_ns: Some(1_000),
            owner: None,
            mptcp: false,
            netns: None,
            cgroup: None,
        })
    }

    fn client_closes_first() -> Vec<RawEvent> {
        use State::*;
        [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, TimeWait),
        ]
        .iter()
        .enumerate()
        .map(|(i, (from, to))| transition(1_000 * (i as u64 + 1), *from, *to))
        .collect()
    }

    #[test]
    fn folds_lifecycles_only_when_asked_and_counts_what_does_not_decode() {
        let run = |mut pipe: Pipeline| {
            let mut bad = transition(1, State::Close, State::SynSent);
            bad.newstate = 99;
            assert!(pipe.decode(&bad).is_none());
            for raw in client_closes_first() {
                let ev = pipe.decode(&raw).expect("decodes");
                pipe.fold(&ev);
            }
            pipe.finish();
            pipe
        };
        let plain = run(Pipeline::new(Filter::default().compile()));
        assert!(plain.closes.is_empty(), "nothing tracked unless asked");
        assert_eq!(plain.undecodable(), 1);
        let tracked = run(Pipeline::new(Filter::default().compile()).tracking());
        assert_eq!(tracked.closes.len(), 1);
        let close = tracked.closes[0];
        assert_eq!(close.initiator, Initiator::Local);
        assert!(close.timewait);
        assert_eq!(tracked.undecodable(), 1);
        assert_eq!(tracked.tracked(), 0, "the socket's life ended");
    }
}
