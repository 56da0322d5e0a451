//! The inbox between the agent and the model: the messages the agent surfaced and the model has
//! not consumed yet, the notices (losses, refusals, connection changes) it has not seen yet, and
//! the acknowledgements owed once a result is delivered.
//!
//! # What it holds, and its bound
//!
//! A reader task moves every message the agent surfaces ([`Agent::messages`]) to `waiting`. Each
//! of them is pending in the agent's ledger until it is reported handled, so the agent's own
//! bound on pending messages (the ledger's `max_pending`, 200) bounds the inbox too: nothing is
//! dropped here. When that bound is reached while nobody calls `cotal_inbox`, the agent stops
//! taking copies: durable ones (DLV, DM, anycast) are deferred by the server and come back later
//! (nothing lost); a live copy of a channel whose backstop is established is shed and its durable
//! copy follows (nothing lost); a live copy of a channel without a backstop is lost, and the
//! agent says so ([`AgentEvent::Lost`]). Every loss is counted here and shown in `cotal_status`
//! and as a notice in the next `cotal_inbox` result: loss is never silent.
//!
//! # When a message is acknowledged
//!
//! A non-peek `cotal_inbox` call moves what it returns from `waiting` to `delivering`, under the
//! call's JSON-RPC request id. Only when the transport reports that response written to stdout
//! (through the [`WrittenReports`] sender [`Inbox::start`] returns) are those messages reported
//! handled (their durable copies acked). A response that failed to go out puts them back at the
//! head of `waiting`; so does a response never reported within [`UNWRITTEN_AFTER`] (the SDK drops
//! the response of a request the client cancelled after it was answered): they are returned again
//! rather than held forever. A server that stops first acks nothing, so the server redelivers the
//! durable copies to the next run. A peek call copies `waiting` and changes nothing.

use super::render;
use crate::app::{Agent, Events, Message};
use cotal_core::agent::AgentEvent;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The most notices kept between two `cotal_inbox` calls; older ones are dropped and counted.
pub const MAX_NOTICES: usize = 100;
/// How long the messages of a result may wait for its written report before they are taken back
/// (returned again by a later call).
pub const UNWRITTEN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// The most recent live losses whose ids `cotal_status` lists.
const RECENT_LOSSES: usize = 20;

/// Loss and acknowledgement counters, for `cotal_status`.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Live copies the agent could not take (its ledger full, no backstop): lost.
    pub live_lost: u64,
    /// The last few of them: `(message id, reason)`.
    pub recent_lost: VecDeque<(String, String)>,
    /// Copies the delivery daemon recorded as lost to this agent (its loss record's total).
    pub copies_lost: u64,
    /// Live copies shed while a backstop held them: delayed, not lost.
    pub shed: u64,
    /// Notices dropped because more than [`MAX_NOTICES`] piled up between two calls, since the
    /// last non-peek call (which reports and resets it).
    pub notices_dropped: u64,
    /// Notices dropped in all.
    pub notices_dropped_total: u64,
    /// Messages reported handled after their result was written.
    pub acked: u64,
    /// Messages whose handled report failed (the agent closed): the server redelivers them.
    pub ack_failures: u64,
    /// Results whose messages went back to waiting: not written, or not reported written within
    /// [`UNWRITTEN_AFTER`].
    pub unwritten: u64,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Message>,
    /// By request key: when the result was made, and its messages.
    delivering: HashMap<String, (Instant, Vec<Message>)>,
    notices: VecDeque<Value>,
    counters: Counters,
}

/// What a `cotal_inbox` call returns.
#[derive(Debug)]
pub struct Taken {
    /// The messages, oldest first.
    pub messages: Vec<Value>,
    /// Messages waiting beyond these.
    pub remaining: usize,
    /// The notices since the last non-peek call.
    pub notices: Vec<Value>,
    /// Notices dropped since then.
    pub notices_dropped: u64,
}

/// The inbox. See the module docs.
pub struct Inbox {
    state: Arc<Mutex<State>>,
    /// The message and event readers.
    readers: Vec<JoinHandle<()>>,
    /// The acknowledging task: it ends when every sender of written reports is dropped.
    acker: Mutex<Option<JoinHandle<()>>>,
}

