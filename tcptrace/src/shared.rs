//! What every layer shares: the hash map every table uses, the bound on how many sockets a
//! table follows and how the oldest are evicted past it, and the units of time.
//!
//! Uses nothing else in the crate; every layer may use it.

use std::collections::HashMap;

/// A hash map with a fast, per-process randomly seeded hasher (foldhash): the analysis
/// looks up every event, and SipHash was a tenth of the stream's CPU time; the seed keeps
/// crafted remote addresses from colliding on purpose.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Eight bytes that stand for `value` (the same in every run): a table keyed by them
/// hashes and compares a word instead of, say, two socket addresses. Two values share one
/// with a chance of 2^-64; who keys by it says what that costs.
pub fn digest(value: impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(value)
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
