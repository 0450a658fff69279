//! Shared helpers for the root-only integration tests.
#![allow(dead_code)]

use std::{
    fs::File,
    io::Write as _,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tcptrace::{
    analysis::{closes::Close, pipeline::Pipeline},
    model::{
        event::{Event, RawEvent, State, Transition, decode},
        filter::Filter,
    },
    source::probe::{KernelSide, Paths, Probe, ProbeConfig},
};

/// True when the test may run. Without root: under CI=true the test fails loudly; elsewhere
/// it says so on the real stderr (not captured by the test harness) and is skipped.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test} needs root to load the eBPF program, and CI=true: failing instead of skipping"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root to load the eBPF program (run `sudo -E cargo xtask test`)"
    );
    false
}

/// A free loopback port (bound and released; the tests use distinct ones).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP socket connected to 127.0.0.1:`port` with raw system calls only, so that a forked
/// child may call it (async-signal-safe); -1 when the connect failed (the socket is closed).
///
/// # Safety
/// Plain system calls on a descriptor it owns; safe in a forked child of a threaded process.
pub unsafe fn raw_connect_loopback(port: u16) -> libc::c_int {
    // SAFETY: see above.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return -1;
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let ok = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) == 0;
        if !ok {
            libc::close(fd);
            return -1;
        }
        fd
    }
}

/// Starts a probe that only reports the given ports.
pub fn probe_for_ports(ports: &[u16], ring_bytes: u32) -> Probe {
    probe_with(ports, ring_bytes, true)
}

/// The same, choosing whether timewait timers are traced.
pub fn probe_with(ports: &[u16], ring_bytes: u32, timewait: bool) -> Probe {
    probe_built(ports, ring_bytes, timewait, Paths::Fast, 0)
}

/// [`probe_for_ports`] whose kernel side also writes a connection record at each
/// connection's end, beside the transitions, and each connection's counters before its end
/// (what `--record` asks for).
pub fn recording_probe_for_ports(ports: &[u16], ring_bytes: u32) -> Probe {
    use tcptrace_common::records;
    let probe = probe_built(
        ports,
        ring_bytes,
        true,
        Paths::Fast,
        records::CONNECTIONS | records::DETAILS,
    );
    assert!(
        probe.connection_records() && probe.details(),
        "connection records and counters were asked for"
    );
    probe
}

/// [`probe_for_ports`] whose kernel side writes only what views that show no time per state
/// read: connection records with counters, the middle transitions left out — with
/// `passive_close`, CLOSE_WAIT→LAST_ACK too (`tcptrace timewait`), else not (`report`).
pub fn timeless_probe_for_ports(ports: &[u16], ring_bytes: u32, passive_close: bool) -> Probe {
    use tcptrace_common::records;
    let records = records::CONNECTIONS
        | records::NO_TRANSITIONS
        | records::NO_MIDDLE
        | records::DETAILS
        | if passive_close {
            records::NO_PASSIVE_CLOSE
        } else {
            0
        };
    probe_built(ports, ring_bytes, true, Paths::Fast, records)
}

/// Drains until `want` closes are concluded from connection records (or 10 s pass).
pub fn collect_record_closes(probe: &mut Probe, want: usize) -> Vec<Close> {
    collect_record_closes_and_gaps(probe, want).0
}

/// [`collect_record_closes`], with the sockets whose record is marked with a gap.
pub fn collect_record_closes_and_gaps(probe: &mut Probe, want: usize) -> (Vec<Close>, Vec<u64>) {
    let mut folded = Folded::new(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while folded.closes.len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let mut raw = Vec::new();
        probe.drain(&mut raw);
        folded.feed(&raw, tcptrace::source::host::monotonic_ns());
    }
    folded.closes.sort_by_key(|c| c.skaddr);
    (folded.closes, folded.gaps)
}

/// [`probe_for_ports`] with the classic tracepoint programs, which kernels without BTF take:
/// the fallback, checked the same way.
pub fn portable_probe_for_ports(ports: &[u16], ring_bytes: u32) -> Probe {
    probe_built(ports, ring_bytes, true, Paths::Portable, 0)
}

