//! Which process holds each socket: an iterator over every task's open files
//! (`iter/task_file`), run once at start. It writes one [`SocketOwner`] per socket file, its
//! holder named by the task's own `comm` (no `/proc/PID/comm` to read after) —
//! what `ss -p` learns by reading every `/proc/PID/fd` link, a system call a descriptor, and
//! only for the processes it may look into. Threads that share their files are visited once.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::helpers::generated::bpf_seq_write;
use tcptrace_common::SocketOwner;

use crate::{config::config, mem::field};

/// `S_IFMT` and `S_IFSOCK` of `inode.i_mode`.
const MODE_TYPE_MASK: u16 = 0o170_000;
const MODE_SOCKET: u16 = 0o140_000;

/// `struct bpf_iter__task_file`'s members, in 8-byte slots: `meta`, `task`, (`fd`), `file`.
const CTX_SLOT_META: usize = 0;
const CTX_SLOT_TASK: usize = 1;
const CTX_SLOT_FILE: usize = 3;

/// `struct bpf_iter_meta` starts with its `seq_file`.
const META_SEQ_OFFSET: u16 = 0;

/// One open file of one process.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn socket_owners(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel hands the iterator's context, whose slots are the members above.
    let _ = unsafe { try_socket_owners(ctx.cast_const().cast()) };
    0
}

/// Writes the owner of the file in `ctx` if it is a socket.
///
/// # Safety
/// `ctx` must be the `bpf_iter__task_file` the kernel handed over.
#[inline(always)]
unsafe fn try_socket_owners(ctx: *const *const u8) -> Result<(), ()> {
    let o = &config().owners;
    if o.known == 0 {
        return Err(());
    }
    // SAFETY: loads of the context's members at their slots; the verifier types each as a
    // possibly null kernel object, checked below.
    let (meta, task, file) = unsafe {
        (
            read_volatile(ctx.add(CTX_SLOT_META)),
            read_volatile(ctx.add(CTX_SLOT_TASK)),
            read_volatile(ctx.add(CTX_SLOT_FILE)),
        )
    };
    if meta.is_null() || task.is_null() || file.is_null() {
        return Err(());
    }
    // SAFETY: `file` is a `struct file` the kernel handed over; `f_inode` is its field.
    let inode: *const u8 = unsafe { field(file, o.file_inode) };
    if inode.is_null() {
        return Err(());
    }
    // SAFETY: `inode` was loaded from a BTF-typed field: a `struct inode`.
    let mode: u16 = unsafe { field(inode, o.inode_mode) };
    if mode & MODE_TYPE_MASK != MODE_SOCKET {
        return Ok(());
    }
    // SAFETY: typed loads of `inode.i_ino` and `task_struct.tgid` at their BTF offsets, and
    // of `task_struct.comm` (16 bytes) in two 8-byte halves, both within the array (which
    // the verifier allows of an array of scalars).
    let (ino, tgid, comm): (u64, i32, [u64; 2]) = unsafe {
        (
            field(inode, o.inode_ino),
            field(task, o.task_tgid),
            [field(task, o.task_comm), field(task, o.task_comm + 8)],
        )
    };
    let rec = SocketOwner {
        // Socket inode numbers are 32-bit, as sock_diag gives them.
        inode: ino as u32,
        pid: tgid as u32,
        comm,
    };
    // SAFETY: `meta.seq` is the iterator's seq_file; the record is a local of the length
    // given.
    unsafe {
        let seq: *mut c_void = field(meta, META_SEQ_OFFSET);
        bpf_seq_write(
            seq.cast(),
            (&raw const rec).cast(),
            size_of::<SocketOwner>() as u32,
        );
    }
    Ok(())
}
