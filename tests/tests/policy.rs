//! The channel registry, KV keys and sharding names against the reference 0.6.0 fixtures.
//!
//! - `kv-channels-registry.json`: every entry (stored and written) decodes, re-encodes to an equal
//!   JSON value, and resolves to the policy the fixture README describes;
//! - `kv-members-records.json`, `kv-members-writes.json`, `kv-acl-records.json`,
//!   `kv-delivery-lease.json`, `kv-presence-records.json`: each record's `$KV.<bucket>.<key>`
//!   subject is exactly what the key builders produce from the record's own owner/channel;
//! - `stream-info.json` / `consumer-list.json`: KV stream names, the N = 1 shard names and the
//!   §5 constants the server reports back.

use cotal_core::constants::{
    DEFAULT_ACK_WAIT, LEASE_TTL, MAX_MSGS_PER_SUBJECT, PLANE3_DEDUP_WINDOW, PRESENCE_TTL,
    SERVER_DEFAULT_DUPLICATE_WINDOW,
};
use cotal_core::policy::{
    Backfill, ChannelConfig, ChannelDefaults, ChannelRegistry, DeliveryClass, EffectivePolicy,
    ReplayWindow, effective_policy,
};
use cotal_core::time::Duration;
use cotal_core::wire::keys::{
    CHANNEL_DEFAULTS_KEY, ChannelRegistryKey, KvBucket, acl_key, kv_subject, member_key,
    parse_kv_subject, parse_member_key, presence_key,
};
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::{AgentId, Channel, ConcreteChannel, Space};
use cotal_tests::fixture_json;
use serde_json::Value;

fn space() -> Space {
    let ids = fixture_json("identities.json");
    Space::new(ids["space"].as_str().expect("space")).expect("valid space")
}

