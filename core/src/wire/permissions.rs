//! NATS permission sets per credential profile, as data (semantics §1.10).
//!
//! A [`Permissions`] value is what goes into a user JWT's `nats.pub` / `nats.sub` claims. The
//! entries are NATS subject patterns (`*` one token, `>` the rest). NATS evaluates them as
//! "allowed if some allow entry matches (or the allow list is empty) and no deny entry matches";
//! an entirely empty [`Permissions`] therefore means *no restriction*, which is exactly what the
//! reference's allow-all `manager` profile is.
//!
//! Profiles:
//!
//! - [`Permissions::agent`] (`PROV:permissionsFor`): an agent's least-privilege set, bound to its
//!   own id and its read/publish ACL. Recorded claims of the reference are the truth (tests).
//! - [`Permissions::delivery`] (`PROV:deliveryPermissions`): the Plane-3 daemon.
//! - [`Permissions::manager`]: the reference 0.6.0 provisioner/manager profile, allow-all.
//! - [`Permissions::observer`] and [`Permissions::admin`]: not specified by the reference; the
//!   minimal sets this crate defines are documented on each constructor.
//!
//! Sets are ordered ([`BTreeSet`]) so every rendering is deterministic; the reference's own order
//! carries no meaning to the server.

use crate::wire::config::{ConsumerSpec, DeliverPolicy, SpaceStream, names};
use crate::wire::keys::KvBucket;
use crate::wire::shard::dlv_sweep_reader;
use crate::wire::token::{AgentId, Channel, Role, Space, route_token};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// One credential's publish and subscribe permissions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    /// `pub.allow`: subjects the holder may publish to (empty: any).
    pub publish_allow: BTreeSet<String>,
    /// `pub.deny`: subjects the holder may never publish to.
    pub publish_deny: BTreeSet<String>,
    /// `sub.allow`: subjects the holder may subscribe to (empty: any).
    pub subscribe_allow: BTreeSet<String>,
    /// `sub.deny`: subjects the holder may never subscribe to.
    pub subscribe_deny: BTreeSet<String>,
}

/// What the provisioner knows about an agent when it mints its credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentPolicy {
    /// The agent's id (its user nkey in auth mode).
    pub id: AgentId,
    /// `allowSubscribe`: the read ACL; patterns allowed.
    pub allow_subscribe: Vec<Channel>,
    /// `allowPublish`: channels the agent may post to (default none).
    pub allow_publish: Vec<Channel>,
    /// The anycast role it serves, if any (grants the `svc_<role>` consumer).
    pub role: Option<Role>,
    /// The `spawn` capability (grants requests on `ctl.manager.<id>`).
    pub spawn: bool,
}

/// The delivery credential's grants beyond the reference's `deliveryPermissions` (which holds
/// nothing on DLV but its publish subject): what the DLV revocation sweep needs
/// ([`crate::delivery::revoke`], issue 9). `STREAM.MSG.DELETE` on DLV, and create (filtered to
/// `cotal.<s>.dlv.*`), MSG.NEXT and DELETE of the one pinned reader [`dlv_sweep_reader`] of
/// shard 0 of 1. Nothing here creates, updates or reads through an agent's `dlv_<id>`.
pub fn delivery_revocation_grants(space: &Space) -> Vec<String> {
    let dlv = SpaceStream::Dlv.name(space);
    let sweep = dlv_sweep_reader(0, 1);
    vec![
        api("STREAM.MSG.DELETE", &dlv),
        api(
            "CONSUMER.CREATE",
            &format!("{dlv}.{sweep}.{}", names::space_subject(space, "dlv.*")),
        ),
        api("CONSUMER.MSG.NEXT", &format!("{dlv}.{sweep}")),
        api("CONSUMER.DELETE", &format!("{dlv}.{sweep}")),
    ]
}

/// The delivery credential's grant for the per-owner DLV backlog read
/// ([`crate::delivery::backlog`], G6): `CONSUMER.INFO` on the agents' `dlv_<id>` durables, and
/// nothing that reads, binds or creates them. Not in the reference's `deliveryPermissions`.
pub fn delivery_backlog_grants(space: &Space) -> Vec<String> {
    vec![api(
        "CONSUMER.INFO",
        &format!("{}.*", SpaceStream::Dlv.name(space)),
    )]
}

