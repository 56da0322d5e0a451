//! `cotal-driver-sim`: the deterministic simulator driver.
//!
//! A seeded, single-threaded model of exactly the NATS features the core machines use, executing
//! the effect vocabulary of [`cotal_core::io`] unchanged, so a machine runs here as it runs on the
//! tokio driver:
//!
//! - [`broker`]: the server model: JetStream streams, durable pull consumers, KV buckets (rules
//!   from `shared/spec/nats-notes.md`);
//! - [`net`]: clients, connections and permissions: core subscriptions with asynchronous
//!   refusals, request/reply, connection loss, and the execution of every
//!   [`cotal_core::io::Command`];
//! - [`sched`]: the virtual clock, the seeded chooser, FIFO lanes and the fault knobs;
//! - [`host`]: runs any number of [`cotal_core::io::Machine`]s on the model and records a
//!   transcript whose hash is the determinism check;
//! - [`script`]: a scripted machine for tests.
//!
//! - [`mesh`]: a provisioned space with agents (and delivery daemons), a seeded workload, and the
//!   ground-truth journal;
//! - [`oracle`]: the invariants checked after every step and after the heal phase;
//! - [`explore`]: seeds, replay, determinism and shrinking, behind the `cotal-sim` binary;
//! - [`demo`]: the demo mesh (`cotal-sim demo`).
//!
//! ```
//! use cotal_core::io::{Command, Input, Inbound, SubId};
//! use cotal_core::op::OpId;
//! use cotal_core::time::Instant;
//! use cotal_core::wire::config::SpaceConfig;
//! use cotal_core::wire::permissions::Permissions;
//! use cotal_core::wire::token::Space;
//! use cotal_driver_sim::host::{Host, hosted};
//! use cotal_driver_sim::sched::{FaultConfig, SimConfig};
//! use cotal_driver_sim::script::Script;
//!
//! let config = SimConfig::new(42).with_faults(FaultConfig::chaos(), Instant::from_millis(1_000));
//! let mut host = Host::new(config, false);
//! let space = Space::new("main").expect("a valid space");
//! host.broker_mut().provision(&SpaceConfig::new(&space)).expect("fresh broker");
//! let script = Script::new().at(5, Command::Subscribe {
//!     op: OpId::from_raw(1),
//!     sub: SubId::from_raw(1),
//!     subject: "cotal.main.chat.>".into(),
//! });
//! let log = script.log();
//! host.add_machine("watcher", Permissions::default(), hosted(script, |event| event));
//! let stats = host.run_until(Instant::from_millis(5_000));
//! assert!(!stats.exhausted);
//! assert!(!log.borrow().is_empty());
//! println!("transcript hash {:016x}", host.transcript().hash());
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod cli;
pub mod demo;
pub mod explore;
pub mod host;
pub mod mesh;
pub mod net;
pub mod oracle;
pub mod sched;
pub mod script;
pub mod world;
