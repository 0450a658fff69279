//! tcptrace's kernel side: seventeen programs on TCP's transitions (`inet_sock_set_state`),
//! its resets (`tcp_send_reset`, `tcp_receive_reset`), the destruction of its sockets
//! (`tcp_destroy_sock`) and timewait sockets (their functions, or every timer's
//! `timer_start`, `timer_cancel`, `timer_expire_entry`), in two sets the loader never
//! attaches together, and an iterator run once at start:
//!
//! - eight BTF tracepoint programs, wherever the kernel has BTF and lets tracing programs
//!   keep socket-local storage (Linux 5.11 on): [`transition`] (`btf_set_state`, its nested
//!   copy `btf_set_state_nested`, `btf_destroy_sock`), [`reset`] (`btf_send_reset`,
//!   `btf_receive_reset`) and [`timewait`] (`btf_timer_start`, `btf_timer_cancel`,
//!   `btf_timer_expire`). Each gets the kernel's own objects (`struct sock *`,
//!   `struct sk_buff *`, `struct timer_list *`) and reads their fields with typed loads at
//!   offsets the loader found in the kernel's BTF, which the verifier checks. What tcptrace
//!   knows of a socket lives in the socket itself ([`maps::SK_STATE`]): created at its first
//!   transition, freed with it, never evicted, never confused with a later socket at the
//!   same address.
//! - with them, in place of the three timer programs where the kernel allows fentry, three
//!   fentry programs on the timewait functions ([`twsk`]: `tw_schedule` on
//!   `__inet_twsk_schedule`, `tw_deschedule` on `inet_twsk_deschedule_put`, `tw_kill` on
//!   `inet_twsk_kill`), which run only for timewait sockets, not for every timer of the host.
//! - six classic tracepoint programs, the fallback for other kernels, named after their
//!   tracepoints ([`fallback`]: `inet_sock_set_state`, `tcp_send_reset`, `tcp_receive_reset`,
//!   `timer_start`, `timer_cancel`, `timer_expire_entry`). They read the tracepoints' records
//!   and keep each socket's facts in a bounded LRU map ([`maps::SOCKS`]).
//!
//! - one iterator over every task's open files ([`owners`]: `socket_owners`), run once at
//!   start: which process holds each socket.
//!
//! Either way, for every TCP transition the program keeps the time of the socket's last
//! transition and the owner learnt from a system call it drove ([`owner`]), applies the
//! loader's filters ([`config`]), and writes one `Event` (or a connection record) into the
//! `EVENTS` ring buffer ([`emit`]). Wake-ups are batched: the reader is woken only once
//! `wakeup_bytes` are waiting, and drains on its own tick otherwise.
//!
//! Each program is a thin entry point over a `try_` function; program, map and section
//! names are what the loader (`tcptrace/src/probe.rs`) looks up, and do not change.
#![no_std]
#![no_main]
// Checked with `cargo +nightly clippy --target bpfel-unknown-none -Z build-std=core --release`
// in this directory (the workspace's clippy leaves this crate out).
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
// aya's map methods take `impl Borrow<V>`: a key or value passed by reference is not first
// copied onto the 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod config;
mod emit;
mod fallback;
mod maps;
mod mem;
mod net;
mod owner;
mod owners;
mod reset;
mod sock;
mod timewait;
mod transition;
mod twsk;

/// Says through aya-log that the classic transition program could not read its record.
/// Defined at the crate's root: aya-log writes the caller's module path and file into each
/// record, byte by byte, and the root's are the shortest.
#[inline(always)]
fn log_set_state_unreadable(ctx: &aya_ebpf::programs::TracePointContext, err: i32) {
    aya_log_ebpf::error!(
        ctx,
        "tcptrace: reading sock:inet_sock_set_state failed: {}",
        err
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