/// The delivery credential's grants on the loss records ([`crate::delivery::losses`], issue 21):
/// read (`STREAM.MSG.GET`, what a KV get sends) and write every owner's key of
/// `cotal_losses_<s>`. Not in the reference's `deliveryPermissions` (the bucket is Cotal's).
pub fn delivery_loss_grants(space: &Space) -> Vec<String> {
    vec![
        api("STREAM.MSG.GET", &KvBucket::Losses.stream_name(space)),
        format!("$KV.{}.*", KvBucket::Losses.name(space)),
    ]
}

/// Every grant of the delivery credential beyond the reference's `deliveryPermissions`:
/// [`delivery_revocation_grants`], [`delivery_backlog_grants`] and [`delivery_loss_grants`]. A
/// daemon run with a credential the reference wrote lacks them; it still runs, and reports each
/// refused sweep, backlog read or loss-record write.
pub fn delivery_additions(space: &Space) -> Vec<String> {
    let mut grants = delivery_revocation_grants(space);
    grants.extend(delivery_backlog_grants(space));
    grants.extend(delivery_loss_grants(space));
    grants
}

/// The agent credential's grants beyond the reference's `permissionsFor`: the read of its own
/// loss record ([`crate::delivery::losses`], issue 21), a direct get pinned to its key
/// (`$JS.API.DIRECT.GET.KV_cotal_losses_<s>.$KV.cotal_losses_<s>.<id>`; the subject names the
/// key, so no other member's record is readable, and nothing of the bucket is writable).
pub fn agent_additions(space: &Space, id: &AgentId) -> Vec<String> {
    let bucket = KvBucket::Losses;
    vec![api(
        "DIRECT.GET",
        &format!(
            "{}.{}",
            bucket.stream_name(space),
            bucket.subject(space, &route_token(id.as_str()))
        ),
    )]
}

/// The JetStream API verbs of the grants below.
const JS_API: &str = "$JS.API";

fn api(verb: &str, rest: &str) -> String {
    format!("{JS_API}.{verb}.{rest}")
}

/// Read grants on one KV bucket stream for a client that reads keys and watches.
fn kv_read(stream: &str) -> [String; 5] {
    [
        api("STREAM.INFO", stream),
        api("STREAM.MSG.GET", stream),
        api("CONSUMER.CREATE", &format!("{stream}.>")),
        api("CONSUMER.INFO", &format!("{stream}.>")),
        api("CONSUMER.DELETE", &format!("{stream}.>")),
    ]
}

/// Bind-only grants on a pre-created pull consumer: info, pull, ack.
fn bind_only(consumer: &ConsumerSpec) -> [String; 3] {
    [
        consumer.info_subject(),
        consumer.next_subject(),
        consumer.ack_pattern(),
    ]
}

impl Permissions {
    fn with(
        publish_allow: impl IntoIterator<Item = String>,
        publish_deny: impl IntoIterator<Item = String>,
        subscribe_allow: impl IntoIterator<Item = String>,
    ) -> Self {
        Permissions {
            publish_allow: publish_allow.into_iter().collect(),
            publish_deny: publish_deny.into_iter().collect(),
            subscribe_allow: subscribe_allow.into_iter().collect(),
            subscribe_deny: BTreeSet::new(),
        }
    }

