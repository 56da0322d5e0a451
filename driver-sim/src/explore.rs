//! Seed exploration, replay, determinism checks and shrinking, shared by `cotal-sim` and the
//! tests.
//!
//! A run is a function of a [`RunSpec`]: the seed (which derives the mesh size, the ACLs, the boot
//! channels, the workload and every scheduler choice), the number of workload steps, the fault
//! families switched on, the number of daemons, a [`Mutation`], and what a shrinker took away
//! (workload steps, agents, mentions). [`RunSpec::replay_args`] prints the arguments that
//! reproduce it.
//!
//! # Shrinking
//!
//! [`shrink`] only ever removes things from the run the seed generates, so a shrunk spec replays
//! bit for bit from its arguments. In order, while the same invariant still fails:
//!
//! 1. fault families (a run with fewer faults is easier to read);
//! 2. agents: the mesh keeps only its first `k` agents (the smallest `k` that still fails), with
//!    every step of the others dropped and mentions of them removed;
//! 3. workload steps: halves, then smaller chunks, then one at a time;
//! 4. mentions: a post that mentions someone becomes a plain post.

use crate::mesh::{Action, Mesh, MeshConfig, Mutation, RunReport, Workload};
use crate::sched::FaultConfig;
use std::collections::BTreeSet;
use std::fmt;

/// One fault family of [`FaultConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Core messages dropped.
    Drop,
    /// Connection losses (each client, about every 20 s).
    Loss,
    /// Slow consumers.
    Slow,
    /// KV write conflicts.
    Kv,
    /// Effects whose answers are lost.
    Ambiguous,
}

impl Fault {
    /// Every family.
    pub const ALL: [Fault; 5] = [
        Fault::Drop,
        Fault::Loss,
        Fault::Slow,
        Fault::Kv,
        Fault::Ambiguous,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Loss => "loss",
            Fault::Slow => "slow",
            Fault::Kv => "kv",
            Fault::Ambiguous => "ambiguous",
        }
    }
}

/// A set of fault families, or `swarm`: a subset drawn from each seed (design rule R28).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultSet(pub BTreeSet<Fault>, pub bool);

impl FaultSet {
    /// The families of a seed: the set itself, or for `swarm` each family with probability 1/2.
    pub fn for_seed(&self, seed: u64) -> BTreeSet<Fault> {
        if !self.1 {
            return self.0.clone();
        }
        let mut rng = crate::sched::Rng::new(seed ^ 0x7377_6172_6d00_0005);
        Fault::ALL
            .into_iter()
            .filter(|_| rng.below(2) == 0)
            .collect()
    }

    /// Every family.
    pub fn all() -> Self {
        FaultSet(Fault::ALL.into_iter().collect(), false)
    }

    /// `none`, `all`, or a comma-separated list of `drop,loss,slow,kv,ambiguous`.
    ///
    /// # Errors
    ///
    /// The unknown name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" | "" => return Ok(FaultSet::default()),
            "all" => return Ok(FaultSet::all()),
            "swarm" => return Ok(FaultSet(BTreeSet::new(), true)),
            _ => {}
        }
        let mut set = BTreeSet::new();
        for part in s.split(',') {
            let f = Fault::ALL
                .into_iter()
                .find(|f| f.name() == part)
                .ok_or_else(|| {
                    format!("unknown fault {part:?} (drop, loss, slow, kv, ambiguous)")
                })?;
            set.insert(f);
        }
        Ok(FaultSet(set, false))
    }

    /// The fault config of a seed: [`FaultConfig::chaos`] rates for the families in the set.
    pub fn config(&self, seed: u64) -> FaultConfig {
        let chaos = FaultConfig::chaos();
        let mut c = FaultConfig::default();
        for f in &self.for_seed(seed) {
            match f {
                Fault::Drop => c.core_drop_ppm = chaos.core_drop_ppm,
                Fault::Loss => c.connection_loss_every = chaos.connection_loss_every,
                Fault::Slow => c.slow_consumer_ppm = chaos.slow_consumer_ppm,
                Fault::Kv => c.kv_conflict_ppm = chaos.kv_conflict_ppm,
                Fault::Ambiguous => c.ambiguous_ppm = chaos.ambiguous_ppm,
            }
        }
        c
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            return f.write_str("swarm");
        }
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|f| f.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// Everything one run depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// The seed.
    pub seed: u64,
    /// Workload steps generated.
    pub steps: usize,
    /// Fault families.
    pub faults: FaultSet,
    /// Delivery daemons.
    pub daemons: usize,
    /// A fix switched off.
    pub mutation: Mutation,
    /// Indices of generated steps dropped (by the shrinker).
    pub skip: BTreeSet<usize>,
    /// Keep only the first this many agents (`None`: the seed's count). Steps of the others are
    /// dropped and mentions of them removed (by the shrinker).
    pub agents: Option<usize>,
    /// Indices of generated post steps whose mention is removed (by the shrinker).
    pub plain: BTreeSet<usize>,
}

