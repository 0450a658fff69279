//! Wires a source (the live probe or a recording) to a view.

use std::{
    fs::File,
    io::{self, IsTerminal as _, Write as _},
    os::fd::{AsRawFd, RawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tcptrace_common::records;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    analysis::{reason, timewait},
    cli::{
        Cli, Command, DoctorArgs, HistArgs, PortsArgs, ReportArgs, ServeArgs, SourceArgs,
        StuckArgs, TimewaitArgs, TopArgs,
    },
    model::{
        cgroup::Cgroups,
        event::RawEvent,
        filter::{CompiledFilter, Filter},
    },
    output::{Renderer, Style, local_utc_offset_secs},
    source::{
        check, diag,
        host::{self, wall_offset_ns},
        probe::{self, Probe, ProbeConfig},
        record::{self, Reader, Writer, header_flag},
    },
    views::{
        Flow, View, doctor,
        hist::{self, Hist},
        ports,
        report::Report,
        serve::{
            http,
            metrics::{LabelConfig, Metrics, PortPolicy, ProcessCollector},
            webconfig,
        },
        stream::Stream,
        stuck,
        timewait::Population,
        top,
    },
};

/// How often the reader drains the ring buffer when the kernel has not woken it.
const TICK: Duration = Duration::from_millis(20);

/// Buffered stdout, where every view but `top` prints.
type Out = io::BufWriter<io::StdoutLock<'static>>;

/// Runs the command line. Errors carry context for the user; a closed stdout (`| head`)
/// ends the run quietly.
pub fn run(cli: Cli) -> Result<()> {
    let stdout = io::stdout();
    let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let out = io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let result = match &cli.command {
        Some(Command::Completions { shell }) => completions(*shell, out),
        Some(Command::ManPages { dir }) => man_pages(dir),
        Some(Command::Check { no_load }) => check(!no_load, out),
        None => stream(&cli, color, out),
        Some(Command::Report(a)) => report(a, out),
        Some(Command::Timewait(a)) => timewait(a, out),
        Some(Command::Ports(a)) => ports(a, out),
        Some(Command::Doctor(a)) => doctor(a, out),
        Some(Command::Stuck(a)) => stuck(a, out),
        Some(Command::Hist(a)) => hist(a, out),
        Some(Command::Serve(a)) => serve(a),
        Some(Command::Top(a)) => {
            // The screen is drawn on the terminal itself, not through the buffered stdout.
            drop(out);
            top(a)
        }
    };
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// `tcptrace completions`: the shell's completion script.
fn completions(shell: clap_complete::Shell, mut out: Out) -> Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "tcptrace", &mut out);
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// `tcptrace man-pages`: tcptrace.1 and one page per subcommand, written into `dir`.
fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(())
}

/// `tcptrace check`: one line per requirement; an error when the live stream cannot run.
fn check(load: bool, mut out: Out) -> Result<()> {
    let items = check::run(load);
    let text = check::render(&items);
    std::io::Write::write_all(&mut out, text.as_bytes())?;
    std::io::Write::flush(&mut out)?;
    if !check::core_ok(&items) {
        anyhow::bail!("this host cannot run the live stream (see the ✗ lines)");
    }
    Ok(())
}

/// `tcptrace` without a subcommand: every transition, as it happens.
fn stream(cli: &Cli, color: bool, out: Out) -> Result<()> {
    let filter = cli.common.filter.filter();
    let format = cli.common.output.format();
    let wants = (Reads::Transitions, Counters::Read);
    drive(&filter, &cli.common.source, wants, |facts| {
        let style = Style {
            wall_offset_ns: facts.wall_offset_ns,
            utc_offset_secs: local_utc_offset_secs(),
            color,
            addr_width: Style::addr_width_for(filter.family),
        };
        let renderer = Renderer::new(format, style)
            .with_cgroups(facts.cgroups)
            // A recording replays on the host that made it: its kernel's numbering.
            .reset_names(reason::ResetNames::from_sys())
            .show_ns(cli.common.output.show_ns);
        Ok(Box::new(
            Stream::new(facts.filter, renderer, out, cli.count)
                .max_sockets(cli.common.source.max_sockets)
                .timers(facts.timers)
                .known_at_start(facts.at_start),
        ))
    })
}

/// `tcptrace report`: who closes first, per service port and direction.
fn report(a: &ReportArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    // The report follows whole connections: the kernel sends every transition and
    // the states select connections instead.
    let whole = filter.without_states();
    let mask = filter.compile().state_mask();
    let format = a.common.output.format();
    let interval = a.interval.map(|d| d.as_nanos() as u64);
    // It shows no time per state: the kernel leaves the middle transitions that packets
    // drive out (not a passive close's, whose close() tells a row's process).
    let wants = (Reads::ConnectionsWithoutTimes, Counters::Read);
    drive(&whole, &a.common.source, wants, |facts| {
        Ok(Box::new(
            Report::new(
                facts.filter,
                mask,
                out,
                format,
                facts.wall_offset_ns,
                interval,
            )
            .reset_names(reason::ResetNames::from_sys())
            .records(facts.records)
            .max_sockets(a.common.source.max_sockets)
            .timers(facts.timers)
            .known_at_start(facts.at_start),
        ))
    })
}

