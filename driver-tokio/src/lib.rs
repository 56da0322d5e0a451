//! `cotal-driver-tokio`: the production driver of Cotal on tokio + async-nats.
//!
//! The core machines speak only the effect vocabulary of [`cotal_core::io`]. This crate executes
//! that vocabulary against a real nats-server:
//!
//! - [`connect`](mod@connect): connection options (URL list, creds / nkey / user+password / token, TLS, inbox
//!   prefix, reconnect backoff) and one-line connect errors;
//! - [`exec`]: the [`exec::Executor`], which runs every [`cotal_core::io::Command`] and reports
//!   every result, feed item and connection change as a [`cotal_core::io::Input`];
//! - [`provision`]: idempotent creation of a space's streams, KV buckets and the daemon's
//!   consumers from the core's config data (`cotal up`);
//! - [`api`]: raw JetStream API requests and their error mapping;
//! - [`run`]: the [`run::Runner`] that owns one core machine and drives it with an executor;
//! - [`demo`]: the simulator's demo script run on a real nats-server, with a verdict from real
//!   checks (`cotal demo --nats`);
//! - [`tools`]: `cotal bench` and `cotal chaos`, the fan-out measurement and the fault injection
//!   run against a real nats-server, each a clap `Args` struct and an entry the binary calls.
//!
//! The `cotal` binary (`src/bin/cotal.rs`) is the command line on top.

#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod connect;
pub mod demo;
pub mod exec;
pub mod provision;
pub mod run;
pub mod tools;

pub use app::{
    AckError, Agent, AgentOptions, DaemonStatus, DaemonStopped, DeliveryDaemon, Events, JoinError,
    LeaveError, Message, Messages, SendError, Sent, StartError,
};
pub use connect::{Auth, ConnectConfig, ConnectError, NatsConnection, TlsConfig, connect};
pub use exec::{Executor, ExecutorConfig, ExecutorStats};
