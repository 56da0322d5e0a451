//! Security on the real broker (issue 9, security half): a nats-server whose users carry exactly
//! the permission blocks `cotal provision` writes — the delivery daemon's profile
//! (`Permissions::delivery`), two agent profiles (`Permissions::agent`) and one unrestricted
//! provisioner — and one test per claim of the issue:
//!
//! - an agent cannot subscribe outside its read ACL;
//! - it cannot publish as another sender;
//! - it cannot read or bind another agent's `dlv_<id>`;
//! - it cannot touch the mixed backstop store (INBOX) at all;
//! - it cannot write membership, lease or ACL records;
//! - it cannot make the daemon reply to a subject not bound to the requester;
//! - a member whose ACL is narrowed stops receiving backstop copies of the channel.
//!
//! Where the broker refuses, the test asserts the broker's refusal as the client sees it (a
//! `Permissions Violation` server error naming the subject). Where the broker allows the message
//! (the request reaches the daemon on the requester's own lane), the test asserts the daemon's
//! refusal: an `{ok:false}` reply, or no reply at all for an unbound reply subject, and the KV
//! record unchanged. Every refusal test also performs the allowed neighbour of the refused
//! action, so a refusal cannot pass by the action being impossible for an unrelated reason.
//!
//! Hostile input (malformed JSON, huge payloads, wrong types, spoofed `from.id`, subjects with
//! extra tokens, replayed msg-ids, wildcard channels) is in the `hostile_*` tests at the end, for
//! the channel path and for the direct (DM) path.
//!
//! Skipped (returns early) when `COTAL_NATS_SERVER` is unset. Every wait is bounded.

mod common;

use async_nats::{Client, Event, ServerError};
use bytes::Bytes;
use common::{NatsServer, User, WAIT};
use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::delivery::daemon::{Delivery, DeliveryConfig, DeliveryCounters, DeliveryEvent};
use cotal_core::delivery::revoke::SweepEvent;
use cotal_core::time::UnixMillis;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::{KvBucket, acl_key, member_key};
use cotal_core::wire::message::Sender;
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::{AclRecord, MembershipRecord};
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, ConcreteChannel, Space};
use cotal_driver_tokio::connect::{ConnectConfig, connect};
use cotal_driver_tokio::exec::{Executor, ExecutorConfig};
use cotal_driver_tokio::provision::{apply_consumer, nats_server_permissions, provision_space};
use cotal_driver_tokio::run::{MachineHandle, Runner};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

const SPACE: &str = "sec";
const DAEMON: &str = "daemon";
/// How long silence must last to count as "nothing came".
const QUIET: Duration = Duration::from_millis(600);

fn space() -> Space {
    Space::new(SPACE).expect("space")
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("agent id")
}

fn ch(s: &str) -> Channel {
    Channel::new(s).expect("channel")
}

fn concrete(s: &str) -> ConcreteChannel {
    ch(s).to_concrete().expect("concrete channel")
}

fn subj(rest: &str) -> String {
    format!("cotal.{SPACE}.{rest}")
}

// ---------------------------------------------------------------------------------------------
// Users: exactly what `cotal provision agent` prints, plus the daemon profile
// ---------------------------------------------------------------------------------------------

/// Alice reads `team` and `news.*`, posts on `team`.
const ALICE_READ: &[&str] = &["team", "news.*"];
/// Bob reads and posts on `team` and `secret`.
const BOB_READ: &[&str] = &["team", "secret"];

fn agent_user(agent: &str, read: &[&str], publish: &[&str]) -> User {
    let policy = AgentPolicy {
        id: id(agent),
        allow_subscribe: read.iter().map(|c| ch(c)).collect(),
        allow_publish: publish.iter().map(|c| ch(c)).collect(),
        role: None,
        spawn: false,
    };
    User {
        name: agent.to_owned(),
        password: "pw".to_owned(),
        permissions: Some(nats_server_permissions(&Permissions::agent(
            &space(),
            &policy,
        ))),
    }
}

fn daemon_user() -> User {
    User {
        name: DAEMON.to_owned(),
        password: "pw".to_owned(),
        permissions: Some(nats_server_permissions(&Permissions::delivery(
            &space(),
            &id(DAEMON),
        ))),
    }
}

fn admin_user() -> User {
    User {
        name: "admin".into(),
        password: "adminpw".into(),
        permissions: None,
    }
}

fn users(alice_read: &[&str], bob_read: &[&str]) -> Vec<User> {
    vec![
        agent_user("alice", alice_read, &["team"]),
        agent_user("bob", bob_read, bob_read),
        daemon_user(),
        admin_user(),
    ]
}

/// The connect config of `user` (password `pw`) with its `_INBOX_<id>` prefix.
fn config_of(server: &NatsServer, user: &str) -> ConnectConfig {
    let mut c = server.config_as(user, "pw");
    c.inbox_prefix = Some(id(user).inbox_prefix());
    c
}

// ---------------------------------------------------------------------------------------------
// The space: provisioned by the unrestricted user, as `cotal up` + `cotal provision agent --apply`
// ---------------------------------------------------------------------------------------------

struct Space9 {
    server: NatsServer,
    admin: ConnectConfig,
}

impl Space9 {
    /// Starts a server with the standard users, provisions the space, the ACL records and DLV
    /// consumers of both agents, and marks `team` and `secret` durable.
    async fn start() -> Option<Space9> {
        let server = NatsServer::start_with_users(users(ALICE_READ, BOB_READ))?;
        let admin = server.config_as("admin", "adminpw");
        let conn = connect(&admin).await.expect("connect admin");
        let report = provision_space(&conn.client, &space(), Duration::from_secs(5)).await;
        assert_eq!(report.failed(), 0, "{report:?}");
        let s = Space9 { server, admin };
        s.put_acl("alice", ALICE_READ, 1).await;
        s.put_acl("bob", BOB_READ, 1).await;
        for a in ["alice", "bob"] {
            apply_consumer(
                &conn.client,
                &ConsumerSpec::dlv(&space(), &id(a)),
                Duration::from_secs(5),
            )
            .await
            .expect("dlv consumer");
        }
        Some(s)
    }

    async fn kv(&self, bucket: KvBucket) -> async_nats::jetstream::kv::Store {
        let conn = connect(&self.admin).await.expect("connect admin");
        async_nats::jetstream::new(conn.client.clone())
            .get_key_value(bucket.name(&space()))
            .await
            .expect("bucket")
    }

    async fn put_acl(&self, agent: &str, read: &[&str], revision: u64) {
        let record = AclRecord {
            allow_subscribe: read.iter().map(|s| (*s).to_owned()).collect(),
            revision,
            updated_at: UnixMillis(revision),
            extra: Default::default(),
        };
        self.kv(KvBucket::Acl)
            .await
            .put(
                acl_key(&id(agent)),
                Bytes::from(serde_json::to_vec(&record).expect("encode")),
            )
            .await
            .expect("put acl");
    }

    /// The raw value and revision of a KV key (`None`: absent).
    async fn kv_get(&self, bucket: KvBucket, key: &str) -> Option<(Bytes, u64)> {
        self.kv(bucket)
            .await
            .entry(key)
            .await
            .expect("kv entry")
            .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            .map(|e| (e.value, e.revision))
    }

    async fn member(&self, channel: &str, owner: &str) -> Option<(Bytes, u64)> {
        self.kv_get(
            KvBucket::Members,
            &member_key(&concrete(channel), &id(owner)),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client of one user, watching its server errors
// ---------------------------------------------------------------------------------------------

struct Probe {
    user: String,
    client: Client,
    events: UnboundedReceiver<Event>,
}

impl Probe {
    async fn connect(server: &NatsServer, user: &str) -> Probe {
        let conn = connect(&config_of(server, user)).await.expect("connect");
        Probe {
            user: user.to_owned(),
            client: conn.client,
            events: conn.events,
        }
    }

    /// A round trip on this connection (`$JS.API.INFO`, granted to every profile): the server
    /// has processed everything sent before it, and any `-ERR` it wrote is queued as an event.
    async fn barrier(&self) {
        let r = self
            .client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .expect("barrier round trip");
        assert!(!r.payload.is_empty());
    }

    /// The permission violations seen so far (after a barrier and a short grace).
    async fn violations(&mut self) -> Vec<String> {
        self.barrier().await;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(150);
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Event::ServerError(ServerError::Other(s)) = e
                && s.contains("Permissions Violation")
            {
                out.push(s);
            }
        }
        out
    }

    /// Waits for the broker's refusal naming `subject` (`Subscription to` or `Publish to`).
    async fn refused(&mut self, kind: &str, subject: &str) {
        let needle = format!("Permissions Violation for {kind} to \"{subject}\"");
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            seen.extend(self.violations().await);
            if seen.iter().any(|s| s.contains(&needle)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: no broker refusal `{needle}`; saw {seen:?}",
                self.user
            );
        }
    }

    /// Asserts that the broker refuses a subscription to `subject`, and that nothing published
    /// there (by the unrestricted user) reaches this client.
    async fn refused_sub(&mut self, subject: &str, admin: &Client) {
        let mut sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("sub");
        self.refused("Subscription", subject).await;
        let concrete = subject.replace(">", "x").replace('*', "x");
        admin
            .publish(concrete, Bytes::from_static(b"{}"))
            .await
            .expect("admin publish");
        admin.flush().await.expect("flush");
        let got = tokio::time::timeout(QUIET, sub.next()).await;
        assert!(
            got.is_err(),
            "{}: received on {subject}: {got:?}",
            self.user
        );
    }

    /// Asserts that a subscription to `subject` is granted (no violation).
    async fn granted_sub(&mut self, subject: &str) -> async_nats::Subscriber {
        let sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("sub");
        let v = self.violations().await;
        assert!(v.is_empty(), "{}: {subject} refused: {v:?}", self.user);
        sub
    }

    /// Asserts that the broker refuses a publish to `subject`.
    async fn refused_pub(&mut self, subject: &str, payload: Bytes) {
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .expect("publish queued");
        self.refused("Publish", subject).await;
    }

    /// Asserts that a request to `subject` (a JetStream API call) is refused by the broker: no
    /// answer, and a publish violation naming the subject.
    async fn refused_request(&mut self, subject: &str, payload: Bytes) {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            self.client.request(subject.to_owned(), payload),
        )
        .await;
        if let Ok(Ok(m)) = r {
            panic!(
                "{}: {subject} answered: {:?}",
                self.user,
                String::from_utf8_lossy(&m.payload)
            );
        }
        self.refused("Publish", subject).await;
    }