/// `tcptrace timewait`: the TIME_WAIT population, with those there at start when live.
fn timewait(a: &TimewaitArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    let format = a.common.output.format();
    let interval = a.interval.as_nanos() as u64;
    let live = a.common.source.from.is_none();
    // It shows no time per state, nor the owner of a passive close (which never enters
    // TIME_WAIT): the kernel leaves the middle transitions out.
    let wants = (Reads::ConnectionsWithoutTimesNorOwners, Counters::Skip);
    drive(&filter, &a.common.source, wants, |facts| {
        if !facts.timers {
            log::warn!("timewait timers are not traced: the population only grows");
        }
        let (wall, timers) = (facts.wall_offset_ns, facts.timers);
        let view = Population::new(facts.filter, out, format, wall, interval, timers)
            .records(facts.records)
            .max_sockets(a.common.source.max_sockets);
        // Live, count the TIME_WAIT sockets that exist already, in every namespace.
        Ok(Box::new(if live {
            let found = backfill_timewaits(a.common.source.max_sockets);
            view.seed(&found, host::monotonic_ns())
        } else {
            view
        }))
    })
}

/// `tcptrace ports`: local ports held per destination, with those held at start when live.
fn ports(a: &PortsArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    let format = a.common.output.format();
    let interval = a.interval.as_nanos() as u64;
    let live = a.common.source.from.is_none();
    let wants = (Reads::Transitions, Counters::Skip);
    drive(&filter, &a.common.source, wants, |facts| {
        if !facts.timers {
            log::warn!("timewait timers are not traced: TIME_WAIT sockets are not counted");
        }
        let ranges = Box::new(ports::HostRanges::default());
        let view = ports::Ports::new(
            facts.filter,
            ranges,
            out,
            format,
            facts.wall_offset_ns,
            interval,
        )
        .max_sockets(a.common.source.max_sockets)
        .timers(facts.timers);
        Ok(Box::new(if live {
            let tws = backfill_timewaits(a.common.source.max_sockets);
            view.seed(&facts.at_start, &tws, host::monotonic_ns())
        } else {
            view
        }))
    })
}

/// `tcptrace doctor`: a verdict per setting after 30 s (or --duration); an error when one
/// is a problem.
fn doctor(a: &DoctorArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    let format = a.common.output.format();
    let mut source = a.common.source.clone();
    source.duration = source.duration.or(Some(Duration::from_secs(30)));
    let live = source.from.is_none();
    let problems = std::rc::Rc::new(std::cell::Cell::new(0));
    let counted = problems.clone();
    let wants = (Reads::Transitions, Counters::Skip);
    drive(&filter, &source, wants, |facts| {
        let namespaces: Vec<Option<u32>> = diag::network_namespaces()
            .iter()
            .map(|n| Some(n.inode))
            .collect();
        let view = doctor::Doctor::new(
            facts.filter,
            Box::new(doctor::Host),
            Box::new(ports::HostRanges::default()),
            out,
            format,
        )
        .max_sockets(source.max_sockets)
        .timers(facts.timers)
        .counters_at_start(&namespaces)
        .count_problems_in(counted);
        Ok(Box::new(if live {
            let tws = backfill_timewaits(source.max_sockets);
            view.seed(&facts.at_start, &tws, host::monotonic_ns())
        } else {
            view
        }))
    })
    .and_then(|()| match problems.get() {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "doctor: {n} setting{} a problem here (see above)",
            if n == 1 { " is" } else { "s are" }
        )),
    })
}

/// `tcptrace stuck`: sockets sitting too long in a state they should pass through.
fn stuck(a: &StuckArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    let format = a.common.output.format();
    let wants = (Reads::Transitions, Counters::Skip);
    drive(&filter, &a.common.source, wants, |facts| {
        let view = stuck::Stuck::new(
            facts.filter,
            &filter.states,
            a.older_than.as_nanos() as u64,
            out,
            format,
            facts.wall_offset_ns,
            a.interval.as_nanos() as u64,
        );
        Ok(Box::new(view.seed(&facts.at_start, host::monotonic_ns())))
    })
}

