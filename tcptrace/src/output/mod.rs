//! Rendering the event stream: aligned text for people (`text`), JSON lines for pipelines
//! (`json`), both through one [`Renderer`]; the order lines are written in ([`reorder`]);
//! and what every view's output shares (formats, durations, sizes and times for people,
//! rows as text or JSON).
//!
//! The JSON schema is documented in `docs/json.md`; keep the two in step.
//!
//! Layer: above the analysis; it may use [`crate::analysis`] (the closes and exits it
//! renders), [`crate::model`] and [`crate::shared`], never the views.

mod json;
pub mod reorder;
mod text;

use std::{
    fmt,
    io::{self, Write},
};

use serde::Serialize;

use crate::{
    analysis::{
        closes::Close,
        reason::{ResetNames, end_reason},
        timewait::{End, Exit},
    },
    model::{
        cgroup::{CgroupName, Cgroups},
        event::{Direction, Reset, State, Transition},
    },
    shared::FastMap,
};
use json::{
    Hex, LostJson, NsFields, ResetJson, SecondCache, TimewaitJson, close_json, transition_json,
};
use text::details_text;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// How timestamps and text are rendered.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    /// CLOCK_REALTIME − CLOCK_MONOTONIC of the host the events come from.
    pub wall_offset_ns: i64,
    /// Seconds east of UTC for the text time column.
    pub utc_offset_secs: i32,
    /// ANSI colors in text output.
    pub color: bool,
    /// Width of the address columns at the start; the renderer widens them to
    /// [`IPV6_ENDPOINT_WIDTH`] for good at the first IPv6 endpoint.
    pub addr_width: usize,
}

impl Style {
    /// The starting address-column width for a family filter (4, 6 or both): IPv6's only
    /// when nothing else can be shown.
    pub fn addr_width_for(family: Option<u8>) -> usize {
        if family == Some(6) {
            IPV6_ENDPOINT_WIDTH
        } else {
            IPV4_ENDPOINT_WIDTH
        }
    }
}

/// Characters of the widest IPv4 endpoint, `255.255.255.255:65535`.
pub const IPV4_ENDPOINT_WIDTH: usize = 21;
/// Characters of the widest IPv6 endpoint: `[` eight groups of four hex digits `]:65535`.
pub const IPV6_ENDPOINT_WIDTH: usize = 47;
/// Characters a text line stays within, with IPv4 endpoints and without `--show-ns`: what
/// does not fit on a row goes on a continuation line.
pub const LINE_WIDTH: usize = 120;

/// Renders events into a writer. Nothing is flushed here: callers flush once per batch.
pub struct Renderer {
    format: Format,
    style: Style,
    line: String,
    /// The JSON line being built: reused, so a record costs no allocation.
    json: Vec<u8>,
    /// The formatted date and time of day of the last second seen, for JSON timestamps.
    second: SecondCache,
    /// Cgroup names and their JSON fields.
    ns: NsJson,
    /// Text: show each socket's network namespace and cgroup.
    show_ns: bool,
    /// The kernel's names of reset reasons.
    reset_names: ResetNames,
}

impl Renderer {
    /// Whether lines are text (for people) rather than JSON.
    pub fn is_text(&self) -> bool {
        self.format == Format::Text
    }

    /// A renderer for one output.
    pub fn new(format: Format, style: Style) -> Self {
        Renderer {
            format,
            style,
            line: String::with_capacity(256),
            json: Vec::with_capacity(512),
            second: SecondCache::default(),
            ns: NsJson::new(Cgroups::none()),
            show_ns: false,
            reset_names: ResetNames::default(),
        }
    }

    /// Names reset reasons as the kernel does (without them, resets carry their numbers
    /// only, and closes by a reset sent say `unknown` for their reason).
    pub fn reset_names(mut self, names: ResetNames) -> Self {
        self.reset_names = names;
        self
    }

    /// Names cgroups with `names` (without it, every cgroup is shown as its id).
    pub fn with_cgroups(mut self, names: Cgroups) -> Self {
        self.ns = NsJson::new(names);
        self
    }

