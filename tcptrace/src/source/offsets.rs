//! Where the kernel keeps what the programs read, from its BTF: the offsets of the socket,
//! TCP, namespace, cgroup and timewait fields (with the timewait timer's handler, from
//! `/proc/kallsyms`), handed to the programs in their configuration, so that nothing about
//! kernel structures is hard-coded.

use tcptrace_common::{
    INET_SPAN_BYTES, NsOffsets, SockOffsets, TimewaitOffsets, details::TcpOffsets,
};

use super::{btf::Btf, host::kallsyms_address};

/// The byte offset of `path` in struct `ty` (BTF), as the programs take it.
fn offset16(btf: &Btf, ty: &str, path: &str) -> Result<u16, String> {
    btf.offset(ty, path)
        .map_err(|e| e.to_string())
        .and_then(|o| u16::try_from(o).map_err(|_| format!("{ty}.{path} is too far in")))
}

/// Where sockets and segments keep what the tracepoints' records hold (BTF offsets), for
/// the BTF programs.
pub fn sock_offsets(btf: &Btf) -> Result<SockOffsets, String> {
    let at = |ty: &str, path: &str| offset16(btf, ty, path);
    // An inet_sock starts with its sock, which starts with its sock_common.
    if at("inet_sock", "sk")? != 0 || at("sock", "__sk_common")? != 0 {
        return Err("inet_sock or sock does not start with its sock".into());
    }
    let inet_saddr = at("inet_sock", "inet_saddr")?;
    let sport_in_span = at("inet_sock", "inet_sport")?
        .checked_sub(inet_saddr)
        .filter(|d| d + 2 <= INET_SPAN_BYTES)
        .ok_or("inet_sock.inet_sport is not within 8 bytes after inet_saddr")?;
    Ok(SockOffsets {
        known: 1,
        sk_protocol: at("sock", "sk_protocol")?,
        skc_family: at("sock_common", "skc_family")?,
        skc_state: at("sock_common", "skc_state")?,
        skc_dport: at("sock_common", "skc_dport")?,
        skc_num: at("sock_common", "skc_num")?,
        skc_daddr: at("sock_common", "skc_daddr")?,
        skc_rcv_saddr: at("sock_common", "skc_rcv_saddr")?,
        skc_v6_daddr: at("sock_common", "skc_v6_daddr")?,
        skc_v6_rcv_saddr: at("sock_common", "skc_v6_rcv_saddr")?,
        inet_saddr,
        inet_sport_in_span: sport_in_span,
        skb_head: at("sk_buff", "head")?,
        skb_network_header: at("sk_buff", "network_header")?,
        skb_transport_header: at("sk_buff", "transport_header")?,
        _pad: 0,
    })
}

/// Where tasks, files and inodes keep what the socket owners' iterator reads.
pub fn owners_offsets(btf: &Btf) -> Result<tcptrace_common::OwnersOffsets, String> {
    let at = |ty: &str, path: &str| offset16(btf, ty, path);
    Ok(tcptrace_common::OwnersOffsets {
        known: 1,
        task_tgid: at("task_struct", "tgid")?,
        file_inode: at("file", "f_inode")?,
        inode_mode: at("inode", "i_mode")?,
        inode_ino: at("inode", "i_ino")?,
        task_comm: at("task_struct", "comm")?,
        _pad: [0; 2],
    })
}

/// Where a TCP socket keeps the counters of [`Details`](tcptrace_common::details::Details),
/// from the kernel's BTF: every offset from the start of the `tcp_sock`.
pub fn tcp_offsets(btf: &Btf) -> Result<TcpOffsets, String> {
    let at = |ty: &str, path: &str| offset16(btf, ty, path);
    // A tcp_sock starts with its inet_connection_sock, which starts with its inet_sock (and
    // that with its sock: see `sock_offsets`).
    if at("tcp_sock", "inet_conn")? != 0 || at("inet_connection_sock", "icsk_inet")? != 0 {
        return Err("tcp_sock does not start with its inet_connection_sock".into());
    }
    if at("minmax", "s")? != 0 {
        return Err("minmax does not start with its samples".into());
    }
    let keepopen = btf
        .enumerator("sock_flags", "SOCK_KEEPOPEN")
        .map_err(|e| e.to_string())?;
    Ok(TcpOffsets {
        known: 1,
        bytes_acked: at("tcp_sock", "bytes_acked")?,
        bytes_received: at("tcp_sock", "bytes_received")?,
        segs_out: at("tcp_sock", "segs_out")?,
        segs_in: at("tcp_sock", "segs_in")?,
        total_retrans: at("tcp_sock", "total_retrans")?,
        srtt_us: at("tcp_sock", "srtt_us")?,
        mdev_us: at("tcp_sock", "mdev_us")?,
        min_rtt: at("tcp_sock", "rtt_min")? + at("minmax_sample", "v")?,
        packets_out: at("tcp_sock", "packets_out")?,
        sk_err: at("sock", "sk_err")?,
        sk_flags: at("sock_common", "skc_flags")?,
        keepopen_bit: u16::try_from(keepopen)
            .ok()
            .filter(|b| *b < 64)
            .ok_or(format!("SOCK_KEEPOPEN is bit {keepopen}"))?,
        user_timeout: at("inet_connection_sock", "icsk_user_timeout")?,
        retransmits: at("inet_connection_sock", "icsk_retransmits")?,
        probes_out: at("inet_connection_sock", "icsk_probes_out")?,
    })
}

