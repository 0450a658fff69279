//! The classic tracepoint programs: what the loader attaches where the BTF ones cannot run
//! (no BTF, or no socket storage for tracing programs). They read the tracepoints' records
//! and keep each socket's facts in the `SOCKS` LRU map.

mod reset;
mod timewait;
mod transition;

use aya_ebpf::programs::TracePointContext;
use core::ptr::read_volatile;
use tcptrace_common::{Owner, SetStateOffsets};

use crate::emit::Addrs;

/// What the classic programs know of a live socket: the value of [`SOCKS`](crate::maps::SOCKS).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SockInfo {
    /// When its last transition was seen (0: not yet, for a socket first met through a reset
    /// it received).
    pub(crate) last_ts: u64,
    pub(crate) owner: Owner,
    /// `flag::RESET_RECEIVED` once a reset arrived for the socket.
    pub(crate) flags: u32,
    /// The socket's network namespace inode, read once (0: not read yet, or unknown).
    pub(crate) netns: u32,
    /// The socket's cgroup id, read with `netns` (a socket keeps both for life).
    pub(crate) cgroup: u64,
}

/// The record's layout on every kernel tcptrace knows, used when the loader found it.
const K: SetStateOffsets = SetStateOffsets::KNOWN;

/// A field of the tracepoint record at an offset known when compiling: one load, which the
/// verifier checks (the record is the program's context), instead of a helper call.
#[inline(always)]
fn load<T: Copy>(ctx: &TracePointContext, off: impl Into<usize>) -> T {
    // SAFETY: the context is the tracepoint's record; the verifier checks that a load at a
    // constant offset stays inside it and rejects the program otherwise.
    unsafe { read_volatile(ctx.as_ptr_const().add(off.into()).cast::<T>()) }
}

/// A field of the tracepoint record at an offset from its format file, read with the checking
/// helper: what a record whose layout the loader does not know takes.
#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address (the offset comes from the
    // tracepoint's own format file) and fails cleanly if it is wrong.
    unsafe { ctx.read_at::<T>(off as usize) }
}

/// The addresses at `saddr` and `daddr` in the record, `len` bytes each, read when the event
/// is written.
#[inline(always)]
fn record_addrs(ctx: &TracePointContext, saddr: usize, daddr: usize, len: u32) -> Addrs {
    Addrs::Read {
        saddr: ctx.as_ptr_const().wrapping_add(saddr),
        daddr: ctx.as_ptr_const().wrapping_add(daddr),
        len,
    }
}

/// The record's address, for offsets into it.
trait CtxPtr {
    fn as_ptr_const(&self) -> *const u8;
}

impl CtxPtr for TracePointContext {
    #[inline(always)]
    fn as_ptr_const(&self) -> *const u8 {
        use aya_ebpf::EbpfContext as _;
        self.as_ptr().cast::<u8>().cast_const()
    }
}
