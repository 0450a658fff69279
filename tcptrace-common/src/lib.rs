//! The kernel/user contract of tcptrace.
//!
//! Everything that crosses the boundary between the eBPF program and userspace is defined
//! here, once: the event record written into the ring buffer, the configuration the loader
//! writes before attaching, and the small pure rules both sides must agree on (which
//! transitions are kept by the in-kernel filter, which transitions run in the context of the
//! socket's owner). The rules are plain functions so that userspace tests can check them
//! without loading anything into the kernel.
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod connection;
pub mod details;
pub mod verdict;

/// A TCP state, as the kernel numbers them (`include/net/tcp_states.h`): the one definition
/// both sides use. The kernel side matches the numbers in [`state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The state with kernel number `n`, if there is one.
    pub const fn from_kernel(n: u8) -> Option<TcpState> {
        if n >= 1 && n as usize <= TcpState::ALL.len() {
            Some(TcpState::ALL[n as usize - 1])
        } else {
            None
        }
    }

    /// The kernel's name without the `TCP_` prefix (`ESTABLISHED`, `TIME_WAIT`, …).
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// A state by name, in any case, with `-` or `_`, with or without `TCP_` (`TIME_WAIT`,
    /// `time-wait`, `TCP_TIME_WAIT`), and `CLOSED` for `CLOSE`.
    pub fn from_name(s: &str) -> Option<TcpState> {
        let s = s.trim();
        let s = match s.get(..4) {
            Some(p) if p.eq_ignore_ascii_case("TCP_") => &s[4..],
            _ => s,
        };
        if s.eq_ignore_ascii_case("CLOSED") {
            return Some(TcpState::Close);
        }
        let same = |name: &str| {
            name.len() == s.len()
                && name.bytes().zip(s.bytes()).all(|(n, c)| {
                    let c = if c == b'-' { b'_' } else { c };
                    n == c.to_ascii_uppercase()
                })
        };
        TcpState::ALL.into_iter().find(|st| same(st.name()))
    }
}

impl core::fmt::Display for TcpState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// The kernel's numbers of the states, for matching what the kernel reports.
pub mod state {
    use super::TcpState;

