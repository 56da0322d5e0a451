//! The runner: one task that owns one [`Machine`] and drives it on tokio with an [`Executor`].
//!
//! A [`Runner`] is the driver loop of [`cotal_core::io::Machine`]'s docs made real:
//!
//! 1. every [`Input`] from the executor's channel is fed with [`Machine::handle_input`];
//! 2. every expired deadline is fed with [`Machine::handle_timeout`]: the core's
//!    [`Instant`](cotal_core::time::Instant) is milliseconds since the runner started, on
//!    [`tokio::time::Instant`], so a deadline `d` is the tokio instant `start + d ms`;
//! 3. after each step, [`Machine::poll_command`] is drained into the executor and
//!    [`Machine::poll_event`] into the event channel the host reads;
//! 4. the host's application calls (join, leave, send, handled for an agent; shutdown for a
//!    daemon) arrive through a [`MachineHandle`] as closures run on the loop, between two inputs:
//!    the host never touches the machine directly and never blocks the loop (every channel is
//!    unbounded; a call that wants an answer gets it through a oneshot).
//!
//! Expired deadlines are handled before anything else; inputs and host calls that are ready at
//! the same time are taken in random order (neither starves the other). A call made right after
//! [`Runner::spawn`] may therefore run before the first [`Input`] (`Connection::Restored`) and
//! find the machine not ready yet: a host waits for the machine's own "connected" event first.
//!
//! `Now { at, wall }` comes from tokio's clock (`at`, monotonic) and the system clock (`wall`).
//!
//! # Finishing
//!
//! [`MachineHandle::finish`] ends the loop: the commands already issued are handed to the
//! executor, then the loop keeps running until every answered command issued *after* the finish
//! began (an agent's offline presence, a daemon's lease release) has completed, or the grace runs
//! out. The machine is returned by the runner's join handle, so a host (or a test) can read its
//! final health and counters.
//!
//! The loop also ends when the executor stops (its input channel closes).

use crate::exec::Executor;
use cotal_core::agent::{Agent, AgentError, AgentHealth, RequestId};
use cotal_core::delivery::daemon::{Delivery, DeliveryCounters, DeliveryHealth};
use cotal_core::entropy::IdKey;
use cotal_core::io::{Input, Machine};
use cotal_core::ledger::{MessageId, Surfaced};
use cotal_core::op::OpId;
use cotal_core::time::{Instant as CoreInstant, Now, UnixMillis};
use cotal_core::wire::message::Part;
use cotal_core::wire::token::{AgentId, Channel, Role};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A call the host runs on the machine, inside the loop.
type Call<M> = Box<dyn FnOnce(&mut M, Now) + Send>;

enum Control<M> {
    Call(Call<M>),
    Finish {
        last: Option<Call<M>>,
        grace: Duration,
    },
}

/// The runner stopped: the call was not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the machine's runner has stopped")]
pub struct RunnerStopped;

/// The clock of one runner: the core's instants are milliseconds since `start`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// The current `Now`: tokio's monotonic clock and the system's wall clock.
    pub fn now(&self) -> Now {
        let at = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Now::new(CoreInstant::from_millis(at), wall_clock())
    }

    /// The tokio instant of a core deadline.
    pub fn deadline(&self, at: CoreInstant) -> Instant {
        self.start + Duration::from_millis(at.as_millis())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Milliseconds since the Unix epoch from the system clock (0 if the clock is before 1970).
pub fn wall_clock() -> UnixMillis {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    UnixMillis(ms)
}

/// 256 bits from the operating system's CSPRNG: the key of an agent's id generator
/// ([`AgentConfig::id_key`](cotal_core::agent::AgentConfig::id_key)), so no other agent can
/// predict its message ids (see `cotal_core::entropy`).
///
/// # Panics
///
/// When the OS has no randomness to give (`getrandom` fails): no id may be made then.
pub fn os_key() -> IdKey {
    let mut key = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut key) {
        panic!("the operating system gave no randomness for the id key: {e}");
    }
    IdKey(key)
}

