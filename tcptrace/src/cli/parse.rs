//! The command line's value parsers: each turns one flag's text into its value or says,
//! naming the offending value, why it cannot.

use std::time::Duration;

use crate::{
    model::event::{State, parse_state as parse_state_name},
    source::probe::{MIN_RING_BYTES, ring_bytes_valid},
};

pub(super) fn parse_state(s: &str) -> Result<State, String> {
    parse_state_name(s).map_err(|e| {
        let names: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
        format!("{e}; states are {}", names.join(", "))
    })
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30s, 5m or 1h30m ({e})"))?;
    if d.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(d)
}

pub(super) fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
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

pub(super) fn parse_max_sockets(s: &str) -> Result<usize, String> {
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

pub(super) fn parse_ring_size(s: &str) -> Result<u32, String> {
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