    pub const ESTABLISHED: u8 = TcpState::Established as u8;
    pub const SYN_SENT: u8 = TcpState::SynSent as u8;
    pub const SYN_RECV: u8 = TcpState::SynRecv as u8;
    pub const FIN_WAIT1: u8 = TcpState::FinWait1 as u8;
    pub const FIN_WAIT2: u8 = TcpState::FinWait2 as u8;
    pub const TIME_WAIT: u8 = TcpState::TimeWait as u8;
    pub const CLOSE: u8 = TcpState::Close as u8;
    pub const CLOSE_WAIT: u8 = TcpState::CloseWait as u8;
    pub const LAST_ACK: u8 = TcpState::LastAck as u8;
    pub const LISTEN: u8 = TcpState::Listen as u8;
    pub const CLOSING: u8 = TcpState::Closing as u8;
    pub const NEW_SYN_RECV: u8 = TcpState::NewSynRecv as u8;
    /// The highest state number the kernel uses.
    pub const MAX: u8 = NEW_SYN_RECV;
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
/// Address families as the kernel numbers them.
pub const AF_INET6: u16 = 10;

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_MPTCP`: the MPTCP meta socket. Its subflows are reported as plain TCP sockets.
pub const IPPROTO_MPTCP: u16 = 262;

/// What an [`Event`] describes.
pub mod kind {
    /// A state transition of a full TCP socket (`sock:inet_sock_set_state`).
    pub const TRANSITION: u8 = 1;
    /// Events that were dropped because the ring buffer was full. Produced by userspace from
    /// the kernel's loss counters, never by the eBPF program; `aux` holds the count.
    pub const LOST: u8 = 2;
    /// This host sent a reset (`tcp:tcp_send_reset`). `oldstate` = `newstate` = the socket's
    /// state (0 when there is no socket: a refused connection); `aux` = the kernel's
    /// `sk_rst_reason` ([`NO_REASON`](super::NO_REASON) when the kernel does not say).
    pub const RESET_SENT: u8 = 3;
    /// A reset arrived for a socket of this host (`tcp:tcp_receive_reset`); `oldstate` =
    /// `newstate` = the socket's state.
    pub const RESET_RECEIVED: u8 = 4;
    /// A timewait socket's timer was armed (`timer:timer_start` with `tw_timer_handler`, or
    /// an fentry program on `__inet_twsk_schedule`): `skaddr` = the timewait socket, `aux` =
    /// the timeout in jiffies, `oldstate` = its substate (FIN_WAIT2 or TIME_WAIT),
    /// `newstate` = TIME_WAIT; addresses and ports set. With
    /// [`TW_REARM`](super::flag::TW_REARM), the kernel said it re-arms a live one.
    pub const TW_ARMED: u8 = 5;
    /// A known timewait timer was cancelled (`timer:timer_cancel`): before a re-arm, before
    /// the expiry handler runs, or alone when the socket is killed early. Only `skaddr`.
    /// From the fentry programs (`inet_twsk_deschedule_put`): the socket is being killed
    /// early, and its [`TW_ENDED`] follows.
    pub const TW_CANCELLED: u8 = 6;
    /// A timewait timer fired (`timer:timer_expire_entry`): the 2MSL (or FIN_WAIT2) expiry.
    /// Only `skaddr`.
    pub const TW_EXPIRED: u8 = 7;
    /// A connection ended: its whole life in one record of two slots, this one (the end
    /// transition, as a [`TRANSITION`] record has it) and a
    /// [`ConnectionTail`](super::connection::ConnectionTail) right after it. For an entry
    /// into TIME_WAIT, `aux` = the timewait socket armed for it on that CPU just before,
    /// as its [`TW_ARMED`] has it in `skaddr` (0: none, or recorded before tcptrace named
    /// it; userspace checks its 4-tuple).
    pub const CONNECTION: u8 = 8;
    /// The second slot of a [`CONNECTION`] record.
    pub const CONNECTION_TAIL: u8 = 9;
    /// What the kernel's counters say of a connection at its end
    /// ([`Details`](super::details::Details)): one slot written right before the end's own
    /// record (a [`TRANSITION`] into CLOSE or TIME_WAIT, or a [`CONNECTION`] record), in the
    /// same reservation.
    pub const DETAILS: u8 = 10;
    /// A timewait socket left the kernel's tables (an fentry program on `inet_twsk_kill`):
    /// its end, killed early if a [`TW_CANCELLED`] for it came first (from
    /// `inet_twsk_deschedule_put`), else expired (its timer's handler). `oldstate` = its
    /// substate then, with [`SUBSTATE_AT_END`](super::flag::SUBSTATE_AT_END). Only `skaddr`.
    pub const TW_ENDED: u8 = 11;
}

/// `aux` of a [`kind::RESET_SENT`] event on kernels whose tracepoint has no reason field.
pub const NO_REASON: u64 = u64::MAX;

/// Bits of [`Event::flags`].
pub mod flag {
    /// `pid`/`comm` name the socket's owner, learnt from a transition that the owner's own
    /// system call drove. Without this bit the process is unknown and `pid`/`comm` are zero.
    pub const OWNER_KNOWN: u8 = 1 << 0;
    /// The owner was inherited from the listening socket this socket was accepted from.
    pub const OWNER_FROM_LISTENER: u8 = 1 << 1;
    /// `in_from_ns` is known: the socket's previous transition was seen.
    pub const DURATION_KNOWN: u8 = 1 << 2;
    /// The socket belongs to an MPTCP connection (the meta socket, protocol 262).
    pub const MPTCP: u8 = 1 << 3;
    /// The socket received a reset earlier in its life (`tcp:tcp_receive_reset`): a
    /// FIN_WAIT2/CLOSING→CLOSE after it is the reset's doing, not an entry into TIME_WAIT.
    pub const RESET_RECEIVED: u8 = 1 << 4;
    /// On a timewait timer's cancel or expiry: `oldstate` is the timewait socket's substate
    /// then (FIN_WAIT2 or TIME_WAIT), read at that moment (a peer's FIN can move it to
    /// TIME_WAIT without a timer event). Without this bit (older recordings) it says nothing.
    pub const SUBSTATE_AT_END: u8 = 1 << 5;
    /// On a [`TW_ARMED`](super::kind::TW_ARMED) from `__inet_twsk_schedule`: the kernel
    /// re-armed the timer of a live timewait socket (its `rearm` argument), even within the
    /// same timer-wheel bucket, which no timer tracepoint shows. Without this bit (the timer
    /// tracepoints, older recordings) a re-arm is told from a cancel before the arming.
    pub const TW_REARM: u8 = 1 << 6;
}

/// One record in the ring buffer (and, unchanged, in a recording).
///
/// The layout is fixed (`#[repr(C)]`, explicit padding) and little-endian on the hosts
/// tcptrace supports; its size is checked at compile time below.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The kernel address of the socket: the key that ties a socket's events together.
    pub skaddr: u64,
    /// Nanoseconds spent in `oldstate` (valid when [`flag::DURATION_KNOWN`] is set).
    pub in_from_ns: u64,
    /// Kind-specific value (for [`kind::LOST`], the number of events lost).
    pub aux: u64,
    /// Local address, network order: IPv6, or IPv4 mapped (`::ffff:a.b.c.d`) whichever
    /// program wrote it (recordings of earlier versions may hold IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    /// Remote address, same encoding.
    pub daddr: [u8; 16],
    /// The owner's command name, NUL-padded (valid with [`flag::OWNER_KNOWN`]).
    pub comm: [u8; 16],
    /// The owner's process id (tgid).
    pub pid: u32,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// The state left, as the kernel reports it.
    pub oldstate: u8,
    /// The state entered, as the kernel reports it (see [`effective_new_state`]).
    pub newstate: u8,
    /// Bits of [`flag`].
    pub flags: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// The inode number of the socket's network namespace (as `stat -L /proc/PID/ns/net`
    /// shows it); 0 when unknown (no socket, or this kernel's layout is not known).
    pub netns: u32,
    /// Explicit padding; always zero.
    pub _pad2: u32,
    /// The id of the socket's cgroup in the cgroup2 hierarchy (the inode number of its
    /// directory there), taken from the socket itself, so it is right in softirq too;
    /// 0 when unknown (timewait sockets and resets without a socket have none).
    pub cgroup: u64,
}

