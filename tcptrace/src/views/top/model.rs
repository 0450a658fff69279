//! What `tcptrace top` shows, without a terminal: rows per service port and direction (as
//! `tcptrace report` has them), their rates and TIME_WAIT trend, the TIME_WAIT population by
//! age, sorting and filtering. Fed closes and the TIME_WAIT sockets held, told the time:
//! tested on synthetic input.

use std::{
    collections::{HashSet, VecDeque},
    net::SocketAddr,
};

pub use crate::views::report::Way;
use crate::{
    analysis::closes::{Close, How, Initiator, Role, service_port},
    shared::{FastMap, NS_PER_SEC, ns_to_secs},
    views::ports::{self, Dest, Peak},
};

/// How far back the TIME_WAIT trend (sparkline) looks.
pub const TREND_WINDOW_NS: u64 = 60 * NS_PER_SEC;
/// The arrow compares TIME_WAIT held now with this long ago.
pub const ARROW_LOOKBACK_NS: u64 = 10 * NS_PER_SEC;
/// How long a close's TIME_WAIT is credited to its row before its timewait socket shows.
const PENDING_GRACE_NS: u64 = 2 * NS_PER_SEC;
/// The upper ends of the age buckets (the last one is open): <1s, 1–10s, 10–30s, 30–60s,
/// >60s.
pub const AGE_BUCKET_UPPER_NS: [u64; 4] = [
    NS_PER_SEC,
    10 * NS_PER_SEC,
    30 * NS_PER_SEC,
    60 * NS_PER_SEC,
];
/// The buckets' labels, in order.
pub const AGE_BUCKET_LABELS: [&str; 5] = ["<1s", "1-10s", "10-30s", "30-60s", ">60s"];
/// The most pressed destinations kept for their pane (it shows as many as the screen fits).
pub const PRESSED_KEPT: usize = 8;

/// What the rows are ordered by (each descending, but the port ascending).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Closes per second over the last refresh.
    Closes,
    /// TIME_WAIT sockets held now.
    #[default]
    TimeWait,
    /// Connections ended by a reset (sent or received).
    Resets,
    /// Service port, then direction.
    Port,
}

impl SortKey {
    /// Its name in the header.
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Closes => "closes/s",
            SortKey::TimeWait => "TIME_WAIT",
            SortKey::Resets => "resets",
            SortKey::Port => "port",
        }
    }
}

/// A TIME_WAIT socket held now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// When it entered TIME_WAIT (estimated for one found at start).
    pub since_ns: u64,
}

/// One row as shown.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub port: u16,
    pub way: Way,
    /// Closes per second over the last refresh.
    pub closes_per_s: f64,
    /// Connections closed since the start.
    pub closed: u64,
    /// Of which closed first by this host, by the peer.
    pub local: u64,
    pub remote: u64,
    /// Ended by a reset, sent or received.
    pub resets: u64,
    /// TIME_WAIT sockets held now.
    pub timewait: u64,
    /// TIME_WAIT held at each refresh over the last minute: (when, how many).
    pub trend: Vec<(u64, u64)>,
}

/// A row's counts and history.
#[derive(Clone, Debug, Default)]
struct Tally {
    closed: u64,
    local: u64,
    remote: u64,
    resets: u64,
    /// Closes since the last refresh.
    recent: u64,
    closes_per_s: f64,
    timewait: u64,
    trend: VecDeque<(u64, u64)>,
}

/// A destination of the pressed pane: its `tcptrace ports` row, and its fullest moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressed {
    pub row: ports::Row,
    /// The most ports held toward it at once since the start, and that share of those
    /// available (as the row has them when none was recorded yet).
    pub peak_in_use: u64,
    pub peak_usage: f64,
}

/// The totals of the header.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub closes_per_s: f64,
    pub closed: u64,
    pub resets: u64,
    pub timewait: u64,
    pub lost: u64,
    /// The last refresh (CLOCK_MONOTONIC).
    pub now_ns: u64,
}

