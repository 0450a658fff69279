//! `tcptrace timewait`: the TIME_WAIT population, live — counts by local port, remote
//! endpoint and process, ages, what expires soon, creation and end rates — every interval,
//! and a summary at the end.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::SocketAddr,
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    analysis::{
        pipeline::Pipeline,
        timewait::{End, TCP_TIMEWAIT_LEN_NS, Timewaits},
    },
    model::{
        event::{RawEvent, State, TimerEvent, TimerOp, encode_timer},
        filter::CompiledFilter,
    },
    output::{Format, human_ns, rfc3339, write_rows},
    shared::{NS_PER_MS, NS_PER_SEC, ns_to_secs},
    source::diag::DiagTimewait,
    views::{Flow, Interval, View},
};

/// A timewait socket found by sock_diag at start-up (created before tracing began).
#[derive(Clone, Copy, Debug)]
struct Seeded {
    local: SocketAddr,
    remote: SocketAddr,
    expires_ns: u64,
    netns: Option<u32>,
}

/// One count in a top list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Count {
    /// What is counted (a port, an endpoint, a process name).
    pub key: String,
    /// How many.
    pub count: u64,
}

/// One snapshot of the population.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// `timewait_population`.
    pub kind: &'static str,
    /// When (RFC 3339).
    pub time: String,
    /// TIME_WAIT sockets now.
    pub population: u64,
    /// Of which found at start-up through sock_diag (ages estimated from their timers).
    pub seeded: u64,
    /// Top local ports.
    pub by_local_port: Vec<Count>,
    /// Top remote endpoints.
    pub by_remote: Vec<Count>,
    /// Top processes whose closes created them (`?` when unknown).
    pub by_process: Vec<Count>,
    /// Ages in 10-second buckets: `[0,10)`, `[10,20)`, … `[60,∞)`.
    pub age_10s_buckets: Vec<u64>,
    /// How many expire within 5, 10 and 30 seconds (estimated: 60 s after the last arming).
    pub expiring_5s: u64,
    pub expiring_10s: u64,
    pub expiring_30s: u64,
    /// Rates over the interval, per second.
    pub created_per_s: f64,
    pub expired_per_s: f64,
    pub killed_per_s: f64,
    /// Closes that got no timewait socket in the interval (tcp_max_tw_buckets reached).
    pub not_created: u64,
}

/// The summary at the end.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `timewait_summary`.
    pub kind: &'static str,
    /// Counts over the whole run.
    pub created: u64,
    pub expired: u64,
    pub killed: u64,
    pub not_created: u64,
    /// Still in TIME_WAIT at the end.
    pub remaining: u64,
    /// Residency of the timewait sockets that ended, nanoseconds.
    pub residency_p50_ns: Option<u64>,
    pub residency_p99_ns: Option<u64>,
    pub residency_max_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    created: u64,
    expired: u64,
    killed: u64,
    not_created: u64,
}

/// The view.
pub struct Population<W: Write> {
    /// Follows timewait sockets (no lifecycles).
    pipe: Pipeline,
    seeded: Vec<Seeded>,
    out: W,
    format: Format,
    wall_offset_ns: i64,
    clock: Interval,
    interval: Counts,
    total: Counts,
    created_seen: u64,
    residency: Histogram<u64>,
}

impl<W: Write> Population<W> {
    /// A report every `interval_ns`; `traced`: whether timewait timers are traced.
    pub fn new(
        filter: CompiledFilter,
        out: W,
        format: Format,
        wall_offset_ns: i64,
        interval_ns: u64,
        traced: bool,
    ) -> Self {
        Population {
            pipe: Pipeline::new(filter).timewaits(traced),
            seeded: Vec::new(),
            out,
            format,
            wall_offset_ns,
            clock: Interval::new(interval_ns),
            interval: Counts::default(),
            total: Counts::default(),
            created_seen: 0,
            residency: Histogram::new(3).expect("3 significant digits is valid"),
        }
    }

    /// Whether the source carries connection records (the view then reads the entries into
    /// TIME_WAIT from them, not from transitions).
    pub fn records(mut self, yes: bool) -> Self {
        self.pipe = self.pipe.from_records(yes);
        self
    }

