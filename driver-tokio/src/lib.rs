//! `cotal-driver-tokio`: the production driver of Cotal on tokio + async-nats.
//!
//! # Writing an agent
//!
//! [`Agent::connect`] starts an agent and returns a cloneable handle; every request is awaited to
//! its outcome ([`Agent::join`] → the [`JoinReport`](cotal_core::agent::JoinReport),
//! [`Agent::send`] → the message id and stream sequence) or to a typed error ([`JoinError`],
//! [`SendError`] …, each with its `Unknown` and `Closed` cases); [`Agent::messages`] is a
//! `Stream` of [`Message`]s, each acknowledged with [`Message::handled`] when the application is
//! done with it. A space needs its streams (`cotal up`) and, for durable channels, one
//! [`DeliveryDaemon`] per shard.
//!
//! ```
//! # // A nats-server of our own when the tests have one (`COTAL_NATS_SERVER`), else skip.
//! # struct Server(std::process::Child, tempfile::TempDir);
//! # impl Drop for Server {
//! #     fn drop(&mut self) { let _ = self.0.kill(); let _ = self.0.wait(); }
//! # }
//! # fn server() -> Option<(Server, String)> {
//! #     let bin = std::env::var_os("COTAL_NATS_SERVER")?;
//! #     let dir = tempfile::tempdir().expect("temp dir");
//! #     let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
//! #         .expect("a free port").port();
//! #     let child = std::process::Command::new(bin)
//! #         .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(dir.path())
//! #         .stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null())
//! #         .spawn().expect("spawn nats-server");
//! #     let server = Server(child, dir);
//! #     for _ in 0..1000 {
//! #         if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
//! #             return Some((server, format!("nats://127.0.0.1:{port}")));
//! #         }
//! #         std::thread::sleep(std::time::Duration::from_millis(10));
//! #     }
//! #     panic!("nats-server did not start");
//! # }
//! use cotal_core::delivery::daemon::DeliveryConfig;
//! use cotal_core::wire::{shard::ShardMap, token::Space};
//! use cotal_driver_tokio::{Agent, AgentOptions, ConnectConfig, DeliveryDaemon};
//! use futures::StreamExt;
//! use std::time::Duration;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let Some((_server, url)) = server() else { return Ok(()) };
//! let nats = ConnectConfig::new([url]);
//! let space = Space::new("demo")?;
//! // Once per space: its streams and buckets (what `cotal up --space demo` does).
//! let conn = cotal_driver_tokio::connect(&nats).await?;
//! let report =
//!     cotal_driver_tokio::provision::provision_space(&conn.client, &space, Duration::from_secs(5))
//!         .await;
//! assert_eq!(report.failed(), 0);
//! // The space's delivery daemon (`cotal delivery --space demo`), here in the same process.
//! let config = DeliveryConfig::new(space, ShardMap::SINGLE.shard(0)?, "d1");
//! let daemon = DeliveryDaemon::start(&nats, config).await?;
//! daemon.wait_active(Duration::from_secs(10)).await?;
//!
//! // Two agents on the channel `general`.
//! let alice = Agent::connect(&nats, AgentOptions::new("demo", "alice").join("general")).await?;
//! let bob = Agent::connect(&nats, AgentOptions::new("demo", "bob").join("general")).await?;
//! let mut inbox = bob.messages();
//!
//! let sent = alice.send("general", "hello bob").await?;
//! let message = inbox.next().await.expect("a message");
//! assert_eq!((message.from(), message.text().as_str()), ("alice", "hello bob"));
//! assert_eq!(message.id(), sent.id);
//! message.handled().await?; // done with it: its durable copy, if any, is acknowledged
//!
//! // A direct message, read by bob's own consumer.
//! alice.send_dm("bob", "just you").await?;
//! let dm = inbox.next().await.expect("a DM");
//! assert_eq!(dm.text(), "just you");
//! dm.handled().await?;
//!
//! alice.close().await?; // offline presence, then the agent stops
//! bob.close().await?;
//! let stopped = daemon.shutdown().await?; // releases the shard's lease
//! assert!(stopped.lease_released);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/` holds an echo agent, a daemon and a durable consumer that writes each message to
//! a file before acknowledging it (`cargo run -p cotal-driver-tokio --example echo`).
//!
//! # Modules
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
//! - [`app`]: the application API, [`Agent`] and [`DeliveryDaemon`];
//! - [`metrics`]: the OpenMetrics endpoint of `cotal delivery --metrics` and `cotal agent --metrics`;
//! - [`mcp`]: `cotal mcp`, one agent as a Model Context Protocol server on stdio (its tools, the
//!   inbox between the agent and the model, the roster);
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
pub mod mcp;
pub mod metrics;
pub mod provision;
pub mod run;
pub mod tools;

pub use app::{
    AckError, Agent, AgentOptions, DaemonStatus, DaemonStopped, DeliveryDaemon, Events, JoinError,
    LeaveError, Message, Messages, SendError, Sent, StartError,
};
pub use connect::{Auth, ConnectConfig, ConnectError, NatsConnection, TlsConfig, connect};
pub use exec::{Executor, ExecutorConfig, ExecutorStats};
