//! [`AgentMetrics`]: what `cotal agent --metrics` serves.

use super::shared::{Exported, Read, catch_up, flag, gauge_value};
use cotal_core::agent::{AgentCounters, AgentHealth, BackstopState};
use cotal_core::ledger::LedgerCounters;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The agent's own counters exported one to one (`cotal_agent_<name>_total`).
const AGENT_COUNTERS: &[Exported<AgentCounters>] = &[
    ("connection_losses", "Times the connection was lost", |c| {
        c.connection_losses
    }),
    (
        "spoofed",
        "Messages dropped because their sender did not match the subject",
        |c| c.spoofed,
    ),
    ("malformed", "Messages dropped as undecodable", |c| {
        c.malformed
    }),
    (
        "settles_unconfirmed",
        "Acks or naks whose outcome the broker did not confirm",
        |c| c.settles_unconfirmed,
    ),
    (
        "backfill_failures",
        "Backfills of a joined channel that failed",
        |c| c.backfill_failures,
    ),
    (
        "reconcile_attempts",
        "Attempts to re-establish a degraded durable backstop",
        |c| c.reconcile_attempts,
    ),
    (
        "dlv_bind_failures",
        "Failed binds of the DLV consumer",
        |c| c.dlv_bind_failures,
    ),
    (
        "live_copies_shed",
        "Live copies shed because the inbox was full (lost to this agent unless a durable copy follows)",
        |c| c.live_copies_shed,
    ),
    (
        "direct_bind_failures",
        "Failed binds of a direct (dm_, svc_) consumer",
        |c| c.direct_bind_failures,
    ),
    (
        "memberships_lost",
        "Durable memberships found gone (tombstoned or deleted by someone else)",
        |c| c.memberships_lost,
    ),
];

/// The ledger's counters exported one to one (`cotal_agent_ledger_<name>_total`): dedup,
/// settlement, overflow.
const LEDGER_COUNTERS: &[Exported<LedgerCounters>] = &[
    (
        "copies_ingested",
        "Copies received (live, backfill and durable)",
        |c| c.copies_ingested,
    ),
    (
        "duplicates_dropped",
        "Live or backfill copies of a message already pending, dropped (dedup)",
        |c| c.duplicates_dropped,
    ),
    (
        "settled_duplicates_acked",
        "Durable copies of an already settled message, acked and dropped (dedup)",
        |c| c.settled_duplicates_acked,
    ),
    (
        "settled_duplicates_dropped",
        "Live or backfill copies of an already settled message, dropped (dedup)",
        |c| c.settled_duplicates_dropped,
    ),
    (
        "durable_redeliveries",
        "Durable copies delivered more than once by the broker",
        |c| c.durable_redeliveries,
    ),
    ("surfaced", "Messages handed to the application", |c| {
        c.surfaced
    }),
    (
        "handled",
        "Messages the application reported handled",
        |c| c.handled,
    ),
    (
        "overflow_deferred",
        "Durable copies refused by a full inbox and nakked (deferred, not lost)",
        |c| c.overflow_deferred,
    ),
    (
        "overflow_lost",
        "Live or backfill copies refused by a full inbox (lost)",
        |c| c.overflow_lost,
    ),
    (
        "anomalies_terminated",
        "Durable anomalies terminated",
        |c| c.anomalies_terminated,
    ),
];

/// The backstop states, as the `state` label spells them.
const BACKSTOP_STATES: [&str; 5] = [
    "not_applicable",
    "pending",
    "requesting",
    "established",
    "degraded",
];

fn backstop_label(s: &BackstopState) -> &'static str {
    match s {
        BackstopState::NotApplicable => "not_applicable",
        BackstopState::Pending => "pending",
        BackstopState::Requesting => "requesting",
        BackstopState::Established { .. } => "established",
        BackstopState::Degraded { .. } => "degraded",
        _ => "other",
    }
}

