//! `tcptrace doctor`: the TCP settings people tune blind, judged from what this host did.
//!
//! For `--duration`, tcptrace follows every connection, TIME_WAIT socket and destination
//! (as `report`, `timewait` and `ports` do) and the kernel's own counters of each network
//! namespace that had traffic; then it reads that namespace's settings and gives each a
//! verdict with the measurement behind it. The rules are pure functions ([`judge`]) of the
//! settings, the counters and the measurements, so each is unit-tested.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    analysis::{
        closes::{Initiator, Role},
        pipeline::Pipeline,
        timewait::End,
    },
    model::atstart::OpenAtStart,
    model::{
        event::{Event, RawEvent, State},
        filter::CompiledFilter,
    },
    output::{Format, human_ns},
    shared::{FastMap, NS_PER_SEC},
    source::diag::DiagTimewait,
    views::{
        Flow, Interval, View,
        ports::{Dest, Peak, PortsCore, Ranges, timewait_tuples},
    },
};

/// A setting's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// What was measured shows it hurting now.
    Problem,
    /// Close to hurting, or set in a way that cannot do what it is usually set for.
    Warning,
    /// Nothing measured says to change it.
    Ok,
    /// Worth knowing; nothing to judge.
    Info,
}

impl Verdict {
    /// Every verdict.
    pub const ALL: [Verdict; 4] = [
        Verdict::Problem,
        Verdict::Warning,
        Verdict::Ok,
        Verdict::Info,
    ];

    /// The name used in JSON, text and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Problem => "problem",
            Verdict::Warning => "warning",
            Verdict::Ok => "ok",
            Verdict::Info => "info",
        }
    }
}

/// One setting, judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The sysctl (or sysctls) judged.
    pub sysctl: &'static str,
    /// Its value in the namespace (`absent` when the kernel has no such setting).
    pub value: String,
    pub verdict: Verdict,
    /// What was measured, in one line.
    pub evidence: String,
    /// What to do, if anything.
    pub advice: Option<String>,
}

/// The settings doctor reads, by sysctl name (under /proc/sys, dots for slashes); a missing
/// one is absent from the map.
pub type Settings = BTreeMap<&'static str, String>;

/// The sysctls read.
pub const SYSCTLS: [&str; 12] = [
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_tw_recycle",
    "net.ipv4.tcp_timestamps",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.somaxconn",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_probes",
];

/// The kernel's counters doctor reads (`TcpExt` in /proc/net/netstat), as a difference over
/// the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Closes that got no timewait socket (`tcp_max_tw_buckets` reached).
    pub timewait_overflow: u64,
    /// Connections a full accept queue could not take.
    pub listen_overflows: u64,
    /// SYNs and handshakes dropped at a listener, for any reason.
    pub listen_drops: u64,
    /// SYNs dropped because the SYN queue was full (and syncookies off).
    pub req_queue_full_drops: u64,
}

impl Counters {
    /// Parses /proc/net/netstat (pairs of header and value lines per protocol).
    pub fn parse(netstat: &str) -> Counters {
        let lines: Vec<&str> = netstat.lines().collect();
        let mut c = Counters::default();
        for pair in lines.windows(2) {
            let (Some(names), Some(values)) = (
                pair[0].strip_prefix("TcpExt:"),
                pair[1].strip_prefix("TcpExt:"),
            ) else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                let v = value.parse().unwrap_or(0);
                match name {
                    "TCPTimeWaitOverflow" => c.timewait_overflow = v,
                    "ListenOverflows" => c.listen_overflows = v,
                    "ListenDrops" => c.listen_drops = v,
                    "TCPReqQFullDrop" => c.req_queue_full_drops = v,
                    _ => {}
                }
            }
        }
        c
    }

    /// What moved from `before` to `self`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            timewait_overflow: self
                .timewait_overflow
                .saturating_sub(before.timewait_overflow),
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            req_queue_full_drops: self
                .req_queue_full_drops
                .saturating_sub(before.req_queue_full_drops),
        }
    }
}

/// Where a namespace's settings and counters come from (the host live, fakes in tests).
pub trait HostFacts {
    /// The namespace's settings (None: it cannot be read, e.g. entering it needs
    /// CAP_SYS_ADMIN, or it is gone).
    fn settings(&mut self, netns: Option<u32>) -> Option<Settings>;
    /// The namespace's counters now (None: they cannot be read).
    fn counters(&mut self, netns: Option<u32>) -> Option<Counters>;
}

/// The host's namespaces, read inside each (entering it when it is not tcptrace's own).
#[derive(Default)]
pub struct Host;

