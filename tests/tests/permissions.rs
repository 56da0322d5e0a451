//! Permission sets against the recorded reference claims, and the security invariants as
//! properties (I1, I27, I28, I29 of semantics §3).
//!
//! - alice, bob, carol (agent), `delivery` and the provisioner's `manager` profile: our sets must
//!   equal the decoded JWT claims (`jwt-user-claims.json`) exactly, as sets, in each of
//!   `pub.allow`, `pub.deny`, `sub.allow`, `sub.deny`; the fixture lists hold no duplicates, so a
//!   missing or extra entry fails. The rendered claims must also have the same sections.
//! - dave has no recorded claims; his policy (`identities.json`) is checked through the invariants.
//! - observer and admin are this crate's own profiles; their key properties are checked.

// Test helpers outside `#[test]` functions unwrap fixture data on purpose: a malformed fixture
// must fail the test loudly.
#![allow(clippy::unwrap_used)]

use cotal_core::wire::config::{ConsumerSpec, DeliverPolicy, SpaceStream};
use cotal_core::wire::permissions::{
    AgentPolicy, Permissions, agent_additions, delivery_additions,
};
use cotal_core::wire::{AgentId, Channel, ConcreteChannel, Role, Space};
use cotal_tests::fixture_json;
use proptest::prelude::*;
use serde_json::Value;
use std::collections::BTreeSet;

// ------------------------------------------------------------------------------------------
// A small NATS subject matcher for these checks (the shared `acl::subject_matches` is written
// elsewhere): `*` matches one token, `>` one or more remaining tokens.
// ------------------------------------------------------------------------------------------

/// True when the pattern matches the concrete subject.
fn matches(pattern: &str, subject: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = subject.split('.').collect();
    for (i, tok) in p.iter().enumerate() {
        match *tok {
            ">" => return i < s.len(),
            "*" if i < s.len() => {}
            t if i < s.len() && s[i] == t => {}
            _ => return false,
        }
    }
    p.len() == s.len()
}

/// True when some subject matches both patterns.
fn overlaps(a: &[&str], b: &[&str]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(&">"), Some(_)) | (Some(_), Some(&">")) => true,
        (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => overlaps(&a[1..], &b[1..]),
        _ => false,
    }
}

fn overlap(a: &str, b: &str) -> bool {
    overlaps(
        &a.split('.').collect::<Vec<_>>(),
        &b.split('.').collect::<Vec<_>>(),
    )
}

/// NATS evaluation: allowed when the allow list is empty or matches, and no deny matches.
fn may(allow: &BTreeSet<String>, deny: &BTreeSet<String>, subject: &str) -> bool {
    (allow.is_empty() || allow.iter().any(|p| matches(p, subject)))
        && !deny.iter().any(|p| matches(p, subject))
}

fn may_publish(p: &Permissions, subject: &str) -> bool {
    may(&p.publish_allow, &p.publish_deny, subject)
}

fn may_subscribe(p: &Permissions, subject: &str) -> bool {
    may(&p.subscribe_allow, &p.subscribe_deny, subject)
}

#[test]
fn the_matcher_follows_nats_semantics() {
    assert!(matches("a.*.c", "a.b.c"));
    assert!(!matches("a.*.c", "a.b.c.d"));
    assert!(matches("a.>", "a.b.c"));
    assert!(!matches("a.>", "a"));
    assert!(!matches("a.b", "a"));
    assert!(overlap("a.*.c", "a.b.>"));
    assert!(!overlap("a.b", "a.b.>"));
    assert!(!overlap("x.>", "y.>"));
    assert!(overlap(
        "$JS.API.CONSUMER.*.INBOX_s.>",
        "$JS.API.CONSUMER.CREATE.INBOX_s.reader.>"
    ));
}

// ------------------------------------------------------------------------------------------
// Fixture comparison
// ------------------------------------------------------------------------------------------

fn space() -> Space {
    Space::new(fixture_json("identities.json")["space"].as_str().unwrap()).unwrap()
}

