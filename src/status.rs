//! What a key's state is, as the status snapshots show it: the reasons, the states, one
//! key's status and the pool's.

use std::time::{Duration, SystemTime};

/// Why a key is cooling down. In JSON (feature `serde`): `rate_limited`, `quota_exhausted`,
/// `limit_reached`, `errors` or `manual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum CooldownReason {
    /// A short-window rate limit (429).
    RateLimited,
    /// A daily, monthly or billing quota is used up.
    QuotaExhausted,
    /// A success said the allowance is used up (`x-ratelimit-remaining-*: 0`).
    #[cfg_attr(feature = "serde", serde(rename = "limit_reached"))]
    Drained,
    /// Too many errors in a row (5xx, timeouts, transport errors).
    Errors,
    /// Set aside through [`KeyHandle::cool_down`](crate::KeyHandle::cool_down).
    Manual,
}

#[allow(non_upper_case_globals)]
impl CooldownReason {
    /// The old name of [`CooldownReason::Drained`].
    #[deprecated(note = "renamed `CooldownReason::Drained`, after `Verdict::Drained`")]
    pub const LimitReached: CooldownReason = CooldownReason::Drained;

    pub(crate) fn code(self) -> u64 {
        match self {
            CooldownReason::RateLimited => 0,
            CooldownReason::QuotaExhausted => 1,
            CooldownReason::Drained => 2,
            CooldownReason::Errors => 3,
            CooldownReason::Manual => 4,
        }
    }
    pub(crate) fn from_code(code: u64) -> Self {
        match code {
            0 => CooldownReason::RateLimited,
            1 => CooldownReason::QuotaExhausted,
            2 => CooldownReason::Drained,
            3 => CooldownReason::Errors,
            _ => CooldownReason::Manual,
        }
    }
    /// A short name for logs and JSON: `rate_limited`, `quota_exhausted`, `limit_reached`
    /// (for [`CooldownReason::Drained`], its stable name), `errors`, `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::QuotaExhausted => "quota_exhausted",
            CooldownReason::Drained => "limit_reached",
            CooldownReason::Errors => "errors",
            CooldownReason::Manual => "manual",
        }
    }
}

/// Why a key is disabled. In JSON (feature `serde`): `invalid_key` or `manual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum DisableReason {
    /// The provider rejected the key (401, 403, an invalid-key body).
    InvalidKey,
    /// Disabled through [`KeyHandle::disable`](crate::KeyHandle::disable).
    Manual,
}

impl DisableReason {
    pub(crate) fn code(self) -> u64 {
        match self {
            DisableReason::InvalidKey => 0,
            DisableReason::Manual => 1,
        }
    }
    pub(crate) fn from_code(code: u64) -> Self {
        match code {
            0 => DisableReason::InvalidKey,
            _ => DisableReason::Manual,
        }
    }
    /// A short name for logs: `invalid_key`, `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            DisableReason::InvalidKey => "invalid_key",
            DisableReason::Manual => "manual",
        }
    }
}

/// Where a key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// Usable.
    Active,
    /// Set aside until its cooldown passes; it then comes back by itself.
    CoolingDown {
        /// Time left.
        remaining: Duration,
        /// Why.
        reason: CooldownReason,
    },
    /// Set aside until reset or rotated.
    Disabled {
        /// Why.
        reason: DisableReason,
    },
}

/// A snapshot of one key. It may be a moment stale, never torn.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStatus {
    /// The key's label (`GROQ_API_KEY_2`, `key-2`).
    pub label: String,
    /// The key's fingerprint, never the key: `fp:` and the first 8 bytes of the key's
    /// SHA-256 in hex (`fp:dac15746d9bd6510`), the same in every process and release.
    pub fingerprint: String,
    /// Where it stands.
    pub state: KeyState,
    /// Whether the current cooldown is shorter than the provider asked for: its wait was
    /// more than [`max_cooldown`](crate::KeyFallbackBuilder::max_cooldown) and was capped.
    pub cooldown_capped: bool,
    /// Upstream calls made with it.
    pub requests: u64,
    /// Calls it served.
    pub successes: u64,
    /// Calls that failed on its account: rate limits, quota, rejections, server and
    /// transport errors.
    pub errors: u64,
    /// Calls refused for a rate limit or quota (429s spent on it).
    pub rate_limited: u64,
    /// Server or transport errors in a row in the current window.
    pub consecutive_errors: u32,
    /// What the provider reported of the key's allowance, per bucket (the requests that
    /// named no [`Bucket`](crate::Bucket) first, as `bucket: None`); only buckets the key has
    /// served or reported in.
    pub buckets: Vec<BucketStatus>,
    /// Whether the key is half-open: usable, but the pool has not heard from it since it
    /// came out of a cooldown (or since the start, a reset or a rotation), so one request
    /// at a time probes it. `None` once an answer showed it serving.
    pub probing: Option<Probing>,
}

