//! `tcptrace ports`: is this host running out of local ports, and toward which destination?
//!
//! The kernel's model: a connection holds a local port from the moment `connect()` chooses
//! one until its socket is gone — its TIME_WAIT socket included, which the side that closed
//! first keeps for 60 s. Without `bind()` before `connect()` (or with
//! `IP_BIND_ADDRESS_NO_PORT`), one local port can serve many destinations at once: the
//! 4-tuple must be unique, so ports run out per destination — a (local address, remote
//! address, remote port) — each of which has the namespace's `ip_local_port_range` minus its
//! `ip_local_reserved_ports` to choose from. A `bind()` to a fixed port takes it for every
//! destination; that is not counted here.
//!
//! Per destination and network namespace, every interval: the ports held (open connections
//! this host made, and TIME_WAIT sockets on an ephemeral port), out of how many; the connect
//! rate; the connects that failed for want of a port (the kernel moves the socket to
//! SYN_SENT before choosing a port, and back to CLOSE, local port still 0, when none is
//! free); the TIME_WAIT expiry rate; and, when the count is rising, the time left at that
//! rate.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::{
    analysis::{pipeline::Pipeline, timewait::End},
    model::atstart::OpenAtStart,
    model::{
        event::{Event, RawEvent, State, Transition},
        filter::CompiledFilter,
    },
    output::{Format, rfc3339, write_rows},
    shared::{FastMap, NS_PER_MS, ns_to_secs},
    source::diag::DiagTimewait,
    views::{Flow, Interval, View},
};

/// The local ports a namespace's connects choose from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// `ip_local_port_range`, both ends included.
    pub low: u16,
    pub high: u16,
    /// How many ports of that range `ip_local_reserved_ports` takes out.
    pub reserved: u32,
}

impl PortRange {
    /// The kernel's default (`32768 60999`, nothing reserved).
    pub const DEFAULT: PortRange = PortRange {
        low: 32768,
        high: 60999,
        reserved: 0,
    };

    /// Ports a connect can choose toward one destination.
    pub fn available(&self) -> u64 {
        (u64::from(self.high) + 1)
            .saturating_sub(u64::from(self.low))
            .saturating_sub(u64::from(self.reserved))
    }

    /// Whether `port` is one a connect may have chosen.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// Parses `ip_local_port_range` ("32768\t60999") and `ip_local_reserved_ports`
    /// ("8080,9000-9010" or empty).
    pub fn parse(range: &str, reserved: &str) -> Option<PortRange> {
        let mut it = range.split_whitespace().map(|p| p.parse::<u16>());
        let (low, high) = (it.next()?.ok()?, it.next()?.ok()?);
        let mut r = PortRange {
            low,
            high,
            reserved: 0,
        };
        for part in reserved.trim().split(',').filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?),
                None => {
                    let p = part.trim().parse::<u16>().ok()?;
                    (p, p)
                }
            };
            let (a, b) = (a.max(low), b.min(high));
            if a <= b {
                r.reserved += u32::from(b - a) + 1;
            }
        }
        Some(r)
    }
}

/// Where each namespace's port range comes from (the host live, a fake in tests).
pub trait Ranges {
    /// The range of the namespace with inode `netns` (None: unknown namespace).
    fn range(&mut self, netns: Option<u32>) -> PortRange;
}

/// The host's namespaces' ranges, read once each (entering the namespace when it is not
/// tcptrace's own; the default when that is not possible).
#[derive(Default)]
pub struct HostRanges {
    cache: FastMap<Option<u32>, PortRange>,
}

impl HostRanges {
    fn read(netns: Option<u32>) -> Option<PortRange> {
        let read_here = || -> io::Result<Option<PortRange>> {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
            let reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
                .unwrap_or_default();
            Ok(PortRange::parse(&range, &reserved))
        };
        crate::source::diag::in_netns(netns, read_here).flatten()
    }
}

