//! The timewait socket's life: from the timer's arming to its expiry or early kill.
//!
//! The kernel replaces a closing socket by a separate timewait socket that never passes
//! through `inet_sock_set_state`. Its life comes from one of two sources:
//!
//! - the timewait functions themselves (fentry programs, where the kernel allows them):
//!   every arming says whether it is a re-arm, even one the timer wheel keeps in the same
//!   bucket; `inet_twsk_deschedule_put` (a cancel) is an early kill and the end
//!   (`inet_twsk_kill`) that follows it concludes it as killed, while an end alone is the
//!   timer's expiry;
//! - its timer (the timer tracepoints): per timer, `cancel` then `arm` is a re-arm (the peer's
//!   FIN arrived, or a retransmitted one), `cancel` then `expire` is the natural expiry (the
//!   timer is detached before its handler runs), and `cancel` alone is an early end (port
//!   reuse with `tcp_tw_reuse`, a reset, the namespace going away).
//!
//! Timewait sockets are reused from a slab, so a life is keyed by address *and* 4-tuple.

use std::{collections::VecDeque, net::SocketAddr};

use slab::Slab;

use crate::{
    analysis::closes::Role,
    model::{
        event::{Connection, Event, Owner, State, TimerEvent, TimerOp, Transition},
        filter::CompiledFilter,
    },
    shared::{
        DEFAULT_MAX_SOCKETS, FastMap, NS_PER_MS, NS_PER_SEC, eviction_threshold, tuple_digest,
    },
};

/// How a timewait socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum End {
    /// Its timer fired: 2MSL (or the FIN_WAIT2 timeout) elapsed.
    Expired,
    /// Cancelled early: port reuse, a reset, the namespace going away.
    Killed,
    /// The close should have entered TIME_WAIT but no timewait socket was created
    /// (`tcp_max_tw_buckets` reached), and the kernel proved it: its namespace's
    /// `TCPTimeWaitOverflow` count moved (see [`OverflowProof`]).
    NotCreated,
}

impl End {
    /// The name used in JSON and text.
    pub fn name(self) -> &'static str {
        match self {
            End::Expired => "expired",
            End::Killed => "killed",
            End::NotCreated => "not_created",
        }
    }
}

/// The end of one timewait socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// When it ended.
    pub ts_ns: u64,
    /// The timewait socket's address (0 for [`End::NotCreated`]).
    pub tw: u64,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// How.
    pub end: End,
    /// From its creation to its end (0 for [`End::NotCreated`]).
    pub residency_ns: u64,
    /// Times its timer was re-armed (the peer's FIN arriving, a retransmitted FIN).
    pub rearms: u32,
    /// Its substate at the end: TIME_WAIT, or FIN_WAIT2 for an orphan that never received
    /// the peer's FIN (the FIN_WAIT2 timeout, `tcp_fin_timeout`, not 2MSL).
    pub substate: State,
    /// The process whose close created it, when known.
    pub owner: Option<Owner>,
    /// Its network namespace inode, from its timer's arming (or, for
    /// [`End::NotCreated`], from the entry); None when unknown.
    pub netns: Option<u32>,
    /// The cgroup2 id of the socket whose close created it, from the entry into TIME_WAIT
    /// (a timewait socket has none of its own); None when unknown.
    pub cgroup: Option<u64>,
    /// The connection whose close created it (its role and states: none when unknown), so
    /// that a view counts the exit under that connection's service without a map of its own.
    pub made_by: MadeBy,
}

/// What is known of the connection whose close created a timewait socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadeBy {
    /// Its role.
    pub role: Role,
    /// Bit `1 << state` for every state it was seen in; 0 when its close was not seen.
    pub states: u16,
}

impl MadeBy {
    /// Nothing known: a timewait socket whose close was not seen (or not followed).
    pub const UNKNOWN: MadeBy = MadeBy {
        role: Role::Unknown,
        states: 0,
    };

    /// The service port of the connection at (local, remote).
    pub fn service_port(&self, local: SocketAddr, remote: SocketAddr) -> u16 {
        crate::analysis::closes::service_port(self.role, local, remote)
    }
}

/// A live timewait socket.
#[derive(Clone, Copy, Debug)]
pub struct Life {
    /// Its kernel address.
    pub tw: u64,
    /// When it was created.
    pub since_ns: u64,
    /// When its timer was last armed, and for how long (jiffies).
    pub armed_ns: u64,
    /// The timeout of the last arming, in jiffies.
    pub timeout_jiffies: u64,
    /// Re-arms so far.
    pub rearms: u32,
    /// Current substate.
    pub substate: State,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// The process whose close created it.
    pub owner: Option<Owner>,
    /// Its network namespace inode (None: unknown).
    pub netns: Option<u32>,
    /// The cgroup2 id of the socket whose close created it (None: unknown).
    pub cgroup: Option<u64>,
    /// The connection whose close created it.
    pub made_by: MadeBy,
    /// A cancel seen, not yet explained by a re-arm or an expiry.
    cancelled_at: Option<u64>,
    /// The last re-arm that followed a cancel, and the life as it was before: a connection
    /// record that shows a new connection on the 4-tuple born before that arming proves
    /// the cancel was a kill and the arming a new timewait socket at the same address.
    after_cancel: Option<Rearm>,
}

impl Life {
    /// Whether its timer was cancelled, and neither re-armed nor expired since (its end is
    /// about to be concluded: a kill, unless a re-arm follows).
    pub fn cancelled(&self) -> bool {
        self.cancelled_at.is_some()
    }
}

/// Reads a network namespace's `TCPTimeWaitOverflow` count now (None: it cannot be read).
pub type OverflowCount = Box<dyn FnMut(Option<u32>) -> Option<u64>>;

/// What proves that the kernel refused a timewait socket: the namespace's
/// `TCPTimeWaitOverflow` count moved past the refusals already claimed. The count is the
/// namespace's: a refusal of a socket tcptrace does not follow (filtered out) can prove an
/// entry whose timewait socket's arming was lost. An entry into
/// TIME_WAIT whose timewait socket never showed is otherwise not claimed refused: its
/// timer events may have been lost or skipped, or the socket killed before its timer ran.
pub struct OverflowProof {
    read: OverflowCount,
    /// Each namespace's count when tracing began, or when it was first needed for a
    /// namespace not read then (whose refusals before that are not claimed).
    base: FastMap<Option<u32>, u64>,
    /// Refusals claimed so far, per namespace.
    claimed: FastMap<Option<u32>, u64>,
    /// The count last read, per namespace: a read proves every refusal up to it, so a burst
    /// of refusals costs one read.
    seen: FastMap<Option<u32>, u64>,
    /// When each namespace's count was last read (event time): reads are rate-limited.
    read_at: FastMap<Option<u32>, u64>,
}

