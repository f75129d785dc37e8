//! Serving the fake provider over HTTP/1.1 with hyper.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::FakeProvider;

/// A [`FakeProvider`] served over HTTP/1.1. Made by [`FakeProvider::serve`] and
/// [`FakeProvider::serve_ephemeral`].
///
/// It serves until [`shutdown`](FakeServer::shutdown) or until dropped; either closes the
/// listener and every open connection. It must be made inside a tokio runtime.
///
/// ```
/// use tower_key_fallback::testing::{Behavior, FakeProvider};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let provider = FakeProvider::builder().key("gsk_a", Behavior::Ok).build();
/// let server = provider.serve_ephemeral().await?;
/// assert!(server.addr().ip().is_loopback());
/// assert_eq!(
///     server.url("/openai/v1/chat/completions"),
///     format!("http://127.0.0.1:{}/openai/v1/chat/completions", server.addr().port()),
/// );
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct FakeServer {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeServer {
    pub(super) async fn start(provider: FakeProvider, addr: SocketAddr) -> io::Result<FakeServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, provider));
        Ok(FakeServer {
            addr,
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`: the URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server: the listener is closed and open connections are dropped. When it
    /// returns the port is free.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The accept loop owns the listener and the connections: once it is gone, so
            // are they. The error is the cancellation itself.
            let _ = task.await;
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts connections until aborted. Aborting it drops the listener and `_alive`, which
/// tells every connection task to close its connection.
async fn accept(listener: TcpListener, provider: FakeProvider) {
    let (_alive, closed) = watch::channel(());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::debug!(error = %err, "fake provider: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let provider = provider.clone();
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let provider = provider.clone();
                async move { Ok::<_, std::convert::Infallible>(provider.respond(req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let mut conn = pin!(conn);
            // Resolves (with an error) once the server is gone; nothing is ever sent.
            let mut server_gone = pin!(closed.changed());
            let result = poll_fn(|cx| {
                if server_gone.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
                conn.as_mut().poll(cx)
            })
            .await;
            if let Err(err) = result {
                tracing::debug!(error = %err, "fake provider: connection ended with an error");
            }
        });
    }
}