/// `tcptrace hist`: histograms of state durations or of connections' counters.
fn hist(a: &HistArgs, out: Out) -> Result<()> {
    let filter = a.common.filter.filter();
    let format = a.common.output.format();
    // Only RTTs and bytes come from the connections' counters.
    let counters = match a.metric {
        hist::Metric::Rtt | hist::Metric::Bytes => Counters::Read,
        hist::Metric::State | hist::Metric::Lifetime => Counters::Skip,
    };
    drive(
        &filter,
        &a.common.source,
        (Reads::Connections, counters),
        |facts| {
            Ok(Box::new(
                Hist::new(facts.filter, &filter.states, a.by, out, format)
                    .metric(a.metric)
                    .records(facts.records)
                    .max_sockets(a.common.source.max_sockets)
                    .timers(facts.timers),
            ))
        },
    )
}

/// A command that cannot run as it was asked (bad input, like a bad flag: exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `tcptrace top`: a full-screen view, live only, on a terminal.
fn top(a: &TopArgs) -> Result<()> {
    if !io::stdout().is_terminal() {
        return Err(UsageError(
            "tcptrace top draws a full-screen view, but stdout is not a terminal: for a table \
             every second in a pipe or a file, use `tcptrace report --interval 1s`"
                .into(),
        )
        .into());
    }
    if a.source.from.is_some() {
        return Err(UsageError(
            "tcptrace top shows live traffic only: for a recording, use `tcptrace report \
             --from FILE`"
                .into(),
        )
        .into());
    }
    let filter = a.filter.filter();
    // As the report: whole connections from the kernel, the states select them; and, as
    // `ports`, each connect as it starts (it holds a local port from then).
    let whole = filter.without_states();
    let mask = filter.compile().state_mask();
    // It shows no time per state and no owner: the kernel leaves the middle transitions out.
    let wants = (Reads::ConnectsWithoutTimesNorOwners, Counters::Skip);
    drive(&whole, &a.source, wants, |facts| {
        if !facts.timers {
            log::warn!(
                "timewait timers are not traced: a close that entered TIME_WAIT counts as held \
                 for 60 s"
            );
        }
        let terminal =
            ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
                .context("reading the terminal's size")?;
        let clock = top::draw::Clock {
            wall_offset_ns: facts.wall_offset_ns,
            utc_offset_secs: local_utc_offset_secs(),
        };
        let view = top::Top::new(
            facts.filter,
            mask,
            terminal,
            Box::new(top::term::TerminalInput),
            a.interval.as_nanos() as u64,
            clock,
        )
        .on_terminal()
        .records(facts.records)
        .max_sockets(a.source.max_sockets)
        .timers(facts.timers);
        let timewaits = backfill_timewaits(a.source.max_sockets);
        let now = host::monotonic_ns();
        let view = view
            .seed(&timewaits, now)
            .seed_ports(&facts.at_start, &timewaits, now)
            .known_at_start(facts.at_start);
        Ok(Box::new(view))
    })
}

/// `tcptrace serve`: binds first (a taken port fails before anything is loaded), then traces
/// (or replays a recording and keeps serving its counts until Ctrl-C).
fn serve(a: &ServeArgs) -> Result<()> {
    if !a.filter.state.is_empty() {
        <Cli as clap::CommandFactory>::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "serve counts whole connections, so --state does not apply; select states in \
                 the queries instead (e.g. tcptrace_transitions_total{to=\"TIME_WAIT\"})",
            )
            .exit();
    }
    let web = web_config(a)?;
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let listener = http::bind(a.listen)?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let filter = a.filter.filter();
    let labels = LabelConfig {
        ports: PortPolicy {
            allow: a.label_port.clone(),
            max: a.max_port_labels,
        },
        netns: a.label_netns,
        max_netns: a.max_netns_labels,
    };
    let wants = (Reads::ConnectionsAndConnects, Counters::Read);
    drive(&filter, &a.source, wants, |facts| {
        // What holds ports already (live only).
        let ports_timewait = if a.source.from.is_none() {
            backfill_timewaits(a.source.max_sockets)
        } else {
            Vec::new()
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let mut view = Metrics::new(facts.filter, labels, &mut registry)
            .records(facts.records)
            .seed_ports(&facts.at_start, &ports_timewait, host::monotonic_ns())
            .doctor(
                Box::new(doctor::Host),
                a.doctor_interval.as_nanos() as u64,
                &diag::network_namespaces()
                    .iter()
                    .map(|n| Some(n.inode))
                    .collect::<Vec<_>>(),
            )
            .max_sockets(a.source.max_sockets)
            .timers(facts.timers)
            .known_at_start(facts.at_start);
        if a.source.from.is_none() {
            view = view.stuck(stuck_watch(
                facts.storage_map.clone(),
                a.stuck_older_than,
                a.stuck_interval,
                a.source.max_sockets,
            ));
            // The listeners that exist already (tcptrace's own namespace): labelled from the
            // first scrape, not from their first connection.
            match diag::listening_ports() {
                Ok(ports) => view = view.listeners(&ports),
                Err(e) => log::warn!("cannot read the listening sockets (sock_diag): {e}"),
            }
        }
        registry.register_collector(Box::new(ProcessCollector));
        http::spawn(listener, std::sync::Arc::new(registry), web)?;
        let _ = writeln!(io::stderr(), "Serving metrics on {scheme}://{addr}/metrics");
        Ok(Box::new(view))
    })?;
    if a.source.from.is_some() {
        let _ = writeln!(
            io::stderr(),
            "The recording is replayed; its counts are served until Ctrl-C."
        );
        until_signal()?;
    }
    Ok(())
}

