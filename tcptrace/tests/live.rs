//! Root-only tests that load the real eBPF program and trace real sockets: on loopback and
//! across two network namespaces joined by a veth pair (IPv4 and IPv6).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use common::*;
use tcptrace::{
    model::event::{Event, State, decode},
    source::{
        host::monotonic_ns,
        probe::{DEFAULT_RING_BYTES, Probe},
    },
};

/// In a forked child (another process, so attribution can be told apart): connect to
/// 127.0.0.1:port, send a byte, wait for the reply, close first. Returns the child's pid.
fn forked_client(port: u16) -> libc::pid_t {
    // SAFETY: the child only makes async-signal-safe system calls, then _exit()s.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid > 0 {
            return pid;
        }
        let fd = raw_connect_loopback(port);
        let ok = fd >= 0;
        let mut b = [b'x'];
        let ok = ok
            && libc::write(fd, b.as_ptr().cast(), 1) == 1
            && libc::read(fd, b.as_mut_ptr().cast(), 1) == 1;
        libc::close(fd);
        libc::_exit(if ok { 0 } else { 1 });
    }
}

#[test]
fn loopback_client_close_exact_transitions_filters_and_owners() {
    if !root_or_skip("loopback_client_close_exact_transitions_filters_and_owners") {
        return;
    }
    loopback_client_close(probe_for_ports);
}

/// The same through the classic tracepoint programs: what a kernel without BTF gets.
#[test]
fn loopback_client_close_through_the_portable_paths() {
    if !root_or_skip("loopback_client_close_through_the_portable_paths") {
        return;
    }
    loopback_client_close(portable_probe_for_ports);
}

/// Held while a test forks, and while a test checks who closed its accepted sockets: a
/// child forked by one test inherits the other's sockets, and whichever process drops a
/// socket's last reference runs its close, which names the owner of an accepted socket.
static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn loopback_client_close(probe_for_ports: fn(&[u16], u32) -> Probe) {
    let _alone = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let (port, other) = (free_port(), free_port());
    let mut probe = probe_for_ports(&[port], DEFAULT_RING_BYTES);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    // Traffic on a port outside the filter must not produce a single event.
    let unwatched = TcpListener::bind(("127.0.0.1", other)).unwrap();
    drop(TcpStream::connect(("127.0.0.1", other)).unwrap());
    drop(unwatched.accept().unwrap());
    drop(unwatched);

    let child = forked_client(port);
    let (mut conn, peer) = listener.accept().unwrap();
    let mut b = [0u8; 1];
    conn.read_exact(&mut b).unwrap();
    conn.write_all(b"y").unwrap();
    assert_eq!(conn.read(&mut b).unwrap(), 0, "the client closes first");
    // Reap the child before closing the listener: it inherited the listener's descriptor,
    // and whichever process drops the last reference is the one that closes it (the owner
    // stays the process that listened; `closed_last_by_a_child` checks that).
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "client failed"
    );
    drop(conn);
    drop(listener);

    let ts = collect(&mut probe, Duration::from_secs(3), |ts| ts.len() >= 12);
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        ts.iter()
            .all(|t| t.local.port() == port || t.remote.port() == port),
        "only the filtered port is reported: {ts:#?}"
    );
    let client_sk =
        socket_with(&ts, State::SynSent, State::Established, peer).expect("client socket");
    let server_sk = socket_with(&ts, State::Listen, State::SynRecv, server).expect("server socket");
    let listen_sk = socket_with(&ts, State::Close, State::Listen, server).expect("listener");
    assert_eq!(path(&ts, client_sk), ACTIVE_CLIENT, "{ts:#?}");
    assert_eq!(path(&ts, server_sk), PASSIVE_SERVER, "{ts:#?}");
    assert_eq!(
        path(&ts, listen_sk),
        [(State::Close, State::Listen), (State::Listen, State::Close)]
    );
    assert_eq!(ts.len(), 12, "nothing else: {ts:#?}");

    // Attribution: every client event names the client process — also FIN_WAIT2→TIME_WAIT,
    // which runs in the server's context on loopback — and no server event names it.
    let me = std::process::id();
    for t in &ts {
        let owner = t.owner.unwrap_or_else(|| panic!("owner known for {t:?}"));
        let expected = if t.skaddr == client_sk {
            child as u32
        } else {
            me
        };
        assert_eq!(owner.pid, expected, "{t:?}");
        // Every socket's first event has no duration; each later one does.
        let first = ts.iter().find(|u| u.skaddr == t.skaddr).unwrap();
        assert_eq!(t.in_from_ns.is_none(), std::ptr::eq(first, t), "{t:?}");
    }
    let accepted = ts.iter().find(|t| t.skaddr == server_sk).unwrap();
    assert!(accepted.owner.unwrap().from_listener, "{accepted:?}");
}

