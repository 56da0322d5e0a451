//! The CI smoke of `cotal chaos` (issue 9, faults half): a short run on a spawned server with
//! one SIGKILL of the delivery daemon and a successor; short runs with server restarts, with a
//! network partition of the daemon and with a stuck member (issue 19). The long runs are opt-in:
//! `cotal chaos --spawn-server --seed S --duration 300 --json`.

mod common;

use common::{Cli, NatsServer, Proc};
use std::process::Command;
use std::time::Duration;

/// `cotal chaos --spawn-server <args> --json`, or `None` (said on stdout) without a server
/// binary.
fn chaos(args: &[&str]) -> Option<std::process::Output> {
    if std::env::var_os("COTAL_NATS_SERVER").is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return None;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cotal"))
        .args(["chaos", "--spawn-server"])
        .args(args)
        .arg("--json")
        .output()
        .expect("run cotal chaos");
    Some(out)
}

/// The JSON object on the last line of a run that exited 0, and the run's text.
fn verdict(out: &std::process::Output) -> (serde_json::Value, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON last line");
    (v, text)
}

/// Ten seconds of traffic, one daemon kill: every expected durable copy lands in DLV or is
/// reported lost (losses unreported = 0), nothing is surfaced twice, and the last line is the
/// JSON object with the issue's fields.
#[test]
fn chaos_smoke_daemon_sigkill_leaves_no_unreported_loss() {
    let Some(out) = chaos(&[
        "--seed",
        "3",
        "--duration",
        "10",
        "--members",
        "2",
        "--rate",
        "10",
        "--faults",
        "daemon-kill",
        "--churn",
        "0",
        "--heal-s",
        "90",
    ]) else {
        return;
    };
    let (v, text) = verdict(&out);
    assert_eq!(v["faults_injected"], 1, "{text}");
    assert_eq!(v["losses_unreported"], 0, "{text}");
    assert_eq!(v["duplicates_surfaced"], 0, "{text}");
    let messages = v["messages"].as_u64().expect("messages");
    assert!(messages >= 50, "{text}");
    assert_eq!(v["copies_expected"].as_u64(), Some(messages * 2), "{text}");
    for key in ["delivered", "duplicates_suppressed", "losses_reported"] {
        assert!(v[key].is_u64(), "{key}: {text}");
    }
    // The recovery figures: one takeover (the kill to the successor's first DLV write, which
    // waits out the dead holder's lease), no server fault to heal from.
    let takeovers = v["takeovers_s"].as_array().expect("takeovers_s");
    assert_eq!(takeovers.len(), 1, "{text}");
    assert!(takeovers[0].as_f64().is_some_and(|t| t > 0.0), "{text}");
    assert!(v["heal_s"].is_null(), "{text}");
    assert!(v["stall_s"].as_f64().is_some_and(|s| s > 0.0), "{text}");
}

/// A standby daemon and a 4 s lease TTL (issue 19): after the holder's SIGKILL the standby
/// takes over once the dead holder's lease expires, seconds later, not after the reference's
/// 30 s; the daemon read the TTL from the lease bucket the run provisioned.
#[test]
fn chaos_smoke_a_standby_takes_over_within_the_lease_ttl() {
    let Some(out) = chaos(&[
        "--seed",
        "3",
        "--duration",
        "12",
        "--members",
        "2",
        "--rate",
        "10",
        "--faults",
        "daemon-kill",
        "--churn",
        "0",
        "--standby",
        "--lease-ttl",
        "4",
        "--heal-s",
        "60",
    ]) else {
        return;
    };
    let (v, text) = verdict(&out);
    assert_eq!(
        (v["standby"].as_bool(), v["lease_ttl_s"].as_u64()),
        (Some(true), Some(4))
    );
    assert_eq!(v["faults_injected"], 1, "{text}");
    assert_eq!(v["losses_unreported"], 0, "{text}");
    assert_eq!(v["duplicates_surfaced"], 0, "{text}");
    assert_eq!(v["daemon_exits"], 0, "{text}");
    let takeovers = v["takeovers_s"].as_array().expect("takeovers_s");
    assert_eq!(takeovers.len(), 1, "{text}");
    // Measured 4.1–4.7 s with a 6 s TTL; a successor waiting out the reference's 30 s fails.
    assert!(
        takeovers[0].as_f64().is_some_and(|t| t > 0.0 && t < 12.0),
        "{text}"
    );
    assert!(
        text.contains("(standby)"),
        "the killed holder's process comes back as the standby\n{text}"
    );
}

