//! Root-only: what the kernel's counters say of a connection at its end (bytes, segments,
//! retransmissions, round-trip times), on real connections between two network namespaces,
//! judged by what the test sent and by the namespaces' own counters. The kernel writes each
//! connection as its transitions and as a connection record: both must carry the same.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::mpsc,
};

use common::*;
use tcptrace::{
    analysis::{
        closes::{Close, Role},
        reason::{ResetNames, end_reason},
    },
    source::probe::DEFAULT_RING_BYTES,
};

/// Sends `bytes` from namespace a to a server in namespace b that reads them all, then
/// closes after the client; returns the client's and the server's closes.
fn upload(pair: &NetPair, port: u16, bytes: usize) -> (Close, Close) {
    let mut probe = recording_probe_for_ports(&[port], DEFAULT_RING_BYTES);
    let addr = SocketAddr::new(pair.b4, port);
    let (tx, rx) = mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got.len()
    });
    rx.recv().unwrap();
    let cli = NetPair::run_in(&pair.a, move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&vec![7u8; bytes]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
    });
    cli.join().unwrap();
    assert_eq!(
        srv.join().unwrap(),
        bytes,
        "the server read the whole upload"
    );
    let (_, closes) = collect_closes(&mut probe, 2);
    let side = |role| {
        *closes
            .iter()
            .find(|c| c.role == role)
            .unwrap_or_else(|| panic!("no {role:?} close in {closes:#?}"))
    };
    (side(Role::Client), side(Role::Server))
}

/// Whether `got` is within 1 % of `want`.
fn within_1pct(got: u64, want: usize) -> bool {
    got.abs_diff(want as u64) * 100 <= want as u64
}

#[test]
fn an_upload_counts_its_bytes_on_both_sides_and_a_round_trip_time() {
    if !root_or_skip("an_upload_counts_its_bytes_on_both_sides_and_a_round_trip_time") {
        return;
    }
    const BYTES: usize = 1 << 20;
    let pair = NetPair::new();
    let (client, server) = upload(&pair, free_port(), BYTES);
    let (c, s) = (client.details.unwrap(), server.details.unwrap());
    eprintln!("client: {c:?}\nserver: {s:?}");
    assert!(within_1pct(c.bytes_acked, BYTES), "client sent: {c:?}");
    assert!(
        within_1pct(s.bytes_received, BYTES),
        "server received: {s:?}"
    );
    // Nothing went the other way but the handshake and the FIN.
    assert!(c.bytes_received <= 2 && s.bytes_acked <= 2, "{c:?} {s:?}");
    for d in [c, s] {
        assert!(d.srtt_us().is_some_and(|r| r > 0), "a round trip: {d:?}");
        assert!(
            d.min_rtt_us().is_some_and(|m| m <= d.srtt_us.max(1) * 8),
            "{d:?}"
        );
        assert!(d.segs_out > 0 && d.segs_in > 0, "{d:?}");
    }
    // What one side sent, the other received: segment for segment on a lossless link
    // (GRO may merge what arrives, so the receiver counts at most as many).
    assert!(s.segs_in <= c.segs_out, "{c:?} {s:?}");
}