    /// Follows at most `n` timewait sockets at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// Adds the timewait sockets that existed before tracing began (from sock_diag, in the
    /// tracer's own namespace), as of `now_ns`.
    pub fn seed(mut self, found: &[DiagTimewait], now_ns: u64) -> Self {
        for d in found {
            let netns = d.netns;
            // Through the same filter as traced ones: a synthetic arming.
            let raw = encode_timer(&TimerEvent {
                ts_ns: now_ns,
                tw: 0,
                substate_at_end: None,
                op: TimerOp::Armed {
                    substate: State::TimeWait,
                    timeout_jiffies: 0,
                    local: d.local,
                    remote: d.remote,
                    netns,
                    rearm: false,
                },
            });
            let filter = self.pipe.filter();
            if filter.kernel_keeps(&raw) && filter.keeps_parts(None, d.local, d.remote, netns, None)
            {
                self.seeded.push(Seeded {
                    local: d.local,
                    remote: d.remote,
                    expires_ns: now_ns + u64::from(d.expires_ms) * NS_PER_MS,
                    netns,
                });
            }
        }
        self.clock.set(now_ns, false);
        self
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    /// The timewait sockets followed.
    fn lives(&self) -> impl Iterator<Item = &crate::analysis::timewait::Life> {
        self.pipe
            .timewait_sockets()
            .into_iter()
            .flat_map(Timewaits::population)
    }

    fn count_exits(&mut self) {
        let created = self.pipe.timewait_sockets().map_or(0, Timewaits::created);
        let new = created - self.created_seen;
        self.created_seen = created;
        self.interval.created += new;
        self.total.created += new;
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if !self.pipe.filter().keeps_exit(&x) {
                continue;
            }
            for c in [&mut self.interval, &mut self.total] {
                match x.end {
                    End::Expired => c.expired += 1,
                    End::Killed => c.killed += 1,
                    End::NotCreated => c.not_created += 1,
                }
            }
            if x.end != End::NotCreated {
                let _ = self.residency.record(x.residency_ns);
            }
        }
        self.pipe.exits = exits;
    }