/// The size of one [`Event`] in bytes.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
const _: () = assert!(EVENT_SIZE == 112);
/// The size of an [`Event`] before `netns` and `cgroup` were added (recordings of format 1):
/// the first 96 bytes of today's layout, unchanged.
pub const EVENT_SIZE_V1: usize = 96;
const _: () = assert!(core::mem::offset_of!(Event, netns) == EVENT_SIZE_V1);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

/// Field offsets of the `sock:inet_sock_set_state` tracepoint record, read from its
/// tracefs format file at start-up and handed to the program (nothing is assumed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SetStateOffsets {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Non-zero when every offset above is [`SetStateOffsets::KNOWN`]'s: the program then
    /// reads the record with plain loads at offsets compiled in, not through a helper call
    /// per field.
    pub known_layout: u16,
}

impl SetStateOffsets {
    /// The record's layout on every kernel from 4.16 (where the tracepoint appeared) to
    /// today; `known_layout` is 0 here and set by the loader when the format file matches.
    pub const KNOWN: SetStateOffsets = SetStateOffsets {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr_v6: 40,
        daddr_v6: 56,
        known_layout: 0,
    };

    /// Whether these offsets (parsed from a format file) are [`SetStateOffsets::KNOWN`]'s.
    pub fn is_known(&self) -> bool {
        SetStateOffsets {
            known_layout: 0,
            ..*self
        } == SetStateOffsets::KNOWN
    }
}

/// Field offsets of `tcp:tcp_send_reset` (its addresses are `sockaddr_in`/`sockaddr_in6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SendResetOffsets {
    pub skaddr: u16,
    pub state: u16,
    /// [`ABSENT`] on kernels before 6.10.
    pub reason: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub _pad: u16,
}

/// Field offsets of `tcp:tcp_receive_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReceiveResetOffsets {
    pub skaddr: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
}

/// Where the timewait socket's timer and fields are: tracepoint offsets of `timer:*` and
/// BTF offsets in `struct inet_timewait_sock`, resolved at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TimewaitOffsets {
    /// The address of `tw_timer_handler` (from `/proc/kallsyms`); 0 disables the programs.
    pub handler: u64,
    pub start_timer: u16,
    pub start_function: u16,
    pub start_expires: u16,
    pub start_now: u16,
    pub expire_timer: u16,
    pub expire_function: u16,
    pub cancel_timer: u16,
    /// `inet_timewait_sock.tw_timer`.
    pub tw_timer: u16,
    /// `inet_timewait_sock.tw_substate`.
    pub tw_substate: u16,
    /// `__tw_common.skc_family`, `skc_dport` (network order), `skc_num` (host order).
    pub skc_family: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    /// `__tw_common.skc_daddr` / `skc_rcv_saddr` (IPv4), `skc_v6_daddr` /
    /// `skc_v6_rcv_saddr` (IPv6).
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    /// `timer_list.function` and `timer_list.expires`, for the BTF tracepoints (which get
    /// the timer, not a record of its fields).
    pub timer_function: u16,
    pub timer_expires: u16,
    pub _pad: u32,
}

/// Where a socket's network namespace and cgroup are: offsets found in the kernel's BTF at
/// start-up ([`ABSENT`] for any the kernel does not have; the value is then reported as 0).
///
/// The chains read are `sock_common.skc_net.net → net.ns.inum` (full, timewait and request
/// sockets alike: each starts with a `sock_common`) and
/// `sock.sk_cgrp_data.cgroup → cgroup.kn → kernfs_node.id` (full sockets only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NsOffsets {
    /// `sock_common.skc_net.net`: the socket's `struct net *`.
    pub skc_net: u16,
    /// `net.ns.inum`: the namespace's inode number.
    pub net_inum: u16,
    /// `sock.sk_cgrp_data.cgroup`: the socket's `struct cgroup *` (cgroup2).
    pub sk_cgroup: u16,
    /// `cgroup.kn`: the cgroup's `struct kernfs_node *`.
    pub cgroup_kn: u16,
    /// `kernfs_node.id`: the cgroup id (its directory's inode number).
    pub kn_id: u16,
    pub _pad: u16,
}

