//! Provider presets: where each API takes its key, where its keys live in the environment,
//! its base URL, and the signals of its answers that the classifier reads.

use std::borrow::Cow;

use http::HeaderName;

use crate::classify::DefaultClassifier;
use crate::config::Credential;
use crate::error::ConfigError;
use crate::keys::KeySet;

/// An API's conventions in one value, for [`KeyFallbackLayer::for_provider`] (keys from the
/// environment and the preset) or [`KeyFallbackBuilder::provider`] (the preset on keys you
/// have): how the key is sent, the environment variables the keys are read from, the base
/// URL, and a [`DefaultClassifier`] set for the provider's signals.
///
/// Every preset reads every provider's signals (the [`DefaultClassifier`] table): an answer
/// means the same whoever sent it. What a preset adds is listed with it, in the provider's
/// own words.
///
/// | Preset | Key sent as | Keys from | Base URL |
/// |---|---|---|---|
/// | [`groq`](Provider::groq) | `Authorization: Bearer` | `GROQ_API_KEY`, `GROQ_API_KEY_2`, … | `https://api.groq.com/openai/v1` |
/// | [`openai`](Provider::openai) | `Authorization: Bearer` | `OPENAI_API_KEY…` | `https://api.openai.com/v1` |
/// | [`azure_openai`](Provider::azure_openai) | `api-key` | `AZURE_OPENAI_API_KEY…` | your resource's endpoint |
/// | [`anthropic`](Provider::anthropic) | `x-api-key` | `ANTHROPIC_API_KEY…` | `https://api.anthropic.com/v1` |
/// | [`gemini`](Provider::gemini) | `x-goog-api-key` (or `?key=`) | `GEMINI_API_KEY…` | `https://generativelanguage.googleapis.com/v1beta` |
/// | [`openrouter`](Provider::openrouter) | `Authorization: Bearer` | `OPENROUTER_API_KEY…` | `https://openrouter.ai/api/v1` |
/// | [`mistral`](Provider::mistral) | `Authorization: Bearer` | `MISTRAL_API_KEY…` | `https://api.mistral.ai/v1` |
/// | [`together`](Provider::together) | `Authorization: Bearer` | `TOGETHER_API_KEY…` | `https://api.together.xyz/v1` |
/// | [`fireworks`](Provider::fireworks) | `Authorization: Bearer` | `FIREWORKS_API_KEY…` | `https://api.fireworks.ai/inference/v1` |
/// | [`deepseek`](Provider::deepseek) | `Authorization: Bearer` | `DEEPSEEK_API_KEY…` | `https://api.deepseek.com/v1` |
/// | [`openai_compatible`](Provider::openai_compatible) | `Authorization: Bearer` | `OPENAI_API_KEY…` | the one given |
///
/// ```
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, Provider};
///
/// let anthropic = Provider::anthropic();
/// assert_eq!(anthropic.env_prefix(), "ANTHROPIC_API_KEY");
/// let url = format!("{}/messages", anthropic.base_url());
/// assert_eq!(url, "https://api.anthropic.com/v1/messages");
///
/// // Keys you have, with the preset's credential and signals:
/// let keys = KeySet::new(["sk-ant-1", "sk-ant-2"])?;
/// let layer = KeyFallbackLayer::builder(keys).provider(anthropic).build();
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
///
/// [`KeyFallbackLayer::for_provider`]: crate::KeyFallbackLayer::for_provider
/// [`KeyFallbackBuilder::provider`]: crate::KeyFallbackBuilder::provider
#[derive(Debug, Clone)]
pub struct Provider {
    name: &'static str,
    env_prefix: Cow<'static, str>,
    base_url: Cow<'static, str>,
    credential: Credential,
    classifier: DefaultClassifier,
    /// A query parameter the API reads as a credential, removed from what the caller sent.
    strip_query: Option<&'static str>,
}

impl Provider {
    fn new(name: &'static str, env_prefix: &'static str, base_url: &'static str) -> Provider {
        Provider {
            name,
            env_prefix: Cow::Borrowed(env_prefix),
            base_url: Cow::Borrowed(base_url),
            credential: Credential::Bearer,
            classifier: DefaultClassifier::new(),
            strip_query: None,
        }
    }

