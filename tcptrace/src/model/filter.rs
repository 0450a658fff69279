//! Which events a run keeps.
//!
//! A [`Filter`] is split in two: the part the kernel applies (family, ports, states, up to
//! eight network namespaces — so filtered-out transitions never cross the ring buffer) and
//! the part only userspace can apply (process, address ranges, cgroups). On a recording both
//! parts run in userspace, through the same [`tcptrace_common::filter_keeps`] and
//! [`tcptrace_common::netns_keeps`] the eBPF program runs, so a replay keeps exactly what a
//! live run would have.

use std::{collections::HashMap, net::SocketAddr};

use ipnet::IpNet;
use tcptrace_common::{
    AF_INET, AF_INET6, Config, MAX_KERNEL_NETNS, filter_keeps, netns_keeps, port_filter,
};

use crate::{
    model::{
        cgroup::{CgroupFilter, Cgroups},
        event::{Owner, RawEvent, Reset, State, Transition},
    },
    shared::FastMap,
};

/// Everything a user can filter on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Keep transitions from or to these states (empty: all).
    pub states: Vec<State>,
    /// Keep events with either port in this list.
    pub ports: Vec<u16>,
    /// Keep events with the local port in this list.
    pub lports: Vec<u16>,
    /// Keep events with the remote port in this list.
    pub rports: Vec<u16>,
    /// Keep events whose owner has one of these process ids.
    pub pids: Vec<u32>,
    /// Keep events whose owner's command name is one of these.
    pub comms: Vec<String>,
    /// 4 or 6 (None: both).
    pub family: Option<u8>,
    /// Keep events whose local address is in one of these networks.
    pub laddrs: Vec<IpNet>,
    /// Keep events whose remote address is in one of these networks.
    pub raddrs: Vec<IpNet>,
    /// Keep MPTCP meta-socket transitions too (their TCP subflows are always kept).
    pub mptcp: bool,
    /// Keep events of sockets in these network namespaces (inode numbers).
    pub netns: Vec<u32>,
    /// Keep events of sockets in these cgroups (or below them), or these containers.
    pub cgroups: Vec<CgroupFilter>,
}

impl Filter {
    /// The in-kernel part: the program's configuration (offsets left zero for the probe to
    /// fill in) and the port sets.
    pub fn kernel(&self) -> (Config, Vec<(u16, u8)>) {
        let mut ports: HashMap<u16, u8> = HashMap::new();
        let mut active = 0u8;
        for (list, bit) in [
            (&self.lports, port_filter::LOCAL),
            (&self.rports, port_filter::REMOTE),
            (&self.ports, port_filter::ANY),
        ] {
            if !list.is_empty() {
                active |= bit;
            }
            for p in list {
                *ports.entry(*p).or_default() |= bit;
            }
        }
        let shown = self.shown_mask();
        // A timewait socket killed early for a new connection on its 4-tuple is recognised
        // by that connection's transitions (see `timewait`): asking for TIME_WAIT also
        // brings ESTABLISHED transitions from the kernel; they are not shown.
        let state_mask = if shown & (1 << State::TimeWait as u8) != 0 {
            shown | 1 << State::Established as u8
        } else {
            shown
        };
        let mut cfg = Config {
            family: match self.family {
                Some(4) => AF_INET,
                Some(6) => AF_INET6,
                _ => 0,
            },
            port_filters: active,
            mptcp: u8::from(self.mptcp),
            state_mask,
            ..Config::default()
        };
        // A few namespaces are filtered in the kernel; more are left to userspace.
        let mut netns = self.netns.clone();
        netns.sort_unstable();
        netns.dedup();
        if netns.len() <= MAX_KERNEL_NETNS {
            cfg.netns_count = netns.len() as u32;
            cfg.netns[..netns.len()].copy_from_slice(&netns);
        }
        let mut ports: Vec<(u16, u8)> = ports.into_iter().collect();
        ports.sort_unstable();
        (cfg, ports)
    }

    /// Bit `1 << state` for each state asked for (0: all).
    fn shown_mask(&self) -> u32 {
        self.states.iter().fold(0u32, |m, s| m | 1 << (*s as u8))
    }

    /// The same filter without its state part: views that follow whole connections (report)
    /// need every transition from the kernel and apply the states to connections instead.
    pub fn without_states(&self) -> Filter {
        Filter {
            states: Vec::new(),
            ..self.clone()
        }
    }

