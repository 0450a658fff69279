//! What was open when tracing began, kept compact: a busy host may have a million
//! connections, and every live view starts by reading them all (their role, their owner,
//! the ports they hold).
//!
//! Each connection takes 24 bytes (IPv4) or 48 (IPv6) in a vector sorted by its endpoints,
//! found by binary search — against more than 200 in a hash map of socket addresses with
//! owners. The process holding a socket is kept as its pid; each command name once per
//! process. A connection taken out when it closes is marked, and the marked ones dropped
//! once they outnumber those left: the table shrinks as the connections close.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::model::event::{Comm, Owner};

/// A socket that was open when tracing began, as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Existing {
    /// Its network namespace's inode.
    pub netns: u32,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Its state then (kernel number).
    pub state: u8,
    /// Accepted from a listener: its namespace listens on its local port (on its address
    /// or any). Otherwise it connected. Listeners have it set.
    pub server: bool,
    /// The inode of its socket file (0: none, an orphan), for its owner.
    pub inode: u32,
}

impl Existing {
    /// A listening socket, not a connection.
    pub fn listening(&self) -> bool {
        self.state == tcptrace_common::state::LISTEN
    }
}

/// One socket open at start, as the views read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    /// Its network namespace's inode.
    pub netns: u32,
    /// Local endpoint.
    pub local: SocketAddr,
    /// Remote endpoint.
    pub remote: SocketAddr,
    /// Its state then (kernel number).
    pub state: u8,
    /// Accepted from a listener (or a listener itself), else connected.
    pub server: bool,
    /// The process that held its socket then.
    pub owner: Option<Owner>,
}

impl Open {
    /// A listening socket, not a connection.
    pub fn listening(&self) -> bool {
        self.state == tcptrace_common::state::LISTEN
    }
}

/// Endpoints, in the order entries are sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key<A> {
    netns: u32,
    local: A,
    remote: A,
    local_port: u16,
    remote_port: u16,
}

/// What is kept of a socket: its endpoints and 6 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry<A> {
    key: Key<A>,
    /// Its socket file's inode while owners are looked for, then the holding pid
    /// ([`entry_flag::OWNED`]).
    holder: u32,
    state: u8,
    flags: u8,
}

/// [`Entry::flags`].
mod entry_flag {
    /// Accepted from a listener, or a listener.
    pub const SERVER: u8 = 1;
    /// `holder` is the pid of its owner.
    pub const OWNED: u8 = 2;
    /// Taken by [`super::OpenAtStart::take`]: closed since.
    pub const TAKEN: u8 = 4;
}

/// An address family's bytes as kept.
trait Addr: Copy + Ord {
    fn of(ip: IpAddr) -> Option<Self>;
    fn ip(self) -> IpAddr;
}

impl Addr for [u8; 4] {
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self).into()
    }
}

impl Addr for [u8; 16] {
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }
    }
    fn ip(self) -> IpAddr {
        Ipv6Addr::from(self).into()
    }
}

impl<A: Addr> Key<A> {
    /// The key of two endpoints of this family; None for the other family's.
    fn of(netns: u32, local: SocketAddr, remote: SocketAddr) -> Option<Self> {
        Some(Key {
            netns,
            local: A::of(local.ip())?,
            remote: A::of(remote.ip())?,
            local_port: local.port(),
            remote_port: remote.port(),
        })
    }
}

/// One address family's sockets, sorted by their keys once all are in.
#[derive(Debug)]
struct Table<A> {
    entries: Vec<Entry<A>>,
    /// Entries marked taken, still in `entries`.
    taken: usize,
}

impl<A> Default for Table<A> {
    fn default() -> Self {
        Table {
            entries: Vec::new(),
            taken: 0,
        }
    }
}

impl<A: Addr> Table<A> {
    fn sort(&mut self) {
        self.entries.sort_unstable_by_key(|e| e.key);
        self.entries.dedup_by_key(|e| e.key);
        self.entries.shrink_to_fit();
        self.taken = self
            .entries
            .iter()
            .filter(|e| e.flags & entry_flag::TAKEN != 0)
            .count();
    }

    /// Takes the entry of `key`, not taken yet: (state, flags, holder). Once fewer than
    /// half the entries are left, the taken ones are dropped and the memory given back:
    /// each drop costs a pass over what is left, after as many takes as there are left,
    /// so a take costs O(1) amortised (and the binary search's order stays).
    fn take(&mut self, key: &Key<A>) -> Option<(u8, u8, u32)> {
        let i = self.entries.binary_search_by(|e| e.key.cmp(key)).ok()?;
        let e = &mut self.entries[i];
        if e.flags & entry_flag::TAKEN != 0 {
            return None;
        }
        e.flags |= entry_flag::TAKEN;
        let got = (e.state, e.flags, e.holder);
        self.taken += 1;
        if 2 * self.taken > self.entries.len() {
            self.compact();
        }
        Some(got)
    }

