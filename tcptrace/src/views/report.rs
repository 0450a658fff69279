//! `tcptrace report`: who closes first, per service port and direction, with a reading of
//! what it means for TIME_WAIT.

use std::io::{self, Write};

use comfy_table::{CellAlignment, Table, presets};
use serde::Serialize;

use crate::{
    analysis::{
        closes::{Close, How, Initiator, Role, service_port},
        pipeline::Pipeline,
        reason::{ResetNames, end_reason},
        timewait::End,
    },
    model::{
        event::{Direction, Event, RawEvent},
        filter::CompiledFilter,
    },
    output::{Format, human_bytes, human_ns, rfc3339, write_rows},
    shared::{FastMap, ns_to_secs},
    views::{Flow, View},
};

/// Which way connections on a row go, seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// This host accepted them (it is the server on the port).
    In,
    /// This host connected (it is the client of the port).
    Out,
    /// First seen mid-life: unknown.
    Unknown,
}

impl Way {
    /// The direction of a connection of `role`.
    pub fn of(role: Role) -> Way {
        match role {
            Role::Server => Way::In,
            Role::Client => Way::Out,
            Role::Unknown => Way::Unknown,
        }
    }

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Way::In => "in",
            Way::Out => "out",
            Way::Unknown => "?",
        }
    }
}

/// A process and how many of a row's connections it owned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TopProcess {
    /// Command name (`?` when unknown).
    pub comm: String,
    /// Connections.
    pub count: u64,
}

/// The counts of one row.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// Service port.
    pub port: u16,
    /// Direction.
    pub direction: Option<Way>,
    /// Connections closed.
    pub closed: u64,
    /// Closed first by this host.
    pub local: u64,
    /// Closed first by the peer.
    pub remote: u64,
    /// FINs crossed.
    pub simultaneous: u64,
    /// No evidence.
    pub unknown: u64,
    /// Ended by a reset this host sent.
    pub rst_sent: u64,
    /// Ended by a reset that arrived.
    pub rst_received: u64,
    /// Connection attempts refused (by this host when `in`, by the peer when `out`).
    pub refused: u64,
    /// Ended by a timeout.
    pub timeout: u64,
    /// TIME_WAIT entered on this host.
    pub timewait: u64,
    /// How long the timewait sockets that ended lasted (when their timers are traced).
    pub timewait_residency: Option<Residency>,
    /// Closes that should have entered TIME_WAIT but got no timewait socket
    /// (`tcp_max_tw_buckets` reached).
    pub timewait_not_created: u64,
    /// Connections whose counters were read at their end (see `docs/json.md`): what the
    /// next four sum over.
    pub with_counters: u64,
    /// Bytes this host sent that the peers acknowledged.
    pub bytes_sent: u64,
    /// Bytes this host received in order, over the same connections.
    pub bytes_received: u64,
    /// Segments this host sent, over the same connections.
    pub segs_out: u64,
    /// Of those, retransmitted.
    pub retrans: u64,
    /// Smoothed round-trip times at the end, over the connections that measured one.
    pub srtt: Option<Rtt>,
    /// Why the connections ended, exactly (see `reason` in `docs/json.md`): count per reason.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Processes that owned the connections, most first (at most 3).
    pub top_processes: Vec<TopProcess>,
    /// A plain-language reading, for rows with enough connections.
    pub advice: Option<String>,
    #[serde(skip)]
    procs: FastMap<String, u64>,
    #[serde(skip)]
    residency: Option<hdrhistogram::Histogram<u64>>,
    #[serde(skip)]
    rtts: Option<hdrhistogram::Histogram<u64>>,
}

/// Percentiles of round-trip times, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rtt {
    /// Connections that measured one.
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// A histogram of two significant digits from `low` up, growing as needed: ~20 KiB, where
/// three digits from 1 took ~250 KiB (and a report can have many rows).
pub(crate) fn two_digit_histogram(low: u64) -> hdrhistogram::Histogram<u64> {
    let mut h = hdrhistogram::Histogram::new_with_bounds(low, 1 << 40, 2).expect("valid bounds");
    h.auto(true);
    h
}

