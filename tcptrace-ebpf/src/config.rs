//! The loader's configuration: frozen before the programs load, so the verifier reads each
//! field as a constant and prunes the branches it decides. Programs read it field by field
//! through [`config`] (never a copy of the whole struct on the 512-byte stack), and
//! [`idle`] reads its one field.

use core::ptr::{addr_of, read_volatile};

use tcptrace_common::{
    Config, MAX_KERNEL_NETNS, NsOffsets, OwnersOffsets, ReceiveResetOffsets, SendResetOffsets,
    SetStateOffsets, SockOffsets, TimewaitOffsets, details::TcpOffsets,
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
        known_layout: 0,
    },
    send_reset: SendResetOffsets {
        skaddr: 0,
        state: 0,
        reason: 0,
        saddr: 0,
        daddr: 0,
        _pad: 0,
    },
    receive_reset: ReceiveResetOffsets {
        skaddr: 0,
        sport: 0,
        dport: 0,
        family: 0,
        saddr_v6: 0,
        daddr_v6: 0,
    },
    bench: 0,
    timewait: TimewaitOffsets {
        handler: 0,
        start_timer: 0,
        start_function: 0,
        start_expires: 0,
        start_now: 0,
        expire_timer: 0,
        expire_function: 0,
        cancel_timer: 0,
        tw_timer: 0,
        tw_substate: 0,
        skc_family: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        timer_function: 0,
        timer_expires: 0,
        _pad: 0,
    },
    family: 0,
    port_filters: 0,
    mptcp: 0,
    state_mask: 0,
    wakeup_bytes: 0,
    idle: 0,
    ns: NsOffsets::UNKNOWN,
    netns_count: 0,
    netns: [0; MAX_KERNEL_NETNS],
    sock: SockOffsets {
        known: 0,
        sk_protocol: 0,
        skc_family: 0,
        skc_dport: 0,
        skc_daddr: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        skc_state: 0,
        skc_num: 0,
        skc_rcv_saddr: 0,
        inet_saddr: 0,
        inet_sport_in_span: 0,
        skb_head: 0,
        skb_network_header: 0,
        skb_transport_header: 0,
        _pad: 0,
    },
    send_reset_reason: 0,
    records: 0,
    tcp: TcpOffsets::UNKNOWN,
    owners: OwnersOffsets {
        known: 0,
        task_tgid: 0,
        file_inode: 0,
        inode_mode: 0,
        inode_ino: 0,
        task_comm: 0,
        _pad: [0; 2],
    },
};

/// The loader's configuration, behind a pointer the compiler cannot see through (so it does
/// not fold the placeholder zeros), while the verifier reads every field as the constant the
/// loader froze: branches on it are pruned, and offsets read from it are known.
#[inline(always)]
pub(crate) fn config() -> &'static Config {
    let p: *const Config = addr_of!(CONFIG);
    // SAFETY: a volatile read of a local pointer to a static; the static lives forever and
    // is never written by the program.
    unsafe { &*read_volatile(&p) }
}

/// Whether the loader asked for idle programs (`Config::idle`, the benchmark's floor). The
/// verifier reads the frozen configuration and drops the branch that is not taken.
///
/// The first thing every program does, so it reads its one field directly: two instructions
/// fewer than through [`config`], whose pointer goes through the stack.
#[inline(always)]
pub(crate) fn idle() -> bool {
    // SAFETY: a volatile read of one field of a static that lives forever and that the
    // program never writes (volatile: the compiler must not fold the placeholder zero).
    unsafe { read_volatile(addr_of!(CONFIG.idle)) != 0 }
}
