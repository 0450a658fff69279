//! tcptrace's kernel side: programs on TCP's transitions (`inet_sock_set_state`), its resets
//! (`tcp_send_reset`, `tcp_receive_reset`) and timewait sockets' timers (`timer_start`,
//! `timer_cancel`, `timer_expire_entry`).
//!
//! Two sets, never attached together: the BTF tracepoint programs ([`btf`]), which keep what
//! is known of each socket in the socket itself, wherever the kernel allows them; and, as
//! the fallback for older kernels, the classic tracepoint programs here, which read the
//! tracepoints' records and keep each socket's facts in a bounded LRU map. Either way, for
//! every TCP transition the program keeps the time of the socket's last transition and the
//! owner learnt from a system call it drove, applies the loader's filters, and writes one
//! [`Event`] into the `EVENTS` ring buffer. Wake-ups are batched: the reader is woken only
//! once `wakeup_bytes` are waiting, and drains on its own tick otherwise.
#![no_std]
#![no_main]

mod btf;

use core::{
    ffi::c_void,
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_comm, bpf_probe_read_kernel},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, Config, Event, IPPROTO_MPTCP, IPPROTO_TCP, ListenKey,
    MAX_KERNEL_NETNS, NO_REASON, NsOffsets, Owner, ReceiveResetOffsets, SendResetOffsets,
    SetStateOffsets, SockOffsets, TimewaitOffsets,
    connection::{ConnectionRecord, STATES_LEFT, SockLife},
    details::TcpOffsets,
    driven_by_owner, filter_keeps, flag, kind, netns_keeps, state,
};

/// Written by the loader before the program is loaded (read-only for the program).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: SetStateOffsets {
        skaddr: 0,
        oldstate: 0,
        newstate: 0,
        sport: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        known_layout: 0,
    },
    send_reset: SendResetOffsets {
        skaddr: 0,
        state: 0,
        reason: 0,
        saddr: 0,
        daddr: 0,
        _pad: 0,
    },
    receive_reset: ReceiveResetOffsets {
        skaddr: 0,
        sport: 0,
        dport: 0,
        family: 0,
        saddr_v6: 0,
        daddr_v6: 0,
    },
    _pad0: 0,
    timewait: TimewaitOffsets {
        handler: 0,
        start_timer: 0,
        start_function: 0,
        start_expires: 0,
        start_now: 0,
        expire_timer: 0,
        expire_function: 0,
        cancel_timer: 0,
        tw_timer: 0,
        tw_substate: 0,
        skc_family: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        timer_function: 0,
        timer_expires: 0,
        _pad: 0,
    },
    family: 0,
    port_filters: 0,
    mptcp: 0,
    state_mask: 0,
    wakeup_bytes: 0,
    idle: 0,
    ns: NsOffsets::UNKNOWN,
    netns_count: 0,
    netns: [0; MAX_KERNEL_NETNS],
    sock: SockOffsets {
        known: 0,
        sk_protocol: 0,
        skc_family: 0,
        skc_dport: 0,
        skc_daddr: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        skc_state: 0,
        skc_num: 0,
        skc_rcv_saddr: 0,
        inet_saddr: 0,
        inet_sport_in_span: 0,
        skb_head: 0,
        skb_network_header: 0,
        skb_transport_header: 0,
        _pad: 0,
    },
    send_reset_reason: 0,
    records: 0,
    tcp: TcpOffsets::UNKNOWN,
};

/// Transitions for userspace. The loader sizes it (`map_max_entries`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events that found the ring buffer full, per CPU. Loss is never silent.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Port filter sets: port → bits of `tcptrace_common::port_filter`. An array, not a hash:
/// the kernel inlines its lookup (an index), and 64 KiB covers every port.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// What is known of each live socket, keyed by its kernel address: the classic programs'
/// store (the BTF ones keep it in the socket). LRU-bounded, sized by the loader: a socket
/// evicted here only loses its duration and owner, never its events.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// The owner of each listening port, so accepted sockets (created in softirq, where the
/// current task is arbitrary) can name the process that listens for them. Sized by the
/// loader; a listener that finds it full is counted in [`FORGOTTEN`].
#[map]
static LISTENERS: HashMap<ListenKey, Owner> = HashMap::with_max_entries(4096, 0);

/// Per CPU: facts the kernel side could not keep (a listener that found [`LISTENERS`] full,
/// a socket whose storage the kernel could not allocate). Never silent: userspace shows it.
#[map]
static FORGOTTEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Slots of the per-CPU counters: one per [`Slot`].
const COUNTER_SLOTS: u32 = Slot::Destroy as u32 + 1;

/// Counts one fact not kept, in the counting program's slot.
#[inline(always)]
fn forgot(slot: Slot) {
    count(&FORGOTTEN, slot);
}

