//! Connecting to NATS: the options a user expects, and one-line errors.
//!
//! [`ConnectConfig`] holds a URL list, one authentication method (creds file, nkey seed,
//! user/password or token), TLS (rustls, through async-nats), the inbox prefix and the reconnect
//! backoff. [`connect`] validates it, connects, and returns a [`NatsConnection`]: the client plus
//! the connection's event stream, which the [`crate::exec::Executor`] needs to see permission
//! refusals and connection loss (nats-notes §4.1: refusals arrive *only* through the event
//! callback).
//!
//! Rules:
//!
//! - The inbox prefix is set before the first request: a restricted agent may only subscribe to
//!   `_INBOX_<id>.>` (semantics §1.10), so every request and every JetStream call would time out
//!   with the library default `_INBOX` (nats-notes §4.3).
//! - The event callback never blocks: it forwards into an unbounded channel (the library drops
//!   events silently when its own 128-slot queue is full, nats-notes §3).
//! - The first connect fails fast with a clear error; after that the client reconnects forever
//!   with exponential backoff capped at [`ConnectConfig::reconnect_max_delay`].
//! - A server older than 2.10 silently ignores `filter_subjects` and `Nats-TTL` (nats-notes §2):
//!   [`connect`] logs a warning.

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::mpsc;

/// How to authenticate. At most one method.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A `.creds` file (user JWT + nkey seed).
    CredsFile(PathBuf),
    /// An nkey seed (`SU…`).
    NkeySeed(String),
    /// User and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A bearer token.
    Token(String),
}

/// TLS options (rustls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Require TLS even when the URL scheme is `nats://`.
    pub required: bool,
    /// Extra root CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Server URLs (`nats://host:port`, `tls://…`, or `host:port`). Several give a pool.
    pub urls: Vec<String>,
    /// Authentication.
    pub auth: Auth,
    /// TLS.
    pub tls: TlsConfig,
    /// The inbox prefix, e.g. `_INBOX_<id>` (see `AgentId::inbox_prefix`). `None`: `_INBOX`.
    pub inbox_prefix: Option<String>,
    /// The connection name the server shows.
    pub name: Option<String>,
    /// Timeout of the first TCP/TLS connect.
    pub connect_timeout: Duration,
    /// Default timeout of requests (JetStream API calls included).
    pub request_timeout: Duration,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max_delay: Duration,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            auth: Auth::None,
            tls: TlsConfig::default(),
            inbox_prefix: None,
            name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            reconnect_max_delay: Duration::from_secs(5),
        }
    }
}

impl ConnectConfig {
    /// A config for these URLs, everything else default.
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ConnectConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            ..ConnectConfig::default()
        }
    }

    /// Splits a comma-separated URL list (`--nats a,b`).
    pub fn parse_url_list(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The reconnect delay before attempt `attempts` (1-based): 100 ms doubling, capped.
    pub fn reconnect_delay(&self, attempts: usize) -> Duration {
        let exp = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(16);
        Duration::from_millis(100u64.saturating_mul(1u64 << exp)).min(self.reconnect_max_delay)
    }
}