/// 64 bits from the operating system's CSPRNG (passwords, names, tags). An agent's ids are
/// keyed by [`os_key`]; the `seed` this also fills is then unused.
///
/// # Panics
///
/// As [`os_key`].
pub fn os_seed() -> u64 {
    let key = os_key().0;
    u64::from_le_bytes([
        key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
    ])
}

/// The host's side of a running machine: calls into it, and the end of the run.
pub struct MachineHandle<M> {
    control: mpsc::UnboundedSender<Control<M>>,
}

impl<M> Clone for MachineHandle<M> {
    fn clone(&self) -> Self {
        MachineHandle {
            control: self.control.clone(),
        }
    }
}

impl<M> std::fmt::Debug for MachineHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineHandle")
            .field("closed", &self.control.is_closed())
            .finish()
    }
}

impl<M: Send + 'static> MachineHandle<M> {
    /// Runs `f` on the machine inside the loop and returns its result. The commands and events it
    /// causes are drained right after.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`] when the loop has ended (the call did not run).
    pub async fn call<R, F>(&self, f: F) -> Result<R, RunnerStopped>
    where
        R: Send + 'static,
        F: FnOnce(&mut M, Now) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let call: Call<M> = Box::new(move |m, now| {
            let _ = tx.send(f(m, now));
        });
        self.control
            .send(Control::Call(call))
            .map_err(|_| RunnerStopped)?;
        rx.await.map_err(|_| RunnerStopped)
    }

    /// Queues `f` without waiting for it (for callers that cannot await).
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`] when the loop has ended.
    pub fn cast<F>(&self, f: F) -> Result<(), RunnerStopped>
    where
        F: FnOnce(&mut M, Now) + Send + 'static,
    {
        self.control
            .send(Control::Call(Box::new(f)))
            .map_err(|_| RunnerStopped)
    }

    /// Asks the loop to end: it waits at most `grace` for the commands issued from now on (see
    /// the module docs), then returns the machine through the runner's join handle.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`] when the loop has already ended.
    pub fn finish(&self, grace: Duration) -> Result<(), RunnerStopped> {
        self.control
            .send(Control::Finish { last: None, grace })
            .map_err(|_| RunnerStopped)
    }

    /// [`MachineHandle::finish`] that first runs `last` on the machine (a stop or a shutdown):
    /// the commands it issues are the ones waited for.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`] when the loop has already ended.
    pub fn finish_with<F>(&self, last: F, grace: Duration) -> Result<(), RunnerStopped>
    where
        F: FnOnce(&mut M, Now) + Send + 'static,
    {
        self.control
            .send(Control::Finish {
                last: Some(Box::new(last)),
                grace,
            })
            .map_err(|_| RunnerStopped)
    }
}

/// A running machine: its handle, its events, and the task that returns it at the end.
pub struct Runner<M: Machine> {
    /// Calls into the machine.
    pub handle: MachineHandle<M>,
    /// Every event the machine reported, in order.
    pub events: mpsc::UnboundedReceiver<M::Event>,
    /// Ends with the machine when the loop ends.
    pub task: JoinHandle<M>,
}

impl<M> Runner<M>
where
    M: Machine + Send + 'static,
    M::Event: Send + 'static,
{
    /// Starts the loop on the current tokio runtime: `machine` driven by `executor`, whose
    /// inputs arrive on `inputs` (as returned by [`Executor::start`]).
    pub fn spawn(machine: M, executor: Executor, inputs: mpsc::UnboundedReceiver<Input>) -> Self {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_loop(machine, executor, inputs, control_rx, events_tx));
        Runner {
            handle: MachineHandle { control },
            events,
            task,
        }
    }
}

struct Loop<M: Machine> {
    machine: M,
    executor: Executor,
    events: mpsc::UnboundedSender<M::Event>,
    clock: Clock,
    /// While finishing: the answered commands issued since the finish began and not answered yet.
    draining: Option<BTreeSet<OpId>>,
}