/// How long the forked child below keeps the descriptors it inherited.
const CHILD_HOLDS_NS: u64 = 400_000_000;

#[test]
fn a_child_that_closes_an_inherited_socket_last_does_not_own_it() {
    if !root_or_skip("a_child_that_closes_an_inherited_socket_last_does_not_own_it") {
        return;
    }
    closed_last_by_a_child(probe_for_ports);
}

#[test]
fn a_child_that_closes_an_inherited_socket_last_does_not_own_it_through_the_portable_paths() {
    if !root_or_skip(
        "a_child_that_closes_an_inherited_socket_last_does_not_own_it_through_the_portable_paths",
    ) {
        return;
    }
    closed_last_by_a_child(portable_probe_for_ports);
}

/// The test's client and listener close first here, but a child forked meanwhile still
/// holds both, so the kernel runs their `close()` in the child as it exits — as a child that
/// execs does for `O_CLOEXEC` descriptors. Every event still names the test's process, the
/// first to drive a transition of each socket.
fn closed_last_by_a_child(probe_for_ports: fn(&[u16], u32) -> Probe) {
    let _alone = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let mut probe = probe_for_ports(&[port], DEFAULT_RING_BYTES);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let peer = client.local_addr().unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    // Before the fork: the child's exit, whatever the scheduler does, is later by its hold.
    let forked_at = monotonic_ns();
    // SAFETY: the child only sleeps and _exit()s (async-signal-safe).
    let child = unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let hold = libc::timespec {
                tv_sec: 0,
                tv_nsec: CHILD_HOLDS_NS as libc::c_long,
            };
            libc::nanosleep(&hold, std::ptr::null_mut());
            libc::_exit(0);
        }
        pid
    };
    drop(client);
    drop(listener);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let mut b = [0u8; 1];
    assert_eq!(conn.read(&mut b).unwrap(), 0, "the client closed first");
    drop(conn);

    let ts = collect(&mut probe, Duration::from_secs(3), |ts| ts.len() >= 12);
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let client_sk = socket_with(&ts, State::SynSent, State::Established, peer).expect("client");
    let listen_sk = socket_with(&ts, State::Close, State::Listen, server).expect("listener");
    assert_eq!(path(&ts, client_sk), ACTIVE_CLIENT, "{ts:#?}");
    // The child really ran both closes: not before it had held them.
    for (sk, from, to) in [
        (client_sk, State::Established, State::FinWait1),
        (listen_sk, State::Listen, State::Close),
    ] {
        let close = ts
            .iter()
            .find(|t| t.skaddr == sk && t.from == from && t.to == to)
            .unwrap_or_else(|| panic!("{from:?}->{to:?} in {ts:#?}"));
        assert!(
            close.ts_ns >= forked_at + CHILD_HOLDS_NS / 2,
            "closed by the child after it held the socket: {close:?}, forked at {forked_at}"
        );
    }
    assert_eq!(ts.len(), 12, "nothing else: {ts:#?}");
    let me = std::process::id();
    for t in &ts {
        assert_eq!(t.owner.map(|o| o.pid), Some(me), "{t:?}");
    }
}

/// One connection across the veth pair: client in namespace a, server in namespace b.
fn veth_connection(
    pair: &NetPair,
    v6: bool,
    server_closes: bool,
    port: u16,
) -> (SocketAddr, SocketAddr) {
    let (caddr, saddr) = if v6 {
        (pair.a6, pair.b6)
    } else {
        (pair.a4, pair.b4)
    };
    let server = SocketAddr::new(saddr, port);
    let (tx, rx) = mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(server).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        c.write_all(b"y").unwrap();
        if !server_closes {
            assert_eq!(c.read(&mut b).unwrap(), 0, "the client closes first");
        }
        drop(c);
        drop(l);
    });
    rx.recv().unwrap();
    let cli = NetPair::run_in(&pair.a, move || {
        let mut c = TcpStream::connect(server).unwrap();
        let local = c.local_addr().unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        if server_closes {
            assert_eq!(c.read(&mut b).unwrap(), 0, "the server closes first");
        }
        drop(c);
        local
    });
    let client = cli.join().unwrap();
    srv.join().unwrap();
    let _ = caddr;
    (client, server)
}

