//! The analysis: events folded into conclusions, once for every view — the one path every
//! view's events take ([`pipeline`]: the kernel's filter on recordings, decoding, folding),
//! connection lifecycles and who closed them ([`closes`]), timewait sockets and their ends
//! ([`timewait`]), and why a connection ended ([`reason`]).
//!
//! Layer: above the source; it may use [`crate::model`], [`crate::shared`] and the
//! source's BTF reader (for the kernel's names of reset reasons), never the output or the
//! views. It takes events as values, so it is tested on synthetic events without root.

pub mod closes;
pub mod pipeline;
pub mod reason;
pub mod timewait;
