//! `tcptrace hist`: how long sockets spend in each state, as log-scale histograms with
//! exact nanosecond durations measured in the kernel.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use std::net::SocketAddr;

use crate::{
    event::{RawEvent, State},
    filter::CompiledFilter,
    output::{Format, human_ns},
    pipeline::Pipeline,
    timewait::End,
    track::{FastMap, service_port},
    view::{Flow, View},
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

/// One histogram, summarised.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `hist`.
    pub kind: &'static str,
    /// The state the durations were spent in.
    pub state: &'static str,
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

/// The histogram view.
pub struct Hist<W: Write> {
    /// Tracks sockets with `--by port` (for their roles), follows timewait sockets when
    /// TIME_WAIT is asked for.
    pipe: Pipeline,
    states: Vec<State>,
    by: By,
    hists: BTreeMap<(State, Option<u16>), Histogram<u64>>,
    out: W,
    format: Format,
    /// The service port of each connection now in TIME_WAIT (with `--by port`).
    tw_ports: FastMap<(SocketAddr, SocketAddr), u16>,
}

impl<W: Write> Hist<W> {
    /// Histograms of the `states` (all of [`STATES`] when empty).
    pub fn new(filter: CompiledFilter, states: &[State], by: By, out: W, format: Format) -> Self {
        let states = if states.is_empty() {
            STATES.iter().map(|(s, _)| *s).collect()
        } else {
            states.to_vec()
        };
        let pipe = Pipeline::new(filter).with_steps();
        let pipe = if by == By::Port {
            pipe.tracking()
        } else {
            pipe
        };
        let hist = Hist {
            pipe,
            states,
            by,
            hists: BTreeMap::new(),
            out,
            format,
            tw_ports: FastMap::default(),
        };
        hist.timers(true)
    }

    /// Whether timewait timers are traced (else TIME_WAIT residencies cannot be known).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = if self.states.contains(&State::TimeWait) {
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

    /// Records the time spent in each state left, from the transitions folded.
    fn record_steps(&mut self) {
        let mut steps = std::mem::take(&mut self.pipe.steps);
        for (t, role) in steps.drain(..) {
            let Some(d) = t.in_from_ns else { continue };
            if !self.states.contains(&t.from) || !self.pipe.filter().keeps(&t) {
                continue;
            }
            let port = match self.by {
                By::State => None,
                By::Port => Some(service_port(role, t.local, t.remote)),
            };
            // Three significant digits, auto-resizing: `record` grows the range (the
            // saturating variant would clamp to it).
            let h = self
                .hists
                .entry((t.from, port))
                .or_insert_with(|| Histogram::new(3).expect("3 significant digits is valid"));
            let _ = h.record(d);
        }
        self.pipe.steps = steps;
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
            let port =
                match self.by {
                    By::State => None,
                    By::Port => Some(self.tw_ports.remove(&(x.local, x.remote)).unwrap_or_else(
                        || service_port(crate::track::Role::Unknown, x.local, x.remote),
                    )),
                };
            let h = self
                .hists
                .entry((State::TimeWait, port))
                .or_insert_with(|| Histogram::new(3).expect("3 significant digits is valid"));
            let _ = h.record(x.residency_ns);
        }
        self.pipe.exits = exits;
    }

    /// With `--by port`: the service port of each connection that entered TIME_WAIT, for its
    /// exit. Bounded like the sockets: an exit never seen (lost, evicted) must not leave its
    /// entry here forever.
    fn note_timewait_ports(&mut self) {
        let mut closes = std::mem::take(&mut self.pipe.closes);
        for c in closes.drain(..).filter(|c| c.timewait) {
            if self.tw_ports.len() >= self.pipe.cap() {
                self.tw_ports.clear();
            }
            self.tw_ports.insert((c.local, c.remote), c.service_port());
        }
        self.pipe.closes = closes;
    }

    /// The histograms, summarised, in the order the states were asked for (lifecycle
    /// order by default), then by port.
    pub fn summaries(&self) -> Vec<Summary> {
        let rank = |s: &State| self.states.iter().position(|x| x == s);
        let mut keys: Vec<&(State, Option<u16>)> = self.hists.keys().collect();
        keys.sort_by_key(|(s, p)| (rank(s), *p));
        keys.into_iter()
            .map(|k| summarise(k.0, k.1, &self.hists[k]))
            .collect()
    }
}

fn meaning(state: State) -> &'static str {
    STATES
        .iter()
        .find(|(s, _)| *s == state)
        .map_or("", |(_, m)| m)
}

fn summarise(state: State, port: Option<u16>, h: &Histogram<u64>) -> Summary {
    let mut buckets = Vec::new();
    if !h.is_empty() {
        let lo = h.min().max(1).ilog2();
        let hi = h.max().max(1).ilog2();
        for k in lo..=hi {
            let (ge, lt) = (1u64 << k, 2u64 << k);
            // Power-of-two boundaries fall on HDR bucket boundaries: nothing counts twice.
            let count = h.count_between(ge, lt - 1);
            buckets.push(Bucket {
                ge_ns: ge,
                lt_ns: lt,
                count,
            });
        }
        // Samples below the first power of two (0 ns) land in the first bucket.
        if let Some(first) = buckets.first_mut() {
            first.count += h.count_between(0, first.ge_ns.saturating_sub(1));
        }
    }
    Summary {
        kind: "hist",
        state: state.name(),
        meaning: meaning(state),
        port,
        count: h.len(),
        p50_ns: h.value_at_quantile(0.5),
        p90_ns: h.value_at_quantile(0.9),
        p99_ns: h.value_at_quantile(0.99),
        max_ns: h.max(),
        buckets,
    }
}

impl<W: Write> View for Hist<W> {
    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            self.pipe.fold(&ev);
            self.record_steps();
            self.note_timewait_ports();
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
        self.note_timewait_ports();
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
                    write!(self.out, "{}", render_text(s))?;
                }
            }
        }
        self.out.flush()
    }
}

/// One histogram as text bars.
pub fn render_text(s: &Summary) -> String {
    const WIDTH: u64 = 40;
    let mut out = format!(
        "\n{}{} ({}): {} sample{}, p50 {}, p90 {}, p99 {}, max {}\n",
        s.state,
        s.port.map(|p| format!(" :{p}")).unwrap_or_default(),
        s.meaning,
        s.count,
        if s.count == 1 { "" } else { "s" },
        human_ns(s.p50_ns),
        human_ns(s.p90_ns),
        human_ns(s.p99_ns),
        human_ns(s.max_ns),
    );
    let top = s.buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    for b in &s.buckets {
        let bar = (b.count * WIDTH).div_ceil(top) as usize;
        out.push_str(&format!(
            "  {:>9} .. {:<9} {:>8} |{:<w$}|\n",
            human_ns(b.ge_ns),
            human_ns(b.lt_ns),
            b.count,
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
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in [0u64, 1, 3, 1000, 1500, 999_999, 1_000_000_000] {
            h.record(v).unwrap();
        }
        let s = summarise(State::SynSent, None, &h);
        assert_eq!(s.count, 7);
        assert_eq!(s.buckets.iter().map(|b| b.count).sum::<u64>(), 7);
        assert_eq!(s.buckets[0].ge_ns, 1);
        assert!(s.buckets.windows(2).all(|w| w[0].lt_ns == w[1].ge_ns));
        assert_eq!(s.p50_ns, h.value_at_quantile(0.5));
        assert!((999_000_000..=1_001_000_000).contains(&s.max_ns));
    }
}