#[test]
fn veth_namespaces_ipv4_and_ipv6_client_and_server_close() {
    if !root_or_skip("veth_namespaces_ipv4_and_ipv6_client_and_server_close") {
        return;
    }
    veth_both_families(probe_for_ports, 0);
}

/// The same through the classic tracepoint programs: the BTF programs read each socket's
/// IPv4 and IPv6 addresses and ports where the records of these hold them, and must agree.
#[test]
fn veth_namespaces_through_the_classic_tracepoints() {
    if !root_or_skip("veth_namespaces_through_the_classic_tracepoints") {
        return;
    }
    veth_both_families(portable_probe_for_ports, 500);
}

/// `shift` keeps two such tests running at once off each other's ports.
fn veth_both_families(probe_for_ports: fn(&[u16], u32) -> Probe, shift: u16) {
    let _alone = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let pair = NetPair::new();
    let port = 18_000 + shift + (std::process::id() % 500) as u16;
    let mut probe = probe_for_ports(&[port], DEFAULT_RING_BYTES);
    for v6 in [false, true] {
        for server_closes in [false, true] {
            let (client, server) = veth_connection(&pair, v6, server_closes, port);
            let ts = collect(&mut probe, Duration::from_secs(3), |ts| ts.len() >= 12);
            let what = format!("v6={v6} server_closes={server_closes}: {ts:#?}");
            assert!(
                ts.iter().all(|t| t.local.ip() != IpAddr::from([0, 0, 0, 0])
                    || t.to == State::Listen
                    || t.from == State::Listen),
                "{what}"
            );
            let c = socket_with(&ts, State::SynSent, State::Established, client).expect(&what);
            let s = socket_with(&ts, State::Listen, State::SynRecv, server).expect(&what);
            let (cp, sp) = if server_closes {
                (PASSIVE_CLIENT, ACTIVE_SERVER)
            } else {
                (ACTIVE_CLIENT, PASSIVE_SERVER)
            };
            assert_eq!(path(&ts, c), cp, "{what}");
            assert_eq!(path(&ts, s), sp, "{what}");
            assert_eq!(ts.len(), 12, "{what}");
            assert!(
                ts.iter().all(|t| t.family() == if v6 { 6 } else { 4 }),
                "{what}"
            );
            // The connect and the close are the application's system calls: named even though
            // the peer's packets are handled in softirq on another namespace's stack.
            let me = std::process::id();
            for (from, to) in [
                (State::Close, State::SynSent),
                (State::Established, State::FinWait1),
                (State::CloseWait, State::LastAck),
            ] {
                for t in ts.iter().filter(|t| t.from == from && t.to == to) {
                    assert_eq!(t.owner.map(|o| o.pid), Some(me), "{t:?}");
                }
            }
        }
    }
}

#[test]
fn a_tiny_ring_buffer_reports_every_lost_event() {
    if !root_or_skip("a_tiny_ring_buffer_reports_every_lost_event") {
        return;
    }
    const CONNS: usize = 50;
    let port = free_port();
    // 4 KiB holds about 39 events; the burst makes 502 and nothing drains meanwhile.
    // Without the timewait timers, so the count of events to expect is exact.
    let mut probe = probe_with(&[port], 4096, false);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    client_closes_first(&listener, port, CONNS);
    drop(listener);
    let expected = 2 + 10 * CONNS as u64;
    let (mut delivered, mut lost) = (0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while delivered + lost < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let mut raw = Vec::new();
        probe.drain(&mut raw);
        for r in &raw {
            match decode(r).unwrap() {
                Event::Transition(_) => delivered += 1,
                Event::Lost { count, .. } => lost += count,
                Event::Reset(r) => panic!("no reset in an orderly burst: {r:?}"),
                Event::Timer(t) => panic!("timers are not traced here: {t:?}"),
                // Written with each end transition, in its entry: not an event of its own.
                Event::Details(_) => {}
                e @ (Event::Connection(_) | Event::Part(_)) => {
                    panic!("connection records were not asked for: {e:?}")
                }
            }
        }
    }
    assert!(lost > 0, "a 4 KiB ring cannot hold {expected} events");
    assert!(delivered > 0);
    assert_eq!(
        delivered + lost,
        expected,
        "delivered {delivered} + lost {lost}"
    );
    assert_eq!(probe.lost_total(), lost);
}

