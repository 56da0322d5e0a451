//! The ideal-pipeline ceiling: what the broker does for durable per-member delivery with no
//! Cotal logic at all, measured in the same run before the durable phase.
//!
//! One scratch file stream (`BENCHIDEAL_<tag>`, subjects `bench.ideal.<tag>.<i>`, one per
//! member; deleted afterwards). M pull consumers, one per member subject (filtered, explicit ack,
//! as a member's `dlv_<id>` is), each on its own connection as a member agent is, pulling in
//! batches of [`IDEAL_BATCH`] and acking every message with a plain `ack()` (fire and forget, in
//! the pulling task: no task per message), which is what our agents must do with each DLV copy.
//! One writer publishes, for each of the N messages, one copy per member (M×N copies, each with
//! a `Nats-Msg-Id` as the daemon's DLV writes carry), pipelined with at most [`IDEAL_WINDOW`]
//! acknowledgements outstanding. The figure is M×N ÷ (first publish → last copy consumed).

use super::member::{SETUP_WAIT, progress};
use crate::connect::{ConnectConfig, NatsConnection, connect};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Publishes in flight while writing the copies (as for the publish ceiling).
const IDEAL_WINDOW: usize = 1024;
/// Messages asked for per pull request.
const IDEAL_BATCH: usize = 256;
/// About the size of a DLV copy of a small chat message.
const IDEAL_PAYLOAD: usize = 400;

/// Copies per second through the ideal pipeline for `members` members and `messages` messages;
/// `wait` bounds the whole measurement after the consumers are ready.
pub(super) async fn measure_ideal(
    cfg: &ConnectConfig,
    admin: &NatsConnection,
    tag: &str,
    members: usize,
    messages: usize,
    wait: Duration,
) -> Result<f64, String> {
    let js = jetstream::new(admin.client.clone());
    let name = format!("BENCHIDEAL_{tag}");
    let prefix = format!("bench.ideal.{tag}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.*")],
        storage: stream::StorageType::File,
        // Past 1,000 the server's default per-stream cap would refuse the consumers.
        max_consumers: i32::try_from(members + 1).unwrap_or(i32::MAX),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("ideal scratch stream: {e}"))?;
    let result = run_ideal(cfg, &js, &name, &prefix, members, messages, wait).await;
    let _ = js.delete_stream(&name).await;
    result
}

