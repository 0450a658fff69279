//! The sources: where raw events and the host's facts come from — the live probe
//! ([`probe`]), recordings ([`record`]), the kernel's BTF ([`btf`]), sock_diag ([`diag`]),
//! and the preflight of `tcptrace check` ([`check`]).

pub mod btf;
pub mod check;
pub mod diag;
pub mod host;
pub mod offsets;
pub mod probe;
pub mod record;
pub mod tracefs;
