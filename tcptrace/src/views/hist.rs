//! `tcptrace hist`: how long sockets spend in each state, as log-scale histograms with
//! exact nanosecond durations measured in the kernel; or, per service port, what each
//! connection's counters said at its end (`--metric rtt|bytes|lifetime`).

use std::io::{self, Write};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    analysis::{
        closes::{Close, service_port},
        pipeline::Pipeline,
        timewait::End,
    },
    model::{
        event::{Details, Event, RawEvent, State},
        filter::CompiledFilter,
    },
    output::{Format, human_bytes, human_ns},
    shared::FastMap,
    views::{Flow, View},
};

/// The states a histogram is kept for by default, with what their duration means.
pub const STATES: [(State, &str); 9] = [
    (State::SynSent, "connect latency"),
    (State::SynRecv, "handshake, server side"),
    (State::Established, "connection lifetime"),
    (State::FinWait1, "waiting for the peer to ack our FIN"),
    (State::FinWait2, "waiting for the peer's FIN"),
    (
        State::CloseWait,
        "application slow to close after the peer did",
    ),
    (
        State::LastAck,
        "waiting for the ack of our FIN, passive side",
    ),
    (State::Closing, "simultaneous close"),
    (
        State::TimeWait,
        "TIME_WAIT residency, until expiry or an early kill",
    ),
];

/// How samples are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// One histogram per state.
    State,
    /// One per state and service port.
    Port,
}

/// What is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// The time spent in each state (the kernel's own timestamps).
    #[default]
    State,
    /// Each connection's smoothed round-trip time at its end, per service port.
    Rtt,
    /// The bytes each connection sent and received, per service port.
    Bytes,
    /// Each connection's lifetime (connect or accept to its end), per service port.
    Lifetime,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::State => "state",
            Metric::Rtt => "rtt",
            Metric::Bytes => "bytes",
            Metric::Lifetime => "lifetime",
        }
    }
}

/// What one histogram holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Series {
    /// Time spent in a state.
    State(State),
    /// Smoothed round-trip times at the end.
    Rtt,
    /// Lifetimes.
    Lifetime,
    /// Bytes sent (acknowledged by the peer).
    Sent,
    /// Bytes received.
    Received,
}

impl Series {
    /// What a sample of it means.
    fn meaning(self) -> &'static str {
        match self {
            Series::State(s) => meaning(s),
            Series::Rtt => "smoothed round-trip time at the connection's end",
            Series::Lifetime => "from connect or accept to the end",
            Series::Sent => "bytes each connection sent, acknowledged by the peer",
            Series::Received => "bytes each connection received",
        }
    }
}

/// What a histogram is of: its series, its service port (with `--by port`, or a
/// per-connection metric), and the role of its connections (per-connection metrics).
type Key = (Series, Option<u16>, Option<&'static str>);

/// One histogram of times, summarised.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `hist`.
    pub kind: &'static str,
    /// What was measured: `state` (the time spent in `state`), `rtt` or `lifetime`.
    pub metric: &'static str,
    /// The state the durations were spent in (null for the other metrics).
    pub state: Option<&'static str>,
    /// The connections' role, `client` or `server` (`unknown`: seen mid-life), for the
    /// per-connection metrics; null for states.
    pub role: Option<&'static str>,
    /// What that duration means.
    pub meaning: &'static str,
    /// Service port, with `--by port`.
    pub port: Option<u16>,
    /// Samples.
    pub count: u64,
    /// Percentiles and maximum, nanoseconds.
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Power-of-two buckets: `[ge_ns, lt_ns)` holds `count` samples.
    pub buckets: Vec<Bucket>,
}

/// One bucket.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Bucket {
    pub ge_ns: u64,
    pub lt_ns: u64,
    pub count: u64,
}

/// One histogram of byte counts, summarised (`--metric bytes`).
#[derive(Debug, Serialize)]
pub struct BytesSummary {
    /// `hist`.
    pub kind: &'static str,
    /// `bytes`.
    pub metric: &'static str,
    /// Always null (as for the other per-connection metrics).
    pub state: Option<&'static str>,
    /// `sent` (acknowledged by the peer) or `received`.
    pub direction: &'static str,
    /// The connections' role: `client`, `server` or `unknown`.
    pub role: Option<&'static str>,
    /// What a sample means.
    pub meaning: &'static str,
    /// Service port.
    pub port: Option<u16>,
    /// Connections.
    pub count: u64,
    /// Percentiles and maximum, bytes.
    pub p50_bytes: u64,
    pub p90_bytes: u64,
    pub p99_bytes: u64,
    pub max_bytes: u64,
    /// Power-of-two buckets: `[ge_bytes, lt_bytes)` holds `count` connections.
    pub buckets: Vec<BytesBucket>,
}

