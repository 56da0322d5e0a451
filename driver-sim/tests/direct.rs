//! Unicast (DM) and anycast (TASK) through the simulated server, with connection losses and
//! ambiguous answers: every DM Alice sends reaches Bob's application exactly once with kind `dm`;
//! every task reaches a reviewer with kind `anycast` (exactly one reviewer when nothing fails),
//! and the work queue `TASK` is empty at the end (each task acked by whoever handled it).
//!
//! The agents run as hosted machines under per-user permissions as `cotal provision agent --role`
//! mints them; the `dm_<id>` and `svc_reviewer` consumers are created by the provisioner (here:
//! the test, on the broker directly), the agents only bind them.

// Test helpers report through panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cotal_core::agent::{Agent, AgentConfig};
use cotal_core::io::{Command, Input, Machine};
use cotal_core::time::{Duration, Instant, Now};
use cotal_core::wire::config::{ConsumerSpec, SpaceStream};
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::{AgentId, Role, Space};
use cotal_driver_sim::host::{Host, HostedMachine};
use cotal_driver_sim::net::ClientId;
use cotal_driver_sim::sched::{FaultConfig, SimConfig};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// An agent and what its application saw (id, kind), handled at once.
struct Node {
    agent: Agent,
    now: Now,
    got: Vec<(String, DeliveryKind)>,
}

impl Node {
    fn pump(&mut self) {
        let items = self.agent.take_messages(self.now, 1000);
        for s in items {
            self.got.push((s.item.message.id.clone(), s.item.kind));
            self.agent
                .handled(self.now, &s.id)
                .expect("a surfaced id is pending");
        }
    }
}

struct Handle(Rc<RefCell<Node>>);

impl HostedMachine for Handle {
    fn handle_input(&mut self, now: Now, input: Input) {
        let mut n = self.0.borrow_mut();
        n.now = now;
        n.agent.handle_input(now, input);
        n.pump();
    }
    fn handle_timeout(&mut self, now: Now) {
        let mut n = self.0.borrow_mut();
        n.now = now;
        n.agent.handle_timeout(now);
        n.pump();
    }
    fn poll_command(&mut self) -> Option<Command> {
        self.0.borrow_mut().agent.poll_command()
    }
    fn poll_event_line(&mut self) -> Option<String> {
        let mut n = self.0.borrow_mut();
        n.pump();
        n.agent.poll_event().map(|e| format!("{e:?}"))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.0.borrow().agent.poll_timeout()
    }
}

fn space() -> Space {
    Space::new("sim").unwrap()
}

fn reviewer() -> Role {
    Role::new("reviewer").unwrap()
}

struct World {
    host: Host,
    nodes: BTreeMap<&'static str, (Rc<RefCell<Node>>, ClientId)>,
}

impl World {
    fn new(seed: u64, faults: Option<FaultConfig>) -> World {
        let mut config = SimConfig::new(seed);
        if let Some(f) = faults {
            config = config.with_faults(f, Instant::from_millis(30_000));
        }
        let mut host = Host::new(config, false);
        host.broker_mut()
            .provision(
                &cotal_core::wire::capacity::ConsumerBudget::default().space_config(&space()),
            )
            .unwrap();
        let mut world = World {
            host,
            nodes: BTreeMap::new(),
        };
        for (name, role) in [
            ("alice", None),
            ("bob", Some(reviewer())),
            ("carol", Some(reviewer())),
        ] {
            world.add(name, role);
        }
        world
    }

    fn add(&mut self, name: &'static str, role: Option<Role>) {
        let id = AgentId::new(name).unwrap();
        let broker = self.host.broker_mut();
        broker
            .add_consumer(ConsumerSpec::dm(&space(), &id))
            .unwrap();
        if let Some(r) = &role {
            // Both reviewers share the one work-queue consumer: created once.
            if broker
                .consumer_spec(&SpaceStream::Task.name(&space()), &format!("svc_{r}"))
                .is_none()
            {
                broker.add_consumer(ConsumerSpec::svc(&space(), r)).unwrap();
            }
        }
        let perms = Permissions::agent(
            &space(),
            &AgentPolicy {
                id: id.clone(),
                allow_subscribe: Vec::new(),
                allow_publish: Vec::new(),
                role: role.clone(),
                spawn: false,
            },
        );
        let mut me = Sender::new(id, name);
        me.role = role.as_ref().map(|r| r.as_str().to_owned());
        let mut config = AgentConfig::new(space(), me, Vec::new(), u64::from(name.as_bytes()[0]));
        config.durable_backstop = false;
        config.heartbeat = None;
        config.unicast = true;
        config.roles = role.into_iter().collect();
        let node = Rc::new(RefCell::new(Node {
            agent: Agent::new(config).unwrap(),
            now: self.host.now(),
            got: Vec::new(),
        }));
        let client = self
            .host
            .add_machine(name, perms, Box::new(Handle(Rc::clone(&node))));
        self.nodes.insert(name, (node, client));
    }

    fn got(&self, name: &str) -> Vec<(String, DeliveryKind)> {
        self.nodes[name].0.borrow().got.clone()
    }

    fn sent(&self, id: &str) -> bool {
        self.host
            .events()
            .iter()
            .any(|e| e.machine == "alice" && e.event.starts_with("Sent") && e.event.contains(id))
    }

