//! Root-only, end to end: a real Prometheus server (Debian's `prometheus`, installed by
//! `cargo xtask setup`) scrapes `tcptrace serve` on loopback while connections run, and its
//! HTTP API returns the counts the workload made.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{client_closes_first, free_port, root_or_skip};

/// A child process killed (and reaped) when dropped, whatever the test's outcome.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` on `addr`; the status code and body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    // Prometheus answers API queries in one piece or chunked; a chunked body is de-chunked
    // well enough for JSON by dropping the size lines.
    let body = if reply
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|l| u64::from_str_radix(l.trim(), 16).is_err())
            .collect::<Vec<_>>()
            .join("")
    } else {
        body
    };
    Ok((code, body))
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query, summed over the series it returns (None: no series).
fn query(prom: SocketAddr, q: &str) -> Option<f64> {
    let (code, body) = get(prom, &format!("/api/v1/query?query={}", encode(q))).ok()?;
    assert_eq!(code, 200, "{q}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["status"], "success", "{q}: {body}");
    let series = v["data"]["result"].as_array()?;
    if series.is_empty() {
        return None;
    }
    Some(
        series
            .iter()
            .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
            .sum(),
    )
}

/// Polls `f` until it returns Some or `limit` passes.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_scrapes_the_counts_of_a_workload() {
    if !root_or_skip("prometheus_scrapes_the_counts_of_a_workload") {
        return;
    }
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prometheus is not installed: `cargo xtask setup` installs it (Debian package)");
    }
    const N: usize = 40;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tracer, exporter) = exporter_for(port);
    let dir = Scratch(std::env::temp_dir().join(format!("tcptrace-prom-{}", std::process::id())));
    let (_prometheus, prom) = prometheus_scraping(exporter, &dir.0);
    let prom_log = || std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default();
    wait_for(Duration::from_secs(60), || {
        get(prom, "/-/ready").ok().filter(|(c, _)| *c == 200)
    })
    .unwrap_or_else(|| panic!("Prometheus did not become ready: {}", prom_log()));
    // The target is up before the workload runs.
    wait_for(Duration::from_secs(30), || {
        query(prom, r#"up{job="tcptrace"}"#).filter(|&v| v == 1.0)
    })
    .unwrap_or_else(|| panic!("the exporter is not up in Prometheus: {}", prom_log()));

    // The workload: N connections that the client closes first.
    client_closes_first(&listener, port, N);

    for (q, want) in &expected_series(port, N as f64) {
        let got = wait_for(Duration::from_secs(30), || {
            query(prom, q).filter(|v| v == want)
        });
        assert_eq!(got, Some(*want), "{q}: Prometheus has {:?}", query(prom, q));
    }
    // Nothing was lost on the way, and the tracer's own costs are there.
    // (The loss counter covers the whole host, so only its presence is checked.)
    assert!(query(prom, "tcptrace_lost_events_total").is_some());
    let rss = query(prom, r#"process_resident_memory_bytes{job="tcptrace"}"#).unwrap();
    assert!(rss > 1e6 && rss < 256e6, "RSS {rss}");
    let scrape = query(prom, r#"scrape_duration_seconds{job="tcptrace"}"#).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "prometheus: {N} connections counted; last scrape took {:.1} ms, exporter RSS {:.1} MiB",
        scrape * 1e3,
        rss / (1 << 20) as f64
    );
    drop(tracer);
}

/// `tcptrace serve` on a free port, counting only `port`'s connections, and its address.
fn exporter_for(port: u16) -> (Reaped, SocketAddr) {
    // Reaped at once: a failed check below must not leave the tracer running.
    let mut tracer = Reaped(
        Command::new(env!("CARGO_BIN_EXE_tcptrace"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--port",
                &port.to_string(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(tracer.0.stderr.take().unwrap()).lines();
    let mut exporter: Option<SocketAddr> = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("Serving metrics on http://") {
            exporter = rest.strip_suffix("/metrics").and_then(|a| a.parse().ok());
        }
        if line.starts_with("Tracing") {
            break;
        }
        assert!(!common::says_error(&line), "{line}");
    }
    let exporter = exporter.expect("serve printed its address");
    // Keep reading its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (tracer, exporter)
}

/// Prometheus scraping `exporter` every second, with its storage and log in `dir`, and
/// the address of its API.
fn prometheus_scraping(exporter: SocketAddr, dir: &std::path::Path) -> (Reaped, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tcptrace\n    static_configs:\n      \
             - targets: ['{exporter}']\n"
        ),
    )
    .unwrap();
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let prometheus = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    (prometheus, prom)
}

/// What Prometheus must have stored after `n` connections to `port` that the client closed
/// first: each ended once on either side, the client closed first and holds the TIME_WAIT;
/// the port has a listener, so it has its own label.
fn expected_series(port: u16, n: f64) -> [(String, f64); 6] {
    let p = format!(r#"port="{port}""#);
    [
        (
            format!(r#"tcptrace_closes_total{{{p},role="client",initiator="local",how="fin"}}"#),
            n,
        ),
        (
            format!(r#"tcptrace_closes_total{{{p},role="server",initiator="remote",how="fin"}}"#),
            n,
        ),
        (format!(r#"tcptrace_timewait_entries_total{{{p}}}"#), n),
        (format!(r#"tcptrace_timewait_sockets{{{p}}}"#), n),
        (
            r#"tcptrace_transitions_total{from="SYN_SENT",to="ESTABLISHED"}"#.to_string(),
            n,
        ),
        (
            r#"tcptrace_state_duration_seconds_count{state="SYN_SENT"}"#.to_string(),
            n,
        ),
    ]
}
