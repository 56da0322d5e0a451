//! The stdio transport, wrapped so that the server learns when each response has been written
//! out: a `cotal_inbox` result's messages are acknowledged only then (see [`super::inbox`]).

use rmcp::RoleServer;
use rmcp::model::{JsonRpcMessage, RequestId};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::sync::mpsc;

/// The key a response's request id is known by.
pub fn request_key(id: &RequestId) -> String {
    serde_json::to_string(id).unwrap_or_default()
}

/// A transport that reports, for each response or error it sends, whether it was written.
pub struct Written<T> {
    inner: T,
    written: mpsc::UnboundedSender<(String, bool)>,
}

impl<T> Written<T> {
    /// Wraps `inner`; each response's outcome goes to `written` as `(request key, written)`.
    pub fn new(inner: T, written: mpsc::UnboundedSender<(String, bool)>) -> Self {
        Written { inner, written }
    }
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Written<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let answered = match &item {
            JsonRpcMessage::Response(r) => Some((request_key(&r.id), true)),
            JsonRpcMessage::Error(e) => e.id.as_ref().map(|id| (request_key(id), false)),
            _ => None,
        };
        let send = self.inner.send(item);
        let written = self.written.clone();
        async move {
            let result = send.await;
            if let Some((key, ok)) = answered {
                let _ = written.send((key, ok && result.is_ok()));
            }
            result
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleServer>>> + Send {
        self.inner.receive()
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