    fn header(mut self, name: &'static str) -> Provider {
        self.credential = Credential::Header(HeaderName::from_static(name));
        self
    }

    fn should_retry(mut self) -> Provider {
        self.classifier = self.classifier.honor_should_retry(true);
        self
    }

    /// Groq. Also reads:
    /// - 429 `rate_limit_exceeded` "… on tokens per minute (TPM): Limit 15000 … Please try
    ///   again in 5.289s": rate limited for that long; the same code with "tokens per day
    ///   (TPD)" or "requests per day (RPD)": quota, until the time the message gives;
    /// - 413 "Request too large … please reduce your message size": the request's fault;
    /// - 498 "Flex Tier Capacity Exceeded": the provider's overload, not the key's;
    /// - 400 `organization_restricted`: the key is disabled; a 403 edge page (not JSON): the
    ///   request's fault;
    /// - a success with `x-ratelimit-remaining-requests: 0` (requests per day spent): the key
    ///   rests until `x-ratelimit-reset-requests`;
    /// - `x-should-retry` ([`DefaultClassifier::honor_should_retry`]).
    pub fn groq() -> Provider {
        Provider::new("groq", "GROQ_API_KEY", "https://api.groq.com/openai/v1").should_retry()
    }

    /// OpenAI. Also reads:
    /// - 429 `rate_limit_exceeded` / `slow_down`: rate limited, for `retry-after-ms`,
    ///   `retry-after`, `x-ratelimit-reset-*` or "Please try again in 3.89s";
    /// - 429 `insufficient_quota`, `credit_balance_exhausted`,
    ///   `organization_spend_limit_exceeded`, `project_spend_limit_exceeded`,
    ///   `organization_usage_limit_exceeded`: quota;
    /// - 429 "Request too large for gpt-4o …": the request's fault;
    /// - 401 `invalid_api_key`: disabled; 403 `unsupported_country_region_territory`: the
    ///   request's (every key would get it);
    /// - 503 `server_is_overloaded`: overload;
    /// - `x-should-retry`.
    pub fn openai() -> Provider {
        Provider::new("openai", "OPENAI_API_KEY", "https://api.openai.com/v1").should_retry()
    }

    /// Azure OpenAI, at `endpoint` (`https://<resource>.openai.azure.com/openai`). The key
    /// goes in `api-key`. Also reads:
    /// - 429 `code: "429"` "… Please retry after 6 seconds.": rate limited for that long;
    ///   "Please retry after 86400 seconds" (an hour or more): quota, until then;
    /// - 429 "The system is currently experiencing high demand …": overload;
    /// - 401 "Access denied due to invalid subscription key or wrong API endpoint": disabled;
    /// - `retry-after-ms` before `retry-after`; `x-should-retry`.
    pub fn azure_openai(endpoint: impl Into<String>) -> Provider {
        Provider {
            base_url: Cow::Owned(endpoint.into()),
            ..Provider::new("azure_openai", "AZURE_OPENAI_API_KEY", "")
        }
        .header("api-key")
        .should_retry()
    }

    /// Anthropic. The key goes in `x-api-key` (send `anthropic-version` yourself). Also reads:
    /// - 429 `rate_limit_error` with `retry-after`: rate limited;
    /// - 429 `rate_limit_error` with `details.error_code: enforced_spend_limit_reached`, "You
    ///   have reached your API usage limits … You will regain access on 2026-09-01 at 00:00
    ///   UTC.": quota, until that moment;
    /// - 400 "Your credit balance is too low …", "You have reached your specified API usage
    ///   limits": quota (a 400 that is not the request's fault);
    /// - 402 `billing_error`: quota; 401 `authentication_error` "invalid x-api-key": disabled;
    /// - 529 `overloaded_error` "Overloaded": overload; 413 `request_too_large`: the request's;
    /// - `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{remaining,reset}`
    ///   with RFC 3339 resets; `x-should-retry`.
    pub fn anthropic() -> Provider {
        Provider::new(
            "anthropic",
            "ANTHROPIC_API_KEY",
            "https://api.anthropic.com/v1",
        )
        .header("x-api-key")
        .should_retry()
    }

