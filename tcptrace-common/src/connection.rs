//! One record per connection: what the kernel keeps of a socket's life ([`SockLife`]) and
//! ships at its end, for the views that only fold transitions into connections.
//!
//! A connection record is two consecutive ring-buffer slots of [`Event`](crate::Event)'s
//! size, reserved and written together: an [`Event`](crate::Event) of kind
//! [`CONNECTION`](crate::kind::CONNECTION) — the end transition, with the endpoints, owner,
//! namespace and cgroup, exactly as a transition record has them — then a
//! [`ConnectionTail`] (kind [`CONNECTION_TAIL`](crate::kind::CONNECTION_TAIL), at the same
//! offset): the evidence, the time spent in each state, the birth. Keeping every slot
//! [`EVENT_SIZE`](crate::EVENT_SIZE) long keeps recordings a sequence of fixed-size records.

use bytemuck::{Pod, Zeroable};

use crate::{Event, state, verdict::Evidence};

/// How many states a connection can leave, indexed by kernel number − 1 (ESTABLISHED
/// through CLOSING; TIME_WAIT, CLOSE and LISTEN stay 0).
pub const STATES_LEFT: usize = 11;

/// The second slot of a connection record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnectionTail {
    /// Nanoseconds spent in each state left (index: kernel number − 1); 0 where the socket
    /// was not seen in that state or the time is unknown.
    pub in_state_ns: [u64; STATES_LEFT],
    /// Bit `1 << s` for every state entered before the end transition.
    pub entered: u16,
    /// [`kind::CONNECTION_TAIL`](crate::kind::CONNECTION_TAIL), at the offset of
    /// [`Event::kind`].
    pub kind: u8,
    /// The state left by the first transition seen: CLOSE or LISTEN when the birth was seen,
    /// the state it was in when tracing met it otherwise.
    pub first_from: u8,
    /// The socket's [`Evidence`].
    pub evidence: u8,
    /// Bits of [`tail_flag`].
    pub flags: u8,
    pub _pad: u16,
    /// The kernel's `sk_rst_reason` of the first reset this socket sent, plus one (0: none
    /// sent, or the kernel does not say).
    pub reset_reason: u32,
    pub _pad2: u32,
    /// When the socket was born (CLOCK_MONOTONIC ns); 0 when its birth was not seen.
    pub born_ns: u64,
}

const _: () = assert!(core::mem::size_of::<ConnectionTail>() == crate::EVENT_SIZE);
const _: () =
    assert!(core::mem::offset_of!(ConnectionTail, kind) == core::mem::offset_of!(Event, kind));

/// Bits of [`ConnectionTail::flags`].
pub mod tail_flag {
    /// A transition of this socket was missed (the state it left is not the one the last
    /// transition seen entered): its evidence and times may be incomplete.
    pub const GAP: u8 = 1 << 0;
}

/// A whole connection record as the kernel reserves it in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnectionRecord {
    pub head: Event,
    pub tail: ConnectionTail,
}

/// What the kernel side keeps with each socket (its socket-local storage), which userspace
/// also reads, socket by socket, through sock_diag (`INET_DIAG_REQ_SK_BPF_STORAGES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockStorage {
    /// Its life so far: times, path, evidence (the connection record's tail).
    pub life: SockLife,
    /// Its owner, learnt from its own system calls or its listener.
    pub owner: crate::Owner,
    /// `flag::RESET_RECEIVED` once a reset arrived for the socket.
    pub flags: u32,
    /// The socket's network namespace inode, read once (0: not read yet, or unknown).
    pub netns: u32,
    /// The socket's cgroup id, read with `netns` (a socket keeps both for life).
    pub cgroup: u64,
}

