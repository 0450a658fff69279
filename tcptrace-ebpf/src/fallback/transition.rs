//! The classic program on TCP's transitions: `sock:inet_sock_set_state`.

use core::{
    mem::MaybeUninit,
    ptr::{addr_of_mut, null_mut},
};

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{
    Config, IPPROTO_MPTCP, Owner, SetStateOffsets, driven_by_owner, filter_keeps, flag, kind,
    netns_keeps, state, takes_owner,
};

use super::{K, SockInfo, load, read, record_addrs};
use crate::{
    config::{config, idle},
    emit::{Addrs, Record, emit},
    maps::{SOCKS, Slot, port_bits},
    mem::put,
    net::{IPV6_ADDR_BYTES, U64_BYTES},
    owner::{clear_owner, copy_owner, current_owner, inherit_listener, listener},
    sock::{protocol_kept, sock_cgroup_at, sock_netns_at},
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Err(err) = try_inet_sock_set_state(&ctx) {
        // Only a wrong offset or a kernel that changed the record gets here: say so through
        // aya-log rather than dropping transitions silently.
        crate::log_set_state_unreadable(&ctx, err);
    }
    0
}

/// Reads the record — with plain loads where the loader found the layout it knows, else
/// field by field with the checking helper — and handles the transition. The verifier,
/// reading `known_layout` as the constant the loader froze, keeps one of the two.
fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.offsets;
    if o.known_layout != 0 {
        let (t, addrs) = loaded_fields(ctx);
        return on_transition(cfg, &t, &addrs);
    }
    let (t, addrs) = read_fields(ctx, o)?;
    on_transition(cfg, &t, &addrs)
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

/// The record's fields at the offsets every kernel tcptrace knows ([`K`]): one load each.
#[inline(always)]
fn loaded_fields(ctx: &TracePointContext) -> (Fields, Addrs) {
    let (v6, d6) = (K.saddr_v6 as usize, K.daddr_v6 as usize);
    let t = Fields {
        protocol: load(ctx, K.protocol),
        family: load(ctx, K.family),
        old: load::<i32>(ctx, K.oldstate) as u8,
        new: load::<i32>(ctx, K.newstate) as u8,
        skaddr: load(ctx, K.skaddr),
        sport: load(ctx, K.sport),
        dport: load(ctx, K.dport),
    };
    let addrs = Addrs::Loaded {
        saddr: [load(ctx, v6), load(ctx, v6 + U64_BYTES)],
        daddr: [load(ctx, d6), load(ctx, d6 + U64_BYTES)],
    };
    (t, addrs)
}

/// The record's fields at the offsets of its format file, read with the checking helper.
#[inline(always)]
fn read_fields(ctx: &TracePointContext, o: &SetStateOffsets) -> Result<(Fields, Addrs), i32> {
    let t = Fields {
        protocol: read(ctx, o.protocol)?,
        family: read(ctx, o.family)?,
        old: read::<i32>(ctx, o.oldstate)? as u8,
        new: read::<i32>(ctx, o.newstate)? as u8,
        skaddr: read(ctx, o.skaddr)?,
        sport: read(ctx, o.sport)?,
        dport: read(ctx, o.dport)?,
    };
    let (saddr, daddr) = (usize::from(o.saddr_v6), usize::from(o.daddr_v6));
    let addrs = record_addrs(ctx, saddr, daddr, IPV6_ADDR_BYTES);
    Ok((t, addrs))
}

