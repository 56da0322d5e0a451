//! The `cotal-sim` command line (clap derive), in the library so a test can parse the replay
//! arguments [`RunSpec::replay_args`] prints back into the same [`RunSpec`].
//!
//! ```text
//! cotal-sim explore --seeds N [--start S] [--steps K] [--faults LIST|none|all|swarm] [--daemons D]
//!                   [--mutation NAME] [--no-shrink] [--check-determinism]
//! cotal-sim replay --seed S [--steps K] [--faults …] [--daemons D] [--skip I,J,…]
//!                  [--agents A] [--plain I,J,…] [--mutation NAME] [--check-determinism]
//! cotal-sim demo [--seed S]
//! cotal-sim --check-determinism [--seed S] [run options]   (also `check-determinism`)
//! ```
//!
//! Every run option (`--steps`, `--faults`, `--daemons`, `--mutation`, `--skip`, `--agents`,
//! `--plain`) is accepted by `explore`, `replay` and `check-determinism`; a repeated option takes
//! its last value. Errors (unknown option, bad value, missing `--seed`) exit with code 2.

use crate::explore::{FaultSet, RunSpec, default_daemons, parse_ranges};
use crate::mesh::Mutation;
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeSet;

/// `cotal-sim`: explore seeds, replay one, check determinism, or run the demo mesh.
#[derive(Parser, Debug)]
#[command(
    name = "cotal-sim",
    arg_required_else_help = true,
    after_help = "faults: drop, loss, slow, kv, ambiguous (comma-separated), none, all, or swarm (a subset per seed)\nmutations: no-join-cursor, reference-g2, reference-g10, reference-g23, no-dlv-sweep, reference-g17"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// A `cotal-sim` command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run seeds in order; stop at the first violation, shrink it and print its replay command.
    #[command(args_override_self = true)]
    Explore {
        /// How many seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Report a violation as found, without shrinking it.
        #[arg(long)]
        no_shrink: bool,
        /// Run each seed twice first and fail when the transcript hashes differ.
        #[arg(long)]
        check_determinism: bool,
        /// The run options.
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run one seed and print its full transcript and the oracle's verdict.
    #[command(args_override_self = true)]
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Only run the seed twice and compare the transcript hashes.
        #[arg(long)]
        check_determinism: bool,
        /// The run options.
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run the demo mesh and print what each agent received and the verdict.
    #[command(args_override_self = true)]
    Demo {
        /// The seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Run one seed twice and compare the transcript hashes.
    #[command(long_flag = "check-determinism", args_override_self = true)]
    CheckDeterminism {
        /// The seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The run options.
        #[command(flatten)]
        run: RunArgs,
    },
}

/// The options of one run (everything in a [`RunSpec`] but the seed).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Workload steps generated per run.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Fault families: a comma-separated list of drop,loss,slow,kv,ambiguous, or none, all, swarm.
    #[arg(long, default_value = "all", value_parser = FaultSet::parse)]
    pub faults: FaultSet,
    /// Delivery daemons in the mesh.
    #[arg(long, default_value_t = default_daemons())]
    pub daemons: usize,
    /// A fix of the core switched off (see the list below; default none).
    #[arg(long, value_parser = parse_mutation)]
    pub mutation: Option<Mutation>,
    /// Workload steps dropped, as ranges (`1-3,5`; printed by the shrinker).
    #[arg(long, value_parser = parse_ranges)]
    pub skip: Option<BTreeSet<usize>>,
    /// Keep only the first this many agents (printed by the shrinker).
    #[arg(long)]
    pub agents: Option<usize>,
    /// Post steps whose mention is removed, as ranges (printed by the shrinker).
    #[arg(long, value_parser = parse_ranges)]
    pub plain: Option<BTreeSet<usize>>,
}

fn parse_mutation(s: &str) -> Result<Mutation, String> {
    Mutation::parse(s).ok_or_else(|| format!("unknown mutation {s:?}"))
}

impl RunArgs {
    /// The spec of `seed` with these options.
    pub fn spec(&self, seed: u64) -> RunSpec {
        let mut spec = RunSpec::new(seed, self.steps, self.faults.clone());
        spec.daemons = self.daemons;
        spec.mutation = self.mutation.unwrap_or(Mutation::None);
        if let Some(skip) = &self.skip {
            spec.skip = skip.clone();
        }
        spec.agents = self.agents;
        if let Some(plain) = &self.plain {
            spec.plain = plain.clone();
        }
        spec
    }
}