/// What the kernel keeps of one socket's life (in its socket-local storage), folded by
/// [`SockLife::on_transition`] and [`SockLife::on_reset`], the same functions userspace
/// tests run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockLife {
    /// When the last transition seen happened (0: none seen).
    pub last_ts: u64,
    /// When the socket was born (0: not seen).
    pub born_ns: u64,
    /// As [`ConnectionTail::in_state_ns`].
    pub in_state_ns: [u64; STATES_LEFT],
    /// As [`ConnectionTail::entered`].
    pub entered: u16,
    /// The state the last transition seen entered.
    pub last_state: u8,
    /// As [`ConnectionTail::first_from`].
    pub first_from: u8,
    /// The socket's [`Evidence`].
    pub evidence: u8,
    /// Bits of [`tail_flag`].
    pub flags: u8,
    pub _pad: u16,
    /// As [`ConnectionTail::reset_reason`].
    pub reset_reason: u32,
    pub _pad2: u32,
}

/// Whether a transition starts a socket's life afresh: a connect or listen on a socket that
/// was closed, or a child created by its listener.
#[inline(always)]
pub const fn is_birth(old: u8, new: u8) -> bool {
    (old == state::CLOSE && new == state::LISTEN) || Evidence::birth_role(old, new).is_some()
}

/// Whether `records` (bits of [`records`](crate::records)) leave the transition `old`→`new`
/// out: a middle step of a connection's life — SYN_SENT→ESTABLISHED and FIN_WAIT1→FIN_WAIT2
/// with [`NO_MIDDLE`](crate::records::NO_MIDDLE), CLOSE_WAIT→LAST_ACK with
/// [`NO_PASSIVE_CLOSE`](crate::records::NO_PASSIVE_CLOSE). Every other transition from their
/// first state is kept, and a transition leaving their second state while the last one seen
/// entered their first shows that they happened.
#[inline(always)]
pub const fn left_out(records: u32, old: u8, new: u8) -> bool {
    use crate::records::{NO_MIDDLE, NO_PASSIVE_CLOSE};
    match (old, new) {
        (state::SYN_SENT, state::ESTABLISHED) | (state::FIN_WAIT1, state::FIN_WAIT2) => {
            records & NO_MIDDLE != 0
        }
        (state::CLOSE_WAIT, state::LAST_ACK) => {
            records & (NO_MIDDLE | NO_PASSIVE_CLOSE) == NO_MIDDLE | NO_PASSIVE_CLOSE
        }
        _ => false,
    }
}

/// Whether a transition ends a connection (not a listener): its connection record is due.
#[inline(always)]
pub const fn ends_connection(old: u8, new: u8) -> bool {
    new == state::CLOSE && old != state::LISTEN && old != state::CLOSE
}

impl SockLife {
    /// Forgets everything: a new life starts. Field by field, with volatile writes: the BPF
    /// backend has no `memset`, which a plain assignment of the whole would become.
    #[inline(always)]
    pub fn clear(&mut self) {
        // SAFETY: each pointer is to a field of `self`, which is borrowed mutably.
        unsafe {
            core::ptr::write_volatile(&mut self.last_ts, 0);
            core::ptr::write_volatile(&mut self.born_ns, 0);
            let mut i = 0;
            while i < STATES_LEFT {
                core::ptr::write_volatile(&mut self.in_state_ns[i], 0);
                i += 1;
            }
            core::ptr::write_volatile(&mut self.entered, 0);
            core::ptr::write_volatile(&mut self.last_state, 0);
            core::ptr::write_volatile(&mut self.first_from, 0);
            core::ptr::write_volatile(&mut self.evidence, 0);
            core::ptr::write_volatile(&mut self.flags, 0);
            core::ptr::write_volatile(&mut self.reset_reason, 0);
        }
    }

    /// Whether a transition leaving `old` shows that the one before it was never folded in:
    /// the kernel ran no program for it (nothing else updates the storage), so it was lost.
    /// `records`: the loader's bits, which may leave middle transitions out on purpose
    /// ([`left_out`]); one of those is no loss.
    #[inline(always)]
    pub fn missed_before(&self, old: u8, records: u32) -> bool {
        self.last_ts != 0 && !self.follows(old, records)
    }