    /// A JetStream API request that the broker lets through; returns the JSON answer.
    async fn api(&self, subject: &str, payload: Value) -> Value {
        let m = self
            .client
            .request(subject.to_owned(), Bytes::from(payload.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{}: {subject}: {e}", self.user));
        serde_json::from_slice(&m.payload).expect("api json")
    }

    /// Sends `payload` to the daemon on this user's own `ctl.delivery` lane with reply subject
    /// `reply` (default: the bound one, `<subject>.reply.<token>`), and returns the reply if one
    /// comes within [`QUIET`] (or [`WAIT`] when `expect_reply`).
    async fn control_raw(
        &mut self,
        payload: Bytes,
        reply: Option<&str>,
        expect_reply: bool,
    ) -> Option<Value> {
        let lane = subj(&format!("ctl.delivery.{}", self.user));
        let bound = format!(
            "{lane}.reply.r{}",
            self.client.new_inbox().replace('.', "_")
        );
        let reply = reply.map(str::to_owned).unwrap_or(bound.clone());
        let mut sub = self.client.subscribe(bound).await.expect("reply sub");
        self.client
            .publish_with_reply(lane, reply, payload)
            .await
            .expect("publish request");
        let wait = if expect_reply { WAIT } else { QUIET };
        let m = tokio::time::timeout(wait, sub.next())
            .await
            .ok()
            .flatten()?;
        Some(serde_json::from_slice(&m.payload).expect("reply json"))
    }

    /// A well-formed request of this user; the reply must come.
    async fn control(&mut self, op: &str, args: Value) -> Value {
        let body = json!({"op": op, "args": args, "from": {"id": self.user, "name": self.user}});
        self.control_raw(Bytes::from(body.to_string()), None, true)
            .await
            .unwrap_or_else(|| panic!("{}: no reply to {op}", self.user))
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon, running under its own profile
// ---------------------------------------------------------------------------------------------

struct Daemon {
    handle: MachineHandle<Delivery>,
    events: UnboundedReceiver<DeliveryEvent>,
    task: JoinHandle<Delivery>,
    log: Vec<DeliveryEvent>,
}

impl Daemon {
    async fn start(server: &NatsServer) -> Daemon {
        let conn = connect(&config_of(server, DAEMON))
            .await
            .expect("connect daemon");
        let shard = ShardMap::new(1).and_then(|m| m.shard(0)).expect("shard");
        let machine = Delivery::new(DeliveryConfig::new(space(), shard, DAEMON));
        let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
        let Runner {
            handle,
            events,
            task,
        } = Runner::spawn(machine, exec, inputs);
        let mut d = Daemon {
            handle,
            events,
            task,
            log: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (health, _, serving) = d.handle.status().await.expect("daemon runs");
            if serving {
                break;
            }
            d.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon not serving under its profile within {WAIT:?}: {health}; {:#?}",
                d.log
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.log.push(e);
        }
    }

    async fn counters(&mut self) -> DeliveryCounters {
        self.drain();
        self.handle.status().await.expect("daemon runs").1
    }

    async fn stop(self) {
        self.handle
            .shutdown(Duration::from_secs(3))
            .expect("shutdown");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task");
    }
}

// ---------------------------------------------------------------------------------------------
// Claim 1: an agent cannot subscribe outside its read ACL
// ---------------------------------------------------------------------------------------------

/// Alice reads `team` and `news.*`. The broker refuses her `secret`, the CHAT wildcard, the whole
/// space, another lane's delivery replies, another agent's inbox prefix, and the dinbox / dlv
/// subjects; what is published there never reaches her. Her granted channels work.
#[tokio::test]
async fn sec_agent_cannot_subscribe_outside_its_read_acl() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let admin = connect(&s.admin).await.expect("admin").client;
    let mut alice = Probe::connect(&s.server, "alice").await;
    let mut team = alice.granted_sub(&subj("chat.*.team")).await;
    alice.granted_sub(&subj("chat.*.news.*")).await;
    for refused in [
        subj("chat.*.secret"),
        subj("chat.bob.secret"),
        subj("chat.>"),
        subj("chat.*.*"),
        subj(">"),
        subj("ctl.delivery.bob.reply.>"),
        subj("ctl.delivery.*"),
        "_INBOX_bob.>".to_owned(),
        subj("dinbox.alice"),
        subj("dinbox.bob"),
        subj("dlv.bob"),
        subj("dlv.alice"),
        "$KV.cotal_members_sec.>".to_owned(),
        "$KV.cotal_acl_sec.>".to_owned(),
        ">".to_owned(),
    ] {
        alice.refused_sub(&refused, &admin).await;
    }
    // `news.*` is granted; the broker's allow check lets `news.>` through as a subscription
    // (its `*` matches the literal `>` token). What it must not deliver is a channel deeper than
    // the grant: `news.deep.x` is outside Alice's read ACL.
    let mut deep = alice
        .client
        .subscribe(subj("chat.*.news.>"))
        .await
        .expect("sub");
    let mut deep2 = alice
        .client
        .subscribe(subj("chat.bob.news.>"))
        .await
        .expect("sub");
    alice.violations().await;
    admin
        .publish(subj("chat.bob.news.deep.x"), Bytes::from_static(b"{}"))
        .await
        .expect("publish");
    admin
        .publish(subj("chat.bob.news.flat"), Bytes::from_static(b"{}"))
        .await
        .expect("publish");
    admin.flush().await.expect("flush");
    for sub in [&mut deep, &mut deep2] {
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(QUIET, sub.next()).await {
            got.push(m.subject.to_string());
        }
        assert!(
            !got.iter().any(|s| s.contains("deep")),
            "a channel outside the read ACL was delivered: {got:?}"
        );
    }
    // The granted one still delivers on the same connection.
    admin
        .publish(subj("chat.bob.team"), Bytes::from_static(b"{}"))
        .await
        .expect("publish");
    let got = tokio::time::timeout(WAIT, team.next()).await;
    assert!(matches!(got, Ok(Some(_))), "{got:?}");

    // The backstop path is gated by the daemon on the same read ACL: a durable join outside it
    // (the broker lets the request through on her own lane) is refused and writes nothing.
    let daemon = Daemon::start(&s.server).await;
    let ok = alice
        .control("durableJoin", json!({"channel": "news.x"}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    for outside in ["secret", "news.deep.x", "newsx", "team.sub"] {
        let r = alice
            .control("durableJoin", json!({"channel": outside}))
            .await;
        assert_eq!(r["ok"], false, "{outside}: {r}");
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("not within your read ACL")),
            "{outside}: {r}"
        );
        assert_eq!(s.member(outside, "alice").await, None, "{outside}");
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Claim 2: an agent cannot publish as another sender
// ---------------------------------------------------------------------------------------------

/// The sender token is the authenticated identity: Alice may post `chat.alice.team` only. The
/// broker refuses `chat.bob.team`, a channel she may not post to, and the DM / anycast / control
/// lanes of another sender; a JetStream publish as Bob stores nothing. The daemon refuses a
/// request on her own lane that claims `from.id = bob` ("sender mismatch"), and Bob's
/// membership stays as it was.
#[tokio::test]
async fn sec_agent_cannot_publish_as_another_sender() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let mut alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Probe::connect(&s.server, "bob").await;
    let msg = |from: &str| {
        Bytes::from(
            json!({"id": format!("m-{from}"), "ts": 1, "space": SPACE,
                   "from": {"id": from, "name": from}, "channel": "team",
                   "parts": [{"kind": "text", "text": "x"}]})
            .to_string(),
        )
    };
    // Allowed neighbour: her own sender token.
    let js = async_nats::jetstream::new(alice.client.clone());
    let ack = js
        .publish(subj("chat.alice.team"), msg("alice"))
        .await
        .expect("publish")
        .await
        .expect("stored");
    assert!(ack.sequence >= 1);
    for refused in [
        subj("chat.bob.team"),
        subj("chat.alice.secret"),
        subj("inst.alice.bob"),
        subj("svc.worker.bob"),
        subj("ctl.self.bob"),
        subj("ctl.delivery.bob"),
        subj("ctl.manager.alice"),
    ] {
        alice.refused_pub(&refused, msg("bob")).await;
    }
    // A JetStream publish as Bob: no ack, and nothing stored.
    let before = alice
        .api(&format!("$JS.API.STREAM.INFO.CHAT_{SPACE}"), json!({}))
        .await["state"]["messages"]
        .clone();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        js.publish(subj("chat.bob.team"), msg("bob")),
    )
    .await;
    if let Ok(Ok(ack)) = r {
        let stored = tokio::time::timeout(Duration::from_secs(3), ack).await;
        assert!(!matches!(stored, Ok(Ok(_))), "stored as bob: {stored:?}");
    }
    alice.refused("Publish", &subj("chat.bob.team")).await;
    let after = alice
        .api(&format!("$JS.API.STREAM.INFO.CHAT_{SPACE}"), json!({}))
        .await["state"]["messages"]
        .clone();
    assert_eq!(before, after);

    // The daemon's refusal where the broker lets the request through (her own lane).
    let joined = bob.control("durableJoin", json!({"channel": "team"})).await;
    assert_eq!(joined["ok"], true, "{joined}");
    let bob_record = s.member("team", "bob").await.expect("bob's record");
    for op in [
        json!({"op": "durableLeave", "args": {"channel": "team", "generation": 1}, "from": {"id": "bob", "name": "bob"}}),
        json!({"op": "durableJoin", "args": {"channel": "secret"}, "from": {"id": "bob", "name": "bob"}}),
        json!({"op": "listMemberships", "args": {}, "from": {"id": "bob", "name": "bob"}}),
        json!({"op": "durableJoin", "args": {"channel": "team"}, "from": {"name": "bob"}}),
        json!({"op": "durableJoin", "args": {"channel": "team"}}),
    ] {
        let reply = alice
            .control_raw(Bytes::from(op.to_string()), None, true)
            .await
            .expect("a reply");
        assert_eq!(reply["ok"], false, "{op} → {reply}");
        assert!(
            reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("sender mismatch")),
            "{op} → {reply}"
        );
    }
    assert_eq!(s.member("team", "bob").await, Some(bob_record));
    assert_eq!(s.member("secret", "bob").await, None);
    assert_eq!(s.member("team", "alice").await, None);
    let c = daemon.counters().await;
    assert_eq!(c.fenced, 0);
    let refusals = daemon
        .log
        .iter()
        .filter(|e| matches!(e, DeliveryEvent::ControlRefused { requester, error } if requester.as_str() == "alice" && error.contains("sender mismatch")))
        .count();
    assert_eq!(refusals, 5, "{:#?}", daemon.log);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Claim 3: an agent cannot read or bind another agent's `dlv_<id>`
// ---------------------------------------------------------------------------------------------

/// Alice may bind her own `dlv_alice` (INFO, MSG.NEXT). Every verb on `dlv_bob`, every consumer
/// create on DLV (her own name included: the provisioner creates it), a direct or stream get of
/// DLV, and a delete of Bob's consumer are refused by the broker; Bob's copy stays pending for
/// Bob.
#[tokio::test]
async fn sec_agent_cannot_read_or_bind_another_agents_dlv() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let admin = connect(&s.admin).await.expect("admin").client;
    let admin_js = async_nats::jetstream::new(admin.clone());
    admin_js
        .publish(subj("dlv.bob"), Bytes::from_static(b"{\"for\":\"bob\"}"))
        .await
        .expect("publish")
        .await
        .expect("stored");
    let mut alice = Probe::connect(&s.server, "alice").await;
    let dlv = format!("DLV_{SPACE}");
    let own = alice
        .api(&format!("$JS.API.CONSUMER.INFO.{dlv}.dlv_alice"), json!({}))
        .await;
    assert_eq!(own["name"], "dlv_alice", "{own}");
    let spec = ConsumerSpec::dlv(&space(), &id("bob"));
    let create = spec.create_request();
    let mine = ConsumerSpec::dlv(&space(), &id("alice")).create_request();
    let refused: Vec<(String, Value)> = vec![
        (format!("$JS.API.CONSUMER.INFO.{dlv}.dlv_bob"), json!({})),
        (
            format!("$JS.API.CONSUMER.MSG.NEXT.{dlv}.dlv_bob"),
            json!({"batch": 1, "expires": 500_000_000}),
        ),
        (format!("$JS.API.CONSUMER.DELETE.{dlv}.dlv_bob"), json!({})),
        (
            create.subject.clone(),
            serde_json::from_slice(&create.body_bytes()).expect("json"),
        ),
        (
            mine.subject.clone(),
            serde_json::from_slice(&mine.body_bytes()).expect("json"),
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.{dlv}"),
            json!({"stream_name": dlv, "config": {"filter_subject": subj("dlv.bob"), "ack_policy": "none"}}),
        ),
        (
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{dlv}.spy"),
            json!({"stream_name": dlv, "config": {"durable_name": "spy", "filter_subject": subj("dlv.bob")}}),
        ),
        (
            format!("$JS.API.STREAM.MSG.GET.{dlv}"),
            json!({"last_by_subj": subj("dlv.bob")}),
        ),
        (
            format!("$JS.API.DIRECT.GET.{dlv}"),
            json!({"last_by_subj": subj("dlv.bob")}),
        ),
        (format!("$JS.API.STREAM.INFO.{dlv}"), json!({})),
        (format!("$JS.API.STREAM.PURGE.{dlv}"), json!({})),
    ];
    for (subject, body) in refused {
        alice
            .refused_request(&subject, Bytes::from(body.to_string()))
            .await;
    }
    // Bob's copy is still there for Bob.
    let info = admin_js
        .get_stream(&dlv)
        .await
        .expect("stream")
        .consumer_info("dlv_bob")
        .await
        .expect("info")
        .clone();
    assert_eq!(info.num_pending, 1, "{info:?}");
}

// ---------------------------------------------------------------------------------------------
// Claim 4: an agent cannot touch the mixed backstop store (INBOX)
// ---------------------------------------------------------------------------------------------

/// INBOX holds every member's pre-authorization copies. An agent has no grant of any kind on it:
/// it cannot write a dinbox entry (which the reader would otherwise transfer into someone's DLV),
/// inspect the stream, read a message, create or bind a consumer, or use the `reader`.
#[tokio::test]
async fn sec_agent_cannot_touch_inbox() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut alice = Probe::connect(&s.server, "alice").await;
    let inbox = format!("INBOX_{SPACE}");
    let entry = Bytes::from(
        json!({"msg": {"id": "forged", "ts": 1, "space": SPACE, "from": {"id": "bob", "name": "bob"},
                       "channel": "team", "parts": []},
               "channel": "team", "seq": 1, "reason": "durable-channel", "generation": 1})
        .to_string(),
    );
    for target in ["alice", "bob"] {
        alice
            .refused_pub(&subj(&format!("dinbox.{target}")), entry.clone())
            .await;
    }
    for (subject, body) in [
        (format!("$JS.API.STREAM.INFO.{inbox}"), json!({})),
        (format!("$JS.API.STREAM.MSG.GET.{inbox}"), json!({"seq": 1})),
        (format!("$JS.API.DIRECT.GET.{inbox}"), json!({"seq": 1})),
        (
            format!("$JS.API.CONSUMER.CREATE.{inbox}"),
            json!({"stream_name": inbox, "config": {"ack_policy": "none"}}),
        ),
        (format!("$JS.API.CONSUMER.INFO.{inbox}.reader"), json!({})),
        (
            format!("$JS.API.CONSUMER.MSG.NEXT.{inbox}.reader"),
            json!({"batch": 1}),
        ),
        (format!("$JS.API.STREAM.PURGE.{inbox}"), json!({})),
        (format!("$JS.API.STREAM.DELETE.{inbox}"), json!({})),
    ] {
        alice
            .refused_request(&subject, Bytes::from(body.to_string()))
            .await;
    }
    // Nothing forged landed.
    let admin = connect(&s.admin).await.expect("admin").client;
    let js = async_nats::jetstream::new(admin);
    let mut stream = js.get_stream(&inbox).await.expect("inbox");
    assert_eq!(stream.info().await.expect("info").state.messages, 0);
}

// ---------------------------------------------------------------------------------------------
// Claim 5: an agent cannot write membership or lease records
// ---------------------------------------------------------------------------------------------

/// The members, lease and ACL buckets are written by the daemon (members, lease) and the
/// provisioner (ACL) only. Alice's KV puts, deletes (a put with a delete marker is the same
/// subject) and the stream-level delete / purge / raw publish paths are refused; every record
/// keeps its revision. Her own presence key is the allowed neighbour.
#[tokio::test]
async fn sec_agent_cannot_write_membership_or_lease_records() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let daemon = Daemon::start(&s.server).await;
    let mut bob = Probe::connect(&s.server, "bob").await;
    let joined = bob.control("durableJoin", json!({"channel": "team"})).await;
    assert_eq!(joined["ok"], true, "{joined}");
    let bob_team = s.member("team", "bob").await.expect("record");
    let lease = s
        .kv_get(KvBucket::Delivery, "lease.0")
        .await
        .expect("lease held");
    let acl = s.kv_get(KvBucket::Acl, "alice").await.expect("acl");

    let mut alice = Probe::connect(&s.server, "alice").await;
    // Allowed neighbour: her own presence key.
    let js = async_nats::jetstream::new(alice.client.clone());
    js.publish(
        format!("$KV.cotal_presence_{SPACE}.alice"),
        Bytes::from_static(b"{}"),
    )
    .await
    .expect("presence publish")
    .await
    .expect("presence stored");
    let record = Bytes::from(
        json!({"channel": "secret", "owner": "alice", "state": "durable-active", "joinCursor": 0,
               "generation": 1, "activated": true, "writerIdentity": "alice", "updatedAt": 1})
        .to_string(),
    );
    for subject in [
        format!("$KV.cotal_members_{SPACE}.secret/alice"),
        format!("$KV.cotal_members_{SPACE}.team/bob"),
        format!("$KV.cotal_delivery_{SPACE}.lease.0"),
        format!("$KV.cotal_acl_{SPACE}.alice"),
        format!("$KV.cotal_channels_{SPACE}.team"),
        format!("$KV.cotal_presence_{SPACE}.bob"),
    ] {
        alice.refused_pub(&subject, record.clone()).await;
    }
    for bucket in ["members", "delivery", "acl"] {
        let stream = format!("KV_cotal_{bucket}_{SPACE}");
        for (verb, body) in [
            ("STREAM.PURGE", json!({})),
            ("STREAM.MSG.DELETE", json!({"seq": 1})),
            ("STREAM.DELETE", json!({})),
            ("STREAM.UPDATE", json!({"name": stream})),
        ] {
            alice
                .refused_request(
                    &format!("$JS.API.{verb}.{stream}"),
                    Bytes::from(body.to_string()),
                )
                .await;
        }
    }
    assert_eq!(s.member("team", "bob").await, Some(bob_team));
    assert_eq!(s.member("secret", "alice").await, None);
    assert_eq!(s.kv_get(KvBucket::Acl, "alice").await, Some(acl));
    let now = s
        .kv_get(KvBucket::Delivery, "lease.0")
        .await
        .expect("lease");
    // The daemon may have renewed meanwhile: the holder is still the daemon.
    let holder =
        |b: &Bytes| serde_json::from_slice::<Value>(b).expect("lease json")["holder"].clone();
    assert_eq!(holder(&now.0), holder(&lease.0));
    assert_eq!(holder(&now.0), DAEMON);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Claim 6: an agent cannot make the daemon reply to a subject not bound to the requester
// ---------------------------------------------------------------------------------------------

/// The daemon may publish on every `ctl.delivery.*.reply.>` lane, and the broker does not check
/// the reply subject a requester embeds. Alice's requests on her own lane with a reply aimed at
/// Bob's lane, Bob's `_INBOX_bob`, a CHAT subject or an unbound suffix get no reply at all: Bob,
/// listening on each target, receives nothing, and the daemon reports each as ignored. Her
/// request on Bob's lane is refused by the broker. The bound form still works.
#[tokio::test]
async fn sec_daemon_never_replies_to_a_subject_not_bound_to_the_requester() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let admin = connect(&s.admin).await.expect("admin").client;
    let mut alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Probe::connect(&s.server, "bob").await;
    let mut bob_lane = bob.granted_sub(&subj("ctl.delivery.bob.reply.>")).await;
    let mut bob_inbox = bob.granted_sub("_INBOX_bob.x").await;
    let mut bob_chat = bob.granted_sub(&subj("chat.*.team")).await;
    // A spy without restrictions sees everything the daemon could be tricked into sending.
    let mut spy = admin
        .subscribe(format!("cotal.{SPACE}.>"))
        .await
        .expect("spy");
    admin.flush().await.expect("flush");
    let body =
        json!({"op": "listMemberships", "args": {}, "from": {"id": "alice", "name": "alice"}});
    let lane = subj("ctl.delivery.alice");
    let targets = [
        subj("ctl.delivery.bob.reply.x"),
        "_INBOX_bob.x".to_owned(),
        subj("chat.bob.team"),
        format!("{lane}.reply"),
        format!("{lane}.reply.a.b"),
        format!("{lane}.other.x"),
        format!("{lane}x.reply.y"),
        lane.clone(),
    ];
    for target in &targets {
        let r = alice
            .control_raw(Bytes::from(body.to_string()), Some(target), false)
            .await;
        assert!(r.is_none(), "reply to {target}: {r:?}");
    }
    // No reply subject at all.
    alice
        .client
        .publish(lane.clone(), Bytes::from(body.to_string()))
        .await
        .expect("publish");
    // The request itself on Bob's lane: refused by the broker.
    alice
        .refused_pub(&subj("ctl.delivery.bob"), Bytes::from(body.to_string()))
        .await;
    // The bound form answers (and proves the daemon was listening all along).
    let ok = alice.control("listMemberships", json!({})).await;
    assert_eq!(ok["ok"], true, "{ok}");
    for (name, sub) in [
        ("bob lane", &mut bob_lane),
        ("bob inbox", &mut bob_inbox),
        ("bob chat", &mut bob_chat),
    ] {
        let got = tokio::time::timeout(QUIET, sub.next()).await;
        assert!(got.is_err(), "{name} received {got:?}");
    }
    // Everything on the space's subjects: the requests and the one bound reply, nothing else.
    let mut replies = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), spy.next()).await {
        if m.subject.as_str() != lane
            && !m
                .subject
                .as_str()
                .starts_with("cotal.sec.ctl.delivery.alice.reply.r")
        {
            replies.push(m.subject.to_string());
        }
    }
    assert!(replies.is_empty(), "daemon published {replies:?}");
    daemon.drain();
    let ignored = daemon
        .log
        .iter()
        .filter(|e| matches!(e, DeliveryEvent::ControlIgnored(_)))
        .count();
    assert_eq!(ignored, targets.len() + 1, "{:#?}", daemon.log);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Claim 7: a member whose ACL is narrowed stops receiving backstop copies of the channel
