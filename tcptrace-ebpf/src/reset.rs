//! The BTF programs on resets: received (`tcp_receive_reset`) and sent (`tcp_send_reset`,
//! with a full, timewait or request socket, or none).

use core::{
    mem::MaybeUninit,
    ptr::{addr_of_mut, null_mut},
};

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tcptrace_common::{
    AF_INET, AF_INET6, Config, NO_REASON, Owner, filter_keeps, flag, kind, netns_keeps, records,
    socket_may_be_kept, state,
};

use crate::{
    config::{config, idle},
    emit::{Addrs, emit, reset_record},
    maps::{SkState, Slot, port_bits},
    mem::{field, kread_at, put},
    net::{
        IP_VERSION_SHIFT_BITS, IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET, IPV4_VERSION,
        IPV6_DADDR_OFFSET, IPV6_SADDR_OFFSET, IPV6_VERSION, U64_BYTES, v4_mapped,
    },
    owner::clear_owner,
    sock::{full_addrs, full_ends, sock_cgroup, sock_ends, sock_netns, storage, v6_at},
};

/// The positions of `tcp_send_reset(sk, skb[, reason])`'s arguments, and of
/// `tcp_receive_reset(sk)`'s.
const SK_ARG: usize = 0;
const SKB_ARG: usize = 1;
const REASON_ARG: usize = 2;

/// A reset arrived for a full socket: `tcp_receive_reset(sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_receive_reset(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_btf_receive_reset(&ctx);
    0
}

fn try_btf_receive_reset(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: *const u8 = ctx.arg(SK_ARG);
    // SAFETY: the tracepoint hands the full socket that received the reset.
    unsafe { receive_reset(sk) };
    Ok(())
}

/// Marks the socket as reset (its coming FIN_WAIT2/CLOSING→CLOSE is then no entry into
/// TIME_WAIT) before any filter, then reports the reset if kept.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn receive_reset(sk: *const u8) {
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
    let Some(ends) = (unsafe { full_ends(sk) }) else {
        return;
    };
    let cfg = config();
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
    let st = unsafe { storage(sk, true, Slot::ResetReceived) };
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut owner = spare.as_mut_ptr();
    let (mut netns, mut cgroup) = (0, 0);
    // SAFETY: `st` is the socket's storage or null (the socket is locked while it takes the
    // reset, so nothing else writes it); `spare` is a writable local.
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
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
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
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
    let addrs = unsafe { full_addrs(sk, &ends) };
    // SAFETY: `owner` is the storage's owner or `spare`, initialised above either way.
    let owner = unsafe { &*owner };
    emit(Slot::ResetReceived, cfg.wakeup_bytes, &rec, &addrs, owner);
}

/// This host sends a reset: `tcp_send_reset(sk, skb[, reason])`, with a full, timewait or
/// request socket, or none (a segment for a port nothing listens on: a refused connection).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_send_reset(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_btf_send_reset(&ctx);
    0
}

fn try_btf_send_reset(ctx: &BtfTracePointContext) -> Result<(), i32> {
    // The context is read at constant offsets only: the verifier allows no other.
    let reason = if config().send_reset_reason != 0 {
        u64::from(ctx.arg::<u64>(REASON_ARG) as u32)
    } else {
        NO_REASON
    };
    let sk: *const u8 = ctx.arg(SK_ARG);
    let skb: *const u8 = ctx.arg(SKB_ARG);
    // SAFETY: the tracepoint hands the socket (or null) and the segment answered.
    unsafe { send_reset(sk, skb, reason) };
    Ok(())
}

/// A sent reset's endpoints and socket facts.
struct Sent {
    state: u8,
    family: u16,
    sport: u16,
    dport: u16,
    addrs: Addrs,
}

/// A reset sent for `sk` (null: none) in answer to `skb`, with the kernel's `reason`
/// ([`NO_REASON`] when the kernel gives none): bookkept in the socket's storage before any
/// filter, then reported if kept.
///
/// # Safety
/// `sk` must be null or a socket, `skb` a segment, both handed to the program.
#[inline(always)]
unsafe fn send_reset(sk: *const u8, skb: *const u8, reason: u64) {
    let cfg = config();
    // SAFETY: `sk` (not null here) and `skb` were handed to the program (this function's
    // contract).
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
    let storage = if full {
        // SAFETY: `full`: `sk` is a full socket handed to the program.
        unsafe { bookkeep_sent(sk, st, (family, sport, dport), reason) }
    } else {
        null_mut()
    };
    if !sent_kept(cfg, sk.is_null(), st, (family, sport, dport)) {
        return;
    }
    let mut spare = MaybeUninit::<Owner>::uninit();
    let mut owner = spare.as_mut_ptr();
    let (mut netns, mut cgroup) = (0, 0);
    // SAFETY: `spare` is a writable local; `storage` is null or the socket's; `sk` is a
    // socket handed to the program when not null, a full one where `full`.
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
    // SAFETY: `owner` is the storage's owner or `spare`, initialised above either way.
    let owner = unsafe { &*owner };
    emit(Slot::ResetSent, cfg.wakeup_bytes, &rec, &addrs, owner);
}

