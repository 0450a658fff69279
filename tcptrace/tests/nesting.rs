//! Root-only, in a test binary of its own: transitions that the kernel makes while the same
//! program is already running on that CPU (a softirq interrupting a task's transition) are
//! skipped by the kernel — and every one is taken over by the program's nested copy or
//! counted lost. Under a storm whose packets are processed on the other CPU too (RPS on the
//! veth devices: inter-processor interrupts run the receive path on top of whatever runs
//! there), thousands of runs nest.
//!
//! The judge is the kernel's own count: every time it called the transition program, the
//! program either ran (`bpf_prog_info.run_cnt`, and wrote the transition) or was skipped
//! (`recursion_misses`, and the copy took it over or it is counted lost). So the transitions
//! delivered are exactly the runs plus those taken over, and the losses reported exactly the
//! skipped runs not taken over — whatever else the host does meanwhile.
//!
//! What the kernel called no program for at all, no program can count: the lives the
//! delivered transitions show (each socket's transitions chain, a storm connection's side
//! takes five) estimate it, and the test shows it.

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
use tcptrace::{
    model::event::{Event, State, Transition, decode},
    source::probe::{Probe, RunCounts},
};

/// Connections per round: well inside the client namespace's 28,232 ephemeral ports.
const CONNS: u64 = 6_000;
/// Client threads (the server namespace runs as many acceptors).
const THREADS: u64 = 4;
/// At most this many rounds, until one saw the kernel skip a nested run.
const ROUNDS: usize = 4;

/// Held by each test for its whole run: two storms at once would load the host twice over,
/// and the judges count what each tracer's programs did while the other's ran too.
static ONE_STORM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What both tests start with (None when `test` is skipped): their turn, and a pair of
/// namespaces whose receive work is spread over every CPU.
fn storm_pair(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, NetPair)> {
    if !root_or_skip(test) {
        return None;
    }
    // A test that failed while holding it poisons it: the next one runs all the same.
    let alone = ONE_STORM_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pair = NetPair::new();
    rps_on(&pair.a, &pair.dev_a);
    rps_on(&pair.b, &pair.dev_b);
    Some((alone, pair))
}

