//! tcptrace's kernel side: programs on TCP's transitions (`inet_sock_set_state`), its resets
//! (`tcp_send_reset`, `tcp_receive_reset`) and timewait sockets' timers (`timer_start`,
//! `timer_cancel`, `timer_expire_entry`).
//!
//! Two sets, never attached together: the BTF tracepoint programs ([`transition`], [`reset`], [`timewait`]), which keep what
//! is known of each socket in the socket itself, wherever the kernel allows them; and, as
//! the fallback for older kernels, the classic tracepoint programs ([`fallback`]), which read the
//! tracepoints' records and keep each socket's facts in a bounded LRU map. Either way, for
//! every TCP transition the program keeps the time of the socket's last transition and the
//! owner learnt from a system call it drove, applies the loader's filters, and writes one
//! [`Event`] into the `EVENTS` ring buffer. Wake-ups are batched: the reader is woken only
//! once `wakeup_bytes` are waiting, and drains on its own tick otherwise.
//!
//! The BTF tracepoint programs are what tcptrace attaches wherever the kernel has BTF and lets
//! tracing programs keep socket-local storage (Linux 5.11 on).
//!
//! Each program gets the kernel's own objects (`struct sock *`, `struct sk_buff *`,
//! `struct timer_list *`) and reads their fields with typed loads at offsets the loader found
//! in the kernel's BTF, which the verifier checks. What tcptrace knows of a socket lives in
//! the socket itself ([`maps::SK_STATE`]): created at its first transition, freed with it, never
//! evicted, never confused with a later socket at the same address.
#![no_std]
#![no_main]

mod config;
mod emit;
mod fallback;
mod maps;
mod mem;
mod net;
mod owner;
mod reset;
mod sock;
mod timewait;
mod transition;

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
