//! Root-only, in a test binary of its own so that no other test's connections run meanwhile:
//! transitions that the kernel makes while the same program is already running on that CPU
//! (a softirq interrupting a task's transition) are skipped by the kernel — and every one is
//! counted. Under a storm whose packets are processed on the other CPU too (RPS on the veth
//! devices: inter-processor interrupts run the receive path on top of whatever runs there),
//! the transitions delivered plus those counted lost are exactly the transitions made.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{NetPair, probe_with, root_or_skip};
use tcptrace::event::{Event, decode};

/// Connections per round: well inside the client namespace's 28,232 ephemeral ports.
const CONNS: u64 = 6_000;
/// Client threads (the server namespace runs as many acceptors).
const THREADS: u64 = 4;
/// At most this many rounds, until one saw the kernel skip a nested run.
const ROUNDS: usize = 4;

/// Spreads a device's receive processing over every CPU (best effort: a kernel without RPS
/// simply nests less often).
fn rps_on(ns: &str, dev: &str) {
    let _ = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!(
            "echo ff > /sys/class/net/{dev}/queues/rx-0/rps_cpus"
        ))
        .status();
}

/// `CONNS` connections from namespace a to b, each closed first by the client after the
/// server accepted it; ten transitions each.
fn storm(pair: &NetPair, port: u16) {
    let addr = SocketAddr::new(pair.b4, port);
    // Bound inside namespace b; the acceptors need not be there.
    let listener = NetPair::run_in(&pair.b, move || TcpListener::bind(addr).unwrap())
        .join()
        .unwrap();
    let listener = Arc::new(listener);
    let accepted = Arc::new(AtomicU64::new(0));
    let servers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (l, n) = (listener.clone(), accepted.clone());
            std::thread::spawn(move || {
                while n.fetch_add(1, Ordering::Relaxed) < CONNS {
                    let (mut s, _) = l.accept().unwrap();
                    let mut b = [0u8; 1];
                    assert_eq!(s.read(&mut b).unwrap(), 0, "the client closes first");
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..THREADS)
        .map(|_| {
            NetPair::run_in(&pair.a, move || {
                for _ in 0..CONNS / THREADS {
                    drop(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    for s in servers {
        s.join().unwrap();
    }
    drop(listener);
}

#[test]
fn nested_transitions_are_delivered_or_counted_exactly() {
    if !root_or_skip("nested_transitions_are_delivered_or_counted_exactly") {
        return;
    }
    let pair = NetPair::new();
    rps_on(&pair.a, &pair.dev_a);
    rps_on(&pair.b, &pair.dev_b);
    for round in 0..ROUNDS {
        let port = 21_000 + round as u16 + (std::process::id() % 1000) as u16;
        // Without the timewait timers, so the count of events to expect is exact.
        let mut probe = probe_with(&[port], 16 << 20, false);
        storm(&pair, port);
        let expected = 2 + 10 * CONNS;
        let (mut delivered, mut lost) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(10);
        while delivered + lost < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let mut raw = Vec::new();
            probe.drain_final(&mut raw);
            for r in &raw {
                match decode(r).unwrap() {
                    Event::Transition(_) => delivered += 1,
                    Event::Lost { count, .. } => lost += count,
                    // A listener may answer a stray segment of a storm with a reset; resets
                    // are not transitions and change none of these connections' ten.
                    Event::Reset(_) => {}
                    Event::Timer(t) => panic!("timers are not traced here: {t:?}"),
                }
            }
        }
        let (nested, caught) = (probe.missed_runs(), probe.caught_total());
        eprintln!(
            "round {round}: {delivered} delivered + {lost} lost of {expected} \
             ({nested} runs skipped by the kernel as nested, {caught} of them taken over)"
        );
        assert!(caught <= nested, "only skipped runs are taken over");
        assert_eq!(
            delivered + lost,
            expected,
            "round {round}: delivered {delivered} + lost {lost}"
        );
        assert_eq!(probe.lost_total(), lost, "every loss was reported");
        if nested > 0 {
            // Without the copy every nested run would be counted lost, and the sum above
            // would hold all the same: the copy must have taken some over.
            assert!(caught > 0, "the nested copy took none of {nested} over");
            return;
        }
    }
    panic!(
        "no run was nested in {ROUNDS} rounds of {CONNS} connections: the exact counts held, \
         but the kernel's skipping was not provoked, so the nested copy was not tested"
    );
}