/// `tcptrace report`, whose kernel side writes connection records and their counters only:
/// each side's row carries the bytes that went its way.
#[test]
fn report_counts_the_bytes_of_each_side() {
    if !root_or_skip("report_counts_the_bytes_of_each_side") {
        return;
    }
    const BYTES: usize = 1 << 20;
    let pair = NetPair::new();
    let port = free_port();
    let p = port.to_string();
    let tracer = start_tracer(&["report", "--json", "--port", &p, "--duration", "5m"]);
    upload(&pair, port, BYTES);
    let reports = stop_tracer(tracer);
    let rows = reports[0]["rows"].as_array().unwrap();
    let row = |dir: &str| {
        rows.iter()
            .find(|r| r["port"] == port && r["direction"] == dir)
            .unwrap_or_else(|| panic!("no :{port} {dir} row: {reports:?}"))
    };
    let (out, inn) = (row("out"), row("in"));
    assert_eq!(
        (out["with_counters"].as_u64(), inn["with_counters"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        within_1pct(out["bytes_sent"].as_u64().unwrap(), BYTES),
        "{out}"
    );
    assert!(
        within_1pct(inn["bytes_received"].as_u64().unwrap(), BYTES),
        "{inn}"
    );
    assert!(
        inn["srtt"]["count"] == 1 && out["srtt"]["count"] == 1,
        "{out} {inn}"
    );
}

/// The namespace's `Tcp: RetransSegs` (`/proc/net/snmp`), read from inside it.
fn retrans_segs(ns: &str) -> u64 {
    NetPair::run_in(ns, || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    })
    .join()
    .unwrap()
}

/// Adds nftables `rule` to the input of namespace `ns` (a table of its own there).
fn drop_in(ns: &str, rule: &str) {
    nft(ns, "add table inet tct");
    nft(
        ns,
        "add chain inet tct in { type filter hook input priority 0; }",
    );
    nft(ns, &format!("add rule inet tct in {rule}"));
}

/// Whether nftables' `nft` runs (`cargo xtask setup` installs it); fails under CI=true.
fn nft_or_skip(test: &str) -> bool {
    if Command::new("nft").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs nft (nftables), and CI=true: `cargo xtask setup` installs it");
    }
    eprintln!("SKIPPED {test}: no nft (nftables); `cargo xtask setup` installs it");
    false
}

#[test]
fn retransmissions_are_the_namespaces_own_count() {
    let test = "retransmissions_are_the_namespaces_own_count";
    if !root_or_skip(test) || !nft_or_skip(test) {
        return;
    }
    const BYTES: usize = 256 << 10;
    let pair = NetPair::new();
    let port = free_port();
    // The server's namespace drops one in five of the segments carrying data.
    drop_in(
        &pair.b,
        &format!("tcp dport {port} meta length gt 200 numgen inc mod 5 0 drop"),
    );
    let before = retrans_segs(&pair.a);
    let (client, _) = upload(&pair, port, BYTES);
    let retransmitted = retrans_segs(&pair.a) - before;
    let c = client.details.unwrap();
    eprintln!("namespace a retransmitted {retransmitted} segments; the client's close: {c:?}");
    assert!(retransmitted > 0, "the drops made the client retransmit");
    assert_eq!(
        u64::from(c.total_retrans),
        retransmitted,
        "the client's retransmissions are all its namespace counted: {c:?}"
    );
    assert!(within_1pct(c.bytes_acked, BYTES), "{c:?}");
}

/// Sets an integer socket option.
fn setsockopt(s: &TcpStream, level: i32, name: i32, value: i32) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid descriptor and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

/// How a scripted client meets its end, in namespace a, against a server in namespace b
/// whose input the test may cut.
#[derive(Clone, Copy)]
enum Ending {
    /// The server's namespace drops every SYN: the connect times out.
    SynsDropped,
    /// The link goes silent after the handshake; keepalive probes go unanswered.
    SilentKeepalive,
    /// The link goes silent; data is sent with TCP_USER_TIMEOUT set.
    SilentUserTimeout,
    /// The link goes silent; data is retransmitted until tcp_retries2 runs out.
    SilentRetransmit,
    /// The server closes without reading what the client sent: it aborts.
    UnreadData,
}