    /// Text: adds NETNS and CGROUP columns (the socket's network namespace inode, and its
    /// container's short id, else its cgroup path, else its cgroup id). JSON always has them.
    pub fn show_ns(mut self, show: bool) -> Self {
        self.show_ns = show;
        self
    }

    /// The header line (text only).
    pub fn header(&mut self, out: &mut impl Write) -> io::Result<()> {
        if self.format == Format::Text {
            writeln!(out, "{}", self.header_line())?;
        }
        Ok(())
    }

    /// One transition.
    pub fn transition(&mut self, out: &mut impl Write, t: &Transition) -> io::Result<()> {
        self.line.clear();
        match self.format {
            Format::Text => self.text_transition(t),
            Format::Json => {
                self.json.clear();
                let wall = wall_ns(t.ts_ns, self.style.wall_offset_ns);
                transition_json(&mut self.json, &mut self.second, &mut self.ns, wall, t);
                self.json.push(b'\n');
                return out.write_all(&self.json);
            }
        }
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }

    /// A reset sent or received.
    pub fn reset(&mut self, out: &mut impl Write, r: &Reset) -> io::Result<()> {
        self.line.clear();
        let dir = match r.direction {
            Direction::Sent => "sent",
            Direction::Received => "received",
        };
        match self.format {
            Format::Text => {
                let what = match r.state {
                    Some(st) => format!("RST {dir} in {st}"),
                    None => format!("RST {dir}"),
                };
                let tail = r
                    .reason
                    .and_then(|n| self.reset_names.name(n))
                    .map(|name| format!(" ({name})"))
                    .unwrap_or_default();
                let (on, off) = self.paint("\x1b[31m");
                self.text_row(
                    r.ts_ns,
                    r.owner.as_ref(),
                    (r.netns, r.cgroup),
                    r.local,
                    r.remote,
                    on,
                    &what,
                    off,
                    "",
                );
                self.end_row(&tail);
            }
            Format::Json => {
                let name = self.ns.resolve(r.cgroup);
                // Shared: borrowed from while the record is written.
                let names = self.reset_names.clone();
                let rec = ResetJson {
                    common: self.common("reset", r.ts_ns, Some((r.local, r.remote))),
                    direction: dir,
                    state: r.state.map(State::name),
                    reason: r.reason,
                    reason_name: r.reason.and_then(|n| names.name(n)),
                    pid: r.owner.as_ref().map(|o| o.pid),
                    comm: r.owner.as_ref().map(|o| o.comm.as_str()),
                    skaddr: r.skaddr.map(Hex),
                    ns: NsFields::new(r.netns, r.cgroup, name.as_deref()),
                };
                return self.json_line(out, &rec);
            }
        }
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }

    /// The classified end of a connection.
    pub fn close(&mut self, out: &mut impl Write, c: &Close) -> io::Result<()> {
        self.line.clear();
        match self.format {
            Format::Text => {
                let reason = end_reason(c, &self.reset_names);
                let what = format!("closed: {}/{}", c.initiator.name(), c.how.name());
                // Only where it says more than `how`.
                let why = if ["fin", "peer_reset", "refused", "unknown"].contains(&reason) {
                    String::new()
                } else {
                    format!(", reason {reason}")
                };
                let lifetime = c.lifetime_ns.map(human_ns).unwrap_or_else(|| "-".into());
                let tail = format!(
                    "  {}{}{}{why}{}",
                    c.role.name(),
                    if c.timewait { ", TIME_WAIT here" } else { "" },
                    if c.midlife { ", seen mid-life" } else { "" },
                    c.details.as_ref().map(details_text).unwrap_or_default()
                );
                let (on, off) = self.paint("\x1b[1m");
                self.text_row(
                    c.ts_ns,
                    c.owner.as_ref(),
                    (c.netns, c.cgroup),
                    c.local,
                    c.remote,
                    on,
                    &what,
                    off,
                    &lifetime,
                );
                self.end_row(&tail);
            }
            Format::Json => {
                self.json.clear();
                let wall = wall_ns(c.ts_ns, self.style.wall_offset_ns);
                let reason = end_reason(c, &self.reset_names);
                close_json(
                    &mut self.json,
                    &mut self.second,
                    &mut self.ns,
                    (wall, reason),
                    c,
                );
                self.json.push(b'\n');
                return out.write_all(&self.json);
            }
        }
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }

