//! `tcptrace stuck`: sockets that sit too long in a state they should pass through — an
//! application that never closes after its peer did (CLOSE_WAIT), FINs or handshakes that
//! get no answer — with their owner, grouped by process, state and port.
//!
//! A socket's time in its state is known from the transition into it; one found at start
//! (sock_diag in every namespace) has been there since before tracing began at least, and
//! its age is shown as a lower bound.

use std::{
    io::{self, Write},
    net::SocketAddr,
};

use serde::Serialize;

use crate::{
    analysis::pipeline::Pipeline,
    model::atstart::OpenAtStart,
    model::{
        event::{Event, Owner, RawEvent, State, Transition},
        filter::CompiledFilter,
    },
    output::{Format, human_ns, rfc3339, write_rows},
    shared::FastMap,
    views::{Flow, Interval, View},
};

/// The states a socket should only pass through.
pub const STUCK_STATES: [State; 7] = [
    State::CloseWait,
    State::FinWait1,
    State::FinWait2,
    State::LastAck,
    State::Closing,
    State::SynSent,
    State::SynRecv,
];

/// [`STUCK_STATES`] as sock_diag's bits `1 << state`.
pub const STUCK_STATE_BITS: u32 = {
    let (mut bits, mut i) = (0u32, 0);
    while i < STUCK_STATES.len() {
        bits |= 1 << STUCK_STATES[i] as u8;
        i += 1;
    }
    bits
};

/// A socket in one of [`STUCK_STATES`].
#[derive(Clone, Copy, Debug)]
struct Sitting {
    state: State,
    netns: Option<u32>,
    local: SocketAddr,
    remote: SocketAddr,
    /// When it entered the state (or when tracing began, for one found then).
    since_ns: u64,
    /// Found at start: it was there before, `since_ns` is a lower bound.
    at_start: bool,
    owner: Option<Owner>,
}

/// One socket, stuck.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub kind: &'static str,
    pub time: String,
    pub state: &'static str,
    pub netns: Option<u32>,
    pub laddr: std::net::IpAddr,
    pub lport: u16,
    pub raddr: std::net::IpAddr,
    pub rport: u16,
    /// How long it has been in `state` (at least, with `age_at_least`).
    pub age_ns: u64,
    /// It was in the state before tracing began: `age_ns` is how long tracing has run.
    pub age_at_least: bool,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// The view.
pub struct Stuck<W: Write> {
    pipe: Pipeline,
    /// Traced sockets, by kernel address.
    sitting: FastMap<u64, Sitting>,
    /// Sockets found at start (no address known), by namespace and endpoints, with theirs.
    found: FastMap<(Option<u32>, SocketAddr, SocketAddr), Sitting>,
    states: Vec<State>,
    older_than_ns: u64,
    out: W,
    format: Format,
    wall_offset_ns: i64,
    clock: Interval,
}

impl<W: Write> Stuck<W> {
    /// Every `interval_ns`, the sockets in `states` (all of [`STUCK_STATES`] when empty)
    /// for longer than `older_than_ns`.
    pub fn new(
        filter: CompiledFilter,
        states: &[State],
        older_than_ns: u64,
        out: W,
        format: Format,
        wall_offset_ns: i64,
        interval_ns: u64,
    ) -> Self {
        let states = if states.is_empty() {
            STUCK_STATES.to_vec()
        } else {
            states.to_vec()
        };
        Stuck {
            pipe: Pipeline::new(filter),
            sitting: FastMap::default(),
            found: FastMap::default(),
            states,
            older_than_ns,
            out,
            format,
            wall_offset_ns,
            clock: Interval::new(interval_ns),
        }
    }