    /// An agent credential (`PROV:permissionsFor`, semantics §1.10).
    ///
    /// `pub.allow`:
    /// - `chat.<id>.<ch>` per `allowPublish` entry, `inst.*.<id>`, `svc.*.<id>`, `ctl.self.<id>`,
    ///   `ctl.delivery.<id>`, and `ctl.manager.<id>` only with `spawn` (sender token = own id, I1);
    /// - `$JS.API.INFO`; `STREAM.INFO` on CHAT, presence and channels;
    /// - one pinned `CONSUMER.CREATE.CHAT_<s>.chathist_<id>.cotal.<s>.chat.*.<ch>` per
    ///   `allowSubscribe` entry, plus INFO, MSG.NEXT and DELETE on `chathist_<id>` (I29);
    /// - INFO, MSG.NEXT and ACK on its own `dm_<id>`, `dlv_<id>` and, with a role, `svc_<role>`;
    /// - KV: watch presence and channels (`CONSUMER.CREATE`/`INFO` on the bucket stream, `$JS.FC.>`),
    ///   write only `$KV.cotal_presence_<s>.<id>`, `STREAM.MSG.GET` on channels, and read-only
    ///   `STREAM.INFO`/`STREAM.MSG.GET` on the delivery lease bucket;
    /// - beyond the reference ([`agent_additions`]): a direct get of its own key of the loss
    ///   records, `cotal_losses_<s>/<id>`.
    ///
    /// `pub.deny`: every consumer-create form on DM, TASK and DLV. There is no grant of any kind on
    /// INBOX (I28).
    ///
    /// `sub.allow`: `_INBOX_<id>.>`, `ctl.delivery.<id>.>` and `chat.*.<ch>` per `allowSubscribe`
    /// entry (wildcards preserved).
    ///
    /// `sub.deny` (not in the reference): `chat.*.<ch>.>` for an `allowSubscribe` entry ending in
    /// `*`, which the server would otherwise let a `>` subscription widen (see
    /// `deeper_than_trailing_star`). Empty for concrete and `>`-ending entries, so the recorded
    /// reference claims are unchanged for them.
    pub fn agent(space: &Space, policy: &AgentPolicy) -> Self {
        let id = route_token(policy.id.as_str());
        let chat = SpaceStream::Chat.name(space);
        let presence = KvBucket::Presence.stream_name(space);
        let channels = KvBucket::Channels.stream_name(space);
        let delivery = KvBucket::Delivery.stream_name(space);
        let ctl = |service: &str| names::space_subject(space, &format!("ctl.{service}.{id}"));

        let mut publish: Vec<String> = policy
            .allow_publish
            .iter()
            .map(|ch| names::chat_subject(space, &id, ch.as_str()))
            .collect();
        publish.push(names::space_subject(space, &format!("inst.*.{id}")));
        publish.push(names::space_subject(space, &format!("svc.*.{id}")));
        publish.push(ctl("self"));
        if policy.spawn {
            publish.push(ctl("manager"));
        }
        publish.push(ctl("delivery"));
        publish.push(format!("{JS_API}.INFO"));
        publish.extend([&chat, &presence, &channels].map(|s| api("STREAM.INFO", s)));

        // History reads: one create grant pinned per readable channel, then INFO / MSG.NEXT /
        // DELETE on `chathist_<id>`, which do not depend on the channel.
        publish.extend(policy.allow_subscribe.iter().map(|ch| {
            ConsumerSpec::chathist(space, &policy.id, ch, DeliverPolicy::All)
                .create_request()
                .subject
        }));
        let hist = format!(
            "{chat}.{}",
            names::per_agent_consumer("chathist", &policy.id)
        );
        publish.extend(
            ["CONSUMER.INFO", "CONSUMER.MSG.NEXT", "CONSUMER.DELETE"].map(|verb| api(verb, &hist)),
        );
        publish.extend(bind_only(&ConsumerSpec::dm(space, &policy.id)));
        publish.extend(bind_only(&ConsumerSpec::dlv(space, &policy.id)));
        publish.push(api("CONSUMER.CREATE", &format!("{presence}.>")));
        publish.push(api("CONSUMER.INFO", &format!("{presence}.>")));
        publish.push("$JS.FC.>".to_owned());
        publish.push(format!("$KV.{}.{id}", KvBucket::Presence.name(space)));
        publish.push(api("STREAM.MSG.GET", &channels));
        publish.push(api("CONSUMER.CREATE", &format!("{channels}.>")));
        publish.push(api("CONSUMER.INFO", &format!("{channels}.>")));
        publish.push(api("STREAM.INFO", &delivery));
        publish.push(api("STREAM.MSG.GET", &delivery));
        if let Some(role) = &policy.role {
            publish.extend(bind_only(&ConsumerSpec::svc(space, role)));
        }
        publish.extend(agent_additions(space, &policy.id));

        let deny = [SpaceStream::Dm, SpaceStream::Task, SpaceStream::Dlv]
            .into_iter()
            .flat_map(|s| consumer_create_forms(&s.name(space)));

        let mut subscribe = vec![
            format!("{}.>", policy.id.inbox_prefix()),
            names::space_subject(space, &format!("ctl.delivery.{id}.>")),
        ];
        subscribe.extend(
            policy
                .allow_subscribe
                .iter()
                .map(|ch| names::chat_subject(space, "*", ch.as_str())),
        );
        let mut permissions = Permissions::with(publish, deny, subscribe);
        permissions.subscribe_deny = deeper_than_trailing_star(space, &policy.allow_subscribe);
        permissions
    }