/// Which program counts. Each has its own slot in the per-CPU counters: the kernel never
/// runs a program inside itself on a CPU, so no two increments of one slot interleave (one
/// program interrupting another while it counts would otherwise lose an increment, and the
/// BPF target offers Rust no atomic add).
#[derive(Clone, Copy)]
#[repr(u32)]
enum Slot {
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

/// Adds one to `slot` of a per-CPU counter (userspace sums every slot of every CPU).
#[inline(always)]
fn count(counter: &PerCpuArray<u64>, slot: Slot) {
    if let Some(n) = counter.get_ptr_mut(slot as u32) {
        // SAFETY: a valid per-CPU slot that only this program writes on this CPU.
        unsafe { put(n, *n + 1) };
    }
}

// The BPF backend has no memset/memmove: LLVM turns adjacent stores and struct copies into
// those built-ins unless every access is a separate volatile scalar access.
#[inline(always)]
unsafe fn put<T>(dst: *mut T, v: T) {
    unsafe { dst.write_volatile(v) }
}

#[inline(always)]
unsafe fn copy_owner(dst: *mut Owner, src: *const Owner) {
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), (*src).comm[0]);
        put(addr_of_mut!((*dst).comm[1]), (*src).comm[1]);
        put(addr_of_mut!((*dst).pid), (*src).pid);
        put(addr_of_mut!((*dst).flags), (*src).flags);
    }
}

/// Bytes 8 to 15 of an IPv4-mapped IPv6 address whose IPv4 address is 0.0.0.0, as a
/// little-endian `u64`: `ff ff` at bytes 10 and 11. OR the IPv4 address, shifted up 32 bits.
const V4_MAPPED_HIGH: u64 = 0xffff_0000;

