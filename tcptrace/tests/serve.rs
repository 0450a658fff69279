//! `tcptrace serve` over HTTP, without root: a recording replayed into the exporter, then
//! scraped as Prometheus would, and the errors an operator can make.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tcptrace::{
    model::event::{State, Transition, encode},
    source::record::Writer,
};

const SEC: u64 = 1_000_000_000;

/// `n` connections from 10.0.0.5 to this host's :8080, each closed first by the server (so
/// the server holds the TIME_WAIT), seen from both ends.
fn server_closes(n: u64) -> Vec<tcptrace::model::event::RawEvent> {
    use State::*;
    let server: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    let mut events = Vec::new();
    for i in 0..n {
        let client: SocketAddr = format!("10.0.0.9:{}", 40000 + i).parse().unwrap();
        let (c, s) = (0x1000 + 2 * i, 0x1001 + 2 * i);
        let ts = SEC + i * 10_000_000;
        let t = |ts: u64, sk: u64, local, remote, from, to| {
            encode(&Transition {
                ts_ns: ts,
                skaddr: sk,
                local,
                remote,
                from,
                to,
                in_from_ns: Some(100_000),
                owner: None,
                mptcp: false,
                netns: None,
                cgroup: None,
            })
        };
        events.extend([
            t(ts, c, client, server, Close, SynSent),
            t(ts + 10, s, server, client, Listen, SynRecv),
            t(ts + 20, c, client, server, SynSent, Established),
            t(ts + 30, s, server, client, SynRecv, Established),
            t(ts + 1000, s, server, client, Established, FinWait1),
            t(ts + 1010, c, client, server, Established, CloseWait),
            t(ts + 1020, s, server, client, FinWait1, FinWait2),
            t(ts + 1030, c, client, server, CloseWait, LastAck),
            t(ts + 1040, s, server, client, FinWait2, TimeWait),
            t(ts + 1050, c, client, server, LastAck, Close),
        ]);
    }
    events
}

/// A running `tcptrace serve`, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Replays `events` and serves their counts on a free loopback port.
    fn replaying(events: &[tcptrace::model::event::RawEvent]) -> Server {
        let path = std::env::temp_dir().join(format!(
            "tcptrace-serve-{}-{:?}.tcptrace",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut w = Writer::new(std::fs::File::create(&path).unwrap(), 0, 0).unwrap();
        w.write(events).unwrap();
        w.flush().unwrap();
        drop(w);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
            .args(["serve", "--listen", "127.0.0.1:0", "--from"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addr = None;
        // The address first, then word that the recording is replayed.
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("Serving metrics on http://") {
                addr = rest.strip_suffix("/metrics").map(|a| a.parse().unwrap());
            }
            if line.contains("replayed") {
                break;
            }
            assert!(!line.contains("error"), "{line}");
        }
        std::fs::remove_file(&path).ok();
        Server {
            child,
            addr: addr.expect("serve printed its address"),
        }
    }

    /// One request, its status line, headers and body.
    fn request(&self, head: &str) -> (String, String, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "{head}\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let (top, body) = reply.split_once("\r\n\r\n").unwrap();
        let (status, headers) = top.split_once("\r\n").unwrap_or((top, ""));
        (status.into(), headers.to_ascii_lowercase(), body.into())
    }

    /// Stops it; its exit code.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let code = self.child.wait().unwrap().code();
        std::mem::forget(self);
        code
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn scrapes_get_the_counts_in_either_format() {
    let n = 7;
    let server = Server::replaying(&server_closes(n));

    let (status, headers, body) = server.request("GET /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    // The server end closed first and entered TIME_WAIT; each client end saw the peer's
    // FIN first. 8080 has a listener, so it has its own label.
    let closes = |labels: &str| value(&body, &format!("tcptrace_closes_total{{{labels}}}"));
    assert_eq!(
        closes(r#"port="8080",role="server",initiator="local",how="fin""#),
        Some(n as f64),
        "{body}"
    );
    assert_eq!(
        closes(r#"port="8080",role="client",initiator="remote",how="fin""#),
        Some(n as f64)
    );
    assert_eq!(
        value(&body, r#"tcptrace_timewait_entries_total{port="8080"}"#),
        Some(n as f64)
    );
    assert_eq!(
        value(
            &body,
            r#"tcptrace_transitions_total{from="FIN_WAIT2",to="TIME_WAIT"}"#
        ),
        Some(n as f64)
    );
    // The tracer's own costs are there, and plausible.
    let rss = value(&body, "process_resident_memory_bytes").expect("RSS");
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    assert!(value(&body, "process_cpu_seconds_total").is_some_and(|c| c >= 0.0));

    // A Prometheus that asks for OpenMetrics gets it, ending with # EOF.
    let (_, headers, body) = server.request(
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    );
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert!(body.contains(r#"tcptrace_timewait_entries_total{port="8080"} 7"#));

    let (status, _, body) = server.request("HEAD /metrics HTTP/1.1");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    let (status, _, body) = server.request("GET /nothing HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(body.contains("/metrics"), "{body}");
    let (status, headers, _) = server.request("POST /metrics HTTP/1.1\r\nContent-Length: 0");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("allow: get, head"), "{headers}");

    assert_eq!(server.stop(), Some(0), "SIGTERM ends serve cleanly");
}

#[test]
fn a_taken_port_is_reported_before_anything_is_loaded() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // No root needed: the port is bound before the probe is loaded.
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["serve", "--listen", &addr])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("--listen"), "a hint: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
