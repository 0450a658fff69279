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

/// Sets a sysctl inside a namespace.
fn sysctl(ns: &str, key: &str, value: &str) {
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "sysctl {key}={value} in {ns}");
}

/// Sockets in namespace `ns` holding a local port toward `to`: open or in TIME_WAIT.
fn held_per_sock_diag(ns: &str, to: SocketAddr) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htan", "exclude", "listening"])
        .arg(format!("dst {to}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_destination_running_out_of_ports_is_shown_before_connects_fail() {
    if !root_or_skip("a_destination_running_out_of_ports_is_shown_before_connects_fail") {
        return;
    }
    let pair = NetPair::new();
    // 50 local ports, no reuse of TIME_WAIT ones: the client, closing first, uses them up.
    sysctl(&pair.a, "net.ipv4.ip_local_port_range", "40000 40049");
    sysctl(&pair.a, "net.ipv4.tcp_tw_reuse", "0");
    let port = 29_000 + (std::process::id() % 1000) as u16;
    let server = SocketAddr::new(pair.b4, port);
    let tracer = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["ports", "--json", "--interval", "300ms", "--duration", "4s"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let (tx, rx) = mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(server).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
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
    // Connects every 20 ms, each closed first by the client, until ports run out.
    let failures = NetPair::run_in(&pair.a, move || {
        let mut failures = 0u64;
        for _ in 0..70 {
            match TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                Ok(c) => drop(c),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{e}");
                    failures += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        failures
    })
    .join()
    .unwrap();
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
