//! Per-connection lifecycles and who closed them.
//!
//! The [`Tracker`] follows each socket from its first seen transition to its end and then
//! classifies the close: who ended it first ([`Initiator`]), how ([`How`]), whether this side
//! holds TIME_WAIT, and which role it had. It is the one place that knows TCP's closing rules;
//! views only read its conclusions.
//!
//! Evidence, and what it proves:
//! - ESTABLISHED→FIN_WAIT1: this side sent the first FIN (`local`).
//! - ESTABLISHED→CLOSE_WAIT: the peer's FIN arrived first (`remote`).
//! - FIN_WAIT1→CLOSING: both FINs crossed (`simultaneous`).
//! - FIN_WAIT2→TIME_WAIT: this side closed first and holds TIME_WAIT; CLOSING→TIME_WAIT:
//!   simultaneous close, both sides hold it; LAST_ACK→CLOSE: the passive side's clean end.
//! - Any other →CLOSE is an abort. A reset received just before it (`tcp_receive_reset`
//!   precedes the transition) means the peer aborted (`rst_received`; `refused` from
//!   SYN_SENT); a reset this socket sent just after it (an application's abortive close logs
//!   the transition first) means this side did (`rst_sent`). No reset either way means the
//!   kernel gave up (`timeout`) — unless events were lost meanwhile, or the socket was
//!   already open when tracing began, in which case the answer is `unknown`.
//!
//! Memory is bounded: at most `cap` sockets are followed; beyond that the oldest-looking are
//! evicted and counted, and their closes are never reported with a wrong certainty.

use std::{collections::HashMap, net::SocketAddr};

use serde::Serialize;

use crate::event::{Direction, Event, Owner, Reset, State, Transition};

/// Who ended the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
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

/// Which end of the connection this socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
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
    pub fn name(self) -> &'static str {
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
    pub fn name(self) -> &'static str {
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
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// The end of one socket's life, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    /// When the socket ended (its →CLOSE or its entry into TIME_WAIT).
    pub ts_ns: u64,
    /// The socket's kernel address.
    pub skaddr: u64,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Who ended it first.
    pub initiator: Initiator,
    /// How.
    pub how: How,
    /// Whether this side went into TIME_WAIT.
    pub timewait: bool,
    /// Client or server.
    pub role: Role,
    /// From its birth (connect or accept) to its end; None when first seen mid-life.
    pub lifetime_ns: Option<u64>,
    /// The owning process, when known.
    pub owner: Option<Owner>,
    /// First seen mid-life (tracing started after it opened, or it was evicted).
    pub midlife: bool,
    /// Bit `1 << state` for every state the socket was seen in (TIME_WAIT included when it
    /// entered it).
    pub states: u16,
    /// The socket's network namespace inode, from the transition that ended it (None:
    /// unknown).
    pub netns: Option<u32>,
    /// The socket's cgroup2 id, from the transition that ended it (None: unknown).
    pub cgroup: Option<u64>,
}

impl Close {
    /// The port that names the service (see [`service_port`]).
    pub fn service_port(&self) -> u16 {
        service_port(self.role, self.local, self.remote)
    }
}

/// The port that names a connection's service: the listening (local) port of an accepted
/// socket, the remote port of a connecting one; for a socket of unknown role, the remote port
/// when only it is below the usual ephemeral range (32768), else the local port.
pub fn service_port(role: Role, local: SocketAddr, remote: SocketAddr) -> u16 {
    let (l, r) = (local.port(), remote.port());
    match role {
        Role::Server => l,
        Role::Client => r,
        Role::Unknown if r < 32768 && l >= 32768 => r,
        Role::Unknown => l,
    }
}

/// How long an abort waits for the reset that explains it (the application's abortive close
/// logs the transition first and its reset right after, on the same CPU).
const RESET_GRACE_NS: u64 = 50_000_000;
/// A connect cannot time out before the first SYN retransmission (RTO 1 s).
const MIN_CONNECT_TIMEOUT_NS: u64 = 1_000_000_000;

