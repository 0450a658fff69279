//! The stream as text, for people: a row per event in aligned columns (TIME, PID,
//! COMM, the endpoints, the transition and the time spent in the state it left), what
//! does not fit on a continuation line, colors on a terminal.

use std::{fmt::Write as _, net::SocketAddr};

use super::{IPV6_ENDPOINT_WIDTH, LINE_WIDTH, NsJson, Renderer, human_bytes, human_ns, wall_ns};
use crate::{
    model::event::{Details, Owner, State, Transition},
    shared::NS_PER_SEC,
};

/// Width of the text NETNS column (namespace inodes are ten digits).
const NETNS_WIDTH: usize = 10;
/// Width of the text CGROUP column: a short container id, or the end of a path.
pub(super) const CGROUP_WIDTH: usize = 28;
/// Width of the text TIME column, `HH:MM:SS.uuuuuu`.
const TIME_WIDTH: usize = 15;
/// Width of the text PID column (pid_max is at most 4194304: seven digits).
const PID_WIDTH: usize = 7;
/// Width of the text COMM column (a task's name is at most 15 bytes).
const COMM_WIDTH: usize = 15;
/// Width of the text TRANSITION column (`NEW_SYN_RECV → ESTABLISHED`).
const WHAT_WIDTH: usize = 26;
/// Width of the text IN-FROM column ([`human_ns`] under 100 minutes, `999.99ms`).
const LAST_WIDTH: usize = 8;
/// Indent of a continuation line: under the first column after TIME, PID and COMM.
const TAIL_INDENT: usize = TIME_WIDTH + PID_WIDTH + COMM_WIDTH + 3;

fn owner_columns(owner: Option<&Owner>) -> (String, String) {
    match owner {
        Some(o) => (o.pid.to_string(), o.comm.as_str().into_owned()),
        None => ("-".into(), "?".into()),
    }
}

fn color_of(to: State) -> &'static str {
    match to {
        State::TimeWait => "\x1b[33m",
        State::Close => "\x1b[2m",
        State::Established => "\x1b[32m",
        State::CloseWait => "\x1b[35m",
        _ => "",
    }
}

/// The columns `s` takes on a terminal: its characters, less its ANSI color codes.
pub(super) fn columns(s: &str) -> usize {
    let mut n = 0;
    let mut in_code = false;
    for c in s.chars() {
        match (in_code, c) {
            (false, '\x1b') => in_code = true,
            (false, _) => n += 1,
            (true, 'm') => in_code = false,
            (true, _) => {}
        }
    }
    n
}

/// `1.2.3.4:80` or `[::1]:80`.
pub(super) fn endpoint(a: SocketAddr) -> String {
    a.to_string()
}

/// A close's counters in its text line: `  sent 1.00MiB recv 12B rtt 41.0µs retrans 3`.
pub(super) fn details_text(d: &Details) -> String {
    let mut t = format!(
        "  sent {} recv {}",
        human_bytes(d.bytes_acked),
        human_bytes(d.bytes_received)
    );
    if let Some(srtt) = d.srtt_us() {
        t.push_str(&format!(" rtt {}", human_ns(u64::from(srtt) * 1_000)));
    }
    if d.total_retrans != 0 {
        t.push_str(&format!(" retrans {}", d.total_retrans));
    }
    t
}

impl Renderer {
    /// The text header for the current address width, without its newline.
    pub(super) fn header_line(&self) -> String {
        let w = self.style.addr_width;
        let ns = if self.show_ns {
            format!("{:<NETNS_WIDTH$} {:<CGROUP_WIDTH$} ", "NETNS", "CGROUP")
        } else {
            String::new()
        };
        format!(
            "{:<TIME_WIDTH$} {:>PID_WIDTH$} {:<COMM_WIDTH$} {ns}{:<w$} {:<w$} {:<WHAT_WIDTH$} \
             {:>LAST_WIDTH$}",
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "TRANSITION", "IN-FROM"
        )
    }

    /// Widens the address columns for good at the first IPv6 endpoint, starting the row
    /// with a header in the new widths.
    fn widen_for(&mut self, local: SocketAddr, remote: SocketAddr) {
        let v6 = local.is_ipv6() || remote.is_ipv6();
        if v6 && self.style.addr_width < IPV6_ENDPOINT_WIDTH {
            self.style.addr_width = IPV6_ENDPOINT_WIDTH;
            let header = self.header_line();
            self.line.push_str(&header);
            self.line.push('\n');
        }
    }

