//! Agent lifecycle for an operator (issue 15 item 7, G12): `cotal deprovision agent` and
//! `cotal members --orphans`.
//!
//! `deprovision agent` undoes `provision agent --apply`, in an order that never strands a copy
//! nobody can read:
//!
//! 1. every open membership of the agent is tombstoned **through the delivery daemon**: a
//!    `durableLeave {channel, generation}` on the agent's own control subject
//!    (`cotal.<s>.ctl.delivery.<id>`), which the operator's privileged credential may publish. The
//!    daemon writes the tombstone with its fence, as for any leave (a leave is never ACL-gated,
//!    I25). Nothing here writes a membership record;
//! 2. the ACL record is deleted (the daemon's revocation sweep then clears the agent's DLV);
//! 3. the consumers `dlv_<id>` and `dm_<id>` are deleted, and `svc_<role>` for each `--role`
//!    that no other agent currently advertises in presence (an anycast consumer is shared by every
//!    server of the role);
//! 4. the presence record is deleted.
//!
//! Each step says what it did (`tombstoned` / `deleted` / `kept`); a second run finds nothing and
//! says so. The first step that fails stops the run with a clear line and exit code 1: the steps
//! done so far stay done, and a re-run continues where it stopped.

use crate::{NatsArgs, fail};
use bytes::Bytes;
use clap::Args;
use cotal_core::delivery::lease::ORPHANS_FIELD;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::control::{ControlReply, DeliveryRequest, DurableLeaveReply};
use cotal_core::wire::keys::{KvBucket, acl_key, presence_key};
use cotal_core::wire::message::{Presence, PresenceStatus, Sender};
use cotal_core::wire::records::MembershipRecord;
use cotal_core::wire::subject::{delivery_reply_subject, delivery_request_subject};
use cotal_core::wire::token::{AgentId, Role, Space};
use cotal_driver_tokio::connect::{NatsConnection, connect};
use futures::StreamExt;
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;

/// How long a `durableLeave` waits for the daemon's answer (`REQUEST_DELIVERY_TIMEOUT`).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// `cotal deprovision agent`.
#[derive(Args, Debug)]
pub(crate) struct DeprovisionAgentArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// The agent's id.
    #[arg(long)]
    id: String,
    /// An anycast role the agent served: its `svc_<role>` consumer is deleted too, unless
    /// another agent currently advertises the role in presence (repeatable). An offline
    /// co-server is not visible: name a role only when this agent was its last server.
    #[arg(long)]
    role: Vec<String>,
    /// Print one JSON object per line instead of the text: one per change, `{"action":
    /// "tombstoned"|"deleted"|"kept", "what": "membership"|"acl"|"consumer"|"presence", "name",
    /// "generation"?, "reason"?}`, then `{"done": true|false, "changes": N}` (`changes` 0: nothing
    /// to do); after `"done": false` comes `{"error": "…"}`. Same exit codes.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// One change of `deprovision agent`: its text line, or its JSON object with `--json`.
fn step(json: bool, text: String, object: Value) {
    if json {
        println!("{object}");
    } else {
        println!("{text}");
    }
}

pub(crate) async fn deprovision_agent(args: DeprovisionAgentArgs) -> ExitCode {
    let space = match Space::new(&args.space) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid space name '{}': {e}", args.space)),
    };
    let id = match AgentId::new(&args.id) {
        Ok(a) => a,
        Err(e) => return fail(format!("invalid agent id '{}': {e}", args.id)),
    };
    let roles = match args
        .role
        .iter()
        .map(|r| Role::new(r.as_str()).map_err(|e| format!("invalid role '{r}': {e}")))
        .collect::<Result<Vec<Role>, String>>()
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut changes = 0usize;
    let json = args.json;
    let result = run(&args.nats, &space, &id, &roles, &mut changes, json).await;
    if json {
        println!(
            "{}",
            serde_json::json!({"done": result.is_ok(), "changes": changes})
        );
        return result.map_or_else(fail, |()| ExitCode::SUCCESS);
    }
    match result {
        Ok(()) if changes == 0 => {
            println!(
                "nothing to do: agent {} has no open membership, ACL record, consumer or presence \
                 in space {}",
                id.as_str(),
                space.as_str()
            );
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!(
                "deprovisioned agent {} in space {}: {changes} change(s)",
                id.as_str(),
                space.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("stopped after {changes} change(s); run it again once fixed");
            fail(e)
        }
    }
}