    /// The end of a timewait socket (or a TIME_WAIT that was never created).
    pub fn timewait_exit(&mut self, out: &mut impl Write, x: &Exit) -> io::Result<()> {
        self.line.clear();
        match self.format {
            Format::Text => {
                let (what, last) = match x.end {
                    End::NotCreated => ("no TIME_WAIT".to_string(), "-".to_string()),
                    _ => (format!("{} → CLOSE", x.substate), human_ns(x.residency_ns)),
                };
                let mut tail = match x.end {
                    End::Expired if x.substate == State::FinWait2 => {
                        "  expired (FIN_WAIT2 timeout: the peer never sent its FIN)".to_string()
                    }
                    End::Expired => "  expired".to_string(),
                    End::Killed => "  killed early".to_string(),
                    End::NotCreated => "  tcp_max_tw_buckets reached: closed at once".to_string(),
                };
                if x.rearms > 0 {
                    tail.push_str(&format!(", timer re-armed {}×", x.rearms));
                }
                let (on, off) = self.paint("\x1b[33m");
                self.text_row(
                    x.ts_ns,
                    x.owner.as_ref(),
                    (x.netns, x.cgroup),
                    x.local,
                    x.remote,
                    on,
                    &what,
                    off,
                    &last,
                );
                self.end_row(&tail);
            }
            Format::Json => {
                let name = self.ns.resolve(x.cgroup);
                let rec = TimewaitJson {
                    common: self.common("timewait", x.ts_ns, Some((x.local, x.remote))),
                    end: x.end.name(),
                    residency_ns: (x.end != End::NotCreated).then_some(x.residency_ns),
                    rearms: x.rearms,
                    substate: x.substate.name(),
                    pid: x.owner.as_ref().map(|o| o.pid),
                    comm: x.owner.as_ref().map(|o| o.comm.as_str()),
                    twaddr: (x.tw != 0).then_some(Hex(x.tw)),
                    ns: NsFields::new(x.netns, x.cgroup, name.as_deref()),
                };
                return self.json_line(out, &rec);
            }
        }
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }

    /// A lost-events notice.
    pub fn lost(&mut self, out: &mut impl Write, ts_ns: u64, count: u64) -> io::Result<()> {
        match self.format {
            Format::Text => {
                let (on, off) = self.paint("\x1b[1;31m");
                writeln!(
                    out,
                    "{} {on}LOST {count} events: ring buffer full (try --ring-buffer-size, \
                     filters) or CPU busy: program skipped{off}",
                    self.clock(ts_ns)
                )
            }
            Format::Json => {
                let rec = LostJson {
                    common: self.common("lost", ts_ns, None),
                    count,
                };
                self.json_line(out, &rec)
            }
        }
    }
}

fn wall_ns(ts_ns: u64, wall_offset_ns: i64) -> i128 {
    i128::from(ts_ns) + i128::from(wall_offset_ns)
}

/// Writes `rows` as JSON lines, or as `text` renders them, and flushes: what the views that
/// print every interval write.
pub fn write_rows<W: Write, R: Serialize>(
    out: &mut W,
    format: Format,
    rows: &[R],
    text: impl FnOnce(&[R]) -> String,
) -> io::Result<()> {
    match format {
        Format::Json => {
            for r in rows {
                serde_json::to_writer(&mut *out, r)?;
                writeln!(out)?;
            }
        }
        Format::Text => write!(out, "{}", text(rows))?,
    }
    out.flush()
}

/// RFC 3339 in UTC with nanoseconds: `2026-11-25T01:02:03.123456789Z`.
pub fn rfc3339(unix_ns: i128) -> String {
    WallTime(unix_ns).to_string()
}