    /// Google Gemini (generativelanguage). The key goes in `x-goog-api-key`, and a `key` query
    /// parameter the caller sent is removed (Gemini would read it too);
    /// [`key_in_query`](Provider::key_in_query) puts the key in `?key=` instead. (Its
    /// OpenAI-compatible endpoint, `…/v1beta/openai`, takes `Authorization: Bearer`:
    /// `.with_credential(Credential::Bearer)`.) Also reads:
    /// - 429 `RESOURCE_EXHAUSTED` with a `QuotaFailure` whose `quotaId` is per minute
    ///   (`GenerateRequestsPerMinutePerProjectPerModel-FreeTier`): rate limited for
    ///   `RetryInfo.retryDelay` ("58s"), or "Please retry in 58.93s";
    /// - the same with a per-day `quotaId` (`GenerateRequestsPerDayPerProjectPerModel`):
    ///   quota until midnight Pacific time, when Google resets it; its `retryDelay` ("5s") is
    ///   not trusted;
    /// - "Quota exceeded for metric: …, limit: 0": quota (the tier has no allowance);
    /// - 400 `INVALID_ARGUMENT` with `ErrorInfo.reason: API_KEY_INVALID`, "API key not
    ///   valid. Please pass a valid API key.": disabled (a 400, not a 401);
    /// - 403 `PERMISSION_DENIED` "Your API key was reported as leaked. Please use another API
    ///   key." or "Your project has been denied access": disabled;
    /// - 503 `UNAVAILABLE` "The model is overloaded": overload; errors wrapped in a JSON array
    ///   (the OpenAI-compatible endpoint).
    ///
    /// Gemini counts limits per project, not per key: keys of one project belong in one
    /// [`group`](crate::KeyFallbackBuilder::group).
    pub fn gemini() -> Provider {
        Provider {
            // Gemini reads `?key=` too: a caller's own would go beside the pool's.
            strip_query: Some("key"),
            ..Provider::new(
                "gemini",
                "GEMINI_API_KEY",
                "https://generativelanguage.googleapis.com/v1beta",
            )
        }
        .header("x-goog-api-key")
    }

    /// OpenRouter. Also reads:
    /// - 402 "This request requires more credits, or fewer max_tokens": quota (credits);
    /// - 429 "Rate limit exceeded: free-models-per-day": quota, until `X-RateLimit-Reset`
    ///   (milliseconds since the Unix epoch, read by this preset only);
    /// - 401 "User not found." / "No auth credentials found": disabled; 403 with
    ///   `metadata.flagged_input` or `reasons` (moderation): the request's fault;
    /// - 502, 503: overload.
    pub fn openrouter() -> Provider {
        let mut p = Provider::new(
            "openrouter",
            "OPENROUTER_API_KEY",
            "https://openrouter.ai/api/v1",
        );
        p.classifier = p
            .classifier
            .reset_epoch_ms(HeaderName::from_static("x-ratelimit-reset"));
        p
    }

    /// Mistral. Also reads: 429 `{"message":"Requests rate limit exceeded"}` and `code:
    /// "1300"` / `type: rate_limited`: rate limited; 429 "Service tier capacity exceeded for
    /// this model.": overload, not the key's limit; 401 `{"detail":"Unauthorized"}`:
    /// disabled.
    pub fn mistral() -> Provider {
        Provider::new("mistral", "MISTRAL_API_KEY", "https://api.mistral.ai/v1")
    }

    /// Together AI. Also reads: 402 "monthly spending limit reached": quota; 429: rate
    /// limited; 503 "Engine Overloaded": overload; and every 403 as the request's fault,
    /// since Together answers 403 when "input tokens + `max_tokens` exceed the context
    /// length" (no key is blamed for it).
    pub fn together() -> Provider {
        let mut p = Provider::new(
            "together",
            "TOGETHER_API_KEY",
            "https://api.together.xyz/v1",
        );
        p.classifier = p.classifier.forbidden_is_request();
        p
    }