    /// The delivery daemon credential (`PROV:deliveryPermissions`, semantics §1.10).
    ///
    /// - CHAT: consumer create, durable create, INFO, MSG.NEXT, DELETE (CHAT-wide: `fanout` and
    ///   the dynamic `cu_<owner>_<gen>` names), and ACK; `STREAM.INFO` on CHAT, INBOX, DLV.
    /// - INBOX: consumer verbs name-pinned to `reader`.
    /// - DLV, for the per-owner backlog read (a Cotal addition, [`delivery_backlog_grants`]):
    ///   `CONSUMER.INFO` on the agents' `dlv_<id>` durables (no read, bind or create).
    /// - KV: read (info, get, watch) presence, channels, members and acl; write
    ///   `$KV.cotal_members_<s>.>`; info/get on the delivery bucket and write only its
    ///   `lease.*` keys.
    /// - Publish `dinbox.*`, `dlv.*`, and `ctl.delivery.*.reply.>` (replies only, I27).
    /// - DLV, for the revocation sweep (a Cotal addition, [`delivery_revocation_grants`]):
    ///   `STREAM.MSG.DELETE`, and the consumer verbs (create with a `cotal.<s>.dlv.*` filter,
    ///   MSG.NEXT, DELETE) pinned to the one reader name [`dlv_sweep_reader`] of shard 0 of 1 (the
    ///   same single-shard pinning as the INBOX `reader`). No other create grant on DLV: the daemon
    ///   cannot create or update an agent's `dlv_<id>`.
    /// - Subscribe only `_INBOX_<id>.>` and `ctl.delivery.*`: no native subscription on chat,
    ///   dinbox or dlv.
    pub fn delivery(space: &Space, id: &AgentId) -> Self {
        let chat = SpaceStream::Chat.name(space);
        let inbox = SpaceStream::Inbox.name(space);
        let dlv = SpaceStream::Dlv.name(space);
        let reader = ConsumerSpec::reader(space, 0, 1);
        let delivery = KvBucket::Delivery.stream_name(space);

        let mut publish = vec![format!("{JS_API}.INFO")];
        publish.extend([&chat, &inbox, &dlv].map(|s| api("STREAM.INFO", s)));
        for verb in [
            "CONSUMER.CREATE",
            "CONSUMER.DURABLE.CREATE",
            "CONSUMER.INFO",
            "CONSUMER.MSG.NEXT",
        ] {
            publish.push(api(verb, &format!("{chat}.>")));
        }
        publish.push(api("CONSUMER.DELETE", &format!("{chat}.>")));
        publish.push(format!("$JS.ACK.{chat}.>"));
        publish.push(api(
            "CONSUMER.CREATE",
            &format!("{inbox}.{}.>", reader.name),
        ));
        publish.push(api(
            "CONSUMER.DURABLE.CREATE",
            &format!("{inbox}.{}", reader.name),
        ));
        publish.extend([
            reader.info_subject(),
            reader.next_subject(),
            reader.delete_subject(),
        ]);
        publish.push(reader.ack_pattern());
        publish.push("$JS.FC.>".to_owned());
        for bucket in [
            KvBucket::Presence,
            KvBucket::Channels,
            KvBucket::Members,
            KvBucket::Acl,
        ] {
            publish.extend(kv_read(&bucket.stream_name(space)));
        }
        publish.push(format!("$KV.{}.>", KvBucket::Members.name(space)));
        publish.push(api("STREAM.INFO", &delivery));
        publish.push(api("STREAM.MSG.GET", &delivery));
        publish.push(format!("$KV.{}.lease.*", KvBucket::Delivery.name(space)));
        publish.extend(delivery_additions(space));
        publish.push(names::space_subject(space, "dinbox.*"));
        publish.push(names::space_subject(space, "dlv.*"));
        publish.push(names::space_subject(space, "ctl.delivery.*.reply.>"));

        let subscribe = [
            format!("{}.>", id.inbox_prefix()),
            names::space_subject(space, "ctl.delivery.*"),
        ];
        Permissions::with(publish, [], subscribe)
    }

