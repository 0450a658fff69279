//! The classic program on TCP's transitions: `sock:inet_sock_set_state`.

use core::ptr::addr_of_mut;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{
    Config, IPPROTO_MPTCP, IPPROTO_TCP, Owner, driven_by_owner, filter_keeps, flag, kind,
    netns_keeps, state,
};

use super::{CtxPtr, K, SockInfo, load, read};
use crate::{
    config::{config, idle},
    emit::{Addrs, Record, emit},
    maps::{LISTENERS, SOCKS, Slot, forgot, listen_key, port_bits},
    mem::put,
    owner::{clear_owner, copy_owner, current_owner},
    sock::{sock_cgroup_at as sock_cgroup, sock_netns_at as sock_netns},
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Err(err) = try_set_state(&ctx) {
        // Only a wrong offset or a kernel that changed the record gets here: say so through
        // aya-log rather than dropping transitions silently.
        crate::log_set_state_unreadable(&ctx, err);
    }
    0
}

pub(crate) fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.offsets;
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
        return on_transition(cfg, &f, &addrs);
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
    on_transition(cfg, &f, &addrs)
}

/// The fields of one `inet_sock_set_state` transition.
#[derive(Clone, Copy)]
pub(crate) struct Fields {
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
pub(crate) fn on_transition(cfg: &Config, f: &Fields, addrs: &Addrs) -> Result<(), i32> {
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
    let keep = filter_keeps(cfg, family, old, new, flags, sport, dport, port_bits);
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

    if !keep || !netns_keeps(cfg, netns) {
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
    // SAFETY: every path above initialised the owner.
    let owner = unsafe { &*owner_ptr };
    emit(Slot::Transition, cfg.wakeup_bytes, &rec, addrs, owner);
    Ok(())
}
