//! The JSON the tools return: messages, notices, join reports, channels, health. Plain data a
//! model reads; every string that came from the network is passed through as a JSON string
//! (never interpreted).

use crate::app::Message;
use cotal_core::agent::{AgentEvent, AgentHealth, BackstopState, ChannelHealth, JoinReport};
use serde_json::{Value, json};

/// One message.
pub fn message(m: &Message) -> Value {
    json!({
        "id": m.id(),
        "from": m.from(),
        "from_name": m.message().from.name,
        "kind": m.kind().as_str(),
        "channel": m.channel().map(|c| c.as_str().to_owned()),
        "role": m.role().map(|r| r.as_str().to_owned()),
        "text": m.text(),
        "historical": m.historical(),
        "mentions_me": m.mentions_me(),
    })
}

/// The notice an event gives the model, if any: what it should know that no tool result told it.
pub fn notice(event: &AgentEvent) -> Option<Value> {
    Some(match event {
        AgentEvent::Lost { id, reason } => json!({
            "notice": "message_lost",
            "id": id,
            "reason": reason,
        }),
        AgentEvent::CopiesLost {
            ranges,
            more,
            total,
        } => json!({
            "notice": "copies_lost",
            "total": total,
            "ranges": ranges.iter().map(|r| json!({
                "channel": r.channel,
                "first": r.first,
                "last": r.last,
                "count": r.count,
                "reason": r.reason.as_str(),
            })).collect::<Vec<_>>(),
            "more_ranges": more.ranges,
            "more_count": more.count,
        }),
        AgentEvent::ChannelRefused {
            channel, detail, ..
        } => json!({
            "notice": "channel_refused",
            "channel": channel.as_str(),
            "detail": detail,
            "effect": "the channel is no longer joined",
        }),
        AgentEvent::JoinFailed {
            request: None,
            channel,
            error,
        } => json!({
            "notice": "join_failed",
            "channel": channel.as_str(),
            "error": error.to_string(),
        }),
        AgentEvent::BackstopDegraded { channel, reason } => json!({
            "notice": "backstop_degraded",
            "channel": channel.as_str(),
            "reason": reason,
            "effect": "live delivery only until it is re-established",
        }),
        AgentEvent::MembershipLost {
            channel,
            generation,
        } => json!({
            "notice": "membership_lost",
            "channel": channel.as_str(),
            "generation": generation,
        }),
        AgentEvent::DirectUnbound {
            consumer, detail, ..
        } => json!({
            "notice": "direct_unbound",
            "consumer": consumer,
            "detail": detail,
            "effect": "no DM or task of it arrives until it is bound again",
        }),
        AgentEvent::Disconnected => json!({"notice": "disconnected"}),
        AgentEvent::Connected { first: false } => json!({"notice": "reconnected"}),
        _ => return None,
    })
}

/// A join's report.
pub fn join_report(channel: &str, r: &JoinReport) -> Value {
    json!({
        "channel": channel,
        "joined": r.joined,
        "durable": r.durable,
        "generation": r.generation,
        "backfilled": r.backfilled,
        "reason": r.reason,
    })
}

fn backstop(state: &BackstopState) -> Value {
    match state {
        BackstopState::NotApplicable => json!({"state": "none"}),
        BackstopState::Pending => json!({"state": "pending"}),
        BackstopState::Requesting => json!({"state": "requesting"}),
        BackstopState::Established { generation } => {
            json!({"state": "established", "generation": generation})
        }
        BackstopState::Degraded { reason, attempts } => {
            json!({"state": "degraded", "reason": reason, "attempts": attempts})
        }
        _ => json!({"state": "unknown"}),
    }
}

/// One joined channel: its class (a channel without a backstop is live), live feed and backstop.
pub fn channel(c: &ChannelHealth) -> Value {
    let class = if matches!(c.backstop, BackstopState::NotApplicable) {
        "live"
    } else {
        "durable"
    };
    json!({
        "channel": c.channel.as_str(),
        "class": class,
        "live": c.live,
        "backstop": backstop(&c.backstop),
    })
}

/// The health fields of `cotal_status` (the inbox adds its own).
pub fn health(h: &AgentHealth) -> Value {
    json!({
        "connected": h.ready,
        "connection_losses": h.counters.connection_losses,
        "dlv_bound": h.dlv_bound,
        "direct": h.direct.iter().map(|d| json!({
            "consumer": d.consumer,
            "kind": d.kind.as_str(),
            "bound": d.bound,
            "attempts": d.attempts,
        })).collect::<Vec<_>>(),
        "channels": h.channels.iter().map(channel).collect::<Vec<_>>(),
        "unclosed": h.unclosed.iter().map(|u| json!({
            "channel": u.channel.as_str(),
            "generation": u.generation,
            "attempts": u.attempts,
            "last_error": u.last_error,
        })).collect::<Vec<_>>(),
        "anomalies": {
            "spoofed": h.counters.spoofed,
            "malformed": h.counters.malformed,
            "settles_unconfirmed": h.counters.settles_unconfirmed,
        },
        "daemon_recorded_losses": h.losses.as_ref().map(|l| json!({
            "total": h.counters.copies_lost,
            "ranges": l.ranges.iter().map(|r| json!({
                "channel": r.channel,
                "first": r.first,
                "last": r.last,
                "count": r.count,
                "reason": r.reason.as_str(),
            })).collect::<Vec<_>>(),
            "more_ranges": l.more.ranges,
            "more_count": l.more.count,
        })),
    })
}