/// Zeroes 16 bytes at an 8-byte aligned address.
#[inline(always)]
unsafe fn zero16(dst: *mut [u8; 16]) {
    unsafe {
        put(dst.cast::<u64>(), 0);
        put(dst.cast::<u64>().add(1), 0);
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SockInfo {
    last_ts: u64,
    owner: Owner,
    /// `flag::RESET_RECEIVED` once a reset arrived for the socket.
    flags: u32,
    /// The socket's network namespace inode, read once (0: not read yet, or unknown).
    netns: u32,
    /// The socket's cgroup id, read with `netns` (a socket keeps both for life).
    cgroup: u64,
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Err(err) = try_set_state(&ctx) {
        // Only a wrong offset or a kernel that changed the record gets here: say so through
        // aya-log rather than dropping transitions silently.
        error!(
            &ctx,
            "tcptrace: reading sock:inet_sock_set_state failed: {}", err
        );
    }
    0
}

/// Whether the loader asked for idle programs (`Config::idle`, the benchmark's floor). The
/// verifier reads the frozen configuration and drops the branch that is not taken.
#[inline(always)]
fn idle() -> bool {
    // SAFETY: as in try_set_state.
    unsafe { read_volatile(&CONFIG.idle) != 0 }
}

/// The record's layout on every kernel tcptrace knows, used when the loader found it.
const K: SetStateOffsets = SetStateOffsets::KNOWN;

/// A field of the tracepoint record at an offset known when compiling: one load, which the
/// verifier checks (the record is the program's context), instead of a helper call.
#[inline(always)]
fn load<T: Copy>(ctx: &TracePointContext, off: impl Into<usize>) -> T {
    // SAFETY: `off` is a constant inside the record, aligned for T (checked by the verifier).
    unsafe { read_volatile(ctx.as_ptr_const().add(off.into()).cast::<T>()) }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i32> {
    // SAFETY: the offset comes from the tracepoint's own format file; the helper checks the
    // read and fails cleanly if it is wrong.
    unsafe { ctx.read_at::<T>(off as usize) }
}

/// The current task as an owner: only called for transitions its own system call drives.
///
/// # Safety
/// `dst` must be writable.
#[inline(always)]
unsafe fn current_owner(dst: *mut Owner) {
    // SAFETY: see above; the helper writes 16 bytes into `comm`.
    unsafe {
        bpf_get_current_comm(addr_of_mut!((*dst).comm).cast::<c_void>(), 16);
        put(
            addr_of_mut!((*dst).pid),
            (bpf_get_current_pid_tgid() >> 32) as u32,
        );
        put(addr_of_mut!((*dst).flags), flag::OWNER_KNOWN as u32);
    }
}

/// No owner known.
///
/// # Safety
/// `dst` must be writable.
#[inline(always)]
unsafe fn clear_owner(dst: *mut Owner) {
    // SAFETY: see above.
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), 0);
        put(addr_of_mut!((*dst).comm[1]), 0);
        put(addr_of_mut!((*dst).pid), 0);
        put(addr_of_mut!((*dst).flags), 0);
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: CONFIG is a plain value the loader fills in; volatile keeps the compiler from
    // folding the zeros above into the code.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let o = cfg.offsets;
    if o.known_layout != 0 {
        let (v6, d6) = (K.saddr_v6 as usize, K.daddr_v6 as usize);
        let f = Fields {
            protocol: load(ctx, K.protocol),
            family: load(ctx, K.family),
            old: load::<i32>(ctx, K.oldstate) as u8,
            new: load::<i32>(ctx, K.newstate) as u8,
            skaddr: load(ctx, K.skaddr),
            sport: load(ctx, K.sport),
            dport: load(ctx, K.dport),
        };
        let addrs = Addrs::Loaded {
            saddr: [load(ctx, v6), load(ctx, v6 + 8)],
            daddr: [load(ctx, d6), load(ctx, d6 + 8)],
        };
        return on_transition(&cfg, &f, &addrs);
    }
    let f = Fields {
        protocol: read(ctx, o.protocol)?,
        family: read(ctx, o.family)?,
        old: read::<i32>(ctx, o.oldstate)? as u8,
        new: read::<i32>(ctx, o.newstate)? as u8,
        skaddr: read(ctx, o.skaddr)?,
        sport: read(ctx, o.sport)?,
        dport: read(ctx, o.dport)?,
    };
    let addrs = Addrs::Read {
        saddr: ctx.as_ptr_const().wrapping_add(o.saddr_v6 as usize),
        daddr: ctx.as_ptr_const().wrapping_add(o.daddr_v6 as usize),
        len: 16,
    };
    on_transition(&cfg, &f, &addrs)
}

/// The fields of one `inet_sock_set_state` transition.
#[derive(Clone, Copy)]
struct Fields {
    protocol: u16,
    family: u16,
    old: u8,
    new: u8,
    skaddr: u64,
    sport: u16,
    dport: u16,
}

/// One transition, wherever its fields came from: the per-socket bookkeeping, the filters,
/// and the event.
#[inline(always)]
fn on_transition(cfg: &Config, f: &Fields, addrs: &Addrs) -> Result<(), i32> {
    let Fields {
        protocol,
        family,
        old,
        new,
        skaddr,
        sport,
        dport,
    } = *f;
    let mptcp = protocol == IPPROTO_MPTCP;
    if protocol != IPPROTO_TCP && !(mptcp && cfg.mptcp != 0) {
        return Ok(());
    }
    if cfg.family != 0 && cfg.family != family {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };

    // Per-socket bookkeeping happens before filtering, so durations stay right for sockets
    // whose earlier transitions were filtered out (an lport filter drops connect()'s
    // CLOSE→SYN_SENT, which has no local port yet).
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    // Filled on every path below before it is read.
    let owner_ptr = owner.as_mut_ptr();
    let mut flags: u8 = if mptcp { flag::MPTCP } else { 0 };
    let mut in_from: u64 = 0;
    let driven = driven_by_owner(old, new);
    // A socket's first transition: whatever the map holds for this address belongs to an
    // earlier socket the slab gave the same memory (its end was skipped or filtered): start
    // afresh rather than inherit its owner and times.
    let birth = (old == state::CLOSE && (new == state::SYN_SENT || new == state::LISTEN))
        || (old == state::LISTEN && new == state::SYN_RECV);
    let known = if birth {
        None
    } else {
        SOCKS.get_ptr_mut(skaddr)
    };
    // The namespace and cgroup, once read, stay in the socket's map entry: five kernel
    // reads per socket instead of per transition.
    let (mut netns, mut cgroup) = (0u32, 0u64);
    // The socket's entry when it stays in the map, to keep them in.
    let mut slot: *mut SockInfo = core::ptr::null_mut();
    let mut insert = false;
    match known {
        Some(info) => unsafe {
            // last_ts is 0 for a socket first met through a reset it received.
            if (*info).last_ts != 0 {
                in_from = now.wrapping_sub((*info).last_ts);
                flags |= flag::DURATION_KNOWN;
            }
            if driven {
                current_owner(addr_of_mut!((*info).owner));
            }
            (*info).last_ts = now;
            flags |= (*info).flags as u8;
            copy_owner(owner_ptr, addr_of_mut!((*info).owner));
            netns = (*info).netns;
            cgroup = (*info).cgroup;
            // Its end: a closed socket, or one that a timewait socket replaces (the full
            // socket is freed right after; nothing more is logged for this address).
            if new == state::CLOSE || new == state::TIME_WAIT {
                let _ = SOCKS.remove(skaddr);
            } else {
                slot = info;
            }
        },
        None => unsafe {
            if driven {
                current_owner(owner_ptr);
            } else if old == state::LISTEN && new == state::SYN_RECV {
                // The child is in its listener's namespace: read it now, for the key.
                netns = sock_netns(&cfg.ns, skaddr);
                match LISTENERS.get_ptr(&listen_key(netns, sport)) {
                    Some(l) => {
                        copy_owner(owner_ptr, l);
                        put(
                            addr_of_mut!((*owner_ptr).flags),
                            (*l).flags | flag::OWNER_FROM_LISTENER as u32,
                        );
                    }
                    None => clear_owner(owner_ptr),
                }
            } else {
                clear_owner(owner_ptr);
            }
            insert = new != state::CLOSE && new != state::TIME_WAIT;
        },
    }
    let keep = filter_keeps(&cfg, family, old, new, flags, sport, dport, port_bits);
    let listener_change = (old == state::CLOSE && new == state::LISTEN)
        || (old == state::LISTEN && new == state::CLOSE);
    // Read only for what is kept (two reads for the namespace, three for the cgroup), and
    // the namespace of a listener coming or going, for its key.
    let read_now = keep && cgroup == 0;
    if (read_now || listener_change) && netns == 0 {
        netns = sock_netns(&cfg.ns, skaddr);
    }
    if read_now {
        cgroup = sock_cgroup(&cfg.ns, skaddr);
    }
    if insert {
        let mut info = core::mem::MaybeUninit::<SockInfo>::uninit();
        let i = info.as_mut_ptr();
        unsafe {
            put(addr_of_mut!((*i).last_ts), now);
            put(addr_of_mut!((*i).flags), 0);
            put(addr_of_mut!((*i).netns), netns);
            put(addr_of_mut!((*i).cgroup), cgroup);
            copy_owner(addr_of_mut!((*i).owner), owner_ptr);
            let _ = SOCKS.insert(skaddr, &*i, 0);
        }
    } else if read_now && !slot.is_null() {
        // SAFETY: the entry found above, still in the map.
        unsafe {
            put(addr_of_mut!((*slot).netns), netns);
            put(addr_of_mut!((*slot).cgroup), cgroup);
        }
    }
    if old == state::CLOSE && new == state::LISTEN {
        // SAFETY: every path above initialised the owner.
        if LISTENERS
            .insert(&listen_key(netns, sport), unsafe { &*owner_ptr }, 0)
            .is_err()
        {
            forgot(Slot::Transition);
        }
    } else if old == state::LISTEN && new == state::CLOSE {
        let _ = LISTENERS.remove(&listen_key(netns, sport));
    }

    if !keep || !netns_keeps(&cfg, netns) {
        return Ok(());
    }
    let rec = Record {
        ts: now,
        skaddr,
        in_from,
        aux: 0,
        sport,
        dport,
        family,
        kind: kind::TRANSITION,
        old,
        new,
        flags,
        netns,
        cgroup,
    };
    emit(Slot::Transition, cfg.wakeup_bytes, &rec, addrs, owner_ptr);
    Ok(())
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_send_reset(&ctx);
    0
}

/// A reset this host sends: by a socket (an abort, a reset in answer to a bad segment) or, with
/// no socket, in answer to a segment for a port nothing listens on (a refused connection).
fn try_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: as in try_set_state.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let o = cfg.send_reset;
    let skaddr: u64 = read(ctx, o.skaddr)?;
    let st = read::<i32>(ctx, o.state)? as u8;
    let reason = if o.reason == ABSENT {
        NO_REASON
    } else {
        u64::from(read::<u32>(ctx, o.reason)?)
    };
    // sockaddr_in / sockaddr_in6: family at 0, port (network order) at 2, the IPv4 address at
    // 4, the IPv6 address at 8. The kernel stores the local side in saddr.
    let family: u16 = read(ctx, o.saddr)?;
    let (addr_at, len) = match family {
        AF_INET => (4usize, 4u32),
        AF_INET6 => (8usize, 16u32),
        _ => return Ok(()),
    };
    let sport = u16::from_be(read(ctx, o.saddr + 2)?);
    let dport = u16::from_be(read(ctx, o.daddr + 2)?);
    reset(
        &cfg,
        kind::RESET_SENT,
        skaddr,
        st,
        reason,
        family,
        sport,
        dport,
        &Addrs::Read {
            saddr: ctx.as_ptr_const().wrapping_add(o.saddr as usize + addr_at),
            daddr: ctx.as_ptr_const().wrapping_add(o.daddr as usize + addr_at),
            len,
        },
    )
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_receive_reset(&ctx);
    0
}

