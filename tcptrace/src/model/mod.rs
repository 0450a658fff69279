//! The model: what every other layer talks about — decoded events ([`event`]), what a run
//! keeps ([`filter`]), network namespaces as users name them ([`netns`]), the cgroups
//! sockets belong to, named ([`cgroup`]), and the sockets open when tracing began
//! ([`atstart`]).
//!
//! Layer: the bottom one, above [`crate::shared`] only; it uses nothing else in the crate.
//! It reads the host only to name things (namespace files, the cgroup2 tree).

pub mod atstart;
pub mod cgroup;
pub mod event;
pub mod filter;
pub mod netns;
