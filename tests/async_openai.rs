//! End to end: async-openai's `Client` with [`KeyFallbackOpenAI`] as its HTTP service, against
//! the fake provider served over HTTP on 127.0.0.1: typed and streamed chat calls, with keys
//! that are rate limited, out of quota and invalid.
#![cfg(feature = "async-openai")]

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use futures_util::StreamExt;
use tower_key_fallback::testing::{Behavior, FakeProvider, FakeServer};
use tower_key_fallback::{KeyFallbackLayer, KeyFallbackOpenAI, KeySet, KeyState};

/// What the caller's own config says; it must never reach the server.
const CALLER_KEY: &str = "sk-caller-own-key-0000";
const ANSWER: &str = "Hello from the fake provider.";

/// Always refused with a 429 and `retry-after` (no request fits a window of none).
fn rate_limited() -> Behavior {
    Behavior::RateLimited {
        requests: 0,
        window: Duration::from_secs(60),
    }
}

async fn serve(keys: &[(&str, Behavior)]) -> (FakeProvider, FakeServer) {
    let mut builder = FakeProvider::builder();
    for (key, behavior) in keys {
        builder = builder.key(*key, behavior.clone());
    }
    let provider = builder.build();
    let server = provider.serve_ephemeral().await.unwrap();
    (provider, server)
}

/// async-openai's client for `server`, its HTTP through `layer`'s keys.
fn client(server: &FakeServer, layer: &KeyFallbackLayer) -> Client<OpenAIConfig> {
    // The tests' reqwest has rustls without a provider (the groq example's HTTPS): ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = OpenAIConfig::new()
        .with_api_base(server.url("/openai/v1"))
        .with_api_key(CALLER_KEY);
    Client::with_config(config)
        .with_http_service(KeyFallbackOpenAI::new(layer, ReqwestService::default()))
}

fn chat_request() -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("llama-3.1-8b-instant")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

#[tokio::test]
async fn typed_chat_falls_back_past_a_rate_limited_and_an_invalid_key() {
    let (provider, server) = serve(&[
        ("gsk_limited", rate_limited()),
        ("gsk_invalid", Behavior::InvalidKey),
        ("gsk_good", Behavior::Ok),
    ])
    .await;
    let layer = KeyFallbackLayer::new(KeySet::new(provider.keys()).unwrap());
    let handle = layer.handle();
    let client = client(&server, &layer);

    let res = client.chat().create(chat_request()).await.unwrap();
    assert_eq!(res.choices[0].message.content.as_deref(), Some(ANSWER));

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_limited").rate_limited, 1);
    assert_eq!(stats.key("gsk_invalid").unauthorized, 1);
    assert_eq!(stats.key("gsk_good").served, 1);
    assert_eq!(stats.total().requests, 3);

    let status = handle.status();
    assert!(
        matches!(status.keys[0].state, KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(50)),
        "{:?}",
        status.keys[0].state
    );
    assert!(
        matches!(status.keys[1].state, KeyState::Disabled { .. }),
        "{:?}",
        status.keys[1].state
    );
    assert_eq!(status.keys[2].state, KeyState::Active);
    assert_eq!(status.keys[2].requests, 1);

    // The next call goes straight to the key that serves.
    client.chat().create(chat_request()).await.unwrap();
    let stats = provider.stats();
    assert_eq!(stats.key("gsk_good").served, 2);
    assert_eq!(stats.total().requests, 4);
}

#[tokio::test]
async fn streamed_chat_falls_back_after_a_429_and_yields_every_chunk() {
    let (provider, server) =
        serve(&[("gsk_limited", rate_limited()), ("gsk_good", Behavior::Ok)]).await;
    let layer = KeyFallbackLayer::new(KeySet::new(provider.keys()).unwrap());
    let client = client(&server, &layer);

    let mut stream = client.chat().create_stream(chat_request()).await.unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(text, ANSWER);
    // A role event, one a word, the final one with the usage.
    assert_eq!(chunks, 8);

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_limited").rate_limited, 1);
    assert_eq!(stats.key("gsk_good").streamed, 1);
    assert_eq!(stats.total().requests, 2);
}