impl HostFacts for Host {
    fn settings(&mut self, netns: Option<u32>) -> Option<Settings> {
        crate::source::diag::in_netns(netns, || {
            Ok(SYSCTLS
                .iter()
                .filter_map(|name| {
                    let path = format!("/proc/sys/{}", name.replace('.', "/"));
                    let v = std::fs::read_to_string(path).ok()?;
                    Some((*name, v.split_whitespace().collect::<Vec<_>>().join(" ")))
                })
                .collect())
        })
    }

    fn counters(&mut self, netns: Option<u32>) -> Option<Counters> {
        crate::source::diag::in_netns(netns, || {
            // This thread's namespace (/proc/net is the main thread's).
            std::fs::read_to_string("/proc/thread-self/net/netstat").map(|s| Counters::parse(&s))
        })
    }
}

/// What a namespace's traffic showed during the run.
#[derive(Debug)]
pub struct Measured {
    /// Connections closed.
    pub closes: u64,
    /// Of which this host connected, closed first and so holds TIME_WAIT.
    pub outgoing_timewait: u64,
    /// Of which this host accepted and closed first (TIME_WAIT on the server).
    pub incoming_timewait: u64,
    /// Ended by the kernel giving up (retransmission or keepalive timeouts).
    pub timeouts: u64,
    /// Orphaned FIN_WAIT2 sockets that ended (their peer never sent its FIN), with how long
    /// they lasted.
    pub orphans: Histogram<u64>,
    /// TIME_WAIT sockets at most at once.
    pub timewait_peak: u64,
    /// Closes seen to get no timewait socket.
    pub timewait_not_created: u64,
    /// TIME_WAIT sockets of this host's outgoing connections ended early (taken over by a new
    /// connect on the same 4-tuple with `tcp_tw_reuse`, or reset).
    pub timewait_taken_over: u64,
    /// Each destination's fullest moment.
    pub destinations: Vec<(Dest, Peak)>,
}

impl Default for Measured {
    fn default() -> Self {
        Measured {
            closes: 0,
            outgoing_timewait: 0,
            incoming_timewait: 0,
            timeouts: 0,
            orphans: Histogram::new(3).expect("3 significant digits is valid"),
            timewait_peak: 0,
            timewait_not_created: 0,
            timewait_taken_over: 0,
            destinations: Vec::new(),
        }
    }
}

/// A port pressure worth a verdict: some destination's ports ran out, or nearly.
const PORT_USAGE_WARNING: f64 = 0.8;

fn setting(s: &Settings, name: &str) -> String {
    s.get(name).cloned().unwrap_or_else(|| "absent".into())
}

fn num(s: &Settings, name: &str) -> Option<u64> {
    s.get(name)?.split_whitespace().next()?.parse().ok()
}

fn dest_name(d: &Dest) -> String {
    format!("{}:{} (from {})", d.raddr, d.rport, d.laddr)
}

/// Every setting of one namespace, judged from `m` and the counters' movement `c`.
pub fn judge(s: &Settings, c: &Counters, m: &Measured) -> Vec<Finding> {
    vec![
        port_range(s, m),
        tw_reuse(s, m),
        tw_recycle(s),
        fin_timeout(s, m),
        max_tw_buckets(s, c, m),
        listen_queues(s, c),
        keepalive(s, m),
    ]
}