fn probe_built(
    ports: &[u16],
    ring_bytes: u32,
    timewait: bool,
    paths: Paths,
    records: u32,
) -> Probe {
    let filter = Filter {
        ports: ports.to_vec(),
        ..Filter::default()
    };
    let (kernel, ports) = filter.kernel();
    let probe = Probe::start(&ProbeConfig {
        kernel: tcptrace_common::Config { records, ..kernel },
        ports,
        ring_bytes,
        timewait,
        paths,
        ..ProbeConfig::default()
    })
    .expect("the probe loads and attaches");
    // A silent fallback would test the other side: each path must be the one asked for
    // (every kernel these tests run on has BTF and socket storage for tracing programs).
    let side = match paths {
        Paths::Fast => KernelSide::Btf,
        Paths::Portable => KernelSide::Classic,
    };
    assert_eq!(
        probe.kernel_side(),
        side,
        "the probe took the other kernel side"
    );
    probe
}

/// `n` connections to 127.0.0.1:`port` on `listener`, each closed first by the client (the
/// server reads its FIN, then closes): ten transitions each.
pub fn client_closes_first(listener: &std::net::TcpListener, port: u16, n: usize) {
    use std::io::Read as _;
    for _ in 0..n {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        drop(c);
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "the client closes first");
    }
}

