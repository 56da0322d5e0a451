//! `cotal-driver-sim`: the deterministic simulator driver.
//!
//! A seeded, single-threaded model of exactly the NATS features the core machines use, executing
//! the effect vocabulary of [`cotal_core::io`] unchanged:
//!
//! - [`broker`]: the server model: JetStream streams, durable pull consumers, KV buckets;
//! - [`net`]: clients, connections and permissions: core subscriptions with asynchronous
//!   refusals, request/reply, connection loss, and the execution of every [`cotal_core::io::Command`];
//! - [`sched`]: the virtual clock, the seeded chooser and the fault knobs;
//! - [`host`]: runs any number of [`cotal_core::io::Machine`]s on the model and records a
//!   transcript whose hash is the determinism check.
//!
//! The oracle and the `cotal-sim` binary come later and build on these.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod host;
pub mod net;
pub mod sched;
pub mod script;
