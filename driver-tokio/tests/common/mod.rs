//! Test harness: a real nats-server on a random loopback port, and a driver for the executor.
//!
//! The server binary comes from `COTAL_NATS_SERVER` (scripts/test.sh sets it; CI always does).
//! When it is unset, [`NatsServer::start`] prints a note and returns `None`, and the test returns
//! early: skipped, not failed. The server runs with JetStream on and a temporary store dir,
//! optionally with users that carry per-user permissions, and is killed (by its own PID) on drop.

#![allow(dead_code)]

use cotal_core::io::Reply;
use cotal_core::io::{Command, Completion, Connection, Inbound, Input};
use cotal_core::op::{OpId, Outcome};
use cotal_driver_tokio::connect::{Auth, ConnectConfig, connect};
use cotal_driver_tokio::exec::{Executor, ExecutorConfig};
use std::collections::VecDeque;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;

/// The `cotal` binary pointed at one server: every call gets `--nats <url>` appended.
pub struct Cli {
    url: String,
}

impl Cli {
    /// Calls against `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Cli { url: url.into() }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(["--nats", self.url.as_str()]);
        all
    }

    /// Runs `cotal <args> --nats <url>` to the end.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_cotal"))
            .args(self.args(args))
            .output()
            .expect("run cotal")
    }

    /// Starts `cotal <args> --nats <url>` as a long-running [`Proc`].
    pub fn spawn(&self, name: &'static str, args: &[&str]) -> Proc {
        Proc::spawn(name, &self.args(args))
    }
}

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// One user of a server config.
#[derive(Clone, Debug)]
pub struct User {
    /// Name.
    pub name: String,
    /// Password.
    pub password: String,
    /// A `permissions` block (nats-server config syntax), or `None` for no restriction.
    pub permissions: Option<String>,
}

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    users: Vec<User>,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl NatsServer {
    /// The binary, if `COTAL_NATS_SERVER` is set.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os("COTAL_NATS_SERVER").map(PathBuf::from)
    }

    /// A server without authentication, or `None` (skip) when no binary is configured.
    pub fn start() -> Option<Self> {
        Self::start_with_users(Vec::new())
    }

    /// A server whose users are `users` (none: no authentication).
    pub fn start_with_users(users: Vec<User>) -> Option<Self> {
        if Self::binary().is_none() {
            println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir,
            users,
        };
        server.spawn();
        Some(server)
    }

    fn write_config(&self) -> PathBuf {
        let conf = self.dir.path().join("server.conf");
        let store = self.dir.path().join("js");
        let mut text = format!(
            "listen: \"127.0.0.1:{}\"\nserver_name: cotal_test\njetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 1GB }}\n",
            self.port,
            store.display().to_string()
        );
        if !self.users.is_empty() {
            text.push_str("authorization {\n  users = [\n");
            for u in &self.users {
                text.push_str(&format!(
                    "    {{ user: {:?}, password: {:?}",
                    u.name, u.password
                ));
                if let Some(p) = &u.permissions {
                    text.push_str(&format!(", permissions: {p}"));
                }
                text.push_str(" }\n");
            }
            text.push_str("  ]\n}\n");
        }
        std::fs::File::create(&conf)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write server config");
        conf
    }

    fn spawn(&mut self) {
        let bin = Self::binary().expect("COTAL_NATS_SERVER");
        let conf = self.write_config();
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        // Bounded wait until the port accepts.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("nats-server exited early ({status}): {}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not accept within {WAIT:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (by its PID) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server cleanly (SIGTERM, by its PID: it writes its state out) and waits.
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Rewrites the config with `users` and makes the running server reload it (SIGHUP, by
    /// its PID). Permissions that got narrower apply to existing connections: the server
    /// re-checks their subscriptions and refuses the ones no longer allowed.
    pub fn reload_with_users(&mut self, users: Vec<User>) {
        self.users = users;
        self.write_config();
        let pid = self.child.as_ref().expect("server running").id();
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP {pid} failed");
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A connect config for this server (no auth).
    pub fn config(&self) -> ConnectConfig {
        ConnectConfig::new([self.url()])
    }

    /// A connect config as `user`.
    pub fn config_as(&self, user: &str, password: &str) -> ConnectConfig {
        ConnectConfig {
            auth: Auth::UserPassword {
                user: user.to_owned(),
                password: password.to_owned(),
            },
            ..self.config()
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An executor under test, with the inputs it produced.
pub struct Driver {
    /// The executor.
    pub exec: Executor,
    inputs: mpsc::UnboundedReceiver<Input>,
    /// Inputs received but not yet consumed by a wait.
    pub seen: VecDeque<Input>,
    next_op: u64,
}

impl Driver {
    /// Connects with `config` and starts an executor; consumes the initial `Restored`.
    pub async fn start(config: ConnectConfig) -> Driver {
        Driver::start_with(config, ExecutorConfig::default()).await
    }

    /// The same with executor tunables.
    pub async fn start_with(config: ConnectConfig, exec_config: ExecutorConfig) -> Driver {
        let conn = connect(&config).await.expect("connect");
        let (exec, inputs) = Executor::start(conn, exec_config);
        let mut d = Driver {
            exec,
            inputs,
            seen: VecDeque::new(),
            next_op: 0,
        };
        let first = d.next().await;
        assert_eq!(first, Input::Connection(Connection::Restored));
        d
    }

    /// A fresh operation id.
    pub fn op(&mut self) -> OpId {
        self.next_op += 1;
        OpId::from_raw(self.next_op)
    }

    /// Sends a command.
    pub fn send(&self, cmd: Command) {
        self.exec.execute(cmd).expect("executor running");
    }

    /// The next input (buffered first), bounded by [`WAIT`].
    pub async fn next(&mut self) -> Input {
        if let Some(i) = self.seen.pop_front() {
            return i;
        }
        self.recv(WAIT).await.expect("an input within the wait")
    }

    /// The next input from the executor within `d`, ignoring the buffer.
    pub async fn recv(&mut self, d: Duration) -> Option<Input> {
        tokio::time::timeout(d, self.inputs.recv())
            .await
            .ok()
            .flatten()
    }

    /// Runs a command built with a fresh op id and waits for its completion; every other input
    /// seen meanwhile stays in [`Driver::seen`].
    pub async fn run(&mut self, build: impl FnOnce(OpId) -> Command) -> Outcome<Reply> {
        let op = self.op();
        self.send(build(op));
        self.completion(op).await
    }

    /// Waits for the completion of `op` (buffered inputs are searched first).
    pub async fn completion(&mut self, op: OpId) -> Outcome<Reply> {
        let pos = self
            .seen
            .iter()
            .position(|i| matches!(i, Input::Completed(c) if c.op == op));
        if let Some(Input::Completed(c)) = pos.and_then(|p| self.seen.remove(p)) {
            return c.outcome;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let input = self.recv(left).await.unwrap_or_else(|| {
                panic!(
                    "no completion of {op} within {WAIT:?}; seen {:?}",
                    self.seen
                )
            });
            match input {
                Input::Completed(Completion { op: o, outcome }) if o == op => return outcome,
                other => self.seen.push_back(other),
            }
        }
    }

    /// Waits for the next inbound item (buffered first); other inputs stay buffered.
    pub async fn inbound(&mut self, d: Duration) -> Option<Inbound> {
        let pos = self
            .seen
            .iter()
            .position(|i| matches!(i, Input::Inbound(_)));
        if let Some(Input::Inbound(i)) = pos.and_then(|p| self.seen.remove(p)) {
            return Some(i);
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Input::Inbound(i) => return Some(i),
                other => self.seen.push_back(other),
            }
        }
    }
}

/// The reply, or a panic naming the outcome.
pub fn ok(outcome: Outcome<Reply>) -> Reply {
    match outcome {
        Outcome::Success(r) => r,
        other => panic!("expected success, got {other:?}"),
    }
}

/// A `cotal` process whose stdout lines are collected by a thread.
pub struct Proc {
    /// The child process.
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far (stdout and stderr).
    pub seen: Vec<String>,
    name: &'static str,
}

impl Proc {
    /// Starts `cotal ARGS` with piped stdin, stdout and stderr.
    pub fn spawn(name: &'static str, args: &[&str]) -> Proc {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cotal"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cotal");
        let (tx, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
            name,
        }
    }

    /// Waits up to `d` for a line for which `pred` holds.
    pub fn wait_for(&mut self, d: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = std::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// SIGKILL by its PID, then reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for a line for which `pred` holds and returns it.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        match self.wait_for(WAIT, &pred) {
            Some(line) => line,
            None => panic!("{}: no {what}; saw {:#?}", self.name, self.seen),
        }
    }

    /// Collects what arrives within `d`.
    pub fn settle(&mut self, d: Duration) {
        let deadline = std::time::Instant::now() + d;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            self.seen.push(line);
        }
    }

    /// Writes one line to its stdin.
    pub fn type_line(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("write stdin");
        stdin.flush().expect("flush");
    }

    /// Sends `SIG<sig>` by its PID.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Whether the process is still running (does not wait).
    #[allow(dead_code)]
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the exit code.
    pub fn exit_code(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not exit; saw {:#?}",
                self.name,
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An open space as `cotal up --space SPACE --default-class durable` and `cotal provision agent
/// --id ID --read '>' --apply` for each of `agents` leave it (each agent's ACL record; in open
/// mode the agents create their own consumers).
pub async fn provision_open_space(cfg: &ConnectConfig, space: &str, agents: &[&str]) {
    use cotal_core::policy::DeliveryClass;
    use cotal_core::time::UnixMillis;
    use cotal_core::wire::keys::{KvBucket, acl_key};
    use cotal_core::wire::records::AclRecord;
    use cotal_core::wire::token::{AgentId, Space};
    use cotal_driver_tokio::provision::{ensure_default_class, provision_space};
    let space = Space::new(space).expect("space");
    let conn = connect(cfg).await.expect("connect");
    let report = provision_space(&conn.client, &space, Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    ensure_default_class(
        &conn.client,
        &space,
        DeliveryClass::Durable,
        Duration::from_secs(5),
    )
    .await
    .expect("default class");
    let js = async_nats::jetstream::new(conn.client.clone());
    let acl = js
        .get_key_value(KvBucket::Acl.name(&space))
        .await
        .expect("acl bucket");
    for agent in agents {
        let record = AclRecord {
            allow_subscribe: vec![">".to_owned()],
            revision: 1,
            updated_at: UnixMillis(1),
            extra: Default::default(),
        };
        acl.put(
            acl_key(&AgentId::new(*agent).expect("id")),
            bytes::Bytes::from(serde_json::to_vec(&record).expect("encode")),
        )
        .await
        .expect("put acl");
    }
}

/// The permissions block `cotal provision …` printed: the lines from the `{` after the
/// `# nats-server user permissions` header to its closing `}`.
#[allow(dead_code)]
pub fn printed_block(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("# nats-server user permissions"))
        .skip(1)
        .take_while(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(block.first(), Some(&"{"), "{text}");
    assert_eq!(block.last(), Some(&"}"), "{text}");
    block.join("\n")
}
