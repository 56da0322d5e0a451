//! `cotal`: the command line of Cotal on NATS.
//!
//! - `cotal up`: provision a space; `cotal provision agent`: an agent's ACL record and its
//!   nats-server permissions;
//! - `cotal delivery`: run the delivery daemon until SIGINT / SIGTERM (releases its lease);
//! - `cotal agent`: run an agent (JSON lines out, commands in on stdin); `cotal mcp`: the same
//!   agent as an MCP server on stdio (`cotal_driver_tokio::mcp`);
//! - `cotal send`, `cotal members`, `cotal health`, `cotal channels`: one-shot operations.
//!
//! `cotal bench` measures durable fan-out end to end (`cotal_driver_tokio::tools::bench`);
//! `cotal chaos` kills the delivery daemon at seeded points while messages flow
//! (`cotal_driver_tokio::tools::chaos`).
//!
//! `cotal demo` runs the demo mesh on the embedded simulator (`cotal_driver_sim::demo`); with
//! `--nats URL` or `--spawn-server` it runs the same script on a real nats-server
//! (`cotal_driver_tokio::demo`) and prints a verdict from real checks.
//!
//! Exit codes: 0 success, 1 a runtime error (unreachable server, refused permission, missing
//! stream, a failed send …), 2 bad usage or not built.

use clap::{Args, Parser, Subcommand};
use cotal_core::policy::DeliveryClass;
use cotal_core::time::UnixMillis;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::token::{AgentId, Channel, Role, Space};
use cotal_driver_tokio::connect::{Auth, ConnectConfig, TlsConfig, connect};
use cotal_driver_tokio::provision::{
    Applied, DefaultClass, ProvisionReport, SpacePlan, apply, ensure_default_class,
    nats_server_permissions,
};
use cotal_driver_tokio::tools::{bench, chaos};
pub(crate) use cotal_driver_tokio::tools::{fail, usage};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[path = "cotal/commands.rs"]
mod commands;
#[path = "cotal/lifecycle.rs"]
mod lifecycle;

/// Cotal: an agent mesh with durable channels on NATS/JetStream.
#[derive(Parser, Debug)]
#[command(name = "cotal", version, about, propagate_version = true)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// The log lines on stderr: `text` for people (colours only when stderr is a terminal), or
    /// `json` for a log pipeline: one JSON object per line (`timestamp`, `level`, `target`,
    /// `fields.message`, …).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// How to reach and authenticate to NATS.
#[derive(Args, Debug, Clone)]
pub(crate) struct NatsArgs {
    /// NATS server URL(s), comma-separated (nats://host:port, tls://host:port).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[command(flatten)]
    auth: AuthArgs,
}

/// How to authenticate to NATS (and TLS), without the URL.
#[derive(Args, Debug, Clone)]
pub(crate) struct AuthArgs {
    /// Credentials file (user JWT + seed). Its user nkey (the public key of the seed) is the
    /// identity the command acts as: `--id`, when given, must equal it.
    #[arg(long, env = "NATS_CREDS", conflicts_with_all = ["nkey", "user", "token"])]
    creds: Option<PathBuf>,
    /// File holding an nkey seed (SU…). Its public user nkey is the identity the command acts
    /// as: `--id`, when given, must equal it.
    #[arg(long, env = "NATS_NKEY", conflicts_with_all = ["user", "token"])]
    nkey: Option<PathBuf>,
    /// User name (with --password). It is the identity the command acts as (`cotal provision`
    /// names a user/password user after the id): `--id`, when given, must equal it.
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
    /// Require TLS (also implied by a tls:// URL).
    #[arg(long, env = "NATS_TLS")]
    tls: bool,
    /// Extra root CA (PEM) that the server's certificate may chain to.
    #[arg(long, env = "NATS_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --tls-key).
    #[arg(long, env = "NATS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with --tls-cert).
    #[arg(long, env = "NATS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Timeout of each request to the server, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

impl NatsArgs {
    pub(crate) fn config(&self) -> Result<ConnectConfig, String> {
        self.auth.config(&self.nats)
    }

