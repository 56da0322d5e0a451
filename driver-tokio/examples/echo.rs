//! An echo agent: joins a channel and answers every message it gets with a DM to its sender.
//!
//! `cargo run -p cotal-driver-tokio --example echo -- [SPACE] [ID] [CHANNEL]` against the server
//! in `NATS_URL` (default `nats://127.0.0.1:4222`), after `cotal up --space SPACE`. Ctrl-C stops.

use cotal_driver_tokio::{Agent, AgentOptions, ConnectConfig};
use futures::StreamExt;
use std::future::Future;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Echoes until `stop` resolves, then closes the agent; returns how many messages it echoed.
pub async fn echo(
    connect: ConnectConfig,
    options: AgentOptions,
    stop: impl Future<Output = ()>,
) -> Result<u64, Error> {
    let agent = Agent::connect(&connect, options).await?;
    let mut messages = agent.messages();
    let mut echoed = 0;
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            () = &mut stop => break,
            m = messages.next() => match m { Some(m) => m, None => break },
        };
        let reply = format!("echo: {}", message.text());
        agent.send_dm(message.from(), reply).await?;
        message.handled().await?;
        echoed += 1;
    }
    agent.close().await?;
    Ok(echoed)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let arg = |i: usize, default: &str| std::env::args().nth(i).unwrap_or(default.to_owned());
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let options = AgentOptions::new(arg(1, "demo"), arg(2, "echo")).join(arg(3, "general"));
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let echoed = echo(ConnectConfig::new([url]), options, stop).await?;
    println!("echoed {echoed} message(s)");
    Ok(())
}
