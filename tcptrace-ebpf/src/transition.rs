//! The BTF programs on TCP's transitions (`inet_sock_set_state`, and its nested copy) and on
//! a socket's destruction (`tcp_destroy_sock`), which folds in an end no program ran for.
//!
//! The kernel runs one of these programs at most once per CPU at a time: a transition that a
//! softirq makes while the transition program runs in a task on that CPU skips it, and a
//! second copy of it takes that transition over ([`btf_set_state_nested`]). What neither
//! handles is counted by the kernel as a miss that no copy took over, which userspace reports
//! as lost. A transition that no program ran for at all (seen on a busy host: a softirq's
//! transition on a CPU where another task was interrupted, with no miss counted by the
//! kernel) leaves its mark in the socket's storage: the next transition leaves a state the
//! last one seen did not enter, or the socket is destroyed in a state other than CLOSE.
//! Both are counted ([`crate::maps::UNSEEN`]) and reported as lost, and a connection whose
//! end went unseen still gets its record when the socket is destroyed ([`btf_destroy_sock`]).

use core::{
    mem::MaybeUninit,
    ptr::{addr_of, addr_of_mut, null, read_volatile},
};

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use tcptrace_common::{
    Config, IPPROTO_MPTCP, Owner,
    connection::{ends_connection, is_birth, left_out as left_out_by, tail_flag},
    driven_by_owner, effective_new_state, filter_keeps, flag, kind, netns_keeps, ports_keep,
    records, socket_may_be_kept, state, takes_owner,
};

use crate::{
    config::{config, idle},
    emit::{Record, emit, emit_connection, emit_detailed_connection, emit_detailed_end},
    maps::{CAUGHT, RUNNING, SkState, Slot, UNSEEN, count, port_bits},
    mem::put,
    owner::{clear_owner, current_owner, inherit_listener, listener},
    sock::{Ends, full_addrs, full_ends, sock_cgroup, sock_netns, storage, tcp_sock},
    timewait::take_armed,
};

/// The positions of `inet_sock_set_state(sk, oldstate, newstate)`'s arguments, and of
/// `tcp_destroy_sock(sk)`'s.
const SK_ARG: usize = 0;
const OLD_STATE_ARG: usize = 1;
const NEW_STATE_ARG: usize = 2;

/// A transition of a full TCP socket: `inet_sock_set_state(sk, oldstate, newstate)`.
///
/// Marks itself running on this CPU meanwhile, for [`btf_set_state_nested`].
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_btf_set_state(&ctx);
    0
}

fn try_btf_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    if left_out(ctx) {
        return Ok(());
    }
    let Some(mark) = RUNNING.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: `mark` is this CPU's slot of RUNNING, which only this program writes; the
    // program does not migrate while it runs. Volatile: the nested copy reads it in between.
    unsafe { put(addr_of_mut!((*mark).running), 1) };
    transition(ctx, Slot::Transition);
    // SAFETY: as above: this CPU's slot, written by this program only.
    unsafe {
        put(addr_of_mut!((*mark).last_sk), ctx.arg::<u64>(SK_ARG));
        put(
            addr_of_mut!((*mark).last_new),
            ctx.arg::<u64>(NEW_STATE_ARG),
        );
        put(addr_of_mut!((*mark).running), 0);
    }
    Ok(())
}

/// The same program again, attached after [`btf_set_state`], so the kernel runs it right
/// after that one for every transition. The kernel never runs a BTF program inside itself on
/// a CPU: a transition made by a softirq that interrupted `btf_set_state` in a task skips
/// that program. This copy, not running then, finds `btf_set_state` marked running — so
/// certainly skipped — and takes the transition over (counted in [`CAUGHT`]). Unmarked, it
/// asks the socket's storage: a transition `btf_set_state` took is folded in (the last state
/// is the one it entered), one it skipped in the instants before it marks itself or after it
/// unmarks itself is not (the last state is the one it leaves), and is taken over too. It
/// never takes a transition `btf_set_state` took: no duplicates. A middle transition the
/// loader leaves out that the kernel skipped while `btf_set_state` ran is taken over by
/// doing nothing (counted, so that the kernel's miss is no loss). What neither takes (a
/// socket without storage) the kernel counts as a miss, which is reported lost.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state_nested(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_btf_set_state_nested(&ctx);
    0
}