impl NsOffsets {
    /// Nothing known: every namespace and cgroup is reported as 0.
    pub const UNKNOWN: NsOffsets = NsOffsets {
        skc_net: ABSENT,
        net_inum: ABSENT,
        sk_cgroup: ABSENT,
        cgroup_kn: ABSENT,
        kn_id: ABSENT,
        _pad: 0,
    };

    /// Whether network namespaces can be read.
    pub const fn netns_known(&self) -> bool {
        self.skc_net != ABSENT && self.net_inum != ABSENT
    }

    /// Whether cgroups can be read.
    pub const fn cgroup_known(&self) -> bool {
        self.sk_cgroup != ABSENT && self.cgroup_kn != ABSENT && self.kn_id != ABSENT
    }
}

impl Default for NsOffsets {
    fn default() -> Self {
        NsOffsets::UNKNOWN
    }
}

/// At most this many network namespaces are filtered in the kernel ([`Config::netns`]);
/// beyond, userspace filters them.
pub const MAX_KERNEL_NETNS: usize = 8;

/// An offset for a field this kernel's tracepoint does not have.
pub const ABSENT: u16 = u16::MAX;

/// Bits of [`Config::port_filters`]: which port sets are active.
pub mod port_filter {
    /// Keep only events whose local port is in the set (`--lport`).
    pub const LOCAL: u8 = 1 << 0;
    /// Keep only events whose remote port is in the set (`--rport`).
    pub const REMOTE: u8 = 1 << 1;
    /// Keep only events with either port in the set (`--port`).
    pub const ANY: u8 = 1 << 2;
}

/// Which program counts, in the kernel side's per-CPU counters (`LOST`, `FORGOTTEN`,
/// `UNSEEN`, `CAUGHT`), which userspace reads slot by slot. Each program has its own slot:
/// the kernel never runs a program inside itself on a CPU, so no two increments of one slot
/// interleave (one program interrupting another while it counts would otherwise lose an
/// increment, and the BPF target offers Rust no atomic add).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CounterSlot {
    Transition = 0,
    /// The BTF transition program's nested copy.
    Nested = 1,
    ResetSent = 2,
    ResetReceived = 3,
    TimerStart = 4,
    TimerCancel = 5,
    TimerExpire = 6,
    /// The BTF program on socket destruction. The last: [`COUNTER_SLOTS`] counts from it.
    Destroy = 7,
}

/// Slots of the per-CPU counters: one per [`CounterSlot`].
pub const COUNTER_SLOTS: u32 = CounterSlot::Destroy as u32 + 1;

/// What `cargo xtask bench` may switch off in the kernel side to show what it costs
/// ([`Config::bench`]); never set outside builds with the `test-knobs` feature.
pub mod bench {
    /// No socket gets socket-local storage, whichever program asks: every transition finds
    /// none (no durations, no owners, no connection records). What the storage and its use
    /// cost, for the bench's kernel time.
    pub const NO_STORAGE: u32 = 1 << 0;
}

/// The program's configuration, written by the loader into a read-only global before the
/// program is loaded, so the verifier sees it as constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    pub offsets: SetStateOffsets,
    pub send_reset: SendResetOffsets,
    pub receive_reset: ReceiveResetOffsets,
    /// Bits of [`bench`]: what the benchmark switches off to price it (0 but in builds with
    /// the `test-knobs` feature).
    pub bench: u32,
    pub timewait: TimewaitOffsets,
    /// Keep only this address family (0: both).
    pub family: u16,
    /// Bits of [`port_filter`]; the ports themselves are in the `PORTS` array, whose value
    /// for a port is the set of [`port_filter`] bits it belongs to.
    pub port_filters: u8,
    /// Keep MPTCP meta sockets (protocol 262) as well as TCP (non-zero: yes).
    pub mptcp: u8,
    /// Bit `1 << s` keeps transitions from or to state `s` (0: every state).
    pub state_mask: u32,
    /// Wake the reader when at least this many bytes are waiting (0: on every event).
    pub wakeup_bytes: u32,
    /// Non-zero: every program returns as soon as it is called, and nothing is traced. For
    /// the benchmark, which measures what attaching alone costs: the ceiling of every rate
    /// ratio on the host.
    pub idle: u32,
    /// Where sockets keep their network namespace and cgroup.
    pub ns: NsOffsets,
    /// How many of `netns` are set (0: every network namespace is kept).
    pub netns_count: u32,
    /// Keep only events of sockets in these network namespaces (inode numbers); the first
    /// `netns_count` are used.
    pub netns: [u32; MAX_KERNEL_NETNS],
    /// Where a socket and a packet keep what the tracepoints' records hold, for the BTF
    /// tracepoint programs, which get the kernel's objects rather than a record.
    pub sock: SockOffsets,
    /// Non-zero when the `tcp_send_reset` BTF tracepoint has its third argument, the
    /// kernel's `enum sk_rst_reason` (Linux 6.10 on).
    pub send_reset_reason: u32,
    /// Bits of [`records`]: what the programs write (0: transitions and resets, as always).
    pub records: u32,
    /// Where a TCP socket keeps its counters, for [`records::DETAILS`].
    pub tcp: details::TcpOffsets,
    /// Where tasks and files keep what the socket owners' iterator reads.
    pub owners: OwnersOffsets,
}