/// Where the transport reports each response: `(request key, written)`.
pub type WrittenReports = mpsc::UnboundedSender<(String, bool)>;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inbox {
    /// Starts reading `agent`'s messages and `events` (the stream from the agent's start, so the
    /// boot joins' failures are seen). The sender is the transport's: each response's outcome.
    pub fn start(agent: &Agent, events: Events<AgentEvent>) -> (Inbox, WrittenReports) {
        let state = Arc::new(Mutex::new(State::default()));
        let (written, outcomes) = mpsc::unbounded_channel();
        let readers = vec![
            tokio::spawn(read_messages(agent.messages(), state.clone())),
            tokio::spawn(read_events(events, state.clone())),
        ];
        let acker = tokio::spawn(acknowledge(outcomes, state.clone()));
        let inbox = Inbox {
            state,
            readers,
            acker: Mutex::new(Some(acker)),
        };
        (inbox, written)
    }

    /// A peek (`request: None`): up to `limit` waiting messages, nothing consumed. A call
    /// (`request: Some(id)`): up to `limit` messages moved to `delivering` under `id`, and the
    /// notices consumed.
    pub fn take(&self, limit: usize, request: Option<String>) -> Taken {
        let mut s = lock(&self.state);
        take_back_unwritten(&mut s, Instant::now());
        let n = limit.min(s.waiting.len());
        let peeking = request.is_none();
        let messages: Vec<Message> = match &request {
            None => s.waiting.iter().take(n).cloned().collect(),
            Some(_) => s.waiting.drain(..n).collect(),
        };
        let rendered = messages.iter().map(render::message).collect();
        let (notices, notices_dropped) = match request {
            None => (
                s.notices.iter().cloned().collect(),
                s.counters.notices_dropped,
            ),
            Some(id) => {
                if !messages.is_empty() {
                    s.delivering.insert(id, (Instant::now(), messages));
                }
                let dropped = std::mem::take(&mut s.counters.notices_dropped);
                (s.notices.drain(..).collect(), dropped)
            }
        };
        // A peek left its messages waiting: they are not "remaining" after it.
        let remaining = s.waiting.len() - if peeking { n } else { 0 };
        Taken {
            messages: rendered,
            remaining,
            notices,
            notices_dropped,
        }
    }

    /// The counters, and how many messages wait and how many await their result's write.
    pub fn counters(&self) -> (Counters, usize, usize) {
        let s = lock(&self.state);
        let delivering = s.delivering.values().map(|(_, m)| m.len()).sum();
        (s.counters.clone(), s.waiting.len(), delivering)
    }

    /// Stops reading, then waits (up to `within`) for the acknowledgements of the responses
    /// already written: the transport must be gone (its sender dropped) for that to end. What is
    /// not acknowledged by then stays unacknowledged, and the server redelivers it later.
    pub async fn finish(&self, within: std::time::Duration) {
        for r in &self.readers {
            r.abort();
        }
        let acker = self
            .acker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut acker) = acker
            && tokio::time::timeout(within, &mut acker).await.is_err()
        {
            acker.abort();
            tracing::warn!(target: "cotal", "acknowledgements still pending at exit");
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        if let Some(a) = self
            .acker
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            a.abort();
        }
    }
}

/// Puts the messages of results not reported written within [`UNWRITTEN_AFTER`] back at the head
/// of `waiting`, oldest result first.
fn take_back_unwritten(s: &mut State, now: Instant) {
    let mut late: Vec<(Instant, String)> = s
        .delivering
        .iter()
        .filter(|(_, (at, _))| now.duration_since(*at) >= UNWRITTEN_AFTER)
        .map(|(k, (at, _))| (*at, k.clone()))
        .collect();
    late.sort();
    for (_, key) in late.into_iter().rev() {
        if let Some((_, messages)) = s.delivering.remove(&key) {
            s.counters.unwritten += 1;
            for m in messages.into_iter().rev() {
                s.waiting.push_front(m);
            }
        }
    }
}

async fn read_messages(mut messages: crate::app::Messages, state: Arc<Mutex<State>>) {
    while let Some(m) = messages.next().await {
        lock(&state).waiting.push_back(m);
    }
}

async fn read_events(mut events: Events<AgentEvent>, state: Arc<Mutex<State>>) {
    while let Some(event) = events.next().await {
        let mut s = lock(&state);
        let c = &mut s.counters;
        match &event {
            AgentEvent::Lost { id, reason } => {
                c.live_lost += 1;
                c.recent_lost.push_back((id.clone(), reason.clone()));
                if c.recent_lost.len() > RECENT_LOSSES {
                    c.recent_lost.pop_front();
                }
            }
            AgentEvent::CopiesLost { total, .. } => c.copies_lost = *total,
            AgentEvent::LiveCopyShed { .. } => c.shed += 1,
            _ => {}
        }
        if let Some(notice) = render::notice(&event) {
            tracing::info!(target: "cotal", "{notice}");
            if s.notices.len() >= MAX_NOTICES {
                s.notices.pop_front();
                s.counters.notices_dropped += 1;
                s.counters.notices_dropped_total += 1;
            }
            s.notices.push_back(notice);
        }
    }
}

/// Reports handled the messages of each written response; puts back those of a failed one.
async fn acknowledge(
    mut outcomes: mpsc::UnboundedReceiver<(String, bool)>,
    state: Arc<Mutex<State>>,
) {
    while let Some((id, ok)) = outcomes.recv().await {
        let Some((_, messages)) = lock(&state).delivering.remove(&id) else {
            continue;
        };
        if !ok {
            let mut s = lock(&state);
            s.counters.unwritten += 1;
            for m in messages.into_iter().rev() {
                s.waiting.push_front(m);
            }
            continue;
        }
        for m in messages {
            let result = m.handled().await;
            let mut s = lock(&state);
            match result {
                Ok(()) => s.counters.acked += 1,
                Err(e) => {
                    s.counters.ack_failures += 1;
                    tracing::warn!(target: "cotal", "cannot report {} handled: {e}", m.id());
                }
            }
        }
    }
}

/// The inbox result as the model sees it.
pub fn taken_json(taken: &Taken, peek: bool) -> Value {
    json!({
        "messages": taken.messages,
        "remaining": taken.remaining,
        "peek": peek,
        "notices": taken.notices,
        "notices_dropped": taken.notices_dropped,
    })
}