    /// The connect config of an operator's one-shot command: the inbox prefix of the identity the
    /// credential names, if any.
    pub(crate) fn operator_config(&self) -> Result<ConnectConfig, String> {
        match self.identity(None, false) {
            Identity::Id(id) => self.config_as(id.as_ref()),
            Identity::Mismatch(e) | Identity::Failed(e) => Err(e),
        }
    }

    /// The connect config acting as `id`: its inbox prefix `_INBOX_<id>` is set before the first
    /// request, the only inbox a scoped credential (agent, delivery, observer, admin profile) may
    /// subscribe to. `None`: the library's `_INBOX` (open mode, or an allow-all credential that
    /// names no identity).
    pub(crate) fn config_as(&self, id: Option<&AgentId>) -> Result<ConnectConfig, String> {
        let mut config = self.config()?;
        config.inbox_prefix = id.map(AgentId::inbox_prefix);
        Ok(config)
    }

    /// The identity a command acts as: the credential's (see [`AuthArgs::credential_identity`])
    /// when it names one, else `given` (`--id`). A `given` id that differs from the credential's
    /// is a usage error ([`Identity::Mismatch`]); `required` commands (an agent, the daemon, a
    /// send) need an id from one or the other.
    pub(crate) fn identity(&self, given: Option<&str>, required: bool) -> Identity {
        let named = match self.auth.credential_identity() {
            Ok(n) => n,
            Err(e) => return Identity::Failed(e),
        };
        let usage = |msg: String| Identity::Mismatch(msg);
        match (named, given) {
            (Some((named, source)), Some(given)) if named != given => usage(format!(
                "--id {given} does not match the credential: {source} names {named} \
                 (omit --id, or give --id {named})"
            )),
            (Some((named, source)), _) => match AgentId::new(named.as_str()) {
                Ok(id) => Identity::Id(Some(id)),
                // An allow-all operator's user name need not be a valid id: the library inbox.
                Err(_) if !required => Identity::Id(None),
                Err(e) => usage(format!(
                    "{source} names '{named}', which is not a valid agent id: {e}"
                )),
            },
            (None, Some(given)) => match AgentId::new(given) {
                Ok(id) => Identity::Id(Some(id)),
                Err(e) => usage(format!("invalid agent id '{given}': {e}")),
            },
            (None, None) if required => usage(
                "no identity: give --id ID (or a credential that names one: --creds, --nkey, \
                 --user)"
                    .to_owned(),
            ),
            (None, None) => Identity::Id(None),
        }
    }
}

/// Who a command acts as, resolved from `--id` and the credential.
pub(crate) enum Identity {
    /// The id (`None`: none named, the library's default inbox).
    Id(Option<AgentId>),
    /// `--id` contradicts the credential, or no usable id: bad usage, exit code 2.
    Mismatch(String),
    /// The credential file could not be read: exit code 1.
    Failed(String),
}

impl Identity {
    /// The id, or the exit code a command returns at once (after printing one line).
    pub(crate) fn resolve(self) -> Result<Option<AgentId>, ExitCode> {
        match self {
            Identity::Id(id) => Ok(id),
            Identity::Mismatch(msg) => Err(usage(msg)),
            Identity::Failed(msg) => Err(fail(msg)),
        }
    }
}

impl AuthArgs {
    /// The identity the credential names, and how it names it: the public user nkey (`U…`) of
    /// the seed in a `--creds` or `--nkey` file, or the `--user` name (a user/password user is
    /// provisioned under the agent's id as its name). `None` for a token or no credential.
    pub(crate) fn credential_identity(&self) -> Result<Option<(String, String)>, String> {
        fn public_key(seed: &str, path: &std::path::Path) -> Result<String, String> {
            nkeys::KeyPair::from_seed(seed.trim())
                .map(|k| k.public_key())
                .map_err(|e| format!("{}: not a user nkey seed: {e}", path.display()))
        }
        if let Some(path) = &self.creds {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
            // The seed is the line after `-----BEGIN USER NKEY SEED-----`.
            let seed = text
                .lines()
                .skip_while(|l| !(l.contains("BEGIN") && l.contains("SEED")))
                .nth(1)
                .ok_or_else(|| format!("credentials file {} holds no nkey seed", path.display()))?;
            let key = public_key(seed, path)?;
            return Ok(Some((key, format!("--creds {}", path.display()))));
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read nkey seed file {}: {e}", path.display()))?;
            let key = public_key(&seed, path)?;
            return Ok(Some((key, format!("--nkey {}", path.display()))));
        }
        if let Some(user) = &self.user {
            return Ok(Some((user.clone(), format!("--user {user}"))));
        }
        Ok(None)
    }