/// The destination that came closest to running out, if any held ports.
fn fullest(m: &Measured) -> Option<&(Dest, Peak)> {
    m.destinations.iter().max_by(|a, b| {
        (a.1.failures, a.1.usage)
            .partial_cmp(&(b.1.failures, b.1.usage))
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// Where the TIME_WAIT comes from, as advice: the side that closes first keeps it.
fn who_closes_first(m: &Measured) -> String {
    if m.outgoing_timewait > 0 {
        format!(
            "{} of this host's outgoing connections were closed first by this host, which \
             therefore keeps their TIME_WAIT (and its port) 60 s: reuse connections \
             (keep-alive, a pool) or let the server close first",
            m.outgoing_timewait
        )
    } else {
        "reuse connections (keep-alive, a pool) rather than opening one per request".into()
    }
}

fn port_range(s: &Settings, m: &Measured) -> Finding {
    let value = setting(s, "net.ipv4.ip_local_port_range");
    let Some((d, p)) = fullest(m) else {
        return Finding {
            sysctl: "net.ipv4.ip_local_port_range",
            value,
            verdict: Verdict::Ok,
            evidence: "no connection this host made held a local port".into(),
            advice: None,
        };
    };
    let seen = format!(
        "{} held {} of {} ports at most ({:.0}%), {} connects",
        dest_name(d),
        p.in_use,
        p.available,
        p.usage * 100.0,
        p.connects
    );
    let (verdict, evidence, advice) = if p.failures > 0 {
        (
            Verdict::Problem,
            format!(
                "{} connects to {} failed for want of a local port; {seen}",
                p.failures,
                dest_name(d)
            ),
            Some(format!(
                "{}; a wider range only delays it",
                who_closes_first(m)
            )),
        )
    } else if p.usage >= PORT_USAGE_WARNING {
        (Verdict::Warning, seen, Some(who_closes_first(m)))
    } else {
        (Verdict::Ok, seen, None)
    };
    Finding {
        sysctl: "net.ipv4.ip_local_port_range",
        value,
        verdict,
        evidence,
        advice,
    }
}

fn tw_reuse(s: &Settings, m: &Measured) -> Finding {
    let value = setting(s, "net.ipv4.tcp_tw_reuse");
    let reuse = num(s, "net.ipv4.tcp_tw_reuse").unwrap_or(0);
    let timestamps = num(s, "net.ipv4.tcp_timestamps").unwrap_or(1) != 0;
    let top = fullest(m);
    let pressure = top.is_some_and(|(_, p)| p.failures > 0 || p.usage >= PORT_USAGE_WARNING);
    let loopback_only = top.is_some_and(|(d, _)| !d.raddr.is_loopback()) && reuse == 2;
    let evidence = format!(
        "{} outgoing connections left TIME_WAIT here (tcp_tw_reuse can only let new connects \
         reuse those), {} incoming ones (it does nothing for them); {} of the outgoing ones' \
         TIME_WAIT sockets on an ephemeral port ended early (taken over by a new connect, or \
         reset); timestamps {}",
        m.outgoing_timewait,
        m.incoming_timewait,
        m.timewait_taken_over,
        if timestamps { "on" } else { "off" }
    );
    let (verdict, advice) = if pressure && (reuse == 0 || loopback_only) && m.outgoing_timewait > 0
    {
        if timestamps {
            (
                Verdict::Warning,
                Some(format!(
                    "ports run short toward a destination this host closes first to: \
                     tcp_tw_reuse=1 lets connects there take a TIME_WAIT port older than a \
                     second (safe with timestamps); better still, {}",
                    who_closes_first(m)
                )),
            )
        } else {
            (
                Verdict::Warning,
                Some("tcp_tw_reuse needs tcp_timestamps on to do anything".into()),
            )
        }
    } else if reuse != 0 && m.outgoing_timewait == 0 && m.incoming_timewait > 0 {
        (
            Verdict::Info,
            Some("this host's TIME_WAIT comes from connections it accepted: tcp_tw_reuse does not touch it; let clients close first".into()),
        )
    } else {
        (Verdict::Ok, None)
    };
    Finding {
        sysctl: "net.ipv4.tcp_tw_reuse",
        value,
        verdict,
        evidence,
        advice,
    }
}

fn tw_recycle(s: &Settings) -> Finding {
    match s.get("net.ipv4.tcp_tw_recycle") {
        None => Finding {
            sysctl: "net.ipv4.tcp_tw_recycle",
            value: "absent".into(),
            verdict: Verdict::Info,
            evidence: "removed in Linux 4.12".into(),
            advice: Some(
                "advice to set it is obsolete: it dropped connections from clients behind NAT"
                    .into(),
            ),
        },
        Some(v) => Finding {
            sysctl: "net.ipv4.tcp_tw_recycle",
            value: v.clone(),
            verdict: if v.trim() == "0" {
                Verdict::Ok
            } else {
                Verdict::Problem
            },
            evidence: "it drops SYNs from clients behind NAT whose timestamps go back".into(),
            advice: (v.trim() != "0").then(|| "set it to 0".into()),
        },
    }
}

fn fin_timeout(s: &Settings, m: &Measured) -> Finding {
    let value = setting(s, "net.ipv4.tcp_fin_timeout");
    let n = m.orphans.len();
    let evidence = if n > 0 {
        format!(
            "{n} orphaned FIN_WAIT2 sockets ended (their peers never sent a FIN), p99 {}; it \
             applies to those only, not to TIME_WAIT (60 s, fixed) — {} TIME_WAIT sockets at most \
             at once here",
            human_ns(m.orphans.value_at_quantile(0.99)),
            m.timewait_peak
        )
    } else {
        format!(
            "no orphaned FIN_WAIT2 socket ended; it applies to those only, not to TIME_WAIT \
             (60 s, fixed) — {} TIME_WAIT sockets at most at once here",
            m.timewait_peak
        )
    };
    let lowered = num(s, "net.ipv4.tcp_fin_timeout").is_some_and(|v| v < 60);
    let (verdict, advice) = if lowered && n == 0 && m.timewait_peak > 0 {
        (
            Verdict::Info,
            Some(
                "lowering it does not shorten TIME_WAIT; the side that closes first holds it"
                    .into(),
            ),
        )
    } else {
        (Verdict::Ok, None)
    };
    Finding {
        sysctl: "net.ipv4.tcp_fin_timeout",
        value,
        verdict,
        evidence,
        advice,
    }
}

fn max_tw_buckets(s: &Settings, c: &Counters, m: &Measured) -> Finding {
    let value = setting(s, "net.ipv4.tcp_max_tw_buckets");
    let limit = num(s, "net.ipv4.tcp_max_tw_buckets");
    let refused = c.timewait_overflow.max(m.timewait_not_created);
    let evidence = format!(
        "{refused} closes got no TIME_WAIT (TCPTimeWaitOverflow +{}); {} TIME_WAIT sockets at \
         most at once{}",
        c.timewait_overflow,
        m.timewait_peak,
        limit
            .map(|l| format!(" of {l} allowed"))
            .unwrap_or_default()
    );
    let near =
        limit.is_some_and(|l| l > 0 && m.timewait_peak.saturating_mul(10) >= l.saturating_mul(8));
    let (verdict, advice) = if refused > 0 {
        (
            Verdict::Problem,
            Some(format!(
                "the limit is reached: connections close without TIME_WAIT's protection \
                 (late segments can reach a new connection on the same 4-tuple); {}",
                who_closes_first(m)
            )),
        )
    } else if near {
        (Verdict::Warning, Some(who_closes_first(m)))
    } else {
        (Verdict::Ok, None)
    };
    Finding {
        sysctl: "net.ipv4.tcp_max_tw_buckets",
        value,
        verdict,
        evidence,
        advice,
    }
}

fn listen_queues(s: &Settings, c: &Counters) -> Finding {
    let value = format!(
        "somaxconn {}, tcp_max_syn_backlog {}, tcp_syncookies {}",
        setting(s, "net.core.somaxconn"),
        setting(s, "net.ipv4.tcp_max_syn_backlog"),
        setting(s, "net.ipv4.tcp_syncookies")
    );
    let evidence = format!(
        "ListenOverflows +{}, ListenDrops +{}, TCPReqQFullDrop +{}",
        c.listen_overflows, c.listen_drops, c.req_queue_full_drops
    );
    let (verdict, advice) = if c.listen_overflows > 0 {
        (
            Verdict::Problem,
            Some("a full accept queue dropped connections: the application accepts too slowly, or its listen() backlog (capped by somaxconn) is too small".into()),
        )
    } else if c.req_queue_full_drops > 0 {
        (
            Verdict::Problem,
            Some("a full SYN queue dropped handshakes: raise tcp_max_syn_backlog, or turn tcp_syncookies on".into()),
        )
    } else if c.listen_drops > 0 {
        (
            Verdict::Warning,
            Some("listeners dropped SYNs or handshakes".into()),
        )
    } else {
        (Verdict::Ok, None)
    };
    Finding {
        sysctl: "net.core.somaxconn, net.ipv4.tcp_max_syn_backlog, net.ipv4.tcp_syncookies",
        value,
        verdict,
        evidence,
        advice,
    }
}

fn keepalive(s: &Settings, m: &Measured) -> Finding {
    let value = setting(s, "net.ipv4.tcp_keepalive_time");
    Finding {
        sysctl: "net.ipv4.tcp_keepalive_time",
        value,
        verdict: if m.timeouts > 0 {
            Verdict::Info
        } else {
            Verdict::Ok
        },
        evidence: format!(
            "{} of {} connections ended by the kernel giving up (retransmission or keepalive \
             timeouts)",
            m.timeouts, m.closes
        ),
        advice: (m.timeouts > 0).then(|| {
            "keepalive ends idle connections whose peer vanished; it applies only to sockets \
             with SO_KEEPALIVE, and only after this long idle"
                .into()
        }),
    }
}

/// One namespace's findings.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kind: &'static str,
    pub netns: Option<u32>,
    pub findings: Vec<Finding>,
}

/// What doctor gathers per namespace, over a window (the whole run for `tcptrace doctor`,
/// each `--doctor-interval` for `serve`), and judges at its end.
pub struct Collector {
    facts: Box<dyn HostFacts>,
    /// Each namespace's counters at the window's start, read once (None: they could not
    /// be read, and are not asked for again before the window ends).
    start: FastMap<Option<u32>, Option<Counters>>,
    measured: FastMap<Option<u32>, Measured>,
    /// Namespaces whose settings could not be read (said once).
    unreadable: std::collections::HashSet<Option<u32>>,
}

impl Collector {
    /// Facts (settings, counters) from `facts`.
    pub fn new(facts: Box<dyn HostFacts>) -> Collector {
        Collector {
            facts,
            start: FastMap::default(),
            measured: FastMap::default(),
            unreadable: std::collections::HashSet::new(),
        }
    }

    /// The counters of these namespaces as they are now, the window's start (a namespace
    /// seen later starts from its first event).
    pub fn counters_at_start(&mut self, namespaces: &[Option<u32>]) {
        for n in namespaces {
            let c = self.facts.counters(*n);
            self.start.insert(*n, c);
        }
    }

    fn had_traffic(&mut self, netns: Option<u32>) -> &mut Measured {
        if !self.start.contains_key(&netns) {
            let c = self.facts.counters(netns);
            self.start.insert(netns, c);
        }
        self.measured.entry(netns).or_default()
    }

    /// A namespace had traffic.
    pub fn traffic(&mut self, netns: Option<u32>) {
        self.had_traffic(netns);
    }

    /// A connection's close (one the filter keeps).
    pub fn close(&mut self, c: &crate::analysis::closes::Close) {
        let m = self.had_traffic(c.netns);
        m.closes += 1;
        if c.timewait && c.initiator != Initiator::Remote {
            match c.role {
                Role::Client => m.outgoing_timewait += 1,
                Role::Server => m.incoming_timewait += 1,
                Role::Unknown => {}
            }
        }
        m.timeouts += u64::from(c.how == crate::analysis::closes::How::Timeout);
    }

    /// A timewait socket's end; `ephemeral`: on a port of its namespace's range.
    pub fn exit(&mut self, x: &crate::analysis::timewait::Exit, ephemeral: bool) {
        let m = self.had_traffic(x.netns);
        match x.end {
            End::NotCreated => m.timewait_not_created += 1,
            End::Killed if ephemeral => m.timewait_taken_over += 1,
            _ if x.substate == State::FinWait2 => {
                let _ = m.orphans.record(x.residency_ns.max(1));
            }
            _ => {}
        }
    }

    /// The timewait sockets alive now, by namespace.
    pub fn population<'a>(
        &mut self,
        lives: impl Iterator<Item = &'a crate::analysis::timewait::Life>,
    ) {
        let mut now: FastMap<Option<u32>, u64> = FastMap::default();
        for l in lives {
            *now.entry(l.netns).or_default() += 1;
        }
        for (netns, n) in now {
            let m = self.had_traffic(netns);
            m.timewait_peak = m.timewait_peak.max(n);
        }
    }

    /// Every namespace that had traffic in the window, judged, with the destinations'
    /// fullest moments `peaks`; then a new window starts.
    pub fn judge<'a>(&mut self, peaks: impl Iterator<Item = (&'a Dest, &'a Peak)>) -> Vec<Report> {
        for (d, p) in peaks {
            self.measured
                .entry(d.netns)
                .or_default()
                .destinations
                .push((*d, *p));
        }
        let mut netns: Vec<Option<u32>> = self.measured.keys().copied().collect();
        netns.sort();
        let reports = netns
            .into_iter()
            .filter_map(|n| {
                // A namespace whose settings cannot be read is not judged: no verdict
                // without its values (tcptrace says so once).
                let Some(settings) = self.facts.settings(n) else {
                    if self.unreadable.insert(n) {
                        log::warn!(
                            "doctor cannot read the settings of network namespace {} \
                             (entering it needs CAP_SYS_ADMIN): not judged",
                            n.map_or("?".into(), |n| n.to_string())
                        );
                    }
                    return None;
                };
                let now = self.facts.counters(n);
                let before = self.start.get(&n).copied().flatten();
                let moved = match (&now, &before) {
                    (Some(now), Some(before)) => now.since(before),
                    _ => Counters::default(),
                };
                self.start.insert(n, now);
                let m = &self.measured[&n];
                let mut findings = judge(&settings, &moved, m);
                findings.sort_by_key(|f| f.verdict);
                Some(Report {
                    kind: "doctor",
                    netns: n,
                    findings,
                })
            })
            .collect();
        self.measured.clear();
        reports
    }
}

