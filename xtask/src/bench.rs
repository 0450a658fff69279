//! `cargo xtask bench`: what tracing costs, measured side by side.
//!
//! A storm is a fixed number of loopback connections made by several client processes
//! against a multi-threaded server process, inside a network namespace of its own (so the
//! TIME_WAIT sockets one storm leaves never hold the ports of the next, and die with it).
//! Every connection makes ten transitions. Clients bind with `IP_BIND_ADDRESS_NO_PORT` and
//! never wait on anything but the kernel, so the storm is CPU-bound, not latency-bound.
//!
//! Each round runs every variant once — untraced, tcptrace's probes attached with idle
//! programs (what attaching alone costs: the ceiling of every tcptrace ratio), `tcptrace
//! --json` to a file, `tcptrace report`, `hist`, `timewait`, `serve`, and libbpf-tools
//! `tcpstates` to a file — in an order that alternates between rounds, for both close
//! orders; the table shows medians.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::demo::Tracer;

/// Options.
#[derive(clap::Args)]
pub struct Args {
    /// Connections per storm.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1000..=500_000))]
    connections: u64,
    /// Client processes (the server process runs as many accepting threads).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: u64,
    /// Rounds; each runs every variant once, in alternating order. Medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
    /// Leave libbpf-tools' tcpstates out (else it is installed with apt when missing).
    #[arg(long)]
    no_tcpstates: bool,
    /// A quick comparison of only these variants (with the untraced and idle ones, the
    /// table's base and ceiling), e.g. `report,hist`: no extras, no kernel-time row.
    #[arg(long, value_delimiter = ',', value_parser = ["stream_json", "report", "hist", "timewait", "serve", "tcpstates"])]
    only: Vec<String>,
    /// Also profile `tcptrace --json` during one storm with perf and print its hottest
    /// functions.
    #[arg(long)]
    profile: bool,
    /// Instead of the comparison: only profile `tcptrace VIEW` (`--json`, `report`, `hist`,
    /// `timewait`, `serve`) during one storm, as --profile does.
    #[arg(long, value_name = "VIEW", value_parser = ["--json", "report", "hist", "timewait", "serve"])]
    profile_only: Option<String>,
    /// Instead of the comparison: storms without pause for --minutes under `tcptrace report`,
    /// sampling its memory and the kernel maps' entries; then a SYN flood to a closed port
    /// and a half-open flood, under a small --max-sockets.
    #[arg(long)]
    soak: bool,
    /// How long the soak runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Instead of the comparison: only the kernel's time per program (bpf_stats) under
    /// `tcptrace report`, one storm a round, medians.
    #[arg(long)]
    kernel_cost: bool,
    /// Measure this tcptrace binary (built with the `test-knobs` feature) instead of building
    /// the workspace's: an earlier build, for a before/after comparison.
    #[arg(long, value_name = "PATH")]
    pub tcptrace: Option<std::path::PathBuf>,
    /// The view --kernel-cost (and the comparison's kernel-time table) runs: `report` (per-state
    /// times), `hist` (every state's time), `timewait` (none: the middle transitions are
    /// left out in the kernel), `idle` (`report` with every program returning at once:
    /// what being called costs), or `report-without-storage` (`report` with no socket given
    /// socket-local storage: what the storage and its use cost, against `report`).
    #[arg(long, default_value = "report", value_parser = ["report", "hist", "timewait", "idle", "report-without-storage"])]
    kernel_cost_view: String,
    /// Instead of the comparison: only what reading the sockets open at start costs, with
    /// --backfill-sockets held open.
    #[arg(long)]
    backfill: bool,
    /// Sockets held open for the backfill's measurement (both ends of half as many
    /// connections).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    backfill_sockets: u64,
}

/// `cargo xtask storm-server` (internal): accepts `total` connections on 127.0.0.1:`port` in
/// the namespace, then exits.
#[derive(clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    netns: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    total: u64,
    #[arg(long)]
    threads: u64,
    /// Close each connection at once (else wait for the client's FIN).
    #[arg(long)]
    server_closes: bool,
    /// The listen backlog (with --threads 0, nothing accepts: a full queue drops SYNs).
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
}

/// `cargo xtask storm-client` (internal): `count` connections from `src`.
#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    netns: String,
    #[arg(long)]
    src: Ipv4Addr,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    count: u64,
    /// Wait for the server's FIN before closing (else close right after connecting).
    #[arg(long)]
    server_closes: bool,
    /// Connect without waiting (non-blocking) and keep every socket open until stdin
    /// closes: a half-open flood when nothing answers.
    #[arg(long)]
    hold: bool,
    /// Expect every connection to be refused (a SYN flood to a closed port).
    #[arg(long)]
    refused: bool,
}

/// Moves this process (or thread) into a named network namespace (before any socket).
pub fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("no network namespace {name}"))?;
    // SAFETY: setns on a namespace descriptor we hold.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The storm's server process.
