//! `cotal up` end to end against a real nats-server (skipped when `COTAL_NATS_SERVER` is unset).

mod common;

use bytes::Bytes;
use common::{Cli, NatsServer, Proc};
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

/// `cotal up --lease-ttl` (issue 19): a new space's lease bucket gets the TTL; `up` without it
/// keeps what the space was made with; another TTL for an existing space is refused as drift and
/// changes nothing.
#[tokio::test]
async fn cotal_up_lease_ttl_is_set_at_creation_and_kept_after() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let url = server.url();
    let conn = connect(&server.config()).await.expect("connect");
    let max_age_ms = || async {
        let info = api::request(
            &conn.client,
            "$JS.API.STREAM.INFO.KV_cotal_delivery_ttl",
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .expect("stream info");
        info["config"]["max_age"].as_u64().expect("max_age") / 1_000_000
    };
    let first = cotal(&["up", "--space", "ttl", "--lease-ttl", "5", "--nats", &url]);
    assert!(first.status.success(), "{}", stdout(&first));
    assert_eq!(max_age_ms().await, 5_000);
    let again = cotal(&["up", "--space", "ttl", "--nats", &url]);
    let text = stdout(&again);
    assert!(again.status.success(), "{text}");
    assert!(text.contains("nothing changed"), "{text}");
    assert_eq!(max_age_ms().await, 5_000, "kept without --lease-ttl");
    let other = cotal(&["up", "--space", "ttl", "--lease-ttl", "9", "--nats", &url]);
    let text = stdout(&other);
    assert_eq!(other.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cotal_delivery_ttl") && text.contains("max_age"),
        "the drift names the bucket and the field\n{text}"
    );
    assert_eq!(max_age_ms().await, 5_000, "left as it is");
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
    // Five streams, the reference's five buckets and Cotal's loss records, two consumers.
    assert_eq!(text.matches("created ").count(), 13, "{text}");
    assert!(text.contains("created   stream CHAT_main"), "{text}");
    assert!(text.contains("cotal_losses_main"), "{text}");
    assert!(
        text.contains("created   consumer CHAT_main/fanout"),
        "{text}"
    );
    let second = cotal(&["up", "--space", "main", "--nats", &url]);
    let text = stdout(&second);
    assert!(second.status.success(), "{text}");
    assert!(!text.contains("created "), "{text}");
    assert!(
        text.contains("space main: nothing changed: all 13 objects already as specified"),
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
    // The demo runs on the embedded simulator and reports a clean oracle verdict.
    let out = cotal(&["demo", "--seed", "7"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("oracle: clean"), "{}", stdout(&out));
    let out = cotal(&["demo", "--nats", &format!("nats://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("cotal: error: cannot reach NATS server at"),
        "{}",
        stdout(&out)
    );
    let out = cotal(&[
        "delivery",
        "--space",
        "main",
        "--nats",
        &format!("nats://127.0.0.1:{port}"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("cotal: error: cannot reach NATS server"),
        "{}",
        stdout(&out)
    );
    // Bad input fails before any connection, with one line and exit 1.
    let out = cotal(&[
        "agent",
        "--space",
        "main",
        "--id",
        "alice",
        "--join",
        "bad..name",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("cotal: error: invalid channel 'bad..name'"),
        "{}",
        stdout(&out)
    );
    let out = cotal(&[
        "send",
        "--space",
        "main",
        "--id",
        "a",
        "--channel",
        "team.>",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("cannot post to wildcard channel"),
        "{}",
        stdout(&out)
    );
    let out = cotal(&["members", "--space", "bad space"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("cotal: error: invalid space name"),
        "{}",
        stdout(&out)
    );
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

    // `--json`: the same documents, parsed; an error is `{"error"}` with the same exit code.
    let doc = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", stdout(o)))
    };
    let out = cotal(&[
        "provision",
        "agent",
        "--space",
        "main",
        "--id",
        "alice",
        "--read",
        "general",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v = doc(&out);
    assert_eq!(v["acl"]["bucket"], "cotal_acl_main", "{v}");
    assert_eq!(
        v["acl"]["record"]["allowSubscribe"],
        serde_json::json!(["general"])
    );
    let sub = v["permissions"]["subscribe"]["allow"]
        .as_array()
        .expect("list");
    assert!(sub.iter().any(|s| s == "_INBOX_alice.>"), "{v}");
    assert!(v.get("applied").is_none(), "{v}");
    let out = cotal(&[
        "provision",
        "delivery",
        "--space",
        "main",
        "--id",
        "d1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v = doc(&out);
    assert_eq!(v["id"], "d1", "{v}");
    assert!(v["permissions"]["publish"]["allow"].is_array(), "{v}");
    let unreachable = format!("nats://127.0.0.1:{port}");
    for args in [
        &["up", "--space", "main", "--json"][..],
        &["members", "--space", "main", "--json"],
        &["health", "--space", "main", "--json"],
        &["channels", "--space", "main", "--json"],
        &[
            "send",
            "--space",
            "main",
            "--id",
            "a",
            "--channel",
            "x",
            "y",
            "--json",
        ],
    ] {
        let mut all = args.to_vec();
        all.extend(["--nats", unreachable.as_str()]);
        let out = cotal(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        let v = doc(&out);
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.starts_with("cannot reach NATS server"), "{args:?}: {v}");
    }
    // `--log-format json`: every stderr line is a JSON object (here the agent's metrics line,
    // logged before its connection fails); the text logs carry no colour off a terminal.
    let args = |format: &str| {
        cotal(&[
            "-v",
            "--log-format",
            format,
            "agent",
            "--space",
            "main",
            "--id",
            "a",
            "--metrics",
            "127.0.0.1:0",
            "--nats",
            unreachable.as_str(),
        ])
    };
    let out = args("json");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("metrics: http://127.0.0.1:"))),
        "{stderr}"
    );
    let out = args("text");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metrics: http://127.0.0.1:"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes off a terminal: {stderr:?}"
    );
    let out = cotal(&["--log-format", "yaml", "members", "--space", "main"]);
    assert_eq!(out.status.code(), Some(2));
    // `--metrics` on an address already taken fails at once, before connecting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    for command in ["agent", "delivery"] {
        let out = cotal(&[
            command,
            "--space",
            "main",
            "--id",
            "a",
            "--metrics",
            &taken,
            "--nats",
            unreachable.as_str(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).starts_with(&format!("cotal: error: cannot serve metrics on {taken}")),
            "{}",
            stdout(&out)
        );
    }
    let out = cotal(&[
        "agent",
        "--space",
        "main",
        "--id",
        "a",
        "--metrics",
        "nowhere",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let out = cotal(&["members", "--space", "main", "--channel", "a..b", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(doc(&out)["error"].is_string(), "{}", stdout(&out));
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or(serde_json::Value::Null)
}

/// Sends `request` to `addr` over loopback and returns the whole answer (bounded wait).
fn http(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(common::WAIT)).expect("timeout");
    let _ = s.write_all(request);
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}

/// `GET /metrics` from `addr`: each sample line `name{labels} value` as name+labels → value.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let answer = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One sample of a scrape, 0 when absent.
fn sample(m: &std::collections::BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// The README's quick start, as a new user runs it: a server, `cotal up`, the agents' ACL
/// records, a daemon, two agents talking through stdin / stdout, the one-shot commands, and clean
/// exits (SIGTERM releases the lease, EOF and SIGINT stop the agents).
#[test]
fn quick_start_daemon_and_two_agents_over_the_cli() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = Cli::new(server.url());
    let run = |args: &[&str]| cli.run(args);
    // An open space whose channels are durable by choice (the README's quick start).
    let up = run(&["up", "--space", "demo", "--default-class", "durable"]);
    assert!(up.status.success(), "{}", stdout(&up));
    // `up --json` again: every object unchanged, as one document.
    let up = run(&["up", "--space", "demo", "--json"]);
    assert!(up.status.success(), "{}", stdout(&up));
    let v: serde_json::Value = serde_json::from_slice(&up.stdout).expect("up JSON");
    assert_eq!(v["created"], 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["unchanged"], 13, "{v}");
    let objects = v["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 13, "{v}");
    assert!(
        objects.iter().any(|o| o["kind"] == "stream"
            && o["name"] == "CHAT_demo"
            && o["result"] == "unchanged"),
        "{v}"
    );
    assert_eq!(
        v["defaultClass"],
        serde_json::json!({"result": "kept", "class": "durable"})
    );
    assert_eq!(v["maxAgentsGiven"], false, "{v}");
    for who in ["alice", "bob"] {
        let out = run(&[
            "provision",
            "agent",
            "--space",
            "demo",
            "--id",
            who,
            "--read",
            ">",
            "--apply",
        ]);
        assert!(out.status.success(), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("applied: ACL record"),
            "{}",
            stdout(&out)
        );
    }
    // `provision agent --apply --json`: the writes as `applied` entries.
    let out = run(&[
        "provision",
        "agent",
        "--space",
        "demo",
        "--id",
        "bob",
        "--read",
        ">",
        "--apply",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("provision JSON");
    let applied = v["applied"].as_array().expect("applied");
    assert_eq!(applied[0]["what"], "acl", "{v}");
    assert!(applied[0]["revision"].is_u64(), "{v}");
    assert!(
        applied[1..]
            .iter()
            .all(|a| a["what"] == "consumer" && a["result"] == "unchanged"),
        "{v}"
    );
    let spawn = |name: &'static str, args: &[&str]| cli.spawn(name, args);
    // The daemon and bob serve metrics (scraped below as traffic flows).
    let daemon_metrics = format!("127.0.0.1:{}", common::free_port());
    let bob_metrics = format!("127.0.0.1:{}", common::free_port());
    let mut daemon = spawn(
        "daemon",
        &[
            "delivery",
            "--space",
            "demo",
            "--id",
            "d1",
            "--metrics",
            &daemon_metrics,
        ],
    );
    daemon.expect("health active", |l| l.contains("health: active"));
    daemon.expect("metrics address", |l| {
        l.contains(&format!("metrics: http://{daemon_metrics}/metrics"))
    });
    let before = scrape(&daemon_metrics);
    assert_eq!(
        sample(&before, "cotal_delivery_healthy"),
        1.0,
        "{before:#?}"
    );
    assert_eq!(
        sample(&before, "cotal_delivery_lease_state{state=\"ready\"}"),
        1.0,
        "{before:#?}"
    );
    assert!(
        sample(&before, "cotal_delivery_lease_fencing_token") > 0.0,
        "{before:#?}"
    );
    for feed in [
        "members", "acl", "channels", "presence", "control", "fanout", "reader",
    ] {
        let key = format!("cotal_delivery_feed_up{{feed=\"{feed}\"}}");
        assert_eq!(sample(&before, &key), 1.0, "{key}: {before:#?}");
    }
    let mut alice = spawn(
        "alice",
        &[
            "agent", "--space", "demo", "--id", "alice", "--join", "general",
        ],
    );
    let mut bob = spawn(
        "bob",
        &[
            "agent",
            "--space",
            "demo",
            "--id",
            "bob",
            "--join",
            "general",
            "--metrics",
            &bob_metrics,
        ],
    );
    for p in [&mut alice, &mut bob] {
        let joined = json_line(&p.expect("durable join", |l| {
            let v = json_line(l);
            v["event"] == "joined" && v["channel"] == "general"
        }));
        assert_eq!(joined["durable"], true, "{joined}");
    }
    // Plain text posts to the first joined channel; bob prints it once.
    alice.type_line("hello from alice");
    let sent = json_line(&alice.expect("sent", |l| json_line(l)["event"] == "sent"));
    let got = json_line(&bob.expect("message", |l| json_line(l)["text"] == "hello from alice"));
    assert_eq!(got["from"], "alice");
    assert_eq!(got["channel"], "general");
    assert_eq!(got["historical"], false);
    assert_eq!(got["id"], sent["id"]);
    // The daemon's counters moved with the joins and the message: one copy, bob's (the sender
    // gets none). Bounded wait: the copy write and transfer follow the live delivery.
    let deadline = std::time::Instant::now() + common::WAIT;
    let after = loop {
        let m = scrape(&daemon_metrics);
        let moved = sample(&m, "cotal_delivery_copies_written_total")
            > sample(&before, "cotal_delivery_copies_written_total")
            && sample(&m, "cotal_delivery_transferred_total{path=\"direct\"}")
                + sample(&m, "cotal_delivery_transferred_total{path=\"reader\"}")
                > 0.0;
        if moved || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(&after, "cotal_delivery_copies_written_total"),
        sample(&before, "cotal_delivery_copies_written_total") + 1.0,
        "{after:#?}"
    );
    assert_eq!(
        sample(&after, "cotal_delivery_transferred_total{path=\"direct\"}")
            + sample(&after, "cotal_delivery_transferred_total{path=\"reader\"}"),
        1.0,
        "{after:#?}"
    );
    let joins = sample(&after, "cotal_delivery_joins_total{result=\"durable\"}");
    assert!(joins >= 2.0, "{after:#?}");
    // Every answered join was timed from its request.
    assert_eq!(
        sample(&after, "cotal_delivery_join_duration_seconds_count"),
        joins,
        "{after:#?}"
    );
    assert!(
        sample(&after, "cotal_delivery_join_duration_seconds_sum") > 0.0,
        "{after:#?}"
    );
    assert_eq!(
        sample(&after, "cotal_delivery_copies_lost_total{cause=\"shed\"}"),
        0.0,
        "{after:#?}"
    );
    // Bad requests get an answer and change nothing.
    assert!(http(&daemon_metrics, b"BREW /pot HTCPCP/1.0\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(http(&daemon_metrics, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    assert!(http(&daemon_metrics, &huge).starts_with("HTTP/1.1 431 "));
    // Bob's: connected, the durable backstop of general established, the message surfaced.
    let bob_m = scrape(&bob_metrics);
    assert_eq!(sample(&bob_m, "cotal_agent_connected"), 1.0, "{bob_m:#?}");
    assert_eq!(
        sample(
            &bob_m,
            "cotal_agent_channel_backstop{channel=\"general\",state=\"established\"}"
        ),
        1.0,
        "{bob_m:#?}"
    );
    assert!(
        sample(&bob_m, "cotal_agent_ledger_surfaced_total") >= 1.0,
        "{bob_m:#?}"
    );
    assert_eq!(sample(&bob_m, "cotal_agent_losses_reported_total"), 0.0);
    // Commands and a malformed line.
    bob.type_line("/frobnicate");
    bob.expect("error line", |l| {
        l.starts_with("cotal: error: unknown command '/frobnicate'")
    });
    bob.type_line("/send general reply from bob");
    alice.expect("reply", |l| json_line(l)["text"] == "reply from bob");
    // One-shot commands.
    let out = run(&[
        "send",
        "--space",
        "demo",
        "--id",
        "carol",
        "--channel",
        "general",
        "from the shell",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).trim().parse::<u64>().is_ok(),
        "{}",
        stdout(&out)
    );
    bob.expect("shell message", |l| {
        json_line(l)["text"] == "from the shell"
    });
    let out = run(&[
        "send",
        "--space",
        "demo",
        "--id",
        "carol",
        "--channel",
        "general",
        "--json",
        "json from the shell",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).expect("send JSON");
    assert_eq!(sent["stream"], "CHAT_demo", "{sent}");
    assert_eq!(sent["duplicate"], false, "{sent}");
    assert!(sent["seq"].as_u64().is_some_and(|s| s > 0), "{sent}");
    let got = json_line(&bob.expect("json message", |l| {
        json_line(l)["text"] == "json from the shell"
    }));
    assert_eq!(got["id"], sent["id"], "{got}");
    let out = run(&["members", "--space", "demo", "--channel", "general"]);
    let text = stdout(&out);
    assert!(
        text.contains("general alice generation=") && text.contains("general bob generation="),
        "{text}"
    );
    assert!(text.contains("2 membership record(s)"), "{text}");
    let out = run(&[
        "members",
        "--space",
        "demo",
        "--channel",
        "general",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let mut owners: Vec<&str> = records.iter().filter_map(|r| r["owner"].as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["alice", "bob"], "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["channel"] == "general" && r["generation"].is_u64() && r["key"].is_string()),
        "{records:?}"
    );
    let out = run(&["health", "--space", "demo", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("health JSON");
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["shards"][0]["state"], "active", "{v}");
    assert_eq!(v["shards"][0]["holder"], "d1", "{v}");
    assert_eq!(v["shards"][0]["published"]["state"], "active", "{v}");
    assert!(
        v["streams"]
            .as_array()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|s| s["low"] == false)),
        "{v}"
    );
    let out = run(&["channels", "--space", "demo", "--json"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("channels JSON");
    assert_eq!(v["channels"], serde_json::json!([]), "{v}");
    assert_eq!(v["defaults"]["deliveryClass"], "durable", "{v}");
    let out = run(&["health", "--space", "demo"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("lease.0: active (holder d1)"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("{\"state\":\"active\"}"),
        "{}",
        stdout(&out)
    );
    let out = run(&["channels", "--space", "demo"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("0 channel(s)"), "{}", stdout(&out));
    // Each message printed once although it came live and through DLV.
    bob.settle(Duration::from_millis(500));
    let copies = bob
        .seen
        .iter()
        .filter(|l| json_line(l)["text"] == "hello from alice")
        .count();
    assert_eq!(copies, 1, "{:#?}", bob.seen);
    // Clean exits: EOF stops alice, SIGINT bob, SIGTERM the daemon (its lease released).
    drop(alice.child.stdin.take());
    assert_eq!(alice.exit_code(), Some(0), "{:#?}", alice.seen);
    bob.signal("INT");
    assert_eq!(bob.exit_code(), Some(0), "{:#?}", bob.seen);
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
    let out = run(&["health", "--space", "demo"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("no delivery lease"),
        "{}",
        stdout(&out)
    );
    let out = run(&["health", "--space", "demo", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("health JSON");
    assert_eq!(v["healthy"], false, "{v}");
    assert_eq!(v["shards"], serde_json::json!([]), "{v}");
}

/// Unicast and anycast over the CLI (SPEC §12 items 5 and 6): `provision agent --role` prints
/// the `svc_<role>` grants and creates `dm_<id>` / `svc_<role>`; `/dm` and `cotal send --to`
/// reach the one instance with kind `dm`; `cotal send --role` and `/anycast` reach exactly one of
/// two `--role reviewer` agents with kind `anycast`.
#[test]
fn dm_and_anycast_over_the_cli() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = Cli::new(server.url());
    let run = |args: &[&str]| cli.run(args);
    let up = run(&["up", "--space", "demo"]);
    assert!(up.status.success(), "{}", stdout(&up));
    for (who, role) in [
        ("alice", None),
        ("bob", Some("reviewer")),
        ("carol", Some("reviewer")),
    ] {
        let mut args = vec![
            "provision",
            "agent",
            "--space",
            "demo",
            "--id",
            who,
            "--apply",
        ];
        if let Some(role) = role {
            args.extend(["--role", role]);
        }
        let out = run(&args);
        let text = stdout(&out);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("consumer DM_demo/dm_{who}")),
            "{text}"
        );
        if role.is_some() {
            assert!(
                text.contains("$JS.API.CONSUMER.MSG.NEXT.TASK_demo.svc_reviewer"),
                "{text}"
            );
            assert!(text.contains("consumer TASK_demo/svc_reviewer"), "{text}");
        }
    }
    let spawn = |name: &'static str, args: &[&str]| cli.spawn(name, args);
    let mut alice = spawn("alice", &["agent", "--space", "demo", "--id", "alice"]);
    let mut bob = spawn(
        "bob",
        &[
            "agent", "--space", "demo", "--id", "bob", "--role", "reviewer",
        ],
    );
    let mut carol = spawn(
        "carol",
        &[
            "agent", "--space", "demo", "--id", "carol", "--role", "reviewer",
        ],
    );
    for p in [&mut alice, &mut bob, &mut carol] {
        p.expect("connected", |l| json_line(l)["event"] == "connected");
    }
    // A DM typed on stdin.
    alice.type_line("/dm bob psst bob");
    let sent = json_line(&alice.expect("sent", |l| json_line(l)["event"] == "sent"));
    let got = json_line(&bob.expect("dm", |l| json_line(l)["text"] == "psst bob"));
    assert_eq!(got["kind"], "dm", "{got}");
    assert_eq!(got["from"], "alice", "{got}");
    assert_eq!(got["channel"], serde_json::Value::Null, "{got}");
    assert_eq!(got["id"], sent["id"]);
    // A DM from the shell.
    let out = run(&[
        "send", "--space", "demo", "--id", "dave", "--to", "bob", "shell dm",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let got = json_line(&bob.expect("shell dm", |l| json_line(l)["text"] == "shell dm"));
    assert_eq!(got["kind"], "dm", "{got}");
    // Anycasts from the shell and from stdin: each reaches exactly one reviewer.
    let out = run(&[
        "send", "--space", "demo", "--id", "dave", "--role", "reviewer", "task one",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    alice.type_line("/anycast reviewer task two");
    let count = |bob: &Proc, carol: &Proc, task: &str| {
        bob.seen
            .iter()
            .chain(carol.seen.iter())
            .filter(|l| json_line(l)["text"] == task)
            .count()
    };
    let deadline = std::time::Instant::now() + common::WAIT;
    while count(&bob, &carol, "task one") == 0 || count(&bob, &carol, "task two") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "tasks not received; bob {:#?} carol {:#?}",
            bob.seen,
            carol.seen
        );
        bob.settle(Duration::from_millis(50));
        carol.settle(Duration::from_millis(50));
    }
    for p in [&mut bob, &mut carol] {
        p.settle(Duration::from_millis(500));
    }
    for task in ["task one", "task two"] {
        let lines: Vec<serde_json::Value> = bob
            .seen
            .iter()
            .chain(carol.seen.iter())
            .map(|l| json_line(l))
            .filter(|v| v["text"] == task)
            .collect();
        assert_eq!(lines.len(), 1, "{task}: {lines:?}");
        assert_eq!(lines[0]["kind"], "anycast", "{lines:?}");
        assert_eq!(lines[0]["role"], "reviewer", "{lines:?}");
    }
    assert!(
        !alice.seen.iter().any(|l| json_line(l)["kind"] == "anycast"),
        "{:#?}",
        alice.seen
    );
    // Open mode: an agent nobody provisioned creates its own `dm_<id>` and gets its DMs.
    let mut erin = spawn("erin", &["agent", "--space", "demo", "--id", "erin"]);
    erin.expect("connected", |l| json_line(l)["event"] == "connected");
    alice.type_line("/dm erin hello erin");
    let got = json_line(&erin.expect("dm", |l| json_line(l)["text"] == "hello erin"));
    assert_eq!(got["kind"], "dm", "{got}");
    erin.signal("INT");
    assert_eq!(erin.exit_code(), Some(0), "{:#?}", erin.seen);
    // Exactly one routing flag.
    let out = run(&[
        "send", "--space", "demo", "--id", "dave", "--to", "bob", "--role", "reviewer", "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "bad usage");
    let out = run(&["send", "--space", "demo", "--id", "dave", "x"]);
    assert_eq!(out.status.code(), Some(2), "a route is required");
    for p in [alice, bob, carol] {
        let mut p = p;
        p.signal("INT");
        assert_eq!(p.exit_code(), Some(0), "{:#?}", p.seen);
    }
}

/// `cotal bench` on a spawned server: two members, fifty messages, nothing lost or duplicated,
/// and the last line is the JSON object scripts read.
#[test]
fn cotal_bench_small_run_loses_nothing() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let out = cotal(&[
        "bench",
        "--spawn-server",
        "--members",
        "2",
        "--messages",
        "50",
        "--timeout-s",
        "15",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON last line");
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["duplicates"], 0, "{text}");
    assert_eq!(v["members"], 2, "{text}");
    assert_eq!(v["messages"], 50, "{text}");
    assert_eq!(v["durable_complete"], true, "{text}");
    for key in [
        "ceiling_publish_per_s",
        "durable_copies_per_s",
        "messages_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {text}");
    }
}

/// `cotal bench --two-hop` (issue 17's A/B): every copy takes the reference's two hops (the
/// dinbox, then the reader's transfer), none is written straight to DLV, and every copy still
/// arrives once.
#[test]
fn cotal_bench_two_hop_sends_every_copy_through_the_reader() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let args = |two_hop: bool| {
        let mut a = vec![
            "bench",
            "--spawn-server",
            "--members",
            "2",
            "--messages",
            "40",
            "--no-live",
            "--timeout-s",
            "30",
            "--json",
        ];
        if two_hop {
            a.push("--two-hop");
        }
        a
    };
    let (v, text) = bench_json(&args(true));
    assert_eq!(v["two_hop"], true, "{text}");
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["duplicates"], 0, "{text}");
    assert_eq!(v["durable_complete"], true, "{text}");
    assert_eq!(v["daemon_transferred_direct"], 0, "{text}");
    // The same run without it writes straight to DLV.
    let (v, text) = bench_json(&args(false));
    assert_eq!(v["two_hop"], false, "{text}");
    assert!(
        v["daemon_transferred_direct"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{text}"
    );
}

/// The JSON object on the last line of a `cotal bench` run that exited 0.
fn bench_json(args: &[&str]) -> (serde_json::Value, String) {
    let out = cotal(args);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON last line");
    (v, text)
}

/// `cotal bench` measures the live path after the durable phase: every live key is there, the
/// live figures are positive, and nothing was lost on loopback.
#[test]
fn cotal_bench_reports_the_live_path() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--members",
        "2",
        "--messages",
        "50",
        "--timeout-s",
        "15",
        "--json",
    ]);
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["live_lost"], 0, "{text}");
    assert_eq!(v["live_duplicates"], 0, "{text}");
    assert_eq!(v["live_copies"], 100, "{text}");
    for key in [
        "live_messages_per_s",
        "live_copies_per_s",
        "live_p50_ms",
        "live_p99_ms",
        "live_max_ms",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {text}");
    }
    // --no-live skips it: no live key at all.
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--members",
        "1",
        "--messages",
        "10",
        "--no-live",
        "--json",
    ]);
    assert!(v.get("live_lost").is_none(), "{text}");
    assert_eq!(v["lost"], 0, "{text}");
}

/// `cotal bench --shards 2`: two daemons, shard 0 and 1 of 2, in one process; every durable copy
/// is written and handed off exactly once (the shards' counters sum to members × messages, each
/// shard's to its own owners' share), nothing lost or duplicated.
#[test]
fn cotal_bench_with_two_shards_delivers_every_copy_once() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--members",
        "6",
        "--messages",
        "50",
        "--shards",
        "2",
        "--no-live",
        "--timeout-s",
        "20",
        "--json",
    ]);
    assert_eq!(v["shards"], 2, "{text}");
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["duplicates"], 0, "{text}");
    assert_eq!(v["durable_complete"], true, "{text}");
    assert_eq!(v["daemon_copies_written"], 300, "{text}");
    assert_eq!(v["daemon_transferred"], 300, "{text}");
    let owners: Vec<u64> = serde_json::from_value(v["shard_owners"].clone()).expect("owners");
    let written: Vec<u64> =
        serde_json::from_value(v["shard_copies_written"].clone()).expect("written");
    let transferred: Vec<u64> =
        serde_json::from_value(v["shard_transferred"].clone()).expect("transferred");
    assert_eq!(owners.iter().sum::<u64>(), 6, "{text}");
    for i in 0..2 {
        assert_eq!(written[i], owners[i] * 50, "shard {i}: {text}");
        assert_eq!(transferred[i], owners[i] * 50, "shard {i}: {text}");
    }
}

/// `cotal bench --agent-procs 2`: the four members run in two `cotal bench-agents` children that
/// report back; nothing is lost or duplicated on either path, the CPU of the server, the bench
/// process and the agent processes is measured apart, and the ideal pipeline ran first. Paced
/// (100 msgs/s, so the durable phase lasts about half a second): CPU time is read in 10 ms clock
/// ticks, and a 0.1 s burst can read 0 ticks for a share.
#[test]
fn cotal_bench_with_agent_processes_measures_cpu_apart_and_the_ideal_pipeline() {
    if NatsServer::binary().is_none() || !std::path::Path::new("/proc/self/stat").exists() {
        println!("skipping: COTAL_NATS_SERVER is not set or no /proc (Linux only)");
        return;
    }
    let started = std::time::Instant::now();
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--agent-procs",
        "2",
        "--members",
        "4",
        "--messages",
        "50",
        "--rate",
        "100",
        "--timeout-s",
        "20",
        "--json",
    ]);
    assert_eq!(v["agent_procs"], 2, "{text}");
    assert_eq!(v["members"], 4, "{text}");
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["duplicates"], 0, "{text}");
    assert_eq!(v["durable_complete"], true, "{text}");
    assert_eq!(v["daemon_transferred"], 200, "{text}");
    assert_eq!(v["live_copies"], 200, "{text}");
    assert_eq!(v["live_duplicates"], 0, "{text}");
    // The daemons' threads are measured apart: a few ticks for 800 copies, maybe none.
    assert!(v["daemon_cpu_us_per_copy"].as_f64().is_some(), "{text}");
    for key in [
        "server_cpu_us_per_copy",
        "agents_cpu_us_per_copy",
        "process_cpu_us_per_copy",
        "ideal_copies_per_s",
        "ratio_to_ideal",
        "ceiling_publish_per_s",
        "ratio_to_half_ceiling",
        "durable_copies_per_s",
        "p50_ms",
        "p99_ms",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {text}");
    }
    assert!(started.elapsed() < Duration::from_secs(60), "{text}");
    // With two daemon shards and no live phase: every copy handed off once, nothing lost.
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--agent-procs",
        "2",
        "--members",
        "4",
        "--messages",
        "20",
        "--shards",
        "2",
        "--no-live",
        "--no-ideal",
        "--timeout-s",
        "20",
        "--json",
    ]);
    assert_eq!(
        (v["agent_procs"].clone(), v["shards"].clone()),
        (2.into(), 2.into()),
        "{text}"
    );
    assert_eq!(v["lost"], 0, "{text}");
    assert_eq!(v["duplicates"], 0, "{text}");
    assert_eq!(v["daemon_transferred"], 80, "{text}");
    assert!(v.get("live_lost").is_none(), "{text}");
    // In-process members (the default) have no agent processes to measure, and --no-ideal
    // skips the ideal pipeline: those keys are null. The daemons' own threads are measured
    // whatever runs beside them.
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--members",
        "1",
        "--messages",
        "10",
        "--no-live",
        "--no-ideal",
        "--json",
    ]);
    assert_eq!(v["agent_procs"], 0, "{text}");
    for key in [
        "agents_cpu_us_per_copy",
        "ideal_copies_per_s",
        "ratio_to_ideal",
    ] {
        assert!(v[key].is_null(), "{key}: {text}");
    }
    assert!(v["daemon_cpu_us_per_copy"].as_f64().is_some(), "{text}");
    assert_eq!(v["lost"], 0, "{text}");
}

/// `cotal bench --memory`: a daemon child on a space with 500 members in 20 channels holds more
/// resident memory than one on an empty space, and both are measured.
#[test]
fn cotal_bench_memory_mode_measures_the_daemon() {
    if NatsServer::binary().is_none() || !std::path::Path::new("/proc/self/status").exists() {
        println!("skipping: COTAL_NATS_SERVER is not set or no /proc (Linux only)");
        return;
    }
    let (v, text) = bench_json(&[
        "bench",
        "--spawn-server",
        "--memory",
        "--members",
        "500",
        "--channels",
        "20",
        "--json",
    ]);
    assert_eq!(v["mode"], "memory", "{text}");
    assert_eq!(v["members"], 500, "{text}");
    assert_eq!(v["channels"], 20, "{text}");
    assert_eq!(v["memberships"], 500, "{text}");
    let loaded = v["daemon_rss_kib"].as_u64().expect("daemon_rss_kib");
    let empty = v["empty_daemon_rss_kib"]
        .as_u64()
        .expect("empty_daemon_rss_kib");
    assert!(loaded > empty && empty > 0, "{text}");
    assert!(
        v["daemon_hwm_kib"].as_u64().is_some_and(|h| h >= loaded),
        "{text}"
    );
    assert!(
        v["bytes_per_membership"].as_f64().is_some_and(|b| b > 0.0),
        "{text}"
    );
}

/// `cotal demo --spawn-server`: the simulator demo's script on a real server with per-user
/// permissions; the verdict passes and each agent's figures are the ones the script implies.
#[test]
fn cotal_demo_on_a_spawned_server_passes_its_verdict() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let started = std::time::Instant::now();
    let out = cotal(&["demo", "--spawn-server"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.starts_with("cotal demo on nats://127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains("12 messages posted"), "{text}");
    assert!(text.contains("\nverdict: clean ("), "{text}");
    // alice: 7 (never her own posts); bob: 10 live/durable + 5 history after his restart;
    // carol: 4 + 2 history on her rejoin; dave: 7 + 2 history on his join of #ops.
    for line in [
        "alice received 7:",
        "bob received 15:",
        "carol received 6:",
        "dave received 9:",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    // The broker refused bob's join outside his ACL.
    assert!(text.contains("refused: bob #secret"), "{text}");
    // The post made while dave's connection was cut came through the daemon.
    assert!(
        text.lines()
            .any(|l| l.contains("via durable") && l.contains("carol post 9 on ops")),
        "{text}"
    );
    println!("cotal demo --spawn-server took {:?}", started.elapsed());
}

/// `cotal demo --nats URL` with credentials, against a server that authenticates but enforces no
/// per-user permissions: the verdict passes, and the report says the out-of-ACL join went
/// through because nothing enforced it (a note, not a violation). A wrong password fails in one
/// line.
#[test]
fn cotal_demo_against_a_given_server_with_credentials() {
    let Some(server) = NatsServer::start_with_users(vec![common::User {
        name: "admin".into(),
        password: "pw".into(),
        permissions: None,
    }]) else {
        return;
    };
    let url = server.url();
    let out = cotal(&[
        "demo",
        "--nats",
        &url,
        "--user",
        "admin",
        "--password",
        "pw",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with(&format!("cotal demo on {url} ")), "{text}");
    assert!(text.contains("\nverdict: clean ("), "{text}");
    assert!(
        text.contains("note: bob's join of #secret (outside its ACL) was accepted"),
        "{text}"
    );
    let out = cotal(&[
        "demo",
        "--nats",
        &url,
        "--user",
        "admin",
        "--password",
        "no",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("refused the credentials"), "{text}");
}

/// Issue 21 item 2: `cotal provision agent --name` binds display names to the identity in the
/// ACL record it prints (and writes with --apply) as the extra field `names`, which the daemon
/// reserves for that agent; an empty name is refused.
#[test]
fn provision_agent_name_binds_display_names_in_the_acl_record() {
    let out = cotal(&[
        "provision",
        "agent",
        "--space",
        "main",
        "--id",
        "UAKEY",
        "--read",
        "general",
        "--name",
        "Alice",
        "--name",
        "alice.w",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    let record = text
        .lines()
        .map(json_line)
        .find(|v| v["allowSubscribe"].is_array())
        .unwrap_or_else(|| panic!("no ACL record in {text}"));
    assert_eq!(
        record["names"],
        serde_json::json!(["Alice", "alice.w"]),
        "{text}"
    );
    let out = cotal(&[
        "provision",
        "agent",
        "--space",
        "main",
        "--id",
        "bob",
        "--read",
        "general",
    ]);
    assert!(!stdout(&out).contains("\"names\""), "{}", stdout(&out));
    let out = cotal(&[
        "provision",
        "agent",
        "--space",
        "main",
        "--id",
        "bob",
        "--name",
        " ",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
}

/// Issue 21 item 5 on the user's path: `cotal agent`, connected with exactly the permission
/// block `cotal provision agent` prints for bob, reads bob's loss record (written here as the
/// daemon would) and prints it as one `copies_lost` JSON line; its health shows nothing failed.
#[tokio::test]
async fn cotal_agent_prints_the_losses_recorded_for_it_under_its_provisioned_credentials() {
    use cotal_core::delivery::losses::{LossLedger, LossReason};
    use cotal_core::wire::keys::KvBucket;
    use cotal_core::wire::permissions::{AgentPolicy, Permissions};
    use cotal_core::wire::token::{AgentId, Channel};
    use cotal_driver_tokio::provision::nats_server_permissions;
    let space = Space::new("demo").expect("space");
    let policy = AgentPolicy {
        id: AgentId::new("bob").expect("id"),
        allow_subscribe: vec![Channel::new("general").expect("channel")],
        allow_publish: vec![Channel::new("general").expect("channel")],
        role: None,
        spawn: false,
    };
    let Some(server) = NatsServer::start_with_users(vec![
        common::User {
            name: "admin".into(),
            password: "adminpw".into(),
            permissions: None,
        },
        common::User {
            name: "bob".into(),
            password: "pw".into(),
            permissions: Some(nats_server_permissions(&Permissions::agent(
                &space, &policy,
            ))),
        },
    ]) else {
        return;
    };
    let cli = Cli::new(server.url());
    let admin = ["--user", "admin", "--password", "adminpw"];
    let up = cli.run(&[&["up", "--space", "demo"][..], &admin[..]].concat());
    assert!(up.status.success(), "{}", stdout(&up));
    let out = cli.run(
        &[
            &[
                "provision",
                "agent",
                "--space",
                "demo",
                "--id",
                "bob",
                "--read",
                "general",
                "--publish",
                "general",
                "--apply",
            ][..],
            &admin[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", stdout(&out));
    let mut ledger = LossLedger::new("bob");
    ledger.record_range("general", 751, 1010, 260, LossReason::DlvFull);
    let conn = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("admin");
    let js = async_nats::jetstream::new(conn.client.clone());
    js.get_key_value(KvBucket::Losses.name(&space))
        .await
        .expect("the loss bucket cotal up created")
        .put("bob", ledger.encode())
        .await
        .expect("put");
    let mut bob = cli.spawn(
        "bob",
        &[
            "agent",
            "--space",
            "demo",
            "--id",
            "bob",
            "--user",
            "bob",
            "--password",
            "pw",
        ],
    );
    let line = json_line(&bob.expect("copies_lost", |l| json_line(l)["event"] == "copies_lost"));
    assert_eq!(line["total"], 260, "{line}");
    assert_eq!(
        line["ranges"],
        serde_json::json!([{"channel": "general", "first": 751, "last": 1010, "count": 260,
                            "exact": true, "reason": "dlv-full"}]),
        "{line}"
    );
}

/// Issue 22 on the operator's path: a space past nats-server 2.15's default of 1,000 consumers
/// per stream, sized by `cotal up --max-agents`, with the clear refusal beyond its cap.
///
/// On a secured server (the operator is the allow-all manager user, as `cotal provision
/// delivery` says), a space is first provisioned the reference's way (no `max_consumers`: the
/// server's 1,000 applies). `cotal up --max-agents 1010` raises the caps in place (DLV and DM to
/// 1,010 + 64 = 1,074). 1,072 agents' `dlv_` and `dm_` consumers are created here (what `cotal
/// provision agent --apply` creates, made concurrently to keep the test quick); then the binary
/// provisions agents 1,073 and 1,074, past the old wall, and refuses the 1,075th with an error
/// naming the stream and `--max-agents`, before writing its ACL record. `cotal health` names the
/// full streams (exit 3). `cotal up` without the option keeps a larger cap an operator set;
/// `cotal up --max-agents 1300` raises it, and the refused agent is then provisioned.
#[tokio::test]
async fn cotal_up_max_agents_sizes_the_space_past_the_servers_default_cap() {
    use cotal_core::wire::config::ConsumerSpec;
    use cotal_core::wire::keys::{KvBucket, acl_key};
    use cotal_core::wire::token::AgentId;
    use cotal_driver_tokio::provision::{apply, apply_consumer};
    use futures::StreamExt;
    let started = std::time::Instant::now();
    let Some(server) = NatsServer::start_with_users(vec![common::User {
        name: "admin".into(),
        password: "adminpw".into(),
        permissions: None,
    }]) else {
        return;
    };
    let space = Space::new("big").expect("space");
    let t = Duration::from_secs(10);
    let conn = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("connect");
    let stream_info = |name: String| {
        let client = conn.client.clone();
        async move {
            api::request(
                &client,
                &format!("$JS.API.STREAM.INFO.{name}"),
                Bytes::new(),
                t,
            )
            .await
            .expect("stream info")
        }
    };
    let dlv = format!("DLV_{}", space.as_str());

    // A space as the reference provisions it: no cap of its own on any stream.
    let mut plan = SpacePlan::new(&space);
    for s in &mut plan.streams {
        s.max_consumers = None;
    }
    for b in &mut plan.kv_buckets {
        b.max_consumers = None;
    }
    let report = apply(&conn.client, &plan, t).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(
        stream_info(dlv.clone()).await["config"]["max_consumers"],
        serde_json::json!(-1)
    );

    let cli = Cli::new(server.url());
    let admin = ["--user", "admin", "--password", "adminpw"];
    let up = |extra: &[&str]| {
        let out = cli.run(&[&["up", "--space", "big"][..], extra, &admin[..]].concat());
        assert!(out.status.success(), "{}", stdout(&out));
        stdout(&out)
    };
    // An agent of a space nobody provisioned: told to run `cotal up`, nothing written.
    let out = cli.run(
        &[
            &[
                "provision",
                "agent",
                "--space",
                "nospace",
                "--id",
                "x",
                "--read",
                "general",
                "--apply",
            ][..],
            &admin[..],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("space 'nospace' is not provisioned (run `cotal up` first)"),
        "{}",
        stdout(&out)
    );

    let text = up(&["--max-agents", "1010"]);
    for stream in ["CHAT_big", "DM_big", "TASK_big", "DLV_big"] {
        assert!(
            text.contains(&format!("updated   stream {stream}\n")),
            "{text}"
        );
    }
    for bucket in ["cotal_presence_big", "cotal_channels_big"] {
        assert!(
            text.contains(&format!("updated   kv bucket {bucket}\n")),
            "{text}"
        );
    }
    assert!(text.contains("unchanged stream INBOX_big"), "{text}");
    assert!(
        text.contains("consumer caps sized for 1010 agents\n"),
        "{text}"
    );
    assert_eq!(
        stream_info(dlv.clone()).await["config"]["max_consumers"],
        serde_json::json!(1074)
    );
    assert_eq!(
        stream_info("CHAT_big".into()).await["config"]["max_consumers"],
        serde_json::json!(2084)
    );

    // 1,072 agents' consumers, past the server's 1,000.
    let ids: Vec<AgentId> = (0..1072)
        .map(|i| AgentId::new(format!("a{i}")).expect("id"))
        .collect();
    let specs: Vec<ConsumerSpec> = ids
        .iter()
        .flat_map(|id| [ConsumerSpec::dlv(&space, id), ConsumerSpec::dm(&space, id)])
        .collect();
    let made: Vec<_> = futures::stream::iter(&specs)
        .map(|s| apply_consumer(&conn.client, s, t))
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        made.iter().all(Result::is_ok),
        "{:?}",
        made.iter().find(|r| r.is_err())
    );
    let provision = |id: &str| {
        cli.run(
            &[
                &[
                    "provision",
                    "agent",
                    "--space",
                    "big",
                    "--id",
                    id,
                    "--read",
                    "general",
                    "--apply",
                ][..],
                &admin[..],
            ]
            .concat(),
        )
    };
    for id in ["late1", "late2"] {
        let out = provision(id);
        assert!(out.status.success(), "{id}: {}", stdout(&out));
    }
    assert_eq!(
        stream_info(dlv.clone()).await["state"]["consumer_count"],
        serde_json::json!(1074)
    );

    // The 1,075th is refused, clearly, and nothing of it is written.
    let out = provision("late3");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "stream DLV_big is full: 1074 consumers under its cap of 1074, sized by `cotal up \
             --max-agents`; the space admits no more agents until it is raised: `cotal up \
             --space big --max-agents <more>`"
        ),
        "{text}"
    );
    let kv = async_nats::jetstream::new(conn.client.clone())
        .get_key_value(KvBucket::Acl.name(&space))
        .await
        .expect("acl bucket");
    let late3 = AgentId::new("late3").expect("id");
    assert!(kv.get(acl_key(&late3)).await.expect("get").is_none());
    assert!(
        kv.get(acl_key(&AgentId::new("late2").expect("id")))
            .await
            .expect("get")
            .is_some()
    );

    // Health names both full streams.
    let health = cli.run(&[&["health", "--space", "big"][..], &admin[..]].concat());
    let text = stdout(&health);
    assert_eq!(health.status.code(), Some(3), "{text}");
    for stream in ["DLV_big", "DM_big"] {
        assert!(
            text.contains(&format!(
                "stream {stream}: consumer headroom low: 1074 of 1074 used, 0 free; raise it"
            )),
            "{text}"
        );
    }
    assert!(!text.contains("stream CHAT_big"), "{text}");

    // Without the option a larger cap stays; with it the space grows and late3 fits.
    let text = up(&["--max-agents", "6000"]);
    assert!(text.contains("updated   stream DLV_big"), "{text}");
    let text = up(&[]);
    assert!(text.contains("unchanged stream DLV_big"), "{text}");
    assert_eq!(
        stream_info(dlv.clone()).await["config"]["max_consumers"],
        serde_json::json!(6064)
    );
    let text = up(&["--max-agents", "1300"]);
    assert!(text.contains("updated   stream DLV_big"), "{text}");
    let out = provision("late3");
    assert!(out.status.success(), "{}", stdout(&out));
    let health = cli.run(&[&["health", "--space", "big"][..], &admin[..]].concat());
    assert!(
        stdout(&health)
            .contains("consumer headroom: every stream has at least 10 % of its cap free"),
        "{}",
        stdout(&health)
    );
    println!("took {:?}", started.elapsed());
}