impl Ranges for HostRanges {
    fn range(&mut self, netns: Option<u32>) -> PortRange {
        *self.cache.entry(netns).or_insert_with(|| {
            HostRanges::read(netns).unwrap_or_else(|| {
                log::warn!(
                    "cannot read ip_local_port_range of network namespace {}: assuming the \
                     default {}-{}",
                    netns.map_or("?".into(), |n| n.to_string()),
                    PortRange::DEFAULT.low,
                    PortRange::DEFAULT.high
                );
                PortRange::DEFAULT
            })
        })
    }
}

/// A destination: what a local port must be unique toward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    pub netns: Option<u32>,
    pub laddr: IpAddr,
    pub raddr: IpAddr,
    pub rport: u16,
}

impl Dest {
    fn of(netns: Option<u32>, local: SocketAddr, remote: SocketAddr) -> Dest {
        Dest {
            netns,
            laddr: local.ip(),
            raddr: remote.ip(),
            rport: remote.port(),
        }
    }
}

/// A connect this host made, followed until its socket ends.
#[derive(Clone, Copy, Debug)]
struct Connect {
    dest: Dest,
    /// A local port was chosen (seen on a transition after the connect).
    holds: bool,
}

/// What happened toward a destination in the current interval.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    connects: u64,
    failures: u64,
    expiries: u64,
}

/// The fullest a destination got since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Peak {
    /// The most ports held at once (at an interval's end).
    pub in_use: u64,
    /// Ports available toward it.
    pub available: u64,
    /// in_use / available, at its highest.
    pub usage: f64,
    /// Connects that failed for want of a port.
    pub failures: u64,
    /// Connects made.
    pub connects: u64,
}

/// One destination's row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub kind: &'static str,
    pub time: String,
    /// The network namespace's inode (null: unknown).
    pub netns: Option<u32>,
    pub laddr: IpAddr,
    pub raddr: IpAddr,
    pub rport: u16,
    /// Local ports held toward it: open connections plus TIME_WAIT sockets.
    pub in_use: u64,
    /// Of which open connections.
    pub open: u64,
    /// Of which TIME_WAIT sockets.
    pub timewait: u64,
    /// Ports a connect can choose from toward it.
    pub available: u64,
    /// `ip_local_port_range` of its namespace ("40000-40049").
    pub range: String,
    /// in_use / available.
    pub usage: f64,
    pub connects_per_s: f64,
    /// Connects that failed for want of a port, this interval.
    pub failures: u64,
    /// Since the start.
    pub failures_total: u64,
    pub timewait_expiries_per_s: f64,
    /// At the current rise, seconds until every port is held (null: not rising).
    pub exhaustion_s: Option<f64>,
}

impl Row {
    /// The destination it is of.
    pub fn dest(&self) -> Dest {
        Dest {
            netns: self.netns,
            laddr: self.laddr,
            raddr: self.raddr,
            rport: self.rport,
        }
    }

    /// Its destination as the table names it: "10.0.0.2:80 from 10.0.0.1 [4026531840]".
    pub fn destination(&self) -> String {
        format!(
            "{} from {}{}",
            SocketAddr::new(self.raddr, self.rport),
            self.laddr,
            self.netns.map(|n| format!(" [{n}]")).unwrap_or_default()
        )
    }

    /// The time left until every port is held, as the table shows it ("-": not rising).
    pub fn exhaustion(&self) -> String {
        self.exhaustion_s.map_or_else(
            || "-".into(),
            |e| {
                if e < 10.0 {
                    format!("{e:.1}s")
                } else {
                    format!("{e:.0}s")
                }
            },
        )
    }
}

/// Ports held and connects made per destination, from the events a pipeline decodes: what
/// the `ports` view prints and `serve` exports.
pub struct PortsCore {
    ranges: Box<dyn Ranges>,
    /// Connections come as records (their connects as transitions).
    records: bool,
    connects: FastMap<u64, Connect>,
    /// Connections open at start (by namespace and endpoints), until they close.
    open_at_start: OpenAtStart,
    /// How many of them are toward each destination: what each interval reads, so that
    /// it walks the destinations, not every connection open at start (nor the closed).
    open_at_start_by_dest: FastMap<Dest, u64>,
    /// TIME_WAIT sockets that existed at start, until they expire.
    timewait_at_start: Vec<(Option<u32>, SocketAddr, SocketAddr, u64)>,
    window: FastMap<Dest, Window>,
    failures_total: FastMap<Dest, u64>,
    last_in_use: FastMap<Dest, u64>,
    peaks: FastMap<Dest, Peak>,
    wall_offset_ns: i64,
    window_start: Option<u64>,
}