/// One bucket of byte counts.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BytesBucket {
    pub ge_bytes: u64,
    pub lt_bytes: u64,
    pub count: u64,
}

/// A histogram of either kind.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Histo {
    Time(Summary),
    Bytes(BytesSummary),
}

/// The histogram view.
pub struct Hist<W: Write> {
    /// Tracks sockets with `--by port` (for their roles), follows timewait sockets when
    /// TIME_WAIT is asked for.
    pipe: Pipeline,
    states: Vec<State>,
    by: By,
    metric: Metric,
    hists: FastMap<Key, Samples>,
    out: W,
    format: Format,
}

impl<W: Write> Hist<W> {
    /// Histograms of the `states` (all of [`STATES`] when empty).
    pub fn new(filter: CompiledFilter, states: &[State], by: By, out: W, format: Format) -> Self {
        let states = if states.is_empty() {
            STATES.iter().map(|(s, _)| *s).collect()
        } else {
            states.to_vec()
        };
        let pipe = Pipeline::new(filter);
        let pipe = if by == By::Port {
            pipe.tracking()
        } else {
            pipe
        };
        let hist = Hist {
            pipe,
            states,
            by,
            metric: Metric::State,
            hists: FastMap::default(),
            out,
            format,
        };
        hist.timers(true)
    }

    /// Measures `metric` (the time in each state unless told otherwise). The per-connection
    /// metrics follow every connection to its end, per service port.
    pub fn metric(mut self, metric: Metric) -> Self {
        self.metric = metric;
        if metric != Metric::State {
            self.pipe = self.pipe.tracking().without_timewaits();
        }
        self
    }

    /// Whether timewait timers are traced (else TIME_WAIT residencies cannot be known).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = if self.metric == Metric::State && self.states.contains(&State::TimeWait) {
            self.pipe.timewaits(traced)
        } else {
            self.pipe.without_timewaits()
        };
        self
    }

    /// Whether the source carries connection records (the view then reads connections from
    /// them, not from transitions).
    pub fn records(mut self, yes: bool) -> Self {
        self.pipe = self.pipe.from_records(yes);
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// Records the time spent in each state `ev` leaves (before it is folded).
    fn record_steps(&mut self, ev: &Event) {
        if self.metric != Metric::State {
            return;
        }
        let (pipe, hists, states, by) = (&self.pipe, &mut self.hists, &self.states, self.by);
        pipe.each_step(ev, |t, role| {
            let Some(d) = t.in_from_ns else { return };
            if !states.contains(&t.from) || !pipe.filter().keeps(t) {
                return;
            }
            let port = match by {
                By::State => None,
                By::Port => Some(service_port(role, t.local, t.remote)),
            };
            record(hists, (Series::State(t.from), port, None), d);
        });
    }

    /// One sample.
    fn record(&mut self, key: Key, v: u64) {
        record(&mut self.hists, key, v);
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    /// TIME_WAIT residencies of the timewait sockets that ended (not those never created).
    fn record_exits(&mut self) {
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if x.end == End::NotCreated || !self.pipe.filter().keeps_exit(&x) {
                continue;
            }
            let port = match self.by {
                By::State => None,
                By::Port => Some(x.made_by.service_port(x.local, x.remote)),
            };
            self.record((Series::State(State::TimeWait), port, None), x.residency_ns);
        }
        self.pipe.exits = exits;
    }

    /// Takes the closes concluded: each one's samples of a per-connection metric. (A
    /// TIME_WAIT exit names its connection's service itself.)
    fn take_closes(&mut self) {
        let mut closes = std::mem::take(&mut self.pipe.closes);
        for c in closes.drain(..) {
            if self.metric != Metric::State {
                self.record_close(&c);
            }
        }
        self.pipe.closes = closes;
    }

    /// A connection's samples of the per-connection metric.
    fn record_close(&mut self, c: &Close) {
        if !self.pipe.filter().keeps_close(c) {
            return;
        }
        let (port, role) = (Some(c.service_port()), Some(c.role.name()));
        match self.metric {
            Metric::Rtt => {
                if let Some(srtt) = c.details.as_ref().and_then(Details::srtt_us) {
                    self.record((Series::Rtt, port, role), u64::from(srtt) * 1_000);
                }
            }
            Metric::Lifetime => {
                if let Some(l) = c.lifetime_ns {
                    self.record((Series::Lifetime, port, role), l);
                }
            }
            Metric::Bytes => {
                if let Some(d) = &c.details {
                    self.record((Series::Sent, port, role), d.bytes_acked);
                    self.record((Series::Received, port, role), d.bytes_received);
                }
            }
            Metric::State => {}
        }
    }

    /// The histograms, summarised, in the order the states were asked for (lifecycle
    /// order by default), then by port; the per-connection ones by port.
    pub fn summaries(&self) -> Vec<Histo> {
        let rank = |s: &Series| match s {
            Series::State(st) => self.states.iter().position(|x| x == st),
            _ => None,
        };
        let mut keys: Vec<&Key> = self.hists.keys().collect();
        keys.sort_by_key(|(s, p, r)| (rank(s), *p, *r, *s));
        keys.into_iter()
            .map(|k| summarise(*k, &self.hists[k]))
            .collect()
    }
}