/// A hash map with a fast, per-process randomly seeded hasher (foldhash): the analysis
/// looks up every event, and SipHash was a tenth of the stream's CPU time; the seed keeps
/// crafted remote addresses from colliding on purpose.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What is known of one live socket, unpacked (see [`Slot`] for how it is stored).
#[derive(Clone, Copy, Debug)]
struct Life {
    born: bool,
    first_ts: u64,
    role: Role,
    first_fin: Option<Initiator>,
    simultaneous: bool,
    reset: Option<Direction>,
    /// Bit `1 << state` for every state it was seen in.
    states: u16,
}

impl Life {
    fn new(first_ts: u64, born: bool, role: Role) -> Life {
        Life {
            born,
            first_ts,
            role,
            first_fin: None,
            simultaneous: false,
            reset: None,
            states: 0,
        }
    }
}

/// A kernel socket address as a map key with 4-byte alignment, so that a map entry takes
/// 20 bytes instead of 24.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u32; 2]);

impl Key {
    fn new(skaddr: u64) -> Key {
        Key([skaddr as u32, (skaddr >> 32) as u32])
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(u64::from(self.0[1]) << 32 | u64::from(self.0[0]));
    }
}

/// A [`Life`] as stored: 12 bytes. Addresses and owners are not kept: every transition
/// carries them (the kernel remembers the owner), and the close is decided at a transition.
#[derive(Clone, Copy)]
struct Slot {
    first_ts: [u32; 2],
    states: u16,
    bits: u8,
}

const BORN: u8 = 1;
const SIMULTANEOUS: u8 = 1 << 1;
const ROLE_SHIFT: u8 = 2;
const FIN_SHIFT: u8 = 4;
const RESET_SHIFT: u8 = 6;

impl Slot {
    fn pack(l: &Life) -> Slot {
        let role = match l.role {
            Role::Unknown => 0,
            Role::Client => 1,
            Role::Server => 2,
        };
        let fin = match l.first_fin {
            None | Some(Initiator::Unknown) => 0,
            Some(Initiator::Local) => 1,
            Some(Initiator::Remote) => 2,
            Some(Initiator::Simultaneous) => 3,
        };
        let reset = match l.reset {
            None => 0,
            Some(Direction::Sent) => 1,
            Some(Direction::Received) => 2,
        };
        Slot {
            first_ts: [l.first_ts as u32, (l.first_ts >> 32) as u32],
            states: l.states,
            bits: (u8::from(l.born) * BORN)
                | (u8::from(l.simultaneous) * SIMULTANEOUS)
                | (role << ROLE_SHIFT)
                | (fin << FIN_SHIFT)
                | (reset << RESET_SHIFT),
        }
    }

    fn first_ts(&self) -> u64 {
        u64::from(self.first_ts[1]) << 32 | u64::from(self.first_ts[0])
    }

    fn role(&self) -> Role {
        match self.bits >> ROLE_SHIFT & 3 {
            1 => Role::Client,
            2 => Role::Server,
            _ => Role::Unknown,
        }
    }

    fn unpack(&self) -> Life {
        Life {
            born: self.bits & BORN != 0,
            first_ts: self.first_ts(),
            role: self.role(),
            first_fin: match self.bits >> FIN_SHIFT & 3 {
                1 => Some(Initiator::Local),
                2 => Some(Initiator::Remote),
                3 => Some(Initiator::Simultaneous),
                _ => None,
            },
            simultaneous: self.bits & SIMULTANEOUS != 0,
            reset: match self.bits >> RESET_SHIFT & 3 {
                1 => Some(Direction::Sent),
                2 => Some(Direction::Received),
                _ => None,
            },
            states: self.states,
        }
    }
}

/// The followed sockets, split into shards so that growing the table never holds two
/// copies of all of it at once (a `HashMap` doubles by copying: at 1M sockets that would be
/// a transient 3× peak).
struct Live {
    shards: Vec<FastMap<Key, Slot>>,
    len: usize,
}

const SHARDS: usize = 64;

impl Live {
    fn new() -> Live {
        Live {
            shards: (0..SHARDS).map(|_| FastMap::default()).collect(),
            len: 0,
        }
    }

