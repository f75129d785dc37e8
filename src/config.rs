//! The configuration a layer is built with, in one place: how the credential goes on a
//! request, the attempt and inspection bounds, and the one cooldown policy (what a verdict
//! does to a key, with the defaults filled in and provider waits capped).

use std::time::Duration;

use http::HeaderName;

use crate::classify::Verdict;
use crate::keys::Striped;
use crate::status::{CooldownReason, DisableReason};

/// How the key is put on the request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credential {
    /// `Authorization: Bearer <key>` (Groq, OpenAI, Mistral, OpenRouter, Together, Gemini's
    /// OpenAI-compatible endpoint). The default.
    Bearer,
    /// The key alone in the named header (`x-api-key` for Anthropic, `api-key` for Azure
    /// OpenAI, `x-goog-api-key` for Gemini).
    Header(HeaderName),
    /// The key in the named query parameter of the URL (`?key=` for Gemini), percent-encoded.
    /// Each attempt replaces every parameter of that name the URL had, the caller's own
    /// included, and the credential headers the caller set are removed. The URL then holds
    /// the key: a client that logs or shows URLs shows it too, so prefer a header where the
    /// API takes one.
    Query(String),
    /// No header is set: the caller's credentials are removed, and each attempt's key is
    /// handed to the inner service as a [`KeyInUse`](crate::KeyInUse) request extension for
    /// it to sign with (the keys are still chosen, cooled and reported).
    None,
}

/// Credential headers the caller may have set, removed before the key's is inserted.
const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// When errors set a key aside: `threshold` in a row within `reset_interval` set it aside
/// for `cooldown`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorPolicy {
    pub(crate) threshold: u32,
    pub(crate) cooldown: Duration,
    pub(crate) reset_interval: Duration,
}

/// Everything a layer is configured with but the keys, the classifier and the observer.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) credential: Credential,
    /// A query parameter that is a credential to the API (Gemini's `key`), removed from what
    /// the caller sent when the key goes in a header.
    pub(crate) strip_query: Option<String>,
    pub(crate) round_robin: bool,
    /// `None`: one attempt per key.
    pub(crate) max_attempts: Option<u32>,
    pub(crate) inspect_limit: usize,
    pub(crate) inspect_timeout: Duration,
    pub(crate) exhausted_response: bool,
    pub(crate) fallback_on_transport_errors: bool,
    pub(crate) errors: ErrorPolicy,
    pub(crate) rate_limit_cooldown: Duration,
    pub(crate) quota_cooldown: Duration,
    pub(crate) quota_min_cooldown: Duration,
    pub(crate) max_cooldown: Duration,
    /// How long a request may wait for a key when none can serve now (`None`: it does not).
    pub(crate) wait_for_key: Option<Duration>,
    /// How long a probe of a half-open key has it to itself.
    pub(crate) probe_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            credential: Credential::Bearer,
            strip_query: None,
            round_robin: false,
            max_attempts: None,
            inspect_limit: 64 * 1024,
            inspect_timeout: Duration::from_secs(5),
            exhausted_response: false,
            fallback_on_transport_errors: true,
            errors: ErrorPolicy {
                threshold: 3,
                cooldown: Duration::from_secs(30),
                reset_interval: Duration::from_secs(60),
            },
            rate_limit_cooldown: Duration::from_secs(60),
            quota_cooldown: Duration::from_secs(3600),
            quota_min_cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(24 * 3600),
            wait_for_key: None,
            probe_wait: Duration::from_secs(1),
        }
    }
}

/// What happened on one attempt, as the pool records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// Cool down for this long; `true` when the provider asked for longer and the wait was
    /// capped at `max_cooldown`.
    Cool(CooldownReason, Duration, bool),
    Disable(DisableReason),
    Error,
}