    /// Whether the transition `old`→… is not folded in yet: the last state seen is the one
    /// it leaves (or the one a transition into it that `records` leave out leaves). Right
    /// after the transition program ran for it, the last state is the one it entered
    /// instead.
    #[inline(always)]
    pub fn awaits(&self, old: u8, records: u32) -> bool {
        self.last_ts != 0 && self.follows(old, records)
    }

    /// Whether a transition leaving `old` comes right after the last one seen: it leaves the
    /// state that one entered, or one a transition `records` leave out leads to from there.
    #[inline(always)]
    fn follows(&self, old: u8, records: u32) -> bool {
        self.last_state == old || left_out(records, self.last_state, old)
    }

    /// The state a socket that is being destroyed was last seen entering, when that is not
    /// CLOSE: its end was never folded in (lost), and this is where it ended from.
    #[inline(always)]
    pub fn unseen_end(&self) -> Option<u8> {
        (self.last_ts != 0 && self.last_state != state::CLOSE).then_some(self.last_state)
    }

    /// Folds the transition `old`→`new` at `ts` in; returns the nanoseconds spent in `old`
    /// when the transition into it was seen.
    #[inline(always)]
    pub fn on_transition(&mut self, ts: u64, old: u8, new: u8) -> Option<u64> {
        self.on_transition_leaving_out(ts, old, new, 0)
    }

    /// [`SockLife::on_transition`] where the transitions `records` leave out ([`left_out`])
    /// are never folded in: one that the transition `old`→`new` shows happened (the last
    /// state seen leads to `old` through it) adds `old` to the states entered, and is no gap;
    /// the time in `old` is then unknown.
    #[inline(always)]
    pub fn on_transition_leaving_out(
        &mut self,
        ts: u64,
        old: u8,
        new: u8,
        records: u32,
    ) -> Option<u64> {
        if is_birth(old, new) {
            self.clear();
            self.born_ns = ts;
        }
        let mut in_old = None;
        if self.last_ts == 0 {
            self.first_from = old;
        } else if self.last_state == old {
            let d = ts.wrapping_sub(self.last_ts);
            in_old = Some(d);
            if let Some(slot) = self.in_state_ns.get_mut(usize::from(old).wrapping_sub(1)) {
                *slot = d;
            }
        } else if left_out(records, self.last_state, old) {
            // `old` < 16: a middle transition enters ESTABLISHED, FIN_WAIT2 or LAST_ACK.
            self.entered |= 1 << old;
        } else {
            self.flags |= tail_flag::GAP;
        }
        if new != state::CLOSE && new < 16 {
            self.entered |= 1 << new;
        }
        self.last_ts = ts;
        self.last_state = new;
        let mut e = Evidence(self.evidence);
        e.on_transition(old, new);
        self.evidence = e.0;
        in_old
    }

    /// Folds a reset in (`received`, or sent with the kernel's `reason` when it says).
    #[inline(always)]
    pub fn on_reset(&mut self, received: bool, reason: Option<u32>) {
        let mut e = Evidence(self.evidence);
        e.on_reset(received);
        self.evidence = e.0;
        if !received
            && self.reset_reason == 0
            && let Some(r) = reason
        {
            self.reset_reason = r.wrapping_add(1);
        }
    }

    /// The tail of this life's connection record.
    pub fn tail(&self) -> ConnectionTail {
        ConnectionTail {
            in_state_ns: self.in_state_ns,
            entered: self.entered,
            kind: crate::kind::CONNECTION_TAIL,
            first_from: self.first_from,
            evidence: self.evidence,
            flags: self.flags,
            _pad: 0,
            reset_reason: self.reset_reason,
            _pad2: 0,
            born_ns: self.born_ns,
        }
    }
}