async fn run(
    nats: &NatsArgs,
    space: &Space,
    id: &AgentId,
    roles: &[Role],
    changes: &mut usize,
    json: bool,
) -> Result<(), String> {
    let config = nats.operator_config()?;
    let conn = connect(&config).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = |bucket: KvBucket| {
        let js = js.clone();
        let name = bucket.name(space);
        async move {
            js.get_key_value(&name).await.map_err(|e| {
                format!("cannot open KV bucket {name} (is the space provisioned?): {e}")
            })
        }
    };

    // 1. Open memberships, tombstoned by the daemon.
    let members = kv(KvBucket::Members).await?;
    for record in open_memberships(&members, id).await? {
        leave_through_daemon(&conn, space, id, &record).await?;
        *changes += 1;
        step(
            json,
            format!(
                "tombstoned: membership {} generation {} (by the delivery daemon)",
                record.channel.as_str(),
                record.generation
            ),
            serde_json::json!({
                "action": "tombstoned",
                "what": "membership",
                "name": record.channel.as_str(),
                "generation": record.generation,
            }),
        );
    }

    // 2. The ACL record.
    let acl = kv(KvBucket::Acl).await?;
    let key = acl_key(id);
    let present = acl
        .get(&key)
        .await
        .map_err(|e| format!("cannot read the ACL record {key}: {e}"))?
        .is_some();
    if present {
        acl.delete(&key)
            .await
            .map_err(|e| format!("cannot delete the ACL record {key}: {e}"))?;
        *changes += 1;
        let name = format!("{}/{key}", KvBucket::Acl.name(space));
        step(
            json,
            format!("deleted: ACL record {name}"),
            serde_json::json!({"action": "deleted", "what": "acl", "name": name}),
        );
    }

    // 3. Consumers only this agent used.
    let presence = kv(KvBucket::Presence).await?;
    let mut consumers = vec![ConsumerSpec::dlv(space, id), ConsumerSpec::dm(space, id)];
    for role in roles {
        match other_server_of(&presence, id, role).await? {
            Some(other) => step(
                json,
                format!(
                    "kept: consumer svc_{} (agent {} also serves role {})",
                    role.as_str(),
                    other,
                    role.as_str()
                ),
                serde_json::json!({
                    "action": "kept",
                    "what": "consumer",
                    "name": format!("svc_{}", role.as_str()),
                    "reason": format!("agent {other} also serves role {}", role.as_str()),
                }),
            ),
            None => consumers.push(ConsumerSpec::svc(space, role)),
        }
    }
    for spec in consumers {
        let subject = format!("$JS.API.CONSUMER.DELETE.{}.{}", spec.stream, spec.name);
        match cotal_driver_tokio::api::request(
            &conn.client,
            &subject,
            Bytes::new(),
            config.request_timeout,
        )
        .await
        {
            Ok(_) => {
                *changes += 1;
                let name = format!("{}/{}", spec.stream, spec.name);
                step(
                    json,
                    format!("deleted: consumer {name}"),
                    serde_json::json!({"action": "deleted", "what": "consumer", "name": name}),
                );
            }
            Err(e)
                if matches!(
                    e.err_code(),
                    Some(
                        cotal_driver_tokio::api::CONSUMER_NOT_FOUND
                            | cotal_driver_tokio::api::STREAM_NOT_FOUND
                    )
                ) => {}
            Err(e) => {
                return Err(format!(
                    "cannot delete consumer {}/{}: {e}",
                    spec.stream, spec.name
                ));
            }
        }
    }

    // 4. Presence.
    let key = presence_key(id).to_owned();
    let present = presence
        .get(&key)
        .await
        .map_err(|e| format!("cannot read the presence record {key}: {e}"))?
        .is_some();
    if present {
        presence
            .delete(&key)
            .await
            .map_err(|e| format!("cannot delete the presence record {key}: {e}"))?;
        *changes += 1;
        let name = format!("{}/{key}", KvBucket::Presence.name(space));
        step(
            json,
            format!("deleted: presence record {name}"),
            serde_json::json!({"action": "deleted", "what": "presence", "name": name}),
        );
    }
    Ok(())
}

/// The owner's open (no leave cursor) membership records, read from the registry.
async fn open_memberships(
    members: &async_nats::jetstream::kv::Store,
    owner: &AgentId,
) -> Result<Vec<MembershipRecord>, String> {
    let mut keys = members
        .keys()
        .await
        .map_err(|e| format!("cannot list membership records: {e}"))?;
    let suffix = format!("/{}", owner.as_str());
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| format!("cannot list membership records: {e}"))?;
        if key.ends_with(&suffix) {
            names.push(key);
        }
    }
    names.sort();
    let mut open = Vec::new();
    for key in names {
        let value = members
            .get(&key)
            .await
            .map_err(|e| format!("cannot read membership record {key}: {e}"))?;
        if let Some(record) = value.and_then(|v| MembershipRecord::from_kv(Some(&v)))
            && &record.owner == owner
            && record.leave_cursor.is_none()
        {
            open.push(record);
        }
    }
    Ok(open)
}