/// The web config of `serve` (TLS, basic auth), read before anything is bound or loaded;
/// without one, a warning when the metrics are reachable from other hosts.
fn web_config(a: &ServeArgs) -> Result<webconfig::WebConfig> {
    let Some(path) = &a.web_config else {
        if !a.listen.ip().is_loopback() {
            log::warn!(
                "serving plain HTTP without authentication on {}: the metrics name this \
                 host's ports, processes and containers; use --web-config (TLS, basic auth) \
                 or a firewall that lets only Prometheus in",
                a.listen
            );
        }
        return Ok(webconfig::WebConfig::default());
    };
    let web = webconfig::WebConfig::load(path)?;
    if web.tls.is_none() && !web.users.is_empty() {
        log::warn!(
            "{}: basic_auth_users without tls_server_config: passwords cross the network in \
             clear text",
            path.display()
        );
    }
    Ok(web)
}

/// Stuck sockets from sock_diag in every namespace (at most `limit` per scan), with when
/// each entered its state from the kernel side's socket storage (`map`).
fn stuck_watch(
    map: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    older_than: std::time::Duration,
    every: std::time::Duration,
    limit: usize,
) -> stuck::Watch {
    use std::os::fd::AsFd as _;
    // Sockets the limit left out are said once at warning level, then at debug level.
    let mut said = false;
    let scan = Box::new(move || {
        let map = map.as_deref().map(|f| f.as_fd());
        let b = diag::sitting_everywhere(stuck::STUCK_STATE_BITS, map, limit);
        if b.unreachable > 0 {
            log::debug!(
                "stuck sockets: {} namespaces could not be read ({})",
                b.unreachable,
                b.first_error.as_deref().unwrap_or("?")
            );
        }
        if b.skipped > 0 {
            let level = if said {
                log::Level::Debug
            } else {
                log::Level::Warn
            };
            log::log!(
                level,
                "stuck sockets: {} beyond --max-sockets {limit} were skipped by a scan",
                b.skipped
            );
            said = true;
        }
        b.found
    });
    stuck::Watch::new(scan, older_than.as_nanos() as u64, every.as_nanos() as u64)
}

/// The single-threaded event loop a run waits in.
fn event_loop() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")
}

/// The streams of SIGINT and SIGTERM, which end a run (inside the event loop).
fn stop_signals() -> Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    let sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    Ok((sigint, sigterm))
}

/// Waits for SIGINT or SIGTERM.
fn until_signal() -> Result<()> {
    event_loop()?.block_on(async {
        let (mut sigint, mut sigterm) = stop_signals()?;
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        Ok(())
    })
}

/// What names cgroups for a run: this host's cgroup2 hierarchy when tracing live, or when
/// replaying a recording made on this very boot (cgroup ids mean nothing elsewhere); else
/// nothing, and cgroups are shown as ids.
fn cgroup_names(source: &SourceArgs, filter: &Filter) -> Cgroups {
    let Some(path) = &source.from else {
        return Cgroups::host();
    };
    // An unreadable recording is reported by the replay itself.
    let same_boot = File::open(path)
        .ok()
        .and_then(|f| Reader::new(f).ok())
        .is_some_and(|r| {
            let id = r.header().boot_id;
            id != [0; 16] && id == record::boot_id()
        });
    if same_boot {
        return Cgroups::host();
    }
    if !filter.cgroups.is_empty() {
        log::warn!(
            "{} was recorded on another host or boot: its cgroups cannot be named, and              --cgroup matches nothing",
            path.display()
        );
    }
    Cgroups::none()
}

/// What a view is told of its source.
#[derive(Debug)]
struct Facts {
    /// The filter the view was driven with, compiled, its cgroups matched by `cgroups`.
    filter: CompiledFilter,
    /// What names the source's cgroups (see [`cgroup_names`]).
    cgroups: Cgroups,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC of the traced host.
    wall_offset_ns: i64,
    /// Timewait sockets' timers are traced.
    timers: bool,
    /// Connection records come (the view reads connections from them).
    records: bool,
    /// The connections and listeners open when tracing began, each with the process holding
    /// its socket (live only).
    at_start: crate::model::atstart::OpenAtStart,
    /// The socket-storage map of the BTF programs, for sock_diag to read with each socket
    /// (live, BTF programs only).
    storage_map: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Whether a view reads each connection's counters at its end (bytes, RTTs, the socket's
/// error): a cost in the kernel at each end, only paid for views that show them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counters {
    Read,
    Skip,
}

