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
use tcptrace::{probe::DEFAULT_RING_BYTES, track::Close, track::Role};

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
    let rule = format!("tcp dport {port} meta length gt 200 numgen inc mod 5 0 drop");
    for cmd in [
        "add table inet tct".to_string(),
        "add chain inet tct in { type filter hook input priority 0; }".to_string(),
        format!("add rule inet tct in {rule}"),
    ] {
        let st = Command::new("ip")
            .args(["netns", "exec", &pair.b, "nft"])
            .args(cmd.split(' '))
            .status()
            .unwrap();
        assert!(st.success(), "nft {cmd}");
    }
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
