//! The measuring and fault-injecting tools of the `cotal` binary, as library modules it calls:
//!
//! - [`bench`](mod@bench): `cotal bench`, end-to-end durable fan-out throughput and latency (and, with
//!   `--memory`, the daemon's resident memory) against a real nats-server;
//! - [`chaos`]: `cotal chaos`, seeded daemon and nats-server faults while messages flow and
//!   members come and go, then every member's copies checked against its membership intervals.
//!
//! Each has a clap `Args` struct ([`bench::BenchArgs`], [`chaos::ChaosArgs`]) that the binary
//! flattens into its subcommand, and an async entry ([`bench::bench`], [`chaos::chaos`]) that
//! prints its report on stdout and returns the process exit code. They are here, not in the
//! binary, so that a tool reads as a module of the driver with its own tests; they still assume
//! they run inside `cotal`: the child processes they start are the running executable (`cotal
//! delivery …` for a daemon, the hidden `cotal bench-agents …` for `cotal bench --agent-procs`).
//!
//! [`progress`] shows their progress as an `indicatif` bar when stderr is a terminal, and
//! nothing more when it is not (bench keeps its plain progress line there, as before).
//!
//! [`bench::SpawnedServer`] (a nats-server on a free loopback port, killed on drop) is also what
//! `cotal demo --spawn-server` starts. [`fail`] and [`usage`] are the binary's one-line error
//! exits, shared with the tools.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod bench;
pub mod chaos;
pub mod progress;

/// `--json` was given: [`fail`] and [`usage`] print their line as a JSON object.
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);

/// From now on [`fail`] and [`usage`] print `{"error":"…"}` (one JSON line on stdout) instead
/// of `cotal: error: …`, so that a script reading a `--json` command's stdout always parses it.
/// The exit codes stay the same.
pub fn json_errors(on: bool) {
    JSON_ERRORS.store(on, Ordering::Relaxed);
}

fn error_line(msg: impl std::fmt::Display) {
    if JSON_ERRORS.load(Ordering::Relaxed) {
        println!("{}", serde_json::json!({ "error": msg.to_string() }));
    } else {
        println!("cotal: error: {msg}");
    }
}

/// A runtime error (unreachable server, refused permission, a failed run …): one line
/// `cotal: error: …` on stdout (`{"error":"…"}` after [`json_errors`]), exit code 1.
pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    error_line(msg);
    ExitCode::from(1)
}

/// Bad usage found after parsing (an `--id` the credential contradicts, a filter that cannot
/// match): one line as [`fail`] prints it, exit code 2.
pub fn usage(msg: impl std::fmt::Display) -> ExitCode {
    error_line(msg);
    ExitCode::from(2)
}
