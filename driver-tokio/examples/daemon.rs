//! A delivery daemon for one shard of a space: starts, reports its status every ten seconds, and
//! releases its lease on Ctrl-C.
//!
//! `cargo run -p cotal-driver-tokio --example daemon -- [SPACE] [DAEMON_ID]` against the server
//! in `NATS_URL` (default `nats://127.0.0.1:4222`), after `cotal up --space SPACE`.

use cotal_core::delivery::daemon::DeliveryConfig;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::Space;
use cotal_driver_tokio::app::DaemonStopped;
use cotal_driver_tokio::{ConnectConfig, DeliveryDaemon};
use std::future::Future;
use std::time::Duration;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs the daemon of shard 0 of 1 until `stop` resolves; `on_active` is called once it serves.
pub async fn daemon(
    connect: ConnectConfig,
    space: &str,
    id: &str,
    every: Duration,
    on_active: impl FnOnce(),
    stop: impl Future<Output = ()>,
) -> Result<DaemonStopped, Error> {
    let config = DeliveryConfig::new(Space::new(space)?, ShardMap::SINGLE.shard(0)?, id);
    let daemon = DeliveryDaemon::start(&connect, config).await?;
    daemon.wait_active(Duration::from_secs(30)).await?;
    on_active();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {
                let s = daemon.status().await?;
                println!("{}: {} copies written, {} lost", s.health, s.counters.copies_written, s.counters.lost);
            }
        }
    }
    Ok(daemon.shutdown().await?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let arg = |i: usize, default: &str| std::env::args().nth(i).unwrap_or(default.to_owned());
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let (space, id) = (arg(1, "demo"), arg(2, "d1"));
    let every = Duration::from_secs(10);
    let active = || println!("active");
    let stopped = daemon(ConnectConfig::new([url]), &space, &id, every, active, stop).await?;
    println!(
        "stopped: lease released {}, {} copies written",
        stopped.lease_released, stopped.counters.copies_written
    );
    Ok(())
}