    /// The connect config for the comma-separated URL list `urls`.
    pub(crate) fn config(&self, urls: &str) -> Result<ConnectConfig, String> {
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
            urls: ConnectConfig::parse_url_list(urls),
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
        /// Replicas of every stream and KV bucket (3 on a 3-node JetStream cluster).
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// The space's default delivery class (`defaults.deliveryClass` in the channel registry),
        /// written only when unset: a value already there (an operator's, or an earlier `up`'s)
        /// wins. Default: `durable` when `up` connects with credentials (--creds, --nkey, --user,
        /// --token: a secured space), `live` without (an open space, whose unconfigured channels
        /// are then live).
        #[arg(long, value_parser = ["live", "durable"])]
        default_class: Option<String>,
        /// The agents the space admits: every stream that carries per-agent consumers gets a
        /// `max_consumers` sized for them (DLV, DM, TASK: one per agent; CHAT and the presence
        /// and channels buckets: two; each plus 64 for daemons and operators). Default 5,000.
        /// Given, it is set on an existing space's streams as well (raising, or lowering: the
        /// consumers already there stay, new ones are refused); not given, a larger cap already
        /// set is kept. `provision agent --apply` refuses an agent once a stream is full.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_agents: Option<u32>,
        /// Seconds an unrenewed delivery lease lives (the lease bucket's TTL), so how long a
        /// standby daemon waits after the holder died before it takes over. Default 30, the
        /// reference's; reference daemons assume 30 and cannot serve a space with another. Every
        /// Cotal daemon reads it from the bucket before it acquires. Fixed when the space is
        /// created: given with another value for an existing space, the bucket is reported as
        /// drift and left as it is (stop every daemon and recreate the bucket to change it).
        #[arg(long, value_parser = clap::value_parser!(u64).range(2..=3600))]
        lease_ttl: Option<u64>,
        /// Print one JSON document instead of the text: `{"space", "objects": [{"kind",
        /// "name", "result": "created"|"unchanged"|"updated"|"failed", "error"?}],
        /// "defaultClass": {"result": "set"|"kept"|"failed", "class"?, "error"?}, "maxAgents",
        /// "maxAgentsGiven", "created", "updated", "unchanged", "failed", "summary"}`. Same exit
        /// codes; an error before the run is `{"error": "…"}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Provision credentials-side data for a principal.
    #[command(subcommand)]
    Provision(ProvisionCmd),
    /// Undo a provisioning: `deprovision agent` tombstones the agent's memberships through the
    /// delivery daemon and deletes its ACL record, consumers and presence. Idempotent.
    #[command(subcommand)]
    Deprovision(DeprovisionCmd),
    /// Run the delivery daemon of a space (one shard) until SIGINT / SIGTERM, then release its
    /// lease. Prints health changes and losses on stderr, one line each.
    Delivery(commands::DeliveryArgs),
    /// Run an agent. Every message is printed as one JSON line on stdout (with its `kind`:
    /// channel, dm or anycast). Each stdin line is one of:
    ///   `TEXT`                  post to the first joined channel;
    ///   `/send CH TEXT`         post to channel CH;
    ///   `/dm ID TEXT`           unicast to the instance ID;
    ///   `/anycast ROLE TEXT`    anycast to ROLE (one server of the role takes it);
    ///   `/join CH`, `/leave CH` join or leave a channel.
    #[command(verbatim_doc_comment)]
    Agent(commands::AgentArgs),
    /// Run an agent as an MCP server on stdio (for a coding agent's MCP client): its tools
    /// read the inbox, post, DM, anycast, join, leave, and show the channels, roster and status.
    /// Takes the options of `cotal agent`; logs go to stderr, stdout carries the protocol only.
    Mcp(commands::AgentArgs),
    /// Send one message (to a channel, an instance with --to, or a role with --role) and print
    /// its stream sequence (CHAT, DM or TASK).
    Send(commands::SendArgs),
    /// List the durable membership records of a space (from KV).
    Members(commands::MembersArgs),
    /// Show the delivery health of each shard (from the lease records), and each stream whose
    /// consumer headroom is under 10 % of its cap (exit 3 then, as for a shard not active).
    ///
    /// --json prints one document: `{"space", "healthy", "shards": [{"key", "state":
    /// "active"|"degraded"|"not-active", "holder"?, "detail"?, "published", "orphans"}],
    /// "streams": [{"stream", "consumers", "cap", "free", "low", "serverDefault"} or {"stream",
    /// "error"}]}`; `healthy` is false exactly when the exit code is 3.
    Health(commands::SpaceArgs),
    /// List the channel registry entries and each channel's effective class.
    ///
    /// --json prints one document: `{"space", "defaults" (the `=defaults` entry, or null),
    /// "channels": [{"channel", "class": "live"|"durable", "replay", "config"}], "ignored":
    /// [{"key", "error"}]}`.
    Channels(commands::SpaceArgs),
    /// Run a demo mesh (a delivery daemon and four agents on a live and a durable channel, with a
    /// leave, a rejoin, a restart, a connection loss and a refused join) on the embedded
    /// simulator, or with --nats / --spawn-server on a real nats-server, and print what each
    /// agent received and the verdict.
    Demo(DemoArgs),
    /// Measure durable fan-out end to end: the JetStream publish ceiling, then one daemon (or
    /// --shards N) and M member agents on a fresh space and a durable channel, then the live path
    /// on a live channel; copies/s, latency, losses. --memory: the daemon's resident memory on a
    /// large provisioned space (Linux only).
    Bench(bench::BenchArgs),
    /// `cotal bench --agent-procs K` runs its member agents in K of these (internal: JSON
    /// lines to the parent on stdout, its commands on stdin).
    #[command(hide = true)]
    BenchAgents(bench::BenchAgentsArgs),
    /// Inject seeded faults while messages flow and members leave and rejoin: SIGKILL of the
    /// delivery daemon (a child process), SIGTERM / SIGKILL and restart of nats-server; then
    /// check every member's copies against its membership intervals: a summary table.
    Chaos(chaos::ChaosArgs),
}

impl Cmd {
    /// `--json` was given: the command's output, errors included, is JSON.
    fn json(&self) -> bool {
        match self {
            Cmd::Up { json, .. }
            | Cmd::Provision(
                ProvisionCmd::Delivery { json, .. } | ProvisionCmd::Agent { json, .. },
            ) => *json,
            Cmd::Send(args) => args.json,
            Cmd::Deprovision(DeprovisionCmd::Agent(args)) => args.json,
            Cmd::Members(args) => args.json,
            Cmd::Health(args) | Cmd::Channels(args) => args.json,
            _ => false,
        }
    }
}

// Parsed once per run: the size of the agent variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum ProvisionCmd {
    /// Print the delivery daemon's nats-server permissions block (`Permissions::delivery`: the
    /// reference's `deliveryPermissions` plus the DLV revocation sweep and backlog read). The
    /// daemon runs as `cotal delivery --space S` under a user named ID (or the nkey ID); the
    /// operator who runs `cotal up`, `provision agent --apply`, `members`, `health` and
    /// `channels` needs the allow-all manager profile: a user with no permissions block.
    Delivery {
        /// The space name.
        #[arg(long)]
        space: String,
        /// The daemon's id: its user name (or user nkey), lease holder and inbox `_INBOX_<id>`.
        #[arg(long)]
        id: String,
        /// Print one JSON document instead of the text: `{"space", "id", "permissions":
        /// {"publish": {"allow", "deny"}, "subscribe": {"allow", "deny"}}}` (the nats-server
        /// permissions block as JSON, which nats-server's config also accepts).
        #[arg(long)]
        json: bool,
    },
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
        /// Display names the agent may present (repeatable or comma-separated), written to the
        /// ACL record's `names`. Its id is always reserved for it; a name listed here is
        /// reserved too: another agent presenting it is ignored for @mentions, and this agent
        /// may present only these names (or its id).
        #[arg(long = "name", value_delimiter = ',')]
        names: Vec<String>,
        /// Also write the ACL record to the space's ACL bucket and create the agent's DLV and
        /// `dm_<id>` consumers, and `svc_<role>` with --role, as the reference's provisioner does
        /// (needs a privileged connection and a provisioned space). Without credentials (an open
        /// space) `dm_<id>` gets the inactive_threshold (600 s) a reference agent creates it
        /// with, so the agent's own create finds it identical.
        #[arg(long)]
        apply: bool,
        /// Print one JSON document instead of the text: `{"space", "id", "acl": {"bucket",
        /// "key", "record"}, "permissions": {"publish": {"allow", "deny"}, "subscribe":
        /// {"allow", "deny"}}, "applied": [{"what": "acl"|"consumer", "name", "result"?,
        /// "revision"?}]}` (`applied` only with --apply). Same exit codes; an error is
        /// `{"error": "…"}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArgs,
    },
}

