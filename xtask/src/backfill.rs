//! `cargo xtask bench --backfill`: what reading the sockets open at start costs tcptrace
//! on a busy host — a million sockets held open in a namespace of the bench's own, each by
//! a process (so every one has an owner to find), then `tcptrace report` started beside
//! them and without them.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench::{Netns, Reaped},
    demo::Tracer,
};

/// Target: the backfill of a million sockets takes at most this long…
pub const BACKFILL_MS_MAX: f64 = 2_000.0;
/// … and adds at most this much to tcptrace's peak RSS.
pub const BACKFILL_RSS_MIB_MAX: f64 = 64.0;
/// Descriptors a holder keeps besides its connections'.
const SPARE_FDS: u64 = 64;
/// Source ports a holder binds on each of its source addresses.
const PORTS_PER_SOURCE: u64 = 50_000;
/// The first of them.
const FIRST_SOURCE_PORT: u16 = 10_000;
/// The listener port of holder 0 (holder `i` listens on this + `i`).
const FIRST_LISTEN_PORT: u16 = 9_000;

/// `cargo xtask hold-open` (internal): `count` loopback connections, both ends held by this
/// process until its stdin closes.
#[derive(clap::Args)]
pub struct HoldArgs {
    #[arg(long)]
    netns: String,
    /// Which holder this is: its listener port and source addresses are its own.
    #[arg(long)]
    index: u8,
    #[arg(long)]
    count: u64,
}

/// The most holder processes (each has its own listener port and source addresses).
const MAX_HOLDERS: u64 = 250;

/// What the backfill cost.
pub struct Cost {
    /// Sockets open in the bench's namespace (both ends of each connection).
    pub sockets: u64,
    /// Sockets asked for: more than `sockets` when this host could not hold them all.
    pub asked: u64,
    /// Why fewer were held than asked for.
    pub short: Vec<String>,
    /// What tcptrace said of its backfill (its debug line).
    pub said: String,
    /// Start to tracing, without and with the sockets (ms).
    pub start_ms: (f64, f64),
    /// Peak RSS, without and with the sockets (MiB).
    pub peak_mib: (f64, f64),
}

impl Cost {
    /// The time the sockets added to the start.
    pub fn ms(&self) -> f64 {
        self.start_ms.1 - self.start_ms.0
    }

    /// The memory they added.
    pub fn mib(&self) -> f64 {
        self.peak_mib.1 - self.peak_mib.0
    }

    /// Targets missed, said.
    pub fn misses(&self) -> Vec<String> {
        let mut m = Vec::new();
        if self.ms() > BACKFILL_MS_MAX {
            m.push(format!(
                "backfill of {} sockets ≤ {BACKFILL_MS_MAX:.0} ms ({:.0} ms)",
                self.sockets,
                self.ms()
            ));
        }
        if self.mib() > BACKFILL_RSS_MIB_MAX {
            m.push(format!(
                "backfill of {} sockets ≤ +{BACKFILL_RSS_MIB_MAX:.0} MiB RSS (+{:.1} MiB)",
                self.sockets,
                self.mib()
            ));
        }
        m
    }

    /// One line for the bench's output.
    pub fn line(&self) -> String {
        let short = if self.sockets < self.asked {
            format!(
                "\n  held {} of the {} sockets asked for (measured with those): {}",
                self.sockets,
                self.asked,
                self.short.join("; ")
            )
        } else {
            String::new()
        };
        let line = format!(
            "backfill at start, {} sockets open (each with its owner): +{:.0} ms to start \
             ({:.0} → {:.0} ms) — target ≤ {BACKFILL_MS_MAX:.0} ms: {}; peak RSS +{:.1} MiB \
             ({:.1} → {:.1} MiB) — target ≤ +{BACKFILL_RSS_MIB_MAX:.0} MiB: {}\n  tcptrace: {}",
            self.sockets,
            self.ms(),
            self.start_ms.0,
            self.start_ms.1,
            crate::bench::verdict(self.ms() <= BACKFILL_MS_MAX),
            self.mib(),
            self.peak_mib.0,
            self.peak_mib.1,
            crate::bench::verdict(self.mib() <= BACKFILL_RSS_MIB_MAX),
            self.said
        );
        line + &short
    }
}

