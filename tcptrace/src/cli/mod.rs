//! The command line.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use ipnet::IpNet;

use crate::{
    model::{event::State, filter::Filter},
    output::Format,
    source::probe::{MIN_RING_BYTES, ring_bytes_valid},
};

const EXAMPLES: &str = "\
Examples:
  sudo tcptrace                              every TCP state transition on the host
  sudo tcptrace --state TIME_WAIT            connections entering TIME_WAIT (who holds it?)
  sudo tcptrace --port 8080 --json           one port, as JSON lines
  sudo tcptrace --lport 443 --state CLOSE_WAIT   peers hung up, app has not closed yet
  sudo tcptrace -4 --raddr 10.0.0.0/8 --duration 30s
  sudo tcptrace --netns /run/netns/blue      one network namespace (or /proc/PID/ns/net)
  sudo tcptrace --cgroup /system.slice/nginx.service --show-ns   one service's sockets
  sudo tcptrace --cgroup 3f2a9c --json       one container (id prefix), with its cgroup
  sudo tcptrace --record trace.tcptrace      also save the raw events for later
  tcptrace --from trace.tcptrace --state SYN_SENT   replay a recording (no root needed)
  sudo tcptrace report --duration 1m         who closes first, per port
  sudo tcptrace top                          the same live, full screen, with TIME_WAIT held
  sudo tcptrace hist --port 443              how long each state lasts";

const REPORT_EXAMPLES: &str = "\
Examples:
  sudo tcptrace report                       until Ctrl-C, then one table
  sudo tcptrace report --duration 5m --interval 1m   a table every minute
  sudo tcptrace report --lport 8080 --json   the server side of :8080, as JSON
  sudo tcptrace report --netns /run/netns/blue   one network namespace
  tcptrace report --from trace.tcptrace      from a recording

Columns: connections CLOSED per service port (the listening port when this host accepted
them, DIR in; the remote port when it connected, DIR out); who closed first (LOCAL, REMOTE,
SIMULT, UNKNOWN); how (resets sent and received, REFUSED, TIMEOUT); TIME_WAIT entered on this
host; the processes that owned them. Only the side that closes first holds TIME_WAIT.";

const TOP_EXAMPLES: &str = "\
Examples:
  sudo tcptrace top                          every port, redrawn every second
  sudo tcptrace top --lport 8080 -i 2s       the server side of :8080, every 2 s
  sudo tcptrace top --netns /run/netns/blue  one network namespace

Columns (rows as in `tcptrace report`: per service port, DIR in when this host accepted the
connections, out when it made them): CLOSES/s over the last interval; CLOSED since the start;
LOCAL and REMOTE, the shares closed first by this host and by the peer; RESETS, connections
ended by a reset sent or received; TIME_WAIT held now on this host; TREND 1m, TIME_WAIT held
over the last minute, with an arrow for its way over the last 10 s. Below: the TIME_WAIT
sockets held, by age; then the most pressed destinations, as `tcptrace ports` counts them:
local ports held (IN_USE, of them TIME_WAIT) of those AVAIL, USAGE now and its PEAK,
CONN/s, FAILED connects for want of a port, EXHAUSTION at the current rise. The header has
the totals and the events lost.

Keys: c sort by closes/s, t by TIME_WAIT (the default), r by resets, p by port; / or f
filters by port (type it, Enter; empty shows every port; Esc cancels); q or Ctrl-C quits.

top needs a terminal; for a table every second in a pipe or a file use
`tcptrace report --interval 1s`.";

const TIMEWAIT_EXAMPLES: &str = "\
Examples:
  sudo tcptrace timewait                     every 2 s until Ctrl-C, then a summary
  sudo tcptrace timewait --lport 8080 -i 10s the server side of :8080
  sudo tcptrace timewait --json --duration 1m

At start-up the TIME_WAIT sockets already present in every network namespace are read from
sock_diag (as `ss` does) and counted as `seeded`, their ages estimated from their timers;
those created later are traced.";

const STUCK_EXAMPLES: &str = "\
Examples:
  sudo tcptrace stuck                        every 5 s: sockets stuck for 30 s or more
  sudo tcptrace stuck --state CLOSE_WAIT --older-than 5m --lport 8080
  sudo tcptrace stuck --json -i 1m