    /// The reference 0.6.0 `manager` profile (the provisioner in the fixtures): no `pub`/`sub`
    /// claims at all, which NATS reads as allow-all.
    pub fn manager() -> Self {
        Permissions::default()
    }

    /// A read-only watcher (a dashboard or `cotal status`-style viewer). The reference defines no
    /// such profile; this crate's minimal set:
    ///
    /// - publish only JetStream API *reads*: `$JS.API.INFO`; watch and read the presence and
    ///   channels buckets (STREAM.INFO, STREAM.MSG.GET, ordered-consumer CREATE/INFO/DELETE,
    ///   `$JS.FC.>` flow control); STREAM.INFO and STREAM.MSG.GET on the delivery lease bucket
    ///   (daemon health);
    /// - subscribe only its own `_INBOX_<id>.>` (every API reply and watch delivery lands there);
    /// - explicitly deny publishing any application subject (`cotal.<s>.>`) and any KV write
    ///   (`$KV.>`), so a future widening of the allow list cannot turn it into a writer.
    ///
    /// It reads no message content: no CHAT/DM/TASK/INBOX/DLV grant, no members or ACL read.
    pub fn observer(space: &Space, id: &AgentId) -> Self {
        let mut publish = vec![format!("{JS_API}.INFO"), "$JS.FC.>".to_owned()];
        for bucket in [KvBucket::Presence, KvBucket::Channels] {
            publish.extend(kv_read(&bucket.stream_name(space)));
        }
        let delivery = KvBucket::Delivery.stream_name(space);
        publish.push(api("STREAM.INFO", &delivery));
        publish.push(api("STREAM.MSG.GET", &delivery));
        let deny = [names::space_subject(space, ">"), "$KV.>".to_owned()];
        Permissions::with(publish, deny, [format!("{}.>", id.inbox_prefix())])
    }

    /// A human operator's console. The reference 0.6.0 has no separate admin profile (its
    /// operator tooling uses the allow-all `manager` cred); this crate's minimal set is the
    /// [`observer`](Permissions::observer) set plus:
    ///
    /// - requests on the privileged control tiers as itself: `ctl.admin.<id>` and
    ///   `ctl.manager.<id>` (replies come back on its `_INBOX_<id>`);
    /// - writes to the channel registry (`$KV.cotal_channels_<s>.>`, channel class and
    ///   descriptions).
    ///
    /// It posts no chat/DM/anycast message, reads no message content, holds no grant on INBOX, DLV
    /// or the members/ACL/lease buckets, and keeps the observer's deny of every other KV write.
    pub fn admin(space: &Space, id: &AgentId) -> Self {
        let mut p = Permissions::observer(space, id);
        let own = route_token(id.as_str());
        for tier in ["admin", "manager"] {
            p.publish_allow
                .insert(names::space_subject(space, &format!("ctl.{tier}.{own}")));
        }
        let registry = format!("$KV.{}.>", KvBucket::Channels.name(space));
        p.publish_allow.insert(registry);
        // The application-subject deny must not cover the control requests just granted, and the
        // KV deny must not cover the registry: narrow both.
        p.publish_deny.clear();
        for kind in ["chat", "inst", "svc", "dinbox", "dlv", "trace", "control"] {
            p.publish_deny
                .insert(names::space_subject(space, &format!("{kind}.>")));
        }
        for bucket in [
            KvBucket::Presence,
            KvBucket::Members,
            KvBucket::Acl,
            KvBucket::Delivery,
        ] {
            p.publish_deny
                .insert(format!("$KV.{}.>", bucket.name(space)));
        }
        p
    }