    fn index(k: u64) -> usize {
        // Fibonacci hashing: the top bits depend on every bit of the address.
        (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
    }

    fn shard(&mut self, k: u64) -> &mut FastMap<Key, Slot> {
        &mut self.shards[Live::index(k)]
    }

    fn get(&self, k: u64) -> Option<Life> {
        self.shards[Live::index(k)]
            .get(&Key::new(k))
            .map(Slot::unpack)
    }

    fn contains(&self, k: u64) -> bool {
        self.shards[Live::index(k)].contains_key(&Key::new(k))
    }

    fn put(&mut self, k: u64, l: &Life) {
        if self.shard(k).insert(Key::new(k), Slot::pack(l)).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, k: u64) -> Option<Life> {
        let l = self.shard(k).remove(&Key::new(k)).map(|s| s.unpack());
        if l.is_some() {
            self.len -= 1;
        }
        l
    }

    /// Drops about `want` of the sockets seen first; returns how many went. One pass over
    /// the table for `want` sockets keeps eviction O(1) amortised when `want` is a fixed
    /// fraction of the table.
    fn evict_oldest(&mut self, want: usize) -> usize {
        if self.len == 0 {
            return 0;
        }
        // A sample spread over the shards (a hash table's order is random) estimates the
        // first-seen time below which `want` sockets lie.
        const PER_SHARD: usize = 16;
        let sample = self
            .shards
            .iter()
            .flat_map(|s| s.values().take(PER_SHARD).map(Slot::first_ts))
            .collect();
        let threshold = eviction_threshold(sample, want, self.len);
        let mut gone = 0;
        for s in &mut self.shards {
            s.retain(|_, l| {
                let keep = l.first_ts() > threshold;
                gone += usize::from(!keep);
                keep
            });
        }
        self.len -= gone;
        gone
    }
}

/// From `sample` (times of a random sample of `len` items), the time at or below which
/// about `want` of them lie: evicting those drops the oldest `want`, give or take the sample's
/// error (small tables are sampled whole, so exactly).
pub(crate) fn eviction_threshold(mut sample: Vec<u64>, want: usize, len: usize) -> u64 {
    if sample.is_empty() {
        return 0;
    }
    sample.sort_unstable();
    let idx = (want * sample.len() / len.max(1)).saturating_sub(1);
    sample[idx.min(sample.len() - 1)]
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Live({} sockets)", self.len)
    }
}

/// An abortive close waiting (briefly) for its reset.
#[derive(Clone, Copy, Debug)]
struct Pending {
    close: Close,
    from: State,
    in_from_ns: Option<u64>,
    gap: bool,
}

/// At most this many crossed closes wait for their peer's close (a simultaneous close is
/// rare; the bound only matters if the peer is never traced).
const CROSSED_CAP: usize = 4096;

/// Follows sockets and classifies their closes.
#[derive(Debug)]
pub struct Tracker {
    live: Live,
    pending: Vec<Pending>,
    /// Endpoints (local, remote) of peers that must be told, when they close, that both
    /// FINs crossed; with the time of the crossing.
    crossed: FastMap<(SocketAddr, SocketAddr), u64>,
    cap: usize,
    evicted: u64,
    clock: u64,
    /// The last time events were lost: missing evidence of a socket seen before proves
    /// nothing.
    last_loss: Option<u64>,
}

/// The default number of sockets followed at once.
pub const DEFAULT_CAP: usize = 1 << 20;

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(DEFAULT_CAP)
    }
}

impl Tracker {
    /// Follows at most `cap` sockets at once.
    pub fn new(cap: usize) -> Self {
        Tracker {
            live: Live::new(),
            pending: Vec::new(),
            crossed: FastMap::default(),
            cap: cap.max(1),
            evicted: 0,
            clock: 0,
            last_loss: None,
        }
    }

    /// Sockets evicted because the cap was reached.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Sockets followed now.
    pub fn tracked(&self) -> usize {
        self.live.len
    }

    /// The most sockets followed at once.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The role of a socket followed now.
    pub fn role(&self, skaddr: u64) -> Option<Role> {
        self.live.get(skaddr).map(|l| l.role)
    }

    fn gap(&self, l: &Life) -> bool {
        self.last_loss.is_some_and(|t| l.first_ts <= t)
    }

    /// Feeds one event; appends the closes it completes to `out`.
    pub fn observe(&mut self, ev: &Event, out: &mut Vec<Close>) {
        self.clock = self.clock.max(ev.ts_ns());
        match ev {
            Event::Transition(t) => self.transition(t, out),
            Event::Reset(r) => self.reset(r, out),
            Event::Timer(_) => {}
            Event::Lost { .. } => {
                self.last_loss = Some(self.clock);
                for p in &mut self.pending {
                    p.gap = true;
                }
            }
        }
        self.expire(self.clock, out);
    }

