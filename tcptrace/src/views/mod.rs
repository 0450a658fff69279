//! The views: what each subcommand makes of the analysed events — the live stream
//! ([`stream`]), who closes first ([`report`], [`top`]), time in each state ([`hist`]), the
//! TIME_WAIT population ([`timewait`]), local ports ([`ports`]), stuck sockets ([`stuck`]),
//! the settings judged ([`doctor`]) and Prometheus metrics ([`serve`]).

pub mod doctor;
pub mod hist;
pub mod ports;
pub mod report;
pub mod serve;
pub mod stream;
pub mod stuck;
pub mod timewait;
pub mod top;

pub use stream::{Flow, Interval, View};