/// A namespace's count is read at most this often: reading it enters the namespace, and
/// entries without a timewait socket come fastest when timer events are being lost.
const PROOF_READ_EVERY_NS: u64 = 20 * NS_PER_MS;

impl OverflowProof {
    /// Proof read with `read`; the counts of `namespaces` (those that exist now) are taken
    /// now, as the base.
    pub fn new(mut read: OverflowCount, namespaces: &[Option<u32>]) -> OverflowProof {
        let base: FastMap<Option<u32>, u64> = namespaces
            .iter()
            .filter_map(|&n| Some((n, read(n)?)))
            .collect();
        OverflowProof {
            read,
            seen: base.clone(),
            base,
            claimed: FastMap::default(),
            read_at: FastMap::default(),
        }
    }

    /// Whether the kernel counted one more refusal in `netns` than claimed so far (which
    /// then counts as claimed), at `now_ns`. Reads the count only when the last read does
    /// not prove it, and not more often than [`PROOF_READ_EVERY_NS`].
    fn refused(&mut self, netns: Option<u32>, now_ns: u64) -> bool {
        let Some(&base) = self.base.get(&netns) else {
            // A namespace not read at start (not found then, or unreadable): its count now
            // is the base, and proves nothing yet (its past refusals are not these).
            if let Some(count) = (self.read)(netns) {
                self.base.insert(netns, count);
                self.seen.insert(netns, count);
            }
            return false;
        };
        let claimed = self.claimed.get(&netns).copied().unwrap_or(0);
        let proves = |count: u64| count.saturating_sub(base) > claimed;
        let seen = self.seen.get(&netns).copied().unwrap_or(base);
        if !proves(seen) {
            let last = self.read_at.get(&netns).copied();
            if last.is_some_and(|t| now_ns.saturating_sub(t) < PROOF_READ_EVERY_NS) {
                return false;
            }
            self.read_at.insert(netns, now_ns);
            match (self.read)(netns) {
                Some(count) if proves(count) => {
                    self.seen.insert(netns, count);
                }
                _ => return false,
            }
        }
        *self.claimed.entry(netns).or_default() += 1;
        true
    }
}

impl std::fmt::Debug for OverflowProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OverflowProof({} claimed)",
            self.claimed.values().sum::<u64>()
        )
    }
}

/// A re-arm that followed a cancel.
#[derive(Clone, Copy, Debug)]
struct Rearm {
    cancelled_at: u64,
    armed_at: u64,
    rearms: u32,
    substate: State,
}

/// A digest of the 4-tuple (local, remote): what [`Timewaits`] finds a life by, in eight
/// bytes rather than the 64 of two addresses (two 4-tuples with the same digest, one chance
/// in 2^64 per pair, leave the older one found only by its address).
pub fn tuple_key(local: SocketAddr, remote: SocketAddr) -> u64 {
    tuple_digest(0, local, remote)
}

/// Lives looked at to judge which are the oldest when the cap is reached.
const EVICTION_SAMPLE: usize = 1024;

/// How long a cancel waits for the re-arm or expiry that follows it in the same code path.
const CANCEL_GRACE_NS: u64 = 100 * NS_PER_MS;
/// How long an entry into TIME_WAIT waits for its timewait socket's arming.
const ARM_GRACE_NS: u64 = 100 * NS_PER_MS;

/// What a filter says of timewait sockets (the model knows nothing of them).
impl CompiledFilter {
    /// The userspace part for a timewait socket's end.
    pub fn keeps_exit(&self, x: &Exit) -> bool {
        self.keeps_parts(x.owner.as_ref(), x.local, x.remote, x.netns, x.cgroup)
    }

    /// The userspace part for a live timewait socket.
    pub fn keeps_life(&self, l: &Life) -> bool {
        self.keeps_parts(l.owner.as_ref(), l.local, l.remote, l.netns, l.cgroup)
    }
}

/// Follows timewait sockets.
#[derive(Debug, Default)]
pub struct Timewaits {
    /// The lives followed (a storm makes one per connection), each at a stable position
    /// that the two indexes below hold: growing an index moves 16-byte entries, not lives.
    lives: Slab<Life>,
    /// Each life's position, by kernel address.
    by_tw: FastMap<u64, usize>,
    /// Each life's position, by the digest of its 4-tuple ([`tuple_key`]): the life
    /// there is checked for the 4-tuple itself. Every life is, until the source names the
    /// timewait socket of each entry into TIME_WAIT ([`Connection::tw`]); from then on only
    /// lives whose timer was cancelled are (what a new connection on their 4-tuple looks
    /// for), the rest found by address.
    by_tuple: FastMap<u64, usize>,
    /// Whether the source names timewait sockets (see `by_tuple`).
    named: bool,
    /// Once it does: the lives armed in the last [`ARM_GRACE_NS`] (when, 4-tuple digest,
    /// address), in arming order, where a record that names none or another socket looks
    /// (its arming and its entry on different CPUs, or another arming in between: the
    /// kernel's slot holds one). Searched only then: no table to keep per arming.
    recent: VecDeque<(u64, u64, u64)>,
    /// The life the last connection record entered, with its 4-tuple: the close classified
    /// from that record asks for it next.
    last: Option<(u64, SocketAddr, SocketAddr)>,
    /// Entries into TIME_WAIT whose timewait socket has not been seen yet.
    expected: Vec<(u64, Transition, MadeBy)>,
    /// Cancels in time order, (when, timewait socket): the only lives `expire` looks at.
    /// An entry is stale once its life was re-armed or ended.
    cancels: VecDeque<(u64, u64)>,
    /// Whether the timers are traced at all (without them, nothing is concluded).
    traced: bool,
    /// Timewait sockets created so far.
    created: u64,
    /// The most timewait sockets followed at once (0: [`DEFAULT_MAX_SOCKETS`]).
    cap: usize,
    /// Timewait sockets forgotten because the cap was reached, or because their end was
    /// never seen.
    evicted: u64,
    /// When lives whose end was never seen were last looked for.
    last_sweep_ns: u64,
    /// What proves a refused timewait socket (None: nothing can, as in a replay).
    proof: Option<OverflowProof>,
    /// Entries into TIME_WAIT whose timewait socket never showed, with no proof that the
    /// kernel refused it.
    unproven: u64,
}

