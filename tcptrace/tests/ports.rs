//! Root-only: running out of local ports, in a network namespace the test creates, with the
//! kernel's own lists (sock_diag) and the client's errors as the judges.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;

/// Sockets in namespace `ns` holding a local port toward `to`: open or in TIME_WAIT.
fn held_per_sock_diag(ns: &str, to: SocketAddr) -> usize {
    let dst = format!("dst {to}");
    ss(ns, &["-Htan", "exclude", "listening", &dst])
        .lines()
        .count()
}

/// Two namespaces whose first (a, the clients') has 50 local ports and no reuse of
/// TIME_WAIT ones.
fn fifty_ports() -> NetPair {
    let pair = NetPair::new();
    sysctl(&pair.a, "net.ipv4.ip_local_port_range", "40000 40049");
    sysctl(&pair.a, "net.ipv4.tcp_tw_reuse", "0");
    pair
}

#[test]
fn a_destination_running_out_of_ports_is_shown_before_connects_fail() {
    if !root_or_skip("a_destination_running_out_of_ports_is_shown_before_connects_fail") {
        return;
    }
    // The client, closing first, uses the 50 ports up.
    let pair = fifty_ports();
    let port = 29_000 + (std::process::id() % 1000) as u16;
    let server = SocketAddr::new(pair.b4, port);
    let mut tracer = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["ports", "--json", "--interval", "300ms", "--duration", "4s"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_tracing(&mut tracer);
    std::thread::sleep(Duration::from_millis(300));
    let srv = patient_server(&pair, server, 3);
    // Connects every 20 ms, each closed first by the client, until ports run out.
    let failures = closing_first(&pair, server, 70, 20);
    assert!(failures > 0, "the 50 ports ran out");
    let held = held_per_sock_diag(&pair.a, server);
    srv.join().unwrap();
    let out = tracer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["raddr"] == pair.b4.to_string() && r["rport"] == port)
        .collect();
    assert!(!rows.is_empty(), "{text}");
    for r in &rows {
        assert_eq!(r["kind"], "ports");
        assert_eq!(r["available"], 50, "{r}");
        assert_eq!(r["laddr"], pair.a4.to_string(), "{r}");
    }
    let last = rows.last().unwrap();
    // Every failed connect is counted, none made up.
    assert_eq!(last["failures_total"], failures, "{text}");
    let first_failing = rows
        .iter()
        .position(|r| r["failures"].as_u64().unwrap() > 0)
        .unwrap_or_else(|| panic!("no interval with failures: {text}"));
    assert!(
        rows[first_failing]["usage"].as_f64().unwrap() >= 0.9,
        "{text}"
    );
    // Before they started, the rise gave a time to exhaustion.
    assert!(
        rows[..first_failing]
            .iter()
            .any(|r| r["exhaustion_s"].as_f64().is_some_and(|e| e > 0.0)),
        "{text}"
    );
    // The ports held at the end are the sockets the kernel lists toward the server.
    let in_use = last["in_use"].as_u64().unwrap() as usize;
    assert!(
        in_use.abs_diff(held) <= 1,
        "tcptrace: {in_use}, sock_diag: {held}: {text}"
    );
}

/// A server in namespace b on `server` that reads each connection to its end, for `secs`.
fn patient_server(pair: &NetPair, server: SocketAddr, secs: u64) -> std::thread::JoinHandle<()> {
    let (tx, rx) = mpsc::channel();
    let h = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(server).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    let mut b = [0u8; 1];
                    while c.read(&mut b).map(|k| k > 0).unwrap_or(false) {}
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    rx.recv().unwrap();
    h
}

/// From namespace a: `n` connects to `server` `gap_ms` apart, each closed first; the
/// EADDRNOTAVAIL failures.
fn closing_first(pair: &NetPair, server: SocketAddr, n: usize, gap_ms: u64) -> u64 {
    NetPair::run_in(&pair.a, move || {
        let mut failures = 0u64;
        for _ in 0..n {
            match TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                Ok(c) => drop(c),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{e}");
                    failures += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(gap_ms));
        }
        failures
    })
    .join()
    .unwrap()
}

/// `tcptrace doctor --json` for `secs`, on `port`: its exit code and its reports.
fn doctor(port: u16, secs: u64) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["doctor", "--json", "--duration", &format!("{secs}s")])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_tracing(&mut child);
    child
}

/// The finding on `sysctl` in the report of namespace `ns`.
fn finding(reports: &str, ns: &str, sysctl: &str) -> serde_json::Value {
    let inode = std::fs::metadata(format!("/run/netns/{ns}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let report: serde_json::Value = reports
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["kind"] == "doctor" && r["netns"] == inode)
        .unwrap_or_else(|| panic!("no report for namespace {ns} ({inode}) in {reports}"));
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["sysctl"] == sysctl)
        .cloned()
        .unwrap_or_else(|| panic!("no {sysctl} in {report:#}"))
}

