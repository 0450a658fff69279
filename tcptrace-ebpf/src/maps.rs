//! Every map the programs share with the loader, which finds them by name, and the per-CPU
//! counters kept in some of them.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tcptrace_common::{COUNTER_SLOTS, ListenKey, Owner, connection::SockStorage};

use crate::{fallback::SockInfo, mem::put};

// The sizes written here are placeholders for the maps the loader sizes before loading
// (`map_max_entries`): EVENTS, SOCKS, LISTENERS.
const EVENTS_PLACEHOLDER_BYTES: u32 = 1 << 20;
const SOCKS_PLACEHOLDER_ENTRIES: u32 = 1 << 16;
const LISTENERS_PLACEHOLDER_ENTRIES: u32 = 1 << 12;
/// Entries of PORTS: one per port.
const PORT_ENTRIES: u32 = u16::MAX as u32 + 1;

/// Transitions for userspace. The loader sizes it (`map_max_entries`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_PLACEHOLDER_BYTES, 0);

/// Events that found the ring buffer full, per CPU. Loss is never silent.
#[map]
pub(crate) static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Port filter sets: port → bits of `tcptrace_common::port_filter`. An array, not a hash:
/// the kernel inlines its lookup (an index), and 64 KiB covers every port.
#[map]
pub(crate) static PORTS: Array<u8> = Array::with_max_entries(PORT_ENTRIES, 0);

/// What is known of each live socket, keyed by its kernel address: the classic programs'
/// store (the BTF ones keep it in the socket). LRU-bounded, sized by the loader: a socket
/// evicted here only loses its duration and owner, never its events.
#[map]
pub(crate) static SOCKS: LruHashMap<u64, SockInfo> =
    LruHashMap::with_max_entries(SOCKS_PLACEHOLDER_ENTRIES, 0);

/// The owner of each listening port, so accepted sockets (created in softirq, where the
/// current task is arbitrary) can name the process that listens for them. Sized by the
/// loader; a listener that finds it full is counted in [`FORGOTTEN`].
#[map]
pub(crate) static LISTENERS: HashMap<ListenKey, Owner> =
    HashMap::with_max_entries(LISTENERS_PLACEHOLDER_ENTRIES, 0);

/// Per CPU: facts the kernel side could not keep (a listener that found [`LISTENERS`] full,
/// a socket whose storage the kernel could not allocate). Never silent: userspace shows it.
#[map]
pub(crate) static FORGOTTEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What tcptrace knows of a socket, kept with it (also read by userspace through sock_diag).
pub(crate) type SkState = SockStorage;

/// What tcptrace knows of each socket, kept with the socket: zeroed at creation, freed with
/// the socket.
#[btf_map]
pub(crate) static SK_STATE: SkStorage<SkState> = SkStorage::new();

/// Per CPU: transitions that no program ran for, found afterwards in the socket's storage
/// (see [`crate::transition`]): reported lost.
#[map]
pub(crate) static UNSEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What [`btf_set_state`] tells [`btf_set_state_nested`] on a CPU.
///
/// [`btf_set_state`]: crate::transition::btf_set_state
/// [`btf_set_state_nested`]: crate::transition::btf_set_state_nested
#[repr(C)]
pub(crate) struct Mark {
    /// Non-zero while it runs there.
    pub(crate) running: u64,
    /// The socket of the transition it last finished there, and the state it entered.
    pub(crate) last_sk: u64,
    pub(crate) last_new: u64,
}

/// Per CPU: [`btf_set_state`](crate::transition::btf_set_state)'s [`Mark`], in its one slot.
#[map]
pub(crate) static RUNNING: PerCpuArray<Mark> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the timewait socket whose arming was last reported there, until a connection
/// record names it. The kernel arms a closing socket's timewait socket right before it
/// logs the socket's entry into TIME_WAIT, on the same CPU: the connection record that
/// entry writes names it, so userspace finds the timewait socket by address rather than
/// by 4-tuple (it checks the 4-tuple; 0 when none waits).
#[map]
pub(crate) static ARMED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: transitions [`btf_set_state_nested`] took over, each of which the kernel counted
/// as a missed run of [`btf_set_state`]: userspace subtracts them from the misses. Slot
/// [`Slot::Nested`] holds those it handled, slot [`Slot::Transition`] the middle ones the
/// loader leaves out (nothing to do).
///
/// [`btf_set_state`]: crate::transition::btf_set_state
/// [`btf_set_state_nested`]: crate::transition::btf_set_state_nested
#[map]
pub(crate) static CAUGHT: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Counts one fact not kept, in the counting program's slot.
#[inline(always)]
pub(crate) fn forgot(slot: Slot) {
    count(&FORGOTTEN, slot);
}

/// Which program counts: its slot in the per-CPU counters, defined with userspace.
pub(crate) use tcptrace_common::CounterSlot as Slot;

/// Adds one to `slot` of a per-CPU counter (userspace sums every slot of every CPU).
#[inline(always)]
pub(crate) fn count(counter: &PerCpuArray<u64>, slot: Slot) {
    if let Some(n) = counter.get_ptr_mut(slot as u32) {
        // SAFETY: a valid per-CPU slot that only this program writes on this CPU.
        unsafe { put(n, *n + 1) };
    }
}

#[inline(always)]
pub(crate) fn port_bits(p: u16) -> u8 {
    PORTS.get(u32::from(p)).copied().unwrap_or(0)
}

/// The key of the listener on `port` in namespace `netns`.
#[inline(always)]
pub(crate) fn listen_key(netns: u32, port: u16) -> ListenKey {
    ListenKey {
        netns,
        port,
        _pad: 0,
    }
}