/// A half-open key: one request probes it, and the others use other keys (or wait, for at
/// most the [probe wait](crate::KeyFallbackBuilder::probe_wait)) until the probe answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probing {
    /// The cooldown the key came out of; `None` when the pool has not heard from the key
    /// (at start, after a reset or a rotation).
    pub after: Option<CooldownReason>,
    /// Whether a probe is in flight now.
    pub probe_in_flight: bool,
}

/// A key's standing in one bucket: its budget as the pool counts it and any cooldown that
/// holds in this bucket only.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BucketStatus {
    /// The bucket (a model), or `None` for requests that named none.
    pub bucket: Option<String>,
    /// Requests left in the provider's current window, less those sent since it reported
    /// (or of a declared limit), and when the window is whole again.
    pub requests_remaining: Option<(u64, Duration)>,
    /// Tokens left, less the costs of requests in flight, and when the window is whole again.
    pub tokens_remaining: Option<(u64, Duration)>,
    /// Requests sent in this bucket and not yet answered.
    pub in_flight: u64,
    /// How long the key is passed over in this bucket: a spent budget or a cooldown.
    pub passed_over_for: Option<Duration>,
}

impl KeyStatus {
    /// Whether a request would use this key now.
    pub fn is_available(&self) -> bool {
        matches!(self.state, KeyState::Active)
    }
}

/// A snapshot of the whole pool, keys in priority order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Every key.
    pub keys: Vec<KeyStatus>,
    /// Keys that share one limit: declared with
    /// [`group`](crate::KeyFallbackBuilder::group), or seen spending one another's budget
    /// (the provider's remaining count of one moved with the requests of another).
    pub shared_limits: Vec<SharedLimit>,
    /// Requests waiting for a key now: for a probe's answer, or for a cooldown or budget
    /// to end ([`wait_for_key`](crate::KeyFallbackBuilder::wait_for_key)).
    pub waiting: usize,
}

/// Keys that share one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedLimit {
    /// Their labels.
    pub keys: Vec<String>,
    /// Declared by the caller (`true`), or noticed by the pool.
    pub declared: bool,
}

impl SharedLimit {
    pub(crate) fn new(keys: Vec<String>, declared: bool) -> SharedLimit {
        SharedLimit { keys, declared }
    }
}

impl PoolStatus {
    /// How many keys are usable now.
    pub fn available(&self) -> usize {
        self.keys.iter().filter(|k| k.is_available()).count()
    }

    /// The status of the key with this label.
    pub fn get(&self, label: &str) -> Option<&KeyStatus> {
        self.keys.iter().find(|k| k.label == label)
    }
}

/// One key's state as it can leave the process, to be shared with other processes (a store,
/// replicas) and merged back with [`KeyHandle::import`](crate::KeyHandle::import): the key
/// is named by its stable fingerprint (and label), never by the key, and deadlines are
/// wall-clock instants.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyRecord {
    /// The key's label where it was recorded.
    pub label: String,
    /// The key's fingerprint: what a record is matched by.
    pub fingerprint: String,
    /// Its state.
    pub state: RecordedState,
}

impl KeyRecord {
    /// A record of a key's state.
    pub fn new(label: &str, fingerprint: &str, state: RecordedState) -> KeyRecord {
        KeyRecord {
            label: label.to_owned(),
            fingerprint: fingerprint.to_owned(),
            state,
        }
    }
}

/// A key's state in a [`KeyRecord`]: its deadline on the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordedState {
    /// Usable.
    Active,
    /// Set aside until `until`.
    CoolingDown {
        /// Why.
        reason: CooldownReason,
        /// Until when, on the wall clock.
        until: SystemTime,
        /// Whether the provider's wait was capped at `max_cooldown`.
        capped: bool,
    },
    /// Set aside until reset or rotated.
    Disabled {
        /// Why.
        reason: DisableReason,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn the_old_reason_name_still_works_in_patterns_and_values() {
        assert_eq!(CooldownReason::LimitReached, CooldownReason::Drained);
        let named = match CooldownReason::Drained {
            CooldownReason::LimitReached => "old name matches",
            _ => "no",
        };
        assert_eq!(named, "old name matches");
        assert_eq!(CooldownReason::Drained.as_str(), "limit_reached");
    }
}
