//! `tcptrace check`: can this host run tcptrace, feature by feature?

use std::fmt::Write as _;

use super::{
    host, offsets,
    probe::{Probe, ProbeConfig},
    tracefs::{self, parse_receive_reset_format, parse_send_reset_format, parse_set_state_format},
};

/// One line of the preflight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// What was checked.
    pub what: &'static str,
    /// Passed.
    pub ok: bool,
    /// Whether the live stream cannot run without it.
    pub core: bool,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

fn item(what: &'static str, core: bool, r: Result<String, String>) -> Item {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Item {
        what,
        ok,
        core,
        detail,
    }
}

/// (major, minor) of the running kernel.
fn kernel_version() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// A tracepoint's format file, or why it cannot be read.
fn read_format(category: &str, name: &str) -> Result<String, String> {
    tracefs::read_format(category, name).map_err(|e| e.to_string())
}

/// Runs every check; `load` also loads and attaches the real program for a moment.
pub fn run(load: bool) -> Vec<Item> {
    let mut items = vec![
        item("privileges", true, host::capabilities().verdict()),
        item("kernel", true, kernel()),
    ];
    items.extend(tracepoints());
    items.extend(btf_extras());
    items.extend(timewait_exits());
    items.push(item("network namespaces and cgroups", false, containers()));
    items.push(item("sockets that exist at start", false, backfill()));
    if load && core_ok(&items) {
        items.extend(load_and_attach());
    }
    items
}

/// Whether the running kernel is recent enough.
fn kernel() -> Result<String, String> {
    match kernel_version() {
        Some((ma, mi, r)) if (ma, mi) >= (5, 8) => Ok(format!("Linux {r}")),
        Some((_, _, r)) => Err(format!(
            "Linux {r}: tcptrace needs 5.8 or later (BPF ring buffers, CAP_BPF)"
        )),
        None => Err("cannot read /proc/sys/kernel/osrelease".into()),
    }
}

/// The tracepoints transitions and resets come from: the BTF ones, else the classic
/// state-transition one (then a core requirement); and the reset tracepoints.
fn tracepoints() -> [Item; 3] {
    // The BTF programs read the kernel's objects: they need the kernel's BTF, not tracefs.
    // Without them, the classic programs need the tracepoint's format file.
    let btf_programs = crate::source::btf::Btf::from_sys()
        .and_then(|b| offsets::sock_offsets(&b))
        .map(|_| "the kernel's BTF describes the sockets the BTF tracepoints hand over".into());
    let classic_needed = btf_programs.is_err();
    [
        item("BTF tracepoints", false, btf_programs),
        item(
            "sock:inet_sock_set_state",
            classic_needed,
            read_format("sock", "inet_sock_set_state")
                .and_then(|t| parse_set_state_format(&t))
                .map(|_| "the state-transition tracepoint is usable".into())
                .map_err(|e| {
                    if classic_needed {
                        e
                    } else {
                        format!("{e} (only kernels without BTF need it)")
                    }
                }),
        ),
        item(
            "tcp:tcp_send_reset, tcp_receive_reset",
            false,
            read_format("tcp", "tcp_send_reset")
                .and_then(|t| parse_send_reset_format(&t))
                .and_then(|_| read_format("tcp", "tcp_receive_reset"))
                .and_then(|t| parse_receive_reset_format(&t))
                .map(|_| "resets tell who aborted a connection".into())
                .map_err(|e| format!("{e}: aborts will be classified `unknown`")),
        ),
    ]
}

/// What the kernel's BTF adds to each connection: its counters at its end, reset reasons'
/// names, and ends no program ran for.
fn btf_extras() -> [Item; 3] {
    [
        item(
            "connection details",
            false,
            crate::source::btf::Btf::from_sys()
                .and_then(|b| offsets::tcp_offsets(&b))
                .map(|_| {
                    "bytes, segments, retransmissions, round-trip times and errors are read \
                     from each socket at its end"
                        .into()
                })
                .map_err(|e| {
                    format!("{e}: closes carry no counters, and timeouts no exact reason")
                }),
        ),
        item(
            "reset reason names",
            false,
            crate::source::btf::Btf::from_sys().and_then(|b| {
                b.enumerators("sk_rst_reason")
                    .map(|all| format!("the kernel names its {} reset reasons", all.len()))
                    .map_err(|_| {
                        "the kernel's BTF has no enum sk_rst_reason (Linux 6.10+): resets carry \
                         no reason"
                            .into()
                    })
            }),
        ),
        item(
            "tcp:tcp_destroy_sock",
            false,
            crate::source::btf::Btf::from_sys().and_then(|b| {
                b.tracepoint_args("tcp_destroy_sock")
                    .map(|_| "a connection end no program ran for is counted lost".into())
                    .ok_or_else(|| {
                        "the kernel's BTF has no tcp_destroy_sock tracepoint (Linux 5.3+): a \
                         connection end the kernel skips goes uncounted"
                            .into()
                    })
            }),
        ),
    ]
}

