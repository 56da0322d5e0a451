//! A secured space end to end through the `cotal` binary only (issue 15 item 1): a nats-server
//! whose users carry exactly the permission blocks `cotal provision` prints, the quick start run
//! under them (operator, delivery daemon, two agents), a durable catch-up for an offline member,
//! and the one-shot commands as the operator. Nothing in-process: every step is the command line
//! a user types, under the credential it would hold.

mod common;

use common::{NatsServer, Proc, User, printed_block};
use serde_json::Value;
use std::process::Output;
use std::time::Duration;

const SPACE: &str = "sec";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_line(l: &str) -> Value {
    serde_json::from_str(l).unwrap_or(Value::Null)
}

/// `cotal ARGS` with no server (the `provision` printers).
fn cotal(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cotal"))
        .args(args)
        .output()
        .expect("run cotal")
}

/// A user named `name` with `permissions` (the password is the name reversed, test only).
fn user(name: &str, permissions: Option<String>) -> User {
    User {
        name: name.to_owned(),
        password: format!("pw-{}", name.chars().rev().collect::<String>()),
        permissions,
    }
}

/// Runs and spawns `cotal` as one user of the server.
struct As {
    url: String,
    user: User,
}

impl As {
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend([
            "--nats",
            self.url.as_str(),
            "--user",
            self.user.name.as_str(),
            "--password",
            self.user.password.as_str(),
        ]);
        all
    }

    fn run(&self, args: &[&str]) -> Output {
        cotal(&self.args(args))
    }

    fn spawn(&self, name: &'static str, args: &[&str]) -> Proc {
        Proc::spawn(name, &self.args(args))
    }
}

fn agent(who: &As, name: &'static str) -> Proc {
    let mut p = who.spawn(
        name,
        &[
            "agent",
            "--space",
            SPACE,
            "--id",
            who.user.name.as_str(),
            "--join",
            "general",
        ],
    );
    let established = p.expect("an established backstop on general", |l| {
        let v = json_line(l);
        (v["event"] == "joined" && v["durable"] == true) || v["event"] == "backstop_established"
    });
    assert_eq!(json_line(&established)["channel"], "general");
    p
}

