//! Root-only: sockets stuck in CLOSE_WAIT (an application that never closes after its peer
//! did), found at start and entered while traced, with sock_diag as the judge.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;

/// Sockets in CLOSE_WAIT on local port `port` in namespace `ns`, as sock_diag lists them.
fn close_wait_per_sock_diag(ns: &str, port: u16) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htan", "state", "close-wait"])
        .arg(format!("sport = :{port}"))
        .output()
        .expect("ss (iproute2) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn an_application_that_never_closes_is_found_with_its_sockets_ages() {
    if !root_or_skip("an_application_that_never_closes_is_found_with_its_sockets_ages") {
        return;
    }
    let pair = NetPair::new();
    let port = 32_000 + (std::process::id() % 1000) as u16;
    let addr = SocketAddr::new(pair.b4, port);
    // A server in namespace b that accepts and never closes (until told).
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(l.accept().unwrap().0);
            accepted_tx.send(()).unwrap();
        }
        done_rx.recv().unwrap();
        drop(held);
    });
    ready_rx.recv().unwrap();
    let client = |pair: &NetPair| {
        NetPair::run_in(&pair.a, move || drop(TcpStream::connect(addr).unwrap()))
            .join()
            .unwrap();
    };
    // One before tracing: its server side sits in CLOSE_WAIT from then on.
    client(&pair);
    accepted_rx.recv().unwrap();
    let mut tracer = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args([
            "stuck",
            "--json",
            "--older-than",
            "1s",
            "--interval",
            "500ms",
        ])
        .args(["--state", "CLOSE_WAIT"])
        .args(["--duration", "2500ms", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_tracing(&mut tracer);
    // One while traced.
    client(&pair);
    accepted_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        close_wait_per_sock_diag(&pair.b, port),
        2,
        "the kernel's list"
    );
    let out = tracer.wait_with_output().unwrap();
    done_tx.send(()).unwrap();
    srv.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    // The last interval lists both, oldest first.
    let last_time = rows.last().unwrap_or_else(|| panic!("no rows: {text}"))["time"].clone();
    let last: Vec<&serde_json::Value> = rows.iter().filter(|r| r["time"] == last_time).collect();
    assert_eq!(last.len(), 2, "{text}");
    for r in &last {
        assert_eq!(
            (r["kind"].as_str(), r["state"].as_str()),
            (Some("stuck"), Some("CLOSE_WAIT"))
        );
        assert_eq!(r["lport"], port, "{r}");
        assert!(r["age_ns"].as_u64().unwrap() >= 1_000_000_000, "{r}");
    }
    assert_eq!(last[0]["age_at_least"], true, "found at start: {text}");
    assert_eq!(
        last[1]["age_at_least"], false,
        "entered while traced: {text}"
    );
    // The one found at start is named by the process holding its socket; the other was
    // accepted from a listener older than the trace, whose owner was told to the kernel
    // side at start.
    for r in &last {
        assert_eq!(r["pid"], std::process::id(), "{text}");
    }
}
