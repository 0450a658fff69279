//! The model: what every other layer talks about — decoded events ([`event`]), what a run
//! keeps ([`filter`]), and the cgroups sockets belong to, named ([`cgroup`]).

pub mod cgroup;
pub mod event;
pub mod filter;
pub mod netns;
