//! The roster: who is present in the space, read from the presence bucket when asked, and how a
//! `cotal_dm` recipient given by name or id resolves against it.
//!
//! One read is a short ordered watch of `cotal_presence_<space>` (last value per key, stopped once
//! the initial values are in): the grants an agent credential holds (`CONSUMER.CREATE` on the
//! bucket's stream, its own `_INBOX_<id>` deliver subject). Records expire with the bucket's TTL;
//! offline ones are left out. A record whose `card.id` differs from its key (only the key is
//! write-protected per agent) is ignored as spoofed.

use async_nats::jetstream::{self, consumer};
use cotal_core::wire::keys::KvBucket;
use cotal_core::wire::message::{Presence, PresenceStatus};
use cotal_core::wire::token::{AgentId, Space};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;

/// One present agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Present {
    /// Its id (the presence key).
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Its role, if it serves one.
    pub role: Option<String>,
    /// `idle`, `waiting` or `working`.
    pub status: String,
    /// Its activity line, if any.
    pub activity: Option<String>,
}

/// The agents whose presence record is current and not offline, by id.
///
/// # Errors
///
/// One line: the bucket could not be read within `timeout`.
pub async fn read(
    client: &async_nats::Client,
    space: &Space,
    timeout: Duration,
) -> Result<Vec<Present>, String> {
    tokio::time::timeout(timeout, read_all(client, space))
        .await
        .map_err(|_| format!("the presence bucket did not answer within {timeout:?}"))?
}

async fn read_all(client: &async_nats::Client, space: &Space) -> Result<Vec<Present>, String> {
    let bucket = KvBucket::Presence.name(space);
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream_no_info(KvBucket::Presence.stream_name(space))
        .await
        .map_err(|e| format!("cannot open the presence bucket: {e}"))?;
    let token = client.new_inbox();
    let token = token.rsplit('.').next().unwrap_or("roster");
    let prefix = format!("$KV.{bucket}.");
    let config = consumer::push::OrderedConfig {
        name: Some(format!("roster_{token}")),
        deliver_subject: client.new_inbox(),
        description: Some("cotal mcp roster".to_owned()),
        filter_subject: format!("{prefix}>"),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        replay_policy: consumer::ReplayPolicy::Instant,
        ..Default::default()
    };
    let created = stream
        .create_consumer(config)
        .await
        .map_err(|e| format!("cannot read the presence bucket: {e}"))?;
    let mut out = Vec::new();
    if created.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = created
        .messages()
        .await
        .map_err(|e| format!("cannot read the presence bucket: {e}"))?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| format!("cannot read the presence bucket: {e}"))?;
        let pending = m.info().map(|i| i.pending).unwrap_or(0);
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        let key = m.subject.strip_prefix(prefix.as_str()).unwrap_or_default();
        if !deleted && let Some(p) = present(key, &m.payload) {
            out.push(p);
        }
        if pending == 0 {
            break;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// The present agent of one record, or `None` (offline, malformed, or a card naming another id).
fn present(key: &str, value: &[u8]) -> Option<Present> {
    let p: Presence = serde_json::from_slice(value).ok()?;
    if p.card.id.as_str() != key || p.status == PresenceStatus::Offline {
        return None;
    }
    let status = serde_json::to_value(p.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some(Present {
        id: key.to_owned(),
        name: p.card.name,
        role: p.card.role,
        status,
        activity: p.activity,
    })
}

/// The roster as the model sees it: `shared_name` marks a name several present agents have (DM
/// one of them by id).
pub fn roster_json(present: &[Present], me: &str) -> Value {
    let shared = |name: &str| {
        present
            .iter()
            .filter(|p| p.name.eq_ignore_ascii_case(name))
            .count()
            > 1
    };
    json!({
        "agents": present.iter().map(|p| json!({
            "id": p.id,
            "name": p.name,
            "role": p.role,
            "status": p.status,
            "activity": p.activity,
            "shared_name": shared(&p.name),
            "me": p.id == me,
        })).collect::<Vec<_>>(),
    })
}

/// Where a DM to `to` goes: the id of a present agent whose id is `to`, else of the one present
/// agent named `to` (case-insensitive), else `to` itself when it is a valid id (an agent not
/// present now: the DM waits for it). `present: None` when the roster could not be read.
///
/// # Errors
///
/// One line: a name several agents share (with their ids), or neither a present name nor a
/// valid id.
pub fn resolve(to: &str, present: Option<&[Present]>) -> Result<(String, bool), String> {
    let to = to.trim();
    if to.is_empty() {
        return Err("`to` is empty: give an agent id or name (see cotal_roster)".to_owned());
    }
    if let Some(present) = present {
        if present.iter().any(|p| p.id == to) {
            return Ok((to.to_owned(), true));
        }
        let named: Vec<&Present> = present
            .iter()
            .filter(|p| p.name.eq_ignore_ascii_case(to))
            .collect();
        match named.as_slice() {
            [one] => return Ok((one.id.clone(), true)),
            [] => {}
            many => {
                let ids: Vec<&str> = many.iter().map(|p| p.id.as_str()).collect();
                return Err(format!(
                    "the name '{to}' is shared by {} present agents ({}): give the id of one",
                    many.len(),
                    ids.join(", ")
                ));
            }
        }
    }
    match AgentId::new(to) {
        Ok(id) => Ok((id.as_str().to_owned(), false)),
        Err(e) => Err(format!(
            "no present agent is named '{to}', and it is not a valid agent id ({e}): see \
             cotal_roster"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, name: &str) -> Present {
        Present {
            id: id.to_owned(),
            name: name.to_owned(),
            role: None,
            status: "idle".to_owned(),
            activity: None,
        }
    }

    #[test]
    fn a_dm_resolves_an_id_then_a_unique_name_then_a_valid_absent_id() {
        let roster = [p("a1", "Bob"), p("a2", "carol"), p("a3", "carol")];
        assert_eq!(resolve("a2", Some(&roster)), Ok(("a2".to_owned(), true)));
        assert_eq!(resolve("bob", Some(&roster)), Ok(("a1".to_owned(), true)));
        assert_eq!(resolve("zed", Some(&roster)), Ok(("zed".to_owned(), false)));
        assert_eq!(resolve("zed", None), Ok(("zed".to_owned(), false)));
        let shared = resolve("Carol", Some(&roster)).expect_err("ambiguous");
        assert!(shared.contains("a2, a3"), "{shared}");
        assert!(resolve(" ", Some(&roster)).is_err());
        assert!(resolve("not an id!", Some(&roster)).is_err());
    }

    #[test]
    fn a_shared_name_is_marked_so_a_dm_can_pick_an_id() {
        let roster = [p("a1", "Bob"), p("a2", "carol"), p("a3", "Carol")];
        let json = roster_json(&roster, "a1");
        let shared: Vec<(&str, bool, bool)> = json["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap_or_default(),
                    a["shared_name"] == true,
                    a["me"] == true,
                )
            })
            .collect();
        assert_eq!(
            shared,
            [
                ("a1", false, true),
                ("a2", true, false),
                ("a3", true, false)
            ]
        );
    }

    #[test]
    fn an_offline_or_spoofed_record_is_not_present() {
        let record = |id: &str, status: &str| {
            format!(r#"{{"card":{{"id":"{id}","name":"n"}},"status":"{status}","ts":1}}"#)
        };
        assert!(present("a1", record("a1", "idle").as_bytes()).is_some());
        assert!(present("a1", record("a1", "offline").as_bytes()).is_none());
        assert!(present("a1", record("a2", "idle").as_bytes()).is_none());
        assert!(present("a1", b"not json").is_none());
    }
}
