//! Telling apart what a response means for the key that was used.
//!
//! Classification runs in two steps so that success bodies are never touched:
//! [`Classify::classify_head`] sees the status and headers and either decides or asks for the
//! body; only then is a bounded prefix of the body read and passed to
//! [`Classify::classify_body`]. [`DefaultClassifier`] knows the signals of Groq, OpenAI,
//! Anthropic, Gemini, Azure OpenAI, Mistral and OpenRouter; its body patterns can be extended.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

use crate::parse;

/// What a response means for the key that was used to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The key served the request. The response is handed back untouched.
    Success,
    /// The key served the request, but the provider says its allowance is used up
    /// (`x-ratelimit-remaining-requests: 0`). The response is handed back and the key cools
    /// down for `retry_after` before another request is spent on a 429.
    Drained {
        /// How long until the provider replenishes the allowance.
        retry_after: Duration,
    },
    /// A short-window rate limit (per second, minute). The key cools down for `retry_after`,
    /// or for the configured default when the provider gave no time, and the request is
    /// replayed with the next key.
    RateLimited {
        /// The provider's reset time, when it gave one.
        retry_after: Option<Duration>,
    },
    /// A daily, monthly or billing quota is used up. The key cools down for a long time (the
    /// reset time given, or the configured quota cooldown) and the request is replayed.
    QuotaExhausted {
        /// The provider's reset time, when it gave a believable one.
        retry_after: Option<Duration>,
    },
    /// The key is invalid, revoked or not allowed. It is disabled until reset or rotated,
    /// and the request is replayed with the next key.
    InvalidKey,
    /// The provider is overloaded or failing (500, 502, 503, 504, 529, Groq's 498). One error
    /// counts against the key and the request is replayed with the next key.
    ServerError,
    /// The request itself is at fault (400, 404, 413, 422, "request too large", …). It is
    /// handed back as is and no key is blamed: another key would get the same answer.
    RequestFault,
}

impl Verdict {
    /// Whether the key is at fault, so the request should be replayed with another key.
    pub fn is_key_fault(&self) -> bool {
        matches!(
            self,
            Verdict::RateLimited { .. }
                | Verdict::QuotaExhausted { .. }
                | Verdict::InvalidKey
                | Verdict::ServerError
        )
    }
}

/// The result of looking at a response's status and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadVerdict {
    /// Decided from the head alone.
    Done(Verdict),
    /// Read up to the body-inspection limit of the body, then call
    /// [`Classify::classify_body`].
    InspectBody,
}

/// Decides what a response means for the key that got it.
///
/// Implement this to teach the layer another provider's signals; delegate to
/// [`DefaultClassifier`] for everything you do not handle yourself.
///
/// ```
/// use http::{HeaderMap, HeaderName, StatusCode};
/// use tower_key_fallback::{Classify, DefaultClassifier, HeadVerdict, Verdict};
///
/// /// A provider that answers 420 when a key is rate limited.
/// struct MyProvider(DefaultClassifier);
///
/// impl Classify for MyProvider {
///     fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict {
///         if status.as_u16() == 420 {
///             return HeadVerdict::Done(Verdict::RateLimited { retry_after: None });
///         }
///         self.0.classify_head(status, headers)
///     }
///     fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
///         self.0.classify_body(status, headers, body)
///     }
/// }
///
/// let c = MyProvider(DefaultClassifier::new());
/// let v = c.classify_head(StatusCode::from_u16(420).unwrap(), &HeaderMap::new());
/// assert_eq!(v, HeadVerdict::Done(Verdict::RateLimited { retry_after: None }));
/// ```
pub trait Classify: Send + Sync + 'static {
    /// Classifies from the status and headers, or asks for the body.
    fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict;

    /// Classifies with a prefix of the body (at most the configured inspection limit).
    fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict;
}

