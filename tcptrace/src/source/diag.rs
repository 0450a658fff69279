//! The TIME_WAIT and listening sockets that exist now, from sock_diag (`NETLINK_SOCK_DIAG`, the netlink
//! interface behind `ss`). sock_diag answers for the caller's network namespace: the
//! backfill of every namespace enters each in a thread of its own ([`in_namespace`]).

use tcptrace_common::{SocketOwner, connection::SockStorage};

use crate::model::atstart::{Existing, OpenAtStart};

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::ControlFlow,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    time::Instant,
};

/// A TIME_WAIT socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagTimewait {
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Milliseconds until its timer expires.
    pub expires_ms: u32,
    /// The inode of its network namespace (None: unknown).
    pub netns: Option<u32>,
}

/// A socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its TCP state (kernel number).
    pub state: u8,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Milliseconds until its pending timer expires (0: none).
    pub expires_ms: u32,
    /// The inode of its socket file (0: none, as for timewait sockets and orphans).
    pub inode: u32,
    /// Its pending timer (`idiag_timer`: 3 for a timewait socket's).
    pub timer: u8,
}

/// A socket with what tcptrace's kernel side keeps with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredSocket {
    /// The socket.
    pub socket: DiagSocket,
    /// Its value in the socket-storage map asked about; None when it has none (not seen by
    /// the programs since they were attached, or not a socket they keep anything for).
    pub storage: Option<SockStorage>,
}

/// `idiag_timer` of a timewait socket.
const TIMER_TIMEWAIT: u8 = 3;

impl DiagSocket {
    fn timewait(&self) -> DiagTimewait {
        DiagTimewait {
            local: self.local,
            remote: self.remote,
            expires_ms: self.expires_ms,
            netns: None,
        }
    }
}

/// A network namespace: its inode, and the paths that open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Its inode number (what events carry as `netns`).
    pub inode: u32,
    /// `/proc/self/ns/net`, `/run/netns/NAME` or `/proc/PID/ns/net`: the first found.
    pub path: PathBuf,
    /// The other paths found to it (other processes'), tried when one is gone.
    pub others: Vec<PathBuf>,
}

impl Namespace {
    /// Opens the namespace through the first of its paths that still leads to it (a process
    /// may have exited since it was listed, its pid even reused in another namespace; a name
    /// may have been deleted). `NotFound` when none does: the namespace is gone.
    pub fn open(&self) -> io::Result<std::fs::File> {
        use std::os::unix::fs::MetadataExt as _;
        for path in std::iter::once(&self.path).chain(&self.others) {
            match std::fs::File::open(path) {
                Ok(f) if f.metadata().is_ok_and(|m| m.ino() == u64::from(self.inode)) => {
                    return Ok(f);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("network namespace {} is gone", self.inode),
        ))
    }
}

/// Every network namespace in use on the host, each once (by inode): this process's own
/// first, then those `ip netns` names, then those of every process (containers).
pub fn network_namespaces() -> Vec<Namespace> {
    let mut paths = vec![PathBuf::from("/proc/self/ns/net")];
    let mut named: Vec<PathBuf> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    named.sort();
    paths.extend(named);
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    paths.extend(
        pids.iter()
            .map(|p| PathBuf::from(format!("/proc/{p}/ns/net"))),
    );
    let mut found: Vec<Namespace> = Vec::new();
    let mut index: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for path in paths {
        let Some(inode) = ns_inode(&path) else {
            continue;
        };
        match index.entry(inode) {
            std::collections::hash_map::Entry::Occupied(i) => {
                found[*i.get()].others.push(path);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(found.len());
                found.push(Namespace {
                    inode,
                    path,
                    others: Vec::new(),
                });
            }
        }
    }
    found
}

/// The inode of the namespace at `path` (a symlink `net:[N]` or a bind mount of it).
fn ns_inode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    u32::try_from(std::fs::metadata(path).ok()?.ino()).ok()
}

/// Runs `f` inside the network namespace whose inode is `netns`: here when that is this
/// process's own (or unknown), else in a thread that enters it (found among
/// [`network_namespaces`]). None when it cannot be found or entered, or `f` fails.
pub fn in_netns<T: Send>(
    netns: Option<u32>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> Option<T> {
    let own = ns_inode(Path::new("/proc/self/ns/net"));
    if netns.is_none() || netns == own {
        return f().ok();
    }
    let ns = network_namespaces()
        .into_iter()
        .find(|n| Some(n.inode) == netns)?;
    in_namespace(&ns, f).ok()
}

/// Runs `f` inside the network namespace `ns`, in a thread of its own (entering a namespace
/// changes the calling thread's; the caller's stays where it is). Entering another
/// namespace needs CAP_SYS_ADMIN.
pub fn in_namespace<T: Send>(
    ns: &Namespace,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let file = ns.open()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we own, affecting only this (scoped) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the backfill thread panicked")))
    })
}

/// What a backfill of every namespace found.
#[derive(Debug)]
pub struct Backfill<C> {
    /// What was found, at most the limit asked for.
    pub found: C,
    /// Namespaces looked into.
    pub namespaces: usize,
    /// Namespaces that could not be entered or read.
    pub unreachable: usize,
    /// Why the first of them could not.
    pub first_error: Option<String>,
    /// Items left out beyond the limit.
    pub skipped: usize,
    /// Namespaces not read, or read only in part, because the backfill's time ran out.
    pub out_of_time: usize,
    /// Namespaces whose dump the kernel flagged interrupted (`NLM_F_DUMP_INTR`): read, but
    /// possibly missing sockets.
    pub interrupted: usize,
}