    /// The columns of a full row, as wide as the header.
    fn row_width(&self) -> usize {
        let ns = if self.show_ns {
            NETNS_WIDTH + CGROUP_WIDTH + 2
        } else {
            0
        };
        TAIL_INDENT + ns + 2 * (self.style.addr_width + 1) + WHAT_WIDTH + 1 + LAST_WIDTH
    }

    /// Ends the row in `line`: trailing blanks dropped, then `tail` (with its leading
    /// separator) on the same line when it still fits in [`LINE_WIDTH`] (or in the
    /// header, when the columns are wider), else on a continuation line under LOCAL.
    pub(super) fn end_row(&mut self, tail: &str) {
        self.line.truncate(self.line.trim_end().len());
        if tail.is_empty() {
            return;
        }
        let row = self.line.rsplit('\n').next().unwrap_or_default();
        if columns(row) + columns(tail) <= LINE_WIDTH.max(self.row_width()) {
            self.line.push_str(tail);
        } else {
            let _ = write!(self.line, "\n{:TAIL_INDENT$}{}", "", tail.trim_start());
        }
    }

    /// One text row in the stream's columns; `ns` is the socket's (netns, cgroup).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn text_row(
        &mut self,
        ts_ns: u64,
        owner: Option<&Owner>,
        ns: (Option<u32>, Option<u64>),
        local: SocketAddr,
        remote: SocketAddr,
        on: &str,
        what: &str,
        off: &str,
        last: &str,
    ) {
        self.widen_for(local, remote);
        let w = self.style.addr_width;
        let clock = self.clock(ts_ns);
        let (pid, comm) = owner_columns(owner);
        let _ = write!(
            self.line,
            "{clock:<TIME_WIDTH$} {pid:>PID_WIDTH$} {comm:<COMM_WIDTH$} "
        );
        if self.show_ns {
            let netns = ns.0.map_or_else(|| "-".to_string(), |n| n.to_string());
            let cgroup = self.ns.text(ns.1);
            let _ = write!(self.line, "{netns:<NETNS_WIDTH$} {cgroup:<CGROUP_WIDTH$} ");
        }
        // A long `what` takes from IN-FROM's padding before it pushes the line wider.
        let pad = (WHAT_WIDTH + 1 + LAST_WIDTH)
            .saturating_sub(columns(what) + columns(last))
            .max(1);
        let _ = write!(
            self.line,
            "{:<w$} {:<w$} {on}{what}{off}{:pad$}{last}",
            endpoint(local),
            endpoint(remote),
            "",
        );
    }

    pub(super) fn text_transition(&mut self, t: &Transition) {
        let arrow = format!("{} → {}", t.from, t.to);
        let (on, off) = self.paint(color_of(t.to));
        let dur = t.in_from_ns.map(human_ns).unwrap_or_else(|| "-".into());
        self.text_row(
            t.ts_ns,
            t.owner.as_ref(),
            (t.netns, t.cgroup),
            t.local,
            t.remote,
            on,
            &arrow,
            off,
            &dur,
        );
        self.end_row("");
    }

    pub(super) fn paint(&self, code: &'static str) -> (&'static str, &'static str) {
        if self.style.color && !code.is_empty() {
            (code, "\x1b[0m")
        } else {
            ("", "")
        }
    }

    /// Local wall-clock time of day with microseconds.
    pub(super) fn clock(&self, ts_ns: u64) -> String {
        let ns = wall_ns(ts_ns, self.style.wall_offset_ns)
            + i128::from(self.style.utc_offset_secs) * i128::from(NS_PER_SEC);
        let secs = ns.div_euclid(i128::from(NS_PER_SEC));
        let micros = ns.rem_euclid(i128::from(NS_PER_SEC)) / 1000;
        let day = secs.rem_euclid(86_400);
        format!(
            "{:02}:{:02}:{:02}.{micros:06}",
            day / 3600,
            day / 60 % 60,
            day % 60
        )
    }
}

impl NsJson {
    /// The text CGROUP column: a container's short id (with its pod, for Kubernetes), else
    /// the path's end, else the id; `-` when unknown.
    pub(super) fn text(&self, cgroup: Option<u64>) -> String {
        let Some(id) = cgroup else {
            return "-".into();
        };
        let Some(name) = self.names.resolve(id) else {
            return id.to_string();
        };
        if let Some(c) = &name.container {
            return format!("{}:{}", c.runtime.name(), c.short_id());
        }
        let p = &name.path;
        if p.chars().count() <= CGROUP_WIDTH {
            return p.clone();
        }
        let tail: String = p
            .chars()
            .rev()
            .take(CGROUP_WIDTH - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}