/// One transition, wherever its fields came from: the per-socket bookkeeping, the filters,
/// and the event.
#[inline(always)]
fn on_transition(cfg: &Config, t: &Fields, addrs: &Addrs) -> Result<(), i32> {
    if !protocol_kept(cfg, t.protocol, t.family) {
        return Ok(());
    }
    // SAFETY: a helper without arguments or memory access.
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-socket bookkeeping happens before filtering, so durations stay right for sockets
    // whose earlier transitions were filtered out (an lport filter drops connect()'s
    // CLOSE→SYN_SENT, which has no local port yet).
    let mut owner = MaybeUninit::<Owner>::uninit();
    // SAFETY: `owner` is a writable local.
    let mut facts = unsafe { bookkeep(cfg, t, now, owner.as_mut_ptr()) };
    // SAFETY: bookkeep initialised the owner on every path.
    let owner = unsafe { owner.assume_init_ref() };
    let keep = filter_keeps(
        cfg,
        t.family,
        t.old,
        t.new,
        facts.flags,
        t.sport,
        t.dport,
        port_bits,
    );
    let listener_change = (t.old == state::CLOSE && t.new == state::LISTEN)
        || (t.old == state::LISTEN && t.new == state::CLOSE);
    // Read only for what is kept (two reads for the namespace, three for the cgroup), and
    // the namespace of a listener coming or going, for its key.
    let read_now = keep && facts.cgroup == 0;
    if (read_now || listener_change) && facts.netns == 0 {
        facts.netns = sock_netns_at(&cfg.ns, t.skaddr);
    }
    if read_now {
        facts.cgroup = sock_cgroup_at(&cfg.ns, t.skaddr);
    }
    // SAFETY: `facts.entry` is null or the live SOCKS value bookkeep found.
    unsafe { keep_facts(t, now, &facts, owner, read_now) };
    if listener_change {
        listener(t.old, facts.netns, t.sport, owner, Slot::Transition);
    }
    if !keep || !netns_keeps(cfg, facts.netns) {
        return Ok(());
    }
    let rec = Record {
        ts: now,
        skaddr: t.skaddr,
        in_from: facts.in_from,
        aux: 0,
        sport: t.sport,
        dport: t.dport,
        family: t.family,
        kind: kind::TRANSITION,
        old: t.old,
        new: t.new,
        flags: facts.flags,
        netns: facts.netns,
        cgroup: facts.cgroup,
    };
    emit(Slot::Transition, cfg.wakeup_bytes, &rec, addrs, owner);
    Ok(())
}

/// What the per-socket map knows of a transition's socket, once updated for it.
struct Facts {
    /// Nanoseconds in the state left (with [`flag::DURATION_KNOWN`] in `flags`).
    in_from: u64,
    /// The event's [`flag`]s known so far.
    flags: u8,
    /// The socket's network namespace inode and cgroup id (0: not read yet, or unknown):
    /// once read, they stay in its entry, five kernel reads per socket instead of per
    /// transition.
    netns: u32,
    cgroup: u64,
    /// The socket's entry when it stays in the map (null otherwise), to keep them in.
    entry: *mut SockInfo,
    /// The socket has no entry and lives on: one is inserted.
    insert: bool,
}

/// Updates the socket's map entry for this transition at `now`, fills `owner`, and returns
/// what the entry knows.
///
/// # Safety
/// `owner` must be writable; every path initialises it.
#[inline(always)]
unsafe fn bookkeep(cfg: &Config, t: &Fields, now: u64, owner: *mut Owner) -> Facts {
    let mut facts = Facts {
        in_from: 0,
        flags: if t.protocol == IPPROTO_MPTCP {
            flag::MPTCP
        } else {
            0
        },
        netns: 0,
        cgroup: 0,
        entry: null_mut(),
        insert: false,
    };
    // A socket's first transition: whatever the map holds for this address belongs to an
    // earlier socket the slab gave the same memory (its end was skipped or filtered): start
    // afresh rather than inherit its owner and times.
    let birth = (t.old == state::CLOSE && (t.new == state::SYN_SENT || t.new == state::LISTEN))
        || (t.old == state::LISTEN && t.new == state::SYN_RECV);
    let known = if birth {
        None
    } else {
        SOCKS.get_ptr_mut(t.skaddr)
    };
    match known {
        // SAFETY: `info` is the live SOCKS value just found; `owner` is writable (this
        // function's contract).
        Some(info) => unsafe { known_socket(info, t, now, owner, &mut facts) },
        // SAFETY: `owner` is writable.
        None => unsafe { new_socket(cfg, t, owner, &mut facts) },
    }
    facts
}