/// What reading one namespace gave.
struct Part<C> {
    found: C,
    /// Items beyond the room the namespace had.
    skipped: usize,
    /// Read to the end (not cut short when the time ran out).
    whole: bool,
    /// A dump of it was flagged interrupted (`NLM_F_DUMP_INTR`): it may miss sockets.
    interrupted: bool,
    /// Items in `found` that took room.
    kept: usize,
}

/// What a backfill gathers from each namespace in turn.
pub trait Gather: Default {
    /// Takes `more` in.
    fn gather(&mut self, more: Self);
}

impl<T> Gather for Vec<T> {
    fn gather(&mut self, more: Self) {
        if self.is_empty() {
            *self = more;
        } else {
            self.extend(more);
        }
    }
}

impl Gather for OpenAtStart {
    fn gather(&mut self, more: Self) {
        self.append(more);
    }
}

impl<T> Part<Vec<T>> {
    /// All of `found` that fits in `room`.
    fn within(mut found: Vec<T>, room: &Room) -> Part<Vec<T>> {
        let before = found.len();
        found.retain(|_| room.take());
        let skipped = before - found.len();
        let kept = found.len();
        Part {
            found,
            skipped,
            whole: true,
            interrupted: false,
            kept,
        }
    }
}

/// The room left for items, shared by the namespaces read at once.
pub struct Room(std::sync::atomic::AtomicUsize);

impl Room {
    fn new(limit: usize) -> Room {
        Room(std::sync::atomic::AtomicUsize::new(limit))
    }

    /// Takes room for one item; false when none is left.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.0
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Gives back the room of `n` items taken and then not kept (a read that failed, or is
    /// read again).
    fn give(&self, n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |left| Some(left.saturating_add(n)));
    }
}

/// The most namespaces read at once by a backfill. Each sock_diag dump walks the host's
/// whole socket table (every namespace's sockets share it) under its buckets' locks: past a
/// few at once, more only contend for the same buckets and the CPUs the traced host needs.
pub const BACKFILL_WORKERS: usize = 4;

/// The namespaces read at once by `serve`'s periodic stuck-socket scan: it runs beside the
/// traced host for the whole run, so it stays light.
pub const SCAN_WORKERS: usize = 1;

/// Runs `read` in every network namespace (this process's own without entering it: that
/// needs no privilege), up to `workers` at once (at most one per CPU), and gathers what
/// each read. `read` takes room for each item it keeps that counts against the limit: the
/// namespaces read at once share it, so when the limit binds, which items are kept
/// depends on which namespace's reply reaches the room first (the namespaces are gathered
/// in their order, but read concurrently). Past `until`, the namespaces left are counted,
/// not read. A read that panics counts its namespace as unreachable.
fn everywhere<C: Gather + Send>(
    limit: usize,
    until: Option<Instant>,
    workers: usize,
    read: impl Fn(&Namespace, &Room) -> io::Result<Part<C>> + Sync,
) -> Backfill<C> {
    let namespaces = network_namespaces();
    let room = Room::new(limit);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let one = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(ns) = namespaces.get(i) else {
                return done;
            };
            let part = if until.is_some_and(|u| Instant::now() >= u) {
                None
            } else {
                // A panic (in `read`, or spawning the thread that enters the namespace)
                // would take this worker's namespaces with it: it costs this one only.
                let step = || {
                    if i == 0 {
                        read(ns, &room)
                    } else {
                        in_namespace(ns, || read(ns, &room))
                    }
                };
                Some(
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step))
                        .unwrap_or_else(|_| Err(io::Error::other("the backfill thread panicked"))),
                )
            };
            done.push((i, part));
        }
    };
    let workers = workers_for(workers, namespaces.len());
    let mut parts: Vec<(usize, Option<io::Result<Part<C>>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(one)).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    parts.sort_by_key(|(i, _)| *i);
    let mut b = Backfill {
        found: C::default(),
        namespaces: 0,
        unreachable: 0,
        first_error: None,
        skipped: 0,
        out_of_time: 0,
        interrupted: 0,
    };
    // Namespaces a worker took but whose part was lost with it (it panicked outside a
    // read): counted as unreachable, never silently dropped.
    let mut answered = vec![false; namespaces.len()];
    for (i, part) in parts {
        answered[i] = true;
        match part {
            None => b.out_of_time += 1,
            Some(Ok(part)) => {
                b.namespaces += 1;
                b.skipped += part.skipped;
                b.out_of_time += usize::from(!part.whole);
                b.interrupted += usize::from(part.interrupted);
                b.found.gather(part.found);
            }
            // Deleted, or its last process exited, since it was listed: nothing to read.
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Some(Err(e)) => {
                b.unreachable += 1;
                b.first_error
                    .get_or_insert_with(|| format!("{}: {e}", namespaces[i].path.display()));
            }
        }
    }
    let lost = answered.iter().filter(|a| !**a).count();
    if lost > 0 {
        b.unreachable += lost;
        b.first_error
            .get_or_insert_with(|| format!("{lost} namespaces lost with a backfill thread"));
    }
    b
}

/// The workers a backfill of `namespaces` runs: at most `asked`, one per CPU, one per
/// namespace; at least one.
fn workers_for(asked: usize, namespaces: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(asked)
        .min(namespaces)
        .max(1)
}