/// A timewait socket as the ports count it: namespace, local and remote endpoints.
pub type TimewaitTuple = (Option<u32>, SocketAddr, SocketAddr);

impl PortsCore {
    /// Counts with each namespace's range from `ranges`.
    pub fn new(ranges: Box<dyn Ranges>, wall_offset_ns: i64) -> PortsCore {
        PortsCore {
            ranges,
            records: false,
            connects: FastMap::default(),
            open_at_start: OpenAtStart::default(),
            open_at_start_by_dest: FastMap::default(),
            timewait_at_start: Vec::new(),
            window: FastMap::default(),
            failures_total: FastMap::default(),
            last_in_use: FastMap::default(),
            peaks: FastMap::default(),
            wall_offset_ns,
            window_start: None,
        }
    }

    /// Connections come as records, their connects as transitions (a connect then holds
    /// a port from its start: the record tells which port only at the end).
    pub fn set_records(&mut self, yes: bool) {
        self.records = yes;
    }

    /// What existed at start (`now_ns`): the connections this host made that are open, and
    /// the TIME_WAIT sockets.
    /// Only those `filter` keeps (by their endpoints and namespace).
    pub fn seed(
        &mut self,
        open: &OpenAtStart,
        timewaits: &[DiagTimewait],
        now_ns: u64,
        filter: &CompiledFilter,
    ) {
        let keep = |l, r, n| filter.keeps_socket(l, r, n);
        // A copy of the part that holds ports (24 bytes a connection): a host's million
        // connections are never held in a map of socket addresses.
        self.open_at_start = open.filtered(|e| {
            let netns = Some(e.netns);
            !e.server
                && keep(e.local, e.remote, netns)
                && self.ranges.range(netns).contains(e.local.port())
        });
        self.open_at_start_by_dest.clear();
        for o in self.open_at_start.iter() {
            *self
                .open_at_start_by_dest
                .entry(Dest::of(Some(o.netns), o.local, o.remote))
                .or_default() += 1;
        }
        for t in timewaits {
            if keep(t.local, t.remote, t.netns)
                && self.ranges.range(t.netns).contains(t.local.port())
            {
                let expires = now_ns + u64::from(t.expires_ms) * NS_PER_MS;
                self.timewait_at_start
                    .push((t.netns, t.local, t.remote, expires));
            }
        }
    }

    /// Each destination's fullest moment since the start (as of the last interval).
    pub fn peaks(&self) -> impl Iterator<Item = (&Dest, &Peak)> {
        self.peaks.iter()
    }

    /// Each destination's fullest moment since the last call (or the start).
    pub fn take_peaks(&mut self) -> FastMap<Dest, Peak> {
        std::mem::take(&mut self.peaks)
    }

    /// Whether `port` is in the port range of namespace `netns` (one a connect may choose).
    pub fn ephemeral(&mut self, netns: Option<u32>, port: u16) -> bool {
        self.ranges.range(netns).contains(port)
    }

    /// A transition: a connect starts (when `kept`: the filter keeps it), or (without
    /// records) a connection progresses or ends, kept or not — a connect counted is never
    /// left behind because the filter dropped its end (e.g. one no owner is known for).
    pub fn transition(&mut self, t: &Transition, kept: bool) {
        if (t.from, t.to) == (State::Close, State::SynSent) {
            if !kept {
                return;
            }
            let dest = Dest::of(t.netns, t.local, t.remote);
            self.window.entry(dest).or_default().connects += 1;
            let holds = self.records || t.local.port() != 0;
            self.connects.insert(t.skaddr, Connect { dest, holds });
            return;
        }
        if !self.records {
            self.progress(t);
        }
    }