/// How often the doctor view samples the ports held and the TIME_WAIT population.
const SAMPLE_EVERY_NS: u64 = NS_PER_SEC;

/// The view.
pub struct Doctor<W: Write> {
    pipe: Pipeline,
    /// The destinations' ports, counted from the same pipeline's transitions and exits.
    ports: PortsCore,
    collector: Collector,
    out: W,
    format: Format,
    /// Each second (of events or ticks), the ports and the TIME_WAIT population are sampled.
    sample: Interval,
    problems: std::rc::Rc<std::cell::Cell<usize>>,
}

impl<W: Write> Doctor<W> {
    /// Judges what `filter` keeps, with facts from `facts` and port ranges from `ranges`.
    pub fn new(
        filter: CompiledFilter,
        facts: Box<dyn HostFacts>,
        ranges: Box<dyn Ranges>,
        out: W,
        format: Format,
    ) -> Self {
        Doctor {
            pipe: Pipeline::new(filter).tracking().timewaits(true),
            ports: PortsCore::new(ranges, 0),
            collector: Collector::new(facts),
            out,
            format,
            sample: Interval::new(SAMPLE_EVERY_NS),
            problems: std::rc::Rc::default(),
        }
    }

    /// Whether timewait timers are traced.
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

    /// What existed at start (`now_ns`), for the ports held: the connections this host made
    /// that are open, and the TIME_WAIT sockets.
    pub fn seed(mut self, open: &OpenAtStart, timewaits: &[DiagTimewait], now_ns: u64) -> Self {
        self.ports.seed(open, timewaits, now_ns, self.pipe.filter());
        self
    }

