//! A real chat completion against Groq over HTTPS, through reqwest with
//! [`KeyFallbackMiddleware`]: keys from the environment or a `.env` file, the answer, and the
//! state of every key afterwards.
//!
//! ```sh
//! # .env (or exported variables; those already set win over the file):
//! #   GROQ_API_KEY=gsk_...
//! #   GROQ_API_KEY_2=gsk_...
//! cargo run --example groq --features reqwest-middleware,dotenv -- "Why is the sky blue?"
//! ```
//!
//! `GROQ_MODEL` picks the model (default `llama-3.1-8b-instant`); `GROQ_BASE_URL` another
//! OpenAI-compatible endpoint (default `https://api.groq.com/openai/v1`). Exit codes: 0 with
//! an answer, 1 when Groq could not be reached or gave no answer, 2 when no key is configured.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use http_body_util::BodyExt;
use reqwest_middleware::ClientBuilder;
use tower_key_fallback::{KeyFallbackLayer, KeyFallbackMiddleware, KeyHandle, KeySet};

const BASE_URL: &str = "https://api.groq.com/openai/v1";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // reqwest is built with rustls and no crypto provider of its own: use ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let keys = match KeySet::from_env_and_dotenv("GROQ_API_KEY") {
        Ok(keys) => keys,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{} key(s): {}",
        keys.len(),
        keys.labels().collect::<Vec<_>>().join(", ")
    );

    let layer = KeyFallbackLayer::new(keys);
    let middleware = KeyFallbackMiddleware::new(&layer);
    let handle = middleware.handle();
    let reqwest = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: could not build the HTTP client: {}", chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let client = ClientBuilder::new(reqwest).with(middleware).build();

    let prompt = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let prompt = if prompt.is_empty() {
        "Say hello in one short sentence.".to_owned()
    } else {
        prompt
    };
    let model = std::env::var("GROQ_MODEL").unwrap_or_else(|_| "llama-3.1-8b-instant".to_owned());
    let base = std::env::var("GROQ_BASE_URL").unwrap_or_else(|_| BASE_URL.to_owned());
    let url = format!("{}/chat/completions", base.trim_end_matches('/'));
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or(base);
    let body = serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": prompt }],
    });

    let code = match client
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(res) => {
            let status = res.status();
            match res.text().await {
                Ok(text) if status.is_success() => match answer(&text) {
                    Some(answer) => {
                        println!("\n{answer}\n");
                        ExitCode::SUCCESS
                    }
                    None => {
                        eprintln!("error: Groq answered {status} without a message: {text}");
                        ExitCode::FAILURE
                    }
                },
                Ok(text) => {
                    eprintln!("error: Groq answered {status}: {text}");
                    ExitCode::FAILURE
                }
                Err(err) => {
                    eprintln!(
                        "error: Groq answered {status}, then the body failed: {}",
                        chain(&err)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => {
            report(&host, err).await;
            ExitCode::FAILURE
        }
    };
    print_status(&handle);
    code
}

/// Says why no answer came.
async fn report(host: &str, err: reqwest_middleware::Error) {
    let unreachable = |cause: &(dyn Error + 'static)| {
        eprintln!(
            "error: could not reach {host}: {}; this example needs network access",
            chain(cause)
        )
    };
    let mut exhausted = match KeyFallbackMiddleware::into_exhausted(err) {
        Ok(exhausted) => exhausted,
        // A transport error handed back as it is.
        Err(err) => return unreachable(&err),
    };
    let message = exhausted.to_string();
    match exhausted.take_last_response() {
        // Every key got an answer it could not use (429, 401, 5xx, …): show the last one.
        Some(last) => {
            let status = last.status();
            let body = match last.into_body().collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                Err(err) => format!("(the body failed: {err})"),
            };
            eprintln!("error: {message}\nlast answer, {status}: {body}");
        }
        None => match exhausted.source() {
            // Every attempt failed before an answer: DNS, connection, TLS or timeout.
            Some(cause) => unreachable(cause),
            // No key was usable at all.
            None => eprintln!("error: {message}"),
        },
    }
}

/// The message of a chat completion.
fn answer(text: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    let content = json.pointer("/choices/0/message/content")?.as_str()?;
    Some(content.trim().to_owned())
}

/// An error and its causes, joined by `: `.
fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cause = e.source();
    }
    out
}

fn print_status(handle: &KeyHandle) {
    println!(
        "{:<16} {:<12} {:>8} {:>9} {:>5} {:>6}  state",
        "key", "fingerprint", "requests", "successes", "429s", "errors"
    );
    for key in handle.status().keys {
        println!(
            "{:<16} {:<12} {:>8} {:>9} {:>5} {:>6}  {:?}",
            key.label,
            key.fingerprint,
            key.requests,
            key.successes,
            key.rate_limited,
            key.errors,
            key.state
        );
    }
}
