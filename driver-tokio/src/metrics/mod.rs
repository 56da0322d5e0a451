//! Metrics for a monitoring system: `cotal delivery --metrics ADDR` and `cotal agent --metrics
//! ADDR` serve them as OpenMetrics text (`prometheus-client`) on `http://ADDR/metrics`.
//!
//! - [`DaemonMetrics`]: a delivery daemon's counters as the core keeps them
//!   ([`DeliveryCounters`](cotal_core::delivery::daemon::DeliveryCounters), read at each scrape
//!   through [`DaemonStatus`](crate::app::DaemonStatus)), its health, lease and feeds; and what
//!   only the driver can see: join and leave latencies, from a control request's arrival (an
//!   input tap, [`DeliveryDaemon::start_tapped`](crate::app::DeliveryDaemon::start_tapped)) to
//!   the event that answers it;
//! - [`AgentMetrics`]: an agent's health counters
//!   ([`AgentHealth`](cotal_core::agent::AgentHealth): its own and its ledger's), losses
//!   reported to it, connection, and each channel's backstop;
//! - [`serve`]: a minimal HTTP/1.1 responder on a tokio `TcpListener` for `GET /metrics`
//!   (bounded request size and time, one task per connection, a bounded number at once).

mod agent;
mod daemon;
mod http;
mod shared;

pub use agent::AgentMetrics;
pub use daemon::DaemonMetrics;
pub use http::{CONTENT_TYPE, MAX_REQUEST_BYTES, Render, serve};
