//! Root-only: `tcptrace top` in a real terminal (a detached tmux session), tracing loopback
//! connections — the rows, who closes first and the TIME_WAIT held, the most pressed
//! destinations, the keys, and the terminal as it was after `q`.

mod common;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// The terminal's size.
const TERMINAL_COLUMNS: u16 = 160;
const TERMINAL_LINES: u16 = 45;
/// The longest wait for the screen to show something (the tracer's start included).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the screen is read while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Connections whose client closes first, on the first port; whose server does, on the
/// second.
const CLIENT_CLOSES: u64 = 50;
const SERVER_CLOSES: u64 = 20;
/// The age pane's buckets.
const AGE_LABELS: [&str; 5] = ["<1s", "1-10s", "10-30s", "30-60s", ">60s"];

/// A tmux server of its own, with one session running a command; killed when dropped (the
/// test passed or not).
struct Tmux {
    socket: String,
    session: &'static str,
    /// The server's socket file, which outlives the server.
    socket_path: std::path::PathBuf,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let mut tmux = Tmux {
            socket: format!("tcptrace-top-{}", std::process::id()),
            session: "top",
            socket_path: Default::default(),
        };
        let size = [TERMINAL_COLUMNS.to_string(), TERMINAL_LINES.to_string()];
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            tmux.session,
            "-x",
            &size[0],
            "-y",
            &size[1],
            command,
        ]);
        let path = tmux.run(&["display-message", "-p", "#{socket_path}"]);
        tmux.socket_path = path.trim().into();
        tmux
    }

    /// Runs a tmux command on this server; its output.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", self.session])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", self.session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Whether the pane shows the alternate screen.
    fn alternate_screen(&self) -> bool {
        self.run(&[
            "display-message",
            "-p",
            "-t",
            self.session,
            "#{alternate_on}",
        ])
        .trim()
            == "1"
    }

    /// The screen once `ready` says so; fails showing it after [`SCREEN_TIMEOUT`].
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < SCREEN_TIMEOUT,
                "waited {SCREEN_TIMEOUT:?} for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
        if !self.socket_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}

/// One row of the table as drawn.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    port: u16,
    dir: String,
    closed: u64,
    local: String,
    remote: String,
    resets: u64,
    timewait: u64,
}

/// The table's rows, in order: lines such as `│:8080   out   0.0   50   100%   0%   0   50 …`.
fn rows(screen: &str) -> Vec<Row> {
    screen
        .lines()
        .filter_map(|l| l.trim_start_matches('│').strip_prefix(':'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Row {
                port: f[0].parse().unwrap(),
                dir: f[1].into(),
                closed: f[3].parse().unwrap(),
                local: f[4].into(),
                remote: f[5].into(),
                resets: f[6].parse().unwrap(),
                timewait: f[7].parse().unwrap(),
            }
        })
        .collect()
}

/// The rows' (port, direction), in order.
fn order(screen: &str) -> Vec<(u16, String)> {
    rows(screen).into_iter().map(|r| (r.port, r.dir)).collect()
}

/// The TIME_WAIT sockets of each age bucket, from lines such as `│1-10s      70 ████`.
fn ages(screen: &str) -> Vec<(String, u64)> {
    screen
        .lines()
        .filter_map(|l| {
            let mut f = l.trim_start_matches('│').split_whitespace();
            let label = f.next()?;
            let n = f.next()?.parse().ok()?;
            AGE_LABELS.contains(&label).then(|| (label.to_string(), n))
        })
        .collect()
}

/// The pressed pane's line of destination 127.0.0.1:`port` (from 127.0.0.1): its ports held
/// and TIME_WAIT, from `│127.0.0.1:8080 from 127.0.0.1 [4026531840]   50/28232   50   0.2% …`.
fn pressed(screen: &str, port: u16) -> Option<(u64, u64)> {
    let dest = format!("127.0.0.1:{port} from 127.0.0.1");
    let line = screen
        .lines()
        .find(|l| l.trim_start_matches('│').starts_with(&dest))?;
    let mut f = line.split_whitespace().skip_while(|w| !w.contains('/'));
    let in_use = f.next()?.split('/').next()?.parse().ok()?;
    let timewait = f.next()?.parse().ok()?;
    Some((in_use, timewait))
}

/// `n` connections to 127.0.0.1:`port` on `listener`, each closed first by the server (the
/// client reads its FIN, then closes).
fn server_closes_first(listener: &TcpListener, port: u16, n: u64) {
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = listener.accept().unwrap();
        drop(s);
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0, "the server closes first");
    }
}