fn try_btf_set_state_nested(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let Some(mark) = RUNNING.get_ptr(0) else {
        return Ok(());
    };
    // SAFETY: `mark` is this CPU's slot of RUNNING, a live map value; volatile reads, as
    // btf_set_state writes it.
    let marked = unsafe { read_volatile(addr_of!((*mark).running)) != 0 };
    if left_out(ctx) {
        // Left out on purpose, by either copy: one the kernel skipped in `btf_set_state`
        // (counted as a miss) is taken over by doing nothing — no loss. Counted in a slot of
        // its own.
        if marked {
            count(&CAUGHT, Slot::Transition);
        }
        return Ok(());
    }
    // SAFETY: as above.
    let last = unsafe {
        (
            read_volatile(addr_of!((*mark).last_sk)),
            read_volatile(addr_of!((*mark).last_new)),
        )
    };
    // The transition `btf_set_state` last finished on this CPU is this one in all but the
    // rarest case (a socket's consecutive transitions enter different states): only
    // otherwise is the socket's storage asked.
    let this = (ctx.arg::<u64>(SK_ARG), ctx.arg::<u64>(NEW_STATE_ARG));
    if !marked && (last == this || !skipped_unmarked(ctx)) {
        return Ok(());
    }
    count(&CAUGHT, Slot::Nested);
    transition(ctx, Slot::Nested);
    Ok(())
}

/// Whether this transition is a middle one the loader asked to leave out
/// ([`records::NO_MIDDLE`], [`records::NO_PASSIVE_CLOSE`]: the view shows no time per state,
/// and the socket's storage infers it from the next one): the programs' first check, before
/// any map or socket is touched.
#[inline(always)]
fn left_out(ctx: &BtfTracePointContext) -> bool {
    let records = config().records;
    records & records::NO_MIDDLE != 0
        && left_out_by(
            records,
            ctx.arg::<u64>(OLD_STATE_ARG) as u8,
            ctx.arg::<u64>(NEW_STATE_ARG) as u8,
        )
}

/// Whether the socket's storage still awaits this transition (see [`btf_set_state_nested`]).
#[inline(always)]
fn skipped_unmarked(ctx: &BtfTracePointContext) -> bool {
    let sk: *const u8 = ctx.arg(SK_ARG);
    let old = ctx.arg::<u64>(OLD_STATE_ARG) as u8;
    // SAFETY: the tracepoint hands a full socket; its storage, if not null, lives as long
    // as the socket, which is locked while it changes state.
    unsafe {
        let st = storage(sk, false, Slot::Nested);
        !st.is_null() && (*st).life.awaits(old, config().records)
    }
}

/// One transition, counted in `slot` (the program's).
#[inline(always)]
fn transition(ctx: &BtfTracePointContext, slot: Slot) {
    let sk: *const u8 = ctx.arg(SK_ARG);
    // SAFETY: the tracepoint hands a full socket being changed, and the states.
    unsafe {
        set_state(
            sk,
            ctx.arg::<u64>(OLD_STATE_ARG) as u8,
            ctx.arg::<u64>(NEW_STATE_ARG) as u8,
            slot,
            false,
        )
    };
}

