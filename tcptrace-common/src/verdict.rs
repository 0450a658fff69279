//! Who closed a connection and how: the evidence a socket's life leaves, and the one rule that
//! turns it into a verdict.
//!
//! Both sides use these: the kernel folds each socket's transitions and resets into an
//! [`Evidence`] kept with the socket and ships it in the socket's connection record; userspace
//! folds the same events into the same [`Evidence`] when it follows transitions (older
//! kernels, recordings). Either way [`conclude`] decides, so a connection gets the same
//! verdict from its transitions as from its record.
//!
//! What each piece of evidence proves:
//! - ESTABLISHED/SYN_RECV→FIN_WAIT1: this side sent the first FIN (`local`).
//! - ESTABLISHED/SYN_RECV→CLOSE_WAIT: the peer's FIN arrived first (`remote`).
//! - FIN_WAIT1→CLOSING: both FINs crossed (`simultaneous`).
//! - FIN_WAIT2→TIME_WAIT: this side closed first and holds TIME_WAIT; CLOSING→TIME_WAIT:
//!   simultaneous close, both sides hold it; LAST_ACK→CLOSE: the passive side's clean end.
//! - Any other →CLOSE is an abort. A reset received before it means the peer aborted
//!   (`rst_received`; `refused` from SYN_SENT); a reset this socket sent means this side did
//!   (`rst_sent`) — an application's abortive close logs the transition first and sends its
//!   reset right after, so an abort with no reset yet [awaits](Verdict::awaits_reset) it
//!   briefly. No reset either way means the kernel gave up (`timeout`), unless evidence may
//!   be missing ([`Verdict::without_reset`]).
//! - A reset "received" is not always the peer's: when data reaches a socket whose
//!   application has shut its reading side (FIN_WAIT1/2, CLOSE_WAIT, CLOSING, LAST_ACK), the
//!   kernel aborts it through the same path as a received reset (`tcp_receive_reset` fires)
//!   and then sends a reset itself (`TCP_ABORT_ON_DATA`). No peer answers a reset with a
//!   reset, so a reset sent by the socket after one "received" proves the abort was this
//!   side's: received-then-sent is an abort sent ([`Evidence::on_reset`]), and a close
//!   explained by a received reset in those states awaits that sent reset briefly too.

use crate::state;

/// Who ended the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// This side: it sent the first FIN, or the reset that aborted the connection.
    Local,
    /// The peer: its FIN arrived first, its reset aborted the connection, or it refused it.
    Remote,
    /// Both FINs crossed.
    Simultaneous,
    /// No evidence.
    Unknown,
}

/// How the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum How {
    /// An orderly close with FINs.
    Fin,
    /// This side sent a reset.
    RstSent,
    /// A reset arrived.
    RstReceived,
    /// The connect was refused (a reset in answer to the SYN).
    Refused,
    /// The kernel gave up (handshake, retransmission or keepalive timeout).
    Timeout,
    /// No evidence.
    Unknown,
}

/// Which end of the connection a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// It connected (`connect()`).
    Client,
    /// It was accepted from a listener.
    Server,
    /// First seen mid-life.
    Unknown,
}

impl Initiator {
    /// The name used in JSON and text.
    pub const fn name(self) -> &'static str {
        match self {
            Initiator::Local => "local",
            Initiator::Remote => "remote",
            Initiator::Simultaneous => "simultaneous",
            Initiator::Unknown => "unknown",
        }
    }
}

impl How {
    /// The name used in JSON and text.
    pub const fn name(self) -> &'static str {
        match self {
            How::Fin => "fin",
            How::RstSent => "rst_sent",
            How::RstReceived => "rst_received",
            How::Refused => "refused",
            How::Timeout => "timeout",
            How::Unknown => "unknown",
        }
    }
}