fn ch(s: &str) -> Channel {
    Channel::new(s).expect("valid channel")
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// Every (subject, body) pair of the registry fixture, stored form and written form.
fn registry_entries() -> Vec<(String, Value)> {
    let f = fixture_json("kv-channels-registry.json");
    let stored = f["stored"]
        .as_array()
        .expect("stored")
        .iter()
        .map(|e| (e, "data"));
    let written = f["writes"]
        .as_array()
        .expect("writes")
        .iter()
        .map(|e| (e, "payload"));
    stored
        .chain(written)
        .map(|(e, body)| (str_field(e, "subject").to_owned(), e[body].clone()))
        .collect()
}

/// The registry as the fixture left it, loaded the way a watch-fed cache would load it.
fn fixture_registry() -> ChannelRegistry {
    let bucket = KvBucket::Channels.name(&space());
    let mut reg = ChannelRegistry::default();
    let f = fixture_json("kv-channels-registry.json");
    for e in f["stored"].as_array().expect("stored") {
        let key = parse_kv_subject(str_field(e, "subject"), &bucket).expect("channels subject");
        let bytes = serde_json::to_vec(&e["data"]).expect("encode");
        reg.apply(key, Some(&bytes)).expect("registry key");
    }
    reg
}

#[test]
fn registry_entries_decode_and_reencode_unchanged() {
    let bucket = KvBucket::Channels.name(&space());
    let entries = registry_entries();
    assert_eq!(entries.len(), 6, "three stored + three written entries");
    for (subject, body) in entries {
        let key = parse_kv_subject(&subject, &bucket)
            .unwrap_or_else(|| panic!("{subject} is not in {bucket}"));
        match ChannelRegistryKey::parse(key).expect("a registry key") {
            ChannelRegistryKey::Defaults => {
                let d: ChannelDefaults = serde_json::from_value(body.clone()).expect("defaults");
                assert!(
                    d.extra.is_empty(),
                    "no unmodelled defaults fields: {:?}",
                    d.extra
                );
                assert_eq!(d.validate_for_write(), Ok(()));
                assert_eq!(serde_json::to_value(&d).expect("encode"), body, "{subject}");
            }
            ChannelRegistryKey::Channel(c) => {
                let cfg: ChannelConfig = serde_json::from_value(body.clone()).expect("config");
                assert!(
                    cfg.extra.is_empty(),
                    "no unmodelled config fields: {:?}",
                    cfg.extra
                );
                assert!(cfg.description.is_some(), "{c} carries a description");
                assert_eq!(cfg.validate_for_write(), Ok(()));
                assert_eq!(
                    serde_json::to_value(&cfg).expect("encode"),
                    body,
                    "{subject}"
                );
                // The subject is what the key builder gives for the channel.
                assert_eq!(subject, kv_subject(&bucket, c.as_str()));
            }
            other => panic!("unexpected registry key {other:?}"),
        }
    }
}

#[test]
fn written_and_stored_forms_agree() {
    let f = fixture_json("kv-channels-registry.json");
    let stored = f["stored"].as_array().expect("stored");
    let writes = f["writes"].as_array().expect("writes");
    assert_eq!(stored.len(), writes.len());
    for (s, w) in stored.iter().zip(writes) {
        assert_eq!(s["subject"], w["subject"]);
        let a: ChannelConfig = serde_json::from_value(s["data"].clone()).expect("stored");
        let b: ChannelConfig = serde_json::from_value(w["payload"].clone()).expect("written");
        assert_eq!(a, b);
        // Seeding into an empty registry writes exactly the patch (`{...undefined, ...patch}`).
        assert_eq!(
            ChannelConfig::prepare_write(None, &b).expect("valid patch"),
            b
        );
    }
}

#[test]
fn effective_policy_matches_the_fixture_readme() {
    let reg = fixture_registry();
    let defaults = reg.defaults.clone().expect("=defaults is seeded");
    assert_eq!(defaults.delivery_class, Some(DeliveryClass::Durable));
    assert_eq!(defaults.replay, Some(true));
    assert_eq!(defaults.replay_window, None);

    // review: durable, 24 h window (replay from the defaults).
    let review = reg.policy_for(&ch("review"));
    assert_eq!(
        review,
        EffectivePolicy {
            delivery_class: DeliveryClass::Durable,
            replay: true,
            replay_window: ReplayWindow::Bounded(Duration::from_millis(24 * 3_600_000)),
        }
    );
    assert_eq!(
        review.backfill(),
        Backfill::Window(Duration::from_millis(86_400_000))
    );

    // lobby: live.
    let lobby = reg.policy_for(&ch("lobby"));
    assert_eq!(lobby.delivery_class, DeliveryClass::Live);
    assert!(lobby.replay);
    assert_eq!(lobby.replay_window, ReplayWindow::Full);

    // An unlisted channel, such as the boot channel general: durable with replay, full window.
    let general = reg.policy_for(&ch("general"));
    assert_eq!(general.delivery_class, DeliveryClass::Durable);
    assert!(general.replay);
    assert_eq!(general.backfill(), Backfill::Full);

    // A wildcard ignores lobby's live class: `lobby.>` and `>` resolve from the defaults alone.
    assert_eq!(
        reg.policy_for(&ch("lobby.>")).delivery_class,
        DeliveryClass::Durable
    );
    assert_eq!(reg.policy_for(&ch(">")), general);

    // The fresh path (two single-key reads) agrees with the cache path for each channel.
    for name in ["review", "lobby", "general"] {
        let c = ConcreteChannel::new(name).expect("concrete");
        let fresh = effective_policy(&c.as_channel(), reg.channels.get(&c), reg.defaults.as_ref());
        assert_eq!(fresh, reg.policy_for(&c.as_channel()), "{name}");
    }

    // Had the registry been empty, the reference's no-registry answer is also durable.
    assert_eq!(
        ChannelRegistry::default().policy_for(&ch("lobby")),
        EffectivePolicy::WITHOUT_REGISTRY
    );
}

#[test]
fn defaults_key_is_reserved() {
    let bucket = KvBucket::Channels.name(&space());
    assert_eq!(
        kv_subject(&bucket, CHANNEL_DEFAULTS_KEY),
        "$KV.cotal_channels_wirefix.=defaults"
    );
    assert!(
        registry_entries()
            .iter()
            .any(|(s, _)| s.ends_with(".=defaults"))
    );
}

/// Every member record (snapshots and writes) sits under `<channel>/<owner>` of its own body.
#[test]
fn member_keys_match_the_members_fixtures() {
    let bucket = KvBucket::Members.name(&space());
    let mut bodies: Vec<(String, Value)> = Vec::new();
    let records = fixture_json("kv-members-records.json");
    assert_eq!(str_field(&records, "bucket"), bucket);
    for snapshot in records["snapshots"]
        .as_object()
        .expect("snapshots")
        .values()
    {
        for r in snapshot.as_array().expect("snapshot") {
            if r.get("error").is_some() {
                continue; // a superseded revision (history = 1)
            }
            bodies.push((str_field(r, "subject").to_owned(), r["data"].clone()));
        }
    }
    for w in fixture_json("kv-members-writes.json")
        .as_array()
        .expect("writes")
    {
        bodies.push((str_field(w, "subject").to_owned(), w["payload"].clone()));
    }
    assert!(bodies.len() > 40, "found {} member records", bodies.len());
    for (subject, body) in bodies {
        let channel = ConcreteChannel::new(str_field(&body, "channel")).expect("channel");
        let owner = AgentId::new(str_field(&body, "owner")).expect("owner");
        let key = member_key(&channel, &owner);
        assert_eq!(subject, kv_subject(&bucket, &key));
        let parsed = parse_member_key(parse_kv_subject(&subject, &bucket).expect("key"))
            .expect("a valid member key");
        assert_eq!((parsed.channel, parsed.owner), (channel, owner));
    }
}

#[test]
fn acl_keys_match_the_acl_fixture() {
    let bucket = KvBucket::Acl.name(&space());
    let f = fixture_json("kv-acl-records.json");
    assert_eq!(str_field(&f, "bucket"), bucket);
    let ids = fixture_json("identities.json");
    let agents = ids["agents"].as_object().expect("agents");
    let subjects: Vec<&str> = f["stored"]
        .as_array()
        .expect("stored")
        .iter()
        .chain(f["writes"].as_array().expect("writes"))
        .map(|r| str_field(r, "subject"))
        .collect();
    assert_eq!(subjects.len(), 8);
    // Each agent's ACL record is keyed by acl_key(its id), once stored and once written.
    for (name, a) in agents {
        let id = AgentId::new(str_field(a, "id")).expect("agent id");
        let want = kv_subject(&bucket, &acl_key(&id));
        let hits = subjects.iter().filter(|s| **s == want).count();
        assert_eq!(hits, 2, "{name}");
    }
    // And the stored body is that agent's allowSubscribe.
    for r in f["stored"].as_array().expect("stored") {
        let key = parse_kv_subject(str_field(r, "subject"), &bucket).expect("key");
        let agent = agents
            .values()
            .find(|a| str_field(a, "id") == key)
            .expect("known owner");
        assert_eq!(r["data"]["allowSubscribe"], agent["allowSubscribe"]);
    }
}

#[test]
fn lease_key_matches_the_lease_fixture() {
    let bucket = KvBucket::Delivery.name(&space());
    let f = fixture_json("kv-delivery-lease.json");
    assert_eq!(str_field(&f, "bucket"), bucket);
    let only = ShardMap::SINGLE.shard(0).expect("shard 0");
    assert_eq!(str_field(&f, "key"), only.lease_key());
    let want = kv_subject(&bucket, &only.lease_key());
    let mut n = 0;
    for part in [
        "stored_while_daemon_up",
        "stored_after_daemon_sigterm",
        "writes",
    ] {
        for r in f[part].as_array().expect(part) {
            assert_eq!(str_field(r, "subject"), want, "{part}");
            n += 1;
        }
    }
    assert_eq!(n, 6);
}

#[test]
fn presence_keys_match_the_presence_fixture() {
    let bucket = KvBucket::Presence.name(&space());
    let f = fixture_json("kv-presence-records.json");
    assert_eq!(str_field(&f, "bucket"), bucket);
    assert_eq!(f["bucket_ttl_ms"].as_u64(), Some(PRESENCE_TTL.as_millis()));
    let mut n = 0;
    for (part, body) in [
        ("stored_while_live", "data"),
        ("stored_after_agents_stop", "data"),
        ("first_write_per_key_and_status", "payload"),
    ] {
        for r in f[part].as_array().expect(part) {
            let id = AgentId::new(str_field(&r[body]["card"], "id")).expect("card id");
            assert_eq!(
                str_field(r, "subject"),
                kv_subject(&bucket, presence_key(&id)),
                "{part}"
            );
            n += 1;
        }
    }
    assert_eq!(n, 16);
}

fn nanos(d: Duration) -> u64 {
    d.as_millis() * 1_000_000
}

#[test]
fn streams_and_consumers_use_these_names_and_constants() {
    let s = space();
    let info = fixture_json("stream-info.json");
    for b in KvBucket::ALL {
        let stream = b.stream_name(&s);
        let cfg = &info[&stream]["config"];
        assert_eq!(cfg["name"].as_str(), Some(stream.as_str()));
        assert_eq!(
            cfg["subjects"][0].as_str(),
            Some(format!("$KV.{}.>", b.name(&s)).as_str())
        );
    }
    assert_eq!(
        info["KV_cotal_delivery_wirefix"]["config"]["max_age"].as_u64(),
        Some(nanos(LEASE_TTL))
    );
    assert_eq!(
        info["KV_cotal_presence_wirefix"]["config"]["max_age"].as_u64(),
        Some(nanos(PRESENCE_TTL))
    );
    for plane3 in ["INBOX_wirefix", "DLV_wirefix"] {
        let cfg = &info[plane3]["config"];
        assert_eq!(
            cfg["duplicate_window"].as_u64(),
            Some(nanos(PLANE3_DEDUP_WINDOW)),
            "{plane3}"
        );
        assert_eq!(
            cfg["max_msgs_per_subject"].as_i64(),
            Some(MAX_MSGS_PER_SUBJECT),
            "{plane3}"
        );
    }
    let chat = &info["CHAT_wirefix"]["config"];
    assert_eq!(
        chat["duplicate_window"].as_u64(),
        Some(nanos(SERVER_DEFAULT_DUPLICATE_WINDOW))
    );
    assert_eq!(
        chat["max_msgs_per_subject"].as_i64(),
        Some(MAX_MSGS_PER_SUBJECT)
    );

    // N = 1: the daemon's durables are exactly `fanout` on CHAT and `reader` on INBOX.
    let only = ShardMap::SINGLE.shard(0).expect("shard 0");
    let list = fixture_json("consumer-list.json");
    let names = |stream: &str| -> Vec<String> {
        list[stream]["consumers"]
            .as_array()
            .expect("consumers")
            .iter()
            .map(|c| str_field(c, "name").to_owned())
            .filter(|n| !n.starts_with("oc_"))
            .collect()
    };
    assert_eq!(names("CHAT_wirefix"), vec![only.fanout_durable()]);
    assert_eq!(names("INBOX_wirefix"), vec![only.reader_durable()]);
    for stream in ["CHAT_wirefix", "INBOX_wirefix"] {
        let c = &list[stream]["consumers"][0]["config"];
        assert_eq!(
            c["ack_wait"].as_u64(),
            Some(nanos(DEFAULT_ACK_WAIT)),
            "{stream}"
        );
    }
}
