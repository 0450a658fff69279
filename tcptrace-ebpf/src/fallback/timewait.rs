//! The classic programs on timers (`timer:timer_start`, `timer:timer_cancel`,
//! `timer:timer_expire_entry`): each keeps only timewait sockets' timers.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::kind;

use super::read;
use crate::{
    config::{config, idle},
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
fn try_timer_start(ctx: &TracePointContext) -> Result<(), i32> {
    // Every timer on the system passes here, and one read decides.
    let o = &config().timewait;
    let function: u64 = read(ctx, o.start_function)?;
    if function != o.handler || o.handler == 0 {
        return Ok(());
    }
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
    let _ = try_timer_cancel(&ctx);
    0
}

/// A pending timer was deleted (before a re-arm, before it runs, or alone when the
/// timewait socket is killed early).
fn try_timer_cancel(ctx: &TracePointContext) -> Result<(), i32> {
    let timer = read::<u64>(ctx, config().timewait.cancel_timer)?;
    tw_timer_end(timer, kind::TW_CANCELLED)
}

#[tracepoint]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let _ = try_timer_expire_entry(&ctx);
    0
}

/// A timer fires.
fn try_timer_expire_entry(ctx: &TracePointContext) -> Result<(), i32> {
    let timer = read::<u64>(ctx, config().timewait.expire_timer)?;
    tw_timer_end(timer, kind::TW_EXPIRED)
}

/// A timer was cancelled or fired: report it if it is a timewait socket's that the filters
/// keep. Userspace pairs it with the arming: cancel then arm is a re-arm, cancel then expiry
/// (the kernel detaches a timer before it runs it) an expiry, cancel alone an early kill.
/// Timers armed before tracing began are reported too, and ignored there.
fn tw_timer_end(timer: u64, k: u8) -> Result<(), i32> {
    // Most timers are not timewait sockets': their handler, one read, drops them. The
    // kernel logs the cancel before a shutdown clears the timer's function.
    let o = &config().timewait;
    if o.handler == 0 || kread::<u64>(timer, o.timer_function)? != o.handler {
        return Ok(());
    }
    tw_timer_report(timer, k)
}