/// The board: every row's counts, the population by age, the sort and the filter.
#[derive(Debug, Default)]
pub struct Board {
    rows: FastMap<(u16, Way), Tally>,
    /// The row of each connection that entered TIME_WAIT, and when.
    timewait_rows: FastMap<(SocketAddr, SocketAddr), ((u16, Way), u64)>,
    ages: [u64; 5],
    lost: u64,
    last_refresh: Option<u64>,
    now_ns: u64,
    sort: SortKey,
    port_filter: Option<u16>,
    /// The destinations closest to running out of local ports, fullest first.
    pressed: Vec<Pressed>,
}

impl Board {
    /// An empty board, sorted by TIME_WAIT held.
    pub fn new() -> Board {
        Board::default()
    }

    /// Counts a close.
    pub fn close(&mut self, c: &Close) {
        let key = (c.service_port(), Way::of(c.role));
        let t = self.tally(key);
        t.closed += 1;
        t.recent += 1;
        match c.initiator {
            Initiator::Local => t.local += 1,
            Initiator::Remote => t.remote += 1,
            Initiator::Simultaneous | Initiator::Unknown => {}
        }
        t.resets += u64::from(matches!(c.how, How::RstSent | How::RstReceived));
        if c.timewait {
            self.timewait_rows
                .insert((c.local, c.remote), (key, c.ts_ns));
        }
    }

    /// A row's tally; a new row's trend begins with nothing held at the last refresh (it
    /// had no connection then), so that its first TIME_WAIT shows rising.
    fn tally(&mut self, key: (u16, Way)) -> &mut Tally {
        let last = self.last_refresh;
        self.rows.entry(key).or_insert_with(|| Tally {
            trend: last.map(|ts| (ts, 0)).into_iter().collect(),
            ..Tally::default()
        })
    }

    /// Events the kernel could not deliver.
    pub fn lost(&mut self, n: u64) {
        self.lost += n;
    }

    /// The refresh at `now_ns`: rates over the time since the last one, TIME_WAIT held per
    /// row and by age from `held`, the trends.
    pub fn refresh(&mut self, now_ns: u64, held: &[Held]) {
        let secs = self
            .last_refresh
            .map_or(1.0, |t| ns_to_secs(now_ns.saturating_sub(t)))
            .max(1e-3);
        let per_row = self.count_held(now_ns, held);
        self.last_refresh = Some(now_ns);
        self.now_ns = now_ns;
        for (key, t) in &mut self.rows {
            t.closes_per_s = t.recent as f64 / secs;
            t.recent = 0;
            t.timewait = per_row.get(key).copied().unwrap_or(0);
            t.trend.push_back((now_ns, t.timewait));
            while t
                .trend
                .front()
                .is_some_and(|(ts, _)| ts + TREND_WINDOW_NS < now_ns)
            {
                t.trend.pop_front();
            }
        }
    }

    /// TIME_WAIT held per row (rows created for sockets of no close seen), and the ages;
    /// forgets the rows of connections whose timewait socket is gone.
    fn count_held(&mut self, now_ns: u64, held: &[Held]) -> FastMap<(u16, Way), u64> {
        let mut per_row: FastMap<(u16, Way), u64> = FastMap::default();
        self.ages = [0; 5];
        let mut seen = HashSet::with_capacity(held.len());
        for h in held {
            seen.insert((h.local, h.remote));
            let key = self
                .timewait_rows
                .get(&(h.local, h.remote))
                .map_or_else(|| unknown_row(h), |(key, _)| *key);
            *per_row.entry(key).or_default() += 1;
            self.tally(key);
            self.ages[age_bucket(now_ns.saturating_sub(h.since_ns))] += 1;
        }
        // A close may come before its timewait socket is seen: kept a moment.
        self.timewait_rows.retain(|tuple, (_, ts)| {
            seen.contains(tuple) || ts.saturating_add(PENDING_GRACE_NS) > now_ns
        });
        per_row
    }

