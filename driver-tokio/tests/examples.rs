//! The examples of `driver-tokio/examples/` against a real nats-server.
//!
//! Each example's body is a function (`echo`, `daemon`, `file_sink`) that its `main` calls with
//! the command line's settings and Ctrl-C as the stop; this test includes the example's source
//! file as a module and calls the same function with its own server and stop. So the test runs
//! exactly the example's code, built with the test (no binary to find in the target dir, no
//! `cargo run` from a test), and a broken example fails to compile here.

mod common;

#[allow(dead_code)]
#[path = "../examples/daemon.rs"]
mod daemon_example;
#[allow(dead_code)]
#[path = "../examples/echo.rs"]
mod echo_example;
#[allow(dead_code)]
#[path = "../examples/file_sink.rs"]
mod file_sink_example;

use common::{NatsServer, WAIT, provision_open_space};
use cotal_core::delivery::daemon::DeliveryConfig;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::{AgentId, Space};
use cotal_driver_tokio::{Agent, AgentOptions, ConnectConfig, DeliveryDaemon};
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use tokio::sync::oneshot;

/// A future that resolves when the returned sender fires (or is dropped).
fn stopper() -> (oneshot::Sender<()>, impl Future<Output = ()>) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// The echo agent answers a post with a DM `echo: <text>` to its sender, and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_example_answers_with_a_dm() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision_open_space(&cfg, "ex", &["echo", "tester"]).await;
    let (stop, stopped) = stopper();
    let options = AgentOptions::new("ex", "echo").join("general").live_only();
    let echo = tokio::spawn(echo_example::echo(cfg.clone(), options, stopped));
    let tester = Agent::connect(&cfg, AgentOptions::new("ex", "tester").live_only())
        .await
        .expect("tester");
    let mut messages = tester.messages();
    // The echo agent joins on its own time: post until an answer comes (a post made before its
    // live subscription is simply not seen by it).
    let until = tokio::time::Instant::now() + WAIT;
    let mut sent = Vec::new();
    let answer = loop {
        let text = format!("ping {}", sent.len());
        tester.send("general", text.as_str()).await.expect("send");
        sent.push(text);
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), messages.next()).await
        {
            break m;
        }
        assert!(tokio::time::Instant::now() < until, "no echo");
    };
    assert_eq!(answer.from(), "echo");
    assert_eq!(answer.kind(), DeliveryKind::Dm);
    let text = answer.text();
    let pinged = text.strip_prefix("echo: ").expect("an echo");
    assert!(sent.iter().any(|s| s == pinged), "{text} for {sent:?}");
    answer.handled().await.expect("handled");
    stop.send(()).expect("echo still running");
    let echoed = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo stops")
        .expect("echo task")
        .expect("echo ran");
    assert!(echoed >= 1, "{echoed}");
    tester.close().await.expect("close");
}

/// The daemon example serves: a post between two agents gets its durable copy written, and its
/// stop releases the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_example_serves_and_releases_its_lease() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision_open_space(&cfg, "ex", &["alice", "bob"]).await;
    let (stop, stopped) = stopper();
    let (active_tx, active) = oneshot::channel();
    let daemon = tokio::spawn(daemon_example::daemon(
        cfg.clone(),
        "ex",
        "d-example",
        Duration::from_millis(200),
        move || {
            let _ = active_tx.send(());
        },
        stopped,
    ));
    tokio::time::timeout(WAIT, active)
        .await
        .expect("active in time")
        .expect("daemon running");
    let alice = Agent::connect(&cfg, AgentOptions::new("ex", "alice").join("general"))
        .await
        .expect("alice");
    let bob = Agent::connect(&cfg, AgentOptions::new("ex", "bob").join("general"))
        .await
        .expect("bob");
    for agent in [&alice, &bob] {
        let boot = agent.boot_joins();
        let report = boot[0].1.as_ref().expect("joined");
        assert!(report.durable, "{report:?}");
    }
    let sent = alice
        .send("general", "through the daemon")
        .await
        .expect("send");
    let mut messages = bob.messages();
    let m = tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("message in time")
        .expect("message");
    assert_eq!(
        (m.id(), m.text().as_str()),
        (sent.id.as_str(), "through the daemon")
    );
    m.handled().await.expect("handled");
    // Its DLV copy reaches bob (upgrading the entry or acked as a copy of a handled id).
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let l = bob.health().await.expect("health").ledger;
        if l.handles_upgraded + l.settled_duplicates_acked >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no durable copy: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.close().await.expect("close");
    bob.close().await.expect("close");
    stop.send(()).expect("daemon still running");
    let stopped = tokio::time::timeout(WAIT, daemon)
        .await
        .expect("daemon stops")
        .expect("daemon task")
        .expect("daemon ran");
    assert!(stopped.lease_released, "{stopped:?}");
    assert!(stopped.counters.copies_written >= 1, "{stopped:?}");
}

