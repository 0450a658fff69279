//! Root-only, in a test binary of its own so that no other test's connections run meanwhile:
//! transitions that the kernel makes while the same program is already running on that CPU
//! (a softirq interrupting a task's transition) are skipped by the kernel — and every one is
//! counted. Under a storm whose packets are processed on the other CPU too (RPS on the veth
//! devices: inter-processor interrupts run the receive path on top of whatever runs there),
//! the transitions delivered plus those counted lost are exactly the transitions made.
//!
//! What "made" is comes from the transitions themselves: each socket's lives chain (every
//! transition leaves the state the previous one entered), so a missing one shows; a storm
//! connection's side takes five, and the kernel sometimes takes another path (a child
//! socket created for a duplicate SYN and dropped: LISTEN→SYN_RECV→CLOSE), which counts as
//! what it is.

mod common;

use std::{
    collections::HashMap,
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
use tcptrace::event::{Event, State, Transition, decode};

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
    let mut uncounted = 0;
    for round in 0..ROUNDS {
        let port = 21_000 + round as u16 + (std::process::id() % 1000) as u16;
        // Without the timewait timers, so the count of events to expect is exact.
        let mut probe = probe_with(&[port], 16 << 20, false);
        storm(&pair, port);
        // Every connection ends before the count is taken: a server whose last ACK was
        // dropped in the storm sits in LAST_ACK until its FIN is retransmitted and answered
        // (the kernel's sock_diag says when none is left).
        let settled = Instant::now() + Duration::from_secs(30);
        while [&pair.a, &pair.b]
            .iter()
            .any(|ns| open_sockets(ns, port) > 0)
        {
            assert!(
                Instant::now() < settled,
                "connections on :{port} never ended"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (mut delivered, mut lost) = (0u64, 0u64);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Drained until the count is whole (or 10 s pass).
        let mut expected = 2 + 10 * CONNS;
        while delivered + lost < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let mut raw = Vec::new();
            probe.drain_final(&mut raw);
            for r in &raw {
                match decode(r).unwrap() {
                    Event::Transition(t) => {
                        delivered += 1;
                        seen.push(t);
                    }
                    Event::Lost { count, .. } => lost += count,
                    // A listener may answer a stray segment of a storm with a reset; resets
                    // are not transitions and change none of these connections' ten.
                    Event::Reset(_) => {}
                    Event::Timer(t) => panic!("timers are not traced here: {t:?}"),
                    // Written with each end transition, in its entry: not an event of its own.
                    Event::Details(_) => {}
                    e @ (Event::Connection(_) | Event::Part(_)) => {
                        panic!("connection records were not asked for: {e:?}")
                    }
                }
            }
            expected = made(&seen).total;
        }
        let made = made(&seen);
        let (nested, caught) = (probe.missed_runs(), probe.caught_total());
        eprintln!(
            "round {round}: {delivered} delivered + {lost} lost of {expected} \
             ({nested} runs skipped by the kernel as nested, {caught} of them taken over)"
        );
        assert!(caught <= nested, "only skipped runs are taken over");
        if !made.other.is_empty() || made.broken > 0 {
            eprintln!(
                "round {round}: {} broken lives (first: {:?}), other paths: {:?}",
                made.broken, made.broken_paths, made.other
            );
        }
        assert_eq!(
            made.canonical,
            2 * CONNS,
            "round {round}: every connection's two sides, whole or broken"
        );
        // Every transition is delivered or counted lost, never more. A run of transitions
        // that the kernel ran no program for is found by the gap it leaves in the socket's
        // storage, which tells that something was missed, not how much: such a run counts
        // one, and the rest of it is `made.unsayable`.
        assert!(
            delivered + lost <= expected,
            "round {round}: delivered {delivered} + lost {lost} of {expected}"
        );
        if delivered + lost + made.unsayable < expected {
            // The open defect (#16): about one round in twenty-five here under load, a batch
            // of clients' FIN_WAIT1→FIN_WAIT2 and entries into TIME_WAIT (one softirq's
            // work) reach no program, not even the one on socket destruction, and no
            // program counts a miss; ftrace records them, perf misses them too. Shown, and
            // the round is run again; twice fails.
            uncounted += 1;
            eprintln!(
                "round {round}: {} transitions neither delivered nor counted",
                expected - delivered - lost - made.unsayable
            );
            assert!(
                uncounted < 2,
                "transitions went uncounted in {uncounted} rounds"
            );
            continue;
        }
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

/// Sockets on `port` in namespace `ns` that are neither listening nor in TIME_WAIT (their
/// connection has not ended), as the kernel's sock_diag lists them.
fn open_sockets(ns: &str, port: u16) -> usize {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let args = [
        "-Htan",
        "exclude",
        "time-wait",
        "exclude",
        "listening",
        &filter,
    ];
    common::ss(ns, &args).lines().count()
}

/// The transitions the storm made, as far as the delivered ones tell.
struct Made {
    /// Transitions made: the listener's two, five for each storm connection's side (whole
    /// or broken), and those of every other whole path the kernel took.
    total: u64,
    /// Lives of a storm connection's side: a socket's five steps, or a broken life.
    canonical: u64,
    /// Lives whose transitions do not chain (one or more missing).
    broken: u64,
    /// Transitions missing from broken lives beyond one per life: a gap in a socket's
    /// storage tells the kernel that transitions were missed, not how many.
    unsayable: u64,
    /// The first few of them.
    broken_paths: Vec<Vec<(State, State)>>,
    /// Whole paths other than the storm's, as the kernel took them.
    other: Vec<Vec<(State, State)>>,
}

/// Splits each socket's transitions into lives (a birth starts one; so does any transition
/// after an end) and counts what they made.
fn made(seen: &[Transition]) -> Made {
    let mut lives: HashMap<u64, Vec<Vec<(State, State)>>> = HashMap::new();
    for t in seen {
        let sk = lives.entry(t.skaddr).or_default();
        let born = matches!(
            (t.from, t.to),
            (State::Close, State::SynSent | State::Listen) | (State::Listen, State::SynRecv)
        );
        let ended = sk
            .last()
            .and_then(|l| l.last())
            .is_none_or(|s| matches!(s.1, State::Close | State::TimeWait));
        if born || ended {
            sk.push(Vec::new());
        }
        sk.last_mut().unwrap().push((t.from, t.to));
    }
    let mut m = Made {
        total: 0,
        canonical: 0,
        broken: 0,
        unsayable: 0,
        broken_paths: Vec::new(),
        other: Vec::new(),
    };
    for life in lives.into_values().flatten() {
        let chained = life.windows(2).all(|w| w[0].1 == w[1].0);
        let whole = chained
            && matches!(life[0].0, State::Close | State::Listen)
            && matches!(life[life.len() - 1].1, State::Close | State::TimeWait);
        let listener = life[0] == (State::Close, State::Listen);
        if listener || (whole && life.len() == 5) {
            m.total += life.len() as u64;
            m.canonical += u64::from(!listener);
        } else if whole {
            m.total += life.len() as u64;
            m.other.push(life);
        } else {
            m.total += 5;
            m.canonical += 1;
            m.broken += 1;
            m.unsayable += 4u64.saturating_sub(life.len() as u64);
            if m.broken_paths.len() < 5 {
                m.broken_paths.push(life);
            }
        }
    }
    m
}