    /// The destinations of `rows` (one interval of `tcptrace ports`) that hold a port or
    /// failed to get one, the [`PRESSED_KEPT`] closest to running out, with their `peaks`.
    pub fn press<'a>(
        &mut self,
        rows: Vec<ports::Row>,
        peaks: impl Iterator<Item = (&'a Dest, &'a Peak)>,
    ) {
        let peaks: FastMap<Dest, Peak> = peaks.map(|(d, p)| (*d, *p)).collect();
        let mut rows: Vec<ports::Row> = rows
            .into_iter()
            .filter(|r| r.in_use > 0 || r.failures > 0)
            .collect();
        rows.sort_by(|a, b| {
            (b.usage.total_cmp(&a.usage))
                .then(b.in_use.cmp(&a.in_use))
                .then(b.failures.cmp(&a.failures))
                .then(a.dest().cmp(&b.dest()))
        });
        rows.truncate(PRESSED_KEPT);
        self.pressed = rows
            .into_iter()
            .map(|row| {
                let peak = peaks.get(&row.dest()).copied().unwrap_or(Peak {
                    in_use: row.in_use,
                    usage: row.usage,
                    ..Peak::default()
                });
                Pressed {
                    peak_in_use: peak.in_use.max(row.in_use),
                    peak_usage: peak.usage.max(row.usage),
                    row,
                }
            })
            .collect();
    }

    /// The most pressed destinations at the last refresh, fullest first.
    pub fn pressed(&self) -> &[Pressed] {
        &self.pressed
    }

    /// Orders the rows by `key`.
    pub fn sort_by(&mut self, key: SortKey) {
        self.sort = key;
    }

    /// The order now.
    pub fn sort_key(&self) -> SortKey {
        self.sort
    }

    /// Shows only rows of `port` (None: every row).
    pub fn filter_port(&mut self, port: Option<u16>) {
        self.port_filter = port;
    }

    /// The port shown alone, if any.
    pub fn port_filter(&self) -> Option<u16> {
        self.port_filter
    }

    /// The rows the filter keeps, in order.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .rows
            .iter()
            .filter(|((port, _), _)| self.port_filter.is_none_or(|p| p == *port))
            .map(|(&(port, way), t)| Row {
                port,
                way,
                closes_per_s: t.closes_per_s,
                closed: t.closed,
                local: t.local,
                remote: t.remote,
                resets: t.resets,
                timewait: t.timewait,
                trend: t.trend.iter().copied().collect(),
            })
            .collect();
        let by_port = |a: &Row, b: &Row| a.port.cmp(&b.port).then(a.way.cmp(&b.way));
        let ties = |a: &Row, b: &Row| b.closed.cmp(&a.closed).then(by_port(a, b));
        rows.sort_by(|a, b| match self.sort {
            SortKey::Closes => b.closes_per_s.total_cmp(&a.closes_per_s).then(ties(a, b)),
            SortKey::TimeWait => b.timewait.cmp(&a.timewait).then(ties(a, b)),
            SortKey::Resets => b.resets.cmp(&a.resets).then(ties(a, b)),
            SortKey::Port => by_port(a, b),
        });
        rows
    }

    /// TIME_WAIT held by age at the last refresh, as [`AGE_BUCKET_LABELS`] name them.
    pub fn ages(&self) -> [u64; 5] {
        self.ages
    }

    /// The header's totals (over every row, filtered or not).
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            lost: self.lost,
            now_ns: self.now_ns,
            ..Totals::default()
        };
        for r in self.rows.values() {
            t.closes_per_s += r.closes_per_s;
            t.closed += r.closed;
            t.resets += r.resets;
            t.timewait += r.timewait;
        }
        t
    }
}

