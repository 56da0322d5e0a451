//! [`Agent`]: one Cotal agent on its own connection, every request awaited.

use super::message::{Messages, messages};
use super::outcome::{AgentClosed, CloseError, JoinError, LeaveError, Left, SendError, Sent};
use super::shared::{Events, StartError, Subscribers, check_provisioned, lock};
use crate::connect::{Auth, ConnectConfig};
use crate::exec::{Executor, ExecutorConfig};
use crate::run::{MachineHandle, Runner, os_key, os_seed};
use cotal_core::agent::{
    Agent as CoreAgent, AgentConfig, AgentError, AgentEvent, AgentHealth,
    JoinError as CoreJoinError, JoinReport, LeaveError as CoreLeaveError, RequestId,
};
use cotal_core::time::Now;
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::token::{AgentId, Channel, Role, Space};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How an [`Agent`] is set up: who it is, where, and what it does at start.
///
/// Names are plain strings, checked by [`Agent::connect`] (a bad one is
/// [`StartError::Invalid`], and nothing starts).
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The space.
    pub space: String,
    /// The agent's id: the `from.id` of what it sends, its DLV / `dm_<id>` consumers, and its
    /// inbox prefix `_INBOX_<id>` (unless the connect config sets one). In a secured space, the
    /// credential's identity.
    pub id: String,
    /// Display name (default: the id).
    pub name: Option<String>,
    /// Channels joined at start; [`Agent::connect`] waits for each one's result
    /// ([`Agent::boot_joins`]).
    pub channels: Vec<String>,
    /// Anycast roles served (one `svc_<role>` consumer each); the first is also the `from.role`
    /// of what it sends.
    pub roles: Vec<String>,
    /// Use the durable backstop (durable joins, the DLV consumer). Default on; off is live-only.
    pub durable_backstop: bool,
    /// Create the DLV, `dm_<id>` and `svc_<role>` consumers when missing. `None` (default):
    /// yes without authentication (open mode), no with credentials (the provisioner creates
    /// them).
    pub create_consumers: Option<bool>,
    /// How long [`Agent::connect`] waits for the agent to be ready (connected, the channel
    /// registry loaded) and for the boot joins' results.
    pub ready_timeout: Duration,
    /// Whether [`Agent::connect`] waits for that at all (default yes). Without the wait, a
    /// request made before the agent is ready is refused with [`AgentError::NotReady`]; its
    /// [`AgentEvent::Connected`] says when it is.
    pub wait_ready: bool,
    /// How long a request (join, leave, send) waits for its outcome before it resolves as
    /// unknown.
    pub request_timeout: Duration,
    /// How long [`Agent::close`] waits for the offline presence and the work in flight.
    pub close_grace: Duration,
}

impl AgentOptions {
    /// Options with the defaults: durable backstop on, no boot channel, no role, 10 s to be
    /// ready, 30 s per request, 3 s of close grace.
    pub fn new(space: impl Into<String>, id: impl Into<String>) -> Self {
        AgentOptions {
            space: space.into(),
            id: id.into(),
            name: None,
            channels: Vec::new(),
            roles: Vec::new(),
            durable_backstop: true,
            create_consumers: None,
            ready_timeout: Duration::from_secs(10),
            wait_ready: true,
            request_timeout: Duration::from_secs(30),
            close_grace: Duration::from_secs(3),
        }
    }

    /// Adds a channel to join at start.
    #[must_use]
    pub fn join(mut self, channel: impl Into<String>) -> Self {
        self.channels.push(channel.into());
        self
    }