/// The per-socket bookkeeping of one transition (before filtering, so durations stay right
/// for sockets whose earlier transitions were filtered out), then the event if kept.
///
/// `unseen_end`: the transition is a socket's end that no program ran for, folded in when
/// the socket is destroyed: only its connection record is written, marked incomplete.
///
/// # Safety
/// `sk` must be the full socket the tracepoint handed over.
#[inline(always)]
unsafe fn set_state(sk: *const u8, old: u8, new: u8, slot: Slot, unseen_end: bool) {
    // SAFETY: `sk` is the full socket the tracepoint handed over (this function's contract).
    let Some(ends) = (unsafe { full_ends(sk) }) else {
        return;
    };
    let cfg = config();
    // A socket the family and port filters can never keep gets no storage (creating it is
    // most of this program's cost): its transitions are bookkept for nothing.
    let wanted = socket_may_be_kept(cfg, ends.family, ends.sport, ends.dport, port_bits);
    // SAFETY: `sk` is the full socket the tracepoint handed over (this function's contract).
    let st = unsafe { storage(sk, wanted, slot) };
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut rec = transition_record(sk, &ends, old, new);
    // SAFETY: `st` is the socket's storage or null; `spare` is a writable local.
    let owner = unsafe { life(st, spare.as_mut_ptr(), &mut rec, slot, cfg.records) };
    if unseen_end && !st.is_null() {
        // SAFETY: `st` is the socket's storage (not null), which this program alone writes
        // while the socket is locked.
        unsafe { (*st).life.flags |= tail_flag::GAP };
    }
    let listener_change = (old == state::CLOSE && new == state::LISTEN)
        || (old == state::LISTEN && new == state::CLOSE);
    if old == state::LISTEN && new == state::SYN_RECV {
        // SAFETY: `sk` is the full socket handed over; `owner` is the storage's owner or
        // `spare`, both writable.
        unsafe {
            rec.netns = sock_netns(sk);
            inherit_listener(owner, rec.netns, ends.sport);
        }
    }
    let keep = transition_kept(cfg, &ends, old, new, rec.flags, listener_change, unseen_end);
    // A connection's end, for views that read connections: the family and port filters
    // apply (the states are the view's to select).
    let connection = cfg.records & records::CONNECTIONS != 0
        && !st.is_null()
        && ends_connection(old, new)
        && ports_keep(cfg, ends.sport, ends.dport, port_bits);
    // The namespace and cgroup are read once per socket, and only for what is kept (or a
    // listener coming or going, for its key).
    let read_now = (keep || connection) && rec.cgroup == 0;
    // SAFETY: `sk` is the full socket the tracepoint handed over (this function's contract).
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
    // SAFETY: `life` returned the storage's owner or `spare`, initialised either way, and
    // nothing else writes it while the socket is locked.
    let owner = unsafe { &*owner };
    if listener_change {
        listener(old, rec.netns, ends.sport, owner, slot);
    }
    if !(keep || connection) || !netns_keeps(cfg, rec.netns) {
        return;
    }
    let written = Written { keep, connection };
    // SAFETY: `sk` is the full socket handed over; `connection` implies `st` is its storage.
    unsafe { write(cfg, sk, st, &ends, &rec, owner, written, slot) };
}

/// The event of a transition of the socket at `sk` from `old` to `new`, now; its duration,
/// flags, namespace and cgroup come from the socket's storage.
#[inline(always)]
fn transition_record(sk: *const u8, ends: &Ends, old: u8, new: u8) -> Record {
    Record {
        // SAFETY: a helper without arguments or memory access.
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
    }
}

/// Whether the transition is written as an event: never for an end no program ran for
/// (`unseen_end`: its connection record holds it); always, unless views read connections
/// only; then a listener's start and end (no connection record holds them), the moment both
/// FINs crossed (the peer's verdict needs it when it ends first: a simultaneous close), and
/// a connect when asked for. The filters apply either way.
#[inline(always)]
fn transition_kept(
    cfg: &Config,
    ends: &Ends,
    old: u8,
    new: u8,
    flags: u8,
    listener_change: bool,
    unseen_end: bool,
) -> bool {
    let crossing = old == state::FIN_WAIT1 && new == state::CLOSING;
    let connect =
        cfg.records & records::CONNECTS != 0 && old == state::CLOSE && new == state::SYN_SENT;
    !unseen_end
        && (cfg.records & records::NO_TRANSITIONS == 0 || listener_change || crossing || connect)
        && filter_keeps(
            cfg,
            ends.family,
            old,
            new,
            flags,
            ends.sport,
            ends.dport,
            port_bits,
        )
}

/// What a transition writes: its event (`keep`), the connection's record (`connection`).
#[derive(Clone, Copy)]
struct Written {
    keep: bool,
    connection: bool,
}