#[tokio::test]
async fn every_key_spent_is_an_exhausted_error() {
    let (provider, server) = serve(&[
        ("gsk_limited", rate_limited()),
        ("gsk_no_quota", Behavior::QuotaExhausted),
    ])
    .await;
    let layer = KeyFallbackLayer::new(KeySet::new(provider.keys()).unwrap());
    let client = client(&server, &layer);

    let err = client.chat().create(chat_request()).await.unwrap_err();
    let exhausted = KeyFallbackOpenAI::exhausted(&err).expect("an Exhausted error");
    assert_eq!(exhausted.attempts(), 2);
    assert_eq!(exhausted.last_status().map(|s| s.as_u16()), Some(429));
    let wait = exhausted.retry_after().expect("the rate limit's reset");
    assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
    // No secret in what the error shows.
    let shown = format!("{err} {err:?}");
    for key in ["gsk_limited", "gsk_no_quota", CALLER_KEY] {
        assert!(!shown.contains(key), "{shown}");
    }
    assert_eq!(provider.stats().total().requests, 2);

    // The next call sends nothing: no key can serve.
    let err = client.chat().create(chat_request()).await.unwrap_err();
    let exhausted = KeyFallbackOpenAI::into_exhausted(err).unwrap();
    assert_eq!(exhausted.attempts(), 0);
    assert_eq!(provider.stats().total().requests, 2);

    // Another error is given back as it is.
    let other = OpenAIError::InvalidArgument("x".into());
    assert!(KeyFallbackOpenAI::exhausted(&other).is_none());
    assert!(matches!(
        KeyFallbackOpenAI::into_exhausted(other),
        Err(OpenAIError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn every_key_spent_is_a_429_with_exhausted_response() {
    let (provider, server) = serve(&[("gsk_limited", rate_limited())]).await;
    let layer = KeyFallbackLayer::builder(KeySet::new(provider.keys()).unwrap())
        .exhausted_response(true)
        .build();
    let client = client(&server, &layer);

    let err = client.chat().create(chat_request()).await.unwrap_err();
    match &err {
        OpenAIError::ApiError(api) => assert_eq!(api.status_code.as_u16(), 429),
        other => panic!("expected the 429 answer, got {other:?}"),
    }
    assert!(KeyFallbackOpenAI::exhausted(&err).is_none());
    assert_eq!(provider.stats().total().requests, 1);
}

#[tokio::test]
async fn the_callers_own_key_never_reaches_the_server() {
    let (provider, server) = serve(&[("gsk_good", Behavior::Ok)]).await;
    let layer = KeyFallbackLayer::new(KeySet::new(provider.keys()).unwrap());
    let client = client(&server, &layer);

    client.chat().create(chat_request()).await.unwrap();
    let mut stream = client.chat().create_stream(chat_request()).await.unwrap();
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }

    let stats = provider.stats();
    assert_eq!(stats.key("gsk_good").served, 2);
    assert_eq!(stats.key(CALLER_KEY).requests, 0);
    // Every request the server saw carried a key of the pool.
    let seen: Vec<&str> = stats.iter().map(|(key, _)| key).collect();
    assert_eq!(seen, ["gsk_good"]);
}

#[tokio::test]
async fn a_server_that_is_gone_is_the_transport_error_handed_back() {
    let (provider, server) = serve(&[("gsk_good", Behavior::Ok)]).await;
    let layer = KeyFallbackLayer::new(KeySet::new(provider.keys()).unwrap());
    let client = client(&server, &layer);
    server.shutdown().await;

    // Connection refused: no key is to blame, and the client's own error comes back.
    let err = client.chat().create(chat_request()).await.unwrap_err();
    assert!(matches!(err, OpenAIError::Reqwest(_)), "{err:?}");
    assert_eq!(layer.handle().status().keys[0].state, KeyState::Active);
}
