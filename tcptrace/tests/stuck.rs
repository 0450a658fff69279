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
    let sport = format!("sport = :{port}");
    ss(ns, &["-Htan", "state", "close-wait", &sport])
        .lines()
        .count()
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
    let (srv, accepted_rx, done_tx) = holding_server(&pair, addr, 2);
    let client = |pair: &NetPair| connect_and_close(pair, addr);
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

/// A server in namespace b that accepts `n` connections on `addr` and holds them until told;
/// returns its thread, word of each accept, and the sender that lets it close them.
fn holding_server(
    pair: &NetPair,
    addr: SocketAddr,
    n: usize,
) -> (
    std::thread::JoinHandle<()>,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(l.accept().unwrap().0);
            accepted_tx.send(()).unwrap();
        }
        done_rx.recv().unwrap();
        drop(held);
    });
    ready_rx.recv().unwrap();
    (srv, accepted_rx, done_tx)
}

/// A client in namespace a that connects to `addr` and closes at once.
fn connect_and_close(pair: &NetPair, addr: SocketAddr) {
    NetPair::run_in(&pair.a, move || drop(TcpStream::connect(addr).unwrap()))
        .join()
        .unwrap();
}

/// What the kernel side keeps with a socket, read back through sock_diag: the time it
/// entered CLOSE_WAIT is the time of the transition, within the test's own clock readings.
#[test]
fn sock_diag_reads_when_a_socket_entered_its_state_from_its_storage() {
    if !root_or_skip("sock_diag_reads_when_a_socket_entered_its_state_from_its_storage") {
        return;
    }
    let pair = NetPair::new();
    let port = free_port();
    let probe = probe_for_ports(&[port], tcptrace::source::probe::DEFAULT_RING_BYTES);
    let map = probe
        .storage_map()
        .expect("the BTF programs keep socket storage");
    let addr = SocketAddr::new(pair.b4, port);
    let (srv, accepted, done) = holding_server(&pair, addr, 1);
    let before = tcptrace::source::host::monotonic_ns();
    connect_and_close(&pair, addr);
    accepted.recv().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let after = tcptrace::source::host::monotonic_ns();
    let found = NetPair::run_in(&pair.b, move || {
        use std::os::fd::AsFd as _;
        tcptrace::source::diag::stored_sockets(1 << 8, Some(map.as_fd())).unwrap()
    })
    .join()
    .unwrap();
    done.send(()).unwrap();
    srv.join().unwrap();
    let s = found
        .iter()
        .find(|s| s.socket.local.port() == port)
        .unwrap_or_else(|| panic!("the server's socket in CLOSE_WAIT: {found:?}"));
    let st = s.storage.expect("its storage came with it");
    assert_eq!(st.life.last_state, 8, "CLOSE_WAIT: {st:?}");
    assert!(
        (before..=after).contains(&st.life.last_ts),
        "entered between {before} and {after}: {st:?}"
    );
    assert_eq!(
        st.owner.pid,
        std::process::id(),
        "its owner, from its listener"
    );
}

/// serve counts stuck sockets per state and port, with sock_diag as the judge, and drops
/// the series when they leave.
#[test]
fn serve_exports_stuck_sockets_until_they_leave() {
    if !root_or_skip("serve_exports_stuck_sockets_until_they_leave") {
        return;
    }
    let pair = NetPair::new();
    let port = free_port();
    let addr = SocketAddr::new(pair.b4, port);
    let (srv, accepted, done) = holding_server(&pair, addr, 2);
    // One before serve starts (its age is a lower bound), one after (its age is exact).
    connect_and_close(&pair, addr);
    accepted.recv().unwrap();
    let p = port.to_string();
    // Scans at start and 3 s later. The second connection enters CLOSE_WAIT after the first
    // scan: by the second it is 2 s old only as its socket's storage tells (the first scan
    // that found it would make it 0 s old).
    let (mut serve, at) = start_serve(&[
        "--port",
        &p,
        "--label-port",
        &p,
        "--stuck-older-than",
        "2s",
        "--stuck-interval",
        "3s",
    ]);
    std::thread::sleep(Duration::from_millis(800));
    connect_and_close(&pair, addr);
    accepted.recv().unwrap();
    std::thread::sleep(Duration::from_millis(3700));
    let held = scrape(&at);
    let kernel = close_wait_per_sock_diag(&pair.b, port);
    done.send(()).unwrap();
    srv.join().unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let gone = scrape(&at);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let _ = serve.wait();
    assert_eq!(kernel, 2, "the kernel's list");
    let series = format!("tcptrace_stuck_sockets{{state=\"CLOSE_WAIT\",port=\"{port}\"}}");
    assert_eq!(sample(&held, &series), Some(2.0), "{held}");
    let oldest = sample(&held, "tcptrace_stuck_oldest_seconds{state=\"CLOSE_WAIT\"}");
    assert!(oldest.is_some_and(|s| s >= 2.0), "{held}");
    assert_eq!(
        sample(&gone, &series),
        None,
        "closed: no longer stuck: {gone}"
    );
}