/// Every TIME_WAIT socket of every network namespace on the host (at most `limit`).
pub fn time_wait_sockets_everywhere(limit: usize) -> Backfill<Vec<DiagTimewait>> {
    everywhere(limit, None, BACKFILL_WORKERS, |ns, room| {
        let mut found = time_wait_sockets()?;
        for d in &mut found {
            d.netns = Some(ns.inode);
        }
        Ok(Part::within(found, room))
    })
}

/// The states of a full socket's connection (not listening, not yet accepted, not ended).
const OPEN_STATES: u32 = 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;

/// Every connection open now in every network namespace on the host, each with its role
/// from its namespace's listeners, and the listeners themselves (state LISTEN, `server`
/// set): at most `limit` connections (those beyond it counted in `skipped`; which are kept
/// then is said at [`everywhere`]) and every listener, sorted, each with its socket file's
/// inode (owners are looked for next: [`socket_owners`]).
pub fn connections_everywhere(limit: usize, until: Option<Instant>) -> Backfill<OpenAtStart> {
    let mut b = everywhere(limit, until, BACKFILL_WORKERS, |ns, room| {
        let listeners = Listeners::new(sockets(1 << TCP_LISTEN)?);
        // A dump the kernel flags interrupted, or that fails for want of memory, is read
        // again (its connections given back to the room first), up to DUMP_ATTEMPTS times.
        let mut attempt = 1;
        loop {
            let read = connections_in(ns, &listeners, room, until);
            let again = attempt < DUMP_ATTEMPTS
                && match &read {
                    Ok(part) => part.interrupted,
                    Err(e) => matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)),
                };
            if !again {
                return read;
            }
            if let Ok(part) = &read {
                room.give(part.kept);
            }
            attempt += 1;
        }
    });
    b.found.sort();
    b
}

