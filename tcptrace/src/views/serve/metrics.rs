//! `tcptrace serve`: the analysis as Prometheus metrics.
//!
//! [`Metrics`] is a [`View`] like the others — events in, no kernel needed — that keeps its
//! counts in `prometheus-client` metric families instead of printing them. The families are
//! shared (atomics behind `Arc`s) with the [`Registry`] that the HTTP side encodes on each
//! scrape, so a scrape never waits for the event loop and never sees a half-updated batch of
//! more than one metric.
//!
//! Label cardinality is bounded: a port gets its own `port` label only when this host
//! listens on it (every accepted connection proves a listener) or the operator allowed it
//! (`--label-port`), and at most `--max-port-labels` of them; everything else is `other`.
//! Namespace labels (`--label-netns`) are capped the same way.

use std::{io, ops::RangeInclusive};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::{
    analysis::{
        closes::{How, Initiator, Role, service_port},
        pipeline::Pipeline,
        timewait,
        timewait::End,
    },
    model::{
        event::{Details, Direction, Event, RawEvent, State},
        filter::CompiledFilter,
    },
    shared::{FastMap, NS_PER_SEC, ns_to_secs},
    views::{Flow, View},
};

/// The port the exporter listens on unless told otherwise (`127.0.0.1:9977`).
pub const DEFAULT_PORT: u16 = 9977;

/// How many ports get their own label unless told otherwise.
pub const DEFAULT_MAX_PORT_LABELS: usize = 100;

/// How many network namespaces get their own label (with `--label-netns`) unless told
/// otherwise.
pub const DEFAULT_MAX_NETNS_LABELS: usize = 100;

/// The `port` label: a port number, or `other` for the ports without a label of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortLabel {
    /// A port with its own label.
    Port(u16),
    /// Every other port.
    Other,
}

impl EncodeLabelValue for PortLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        match self {
            PortLabel::Port(p) => EncodeLabelValue::encode(p, encoder),
            PortLabel::Other => EncodeLabelValue::encode(&"other", encoder),
        }
    }
}

/// The optional `netns` label: absent unless `--label-netns`; the namespace's inode;
/// `unknown` when the kernel could not say (a reset without a socket, an offset missing from
/// BTF); `other` past the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NsLabel {
    /// Namespaces are not labelled: no `netns` label at all.
    Off,
    /// The namespace's inode.
    Inode(u32),
    /// Not known.
    Unknown,
    /// Past `--max-netns-labels`.
    Other,
}

impl EncodeLabelSet for NsLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeLabel as _;
        match self {
            NsLabel::Off => Ok(()),
            NsLabel::Inode(n) => ("netns", *n).encode(encoder.encode_label()),
            NsLabel::Unknown => ("netns", "unknown").encode(encoder.encode_label()),
            NsLabel::Other => ("netns", "other").encode(encoder.encode_label()),
        }
    }
}

