//! The live source: loads the embedded eBPF programs — the BTF tracepoint set where the kernel
//! takes it, else the classic one — configures them, attaches them to TCP's transitions,
//! resets and timewait sockets (their own functions where the kernel allows fentry, else
//! their timers), and drains their ring buffer in batches.
//!
//! This is the only module that loads programs into the kernel. Everything it produces is a
//! [`RawEvent`], exactly what a recording holds, so every view works the same live and on a
//! recording.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array as BpfArray, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, TracePoint},
};
use tcptrace_common::{Config, CounterSlot, EVENT_SIZE, NsOffsets, TimewaitOffsets, records};

use super::{
    btf::Btf,
    host::{capabilities, kallsyms_address, monotonic_ns},
    offsets::{ns_offsets, owners_offsets, sock_offsets, tcp_offsets, timewait_layout},
    tracefs::{
        parse_receive_reset_format, parse_send_reset_format, parse_set_state_format, read_format,
        timer_format_offsets,
    },
};
use crate::model::event::{RawEvent, raw_lost};

/// The eBPF object built by `build.rs`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Why the probe could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "tcptrace needs root or CAP_BPF and CAP_PERFMON: try `sudo tcptrace …` \
         (this process lacks {0})"
    )]
    Privileges(&'static str),
    #[error(
        "the tracepoint sock:inet_sock_set_state was not found in tracefs ({0}); \
         it needs Linux 4.16 or later with tracefs mounted \
         (`mount -t tracefs tracefs /sys/kernel/tracing`)"
    )]
    NoTracepoint(String),
    #[error(
        "cannot read tracefs at {0}: without root, tcptrace needs CAP_DAC_READ_SEARCH as well as \
         CAP_BPF and CAP_PERFMON (and CAP_SYSLOG for TIME_WAIT exits); try `sudo tcptrace …`"
    )]
    NoTracefsAccess(String),
    #[error("the format of sock:inet_sock_set_state is not what tcptrace understands: {0}")]
    Format(String),
    #[error("loading the eBPF program failed: {0}")]
    Load(String),
    #[error("attaching to sock:inet_sock_set_state failed: {0}")]
    Attach(String),
    #[error(
        "the ring buffer size must be a power of two of at least {min} bytes, not {0}",
        min = MIN_RING_BYTES
    )]
    RingSize(u32),
}

/// What the loader hands the program.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The in-kernel filter (its `offsets` are filled in by the probe).
    pub kernel: Config,
    /// Port → bits of `tcptrace_common::port_filter`.
    pub ports: Vec<(u16, u8)>,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Trace timewait sockets' timers (TIME_WAIT exits), where the host allows it.
    pub timewait: bool,
    /// Which kernel programs to take (tests only: a run takes the fastest the kernel
    /// allows).
    #[cfg(feature = "test-knobs")]
    pub paths: Paths,
    /// Entries of the classic programs' per-socket map (the BTF ones keep no such map).
    pub max_sockets: u32,
    /// Entries of the listeners' map (each listening socket's owner, by namespace and port).
    pub max_listeners: u32,
}

/// The kernel programs a probe runs, for tests (feature `test-knobs`): [`Paths::Portable`]
/// exercises the fallback that [`Paths::Fast`], what a run takes, relies on.
#[cfg(feature = "test-knobs")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Paths {
    /// The BTF tracepoint programs with socket-local storage where the kernel takes them
    /// (Linux 5.11 and later with BTF), else the classic ones, with one warning saying why.
    #[default]
    Fast,
    /// The classic tracepoint programs, whatever the kernel, reading the record field by
    /// field: what kernels without BTF, or with a record layout tcptrace does not know, take.
    Portable,
}

/// Which set of kernel programs a running probe uses. The two are never attached together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSide {
    /// BTF tracepoints; each socket's facts in socket-local storage, freed with the socket.
    Btf,
    /// Classic tracepoints reading the records; each socket's facts in an LRU map of
    /// `--max-sockets` entries.
    Classic,
}

impl KernelSide {
    /// How `tcptrace check` and the logs name it.
    pub fn describe(self) -> &'static str {
        match self {
            KernelSide::Btf => "BTF tracepoints, per-socket state in socket-local storage",
            KernelSide::Classic => {
                "classic tracepoints, per-socket state in an LRU map (the fallback for kernels \
                 without BTF or socket storage for tracing programs)"
            }
        }
    }
}

/// Where a probe learns the lives of timewait sockets from (TIME_WAIT exits and residency).
/// One source at a time: never two sets of programs for the same event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitSource {
    /// fentry programs on the timewait functions (`__inet_twsk_schedule`,
    /// `inet_twsk_deschedule_put`, `inet_twsk_kill`): they run only for timewait sockets, and
    /// see every re-arm.
    Functions,
    /// BTF tracepoint programs on every timer of the host (`timer_start`, `timer_cancel`,
    /// `timer_expire_entry`), each leaving at once unless the timer is a timewait socket's.
    BtfTimers,
    /// Classic tracepoint programs on every timer of the host.
    ClassicTimers,
}

