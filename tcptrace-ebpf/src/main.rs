//! tcptrace's kernel side: one tracepoint program on `sock:inet_sock_set_state`.
//!
//! For every TCP transition it updates a bounded per-socket map (time of the last
//! transition, the owner learnt from a system call it drove), applies the loader's filters,
//! and writes one [`Event`] into the `EVENTS` ring buffer. Wake-ups are batched: the reader
//! is woken only once `wakeup_bytes` are waiting, and drains on its own tick otherwise.
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_comm, bpf_probe_read_kernel},
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use tcptrace_common::{
    Config, Event, IPPROTO_MPTCP, IPPROTO_TCP, SetStateOffsets, driven_by_owner, filter_keeps,
    flag, kind, state,
};

/// Written by the loader before the program is loaded (read-only for the program).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: SetStateOffsets {
        skaddr: 0,
        oldstate: 0,
        newstate: 0,
        sport: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        _pad: 0,
    },
    family: 0,
    port_filters: 0,
    mptcp: 0,
    state_mask: 0,
    wakeup_bytes: 0,
    _pad: 0,
};

/// Transitions for userspace. The loader sizes it (`map_max_entries`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events that found the ring buffer full, per CPU. Loss is never silent.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Port filter sets: port → bits of `tcptrace_common::port_filter`.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// What is known of each live socket, keyed by its kernel address. LRU-bounded: a socket
/// evicted here only loses its duration and owner, never its events.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// The owner of each listening port, so accepted sockets (created in softirq, where the
/// current task is arbitrary) can name the process that listens for them.
#[map]
static LISTENERS: LruHashMap<u16, Owner> = LruHashMap::with_max_entries(4096, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Owner {
    comm: [u64; 2],
    pid: u32,
    flags: u32,
}

// The BPF backend has no memset/memmove: LLVM turns adjacent stores and struct copies into
// those built-ins unless every access is a separate volatile scalar access.
#[inline(always)]
unsafe fn put<T>(dst: *mut T, v: T) {
    unsafe { dst.write_volatile(v) }
}

#[inline(always)]
unsafe fn copy_owner(dst: *mut Owner, src: *const Owner) {
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), (*src).comm[0]);
        put(addr_of_mut!((*dst).comm[1]), (*src).comm[1]);
        put(addr_of_mut!((*dst).pid), (*src).pid);
        put(addr_of_mut!((*dst).flags), (*src).flags);
    }
}