impl Config {
    /// What a verdict does to the key, with the configured defaults filled in. Every wait
    /// the provider gave is capped at `max_cooldown`; the configured ones are the user's own.
    pub(crate) fn outcome(&self, verdict: Verdict) -> Option<Outcome> {
        let cool = |reason, given: Option<Duration>, default: Duration| match given {
            Some(d) if d > self.max_cooldown => Outcome::Cool(reason, self.max_cooldown, true),
            Some(d) => Outcome::Cool(reason, d, false),
            None => Outcome::Cool(reason, default, false),
        };
        Some(match verdict {
            Verdict::Success => Outcome::Success,
            Verdict::Drained { retry_after } => {
                cool(CooldownReason::Drained, Some(retry_after), retry_after)
            }
            Verdict::RateLimited { retry_after } => cool(
                CooldownReason::RateLimited,
                retry_after,
                self.rate_limit_cooldown,
            ),
            Verdict::QuotaExhausted { retry_after } => cool(
                CooldownReason::QuotaExhausted,
                retry_after.filter(|d| *d >= self.quota_min_cooldown),
                self.quota_cooldown,
            ),
            Verdict::InvalidKey => Outcome::Disable(DisableReason::InvalidKey),
            Verdict::ServerError => Outcome::Error,
            Verdict::RequestFault => return None,
        })
    }

    /// The header the key goes in, or `None` with [`Credential::None`].
    pub(crate) fn credential_header(&self) -> Option<&HeaderName> {
        match &self.credential {
            Credential::Bearer => Some(&http::header::AUTHORIZATION),
            Credential::Header(name) => Some(name),
            Credential::None | Credential::Query(_) => None,
        }
    }

    /// The query parameter the key goes in, with [`Credential::Query`].
    pub(crate) fn credential_query(&self) -> Option<&str> {
        match &self.credential {
            Credential::Query(name) => Some(name),
            _ => None,
        }
    }

    /// The header value for `secret` (percent-encoded for a query parameter), marked
    /// sensitive so that `Debug` and HTTP/2 HPACK never expose it.
    pub(crate) fn credential_value(&self, secret: &str) -> Striped {
        match self.credential {
            Credential::Query(_) => Striped::new(false, &percent_encode(secret)),
            _ => Striped::new(self.credential == Credential::Bearer, secret),
        }
    }

    /// The caller's credential headers to remove: the known ones but the layer's own, which
    /// inserting replaces anyway (with [`Credential::None`], all of them).
    pub(crate) fn strip(&self) -> Strip {
        let own = self.credential_header();
        let names: Box<[HeaderName]> = CREDENTIAL_HEADERS
            .iter()
            .map(|h| HeaderName::from_static(h))
            .filter(|h| own != Some(h))
            .collect();
        let lengths = names
            .iter()
            .fold(0u64, |mask, h| mask | 1u64 << h.as_str().len().min(63));
        Strip { names, lengths }
    }
}

/// `text` with every byte but the URL's unreserved characters (`A-Z a-z 0-9 - . _ ~`)
/// percent-encoded, in a buffer zeroed when dropped.
fn percent_encode(text: &str) -> zeroize::Zeroizing<String> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = zeroize::Zeroizing::new(String::with_capacity(text.len() * 3));
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

/// `query` without any parameter named `name` (however its name is encoded), then, with a
/// `value` (already encoded), `name=value`; `None` when there is nothing to remove and nothing
/// to add. An empty result means no query at all.
/// A parameter's name is compared decoded (`%6Bey` and `k%65y` are `key`), as the server
/// reads it.
pub(crate) fn query_with(query: Option<&str>, name: &str, value: Option<&str>) -> Option<String> {
    let query = query.unwrap_or("");
    let found = query.split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        decodes_to(key.as_bytes(), name.as_bytes())
    });
    if value.is_none() && !found {
        return None;
    }
    let mut out =
        String::with_capacity(query.len() + 3 * name.len() + value.map_or(0, str::len) + 2);
    for pair in query.split('&') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if pair.is_empty() || decodes_to(key.as_bytes(), name.as_bytes()) {
            continue;
        }
        out.push_str(pair);
        out.push('&');
    }
    match value {
        Some(value) => {
            out.push_str(&percent_encode(name));
            out.push('=');
            out.push_str(value);
        }
        None => {
            out.pop();
        }
    }
    Some(out)
}