    /// A connection's record (kept or not, as [`PortsCore::transition`]): its end.
    pub fn connection(&mut self, c: &crate::model::event::Connection) {
        if self.records {
            self.progress(&c.end);
        }
    }

    fn progress(&mut self, t: &Transition) {
        if !matches!(t.to, State::Close | State::TimeWait) {
            if let Some(c) = self.connects.get_mut(&t.skaddr) {
                c.holds |= t.local.port() != 0;
            }
        } else if let Some(c) = self.connects.remove(&t.skaddr) {
            if t.local.port() == 0 && t.from == State::SynSent {
                // Back to CLOSE before a port was chosen: none was free.
                self.window.entry(c.dest).or_default().failures += 1;
                *self.failures_total.entry(c.dest).or_default() += 1;
            }
        } else if !self.open_at_start.is_empty()
            && let Some(o) = self.open_at_start.take(t.netns, t.local, t.remote)
        {
            let dest = Dest::of(Some(o.netns), o.local, o.remote);
            if let Some(n) = self.open_at_start_by_dest.get_mut(&dest) {
                *n -= 1;
                if *n == 0 {
                    self.open_at_start_by_dest.remove(&dest);
                }
            }
        }
    }

    /// A timewait socket's end.
    pub fn exit(&mut self, x: &crate::analysis::timewait::Exit) {
        if x.end == End::Expired && self.ranges.range(x.netns).contains(x.local.port()) {
            let dest = Dest::of(x.netns, x.local, x.remote);
            self.window.entry(dest).or_default().expiries += 1;
        }
    }

    /// Each destination's ports held at `now`: (open connections, TIME_WAIT sockets), the
    /// traced timewait sockets being `population`.
    fn held(&mut self, population: &[TimewaitTuple], now: u64) -> FastMap<Dest, (u64, u64)> {
        let mut held: FastMap<Dest, (u64, u64)> = FastMap::default();
        for c in self.connects.values().filter(|c| c.holds) {
            held.entry(c.dest).or_default().0 += 1;
        }
        for (dest, n) in &self.open_at_start_by_dest {
            held.entry(*dest).or_default().0 += n;
        }
        self.timewait_at_start.retain(|(_, _, _, exp)| *exp > now);
        // Those found at start and traced since count once. Compared only while any is
        // left (a minute after start none is): the population can be a minute of
        // connections, and this runs every second.
        if !self.timewait_at_start.is_empty() {
            let traced: std::collections::HashSet<_> = population.iter().copied().collect();
            self.timewait_at_start
                .retain(|(n, l, r, _)| !traced.contains(&(*n, *l, *r)));
        }
        let seeded: Vec<TimewaitTuple> = self
            .timewait_at_start
            .iter()
            .map(|(n, l, r, _)| (*n, *l, *r))
            .collect();
        for (netns, local, remote) in population.iter().copied().chain(seeded) {
            if self.ranges.range(netns).contains(local.port()) {
                held.entry(Dest::of(netns, local, remote)).or_default().1 += 1;
            }
        }
        held
    }