/// A wall-clock time (ns since the Unix epoch) that prints as RFC 3339 in UTC with
/// nanoseconds, without allocating (JSON records are written straight from it).
#[derive(Clone, Copy, Debug)]
pub struct WallTime(pub i128);

impl fmt::Display for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match time::OffsetDateTime::from_unix_timestamp_nanos(self.0) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond()
            ),
            Err(_) => f.write_str("invalid-time"),
        }
    }
}

impl Serialize for WallTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration for people: `850ns`, `83.2µs`, `1.50ms`, `2.31s`, `1m02s`.
pub fn human_ns(ns: u64) -> String {
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}µs", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", f / 1e6)
    } else if ns < 60_000_000_000 {
        format!("{:.2}s", f / 1e9)
    } else {
        // Tenths matter past a minute: a 2MSL expiry is 60.3 s or 61.5 s, not "1m".
        let tenths = ns / 100_000_000;
        let (m, t) = (tenths / 600, tenths % 600);
        format!("{m}m{:02}.{}s", t / 10, t % 10)
    }
}

/// Bytes for people: `850B`, `12.3KiB`, `1.00MiB`, `2.50GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.digits$}{}", UNITS[unit])
}

/// The namespace and cgroup fields of JSON records, with each resolved cgroup's fields
/// rendered once and kept (a transition line copies them).
struct NsJson {
    names: Cgroups,
    /// Cgroup id → `,"cgroup":"/path"[,"container":"…"][,"pod":"…"]`.
    fields: FastMap<u64, Box<[u8]>>,
}

impl NsJson {
    fn new(names: Cgroups) -> Self {
        NsJson {
            names,
            fields: FastMap::default(),
        }
    }

    fn resolve(&self, cgroup: Option<u64>) -> Option<std::sync::Arc<CgroupName>> {
        cgroup.and_then(|id| self.names.resolve(id))
    }
}

