//! Decoded, typed events: what every view consumes, whether they come from the live probe or
//! from a recording.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tcptrace_common::{
    self as common, AF_INET, AF_INET6, connection::ConnectionTail, flag, kind, verdict::Evidence,
};

/// The raw record shared with the kernel (re-exported for sources and tests).
pub use tcptrace_common::Event as RawEvent;
/// A connection's counters at its end (see [`Event::Details`]).
pub use tcptrace_common::details::Details;

/// A TCP state: the contract's own ([`tcptrace_common::TcpState`]), the kernel side's too.
pub use tcptrace_common::TcpState as State;

/// A state name that is not one.
#[derive(Debug, thiserror::Error)]
#[error("unknown TCP state '{given}'{}", suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
pub struct UnknownState {
    /// What was given.
    pub given: String,
    /// The closest real state name, when one is close.
    pub suggestion: Option<&'static str>,
}

/// A state by name ([`State::from_name`]), or an error that suggests the closest name.
pub fn parse_state(s: &str) -> Result<State, UnknownState> {
    if let Some(st) = State::from_name(s) {
        return Ok(st);
    }
    let norm = s.trim().to_ascii_uppercase().replace('-', "_");
    let suggestion = State::ALL
        .iter()
        .map(|st| (strsim::jaro_winkler(&norm, st.name()), st.name()))
        .filter(|(score, _)| *score > 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name);
    Err(UnknownState {
        given: s.to_string(),
        suggestion,
    })
}

/// A process name as the kernel stores it: up to 16 bytes, NUL-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    /// The name, lossily decoded, without padding.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The process a socket belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Command name.
    pub comm: Comm,
    /// Learnt from the listening socket this one was accepted from, not from its own
    /// system call.
    pub from_listener: bool,
}

/// One state transition of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The socket's kernel address.
    pub skaddr: u64,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// The state left.
    pub from: State,
    /// The state entered, with FIN_WAIT2→CLOSE and CLOSING→CLOSE shown as entries into
    /// TIME_WAIT (see [`tcptrace_common::effective_new_state`]).
    pub to: State,
    /// Nanoseconds spent in `from`, when the socket's previous transition was seen.
    pub in_from_ns: Option<u64>,
    /// The owning process, when a trustworthy source named it.
    pub owner: Option<Owner>,
    /// Part of an MPTCP connection (the meta socket).
    pub mptcp: bool,
    /// The inode number of the socket's network namespace (what `stat -L /proc/PID/ns/net`
    /// or `stat -L /run/netns/NAME` shows); None when unknown. Never `Some(0)`.
    pub netns: Option<u32>,
    /// The socket's cgroup2 id (the inode number of its directory under the cgroup2 mount;
    /// [`crate::model::cgroup::Cgroups`] turns it into a path and a container); None when unknown.
    /// Never `Some(0)`.
    pub cgroup: Option<u64>,
}

impl Transition {
    /// 4 or 6.
    pub fn family(&self) -> u8 {
        if self.local.is_ipv4() { 4 } else { 6 }
    }
}

/// Which way a reset went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This host sent it.
    Sent,
    /// It arrived for one of this host's sockets.
    Received,
}

/// A TCP reset (RST) sent or received by this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The socket, or None for a reset sent where no socket exists (a refused connection).
    pub skaddr: Option<u64>,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Sent or received.
    pub direction: Direction,
    /// The socket's state when the reset was sent (the kernel does not say for received
    /// ones, nor for a reset with no socket).
    pub state: Option<State>,
    /// The kernel's `sk_rst_reason` number for a sent reset (Linux 6.10+).
    pub reason: Option<u32>,
    /// The socket's owner, when known.
    pub owner: Option<Owner>,
    /// The socket's network namespace inode; None without a socket (a refused connection)
    /// or when unknown.
    pub netns: Option<u32>,
    /// The socket's cgroup2 id; None without a full socket (no socket, or a timewait or
    /// request socket) or when unknown.
    pub cgroup: Option<u64>,
}