impl Role {
    /// The name used in JSON and text.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// A connect cannot time out before the first SYN retransmission (RTO 1 s): an unconnected
/// socket closed sooner was closed by its application.
pub const MIN_CONNECT_TIMEOUT_NS: u64 = 1_000_000_000;

/// What one socket's life has shown so far, in one byte (kept with the socket in the kernel,
/// and in userspace's table of followed sockets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Evidence(pub u8);

const BORN: u8 = 1;
const ROLE_SHIFT: u8 = 1;
const FIN_SHIFT: u8 = 3;
const CROSSED: u8 = 1 << 5;
const RESET_SHIFT: u8 = 6;
const TWO_BITS: u8 = 3;
/// Values of the two reset bits.
const RESET_SENT: u8 = 1;
const RESET_RECEIVED: u8 = 2;
/// A reset "received", then one sent: the kernel aborted the socket itself.
const RESET_OWN_ABORT: u8 = 3;

impl Evidence {
    /// The role a transition gives a socket it starts: CLOSE→SYN_SENT (a connect) makes a
    /// client; LISTEN→SYN_RECV (a child of a listener; CLOSE→SYN_RECV with fast open) a
    /// server. None for every other transition.
    #[inline(always)]
    pub const fn birth_role(old: u8, new: u8) -> Option<Role> {
        match (old, new) {
            (state::CLOSE, state::SYN_SENT) => Some(Role::Client),
            (state::LISTEN | state::CLOSE, state::SYN_RECV) => Some(Role::Server),
            _ => None,
        }
    }

    /// The evidence of a socket first seen mid-life (`born` false) or at its birth.
    #[inline(always)]
    pub const fn new(born: bool, role: Role) -> Evidence {
        let role = match role {
            Role::Unknown => 0,
            Role::Client => 1,
            Role::Server => 2,
        };
        Evidence((born as u8 * BORN) | (role << ROLE_SHIFT))
    }

    /// Folds one transition in. A birth starts the evidence afresh.
    #[inline(always)]
    pub fn on_transition(&mut self, old: u8, new: u8) {
        use state::*;
        if let Some(role) = Evidence::birth_role(old, new) {
            *self = Evidence::new(true, role);
            return;
        }
        match (old, new) {
            (ESTABLISHED | SYN_RECV, FIN_WAIT1) => self.first_fin_is(1),
            (ESTABLISHED | SYN_RECV, CLOSE_WAIT) => self.first_fin_is(2),
            (FIN_WAIT1, CLOSING) => self.0 |= CROSSED,
            _ => {}
        }
    }

    #[inline(always)]
    fn first_fin_is(&mut self, code: u8) {
        if (self.0 >> FIN_SHIFT) & TWO_BITS == 0 {
            self.0 |= code << FIN_SHIFT;
        }
    }

    /// Folds a reset in (`received`: it arrived; else this socket sent it). The first reset
    /// decides — but for a reset sent after one received, which proves the received one was
    /// the kernel's own abort (no peer answers a reset with a reset).
    #[inline(always)]
    pub fn on_reset(&mut self, received: bool) {
        let seen = (self.0 >> RESET_SHIFT) & TWO_BITS;
        let now = match (seen, received) {
            (0, true) => RESET_RECEIVED,
            (0, false) => RESET_SENT,
            (RESET_RECEIVED, false) => RESET_OWN_ABORT,
            (seen, _) => seen,
        };
        self.0 = (self.0 & !(TWO_BITS << RESET_SHIFT)) | now << RESET_SHIFT;
    }

    /// Both FINs crossed: seen by this socket, or told by its traced peer.
    #[inline(always)]
    pub fn cross(&mut self) {
        self.0 |= CROSSED;
    }

    /// Whether the socket's birth was seen.
    pub const fn born(self) -> bool {
        self.0 & BORN != 0
    }

    /// Client, server, or unknown (first seen mid-life).
    pub const fn role(self) -> Role {
        match (self.0 >> ROLE_SHIFT) & TWO_BITS {
            1 => Role::Client,
            2 => Role::Server,
            _ => Role::Unknown,
        }
    }