/// BTF offsets for the iterator over every task's open files, which tells which process
/// holds each socket (what `ss -p` reads from `/proc/*/fd`, a link at a time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct OwnersOffsets {
    /// Non-zero when the offsets below were found.
    pub known: u16,
    /// `task_struct.tgid` (an `int`).
    pub task_tgid: u16,
    /// `file.f_inode`.
    pub file_inode: u16,
    /// `inode.i_mode` (an `umode_t`).
    pub inode_mode: u16,
    /// `inode.i_ino` (an `unsigned long`).
    pub inode_ino: u16,
    /// `task_struct.comm` (`char[TASK_COMM_LEN]`, 16 bytes).
    pub task_comm: u16,
    pub _pad: [u16; 2],
}

const _: () = assert!(core::mem::size_of::<OwnersOffsets>() == 16);

/// One record of the socket owners' iterator: a socket file's inode and the process
/// holding it, named (so that userspace reads no `/proc/PID/comm`). An internal contract
/// between the iterator and its reader, built together.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketOwner {
    /// The socket file's inode number (as sock_diag gives it).
    pub inode: u32,
    /// The holding process (its tgid, in the initial pid namespace).
    pub pid: u32,
    /// The command of the task whose files held it (`task_struct.comm`: at most 15 bytes,
    /// NUL-padded), as [`Owner::comm`].
    pub comm: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<SocketOwner>() == 24);

/// Bits of [`Config::records`].
pub mod records {
    /// Also write a connection record ([`kind::CONNECTION`](super::kind::CONNECTION)) at the
    /// end of each connection (BTF programs only).
    pub const CONNECTIONS: u32 = 1 << 0;
    /// Write no transition records, and only the resets a connection record cannot hold
    /// (sent with no socket, or after the end): for views that only read connections.
    pub const NO_TRANSITIONS: u32 = 1 << 1;
    /// With [`NO_TRANSITIONS`], still write each connect's first transition
    /// (CLOSE→SYN_SENT): for views that count the local ports connections hold while open.
    pub const CONNECTS: u32 = 1 << 2;
    /// Write a [`Details`](super::details::Details) slot before each connection's end
    /// (BTF programs only, with [`Config::tcp`] known).
    pub const DETAILS: u32 = 1 << 3;
    /// With [`NO_TRANSITIONS`], leave the middle transitions that packets drive
    /// (SYN_SENT→ESTABLISHED, FIN_WAIT1→FIN_WAIT2) at the transition program's first check:
    /// no bookkeeping, no record. The socket's storage infers each from the transition after
    /// it (its state counts as entered; no time in either state is known): for views that read
    /// connections and show no time per state. See
    /// [`left_out`](super::connection::left_out).
    pub const NO_MIDDLE: u32 = 1 << 4;
    /// With [`NO_MIDDLE`], leave CLOSE_WAIT→LAST_ACK out too: a passive close's `close()`,
    /// which also tells its owner (the one learnt before stays: the listener's, for an
    /// accepted socket). For views that show no owner of such a close.
    pub const NO_PASSIVE_CLOSE: u32 = 1 << 5;
}

impl Config {
    /// Whether any kernel-side filter is set: family, states, ports or network namespaces.
    #[inline(always)]
    pub fn filters(&self) -> bool {
        self.family != 0 || self.state_mask != 0 || self.port_filters != 0 || self.netns_count != 0
    }
}

