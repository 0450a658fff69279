//! What the programs read of a socket: through BTF-typed loads for the BTF programs (its
//! storage, endpoints, namespace, cgroup, its `tcp_sock`), or through the checking helper
//! at a plain address (the namespace and cgroup, for the classic and timer programs).

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, null, null_mut},
};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::generated::{bpf_probe_read_kernel, bpf_sk_storage_get, bpf_skc_to_tcp_sock},
};
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, Config, INET_SPAN_BYTES, IPPROTO_MPTCP, IPPROTO_TCP, NsOffsets,
    bench, records,
};

use crate::{
    config::config,
    emit::Addrs,
    maps::{SK_STATE, SkState, Slot, forgot},
    mem::{field, kread},
    net::{U64_BYTES, v4_mapped},
};

/// The socket's storage, created (zeroed) if `create` and it has none (never when the bench
/// prices it: [`bench::NO_STORAGE`]); null when the kernel could not allocate it (counted)
/// or, without `create`, when it has none.
///
/// # Safety
/// `sk` must be a full socket handed to the program (a request socket maps to its listener).
#[inline(always)]
pub(crate) unsafe fn storage(sk: *const u8, create: bool, slot: Slot) -> *mut SkState {
    // The bench's switch that prices the storage: none is created, whoever asks.
    let create = create && config().bench & bench::NO_STORAGE == 0;
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
pub(crate) unsafe fn inet_span(sk: *const u8) -> (u32, u16) {
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
    let sport = (span >> (u64::from(u8::BITS) * u64::from(cfg.sock.inet_sport_in_span))) as u16;
    (span as u32, u16::from_be(sport))
}

/// The inode number of a socket's network namespace (full, timewait or request socket: all
/// start with a `sock_common`); 0 when unknown.
///
/// # Safety
/// `sk` must be a socket handed to the program.
#[inline(always)]
pub(crate) unsafe fn sock_netns(sk: *const u8) -> u32 {
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
pub(crate) unsafe fn sock_cgroup(sk: *const u8) -> u64 {
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

/// The inode number of the network namespace of the socket at `sk` (a full, timewait or
/// request socket: all start with a `sock_common`); 0 when unknown.
#[inline(always)]
pub(crate) fn sock_netns_at(o: &NsOffsets, sk: u64) -> u32 {
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
pub(crate) fn sock_cgroup_at(o: &NsOffsets, sk: u64) -> u64 {
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

/// A 16-byte address field of a kernel object.
///
/// # Safety
/// As [`field`], for an `in6_addr` at `off`.
#[inline(always)]
pub(crate) unsafe fn v6_at(obj: *const u8, off: u16) -> [u64; 2] {
    // SAFETY: two loads inside the 16-byte field.
    unsafe { [field(obj, off), field(obj, off + U64_BYTES as u16)] }
}

/// The endpoints of a full socket: what `inet_sock_set_state`'s record holds.
pub(crate) struct Ends {
    pub(crate) protocol: u16,
    pub(crate) family: u16,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// IPv4 local address, network order (IPv6 ones are loaded when emitting).
    pub(crate) saddr4: u32,
}

/// Reads an IPv4 or IPv6 full socket's protocol, family and ports.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
pub(crate) unsafe fn sock_ends(sk: *const u8) -> Option<Ends> {
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

/// Whether the loader's protocol and family filters keep a socket: TCP, or MPTCP when asked
/// for, of the family asked for (0: either).
#[inline(always)]
pub(crate) fn protocol_kept(cfg: &Config, protocol: u16, family: u16) -> bool {
    let mptcp_kept = protocol == IPPROTO_MPTCP && cfg.mptcp != 0;
    if protocol != IPPROTO_TCP && !mptcp_kept {
        return false;
    }
    cfg.family == 0 || cfg.family == family
}

/// [`sock_ends`] of a socket that the loader's protocol and family filters keep.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
pub(crate) unsafe fn full_ends(sk: *const u8) -> Option<Ends> {
    let cfg = config();
    // SAFETY: `sk` is a full socket handed to the program (this function's contract).
    let e = unsafe { sock_ends(sk)? };
    protocol_kept(cfg, e.protocol, e.family).then_some(e)
}

/// A full socket's addresses, in the form of the tracepoint's record.
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
pub(crate) unsafe fn full_addrs(sk: *const u8, e: &Ends) -> Addrs {
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

/// The socket as a `tcp_sock` (a BTF pointer the verifier checks loads from) when the
/// loader asked for [`Details`](tcptrace_common::details::Details); null otherwise, or for
/// a socket that is not TCP's (an MPTCP meta socket).
///
/// # Safety
/// `sk` must be a full socket handed to the program.
#[inline(always)]
pub(crate) unsafe fn tcp_sock(sk: *const u8) -> *const u8 {
    let cfg = config();
    if cfg.records & records::DETAILS == 0 || cfg.tcp.known == 0 {
        return null();
    }
    // SAFETY: the helper checks that `sk` is a full TCP socket, or returns null.
    unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }
        .cast::<u8>()
        .cast_const()
}
