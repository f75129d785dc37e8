//! The layer stacked with a per-attempt `tower::timeout` inside and a `tower::retry` outside
//! that waits out `Exhausted::retry_after`, against a local server that rate limits like Groq.
//!
//! ```sh
//! cargo run --example compose --features retry
//! ```
//!
//! The server starts on 127.0.0.1 (a free port) and allows each key one request per second,
//! answering `429` with `retry-after-ms` beyond that; key 2's first request hangs, as a
//! stuck connection would. Six requests go out one after another; the example prints who
//! served each and how long it took, then the key status, and exits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};
use tower_key_fallback::{BoxError, Exhausted, KeyFallbackLayer, KeySet, RetryExhausted};

const WINDOW: Duration = Duration::from_secs(1);
const PER_ATTEMPT: Duration = Duration::from_millis(300);

/// Per key: the start of its current window and the requests seen in it, and whether it has
/// hung once already.
#[derive(Default)]
struct Limits {
    windows: HashMap<String, (Instant, u32)>,
    hung: bool,
}

async fn upstream(
    limits: Arc<Mutex<Limits>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let _ = req.into_body().collect().await;
    let verdict = {
        let mut limits = limits.lock().unwrap();
        if key == "gsk_demo_2" && !limits.hung {
            limits.hung = true;
            None
        } else {
            let now = Instant::now();
            let (start, used) = limits.windows.entry(key.clone()).or_insert((now, 0));
            if now.duration_since(*start) >= WINDOW {
                (*start, *used) = (now, 0);
            }
            *used += 1;
            Some((
                *used <= 1,
                WINDOW.saturating_sub(now.duration_since(*start)),
            ))
        }
    };
    let res = match verdict {
        // A stuck connection: the per-attempt timeout gives up on it.
        None => std::future::pending().await,
        Some((true, _)) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"choices":[{{"message":{{"content":"hello from {key}"}}}}]}}"#
            )))),
        Some((false, reset)) => Response::builder()
            .status(429)
            .header("content-type", "application/json")
            .header("retry-after-ms", reset.as_millis().max(1).to_string())
            .body(Full::new(Bytes::from_static(
                br#"{"error":{"message":"Rate limit reached on requests per minute (RPM)","type":"requests","code":"rate_limit_exceeded"}}"#,
            ))),
    };
    Ok(res.expect("a valid response"))
}

/// Starts the server on 127.0.0.1, port 0; it stops with the runtime.
async fn serve() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let limits = Arc::new(Mutex::new(Limits::default()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let limits = limits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| upstream(limits.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let addr = serve().await?;
    println!("local rate-limited server on http://{addr}\n");

    let layer = KeyFallbackLayer::new(KeySet::new(["gsk_demo_1", "gsk_demo_2"])?);
    let handle = layer.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        // Outside: when every key is cooling, wait for the first to come back (up to 5 s,
        // 3 times at most), then send the request again.
        .layer(RetryLayer::new(RetryExhausted::new(
            3,
            Duration::from_secs(5),
        )))
        .layer(layer)
        // Inside: each attempt gets 300 ms; a timeout moves the request to the next key.
        .timeout(PER_ATTEMPT)
        .service(client);

    let start = Instant::now();
    for i in 1..=6 {
        let req = Request::post(format!("http://{addr}/openai/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"Hi"}]}"#,
            )))?;
        let sent = Instant::now();
        match svc.clone().oneshot(req).await {
            Ok(res) => {
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                println!(
                    "request {i}: {status} in {:>4} ms: {}",
                    sent.elapsed().as_millis(),
                    String::from_utf8_lossy(&body)
                );
            }
            Err(err) => match err.downcast_ref::<Exhausted>() {
                Some(exhausted) => println!("request {i}: gave up: {exhausted}"),
                None => println!("request {i}: failed: {err}"),
            },
        }
    }
    println!("\n{} ms in all; keys:", start.elapsed().as_millis());
    for key in handle.status().keys {
        println!(
            "  {:<12} requests={} successes={} 429s={} errors={} {:?}",
            key.label, key.requests, key.successes, key.rate_limited, key.errors, key.state
        );
    }
    Ok(())
}