A socket's time in its state is known from the transition into it; one found at start
(sock_diag, in every namespace) was there before tracing began, and its age shows as a
lower bound (\"at least\").";

const DOCTOR_EXAMPLES: &str = "\
Examples:
  sudo tcptrace doctor                       30 s of traffic, then one verdict per setting
  sudo tcptrace doctor --duration 5m --json  for a longer look, as data
  tcptrace doctor --from trace.tcptrace      judge a recording (settings read from this host)

Each finding: the setting and its value in the namespace, a verdict (problem, warning, ok,
info), the measurement behind it in one line, and what to do. Where the evidence says so,
the advice is to change who closes first (keep-alive, pooling, letting clients close)
rather than a sysctl. Exit status: 0 when nothing is a problem, 1 when something is.";

const PORTS_EXAMPLES: &str = "\
Examples:
  sudo tcptrace ports                        every second until Ctrl-C
  sudo tcptrace ports --rport 5432 -i 5s     connections to PostgreSQL servers
  sudo tcptrace ports --json --duration 1m

A local port is held from connect() until the socket is gone, its TIME_WAIT included (the
side that closes first keeps it 60 s). Without bind() before connect(), one port serves many
destinations at once: ports run out per destination (local address, remote address and
port), each choosing from the namespace's ip_local_port_range minus ip_local_reserved_ports.
FAILED counts connects that found no free port (EADDRNOTAVAIL); EXHAUSTION is the time left
at the current rise.";

const HIST_EXAMPLES: &str = "\
Examples:
  sudo tcptrace hist --duration 30s          every state, 30 seconds
  sudo tcptrace hist --state SYN_SENT        connect latency only
  sudo tcptrace hist --state CLOSE_WAIT --by port   where applications are slow to close
  sudo tcptrace hist --metric rtt            round-trip times per service port
  sudo tcptrace hist --metric bytes --port 443   how much each connection moved
  tcptrace hist --from trace.tcptrace --json";

/// Traces TCP state transitions with eBPF: who closes each connection first, which side
/// holds TIME_WAIT, and how long every state lasts.
#[derive(Debug, Parser)]
#[command(
    name = "tcptrace",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Stop after this many records are shown.
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

/// Views other than the live stream.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Who closes first, per service port and direction, and who holds the TIME_WAIT.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// A live full-screen view: closes per second, who closes first, resets and the TIME_WAIT
    /// held per service port and direction, with its trend and ages.
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopArgs),
    /// Histograms of the time spent in each state (connect latency, CLOSE_WAIT, …).
    #[command(after_help = HIST_EXAMPLES)]
    Hist(HistArgs),
    /// Can this host run tcptrace? One line per requirement, with a hint; exits non-zero if
    /// the live stream cannot run.
    #[command(
        after_help = "Examples:\n  sudo tcptrace check\n  tcptrace check --no-load   (without loading anything)"
    )]
    Check {
        /// Do not load and attach the eBPF programs for a moment at the end.
        #[arg(long)]
        no_load: bool,
    },
    /// Prints shell completions (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  tcptrace completions bash > /etc/bash_completion.d/tcptrace\n  tcptrace completions zsh > ~/.zfunc/_tcptrace"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Writes man pages (tcptrace.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    ManPages {
        /// Where to write them.
        dir: PathBuf,
    },
    /// The TIME_WAIT population, live: by port, remote endpoint and process, ages, what
    /// expires soon, creation and expiry rates.
    #[command(after_help = TIMEWAIT_EXAMPLES)]
    Timewait(TimewaitArgs),
    /// Running out of local ports: per destination, the ports held (open connections and
    /// TIME_WAIT) out of those the port range allows, connect rate, connects that failed for
    /// want of a port, and the time left at the current rise.
    #[command(after_help = PORTS_EXAMPLES)]
    Ports(PortsArgs),
    /// Judges the TCP settings people tune blind (tcp_tw_reuse, tcp_fin_timeout,
    /// ip_local_port_range, tcp_max_tw_buckets, the listen queues, …) from what this host
    /// does, for --duration (30 s by default); exits 1 when one is a problem.
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorArgs),
    /// Sockets stuck in a state they should pass through (CLOSE_WAIT: an application that
    /// never closes; FIN_WAIT1/2, LAST_ACK, CLOSING, SYN_SENT, SYN_RECV), older than
    /// --older-than, with their owner, grouped by process, state and port.
    #[command(after_help = STUCK_EXAMPLES)]
    Stuck(StuckArgs),
    /// A Prometheus exporter: transitions, closes by port, role and initiator, the TIME_WAIT
    /// population and its residency, state durations, on /metrics.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
}