/// Percentiles of TIME_WAIT residency, nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Residency {
    /// Timewait sockets that ended.
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl Row {
    fn add(&mut self, c: &Close, names: &ResetNames) {
        self.closed += 1;
        let reason = end_reason(c, names);
        // Looked up by reference: a String is only made for a reason not seen before.
        match self.reasons.get_mut(reason) {
            Some(n) => *n += 1,
            None => {
                self.reasons.insert(reason.to_string(), 1);
            }
        }
        match c.initiator {
            Initiator::Local => self.local += 1,
            Initiator::Remote => self.remote += 1,
            Initiator::Simultaneous => self.simultaneous += 1,
            Initiator::Unknown => self.unknown += 1,
        }
        match c.how {
            How::RstSent => self.rst_sent += 1,
            How::RstReceived => self.rst_received += 1,
            How::Refused => self.refused += 1,
            How::Timeout => self.timeout += 1,
            How::Fin | How::Unknown => {}
        }
        self.timewait += u64::from(c.timewait);
        if let Some(d) = &c.details {
            self.with_counters += 1;
            self.bytes_sent += d.bytes_acked;
            self.bytes_received += d.bytes_received;
            self.segs_out += u64::from(d.segs_out);
            self.retrans += u64::from(d.total_retrans);
            if let Some(srtt) = d.srtt_us() {
                let h = self.rtts.get_or_insert_with(|| two_digit_histogram(1));
                let _ = h.record(u64::from(srtt));
            }
        }
        let comm = c.owner.as_ref().map(|o| o.comm.as_str());
        let comm = comm.as_deref().unwrap_or("?");
        // Look up by reference: a String is only made for a name not seen before.
        match self.procs.get_mut(comm) {
            Some(n) => *n += 1,
            None => {
                self.procs.insert(comm.to_string(), 1);
            }
        }
    }

    fn finish(&mut self) {
        let mut procs: Vec<TopProcess> = self
            .procs
            .drain()
            .map(|(comm, count)| TopProcess { comm, count })
            .collect();
        procs.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.comm.cmp(&b.comm)));
        procs.truncate(3);
        self.top_processes = procs;
        self.timewait_residency = self.residency.take().map(|h| Residency {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
        });
        self.srtt = self.rtts.take().map(|h| Rtt {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        });
        self.advice = advice(self);
    }
}

/// Rows with fewer events than this get no reading: too few to say anything.
const BUSY: u64 = 3;

/// What a row means, in one line that stays true to the kernel's behaviour.
pub fn advice(r: &Row) -> Option<String> {
    let events = r.closed + r.refused;
    if events < BUSY {
        return None;
    }
    let p = r.port;
    let share = |n: u64| n * 100 / r.closed.max(1);
    if r.timewait > 0 && share(r.local) >= 50 {
        return Some(match r.direction {
            Some(Way::In) => format!(
                "this host closes first on :{p}, so it holds the TIME_WAIT ({} here, 60 s each): \
                 let clients close first or keep connections alive; tcp_fin_timeout does not \
                 shorten TIME_WAIT",
                r.timewait
            ),
            Some(Way::Out) => format!(
                "this host closes its connections to :{p} first, so it holds the TIME_WAIT and \
                 its local ports: reuse connections (pooling, keep-alive); tcp_tw_reuse lets \
                 new outgoing connections reuse them"
            ),
            _ => format!("this host closes first on :{p}, so it holds the TIME_WAIT"),
        });
    }
    if share(r.rst_received) >= 20 {
        return Some(format!(
            "{}% of connections on :{p} end with a reset from the peer: look for peer \
             timeouts, crashes or a middlebox",
            share(r.rst_received)
        ));
    }
    if share(r.rst_sent) >= 20 {
        return Some(format!(
            "this host aborts {}% of connections on :{p} with a reset (SO_LINGER 0, or \
             closing with unread data)",
            share(r.rst_sent)
        ));
    }
    if r.refused * 2 >= events {
        return Some(match r.direction {
            Some(Way::In) => {
                format!("connection attempts to :{p} are refused: nothing listens there")
            }
            _ => format!("connections to :{p} are refused: the service is down or not listening"),
        });
    }
    if share(r.timeout) >= 20 {
        return Some(format!(
            "{}% of connections on :{p} time out",
            share(r.timeout)
        ));
    }
    if r.direction == Some(Way::In) && share(r.remote) >= 50 {
        return Some(format!(
            "clients close first on :{p}: the TIME_WAIT stays on their side"
        ));
    }
    if r.direction == Some(Way::Out) && share(r.remote) >= 50 {
        return Some(format!(
            "the servers on :{p} close first: the TIME_WAIT stays on their side"
        ));
    }
    None
}

