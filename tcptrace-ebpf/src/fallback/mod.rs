//! The classic tracepoint programs: what the loader attaches where the BTF ones cannot run
//! (no BTF, or no socket storage for tracing programs). They read the tracepoints' records
//! and keep each socket's facts in the `SOCKS` LRU map.

mod reset;
mod timewait;
mod transition;

use aya_ebpf::programs::TracePointContext;
use core::ptr::read_volatile;
use tcptrace_common::{Owner, SetStateOffsets};

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SockInfo {
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
pub(crate) const K: SetStateOffsets = SetStateOffsets::KNOWN;

/// A field of the tracepoint record at an offset known when compiling: one load, which the
/// verifier checks (the record is the program's context), instead of a helper call.
#[inline(always)]
pub(crate) fn load<T: Copy>(ctx: &TracePointContext, off: impl Into<usize>) -> T {
    // SAFETY: `off` is a constant inside the record, aligned for T (checked by the verifier).
    unsafe { read_volatile(ctx.as_ptr_const().add(off.into()).cast::<T>()) }
}

#[inline(always)]
pub(crate) fn read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i32> {
    // SAFETY: the offset comes from the tracepoint's own format file; the helper checks the
    // read and fails cleanly if it is wrong.
    unsafe { ctx.read_at::<T>(off as usize) }
}

pub(crate) trait CtxPtr {
    fn as_ptr_const(&self) -> *const u8;
}

impl CtxPtr for TracePointContext {
    #[inline(always)]
    fn as_ptr_const(&self) -> *const u8 {
        use aya_ebpf::EbpfContext as _;
        self.as_ptr().cast::<u8>().cast_const()
    }
}