/// The signals of the common LLM providers, with configurable body patterns.
///
/// | Response | Verdict |
/// |---|---|
/// | 2xx with `x-ratelimit-remaining-requests` or `-tokens` (or Anthropic's `anthropic-ratelimit-*-remaining`) at `0` | [`Verdict::Drained`] until the matching reset |
/// | other 1xx/2xx/3xx | [`Verdict::Success`] |
/// | 429 "Request too large … reduce" | [`Verdict::RequestFault`] |
/// | 429 "capacity exceeded", "high demand" | [`Verdict::ServerError`] |
/// | 429 with a quota pattern (`insufficient_quota`, `(TPD)`, `PerDay`, `limit: 0`, …) | [`Verdict::QuotaExhausted`] |
/// | other 429 | [`Verdict::RateLimited`] |
/// | 401 | [`Verdict::InvalidKey`] |
/// | 402 | [`Verdict::QuotaExhausted`] |
/// | 403 with an HTML body (an edge block) or a region refusal | [`Verdict::RequestFault`] |
/// | other 403 | [`Verdict::InvalidKey`] |
/// | 400 with an invalid-key pattern (Gemini's `API_KEY_INVALID`, `organization_restricted`) | [`Verdict::InvalidKey`] |
/// | 400 with a quota pattern (Anthropic's "credit balance is too low") | [`Verdict::QuotaExhausted`] |
/// | 408, 498, 500, 502, 503, 504, 529 and other 5xx but 501 and 505 | [`Verdict::ServerError`] |
/// | any other status (400, 404, 413, 422, …) | [`Verdict::RequestFault`] |
///
/// Reset times are read, in this order, from `retry-after-ms`, `retry-after` (seconds or an
/// HTTP date), `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (Go durations such as
/// `2m59.56s`), and hints in the body ("try again in 9.54s", `"retryDelay": "15s"`,
/// "retry after 6 seconds"). A rate limit whose reset is an hour or more away is reported as
/// an exhausted quota (Azure's "retry after 86400 seconds").
#[derive(Debug, Clone)]
pub struct DefaultClassifier {
    patterns: Patterns,
    long_wait_is_quota: Duration,
}

/// What a body pattern marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Quota = 1,
    InvalidKey = 2,
    TooLarge = 4,
    Overloaded = 8,
    NotKey = 16,
}

/// Body patterns, found by an Aho-Corasick automaton over the ASCII-lowercased body, so the
/// cost grows with the body, not with the number of patterns, and its literal prefilter skips
/// most of the text. The search restarts one byte after each match's start, so patterns that
/// overlap in the text are all found; of patterns starting at the same byte, the longest
/// counts.
#[derive(Debug, Clone)]
struct Patterns {
    list: Vec<(Mark, Box<[u8]>)>,
    automaton: Option<aho_corasick::AhoCorasick>,
    /// The marks of all patterns, to stop early once every kind was found.
    all: u8,
}

impl Patterns {
    fn new(marked: &[(Mark, &[&str])]) -> Patterns {
        let mut p = Patterns {
            list: Vec::new(),
            automaton: None,
            all: 0,
        };
        for (mark, list) in marked {
            for s in *list {
                p.list
                    .push((*mark, s.as_bytes().to_ascii_lowercase().into()));
            }
        }
        p.index();
        p
    }

    fn add(&mut self, mark: Mark, pattern: String) {
        if !pattern.is_empty() {
            self.list
                .push((mark, pattern.into_bytes().to_ascii_lowercase().into()));
            self.index();
        }
    }

    fn index(&mut self) {
        self.all = self.list.iter().fold(0u8, |m, (mark, _)| m | *mark as u8);
        self.automaton = if self.list.is_empty() {
            None
        } else {
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(self.list.iter().map(|(_, p)| &p[..]))
                .ok()
        };
    }

    /// The marks of every pattern found in `body`, ASCII case-insensitively.
    fn scan(&self, body: &[u8]) -> u8 {
        let Some(automaton) = &self.automaton else {
            return 0;
        };
        // Lowercase into a buffer on the stack when the body is small (the usual error body).
        let mut stack = [0u8; 2048];
        let heap;
        let lower: &[u8] = if body.len() <= stack.len() {
            let buf = &mut stack[..body.len()];
            buf.copy_from_slice(body);
            buf.make_ascii_lowercase();
            buf
        } else {
            heap = body.to_ascii_lowercase();
            &heap
        };
        let mut found = 0u8;
        let mut from = 0;
        while let Some(m) = automaton.find(aho_corasick::Input::new(lower).span(from..lower.len()))
        {
            found |= self.list[m.pattern().as_usize()].0 as u8;
            if found == self.all {
                break;
            }
            from = m.start() + 1;
        }
        found
    }
}

const QUOTA: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "enforced_spend_limit_reached",
    "billing_error",
    "credit balance is too low",
    "specified API usage limits",
    "reached your API usage limits",
    "(TPD)",
    "(RPD)",
    "per day",
    "PerDay",
    "free-models-per-day",
    "limit: 0",
    "requires more credits",
];

