//! End to end: the agent and delivery machines, each driven by a [`Runner`] on its own
//! connection, against a real nats-server (skipped when `COTAL_NATS_SERVER` is unset). Scenario
//! ids are those of `shared/spec/scenarios.md`. Every wait is bounded.

mod common;

use bytes::Bytes;
use common::{Driver, NatsServer, User, WAIT, ok};
use cotal_core::agent::{Agent, AgentConfig, AgentEvent, JoinError};
use cotal_core::constants::LEASE_TTL;
use cotal_core::delivery::daemon::{
    DegradedReason, Delivery, DeliveryConfig, DeliveryEvent, DeliveryHealth,
};
use cotal_core::delivery::lease::{ACQUIRED_AT_FIELD, HEALTH_FIELD, LeaseHealth, judge_health};
use cotal_core::io::{Command, ReadStart, Reply, StoredMessage};
use cotal_core::ledger::SourceKind;
use cotal_core::registry::FENCE_FIELD;
use cotal_core::time::UnixMillis;
use cotal_core::wire::config::{ConsumerSpec, SpaceStream};
use cotal_core::wire::keys::{KvBucket, acl_key, member_key};
use cotal_core::wire::message::{CotalMessage, Sender};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::{AclRecord, DeliveryLease, MembershipRecord, Plane3Entry};
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::{AgentId, Channel, ConcreteChannel, Role, Space};
use cotal_driver_tokio::connect::{ConnectConfig, connect};
use cotal_driver_tokio::exec::{Executor, ExecutorConfig};
use cotal_driver_tokio::provision::{apply_consumer, nats_server_permissions, provision_space};
use cotal_driver_tokio::run::{MachineHandle, Runner};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

const SPACE: &str = "e2e";

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