    /// True when nothing is restricted (all four sets empty): NATS allows everything.
    pub fn is_unrestricted(&self) -> bool {
        self.publish_allow.is_empty()
            && self.publish_deny.is_empty()
            && self.subscribe_allow.is_empty()
            && self.subscribe_deny.is_empty()
    }

    /// The `pub` / `sub` part of a user JWT's `nats` claims: `{"pub": {"allow": [...], "deny":
    /// [...]}, "sub": {...}}`, omitting empty lists and empty sections as the reference does.
    pub fn to_nats_claims(&self) -> Value {
        fn section(allow: &BTreeSet<String>, deny: &BTreeSet<String>) -> Option<Value> {
            let mut m = Map::new();
            for (key, set) in [("allow", allow), ("deny", deny)] {
                if !set.is_empty() {
                    m.insert(
                        key.into(),
                        Value::from(set.iter().cloned().collect::<Vec<_>>()),
                    );
                }
            }
            (!m.is_empty()).then_some(Value::Object(m))
        }
        let mut claims = Map::new();
        if let Some(p) = section(&self.publish_allow, &self.publish_deny) {
            claims.insert("pub".into(), p);
        }
        if let Some(s) = section(&self.subscribe_allow, &self.subscribe_deny) {
            claims.insert("sub".into(), s);
        }
        Value::Object(claims)
    }
}

/// `sub.deny` entries that close the trailing-`*` widening of a read grant (found by
/// `driver-tokio/tests/security.rs` against nats-server 2.15).
///
/// The server checks a SUB by matching the *subscription subject*, token by token, against the
/// allow list as if it were a literal subject, so an allow entry ending in `*` also matches a
/// subscription whose last token is `>`: with `allowSubscribe: ["news.*"]` the grant
/// `cotal.<s>.chat.*.news.*` admits a SUB to `cotal.<s>.chat.*.news.>`, and that subscription
/// receives `news.a.b`, a channel outside the read ACL. For each such entry `P` this returns the
/// deny entry `cotal.<s>.chat.*.P.>`: the server then filters every message delivered to a
/// wildcard subscription against the deny list, so nothing deeper than `P` reaches the agent,
/// while `P`'s own channels (and the agent's own subscription `chat.*.P`) stay allowed.
///
/// An entry is skipped when another read entry may cover a channel deeper than `P` (for example
/// `news.*` beside `news.*.x` or `news.>`): denying there would refuse a granted channel, and deny
/// beats allow. In that case the widening stays open for the channels neither entry grants; the
/// agent's read ACL on the daemon side ([`crate::acl`]) is unaffected either way.
fn deeper_than_trailing_star(space: &Space, read: &[Channel]) -> BTreeSet<String> {
    fn segments(c: &Channel) -> Vec<&str> {
        c.as_str().split('.').collect()
    }
    fn intersects(a: &str, b: &str) -> bool {
        a == b || a == "*" || b == "*" || a == ">" || b == ">"
    }
    read.iter()
        .filter(|p| segments(p).last() == Some(&"*"))
        .filter(|p| {
            let ps = segments(p);
            !read.iter().any(|q| {
                let qs = segments(q);
                let deeper =
                    qs.len() > ps.len() || (qs.last() == Some(&">") && qs.len() >= ps.len());
                deeper && ps.iter().zip(&qs).all(|(a, b)| intersects(a, b))
            })
        })
        .map(|p| format!("{}.>", names::chat_subject(space, "*", p.as_str())))
        .collect()
}