const INVALID_KEY: &[&str] = &[
    "API_KEY_INVALID",
    "API key not valid",
    "API Key not found",
    "invalid_api_key",
    "organization_restricted",
    "Organization has been restricted",
    "account_deactivated",
];

const TOO_LARGE: &[&str] = &[
    "Request too large",
    "must be reduced",
    "reduce your message size",
    "request_too_large",
];

const OVERLOADED: &[&str] = &["capacity exceeded", "high demand", "overloaded"];

const NOT_KEY: &[&str] = &[
    "unsupported_country_region_territory",
    "Country, region, or territory not supported",
    "<html",
    "<!DOCTYPE html",
];

impl Default for DefaultClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl DefaultClassifier {
    /// The default signals, as the table above lists them.
    pub fn new() -> Self {
        Self {
            patterns: Patterns::new(&[
                (Mark::Quota, QUOTA),
                (Mark::InvalidKey, INVALID_KEY),
                (Mark::TooLarge, TOO_LARGE),
                (Mark::Overloaded, OVERLOADED),
                (Mark::NotKey, NOT_KEY),
            ]),
            long_wait_is_quota: Duration::from_secs(3600),
        }
    }

    /// Adds a body pattern (matched ASCII case-insensitively) that marks an exhausted quota
    /// on a 400, 429 or 402.
    pub fn quota_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::Quota, pattern.into());
        self
    }

    /// Adds a body pattern that marks an invalid or revoked key on a 400 or 429.
    pub fn invalid_key_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::InvalidKey, pattern.into());
        self
    }

    /// Adds a body pattern that marks a request too large for any key (never replayed).
    pub fn too_large_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::TooLarge, pattern.into());
        self
    }

    /// Adds a body pattern that marks a 429 as provider overload rather than the key's limit.
    pub fn overloaded_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::Overloaded, pattern.into());
        self
    }

    /// Adds a body pattern that marks a 403 as not the key's fault (an edge block, a region).
    pub fn not_key_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.add(Mark::NotKey, pattern.into());
        self
    }

    /// Drops every body pattern, keeping only the status and header rules.
    pub fn without_patterns(mut self) -> Self {
        self.patterns = Patterns::new(&[]);
        self
    }

    /// A rate limit whose reset is at least this far away is reported as an exhausted quota.
    /// Default: one hour.
    pub fn long_wait_is_quota(mut self, wait: Duration) -> Self {
        self.long_wait_is_quota = wait;
        self
    }
}

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// Remaining-count and reset headers per dimension; the reset is RFC 3339 when `true`.
const DIMENSIONS: [(HeaderName, HeaderName, bool); 6] = [
    (
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
        false,
    ),
    (
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
        false,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
        true,
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
        true,
    ),
];

/// The provider's wait hint from headers only, in the documented order.
/// The wall clock, read at most once, and only when a date must be compared with it.
pub(crate) struct Now(std::cell::Cell<Option<SystemTime>>);

impl Now {
    pub(crate) fn new() -> Now {
        Now(std::cell::Cell::new(None))
    }

    pub(crate) fn get(&self) -> SystemTime {
        *self.0.get().get_or_insert_with(SystemTime::now)
    }
}