/// Where sockets keep their network namespace and cgroup, from the kernel's BTF, with one
/// message per part that cannot be found (that part is then reported as unknown, 0).
pub fn ns_offsets(btf: &Btf) -> (NsOffsets, Vec<String>) {
    let at = |ty: &str, path: &str| offset16(btf, ty, path);
    let mut o = NsOffsets::UNKNOWN;
    let mut missing = Vec::new();
    // Full, timewait and request sockets all start with their sock_common, so one offset
    // serves the three; check that they do.
    let netns = (|| {
        for (ty, common) in [
            ("sock", "__sk_common"),
            ("inet_timewait_sock", "__tw_common"),
        ] {
            if at(ty, common)? != 0 {
                return Err(format!("{ty}.{common} is not at the start"));
            }
        }
        Ok((at("sock_common", "skc_net.net")?, at("net", "ns.inum")?))
    })();
    match netns {
        Ok((net, inum)) => (o.skc_net, o.net_inum) = (net, inum),
        Err(e) => missing.push(format!(
            "network namespaces are not reported on this kernel: {e}"
        )),
    }
    let cgroup = (|| {
        Ok::<_, String>((
            at("sock", "sk_cgrp_data.cgroup")?,
            at("cgroup", "kn")?,
            at("kernfs_node", "id")?,
        ))
    })();
    match cgroup {
        Ok((cg, kn, id)) => (o.sk_cgroup, o.cgroup_kn, o.kn_id) = (cg, kn, id),
        Err(e) => missing.push(format!(
            "cgroups are not reported on this kernel: {e} (Linux 5.15 or later has them)"
        )),
    }
    (o, missing)
}

/// Everything the timewait programs need, from `/proc/kallsyms`, the kernel's BTF and the
/// timer tracepoints' formats.
pub fn timewait_offsets() -> Result<TimewaitOffsets, String> {
    let btf = Btf::from_sys().map_err(|e| format!("no kernel BTF ({e})"))?;
    timewait_offsets_in(&btf)
}

/// [`timewait_offsets`] with the kernel's BTF already read: the handler's address and the
/// timewait socket's and timer's fields (the classic programs also need
/// [`timer_format_offsets`]).
pub(super) fn timewait_offsets_in(btf: &Btf) -> Result<TimewaitOffsets, String> {
    let handler = kallsyms_address("tw_timer_handler")?;
    Ok(TimewaitOffsets {
        handler,
        ..timewait_layout(btf)?
    })
}

/// The timewait socket's and its timer's fields, without the handler's address (0): all
/// that the programs on the timewait functions need.
pub(super) fn timewait_layout(btf: &Btf) -> Result<TimewaitOffsets, String> {
    let tw = |path: &str| offset16(btf, "inet_timewait_sock", path);
    let common = |m: &str| tw(&format!("__tw_common.{m}"));
    let timer = |m: &str| offset16(btf, "timer_list", m);
    Ok(TimewaitOffsets {
        tw_timer: tw("tw_timer")?,
        tw_substate: tw("tw_substate")?,
        skc_family: common("skc_family")?,
        skc_dport: common("skc_dport")?,
        skc_num: common("skc_num")?,
        skc_daddr: common("skc_daddr")?,
        skc_rcv_saddr: common("skc_rcv_saddr")?,
        skc_v6_daddr: common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        timer_function: timer("function")?,
        timer_expires: timer("expires")?,
        ..TimewaitOffsets::default()
    })
}
