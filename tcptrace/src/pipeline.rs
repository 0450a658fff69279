//! The one path every view's events take: kernel-side filter (for recordings made without
//! it) → decode (joining a connection record's two slots) → fold into connection lifecycles
//! ([`Tracker`]: closes) and timewait sockets ([`Timewaits`]: exits). Views hold a
//! [`Pipeline`], act on each event it decodes, then let it fold the event, and read the
//! closes, exits and steps it concluded.
//!
//! Connections come either as transitions, folded here, or — from kernels that write them —
//! as connection records, each a whole life ([`Pipeline::from_records`]): the closes, and
//! the transitions rebuilt from them ([`Pipeline::steps`]), are the same either way.

use tcptrace_common::kind;

use crate::{
    event::{Event, Part, RawEvent, State, Transition, decode},
    filter::CompiledFilter,
    timewait::{Exit, OverflowProof, Timewaits},
    track::{Close, DEFAULT_CAP, Role, Tracker},
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
    /// Connections come as records, not transitions.
    records: bool,
    /// The first slot of a connection record, waiting for its second: `Some(None)` when
    /// the filter dropped it (the second goes with it).
    head: Option<Option<Transition>>,
    /// Whether [`Pipeline::steps`] is filled.
    keep_steps: bool,
    /// The proof of refused timewait sockets, until timewait sockets are followed.
    proof: Option<OverflowProof>,
    /// Transitions folded and not yet taken by the view, each with its socket's role:
    /// decoded ones, or those rebuilt from a connection record.
    pub steps: Vec<(Transition, Role)>,
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
            records: false,
            head: None,
            keep_steps: false,
            proof: None,
            steps: Vec::new(),
            closes: Vec::new(),
            exits: Vec::new(),
        }
    }

    /// Also follows each socket's life and classifies its close.
    pub fn tracking(mut self) -> Pipeline {
        self.tracker = Some(Tracker::new(self.cap).from_records(self.records));
        self
    }

    /// Takes connections from their records (`yes`: the source has them) instead of
    /// following their transitions.
    pub fn from_records(mut self, yes: bool) -> Pipeline {
        self.records = yes;
        self.tracker = self.tracker.take().map(|t| t.from_records(yes));
        self
    }

    /// Connections open when tracing began (from the backfill): their closes get the role
    /// and owner found then.
    pub fn known_at_start(mut self, found: &[crate::track::AtStart]) -> Pipeline {
        if let Some(t) = &mut self.tracker {
            t.known_at_start(found);
        }
        self
    }

    /// Whether connections come from their records.
    pub fn uses_records(&self) -> bool {
        self.records
    }

    /// Also lists every transition folded in [`Pipeline::steps`].
    pub fn with_steps(mut self) -> Pipeline {
        self.keep_steps = true;
        self
    }

    /// Also follows timewait sockets (`traced`: their timers are traced, so their ends are).
    pub fn timewaits(mut self, traced: bool) -> Pipeline {
        let proof = self.timewaits.take().and_then(|mut t| t.take_proof());
        self.timewaits = Some(
            Timewaits::new(traced)
                .with_cap(self.cap)
                .prove_with(proof.or(self.proof.take())),
        );
        self
    }

    /// Claims refused timewait sockets with `proof` (see [`OverflowProof`]); without it,
    /// none is claimed.
    pub fn prove_overflows(&mut self, proof: OverflowProof) {
        match self.timewaits.take() {
            Some(t) => self.timewaits = Some(t.prove_with(Some(proof))),
            None => self.proof = Some(proof),
        }
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
            self.tracker = Some(Tracker::new(n).from_records(self.records));
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
        if raw.kind == kind::CONNECTION_TAIL {
            return self.join_tail(raw);
        }
        if raw.kind == kind::DETAILS {
            // Kept or not with the end record right after it, which the tracker joins it to.
            return decode(raw).ok();
        }
        if !self.filter.kernel_keeps(raw) {
            if raw.kind == kind::CONNECTION {
                self.take_head(None);
            }
            return None;
        }
        match decode(raw) {
            Ok(Event::Part(Part::Head(t))) => {
                self.take_head(Some(t));
                None
            }
            Ok(ev) => Some(ev),
            Err(_) => {
                self.undecodable += 1;
                None
            }
        }
    }

    /// Keeps a connection record's first slot (None: filtered out) for its second.
    fn take_head(&mut self, head: Option<Transition>) {
        // A first slot whose second never came is counted once the next one shows.
        if self.head.replace(head).is_some() {
            self.undecodable += 1;
        }
    }

    /// A connection record's second slot, joined to its first.
    fn join_tail(&mut self, raw: &RawEvent) -> Option<Event> {
        let (head, tail) = (self.head.take(), decode(raw));
        match (head, tail) {
            (Some(Some(end)), Ok(Event::Part(Part::Tail(tail)))) => {
                Some(Event::Connection(crate::event::Connection { end, tail }))
            }
            // Its first slot was filtered out.
            (Some(None), Ok(_)) => None,
            _ => {
                self.undecodable += 1;
                None
            }
        }
    }

    /// Folds a decoded event into the lifecycles and timewait sockets followed.
    pub fn fold(&mut self, ev: &Event) {
        if self.keep_steps {
            self.note_steps(ev);
        }
        if let Some(tr) = &mut self.tracker {
            tr.observe(ev, &mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            match ev {
                // A timewait socket's entry and the handshake of a connection that may take
                // its 4-tuple.
                Event::Connection(c) if self.records => tw.connection(c, &mut self.exits),
                Event::Transition(_) if self.records => {}
                _ => tw.observe(ev, &mut self.exits),
            }
        }
    }

    /// Lists the transitions `ev` stands for, from the source that carries connections.
    fn note_steps(&mut self, ev: &Event) {
        match ev {
            Event::Transition(t) if !self.records => {
                let role = self
                    .tracker
                    .as_ref()
                    .and_then(|tr| tr.role(t.skaddr))
                    .unwrap_or(Role::Unknown);
                self.steps.push((*t, role));
            }
            Event::Connection(c) if self.records => {
                let role = c.evidence().role();
                c.transitions(|t| self.steps.push((*t, role)));
            }
            // A listener's start and end come as transitions: they are no connection's.
            Event::Transition(t)
                if t.to == State::Listen || t.from == State::Listen && t.to == State::Close =>
            {
                self.steps.push((*t, Role::Unknown));
            }
            _ => {}
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
