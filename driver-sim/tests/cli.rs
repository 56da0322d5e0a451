//! The `cotal-sim` command line: help works, unknown options fail, and the replay arguments the
//! explorer prints parse back to the same run.

use clap::Parser as _;
use cotal_driver_sim::cli::{Cli, Command};
use cotal_driver_sim::explore::{FaultSet, RunSpec};
use cotal_driver_sim::mesh::Mutation;
use std::process::Command as Process;

fn cotal_sim(args: &[&str]) -> std::process::Output {
    Process::new(env!("CARGO_BIN_EXE_cotal-sim"))
        .args(args)
        .output()
        .expect("cotal-sim runs")
}

#[test]
fn help_succeeds() {
    for args in [
        &["--help"][..],
        &["explore", "--help"],
        &["replay", "--help"],
        &["demo", "--help"],
    ] {
        let out = cotal_sim(args);
        assert!(out.status.success(), "cotal-sim {args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage"), "cotal-sim {args:?}: {text}");
    }
}

/// Off a terminal (here a pipe, as in CI) `explore` shows no progress bar: its stderr is the
/// plain progress line rewritten in place, as before the bar, with no escape sequence.
#[test]
fn explore_progress_off_a_terminal_is_the_plain_line() {
    let out = cotal_sim(&["explore", "--seeds", "3"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("\rexplore: 1/3 seeds  "), "{stderr:?}");
    assert!(stderr.contains("\rexplore: 3/3 seeds  "), "{stderr:?}");
    assert!(stderr.ends_with("surfaced  \n"), "{stderr:?}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("explored 3 seeds from 0 in "),
        "{stdout}"
    );
}

#[test]
fn unknown_option_fails() {
    for args in [
        &["explore", "--bogus"][..],
        &["replay", "--seed", "1", "--bogus", "2"],
        &["replay"],
        &["explore", "--faults", "nosuch"],
        &["explore", "--mutation", "nosuch"],
        &[],
    ] {
        let out = cotal_sim(args);
        assert_eq!(out.status.code(), Some(2), "cotal-sim {args:?}: {out:?}");
    }
}

fn parse(line: &str) -> Cli {
    Cli::try_parse_from(std::iter::once("cotal-sim").chain(line.split_whitespace()))
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn replay_args_round_trip() {
    let mut spec = RunSpec::new(42, 17, FaultSet::parse("drop,kv").expect("faults"));
    spec.daemons = 3;
    spec.mutation = Mutation::ReferenceG2;
    spec.skip = [1, 2, 3, 9].into_iter().collect();
    spec.agents = Some(2);
    spec.plain = [4, 6].into_iter().collect();
    let plain = RunSpec::new(7, 40, FaultSet::parse("swarm").expect("swarm"));
    for spec in [spec, plain] {
        let line = spec.replay_args();
        let Command::Replay {
            seed,
            check_determinism,
            run,
        } = parse(&line).command
        else {
            panic!("{line}: not a replay");
        };
        assert!(!check_determinism);
        assert_eq!(run.spec(seed), spec, "{line}");
    }
}

#[test]
fn defaults_and_check_determinism_flag() {
    let Command::CheckDeterminism { seed, run } = parse("--check-determinism --seed 5").command
    else {
        panic!("not check-determinism");
    };
    assert_eq!(run.spec(seed), RunSpec::new(5, 40, FaultSet::all()));
    let Command::Explore { seeds, start, .. } = parse("explore").command else {
        panic!("not explore");
    };
    assert_eq!((seeds, start), (100, 0));
    let Command::Demo { seed } = parse("demo").command else {
        panic!("not demo");
    };
    assert_eq!(seed, 7);
}
