//! The BTF tracepoint programs: what tcptrace attaches wherever the kernel has BTF and lets
//! tracing programs keep socket-local storage (Linux 5.11 on).
//!
//! Each program gets the kernel's own objects (`struct sock *`, `struct sk_buff *`,
//! `struct timer_list *`) and reads their fields with typed loads at offsets the loader found
//! in the kernel's BTF, which the verifier checks. What tcptrace knows of a socket lives in
//! the socket itself ([`SK_STATE`]): created at its first transition, freed with it, never
//! evicted, never confused with a later socket at the same address.
//!
//! The kernel runs one of these programs at most once per CPU at a time: a transition that a
//! softirq makes while the transition program runs in a task on that CPU skips it, and a
//! second copy of it takes that transition over ([`btf_set_state_nested`]). What neither
//! handles is counted by the kernel as a miss that no copy took over, which userspace reports
//! as lost. A transition that no program ran for at all (seen on a busy host: a softirq's
//! transition on a CPU where another task was interrupted, with no miss counted by the
//! kernel) leaves its mark in the socket's storage: the next transition leaves a state the
//! last one seen did not enter, or the socket is destroyed in a state other than CLOSE.
//! Both are counted ([`UNSEEN`]) and reported as lost, and a connection whose end went
//! unseen still gets its record when the socket is destroyed ([`btf_destroy_sock`]).

use core::{
    ffi::c_void,
    mem::MaybeUninit,
    ptr::{addr_of, addr_of_mut, null, null_mut, read_volatile},
};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_jiffies64, bpf_probe_read_kernel, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
        },
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, Config, Event, INET_SPAN_BYTES, IPPROTO_MPTCP, IPPROTO_TCP,
    NO_REASON,
    connection::{ConnectionRecord, SockLife, SockStorage, ends_connection, is_birth, tail_flag},
    details::{Details, details_flag},
    driven_by_owner, filter_keeps, flag, kind, netns_keeps, ports_keep, records,
    socket_may_be_kept, state,
};

use crate::{
    Addrs, CONFIG, COUNTER_SLOTS, EVENTS, LISTENERS, LOST, Owner, Record, Slot, V4_MAPPED_HIGH,
    clear_owner, copy_owner, count, current_owner, emit, emit_connection, fill, fill_connection,
    forgot, idle, listen_key, port_bits, put, reset_record, tw_armed, tw_timer_report, wake_flags,
};

/// What tcptrace knows of a socket, kept with it (also read by userspace through sock_diag).
type SkState = SockStorage;

/// What tcptrace knows of each socket, kept with the socket: zeroed at creation, freed with
/// the socket.
#[btf_map]
static SK_STATE: SkStorage<SkState> = SkStorage::new();

/// The loader's configuration, behind a pointer the compiler cannot see through (so it does
/// not fold the placeholder zeros), while the verifier reads every field as the constant the
/// loader froze: branches on it are pruned, and offsets read from it are known.
#[inline(always)]
fn config() -> &'static Config {
    let p: *const Config = addr_of!(CONFIG);
    // SAFETY: a volatile read of a local pointer to a static; the static lives forever and
    // is never written by the program.
    unsafe { &*read_volatile(&p) }
}

/// A field of a kernel object at `off` (a constant from [`config`]): one load, which the
/// verifier checks against the kernel's BTF type of `obj`; a fault reads as 0.
///
/// # Safety
/// `obj` must be a BTF-typed pointer the program was handed (or loaded from one), and `off`
/// the offset of a field of type `T` in its type.
#[inline(always)]
unsafe fn field<T: Copy>(obj: *const u8, off: u16) -> T {
    // SAFETY: see above; the verifier rejects the program otherwise.
    unsafe { read_volatile(obj.add(usize::from(off)).cast::<T>()) }
}

/// The socket's storage, created (zeroed) if `create` and it has none; null when the kernel
/// could not allocate it (counted) or, without `create`, when it has none.
///
/// # Safety
/// `sk` must be a full socket handed to the program (a request socket maps to its listener).
#[inline(always)]
unsafe fn storage(sk: *const u8, create: bool, slot: Slot) -> *mut SkState {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the map is SK_STATE's definition; the kernel checks `sk`.
    let st = unsafe {
        bpf_sk_storage_get(
            addr_of!(SK_STATE).cast_mut().cast(),
            sk.cast_mut().cast(),
            null_mut(),
            flags,
        )
    }
    .cast::<SkState>();
    if create && st.is_null() {
        forgot(slot);
    }
    st
}

