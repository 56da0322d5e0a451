//! Stream, KV and consumer configurations against the recorded reference (space `wirefix`).
//!
//! What is compared, and why:
//!
//! - **`STREAM.CREATE` request bodies** (`js-api-requests.json`, all 10 streams): our request must
//!   equal the recorded one exactly: same subject, same JSON body (every field, no extra field).
//! - **Server-side stream configs** (`stream-info.json`, all 10 streams): every field we send must
//!   equal what the server holds; every field we do not send must hold the nats-server 2.15
//!   default listed in [`STREAM_DEFAULTS`] (the dedup window default being 2 min capped by
//!   `max_age`). Only `metadata` (server version stamps) and `consumer_limits` (empty) are
//!   ignored. Any field outside these three groups fails the test, so a new server field or a
//!   reference change cannot slip through.
//! - **`CONSUMER.CREATE` request bodies** (`js-api-requests.json`): every recorded create for
//!   `fanout`, `reader`, `dm_*`, `dlv_*`, `svc_reviewer`, `chathist_*` (by sequence and by time)
//!   and `cu_*` must equal ours exactly (subject and body). The KV ordered consumers `oc_*` are
//!   ignored: nats.js creates them for KV watches/`keys()` (README note 1), they are a client
//!   library artefact and not part of what the core provisions.
//! - **Server-side consumer configs** (`consumer-list.json`): every field we send must equal the
//!   listed config, every other field must be the server default of [`CONSUMER_DEFAULTS`]
//!   (`metadata` ignored). The leaked `oc_*` consumers are ignored, as above.

// Test helpers outside `#[test]` functions unwrap fixture data on purpose: a malformed fixture
// must fail the test loudly.
#![allow(clippy::unwrap_used)]

use cotal_core::time::{Duration, UnixMillis};
use cotal_core::wire::capacity::ConsumerBudget;
use cotal_core::wire::config::{
    ApiRequest, ConsumerSpec, DeliverPolicy, KvBucketSpec, SpaceStream, StreamSpec,
};
use cotal_core::wire::keys::KvBucket;
use cotal_core::wire::{AgentId, Channel, ConcreteChannel, Role, Space};
use cotal_tests::{fixture_json, fixture_text};
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn wirefix() -> Space {
    Space::new("wirefix").unwrap()
}

/// nats-server 2.15 defaults for stream config fields the reference does not send.
const STREAM_DEFAULTS: &[(&str, &str)] = &[
    ("max_msgs_per_subject", "-1"),
    ("max_bytes", "-1"),
    ("max_msg_size", "-1"),
    ("max_msgs", "-1"),
    ("max_consumers", "-1"),
    ("max_age", "0"),
    ("discard", "\"old\""),
    ("num_replicas", "1"),
    ("allow_direct", "false"),
    ("allow_rollup_hdrs", "false"),
    ("mirror_direct", "false"),
    ("sealed", "false"),
    ("deny_delete", "false"),
    ("deny_purge", "false"),
    ("allow_msg_ttl", "false"),
    ("compression", "\"none\""),
];
const STREAM_IGNORED: &[&str] = &["metadata", "consumer_limits"];

/// nats-server 2.15 defaults for consumer config fields the reference does not send.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("deliver_policy", "\"all\""),
    ("max_ack_pending", "1000"),
    ("max_deliver", "-1"),
    ("max_waiting", "512"),
    ("replay_policy", "\"instant\""),
    ("num_replicas", "0"),
];
const CONSUMER_IGNORED: &[&str] = &["metadata"];

fn all_stream_specs(space: &Space) -> Vec<StreamSpec> {
    let cfg = ConsumerBudget::default().space_config(space);
    cfg.streams
        .iter()
        .cloned()
        .chain(cfg.kv_buckets.iter().map(KvBucketSpec::stream))
        .collect()
}