/// The connections of the namespace `ns` (this thread's) with its listeners (`listeners`),
/// at most as many connections as `room` has: [`connections_everywhere`]'s read of one.
/// On an error, the room its connections took is given back.
fn connections_in(
    ns: &Namespace,
    listeners: &Listeners,
    room: &Room,
    until: Option<Instant>,
) -> io::Result<Part<OpenAtStart>> {
    let mut part = Part {
        found: OpenAtStart::default(),
        skipped: 0,
        whole: true,
        interrupted: false,
        kept: 0,
    };
    // Listeners are few, and what gives every connection its role (and accepted ones
    // their owner): all are kept, outside the limit.
    for l in &listeners.all {
        part.found.push(&Existing {
            netns: ns.inode,
            local: l.local,
            remote: l.remote,
            state: l.state,
            server: true,
            inode: l.inode,
        });
    }
    let mut interrupted = false;
    let mut whole = true;
    let mut keep = |e: Existing| {
        if room.take() {
            part.found.push(&e);
            part.kept += 1;
        } else {
            part.skipped += 1;
        }
    };
    // Streamed from the kernel's reply into what is kept (24 bytes a connection): a
    // million sockets are never held twice.
    let mut each = |s: StoredSocket| {
        let s = s.socket;
        // A timewait socket in FIN_WAIT2 (an orphan's) is listed in that state: it is
        // no connection's socket any more.
        if s.timer != TIMER_TIMEWAIT {
            keep(Existing {
                netns: ns.inode,
                local: s.local,
                remote: s.remote,
                state: s.state,
                server: listeners.on(s.local),
                inode: s.inode,
            });
        }
    };
    let mut error = None;
    for family in FAMILIES {
        match dump(family, OPEN_STATES, None, until, &mut each) {
            Ok(dumped) => {
                interrupted |= dumped.interrupted;
                if !dumped.whole {
                    whole = false;
                    break;
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    if let Some(e) = error {
        room.give(part.kept);
        return Err(e);
    }
    part.whole = whole;
    part.interrupted = interrupted;
    Ok(part)
}

/// How the owners of the sockets open at start were found.
#[derive(Clone, Debug)]
pub struct OwnersRead {
    /// Socket files whose holder was looked for (none: no pass was made).
    pub sought: usize,
    /// Processes not looked into because the time ran out.
    pub unread: usize,
    /// How long looking took.
    pub took: std::time::Duration,
    /// Found by the kernel's iterator over every task's files (else from `/proc/*/fd`).
    pub from_kernel: bool,
    /// The iterator's pass stopped part-way: the time ran out, or a read failed (`failed`).
    /// What it read before is kept.
    pub cut_short: bool,
    /// Why the iterator's pass failed part-way, if it did.
    pub failed: Option<String>,
}

/// Every connection and listener open now in every network namespace (at most `limit`
/// connections, and every listener), each with the process holding its socket: what every
/// live view starts from. Past `until` what is left is not read. `kernel` runs the kernel's
/// iterator over every task's files ([`Probe::socket_owners`]); where it cannot run (or
/// fails before its first record) the owners are read from `/proc/*/fd`.
///
/// [`Probe::socket_owners`]: crate::source::probe::Probe::socket_owners
pub fn open_everywhere(
    limit: usize,
    until: Option<Instant>,
    kernel: impl FnOnce(&mut dyn FnMut(SocketOwner) -> ControlFlow<()>) -> Result<(), String>,
) -> (Backfill<OpenAtStart>, OwnersRead) {
    let mut b = connections_everywhere(limit, until);
    let read = find_owners(&mut b.found, until, kernel);
    (b, read)
}

/// Sets the owners of `found`'s sockets: [`open_everywhere`]'s second step.
fn find_owners(
    found: &mut OpenAtStart,
    until: Option<Instant>,
    kernel: impl FnOnce(&mut dyn FnMut(SocketOwner) -> ControlFlow<()>) -> Result<(), String>,
) -> OwnersRead {
    let started = Instant::now();
    let inodes = found.inodes();
    let mut read = OwnersRead {
        sought: inodes.len(),
        unread: 0,
        took: std::time::Duration::ZERO,
        from_kernel: false,
        cut_short: false,
        failed: None,
    };
    // No socket with a file to look for (none open, or all orphans): no pass to make.
    if inodes.is_empty() {
        return read;
    }
    let mut pids = Vec::new();
    let mut comms: HashMap<u32, String> = HashMap::new();
    let (mut seen, mut cut_short) = (0u64, false);
    let pass = kernel(&mut |o| {
        seen += 1;
        if seen % OWNERS_BETWEEN_CLOCK_READS == 0 && until.is_some_and(|u| Instant::now() >= u) {
            cut_short = true;
            return ControlFlow::Break(());
        }
        if inodes.binary_search(&o.inode).is_ok() {
            pids.push((o.inode, o.pid));
            comms.entry(o.pid).or_insert_with(|| comm_name(o.comm));
        }
        ControlFlow::Continue(())
    });
    let owners = match pass {
        Ok(()) => {
            read.from_kernel = true;
            SocketOwners::of(pids, comms)
        }
        // It ran, then failed: what it read stands (the processes it did not reach are
        // not read again from /proc, which may not even see them).
        Err(why) if seen > 0 => {
            log::debug!("the socket owners' iterator failed after {seen} records: {why}");
            read.from_kernel = true;
            cut_short = true;
            read.failed = Some(why);
            SocketOwners::of(pids, comms)
        }
        Err(why) => {
            log::debug!("socket owners read from /proc/*/fd: {why}");
            socket_owners(Some(&inodes), until)
        }
    };
    found.set_owners(|inode| Some(owners.get(inode)?.0), owners.comms());
    read.unread = owners.unread;
    read.took = started.elapsed();
    read.cut_short = cut_short;
    read
}

/// A task's command as the kernel keeps it (NUL-padded bytes), as text.
fn comm_name(comm: [u64; 2]) -> String {
    let bytes: [u8; 16] = bytemuck::cast(comm);
    let n = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..n]).into_owned()
}

/// Owners read from the kernel's iterator between two looks at the clock.
const OWNERS_BETWEEN_CLOCK_READS: u64 = 4096;

/// A socket found sitting in a state, by a scan of every namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sitting {
    /// Its network namespace's inode.
    pub netns: u32,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Its state (kernel number).
    pub state: u8,
    /// Accepted from a listener (its namespace listens on its local port), else connected.
    pub server: bool,
    /// When it entered the state (CLOCK_MONOTONIC ns), from what the kernel side keeps with
    /// it; None when that does not say (it was in the state before tracing began).
    pub entered_ns: Option<u64>,
    /// Its owner as the kernel side learnt it.
    pub owner: Option<(u32, [u8; 16])>,
}

/// Every socket in `states` (bits `1 << state`) in every network namespace on the host (at
/// most `limit`), each with when it entered its state where `map` (the socket-storage map
/// of the BTF programs) says so.
pub fn sitting_everywhere(
    states: u32,
    map: Option<BorrowedFd>,
    limit: usize,
) -> Backfill<Vec<Sitting>> {
    everywhere(limit, None, SCAN_WORKERS, |ns, room| {
        let listeners = Listeners::new(sockets(1 << TCP_LISTEN)?);
        let found = stored_sockets(states, map)?;
        let found = found
            .iter()
            .filter(|s| s.socket.timer != TIMER_TIMEWAIT)
            .map(|s| {
                let d = &s.socket;
                let life = s.storage.map(|st| (st.life, st.owner));
                // The storage tells the time of the transition into this state only if that
                // transition was the last one it saw.
                let entered_ns = life
                    .filter(|(l, _)| l.last_state == d.state && l.last_ts != 0)
                    .map(|(l, _)| l.last_ts);
                let owner = life
                    .filter(|(_, o)| o.flags & u32::from(tcptrace_common::flag::OWNER_KNOWN) != 0)
                    .map(|(_, o)| (o.pid, bytemuck::cast(o.comm)));
                Sitting {
                    netns: ns.inode,
                    local: d.local,
                    remote: d.remote,
                    state: d.state,
                    server: listeners.on(d.local),
                    entered_ns,
                    owner,
                }
            })
            .collect();
        Ok(Part::within(found, room))
    })
}

/// A namespace's listening sockets, by port.
struct Listeners {
    all: Vec<DiagSocket>,
    /// Port → the addresses listened on (the unspecified one for any).
    by_port: HashMap<u16, Vec<IpAddr>>,
}

impl Listeners {
    fn new(all: Vec<DiagSocket>) -> Listeners {
        let mut by_port: HashMap<u16, Vec<IpAddr>> = HashMap::new();
        for l in &all {
            by_port
                .entry(l.local.port())
                .or_default()
                .push(l.local.ip());
        }
        Listeners { all, by_port }
    }

    /// Whether one of them listens on `local`'s port (on its address or any).
    fn on(&self, local: SocketAddr) -> bool {
        self.by_port.get(&local.port()).is_some_and(|ips| {
            ips.iter()
                .any(|ip| ip.is_unspecified() || *ip == local.ip())
        })
    }
}

/// Who holds which socket: what [`socket_owners`] found.
#[derive(Debug, Default)]
pub struct SocketOwners {
    /// (socket inode, the pid holding it), sorted by inode: 8 bytes a socket.
    pids: Vec<(u32, u32)>,
    /// Pid → its command (once per process, however many sockets it holds).
    comms: HashMap<u32, String>,
    /// Processes not read because the time ran out.
    pub unread: usize,
}

impl SocketOwners {
    /// The process holding the socket of `inode`: (pid, command).
    pub fn get(&self, inode: u32) -> Option<(u32, &str)> {
        let i = self.pids.binary_search_by_key(&inode, |p| p.0).ok()?;
        let pid = self.pids[i].1;
        Some((pid, self.comms.get(&pid).map_or("", String::as_str)))
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// The owners of `pids` ((inode, pid) pairs), with their commands (`comms`, by pid).
    fn of(mut pids: Vec<(u32, u32)>, comms: HashMap<u32, String>) -> SocketOwners {
        pids.sort_unstable();
        pids.dedup_by_key(|p| p.0);
        pids.shrink_to_fit();
        SocketOwners {
            pids,
            comms,
            unread: 0,
        }
    }

    /// Each process holding sockets, with its command.
    pub fn comms(&self) -> impl Iterator<Item = (u32, &str)> {
        self.comms.iter().map(|(pid, c)| (*pid, c.as_str()))
    }
}

/// The processes that hold the socket files of `inodes` (sorted; None: every socket),
/// read from every process's descriptors (as `ss -p` does) until `until` passes. Processes
/// are read in parallel, each descriptor with one `readlinkat` into a stack buffer: a host
/// with a million sockets has a million links to read.
pub fn socket_owners(inodes: Option<&[u32]>, until: Option<Instant>) -> SocketOwners {
    if inodes.is_some_and(<[u32]>::is_empty) {
        return SocketOwners::default();
    }
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Each thread takes the next process: a few processes may hold most sockets.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut owners = std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| owners_among(&pids, &next, inodes, until)))
            .collect();
        let mut owners = SocketOwners::default();
        for part in parts {
            let part = part.join().unwrap_or_default();
            owners.pids.extend(part.pids);
            owners.comms.extend(part.comms);
        }
        owners
    });
    // A socket shared by several processes (inherited across fork) goes to one of them.
    owners.pids.sort_unstable();
    owners.pids.dedup_by_key(|p| p.0);
    owners.pids.shrink_to_fit();
    owners.unread = pids
        .len()
        .saturating_sub(next.load(std::sync::atomic::Ordering::Relaxed));
    owners
}

