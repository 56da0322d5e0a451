//! `cotal-core`: the Cotal delivery protocol as pure, deterministic, sans-IO code.
//!
//! Cotal is an agent mesh on NATS/JetStream. This crate holds every protocol decision and nothing
//! else: no clock, no IO, no async, no threads, no randomness of its own. Time, randomness (uuids,
//! jitter) and everything the broker says come in as inputs; what must happen next comes out as
//! data. That is what lets the same code run under the tokio driver, the deterministic simulator, a
//! fuzzer, or a plain blocking loop in another runtime.
//!
//! It speaks protocol v0.3 exactly as the TypeScript reference `@cotal-ai/core` 0.6.0 does on the
//! wire (see [`wire`]), and closes the reference's known delivery gaps where it can do so while old
//! peers still read what it writes.
//!
//! Modules:
//!
//! - [`time`]: the only clocks ([`time::Instant`] for deadlines, [`time::UnixMillis`] for stamps);
//! - [`wire`]: tokens, subjects, JSON records, msg-ids, stream/consumer/KV configurations and
//!   permission sets, as data;
//! - [`acl`]: NATS subject matching and read-ACL coverage;
//! - [`policy`]: the one effective-channel-policy resolver;
//! - [`constants`]: the protocol's numeric constants (semantics §5);
//! - [`agent`]: the agent endpoint machine (join, leave, watermark, backstop, refusal, reconnect,
//!   presence, receiving);
//! - [`ledger`]: receiver dedup and ack ownership across live, backfill and durable copies;
//! - [`io`]: the effect vocabulary every machine and driver shares (commands, completions,
//!   inbound messages, the [`io::Machine`] trait);
//! - [`entropy`]: seeded uuids and jitter (randomness as an input);
//! - [`op`]: the operation contract (op ids, success / typed failure / unknown outcomes, timers);
//! - [`registry`]: membership records as a pure FSM: the one interval check, join / tombstone /
//!   activate plans with generation guard, fencing token and per-generation interval history;
//! - [`delivery`]: the daemon's pure decisions (fan-out routing, the trusted reader's
//!   authorization, the control gate, the lease) and the daemon machine that drives them,
//!   [`delivery::daemon::Delivery`].

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout)]
#![warn(missing_docs)]

pub mod acl;
pub mod agent;
pub mod constants;
pub mod delivery;
pub mod entropy;
pub mod io;
pub mod ledger;
pub mod op;
pub mod policy;
pub mod registry;
pub mod time;
pub mod wire;