/// `inet_sock.inet_saddr` (network order, as loaded) and `inet_sock.inet_sport` (host order)
/// of a full socket: past `struct sock`'s end, so one helper read covers both.
///
/// # Safety
/// `sk` must be a full inet socket.
#[inline(always)]
unsafe fn inet_span(sk: *const u8) -> (u32, u16) {
    let cfg = config();
    let mut span = 0u64;
    // SAFETY: 8 bytes into a local; the helper checks the kernel address.
    unsafe {
        bpf_probe_read_kernel(
            addr_of_mut!(span).cast::<c_void>(),
            u32::from(INET_SPAN_BYTES),
            sk.add(usize::from(cfg.sock.inet_saddr)).cast(),
        )
    };
    let sport = (span >> (8 * u64::from(cfg.sock.inet_sport_in_span))) as u16;
    (span as u32, u16::from_be(sport))
}

/// The inode number of a socket's network namespace (full, timewait or request socket: all
/// start with a `sock_common`); 0 when unknown.
///
/// # Safety
/// `sk` must be a socket handed to the program.
#[inline(always)]
unsafe fn sock_netns(sk: *const u8) -> u32 {
    let o = &config().ns;
    if o.skc_net == ABSENT || o.net_inum == ABSENT {
        return 0;
    }
    // SAFETY: `skc_net.net` is a `struct net *` and `ns.inum` a u32 in it (BTF offsets).
    unsafe {
        let net: *const u8 = field(sk, o.skc_net);
        if net.is_null() {
            return 0;
        }
        field(net, o.net_inum)
    }
}

/// The cgroup2 id of a full socket; 0 when unknown.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn sock_cgroup(sk: *const u8) -> u64 {
    let o = &config().ns;
    if o.sk_cgroup == ABSENT || o.cgroup_kn == ABSENT || o.kn_id == ABSENT {
        return 0;
    }
    // SAFETY: a chain of BTF-typed pointers: sock → cgroup → kernfs_node → id.
    unsafe {
        let cgrp: *const u8 = field(sk, o.sk_cgroup);
        if cgrp.is_null() {
            return 0;
        }
        let kn: *const u8 = field(cgrp, o.cgroup_kn);
        if kn.is_null() {
            return 0;
        }
        field(kn, o.kn_id)
    }
}

/// An IPv4 address (network order, as loaded) as the two words of its mapped IPv6 form.
#[inline(always)]
fn v4_mapped(a: u32) -> [u64; 2] {
    [0, V4_MAPPED_HIGH | (u64::from(a) << 32)]
}

/// A 16-byte address field of a kernel object.
///
/// # Safety
/// As [`field`], for an `in6_addr` at `off`.
#[inline(always)]
unsafe fn v6_at(obj: *const u8, off: u16) -> [u64; 2] {
    // SAFETY: two loads inside the 16-byte field.
    unsafe { [field(obj, off), field(obj, off + 8)] }
}

/// The endpoints of a full socket: what `inet_sock_set_state`'s record holds.
struct Ends {
    protocol: u16,
    family: u16,
    sport: u16,
    dport: u16,
    /// IPv4 local address, network order (IPv6 ones are loaded when emitting).
    saddr4: u32,
}

/// Reads an IPv4 or IPv6 full socket's protocol, family and ports.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn sock_ends(sk: *const u8) -> Option<Ends> {
    let o = &config().sock;
    // SAFETY: BTF offsets of `struct sock` fields; the span is the inet_sock's.
    unsafe {
        let family: u16 = field(sk, o.skc_family);
        if family != AF_INET && family != AF_INET6 {
            return None;
        }
        let (saddr4, sport) = inet_span(sk);
        Some(Ends {
            protocol: field(sk, o.sk_protocol),
            family,
            sport,
            dport: u16::from_be(field(sk, o.skc_dport)),
            saddr4,
        })
    }
}

/// [`sock_ends`] of a socket that the loader's protocol and family filters keep.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn full_ends(sk: *const u8) -> Option<Ends> {
    let cfg = config();
    // SAFETY: `sk` as required.
    let e = unsafe { sock_ends(sk)? };
    let mptcp_kept = e.protocol == IPPROTO_MPTCP && cfg.mptcp != 0;
    if e.protocol != IPPROTO_TCP && !mptcp_kept {
        return None;
    }
    if cfg.family != 0 && cfg.family != e.family {
        return None;
    }
    Some(e)
}

/// A full socket's addresses, in the form of the tracepoint's record.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn full_addrs(sk: *const u8, e: &Ends) -> Addrs {
    let o = &config().sock;
    // SAFETY: BTF offsets of `sock_common` address fields.
    unsafe {
        if e.family == AF_INET {
            Addrs::Loaded {
                saddr: v4_mapped(e.saddr4),
                daddr: v4_mapped(field(sk, o.skc_daddr)),
            }
        } else {
            Addrs::Loaded {
                saddr: v6_at(sk, o.skc_v6_rcv_saddr),
                daddr: v6_at(sk, o.skc_v6_daddr),
            }
        }
    }
}

