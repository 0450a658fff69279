//! tcptrace: an eBPF tracer of TCP state transitions.
//!
//! Data flows one way: a source ([`probe`] live, or [`record`] from a file) produces raw
//! events; the [`pipeline`] decodes them ([`event`]), keeps what [`filter`] asks for, and
//! folds them into closes ([`track`]) and timewait ends ([`timewait`]) — once, for every view;
//! a [`view`] renders ([`output`]) or aggregates them; [`cgroup`] names the cgroups sockets
//! belong to. Only
//! [`probe`] touches the kernel, so everything else is tested on synthetic or recorded
//! events without root.
pub mod analysis;
pub mod app;
pub mod cli;
pub mod model;
pub mod output;
pub mod shared;
pub mod source;
pub mod views;
