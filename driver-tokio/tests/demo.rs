//! The demo script on the simulator and on a real nats-server (skipped when `COTAL_NATS_SERVER`
//! is unset): the same agents surface the same messages.

mod common;

use common::NatsServer;
use cotal_driver_tokio::demo::{DemoOptions, run, texts_of};
use std::collections::BTreeMap;

/// Texts by agent and source class (`live or durable` vs `backfill`), sorted.
fn figures(
    received: &[(String, Vec<cotal_driver_sim::demo::Received>)],
) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    received
        .iter()
        .map(|(agent, got)| {
            let mut history: Vec<String> = got
                .iter()
                .filter(|r| r.source == "backfill")
                .map(|r| format!("{} (life {})", r.text, r.life))
                .collect();
            history.sort();
            (agent.clone(), (texts_of(received, agent), history))
        })
        .collect()
}

/// One scripted scenario (the demo's) through the simulator and through a real server: every
/// agent surfaces the same set of messages, live/durable and history alike, and both verdicts
/// are clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_script_surfaces_the_same_messages_on_the_simulator_and_the_real_broker() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let sim = cotal_driver_sim::demo::run(7);
    assert!(sim.clean(), "{sim}");
    let real = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        run(&server.config(), &DemoOptions::default()),
    )
    .await
    .expect("the demo finishes within 90 s")
    .expect("the demo runs");
    assert!(real.clean(), "{real}");
    assert_eq!(real.messages, sim.messages, "{real}");
    let (sim_figures, real_figures) = (figures(&sim.received), figures(&real.received));
    assert_eq!(
        sim_figures, real_figures,
        "simulator:\n{sim}\nreal server:\n{real}"
    );
    // The script implies these counts (not a tautology: the sim and the server could both drift).
    let counts: Vec<(String, usize, usize)> = real_figures
        .iter()
        .map(|(a, (now, history))| (a.clone(), now.len(), history.len()))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("alice".to_owned(), 7, 0),
            ("bob".to_owned(), 10, 5),
            ("carol".to_owned(), 4, 2),
            ("dave".to_owned(), 7, 2),
        ],
        "{real}"
    );
    // The durable post made while dave's connection was cut reached him after it came back.
    assert!(
        real.received
            .iter()
            .any(|(a, got)| a == "dave" && got.iter().any(|r| r.text == "carol post 9 on ops")),
        "{real}"
    );
    // Nothing past carol's leave of #ops (posts 6 and 7) surfaced live to her.
    assert!(
        !texts_of(&real.received, "carol")
            .iter()
            .any(|t| t.starts_with("alice post 6") || t.starts_with("dave post 7")),
        "{real}"
    );
}