impl TimewaitSource {
    /// How `tcptrace check` and the logs name it.
    pub fn describe(self) -> &'static str {
        match self {
            TimewaitSource::Functions => "fentry programs on the timewait functions",
            TimewaitSource::BtfTimers => "BTF tracepoints on every timer of the host",
            TimewaitSource::ClassicTimers => "classic tracepoints on every timer of the host",
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            kernel: Config {
                wakeup_bytes: DEFAULT_WAKEUP_BYTES,
                ..Config::default()
            },
            ports: Vec::new(),
            ring_bytes: DEFAULT_RING_BYTES,
            timewait: true,
            #[cfg(feature = "test-knobs")]
            paths: Paths::Fast,
            max_sockets: DEFAULT_KERNEL_SOCKETS,
            max_listeners: DEFAULT_KERNEL_LISTENERS,
        }
    }
}

impl ProbeConfig {
    /// Whether the BTF programs are tried before the classic ones: always in a run.
    #[cfg(not(feature = "test-knobs"))]
    fn tries_btf(&self) -> bool {
        true
    }

    /// Whether the BTF programs are tried before the classic ones: unless a test asks for
    /// the classic ones.
    #[cfg(feature = "test-knobs")]
    fn tries_btf(&self) -> bool {
        self.paths == Paths::Fast
    }

    /// Whether the classic programs read every record field by field, as on a kernel whose
    /// record layout tcptrace does not know: never in a run.
    #[cfg(not(feature = "test-knobs"))]
    fn reads_field_by_field(&self) -> bool {
        false
    }

    /// Whether the classic programs read every record field by field, as on a kernel whose
    /// record layout tcptrace does not know: when a test asks (so that tests run it).
    #[cfg(feature = "test-knobs")]
    fn reads_field_by_field(&self) -> bool {
        self.paths == Paths::Portable
    }
}

/// How often [`Probe::drain`] reads the loss counters.
const LOST_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// 4 MiB: about 43,000 events, two seconds of a 20k-transitions/s storm.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// The smallest ring buffer the kernel takes: a page.
pub const MIN_RING_BYTES: u32 = 4096;

/// Whether the kernel takes a ring buffer of `bytes`: a power of two, at least a page.
pub fn ring_bytes_valid(bytes: u32) -> bool {
    bytes >= MIN_RING_BYTES && bytes.is_power_of_two()
}

/// Wake the reader early only once 64 KiB are waiting; it drains on a tick otherwise.
pub const DEFAULT_WAKEUP_BYTES: u32 = 64 << 10;
/// Entries of the classic programs' per-socket LRU map, unless the command line says.
pub const DEFAULT_KERNEL_SOCKETS: u32 = 65_536;
/// Entries of the listeners' map: one per listening port and network namespace.
pub const DEFAULT_KERNEL_LISTENERS: u32 = tcptrace_common::DEFAULT_LISTENERS;

/// A loaded, attached probe. Dropping it detaches the program and frees its maps.
pub struct Probe {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    forgotten: PerCpuArray<MapData, u64>,
    /// What the BTF side counts besides: transitions taken over, transitions unseen.
    btf: Option<BtfCounters>,
    lost_reported: u64,
    /// When the loss counters were last read.
    lost_checked: std::time::Instant,
    /// The TCP programs' descriptors (owned by `_ebpf`), for their missed runs.
    tcp_progs: Vec<RawFd>,
    /// The timer programs' descriptors.
    timer_progs: Vec<RawFd>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Where timewait sockets' lives come from, or why they are not traced.
    timewait: Result<TimewaitSource, String>,
    /// Why the timewait functions are not the source, when the timers are.
    timewait_note: Option<String>,
    /// The kernel writes connection records.
    connections: bool,
    /// The programs write each connection's details before its end.
    details: bool,
    side: KernelSide,
    /// The socket owners' iterator is loaded (or why not).
    owners: Result<(), String>,
    // Keeps the program and its link alive; declared last so it is dropped last.
    _ebpf: Ebpf,
}

/// The BTF side's own counters (per CPU, a slot per program).
struct BtfCounters {
    /// Transitions the nested copy took over.
    caught: PerCpuArray<MapData, u64>,
    /// Transitions no program ran for, found in their socket's storage.
    unseen: PerCpuArray<MapData, u64>,
}

/// The TCP programs of each kernel side, by tracepoint (the classic program bears its name):
/// transitions, resets sent, resets received.
const TCP_PROGRAMS: [(&str, &str); 3] = [
    ("inet_sock_set_state", "btf_set_state"),
    ("tcp_send_reset", "btf_send_reset"),
    ("tcp_receive_reset", "btf_receive_reset"),
];
/// The BTF transition program's second copy, which takes over the transitions nested in it.
const NESTED_PROGRAM: &str = "btf_set_state_nested";
/// The BTF program on socket destruction, which finds the ends no program ran for. Optional:
/// without it (`tcp_destroy_sock` is Linux 5.3+) such ends go uncounted and have no record.
const DESTROY_PROGRAM: (&str, &str) = ("tcp_destroy_sock", "btf_destroy_sock");
/// The fentry programs on the timewait functions, by function: armed (or re-armed), killed
/// early, ended. Tried first; the timer programs are the fallback.
const TIMEWAIT_FUNCTIONS: [(&str, &str); 3] = [
    ("__inet_twsk_schedule", "tw_schedule"),
    ("inet_twsk_deschedule_put", "tw_deschedule"),
    ("inet_twsk_kill", "tw_kill"),
];
/// The timer programs of each kernel side: timewait timers armed, cancelled, fired.
const TIMER_PROGRAMS: [(&str, &str); 3] = [
    ("timer_start", "btf_timer_start"),
    ("timer_cancel", "btf_timer_cancel"),
    ("timer_expire_entry", "btf_timer_expire"),
];