/// What happened to a timewait socket's timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerOp {
    /// Armed (a new timewait socket, or a re-arm), with its substate and timeout.
    Armed {
        /// FIN_WAIT2 (an orphan waiting for the peer's FIN) or TIME_WAIT.
        substate: State,
        /// The timeout in jiffies (the kernel's tick; 60 s is 15000 at HZ=250).
        timeout_jiffies: u64,
        /// Local endpoint.
        local: SocketAddr,
        /// Remote endpoint.
        remote: SocketAddr,
        /// The timewait socket's network namespace inode (None: unknown). Timewait sockets
        /// have no cgroup.
        netns: Option<u32>,
        /// The kernel said this re-arms a live timewait socket (`__inet_twsk_schedule`'s
        /// `rearm`). False from the timer tracepoints, which leave it to be told from a cancel
        /// just before.
        rearm: bool,
    },
    /// Cancelled: before a re-arm, before the expiry handler, or alone (killed early). From
    /// `inet_twsk_deschedule_put`: killed early, and [`TimerOp::Ended`] follows.
    Cancelled,
    /// The timer fired: the 2MSL (or FIN_WAIT2) timeout expired.
    Expired,
    /// The timewait socket left the kernel's tables (`inet_twsk_kill`): killed early if a
    /// [`TimerOp::Cancelled`] came first, else expired.
    Ended,
}

/// An event of a timewait socket's timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The timewait socket's kernel address (reused from a slab: key it with the 4-tuple).
    pub tw: u64,
    /// What happened.
    pub op: TimerOp,
    /// On a cancel or expiry: the socket's substate at that moment (None: not said, as in
    /// recordings made before tcptrace read it).
    pub substate_at_end: Option<State>,
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A timewait socket's timer.
    Timer(TimerEvent),
    /// A state transition.
    Transition(Transition),
    /// A reset.
    Reset(Reset),
    /// A connection's end, with its whole life (assembled by the analysis's pipeline from
    /// the record's two slots).
    Connection(Connection),
    /// What the kernel's counters said of a connection at its end: comes right before the
    /// end's own event (its transition into CLOSE, or its connection record).
    Details(Details),
    /// One slot of a connection record, on its own: what [`decode`] makes of each (the
    /// pipeline joins them into an [`Event::Connection`]; views never see these).
    Part(Part),
    /// Events the kernel could not deliver (ring buffer full) since the previous report.
    Lost {
        /// CLOCK_MONOTONIC nanoseconds when the loss was noticed.
        ts_ns: u64,
        /// How many.
        count: u64,
    },
}

impl Event {
    /// CLOCK_MONOTONIC nanoseconds.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Transition(t) => t.ts_ns,
            Event::Reset(r) => r.ts_ns,
            Event::Timer(t) => t.ts_ns,
            Event::Lost { ts_ns, .. } => *ts_ns,
            Event::Connection(c) => c.end.ts_ns,
            Event::Details(d) => d.ts_ns,
            Event::Part(Part::Head(t, _)) => t.ts_ns,
            Event::Part(Part::Tail(_)) => 0,
        }
    }
}

/// One connection's whole life, from its connection record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The transition that ended it, with its endpoints, owner, namespace and cgroup.
    pub end: Transition,
    /// Its evidence, the time it spent in each state, its birth.
    pub tail: ConnectionTail,
    /// For an entry into TIME_WAIT, the timewait socket the kernel armed for it (its
    /// address), when the kernel named it (None: recordings made before it did, kernels
    /// without the BTF programs, or none armed).
    pub tw: Option<u64>,
}

/// A slot of a connection record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The first: the end transition, and the timewait socket named (see
    /// [`Connection::tw`]).
    Head(Transition, Option<u64>),
    /// The second.
    Tail(ConnectionTail),
}

impl Connection {
    /// The socket's evidence.
    pub fn evidence(&self) -> Evidence {
        Evidence(self.tail.evidence)
    }

    /// When the socket was born, if that was seen.
    pub fn born_ns(&self) -> Option<u64> {
        (self.tail.born_ns != 0).then_some(self.tail.born_ns)
    }