/// Holds `sockets` open (rounded to whole holders), then starts `tcptrace report` with and
/// without them. A host that cannot hold them all (too few open files allowed, a holder
/// that runs out of memory or ports) holds what it can: the cost is measured with those,
/// and the line says how many and why.
pub fn measure(bin: &Path, dir: &Path, sockets: u64) -> Result<Cost> {
    let without = start(bin, dir)?;
    let ns = Netns::new()?;
    let mut short = Vec::new();
    // Both ends of each connection are the holder's, under the hard limit of open files
    // (which raising needs CAP_SYS_RESOURCE, not every root has).
    let per_holder = (nofile_hard().saturating_sub(SPARE_FDS) / 2).min(PORTS_PER_SOURCE);
    if per_holder == 0 {
        bail!("the hard limit of open files is too low to hold connections");
    }
    let mut holders = (sockets / 2).div_ceil(per_holder);
    if holders > MAX_HOLDERS {
        short.push(format!(
            "at most {MAX_HOLDERS} holders of {per_holder} connections each (the hard limit \
             of open files)"
        ));
        holders = MAX_HOLDERS;
    }
    let mut started = Vec::new();
    let mut asked_of_holders = 0;
    for index in 0..holders {
        let count = per_holder.min(sockets / 2 - asked_of_holders);
        match hold(&ns, index as u8, count) {
            Ok(h) => started.push((h, count)),
            Err(e) => {
                short.push(format!("{e:#}"));
                break;
            }
        }
        asked_of_holders += count;
    }
    let mut held = Vec::new();
    let mut total = 0;
    for (mut h, count) in started {
        match ready(&mut h) {
            Ok((n, why)) => {
                if n < count {
                    short.push(format!("a holder held {n} of {count} connections ({why})"));
                }
                total += n;
                held.push(h);
            }
            Err(e) => short.push(format!("{e:#}")),
        }
    }
    if total == 0 {
        bail!("no connection could be held: {}", short.join("; "));
    }
    let with = start(bin, dir)?;
    for h in &mut held {
        if let Some(mut stdin) = h.0.as_mut().and_then(|c| c.stdin.take()) {
            let _ = stdin.write_all(b"x");
        }
    }
    for mut h in held {
        h.wait(Duration::from_secs(120))?;
    }
    drop(ns);
    Ok(Cost {
        sockets: 2 * total,
        asked: 2 * (sockets / 2),
        short,
        said: with.2,
        start_ms: (without.0, with.0),
        peak_mib: (without.1, with.1),
    })
}

/// Starts a holder of `count` connections.
fn hold(ns: &Netns, index: u8, count: u64) -> Result<Reaped> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["hold-open", "--netns", &ns.name])
        .args(["--index", &index.to_string(), "--count", &count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    Ok(Reaped(Some(cmd.spawn().context("cannot start a holder")?)))
}

/// Waits for a holder's "holding N[ (why fewer)]" line: the connections it holds, and why
/// fewer than asked, if so.
fn ready(h: &mut Reaped) -> Result<(u64, String)> {
    let mut line = String::new();
    if let Some(out) = h.0.as_mut().and_then(|c| c.stdout.take()) {
        BufReader::new(out).read_line(&mut line)?;
    }
    let Some(rest) = line.trim_end().strip_prefix("holding ") else {
        bail!("a holder failed to open its connections (see above)");
    };
    let (n, why) = rest.split_once(' ').unwrap_or((rest, ""));
    let n = n.parse().context("a holder's line")?;
    Ok((n, why.trim_matches(|c| c == '(' || c == ')').to_string()))
}

/// `tcptrace report` from spawn to tracing, then its peak RSS: (ms, MiB, its backfill line).
fn start(bin: &Path, dir: &Path) -> Result<(f64, f64, String)> {
    let mut t = Tracer::start_with(
        bin,
        &["report".into(), "--port".into(), "1".into()],
        &dir.join("backfill.out"),
        &[("RUST_LOG", "warn,tcptrace=debug")],
    )?;
    let ms = t.started_in.as_secs_f64() * 1e3;
    let pid = t.pid().context("tracer pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    let said = t
        .before()
        .iter()
        .find(|l| l.contains("backfill at start"))
        .cloned()
        .unwrap_or_default();
    t.stop()?;
    Ok((ms, hwm_kib / 1024.0, said))
}

/// The holder: a listener, then `count` connections to it from source addresses and ports
/// of its own (no port search), each accepted; "holding N" once all are open, then waits
/// for stdin to close.
pub fn hold_open(a: &HoldArgs) -> Result<()> {
    crate::bench::enter_netns(&a.netns)?;
    raise_nofile(2 * a.count + SPARE_FDS)?;
    let port = FIRST_LISTEN_PORT + u16::from(a.index);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let mut held: Vec<OwnedFd> = Vec::with_capacity(2 * a.count as usize);
    // The connections it could open are held and said, with why it stopped short.
    let mut stopped = None;
    for i in 0..a.count {
        let mut one = || -> Result<()> {
            let source = u8::try_from(1 + i / PORTS_PER_SOURCE).context("too many connections")?;
            let from = SocketAddrV4::new(
                Ipv4Addr::new(127, 1, a.index, source),
                FIRST_SOURCE_PORT + (i % PORTS_PER_SOURCE) as u16,
            );
            let c = connect(from, to).with_context(|| format!("connecting from {from}"))?;
            let (s, _) = listener.accept().context("accepting")?;
            held.push(c);
            held.push(s.into());
            Ok(())
        };
        if let Err(e) = one() {
            stopped = Some(e);
            break;
        }
    }
    match stopped {
        None => println!("holding {}", a.count),
        Some(e) => println!("holding {} ({e:#})", held.len() / 2),
    }
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    Ok(())
}

/// A TCP socket bound to `from`, connected to `to`.
fn connect(from: SocketAddrV4, to: SocketAddrV4) -> Result<OwnedFd> {
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket; its descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a descriptor we just opened and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (f, t) = (sa(from), sa(to));
    // SAFETY: valid sockaddr_in values of the length given, on our own socket.
    let ok = unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const f).cast(), len) == 0
            && libc::connect(fd.as_raw_fd(), (&raw const t).cast(), len) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

/// The hard limit of open files.
fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

/// Raises this process's soft limit of open files to `n` (at most the hard limit).
fn raise_nofile(n: u64) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: nofile_hard(),
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "cannot allow {n} open files: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