/// The deliberate differences from the reference's stream configs: the presence bucket refuses
/// rollup headers (issue 21 item 3; `KvBucketSpec::allows_rollup`), and the presence and
/// channels buckets limit their consumers' inactivity (item 4;
/// `KvBucketSpec::consumer_inactive_limit`). `config` is the reference's config of stream
/// `name`, returned as ours should be.
fn with_our_hardening(name: &str, mut config: serde_json::Value) -> serde_json::Value {
    if name.starts_with("KV_cotal_presence_") {
        assert_eq!(config["allow_rollup_hdrs"], json!(true), "{name}");
        config["allow_rollup_hdrs"] = json!(false);
    }
    // And both watched buckets bound their consumers' inactivity (issue 21 item 4).
    if name.starts_with("KV_cotal_presence_") || name.starts_with("KV_cotal_channels_") {
        config["consumer_limits"] = json!({"inactive_threshold": 300_000_000_000u64});
    }
    // Every stream with per-agent consumers has its consumer cap sized for the default 5,000
    // agents (issue 22, `cotal_core::wire::capacity`): two per agent on CHAT (history reader,
    // catch-up in flight) and on the watched buckets (a watch, one left by a reconnect), one on
    // DM, TASK and DLV, plus 64 for the daemons and operators. The reference sends none.
    let cap = match name.split('_').next() {
        Some("CHAT") => Some(10_064),
        Some("DM" | "TASK" | "DLV") => Some(5_064),
        _ if name.starts_with("KV_cotal_presence_") || name.starts_with("KV_cotal_channels_") => {
            Some(10_064)
        }
        _ => None,
    };
    if let Some(cap) = cap {
        assert!(
            config.get("max_consumers").is_none_or(|v| v == &json!(-1)),
            "{name}"
        );
        config["max_consumers"] = json!(cap);
    }
    config
}

#[test]
fn stream_create_requests_equal_the_recorded_ones() {
    let recorded = fixture_json("js-api-requests.json");
    let recorded = recorded.as_object().unwrap();
    let ours = ConsumerBudget::default()
        .space_config(&wirefix())
        .create_requests();
    assert_eq!(ours.len(), 10);
    let recorded_creates: Vec<&String> = recorded
        .keys()
        .filter(|k| k.starts_with("$JS.API.STREAM.CREATE."))
        .collect();
    assert_eq!(
        recorded_creates.len(),
        10,
        "fixture holds one create per stream"
    );
    for req in &ours {
        let entries = recorded[&req.subject].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["subject"], json!(req.subject));
        let name = req.subject.trim_start_matches("$JS.API.STREAM.CREATE.");
        assert_eq!(
            with_our_hardening(name, entries[0]["request"].clone()),
            req.body,
            "body of {}",
            req.subject
        );
    }
    // And in the reference's creation order (the fixture lists requests in the order sent).
    let text = fixture_text("js-api-requests.json");
    let positions: Vec<usize> = ours
        .iter()
        .map(|r| text.find(&format!("\"{}\"", r.subject)).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "creation order {positions:?}"
    );
}

#[test]
fn stream_configs_equal_what_the_server_holds() {
    let info = fixture_json("stream-info.json");
    let info = info.as_object().unwrap();
    let ours = all_stream_specs(&wirefix());
    assert_eq!(info.len(), ours.len());
    for spec in &ours {
        let server = with_our_hardening(&spec.name, info[&spec.name]["config"].clone());
        let server = server.as_object().unwrap();
        let sent = spec.to_api_config();
        let sent = sent.as_object().unwrap();
        for (key, value) in sent {
            assert_eq!(server.get(key), Some(value), "{}: field {key}", spec.name);
        }
        // The dedup window defaults to 2 min, capped by max_age.
        let max_age_ns = spec.max_age.map_or(0, |d| d.as_millis() * 1_000_000);
        let dedup_default = match max_age_ns {
            0 => 120_000_000_000,
            age => age.min(120_000_000_000),
        };
        for (key, value) in server {
            if sent.contains_key(key) || STREAM_IGNORED.contains(&key.as_str()) {
                continue;
            }
            let expected: Value = if key == "duplicate_window" {
                json!(dedup_default)
            } else {
                let (_, d) = STREAM_DEFAULTS
                    .iter()
                    .find(|(k, _)| k == key)
                    .unwrap_or_else(|| panic!("{}: unexpected server field {key}", spec.name));
                serde_json::from_str(d).unwrap()
            };
            assert_eq!(value, &expected, "{}: default field {key}", spec.name);
        }
    }
}