    /// Which side's FIN came first, if one did.
    pub const fn first_fin(self) -> Option<Initiator> {
        match (self.0 >> FIN_SHIFT) & TWO_BITS {
            1 => Some(Initiator::Local),
            2 => Some(Initiator::Remote),
            _ => None,
        }
    }

    /// Whether both FINs crossed.
    pub const fn crossed(self) -> bool {
        self.0 & CROSSED != 0
    }

    /// The reset that decides: `Some(true)` received from the peer, `Some(false)` sent by
    /// this side (first, or after the kernel's own abort dressed as a received one).
    pub const fn first_reset_received(self) -> Option<bool> {
        match (self.0 >> RESET_SHIFT) & TWO_BITS {
            RESET_SENT | RESET_OWN_ABORT => Some(false),
            RESET_RECEIVED => Some(true),
            _ => None,
        }
    }
}

/// A connection's classified end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Who ended it first.
    pub initiator: Initiator,
    /// How.
    pub how: How,
    /// Whether this side went into TIME_WAIT.
    pub timewait: bool,
    /// An abort with no reset yet, or one explained by a reset "received" in a state where
    /// the kernel aborts on data itself: the reset this side may send right after the
    /// transition decides ([`Verdict::with_late_reset`]), else [`Verdict::without_reset`].
    pub awaits_reset: bool,
    /// Who ended it if this side's reset follows.
    if_reset_sent: Initiator,
}

/// The states in which data arriving after the application shut its reading side makes the
/// kernel abort the socket (`tcp_rcv_state_process`): `tcp_receive_reset` fires for that
/// abort as for a reset received.
const fn aborts_on_data(from: u8) -> bool {
    use state::*;
    matches!(
        from,
        FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | CLOSING | LAST_ACK
    )
}

/// The verdict on a socket whose life ended with `from`→`to` (`to` as
/// [`effective_new_state`](crate::effective_new_state) gives it: TIME_WAIT or CLOSE).
pub fn conclude(e: Evidence, from: u8, to: u8) -> Verdict {
    use state::*;
    // Both FINs crossed: nobody closed first, whatever reset ended it afterwards.
    let first = match e.first_fin() {
        Some(_) if e.crossed() => Some(Initiator::Simultaneous),
        f => f,
    };
    let mut v = Verdict {
        initiator: Initiator::Unknown,
        how: How::Unknown,
        timewait: to == TIME_WAIT,
        awaits_reset: false,
        if_reset_sent: Initiator::Local,
    };
    match (from, to) {
        // Our FIN was acknowledged before the peer's arrived: we closed first.
        (FIN_WAIT2, TIME_WAIT) => (v.initiator, v.how) = (Initiator::Local, How::Fin),
        (CLOSING, TIME_WAIT) => (v.initiator, v.how) = (Initiator::Simultaneous, How::Fin),
        // Not a path the kernel takes into TIME_WAIT: claim nothing more.
        (_, TIME_WAIT) => v.initiator = or_unknown(first),
        // LAST_ACK comes from CLOSE_WAIT: the peer's FIN came first.
        (LAST_ACK, _) => {
            v.initiator = first.unwrap_or(Initiator::Remote);
            v.if_reset_sent = v.initiator;
            v.how = match e.first_reset_received() {
                Some(true) => How::RstReceived,
                Some(false) => How::RstSent,
                None => How::Fin,
            };
            v.awaits_reset = v.how == How::RstReceived;
        }
        // An abort: a reset explains it, in either order.
        (from, _) => match e.first_reset_received() {
            // A reset in answer to our SYN: the peer refused, whatever else was seen.
            Some(true) if from == SYN_SENT => {
                (v.initiator, v.how) = (Initiator::Remote, How::Refused);
            }
            Some(true) => {
                v.initiator = first.unwrap_or(Initiator::Remote);
                v.how = How::RstReceived;
                v.if_reset_sent = first.unwrap_or(Initiator::Local);
                v.awaits_reset = aborts_on_data(from);
            }
            Some(false) => {
                v.initiator = first.unwrap_or(Initiator::Local);
                v.how = How::RstSent;
            }
            None => {
                v.initiator = or_unknown(first);
                v.if_reset_sent = match v.initiator {
                    Initiator::Unknown => Initiator::Local,
                    i => i,
                };
                v.awaits_reset = true;
            }
        },
    }
    if e.crossed() && v.how == How::Fin {
        v.initiator = Initiator::Simultaneous;
    }
    v
}