impl Probe {
    /// Loads, configures and attaches the programs: the BTF set where the kernel takes it,
    /// else the classic one.
    pub fn start(cfg: &ProbeConfig) -> Result<Probe, ProbeError> {
        check_privileges()?;
        if !ring_bytes_valid(cfg.ring_bytes) {
            return Err(ProbeError::RingSize(cfg.ring_bytes));
        }
        raise_memlock();
        // The kernel's BTF, read once: struct offsets for TIME_WAIT exits, namespaces,
        // cgroups and the BTF programs.
        let btf = Btf::from_sys();
        let (kcfg, handler) = shared_config(cfg, &btf);
        if cfg.tries_btf() {
            match Probe::start_btf(cfg, kcfg, &btf, &handler) {
                Ok(p) => return Ok(p),
                Err(e) => log::warn!(
                    "using the classic tracepoints: {e}; per-socket facts are then kept in a \
                     map of {} sockets (--max-sockets)",
                    cfg.max_sockets
                ),
            }
        }
        Probe::start_classic(cfg, kcfg, handler)
    }

    /// The BTF tracepoint programs, with per-socket state in socket-local storage.
    fn start_btf(
        cfg: &ProbeConfig,
        mut kcfg: Config,
        btf: &Result<Btf, String>,
        handler: &Result<u64, String>,
    ) -> Result<Probe, String> {
        let btf = btf.as_ref().map_err(|e| format!("no kernel BTF ({e})"))?;
        kcfg.sock = sock_offsets(btf)?;
        kcfg.send_reset_reason = u32::from(btf.tracepoint_args("tcp_send_reset") >= Some(3));
        if kcfg.records & records::DETAILS != 0 {
            match tcp_offsets(btf) {
                Ok(tcp) => kcfg.tcp = tcp,
                Err(e) => {
                    kcfg.records &= !records::DETAILS;
                    log::warn!(
                        "connection details (bytes, round-trip times, retransmissions, exact \
                         end reasons) are not reported on this kernel: {e}"
                    );
                }
            }
        }
        // aya resolves each BTF tracepoint's type in its own reading of the kernel's BTF,
        // dropped once they are loaded.
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        kcfg.owners = owners_offsets(btf).unwrap_or_default();
        // SK_STATE replaces SOCKS: one entry, not a preallocated table nobody uses.
        let mut ebpf = load(cfg, &kcfg, 1).map_err(|e| e.to_string())?;
        let owners = if kcfg.owners.known == 0 {
            Err("the kernel's BTF lacks the fields it reads".to_string())
        } else {
            load_owners(&mut ebpf, &kernel_btf)
        };
        // The nested copy must run after the transition program for each transition: the
        // kernel calls a tracepoint's programs in the order they were attached.
        let [transitions, sent, received] = TCP_PROGRAMS;
        let nested = (transitions.0, NESTED_PROGRAM);
        for (tracepoint, name) in [transitions, nested, sent, received] {
            attach_btf(&mut ebpf, name, tracepoint, &kernel_btf)?;
        }
        let (tracepoint, name) = DESTROY_PROGRAM;
        if let Err(e) = attach_btf(&mut ebpf, name, tracepoint, &kernel_btf) {
            log::warn!("a connection end the kernel skips is not counted as lost: {name}: {e}");
        }
        let mut note = None;
        let timewait = attach_timewait_btf(&mut ebpf, &kcfg, handler, &kernel_btf, &mut note);
        drop(kernel_btf);
        let tcp = TCP_PROGRAMS.map(|(_, btf)| btf);
        let mut probe = Probe::assemble(ebpf, cfg, KernelSide::Btf, &tcp, timewait)
            .map_err(|e| e.to_string())?;
        probe.connections = kcfg.records & records::CONNECTIONS != 0;
        probe.details = kcfg.records & records::DETAILS != 0;
        probe.owners = owners;
        probe.timewait_note = note;
        Ok(probe)
    }

