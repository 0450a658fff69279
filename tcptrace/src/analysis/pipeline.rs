//! The one path every view's events take: kernel-side filter (for recordings made without
//! it) → decode (joining a connection record's two slots) → fold into connection lifecycles
//! ([`Tracker`]: closes) and timewait sockets ([`Timewaits`]: exits). Views hold a
//! [`Pipeline`], act on each event it decodes (and on the transitions it stands for,
//! [`Pipeline::each_step`]), then let it fold the event, and read the closes and exits it
//! concluded.
//!
//! Connections come either as transitions, folded here, or — from kernels that write them —
//! as connection records, each a whole life ([`Pipeline::from_records`]): the closes, and
//! the transitions rebuilt from them ([`Pipeline::each_step`]), are the same either way.

use std::{
    collections::{VecDeque, hash_map::Entry},
    net::SocketAddr,
};

use tcptrace_common::kind;

use crate::{
    analysis::{
        closes::{Close, How, Role, Tracker},
        timewait::{Exit, MadeBy, OverflowProof, Timewaits},
    },
    model::{
        event::{Event, Part, RawEvent, State, Transition, decode},
        filter::CompiledFilter,
    },
    shared::{DEFAULT_MAX_SOCKETS, FastMap, NS_PER_MS, tuple_digest},
};

