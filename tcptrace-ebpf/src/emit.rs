//! The records written into the `EVENTS` ring buffer: one event, a connection record, either
//! with its connection's details before it. Every field is written straight into the
//! reserved slot.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RINGBUF_HDR_SZ},
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_kernel},
};
use tcptrace_common::{
    Event, Owner,
    connection::{ConnectionRecord, STATES_LEFT, SockLife},
    details::{Details, details_flag},
    kind,
};

use crate::{
    config::config,
    maps::{EVENTS, LOST, Slot, count},
    mem::{field, put},
    net::{IPV4_ADDR_BYTES, V4_MAPPED_ADDR_OFFSET, V4_MAPPED_HIGH},
};

/// The scalar fields of one event.
#[derive(Clone, Copy)]
pub(crate) struct Record {
    pub(crate) ts: u64,
    pub(crate) skaddr: u64,
    pub(crate) in_from: u64,
    pub(crate) aux: u64,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) family: u16,
    pub(crate) kind: u8,
    pub(crate) old: u8,
    pub(crate) new: u8,
    pub(crate) flags: u8,
    /// The socket's network namespace inode (0: unknown).
    pub(crate) netns: u32,
    /// The socket's cgroup id (0: unknown).
    pub(crate) cgroup: u64,
}

/// The event's two addresses.
pub(crate) enum Addrs {
    /// In kernel memory (the tracepoint record, a timewait socket), `len` bytes each
    /// ([`IPV4_ADDR_BYTES`], [`IPV6_ADDR_BYTES`](crate::net::IPV6_ADDR_BYTES), or 0 for
    /// none).
    Read {
        saddr: *const u8,
        daddr: *const u8,
        len: u32,
    },
    /// Already loaded from the record: 16 bytes each.
    Loaded { saddr: [u64; 2], daddr: [u64; 2] },
}

/// Zeroes 16 bytes at an 8-byte aligned address.
///
/// # Safety
/// `dst` must be writable and 8-byte aligned.
#[inline(always)]
pub(crate) unsafe fn zero16(dst: *mut [u8; 16]) {
    // SAFETY: two aligned 8-byte stores inside the 16 bytes the caller vouches for.
    unsafe {
        put(dst.cast::<u64>(), 0);
        put(dst.cast::<u64>().add(1), 0);
    }
}

/// The record of a reset of kind `k` on the socket at `skaddr` (0: none) in state `st` (0:
/// not reported), now.
#[inline(always)]
pub(crate) fn reset_record(
    k: u8,
    skaddr: u64,
    aux: u64,
    (family, sport, dport): (u16, u16, u16),
    st: u8,
    (netns, cgroup): (u32, u64),
) -> Record {
    Record {
        // SAFETY: a helper without arguments or memory access.
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

/// Writes one event into the ring buffer, or counts it lost in `slot`.
#[inline(always)]
pub(crate) fn emit(slot: Slot, wakeup_bytes: u32, r: &Record, a: &Addrs, owner: &Owner) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(&LOST, slot);
        return;
    };
    // SAFETY: the reserved entry is an `Event`, ours to write until submitted.
    unsafe { fill(entry.as_mut_ptr(), r, a, owner) };
    entry.submit(wake_flags(wakeup_bytes, core::mem::size_of::<Event>()));
}

/// Writes a connection record (the end transition `r`, then `life`'s tail) into the ring
/// buffer as one entry, or counts it lost in `slot`.
#[inline(always)]
pub(crate) fn emit_connection(
    slot: Slot,
    wakeup_bytes: u32,
    r: &Record,
    a: &Addrs,
    owner: &Owner,
    life: &SockLife,
) {
    let Some(mut entry) = EVENTS.reserve::<ConnectionRecord>(0) else {
        count(&LOST, slot);
        return;
    };
    // SAFETY: the reserved entry is a `ConnectionRecord`, ours to write until submitted.
    unsafe { fill_connection(entry.as_mut_ptr(), r, a, owner, life) };
    entry.submit(wake_flags(
        wakeup_bytes,
        core::mem::size_of::<ConnectionRecord>(),
    ));
}

/// Writes every field of a connection record: the end transition `r`, then `life`'s tail.
///
/// # Safety
/// `c` must be writable (a reserved ring-buffer entry).
#[inline(always)]
pub(crate) unsafe fn fill_connection(
    c: *mut ConnectionRecord,
    r: &Record,
    a: &Addrs,
    owner: &Owner,
    life: &SockLife,
) {
    // SAFETY: every store is inside `*c`, which the caller vouches is writable; each is a
    // separate volatile one (see `put`).
    unsafe {
        fill(addr_of_mut!((*c).head), r, a, owner);
        put(addr_of_mut!((*c).head.kind), kind::CONNECTION);
        let t = addr_of_mut!((*c).tail);
        let mut i = 0;
        while i < STATES_LEFT {
            put(addr_of_mut!((*t).in_state_ns[i]), life.in_state_ns[i]);
            i += 1;
        }
        put(addr_of_mut!((*t).entered), life.entered);
        put(addr_of_mut!((*t).kind), kind::CONNECTION_TAIL);
        put(addr_of_mut!((*t).first_from), life.first_from);
        put(addr_of_mut!((*t).evidence), life.evidence);
        put(addr_of_mut!((*t).flags), life.flags);
        put(addr_of_mut!((*t)._pad), 0);
        put(addr_of_mut!((*t).reset_reason), life.reset_reason);
        put(addr_of_mut!((*t)._pad2), 0);
        put(addr_of_mut!((*t).born_ns), life.born_ns);
    }
}