fn meaning(state: State) -> &'static str {
    STATES
        .iter()
        .find(|(s, _)| *s == state)
        .map_or("", |(_, m)| m)
}

/// Power-of-two buckets `(ge, lt, count)` covering every sample of `h`.
fn power_buckets(h: &Histogram<u64>) -> Vec<(u64, u64, u64)> {
    let mut buckets = Vec::new();
    if h.is_empty() {
        return buckets;
    }
    let lo = h.min().max(1).ilog2();
    let hi = h.max().max(1).ilog2();
    for k in lo..=hi {
        let (ge, lt) = (1u64 << k, 2u64 << k);
        // Power-of-two boundaries fall on HDR bucket boundaries: nothing counts twice.
        buckets.push((ge, lt, h.count_between(ge, lt - 1)));
    }
    // Samples below the first power of two (0) land in the first bucket.
    if let Some(first) = buckets.first_mut() {
        first.2 += h.count_between(0, first.0.saturating_sub(1));
    }
    buckets
}

/// Adds sample `v` to the series `key`.
fn record(hists: &mut FastMap<Key, Samples>, key: Key, v: u64) {
    hists.entry(key).or_insert_with(Samples::new).record(v);
}

/// One series' samples: their histogram, and their exact maximum.
struct Samples {
    /// Two significant digits (1 %): a sample lands in one of 256 counts per power of two,
    /// few enough to stay in cache as a storm records ten per connection (three digits
    /// spread them over 2,048, and missed the cache on nearly every sample).
    h: Histogram<u64>,
    max: u64,
}

impl Samples {
    fn new() -> Samples {
        Samples {
            h: crate::views::report::two_digit_histogram(1),
            max: 0,
        }
    }

    fn record(&mut self, v: u64) {
        // Auto-resizing: `record` grows the range (the saturating variant would clamp).
        let _ = self.h.record(v);
        self.max = self.max.max(v);
    }
}

fn summarise((series, port, role): Key, s: &Samples) -> Histo {
    let h = &s.h;
    // No quantile above the largest sample (the histogram's is within 1 % of it).
    let q = |p| h.value_at_quantile(p).min(s.max);
    let direction = match series {
        Series::Sent => "sent",
        Series::Received => "received",
        _ => {
            let (metric, state) = match series {
                Series::State(s) => (Metric::State, Some(s.name())),
                Series::Rtt => (Metric::Rtt, None),
                _ => (Metric::Lifetime, None),
            };
            return Histo::Time(Summary {
                kind: "hist",
                metric: metric.name(),
                state,
                role,
                meaning: series.meaning(),
                port,
                count: h.len(),
                p50_ns: q(0.5),
                p90_ns: q(0.9),
                p99_ns: q(0.99),
                max_ns: s.max,
                buckets: power_buckets(h)
                    .into_iter()
                    .map(|(ge_ns, lt_ns, count)| Bucket {
                        ge_ns,
                        lt_ns,
                        count,
                    })
                    .collect(),
            });
        }
    };
    Histo::Bytes(BytesSummary {
        kind: "hist",
        metric: Metric::Bytes.name(),
        state: None,
        direction,
        role,
        meaning: series.meaning(),
        port,
        count: h.len(),
        p50_bytes: q(0.5),
        p90_bytes: q(0.9),
        p99_bytes: q(0.99),
        max_bytes: s.max,
        buckets: power_buckets(h)
            .into_iter()
            .map(|(ge_bytes, lt_bytes, count)| BytesBucket {
                ge_bytes,
                lt_bytes,
                count,
            })
            .collect(),
    })
}

