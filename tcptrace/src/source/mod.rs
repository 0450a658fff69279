//! The sources: where raw events and the host's facts come from.
//!
//! - [`probe`]: the live source — the kernel programs loaded, configured, attached and
//!   drained — with what it reads to configure them: tracepoint formats from [`tracefs`],
//!   struct offsets from the kernel's BTF ([`offsets`], through the [`btf`] reader), and
//!   [`host`] facts (clocks, capabilities, kernel symbols);
//! - [`record`]: recordings, the raw events in a file;
//! - [`diag`]: the sockets that exist now, from sock_diag in every network namespace;
//! - [`check`]: `tcptrace check`, can this host run tcptrace.
//!
//! Layer: above the model; it may use [`crate::model`] (the events it hands out) and
//! [`crate::shared`], nothing above. What it produces is a raw event, exactly what a
//! recording holds, or a plain fact, so every layer above runs the same live and on a
//! recording.

pub mod btf;
pub mod check;
pub mod diag;
pub mod host;
pub mod offsets;
pub mod probe;
pub mod record;
pub mod tracefs;
