//! Root-only: floods on loopback stay within `--max-sockets`, and what was forgotten or
//! missed is said, in the report and on stderr. Views that read connection records hold no
//! socket in userspace at all; the stream, which follows transitions, holds at most
//! `--max-sockets`.

mod common;

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::root_or_skip;

/// `tcptrace report --json --port PORT --max-sockets CAP`, started and tracing.
fn report(port: u16, cap: usize) -> Child {
    tracer(&["report"], port, cap)
}

/// `tcptrace [ARGS] --json --port PORT --max-sockets CAP`, started and tracing.
fn tracer(args: &[&str], port: u16, cap: usize) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args)
        .args(["--json", "--port", &port.to_string()])
        .args(["--max-sockets", &cap.to_string()])
        // A backstop: a test that panics before stopping it leaves no root tracer behind.
        .args(["--duration", "5m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // What it says before tracing (a host with more connections open than the cap: how
    // many of them were left out) is shown with the test's output.
    common::wait_tracing(&mut child);
    child
}

/// The peak resident memory of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Stops the tracer; returns its report (JSON) and the summary it wrote on stderr.
fn finish(child: Child) -> (serde_json::Value, String) {
    let (out, err) = stop(child);
    (serde_json::from_str(out.trim()).unwrap(), err)
}

/// Stops the tracer; returns what it wrote on stdout and on stderr.
fn stop(mut child: Child) -> (String, String) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{err}");
    (out, err)
}

/// The number in `text` just before `word`.
fn number_before(text: &str, word: &str) -> u64 {
    let i = text
        .find(word)
        .unwrap_or_else(|| panic!("no '{word}' in {text}"));
    text[..i]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before '{word}' in {text}"))
}

fn nonblocking_connect(to: SocketAddr) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_nonblocking(true).unwrap();
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}"),
    }
    s
}

/// A listener that never accepts, with a one-slot queue: once it is full the SYNs are
/// dropped and the connecting sockets stay in SYN_SENT.
fn deaf_listener() -> socket2::Socket {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    l.listen(1).unwrap();
    l
}

const HALF_OPEN: usize = 3_000;

/// Holds `HALF_OPEN` connects to `l` half-open for a while, then closes them all; returns
/// the tracer's peak RSS meanwhile (KiB).
fn half_open_flood(l: socket2::Socket, tracer: &Child) -> u64 {
    let to = l.local_addr().unwrap().as_socket().unwrap();
    let held: Vec<_> = (0..HALF_OPEN).map(|_| nonblocking_connect(to)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let peak = peak_kib(tracer.id());
    drop(held);
    drop(l);
    std::thread::sleep(Duration::from_millis(300));
    peak
}

#[test]
fn a_half_open_flood_is_capped_and_the_evictions_are_reported() {
    if !root_or_skip("a_half_open_flood_is_capped_and_the_evictions_are_reported") {
        return;
    }
    const CAP: usize = 1_000;
    const N: usize = HALF_OPEN;
    // The stream follows transitions: it holds at most CAP sockets.
    let l = deaf_listener();
    let port = l.local_addr().unwrap().as_socket().unwrap().port();
    let stream = tracer(&[], port, CAP);
    let peak_while_held = half_open_flood(l, &stream);
    let (_, said) = stop(stream);
    let evicted = number_before(&said, " sockets evicted");
    // Every socket beyond the cap pushed an older one out (in batches of a sixteenth).
    assert!(
        evicted as usize >= N - CAP && evicted as usize <= N,
        "{evicted} evicted: {said}"
    );
    // 1,000 sockets are a few tens of KiB: the tracer's memory has no reason to move.
    assert!(
        peak_while_held < 64 << 10,
        "peak RSS {peak_while_held} KiB while {N} sockets were half-open"
    );
    // The report reads each connection whole at its end: nothing to hold, nothing evicted,
    // every connection counted with its beginning.
    let l = deaf_listener();
    let port = l.local_addr().unwrap().as_socket().unwrap().port();
    let tracer = report(port, CAP);
    let peak_while_held = half_open_flood(l, &tracer);
    let (report, said) = finish(tracer);
    assert_eq!(number_before(&said, " sockets evicted"), 0, "{said}");
    assert_eq!(report["evicted"], 0, "{report}");
    // (The one or two the queue took end too, on the server side.)
    let connections = report["connections"].as_u64().unwrap();
    let lost = number_before(&said, " lost");
    assert!(lost < N as u64 / 10, "{lost} lost: {said}");
    assert!(
        connections + lost >= N as u64 && connections <= N as u64 + 4,
        "{connections} connections, {lost} lost: {report}"
    );
    let outgoing = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "out")
        .unwrap_or_else(|| panic!("no outgoing row: {report}"));
    assert!(
        outgoing["closed"].as_u64().unwrap() + lost >= N as u64,
        "every connect is known as a client's: {report}"
    );
    assert!(
        peak_while_held < 64 << 10,
        "peak RSS {peak_while_held} KiB while {N} sockets were half-open"
    );
}

#[test]
fn a_syn_flood_to_a_closed_port_is_counted_without_holding_anything() {
    if !root_or_skip("a_syn_flood_to_a_closed_port_is_counted_without_holding_anything") {
        return;
    }
    const N: usize = 2_000;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tracer = report(port, 1_000);
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut refused = 0;
    for _ in 0..N {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let e = s.connect(&to.into()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        refused += 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let (report, said) = finish(tracer);
    // Each refused socket ends at once: nothing accumulates, nothing is evicted.
    assert_eq!(number_before(&said, " sockets evicted"), 0, "{said}");
    // The kernel may skip a run now and then (a softirq nesting on the CPU); it says so.
    let lost = number_before(&said, " lost");
    let rows = report["rows"].as_array().unwrap();
    let refused_out: u64 = rows
        .iter()
        .filter(|r| r["direction"] == "out")
        .map(|r| r["refused"].as_u64().unwrap())
        .sum();
    let refused_in: u64 = rows
        .iter()
        .filter(|r| r["direction"] == "in")
        .map(|r| r["refused"].as_u64().unwrap())
        .sum();
    // Both ends are on this host: the clients were refused, and this host refused them.
    assert!(
        refused_out <= refused && refused_out + lost >= refused,
        "{report}"
    );
    assert!(
        refused_in <= refused && refused_in + lost >= refused,
        "{report}"
    );
    assert!(lost < refused / 10, "{lost} lost: {said}");
}