    /// Fireworks AI. Also reads: 402 "not on a paid plan, or usage limits exceeded": quota;
    /// 401 and 403: disabled; 429: rate limited; 5xx: overload. A 412 (account suspended,
    /// or a LoRA that failed to load) stays the request's fault: it cannot tell which.
    pub fn fireworks() -> Provider {
        Provider::new(
            "fireworks",
            "FIREWORKS_API_KEY",
            "https://api.fireworks.ai/inference/v1",
        )
    }

    /// DeepSeek. Also reads: 402 "Insufficient Balance": quota; 401 "Authentication
    /// Fails": disabled; 429 "Rate Limit Reached": rate limited; 503 "Server Overloaded":
    /// overload; 400 and 422 (invalid format or parameters): the request's fault.
    pub fn deepseek() -> Provider {
        Provider::new(
            "deepseek",
            "DEEPSEEK_API_KEY",
            "https://api.deepseek.com/v1",
        )
    }

    /// Any OpenAI-compatible API at `base_url` (vLLM, LM Studio, a company gateway, …):
    /// `Authorization: Bearer`, keys from `OPENAI_API_KEY…` (see
    /// [`with_env_prefix`](Provider::with_env_prefix)), every provider's signals and
    /// `x-should-retry`.
    pub fn openai_compatible(base_url: impl Into<String>) -> Provider {
        Provider {
            base_url: Cow::Owned(base_url.into()),
            ..Provider::new("openai_compatible", "OPENAI_API_KEY", "")
        }
        .should_retry()
    }

    /// The preset's name (`"groq"`, `"azure_openai"`, …): for logs and metrics.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The prefix of the environment variables its keys are read from
    /// ([`KeySet::from_env`]): `GROQ_API_KEY` for `GROQ_API_KEY`, `GROQ_API_KEY_2`, ….
    pub fn env_prefix(&self) -> &str {
        &self.env_prefix
    }

    /// The API's base URL, without a trailing `/`: paths such as `/chat/completions` go
    /// after it.
    pub fn base_url(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }

    /// How the key is sent.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The classifier set for the provider's signals.
    pub fn classifier(&self) -> &DefaultClassifier {
        &self.classifier
    }

    /// The keys from the environment variables of [`env_prefix`](Provider::env_prefix).
    pub fn keys_from_env(&self) -> Result<KeySet, ConfigError> {
        KeySet::from_env(&self.env_prefix)
    }

    /// Reads the keys from other variables (`GROQ_KEY`, `GROQ_KEY_2`, … for `"GROQ_KEY"`).
    pub fn with_env_prefix(mut self, prefix: impl Into<String>) -> Provider {
        self.env_prefix = Cow::Owned(prefix.into());
        self
    }

    /// Another base URL: a proxy, a region, a test server.
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Provider {
        self.base_url = Cow::Owned(base_url.into());
        self
    }

    /// Sends the key another way.
    pub fn with_credential(mut self, credential: Credential) -> Provider {
        self.credential = credential;
        self
    }

    /// Sends the key in the `key` query parameter (`?key=…`), as Gemini accepts it,
    /// replaced on every attempt. See [`Credential::Query`] for what that means for URLs
    /// that are logged.
    pub fn key_in_query(self) -> Provider {
        self.with_credential(Credential::Query("key".to_owned()))
    }

    /// Classifies with `classifier` instead: start from [`classifier`](Provider::classifier)
    /// to add patterns (`provider.classifier().clone().quota_pattern("…")`).
    pub fn with_classifier(mut self, classifier: DefaultClassifier) -> Provider {
        self.classifier = classifier;
        self
    }

    /// The credential, the classifier and the query credential to remove, for the builder.
    pub(crate) fn into_parts(self) -> (Credential, DefaultClassifier, Option<&'static str>) {
        (self.credential, self.classifier, self.strip_query)
    }
}