pub fn server(a: &ServerArgs) -> Result<()> {
    enter_netns(&a.netns)?;
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    l.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, a.port)).into())?;
    l.listen(a.backlog)?;
    let l = Arc::new(std::net::TcpListener::from(l));
    println!("ready");
    std::io::stdout().flush()?;
    if a.threads == 0 {
        // Listen, never accept, until killed.
        loop {
            thread::park();
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let (total, server_closes) = (a.total, a.server_closes);
    let threads: Vec<_> = (0..a.threads)
        .map(|_| {
            let (l, done) = (l.clone(), done.clone());
            thread::spawn(move || -> Result<()> {
                let mut buf = [0u8; 16];
                loop {
                    let (mut c, _) = l.accept()?;
                    if !server_closes {
                        let _ = c.read(&mut buf);
                    }
                    drop(c);
                    if done.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                        std::process::exit(0);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    }
    Ok(())
}

/// The storm's client process.
pub fn client(a: &ClientArgs) -> Result<()> {
    enter_netns(&a.netns)?;
    let to: socket2::SockAddr = SocketAddr::from((Ipv4Addr::LOCALHOST, a.port)).into();
    let from: socket2::SockAddr = SocketAddr::from((a.src, 0)).into();
    let mut held = Vec::new();
    if a.hold {
        let want = a.count + 64;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct; only the soft limit is raised,
        // up to the hard one.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if lim.rlim_max < want {
            bail!(
                "holding {} sockets needs {want} open files; the hard limit is {}",
                a.count,
                lim.rlim_max
            );
        }
        lim.rlim_cur = want;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            bail!(
                "cannot allow {want} open files: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    for _ in 0..a.count {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int. Let connect() pick the port, knowing the
        // whole 4-tuple: bind() alone would search for a port unused by every TIME_WAIT.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.bind(&from)?;
        if a.hold {
            s.set_nonblocking(true)?;
            match s.connect(&to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).context("connect"),
            }
            held.push(s);
            continue;
        }
        match s.connect(&to) {
            Err(e) if a.refused && e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Ok(()) if a.refused => bail!("a connection to the closed port was accepted"),
            r => r.context("connect")?,
        }
        if a.server_closes {
            let mut b = [0u8; 1];
            let _ = (&s).read(&mut b);
        }
    }
    if a.hold {
        println!("holding {}", held.len());
        std::io::stdout().flush()?;
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    }
    Ok(())
}

/// A network namespace that is deleted on every path out.
pub struct Netns {
    pub name: String,
}

static NETNS: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn new() -> Result<Netns> {
        let name = format!(
            "tcptrace-bench-{}-{}",
            std::process::id(),
            NETNS.fetch_add(1, Ordering::Relaxed)
        );
        crate::capture(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        crate::capture(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child killed and reaped on every path out.
pub struct Reaped(pub Option<Child>);

/// A listener on 127.0.0.1:`port` in `ns` that never accepts: once its queue (`backlog`
/// handshakes) is full, SYNs are dropped and connects stay in SYN_SENT. Ready when returned.
pub fn never_accepting(ns: &Netns, port: u16, backlog: u32) -> Result<Reaped> {
    let mut server = Command::new(std::env::current_exe()?);
    server
        .args([
            "storm-server",
            "--netns",
            &ns.name,
            "--port",
            &port.to_string(),
        ])
        .args(["--total", &u64::MAX.to_string(), "--threads", "0"])
        .args(["--backlog", &backlog.to_string()])
        .stdout(Stdio::piped());
    let mut server = Reaped(Some(server.spawn().context("cannot start the listener")?));
    let mut ready = String::new();
    if let Some(out) = server.0.as_mut().and_then(|c| c.stdout.take()) {
        BufReader::new(out).read_line(&mut ready)?;
    }
    Ok(server)
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Reaped {
    pub fn wait(&mut self, limit: Duration) -> Result<()> {
        let Some(c) = self.0.as_mut() else {
            return Ok(());
        };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                self.0 = None;
                if !status.success() {
                    bail!("a storm process failed ({status})");
                }
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("a storm process did not finish within {limit:?}");
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Which side closes first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closer {
    Client,
    Server,
}

impl Closer {
    fn name(self) -> &'static str {
        match self {
            Closer::Client => "client closes first",
            Closer::Server => "server closes first",
        }
    }

    /// Its part's name in result.json.
    fn key(self) -> &'static str {
        match self {
            Closer::Client => "client_closes_first",
            Closer::Server => "server_closes_first",
        }
    }
}

/// One storm: `conns` connections to `port` in `ns`; returns connections per second.
fn storm(ns: &Netns, port: u16, conns: u64, workers: u64, closer: Closer) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let closes = |c: &mut Command| {
        if closer == Closer::Server {
            c.arg("--server-closes");
        }
    };
    let mut cmd = Command::new(&exe);
    cmd.args(["storm-server", "--netns", &ns.name])
        .args(["--port", &port.to_string(), "--total", &conns.to_string()])
        .args(["--threads", &workers.to_string()])
        .stdout(Stdio::piped());
    closes(&mut cmd);
    let mut server = Reaped(Some(cmd.spawn().context("cannot start the storm server")?));
    let out = server.0.as_mut().and_then(|c| c.stdout.take());
    let mut line = String::new();
    BufReader::new(out.context("server stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the storm server did not start");
    }
    let start = Instant::now();
    let mut clients = Vec::new();
    for w in 0..workers {
        let n = conns / workers + u64::from(w < conns % workers);
        let mut cmd = Command::new(&exe);
        cmd.args(["storm-client", "--netns", &ns.name])
            .args(["--src", &format!("127.0.{}.1", w + 1)])
            .args(["--port", &port.to_string(), "--count", &n.to_string()]);
        closes(&mut cmd);
        clients.push(Reaped(Some(
            cmd.spawn().context("cannot start a storm client")?,
        )));
    }
    for c in &mut clients {
        c.wait(Duration::from_secs(300))?;
    }
    server.wait(Duration::from_secs(60))?;
    Ok(conns as f64 / start.elapsed().as_secs_f64())
}

/// One storm for the soak: `server_closes` picks the close order.
pub fn storm_in(
    ns: &Netns,
    port: u16,
    conns: u64,
    workers: u64,
    server_closes: bool,
) -> Result<f64> {
    let closer = if server_closes {
        Closer::Server
    } else {
        Closer::Client
    };
    storm(ns, port, conns, workers, closer)
}

/// CPU seconds of a process, all its threads, from /proc/PID/task/*/schedstat (time on a
/// CPU in nanoseconds: /proc/PID/stat counts clock ticks, too coarse for a second's storm).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(s) = std::fs::read_to_string(&path) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| format!("unexpected {}", path.display()))?;
        }
    }
    Ok(ns as f64 / 1e9)
}

/// A memory figure of a process in MiB: `VmHWM` (peak) or `VmRSS` (now).
pub fn mem_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// The median of some numbers.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Untraced,
    /// tcptrace's probes attached, each program returning at once.
    Idle,
    Stream,
    Report,
    Hist,
    Timewait,
    Serve,
    Tcpstates,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Untraced => "untraced",
            Variant::Idle => "probes attached, idle",
            Variant::Stream => "tcptrace --json > file",
            Variant::Report => "tcptrace report",
            Variant::Hist => "tcptrace hist",
            Variant::Timewait => "tcptrace timewait",
            Variant::Serve => "tcptrace serve",
            Variant::Tcpstates => "tcpstates > file",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::Untraced => "untraced",
            Variant::Idle => "idle_probes",
            Variant::Stream => "stream_json",
            Variant::Report => "report",
            Variant::Hist => "hist",
            Variant::Timewait => "timewait",
            Variant::Serve => "serve",
            Variant::Tcpstates => "tcpstates",
        }
    }

    /// (minimum rate ratio, maximum CPU s per 100k transitions), when it has targets.
    fn targets(self) -> Option<(f64, f64)> {
        match self {
            Variant::Stream => Some((0.85, 0.25)),
            // Kernel side v2's targets (issue 16): views that read one record per connection.
            Variant::Report | Variant::Hist | Variant::Timewait | Variant::Serve => {
                Some((0.95, 0.01))
            }
            _ => None,
        }
    }
}

/// One measured storm.
#[derive(Clone, Copy, Default)]
struct Sample {
    rate: f64,
    cpu_s: f64,
    rss_mib: f64,
    delivered: u64,
    expected: u64,
    /// What tcptrace said it lost (ring buffer full, or runs the kernel skipped).
    lost: u64,
}

/// The tracer of a variant, started and stopped around a storm.
enum Running {
    None,
    Tcptrace(Tracer),
    Tcpstates(Reaped),
}

/// The command line of tcptrace for variant `v`, tracing `port` (none for the others).
fn tcptrace_args(v: Variant, port: u16) -> Result<Vec<String>> {
    let p = port.to_string();
    Ok(match v {
        Variant::Stream => vec!["--json".into(), "--port".into(), p],
        Variant::Report => vec!["report".into(), "--port".into(), p],
        Variant::Hist => vec!["hist".into(), "--port".into(), p],
        Variant::Idle => vec!["report".into(), "--port".into(), p, "--idle-probes".into()],
        Variant::Timewait => vec![
            "timewait".into(),
            "--port".into(),
            p,
            "--interval".into(),
            "1h".into(),
        ],
        Variant::Serve => vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", crate::demo::free_port()?),
            "--port".into(),
            p,
        ],
        _ => vec![],
    })
}