fn agent_policy(name: &str) -> AgentPolicy {
    let ids = fixture_json("identities.json");
    let a = &ids["agents"][name];
    let channels = |key: &str| -> Vec<Channel> {
        a[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Channel::new(c.as_str().unwrap()).unwrap())
            .collect()
    };
    AgentPolicy {
        id: AgentId::new(a["id"].as_str().unwrap()).unwrap(),
        allow_subscribe: channels("allowSubscribe"),
        allow_publish: channels("allowPublish"),
        role: a
            .get("role")
            .and_then(Value::as_str)
            .map(|r| Role::new(r).unwrap()),
        spawn: false,
    }
}

/// One claim list as a set, checking it holds no duplicate.
fn claim_set(nats: &Value, section: &str, kind: &str) -> BTreeSet<String> {
    let list: Vec<String> = nats
        .get(section)
        .and_then(|s| s.get(kind))
        .and_then(Value::as_array)
        .map(|l| l.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let set: BTreeSet<String> = list.iter().cloned().collect();
    assert_eq!(set.len(), list.len(), "duplicate in {section}.{kind}");
    set
}

fn assert_equals_recorded(ours: &Permissions, claims_key: &str) {
    let claims = fixture_json("jwt-user-claims.json");
    let nats = &claims[claims_key]["nats"];
    assert!(nats.is_object(), "claims for {claims_key}");
    let pairs = [
        ("pub", "allow", &ours.publish_allow),
        ("pub", "deny", &ours.publish_deny),
        ("sub", "allow", &ours.subscribe_allow),
        ("sub", "deny", &ours.subscribe_deny),
    ];
    for (section, kind, set) in pairs {
        let recorded = claim_set(nats, section, kind);
        let missing: Vec<_> = recorded.difference(set).collect();
        let extra: Vec<_> = set.difference(&recorded).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{claims_key} {section}.{kind}: missing {missing:?}, extra {extra:?}"
        );
    }
    // Same sections present in the rendered claims (lists compared as sets above).
    let rendered = ours.to_nats_claims();
    for section in ["pub", "sub"] {
        let keys = |v: &Value| -> BTreeSet<String> {
            v.get(section)
                .and_then(Value::as_object)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(
            keys(&rendered),
            keys(nats),
            "{claims_key}: sections of {section}"
        );
    }
}

#[test]
fn agents_equal_their_recorded_claims() {
    let claims = fixture_json("jwt-user-claims.json");
    for name in ["alice", "bob", "carol"] {
        let policy = agent_policy(name);
        assert_eq!(claims[name]["sub"].as_str(), Some(policy.id.as_str()));
        // The reference's grants, plus exactly our additions (the read of the agent's own loss
        // record, issue 21), which the reference does not have.
        let mut ours = Permissions::agent(&space(), &policy);
        for grant in agent_additions(&space(), &policy.id) {
            assert!(ours.publish_allow.remove(&grant), "{grant} not granted");
        }
        assert_equals_recorded(&ours, name);
    }
}

#[test]
fn delivery_equals_its_recorded_claims() {
    let ids = fixture_json("identities.json");
    let id = AgentId::new(ids["deliveryDaemon"].as_str().unwrap()).unwrap();
    let claims = fixture_json("jwt-user-claims.json");
    assert_eq!(claims["delivery"]["sub"].as_str(), Some(id.as_str()));
    // The reference's grants, plus exactly our additions (the DLV revocation sweep's, issue 9,
    // and the per-owner DLV backlog read, G6), which the reference does not have.
    let mut ours = Permissions::delivery(&space(), &id);
    let recorded = claims["delivery"]["nats"]["pub"]["allow"]
        .as_array()
        .unwrap();
    for grant in delivery_additions(&space()) {
        assert!(ours.publish_allow.remove(&grant), "{grant} not granted");
        assert!(
            !recorded.iter().any(|g| g == grant.as_str()),
            "{grant} is in the reference already"
        );
    }
    assert_equals_recorded(&ours, "delivery");
}

#[test]
fn manager_is_allow_all_like_the_recorded_provisioner() {
    let claims = fixture_json("jwt-user-claims.json");
    let nats = &claims["provisioner_manager_profile"]["nats"];
    assert!(nats.get("pub").is_none() && nats.get("sub").is_none());
    assert_equals_recorded(&Permissions::manager(), "provisioner_manager_profile");
    assert!(Permissions::manager().is_unrestricted());
    assert!(may_publish(
        &Permissions::manager(),
        "$JS.API.STREAM.CREATE.CHAT_wirefix"
    ));
}

#[test]
fn agent_grants_cover_what_the_reference_agents_did_on_the_wire() {
    // Every $JS.API request an agent sent in the recorded run is allowed by our set for it.
    let ids = fixture_json("identities.json");
    let requests = fixture_json("js-api-requests.json");
    let mut checked = 0;
    for (name, agent) in ids["agents"].as_object().unwrap() {
        let perms = Permissions::agent(&space(), &agent_policy(name));
        for entries in requests.as_object().unwrap().values() {
            for e in entries.as_array().unwrap() {
                if e["requester"].as_str() == Some(name.as_str()) {
                    let subject = e["subject"].as_str().unwrap();
                    assert!(may_publish(&perms, subject), "{name} may publish {subject}");
                    assert!(
                        may_subscribe(&perms, e["reply"].as_str().unwrap()),
                        "{name} reply"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(agent["id"].as_str(), Some(perms_owner(&perms)));
    }
    assert!(checked >= 20, "checked {checked}");
}

fn perms_owner(p: &Permissions) -> &str {
    let inbox = p
        .subscribe_allow
        .iter()
        .find(|s| s.starts_with("_INBOX_"))
        .unwrap();
    inbox
        .strip_prefix("_INBOX_")
        .unwrap()
        .strip_suffix(".>")
        .unwrap()
}

#[test]
fn the_delivery_daemon_could_do_what_it_did_on_the_wire() {
    let ids = fixture_json("identities.json");
    let id = AgentId::new(ids["deliveryDaemon"].as_str().unwrap()).unwrap();
    let perms = Permissions::delivery(&space(), &id);
    let requests = fixture_json("js-api-requests.json");
    let mut checked = 0;
    for entries in requests.as_object().unwrap().values() {
        for e in entries.as_array().unwrap() {
            if e["requester"].as_str() == Some("delivery-daemon") {
                let subject = e["subject"].as_str().unwrap();
                assert!(may_publish(&perms, subject), "daemon may publish {subject}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "checked {checked}");
}

// ------------------------------------------------------------------------------------------
// Invariants
// ------------------------------------------------------------------------------------------

/// Probes covering every way to reach the mixed store `INBOX_<s>` / `dinbox`: each JetStream
/// API verb family with the stream name in the position that verb puts it.
fn inbox_probes(s: &str) -> Vec<String> {
    [
        "$JS.API.STREAM.*.INBOX_{s}", // INFO, CREATE, UPDATE, DELETE, PURGE …
        "$JS.API.STREAM.MSG.*.INBOX_{s}", // MSG.GET, MSG.DELETE
        "$JS.API.CONSUMER.*.INBOX_{s}", // legacy CREATE, LIST, NAMES
        "$JS.API.CONSUMER.*.INBOX_{s}.>", // CREATE, INFO, DELETE
        "$JS.API.CONSUMER.DURABLE.CREATE.INBOX_{s}.>",
        "$JS.API.CONSUMER.MSG.NEXT.INBOX_{s}.>",
        "$JS.API.DIRECT.GET.INBOX_{s}",
        "$JS.API.DIRECT.GET.INBOX_{s}.>",
        "$JS.ACK.INBOX_{s}.>",
        "cotal.{s}.dinbox.>",
    ]
    .iter()
    .map(|p| p.replace("{s}", s))
    .collect()
}

/// I28 and the rest of §1.10 for one agent policy.
fn check_agent_invariants(space: &Space, policy: &AgentPolicy) {
    let s = space.as_str();
    let id = policy.id.as_str();
    let p = Permissions::agent(space, policy);

    // I28: no grant of any kind on INBOX, publish or subscribe.
    for probe in inbox_probes(s) {
        for grant in p.publish_allow.iter().chain(&p.subscribe_allow) {
            assert!(!overlap(grant, &probe), "grant {grant} reaches {probe}");
        }
    }

    // Every consumer-create form on DM, TASK, DLV is denied, whatever the name or filter.
    for stream in [SpaceStream::Dm, SpaceStream::Task, SpaceStream::Dlv] {
        let st = stream.name(space);
        for probe in [
            format!("$JS.API.CONSUMER.CREATE.{st}"),
            format!("$JS.API.CONSUMER.CREATE.{st}.evil"),
            format!("$JS.API.CONSUMER.CREATE.{st}.evil.cotal.{s}.>"),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{st}.evil"),
        ] {
            assert!(!may_publish(&p, &probe), "{probe}");
            assert!(
                p.publish_deny.iter().any(|d| matches(d, &probe)),
                "explicit deny of {probe}"
            );
        }
    }
    for own in [
        ConsumerSpec::dm(space, &policy.id),
        ConsumerSpec::dlv(space, &policy.id),
    ] {
        assert!(
            !may_publish(&p, &own.create_request().subject),
            "no create of {}",
            own.name
        );
        assert!(may_publish(&p, &own.next_subject()), "pull {}", own.name);
        assert!(may_publish(&p, &own.info_subject()), "info {}", own.name);
        assert!(may_publish(
            &p,
            &format!("$JS.ACK.{}.{}.1.2.3.4.5", own.stream, own.name)
        ));
        // Another agent's consumer is out of reach.
        let other = own.name.replace(id, "UOTHER");
        assert!(!may_publish(
            &p,
            &format!("$JS.API.CONSUMER.MSG.NEXT.{}.{other}", own.stream)
        ));
    }

    // Subscribe rights: exactly own inbox, own delivery-reply subtree, chat.*.<ch> per ACL entry.
    let mut expected: BTreeSet<String> = [
        format!("_INBOX_{id}.>"),
        format!("cotal.{s}.ctl.delivery.{id}.>"),
    ]
    .into();
    expected.extend(
        policy
            .allow_subscribe
            .iter()
            .map(|c| format!("cotal.{s}.chat.*.{c}")),
    );
    assert_eq!(p.subscribe_allow, expected);
    // sub.deny: only the closure of a trailing `*` (`chat.*.<ch>.>`), and it never refuses a
    // channel some read entry grants (deny beats allow on the server).
    for d in &p.subscribe_deny {
        let pattern = d
            .strip_prefix(&format!("cotal.{s}.chat.*."))
            .and_then(|rest| rest.strip_suffix(".>"))
            .unwrap_or_else(|| panic!("unexpected sub.deny {d}"));
        assert!(pattern == "*" || pattern.ends_with(".*"), "{d}");
        assert!(
            policy.allow_subscribe.iter().any(|c| c.as_str() == pattern),
            "{d}"
        );
        for c in &policy.allow_subscribe {
            let instance = c.as_str().replace('*', "x").replace('>', "x.y");
            let subject = format!("cotal.{s}.chat.{id}.{instance}");
            assert!(!matches(d, &subject), "{d} denies the granted {subject}");
        }
    }
    assert!(!may_subscribe(
        &p,
        &format!("cotal.{s}.ctl.delivery.UOTHER.reply.x")
    ));
    assert!(!may_subscribe(&p, &format!("cotal.{s}.dlv.{id}")));
    assert!(!may_subscribe(&p, &format!("cotal.{s}.inst.{id}.UOTHER")));

    // I1: every application subject it may publish carries its own id as the sender token.
    let prefix = format!("cotal.{s}.");
    for grant in &p.publish_allow {
        let Some(rest) = grant.strip_prefix(&prefix) else {
            continue;
        };
        let t: Vec<&str> = rest.split('.').collect();
        match t[0] {
            "chat" => assert_eq!(t[1], id, "{grant}"),
            "inst" | "svc" | "ctl" => {
                assert_eq!(t.len(), 3, "{grant}");
                assert_eq!(t[2], id, "{grant}");
            }
            other => panic!("agent may publish kind {other}: {grant}"),
        }
    }
    let ctl: BTreeSet<&str> = p
        .publish_allow
        .iter()
        .filter_map(|g| g.strip_prefix(&format!("cotal.{s}.ctl.")))
        .filter_map(|g| g.split('.').next())
        .collect();
    let mut want: BTreeSet<&str> = ["self", "delivery"].into();
    if policy.spawn {
        want.insert("manager");
    }
    assert_eq!(ctl, want, "control tiers");

    // I29: history creates only with the pinned filter of an ACL entry.
    for ch in &policy.allow_subscribe {
        let hist = ConsumerSpec::chathist(space, &policy.id, ch, DeliverPolicy::All);
        assert!(may_publish(&p, &hist.create_request().subject));
    }
    let wide = format!("$JS.API.CONSUMER.CREATE.CHAT_{s}.chathist_{id}.cotal.{s}.chat.>");
    assert!(
        !may_publish(&p, &wide),
        "an agent cannot create a CHAT-wide history reader"
    );
    let removed = format!("$JS.API.CONSUMER.CREATE.CHAT_{s}.chat_{id}.cotal.{s}.chat.*.x");
    assert!(!may_publish(&p, &removed), "the removed chat_<id> durable");
    // No write to any KV but its own presence key; the lease bucket is read-only.
    for grant in p.publish_allow.iter().filter(|g| g.starts_with("$KV.")) {
        assert_eq!(grant, &format!("$KV.cotal_presence_{s}.{id}"));
    }
    assert!(may_publish(
        &p,
        &format!("$JS.API.STREAM.MSG.GET.KV_cotal_delivery_{s}")
    ));
    assert!(!may_publish(&p, &format!("$KV.cotal_delivery_{s}.lease.0")));
}

#[test]
fn recorded_agents_satisfy_the_invariants() {
    for name in ["alice", "bob", "carol", "dave"] {
        check_agent_invariants(&space(), &agent_policy(name));
    }
    // dave: empty allowPublish posts nowhere; reads general and review.
    let dave = Permissions::agent(&space(), &agent_policy("dave"));
    let chat = format!("cotal.{}.chat.", space().as_str());
    assert!(!dave.publish_allow.iter().any(|g| g.starts_with(&chat)));
    let hist: Vec<_> = dave
        .publish_allow
        .iter()
        .filter(|g| g.starts_with("$JS.API.CONSUMER.CREATE.CHAT"))
        .collect();
    assert_eq!(hist.len(), 2);
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,12}"
}

fn channel() -> impl Strategy<Value = Channel> {
    (
        prop::collection::vec(prop_oneof![4 => token(), 1 => Just("*".to_owned())], 1..4),
        any::<bool>(),
    )
        .prop_map(|(mut segs, full)| {
            if full {
                segs.push(">".to_owned());
            }
            Channel::new(segs.join(".")).unwrap()
        })
}

proptest! {
    #[test]
    fn any_agent_policy_satisfies_the_invariants(
        space in token(),
        id in "U[A-Z0-9]{10,55}",
        subscribe in prop::collection::vec(channel(), 0..5),
        publish in prop::collection::vec(channel(), 0..4),
        role in prop::option::of(token()),
        spawn in any::<bool>(),
    ) {
        let space = Space::new(space).unwrap();
        let policy = AgentPolicy {
            id: AgentId::new(id).unwrap(),
            allow_subscribe: subscribe,
            allow_publish: publish,
            role: role.map(|r| Role::new(r).unwrap()),
            spawn,
        };
        check_agent_invariants(&space, &policy);
    }
}

#[test]
fn delivery_publishes_replies_only_under_the_reply_subtree() {
    let s = space();
    let sp = s.as_str();
    let ids = fixture_json("identities.json");
    let me = AgentId::new(ids["deliveryDaemon"].as_str().unwrap()).unwrap();
    let p = Permissions::delivery(&s, &me);
    let alice = ids["agents"]["alice"]["id"].as_str().unwrap();

    // I27: the only ctl grant is ctl.delivery.*.reply.>.
    let ctl: Vec<&String> = p
        .publish_allow
        .iter()
        .filter(|g| overlap(g, &format!("cotal.{sp}.ctl.>")))
        .collect();
    assert_eq!(ctl, [&format!("cotal.{sp}.ctl.delivery.*.reply.>")]);
    assert!(may_publish(
        &p,
        &format!("cotal.{sp}.ctl.delivery.{alice}.reply.0f1e")
    ));
    assert!(!may_publish(
        &p,
        &format!("cotal.{sp}.ctl.delivery.{alice}")
    ));
    assert!(!may_publish(&p, &format!("cotal.{sp}.ctl.manager.{alice}")));
    // Plane-3 writes, no chat/DM/anycast publish.
    assert!(may_publish(&p, &format!("cotal.{sp}.dinbox.{alice}")));
    assert!(may_publish(&p, &format!("cotal.{sp}.dlv.{alice}")));
    for kind in ["chat", "inst", "svc"] {
        let probe = format!("cotal.{sp}.{kind}.>");
        assert!(
            !p.publish_allow.iter().any(|g| overlap(g, &probe)),
            "{kind}"
        );
    }
    // No native subscription on chat, dinbox or dlv; only its inbox and the control service.
    for kind in ["chat", "dinbox", "dlv", "inst"] {
        let probe = format!("cotal.{sp}.{kind}.>");
        assert!(
            !p.subscribe_allow.iter().any(|g| overlap(g, &probe)),
            "sub {kind}"
        );
    }
    assert!(may_subscribe(
        &p,
        &format!("cotal.{sp}.ctl.delivery.{alice}")
    ));
    assert!(!may_subscribe(
        &p,
        &format!("cotal.{sp}.ctl.delivery.{alice}.reply.x")
    ));
    // Consumers: fanout, reader, catch-up yes; another INBOX consumer or any DLV create, no.
    let ch = ConcreteChannel::new("review").unwrap();
    let owner = AgentId::new(alice).unwrap();
    for ok in [
        ConsumerSpec::fanout(&s, 0, 1),
        ConsumerSpec::reader(&s, 0, 1),
        ConsumerSpec::catchup(&s, &owner, 3, &ch, 10),
    ] {
        assert!(may_publish(&p, &ok.create_request().subject), "{}", ok.name);
        assert!(may_publish(&p, &ok.next_subject()), "{}", ok.name);
        assert!(may_publish(&p, &ok.delete_subject()), "{}", ok.name);
    }
    let other_inbox = format!("$JS.API.CONSUMER.CREATE.INBOX_{sp}.snoop.cotal.{sp}.dinbox.>");
    assert!(!may_publish(&p, &other_inbox));
    assert!(!may_publish(
        &p,
        &ConsumerSpec::dlv(&s, &owner).create_request().subject
    ));
    // KV: members write, lease keys only, no ACL/presence/channels write.
    assert!(may_publish(
        &p,
        &format!("$KV.cotal_members_{sp}.review/{alice}")
    ));
    assert!(may_publish(&p, &format!("$KV.cotal_delivery_{sp}.lease.0")));
    assert!(!may_publish(&p, &format!("$KV.cotal_delivery_{sp}.other")));
    for bucket in ["acl", "presence", "channels"] {
        assert!(
            !may_publish(&p, &format!("$KV.cotal_{bucket}_{sp}.{alice}")),
            "{bucket}"
        );
    }
}

#[test]
fn observer_is_read_only() {
    let s = space();
    let sp = s.as_str();
    let id = AgentId::new("UB2YLLGSBI7O7Y7DCW7LAVASAYHBDQGKGCLN6H6IVOOS754TPNHOY7A7").unwrap();
    let p = Permissions::observer(&s, &id);
    // No application publish of any kind, no KV write, nothing on INBOX.
    for kind in ["chat", "inst", "svc", "ctl", "dinbox", "dlv"] {
        assert!(
            !may_publish(&p, &format!("cotal.{sp}.{kind}.a.b")),
            "{kind}"
        );
        assert!(
            !p.publish_allow
                .iter()
                .any(|g| overlap(g, &format!("cotal.{sp}.{kind}.>")))
        );
    }
    assert!(!p.publish_allow.iter().any(|g| g.starts_with("$KV.")));
    assert!(!may_publish(&p, &format!("$KV.cotal_presence_{sp}.{id}")));
    for probe in inbox_probes(sp) {
        assert!(
            !p.publish_allow
                .iter()
                .chain(&p.subscribe_allow)
                .any(|g| overlap(g, &probe))
        );
    }
    // No message content: no grant on the message streams or the members/ACL buckets.
    for stream in ["CHAT", "DM", "TASK", "DLV"] {
        let probe = format!("$JS.API.*.*.{stream}_{sp}.>");
        assert!(
            !p.publish_allow.iter().any(|g| overlap(g, &probe)),
            "{stream}"
        );
        assert!(
            !p.publish_allow
                .iter()
                .any(|g| g.contains(&format!("{stream}_{sp}")))
        );
    }
    for bucket in ["members", "acl"] {
        assert!(
            !p.publish_allow
                .iter()
                .any(|g| g.contains(&format!("cotal_{bucket}_{sp}")))
        );
    }
    // It can watch presence and the channel registry and see daemon health.
    assert!(may_publish(
        &p,
        &format!("$JS.API.CONSUMER.CREATE.KV_cotal_presence_{sp}.oc_1.x")
    ));
    assert!(may_publish(
        &p,
        &format!("$JS.API.STREAM.MSG.GET.KV_cotal_channels_{sp}")
    ));
    assert!(may_publish(
        &p,
        &format!("$JS.API.STREAM.MSG.GET.KV_cotal_delivery_{sp}")
    ));
    assert_eq!(p.subscribe_allow, [format!("_INBOX_{id}.>")].into());
}

#[test]
fn admin_is_observer_plus_control_requests_and_registry_writes() {
    let s = space();
    let sp = s.as_str();
    let id = AgentId::new("UB2YLLGSBI7O7Y7DCW7LAVASAYHBDQGKGCLN6H6IVOOS754TPNHOY7A7").unwrap();
    let admin = Permissions::admin(&s, &id);
    let observer = Permissions::observer(&s, &id);
    let added: BTreeSet<String> = admin
        .publish_allow
        .difference(&observer.publish_allow)
        .cloned()
        .collect();
    let want: BTreeSet<String> = [
        format!("cotal.{sp}.ctl.admin.{id}"),
        format!("cotal.{sp}.ctl.manager.{id}"),
        format!("$KV.cotal_channels_{sp}.>"),
    ]
    .into();
    assert_eq!(added, want);
    assert!(observer.publish_allow.is_subset(&admin.publish_allow));
    assert_eq!(admin.subscribe_allow, observer.subscribe_allow);
    for ok in [
        format!("cotal.{sp}.ctl.admin.{id}"),
        format!("$KV.cotal_channels_{sp}.review"),
        format!("$KV.cotal_channels_{sp}.=defaults"),
    ] {
        assert!(may_publish(&admin, &ok), "{ok}");
    }
    for denied in [
        format!("cotal.{sp}.ctl.admin.UOTHER"),
        format!("cotal.{sp}.ctl.self.{id}"),
        format!("cotal.{sp}.chat.{id}.general"),
        format!("cotal.{sp}.inst.UOTHER.{id}"),
        format!("cotal.{sp}.dinbox.{id}"),
        format!("cotal.{sp}.dlv.{id}"),
        format!("$KV.cotal_members_{sp}.general/{id}"),
        format!("$KV.cotal_acl_{sp}.{id}"),
        format!("$KV.cotal_delivery_{sp}.lease.0"),
        format!("$KV.cotal_presence_{sp}.{id}"),
    ] {
        assert!(!may_publish(&admin, &denied), "{denied}");
    }
    for probe in inbox_probes(sp) {
        assert!(
            !admin
                .publish_allow
                .iter()
                .chain(&admin.subscribe_allow)
                .any(|g| overlap(g, &probe))
        );
    }
}

/// Each profile for the conformance sample Alice in space `main`; any change shows up in review.
#[test]
fn snapshot_profiles_for_alice() {
    let main = Space::new("main").unwrap();
    let alice = AgentId::new("UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD").unwrap();
    let policy = AgentPolicy {
        id: alice.clone(),
        allow_subscribe: vec![
            Channel::new("general").unwrap(),
            Channel::new("team.*").unwrap(),
        ],
        allow_publish: vec![
            Channel::new("general").unwrap(),
            Channel::new("team.backend").unwrap(),
        ],
        role: Some(Role::new("planner").unwrap()),
        spawn: false,
    };
    insta::assert_json_snapshot!("agent_alice", Permissions::agent(&main, &policy));
    let spawner = AgentPolicy {
        spawn: true,
        role: None,
        ..policy
    };
    insta::assert_json_snapshot!("agent_alice_spawn", Permissions::agent(&main, &spawner));
    insta::assert_json_snapshot!("delivery_alice", Permissions::delivery(&main, &alice));
    insta::assert_json_snapshot!("manager", Permissions::manager());
    insta::assert_json_snapshot!("observer_alice", Permissions::observer(&main, &alice));
    insta::assert_json_snapshot!("admin_alice", Permissions::admin(&main, &alice));
}