    /// Drops the taken entries.
    fn compact(&mut self) {
        self.entries.retain(|e| e.flags & entry_flag::TAKEN == 0);
        self.entries.shrink_to_fit();
        self.taken = 0;
    }

    /// The entries not taken.
    fn live(&self) -> impl Iterator<Item = &Entry<A>> {
        self.entries
            .iter()
            .filter(|e| e.flags & entry_flag::TAKEN == 0)
    }
}

/// The sockets open at start in every namespace: connections and listeners.
#[derive(Debug, Default)]
pub struct OpenAtStart {
    v4: Table<[u8; 4]>,
    v6: Table<[u8; 16]>,
    /// Pid → command, for the pids that hold sockets here.
    comms: HashMap<u32, Comm>,
    /// Entries not taken.
    live: usize,
}

impl OpenAtStart {
    /// Adds a socket (its `inode` kept until [`Self::set_owners`]); call [`Self::sort`]
    /// after the last.
    pub fn push(&mut self, e: &Existing) {
        let flags = if e.server { entry_flag::SERVER } else { 0 };
        let (holder, state) = (e.inode, e.state);
        if let Some(key) = Key::of(e.netns, e.local, e.remote) {
            self.v4.entries.push(Entry {
                key,
                holder,
                state,
                flags,
            });
        } else if let Some(key) = Key::of(e.netns, e.local, e.remote) {
            self.v6.entries.push(Entry {
                key,
                holder,
                state,
                flags,
            });
        } else {
            return;
        }
        self.live += 1;
    }

    /// Sorts what was pushed, for lookups (a socket listed twice is kept once).
    pub fn sort(&mut self) {
        self.v4.sort();
        self.v6.sort();
        self.live = self.v4.entries.len() + self.v6.entries.len();
    }