    /// Compiles the filter for fast per-event checks.
    pub fn compile(&self) -> CompiledFilter {
        let (kernel, ports) = self.kernel();
        CompiledFilter {
            kernel,
            shown_states: self.shown_mask(),
            ports: ports.into_iter().collect(),
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            laddrs: self.laddrs.clone(),
            raddrs: self.raddrs.clone(),
            netns: self.netns.clone(),
            cgroups: self.cgroups.clone(),
            names: Cgroups::none(),
        }
    }
}

/// A [`Filter`] ready to test events.
#[derive(Clone, Debug)]
pub struct CompiledFilter {
    kernel: Config,
    shown_states: u32,
    ports: FastMap<u16, u8>,
    pids: Vec<u32>,
    comms: Vec<String>,
    laddrs: Vec<IpNet>,
    raddrs: Vec<IpNet>,
    netns: Vec<u32>,
    cgroups: Vec<CgroupFilter>,
    /// Resolves cgroup ids for `cgroups`.
    names: Cgroups,
}

impl CompiledFilter {
    /// Resolves cgroup ids with `names` for the `--cgroup` filters (without it, a cgroup
    /// filter matches nothing).
    pub fn with_cgroups(mut self, names: Cgroups) -> Self {
        self.names = names;
        self
    }

    /// What the kernel would have kept (used on recordings; a no-op on live events, which
    /// the kernel already filtered the same way). Lost-event notices are always kept.
    pub fn kernel_keeps(&self, raw: &RawEvent) -> bool {
        use tcptrace_common::kind;
        // Loss notices always pass; so do timewait sockets' cancels and ends, which the kernel only
        // reports for timewait sockets whose arming passed the filter.
        if matches!(
            raw.kind,
            kind::LOST | kind::TW_CANCELLED | kind::TW_EXPIRED | kind::TW_ENDED
        ) {
            return true;
        }
        if raw.flags & tcptrace_common::flag::MPTCP != 0 && self.kernel.mptcp == 0 {
            return false;
        }
        if !netns_keeps(&self.kernel, raw.netns) {
            return false;
        }
        // A connection record is kept whatever its states (the view selects them), and its
        // second slot with its first.
        let states_apply = raw.kind != kind::CONNECTION;
        let stateless;
        let cfg = if states_apply {
            &self.kernel
        } else {
            stateless = tcptrace_common::Config {
                state_mask: 0,
                ..self.kernel
            };
            &stateless
        };
        filter_keeps(
            cfg,
            raw.family,
            raw.oldstate,
            raw.newstate,
            raw.flags,
            raw.sport,
            raw.dport,
            |p| self.ports.get(&p).copied().unwrap_or(0),
        )
    }

    /// The userspace part for a transition: process, address, namespace and cgroup filters.
    pub fn keeps(&self, t: &Transition) -> bool {
        self.keeps_parts(t.owner.as_ref(), t.local, t.remote, t.netns, t.cgroup)
    }

    /// The userspace part for a reset.
    pub fn keeps_reset(&self, r: &Reset) -> bool {
        self.keeps_parts(r.owner.as_ref(), r.local, r.remote, r.netns, r.cgroup)
    }

    /// Whether a socket found at start (no event of its own: its endpoints and namespace)
    /// is one the filter keeps, judged as the kernel and userspace parts would judge an
    /// event of it — but for the states, which the caller judges by the socket's own.
    pub fn keeps_socket(
        &self,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
        netns: Option<u32>,
    ) -> bool {
        use crate::model::event::State;
        let mut raw = crate::model::event::encode(&Transition {
            ts_ns: 0,
            skaddr: 0,
            local,
            remote,
            from: State::Established,
            to: State::Established,
            in_from_ns: None,
            owner: None,
            mptcp: false,
            netns,
            cgroup: None,
        });
        // A connection record: judged whatever its states.
        raw.kind = tcptrace_common::kind::CONNECTION;
        self.kernel_keeps(&raw) && self.keeps_parts(None, local, remote, netns, None)
    }