/// A socket the map knows: the time in the state left, its owner (the current task's, when
/// its own system call drives this transition), flags, namespace and cgroup. Its entry goes
/// at its end: a closed socket, or one that a timewait socket replaces (the full socket is
/// freed right after; nothing more is logged for this address).
///
/// # Safety
/// `info` must be a live value of [`SOCKS`], `owner` writable.
#[inline(always)]
unsafe fn known_socket(
    info: *mut SockInfo,
    t: &Fields,
    now: u64,
    owner: *mut Owner,
    facts: &mut Facts,
) {
    // SAFETY: as the caller vouches; map values stay valid while the program runs.
    unsafe {
        // last_ts is 0 for a socket first met through a reset it received.
        if (*info).last_ts != 0 {
            facts.in_from = now.wrapping_sub((*info).last_ts);
            facts.flags |= flag::DURATION_KNOWN;
        }
        if takes_owner(t.old, t.new, (*info).owner.flags) {
            current_owner(addr_of_mut!((*info).owner));
        }
        (*info).last_ts = now;
        facts.flags |= (*info).flags as u8;
        copy_owner(owner, addr_of_mut!((*info).owner));
        facts.netns = (*info).netns;
        facts.cgroup = (*info).cgroup;
    }
    if t.new == state::CLOSE || t.new == state::TIME_WAIT {
        let _ = SOCKS.remove(t.skaddr);
    } else {
        facts.entry = info;
    }
}

/// A socket the map does not know (new, evicted, or open before tracing began): its owner
/// is the current task when its own system call drives the transition, its listener's for
/// an accepted socket, else unknown. It gets an entry unless this is its end.
///
/// # Safety
/// `owner` must be writable.
#[inline(always)]
unsafe fn new_socket(cfg: &Config, t: &Fields, owner: *mut Owner, facts: &mut Facts) {
    // SAFETY: `owner` is writable, as the caller vouches.
    unsafe {
        if driven_by_owner(t.old, t.new) {
            current_owner(owner);
        } else if t.old == state::LISTEN && t.new == state::SYN_RECV {
            // The child is in its listener's namespace: read it now, for the key.
            facts.netns = sock_netns_at(&cfg.ns, t.skaddr);
            if !inherit_listener(owner, facts.netns, t.sport) {
                clear_owner(owner);
            }
        } else {
            clear_owner(owner);
        }
    }
    facts.insert = t.new != state::CLOSE && t.new != state::TIME_WAIT;
}

/// Keeps what the transition taught in the socket's map entry: a new entry (its time, owner,
/// namespace and cgroup), or the namespace and cgroup just read (`read_now`) in the one
/// found.
///
/// # Safety
/// `facts.entry` must be null or a live value of [`SOCKS`].
#[inline(always)]
unsafe fn keep_facts(t: &Fields, now: u64, facts: &Facts, owner: &Owner, read_now: bool) {
    if facts.insert {
        let mut info = MaybeUninit::<SockInfo>::uninit();
        let i = info.as_mut_ptr();
        // SAFETY: `i` is a writable local, every field of which is written before the
        // insert reads it.
        unsafe {
            put(addr_of_mut!((*i).last_ts), now);
            put(addr_of_mut!((*i).flags), 0);
            put(addr_of_mut!((*i).netns), facts.netns);
            put(addr_of_mut!((*i).cgroup), facts.cgroup);
            copy_owner(addr_of_mut!((*i).owner), owner);
            let _ = SOCKS.insert(t.skaddr, &*i, 0);
        }
    } else if read_now && !facts.entry.is_null() {
        let entry = facts.entry;
        // SAFETY: the live entry found by bookkeep, as the caller vouches.
        unsafe {
            put(addr_of_mut!((*entry).netns), facts.netns);
            put(addr_of_mut!((*entry).cgroup), facts.cgroup);
        }
    }
}