/// Runs `ending` on a fresh pair; returns the close of the side it ends (the client's, or
/// the server's for [`Ending::UnreadData`]) with its reason as this kernel names it.
fn ended(ending: Ending) -> (Close, String) {
    let pair = NetPair::new();
    let port = free_port();
    let addr = SocketAddr::new(pair.b4, port);
    let mut probe = recording_probe_for_ports(&[port], DEFAULT_RING_BYTES);
    let silence = format!("tcp dport {port} drop");
    match ending {
        Ending::SynsDropped => {
            sysctl(&pair.a, "net.ipv4.tcp_syn_retries", "1");
            drop_in(&pair.b, &silence);
            let r = NetPair::run_in(&pair.a, move || TcpStream::connect(addr).err())
                .join()
                .unwrap();
            assert_eq!(r.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
        }
        Ending::UnreadData => {
            let (tx, rx) = mpsc::channel();
            let srv = NetPair::run_in(&pair.b, move || {
                let l = TcpListener::bind(addr).unwrap();
                tx.send(()).unwrap();
                let (c, _) = l.accept().unwrap();
                // Wait for the data to arrive, then close without reading it.
                std::thread::sleep(std::time::Duration::from_millis(200));
                drop(c);
            });
            rx.recv().unwrap();
            NetPair::run_in(&pair.a, move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"never read").unwrap();
                // The server's reset ends the read; bounded, in case it was dropped from a
                // full backlog beside the other suites (a reset is never retransmitted).
                c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest);
            })
            .join()
            .unwrap();
            srv.join().unwrap();
        }
        silent => {
            sysctl(&pair.a, "net.ipv4.tcp_retries2", "1");
            let (tx, rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let srv = NetPair::run_in(&pair.b, move || {
                let l = TcpListener::bind(addr).unwrap();
                tx.send(()).unwrap();
                let (c, _) = l.accept().unwrap();
                done_rx.recv().unwrap();
                drop(c);
            });
            rx.recv().unwrap();
            let c = NetPair::run_in(&pair.a, move || TcpStream::connect(addr).unwrap())
                .join()
                .unwrap();
            match silent {
                Ending::SilentKeepalive => {
                    setsockopt(&c, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                    setsockopt(&c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
                    setsockopt(&c, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
                    setsockopt(&c, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2);
                }
                Ending::SilentUserTimeout => {
                    setsockopt(&c, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 1000);
                }
                _ => {}
            }
            drop_in(&pair.b, &silence);
            let mut c = c;
            if !matches!(silent, Ending::SilentKeepalive) {
                c.write_all(b"into the void").unwrap();
            }
            let mut b = [0u8; 1];
            let err = c.read(&mut b).expect_err("the connection times out");
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
            drop(c);
            done_tx.send(()).unwrap();
            srv.join().unwrap();
        }
    }
    let (_, closes) = collect_closes(&mut probe, 1);
    let role = if matches!(ending, Ending::UnreadData) {
        Role::Server
    } else {
        Role::Client
    };
    let c = *closes
        .iter()
        .find(|c| c.role == role)
        .unwrap_or_else(|| panic!("no {role:?} close: {closes:#?}"));
    let reason = end_reason(&c, &ResetNames::from_sys()).to_string();
    (c, reason)
}

#[test]
fn a_connect_whose_syns_go_unanswered_ends_by_syn_timeout() {
    let test = "a_connect_whose_syns_go_unanswered_ends_by_syn_timeout";
    if !root_or_skip(test) || !nft_or_skip(test) {
        return;
    }
    let (c, reason) = ended(Ending::SynsDropped);
    assert_eq!(reason, "syn_timeout", "{c:#?}");
}

#[test]
fn unanswered_keepalive_probes_end_by_keepalive() {
    let test = "unanswered_keepalive_probes_end_by_keepalive";
    if !root_or_skip(test) || !nft_or_skip(test) {
        return;
    }
    let (c, reason) = ended(Ending::SilentKeepalive);
    assert_eq!(reason, "keepalive", "{c:#?}");
}

#[test]
fn a_user_timeout_ends_by_user_timeout() {
    let test = "a_user_timeout_ends_by_user_timeout";
    if !root_or_skip(test) || !nft_or_skip(test) {
        return;
    }
    let (c, reason) = ended(Ending::SilentUserTimeout);
    assert_eq!(reason, "user_timeout", "{c:#?}");
}

#[test]
fn retransmissions_that_run_out_end_by_rto_timeout() {
    let test = "retransmissions_that_run_out_end_by_rto_timeout";
    if !root_or_skip(test) || !nft_or_skip(test) {
        return;
    }
    let (c, reason) = ended(Ending::SilentRetransmit);
    assert_eq!(reason, "rto_timeout", "{c:#?}");
}

/// The kernel names the reset it sends when an application closes with unread data
/// (Linux 6.10 on: `SK_RST_REASON_TCP_ABORT_ON_CLOSE`).
#[test]
fn closing_with_unread_data_ends_by_abort_on_close() {
    if !root_or_skip("closing_with_unread_data_ends_by_abort_on_close") {
        return;
    }
    let (c, reason) = ended(Ending::UnreadData);
    if ResetNames::from_sys().name(0).is_none() {
        eprintln!("SKIPPED the reason's name: this kernel has no enum sk_rst_reason");
        return;
    }
    assert_eq!(reason, "abort_on_close", "{c:#?}");
}
