//! `cargo xtask bench`: what tracing costs, measured side by side on a bounded loopback
//! connection storm (client closes first, 10 transitions per connection), alternating the
//! order of the variants each round and reporting medians.

use std::{
    io::Read as _,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::demo::{Tracer, free_port};

/// Options.
#[derive(clap::Args)]
pub struct Args {
    /// Connections per storm.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=200_000))]
    connections: u64,
    /// Client (and server) threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: u64,
    /// Rounds; each runs every variant once, in alternating order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
}

/// Each storm connects from its own loopback source address, so the TIME_WAIT sockets a
/// storm leaves behind (60 s, on the client side) never hold the ports of the next one.
static STORM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Runs one storm on `port`; returns connections per second.
fn storm(port: u16, conns: u64, workers: u64) -> Result<f64> {
    let source = Ipv4Addr::new(
        127,
        0,
        1,
        STORM.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let (tx, rx) = mpsc::channel::<TcpStream>();
    let rx = Arc::new(Mutex::new(rx));
    let servers: Vec<_> = (0..workers)
        .map(|_| {
            let rx = Arc::clone(&rx);
            thread::spawn(move || {
                let mut buf = [0u8; 16];
                loop {
                    let next = rx
                        .lock()
                        .map_err(|_| ())
                        .and_then(|r| r.recv().map_err(|_| ()));
                    let Ok(mut c) = next else { break };
                    // Wait for the client's FIN, then close: the client closes first.
                    let _ = c.read(&mut buf);
                }
            })
        })
        .collect();
    let start = Instant::now();
    let acceptor = thread::spawn(move || -> Result<()> {
        for _ in 0..conns {
            let (c, _) = listener.accept()?;
            tx.send(c)
                .map_err(|_| anyhow::anyhow!("server workers ended early"))?;
        }
        Ok(())
    });
    let clients: Vec<_> = (0..workers)
        .map(|w| {
            let n = conns / workers + u64::from(w < conns % workers);
            thread::spawn(move || -> Result<()> {
                let to: socket2::SockAddr =
                    std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into();
                let from: socket2::SockAddr = std::net::SocketAddr::from((source, 0)).into();
                for _ in 0..n {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    s.bind(&from)?;
                    s.connect(&to)?;
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
    for s in servers {
        let _ = s.join();
    }
    Ok(conns as f64 / start.elapsed().as_secs_f64())
}

/// CPU seconds (user + system, all threads) of a process, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat
        .rsplit_once(") ")
        .context("unexpected /proc/PID/stat")?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Peak resident memory of a process in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// The median of some numbers.
pub fn median(v: &mut [f64]) -> f64 {
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

struct Traced {
    rate: f64,
    cpu_per_100k: f64,
    rss_mib: f64,
    delivered: u64,
    expected: u64,
}

fn traced_round(bin: &Path, dir: &Path, a: &Args) -> Result<Traced> {
    let port = free_port()?;
    let out = dir.join("stream.json");
    let args = vec!["--json".to_string(), "--port".into(), port.to_string()];
    let mut tracer = Tracer::start(bin, &args, &out)?;
    let pid = tracer.pid().context("tracer pid")?;
    let cpu0 = cpu_seconds(pid)?;
    let rate = storm(port, a.connections, a.workers)?;
    thread::sleep(Duration::from_millis(300));
    let cpu = cpu_seconds(pid)? - cpu0;
    let rss = peak_rss_mib(pid)?;
    tracer.stop()?;
    let text = std::fs::read_to_string(&out)?;
    let delivered = text
        .lines()
        .filter(|l| l.contains(r#""kind":"transition""#))
        .count() as u64;
    // Ten transitions per connection, plus the listener's two.
    let expected = 10 * a.connections + 2;
    Ok(Traced {
        rate,
        cpu_per_100k: cpu / expected as f64 * 100_000.0,
        rss_mib: rss,
        delivered,
        expected,
    })
}

/// The benchmark.
pub fn bench(bin: &Path, a: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmark reads the tracer's CPU time from /proc: run it as root (sudo -E cargo xtask bench)"
        );
    }
    let dir = std::env::temp_dir().join(format!("tcptrace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut base, mut traced) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let traced_first = round % 2 == 1;
        if traced_first {
            traced.push(traced_round(bin, &dir, a)?);
        }
        base.push(storm(free_port()?, a.connections, a.workers)?);
        if !traced_first {
            traced.push(traced_round(bin, &dir, a)?);
        }
        println!(
            "round {}: untraced {:.0} conn/s, traced {:.0} conn/s",
            round + 1,
            base[base.len() - 1],
            traced[traced.len() - 1].rate
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let base_rate = median(&mut base.clone());
    let rate = median(&mut traced.iter().map(|t| t.rate).collect::<Vec<_>>());
    let cpu = median(&mut traced.iter().map(|t| t.cpu_per_100k).collect::<Vec<_>>());
    let rss = traced.iter().map(|t| t.rss_mib).fold(0.0, f64::max);
    let lost: u64 = traced
        .iter()
        .map(|t| t.expected.saturating_sub(t.delivered))
        .sum();
    let ratio = rate / base_rate;
    println!(
        "\nstorm: {} connections × {} rounds, {} workers, loopback, client closes first\n",
        a.connections, a.rounds, a.workers
    );
    println!(
        "{:<28} {:>12} {:>8} {:>14} {:>10} {:>6}",
        "variant", "conn/s", "ratio", "CPU s/100k tr", "peak RSS", "lost"
    );
    println!(
        "{:<28} {:>12.0} {:>8.2} {:>14} {:>10} {:>6}",
        "untraced", base_rate, 1.0, "-", "-", "-"
    );
    println!(
        "{:<28} {:>12.0} {:>8.2} {:>14.3} {:>7.1}MiB {:>6}",
        "tcptrace --json > file", rate, ratio, cpu, rss, lost
    );
    let json = format!(
        "{{\"connections\":{},\"rounds\":{},\"workers\":{},\"untraced_rate\":{base_rate:.1},\
         \"stream_json\":{{\"rate\":{rate:.1},\"ratio\":{ratio:.4},\"cpu_s_per_100k\":{cpu:.4},\
         \"peak_rss_mib\":{rss:.1},\"lost\":{lost}}}}}\n",
        a.connections, a.rounds, a.workers
    );
    let path = crate::root().join("target/bench/result.json");
    std::fs::create_dir_all(path.parent().context("path")?)?;
    std::fs::write(&path, json)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