impl<W: Write> View for Hist<W> {
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
            self.record_steps(&ev);
            self.pipe.fold(&ev);
            self.take_closes();
            self.record_exits();
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.expire_exits(now_ns);
        self.record_exits();
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.take_closes();
        self.record_exits();
        let summaries = self.summaries();
        match self.format {
            Format::Json => {
                for s in &summaries {
                    serde_json::to_writer(&mut self.out, s)?;
                    writeln!(self.out)?;
                }
            }
            Format::Text => {
                if summaries.is_empty() {
                    writeln!(self.out, "no durations recorded")?;
                }
                for s in &summaries {
                    let text = match s {
                        Histo::Time(s) => render_text(s),
                        Histo::Bytes(s) => render_bytes_text(s),
                    };
                    write!(self.out, "{text}")?;
                }
            }
        }
        self.out.flush()
    }
}

/// One histogram of times as text bars.
pub fn render_text(s: &Summary) -> String {
    let title = match (s.state, s.role) {
        (Some(state), _) => state.to_string(),
        (None, role) => format!(
            "{} {}",
            if s.metric == "rtt" { "RTT" } else { "lifetime" },
            role.unwrap_or("?")
        ),
    };
    let buckets: Vec<_> = s
        .buckets
        .iter()
        .map(|b| (b.ge_ns, b.lt_ns, b.count))
        .collect();
    bars(
        &format!(
            "{title}{} ({})",
            s.port.map(|p| format!(" :{p}")).unwrap_or_default(),
            s.meaning
        ),
        (s.count, [s.p50_ns, s.p90_ns, s.p99_ns, s.max_ns]),
        &buckets,
        human_ns,
    )
}

/// One histogram of byte counts as text bars.
pub fn render_bytes_text(s: &BytesSummary) -> String {
    let buckets: Vec<_> = s
        .buckets
        .iter()
        .map(|b| (b.ge_bytes, b.lt_bytes, b.count))
        .collect();
    bars(
        &format!(
            "bytes {} {}{} ({})",
            s.direction,
            s.role.unwrap_or("?"),
            s.port.map(|p| format!(" :{p}")).unwrap_or_default(),
            s.meaning
        ),
        (
            s.count,
            [s.p50_bytes, s.p90_bytes, s.p99_bytes, s.max_bytes],
        ),
        &buckets,
        human_bytes,
    )
}

/// A title line with the count, percentiles and maximum, then one bar per bucket.
fn bars(
    title: &str,
    (count, [p50, p90, p99, max]): (u64, [u64; 4]),
    buckets: &[(u64, u64, u64)],
    human: fn(u64) -> String,
) -> String {
    const WIDTH: u64 = 40;
    let mut out = format!(
        "\n{title}: {count} sample{}, p50 {}, p90 {}, p99 {}, max {}\n",
        if count == 1 { "" } else { "s" },
        human(p50),
        human(p90),
        human(p99),
        human(max),
    );
    let top = buckets.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    for &(ge, lt, n) in buckets {
        let bar = (n * WIDTH).div_ceil(top) as usize;
        out.push_str(&format!(
            "  {:>9} .. {:<9} {:>8} |{:<w$}|\n",
            human(ge),
            human(lt),
            n,
            "█".repeat(bar),
            w = WIDTH as usize
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_sample_and_quantiles_are_exact_enough() {
        let mut samples = Samples::new();
        for v in [0u64, 1, 3, 1000, 1500, 999_999, 1_000_000_000] {
            samples.record(v);
        }
        let h = &samples.h;
        let Histo::Time(s) = summarise((Series::State(State::SynSent), None, None), &samples)
        else {
            panic!("a time histogram");
        };
        assert_eq!(s.count, 7);
        assert_eq!(s.buckets.iter().map(|b| b.count).sum::<u64>(), 7);
        assert_eq!(s.buckets[0].ge_ns, 1);
        assert!(s.buckets.windows(2).all(|w| w[0].lt_ns == w[1].ge_ns));
        assert_eq!(s.p50_ns, h.value_at_quantile(0.5));
        assert_eq!(s.max_ns, 1_000_000_000, "the largest sample, exactly");
        let within_1_percent = |q: u64, exact: u64| q.abs_diff(exact) * 100 <= exact;
        assert!(within_1_percent(s.p50_ns, 1000), "{}", s.p50_ns);
        assert!(within_1_percent(s.p90_ns, 1_000_000_000), "{}", s.p90_ns);
    }
}