/// A transition of a full TCP socket: `inet_sock_set_state(sk, oldstate, newstate)`.
///
/// Marks itself running on this CPU meanwhile, for [`btf_set_state_nested`].
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let Some(mark) = RUNNING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; the program does not migrate while it runs. Volatile: the
    // nested copy reads it in between.
    unsafe { put(addr_of_mut!((*mark).running), 1) };
    transition(&ctx, Slot::Transition);
    // SAFETY: as above.
    unsafe {
        put(addr_of_mut!((*mark).last_sk), ctx.arg::<u64>(0));
        put(addr_of_mut!((*mark).last_new), ctx.arg::<u64>(2));
        put(addr_of_mut!((*mark).running), 0);
    }
    0
}

/// The same program again, attached after [`btf_set_state`], so the kernel runs it right
/// after that one for every transition. The kernel never runs a BTF program inside itself on
/// a CPU: a transition made by a softirq that interrupted `btf_set_state` in a task skips
/// that program. This copy, not running then, finds `btf_set_state` marked running — so
/// certainly skipped — and takes the transition over (counted in [`CAUGHT`]). Unmarked, it
/// asks the socket's storage: a transition `btf_set_state` took is folded in (the last state
/// is the one it entered), one it skipped in the instants before it marks itself or after it
/// unmarks itself is not (the last state is the one it leaves), and is taken over too. It
/// never takes a transition `btf_set_state` took: no duplicates. What neither takes (a
/// socket without storage) the kernel counts as a miss, which is reported lost.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state_nested(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let Some(mark) = RUNNING.get_ptr(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot.
    let (marked, last) = unsafe {
        (
            read_volatile(addr_of!((*mark).running)) != 0,
            (
                read_volatile(addr_of!((*mark).last_sk)),
                read_volatile(addr_of!((*mark).last_new)),
            ),
        )
    };
    // The transition `btf_set_state` last finished on this CPU is this one in all but the
    // rarest case (a socket's consecutive transitions enter different states): only
    // otherwise is the socket's storage asked.
    let this = (ctx.arg::<u64>(0), ctx.arg::<u64>(2));
    if !marked && (last == this || !skipped_unmarked(&ctx)) {
        return 0;
    }
    count(&CAUGHT, Slot::Nested);
    transition(&ctx, Slot::Nested);
    0
}

/// Whether the socket's storage still awaits this transition (see [`btf_set_state_nested`]).
#[inline(always)]
fn skipped_unmarked(ctx: &BtfTracePointContext) -> bool {
    let sk: *const u8 = ctx.arg(0);
    let old = ctx.arg::<u64>(1) as u8;
    // SAFETY: the tracepoint hands a full socket; its storage, if any, lives as long.
    unsafe {
        let st = storage(sk, false, Slot::Nested);
        !st.is_null() && (*st).life.awaits(old)
    }
}

/// Per CPU: transitions that no program ran for, found afterwards in the socket's storage
/// (see the module's documentation): reported lost.
#[map]
static UNSEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What [`btf_set_state`] tells [`btf_set_state_nested`] on a CPU.
#[repr(C)]
struct Mark {
    /// Non-zero while it runs there.
    running: u64,
    /// The socket of the transition it last finished there, and the state it entered.
    last_sk: u64,
    last_new: u64,
}

/// Per CPU: [`btf_set_state`]'s [`Mark`].
#[map]
static RUNNING: PerCpuArray<Mark> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: transitions [`btf_set_state_nested`] took over, each of which the kernel counted
/// as a missed run of [`btf_set_state`]: userspace subtracts them from the misses.
#[map]
static CAUGHT: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// One transition, counted in `slot` (the program's).
#[inline(always)]
fn transition(ctx: &BtfTracePointContext, slot: Slot) {
    let sk: *const u8 = ctx.arg(0);
    // SAFETY: the tracepoint hands a full socket being changed, and the states.
    unsafe {
        set_state(
            sk,
            ctx.arg::<u64>(1) as u8,
            ctx.arg::<u64>(2) as u8,
            slot,
            false,
        )
    };
}

