//! [`DeliveryDaemon`]: one shard's delivery daemon on its own connection.

use super::shared::{Events, StartError, Subscribers, check_provisioned, lock};
use crate::connect::ConnectConfig;
use crate::exec::{Executor, ExecutorConfig};
use crate::run::{MachineHandle, Runner};
use cotal_core::delivery::daemon::{
    Delivery, DeliveryConfig, DeliveryCounters, DeliveryEvent, DeliveryHealth,
};
use cotal_core::delivery::lease::{LeaseEvent, LeaseState};
use cotal_core::io::Input;
use cotal_core::wire::token::AgentId;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The daemon's health surface and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStatus {
    /// Active, or degraded with its reasons.
    pub health: DeliveryHealth,
    /// Copies written, transferred, lost, dropped …
    pub counters: DeliveryCounters,
    /// Every feed open and control requests served.
    pub serving: bool,
    /// The lease machine's state (acquiring, held, ready, lost, released …).
    pub lease: LeaseState,
}

/// How a daemon ended ([`DeliveryDaemon::shutdown`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStopped {
    /// Its last health.
    pub health: DeliveryHealth,
    /// Its last counters.
    pub counters: DeliveryCounters,
    /// The lease release was confirmed (`false`: skipped, a successor's lease is never deleted;
    /// or unanswered within the grace, and the lease expires by its TTL).
    pub lease_released: bool,
    /// The lease was lost while it ran.
    pub lease_lost: bool,
}

/// A daemon call that did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The daemon has stopped (shut down, or its task ended).
    #[error("the delivery daemon has stopped")]
    Stopped,
    /// Not active within the time given; its last status.
    #[error("not active within {within:?}: {}", status.health)]
    NotActive {
        /// The time waited.
        within: Duration,
        /// Its status then.
        status: Box<DaemonStatus>,
    },
    /// Its task did not end within the grace and a margin.
    #[error("the delivery daemon did not stop within {0:?}")]
    Timeout(Duration),
    /// Its task ended without its machine (it panicked).
    #[error("the delivery daemon's task failed")]
    Lost,
}

struct Shared {
    subscribers: Subscribers<DeliveryEvent>,
    released: bool,
    lease_lost: bool,
    closed: bool,
    last: Option<DaemonStatus>,
}

/// A running delivery daemon (one shard of one space). Not cloneable: one owner shuts it down.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use cotal_core::delivery::daemon::DeliveryConfig;
/// use cotal_core::wire::shard::ShardMap;
/// use cotal_core::wire::token::Space;
/// use cotal_driver_tokio::{ConnectConfig, DeliveryDaemon};
/// use std::time::Duration;
///
/// let config = DeliveryConfig::new(Space::new("demo")?, ShardMap::SINGLE.shard(0)?, "d1");
/// let daemon = DeliveryDaemon::start(&ConnectConfig::new(["nats://127.0.0.1:4222"]), config).await?;
/// daemon.wait_active(Duration::from_secs(10)).await?;
/// // … serve until told to stop …
/// let stopped = daemon.shutdown().await?;
/// println!("{} copies written", stopped.counters.copies_written);
/// # Ok(())
/// # }
/// ```
pub struct DeliveryDaemon {
    handle: MachineHandle<Delivery>,
    shared: Arc<Mutex<Shared>>,
    state: watch::Receiver<u64>,
    grace: Duration,
    id: String,
}