// ---------------------------------------------------------------------------------------------

/// A running agent machine and what it surfaced.
struct Peer {
    handle: MachineHandle<Agent>,
    events: UnboundedReceiver<AgentEvent>,
    task: JoinHandle<Agent>,
    log: Vec<AgentEvent>,
    got: Vec<String>,
}

impl Peer {
    async fn start(server: &NatsServer, name: &str) -> Peer {
        Peer::start_with(server, name, false).await
    }

    /// [`Peer::start`]; with `unicast` it also pumps its (provisioned) `dm_<id>`.
    async fn start_with(server: &NatsServer, name: &str, unicast: bool) -> Peer {
        let mut config = AgentConfig::new(space(), Sender::new(id(name), name), Vec::new(), 4242);
        config.durable_backstop = true;
        config.create_dlv_consumer = false;
        config.unicast = unicast;
        Peer::start_config(server, config).await
    }

    async fn pump(&mut self, d: Duration) {
        let Ok(Some(event)) = tokio::time::timeout(d, self.events.recv()).await else {
            return;
        };
        if let AgentEvent::MessagesReady { .. } = event {
            for s in self.handle.take_messages(256).await.expect("runner") {
                self.got.push(s.item.message.id.clone());
                self.handle.handled(s.id).await.expect("handled");
            }
        } else {
            self.log.push(event);
        }
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&[AgentEvent], &[String]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(&self.log, &self.got) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no {what}: {:#?} {:?}", self.log, self.got);
            self.pump(left.min(Duration::from_millis(200))).await;
        }
    }

    async fn idle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < deadline {
            self.pump(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await;
        }
    }

    async fn join_durable(&mut self, channel: &str) {
        let request = self.handle.join(ch(channel)).await.expect("join");
        self.until("join result", |log, _| {
            log.iter().any(|e| matches!(e, AgentEvent::Joined { request: r, .. } | AgentEvent::JoinFailed { request: r, .. } if *r == Some(request)))
        })
        .await;
        let joined = self.log.iter().find(|e| matches!(e, AgentEvent::Joined { request: r, report, .. } if *r == Some(request) && report.durable));
        assert!(joined.is_some(), "{:#?}", self.log);
    }

    async fn stop(self) {
        self.handle.stop(Duration::from_secs(3)).expect("stop");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task");
    }
}

/// Alice's post on `team` through CHAT with its msg-id; returns the message id.
async fn post(alice: &Probe, n: u32) -> String {
    let mid = format!("00000000-0000-4000-8000-{n:012}");
    let body = json!({"id": mid, "ts": 1, "space": SPACE, "from": {"id": "alice", "name": "alice"},
                      "channel": "team", "parts": [{"kind": "text", "text": format!("m{n}")}]});
    let js = async_nats::jetstream::new(alice.client.clone());
    js.send_publish(
        subj("chat.alice.team"),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body.to_string()))
            .message_id(mid.clone()),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    mid
}