#[test]
fn record_then_replay_gives_identical_json() {
    if !root_or_skip("record_then_replay_gives_identical_json") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcptrace-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rec = dir.join("trace.tcptrace");
    let port = free_port();
    let bin = env!("CARGO_BIN_EXE_tcptrace");
    let tracer = start_tracer(&[
        "--json",
        "--port",
        &port.to_string(),
        "--record",
        rec.to_str().unwrap(),
    ]);

    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    client_closes_first(&listener, port, 3);
    drop(listener);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let live = tracer.wait_with_output().unwrap();
    assert!(
        live.status.success(),
        "SIGINT ends the run cleanly: {:?}",
        live.status
    );
    let live = String::from_utf8(live.stdout).unwrap();
    let records: Vec<serde_json::Value> = live
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kind = |k: &str| {
        records
            .iter()
            .filter(|v| v["kind"] == k)
            .collect::<Vec<_>>()
    };
    assert_eq!(kind("transition").len(), 2 + 3 * 10, "{live}");
    let closes = kind("close");
    assert_eq!(closes.len(), 6, "{live}");
    for c in closes {
        let client = c["role"] == "client";
        assert_eq!(
            c["initiator"],
            if client { "local" } else { "remote" },
            "{c}"
        );
        assert_eq!(c["how"], "fin", "{c}");
        assert_eq!(c["timewait"], client, "{c}");
    }
    assert_eq!(records.len(), 32 + 6, "nothing else: {live}");

    let replay = Command::new(bin)
        .args(["--json", "--from"])
        .arg(&rec)
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(String::from_utf8(replay.stdout).unwrap(), live);
    // The same filters apply on replay: only the entries into TIME_WAIT.
    let tw = Command::new(bin)
        .args(["--json", "--state", "TIME_WAIT", "--from"])
        .arg(&rec)
        .output()
        .unwrap();
    let tw = String::from_utf8(tw.stdout).unwrap();
    assert_eq!(tw.lines().count(), 3, "{tw}");
    assert!(
        tw.lines()
            .all(|l| l.contains(r#""from":"FIN_WAIT2","to":"TIME_WAIT""#)),
        "{tw}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the binary as `nobody` with the given capabilities (inheritable and ambient).
fn as_nobody(caps: &str, args: &[&str]) -> std::process::Output {
    // A copy outside the build tree, which `nobody` may not be able to traverse; one per
    // call (tests run in parallel: copying over a binary another runs fails, ETXTBSY).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tcptrace-caps-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("tcptrace");
    std::fs::copy(env!("CARGO_BIN_EXE_tcptrace"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(&bin)
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn runs_with_capabilities_instead_of_root() {
    if !root_or_skip("runs_with_capabilities_instead_of_root") {
        return;
    }
    let all = "+bpf,+perfmon,+dac_read_search,+syslog";
    let out = as_nobody(all, &["--duration", "300ms", "--port", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Tracing TCP state transitions"), "{err}");
    assert!(
        !err.contains("not traced"),
        "every feature works with these: {err}"
    );

    // The BTF programs need neither tracefs nor anything but these two; without
    // CAP_SYSLOG the timewait timers' handler cannot be found, and tcptrace says so.
    let out = as_nobody("+bpf,+perfmon", &["--duration", "300ms", "--port", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("TIME_WAIT exits are not traced"), "{err}");
    assert!(err.contains("CAP_SYSLOG"), "names what is missing: {err}");
    assert!(!err.contains("classic"), "the BTF programs load: {err}");

    let out = as_nobody("+bpf", &["--duration", "300ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CAP_PERFMON"), "names what is missing: {err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = as_nobody("-all", &["--duration", "300ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("try `sudo tcptrace"), "{err}");
}

#[test]
fn check_reports_every_requirement() {
    if !root_or_skip("check_reports_every_requirement") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().filter(|l| l.starts_with('✓')).count() >= 8,
        "{text}"
    );
    assert!(text.contains("load and attach"), "{text}");
    assert!(
        text.contains("✓ sockets that exist at start") && text.contains("network namespaces ("),
        "root reads every namespace's sockets: {text}"
    );
    assert!(
        text.contains("(BTF tracepoints, per-socket state in socket-local storage"),
        "names the kernel side it loads: {text}"
    );

    // The BTF programs need no tracefs: CAP_BPF and CAP_PERFMON are enough to run.
    let out = as_nobody("+bpf,+perfmon", &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("✓ load and attach"), "{text}");
    assert!(text.contains("only kernels without BTF need it"), "{text}");
    if crate::common::other_network_namespaces() {
        assert!(
            text.contains("! sockets that exist at start") && text.contains("CAP_SYS_ADMIN"),
            "without CAP_SYS_ADMIN other namespaces cannot be read, and check says so: {text}"
        );
    }

    let out = as_nobody("-all", &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✗ privileges"), "{text}");
    assert!(text.contains("sudo tcptrace"), "a hint: {text}");
}