    /// Bit `1 << state` for every state the socket was seen in, as the analysis's classified
    /// close has it.
    pub fn states(&self) -> u16 {
        let mut bits = 0u16;
        self.transitions(|t| bits |= 1 << t.from as u16 | 1 << t.to as u16);
        bits
    }

    /// Its transitions, rebuilt from the record (see [`tcptrace_common::connection::path`]),
    /// each with the time spent in the state it left when known: what a view that counts
    /// transitions or times states needs.
    pub fn transitions(&self, mut each: impl FnMut(&Transition)) {
        let end = &self.end;
        let raw_to = if end.to == State::TimeWait {
            State::Close as u8
        } else {
            end.to as u8
        };
        tcptrace_common::connection::path(
            self.tail.first_from,
            self.tail.entered,
            end.from as u8,
            raw_to,
            |from, to| {
                let (Some(from), Some(_)) = (State::from_kernel(from), State::from_kernel(to))
                else {
                    return;
                };
                if from == end.from {
                    each(end);
                    return;
                }
                let to = State::from_kernel(to).unwrap_or(State::Close);
                let in_from_ns = self
                    .tail
                    .in_state_ns
                    .get(from as usize - 1)
                    .copied()
                    .filter(|d| *d != 0);
                each(&Transition {
                    from,
                    to,
                    in_from_ns,
                    ..*end
                });
            },
        );
    }
}

/// Why a raw record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown TCP state {0}")]
    State(u8),
}