    /// Resolves aborts whose grace period ended before `now_ns` (CLOCK_MONOTONIC).
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Close>) {
        if self.pending.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() {
            if now_ns.saturating_sub(self.pending[i].close.ts_ns) > RESET_GRACE_NS {
                let p = self.pending.remove(i);
                out.push(no_reset(p));
            } else {
                i += 1;
            }
        }
    }

    /// Resolves every waiting abort (at the end of a run).
    pub fn flush(&mut self, out: &mut Vec<Close>) {
        for p in self.pending.drain(..) {
            out.push(no_reset(p));
        }
    }

    /// Makes room for one more socket.
    fn make_room(&mut self, skaddr: u64) {
        if self.live.len >= self.cap && !self.live.contains(skaddr) {
            // A sixteenth at a time: each pass over the table pays for that many inserts.
            let gone = self.live.evict_oldest((self.cap / 16).max(1));
            self.evicted += gone as u64;
        }
    }

    fn transition(&mut self, t: &Transition, out: &mut Vec<Close>) {
        // Listening sockets are not connections.
        if t.to == State::Listen || t.from == State::Listen && t.to == State::Close {
            return;
        }
        self.make_room(t.skaddr);
        let (born, role) = match (t.from, t.to) {
            (State::Close, State::SynSent) => (true, Role::Client),
            (State::Listen, State::SynRecv) | (State::Close, State::SynRecv) => {
                (true, Role::Server)
            }
            _ => (false, Role::Unknown),
        };
        let mut life = match self.live.get(t.skaddr) {
            // A birth at an address already followed: the slab gave an earlier socket's
            // memory to a new one, and that socket's end was never seen (skipped by the
            // kernel, or filtered). Carrying its life over would give the new socket the old
            // one's role and evidence.
            Some(_) if born => {
                self.evicted += 1;
                Life::new(t.ts_ns, born, role)
            }
            Some(life) => life,
            None => Life::new(t.ts_ns, born, role),
        };
        life.states |= 1 << t.from as u16 | 1 << t.to as u16;
        match (t.from, t.to) {
            (State::Established | State::SynRecv, State::FinWait1) => {
                life.first_fin.get_or_insert(Initiator::Local);
            }
            (State::Established | State::SynRecv, State::CloseWait) => {
                life.first_fin.get_or_insert(Initiator::Remote);
            }
            (State::FinWait1, State::Closing) => {
                life.simultaneous = true;
                // Both FINs were sent before either arrived: a simultaneous close for the
                // peer too, even if its own view differs (our FIN was lost and retransmitted
                // after its FIN was acknowledged). When the peer is traced here as well
                // (loopback, containers), tell it when it closes, so both records agree.
                if self.crossed.len() >= CROSSED_CAP {
                    let horizon = self.clock.saturating_sub(120_000_000_000);
                    self.crossed.retain(|_, ts| *ts > horizon);
                    if self.crossed.len() >= CROSSED_CAP {
                        self.crossed.clear();
                    }
                }
                self.crossed.insert((t.remote, t.local), t.ts_ns);
            }
            _ => {}
        }
        if t.to != State::Close && t.to != State::TimeWait {
            self.live.put(t.skaddr, &life);
            return;
        }
        self.live.remove(t.skaddr);
        if let Some(ts) = self.crossed.remove(&(t.local, t.remote))
            && life.first_ts <= ts
        {
            life.simultaneous = true;
        }
        let mut close = Close {
            ts_ns: t.ts_ns,
            skaddr: t.skaddr,
            local: t.local,
            remote: t.remote,
            initiator: Initiator::Unknown,
            how: How::Unknown,
            timewait: t.to == State::TimeWait,
            role: life.role,
            lifetime_ns: life.born.then(|| t.ts_ns.saturating_sub(life.first_ts)),
            owner: t.owner,
            midlife: !life.born,
            states: life.states,
            netns: t.netns,
            cgroup: t.cgroup,
        };
        let first = life.first_fin;
        match (t.from, t.to) {
            (State::FinWait2, State::TimeWait) => {
                // Our FIN was acknowledged before the peer's arrived: we closed first.
                close.initiator = Initiator::Local;
                close.how = How::Fin;
            }
            (State::Closing, State::TimeWait) => {
                close.initiator = Initiator::Simultaneous;
                close.how = How::Fin;
            }
            (_, State::TimeWait) => {
                // Not a path the kernel takes into TIME_WAIT: claim nothing more.
                close.initiator = first.unwrap_or(Initiator::Unknown);
            }
            (State::LastAck, State::Close) => {
                // LAST_ACK comes from CLOSE_WAIT: the peer's FIN came first.
                close.initiator = first.unwrap_or(Initiator::Remote);
                close.how = if life.reset == Some(Direction::Received) {
                    How::RstReceived
                } else {
                    How::Fin
                };
            }
            (from, _) => {
                // An abort: a reset explains it, in either order.
                match life.reset {
                    // A reset in answer to our SYN: the peer refused, whatever else was seen.
                    Some(Direction::Received) if from == State::SynSent => {
                        close.initiator = Initiator::Remote;
                        close.how = How::Refused;
                    }
                    Some(Direction::Received) => {
                        close.initiator = first.unwrap_or(Initiator::Remote);
                        close.how = How::RstReceived;
                    }
                    Some(Direction::Sent) => {
                        close.initiator = first.unwrap_or(Initiator::Local);
                        close.how = How::RstSent;
                    }
                    None => {
                        close.initiator = first.map_or(Initiator::Unknown, |f| {
                            if life.simultaneous {
                                Initiator::Simultaneous
                            } else {
                                f
                            }
                        });
                        let gap = self.gap(&life) || close.midlife;
                        self.pending.push(Pending {
                            close,
                            from,
                            in_from_ns: t.in_from_ns,
                            gap,
                        });
                        return;
                    }
                }
            }
        }
        if life.simultaneous && close.how == How::Fin {
            close.initiator = Initiator::Simultaneous;
        }
        out.push(close);
    }

    fn reset(&mut self, r: &Reset, out: &mut Vec<Close>) {
        let Some(sk) = r.skaddr else {
            return;
        };
        if r.direction == Direction::Sent
            && let Some(i) = self.pending.iter().position(|p| p.close.skaddr == sk)
        {
            let mut p = self.pending.remove(i).close;
            if p.initiator == Initiator::Unknown {
                p.initiator = Initiator::Local;
            }
            p.how = How::RstSent;
            out.push(p);
            return;
        }
        if let Some(mut life) = self.live.get(sk) {
            // The first reset decides: an answer to the peer's reset is not an abort.
            life.reset.get_or_insert(r.direction);
            self.live.put(sk, &life);
        } else if r.direction == Direction::Received {
            // A socket first met through the reset that is about to end it.
            self.make_room(sk);
            let mut life = Life::new(r.ts_ns, false, Role::Unknown);
            life.reset = Some(Direction::Received);
            self.live.put(sk, &life);
        }
        let _ = out;
    }
}