/// [`socket_owners`] among the `pids` this thread takes (the next one from `next`, until
/// `until` passes): unsorted, a socket possibly more than once.
fn owners_among(
    pids: &[u32],
    next: &std::sync::atomic::AtomicUsize,
    inodes: Option<&[u32]>,
    until: Option<Instant>,
) -> SocketOwners {
    let mut owners = SocketOwners::default();
    while until.is_none_or(|u| Instant::now() < u) {
        let Some(&pid) = pids.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) else {
            break;
        };
        let mut holds = false;
        for_each_socket(pid, |inode| {
            if inodes.is_none_or(|i| i.binary_search(&inode).is_ok()) {
                owners.pids.push((inode, pid));
                holds = true;
            }
        });
        if holds {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_default();
            owners.comms.insert(pid, comm);
        }
    }
    owners
}

/// Calls `each` with the inode of every socket process `pid` holds open.
fn for_each_socket(pid: u32, mut each: impl FnMut(u32)) {
    let dir = format!("/proc/{pid}/fd");
    let Ok(fds) = std::fs::read_dir(&dir) else {
        return;
    };
    let Ok(dir) = std::fs::File::open(&dir) else {
        return;
    };
    let mut buf = [0u8; 64];
    for fd in fds.flatten() {
        let name = fd.file_name();
        let Ok(name) =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()))
        else {
            continue;
        };
        // SAFETY: a valid directory descriptor, a NUL-terminated name, and a buffer of the
        // length given; the kernel writes at most that many bytes.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        let inode = buf[..n]
            .strip_prefix(b"socket:[")
            .and_then(|t| t.strip_suffix(b"]"))
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<u32>().ok());
        if let Some(inode) = inode {
            each(inode);
        }
    }
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
#[cfg(test)]
const NLM_F_MULTI: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
/// The dump was inconsistent: the kernel's table changed under it.
const NLM_F_DUMP_INTR: u16 = 0x10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `INET_DIAG_REQ_SK_BPF_STORAGES`: the request's attribute naming storage maps.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
/// `SK_DIAG_BPF_STORAGE_REQ_MAP_FD`: one map, by descriptor.
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// The request's attributes: the nested one (4 bytes) holding a map descriptor (8).
const STORAGE_REQ_LEN: usize = 12;
/// `INET_DIAG_SK_BPF_STORAGES`: the reply's attribute holding the storages.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
/// `SK_DIAG_BPF_STORAGE`: one map's storage, nested.
const SK_DIAG_BPF_STORAGE: u16 = 1;
/// `SK_DIAG_BPF_STORAGE_MAP_VALUE`: its value.
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
/// An attribute's type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;

