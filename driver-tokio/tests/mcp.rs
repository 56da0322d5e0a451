//! `cotal mcp` driven by the official MCP SDK's client (`rmcp`), as a coding agent's MCP client
//! would: the binary is spawned as a child process speaking MCP on stdio, against a real
//! nats-server whose users hold exactly the permission blocks `cotal provision` prints (a secured
//! space, its delivery daemon, two agents). And the tool list snapshot: what models see.

mod common;

use common::{NatsServer, User, WAIT, printed_block};
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::token::{AgentId, Role, Space};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use std::process::Output;
use std::time::{Duration, Instant};

const SPACE: &str = "mcp";

type Client = RunningService<RoleClient, ()>;

/// A change to what models see (a tool's name, description or input schema) is reviewed here.
#[test]
fn the_tool_list_models_see() {
    let tools = serde_json::to_value(cotal_driver_tokio::mcp::tools::list()).expect("json");
    insta::assert_json_snapshot!("tool_list", tools);
}

fn cotal(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cotal"))
        .args(args)
        .output()
        .expect("run cotal")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `cotal provision agent` for `id`: reads and posts on `general`, serves `role`.
fn provision(id: &'static str, role: Option<&'static str>) -> Vec<&'static str> {
    let mut args = vec![
        "provision",
        "agent",
        "--space",
        SPACE,
        "--id",
        id,
        "--read",
        "general",
        "--publish",
        "general",
    ];
    if let Some(r) = role {
        args.extend(["--role", r]);
    }
    args
}

/// `cotal ARGS` as `u`.
fn run_as(args: &[&str], url: &str, u: &User) -> Output {
    let all = with_user(args, url, u);
    cotal(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn user(name: &str, permissions: Option<String>) -> User {
    User {
        name: name.to_owned(),
        password: format!("secret-of-{name}"),
        permissions,
    }
}

fn with_user(args: &[&str], url: &str, u: &User) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.extend(["--nats", url, "--user", &u.name, "--password", &u.password].map(str::to_owned));
    all
}

/// `cotal mcp ARGS` as `u`, behind an MCP client that has initialized the session.
async fn mcp(url: &str, u: &User, args: &[&str]) -> Client {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cotal"));
    command.args(with_user(args, url, u));
    let transport = TokioChildProcess::new(command).expect("spawn cotal mcp");
    tokio::time::timeout(WAIT, ().serve(transport))
        .await
        .expect("the MCP session starts in time")
        .expect("the MCP session starts")
}

/// Calls `tool` with `args`: whether it is a tool error, and its text.
async fn call(client: &Client, tool: &str, args: Value) -> (bool, String) {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let Value::Object(o) = args {
        params.arguments = Some(o);
    }
    let result: CallToolResult = tokio::time::timeout(WAIT, client.call_tool(params))
        .await
        .unwrap_or_else(|_| panic!("{tool} answers in time"))
        .unwrap_or_else(|e| panic!("{tool}: a protocol error: {e}"));
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (result.is_error == Some(true), text)
}

/// Calls `tool` and expects a result (not a tool error), as JSON.
async fn ok(client: &Client, tool: &str, args: Value) -> Value {
    let (error, text) = call(client, tool, args).await;
    assert!(!error, "{tool} failed: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{tool}: not JSON ({e}): {text}"))
}

/// Calls `tool` and expects a tool error; returns its text.
async fn refused(client: &Client, tool: &str, args: Value) -> String {
    let (error, text) = call(client, tool, args).await;
    assert!(error, "{tool} should fail: {text}");
    assert!(!text.contains('\n'), "one line: {text}");
    text
}