/// What a view reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reads {
    /// Every transition and reset (the stream).
    Transitions,
    /// Whole connections, and the timewait sockets' timers (every aggregating view).
    Connections,
    /// The same, and each connect as it starts (views that count ports held).
    ConnectionsAndConnects,
    /// Whole connections, without the time spent in each state (views that show none:
    /// `report`): the kernel leaves the middle transitions that packets drive out (see
    /// [`records::NO_MIDDLE`]).
    ConnectionsWithoutTimes,
    /// The same, and no owner learnt at a passive close (`timewait`): the kernel leaves
    /// CLOSE_WAIT→LAST_ACK out too ([`records::NO_PASSIVE_CLOSE`]).
    ConnectionsWithoutTimesNorOwners,
    /// [`Reads::ConnectionsAndConnects`] without the time spent in each state nor owners
    /// (`top`).
    ConnectsWithoutTimesNorOwners,
}

/// Feeds a view from the source the flags name: a recording, or the live probe configured
/// with `filter`'s kernel part. `make_view` gets the [`Facts`] of the source.
fn drive<'a>(
    filter: &Filter,
    source: &SourceArgs,
    (reads, counters): (Reads, Counters),
    make_view: impl FnOnce(Facts) -> Result<Box<dyn View + 'a>>,
) -> Result<()> {
    let cgroups = cgroup_names(source, filter);
    if let Some(path) = &source.from {
        return drive_recording(path, filter, cgroups, make_view);
    }
    let records = kernel_records(reads, counters, source.record.is_some());
    let mut probe = start_probe(filter, source, records)?;
    let facts = live_facts(&mut probe, filter, cgroups, source.max_sockets);
    let recorder = match &source.record {
        Some(path) => Some(start_recording(path, &facts, &probe)?),
        None => None,
    };
    let mut view = make_view(facts)?;
    // Only a view that follows timewait sockets' ends can claim one refused: the others do
    // not pay for reading every namespace's counters at start.
    if let Some(pipe) = view.pipeline_mut()
        && pipe.timewaits_traced()
    {
        pipe.prove_overflows(overflow_proof());
    }
    live(probe, recorder, view.as_mut(), source.duration)
}

/// Replays the recording at `path` through the view `make_view` builds from its header.
fn drive_recording<'a>(
    path: &Path,
    filter: &Filter,
    cgroups: Cgroups,
    make_view: impl FnOnce(Facts) -> Result<Box<dyn View + 'a>>,
) -> Result<()> {
    let mut reader = open_recording(path)?;
    let h = *reader.header();
    let mut view = make_view(Facts {
        filter: filter.compile().with_cgroups(cgroups.clone()),
        cgroups,
        wall_offset_ns: h.wall_offset_ns,
        timers: h.flags & header_flag::TIMERS_TRACED != 0,
        records: h.flags & header_flag::CONNECTIONS != 0,
        at_start: crate::model::atstart::OpenAtStart::default(),
        storage_map: None,
    })?;
    replay(&mut reader, view.as_mut()).with_context(|| format!("replaying {}", path.display()))
}

/// The records the kernel side writes for a view that `reads` and `counters`, or for a
/// `recording`.
fn kernel_records(reads: Reads, counters: Counters, recording: bool) -> u32 {
    // A recording holds transitions and connection records both, so it replays through
    // every view; otherwise the kernel writes only what the view reads.
    (match (reads, recording) {
        (_, true) => records::CONNECTIONS | records::DETAILS,
        (Reads::Transitions, false) => 0,
        (Reads::Connections, false) => records::CONNECTIONS | records::NO_TRANSITIONS,
        (Reads::ConnectionsAndConnects, false) => {
            records::CONNECTIONS | records::NO_TRANSITIONS | records::CONNECTS
        }
        (Reads::ConnectionsWithoutTimes, false) => {
            records::CONNECTIONS | records::NO_TRANSITIONS | records::NO_MIDDLE
        }
        (Reads::ConnectionsWithoutTimesNorOwners, false) => {
            records::CONNECTIONS
                | records::NO_TRANSITIONS
                | records::NO_MIDDLE
                | records::NO_PASSIVE_CLOSE
        }
        (Reads::ConnectsWithoutTimesNorOwners, false) => {
            records::CONNECTIONS
                | records::NO_TRANSITIONS
                | records::CONNECTS
                | records::NO_MIDDLE
                | records::NO_PASSIVE_CLOSE
        }
    }) | match counters {
        Counters::Read => records::DETAILS,
        Counters::Skip => 0,
    }
}