/// Sends `durableLeave {channel, generation}` as `owner` on its control subject and waits for
/// the daemon's answer on the bound reply subject.
async fn leave_through_daemon(
    conn: &NatsConnection,
    space: &Space,
    owner: &AgentId,
    record: &MembershipRecord,
) -> Result<(), String> {
    let what = format!(
        "membership {} generation {}",
        record.channel.as_str(),
        record.generation
    );
    let request = DeliveryRequest::DurableLeave {
        channel: record.channel.clone(),
        generation: record.generation,
    };
    let payload = serde_json::to_vec(
        &request.to_request(Sender::new(owner.clone(), owner.as_str().to_owned())),
    )
    .map_err(|e| format!("cannot encode the leave of {what}: {e}"))?;
    let token = format!("deprov{:016x}", cotal_driver_tokio::run::os_seed());
    let reply = delivery_reply_subject(space, owner, &token)
        .map_err(|e| format!("cannot build the reply subject: {e}"))?
        .to_string();
    let subject = delivery_request_subject(space, owner).to_string();
    let request = async_nats::Request::new()
        .payload(Bytes::from(payload))
        .inbox(reply)
        .timeout(Some(LEAVE_TIMEOUT));
    let no_daemon = || {
        format!(
            "no delivery daemon answered the leave of {what} on {subject}: start `cotal delivery \
             --space {}` (memberships are tombstoned only through it)",
            space.as_str()
        )
    };
    let answer = match conn.client.send_request(subject.clone(), request).await {
        Ok(answer) => answer,
        Err(e) => {
            return Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders
                | async_nats::RequestErrorKind::TimedOut => no_daemon(),
                _ => format!("the leave of {what} failed: {e}"),
            });
        }
    };
    let reply: ControlReply = serde_json::from_slice(&answer.payload)
        .map_err(|e| format!("malformed answer to the leave of {what}: {e}"))?;
    if !reply.ok {
        return Err(format!(
            "the delivery daemon refused the leave of {what}: {}",
            reply.error.unwrap_or_default()
        ));
    }
    let _ = reply.data_as::<DurableLeaveReply>();
    Ok(())
}

/// Another agent whose current presence card advertises `role`, if any.
async fn other_server_of(
    presence: &async_nats::jetstream::kv::Store,
    me: &AgentId,
    role: &Role,
) -> Result<Option<String>, String> {
    let mut keys = presence
        .keys()
        .await
        .map_err(|e| format!("cannot list presence records: {e}"))?;
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| format!("cannot list presence records: {e}"))?;
        if key == me.as_str() {
            continue;
        }
        let Ok(Some(value)) = presence.get(&key).await else {
            continue;
        };
        if let Ok(p) = serde_json::from_slice::<Presence>(&value)
            && p.status != PresenceStatus::Offline
            && p.card.role.as_deref() == Some(role.as_str())
        {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// `cotal members --orphans`: what each shard's daemon published in its lease record
/// ([`ORPHANS_FIELD`]): memberships whose owner has been offline beyond the daemon's retention.
pub(crate) async fn members_orphans(nats: &NatsArgs, space: &str, json: bool) -> ExitCode {
    let run = async {
        let space = Space::new(space).map_err(|e| format!("invalid space name '{space}': {e}"))?;
        let config = nats.operator_config()?;
        let conn = connect(&config).await.map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(conn.client.clone());
        let name = KvBucket::Delivery.name(&space);
        let kv = js.get_key_value(&name).await.map_err(|e| {
            format!("cannot open KV bucket {name} (is the space provisioned?): {e}")
        })?;
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| format!("cannot list {name}: {e}"))?;
        let mut leases = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| format!("cannot list {name}: {e}"))?;
            if key.starts_with(cotal_core::constants::LEASE_KEY_PREFIX) {
                leases.push(key);
            }
        }
        leases.sort();
        let mut published = 0usize;
        let mut total = 0u64;
        for key in &leases {
            let Ok(Some(value)) = kv.get(key).await else {
                continue;
            };
            let record: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
            let Some(orphans) = record.get(ORPHANS_FIELD) else {
                if json {
                    continue;
                }
                println!("{key}: no orphan list published yet (the daemon scans after start)");
                continue;
            };
            published += 1;
            let count = orphans["count"].as_u64().unwrap_or(0);
            total += count;
            if json {
                for m in orphans["memberships"].as_array().into_iter().flatten() {
                    println!(
                        "{}",
                        serde_json::json!({
                            "shard": key,
                            "channel": m["channel"],
                            "owner": m["owner"],
                            "generation": m["generation"],
                            "offlineMs": m["offlineMs"],
                        })
                    );
                }
                continue;
            }
            println!(
                "{key}: {count} orphaned membership(s) (owner offline > {} ms; {})",
                orphans["retentionMs"],
                if orphans["reap"] == true {
                    "the daemon tombstones them"
                } else {
                    "kept: start the daemon with --reap-orphans to tombstone them"
                }
            );
            for m in orphans["memberships"].as_array().into_iter().flatten() {
                println!(
                    "{} {} generation={} offline_ms={}",
                    m["channel"].as_str().unwrap_or("?"),
                    m["owner"].as_str().unwrap_or("?"),
                    m["generation"],
                    m["offlineMs"]
                );
            }
        }
        if leases.is_empty() {
            return Err(format!(
                "no delivery daemon serves space '{}': orphans are found by the daemon (run \
                 `cotal delivery --space {}`)",
                space.as_str(),
                space.as_str()
            ));
        }
        if !json {
            println!("{total} orphaned membership(s) in {published} shard(s) reporting");
        }
        Ok::<_, String>(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(fail)
}