fn row<'a>(rows: &'a [Row], port: u16, dir: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.port == port && r.dir == dir)
        .unwrap_or_else(|| panic!("no row :{port} {dir} in {rows:#?}"))
}

#[test]
fn top_in_a_terminal_shows_the_rows_sorts_filters_and_restores_the_terminal() {
    if !root_or_skip("top_in_a_terminal_shows_the_rows_sorts_filters_and_restores_the_terminal") {
        return;
    }
    let (p, q) = (free_port(), free_port());
    let tmux = Tmux::start(&format!(
        "sh -c '{} top --port {p},{q} --interval 1s; echo top-exited=$?; sleep 60'",
        env!("CARGO_BIN_EXE_tcptrace")
    ));
    tmux.wait_for("the first screen", |s| s.contains("per service port"));
    assert!(tmux.alternate_screen(), "top draws on the alternate screen");

    let (lp, lq) = (
        TcpListener::bind(("127.0.0.1", p)).unwrap(),
        TcpListener::bind(("127.0.0.1", q)).unwrap(),
    );
    client_closes_first(&lp, p, CLIENT_CLOSES as usize);
    server_closes_first(&lq, q, SERVER_CLOSES);
    let total = 2 * (CLIENT_CLOSES + SERVER_CLOSES);
    let held = CLIENT_CLOSES + SERVER_CLOSES;
    let screen = tmux.wait_for("every close and TIME_WAIT counted", |s| {
        s.contains(&format!("({total} total)")) && s.contains(&format!("TIME_WAIT {held} "))
    });

    // Both ends of each connection are on this host: the client's row (out) and the
    // server's (in); only the side that closed first holds TIME_WAIT.
    let r = rows(&screen);
    for (port, dir, closed, local, remote, timewait) in [
        (p, "out", CLIENT_CLOSES, "100%", "0%", CLIENT_CLOSES),
        (p, "in", CLIENT_CLOSES, "0%", "100%", 0),
        (q, "in", SERVER_CLOSES, "100%", "0%", SERVER_CLOSES),
        (q, "out", SERVER_CLOSES, "0%", "100%", 0),
    ] {
        let want = Row {
            port,
            dir: dir.into(),
            closed,
            local: local.into(),
            remote: remote.into(),
            resets: 0,
            timewait,
        };
        assert_eq!(row(&r, port, dir), &want, "{screen}");
    }
    assert_eq!(r.len(), 4, "only the two ports: {screen}");
    // Sorted by TIME_WAIT held, then by connections closed.
    let by_timewait =
        [(p, "out"), (q, "in"), (p, "in"), (q, "out")].map(|(port, dir)| (port, dir.to_string()));
    assert_eq!(order(&screen), by_timewait, "{screen}");
    // Every TIME_WAIT socket is seconds old.
    let young: u64 = ages(&screen)
        .iter()
        .filter(|(label, _)| label == "<1s" || label == "1-10s")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(young, held, "{screen}");

    // The clients' connects toward :p each hold a local port, in TIME_WAIT now.
    let screen = tmux.wait_for("the pressed destination", |s| {
        pressed(s, p) == Some((CLIENT_CLOSES, CLIENT_CLOSES))
    });
    assert!(screen.contains("most pressed destinations"), "{screen}");

    tmux.keys(&["p"]);
    let mut by_port = by_timewait.to_vec();
    by_port.sort();
    let screen = tmux.wait_for("the rows sorted by port", |s| order(s) == by_port);
    assert!(screen.contains("sorted by port"), "{screen}");

    tmux.keys(&["/"]);
    tmux.keys(&[&q.to_string(), "Enter"]);
    let screen = tmux.wait_for("the rows of one port", |s| {
        order(s).iter().all(|(port, _)| *port == q) && rows(s).len() == 2
    });
    assert!(screen.contains(&format!(":{q} only")), "{screen}");

    tmux.keys(&["q"]);
    let screen = tmux.wait_for("top to end", |s| s.contains("top-exited="));
    assert!(screen.contains("top-exited=0"), "{screen}");
    assert!(!tmux.alternate_screen(), "the alternate screen is left");
    assert!(
        !screen.contains("per service port"),
        "the view is gone with the alternate screen: {screen}"
    );
    assert!(
        screen.contains("tcptrace: ") && screen.contains("events read"),
        "the tracer's last words on the normal screen: {screen}"
    );
}