    /// The population now.
    pub fn snapshot(&mut self) -> Snapshot {
        let now = self.clock.now();
        // A seeded socket whose timer was re-armed since is traced now: count it once (the
        // same 4-tuple may live in two namespaces).
        let traced: std::collections::HashSet<(Option<u32>, SocketAddr, SocketAddr)> =
            self.lives().map(|l| (l.netns, l.local, l.remote)).collect();
        self.seeded
            .retain(|s| s.expires_ns > now && !traced.contains(&(s.netns, s.local, s.remote)));
        let mut by_port: HashMap<u16, u64> = HashMap::new();
        let mut by_remote: HashMap<SocketAddr, u64> = HashMap::new();
        let mut by_proc: HashMap<String, u64> = HashMap::new();
        let mut ages = vec![0u64; 7];
        let (mut e5, mut e10, mut e30) = (0, 0, 0);
        let mut add =
            |local: SocketAddr, remote: SocketAddr, proc_: String, since: u64, expires: u64| {
                *by_port.entry(local.port()).or_default() += 1;
                *by_remote.entry(remote).or_default() += 1;
                *by_proc.entry(proc_).or_default() += 1;
                ages[(now.saturating_sub(since) / (10 * NS_PER_SEC)).min(6) as usize] += 1;
                let left = expires.saturating_sub(now);
                e5 += u64::from(left <= 5 * NS_PER_SEC);
                e10 += u64::from(left <= 10 * NS_PER_SEC);
                e30 += u64::from(left <= 30 * NS_PER_SEC);
            };
        let mut population = 0;
        let filter = self.pipe.filter();
        for l in self.lives() {
            if !filter.keeps_life(l) {
                continue;
            }
            population += 1;
            let proc_ = l
                .owner
                .map_or_else(|| "?".into(), |o| o.comm.as_str().into_owned());
            add(
                l.local,
                l.remote,
                proc_,
                l.since_ns,
                l.armed_ns + TCP_TIMEWAIT_LEN_NS,
            );
        }
        for s in &self.seeded {
            population += 1;
            // Its age, estimated from what its timer has left.
            let since = s.expires_ns.saturating_sub(TCP_TIMEWAIT_LEN_NS);
            add(s.local, s.remote, "?".into(), since, s.expires_ns);
        }
        // Rates over the window, which the last one at the end may make very short: never
        // divide by less than a second.
        let secs = self
            .clock
            .restart()
            .map_or(1.0, |w| ns_to_secs(now.saturating_sub(w)))
            .max(1.0);
        let c = std::mem::take(&mut self.interval);
        Snapshot {
            kind: "timewait_population",
            time: rfc3339(i128::from(now) + i128::from(self.wall_offset_ns)),
            population,
            seeded: self.seeded.len() as u64,
            by_local_port: top(by_port.into_iter().map(|(p, n)| (format!(":{p}"), n))),
            by_remote: top(by_remote.into_iter().map(|(r, n)| (r.to_string(), n))),
            by_process: top(by_proc),
            age_10s_buckets: ages,
            expiring_5s: e5,
            expiring_10s: e10,
            expiring_30s: e30,
            created_per_s: c.created as f64 / secs,
            expired_per_s: c.expired as f64 / secs,
            killed_per_s: c.killed as f64 / secs,
            not_created: c.not_created,
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        let s = self.snapshot();
        write_rows(&mut self.out, self.format, &[s], |s| render_snapshot(&s[0]))
    }

    fn advance(&mut self, now: u64) -> io::Result<()> {
        if self.clock.advance(now) {
            self.emit()?;
        }
        Ok(())
    }
}

fn top(it: impl IntoIterator<Item = (String, u64)>) -> Vec<Count> {
    let mut v: Vec<Count> = it
        .into_iter()
        .map(|(key, count)| Count { key, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    v.truncate(5);
    v
}

impl<W: Write> View for Population<W> {
    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        Some(&mut self.pipe)
    }

    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            self.pipe.fold(&ev);
            self.count_exits();
            self.advance(ev.ts_ns())?;
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        self.count_exits();
        self.advance(now_ns)?;
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.count_exits();
        self.emit()?;
        let h = &self.residency;
        let q = |v: u64| (!h.is_empty()).then_some(v);
        let s = Summary {
            kind: "timewait_summary",
            created: self.total.created,
            expired: self.total.expired,
            killed: self.total.killed,
            not_created: self.total.not_created,
            remaining: self.lives().count() as u64 + self.seeded.len() as u64,
            residency_p50_ns: q(h.value_at_quantile(0.5)),
            residency_p99_ns: q(h.value_at_quantile(0.99)),
            residency_max_ns: q(h.max()),
        };
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, &s)?;
                writeln!(self.out)?;
            }
            Format::Text => {
                let r = |v: Option<u64>| v.map_or("-".into(), human_ns);
                writeln!(
                    self.out,
                    "\nsummary: {} created, {} expired, {} killed early, {} not created \
                     (tcp_max_tw_buckets), {} still in TIME_WAIT; residency p50 {}, p99 {}, max {}",
                    s.created,
                    s.expired,
                    s.killed,
                    s.not_created,
                    s.remaining,
                    r(s.residency_p50_ns),
                    r(s.residency_p99_ns),
                    r(s.residency_max_ns)
                )?;
            }
        }
        self.out.flush()
    }
}

/// A snapshot as a short text block.
pub fn render_snapshot(s: &Snapshot) -> String {
    let list = |v: &[Count]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.iter()
                .map(|c| format!("{} {}", c.key, c.count))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let ages: Vec<String> = s
        .age_10s_buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if i == 6 {
                format!("60s+ {n}")
            } else {
                format!("{}-{}s {n}", i * 10, i * 10 + 10)
            }
        })
        .collect();
    format!(
        "{}  TIME_WAIT {} ({} seeded)  created {:.1}/s  expired {:.1}/s  killed {:.1}/s{}\n\
         \x20 expiring within 5s {}, 10s {}, 30s {}   ages: {}\n\
         \x20 by local port: {}\n\x20 by remote: {}\n\x20 by process: {}\n",
        s.time,
        s.population,
        s.seeded,
        s.created_per_s,
        s.expired_per_s,
        s.killed_per_s,
        if s.not_created > 0 {
            format!("  NOT CREATED {} (tcp_max_tw_buckets)", s.not_created)
        } else {
            String::new()
        },
        s.expiring_5s,
        s.expiring_10s,
        s.expiring_30s,
        ages.join(" | "),
        list(&s.by_local_port),
        list(&s.by_remote),
        list(&s.by_process),
    )
}
