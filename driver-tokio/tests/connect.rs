//! Connection options against real nats-server configs (skipped when `COTAL_NATS_SERVER` is
//! unset): user/password, token, nkey seed, TLS with a private CA, and a creds file (an
//! operator → account → user JWT chain signed here with nkeys). Each option connects with the
//! right secret, and a wrong secret fails with one clear line; the `cotal` command line exposes
//! each of them (flags and environment variables).

use base64::Engine;
use cotal_driver_tokio::connect::{Auth, ConnectConfig, ConnectError, TlsConfig, connect};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server with a given config body, on a random loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server with `body` appended to its `listen` line; `None` (skip) without a binary.
    fn start(dir: tempfile::TempDir, body: &str) -> Option<Server> {
        let Some(bin) = std::env::var_os("COTAL_NATS_SERVER") else {
            println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = dir.path().join("server.conf");
        std::fs::write(&conf, format!("listen: \"127.0.0.1:{port}\"\n{body}"))
            .expect("write config");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Server { child, port, dir })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn config(&self, auth: Auth) -> ConnectConfig {
        let mut c = ConnectConfig::new([self.url()]);
        c.auth = auth;
        c.connect_timeout = Duration::from_secs(3);
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects, asserts the connection works (a round trip), and returns how long it took.
async fn connects(config: &ConnectConfig) -> Duration {
    let started = Instant::now();
    let conn = connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect with the right secret: {e}"));
    conn.client.flush().await.expect("flush");
    // A request is a real round trip (no responders is an answer from the server).
    let r = conn
        .client
        .request("cotal.connect.test", bytes::Bytes::new())
        .await;
    assert!(
        matches!(&r, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
        "{r:?}"
    );
    started.elapsed()
}

/// Connecting fails; returns the one-line error.
async fn refused(config: &ConnectConfig) -> (ConnectError, String) {
    let err = match connect(config).await {
        Ok(_) => panic!("connect with a wrong secret succeeded"),
        Err(e) => e,
    };
    let line = err.to_string();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    (err, line)
}

fn cotal(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cotal"));
    cmd.args(args);
    for var in [
        "NATS_URL",
        "NATS_CREDS",
        "NATS_NKEY",
        "NATS_USER",
        "NATS_PASSWORD",
        "NATS_TOKEN",
        "NATS_TLS_CA",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cotal");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `cotal channels --space s` is a one-shot read that connects first: its exit code and first
/// line tell whether the credentials were accepted (the space does not exist on these servers).
fn cli_connect_error(out: &(Option<i32>, String)) -> Option<String> {
    println!("cotal: exit {:?}: {}", out.0, out.1.trim_end());
    out.1
        .lines()
        .find(|l| l.starts_with("cotal: error:") && l.contains("refused the credentials"))
        .map(str::to_owned)
        .or_else(|| {
            out.1
                .lines()
                .find(|l| l.starts_with("cotal: error: TLS"))
                .map(str::to_owned)
        })
}

/// The command connected: it got as far as asking JetStream (these servers run without it, so
/// the request has no responders).
fn assert_cli_connected(out: &(Option<i32>, String)) {
    assert_eq!(cli_connect_error(out), None, "{out:?}");
    assert!(
        out.1.contains("cannot read stream CHAT_s: no responders"),
        "{out:?}"
    );
}

#[tokio::test]
async fn user_and_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(server) = Server::start(
        dir,
        "authorization { users = [ { user: \"ann\", password: \"s3cret\" } ] }\n",
    ) else {
        return;
    };
    let ok = |password: &str| {
        server.config(Auth::UserPassword {
            user: "ann".into(),
            password: password.into(),
        })
    };
    let took = connects(&ok("s3cret")).await;
    println!("user/password connect + round trip: {took:?}");
    let (err, line) = refused(&ok("wrong")).await;
    assert!(matches!(err, ConnectError::Auth { .. }), "{line}");
    assert!(
        line.starts_with(&format!(
            "NATS server at {} refused the credentials:",
            server.url()
        )),
        "{line}"
    );
    // The command line: flags, and the environment variables for the secret.
    let url = server.url();
    let good = cotal(
        &["channels", "--space", "s", "--nats", &url, "--user", "ann"],
        &[("NATS_PASSWORD", "s3cret")],
    );
    assert_cli_connected(&good);
    let bad = cotal(
        &[
            "channels",
            "--space",
            "s",
            "--nats",
            &url,
            "--user",
            "ann",
            "--password",
            "nope",
        ],
        &[],
    );
    assert_eq!(bad.0, Some(1), "{bad:?}");
    assert!(cli_connect_error(&bad).is_some(), "{bad:?}");
    assert_eq!(bad.1.lines().count(), 1, "{bad:?}");
}

#[tokio::test]
async fn token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(server) = Server::start(dir, "authorization { token: \"t0ken-xyz\" }\n") else {
        return;
    };
    connects(&server.config(Auth::Token("t0ken-xyz".into()))).await;
    let (err, line) = refused(&server.config(Auth::Token("t0ken-abc".into()))).await;
    assert!(matches!(err, ConnectError::Auth { .. }), "{line}");
    let (_, line) = refused(&server.config(Auth::None)).await;
    assert!(line.contains("refused the credentials"), "{line}");
    let url = server.url();
    let good = cotal(
        &["channels", "--space", "s", "--nats", &url],
        &[("NATS_TOKEN", "t0ken-xyz")],
    );
    assert_cli_connected(&good);
    let bad = cotal(
        &["channels", "--space", "s", "--nats", &url, "--token", "x"],
        &[],
    );
    assert_eq!(bad.0, Some(1), "{bad:?}");
    assert!(cli_connect_error(&bad).is_some(), "{bad:?}");
}

#[tokio::test]
async fn nkey_seed() {
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(server) = Server::start(
        dir,
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    ) else {
        return;
    };
    let seed = user.seed().expect("seed");
    connects(&server.config(Auth::NkeySeed(seed.clone()))).await;
    let (err, line) = refused(&server.config(Auth::NkeySeed(other.seed().expect("seed")))).await;
    assert!(matches!(err, ConnectError::Auth { .. }), "{line}");
    // The command line reads the seed from a file (--nkey or NATS_NKEY).
    let seed_file = server.path("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("seed file");
    let wrong_file = server.path("other.nk");
    std::fs::write(&wrong_file, other.seed().expect("seed")).expect("seed file");
    let url = server.url();
    let seed_path = seed_file.display().to_string();
    let good = cotal(
        &["channels", "--space", "s", "--nats", &url],
        &[("NATS_NKEY", &seed_path)],
    );
    assert_cli_connected(&good);
    let bad = cotal(
        &[
            "channels",
            "--space",
            "s",
            "--nats",
            &url,
            "--nkey",
            &wrong_file.display().to_string(),
        ],
        &[],
    );
    assert_eq!(bad.0, Some(1), "{bad:?}");
    assert!(cli_connect_error(&bad).is_some(), "{bad:?}");
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a server certificate for 127.0.0.1 / localhost, in `dir`.
fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=cotal test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    if std::env::var_os("COTAL_NATS_SERVER").is_none() {
        println!("skipping: COTAL_NATS_SERVER is not set (scripts/test.sh sets it)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    make_certs(dir.path());
    let body = format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\n",
        dir.path().join("server.pem").display().to_string(),
        dir.path().join("server.key").display().to_string()
    );
    let Some(server) = Server::start(dir, &body) else {
        return;
    };
    let ca = server.path("ca.pem");
    let mut good = server.config(Auth::None);
    good.tls = TlsConfig {
        required: true,
        ca_file: Some(ca.clone()),
        client_cert: None,
    };
    let took = connects(&good).await;
    println!("TLS connect + round trip: {took:?}");
    // Without our CA the server's certificate is not trusted.
    let mut untrusted = good.clone();
    untrusted.tls.ca_file = None;
    let (err, line) = refused(&untrusted).await;
    assert!(matches!(err, ConnectError::Tls { .. }), "{line}");
    assert!(line.starts_with("TLS to nats://127.0.0.1:"), "{line}");
    // The command line: --tls with NATS_TLS_CA, and a refusal without the CA.
    let url = server.url();
    let ca_path = ca.display().to_string();
    let ok = cotal(
        &["channels", "--space", "s", "--nats", &url, "--tls"],
        &[("NATS_TLS_CA", &ca_path)],
    );
    assert_cli_connected(&ok);
    let bad = cotal(&["channels", "--space", "s", "--nats", &url, "--tls"], &[]);
    assert_eq!(bad.0, Some(1), "{bad:?}");
    assert!(cli_connect_error(&bad).is_some(), "{bad:?}");
    assert_eq!(bad.1.lines().count(), 1, "{bad:?}");
}

// ---------------------------------------------------------------------------------------------
// Creds: an operator → account → user JWT chain
// ---------------------------------------------------------------------------------------------

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A NATS JWT (`ed25519-nkey`) of `nats` claims about `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{:X}", iat.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ subject.len() as u64),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64(claims.to_string().as_bytes());
    let input = format!("{header}.{body}");
    let sig = issuer.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn creds_text(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test]
async fn creds_file() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "cotal-test-op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "cotal-test-acc",
        serde_json::json!({
            "type": "account", "version": 2,
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": true, "conn": -1, "leaf": -1},
            "default_permissions": {"pub": {}, "sub": {}},
        }),
    );
    let user_claims = serde_json::json!({
        "type": "user", "version": 2, "pub": {}, "sub": {},
        "subs": -1, "data": -1, "payload": -1,
    });
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "cotal-test-user",
        user_claims.clone(),
    );
    // A user signed by an account the operator never issued.
    let rogue = nkeys::KeyPair::new_account();
    let rogue_jwt = jwt(&rogue, &user.public_key(), "rogue", user_claims);
    let dir = tempfile::tempdir().expect("temp dir");
    let body = format!(
        "operator: {op_jwt}\nresolver: MEMORY\nresolver_preload: {{ {}: {acc_jwt} }}\n",
        account.public_key()
    );
    let Some(server) = Server::start(dir, &body) else {
        return;
    };
    let seed = user.seed().expect("seed");
    let good_path = server.path("user.creds");
    std::fs::write(&good_path, creds_text(&user_jwt, &seed)).expect("creds");
    let rogue_path = server.path("rogue.creds");
    std::fs::write(&rogue_path, creds_text(&rogue_jwt, &seed)).expect("creds");
    let wrong_seed_path = server.path("wrong-seed.creds");
    std::fs::write(
        &wrong_seed_path,
        creds_text(&user_jwt, &nkeys::KeyPair::new_user().seed().expect("seed")),
    )
    .expect("creds");
    let took = connects(&server.config(Auth::CredsFile(good_path.clone()))).await;
    println!("creds connect + round trip: {took:?}");
    for bad in [&rogue_path, &wrong_seed_path] {
        let (err, line) = refused(&server.config(Auth::CredsFile(bad.clone()))).await;
        assert!(matches!(err, ConnectError::Auth { .. }), "{line}");
    }
    let (err, line) = refused(&server.config(Auth::CredsFile(server.path("missing.creds")))).await;
    assert!(matches!(err, ConnectError::Creds { .. }), "{line}");
    assert!(line.starts_with("cannot read credentials file "), "{line}");
    let url = server.url();
    let good = cotal(
        &["channels", "--space", "s", "--nats", &url],
        &[("NATS_CREDS", &good_path.display().to_string())],
    );
    assert_cli_connected(&good);
    let bad = cotal(
        &[
            "channels",
            "--space",
            "s",
            "--nats",
            &url,
            "--creds",
            &rogue_path.display().to_string(),
        ],
        &[],
    );
    assert_eq!(bad.0, Some(1), "{bad:?}");
    assert!(cli_connect_error(&bad).is_some(), "{bad:?}");
}