/// Spreads a device's receive processing over every CPU (best effort: a kernel without RPS
/// simply nests less often).
fn rps_on(ns: &str, dev: &str) {
    // Every CPU this test may run on (a mask naming absent CPUs is refused).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(32));
    let mask = (1u64 << cpus) - 1;
    let _ = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!(
            "echo {mask:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus"
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
    let Some((_alone, pair)) = storm_pair("nested_transitions_are_delivered_or_counted_exactly")
    else {
        return;
    };
    // The kernel counts the transition program's runs only while its statistics are on.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .expect("the kernel's BPF run statistics turn on (BPF_ENABLE_STATS, Linux 5.8+)");
    for round in 0..ROUNDS {
        let port = 21_000 + round as u16 + (std::process::id() % 1000) as u16;
        // Every port (the judge below counts every run of the program), without the
        // timewait timers, so the count of events to expect is exact.
        let mut probe = probe_with(&[], 16 << 20, false);
        storm(&pair, port);
        settle(&pair, port);
        let r = drain_and_judge(&mut probe, port, round);
        assert_eq!(probe.lost_total(), r.lost, "every loss was reported");
        let (nested, caught) = (probe.missed_runs(), probe.caught_total());
        assert!(caught <= nested, "only skipped runs are taken over");
        let twice = delivered_twice(&r.seen);
        assert!(
            twice.is_empty(),
            "round {round}: {} transitions delivered twice, first: {:?}",
            twice.len(),
            twice.first()
        );
        let made = made(&r.seen);
        let delivered = r.seen.len() as u64;
        eprintln!(
            "round {round}: {delivered} delivered + {} lost; the lives they show made about {} \
             ({nested} runs skipped by the kernel as nested, {caught} of them taken over)",
            r.lost, made.total
        );
        if !made.other.is_empty() || made.broken > 0 {
            eprintln!(
                "round {round}: {} broken lives (first: {:?}), other paths: {:?}",
                made.broken, made.broken_paths, made.other
            );
        }
        // What the kernel called no program for at all (neither copy ran, none was skipped:
        // the judge above holds) no program can count. A run of them in one socket's life
        // is found by the gap it leaves in its storage, which tells that something was
        // missed, not how much (`made.unsayable`). Seen about one round in fifteen here, in
        // batches (one softirq's work): shown, and the subject of issue #16's note.
        let undispatched = made
            .total
            .saturating_sub(delivered + r.lost + made.unsayable);
        if undispatched > 0 {
            eprintln!(
                "round {round}: about {undispatched} of the storm's transitions had no program \
                 called (the kernel's counts: {} runs, {} skipped as nested)",
                r.runs.runs, r.runs.misses
            );
        }
        if nested > 0 {
            // Without the copy every nested run would be counted lost, and the sums above
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

/// The views that show no time per state leave the middle transitions out in the kernel
/// (`report`, `timewait`): those are the packet-driven ones, the likeliest to arrive in a
/// softirq on top of a task's transition. One the kernel skipped there was left out anyway:
/// its miss is taken over (by doing nothing), never reported lost.
#[test]
fn nested_middle_transitions_left_out_are_no_loss() {
    let Some((_alone, pair)) = storm_pair("nested_middle_transitions_left_out_are_no_loss") else {
        return;
    };
    for round in 0..ROUNDS {
        let port = 23_000 + round as u16 + (std::process::id() % 1000) as u16;
        let mut probe = common::timeless_probe_for_ports(&[port], 16 << 20, false);
        storm(&pair, port);
        settle(&pair, port);
        let records = common::collect_record_closes(&mut probe, 2 * CONNS as usize).len();
        let (nested, caught) = (probe.missed_runs(), probe.caught_total());
        let left_out = probe.caught_left_out();
        eprintln!(
            "round {round}: {records} of {} connection records; {nested} runs skipped by the \
             kernel as nested, {caught} taken over ({left_out} of them left out); {} lost",
            2 * CONNS,
            probe.lost_total()
        );
        assert!(caught <= nested, "only skipped runs are taken over");
        // What stays uncounted is what the nested copy cannot tell from a run: a skip in the
        // kernel's own entry or exit around a run (no mark yet, or no more), of a left-out
        // transition or of a socket with no storage yet. Before the left-out ones were taken
        // over, about a third of the skips here were reported lost; now a few in a hundred.
        if left_out > 0 {
            return;
        }
    }
    panic!(
        "no left-out transition was nested in {ROUNDS} rounds of {CONNS} connections: their \
         misses were not provoked"
    );
}

/// Waits until every connection on `port` has ended: a server whose last ACK was dropped
/// in the storm sits in LAST_ACK until its FIN is retransmitted and answered (the kernel's
/// sock_diag says when none is left).
fn settle(pair: &NetPair, port: u16) {
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
}

/// What a round delivered.
struct Drained {
    /// The storm's transitions (on `port`).
    seen: Vec<Transition>,
    /// Events counted lost.
    lost: u64,
    /// The kernel's counts of the transition program when the drain began.
    runs: RunCounts,
}

/// Drains everything the probe holds, and judges it by the kernel's own counts: every run
/// of the transition program (which keeps every port here) wrote its transition, and so did
/// every run its nested copy took over — no more, no fewer, whatever other sockets of the
/// host did meanwhile (their transitions are counted, then set aside).
fn drain_and_judge(probe: &mut Probe, port: u16, round: usize) -> Drained {
    let before = probe
        .transition_runs()
        .expect("the kernel counts the program's runs");
    let caught_before = probe.caught_total();
    // A run is counted when it returns, after its record was written: the drain below sees
    // every record of the runs counted above.
    std::thread::sleep(Duration::from_millis(50));
    let (mut all, mut lost) = (0u64, 0u64);
    let mut seen = Vec::new();
    let mut raw = Vec::new();
    probe.drain_final(&mut raw);
    for r in &raw {
        match decode(r).unwrap() {
            Event::Transition(t) => {
                all += 1;
                if t.local.port() == port || t.remote.port() == port {
                    seen.push(t);
                }
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
    // A run whose record was drained has returned (and is counted) by then.
    std::thread::sleep(Duration::from_millis(50));
    let after = probe
        .transition_runs()
        .expect("the kernel counts the program's runs");
    // A run that found the ring buffer full wrote nothing (counted lost, never here with
    // 16 MiB and a drained ring, but so that the judge stays true).
    let (low, high) = (
        (before.runs + caught_before).saturating_sub(probe.ring_full_total()),
        after.runs + probe.caught_total(),
    );
    assert!(
        (low..=high).contains(&all),
        "round {round}: {all} transitions delivered, but the kernel ran the program (or \
         its nested copy took over) {low} times before the drain and {high} after"
    );
    Drained {
        seen,
        lost,
        runs: before,
    }
}

/// A transition delivered twice (by the program and by its nested copy) is the same
/// socket's same step, next to itself in the socket's order, microseconds apart: a socket
/// address reused for another connection takes far longer to make that step again.
fn delivered_twice(seen: &[Transition]) -> Vec<(u64, State, State)> {
    /// Apart by less than this, one step is one transition.
    const SAME_STEP_NS: u64 = 100_000;
    let mut last: HashMap<u64, &Transition> = HashMap::new();
    let mut twice = Vec::new();
    for t in seen {
        if let Some(p) = last.insert(t.skaddr, t)
            && (p.from, p.to) == (t.from, t.to)
            && t.ts_ns.abs_diff(p.ts_ns) < SAME_STEP_NS
        {
            twice.push((t.skaddr, t.from, t.to));
        }
    }
    twice
}

/// How far along a connection's course a transition from `s` is: each life's transitions
/// leave states further along.
fn course(s: State) -> u8 {
    match s {
        State::Close | State::Listen => 0,
        State::SynSent | State::SynRecv => 1,
        State::Established => 2,
        State::FinWait1 | State::CloseWait => 3,
        State::FinWait2 | State::Closing | State::LastAck => 4,
        _ => 5,
    }
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
/// after an end, or one that steps back in a connection's course: the end of one life and
/// the birth of the next were lost) and counts what they made.
fn made(seen: &[Transition]) -> Made {
    let mut lives: HashMap<u64, Vec<Vec<(State, State)>>> = HashMap::new();
    for t in seen {
        let sk = lives.entry(t.skaddr).or_default();
        let born = matches!(
            (t.from, t.to),
            (State::Close, State::SynSent | State::Listen) | (State::Listen, State::SynRecv)
        );
        let last = sk.last().and_then(|l| l.last());
        let ended = last.is_none_or(|s| matches!(s.1, State::Close | State::TimeWait));
        // (A listener's end follows its birth from the same place.)
        let back = last.is_some_and(|s| s.0 != State::Close && course(t.from) <= course(s.0));
        if born || ended || back {
            sk.push(Vec::new());
        }
        sk.last_mut().unwrap().push((t.from, t.to));
    }
    let mut m = Made {
        total: 0,
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
        } else if whole {
            m.total += life.len() as u64;
            m.other.push(life);
        } else {
            m.total += 5;
            m.broken += 1;
            m.unsayable += 4u64.saturating_sub(life.len() as u64);
            if m.broken_paths.len() < 5 {
                m.broken_paths.push(life);
            }
        }
    }
    m
}