    /// The userspace part for anything with an owner, two endpoints, a network namespace
    /// and a cgroup (unknown ones never match a filter on them).
    pub fn keeps_parts(
        &self,
        owner: Option<&Owner>,
        local: SocketAddr,
        remote: SocketAddr,
        netns: Option<u32>,
        cgroup: Option<u64>,
    ) -> bool {
        if !self.pids.is_empty() && !owner.is_some_and(|o| self.pids.contains(&o.pid)) {
            return false;
        }
        if !self.comms.is_empty()
            && !owner.is_some_and(|o| self.comms.iter().any(|c| *c == o.comm.as_str()))
        {
            return false;
        }
        if !self.laddrs.is_empty() && !self.laddrs.iter().any(|n| n.contains(&local.ip())) {
            return false;
        }
        if !self.raddrs.is_empty() && !self.raddrs.iter().any(|n| n.contains(&remote.ip())) {
            return false;
        }
        if !self.netns.is_empty() && !netns.is_some_and(|n| self.netns.contains(&n)) {
            return false;
        }
        if !self.cgroups.is_empty() {
            let Some(name) = cgroup.and_then(|id| self.names.resolve(id)) else {
                return false;
            };
            if !self.cgroups.iter().any(|f| f.matches(&name)) {
                return false;
            }
        }
        true
    }

    /// The states asked for, bit `1 << state` (0: all). Whole-connection views apply it
    /// themselves.
    pub fn state_mask(&self) -> u32 {
        self.shown_states
    }

    /// Whether a transition is in the states asked for (the kernel may send a few more).
    pub fn shows(&self, t: &Transition) -> bool {
        self.shown_states == 0 || self.shown_states & (1 << t.from as u8 | 1 << t.to as u8) != 0
    }
}

/// Parses a `--cgroup` value against this host's cgroup2 mount (see [`CgroupFilter::parse`]).
pub fn parse_cgroup(s: &str) -> Result<CgroupFilter, String> {
    CgroupFilter::parse(s, crate::model::cgroup::cgroup2_mount().as_deref())
}