    /// Alice sends (or resends, with the same id) one message; false while she is not connected.
    fn send(&mut self, id: &str, dm: bool) -> bool {
        let (node, client) = &self.nodes["alice"];
        let now = self.host.now();
        let result = {
            let mut n = node.borrow_mut();
            n.now = now;
            let parts = vec![Part::text(id)];
            if dm {
                n.agent
                    .send_dm_with_id(now, &AgentId::new("bob").unwrap(), parts, id.to_owned())
            } else {
                n.agent
                    .send_anycast_with_id(now, &reviewer(), parts, id.to_owned())
            }
        };
        let client = *client;
        self.host.drain_client(client);
        result.is_ok()
    }

    /// Sends `n` DMs and `n` tasks, one of each every 400 ms, and resends each whose publish was
    /// not confirmed until it is (the stream's msg-id window drops the repeats).
    fn run_workload(&mut self, n: usize) -> (Vec<String>, Vec<String>) {
        self.host.run_for(Duration::from_millis(500));
        let dms: Vec<String> = (0..n).map(|i| format!("dm-{i}")).collect();
        let tasks: Vec<String> = (0..n).map(|i| format!("task-{i}")).collect();
        for i in 0..n {
            self.send(&dms[i], true);
            self.send(&tasks[i], false);
            self.host.run_for(Duration::from_millis(400));
        }
        for _ in 0..200 {
            let missing: Vec<(String, bool)> = dms
                .iter()
                .map(|d| (d.clone(), true))
                .chain(tasks.iter().map(|t| (t.clone(), false)))
                .filter(|(id, _)| !self.sent(id))
                .collect();
            if missing.is_empty() {
                break;
            }
            for (id, dm) in missing {
                self.send(&id, dm);
            }
            self.host.run_for(Duration::from_millis(1_000));
        }
        // Past the fault phase and two ack waits: every redelivery has happened.
        self.host.run_for(Duration::from_millis(150_000));
        (dms, tasks)
    }

    fn task_stream_len(&self) -> u64 {
        self.host
            .broker()
            .stream_state(&SpaceStream::Task.name(&space()))
            .unwrap()
            .messages
    }
}

fn count(got: &[(String, DeliveryKind)], id: &str) -> usize {
    got.iter().filter(|(g, _)| g == id).count()
}

#[test]
fn dm_and_anycast_without_faults_reach_exactly_one_recipient() {
    let mut w = World::new(1, None);
    let (dms, tasks) = w.run_workload(10);
    let (bob, carol, alice) = (w.got("bob"), w.got("carol"), w.got("alice"));
    for d in &dms {
        assert_eq!(count(&bob, d), 1, "{d}: {bob:?}");
        assert_eq!(count(&carol, d), 0, "{d}");
    }
    assert!(
        bob.iter()
            .filter(|(id, _)| id.starts_with("dm-"))
            .all(|(_, k)| *k == DeliveryKind::Dm)
    );
    for t in &tasks {
        assert_eq!(
            count(&bob, t) + count(&carol, t),
            1,
            "{t}: bob {bob:?} carol {carol:?}"
        );
    }
    assert!(
        bob.iter()
            .chain(carol.iter())
            .filter(|(id, _)| id.starts_with("task-"))
            .all(|(_, k)| *k == DeliveryKind::Anycast)
    );
    assert!(alice.is_empty(), "{alice:?}");
    assert_eq!(w.task_stream_len(), 0, "every task acked and removed");
    for name in ["alice", "bob", "carol"] {
        let h = w.nodes[name].0.borrow().agent.health();
        assert!(h.direct.iter().all(|d| d.bound), "{name}: {:?}", h.direct);
        assert_eq!(h.counters.direct_bind_failures, 0, "{name}");
    }
}

#[test]
fn dm_and_anycast_survive_connection_losses_and_ambiguous_answers() {
    let faults = FaultConfig {
        connection_loss_every: Some(Duration::from_millis(3_000)),
        ambiguous_ppm: 50_000,
        ..FaultConfig::default()
    };
    let mut losses = 0;
    for seed in 0..6 {
        let mut w = World::new(seed, Some(faults.clone()));
        let (dms, tasks) = w.run_workload(12);
        let (bob, carol) = (w.got("bob"), w.got("carol"));
        for d in &dms {
            // Bob's process lives on across its connection losses: its one ledger surfaces each
            // DM once, however often it is redelivered.
            assert_eq!(count(&bob, d), 1, "seed {seed} {d}: {bob:?}");
        }
        for t in &tasks {
            // At least once across the reviewers: a task delivered to one reviewer whose ack was
            // lost with its connection is redelivered, possibly to the other (a work queue is
            // at-least-once across processes; each process surfaces it at most once).
            let (b, c) = (count(&bob, t), count(&carol, t));
            assert!(b + c >= 1, "seed {seed} {t} lost");
            assert!(b <= 1 && c <= 1, "seed {seed} {t}: bob {b} carol {c}");
        }
        assert_eq!(
            w.task_stream_len(),
            0,
            "seed {seed}: TASK still holds tasks"
        );
        for name in ["alice", "bob", "carol"] {
            let h = w.nodes[name].0.borrow().agent.health();
            assert!(
                h.direct.iter().all(|d| d.bound),
                "seed {seed} {name}: {:?}",
                h.direct
            );
            losses += h.counters.connection_losses;
        }
    }
    assert!(
        losses >= 6,
        "the faults did fire ({losses} connection losses)"
    );
}