/// The quick start on a server configured only from what `cotal provision` prints. Fails on the
/// old binary: `cotal delivery` never set its inbox prefix, so the broker refused
/// `SUB _INBOX.<nuid>.*` and the daemon exited with "cannot read stream CHAT_sec: timed out".
#[test]
fn quick_start_on_a_secured_space_through_the_binary() {
    let Some((mut daemon, _server)) = secured_quick_start(false) else {
        return;
    };
    assert!(
        !daemon.seen.iter().any(|l| l.contains("running without")),
        "{:#?}",
        daemon.seen
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
}

/// The daemon under the reference's narrower delivery grants (`deliveryPermissions`, without
/// `delivery_additions`: the DLV revocation sweep and the DLV backlog read) still runs the quick
/// start, and says once per feature what it runs without and which grants it lacks; no
/// `BacklogUnverified` WARN per copy. Before: no such line, a `BacklogUnverified` WARN per read
/// and the sweep's refused retries only at debug.
#[test]
fn the_daemon_under_the_reference_grants_says_once_what_it_runs_without() {
    let Some((mut daemon, _server)) = secured_quick_start(true) else {
        return;
    };
    daemon.settle(Duration::from_millis(300));
    let count = |needle: &str| daemon.seen.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("running without the DLV revocation sweep"),
        1,
        "{:#?}",
        daemon.seen
    );
    assert_eq!(
        count("running without the per-owner DLV backlog read"),
        1,
        "{:#?}",
        daemon.seen
    );
    assert_eq!(count("BacklogUnverified"), 0, "{:#?}", daemon.seen);
    assert!(
        daemon
            .seen
            .iter()
            .any(|l| l.contains("the credential lacks $JS.API.CONSUMER.INFO.DLV_sec.*")),
        "{:#?}",
        daemon.seen
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
}

/// `block` without the grants the reference's delivery credential does not hold.
fn reference_grants(block: &str) -> String {
    let space = cotal_core::wire::token::Space::new(SPACE).expect("space");
    let mut block = block.to_owned();
    for grant in cotal_core::wire::permissions::delivery_additions(&space) {
        let quoted = format!("{}, ", serde_json::to_string(&grant).expect("json"));
        assert!(block.contains(&quoted), "{grant} not in {block}");
        block = block.replace(&quoted, "");
    }
    block
}

/// Runs the secured quick start (see the tests above); returns the running daemon, or `None`
/// without a server binary. With `reference`, the daemon's user holds the reference's grants.
fn secured_quick_start(reference: bool) -> Option<(Proc, NatsServer)> {
    if NatsServer::binary().is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set");
        return None;
    }
    let mut daemon_block = printed_block(&cotal(&[
        "provision",
        "delivery",
        "--space",
        SPACE,
        "--id",
        "dlv",
    ]));
    if reference {
        daemon_block = reference_grants(&daemon_block);
    }
    let agent_block = |id: &str| {
        printed_block(&cotal(&[
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
        ]))
    };
    let users = vec![
        user("operator", None),
        user("dlv", Some(daemon_block)),
        user("alice", Some(agent_block("alice"))),
        user("bob", Some(agent_block("bob"))),
    ];
    let server = NatsServer::start_with_users(users.clone())?;
    let who = |i: usize| As {
        url: server.url(),
        user: users[i].clone(),
    };
    let (operator, dlv, alice_user, bob_user) = (who(0), who(1), who(2), who(3));

    // A space run with credentials defaults to durable; a second `up` changes nothing.
    let out = operator.run(&["up", "--space", SPACE]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("set       defaults.deliveryClass durable"),
        "{}",
        stdout(&out)
    );
    let out = operator.run(&["up", "--space", SPACE]);
    assert!(
        stdout(&out).contains("kept      defaults.deliveryClass durable"),
        "{}",
        stdout(&out)
    );
    let out = operator.run(&["channels", "--space", SPACE]);
    assert!(
        stdout(&out).contains("defaults {\"deliveryClass\":\"durable\"}"),
        "{}",
        stdout(&out)
    );
    for id in ["alice", "bob"] {
        let out = operator.run(&[
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
            "--apply",
        ]);
        assert!(out.status.success(), "{}", stdout(&out));
    }

    let mut daemon = dlv.spawn("daemon", &["delivery", "--space", SPACE, "--id", "dlv"]);
    daemon.expect("health active", |l| l.contains("health: active"));
    let mut alice = agent(&alice_user, "alice");
    let mut bob = agent(&bob_user, "bob");

    alice.type_line("hello bob");
    bob.expect("the live message", |l| json_line(l)["text"] == "hello bob");

    // Bob goes offline; Alice posts on the durable channel; Bob comes back and catches up.
    bob.signal("TERM");
    assert_eq!(bob.exit_code(), Some(0), "{:#?}", bob.seen);
    alice.type_line("while you were away");
    alice.expect("sent", |l| json_line(l)["event"] == "sent");
    std::thread::sleep(Duration::from_millis(300));
    let mut bob = agent(&bob_user, "bob again");
    let got = json_line(&bob.expect("the catch-up", |l| {
        json_line(l)["text"] == "while you were away"
    }));
    assert_eq!(got["from"], "alice", "{got}");
    assert_eq!(got["durable"], true, "{got}");

    // The one-shot commands as the operator.
    let out = operator.run(&["members", "--space", SPACE, "--channel", "general"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("general alice generation=") && text.contains("general bob generation="),
        "{text}"
    );
    let out = operator.run(&["health", "--space", SPACE]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("lease.0: active (holder dlv)"),
        "{}",
        stdout(&out)
    );

    // No permission was refused anywhere on the way (with the full grants).
    for p in [&mut daemon, &mut alice, &mut bob] {
        p.settle(Duration::from_millis(200));
        assert!(
            reference || !p.seen.iter().any(|l| l.contains("Permissions Violation")),
            "{:#?}",
            p.seen
        );
    }
    assert!(
        reference || !server.log().contains("Permissions Violation"),
        "{}",
        server.log()
    );
    // The server outlives the daemon's checks: hand both back (the server stops on drop).
    Some((daemon, server))
}

/// An `--id` the credential contradicts is bad usage: one line, exit code 2, before any
/// connection (the URL points nowhere). The credential's identity is the public key of the seed
/// in a `--nkey` or `--creds` file, or the `--user` name. The old binary connected anyway (and
/// printed "cannot reach NATS server", exit 1, here; on a real server it ran with an inbox its
/// credential may not use).
#[test]
fn an_id_the_credential_contradicts_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().expect("seed");
    let nkey_file = dir.path().join("user.nk");
    std::fs::write(&nkey_file, format!("{seed}\n")).expect("nkey file");
    let creds_file = dir.path().join("user.creds");
    std::fs::write(
        &creds_file,
        format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5In0.e30.sig\n------END NATS USER \
             JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY \
             SEED------\n"
        ),
    )
    .expect("creds file");
    let nowhere = "nats://127.0.0.1:1";
    let nkey_path = nkey_file.display().to_string();
    let creds_path = creds_file.display().to_string();
    let public = key.public_key();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "delivery", "--space", SPACE, "--id", "dlv", "--nkey", &nkey_path,
            ],
            public.as_str(),
        ),
        (
            vec![
                "agent",
                "--space",
                SPACE,
                "--id",
                "bob",
                "--creds",
                &creds_path,
            ],
            public.as_str(),
        ),
        (
            vec![
                "send",
                "--space",
                SPACE,
                "--id",
                "bob",
                "--channel",
                "general",
                "x",
                "--user",
                "alice",
                "--password",
                "pw",
            ],
            "alice",
        ),
    ];
    for (mut args, named) in cases {
        args.extend(["--nats", nowhere]);
        let out = cotal(&args);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with("cotal: error: --id ")
                && text.contains("does not match the credential")
                && text.contains(named),
            "{text}"
        );
    }
    // The same credential with a matching --id, or none, goes on to connect (and fails there).
    for args in [
        vec!["delivery", "--space", SPACE, "--nkey", &nkey_path],
        vec![
            "agent",
            "--space",
            SPACE,
            "--id",
            &public,
            "--creds",
            &creds_path,
        ],
    ] {
        let mut args = args.clone();
        args.extend(["--nats", nowhere]);
        let out = cotal(&args);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("cannot reach NATS server"),
            "{}",
            stdout(&out)
        );
    }
}