/// Provisions the space with an unrestricted connection.
async fn provision(cfg: &ConnectConfig) {
    let conn = connect(cfg).await.expect("connect");
    let report = provision_space(&conn.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
}

/// What the provisioner does for an agent in auth mode: its ACL record and its DLV consumer.
async fn provision_agent(cfg: &ConnectConfig, agent: &AgentId, read: &[&str]) {
    let conn = connect(cfg).await.expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let acl = js
        .get_key_value(KvBucket::Acl.name(&space()))
        .await
        .expect("acl bucket");
    let record = AclRecord {
        allow_subscribe: read.iter().map(|s| (*s).to_owned()).collect(),
        revision: 1,
        updated_at: UnixMillis(1),
        extra: Default::default(),
    };
    acl.put(
        acl_key(agent),
        Bytes::from(serde_json::to_vec(&record).expect("encode")),
    )
    .await
    .expect("put acl");
    apply_consumer(
        &conn.client,
        &ConsumerSpec::dlv(&space(), agent),
        Duration::from_secs(5),
    )
    .await
    .expect("dlv consumer");
}

/// What the provisioner adds for unicast and anycast: the agent's `dm_<id>` consumer and, with a
/// role, the role's shared `svc_<role>` work-queue consumer (agents may only bind them).
async fn provision_direct(cfg: &ConnectConfig, agent: &AgentId, role: Option<&str>) {
    let conn = connect(cfg).await.expect("connect");
    let mut specs = vec![ConsumerSpec::dm(&space(), agent)];
    if let Some(role) = role {
        specs.push(ConsumerSpec::svc(&space(), &Role::new(role).expect("role")));
    }
    for spec in specs {
        apply_consumer(&conn.client, &spec, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("consumer {}: {e}", spec.name));
    }
}

/// Writes a channel registry entry.
async fn set_channel(cfg: &ConnectConfig, channel: &str, config: Value) {
    let conn = connect(cfg).await.expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js
        .get_key_value(KvBucket::Channels.name(&space()))
        .await
        .expect("channels bucket");
    kv.put(channel, Bytes::from(config.to_string()))
        .await
        .expect("put channel config");
}

/// A KV value read by an unrestricted connection.
async fn kv_get(cfg: &ConnectConfig, bucket: KvBucket, key: &str) -> Option<Bytes> {
    let conn = connect(cfg).await.expect("connect");
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js
        .get_key_value(bucket.name(&space()))
        .await
        .expect("bucket");
    kv.get(key).await.expect("kv get")
}

/// The agent-profile user of `agent`, reading and posting on `channels`.
fn agent_user(agent: &str, channels: &[&str]) -> User {
    agent_user_with_role(agent, channels, None)
}

/// [`agent_user`] serving the anycast `role` (its `svc_<role>` bind grants), as
/// `cotal provision agent --role` writes it.
fn agent_user_with_role(agent: &str, channels: &[&str], role: Option<&str>) -> User {
    let list: Vec<Channel> = channels.iter().map(|c| ch(c)).collect();
    let policy = AgentPolicy {
        id: id(agent),
        allow_subscribe: list.clone(),
        allow_publish: list,
        role: role.map(|r| Role::new(r).expect("role")),
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

fn admin_user() -> User {
    User {
        name: "admin".into(),
        password: "adminpw".into(),
        permissions: None,
    }
}

/// One message an agent surfaced.
#[derive(Clone, Debug)]
struct Got {
    id: String,
    text: String,
    channel: Option<String>,
    historical: bool,
    origin: SourceKind,
    kind: DeliveryKind,
}

/// A running agent and everything it reported.
struct Peer {
    name: String,
    handle: MachineHandle<Agent>,
    events: UnboundedReceiver<AgentEvent>,
    task: JoinHandle<Agent>,
    log: Vec<AgentEvent>,
    got: Vec<Got>,
}

/// An agent config for `name`: durable backstop as asked; it creates its own DLV consumer when
/// `create_dlv` (open mode).
fn agent_config(name: &str, channels: &[&str], durable: bool, create_dlv: bool) -> AgentConfig {
    let mut c = AgentConfig::new(
        space(),
        Sender::new(id(name), name),
        channels.iter().map(|c| ch(c)).collect(),
        u64::from(name.as_bytes()[0]) * 7919,
    );
    c.durable_backstop = durable;
    c.create_dlv_consumer = create_dlv;
    c
}

impl Peer {
    async fn start(mut cfg: ConnectConfig, config: AgentConfig) -> Peer {
        cfg.inbox_prefix = Some(config.me.id.inbox_prefix());
        let name = config.me.id.as_str().to_owned();
        let conn = connect(&cfg).await.expect("connect");
        let machine = Agent::new(config).expect("agent");
        let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
        let Runner {
            handle,
            events,
            task,
        } = Runner::spawn(machine, exec, inputs);
        let mut p = Peer {
            name,
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

    /// Handles one event within `d`; false when none came.
    async fn pump(&mut self, d: Duration) -> bool {
        let Ok(Some(event)) = tokio::time::timeout(d, self.events.recv()).await else {
            return false;
        };
        if let AgentEvent::MessagesReady { .. } = event {
            let batch = self.handle.take_messages(256).await.expect("runner");
            for s in batch {
                let text = s
                    .item
                    .message
                    .parts
                    .iter()
                    .filter_map(|p| match p {
                        cotal_core::wire::message::Part::Text { text, .. } => Some(text.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                self.got.push(Got {
                    id: s.item.message.id.clone(),
                    text,
                    channel: s.item.channel.as_ref().map(|c| c.as_str().to_owned()),
                    historical: s.item.historical,
                    origin: s.origin,
                    kind: s.item.kind,
                });
                self.handle.handled(s.id).await.expect("handled");
            }
        } else {
            self.log.push(event);
        }
        true
    }

    /// Pumps until `pred` holds, at most [`WAIT`].
    async fn until(&mut self, what: &str, pred: impl Fn(&[AgentEvent], &[Got]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(&self.log, &self.got) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no {what} within {WAIT:?}; events {:#?}; got {:#?}",
                self.name,
                self.log,
                self.got
            );
            self.pump(left.min(Duration::from_millis(200))).await;
        }
    }

    /// Pumps for `d` (to show that nothing more arrives).
    async fn idle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            self.pump(left).await;
        }
    }

    async fn join(&mut self, channel: &str) -> AgentEvent {
        let request = self.handle.join(ch(channel)).await.expect("join accepted");
        let find = |log: &[AgentEvent]| {
            log.iter()
                .find(|e| match e {
                    AgentEvent::Joined { request: r, .. }
                    | AgentEvent::JoinFailed { request: r, .. } => *r == Some(request),
                    _ => false,
                })
                .cloned()
        };
        self.until("join result", |log, _| find(log).is_some())
            .await;
        find(&self.log).expect("join result")
    }

    async fn leave(&mut self, channel: &str) -> AgentEvent {
        let request = self
            .handle
            .leave(ch(channel))
            .await
            .expect("leave accepted");
        let find = |log: &[AgentEvent]| {
            log.iter()
                .find(|e| match e {
                    AgentEvent::Left { request: r, .. }
                    | AgentEvent::LeaveFailed { request: r, .. } => *r == request,
                    _ => false,
                })
                .cloned()
        };
        self.until("leave result", |log, _| find(log).is_some())
            .await;
        find(&self.log).expect("leave result")
    }

    /// Posts and waits for the stream's ack; returns (message id, CHAT seq).
    async fn send(&mut self, channel: &str, text: &str) -> (String, u64) {
        let sent = self
            .handle
            .send_text(ch(channel), text.to_owned())
            .await
            .expect("send accepted");
        self.until_sent(sent).await
    }

    /// Unicasts to `to` and waits for the DM stream's ack; returns (message id, DM seq).
    async fn send_dm(&mut self, to: &str, text: &str) -> (String, u64) {
        let sent = self
            .handle
            .send_dm_text(id(to), text.to_owned())
            .await
            .expect("dm accepted");
        self.until_sent(sent).await
    }

    /// Anycasts to `role` and waits for the TASK stream's ack; returns (message id, TASK seq).
    async fn send_anycast(&mut self, role: &str, text: &str) -> (String, u64) {
        let sent = self
            .handle
            .send_anycast_text(Role::new(role).expect("role"), text.to_owned())
            .await
            .expect("anycast accepted");
        self.until_sent(sent).await
    }

    async fn until_sent(
        &mut self,
        (request, msg_id): (cotal_core::agent::RequestId, String),
    ) -> (String, u64) {
        let find = |log: &[AgentEvent]| {
            log.iter().find_map(|e| match e {
                AgentEvent::Sent {
                    request: r, seq, ..
                } if *r == request => Some(Ok(*seq)),
                AgentEvent::SendFailed {
                    request: r, error, ..
                } if *r == request => Some(Err(error.clone())),
                _ => None,
            })
        };
        self.until("send result", |log, _| find(log).is_some())
            .await;
        match find(&self.log) {
            Some(Ok(seq)) => (msg_id, seq),
            other => panic!("{}: send failed: {other:?}", self.name),
        }
    }

    /// Waits until a message with each of `texts` was surfaced.
    async fn receives(&mut self, texts: &[&str]) {
        let want: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        self.until(&format!("messages {want:?}"), |_, got| {
            want.iter().all(|t| got.iter().any(|g| &g.text == t))
        })
        .await;
    }

    fn texts(&self) -> Vec<String> {
        self.got.iter().map(|g| g.text.clone()).collect()
    }

    /// Stops (offline presence) and returns the machine.
    async fn stop(self) -> Agent {
        self.handle.stop(Duration::from_secs(3)).expect("stop");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task")
    }
}

/// A running daemon.
struct Daemon {
    handle: MachineHandle<Delivery>,
    events: UnboundedReceiver<DeliveryEvent>,
    task: JoinHandle<Delivery>,
    log: Vec<DeliveryEvent>,
}

impl Daemon {
    /// Starts a daemon for shard 0 of 1 and waits until it serves.
    async fn start(cfg: &ConnectConfig, daemon_id: &str) -> Daemon {
        Daemon::start_with(cfg, daemon_id, false).await
    }

    /// [`Daemon::start`], with every copy sent the reference's two hops when `two_hop`.
    async fn start_with(cfg: &ConnectConfig, daemon_id: &str, two_hop: bool) -> Daemon {
        let conn = connect(cfg).await.expect("connect");
        let shard = ShardMap::new(1).and_then(|m| m.shard(0)).expect("shard");
        let mut config = DeliveryConfig::new(space(), shard, daemon_id);
        config.two_hop = two_hop;
        let machine = Delivery::new(config);
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
        d.until_serving().await;
        d
    }

    /// Waits until every feed is open and control requests are served.
    async fn until_serving(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (health, _, serving) = self.handle.status().await.expect("daemon runs");
            if serving {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon not serving within {WAIT:?}: {health}; {:#?}",
                self.log
            );
            self.drain();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.log.push(e);
        }
    }

    /// Shuts down (releases the lease) and returns the machine and its events.
    async fn stop(mut self) -> (Delivery, Vec<DeliveryEvent>) {
        self.handle
            .shutdown(Duration::from_secs(3))
            .expect("shutdown");
        let machine = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task");
        let mut log = self.log;
        while let Ok(e) = self.events.try_recv() {
            log.push(e);
        }
        (machine, log)
    }
}

fn joined_durable(e: &AgentEvent) -> Option<u64> {
    match e {
        AgentEvent::Joined { report, .. } if report.durable => report.generation,
        _ => None,
    }
}

/// Waits until the membership of `owner` on `channel` is activated (catch-up finished).
async fn until_activated(cfg: &ConnectConfig, channel: &str, owner: &str) -> MembershipRecord {
    let key = member_key(&concrete(channel), &id(owner));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = kv_get(cfg, KvBucket::Members, &key).await {
            let r: MembershipRecord = serde_json::from_slice(&v).expect("membership record");
            if r.activated == Some(true) && r.leave_cursor.is_none() {
                return r;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} not activated within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// SPEC §12 interop scenario (A0.1, presence, late joiner)
// ---------------------------------------------------------------------------------------------

/// SPEC §12 interop, all seven items, under per-user permissions as `cotal provision agent`
/// writes them (Bob and Dave with `--role reviewer`) with a daemon: provision, both connect with
/// `_INBOX_<id>`, write presence and join `team.backend` (durable by default: the daemon grants
/// both memberships), Alice multicasts and Bob receives it as a channel message; Alice unicasts to
/// Bob, who receives it with kind `dm`; Alice anycasts to `reviewer` and exactly one of the two
/// reviewers receives it, with kind `anycast`; a late joiner gets the earlier messages marked
/// historical, each exactly once.
#[tokio::test]
async fn a0_interop_scenario_spec_12() {
    let team = "team.backend";
    let Some(server) = NatsServer::start_with_users(vec![
        agent_user("alice", &[team]),
        agent_user_with_role("bob", &[team], Some("reviewer")),
        agent_user("carol", &[team]),
        agent_user_with_role("dave", &[], Some("reviewer")),
        admin_user(),
    ]) else {
        return;
    };
    let admin = server.config_as("admin", "adminpw");
    // 1. Provision the space and each agent's credentials-side data.
    provision(&admin).await;
    for a in ["alice", "bob", "carol"] {
        provision_agent(&admin, &id(a), &[team]).await;
    }
    provision_agent(&admin, &id("dave"), &[]).await;
    for (a, role) in [
        ("alice", None),
        ("bob", Some("reviewer")),
        ("carol", None),
        ("dave", Some("reviewer")),
    ] {
        provision_direct(&admin, &id(a), role).await;
    }
    let daemon = Daemon::start(&admin, "daemon-1").await;
    // 2.–3. Both connect with their inbox prefix, write presence, join. Each pumps its `dm_<id>`;
    // the reviewers also pump the shared `svc_reviewer` (bind only: agents cannot create them).
    let direct = |mut c: AgentConfig, role: Option<&str>| {
        c.unicast = true;
        c.roles = role
            .map(|r| Role::new(r).expect("role"))
            .into_iter()
            .collect();
        c.me.role = role.map(str::to_owned);
        c
    };
    let mut alice = Peer::start(
        server.config_as("alice", "pw"),
        direct(agent_config("alice", &[], true, false), None),
    )
    .await;
    let mut bob = Peer::start(
        server.config_as("bob", "pw"),
        direct(agent_config("bob", &[], true, false), Some("reviewer")),
    )
    .await;
    let mut dave = Peer::start(
        server.config_as("dave", "pw"),
        direct(agent_config("dave", &[], true, false), Some("reviewer")),
    )
    .await;
    // The direct consumers bind after the connection is up (a bounded wait: a loaded machine
    // binds later; CI once saw dave's still at attempt 0 when it looked at once).
    for p in [&alice, &bob, &dave] {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let health = p.handle.health().await.expect("health");
            if health.direct.iter().all(|d| d.bound) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{}: {:?}",
                p.name,
                health.direct
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for p in [&mut alice, &mut bob] {
        let joined = p.join(team).await;
        assert!(joined_durable(&joined).is_some(), "{joined:?}");
    }
    for a in ["alice", "bob"] {
        let presence = kv_get(&admin, KvBucket::Presence, a).await;
        let record: Value =
            serde_json::from_slice(&presence.expect("presence written")).expect("presence json");
        assert_eq!(record["card"]["id"], a, "{record}");
    }
    // 4. Alice multicasts; Bob receives it with kind channel (from the subject), live.
    let (m1, _) = alice.send(team, "hello backend").await;
    let (m2, _) = alice.send(team, "second").await;
    bob.receives(&["hello backend", "second"]).await;
    let got = bob.got.iter().find(|g| g.id == m1).expect("m1");
    assert_eq!(got.channel.as_deref(), Some(team));
    assert_eq!(got.kind, DeliveryKind::Channel);
    assert!(!got.historical);
    // 5. Alice unicasts to Bob; Bob receives it with kind dm, as a durable (acked) copy.
    let (dm, _) = alice.send_dm("bob", "psst, a direct message").await;
    bob.receives(&["psst, a direct message"]).await;
    let got = bob.got.iter().find(|g| g.id == dm).expect("dm");
    assert_eq!(got.kind, DeliveryKind::Dm);
    assert_eq!(got.channel, None);
    assert_eq!(got.origin, SourceKind::Durable);
    // On the wire: `cotal.<s>.inst.<target>.<sender>` with the id as Nats-Msg-Id and `to` as the
    // one routing field.
    let mut d = Driver::start(admin.clone()).await;
    let stored = read_all(&mut d, SpaceStream::Dm, &format!("cotal.{SPACE}.inst.>")).await;
    let copy = stored.iter().find(|m| msg_id(m) == dm).expect("DM stored");
    assert_eq!(copy.subject, format!("cotal.{SPACE}.inst.bob.alice"));
    let body: Value = serde_json::from_slice(&copy.payload).expect("json");
    assert_eq!(body["to"], "bob", "{body}");
    assert!(
        body.get("channel").is_none() && body.get("toService").is_none(),
        "{body}"
    );
    // 6. Alice anycasts to `reviewer`: exactly one of the two reviewers receives it.
    let (task, _) = alice.send_anycast("reviewer", "please review").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let holds = |p: &Peer| p.got.iter().filter(|g| g.id == task).count();
    while holds(&bob) + holds(&dave) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reviewer received the task within {WAIT:?}"
        );
        bob.pump(Duration::from_millis(50)).await;
        dave.pump(Duration::from_millis(50)).await;
    }
    bob.idle(Duration::from_millis(500)).await;
    dave.idle(Duration::from_millis(500)).await;
    assert_eq!(
        holds(&bob) + holds(&dave),
        1,
        "bob {:?} dave {:?}",
        bob.got,
        dave.got
    );
    let got = bob
        .got
        .iter()
        .chain(dave.got.iter())
        .find(|g| g.id == task)
        .expect("task");
    assert_eq!(got.kind, DeliveryKind::Anycast);
    assert_eq!(got.origin, SourceKind::Durable);
    // The work queue removed it once acked (after the reviewer handled it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Stream info, not a read: a work queue refuses a second consumer overlapping
        // `svc_reviewer`'s filter.
        let stream = SpaceStream::Task.name(&space());
        let left = match ok(d.run(|op| Command::StreamInfo { op, stream }).await) {
            Reply::StreamState(s) => s.messages,
            other => panic!("{other:?}"),
        };
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "TASK still holds {left} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alice.got.iter().any(|g| g.id == dm || g.id == task));
    dave.stop().await;
    // 7. A late joiner: the earlier messages replay as historical copies, each once.
    let mut carol = Peer::start(
        server.config_as("carol", "pw"),
        agent_config("carol", &[], true, false),
    )
    .await;
    let joined = carol.join(team).await;
    match &joined {
        AgentEvent::Joined { report, .. } => {
            assert!(report.durable, "{report:?}");
            assert!(report.backfilled >= 2, "{report:?}");
        }
        other => panic!("{other:?}"),
    }
    carol.receives(&["hello backend", "second"]).await;
    for m in [&m1, &m2] {
        let copies: Vec<&Got> = carol.got.iter().filter(|g| &g.id == m).collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert!(copies[0].historical, "{copies:?}");
    }
    // A live post after the join reaches all three members' ledgers once.
    let (m3, _) = bob.send(team, "after carol").await;
    carol.receives(&["after carol"]).await;
    alice.receives(&["after carol"]).await;
    carol.idle(Duration::from_millis(300)).await;
    assert_eq!(carol.got.iter().filter(|g| g.id == m3).count(), 1);
    assert!(!carol.got.iter().any(|g| g.id == m3 && g.historical));
    // Clean stop: offline presence.
    carol.stop().await;
    let presence = kv_get(&admin, KvBucket::Presence, "carol")
        .await
        .expect("presence");
    let record: Value = serde_json::from_slice(&presence).expect("json");
    assert_eq!(record["status"], "offline", "{record}");
    alice.stop().await;
    bob.stop().await;
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Live join / leave / refused join / late refusal (broker-enforced permissions)
// ---------------------------------------------------------------------------------------------

/// A2, A3, A24: under its agent profile Alice joins `general` and `ops` live, is refused
/// `secret` by the broker (nothing left behind), leaves `general` (no more deliveries), and when
/// the server reloads a narrower profile, the broker refuses `ops` on the open connection: the
/// agent drops it (late refusal).
#[tokio::test]
async fn a2_a3_a24_live_join_leave_refused_and_late_refusal() {
    let mut users = vec![
        agent_user("alice", &["general", "ops"]),
        agent_user("bob", &["general", "ops", "secret"]),
        admin_user(),
    ];
    let Some(mut server) = NatsServer::start_with_users(users.clone()) else {
        return;
    };
    let admin = server.config_as("admin", "adminpw");
    provision(&admin).await;
    let mut alice = Peer::start(
        server.config_as("alice", "pw"),
        agent_config("alice", &[], false, false),
    )
    .await;
    let mut bob = Peer::start(
        server.config_as("bob", "pw"),
        agent_config("bob", &[], false, false),
    )
    .await;
    for c in ["general", "ops"] {
        let e = alice.join(c).await;
        assert!(matches!(e, AgentEvent::Joined { .. }), "{e:?}");
    }
    // Refused by the broker: reported, and not joined.
    match alice.join("secret").await {
        AgentEvent::JoinFailed {
            error: JoinError::Refused { detail },
            ..
        } => assert!(detail.contains("Permissions Violation"), "{detail}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let joined = alice.handle.call(|a, _| a.joined()).await.expect("runner");
    assert_eq!(joined, vec![ch("general"), ch("ops")]);
    bob.send("general", "g1").await;
    bob.send("ops", "o1").await;
    bob.send("secret", "s1").await;
    alice.receives(&["g1", "o1"]).await;
    // Leave: no more deliveries of general.
    let e = alice.leave("general").await;
    assert!(matches!(e, AgentEvent::Left { .. }), "{e:?}");
    bob.send("general", "g2").await;
    bob.send("ops", "o2").await;
    alice.receives(&["o2"]).await;
    alice.idle(Duration::from_millis(300)).await;
    assert!(
        !alice.texts().contains(&"g2".to_owned()),
        "{:?}",
        alice.texts()
    );
    assert!(
        !alice.texts().contains(&"s1".to_owned()),
        "{:?}",
        alice.texts()
    );
    // Late refusal: the server reloads Alice's profile without `ops`.
    users[0] = agent_user("alice", &["general"]);
    server.reload_with_users(users);
    alice
        .until("late refusal of ops", |log, _| {
            log.iter().any(|e| {
                matches!(e, AgentEvent::ChannelRefused { channel, .. } if channel.as_str() == "ops")
            })
        })
        .await;
    let joined = alice.handle.call(|a, _| a.joined()).await.expect("runner");
    assert!(joined.is_empty(), "{joined:?}");
    let health = alice.handle.health().await.expect("runner");
    assert_eq!(health.counters.late_refusals, 1);
    // Still allowed on general: a rejoin works under the new profile.
    let e = alice.join("general").await;
    assert!(matches!(e, AgentEvent::Joined { .. }), "{e:?}");
    bob.send("general", "g3").await;
    alice.receives(&["g3"]).await;
    alice.stop().await;
    bob.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Durable channel with a daemon: offline catch-up, hard cut, rejoin
// ---------------------------------------------------------------------------------------------

/// A26, C2, B17 on `general` (durable, no replay, so history cannot stand in for the backstop):
/// Bob is a member, goes offline, Alice posts, Bob comes back and receives every post through
/// DLV; Bob leaves (a hard cut: nothing posted afterwards arrives); Bob rejoins with a new
/// generation whose cursor skips the gap, and later posts arrive again.
#[tokio::test]
async fn a26_c2_b17_durable_offline_catch_up_hard_cut_and_rejoin() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision(&cfg).await;
    for a in ["alice", "bob"] {
        provision_agent(&cfg, &id(a), &[">"]).await;
    }
    set_channel(
        &cfg,
        "general",
        serde_json::json!({"deliveryClass": "durable", "replay": false}),
    )
    .await;
    let daemon = Daemon::start(&cfg, "daemon-1").await;
    let mut alice = Peer::start(cfg.clone(), agent_config("alice", &["general"], true, true)).await;
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    for p in [&mut alice, &mut bob] {
        p.until("boot join", |log, _| {
            log.iter().any(|e| joined_durable(e).is_some())
        })
        .await;
    }
    let first = until_activated(&cfg, "general", "bob").await;
    assert_eq!(first.generation, 1);
    // Bob goes away (stop is not leave: the membership stays).
    bob.stop().await;
    let mut posted = Vec::new();
    for i in 0..5 {
        posted.push(alice.send("general", &format!("offline {i}")).await.0);
    }
    // Bob comes back: every post arrives through DLV, once.
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    bob.receives(&[
        "offline 0",
        "offline 1",
        "offline 2",
        "offline 3",
        "offline 4",
    ])
    .await;
    for m in &posted {
        let copies: Vec<&Got> = bob.got.iter().filter(|g| &g.id == m).collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(copies[0].origin, SourceKind::Durable, "{copies:?}");
    }
    bob.until("boot self-join", |log, _| {
        log.iter().any(|e| joined_durable(e).is_some())
    })
    .await;
    let again = bob.log.iter().find_map(joined_durable);
    assert_eq!(again, Some(1), "the boot self-join resumes generation 1");
    // Leave: a hard cut.
    let left = bob.leave("general").await;
    assert!(
        matches!(
            left,
            AgentEvent::Left {
                tombstoned: Some(1),
                ..
            }
        ),
        "{left:?}"
    );
    let (gap_id, _) = alice.send("general", "after leave").await;
    bob.idle(Duration::from_millis(900)).await;
    assert!(!bob.got.iter().any(|g| g.id == gap_id), "{:?}", bob.texts());
    // Rejoin: a new generation (`max(previous + 1, frontier + 1)`, G34); the gap is not
    // redelivered, later posts are.
    let rejoined = bob.join("general").await;
    let generation = joined_durable(&rejoined).expect("durable rejoin");
    assert!(generation > 1, "{rejoined:?}");
    let record = until_activated(&cfg, "general", "bob").await;
    assert_eq!(record.generation, generation);
    assert!(
        record.join_cursor >= 6,
        "the cursor skips the gap: {record:?}"
    );
    bob.stop().await;
    alice.send("general", "after rejoin").await;
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    bob.receives(&["after rejoin"]).await;
    bob.idle(Duration::from_millis(500)).await;
    assert!(!bob.got.iter().any(|g| g.id == gap_id), "{:?}", bob.texts());
    bob.stop().await;
    alice.stop().await;
    let (machine, log) = daemon.stop().await;
    assert_eq!(machine.counters().lost, 0, "{log:#?}");
}

// ---------------------------------------------------------------------------------------------
// Daemon restart mid-stream
// ---------------------------------------------------------------------------------------------

/// A27: Bob is an offline member; Alice posts while the daemon is shut down and replaced by a
/// new one mid-stream; when Bob comes back every post of his interval arrives.
#[tokio::test]
async fn a27_daemon_restart_mid_stream_loses_nothing() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision(&cfg).await;
    for a in ["alice", "bob"] {
        provision_agent(&cfg, &id(a), &[">"]).await;
    }
    set_channel(
        &cfg,
        "general",
        serde_json::json!({"deliveryClass": "durable", "replay": false}),
    )
    .await;
    let daemon = Daemon::start(&cfg, "daemon-1").await;
    let mut alice = Peer::start(cfg.clone(), agent_config("alice", &["general"], true, true)).await;
    let bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    until_activated(&cfg, "general", "bob").await;
    bob.stop().await;
    let mut texts = Vec::new();
    for i in 0..4 {
        texts.push(format!("m{i}"));
        alice.send("general", &format!("m{i}")).await;
    }
    // Shut the daemon down (lease released) while posts continue.
    let stopping = tokio::spawn(daemon.stop());
    for i in 4..8 {
        texts.push(format!("m{i}"));
        alice.send("general", &format!("m{i}")).await;
    }
    let (_, log) = stopping.await.expect("daemon stopped");
    assert!(
        log.iter().any(|e| matches!(
            e,
            DeliveryEvent::Lease(cotal_core::delivery::lease::LeaseEvent::Released)
        )),
        "{log:#?}"
    );
    for i in 8..12 {
        texts.push(format!("m{i}"));
        alice.send("general", &format!("m{i}")).await;
    }
    let successor = Daemon::start(&cfg, "daemon-2").await;
    for i in 12..16 {
        texts.push(format!("m{i}"));
        alice.send("general", &format!("m{i}")).await;
    }
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    let want: Vec<&str> = texts.iter().map(String::as_str).collect();
    bob.receives(&want).await;
    bob.idle(Duration::from_millis(300)).await;
    let ids: BTreeSet<&str> = bob.got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), bob.got.len(), "each message once");
    bob.stop().await;
    alice.stop().await;
    let (machine, log) = successor.stop().await;
    assert_eq!(machine.counters().lost, 0, "{log:#?}");
}

// ---------------------------------------------------------------------------------------------
// Broker restart mid-stream
// ---------------------------------------------------------------------------------------------

/// C4: the broker is killed and restarted (same port and store) under a daemon and two members;
/// everything reconnects by itself, the daemon serves again, a live post arrives, and a post made
/// while Bob is offline reaches him through the backstop.
#[tokio::test]
async fn c4_backstop_survives_a_broker_restart() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision(&cfg).await;
    for a in ["alice", "bob"] {
        provision_agent(&cfg, &id(a), &[">"]).await;
    }
    set_channel(
        &cfg,
        "general",
        serde_json::json!({"deliveryClass": "durable", "replay": false}),
    )
    .await;
    let mut daemon = Daemon::start(&cfg, "daemon-1").await;
    let mut alice = Peer::start(cfg.clone(), agent_config("alice", &["general"], true, true)).await;
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    until_activated(&cfg, "general", "bob").await;
    alice.send("general", "before restart").await;
    bob.receives(&["before restart"]).await;

    server.restart();
    for p in [&mut alice, &mut bob] {
        p.until("reconnect", |log, _| {
            log.iter()
                .any(|e| matches!(e, AgentEvent::Connected { first: false }))
        })
        .await;
    }
    // The daemon saw the loss, then serves again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log.iter().any(|e| {
        matches!(e, DeliveryEvent::HealthChanged(DeliveryHealth::Degraded(r))
            if r.contains(&DegradedReason::Disconnected))
    }) {
        assert!(tokio::time::Instant::now() < deadline, "{:#?}", daemon.log);
        tokio::time::sleep(Duration::from_millis(20)).await;
        daemon.drain();
    }
    daemon.until_serving().await;
    let joined = alice.handle.call(|a, _| a.joined()).await.expect("runner");
    assert_eq!(joined, vec![ch("general")], "joins survive a reconnect");
    alice.send("general", "after restart").await;
    bob.receives(&["after restart"]).await;
    bob.stop().await;
    alice.send("general", "while bob is away").await;
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    bob.receives(&["while bob is away"]).await;
    assert_eq!(bob.got[0].origin, SourceKind::Durable, "{:?}", bob.got);
    bob.stop().await;
    alice.stop().await;
    let (machine, log) = daemon.stop().await;
    assert_eq!(machine.counters().lost, 0, "{log:#?}");
}

// ---------------------------------------------------------------------------------------------
// Wire compatibility with the reference's recorded fixtures
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/reference-0.6.0/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture json")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn msg_id(m: &StoredMessage) -> String {
    m.headers
        .iter()
        .find(|(k, _)| k == "Nats-Msg-Id")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no Nats-Msg-Id on {m:?}"))
}

/// The shape of a plane-3 msg-id: `<message id>:<owner>:<generation>`.
fn msg_id_parts(s: &str) -> (String, String, u64) {
    let mut it = s.rsplitn(3, ':');
    let generation = it.next().and_then(|g| g.parse().ok()).expect("generation");
    let owner = it.next().expect("owner").to_owned();
    let id = it.next().expect("message id").to_owned();
    (id, owner, generation)
}

async fn read_all(d: &mut Driver, stream: SpaceStream, filter: &str) -> Vec<StoredMessage> {
    let stream = stream.name(&space());
    let filter = filter.to_owned();
    match ok(d
        .run(|op| Command::ReadStream {
            op,
            stream,
            filter,
            start: ReadStart::Seq(1),
            last_seq: None,
            max: 100,
            reader: None,
        })
        .await)
    {
        Reply::Stored(m) => m,
        other => panic!("{other:?}"),
    }
}

/// The membership record, lease record, dinbox entry and DLV copy our daemon writes decode with
/// the core's wire types and have the key sets of the reference's recorded ones (values differ).
#[tokio::test]
async fn wire_records_written_by_our_daemon_match_the_reference_shapes() {
    wire_records(true).await;
}

/// The same, with the daemon's default path: the DLV copy is written straight by fan-out (one
/// write per copy, issue 17) and must be the record the reader writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_records_of_the_one_write_path_match_the_reference_shapes() {
    wire_records(false).await;
}

/// The records our daemon writes, against the reference's recorded shapes. With `two_hop` the
/// copy goes through the dinbox (its entry is checked too); else straight to DLV.
async fn wire_records(two_hop: bool) {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision(&cfg).await;
    for a in ["alice", "bob"] {
        provision_agent(&cfg, &id(a), &[">"]).await;
    }
    let daemon = Daemon::start_with(&cfg, "daemon-1", two_hop).await;
    let mut alice = Peer::start(cfg.clone(), agent_config("alice", &["general"], true, true)).await;
    let mut bob = Peer::start(cfg.clone(), agent_config("bob", &["general"], true, true)).await;
    for p in [&mut alice, &mut bob] {
        p.until("boot join", |log, _| {
            log.iter().any(|e| joined_durable(e).is_some())
        })
        .await;
    }
    let member = until_activated(&cfg, "general", "bob").await;
    let (sent_id, _) = alice.send("general", "wire shapes").await;
    bob.receives(&["wire shapes"]).await;

    // Membership record.
    let raw = kv_get(
        &cfg,
        KvBucket::Members,
        &member_key(&concrete("general"), &id("bob")),
    )
    .await
    .expect("member record");
    let ours: Value = serde_json::from_slice(&raw).expect("json");
    let theirs =
        &fixture("kv-members-records.json")["snapshots"]["1-after-alice-joined-review"][0]["data"];
    // Our one documented addition: the fencing token of the daemon that wrote it (G23).
    let extra: Vec<String> = keys(&ours).difference(&keys(theirs)).cloned().collect();
    assert!(keys(theirs).is_subset(&keys(&ours)), "{ours}");
    assert_eq!(extra, vec![FENCE_FIELD.to_owned()], "{ours}");
    let decoded: MembershipRecord = serde_json::from_slice(&raw).expect("record decodes");
    assert_eq!(decoded, member);
    assert_eq!(member.writer_identity, "daemon-1");

    // Lease record: the reference's keys plus our health field (reference peers ignore it).
    let raw = kv_get(&cfg, KvBucket::Delivery, "lease.0")
        .await
        .expect("lease");
    let lease: DeliveryLease = serde_json::from_slice(&raw).expect("lease decodes");
    assert!(lease.ready);
    let ours: Value = serde_json::from_slice(&raw).expect("json");
    let theirs = &fixture("kv-delivery-lease.json")["stored_while_daemon_up"][0]["data"];
    let extra: Vec<String> = keys(&ours).difference(&keys(theirs)).cloned().collect();
    assert!(keys(theirs).is_subset(&keys(&ours)), "{ours}");
    // Our documented additions: `acquiredAt` (lease.rs, ACQUIRED_AT_FIELD) and the published
    // health, which says `active` from the ready write on.
    assert_eq!(
        extra,
        vec![ACQUIRED_AT_FIELD.to_owned(), HEALTH_FIELD.to_owned()],
        "{ours}"
    );
    assert_eq!(
        ours[HEALTH_FIELD],
        serde_json::json!({"state": "active"}),
        "{ours}"
    );
    assert!(matches!(
        judge_health(Some(&lease), lease.since, LEASE_TTL),
        LeaseHealth::Active { .. }
    ));

    // Dinbox entries and DLV copies, read back from the streams.
    let mut d = Driver::start(cfg.clone()).await;
    let dinbox = read_all(
        &mut d,
        SpaceStream::Inbox,
        &format!("cotal.{SPACE}.dinbox.>"),
    )
    .await;
    let entry_msg = dinbox.iter().find(|m| m.subject.ends_with(".bob"));
    if two_hop {
        let entry_msg = entry_msg.expect("a dinbox entry for bob");
        let entry: Plane3Entry = serde_json::from_slice(&entry_msg.payload).expect("entry decodes");
        assert_eq!(entry.msg.id, sent_id);
        let ours: Value = serde_json::from_slice(&entry_msg.payload).expect("json");
        let theirs = &fixture("dinbox-entries.json")["messages"][0]["data"];
        assert_eq!(keys(&ours), keys(theirs), "dinbox entry keys: {ours}");
        assert_eq!(
            keys(&ours["msg"]),
            keys(&theirs["msg"]),
            "message keys: {ours}"
        );
        assert_eq!(
            msg_id_parts(&msg_id(entry_msg)),
            (sent_id.clone(), "bob".to_owned(), member.generation)
        );
    } else {
        assert!(entry_msg.is_none(), "one write per copy: no dinbox entry");
    }
    let dlv = read_all(&mut d, SpaceStream::Dlv, &format!("cotal.{SPACE}.dlv.bob")).await;
    let copy = dlv
        .iter()
        .find(|m| msg_id(m).starts_with(&sent_id))
        .expect("dlv copy");
    let message: CotalMessage = serde_json::from_slice(&copy.payload).expect("dlv decodes");
    assert_eq!(message.id, sent_id);
    let ours: Value = serde_json::from_slice(&copy.payload).expect("json");
    let theirs = &fixture("dlv-messages.json")["messages"][0]["data"];
    assert_eq!(keys(&ours), keys(theirs), "dlv copy keys: {ours}");
    // The DLV copy's msg-id is the entry's, whichever path wrote it.
    assert_eq!(
        msg_id_parts(&msg_id(copy)),
        (sent_id.clone(), "bob".to_owned(), member.generation),
        "the DLV copy's msg-id"
    );
    alice.stop().await;
    bob.stop().await;
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Membership audit (issue 15 item 4)
// ---------------------------------------------------------------------------------------------

/// An operator purges Bob's membership record out of band while Bob runs. His periodic audit
/// (1 s here) finds the mirror stale, reports it, and re-establishes a new generation; a post made
/// while he is then offline reaches him through DLV when he comes back. Before the audit, Bob
/// stayed `Established` on a record that no longer existed and the post never reached him.
#[tokio::test]
async fn a_membership_purged_out_of_band_is_found_and_re_established_by_the_agent() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let cfg = server.config();
    provision(&cfg).await;
    for a in ["alice", "bob"] {
        provision_agent(&cfg, &id(a), &[">"]).await;
    }
    set_channel(
        &cfg,
        "general",
        serde_json::json!({"deliveryClass": "durable", "replay": false}),
    )
    .await;
    let daemon = Daemon::start(&cfg, "daemon-1").await;
    let mut alice = Peer::start(cfg.clone(), agent_config("alice", &["general"], true, true)).await;
    let bob_config = || {
        let mut c = agent_config("bob", &["general"], true, true);
        c.membership_audit = Some(cotal_core::time::Duration::from_millis(1000));
        c
    };
    let mut bob = Peer::start(cfg.clone(), bob_config()).await;
    for p in [&mut alice, &mut bob] {
        p.until("boot join", |log, _| {
            log.iter().any(|e| joined_durable(e).is_some())
        })
        .await;
    }
    let first = until_activated(&cfg, "general", "bob").await;
    // The operator purges the record (a registry wipe would do the same).
    {
        let conn = connect(&cfg).await.expect("connect");
        let js = async_nats::jetstream::new(conn.client.clone());
        let kv = js
            .get_key_value(KvBucket::Members.name(&space()))
            .await
            .expect("bucket");
        kv.purge(member_key(&concrete("general"), &id("bob")))
            .await
            .expect("purge");
    }
    bob.until("membership lost", |log, _| {
        log.iter().any(|e| {
            matches!(e, AgentEvent::MembershipLost { generation, .. } if *generation == first.generation)
        })
    })
    .await;
    bob.until("re-established", |log, _| {
        let lost = log
            .iter()
            .position(|e| matches!(e, AgentEvent::MembershipLost { .. }));
        lost.is_some_and(|i| {
            log[i..]
                .iter()
                .any(|e| matches!(e, AgentEvent::BackstopEstablished { .. }))
        })
    })
    .await;
    // A new record (its generation is `frontier + 1` again, G34, as nothing was posted).
    until_activated(&cfg, "general", "bob").await;
    bob.stop().await;
    alice.send("general", "while bob is away").await;
    let mut bob = Peer::start(cfg.clone(), bob_config()).await;
    bob.receives(&["while bob is away"]).await;
    bob.stop().await;
    alice.stop().await;
    let (machine, log) = daemon.stop().await;
    assert_eq!(machine.counters().lost, 0, "{log:#?}");
}
