//! `cargo xtask demo`: trace a scripted loopback workload a newcomer can follow, then show
//! what tcptrace saw and how to read it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::as_root;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A tracer child that is stopped (SIGINT) and reaped on every path out.
pub struct Tracer {
    child: Option<Child>,
    /// What it wrote to stderr after it started tracing.
    said: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// From spawning it to its "Tracing" line (probes attached).
    pub started_in: Duration,
    /// What it wrote to stderr before that line.
    before: Vec<String>,
    relay: Option<thread::JoinHandle<()>>,
}

impl Tracer {
    /// Starts `bin args…` as root with stdout to `out`, and waits until it says it is tracing.
    pub fn start(bin: &Path, args: &[String], out: &Path) -> Result<Tracer> {
        Tracer::start_with(bin, args, out, &[])
    }

    /// [`Tracer::start`] with these variables in its environment.
    pub fn start_with(
        bin: &Path,
        args: &[String],
        out: &Path,
        env: &[(&str, &str)],
    ) -> Result<Tracer> {
        let stdout = std::fs::File::create(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let mut cmd = as_root(bin)?;
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let spawned = std::time::Instant::now();
        let mut child = cmd.spawn().context("cannot start tcptrace")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tracer = Tracer {
            child: Some(child),
            said: said.clone(),
            started_in: Duration::ZERO,
            before: Vec::new(),
            relay: None,
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(15)) {
                Ok(line) if line.starts_with("Tracing TCP state transitions") => {
                    tracer.started_in = spawned.elapsed();
                    tracer.before = std::mem::take(&mut seen);
                    // Keep what it says later (warnings, its closing summary), and relay
                    // warnings to our stderr.
                    tracer.relay = Some(thread::spawn(move || {
                        for line in rx {
                            if !line.starts_with("tcptrace: ") {
                                eprintln!("tcptrace: {line}");
                            }
                            if let Ok(mut s) = said.lock() {
                                s.push(line);
                            }
                        }
                    }));
                    return Ok(tracer);
                }
                Ok(line) => seen.push(line),
                Err(_) => {
                    tracer.stop()?;
                    bail!("tcptrace did not start tracing:\n{}", seen.join("\n"));
                }
            }
        }
    }

    /// What it wrote to stderr before it started tracing.
    pub fn before(&self) -> &[String] {
        &self.before
    }

    /// The tracer's process id (sudo's, when started through sudo).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What it wrote to stderr since it started tracing.
    pub fn said(&self) -> Vec<String> {
        self.said.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends SIGINT and waits for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child (sudo relays SIGINT to tcptrace).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        for _ in 0..100 {
            if let Some(status) = child.try_wait()? {
                // Everything it wrote is read once its stderr closes.
                if let Some(relay) = self.relay.take() {
                    let _ = relay.join();
                }
                if !status.success() {
                    bail!("tcptrace exited with {status}");
                }
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("tcptrace did not stop within 5 s of SIGINT")
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port())
}

/// A server that answers "ping" with "pong" `n` times, closing first or waiting for the
/// client to close.
fn serve(port: u16, n: usize, server_closes: bool) -> Result<thread::JoinHandle<Result<()>>> {
    let listener = TcpListener::bind((LOOPBACK, port))?;
    Ok(thread::spawn(move || {
        for _ in 0..n {
            let (mut c, _) = listener.accept()?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf)?;
            c.write_all(b"pong")?;
            if !server_closes {
                // Wait for the client's FIN before closing our side.
                let _ = c.read(&mut buf)?;
            }
        }
        Ok(())
    }))
}

/// A client that sends "ping", reads "pong", and closes first or after the server.
fn client(port: u16, client_closes: bool) -> Result<()> {
    let mut c = TcpStream::connect((LOOPBACK, port))?;
    c.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf)?;
    if !client_closes {
        let _ = c.read(&mut buf)?;
    }
    Ok(())
}

fn scene(n: usize, title: &str, text: &str) {
    println!("\n── scene {n}: {title}\n{text}");
    let _ = std::io::stdout().flush();
}

