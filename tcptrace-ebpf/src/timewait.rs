//! Timewait sockets' timers: armed, cancelled, fired. The BTF programs here, the classic
//! ones in [`crate::fallback`]; both report through [`tw_armed`] and [`tw_timer_report`], as
//! the fentry programs on the timewait functions ([`crate::twsk`]) do through
//! [`tw_armed_at`] and [`tw_end_report`].

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tcptrace_common::{AF_INET, AF_INET6, Config, filter_keeps, flag, kind, netns_keeps, state};

use crate::{
    config::{config, idle},
    emit::{Addrs, Record, emit},
    maps::{ARMED, Slot, port_bits},
    mem::{field, kread, put},
    net::{IPV4_ADDR_BYTES, IPV6_ADDR_BYTES},
    owner::NO_OWNER,
    sock::sock_netns_at as sock_netns,
};

/// A timewait socket's timer, armed for `timeout` jiffies: report the socket.
pub(crate) fn tw_armed(timer: u64, timeout: u64) -> Result<(), i32> {
    let tw = timer.wrapping_sub(config().timewait.tw_timer as u64);
    tw_armed_at(tw, timeout, 0)
}

/// The timewait socket `tw` armed for `timeout` jiffies: report it, with `flags` (bits of
/// [`flag`]: [`flag::TW_REARM`] when the kernel said it re-arms it).
#[inline(always)]
pub(crate) fn tw_armed_at(tw: u64, timeout: u64, flags: u8) -> Result<(), i32> {
    let cfg = config();
    let o = &cfg.timewait;
    let Some(TwSock {
        family,
        sport,
        dport,
        netns,
    }) = tw_kept(cfg, tw, true)?
    else {
        return Ok(());
    };
    let substate: u8 = kread(tw, o.tw_substate)?;
    let (saddr, daddr, len) = if family == AF_INET {
        (o.skc_rcv_saddr, o.skc_daddr, IPV4_ADDR_BYTES)
    } else {
        (o.skc_v6_rcv_saddr, o.skc_v6_daddr, IPV6_ADDR_BYTES)
    };
    let rec = Record {
        // SAFETY: a helper without arguments or memory access.
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr: tw,
        in_from: 0,
        aux: timeout,
        sport,
        dport,
        family,
        kind: kind::TW_ARMED,
        old: substate,
        new: state::TIME_WAIT,
        flags,
        netns,
        // A timewait socket has no cgroup; userspace takes it from the entry transition.
        cgroup: 0,
    };
    let addrs = Addrs::Read {
        saddr: (tw + saddr as u64) as *const u8,
        daddr: (tw + daddr as u64) as *const u8,
        len,
    };
    emit(Slot::TimerStart, cfg.wakeup_bytes, &rec, &addrs, &NO_OWNER);
    if let Some(armed) = ARMED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of ARMED; a program nested in this one may write it too
        // (its own arming, reported after this one: the newer), and the reader checks.
        unsafe { put(armed, tw) };
    }
    Ok(())
}

/// The timewait socket whose arming this CPU reported last, taken (0: none), for the
/// connection record of the socket that just entered TIME_WAIT.
#[inline(always)]
pub(crate) fn take_armed() -> u64 {
    let Some(armed) = ARMED.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot of ARMED, a live map value.
    unsafe {
        let tw = core::ptr::read_volatile(armed);
        put(armed, 0);
        tw
    }
}

/// What the filters look at in a timewait socket.
struct TwSock {
    family: u16,
    sport: u16,
    dport: u16,
    /// 0 unless asked for or filtered on.
    netns: u32,
}

/// Reads a timewait socket's family, ports and (when `netns` asks, or a filter needs it) its
/// network namespace: `None` when the filters drop it or it is neither IPv4 nor IPv6.
#[inline(always)]
fn tw_kept(cfg: &Config, tw: u64, netns: bool) -> Result<Option<TwSock>, i32> {
    let o = &cfg.timewait;
    let family: u16 = kread(tw, o.skc_family)?;
    let dport = u16::from_be(kread(tw, o.skc_dport)?);
    let sport: u16 = kread(tw, o.skc_num)?;
    if (family != AF_INET && family != AF_INET6)
        || !filter_keeps(
            cfg,
            family,
            state::TIME_WAIT,
            state::TIME_WAIT,
            0,
            sport,
            dport,
            port_bits,
        )
    {
        return Ok(None);
    }
    let netns = if netns || cfg.netns_count != 0 {
        sock_netns(&cfg.ns, tw)
    } else {
        0
    };
    if !netns_keeps(cfg, netns) {
        return Ok(None);
    }
    Ok(Some(TwSock {
        family,
        sport,
        dport,
        netns,
    }))
}

