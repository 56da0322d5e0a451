//! The application API: an [`Agent`] and a [`DeliveryDaemon`] on tokio, each one call to start
//! and `await` on every request.
//!
//! Underneath, each is the [`crate::run::Runner`] of one core machine driven by an
//! [`crate::exec::Executor`] on one connection; a small dispatcher task reads the machine's events
//! and completes the request that each result event names (a join's `Joined` / `JoinFailed`, a
//! send's `Sent` / `SendFailed` …). Every request resolves: with its result, with a typed failure,
//! with an `Unknown` outcome when none arrived within the request timeout, or with `Closed` when
//! the agent or daemon is gone. Nothing waits forever.
//!
//! - [`Agent::connect`] → a cloneable [`Agent`]: [`Agent::join`], [`Agent::leave`],
//!   [`Agent::send`], [`Agent::send_dm`], [`Agent::send_anycast`], [`Agent::messages`] (a
//!   `Stream` of [`Message`], each acknowledged with [`Message::handled`]), [`Agent::events`],
//!   [`Agent::health`], [`Agent::close`];
//! - [`DeliveryDaemon::start`] → a [`DeliveryDaemon`]: [`DeliveryDaemon::status`],
//!   [`DeliveryDaemon::wait_active`], [`DeliveryDaemon::events`], [`DeliveryDaemon::shutdown`]
//!   (releases the lease).

mod agent;
mod daemon;
mod message;
mod outcome;
mod shared;

pub use agent::{Agent, AgentOptions, To};
pub use daemon::{
    DaemonError, DaemonMonitor, DaemonStatus, DaemonStopped, DeliveryDaemon, InputTap,
};
pub use message::{Message, Messages, message_json};
pub use outcome::{
    AckError, AgentClosed, CloseError, JoinError, LeaveError, Left, SendError, Sent,
};
pub use shared::{Events, StartError};
