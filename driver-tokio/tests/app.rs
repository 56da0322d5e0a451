//! The application API (issue 18 item 1) against a real nats-server: two [`Agent`]s and a
//! [`DeliveryDaemon`] through `cotal_driver_tokio`'s front door only (plus the provisioning an
//! operator's `cotal up` / `provision agent` does).

mod common;

use common::{NatsServer, WAIT, provision_open_space};
use cotal_core::agent::{AgentError, AgentEvent, BackstopState};
use cotal_core::delivery::daemon::DeliveryConfig;
use cotal_core::wire::message::Part;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::Space;
use cotal_driver_tokio::app::To;
use cotal_driver_tokio::{
    AckError, Agent, AgentOptions, DeliveryDaemon, JoinError, LeaveError, Message, Messages,
    SendError, Sent, StartError,
};
use futures::StreamExt;
use std::time::Duration;

const SPACE: &str = "app";

/// The next message within [`WAIT`].
async fn next(messages: &mut Messages, what: &str) -> Message {
    tokio::time::timeout(WAIT, messages.next())
        .await
        .unwrap_or_else(|_| panic!("no message within {WAIT:?}: {what}"))
        .unwrap_or_else(|| panic!("message stream ended: {what}"))
}

/// Nothing more within `d`.
async fn quiet(messages: &mut Messages, d: Duration) -> Option<Message> {
    tokio::time::timeout(d, messages.next())
        .await
        .ok()
        .flatten()
}