/// How long a TIME_WAIT lasts (the kernel's `TCP_TIMEWAIT_LEN`), and the default FIN_WAIT2
/// timeout of an orphan (`tcp_fin_timeout`).
pub const TCP_TIMEWAIT_LEN_NS: u64 = 60 * NS_PER_SEC;
/// The longest FIN_WAIT2 timeout `tcp_fin_timeout` may set (the kernel's
/// `TCP_FIN_TIMEOUT_MAX`).
pub const TCP_FIN_TIMEOUT_MAX_NS: u64 = 120 * NS_PER_SEC;
/// How often lives whose end was never seen are looked for.
pub const SWEEP_EVERY_NS: u64 = 10 * NS_PER_SEC;
/// No timewait socket outlives its last arming by this much: its timer runs a TIME_WAIT
/// (60 s) or an orphan's FIN_WAIT2 timeout (at most 120 s), and their sum leaves room. Older
/// lives lost their end (the kernel skipped a timer event) and would otherwise stay forever.
pub const STALE_NS: u64 = TCP_TIMEWAIT_LEN_NS + TCP_FIN_TIMEOUT_MAX_NS;

impl Timewaits {
    /// `traced`: whether the probe traces the timers (else entries prove nothing missing).
    pub fn new(traced: bool) -> Self {
        Timewaits {
            traced,
            ..Timewaits::default()
        }
    }