/// Loads and attaches the kernel side: `filter`'s kernel part, writing `records`.
fn start_probe(filter: &Filter, source: &SourceArgs, records: u32) -> Result<Probe> {
    let (kernel, ports) = filter.kernel();
    let probe = Probe::start(&ProbeConfig {
        kernel: tcptrace_common::Config {
            wakeup_bytes: probe::DEFAULT_WAKEUP_BYTES,
            #[cfg(feature = "test-knobs")]
            idle: source.idle_probes.into(),
            #[cfg(feature = "test-knobs")]
            bench: if source.bench_without_storage {
                tcptrace_common::bench::NO_STORAGE
            } else {
                0
            },
            records,
            ..kernel
        },
        ports,
        ring_bytes: source.ring_buffer_size,
        timewait: true,
        max_sockets: u32::try_from(source.max_sockets).unwrap_or(u32::MAX),
        ..ProbeConfig::default()
    })?;
    Ok(probe)
}

/// What the live view is told, once the probe is attached: the sockets open now (their
/// listeners' owners told to the kernel side) and what the kernel side traces.
fn live_facts(probe: &mut Probe, filter: &Filter, cgroups: Cgroups, max_sockets: usize) -> Facts {
    // After attaching: a connection opened meanwhile is seen from its birth as well.
    let at_start = sockets_at_start(max_sockets, probe);
    seed_listeners(probe, &at_start);
    // Starting parsed the kernel's BTF and symbols: tens of MiB of small allocations, all
    // freed but scattered over the heap. Give the pages back before the long run.
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    Facts {
        filter: filter.compile().with_cgroups(cgroups.clone()),
        cgroups,
        wall_offset_ns: wall_offset_ns(),
        timers: probe.timewait_traced(),
        records: probe.connection_records(),
        at_start,
        storage_map: probe.storage_map().map(std::sync::Arc::new),
    }
}

/// Creates the recording at `path`, its header saying what the live source sends.
fn start_recording(path: &Path, facts: &Facts, probe: &Probe) -> Result<Writer<File>> {
    let flags = (if facts.timers {
        header_flag::TIMERS_TRACED
    } else {
        0
    }) | (if facts.records {
        header_flag::CONNECTIONS
    } else {
        0
    }) | (if probe.details() {
        header_flag::DETAILS
    } else {
        0
    });
    File::create(path)
        .and_then(|f| Writer::new(f, facts.wall_offset_ns, flags))
        .with_context(|| format!("cannot write the recording {}", path.display()))
}

/// What proves a refused timewait socket live: each namespace's `TCPTimeWaitOverflow`
/// count (read inside it), from its value now.
fn overflow_proof() -> timewait::OverflowProof {
    use doctor::HostFacts as _;
    let namespaces: Vec<Option<u32>> = std::iter::once(None)
        .chain(diag::network_namespaces().iter().map(|n| Some(n.inode)))
        .collect();
    let read = |netns| doctor::Host.counters(netns).map(|c| c.timewait_overflow);
    timewait::OverflowProof::new(Box::new(read), &namespaces)
}

/// Tells the kernel side who owns the listeners that exist already, so that the
/// connections they accept during the trace have an owner.
fn seed_listeners(probe: &mut Probe, at_start: &crate::model::atstart::OpenAtStart) {
    let known: Vec<(u32, u16, u32, [u8; 16])> = at_start
        .iter()
        .filter(|e| e.listening())
        .filter_map(|e| {
            let o = e.owner?;
            Some((e.netns, e.local.port(), o.pid, o.comm.0))
        })
        .collect();
    let added = probe.seed_listeners(&known);
    log::debug!("{added} listeners' owners told to the kernel side");
}

/// How long the backfill at start may take (every namespace's connections, then their
/// owners): events wait in the ring buffer meanwhile. What it could not read in that time
/// is said, and those connections count as seen mid-life.
const BACKFILL_TIME_BUDGET: Duration = Duration::from_secs(2);