/// Writes every field of one event.
///
/// # Safety
/// `e` must be writable (a reserved ring-buffer entry).
#[inline(always)]
pub(crate) unsafe fn fill(e: *mut Event, r: &Record, a: &Addrs, owner: &Owner) {
    // SAFETY: every store is inside `*e`, which the caller vouches is writable; each is a
    // separate volatile one (see `put`). The addresses of `Addrs::Read` are only read
    // through bpf_probe_read_kernel, which checks them.
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
                let at = if len == IPV4_ADDR_BYTES {
                    put(s.cast::<u64>().add(1), V4_MAPPED_HIGH);
                    put(d.cast::<u64>().add(1), V4_MAPPED_HIGH);
                    V4_MAPPED_ADDR_OFFSET
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
        put(comm, owner.comm[0]);
        put(comm.add(1), owner.comm[1]);
        put(addr_of_mut!((*e).pid), owner.pid);
        put(addr_of_mut!((*e).sport), r.sport);
        put(addr_of_mut!((*e).dport), r.dport);
        put(addr_of_mut!((*e).family), r.family);
        put(addr_of_mut!((*e).kind), r.kind);
        put(addr_of_mut!((*e).oldstate), r.old);
        put(addr_of_mut!((*e).newstate), r.new);
        put(addr_of_mut!((*e).flags), r.flags | owner.flags as u8);
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
pub(crate) fn wake_flags(wakeup_bytes: u32, size: usize) -> u64 {
    let wake = if wakeup_bytes == 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        let w = wakeup_bytes as u64;
        // Unread bytes, this record (and its header) included.
        let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        let before = avail.saturating_sub(size as u64 + BPF_RINGBUF_HDR_SZ as u64);
        if avail / w != before / w {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    };
    wake as u64
}

/// Writes the end's [`Details`] slot, read from the socket's counters.
///
/// # Safety
/// `d` must be writable; `tp` must be the socket as a `tcp_sock` (from
/// [`tcp_sock`](crate::sock::tcp_sock)).
#[inline(always)]
pub(crate) unsafe fn fill_details(d: *mut Details, r: &Record, tp: *const u8) {
    let o = &config().tcp;
    // SAFETY: every load is a `tcp_sock` field at its BTF offset, which the verifier checks;
    // every store is inside `*d`, which the caller vouches is writable, a separate volatile
    // one (see `put`).
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
        put(
            addr_of_mut!((*d).srtt_us),
            field::<u32>(tp, o.srtt_us) >> SRTT_SHIFT_BITS,
        );
        put(
            addr_of_mut!((*d).rttvar_us),
            field::<u32>(tp, o.mdev_us) >> MDEV_SHIFT_BITS,
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

/// `tcp_sock.srtt_us` holds 8 times the smoothed round-trip time (the kernel's fixed point).
const SRTT_SHIFT_BITS: u32 = 3;
/// `tcp_sock.mdev_us` holds 4 times its mean deviation.
const MDEV_SHIFT_BITS: u32 = 2;

/// An end transition with its [`Details`] before it: one entry of two slots.
#[repr(C)]
pub(crate) struct DetailedEnd {
    details: Details,
    end: Event,
}

/// A connection record with its [`Details`] before it: one entry of three slots.
#[repr(C)]
pub(crate) struct DetailedConnection {
    details: Details,
    connection: ConnectionRecord,
}

/// Writes the end transition `r` after its details, as one entry, or counts it lost.
///
/// # Safety
/// `tp` must be the socket as a `tcp_sock`, as for [`fill_details`].
#[inline(always)]
pub(crate) unsafe fn emit_detailed_end(
    slot: Slot,
    r: &Record,
    a: &Addrs,
    owner: &Owner,
    tp: *const u8,
) {
    let Some(mut entry) = EVENTS.reserve::<DetailedEnd>(0) else {
        count(&LOST, slot);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved entry is a `DetailedEnd`, ours to write until submitted; the
    // caller vouches for `tp`.
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
/// `tp` must be the socket as a `tcp_sock`, as for [`fill_details`].
#[inline(always)]
pub(crate) unsafe fn emit_detailed_connection(
    slot: Slot,
    r: &Record,
    a: &Addrs,
    owner: &Owner,
    life: &SockLife,
    tp: *const u8,
) {
    let Some(mut entry) = EVENTS.reserve::<DetailedConnection>(0) else {
        count(&LOST, slot);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved entry is a `DetailedConnection`, ours to write until submitted;
    // the caller vouches for `tp`.
    unsafe {
        fill_details(addr_of_mut!((*e).details), r, tp);
        fill_connection(addr_of_mut!((*e).connection), r, a, owner, life);
    }
    let size = core::mem::size_of::<DetailedConnection>();
    entry.submit(wake_flags(config().wakeup_bytes, size));
}