#[test]
fn kv_buckets_are_not_delete_protected_like_client_library_buckets() {
    // The reference's buckets hold deny_delete=false; a bucket created by a client helper that sets
    // deny_delete=true would be "a different configuration" (10058) for the same stream name.
    let info = fixture_json("stream-info.json");
    for bucket in KvBucket::ALL {
        let name = bucket.stream_name(&wirefix());
        assert_eq!(info[&name]["config"]["deny_delete"], json!(false), "{name}");
        assert_eq!(info[&name]["config"]["allow_direct"], json!(true), "{name}");
    }
    let chat = StreamSpec::for_space(&wirefix(), SpaceStream::Chat);
    assert_eq!(info[&chat.name]["config"]["allow_direct"], json!(true));
}

/// The joinCursor of the stored membership `<channel>/<owner>` at `generation`.
fn join_cursor(channel: &str, owner: &str, generation: u64) -> u64 {
    let records = fixture_json("kv-members-records.json").to_string();
    // Scan every `data` object in the file for the matching record.
    let v: Value = serde_json::from_str(&records).unwrap();
    let mut found = None;
    walk(&v, &mut |obj| {
        if obj.get("channel") == Some(&json!(channel))
            && obj.get("owner") == Some(&json!(owner))
            && obj.get("generation") == Some(&json!(generation))
        {
            found = obj.get("joinCursor").and_then(Value::as_u64);
        }
    });
    found.unwrap_or_else(|| panic!("no membership {channel}/{owner} gen {generation}"))
}

