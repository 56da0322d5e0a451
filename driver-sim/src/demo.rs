//! The demo mesh: a small scripted run on the simulator that shows what each agent received and
//! the oracle's verdict (`cotal-sim demo`, and the `cotal demo` of the tokio binary).
//!
//! Four agents (alice, bob, carol, dave) on `lobby` (live) and `ops` (durable), with the delivery
//! daemon when the build has one. The script: boot joins, posts on both channels with a mention,
//! a runtime join, a leave and a rejoin, a restart of an agent (a fresh process, same id), a
//! connection loss during which a durable post reaches the offline agent through the daemon, and
//! an out-of-ACL join that the broker refuses. No random faults: the run is
//! the same for a seed on every machine, and the seed only moves the scheduler's choices.

use crate::explore::default_daemons;
use crate::mesh::{AGENT_NAMES, Action, Mesh, MeshConfig, Step, Workload, default_channels};
use crate::oracle::Violation;
use cotal_core::ledger::SourceKind;
use cotal_core::time::Instant;
use std::fmt;

/// One message as an agent received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// When (simulated milliseconds).
    pub at_ms: u64,
    /// The receiving process's life (0 first; +1 per restart).
    pub life: u32,
    /// The channel.
    pub channel: String,
    /// The sender.
    pub from: String,
    /// How it came: `live`, `backfill` or `durable`.
    pub source: String,
    /// The message text.
    pub text: String,
}

/// What the demo did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoReport {
    /// The seed.
    pub seed: u64,
    /// Delivery daemons that served the mesh.
    pub daemons: usize,
    /// What each agent received, by agent name.
    pub received: Vec<(String, Vec<Received>)>,
    /// Messages stored in CHAT.
    pub messages: u64,
    /// The oracle's verdict: `None` when clean.
    pub violation: Option<Violation>,
    /// The run's transcript hash.
    pub hash: u64,
}

impl DemoReport {
    /// True when the oracle found nothing.
    pub fn clean(&self) -> bool {
        self.violation.is_none()
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cotal demo on the simulator (seed {}, {} delivery daemon{}): {} messages posted",
            self.seed,
            self.daemons,
            if self.daemons == 1 { "" } else { "s" },
            self.messages
        )?;
        for (agent, got) in &self.received {
            writeln!(f, "\n{agent} received {}:", got.len())?;
            for r in got {
                let life = if r.life == 0 {
                    String::new()
                } else {
                    format!(" (after restart #{})", r.life)
                };
                writeln!(
                    f,
                    "  {:>6} ms  #{:<7} {:<6} via {:<8} {:?}{life}",
                    r.at_ms, r.channel, r.from, r.source, r.text
                )?;
            }
        }
        match &self.violation {
            None => writeln!(
                f,
                "\noracle: clean (transcript hash {:016x}; replay is bit-for-bit)",
                self.hash
            ),
            Some(v) => writeln!(f, "\noracle: VIOLATION {v}"),
        }
    }
}

fn at(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

/// The demo's workload: channel 0 is `lobby` (live), 1 `ops` (durable), 3 `secret`.
pub fn workload() -> Workload {
    let (lobby, ops, secret) = (0, 1, 3);
    let (alice, bob, carol, dave) = (0, 1, 2, 3);
    let post = |agent, channel, mention| Action::Post {
        agent,
        channel,
        mention,
    };
    let steps = vec![
        (500, post(alice, lobby, None)),
        (600, post(bob, ops, Some(carol))),
        (700, post(carol, ops, None)),
        (
            900,
            Action::Join {
                agent: dave,
                channel: ops,
            },
        ),
        (
            1_000,
            Action::Join {
                agent: bob,
                channel: secret,
            },
        ),
        (1_500, post(alice, ops, None)),
        (1_600, post(dave, lobby, Some(alice))),
        (
            2_000,
            Action::Leave {
                agent: carol,
                channel: ops,
            },
        ),
        (2_300, post(alice, ops, None)),
        (2_500, Action::Restart { agent: bob }),
        (2_700, post(dave, ops, None)),
        (
            3_000,
            Action::Join {
                agent: carol,
                channel: ops,
            },
        ),
        (3_500, post(alice, ops, Some(carol))),
        (3_600, Action::Lose { agent: dave }),
        (3_602, post(carol, ops, None)),
        (3_700, post(carol, lobby, None)),
        (4_500, post(bob, ops, None)),
        (5_000, post(alice, lobby, None)),
    ];
    Workload {
        // alice, bob, carol: lobby and ops at boot; dave: lobby only.
        boot: vec![vec![lobby, ops], vec![lobby, ops], vec![ops], vec![lobby]],
        // Nobody but alice may read `secret`.
        acl: vec![
            vec![0, 1, 2, 3],
            vec![0, 1, 2],
            vec![0, 1, 2],
            vec![0, 1, 2],
        ],
        steps: steps
            .into_iter()
            .map(|(ms, action)| Step { at: at(ms), action })
            .collect(),
    }
}

/// Runs the demo mesh with `seed` and reports what each agent received and the oracle's verdict.
pub fn run(seed: u64) -> DemoReport {
    let mut config = MeshConfig::new(seed);
    config.agents = 4;
    config.channels = default_channels();
    config.daemons = default_daemons();
    let mut mesh = Mesh::new(config, workload());
    let report = mesh.run();
    let journal = mesh.journal();
    let texts = mesh_texts(&mesh);
    let received = (0..mesh.agents().len())
        .map(|i| {
            let got = journal
                .surfacings
                .iter()
                .filter(|s| s.agent == i)
                .map(|s| Received {
                    at_ms: s.at.as_millis(),
                    life: s.life,
                    channel: s.channel.clone().unwrap_or_default(),
                    from: s.from.clone(),
                    source: match s.origin {
                        SourceKind::Live => "live",
                        SourceKind::Backfill => "backfill",
                        _ => "durable",
                    }
                    .to_owned(),
                    text: texts.get(&s.id).cloned().unwrap_or_default(),
                })
                .collect();
            (AGENT_NAMES[i].to_owned(), got)
        })
        .collect();
    DemoReport {
        seed,
        daemons: mesh.config().daemons,
        received,
        messages: report.messages,
        violation: report.violation,
        hash: report.hash,
    }
}

fn mesh_texts(mesh: &Mesh) -> std::collections::BTreeMap<String, String> {
    use cotal_core::wire::config::SpaceStream;
    use cotal_core::wire::json;
    use cotal_core::wire::message::{CotalMessage, Part};
    let mut out = std::collections::BTreeMap::new();
    let stream = SpaceStream::Chat.name(mesh.space());
    let Ok(state) = mesh.host().broker().stream_state(&stream) else {
        return out;
    };
    for seq in state.first_seq..=state.last_seq {
        let Ok(Some(m)) = mesh.host().broker().message(&stream, seq) else {
            continue;
        };
        let Ok(msg) = json::decode::<CotalMessage>(&m.payload) else {
            continue;
        };
        let text = msg
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mentions = if msg.mentions.is_empty() {
            String::new()
        } else {
            format!(" @{}", msg.mentions.join(" @"))
        };
        out.insert(msg.id, format!("{text}{mentions}"));
    }
    out
}