async fn run_ideal(
    cfg: &ConnectConfig,
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    members: usize,
    messages: usize,
    wait: Duration,
) -> Result<f64, String> {
    let ready = Arc::new(AtomicUsize::new(0));
    let consumed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Consumers(Vec::with_capacity(members));
    for i in 0..members {
        let mut cfg = cfg.clone();
        cfg.name = Some(format!("cotal-bench-ideal-{i}"));
        let (name, subject) = (name.to_owned(), format!("{prefix}.{i}"));
        let (ready, consumed) = (Arc::clone(&ready), Arc::clone(&consumed));
        tasks.0.push(tokio::spawn(async move {
            consume(cfg, name, subject, i, messages, wait, &ready, &consumed).await
        }));
    }
    let deadline = Instant::now() + SETUP_WAIT;
    while ready.load(Ordering::Relaxed) < members {
        if let Some(k) = tasks.0.iter().position(|t| t.is_finished()) {
            // A consumer ended before the first publish: it failed; say why.
            let failed = tasks.0.swap_remove(k);
            return Err(match failed.await {
                Ok(Err(e)) => format!("ideal pipeline: {e}"),
                Ok(Ok(_)) => "ideal pipeline: a consumer ended before the writer".to_owned(),
                Err(e) => format!("ideal pipeline consumer: {e}"),
            });
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ideal pipeline: only {} of {members} consumers ready within {SETUP_WAIT:?}",
                ready.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let payload = Bytes::from(vec![b'x'; IDEAL_PAYLOAD]);
    let subjects: Vec<String> = (0..members).map(|i| format!("{prefix}.{i}")).collect();
    let total = members * messages;
    let mut inflight = VecDeque::with_capacity(IDEAL_WINDOW);
    let start = Instant::now();
    {
        for m in 0..messages {
            for (i, subject) in subjects.iter().enumerate() {
                let ack = js
                    .send_publish(
                        subject.clone(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(format!("{m}.{i}")),
                    )
                    .await
                    .map_err(|e| format!("ideal publish: {e}"))?;
                inflight.push_back(ack);
                if inflight.len() >= IDEAL_WINDOW
                    && let Some(a) = inflight.pop_front()
                {
                    a.await.map_err(|e| format!("ideal publish ack: {e}"))?;
                }
            }
            if m % 100 == 0 {
                progress(&format!(
                    "bench: ideal pipeline, {}/{total} copies written, {}/{total} consumed",
                    m * members,
                    consumed.load(Ordering::Relaxed)
                ));
            }
        }
        while let Some(a) = inflight.pop_front() {
            a.await.map_err(|e| format!("ideal publish ack: {e}"))?;
        }
    }
    let mut last = start;
    let until = start + wait;
    for (i, t) in tasks.0.iter_mut().enumerate() {
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, t).await {
            Ok(Ok(Ok(at))) => last = last.max(at),
            Ok(Ok(Err(e))) => return Err(format!("ideal pipeline: {e}")),
            Ok(Err(e)) => return Err(format!("ideal pipeline consumer {i}: {e}")),
            Err(_) => {
                return Err(format!(
                    "ideal pipeline: {} of {total} copies consumed within {wait:?}",
                    consumed.load(Ordering::Relaxed)
                ));
            }
        }
    }
    Ok(total as f64
        / last
            .saturating_duration_since(start)
            .as_secs_f64()
            .max(1e-9))
}

/// The consumer tasks, aborted when the measurement ends early (an error or a timeout).
struct Consumers(Vec<tokio::task::JoinHandle<Result<Instant, String>>>);

impl Drop for Consumers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Member `i`'s consumer: its own connection and filtered pull consumer on `subject`, ready
/// counted once it is bound; pulls and acks until it consumed `messages` copies, and returns
/// when it consumed the last. Each wait for a message is bounded by `wait`.
#[allow(clippy::too_many_arguments)]
async fn consume(
    cfg: ConnectConfig,
    stream_name: String,
    subject: String,
    i: usize,
    messages: usize,
    wait: Duration,
    ready: &AtomicUsize,
    consumed: &AtomicUsize,
) -> Result<Instant, String> {
    let conn = connect(&cfg)
        .await
        .map_err(|e| format!("consumer {i}: {e}"))?;
    let js = jetstream::new(conn.client.clone());
    let consumer = js
        .create_consumer_on_stream(
            consumer::pull::Config {
                name: Some(format!("ideal_{i}")),
                durable_name: Some(format!("ideal_{i}")),
                filter_subject: subject,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                ..Default::default()
            },
            stream_name,
        )
        .await
        .map_err(|e| format!("consumer {i}: {e}"))?;
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(IDEAL_BATCH)
        .messages()
        .await
        .map_err(|e| format!("consumer {i} pull: {e}"))?;
    ready.fetch_add(1, Ordering::Relaxed);
    let mut got = 0usize;
    let mut last = Instant::now();
    while got < messages {
        let next = tokio::time::timeout(wait, pulled.next())
            .await
            .map_err(|_| format!("consumer {i}: nothing for {wait:?} after {got} copies"))?;
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("consumer {i} after {got} copies: {e}")),
            None => return Err(format!("consumer {i}: pull ended after {got} copies")),
        };
        msg.ack()
            .await
            .map_err(|e| format!("consumer {i} ack: {e}"))?;
        got += 1;
        last = Instant::now();
        consumed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(last)
}