/// Peeks until the waiting messages satisfy `done` (bounded), and returns them.
async fn peek_until(client: &Client, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = ok(client, "cotal_inbox", json!({"peek": true})).await;
        let messages = got["messages"].as_array().cloned().unwrap_or_default();
        if done(&messages) {
            return messages;
        }
        assert!(Instant::now() < deadline, "never came: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How far a consumer's deliveries are acknowledged, as the operator reads it:
/// `(delivered, acknowledged up to, delivered and not acknowledged)`, in consumer sequences.
async fn acks(js: &async_nats::jetstream::Context, spec: &ConsumerSpec) -> (u64, u64, usize) {
    let stream = js.get_stream(&spec.stream).await.expect("stream");
    let info = stream
        .consumer_info(&spec.name)
        .await
        .expect("consumer info");
    (
        info.delivered.consumer_sequence,
        info.ack_floor.consumer_sequence,
        info.num_ack_pending,
    )
}

/// Waits (bounded) until `spec` has delivered at least `delivered` copies and every delivered
/// one is acknowledged.
async fn all_acked(js: &async_nats::jetstream::Context, spec: &ConsumerSpec, delivered: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (d, floor, pending) = acks(js, spec).await;
        if d >= delivered && floor == d && pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: delivered {d}, acked up to {floor}, {pending} unacked",
            spec.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn texts(messages: &[Value]) -> Vec<&str> {
    messages.iter().filter_map(|m| m["text"].as_str()).collect()
}

/// Closes the session: stdin closes, `cotal mcp` closes its agent (offline presence) and exits.
async fn close(client: Client) {
    tokio::time::timeout(WAIT + WAIT, client.cancel())
        .await
        .expect("cotal mcp exits in time")
        .expect("the session closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_meet_through_cotal_mcp_on_a_secured_space() {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set");
        return;
    }
    let delivery_block = printed_block(&cotal(&[
        "provision",
        "delivery",
        "--space",
        SPACE,
        "--id",
        "dlv",
    ]));
    let users = vec![
        user("operator", None),
        user("dlv", Some(delivery_block)),
        user(
            "alice",
            Some(printed_block(&cotal(&provision("alice", None)))),
        ),
        user(
            "bob",
            Some(printed_block(&cotal(&provision("bob", Some("reviewer"))))),
        ),
    ];
    let Some(server) = NatsServer::start_with_users(users.clone()) else {
        return;
    };
    let url = server.url();
    let (operator, dlv, alice, bob) = (&users[0], &users[1], &users[2], &users[3]);
    let out = run_as(&["up", "--space", SPACE], &url, operator);
    assert!(out.status.success(), "{}", stdout(&out));
    for (id, role) in [("alice", None), ("bob", Some("reviewer"))] {
        let mut args = provision(id, role);
        args.push("--apply");
        let out = run_as(&args, &url, operator);
        assert!(out.status.success(), "{}", stdout(&out));
    }
    let mut daemon = common::Proc::spawn(
        "daemon",
        &with_user(&["delivery", "--space", SPACE, "--id", "dlv"], &url, dlv)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    daemon.expect("health active", |l| l.contains("health: active"));

    // Alice: no channel yet. The tools she is offered are the ones snapshotted.
    let a = mcp(&url, alice, &["mcp", "--space", SPACE]).await;
    let listed = tokio::time::timeout(WAIT, a.list_all_tools())
        .await
        .expect("tools listed in time")
        .expect("tools listed");
    assert_eq!(
        serde_json::to_value(&listed).expect("json"),
        serde_json::to_value(cotal_driver_tokio::mcp::tools::list()).expect("json"),
    );

    // Bad arguments are tool errors that change nothing.
    let e = refused(&a, "cotal_send", json!({"txt": "typo"})).await;
    assert!(e.contains("unknown field `txt`"), "{e}");
    let e = refused(&a, "cotal_send", json!({"text": "no channel"})).await;
    assert!(e.contains("none joined"), "{e}");
    let e = refused(&a, "cotal_inbox", json!({"limit": 0})).await;
    assert!(e.contains("out of range"), "{e}");
    let e = refused(&a, "cotal_join", json!({"channel": "not a channel!"})).await;
    assert!(e.contains("invalid channel"), "{e}");

    // A durable channel: the join reports its backstop.
    let joined = ok(&a, "cotal_join", json!({"channel": "general"})).await;
    assert_eq!(joined["joined"], true, "{joined}");
    assert_eq!(joined["durable"], true, "{joined}");
    // A channel outside her read grant: the broker refuses, a tool error, nothing changes.
    let e = refused(&a, "cotal_join", json!({"channel": "secret"})).await;
    assert!(e.contains("read ACL"), "{e}");
    let channels = ok(&a, "cotal_channels", json!({})).await;
    let names: Vec<&str> = channels["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .filter_map(|c| c["channel"].as_str())
        .collect();
    assert_eq!(names, ["general"], "{channels}");
    assert_eq!(channels["channels"][0]["class"], "durable", "{channels}");

    // Bob joins at start and serves the role `reviewer`.
    let b = mcp(
        &url,
        bob,
        &[
            "mcp", "--space", SPACE, "--join", "general", "--role", "reviewer",
        ],
    )
    .await;
    let roster = ok(&a, "cotal_roster", json!({})).await;
    let bob_entry = roster["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .find(|p| p["id"] == "bob")
        .cloned()
        .unwrap_or_else(|| panic!("bob is present: {roster}"));
    assert_eq!(bob_entry["role"], "reviewer", "{roster}");

    // A post (default channel: the one joined), a DM by name, a task for the role.
    let sent = ok(&a, "cotal_send", json!({"text": "hello bob"})).await;
    assert_eq!(sent["channel"], "general", "{sent}");
    assert!(sent["seq"].as_u64().is_some(), "{sent}");
    let dm = ok(&a, "cotal_dm", json!({"to": "bob", "text": "just you"})).await;
    assert_eq!(
        (dm["to"].as_str(), dm["present"].as_bool()),
        (Some("bob"), Some(true))
    );
    ok(
        &a,
        "cotal_anycast",
        json!({"role": "reviewer", "text": "review this"}),
    )
    .await;
    let got = peek_until(&b, |m| m.len() >= 3).await;
    let mut kinds: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            (
                m["kind"].as_str().unwrap_or_default().to_owned(),
                m["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("anycast".to_owned(), "review this".to_owned()),
            ("channel".to_owned(), "hello bob".to_owned()),
            ("dm".to_owned(), "just you".to_owned()),
        ],
        "{got:?}"
    );
    assert!(got.iter().all(|m| m["from"] == "alice"), "{got:?}");
    // `limit` bounds a result; the rest wait.
    let first = ok(&b, "cotal_inbox", json!({"peek": true, "limit": 1})).await;
    assert_eq!(first["messages"], json!([got[0]]), "{first}");
    assert_eq!(first["remaining"], 2, "{first}");
    // A peek acknowledged nothing: the DM and the task are delivered and unacked.
    let space = Space::new(SPACE).expect("space");
    let bob_id = AgentId::new("bob").expect("id");
    let dm_bob = ConsumerSpec::dm(&space, &bob_id);
    let svc = ConsumerSpec::svc(&space, &Role::new("reviewer").expect("role"));
    let dlv_bob = ConsumerSpec::dlv(&space, &bob_id);
    let operator_conn =
        cotal_driver_tokio::connect(&server.config_as("operator", &operator.password))
            .await
            .expect("operator connects");
    let js = async_nats::jetstream::new(operator_conn.client.clone());
    assert_eq!(acks(&js, &dm_bob).await, (1, 0, 1));
    assert_eq!(acks(&js, &svc).await, (1, 0, 1));
    // A call returns the same three once, and then (once the result is written) acks them; the
    // next call returns none.
    let taken = ok(&b, "cotal_inbox", json!({})).await;
    assert_eq!(taken["messages"], Value::Array(got.clone()), "{taken}");
    all_acked(&js, &dm_bob, 1).await;
    all_acked(&js, &svc, 1).await;
    let again = ok(&b, "cotal_inbox", json!({})).await;
    assert_eq!(again["messages"], json!([]), "{again}");
    close(b).await;

    // Bob is away; Alice posts three. Bob's next life gets them (the durable backstop's copies,
    // or the rejoin's backfill of the same ids, whichever comes first: one surfacing per id), in
    // order, once; the second call returns none.
    for i in 1..=3 {
        ok(&a, "cotal_send", json!({"text": format!("away {i}")})).await;
    }
    let b = mcp(
        &url,
        bob,
        &[
            "mcp", "--space", SPACE, "--join", "general", "--role", "reviewer",
        ],
    )
    .await;
    let away = |m: &[Value]| -> Vec<String> {
        texts(m)
            .into_iter()
            .filter(|t| t.starts_with("away "))
            .map(str::to_owned)
            .collect()
    };
    let waiting = peek_until(&b, |m| away(m).len() >= 3).await;
    let taken = ok(&b, "cotal_inbox", json!({})).await;
    let messages = taken["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(messages, waiting, "{taken}");
    assert_eq!(away(&messages), ["away 1", "away 2", "away 3"], "{taken}");
    assert_eq!(taken["remaining"], 0, "{taken}");
    let again = ok(&b, "cotal_inbox", json!({})).await;
    assert_eq!(again["messages"], json!([]), "{again}");
    // Every durable copy of bob's (the first life's "hello bob", the three) is acked, and the
    // status counts no loss.
    all_acked(&js, &dlv_bob, 4).await;
    let status = ok(&b, "cotal_status", json!({})).await;
    assert_eq!(status["losses"]["live_messages_lost"], 0, "{status}");
    assert_eq!(status["inbox"]["awaiting_delivery"], 0, "{status}");
    close(b).await;
    close(a).await;

    // The only permission the broker refused is the join outside alice's grant.
    let log = server.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(!refused.is_empty(), "{log}");
    assert!(
        refused
            .iter()
            .all(|l| l.contains("Subscription Violation") && l.contains(".secret\"")),
        "{refused:#?}"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
}