/// What tracing TIME_WAIT exits needs: the timewait socket's layout; and, where the kernel
/// refuses fentry programs on the timewait functions, its timer's handler and the timer
/// tracepoints (which program set is used is said once loaded: [`load_and_attach`]).
fn timewait_exits() -> [Item; 3] {
    [
        item(
            "BTF",
            false,
            crate::source::btf::Btf::from_sys()
                .and_then(|b| {
                    b.offset("inet_timewait_sock", "tw_timer")
                        .map_err(|e| e.to_string())
                })
                .map(|_| "/sys/kernel/btf/vmlinux describes inet_timewait_sock".into())
                .map_err(|e| format!("{e}: no TIME_WAIT exits")),
        ),
        item(
            "tw_timer_handler",
            false,
            host::kallsyms_address("tw_timer_handler")
                .map(|a| format!("at {a:#x} in /proc/kallsyms"))
                .map_err(|e| {
                    format!(
                        "{e}: no TIME_WAIT exits from the timer tracepoints (run as root, or add \
                         CAP_SYSLOG); the timewait functions' programs need no address"
                    )
                }),
        ),
        item(
            "timer tracepoints",
            false,
            offsets::timewait_offsets()
                .and_then(|mut o| tracefs::timer_format_offsets(&mut o))
                .map(|()| "timer:timer_start, timer_cancel, timer_expire_entry".into())
                .map_err(|e| {
                    format!(
                        "{e}: no TIME_WAIT exits where fentry on the timewait functions is refused"
                    )
                }),
        ),
    ]
}

/// Loads and attaches the real programs for a moment, and asks the kernel's iterator who
/// holds the sockets open now.
fn load_and_attach() -> [Item; 3] {
    let mut probe = Probe::start(&ProbeConfig::default());
    let owners = match &mut probe {
        Ok(p) => socket_owners(p),
        Err(e) => Err(format!("{e}")),
    };
    let timewait = match &probe {
        Ok(p) => timewait_source(p),
        Err(e) => Err(format!("{e}")),
    };
    [
        item("TIME_WAIT exits", false, timewait),
        item(
            "load and attach",
            true,
            probe
                .map(|p| {
                    let exits = if p.timewait_traced() {
                        ""
                    } else {
                        ", without TIME_WAIT exits"
                    };
                    format!(
                        "the eBPF programs load, attach and detach ({}{exits})",
                        p.kernel_side().describe()
                    )
                })
                .map_err(|e| e.to_string()),
        ),
        item("owners of the sockets open at start", false, owners),
    ]
}

/// Which programs follow timewait sockets, and why not the cheapest.
fn timewait_source(p: &Probe) -> Result<String, String> {
    let source = p
        .timewait_source()
        .map_err(|e| format!("{e}: no TIME_WAIT exits"))?;
    Ok(match p.timewait_note() {
        Some(why) => format!("from {} ({why})", source.describe()),
        None => format!("from {}", source.describe()),
    })
}

/// Whether the kernel's iterator over every task's files tells who holds each socket.
fn socket_owners(p: &mut Probe) -> Result<String, String> {
    // Every socket file of every kind (TCP or not), once for each process holding it.
    let mut held = 0u64;
    p.socket_owners(&mut |_| {
        held += 1;
        std::ops::ControlFlow::Continue(())
    })
    .map(|()| {
        format!(
            "the kernel's iterator over every task's files names the processes holding \
             {held} socket descriptors (all kinds)"
        )
    })
    .map_err(|e| {
        format!(
            "{e}: read from /proc/*/fd instead, slower, and blind to other users' \
                 processes without CAP_SYS_PTRACE"
        )
    })
}

/// Whether events can name their socket's network namespace and cgroup, and cgroups be
/// named by path.
fn containers() -> Result<String, String> {
    let btf = crate::source::btf::Btf::from_sys()
        .map_err(|e| format!("{e}: namespaces and cgroups are not reported"))?;
    let (_, missing) = offsets::ns_offsets(&btf);
    if !missing.is_empty() {
        return Err(missing.join("; "));
    }
    match crate::model::cgroup::cgroup2_mount() {
        Some(m) => Ok(format!(
            "cgroups named from the cgroup2 mount {}",
            m.display()
        )),
        None => Err("no cgroup2 mount: cgroups are shown as ids".into()),
    }
}

/// Whether the TIME_WAIT sockets that exist before tracing starts can be read in every
/// network namespace (sock_diag, entering each).
fn backfill() -> Result<String, String> {
    let b = crate::source::diag::time_wait_sockets_everywhere(0);
    let _: &[crate::source::diag::DiagTimewait] = &b.found;
    let total = b.namespaces + b.unreachable;
    if b.unreachable > 0 {
        return Err(format!(
            "{} of {total} network namespaces cannot be read ({}; entering one needs \
             CAP_SYS_ADMIN): their existing TIME_WAIT sockets count from their next event",
            b.unreachable,
            b.first_error.as_deref().unwrap_or("")
        ));
    }
    Ok(format!(
        "sock_diag reads all {total} network namespaces ({} TIME_WAIT sockets now)",
        b.skipped
    ))
}

/// Whether the live stream can run.
pub fn core_ok(items: &[Item]) -> bool {
    items.iter().all(|i| i.ok || !i.core)
}

/// The preflight as text: one line per check.
pub fn render(items: &[Item]) -> String {
    let mut out = String::new();
    for i in items {
        let mark = if i.ok {
            "✓"
        } else if i.core {
            "✗"
        } else {
            "!"
        };
        let _ = writeln!(out, "{mark} {:<38} {}", i.what, i.detail);
    }
    let _ = writeln!(
        out,
        "{}",
        if core_ok(items) {
            "tcptrace can run here."
        } else {
            "tcptrace cannot run here: fix the ✗ lines."
        }
    );
    out
}