/// A reset that arrived for one of this host's sockets.
fn try_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: as in try_set_state.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let o = cfg.receive_reset;
    let skaddr: u64 = read(ctx, o.skaddr)?;
    let family: u16 = read(ctx, o.family)?;
    let sport: u16 = read(ctx, o.sport)?;
    let dport: u16 = read(ctx, o.dport)?;
    // The socket's state is not in this record; the per-socket map does not keep it either,
    // so userspace takes it from the socket's transitions.
    reset(
        &cfg,
        kind::RESET_RECEIVED,
        skaddr,
        0,
        0,
        family,
        sport,
        dport,
        &Addrs::Read {
            saddr: ctx.as_ptr_const().wrapping_add(o.saddr_v6 as usize),
            daddr: ctx.as_ptr_const().wrapping_add(o.daddr_v6 as usize),
            len: 16,
        },
    )
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn reset(
    cfg: &Config,
    k: u8,
    skaddr: u64,
    st: u8,
    reason: u64,
    family: u16,
    sport: u16,
    dport: u16,
    addrs: &Addrs,
) -> Result<(), i32> {
    if cfg.family != 0 && cfg.family != family {
        return Ok(());
    }
    // A reset counts as being in the socket's state for the state filter (a received reset's
    // state is unknown, so it never matches one).
    if !filter_keeps(cfg, family, st, st, 0, sport, dport, port_bits) {
        return Ok(());
    }
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    let owner_ptr = owner.as_mut_ptr();
    let (mut netns, mut cgroup) = (0u32, 0u64);
    match SOCKS.get_ptr_mut(skaddr) {
        Some(info) => unsafe {
            if k == kind::RESET_RECEIVED {
                (*info).flags |= flag::RESET_RECEIVED as u32;
            }
            copy_owner(owner_ptr, addr_of_mut!((*info).owner));
            netns = (*info).netns;
            cgroup = (*info).cgroup;
        },
        None => {
            // SAFETY: a local.
            unsafe { clear_owner(owner_ptr) };
            if k == kind::RESET_RECEIVED {
                // Remember the reset even for a socket not met before, so its coming
                // FIN_WAIT2/CLOSING→CLOSE is not taken for an entry into TIME_WAIT.
                let mut info = core::mem::MaybeUninit::<SockInfo>::uninit();
                let i = info.as_mut_ptr();
                unsafe {
                    put(addr_of_mut!((*i).last_ts), 0);
                    put(addr_of_mut!((*i).flags), flag::RESET_RECEIVED as u32);
                    put(addr_of_mut!((*i).netns), 0);
                    put(addr_of_mut!((*i).cgroup), 0);
                    copy_owner(addr_of_mut!((*i).owner), owner_ptr);
                    let _ = SOCKS.insert(skaddr, &*i, 0);
                }
            }
        }
    }
    // Not known from the socket's entry: read. A sent reset's socket may be a timewait or
    // request socket: both start with a sock_common (the namespace is there), neither has
    // a cgroup. No socket: neither.
    if netns == 0 {
        netns = sock_netns(&cfg.ns, skaddr);
        cgroup = if st == state::TIME_WAIT || st == state::NEW_SYN_RECV {
            0
        } else {
            sock_cgroup(&cfg.ns, skaddr)
        };
    }
    if !netns_keeps(cfg, netns) {
        return Ok(());
    }
    let rec = reset_record(
        k,
        skaddr,
        reason,
        (family, sport, dport),
        st,
        (netns, cgroup),
    );
    let slot = if k == kind::RESET_SENT {
        Slot::ResetSent
    } else {
        Slot::ResetReceived
    };
    emit(slot, cfg.wakeup_bytes, &rec, addrs, owner_ptr);
    Ok(())
}