impl<M: Machine> Loop<M> {
    /// Drains commands and events. Returns false when the executor has stopped.
    fn drain(&mut self) -> bool {
        let mut running = true;
        while let Some(cmd) = self.machine.poll_command() {
            if let (Some(pending), Some(op)) = (self.draining.as_mut(), cmd.op()) {
                pending.insert(op);
            }
            tracing::trace!(?cmd, "command");
            if self.executor.execute(cmd).is_err() {
                running = false;
            }
        }
        while let Some(event) = self.machine.poll_event() {
            // A host that dropped its receiver does not stop the machine.
            let _ = self.events.send(event);
        }
        running
    }

    fn input(&mut self, input: Input) {
        if let (Some(pending), Input::Completed(c)) = (self.draining.as_mut(), &input) {
            pending.remove(&c.op);
        }
        let now = self.clock.now();
        self.machine.handle_input(now, input);
    }
}

/// Inputs the runner hands the machine in one turn at most, when that many are queued.
const INPUT_BATCH: usize = 64;

async fn run_loop<M: Machine>(
    machine: M,
    executor: Executor,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    mut control: mpsc::UnboundedReceiver<Control<M>>,
    events: mpsc::UnboundedSender<M::Event>,
) -> M {
    let mut l = Loop {
        machine,
        executor,
        events,
        clock: Clock::new(),
        draining: None,
    };
    let mut finish_by: Option<Instant> = None;
    let mut control_open = true;
    // One timer for the machine's deadline, moved only when the deadline moves (a timer made
    // and dropped per turn costs a timer-wheel registration per input).
    let wake = tokio::time::sleep_until(Instant::now());
    tokio::pin!(wake);
    let mut wake_at: Option<Instant> = None;
    loop {
        if !l.drain() {
            tracing::debug!("executor stopped: the runner ends");
            break;
        }
        if let (Some(pending), Some(_)) = (&l.draining, finish_by)
            && pending.is_empty()
        {
            break;
        }
        let deadline = l.machine.poll_timeout().map(|at| l.clock.deadline(at));
        // Expired deadlines first, whatever else is ready: a busy input stream must never starve
        // the timers (the daemon's lease renewals ride on them).
        if deadline.is_some_and(|d| d <= Instant::now()) {
            let now = l.clock.now();
            l.machine.handle_timeout(now);
            continue;
        }
        if finish_by.is_some_and(|f| f <= Instant::now()) {
            tracing::debug!("finish grace ran out with commands unanswered");
            break;
        }
        if let Some(d) = deadline
            && wake_at != Some(d)
        {
            wake.as_mut().reset(d);
            wake_at = Some(d);
        }
        // Inputs and host calls are taken in random order when both are ready, so neither
        // starves the other.
        tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => {
                    l.input(input);
                    // Whatever else is already queued is taken in the same turn (bounded, so
                    // timers and host calls still come round): one wakeup, one select and one
                    // drain per batch instead of per input.
                    for _ in 1..INPUT_BATCH {
                        match inputs.try_recv() {
                            Ok(input) => l.input(input),
                            Err(_) => break,
                        }
                    }
                }
                None => {
                    tracing::debug!("executor input channel closed: the runner ends");
                    break;
                }
            },
            c = control.recv(), if control_open && finish_by.is_none() => match c {
                Some(Control::Call(f)) => {
                    let now = l.clock.now();
                    f(&mut l.machine, now);
                }
                Some(Control::Finish { last, grace }) => {
                    finish_by = Some(Instant::now() + grace);
                    l.draining = Some(BTreeSet::new());
                    if let Some(f) = last {
                        let now = l.clock.now();
                        f(&mut l.machine, now);
                    }
                }
                // Every handle dropped: keep running until the executor stops.
                None => control_open = false,
            },
            () = &mut wake, if deadline.is_some() => {
                wake_at = None;
                let now = l.clock.now();
                l.machine.handle_timeout(now);
            }
            () = sleep_until_opt(finish_by) => {
                tracing::debug!("finish grace ran out with commands unanswered");
                break;
            }
        }
    }
    // Hand over what the last step queued (best effort).
    let _ = l.drain();
    l.machine
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Typed calls
// ---------------------------------------------------------------------------------------------