/// The metrics of one agent, read from its [`AgentHealth`] at each scrape
/// ([`AgentMetrics::render`]).
pub struct AgentMetrics {
    registry: Registry,
    agent: Vec<(Read<AgentCounters>, Counter)>,
    ledger: Vec<(Read<LedgerCounters>, Counter)>,
    losses: Counter,
    loss_ranges: Gauge,
    ready: Gauge,
    dlv_bound: Gauge,
    direct_bound: Family<Labels, Gauge>,
    backstop: Family<Labels, Gauge>,
    generation: Family<Labels, Gauge>,
    unclosed: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// The metrics of agent `id` in `space`: every name starts with `cotal_agent_`;
    /// `cotal_agent_info` carries the two as labels.
    pub fn new(space: &str, id: &str) -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("cotal_agent");
        let info = Family::<Labels, Gauge>::default();
        r.register("info", "The agent: space and id (always 1)", info.clone());
        info.get_or_create(&vec![("space", space.to_owned()), ("agent", id.to_owned())])
            .set(1);
        let mut agent = Vec::new();
        for (name, help, read) in AGENT_COUNTERS {
            let c = Counter::default();
            r.register(*name, *help, c.clone());
            agent.push((*read, c));
        }
        let mut ledger = Vec::new();
        for (name, help, read) in LEDGER_COUNTERS {
            let c = Counter::default();
            r.register(format!("ledger_{name}"), *help, c.clone());
            ledger.push((*read, c));
        }
        let losses = Counter::default();
        r.register(
            "losses_reported",
            "Copies the delivery daemon reported it could not deliver to this agent (its loss record)",
            losses.clone(),
        );
        let loss_ranges = Gauge::default();
        r.register(
            "loss_ranges",
            "Ranges listed in the agent's loss record",
            loss_ranges.clone(),
        );
        let ready = Gauge::default();
        r.register(
            "connected",
            "1 when connected and the channel registry is loaded",
            ready.clone(),
        );
        let dlv_bound = Gauge::default();
        r.register(
            "dlv_bound",
            "1 when the DLV consumer (the durable backstop) is bound",
            dlv_bound.clone(),
        );
        let direct_bound = Family::<Labels, Gauge>::default();
        r.register(
            "direct_bound",
            "1 when the direct consumer (dm_<id>, svc_<role>) is bound",
            direct_bound.clone(),
        );
        let backstop = Family::<Labels, Gauge>::default();
        r.register(
            "channel_backstop",
            "1 for each joined channel's backstop state now, 0 for the others",
            backstop.clone(),
        );
        let generation = Family::<Labels, Gauge>::default();
        r.register(
            "channel_generation",
            "The membership generation of each channel whose backstop is established",
            generation.clone(),
        );
        let unclosed = Gauge::default();
        r.register(
            "memberships_unclosed",
            "Memberships still to close after a refusal",
            unclosed.clone(),
        );
        AgentMetrics {
            registry: root,
            agent,
            ledger,
            losses,
            loss_ranges,
            ready,
            dlv_bound,
            direct_bound,
            backstop,
            generation,
            unclosed,
        }
    }

    /// The OpenMetrics text, with `health` (`None`: the agent has stopped; the last values
    /// stay).
    pub fn render(&self, health: Option<&AgentHealth>) -> String {
        if let Some(h) = health {
            self.update(h);
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            return format!("# encoding failed: {e}\n# EOF\n");
        }
        out
    }

    fn update(&self, h: &AgentHealth) {
        for (read, c) in &self.agent {
            catch_up(c, read(&h.counters));
        }
        for (read, c) in &self.ledger {
            catch_up(c, read(&h.ledger));
        }
        if let Some(losses) = &h.losses {
            catch_up(&self.losses, losses.total());
            self.loss_ranges
                .set(gauge_value(losses.ranges.len() as u64));
        }
        self.ready.set(flag(h.ready));
        self.dlv_bound.set(flag(h.dlv_bound));
        self.direct_bound.clear();
        for d in &h.direct {
            self.direct_bound
                .get_or_create(&vec![("consumer", d.consumer.clone())])
                .set(flag(d.bound));
        }
        self.backstop.clear();
        self.generation.clear();
        for c in &h.channels {
            let channel = c.channel.as_str().to_owned();
            let now = backstop_label(&c.backstop);
            for state in BACKSTOP_STATES {
                self.backstop
                    .get_or_create(&vec![
                        ("channel", channel.clone()),
                        ("state", state.to_owned()),
                    ])
                    .set(flag(state == now));
            }
            if let BackstopState::Established { generation } = c.backstop {
                self.generation
                    .get_or_create(&vec![("channel", channel.clone())])
                    .set(gauge_value(generation));
            }
        }
        self.unclosed.set(gauge_value(h.unclosed.len() as u64));
    }
}