/// Two agents and a daemon through the API: boot joins (durable), bad input, an idempotent
/// join, a post received through `messages()` and handled, a durable copy kept by the daemon
/// while its reader was away, a DM and an anycast, a leave seen in `events()`, health, close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_and_a_daemon_through_the_api() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision_open_space(&cfg, SPACE, &["alice", "bob"]).await;

    // A bad space name is refused before anything connects.
    let err = Agent::connect(&cfg, AgentOptions::new("no spaces", "alice"))
        .await
        .expect_err("bad space");
    assert!(
        matches!(&err, StartError::Invalid { what: "space", .. }),
        "{err}"
    );
    // A space that is not provisioned is named.
    let err = Agent::connect(&cfg, AgentOptions::new("elsewhere", "alice"))
        .await
        .expect_err("unprovisioned space");
    assert!(
        matches!(&err, StartError::NotProvisioned { stream, .. } if stream == "CHAT_elsewhere"),
        "{err}"
    );

    let space = Space::new(SPACE).expect("space");
    let shard = ShardMap::SINGLE.shard(0).expect("shard");
    let daemon = DeliveryDaemon::start(&cfg, DeliveryConfig::new(space, shard, "d1"))
        .await
        .expect("daemon starts");
    let status = daemon.wait_active(WAIT).await.expect("daemon active");
    assert!(status.serving);

    let alice = Agent::connect(&cfg, AgentOptions::new(SPACE, "alice").join("general"))
        .await
        .expect("alice connects");
    let bob_options = AgentOptions::new(SPACE, "bob")
        .join("general")
        .role("reviewer");
    let bob = Agent::connect(&cfg, bob_options.clone())
        .await
        .expect("bob connects");
    for agent in [&alice, &bob] {
        let boot = agent.boot_joins();
        assert_eq!(boot.len(), 1, "{boot:?}");
        assert_eq!(boot[0].0.as_str(), "general");
        let report = boot[0].1.as_ref().expect("boot join succeeded");
        assert!(report.joined && report.durable, "{report:?}");
        assert!(report.generation.is_some(), "{report:?}");
    }

    // Bad input: a clear error, nothing changed.
    let err = alice.join("bad channel").await.expect_err("bad name");
    assert!(
        matches!(&err, JoinError::InvalidChannel { channel, .. } if channel == "bad channel"),
        "{err}"
    );
    let err = alice.send("general.>", "x").await.expect_err("wildcard");
    assert!(
        matches!(err, SendError::Refused(AgentError::NotConcrete(_))),
        "{err}"
    );
    let err = alice.send_dm("not an id", "x").await.expect_err("bad id");
    assert!(
        matches!(
            &err,
            SendError::Invalid {
                what: "agent id",
                ..
            }
        ),
        "{err}"
    );
    let health = alice.health().await.expect("health");
    let channels: Vec<&str> = health.channels.iter().map(|c| c.channel.as_str()).collect();
    assert_eq!(channels, ["general"]);
    // Joining a joined channel is an idempotent no-op that reports the membership.
    let again = alice.join("general").await.expect("join again");
    assert!(!again.joined && again.durable, "{again:?}");

    // A post, received once, acknowledged.
    let mut bob_messages = bob.messages();
    let sent = alice
        .send("general", "hello from alice")
        .await
        .expect("send");
    assert!(sent.seq > 0 && !sent.duplicate, "{sent:?}");
    // A resend under the same id (what an unknown outcome calls for) is stored once: the
    // stream answers with the first copy's sequence, marked duplicate.
    let again = alice
        .resend(
            To::Channel("general".to_owned()),
            vec![Part::text("hello from alice")],
            &sent.id,
        )
        .await
        .expect("resend");
    assert_eq!(
        again,
        Sent {
            id: sent.id.clone(),
            seq: sent.seq,
            duplicate: true
        }
    );
    let m = next(&mut bob_messages, "hello").await;
    assert_eq!(m.id(), sent.id);
    assert_eq!(m.text(), "hello from alice");
    assert_eq!(m.from(), "alice");
    assert_eq!(m.kind(), DeliveryKind::Channel);
    assert_eq!(m.channel().map(|c| c.as_str()), Some("general"));
    assert!(!m.historical());
    let line = m.to_json();
    assert_eq!(line["text"], "hello from alice");
    assert_eq!(line["id"], sent.id.as_str());
    assert_eq!(line["kind"], "channel");
    m.handled().await.expect("handled");
    let err = m.handled().await.expect_err("handled twice");
    assert!(
        matches!(err, AckError::Refused(AgentError::Ledger(_))),
        "{err}"
    );
    // The daemon wrote its durable copy; bob surfaces the message once only.
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let s = daemon.status().await.expect("status");
        if s.counters.copies_written >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no copy written: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(m) = quiet(&mut bob_messages, Duration::from_millis(500)).await {
        panic!("surfaced again: {m:?}");
    }

    // Bob goes away; a post made meanwhile reaches him through his durable copy when he comes
    // back (his membership stays across close).
    let last = bob.close().await.expect("bob closes");
    assert!(
        last.channels
            .iter()
            .any(|c| c.channel.as_str() == "general"),
        "{last:?}"
    );
    assert!(matches!(
        bob.send("general", "x").await,
        Err(SendError::Closed)
    ));
    assert!(bob.health().await.is_err());
    assert!(
        quiet(&mut bob_messages, Duration::from_millis(100))
            .await
            .is_none()
    );
    let away = alice
        .send("general", "while bob was away")
        .await
        .expect("send");
    let bob = Agent::connect(&cfg, bob_options).await.expect("bob again");
    let mut bob_messages = bob.messages();
    // His new life backfills the channel's history (the earlier post, historical) too.
    let m = loop {
        let m = next(&mut bob_messages, "while away").await;
        if m.id() == away.id {
            break m;
        }
        assert!(m.id() == sent.id && m.historical(), "{m:?}");
        m.handled().await.expect("handled history");
    };
    assert_eq!(m.text(), "while bob was away");
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let h = bob.health().await.expect("health");
        if h.channels.iter().any(|c| {
            c.channel.as_str() == "general"
                && c.live
                && matches!(c.backstop, BackstopState::Established { .. })
        }) && h.dlv_bound
        {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.handled().await.expect("handled");
    // The daemon's DLV copy of it reaches bob too: it upgrades the pending entry or is acked as
    // a copy of a handled id, never surfaced twice.
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

    // A DM and an anycast, each with its kind.
    let dm = alice.send_dm("bob", "psst").await.expect("dm");
    let m = next(&mut bob_messages, "dm").await;
    assert_eq!((m.id(), m.text().as_str()), (dm.id.as_str(), "psst"));
    assert_eq!(m.kind(), DeliveryKind::Dm);
    assert_eq!(m.channel(), None);
    m.handled().await.expect("handled dm");
    let task = alice
        .send_anycast("reviewer", "review this")
        .await
        .expect("anycast");
    let m = next(&mut bob_messages, "anycast").await;
    assert_eq!(
        (m.id(), m.text().as_str()),
        (task.id.as_str(), "review this")
    );
    assert_eq!(m.kind(), DeliveryKind::Anycast);
    assert_eq!(m.role().map(|r| r.as_str()), Some("reviewer"));
    m.handled().await.expect("handled task");

    // A leave, its event, and the membership gone from the health.
    let mut events = alice.events();
    let left = alice.leave("general").await.expect("leave");
    let generation = left
        .tombstoned
        .expect("a durable membership was tombstoned");
    let event = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.next().await {
            if let AgentEvent::Left { .. } = e {
                return e;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("left event");
    assert!(
        matches!(&event, AgentEvent::Left { channel, tombstoned: Some(g), .. }
            if channel.as_str() == "general" && *g == generation),
        "{event:?}"
    );
    let err = alice.leave("general").await.expect_err("not joined");
    assert!(
        matches!(err, LeaveError::Refused(AgentError::NotJoined(_))),
        "{err}"
    );
    let health = alice.health().await.expect("health");
    assert!(health.ready && health.channels.is_empty(), "{health:?}");

    // Close: the last health, then every call is refused as closed and the streams end.
    let last = alice.close().await.expect("alice closes");
    assert!(last.channels.is_empty(), "{last:?}");
    assert!(matches!(
        alice.join("general").await,
        Err(JoinError::Closed)
    ));
    let ended = tokio::time::timeout(WAIT, async { while events.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "alice's event stream did not end");
    bob.close().await.expect("bob closes");

    // The daemon's shutdown releases its lease.
    let stopped = daemon.shutdown().await.expect("daemon stops");
    assert!(stopped.lease_released && !stopped.lease_lost, "{stopped:?}");
    assert!(stopped.counters.copies_written >= 2, "{stopped:?}");
}

/// While the server is down a request resolves at once or within the request timeout, as a
/// refusal (`NotReady`), a failure or an unknown outcome, never a success and never a hang; once
/// the agent is back (its `Connected` event) the same calls succeed. A request racing the close
/// resolves, and every call after it is `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_resolve_while_the_server_is_down_and_after_close() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision_open_space(&cfg, SPACE, &["carol"]).await;
    let mut options = AgentOptions::new(SPACE, "carol")
        .join("general")
        .live_only();
    options.request_timeout = Duration::from_secs(2);
    let carol = Agent::connect(&cfg, options).await.expect("carol connects");
    let mut events = carol.events();
    server.kill();
    let started = tokio::time::Instant::now();
    let err = carol
        .send("general", "into the void")
        .await
        .expect_err("down");
    // Refused before it left (NotReady), failed by the executor (not connected: nothing was
    // published), or unknown (published into a dying connection).
    assert!(
        matches!(
            err,
            SendError::Refused(AgentError::NotReady)
                | SendError::Failed { .. }
                | SendError::Unknown { .. }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(4), "{err}");
    // Disconnected: refused at once, nothing changed.
    tokio::time::timeout(WAIT, async {
        while let Some(e) = events.next().await {
            if e == AgentEvent::Disconnected {
                return;
            }
        }
    })
    .await
    .expect("disconnected event");
    let err = carol.join("other").await.expect_err("down");
    assert!(
        matches!(err, JoinError::Refused(AgentError::NotReady)),
        "{err}"
    );
    let err = carol.send_dm("carol", "x").await.expect_err("down");
    assert!(
        matches!(err, SendError::Refused(AgentError::NotReady)),
        "{err}"
    );
    let health = carol.health().await.expect("health");
    assert!(!health.ready, "{health:?}");
    // Back: the same calls succeed.
    server.restart();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = events.next().await {
            if let AgentEvent::Connected { first: false } = e {
                return;
            }
        }
    })
    .await
    .expect("connected again");
    let sent = carol
        .send("general", "back")
        .await
        .expect("send after reconnect");
    assert!(sent.seq > 0, "{sent:?}");
    let report = carol.join("other").await.expect("join after reconnect");
    assert!(report.joined, "{report:?}");
    // A request racing the close resolves (closed, or done before it), and after it every
    // call is refused as closed.
    let racing = tokio::spawn({
        let carol = carol.clone();
        async move { carol.send("general", "racing the close").await }
    });
    carol.close().await.expect("close");
    let raced = tokio::time::timeout(WAIT, racing)
        .await
        .expect("the racing send resolved")
        .expect("task");
    assert!(
        matches!(
            raced,
            Ok(_)
                | Err(SendError::Closed
                    | SendError::Unknown { .. }
                    | SendError::Refused(AgentError::Stopped))
        ),
        "{raced:?}"
    );
    assert!(matches!(
        carol.leave("general").await,
        Err(LeaveError::Closed)
    ));
}
