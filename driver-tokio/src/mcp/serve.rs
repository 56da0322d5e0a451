//! [`serve_stdio`]: one agent served over MCP on stdin / stdout until the client leaves.

use super::inbox::Inbox;
use super::server::CotalMcp;
use super::transport::Written;
use crate::app::{Agent, Events};
use cotal_core::agent::AgentEvent;
use rmcp::RoleServer;
use rmcp::ServiceExt;
use rmcp::transport::async_rw::AsyncRwTransport;
use std::sync::Arc;
use std::time::Duration;

/// How [`serve_stdio`] runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How long a roster read (`cotal_roster`, a `cotal_dm` by name) may take.
    pub roster_timeout: Duration,
    /// How long the end waits for the acknowledgements of results already written.
    pub ack_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            roster_timeout: Duration::from_secs(5),
            ack_grace: Duration::from_secs(3),
        }
    }
}

/// Serves `agent` (and its `events`, from its start) as an MCP server on stdin / stdout until
/// the client closes the session or `shutdown` completes; then closes the agent (offline
/// presence; its memberships stay). Nothing but the protocol is written to stdout.
///
/// # Errors
///
/// One line: the MCP session could not start (the client did not initialize, stdio failed).
pub async fn serve_stdio(
    agent: Agent,
    events: Events<AgentEvent>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (inbox, written) = Inbox::start(&agent, events);
    let inbox = Arc::new(inbox);
    let server = CotalMcp::new(agent.clone(), inbox.clone(), options.roster_timeout);
    let (read, write) = rmcp::transport::stdio_pipes();
    let transport = Written::new(
        AsyncRwTransport::<RoleServer, _, _>::new(read, write),
        written,
    );
    let mut shutdown = Box::pin(shutdown);
    let served = tokio::select! {
        served = server.serve(transport) => served.map_err(|e| format!("MCP session: {e}")),
        () = &mut shutdown => Err("stopped before the MCP session started".to_owned()),
    };
    let outcome = match served {
        Ok(running) => {
            let cancel = running.cancellation_token();
            let stopper = tokio::spawn(async move {
                shutdown.await;
                cancel.cancel();
            });
            let quit = running.waiting().await;
            stopper.abort();
            tracing::info!(target: "cotal", "MCP session ended: {quit:?}");
            Ok(())
        }
        Err(e) => Err(e),
    };
    inbox.finish(options.ack_grace).await;
    if let Err(e) = agent.close().await {
        tracing::warn!(target: "cotal", "closing the agent: {e}");
    }
    outcome
}