/// The application calls of an agent, run on its loop.
impl MachineHandle<Agent> {
    /// [`Agent::join`].
    ///
    /// # Errors
    ///
    /// The agent's refusal, or [`AgentCallError::Stopped`].
    pub async fn join(&self, channel: Channel) -> Result<RequestId, AgentCallError> {
        self.call(move |a, now| a.join(now, channel))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::leave`].
    ///
    /// # Errors
    ///
    /// As [`MachineHandle::join`].
    pub async fn leave(&self, channel: Channel) -> Result<RequestId, AgentCallError> {
        self.call(move |a, now| a.leave(now, &channel))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::send`] of one text part; returns the request and the message id.
    ///
    /// # Errors
    ///
    /// As [`MachineHandle::join`].
    pub async fn send_text(
        &self,
        channel: Channel,
        text: String,
    ) -> Result<(RequestId, String), AgentCallError> {
        self.call(move |a, now| a.send(now, &channel, vec![Part::text(text)], &[]))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::send_dm`] of one text part to `to`; returns the request and the message id.
    ///
    /// # Errors
    ///
    /// As [`MachineHandle::join`].
    pub async fn send_dm_text(
        &self,
        to: AgentId,
        text: String,
    ) -> Result<(RequestId, String), AgentCallError> {
        self.call(move |a, now| a.send_dm(now, &to, vec![Part::text(text)]))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::send_anycast`] of one text part to `role`; returns the request and the message id.
    ///
    /// # Errors
    ///
    /// As [`MachineHandle::join`].
    pub async fn send_anycast_text(
        &self,
        role: Role,
        text: String,
    ) -> Result<(RequestId, String), AgentCallError> {
        self.call(move |a, now| a.send_anycast(now, &role, vec![Part::text(text)]))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::take_messages`].
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`].
    pub async fn take_messages(
        &self,
        limit: usize,
    ) -> Result<Vec<Surfaced<cotal_core::agent::Arrival>>, RunnerStopped> {
        self.call(move |a, now| a.take_messages(now, limit)).await
    }

    /// [`Agent::handled`].
    ///
    /// # Errors
    ///
    /// As [`MachineHandle::join`].
    pub async fn handled(&self, id: MessageId) -> Result<(), AgentCallError> {
        self.call(move |a, now| a.handled(now, &id))
            .await?
            .map_err(Into::into)
    }

    /// [`Agent::health`].
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`].
    pub async fn health(&self) -> Result<AgentHealth, RunnerStopped> {
        self.call(|a, _| a.health()).await
    }

    /// [`Agent::stop`] (offline presence), then [`MachineHandle::finish`] with `grace`.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`].
    pub fn stop(&self, grace: Duration) -> Result<(), RunnerStopped> {
        self.finish_with(|a, now| a.stop(now), grace)
    }
}

/// Why an agent call did not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AgentCallError {
    /// The agent refused it (nothing changed).
    #[error("{0}")]
    Agent(AgentError),
    /// The runner has stopped.
    #[error("{0}")]
    Stopped(#[from] RunnerStopped),
}

impl From<AgentError> for AgentCallError {
    fn from(e: AgentError) -> Self {
        AgentCallError::Agent(e)
    }
}

/// The host calls of a delivery daemon.
impl MachineHandle<Delivery> {
    /// [`Delivery::shutdown`] (releases the lease), then [`MachineHandle::finish`] with `grace`.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`].
    pub fn shutdown(&self, grace: Duration) -> Result<(), RunnerStopped> {
        self.finish_with(|d, now| d.shutdown(now), grace)
    }

    /// The health surface and counters.
    ///
    /// # Errors
    ///
    /// [`RunnerStopped`].
    pub async fn status(&self) -> Result<(DeliveryHealth, DeliveryCounters, bool), RunnerStopped> {
        self.call(|d, _| (d.health().clone(), d.counters().clone(), d.serving()))
            .await
    }
}