#[derive(Subcommand, Debug)]
enum DeprovisionCmd {
    /// Remove an agent from a space: tombstone every open membership through the delivery daemon
    /// (which must be running when any is open), then delete its ACL record, its `dlv_<id>` and
    /// `dm_<id>` consumers (and `svc_<role>` per --role no other agent serves), and its presence.
    /// Prints each change; a second run prints "nothing to do". Exit 1 at the first step that
    /// fails (re-run to continue).
    Agent(lifecycle::DeprovisionAgentArgs),
}

/// `cotal demo`.
#[derive(Args, Debug)]
struct DemoArgs {
    /// The simulator seed (the same seed gives the same run, bit for bit).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Run the same script on this real nats-server (it must allow creating a fresh space)
    /// instead of the simulator.
    #[arg(long, conflicts_with = "spawn_server")]
    nats: Option<String>,
    /// Run on a local nats-server started for the run (COTAL_NATS_SERVER, else
    /// .venv/bin/nats-server), killed at the end. It runs with per-user permissions, so the
    /// broker itself refuses the out-of-ACL join.
    #[arg(long)]
    spawn_server: bool,
    /// With --nats: how the demo's privileged connection (provisioning, daemon, agents)
    /// authenticates.
    #[command(flatten)]
    auth: AuthArgs,
}

