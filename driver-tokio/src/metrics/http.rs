//! A minimal HTTP/1.1 responder for `GET /metrics`: no framework, one short-lived task per
//! connection, every request bounded in size and time, and the connection closed after one
//! answer. Anything else gets a clear status line (400, 404, 405, 431, 503), never a crash.

use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// The media type of the body (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The longest request head read (request line and headers): a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long writing the answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections answered at once; one more is answered 503 and closed.
const MAX_CONNECTIONS: usize = 16;

/// What renders the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Serves `render()` on `GET /metrics` (and `GET /metrics/`) from `listener` until the task is
/// aborted or the runtime ends. Returns the accept loop's task.
pub fn serve(listener: TcpListener, render: Render) -> JoinHandle<()> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: say so, breathe, go on.
                    tracing::warn!(target: "cotal", "metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = answer(&mut stream, 503, "text/plain", "busy\n").await;
                });
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                if let Err(e) = one_request(&mut stream, &render).await {
                    tracing::debug!(target: "cotal", "metrics: request from {peer}: {e}");
                }
                drop(permit);
            });
        }
    })
}

/// The request head read from a client, or why it has none.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Method and target of a well-formed request line.
    Request { method: String, target: String },
    /// The head grew past [`MAX_REQUEST_BYTES`].
    TooLarge,
    /// Not an HTTP/1.x request line.
    Malformed,
}

async fn one_request(stream: &mut TcpStream, render: &Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()), // a silent client: close
    };
    let (status, kind, body) = match head {
        Head::TooLarge => (431, "text/plain", "request head too large\n".to_owned()),
        Head::Malformed => (400, "text/plain", "bad request\n".to_owned()),
        Head::Request { method, target } => {
            let path = target.split('?').next().unwrap_or_default();
            match (method.as_str(), path) {
                ("GET", "/metrics" | "/metrics/") => (200, CONTENT_TYPE, render().await),
                ("GET", _) => (
                    404,
                    "text/plain",
                    "not found: the metrics are at /metrics\n".to_owned(),
                ),
                _ => (
                    405,
                    "text/plain",
                    "method not allowed: GET /metrics\n".to_owned(),
                ),
            }
        }
    };
    tokio::time::timeout(WRITE_TIMEOUT, answer(stream, status, kind, &body))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Reads up to the blank line that ends the head, at most [`MAX_REQUEST_BYTES`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Malformed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            return Ok(parse_head(&buf[..end]));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The request line of `head`: `METHOD TARGET HTTP/1.x`.
fn parse_head(head: &[u8]) -> Head {
    let Ok(text) = std::str::from_utf8(head) else {
        return Head::Malformed;
    };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None)
            if !method.is_empty()
                && method.bytes().all(|b| b.is_ascii_uppercase())
                && target.starts_with('/')
                && version.starts_with("HTTP/1.") =>
        {
            Head::Request {
                method: method.to_owned(),
                target: target.to_owned(),
            }
        }
        _ => Head::Malformed,
    }
}

async fn answer(
    stream: &mut TcpStream,
    status: u16,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_are_refused() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Head::Request {
                method: "GET".into(),
                target: "/metrics".into()
            }
        );
        assert_eq!(parse_head(b"GET /metrics"), Head::Malformed);
        assert_eq!(parse_head(b"get /metrics HTTP/1.1"), Head::Malformed);
        assert_eq!(parse_head(b"GET metrics HTTP/1.1"), Head::Malformed);
        assert_eq!(parse_head(b"GET /metrics SPDY/3"), Head::Malformed);
        assert_eq!(parse_head(b"\xff\xfe"), Head::Malformed);
        assert_eq!(parse_head(b""), Head::Malformed);
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The server may answer (and close) before the whole request is written.
        let _ = s.write_all(request).await;
        let mut out = String::new();
        let read = s.read_to_string(&mut out);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an answer in time")
            .expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest_without_stopping() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let render: Render = Arc::new(|| Box::pin(async { "# EOF\n".to_owned() }));
        let task = serve(listener, render);
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("\r\n\r\n# EOF\n"), "{ok}");
        let lost = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(lost.starts_with("HTTP/1.1 404 "), "{lost}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET"),
            "{post}"
        );
        let junk = exchange(addr, b"\x16\x03\x01 hello\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 2 * MAX_REQUEST_BYTES));
        let big = exchange(addr, &huge).await;
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        // A client that connects and closes at once changes nothing.
        drop(TcpStream::connect(addr).await.expect("connect"));
        let again = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
        task.abort();
    }
}