/// The row of a TIME_WAIT socket whose close was not seen (it began before tracing did).
fn unknown_row(h: &Held) -> (u16, Way) {
    (service_port(Role::Unknown, h.local, h.remote), Way::Unknown)
}

/// The bucket of an age.
pub fn age_bucket(age_ns: u64) -> usize {
    AGE_BUCKET_UPPER_NS
        .iter()
        .position(|upper| age_ns < *upper)
        .unwrap_or(AGE_BUCKET_UPPER_NS.len())
}

/// Which way TIME_WAIT held went over the last [`ARROW_LOOKBACK_NS`]: rising, falling or
/// steady.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Rising,
    Falling,
    Steady,
}

impl Direction {
    /// Its arrow.
    pub fn arrow(self) -> char {
        match self {
            Direction::Rising => '↑',
            Direction::Falling => '↓',
            Direction::Steady => '→',
        }
    }
}

/// The direction of a trend: its last value against the earliest within the look-back.
pub fn direction(trend: &[(u64, u64)]) -> Direction {
    let Some(&(now, last)) = trend.last() else {
        return Direction::Steady;
    };
    let since = now.saturating_sub(ARROW_LOOKBACK_NS);
    let before = trend
        .iter()
        .find(|(ts, _)| *ts >= since)
        .map_or(last, |(_, n)| *n);
    match last.cmp(&before) {
        std::cmp::Ordering::Greater => Direction::Rising,
        std::cmp::Ordering::Less => Direction::Falling,
        std::cmp::Ordering::Equal => Direction::Steady,
    }
}