impl std::fmt::Debug for DeliveryDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryDaemon")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl DeliveryDaemon {
    /// Connects, checks the space is provisioned and starts the daemon; it then acquires its
    /// shard's lease and opens its feeds ([`DeliveryDaemon::wait_active`] waits for that).
    ///
    /// The connection's inbox prefix is `_INBOX_<daemon id>` unless `connect` sets one (or the id
    /// is not a valid agent id); its name `cotal-delivery-<id>` unless it has one.
    ///
    /// # Errors
    ///
    /// [`StartError`]: the connection, or a space not provisioned.
    pub async fn start(
        connect: &ConnectConfig,
        config: DeliveryConfig,
    ) -> Result<DeliveryDaemon, StartError> {
        DeliveryDaemon::start_with_events(connect, config)
            .await
            .map(|(daemon, _)| daemon)
    }

    /// [`DeliveryDaemon::start`], and the daemon's [`DeliveryDaemon::events`] from its very
    /// first one (its lease acquisition, its first health changes), which a stream asked for
    /// after the start may miss.
    ///
    /// # Errors
    ///
    /// As [`DeliveryDaemon::start`].
    pub async fn start_with_events(
        connect: &ConnectConfig,
        config: DeliveryConfig,
    ) -> Result<(DeliveryDaemon, Events<DeliveryEvent>), StartError> {
        DeliveryDaemon::start_tapped(connect, config, None).await
    }

    /// [`DeliveryDaemon::start_with_events`], with `tap` called on every input of the daemon's
    /// machine (each message, delivery and completion the connection brings) before the machine
    /// sees it: for instrumentation, such as the latency of a control request
    /// ([`DaemonMetrics::input`](crate::metrics::DaemonMetrics::input)). Keep it quick: it runs
    /// on the input path. `None`: no tap, and no extra hop.
    ///
    /// # Errors
    ///
    /// As [`DeliveryDaemon::start`].
    pub async fn start_tapped(
        connect: &ConnectConfig,
        config: DeliveryConfig,
        tap: Option<InputTap>,
    ) -> Result<(DeliveryDaemon, Events<DeliveryEvent>), StartError> {
        let mut connect_config = connect.clone();
        if connect_config.inbox_prefix.is_none() {
            connect_config.inbox_prefix = AgentId::new(config.daemon_id.as_str())
                .ok()
                .map(|id| id.inbox_prefix());
        }
        if connect_config.name.is_none() {
            connect_config.name = Some(format!("cotal-delivery-{}", config.daemon_id));
        }
        let conn = crate::connect::connect(&connect_config).await?;
        check_provisioned(&conn, &config.space, connect_config.request_timeout).await?;
        let id = config.daemon_id.clone();
        let exec_config = ExecutorConfig {
            api_timeout: connect_config.request_timeout,
            ..ExecutorConfig::default()
        };
        let (executor, inputs) = Executor::start(conn, exec_config);
        let inputs = match tap {
            None => inputs,
            Some(tap) => tapped(inputs, tap),
        };
        let Runner {
            handle,
            events,
            task,
        } = Runner::spawn(Delivery::new(config), executor, inputs);
        let mut subscribers = Subscribers::new();
        let first_events = subscribers.subscribe();
        let shared = Arc::new(Mutex::new(Shared {
            subscribers,
            released: false,
            lease_lost: false,
            closed: false,
            last: None,
        }));
        let (state_tx, state) = watch::channel(0u64);
        tokio::spawn(dispatch(events, task, shared.clone(), state_tx));
        let daemon = DeliveryDaemon {
            handle,
            shared,
            state,
            grace: Duration::from_secs(3),
            id,
        };
        Ok((daemon, first_events))
    }

    /// Sets how long [`DeliveryDaemon::shutdown`] waits for the lease release (default 3 s).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The daemon id (the lease holder).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The health, counters, serving and lease state now.
    ///
    /// # Errors
    ///
    /// [`DaemonError::Stopped`].
    pub async fn status(&self) -> Result<DaemonStatus, DaemonError> {
        self.monitor().status().await
    }

    /// A cloneable handle that reads [`DeliveryDaemon::status`] from elsewhere (a metrics
    /// endpoint, a health check) while the owner keeps the daemon.
    pub fn monitor(&self) -> DaemonMonitor {
        DaemonMonitor {
            handle: self.handle.clone(),
        }
    }

    /// Waits until the daemon is active (lease ready, every feed open) and serving.
    ///
    /// # Errors
    ///
    /// [`DaemonError::NotActive`] with its status after `within`; [`DaemonError::Stopped`].
    pub async fn wait_active(&self, within: Duration) -> Result<DaemonStatus, DaemonError> {
        let deadline = Instant::now() + within;
        let mut state = self.state.clone();
        loop {
            state.borrow_and_update();
            let status = self.status().await?;
            if status.health == DeliveryHealth::Active && status.serving {
                return Ok(status);
            }
            // A health change comes as an event; the serving flag may move without one, so
            // look again at least every 100 ms.
            let next = deadline.min(Instant::now() + Duration::from_millis(100));
            let _ = tokio::time::timeout_at(next, state.changed()).await;
            if Instant::now() >= deadline {
                return Err(DaemonError::NotActive {
                    within,
                    status: Box::new(status),
                });
            }
        }
    }

    /// Every event of the daemon from now on ([`DeliveryEvent`]: lease, health, joins, losses,
    /// evictions …), in order. Ends when the daemon stops.
    pub fn events(&self) -> Events<DeliveryEvent> {
        lock(&self.shared).subscribers.subscribe()
    }

    /// Shuts down: closes the feeds, releases the lease (never a successor's), and waits for the
    /// release within the grace. Returns the last health and counters.
    ///
    /// # Errors
    ///
    /// [`DaemonError::Timeout`] or [`DaemonError::Lost`].
    pub async fn shutdown(self) -> Result<DaemonStopped, DaemonError> {
        let _ = self.handle.shutdown(self.grace);
        let bound = self.grace + Duration::from_secs(2);
        let deadline = Instant::now() + bound;
        let mut state = self.state.clone();
        loop {
            state.borrow_and_update();
            if lock(&self.shared).closed {
                break;
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => return Err(DaemonError::Timeout(bound)),
            }
        }
        let s = lock(&self.shared);
        let last = s.last.clone().ok_or(DaemonError::Lost)?;
        Ok(DaemonStopped {
            health: last.health,
            counters: last.counters,
            lease_released: s.released,
            lease_lost: s.lease_lost,
        })
    }
}