    /// The connections open at start (`now_ns`), with their owners: those in a watched
    /// state have sat there since before `now_ns`.
    pub fn seed(mut self, found: &OpenAtStart, now_ns: u64) -> Self {
        for e in found.iter() {
            let Some(state) = State::from_kernel(e.state) else {
                continue;
            };
            let netns = Some(e.netns);
            if !e.listening()
                && self.states.contains(&state)
                && self.pipe.filter().keeps_socket(e.local, e.remote, netns)
            {
                self.found.insert(
                    (netns, e.local, e.remote),
                    Sitting {
                        state,
                        netns,
                        local: e.local,
                        remote: e.remote,
                        since_ns: now_ns,
                        at_start: true,
                        owner: e.owner,
                    },
                );
            }
        }
        self.clock.set(now_ns, true);
        self
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    /// A transition; `kept`: the filter keeps it. A socket leaves the state it sat in
    /// whether or not the filter keeps the transition (one without a known owner is not kept
    /// by `--pid`); it only sits in a new one when kept.
    fn transition(&mut self, t: &Transition, kept: bool) {
        // A socket found at start moves on: followed by its address from now on.
        let was = self.sitting.remove(&t.skaddr).or_else(|| {
            (!self.found.is_empty())
                .then(|| self.found.remove(&(t.netns, t.local, t.remote)))
                .flatten()
        });
        // Its owner stays known across its states.
        let owner = t.owner.or(was.and_then(|s| s.owner));
        if kept && self.states.contains(&t.to) {
            self.sitting.insert(
                t.skaddr,
                Sitting {
                    state: t.to,
                    netns: t.netns,
                    local: t.local,
                    remote: t.remote,
                    since_ns: t.ts_ns,
                    at_start: false,
                    owner,
                },
            );
        }
    }

    /// The sockets stuck now, oldest first.
    pub fn snapshot(&self) -> Vec<Row> {
        let now = self.clock.now();
        let time = rfc3339(i128::from(now) + i128::from(self.wall_offset_ns));
        // A traced socket's endpoints are those of the transition into its state.
        let traced = self
            .sitting
            .values()
            .map(|s| (s.netns, s.local, s.remote, s));
        let found = self.found.iter().map(|((n, l, r), s)| (*n, *l, *r, s));
        let mut rows: Vec<Row> = traced
            .chain(found)
            .filter_map(|(netns, local, remote, s)| {
                let age = now.saturating_sub(s.since_ns);
                (age >= self.older_than_ns).then(|| Row {
                    kind: "stuck",
                    time: time.clone(),
                    state: s.state.name(),
                    netns,
                    laddr: local.ip(),
                    lport: local.port(),
                    raddr: remote.ip(),
                    rport: remote.port(),
                    age_ns: age,
                    age_at_least: s.at_start,
                    pid: s.owner.map(|o| o.pid),
                    comm: s.owner.map(|o| o.comm.as_str().into_owned()),
                })
            })
            .collect();
        rows.sort_by(|a, b| b.age_ns.cmp(&a.age_ns).then(a.lport.cmp(&b.lport)));
        rows
    }

    fn emit(&mut self) -> io::Result<()> {
        let rows = self.snapshot();
        self.clock.restart();
        write_rows(&mut self.out, self.format, &rows, render_text)
    }

    fn advance(&mut self, now: u64) -> io::Result<()> {
        if self.clock.advance(now) {
            self.emit()?;
        }
        Ok(())
    }
}

/// The rows grouped by process, state and local port: "nginx (777) holds 312 CLOSE_WAIT
/// on :8080, oldest 41m".
pub fn render_text(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut groups: FastMap<(String, &'static str, u16), (u64, u64, bool)> = FastMap::default();
    for r in rows {
        let who = match (&r.comm, r.pid) {
            (Some(c), Some(p)) => format!("{c} ({p})"),
            _ => "an unknown process".into(),
        };
        let g = groups.entry((who, r.state, r.lport)).or_default();
        g.0 += 1;
        if r.age_ns >= g.1 {
            g.1 = r.age_ns;
            g.2 = r.age_at_least;
        }
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(b.1.1.cmp(&a.1.1)));
    let mut s = String::new();
    if let Some(first) = rows.first() {
        let _ = writeln!(s, "{}  {} stuck sockets", first.time, rows.len());
    }
    for ((who, state, port), (n, oldest, at_least)) in groups {
        let _ = writeln!(
            s,
            "  {who} holds {n} {state} on :{port}, oldest {}{}",
            if at_least { "at least " } else { "" },
            human_ns(oldest)
        );
    }
    s
}

/// What finds the sockets sitting in states now (live: sock_diag in every namespace, with
/// the kernel side's socket storage for when each entered its state).
pub type Scan = Box<dyn FnMut() -> Vec<crate::source::diag::Sitting> + Send>;

/// Stuck sockets counted from periodic scans (for `serve`, whose kernel side writes no
/// transitions): the ages come from the kernel side's socket storage, or, for a socket in its
/// state since before tracing, from the first scan that found it there (a lower bound).
pub struct Watch {
    scan: Scan,
    older_than_ns: u64,
    every_ns: u64,
    last_ns: Option<u64>,
    /// When each socket without a known entry was first found in its state.
    first_seen: FastMap<(u32, SocketAddr, SocketAddr, u8), u64>,
}

/// What one scan counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Sockets past the threshold, per (state, namespace, service port).
    pub stuck: FastMap<(State, Option<u32>, u16), u64>,
    /// The oldest age per (state, namespace), ns, over those sockets.
    pub oldest_ns: FastMap<(State, Option<u32>), u64>,
}

impl Watch {
    /// Every `every_ns`, asks `scan` for the sockets in [`STUCK_STATES`] (it may find
    /// others: they are left out) and counts those there for at least `older_than_ns`.
    pub fn new(scan: Scan, older_than_ns: u64, every_ns: u64) -> Watch {
        Watch {
            scan,
            older_than_ns,
            every_ns: every_ns.max(1),
            last_ns: None,
            first_seen: FastMap::default(),
        }
    }