/// Every subject form that creates a consumer on `stream`: the bare legacy create, the named and
/// filtered create, and the legacy durable create.
fn consumer_create_forms(stream: &str) -> [String; 3] {
    [
        api("CONSUMER.CREATE", stream),
        api("CONSUMER.CREATE", &format!("{stream}.>")),
        api("CONSUMER.DURABLE.CREATE", &format!("{stream}.>")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space::new("main").unwrap()
    }

    fn policy(spawn: bool, role: Option<&str>) -> AgentPolicy {
        AgentPolicy {
            id: AgentId::new("UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD").unwrap(),
            allow_subscribe: vec![
                Channel::new("general").unwrap(),
                Channel::new("team.>").unwrap(),
            ],
            allow_publish: vec![Channel::new("general").unwrap()],
            role: role.map(|r| Role::new(r).unwrap()),
            spawn,
        }
    }

    #[test]
    fn a_trailing_star_read_grant_denies_what_lies_deeper() {
        let mut p = policy(false, None);
        assert!(
            Permissions::agent(&space(), &p).subscribe_deny.is_empty(),
            "no trailing `*`, no deny"
        );
        p.allow_subscribe = ["news.*", "*", "a.*.c", "ops.*", "ops.*.x"]
            .into_iter()
            .map(|c| Channel::new(c).unwrap())
            .collect();
        let deny = Permissions::agent(&space(), &p).subscribe_deny;
        // `*` is skipped: `a.*.c` and `ops.*.x` lie deeper; `ops.*` is skipped for `ops.*.x`.
        assert_eq!(
            deny.into_iter().collect::<Vec<_>>(),
            ["cotal.main.chat.*.news.*.>"]
        );
    }

    #[test]
    fn spawn_and_role_add_exactly_their_grants() {
        let base = Permissions::agent(&space(), &policy(false, None));
        let spawn = Permissions::agent(&space(), &policy(true, None));
        let added: Vec<_> = spawn
            .publish_allow
            .difference(&base.publish_allow)
            .collect();
        assert_eq!(
            added,
            ["cotal.main.ctl.manager.UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD"]
        );
        let role = Permissions::agent(&space(), &policy(false, Some("reviewer")));
        let added: Vec<_> = role.publish_allow.difference(&base.publish_allow).collect();
        assert_eq!(
            added,
            [
                "$JS.ACK.TASK_main.svc_reviewer.>",
                "$JS.API.CONSUMER.INFO.TASK_main.svc_reviewer",
                "$JS.API.CONSUMER.MSG.NEXT.TASK_main.svc_reviewer",
            ]
        );
        assert_eq!(base.subscribe_allow, role.subscribe_allow);
        assert_eq!(base.publish_deny, spawn.publish_deny);
    }

    #[test]
    fn history_grants_are_pinned_per_acl_entry() {
        let p = Permissions::agent(&space(), &policy(false, None));
        let creates: Vec<_> = p
            .publish_allow
            .iter()
            .filter(|s| s.starts_with("$JS.API.CONSUMER.CREATE.CHAT_main."))
            .collect();
        let id = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";
        assert_eq!(
            creates,
            [
                &format!(
                    "$JS.API.CONSUMER.CREATE.CHAT_main.chathist_{id}.cotal.main.chat.*.general"
                ),
                &format!(
                    "$JS.API.CONSUMER.CREATE.CHAT_main.chathist_{id}.cotal.main.chat.*.team.>"
                ),
            ]
        );
    }

    #[test]
    fn an_agent_without_read_acl_still_manages_its_history_consumer_name() {
        let mut pol = policy(false, None);
        pol.allow_subscribe.clear();
        let p = Permissions::agent(&space(), &pol);
        assert!(
            !p.publish_allow
                .iter()
                .any(|s| s.starts_with("$JS.API.CONSUMER.CREATE.CHAT_"))
        );
        assert!(!p.subscribe_allow.iter().any(|s| s.contains(".chat.")));
        assert!(
            p.publish_allow
                .iter()
                .any(|s| s.starts_with("$JS.API.CONSUMER.DELETE.CHAT_main.chathist_"))
        );
    }

    #[test]
    fn claims_omit_empty_sections() {
        assert_eq!(
            Permissions::manager().to_nats_claims(),
            serde_json::json!({})
        );
        assert!(Permissions::manager().is_unrestricted());
        let d = Permissions::delivery(&space(), &policy(false, None).id);
        let claims = d.to_nats_claims();
        assert!(claims["pub"].get("deny").is_none());
        assert!(claims["sub"]["allow"].is_array());
        assert!(!d.is_unrestricted());
    }
}
