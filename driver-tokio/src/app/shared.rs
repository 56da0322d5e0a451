//! What the agent and the daemon share: the start error, the provisioning check, the event
//! streams.

use crate::api::{STREAM_NOT_FOUND, request};
use crate::connect::NatsConnection;
use bytes::Bytes;
use cotal_core::wire::config::SpaceStream;
use cotal_core::wire::token::Space;
use futures::Stream;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Why an [`Agent`](super::Agent) or a [`DeliveryDaemon`](super::DeliveryDaemon) did not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad input: a name that is not a valid space, agent id, channel or role.
    #[error("invalid {what} '{value}': {reason}")]
    Invalid {
        /// What the value names (`"space"`, `"agent id"`, `"channel"`, `"role"`).
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The connection failed.
    #[error("{0}")]
    Connect(#[from] crate::connect::ConnectError),
    /// The space's streams are missing (`cotal up` was not run).
    #[error(
        "space '{space}' is not provisioned: stream {stream} is missing (run `cotal up --space {space}`)"
    )]
    NotProvisioned {
        /// The space.
        space: String,
        /// The stream found missing.
        stream: String,
    },
    /// The space's chat stream could not be read (permissions, timeout).
    #[error("cannot read stream {stream}: {detail}")]
    Check {
        /// The stream.
        stream: String,
        /// The server's or the client's words.
        detail: String,
    },
    /// The core refused the configuration.
    #[error("agent config: {0}")]
    Config(String),
    /// Connected, but the machine did not report itself ready in time (registry not loaded).
    #[error("not ready within {0:?}")]
    NotReady(Duration),
}

/// Fails with [`StartError::NotProvisioned`] when the space's chat stream is missing.
pub(crate) async fn check_provisioned(
    conn: &NatsConnection,
    space: &Space,
    timeout: Duration,
) -> Result<(), StartError> {
    let stream = SpaceStream::Chat.name(space);
    let subject = format!("$JS.API.STREAM.INFO.{stream}");
    match request(&conn.client, &subject, Bytes::new(), timeout).await {
        Ok(_) => Ok(()),
        Err(e) if e.err_code() == Some(STREAM_NOT_FOUND) => Err(StartError::NotProvisioned {
            space: space.as_str().to_owned(),
            stream,
        }),
        Err(e) => Err(StartError::Check {
            stream,
            detail: e.to_string(),
        }),
    }
}

/// Locks a mutex that no holder can poison (no holder panics while holding it; if one did, its
/// state is still consistent: every update is one assignment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `Stream` of a machine's events, from the moment it was asked for: every event, in order.
/// It ends when the agent or daemon stops. Drop it when you stop reading (an unread stream keeps
/// every event it was sent).
#[derive(Debug)]
pub struct Events<E> {
    rx: mpsc::UnboundedReceiver<E>,
}

impl<E> Events<E> {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<E>) -> Self {
        Events { rx }
    }
}

impl<E> Stream for Events<E> {
    type Item = E;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<E>> {
        self.rx.poll_recv(cx)
    }
}

/// The subscribers of a machine's events: each gets every event; a dropped one is forgotten.
pub(crate) struct Subscribers<E> {
    txs: Vec<mpsc::UnboundedSender<E>>,
}

impl<E: Clone> Subscribers<E> {
    pub(crate) fn new() -> Self {
        Subscribers { txs: Vec::new() }
    }

    pub(crate) fn subscribe(&mut self) -> Events<E> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.txs.push(tx);
        Events::new(rx)
    }

    pub(crate) fn publish(&mut self, event: &E) {
        self.txs.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Ends every stream.
    pub(crate) fn close(&mut self) {
        self.txs.clear();
    }
}