const SERVE_EXAMPLES: &str = "\
Examples:
  sudo tcptrace serve                        http://127.0.0.1:9977/metrics
  sudo tcptrace serve --listen 0.0.0.0:9977 --web-config web.yml
                                             for a Prometheus on another host, over TLS
  sudo tcptrace serve --label-port 443,5432,6379   also label these outgoing service ports
  sudo tcptrace serve --label-netns          one series per network namespace
  tcptrace serve --from trace.tcptrace       serve a recording's counts (no root)

Ports: a service port gets a `port` label of its own when this host listens on it (it
accepted connections there) or --label-port names it, up to --max-port-labels; every other
port is counted under port=\"other\". Without --label-netns there is no netns label.";

/// `tcptrace serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to serve /metrics (port 9977 is tcptrace's; 0 picks a free one).
    #[arg(
        short,
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:9977"
    )]
    pub listen: std::net::SocketAddr,
    /// Serve over TLS and/or with basic authentication, as this file says (the Prometheus
    /// exporter toolkit's web config: tls_server_config, basic_auth_users).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<std::path::PathBuf>,
    /// Service ports to label even without a listener here (outgoing connections' remote
    /// ports), e.g. 443,5432,8000-8099.
    #[arg(long, value_name = "PORT[-PORT]", value_delimiter = ',', value_parser = parse_port_range)]
    pub label_port: Vec<std::ops::RangeInclusive<u16>>,
    /// At most N ports get their own label; the rest are `other`.
    #[arg(long, value_name = "N", default_value_t = crate::views::serve::metrics::DEFAULT_MAX_PORT_LABELS, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub max_port_labels: usize,
    /// Label series by network namespace (inode), at most --max-netns-labels of them.
    #[arg(long)]
    pub label_netns: bool,
    /// At most N namespaces get their own label; the rest are `other`.
    #[arg(long, value_name = "N", default_value_t = crate::views::serve::metrics::DEFAULT_MAX_NETNS_LABELS, value_parser = clap::value_parser!(u16).range(1..).map(usize::from), requires = "label_netns")]
    pub max_netns_labels: usize,
    /// How often the settings are judged from the traffic of the last interval
    /// (tcptrace_doctor_verdict, as `tcptrace doctor` judges them).
    #[arg(long, value_name = "INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub doctor_interval: Duration,
    /// Count as stuck (tcptrace_stuck_sockets) the sockets that have sat at least this long
    /// in CLOSE_WAIT, FIN_WAIT1/2, LAST_ACK, CLOSING, SYN_SENT or SYN_RECV.
    #[arg(long, value_name = "AGE", default_value = "30s", value_parser = parse_duration)]
    pub stuck_older_than: Duration,
    /// How often the host's sockets are scanned for stuck ones (sock_diag in every network
    /// namespace, states filtered by the kernel).
    #[arg(long, value_name = "INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub stuck_interval: Duration,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `tcptrace timewait`.
#[derive(Debug, Args)]
pub struct TimewaitArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How often to print the population.
    #[arg(short, long, value_name = "INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// `tcptrace ports`.
#[derive(Debug, Args)]
pub struct PortsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How often to print the table.
    #[arg(short, long, value_name = "INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// `tcptrace stuck`.
#[derive(Debug, Args)]
pub struct StuckArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Show sockets that have sat in their state at least this long.
    #[arg(long, value_name = "AGE", default_value = "30s", value_parser = parse_duration)]
    pub older_than: Duration,
    /// How often to print them.
    #[arg(short, long, value_name = "INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// `tcptrace doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `tcptrace report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print a report every INTERVAL (e.g. 10s) instead of once at the end.
    #[arg(short, long, value_name = "INTERVAL", value_parser = parse_duration)]
    pub interval: Option<Duration>,
}

/// `tcptrace top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often to redraw (rates are per second over this interval).
    #[arg(short, long, value_name = "INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `tcptrace hist`.
#[derive(Debug, Args)]
pub struct HistArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// One histogram per state, or per state and service port (the per-connection metrics
    /// are always per service port).
    #[arg(long, value_enum, default_value_t = crate::views::hist::By::State)]
    pub by: crate::views::hist::By,
    /// What to measure: the time spent in each state, or each connection's smoothed
    /// round-trip time, bytes sent and received, or lifetime, read at its end.
    #[arg(long, value_enum, default_value_t = crate::views::hist::Metric::State)]
    pub metric: crate::views::hist::Metric,
}

