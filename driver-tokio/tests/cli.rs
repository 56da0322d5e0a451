//! `cotal up` end to end against a real nats-server (skipped when `COTAL_NATS_SERVER` is unset).

mod common;

use bytes::Bytes;
use common::NatsServer;
use cotal_core::wire::token::Space;
use cotal_driver_tokio::api;
use cotal_driver_tokio::connect::connect;
use cotal_driver_tokio::provision::{ProvisionError, SpacePlan, apply_stream, differences};
use std::process::Output;
use std::time::Duration;

fn cotal(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cotal"))
        .args(args)
        .output()
        .expect("run cotal")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn cotal_up_twice_is_idempotent_and_matches_the_core_specs() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let url = server.url();
    let first = cotal(&["up", "--space", "main", "--nats", &url]);
    let text = stdout(&first);
    assert!(first.status.success(), "{text}");
    assert_eq!(text.matches("created ").count(), 12, "{text}");
    assert!(text.contains("created   stream CHAT_main"), "{text}");
    assert!(
        text.contains("created   consumer CHAT_main/fanout"),
        "{text}"
    );
    let second = cotal(&["up", "--space", "main", "--nats", &url]);
    let text = stdout(&second);
    assert!(second.status.success(), "{text}");
    assert!(!text.contains("created "), "{text}");
    assert!(
        text.contains("space main: nothing changed: all 12 objects already as specified"),
        "{text}"
    );

    // What the server holds is what the core specifies, field by field.
    let conn = connect(&server.config()).await.expect("connect");
    let plan = SpacePlan::new(&Space::new("main").expect("space"));
    let t = Duration::from_secs(5);
    let streams = plan
        .streams
        .iter()
        .cloned()
        .chain(plan.kv_buckets.iter().map(|b| b.stream()));
    for spec in streams {
        let info = api::request(&conn.client, &spec.info_subject(), Bytes::new(), t)
            .await
            .expect("stream info");
        assert_eq!(
            differences(&spec.to_api_config(), &info["config"]),
            Vec::<String>::new(),
            "{}",
            spec.name
        );
    }
    for spec in &plan.consumers {
        let info = api::request(&conn.client, &spec.info_subject(), Bytes::new(), t)
            .await
            .expect("consumer info");
        assert_eq!(
            differences(&spec.to_api_config(), &info["config"]),
            Vec::<String>::new(),
            "{}",
            spec.name
        );
    }

    // A stream that drifted is reported, not silently changed.
    let mut changed = plan.streams[0].clone();
    changed.max_msgs_per_subject = Some(5);
    match apply_stream(&conn.client, &changed, t).await {
        Err(ProvisionError::Drift(d)) => {
            assert_eq!(d, ["max_msgs_per_subject: wanted 5, found 1000"]);
        }
        other => panic!("expected drift, got {other:?}"),
    }
}

#[test]
fn unreachable_server_and_stub_commands_fail_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    // Nothing listens on `port` any more.
    let out = cotal(&[
        "up",
        "--space",
        "main",
        "--nats",
        &format!("nats://127.0.0.1:{port}"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("cotal: error: cannot reach NATS server at nats://127.0.0.1:"),
        "{text}"
    );
    let out = cotal(&["up", "--space", "main", "--nats", "nats://host:x"]);
    assert!(stdout(&out).starts_with("cotal: error: invalid NATS URL 'nats://host:x'"));
    let out = cotal(&["delivery", "--space", "main"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("not built yet"));
    let out = cotal(&[
        "provision",
        "agent",
        "--space",
        "main",
        "--id",
        "alice",
        "--read",
        "general",
    ]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("{\"allowSubscribe\":[\"general\"],\"revision\":1,"),
        "{text}"
    );
    assert!(text.contains("\"_INBOX_alice.>\""), "{text}");
}