/// Zeroes 16 bytes at an 8-byte aligned address.
#[inline(always)]
unsafe fn zero16(dst: *mut [u8; 16]) {
    unsafe {
        put(dst.cast::<u64>(), 0);
        put(dst.cast::<u64>().add(1), 0);
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SockInfo {
    last_ts: u64,
    owner: Owner,
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_set_state(&ctx) {
        // Only a wrong offset or a kernel that changed the record gets here: say so through
        // aya-log rather than dropping transitions silently.
        error!(&ctx, "tcptrace: reading sock:inet_sock_set_state failed: {}", err);
    }
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i32> {
    // SAFETY: the offset comes from the tracepoint's own format file; the helper checks the
    // read and fails cleanly if it is wrong.
    unsafe { ctx.read_at::<T>(off as usize) }
}

/// The current task as an owner: only called for transitions its own system call drives.
#[inline(always)]
fn current_owner(dst: *mut Owner) {
    unsafe {
        bpf_get_current_comm(addr_of_mut!((*dst).comm).cast::<c_void>(), 16);
        put(addr_of_mut!((*dst).pid), (bpf_get_current_pid_tgid() >> 32) as u32);
        put(addr_of_mut!((*dst).flags), flag::OWNER_KNOWN as u32);
    }
}

#[inline(always)]
fn clear_owner(dst: *mut Owner) {
    unsafe {
        put(addr_of_mut!((*dst).comm[0]), 0);
        put(addr_of_mut!((*dst).comm[1]), 0);
        put(addr_of_mut!((*dst).pid), 0);
        put(addr_of_mut!((*dst).flags), 0);
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: CONFIG is a plain value the loader fills in; volatile keeps the compiler from
    // folding the zeros above into the code.
    let cfg = unsafe { read_volatile(&CONFIG) };
    let o = cfg.offsets;

    let protocol: u16 = read(ctx, o.protocol)?;
    let mptcp = protocol == IPPROTO_MPTCP;
    if protocol != IPPROTO_TCP && !(mptcp && cfg.mptcp != 0) {
        return Ok(());
    }
    let family: u16 = read(ctx, o.family)?;
    if cfg.family != 0 && cfg.family != family {
        return Ok(());
    }
    let old = read::<i32>(ctx, o.oldstate)? as u8;
    let new = read::<i32>(ctx, o.newstate)? as u8;
    let skaddr: u64 = read(ctx, o.skaddr)?;
    let sport: u16 = read(ctx, o.sport)?;
    let dport: u16 = read(ctx, o.dport)?;
    let now = unsafe { bpf_ktime_get_ns() };

    // Per-socket bookkeeping happens before filtering, so durations stay right for sockets
    // whose earlier transitions were filtered out (an lport filter drops connect()'s
    // CLOSE→SYN_SENT, which has no local port yet).
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    // Filled on every path below before it is read.
    let owner_ptr = owner.as_mut_ptr();
    let mut flags: u8 = if mptcp { flag::MPTCP } else { 0 };
    let mut in_from: u64 = 0;
    let driven = driven_by_owner(old, new);
    match SOCKS.get_ptr_mut(skaddr) {
        Some(info) => unsafe {
            in_from = now.wrapping_sub((*info).last_ts);
            flags |= flag::DURATION_KNOWN;
            if driven {
                current_owner(addr_of_mut!((*info).owner));
            }
            (*info).last_ts = now;
            copy_owner(owner_ptr, addr_of_mut!((*info).owner));
            if new == state::CLOSE {
                let _ = SOCKS.remove(skaddr);
            }
        },
        None => unsafe {
            if driven {
                current_owner(owner_ptr);
            } else if old == state::LISTEN && new == state::SYN_RECV {
                match LISTENERS.get_ptr(sport) {
                    Some(l) => {
                        copy_owner(owner_ptr, l);
                        put(
                            addr_of_mut!((*owner_ptr).flags),
                            (*l).flags | flag::OWNER_FROM_LISTENER as u32,
                        );
                    }
                    None => clear_owner(owner_ptr),
                }
            } else {
                clear_owner(owner_ptr);
            }
            if new != state::CLOSE {
                let mut info = core::mem::MaybeUninit::<SockInfo>::uninit();
                let i = info.as_mut_ptr();
                put(addr_of_mut!((*i).last_ts), now);
                copy_owner(addr_of_mut!((*i).owner), owner_ptr);
                let _ = SOCKS.insert(skaddr, &*i, 0);
            }
        },
    }
    if old == state::CLOSE && new == state::LISTEN {
        // SAFETY: every path above initialised the owner.
        let _ = LISTENERS.insert(sport, unsafe { &*owner_ptr }, 0);
    } else if old == state::LISTEN && new == state::CLOSE {
        let _ = LISTENERS.remove(sport);
    }

    if !filter_keeps(&cfg, family, old, new, sport, dport, |p| unsafe {
        PORTS.get(p).copied().unwrap_or(0)
    }) {
        return Ok(());
    }

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(n) = LOST.get_ptr_mut(0) {
            unsafe { *n += 1 };
        }
        return Ok(());
    };
    let e = entry.as_mut_ptr();
    unsafe {
        put(addr_of_mut!((*e).ts_ns), now);
        put(addr_of_mut!((*e).skaddr), skaddr);
        put(addr_of_mut!((*e).in_from_ns), in_from);
        put(addr_of_mut!((*e).aux), 0);
        let base = ctx.as_ptr_const();
        if bpf_probe_read_kernel(
            addr_of_mut!((*e).saddr).cast(),
            16,
            base.add(o.saddr_v6 as usize).cast(),
        ) != 0
        {
            zero16(addr_of_mut!((*e).saddr));
        }
        if bpf_probe_read_kernel(
            addr_of_mut!((*e).daddr).cast(),
            16,
            base.add(o.daddr_v6 as usize).cast(),
        ) != 0
        {
            zero16(addr_of_mut!((*e).daddr));
        }
        let comm = addr_of_mut!((*e).comm).cast::<u64>();
        put(comm, (*owner_ptr).comm[0]);
        put(comm.add(1), (*owner_ptr).comm[1]);
        put(addr_of_mut!((*e).pid), (*owner_ptr).pid);
        put(addr_of_mut!((*e).sport), sport);
        put(addr_of_mut!((*e).dport), dport);
        put(addr_of_mut!((*e).family), family);
        put(addr_of_mut!((*e).kind), kind::TRANSITION);
        put(addr_of_mut!((*e).oldstate), old);
        put(addr_of_mut!((*e).newstate), new);
        put(addr_of_mut!((*e).flags), flags | (*owner_ptr).flags as u8);
        put(addr_of_mut!((*e)._pad).cast::<u16>(), 0);
    }
    let wake = if cfg.wakeup_bytes == 0
        || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= cfg.wakeup_bytes as u64
    {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
    Ok(())
}

trait CtxPtr {
    fn as_ptr_const(&self) -> *const u8;
}

impl CtxPtr for TracePointContext {
    #[inline(always)]
    fn as_ptr_const(&self) -> *const u8 {
        use aya_ebpf::EbpfContext as _;
        self.as_ptr().cast::<u8>().cast_const()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
