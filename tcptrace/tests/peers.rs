//! Root-only: sequences a real peer cannot produce on demand, played by a scripted peer
//! (`peer.py`, Debian's python3-scapy, installed by `cargo xtask setup`) from its own network
//! namespace against a real kernel socket that accepts one connection and closes it first:
//! abort on data in FIN_WAIT1, a reset in TIME_WAIT, a FIN whose TIME_WAIT re-arms the timer
//! into the same timer-wheel bucket (no timer event), and crossing FINs. Traced by the binary
//! as a user runs it; sock_diag judges who holds TIME_WAIT.

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    process::Command,
};

use common::*;

/// Debian's python, which has scapy (a `python3` found first on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

/// Whether scapy runs; fails under CI=true (setup installs python3-scapy).
fn scapy_or_skip(test: &str) -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import scapy.all"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs {PYTHON} with scapy, and CI=true: `cargo xtask setup` installs it");
    }
    eprintln!("SKIPPED {test}: no scapy for {PYTHON}; `cargo xtask setup` installs python3-scapy");
    false
}

/// A device's MAC address, in namespace `ns`.
fn mac(ns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/address"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The server's side of `scenario`, traced: the JSON records of its port, and whether
/// sock_diag listed the server's socket in TIME_WAIT while the peer waited (before any
/// reset it then sends).
fn play(scenario: &str) -> (Vec<serde_json::Value>, bool) {
    let pair = NetPair::new();
    let port = free_port();
    let server = SocketAddr::new(pair.b4, port);
    // The client namespace's kernel knows nothing of the scripted connection: its resets
    // are dropped (the script sends below this hook).
    nft(&pair.a, "add table inet tct");
    nft(
        &pair.a,
        "add chain inet tct out { type filter hook output priority 0; }",
    );
    nft(&pair.a, "add rule inet tct out tcp flags rst drop");
    let p = port.to_string();
    let tracer = start_tracer(&["--json", "--port", &p, "--duration", "5m"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = NetPair::run_in(&pair.b, move || {
        let l = TcpListener::bind(server).unwrap();
        tx.send(()).unwrap();
        // Accepted and closed at once: the server sends the first FIN, as an orphan.
        drop(l.accept().unwrap());
    });
    rx.recv().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peer.py");
    let mut peer = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.a,
            PYTHON,
            script,
            scenario,
            &pair.dev_a,
        ])
        .arg(mac(&pair.b, &pair.dev_b))
        .args([pair.a4.to_string(), pair.b4.to_string()])
        .args(["40000", &p])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the peer waits before its reset: does the kernel list a TIME_WAIT socket?
    let mut in_time_wait = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while peer.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        let sport = format!("sport = :{port}");
        in_time_wait |= !ss(&pair.b, &["-Htan", "state", "time-wait", &sport]).is_empty();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = peer.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the scripted peer: {said}");
    srv.join().unwrap();
    // The kill of a timewait socket is concluded once no re-arm follows it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    (stop_tracer(tracer), in_time_wait)
}

/// [`play`] when the test may run (root, scapy).
fn scenario(test: &str) -> Option<(Vec<serde_json::Value>, bool)> {
    (root_or_skip(test) && scapy_or_skip(test)).then(|| play(test))
}

/// The server's close and its timewait record, if any.
fn server_side(records: &[serde_json::Value]) -> (&serde_json::Value, Option<&serde_json::Value>) {
    let close = records
        .iter()
        .find(|r| r["kind"] == "close" && r["role"] == "server")
        .unwrap_or_else(|| panic!("no server close: {records:#?}"));
    let exit = records.iter().find(|r| r["kind"] == "timewait");
    (close, exit)
}

fn verdict(c: &serde_json::Value) -> (&str, &str, bool) {
    (
        c["initiator"].as_str().unwrap(),
        c["how"].as_str().unwrap(),
        c["timewait"].as_bool().unwrap(),
    )
}

#[test]
fn abort_on_data_in_fin_wait1() {
    let Some((records, in_tw)) = scenario("abort_on_data_in_fin_wait1") else {
        return;
    };
    let (close, exit) = server_side(&records);
    assert_eq!(verdict(close), ("local", "rst_sent", false), "{records:#?}");
    assert!(!in_tw && exit.is_none(), "no TIME_WAIT: {records:#?}");
    if tcptrace::analysis::reason::ResetNames::from_sys()
        .name(0)
        .is_some()
    {
        assert_eq!(close["reason"], "abort_on_data", "{close}");
    }
}

#[test]
fn reset_in_time_wait() {
    let Some((records, in_tw)) = scenario("reset_in_time_wait") else {
        return;
    };
    killed_in_time_wait(&records, in_tw);
}

/// Checks that the server closed first into TIME_WAIT (sock_diag listed it) and that the
/// peer's reset killed its timewait socket in TIME_WAIT; returns that socket's record.
fn killed_in_time_wait(records: &[serde_json::Value], in_tw: bool) -> &serde_json::Value {
    let (close, exit) = server_side(records);
    assert!(in_tw, "sock_diag listed the TIME_WAIT socket");
    assert_eq!(verdict(close), ("local", "fin", true), "{records:#?}");
    let exit = exit.unwrap_or_else(|| panic!("the reset's kill: {records:#?}"));
    assert_eq!(
        (&exit["end"], &exit["substate"]),
        (&"killed".into(), &"TIME_WAIT".into()),
        "{exit}"
    );
    exit
}

/// How many times `fin_in_the_same_bucket` plays its scenario for one silent re-arm.
const SAME_BUCKET_TRIES: usize = 3;

/// The timewait socket is created in FIN_WAIT2 and moved to TIME_WAIT with no timer event:
/// its substate, read when it ends, says TIME_WAIT. The peer's FIN follows the ACK at once,
/// but a bucket 2 s wide still has an edge: the few times the re-arm crosses one, the kernel
/// reports it (`rearms` 1, what the other tests check) and the scenario is played again.
#[test]
fn fin_in_the_same_bucket() {
    for _ in 0..SAME_BUCKET_TRIES {
        let Some((records, in_tw)) = scenario("fin_in_the_same_bucket") else {
            return;
        };
        let exit = killed_in_time_wait(&records, in_tw);
        match exit["rearms"].as_u64() {
            Some(0) => return,
            Some(1) => eprintln!("the re-arm crossed a bucket edge, played again: {exit}"),
            _ => panic!("one re-arm at most: {exit}"),
        }
    }
    panic!("no re-arm in {SAME_BUCKET_TRIES} tries stayed in its bucket");
}

#[test]
fn crossing_fins() {
    let Some((records, in_tw)) = scenario("crossing_fins") else {
        return;
    };
    let (close, _) = server_side(&records);
    assert!(in_tw, "sock_diag listed the TIME_WAIT socket");
    assert_eq!(
        verdict(close),
        ("simultaneous", "fin", true),
        "{records:#?}"
    );
}