/// Fifteen seconds of traffic with nats-server stopped (SIGTERM) or killed (SIGKILL) and
/// restarted on the same port and file store, and a member leaving and rejoining: every copy
/// the membership records owe a member (an acked message inside one of its intervals) is
/// surfaced or reported lost, and nothing is surfaced twice.
#[test]
fn chaos_smoke_server_restarts_leave_no_unreported_loss() {
    let Some(out) = chaos(&[
        "--seed",
        "4",
        "--duration",
        "15",
        "--members",
        "2",
        "--rate",
        "10",
        "--faults",
        "server-stop,server-kill",
        "--fault-count",
        "2",
        "--churn",
        "1",
        "--heal-s",
        "15",
    ]) else {
        return;
    };
    let (v, text) = verdict(&out);
    assert_eq!(v["faults_injected"], 2, "{text}");
    assert_eq!(v["losses_unreported"], 0, "{text}");
    assert_eq!(v["duplicates_surfaced"], 0, "{text}");
    assert_eq!(v["durable_outside_intervals"], 0, "{text}");
    let expected = v["copies_expected"].as_u64().expect("copies expected");
    assert!(expected >= 100, "{text}");
    assert_eq!(v["delivered"].as_u64(), Some(expected), "{text}");
    // One heal per server restart, measured from when the server accepted connections again.
    // What the consumer had offered to the daemon's feed when the server went down is read back
    // at the rebind (issue 19), not left to its 60 s ack_wait: measured well under 5 s; the
    // bound here leaves room for a loaded CI machine and still fails on the ack_wait.
    let heals = v["heals_s"].as_array().expect("heals_s");
    assert_eq!(heals.len(), 2, "{text}");
    for h in heals {
        assert!(h.as_f64().is_some_and(|h| h < 15.0), "heal {h}: {text}");
    }
    assert!(v["takeover_s"].is_null(), "{text}");
    // The daemon rode both restarts out: it never exited.
    assert_eq!(v["daemon_exits"], 0, "{text}");
}

/// Twenty-five seconds of traffic with the daemon cut off the network once (its namespace's
/// veth link down for 5–10 s while it and the server live, then up): every owed copy is
/// surfaced or reported lost, nothing is surfaced twice, the daemon rode the partition out, and
/// the partition has its heal. Skipped, with the reason printed, where network namespaces or
/// veth pairs are refused (not root, no `ip`).
#[test]
fn chaos_smoke_partition_leaves_no_unreported_loss() {
    let Some(out) = chaos(&[
        "--seed",
        "3",
        "--duration",
        "25",
        "--members",
        "2",
        "--rate",
        "10",
        "--faults",
        "partition",
        "--fault-count",
        "1",
        "--churn",
        "0",
        "--heal-s",
        "40",
    ]) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    // The run's one error line (on stdout) says why namespaces are refused here.
    if !out.status.success()
        && let Some(why) = text
            .lines()
            .chain(err.lines())
            .find(|l| l.contains("partitions are unavailable here"))
    {
        println!("skipping: {}", why.trim());
        return;
    }
    assert!(out.status.success(), "{text}\n{err}");
    let last = text.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON last line");
    assert_eq!(v["fault_counts"]["partition"], 1, "{text}");
    assert_eq!(v["losses_unreported"], 0, "{text}");
    assert_eq!(v["duplicates_surfaced"], 0, "{text}");
    assert_eq!(v["durable_outside_intervals"], 0, "{text}");
    assert_eq!(v["daemon_exits"], 0, "{text}");
    let expected = v["copies_expected"].as_u64().expect("copies expected");
    assert!(expected >= 200, "{text}");
    assert_eq!(v["delivered"].as_u64(), Some(expected), "{text}");
    // The partition's heal: from the link up to the DLV write of the last copy owed then (seen:
    // 5.8 s on this seed, 1.2 s on seed 4); the bound is the server restarts' one.
    let heals = v["heals_s"].as_array().expect("heals_s");
    assert_eq!(heals.len(), 1, "{text}");
    assert!(
        heals[0].as_f64().is_some_and(|h| (0.0..15.0).contains(&h)),
        "heal {}: {text}",
        heals[0]
    );
    assert!(v["takeover_s"].is_null(), "{text}");
}