    /// Scans at `now_ns` if an interval has passed since the last scan (or none was made);
    /// `keeps` selects the sockets (the view's filter).
    pub fn maybe_count(
        &mut self,
        now_ns: u64,
        keeps: impl Fn(&crate::source::diag::Sitting) -> bool,
    ) -> Option<Counted> {
        if self
            .last_ns
            .is_some_and(|l| now_ns.saturating_sub(l) < self.every_ns)
        {
            return None;
        }
        self.last_ns = Some(now_ns);
        let found = (self.scan)();
        Some(self.count(now_ns, &found, keeps))
    }

    fn count(
        &mut self,
        now_ns: u64,
        found: &[crate::source::diag::Sitting],
        keeps: impl Fn(&crate::source::diag::Sitting) -> bool,
    ) -> Counted {
        let mut seen = FastMap::default();
        let mut c = Counted::default();
        for s in found.iter().filter(|s| keeps(s)) {
            let Some(state) = State::from_kernel(s.state).filter(|st| STUCK_STATES.contains(st))
            else {
                continue;
            };
            let key = (s.netns, s.local, s.remote, s.state);
            let since = match s.entered_ns {
                Some(t) => t,
                None => *self.first_seen.get(&key).unwrap_or(&now_ns),
            };
            if s.entered_ns.is_none() {
                seen.insert(key, since);
            }
            let age = now_ns.saturating_sub(since);
            if age < self.older_than_ns {
                continue;
            }
            let port = if s.server {
                s.local.port()
            } else {
                s.remote.port()
            };
            *c.stuck.entry((state, Some(s.netns), port)).or_default() += 1;
            let oldest = c.oldest_ns.entry((state, Some(s.netns))).or_default();
            *oldest = (*oldest).max(age);
        }
        // Sockets gone from their state are forgotten.
        self.first_seen = seen;
        c
    }
}

impl<W: Write> View for Stuck<W> {
    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            if let Event::Transition(t) = &ev {
                self.transition(t, self.pipe.filter().keeps(t));
            }
            self.advance(ev.ts_ns())?;
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.advance(now_ns)?;
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.emit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        atstart::Existing,
        event::{Comm, encode},
        filter::Filter,
    };