/// Reports the end `k` of a timewait socket's timer, if the filters keep the socket.
pub(crate) fn tw_timer_report(timer: u64, k: u8) -> Result<(), i32> {
    let tw = timer.wrapping_sub(config().timewait.tw_timer as u64);
    tw_end_report(tw, k)
}

/// Reports `k` (a cancel, an expiry or an end) of the timewait socket `tw`, with its
/// substate now, if the filters keep the socket.
#[inline(always)]
pub(crate) fn tw_end_report(tw: u64, k: u8) -> Result<(), i32> {
    // No map remembers which timers were reported (an insert per arming cost more than the
    // rest of the program): with a filter, the socket is read again and judged the same way.
    let cfg = config();
    if cfg.filters() && tw_kept(cfg, tw, false)?.is_none() {
        return Ok(());
    }
    // Its substate now: a peer's FIN may have moved it to TIME_WAIT with no timer event.
    let substate: u8 = kread(tw, cfg.timewait.tw_substate)?;
    let rec = Record {
        // SAFETY: a helper without arguments or memory access.
        ts: unsafe { bpf_ktime_get_ns() },
        skaddr: tw,
        in_from: 0,
        aux: 0,
        sport: 0,
        dport: 0,
        family: 0,
        kind: k,
        old: substate,
        new: state::TIME_WAIT,
        flags: flag::SUBSTATE_AT_END,
        netns: 0,
        cgroup: 0,
    };
    // No addresses: userspace knows them from the arming.
    let addrs = Addrs::Read {
        saddr: core::ptr::null(),
        daddr: core::ptr::null(),
        len: 0,
    };
    let slot = if k == kind::TW_EXPIRED || k == kind::TW_ENDED {
        Slot::TimerExpire
    } else {
        Slot::TimerCancel
    };
    emit(slot, cfg.wakeup_bytes, &rec, &addrs, &NO_OWNER);
    Ok(())
}

/// The position of the `struct timer_list *` in the timer tracepoints' arguments.
const TIMER_ARG: usize = 0;

/// Whether `timer` is a timewait socket's: its handler, one typed load, decides (most timers
/// on the host are not).
///
/// # Safety
/// `timer` must be the `struct timer_list *` the tracepoint handed over.
#[inline(always)]
unsafe fn tw_timer(timer: *const u8) -> bool {
    let o = &config().timewait;
    // SAFETY: `timer` is the `timer_list` handed over (this function's contract), read at
    // `timer_list.function`'s BTF offset.
    o.handler != 0 && unsafe { field::<u64>(timer, o.timer_function) } == o.handler
}

/// A timer was armed: `timer_start(timer, …)`.
#[btf_tracepoint(function = "timer_start")]
pub fn btf_timer_start(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_btf_timer_start(&ctx);
    0
}

fn try_btf_timer_start(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let timer: *const u8 = ctx.arg(TIMER_ARG);
    // SAFETY: the tracepoint hands the `timer_list`, read at its BTF offsets.
    unsafe {
        if !tw_timer(timer) {
            return Ok(());
        }
        let expires: u64 = field(timer, config().timewait.timer_expires);
        tw_armed(timer as u64, expires.wrapping_sub(bpf_jiffies64()))
    }
}

/// A pending timer was deleted: `timer_cancel(timer)` (before a re-arm, before it runs, or
/// alone when the timewait socket is killed early).
#[btf_tracepoint(function = "timer_cancel")]
pub fn btf_timer_cancel(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_timer_end(&ctx, kind::TW_CANCELLED);
    0
}

/// A timer fires: `timer_expire_entry(timer, …)`.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn btf_timer_expire(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_timer_end(&ctx, kind::TW_EXPIRED);
    0
}

/// The end `k` of a timer (cancelled or fired): reported if it is a timewait socket's.
#[inline(always)]
fn try_timer_end(ctx: &BtfTracePointContext, k: u8) -> Result<(), i32> {
    let timer: *const u8 = ctx.arg(TIMER_ARG);
    // SAFETY: the tracepoint hands the `timer_list`.
    if !unsafe { tw_timer(timer) } {
        return Ok(());
    }
    tw_timer_report(timer as u64, k)
}
