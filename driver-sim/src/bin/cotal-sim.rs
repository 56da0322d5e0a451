//! `cotal-sim`: explore seeds, replay one, check determinism, or run the demo mesh.
//!
//! ```text
//! cotal-sim explore --seeds N [--start S] [--steps K] [--faults LIST|none|all] [--daemons D]
//!                   [--mutation no-join-cursor|reference-g2|reference-g10|reference-g23|no-dlv-sweep] [--no-shrink] [--check-determinism]
//! cotal-sim replay --seed S [--steps K] [--faults …] [--daemons D] [--skip I,J,…]
//!                  [--agents A] [--plain I,J,…]
//!                  [--mutation no-join-cursor|reference-g2|reference-g10|reference-g23|no-dlv-sweep] [--check-determinism]
//! cotal-sim demo [--seed S]
//! ```

#![allow(clippy::print_stderr)]

use cotal_driver_sim::explore::{
    FaultSet, RunSpec, check_determinism, default_daemons, parse_ranges, shrink,
};
use cotal_driver_sim::mesh::Mutation;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant as WallClock;

const USAGE: &str = "usage:
  cotal-sim explore --seeds N [--start S] [--steps K] [--faults LIST|none|all] [--daemons D]
                    [--mutation no-join-cursor|reference-g2|reference-g10|reference-g23|no-dlv-sweep] [--no-shrink] [--check-determinism]
  cotal-sim replay --seed S [--steps K] [--faults LIST|none|all] [--daemons D] [--skip I,J,...]
                   [--agents A] [--plain I,J,...]
                   [--mutation no-join-cursor|reference-g2|reference-g10|reference-g23|no-dlv-sweep] [--check-determinism]
  cotal-sim demo [--seed S]
faults: drop, loss, slow, kv, ambiguous (comma-separated), none, all, or swarm (a subset per seed)";

struct Args {
    command: String,
    values: BTreeMap<String, String>,
    flags: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("no command")?;
    let mut values = BTreeMap::new();
    let mut flags = Vec::new();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        match name {
            "no-shrink" | "check-determinism" => flags.push(name.to_owned()),
            "seeds" | "start" | "steps" | "faults" | "daemons" | "seed" | "skip" | "mutation"
            | "agents" | "plain" => {
                let v = it.next().ok_or(format!("--{name} needs a value"))?;
                values.insert(name.to_owned(), v);
            }
            _ => return Err(format!("unknown option --{name}")),
        }
    }
    Ok(Args {
        command,
        values,
        flags,
    })
}

impl Args {
    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name} wants a number, got {v:?}")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    fn spec(&self, seed: u64) -> Result<RunSpec, String> {
        let steps = self.num("steps", 40)? as usize;
        let faults = FaultSet::parse(self.values.get("faults").map_or("all", String::as_str))?;
        let mut spec = RunSpec::new(seed, steps, faults);
        spec.daemons = self.num("daemons", default_daemons() as u64)? as usize;
        spec.mutation = match self.values.get("mutation").map(String::as_str) {
            None => Mutation::None,
            Some(m) => Mutation::parse(m).ok_or_else(|| format!("unknown mutation {m:?}"))?,
        };
        if let Some(skip) = self.values.get("skip") {
            spec.skip = parse_ranges(skip)?;
        }
        if self.values.contains_key("agents") {
            spec.agents = Some(self.num("agents", 0)? as usize);
        }
        if let Some(plain) = self.values.get("plain") {
            spec.plain = parse_ranges(plain)?;
        }
        Ok(spec)
    }
}

fn determinism(spec: &RunSpec) -> bool {
    let (a, b) = check_determinism(spec);
    if a == b {
        println!(
            "seed {}: deterministic, transcript hash {a:016x}",
            spec.seed
        );
        true
    } else {
        println!(
            "seed {}: NOT deterministic: transcript hashes {a:016x} and {b:016x}",
            spec.seed
        );
        false
    }
}

