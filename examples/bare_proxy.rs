//! `cargo run --release --features gateway --example bare_proxy -- http://UPSTREAM`: the least
//! an HTTP/1.1 proxy can be, as a yardstick for `key-fallback-gateway` in
//! `scripts/gateway-load.py --bare-proxy`. It has no key pool, no routes, no limits, no logs:
//! it reads each request's body whole (as any proxy that may send a request again must), sends
//! the request to the upstream over a pooled connection, and streams the answer back. It runs
//! on one thread, like the gateway by default.
//!
//! ```text
//! bare_proxy http://HOST:PORT
//! ```
//!
//! Once it listens on 127.0.0.1 (a port the system picks) it prints one line,
//! `bare proxy: listening on http://ADDR`; it stops only when killed. Not for use in front of
//! anything real: it forwards whatever comes, to one upstream.

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;

fn main() -> ExitCode {
    let Some(authority) = std::env::args()
        .nth(1)
        .and_then(|url| url.parse::<http::Uri>().ok())
        .filter(|uri| uri.scheme() == Some(&Scheme::HTTP))
        .and_then(|uri| uri.authority().cloned())
    else {
        eprintln!("bare proxy: give the upstream as http://HOST:PORT");
        return ExitCode::from(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match runtime.block_on(serve(authority)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bare proxy: {err}");
            ExitCode::from(1)
        }
    }
}

async fn serve(authority: Authority) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let line = format!(
        "bare proxy: listening on http://{}\n",
        listener.local_addr()?
    );
    std::io::stdout().write_all(line.as_bytes())?;
    std::io::stdout().flush()?;
    // As the gateway's client: no Nagle delay on the upstream connections either.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let upstream: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (upstream, authority) = (upstream.clone(), authority.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                forward(upstream.clone(), authority.clone(), req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request: its body read whole, its URI pointed at the upstream, its answer as it comes.
async fn forward(
    upstream: Upstream,
    authority: Authority,
    req: http::Request<Incoming>,
) -> Result<http::Response<Incoming>, std::io::Error> {
    let (mut parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = http::Uri::from_parts(uri).map_err(std::io::Error::other)?;
    parts.headers.remove(http::header::HOST);
    upstream
        .request(http::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(std::io::Error::other)
}