/// Parses an address or a network in CIDR notation (`10.0.0.1`, `10.0.0.0/8`, `::1`).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{s}' is neither an IP address nor a network like 10.0.0.0/8"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::event::{Comm, Owner, encode};

    fn transition(from: State, to: State, lport: u16, rport: u16, v6: bool) -> Transition {
        let (l, r) = if v6 {
            ("[fd00::1]", "[fd00::2]")
        } else {
            ("10.0.0.1", "10.0.0.2")
        };
        Transition {
            ts_ns: 1,
            skaddr: 2,
            local: format!("{l}:{lport}").parse().unwrap(),
            remote: format!("{r}:{rport}").parse().unwrap(),
            from,
            to,
            in_from_ns: None,
            owner: Some(Owner {
                pid: 42,
                comm: Comm(*b"nginx\0\0\0\0\0\0\0\0\0\0\0"),
                from_listener: false,
            }),
            mptcp: false,
            netns: Some(4026531840),
            cgroup: Some(77),
        }
    }

    #[test]
    fn time_wait_keeps_the_entries_into_time_wait() {
        let f = Filter {
            states: vec![State::TimeWait],
            ..Filter::default()
        }
        .compile();
        let entry = encode(&transition(State::FinWait2, State::TimeWait, 1, 2, false));
        let simultaneous = encode(&transition(State::Closing, State::TimeWait, 1, 2, false));
        let passive = encode(&transition(State::LastAck, State::Close, 1, 2, false));
        assert!(f.kernel_keeps(&entry));
        assert!(f.kernel_keeps(&simultaneous));
        assert!(!f.kernel_keeps(&passive));
    }

    #[test]
    fn process_and_address_filters() {
        let t = transition(State::Established, State::FinWait1, 80, 5000, false);
        let keep = |f: Filter| f.compile().keeps(&t);
        assert!(keep(Filter::default()));
        assert!(keep(Filter {
            pids: vec![42],
            ..Filter::default()
        }));
        assert!(!keep(Filter {
            pids: vec![43],
            ..Filter::default()
        }));
        assert!(keep(Filter {
            comms: vec!["nginx".into()],
            ..Filter::default()
        }));
        assert!(keep(Filter {
            laddrs: vec![parse_net("10.0.0.0/24").unwrap()],
            raddrs: vec![parse_net("10.0.0.2").unwrap()],
            ..Filter::default()
        }));
        assert!(!keep(Filter {
            raddrs: vec![parse_net("10.0.0.1").unwrap()],
            ..Filter::default()
        }));
        let mut unknown = t;
        unknown.owner = None;
        assert!(
            !Filter {
                pids: vec![42],
                ..Filter::default()
            }
            .compile()
            .keeps(&unknown),
            "an unknown owner never matches a process filter"
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("nope").unwrap_err().contains("'nope'"));
    }

    #[test]
    fn namespace_and_cgroup_filters() {
        let t = transition(State::Established, State::FinWait1, 80, 5000, false);
        let names = Cgroups::from_paths([(77, "/system.slice/nginx.service")]);
        let keep = |f: Filter, t: &Transition| f.compile().with_cgroups(names.clone()).keeps(t);
        let ns = |n: Vec<u32>| Filter {
            netns: n,
            ..Filter::default()
        };
        let cg = |s: &str| Filter {
            cgroups: vec![CgroupFilter::parse(s, None).unwrap()],
            ..Filter::default()
        };
        assert!(keep(ns(vec![1, 4026531840]), &t));
        assert!(!keep(ns(vec![1]), &t));
        assert!(keep(cg("/system.slice"), &t));
        assert!(keep(cg("/"), &t));
        assert!(!keep(cg("/user.slice"), &t));
        let mut unknown = t;
        unknown.netns = None;
        unknown.cgroup = None;
        assert!(!keep(ns(vec![4026531840]), &unknown));
        assert!(
            !keep(cg("/"), &unknown),
            "an unknown cgroup matches no filter"
        );
        let mut unresolved = t;
        unresolved.cgroup = Some(78);
        assert!(!keep(cg("/"), &unresolved));
        // Without a resolver, a cgroup filter matches nothing.
        assert!(!cg("/").compile().keeps(&t));

        // The kernel part: up to eight namespaces, on recordings too.
        let (cfg, _) = ns(vec![5, 4026531840, 5]).kernel();
        assert_eq!(cfg.netns_count, 2);
        assert_eq!(&cfg.netns[..2], &[5, 4026531840]);
        let (cfg, _) = ns((1..=9).collect()).kernel();
        assert_eq!(
            cfg.netns_count, 0,
            "too many for the kernel: userspace filters"
        );
        let compiled = ns(vec![4026531840]).compile();
        assert!(compiled.kernel_keeps(&encode(&t)));
        assert!(!compiled.kernel_keeps(&encode(&unknown)));
    }

    fn state() -> impl Strategy<Value = State> {
        proptest::sample::select(State::ALL.to_vec())
    }

    proptest! {
        /// The compiled kernel filter agrees with a direct reading of the flags' meaning.
        #[test]
        fn kernel_filter_matches_its_specification(
            from in state(), to in state(), lport in 1u16..6, rport in 1u16..6, v6: bool,
            states in proptest::collection::vec(state(), 0..3),
            ports in proptest::collection::vec(1u16..6, 0..3),
            lports in proptest::collection::vec(1u16..6, 0..3),
            rports in proptest::collection::vec(1u16..6, 0..3),
            family in proptest::option::of(prop_oneof![Just(4u8), Just(6u8)]),
        ) {
            let raw = encode(&transition(from, to, lport, rport, v6));
            // What the kernel can report: FIN_WAIT2/CLOSING→CLOSE reads as →TIME_WAIT.
            let Ok(crate::model::event::Event::Transition(t)) = crate::model::event::decode(&raw) else {
                unreachable!("encode produces transitions")
            };
            let f = Filter { states: states.clone(), ports: ports.clone(), lports: lports.clone(),
                rports: rports.clone(), family, ..Filter::default() };
            // Asking for TIME_WAIT also brings ESTABLISHED from the kernel (not shown).
            let mut sent = states.clone();
            if states.contains(&State::TimeWait) {
                sent.push(State::Established);
            }
            let in_states = |list: &[State]| list.is_empty() || list.contains(&t.from) || list.contains(&t.to);
            let expected = in_states(&sent)
                && (ports.is_empty() || ports.contains(&lport) || ports.contains(&rport))
                && (lports.is_empty() || lports.contains(&lport))
                && (rports.is_empty() || rports.contains(&rport))
                && family.is_none_or(|f| f == t.family());
            let compiled = f.compile();
            prop_assert_eq!(compiled.kernel_keeps(&raw), expected);
            prop_assert_eq!(compiled.shows(&t), in_states(&states));
        }
    }
}