fn explore(args: &Args) -> Result<ExitCode, String> {
    let seeds = args.num("seeds", 100)?;
    let start = args.num("start", 0)?;
    let started = WallClock::now();
    let mut messages = 0u64;
    let mut surfaced = 0u64;
    let mut probes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut last_progress = -1.0f64;
    for (i, seed) in (start..start.saturating_add(seeds)).enumerate() {
        let spec = args.spec(seed)?;
        if args.flag("check-determinism") && !determinism(&spec) {
            return Ok(ExitCode::FAILURE);
        }
        let (report, _) = spec.run(false);
        messages += report.messages;
        surfaced += report.surfaced;
        for (k, v) in &report.probes {
            *probes.entry(k).or_insert(0) += v;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let due = secs - last_progress >= 0.2 || i as u64 + 1 == seeds;
        if due || report.violation.is_some() {
            last_progress = secs;
            eprint!(
                "\rexplore: {}/{seeds} seeds  {:.1} seeds/s  {messages} messages ({:.0}/s)  {surfaced} surfaced  ",
                i + 1,
                (i + 1) as f64 / secs,
                messages as f64 / secs,
            );
            let _ = std::io::stderr().flush();
        }
        if let Some(v) = report.violation {
            eprintln!();
            println!("VIOLATION {v}");
            let mut spec = spec;
            if !args.flag("no-shrink") {
                let shrunk = shrink(&spec, v.invariant, 60);
                if shrunk != spec {
                    println!(
                        "shrunk: {} of {} steps kept, {} of {} agents, {} mentions removed, faults {}",
                        shrunk.live_steps(),
                        spec.live_steps(),
                        shrunk.agent_count(),
                        spec.agent_count(),
                        shrunk.plain.len(),
                        shrunk.faults
                    );
                    spec = shrunk;
                }
            }
            let (report, mesh) = spec.run(true);
            if let Some(v) = &report.violation {
                println!("violated: {} — {v}", v.invariant);
            }
            println!(
                "replay: cargo run --release -p cotal-driver-sim --bin cotal-sim -- {}",
                spec.replay_args()
            );
            println!("last 40 transcript lines:");
            let lines = mesh.host().transcript().lines();
            for l in &lines[lines.len().saturating_sub(40)..] {
                println!("  {l}");
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    eprintln!();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "explored {seeds} seeds from {start} in {secs:.2} s: {:.1} seeds/s, {messages} CHAT messages ({:.0} simulated messages/s), {surfaced} surfaced; no violation",
        seeds as f64 / secs,
        messages as f64 / secs
    );
    let probes: Vec<String> = probes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("coverage probes: {}", probes.join(" "));
    Ok(ExitCode::SUCCESS)
}

fn replay(args: &Args) -> Result<ExitCode, String> {
    let seed = args
        .values
        .get("seed")
        .ok_or("replay needs --seed")?
        .parse::<u64>()
        .map_err(|_| "--seed wants a number")?;
    let spec = args.spec(seed)?;
    if args.flag("check-determinism") {
        return Ok(if determinism(&spec) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let (report, mesh) = spec.run(true);
    for l in mesh.host().transcript().lines() {
        println!("{l}");
    }
    println!(
        "transcript hash {:016x}, {} host steps, {} CHAT messages, {} surfaced, ended at {} ms",
        report.hash,
        report.host_steps,
        report.messages,
        report.surfaced,
        report.end.as_millis()
    );
    match report.violation {
        Some(v) => {
            println!("VIOLATION {v}");
            Ok(ExitCode::FAILURE)
        }
        None => {
            println!("oracle: clean");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn demo(args: &Args) -> Result<ExitCode, String> {
    let seed = args.num("seed", 7)?;
    let report = cotal_driver_sim::demo::run(seed);
    print!("{report}");
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| match args.command.as_str() {
        "explore" => explore(&args),
        "replay" => replay(&args),
        "demo" => demo(&args),
        "--check-determinism" | "check-determinism" => {
            let spec = args.spec(args.num("seed", 0)?)?;
            Ok(if determinism(&spec) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}")),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cotal-sim: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
