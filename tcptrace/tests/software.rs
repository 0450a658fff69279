//! Root-only: real servers and clients — Debian's nginx, redis-server, ab, curl,
//! redis-benchmark (installed by `cargo xtask setup`) — between two network namespaces, traced
//! by the tcptrace binary as a user runs it, with the kernel's sock_diag as the judge of who
//! holds TIME_WAIT and of when each TIME_WAIT socket ends.
//!
//! The workload covers a server that closes first (HTTP/1.0), clients that close first
//! (keep-alive ab, curl), an idle keep-alive connection that nginx times out, a server that
//! closes while its client still sends (redis in protected mode answers `-DENIED` and
//! closes), redis-benchmark, refused connects, half-closes, and a connection opened before
//! tracing began.

mod common;

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use common::*;

/// A server process, killed when dropped (also when the test fails).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether every program of the suite runs; fails under CI=true (setup installs them).
fn software_or_skip(test: &str) -> bool {
    let missing: Vec<&str> = [
        ("nginx", "-v"),
        ("redis-server", "--version"),
        ("redis-benchmark", "--version"),
        ("ab", "-V"),
        ("curl", "--version"),
    ]
    .into_iter()
    .filter(|(p, arg)| {
        !Command::new(p)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .map(|(p, _)| p)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs {missing:?}, and CI=true: `cargo xtask setup` installs them");
    }
    eprintln!("SKIPPED {test}: {missing:?} missing; `cargo xtask setup` installs them");
    false
}

/// `ip netns exec NS PROGRAM ARGS…`, waited for; its output.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `program` in namespace `ns` and waits until something listens on `port` there.
fn daemon(ns: &str, port: u16, program: &str, args: &[&str]) -> Daemon {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    while Instant::now() < deadline {
        if !ss(ns, &["-Htln", &filter]).is_empty() {
            return d;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{program} did not listen on :{port} in {ns}");
}

/// nginx in namespace `ns` on `addr`, closing idle keep-alive connections after 1 s.
fn nginx(ns: &str, dir: &Path, addr: SocketAddr) -> Daemon {
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 1s;\n  \
             server {{\n    listen {addr};\n    location / {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let (prefix, conf) = (d.to_string(), conf.display().to_string());
    daemon(ns, addr.port(), "nginx", &["-p", &prefix, "-c", &conf])
}

/// redis-server in namespace `ns` on `port`: in protected mode (no bind, no password: it
/// answers clients from other hosts `-DENIED` and closes), or bound to `bind`.
fn redis(ns: &str, dir: &Path, port: u16, bind: Option<IpAddr>) -> Daemon {
    let (p, dir) = (port.to_string(), dir.display().to_string());
    let mut args = vec![
        "--port",
        &p,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir,
    ];
    let b = bind.map(|b| b.to_string());
    match &b {
        Some(b) => args.extend(["--bind", b, "--protected-mode", "no"]),
        None => args.extend(["--protected-mode", "yes"]),
    }
    daemon(ns, port, "redis-server", &args)
}

/// One HTTP/1.1 request on `c`, its response read (nginx answers `hello`).
fn get(c: &mut TcpStream) {
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.ends_with(b"hello\n") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "nginx answered");
        got.extend_from_slice(&b[..n]);
    }
}

/// The TIME_WAIT sockets of namespace `ns` on `ports` (either end), as sock_diag lists
/// them: (local, remote).
fn time_wait(ns: &str, ports: &[u16]) -> HashSet<(SocketAddr, SocketAddr)> {
    ss(ns, &["-Htan", "state", "time-wait"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            let ours = |a: &SocketAddr| ports.contains(&a.port());
            (ours(&local) || ours(&remote)).then_some((local, remote))
        })
        .collect()
}

/// A record's endpoints: (local, remote).
fn ends(r: &serde_json::Value) -> (SocketAddr, SocketAddr) {
    let at = |a: &str, p: &str| -> SocketAddr {
        let ip: IpAddr = r[a].as_str().unwrap().parse().unwrap();
        SocketAddr::new(ip, r[p].as_u64().unwrap() as u16)
    };
    (at("laddr", "lport"), at("raddr", "rport"))
}

/// A record's `time`, as wall-clock time.
fn wall(r: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap()
}

/// The ports the workload uses.
struct Ports {
    http: u16,
    denied: u16,
    redis: u16,
    refused: u16,
    half: u16,
}

impl Ports {
    /// Ports of this binary's own, from 61_000 up, spread by process id: it runs beside the
    /// other test binaries (xtask's `WAITING_TESTS`), whose probes follow a port in every
    /// namespace; none of them uses these, and no ephemeral port (up to 60_999 by default)
    /// reaches them. Its servers run in the test's own namespace, where every port is free.
    fn own() -> Ports {
        let base = 61_000 + (std::process::id() % 800) as u16 * 5;
        Ports {
            http: base,
            denied: base + 1,
            redis: base + 2,
            refused: base + 3,
            half: base + 4,
        }
    }

    fn all(&self) -> Vec<u16> {
        vec![self.http, self.denied, self.redis, self.refused, self.half]
    }
}

/// The workload, from namespace a against namespace b; `old` is the connection opened
/// before tracing began, closed here by its client.
fn workload(pair: &NetPair, p: &Ports, old: TcpStream) {
    let b = pair.b4;
    let url = format!("http://{b}:{}/", p.http);
    let run = |program: &str, args: &[&str]| {
        in_ns(&pair.a, program, args);
    };
    drop(old);
    // HTTP/1.0 without keep-alive: nginx closes first.
    run("ab", &["-q", "-n", "20", "-c", "4", &url]);
    // With keep-alive: ab closes its connections at the end.
    run("ab", &["-q", "-k", "-n", "20", "-c", "4", &url]);
    for _ in 0..3 {
        run("curl", &["-s", "-o", "/dev/null", &url]);
    }
    let http = SocketAddr::new(b, p.http);
    let (denied, half) = (SocketAddr::new(b, p.denied), SocketAddr::new(b, p.half));
    let refused = SocketAddr::new(b, p.refused);
    NetPair::run_in(&pair.a, move || {
        // An idle keep-alive connection: nginx times it out after 1 s.
        let mut c = TcpStream::connect(http).unwrap();
        get(&mut c);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        // Redis in protected mode answers -DENIED and closes; the client sends again.
        for _ in 0..3 {
            let mut c = TcpStream::connect(denied).unwrap();
            c.write_all(b"PING\r\n").unwrap();
            let mut b = [0u8; 256];
            let n = c.read(&mut b).unwrap();
            assert!(
                b[..n].starts_with(b"-DENIED"),
                "{:?}",
                String::from_utf8_lossy(&b[..n])
            );
            std::thread::sleep(Duration::from_millis(50));
            let _ = c.write_all(b"PING\r\n");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Nothing listens: refused.
        for _ in 0..2 {
            let e = TcpStream::connect(refused).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        // Half-closes: the client is done sending, then reads the answer.
        for _ in 0..3 {
            let mut c = TcpStream::connect(half).unwrap();
            c.write_all(b"question").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).unwrap();
            assert_eq!(answer, b"answer");
        }
    })
    .join()
    .unwrap();
    let r = p.redis.to_string();
    let host = b.to_string();
    run(
        "redis-benchmark",
        &[
            "-h", &host, "-p", &r, "-n", "200", "-c", "4", "-t", "ping", "-q",
        ],
    );
}

/// A server in namespace b that answers each half-closed question, then closes.
fn half_close_server(pair: &NetPair, addr: SocketAddr, n: usize) -> std::thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for _ in 0..n {
            let (mut c, _) = l.accept().unwrap();
            let mut q = Vec::new();
            c.read_to_end(&mut q).unwrap();
            c.write_all(b"answer").unwrap();
        }
    });
    rx.recv().unwrap();
    h
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn real_servers_and_clients_agree_with_sock_diag() {
    let test = "real_servers_and_clients_agree_with_sock_diag";
    if !root_or_skip(test) || !software_or_skip(test) {
        return;
    }
    let pair = NetPair::new();
    let dir = TempDir(std::env::temp_dir().join(format!("tcptrace-sw-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let p = Ports::own();
    let http = SocketAddr::new(pair.b4, p.http);
    let _nginx = nginx(&pair.b, &dir.0, http);
    let _denied = redis(&pair.b, &dir.0, p.denied, None);
    let _redis = redis(&pair.b, &dir.0, p.redis, Some(pair.b4));
    let half = half_close_server(&pair, SocketAddr::new(pair.b4, p.half), 3);
    // Opened before tracing began, closed by its client during it (with redis, which never
    // ends an idle client: nginx would end it after its 1 s keep-alive timeout, before the
    // tracer began if starting it took that long).
    let redis_addr = SocketAddr::new(pair.b4, p.redis);
    let old = NetPair::run_in(&pair.a, move || {
        let mut c = TcpStream::connect(redis_addr).unwrap();
        c.write_all(b"PING\r\n").unwrap();
        c
    })
    .join()
    .unwrap();
    let ports = p.all();
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // The test's two namespaces only: other tests' namespaces may use the same port numbers.
    let namespaces = format!("{},{}", pair.a, pair.b);
    let tracer = LoggedTracer::start(&[
        "--json",
        "--port",
        &list,
        "--netns",
        &namespaces,
        "--duration",
        "5m",
    ]);
    let old_local = old.local_addr().unwrap();
    workload(&pair, &p, old);
    half.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (ns_a, ns_b) = (netns_inode(&pair.a), netns_inode(&pair.b));
    // Who holds TIME_WAIT, per the kernel; then when each one ends.
    let held: HashMap<u32, HashSet<(SocketAddr, SocketAddr)>> = [
        (ns_a, time_wait(&pair.a, &ports)),
        (ns_b, time_wait(&pair.b, &ports)),
    ]
    .into();
    // For each, when sock_diag last listed it (the start of that query) and when it first
    // did not (the end of that query): the kernel dropped it in between. Under load (the
    // other suites run meanwhile) a query may take long; the bracket says by how much.
    let mut gone: HashMap<(u32, SocketAddr, SocketAddr), (SystemTime, SystemTime)> = HashMap::new();
    let mut listed: HashMap<(u32, SocketAddr, SocketAddr), SystemTime> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(75);
    let total: usize = held.values().map(HashSet::len).sum();
    while gone.len() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        for (ns, name) in [(ns_a, &pair.a), (ns_b, &pair.b)] {
            let asked = SystemTime::now();
            let now = time_wait(name, &ports);
            let answered = SystemTime::now();
            for &(l, r) in &held[&ns] {
                let key = (ns, l, r);
                if now.contains(&(l, r)) {
                    listed.insert(key, asked);
                } else {
                    let last = listed.get(&key).copied().unwrap_or(asked);
                    gone.entry(key).or_insert((last, answered));
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let records = tracer.stop();
    check(&records, &held, &gone, (ns_a, ns_b), old_local);
}

/// The checks, each against what the kernel said.
fn check(
    records: &[serde_json::Value],
    held: &HashMap<u32, HashSet<(SocketAddr, SocketAddr)>>,
    gone: &HashMap<(u32, SocketAddr, SocketAddr), (SystemTime, SystemTime)>,
    (ns_a, ns_b): (u32, u32),
    old_local: SocketAddr,
) {
    let closes: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "close").collect();
    let exits: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["kind"] == "timewait").collect();
    // Not vacuous: both a server and its clients held TIME_WAIT.
    assert!(
        held[&ns_a].len() >= 10 && held[&ns_b].len() >= 10,
        "clients held {}, servers {}",
        held[&ns_a].len(),
        held[&ns_b].len()
    );
    closes_agree_with_sock_diag(records, &closes, held);
    one_close_on_each_side(&closes, held, (ns_a, ns_b));
    exits_when_sock_diag_lost_them(&exits, held, gone);
    let lost = summarise(records, &closes, held, gone.len(), (ns_a, ns_b));
    // The connection opened before tracing: its roles, from the backfill.
    let old: Vec<_> = closes
        .iter()
        .filter(|c| ends(c).0 == old_local || ends(c).1 == old_local)
        .collect();
    assert_eq!(old.len(), 2, "{old:?} ({lost} events lost)");
    for c in old {
        let want = if ns(c) == ns_a { "client" } else { "server" };
        assert_eq!(c["role"], want, "{c}");
    }
}

/// A record's network namespace.
fn ns(r: &serde_json::Value) -> u32 {
    r["netns"].as_u64().unwrap() as u32
}

/// Every close agrees with sock_diag on whether its side holds TIME_WAIT.
fn closes_agree_with_sock_diag(
    records: &[serde_json::Value],
    closes: &[&serde_json::Value],
    held: &HashMap<u32, HashSet<(SocketAddr, SocketAddr)>>,
) {
    for c in closes {
        let (l, r) = ends(c);
        let in_tw = held[&ns(c)].contains(&(l, r));
        // On failure, everything tcptrace said of the connection.
        let story: Vec<&serde_json::Value> = records
            .iter()
            .filter(|x| {
                let p = |f: &str| x[f].as_u64().unwrap_or(0) as u16;
                [(p("lport"), p("rport")), (p("rport"), p("lport"))].contains(&(l.port(), r.port()))
            })
            .collect();
        assert_eq!(
            c["timewait"].as_bool(),
            Some(in_tw),
            "sock_diag {} TIME_WAIT for {c}: {story:#?}",
            if in_tw { "shows" } else { "shows no" }
        );
    }
}

/// Every connection that left a TIME_WAIT socket has exactly one close on each side.
fn one_close_on_each_side(
    closes: &[&serde_json::Value],
    held: &HashMap<u32, HashSet<(SocketAddr, SocketAddr)>>,
    (ns_a, ns_b): (u32, u32),
) {
    for (&holder, tws) in held {
        let peer = if holder == ns_a { ns_b } else { ns_a };
        for &(l, r) in tws {
            let count = |n: u32, l: SocketAddr, r: SocketAddr| {
                closes
                    .iter()
                    .filter(|c| ns(c) == n && ends(c) == (l, r))
                    .count()
            };
            assert_eq!(count(holder, l, r), 1, "the holder's close of {l} → {r}");
            assert_eq!(count(peer, r, l), 1, "the peer's close of {r} → {l}");
        }
    }
}

/// Every 2MSL exit within 0.5 s of when sock_diag lost the socket, and every TIME_WAIT
/// socket gone.
fn exits_when_sock_diag_lost_them(
    exits: &[&serde_json::Value],
    held: &HashMap<u32, HashSet<(SocketAddr, SocketAddr)>>,
    gone: &HashMap<(u32, SocketAddr, SocketAddr), (SystemTime, SystemTime)>,
) {
    for (&(n, l, r), &(listed, lost)) in gone {
        let x = exits
            .iter()
            .find(|x| ns(x) == n && ends(x) == (l, r))
            .unwrap_or_else(|| panic!("no timewait record for {l} → {r}"));
        assert_eq!(x["end"], "expired", "{x}");
        let at = wall(x);
        let half = Duration::from_millis(500);
        assert!(
            at + half >= listed && at <= lost + half,
            "{x}: more than 0.5 s outside [{listed:?}, {lost:?}], when sock_diag lost it"
        );
    }
    let total: usize = held.values().map(HashSet::len).sum();
    assert_eq!(
        gone.len(),
        total,
        "every TIME_WAIT socket ended within 75 s"
    );
}

/// Prints how the closes went, by role, port and verdict; returns the events lost.
fn summarise(
    records: &[serde_json::Value],
    closes: &[&serde_json::Value],
    held: &HashMap<u32, HashSet<(SocketAddr, SocketAddr)>>,
    exits_checked: usize,
    (ns_a, ns_b): (u32, u32),
) -> u64 {
    let mut how: HashMap<String, usize> = HashMap::new();
    for c in closes {
        let port = |f: &str| c[f].as_u64().unwrap_or(0);
        let service = if c["role"] == "server" {
            port("lport")
        } else {
            port("rport")
        };
        let k = format!(
            "{} :{} {}/{}{}",
            c["role"].as_str().unwrap_or("?"),
            service,
            c["initiator"].as_str().unwrap_or("?"),
            c["how"].as_str().unwrap_or("?"),
            if c["timewait"] == true { " TW" } else { "" }
        );
        *how.entry(k).or_default() += 1;
    }
    let lost: u64 = records
        .iter()
        .filter(|r| r["kind"] == "lost")
        .filter_map(|r| r["count"].as_u64())
        .sum();
    eprintln!(
        "{} closes; TIME_WAIT held by clients {}, servers {}; {} exits checked; {lost} events \
         lost: {how:#?}",
        closes.len(),
        held[&ns_a].len(),
        held[&ns_b].len(),
        exits_checked
    );
    lost
}