impl Running {
    /// Starts the tracer of `v` on `port`, its output to `out` (none when untraced).
    fn start(v: Variant, bin: &Path, port: u16, out: &Path) -> Result<Running> {
        let args = tcptrace_args(v, port)?;
        Ok(match v {
            Variant::Untraced => Running::None,
            Variant::Tcpstates => {
                let child = Command::new("tcpstates")
                    .stdout(File::create(out)?)
                    .stderr(Stdio::null())
                    .spawn()
                    .context("cannot start tcpstates")?;
                // It says nothing when attached; it loads in well under a second.
                thread::sleep(Duration::from_millis(1500));
                Running::Tcpstates(Reaped(Some(child)))
            }
            _ => Running::Tcptrace(Tracer::start(bin, &args, out)?),
        })
    }

    /// The tracer's process id, when there is one.
    fn pid(&self) -> Option<u32> {
        match self {
            Running::None => None,
            Running::Tcptrace(t) => t.pid(),
            Running::Tcpstates(r) => r.0.as_ref().map(Child::id),
        }
    }

    /// Stops the tracer of `v`; returns (transitions delivered, transitions it said it lost).
    /// Untraced, every one of the `expected` counts as delivered.
    fn stop(self, v: Variant, out: &Path, port: u16, expected: u64) -> Result<(u64, u64)> {
        Ok(match self {
            Running::None => (expected, 0),
            Running::Tcptrace(mut t) => {
                t.stop()?;
                delivered_by_tcptrace(&t, v, out)?
            }
            Running::Tcpstates(r) => (delivered_by_tcpstates(r, out, port)?, 0),
        })
    }
}

/// (transitions delivered, transitions lost) by a stopped tcptrace of variant `v`: the
/// stream's lines in `out`, else what its closing summary says.
fn delivered_by_tcptrace(t: &Tracer, v: Variant, out: &Path) -> Result<(u64, u64)> {
    let said = t.said().join("\n");
    let lost = number_before(&said, " lost").unwrap_or(0);
    if v == Variant::Idle {
        let n = number_before(&said, " transitions").unwrap_or(0);
        if n != 0 {
            bail!("idle probes traced {n} transitions: the idle switch is broken");
        }
    }
    let delivered = if v == Variant::Stream {
        let text = std::fs::read_to_string(out)?;
        text.lines()
            .filter(|l| l.contains(r#""kind":"transition""#))
            .count() as u64
    } else {
        let transitions = number_before(&said, " transitions").with_context(|| {
            format!("tcptrace did not say how many transitions it read: {said}")
        })?;
        // A connection record stands for the five transitions of a storm
        // connection's side. serve also reads each connect's first transition
        // (one per connection: its client side's record holds it too).
        let records = number_before(&said, " connection records").unwrap_or(0);
        let connects = if v == Variant::Serve { records / 2 } else { 0 };
        transitions.saturating_sub(connects) + 5 * records
    };
    Ok((delivered, lost))
}

/// Stops tcpstates; the transitions on `port` it wrote to `out`.
fn delivered_by_tcpstates(mut r: Reaped, out: &Path, port: u16) -> Result<u64> {
    if let Some(c) = &r.0 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    }
    r.wait(Duration::from_secs(10))?;
    // SKADDR C-PID C-COMM LADDR LPORT RADDR RPORT OLDSTATE -> NEWSTATE MS
    let text = std::fs::read_to_string(out)?;
    Ok(text
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 7 && (f[4] == port.to_string() || f[6] == port.to_string())
        })
        .count() as u64)
}

/// The number in `text` just before `word` (e.g. "200002 transitions"), read in the tracer's
/// closing totals line when `text` has one.
pub(crate) fn number_before(text: &str, word: &str) -> Option<u64> {
    // The closing totals line, when there is one: a warning before it may use the words.
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("tcptrace: ") && l.contains(" events read"))
        .unwrap_or(text);
    let i = line.find(word)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

struct Bench<'a> {
    bin: &'a Path,
    a: &'a Args,
    dir: PathBuf,
    port: u16,
}

impl Bench<'_> {
    /// Runs one storm under `v`.
    fn sample(&mut self, v: Variant, closer: Closer) -> Result<Sample> {
        self.port += 1;
        let port = self.port;
        let ns = Netns::new()?;
        let out = self.dir.join(format!("{}-{}.out", v.key(), port));
        let running = Running::start(v, self.bin, port, &out)?;
        let pid = running.pid();
        let cpu0 = pid.map(cpu_seconds).transpose()?.unwrap_or(0.0);
        let rate = storm(&ns, port, self.a.connections, self.a.workers, closer)?;
        // Let the tracer drain what the storm left in its buffers.
        thread::sleep(Duration::from_millis(300));
        let cpu_s = pid.map(cpu_seconds).transpose()?.unwrap_or(0.0) - cpu0;
        let rss_mib = pid.map(|p| mem_mib(p, "VmHWM")).transpose()?.unwrap_or(0.0);
        // Ten transitions per connection, plus the listener's two.
        let expected = 10 * self.a.connections + 2;
        let (delivered, lost) = running.stop(v, &out, port, expected)?;
        let _ = std::fs::remove_file(&out);
        drop(ns);
        // The namespace's teardown (its TIME_WAIT sockets) runs in the background.
        thread::sleep(Duration::from_millis(500));
        Ok(Sample {
            rate,
            cpu_s,
            rss_mib,
            delivered,
            expected,
            lost,
        })
    }
}

