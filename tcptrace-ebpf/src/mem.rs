//! Memory access the BPF target allows: volatile stores, typed loads of the kernel's BTF
//! objects, and reads of other kernel memory through the checking helper.

use core::ptr::read_volatile;

/// Stores `v` at `dst` with a volatile store. The BPF backend has no memset/memmove: LLVM
/// turns adjacent stores and struct copies into those built-ins unless every access is a
/// separate volatile scalar access.
///
/// # Safety
/// `dst` must be valid for writes of a `T` and aligned for it.
#[inline(always)]
pub(crate) unsafe fn put<T>(dst: *mut T, v: T) {
    // SAFETY: the caller vouches that `dst` is writable and aligned.
    unsafe { dst.write_volatile(v) }
}

/// A field of a kernel object at `off` (a constant from [`crate::config::config`]): one
/// load, which the verifier checks against the kernel's BTF type of `obj`; a fault reads as
/// 0.
///
/// # Safety
/// `obj` must be a BTF-typed pointer the program was handed (or loaded from one), and `off`
/// the offset of a field of type `T` in its type.
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(obj: *const u8, off: u16) -> T {
    // SAFETY: `obj + off` is a `T` field of a BTF-typed object, as the caller vouches; the
    // verifier checks the load against the type and rejects the program otherwise.
    unsafe { read_volatile(obj.add(usize::from(off)).cast::<T>()) }
}

/// Reads a field of kernel memory at `base + off`.
#[inline(always)]
pub(crate) fn kread<T>(base: u64, off: u16) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly on a bad one; the
    // value is copied into a local.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// Reads a `T` at a kernel address with the checking helper.
#[inline(always)]
pub(crate) fn kread_at<T>(addr: u64) -> Option<T> {
    // SAFETY: as in `kread`: the helper checks the address and copies into a local.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr as *const T).ok() }
}