/// Every TIME_WAIT socket (IPv4 and IPv6) in this network namespace.
pub fn time_wait_sockets() -> io::Result<Vec<DiagTimewait>> {
    Ok(sockets(1 << TCP_TIME_WAIT)?
        .iter()
        .map(DiagSocket::timewait)
        .collect())
}

/// The TCP sockets (IPv4 and IPv6) of this network namespace in the states of `states`
/// (bits `1 << state`).
pub fn sockets(states: u32) -> io::Result<Vec<DiagSocket>> {
    collected(states, None, |s| s.socket)
}

/// [`sockets`], each with its value in the socket-storage map `map` (a map of
/// [`SockStorage`]); the kernel lets a caller with CAP_BPF (or CAP_SYS_ADMIN) read it.
pub fn stored_sockets(states: u32, map: Option<BorrowedFd>) -> io::Result<Vec<StoredSocket>> {
    collected(states, map, |s| s)
}

/// Dumps of a namespace's sockets tried, while the kernel flags them interrupted.
const DUMP_ATTEMPTS: usize = 3;

/// The sockets of both families in `states`, each as `pick` makes it: dumped again (up to
/// [`DUMP_ATTEMPTS`] times) while the kernel flags a dump interrupted, since such a dump
/// may have missed or repeated sockets.
fn collected<T>(
    states: u32,
    map: Option<BorrowedFd>,
    pick: impl Fn(StoredSocket) -> T,
) -> io::Result<Vec<T>> {
    let mut attempt = 1;
    loop {
        let mut out = Vec::new();
        let mut interrupted = false;
        for family in FAMILIES {
            interrupted |= dump(family, states, map, None, &mut |s| out.push(pick(s)))?.interrupted;
        }
        if !interrupted || attempt == DUMP_ATTEMPTS {
            if interrupted {
                log::debug!(
                    "sock_diag's dump was interrupted {DUMP_ATTEMPTS} times: kept the last"
                );
            }
            return Ok(out);
        }
        attempt += 1;
    }
}

/// The address families TCP sockets are dumped for.
const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// The ports that TCP sockets listen on in this network namespace (IPv4 and IPv6), sorted,
/// without duplicates.
pub fn listening_ports() -> io::Result<Vec<u16>> {
    let found = sockets(1 << TCP_LISTEN)?;
    let mut ports: Vec<u16> = found.iter().map(|s| s.local.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// The request for the sockets of `family` in `states`, asking for their values in `map`.
fn request(family: u8, states: u32, map: Option<BorrowedFd>) -> Vec<u8> {
    let attrs = if map.is_some() { STORAGE_REQ_LEN } else { 0 };
    let len = NLMSG_HDR + REQ_LEN + attrs;
    let mut req = vec![0u8; len];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&states.to_ne_bytes());
    if let Some(map) = map {
        // A nested INET_DIAG_REQ_SK_BPF_STORAGES holding one SK_DIAG_BPF_STORAGE_REQ_MAP_FD.
        let a = NLMSG_HDR + REQ_LEN;
        req[a..a + 2].copy_from_slice(&(STORAGE_REQ_LEN as u16).to_ne_bytes());
        req[a + 2..a + 4]
            .copy_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        req[a + 4..a + 6].copy_from_slice(&8u16.to_ne_bytes());
        req[a + 6..a + 8].copy_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        req[a + 8..a + 12].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    }
    req
}

/// How a dump ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Dumped {
    /// Read to the end of the kernel's reply (false: cut short when `until` passed).
    whole: bool,
    /// A message of the reply carried `NLM_F_DUMP_INTR`: the table changed under the dump
    /// in a way the kernel noticed, and sockets may have been missed or repeated. (The
    /// inet_diag dumps of 6.x never set it; a kernel that does is heard.)
    interrupted: bool,
}

/// Streams the sockets of `family` in the states of `states` (bits `1 << state`) to `each`,
/// with their values in `map` when asked, until the kernel's reply ends or `until` passes.
fn dump(
    family: u8,
    states: u32,
    map: Option<BorrowedFd>,
    until: Option<Instant>,
    each: &mut dyn FnMut(StoredSocket),
) -> io::Result<Dumped> {
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);

    let req = request(family, states, map);
    // SAFETY: sending our own buffer on our own socket (to the kernel: the default address).
    let sent = unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut dumped = Dumped::default();
    loop {
        // SAFETY: receiving into our own buffer. MSG_TRUNC makes the call return the
        // datagram's whole length, so one larger than the buffer is seen, not cut silently
        // (the kernel sizes its dump datagrams at most 32 KiB).
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag's reply ended before its end",
            ));
        }
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sock_diag datagram of {n} bytes overran the buffer"),
            ));
        }
        if parse(&buf[..n], each, &mut dumped.interrupted)? {
            dumped.whole = true;
            return Ok(dumped);
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(dumped);
        }
    }
}

/// Parses one datagram of netlink messages; true once the dump is complete. Sets
/// `interrupted` when a message carries `NLM_F_DUMP_INTR`.
fn parse(
    mut b: &[u8],
    each: &mut dyn FnMut(StoredSocket),
    interrupted: &mut bool,
) -> io::Result<bool> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(b[0..4].try_into().map_err(|_| bad())?) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        if len < NLMSG_HDR || len > b.len() {
            return Err(bad());
        }
        *interrupted |= flags & NLM_F_DUMP_INTR != 0;
        let payload = &b[NLMSG_HDR..len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(
                    payload
                        .get(0..4)
                        .ok_or_else(bad)?
                        .try_into()
                        .map_err(|_| bad())?,
                );
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_LEN => each(StoredSocket {
                socket: msg(payload),
                storage: storage(&payload[MSG_LEN..]),
            }),
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        b = &b[next.min(b.len())..];
    }
    Ok(false)
}