/// The file's lines: (id, text).
fn lines(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["id"].as_str().expect("id").to_owned(),
                v["text"].as_str().expect("text").to_owned(),
            )
        })
        .collect()
}

async fn wait_lines(path: &Path, n: usize) -> Vec<(String, String)> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let got = lines(path);
        if got.len() >= n {
            return got;
        }
        assert!(tokio::time::Instant::now() < until, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The durable file consumer writes each post once, and after a restart writes what was posted
/// while it was down (its durable copy) and not the history again; that copy is acknowledged
/// (its DLV consumer's ack floor reaches the stream's last sequence) only after the line is on
/// disk (the example writes, syncs, then acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_example_writes_then_acknowledges() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg: ConnectConfig = server.config();
    provision_open_space(&cfg, "ex", &["sink", "poster"]).await;
    let space = Space::new("ex").expect("space");
    let shard = ShardMap::SINGLE.shard(0).expect("shard");
    let daemon = DeliveryDaemon::start(&cfg, DeliveryConfig::new(space.clone(), shard, "d1"))
        .await
        .expect("daemon");
    daemon.wait_active(WAIT).await.expect("active");
    let poster = Agent::connect(&cfg, AgentOptions::new("ex", "poster").join("orders"))
        .await
        .expect("poster");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orders.jsonl");
    let sink_options = AgentOptions::new("ex", "sink").join("orders");

    // Posted before the sink's first join: its join backfills them.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            poster
                .send("orders", format!("order {i}"))
                .await
                .expect("send")
                .id,
        );
    }
    let (stop, stopped) = stopper();
    let sink = tokio::spawn({
        let (cfg, options, path) = (cfg.clone(), sink_options.clone(), path.clone());
        async move { file_sink_example::file_sink(cfg, options, &path, stopped).await }
    });
    let got = wait_lines(&path, 3).await;
    let got_ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(got[2].1, "order 2");
    stop.send(()).expect("sink running");
    let written = sink.await.expect("sink task").expect("sink ran");
    assert_eq!(written, 3);

    // Posted while the sink is down: it comes through the sink's durable copy when it is back;
    // the three already written are not written again.
    let away = poster
        .send("orders", "order while away")
        .await
        .expect("send");
    let (stop, stopped) = stopper();
    let sink = tokio::spawn({
        let (cfg, options, path) = (cfg.clone(), sink_options, path.clone());
        async move { file_sink_example::file_sink(cfg, options, &path, stopped).await }
    });
    let got = wait_lines(&path, 4).await;
    assert_eq!(got[3], (away.id.clone(), "order while away".to_owned()));
    // Let the DLV copies come in and be acknowledged, then stop.
    let dlv = ConsumerSpec::dlv(&space, &AgentId::new("sink").expect("id"));
    let conn = cotal_driver_tokio::connect(&cfg).await.expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream(&dlv.stream).await.expect("dlv stream");
        let info = stream
            .consumer_info(&dlv.name)
            .await
            .expect("consumer info");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        // The copy of the post made while it was down (the earlier ones predate its membership:
        // its first join backfilled them), delivered and acknowledged.
        if last >= 1
            && info.ack_floor.stream_sequence == last
            && info.num_ack_pending == 0
            && info.num_pending == 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "dlv last {last}, consumer {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).expect("sink running");
    let written = sink.await.expect("sink task").expect("sink ran");
    assert_eq!(written, 1);
    assert_eq!(lines(&path).len(), 4, "{:?}", lines(&path));
    poster.close().await.expect("close");
    daemon.shutdown().await.expect("shutdown");
}