/// The per-socket bookkeeping of one transition (before filtering, so durations stay right
/// for sockets whose earlier transitions were filtered out), then the event if kept.
///
/// # Safety
/// `sk` must be the full socket the tracepoint handed over.
///
/// `unseen_end`: the transition is a socket's end that no program ran for, folded in when
/// the socket is destroyed: only its connection record is written, marked incomplete.
#[inline(always)]
unsafe fn set_state(sk: *const u8, old: u8, new: u8, slot: Slot, unseen_end: bool) {
    // SAFETY: `sk` as required.
    let Some(ends) = (unsafe { full_ends(sk) }) else {
        return;
    };
    let cfg = config();
    // A socket the family and port filters can never keep gets no storage (creating it is
    // most of this program's cost): its transitions are bookkept for nothing.
    let wanted = socket_may_be_kept(cfg, ends.family, ends.sport, ends.dport, port_bits);
    // SAFETY: `sk` as required.
    let st = unsafe { storage(sk, wanted, slot) };
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut rec = Record {
        // SAFETY: a helper without arguments.
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr: sk as u64,
        in_from: 0,
        aux: 0,
        sport: ends.sport,
        dport: ends.dport,
        family: ends.family,
        kind: kind::TRANSITION,
        old,
        new,
        flags: if ends.protocol == IPPROTO_MPTCP {
            flag::MPTCP
        } else {
            0
        },
        netns: 0,
        cgroup: 0,
    };
    // SAFETY: `st` is the socket's storage or null; `spare` is written before it is read.
    let owner = unsafe { life(st, spare.as_mut_ptr(), &mut rec, slot) };
    if unseen_end && !st.is_null() {
        // SAFETY: the socket's storage.
        unsafe { (*st).life.flags |= tail_flag::GAP };
    }
    let listener_change = (old == state::CLOSE && new == state::LISTEN)
        || (old == state::LISTEN && new == state::CLOSE);
    if old == state::LISTEN && new == state::SYN_RECV {
        // SAFETY: `sk` as required; `owner` points at the storage's or the spare owner.
        unsafe {
            rec.netns = sock_netns(sk);
            inherit_listener(owner, rec.netns, ends.sport);
        }
    }
    // A listener's start and end are written whatever views read: no connection record
    // holds them. Nor does the moment both FINs crossed, which the peer's verdict needs when
    // it ends first (rare: a simultaneous close).
    let crossing = old == state::FIN_WAIT1 && new == state::CLOSING;
    let connect =
        cfg.records & records::CONNECTS != 0 && old == state::CLOSE && new == state::SYN_SENT;
    let keep = !unseen_end
        && (cfg.records & records::NO_TRANSITIONS == 0 || listener_change || crossing || connect)
        && filter_keeps(
            cfg,
            ends.family,
            old,
            new,
            rec.flags,
            ends.sport,
            ends.dport,
            port_bits,
        );
    // A connection's end, for views that read connections: the family and port filters
    // apply (the states are the view's to select).
    let connection = cfg.records & records::CONNECTIONS != 0
        && !st.is_null()
        && ends_connection(old, new)
        && ports_keep(cfg, ends.sport, ends.dport, port_bits);
    // The namespace and cgroup are read once per socket, and only for what is kept (or a
    // listener coming or going, for its key).
    let read_now = (keep || connection) && rec.cgroup == 0;
    // SAFETY: `sk` as required.
    unsafe {
        if (read_now || listener_change) && rec.netns == 0 {
            rec.netns = sock_netns(sk);
        }
        if read_now {
            rec.cgroup = sock_cgroup(sk);
            if !st.is_null() {
                put(addr_of_mut!((*st).netns), rec.netns);
                put(addr_of_mut!((*st).cgroup), rec.cgroup);
            }
        }
    }
    if listener_change {
        // SAFETY: `owner` was filled by `life`.
        unsafe { listener(old, rec.netns, ends.sport, owner, slot) };
    }
    if !(keep || connection) || !netns_keeps(cfg, rec.netns) {
        return;
    }
    // SAFETY: `sk` as required.
    let addrs = unsafe { full_addrs(sk, &ends) };
    // The connection's counters, read at its end for each record that ends it.
    let tp = if ends_connection(old, new) {
        // SAFETY: `sk` as required.
        unsafe { tcp_sock(sk) }
    } else {
        null()
    };
    if keep {
        if tp.is_null() {
            emit(slot, cfg.wakeup_bytes, &rec, &addrs, owner);
        } else {
            // SAFETY: `tp` is the socket as a `tcp_sock`; `owner` is initialised.
            unsafe { emit_detailed_end(slot, &rec, &addrs, owner, tp) };
        }
    }
    if connection {
        // SAFETY: `st` is the socket's storage (not null); `owner` is initialised.
        unsafe {
            let life = addr_of!((*st).life);
            if tp.is_null() {
                emit_connection(slot, cfg.wakeup_bytes, &rec, &addrs, owner, life);
            } else {
                emit_detailed_connection(slot, &rec, &addrs, owner, life, tp);
            }
        }
    }
}

/// The socket as a `tcp_sock` (a BTF pointer the verifier checks loads from) when the
/// loader asked for [`Details`]; null otherwise, or for a socket that is not TCP's (an
/// MPTCP meta socket).
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn tcp_sock(sk: *const u8) -> *const u8 {
    let cfg = config();
    if cfg.records & records::DETAILS == 0 || cfg.tcp.known == 0 {
        return null();
    }
    // SAFETY: the helper checks that `sk` is a full TCP socket, or returns null.
    unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }
        .cast::<u8>()
        .cast_const()
}