const fn or_unknown(i: Option<Initiator>) -> Initiator {
    match i {
        Some(i) => i,
        None => Initiator::Unknown,
    }
}

impl Verdict {
    /// An awaited abort, explained by the reset this side sent right after it (after a
    /// reset "received", the kernel's own abort on data).
    pub fn with_late_reset(mut self) -> Verdict {
        self.initiator = self.if_reset_sent;
        self.how = How::RstSent;
        self.awaits_reset = false;
        self
    }

    /// An awaited abort for which no reset came: the kernel gave up — unless evidence may
    /// be missing (`gap`: events were lost during the socket's life, or its start was not
    /// seen), or an unconnected socket was closed by its application: closing one looks the
    /// same as a connect that timed out, and only the time spent trying (`in_from_ns`, in
    /// `from`) tells them apart.
    pub fn without_reset(mut self, from: u8, in_from_ns: Option<u64>, gap: bool) -> Verdict {
        self.awaits_reset = false;
        // A reset the peer did send stands.
        if gap || self.how == How::RstReceived {
            return self;
        }
        self.how = match from {
            state::SYN_SENT if in_from_ns.is_some_and(|d| d >= MIN_CONNECT_TIMEOUT_NS) => {
                How::Timeout
            }
            state::SYN_SENT => How::Unknown,
            _ => How::Timeout,
        };
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::*;

    #[test]
    fn evidence_round_trips_every_field() {
        for born in [false, true] {
            for role in [Role::Client, Role::Server, Role::Unknown] {
                let mut e = Evidence::new(born, role);
                assert_eq!((e.born(), e.role()), (born, role));
                assert_eq!(e.first_fin(), None);
                e.on_transition(ESTABLISHED, CLOSE_WAIT);
                e.on_transition(ESTABLISHED, FIN_WAIT1);
                assert_eq!(
                    e.first_fin(),
                    Some(Initiator::Remote),
                    "the first FIN stays"
                );
                e.on_reset(false);
                e.on_reset(true);
                assert_eq!(
                    e.first_reset_received(),
                    Some(false),
                    "the first reset stays"
                );
                assert!(!e.crossed());
                e.on_transition(FIN_WAIT1, CLOSING);
                assert!(e.crossed());
                assert_eq!((e.born(), e.role()), (born, role));
            }
        }
    }

    #[test]
    fn a_birth_starts_afresh() {
        let mut e = Evidence::new(false, Role::Unknown);
        e.on_transition(ESTABLISHED, FIN_WAIT1);
        e.on_reset(true);
        e.on_transition(CLOSE, SYN_SENT);
        assert_eq!(e, Evidence::new(true, Role::Client));
        e.on_transition(LISTEN, SYN_RECV);
        assert_eq!(e.role(), Role::Server);
    }

    #[test]
    fn the_kernels_own_abort_on_data_is_a_reset_sent() {
        // This side shut down (FIN_WAIT2), the peer's data arrived: the kernel "receives" a
        // reset, the socket closes, then the kernel sends one. In the transition's order...
        let mut e = Evidence::new(true, Role::Server);
        e.on_transition(ESTABLISHED, FIN_WAIT1);
        e.on_transition(FIN_WAIT1, FIN_WAIT2);
        e.on_reset(true);
        let v = conclude(e, FIN_WAIT2, CLOSE);
        assert_eq!(
            (v.initiator, v.how, v.awaits_reset),
            (Initiator::Local, How::RstReceived, true)
        );
        let late = v.with_late_reset();
        assert_eq!((late.initiator, late.how), (Initiator::Local, How::RstSent));
        // ...and with the sent reset folded in before the end.
        e.on_reset(false);
        let v = conclude(e, FIN_WAIT2, CLOSE);
        assert_eq!(
            (v.initiator, v.how, v.awaits_reset),
            (Initiator::Local, How::RstSent, false)
        );
        // A reset the peer sent, and nothing after: it stands.
        let mut peer = Evidence::new(true, Role::Client);
        peer.on_transition(ESTABLISHED, CLOSE_WAIT);
        peer.on_reset(true);
        let v = conclude(peer, CLOSE_WAIT, CLOSE);
        assert!(v.awaits_reset);
        let v = v.without_reset(CLOSE_WAIT, None, false);
        assert_eq!((v.initiator, v.how), (Initiator::Remote, How::RstReceived));
        // In ESTABLISHED the kernel never aborts on data: no waiting.
        let mut est = Evidence::new(true, Role::Client);
        est.on_reset(true);
        assert!(!conclude(est, ESTABLISHED, CLOSE).awaits_reset);
        // LAST_ACK: the peer's FIN came first whoever's reset ended it.
        let mut last = Evidence::new(true, Role::Server);
        last.on_transition(ESTABLISHED, CLOSE_WAIT);
        last.on_reset(true);
        let v = conclude(last, LAST_ACK, CLOSE).with_late_reset();
        assert_eq!((v.initiator, v.how), (Initiator::Remote, How::RstSent));
        // A sent reset first, then one received: the first decides.
        let mut sent = Evidence::new(true, Role::Client);
        sent.on_reset(false);
        sent.on_reset(true);
        assert_eq!(sent.first_reset_received(), Some(false));
    }

    #[test]
    fn orderly_closes() {
        let mut client = Evidence::new(true, Role::Client);
        client.on_transition(ESTABLISHED, FIN_WAIT1);
        let v = conclude(client, FIN_WAIT2, TIME_WAIT);
        assert_eq!(
            (v.initiator, v.how, v.timewait),
            (Initiator::Local, How::Fin, true)
        );
        let mut server = Evidence::new(true, Role::Server);
        server.on_transition(ESTABLISHED, CLOSE_WAIT);
        let v = conclude(server, LAST_ACK, CLOSE);
        assert_eq!(
            (v.initiator, v.how, v.timewait),
            (Initiator::Remote, How::Fin, false)
        );
        let v = conclude(Evidence::default(), CLOSING, TIME_WAIT);
        assert_eq!(v.initiator, Initiator::Simultaneous);
    }

    #[test]
    fn aborts_are_explained_by_resets_or_wait_for_one() {
        let mut refused = Evidence::new(true, Role::Client);
        refused.on_reset(true);
        let v = conclude(refused, SYN_SENT, CLOSE);
        assert_eq!((v.initiator, v.how), (Initiator::Remote, How::Refused));
        let open = Evidence::new(true, Role::Client);
        let v = conclude(open, ESTABLISHED, CLOSE);
        assert!(v.awaits_reset);
        let late = v.with_late_reset();
        assert_eq!((late.initiator, late.how), (Initiator::Local, How::RstSent));
        assert!(!late.awaits_reset);
        assert_eq!(v.without_reset(ESTABLISHED, None, false).how, How::Timeout);
        assert_eq!(v.without_reset(ESTABLISHED, None, true).how, How::Unknown);
        let short = Some(MIN_CONNECT_TIMEOUT_NS - 1);
        assert_eq!(v.without_reset(SYN_SENT, short, false).how, How::Unknown);
        let long = Some(MIN_CONNECT_TIMEOUT_NS);
        assert_eq!(v.without_reset(SYN_SENT, long, false).how, How::Timeout);
    }
}
