//! The classic programs on timers (`timer:timer_start`, `timer:timer_cancel`,
//! `timer:timer_expire_entry`): each keeps only timewait sockets' timers.

use core::ptr::read_volatile;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::kind;

use super::read;
use crate::{
    config::{CONFIG, idle},
    mem::kread,
    timewait::{tw_armed, tw_timer_report},
};

#[tracepoint]
pub fn timer_start(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_timer_start(&ctx);
    0
}

/// A timer was armed (`timer:timer_start`'s record): report it if it is a timewait socket's.
pub(crate) fn try_timer_start(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: as in try_set_state, one field at a time: every timer on the system passes
    // here, and one read decides.
    let handler = unsafe { read_volatile(&CONFIG.timewait.handler) };
    let at = unsafe { read_volatile(&CONFIG.timewait.start_function) };
    let function: u64 = read(ctx, at)?;
    if function != handler || handler == 0 {
        return Ok(());
    }
    let o = unsafe { read_volatile(&CONFIG.timewait) };
    let timer: u64 = read(ctx, o.start_timer)?;
    let expires: u64 = read(ctx, o.start_expires)?;
    let now: u64 = read(ctx, o.start_now)?;
    tw_armed(timer, expires.wrapping_sub(now))
}

#[tracepoint]
pub fn timer_cancel(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    // SAFETY: as in try_timer_start.
    let at = unsafe { read_volatile(&CONFIG.timewait.cancel_timer) };
    if let Ok(timer) = read::<u64>(&ctx, at) {
        let _ = tw_timer_end(timer, kind::TW_CANCELLED);
    }
    0
}

#[tracepoint]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    // SAFETY: as in try_timer_start.
    let at = unsafe { read_volatile(&CONFIG.timewait.expire_timer) };
    if let Ok(timer) = read::<u64>(&ctx, at) {
        let _ = tw_timer_end(timer, kind::TW_EXPIRED);
    }
    0
}

/// A timer was cancelled or fired: report it if it is a timewait socket's that the filters
/// keep. Userspace pairs it with the arming: cancel then arm is a re-arm, cancel then expiry
/// (the kernel detaches a timer before it runs it) an expiry, cancel alone an early kill.
/// Timers armed before tracing began are reported too, and ignored there.
pub(crate) fn tw_timer_end(timer: u64, k: u8) -> Result<(), i32> {
    // Most timers are not timewait sockets': their handler, one read, drops them. The
    // kernel logs the cancel before a shutdown clears the timer's function.
    // SAFETY: as in try_timer_start.
    let handler = unsafe { read_volatile(&CONFIG.timewait.handler) };
    let at = unsafe { read_volatile(&CONFIG.timewait.timer_function) };
    if handler == 0 || kread::<u64>(timer, at)? != handler {
        return Ok(());
    }
    tw_timer_report(timer, k)
}
