//! What every layer shares: the hash map every table uses, the bound on how many sockets a
//! table follows and how the oldest are evicted past it, and the units of time.
//!
//! Uses nothing else in the crate; every layer may use it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::OnceLock,
};

/// A hash map with a fast, per-process randomly seeded hasher (foldhash): the analysis
/// looks up every event, and SipHash was a tenth of the stream's CPU time; the seed keeps
/// crafted remote addresses from colliding on purpose.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Eight bytes that stand for a connection: its 4-tuple in namespace `netns` (0: none
/// known). The addresses are hashed as integers — one per address, and one for both ports
/// and the namespace — not through `SocketAddr`'s `Hash` (a discriminant, a length-prefixed
/// byte slice and a port each), which took most of a lookup's time. Seeded once per
/// process, as [`FastMap`] is, so that crafted addresses cannot be made to collide on
/// purpose; two connections share a digest with a chance of 2^-64, and who keys by it
/// checks the connection itself on use.
pub fn tuple_digest(netns: u32, local: SocketAddr, remote: SocketAddr) -> u64 {
    use std::hash::BuildHasher;
    static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    let bits = |a: SocketAddr| match a.ip() {
        // Apart from the IPv6-mapped form, which an IPv6 socket's IPv4 peer takes: the two
        // never meet in one table's lookups, which compare the addresses themselves.
        IpAddr::V4(ip) => u128::from(ip.to_bits()),
        IpAddr::V6(ip) => ip.to_bits(),
    };
    let rest =
        (u64::from(netns) << 32) | (u64::from(local.port()) << 16) | u64::from(remote.port());
    SEED.get_or_init(Default::default)
        .hash_one((bits(local), bits(remote), rest))
}

/// The default number of sockets followed at once (`--max-sockets`).
pub const DEFAULT_MAX_SOCKETS: usize = 1 << 20;

/// From `sample` (times of a random sample of `len` items), the time at or below which
/// about `want` of them lie: evicting those drops the oldest `want`, give or take the sample's
/// error (small tables are sampled whole, so exactly).
pub(crate) fn eviction_threshold(mut sample: Vec<u64>, want: usize, len: usize) -> u64 {
    if sample.is_empty() {
        return 0;
    }
    sample.sort_unstable();
    let idx = (want * sample.len() / len.max(1)).saturating_sub(1);
    sample[idx.min(sample.len() - 1)]
}

/// Nanoseconds in a millisecond.
pub const NS_PER_MS: u64 = 1_000_000;
/// Nanoseconds in a second: events' times and every duration are in nanoseconds.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// `ns` in seconds, for rates and for metrics in seconds.
pub fn ns_to_secs(ns: u64) -> f64 {
    ns as f64 / NS_PER_SEC as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_digest_tells_apart_what_a_table_keys_on() {
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let key = tuple_digest(7, a, b);
        assert_eq!(key, tuple_digest(7, a, b), "the same every time");
        assert_ne!(key, tuple_digest(7, b, a), "the direction");
        assert_ne!(key, tuple_digest(8, a, b), "the namespace");
        let other_port: SocketAddr = "10.0.0.1:40001".parse().unwrap();
        assert_ne!(key, tuple_digest(7, other_port, b), "a port");
        let v6: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        assert_ne!(key, tuple_digest(7, v6, b), "another address");
        // Lookups compare the addresses themselves, which tell these apart: so do digests.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:40000".parse().unwrap();
        assert_ne!(key, tuple_digest(7, mapped, b), "the IPv6-mapped form");
    }
}