/// Decode, filter, closes and timewait sockets, once.
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
    head: Option<Option<(Transition, Option<u64>)>>,
    /// The proof of refused timewait sockets, until timewait sockets are followed.
    proof: Option<OverflowProof>,
    /// Closes whose timewait socket was created in FIN_WAIT2, until its fate shows.
    fates: Fates,
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
            cap: DEFAULT_MAX_SOCKETS,
            undecodable: 0,
            records: false,
            head: None,
            proof: None,
            fates: Fates::default(),
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
    pub fn known_at_start(mut self, found: crate::model::atstart::OpenAtStart) -> Pipeline {
        if let Some(t) = &mut self.tracker {
            t.known_at_start(found);
        }
        self
    }

    /// Whether connections come from their records.
    pub fn uses_records(&self) -> bool {
        self.records
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
            Ok(Event::Part(Part::Head(t, tw))) => {
                self.take_head(Some((t, tw)));
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
    fn take_head(&mut self, head: Option<(Transition, Option<u64>)>) {
        // A first slot whose second never came is counted once the next one shows.
        if self.head.replace(head).is_some() {
            self.undecodable += 1;
        }
    }

    /// A connection record's second slot, joined to its first.
    fn join_tail(&mut self, raw: &RawEvent) -> Option<Event> {
        let (head, tail) = (self.head.take(), decode(raw));
        match (head, tail) {
            (Some(Some((end, tw))), Ok(Event::Part(Part::Tail(tail)))) => {
                Some(Event::Connection(crate::model::event::Connection {
                    end,
                    tail,
                    tw,
                }))
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
        let (closes, exits) = (self.closes.len(), self.exits.len());
        if let Some(tr) = &mut self.tracker {
            tr.observe(ev, &mut self.closes);
        }
        if let Some(tw) = &mut self.timewaits {
            self.fates.note_reset(ev, &mut self.closes);
            match ev {
                // A timewait socket's entry and the handshake of a connection that may take
                // its 4-tuple.
                Event::Connection(c) if self.records => tw.connection(c, &mut self.exits),
                Event::Transition(_) if self.records => {}
                _ => tw.observe(ev, &mut self.exits),
            }
            for c in self.closes[closes..].iter().filter(|c| c.timewait) {
                let made_by = MadeBy {
                    role: c.role,
                    states: c.states,
                };
                tw.made_by(c.local, c.remote, made_by);
            }
            self.fates.hold(&mut self.closes, closes, tw, ev.ts_ns());
            self.fates
                .settle(ev, &self.exits[exits..], tw, &mut self.closes);
        }
    }

    /// Hands `each` the transitions `ev` stands for, from the source that carries
    /// connections — decoded ones, or those rebuilt from a connection record — each with its
    /// socket's role. Asked before `ev` is folded (a transition's role is its socket's so
    /// far); nothing is copied or kept.
    pub fn each_step(&self, ev: &Event, mut each: impl FnMut(&Transition, Role)) {
        match ev {
            Event::Transition(t) if !self.records => {
                let role = self
                    .tracker
                    .as_ref()
                    .and_then(|tr| tr.role(t.skaddr))
                    .unwrap_or(Role::Unknown);
                each(t, role);
            }
            Event::Connection(c) if self.records => {
                let role = c.evidence().role();
                c.transitions(|t| each(t, role));
            }
            // A listener's start and end come as transitions: they are no connection's.
            Event::Transition(t)
                if t.to == State::Listen || t.from == State::Listen && t.to == State::Close =>
            {
                each(t, Role::Unknown);
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
    /// [`Pipeline::tick`]), and closes whose timewait socket's fate did not show in time.
    pub fn expire_closes(&mut self, now_ns: u64) {
        let closes = self.closes.len();
        if let Some(tr) = &mut self.tracker {
            tr.expire(now_ns, &mut self.closes);
        }
        if let Some(tw) = &self.timewaits {
            self.fates.hold(&mut self.closes, closes, tw, now_ns);
            self.fates.expire(now_ns, tw, &mut self.closes);
        }
    }

    /// Timewait sockets past their expiry by `now_ns` conclude (aborts wait for
    /// [`Pipeline::tick`]).
    pub fn expire_exits(&mut self, now_ns: u64) {
        if let Some(tw) = &mut self.timewaits {
            let exits = self.exits.len();
            tw.expire(now_ns, &mut self.exits);
            self.fates
                .settled_by(&self.exits[exits..], &mut self.closes);
        }
    }

    /// The time of the earliest close or timewait exit still waiting to be concluded (an
    /// abort waiting for its reset, a close waiting for its timewait socket's fate, a cancel
    /// that may be a kill): one may yet come out dated then. None when none waits.
    pub fn waiting_since(&self) -> Option<u64> {
        let aborts = self.tracker.as_ref().and_then(Tracker::waiting_since);
        let fates = self.fates.oldest_ns();
        let exits = self.timewaits.as_ref().and_then(Timewaits::waiting_since);
        aborts.into_iter().chain(fates).chain(exits).min()
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
            let (closes, exits) = (self.closes.len(), self.exits.len());
            self.fates.hold(&mut self.closes, closes, tw, u64::MAX);
            tw.flush(&mut self.exits);
            self.fates
                .settled_by(&self.exits[exits..], &mut self.closes);
            self.fates.expire(u64::MAX, tw, &mut self.closes);
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

/// How long a close whose timewait socket was created in FIN_WAIT2 waits for that socket's
/// fate: moved to TIME_WAIT by the peer's FIN, or killed (the peer's data answered with a
/// reset) — which a kill shows within the timewait follower's own wait for a re-arm.
const FATE_GRACE_NS: u64 = 300 * NS_PER_MS;

/// Closes that entered TIME_WAIT by the kernel's transition, but whose timewait socket was
/// created in FIN_WAIT2 — an orphan whose peer has not sent its FIN yet — or not at all. Such a socket mostly moves to TIME_WAIT when that FIN comes (often
/// with no timer event: a re-arm into the same timer-wheel bucket is silent); but data
/// arriving instead makes the kernel answer with a reset — from the timewait socket, which
/// it then kills, or from the closed socket when the data raced with its hand-over — and
/// the peer never sends that FIN (a server that closes while its client still sends): this
/// side never holds TIME_WAIT, and its reset ended the connection. The close waits
/// briefly to tell which, whatever order the events come in.
#[derive(Debug, Default)]
struct Fates {
    /// The held closes in the order they were held, each with when it stops waiting and
    /// its [`fate_key`] (a close taken out early leaves `None`): a storm holds one close per
    /// connection, read back in order, so they queue rather than sit in a table.
    queue: VecDeque<(u64, u64, Option<Close>)>,
    /// Each held close's number (its position in `queue` plus `first`), by the digest of
    /// its namespace and 4-tuple ([`fate_key`]).
    index: FastMap<u64, u64>,
    /// The number of `queue`'s front.
    first: u64,
}

/// A digest of a connection's network namespace and endpoints, for [`Fates`]' index (two
/// connections with the same digest, one chance in 2^64, leave the older one released at
/// the end of its wait rather than by its fate).
fn fate_key(netns: Option<u32>, local: SocketAddr, remote: SocketAddr) -> u64 {
    tuple_digest(netns.unwrap_or(0), local, remote)
}

impl Fates {
    /// Moves the closes from `closes[from..]` whose timewait socket is in FIN_WAIT2 to
    /// wait (until `now_ns` + the grace).
    fn hold(&mut self, closes: &mut Vec<Close>, from: usize, tw: &Timewaits, now_ns: u64) {
        let mut i = from;
        while i < closes.len() {
            let c = &closes[i];
            // A timewait socket in FIN_WAIT2; or none at all where one is armed before the
            // end is logged: the segment that acknowledged this side's FIN carried data, and
            // the kernel closed the socket without one (and sends a reset right after).
            let undecided = c.timewait
                && match tw.of(c.local, c.remote) {
                    Some(l) => l.substate == State::FinWait2,
                    None => tw.traced(),
                };
            if !undecided {
                i += 1;
                continue;
            }
            let c = closes.remove(i);
            // The 4-tuple taken again before the last close on it was decided (no timewait
            // socket holds it): that one goes out as it was, first.
            if let Some(earlier) = self.take(c.netns, c.local, c.remote) {
                closes.insert(i, earlier);
                i += 1;
            }
            self.push(now_ns.saturating_add(FATE_GRACE_NS), c);
        }
    }

    /// Holds `c` until `until_ns`.
    fn push(&mut self, until_ns: u64, c: Close) {
        self.push_keyed(until_ns, fate_key(c.netns, c.local, c.remote), c);
    }

    /// Holds `c`, whose [`fate_key`] is `key`, until `until_ns`.
    fn push_keyed(&mut self, until_ns: u64, key: u64, c: Close) {
        let n = self.first + self.queue.len() as u64;
        self.index.insert(key, n);
        self.queue.push_back((until_ns, key, Some(c)));
    }

    /// The close held for (netns, local, remote), taken out.
    fn take(&mut self, netns: Option<u32>, local: SocketAddr, remote: SocketAddr) -> Option<Close> {
        let Entry::Occupied(at) = self.index.entry(fate_key(netns, local, remote)) else {
            return None;
        };
        let slot = &mut self
            .queue
            .get_mut(at.get().checked_sub(self.first)? as usize)?
            .2;
        if slot
            .as_ref()
            .is_none_or(|c| (c.netns, c.local, c.remote) != (netns, local, remote))
        {
            return None;
        }
        at.remove();
        slot.take()
    }

    /// Whether no close is held.
    fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// When the oldest close held ended.
    fn oldest_ns(&self) -> Option<u64> {
        self.queue
            .iter()
            .filter_map(|(_, _, c)| c.as_ref())
            .map(|c| c.ts_ns)
            .min()
    }

    /// A reset this side sent on the 4-tuple of a held close (by its timewait socket or by
    /// the closed socket itself): the connection ended there, with no TIME_WAIT to come.
    fn note_reset(&mut self, ev: &Event, out: &mut Vec<Close>) {
        if self.is_empty() {
            return;
        }
        if let Event::Reset(r) = ev
            && r.direction == crate::model::event::Direction::Sent
            && let Some(mut c) = self.take(r.netns, r.local, r.remote)
        {
            c.timewait = false;
            c.how = How::RstSent;
            c.reset_reason = c.reset_reason.or(r.reason);
            out.push(c);
        }
    }

    /// Releases what `ev` (and the `exits` it caused) settles.
    fn settle(&mut self, ev: &Event, exits: &[Exit], tw: &Timewaits, out: &mut Vec<Close>) {
        if self.is_empty() {
            return;
        }
        self.settled_by(exits, out);
        // A visible re-arm into TIME_WAIT.
        if let Event::Timer(t) = ev
            && let crate::model::event::TimerOp::Armed {
                substate: State::TimeWait,
                local,
                remote,
                netns,
                ..
            } = t.op
            && let Some(c) = self.take(netns, local, remote)
        {
            out.push(c);
        }
        self.expire(ev.ts_ns(), tw, out);
    }

    /// Releases the closes whose timewait socket ended in `exits`: one that ended in
    /// FIN_WAIT2 never held TIME_WAIT.
    fn settled_by(&mut self, exits: &[Exit], out: &mut Vec<Close>) {
        for x in exits {
            let Some(mut c) = self.take(x.netns, x.local, x.remote) else {
                continue;
            };
            c.timewait = x.substate != State::FinWait2;
            out.push(c);
        }
    }

    /// Releases the closes whose grace ended by `now_ns` — as they were: their timewait
    /// socket most likely moved to TIME_WAIT silently — unless it is being killed now.
    fn expire(&mut self, now_ns: u64, tw: &Timewaits, out: &mut Vec<Close>) {
        while let Some(&(until, _, _)) = self.queue.front() {
            if until > now_ns {
                break;
            }
            let Some((_, key, held)) = self.queue.pop_front() else {
                break;
            };
            self.first += 1;
            let Some(c) = held else {
                continue;
            };
            // Most hosts cancel no timewait timer for seconds: no lookup then.
            let dying =
                tw.any_cancelled() && tw.of(c.local, c.remote).is_some_and(|l| l.cancelled());
            if dying && now_ns != u64::MAX {
                self.push_keyed(now_ns + FATE_GRACE_NS, key, c);
                continue;
            }
            if self.index.get(&key) == Some(&(self.first - 1)) {
                self.index.remove(&key);
            }
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::closes::Initiator,
        model::{
            event::{State, Transition, encode},
            filter::Filter,
        },
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

    /// A timewait socket's exit names the connection whose close made it (its role and
    /// states), which the views count it under; one whose close was not seen names none.
    #[test]
    fn a_timewait_exit_names_the_connection_that_made_it() {
        use crate::model::event::{Event, TimerEvent, TimerOp};
        use State::*;
        let timer = |ts: u64, tw: u64, op| {
            Event::Timer(TimerEvent {
                ts_ns: ts,
                tw,
                op,
                substate_at_end: Some(TimeWait),
            })
        };
        let armed = |ts, tw, local: &str| {
            timer(
                ts,
                tw,
                TimerOp::Armed {
                    substate: TimeWait,
                    timeout_jiffies: 15_000,
                    local: local.parse().unwrap(),
                    remote: "10.0.0.2:80".parse().unwrap(),
                    netns: None,
                    rearm: false,
                },
            )
        };
        let mut pipe = Pipeline::new(Filter::default().compile())
            .tracking()
            .timewaits(true);
        let mut events: Vec<Event> = Vec::new();
        for (i, raw) in client_closes_first().iter().enumerate() {
            if i == 4 {
                events.push(armed(4_999, 1, "10.0.0.1:40000"));
            }
            events.push(pipe.decode(raw).expect("decodes"));
        }
        // Another timewait socket, of a connection older than the trace.
        events.push(armed(6_000, 2, "10.0.0.1:40001"));
        events.push(timer(7_000, 1, TimerOp::Expired));
        events.push(timer(7_001, 2, TimerOp::Expired));
        for e in &events {
            pipe.fold(e);
        }
        pipe.finish();
        let made_by: Vec<MadeBy> = pipe.exits.iter().map(|x| x.made_by).collect();
        let passed = [SynSent, Established, FinWait1, FinWait2, TimeWait]
            .iter()
            .fold(0u16, |m, s| m | 1 << *s as u16);
        assert_eq!(made_by.len(), 2);
        assert_eq!(made_by[0].role, Role::Client);
        assert_eq!(
            made_by[0].states & passed,
            passed,
            "{:#x}",
            made_by[0].states
        );
        assert_eq!(made_by[1], MadeBy::UNKNOWN);
        let x = &pipe.exits[0];
        assert_eq!(x.made_by.service_port(x.local, x.remote), 80);
    }

    /// A server whose orphan entered a timewait socket in FIN_WAIT2 (its client had not
    /// sent its FIN), in the three fates such a socket has, each in its possible orders.
    #[test]
    fn an_orphans_timewait_socket_in_fin_wait2_decides_the_close() {
        use crate::model::event::{Direction, Event, Reset, TimerEvent, TimerOp};
        use State::*;
        const TW: u64 = 0xffff_8881_0000_0990;
        let (local, remote) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:40000".parse().unwrap(),
        );
        let t = |ts: u64, from, to| {
            Event::Transition(Transition {
                ts_ns: ts,
                skaddr: 0xffff_8881_0000_0040,
                local,
                remote,
                from,
                to,
                in_from_ns: Some(1_000),
                owner: None,
                mptcp: false,
                netns: None,
                cgroup: None,
            })
        };
        let timer = |ts: u64, op| {
            Event::Timer(TimerEvent {
                ts_ns: ts,
                tw: TW,
                op,
                substate_at_end: Some(FinWait2),
            })
        };
        let armed = |ts, substate| {
            timer(
                ts,
                TimerOp::Armed {
                    substate,
                    timeout_jiffies: 15_000,
                    local,
                    remote,
                    netns: None,
                    rearm: false,
                },
            )
        };
        let reset = |ts, from| {
            Event::Reset(Reset {
                ts_ns: ts,
                skaddr: Some(from),
                local,
                remote,
                direction: Direction::Sent,
                state: Some(TimeWait),
                reason: Some(9),
                owner: None,
                netns: None,
                cgroup: None,
            })
        };
        let life_at = |at: u64| {
            vec![
                t(at + 1_000, Listen, SynRecv),
                t(at + 2_000, SynRecv, Established),
                t(at + 3_000, Established, FinWait1),
                t(at + 4_000, FinWait1, FinWait2),
                armed(at + 5_000, FinWait2),
                t(at + 5_001, FinWait2, TimeWait),
            ]
        };
        let life = || life_at(0);
        let run = |events: Vec<Event>, until: u64| {
            let mut pipe = Pipeline::new(Filter::default().compile())
                .tracking()
                .timewaits(true);
            let mut closes = Vec::new();
            for e in &events {
                pipe.fold(e);
                closes.append(&mut pipe.closes);
            }
            pipe.tick(until);
            closes.append(&mut pipe.closes);
            closes
        };
        let ms = 1_000_000;
        assert!(
            run(life(), 20 * ms).is_empty(),
            "waits for the socket's fate"
        );
        // The client's data came: the timewait socket answered with a reset and was killed,
        // or the closed socket did (the data raced with the hand-over) and the client, reset,
        // never sends its FIN. Either way no TIME_WAIT here, and this side's reset ended it.
        for from in [TW, 0xffff_8881_0000_0040] {
            let mut killed = life();
            killed.extend([reset(10 * ms, from), timer(10 * ms + 1, TimerOp::Cancelled)]);
            let c = run(killed, 2_000 * ms);
            assert_eq!(c.len(), 1);
            assert_eq!(
                (c[0].initiator, c[0].how, c[0].timewait, c[0].reset_reason),
                (Initiator::Local, How::RstSent, false, Some(9))
            );
        }
        // Killed without a reset (its namespace went away): no TIME_WAIT either.
        let mut gone = life();
        gone.push(timer(10 * ms, TimerOp::Cancelled));
        let c = run(gone, 2_000 * ms);
        assert_eq!((c.len(), c[0].timewait, c[0].how), (1, false, How::Fin));
        // Moved to TIME_WAIT by the client's FIN, with a visible re-arm: at once.
        let mut rearmed = life();
        rearmed.extend([
            timer(8 * ms, TimerOp::Cancelled),
            armed(8 * ms + 1, TimeWait),
        ]);
        let c = run(rearmed, 9 * ms);
        assert_eq!(c.len(), 1);
        assert!(c[0].timewait && c[0].how == How::Fin);
        // No sign either way (a silent re-arm): after the grace, as it was.
        let c = run(life(), 5_001 + FATE_GRACE_NS + 1);
        assert_eq!(c.len(), 1);
        assert!(c[0].timewait);
        // A server whose timewait socket went straight to TIME_WAIT: no wait at all.
        let mut direct = life();
        direct[4] = armed(5_000, TimeWait);
        assert_eq!(run(direct, 5_001).len(), 1);
        // No timewait socket at all: the client's data came with its acknowledgement of
        // this side's FIN, and the kernel closed the socket and reset the connection.
        let mut aborted = life();
        aborted.remove(4);
        aborted.push(reset(5_010, 0xffff_8881_0000_0040));
        let c = run(aborted, 5_011);
        assert_eq!((c.len(), c[0].how, c[0].timewait), (1, How::RstSent, false));
        // The 4-tuple taken again (no timewait socket holds it) before the first close was
        // decided: both closes come out, each once.
        let mut twice = life();
        twice.remove(4);
        let mut second = life_at(10 * ms);
        second.remove(4);
        twice.extend(second);
        assert_eq!(run(twice, 2_000 * ms).len(), 2);
    }
}