fn walk(v: &Value, f: &mut impl FnMut(&serde_json::Map<String, Value>)) {
    match v {
        Value::Object(o) => {
            f(o);
            o.values().for_each(|x| walk(x, f));
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
        _ => {}
    }
}

/// The recorded `opt_start_time` values of the time-started history reads, as epoch ms
/// (computed independently from the ISO strings).
fn start_time_millis(iso: &str) -> u64 {
    let known: BTreeMap<&str, u64> = [
        ("2026-11-21T19:37:13.349Z", 1_795_289_833_349),
        ("2026-11-21T19:37:14.961Z", 1_795_289_834_961),
        ("2026-11-21T19:37:16.663Z", 1_795_289_836_663),
    ]
    .into_iter()
    .collect();
    *known
        .get(iso)
        .unwrap_or_else(|| panic!("unexpected opt_start_time {iso}"))
}

/// Rebuilds, from our constructors, the consumer a recorded create names.
fn our_consumer(space: &Space, config: &Value) -> ConsumerSpec {
    let name = config
        .get("durable_name")
        .or_else(|| config.get("name"))
        .and_then(Value::as_str)
        .unwrap();
    let filter = config["filter_subject"].as_str().unwrap();
    let channel_of = |filter: &str| {
        let prefix = format!("cotal.{}.chat.*.", space.as_str());
        filter.strip_prefix(&prefix).unwrap().to_owned()
    };
    if name == "fanout" {
        ConsumerSpec::fanout(space, 0, 1)
    } else if name == "reader" {
        ConsumerSpec::reader(space, 0, 1)
    } else if let Some(id) = name.strip_prefix("dm_") {
        ConsumerSpec::dm(space, &AgentId::new(id).unwrap())
    } else if let Some(id) = name.strip_prefix("dlv_") {
        ConsumerSpec::dlv(space, &AgentId::new(id).unwrap())
    } else if let Some(role) = name.strip_prefix("svc_") {
        ConsumerSpec::svc(space, &Role::new(role).unwrap())
    } else if let Some(id) = name.strip_prefix("chathist_") {
        let start = match config["deliver_policy"].as_str().unwrap() {
            "by_start_sequence" => {
                DeliverPolicy::ByStartSequence(config["opt_start_seq"].as_u64().unwrap())
            }
            "by_start_time" => DeliverPolicy::ByStartTime(UnixMillis(start_time_millis(
                config["opt_start_time"].as_str().unwrap(),
            ))),
            other => panic!("unexpected chathist deliver policy {other}"),
        };
        let channel = Channel::new(channel_of(filter)).unwrap();
        ConsumerSpec::chathist(space, &AgentId::new(id).unwrap(), &channel, start)
    } else if let Some(rest) = name.strip_prefix("cu_") {
        let (owner, generation) = rest.rsplit_once('_').unwrap();
        let generation: u64 = generation.parse().unwrap();
        let channel = channel_of(filter);
        let cursor = join_cursor(&channel, owner, generation);
        ConsumerSpec::catchup(
            space,
            &AgentId::new(owner).unwrap(),
            generation,
            &ConcreteChannel::new(channel).unwrap(),
            cursor,
        )
    } else {
        panic!("unknown consumer {name}")
    }
}

#[test]
fn consumer_create_requests_equal_the_recorded_ones() {
    let space = wirefix();
    let recorded = fixture_json("js-api-requests.json");
    let mut compared: BTreeMap<String, usize> = BTreeMap::new();
    let mut ignored_ordered = 0;
    for (key, entries) in recorded.as_object().unwrap() {
        if !key.starts_with("$JS.API.CONSUMER.CREATE.") {
            continue;
        }
        for entry in entries.as_array().unwrap() {
            let body = &entry["request"];
            let config = &body["config"];
            if config["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("oc_"))
            {
                ignored_ordered += 1; // nats.js KV ordered consumers (README note 1)
                continue;
            }
            let ours: ApiRequest = our_consumer(&space, config).create_request();
            assert_eq!(json!(ours.subject), entry["subject"], "subject for {key}");
            assert_eq!(&ours.body, body, "body for {}", entry["subject"]);
            let kind = ours
                .subject
                .split('.')
                .nth(5)
                .unwrap()
                .split('_')
                .next()
                .unwrap();
            *compared.entry(kind.to_owned()).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = [
        ("chathist", 7),
        ("cu", 1),
        ("dlv", 4),
        ("dm", 4),
        ("fanout", 1),
        ("reader", 1),
        ("svc", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(compared, expected);
    assert_eq!(ignored_ordered, 6);
}

#[test]
fn consumer_configs_equal_what_the_server_lists() {
    let space = wirefix();
    let identities = fixture_json("identities.json");
    let mut ours: Vec<ConsumerSpec> = vec![
        ConsumerSpec::fanout(&space, 0, 1),
        ConsumerSpec::reader(&space, 0, 1),
    ];
    for agent in identities["agents"].as_object().unwrap().values() {
        let id = AgentId::new(agent["id"].as_str().unwrap()).unwrap();
        ours.push(ConsumerSpec::dm(&space, &id));
        ours.push(ConsumerSpec::dlv(&space, &id));
        if let Some(role) = agent.get("role").and_then(Value::as_str) {
            ours.push(ConsumerSpec::svc(&space, &Role::new(role).unwrap()));
        }
    }
    let ours: BTreeMap<(String, String), ConsumerSpec> = ours
        .into_iter()
        .map(|c| ((c.stream.clone(), c.name.clone()), c))
        .collect();

    let list = fixture_json("consumer-list.json");
    let mut listed = BTreeMap::new();
    let mut ignored_ordered = 0;
    for (stream, resp) in list.as_object().unwrap() {
        for c in resp["consumers"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            if name.starts_with("oc_") {
                ignored_ordered += 1; // leaked KV ordered consumers (README note 1)
                continue;
            }
            listed.insert((stream.clone(), name.to_owned()), c["config"].clone());
        }
    }
    assert_eq!(ignored_ordered, 96);
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "the same durables, no more, no fewer"
    );
    for (key, server) in &listed {
        let spec = &ours[key];
        let server = server.as_object().unwrap();
        let sent = spec.to_api_config();
        let sent = sent.as_object().unwrap();
        for (field, value) in sent {
            assert_eq!(server.get(field), Some(value), "{key:?}: field {field}");
        }
        for (field, value) in server {
            if sent.contains_key(field) || CONSUMER_IGNORED.contains(&field.as_str()) {
                continue;
            }
            if field == "name" {
                assert_eq!(
                    value,
                    &json!(spec.name),
                    "{key:?}: name mirrors durable_name"
                );
                continue;
            }
            let (_, d) = CONSUMER_DEFAULTS
                .iter()
                .find(|(k, _)| k == field)
                .unwrap_or_else(|| panic!("{key:?}: unexpected server field {field}"));
            assert_eq!(
                value,
                &serde_json::from_str::<Value>(d).unwrap(),
                "{key:?}: {field}"
            );
        }
    }
}

#[test]
fn open_mode_dm_consumer_matches_the_probe() {
    // The open-mode probe's self-created dm_ consumer carries inactive_threshold 600 s.
    let probe = fixture_json("open-mode-probe.json");
    let info =
        &probe["in-process startPlane3 on a no-creds endpoint"]["dm_consumer_info_open_mode"];
    let config = info["config"].as_object().unwrap();
    let space = Space::new(
        info["stream_name"]
            .as_str()
            .unwrap()
            .strip_prefix("DM_")
            .unwrap(),
    )
    .unwrap();
    let id = config["durable_name"]
        .as_str()
        .unwrap()
        .strip_prefix("dm_")
        .unwrap();
    let spec = ConsumerSpec::dm(&space, &AgentId::new(id).unwrap())
        .with_inactive_threshold(Duration::from_millis(600_000));
    for (field, value) in spec.to_api_config().as_object().unwrap() {
        assert_eq!(config.get(field), Some(value), "field {field}");
    }
}

/// Everything we provision for space `main`, plus the per-agent consumers of the conformance
/// sample Alice; any change to what is created shows up in review.
#[test]
fn snapshot_space_main() {
    let space = Space::new("main").unwrap();
    let alice = AgentId::new("UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD").unwrap();
    let backend = ConcreteChannel::new("team.backend").unwrap();
    let consumers = [
        ConsumerSpec::fanout(&space, 0, 1),
        ConsumerSpec::reader(&space, 0, 1),
        ConsumerSpec::dm(&space, &alice),
        ConsumerSpec::dlv(&space, &alice),
        ConsumerSpec::svc(&space, &Role::new("reviewer").unwrap()),
        ConsumerSpec::chathist(
            &space,
            &alice,
            &backend.as_channel(),
            DeliverPolicy::ByStartSequence(1),
        ),
        ConsumerSpec::chathist(
            &space,
            &alice,
            &backend.as_channel(),
            DeliverPolicy::ByStartTime(UnixMillis(1_710_000_000_000)),
        ),
        ConsumerSpec::catchup(&space, &alice, 1, &backend, 41),
    ];
    let requests: Vec<ApiRequest> = ConsumerBudget::default()
        .space_config(&space)
        .create_requests()
        .into_iter()
        .chain(consumers.iter().map(ConsumerSpec::create_request))
        .collect();
    insta::assert_json_snapshot!("space_main_create_requests", requests);
}