/// One finished report.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `report`.
    pub kind: &'static str,
    /// Start of the window (RFC 3339).
    pub start: String,
    /// End of the window (RFC 3339).
    pub end: String,
    /// Its length.
    pub duration_ns: u64,
    /// Connections closed in it.
    pub connections: u64,
    /// Events lost in it.
    pub lost: u64,
    /// Sockets the tracker had to stop following (cap reached), since the start.
    pub evicted: u64,
    /// Rows, most TIME_WAIT first.
    pub rows: Vec<Row>,
}

/// The report view.
pub struct Report<W: Write> {
    /// Tracks every socket, follows timewait sockets.
    pipe: Pipeline,
    state_mask: u32,
    rows: FastMap<(u16, Way), Row>,
    out: W,
    format: Format,
    wall_offset_ns: i64,
    interval_ns: Option<u64>,
    window_start: Option<u64>,
    last_ts: u64,
    lost: u64,
    /// The kernel's names of reset reasons.
    reset_names: ResetNames,
}

impl<W: Write> Report<W> {
    /// A report of what `filter` keeps; `state_mask` (bits `1 << state`) keeps only
    /// connections that passed through one of those states. With `interval_ns`, a report
    /// is printed for every interval, else once at the end.
    pub fn new(
        filter: CompiledFilter,
        state_mask: u32,
        out: W,
        format: Format,
        wall_offset_ns: i64,
        interval_ns: Option<u64>,
    ) -> Self {
        Report {
            pipe: Pipeline::new(filter).tracking().timewaits(false),
            state_mask,
            rows: FastMap::default(),
            out,
            format,
            wall_offset_ns,
            interval_ns,
            window_start: None,
            last_ts: 0,
            lost: 0,
            reset_names: ResetNames::default(),
        }
    }

    /// Names reset reasons as the kernel does (for each row's `reasons`).
    pub fn reset_names(mut self, names: ResetNames) -> Self {
        self.reset_names = names;
        self
    }