/// The connections and listeners open now in every network namespace (at most `limit`),
/// each with the process holding its socket, saying once what could not be seen: read once
/// at start, for every view, within [`BACKFILL_TIME_BUDGET`].
fn sockets_at_start(limit: usize, probe: &mut Probe) -> crate::model::atstart::OpenAtStart {
    let started = Instant::now();
    let until = Some(started + BACKFILL_TIME_BUDGET);
    let (b, owners) = diag::open_everywhere(limit, until, |each| probe.socket_owners(each));
    let unread = owners.unread;
    log::debug!(
        "backfill at start: {} sockets in {} namespaces, with their owners, in {} ms (owners \
         {} ms, {}; {} KiB kept)",
        b.found.len(),
        b.namespaces,
        started.elapsed().as_millis(),
        owners.took.as_millis(),
        if owners.sought == 0 {
            "none to look for"
        } else if owners.from_kernel {
            "the kernel's iterator"
        } else {
            "/proc/*/fd"
        },
        b.found.heap_bytes() / 1024
    );
    if b.unreachable > 0 {
        log::warn!(
            "open connections of {} of {} network namespaces cannot be read: {}",
            b.unreachable,
            b.namespaces + b.unreachable,
            b.first_error.as_deref().unwrap_or("")
        );
    }
    if b.interrupted > 0 {
        log::warn!(
            "the kernel flagged the dump of open connections of {} network namespaces \
             interrupted (their socket table changed under it): some may be missing",
            b.interrupted
        );
    }
    if b.skipped > 0 {
        log::warn!(
            "{} connections open at start beyond --max-sockets {limit} were skipped (every \
             listener is kept; the skipped connections' closes have no role or owner)",
            b.skipped
        );
    }
    if let Some(why) = &owners.failed {
        log::warn!(
            "the kernel's pass over every process's files for the owners of the sockets open \
             at start failed part-way ({why}): the owners it had read are kept, the others' \
             closes have no owner"
        );
    }
    let out_of_time = owners.cut_short && owners.failed.is_none();
    if b.out_of_time > 0 || unread > 0 || out_of_time {
        let pass = if out_of_time {
            ", the kernel's pass over every process's files stopped part-way"
        } else {
            ""
        };
        log::warn!(
            "the backfill at start stopped at its {}-second budget with {} connections \
             read: {} network namespaces not read or read in part, {} processes not looked \
             into for owners{pass} (those connections' closes have no role or owner)",
            BACKFILL_TIME_BUDGET.as_secs(),
            b.found.len(),
            b.out_of_time,
            unread
        );
    }
    b.found
}