const SPARK_LEVELS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A trend as `cells` characters over the [`TREND_WINDOW_NS`] before its last sample: each
/// cell the most held in its slice of time, scaled to the most in the window (a space for a
/// slice with no sample or nothing held).
pub fn sparkline(trend: &[(u64, u64)], cells: usize) -> String {
    let Some(&(now, _)) = trend.last() else {
        return " ".repeat(cells);
    };
    let cells_u64 = cells.max(1) as u64;
    let slice = (TREND_WINDOW_NS / cells_u64).max(1);
    let mut most = vec![0u64; cells.max(1)];
    for &(ts, n) in trend {
        // Counted back from the last sample: the newest cell is the rightmost.
        let back = now.saturating_sub(ts) / slice;
        if back < cells_u64 {
            let i = (cells_u64 - 1 - back) as usize;
            most[i] = most[i].max(n);
        }
    }
    let top = most.iter().copied().max().unwrap_or(0).max(1);
    let last = SPARK_LEVELS.len() as u64 - 1;
    most.iter()
        .map(|&n| {
            // Anything held shows at least the lowest bar.
            let level = if n == 0 { 0 } else { (n * last).div_ceil(top) };
            SPARK_LEVELS[level as usize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NS_PER_SEC;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A close at `ts` of a connection between 10.0.0.1:`local` and 10.0.0.2:`remote`.
    fn close(ts: u64, local: u16, remote: u16, role: Role, initiator: Initiator) -> Close {
        Close {
            ts_ns: ts,
            skaddr: 1,
            local: addr(&format!("10.0.0.1:{local}")),
            remote: addr(&format!("10.0.0.2:{remote}")),
            initiator,
            how: How::Fin,
            timewait: initiator == Initiator::Local,
            role,
            lifetime_ns: None,
            owner: None,
            midlife: false,
            states: 0,
            netns: None,
            cgroup: None,
            details: None,
            reset_reason: None,
        }
    }

    fn held_of(c: &Close) -> Held {
        Held {
            local: c.local,
            remote: c.remote,
            since_ns: c.ts_ns,
        }
    }

    /// Clients of :80 that close first (this host holds their TIME_WAIT), and a server on
    /// :8080 whose clients close first, one of them with a reset.
    fn board() -> (Board, Vec<Held>) {
        let mut b = Board::new();
        let mut held = Vec::new();
        for i in 0..4 {
            let c = close(
                SEC + i,
                40_000 + i as u16,
                80,
                Role::Client,
                Initiator::Local,
            );
            held.push(held_of(&c));
            b.close(&c);
        }
        for i in 0..2 {
            let mut c = close(SEC, 8080, 50_000 + i, Role::Server, Initiator::Remote);
            if i == 1 {
                c.how = How::RstReceived;
            }
            b.close(&c);
        }
        (b, held)
    }

    #[test]
    fn rows_count_closes_who_closes_first_resets_and_timewait_held_per_port_and_direction() {
        let (mut b, held) = board();
        b.refresh(2 * SEC, &[]);
        b.refresh(4 * SEC, &held);
        let rows = b.rows();
        assert_eq!(rows.len(), 2);
        let (out80, in8080) = (&rows[0], &rows[1]);
        assert_eq!((out80.port, out80.way), (80, Way::Out));
        assert_eq!((out80.closed, out80.local, out80.remote), (4, 4, 0));
        assert_eq!((out80.timewait, out80.resets), (4, 0));
        assert_eq!((in8080.port, in8080.way), (8080, Way::In));
        assert_eq!((in8080.closed, in8080.remote, in8080.resets), (2, 2, 1));
        assert_eq!(in8080.timewait, 0);
        // The closes came before the first refresh: 6 over its second; none since.
        assert_eq!(out80.closes_per_s, 0.0);
        let t = b.totals();
        assert_eq!(
            (t.closed, t.timewait, t.resets, t.now_ns),
            (6, 4, 1, 4 * SEC)
        );
    }

    #[test]
    fn rates_are_per_second_over_the_time_since_the_last_refresh() {
        let (mut b, _) = board();
        b.refresh(0, &[]);
        b.close(&close(SEC, 40_100, 80, Role::Client, Initiator::Local));
        b.refresh(2 * SEC, &[]);
        // Four closes before the first refresh, over its assumed second; one in the next two.
        let out80 = b.rows().into_iter().find(|r| r.port == 80).unwrap();
        assert_eq!(out80.closes_per_s, 0.5);
        assert_eq!(b.totals().closes_per_s, 0.5);
    }

    #[test]
    fn timewait_of_no_close_seen_goes_to_an_unknown_row_and_ages_fill_buckets() {
        let mut b = Board::new();
        let now = 100 * SEC;
        let h = |local: &str, remote: &str, age_ns: u64| Held {
            local: addr(local),
            remote: addr(remote),
            since_ns: now - age_ns,
        };
        let held = [
            h("10.0.0.1:40000", "10.0.0.2:443", SEC / 2),
            h("10.0.0.1:40001", "10.0.0.2:443", 5 * SEC),
            h("10.0.0.1:8080", "10.0.0.2:50000", 20 * SEC),
            h("10.0.0.1:8080", "10.0.0.2:50001", 45 * SEC),
            h("10.0.0.1:8080", "10.0.0.2:50002", 59 * SEC),
            h("10.0.0.1:8080", "10.0.0.2:50003", 61 * SEC),
        ];
        b.refresh(now, &held);
        assert_eq!(b.ages(), [1, 1, 1, 2, 1]);
        let rows = b.rows();
        let keys: Vec<_> = rows.iter().map(|r| (r.port, r.way, r.timewait)).collect();
        assert_eq!(keys, [(8080, Way::Unknown, 4), (443, Way::Unknown, 2)]);
    }

    #[test]
    fn a_close_keeps_its_row_for_its_timewait_socket_until_it_is_gone() {
        let mut b = Board::new();
        let c = close(SEC, 40_000, 80, Role::Client, Initiator::Local);
        b.close(&c);
        // Its timewait socket not seen yet, then seen a minute long, then gone.
        b.refresh(2 * SEC, &[]);
        b.refresh(60 * SEC, &[held_of(&c)]);
        assert_eq!(b.rows()[0].timewait, 1);
        b.refresh(62 * SEC, &[]);
        assert_eq!(b.rows()[0].timewait, 0);
        // The same 4-tuple's socket now is of no close seen.
        b.refresh(63 * SEC, &[held_of(&c)]);
        let unknown = b.rows().into_iter().find(|r| r.timewait == 1).unwrap();
        assert_eq!((unknown.port, unknown.way), (80, Way::Unknown));
    }

    #[test]
    fn sort_keys_order_rows_and_the_filter_keeps_one_port() {
        let (mut b, held) = board();
        b.close(&close(SEC, 22, 50_000, Role::Server, Initiator::Unknown));
        b.refresh(0, &[]);
        for i in 0..3 {
            b.close(&close(
                SEC,
                8080,
                51_000 + i,
                Role::Server,
                Initiator::Remote,
            ));
        }
        b.refresh(SEC, &held);
        let order = |b: &Board| -> Vec<u16> { b.rows().iter().map(|r| r.port).collect() };
        assert_eq!(order(&b), [80, 8080, 22], "TIME_WAIT, then closed");
        b.sort_by(SortKey::Closes);
        assert_eq!(order(&b), [8080, 80, 22]);
        b.sort_by(SortKey::Resets);
        assert_eq!(order(&b), [8080, 80, 22]);
        b.sort_by(SortKey::Port);
        assert_eq!(order(&b), [22, 80, 8080]);
        b.filter_port(Some(80));
        assert_eq!(order(&b), [80]);
        assert_eq!(b.totals().closed, 10, "totals are of every port");
    }

    #[test]
    fn the_trend_keeps_a_minute_and_its_arrow_compares_with_ten_seconds_ago() {
        let mut b = Board::new();
        let c = close(0, 40_000, 80, Role::Client, Initiator::Local);
        b.close(&c);
        for s in 0..=70 {
            let held = if s < 40 { vec![held_of(&c)] } else { vec![] };
            b.refresh(s * SEC, &held);
        }
        let trend = &b.rows()[0].trend;
        assert_eq!(trend.first(), Some(&(10 * SEC, 1)), "a minute back");
        assert_eq!(trend.len(), 61);
        // Held until 39 s: steady at 29 s, falling at 45 s, steady 10 s after the fall.
        assert_eq!(direction(&trend[..20]), Direction::Steady);
        assert_eq!(direction(&trend[..36]), Direction::Falling);
        assert_eq!(direction(trend), Direction::Steady);
        assert_eq!(direction(&[(0, 0), (5 * SEC, 1)]), Direction::Rising);
        // A row new since the last refresh had nothing held then.
        let later = close(71 * SEC, 40_001, 443, Role::Client, Initiator::Local);
        b.close(&later);
        b.refresh(72 * SEC, &[held_of(&later)]);
        let row = b.rows().into_iter().find(|r| r.port == 443).unwrap();
        assert_eq!(row.trend, [(70 * SEC, 0), (72 * SEC, 1)]);
        assert_eq!(direction(&row.trend), Direction::Rising);
        assert_eq!(direction(&[]), Direction::Steady);
    }

    #[test]
    fn a_sparkline_scales_to_the_most_held_in_its_minute() {
        let trend: Vec<(u64, u64)> = (0..=60).map(|s| (s * SEC, s)).collect();
        assert_eq!(sparkline(&trend, 6), "▂▃▄▆▇█");
        let half: Vec<(u64, u64)> = (0..=60).map(|s| (s * SEC, u64::from(s >= 30))).collect();
        assert_eq!(
            sparkline(&half, 6),
            "  ████",
            "each cell ends with its slice"
        );
        assert_eq!(sparkline(&[], 3), "   ");
        let recent = [(100 * SEC, 8)];
        assert_eq!(sparkline(&recent, 4), "   █", "no samples yet: blank");
    }

    #[test]
    fn ages_fall_in_their_buckets() {
        let buckets: Vec<usize> = [0, SEC - 1, SEC, 10 * SEC, 30 * SEC - 1, 60 * SEC, u64::MAX]
            .map(age_bucket)
            .into();
        assert_eq!(buckets, [0, 0, 1, 2, 2, 4, 4]);
    }

    struct TenPorts;

    impl ports::Ranges for TenPorts {
        fn range(&mut self, _: Option<u32>) -> ports::PortRange {
            ports::PortRange {
                low: 40_000,
                high: 40_009,
                reserved: 0,
            }
        }
    }

    /// A TIME_WAIT socket from 10.0.0.1:`lport` toward `remote`.
    fn tw(lport: u16, remote: &str) -> ports::TimewaitTuple {
        (Some(7), addr(&format!("10.0.0.1:{lport}")), addr(remote))
    }

    /// A connect from 10.0.0.1:`lport` (its port already chosen) toward `remote`.
    fn connect(sk: u64, lport: u16, remote: &str) -> crate::model::event::Transition {
        crate::model::event::Transition {
            ts_ns: SEC,
            skaddr: sk,
            local: addr(&format!("10.0.0.1:{lport}")),
            remote: addr(remote),
            from: crate::model::event::State::Close,
            to: crate::model::event::State::SynSent,
            in_from_ns: None,
            owner: None,
            mptcp: false,
            netns: Some(7),
            cgroup: None,
        }
    }

    /// The pane's destinations as (remote, ports held, TIME_WAIT, usage %, peak %).
    fn pane(b: &Board) -> Vec<(String, u64, u64, u64, u64)> {
        let pct = |u: f64| (u * 100.0).round() as u64;
        b.pressed()
            .iter()
            .map(|p| {
                let r = &p.row;
                let remote = SocketAddr::new(r.raddr, r.rport).to_string();
                (
                    remote,
                    r.in_use,
                    r.timewait,
                    pct(r.usage),
                    pct(p.peak_usage),
                )
            })
            .collect()
    }

    #[test]
    fn pressed_destinations_are_the_fullest_with_their_peak_and_those_holding_nothing_go() {
        let (a, b_, c) = ("10.0.0.2:80", "10.0.0.3:443", "10.0.0.4:25");
        let mut core = ports::PortsCore::new(Box::new(TenPorts), 0);
        let mut b = Board::new();
        core.transition(&connect(1, 40_005, b_), true);
        core.transition(&connect(2, 40_006, b_), true);
        let first = [tw(40_000, a), tw(40_001, a), tw(40_002, a), tw(40_003, c)];
        let rows = core.snapshot(&first, SEC);
        b.press(rows, core.peaks());
        let want = [(a, 3, 3, 30, 30), (b_, 2, 0, 20, 20), (c, 1, 1, 10, 10)];
        assert_eq!(
            pane(&b),
            want.map(|(d, n, t, u, p)| (d.to_string(), n, t, u, p))
        );
        // A's TIME_WAIT expire but one, C's is gone: B is fullest, A keeps its peak.
        let rows = core.snapshot(&[tw(40_000, a)], 2 * SEC);
        assert_eq!(rows.len(), 3, "ports still has C's row (its drop)");
        b.press(rows, core.peaks());
        let want = [(b_, 2, 0, 20, 20), (a, 1, 1, 10, 30)];
        assert_eq!(
            pane(&b),
            want.map(|(d, n, t, u, p)| (d.to_string(), n, t, u, p))
        );
        // More destinations than the pane keeps.
        let many: Vec<_> = (0..12)
            .map(|i| tw(40_000, &format!("10.0.1.{i}:80")))
            .collect();
        let rows = core.snapshot(&many, 3 * SEC);
        b.press(rows, core.peaks());
        assert_eq!(b.pressed().len(), PRESSED_KEPT);
        assert_eq!(b.pressed()[0].row.in_use, 2, "B first: {:?}", pane(&b));
    }
}
