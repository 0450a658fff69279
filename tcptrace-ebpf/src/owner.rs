//! A socket's owner: the task whose system call drove a transition, or the listener an
//! accepted socket inherits it from.

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_comm};
use tcptrace_common::{Owner, flag, state};

use crate::{
    maps::{LISTENERS, Slot, forgot, listen_key},
    mem::put,
};

/// Copies the owner at `src` to `dst`, field by field (see [`put`]).
///
/// # Safety
/// `dst` must be writable and `src` readable (a live map value, the socket's storage, or an
/// initialised local).
#[inline(always)]
pub(crate) unsafe fn copy_owner(dst: *mut Owner, src: *const Owner) {
    // SAFETY: as the caller vouches; every store is a separate volatile one.
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), (*src).comm[0]);
        put(addr_of_mut!((*dst).comm[1]), (*src).comm[1]);
        put(addr_of_mut!((*dst).pid), (*src).pid);
        put(addr_of_mut!((*dst).flags), (*src).flags);
    }
}

/// No owner known: a timewait socket's events name none (userspace has it from the
/// connection's transitions).
pub(crate) const NO_OWNER: Owner = Owner {
    comm: [0; 2],
    pid: 0,
    flags: 0,
};

/// Bytes of `Owner::comm`: the kernel's `TASK_COMM_LEN`.
const COMM_BYTES: u32 = core::mem::size_of::<[u64; 2]>() as u32;

/// The current task as an owner: only called for transitions its own system call drives.
///
/// # Safety
/// `dst` must be writable.
#[inline(always)]
pub(crate) unsafe fn current_owner(dst: *mut Owner) {
    // SAFETY: `dst` is writable (the caller vouches); bpf_get_current_comm writes at most
    // `comm`'s COMM_BYTES.
    unsafe {
        bpf_get_current_comm(addr_of_mut!((*dst).comm).cast::<c_void>(), COMM_BYTES);
        // The upper half is the thread group's id: the process.
        put(
            addr_of_mut!((*dst).pid),
            (bpf_get_current_pid_tgid() >> u32::BITS) as u32,
        );
        put(addr_of_mut!((*dst).flags), flag::OWNER_KNOWN as u32);
    }
}

/// No owner known.
///
/// # Safety
/// `dst` must be writable.
#[inline(always)]
pub(crate) unsafe fn clear_owner(dst: *mut Owner) {
    // SAFETY: `dst` is writable, as the caller vouches.
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), 0);
        put(addr_of_mut!((*dst).comm[1]), 0);
        put(addr_of_mut!((*dst).pid), 0);
        put(addr_of_mut!((*dst).flags), 0);
    }
}

/// An accepted socket's owner: its listener's (created in softirq, where the current task is
/// arbitrary). Whether the listener was known (`owner` is left as it was otherwise).
///
/// # Safety
/// `owner` must be writable.
#[inline(always)]
pub(crate) unsafe fn inherit_listener(owner: *mut Owner, netns: u32, port: u16) -> bool {
    match LISTENERS.get_ptr(&listen_key(netns, port)) {
        // SAFETY: `l` is a live value of LISTENERS (the lookup found it); `owner` is
        // writable (the caller vouches).
        Some(l) => unsafe {
            copy_owner(owner, l);
            put(
                addr_of_mut!((*owner).flags),
                (*l).flags | flag::OWNER_FROM_LISTENER as u32,
            );
            true
        },
        None => false,
    }
}

/// A listener starts (`old` is CLOSE) or stops: remember or forget its owner; a listener
/// that does not fit in the map is counted.
#[inline(always)]
pub(crate) fn listener(old: u8, netns: u32, port: u16, owner: &Owner, slot: Slot) {
    let key = listen_key(netns, port);
    if old == state::CLOSE {
        if LISTENERS.insert(&key, owner, 0).is_err() {
            forgot(slot);
        }
    } else {
        let _ = LISTENERS.remove(&key);
    }
}