/// The agent a workload action is about, if any.
fn action_agent(action: &Action) -> Option<usize> {
    match *action {
        Action::Join { agent, .. }
        | Action::Leave { agent, .. }
        | Action::Post { agent, .. }
        | Action::Narrow { agent, .. }
        | Action::Restart { agent }
        | Action::Lose { agent }
        | Action::Away { agent, .. } => Some(agent),
        Action::RestartDaemon { .. }
        | Action::LoseDaemon { .. }
        | Action::FreezeHolder { .. }
        | Action::CutHolder { .. } => None,
    }
}

impl RunSpec {
    /// A spec with `steps` steps, every fault, the default daemon count, no mutation.
    pub fn new(seed: u64, steps: usize, faults: FaultSet) -> Self {
        RunSpec {
            seed,
            steps,
            faults,
            daemons: default_daemons(),
            mutation: Mutation::None,
            skip: BTreeSet::new(),
            agents: None,
            plain: BTreeSet::new(),
        }
    }

    /// How many agents the run has: the seed's count, or fewer after shrinking.
    pub fn agent_count(&self) -> usize {
        let seeded = MeshConfig::new(self.seed).agents;
        self.agents.map_or(seeded, |k| k.min(seeded))
    }

    /// How many workload steps the run plays (generated, minus those skipped or of dropped
    /// agents).
    pub fn live_steps(&self) -> usize {
        self.build(false).1.steps.len()
    }

    /// The mesh config of the seed before any shrinking (what the workload is generated from).
    fn build_config(&self) -> MeshConfig {
        let mut config = MeshConfig::new(self.seed).with_faults(self.faults.config(self.seed));
        config.daemons = self.daemons;
        config
    }

    /// The mesh config and workload of this spec.
    pub fn build(&self, keep_transcript: bool) -> (MeshConfig, Workload) {
        let mut config = self.build_config();
        config.mutation = self.mutation;
        config.keep_transcript = keep_transcript;
        // Generated with the seed's agent count, so a shrunk spec removes from the same workload.
        let mut workload = Workload::generate(self.seed, &config, self.steps);
        let keep = self.agent_count();
        let steps = std::mem::take(&mut workload.steps);
        workload.steps = steps
            .into_iter()
            .enumerate()
            .filter(|(i, step)| {
                !self.skip.contains(i) && action_agent(&step.action).is_none_or(|a| a < keep)
            })
            .map(|(i, mut step)| {
                if let Action::Post { mention, .. } = &mut step.action
                    && (self.plain.contains(&i) || mention.is_some_and(|m| m >= keep))
                {
                    *mention = None;
                }
                step
            })
            .collect();
        if keep < config.agents {
            config.agents = keep;
            workload.acl.truncate(keep);
            workload.boot.truncate(keep);
        }
        (config, workload)
    }

    /// Runs it.
    pub fn run(&self, keep_transcript: bool) -> (RunReport, Mesh) {
        let (config, workload) = self.build(keep_transcript);
        let mut mesh = Mesh::new(config, workload);
        let report = mesh.run();
        (report, mesh)
    }

