//! What the kernel's own counters say of a connection when it ends: bytes, segments,
//! retransmissions, round-trip times, and the error and timer state that tell why it ended.
//!
//! The BTF transition program reads them once per connection, from the socket
//! (`struct tcp_sock`, through `bpf_skc_to_tcp_sock`, at offsets the loader found in the
//! kernel's BTF: [`TcpOffsets`]), and writes them as one [`Details`] slot right before the
//! end's own record (the end transition, or a connection record), in the same ring-buffer
//! reservation, so the two are always adjacent and in that order.

use bytemuck::{Pod, Zeroable};

use crate::{ABSENT, Event};

/// One slot, of [`Event`]'s size, kind [`DETAILS`](crate::kind::DETAILS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Details {
    /// When they were read (CLOCK_MONOTONIC ns): the end's own time.
    pub ts_ns: u64,
    /// The socket's kernel address: the end record's `skaddr`.
    pub skaddr: u64,
    /// `tcp_sock.bytes_acked`: bytes this side sent that the peer acknowledged (a connecting
    /// side's SYN and either side's FIN count one each, as in `tcp_info`).
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`: bytes received in order.
    pub bytes_received: u64,
    /// `tcp_sock.segs_out`: segments sent, retransmissions and pure ACKs included.
    pub segs_out: u32,
    /// `tcp_sock.segs_in`: segments received.
    pub segs_in: u32,
    /// `tcp_sock.total_retrans`: segments retransmitted over the whole life.
    pub total_retrans: u32,
    /// Smoothed round-trip time in µs (`srtt_us >> 3`, as `tcp_info` has it); 0: none measured.
    pub srtt_us: u32,
    /// Its mean deviation in µs (`mdev_us >> 2`, as `tcp_info.tcpi_rttvar`).
    pub rttvar_us: u32,
    /// The lowest round-trip time seen in the kernel's window (`tcp_min_rtt`), in µs;
    /// `u32::MAX` (the kernel's "none") when no sample was taken.
    pub min_rtt_us: u32,
    /// `sock.sk_err` at the end (an errno: ETIMEDOUT for a timeout, ECONNRESET, …; 0: none).
    pub sk_err: u32,
    /// `icsk_user_timeout` in ms (`TCP_USER_TIMEOUT`; 0: not set).
    pub user_timeout_ms: u32,
    /// `tcp_sock.packets_out`: segments sent and not yet acknowledged at the end — 0 after a
    /// reset or a timeout, whose `tcp_write_queue_purge` runs before the end is logged.
    pub packets_out: u32,
    pub _pad: u32,
    pub _reserved: [u64; 2],
    /// `icsk_retransmits`: retransmissions of the current timeout series (not reset by the end).
    pub retransmits: u8,
    /// `icsk_probes_out`: unanswered keepalive or zero-window probes.
    pub probes_out: u8,
    /// [`kind::DETAILS`](crate::kind::DETAILS), at the offset of [`Event::kind`].
    pub kind: u8,
    /// Bits of [`details_flag`].
    pub flags: u8,
    pub _pad2: u32,
    pub _reserved2: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<Details>() == crate::EVENT_SIZE);
const _: () = assert!(core::mem::offset_of!(Details, kind) == core::mem::offset_of!(Event, kind));

impl Details {
    /// The smoothed round-trip time in µs, when the kernel measured one.
    pub fn srtt_us(&self) -> Option<u32> {
        (self.srtt_us != 0).then_some(self.srtt_us)
    }

    /// The lowest round-trip time in µs, when the kernel took a sample.
    pub fn min_rtt_us(&self) -> Option<u32> {
        (self.min_rtt_us != NO_MIN_RTT).then_some(self.min_rtt_us)
    }

    /// Whether `SO_KEEPALIVE` was set.
    pub fn keepalive(&self) -> bool {
        self.flags & details_flag::KEEPALIVE != 0
    }
}

/// Bits of [`Details::flags`].
pub mod details_flag {
    /// `SO_KEEPALIVE` was set on the socket (`SOCK_KEEPOPEN`).
    pub const KEEPALIVE: u8 = 1 << 0;
}

/// Where `struct tcp_sock` (and the `sock` and `inet_connection_sock` it starts with) keeps
/// what [`Details`] holds: BTF offsets found at start-up. Every offset is from the start of
/// the `tcp_sock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpOffsets {
    /// Non-zero when every offset below was found (details are then read).
    pub known: u16,
    pub bytes_acked: u16,
    pub bytes_received: u16,
    pub segs_out: u16,
    pub segs_in: u16,
    pub total_retrans: u16,
    pub srtt_us: u16,
    pub mdev_us: u16,
    /// `rtt_min.s[0].v`: what `tcp_min_rtt()` returns.
    pub min_rtt: u16,
    pub packets_out: u16,
    pub sk_err: u16,
    /// `sock_common.skc_flags` (`sk_flags`: an `unsigned long` of `enum sock_flags` bits).
    pub sk_flags: u16,
    /// The bit of `SOCK_KEEPOPEN` in `sk_flags`.
    pub keepopen_bit: u16,
    pub user_timeout: u16,
    pub retransmits: u16,
    pub probes_out: u16,
}

impl Default for TcpOffsets {
    fn default() -> Self {
        TcpOffsets::UNKNOWN
    }
}

impl TcpOffsets {
    /// Nothing known: no details are read.
    pub const UNKNOWN: TcpOffsets = TcpOffsets {
        known: 0,
        bytes_acked: ABSENT,
        bytes_received: ABSENT,
        segs_out: ABSENT,
        segs_in: ABSENT,
        total_retrans: ABSENT,
        srtt_us: ABSENT,
        mdev_us: ABSENT,
        min_rtt: ABSENT,
        packets_out: ABSENT,
        sk_err: ABSENT,
        sk_flags: ABSENT,
        keepopen_bit: ABSENT,
        user_timeout: ABSENT,
        retransmits: ABSENT,
        probes_out: ABSENT,
    };
}

/// The kernel's `tcp_min_rtt()` when no sample was taken (`~0U`).
pub const NO_MIN_RTT: u32 = u32::MAX;