    /// Follows at most `cap` timewait sockets at once; beyond, the oldest are forgotten
    /// (no exit is reported for them) and counted.
    pub fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap.max(1);
        self
    }

    /// Whether timers are traced.
    pub fn traced(&self) -> bool {
        self.traced
    }

    /// Claims a refused timewait socket ([`End::NotCreated`]) only with `proof`.
    pub fn prove_with(mut self, proof: Option<OverflowProof>) -> Self {
        self.proof = proof;
        self
    }

    /// Its proof, taken away (for a rebuilt follower).
    pub fn take_proof(&mut self) -> Option<OverflowProof> {
        self.proof.take()
    }

    /// Entries into TIME_WAIT whose timewait socket never showed and that the kernel did
    /// not count as refused.
    pub fn unproven(&self) -> u64 {
        self.unproven
    }

    /// Timewait sockets forgotten because the cap was reached or their end was never seen.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Makes room for one more timewait socket.
    fn make_room(&mut self) {
        let cap = match self.cap {
            0 => DEFAULT_MAX_SOCKETS,
            n => n,
        };
        let len = self.lives.len();
        if len < cap {
            return;
        }
        // Spread over every slot: the slab's first ones hold its oldest lives, or, reused
        // after a sweep, its youngest.
        let span = self.lives.capacity().max(1);
        let sample = (0..span)
            .step_by((span / EVICTION_SAMPLE).max(1))
            .filter_map(|i| self.lives.get(i))
            .map(|l| l.since_ns)
            .collect();
        let threshold = eviction_threshold(sample, (cap / 16).max(1), len);
        self.forget(|l| l.since_ns <= threshold);
    }

    /// Forgets the lives `stale` picks, without reporting an end for them; counts them.
    fn forget(&mut self, stale: impl Fn(&Life) -> bool) {
        let gone: Vec<u64> = self
            .lives
            .iter()
            .filter(|(_, l)| stale(l))
            .map(|(_, l)| l.tw)
            .collect();
        for tw in &gone {
            self.remove(*tw);
        }
        self.evicted += gone.len() as u64;
    }

    /// Follows `life`, found again by its address and its 4-tuple (a later life on the same
    /// 4-tuple takes that over).
    fn insert(&mut self, life: Life) {
        let key = tuple_key(life.local, life.remote);
        let i = self.lives.insert(life);
        self.by_tw.insert(life.tw, i);
        if !self.named {
            self.by_tuple.insert(key, i);
            return;
        }
        self.recent.push_back((life.since_ns, key, life.tw));
        while let Some(&(at, _, _)) = self.recent.front() {
            if life.since_ns.saturating_sub(at) <= ARM_GRACE_NS {
                break;
            }
            self.recent.pop_front();
        }
    }

    /// Stops following the life at `tw`; returns it.
    fn remove(&mut self, tw: u64) -> Option<Life> {
        let i = self.by_tw.remove(&tw)?;
        let life = self.lives.remove(i);
        let key = tuple_key(life.local, life.remote);
        if self.by_tuple.get(&key) == Some(&i) {
            self.by_tuple.remove(&key);
        }
        Some(life)
    }

    /// The position of the life at `tw`.
    fn index(&self, tw: u64) -> Option<usize> {
        self.by_tw.get(&tw).copied()
    }

    /// The position of the life on the 4-tuple (local, remote).
    fn index_of(&self, local: SocketAddr, remote: SocketAddr) -> Option<usize> {
        let i = *self.by_tuple.get(&tuple_key(local, remote))?;
        let l = &self.lives[i];
        (l.local == local && l.remote == remote).then_some(i)
    }

    /// The position of the life on the 4-tuple (local, remote): the last connection
    /// record's, or one indexed by 4-tuple.
    fn find(&self, local: SocketAddr, remote: SocketAddr) -> Option<usize> {
        if let Some((tw, l, r)) = self.last
            && (l, r) == (local, remote)
            && let Some(i) = self.index(tw)
            && (self.lives[i].local, self.lives[i].remote) == (l, r)
        {
            return Some(i);
        }
        self.index_of(local, remote)
    }

    /// The timewait socket the connection record `c` entered: the one it names, else the
    /// last armed on its 4-tuple lately, else the one its 4-tuple finds.
    fn entered(&self, c: &Connection) -> Option<u64> {
        let (local, remote) = (c.end.local, c.end.remote);
        let same = |tw: u64| {
            self.at(tw)
                .is_some_and(|l| (l.local, l.remote) == (local, remote))
        };
        if let Some(tw) = c.tw.filter(|tw| same(*tw)) {
            return Some(tw);
        }
        let key = tuple_key(local, remote);
        if let Some(&(_, _, tw)) = self
            .recent
            .iter()
            .rev()
            .find(|(_, k, tw)| *k == key && same(*tw))
        {
            return Some(tw);
        }
        self.index_of(local, remote).map(|i| self.lives[i].tw)
    }

    /// The life at `tw`, to change.
    fn at_mut(&mut self, tw: u64) -> Option<&mut Life> {
        self.index(tw).map(|i| &mut self.lives[i])
    }

    /// The life on the 4-tuple (local, remote), to change.
    fn of_mut(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<&mut Life> {
        self.find(local, remote).map(|i| &mut self.lives[i])
    }

    /// Timewait sockets created since the start.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The timewait sockets alive now.
    pub fn population(&self) -> impl ExactSizeIterator<Item = &Life> {
        self.lives.iter().map(|(_, l)| l)
    }

    /// The timewait socket at kernel address `tw`, if followed.
    pub fn at(&self, tw: u64) -> Option<&Life> {
        self.index(tw).map(|i| &self.lives[i])
    }

    /// The timewait socket of the 4-tuple (local, remote), if followed.
    pub fn of(&self, local: SocketAddr, remote: SocketAddr) -> Option<&Life> {
        self.find(local, remote).map(|i| &self.lives[i])
    }

    /// Whether a timewait socket's timer was cancelled and neither re-armed nor ended since
    /// (see [`Life::cancelled`]): none is when this says no, without a lookup.
    pub fn any_cancelled(&self) -> bool {
        !self.cancels.is_empty()
    }

    /// Feeds one event; appends the timewait sockets it ends to `out`.
    pub fn observe(&mut self, ev: &Event, out: &mut Vec<Exit>) {
        match ev {
            Event::Timer(t) => self.timer(t, out),
            Event::Transition(t) => {
                if matches!(t.from, State::SynSent | State::SynRecv | State::Listen) {
                    self.handshake(t, out);
                }
                if t.to == State::TimeWait {
                    self.entry(t);
                }
            }
            _ => {}
        }
        self.expire(ev.ts_ns(), out);
    }

    /// Feeds a connection record: what its transitions would tell, looked at once.
    pub fn connection(&mut self, c: &Connection, out: &mut Vec<Exit>) {
        self.named |= c.tw.is_some();
        self.last = None;
        let handshake = [State::SynSent, State::SynRecv]
            .iter()
            .any(|s| c.tail.entered & (1 << *s as u16) != 0)
            || [State::SynSent, State::SynRecv, State::Listen]
                .iter()
                .any(|s| c.tail.first_from == *s as u8);
        if handshake {
            self.handshake(&c.end, out);
            if let Some(born) = c.born_ns() {
                self.split_if_reused(&c.end, born, out);
            }
        }
        if c.end.to == State::TimeWait {
            let tw = self.entered(c);
            self.last = tw.map(|tw| (tw, c.end.local, c.end.remote));
            self.entry_at(&c.end, tw);
        }
        self.expire(c.end.ts_ns, out);
    }

    /// A connection on the 4-tuple born after a timewait socket there was created and
    /// before its last re-arm that followed a cancel: the cancel was a kill (the new
    /// connection took the 4-tuple) and the arming its own timewait socket at the same
    /// address — what [`Timewaits::handshake`] tells at once from transitions, told late from
    /// a connection record that comes at the connection's end.
    fn split_if_reused(&mut self, t: &Transition, born_ns: u64, out: &mut Vec<Exit>) {
        let Some(life) = self.of_mut(t.local, t.remote) else {
            return;
        };
        let tw = life.tw;
        let Some(r) = life.after_cancel else {
            return;
        };
        if born_ns <= life.since_ns || born_ns > r.armed_at {
            return;
        }
        out.push(Exit {
            ts_ns: r.cancelled_at,
            tw,
            local: life.local,
            remote: life.remote,
            end: End::Killed,
            residency_ns: r.cancelled_at.saturating_sub(life.since_ns),
            rearms: r.rearms,
            substate: r.substate,
            owner: life.owner,
            netns: life.netns,
            cgroup: life.cgroup,
            made_by: life.made_by,
        });
        life.since_ns = r.armed_at;
        life.rearms = life.rearms.saturating_sub(r.rearms + 1);
        life.owner = None;
        life.cgroup = None;
        // The new connection's close names itself, if it is the one that made it.
        life.made_by = MadeBy::UNKNOWN;
        life.after_cancel = None;
        self.created += 1;
    }

    /// A full socket on the 4-tuple of a cancelled timewait socket: the timewait socket
    /// made way for a new connection (tcp_tw_reuse, or a SYN it accepted). Its slab object
    /// may come back for that connection's own timewait socket, with the same 4-tuple:
    /// without this, that would read as a re-arm. Looked for at the new connection's
    /// handshake (its first transitions with both ports), not on every transition: a storm
    /// makes ten per connection.
    fn handshake(&mut self, t: &Transition, out: &mut Vec<Exit>) {
        if let Some(l) = self.of(t.local, t.remote)
            && let Some(at) = l.cancelled_at
        {
            out.extend(self.end(l.tw, at, End::Killed));
        }
    }

    /// An entry into TIME_WAIT (a transition), its timewait socket found by 4-tuple.
    fn entry(&mut self, t: &Transition) {
        // The timewait socket is armed just before the full socket's transition is logged.
        let tw = self.of(t.local, t.remote).map(|l| l.tw);
        self.entry_at(t, tw);
    }

    /// An entry into TIME_WAIT whose timewait socket is `tw` (None: not seen yet).
    fn entry_at(&mut self, t: &Transition, tw: Option<u64>) {
        let traced = self.traced;
        match tw.and_then(|tw| self.at_mut(tw)) {
            Some(life) => {
                life.owner = life.owner.or(t.owner);
                life.cgroup = life.cgroup.or(t.cgroup);
                life.netns = life.netns.or(t.netns);
            }
            None if traced => self.expected.push((t.ts_ns, *t, MadeBy::UNKNOWN)),
            None => {}
        }
    }

    /// Names the connection whose close made the timewait socket at (local, remote) — or
    /// the one expected there — for its exit.
    pub fn made_by(&mut self, local: SocketAddr, remote: SocketAddr, made_by: MadeBy) {
        if let Some(life) = self.of_mut(local, remote) {
            life.made_by = made_by;
        } else if let Some((_, _, m)) = self
            .expected
            .iter_mut()
            .rev()
            .find(|(_, e, _)| e.local == local && e.remote == remote)
        {
            *m = made_by;
        }
    }

    fn timer(&mut self, t: &TimerEvent, out: &mut Vec<Exit>) {
        match t.op {
            TimerOp::Armed {
                substate,
                timeout_jiffies,
                local,
                remote,
                netns,
                rearm,
            } => {
                if let Some(life) = self.at_mut(t.tw) {
                    if life.local == local && life.remote == remote {
                        let cancelled = life.cancelled_at.take();
                        if let Some(at) = cancelled {
                            life.after_cancel = Some(Rearm {
                                cancelled_at: at,
                                armed_at: t.ts_ns,
                                rearms: life.rearms,
                                substate: life.substate,
                            });
                        }
                        if rearm || cancelled.is_some() || life.substate != substate {
                            life.rearms += 1;
                        }
                        life.substate = substate;
                        life.armed_ns = t.ts_ns;
                        life.timeout_jiffies = timeout_jiffies;
                        return;
                    }
                    // The slab gave the address to another connection: the old one is gone.
                    let old = self.end(t.tw, t.ts_ns, End::Killed);
                    out.extend(old);
                }
                let entry = self
                    .expected
                    .iter()
                    .position(|(_, e, _)| e.local == local && e.remote == remote)
                    .map(|i| self.expected.remove(i));
                let made_by = entry.map_or(MadeBy::UNKNOWN, |(_, _, m)| m);
                let entry = entry.map(|(_, e, _)| e);
                let owner = entry.and_then(|e| e.owner);
                let cgroup = entry.and_then(|e| e.cgroup);
                self.make_room();
                self.created += 1;
                self.insert(Life {
                    tw: t.tw,
                    since_ns: t.ts_ns,
                    armed_ns: t.ts_ns,
                    timeout_jiffies,
                    rearms: 0,
                    substate,
                    local,
                    remote,
                    owner,
                    netns: netns.or(entry.and_then(|e| e.netns)),
                    cgroup,
                    made_by,
                    cancelled_at: None,
                    after_cancel: None,
                });
            }
            TimerOp::Cancelled => {
                let Some(i) = self.index(t.tw) else {
                    return;
                };
                let life = &mut self.lives[i];
                // Read as it is cancelled: a peer's FIN may have moved it to TIME_WAIT
                // without a timer event of its own.
                life.substate = t.substate_at_end.unwrap_or(life.substate);
                life.cancelled_at = Some(t.ts_ns);
                self.cancels.push_back((t.ts_ns, t.tw));
                // A new connection on its 4-tuple may be what kills it: found by it.
                if self.named {
                    let key = tuple_key(life.local, life.remote);
                    self.by_tuple.insert(key, i);
                }
            }
            TimerOp::Expired => {
                if let Some(life) = self.at_mut(t.tw) {
                    life.substate = t.substate_at_end.unwrap_or(life.substate);
                }
                out.extend(self.end(t.tw, t.ts_ns, End::Expired));
            }
            TimerOp::Ended => {
                // `inet_twsk_kill`: from `inet_twsk_deschedule_put` (its cancel came first)
                // or from the timer's handler.
                let Some(life) = self.at_mut(t.tw) else {
                    return;
                };
                life.substate = t.substate_at_end.unwrap_or(life.substate);
                let (at, end) = match life.cancelled_at.take() {
                    Some(at) => (at, End::Killed),
                    None => (t.ts_ns, End::Expired),
                };
                out.extend(self.end(t.tw, at, end));
            }
        }
    }

    fn end(&mut self, tw: u64, ts_ns: u64, end: End) -> Option<Exit> {
        let life = self.remove(tw)?;
        Some(Exit {
            ts_ns,
            tw,
            local: life.local,
            remote: life.remote,
            end,
            residency_ns: ts_ns.saturating_sub(life.since_ns),
            rearms: life.rearms,
            substate: life.substate,
            owner: life.owner,
            netns: life.netns,
            cgroup: life.cgroup,
            made_by: life.made_by,
        })
    }

    /// The time of the earliest end still waiting to be concluded (a cancel that may be a
    /// kill, an entry into TIME_WAIT whose timewait socket has not shown): an exit may yet
    /// come out dated then. None when none waits.
    pub fn waiting_since(&self) -> Option<u64> {
        let cancel = self
            .cancels
            .iter()
            .find(|(at, tw)| self.at(*tw).and_then(|l| l.cancelled_at) == Some(*at))
            .map(|(at, _)| *at);
        let entry = self.expected.iter().map(|(at, _, _)| *at).min();
        cancel.into_iter().chain(entry).min()
    }

    /// Concludes what time has settled by `now_ns`: cancels with no re-arm or expiry are
    /// early kills; entries with no timewait socket were not given one.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Exit>) {
        if now_ns.saturating_sub(self.last_sweep_ns) >= SWEEP_EVERY_NS && now_ns != u64::MAX {
            self.last_sweep_ns = now_ns;
            self.forget(|l| now_ns.saturating_sub(l.armed_ns) > STALE_NS);
        }
        while let Some(&(at, tw)) = self.cancels.front() {
            if now_ns.saturating_sub(at) <= CANCEL_GRACE_NS {
                break;
            }
            self.cancels.pop_front();
            if self.at(tw).and_then(|l| l.cancelled_at) == Some(at) {
                out.extend(self.end(tw, at, End::Killed));
            }
        }
        while let Some((at, t, made_by)) = self.expected.first().copied() {
            if now_ns.saturating_sub(at) <= ARM_GRACE_NS {
                break;
            }
            self.expected.remove(0);
            if !self
                .proof
                .as_mut()
                .is_some_and(|p| p.refused(t.netns, now_ns))
            {
                self.unproven += 1;
                continue;
            }
            out.push(Exit {
                ts_ns: t.ts_ns,
                tw: 0,
                local: t.local,
                remote: t.remote,
                end: End::NotCreated,
                residency_ns: 0,
                rearms: 0,
                substate: State::TimeWait,
                owner: t.owner,
                netns: t.netns,
                cgroup: t.cgroup,
                made_by,
            });
        }
    }

    /// At the end of a run: pending cancels are kills; pending entries are left alone (the
    /// run may have stopped between an entry and its arming).
    pub fn flush(&mut self, out: &mut Vec<Exit>) {
        self.expire(u64::MAX, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Comm;

    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";
    const SEC: u64 = NS_PER_SEC;

    fn armed(ts: u64, tw: u64, substate: State, local: &str) -> Event {
        Event::Timer(TimerEvent {
            ts_ns: ts,
            tw,
            substate_at_end: None,
            op: TimerOp::Armed {
                substate,
                timeout_jiffies: 15000,
                local: local.parse().unwrap(),
                remote: S.parse().unwrap(),
                netns: Some(4_026_532_000 + tw as u32),
                rearm: false,
            },
        })
    }

    fn op(ts: u64, tw: u64, op: TimerOp) -> Event {
        Event::Timer(TimerEvent {
            ts_ns: ts,
            tw,
            op,
            substate_at_end: None,
        })
    }

    fn entry(ts: u64, local: &str) -> Event {
        Event::Transition(Transition {
            ts_ns: ts,
            skaddr: 9,
            local: local.parse().unwrap(),
            remote: S.parse().unwrap(),
            from: State::FinWait2,
            to: State::TimeWait,
            in_from_ns: Some(1),
            owner: Some(Owner {
                pid: 7,
                comm: Comm(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
                from_listener: false,
            }),
            mptcp: false,
            netns: Some(4_026_532_999),
            cgroup: Some(55),
        })
    }

    fn run(events: &[Event]) -> Vec<Exit> {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        for e in events {
            t.observe(e, &mut out);
        }
        t.flush(&mut out);
        out
    }

    /// A client connection on `C` born at `born` whose life ends entering TIME_WAIT at
    /// `end`: its transitions, and its connection record as the kernel writes it.
    fn client_life(born: u64, end: u64) -> (Vec<Event>, Event) {
        use tcptrace_common::connection::SockLife;
        let path = [
            (State::Close, State::SynSent),
            (State::SynSent, State::Established),
            (State::Established, State::FinWait1),
            (State::FinWait1, State::FinWait2),
            (State::FinWait2, State::TimeWait),
        ];
        let mut life = SockLife::default();
        let mut transitions = Vec::new();
        for (i, (from, to)) in path.iter().enumerate() {
            let ts = if i + 1 == path.len() {
                end
            } else {
                born + i as u64 * 1_000
            };
            let raw_to = if *to == State::TimeWait {
                State::Close
            } else {
                *to
            };
            life.on_transition(ts, *from as u8, raw_to as u8);
            let Event::Transition(mut t) = entry(ts, C) else {
                unreachable!()
            };
            (t.from, t.to) = (*from, *to);
            transitions.push(Event::Transition(t));
        }
        let Some(Event::Transition(end)) = transitions.last().copied() else {
            unreachable!()
        };
        let record = Event::Connection(Connection {
            end,
            tail: life.tail(),
            tw: None,
        });
        (transitions, record)
    }

    #[test]
    fn a_reused_address_reads_the_same_from_transitions_and_from_records() {
        // Connection A leaves timewait socket 1; connection B, born while it lives, takes
        // the 4-tuple (the kernel kills socket 1 as B connects) and leaves its own timewait
        // socket at the same address; it expires.
        let (a, a_record) = client_life(SEC, 2 * SEC);
        let (b, b_record) = client_life(3 * SEC, 4 * SEC);
        let armed_a = armed(2 * SEC - 5, 1, State::TimeWait, C);
        let kill = op(3 * SEC + 500, 1, TimerOp::Cancelled);
        let armed_b = armed(4 * SEC - 5, 1, State::TimeWait, C);
        let expiry = op(64 * SEC, 1, TimerOp::Expired);
        // Transitions: B's handshake comes between the kill and B's timewait socket.
        let mut from_transitions = a[..4].to_vec();
        from_transitions.extend([armed_a, a[4], b[0], kill]);
        from_transitions.extend(b[1..4].iter().copied());
        from_transitions.extend([armed_b, b[4], expiry]);
        // Records: B's comes after its timewait socket is armed.
        let from_records = [armed_a, a_record, kill, armed_b, b_record, expiry];
        let summary = |out: Vec<Exit>| {
            out.iter()
                .map(|x| (x.ts_ns, x.end, x.residency_ns, x.rearms, x.owner.is_some()))
                .collect::<Vec<_>>()
        };
        let expected = [
            (3 * SEC + 500, End::Killed, SEC + 505, 0, true),
            (64 * SEC, End::Expired, 60 * SEC + 5, 0, true),
        ];
        assert_eq!(summary(run(&from_transitions)), expected);
        // A's close names its connection (as the pipeline does for a close into TIME_WAIT);
        // B's does not here: A's name must not be left on B's socket.
        let a_made = MadeBy {
            role: Role::Client,
            states: 1 << State::TimeWait as u16,
        };
        // From records that name their timewait socket (this kernel side's), and from
        // records that do not (recordings made before it did).
        for named in [false, true] {
            let mut t = Timewaits::new(true);
            let mut out = Vec::new();
            for e in &from_records {
                match e {
                    Event::Connection(c) => {
                        let c = Connection {
                            tw: named.then_some(1),
                            ..*c
                        };
                        t.connection(&c, &mut out);
                        if c.end.ts_ns == 2 * SEC {
                            t.made_by(c.end.local, c.end.remote, a_made);
                        }
                    }
                    e => t.observe(e, &mut out),
                }
            }
            t.flush(&mut out);
            assert_eq!(t.created(), 2, "named: {named}");
            let made: Vec<MadeBy> = out.iter().map(|x| x.made_by).collect();
            assert_eq!(made, [a_made, MadeBy::UNKNOWN], "named: {named}");
            assert_eq!(summary(out), expected, "named: {named}");
        }
    }

    /// From records that name their timewait socket, a life is found by its address: only
    /// one whose timer was cancelled is indexed by its 4-tuple, and a record that names none
    /// (or another socket) still finds the life armed for it.
    #[test]
    fn records_that_name_their_timewait_socket_find_it_by_address() {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        let record = |born: u64, end: u64, local: &str, tw: Option<u64>| {
            let (_, Event::Connection(mut c)) = client_life(born, end) else {
                unreachable!()
            };
            c.end.local = local.parse().unwrap();
            c.tw = tw;
            c
        };
        let locals = ["10.0.0.1:40000", "10.0.0.1:40001", "10.0.0.1:40002"];
        // Named; named wrongly (a nested arming took the kernel's slot); not named.
        let names = [Some(1), Some(1), None];
        for (i, (local, tw)) in locals.iter().zip(names).enumerate() {
            let at = (i as u64 + 1) * SEC;
            t.observe(&armed(at, i as u64 + 1, State::TimeWait, local), &mut out);
            t.connection(&record(at - SEC / 2, at + 1, local, tw), &mut out);
            let life = t.of(local.parse().unwrap(), S.parse().unwrap());
            assert_eq!(life.map(|l| l.tw), Some(i as u64 + 1), "{local}");
            assert!(
                life.is_some_and(|l| l.owner.is_some()),
                "the entry's owner: {local}"
            );
        }
        assert!(
            t.expected.is_empty(),
            "every entry found its timewait socket"
        );
        // The first was armed before a record named one: indexed, as every life then.
        assert_eq!(t.by_tuple.len(), 1, "no later life indexed by 4-tuple");
        t.observe(&op(4 * SEC, 2, TimerOp::Cancelled), &mut out);
        assert_eq!(t.by_tuple.len(), 2, "a cancelled life is");
        // A new connection on its 4-tuple: the cancel was a kill.
        let (mut next, _) = client_life(4 * SEC + 1, 5 * SEC);
        let Event::Transition(handshake) = &mut next[1] else {
            unreachable!()
        };
        handshake.local = locals[1].parse().unwrap();
        t.observe(&next[1], &mut out);
        assert_eq!(
            out.iter().map(|x| (x.tw, x.end)).collect::<Vec<_>>(),
            [(2, End::Killed)]
        );
    }

    /// A record that names no timewait socket finds the one armed for it lately however
    /// many were armed in between (its arming and its entry on different CPUs).
    #[test]
    fn a_record_naming_none_finds_its_socket_among_many_armed_since() {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        let record = |end: u64, local: &str, tw: Option<u64>| {
            let (_, Event::Connection(mut c)) = client_life(end - SEC / 2, end) else {
                unreachable!()
            };
            c.end.local = local.parse().unwrap();
            c.tw = tw;
            c
        };
        // A first named record: the source names timewait sockets.
        t.observe(&armed(SEC, 1, State::TimeWait, "10.0.0.1:1000"), &mut out);
        t.connection(&record(SEC + 1, "10.0.0.1:1000", Some(1)), &mut out);
        t.observe(&armed(2 * SEC, 2, State::TimeWait, C), &mut out);
        for i in 0..1_000u64 {
            let local = format!("10.0.0.1:{}", 2_000 + i);
            t.observe(
                &armed(2 * SEC + 1 + i, 10 + i, State::TimeWait, &local),
                &mut out,
            );
        }
        t.connection(&record(2 * SEC + 2_000, C, None), &mut out);
        assert!(t.expected.is_empty(), "its entry found its timewait socket");
        let life = t.of(C.parse().unwrap(), S.parse().unwrap());
        assert_eq!(life.map(|l| (l.tw, l.owner.is_some())), Some((2, true)));
    }

    /// At the cap, about the oldest sixteenth is forgotten, whichever slots they sit in.
    #[test]
    fn the_cap_forgets_the_oldest_sixteenth() {
        const CAP: usize = 4096;
        let mut t = Timewaits::new(true).with_cap(CAP);
        let mut out = Vec::new();
        for i in 0..=CAP as u64 {
            let local = format!("10.0.0.{}:{}", 1 + i / 50_000, 1_000 + i % 50_000);
            t.observe(&armed(SEC + i, 1 + i, State::TimeWait, &local), &mut out);
        }
        let evicted = t.evicted() as usize;
        assert!(
            (CAP / 32..=CAP / 8).contains(&evicted),
            "{evicted} forgotten of {CAP}"
        );
        let oldest_kept = t.population().map(|l| l.since_ns).min().unwrap();
        assert_eq!(oldest_kept, SEC + evicted as u64, "the oldest went");
    }

    #[test]
    fn the_substate_is_the_one_the_socket_has_at_its_end() {
        // Armed as an orphan in FIN_WAIT2; the peer's FIN landed in the same timer-wheel
        // bucket (no timer event); the expiry reads TIME_WAIT.
        let expiry = Event::Timer(TimerEvent {
            ts_ns: 61 * SEC,
            tw: 1,
            op: TimerOp::Expired,
            substate_at_end: Some(State::TimeWait),
        });
        let out = run(&[
            armed(SEC, 1, State::FinWait2, C),
            entry(SEC + 10, C),
            expiry,
        ]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].substate, State::TimeWait);
        // Recordings from before say nothing at the end: the arming's substate stands.
        let old = op(61 * SEC, 1, TimerOp::Expired);
        let out = run(&[armed(SEC, 1, State::FinWait2, C), entry(SEC + 10, C), old]);
        assert_eq!(out[0].substate, State::FinWait2);
    }

    #[test]
    fn created_in_fin_wait2_rearmed_into_time_wait_then_expired() {
        let out = run(&[
            armed(SEC, 1, State::FinWait2, C),
            entry(SEC + 10, C),
            op(3 * SEC, 1, TimerOp::Cancelled),
            armed(3 * SEC + 5, 1, State::TimeWait, C),
            op(63 * SEC, 1, TimerOp::Cancelled),
            op(63 * SEC + 5, 1, TimerOp::Expired),
        ]);
        assert_eq!(out.len(), 1);
        let e = out[0];
        assert_eq!(
            (e.end, e.rearms, e.substate),
            (End::Expired, 1, State::TimeWait)
        );
        assert_eq!(e.residency_ns, 62 * SEC + 5);
        assert_eq!(
            e.owner.unwrap().pid,
            7,
            "the closing process, from the entry"
        );
        assert_eq!(
            e.netns,
            Some(4_026_532_001),
            "the namespace, from the arming"
        );
        assert_eq!(e.cgroup, Some(55), "the cgroup, from the entry");
    }

    /// An arming as the programs on `__inet_twsk_schedule` report it, `rearm` as the
    /// kernel said.
    fn scheduled(ts: u64, tw: u64, substate: State, rearm: bool) -> Event {
        let Event::Timer(mut t) = armed(ts, tw, substate, C) else {
            unreachable!()
        };
        if let TimerOp::Armed { rearm: r, .. } = &mut t.op {
            *r = rearm;
        }
        Event::Timer(t)
    }

    /// An end or cancel read with the socket's substate, as every program reports it now.
    fn at_end(ts: u64, tw: u64, op: TimerOp, substate: State) -> Event {
        Event::Timer(TimerEvent {
            ts_ns: ts,
            tw,
            op,
            substate_at_end: Some(substate),
        })
    }

    #[test]
    fn from_the_timewait_functions_every_rearm_counts_and_an_end_alone_is_an_expiry() {
        // Created in FIN_WAIT2; the peer's FIN re-arms it into TIME_WAIT; a retransmitted
        // FIN re-arms it again in the same timer-wheel bucket (same substate, no cancel: the
        // timer tracepoints never showed that one); then `inet_twsk_kill` from the handler.
        let out = run(&[
            scheduled(SEC, 1, State::FinWait2, false),
            entry(SEC + 10, C),
            scheduled(3 * SEC, 1, State::TimeWait, true),
            scheduled(4 * SEC, 1, State::TimeWait, true),
            at_end(64 * SEC, 1, TimerOp::Ended, State::TimeWait),
        ]);
        assert_eq!(out.len(), 1);
        let e = out[0];
        assert_eq!(
            (e.end, e.rearms, e.substate, e.residency_ns),
            (End::Expired, 2, State::TimeWait, 63 * SEC)
        );
        assert_eq!(
            e.owner.unwrap().pid,
            7,
            "the closing process, from the entry"
        );
    }

    #[test]
    fn from_the_timewait_functions_a_deschedule_then_the_end_is_a_kill_at_once() {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        for e in [
            scheduled(SEC, 1, State::TimeWait, false),
            at_end(2 * SEC, 1, TimerOp::Cancelled, State::TimeWait),
            at_end(2 * SEC + 3, 1, TimerOp::Ended, State::TimeWait),
        ] {
            t.observe(&e, &mut out);
        }
        // Concluded by the end itself, not after the grace a lone cancel waits for.
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].end, out[0].residency_ns), (End::Killed, SEC));
        assert_eq!(t.waiting_since(), None, "nothing left to conclude");
        t.flush(&mut out);
        assert_eq!(out.len(), 1, "no second end for the same socket");
        // An end of a socket never armed (before the trace) is ignored.
        let out = run(&[at_end(SEC, 5, TimerOp::Ended, State::TimeWait)]);
        assert!(out.is_empty());
    }

    #[test]
    fn a_cancel_alone_is_an_early_kill() {
        let out = run(&[
            armed(SEC, 1, State::TimeWait, C),
            op(2 * SEC, 1, TimerOp::Cancelled),
            armed(4 * SEC, 2, State::TimeWait, "10.0.0.1:40001"),
        ]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].end, out[0].residency_ns), (End::Killed, SEC));
    }

    #[test]
    fn a_cancel_that_may_be_a_kill_holds_back_what_comes_after_it() {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        t.observe(&armed(SEC, 1, State::TimeWait, C), &mut out);
        assert_eq!(t.waiting_since(), None, "an armed timer waits for nothing");
        t.observe(&op(2 * SEC, 1, TimerOp::Cancelled), &mut out);
        assert_eq!(
            t.waiting_since(),
            Some(2 * SEC),
            "a kill would be dated then"
        );
        t.expire(3 * SEC, &mut out);
        assert_eq!(
            (out.len(), t.waiting_since()),
            (1, None),
            "concluded a kill"
        );
    }

    #[test]
    fn a_port_reused_for_a_new_connection_kills_the_old_one() {
        // tcp_tw_reuse: the client reconnects from the same port; the old timewait socket is
        // cancelled, the new connection runs, and its own timewait socket gets the same slab
        // address and the same 4-tuple.
        let mut est = match entry(3 * SEC, C) {
            Event::Transition(t) => t,
            _ => unreachable!(),
        };
        est.from = State::SynSent;
        est.to = State::Established;
        let out = run(&[
            armed(SEC, 1, State::TimeWait, C),
            op(2 * SEC + 500, 1, TimerOp::Cancelled),
            Event::Transition(est),
            armed(2 * SEC + 900, 1, State::TimeWait, C),
            entry(2 * SEC + 901, C),
        ]);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(
            (out[0].end, out[0].residency_ns, out[0].rearms),
            (End::Killed, SEC + 500, 0)
        );
    }

    #[test]
    fn a_reused_address_with_another_tuple_is_a_new_socket() {
        let out = run(&[
            armed(SEC, 1, State::TimeWait, C),
            op(2 * SEC, 1, TimerOp::Cancelled),
            armed(2 * SEC + 1, 1, State::TimeWait, "10.0.0.1:40001"),
            op(62 * SEC, 1, TimerOp::Cancelled),
            op(62 * SEC + 1, 1, TimerOp::Expired),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].end, out[0].local.port()), (End::Killed, 40000));
        assert_eq!(
            (out[1].end, out[1].local.port(), out[1].rearms),
            (End::Expired, 40001, 0)
        );
    }

    /// A namespace's overflow count that the test moves, and how often it was read.
    fn counter(
        start: u64,
    ) -> (
        std::rc::Rc<std::cell::Cell<u64>>,
        std::rc::Rc<std::cell::Cell<u32>>,
        OverflowCount,
    ) {
        let (count, reads) = (
            std::rc::Rc::new(std::cell::Cell::new(start)),
            std::rc::Rc::new(std::cell::Cell::new(0)),
        );
        let (c, r) = (count.clone(), reads.clone());
        let read = Box::new(move |netns: Option<u32>| {
            r.set(r.get() + 1);
            (netns == Some(4_026_532_999)).then(|| c.get())
        });
        (count, reads, read)
    }

    fn run_proven(events: &[Event], proof: OverflowProof) -> (Vec<Exit>, u64) {
        let mut t = Timewaits::new(true).prove_with(Some(proof));
        let mut out = Vec::new();
        for e in events {
            t.observe(e, &mut out);
        }
        t.flush(&mut out);
        (out, t.unproven())
    }

    #[test]
    fn an_entry_without_a_timewait_socket_is_claimed_refused_only_with_the_kernels_count() {
        let ns = [Some(4_026_532_999)];
        // The namespace counted 5 refusals before tracing, then 2 more.
        let (count, reads, read) = counter(5);
        let proof = OverflowProof::new(read, &ns);
        count.set(7);
        let entries = [
            entry(SEC, C),
            entry(3 * SEC, "10.0.0.1:40001"),
            entry(5 * SEC, "10.0.0.1:40002"),
        ];
        let (out, unproven) = run_proven(&entries, proof);
        assert_eq!(out.len(), 2, "two refusals counted, two claimed: {out:?}");
        assert_eq!(unproven, 1, "the third is not claimed");
        assert!(out.iter().all(|e| e.end == End::NotCreated));
        assert!(
            out.iter()
                .all(|e| (e.netns, e.cgroup) == (Some(4_026_532_999), Some(55))),
            "from the entry: {out:?}"
        );
        // The base, one read that proved both, one that proved nothing.
        assert_eq!(reads.get(), 3);
        // Nothing to read the count with (a replay): nothing claimed.
        let out = run(&entries);
        assert!(out.is_empty(), "{out:?}");
        // A count that did not move proves nothing either.
        let (_, _, read) = counter(0);
        let (out, unproven) =
            run_proven(&[entry(SEC, "10.0.0.9:1")], OverflowProof::new(read, &ns));
        assert!(out.is_empty() && unproven == 1, "{out:?}");
        // Without timer tracing, nothing is concluded.
        let mut t = Timewaits::new(false);
        let mut out = Vec::new();
        t.observe(&entry(SEC, C), &mut out);
        t.flush(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_life_whose_end_was_never_seen_is_forgotten_not_kept_forever() {
        let mut t = Timewaits::new(true);
        let mut out = Vec::new();
        t.observe(&armed(SEC, 1, State::TimeWait, C), &mut out);
        t.observe(
            &armed(2 * SEC, 2, State::TimeWait, "10.0.0.1:40001"),
            &mut out,
        );
        // The second one is re-armed later; the first one's expiry was skipped by the kernel.
        t.observe(
            &armed(100 * SEC, 2, State::TimeWait, "10.0.0.1:40001"),
            &mut out,
        );
        t.expire(200 * SEC, &mut out);
        assert_eq!(t.population().count(), 1);
        assert_eq!(t.evicted(), 1);
        assert!(out.is_empty(), "no end is made up: {out:?}");
    }

    #[test]
    fn expiries_and_cancels_of_unknown_timers_are_ignored() {
        let out = run(&[op(SEC, 5, TimerOp::Cancelled), op(SEC, 5, TimerOp::Expired)]);
        assert!(out.is_empty());
    }
}