/// Writes the end's [`Details`] slot, read from the socket's counters.
///
/// # Safety
/// `d` is writable; `tp` is the socket as a `tcp_sock` (from [`tcp_sock`]).
#[inline(always)]
unsafe fn fill_details(d: *mut Details, r: &Record, tp: *const u8) {
    let o = &config().tcp;
    // SAFETY: as required: BTF offsets of `tcp_sock` fields, each load checked by the
    // verifier; every store a separate volatile one (see `put`).
    unsafe {
        put(addr_of_mut!((*d).ts_ns), r.ts);
        put(addr_of_mut!((*d).skaddr), r.skaddr);
        put(addr_of_mut!((*d).bytes_acked), field(tp, o.bytes_acked));
        put(
            addr_of_mut!((*d).bytes_received),
            field(tp, o.bytes_received),
        );
        put(addr_of_mut!((*d).segs_out), field(tp, o.segs_out));
        put(addr_of_mut!((*d).segs_in), field(tp, o.segs_in));
        put(addr_of_mut!((*d).total_retrans), field(tp, o.total_retrans));
        put(addr_of_mut!((*d).srtt_us), field::<u32>(tp, o.srtt_us) >> 3);
        put(
            addr_of_mut!((*d).rttvar_us),
            field::<u32>(tp, o.mdev_us) >> 2,
        );
        put(addr_of_mut!((*d).min_rtt_us), field(tp, o.min_rtt));
        put(addr_of_mut!((*d).sk_err), field::<i32>(tp, o.sk_err) as u32);
        put(
            addr_of_mut!((*d).user_timeout_ms),
            field(tp, o.user_timeout),
        );
        put(addr_of_mut!((*d).packets_out), field(tp, o.packets_out));
        put(addr_of_mut!((*d)._pad), 0);
        put(addr_of_mut!((*d)._reserved[0]), 0);
        put(addr_of_mut!((*d)._reserved[1]), 0);
        put(addr_of_mut!((*d).retransmits), field(tp, o.retransmits));
        put(addr_of_mut!((*d).probes_out), field(tp, o.probes_out));
        put(addr_of_mut!((*d).kind), kind::DETAILS);
        let keepopen = (field::<u64>(tp, o.sk_flags) >> o.keepopen_bit) & 1 != 0;
        put(
            addr_of_mut!((*d).flags),
            if keepopen { details_flag::KEEPALIVE } else { 0 },
        );
        put(addr_of_mut!((*d)._pad2), 0);
        put(addr_of_mut!((*d)._reserved2[0]), 0);
        put(addr_of_mut!((*d)._reserved2[1]), 0);
    }
}

/// An end transition with its [`Details`] before it: one entry of two slots.
#[repr(C)]
struct DetailedEnd {
    details: Details,
    end: Event,
}

/// A connection record with its [`Details`] before it: one entry of three slots.
#[repr(C)]
struct DetailedConnection {
    details: Details,
    connection: ConnectionRecord,
}

