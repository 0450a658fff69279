//! The classic programs on resets: `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`.

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, Config, NO_REASON, Owner, filter_keeps, flag, kind, netns_keeps,
    state,
};

use super::{SockInfo, read, record_addrs};
use crate::{
    config::{config, idle},
    emit::{Addrs, emit, reset_record},
    maps::{SOCKS, Slot, port_bits},
    mem::put,
    net::{
        IPV4_ADDR_BYTES, IPV6_ADDR_BYTES, SOCKADDR_IN_ADDR_OFFSET, SOCKADDR_IN6_ADDR_OFFSET,
        SOCKADDR_PORT_OFFSET,
    },
    owner::{clear_owner, copy_owner},
    sock::{sock_cgroup_at, sock_netns_at},
};

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_tcp_send_reset(&ctx);
    0
}

/// A reset this host sends: by a socket (an abort, a reset in answer to a bad segment) or, with
/// no socket, in answer to a segment for a port nothing listens on (a refused connection).
fn try_tcp_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.send_reset;
    let skaddr: u64 = read(ctx, o.skaddr)?;
    let st = read::<i32>(ctx, o.state)? as u8;
    let reason = if o.reason == ABSENT {
        NO_REASON
    } else {
        u64::from(read::<u32>(ctx, o.reason)?)
    };
    // sockaddr_in / sockaddr_in6, the family first. The kernel stores the local side in
    // saddr.
    let family: u16 = read(ctx, o.saddr)?;
    let (addr_at, len) = match family {
        AF_INET => (SOCKADDR_IN_ADDR_OFFSET, IPV4_ADDR_BYTES),
        AF_INET6 => (SOCKADDR_IN6_ADDR_OFFSET, IPV6_ADDR_BYTES),
        _ => return Ok(()),
    };
    let reset = Reset {
        kind: kind::RESET_SENT,
        skaddr,
        state: st,
        reason,
        family,
        sport: u16::from_be(read(ctx, o.saddr + SOCKADDR_PORT_OFFSET)?),
        dport: u16::from_be(read(ctx, o.daddr + SOCKADDR_PORT_OFFSET)?),
    };
    let (saddr, daddr) = (
        usize::from(o.saddr) + addr_at,
        usize::from(o.daddr) + addr_at,
    );
    let addrs = record_addrs(ctx, saddr, daddr, len);
    on_reset(cfg, &reset, &addrs)
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_tcp_receive_reset(&ctx);
    0
}

/// A reset that arrived for one of this host's sockets.
fn try_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.receive_reset;
    // The socket's state is not in this record; the per-socket map does not keep it either,
    // so userspace takes it from the socket's transitions.
    let reset = Reset {
        kind: kind::RESET_RECEIVED,
        skaddr: read(ctx, o.skaddr)?,
        state: 0,
        reason: 0,
        family: read(ctx, o.family)?,
        sport: read(ctx, o.sport)?,
        dport: read(ctx, o.dport)?,
    };
    let (saddr, daddr) = (usize::from(o.saddr_v6), usize::from(o.daddr_v6));
    let addrs = record_addrs(ctx, saddr, daddr, IPV6_ADDR_BYTES);
    on_reset(cfg, &reset, &addrs)
}

/// One reset, from either tracepoint's record.
struct Reset {
    /// [`kind::RESET_SENT`] or [`kind::RESET_RECEIVED`].
    kind: u8,
    /// The socket (0: none).
    skaddr: u64,
    /// The socket's state (0: not in the record).
    state: u8,
    /// The kernel's reason for a sent reset ([`NO_REASON`]: not given), the event's `aux`.
    reason: u64,
    family: u16,
    sport: u16,
    dport: u16,
}

/// One reset: the filters, what the socket's map entry knows, and the event.
#[inline(always)]
fn on_reset(cfg: &Config, r: &Reset, addrs: &Addrs) -> Result<(), i32> {
    if cfg.family != 0 && cfg.family != r.family {
        return Ok(());
    }
    // A reset counts as being in the socket's state for the state filter (a received reset's
    // state is unknown, so it never matches one).
    if !filter_keeps(
        cfg, r.family, r.state, r.state, 0, r.sport, r.dport, port_bits,
    ) {
        return Ok(());
    }
    let mut owner = MaybeUninit::<Owner>::uninit();
    // SAFETY: `owner` is a writable local.
    let (mut netns, mut cgroup) = unsafe { bookkeep(r, owner.as_mut_ptr()) };
    // Not known from the socket's entry: read. A sent reset's socket may be a timewait or
    // request socket: both start with a sock_common (the namespace is there), neither has
    // a cgroup. No socket: neither.
    if netns == 0 {
        netns = sock_netns_at(&cfg.ns, r.skaddr);
        cgroup = if r.state == state::TIME_WAIT || r.state == state::NEW_SYN_RECV {
            0
        } else {
            sock_cgroup_at(&cfg.ns, r.skaddr)
        };
    }
    if !netns_keeps(cfg, netns) {
        return Ok(());
    }
    let rec = reset_record(
        r.kind,
        r.skaddr,
        r.reason,
        (r.family, r.sport, r.dport),
        r.state,
        (netns, cgroup),
    );
    let slot = if r.kind == kind::RESET_SENT {
        Slot::ResetSent
    } else {
        Slot::ResetReceived
    };
    // SAFETY: bookkeep initialised the owner on both paths.
    let owner = unsafe { owner.assume_init_ref() };
    emit(slot, cfg.wakeup_bytes, &rec, addrs, owner);
    Ok(())
}

/// Copies the socket's owner from its map entry into `owner` (none known without one) and
/// returns its namespace and cgroup (0: not known); a received reset is remembered in the
/// entry, made for it if there is none, so that the socket's coming FIN_WAIT2/CLOSING→CLOSE
/// is not taken for an entry into TIME_WAIT.
///
/// # Safety
/// `owner` must be writable; both paths initialise it.
#[inline(always)]
unsafe fn bookkeep(r: &Reset, owner: *mut Owner) -> (u32, u64) {
    let received = r.kind == kind::RESET_RECEIVED;
    match SOCKS.get_ptr_mut(r.skaddr) {
        // SAFETY: `info` is the live SOCKS value just found; `owner` is writable (this
        // function's contract).
        Some(info) => unsafe {
            if received {
                (*info).flags |= flag::RESET_RECEIVED as u32;
            }
            copy_owner(owner, addr_of_mut!((*info).owner));
            ((*info).netns, (*info).cgroup)
        },
        None => {
            // SAFETY: `owner` is writable.
            unsafe { clear_owner(owner) };
            if received {
                let mut info = MaybeUninit::<SockInfo>::uninit();
                let i = info.as_mut_ptr();
                // SAFETY: `i` is a writable local, every field of which is written before
                // the insert reads it; `owner` was just initialised.
                unsafe {
                    put(addr_of_mut!((*i).last_ts), 0);
                    put(addr_of_mut!((*i).flags), flag::RESET_RECEIVED as u32);
                    put(addr_of_mut!((*i).netns), 0);
                    put(addr_of_mut!((*i).cgroup), 0);
                    copy_owner(addr_of_mut!((*i).owner), owner);
                    let _ = SOCKS.insert(r.skaddr, &*i, 0);
                }
            }
            (0, 0)
        }
    }
}