/// Thirty seconds of traffic with one member stuck for 9.5 s (its application takes and acks
/// nothing, so its DLV copies pile up unacked) while two others keep receiving: nothing is lost
/// unreported or surfaced twice, the stuck member caught up after its resume, and the others'
/// DLV rate during the stall is compared with the window before it.
#[test]
fn chaos_smoke_stuck_member_catches_up_and_the_others_keep_receiving() {
    let Some(out) = chaos(&[
        "--seed",
        "3",
        "--duration",
        "30",
        "--members",
        "3",
        "--faults",
        "stuck-member",
        "--fault-count",
        "1",
        "--churn",
        "0",
        "--late-joiners",
        "0",
        "--heal-s",
        "40",
    ]) else {
        return;
    };
    let (v, text) = verdict(&out);
    assert_eq!(v["fault_counts"]["stuck-member"], 1, "{text}");
    assert_eq!(v["losses_unreported"], 0, "{text}");
    assert_eq!(v["duplicates_surfaced"], 0, "{text}");
    assert_eq!(v["daemon_exits"], 0, "{text}");
    let expected = v["copies_expected"].as_u64().expect("copies expected");
    assert_eq!(v["delivered"].as_u64(), Some(expected), "{text}");
    let stuck = &v["stuck_member"];
    // A 20 s slot: a stall of (20 − 1) / 2 = 9.5 s.
    assert!(
        stuck["stall_s"]
            .as_f64()
            .is_some_and(|s| (9.0..=10.5).contains(&s)),
        "{text}"
    );
    assert_eq!(stuck["others"], 2, "{text}");
    // The stall was real: copies were left unacked on the member's DLV consumer at the resume,
    // and none after the heal.
    assert!(
        stuck["dlv_unacked_at_resume"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{text}"
    );
    assert_eq!(stuck["dlv_unacked_after_heal"], 0, "{text}");
    assert_eq!(stuck["caught_up"], true, "{text}");
    assert!(stuck["catch_up_s"].is_f64(), "{text}");
    // The others kept receiving: about the rate of the window before (issue 19 asks ≥ 0.8 at
    // 60 s; this short stall stays far below every cap, so the bound here is only a sanity one).
    assert!(
        stuck["others_copies_per_s_before"]
            .as_f64()
            .is_some_and(|r| r > 10.0),
        "{text}"
    );
    let ratio = stuck["ratio"].as_f64().expect("ratio");
    assert!((0.5..=2.0).contains(&ratio), "{text}");
}

/// An open space, durable by choice (its default would be live), and `agents` provisioned to
/// read every channel, through the binary.
fn open_durable_space(cli: &Cli, space: &str, agents: &[&str]) {
    let up = cli.run(&["up", "--space", space, "--default-class", "durable"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stdout)
    );
    for who in agents {
        let out = cli.run(&[
            "provision",
            "agent",
            "--space",
            space,
            "--id",
            who,
            "--read",
            ">",
            "--apply",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The members bucket as a KV watch sees it: every put, in order, with the time it arrived.
struct Revision {
    at: std::time::Instant,
    key: String,
    revision: u64,
    writer: String,
    fence: Option<u64>,
}

/// Watches `cotal_members_<space>` from the start and collects every record written.
fn watch_members(
    rt: &tokio::runtime::Runtime,
    url: String,
    space: String,
) -> std::sync::Arc<std::sync::Mutex<Vec<Revision>>> {
    use futures::StreamExt;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&out);
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let started = std::sync::Arc::clone(&ready);
    rt.spawn(async move {
        let client = async_nats::connect(url).await.expect("connect the watcher");
        let js = async_nats::jetstream::new(client);
        let kv = js
            .get_key_value(format!("cotal_members_{space}"))
            .await
            .expect("members bucket");
        let mut watch = kv.watch_all().await.expect("watch members");
        started.wait();
        while let Some(next) = watch.next().await {
            let entry = match next {
                Ok(e) => e,
                Err(e) => {
                    println!("members watch error: {e}");
                    continue;
                }
            };
            let v: serde_json::Value =
                serde_json::from_slice(&entry.value).unwrap_or(serde_json::Value::Null);
            sink.lock().expect("watch log").push(Revision {
                at: std::time::Instant::now(),
                key: entry.key.clone(),
                revision: entry.revision,
                writer: v["writerIdentity"].as_str().unwrap_or_default().to_owned(),
                fence: v["fence"].as_u64(),
            });
        }
    });
    ready.wait();
    out
}

/// The fencing token in a daemon's `lease: Acquired { token: FencingToken(N) }` line: the
/// revision of its acquiring create.
fn acquired_token(line: &str) -> u64 {
    line.split("FencingToken(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}

/// The lease key's revision (the fencing token) and holder, read through `cotal health`'s
/// bucket directly.
fn lease_of(rt: &tokio::runtime::Runtime, url: &str, space: &str) -> Option<(u64, String)> {
    let url = url.to_owned();
    let space = space.to_owned();
    rt.block_on(async move {
        let client = async_nats::connect(url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let kv = js
            .get_key_value(format!("cotal_delivery_{space}"))
            .await
            .ok()?;
        let entry = kv.entry("lease.0").await.ok()??;
        let v: serde_json::Value = serde_json::from_slice(&entry.value).ok()?;
        Some((entry.revision, v["holder"].as_str()?.to_owned()))
    })
}

/// Issue 9, lease fight on a real server: daemon d1 holds the lease and is frozen with SIGSTOP
/// past the lease TTL (30 s); d2, started at the freeze, takes the lease once the bucket's
/// max_age removed d1's last renewal. While d1 is frozen, agents join and leave (their control
/// requests may sit unread in d1's socket). Then d1 gets SIGCONT. Asserted:
///
/// - every membership record written after d2's takeover is written by d2 with d2's fencing
///   token (the lease revision), none by d1 — d1's buffered requests found no fencing token;
/// - d1 notices: it logs the lease as lost and, alive, starts over with a fresh lease: it
///   contends as a standby while d2 holds the lease, writing nothing (issue 19: a daemon rides
///   a lost lease out in process);
/// - the lease record names d2 at the end.
///
/// Takes about 45 s (the protocol's 30 s lease TTL is not configurable from the CLI).
#[test]
fn lease_fight_sigstop_past_ttl_deposed_daemon_writes_nothing() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let url = server.url();
    let space = "lease";
    let cli = Cli::new(url.clone());
    let spawn = |name: &'static str, args: &[&str]| cli.spawn(name, args);
    open_durable_space(&cli, space, &["a1", "a2", "a3"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let records = watch_members(&rt, url.clone(), space.to_owned());

    let mut d1 = spawn("d1", &["delivery", "--space", space, "--id", "d1"]);
    let fence1 = acquired_token(&d1.expect("d1 acquired", |l| l.contains("Acquired")));
    d1.expect("d1 active", |l| l.contains("health: active"));
    let (_, holder) = lease_of(&rt, &url, space).expect("d1's lease");
    assert_eq!(holder, "d1");
    let mut a1 = spawn(
        "a1",
        &["agent", "--space", space, "--id", "a1", "--join", "general"],
    );
    let joined = a1.expect("a1 joined", |l| l.contains("\"event\":\"joined\""));
    assert!(joined.contains("\"durable\":true"), "{joined}");

    // Freeze d1; d2 contends, then takes the lease when d1's entry expires.
    d1.signal("STOP");
    let frozen = std::time::Instant::now();
    // Sent while d1 is the only responder: the request waits unread in d1's socket (the agent
    // retries and, once d2 serves, gets its answer from d2).
    a1.type_line("/leave general");
    let mut d2 = spawn("d2", &["delivery", "--space", space, "--id", "d2"]);
    let line = d2.wait_for(Duration::from_secs(45), |l| l.contains("health: active"));
    assert!(line.is_some(), "d2 never became active: {:#?}", d2.seen);
    let takeover = std::time::Instant::now();
    assert!(
        takeover - frozen >= Duration::from_secs(10),
        "d2 took the lease {:?} after the freeze: d1's lease had not expired",
        takeover - frozen
    );
    let fence2 = acquired_token(&d2.expect("d2 acquired", |l| l.contains("Acquired")));
    let (_, holder) = lease_of(&rt, &url, space).expect("d2's lease");
    assert_eq!(holder, "d2");
    assert!(fence2 > fence1, "fence {fence2} after {fence1}");

    // Membership traffic while d1 is still frozen: two joins (and a1's leave, sent at the freeze
    // while d1 was still the only responder).
    let mut a2 = spawn(
        "a2",
        &["agent", "--space", space, "--id", "a2", "--join", "general"],
    );
    let mut a3 = spawn(
        "a3",
        &["agent", "--space", space, "--id", "a3", "--join", "general"],
    );
    a1.expect("a1's leave ends", |l| {
        l.contains("\"event\":\"left\"") || l.contains("\"event\":\"leave_failed\"")
    });
    for a in [&mut a2, &mut a3] {
        let joined = a.expect("joined", |l| l.contains("\"event\":\"joined\""));
        assert!(joined.contains("\"durable\":true"), "{joined}");
    }

    // Wake d1: it must see its lease gone and write nothing.
    d1.signal("CONT");
    let lost = d1.wait_for(Duration::from_secs(20), |l| l.contains("Lost {"));
    let over = d1.wait_for(Duration::from_secs(10), |l| l.contains("starting over"));
    d1.settle(Duration::from_millis(200));
    // Quiet period for any write d1 might still attempt to land.
    a2.type_line("/leave general");
    a2.expect("a2 left", |l| l.contains("\"event\":\"left\""));
    std::thread::sleep(Duration::from_secs(2));

    let log = records.lock().expect("watch log");
    let after: Vec<&Revision> = log.iter().filter(|r| r.at >= takeover).collect();
    assert!(
        after.len() >= 3,
        "the joins and leaves after the takeover wrote records: {} seen; all: {:?}; members: {}; a1: {:#?}; d2: {:#?}",
        after.len(),
        log.iter()
            .map(|r| (
                r.key.as_str(),
                r.revision,
                r.writer.as_str(),
                r.at >= takeover
            ))
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&cli.run(&["members", "--space", space]).stdout),
        a1.seen,
        d2.seen
    );
    for r in &after {
        assert_eq!(
            r.writer, "d2",
            "{} revision {} written by {} after the takeover",
            r.key, r.revision, r.writer
        );
        assert_eq!(r.fence, Some(fence2), "{} revision {}", r.key, r.revision);
    }
    assert!(
        log.iter()
            .filter(|r| r.at < frozen)
            .all(|r| r.writer == "d1" && r.fence == Some(fence1)),
        "before the freeze every record is d1's"
    );
    drop(log);
    assert!(
        lost.as_deref()
            .is_some_and(|l| l.contains("DeadlinePassed")),
        "d1 did not report its lease lost: {:#?}",
        d1.seen
    );
    assert!(over.is_some(), "d1 starts over in process: {:#?}", d1.seen);

    assert_eq!(
        lease_of(&rt, &url, space).map(|l| l.1).as_deref(),
        Some("d2")
    );
    d2.signal("TERM");
    assert_eq!(d2.exit_code(), Some(0), "{:#?}", d2.seen);
    // d1 stood by all along: a clean stop releases nothing (the key was never its again).
    d1.signal("TERM");
    assert_eq!(d1.exit_code(), Some(0), "{:#?}", d1.seen);
}

/// Publishes `n` chat messages on `channel` from `pub` and returns their ids in order (every
/// publish acked by CHAT).
fn publish_batch(
    rt: &tokio::runtime::Runtime,
    url: &str,
    space: &str,
    channel: &str,
    tag: &str,
    n: usize,
) -> Vec<String> {
    let url = url.to_owned();
    let (space, channel, tag) = (space.to_owned(), channel.to_owned(), tag.to_owned());
    rt.block_on(async move {
        let client = async_nats::connect(url)
            .await
            .expect("connect the publisher");
        let js = async_nats::jetstream::new(client);
        let mut ids = Vec::new();
        let mut acks = Vec::new();
        for i in 0..n {
            let id = format!("00000000-0000-4000-8000-{tag}{i:08}");
            let body = serde_json::json!({"id": id, "ts": 1_700_000_000_000u64 + i as u64,
                "space": space, "from": {"id": "pub", "name": "pub"}, "channel": channel,
                "parts": [{"kind": "text", "text": format!("m{i}")}]});
            let ack = js
                .send_publish(
                    format!("cotal.{space}.chat.pub.{channel}"),
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(body.to_string().into())
                        .message_id(id.clone()),
                )
                .await
                .expect("publish");
            acks.push(ack);
            ids.push(id);
        }
        for a in acks {
            a.await.expect("CHAT ack");
        }
        ids
    })
}

/// The `dlv_<owner>` consumer's ack floor (a DLV stream sequence) and its outstanding counts.
fn dlv_state(rt: &tokio::runtime::Runtime, url: &str, space: &str, owner: &str) -> (u64, u64, u64) {
    let (url, space, owner) = (url.to_owned(), space.to_owned(), owner.to_owned());
    rt.block_on(async move {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(format!("DLV_{space}")).await.expect("DLV");
        let mut c = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!("dlv_{owner}"))
            .await
            .expect("dlv consumer");
        let info = c.info().await.expect("consumer info");
        (
            info.ack_floor.stream_sequence,
            info.num_ack_pending as u64,
            info.num_pending,
        )
    })
}

/// Message id of every DLV copy stored for `owner`, by DLV stream sequence.
fn dlv_copies(
    rt: &tokio::runtime::Runtime,
    url: &str,
    space: &str,
    owner: &str,
) -> std::collections::BTreeMap<u64, String> {
    let (url, space, owner) = (url.to_owned(), space.to_owned(), owner.to_owned());
    rt.block_on(async move {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(format!("DLV_{space}")).await.expect("DLV");
        let last = stream.info().await.expect("DLV info").state.last_sequence;
        let subject = format!("cotal.{space}.dlv.{owner}");
        let mut out = std::collections::BTreeMap::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await
                && m.subject.as_str() == subject
            {
                let v: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                if let Some(id) = v["id"].as_str() {
                    out.insert(seq, id.to_owned());
                }
            }
        }
        out
    })
}

/// A `cotal agent` line that is a surfaced message (not an event).
fn is_message_line(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .is_ok_and(|v| v.get("event").is_none() && v["id"].is_string())
}

/// The message ids an agent process printed, in order: with `historical`, the join's history
/// backfill (lines flagged `"historical":true`), else the live and durable deliveries.
fn printed_ids(p: &Proc, historical: bool) -> Vec<String> {
    p.seen
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_none() && v["historical"].as_bool() == Some(historical))
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

/// Every message id an agent process printed (history, live and durable), in order.
fn all_ids(p: &Proc) -> Vec<String> {
    p.seen
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_none())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

/// The live and durable deliveries an agent process printed, in order.
fn surfaced_ids(p: &Proc) -> Vec<String> {
    printed_ids(p, false)
}

/// Issue 9, agent crash around the ack. The guarantee, stated: a durable copy is acked only
/// after the application took it (`handled`), so a copy surfaced and not yet acked when the
/// agent dies is surfaced again by its next life (at-least-once; the application sees the same
/// message id again and can drop it across restarts only if it persists the ids it handled).
/// A copy whose ack reached the server is never surfaced again as a delivery. (A restarted
/// agent's join also backfills recent history from CHAT; those lines carry `historical: true`
/// and are not deliveries: the application tells them apart by the flag. They are counted,
/// not judged.)
///
/// - Kill 1 (SIGKILL) while 300 messages are being surfaced: every message is surfaced at least
///   once over the two lives, no life surfaces one twice, and the messages surfaced by both lives
///   are all among those whose DLV copy was not acked at the kill (the consumer's ack floor).
/// - Kill 2 after every copy is acked: the third life surfaces none of the old messages (only a
///   fresh one posted after it started).
///
/// Opt-in (about 90 s): copies delivered to the dead process come back after the DLV
/// consumer's ack_wait, 60 s. `cargo test -p cotal-driver-tokio --test chaos -- --ignored`.
#[test]
#[ignore = "long (about 90 s: the DLV ack_wait); run with --ignored"]
fn agent_crash_between_surfacing_and_ack_resurfaces_only_unacked_copies() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let url = server.url();
    let space = "ack";
    let cli = Cli::new(url.clone());
    let spawn = |name: &'static str, args: &[&str]| cli.spawn(name, args);
    for args in [
        vec!["up", "--space", space, "--default-class", "durable"],
        vec![
            "provision",
            "agent",
            "--space",
            space,
            "--id",
            "r",
            "--read",
            ">",
            "--apply",
        ],
    ] {
        let out = cli.run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut daemon = spawn("daemon", &["delivery", "--space", space, "--id", "d"]);
    daemon.expect("active", |l| l.contains("health: active"));
    let agent = ["agent", "--space", space, "--id", "r", "--join", "general"];
    let mut life1 = spawn("life1", &agent);
    let joined = life1.expect("joined", |l| l.contains("\"event\":\"joined\""));
    assert!(joined.contains("\"durable\":true"), "{joined}");

    // Kill 1: in the middle of surfacing.
    let ids = publish_batch(&rt, &url, space, "general", "1", 300);
    let mut surfaced = 0;
    while surfaced < 100 {
        let line = life1.wait_for(common::WAIT, is_message_line);
        assert!(line.is_some(), "life1 surfaced only {surfaced}");
        surfaced += 1;
    }
    life1.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let (floor, _, _) = dlv_state(&rt, &url, space, "r");
    let copies = dlv_copies(&rt, &url, space, "r");
    let acked_at_kill: std::collections::BTreeSet<String> =
        copies.range(..=floor).map(|(_, id)| id.clone()).collect();
    life1.settle(Duration::from_millis(100));
    let first = surfaced_ids(&life1);
    assert!(
        !acked_at_kill.is_empty(),
        "no DLV copy was acked before the kill (floor {floor}): the test proves nothing"
    );

    let mut life2 = spawn("life2", &agent);
    let everything: std::collections::BTreeSet<&String> = ids.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        life2.settle(Duration::from_millis(500));
        // The application saw a message if any line carried it, history included (the
        // ledger then takes its durable copy as a duplicate and acks it without surfacing).
        let seen: std::collections::BTreeSet<String> =
            all_ids(&life1).into_iter().chain(all_ids(&life2)).collect();
        if everything.iter().all(|id| seen.contains(*id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every message surfaced within 120 s: {} of {}",
            everything.iter().filter(|id| seen.contains(**id)).count(),
            everything.len()
        );
    }
    let second = surfaced_ids(&life2);
    for (life, list) in [("life1", all_ids(&life1)), ("life2", all_ids(&life2))] {
        let set: std::collections::BTreeSet<&String> = list.iter().collect();
        assert_eq!(set.len(), list.len(), "{life} surfaced a message twice");
    }
    let first_set: std::collections::BTreeSet<&String> = first.iter().collect();
    let again: Vec<&String> = second.iter().filter(|id| first_set.contains(id)).collect();
    for id in &again {
        assert!(
            !acked_at_kill.contains(*id),
            "{id} was surfaced again although its DLV copy was acked before the kill: {:?}",
            life2
                .seen
                .iter()
                .filter(|l| l.contains(id.as_str()))
                .collect::<Vec<_>>()
        );
    }
    println!(
        "kill 1: {} surfaced before the kill, {} DLV copies acked (floor {floor}), {} surfaced \
         again after the restart (all unacked at the kill), {} history lines on the rejoin",
        first.len(),
        acked_at_kill.len(),
        again.len(),
        printed_ids(&life2, true).len()
    );

    // Kill 2: after every copy is acked (the copies delivered to the dead life come back to
    // life2 after the DLV ack_wait, 60 s, and are surfaced again: allowed, and checked below).
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (_, ack_pending, pending) = dlv_state(&rt, &url, space, "r");
        if ack_pending == 0 && pending == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "copies still unacked");
        std::thread::sleep(Duration::from_millis(200));
    }
    life2.settle(Duration::from_millis(300));
    let second = surfaced_ids(&life2);
    let all2 = all_ids(&life2);
    let set: std::collections::BTreeSet<&String> = all2.iter().collect();
    assert_eq!(set.len(), all2.len(), "life2 surfaced a message twice");
    let again: Vec<&String> = second.iter().filter(|id| first_set.contains(id)).collect();
    for id in &again {
        assert!(
            !acked_at_kill.contains(*id),
            "{id} surfaced again after its ack"
        );
    }
    println!(
        "after the ack_wait: {} surfaced again in all (all unacked at the kill)",
        again.len()
    );
    life2.kill9();
    let mut life3 = spawn("life3", &agent);
    life3.expect("joined", |l| l.contains("\"event\":\"joined\""));
    let fresh = publish_batch(&rt, &url, space, "general", "2", 1);
    life3.expect("the fresh message", |l| l.contains(&fresh[0]));
    life3.settle(Duration::from_secs(3));
    let third = surfaced_ids(&life3);
    assert_eq!(third, fresh, "life3 surfaced old messages again");
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
}

/// Issue 19: a broker outage longer than the daemon's lease window. `cotal delivery` must not
/// exit: its lease deadline passes while the server is down (it stops writing), and after the
/// restart it starts over in process with a fresh lease and serves again. An agent that was
/// offline through the outage then gets a message posted after it, durably.
///
/// Takes about 45 s (the outage must outlast the protocol's 30 s lease TTL).
#[test]
fn a_broker_outage_longer_than_the_lease_is_ridden_out_by_the_running_daemon() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let cli = Cli::new(server.url());
    let space = "outage";
    open_durable_space(&cli, space, &["a1", "a2"]);
    let mut d1 = cli.spawn("d1", &["delivery", "--space", space, "--id", "d1"]);
    d1.expect("d1 active", |l| l.contains("health: active"));
    // a2 joins `general` durably, then goes away.
    let mut a2 = cli.spawn(
        "a2",
        &["agent", "--space", space, "--id", "a2", "--join", "general"],
    );
    let joined = a2.expect("a2 joined", |l| l.contains("\"event\":\"joined\""));
    assert!(joined.contains("\"durable\":true"), "{joined}");
    a2.signal("TERM");
    assert_eq!(a2.exit_code(), Some(0), "{:#?}", a2.seen);

    server.kill();
    let lost = d1.wait_for(Duration::from_secs(40), |l| l.contains("Lost {"));
    assert!(
        lost.is_some(),
        "the lease outlived a 40 s outage? {:#?}",
        d1.seen
    );
    // Past the lease deadline, and past the TTL of the daemon's last lease write.
    std::thread::sleep(Duration::from_secs(8));
    assert!(d1.running(), "d1 exited during the outage: {:#?}", d1.seen);
    server.restart();
    let restarted = std::time::Instant::now();
    let over = d1.wait_for(Duration::from_secs(30), |l| l.contains("starting over"));
    assert!(over.is_some(), "{:#?}", d1.seen);
    let active = d1.wait_for(Duration::from_secs(60), |l| l.contains("health: active"));
    assert!(active.is_some(), "d1 never served again: {:#?}", d1.seen);
    println!(
        "daemon serving again {:.1} s after the server accepted connections",
        restarted.elapsed().as_secs_f64()
    );

    let sent = cli.run(&[
        "send",
        "--space",
        space,
        "--id",
        "a1",
        "--channel",
        "general",
        "after the outage",
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stdout)
    );
    let mut a2 = cli.spawn("a2-back", &["agent", "--space", space, "--id", "a2"]);
    let got = a2.wait_for(Duration::from_secs(30), |l| l.contains("after the outage"));
    assert!(got.is_some(), "a2 got no durable copy: {:#?}", a2.seen);
    d1.signal("TERM");
    assert_eq!(d1.exit_code(), Some(0), "{:#?}", d1.seen);
}