/// Whether the query text `raw` percent-decodes (`+` as a space) to `name`.
fn decodes_to(raw: &[u8], name: &[u8]) -> bool {
    let hex = |b: u8| char::from(b).to_digit(16);
    let (mut i, mut j) = (0, 0);
    while i < raw.len() {
        let byte = match raw[i] {
            b'%' => match (
                raw.get(i + 1).and_then(|&b| hex(b)),
                raw.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    i += 2;
                    (h * 16 + l) as u8
                }
                _ => b'%',
            },
            b'+' => b' ',
            b => b,
        };
        if name.get(j) != Some(&byte) {
            return false;
        }
        i += 1;
        j += 1;
    }
    j == name.len()
}

/// Credential headers to remove from what the caller sent.
#[derive(Debug, Clone)]
pub(crate) struct Strip {
    names: Box<[HeaderName]>,
    /// One bit per length of the names, to pass over most headers at a glance.
    lengths: u64,
}

impl Strip {
    /// Removes them. One pass to see whether the caller set any (usually not), rather than a
    /// removal per name; most names differ in length alone.
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        let lengths = self.lengths;
        if headers.keys().any(|name| {
            lengths & (1u64 << name.as_str().len().min(63)) != 0 && self.names.contains(name)
        }) {
            for name in self.names.iter() {
                headers.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_replaced_and_encoded() {
        assert_eq!(query_with(None, "key", Some("k1")).unwrap(), "key=k1");
        assert_eq!(query_with(Some(""), "key", Some("k1")).unwrap(), "key=k1");
        assert_eq!(
            query_with(
                Some("alt=sse&key=caller&key=again&keys=3"),
                "key",
                Some("k2")
            )
            .unwrap(),
            "alt=sse&keys=3&key=k2"
        );
        assert_eq!(
            query_with(Some("key"), "key", Some("k2")).unwrap(),
            "key=k2"
        );
        assert_eq!(
            query_with(Some("a=1&&b"), "key", Some("k2")).unwrap(),
            "a=1&b&key=k2"
        );
        // Removal only: nothing to do without the parameter; an emptied query is "".
        assert_eq!(query_with(Some("alt=sse"), "key", None), None);
        assert_eq!(query_with(None, "key", None), None);
        assert_eq!(
            query_with(Some("alt=sse&key=c"), "key", None).unwrap(),
            "alt=sse"
        );
        assert_eq!(query_with(Some("%6Bey=c"), "key", None).unwrap(), "");
        // A name that a URL cannot hold as it is goes encoded.
        assert_eq!(
            query_with(None, "api key", Some("v")).unwrap(),
            "api%20key=v"
        );
        assert_eq!(&*percent_encode("AIza-_.~09"), "AIza-_.~09");
        assert_eq!(&*percent_encode("a+b&c=d%/ #"), "a%2Bb%26c%3Dd%25%2F%20%23");
        let config = Config {
            credential: Credential::Query("key".into()),
            ..Config::default()
        };
        assert_eq!(config.credential_value("a&b").get(), "a%26b");
        assert!(config.credential_value("a&b").get().is_sensitive());
        assert_eq!(config.credential_header(), None);
        assert_eq!(config.credential_query(), Some("key"));
    }

    #[test]
    fn query_parameter_replaced_whatever_the_encoding_of_its_name() {
        // Servers decode parameter names: `%6Bey` is `key` to them, so the caller's own must
        // go as the plain one does, or it would be sent beside the pool's key.
        assert_eq!(
            query_with(
                Some("%6Bey=caller&alt=sse&k%65y=x&%6b%65%79=y"),
                "key",
                Some("k2")
            )
            .unwrap(),
            "alt=sse&key=k2"
        );
        assert_eq!(
            query_with(Some("%6B=1&%=2&%6Bey%=3&key%2=4"), "key", Some("k2")).unwrap(),
            "%6B=1&%=2&%6Bey%=3&key%2=4&key=k2"
        );
    }
}
