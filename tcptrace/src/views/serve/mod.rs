//! `tcptrace serve`: the analysis as Prometheus metrics ([`metrics`], a view like the
//! others), served over HTTP on a thread of its own ([`http`]), as its web configuration
//! file says ([`webconfig`]: TLS, basic authentication).

pub mod http;
pub mod metrics;
pub mod webconfig;