/// An abort for which no reset came: a timeout, if the evidence is complete.
fn no_reset(p: Pending) -> Close {
    let mut c = p.close;
    if p.gap {
        return c;
    }
    c.how = match p.from {
        // Closing an unconnected socket looks the same as a connect that timed out; only
        // the time spent trying tells them apart.
        State::SynSent if p.in_from_ns.is_some_and(|d| d >= MIN_CONNECT_TIMEOUT_NS) => How::Timeout,
        State::SynSent => How::Unknown,
        _ => How::Timeout,
    };
    c
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::Comm;

    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";

    struct Script {
        ts: u64,
        events: Vec<Event>,
    }

    impl Script {
        fn new() -> Self {
            Script {
                ts: 1_000,
                events: Vec::new(),
            }
        }
        fn t(&mut self, sk: u64, local: &str, remote: &str, from: State, to: State) -> &mut Self {
            self.ts += 1_000;
            self.events.push(Event::Transition(Transition {
                ts_ns: self.ts,
                skaddr: sk,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                from,
                to,
                in_from_ns: Some(1_000),
                owner: Some(Owner {
                    pid: sk as u32,
                    comm: Comm([b'x'; 16]),
                    from_listener: false,
                }),
                mptcp: false,
                // Each socket in a namespace and cgroup of its own.
                netns: Some(4_026_531_840 + sk as u32),
                cgroup: Some(100 + sk),
            }));
            self
        }
        fn rst(&mut self, sk: Option<u64>, local: &str, remote: &str, d: Direction) -> &mut Self {
            self.ts += 1_000;
            self.events.push(Event::Reset(Reset {
                ts_ns: self.ts,
                skaddr: sk,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                direction: d,
                state: None,
                reason: None,
                owner: None,
                netns: None,
                cgroup: None,
            }));
            self
        }
        fn lost(&mut self) -> &mut Self {
            self.ts += 1_000;
            self.events.push(Event::Lost {
                ts_ns: self.ts,
                count: 1,
            });
            self
        }
        fn run(&self) -> Vec<super::Close> {
            let mut tr = Tracker::default();
            let mut out = Vec::new();
            for e in &self.events {
                tr.observe(e, &mut out);
            }
            tr.flush(&mut out);
            out.sort_by_key(|c| c.skaddr);
            out
        }
    }

    use State::*;

    fn summary(c: &super::Close) -> (u64, Initiator, How, bool, Role) {
        (c.skaddr, c.initiator, c.how, c.timewait, c.role)
    }

    /// The client (socket 1) closes first; the server side (2) closes passively.
    fn client_closes(s: &mut Script) {
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(2, S, C, Listen, SynRecv)
            .t(1, C, S, SynSent, Established)
            .t(2, S, C, SynRecv, Established)
            .t(1, C, S, Established, FinWait1)
            .t(2, S, C, Established, CloseWait)
            .t(1, C, S, FinWait1, FinWait2)
            .t(2, S, C, CloseWait, LastAck)
            .t(1, C, S, FinWait2, TimeWait)
            .t(2, S, C, LastAck, Close);
    }

    #[test]
    fn client_closes_first_both_sides_agree() {
        let mut s = Script::new();
        client_closes(&mut s);
        let out = s.run();
        assert_eq!(
            out.iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Local, How::Fin, true, Role::Client),
                (2, Initiator::Remote, How::Fin, false, Role::Server)
            ]
        );
        assert_eq!(out[0].lifetime_ns, Some(8_000));
        assert_eq!(out[1].service_port(), 80);
        assert_eq!(out[0].service_port(), 80);
        assert_eq!(
            out[0].local.port(),
            40000,
            "the port learnt after connect()"
        );
    }

    #[test]
    fn a_close_carries_the_namespace_and_cgroup_of_the_transition_that_ends_it() {
        let mut s = Script::new();
        client_closes(&mut s);
        // An abort that waits for its reset, then resolves without one.
        s.t(3, "10.0.0.1:0", S, Close, SynSent)
            .t(3, C, S, SynSent, Established)
            .t(3, C, S, Established, Close);
        let out = s.run();
        assert_eq!(out.len(), 3);
        for c in out {
            assert_eq!(c.netns, Some(4_026_531_840 + c.skaddr as u32), "{c:?}");
            assert_eq!(c.cgroup, Some(100 + c.skaddr), "{c:?}");
        }
    }

    #[test]
    fn server_closes_first() {
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(2, S, C, Listen, SynRecv)
            .t(1, C, S, SynSent, Established)
            .t(2, S, C, SynRecv, Established)
            .t(2, S, C, Established, FinWait1)
            .t(1, C, S, Established, CloseWait)
            .t(2, S, C, FinWait1, FinWait2)
            .t(1, C, S, CloseWait, LastAck)
            .t(2, S, C, FinWait2, TimeWait)
            .t(1, C, S, LastAck, Close);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Remote, How::Fin, false, Role::Client),
                (2, Initiator::Local, How::Fin, true, Role::Server)
            ]
        );
    }

    #[test]
    fn simultaneous_close() {
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(2, S, C, Listen, SynRecv)
            .t(2, S, C, SynRecv, Established)
            .t(1, C, S, Established, FinWait1)
            .t(2, S, C, Established, FinWait1)
            .t(1, C, S, FinWait1, Closing)
            .t(2, S, C, FinWait1, Closing)
            .t(1, C, S, Closing, TimeWait)
            .t(2, S, C, Closing, TimeWait);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Simultaneous, How::Fin, true, Role::Client),
                (2, Initiator::Simultaneous, How::Fin, true, Role::Server)
            ]
        );
    }

    #[test]
    fn a_crossing_seen_by_one_side_is_simultaneous_for_both() {
        // The client's FIN was lost: the server saw its own FIN acknowledged first, the client
        // saw the FINs cross. Both FINs were sent before either arrived.
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(2, S, C, Listen, SynRecv)
            .t(2, S, C, SynRecv, Established)
            .t(2, S, C, Established, FinWait1)
            .t(1, C, S, Established, FinWait1)
            .t(1, C, S, FinWait1, Closing)
            .t(2, S, C, FinWait1, FinWait2)
            .t(2, S, C, FinWait2, TimeWait)
            .t(1, C, S, Closing, TimeWait);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Simultaneous, How::Fin, true, Role::Client),
                (2, Initiator::Simultaneous, How::Fin, true, Role::Server)
            ]
        );
    }

    #[test]
    fn abortive_close_by_the_application_then_its_reset() {
        // SO_LINGER 0: the transition is logged first, the reset right after; the peer's
        // receive_reset can even come before the sender's send_reset.
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(2, S, C, Listen, SynRecv)
            .t(2, S, C, SynRecv, Established)
            .t(1, C, S, Established, Close)
            .rst(Some(2), S, C, Direction::Received)
            .rst(Some(1), C, S, Direction::Sent)
            .t(2, S, C, Established, Close);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Local, How::RstSent, false, Role::Client),
                (2, Initiator::Remote, How::RstReceived, false, Role::Server)
            ]
        );
    }

    #[test]
    fn refused_connect() {
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .rst(None, S, C, Direction::Sent)
            .rst(Some(1), C, S, Direction::Received)
            .t(1, C, S, SynSent, Close);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [(1, Initiator::Remote, How::Refused, false, Role::Client)]
        );
    }

    #[test]
    fn a_refused_connect_is_the_peers_doing_even_amid_contradictions() {
        // Found by the property test: a reset, a FIN from this side, then SYN_SENT→CLOSE.
        let mut s = Script::new();
        s.rst(Some(3), C, S, Direction::Received)
            .t(3, C, S, Established, FinWait1)
            .t(3, C, S, SynSent, Close);
        let c = s.run()[0];
        assert_eq!((c.initiator, c.how), (Initiator::Remote, How::Refused));
    }

    #[test]
    fn no_reset_means_timeout_unless_evidence_is_missing() {
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(1, C, S, Established, Close);
        assert_eq!(s.run()[0].how, How::Timeout);

        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .lost()
            .t(1, C, S, Established, Close);
        assert_eq!(
            summary(&s.run()[0]),
            (1, Initiator::Unknown, How::Unknown, false, Role::Client)
        );

        // A socket first seen mid-life proves nothing by the absence of a reset.
        let mut s = Script::new();
        s.t(1, C, S, Established, Close);
        let c = s.run()[0];
        assert_eq!(
            summary(&c),
            (1, Initiator::Unknown, How::Unknown, false, Role::Unknown)
        );
        assert!(c.midlife);
        assert_eq!(c.lifetime_ns, None);

        // A quick SYN_SENT→CLOSE is an application giving up, not a handshake timeout.
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Close);
        assert_eq!(s.run()[0].how, How::Unknown);
    }

    #[test]
    fn midlife_sockets_keep_what_the_evidence_proves() {
        let mut s = Script::new();
        s.t(1, C, S, Established, FinWait1)
            .t(1, C, S, FinWait1, FinWait2)
            .t(1, C, S, FinWait2, TimeWait);
        s.t(2, S, C, CloseWait, LastAck).t(2, S, C, LastAck, Close);
        assert_eq!(
            s.run().iter().map(summary).collect::<Vec<_>>(),
            [
                (1, Initiator::Local, How::Fin, true, Role::Unknown),
                (2, Initiator::Remote, How::Fin, false, Role::Unknown)
            ]
        );
    }

    #[test]
    fn a_reset_in_fin_wait2_is_not_time_wait() {
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(1, C, S, Established, FinWait1)
            .t(1, C, S, FinWait1, FinWait2)
            .rst(Some(1), C, S, Direction::Received)
            .t(1, C, S, FinWait2, Close);
        assert_eq!(
            summary(&s.run()[0]),
            (1, Initiator::Local, How::RstReceived, false, Role::Client)
        );
    }

    #[test]
    fn the_cap_bounds_memory_and_counts_evictions() {
        let mut tr = Tracker::new(10);
        let mut out = Vec::new();
        let mut s = Script::new();
        for sk in 0..100 {
            s.t(sk, "10.0.0.1:0", S, Close, SynSent);
        }
        for e in &s.events {
            tr.observe(e, &mut out);
        }
        assert!(tr.tracked() <= 10, "{} tracked", tr.tracked());
        assert_eq!(tr.tracked() as u64 + tr.evicted(), 100);
        // The oldest go first: the newest socket is still followed.
        assert_eq!(tr.role(99), Some(Role::Client));
        assert_eq!(tr.role(0), None);
    }

    #[test]
    fn a_reused_address_starts_a_new_life() {
        // A client socket whose end the kernel skipped, then a server socket at the same
        // address: the second is a server, born then, not the client's continuation.
        let mut s = Script::new();
        s.t(1, "10.0.0.1:0", S, Close, SynSent)
            .t(1, C, S, SynSent, Established)
            .t(1, S, C, Listen, SynRecv)
            .t(1, S, C, SynRecv, Established)
            .t(1, S, C, Established, CloseWait)
            .t(1, S, C, CloseWait, LastAck)
            .t(1, S, C, LastAck, Close);
        let out = s.run();
        assert_eq!(
            out.iter().map(summary).collect::<Vec<_>>(),
            vec![(1, Initiator::Remote, How::Fin, false, Role::Server)]
        );
        assert!(!out[0].midlife);
        assert_eq!(out[0].lifetime_ns, Some(4_000));
    }

    #[test]
    fn a_followed_socket_costs_twenty_bytes_plus_the_tables_control_byte() {
        assert_eq!(std::mem::size_of::<(Key, Slot)>(), 20);
    }

    #[test]
    fn eviction_at_scale_is_amortised_and_keeps_the_newest() {
        let cap = 50_000;
        let mut tr = Tracker::new(cap);
        let mut out = Vec::new();
        let n = 4 * cap as u64;
        let start = std::time::Instant::now();
        for sk in 0..n {
            tr.observe(
                &Event::Transition(Transition {
                    ts_ns: 1_000 + sk,
                    skaddr: 0xffff_8880_0000_0000 + sk * 2304,
                    local: "10.0.0.1:0".parse().unwrap(),
                    remote: S.parse().unwrap(),
                    from: Close,
                    to: SynSent,
                    in_from_ns: None,
                    owner: None,
                    mptcp: false,
                    netns: None,
                    cgroup: None,
                }),
                &mut out,
            );
        }
        assert!(tr.tracked() <= cap);
        assert!(tr.tracked() >= cap - cap / 8, "{} tracked", tr.tracked());
        assert_eq!(tr.tracked() as u64 + tr.evicted(), n);
        assert_eq!(
            tr.role(0xffff_8880_0000_0000 + (n - 1) * 2304),
            Some(Role::Client)
        );
        // A pass per insert at the cap would take minutes here (200k × 50k).
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
    }

    fn any_event() -> impl Strategy<Value = (u64, u8, u8, u8)> {
        (0u64..4, 0u8..16, 1u8..=12, 1u8..=12)
    }

    proptest! {
        /// Any sequence — reordered, with gaps, resets anywhere — never panics, yields at most
        /// one close per socket life, and never claims a cause it has no evidence for.
        #[test]
        fn arbitrary_sequences(events in proptest::collection::vec(any_event(), 0..60)) {
            let mut s = Script::new();
            for (sk, what, from, to) in events {
                let (from, to) = (State::from_kernel(from).unwrap(), State::from_kernel(to).unwrap());
                match what {
                    0 => { s.rst(Some(sk), C, S, Direction::Sent); }
                    1 => { s.rst(Some(sk), C, S, Direction::Received); }
                    2 => { s.lost(); }
                    _ => { s.t(sk, C, S, from, to); }
                }
            }
            for c in s.run() {
                if c.how == How::Refused {
                    prop_assert_eq!(c.initiator, Initiator::Remote);
                }
                if c.timewait {
                    prop_assert!(matches!(c.how, How::Fin | How::Unknown));
                }
                if c.midlife {
                    prop_assert!(c.lifetime_ns.is_none());
                    prop_assert!(c.how != How::Timeout, "no timeout claimed without full evidence");
                }
            }
        }
    }
}