    /// Whether timewait timers are traced (TIME_WAIT residency per row, missing ones counted).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = self.pipe.timewaits(traced);
        self
    }

    /// Whether the source carries connection records (the view then reads connections from
    /// them, not from transitions).
    pub fn records(mut self, yes: bool) -> Self {
        self.pipe = self.pipe.from_records(yes);
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

    fn row(&mut self, port: u16, way: Way) -> &mut Row {
        self.rows.entry((port, way)).or_insert_with(|| Row {
            port,
            direction: Some(way),
            ..Row::default()
        })
    }

    fn tally_exits(&mut self) {
        // Drained in place: the buffer keeps its capacity, no allocation per batch.
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if !self.pipe.filter().keeps_exit(&x) {
                continue;
            }
            // Counted under the connection whose close made it, unless that close was left
            // out of the report (its states did not match).
            if x.made_by.states != 0 && !self.keeps_states(x.made_by.states) {
                continue;
            }
            let port = x.made_by.service_port(x.local, x.remote);
            let row = self.row(port, Way::of(x.made_by.role));
            if x.end == End::NotCreated {
                row.timewait_not_created += 1;
            } else {
                let _ = row
                    .residency
                    .get_or_insert_with(|| two_digit_histogram(1_000))
                    .record(x.residency_ns);
            }
        }
        self.pipe.exits = exits;
    }

    /// The writer (for tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Whether a connection that was seen in `states` (bits `1 << state`) is reported.
    fn keeps_states(&self, states: u16) -> bool {
        self.state_mask == 0 || u32::from(states) & self.state_mask != 0
    }

    fn tally(&mut self) {
        // Drained in place: the buffer keeps its capacity, no allocation per batch.
        let mut closes = std::mem::take(&mut self.pipe.closes);
        // Shared, so that rows can be written while it is read.
        let names = self.reset_names.clone();
        for c in closes.drain(..) {
            if !self.pipe.filter().keeps_close(&c) {
                continue;
            }
            if !self.keeps_states(c.states) {
                continue;
            }
            self.row(c.service_port(), Way::of(c.role)).add(&c, &names);
        }
        self.pipe.closes = closes;
    }

    /// Takes the rows of the current window.
    pub fn summary(&mut self, end_ts: u64) -> Summary {
        let start = self.window_start.unwrap_or(end_ts);
        let mut rows: Vec<Row> = self.rows.drain().map(|(_, r)| r).collect();
        for r in &mut rows {
            r.finish();
        }
        rows.sort_by(|a, b| {
            b.timewait
                .cmp(&a.timewait)
                .then(b.closed.cmp(&a.closed))
                .then(a.port.cmp(&b.port))
                .then(a.direction.cmp(&b.direction))
        });
        let wall = |ts: u64| rfc3339(i128::from(ts) + i128::from(self.wall_offset_ns));
        let s = Summary {
            kind: "report",
            start: wall(start),
            end: wall(end_ts),
            duration_ns: end_ts.saturating_sub(start),
            connections: rows.iter().map(|r| r.closed).sum(),
            lost: self.lost,
            evicted: self.pipe.evicted(),
            rows,
        };
        self.window_start = Some(end_ts);
        self.lost = 0;
        s
    }

    fn emit(&mut self, end_ts: u64) -> io::Result<()> {
        let s = self.summary(end_ts);
        write_rows(&mut self.out, self.format, &[s], |s| render_text(&s[0]))
    }

    fn maybe_emit(&mut self, now: u64) -> io::Result<()> {
        if let (Some(iv), Some(start)) = (self.interval_ns, self.window_start)
            && now >= start + iv
        {
            self.pipe.expire_closes(now);
            self.tally();
            self.emit(start + iv)?;
        }
        Ok(())
    }
}

impl<W: Write> View for Report<W> {
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
            let ts = ev.ts_ns();
            self.window_start.get_or_insert(ts);
            self.maybe_emit(ts)?;
            self.last_ts = self.last_ts.max(ts);
            match &ev {
                Event::Lost { count, .. } => self.lost += count,
                // A SYN for a port nothing listens on: this host refused a connection.
                Event::Reset(r)
                    if r.skaddr.is_none()
                        && r.direction == Direction::Sent
                        && self.state_mask == 0
                        && self.pipe.filter().keeps_reset(r) =>
                {
                    let port = service_port(Role::Server, r.local, r.remote);
                    self.row(port, Way::In).refused += 1;
                }
                _ => {}
            }
            self.pipe.fold(&ev);
            self.tally();
            self.tally_exits();
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.expire_exits(now_ns);
        self.tally_exits();
        self.window_start.get_or_insert(now_ns);
        self.last_ts = self.last_ts.max(now_ns);
        self.maybe_emit(now_ns)?;
        Ok(Flow::More)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.pipe.finish();
        self.tally();
        self.tally_exits();
        self.emit(self.last_ts)
    }
}

/// `text`, or `-` when no connection of the row had its counters read.
fn counted(r: &Row, text: String) -> String {
    if r.with_counters == 0 {
        return "-".into();
    }
    text
}

/// Retransmitted segments, with their share of those sent: `12 (0.4%)`.
fn retrans_text(retrans: u64, segs_out: u64) -> String {
    if retrans == 0 {
        return "0".into();
    }
    format!(
        "{retrans} ({:.1}%)",
        retrans as f64 * 100.0 / segs_out.max(1) as f64
    )
}