/// Called on every input of a daemon's machine ([`DeliveryDaemon::start_tapped`]).
pub type InputTap = Box<dyn Fn(&Input) + Send + Sync>;

/// Forwards `inputs` to the returned receiver, calling `tap` on each first.
fn tapped(
    mut inputs: tokio::sync::mpsc::UnboundedReceiver<Input>,
    tap: InputTap,
) -> tokio::sync::mpsc::UnboundedReceiver<Input> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            tap(&input);
            if tx.send(input).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads a running daemon's status ([`DeliveryDaemon::monitor`]); cloneable. Once the daemon
/// has stopped, every read is [`DaemonError::Stopped`].
#[derive(Clone, Debug)]
pub struct DaemonMonitor {
    handle: MachineHandle<Delivery>,
}

impl DaemonMonitor {
    /// [`DeliveryDaemon::status`].
    ///
    /// # Errors
    ///
    /// [`DaemonError::Stopped`].
    pub async fn status(&self) -> Result<DaemonStatus, DaemonError> {
        self.handle
            .call(|d, _| DaemonStatus {
                health: d.health().clone(),
                counters: d.counters().clone(),
                serving: d.serving(),
                lease: d.lease_state(),
            })
            .await
            .map_err(|_| DaemonError::Stopped)
    }
}

impl Drop for DeliveryDaemon {
    /// Dropped without [`DeliveryDaemon::shutdown`]: shut down all the same (best effort).
    fn drop(&mut self) {
        let _ = self.handle.shutdown(self.grace);
    }
}

async fn dispatch(
    mut events: tokio::sync::mpsc::UnboundedReceiver<DeliveryEvent>,
    task: tokio::task::JoinHandle<Delivery>,
    shared: Arc<Mutex<Shared>>,
    state: watch::Sender<u64>,
) {
    while let Some(event) = events.recv().await {
        {
            let mut s = lock(&shared);
            match &event {
                DeliveryEvent::Lease(LeaseEvent::Released) => s.released = true,
                DeliveryEvent::Lease(LeaseEvent::Lost { .. }) => s.lease_lost = true,
                _ => {}
            }
            s.subscribers.publish(&event);
        }
        state.send_modify(|n| *n += 1);
    }
    let last = task.await.ok().map(|d| DaemonStatus {
        health: d.health().clone(),
        counters: d.counters().clone(),
        serving: d.serving(),
        lease: d.lease_state(),
    });
    {
        let mut s = lock(&shared);
        s.subscribers.close();
        s.closed = true;
        s.last = last;
    }
    state.send_modify(|n| *n += 1);
}