/// The record of a reset of kind `k` on the socket at `skaddr` (0: none) in state `st` (0:
/// not reported), now.
#[inline(always)]
fn reset_record(
    k: u8,
    skaddr: u64,
    aux: u64,
    (family, sport, dport): (u16, u16, u16),
    st: u8,
    (netns, cgroup): (u32, u64),
) -> Record {
    Record {
        // SAFETY: a helper without arguments.
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr,
        in_from: 0,
        aux,
        sport,
        dport,
        family,
        kind: k,
        old: st,
        new: st,
        flags: 0,
        netns,
        cgroup,
    }
}

/// Reads a field of kernel memory at `base + off`.
#[inline(always)]
fn kread<T>(base: u64, off: u16) -> Result<T, i32> {
    // SAFETY: the helper checks the read and fails cleanly on a bad address.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// The key of the listener on `port` in namespace `netns`.
#[inline(always)]
fn listen_key(netns: u32, port: u16) -> ListenKey {
    ListenKey {
        netns,
        port,
        _pad: 0,
    }
}

/// The inode number of the network namespace of the socket at `sk` (a full, timewait or
/// request socket: all start with a `sock_common`); 0 when unknown.
#[inline(always)]
fn sock_netns(o: &NsOffsets, sk: u64) -> u32 {
    if sk == 0 || o.skc_net == ABSENT || o.net_inum == ABSENT {
        return 0;
    }
    match kread::<u64>(sk, o.skc_net) {
        Ok(net) if net != 0 => kread::<u32>(net, o.net_inum).unwrap_or(0),
        _ => 0,
    }
}

/// The cgroup2 id of the full socket at `sk` (set when it was created, from the creating
/// task; an accepted socket has its listener's); 0 when unknown.
#[inline(always)]
fn sock_cgroup(o: &NsOffsets, sk: u64) -> u64 {
    if sk == 0 || o.sk_cgroup == ABSENT || o.cgroup_kn == ABSENT || o.kn_id == ABSENT {
        return 0;
    }
    let Ok(cgrp) = kread::<u64>(sk, o.sk_cgroup) else {
        return 0;
    };
    if cgrp == 0 {
        return 0;
    }
    match kread::<u64>(cgrp, o.cgroup_kn) {
        Ok(kn) if kn != 0 => kread::<u64>(kn, o.kn_id).unwrap_or(0),
        _ => 0,
    }
}

#[tracepoint]
pub fn timer_start(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_timer_start(&ctx);
    0
}

/// A timer was armed (`timer:timer_start`'s record): report it if it is a timewait socket's.
fn try_timer_start(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: as in try_set_state, one field at a time: every timer on the system passes
    // here, and one read decides.
    let handler = unsafe { read_volatile(&CONFIG.timewait.handler) };
    let at = unsafe { read_volatile(&CONFIG.timewait.start_function) };
    let function: u64 = read(ctx, at)?;
    if function != handler || handler == 0 {
        return Ok(());
    }
    let o = unsafe { read_volatile(&CONFIG.timewait) };
    let timer: u64 = read(ctx, o.start_timer)?;
    let expires: u64 = read(ctx, o.start_expires)?;
    let now: u64 = read(ctx, o.start_now)?;
    tw_armed(timer, expires.wrapping_sub(now))
}

/// A timewait socket's timer, armed for `timeout` jiffies: report the socket.
fn tw_armed(timer: u64, timeout: u64) -> Result<(), i32> {
    // SAFETY: as in try_set_state.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let o = cfg.timewait;
    let tw = timer.wrapping_sub(o.tw_timer as u64);
    let Some(TwSock {
        family,
        sport,
        dport,
        netns,
    }) = tw_kept(&cfg, tw, true)?
    else {
        return Ok(());
    };
    let substate: u8 = kread(tw, o.tw_substate)?;
    let (saddr, daddr, len) = if family == AF_INET {
        (o.skc_rcv_saddr, o.skc_daddr, 4)
    } else {
        (o.skc_v6_rcv_saddr, o.skc_v6_daddr, 16)
    };
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    // SAFETY: a local.
    unsafe { clear_owner(owner.as_mut_ptr()) };
    let rec = Record {
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr: tw,
        in_from: 0,
        aux: timeout,
        sport,
        dport,
        family,
        kind: kind::TW_ARMED,
        old: substate,
        new: state::TIME_WAIT,
        flags: 0,
        netns,
        // A timewait socket has no cgroup; userspace takes it from the entry transition.
        cgroup: 0,
    };
    let addrs = Addrs::Read {
        saddr: (tw + saddr as u64) as *const u8,
        daddr: (tw + daddr as u64) as *const u8,
        len,
    };
    emit(
        Slot::TimerStart,
        cfg.wakeup_bytes,
        &rec,
        &addrs,
        owner.as_ptr(),
    );
    Ok(())
}

#[tracepoint]
pub fn timer_cancel(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    // SAFETY: as in try_timer_start.
    let at = unsafe { read_volatile(&CONFIG.timewait.cancel_timer) };
    if let Ok(timer) = read::<u64>(&ctx, at) {
        let _ = tw_timer_end(timer, kind::TW_CANCELLED);
    }
    0
}

#[tracepoint]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    // SAFETY: as in try_timer_start.
    let at = unsafe { read_volatile(&CONFIG.timewait.expire_timer) };
    if let Ok(timer) = read::<u64>(&ctx, at) {
        let _ = tw_timer_end(timer, kind::TW_EXPIRED);
    }
    0
}