/// The attributes of a message, as (type without its flags, value), in order.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
        let ty = u16::from_ne_bytes([*b.get(2)?, *b.get(3)?]) & NLA_TYPE_MASK;
        let value = b.get(4..len)?;
        // Attributes are 4-byte aligned.
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
        Some((ty, value))
    })
}

/// The socket's storage value in a message's attributes
/// (`INET_DIAG_SK_BPF_STORAGES` → `SK_DIAG_BPF_STORAGE` → `SK_DIAG_BPF_STORAGE_MAP_VALUE`).
fn storage(attrs: &[u8]) -> Option<SockStorage> {
    let (_, storages) = attributes(attrs).find(|(t, _)| *t == INET_DIAG_SK_BPF_STORAGES)?;
    let (_, one) = attributes(storages).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = attributes(one).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    let value = value.get(..std::mem::size_of::<SockStorage>())?;
    Some(bytemuck::pod_read_unaligned(value))
}

/// One `inet_diag_msg`: family, state, timer, retrans, then `inet_diag_sockid` (ports in
/// network order, 16-byte addresses, interface, cookie), then `idiag_expires`, the queues,
/// the uid and the inode.
fn msg(p: &[u8]) -> DiagSocket {
    let family = p[0];
    let sport = u16::from_be_bytes([p[4], p[5]]);
    let dport = u16::from_be_bytes([p[6], p[7]]);
    let addr = |at: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]))
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    let word = |at: usize| u32::from_ne_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    DiagSocket {
        state: p[1],
        local: SocketAddr::new(addr(8), sport),
        remote: SocketAddr::new(addr(24), dport),
        expires_ms: word(52),
        inode: word(68),
        timer: p[2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backfill_out_of_time_reads_nothing_and_says_so() {
        let b = connections_everywhere(1000, Some(Instant::now()));
        assert!(b.found.is_empty());
        assert_eq!(b.namespaces, 0);
        assert!(
            b.out_of_time >= 1,
            "this process's namespace at least: {b:?}"
        );
        let owners = socket_owners(Some(&[1]), Some(Instant::now()));
        assert!(owners.is_empty());
        assert!(owners.unread >= 1, "this process at least");
    }

    /// A table of one connection whose socket file is `inode`.
    fn one_socket(inode: u32) -> OpenAtStart {
        let mut t = OpenAtStart::default();
        t.push(&Existing {
            netns: 1,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            state: 1,
            server: false,
            inode,
        });
        t.sort();
        t
    }

    fn record(inode: u32, pid: u32, name: &str) -> SocketOwner {
        SocketOwner {
            inode,
            pid,
            comm: bytemuck::cast(crate::model::atstart::comm(name).0),
        }
    }

    #[test]
    fn the_kernels_pass_over_owners_stops_when_the_time_is_out() {
        let mut fed = 0u64;
        let mut found = one_socket(7);
        let read = find_owners(&mut found, Some(Instant::now()), |each| {
            for inode in 1..=100_000 {
                fed += 1;
                if each(record(inode, 1, "x")).is_break() {
                    break;
                }
            }
            Ok(())
        });
        assert!(read.from_kernel && read.cut_short, "{read:?}");
        assert_eq!(
            fed, OWNERS_BETWEEN_CLOCK_READS,
            "stopped at the first look at the clock"
        );
    }

    #[test]
    fn owners_are_named_by_the_kernels_records() {
        let mut found = one_socket(7);
        // A pid no process has here: no /proc/PID/comm could name it.
        let read = find_owners(&mut found, None, |each| {
            let _ = each(record(8, 1, "other"));
            let _ = each(record(7, 4_000_000, "holder"));
            Ok(())
        });
        assert!(read.from_kernel && !read.cut_short, "{read:?}");
        let owner = found.iter().next().unwrap().owner.unwrap();
        assert_eq!(
            (owner.pid, owner.comm.as_str().into_owned()),
            (4_000_000, "holder".into())
        );
    }

    #[test]
    fn a_pass_that_fails_part_way_keeps_what_it_read() {
        let mut found = one_socket(7);
        let read = find_owners(&mut found, None, |each| {
            let _ = each(record(7, 4_000_000, "holder"));
            Err("reading the iterator: a failure".into())
        });
        assert!(read.from_kernel && read.cut_short, "{read:?}");
        assert!(read.failed.is_some());
        let owner = found.iter().next().unwrap().owner;
        assert_eq!(owner.map(|o| o.pid), Some(4_000_000), "not thrown away");
    }

    #[test]
    fn no_pass_is_made_with_no_socket_file_to_look_for() {
        // An orphan's socket has no file (inode 0).
        let mut found = one_socket(0);
        let read = find_owners(&mut found, None, |_| panic!("the kernel's pass ran"));
        assert_eq!((read.sought, read.from_kernel), (0, false), "{read:?}");
        let mut empty = OpenAtStart::default();
        find_owners(&mut empty, None, |_| panic!("the kernel's pass ran"));
    }

    #[test]
    fn the_limit_leaves_listeners_in_and_counts_the_connections_it_skips() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let b = connections_everywhere(0, None);
        let local = listener.local_addr().unwrap();
        assert!(
            b.found.iter().any(|o| o.listening() && o.local == local),
            "the listener is kept with no room left"
        );
        assert!(
            b.found.iter().all(|o| o.listening()),
            "no connection fits in no room"
        );
        assert!(b.skipped >= 2, "both ends of the connection skipped: {b:?}");
        drop(client);
    }

    #[test]
    fn room_given_back_is_taken_again() {
        let room = Room::new(2);
        assert!(room.take() && room.take());
        assert!(!room.take(), "none left");
        room.give(1);
        assert!(room.take(), "what a failed read took is there for others");
        assert!(!room.take());
        let part = Part::within(vec![1, 2, 3], &Room::new(2));
        assert_eq!((part.kept, part.skipped), (2, 1));
    }

    #[test]
    fn a_backfill_reads_a_few_namespaces_at_once() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(workers_for(BACKFILL_WORKERS, 1000), cpus.min(4));
        assert_eq!(
            workers_for(SCAN_WORKERS, 1000),
            1,
            "the periodic scan stays light"
        );
        assert_eq!(workers_for(BACKFILL_WORKERS, 1), 1);
        assert_eq!(workers_for(BACKFILL_WORKERS, 0), 1);
    }

    #[test]
    fn a_namespace_whose_read_panics_is_counted_not_lost() {
        let b: Backfill<Vec<u8>> = everywhere(
            10,
            None,
            BACKFILL_WORKERS,
            |_, _| -> io::Result<Part<Vec<u8>>> { panic!("a reader's bug") },
        );
        assert!(b.unreachable >= 1, "{b:?}");
        assert_eq!(b.namespaces, 0);
        assert!(
            b.first_error
                .as_deref()
                .is_some_and(|e| e.contains("panicked")),
            "{b:?}"
        );
    }

    #[test]
    fn listeners_serve_their_port_on_their_address_or_any() {
        let l = |a: &str| DiagSocket {
            state: TCP_LISTEN as u8,
            local: a.parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            expires_ms: 0,
            inode: 1,
            timer: 0,
        };
        let ls = Listeners::new(vec![l("10.0.0.1:80"), l("0.0.0.0:443")]);
        assert!(ls.on("10.0.0.1:80".parse().unwrap()));
        assert!(!ls.on("10.0.0.2:80".parse().unwrap()), "another address");
        assert!(ls.on("10.0.0.2:443".parse().unwrap()), "any address");
        assert!(!ls.on("10.0.0.1:8080".parse().unwrap()), "another port");
    }

    #[test]
    fn a_namespace_opens_through_a_path_that_still_leads_to_it() {
        let own = ns_inode(Path::new("/proc/self/ns/net")).expect("this process's namespace");
        let ns = Namespace {
            inode: own,
            path: PathBuf::from("/proc/4294967295/ns/net"),
            others: vec![PathBuf::from("/proc/self/ns/net")],
        };
        assert!(ns.open().is_ok(), "the second path leads to it");
        // A path that now leads elsewhere (a pid reused in another namespace) is no path to
        // it: with none left, the namespace is gone.
        let elsewhere = Namespace {
            inode: own.wrapping_add(1),
            path: PathBuf::from("/proc/self/ns/net"),
            others: vec![PathBuf::from("/run/netns/does-not-exist")],
        };
        assert_eq!(
            elsewhere.open().unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn parses_a_reply_and_its_end() {
        let mut m = vec![0u8; NLMSG_HDR + MSG_LEN];
        m[0..4].copy_from_slice(&((NLMSG_HDR + MSG_LEN) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let p = NLMSG_HDR;
        m[p] = libc::AF_INET as u8;
        m[p + 1] = 6;
        m[p + 4..p + 6].copy_from_slice(&40000u16.to_be_bytes());
        m[p + 6..p + 8].copy_from_slice(&80u16.to_be_bytes());
        m[p + 8..p + 12].copy_from_slice(&[10, 0, 0, 1]);
        m[p + 24..p + 28].copy_from_slice(&[10, 0, 0, 2]);
        m[p + 52..p + 56].copy_from_slice(&59_000u32.to_ne_bytes());
        m[p + 68..p + 72].copy_from_slice(&4242u32.to_ne_bytes());
        let mut done = vec![0u8; NLMSG_HDR + 4];
        done[0..4].copy_from_slice(&((NLMSG_HDR + 4) as u32).to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        let mut out = Vec::new();
        let mut interrupted = false;
        assert!(!parse(&m, &mut |s| out.push(s), &mut interrupted).unwrap());
        assert!(parse(&done, &mut |s| out.push(s), &mut interrupted).unwrap());
        assert!(!interrupted);
        assert_eq!(out[0].storage, None);
        assert_eq!(
            out.iter().map(|s| s.socket).collect::<Vec<_>>(),
            [DiagSocket {
                state: 6,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:80".parse().unwrap(),
                expires_ms: 59_000,
                inode: 4242,
                timer: 0,
            }]
        );
        assert!(
            parse(&m[..20], &mut |s| out.push(s), &mut interrupted).is_err(),
            "a truncated message is an error"
        );
        // A message flagged NLM_F_DUMP_INTR: the dump is said to be interrupted.
        let mut flagged = m.clone();
        flagged[6..8].copy_from_slice(&(NLM_F_MULTI | NLM_F_DUMP_INTR).to_ne_bytes());
        assert!(!parse(&flagged, &mut |s| out.push(s), &mut interrupted).unwrap());
        assert!(interrupted, "flagged");
        assert_eq!(out.len(), 2, "its socket is still read");
    }
}