    /// The classic tracepoint programs: what kernels without BTF (or without socket storage
    /// for tracing programs) take.
    fn start_classic(
        cfg: &ProbeConfig,
        mut kcfg: Config,
        handler: Result<u64, String>,
    ) -> Result<Probe, ProbeError> {
        // The classic programs write every transition and reset, and no connection record.
        kcfg.records = 0;
        let text = read_format("sock", "inet_sock_set_state")?;
        kcfg.offsets = parse_set_state_format(&text).map_err(ProbeError::Format)?;
        if cfg.reads_field_by_field() {
            // What a kernel whose record layout tcptrace does not know takes: a helper read
            // per field.
            kcfg.offsets.known_layout = 0;
        }
        // The reset tracepoints tell who aborted a connection. Without them (before Linux
        // 4.16/5.x, or a changed format) tracing goes on and aborts are classified `unknown`.
        let send = optional_format("tcp_send_reset", parse_send_reset_format);
        let recv = optional_format("tcp_receive_reset", parse_receive_reset_format);
        if let Some(o) = send {
            kcfg.send_reset = o;
        }
        if let Some(o) = recv {
            kcfg.receive_reset = o;
        }
        // The timers are the classic side's only source: without the handler's address or
        // their formats, tracing goes on without TIME_WAIT exits, and says so once.
        if cfg.timewait && kcfg.timewait.tw_timer != 0 {
            match handler.and_then(|h| {
                kcfg.timewait.handler = h;
                timer_format_offsets(&mut kcfg.timewait)
            }) {
                Ok(()) => {}
                Err(e) => {
                    log::warn!("TIME_WAIT exits are not traced on this host: {e}");
                    kcfg.timewait.handler = 0;
                }
            }
        }
        let mut ebpf = load(cfg, &kcfg, cfg.max_sockets)?;
        let prog: &mut TracePoint = ebpf
            .program_mut("inet_sock_set_state")
            .ok_or_else(|| ProbeError::Load("program inet_sock_set_state is missing".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
        prog.load()
            .map_err(|e| ProbeError::Load(verifier_error(&e)))?;
        prog.attach("sock", "inet_sock_set_state")
            .map_err(|e| ProbeError::Attach(format!("{e:#}")))?;
        for (name, wanted) in [
            ("tcp_send_reset", send.is_some()),
            ("tcp_receive_reset", recv.is_some()),
        ] {
            if wanted && let Err(e) = attach_optional(&mut ebpf, "tcp", name) {
                log::warn!("tcp:{name} is not traced ({e}); resets will show as `unknown`");
            }
        }
        let timewait = if kcfg.timewait.handler == 0 {
            Err("the timer programs' needs are missing (said above)".to_string())
        } else {
            TIMER_PROGRAMS
                .iter()
                .try_for_each(|(name, _)| {
                    attach_optional(&mut ebpf, "timer", name)
                        .map_err(|e| format!("timer:{name}: {e}"))
                })
                .map(|()| TimewaitSource::ClassicTimers)
                .inspect_err(|e| log::warn!("TIME_WAIT exits are not traced: {e}"))
        };
        let tcp = TCP_PROGRAMS.map(|(classic, _)| classic);
        Probe::assemble(ebpf, cfg, KernelSide::Classic, &tcp, timewait)
    }

    /// The probe around loaded programs: its maps, and the descriptors of the programs whose
    /// missed runs count as lost events (the TCP programs, and those of `timewait`'s source).
    fn assemble(
        mut ebpf: Ebpf,
        cfg: &ProbeConfig,
        side: KernelSide,
        tcp: &[&str],
        timewait: Result<TimewaitSource, String>,
    ) -> Result<Probe, ProbeError> {
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        set_ports(&mut ebpf, &cfg.ports)?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)
            .map_err(|e| ProbeError::Load(e.to_string()))?;
        let lost = per_cpu_map(&mut ebpf, "LOST")?;
        let forgotten = per_cpu_map(&mut ebpf, "FORGOTTEN")?;
        let btf = match side {
            KernelSide::Btf => Some(BtfCounters {
                caught: per_cpu_map(&mut ebpf, "CAUGHT")?,
                unseen: per_cpu_map(&mut ebpf, "UNSEEN")?,
            }),
            KernelSide::Classic => None,
        };
        let fds = |names: &[&str]| -> Vec<RawFd> {
            names
                .iter()
                .filter_map(|n| ebpf.program(n)?.fd().ok())
                .map(|fd| fd.as_fd().as_raw_fd())
                .collect()
        };
        let timers = timewait
            .as_ref()
            .map_or(Vec::new(), |s| s.programs().to_vec());
        let (tcp_progs, timer_progs) = (fds(tcp), fds(&timers));
        log::debug!("kernel side: {}", side.describe());
        Ok(Probe {
            ring,
            lost,
            forgotten,
            btf,
            lost_reported: 0,
            lost_checked: std::time::Instant::now(),
            tcp_progs,
            timer_progs,
            logger,
            timewait,
            timewait_note: None,
            owners: Err("it needs the BTF programs".into()),
            connections: false,
            details: false,
            side,
            _ebpf: ebpf,
        })
    }

    /// Tells the kernel side the owners of listeners that predate the trace (the listen()
    /// it learns them from is past): their accepted sockets then get an owner at once.
    /// `(netns, port, pid, comm)` each; a listener the kernel already knows keeps its own.
    /// Returns how many were added.
    pub fn seed_listeners(&mut self, listeners: &[(u32, u16, u32, [u8; 16])]) -> usize {
        use tcptrace_common::{ListenKey, Owner, flag};
        let Some(map) = self._ebpf.map_mut("LISTENERS") else {
            return 0;
        };
        let Ok(mut map) = aya::maps::HashMap::<_, ListenKey, Owner>::try_from(map) else {
            return 0;
        };
        // BPF_NOEXIST: what the kernel side learnt itself stays.
        const NOEXIST: u64 = 1;
        listeners
            .iter()
            .filter(|(netns, port, pid, comm)| {
                let key = ListenKey {
                    netns: *netns,
                    port: *port,
                    _pad: 0,
                };
                let owner = Owner {
                    comm: [
                        u64::from_le_bytes(comm[..8].try_into().expect("8 bytes")),
                        u64::from_le_bytes(comm[8..].try_into().expect("8 bytes")),
                    ],
                    pid: *pid,
                    flags: u32::from(flag::OWNER_KNOWN),
                };
                map.insert(key, owner, NOEXIST).is_ok()
            })
            .count()
    }

    /// Which process holds each socket file on the host, from the kernel's iterator over
    /// every task's open files: one pass in the kernel, where reading `/proc/*/fd` takes a
    /// system call a descriptor and may not see other users' processes. Each record names
    /// the process by its pid in the initial (host) pid namespace — not tcptrace's own,
    /// when it runs in a container — and by its task's command. Each goes to `each` as it
    /// is read, until `each` breaks (the kernel's pass stops when its file is closed). Err
    /// says why it cannot run here, or why its pass stopped part-way: what went to `each`
    /// before stands.
    pub fn socket_owners(
        &mut self,
        each: &mut dyn FnMut(tcptrace_common::SocketOwner) -> std::ops::ControlFlow<()>,
    ) -> Result<(), String> {
        self.owners.clone()?;
        let prog: &mut aya::programs::Iter = self
            ._ebpf
            .program_mut(OWNERS_PROGRAM)
            .ok_or("the iterator is missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        let link = prog.attach().map_err(|e| format!("{e:#}"))?;
        let link = prog.take_link(link).map_err(|e| format!("{e:#}"))?;
        let mut file = link.into_file().map_err(|e| format!("{e:#}"))?;
        // Read a page of records at a time: a host's million sockets are never held twice.
        const RECORD_BYTES: usize = size_of::<tcptrace_common::SocketOwner>();
        let mut buf = [0u8; 512 * RECORD_BYTES];
        let mut have = 0;
        loop {
            let n = match std::io::Read::read(&mut file, &mut buf[have..]) {
                Ok(n) => n,
                // A signal, or the kernel's pass having walked its most objects in one read
                // without a record to show (`bpf_seq_read`'s EAGAIN): it resumes where it
                // was.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(format!("reading the iterator: {e}")),
            };
            if n == 0 {
                return Ok(());
            }
            have += n;
            let whole = have - have % RECORD_BYTES;
            for r in buf[..whole].chunks_exact(RECORD_BYTES) {
                if each(bytemuck::pod_read_unaligned(r)).is_break() {
                    return Ok(());
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
    }

    /// A descriptor of the socket-storage map (what the BTF programs keep with each socket,
    /// [`SockStorage`](tcptrace_common::connection::SockStorage)), for sock_diag to read
    /// socket by socket; None with the classic programs.
    pub fn storage_map(&self) -> Option<std::os::fd::OwnedFd> {
        if self.side != KernelSide::Btf {
            return None;
        }
        match self._ebpf.map("SK_STATE")? {
            aya::maps::Map::SkStorage(m) => m.fd().as_fd().try_clone_to_owned().ok(),
            _ => None,
        }
    }

    /// Which set of kernel programs this probe runs.
    pub fn kernel_side(&self) -> KernelSide {
        self.side
    }

    /// Whether the kernel writes a connection record at each connection's end (the BTF
    /// programs, when asked).
    pub fn connection_records(&self) -> bool {
        self.connections
    }

    /// Whether the programs write each connection's details before its end.
    pub fn details(&self) -> bool {
        self.details
    }

    /// Whether timewait sockets are traced (TIME_WAIT exits and residency).
    pub fn timewait_traced(&self) -> bool {
        self.timewait.is_ok()
    }

    /// Where timewait sockets' lives come from, or why they are not traced.
    pub fn timewait_source(&self) -> Result<TimewaitSource, &str> {
        self.timewait.as_ref().copied().map_err(String::as_str)
    }

    /// Why the timewait functions are not the source, when the BTF side's timers are.
    pub fn timewait_note(&self) -> Option<&str> {
        self.timewait_note.as_deref()
    }

    /// The ring buffer's file descriptor, readable when the program has woken the reader.
    pub fn ring_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// Moves every waiting event into `out` (appending), then a lost-events record if the
    /// kernel dropped any since it last looked (at most once a second: see
    /// [`Probe::drain_final`]). Returns how many were appended.
    pub fn drain(&mut self, out: &mut Vec<RawEvent>) -> usize {
        self.drain_checking(out, false)
    }

    /// [`Probe::drain`], then the loss counters read whatever the time: for the end of a run.
    pub fn drain_final(&mut self, out: &mut Vec<RawEvent>) -> usize {
        self.drain_checking(out, true)
    }

    fn drain_checking(&mut self, out: &mut Vec<RawEvent>, force: bool) -> usize {
        let before = out.len();
        while let Some(item) = self.ring.next() {
            // One record, or a connection record's two slots.
            for slot in item.chunks_exact(EVENT_SIZE) {
                if let Ok(ev) = bytemuck::try_pod_read_unaligned::<RawEvent>(slot) {
                    out.push(ev);
                }
            }
        }
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        // Reading a map from userspace holds the kernel's per-CPU guard against nested
        // tracing programs for the length of the system call — longer if the thread is
        // preempted inside it — and every classic tracepoint program on that CPU is skipped
        // meanwhile: the loss counters are read once a second, not on every drain.
        let now = std::time::Instant::now();
        if force || now.duration_since(self.lost_checked) >= LOST_CHECK_EVERY {
            self.lost_checked = now;
            let total = self.lost_total();
            if total > self.lost_reported {
                out.push(raw_lost(monotonic_ns(), total - self.lost_reported));
                self.lost_reported = total;
            }
        }
        out.len() - before
    }

    /// Every TCP event the kernel could not deliver since the probe started: those the ring
    /// buffer had no room for, and the runs the kernel skipped because the same program (a
    /// BTF one) or any classic tracing program was already running on that CPU (the kernel
    /// does not nest them, and counts the miss) — but for the transitions that the BTF
    /// program's nested copy took over.
    pub fn lost_total(&self) -> u64 {
        self.ring_full_total()
            + self.missed_runs().saturating_sub(self.caught_total())
            + self.unseen_total()
    }

    /// Events the ring buffer had no room for (a run that wrote nothing).
    pub fn ring_full_total(&self) -> u64 {
        per_cpu_sum(&self.lost)
    }

    /// TCP program runs the kernel skipped because the program was already running on that
    /// CPU (a transition nested in another's), whether or not the nested copy took them over.
    pub fn missed_runs(&self) -> u64 {
        self.tcp_progs.iter().map(|&fd| recursion_misses(fd)).sum()
    }

    /// The kernel's own counts of the transition program (the first of the TCP programs):
    /// how often it ran and how often it was skipped as nested. Every transition the kernel
    /// called the program for is one or the other, and every run writes its transition
    /// (unless a filter drops it): a judge of the events delivered that tests use.
    pub fn transition_runs(&self) -> Option<RunCounts> {
        program_counts(*self.tcp_progs.first()?)
    }

    /// Transitions the BTF program's nested copy took over from a skipped run: delivered.
    pub fn caught_total(&self) -> u64 {
        self.btf.as_ref().map_or(0, |b| per_cpu_sum(&b.caught))
    }

    /// Of [`Probe::caught_total`], the middle transitions the loader leaves out: skipped in
    /// the transition program, taken over by doing nothing.
    pub fn caught_left_out(&self) -> u64 {
        self.btf.as_ref().map_or(0, |b| {
            per_cpu_slot(&b.caught, CounterSlot::Transition as u32)
        })
    }

    /// Transitions the kernel ran no program for and counted no miss for, found afterwards
    /// in their socket's storage (BTF side only): part of [`Probe::lost_total`].
    pub fn unseen_total(&self) -> u64 {
        self.btf.as_ref().map_or(0, |b| per_cpu_sum(&b.unseen))
    }

    /// Of [`Probe::unseen_total`], the connections' ends: sockets destroyed in a state other
    /// than CLOSE, whose connection record the destruction wrote (marked with a gap).
    pub fn unseen_ends(&self) -> u64 {
        self.btf
            .as_ref()
            .map_or(0, |b| per_cpu_slot(&b.unseen, CounterSlot::Destroy as u32))
    }

    /// Facts the kernel side could not keep since the probe started: listeners that found
    /// their map full (their accepted sockets get no owner), sockets whose storage the kernel
    /// could not allocate (their transitions get no duration or owner).
    pub fn forgotten_total(&self) -> u64 {
        per_cpu_sum(&self.forgotten)
    }

    /// Timewait events the kernel skipped (nested runs): each could hide a TIME_WAIT exit.
    /// With the timer programs, most timers are not timewait sockets', so this overstates
    /// what was missed.
    pub fn timer_misses(&self) -> u64 {
        self.timer_progs
            .iter()
            .map(|&fd| recursion_misses(fd))
            .sum()
    }
}

const _: () = assert!(EVENT_SIZE == std::mem::size_of::<RawEvent>());

/// One slot of a per-CPU counter, summed over every CPU (0 when it cannot be read).
fn per_cpu_slot(map: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    map.get(&slot, 0).map_or(0, |per_cpu| per_cpu.iter().sum())
}

/// The sum of a per-CPU counter over every slot (one per program) and CPU (a slot that
/// cannot be read counts 0).
fn per_cpu_sum(map: &PerCpuArray<MapData, u64>) -> u64 {
    (0..map.len()).map(|slot| per_cpu_slot(map, slot)).sum()
}

/// The kernel-side configuration both program sets share: filters (from the command line),
/// network namespace and cgroup offsets, and the timewait socket's layout (each missing part
/// says so once and is reported as unknown); with the timewait timer's handler's address, or
/// why it cannot be found (only the timer programs need it, and only they say so).
fn shared_config(cfg: &ProbeConfig, btf: &Result<Btf, String>) -> (Config, Result<u64, String>) {
    let mut kcfg = cfg.kernel;
    kcfg.ns = match btf {
        Ok(btf) => {
            let (o, missing) = ns_offsets(btf);
            for m in missing {
                log::warn!("{m}");
            }
            o
        }
        Err(e) => {
            log::warn!("network namespaces and cgroups are not reported: no kernel BTF ({e})");
            NsOffsets::UNKNOWN
        }
    };
    if kcfg.netns_count > 0 && !kcfg.ns.netns_known() {
        log::warn!("--netns cannot match: this kernel's network namespaces are unknown");
    }
    // TIME_WAIT exits come from the timewait socket's functions or its timer; both read the
    // socket's layout from BTF. Without it, tracing goes on without them, and says so once.
    let mut handler = Err("timewait sockets are not traced".to_string());
    if cfg.timewait {
        match btf
            .as_ref()
            .map_err(|e| format!("no kernel BTF ({e})"))
            .and_then(timewait_layout)
        {
            Ok(o) => {
                handler = kallsyms_address("tw_timer_handler");
                // The timer programs' test (the programs on the functions need no address).
                kcfg.timewait = TimewaitOffsets {
                    handler: handler.as_ref().copied().unwrap_or(0),
                    ..o
                };
            }
            Err(e) => log::warn!("TIME_WAIT exits are not traced on this host: {e}"),
        }
    }
    (kcfg, handler)
}

impl TimewaitSource {
    /// The names of its programs.
    fn programs(self) -> [&'static str; 3] {
        match self {
            TimewaitSource::Functions => TIMEWAIT_FUNCTIONS.map(|(_, prog)| prog),
            TimewaitSource::BtfTimers => TIMER_PROGRAMS.map(|(_, btf)| btf),
            TimewaitSource::ClassicTimers => TIMER_PROGRAMS.map(|(classic, _)| classic),
        }
    }
}

/// Attaches the BTF side's timewait programs: the fentry programs on the timewait functions
/// where the kernel allows them, else the BTF timer programs (which need the timer handler's
/// address, `handler`), with one warning saying why (also left in `note`); or none, with one
/// warning. A set that attached only in part is unloaded before the next is tried.
fn attach_timewait_btf(
    ebpf: &mut Ebpf,
    kcfg: &Config,
    handler: &Result<u64, String>,
    kernel_btf: &aya::Btf,
    note: &mut Option<String>,
) -> Result<TimewaitSource, String> {
    if kcfg.timewait.tw_timer == 0 {
        // Not asked for, or the layout is unknown (said already).
        return Err("the timewait socket's layout is not known".into());
    }
    let functions = attach_all(ebpf, &TIMEWAIT_FUNCTIONS, |ebpf, function, prog| {
        attach_fentry(ebpf, prog, function, kernel_btf)
    });
    let Err(refused) = functions else {
        return Ok(TimewaitSource::Functions);
    };
    let why = format!("fentry on the timewait functions is refused ({refused})");
    let timers = match handler {
        Ok(_) => attach_all(ebpf, &TIMER_PROGRAMS, |ebpf, tp, prog| {
            attach_btf(ebpf, prog, tp, kernel_btf)
        }),
        Err(e) => Err(e.clone()),
    };
    match timers {
        Ok(()) => {
            *note = Some(why.clone());
            log::warn!(
                "timewait sockets are followed through every timer of the host, which costs \
                 more and misses re-arms within a timer-wheel bucket: {why}"
            );
            Ok(TimewaitSource::BtfTimers)
        }
        Err(e) => {
            let why = format!("{why}; the timer tracepoints cannot be used: {e}");
            log::warn!("TIME_WAIT exits are not traced: {why}");
            Err(why)
        }
    }
}

/// Attaches each of `set`'s programs with `attach(ebpf, target, program)`; on the first
/// failure, unloads those of the set that loaded (detaching them), and says why.
fn attach_all(
    ebpf: &mut Ebpf,
    set: &[(&str, &str)],
    attach: impl Fn(&mut Ebpf, &str, &str) -> Result<(), String>,
) -> Result<(), String> {
    for (target, prog) in set {
        if let Err(e) = attach(ebpf, target, prog) {
            for (_, p) in set {
                if let Some(p) = ebpf.program_mut(p) {
                    let _ = unload(p);
                }
            }
            return Err(format!("{prog}: {e}"));
        }
    }
    Ok(())
}

/// Unloads a program of the kinds the timewait sets use, detaching its links (a program not
/// loaded is left as it is).
fn unload(p: &mut aya::programs::Program) -> Result<(), aya::programs::ProgramError> {
    match p {
        aya::programs::Program::FEntry(p) => p.unload(),
        aya::programs::Program::BtfTracePoint(p) => p.unload(),
        aya::programs::Program::TracePoint(p) => p.unload(),
        _ => Ok(()),
    }
}

/// Loads the object with its configuration frozen in, and its maps sized: the ring buffer,
/// the classic programs' per-socket map (`socks` entries) and the listeners' map.
fn load(cfg: &ProbeConfig, kcfg: &Config, socks: u32) -> Result<Ebpf, ProbeError> {
    EbpfLoader::new()
        // The programs read tracepoint fields at offsets from tracefs, and kernel structures
        // at offsets from our own BTF reader: no CO-RE relocation, so the loader need not
        // parse the kernel's BTF for the object.
        .btf(None)
        // A kernel without socket storage still runs the classic programs.
        .allow_unsupported_maps()
        .override_global("CONFIG", kcfg, true)
        .map_max_entries("EVENTS", cfg.ring_bytes)
        .map_max_entries("SOCKS", socks.max(1))
        .map_max_entries("LISTENERS", cfg.max_listeners.max(1))
        .load(PROGRAM)
        .map_err(|e| ProbeError::Load(format!("{e:#}")))
}

/// The socket owners' iterator program (see `tcptrace-ebpf/src/owners.rs`).
const OWNERS_PROGRAM: &str = "socket_owners";

/// Loads the socket owners' iterator (attached when asked).
fn load_owners(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<(), String> {
    let prog: &mut aya::programs::Iter = ebpf
        .program_mut(OWNERS_PROGRAM)
        .ok_or_else(|| format!("program {OWNERS_PROGRAM} is missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load("task_file", kernel_btf)
        .map_err(|e| format!("{e:#}"))
}

/// Moves a map out of the object.
fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or_else(|| ProbeError::Load(format!("map {name} is missing")))
}

/// Fills the port filter's array.
fn set_ports(ebpf: &mut Ebpf, ports: &[(u16, u8)]) -> Result<(), ProbeError> {
    let map = ebpf
        .map_mut("PORTS")
        .ok_or_else(|| ProbeError::Load("map PORTS is missing".into()))?;
    let mut array: BpfArray<_, u8> =
        BpfArray::try_from(map).map_err(|e| ProbeError::Load(e.to_string()))?;
    for (port, bits) in ports {
        array
            .set(u32::from(*port), bits, 0)
            .map_err(|e| ProbeError::Load(format!("setting the port filter: {e}")))?;
    }
    Ok(())
}

/// A per-CPU counter map of the loaded object, taken out of it.
fn per_cpu_map(ebpf: &mut Ebpf, name: &str) -> Result<PerCpuArray<MapData, u64>, ProbeError> {
    PerCpuArray::try_from(take_map(ebpf, name)?).map_err(|e| ProbeError::Load(e.to_string()))
}

/// Loads the BTF tracepoint program `prog` for `tracepoint` and attaches it.
fn attach_btf(ebpf: &mut Ebpf, prog: &str, tracepoint: &str, btf: &aya::Btf) -> Result<(), String> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or("the program is missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load(tracepoint, btf)
        .map_err(|e| format!("{tracepoint}: {}", verifier_error(&e)))?;
    p.attach().map_err(|e| format!("{tracepoint}: {e:#}"))?;
    Ok(())
}

/// Loads the fentry program `prog` for the kernel function `function` and attaches it.
fn attach_fentry(
    ebpf: &mut Ebpf,
    prog: &str,
    function: &str,
    btf: &aya::Btf,
) -> Result<(), String> {
    let p: &mut FEntry = ebpf
        .program_mut(prog)
        .ok_or("the program is missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load(function, btf)
        .map_err(|e| format!("{function}: {}", verifier_error(&e)))?;
    p.attach().map_err(|e| format!("{function}: {e:#}"))?;
    Ok(())
}

/// How many times the kernel skipped a program because it was already running on that CPU
/// (`bpf_prog_info.recursion_misses`, Linux 5.12+; 0 when unknown).
fn recursion_misses(fd: RawFd) -> u64 {
    program_counts(fd).map_or(0, |c| c.misses)
}

/// What the kernel counts of a program's runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Runs (`bpf_prog_info.run_cnt`): counted only while the kernel's BPF statistics are on
    /// (`BPF_ENABLE_STATS` or `kernel.bpf_stats_enabled`).
    pub runs: u64,
    /// Runs skipped because the program was already running on that CPU
    /// (`bpf_prog_info.recursion_misses`, Linux 5.12+).
    pub misses: u64,
}

/// [`RunCounts`] of the program behind `fd`; `None` when the kernel does not say.
fn program_counts(fd: RawFd) -> Option<RunCounts> {
    /// `struct bpf_prog_info` up to `recursion_misses` (at byte 208) and a little past it;
    /// `run_cnt` is at byte 200.
    const WORDS: usize = 29;
    const RUNS: usize = 200 / 8;
    const MISSES: usize = 208 / 8;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u64; WORDS];
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    // The kernel says how much it filled: older kernels stop before the field.
    if r != 0 || (attr.info_len as usize) < (MISSES + 1) * 8 {
        return None;
    }
    Some(RunCounts {
        runs: info[RUNS],
        misses: info[MISSES],
    })
}

/// Loads and attaches one of the optional programs.
fn attach_optional(ebpf: &mut Ebpf, category: &str, name: &str) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or("the program is missing")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| verifier_error(&e))?;
    prog.attach(category, name).map_err(|e| format!("{e:#}"))?;
    Ok(())
}

/// The offsets of an optional `tcp:*` tracepoint, or None (with one warning) when this kernel
/// does not have it in a form tcptrace understands.
fn optional_format<T>(name: &str, parse: fn(&str) -> Result<T, String>) -> Option<T> {
    let text = read_format("tcp", name).ok();
    let Some(text) = text else {
        log::warn!("tcp:{name} is not available on this kernel; resets will show as `unknown`");
        return None;
    };
    parse(&text)
        .map_err(|e| log::warn!("{e}; resets will show as `unknown`"))
        .ok()
}

/// Root, or the capabilities that loading tracing programs needs.
fn check_privileges() -> Result<(), ProbeError> {
    let caps = capabilities();
    // CAP_BPF and CAP_PERFMON are checked here; tracefs access (CAP_DAC_READ_SEARCH) is
    // checked where tracefs is read, with its own message.
    match caps.missing() {
        Some(cap @ ("CAP_BPF" | "CAP_PERFMON")) => Err(ProbeError::Privileges(cap)),
        _ => Ok(()),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// A load failure with the verifier's last lines, which say why.
fn verifier_error(e: &aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    {
        let log = verifier_log.to_string();
        if log.trim().is_empty() {
            // Refused before the verifier ran (EPERM for fentry on some kernels).
            return io_error.to_string();
        }
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return format!("{io_error}; verifier said:\n{}", tail.join("\n"));
    }
    format!("{e:#}")
}