/// What the filters look at in a timewait socket.
struct TwSock {
    family: u16,
    sport: u16,
    dport: u16,
    /// 0 unless asked for or filtered on.
    netns: u32,
}

/// Reads a timewait socket's family, ports and (when `netns` asks, or a filter needs it) its
/// network namespace: `None` when the filters drop it or it is neither IPv4 nor IPv6.
#[inline(always)]
fn tw_kept(cfg: &Config, tw: u64, netns: bool) -> Result<Option<TwSock>, i32> {
    let o = cfg.timewait;
    let family: u16 = kread(tw, o.skc_family)?;
    let dport = u16::from_be(kread(tw, o.skc_dport)?);
    let sport: u16 = kread(tw, o.skc_num)?;
    if (family != AF_INET && family != AF_INET6)
        || !filter_keeps(
            cfg,
            family,
            state::TIME_WAIT,
            state::TIME_WAIT,
            0,
            sport,
            dport,
            port_bits,
        )
    {
        return Ok(None);
    }
    let netns = if netns || cfg.netns_count != 0 {
        sock_netns(&cfg.ns, tw)
    } else {
        0
    };
    if !netns_keeps(cfg, netns) {
        return Ok(None);
    }
    Ok(Some(TwSock {
        family,
        sport,
        dport,
        netns,
    }))
}