/// What every view takes: which events, from where, printed how.
#[derive(Debug, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Which transitions to keep. Family, ports and states are filtered in the kernel.
#[derive(Debug, Args)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Transitions from or to these states (e.g. TIME_WAIT,CLOSE_WAIT); TIME_WAIT matches
    /// the FIN_WAIT2/CLOSING→CLOSE transitions that enter it.
    #[arg(short, long, value_name = "STATE", value_delimiter = ',', value_parser = parse_state)]
    pub state: Vec<State>,
    /// Local or remote port.
    #[arg(short, long, value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,
    /// Local port.
    #[arg(long, value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub lport: Vec<u16>,
    /// Remote port.
    #[arg(long, value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub rport: Vec<u16>,
    /// Owning process id (transitions whose owner is unknown never match).
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Owning process name (as in /proc/PID/comm, at most 15 characters).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub comm: Vec<String>,
    /// IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Local address or network (CIDR).
    #[arg(long, value_name = "ADDR[/LEN]", value_delimiter = ',', value_parser = crate::model::filter::parse_net)]
    pub laddr: Vec<IpNet>,
    /// Remote address or network (CIDR).
    #[arg(long, value_name = "ADDR[/LEN]", value_delimiter = ',', value_parser = crate::model::filter::parse_net)]
    pub raddr: Vec<IpNet>,
    /// Also trace MPTCP connection-level (meta) sockets; their TCP subflows are always traced.
    #[arg(long)]
    pub mptcp: bool,
    /// Sockets in this network namespace: an inode number, a namespace file
    /// (/run/netns/NAME, /proc/PID/ns/net) or a NAME from `ip netns`. Up to eight are
    /// filtered in the kernel.
    #[arg(long, value_name = "NETNS", value_delimiter = ',', value_parser = crate::model::netns::parse_netns)]
    pub netns: Vec<u32>,
    /// Sockets in this cgroup or below it: a path under the cgroup2 mount
    /// (/system.slice/nginx.service; the mount point may be included), or a container id,
    /// pod uid or container name, or a prefix of one (3f2a9c). A socket belongs to the
    /// cgroup of the process that created it (accepted sockets: of the listener's).
    #[arg(long, value_name = "PATH|ID", value_delimiter = ',', value_parser = crate::model::filter::parse_cgroup)]
    pub cgroup: Vec<crate::model::cgroup::CgroupFilter>,
}

/// Where events come from and when to stop.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Source")]
pub struct SourceArgs {
    /// Replay a recording instead of tracing live (no root needed).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["record", "duration"])]
    pub from: Option<PathBuf>,
    /// Also write the raw events to FILE while tracing.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(short, long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Kernel ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = crate::source::probe::DEFAULT_RING_BYTES, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Follow at most N sockets (connections and TIME_WAIT sockets) at once, about 21 bytes
    /// each; beyond that the oldest are evicted, counted and reported. On kernels without
    /// BTF it also sizes the kernel's map of sockets (each socket's facts otherwise live in
    /// the socket itself).
    #[arg(long, value_name = "N", default_value_t = crate::shared::DEFAULT_MAX_SOCKETS, value_parser = parse_max_sockets)]
    pub max_sockets: usize,
    /// Attach every probe, but each program returns at once: nothing is traced. For
    /// `cargo xtask bench`, which measures what attaching alone costs a storm (feature
    /// `test-knobs`: a release has no such flag).
    #[cfg(feature = "test-knobs")]
    #[arg(long, hide = true, conflicts_with = "from")]
    pub idle_probes: bool,
}

/// How to print.
#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Shorthand for --output json.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// Text: add each socket's network namespace (inode) and cgroup (container id, else
    /// path) as NETNS and CGROUP columns. JSON always has them.
    #[arg(long)]
    pub show_ns: bool,
}

impl OutputArgs {
    /// The format asked for.
    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { self.output }
    }
}

impl FilterArgs {
    /// The filter these flags describe.
    pub fn filter(&self) -> Filter {
        Filter {
            states: self.state.clone(),
            ports: self.port.clone(),
            lports: self.lport.clone(),
            rports: self.rport.clone(),
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            family: if self.ipv4 {
                Some(4)
            } else if self.ipv6 {
                Some(6)
            } else {
                None
            },
            laddrs: self.laddr.clone(),
            raddrs: self.raddr.clone(),
            mptcp: self.mptcp,
            netns: self.netns.clone(),
            cgroups: self.cgroup.clone(),
        }
    }
}