/// A live connection: the client and its event stream (forwarded from the event callback).
#[derive(Debug)]
pub struct NatsConnection {
    /// The client.
    pub client: Client,
    /// Every connection event, in the order the library raised them.
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Why connecting failed. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No URL given.
    #[error("no NATS URL given (use --nats nats://host:port)")]
    NoUrl,
    /// A URL does not parse.
    #[error("invalid NATS URL '{url}': {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// Credentials could not be read.
    #[error("cannot read credentials file {path}: {reason}")]
    Creds {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The server refused the credentials.
    #[error("NATS server at {urls} refused the credentials: {reason}")]
    Auth {
        /// The URLs tried.
        urls: String,
        /// Why.
        reason: String,
    },
    /// TLS setup or handshake failed.
    #[error("TLS to {urls} failed: {reason}")]
    Tls {
        /// The URLs tried.
        urls: String,
        /// Why.
        reason: String,
    },
    /// No server could be reached.
    #[error("cannot reach NATS server at {urls}: {reason}")]
    Unreachable {
        /// The URLs tried.
        urls: String,
        /// Why.
        reason: String,
    },
}

/// Checks every URL without connecting.
pub fn parse_urls(urls: &[String]) -> Result<Vec<ServerAddr>, ConnectError> {
    if urls.is_empty() {
        return Err(ConnectError::NoUrl);
    }
    urls.iter()
        .map(|u| {
            ServerAddr::from_str(u).map_err(|e| ConnectError::BadUrl {
                url: u.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Connects with `config`.
pub async fn connect(config: &ConnectConfig) -> Result<NatsConnection, ConnectError> {
    let addrs = parse_urls(&config.urls)?;
    let urls = config.urls.join(",");
    let mut opts = match &config.auth {
        Auth::None => ConnectOptions::new(),
        Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| ConnectError::Creds {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        Auth::NkeySeed(seed) => ConnectOptions::with_nkey(seed.clone()),
        Auth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        Auth::Token(token) => ConnectOptions::with_token(token.clone()),
    };
    if config.tls.required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(prefix) = &config.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    if let Some(name) = &config.name {
        opts = opts.name(name);
    }
    let (tx, events) = mpsc::unbounded_channel();
    let backoff = config.clone();
    opts = opts
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| backoff.reconnect_delay(attempts))
        .event_callback(move |event| {
            // Never block the library's event task: forward and return.
            let _ = tx.send(event);
            async {}
        });
    let client = opts.connect(addrs).await.map_err(|e| {
        let reason = e.to_string();
        match e.kind() {
            ConnectErrorKind::ServerParse => ConnectError::BadUrl {
                url: urls.clone(),
                reason,
            },
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                ConnectError::Auth {
                    urls: urls.clone(),
                    reason,
                }
            }
            ConnectErrorKind::Tls => ConnectError::Tls {
                urls: urls.clone(),
                reason,
            },
            // async-nats reports a failed handshake (an untrusted or mismatched server
            // certificate) as an IO error: it is a TLS failure, not an unreachable server.
            ConnectErrorKind::Io if is_tls_failure(&reason) => ConnectError::Tls {
                urls: urls.clone(),
                reason,
            },
            _ => ConnectError::Unreachable {
                urls: urls.clone(),
                reason,
            },
        }
    })?;
    let info = client.server_info();
    if !client.is_server_compatible(2, 10, 0) {
        tracing::warn!(
            version = %info.version,
            "nats-server older than 2.10: filter_subjects and Nats-TTL fail open; use >= 2.11"
        );
    }
    Ok(NatsConnection { client, events })
}

/// Whether an IO error's text is a TLS handshake failure (rustls words).
fn is_tls_failure(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    ["certificate", "handshake", "tls"]
        .iter()
        .any(|w| r.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_split_and_bad_urls_are_named() {
        assert_eq!(
            ConnectConfig::parse_url_list("nats://a:1, b:2,,"),
            ["nats://a:1", "b:2"]
        );
        assert!(parse_urls(&["nats://127.0.0.1:4222".into()]).is_ok());
        let err = parse_urls(&["nats://host:notaport".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("invalid NATS URL 'nats://host:notaport'"),
            "{err}"
        );
        assert!(matches!(parse_urls(&[]), Err(ConnectError::NoUrl)));
    }

    #[test]
    fn reconnect_backoff_doubles_and_is_capped() {
        let c = ConnectConfig::default();
        assert_eq!(c.reconnect_delay(1), Duration::from_millis(100));
        assert_eq!(c.reconnect_delay(2), Duration::from_millis(200));
        assert_eq!(c.reconnect_delay(4), Duration::from_millis(800));
        assert_eq!(c.reconnect_delay(100), Duration::from_secs(5));
    }
}