/// Builds the raw record for a lost-events notice.
pub fn raw_lost(ts_ns: u64, count: u64) -> RawEvent {
    RawEvent {
        ts_ns,
        aux: count,
        kind: kind::LOST,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// Decodes one raw record.
pub fn decode(raw: &RawEvent) -> Result<Event, DecodeError> {
    match raw.kind {
        kind::TW_CANCELLED => decode_timer(raw, TimerOp::Cancelled),
        kind::TW_EXPIRED => decode_timer(raw, TimerOp::Expired),
        kind::TW_ENDED => decode_timer(raw, TimerOp::Ended),
        kind::CONNECTION_TAIL => decode_tail(raw),
        kind::DETAILS => Ok(Event::Details(bytemuck::cast(*raw))),
        kind::LOST => Ok(Event::Lost {
            ts_ns: raw.ts_ns,
            count: raw.aux,
        }),
        kind::TW_ARMED => decode_armed(raw),
        kind::RESET_SENT => decode_reset(raw, Direction::Sent),
        kind::RESET_RECEIVED => decode_reset(raw, Direction::Received),
        kind::TRANSITION | kind::CONNECTION => decode_transition(raw),
        k => Err(DecodeError::Kind(k)),
    }
}

/// A timewait socket's timer event, with the substate it ended in when the kernel said.
fn decode_timer(raw: &RawEvent, op: TimerOp) -> Result<Event, DecodeError> {
    let substate_at_end = if raw.flags & flag::SUBSTATE_AT_END != 0 {
        Some(State::from_kernel(raw.oldstate).ok_or(DecodeError::State(raw.oldstate))?)
    } else {
        None
    };
    Ok(Event::Timer(TimerEvent {
        ts_ns: raw.ts_ns,
        tw: raw.skaddr,
        op,
        substate_at_end,
    }))
}

/// The record's local and remote endpoints, checked for a known address family.
fn endpoints(raw: &RawEvent) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let (laddr, raddr) = match raw.family {
        AF_INET => (v4(&raw.saddr), v4(&raw.daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(raw.saddr)),
            IpAddr::V6(Ipv6Addr::from(raw.daddr)),
        ),
        f => return Err(DecodeError::Family(f)),
    };
    Ok((
        SocketAddr::new(laddr, raw.sport),
        SocketAddr::new(raddr, raw.dport),
    ))
}

/// The process the record names as its socket's owner, when the kernel knew it.
fn owner(raw: &RawEvent) -> Option<Owner> {
    (raw.flags & flag::OWNER_KNOWN != 0).then_some(Owner {
        pid: raw.pid,
        comm: Comm(raw.comm),
        from_listener: raw.flags & flag::OWNER_FROM_LISTENER != 0,
    })
}

/// A timewait socket's timer armed: its substate, timeout and endpoints.
fn decode_armed(raw: &RawEvent) -> Result<Event, DecodeError> {
    let (local, remote) = endpoints(raw)?;
    let netns = (raw.netns != 0).then_some(raw.netns);
    let substate = State::from_kernel(raw.oldstate).ok_or(DecodeError::State(raw.oldstate))?;
    decode_timer(
        raw,
        TimerOp::Armed {
            substate,
            timeout_jiffies: raw.aux,
            local,
            remote,
            netns,
            rearm: raw.flags & flag::TW_REARM != 0,
        },
    )
}

/// A reset sent or received, with the state of its socket if it had one.
fn decode_reset(raw: &RawEvent, direction: Direction) -> Result<Event, DecodeError> {
    let (local, remote) = endpoints(raw)?;
    let state = match raw.oldstate {
        0 => None,
        s => Some(State::from_kernel(s).ok_or(DecodeError::State(s))?),
    };
    Ok(Event::Reset(Reset {
        ts_ns: raw.ts_ns,
        skaddr: (raw.skaddr != 0).then_some(raw.skaddr),
        local,
        remote,
        direction,
        state,
        reason: (direction == Direction::Sent && raw.aux != tcptrace_common::NO_REASON)
            .then_some(raw.aux as u32),
        owner: owner(raw),
        netns: (raw.netns != 0).then_some(raw.netns),
        cgroup: (raw.cgroup != 0).then_some(raw.cgroup),
    }))
}

/// A state transition, alone or as the first slot of a connection record.
fn decode_transition(raw: &RawEvent) -> Result<Event, DecodeError> {
    let (local, remote) = endpoints(raw)?;
    let from = State::from_kernel(raw.oldstate).ok_or(DecodeError::State(raw.oldstate))?;
    State::from_kernel(raw.newstate).ok_or(DecodeError::State(raw.newstate))?;
    let to = State::from_kernel(common::effective_new_state(
        raw.oldstate,
        raw.newstate,
        raw.flags,
    ))
    .ok_or(DecodeError::State(raw.newstate))?;
    let t = Transition {
        ts_ns: raw.ts_ns,
        skaddr: raw.skaddr,
        local,
        remote,
        from,
        to,
        in_from_ns: (raw.flags & flag::DURATION_KNOWN != 0).then_some(raw.in_from_ns),
        owner: owner(raw),
        mptcp: raw.flags & flag::MPTCP != 0,
        netns: (raw.netns != 0).then_some(raw.netns),
        cgroup: (raw.cgroup != 0).then_some(raw.cgroup),
    };
    Ok(if raw.kind == kind::CONNECTION {
        Event::Part(Part::Head(t, (raw.aux != 0).then_some(raw.aux)))
    } else {
        Event::Transition(t)
    })
}

/// The second slot of a connection record, checked.
fn decode_tail(raw: &RawEvent) -> Result<Event, DecodeError> {
    let tail: ConnectionTail = bytemuck::cast(*raw);
    if tail.first_from != 0 {
        State::from_kernel(tail.first_from).ok_or(DecodeError::State(tail.first_from))?;
    }
    Ok(Event::Part(Part::Tail(tail)))
}

/// Encodes a connection's details slot (for tests and fakes).
pub fn encode_details(d: &Details) -> RawEvent {
    bytemuck::cast(Details {
        kind: kind::DETAILS,
        ..*d
    })
}

/// Encodes a connection record's two slots (for tests and fakes).
pub fn encode_connection(c: &Connection) -> [RawEvent; 2] {
    let (end, tail) = (&c.end, &c.tail);
    let mut head = encode(end);
    head.kind = kind::CONNECTION;
    head.aux = c.tw.unwrap_or(0);
    [head, bytemuck::cast(*tail)]
}

/// An IPv4 address from the tracepoint's 16-byte field: the kernel stores it v4-mapped
/// (`::ffff:a.b.c.d`); a bare 4-byte form in the first bytes is accepted too.
fn v4(b: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*b);
    match v6.to_ipv4_mapped() {
        Some(a) => IpAddr::V4(a),
        None => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
    }
}