/// A timer was cancelled or fired: report it if it is a timewait socket's that the filters
/// keep. Userspace pairs it with the arming: cancel then arm is a re-arm, cancel then expiry
/// (the kernel detaches a timer before it runs it) an expiry, cancel alone an early kill.
/// Timers armed before tracing began are reported too, and ignored there.
fn tw_timer_end(timer: u64, k: u8) -> Result<(), i32> {
    // Most timers are not timewait sockets': their handler, one read, drops them. The
    // kernel logs the cancel before a shutdown clears the timer's function.
    // SAFETY: as in try_timer_start.
    let handler = unsafe { read_volatile(&CONFIG.timewait.handler) };
    let at = unsafe { read_volatile(&CONFIG.timewait.timer_function) };
    if handler == 0 || kread::<u64>(timer, at)? != handler {
        return Ok(());
    }
    tw_timer_report(timer, k)
}

/// Reports the end `k` of a timewait socket's timer, if the filters keep the socket.
fn tw_timer_report(timer: u64, k: u8) -> Result<(), i32> {
    // No map remembers which timers were reported (an insert per arming cost more than the
    // rest of the program): with a filter, the socket is read again and judged the same way.
    // SAFETY: as in try_set_state.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let tw = timer.wrapping_sub(cfg.timewait.tw_timer as u64);
    if cfg.filters() && tw_kept(&cfg, tw, false)?.is_none() {
        return Ok(());
    }
    // Its substate now: a peer's FIN may have moved it to TIME_WAIT with no timer event.
    let substate: u8 = kread(tw, cfg.timewait.tw_substate)?;
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    // SAFETY: a local.
    unsafe { clear_owner(owner.as_mut_ptr()) };
    let rec = Record {
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr: tw,
        in_from: 0,
        aux: 0,
        sport: 0,
        dport: 0,
        family: 0,
        kind: k,
        old: substate,
        new: state::TIME_WAIT,
        flags: flag::SUBSTATE_AT_END,
        netns: 0,
        cgroup: 0,
    };
    // No addresses: userspace knows them from the arming.
    let addrs = Addrs::Read {
        saddr: core::ptr::null(),
        daddr: core::ptr::null(),
        len: 0,
    };
    let slot = if k == kind::TW_EXPIRED {
        Slot::TimerExpire
    } else {
        Slot::TimerCancel
    };
    emit(slot, cfg.wakeup_bytes, &rec, &addrs, owner.as_ptr());
    Ok(())
}

#[inline(always)]
fn port_bits(p: u16) -> u8 {
    PORTS.get(u32::from(p)).copied().unwrap_or(0)
}

/// The scalar fields of one event.
struct Record {
    ts: u64,
    skaddr: u64,
    in_from: u64,
    aux: u64,
    sport: u16,
    dport: u16,
    family: u16,
    kind: u8,
    old: u8,
    new: u8,
    flags: u8,
    /// The socket's network namespace inode (0: unknown).
    netns: u32,
    /// The socket's cgroup id (0: unknown).
    cgroup: u64,
}

/// The event's two addresses.
enum Addrs {
    /// In kernel memory (the tracepoint record, a timewait socket), `len` bytes each (4, 16,
    /// or 0 for none).
    Read {
        saddr: *const u8,
        daddr: *const u8,
        len: u32,
    },
    /// Already loaded from the record: 16 bytes each.
    Loaded { saddr: [u64; 2], daddr: [u64; 2] },
}

/// Writes one event into the ring buffer, or counts it lost in `slot`.
#[inline(always)]
fn emit(slot: Slot, wakeup_bytes: u32, r: &Record, a: &Addrs, owner: *const Owner) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(&LOST, slot);
        return;
    };
    // SAFETY: the reserved entry is ours until submitted; `owner` is initialised.
    unsafe { fill(entry.as_mut_ptr(), r, a, owner) };
    entry.submit(wake_flags(wakeup_bytes, core::mem::size_of::<Event>()));
}

/// Writes a connection record (the end transition `r`, then `life`'s tail) into the ring
/// buffer as one entry, or counts it lost in `slot`.
///
/// # Safety
/// `owner` is initialised and `life` readable.
#[inline(always)]
unsafe fn emit_connection(
    slot: Slot,
    wakeup_bytes: u32,
    r: &Record,
    a: &Addrs,
    owner: *const Owner,
    life: *const SockLife,
) {
    let Some(mut entry) = EVENTS.reserve::<ConnectionRecord>(0) else {
        count(&LOST, slot);
        return;
    };
    // SAFETY: the reserved entry is ours until submitted; the caller vouches for the rest.
    unsafe { fill_connection(entry.as_mut_ptr(), r, a, owner, life) };
    entry.submit(wake_flags(
        wakeup_bytes,
        core::mem::size_of::<ConnectionRecord>(),
    ));
}

