//! The analysis: events folded into conclusions — connection lifecycles and their closes
//! ([`closes`]), timewait sockets and their ends ([`timewait`]), why a connection ended
//! ([`reason`]), and the one path every view's events take ([`pipeline`]).

pub mod closes;
pub mod pipeline;
pub mod reason;
pub mod timewait;