/// Makes sure tcpstates is there (Debian's libbpf-tools), installing it when it is not.
fn tcpstates_ready() -> bool {
    let found = || {
        Command::new("tcpstates")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if found() {
        return true;
    }
    println!("installing libbpf-tools (tcpstates) with apt-get");
    apt_install("libbpf-tools") && found()
}

/// `apt-get install -y PACKAGE`, refreshing the package lists first if that fails (a stale
/// list names files the mirror no longer has).
pub fn apt_install(package: &str) -> bool {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    install()
        || Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .is_ok_and(|s| s.success())
            && install()
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// A variant's figures over the rounds of one close order.
struct Row {
    v: Variant,
    /// Connections per second, median.
    rate: f64,
    /// `rate` over the untraced storm's.
    ratio: f64,
    /// CPU seconds per 100k expected transitions, median.
    cpu: f64,
    /// Peak RSS in MiB, the highest of the rounds.
    rss: f64,
    /// Transitions delivered, all rounds.
    delivered: u64,
    /// Transitions expected, all rounds.
    expected: u64,
}

/// Each variant's row from its samples (`samples[0]`, the untraced storms', is the base).
fn rows(variants: &[Variant], samples: &[Vec<Sample>]) -> Vec<Row> {
    let base = median(&samples[0].iter().map(|s| s.rate).collect::<Vec<_>>());
    variants
        .iter()
        .zip(samples)
        .map(|(&v, s)| {
            let rate = median(&s.iter().map(|s| s.rate).collect::<Vec<_>>());
            let cpu = median(
                &s.iter()
                    .map(|s| s.cpu_s / s.expected as f64 * 1e5)
                    .collect::<Vec<_>>(),
            );
            let rss = s.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
            let delivered: u64 = s.iter().map(|s| s.delivered).sum();
            let expected: u64 = s.iter().map(|s| s.expected).sum();
            Row {
                v,
                rate,
                ratio: rate / base,
                cpu,
                rss,
                delivered,
                expected,
            }
        })
        .collect()
}

/// The title and column heads of a close order's table.
fn table_header(closer: Closer, a: &Args) -> String {
    format!(
        "\n{} — {} connections × {} rounds, {} client processes, loopback\n\
         {:<24} {:>9} {:>6} {:>13} {:>9} {:>19}\n",
        closer.name(),
        a.connections,
        a.rounds,
        a.workers,
        "variant",
        "conn/s",
        "ratio",
        "CPU s/100k tr",
        "peak RSS",
        "delivered/expected"
    )
}

/// The lines under a close order's table: what attaching alone costs, and how much less CPU
/// the stream takes than tcpstates (when it ran).
fn table_footer(rows: &[Row], floor: f64, tcpstates_cpu: Option<f64>) -> String {
    let mut footer = format!(
        "probes attached with idle programs run the storm at {floor:.2}× untraced: what \
         attaching alone costs, above every tcptrace row but for noise\n"
    );
    if let Some(t) = tcpstates_cpu {
        let stream = rows
            .iter()
            .find(|r| r.v == Variant::Stream)
            .map_or(f64::NAN, |r| r.cpu);
        footer.push_str(&format!(
            "tcptrace --json costs {:.1}× less CPU per transition than tcpstates\n",
            t / stream
        ));
    }
    footer
}

impl Row {
    /// The row's line in the table.
    fn table_line(&self) -> String {
        let (name, rate) = (self.v.name(), self.rate);
        if self.v == Variant::Untraced {
            format!(
                "{name:<24} {rate:>9.0} {:>6.2} {:>13} {:>9} {:>19}\n",
                1.0, "-", "-", "-"
            )
        } else {
            // Idle programs trace nothing: what they "delivered" is not a loss.
            let tally = if self.v == Variant::Idle {
                "-".to_string()
            } else {
                format!("{}/{}", self.delivered, self.expected)
            };
            format!(
                "{name:<24} {rate:>9.0} {:>6.2} {:>13.3} {:>6.1}MiB {tally:>19}\n",
                self.ratio, self.cpu, self.rss
            )
        }
    }

    /// The row's figures in result.json (its targets' verdicts apart).
    fn json(&self, rounds: u64) -> serde_json::Value {
        let v = self.v;
        let mut o = json!({
            "rate": self.rate, "ratio": self.ratio, "runs": rounds,
        });
        if v != Variant::Untraced {
            o["cpu_s_per_100k"] = json!(self.cpu);
            o["peak_rss_mib"] = json!(self.rss);
        }
        if v == Variant::Idle {
            o["traced"] = json!(self.delivered);
        } else if v != Variant::Untraced {
            o["delivered"] = json!(self.delivered);
            o["expected"] = json!(self.expected);
        }
        o
    }

    /// Judges the row against its variant's targets, when it has some: their verdicts for
    /// result.json, each one missed added to `misses`. `floor` is the idle probes' ratio.
    fn targets(
        &self,
        closer: Closer,
        floor: f64,
        tcpstates_cpu: Option<f64>,
        misses: &mut Vec<String>,
    ) -> Option<serde_json::Value> {
        let &Row {
            v,
            ratio,
            cpu,
            delivered,
            expected,
            ..
        } = self;
        let (min_ratio, max_cpu) = v.targets()?;
        let lossless = v != Variant::Stream || delivered == expected;
        let cheaper = tcpstates_cpu.map(|t| t / cpu);
        let targets = json!({
            "ratio": {
                "min": min_ratio,
                "met": ratio >= min_ratio,
                "idle_probes_ratio": floor,
            },
            "cpu": {"max": max_cpu, "met": cpu <= max_cpu},
            "lossless": lossless,
            "times_cheaper_than_tcpstates": cheaper,
        });
        for (what, ok) in [
            (
                format!(
                    "rate ≥ {min_ratio}× untraced ({ratio:.2}; probes attached, idle: \
                     {floor:.2})"
                ),
                ratio >= min_ratio,
            ),
            (format!("CPU ≤ {max_cpu} s/100k ({cpu:.3})"), cpu <= max_cpu),
            (
                format!("no loss ({delivered}/{expected})"),
                v != Variant::Stream || lossless,
            ),
        ] {
            if !ok {
                misses.push(format!("{}, {}: {what}", closer.name(), v.name()));
            }
        }
        if v == Variant::Stream
            && let Some(c) = cheaper
            && c < 4.0
        {
            misses.push(format!(
                "{}, {}: ≥ 4× cheaper than tcpstates ({c:.1}×)",
                closer.name(),
                v.name()
            ));
        }
        Some(targets)
    }
}

impl Bench<'_> {
    /// Every round of `closer`'s storms, each running every variant once, in an order that
    /// alternates between rounds; prints a line a round. The samples, by variant.
    fn rounds(&mut self, variants: &[Variant], closer: Closer) -> Result<Vec<Vec<Sample>>> {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
        for round in 0..self.a.rounds {
            let mut order: Vec<usize> = (0..variants.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let mut line = format!("{}, round {}:", closer.name(), round + 1);
            for i in order {
                let s = self.sample(variants[i], closer)?;
                line.push_str(&format!(" {} {:.0}/s", variants[i].key(), s.rate));
                // Idle programs catch nothing: the kernel's skips of them are not losses.
                if s.lost > 0 && variants[i] != Variant::Idle {
                    line.push_str(&format!(" ({} lost)", s.lost));
                }
                samples[i].push(s);
            }
            println!("{line}");
        }
        Ok(samples)
    }

    /// The comparison for one close order: its rounds, then its part of the table (added to
    /// `table`) and each target missed (added to `misses`); returns its part of result.json.
    fn compare(
        &mut self,
        variants: &[Variant],
        closer: Closer,
        table: &mut String,
        misses: &mut Vec<String>,
    ) -> Result<serde_json::Value> {
        let samples = self.rounds(variants, closer)?;
        table.push_str(&table_header(closer, self.a));
        let rows = rows(variants, &samples);
        let tcpstates_cpu = rows
            .iter()
            .find(|r| r.v == Variant::Tcpstates)
            .map(|r| r.cpu);
        // What attaching alone costs: no view of tcptrace can run the storm faster.
        let floor = rows
            .iter()
            .find(|r| r.v == Variant::Idle)
            .map_or(f64::NAN, |r| r.ratio);
        let mut per_closer = serde_json::Map::new();
        for row in &rows {
            table.push_str(&row.table_line());
            let mut o = row.json(self.a.rounds);
            if let Some(targets) = row.targets(closer, floor, tcpstates_cpu, misses) {
                o["targets"] = targets;
            }
            per_closer.insert(row.v.key().into(), o);
        }
        table.push_str(&table_footer(&rows, floor, tcpstates_cpu));
        Ok(serde_json::Value::Object(per_closer))
    }
}

/// The variants compared: untraced, tcptrace's, and tcpstates unless left out or missing.
fn variants_compared(a: &Args) -> Vec<Variant> {
    let mut variants = vec![
        Variant::Untraced,
        Variant::Idle,
        Variant::Stream,
        Variant::Report,
        Variant::Hist,
        Variant::Timewait,
        Variant::Serve,
    ];
    if !a.only.is_empty() {
        variants.retain(|v| {
            matches!(v, Variant::Untraced | Variant::Idle) || a.only.iter().any(|k| k == v.key())
        });
    }
    let tcpstates = a.only.is_empty() || a.only.iter().any(|k| k == "tcpstates");
    if tcpstates && !a.no_tcpstates {
        if tcpstates_ready() {
            variants.push(Variant::Tcpstates);
        } else {
            println!("tcpstates is not available: it is left out (see above)");
        }
    }
    variants
}

/// The last word: every target met, or those missed.
fn print_misses(misses: &[String]) {
    if misses.is_empty() {
        println!("\nevery target met");
    } else {
        println!("\ntargets MISSED:");
        for m in misses {
            println!("  - {m}");
        }
    }
}

/// The comparison.
pub fn bench(bin: &Path, a: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmark loads eBPF programs, creates network namespaces and reads the \
             tracers' CPU time from /proc: run it as root (sudo -E cargo xtask bench)"
        );
    }
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    if a.soak {
        return crate::soak::soak(bin, a.minutes, &dir);
    }
    if a.backfill {
        let cost = crate::backfill::measure(bin, &dir, a.backfill_sockets)?;
        println!("{}", cost.line());
        return Ok(());
    }
    if a.kernel_cost {
        return kernel_cost_only(bin, a, &dir);
    }
    let mut b = Bench {
        bin,
        a,
        dir: dir.clone(),
        port: 20_000,
    };
    if let Some(view) = &a.profile_only {
        profile(&mut b, view)?;
        return Ok(());
    }
    let variants = variants_compared(a);
    let mut results = serde_json::Map::new();
    let mut table = String::new();
    if !a.only.is_empty() {
        // A quick comparison of a few variants: no extras, no kernel-time row.
        let mut misses = Vec::new();
        for closer in [Closer::Client, Closer::Server] {
            b.compare(&variants, closer, &mut table, &mut misses)?;
        }
        println!("{table}");
        print_misses(&misses);
        return Ok(());
    }
    let extras = Extras::measure(bin, &dir, a.backfill_sockets)?;
    let mut misses = extras.backfill.misses();
    for closer in [Closer::Client, Closer::Server] {
        let per_closer = b.compare(&variants, closer, &mut table, &mut misses)?;
        results.insert(closer.key().into(), per_closer);
    }
    let cost = kernel_cost(&mut b)?;
    table.push_str(&cost.table(a.connections));
    misses.extend(cost.misses());
    results.insert("kernel_cost".into(), cost.json());
    misses.extend(extras.misses());
    println!("{table}");
    extras.print();
    extras.insert_json(&mut results);
    results.insert("connections".into(), json!(a.connections));
    results.insert("workers".into(), json!(a.workers));
    results.insert("rounds".into(), json!(a.rounds));
    results.insert("missed".into(), json!(misses));
    if a.profile {
        results.insert("profile".into(), json!(profile(&mut b, "--json")?));
    }
    let path = dir.join("result.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::Value::Object(results))? + "\n",
    )?;
    print_misses(&misses);
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Target: from spawning tcptrace to its probes attached, median.
const STARTUP_MS_MAX: f64 = 300.0;
/// Target: peak RSS following 1M open connections.
const RSS_MIB_1M_SOCKETS_MAX: f64 = 64.0;
/// Target: `GET /metrics` with [`HELD_OPEN`] connections held open, median, in less than this.
const METRICS_SCRAPE_MS_MAX: f64 = 50.0;

/// What is measured once, beside the comparison's rounds: its extra rows.
struct Extras {
    /// From spawning tcptrace to its probes attached, median.
    startup_ms: f64,
    /// Peak RSS following 1M open connections.
    memory_mib: f64,
    scrape: Scrape,
    backfill: crate::backfill::Cost,
}

impl Extras {
    /// Start-up, memory at 1M sockets, the scrape and the backfill, in that order.
    fn measure(bin: &Path, dir: &Path, backfill_sockets: u64) -> Result<Extras> {
        Ok(Extras {
            startup_ms: startup_ms(bin, dir)?,
            memory_mib: memory_1m(bin, dir)?,
            scrape: scrape_ms(bin, dir)?,
            backfill: crate::backfill::measure(bin, dir, backfill_sockets)?,
        })
    }

    /// Targets missed by start-up, memory and the scrape, said (the backfill's lead the
    /// comparison's list).
    fn misses(&self) -> Vec<String> {
        let (startup, memory, scrape) = (self.startup_ms, self.memory_mib, &self.scrape);
        let mut misses = Vec::new();
        if startup > STARTUP_MS_MAX {
            misses.push(format!(
                "start to probes attached ≤ {STARTUP_MS_MAX:.0} ms ({startup:.0} ms)"
            ));
        }
        if memory > RSS_MIB_1M_SOCKETS_MAX {
            misses.push(format!(
                "peak RSS ≤ {RSS_MIB_1M_SOCKETS_MAX:.0} MiB at 1M sockets ({memory:.1} MiB)"
            ));
        }
        if scrape.median_ms >= METRICS_SCRAPE_MS_MAX {
            misses.push(format!(
                "/metrics in < {METRICS_SCRAPE_MS_MAX:.0} ms with 10k sockets held open \
                 ({:.1} ms)",
                scrape.median_ms
            ));
        }
        misses
    }

    /// Prints a line for each, with its target's verdict (under the table).
    fn print(&self) {
        let (startup, memory, scrape) = (self.startup_ms, self.memory_mib, &self.scrape);
        println!(
            "GET /metrics with {HELD_OPEN} connections held open ({} followed in userspace; \
             median of {}): {:.2} ms, max {:.2} ms, {} bytes — target < \
             {METRICS_SCRAPE_MS_MAX:.0} ms: {}",
            scrape.tracked,
            scrape.samples,
            scrape.median_ms,
            scrape.max_ms,
            scrape.bytes,
            verdict(scrape.median_ms < METRICS_SCRAPE_MS_MAX)
        );
        println!(
            "start to probes attached (median of 5): {startup:.0} ms — target ≤ \
             {STARTUP_MS_MAX:.0} ms: {}",
            verdict(startup <= STARTUP_MS_MAX)
        );
        println!(
            "peak RSS following 1,000,000 open connections (replayed): {memory:.1} MiB — target \
             ≤ {RSS_MIB_1M_SOCKETS_MAX:.0} MiB: {}",
            verdict(memory <= RSS_MIB_1M_SOCKETS_MAX)
        );
        println!("{}", self.backfill.line());
    }

    /// Adds their parts to result.json.
    fn insert_json(&self, results: &mut serde_json::Map<String, serde_json::Value>) {
        let (startup, memory, scrape) = (self.startup_ms, self.memory_mib, &self.scrape);
        let backfill = &self.backfill;
        results.insert(
            "backfill".into(),
            json!({
                "sockets": backfill.sockets,
                "ms": backfill.ms(),
                "peak_rss_mib": {"without": backfill.peak_mib.0, "with": backfill.peak_mib.1},
                "start_ms": {"without": backfill.start_ms.0, "with": backfill.start_ms.1},
            }),
        );
        results.insert("startup_ms".into(), json!(startup));
        results.insert("peak_rss_mib_1m_sockets".into(), json!(memory));
        results.insert(
            "metrics_scrape".into(),
            json!({
                "tracked_sockets": scrape.tracked,
                "samples": scrape.samples,
                "median_ms": scrape.median_ms,
                "max_ms": scrape.max_ms,
                "bytes": scrape.bytes,
            }),
        );
    }
}

/// How long `GET /metrics` takes.
struct Scrape {
    tracked: u64,
    samples: usize,
    median_ms: f64,
    max_ms: f64,
    bytes: usize,
}

/// One `GET /metrics`: its duration (connect to last byte) and body.
fn scrape_once(addr: SocketAddr) -> Result<(f64, String)> {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .context("no HTTP body")?;
    Ok((ms, body))
}

/// Connections held open during the scrape measurement.
const HELD_OPEN: u64 = 10_000;

/// `tcptrace serve` with over 10k open sockets (10k connects held against a listener that
/// never accepts: the handshakes its queue takes, both ends, and the SYN_SENT rest), after a
/// storm has filled its families: the latency of `GET /metrics`, median of 21.
fn scrape_ms(bin: &Path, dir: &Path) -> Result<Scrape> {
    const HELD: u64 = HELD_OPEN;
    let ns = Netns::new()?;
    // The storm's port, then the held connections' (the storm's sockets may still hold it).
    let (storm_port, port): (u16, u16) = (31_000, 31_001);
    let listen: SocketAddr = format!("127.0.0.1:{}", crate::demo::free_port()?).parse()?;
    let mut tracer = Tracer::start(
        bin,
        &[
            "serve".into(),
            "--listen".into(),
            listen.to_string(),
            "--port".into(),
            format!("{storm_port},{port}"),
        ],
        &dir.join("serve.out"),
    )?;
    // Series in every family first: a storm through the exporter.
    storm(&ns, storm_port, 2_000, 2, Closer::Client)?;
    let exe = std::env::current_exe()?;
    let server = never_accepting(&ns, port, 4096)?;
    let mut client = Command::new(&exe);
    client
        .args(["storm-client", "--netns", &ns.name, "--src", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--count", &HELD.to_string()])
        .arg("--hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut client = Reaped(Some(client.spawn().context("cannot start the clients")?));
    // "holding N" once every connect is made.
    let mut line = String::new();
    if let Some(out) = client.0.as_mut().and_then(|c| c.stdout.take()) {
        BufReader::new(out).read_line(&mut line)?;
    }
    thread::sleep(Duration::from_secs(1));
    let mut times = Vec::new();
    let mut tracked = 0;
    let mut bytes = 0;
    for _ in 0..21 {
        let (ms, body) = scrape_once(listen)?;
        times.push(ms);
        bytes = body.len();
        tracked = body
            .lines()
            .find_map(|l| l.strip_prefix("tcptrace_tracked_sockets "))
            .and_then(|v| v.trim().parse().ok())
            .context("no tcptrace_tracked_sockets in the scrape")?;
        thread::sleep(Duration::from_millis(50));
    }
    if let Some(mut stdin) = client.0.as_mut().and_then(|c| c.stdin.take()) {
        let _ = stdin.write_all(b"x");
    }
    client.wait(Duration::from_secs(30))?;
    drop(server);
    tracer.stop()?;
    drop(ns);
    // Connection records: the kernel keeps the open connections; `serve` follows one in
    // userspace only where the kernel writes transitions instead (the classic programs).
    Ok(Scrape {
        tracked,
        samples: times.len(),
        median_ms: median(&times),
        max_ms: times.iter().copied().fold(0.0, f64::max),
        bytes,
    })
}

/// From spawning `tcptrace` to its probes attached (its "Tracing…" line), median of 5.
fn startup_ms(bin: &Path, dir: &Path) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let mut t = Tracer::start(
            bin,
            &["--port".into(), "1".into()],
            &dir.join("startup.out"),
        )?;
        times.push(t.started_in.as_secs_f64() * 1e3);
        t.stop()?;
    }
    Ok(median(&times))
}

/// Peak RSS of `tcptrace report` following 1M open connections: a synthetic recording
/// (each connection CLOSE→SYN_SENT→ESTABLISHED, never closed) replayed through it. The
/// live path feeds the same tracker; replaying isolates the per-socket cost from the
/// kernel side (which keeps its own, fixed-size maps).
fn memory_1m(bin: &Path, dir: &Path) -> Result<f64> {
    crate::run(&mut crate::cargo(&[
        "build",
        "--release",
        "--package",
        "tcptrace",
        "--example",
        "synth",
    ])?)?;
    let synth = crate::root().join("target/release/examples/synth");
    let rec = dir.join("open-1m.tcptrace");
    crate::run(Command::new(&synth).arg("1000000").arg(&rec))?;
    let out = Command::new(bin)
        .args(["report", "--json", "--from"])
        .arg(&rec)
        .stdout(Stdio::null())
        .spawn()?;
    // VmHWM of a child that has exited is gone: read it from the kernel's rusage instead.
    let pid = out.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::wait4(pid, &mut status, 0, &mut ru) } != pid {
        bail!("waiting for tcptrace: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("tcptrace report --from {} failed", rec.display());
    }
    let _ = std::fs::remove_file(&rec);
    Ok(ru.ru_maxrss as f64 / 1024.0)
}

/// Profiles `tcptrace VIEW` with perf during one storm; returns its hottest functions.
fn profile(b: &mut Bench, view: &str) -> Result<Vec<String>> {
    b.port += 1;
    let port = b.port;
    let ns = Netns::new()?;
    let out = b.dir.join("profile.out");
    let mut t = Tracer::start(
        b.bin,
        &[view.into(), "--port".into(), port.to_string()],
        &out,
    )?;
    let pid = t.pid().context("tracer pid")?;
    let data = b.dir.join("perf.data");
    let mut perf = Reaped(Some(
        Command::new("perf")
            .args(["record", "-F", "2000", "-g", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf (Debian: apt-get install linux-perf)")?,
    ));
    thread::sleep(Duration::from_millis(500));
    storm(&ns, port, b.a.connections, b.a.workers, Closer::Client)?;
    thread::sleep(Duration::from_millis(300));
    if let Some(mut c) = perf.0.take() {
        // SAFETY: signalling our own child. perf writes its data and exits on SIGINT (with
        // the signal as its status: not a failure).
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        c.wait()?;
    }
    t.stop()?;
    let report = crate::capture(
        Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--percent-limit", "1.5", "--sort", "dso,symbol", "-i"])
            .arg(&data),
    )?;
    let top: Vec<String> = report
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .take(25)
        .collect();
    println!(
        "\nhottest functions of `tcptrace {view}` (perf, {} connections):",
        b.a.connections
    );
    for l in &top {
        println!("  {l}");
    }
    Ok(top)
}

/// What tcptrace's kernel programs cost during one storm, as the kernel measures it
/// (`kernel.bpf_stats_enabled`: each run's time, two clock reads added per run).
/// `--kernel-cost`: [`kernel_cost`] a round, then the medians.
fn kernel_cost_only(bin: &Path, a: &Args, dir: &Path) -> Result<()> {
    let mut b = Bench {
        bin,
        a,
        dir: dir.to_path_buf(),
        port: 20_000,
    };
    let (mut per_connection, mut per_run, mut view_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let cost = kernel_cost(&mut b)?;
        let programs: Vec<String> = cost
            .programs
            .iter()
            .map(|(name, runs, ns)| format!("{name} {runs}×{ns:.0}"))
            .collect();
        println!(
            "round {}: {:.2} µs per connection; {} (ns/run); the view's CPU {:.3} s/100k",
            round + 1,
            cost.ns_per_connection / 1e3,
            programs.join(", "),
            cost.view_cpu_per_100k
        );
        per_connection.push(cost.ns_per_connection);
        per_run.push(cost.transition_ns_per_run);
        view_cpu.push(cost.view_cpu_per_100k);
    }
    println!(
        "median of {}: {:.2} µs per connection — target ≤ {:.0} µs; transition program {:.0} ns \
         per run — target ≤ {TRANSITION_NS_PER_RUN_MAX:.0} ns; the view's CPU {:.3} s/100k \
         transitions",
        a.rounds,
        median(&per_connection) / 1e3,
        KERNEL_NS_PER_CONNECTION_MAX / 1e3,
        median(&per_run),
        median(&view_cpu)
    );
    Ok(())
}

/// What tcptrace's kernel programs cost during one storm, as the kernel measures it.
struct KernelCost {
    /// Per program: (name, runs, nanoseconds per run).
    programs: Vec<(String, u64, f64)>,
    /// Nanoseconds of every program's runs per connection of the storm.
    ns_per_connection: f64,
    /// Nanoseconds per run of the transition program.
    transition_ns_per_run: f64,
    /// The view's own CPU seconds (userspace) per 100k transitions of the storm.
    view_cpu_per_100k: f64,
}

impl KernelCost {
    /// Its part of the comparison's table: a row a program, then the targets' verdicts.
    fn table(&self, connections: u64) -> String {
        let mut table = format!(
            "\nkernel time, one client-closes-first storm of {} connections under tcptrace \
             report (bpf_stats)\n{:<24} {:>10} {:>10}\n",
            connections, "program", "runs", "ns/run"
        );
        for (name, runs, ns) in &self.programs {
            table.push_str(&format!("{name:<24} {runs:>10} {ns:>10.0}\n"));
        }
        table.push_str(&format!(
            "all programs: {:.2} µs per connection — target ≤ {:.0} µs: {}; transition program \
             {:.0} ns per run — target ≤ {TRANSITION_NS_PER_RUN_MAX:.0} ns: {}\n",
            self.ns_per_connection / 1e3,
            KERNEL_NS_PER_CONNECTION_MAX / 1e3,
            verdict(self.ns_per_connection <= KERNEL_NS_PER_CONNECTION_MAX),
            self.transition_ns_per_run,
            verdict(self.transition_ns_per_run <= TRANSITION_NS_PER_RUN_MAX),
        ));
        table
    }

    /// Targets missed, said.
    fn misses(&self) -> Vec<String> {
        let mut misses = Vec::new();
        if self.ns_per_connection > KERNEL_NS_PER_CONNECTION_MAX {
            misses.push(format!(
                "kernel time ≤ {:.0} µs per connection ({:.2} µs)",
                KERNEL_NS_PER_CONNECTION_MAX / 1e3,
                self.ns_per_connection / 1e3
            ));
        }
        if self.transition_ns_per_run.is_nan()
            || self.transition_ns_per_run > TRANSITION_NS_PER_RUN_MAX
        {
            misses.push(format!(
                "transition program ≤ {TRANSITION_NS_PER_RUN_MAX:.0} ns per run ({:.0} ns)",
                self.transition_ns_per_run
            ));
        }
        misses
    }

    /// Its part of result.json.
    fn json(&self) -> serde_json::Value {
        json!({
            "ns_per_connection": self.ns_per_connection,
            "transition_ns_per_run": self.transition_ns_per_run,
            "programs": self.programs.iter().map(|(n, r, ns)| {
                json!({"name": n, "runs": r, "ns_per_run": ns})
            }).collect::<Vec<_>>(),
        })
    }
}

/// Target: kernel time per connection for the aggregating views.
const KERNEL_NS_PER_CONNECTION_MAX: f64 = 4_000.0;
/// Target: the transition program's time per run.
const TRANSITION_NS_PER_RUN_MAX: f64 = 250.0;

/// The ids of the BPF programs process `pid` holds open (from `/proc/PID/fdinfo`): the
/// tracer's own, not another tcptrace's that runs on the host meanwhile.
fn programs_of(pid: u32) -> Result<std::collections::HashSet<u64>> {
    let mut ids = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    Ok(ids)
}

/// `(name, run_cnt, run_time_ns)` of tcptrace's loaded programs, from bpftool: those of
/// the tracer `pid` (every program named like tcptrace's when its descriptors cannot be
/// read).
fn program_stats(pid: Option<u32>) -> Result<Vec<(String, u64, u64)>> {
    let text = crate::capture(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let progs: serde_json::Value = serde_json::from_str(&text)?;
    let mine = pid
        .and_then(|p| programs_of(p).ok())
        .filter(|ids| !ids.is_empty());
    Ok(progs
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            let ours = match &mine {
                Some(ids) => ids.contains(&p["id"].as_u64()?),
                None => {
                    name.starts_with("btf_")
                        || [
                            "inet_sock_set_s",
                            "tcp_send_reset",
                            "tcp_receive_res",
                            "timer_",
                            "tw_",
                        ]
                        .iter()
                        .any(|n| name.starts_with(n))
                }
            };
            // The socket owners' iterator runs once, at start, not per connection.
            let ours = ours && name != "socket_owners";
            ours.then(|| {
                (
                    name.to_string(),
                    p["run_cnt"].as_u64().unwrap_or(0),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect())
}

/// One client-closes-first storm under `tcptrace report` (or `--kernel-cost-view`) with the
/// kernel's run statistics on: what each program costs per run, and all of them per
/// connection.
fn kernel_cost(b: &mut Bench) -> Result<KernelCost> {
    crate::soak::bpftool_ready()?;
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS)?;
    b.port += 1;
    let port = b.port;
    let ns = Netns::new()?;
    let args = match b.a.kernel_cost_view.as_str() {
        "idle" => tcptrace_args(Variant::Idle, port)?,
        "report-without-storage" => vec![
            "report".into(),
            "--port".into(),
            port.to_string(),
            "--bench-without-storage".into(),
        ],
        view => vec![view.to_string(), "--port".into(), port.to_string()],
    };
    let mut tracer = Tracer::start(b.bin, &args, &b.dir.join("kernel-cost.out"))?;
    std::fs::write(STATS, "1")?;
    let pid = tracer.pid();
    let before = program_stats(pid)?;
    let cpu0 = pid.map(cpu_seconds).transpose()?.unwrap_or(0.0);
    let run = storm(&ns, port, b.a.connections, b.a.workers, Closer::Client);
    // As in the comparison: the view's CPU includes draining what the storm left.
    thread::sleep(Duration::from_millis(300));
    let cpu_s = pid.map(cpu_seconds).transpose()?.unwrap_or(0.0) - cpu0;
    let after = program_stats(pid);
    std::fs::write(STATS, was.trim())?;
    tracer.stop()?;
    run?;
    let mut programs = Vec::new();
    let mut total_ns = 0;
    for (name, cnt, ns_total) in after? {
        let (c0, t0) = before
            .iter()
            .find(|p| p.0 == name)
            .map_or((0, 0), |p| (p.1, p.2));
        let (runs, ns) = (cnt.saturating_sub(c0), ns_total.saturating_sub(t0));
        total_ns += ns;
        programs.push((name, runs, ns as f64 / runs.max(1) as f64));
    }
    programs.sort_by(|a, b| a.0.cmp(&b.0));
    let transition_ns_per_run = programs
        .iter()
        .find(|p| p.0 == "btf_set_state")
        .map_or(f64::NAN, |p| p.2);
    Ok(KernelCost {
        ns_per_connection: total_ns as f64 / b.a.connections as f64,
        transition_ns_per_run,
        programs,
        // Ten transitions per connection.
        view_cpu_per_100k: cpu_s / (10 * b.a.connections) as f64 * 1e5,
    })
}

#[cfg(test)]
mod tests {
    use super::{median, number_before};

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn numbers_in_the_tracers_summary() {
        let s = "tcptrace: 200002 transitions and 9 other events read, 0 lost";
        assert_eq!(number_before(s, " transitions"), Some(200_002));
        assert_eq!(number_before(s, " other"), Some(9));
        assert_eq!(number_before(s, " missing"), None);
        let s = "tcptrace: 2 transitions, 40000 connection records and 0 other events read";
        assert_eq!(number_before(s, " transitions"), Some(2));
        assert_eq!(number_before(s, " connection records"), Some(40_000));
        let s =
            "[WARN] 3 lost to a full map\ntcptrace: 5 transitions and 0 other events read, 0 lost";
        assert_eq!(
            number_before(s, " lost"),
            Some(0),
            "the totals line's, not the warning's"
        );
    }
}