/// The storage of the full socket `sk` in state `st` that sends a reset, with the reset
/// folded into its connection's life before any filter, like transitions (the connection
/// record holds it); null when it has none. A socket first met through the reset that
/// aborts it (it was open before tracing, and its abort writes the reset before the
/// transition) gets storage, as for a received one: its record then holds the reset
/// whichever came first. Not once it has ended, nor a listener's (answering a stray
/// segment), nor for a socket no filter keeps.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
unsafe fn bookkeep_sent(
    sk: *const u8,
    st: u8,
    (family, sport, dport): (u16, u16, u16),
    reason: u64,
) -> *mut SkState {
    let create = st != state::CLOSE
        && st != state::LISTEN
        && socket_may_be_kept(config(), family, sport, dport, port_bits);
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
    let storage = unsafe { storage(sk, create, Slot::ResetSent) };
    if !storage.is_null() {
        let reason = (reason != NO_REASON).then_some(reason as u32);
        // SAFETY: `storage` is the socket's (not null); the socket is locked while it sends a
        // reset, so nothing else writes it.
        unsafe { (*storage).life.on_reset(false, reason) };
    }
    storage
}

/// Whether a reset sent (with no socket when `no_socket`) in state `st` is reported: the
/// family filter; with views that read connections, only the resets no record holds (with
/// no socket — a refused connection — or after the end: an abortive close logs the
/// transition first); and the filters, for which a reset counts as being in the socket's
/// state.
#[inline(always)]
fn sent_kept(
    cfg: &Config,
    no_socket: bool,
    st: u8,
    (family, sport, dport): (u16, u16, u16),
) -> bool {
    if cfg.family != 0 && cfg.family != family {
        return false;
    }
    let unrecorded = no_socket || st == state::CLOSE;
    if cfg.records & records::NO_TRANSITIONS != 0 && !unrecorded {
        return false;
    }
    filter_keeps(cfg, family, st, st, 0, sport, dport, port_bits)
}

/// The endpoints of a socket sending a reset: a full one's as its transitions report them,
/// a timewait or request socket's from its `sock_common`.
///
/// # Safety
/// `sk` must be a socket handed to the program.
#[inline(always)]
unsafe fn socket_ends(sk: *const u8) -> Option<Sent> {
    let o = &config().sock;
    // SAFETY: `sk` is a socket handed to the program; `skc_*` are BTF offsets of
    // `sock_common`, which every kind of socket starts with; a full socket's other fields
    // are read only once its state says it is one.
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
    // SAFETY: `skb` is the segment handed to the program (not null), read at BTF offsets of
    // `sk_buff`; its headers are read with the checking helper.
    unsafe {
        let head: u64 = field(skb, o.skb_head);
        let ip = head + u64::from(field::<u16>(skb, o.skb_network_header));
        let tcp = head + u64::from(field::<u16>(skb, o.skb_transport_header));
        // The TCP header starts with the source port, then the destination port.
        let ports: u32 = kread_at(tcp)?;
        // The segment's source is the remote end.
        let (rport, lport) = (ports as u16, (ports >> u16::BITS) as u16);
        let version = kread_at::<u8>(ip)? >> IP_VERSION_SHIFT_BITS;
        let half = U64_BYTES as u64;
        let (family, saddr, daddr) = match version {
            IPV4_VERSION => (
                AF_INET,
                v4_mapped(kread_at(ip + IPV4_DADDR_OFFSET)?),
                v4_mapped(kread_at(ip + IPV4_SADDR_OFFSET)?),
            ),
            IPV6_VERSION => (
                AF_INET6,
                [
                    kread_at(ip + IPV6_DADDR_OFFSET)?,
                    kread_at(ip + IPV6_DADDR_OFFSET + half)?,
                ],
                [
                    kread_at(ip + IPV6_SADDR_OFFSET)?,
                    kread_at(ip + IPV6_SADDR_OFFSET + half)?,
                ],
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