/// The tour.
pub fn demo(bin: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tcptrace-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = tour(bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Scenes 1 to 4 on loopback under one tracer, what it saw, the other views of the same
/// events, then scene 5.
fn tour(bin: &Path, dir: &Path) -> Result<()> {
    let [a, b, c, d] = [free_port()?, free_port()?, free_port()?, free_port()?];
    let out = dir.join("stream.txt");
    // Later views replay this same recording instead of tracing again.
    let recording: PathBuf = dir.join("demo.tcptrace");
    let ports = format!("{a},{b},{c},{d}");
    println!("Starting tcptrace on loopback ports {ports} (the demo's only traffic).");
    let args: Vec<String> = ["--port", &ports, "--record"]
        .iter()
        .map(|s| s.to_string())
        .chain([recording.display().to_string()])
        .collect();
    let mut tracer = Tracer::start(bin, &args, &out)?;

    scene(
        1,
        &format!("port {a}: the clients close first"),
        "Three clients connect, send \"ping\", read \"pong\" and close. The side that closes\n\
         first goes through FIN_WAIT1 and FIN_WAIT2 into TIME_WAIT: here, the clients.",
    );
    ping_pongs(a, false)?;

    scene(
        2,
        &format!("port {b}: the server closes first"),
        "Now the server closes right after answering. The server holds the TIME_WAIT and the\n\
         clients go through CLOSE_WAIT and LAST_ACK instead.",
    );
    ping_pongs(b, true)?;

    scene(
        3,
        &format!("port {c}: a reset"),
        "A client sets SO_LINGER to 0 and closes: the kernel aborts the connection with a\n\
         reset (RST) instead of FINs. Both sockets jump from ESTABLISHED straight to CLOSE,\n\
         and nobody holds TIME_WAIT.",
    );
    reset(c)?;

    scene(
        4,
        &format!("port {d}: a refused connection"),
        "Nothing listens on this port: the kernel answers the SYN with a reset, and the\n\
         client goes from SYN_SENT straight to CLOSE.",
    );
    refused(d)?;

    thread::sleep(Duration::from_millis(300));
    tracer.stop()?;
    show_stream(&out, [a, b, c, d])?;
    replay_views(bin, &recording)?;
    println!(
        "\nThe report's rows pair each port with a direction: `in` when this host accepted the\n\
         connections, `out` when it made them. Only the side that closes first holds TIME_WAIT:\n\
         on port {a} the clients (`out`), on port {b} the server (`in`). The six TIME_WAIT\n\
         sockets stay for 60 s; `sudo tcptrace --state TIME_WAIT` would show each one leave,\n\
         with how long it stayed."
    );
    out_of_ports(bin, dir)
}

/// Three clients' "ping"-"pong" on `port`: the server closes first, or the clients.
fn ping_pongs(port: u16, server_closes: bool) -> Result<()> {
    let srv = serve(port, 3, server_closes)?;
    for _ in 0..3 {
        client(port, !server_closes)?;
    }
    srv.join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(())
}

/// A connection to `port` that the client aborts with a reset (SO_LINGER 0).
fn reset(port: u16) -> Result<()> {
    let listener = TcpListener::bind((LOOPBACK, port))?;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.connect(&SocketAddr::from((LOOPBACK, port)).into())?;
    let (mut accepted, _) = listener.accept()?;
    s.set_linger(Some(Duration::ZERO))?;
    drop(s);
    let mut buf = [0u8; 1];
    let _ = accepted.read(&mut buf); // ECONNRESET
    drop(accepted);
    drop(listener);
    Ok(())
}

/// A connection to `port`, where nothing listens: refused.
fn refused(port: u16) -> Result<()> {
    match TcpStream::connect((LOOPBACK, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        other => bail!("expected a refused connection on port {port}, got {other:?}"),
    }
}

/// The live stream the tracer wrote to `out`, and what to notice in it on scene 1 to 4's
/// ports.
fn show_stream(out: &Path, [a, b, c, d]: [u16; 4]) -> Result<()> {
    let seen = std::fs::read_to_string(out)?;
    println!("\n════ what tcptrace saw: the live stream ════\n{seen}");
    println!(
        "What to notice:\n\
         - port {a}: each client's socket ends FIN_WAIT2 → TIME_WAIT and its close says\n\
         \x20 `closed: local/fin`, with `client, TIME_WAIT here` on the line below; the server's\n\
         \x20 sockets end LAST_ACK → CLOSE.\n\
         - port {b}: the same, mirrored: the server holds the TIME_WAIT.\n\
         - port {c}: ESTABLISHED → CLOSE on both sides, an `RST sent` by the client and an\n\
         \x20 `RST received` by the server; the closes say rst_sent / rst_received.\n\
         - port {d}: SYN_SENT → CLOSE after an `RST received`: the close says remote/refused.\n\
         - PID/COMM name the process that owns each socket, learnt from its own system calls:\n\
         \x20 never the peer, even though on loopback the peer's packets run in its context.\n\
         - IN-FROM is how long the socket spent in the state it left (SYN_SENT: connect latency)."
    );
    Ok(())
}

/// The same events, replayed from the recording through the other views (no root needed).
fn replay_views(bin: &Path, recording: &Path) -> Result<()> {
    for (title, view) in [
        ("who closes first, per port: tcptrace report", "report"),
        ("how long each state lasted: tcptrace hist", "hist"),
        (
            "the TIME_WAIT population left behind: tcptrace timewait",
            "timewait",
        ),
    ] {
        println!("\n════ {title} --from demo.tcptrace ════");
        let out = std::process::Command::new(bin)
            .args([view, "--from"])
            .arg(recording)
            .output()
            .with_context(|| format!("running tcptrace {view}"))?;
        if !out.status.success() {
            bail!(
                "tcptrace {view} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// The tables of `text` (each a timestamped header line and its rows) that differ from the
/// one before but for the time.
fn changing_tables(text: &str) -> String {
    let mut out = String::new();
    let mut last_rows = String::new();
    let mut table = String::new();
    let mut rows = String::new();
    let mut flush = |table: &mut String, rows: &mut String| {
        if !table.is_empty() && *rows != last_rows {
            out.push_str(table);
            last_rows = rows.clone();
        }
        table.clear();
        rows.clear();
    };
    for line in text.lines() {
        if !line.starts_with(' ') {
            flush(&mut table, &mut rows);
        } else {
            rows.push_str(line);
            rows.push('\n');
        }
        table.push_str(line);
        table.push('\n');
    }
    flush(&mut table, &mut rows);
    out
}

/// Scene 5: a client that closes first runs out of local ports; `ports` sees it coming and
/// `doctor` says why (in a network namespace of the demo's own, with 20 local ports).
fn out_of_ports(bin: &Path, dir: &Path) -> Result<()> {
    let ns = crate::bench::Netns::new()?;
    let port = free_port()?;
    scene(
        5,
        &format!("port {port}, in a namespace with 20 local ports: running out"),
        "A client opens a connection every 60 ms and closes it first, so each one leaves a\n\
         TIME_WAIT socket holding its local port for 60 s. With only 20 ports (and no reuse of\n\
         TIME_WAIT ports), connects soon fail with EADDRNOTAVAIL. `tcptrace ports` shows the\n\
         destination filling up before that; `tcptrace doctor` judges the settings after.",
    );
    let ports_out = dir.join("ports.txt");
    let port_arg = port.to_string();
    let args: Vec<String> = ["ports", "--port", &port_arg, "--interval", "500ms"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut ports = Tracer::start(bin, &args, &ports_out)?;
    let mut doctor = std::process::Command::new(bin)
        .args(["doctor", "--port", &port_arg, "--duration", "4s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcptrace doctor")?;
    let mut err = BufReader::new(doctor.stderr.take().context("doctor's stderr")?);
    let mut line = String::new();
    err.read_line(&mut line)?;
    let name = ns.name.clone();
    let failed = thread::spawn(move || run_out_of_ports(&name, port))
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    let doctor = doctor.wait_with_output()?;
    thread::sleep(Duration::from_millis(600));
    ports.stop()?;
    show_ports_and_doctor(&ports_out, &doctor, failed)
}

/// In network namespace `netns`, given 20 local ports and no reuse of TIME_WAIT ones: 40
/// connects to `port`, one every 60 ms, each closed by the client first. How many failed
/// for want of a local port (EADDRNOTAVAIL).
fn run_out_of_ports(netns: &str, port: u16) -> Result<u32> {
    crate::bench::enter_netns(netns)?;
    for (key, value) in [
        ("ip_local_port_range", "40000 40019"),
        ("tcp_tw_reuse", "0"),
    ] {
        std::fs::write(format!("/proc/sys/net/ipv4/{key}"), value)
            .with_context(|| format!("setting {key} in the demo's namespace"))?;
    }
    let listener = TcpListener::bind((LOOPBACK, port))?;
    let server = thread::spawn(move || {
        // Accepts and reads each connection to its end (the client closes first).
        for c in listener.incoming().take(20).flatten() {
            let mut c = c;
            let mut b = [0u8; 1];
            while c.read(&mut b).map(|n| n > 0).unwrap_or(false) {}
        }
    });
    let mut failed = 0;
    for _ in 0..40 {
        match TcpStream::connect((LOOPBACK, port)) {
            Ok(c) => drop(c),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => failed += 1,
            Err(e) => return Err(e.into()),
        }
        thread::sleep(Duration::from_millis(60));
    }
    let _ = server.join();
    Ok(failed)
}

/// What `tcptrace ports` wrote to `ports_out` (its changing tables) and what `doctor` said,
/// then what to notice in them.
fn show_ports_and_doctor(ports_out: &Path, doctor: &Output, failed: u32) -> Result<()> {
    println!(
        "\n════ tcptrace ports (tables that repeat the one before left out) ════\n{}",
        changing_tables(&std::fs::read_to_string(ports_out)?)
    );
    println!(
        "════ tcptrace doctor (exit status {}) ════\n{}",
        doctor.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&doctor.stdout)
    );
    println!(
        "What to notice: {failed} of 40 connects failed. IN_USE climbed toward 20/20 and\n\
         EXHAUSTION counted down before the first failure; doctor calls ip_local_port_range a\n\
         problem and names the destination, but its advice is about who closes first: each of\n\
         those ports sat in this client's TIME_WAIT. tcp_tw_reuse=1 (with timestamps) would let\n\
         new connects take TIME_WAIT ports older than a second; reusing connections avoids\n\
         the TIME_WAIT altogether."
    );
    Ok(())
}