/// Drains until `done` says the collected transitions are complete, or `timeout` passes.
pub fn collect(
    probe: &mut Probe,
    timeout: Duration,
    done: impl Fn(&[Transition]) -> bool,
) -> Vec<Transition> {
    let start = Instant::now();
    let mut raw: Vec<RawEvent> = Vec::new();
    let mut out = Vec::new();
    loop {
        raw.clear();
        probe.drain(&mut raw);
        for r in &raw {
            if let Ok(Event::Transition(t)) = decode(r) {
                out.push(t);
            }
        }
        if done(&out) || start.elapsed() > timeout {
            return out;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The transitions of one socket, as `FROM>TO` pairs.
pub fn path(ts: &[Transition], skaddr: u64) -> Vec<(State, State)> {
    ts.iter()
        .filter(|t| t.skaddr == skaddr)
        .map(|t| (t.from, t.to))
        .collect()
}

/// The socket whose transitions include `from → to` with the given local and remote ports.
pub fn socket_with(ts: &[Transition], from: State, to: State, local: SocketAddr) -> Option<u64> {
    ts.iter()
        .find(|t| t.from == from && t.to == to && t.local == local)
        .map(|t| t.skaddr)
}

use State::*;

/// The active closer's life: connect, close first, TIME_WAIT.
pub const ACTIVE_CLIENT: &[(State, State)] = &[
    (Close, SynSent),
    (SynSent, Established),
    (Established, FinWait1),
    (FinWait1, FinWait2),
    (FinWait2, TimeWait),
];
/// The passive closer's life on the accepting side.
pub const PASSIVE_SERVER: &[(State, State)] = &[
    (Listen, SynRecv),
    (SynRecv, Established),
    (Established, CloseWait),
    (CloseWait, LastAck),
    (LastAck, Close),
];
/// The passive closer's life on the connecting side.
pub const PASSIVE_CLIENT: &[(State, State)] = &[
    (Close, SynSent),
    (SynSent, Established),
    (Established, CloseWait),
    (CloseWait, LastAck),
    (LastAck, Close),
];
/// The active closer's life on the accepting side.
pub const ACTIVE_SERVER: &[(State, State)] = &[
    (Listen, SynRecv),
    (SynRecv, Established),
    (Established, FinWait1),
    (FinWait1, FinWait2),
    (FinWait2, TimeWait),
];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair, with IPv4 and IPv6 addresses; deleted on
/// drop, also when the test fails.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a4: std::net::IpAddr,
    pub b4: std::net::IpAddr,
    pub a6: std::net::IpAddr,
    pub b6: std::net::IpAddr,
    /// The veth end inside namespace a.
    pub dev_a: String,
    /// The veth end inside namespace b.
    pub dev_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` (iproute2) runs; `cargo xtask setup` installs it");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    pub fn new() -> NetPair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let subnet = (std::process::id() % 200) as u8 + n as u8;
        let pair = NetPair {
            a: format!("tct-{id}-a"),
            b: format!("tct-{id}-b"),
            a4: format!("10.199.{subnet}.1").parse().unwrap(),
            b4: format!("10.199.{subnet}.2").parse().unwrap(),
            a6: format!("fd99:{subnet:x}::1").parse().unwrap(),
            b6: format!("fd99:{subnet:x}::2").parse().unwrap(),
            dev_a: format!("tv{n}a{}", std::process::id() % 100000),
            dev_b: format!("tv{n}b{}", std::process::id() % 100000),
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        let va = pair.dev_a.clone();
        let vb = pair.dev_b.clone();
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        for (ns, dev, v4, v6) in [
            (&pair.a, &va, pair.a4, pair.a6),
            (&pair.b, &vb, pair.b4, pair.b6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Runs `f` on a thread that has entered namespace `ns`.
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = File::open(&path).expect("the namespace exists");
            // SAFETY: a valid namespace descriptor; setns only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns({path}) failed: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Starts the binary and waits until it traces.
pub fn start_tracer(args: &[&str]) -> std::process::Child {
    let mut tracer = std::process::Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_tracing(&mut tracer);
    tracer
}

/// Whether the host has a network namespace other than this process's (a test's own
/// namespaces count: they live in /run/netns).
pub fn other_network_namespaces() -> bool {
    tcptrace::source::diag::network_namespaces().len() > 1
}

/// Sets a sysctl inside a namespace.
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let st = std::process::Command::new("ip")
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

/// Whether a line of the tracer's stderr reports an error: its fatal `tcptrace: error: …`
/// or a logged `[ERROR …]`. A warning may quote the system's own words ("os error 1").
pub fn says_error(line: &str) -> bool {
    line.starts_with("[ERROR") || line.contains("error:")
}

/// Waits until the tracer `child` (stderr piped) says its probes are attached, past any
/// warning before (another test's namespace may vanish while it looks at them all); its
/// stderr stays readable after.
pub fn wait_tracing(child: &mut std::process::Child) {
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap();
        assert!(n > 0, "the tracer ended before tracing: {said}");
        if line.starts_with("Tracing TCP state transitions") {
            break;
        }
        // Shown with the test's output when it fails: what the tracer said at start.
        eprint!("tracer: {line}");
        said.push_str(&line);
    }
    child.stderr = Some(err.into_inner());
}

/// Drains until `want` closes are concluded from the transitions and from the connection
/// records alike (or 10 s pass), and checks that both say the same; returns every record
/// and the closes.
pub fn collect_closes(probe: &mut Probe, want: usize) -> (Vec<RawEvent>, Vec<Close>) {
    let mut raw_all = Vec::new();
    let mut from_transitions = Folded::new(false);
    let mut from_records = Folded::new(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let short = |t: &Folded, r: &Folded, unseen: u64| {
        r.closes.len() < want || (t.closes.len() as u64 + unseen) < want as u64
    };
    while short(&from_transitions, &from_records, probe.unseen_ends()) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        let mut raw = Vec::new();
        probe.drain(&mut raw);
        let now = tcptrace::source::host::monotonic_ns();
        from_transitions.feed(&raw, now);
        from_records.feed(&raw, now);
        raw_all.extend(raw);
    }
    let (mut a, mut b) = (from_transitions.closes, from_records.closes);
    a.sort_by_key(|c| c.skaddr);
    b.sort_by_key(|c| c.skaddr);
    // An end that no program ran for (rare, on a busy host) is counted by the kernel as
    // unseen and reported as lost; its connection's record is written when the socket is
    // destroyed, marked with a gap, so only the records hold that close.
    let (seen_by_both, only_in_records): (Vec<Close>, Vec<Close>) = b
        .iter()
        .partition(|r| a.iter().any(|t| t.skaddr == r.skaddr));
    let unseen = probe.unseen_ends();
    assert!(
        only_in_records.len() as u64 <= unseen
            && only_in_records
                .iter()
                .all(|c| from_records.gaps.contains(&c.skaddr)),
        "closes only in connection records beyond the {unseen} ends the kernel counted \
         unseen, or without a gap: {only_in_records:#?}\nfrom transitions: {a:#?}"
    );
    if !only_in_records.is_empty() {
        eprintln!(
            "{} end(s) unseen by the transition programs (the kernel counted {unseen}), \
             closed from their records at destruction",
            only_in_records.len()
        );
    }
    assert_eq!(
        a, seen_by_both,
        "closes from transitions, then from connection records"
    );
    (raw_all, b)
}

/// Closes concluded from one kind of record.
pub struct Folded {
    pub pipe: Pipeline,
    pub closes: Vec<Close>,
    /// The sockets whose connection record is marked with a gap (a transition no program
    /// ran for: an end, folded in at the socket's destruction).
    pub gaps: Vec<u64>,
}

impl Folded {
    pub fn new(records: bool) -> Folded {
        let pipe = Pipeline::new(Filter::default().compile())
            .from_records(records)
            .tracking();
        Folded {
            pipe,
            closes: Vec::new(),
            gaps: Vec::new(),
        }
    }

    pub fn feed(&mut self, raw: &[RawEvent], now: u64) {
        for r in raw {
            if let Some(ev) = self.pipe.decode(r) {
                if let tcptrace::model::event::Event::Connection(c) = &ev
                    && c.tail.flags & tcptrace_common::connection::tail_flag::GAP != 0
                {
                    self.gaps.push(c.end.skaddr);
                }
                self.pipe.fold(&ev);
            }
        }
        self.pipe.expire_closes(now);
        self.closes.append(&mut self.pipe.closes);
    }
}

/// `tcptrace serve --listen 127.0.0.1:0` with `args` (and a 5-minute backstop, so that a test
/// that panics leaves no root tracer behind); returns it and the address it serves on.
pub fn start_serve(args: &[&str]) -> (std::process::Child, String) {
    serve_from(Command::new(env!("CARGO_BIN_EXE_tcptrace")), args)
}

/// [`start_serve`] through `tcptrace`, a command that runs the binary (with its arguments
/// so far: `setpriv … /usr/bin/tcptrace`, say).
pub fn serve_from(mut tcptrace: Command, args: &[&str]) -> (std::process::Child, String) {
    let mut serve = tcptrace
        .args(["serve", "--listen", "127.0.0.1:0", "--duration", "5m"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(serve.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0,
            "serve ended before serving"
        );
        if let Some(rest) = line.trim().strip_prefix("Serving metrics on http://") {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    (serve, addr)
}

/// `GET /metrics` from a `tcptrace serve` at `addr`: the body.
pub fn scrape(addr: &str) -> String {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `series` (name and labels, as exposed) in a scrape's `body`.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Lets the tracer drain, stops it with SIGINT and returns its JSON records.
pub fn stop_tracer(tracer: std::process::Child) -> Vec<serde_json::Value> {
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let out = tracer.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The inode of a network namespace file: what `stat -L /run/netns/NAME` shows.
pub fn netns_inode(name: &str) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/run/netns/{name}"))
        .unwrap()
        .ino() as u32
}

/// `nft CMD` (its words split at spaces) in namespace `ns` (nftables: `cargo xtask setup`
/// installs it).
pub fn nft(ns: &str, cmd: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(cmd.split(' '))
        .status()
        .unwrap();
    assert!(st.success(), "nft {cmd} in {ns}");
}

/// A tracer whose JSON goes to a file as it runs (a pipe nobody reads would stop it once
/// full), removed when stopped.
pub struct LoggedTracer {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl LoggedTracer {
    /// Starts the binary with `args`, writing to a file of its own, and waits until it traces.
    pub fn start(args: &[&str]) -> LoggedTracer {
        static N: AtomicU32 = AtomicU32::new(0);
        let out = std::env::temp_dir().join(format!(
            "tcptrace-out-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tcptrace"))
            .args(args)
            .stdout(File::create(&out).unwrap())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_tracing(&mut child);
        LoggedTracer { child, out }
    }

    /// Lets it drain, stops it with SIGINT and returns its JSON records.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&self.out).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for LoggedTracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

/// Whether `cond` holds within 15 s (asked every 10 ms, and once more after the deadline).
/// Generous: beside the other suites' storms a veth packet can be dropped from a full
/// backlog and wait for a retransmission, and each `ss` can take long.
pub fn soon(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// What `ss ARGS` prints in namespace `ns` (sock_diag, the kernel's own list): one line per
/// socket with `-H`. Fails the test when `ss` fails, rather than reading it as no sockets.
pub fn ss(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss"])
        .args(args)
        .output()
        .expect("ss (iproute2) runs");
    assert!(
        out.status.success(),
        "ss {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