/// Where the kernel's objects keep what the tracepoints' records hold, as BTF offsets found at
/// start-up, for the BTF tracepoint programs (which get `struct sock *`, `struct sk_buff *`
/// and `struct timer_list *` arguments and read their fields with typed loads).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOffsets {
    /// Non-zero when every offset below was found (and the BTF programs may be used).
    pub known: u16,
    /// `sock.sk_protocol` (a `u16`, not a bit field, from Linux 5.6 on).
    pub sk_protocol: u16,
    /// `sock_common.skc_family`.
    pub skc_family: u16,
    /// `sock_common.skc_state`: the state of a full, timewait or request socket.
    pub skc_state: u16,
    /// `sock_common.skc_dport` (network order) and `skc_num` (host order).
    pub skc_dport: u16,
    pub skc_num: u16,
    /// `sock_common.skc_daddr` and `skc_rcv_saddr` (IPv4).
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    /// `sock_common.skc_v6_daddr` and `skc_v6_rcv_saddr` (IPv6).
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    /// `inet_sock.inet_saddr`: the record's IPv4 `saddr`. Past the end of `struct sock`, so
    /// read with one helper call of [`INET_SPAN_BYTES`] that also covers `inet_sport`.
    pub inet_saddr: u16,
    /// Where `inet_sock.inet_sport` (network order) sits in that span: the record's `sport`.
    /// Kept there at the end of a connection, when `skc_num` is already 0.
    pub inet_sport_in_span: u16,
    /// `sk_buff.head`, `network_header`, `transport_header`: the addresses of a reset sent
    /// with no socket (a refused connection) come from the segment it answers.
    pub skb_head: u16,
    pub skb_network_header: u16,
    pub skb_transport_header: u16,
    pub _pad: u16,
}

/// A listener: its network namespace (0 when unknown) and port — the key of the kernel
/// side's `LISTENERS` map. Two containers listening on the same port are two listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Entries the loader gives the `LISTENERS` map unless told otherwise: one per listening
/// port and network namespace.
pub const DEFAULT_LISTENERS: u32 = 16_384;

/// A socket's owner as the kernel side keeps it (in a socket's storage, or per listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Owner {
    /// The command name, NUL-padded (16 bytes).
    pub comm: [u64; 2],
    /// The process id (tgid).
    pub pid: u32,
    /// Bits of [`flag`] ([`flag::OWNER_KNOWN`], [`flag::OWNER_FROM_LISTENER`]).
    pub flags: u32,
}

/// How many bytes the BTF programs read at `inet_sock.inet_saddr` to get it and `inet_sport`.
pub const INET_SPAN_BYTES: u16 = 8;

/// The state the connection really enters, given the event's [`flag`]s.
///
/// The kernel never reports TIME_WAIT through `inet_sock_set_state`: when a connection
/// enters TIME_WAIT (or the FIN_WAIT2 timeout that uses the same mechanism), the full socket
/// goes FIN_WAIT2→CLOSE or CLOSING→CLOSE at the moment a separate timewait socket replaces
/// it. Those two transitions are therefore entries into TIME_WAIT — unless a reset arrived
/// first ([`flag::RESET_RECEIVED`]), which ends the connection without one.
#[inline(always)]
pub const fn effective_new_state(old: u8, new: u8, flags: u8) -> u8 {
    if new == state::CLOSE
        && (old == state::FIN_WAIT2 || old == state::CLOSING)
        && flags & flag::RESET_RECEIVED == 0
    {
        state::TIME_WAIT
    } else {
        new
    }
}

/// Whether the in-kernel filter keeps a transition.
///
/// `ports(p)` returns the [`port_filter`] bits of port `p` (0 if it is in no set). The same
/// function runs in the eBPF program (with a map lookup) and in userspace tests.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn filter_keeps(
    cfg: &Config,
    family: u16,
    old: u8,
    new: u8,
    flags: u8,
    lport: u16,
    rport: u16,
    ports: impl Fn(u16) -> u8,
) -> bool {
    if cfg.family != 0 && cfg.family != family {
        return false;
    }
    if cfg.state_mask != 0 {
        let new = effective_new_state(old, new, flags);
        let bits = bit(old) | bit(new);
        if cfg.state_mask & bits == 0 {
            return false;
        }
    }
    ports_keep(cfg, lport, rport, ports)
}

/// The port part of [`filter_keeps`], which is all that applies to resets.
#[inline(always)]
pub fn ports_keep(cfg: &Config, lport: u16, rport: u16, ports: impl Fn(u16) -> u8) -> bool {
    let f = cfg.port_filters;
    if f == 0 {
        return true;
    }
    let l = ports(lport);
    let r = if rport == lport { l } else { ports(rport) };
    if f & port_filter::LOCAL != 0 && l & port_filter::LOCAL == 0 {
        return false;
    }
    if f & port_filter::REMOTE != 0 && r & port_filter::REMOTE == 0 {
        return false;
    }
    if f & port_filter::ANY != 0 && (l | r) & port_filter::ANY == 0 {
        return false;
    }
    true
}

/// Whether the family and port filters may keep any event of a socket, given what is known
/// of it now: a port of 0 is not known yet (a connecting socket's local port before it is
/// chosen) and could be any. A socket they cannot keep needs no per-socket state: its ports
/// and family never change to ones they keep.
#[inline(always)]
pub fn socket_may_be_kept(
    cfg: &Config,
    family: u16,
    lport: u16,
    rport: u16,
    ports: impl Fn(u16) -> u8,
) -> bool {
    (cfg.family == 0 || cfg.family == family)
        && ports_keep(
            cfg,
            lport,
            rport,
            |p| if p == 0 { u8::MAX } else { ports(p) },
        )
}