    /// The counters of these namespaces as they are before tracing (every namespace seen
    /// later starts from its first event).
    pub fn counters_at_start(mut self, namespaces: &[Option<u32>]) -> Self {
        self.collector.counters_at_start(namespaces);
        self
    }

    /// Leaves the number of settings that are a problem in `cell` at the end (for the exit
    /// status).
    pub fn count_problems_in(mut self, cell: std::rc::Rc<std::cell::Cell<usize>>) -> Self {
        self.problems = cell;
        self
    }

    fn fold_conclusions(&mut self) {
        let mut closes = std::mem::take(&mut self.pipe.closes);
        for c in closes.drain(..) {
            if self.pipe.filter().keeps_close(&c) {
                self.collector.close(&c);
            }
        }
        self.pipe.closes = closes;
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if !self.pipe.filter().keeps_exit(&x) {
                continue;
            }
            self.ports.exit(&x);
            let ephemeral = self.ports.ephemeral(x.netns, x.local.port());
            self.collector.exit(&x, ephemeral);
        }
        self.pipe.exits = exits;
    }

    /// Moves the sampling clock to `now`; each second, the ports held and the TIME_WAIT
    /// population (what the filter keeps).
    fn advance(&mut self, now: u64) {
        if self.sample.advance(now) {
            self.sample.restart();
            self.sample_now();
        }
    }

    fn sample_now(&mut self) {
        self.ports
            .snapshot(&timewait_tuples(&self.pipe), self.sample.now());
        if let Some(t) = self.pipe.timewait_sockets() {
            let filter = self.pipe.filter();
            self.collector
                .population(t.population().filter(|l| filter.keeps_life(l)));
        }
    }

    /// Every namespace that had traffic, judged.
    pub fn reports(&mut self) -> Vec<Report> {
        self.collector.judge(self.ports.peaks())
    }
}

