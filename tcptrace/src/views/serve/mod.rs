//! `tcptrace serve`: the analysis as Prometheus metrics ([`metrics`], a view like the
//! others), served over HTTP ([`http`]) as its web configuration file says ([`webconfig`]).

pub mod http;
pub mod metrics;
pub mod webconfig;