    /// The socket files' inodes (sorted, each once; 0 for none left out), while no owner
    /// is set.
    pub fn inodes(&self) -> Vec<u32> {
        let mut all: Vec<u32> = (self.v4.entries.iter().map(|e| e.holder))
            .chain(self.v6.entries.iter().map(|e| e.holder))
            .filter(|&i| i != 0)
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Puts the process holding each socket (`pid_of` its inode) in place of its inode;
    /// `comms` names those processes.
    pub fn set_owners<'a>(
        &mut self,
        pid_of: impl Fn(u32) -> Option<u32>,
        comms: impl Iterator<Item = (u32, &'a str)>,
    ) {
        fn each<A>(entries: &mut [Entry<A>], pid_of: &impl Fn(u32) -> Option<u32>) {
            for e in entries
                .iter_mut()
                .filter(|e| e.flags & entry_flag::OWNED == 0)
            {
                if let Some(pid) = pid_of(e.holder) {
                    e.holder = pid;
                    e.flags |= entry_flag::OWNED;
                }
            }
        }
        each(&mut self.v4.entries, &pid_of);
        each(&mut self.v6.entries, &pid_of);
        // Added to the names known already (a table appended, or owners set in passes).
        self.comms.extend(comms.map(|(pid, c)| (pid, comm(c))));
    }

    /// Takes in `more`, its owners' names with it (unsorted: [`Self::sort`] after the
    /// last).
    pub fn append(&mut self, mut more: OpenAtStart) {
        fn add<A>(to: &mut Table<A>, more: &mut Table<A>) {
            if to.entries.is_empty() {
                std::mem::swap(&mut to.entries, &mut more.entries);
            } else {
                to.entries.append(&mut more.entries);
            }
            to.taken += more.taken;
        }
        add(&mut self.v4, &mut more.v4);
        add(&mut self.v6, &mut more.v6);
        if self.comms.is_empty() {
            self.comms = more.comms;
        } else {
            self.comms.extend(more.comms);
        }
        self.live += more.live;
    }

    /// The connection of these endpoints, taken out (its close has come): at most once.
    pub fn take(
        &mut self,
        netns: Option<u32>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<Open> {
        let netns = netns?;
        let (state, flags, holder) = if let Some(key) = Key::of(netns, local, remote) {
            self.v4.take(&key)?
        } else {
            self.v6.take(&Key::of(netns, local, remote)?)?
        };
        self.live -= 1;
        Some(self.open(netns, local, remote, state, flags, holder))
    }

    /// Every socket not taken.
    pub fn iter(&self) -> impl Iterator<Item = Open> + '_ {
        let v4 = self.v4.live().map(|e| self.entry(e));
        let v6 = self.v6.live().map(|e| self.entry(e));
        v4.chain(v6)
    }

    /// Keeps only the sockets `keep` says.
    pub fn retain(&mut self, mut keep: impl FnMut(&Open) -> bool) {
        let mut v4 = std::mem::take(&mut self.v4.entries);
        v4.retain(|e| e.flags & entry_flag::TAKEN == 0 && keep(&self.entry(e)));
        v4.shrink_to_fit();
        let mut v6 = std::mem::take(&mut self.v6.entries);
        v6.retain(|e| e.flags & entry_flag::TAKEN == 0 && keep(&self.entry(e)));
        v6.shrink_to_fit();
        (self.v4.entries, self.v6.entries) = (v4, v6);
        (self.v4.taken, self.v6.taken) = (0, 0);
        self.live = self.v4.entries.len() + self.v6.entries.len();
    }

    /// A copy of the sockets `keep` says.
    pub fn filtered(&self, mut keep: impl FnMut(&Open) -> bool) -> OpenAtStart {
        fn some<A: Addr>(
            all: &OpenAtStart,
            t: &Table<A>,
            keep: &mut impl FnMut(&Open) -> bool,
        ) -> Table<A> {
            Table {
                entries: t.live().filter(|e| keep(&all.entry(e))).copied().collect(),
                taken: 0,
            }
        }
        let (v4, v6) = (
            some(self, &self.v4, &mut keep),
            some(self, &self.v6, &mut keep),
        );
        let live = v4.entries.len() + v6.entries.len();
        OpenAtStart {
            v4,
            v6,
            comms: self.comms.clone(),
            live,
        }
    }

    /// Sockets not taken.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes held (for the bench and the tests' bounds).
    pub fn heap_bytes(&self) -> usize {
        self.v4.entries.capacity() * size_of::<Entry<[u8; 4]>>()
            + self.v6.entries.capacity() * size_of::<Entry<[u8; 16]>>()
            + self.comms.capacity() * size_of::<(u32, Comm)>()
    }

    fn entry<A: Addr>(&self, e: &Entry<A>) -> Open {
        let k = &e.key;
        let local = SocketAddr::new(k.local.ip(), k.local_port);
        let remote = SocketAddr::new(k.remote.ip(), k.remote_port);
        self.open(k.netns, local, remote, e.state, e.flags, e.holder)
    }

    fn open(
        &self,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        state: u8,
        flags: u8,
        holder: u32,
    ) -> Open {
        let owner = (flags & entry_flag::OWNED != 0).then(|| Owner {
            pid: holder,
            comm: self.comms.get(&holder).copied().unwrap_or(Comm([0; 16])),
            from_listener: false,
        });
        Open {
            netns,
            local,
            remote,
            state,
            server: flags & entry_flag::SERVER != 0,
            owner,
        }
    }
}

/// Sockets with their owners, sorted (for tests and recordings of synthetic hosts).
impl FromIterator<(Existing, Option<Owner>)> for OpenAtStart {
    fn from_iter<I: IntoIterator<Item = (Existing, Option<Owner>)>>(iter: I) -> Self {
        let mut all = OpenAtStart::default();
        // Each socket's inode is its place in the list: its owner's index.
        let mut owners: Vec<Option<Owner>> = Vec::new();
        for (mut e, owner) in iter {
            owners.push(owner);
            e.inode = u32::try_from(owners.len()).unwrap_or(u32::MAX);
            all.push(&e);
        }
        all.sort();
        let names: Vec<(u32, String)> = owners
            .iter()
            .flatten()
            .map(|o| (o.pid, o.comm.as_str().into_owned()))
            .collect();
        all.set_owners(
            |inode| Some(owners.get(inode as usize - 1).copied()??.pid),
            names.iter().map(|(p, c)| (*p, c.as_str())),
        );
        all
    }
}

/// A command name as the kernel keeps it: at most 15 bytes, NUL-padded to 16.
pub fn comm(name: &str) -> Comm {
    let mut c = [0u8; 16];
    let n = name.len().min(15);
    c[..n].copy_from_slice(&name.as_bytes()[..n]);
    Comm(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(local: &str, remote: &str, netns: u32, server: bool) -> Existing {
        Existing {
            netns,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: tcptrace_common::state::ESTABLISHED,
            server,
            inode: 0,
        }
    }

    fn owner(pid: u32, name: &str) -> Option<Owner> {
        Some(Owner {
            pid,
            comm: comm(name),
            from_listener: false,
        })
    }

    #[test]
    fn takes_each_connection_once_with_its_role_and_owner() {
        let mut all: OpenAtStart = [
            (
                existing("10.0.0.1:80", "10.0.0.2:5000", 7, true),
                owner(10, "nginx"),
            ),
            (existing("[::1]:6379", "[::1]:40000", 7, true), None),
            (
                existing("10.0.0.2:5000", "10.0.0.1:80", 8, false),
                owner(11, "curl"),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(all.len(), 3);
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        assert_eq!(all.take(Some(8), a, b), None, "other endpoints' order");
        assert_eq!(all.take(None, a, b), None, "no namespace: none");
        let got = all.take(Some(7), a, b).unwrap();
        assert!(got.server);
        assert_eq!(got.owner, owner(10, "nginx"));
        assert_eq!(all.take(Some(7), a, b), None, "taken once");
        let v6 = all
            .take(
                Some(7),
                "[::1]:6379".parse().unwrap(),
                "[::1]:40000".parse().unwrap(),
            )
            .unwrap();
        assert_eq!((v6.server, v6.owner), (true, None));
        assert_eq!(all.len(), 1);
        let left: Vec<Open> = all.iter().collect();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].local, left[0].remote), (b, a));
        assert_eq!(left[0].owner, owner(11, "curl"));
    }

    #[test]
    fn keeps_what_is_asked_and_copies_a_part() {
        let mut all: OpenAtStart = (0..100u16)
            .map(|p| {
                let local = format!("127.0.0.1:{}", 1000 + p);
                (
                    existing(&local, "127.0.0.1:80", 1, false),
                    owner(u32::from(p), "c"),
                )
            })
            .collect();
        let even = all.filtered(|o| o.local.port() % 2 == 0);
        assert_eq!(even.len(), 50);
        assert!(even.iter().all(|o| o.local.port() % 2 == 0));
        all.retain(|o| o.local.port() < 1010);
        assert_eq!(all.len(), 10);
        assert!(all.heap_bytes() >= 10 * 24);
    }

    #[test]
    fn taken_entries_are_dropped_once_fewer_than_half_are_left() {
        let conn = |p: u16| {
            let local = format!("127.0.0.1:{}", 1000 + p);
            existing(&local, "127.0.0.1:80", 1, false)
        };
        let mut all: OpenAtStart = (0..100u16).map(|p| (conn(p), owner(7, "c"))).collect();
        let full = all.heap_bytes();
        let take = |all: &mut OpenAtStart, p: u16| {
            let e = conn(p);
            all.take(Some(1), e.local, e.remote)
        };
        for p in 0..50 {
            assert!(take(&mut all, p).is_some());
        }
        assert_eq!(
            all.v4.entries.len(),
            100,
            "half left: marked, not dropped yet"
        );
        assert!(take(&mut all, 50).is_some());
        assert_eq!(all.v4.entries.len(), 49, "fewer than half left: dropped");
        assert!(all.heap_bytes() < full, "and the memory given back");
        assert_eq!(all.len(), 49);
        // Lookups still find what is left, and only that.
        assert_eq!(take(&mut all, 10), None, "taken before the drop");
        assert_eq!(take(&mut all, 99).unwrap().owner, owner(7, "c"));
        let left: Vec<u16> = all.iter().map(|o| o.local.port() - 1000).collect();
        assert_eq!(left, (51..99).collect::<Vec<_>>());
        // Down to none: every take costs a constant amortised.
        for p in 51..99 {
            assert!(take(&mut all, p).is_some());
        }
        assert!(all.is_empty());
        assert_eq!(all.v4.entries.capacity(), 0);
    }

    #[test]
    fn appended_tables_keep_their_owners_names() {
        let mut a: OpenAtStart = [(
            existing("10.0.0.1:80", "10.0.0.2:5000", 7, true),
            owner(10, "nginx"),
        )]
        .into_iter()
        .collect();
        let b: OpenAtStart = [(
            existing("10.0.0.2:5000", "10.0.0.1:80", 8, false),
            owner(11, "curl"),
        )]
        .into_iter()
        .collect();
        a.append(b);
        a.sort();
        let names: Vec<_> = a.iter().map(|o| o.owner).collect();
        assert!(names.contains(&owner(10, "nginx")), "{names:?}");
        assert!(names.contains(&owner(11, "curl")), "{names:?}");
        // Owners set in a second pass add their names to those known.
        a.push(&Existing {
            inode: 99,
            ..existing("10.0.0.3:1", "10.0.0.4:2", 9, false)
        });
        a.sort();
        a.set_owners(|i| (i == 99).then_some(12), [(12, "redis")].into_iter());
        let names: Vec<_> = a.iter().map(|o| o.owner).collect();
        assert!(names.contains(&owner(10, "nginx")), "kept: {names:?}");
        assert!(names.contains(&owner(12, "redis")), "{names:?}");
    }

    #[test]
    fn an_ipv4_connection_takes_24_bytes() {
        assert_eq!(size_of::<Entry<[u8; 4]>>(), 24);
        assert_eq!(size_of::<Entry<[u8; 16]>>(), 48);
    }
}