/// The local timezone's offset from UTC now, in seconds (0 if unknown).
pub fn local_utc_offset_secs() -> i32 {
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff as i32
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use std::net::SocketAddr;

    use super::{json::*, text::*, *};
    use crate::model::event::{Comm, Details, Owner};
    use tcptrace_common::details::NO_MIN_RTT;

    fn serde_transition(r: &Renderer, names: &Cgroups, t: &Transition) -> String {
        let name = t.cgroup.and_then(|id| names.resolve(id));
        serde_json::to_string(&TransitionJson {
            common: r.common("transition", t.ts_ns, Some((t.local, t.remote))),
            from: t.from.name(),
            to: t.to.name(),
            in_from_ns: t.in_from_ns,
            pid: t.owner.as_ref().map(|o| o.pid),
            comm: t.owner.as_ref().map(|o| o.comm.as_str()),
            pid_from: t.owner.map(|o| {
                if o.from_listener {
                    "listener"
                } else {
                    "socket"
                }
            }),
            skaddr: Hex(t.skaddr),
            mptcp: t.mptcp,
            ns: NsFields::new(t.netns, t.cgroup, name.as_deref()),
        })
        .unwrap()
    }

    /// A JSON renderer at `wall_offset` naming the cgroups in `names`.
    fn json_renderer(wall_offset: i64, names: &Cgroups) -> Renderer {
        let style = Style {
            wall_offset_ns: wall_offset,
            utc_offset_secs: 0,
            color: false,
            addr_width: IPV6_ENDPOINT_WIDTH,
        };
        Renderer::new(Format::Json, style).with_cgroups(names.clone())
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            any::<u16>().prop_map(|p| SocketAddr::from(([0u16, 0, 0, 0, 0, 0xffff, 0x7f00, 1], p))),
        ]
    }

    /// A cgroup path: anything a directory may be called (quotes, backslashes, control
    /// characters, non-ASCII), or one that names a container and a pod.
    fn any_cgroup_path() -> impl Strategy<Value = String> {
        prop_oneof![
            "(/[^/\\u{0}]{1,12}){0,4}".prop_map(|p| if p.is_empty() { "/".into() } else { p }),
            "[0-9a-f]{64}".prop_map(|id| format!(
                "/kubepods.slice/kubepods-pod0a1b2c3d_1111_2222_3333_444455556666.slice/cri-containerd-{id}.scope"
            )),
        ]
    }

    proptest! {
        /// The hand-written transition line is exactly serde_json's, for any addresses,
        /// names (quotes, control characters, invalid UTF-8), times (before 1970, out of
        /// range, or in the second the cache already holds), kernel addresses, namespaces
        /// and cgroups (unknown, unresolved, resolved to any path, with a container).
        #[test]
        fn the_fast_transition_line_is_serde_jsons(
            local in any_addr(), remote in any_addr(),
            from in 1u8..=12, to in 1u8..=12,
            in_from in proptest::option::of(any::<u64>()),
            owner in proptest::option::of((any::<u32>(), any::<[u8; 16]>(), any::<bool>())),
            ts in prop_oneof![any::<u64>(), 1_000_000_000u64..1_000_100_000],
            wall_offset in prop_oneof![Just(1_764_000_000_000_000_000i64), any::<i64>()],
            skaddr in any::<u64>(), mptcp in any::<bool>(),
            netns in proptest::option::of(1u32..),
            cgroup in proptest::option::of(prop_oneof![1u64..4, 4u64..]),
            paths in proptest::collection::vec(any_cgroup_path(), 3),
        ) {
            // Ids 1 to 3 resolve; others do not.
            let names = Cgroups::from_paths((1u64..).zip(paths));
            let t = Transition {
                ts_ns: ts,
                skaddr,
                local,
                remote,
                from: State::from_kernel(from).unwrap(),
                to: State::from_kernel(to).unwrap(),
                in_from_ns: in_from,
                owner: owner.map(|(pid, comm, from_listener)| Owner {
                    pid,
                    comm: Comm(comm),
                    from_listener,
                }),
                mptcp,
                netns,
                cgroup,
            };
            let mut r = json_renderer(wall_offset, &names);
            let mut out = Vec::new();
            // Twice: the second line comes from the second's and the cgroup's caches.
            r.transition(&mut out, &t).unwrap();
            r.transition(&mut out, &t).unwrap();
            let want = serde_transition(&r, &names, &t);
            prop_assert_eq!(String::from_utf8(out).unwrap(), format!("{want}\n{want}\n"));
        }
    }

    proptest! {
        /// The hand-written close line is exactly serde_json's, for every initiator, way
        /// and role, any lifetime, owner, kernel address, namespace and cgroup.
        #[test]
        fn the_fast_close_line_is_serde_jsons(
            local in any_addr(), remote in any_addr(),
            initiator in 0usize..4, how in 0usize..6, role in 0usize..3,
            timewait in any::<bool>(), midlife in any::<bool>(),
            lifetime in proptest::option::of(any::<u64>()),
            owner in proptest::option::of((any::<u32>(), any::<[u8; 16]>(), any::<bool>())),
            ts in any::<u64>(),
            wall_offset in prop_oneof![Just(1_764_000_000_000_000_000i64), any::<i64>()],
            skaddr in any::<u64>(),
            netns in proptest::option::of(1u32..),
            cgroup in proptest::option::of(prop_oneof![1u64..4, 4u64..]),
            paths in proptest::collection::vec(any_cgroup_path(), 3),
            details in proptest::option::of(any::<[u64; 6]>()),
        ) {
            use crate::analysis::closes::{How, Initiator, Role};
            let names = Cgroups::from_paths((1u64..).zip(paths));
            let c = Close {
                ts_ns: ts,
                skaddr,
                local,
                remote,
                initiator: [Initiator::Local, Initiator::Remote, Initiator::Simultaneous,
                    Initiator::Unknown][initiator],
                how: [How::Fin, How::RstSent, How::RstReceived, How::Refused, How::Timeout,
                    How::Unknown][how],
                timewait,
                role: [Role::Client, Role::Server, Role::Unknown][role],
                lifetime_ns: lifetime,
                owner: owner.map(|(pid, comm, from_listener)| Owner {
                    pid,
                    comm: Comm(comm),
                    from_listener,
                }),
                midlife,
                states: 0,
                netns,
                cgroup,
                details: details.map(|[a, b, c, d, e, f]| Details {
                    bytes_acked: a,
                    bytes_received: b,
                    segs_out: c as u32,
                    segs_in: (c >> 32) as u32,
                    total_retrans: d as u32,
                    srtt_us: (d >> 32) as u32 % 3,
                    rttvar_us: e as u32,
                    min_rtt_us: [(e >> 32) as u32, NO_MIN_RTT][f as usize % 2],
                    ..Details::default()
                }),
                reset_reason: None,
            };
            let mut r = json_renderer(wall_offset, &names);
            let mut out = Vec::new();
            r.close(&mut out, &c).unwrap();
            r.close(&mut out, &c).unwrap();
            let name = c.cgroup.and_then(|id| names.resolve(id));
            let want = serde_json::to_string(&CloseJson {
                common: r.common("close", c.ts_ns, Some((c.local, c.remote))),
                initiator: c.initiator.name(),
                how: c.how.name(),
                timewait: c.timewait,
                role: c.role.name(),
                lifetime_ns: c.lifetime_ns,
                midlife: c.midlife,
                pid: c.owner.as_ref().map(|o| o.pid),
                comm: c.owner.as_ref().map(|o| o.comm.as_str()),
                skaddr: Hex(c.skaddr),
                ns: NsFields::new(c.netns, c.cgroup, name.as_deref()),
                details: DetailsJson::new(c.details.as_ref()),
                reason: end_reason(&c, &ResetNames::default()),
            })
            .unwrap();
            prop_assert_eq!(String::from_utf8(out).unwrap(), format!("{want}\n{want}\n"));
        }
    }

    /// A text renderer starting at the width `family` (a filter) gives.
    fn text_renderer(family: Option<u8>, color: bool) -> Renderer {
        let style = Style {
            wall_offset_ns: 0,
            utc_offset_secs: 0,
            color,
            addr_width: Style::addr_width_for(family),
        };
        Renderer::new(Format::Text, style).reset_names(ResetNames::from_pairs([
            (1, "NO_SOCKET"),
            (2, "TCP_ABORT_ON_CLOSE"),
        ]))
    }

    /// The widest pid, a 15-byte name.
    fn busy_owner() -> Option<Owner> {
        let mut comm = [0u8; 16];
        comm[..15].copy_from_slice(b"systemd-resolve");
        Some(Owner {
            pid: 4_194_304,
            comm: Comm(comm),
            from_listener: false,
        })
    }

    fn transition(local: SocketAddr, remote: SocketAddr, from: State, to: State) -> Transition {
        Transition {
            ts_ns: 1,
            skaddr: 1,
            local,
            remote,
            from,
            to,
            in_from_ns: Some(999_990_000),
            owner: busy_owner(),
            mptcp: false,
            netns: None,
            cgroup: None,
        }
    }

    /// Every kind of text line, with IPv4 endpoints and typical values, into `r`.
    fn every_line_kind(r: &mut Renderer, out: &mut Vec<u8>) {
        use crate::analysis::closes::{How, Initiator, Role};
        use State::{
            CloseWait, Established, FinWait1, FinWait2, LastAck, SynRecv, SynSent, TimeWait,
        };
        let (l, p): (SocketAddr, SocketAddr) = (
            "255.255.255.255:65535".parse().unwrap(),
            "192.168.100.200:443".parse().unwrap(),
        );
        for (from, to) in [
            (State::Close, SynSent),
            (SynSent, Established),
            (SynRecv, Established),
            (Established, CloseWait),
            (Established, FinWait1),
            (CloseWait, LastAck),
            (FinWait2, TimeWait),
        ] {
            r.transition(out, &transition(l, p, from, to)).unwrap();
        }
        let closes = [
            (Initiator::Local, How::Fin, Role::Client, true, None),
            (
                Initiator::Remote,
                How::RstReceived,
                Role::Server,
                false,
                None,
            ),
            (
                Initiator::Unknown,
                How::RstReceived,
                Role::Unknown,
                false,
                None,
            ),
            (Initiator::Local, How::RstSent, Role::Server, false, Some(2)),
            (Initiator::Local, How::Timeout, Role::Client, false, None),
            (Initiator::Simultaneous, How::Fin, Role::Client, true, None),
        ];
        for (initiator, how, role, timewait, reset_reason) in closes {
            let c = Close {
                ts_ns: 2,
                skaddr: 1,
                local: l,
                remote: p,
                initiator,
                how,
                timewait,
                role,
                lifetime_ns: Some(61_000_000_000),
                owner: busy_owner(),
                midlife: role == Role::Unknown,
                states: 0,
                netns: None,
                cgroup: None,
                details: Some(Details {
                    bytes_acked: 1 << 20,
                    bytes_received: 101,
                    total_retrans: 3,
                    srtt_us: 35,
                    min_rtt_us: NO_MIN_RTT,
                    ..Details::default()
                }),
                reset_reason,
            };
            r.close(out, &c).unwrap();
        }
        for (direction, state, reason) in [
            (Direction::Sent, None, Some(1)),
            (Direction::Received, Some(Established), None),
            (Direction::Sent, Some(Established), Some(2)),
        ] {
            let reset = Reset {
                ts_ns: 3,
                skaddr: None,
                local: l,
                remote: p,
                direction,
                state,
                reason,
                owner: busy_owner(),
                netns: None,
                cgroup: None,
            };
            r.reset(out, &reset).unwrap();
        }
        for (end, substate, rearms) in [
            (End::Expired, TimeWait, 0),
            (End::Expired, FinWait2, 0),
            (End::Killed, TimeWait, 2),
            (End::NotCreated, TimeWait, 0),
        ] {
            let x = Exit {
                ts_ns: 4,
                tw: 1,
                local: l,
                remote: p,
                end,
                residency_ns: 61_500_000_000,
                rearms,
                substate,
                owner: busy_owner(),
                netns: None,
                cgroup: None,
                made_by: crate::analysis::timewait::MadeBy::UNKNOWN,
            };
            r.timewait_exit(out, &x).unwrap();
        }
        r.lost(out, 5, u64::from(u32::MAX)).unwrap();
    }

    /// The lines written, with color codes left out.
    fn shown_lines(out: &[u8]) -> Vec<String> {
        let text = String::from_utf8(out.to_vec()).unwrap();
        text.lines()
            .map(|l| {
                let mut s = String::new();
                let mut in_code = false;
                for c in l.chars() {
                    match (in_code, c) {
                        (false, '\x1b') => in_code = true,
                        (false, c) => s.push(c),
                        (true, 'm') => in_code = false,
                        (true, _) => {}
                    }
                }
                s
            })
            .collect()
    }

    #[test]
    fn ipv4_text_lines_fit_in_the_line_width() {
        for color in [false, true] {
            let mut r = text_renderer(None, color);
            let mut out = Vec::new();
            r.header(&mut out).unwrap();
            every_line_kind(&mut r, &mut out);
            let lines = shown_lines(&out);
            // Header, 7 transitions, 6 closes and their details, 3 resets (one with its
            // reason on its own line), 4 timewait ends and how they ended, a loss.
            assert_eq!(lines.len(), 1 + 7 + 12 + 4 + 8 + 1, "{lines:#?}");
            for l in &lines {
                assert!(l.chars().count() <= LINE_WIDTH, "{} columns: {l}", l.len());
                assert_eq!(l.trim_end(), l, "no trailing blanks: {l:?}");
            }
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("sent 1.00MiB recv 101B rtt 35.0µs"))
            );
            assert!(lines.iter().any(|l| l.contains("reason abort_on_close")));
            assert!(lines.iter().any(|l| l.ends_with("RST sent (NO_SOCKET)")));
        }
    }

    #[test]
    fn the_first_ipv6_endpoint_widens_the_columns_once() {
        let v4: SocketAddr = "10.0.0.5:41000".parse().unwrap();
        let v4b: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let v6: SocketAddr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:1]:443".parse().unwrap();
        let mut r = text_renderer(None, false);
        let mut out = Vec::new();
        r.header(&mut out).unwrap();
        let (a, b) = (State::SynSent, State::Established);
        for (l, p) in [(v4, v4b), (v6, v6), (v4, v4b), (v6, v4b), (v4, v4b)] {
            r.transition(&mut out, &transition(l, p, a, b)).unwrap();
        }
        let lines = shown_lines(&out);
        let headers: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("TIME"))
            .collect();
        assert_eq!(headers, [0, 2], "{lines:#?}");
        let at = |l: &str, what: &str| l.find(what).map(|b| l[..b].chars().count());
        // Before: IPv4 columns; after, every line alike, IPv4 or not.
        assert_eq!(at(&lines[1], "SYN_SENT"), at(&lines[0], "TRANSITION"));
        let column = at(&lines[2], "TRANSITION");
        assert!(column > at(&lines[0], "TRANSITION"));
        for l in &lines[3..] {
            assert_eq!(at(l, "SYN_SENT"), column, "{lines:#?}");
            assert_eq!(l.chars().count(), lines[2].chars().count(), "{lines:#?}");
        }
    }

    #[test]
    fn an_ipv6_filter_starts_wide() {
        let mut r = text_renderer(Some(6), false);
        let mut out = Vec::new();
        r.header(&mut out).unwrap();
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let t = transition(v6, v6, State::SynSent, State::Established);
        r.transition(&mut out, &t).unwrap();
        let lines = shown_lines(&out);
        assert_eq!(lines.len(), 2, "no second header: {lines:#?}");
        assert_eq!(Style::addr_width_for(Some(4)), IPV4_ENDPOINT_WIDTH);
        assert_eq!(Style::addr_width_for(None), IPV4_ENDPOINT_WIDTH);
    }

    #[test]
    fn the_cgroup_column_names_containers_first() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let names = Cgroups::from_paths([
            (1, "/system.slice/nginx.service".to_string()),
            (2, format!("/system.slice/docker-{id}.scope")),
            (
                3,
                "/user.slice/user-1000.slice/user@1000.service/app.slice/a-long-name.scope"
                    .to_string(),
            ),
        ]);
        let ns = NsJson::new(names);
        assert_eq!(ns.text(None), "-");
        assert_eq!(ns.text(Some(1)), "/system.slice/nginx.service");
        assert_eq!(ns.text(Some(2)), "docker:0123456789ab");
        let long = ns.text(Some(3));
        assert_eq!(long.chars().count(), CGROUP_WIDTH);
        assert!(
            long.starts_with('…') && long.ends_with("a-long-name.scope"),
            "{long}"
        );
        assert_eq!(ns.text(Some(9)), "9", "unresolved: the id");
    }

    #[test]
    fn human_byte_counts() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1024), "1.00KiB");
        assert_eq!(human_bytes(12_595), "12.3KiB");
        assert_eq!(human_bytes(1 << 20), "1.00MiB");
        assert_eq!(human_bytes(150 << 20), "150MiB");
        assert_eq!(human_bytes(5 << 40), "5.00TiB");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(83_210), "83.2µs");
        assert_eq!(human_ns(1_500_000), "1.50ms");
        assert_eq!(human_ns(2_310_000_000), "2.31s");
        assert_eq!(human_ns(62_000_000_000), "1m02.0s");
        assert_eq!(human_ns(60_330_000_000), "1m00.3s");
    }

    #[test]
    fn rfc3339_keeps_nanoseconds() {
        assert_eq!(
            rfc3339(1_000_000_000_000_000_007),
            "2001-09-09T01:46:40.000000007Z"
        );
    }
}