fn raw_addr(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Sets the endpoint fields (addresses, ports, family) of a raw record.
fn set_endpoints(raw: &mut RawEvent, local: SocketAddr, remote: SocketAddr) {
    raw.saddr = raw_addr(local.ip());
    raw.daddr = raw_addr(remote.ip());
    raw.sport = local.port();
    raw.dport = remote.port();
    raw.family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
}

fn raw_owner(owner: Option<Owner>) -> ([u8; 16], u32, u8) {
    match owner {
        Some(o) => (
            o.comm.0,
            o.pid,
            flag::OWNER_KNOWN
                | if o.from_listener {
                    flag::OWNER_FROM_LISTENER
                } else {
                    0
                },
        ),
        None => ([0; 16], 0, 0),
    }
}

/// Encodes a timer event back into the raw form (for tests and synthetic workloads).
pub fn encode_timer(t: &TimerEvent) -> RawEvent {
    let mut raw: RawEvent = bytemuck::Zeroable::zeroed();
    raw.ts_ns = t.ts_ns;
    raw.skaddr = t.tw;
    raw.oldstate = State::TimeWait as u8;
    raw.newstate = State::TimeWait as u8;
    match t.op {
        TimerOp::Armed {
            substate,
            timeout_jiffies,
            local,
            remote,
            netns,
            rearm,
        } => {
            raw.kind = kind::TW_ARMED;
            raw.oldstate = substate as u8;
            raw.aux = timeout_jiffies;
            raw.netns = netns.unwrap_or(0);
            if rearm {
                raw.flags |= flag::TW_REARM;
            }
            set_endpoints(&mut raw, local, remote);
        }
        TimerOp::Cancelled => raw.kind = kind::TW_CANCELLED,
        TimerOp::Expired => raw.kind = kind::TW_EXPIRED,
        TimerOp::Ended => raw.kind = kind::TW_ENDED,
    }
    if let (Some(s), TimerOp::Cancelled | TimerOp::Expired | TimerOp::Ended) =
        (t.substate_at_end, t.op)
    {
        raw.oldstate = s as u8;
        raw.flags |= flag::SUBSTATE_AT_END;
    }
    raw
}

/// Encodes a reset back into the raw form (for tests and synthetic workloads).
pub fn encode_reset(r: &Reset) -> RawEvent {
    let (comm, pid, flags) = raw_owner(r.owner);
    let mut raw = RawEvent {
        ts_ns: r.ts_ns,
        skaddr: r.skaddr.unwrap_or(0),
        aux: r.reason.map_or(tcptrace_common::NO_REASON, u64::from),
        comm,
        pid,
        kind: match r.direction {
            Direction::Sent => kind::RESET_SENT,
            Direction::Received => kind::RESET_RECEIVED,
        },
        oldstate: r.state.map_or(0, |s| s as u8),
        newstate: r.state.map_or(0, |s| s as u8),
        flags,
        netns: r.netns.unwrap_or(0),
        cgroup: r.cgroup.unwrap_or(0),
        ..bytemuck::Zeroable::zeroed()
    };
    set_endpoints(&mut raw, r.local, r.remote);
    raw
}

/// Encodes a transition back into the raw form (for tests and synthetic workloads).
pub fn encode(t: &Transition) -> RawEvent {
    let kernel_to = if t.to == State::TimeWait && matches!(t.from, State::FinWait2 | State::Closing)
    {
        State::Close
    } else {
        t.to
    };
    let (comm, pid, mut flags) = raw_owner(t.owner);
    if t.to == State::Close && matches!(t.from, State::FinWait2 | State::Closing) {
        // Only a reset makes these two end without TIME_WAIT.
        flags |= flag::RESET_RECEIVED;
    }
    if t.in_from_ns.is_some() {
        flags |= flag::DURATION_KNOWN;
    }
    if t.mptcp {
        flags |= flag::MPTCP;
    }
    let mut raw = RawEvent {
        ts_ns: t.ts_ns,
        skaddr: t.skaddr,
        in_from_ns: t.in_from_ns.unwrap_or(0),
        comm,
        pid,
        kind: kind::TRANSITION,
        oldstate: t.from as u8,
        newstate: kernel_to as u8,
        flags,
        netns: t.netns.unwrap_or(0),
        cgroup: t.cgroup.unwrap_or(0),
        ..bytemuck::Zeroable::zeroed()
    };
    set_endpoints(&mut raw, t.local, t.remote);
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip_and_suggest() {
        for st in State::ALL {
            assert_eq!(parse_state(st.name()).unwrap(), st);
            assert_eq!(State::from_kernel(st as u8), Some(st));
        }
        assert_eq!(parse_state("time-wait").unwrap(), State::TimeWait);
        assert_eq!(parse_state("TCP_CLOSE_WAIT").unwrap(), State::CloseWait);
        assert_eq!(parse_state("closed").unwrap(), State::Close);
        let err = parse_state("TIME_WIAT").unwrap_err();
        assert_eq!(err.suggestion, Some("TIME_WAIT"));
        assert!(err.to_string().contains("did you mean TIME_WAIT?"));
        assert_eq!(State::from_kernel(0), None);
        assert_eq!(State::from_kernel(13), None);
    }

    #[test]
    fn fin_wait2_to_close_is_an_entry_into_time_wait() {
        let t = Transition {
            ts_ns: 5,
            skaddr: 0xffff_0000_1234,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
            from: State::FinWait2,
            to: State::TimeWait,
            in_from_ns: Some(7),
            owner: None,
            mptcp: false,
            netns: Some(4026531840),
            cgroup: Some(1234),
        };
        let raw = encode(&t);
        assert_eq!(raw.newstate, tcptrace_common::state::CLOSE);
        assert_eq!((raw.netns, raw.cgroup), (4026531840, 1234));
        assert_eq!(decode(&raw).unwrap(), Event::Transition(t));
    }

    #[test]
    fn namespaces_and_cgroups_round_trip_and_zero_is_unknown() {
        let local: SocketAddr = "[fd00::1]:443".parse().unwrap();
        let remote: SocketAddr = "[fd00::2]:50000".parse().unwrap();
        for (netns, cgroup) in [(None, None), (Some(4026532001), None), (Some(7), Some(99))] {
            let r = Reset {
                ts_ns: 1,
                skaddr: Some(2),
                local,
                remote,
                direction: Direction::Received,
                state: None,
                reason: None,
                owner: None,
                netns,
                cgroup,
            };
            assert_eq!(decode(&encode_reset(&r)).unwrap(), Event::Reset(r));
            let timer = TimerEvent {
                ts_ns: 3,
                tw: 4,
                substate_at_end: None,
                op: TimerOp::Armed {
                    substate: State::TimeWait,
                    timeout_jiffies: 15000,
                    local,
                    remote,
                    netns,
                    rearm: false,
                },
            };
            assert_eq!(decode(&encode_timer(&timer)).unwrap(), Event::Timer(timer));
            for op in [TimerOp::Cancelled, TimerOp::Expired] {
                for substate_at_end in [None, Some(State::FinWait2), Some(State::TimeWait)] {
                    let end = TimerEvent {
                        ts_ns: 5,
                        tw: 4,
                        op,
                        substate_at_end,
                    };
                    assert_eq!(decode(&encode_timer(&end)).unwrap(), Event::Timer(end));
                }
            }
        }
        // A record from a kernel that could not read them (or a format-1 recording).
        let mut raw = encode_reset(&Reset {
            ts_ns: 1,
            skaddr: None,
            local,
            remote,
            direction: Direction::Sent,
            state: None,
            reason: Some(2),
            owner: None,
            netns: None,
            cgroup: None,
        });
        assert_eq!((raw.netns, raw.cgroup), (0, 0));
        raw.netns = 0;
        let Ok(Event::Reset(r)) = decode(&raw) else {
            panic!("a reset")
        };
        assert_eq!((r.netns, r.cgroup), (None, None));
    }

    #[test]
    fn timewait_records_of_every_version_decode_and_the_new_ones_round_trip() {
        let (local, remote): (SocketAddr, SocketAddr) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        // An arming as the timer programs (and every recording before the timewait
        // functions' programs) write it: no re-arm bit, so no re-arm said.
        let mut raw: RawEvent = bytemuck::Zeroable::zeroed();
        (raw.ts_ns, raw.skaddr, raw.aux) = (5, 0xffff_0001, 15_000);
        (raw.kind, raw.oldstate, raw.newstate) = (kind::TW_ARMED, 5, 6);
        set_endpoints(&mut raw, local, remote);
        let armed = TimerOp::Armed {
            substate: State::FinWait2,
            timeout_jiffies: 15_000,
            local,
            remote,
            netns: None,
            rearm: false,
        };
        let timer = |ts_ns, op, substate_at_end| {
            Event::Timer(TimerEvent {
                ts_ns,
                tw: 0xffff_0001,
                op,
                substate_at_end,
            })
        };
        assert_eq!(decode(&raw).unwrap(), timer(5, armed, None));
        // The same from `__inet_twsk_schedule` with `rearm` set.
        raw.flags = flag::TW_REARM;
        let rearmed = TimerOp::Armed {
            substate: State::FinWait2,
            timeout_jiffies: 15_000,
            local,
            remote,
            netns: None,
            rearm: true,
        };
        assert_eq!(decode(&raw).unwrap(), timer(5, rearmed, None));
        // Cancels and expiries, with and without the substate at the end (older recordings).
        let mut end: RawEvent = bytemuck::Zeroable::zeroed();
        (end.ts_ns, end.skaddr, end.oldstate, end.newstate) = (9, 0xffff_0001, 6, 6);
        for (k, op) in [
            (kind::TW_CANCELLED, TimerOp::Cancelled),
            (kind::TW_EXPIRED, TimerOp::Expired),
        ] {
            end.kind = k;
            end.flags = 0;
            assert_eq!(decode(&end).unwrap(), timer(9, op, None));
            end.flags = flag::SUBSTATE_AT_END;
            assert_eq!(decode(&end).unwrap(), timer(9, op, Some(State::TimeWait)));
        }
        // `inet_twsk_kill`'s end, new.
        end.kind = kind::TW_ENDED;
        assert_eq!(
            decode(&end).unwrap(),
            timer(9, TimerOp::Ended, Some(State::TimeWait))
        );
        for op in [
            armed,
            rearmed,
            TimerOp::Cancelled,
            TimerOp::Expired,
            TimerOp::Ended,
        ] {
            for substate_at_end in [None, Some(State::FinWait2)] {
                let substate_at_end = match op {
                    TimerOp::Armed { .. } => None,
                    _ => substate_at_end,
                };
                let ev = TimerEvent {
                    ts_ns: 3,
                    tw: 4,
                    op,
                    substate_at_end,
                };
                assert_eq!(decode(&encode_timer(&ev)).unwrap(), Event::Timer(ev));
            }
        }
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        let mut raw = raw_lost(1, 2);
        assert_eq!(decode(&raw).unwrap(), Event::Lost { ts_ns: 1, count: 2 });
        raw.kind = 99;
        assert_eq!(decode(&raw), Err(DecodeError::Kind(99)));
        raw.kind = kind::TRANSITION;
        raw.family = 7;
        assert_eq!(decode(&raw), Err(DecodeError::Family(7)));
        raw.family = AF_INET;
        raw.oldstate = 1;
        raw.newstate = 0;
        assert_eq!(decode(&raw), Err(DecodeError::State(0)));
    }
}