    const SEC: u64 = crate::shared::NS_PER_SEC;

    fn t(ts: u64, local: &str, remote: &str, from: State, to: State, pid: Option<u32>) -> RawEvent {
        encode(&Transition {
            ts_ns: ts,
            skaddr: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            from,
            to,
            in_from_ns: None,
            owner: pid.map(|pid| Owner {
                pid,
                comm: Comm(*b"nginx\0\0\0\0\0\0\0\0\0\0\0"),
                from_listener: false,
            }),
            mptcp: false,
            netns: Some(7),
            cgroup: None,
        })
    }

    #[test]
    fn a_close_wait_older_than_the_threshold_is_shown_with_its_owner_until_it_leaves() {
        let mut v = Stuck::new(
            Filter::default().compile(),
            &[],
            10 * SEC,
            Vec::new(),
            Format::Json,
            0,
            5 * SEC,
        );
        let (srv, cli) = ("10.0.0.1:8080", "10.0.0.2:40000");
        v.push(&[t(
            SEC,
            srv,
            cli,
            State::SynRecv,
            State::Established,
            Some(777),
        )])
        .unwrap();
        // The peer closes; the application does not. (The kernel names the owner it
        // remembers on every transition of the socket.)
        v.push(&[t(
            2 * SEC,
            srv,
            cli,
            State::Established,
            State::CloseWait,
            Some(777),
        )])
        .unwrap();
        v.tick(6 * SEC).unwrap(); // 4 s in CLOSE_WAIT: not yet.
        v.tick(12 * SEC).unwrap(); // 10 s: shown.
        v.push(&[t(
            13 * SEC,
            srv,
            cli,
            State::CloseWait,
            State::LastAck,
            Some(777),
        )])
        .unwrap();
        v.push(&[t(
            13 * SEC + 1,
            srv,
            cli,
            State::LastAck,
            State::Close,
            None,
        )])
        .unwrap();
        v.tick(18 * SEC).unwrap(); // Gone.
        let text = String::from_utf8(v.into_inner()).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 1, "{text}");
        let r = &rows[0];
        assert_eq!(r["state"], "CLOSE_WAIT");
        assert_eq!(r["lport"], 8080);
        assert_eq!(r["age_ns"], 10 * SEC);
        assert_eq!(r["age_at_least"], false);
        assert_eq!(
            (r["pid"].as_u64(), r["comm"].as_str()),
            (Some(777), Some("nginx"))
        );
    }

    #[test]
    fn a_socket_leaves_its_state_even_when_the_filter_drops_the_transition_out() {
        // `--pid 777`: the kernel names no owner for a packet-driven LAST_ACK→CLOSE, so the
        // filter drops it, yet the socket is gone.
        let filter = Filter {
            pids: vec![777],
            ..Filter::default()
        };
        let mut v = Stuck::new(
            filter.compile(),
            &[State::LastAck],
            0,
            Vec::new(),
            Format::Json,
            0,
            SEC,
        );
        let (srv, cli) = ("10.0.0.1:8080", "10.0.0.2:40000");
        v.push(&[t(
            SEC,
            srv,
            cli,
            State::CloseWait,
            State::LastAck,
            Some(777),
        )])
        .unwrap();
        v.tick(2 * SEC + 1).unwrap();
        v.push(&[t(3 * SEC, srv, cli, State::LastAck, State::Close, None)])
            .unwrap();
        v.tick(5 * SEC).unwrap();
        let text = String::from_utf8(v.into_inner()).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 1, "listed once, while in LAST_ACK: {text}");
        assert_eq!(rows[0]["state"], "LAST_ACK");
    }

    #[test]
    fn one_found_at_start_is_shown_with_a_lower_bound() {
        let found = Existing {
            netns: 7,
            local: "10.0.0.1:8080".parse().unwrap(),
            remote: "10.0.0.2:40001".parse().unwrap(),
            state: State::CloseWait as u8,
            server: true,
            inode: 0,
        };
        let v = Stuck::new(
            Filter::default().compile(),
            &[State::CloseWait],
            0,
            Vec::new(),
            Format::Text,
            0,
            SEC,
        )
        .seed(&[(found, None)].into_iter().collect(), 5 * SEC);
        let mut v = v;
        v.tick(65 * SEC).unwrap();
        let text = String::from_utf8(v.into_inner()).unwrap();
        assert!(
            text.contains("an unknown process holds 1 CLOSE_WAIT on :8080, oldest at least 1m"),
            "{text}"
        );
    }

    /// A scan that finds what the test put in `found` (shared, so it can change).
    fn fake_scan(
        found: &std::sync::Arc<std::sync::Mutex<Vec<crate::source::diag::Sitting>>>,
    ) -> Scan {
        let found = found.clone();
        Box::new(move || found.lock().unwrap().clone())
    }

    fn sitting(
        state: u8,
        local: &str,
        server: bool,
        entered_ns: Option<u64>,
    ) -> crate::source::diag::Sitting {
        crate::source::diag::Sitting {
            netns: 7,
            local: local.parse().unwrap(),
            remote: "10.0.0.2:40000".parse().unwrap(),
            state,
            server,
            entered_ns,
            owner: None,
        }
    }

    #[test]
    fn the_watch_counts_by_entry_time_or_first_sighting_and_forgets_what_left() {
        const CLOSE_WAIT: u8 = 8;
        const FIN_WAIT2: u8 = 5;
        let found = std::sync::Arc::new(std::sync::Mutex::new(vec![
            // Entered CLOSE_WAIT at 1 s (the kernel side saw it): 9 s old at 10 s.
            sitting(CLOSE_WAIT, "10.0.0.1:8080", true, Some(SEC)),
            // There before tracing: its age counts from the first scan that found it.
            sitting(CLOSE_WAIT, "10.0.0.1:8080", true, None),
            // A client's: its service port is the remote one.
            sitting(FIN_WAIT2, "10.0.0.1:50000", false, Some(2 * SEC)),
            // Not a state one gets stuck in (a scan may find others): left out.
            sitting(1, "10.0.0.1:8080", true, Some(0)),
        ]));
        found.lock().unwrap()[1].remote = "10.0.0.3:40001".parse().unwrap();
        let mut w = Watch::new(fake_scan(&found), 5 * SEC, SEC);
        let keep = |_: &crate::source::diag::Sitting| true;
        let first = w.maybe_count(10 * SEC, keep).unwrap();
        assert_eq!(
            first.stuck.get(&(State::CloseWait, Some(7), 8080)),
            Some(&1)
        );
        assert_eq!(
            first.stuck.get(&(State::FinWait2, Some(7), 40000)),
            Some(&1)
        );
        assert_eq!(
            first.oldest_ns.get(&(State::CloseWait, Some(7))),
            Some(&(9 * SEC))
        );
        assert_eq!(first.stuck.len(), 2, "{first:?}");
        assert!(
            w.maybe_count(10 * SEC + 1, keep).is_none(),
            "not before the interval"
        );
        let later = w.maybe_count(16 * SEC, keep).unwrap();
        assert_eq!(
            later.stuck.get(&(State::CloseWait, Some(7), 8080)),
            Some(&2),
            "the one first seen at 10 s is 6 s old: {later:?}"
        );
        // It leaves, then comes back: a new sighting, a new age.
        let back = found.lock().unwrap().remove(1);
        assert!(w.maybe_count(17 * SEC, keep).is_some());
        found.lock().unwrap().push(back);
        let again = w.maybe_count(18 * SEC, keep).unwrap();
        assert_eq!(
            again.stuck.get(&(State::CloseWait, Some(7), 8080)),
            Some(&1)
        );
        // The filter decides.
        let none = w.maybe_count(19 * SEC, |s: &crate::source::diag::Sitting| {
            s.local.port() != 8080
        });
        assert_eq!(none.unwrap().stuck.len(), 1);
    }
}