async fn demo(args: &DemoArgs) -> ExitCode {
    if !args.spawn_server && args.nats.is_none() {
        let report = cotal_driver_sim::demo::run(args.seed);
        print!("{report}");
        return if report.clean() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut options = cotal_driver_tokio::demo::DemoOptions::default();
    let mut server = None;
    let config = if args.spawn_server {
        // Per-user permissions: the broker itself enforces each agent's read ACL.
        let space = cotal_driver_tokio::demo::fresh_space();
        let admin_password = format!("{:016x}", cotal_driver_tokio::run::os_seed());
        let agent_password = format!("{:016x}", cotal_driver_tokio::run::os_seed());
        let auth = cotal_driver_tokio::demo::server_authorization(
            &space,
            &admin_password,
            &agent_password,
        );
        let s = match bench::SpawnedServer::start_with(&auth) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let mut config = ConnectConfig::new([s.url()]);
        config.auth = Auth::UserPassword {
            user: "admin".to_owned(),
            password: admin_password,
        };
        server = Some(s);
        options.space = Some(space);
        options.agent_password = Some(agent_password);
        config
    } else {
        match args.auth.config(args.nats.as_deref().unwrap_or_default()) {
            Ok(c) => c,
            Err(e) => return fail(e),
        }
    };
    let result = cotal_driver_tokio::demo::run(&config, &options).await;
    drop(server);
    match result {
        Ok(report) => {
            print!("{report}");
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}

/// See `Cargo.toml`: freed pages go back to the system, so a long-running daemon's resident
/// memory follows what it holds, not the highest it ever held.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.json() {
        cotal_driver_tokio::tools::json_errors(true);
    }
    // Quiet by default: warnings only, except that the daemon reports its health changes (info).
    let base = match (cli.verbose, &cli.command) {
        (0, Cmd::Delivery(_)) => "warn,cotal=info",
        (0, _) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(base)),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            logs.with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
        }
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    match cli.command {
        Cmd::Up {
            space,
            replicas,
            default_class,
            max_agents,
            lease_ttl,
            json,
            nats,
        } => {
            let sizing = UpSizing {
                replicas,
                max_agents,
                lease_ttl: lease_ttl.map(Duration::from_secs),
            };
            up(&space, &sizing, default_class.as_deref(), json, &nats).await
        }
        Cmd::Provision(ProvisionCmd::Delivery { space, id, json }) => {
            provision_delivery(&space, &id, json)
        }
        Cmd::Provision(ProvisionCmd::Agent {
            space,
            id,
            read,
            publish,
            role,
            spawn,
            names,
            apply,
            json,
            nats,
        }) => {
            provision_agent(
                &space,
                &id,
                &read,
                &publish,
                role.as_deref(),
                spawn,
                apply.then_some(&nats),
                &names,
                json,
            )
            .await
        }
        Cmd::Deprovision(DeprovisionCmd::Agent(args)) => lifecycle::deprovision_agent(args).await,
        Cmd::Delivery(args) => commands::delivery(args).await,
        Cmd::Agent(args) => commands::agent(args).await,
        Cmd::Mcp(args) => commands::mcp(args).await,
        Cmd::Send(args) => commands::send(args).await,
        Cmd::Members(args) => commands::members(args).await,
        Cmd::Health(args) => commands::health(args).await,
        Cmd::Channels(args) => commands::channels(args).await,
        Cmd::Demo(args) => demo(&args).await,
        Cmd::Bench(args) => bench::bench(args).await,
        Cmd::BenchAgents(args) => bench::bench_agents(args).await,
        Cmd::Chaos(args) => chaos::chaos(args).await,
    }
}