#[inline(always)]
const fn bit(s: u8) -> u32 {
    if s < 32 { 1u32 << s } else { 0 }
}

/// Whether the in-kernel network-namespace filter keeps an event of a socket in namespace
/// `netns` (0: unknown, which matches no filter).
#[inline(always)]
pub fn netns_keeps(cfg: &Config, netns: u32) -> bool {
    let n = cfg.netns_count as usize;
    if n == 0 {
        return true;
    }
    let mut i = 0;
    // A fixed bound the verifier can see through.
    while i < MAX_KERNEL_NETNS {
        if i < n && cfg.netns[i] == netns && netns != 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether a transition is driven by a system call of the socket's owner, so that the task
/// running when it is reported is the owner. Every other transition is driven by a packet or
/// a timer and reports whatever task happened to be on the CPU (the idle task, a ksoftirqd
/// thread, or — on loopback and veth — the peer's process).
///
/// - CLOSE→SYN_SENT: `connect()`
/// - CLOSE→LISTEN, LISTEN→CLOSE: `listen()`, `close()` of a listener
/// - ESTABLISHED→FIN_WAIT1, CLOSE_WAIT→LAST_ACK: `close()` or `shutdown()`
#[inline(always)]
pub const fn driven_by_owner(old: u8, new: u8) -> bool {
    use state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT)
            | (CLOSE, LISTEN)
            | (LISTEN, CLOSE)
            | (ESTABLISHED, FIN_WAIT1)
            | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Whether the task running a transition becomes the socket's owner: its own system call
/// drives the transition ([`driven_by_owner`]) and `owner_flags` (the socket's owner so far)
/// name no process that drove one before. The first such process keeps the socket: whoever
/// drops a descriptor's last reference runs its `close()`, and that may be a child that
/// inherited it by `fork()` — a child that execs (closing its copies of `O_CLOEXEC`
/// descriptors) or exits after its parent closed. An owner only inherited from the listener
/// gives way to the process that closes the accepted socket (a worker of a shared listener).
#[inline(always)]
pub const fn takes_owner(old: u8, new: u8, owner_flags: u32) -> bool {
    let known = owner_flags & flag::OWNER_KNOWN as u32 != 0;
    let inherited = owner_flags & flag::OWNER_FROM_LISTENER as u32 != 0;
    driven_by_owner(old, new) && (!known || inherited)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of them are #[repr(C)] with explicit padding and only integer fields
    // (bytemuck's Pod derive checks this at compile time).
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SetStateOffsets {}
    unsafe impl aya::Pod for super::SendResetOffsets {}
    unsafe impl aya::Pod for super::ReceiveResetOffsets {}
    unsafe impl aya::Pod for super::TimewaitOffsets {}
    unsafe impl aya::Pod for super::NsOffsets {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::connection::ConnectionTail {}
    unsafe impl aya::Pod for super::details::Details {}
    unsafe impl aya::Pod for super::details::TcpOffsets {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::Owner {}
}

#[cfg(test)]
mod tests {
    use super::{state::*, *};

    #[test]
    fn any_filter_is_seen() {
        assert!(!Config::default().filters());
        let each: [fn(&mut Config); 4] = [
            |c| c.family = AF_INET6,
            |c| c.state_mask = 1 << TIME_WAIT,
            |c| c.port_filters = port_filter::ANY,
            |c| c.netns_count = 1,
        ];
        for set in each {
            let mut c = Config::default();
            set(&mut c);
            assert!(c.filters(), "{c:?}");
            // What filters() stands for: something filter_keeps or netns_keeps can drop.
            let kept = filter_keeps(&c, AF_INET, ESTABLISHED, FIN_WAIT1, 0, 1, 2, |_| 0)
                && netns_keeps(&c, 7);
            assert!(!kept, "{c:?}");
        }
    }

    #[test]
    fn states_by_number_and_by_name() {
        for st in TcpState::ALL {
            assert_eq!(TcpState::from_kernel(st as u8), Some(st));
            assert_eq!(TcpState::from_name(st.name()), Some(st));
        }
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(MAX + 1), None);
        assert_eq!(TcpState::from_name("time-wait"), Some(TcpState::TimeWait));
        assert_eq!(
            TcpState::from_name(" tcp_close_wait"),
            Some(TcpState::CloseWait)
        );
        assert_eq!(TcpState::from_name("closed"), Some(TcpState::Close));
        assert_eq!(TcpState::from_name("TIME_WIAT"), None);
        assert_eq!(TcpState::from_name("TCP_"), None);
    }

    #[test]
    fn only_system_call_transitions_name_the_owner() {
        let driven = [
            (CLOSE, SYN_SENT),
            (CLOSE, LISTEN),
            (LISTEN, CLOSE),
            (ESTABLISHED, FIN_WAIT1),
            (CLOSE_WAIT, LAST_ACK),
        ];
        for old in 1..=MAX {
            for new in 1..=MAX {
                assert_eq!(driven_by_owner(old, new), driven.contains(&(old, new)));
            }
        }
    }

    #[test]
    fn the_first_process_to_drive_a_transition_keeps_the_socket() {
        let (known, inherited) = (flag::OWNER_KNOWN as u32, flag::OWNER_FROM_LISTENER as u32);
        for old in 1..=MAX {
            for new in 1..=MAX {
                let driven = driven_by_owner(old, new);
                assert_eq!(takes_owner(old, new, 0), driven, "{old}->{new}: none known");
                assert_eq!(
                    takes_owner(old, new, known | inherited),
                    driven,
                    "{old}->{new}: only the listener's"
                );
                assert!(!takes_owner(old, new, known), "{old}->{new}: its own known");
            }
        }
    }

    #[test]
    fn only_fin_wait2_and_closing_to_close_enter_time_wait() {
        for old in 1..=MAX {
            for new in 1..=MAX {
                let tw = effective_new_state(old, new, 0) == TIME_WAIT;
                assert_eq!(
                    effective_new_state(old, new, flag::RESET_RECEIVED) == TIME_WAIT,
                    new == TIME_WAIT
                );
                let expected =
                    new == TIME_WAIT || (new == CLOSE && (old == FIN_WAIT2 || old == CLOSING));
                assert_eq!(tw, expected, "{old}->{new}");
            }
        }
    }

    #[test]
    fn netns_filter_keeps_only_the_listed_known_namespaces() {
        let mut cfg = Config::default();
        assert!(netns_keeps(&cfg, 0), "no filter keeps even the unknown");
        assert!(netns_keeps(&cfg, 4026531840));
        cfg.netns_count = 2;
        cfg.netns[0] = 4026531840;
        cfg.netns[1] = 4026532000;
        // A stale third entry beyond the count is ignored.
        cfg.netns[2] = 4026532999;
        assert!(netns_keeps(&cfg, 4026531840));
        assert!(netns_keeps(&cfg, 4026532000));
        assert!(!netns_keeps(&cfg, 4026532999));
        assert!(
            !netns_keeps(&cfg, 0),
            "an unknown namespace matches no filter"
        );
        cfg.netns_count = MAX_KERNEL_NETNS as u32 + 5;
        assert!(
            netns_keeps(&cfg, 4026532999),
            "the count is bounded by the array"
        );
    }

    #[test]
    fn a_socket_is_ruled_out_only_by_what_is_known_of_it() {
        let ports = |p: u16| match p {
            80 => port_filter::ANY | port_filter::LOCAL,
            _ => 0,
        };
        let any = Config {
            port_filters: port_filter::ANY,
            ..Config::default()
        };
        // A connect to port 80, its local port not chosen yet; then chosen.
        assert!(socket_may_be_kept(&any, AF_INET, 0, 80, ports));
        assert!(socket_may_be_kept(&any, AF_INET, 40000, 80, ports));
        // A connect elsewhere: its local port could still be 80 until it is chosen.
        assert!(socket_may_be_kept(&any, AF_INET, 0, 443, ports));
        assert!(!socket_may_be_kept(&any, AF_INET, 40000, 443, ports));
        let local = Config {
            port_filters: port_filter::LOCAL,
            family: AF_INET6,
            ..Config::default()
        };
        assert!(!socket_may_be_kept(&local, AF_INET, 80, 1, ports), "family");
        assert!(socket_may_be_kept(&local, AF_INET6, 80, 1, ports));
        assert!(!socket_may_be_kept(&local, AF_INET6, 81, 80, ports));
        // What may be kept is a superset of what is kept, whatever the ports.
        for (l, r) in [(0, 0), (80, 0), (0, 80), (80, 80), (1, 2), (80, 2), (2, 80)] {
            for cfg in [&any, &local] {
                if filter_keeps(cfg, AF_INET6, 1, 4, 0, l, r, ports) {
                    assert!(socket_may_be_kept(cfg, AF_INET6, l, r, ports), "{l} {r}");
                }
            }
        }
        assert!(socket_may_be_kept(&Config::default(), AF_INET, 1, 2, ports));
    }

    #[test]
    fn port_filters_combine_with_and() {
        let cfg = Config {
            port_filters: port_filter::LOCAL | port_filter::REMOTE,
            ..Config::default()
        };
        let ports = |p: u16| match p {
            80 => port_filter::LOCAL,
            9000 => port_filter::REMOTE,
            _ => 0,
        };
        assert!(filter_keeps(&cfg, AF_INET, 1, 4, 0, 80, 9000, ports));
        assert!(!filter_keeps(&cfg, AF_INET, 1, 4, 0, 80, 9001, ports));
        assert!(!filter_keeps(&cfg, AF_INET, 1, 4, 0, 9000, 80, ports));
    }
}
