//! [`Message`]: one surfaced message, and the [`Messages`] stream.

use super::outcome::AckError;
use crate::run::MachineHandle;
use cotal_core::agent::{Agent as CoreAgent, Arrival};
use cotal_core::ledger::{MessageId, Surfaced};
use cotal_core::wire::message::{CotalMessage, Part};
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::{ConcreteChannel, Role};
use futures::Stream;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// The stream of [`Agent::messages`](super::Agent::messages): takes the agent's queued messages
/// in batches, and waits for its `MessagesReady` when there are none.
pub(super) fn messages(handle: MachineHandle<CoreAgent>, ready: watch::Receiver<u64>) -> Messages {
    let state = MessagesState {
        handle,
        ready,
        buffer: VecDeque::new(),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(m) = st.buffer.pop_front() {
                return Some((m, st));
            }
            st.ready.borrow_and_update();
            let batch = st.handle.take_messages(64).await.ok()?;
            if batch.is_empty() {
                st.ready.changed().await.ok()?;
                continue;
            }
            let handle = st.handle.clone();
            st.buffer.extend(batch.into_iter().map(|s| Message {
                surfaced: s,
                handle: handle.clone(),
            }));
        }
    });
    Messages {
        inner: Box::pin(stream),
    }
}

struct MessagesState {
    handle: MachineHandle<CoreAgent>,
    ready: watch::Receiver<u64>,
    buffer: VecDeque<Message>,
}

/// The `Stream` of [`Agent::messages`](super::Agent::messages).
pub struct Messages {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

impl Stream for Messages {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// One surfaced message: the first copy of its id (live, backfill, DLV, DM or task), deduped.
/// Acknowledge it with [`Message::handled`] when done; a message neither handled nor declined
/// stays pending in the agent's ledger (its durable copy unacked).
#[derive(Clone)]
pub struct Message {
    surfaced: Surfaced<Arrival>,
    handle: MachineHandle<CoreAgent>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("surfaced", &self.surfaced)
            .finish_non_exhaustive()
    }
}

impl Message {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.surfaced.item.message.id
    }

    /// The sender's id.
    pub fn from(&self) -> &str {
        self.surfaced.item.message.from.id.as_str()
    }

    /// Its text parts, joined by newlines.
    pub fn text(&self) -> String {
        let text: Vec<&str> = self
            .surfaced
            .item
            .message
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        text.join("\n")
    }

    /// How it was delivered: `channel` (live, backfill, DLV), `dm` or `anycast`.
    pub fn kind(&self) -> DeliveryKind {
        self.surfaced.item.kind
    }

    /// The channel it was posted to (from the subject), for a channel message.
    pub fn channel(&self) -> Option<&ConcreteChannel> {
        self.surfaced.item.channel.as_ref()
    }

    /// The role an anycast was addressed to.
    pub fn role(&self) -> Option<&Role> {
        self.surfaced.item.role.as_ref()
    }

    /// A historical (backfill) copy.
    pub fn historical(&self) -> bool {
        self.surfaced.item.historical
    }

    /// It holds a durable copy, acked by [`Message::handled`].
    pub fn durable(&self) -> bool {
        self.surfaced.durable
    }

    /// It mentions this agent.
    pub fn mentions_me(&self) -> bool {
        self.surfaced.item.mentions_me
    }

    /// The whole message (parts, mentions, sender card …).
    pub fn message(&self) -> &CotalMessage {
        &self.surfaced.item.message
    }

    /// The core's surfaced entry.
    pub fn surfaced(&self) -> &Surfaced<Arrival> {
        &self.surfaced
    }

    /// The JSON line `cotal agent` prints for it: `id`, `from`, `kind`, `channel`, `role`,
    /// `text`, `historical`, `durable`.
    pub fn to_json(&self) -> Value {
        message_json(&self.surfaced)
    }

    /// Reports it handled: its durable copy, if any, is acked now (a failed ack is counted in
    /// the health's `settles_unconfirmed`; the server redelivers and the ledger drops the copy).
    ///
    /// # Errors
    ///
    /// [`AckError::Refused`] when it is not pending (handled or declined already);
    /// [`AckError::Closed`].
    pub async fn handled(&self) -> Result<(), AckError> {
        let id: MessageId = self.surfaced.id.clone();
        self.handle
            .call(move |a, now| a.handled(now, &id))
            .await
            .map_err(|_| AckError::Closed)?
            .map_err(AckError::Refused)
    }

    /// Declines it (muted, out of focus): acked, remembered, not surfaced again.
    ///
    /// # Errors
    ///
    /// As [`Message::handled`].
    pub async fn decline(&self) -> Result<(), AckError> {
        let id: MessageId = self.surfaced.id.clone();
        self.handle
            .call(move |a, now| a.decline(now, &id))
            .await
            .map_err(|_| AckError::Closed)?
            .map_err(AckError::Refused)
    }
}

/// One surfaced message as the JSON line `cotal agent` prints.
pub fn message_json(s: &Surfaced<Arrival>) -> Value {
    let m = &s.item.message;
    let text: Vec<&str> = m
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    json!({
        "id": m.id,
        "from": m.from.id.as_str(),
        "kind": s.item.kind.as_str(),
        "channel": s.item.channel.as_ref().map(|c| c.as_str().to_owned()),
        "role": s.item.role.as_ref().map(|r| r.as_str().to_owned()),
        "text": text.join("\n"),
        "historical": s.item.historical,
        "durable": s.durable,
    })
}