pub(crate) fn header_hint(headers: &HeaderMap, now: &Now) -> Option<Duration> {
    if let Some(v) = headers.get(&RETRY_AFTER_MS) {
        if let Some(d) = parse::millis(v.as_bytes()) {
            return Some(d);
        }
    }
    if let Some(v) = headers.get(http::header::RETRY_AFTER) {
        if let Some(d) = parse::retry_after(v.as_bytes(), || now.get()) {
            return Some(d);
        }
    }
    reset_hint(headers, now, false)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The time until the exhausted dimension(s) reset. With `only_exhausted`, dimensions whose
/// remaining count is not zero are ignored; otherwise, when none is at zero, the soonest
/// reset is taken.
fn reset_hint(headers: &HeaderMap, now: &Now, only_exhausted: bool) -> Option<Duration> {
    let mut exhausted: Option<Duration> = None;
    let mut soonest: Option<Duration> = None;
    let mut any_exhausted = false;
    for (remaining, reset, rfc3339) in &DIMENSIONS {
        let reset = match headers.get(reset) {
            // A reset time already past says nothing about how long to wait.
            Some(v) if *rfc3339 => {
                parse::rfc3339_until(v.as_bytes(), now.get()).filter(|d| !d.is_zero())
            }
            Some(v) => v.to_str().ok().and_then(parse::go_duration),
            None => None,
        };
        let is_zero = header_str(headers, remaining) == Some("0");
        if is_zero {
            any_exhausted = true;
            if let Some(r) = reset {
                exhausted = Some(exhausted.map_or(r, |e| e.max(r)));
            }
        }
        if let Some(r) = reset {
            soonest = Some(soonest.map_or(r, |s| s.min(r)));
        }
    }
    if any_exhausted || only_exhausted {
        exhausted
    } else {
        soonest
    }
}

/// Whether any remaining-count header says the allowance is used up.
fn any_remaining_zero(headers: &HeaderMap) -> bool {
    // One pass over the headers, comparing names only where the value is "0": cheaper than a
    // lookup per name on the success path.
    headers.iter().any(|(name, value)| {
        value.as_bytes().trim_ascii() == b"0" && DIMENSIONS.iter().any(|(r, _, _)| r == name)
    })
}

impl Classify for DefaultClassifier {
    fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> HeadVerdict {
        let code = status.as_u16();
        let verdict = match code {
            100..=399 => {
                if any_remaining_zero(headers) {
                    match reset_hint(headers, &Now::new(), true) {
                        Some(retry_after) if !retry_after.is_zero() => {
                            Verdict::Drained { retry_after }
                        }
                        _ => Verdict::Success,
                    }
                } else {
                    Verdict::Success
                }
            }
            400 | 402 | 403 | 429 => return HeadVerdict::InspectBody,
            401 => Verdict::InvalidKey,
            408 | 498 | 500 | 502..=504 | 506..=599 => Verdict::ServerError,
            _ => Verdict::RequestFault,
        };
        HeadVerdict::Done(verdict)
    }

    fn classify_body(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
        let hint = || header_hint(headers, &Now::new()).or_else(|| parse::body_hint(body));
        let found = self.patterns.scan(body);
        let has = |mark: Mark| found & mark as u8 != 0;
        match status.as_u16() {
            429 => {
                if has(Mark::TooLarge) {
                    Verdict::RequestFault
                } else if has(Mark::InvalidKey) {
                    Verdict::InvalidKey
                } else if has(Mark::Quota) {
                    Verdict::QuotaExhausted {
                        retry_after: hint(),
                    }
                } else if has(Mark::Overloaded) {
                    Verdict::ServerError
                } else {
                    match hint() {
                        Some(d) if d >= self.long_wait_is_quota => Verdict::QuotaExhausted {
                            retry_after: Some(d),
                        },
                        retry_after => Verdict::RateLimited { retry_after },
                    }
                }
            }
            402 => Verdict::QuotaExhausted {
                retry_after: hint(),
            },
            403 => {
                if has(Mark::NotKey) {
                    Verdict::RequestFault
                } else {
                    Verdict::InvalidKey
                }
            }
            400 => {
                if has(Mark::InvalidKey) {
                    Verdict::InvalidKey
                } else if has(Mark::Quota) {
                    Verdict::QuotaExhausted {
                        retry_after: hint(),
                    }
                } else {
                    Verdict::RequestFault
                }
            }
            _ => match self.classify_head(status, headers) {
                HeadVerdict::Done(v) => v,
                HeadVerdict::InspectBody => Verdict::RequestFault,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass scan finds exactly what a search per pattern finds.
    #[test]
    fn scan_agrees_with_a_search_per_pattern() {
        let c = DefaultClassifier::new();
        let words: Vec<&[u8]> = QUOTA
            .iter()
            .chain(INVALID_KEY)
            .chain(TOO_LARGE)
            .chain(OVERLOADED)
            .chain(NOT_KEY)
            .map(|s| s.as_bytes())
            .chain([
                &b"Rate limit reached"[..],
                b"{\"error\":",
                b"PER",
                b"(T",
                b"limit:",
                b" ",
            ])
            .collect();
        let mut state: u64 = 42;
        for _ in 0..3_000 {
            let mut body = Vec::new();
            for _ in 0..6 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = words[(state >> 33) as usize % words.len()];
                if state & 1 == 0 {
                    body.extend(w.iter().map(u8::to_ascii_uppercase));
                } else {
                    body.extend_from_slice(&w[..w.len() - (state >> 8) as usize % 2]);
                }
            }
            let mut want = 0u8;
            for (mark, pat) in &c.patterns.list {
                if parse::find_ci(&body, pat).is_some() {
                    want |= *mark as u8;
                }
            }
            assert_eq!(
                c.patterns.scan(&body),
                want,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
