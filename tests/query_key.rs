//! A key sent in the URL's query (`Credential::Query`, Gemini's `?key=`) through the reqwest
//! middleware: replaced on every attempt, and kept out of what the caller gets back, since
//! reqwest keeps the URL it sent to in responses and prints it in errors.
#![cfg(feature = "reqwest-middleware")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use reqwest_middleware::ClientBuilder;
use tokio::net::TcpListener;
use tower_key_fallback::{KeyFallbackLayer, KeyFallbackMiddleware, KeySet, Provider};

const GEMINI_429: &str = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;

#[tokio::test]
async fn the_query_key_is_replaced_and_never_handed_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let queries = Arc::new(Mutex::new(Vec::new()));
    let seen = queries.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let query = req.uri().query().unwrap_or("").to_owned();
                let first = query.contains("AIzaFirstSecret");
                seen.lock().unwrap().push(query);
                async move {
                    let (status, body) = if first {
                        (429, GEMINI_429)
                    } else {
                        (200, "{}")
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let layer =
        KeyFallbackLayer::builder(KeySet::new(["AIzaFirstSecret", "AIzaSecondSecret"]).unwrap())
            .provider(Provider::gemini().key_in_query())
            .build();
    // reqwest is built with `rustls-no-provider` here: ring is the provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(KeyFallbackMiddleware::new(&layer))
        .build();
    let url = format!("http://{addr}/v1beta/models/m:generateContent?alt=sse&key=mine");
    let res = client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The caller's URL, not the one the key went out in.
    assert_eq!(res.url().as_str(), url);
    assert_eq!(
        *queries.lock().unwrap(),
        [
            "alt=sse&key=AIzaFirstSecret",
            "alt=sse&key=AIzaSecondSecret"
        ]
    );

    // An upstream that is gone: the error handed back names no key.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let err = client
        .post(format!(
            "http://{gone_addr}/v1beta/models/m:generateContent"
        ))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("Secret"), "{text}");
    }
}
