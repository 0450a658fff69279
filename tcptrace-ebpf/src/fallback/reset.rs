//! The classic programs on resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`.

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, Config, NO_REASON, Owner, filter_keeps, flag, kind, netns_keeps,
    state,
};

use super::{CtxPtr, SockInfo, read};
use crate::{
    config::{config, idle},
    emit::{Addrs, emit, reset_record},
    maps::{SOCKS, Slot, port_bits},
    mem::put,
    owner::{clear_owner, copy_owner},
    sock::{sock_cgroup_at as sock_cgroup, sock_netns_at as sock_netns},
};

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
pub(crate) fn try_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.send_reset;
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
        cfg,
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
pub(crate) fn try_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.receive_reset;
    let skaddr: u64 = read(ctx, o.skaddr)?;
    let family: u16 = read(ctx, o.family)?;
    let sport: u16 = read(ctx, o.sport)?;
    let dport: u16 = read(ctx, o.dport)?;
    // The socket's state is not in this record; the per-socket map does not keep it either,
    // so userspace takes it from the socket's transitions.
    reset(
        cfg,
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
pub(crate) fn reset(
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
    // SAFETY: both paths above initialised the owner.
    emit(slot, cfg.wakeup_bytes, &rec, addrs, unsafe { &*owner_ptr });
    Ok(())
}