/// What `cotal up` sizes: replicas, consumer caps, the lease TTL.
#[derive(Clone, Copy)]
struct UpSizing {
    replicas: u32,
    max_agents: Option<u32>,
    lease_ttl: Option<Duration>,
}

async fn up(
    space: &str,
    sizing: &UpSizing,
    default_class: Option<&str>,
    json: bool,
    nats: &NatsArgs,
) -> ExitCode {
    let UpSizing {
        replicas,
        max_agents,
        lease_ttl,
    } = *sizing;
    let space = match Space::new(space) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid space name '{space}': {e}")),
    };
    let id = match nats.identity(None, false).resolve() {
        Ok(id) => id,
        Err(code) => return code,
    };
    let config = match nats.config_as(id.as_ref()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let conn = match connect(&config).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut plan = match max_agents {
        Some(n) => SpacePlan::for_agents(&space, n),
        None => SpacePlan::new(&space),
    };
    if replicas != 1 {
        plan = plan.with_replicas(replicas);
    }
    if let Some(ttl) = lease_ttl {
        plan = plan.with_lease_ttl(ttl);
    }
    let report = apply(&conn.client, &plan, config.request_timeout).await;
    let class = match default_class {
        Some("live") => DeliveryClass::Live,
        Some(_) => DeliveryClass::Durable,
        None if matches!(config.auth, Auth::None) => DeliveryClass::Live,
        None => DeliveryClass::Durable,
    };
    let defaults = ensure_default_class(&conn.client, &space, class, config.request_timeout).await;
    let code = if report.failed() > 0 || defaults.is_err() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    if json {
        println!("{}", up_json(&space, &plan, &report, &defaults));
        return code;
    }
    for object in &report.objects {
        println!("{object}");
    }
    match &defaults {
        Ok(d) => println!("{d}"),
        Err(e) => println!("failed    defaults.deliveryClass: {e}"),
    }
    println!(
        "consumer caps sized for {} agents{}",
        plan.budget.max_agents(),
        if plan.budget_given {
            ""
        } else {
            " (the default; a larger cap already set is kept; --max-agents sets it)"
        }
    );
    println!("space {}: {}", space.as_str(), report.summary());
    code
}

