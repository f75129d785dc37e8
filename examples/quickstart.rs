use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::{BoxError, KeyFallbackLayer, Provider};

#[tokio::main]
async fn main() {
    if let Err(err) = run().await {
        // Errors by their message: "no API key found: set GROQ_API_KEY …", never a key.
        eprintln!("error: {err}");
        let mut cause = err.source();
        while let Some(e) = cause {
            eprintln!("  caused by: {e}");
            cause = e.source();
        }
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    let groq = Provider::groq();
    // Keys from GROQ_API_KEY, GROQ_API_KEY_2, GROQ_API_KEY_3, ...
    let layer = KeyFallbackLayer::for_provider(groq.clone())?.build();
    let handle = layer.handle();

    // HTTPS with rustls (ring) and the bundled Mozilla roots.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_only()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let mut svc = ServiceBuilder::new().layer(layer).service(client);

    let req = http::Request::post(format!("{}/chat/completions", groq.base_url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"Hi"}]}"#,
        )))?;
    let res = svc.ready().await?.call(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!("{status}\n{}", String::from_utf8_lossy(&body));

    for key in handle.status().keys {
        println!(
            "{:<16} {:?} requests={}",
            key.label, key.state, key.requests
        );
    }
    Ok(())
}