    /// The `cotal-sim` arguments that reproduce this run.
    pub fn replay_args(&self) -> String {
        let mut s = format!(
            "replay --seed {} --steps {} --faults {} --daemons {}",
            self.seed, self.steps, self.faults, self.daemons
        );
        if self.mutation != Mutation::None {
            s.push_str(&format!(" --mutation {}", self.mutation.name()));
        }
        if !self.skip.is_empty() {
            s.push_str(&format!(" --skip {}", ranges(&self.skip)));
        }
        if let Some(k) = self.agents {
            s.push_str(&format!(" --agents {k}"));
        }
        if !self.plain.is_empty() {
            s.push_str(&format!(" --plain {}", ranges(&self.plain)));
        }
        s
    }
}

/// How many delivery daemons a mesh runs by default.
pub fn default_daemons() -> usize {
    1
}

/// Runs the same spec twice and compares transcript hashes.
pub fn check_determinism(spec: &RunSpec) -> (u64, u64) {
    let (a, _) = spec.run(false);
    let (b, _) = spec.run(false);
    (a.hash, b.hash)
}

/// Shrinks a failing spec while some violation of the same invariant persists (see the module
/// docs for the reductions and their order). Bounded by `budget` runs.
pub fn shrink(spec: &RunSpec, invariant: &str, budget: usize) -> RunSpec {
    let mut best = spec.clone();
    let mut runs = 0;
    let fails = |s: &RunSpec, runs: &mut usize| {
        *runs += 1;
        let (r, _) = s.run(false);
        r.violation.is_some_and(|v| v.invariant == invariant)
    };
    // Fault families first: a run with fewer faults is easier to read.
    if best.faults.1 {
        best.faults = FaultSet(best.faults.for_seed(best.seed), false);
    }
    for f in Fault::ALL {
        if runs >= budget || !best.faults.0.contains(&f) {
            continue;
        }
        let mut candidate = best.clone();
        candidate.faults.0.remove(&f);
        if fails(&candidate, &mut runs) {
            best = candidate;
        }
    }
    // Fewer agents: the smallest prefix of the agents that still fails.
    let count = best.agent_count();
    for k in 1..count {
        if runs >= budget {
            break;
        }
        let mut candidate = best.clone();
        candidate.agents = Some(k);
        if fails(&candidate, &mut runs) {
            best = candidate;
            break;
        }
    }
    let mut chunk = spec.steps.div_ceil(2).max(1);
    while chunk >= 1 && runs < budget {
        let live: Vec<usize> = (0..best.steps).filter(|i| !best.skip.contains(i)).collect();
        let mut progressed = false;
        for window in live.chunks(chunk) {
            if runs >= budget {
                break;
            }
            let mut candidate = best.clone();
            candidate.skip.extend(window.iter().copied());
            if fails(&candidate, &mut runs) {
                best = candidate;
                progressed = true;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    // Plain posts: drop each remaining mention.
    let keep = best.agent_count();
    let generated = Workload::generate(best.seed, &best.build_config(), best.steps);
    let mentioned: Vec<usize> = generated
        .steps
        .iter()
        .enumerate()
        .filter(|(i, step)| {
            !best.skip.contains(i)
                && !best.plain.contains(i)
                && matches!(step.action, Action::Post { agent, mention: Some(m), .. } if agent < keep && m < keep)
        })
        .map(|(i, _)| i)
        .collect();
    for i in mentioned {
        if runs >= budget {
            break;
        }
        let mut candidate = best.clone();
        candidate.plain.insert(i);
        if fails(&candidate, &mut runs) {
            best = candidate;
        }
    }
    best
}

/// `1,2,3,5,7,8` as `1-3,5,7-8`.
pub fn ranges(set: &BTreeSet<usize>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// Parses what [`ranges`] writes.
///
/// # Errors
///
/// The entry that is not a number or a range.
pub fn parse_ranges(s: &str) -> Result<BTreeSet<usize>, String> {
    let mut set = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad --skip entry {part:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                set.extend(a..=b);
            }
            None => {
                set.insert(part.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(set)
}