/// `cotal up --json`: the run as one document.
fn up_json(
    space: &Space,
    plan: &SpacePlan,
    report: &ProvisionReport,
    defaults: &Result<DefaultClass, String>,
) -> serde_json::Value {
    let objects: Vec<serde_json::Value> = report
        .objects
        .iter()
        .map(|o| {
            let (result, error) = match &o.result {
                Ok(Applied::Created) => ("created", None),
                Ok(Applied::Unchanged) => ("unchanged", None),
                Ok(Applied::Updated) => ("updated", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            let mut v = json!({"kind": o.kind.to_string(), "name": o.name, "result": result});
            if let Some(e) = error {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    let default_class = match defaults {
        Ok(DefaultClass::Set(c)) => json!({"result": "set", "class": c.as_str()}),
        Ok(DefaultClass::Kept(c)) => json!({"result": "kept", "class": c.as_str()}),
        Err(e) => json!({"result": "failed", "error": e}),
    };
    json!({
        "space": space.as_str(),
        "objects": objects,
        "defaultClass": default_class,
        "maxAgents": plan.budget.max_agents(),
        "maxAgentsGiven": plan.budget_given,
        "created": report.created(),
        "updated": report.updated(),
        "unchanged": report.unchanged(),
        "failed": report.failed(),
        "summary": report.summary(),
    })
}

/// A permissions block as nats-server's JSON form: `{"publish": {"allow": […], "deny": […]},
/// "subscribe": {…}}`.
fn permissions_json(p: &Permissions) -> serde_json::Value {
    json!({
        "publish": {"allow": p.publish_allow, "deny": p.publish_deny},
        "subscribe": {"allow": p.subscribe_allow, "deny": p.subscribe_deny},
    })
}

fn provision_delivery(space: &str, id: &str, json: bool) -> ExitCode {
    let space = match Space::new(space) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid space name '{space}': {e}")),
    };
    let id = match AgentId::new(id) {
        Ok(a) => a,
        Err(e) => return fail(format!("invalid daemon id '{id}': {e}")),
    };
    let permissions = Permissions::delivery(&space, &id);
    if json {
        println!(
            "{}",
            json!({
                "space": space.as_str(),
                "id": id.as_str(),
                "permissions": permissions_json(&permissions),
            })
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "# nats-server user permissions (authorization.users[].permissions) of the delivery \
         daemon {} of space {}",
        id.as_str(),
        space.as_str()
    );
    println!("{}", nats_server_permissions(&permissions));
    println!(
        "# the operator (cotal up, provision agent --apply, members, health, channels): the \
         allow-all manager profile, a user with no permissions block"
    );
    ExitCode::SUCCESS
}

#[allow(clippy::too_many_arguments)] // one per `provision agent` flag
async fn provision_agent(
    space: &str,
    id: &str,
    read: &[String],
    publish: &[String],
    role: Option<&str>,
    spawn: bool,
    apply: Option<&NatsArgs>,
    names: &[String],
    json: bool,
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
    let names: Vec<String> = names.iter().map(|n| n.trim().to_owned()).collect();
    if names.iter().any(String::is_empty) {
        return fail("invalid --name: a display name cannot be empty".to_owned());
    }
    let mut record = AclRecord {
        allow_subscribe: policy
            .allow_subscribe
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        revision: 1,
        updated_at: UnixMillis(now),
        extra: Default::default(),
    };
    record.set_provisioned_names(&names);
    let record_json = serde_json::to_string(&record).unwrap_or_default();
    let applied = match apply {
        None => None,
        Some(nats) => {
            Some(apply_agent(nats, &space, &id, policy.role.as_ref(), &record_json).await)
        }
    };
    if json {
        let mut doc = json!({
            "space": space.as_str(),
            "id": id.as_str(),
            "acl": {
                "bucket": KvBucket::Acl.name(&space),
                "key": acl_key(&id),
                "record": serde_json::to_value(&record).unwrap_or_default(),
            },
            "permissions": permissions_json(&permissions),
        });
        match applied {
            None => {}
            Some(Ok(steps)) => {
                doc["applied"] = steps.iter().map(AppliedStep::to_json).collect();
            }
            // The error as `{"error"}`, alone: what was printed before it was not applied.
            Some(Err(e)) => return fail(e),
        }
        println!("{doc}");
        return ExitCode::SUCCESS;
    }
    println!(
        "# ACL record: bucket {}, key {}",
        KvBucket::Acl.name(&space),
        acl_key(&id)
    );
    println!("{record_json}");
    println!("# nats-server user permissions (authorization.users[].permissions)");
    println!("{}", nats_server_permissions(&permissions));
    match applied {
        None => ExitCode::SUCCESS,
        Some(Ok(steps)) => {
            for step in steps {
                println!("{step}");
            }
            ExitCode::SUCCESS
        }
        Some(Err(e)) => fail(e),
    }
}

/// One write of `provision agent --apply`.
enum AppliedStep {
    /// The ACL record, at this KV revision.
    Acl { name: String, revision: u64 },
    /// A consumer (`STREAM/NAME`) and what was done to it.
    Consumer { name: String, result: Applied },
}

fn applied_word(a: Applied) -> &'static str {
    match a {
        Applied::Created => "created",
        Applied::Unchanged => "unchanged",
        Applied::Updated => "updated",
    }
}

impl AppliedStep {
    fn to_json(&self) -> serde_json::Value {
        match self {
            AppliedStep::Acl { name, revision } => {
                json!({"what": "acl", "name": name, "revision": revision})
            }
            AppliedStep::Consumer { name, result } => {
                json!({"what": "consumer", "name": name, "result": applied_word(*result)})
            }
        }
    }
}

impl std::fmt::Display for AppliedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppliedStep::Acl { name, revision } => {
                write!(f, "applied: ACL record {name} revision {revision}")
            }
            AppliedStep::Consumer { name, result } => {
                write!(f, "applied: consumer {name} {}", applied_word(*result))
            }
        }
    }
}

/// Writes the ACL record and creates the agent's consumers: `dlv_<id>`, `dm_<id>` and, with a
/// role, `svc_<role>` (agents hold bind grants only, §1.10).
async fn apply_agent(
    nats: &NatsArgs,
    space: &Space,
    id: &AgentId,
    role: Option<&Role>,
    record_json: &str,
) -> Result<Vec<AppliedStep>, String> {
    let me = match nats.identity(None, false) {
        Identity::Id(id) => id,
        Identity::Mismatch(e) | Identity::Failed(e) => return Err(e),
    };
    let config = nats.config_as(me.as_ref())?;
    let conn = connect(&config).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(conn.client.clone());
    use cotal_core::wire::config::ConsumerSpec;
    // In an open space a reference agent creates its own `dm_<id>` with the endpoint's
    // inactive_threshold (action `create`, which fails on any other config): make it exactly so.
    let dm = if matches!(config.auth, Auth::None) {
        ConsumerSpec::dm(space, id)
            .with_inactive_threshold(cotal_core::constants::DEFAULT_INACTIVE_THRESHOLD)
    } else {
        ConsumerSpec::dm(space, id)
    };
    let mut specs = vec![ConsumerSpec::dlv(space, id), dm];
    if let Some(role) = role {
        specs.push(ConsumerSpec::svc(space, role));
    }
    // A full space refuses the agent before anything is written (issue 22).
    cotal_driver_tokio::provision::check_room(&conn.client, space, &specs, config.request_timeout)
        .await
        .map_err(|e| match e {
            cotal_driver_tokio::provision::ProvisionError::Api(a)
                if a.err_code() == Some(cotal_driver_tokio::api::STREAM_NOT_FOUND) =>
            {
                format!(
                    "space '{}' is not provisioned (run `cotal up` first): {a}",
                    space.as_str()
                )
            }
            other => other.to_string(),
        })?;
    let bucket = KvBucket::Acl.name(space);
    let kv = js
        .get_key_value(&bucket)
        .await
        .map_err(|e| format!("cannot open KV bucket {bucket} (run `cotal up` first): {e}"))?;
    let revision = kv
        .put(acl_key(id), bytes::Bytes::from(record_json.to_owned()))
        .await
        .map_err(|e| format!("cannot write the ACL record: {e}"))?;
    let mut lines = vec![AppliedStep::Acl {
        name: format!("{bucket}/{}", acl_key(id)),
        revision,
    }];
    for spec in specs {
        let applied = match cotal_driver_tokio::provision::apply_consumer(
            &conn.client,
            &spec,
            config.request_timeout,
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                let e = cotal_driver_tokio::provision::full_on_refusal(
                    &conn.client,
                    space,
                    &spec.stream,
                    e,
                    config.request_timeout,
                )
                .await;
                return Err(format!("consumer {}/{}: {e}", spec.stream, spec.name));
            }
        };
        lines.push(AppliedStep::Consumer {
            name: format!("{}/{}", spec.stream, spec.name),
            result: applied,
        });
    }
    Ok(lines)
}
