//! A durable consumer: appends every message of a channel to a file as one JSON line, and
//! acknowledges it only once the line is on disk. A message whose id the file already holds
//! (a redelivery, or the history a restart backfills) is acknowledged without a second line.
//!
//! `cargo run -p cotal-driver-tokio --example file_sink -- [SPACE] [ID] [CHANNEL] [FILE]` against
//! the server in `NATS_URL` (default `nats://127.0.0.1:4222`), after `cotal up --space SPACE
//! --default-class durable` and the agent's ACL record (`cotal provision agent --id ID --read
//! CHANNEL --apply`) with a `cotal delivery` running: what is posted while it is down reaches it
//! through its durable copies when it comes back.

use cotal_driver_tokio::{Agent, AgentOptions, ConnectConfig};
use futures::StreamExt;
use std::collections::HashSet;
use std::future::Future;
use std::io::Write;
use std::path::Path;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Consumes until `stop` resolves; returns how many lines it wrote.
pub async fn file_sink(
    connect: ConnectConfig,
    options: AgentOptions,
    path: &Path,
    stop: impl Future<Output = ()>,
) -> Result<u64, Error> {
    // The ids already written: the file is the record of what was handled.
    let mut seen = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            seen.insert(v["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let agent = Agent::connect(&connect, options).await?;
    let mut messages = agent.messages();
    let mut written = 0;
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            () = &mut stop => break,
            m = messages.next() => match m { Some(m) => m, None => break },
        };
        if seen.insert(message.id().to_owned()) {
            writeln!(file, "{}", message.to_json())?;
            file.sync_data()?;
            written += 1;
        }
        // Only now, with the line on disk, is the durable copy acknowledged.
        message.handled().await?;
    }
    agent.close().await?;
    Ok(written)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let arg = |i: usize, default: &str| std::env::args().nth(i).unwrap_or(default.to_owned());
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let options = AgentOptions::new(arg(1, "demo"), arg(2, "sink")).join(arg(3, "general"));
    let path = arg(4, "messages.jsonl");
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let written = file_sink(ConnectConfig::new([url]), options, Path::new(&path), stop).await?;
    println!("wrote {written} line(s) to {path}");
    Ok(())
}