/// Writes the end transition `r` after its details, as one entry, or counts it lost.
///
/// # Safety
/// As [`fill_details`]; `owner` is initialised.
#[inline(always)]
unsafe fn emit_detailed_end(slot: Slot, r: &Record, a: &Addrs, owner: *const Owner, tp: *const u8) {
    let Some(mut entry) = EVENTS.reserve::<DetailedEnd>(0) else {
        count(&LOST, slot);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submitted; the caller vouches for the rest.
    unsafe {
        fill_details(addr_of_mut!((*e).details), r, tp);
        fill(addr_of_mut!((*e).end), r, a, owner);
    }
    let size = core::mem::size_of::<DetailedEnd>();
    entry.submit(wake_flags(config().wakeup_bytes, size));
}

/// Writes a connection record after its details, as one entry, or counts it lost.
///
/// # Safety
/// As [`fill_details`]; `owner` is initialised and `life` readable.
#[inline(always)]
unsafe fn emit_detailed_connection(
    slot: Slot,
    r: &Record,
    a: &Addrs,
    owner: *const Owner,
    life: *const SockLife,
    tp: *const u8,
) {
    let Some(mut entry) = EVENTS.reserve::<DetailedConnection>(0) else {
        count(&LOST, slot);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submitted; the caller vouches for the rest.
    unsafe {
        fill_details(addr_of_mut!((*e).details), r, tp);
        fill_connection(addr_of_mut!((*e).connection), r, a, owner, life);
    }
    let size = core::mem::size_of::<DetailedConnection>();
    entry.submit(wake_flags(config().wakeup_bytes, size));
}

/// Updates the socket's storage for a transition at `rec.ts` (its life: a new one at a
/// birth, the time in the state left, the path and the evidence; the owner when its own
/// system call drives the transition) and fills `rec`'s duration, flags, namespace and
/// cgroup from it. Returns where the owner is: in the storage, or in `spare` when the socket
/// has none. A transition that the storage shows was missed before this one is counted in
/// `slot` of [`UNSEEN`].
///
/// # Safety
/// `st` is null or the socket's storage; `spare` is writable.
#[inline(always)]
unsafe fn life(st: *mut SkState, spare: *mut Owner, rec: &mut Record, slot: Slot) -> *mut Owner {
    let (old, new) = (rec.old, rec.new);
    let driven = driven_by_owner(old, new);
    if st.is_null() {
        // SAFETY: `spare` is writable.
        unsafe {
            if driven {
                current_owner(spare);
            } else {
                clear_owner(spare);
            }
        }
        return spare;
    }
    // SAFETY: `st` is the socket's storage, which lives as long as the socket; the socket
    // is locked while it changes state, so no other program writes it meanwhile.
    unsafe {
        let owner = addr_of_mut!((*st).owner);
        if is_birth(old, new) {
            put(addr_of_mut!((*st).flags), 0);
            put(addr_of_mut!((*st).netns), 0);
            put(addr_of_mut!((*st).cgroup), 0);
            clear_owner(owner);
        }
        if (*st).life.missed_before(old) {
            count(&UNSEEN, slot);
        }
        if let Some(d) = (*st).life.on_transition(rec.ts, old, new) {
            rec.in_from = d;
            rec.flags |= flag::DURATION_KNOWN;
        }
        if driven {
            current_owner(owner);
        }
        rec.flags |= (*st).flags as u8;
        rec.netns = (*st).netns;
        rec.cgroup = (*st).cgroup;
        owner
    }
}

/// An accepted socket's owner: its listener's (created in softirq, where the current task is
/// arbitrary).
///
/// # Safety
/// `owner` is writable.
#[inline(always)]
unsafe fn inherit_listener(owner: *mut Owner, netns: u32, port: u16) {
    if let Some(l) = LISTENERS.get_ptr(&listen_key(netns, port)) {
        // SAFETY: `l` is a live map value; `owner` is writable.
        unsafe {
            copy_owner(owner, l);
            put(
                addr_of_mut!((*owner).flags),
                (*l).flags | flag::OWNER_FROM_LISTENER as u32,
            );
        }
    }
}

/// A listener starts (`old` is CLOSE) or stops: remember or forget its owner; a listener
/// that does not fit in the map is counted.
///
/// # Safety
/// `owner` points at an initialised owner.
#[inline(always)]
unsafe fn listener(old: u8, netns: u32, port: u16, owner: *const Owner, slot: Slot) {
    let key = listen_key(netns, port);
    if old == state::CLOSE {
        // SAFETY: `owner` is initialised.
        if LISTENERS.insert(&key, unsafe { &*owner }, 0).is_err() {
            forgot(slot);
        }
    } else {
        let _ = LISTENERS.remove(&key);
    }
}

/// A full TCP socket is destroyed: `tcp_destroy_sock(sk)`, after its last transition. One
/// whose storage shows a state other than CLOSE ended unseen: counted, and its end folded in
/// now, so that its connection has a record.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn btf_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    // SAFETY: the tracepoint hands a full socket being destroyed; its storage, if any, is
    // freed after this.
    unsafe {
        let st = storage(sk, false, Slot::Destroy);
        if st.is_null() {
            return 0;
        }
        if let Some(last) = (*st).life.unseen_end() {
            count(&UNSEEN, Slot::Destroy);
            set_state(sk, last, state::CLOSE, Slot::Destroy, true);
        }
    }
    0
}

/// A reset arrived for a full socket: `tcp_receive_reset(sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_receive_reset(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    // SAFETY: the tracepoint hands the full socket that received the reset.
    unsafe { receive_reset(sk) };
    0
}

/// Marks the socket as reset (its coming FIN_WAIT2/CLOSING→CLOSE is then no entry into
/// TIME_WAIT) before any filter, then reports the reset if kept.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn receive_reset(sk: *const u8) {
    // SAFETY: `sk` as required.
    let Some(ends) = (unsafe { full_ends(sk) }) else {
        return;
    };
    let cfg = config();
    // SAFETY: `sk` as required.
    let st = unsafe { storage(sk, true, Slot::ResetReceived) };
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut owner = spare.as_mut_ptr();
    let (mut netns, mut cgroup) = (0, 0);
    // SAFETY: `st` is the socket's storage or null; `spare` is writable.
    unsafe {
        if st.is_null() {
            clear_owner(owner);
        } else {
            put(
                addr_of_mut!((*st).flags),
                (*st).flags | flag::RESET_RECEIVED as u32,
            );
            (*st).life.on_reset(true, None);
            owner = addr_of_mut!((*st).owner);
            (netns, cgroup) = ((*st).netns, (*st).cgroup);
        }
    }
    // A received reset's state is not reported, so it never matches a state filter; a
    // connection record holds it.
    if cfg.records & records::NO_TRANSITIONS != 0
        || !filter_keeps(cfg, ends.family, 0, 0, 0, ends.sport, ends.dport, port_bits)
    {
        return;
    }
    // SAFETY: `sk` as required.
    unsafe {
        if netns == 0 {
            (netns, cgroup) = (sock_netns(sk), sock_cgroup(sk));
        }
    }
    if !netns_keeps(cfg, netns) {
        return;
    }
    let rec = reset_record(
        kind::RESET_RECEIVED,
        sk as u64,
        0,
        (ends.family, ends.sport, ends.dport),
        0,
        (netns, cgroup),
    );
    // SAFETY: `sk` as required.
    let addrs = unsafe { full_addrs(sk, &ends) };
    emit(Slot::ResetReceived, cfg.wakeup_bytes, &rec, &addrs, owner);
}

