//! The command line: the subcommands and their flags (here), the text after their help
//! (`help`) and the parsers of their values (`parse`).
//!
//! At the top with `app`: it may use every layer below (the filter it builds, the
//! output's formats, the views' and the source's defaults).

mod help;
mod parse;

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use ipnet::IpNet;

use help::{
    DOCTOR_EXAMPLES, EXAMPLES, HIST_EXAMPLES, PORTS_EXAMPLES, REPORT_EXAMPLES, SERVE_EXAMPLES,
    STUCK_EXAMPLES, TIMEWAIT_EXAMPLES, TOP_EXAMPLES,
};
use parse::{parse_duration, parse_max_sockets, parse_port_range, parse_ring_size, parse_state};

use crate::{
    model::{event::State, filter::Filter},
    output::Format,
};

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
    /// Trace, but give no socket its socket-local storage (no durations, owners or
    /// connection records): `cargo xtask bench --kernel-cost-view report-without-storage`
    /// prices the storage and its use (feature `test-knobs`).
    #[cfg(feature = "test-knobs")]
    #[arg(long, hide = true, conflicts_with = "from")]
    pub bench_without_storage: bool,
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
