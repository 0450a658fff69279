//! tcptrace: an eBPF tracer of TCP state transitions.
//!
//! The tree is the architecture. Events flow one way: a [`source`] produces raw events (the
//! live probe, or a recording); the [`analysis`] decodes them into the [`model`]'s events,
//! keeps what the filter asks for and folds them into closes and timewait ends — once, for
//! every view; the [`views`] aggregate what it concluded and render it through the
//! [`output`]; [`cli`] and [`app`] wire a source to a view.
//!
//! ```text
//! source ──raw events──▶ analysis ──events, closes, exits──▶ views ──▶ output
//!                  (model: event, filter, netns, cgroup)
//! ```
//!
//! Each layer uses only those before it in this list, never one after it:
//! - [`shared`]: the hash map, the socket bound and the units of time every layer uses;
//! - [`model`]: decoded events, the filter, network namespaces and cgroups, named;
//! - [`source`]: the live probe (the kernel programs loaded, configured, attached and
//!   drained), recordings, tracefs, the kernel's BTF, host facts and sock_diag;
//! - [`analysis`]: the pipeline every view's events take, closes and who made them,
//!   timewait sockets and their ends, why a connection ended;
//! - [`output`]: text and JSON, the order lines are written in, what every view's output
//!   shares;
//! - [`views`]: one per subcommand — stream, report, top, hist, timewait, ports, stuck,
//!   doctor, serve (a view may use another's parts);
//! - [`cli`] and [`app`]: the command line, and the run that drives a source into a view.
//!
//! Only the source loads programs into the kernel and reads its events; the analysis and
//! the views take events and facts as values, so they are tested on synthetic events and
//! recordings without root.
pub mod analysis;
pub mod app;
pub mod cli;
pub mod model;
pub mod output;
pub mod shared;
pub mod source;
pub mod views;