/// A TcpExt counter of namespace `ns`, as the kernel keeps it.
fn tcp_ext(ns: &str, name: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/netstat"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn doctor_names_the_port_range_and_the_time_wait_limit_from_what_it_measured() {
    if !root_or_skip("doctor_names_the_port_range_and_the_time_wait_limit_from_what_it_measured") {
        return;
    }
    // Ports running out toward one destination.
    let pair = fifty_ports();
    let port = 30_000 + (std::process::id() % 1000) as u16;
    let server = SocketAddr::new(pair.b4, port);
    let doc = doctor(port, 4);
    let srv = patient_server(&pair, server, 3);
    let failures = closing_first(&pair, server, 70, 20);
    assert!(failures > 0, "the 50 ports ran out");
    srv.join().unwrap();
    let out = doc.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "a problem: {text}");
    let f = finding(&text, &pair.a, "net.ipv4.ip_local_port_range");
    assert_eq!(f["verdict"], "problem", "{f}");
    assert_eq!(f["value"], "40000 40049", "{f}");
    let evidence = f["evidence"].as_str().unwrap();
    assert!(
        evidence.starts_with(&format!("{failures} connects to {server}")),
        "the failures counted, and the destination: {evidence}"
    );
    assert!(
        f["advice"]
            .as_str()
            .unwrap()
            .contains("closed first by this host"),
        "{f}"
    );
    let f = finding(&text, &pair.a, "net.ipv4.tcp_tw_reuse");
    assert_eq!(f["verdict"], "warning", "reuse would help here: {f}");

    // The same load, a little slower, with tcp_tw_reuse=1 (timestamps on): connects take
    // TIME_WAIT ports older than a second (tcp_tw_reuse_delay), so once the 50 ports are
    // used (over 1.5 s) none fails, and doctor says why.
    let pair = NetPair::new();
    sysctl(&pair.a, "net.ipv4.ip_local_port_range", "40000 40049");
    sysctl(&pair.a, "net.ipv4.tcp_tw_reuse", "1");
    let port = port + 2;
    let server = SocketAddr::new(pair.b4, port);
    let doc = doctor(port, 5);
    let srv = patient_server(&pair, server, 4);
    assert_eq!(
        closing_first(&pair, server, 70, 30),
        0,
        "reuse kept ports free"
    );
    srv.join().unwrap();
    let out = doc.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let f = finding(&text, &pair.a, "net.ipv4.ip_local_port_range");
    assert_ne!(f["verdict"], "problem", "{f}");
    let f = finding(&text, &pair.a, "net.ipv4.tcp_tw_reuse");
    assert_eq!(
        (f["verdict"].as_str(), f["value"].as_str()),
        (Some("ok"), Some("1")),
        "{f}"
    );
    let taken = f["evidence"]
        .as_str()
        .unwrap()
        .split("incoming ones (it does nothing for them); ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{f}"));
    assert!(
        taken > 0,
        "TIME_WAIT sockets taken over by new connects: {f}"
    );

    // A TIME_WAIT limit of 5: the sixth close on gets no timewait socket.
    let pair = NetPair::new();
    sysctl(&pair.a, "net.ipv4.tcp_max_tw_buckets", "5");
    let port = port + 1;
    let server = SocketAddr::new(pair.b4, port);
    let before = tcp_ext(&pair.a, "TCPTimeWaitOverflow");
    let doc = doctor(port, 3);
    let srv = patient_server(&pair, server, 2);
    assert_eq!(closing_first(&pair, server, 20, 20), 0);
    srv.join().unwrap();
    let out = doc.wait_with_output().unwrap();
    let overflow = tcp_ext(&pair.a, "TCPTimeWaitOverflow") - before;
    assert!(overflow > 0, "the limit was reached");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "a problem: {text}");
    let f = finding(&text, &pair.a, "net.ipv4.tcp_max_tw_buckets");
    assert_eq!(f["verdict"], "problem", "{f}");
    assert!(
        f["evidence"]
            .as_str()
            .unwrap()
            .contains(&format!("(TCPTimeWaitOverflow +{overflow})")),
        "the kernel's own count: {f}"
    );
}

#[test]
fn serve_exports_the_port_usage_and_the_failed_connects() {
    if !root_or_skip("serve_exports_the_port_usage_and_the_failed_connects") {
        return;
    }
    let pair = fifty_ports();
    let port = 31_000 + (std::process::id() % 1000) as u16;
    let server = SocketAddr::new(pair.b4, port);
    let p = port.to_string();
    let (mut serve, addr) = start_serve(&["--port", &p, "--doctor-interval", "3s"]);
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let srv = patient_server(&pair, server, 3);
    let failures = closing_first(&pair, server, 70, 20);
    assert!(failures > 0, "the 50 ports ran out");
    srv.join().unwrap();
    // The ports are counted once a second, the settings judged every 3 s: the first
    // judgement covers the failures (from about 1.5 s on), and holds until 6 s.
    std::thread::sleep(
        (started + Duration::from_millis(4500))
            .saturating_duration_since(std::time::Instant::now()),
    );
    let body = scrape(&addr);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let _ = serve.wait();
    let metric = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
    };
    assert_eq!(
        metric("tcptrace_connect_failures_total{reason=\"no_port\"}") as u64,
        failures,
        "every failed connect: {body}"
    );
    let usage = metric(&format!(
        "tcptrace_port_usage_ratio{{destination=\"{server}\",laddr=\"{}\"}}",
        pair.a4
    ));
    assert!(usage >= 0.9, "{usage}: {body}");
    let verdict = metric(
        "tcptrace_doctor_verdict{sysctl=\"net.ipv4.ip_local_port_range\",verdict=\"problem\"}",
    );
    assert_eq!(verdict, 1.0, "doctor's verdict, exported: {body}");
}