/// Writes the transition `rec`'s event and the connection's record, as `written` says; a
/// connection's end comes with its details (its counters) when the loader asked for them.
///
/// # Safety
/// `sk` must be the full socket handed to the program; with `written.connection`, `st`
/// must be its storage.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn write(
    cfg: &Config,
    sk: *const u8,
    st: *mut SkState,
    ends: &Ends,
    rec: &Record,
    owner: &Owner,
    written: Written,
    slot: Slot,
) {
    let wakeup_bytes = cfg.wakeup_bytes;
    // SAFETY: `sk` is the full socket handed over (this function's contract).
    let addrs = unsafe { full_addrs(sk, ends) };
    // The connection's counters, read at its end for each record that ends it.
    let tp = if ends_connection(rec.old, rec.new) {
        // SAFETY: as above.
        unsafe { tcp_sock(sk) }
    } else {
        null()
    };
    if written.keep {
        if tp.is_null() {
            emit(slot, wakeup_bytes, rec, &addrs, owner);
        } else {
            // SAFETY: `tp` is the socket as a `tcp_sock` (from tcp_sock, not null).
            unsafe { emit_detailed_end(slot, rec, &addrs, owner, tp) };
        }
    }
    if written.connection {
        // SAFETY: with `connection`, `st` is the socket's storage (not null), alive while
        // the socket is.
        let life = unsafe { &(*st).life };
        // An entry into TIME_WAIT names the timewait socket armed for it just before.
        let rec = &Record {
            aux: if effective_new_state(rec.old, rec.new, rec.flags) == state::TIME_WAIT {
                take_armed()
            } else {
                0
            },
            ..*rec
        };
        if tp.is_null() {
            emit_connection(slot, wakeup_bytes, rec, &addrs, owner, life);
        } else {
            // SAFETY: `tp` is the socket as a `tcp_sock` (from tcp_sock, not null).
            unsafe { emit_detailed_connection(slot, rec, &addrs, owner, life, tp) };
        }
    }
}

/// Updates the socket's storage for a transition at `rec.ts` (its life: a new one at a
/// birth, the time in the state left, the path and the evidence; the owner when its own
/// system call drives the transition) and fills `rec`'s duration, flags, namespace and
/// cgroup from it. Returns where the owner is: in the storage, or in `spare` when the socket
/// has none. A transition that the storage shows was missed before this one is counted in
/// `slot` of [`UNSEEN`] (but for a middle one the loader's `records` leave out on purpose).
///
/// # Safety
/// `st` is null or the socket's storage; `spare` is writable.
#[inline(always)]
unsafe fn life(
    st: *mut SkState,
    spare: *mut Owner,
    rec: &mut Record,
    slot: Slot,
    records: u32,
) -> *mut Owner {
    let (old, new) = (rec.old, rec.new);
    let driven = driven_by_owner(old, new);
    if st.is_null() {
        // SAFETY: `spare` is writable (this function's contract).
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
        if (*st).life.missed_before(old, records) {
            count(&UNSEEN, slot);
        }
        if let Some(d) = (*st)
            .life
            .on_transition_leaving_out(rec.ts, old, new, records)
        {
            rec.in_from = d;
            rec.flags |= flag::DURATION_KNOWN;
        }
        if takes_owner(old, new, (*owner).flags) {
            current_owner(owner);
        }
        rec.flags |= (*st).flags as u8;
        rec.netns = (*st).netns;
        rec.cgroup = (*st).cgroup;
        owner
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
    let _ = try_btf_destroy_sock(&ctx);
    0
}

fn try_btf_destroy_sock(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: *const u8 = ctx.arg(SK_ARG);
    // SAFETY: the tracepoint hands a full socket being destroyed; its storage, if not null,
    // is freed only after this program returns.
    unsafe {
        let st = storage(sk, false, Slot::Destroy);
        if st.is_null() {
            return Ok(());
        }
        if let Some(last) = (*st).life.unseen_end() {
            count(&UNSEEN, Slot::Destroy);
            set_state(sk, last, state::CLOSE, Slot::Destroy, true);
        }
    }
    Ok(())
}