/// This host sends a reset: `tcp_send_reset(sk, skb[, reason])`, with a full, timewait or
/// request socket, or none (a segment for a port nothing listens on: a refused connection).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_send_reset(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    // The context is read at constant offsets only: the verifier allows no other.
    let reason = if config().send_reset_reason != 0 {
        u64::from(ctx.arg::<u64>(2) as u32)
    } else {
        NO_REASON
    };
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    // SAFETY: the tracepoint hands the socket (or null) and the segment answered.
    unsafe { send_reset(sk, skb, reason) };
    0
}

/// A sent reset's endpoints and socket facts.
struct Sent {
    state: u8,
    family: u16,
    sport: u16,
    dport: u16,
    addrs: Addrs,
}

/// # Safety
/// `sk` is null or a socket, `skb` a segment, both handed to the program.
#[inline(always)]
unsafe fn send_reset(sk: *const u8, skb: *const u8, reason: u64) {
    let cfg = config();
    // SAFETY: as required.
    let sent = unsafe {
        if sk.is_null() {
            segment_ends(skb)
        } else {
            socket_ends(sk)
        }
    };
    let Some(Sent {
        state: st,
        family,
        sport,
        dport,
        addrs,
    }) = sent
    else {
        return;
    };
    let full = !sk.is_null() && st != state::TIME_WAIT && st != state::NEW_SYN_RECV;
    // A socket first met through the reset that aborts it (it was open before tracing, and
    // its abort writes the reset before the transition) gets storage, as for a received
    // one: its record then holds the reset whichever came first. Not once it has ended.
    // Not a listener's (answering a stray segment), nor for a socket no filter keeps.
    let create = st != state::CLOSE
        && st != state::LISTEN
        && socket_may_be_kept(config(), family, sport, dport, port_bits);
    // SAFETY: `sk` is a full socket where `full`.
    let storage = if full {
        unsafe { storage(sk, create, Slot::ResetSent) }
    } else {
        null_mut()
    };
    if !storage.is_null() {
        // Bookkept before any filter, like transitions: the connection record holds it.
        let reason = (reason != NO_REASON).then_some(reason as u32);
        // SAFETY: the socket's storage; the socket is locked while it sends a reset.
        unsafe { (*storage).life.on_reset(false, reason) };
    }
    if cfg.family != 0 && cfg.family != family {
        return;
    }
    // Views that read connections need only the resets no record holds: with no socket (a
    // refused connection), or after the end (an abortive close logs the transition first).
    let unrecorded = sk.is_null() || st == state::CLOSE;
    if cfg.records & records::NO_TRANSITIONS != 0 && !unrecorded {
        return;
    }
    // A reset counts as being in the socket's state for the state filter.
    if !filter_keeps(cfg, family, st, st, 0, sport, dport, port_bits) {
        return;
    }
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut owner = spare.as_mut_ptr();
    let (mut netns, mut cgroup) = (0, 0);
    // SAFETY: `sk` is a full socket where `full`; the storage is the socket's.
    unsafe {
        clear_owner(owner);
        if !storage.is_null() {
            owner = addr_of_mut!((*storage).owner);
            (netns, cgroup) = ((*storage).netns, (*storage).cgroup);
        }
        if netns == 0 && !sk.is_null() {
            netns = sock_netns(sk);
            cgroup = if full { sock_cgroup(sk) } else { 0 };
        }
    }
    if !netns_keeps(cfg, netns) {
        return;
    }
    let rec = reset_record(
        kind::RESET_SENT,
        sk as u64,
        reason,
        (family, sport, dport),
        st,
        (netns, cgroup),
    );
    emit(Slot::ResetSent, cfg.wakeup_bytes, &rec, &addrs, owner);
}