async fn until_activated(s: &Space9, channel: &str, owner: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((v, _)) = s.member(channel, owner).await {
            let r: MembershipRecord = serde_json::from_slice(&v).expect("record");
            if r.activated == Some(true) {
                return;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "not activated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies in `dlv_<owner>` not yet acked (pending, or delivered to a pull that is gone).
async fn dlv_pending(s: &Space9, owner: &str) -> u64 {
    let conn = connect(&s.admin).await.expect("admin");
    let js = async_nats::jetstream::new(conn.client);
    let stream = js.get_stream(format!("DLV_{SPACE}")).await.expect("dlv");
    let info = stream
        .consumer_info(format!("dlv_{owner}"))
        .await
        .expect("consumer info")
        .clone();
    info.num_pending + info.num_ack_pending as u64
}

/// Bob is a durable member of `team`, goes offline, and his read ACL (record and credential) is
/// narrowed to `secret`. Copies not yet transferred to his DLV when the narrowing lands — posts
/// fan-out had not routed yet, and posts after it — are dropped by the trusted reader (counted);
/// Bob, back online, surfaces none of them.
#[tokio::test]
async fn sec_narrowed_acl_stops_backstop_copies_not_yet_transferred() {
    let Some(mut s) = Space9::start().await else {
        return;
    };
    let daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.join_durable("team").await;
    until_activated(&s, "team", "bob").await;
    let m1 = post(&alice, 1).await;
    bob.until("m1", |_, got| got.contains(&m1)).await;
    // m1 may surface from its live copy first: Bob stays until its durable copy, transferred
    // before the narrowing and rightly so, is acked too, so DLV holds nothing of the old ACL.
    let deadline = tokio::time::Instant::now() + WAIT;
    while dlv_pending(&s, "bob").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob did not ack m1's durable copy"
        );
        bob.pump(Duration::from_millis(200)).await;
    }
    bob.stop().await;
    // Queued in the pipeline: posted while no daemon routes them.
    daemon.stop().await;
    let queued = [post(&alice, 2).await, post(&alice, 3).await];
    // The narrowing: the ACL record, and the credential (server reload).
    s.put_acl("bob", &["secret"], 2).await;
    s.server.reload_with_users(users(ALICE_READ, &["secret"]));
    let mut daemon = Daemon::start(&s.server).await;
    let after = post(&alice, 4).await;
    // Every copy is judged and dropped by the reader: none lands in DLV.
    let deadline = tokio::time::Instant::now() + WAIT;
    while daemon.counters().await.dropped < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reader did not drop the copies: {:?}",
            daemon.counters().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counters = daemon.counters().await;
    assert_eq!(
        counters.transferred, 0,
        "{counters:?}; queued {queued:?}, after {after}; {:#?}",
        daemon.log
    );
    assert_eq!(dlv_pending(&s, "bob").await, 0);
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.idle(Duration::from_secs(2)).await;
    for m in queued.iter().chain([&after]) {
        assert!(!bob.got.contains(m), "bob surfaced {m} after the narrowing");
    }
    bob.stop().await;
    daemon.stop().await;
}

/// G6, DLV side, with the daemon's provisioned credential (which must let it read the backlog of
/// `dlv_bob`): Bob is offline while 1,010 copies fall due. His DLV takes the first 1,000; the ten
/// newest are shed as reported losses (`CopyShed`, counter `dlv_shed`) instead of pushing ten of
/// his oldest unread copies out of the stream without a word.
#[tokio::test]
async fn a_full_dlv_sheds_the_newest_copies_as_reported_losses() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.join_durable("team").await;
    until_activated(&s, "team", "bob").await;
    bob.stop().await;
    for n in 0..1010 {
        post(&alice, n).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    loop {
        let c = daemon.counters().await;
        if c.transferred + c.dlv_shed >= 1010 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = daemon.counters().await;
    // At least the ten that do not fit; a transfer in flight at a read counts against the room,
    // so a copy or two more may be shed, never fewer.
    assert_eq!(c.transferred + c.dlv_shed, 1010, "{c:?}");
    assert!(c.dlv_shed >= 10 && c.transferred <= 1000, "{c:?}");
    assert_eq!(
        c.backlog_unverified, 0,
        "{c:?}: the credential lacks the DLV read"
    );
    assert_eq!(
        dlv_pending(&s, "bob").await,
        c.transferred,
        "no unread copy was pushed out"
    );
    let shed: Vec<u64> = daemon
        .log
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::CopyShed { owner, seq, .. } if owner.as_str() == "bob" => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(shed.len() as u64, c.dlv_shed, "{shed:?}");
    daemon.stop().await;
}

/// Issue 9, "including copies already queued for it": copies the reader transferred to Bob's DLV
/// *before* the narrowing are taken back by the daemon's DLV revocation sweep
/// (`cotal_core::delivery::revoke`): the ACL watch reports the change, the sweep reads
/// `cotal.<s>.dlv.bob` and deletes every copy the narrowed ACL no longer admits. Bob, started
/// right after the narrowing, surfaces neither. The window (ACL write → copies gone from DLV) is
/// measured by a concurrent poll of the stream and printed; the daemon counted and reported both
/// revocations, and no sweep failed.
#[tokio::test]
async fn sec_narrowed_acl_stops_backstop_copies_already_in_dlv() {
    let Some(mut s) = Space9::start().await else {
        return;
    };
    let daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.join_durable("team").await;
    until_activated(&s, "team", "bob").await;
    bob.stop().await;
    let in_dlv = [post(&alice, 2).await, post(&alice, 3).await];
    let mut daemon = daemon;
    let deadline = tokio::time::Instant::now() + WAIT;
    while dlv_pending(&s, "bob").await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not transferred: {:?} {:#?}",
            daemon.counters().await,
            daemon.log
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = connect(&s.admin).await.expect("admin").client;
    assert_eq!(dlv_stored(&admin, "bob").await, 2);
    s.put_acl("bob", &["secret"], 2).await;
    // The window starts when the KV write is acknowledged (the daemon may already be sweeping).
    let narrowed_at = tokio::time::Instant::now();
    let window = tokio::spawn({
        let admin = admin.clone();
        async move {
            let deadline = narrowed_at + WAIT;
            while dlv_stored(&admin, "bob").await > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            narrowed_at.elapsed()
        }
    });
    s.server.reload_with_users(users(ALICE_READ, &["secret"]));
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.idle(Duration::from_secs(2)).await;
    let surfaced: Vec<_> = in_dlv.iter().filter(|m| bob.got.contains(m)).collect();
    bob.stop().await;
    let window = window.await.expect("window probe");
    println!("revocation window (ACL write acked -> copies gone from DLV): {window:?}");
    let counters = daemon.counters().await;
    let revoked = daemon
        .log
        .iter()
        .filter(|e| {
            matches!(e, DeliveryEvent::DlvRevocation(SweepEvent::Revoked { owner, channel, .. })
                if owner.as_str() == "bob" && channel.as_ref().map(ConcreteChannel::as_str) == Some("team"))
        })
        .count();
    daemon.stop().await;
    assert!(
        surfaced.is_empty(),
        "bob surfaced {surfaced:?} from DLV after his ACL was narrowed"
    );
    assert_eq!(dlv_stored(&admin, "bob").await, 0, "copies left in DLV");
    assert!(window < WAIT, "the copies stayed in DLV for {window:?}");
    assert_eq!(counters.dlv_revoked, 2, "{counters:?}");
    assert_eq!(counters.dlv_sweeps_failed, 0, "{counters:?}");
    assert_eq!(revoked, 2, "one DlvRevocation event per copy");
}

/// Messages stored on `owner`'s DLV subject (acked or not), from `STREAM.INFO` with a subject
/// filter.
async fn dlv_stored(admin: &Client, owner: &str) -> u64 {
    let subject = format!("cotal.{SPACE}.dlv.{owner}");
    let reply = admin
        .request(
            format!("$JS.API.STREAM.INFO.DLV_{SPACE}"),
            Bytes::from(json!({ "subjects_filter": subject }).to_string()),
        )
        .await
        .expect("stream info");
    let info: Value = serde_json::from_slice(&reply.payload).expect("stream info json");
    info["state"]["subjects"][&subject].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Hostile input, over the real server
// ---------------------------------------------------------------------------------------------

/// Hostile `ctl.delivery` requests on Alice's own lane (the broker lets every one through):
/// malformed JSON, non-object JSON, deep nesting, wrong types, unknown ops, invalid and wildcard
/// channels, leave generations that are not finite integers, a payload near the server's
/// `max_payload`. Each gets an `{ok:false, error}` reply within the wait, the daemon keeps
/// serving, and no membership record changes. A replayed join is idempotent (same generation).
#[tokio::test]
async fn hostile_control_requests_get_an_error_reply_and_change_nothing() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let mut alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Probe::connect(&s.server, "bob").await;
    let joined = bob.control("durableJoin", json!({"channel": "team"})).await;
    assert_eq!(joined["ok"], true, "{joined}");
    let bob_team = s.member("team", "bob").await.expect("record");

    let from = json!({"id": "alice", "name": "alice"});
    let req = |op: Value, args: Value| json!({"op": op, "args": args, "from": from}).to_string();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = req(
        json!("durableJoin"),
        json!({"channel": "x".repeat(1_000_000)}),
    );
    let payloads: Vec<(&str, String)> = vec![
        ("malformed", "{not json".to_owned()),
        ("empty", String::new()),
        ("null", "null".to_owned()),
        ("array", "[]".to_owned()),
        ("string", "\"durableJoin\"".to_owned()),
        ("number", "42".to_owned()),
        ("deep nesting", deep),
        ("op type", req(json!(7), json!({"channel": "team"}))),
        ("unknown op", req(json!("purgeAll"), json!({}))),
        ("args type", req(json!("durableJoin"), json!(["team"]))),
        (
            "channel type",
            req(json!("durableJoin"), json!({"channel": 42})),
        ),
        (
            "channel null",
            req(json!("durableJoin"), json!({"channel": null})),
        ),
        ("blank", req(json!("durableJoin"), json!({"channel": "  "}))),
        (
            "empty segment",
            req(json!("durableJoin"), json!({"channel": "team..x"})),
        ),
        (
            "unsafe segment",
            req(json!("durableJoin"), json!({"channel": "te am"})),
        ),
        (
            "wildcard *",
            req(json!("durableJoin"), json!({"channel": "*"})),
        ),
        (
            "wildcard team.*",
            req(json!("durableJoin"), json!({"channel": "team.*"})),
        ),
        (
            "wildcard >",
            req(json!("durableJoin"), json!({"channel": ">"})),
        ),
        (
            "wildcard news.>",
            req(json!("durableJoin"), json!({"channel": "news.>"})),
        ),
        (
            "misplaced >",
            req(json!("durableJoin"), json!({"channel": ">.team"})),
        ),
        (
            "leave wildcard",
            req(
                json!("durableLeave"),
                json!({"channel": "team.*", "generation": 1}),
            ),
        ),
        (
            "leave no generation",
            req(json!("durableLeave"), json!({"channel": "team"})),
        ),
        (
            "leave generation string",
            req(
                json!("durableLeave"),
                json!({"channel": "team", "generation": "1"}),
            ),
        ),
        (
            "leave generation fraction",
            req(
                json!("durableLeave"),
                json!({"channel": "team", "generation": 1.5}),
            ),
        ),
        (
            "leave generation huge",
            req(
                json!("durableLeave"),
                json!({"channel": "team", "generation": 1e308}),
            ),
        ),
        (
            "from type",
            json!({"op": "listMemberships", "args": {}, "from": "alice"}).to_string(),
        ),
        ("huge", huge),
    ];
    for (name, payload) in &payloads {
        let reply = alice
            .control_raw(Bytes::from(payload.clone()), None, true)
            .await
            .unwrap_or_else(|| panic!("{name}: no reply"));
        assert_eq!(reply["ok"], false, "{name}: {reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{name}: {reply}"
        );
    }
    let raw = alice
        .control_raw(Bytes::from_static(b"{\"op\":\"\xff\xfe\"}"), None, true)
        .await
        .expect("a reply to invalid UTF-8");
    assert_eq!(raw["ok"], false, "{raw}");
    // Subjects with extra tokens never reach the daemon: the broker refuses them on her lane.
    for extra in [
        "ctl.delivery.alice.extra",
        "ctl.delivery.alice.reply",
        "ctl.delivery.alice.a.b",
    ] {
        alice
            .refused_pub(
                &subj(extra),
                Bytes::from(req(json!("listMemberships"), json!({}))),
            )
            .await;
    }
    // A replayed join: the same generation, no second membership.
    let first = alice
        .control("durableJoin", json!({"channel": "team"}))
        .await;
    let again = alice
        .control("durableJoin", json!({"channel": "team"}))
        .await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(
        first["data"]["generation"], again["data"]["generation"],
        "{first} {again}"
    );
    let list = alice.control("listMemberships", json!({})).await;
    assert_eq!(
        list["data"]["memberships"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    // Nothing else changed, and the daemon still serves.
    assert_eq!(s.member("team", "bob").await, Some(bob_team));
    for c in ["news", "x", "secret", "team.x"] {
        assert_eq!(s.member(c, "alice").await, None, "{c}");
    }
    let (_, counters, serving) = daemon.handle.status().await.expect("daemon runs");
    assert!(serving);
    assert_eq!(counters.fenced + counters.writes_failed, 0, "{counters:?}");
    daemon.drain();
    let refused = daemon
        .log
        .iter()
        .filter(|e| {
            matches!(
                e,
                DeliveryEvent::ControlRefused { .. }
                    | DeliveryEvent::JoinFailed { .. }
                    | DeliveryEvent::LeaveFailed { .. }
            )
        })
        .count();
    assert!(refused >= payloads.len(), "{refused} < {}", payloads.len());
    daemon.stop().await;
}

/// Hostile channel traffic to an agent, published on Alice's own (granted) subject: malformed
/// JSON, wrong types, a spoofed `from.id`, a body near `max_payload`, a replayed msg-id (stored
/// once by JetStream) and the same message re-sent on core NATS. Bob surfaces each good message
/// exactly once, counts the spoofed and malformed copies, and keeps running.
#[tokio::test]
async fn hostile_channel_traffic_to_an_agent() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    let request = bob.handle.join(ch("team")).await.expect("join");
    bob.until("joined", |log, _| {
        log.iter()
            .any(|e| matches!(e, AgentEvent::Joined { request: r, .. } if *r == Some(request)))
    })
    .await;
    let team = subj("chat.alice.team");
    let msg = |id: &str, from: &str| {
        json!({"id": id, "ts": 1, "space": SPACE, "from": {"id": from, "name": from},
               "channel": "team", "parts": [{"kind": "text", "text": "ok"}]})
        .to_string()
    };
    let bad = [
        "{not json".to_owned(),
        "null".to_owned(),
        json!({"id": 5, "from": {"id": "alice"}}).to_string(),
        json!({"id": "w1", "ts": "x", "space": SPACE, "from": {"id": "alice", "name": "a"}, "channel": "team", "parts": 5}).to_string(),
    ];
    for b in &bad {
        alice
            .client
            .publish(team.clone(), Bytes::from(b.clone()))
            .await
            .expect("publish");
    }
    // Spoofed sender in the payload.
    alice
        .client
        .publish(team.clone(), Bytes::from(msg("spoof-1", "carol")))
        .await
        .expect("publish");
    // A big body (under max_payload) that is otherwise valid.
    let big = json!({"id": "big-1", "ts": 1, "space": SPACE, "from": {"id": "alice", "name": "alice"},
                     "channel": "team", "parts": [{"kind": "text", "text": "y".repeat(900_000)}]});
    alice
        .client
        .publish(team.clone(), Bytes::from(big.to_string()))
        .await
        .expect("publish");
    // Replayed msg-id through JetStream, and a core-NATS re-send of the same message.
    let js = async_nats::jetstream::new(alice.client.clone());
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let ack = js
            .send_publish(
                team.clone(),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(msg("replay-1", "alice")))
                    .message_id("replay-1"),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        seqs.push((ack.sequence, ack.duplicate));
    }
    assert_eq!(seqs[0].0, seqs[1].0, "{seqs:?}");
    assert!(seqs[1].1, "{seqs:?}");
    alice
        .client
        .publish(team.clone(), Bytes::from(msg("replay-1", "alice")))
        .await
        .expect("publish");
    alice.client.flush().await.expect("flush");
    bob.until("the good messages", |_, got| {
        got.iter().any(|g| g == "big-1") && got.iter().any(|g| g == "replay-1")
    })
    .await;
    bob.idle(QUIET).await;
    assert_eq!(
        bob.got.iter().filter(|g| *g == "replay-1").count(),
        1,
        "{:?}",
        bob.got
    );
    assert!(
        !bob.got.iter().any(|g| g == "spoof-1" || g == "w1"),
        "{:?}",
        bob.got
    );
    let health = bob.handle.health().await.expect("bob runs");
    assert!(health.counters.spoofed >= 1, "{:?}", health.counters);
    assert!(
        health.counters.malformed >= bad.len() as u64,
        "{:?}",
        health.counters
    );
    bob.stop().await;
}

/// Hostile DMs through JetStream on Alice's own unicast lane `inst.bob.alice` (the broker lets her
/// publish there): malformed JSON, wrong types and a payload claiming to be from Carol are
/// terminated by Bob's agent (counted, an anomaly each, never surfaced, never redelivered); a
/// replayed msg-id is stored once and a good DM surfaces once with kind `dm`. Alice cannot publish
/// on Carol's lane `inst.bob.carol` at all (the broker refuses it).
#[tokio::test]
async fn hostile_direct_traffic_to_an_agent() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let conn = connect(&s.admin).await.expect("connect admin");
    apply_consumer(
        &conn.client,
        &ConsumerSpec::dm(&space(), &id("bob")),
        Duration::from_secs(5),
    )
    .await
    .expect("dm consumer");
    let mut alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start_with(&s.server, "bob", true).await;
    // The DM feed binds after the agent starts: wait for it (bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = bob.handle.health().await.expect("bob runs");
        if !health.direct.is_empty() && health.direct.iter().all(|d| d.bound) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dm_bob not bound: {:?}",
            health.direct
        );
        bob.pump(Duration::from_millis(50)).await;
    }
    let lane = subj("inst.bob.alice");
    let msg = |id: &str, from: &str| {
        json!({"id": id, "ts": 1, "space": SPACE, "from": {"id": from, "name": from},
               "to": "bob", "parts": [{"kind": "text", "text": "ok"}]})
        .to_string()
    };
    let js = async_nats::jetstream::new(alice.client.clone());
    let publish = |body: String, msg_id: &str| {
        let js = js.clone();
        let lane = lane.clone();
        let msg_id = msg_id.to_owned();
        async move {
            js.send_publish(
                lane,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(body))
                    .message_id(msg_id),
            )
            .await
            .expect("publish")
            .await
            .expect("stored")
        }
    };
    let bad = [
        "{not json".to_owned(),
        "null".to_owned(),
        json!({"id": "w1", "ts": "x", "space": SPACE, "from": {"id": "alice", "name": "a"}, "to": "bob", "parts": 5}).to_string(),
    ];
    for (i, b) in bad.iter().enumerate() {
        publish(b.clone(), &format!("bad-{i}")).await;
    }
    publish(msg("spoof-1", "carol"), "spoof-1").await;
    let first = publish(msg("dm-ok", "alice"), "dm-ok").await;
    let again = publish(msg("dm-ok", "alice"), "dm-ok").await;
    assert_eq!(first.sequence, again.sequence);
    assert!(again.duplicate);
    // Carol's lane is not Alice's to publish on.
    alice
        .client
        .publish(subj("inst.bob.carol"), Bytes::from(msg("forged", "carol")))
        .await
        .expect("publish");
    alice.refused("Publish", &subj("inst.bob.carol")).await;
    bob.until("the good DM", |_, got| got.iter().any(|g| g == "dm-ok"))
        .await;
    bob.idle(QUIET).await;
    assert_eq!(
        bob.got,
        vec!["dm-ok".to_owned()],
        "only the good DM surfaces"
    );
    let health = bob.handle.health().await.expect("bob runs");
    assert_eq!(health.counters.direct_spoofed, 1, "{:?}", health.counters);
    assert_eq!(
        health.counters.direct_malformed,
        bad.len() as u64,
        "{:?}",
        health.counters
    );
    let anomalies = bob
        .log
        .iter()
        .filter(|e| matches!(e, AgentEvent::Anomaly { .. }))
        .count();
    assert_eq!(anomalies, bad.len() + 1, "{:?}", bob.log);
    // Terminated and acked: nothing pending, nothing waiting for a redelivery.
    let stream = async_nats::jetstream::new(conn.client.clone())
        .get_stream(format!("DM_{SPACE}"))
        .await
        .expect("DM stream");
    let info = stream
        .consumer_info("dm_bob")
        .await
        .expect("dm_bob info")
        .clone();
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    bob.stop().await;
}