/// The report as a table with a reading under each busy row.
pub fn render_text(s: &Summary) -> String {
    let mut out = title(s);
    if s.rows.is_empty() {
        out.push_str("no connection closed\n");
        return out;
    }
    out.push_str(&table(&s.rows).to_string());
    out.push('\n');
    let missing: u64 = s.rows.iter().map(|r| r.timewait_not_created).sum();
    if missing > 0 {
        out.push_str(&format!(
            "\n{missing} closes got no TIME_WAIT: tcp_max_tw_buckets was reached (the kernel \
             counts TCPTimeWaitOverflow)\n"
        ));
    }
    let readings = readings(&s.rows);
    if !readings.is_empty() {
        out.push_str("\nReading:\n");
        for r in readings {
            out.push_str(&format!("  {r}\n"));
        }
    }
    out
}

/// The report's first line: the window, the connections closed, and what was lost.
fn title(s: &Summary) -> String {
    let mut out = format!(
        "tcptrace report: {} to {} ({:.1} s), {} connections closed",
        s.start,
        s.end,
        ns_to_secs(s.duration_ns),
        s.connections
    );
    if s.lost > 0 {
        out.push_str(&format!(", {} events LOST (counts are low)", s.lost));
    }
    if s.evicted > 0 {
        out.push_str(&format!(", {} sockets evicted (tracking cap)", s.evicted));
    }
    out.push('\n');
    out
}

/// The table: a row per service port and direction, numbers aligned right.
fn table(rows: &[Row]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "PORT",
        "DIR",
        "CLOSED",
        "LOCAL",
        "REMOTE",
        "SIMULT",
        "UNKNOWN",
        "RST-SENT",
        "RST-RECV",
        "REFUSED",
        "TIMEOUT",
        "TIME_WAIT",
        "TW p50/p99/max",
        "SENT",
        "RECV",
        "RETRANS",
        "RTT p50/p99",
        "TOP PROCESSES",
    ]);
    for r in rows {
        t.add_row(cells(r));
    }
    for i in 2..17 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// `n` as a whole percentage of `d`, or `-` when `d` is 0.
fn percent(n: u64, d: u64) -> String {
    (n * 100)
        .checked_div(d)
        .map_or("-".into(), |p| format!("{p}%"))
}

/// One row's cells, in the header's order.
fn cells(r: &Row) -> [String; 18] {
    [
        format!(":{}", r.port),
        r.direction.map_or("?", Way::name).to_string(),
        r.closed.to_string(),
        percent(r.local, r.closed),
        percent(r.remote, r.closed),
        percent(r.simultaneous, r.closed),
        percent(r.unknown, r.closed),
        r.rst_sent.to_string(),
        r.rst_received.to_string(),
        r.refused.to_string(),
        r.timeout.to_string(),
        r.timewait.to_string(),
        r.timewait_residency.map_or("-".into(), |t| {
            format!(
                "{}/{}/{}",
                human_ns(t.p50_ns),
                human_ns(t.p99_ns),
                human_ns(t.max_ns)
            )
        }),
        counted(r, human_bytes(r.bytes_sent)),
        counted(r, human_bytes(r.bytes_received)),
        counted(r, retrans_text(r.retrans, r.segs_out)),
        r.srtt.map_or("-".into(), |t| {
            format!(
                "{}/{}",
                human_ns(t.p50_us * 1_000),
                human_ns(t.p99_us * 1_000)
            )
        }),
        r.top_processes
            .iter()
            .map(|p| format!("{} ({})", p.comm, p.count))
            .collect::<Vec<_>>()
            .join(", "),
    ]
}

/// The reading under the table: each row's advice, named by its port and direction.
fn readings(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| {
            let a = r.advice.as_ref()?;
            Some(format!(
                ":{} {}: {a}",
                r.port,
                r.direction.map_or("?", Way::name)
            ))
        })
        .collect()
}