/// Labels of `tcptrace_transitions_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_closes_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CloseLabels {
    port: PortLabel,
    role: &'static str,
    initiator: &'static str,
    how: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of the per-connection counters' series: the close's service port and role.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabels {
    port: PortLabel,
    role: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_connection_bytes_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    port: PortLabel,
    role: &'static str,
    /// `sent` (acknowledged by the peer) or `received`.
    direction: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_stuck_sockets`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StuckLabels {
    state: &'static str,
    port: PortLabel,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_stuck_oldest_seconds`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StuckStateLabels {
    state: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of the TIME_WAIT population and entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PortLabels {
    port: PortLabel,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_timewait_exits_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ExitLabels {
    port: PortLabel,
    end: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_state_duration_seconds`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_port_usage_ratio`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DestinationLabels {
    /// `ADDR:PORT` of the destination.
    destination: String,
    /// The local address connects are made from.
    laddr: String,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_doctor_verdict`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerdictLabels {
    sysctl: &'static str,
    verdict: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_connect_failures_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

/// Labels of `tcptrace_timewait_residency_seconds`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResidencyLabels {
    substate: &'static str,
    #[prometheus(flatten)]
    netns: NsLabel,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Bucket bounds of the state durations: 1, 2.5 and 5 per decade from 10 µs to 1000 s
/// (connect latencies in microseconds to CLOSE_WAIT left open for minutes).
fn duration_buckets() -> Histogram {
    let mut b = Vec::with_capacity(25);
    let mut decade = 1e-5;
    while decade <= 1000.0 {
        b.extend([decade, decade * 2.5, decade * 5.0]);
        decade *= 10.0;
    }
    b.truncate(b.iter().position(|&x| x > 1000.0).unwrap_or(b.len()));
    Histogram::new(b)
}

/// Bucket bounds of TIME_WAIT residency: fine around the 60 s 2MSL expiry, coarse below
/// (sockets killed early) and above (FIN_WAIT2 orphans, `tcp_fin_timeout`).
fn residency_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.01, 0.1, 1.0, 5.0, 10.0, 30.0, 59.0, 60.0, 60.5, 61.0, 62.0, 65.0, 90.0, 120.0,
        180.0,
    ])
}

/// Bucket bounds of round-trip times: 1, 2.5 and 5 per decade from 10 µs to 10 s.
fn rtt_buckets() -> Histogram {
    let mut b = Vec::with_capacity(19);
    let mut decade = 1e-5;
    while decade < 10.0 {
        b.extend([decade, decade * 2.5, decade * 5.0]);
        decade *= 10.0;
    }
    b.push(10.0);
    Histogram::new(b)
}

/// Which ports get a `port` label of their own.
#[derive(Clone, Debug, Default)]
pub struct PortPolicy {
    /// Ports (and ranges) the operator allowed, listener or not.
    pub allow: Vec<RangeInclusive<u16>>,
    /// At most this many distinct port labels.
    pub max: usize,
}

impl PortPolicy {
    fn allowed(&self, port: u16) -> bool {
        self.allow.iter().any(|r| r.contains(&port))
    }
}

/// The labels handed out so far, with their caps.
#[derive(Debug)]
struct Labeller {
    policy: PortPolicy,
    ports: FastMap<u16, PortLabel>,
    netns_on: bool,
    max_netns: usize,
    netns: FastMap<u32, NsLabel>,
}

impl Labeller {
    /// The label of a service port. `listener` says this host listens on it.
    fn port(&mut self, port: u16, listener: bool) -> PortLabel {
        if let Some(l) = self.ports.get(&port) {
            return *l;
        }
        if !(listener || self.policy.allowed(port)) {
            return PortLabel::Other;
        }
        if self.ports.len() >= self.policy.max {
            return PortLabel::Other;
        }
        self.ports.insert(port, PortLabel::Port(port));
        PortLabel::Port(port)
    }

    fn netns(&mut self, inode: Option<u32>) -> NsLabel {
        if !self.netns_on {
            return NsLabel::Off;
        }
        let Some(inode) = inode else {
            return NsLabel::Unknown;
        };
        if let Some(l) = self.netns.get(&inode) {
            return *l;
        }
        if self.netns.len() >= self.max_netns {
            return NsLabel::Other;
        }
        self.netns.insert(inode, NsLabel::Inode(inode));
        NsLabel::Inode(inode)
    }
}

/// What the exporter's labels may be.
#[derive(Clone, Debug)]
pub struct LabelConfig {
    /// Port labels.
    pub ports: PortPolicy,
    /// Label series by network namespace.
    pub netns: bool,
    /// At most this many namespace labels.
    pub max_netns: usize,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            ports: PortPolicy {
                allow: Vec::new(),
                max: DEFAULT_MAX_PORT_LABELS,
            },
            netns: false,
            max_netns: DEFAULT_MAX_NETNS_LABELS,
        }
    }
}

/// The metric families, shared between the view (which updates them) and the registry
/// (which encodes them).
#[derive(Clone, Debug)]
struct Families {
    transitions: Family<TransitionLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    tw_sockets: Family<PortLabels, Gauge>,
    tw_entries: Family<PortLabels, Counter>,
    tw_exits: Family<ExitLabels, Counter>,
    tw_residency: HistFamily<ResidencyLabels>,
    durations: HistFamily<StateLabels>,
    lost: Counter,
    evicted: Counter,
    tracked: Gauge,
    tw_traced: Gauge,
    port_usage: Family<DestinationLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    connect_failures: Family<FailureLabels, Counter>,
    doctor: Family<VerdictLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    segments_sent: Family<RoleLabels, Counter>,
    retransmits: Family<RoleLabels, Counter>,
    rtt: HistFamily<RoleLabels>,
    stuck: Family<StuckLabels, Gauge>,
    stuck_oldest: Family<StuckStateLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Families {
    fn new() -> Self {
        Families {
            transitions: Family::default(),
            closes: Family::default(),
            tw_sockets: Family::default(),
            tw_entries: Family::default(),
            tw_exits: Family::default(),
            tw_residency: Family::new_with_constructor(residency_buckets),
            durations: Family::new_with_constructor(duration_buckets),
            lost: Counter::default(),
            evicted: Counter::default(),
            tracked: Gauge::default(),
            tw_traced: Gauge::default(),
            port_usage: Family::default(),
            connect_failures: Family::default(),
            doctor: Family::default(),
            bytes: Family::default(),
            segments_sent: Family::default(),
            retransmits: Family::default(),
            rtt: Family::new_with_constructor(rtt_buckets),
            stuck: Family::default(),
            stuck_oldest: Family::default(),
        }
    }

    /// Registers every family with `r`, in the order a scrape lists them.
    fn register(&self, r: &mut Registry) {
        self.register_connections(r);
        self.register_stuck(r);
        self.register_timewait(r);
        self.register_state_durations(r);
        self.register_tracing(r);
        self.register_settings(r);
        self.register_timers_traced(r);
    }

    /// Connections' transitions and ends, with the counters read from each at its end.
    fn register_connections(&self, r: &mut Registry) {
        r.register(
            "transitions",
            "TCP state transitions, by the state left and the state entered",
            self.transitions.clone(),
        );
        r.register(
            "closes",
            "Connections ended, by service port (the listening port of accepted connections, \
             the remote port of outgoing ones), this host's role (server: accepted, client: \
             connected), who closed first (local, remote, simultaneous) and how (fin, \
             rst_sent, rst_received, refused, timeout)",
            self.closes.clone(),
        );
        r.register(
            "connection_bytes",
            "Bytes of ended connections, by service port, role and direction (sent: \
             acknowledged by the peer; received: in order), read from each socket at its end",
            self.bytes.clone(),
        );
        r.register(
            "segments_sent",
            "Segments ended connections sent, retransmissions included, by service port and \
             role",
            self.segments_sent.clone(),
        );
        r.register(
            "retransmitted_segments",
            "Segments ended connections retransmitted, by service port and role",
            self.retransmits.clone(),
        );
        r.register_with_unit(
            "round_trip_time",
            "Smoothed round-trip time of each ended connection that measured one, at its end, \
             by service port and role",
            Unit::Seconds,
            self.rtt.clone(),
        );
    }

    /// Sockets stuck in a state they should pass through.
    fn register_stuck(&self, r: &mut Registry) {
        r.register(
            "stuck_sockets",
            "Sockets sitting longer than --stuck-older-than in a state they should only pass \
             through (CLOSE_WAIT: an application that never closed after its peer did; \
             FIN_WAIT1/2, LAST_ACK, CLOSING, SYN_SENT, SYN_RECV: no answer), by state and \
             service port, every --stuck-interval",
            self.stuck.clone(),
        );
        r.register_with_unit(
            "stuck_oldest",
            "How long the oldest of those sockets has sat in its state, by state (a lower \
             bound for one that was there before tcptrace started)",
            Unit::Seconds,
            self.stuck_oldest.clone(),
        );
    }

    /// The TIME_WAIT population: held now, entered, ended, and how long each lasted.
    fn register_timewait(&self, r: &mut Registry) {
        r.register(
            "timewait_sockets",
            "TIME_WAIT sockets on this host now, by service port (those entered since tcptrace \
             started; needs timewait timers traced)",
            self.tw_sockets.clone(),
        );
        r.register(
            "timewait_entries",
            "Connections this host closed into TIME_WAIT, by service port",
            self.tw_entries.clone(),
        );
        r.register(
            "timewait_exits",
            "TIME_WAIT sockets ended, by service port and end (expired: the 2MSL timer; \
             killed: early, e.g. port reuse or a reset; not_created: tcp_max_tw_buckets \
             reached)",
            self.tw_exits.clone(),
        );
        r.register_with_unit(
            "timewait_residency",
            "How long TIME_WAIT sockets lasted, creation to expiry or kill, by substate \
             (TIME_WAIT, or FIN_WAIT2 for orphans waiting for the peer's FIN)",
            Unit::Seconds,
            self.tw_residency.clone(),
        );
    }

    /// The time spent in each TCP state.
    fn register_state_durations(&self, r: &mut Registry) {
        r.register_with_unit(
            "state_duration",
            "Time spent in each TCP state, measured when the socket leaves it (SYN_SENT: \
             connect latency; CLOSE_WAIT: how long applications keep a closed connection)",
            Unit::Seconds,
            self.durations.clone(),
        );
    }

    /// What tcptrace itself missed or follows: lost events, evicted and tracked sockets.
    fn register_tracing(&self, r: &mut Registry) {
        r.register(
            "lost_events",
            "Events the kernel could not deliver (ring buffer full, or a nested run skipped)",
            self.lost.clone(),
        );
        r.register(
            "evicted_sockets",
            "Sockets tcptrace stopped following because --max-sockets was reached",
            self.evicted.clone(),
        );
        r.register(
            "tracked_sockets",
            "Open connections tcptrace follows in userspace now (0 where the kernel sends one \
             record per connection and keeps the open ones with their sockets)",
            self.tracked.clone(),
        );
    }

    /// What the settings cost: ports held per destination, the doctor's verdicts, failed connects.
    fn register_settings(&self, r: &mut Registry) {
        r.register(
            "port_usage_ratio",
            "Local ports held toward a destination (open connections this host made, and \
             TIME_WAIT sockets on a port of the range) over those ip_local_port_range allows; \
             1 means connects there fail (the fullest --max-port-labels destinations)",
            self.port_usage.clone(),
        );
        r.register(
            "doctor_verdict",
            "tcptrace doctor's verdict on each setting over the last --doctor-interval, from \
             what the traffic showed: 1 on the verdict given (problem, warning, ok, info), 0 on \
             the others",
            self.doctor.clone(),
        );
        r.register(
            "connect_failures",
            "Connects that failed before reaching the network, by reason (no_port: no free \
             local port, EADDRNOTAVAIL)",
            self.connect_failures.clone(),
        );
    }

    /// Whether timewait sockets' timers are traced.
    fn register_timers_traced(&self, r: &mut Registry) {
        r.register(
            "timewait_timers_traced",
            "1 when timewait sockets' timers are traced (TIME_WAIT exits and population), 0 \
             when this kernel does not allow it",
            self.tw_traced.clone(),
        );
    }
}

/// The series of `family` whose labels `labels` makes, through `hot`: handles by a small key,
/// so that the hot path is one lookup and an atomic add rather than the family's lock and
/// label hashing (no series of these families is ever removed, so a handle stays its).
fn series<'a, K, S, M, C>(
    hot: &'a mut FastMap<K, M>,
    key: K,
    family: &Family<S, M, C>,
    labels: impl FnOnce() -> S,
) -> &'a M
where
    K: std::hash::Hash + Eq,
    S: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: MetricConstructor<M>,
{
    hot.entry(key)
        .or_insert_with(|| family.get_or_create_owned(&labels()))
}

/// The exporter's view: events in, metric families updated.
pub struct Metrics {
    /// Tracks every socket, follows timewait sockets.
    pipe: Pipeline,
    families: Families,
    labels: Labeller,
    /// The labels of each connection now in TIME_WAIT, and when it entered.
    /// By the digest of its 4-tuple ([`timewait::tuple_key`]).
    tw_labels: FastMap<u64, (PortLabels, u64)>,
    last_sweep_ns: u64,
    evicted_seen: u64,
    /// Handles on the per-transition series, so that the hot path is one small-key lookup
    /// and an atomic add rather than a family's lock and label hashing.
    hot_transitions: FastMap<(State, State, NsLabel), Counter>,
    hot_durations: FastMap<(State, NsLabel), Histogram>,
    /// The same for the per-connection counters' series, by port, role and namespace.
    hot_details: FastMap<(PortLabel, &'static str, NsLabel), DetailSeries>,
    hot_closes: FastMap<(PortLabel, Role, Initiator, How, NsLabel), Counter>,
    hot_tw_entries: FastMap<PortLabels, Counter>,
    hot_tw_sockets: FastMap<PortLabels, Gauge>,
    hot_exits: FastMap<(PortLabel, End, NsLabel), Counter>,
    hot_residency: FastMap<(State, NsLabel), Histogram>,
    /// Ports held per destination.
    ports: crate::views::ports::PortsCore,
    /// The destinations labelled now (the fullest, up to the port labels' cap).
    port_series: Vec<DestinationLabels>,
    last_ports_ns: u64,
    /// Doctor's evidence over the current window, its length, and when it began.
    doctor: Option<(crate::views::doctor::Collector, u64, u64)>,
    /// The latest event's time.
    last_ts: u64,
    /// Stuck sockets, scanned every interval, and the series set by the last scan.
    stuck: Option<crate::views::stuck::Watch>,
    stuck_series: (Vec<StuckLabels>, Vec<StuckStateLabels>),
}

/// Handles on one (port, role, namespace)'s per-connection counter series.
#[derive(Clone, Debug)]
struct DetailSeries {
    sent: Counter,
    received: Counter,
    segments: Counter,
    retransmits: Counter,
    rtt: Histogram,
}

impl DetailSeries {
    fn of(f: &Families, key: RoleLabels) -> Self {
        let bytes = |direction| {
            f.bytes.get_or_create_owned(&BytesLabels {
                port: key.port,
                role: key.role,
                direction,
                netns: key.netns,
            })
        };
        DetailSeries {
            sent: bytes("sent"),
            received: bytes("received"),
            segments: f.segments_sent.get_or_create_owned(&key),
            retransmits: f.retransmits.get_or_create_owned(&key),
            rtt: f.rtt.get_or_create_owned(&key),
        }
    }
}

/// How often the ports held are counted.
const PORTS_EVERY_NS: u64 = NS_PER_SEC;

impl Metrics {
    /// An exporter of what `filter` keeps, its families registered in `registry` under the
    /// `tcptrace_` prefix.
    pub fn new(filter: CompiledFilter, labels: LabelConfig, registry: &mut Registry) -> Self {
        let families = Families::new();
        families.register(registry.sub_registry_with_prefix("tcptrace"));
        Metrics {
            pipe: Pipeline::new(filter).tracking().timewaits(false),
            families,
            labels: Labeller {
                policy: labels.ports,
                ports: FastMap::default(),
                netns_on: labels.netns,
                max_netns: labels.max_netns,
                netns: FastMap::default(),
            },
            tw_labels: FastMap::default(),
            last_sweep_ns: 0,
            evicted_seen: 0,
            hot_transitions: FastMap::default(),
            hot_durations: FastMap::default(),
            hot_details: FastMap::default(),
            hot_closes: FastMap::default(),
            hot_tw_entries: FastMap::default(),
            hot_tw_sockets: FastMap::default(),
            hot_exits: FastMap::default(),
            hot_residency: FastMap::default(),
            ports: crate::views::ports::PortsCore::new(
                Box::new(crate::views::ports::HostRanges::default()),
                0,
            ),
            port_series: Vec::new(),
            last_ports_ns: 0,
            doctor: None,
            last_ts: 0,
            stuck: None,
            stuck_series: (Vec::new(), Vec::new()),
        }
    }

    /// Judges the settings every `interval_ns` from what the traffic showed, with facts from
    /// `facts` (tcptrace_doctor_verdict).
    /// The counters of `namespaces` are taken now, the first window's start.
    pub fn doctor(
        mut self,
        facts: Box<dyn crate::views::doctor::HostFacts>,
        interval_ns: u64,
        namespaces: &[Option<u32>],
    ) -> Self {
        let mut collector = crate::views::doctor::Collector::new(facts);
        collector.counters_at_start(namespaces);
        self.doctor = Some((collector, interval_ns.max(1), 0));
        self
    }

    /// Counts stuck sockets from `watch`'s scans (tcptrace_stuck_sockets).
    pub fn stuck(mut self, watch: crate::views::stuck::Watch) -> Self {
        self.stuck = Some(watch);
        self
    }

    /// Scans for stuck sockets if the interval has passed, and sets their series; a series
    /// of the last scan that this one did not set goes away.
    fn sync_stuck(&mut self, now_ns: u64) {
        let Some(watch) = &mut self.stuck else {
            return;
        };
        let filter = self.pipe.filter();
        let keeps = |s: &crate::source::diag::Sitting| {
            filter.keeps_socket(s.local, s.remote, Some(s.netns))
        };
        let Some(counted) = watch.maybe_count(now_ns, keeps) else {
            return;
        };
        let (mut stuck, mut oldest) = (Vec::new(), Vec::new());
        for ((state, netns, port), n) in counted.stuck {
            let l = StuckLabels {
                state: state.name(),
                port: self.labels.port(port, false),
                netns: self.labels.netns(netns),
            };
            // Ports that share a label add up.
            let g = self.families.stuck.get_or_create(&l);
            let before = if stuck.contains(&l) { g.get() } else { 0 };
            g.set(before + i64::try_from(n).unwrap_or(i64::MAX));
            stuck.push(l);
        }
        for ((state, netns), age) in counted.oldest_ns {
            let l = StuckStateLabels {
                state: state.name(),
                netns: self.labels.netns(netns),
            };
            let g = self.families.stuck_oldest.get_or_create(&l);
            let secs = ns_to_secs(age);
            g.set(if oldest.contains(&l) {
                g.get().max(secs)
            } else {
                secs
            });
            oldest.push(l);
        }
        let (old_stuck, old_oldest) = std::mem::replace(&mut self.stuck_series, (stuck, oldest));
        for l in old_stuck
            .iter()
            .filter(|l| !self.stuck_series.0.contains(l))
        {
            self.families.stuck.remove(l);
        }
        for l in old_oldest
            .iter()
            .filter(|l| !self.stuck_series.1.contains(l))
        {
            self.families.stuck_oldest.remove(l);
        }
    }

    /// Judges the window that ends at `now_ns`, if it is long enough.
    fn sync_doctor(&mut self, now_ns: u64) {
        let Some((collector, interval, since)) = &mut self.doctor else {
            return;
        };
        if *since == 0 {
            *since = now_ns;
            return;
        }
        if now_ns.saturating_sub(*since) < *interval {
            return;
        }
        *since = now_ns;
        let peaks = self.ports.take_peaks();
        let reports = collector.judge(peaks.iter());
        // Namespaces that share a label (all of them without --label-netns) show the worst
        // verdict among them.
        let mut worst: FastMap<(&'static str, NsLabel), crate::views::doctor::Verdict> =
            FastMap::default();
        for r in reports {
            let netns = self.labels.netns(r.netns);
            for f in &r.findings {
                let v = worst.entry((f.sysctl, netns)).or_insert(f.verdict);
                *v = (*v).min(f.verdict);
            }
        }
        for ((sysctl, netns), verdict) in worst {
            for v in crate::views::doctor::Verdict::ALL {
                self.families
                    .doctor
                    .get_or_create(&VerdictLabels {
                        sysctl,
                        verdict: v.name(),
                        netns,
                    })
                    .set(i64::from(v == verdict));
            }
        }
    }

    /// What existed at start (`now_ns`), for the ports held: the connections this host made
    /// that are open, and the TIME_WAIT sockets.
    pub fn seed_ports(
        mut self,
        open: &crate::model::atstart::OpenAtStart,
        timewaits: &[crate::source::diag::DiagTimewait],
        now_ns: u64,
    ) -> Self {
        self.ports.seed(open, timewaits, now_ns, self.pipe.filter());
        self
    }

    /// Counts the ports held per destination and exports the fullest.
    fn sync_ports(&mut self, now_ns: u64) {
        let population = crate::views::ports::timewait_tuples(&self.pipe);
        let rows = self.ports.snapshot(&population, now_ns);
        let cap = self.labels.policy.max;
        let mut labelled = Vec::with_capacity(cap.min(rows.len()));
        for r in &rows {
            let netns = self.labels.netns(r.netns);
            if r.failures > 0 {
                self.families
                    .connect_failures
                    .get_or_create(&FailureLabels {
                        reason: "no_port",
                        netns,
                    })
                    .inc_by(r.failures);
            }
            if labelled.len() < cap && r.in_use > 0 {
                let l = DestinationLabels {
                    destination: std::net::SocketAddr::new(r.raddr, r.rport).to_string(),
                    laddr: r.laddr.to_string(),
                    netns,
                };
                self.families.port_usage.get_or_create(&l).set(r.usage);
                labelled.push(l);
            }
        }
        // A destination that holds no port any more (or left the fullest) goes away.
        for old in std::mem::replace(&mut self.port_series, labelled.clone()) {
            if !labelled.contains(&old) {
                self.families.port_usage.remove(&old);
            }
        }
    }

    /// Whether timewait timers are traced (TIME_WAIT exits, residency and population).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = self.pipe.timewaits(traced);
        self.families.tw_traced.set(i64::from(traced));
        self
    }

    /// Ports known to have listeners already (e.g. from sock_diag at start): they get their
    /// labels at once. Later listeners are learnt from their transitions.
    pub fn listeners(mut self, ports: &[u16]) -> Self {
        for &p in ports {
            self.labels.port(p, true);
        }
        self
    }

    /// Whether the source carries connection records (the view then reads connections from
    /// them, not from transitions).
    pub fn records(mut self, yes: bool) -> Self {
        self.pipe = self.pipe.from_records(yes);
        self.ports.set_records(yes);
        self
    }

    /// Connections open when tracing began (from the backfill): their closes get the role
    /// and owner found then.
    pub fn known_at_start(mut self, found: crate::model::atstart::OpenAtStart) -> Self {
        self.pipe = self.pipe.known_at_start(found);
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// Counts the transitions `ev` stands for (before it is folded), and times the states
    /// they leave.
    fn tally_steps(&mut self, ev: &Event) {
        let (pipe, labels, families) = (&self.pipe, &mut self.labels, &self.families);
        let (transitions, durations) = (&mut self.hot_transitions, &mut self.hot_durations);
        pipe.each_step(ev, |t, _| {
            if !pipe.filter().keeps(t) {
                return;
            }
            if t.from == State::Listen || t.to == State::Listen {
                // A listener (or a connection accepted from one): its port is a service of
                // this host.
                labels.port(t.local.port(), true);
            }
            let netns = labels.netns(t.netns);
            let key = (t.from, t.to, netns);
            series(transitions, key, &families.transitions, || {
                TransitionLabels {
                    from: t.from.name(),
                    to: t.to.name(),
                    netns,
                }
            })
            .inc();
            if let Some(d) = t.in_from_ns {
                series(durations, (t.from, netns), &families.durations, || {
                    StateLabels {
                        state: t.from.name(),
                        netns,
                    }
                })
                .observe(ns_to_secs(d));
            }
        });
    }

    fn tally_closes(&mut self) {
        // Drained in place: the buffer keeps its capacity, no allocation per batch.
        let mut closes = std::mem::take(&mut self.pipe.closes);
        for c in closes.drain(..) {
            if !self.pipe.filter().keeps_close(&c) {
                continue;
            }
            if let Some((collector, _, _)) = &mut self.doctor {
                collector.close(&c);
            }
            let port = self.labels.port(c.service_port(), c.role == Role::Server);
            let netns = self.labels.netns(c.netns);
            let key = (port, c.role, c.initiator, c.how, netns);
            series(&mut self.hot_closes, key, &self.families.closes, || {
                CloseLabels {
                    port,
                    role: c.role.name(),
                    initiator: c.initiator.name(),
                    how: c.how.name(),
                    netns,
                }
            })
            .inc();
            if let Some(d) = &c.details {
                self.count_details(d, port, c.role.name(), netns);
            }
            if c.timewait {
                let key = PortLabels { port, netns };
                let entries = &self.families.tw_entries;
                series(&mut self.hot_tw_entries, key.clone(), entries, || {
                    key.clone()
                })
                .inc();
                if self.pipe.timewaits_traced() {
                    if self.tw_labels.len() >= self.pipe.cap() {
                        // Bounded like the sockets; the sweep keeps this rare.
                        self.forget_timewaits(|_| true);
                    }
                    self.tw_sockets(&key).inc();
                    if let Some((old, _)) = self
                        .tw_labels
                        .insert(timewait::tuple_key(c.local, c.remote), (key, c.ts_ns))
                    {
                        // The same 4-tuple entered again before its end was seen.
                        self.tw_sockets(&old).dec();
                    }
                }
            }
        }
        self.pipe.closes = closes;
    }

    /// The series of a service port's TIME_WAIT population.
    fn tw_sockets(&mut self, key: &PortLabels) -> &Gauge {
        let sockets = &self.families.tw_sockets;
        series(&mut self.hot_tw_sockets, key.clone(), sockets, || {
            key.clone()
        })
    }

    /// Adds a close's counters to its port's and role's series.
    fn count_details(&mut self, d: &Details, port: PortLabel, role: &'static str, netns: NsLabel) {
        let f = &self.families;
        let s = self
            .hot_details
            .entry((port, role, netns))
            .or_insert_with(|| DetailSeries::of(f, RoleLabels { port, role, netns }));
        s.sent.inc_by(d.bytes_acked);
        s.received.inc_by(d.bytes_received);
        s.segments.inc_by(d.segs_out.into());
        s.retransmits.inc_by(d.total_retrans.into());
        if let Some(srtt) = d.srtt_us() {
            s.rtt.observe(f64::from(srtt) / 1e6);
        }
    }

    fn tally_exits(&mut self) {
        // Drained in place: the buffer keeps its capacity, no allocation per batch.
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if !self.pipe.filter().keeps_exit(&x) {
                continue;
            }
            self.ports.exit(&x);
            if let Some((collector, _, _)) = &mut self.doctor {
                let ephemeral = self.ports.ephemeral(x.netns, x.local.port());
                collector.exit(&x, ephemeral);
            }
            let key = match self
                .tw_labels
                .remove(&timewait::tuple_key(x.local, x.remote))
            {
                Some((key, _)) => {
                    self.tw_sockets(&key).dec();
                    key
                }
                None => PortLabels {
                    port: self
                        .labels
                        .port(service_port(Role::Unknown, x.local, x.remote), false),
                    netns: self.labels.netns(x.netns),
                },
            };
            let families = &self.families;
            let exit = (key.port, x.end, key.netns);
            series(&mut self.hot_exits, exit, &families.tw_exits, || {
                ExitLabels {
                    port: key.port,
                    end: x.end.name(),
                    netns: key.netns,
                }
            })
            .inc();
            if x.end != End::NotCreated {
                let residency = (x.substate, key.netns);
                series(
                    &mut self.hot_residency,
                    residency,
                    &families.tw_residency,
                    || ResidencyLabels {
                        substate: x.substate.name(),
                        netns: key.netns,
                    },
                )
                .observe(ns_to_secs(x.residency_ns));
            }
        }
        self.pipe.exits = exits;
    }

    /// Takes the connections `pred` selects out of the TIME_WAIT population.
    fn forget_timewaits(&mut self, mut pred: impl FnMut(u64) -> bool) {
        let sockets = &self.families.tw_sockets;
        self.tw_labels.retain(|_, (key, since)| {
            let forget = pred(*since);
            if forget {
                sockets.get_or_create(key).dec();
            }
            !forget
        });
    }

    fn sync_gauges(&mut self) {
        let evicted = self.evicted();
        self.families
            .evicted
            .inc_by(evicted.saturating_sub(self.evicted_seen));
        self.evicted_seen = evicted;
        self.families
            .tracked
            .set(i64::try_from(self.pipe.tracked()).unwrap_or(i64::MAX));
    }
}

impl View for Metrics {
    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            self.last_ts = self.last_ts.max(ev.ts_ns());
            match &ev {
                Event::Transition(t) => self.ports.transition(t, self.pipe.filter().keeps(t)),
                Event::Connection(c) => self.ports.connection(c),
                _ => {}
            }
            match &ev {
                Event::Lost { count, .. } => {
                    self.families.lost.inc_by(*count);
                }
                // A SYN for a port nothing listens on: this host refused a connection.
                Event::Reset(r)
                    if r.skaddr.is_none()
                        && r.direction == Direction::Sent
                        && self.pipe.filter().keeps_reset(r) =>
                {
                    let port = self.labels.port(r.local.port(), false);
                    let netns = self.labels.netns(r.netns);
                    self.families
                        .closes
                        .get_or_create(&CloseLabels {
                            port,
                            role: Role::Server.name(),
                            initiator: crate::analysis::closes::Initiator::Local.name(),
                            how: crate::analysis::closes::How::Refused.name(),
                            netns,
                        })
                        .inc();
                }
                _ => {}
            }
            self.tally_steps(&ev);
            self.pipe.fold(&ev);
            self.tally_closes();
            self.tally_exits();
        }
        self.sync_gauges();
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        self.tally_closes();
        self.tally_exits();
        // A timewait socket whose end was never seen (lost, skipped by the kernel) stops
        // counting in the population once no timewait socket can still be alive.
        if now_ns.saturating_sub(self.last_sweep_ns) >= timewait::SWEEP_EVERY_NS {
            self.last_sweep_ns = now_ns;
            self.forget_timewaits(|since| now_ns.saturating_sub(since) > timewait::STALE_NS);
        }
        if now_ns.saturating_sub(self.last_ports_ns) >= PORTS_EVERY_NS {
            self.last_ports_ns = now_ns;
            self.sync_ports(now_ns);
            if let Some((collector, _, _)) = &mut self.doctor
                && let Some(t) = self.pipe.timewait_sockets()
            {
                let filter = self.pipe.filter();
                collector.population(t.population().filter(|l| filter.keeps_life(l)));
            }
            self.sync_doctor(now_ns);
        }
        self.sync_stuck(now_ns);
        self.sync_gauges();
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        // The ports held as the events leave them (a replay's last word).
        self.sync_ports(self.last_ts.max(self.last_ports_ns));
        self.sync_gauges();
        Ok(())
    }

    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        Some(&mut self.pipe)
    }
}

/// The tracer's own CPU time and memory (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, as every Prometheus client library names them), read
/// from `/proc/self` on each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// CPU seconds (user + system, all threads) and resident bytes of this process.
pub fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) and 24 (rss) of proc(5), counted from 3 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf only reads configuration values.
    let (tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    Some(((utime + stime) as f64 / tck, rss_pages * page))
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric as _,
            metrics::{counter::ConstCounter, gauge::ConstGauge},
        };
        let Some((cpu, rss)) = process_usage() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(cpu);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent by tcptrace (all threads), in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(i64::try_from(rss).unwrap_or(i64::MAX));
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of tcptrace, in bytes",
            None,
            rss.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::{
        event::{Transition, encode},
        filter::Filter,
    };

    const SEC: u64 = crate::shared::NS_PER_SEC;

    /// A connection from this host to 10.0.0.9:5432 that it closes first, at `ts`, and its
    /// timewait socket's timer armed.
    fn closes_into_timewait(ts: u64, sk: u64, lport: u16) -> Vec<RawEvent> {
        use State::*;
        let local: SocketAddr = format!("10.0.0.5:{lport}").parse().unwrap();
        let remote: SocketAddr = "10.0.0.9:5432".parse().unwrap();
        let mut events: Vec<RawEvent> = [
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, TimeWait),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (from, to))| {
            encode(&Transition {
                ts_ns: ts + i as u64,
                skaddr: sk,
                local,
                remote,
                from,
                to,
                in_from_ns: None,
                owner: None,
                mptcp: false,
                netns: None,
                cgroup: None,
            })
        })
        .collect();
        // Armed as the socket enters TIME_WAIT, just before the transition is reported.
        let armed = crate::model::event::encode_timer(&crate::model::event::TimerEvent {
            ts_ns: ts + 3,
            tw: sk << 8,
            substate_at_end: None,
            op: crate::model::event::TimerOp::Armed {
                substate: TimeWait,
                timeout_jiffies: 15000,
                local,
                remote,
                netns: None,
                rearm: false,
            },
        });
        events.insert(4, armed);
        events
    }

    fn gauge(m: &Metrics, port: PortLabel) -> i64 {
        m.families
            .tw_sockets
            .get_or_create(&PortLabels {
                port,
                netns: NsLabel::Off,
            })
            .get()
    }

    #[test]
    fn timewait_population_forgets_ends_never_seen() {
        let mut registry = Registry::default();
        let mut m = Metrics::new(
            Filter::default().compile(),
            LabelConfig::default(),
            &mut registry,
        )
        .timers(true);
        // Not a listener here, not allowed: `other`.
        m.push(&closes_into_timewait(SEC, 0xa, 40000)).unwrap();
        m.push(&closes_into_timewait(2 * SEC, 0xb, 40001)).unwrap();
        assert_eq!(gauge(&m, PortLabel::Other), 2);
        // The same 4-tuple entering again before its end was seen counts once.
        m.push(&closes_into_timewait(3 * SEC, 0xc, 40001)).unwrap();
        assert_eq!(gauge(&m, PortLabel::Other), 2);
        // Their exits were lost: 180 s on, the sweep takes them out.
        m.tick(100 * SEC).unwrap();
        assert_eq!(gauge(&m, PortLabel::Other), 2);
        m.tick(200 * SEC).unwrap();
        assert_eq!(gauge(&m, PortLabel::Other), 0);
        assert_eq!(m.tw_labels.len(), 0);
    }

    #[test]
    fn without_timers_there_is_no_population() {
        let mut registry = Registry::default();
        let mut m = Metrics::new(
            Filter::default().compile(),
            LabelConfig::default(),
            &mut registry,
        )
        .timers(false);
        m.push(&closes_into_timewait(SEC, 0xa, 40000)).unwrap();
        // Entries still count; the gauge would only grow, so it stays unset.
        let (text, _) = crate::views::serve::http::render(&registry, false);
        assert!(text.contains(r#"tcptrace_timewait_entries_total{port="other"} 1"#));
        assert!(text.contains("tcptrace_timewait_timers_traced 0"));
        assert!(!text.contains("tcptrace_timewait_sockets{"), "{text}");
    }

    #[test]
    fn port_labels_stop_at_the_cap() {
        let mut l = Labeller {
            policy: PortPolicy {
                allow: vec![5432..=5432],
                max: 2,
            },
            ports: FastMap::default(),
            netns_on: true,
            max_netns: 1,
            netns: FastMap::default(),
        };
        assert_eq!(l.port(40000, false), PortLabel::Other);
        assert_eq!(l.port(5432, false), PortLabel::Port(5432));
        assert_eq!(l.port(8080, true), PortLabel::Port(8080));
        assert_eq!(l.port(9090, true), PortLabel::Other, "cap of 2 reached");
        assert_eq!(l.port(8080, false), PortLabel::Port(8080), "labelled stays");
        assert_eq!(l.netns(Some(4026531840)), NsLabel::Inode(4026531840));
        assert_eq!(l.netns(Some(4026532000)), NsLabel::Other);
        assert_eq!(l.netns(None), NsLabel::Unknown);
        l.netns_on = false;
        assert_eq!(l.netns(Some(4026531840)), NsLabel::Off);
    }

    #[test]
    fn bucket_bounds_are_increasing() {
        let mut registry = Registry::default();
        let f: Family<StateLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_buckets);
        registry.register_with_unit("d", "d", Unit::Seconds, f.clone());
        f.get_or_create(&StateLabels {
            state: "SYN_SENT",
            netns: NsLabel::Off,
        })
        .observe(0.5);
        let (text, _) = crate::views::serve::http::render(&registry, false);
        let bounds: Vec<f64> = text
            .lines()
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
            .filter(|b: &f64| b.is_finite())
            .collect();
        assert_eq!(bounds.first(), Some(&1e-5));
        assert_eq!(bounds.last(), Some(&1000.0));
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
    }
}