    /// The rows of the interval that ends at `now`, fullest first.
    pub fn snapshot(&mut self, population: &[TimewaitTuple], now: u64) -> Vec<Row> {
        let secs = self
            .window_start
            .map_or(1.0, |w| ns_to_secs(now.saturating_sub(w)))
            .max(1e-3);
        let held = self.held(population, now);
        let window = std::mem::take(&mut self.window);
        // Those holding ports, busy this interval, or that held some the interval before
        // (their row shows the drop).
        let mut dests: Vec<Dest> = held
            .keys()
            .chain(window.keys())
            .chain(self.last_in_use.keys())
            .copied()
            .collect();
        dests.sort();
        dests.dedup();
        let time = rfc3339(i128::from(now) + i128::from(self.wall_offset_ns));
        let mut rows: Vec<Row> = dests
            .into_iter()
            .map(|d| {
                let (open, timewait) = held.get(&d).copied().unwrap_or_default();
                let w = window.get(&d).copied().unwrap_or_default();
                let range = self.ranges.range(d.netns);
                let in_use = open + timewait;
                let available = range.available().max(1);
                let before = self.last_in_use.insert(d, in_use);
                let rise = before.map(|b| (in_use as f64 - b as f64) / secs);
                Row {
                    kind: "ports",
                    time: time.clone(),
                    netns: d.netns,
                    laddr: d.laddr,
                    raddr: d.raddr,
                    rport: d.rport,
                    in_use,
                    open,
                    timewait,
                    available,
                    range: format!("{}-{}", range.low, range.high),
                    usage: in_use as f64 / available as f64,
                    connects_per_s: w.connects as f64 / secs,
                    failures: w.failures,
                    failures_total: self.failures_total.get(&d).copied().unwrap_or(0),
                    timewait_expiries_per_s: w.expiries as f64 / secs,
                    exhaustion_s: rise
                        .filter(|r| *r > 0.0)
                        .map(|r| available.saturating_sub(in_use) as f64 / r),
                }
            })
            .collect();
        for r in &rows {
            let d = r.dest();
            let p = self.peaks.entry(d).or_default();
            if r.in_use >= p.in_use {
                p.in_use = r.in_use;
                p.usage = r.usage;
            }
            p.available = r.available;
            p.failures += r.failures;
            p.connects += window.get(&d).map_or(0, |w| w.connects);
        }
        // Destinations with nothing held and nothing happening are forgotten.
        self.last_in_use
            .retain(|d, n| *n > 0 || window.contains_key(d));
        rows.sort_by(|a, b| b.usage.total_cmp(&a.usage).then(b.in_use.cmp(&a.in_use)));
        self.window_start = Some(now);
        rows
    }
}

/// The traced timewait sockets of a pipeline that its filter keeps, as the ports count them.
pub fn timewait_tuples(pipe: &Pipeline) -> Vec<TimewaitTuple> {
    let Some(t) = pipe.timewait_sockets() else {
        return Vec::new();
    };
    let mut tuples = Vec::with_capacity(t.population().len());
    tuples.extend(
        t.population()
            .filter(|l| pipe.filter().keeps_life(l))
            .map(|l| (l.netns, l.local, l.remote)),
    );
    tuples
}

/// The view.
pub struct Ports<W: Write> {
    pipe: Pipeline,
    core: PortsCore,
    out: W,
    format: Format,
    clock: Interval,
}

/// Rows printed per interval in text (JSON has them all).
const TEXT_ROWS: usize = 20;

impl<W: Write> Ports<W> {
    /// A table every `interval_ns`, with each namespace's range from `ranges`.
    pub fn new(
        filter: CompiledFilter,
        ranges: Box<dyn Ranges>,
        out: W,
        format: Format,
        wall_offset_ns: i64,
        interval_ns: u64,
    ) -> Self {
        Ports {
            pipe: Pipeline::new(filter).timewaits(true),
            core: PortsCore::new(ranges, wall_offset_ns),
            out,
            format,
            clock: Interval::new(interval_ns),
        }
    }

    /// Whether timewait timers are traced (else TIME_WAIT sockets are not followed).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = if traced {
            self.pipe.timewaits(true)
        } else {
            self.pipe.without_timewaits()
        };
        self
    }

    /// Follows at most `n` sockets at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// What existed at start (`now_ns`): the connections this host made that are open, and
    /// the TIME_WAIT sockets.
    pub fn seed(mut self, open: &OpenAtStart, timewaits: &[DiagTimewait], now_ns: u64) -> Self {
        self.core.seed(open, timewaits, now_ns, self.pipe.filter());
        self
    }

    /// Each destination's fullest moment since the start (as of the last interval).
    pub fn peaks(&self) -> impl Iterator<Item = (&Dest, &Peak)> {
        self.core.peaks()
    }

    /// Whether `port` is in the port range of namespace `netns` (one a connect may choose).
    pub fn ephemeral(&mut self, netns: Option<u32>, port: u16) -> bool {
        self.core.ephemeral(netns, port)
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    fn count_expiries(&mut self) {
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if self.pipe.filter().keeps_exit(&x) {
                self.core.exit(&x);
            }
        }
        self.pipe.exits = exits;
    }

    /// The rows of the interval that ends now, fullest first.
    pub fn snapshot(&mut self) -> Vec<Row> {
        let population = timewait_tuples(&self.pipe);
        self.clock.restart();
        self.core.snapshot(&population, self.clock.now())
    }

    fn emit(&mut self) -> io::Result<()> {
        let rows = self.snapshot();
        write_rows(&mut self.out, self.format, &rows, render_text)
    }

    fn advance(&mut self, now: u64) -> io::Result<()> {
        if self.clock.advance(now) {
            self.emit()?;
        }
        Ok(())
    }
}