/// One namespace's findings as text.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "network namespace {}",
        r.netns.map_or("?".into(), |n| n.to_string())
    );
    for f in &r.findings {
        let _ = writeln!(s, "  {:<8} {} = {}", f.verdict.name(), f.sysctl, f.value);
        let _ = writeln!(s, "           {}", f.evidence);
        if let Some(a) = &f.advice {
            let _ = writeln!(s, "           → {a}");
        }
    }
    s
}

impl<W: Write> View for Doctor<W> {
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
                self.collector.traffic(t.netns);
                self.ports.transition(t, self.pipe.filter().keeps(t));
            }
            self.pipe.fold(&ev);
            self.fold_conclusions();
            self.advance(ev.ts_ns());
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        self.fold_conclusions();
        self.advance(now_ns);
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.fold_conclusions();
        self.sample_now();
        let reports = self.reports();
        self.problems.set(
            reports
                .iter()
                .flat_map(|r| &r.findings)
                .filter(|f| f.verdict == Verdict::Problem)
                .count(),
        );
        for r in &reports {
            match self.format {
                Format::Json => {
                    serde_json::to_writer(&mut self.out, r)?;
                    writeln!(self.out)?;
                }
                Format::Text => write!(self.out, "{}", render_text(r))?,
            }
        }
        if reports.is_empty() && self.format == Format::Text {
            writeln!(self.out, "no TCP traffic seen: nothing to judge")?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&'static str, &str)]) -> Settings {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    fn dest() -> Dest {
        Dest {
            netns: Some(1),
            laddr: "10.0.0.1".parse().unwrap(),
            raddr: "10.0.0.2".parse().unwrap(),
            rport: 5432,
        }
    }

    fn peak(in_use: u64, available: u64, failures: u64) -> Peak {
        Peak {
            in_use,
            available,
            usage: in_use as f64 / available as f64,
            failures,
            connects: 100,
        }
    }

    fn find<'a>(f: &'a [Finding], sysctl: &str) -> &'a Finding {
        f.iter().find(|x| x.sysctl == sysctl).unwrap()
    }

    #[test]
    fn ports_that_ran_out_are_a_problem_with_the_destination_and_who_closes_first() {
        let s = settings(&[("net.ipv4.ip_local_port_range", "40000 40049")]);
        let m = Measured {
            outgoing_timewait: 60,
            destinations: vec![(dest(), peak(50, 50, 12))],
            ..Measured::default()
        };
        let f = judge(&s, &Counters::default(), &m);
        let r = find(&f, "net.ipv4.ip_local_port_range");
        assert_eq!(r.verdict, Verdict::Problem);
        assert!(
            r.evidence.contains("12 connects to 10.0.0.2:5432"),
            "{}",
            r.evidence
        );
        assert!(
            r.advice
                .as_ref()
                .unwrap()
                .contains("closed first by this host")
        );
        let nearly = Measured {
            destinations: vec![(dest(), peak(45, 50, 0))],
            ..Measured::default()
        };
        let f = judge(&s, &Counters::default(), &nearly);
        assert_eq!(
            find(&f, "net.ipv4.ip_local_port_range").verdict,
            Verdict::Warning
        );
        let calm = Measured {
            destinations: vec![(dest(), peak(5, 50, 0))],
            ..Measured::default()
        };
        let f = judge(&s, &Counters::default(), &calm);
        assert_eq!(
            find(&f, "net.ipv4.ip_local_port_range").verdict,
            Verdict::Ok
        );
        let f = judge(&s, &Counters::default(), &Measured::default());
        assert_eq!(
            find(&f, "net.ipv4.ip_local_port_range").verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn tw_reuse_is_advised_only_for_outgoing_time_wait_under_port_pressure() {
        let m = Measured {
            outgoing_timewait: 60,
            destinations: vec![(dest(), peak(50, 50, 3))],
            ..Measured::default()
        };
        let on = settings(&[
            ("net.ipv4.tcp_tw_reuse", "0"),
            ("net.ipv4.tcp_timestamps", "1"),
        ]);
        let f = judge(&on, &Counters::default(), &m);
        let r = find(&f, "net.ipv4.tcp_tw_reuse");
        assert_eq!(r.verdict, Verdict::Warning);
        assert!(r.advice.as_ref().unwrap().contains("tcp_tw_reuse=1"));
        let off = settings(&[
            ("net.ipv4.tcp_tw_reuse", "0"),
            ("net.ipv4.tcp_timestamps", "0"),
        ]);
        let f = judge(&off, &Counters::default(), &m);
        assert!(
            find(&f, "net.ipv4.tcp_tw_reuse")
                .advice
                .as_ref()
                .unwrap()
                .contains("tcp_timestamps")
        );
        // Already on, with the pressure gone: ok.
        let reused = settings(&[
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.tcp_timestamps", "1"),
        ]);
        let relieved = Measured {
            outgoing_timewait: 60,
            destinations: vec![(dest(), peak(10, 50, 0))],
            ..Measured::default()
        };
        let f = judge(&reused, &Counters::default(), &relieved);
        assert_eq!(find(&f, "net.ipv4.tcp_tw_reuse").verdict, Verdict::Ok);
        // TIME_WAIT from accepted connections: it cannot help.
        let server = Measured {
            incoming_timewait: 500,
            ..Measured::default()
        };
        let f = judge(&reused, &Counters::default(), &server);
        let r = find(&f, "net.ipv4.tcp_tw_reuse");
        assert_eq!(r.verdict, Verdict::Info);
        assert!(
            r.advice
                .as_ref()
                .unwrap()
                .contains("let clients close first")
        );
    }

    #[test]
    fn the_removed_recycle_and_the_fin_timeout_myth() {
        let f = judge(&Settings::new(), &Counters::default(), &Measured::default());
        let r = find(&f, "net.ipv4.tcp_tw_recycle");
        assert_eq!((r.verdict, r.value.as_str()), (Verdict::Info, "absent"));
        let old = settings(&[("net.ipv4.tcp_tw_recycle", "1")]);
        let f = judge(&old, &Counters::default(), &Measured::default());
        assert_eq!(
            find(&f, "net.ipv4.tcp_tw_recycle").verdict,
            Verdict::Problem
        );
        let lowered = settings(&[("net.ipv4.tcp_fin_timeout", "15")]);
        let busy = Measured {
            timewait_peak: 3000,
            ..Measured::default()
        };
        let f = judge(&lowered, &Counters::default(), &busy);
        let r = find(&f, "net.ipv4.tcp_fin_timeout");
        assert_eq!(r.verdict, Verdict::Info);
        assert!(
            r.advice
                .as_ref()
                .unwrap()
                .contains("does not shorten TIME_WAIT")
        );
        let mut orphans = Measured::default();
        let _ = orphans.orphans.record(60_000_000_000);
        let f = judge(&lowered, &Counters::default(), &orphans);
        let r = find(&f, "net.ipv4.tcp_fin_timeout");
        assert!(
            r.evidence.contains("1 orphaned FIN_WAIT2"),
            "{}",
            r.evidence
        );
    }

    #[test]
    fn time_wait_overflow_and_listen_drops_are_problems_with_their_counts() {
        let s = settings(&[("net.ipv4.tcp_max_tw_buckets", "5")]);
        let overflow = Counters {
            timewait_overflow: 42,
            ..Counters::default()
        };
        let f = judge(&s, &overflow, &Measured::default());
        let r = find(&f, "net.ipv4.tcp_max_tw_buckets");
        assert_eq!(r.verdict, Verdict::Problem);
        assert!(
            r.evidence.contains("42 closes got no TIME_WAIT"),
            "{}",
            r.evidence
        );
        let near = Measured {
            timewait_peak: 5,
            ..Measured::default()
        };
        let f = judge(&s, &Counters::default(), &near);
        assert_eq!(
            find(&f, "net.ipv4.tcp_max_tw_buckets").verdict,
            Verdict::Warning
        );
        let queues = "net.core.somaxconn, net.ipv4.tcp_max_syn_backlog, net.ipv4.tcp_syncookies";
        let full = Counters {
            listen_overflows: 7,
            ..Counters::default()
        };
        let f = judge(&s, &full, &Measured::default());
        assert_eq!(find(&f, queues).verdict, Verdict::Problem);
        let f = judge(&s, &Counters::default(), &Measured::default());
        assert_eq!(find(&f, queues).verdict, Verdict::Ok);
        let timeouts = Measured {
            closes: 10,
            timeouts: 2,
            ..Measured::default()
        };
        let f = judge(&s, &Counters::default(), &timeouts);
        assert_eq!(
            find(&f, "net.ipv4.tcp_keepalive_time").verdict,
            Verdict::Info
        );
    }

    /// Namespace 1 readable, with its TIME_WAIT overflow counter moving by 3 between reads;
    /// namespace 2 not readable.
    struct Fake {
        reads: u64,
    }

    impl HostFacts for Fake {
        fn settings(&mut self, netns: Option<u32>) -> Option<Settings> {
            (netns == Some(1)).then(|| settings(&[("net.ipv4.tcp_max_tw_buckets", "5")]))
        }
        fn counters(&mut self, netns: Option<u32>) -> Option<Counters> {
            if netns != Some(1) {
                return None;
            }
            self.reads += 1;
            Some(Counters {
                timewait_overflow: 3 * self.reads,
                ..Counters::default()
            })
        }
    }

    #[test]
    fn a_namespace_is_judged_on_its_own_counters_and_only_if_readable() {
        let mut c = Collector::new(Box::new(Fake { reads: 0 }));
        c.counters_at_start(&[Some(1), Some(2)]);
        c.traffic(Some(1));
        c.traffic(Some(2));
        let reports = c.judge(std::iter::empty());
        assert_eq!(reports.len(), 1, "namespace 2 cannot be read: {reports:?}");
        assert_eq!(reports[0].netns, Some(1));
        let f = find(&reports[0].findings, "net.ipv4.tcp_max_tw_buckets");
        assert_eq!(f.verdict, Verdict::Problem);
        assert!(
            f.evidence.contains("TCPTimeWaitOverflow +3"),
            "{}",
            f.evidence
        );
        // The next window starts from the end of this one.
        c.traffic(Some(1));
        let again = c.judge(std::iter::empty());
        let f = find(&again[0].findings, "net.ipv4.tcp_max_tw_buckets");
        assert!(
            f.evidence.contains("TCPTimeWaitOverflow +3"),
            "{}",
            f.evidence
        );
    }

    #[test]
    fn counters_parse_from_netstat_and_subtract() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPTimeWaitOverflow TCPReqQFullDrop\n\
                    TcpExt: 0 3 4 17 2\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let c = Counters::parse(text);
        assert_eq!(
            c,
            Counters {
                timewait_overflow: 17,
                listen_overflows: 3,
                listen_drops: 4,
                req_queue_full_drops: 2
            }
        );
        let before = Counters {
            timewait_overflow: 10,
            ..Counters::default()
        };
        assert_eq!(c.since(&before).timewait_overflow, 7);
    }
}