/// Writes every field of a connection record: the end transition `r`, then `life`'s tail.
///
/// # Safety
/// `c` is writable, `owner` initialised and `life` readable.
#[inline(always)]
unsafe fn fill_connection(
    c: *mut ConnectionRecord,
    r: &Record,
    a: &Addrs,
    owner: *const Owner,
    life: *const SockLife,
) {
    // SAFETY: as required; every access is a separate volatile store (see `put`).
    unsafe {
        fill(addr_of_mut!((*c).head), r, a, owner);
        put(addr_of_mut!((*c).head.kind), kind::CONNECTION);
        let t = addr_of_mut!((*c).tail);
        let mut i = 0;
        while i < STATES_LEFT {
            put(addr_of_mut!((*t).in_state_ns[i]), (*life).in_state_ns[i]);
            i += 1;
        }
        put(addr_of_mut!((*t).entered), (*life).entered);
        put(addr_of_mut!((*t).kind), kind::CONNECTION_TAIL);
        put(addr_of_mut!((*t).first_from), (*life).first_from);
        put(addr_of_mut!((*t).evidence), (*life).evidence);
        put(addr_of_mut!((*t).flags), (*life).flags);
        put(addr_of_mut!((*t)._pad), 0);
        put(addr_of_mut!((*t).reset_reason), (*life).reset_reason);
        put(addr_of_mut!((*t)._pad2), 0);
        put(addr_of_mut!((*t).born_ns), (*life).born_ns);
    }
}

/// Writes every field of one event.
///
/// # Safety
/// `e` is writable and `owner` initialised.
#[inline(always)]
unsafe fn fill(e: *mut Event, r: &Record, a: &Addrs, owner: *const Owner) {
    // SAFETY: as required; every access is a separate volatile store (see `put`).
    unsafe {
        put(addr_of_mut!((*e).ts_ns), r.ts);
        put(addr_of_mut!((*e).skaddr), r.skaddr);
        put(addr_of_mut!((*e).in_from_ns), r.in_from);
        put(addr_of_mut!((*e).aux), r.aux);
        match *a {
            Addrs::Loaded { saddr, daddr } => {
                let s = addr_of_mut!((*e).saddr).cast::<u64>();
                let d = addr_of_mut!((*e).daddr).cast::<u64>();
                put(s, saddr[0]);
                put(s.add(1), saddr[1]);
                put(d, daddr[0]);
                put(d.add(1), daddr[1]);
            }
            Addrs::Read { saddr, daddr, len } => {
                let (s, d) = (addr_of_mut!((*e).saddr), addr_of_mut!((*e).daddr));
                zero16(s);
                zero16(d);
                // IPv4 is written mapped (`::ffff:a.b.c.d`), as the tracepoint's record has it.
                let at = if len == 4 {
                    put(s.cast::<u64>().add(1), V4_MAPPED_HIGH);
                    put(d.cast::<u64>().add(1), V4_MAPPED_HIGH);
                    12
                } else {
                    0
                };
                if len != 0 {
                    let _ = bpf_probe_read_kernel(s.cast::<u8>().add(at).cast(), len, saddr.cast());
                    let _ = bpf_probe_read_kernel(d.cast::<u8>().add(at).cast(), len, daddr.cast());
                }
            }
        }
        let comm = addr_of_mut!((*e).comm).cast::<u64>();
        put(comm, (*owner).comm[0]);
        put(comm.add(1), (*owner).comm[1]);
        put(addr_of_mut!((*e).pid), (*owner).pid);
        put(addr_of_mut!((*e).sport), r.sport);
        put(addr_of_mut!((*e).dport), r.dport);
        put(addr_of_mut!((*e).family), r.family);
        put(addr_of_mut!((*e).kind), r.kind);
        put(addr_of_mut!((*e).oldstate), r.old);
        put(addr_of_mut!((*e).newstate), r.new);
        put(addr_of_mut!((*e).flags), r.flags | (*owner).flags as u8);
        put(addr_of_mut!((*e)._pad).cast::<u16>(), 0);
        put(addr_of_mut!((*e).netns), r.netns);
        put(addr_of_mut!((*e)._pad2), 0);
        put(addr_of_mut!((*e).cgroup), r.cgroup);
    }
}

/// Whether submitting a record of `size` bytes wakes the reader: once each time the unread
/// data grows past another `wakeup_bytes`, not on every record while it is above (each
/// wake-up is an interrupt — a self-IPI, a VM exit under a hypervisor — and a busy reader
/// may take milliseconds to drain, during which every record would raise one). The reader's
/// own tick covers a missed crossing.
#[inline(always)]
fn wake_flags(wakeup_bytes: u32, size: usize) -> u64 {
    let wake = if wakeup_bytes == 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        let w = wakeup_bytes as u64;
        // Unread bytes, this record (and its 8-byte header) included.
        let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        let before = avail.saturating_sub(size as u64 + 8);
        if avail / w != before / w {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    };
    wake as u64
}

trait CtxPtr {
    fn as_ptr_const(&self) -> *const u8;
}

impl CtxPtr for TracePointContext {
    #[inline(always)]
    fn as_ptr_const(&self) -> *const u8 {
        use aya_ebpf::EbpfContext as _;
        self.as_ptr().cast::<u8>().cast_const()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