/// The order in which a connection can pass through the states it leaves: every path TCP
/// takes between a birth and the end visits them in this order (SYN_SENT→SYN_RECV is a
/// simultaneous open; FIN_WAIT1 and CLOSE_WAIT exclude each other, as do FIN_WAIT2 and
/// CLOSING), so the set of states entered gives the path.
pub const PATH_ORDER: [u8; 8] = [
    state::SYN_SENT,
    state::SYN_RECV,
    state::ESTABLISHED,
    state::FIN_WAIT1,
    state::CLOSE_WAIT,
    state::FIN_WAIT2,
    state::CLOSING,
    state::LAST_ACK,
];

/// The transitions of a connection, from what its record holds: the first state left, the
/// states entered, and the end transition (its `from`, and its `to` as the record has it).
/// Calls `step(from, to)` for each, in order. A state of the path that is not the end's
/// `from` (a transition missed) is joined to the end as it was seen.
pub fn path(first_from: u8, entered: u16, end_from: u8, end_to: u8, mut step: impl FnMut(u8, u8)) {
    let mut at = first_from;
    for s in PATH_ORDER {
        if s != at && entered & (1 << s) != 0 {
            step(at, s);
            at = s;
        }
    }
    if at != end_from {
        // The transition into `end_from` was not seen: the path jumps there.
        at = end_from;
    }
    step(at, end_to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::*;

    fn steps(first: u8, entered: u16, from: u8, to: u8) -> [(u8, u8); 8] {
        let mut out = [(0, 0); 8];
        let mut n = 0;
        path(first, entered, from, to, |a, b| {
            out[n] = (a, b);
            n += 1;
        });
        out
    }

    fn bits(states: &[u8]) -> u16 {
        states.iter().fold(0, |b, s| b | 1 << s)
    }

    #[test]
    fn a_life_folds_times_evidence_and_the_path() {
        let mut l = SockLife::default();
        let script = [
            (CLOSE, SYN_SENT),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, FIN_WAIT1),
            (FIN_WAIT1, FIN_WAIT2),
        ];
        let mut ts = 1_000;
        for (i, (old, new)) in script.iter().enumerate() {
            ts += 10 * (i as u64 + 1);
            let d = l.on_transition(ts, *old, *new);
            assert_eq!(d.is_some(), i > 0, "{i}");
        }
        assert_eq!(l.on_transition(ts + 50, FIN_WAIT2, CLOSE), Some(50));
        let t = l.tail();
        assert_eq!(t.born_ns, 1_010);
        assert_eq!(t.first_from, CLOSE);
        assert_eq!(t.in_state_ns[SYN_SENT as usize - 1], 20);
        assert_eq!(t.in_state_ns[ESTABLISHED as usize - 1], 30);
        assert_eq!(t.in_state_ns[FIN_WAIT1 as usize - 1], 40);
        assert_eq!(t.in_state_ns[FIN_WAIT2 as usize - 1], 50);
        assert_eq!(
            t.entered,
            bits(&[SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2])
        );
        assert_eq!(t.flags, 0);
        let e = Evidence(t.evidence);
        assert_eq!(e.first_fin(), Some(crate::verdict::Initiator::Local));
        let mut seen = [(0, 0); 8];
        seen[..5].copy_from_slice(&[
            (CLOSE, SYN_SENT),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, FIN_WAIT1),
            (FIN_WAIT1, FIN_WAIT2),
            (FIN_WAIT2, CLOSE),
        ]);
        assert_eq!(steps(t.first_from, t.entered, FIN_WAIT2, CLOSE), seen);
    }

    #[test]
    fn what_the_storage_tells_of_transitions_no_program_ran_for() {
        let mut l = SockLife::default();
        // Nothing seen yet: no gap, nothing awaited, no end to infer (a socket older than
        // the trace, or one whose storage was never created).
        assert!(!l.missed_before(ESTABLISHED, 0) && !l.awaits(ESTABLISHED, 0));
        assert_eq!(l.unseen_end(), None);
        l.on_transition(10, CLOSE, SYN_SENT);
        l.on_transition(20, SYN_SENT, ESTABLISHED);
        // The next transition is awaited; one from elsewhere shows a missed one.
        assert!(l.awaits(ESTABLISHED, 0) && !l.missed_before(ESTABLISHED, 0));
        assert!(l.missed_before(CLOSE_WAIT, 0) && !l.awaits(CLOSE_WAIT, 0));
        // Destroyed now, it ended unseen from ESTABLISHED.
        assert_eq!(l.unseen_end(), Some(ESTABLISHED));
        l.on_transition(30, ESTABLISHED, CLOSE);
        assert_eq!(l.unseen_end(), None, "its end was seen");
        assert!(!l.awaits(ESTABLISHED, 0), "folded in: no longer awaited");
    }

    #[test]
    fn middle_transitions_left_out_are_inferred_not_gaps() {
        use crate::records::{NO_MIDDLE, NO_PASSIVE_CLOSE};
        let lives: [&[(u8, u8)]; 3] = [
            // A client that closes first.
            &[
                (CLOSE, SYN_SENT),
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, FIN_WAIT1),
                (FIN_WAIT1, FIN_WAIT2),
                (FIN_WAIT2, CLOSE),
            ],
            // A server whose peer closes first.
            &[
                (LISTEN, SYN_RECV),
                (SYN_RECV, ESTABLISHED),
                (ESTABLISHED, CLOSE_WAIT),
                (CLOSE_WAIT, LAST_ACK),
                (LAST_ACK, CLOSE),
            ],
            // A client aborted once established.
            &[
                (CLOSE, SYN_SENT),
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, CLOSE),
            ],
        ];
        for records in [NO_MIDDLE, NO_MIDDLE | NO_PASSIVE_CLOSE] {
            for life in lives {
                let (mut all, mut some) = (SockLife::default(), SockLife::default());
                for (i, (old, new)) in life.iter().enumerate() {
                    let ts = 100 * (i as u64 + 1);
                    all.on_transition(ts, *old, *new);
                    if left_out(records, *old, *new) {
                        continue;
                    }
                    assert!(!some.missed_before(*old, records), "{old}->{new}");
                    assert!(
                        some.last_ts == 0 || some.awaits(*old, records),
                        "{old}->{new}"
                    );
                    some.on_transition_leaving_out(ts, *old, *new, records);
                }
                // The same path, birth, evidence and no gap; only times are missing.
                let (a, b) = (all.tail(), some.tail());
                assert_eq!(
                    (a.entered, a.first_from, a.evidence, a.flags, a.born_ns),
                    (b.entered, b.first_from, b.evidence, b.flags, b.born_ns),
                    "{life:?}"
                );
                assert_eq!(b.flags, 0);
                assert_eq!(all.unseen_end(), some.unseen_end());
            }
        }
        // What each bit leaves out: NO_PASSIVE_CLOSE only with NO_MIDDLE.
        for (records, ends, fin, close) in [
            (0, false, false, false),
            (NO_MIDDLE, true, true, false),
            (NO_PASSIVE_CLOSE, false, false, false),
            (NO_MIDDLE | NO_PASSIVE_CLOSE, true, true, true),
        ] {
            assert_eq!(left_out(records, SYN_SENT, ESTABLISHED), ends);
            assert_eq!(left_out(records, FIN_WAIT1, FIN_WAIT2), fin);
            assert_eq!(left_out(records, CLOSE_WAIT, LAST_ACK), close);
            for old in 0..=MAX {
                for new in 0..=MAX {
                    let middle = matches!(
                        (old, new),
                        (SYN_SENT, ESTABLISHED) | (FIN_WAIT1, FIN_WAIT2) | (CLOSE_WAIT, LAST_ACK)
                    );
                    assert!(middle || !left_out(records, old, new), "{old}->{new}");
                }
            }
        }
        // Without leaving them out on purpose, a middle transition unseen is a loss.
        let mut l = SockLife::default();
        l.on_transition(10, CLOSE, SYN_SENT);
        assert!(l.missed_before(ESTABLISHED, 0) && !l.missed_before(ESTABLISHED, NO_MIDDLE));
        l.on_transition(20, ESTABLISHED, FIN_WAIT1);
        assert_eq!(l.flags, tail_flag::GAP);
        // CLOSE_WAIT→LAST_ACK kept (NO_MIDDLE alone), its loss is one.
        let mut l = SockLife::default();
        l.on_transition_leaving_out(10, ESTABLISHED, CLOSE_WAIT, NO_MIDDLE);
        assert!(l.missed_before(LAST_ACK, NO_MIDDLE));
        assert!(!l.missed_before(LAST_ACK, NO_MIDDLE | NO_PASSIVE_CLOSE));
        // Left out on purpose, only a middle one is inferred: SYN_SENT→FIN_WAIT1 is a gap.
        let mut l = SockLife::default();
        l.on_transition_leaving_out(10, CLOSE, SYN_SENT, NO_MIDDLE);
        assert!(l.missed_before(FIN_WAIT1, NO_MIDDLE));
        l.on_transition_leaving_out(20, FIN_WAIT1, FIN_WAIT2, NO_MIDDLE);
        assert_eq!(l.flags, tail_flag::GAP);
    }

    #[test]
    fn a_missed_transition_is_a_gap_and_a_birth_clears_it() {
        let mut l = SockLife::default();
        l.on_transition(10, CLOSE, SYN_SENT);
        assert_eq!(l.on_transition(20, ESTABLISHED, FIN_WAIT1), None);
        assert_eq!(l.flags, tail_flag::GAP);
        l.on_reset(false, Some(3));
        l.on_reset(false, Some(5));
        assert_eq!(l.reset_reason, 4, "the first reset's reason, plus one");
        l.on_transition(30, CLOSE, SYN_SENT);
        let fresh = SockLife {
            last_ts: 30,
            born_ns: 30,
            entered: bits(&[SYN_SENT]),
            last_state: SYN_SENT,
            first_from: CLOSE,
            evidence: Evidence::new(true, crate::verdict::Role::Client).0,
            ..SockLife::default()
        };
        assert_eq!(l, fresh);
    }

    #[test]
    fn paths_of_every_kind_of_life() {
        // Server, passive close.
        let s = steps(
            LISTEN,
            bits(&[SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK]),
            LAST_ACK,
            CLOSE,
        );
        assert_eq!(
            s[..5],
            [
                (LISTEN, SYN_RECV),
                (SYN_RECV, ESTABLISHED),
                (ESTABLISHED, CLOSE_WAIT),
                (CLOSE_WAIT, LAST_ACK),
                (LAST_ACK, CLOSE)
            ]
        );
        // First met mid-life in ESTABLISHED, simultaneous close.
        let s = steps(ESTABLISHED, bits(&[FIN_WAIT1, CLOSING]), CLOSING, CLOSE);
        assert_eq!(
            s[..3],
            [
                (ESTABLISHED, FIN_WAIT1),
                (FIN_WAIT1, CLOSING),
                (CLOSING, CLOSE)
            ]
        );
        // A refused connect.
        let s = steps(CLOSE, bits(&[SYN_SENT]), SYN_SENT, CLOSE);
        assert_eq!(s[..2], [(CLOSE, SYN_SENT), (SYN_SENT, CLOSE)]);
        // A missed transition into the end's state: the path jumps there.
        let s = steps(CLOSE, bits(&[SYN_SENT, ESTABLISHED]), FIN_WAIT2, CLOSE);
        assert_eq!(
            s[..3],
            [
                (CLOSE, SYN_SENT),
                (SYN_SENT, ESTABLISHED),
                (FIN_WAIT2, CLOSE)
            ]
        );
    }

    #[test]
    fn only_connections_end_and_only_starts_are_births() {
        for old in 0..=MAX {
            for new in 0..=MAX {
                let end = ends_connection(old, new);
                assert_eq!(
                    end,
                    new == CLOSE && old != LISTEN && old != CLOSE,
                    "{old}->{new}"
                );
                if is_birth(old, new) {
                    assert!(matches!(old, CLOSE | LISTEN), "{old}->{new}");
                }
            }
        }
    }
}