/// `cotal up` writes the space's default delivery class when unset (issue 15 item 2): `live` for
/// an open space, so its unconfigured channels are live-class; a second `up` changes nothing; a
/// value already there wins (here one written by `up --default-class durable`, and the fields of
/// an operator's `=defaults` are kept). The old `up` wrote nothing: `channels` printed
/// `defaults (none: durable)`.
#[tokio::test]
async fn up_writes_the_default_class_once_and_an_existing_value_wins() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = common::Cli::new(server.url());
    let out = cli.run(&["up", "--space", "open"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("set       defaults.deliveryClass live"),
        "{}",
        stdout(&out)
    );
    let again = cli.run(&["up", "--space", "open"]);
    let text = stdout(&again);
    assert!(again.status.success(), "{text}");
    assert!(
        text.contains("kept      defaults.deliveryClass live"),
        "{text}"
    );
    assert!(text.contains("nothing changed"), "{text}");
    let out = cli.run(&["channels", "--space", "open"]);
    assert!(
        stdout(&out).contains("defaults {\"deliveryClass\":\"live\"}"),
        "{}",
        stdout(&out)
    );
    // A chosen class, then a plain `up`: the chosen one stays.
    let out = cli.run(&["up", "--space", "chosen", "--default-class", "durable"]);
    assert!(
        stdout(&out).contains("set       defaults.deliveryClass durable"),
        "{}",
        stdout(&out)
    );
    let out = cli.run(&["up", "--space", "chosen"]);
    assert!(
        stdout(&out).contains("kept      defaults.deliveryClass durable"),
        "{}",
        stdout(&out)
    );
    // An operator's `=defaults` without a class: `up` adds the class and keeps the rest.
    let out = cli.run(&["up", "--space", "merged", "--default-class", "live"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let conn = cotal_driver_tokio::connect::connect(&server.config())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js
        .get_key_value("cotal_channels_merged")
        .await
        .expect("bucket");
    kv.put("=defaults", r#"{"replay":false}"#.into())
        .await
        .expect("put");
    let out = cli.run(&["up", "--space", "merged"]);
    assert!(
        stdout(&out).contains("set       defaults.deliveryClass live"),
        "{}",
        stdout(&out)
    );
    let stored = kv.get("=defaults").await.expect("get").expect("entry");
    let stored: Value = serde_json::from_slice(&stored).expect("json");
    assert_eq!(
        stored,
        serde_json::json!({"replay": false, "deliveryClass": "live"})
    );
}

/// `cotal members --channel` with a pattern matches by the protocol's subject rules (issue 15
/// item 6): `team.>` lists `team.a` and `team.b.c`, not `team` or `general`; `team.*` only
/// `team.a`; a concrete name itself only; an invalid filter is refused with exit code 2. The old
/// command compared the pattern as a literal name: `0 membership record(s)`, exit 0.
#[tokio::test]
async fn members_filter_matches_patterns_by_subject_rules() {
    use cotal_core::time::UnixMillis;
    use cotal_core::wire::keys::member_key;
    use cotal_core::wire::records::MembershipRecord;
    use cotal_core::wire::token::{AgentId, ConcreteChannel};
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = common::Cli::new(server.url());
    let out = cli.run(&["up", "--space", "m"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let conn = cotal_driver_tokio::connect::connect(&server.config())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js.get_key_value("cotal_members_m").await.expect("bucket");
    for ch in ["team", "team.a", "team.b.c", "general"] {
        let channel = ConcreteChannel::new(ch).expect("channel");
        let owner = AgentId::new("ann").expect("id");
        let record =
            MembershipRecord::fresh_join(channel.clone(), owner.clone(), 0, 1, "d", UnixMillis(1));
        kv.put(
            member_key(&channel, &owner),
            serde_json::to_vec(&record).expect("json").into(),
        )
        .await
        .expect("put");
    }
    let listed = |filter: &str| {
        let out = cli.run(&["members", "--space", "m", "--channel", filter]);
        let text = stdout(&out);
        assert!(out.status.success(), "{filter}: {text}");
        let mut channels: Vec<String> = text
            .lines()
            .filter(|l| l.ends_with("state=durable-active"))
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect();
        channels.sort();
        (channels, text)
    };
    let (got, text) = listed("team.>");
    assert_eq!(got, ["team.a", "team.b.c"], "{text}");
    assert!(
        text.contains("2 membership record(s) on channels matching team.> (4 in the space)"),
        "{text}"
    );
    assert_eq!(listed("team.*").0, ["team.a"]);
    assert_eq!(listed("team").0, ["team"]);
    assert_eq!(listed(">").0.len(), 4);
    let (got, text) = listed("nobody.*");
    assert!(got.is_empty(), "{text}");
    assert!(
        text.contains("0 membership record(s) on channels matching nobody.* (4 in the space)"),
        "{text}"
    );
    let out = cli.run(&["members", "--space", "m", "--channel", "team..a"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("cotal: error: invalid channel 'team..a'"),
        "{}",
        stdout(&out)
    );
}

/// Open mode (issue 15 item 8): `provision agent --apply` makes `dm_<id>` exactly as a reference
/// agent creates it (inactive_threshold 600 s), so the agent's own `action: create` of that config
/// succeeds; the drift check compares the fields a spec leaves unset, so the provisioner's
/// (threshold-less) `dm_` spec reports the open-mode consumer as drift instead of "unchanged".
/// Before: the create failed with "consumer already exists", and the drift check said unchanged.
#[tokio::test]
async fn open_mode_provisioning_makes_dm_as_the_reference_agent_does() {
    use bytes::Bytes;
    use cotal_core::constants::DEFAULT_INACTIVE_THRESHOLD;
    use cotal_core::wire::config::ConsumerSpec;
    use cotal_core::wire::token::{AgentId, Space};
    use cotal_driver_tokio::provision::{ProvisionError, apply_consumer};
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cli = common::Cli::new(server.url());
    let provision = [
        "provision",
        "agent",
        "--space",
        "o",
        "--id",
        "ann",
        "--read",
        ">",
        "--apply",
    ];
    assert!(cli.run(&["up", "--space", "o"]).status.success());
    let out = cli.run(&provision);
    assert!(
        stdout(&out).contains("applied: consumer DM_o/dm_ann created"),
        "{}",
        stdout(&out)
    );
    // The reference agent's own create: action `create`, its config.
    let conn = cotal_driver_tokio::connect::connect(&server.config())
        .await
        .expect("connect");
    let (space, ann) = (Space::new("o").unwrap(), AgentId::new("ann").unwrap());
    let reference =
        ConsumerSpec::dm(&space, &ann).with_inactive_threshold(DEFAULT_INACTIVE_THRESHOLD);
    let req = reference.create_request();
    let t = Duration::from_secs(5);
    let created = cotal_driver_tokio::api::request(
        &conn.client,
        &req.subject,
        Bytes::from(req.body_bytes()),
        t,
    )
    .await;
    assert!(created.is_ok(), "the reference agent's create: {created:?}");
    let out = cli.run(&provision);
    assert!(
        stdout(&out).contains("applied: consumer DM_o/dm_ann unchanged"),
        "{}",
        stdout(&out)
    );
    // The auth-mode spec (no threshold) against the open-mode consumer: drift, named.
    match apply_consumer(&conn.client, &ConsumerSpec::dm(&space, &ann), t).await {
        Err(ProvisionError::Drift(d)) => assert_eq!(
            d,
            ["inactive_threshold: wanted none, found 600000000000"],
            "{d:?}"
        ),
        other => panic!("expected drift, got {other:?}"),
    }
}

/// A nats-server whose config this file writes itself (nkey users), killed by its PID on drop.
struct NkeyServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NkeyServer {
    /// `users`: (public user nkey, permissions block or none).
    fn start(users: &[(String, Option<String>)]) -> Option<Self> {
        let bin = NatsServer::binary()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\nauthorization {{ users = [\n",
            dir.path().join("js").display().to_string()
        );
        for (key, permissions) in users {
            conf.push_str(&format!("  {{ nkey: {key:?}"));
            if let Some(p) = permissions {
                conf.push_str(&format!(", permissions: {p}"));
            }
            conf.push_str(" }\n");
        }
        conf.push_str("] }\n");
        let path = dir.path().join("server.conf");
        std::fs::write(&path, conf).expect("config");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let deadline = std::time::Instant::now() + common::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server not up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(NkeyServer {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for NkeyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same quick start with nkey users: every id is the public key of the user's seed, and no
/// command is given `--id` (the daemon, the agents and `provision` take it from the `--nkey`
/// file; `provision … --id` names the key the blocks are for). Before: the daemon defaulted to
/// `delivery-<hex>` with the library inbox, and `agent` required `--id`.
#[test]
fn quick_start_with_nkey_users_takes_every_id_from_the_seed() {
    if NatsServer::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let seed_file = |name: &str, key: &nkeys::KeyPair| {
        let path = dir.path().join(format!("{name}.nk"));
        std::fs::write(&path, key.seed().expect("seed")).expect("seed file");
        path.display().to_string()
    };
    let keys: Vec<nkeys::KeyPair> = (0..4).map(|_| nkeys::KeyPair::new_user()).collect();
    let [op, dlv, ann, ben] = ["operator", "dlv", "ann", "ben"].map(|n| n.to_owned());
    let files: Vec<String> = [&op, &dlv, &ann, &ben]
        .iter()
        .zip(&keys)
        .map(|(n, k)| seed_file(n, k))
        .collect();
    let public: Vec<String> = keys.iter().map(nkeys::KeyPair::public_key).collect();
    let daemon_block = printed_block(&cotal(&[
        "provision",
        "delivery",
        "--space",
        SPACE,
        "--id",
        &public[1],
    ]));
    let agent_block = |key: &str| {
        printed_block(&cotal(&[
            "provision",
            "agent",
            "--space",
            SPACE,
            "--id",
            key,
            "--read",
            "general",
            "--publish",
            "general",
        ]))
    };
    let Some(server) = NkeyServer::start(&[
        (public[0].clone(), None),
        (public[1].clone(), Some(daemon_block)),
        (public[2].clone(), Some(agent_block(&public[2]))),
        (public[3].clone(), Some(agent_block(&public[3]))),
    ]) else {
        return;
    };
    let url = format!("nats://127.0.0.1:{}", server.port);
    let with = |file: &str, args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend([
            "--nats".into(),
            url.clone(),
            "--nkey".into(),
            file.to_owned(),
        ]);
        all
    };
    let run = |file: &str, args: &[&str]| {
        let all = with(file, args);
        cotal(&all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let spawn = |name: &'static str, file: &str, args: &[&str]| {
        let all = with(file, args);
        Proc::spawn(name, &all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&files[0], &["up", "--space", SPACE]);
    assert!(out.status.success(), "{}", stdout(&out));
    for key in &public[2..] {
        let out = run(
            &files[0],
            &[
                "provision",
                "agent",
                "--space",
                SPACE,
                "--id",
                key,
                "--read",
                "general",
                "--publish",
                "general",
                "--apply",
            ],
        );
        assert!(out.status.success(), "{}", stdout(&out));
    }
    let mut daemon = spawn("daemon", &files[1], &["delivery", "--space", SPACE]);
    daemon.expect("health active", |l| l.contains("health: active"));
    let member = |name: &'static str, file: &str| {
        let mut p = spawn(
            name,
            file,
            &["agent", "--space", SPACE, "--join", "general"],
        );
        p.expect("an established backstop", |l| {
            let v = json_line(l);
            (v["event"] == "joined" && v["durable"] == true) || v["event"] == "backstop_established"
        });
        p
    };
    let mut ann_p = member("ann", &files[2]);
    let mut ben_p = member("ben", &files[3]);
    ben_p.signal("TERM");
    assert_eq!(ben_p.exit_code(), Some(0), "{:#?}", ben_p.seen);
    ann_p.type_line("for ben, later");
    ann_p.expect("sent", |l| json_line(l)["event"] == "sent");
    std::thread::sleep(Duration::from_millis(300));
    let mut ben_p = member("ben again", &files[3]);
    let got =
        json_line(&ben_p.expect("the catch-up", |l| json_line(l)["text"] == "for ben, later"));
    assert_eq!(got["from"], public[2].as_str(), "{got}");
    let out = run(&files[0], &["health", "--space", SPACE]);
    assert!(
        stdout(&out).contains(&format!("lease.0: active (holder {})", public[1])),
        "{}",
        stdout(&out)
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(), Some(0), "{:#?}", daemon.seen);
}