/// Hostile entries in INBOX (an agent cannot write there, so they stand for a buggy or
/// compromised privileged writer): malformed JSON, wrong types, a wildcard channel, an entry for
/// an owner with no ACL record, an entry whose channel lies outside the owner's ACL. The reader
/// terminates the malformed ones at once (counted), drops the uncovered one, defers the unknown
/// owner with its nak delay — never a hot redelivery loop — and transfers nothing to any DLV.
#[tokio::test]
async fn hostile_inbox_entries_are_terminated_or_dropped_never_hot_looped() {
    let Some(s) = Space9::start().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let admin = connect(&s.admin).await.expect("admin").client;
    let js = async_nats::jetstream::new(admin);
    let entry = |owner_channel: &str, generation: Value| {
        json!({"msg": {"id": format!("h-{owner_channel}"), "ts": 1, "space": SPACE,
                       "from": {"id": "alice", "name": "alice"}, "channel": owner_channel,
                       "parts": []},
               "channel": owner_channel, "seq": 1, "reason": "durable-channel",
               "generation": generation})
        .to_string()
    };
    let inputs: Vec<(String, String)> = vec![
        (subj("dinbox.bob"), "{not json".to_owned()),
        (subj("dinbox.bob"), "[]".to_owned()),
        (subj("dinbox.bob"), entry("team", json!("one"))),
        (subj("dinbox.bob"), entry("team.*", json!(1))),
        (subj("dinbox.bob"), entry("news.x", json!(1))),
        (subj("dinbox.nobody"), entry("team", json!(1))),
    ];
    for (subject, body) in &inputs {
        js.publish(subject.clone(), Bytes::from(body.clone()))
            .await
            .expect("publish")
            .await
            .expect("stored in INBOX");
    }
    // Bounded window: count the reader's deliveries.
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let c = daemon.counters().await;
    assert!(c.terminated >= 4, "{c:?}");
    assert!(c.dropped >= 1, "{c:?}");
    assert_eq!(c.transferred, 0, "{c:?}");
    assert_eq!(dlv_pending(&s, "bob").await, 0);
    let mut inbox = js
        .get_stream(format!("INBOX_{SPACE}"))
        .await
        .expect("inbox");
    let _ = inbox.info().await.expect("info");
    let reader = inbox
        .consumer_info("reader")
        .await
        .expect("reader info")
        .clone();
    // Six entries; only the unknown owner is redelivered, at most once per nak delay (2 s).
    let redeliveries = reader
        .delivered
        .consumer_sequence
        .saturating_sub(inputs.len() as u64);
    assert!(
        redeliveries <= 3,
        "{redeliveries} redeliveries in {window:?}: a hot loop? {reader:?}"
    );
    assert!(c.deferred >= 1 && c.deferred <= 4, "{c:?}");
    let (_, _, serving) = daemon.handle.status().await.expect("daemon runs");
    assert!(serving);
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Issue 21 item 1: an agent that saw one of Alice's message ids cannot silence her later sends
// ---------------------------------------------------------------------------------------------

/// The old id generator's algorithm (splitmix64, `entropy.rs` before issue 21), run by an
/// attacker: from one observed uuid, the generator's state and so every later uuid.
mod splitmix_attack {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    const C1: u64 = 0xBF58_476D_1CE4_E5B9;
    const C2: u64 = 0x94D0_49BB_1331_11EB;

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(C1);
        z = (z ^ (z >> 27)).wrapping_mul(C2);
        z ^ (z >> 31)
    }

    fn inverse(c: u64) -> u64 {
        let mut x = c;
        for _ in 0..6 {
            x = x.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(x)));
        }
        x
    }

    fn unxorshift(y: u64, k: u32) -> u64 {
        let mut x = y;
        let mut s = k;
        while s < 64 {
            x ^= y >> s;
            s += k;
        }
        x
    }

    fn unmix(z: u64) -> u64 {
        let z = unxorshift(z, 31).wrapping_mul(inverse(C2));
        let z = unxorshift(z, 27).wrapping_mul(inverse(C1));
        unxorshift(z, 30)
    }

    fn uuid(hi: u64, lo: u64) -> String {
        let hi = (hi & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
        let lo = (lo & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }

    /// The `n` uuids the old generator would make after `seen` (empty if `seen` is not one of
    /// its outputs).
    pub fn next_ids(seen: &str, n: usize) -> Vec<String> {
        let hex: String = seen.chars().filter(|c| *c != '-').collect();
        let (Ok(hi), Ok(lo)) = (
            u64::from_str_radix(&hex[..16], 16),
            u64::from_str_radix(&hex[16..], 16),
        ) else {
            return Vec::new();
        };
        for nibble in 0..16u64 {
            let candidate = (hi & !0xF000) | (nibble << 12);
            let state = unmix(candidate);
            let next = mix(state.wrapping_add(GAMMA));
            if next & 0x3FFF_FFFF_FFFF_FFFF == lo & 0x3FFF_FFFF_FFFF_FFFF {
                let mut s = state.wrapping_add(GAMMA);
                return (0..n)
                    .map(|_| {
                        s = s.wrapping_add(GAMMA);
                        let hi = mix(s);
                        s = s.wrapping_add(GAMMA);
                        uuid(hi, mix(s))
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    #[test]
    fn the_attack_predicts_the_old_generator() {
        // The old generator, as it was: splitmix64 outputs, two per uuid.
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut draw = || {
            s = s.wrapping_add(GAMMA);
            mix(s)
        };
        let ids: Vec<String> = (0..4).map(|_| uuid(draw(), draw())).collect();
        assert_eq!(next_ids(&ids[0], 3), ids[1..]);
    }
}

impl Peer {
    /// A running agent of `config` (connected as its own user).
    async fn start_config(server: &NatsServer, config: AgentConfig) -> Peer {
        let name = config.me.id.as_str().to_owned();
        let conn = connect(&config_of(server, &name)).await.expect("connect");
        let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
        let Runner {
            handle,
            events,
            task,
        } = Runner::spawn(Agent::new(config).expect("agent"), exec, inputs);
        let mut p = Peer {
            handle,
            events,
            task,
            log: Vec::new(),
            got: Vec::new(),
        };
        p.until("connected", |log, _| {
            log.iter()
                .any(|e| matches!(e, AgentEvent::Connected { .. }))
        })
        .await;
        p
    }

    /// The `Sent` of `request` (asserts there is no `SendFailed`): `(id, duplicate)`.
    async fn sent(&mut self, request: cotal_core::agent::RequestId) -> (String, bool) {
        self.until("send result", |log, _| {
            log.iter().any(|e| matches!(e, AgentEvent::Sent { request: r, .. } | AgentEvent::SendFailed { request: r, .. } if *r == request))
        })
        .await;
        self.log
            .iter()
            .find_map(|e| match e {
                AgentEvent::Sent {
                    request: r,
                    id,
                    duplicate,
                    ..
                } if *r == request => Some((id.clone(), *duplicate)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("send {request:?} failed: {:#?}", self.log))
    }
}

/// Mallory reads and posts on `general` only (exactly `Permissions::agent`). She reads one of
/// Alice's message ids there, computes the ids Alice would make next with the old generator's
/// algorithm, and publishes each of them first with that `Nats-Msg-Id` on the subjects the broker
/// lets her use: her own chat subject (CHAT), a DM to herself (DM) and a task of her own (TASK).
/// Alice's agent is keyed as the `cotal` binary keys it (`run::os_key`). Her later post on
/// `team` (which Mallory cannot read), her DM to Bob and her task are all stored, not answered as
/// duplicates, and Bob receives the post and the DM. With the old splitmix64 generator the
/// prediction is exact and all three come back `duplicate: true` with nothing stored.
#[tokio::test]
async fn sec_a_seen_message_id_does_not_let_another_agent_silence_later_sends() {
    let Some(server) = NatsServer::start_with_users(vec![
        agent_user("alice", &["team", "general"], &["team", "general"]),
        agent_user("bob", &["team"], &["team"]),
        agent_user("mallory", &["general"], &["general"]),
        daemon_user(),
        admin_user(),
    ]) else {
        return;
    };
    let admin = server.config_as("admin", "adminpw");
    let conn = connect(&admin).await.expect("connect admin");
    let report = provision_space(&conn.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    apply_consumer(
        &conn.client,
        &ConsumerSpec::dm(&space(), &id("bob")),
        Duration::from_secs(5),
    )
    .await
    .expect("dm consumer");

    let mut bob_config =
        AgentConfig::new(space(), Sender::new(id("bob"), "bob"), vec![ch("team")], 1);
    bob_config.durable_backstop = false;
    bob_config.unicast = true;
    let mut bob = Peer::start_config(&server, bob_config).await;
    bob.until("bob on team", |log, _| {
        log.iter()
            .any(|e| matches!(e, AgentEvent::Joined { channel, .. } if channel.as_str() == "team"))
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = bob.handle.health().await.expect("bob runs");
        if !health.direct.is_empty() && health.direct.iter().all(|d| d.bound) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "dm_bob not bound");
        bob.pump(Duration::from_millis(50)).await;
    }

    // Alice, keyed as the binary keys every agent it runs.
    let mut alice_config =
        AgentConfig::new(space(), Sender::new(id("alice"), "alice"), Vec::new(), 0);
    alice_config.durable_backstop = false;
    alice_config.id_key = Some(cotal_driver_tokio::run::os_key());
    let mut alice = Peer::start_config(&server, alice_config).await;

    // Mallory sees one of Alice's ids on `general`.
    let mallory = Probe::connect(&server, "mallory").await;
    let mut general = mallory
        .client
        .subscribe(subj("chat.*.general"))
        .await
        .expect("mallory reads general");
    mallory.barrier().await;
    let (request, _) = alice
        .handle
        .send_text(ch("general"), "hello".into())
        .await
        .expect("send");
    let (seen, _) = alice.sent(request).await;
    let msg = tokio::time::timeout(WAIT, general.next())
        .await
        .expect("mallory sees the post")
        .expect("subscription");
    let body: Value = serde_json::from_slice(&msg.payload).expect("json");
    assert_eq!(body["id"], json!(seen));

    // She publishes the predicted ids first, on every stream Alice sends to.
    let predicted = splitmix_attack::next_ids(&seen, 32);
    let js = async_nats::jetstream::new(mallory.client.clone());
    for (n, mid) in predicted.iter().enumerate() {
        for subject in [
            subj("chat.mallory.general"),
            subj("inst.mallory.mallory"),
            subj("svc.worker.mallory"),
        ] {
            let body = json!({"id": mid, "ts": 1, "space": SPACE,
                              "from": {"id": "mallory", "name": "mallory"},
                              "parts": [{"kind": "text", "text": format!("squat {n}")}]});
            js.send_publish(
                subject,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(body.to_string()))
                    .message_id(mid.clone()),
            )
            .await
            .expect("mallory publishes")
            .await
            .expect("stored");
        }
    }

    // Alice's later post on `team`, DM to Bob and task all land.
    let (post, _) = alice
        .handle
        .send_text(ch("team"), "for the team".into())
        .await
        .expect("post");
    let (dm, _) = alice
        .handle
        .send_dm_text(id("bob"), "for bob".into())
        .await
        .expect("dm");
    let (task, _) = alice
        .handle
        .send_anycast_text(
            cotal_core::wire::token::Role::new("worker").expect("role"),
            "work".into(),
        )
        .await
        .expect("task");
    let (post_id, post_dup) = alice.sent(post).await;
    let (dm_id, dm_dup) = alice.sent(dm).await;
    let (task_id, task_dup) = alice.sent(task).await;
    assert!(
        !post_dup && !dm_dup && !task_dup,
        "a send was swallowed as a duplicate of Mallory's publish: post {post_dup}, dm {dm_dup}, \
         task {task_dup} (predicted {:?})",
        &predicted[..4]
    );
    for mid in [&post_id, &dm_id, &task_id] {
        assert!(!predicted.contains(mid), "{mid} was predicted");
    }
    assert!(
        !alice
            .log
            .iter()
            .any(|e| matches!(e, AgentEvent::MessageIdCollided { .. })),
        "{:#?}",
        alice.log
    );
    bob.until("alice's post and DM", |_, got| {
        got.contains(&post_id) && got.contains(&dm_id)
    })
    .await;
    // The post is in CHAT (durable history), the task in TASK.
    let js_admin = async_nats::jetstream::new(conn.client.clone());
    for (stream, subject, mid) in [
        (format!("CHAT_{SPACE}"), subj("chat.alice.team"), &post_id),
        (format!("TASK_{SPACE}"), subj("svc.worker.alice"), &task_id),
    ] {
        let stored = js_admin
            .get_stream(&stream)
            .await
            .expect("stream")
            .get_last_raw_message_by_subject(&subject)
            .await
            .expect("stored message");
        let body: Value = serde_json::from_slice(&stored.payload).expect("json");
        assert_eq!(&body["id"], &json!(mid), "{stream}");
    }
    alice.stop().await;
    bob.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Issue 21 item 3: a rollup on one's own presence key cannot purge everyone's presence
// ---------------------------------------------------------------------------------------------

/// Mallory publishes `Nats-Rollup: all` on her own presence key (the only presence subject her
/// grant allows). On a presence bucket as the reference and the old `cotal up` made it (rollups
/// allowed) this deletes Alice's record. `cotal up` (`provision_space`) then updates the bucket in
/// place; the same publish is refused, Alice's record stays, and what agents do on their own key
/// — a put, a KV delete marker — still works.
#[tokio::test]
async fn sec_a_rollup_on_ones_own_presence_key_cannot_purge_others_after_cotal_up() {
    use cotal_core::wire::config::KvBucketSpec;
    let Some(server) = NatsServer::start_with_users(general_users()) else {
        return;
    };
    let admin = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("connect admin");
    let bucket = KvBucket::Presence.name(&space());
    // The presence bucket of a space provisioned before the fix.
    let mut old = KvBucketSpec::for_space(&space(), KvBucket::Presence).stream();
    old.allow_rollup_hdrs = Some(true);
    cotal_driver_tokio::provision::apply_stream(&admin.client, &old, Duration::from_secs(5))
        .await
        .expect("old presence bucket");
    let alice = Probe::connect(&server, "alice").await;
    let mallory = Probe::connect(&server, "mallory").await;
    let kv = async_nats::jetstream::new(admin.client.clone())
        .get_key_value(&bucket)
        .await
        .expect("bucket");
    let put_own = |p: &Probe| {
        let js = async_nats::jetstream::new(p.client.clone());
        let subject = format!("$KV.{bucket}.{}", p.user);
        async move {
            js.publish(subject, Bytes::from_static(b"{\"status\":\"online\"}"))
                .await
                .expect("publish")
                .await
                .expect("own presence stored");
        }
    };
    let rollup_all = |p: &Probe| {
        let js = async_nats::jetstream::new(p.client.clone());
        let subject = format!("$KV.{bucket}.{}", p.user);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Rollup", "all");
            js.publish_with_headers(subject, headers, Bytes::from_static(b"{}"))
                .await
                .expect("publish")
                .await
        }
    };

    // Before: the rollup purges Alice's record.
    put_own(&alice).await;
    put_own(&mallory).await;
    assert!(kv.entry("alice").await.expect("entry").is_some());
    rollup_all(&mallory).await.expect("rollup accepted before");
    assert!(
        kv.entry("alice").await.expect("entry").is_none(),
        "the rollup did not purge alice before the fix"
    );

    // `cotal up` migrates the bucket in place.
    let report = provision_space(&admin.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    let presence = report
        .objects
        .iter()
        .find(|o| o.name == bucket)
        .expect("presence in the report");
    assert_eq!(
        presence.result,
        Ok(cotal_driver_tokio::provision::Applied::Updated),
        "{report:?}"
    );
    let again = provision_space(&admin.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(again.updated(), 0, "{again:?}");

    // After: refused, and Alice's record stays.
    put_own(&alice).await;
    let refused = rollup_all(&mallory).await;
    assert!(
        refused.is_err(),
        "rollup accepted after cotal up: {refused:?}"
    );
    let entry = kv.entry("alice").await.expect("entry").expect("alice kept");
    assert_eq!(entry.operation, async_nats::jetstream::kv::Operation::Put);
    // What an agent does on its own key still works: a put and a delete marker.
    put_own(&mallory).await;
    async_nats::jetstream::new(mallory.client.clone())
        .get_key_value(&bucket)
        .await
        .expect("mallory binds the bucket")
        .delete("mallory")
        .await
        .expect("a delete marker needs no rollup");
    assert!(kv.entry("alice").await.expect("entry").is_some());
}

// ---------------------------------------------------------------------------------------------
// Issue 21 item 4: consumers an agent creates on the presence and channels buckets do not outlive
// their use
// ---------------------------------------------------------------------------------------------

/// A `CONSUMER.CREATE` as `client`, in the named form (`.<name>.<filter>`) every KV watch uses;
/// `durable` sets `durable_name`, `inactive` the threshold asked (nanoseconds).
async fn create_consumer(
    client: &Client,
    stream: &str,
    name: &str,
    durable: bool,
    inactive: Option<u64>,
) -> Value {
    let filter = format!("$KV.{}.>", stream.trim_start_matches("KV_"));
    let mut config = json!({"name": name, "ack_policy": "none", "deliver_policy": "all",
                            "filter_subject": filter});
    if durable {
        config["durable_name"] = json!(name);
    }
    if let Some(ns) = inactive {
        config["inactive_threshold"] = json!(ns);
    }
    let body = json!({"stream_name": stream, "config": config, "action": "create"});
    let reply = tokio::time::timeout(
        WAIT,
        client.request(
            format!("$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter}"),
            Bytes::from(body.to_string()),
        ),
    )
    .await
    .expect("in time")
    .expect("reply");
    serde_json::from_slice(&reply.payload).expect("json")
}

/// Mallory (read/post on `general`, `Permissions::agent`) creates durable consumers on the
/// presence and channels buckets. On buckets as the old `cotal up` made them a durable has no
/// inactivity limit: it stays forever. `cotal up` deletes it (the server's limit does not reach
/// consumers made before it), and afterwards every stream of the two buckets carries
/// `consumer_limits.inactive_threshold` = 5 min: her durables are created with that threshold
/// (the server deletes them once unused), one asking a longer one is refused, and the server
/// does delete an unused durable (shown on a bucket stream limited to 1 s). The watches agents
/// need still work under the same grant: async-nats's KV watch, and the reference's exact
/// ordered-consumer request from the wire fixtures (inactive_threshold 5 min).
#[tokio::test]
async fn sec_consumers_an_agent_creates_on_watched_buckets_do_not_outlive_their_use() {
    use cotal_core::wire::config::{KvBucketSpec, WATCH_CONSUMER_INACTIVE_LIMIT};
    use cotal_driver_tokio::provision::{Applied, apply_stream};
    let Some(server) = NatsServer::start_with_users(general_users()) else {
        return;
    };
    let admin = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("connect admin");
    let t = Duration::from_secs(5);
    let watched = [KvBucket::Presence, KvBucket::Channels];
    // The two buckets as a space provisioned before the fix holds them.
    for b in watched {
        let mut old = KvBucketSpec::for_space(&space(), b).stream();
        old.consumer_inactive_limit = None;
        apply_stream(&admin.client, &old, t)
            .await
            .expect("old bucket");
    }
    let mallory = Probe::connect(&server, "mallory").await;
    let limit_ns = WATCH_CONSUMER_INACTIVE_LIMIT.as_millis() * 1_000_000;
    for b in watched {
        let stream = b.stream_name(&space());
        let r = create_consumer(&mallory.client, &stream, "squat0", true, None).await;
        assert_eq!(r["config"]["durable_name"], json!("squat0"), "{r}");
        assert!(
            r["config"].get("inactive_threshold").is_none(),
            "before the fix a durable lives forever: {r}"
        );
    }

    let report = provision_space(&admin.client, &space(), t).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    for b in watched {
        let name = b.name(&space());
        let o = report
            .objects
            .iter()
            .find(|o| o.name == name)
            .expect("in report");
        assert_eq!(o.result, Ok(Applied::Updated), "{report:?}");
        // The durable made before the limit (which the server does not apply to it) is gone.
        let left = async_nats::jetstream::new(admin.client.clone())
            .get_stream(b.stream_name(&space()))
            .await
            .expect("stream")
            .consumer_info("squat0")
            .await;
        assert!(left.is_err(), "squat0 survived cotal up: {left:?}");
    }
    let again = provision_space(&admin.client, &space(), t).await;
    assert_eq!(again.updated(), 0, "{again:?}");

    for b in watched {
        let stream = b.stream_name(&space());
        // A durable asking nothing gets the limit: the server deletes it once unused.
        let r = create_consumer(&mallory.client, &stream, "squat1", true, None).await;
        assert_eq!(r["config"]["durable_name"], json!("squat1"), "{r}");
        assert_eq!(r["config"]["inactive_threshold"], json!(limit_ns), "{r}");
        // One asking to live longer is refused.
        let r = create_consumer(
            &mallory.client,
            &stream,
            "squat2",
            true,
            Some(86_400_000_000_000),
        )
        .await;
        assert_eq!(r["error"]["err_code"], json!(10153), "{r}");
        // The reference's own watch request (wire fixture), under an agent's grant.
        let filter = format!("$KV.{}.>", b.name(&space()));
        let body = json!({"config": {"deliver_policy": "last_per_subject", "ack_policy": "none",
            "filter_subject": filter, "flow_control": true, "idle_heartbeat": 30_000_000_000u64,
            "headers_only": false, "name": "oc_ref_1", "inactive_threshold": 300_000_000_000u64,
            "num_replicas": 1, "max_deliver": 1,
            "deliver_subject": format!("{}.ref", id("alice").inbox_prefix())},
            "stream_name": stream, "action": "create", "pedantic": false});
        let alice = Probe::connect(&server, "alice").await;
        let reply = alice
            .client
            .request(
                format!("$JS.API.CONSUMER.CREATE.{stream}.oc_ref_1.{filter}"),
                Bytes::from(body.to_string()),
            )
            .await
            .expect("reply");
        let r: Value = serde_json::from_slice(&reply.payload).expect("json");
        assert!(
            r.get("error").is_none(),
            "the reference's watch is refused: {r}"
        );
    }

    // Our own watch (the executor's named ordered consumer) under an agent's grant sees a put.
    let alice = Probe::connect(&server, "alice").await;
    let js = async_nats::jetstream::new(alice.client.clone());
    let bucket = KvBucket::Presence.name(&space());
    let stream = js
        .get_stream_no_info(format!("KV_{bucket}"))
        .await
        .expect("presence stream");
    let watch = stream
        .create_consumer(async_nats::jetstream::consumer::push::OrderedConfig {
            name: Some("watch_alice_test".to_owned()),
            deliver_subject: alice.client.new_inbox(),
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .expect("watch under the agent grant");
    let mut changes = watch.messages().await.expect("watch messages");
    js.publish(format!("$KV.{bucket}.alice"), Bytes::from_static(b"{}"))
        .await
        .expect("publish")
        .await
        .expect("own put");
    let change = tokio::time::timeout(WAIT, changes.next())
        .await
        .expect("a change in time")
        .expect("watch open")
        .expect("message");
    assert_eq!(change.subject.as_str(), format!("$KV.{bucket}.alice"));

    // The server deletes an unused durable once the limit passes (a bucket stream limited to
    // 1 s, so the test need not wait 5 minutes).
    let mut short =
        KvBucketSpec::for_space(&Space::new("reap").expect("space"), KvBucket::Presence).stream();
    short.consumer_inactive_limit = Some(cotal_core::time::Duration::from_millis(1_000));
    apply_stream(&admin.client, &short, t)
        .await
        .expect("short stream");
    let r = create_consumer(&admin.client, &short.name, "gone", true, None).await;
    assert_eq!(
        r["config"]["inactive_threshold"],
        json!(1_000_000_000u64),
        "{r}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = async_nats::jetstream::new(admin.client.clone())
            .get_stream(&short.name)
            .await
            .expect("stream")
            .consumer_info("gone")
            .await;
        if info.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "durable not reaped");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The executor's KV watch on `bucket` as `who` makes it (a named ordered push consumer, the
/// `watch` job in `exec.rs`): `Ok` once it delivers a put `writer` makes on the bucket, else the
/// JetStream error code of the refused create (0 for another error).
async fn executor_watch(who: &Probe, bucket: &str, writer: &Client) -> Result<(), u64> {
    use async_nats::jetstream::stream::ConsumerErrorKind;
    let js = async_nats::jetstream::new(who.client.clone());
    let stream = js
        .get_stream_no_info(format!("KV_{bucket}"))
        .await
        .expect("bucket stream");
    let created = stream
        .create_consumer(async_nats::jetstream::consumer::push::OrderedConfig {
            name: Some(format!("watch_{}_test", who.user)),
            deliver_subject: who.client.new_inbox(),
            description: Some("cotal kv watch".to_owned()),
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await;
    let watch = match created {
        Ok(w) => w,
        Err(e) => match e.kind() {
            ConsumerErrorKind::JetStream(j) => return Err(j.error_code().0),
            _ => return Err(0),
        },
    };
    let mut changes = watch.messages().await.expect("watch messages");
    let key = format!("$KV.{bucket}.{}", who.user);
    async_nats::jetstream::new(writer.clone())
        .publish(key.clone(), Bytes::from_static(b"{}"))
        .await
        .expect("publish")
        .await
        .expect("own put");
    let change = tokio::time::timeout(WAIT, changes.next())
        .await
        .expect("a change in time")
        .expect("watch open")
        .expect("message");
    assert_eq!(change.subject.as_str(), key);
    Ok(())
}

/// The count bound of issue 21 item 4. On a space `cotal up` provisioned, mallory (exactly
/// `Permissions::agent`) creates durables on the presence bucket's stream, in the named form
/// every KV watch uses, until the broker refuses. The bound is the stream's `max_consumers`
/// (STREAM.INFO): `cotal up` sizes it for the space's agents (issue 22; here 100 agents, so
/// 2 · 100 + 64); at -1 or 0 nats-server 2.15 would apply its default of 1,000 per stream. The
/// refusal comes exactly at consumer number bound + 1, counting those already on the stream,
/// with the server's max-consumers error (10026); the stream then holds exactly `bound`
/// consumers, and none of them, mallory's included, has an inactivity threshold above
/// `WATCH_CONSUMER_INACTIVE_LIMIT` (each goes once unused for 5 min). With mallory deleting
/// nothing, alice's watch on presence (the executor's KV watch) is refused with the same
/// 10026: a hostile agent can fill the stream and deny the presence watch to new watchers
/// until its consumers go inactive. The bound is per stream: alice's watch on the channels
/// bucket, under the same grant, still works.
#[tokio::test]
async fn sec_consumers_an_agent_creates_on_watched_buckets_are_bounded_in_number() {
    use cotal_core::wire::config::WATCH_CONSUMER_INACTIVE_LIMIT;
    /// nats-server 2.15's consumer cap of a stream whose `max_consumers` is -1 or 0.
    const SERVER_DEFAULT_MAX_CONSUMERS: u64 = 1_000;
    /// nats-server's "maximum consumers limit reached".
    const MAX_CONSUMERS_ERR: u64 = 10026;
    let started = std::time::Instant::now();
    let Some(server) = NatsServer::start_with_users(general_users()) else {
        return;
    };
    let admin = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("connect admin");
    // Sized for 100 agents (`cotal up --max-agents 100`): the presence cap is 2 · 100 + 64.
    let plan = cotal_driver_tokio::provision::SpacePlan::for_agents(&space(), 100);
    let report =
        cotal_driver_tokio::provision::apply(&admin.client, &plan, Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    let stream = KvBucket::Presence.stream_name(&space());
    let stream_info = || async {
        let reply = tokio::time::timeout(
            WAIT,
            admin
                .client
                .request(format!("$JS.API.STREAM.INFO.{stream}"), Bytes::new()),
        )
        .await
        .expect("in time")
        .expect("reply");
        serde_json::from_slice::<Value>(&reply.payload).expect("json")
    };
    let info = stream_info().await;
    let max_consumers = info["config"]["max_consumers"]
        .as_i64()
        .expect("max_consumers");
    assert_eq!(max_consumers, 264, "the cap cotal up sized");
    let bound = u64::try_from(max_consumers)
        .ok()
        .filter(|&m| m > 0)
        .unwrap_or(SERVER_DEFAULT_MAX_CONSUMERS);
    let before = info["state"]["consumer_count"].as_u64().expect("count");
    let limit_ns = WATCH_CONSUMER_INACTIVE_LIMIT.as_millis() * 1_000_000;

    let mallory = Probe::connect(&server, "mallory").await;
    let mut refused = None;
    for n in before + 1..=bound + 5 {
        let r = create_consumer(&mallory.client, &stream, &format!("fill{n}"), true, None).await;
        if r.get("error").is_some() {
            refused = Some((n, r));
            break;
        }
        let threshold = r["config"]["inactive_threshold"].as_u64();
        assert!(
            threshold.is_some_and(|t| t > 0 && t <= limit_ns),
            "consumer {n} outlives its use: {r}"
        );
    }
    let (at, r) = refused.expect("no refusal within bound + 5 creates");
    assert_eq!(
        (at, r["error"]["err_code"].as_u64()),
        (bound + 1, Some(MAX_CONSUMERS_ERR)),
        "max_consumers {max_consumers}, {before} before: {r}"
    );
    // Nothing past the bound, and nothing on the stream outlives its use.
    let info = stream_info().await;
    assert_eq!(info["state"]["consumer_count"], json!(bound), "{info}");
    let mut consumers = async_nats::jetstream::new(admin.client.clone())
        .get_stream(&stream)
        .await
        .expect("stream")
        .consumers();
    let mut listed = 0;
    while let Some(c) = consumers.next().await {
        let c = c.expect("consumer info");
        let t = c.config.inactive_threshold;
        assert!(
            !t.is_zero() && t.as_nanos() <= u128::from(limit_ns),
            "{} has inactive_threshold {t:?}",
            c.name
        );
        listed += 1;
    }
    assert_eq!(listed, bound);

    // Mallory deletes nothing: the honest presence watch is refused at the bound; the channels
    // stream, bounded on its own, still takes one.
    let alice = Probe::connect(&server, "alice").await;
    assert_eq!(
        executor_watch(&alice, &KvBucket::Presence.name(&space()), &admin.client).await,
        Err(MAX_CONSUMERS_ERR),
        "the presence watch on a full stream"
    );
    assert_eq!(
        executor_watch(&alice, &KvBucket::Channels.name(&space()), &admin.client).await,
        Ok(()),
        "the channels watch"
    );
    println!(
        "bound {bound} (max_consumers {max_consumers}, {before} before), refused at {at}, {:?}",
        started.elapsed()
    );
}

// =============================================================================================
// Issue 21 item 2 / issue 15 item 3: presence identity and name squatting (@mention copies)
// =============================================================================================

/// The `general` users: alice, bob and mallory each read and post on `general` only, with
/// exactly the blocks `Permissions::agent` gives; the daemon and the provisioner as above. The
/// issue 21 tests share them.
fn general_users() -> Vec<User> {
    let mut users: Vec<User> = ["alice", "bob", "mallory"]
        .into_iter()
        .map(|a| agent_user(a, &["general"], &["general"]))
        .collect();
    users.extend([daemon_user(), admin_user()]);
    users
}

/// A space whose `general` is a live-class channel (a mention there gets a durable mention
/// copy through the backstop), with ACL records (each reserves its owner's id as a name) and
/// DLV consumers for alice, bob and mallory.
async fn general_space() -> Option<Space9> {
    let server = NatsServer::start_with_users(general_users())?;
    let admin = server.config_as("admin", "adminpw");
    let conn = connect(&admin).await.expect("connect admin");
    let report = provision_space(&conn.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    let s = Space9 { server, admin };
    for a in ["alice", "bob", "mallory"] {
        s.put_acl(a, &["general"], 1).await;
        apply_consumer(
            &conn.client,
            &ConsumerSpec::dlv(&space(), &id(a)),
            Duration::from_secs(5),
        )
        .await
        .expect("dlv consumer");
    }
    s.kv(KvBucket::Channels)
        .await
        .put(
            "general",
            Bytes::from(json!({"deliveryClass": "live"}).to_string()),
        )
        .await
        .expect("channel class");
    Some(s)
}

/// Writes a presence record as `who` under KV key `key` (a plain JetStream publish on
/// `$KV.<bucket>.<key>`, as the agent's own write is); the broker's answer.
async fn put_presence(who: &Probe, key: &str, card_id: &str, name: &str) -> Result<(), String> {
    let body = json!({"card": {"id": card_id, "name": name, "kind": "agent"},
                      "status": "idle", "ts": 1});
    let js = async_nats::jetstream::new(who.client.clone());
    let subject = format!("$KV.{}.{key}", KvBucket::Presence.name(&space()));
    match js.publish(subject, Bytes::from(body.to_string())).await {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(2), ack)
            .await
            .map_err(|_| "no PubAck".to_owned())?
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `from` posts on `general` mentioning `mentions`; returns the message id.
async fn post_general(from: &Probe, n: u32, mentions: &[&str]) -> String {
    let mid = format!("00000000-0000-4000-8000-{n:012}");
    let body = json!({"id": mid, "ts": 1, "space": SPACE,
                      "from": {"id": from.user, "name": from.user},
                      "channel": "general", "mentions": mentions,
                      "parts": [{"kind": "text", "text": format!("hey m{n}")}]});
    let js = async_nats::jetstream::new(from.client.clone());
    js.send_publish(
        subj(&format!("chat.{}.general", from.user)),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body.to_string()))
            .message_id(mid.clone()),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    mid
}

/// Waits (bounded) until `owner`'s DLV holds `n` copies.
async fn until_dlv_stored(s: &Space9, owner: &str, n: u64, daemon: &mut Daemon) {
    let conn = connect(&s.admin).await.expect("admin");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = dlv_stored(&conn.client, owner).await;
        if got >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{owner}: {got} DLV copies, want {n}; {:?}; {:#?}",
            daemon.counters().await,
            daemon.log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mallory, under exactly the permissions `Permissions::agent` gives (read/post on `general`),
/// cannot write another agent's presence key (the broker refuses `$KV.<presence>.alice`, so a
/// record whose key is not its `card.id` can only come from an unrestricted writer: the core's
/// roster tests cover that case). She can write her own key with `card.name: "alice"`: today
/// that made `@alice` ambiguous and alice got no mention copy, silently. Now the daemon ignores
/// the squatted name (alice's ACL record reserves it), counts the attempt once, and `@alice`
/// still gives alice her mention copy; mallory gets none.
#[tokio::test]
async fn sec_squatted_display_name_cannot_take_alices_mention_copy() {
    let Some(s) = general_space().await else {
        return;
    };
    let mut daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let bob = Probe::connect(&s.server, "bob").await;
    let mut mallory = Probe::connect(&s.server, "mallory").await;

    put_presence(&alice, "alice", "alice", "alice")
        .await
        .expect("alice writes her own presence");
    // The key check: the broker refuses mallory's write of alice's key.
    let denied = put_presence(&mallory, "alice", "alice", "mallory").await;
    assert!(denied.is_err(), "mallory wrote alice's presence key");
    mallory
        .refused(
            "Publish",
            &format!("$KV.{}.alice", KvBucket::Presence.name(&space())),
        )
        .await;
    // The squat: her own key, alice's name (heartbeating: three writes, one episode).
    for _ in 0..3 {
        put_presence(&mallory, "mallory", "mallory", "Alice")
            .await
            .expect("mallory may write her own presence");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while daemon.counters().await.presence_ignored < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the squat was never counted: {:?}; {:#?}",
            daemon.counters().await,
            daemon.log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    post_general(&bob, 1, &["alice"]).await;
    until_dlv_stored(&s, "alice", 1, &mut daemon).await;
    // A second post after the mention settled: nothing went to mallory meanwhile.
    post_general(&bob, 2, &["bob"]).await;
    tokio::time::sleep(QUIET).await;
    let conn = connect(&s.admin).await.expect("admin");
    assert_eq!(dlv_stored(&conn.client, "mallory").await, 0);
    assert_eq!(dlv_stored(&conn.client, "alice").await, 1);
    let c = daemon.counters().await;
    assert_eq!(c.presence_ignored, 1, "{c:?}");
    assert!(
        daemon.log.iter().any(|e| matches!(e,
            DeliveryEvent::PresenceIgnored(n) if n.key == "mallory" && n.name == "Alice")),
        "{:#?}",
        daemon.log
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Issue 21 item 5: a loss is told to the member it concerns; one sender cannot crowd out the rest
// ---------------------------------------------------------------------------------------------

/// `from`'s post number `n` on `team` through CHAT with its msg-id; returns (message id, CHAT
/// sequence).
async fn post_as(p: &Probe, from: &str, n: u32) -> (String, u64) {
    let tag = if from == "alice" { 0xa } else { 0xb };
    let mid = format!("00000000-0000-4000-8000-{tag:x}{n:011}");
    let body = json!({"id": mid, "ts": 1, "space": SPACE, "from": {"id": from, "name": from},
                      "channel": "team", "parts": [{"kind": "text", "text": format!("m{n}")}]});
    let js = async_nats::jetstream::new(p.client.clone());
    let ack = js
        .send_publish(
            subj(&format!("chat.{from}.team")),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(Bytes::from(body.to_string()))
                .message_id(mid.clone()),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    (mid, ack.sequence)
}

/// Mallory (an authenticated member allowed to read and post on `team`, with exactly the
/// permission block `cotal provision agent` prints) floods `team` with 1,010 posts while Bob is
/// offline; then Alice posts three. Before: Mallory's first 1,000 filled Bob's DLV and Alice's
/// three were shed, told to nobody but the daemon's log. Now: Mallory's posts take at most her
/// share (750) of Bob's DLV, Alice's three reach Bob, and Bob's agent, when it comes back, reports
/// exactly what of Mallory's he lost (one `CopiesLost` range: her last 260 sequences, dlv-full).
/// His credential reads his own loss record and no one else's.
#[tokio::test]
async fn sec_a_flooding_sender_cannot_crowd_out_others_and_the_loss_is_told_to_the_member() {
    use cotal_core::delivery::backlog::SENDER_SHARE;
    use cotal_core::delivery::losses::LossReason;
    let Some(mut s) = Space9::start().await else {
        return;
    };
    let mut with_mallory = users(ALICE_READ, BOB_READ);
    with_mallory.push(agent_user("mallory", &["team"], &["team"]));
    s.server.reload_with_users(with_mallory);
    let mut daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let mallory = Probe::connect(&s.server, "mallory").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.join_durable("team").await;
    until_activated(&s, "team", "bob").await;
    bob.stop().await;

    const FLOOD: u32 = 1010;
    let mut flood = Vec::new();
    for n in 0..FLOOD {
        flood.push(post_as(&mallory, "mallory", n).await);
    }
    let mut few = Vec::new();
    for n in 0..3 {
        few.push(post_as(&alice, "alice", n).await.0);
    }
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    loop {
        let c = daemon.counters().await;
        if c.transferred + c.dlv_shed >= u64::from(FLOOD) + 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = daemon.counters().await;
    let shed = u64::from(FLOOD) - SENDER_SHARE;
    assert_eq!(
        (c.transferred, c.dlv_shed),
        (SENDER_SHARE + 3, shed),
        "{c:?}"
    );
    assert_eq!(c.backlog_unverified + c.loss_notices_failed, 0, "{c:?}");

    // Bob comes back: Alice's three arrive, and he is told what of Mallory's he lost.
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.until("alice's posts and the loss report", |log, got| {
        few.iter().all(|m| got.contains(m))
            && log
                .iter()
                .any(|e| matches!(e, AgentEvent::CopiesLost { .. }))
    })
    .await;
    let reports: Vec<_> = bob
        .log
        .iter()
        .filter_map(|e| match e {
            AgentEvent::CopiesLost { ranges, total, .. } => Some((ranges.clone(), *total)),
            _ => None,
        })
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let (ranges, total) = &reports[0];
    assert_eq!(*total, shed);
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let r = &ranges[0];
    let first = flood[SENDER_SHARE as usize].1;
    let last = flood[FLOOD as usize - 1].1;
    assert_eq!(
        (
            r.channel.as_str(),
            r.first,
            r.last,
            r.count,
            r.exact,
            r.reason
        ),
        ("team", first, last, shed, true, LossReason::DlvFull)
    );
    let health = bob.handle.health().await.expect("health");
    assert_eq!(health.counters.copies_lost, shed);
    assert_eq!(health.counters.loss_reads_failed, 0);
    // Bob's DLV holds Mallory's first 750 and Alice's three, nothing more.
    let admin = connect(&s.admin).await.expect("admin");
    assert_eq!(dlv_stored(&admin.client, "bob").await, SENDER_SHARE + 3);
    bob.stop().await;

    // Bob's credential reads his own record, not Alice's; Mallory's reads neither.
    let losses = KvBucket::Losses.name(&space());
    let direct = |who: &str| format!("$JS.API.DIRECT.GET.KV_{losses}.$KV.{losses}.{who}");
    let mut bob_probe = Probe::connect(&s.server, "bob").await;
    let own = bob_probe
        .client
        .request(direct("bob"), Bytes::new())
        .await
        .expect("own record");
    assert!(
        String::from_utf8_lossy(&own.payload).contains("\"dlv-full\""),
        "{own:?}"
    );
    bob_probe
        .refused_request(&direct("alice"), Bytes::new())
        .await;
    let mut mallory = mallory;
    mallory.refused_request(&direct("bob"), Bytes::new()).await;
    mallory
        .refused_pub(&format!("$KV.{losses}.mallory"), Bytes::from_static(b"{}"))
        .await;
    daemon.stop().await;
}

/// Issue 21, "also try": a member that stops acking its DLV (Bob, offline with a full DLV)
/// while another keeps receiving (Carol, online). Measures Carol's backstop latency (Alice's
/// publish acknowledged → the daemon's DLV copy for Carol on the wire) for 50 paced posts before
/// Bob's DLV fills and 50 after (every copy for Bob then costs a DLV read and is shed), and prints
/// the figures. Asserts only that Carol gets every copy and that the daemon keeps up.
#[tokio::test]
async fn a_stalled_member_does_not_delay_the_others() {
    use cotal_core::delivery::backlog::SENDER_SHARE;
    let Some(mut s) = Space9::start().await else {
        return;
    };
    let mut with_carol = users(ALICE_READ, BOB_READ);
    with_carol.push(agent_user("carol", &["team"], &["team"]));
    s.server.reload_with_users(with_carol);
    s.put_acl("carol", &["team"], 1).await;
    let admin = connect(&s.admin).await.expect("admin");
    apply_consumer(
        &admin.client,
        &ConsumerSpec::dlv(&space(), &id("carol")),
        Duration::from_secs(5),
    )
    .await
    .expect("dlv consumer");
    let mut daemon = Daemon::start(&s.server).await;
    let alice = Probe::connect(&s.server, "alice").await;
    let mut bob = Peer::start(&s.server, "bob").await;
    bob.join_durable("team").await;
    until_activated(&s, "team", "bob").await;
    bob.stop().await;
    let mut carol = Peer::start(&s.server, "carol").await;
    carol.join_durable("team").await;
    until_activated(&s, "team", "carol").await;
    let mut copies = admin
        .client
        .subscribe(subj("dlv.carol"))
        .await
        .expect("spy on carol's dlv");
    admin.client.flush().await.expect("flush");

    // Carol's agent keeps acking in the background.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let carol_task = tokio::spawn(async move {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            carol.pump(Duration::from_millis(50)).await;
            for m in carol.handle.take_messages(256).await.expect("runner") {
                carol.handle.handled(m.id).await.expect("handled");
            }
        }
        carol
    });

    async fn phase(
        alice: &Probe,
        copies: &mut async_nats::Subscriber,
        from: u32,
        n: u32,
    ) -> Vec<Duration> {
        let mut lat = Vec::new();
        for i in from..from + n {
            let t0 = tokio::time::Instant::now();
            post(alice, i).await;
            let m = tokio::time::timeout(WAIT, copies.next())
                .await
                .expect("carol's copy in time")
                .expect("spy");
            assert!(
                String::from_utf8_lossy(&m.payload).contains(&format!("\"m{i}\"")),
                "copies in order"
            );
            lat.push(t0.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat
    }
    fn figures(mut v: Vec<Duration>) -> String {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
            ms(v[v.len() / 2]),
            ms(v[v.len() * 95 / 100]),
            ms(v[v.len() - 1])
        )
    }

    let before = phase(&alice, &mut copies, 0, 50).await;
    // Fill Bob's DLV to Alice's share (bob never acks); Carol's copies keep flowing meanwhile.
    let fill = u32::try_from(SENDER_SHARE).expect("share") + 10;
    for i in 50..50 + fill {
        post(&alice, i).await;
    }
    for _ in 0..fill {
        tokio::time::timeout(WAIT, copies.next())
            .await
            .expect("carol's copy during the fill")
            .expect("spy");
    }
    let shed_before = daemon.counters().await.dlv_shed;
    assert!(shed_before >= 10, "bob's DLV is full: {shed_before}");
    let during = phase(&alice, &mut copies, 50 + fill, 50).await;
    let c = daemon.counters().await;
    assert!(
        c.dlv_shed >= shed_before + 50,
        "every new copy for bob shed: {c:?}"
    );
    println!(
        "stalled member: carol's backstop latency before bob's DLV filled: {}; while every copy \
         for bob is read and shed: {}; dlv reads failed {}, shed {}",
        figures(before),
        figures(during),
        c.backlog_unverified,
        c.dlv_shed
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let carol = carol_task.await.expect("carol task");
    carol.stop().await;
    daemon.stop().await;
}
