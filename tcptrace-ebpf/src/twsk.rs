//! Timewait sockets' own functions, for kernels that let tracing programs attach to them
//! (fentry): these run only for timewait sockets, where the timer tracepoints
//! ([`crate::timewait`]) run for every timer on the host and leave at once for nearly all.
//!
//! - `__inet_twsk_schedule(tw, timeo, rearm)`: every arming and re-arm, including a re-arm
//!   that the timer wheel keeps in the same bucket (no timer tracepoint fires for it);
//! - `inet_twsk_deschedule_put(tw)`: the socket is killed early (a reset, a reused port, its
//!   namespace going away); reported as a cancel;
//! - `inet_twsk_kill(tw)`: the end, from the timer's handler (expired) or from
//!   `inet_twsk_deschedule_put` (killed: its cancel came first).
//!
//! Each reports through the same functions as the timer programs; the loader attaches these
//! or the timer programs, never both.

use aya_ebpf::{macros::fentry, programs::FEntryContext};
use tcptrace_common::{flag, kind};

use crate::{
    config::idle,
    timewait::{tw_armed_at, tw_end_report},
};

/// The position of the `struct inet_timewait_sock *` in each function's arguments.
const TW_ARG: usize = 0;
/// `__inet_twsk_schedule`'s `int timeo`: the timeout in jiffies.
const TIMEO_JIFFIES_ARG: usize = 1;
/// `__inet_twsk_schedule`'s `bool rearm`.
const REARM_ARG: usize = 2;

/// A timewait socket's timer is armed or re-armed: `__inet_twsk_schedule(tw, timeo, rearm)`.
#[fentry(function = "__inet_twsk_schedule")]
pub fn tw_schedule(ctx: FEntryContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_tw_schedule(&ctx);
    0
}

fn try_tw_schedule(ctx: &FEntryContext) -> Result<(), i32> {
    let tw: u64 = ctx.arg(TW_ARG);
    let timeo_jiffies: i32 = ctx.arg(TIMEO_JIFFIES_ARG);
    // A `bool` in a 64-bit slot: only its low byte is defined.
    let rearm: u8 = ctx.arg(REARM_ARG);
    let flags = if rearm & 1 != 0 { flag::TW_REARM } else { 0 };
    tw_armed_at(tw, timeo_jiffies.max(0) as u64, flags)
}

/// A timewait socket is killed early: `inet_twsk_deschedule_put(tw)`.
#[fentry(function = "inet_twsk_deschedule_put")]
pub fn tw_deschedule(ctx: FEntryContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_tw_end(&ctx, kind::TW_CANCELLED);
    0
}

/// A timewait socket leaves the kernel's tables: `inet_twsk_kill(tw)`.
#[fentry(function = "inet_twsk_kill")]
pub fn tw_kill(ctx: FEntryContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_tw_end(&ctx, kind::TW_ENDED);
    0
}

/// Reports `k` of the timewait socket the function was handed.
#[inline(always)]
fn try_tw_end(ctx: &FEntryContext, k: u8) -> Result<(), i32> {
    let tw: u64 = ctx.arg(TW_ARG);
    tw_end_report(tw, k)
}