/// The TIME_WAIT sockets that exist now in every network namespace (at most `limit`),
/// saying once what could not be seen.
fn backfill_timewaits(limit: usize) -> Vec<diag::DiagTimewait> {
    let b = diag::time_wait_sockets_everywhere(limit);
    if b.unreachable > 0 {
        log::warn!(
            "existing TIME_WAIT sockets of {} of {} network namespaces cannot be read (they \
             count from their next event): {}",
            b.unreachable,
            b.namespaces + b.unreachable,
            b.first_error.as_deref().unwrap_or("")
        );
    }
    if b.skipped > 0 {
        log::warn!(
            "{} existing TIME_WAIT sockets beyond --max-sockets {limit} were left out",
            b.skipped
        );
    }
    b.found
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Opens a recording, naming the file in every error.
pub fn open_recording(path: &Path) -> Result<Reader<File>> {
    let file = File::open(path)
        .map_err(record::RecordError::Io)
        .with_context(|| format!("cannot open the recording {}", path.display()))?;
    Reader::new(file).with_context(|| format!("cannot read the recording {}", path.display()))
}

/// Feeds a whole recording to a view.
pub fn replay<R: io::Read>(reader: &mut Reader<R>, view: &mut dyn View) -> Result<()> {
    view.start()?;
    let mut batch = Vec::with_capacity(4096);
    loop {
        batch.clear();
        if reader.next_batch(&mut batch)? == 0 {
            break;
        }
        if view.push(&batch)? == Flow::Done {
            break;
        }
    }
    view.finish()?;
    Ok(())
}

/// After the first Ctrl-C or SIGTERM the run winds down (a last drain, the summary); a
/// second one must end it at once, so the default actions come back. Nothing stays attached
/// either way: the kernel detaches a dead process's programs with its descriptors.
fn default_signals() {
    // SAFETY: restoring the default disposition of two signals.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
}

/// The ring buffer's descriptor, for readiness.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Traces until the view is done, the duration ends, or SIGINT/SIGTERM arrives. The probe
/// is dropped (detached) on every path out.
pub fn live(
    mut probe: Probe,
    mut recorder: Option<Writer<File>>,
    view: &mut dyn View,
    duration: Option<Duration>,
) -> Result<()> {
    let rt = event_loop()?;
    let mut batch: Vec<RawEvent> = Vec::with_capacity(16 << 10);
    let mut totals = Totals::default();
    let mut feed = |probe: &mut Probe, view: &mut dyn View, last: bool| -> Result<Flow> {
        batch.clear();
        let n = if last {
            probe.drain_final(&mut batch)
        } else {
            probe.drain(&mut batch)
        };
        if n == 0 {
            return Ok(Flow::More);
        }
        totals.count(&batch);
        if let Some(rec) = &mut recorder {
            rec.write(&batch).context("writing the recording")?;
        }
        Ok(view.push(&batch)?)
    };
    view.start()?;
    rt.block_on(trace(&mut probe, view, duration, &mut feed))?;
    let timer_misses = probe.timer_misses();
    let forgotten = probe.forgotten_total();
    drop(probe);
    if let Some(rec) = &mut recorder {
        rec.flush().context("writing the recording")?;
    }
    view.finish()?;
    say_totals(&totals, view.evicted(), forgotten, timer_misses);
    Ok(())
}

/// Feeds the view (through `feed`) when the ring buffer wakes the reader and at every tick,
/// until the view is done, the duration ends or SIGINT/SIGTERM arrives; then what is left.
async fn trace(
    probe: &mut Probe,
    view: &mut dyn View,
    duration: Option<Duration>,
    feed: &mut impl FnMut(&mut Probe, &mut dyn View, bool) -> Result<Flow>,
) -> Result<()> {
    // SAFETY: the descriptor belongs to the probe, which is borrowed for all of this
    // function and so outlives `ready`.
    let ready = unsafe {
        AsyncFd::register_with_interest(RingFd(probe.ring_fd().as_raw_fd()), Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let (mut sigint, mut sigterm) = stop_signals()?;
    // Only now: a Ctrl-C from here on ends the run cleanly.
    let _ = writeln!(
        io::stderr(),
        "Tracing TCP state transitions. Hit Ctrl-C to end."
    );
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(end);
    loop {
        tokio::select! {
            r = ready.readable() => {
                r.context("waiting for the ring buffer")?.clear_ready();
            }
            _ = tick.tick() => {
                // What is waiting in the ring happened before now: it goes in first, so
                // that no grace (a reset's, a timewait socket's fate) is judged ahead of
                // unread events.
                if feed(probe, view, false)? == Flow::Done {
                    return Ok(());
                }
                if view.tick(host::monotonic_ns())? == Flow::Done {
                    return Ok(());
                }
            }
            _ = sigint.recv() => { default_signals(); break }
            _ = sigterm.recv() => { default_signals(); break }
            _ = &mut end => break,
        }
        if feed(probe, view, false)? == Flow::Done {
            return Ok(());
        }
    }
    // What arrived before the stop still belongs to the run.
    feed(probe, view, true)?;
    Ok(())
}

/// What a live run read, by kind, for its last line.
#[derive(Debug, Default)]
struct Totals {
    transitions: u64,
    connections: u64,
    others: u64,
    lost: u64,
}

impl Totals {
    /// Counts a batch's events.
    fn count(&mut self, batch: &[RawEvent]) {
        for raw in batch {
            match raw.kind {
                tcptrace_common::kind::LOST => self.lost += raw.aux,
                tcptrace_common::kind::TRANSITION => self.transitions += 1,
                tcptrace_common::kind::CONNECTION => self.connections += 1,
                tcptrace_common::kind::CONNECTION_TAIL => {}
                _ => self.others += 1,
            }
        }
    }
}

/// Like tcpdump's last lines: what was read and what was not, for the operator (stderr,
/// so the output stays clean).
fn say_totals(totals: &Totals, evicted: u64, forgotten: u64, timer_misses: u64) {
    let Totals {
        transitions,
        connections,
        others,
        lost,
    } = *totals;
    // Not eprintln!: a closed stderr must not turn a clean end into a panic.
    let _ = writeln!(
        io::stderr(),
        "tcptrace: {transitions} transitions{} and {others} other events read, {lost} lost \
         (ring buffer full or nested in the kernel), {} sockets evicted (--max-sockets){}{}",
        if connections > 0 {
            format!(", {connections} connection records")
        } else {
            String::new()
        },
        evicted,
        if forgotten > 0 {
            format!(
                ", {forgotten} facts the kernel could not keep (listeners beyond the map, or \
                 socket storage it could not allocate: owners or durations are missing)"
            )
        } else {
            String::new()
        },
        if timer_misses > 0 {
            format!(
                ", {timer_misses} timer events skipped by the kernel (nested runs; most are \
                 other timers, but TIME_WAIT exits may be among them)"
            )
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_views_without_times_leave_the_middle_transitions_out() {
        let all = [
            Reads::Transitions,
            Reads::Connections,
            Reads::ConnectionsAndConnects,
            Reads::ConnectionsWithoutTimes,
            Reads::ConnectionsWithoutTimesNorOwners,
            Reads::ConnectsWithoutTimesNorOwners,
        ];
        for reads in all {
            for counters in [Counters::Read, Counters::Skip] {
                let without_times = matches!(
                    reads,
                    Reads::ConnectionsWithoutTimes
                        | Reads::ConnectionsWithoutTimesNorOwners
                        | Reads::ConnectsWithoutTimesNorOwners
                );
                let without_owners = matches!(
                    reads,
                    Reads::ConnectionsWithoutTimesNorOwners | Reads::ConnectsWithoutTimesNorOwners
                );
                let live = kernel_records(reads, counters, false);
                assert_eq!(live & records::NO_MIDDLE != 0, without_times, "{reads:?}");
                assert_eq!(
                    live & records::NO_PASSIVE_CLOSE != 0,
                    without_owners,
                    "{reads:?}"
                );
                if without_times {
                    // Only where no transition record is written, which a view would miss.
                    assert_ne!(live & records::NO_TRANSITIONS, 0, "{reads:?}");
                }
                // A recording replays through every view, times included.
                assert_eq!(
                    kernel_records(reads, counters, true) & records::NO_MIDDLE,
                    0,
                    "{reads:?}"
                );
            }
        }
    }
}