fn parse_state(s: &str) -> Result<State, String> {
    crate::model::event::parse_state(s).map_err(|e| {
        let names: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
        format!("{e}; states are {}", names.join(", "))
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30s, 5m or 1h30m ({e})"))?;
    if d.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(d)
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("'{p}' is not a port (1-65535)"))
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(s)?, port(s)?),
    };
    if a > b {
        return Err(format!(
            "'{s}' is an empty range: write the lower port first"
        ));
    }
    Ok(a..=b)
}

fn parse_max_sockets(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of sockets"))?;
    if !(1_000..=100_000_000).contains(&n) {
        return Err(format!(
            "{n} is out of range: from 1000 to 100000000 sockets"
        ));
    }
    Ok(n)
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of bytes"))?;
    if !ring_bytes_valid(n) {
        return Err(format!(
            "{n} is not a power of two of at least {MIN_RING_BYTES} (e.g. 4096, 65536, 4194304)"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_name_the_offender() {
        let err = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("tcptrace").chain(args.iter().copied()))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["--state", "TIME_WIAT"]).contains("did you mean TIME_WAIT?"));
        assert!(err(&["--port", "70000"]).contains("70000"));
        assert!(err(&["--raddr", "10.0.0.0/40"]).contains("10.0.0.0/40"));
        assert!(err(&["--duration", "soon"]).contains("'soon'"));
        assert!(err(&["-4", "-6"]).contains("cannot be used with"));
        assert!(err(&["--ring-buffer-size", "5000"]).contains("power of two"));
        assert!(err(&["--max-sockets", "10"]).contains("10 is out of range"));
        assert!(err(&["--max-sockets", "lots"]).contains("'lots'"));
        let ok = Cli::try_parse_from([
            "tcptrace",
            "--state",
            "time-wait,CLOSE_WAIT",
            "-p",
            "80,443",
        ])
        .unwrap();
        assert_eq!(
            ok.common.filter.state,
            vec![State::TimeWait, State::CloseWait]
        );
        assert_eq!(ok.common.filter.port, vec![80, 443]);
        let r =
            Cli::try_parse_from(["tcptrace", "report", "--lport", "8080", "-i", "10s"]).unwrap();
        assert!(matches!(
            r.command,
            Some(Command::Report(ReportArgs {
                interval: Some(_),
                ..
            }))
        ));
        assert!(err(&["--port", "80", "report"]).contains("report"));
        assert!(err(&["serve", "--listen", "9977"]).contains("'9977'"));
        assert!(err(&["serve", "--label-port", "90-80"]).contains("empty range"));
        assert!(err(&["serve", "--label-port", "http"]).contains("'http'"));
        assert!(err(&["serve", "--max-netns-labels", "5"]).contains("--label-netns"));
        let s =
            Cli::try_parse_from(["tcptrace", "serve", "--label-port", "443,8000-8099"]).unwrap();
        let Some(Command::Serve(s)) = s.command else {
            panic!("not serve")
        };
        assert_eq!(s.label_port, vec![443..=443, 8000..=8099]);
        assert_eq!(s.listen.port(), crate::views::serve::metrics::DEFAULT_PORT);
        assert!(err(&["--netns", "/nonexistent/ns"]).contains("cannot open /nonexistent/ns"));
        assert!(err(&["--netns", "0"]).contains("'0'"));
        assert!(err(&["--cgroup", "a b"]).contains("'a b'"));
        assert!(err(&["--cgroup", "/x/../y"]).contains("'..'"));
        let ns = Cli::try_parse_from([
            "tcptrace",
            "--netns",
            "4026531840,/proc/self/ns/net",
            "--cgroup",
            "/system.slice,3f2a9c",
        ])
        .unwrap();
        let f = ns.common.filter.filter();
        assert_eq!(f.netns.len(), 2);
        assert_eq!(f.netns[0], 4026531840);
        assert_eq!(
            f.cgroups,
            vec![
                crate::model::cgroup::CgroupFilter::Path("/system.slice".into()),
                crate::model::cgroup::CgroupFilter::Container("3f2a9c".into())
            ]
        );
    }
}