/// The endpoints of a socket sending a reset: a full one's as its transitions report them,
/// a timewait or request socket's from its `sock_common`.
///
/// # Safety
/// `sk` must be a socket handed to the program.
#[inline(always)]
unsafe fn socket_ends(sk: *const u8) -> Option<Sent> {
    let o = &config().sock;
    // SAFETY: BTF offsets of `sock_common`, which every kind of socket starts with.
    unsafe {
        let st: u8 = field(sk, o.skc_state);
        if st != state::TIME_WAIT && st != state::NEW_SYN_RECV {
            let e = sock_ends(sk)?;
            let addrs = full_addrs(sk, &e);
            return Some(Sent {
                state: st,
                family: e.family,
                sport: e.sport,
                dport: e.dport,
                addrs,
            });
        }
        let family: u16 = field(sk, o.skc_family);
        let addrs = match family {
            AF_INET => Addrs::Loaded {
                saddr: v4_mapped(field(sk, o.skc_rcv_saddr)),
                daddr: v4_mapped(field(sk, o.skc_daddr)),
            },
            AF_INET6 => Addrs::Loaded {
                saddr: v6_at(sk, o.skc_v6_rcv_saddr),
                daddr: v6_at(sk, o.skc_v6_daddr),
            },
            _ => return None,
        };
        Some(Sent {
            state: st,
            family,
            sport: field(sk, o.skc_num),
            dport: u16::from_be(field(sk, o.skc_dport)),
            addrs,
        })
    }
}

/// The endpoints of a reset sent with no socket: the segment it answers, reversed.
///
/// # Safety
/// `skb` must be the segment handed to the program.
#[inline(always)]
unsafe fn segment_ends(skb: *const u8) -> Option<Sent> {
    let o = &config().sock;
    // The verifier allows no arithmetic on a pointer that may be null.
    if skb.is_null() {
        return None;
    }
    // SAFETY: BTF offsets of `sk_buff`; the headers are read with the checking helper.
    unsafe {
        let head: u64 = field(skb, o.skb_head);
        let ip = head + u64::from(field::<u16>(skb, o.skb_network_header));
        let tcp = head + u64::from(field::<u16>(skb, o.skb_transport_header));
        let ports: u32 = kread_at(tcp)?;
        // The segment's source is the remote end.
        let (rport, lport) = (ports as u16, (ports >> 16) as u16);
        let version = kread_at::<u8>(ip)? >> 4;
        let (family, saddr, daddr) = match version {
            4 => (
                AF_INET,
                v4_mapped(kread_at(ip + 16)?),
                v4_mapped(kread_at(ip + 12)?),
            ),
            6 => (
                AF_INET6,
                [kread_at(ip + 24)?, kread_at(ip + 32)?],
                [kread_at(ip + 8)?, kread_at(ip + 16)?],
            ),
            _ => return None,
        };
        Some(Sent {
            state: 0,
            family,
            sport: u16::from_be(lport),
            dport: u16::from_be(rport),
            addrs: Addrs::Loaded { saddr, daddr },
        })
    }
}

/// Reads a `T` at a kernel address with the checking helper.
#[inline(always)]
fn kread_at<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the address and fails cleanly.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const T).ok() }
}

/// Whether `timer` is a timewait socket's: its handler, one typed load, decides (most timers
/// on the host are not).
///
/// # Safety
/// `timer` must be the `struct timer_list *` the tracepoint handed over.
#[inline(always)]
unsafe fn tw_timer(timer: *const u8) -> bool {
    let o = &config().timewait;
    // SAFETY: `timer_list.function`'s BTF offset.
    o.handler != 0 && unsafe { field::<u64>(timer, o.timer_function) } == o.handler
}

/// A timer was armed: `timer_start(timer, …)`.
#[btf_tracepoint(function = "timer_start")]
pub fn btf_timer_start(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let timer: *const u8 = ctx.arg(0);
    // SAFETY: the tracepoint hands the timer.
    unsafe {
        if !tw_timer(timer) {
            return 0;
        }
        let expires: u64 = field(timer, config().timewait.timer_expires);
        let _ = tw_armed(timer as u64, expires.wrapping_sub(bpf_jiffies64()));
    }
    0
}

/// A pending timer was deleted: `timer_cancel(timer)` (before a re-arm, before it runs, or
/// alone when the timewait socket is killed early).
#[btf_tracepoint(function = "timer_cancel")]
pub fn btf_timer_cancel(ctx: BtfTracePointContext) -> i32 {
    timer_end(&ctx, kind::TW_CANCELLED)
}

/// A timer fires: `timer_expire_entry(timer, …)`.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn btf_timer_expire(ctx: BtfTracePointContext) -> i32 {
    timer_end(&ctx, kind::TW_EXPIRED)
}

#[inline(always)]
fn timer_end(ctx: &BtfTracePointContext, k: u8) -> i32 {
    if idle() {
        return 0;
    }
    let timer: *const u8 = ctx.arg(0);
    // SAFETY: the tracepoint hands the timer.
    if unsafe { tw_timer(timer) } {
        let _ = tw_timer_report(timer as u64, k);
    }
    0
}