/// The rows as a table (the busiest [`TEXT_ROWS`]).
pub fn render_text(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let Some(first) = rows.first() else {
        return s;
    };
    let _ = writeln!(
        s,
        "{}  {:<44} {:>12} {:>6} {:>8} {:>7} {:>11}",
        first.time, "DESTINATION (from)", "IN_USE/AVAIL", "USAGE", "CONN/s", "FAILED", "EXHAUSTION"
    );
    for r in rows.iter().take(TEXT_ROWS) {
        let _ = writeln!(
            s,
            "  {:<44} {:>12} {:>5.0}% {:>8.1} {:>7} {:>11}",
            r.destination(),
            format!("{}/{}", r.in_use, r.available),
            r.usage * 100.0,
            r.connects_per_s,
            r.failures,
            r.exhaustion()
        );
    }
    s
}

impl<W: Write> View for Ports<W> {
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
            if let Event::Transition(t) = &ev {
                self.core.transition(t, self.pipe.filter().keeps(t));
            }
            self.pipe.fold(&ev);
            self.count_expiries();
            self.advance(ev.ts_ns())?;
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        self.count_expiries();
        self.advance(now_ns)?;
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.count_expiries();
        self.emit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        atstart::Existing,
        event::{TimerEvent, TimerOp, encode, encode_timer},
        filter::Filter,
    };

    struct Fixed(PortRange);

    impl Ranges for Fixed {
        fn range(&mut self, _: Option<u32>) -> PortRange {
            self.0
        }
    }

    const SEC: u64 = crate::shared::NS_PER_SEC;
    const SERVER: &str = "10.0.0.2:80";

    fn t(ts: u64, sk: u64, lport: u16, from: State, to: State) -> RawEvent {
        encode(&Transition {
            ts_ns: ts,
            skaddr: sk,
            local: SocketAddr::new("10.0.0.1".parse().unwrap(), lport),
            remote: SERVER.parse().unwrap(),
            from,
            to,
            in_from_ns: None,
            owner: None,
            mptcp: false,
            netns: Some(7),
            cgroup: None,
        })
    }

    fn armed(ts: u64, tw: u64, lport: u16) -> RawEvent {
        encode_timer(&TimerEvent {
            ts_ns: ts,
            tw,
            substate_at_end: None,
            op: TimerOp::Armed {
                substate: State::TimeWait,
                timeout_jiffies: 15000,
                local: SocketAddr::new("10.0.0.1".parse().unwrap(), lport),
                remote: SERVER.parse().unwrap(),
                netns: Some(7),
                rearm: false,
            },
        })
    }

    #[test]
    fn ranges_parse_with_reserved_ports_inside_only() {
        let r = PortRange::parse("40000\t40049\n", "8080,40010-40019,40049,50000-50010\n").unwrap();
        assert_eq!((r.low, r.high, r.reserved), (40000, 40049, 11));
        assert_eq!(r.available(), 39);
        assert!(r.contains(40000) && r.contains(40049) && !r.contains(39999));
        assert_eq!(PortRange::parse("1 2", "").unwrap().available(), 2);
        assert_eq!(PortRange::parse("x", ""), None);
        assert_eq!(PortRange::DEFAULT.available(), 28232);
    }

    /// Ten connects toward one destination from a 10-port range, each closed first by this
    /// host (its TIME_WAIT holds the port), a second apart; then one that finds no port.
    #[test]
    fn ports_fill_up_the_rise_predicts_exhaustion_and_the_failure_is_counted() {
        let range = PortRange {
            low: 40000,
            high: 40009,
            reserved: 0,
        };
        let mut v = Ports::new(
            Filter::default().compile(),
            Box::new(Fixed(range)),
            Vec::new(),
            Format::Json,
            0,
            SEC,
        );
        let mut events = Vec::new();
        for i in 0..10u64 {
            let (ts, sk, port) = (SEC + i * SEC, 100 + i, 40000 + i as u16);
            events.extend([
                t(ts, sk, 0, State::Close, State::SynSent),
                t(ts + 1, sk, port, State::SynSent, State::Established),
                t(ts + 2, sk, port, State::Established, State::FinWait1),
                t(ts + 3, sk, port, State::FinWait1, State::FinWait2),
                armed(ts + 4, 900 + i, port),
                t(ts + 5, sk, port, State::FinWait2, State::TimeWait),
            ]);
        }
        let ts = 11 * SEC;
        events.extend([
            t(ts, 200, 0, State::Close, State::SynSent),
            t(ts + 1, 200, 0, State::SynSent, State::Close),
        ]);
        for e in &events {
            v.push(std::slice::from_ref(e)).unwrap();
        }
        v.tick(12 * SEC + 1).unwrap();
        let text = String::from_utf8(v.into_inner()).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // One row per interval; the port count rises by one a second.
        let in_use: Vec<u64> = rows.iter().map(|r| r["in_use"].as_u64().unwrap()).collect();
        assert_eq!(in_use, (1..=10).chain([10]).collect::<Vec<_>>(), "{text}");
        let mid = &rows[4];
        assert_eq!(mid["available"], 10);
        assert_eq!(mid["timewait"], 5);
        assert_eq!(mid["usage"], 0.5);
        let eta = mid["exhaustion_s"].as_f64().unwrap();
        assert!((4.0..=6.0).contains(&eta), "5 ports left at 1/s: {eta}");
        let last = rows.last().unwrap();
        assert_eq!(last["failures"], 1, "{text}");
        assert_eq!(last["failures_total"], 1);
        assert_eq!(last["usage"], 1.0);
        assert!(last["exhaustion_s"].is_null(), "not rising any more");
        assert_eq!(last["raddr"], "10.0.0.2");
        assert_eq!(last["rport"], 80);
        assert_eq!(last["netns"], 7);
    }

    #[test]
    fn what_existed_at_start_counts_until_it_ends() {
        let range = PortRange {
            low: 40000,
            high: 40099,
            reserved: 0,
        };
        let local: SocketAddr = "10.0.0.1:40005".parse().unwrap();
        let remote: SocketAddr = SERVER.parse().unwrap();
        let open: OpenAtStart = [
            Existing {
                netns: 7,
                local,
                remote,
                state: 1,
                server: false,
                inode: 0,
            },
            // Accepted by this host: holds no ephemeral port.
            Existing {
                netns: 7,
                local: remote,
                remote: local,
                state: 1,
                server: true,
                inode: 0,
            },
        ]
        .into_iter()
        .map(|e| (e, None))
        .collect();
        let tw = [DiagTimewait {
            local: "10.0.0.1:40006".parse().unwrap(),
            remote,
            expires_ms: 30_000,
            netns: Some(7),
        }];
        let mut v = Ports::new(
            Filter::default().compile(),
            Box::new(Fixed(range)),
            Vec::new(),
            Format::Json,
            0,
            SEC,
        )
        .seed(&open, &tw, SEC);
        v.tick(SEC).unwrap();
        v.tick(2 * SEC).unwrap();
        // The open one closes (seen mid-life).
        v.push(&[t(2 * SEC + 5, 1, 40005, State::Established, State::Close)])
            .unwrap();
        v.tick(3 * SEC).unwrap();
        // The TIME_WAIT one expires at 31 s.
        v.tick(32 * SEC).unwrap();
        let text = String::from_utf8(v.into_inner()).unwrap();
        let in_use: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["in_use"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(in_use, [2, 1, 0], "{text}");
    }
}