    /// Adds an anycast role to serve.
    #[must_use]
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.roles.push(role.into());
        self
    }

    /// Sets the display name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// No durable backstop: live delivery only.
    #[must_use]
    pub fn live_only(mut self) -> Self {
        self.durable_backstop = false;
        self
    }

    /// The core's config: every name checked, the id key from the OS.
    pub(crate) fn agent_config(&self, open_mode: bool) -> Result<AgentConfig, StartError> {
        let space =
            Space::new(self.space.as_str()).map_err(|e| invalid("space", &self.space, e))?;
        let id = AgentId::new(self.id.as_str()).map_err(|e| invalid("agent id", &self.id, e))?;
        let roles = self
            .roles
            .iter()
            .map(|r| Role::new(r.as_str()).map_err(|e| invalid("role", r, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let channels = self
            .channels
            .iter()
            .map(|c| Channel::new(c.as_str()).map_err(|e| invalid("channel", c, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let name = self.name.clone().unwrap_or_else(|| self.id.clone());
        let mut me = Sender::new(id, name);
        me.role = roles.first().map(|r| r.as_str().to_owned());
        let create = self.create_consumers.unwrap_or(open_mode);
        let mut config = AgentConfig::new(space, me, channels, os_seed());
        config.id_key = Some(os_key());
        config.durable_backstop = self.durable_backstop;
        config.create_dlv_consumer = create;
        config.unicast = true;
        config.roles = roles;
        config.create_direct_consumers = create;
        Ok(config)
    }
}

fn invalid(what: &'static str, value: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Invalid {
        what,
        value: value.to_owned(),
        reason: e.to_string(),
    }
}

type Reply<T> = oneshot::Sender<T>;

/// What the dispatcher and the handles share.
struct Shared {
    joins: HashMap<RequestId, Reply<Result<JoinReport, CoreJoinError>>>,
    leaves: HashMap<RequestId, Reply<Result<Option<u64>, CoreLeaveError>>>,
    sends: HashMap<RequestId, Reply<Result<Sent, SendError>>>,
    subscribers: Subscribers<AgentEvent>,
    /// The results of the boot channels' joins (request `None`), first of each channel.
    boot: Vec<(Channel, Result<JoinReport, CoreJoinError>)>,
    /// Connected and ready at least once.
    ready: bool,
    /// The runner ended.
    closed: bool,
    /// The machine's health when the runner ended (`None` if its task failed).
    last_health: Option<AgentHealth>,
}

struct Inner {
    handle: MachineHandle<CoreAgent>,
    shared: Arc<Mutex<Shared>>,
    /// Bumped by the dispatcher after every event and at the end.
    state: watch::Receiver<u64>,
    /// Bumped at every `MessagesReady`.
    ready: watch::Receiver<u64>,
    id: AgentId,
    space: Space,
    request_timeout: Duration,
    close_grace: Duration,
    /// The agent's connection, for reads the machine does not make (the MCP server's roster).
    client: async_nats::Client,
}

impl Drop for Inner {
    /// The last handle dropped without [`Agent::close`]: stop the agent all the same (offline
    /// presence, best effort), so its task does not run on unowned.
    fn drop(&mut self) {
        let _ = self.handle.stop(self.close_grace);
    }
}

/// Where a [`Agent::resend`] goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    /// A post to this concrete channel.
    Channel(String),
    /// A DM to this agent.
    Agent(String),
    /// A task for this role.
    Role(String),
}

/// A running Cotal agent: cheap to clone, every clone the same agent.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use cotal_driver_tokio::{Agent, AgentOptions, ConnectConfig};
/// use futures::StreamExt;
///
/// let agent = Agent::connect(
///     &ConnectConfig::new(["nats://127.0.0.1:4222"]),
///     AgentOptions::new("demo", "alice").join("general"),
/// )
/// .await?;
/// let sent = agent.send("general", "hello").await?;
/// println!("stored as {} at sequence {}", sent.id, sent.seq);
/// let mut messages = agent.messages();
/// if let Some(m) = messages.next().await {
///     println!("{}: {}", m.from(), m.text());
///     m.handled().await?;
/// }
/// agent.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("space", &self.inner.space.as_str())
            .field("id", &self.inner.id.as_str())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Connects, checks the space is provisioned, starts the agent, and waits until it is ready
    /// and every boot channel's join has a result (within [`AgentOptions::ready_timeout`]).
    ///
    /// The connection's inbox prefix is `_INBOX_<id>` unless `connect` sets one; its name
    /// `cotal-agent-<id>` unless it has one.
    ///
    /// # Errors
    ///
    /// [`StartError`]: a bad name (nothing started), the connection, a space not provisioned, or
    /// not ready in time (the agent is stopped again).
    pub async fn connect(
        connect: &ConnectConfig,
        options: AgentOptions,
    ) -> Result<Agent, StartError> {
        Agent::connect_with_events(connect, options)
            .await
            .map(|(agent, _)| agent)
    }

    /// [`Agent::connect`], and the agent's [`Agent::events`] from its very first one (its
    /// `Connected`, its boot channels' `Joined` …), which a stream asked for after the connect
    /// may miss.
    ///
    /// # Errors
    ///
    /// As [`Agent::connect`].
    pub async fn connect_with_events(
        connect: &ConnectConfig,
        options: AgentOptions,
    ) -> Result<(Agent, Events<AgentEvent>), StartError> {
        let open_mode = matches!(connect.auth, Auth::None);
        let config = options.agent_config(open_mode)?;
        let mut connect_config = connect.clone();
        if connect_config.inbox_prefix.is_none() {
            connect_config.inbox_prefix = Some(config.me.id.inbox_prefix());
        }
        if connect_config.name.is_none() {
            connect_config.name = Some(format!("cotal-agent-{}", config.me.id.as_str()));
        }
        let conn = crate::connect::connect(&connect_config).await?;
        check_provisioned(&conn, &config.space, connect_config.request_timeout).await?;
        let id = config.me.id.clone();
        let space = config.space.clone();
        let boot = config.channels.clone();
        let machine = CoreAgent::new(config).map_err(|e| StartError::Config(format!("{e:?}")))?;
        let exec_config = ExecutorConfig {
            api_timeout: connect_config.request_timeout,
            ..ExecutorConfig::default()
        };
        let client = conn.client.clone();
        let (executor, inputs) = Executor::start(conn, exec_config);
        let Runner {
            handle,
            events,
            task,
        } = Runner::spawn(machine, executor, inputs);
        let mut subscribers = Subscribers::new();
        let first_events = subscribers.subscribe();
        let shared = Arc::new(Mutex::new(Shared {
            joins: HashMap::new(),
            leaves: HashMap::new(),
            sends: HashMap::new(),
            subscribers,
            boot: Vec::new(),
            ready: false,
            closed: false,
            last_health: None,
        }));
        let (state_tx, state) = watch::channel(0u64);
        let (ready_tx, ready) = watch::channel(0u64);
        tokio::spawn(dispatch(events, task, shared.clone(), state_tx, ready_tx));
        let agent = Agent {
            inner: Arc::new(Inner {
                handle,
                shared,
                state,
                ready,
                id,
                space,
                request_timeout: options.request_timeout,
                close_grace: options.close_grace,
                client,
            }),
        };
        if !options.wait_ready {
            return Ok((agent, first_events));
        }
        let deadline = Instant::now() + options.ready_timeout;
        let started = agent
            .wait_state(deadline, |s| {
                s.closed || (s.ready && boot.iter().all(|c| s.boot.iter().any(|(b, _)| b == c)))
            })
            .await;
        if !started || lock(&agent.inner.shared).closed {
            let _ = agent.close().await;
            return Err(StartError::NotReady(options.ready_timeout));
        }
        Ok((agent, first_events))
    }

    /// Waits until `done` holds of the shared state, or `deadline`. True when it holds.
    async fn wait_state(&self, deadline: Instant, done: impl Fn(&Shared) -> bool) -> bool {
        let mut state = self.inner.state.clone();
        loop {
            state.borrow_and_update();
            if done(&lock(&self.inner.shared)) {
                return true;
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                // The dispatcher ended: the state is final.
                Ok(Err(_)) => return done(&lock(&self.inner.shared)),
                Err(_) => return false,
            }
        }
    }

    /// The agent's id.
    pub fn id(&self) -> &AgentId {
        &self.inner.id
    }

    /// The space.
    pub fn space(&self) -> &Space {
        &self.inner.space
    }

    /// The agent's NATS connection (its inbox prefix `_INBOX_<id>`), for reads of its own.
    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The results of the joins of [`AgentOptions::channels`], in the order they completed.
    pub fn boot_joins(&self) -> Vec<(Channel, Result<JoinReport, CoreJoinError>)> {
        lock(&self.inner.shared).boot.clone()
    }

    /// Waits for a request's outcome within the request timeout; `forget` removes its waiter
    /// when none came.
    async fn outcome<T>(
        &self,
        rx: oneshot::Receiver<T>,
        forget: impl FnOnce(&mut Shared),
    ) -> Result<T, Waited> {
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(Waited::Closed),
            Err(_) => {
                forget(&mut lock(&self.inner.shared));
                Err(Waited::Timeout(format!(
                    "no outcome within {:?}",
                    self.inner.request_timeout
                )))
            }
        }
    }

    /// Joins `channel` (a concrete name or a pattern such as `team.>`): the core's
    /// [`JoinReport`] (joined, durable, generation, backfilled, reason …). Joining a joined
    /// channel reports `joined: false`.
    ///
    /// # Errors
    ///
    /// [`JoinError`]: a bad name, a refusal (nothing changed), a failure, an unknown outcome, or
    /// a closed agent.
    pub async fn join(&self, channel: &str) -> Result<JoinReport, JoinError> {
        let ch = Channel::new(channel).map_err(|e| JoinError::InvalidChannel {
            channel: channel.to_owned(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let request = self
            .inner
            .handle
            .call(move |a, now| {
                let request = a.join(now, ch)?;
                lock(&shared).joins.insert(request, tx);
                Ok::<_, AgentError>(request)
            })
            .await
            .map_err(|_| JoinError::Closed)?
            .map_err(JoinError::Refused)?;
        match self.outcome(rx, |s| drop(s.joins.remove(&request))).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) => Err(JoinError::Failed(e)),
            Err(Waited::Closed) => Err(JoinError::Closed),
            Err(Waited::Timeout(detail)) => Err(JoinError::Unknown { detail }),
        }
    }

    /// Leaves `channel`; a durable membership is tombstoned.
    ///
    /// # Errors
    ///
    /// [`LeaveError`]: a bad name, a refusal (not joined, busy: nothing changed), a failure (the
    /// channel stays joined), an unknown outcome, or a closed agent.
    pub async fn leave(&self, channel: &str) -> Result<Left, LeaveError> {
        let ch = Channel::new(channel).map_err(|e| LeaveError::InvalidChannel {
            channel: channel.to_owned(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let request = self
            .inner
            .handle
            .call(move |a, now| {
                let request = a.leave(now, &ch)?;
                lock(&shared).leaves.insert(request, tx);
                Ok::<_, AgentError>(request)
            })
            .await
            .map_err(|_| LeaveError::Closed)?
            .map_err(LeaveError::Refused)?;
        match self.outcome(rx, |s| drop(s.leaves.remove(&request))).await {
            Ok(Ok(tombstoned)) => Ok(Left { tombstoned }),
            Ok(Err(CoreLeaveError::TombstoneUnknown)) => Err(LeaveError::Unknown {
                detail: CoreLeaveError::TombstoneUnknown.to_string(),
            }),
            Ok(Err(e)) => Err(LeaveError::Failed(e)),
            Err(Waited::Closed) => Err(LeaveError::Closed),
            Err(Waited::Timeout(detail)) => Err(LeaveError::Unknown { detail }),
        }
    }

    /// Posts `text` to a concrete channel.
    ///
    /// # Errors
    ///
    /// [`SendError`]: a bad channel name (nothing sent), a refusal, the stream's refusal, an
    /// unknown outcome, or a closed agent.
    pub async fn send(&self, channel: &str, text: impl Into<String>) -> Result<Sent, SendError> {
        self.send_parts(channel, vec![Part::text(text.into())], &[])
            .await
    }

    /// Posts `parts` with `mentions` to a concrete channel.
    ///
    /// # Errors
    ///
    /// As [`Agent::send`].
    pub async fn send_parts(
        &self,
        channel: &str,
        parts: Vec<Part>,
        mentions: &[String],
    ) -> Result<Sent, SendError> {
        let ch = Channel::new(channel).map_err(|e| send_invalid("channel", channel, e))?;
        let mentions = mentions.to_vec();
        self.publish(move |a, now| a.send(now, &ch, parts, &mentions))
            .await
    }

    /// Sends `text` to the one agent `to` (a DM, read by its `dm_<to>` consumer).
    ///
    /// # Errors
    ///
    /// As [`Agent::send`] (a bad agent id).
    pub async fn send_dm(&self, to: &str, text: impl Into<String>) -> Result<Sent, SendError> {
        let to = AgentId::new(to).map_err(|e| send_invalid("agent id", to, e))?;
        let parts = vec![Part::text(text.into())];
        self.publish(move |a, now| a.send_dm(now, &to, parts)).await
    }

    /// Sends `text` as a task to `role`: exactly one agent serving the role takes it.
    ///
    /// # Errors
    ///
    /// As [`Agent::send`] (a bad role).
    pub async fn send_anycast(
        &self,
        role: &str,
        text: impl Into<String>,
    ) -> Result<Sent, SendError> {
        let role = Role::new(role).map_err(|e| send_invalid("role", role, e))?;
        let parts = vec![Part::text(text.into())];
        self.publish(move |a, now| a.send_anycast(now, &role, parts))
            .await
    }

    /// Sends `parts` to `to` once more under the id `id` of an earlier send: after
    /// [`SendError::Unknown`], this is how to make sure it is stored exactly once (the stream's
    /// duplicate window drops a second copy and the answer says `duplicate: true`).
    ///
    /// # Errors
    ///
    /// As [`Agent::send`].
    pub async fn resend(&self, to: To, parts: Vec<Part>, id: &str) -> Result<Sent, SendError> {
        let id = id.to_owned();
        match to {
            To::Channel(channel) => {
                let ch = Channel::new(channel.as_str())
                    .map_err(|e| send_invalid("channel", &channel, e))?;
                self.publish(move |a, now| {
                    a.send_with_id(now, &ch, parts, &[], id.clone())
                        .map(|r| (r, id))
                })
                .await
            }
            To::Agent(agent) => {
                let to = AgentId::new(agent.as_str())
                    .map_err(|e| send_invalid("agent id", &agent, e))?;
                self.publish(move |a, now| {
                    a.send_dm_with_id(now, &to, parts, id.clone())
                        .map(|r| (r, id))
                })
                .await
            }
            To::Role(role) => {
                let r = Role::new(role.as_str()).map_err(|e| send_invalid("role", &role, e))?;
                self.publish(move |a, now| {
                    a.send_anycast_with_id(now, &r, parts, id.clone())
                        .map(|req| (req, id))
                })
                .await
            }
        }
    }

    async fn publish<F>(&self, send: F) -> Result<Sent, SendError>
    where
        F: FnOnce(&mut CoreAgent, Now) -> Result<(RequestId, String), AgentError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let (request, id) = self
            .inner
            .handle
            .call(move |a, now| {
                let (request, id) = send(a, now)?;
                lock(&shared).sends.insert(request, tx);
                Ok::<_, AgentError>((request, id))
            })
            .await
            .map_err(|_| SendError::Closed)?
            .map_err(SendError::Refused)?;
        match self.outcome(rx, |s| drop(s.sends.remove(&request))).await {
            Ok(result) => result,
            // The agent went away with the publish in flight: stored or not, nobody knows.
            Err(Waited::Closed) => Err(SendError::Unknown {
                id,
                detail: "the agent closed before the outcome".to_owned(),
            }),
            Err(Waited::Timeout(detail)) => Err(SendError::Unknown { id, detail }),
        }
    }

    /// The surfaced messages, oldest first, each to be acknowledged with [`Message::handled`](super::Message::handled)
    /// (or [`Message::decline`](super::Message::decline)) once the application is done with it: only then is its
    /// durable copy acked. Several streams share the messages (each message goes to one). The
    /// stream ends when the agent closes.
    pub fn messages(&self) -> Messages {
        messages(self.inner.handle.clone(), self.inner.ready.clone())
    }
    /// Every event of the agent from now on ([`AgentEvent`]: joins, leaves, sends, losses,
    /// refusals, backstop changes, connection changes …), in order. Ends when the agent closes.
    pub fn events(&self) -> Events<AgentEvent> {
        lock(&self.inner.shared).subscribers.subscribe()
    }

    /// The agent's health: ready, channels (live, backstop), consumers, counters, losses.
    ///
    /// # Errors
    ///
    /// [`AgentClosed`].
    pub async fn health(&self) -> Result<AgentHealth, AgentClosed> {
        self.inner.handle.health().await.map_err(|_| AgentClosed)
    }

    /// Stops the agent: publishes its offline presence, closes its feeds and waits (within the
    /// close grace) for that and the commands in flight; memberships stay (a relaunch resumes
    /// them). Returns the agent's last health. Every clone is closed; closing again returns the
    /// same health.
    ///
    /// # Errors
    ///
    /// [`CloseError`]: the task did not end in time, or failed.
    pub async fn close(&self) -> Result<AgentHealth, CloseError> {
        let _ = self.inner.handle.stop(self.inner.close_grace);
        let bound = self.inner.close_grace + Duration::from_secs(2);
        if !self.wait_state(Instant::now() + bound, |s| s.closed).await {
            return Err(CloseError::Timeout(bound));
        }
        lock(&self.inner.shared)
            .last_health
            .clone()
            .ok_or(CloseError::Lost)
    }
}

fn send_invalid(what: &'static str, value: &str, e: impl std::fmt::Display) -> SendError {
    SendError::Invalid {
        what,
        value: value.to_owned(),
        reason: e.to_string(),
    }
}

enum Waited {
    Closed,
    Timeout(String),
}

/// Reads the runner's events: completes the requests they answer, wakes the message streams,
/// hands each event to the subscribers; at the end, keeps the machine's last health.
async fn dispatch(
    mut events: tokio::sync::mpsc::UnboundedReceiver<AgentEvent>,
    task: tokio::task::JoinHandle<CoreAgent>,
    shared: Arc<Mutex<Shared>>,
    state: watch::Sender<u64>,
    ready: watch::Sender<u64>,
) {
    while let Some(event) = events.recv().await {
        {
            let mut s = lock(&shared);
            match &event {
                AgentEvent::Connected { .. } => s.ready = true,
                AgentEvent::Joined {
                    request: Some(r),
                    report,
                    ..
                } => {
                    if let Some(tx) = s.joins.remove(r) {
                        let _ = tx.send(Ok(report.clone()));
                    }
                }
                AgentEvent::JoinFailed {
                    request: Some(r),
                    error,
                    ..
                } => {
                    if let Some(tx) = s.joins.remove(r) {
                        let _ = tx.send(Err(error.clone()));
                    }
                }
                AgentEvent::Joined {
                    request: None,
                    channel,
                    report,
                } => boot_result(&mut s, channel, Ok(report.clone())),
                AgentEvent::JoinFailed {
                    request: None,
                    channel,
                    error,
                } => boot_result(&mut s, channel, Err(error.clone())),
                AgentEvent::Left {
                    request,
                    tombstoned,
                    ..
                } => {
                    if let Some(tx) = s.leaves.remove(request) {
                        let _ = tx.send(Ok(*tombstoned));
                    }
                }
                AgentEvent::LeaveFailed { request, error, .. } => {
                    if let Some(tx) = s.leaves.remove(request) {
                        let _ = tx.send(Err(error.clone()));
                    }
                }
                AgentEvent::Sent {
                    request,
                    id,
                    seq,
                    duplicate,
                } => {
                    if let Some(tx) = s.sends.remove(request) {
                        let _ = tx.send(Ok(Sent {
                            id: id.clone(),
                            seq: *seq,
                            duplicate: *duplicate,
                        }));
                    }
                }
                AgentEvent::SendFailed {
                    request,
                    id,
                    error,
                    unknown,
                } => {
                    if let Some(tx) = s.sends.remove(request) {
                        let (id, detail) = (id.clone(), error.clone());
                        let _ = tx.send(Err(if *unknown {
                            SendError::Unknown { id, detail }
                        } else {
                            SendError::Failed { id, detail }
                        }));
                    }
                }
                AgentEvent::MessagesReady { .. } => ready.send_modify(|n| *n += 1),
                _ => {}
            }
            s.subscribers.publish(&event);
        }
        state.send_modify(|n| *n += 1);
    }
    // The runner ended: every waiter resolves as closed (its sender dropped), every stream ends.
    let last = task.await.ok().map(|a| a.health());
    {
        let mut s = lock(&shared);
        s.joins.clear();
        s.leaves.clear();
        s.sends.clear();
        s.subscribers.close();
        s.closed = true;
        s.last_health = last;
    }
    state.send_modify(|n| *n += 1);
}

fn boot_result(s: &mut Shared, channel: &Channel, result: Result<JoinReport, CoreJoinError>) {
    if !s.boot.iter().any(|(c, _)| c == channel) {
        s.boot.push((channel.clone(), result));
    }
}
