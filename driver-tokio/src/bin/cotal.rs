//! `cotal`: the command line of Cotal on NATS.
//!
//! Built: `cotal up` (provision a space) and `cotal provision agent` (print an agent's ACL record
//! and its nats-server permissions). The other subcommands exist so `--help` shows the whole
//! surface; they exit with code 2 and say they are not built yet.

use clap::{Args, Parser, Subcommand};
use cotal_core::time::UnixMillis;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::token::{AgentId, Channel, Role, Space};
use cotal_driver_tokio::connect::{Auth, ConnectConfig, TlsConfig, connect};
use cotal_driver_tokio::provision::{nats_server_permissions, provision_space};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Cotal: an agent mesh with durable channels on NATS/JetStream.
#[derive(Parser, Debug)]
#[command(name = "cotal", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// How to reach and authenticate to NATS.
#[derive(Args, Debug, Clone)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated (nats://host:port, tls://host:port).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Credentials file (user JWT + seed).
    #[arg(long, env = "NATS_CREDS", conflicts_with_all = ["nkey", "user", "token"])]
    creds: Option<PathBuf>,
    /// File holding an nkey seed (SU…).
    #[arg(long, conflicts_with_all = ["user", "token"])]
    nkey: Option<PathBuf>,
    /// User name (with --password).
    #[arg(
        long,
        env = "NATS_USER",
        requires = "password",
        conflicts_with = "token"
    )]
    user: Option<String>,
    /// Password (with --user).
    #[arg(long, env = "NATS_PASSWORD", requires = "user")]
    password: Option<String>,
    /// Auth token.
    #[arg(long, env = "NATS_TOKEN")]
    token: Option<String>,
    /// Require TLS.
    #[arg(long)]
    tls: bool,
    /// Extra root CA (PEM) for TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Timeout of each request to the server, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

impl NatsArgs {
    fn config(&self) -> Result<ConnectConfig, String> {
        let auth = if let Some(path) = &self.creds {
            Auth::CredsFile(path.clone())
        } else if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read nkey seed file {}: {e}", path.display()))?;
            Auth::NkeySeed(seed.trim().to_owned())
        } else if let (Some(user), Some(password)) = (&self.user, &self.password) {
            Auth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }
        } else if let Some(token) = &self.token {
            Auth::Token(token.clone())
        } else {
            Auth::None
        };
        Ok(ConnectConfig {
            urls: ConnectConfig::parse_url_list(&self.nats),
            auth,
            tls: TlsConfig {
                required: self.tls,
                ca_file: self.tls_ca.clone(),
                client_cert: self.tls_cert.clone().zip(self.tls_key.clone()),
            },
            name: Some("cotal".to_owned()),
            request_timeout: Duration::from_millis(self.timeout_ms),
            ..ConnectConfig::default()
        })
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Provision a space: its streams, KV buckets and the delivery daemon's consumers.
    /// Idempotent: a second run changes nothing and says so.
    Up {
        /// The space name.
        #[arg(long)]
        space: String,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Provision credentials-side data for a principal.
    #[command(subcommand)]
    Provision(ProvisionCmd),
    /// Run the delivery daemon (not built yet).
    Delivery(Stub),
    /// Run an agent: join, leave, send, listen (not built yet).
    Agent(Stub),
    /// Send one message to a channel (not built yet).
    Send(Stub),
    /// List the durable members of a space (not built yet).
    Members(Stub),
    /// Show delivery health (not built yet).
    Health(Stub),
    /// List channels and their class (not built yet).
    Channels(Stub),
    /// Run a demo mesh on the simulator (not built yet).
    Demo(Stub),
}

#[derive(Subcommand, Debug)]
enum ProvisionCmd {
    /// Print an agent's ACL record and its nats-server permissions block.
    Agent {
        /// The space name.
        #[arg(long)]
        space: String,
        /// The agent's id (its user nkey in auth mode).
        #[arg(long)]
        id: String,
        /// Channels (patterns allowed) the agent may read, comma-separated.
        #[arg(long, value_delimiter = ',')]
        read: Vec<String>,
        /// Channels the agent may post to, comma-separated (default none).
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// The anycast role it serves.
        #[arg(long)]
        role: Option<String>,
        /// Grant the spawn capability (requests on ctl.manager.ID).
        #[arg(long)]
        spawn: bool,
    },
}

/// Arguments of a subcommand that is not built yet.
#[derive(Args, Debug)]
struct Stub {
    /// Accepted and ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

fn not_built(name: &str) -> ExitCode {
    println!(
        "cotal {name}: not built yet (the agent and delivery machines are still being written)"
    );
    ExitCode::from(2)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    println!("cotal: error: {msg}");
    ExitCode::from(1)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up { space, nats } => up(&space, &nats).await,
        Cmd::Provision(ProvisionCmd::Agent {
            space,
            id,
            read,
            publish,
            role,
            spawn,
        }) => provision_agent(&space, &id, &read, &publish, role.as_deref(), spawn),
        Cmd::Delivery(_) => not_built("delivery"),
        Cmd::Agent(_) => not_built("agent"),
        Cmd::Send(_) => not_built("send"),
        Cmd::Members(_) => not_built("members"),
        Cmd::Health(_) => not_built("health"),
        Cmd::Channels(_) => not_built("channels"),
        Cmd::Demo(_) => not_built("demo"),
    }
}

async fn up(space: &str, nats: &NatsArgs) -> ExitCode {
    let space = match Space::new(space) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid space name '{space}': {e}")),
    };
    let config = match nats.config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let conn = match connect(&config).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let report = provision_space(&conn.client, &space, config.request_timeout).await;
    for object in &report.objects {
        println!("{object}");
    }
    println!("space {}: {}", space.as_str(), report.summary());
    if report.failed() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn provision_agent(
    space: &str,
    id: &str,
    read: &[String],
    publish: &[String],
    role: Option<&str>,
    spawn: bool,
) -> ExitCode {
    let space = match Space::new(space) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid space name '{space}': {e}")),
    };
    let id = match AgentId::new(id) {
        Ok(a) => a,
        Err(e) => return fail(format!("invalid agent id '{id}': {e}")),
    };
    let channels = |list: &[String]| -> Result<Vec<Channel>, String> {
        list.iter()
            .filter(|s| !s.is_empty())
            .map(|s| Channel::new(s.as_str()).map_err(|e| format!("invalid channel '{s}': {e}")))
            .collect()
    };
    let allow_subscribe = match channels(read) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let allow_publish = match channels(publish) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let role = match role.map(Role::new).transpose() {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid role: {e}")),
    };
    let policy = AgentPolicy {
        id: id.clone(),
        allow_subscribe,
        allow_publish,
        role,
        spawn,
    };
    let permissions = Permissions::agent(&space, &policy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let record = AclRecord {
        allow_subscribe: policy
            .allow_subscribe
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        revision: 1,
        updated_at: UnixMillis(now),
        extra: Default::default(),
    };
    let record_json = serde_json::to_string(&record).unwrap_or_default();
    println!(
        "# ACL record: bucket {}, key {}",
        KvBucket::Acl.name(&space),
        acl_key(&id)
    );
    println!("{record_json}");
    println!("# nats-server user permissions (authorization.users[].permissions)");
    println!("{}", nats_server_permissions(&permissions));
    ExitCode::SUCCESS
}
