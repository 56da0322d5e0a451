//! Agent lifecycle through the `cotal` binary on a real nats-server (issue 15 item 7, G12):
//! `cotal deprovision agent` (run twice: the second finds nothing) and `cotal members --orphans`
//! with a daemon started with a short `--orphan-retention`. Skipped when `COTAL_NATS_SERVER` is
//! unset.

mod common;

use common::{Cli, NatsServer};
use std::process::Output;
use std::time::{Duration, Instant};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or(serde_json::Value::Null)
}

/// Runs `args` until `pred` holds on its stdout (bounded), returning the last output.
fn poll(cli: &Cli, args: &[&str], pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = stdout(&cli.run(args));
        if pred(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn deprovision_tombstones_through_the_daemon_is_idempotent_and_orphans_are_listed() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = Cli::new(server.url());
    let up = cli.run(&["up", "--space", "lc", "--default-class", "durable"]);
    assert!(up.status.success(), "{}", stdout(&up));
    // carol is provisioned only (no membership): deprovisioned below with --json.
    for who in ["alice", "bob", "carol"] {
        let out = cli.run(&[
            "provision",
            "agent",
            "--space",
            "lc",
            "--id",
            who,
            "--read",
            ">",
            "--apply",
        ]);
        assert!(out.status.success(), "{}", stdout(&out));
    }
    let mut daemon = cli.spawn(
        "daemon",
        &[
            "delivery",
            "--space",
            "lc",
            "--id",
            "d1",
            "--orphan-retention",
            "2s",
        ],
    );
    daemon.expect("health active", |l| l.contains("health: active"));
    for who in ["alice", "bob"] {
        let mut agent = cli.spawn(
            "agent",
            &["agent", "--space", "lc", "--id", who, "--join", "general"],
        );
        let joined = json_line(&agent.expect("durable join", |l| {
            let v = json_line(l);
            v["event"] == "joined" && v["channel"] == "general"
        }));
        assert_eq!(joined["durable"], true, "{joined}");
        // EOF: the agent stops (offline presence); its membership stays open.
        drop(agent.child.stdin.take());
        assert_eq!(agent.exit_code(), Some(0), "{:#?}", agent.seen);
    }

    // Orphans: both owners offline beyond 2 s, listed from the daemon's lease record.
    let args = ["members", "--space", "lc", "--orphans"];
    let text = poll(&cli, &args, |t| t.contains("2 orphaned membership(s) in 1"));
    assert!(
        text.contains("general alice generation=") && text.contains("general bob generation="),
        "{text}"
    );
    assert!(
        text.contains("kept: start the daemon with --reap-orphans"),
        "{text}"
    );
    daemon.expect("orphan logged", |l| {
        l.contains("orphaned membership: general alice")
    });
    // `--json`: one object per orphaned membership.
    let out = cli.run(&["members", "--space", "lc", "--orphans", "--json"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let mut owners: Vec<&str> = lines.iter().filter_map(|l| l["owner"].as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, ["alice", "bob"], "{lines:?}");
    for l in &lines {
        assert_eq!(l["channel"], "general", "{l}");
        assert_eq!(l["shard"], "lease.0", "{l}");
        assert!(l["generation"].is_u64() && l["offlineMs"].is_u64(), "{l}");
    }
    // ... and in the space's health.
    let health = stdout(&cli.run(&["health", "--space", "lc"]));
    assert!(health.contains("orphaned memberships 2"), "{health}");
    let out = cli.run(&["health", "--space", "lc", "--json"]);
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).expect("health JSON");
    assert_eq!(health["shards"][0]["orphans"], 2, "{health}");

    // Deprovision alice: the daemon tombstones, the rest is deleted.
    let out = cli.run(&["deprovision", "agent", "--space", "lc", "--id", "alice"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("tombstoned: membership general generation"),
        "{text}"
    );
    assert!(
        text.contains("deleted: ACL record cotal_acl_lc/alice"),
        "{text}"
    );
    assert!(
        text.contains("deleted: consumer") && text.contains("/dlv_alice"),
        "{text}"
    );
    assert!(text.contains("/dm_alice"), "{text}");
    assert!(
        text.contains("deprovisioned agent alice in space lc"),
        "{text}"
    );
    daemon.expect("daemon's leave", |l| l.contains("left: alice general"));
    let members = stdout(&cli.run(&["members", "--space", "lc"]));
    let alice = members
        .lines()
        .find(|l| l.starts_with("general alice "))
        .unwrap_or_else(|| panic!("{members}"));
    assert!(!alice.contains("leaveCursor=-"), "tombstoned: {alice}");

    // `--json`: one object per change, then the summary.
    let out = cli.run(&[
        "deprovision",
        "agent",
        "--space",
        "lc",
        "--id",
        "carol",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"action": "deleted", "what": "acl", "name": "cotal_acl_lc/carol"}),
            serde_json::json!({"action": "deleted", "what": "consumer", "name": "DLV_lc/dlv_carol"}),
            serde_json::json!({"action": "deleted", "what": "consumer", "name": "DM_lc/dm_carol"}),
            serde_json::json!({"done": true, "changes": 3}),
        ]
    );

    // Idempotent: the second run finds nothing.
    let out = cli.run(&["deprovision", "agent", "--space", "lc", "--id", "alice"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("nothing to do: agent alice"), "{text}");
    assert!(
        !text.contains("deleted:") && !text.contains("tombstoned:"),
        "{text}"
    );
    let out = cli.run(&[
        "deprovision",
        "agent",
        "--space",
        "lc",
        "--id",
        "alice",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(done, serde_json::json!({"done": true, "changes": 0}));
    let text = poll(&cli, &args, |t| t.contains("1 orphaned membership(s) in 1"));
    assert!(
        !text.contains(" alice "),
        "alice no longer orphaned: {text}"
    );

    // Without a daemon an open membership cannot be tombstoned: a clear error, exit 1, and the
    // ACL record is kept (the run stops at the first failed step).
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
    let out = cli.run(&["deprovision", "agent", "--space", "lc", "--id", "bob"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("no delivery daemon answered the leave"),
        "{text}"
    );
    assert!(text.contains("stopped after 0 change(s)"), "{text}");
    let out = cli.run(&[
        "deprovision",
        "agent",
        "--space",
        "lc",
        "--id",
        "bob",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], serde_json::json!({"done": false, "changes": 0}));
    let error = lines[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no delivery daemon answered the leave"),
        "{error}"
    );
    let members = stdout(&cli.run(&["members", "--space", "lc"]));
    assert!(
        members
            .lines()
            .any(|l| l.starts_with("general bob ") && l.contains("leaveCursor=-")),
        "{members}"
    );
}
