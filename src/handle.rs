//! The handle: status snapshots, reset and rotation at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;
use crate::keys::{check_secret, fingerprint};
use crate::layer::Shared;
use crate::pool::Generation;

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
    LimitReached,
    /// Too many errors in a row (5xx, timeouts, transport errors).
    Errors,
    /// Set aside through [`KeyHandle::cool_down`].
    Manual,
}

impl CooldownReason {
    pub(crate) fn code(self) -> u64 {
        match self {
            CooldownReason::RateLimited => 0,
            CooldownReason::QuotaExhausted => 1,
            CooldownReason::LimitReached => 2,
            CooldownReason::Errors => 3,
            CooldownReason::Manual => 4,
        }
    }
    pub(crate) fn from_code(code: u64) -> Self {
        match code {
            0 => CooldownReason::RateLimited,
            1 => CooldownReason::QuotaExhausted,
            2 => CooldownReason::LimitReached,
            3 => CooldownReason::Errors,
            _ => CooldownReason::Manual,
        }
    }
    /// A short name for logs: `rate_limited`, `quota_exhausted`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::QuotaExhausted => "quota_exhausted",
            CooldownReason::LimitReached => "limit_reached",
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
    /// Disabled through [`KeyHandle::disable`].
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

/// A cloneable handle on a layer's key pool, shared with every service the layer makes.
///
/// ```
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, KeyState};
///
/// let layer = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b"])?);
/// let handle = layer.handle();
///
/// handle.disable("key-1")?;
/// assert_eq!(handle.status().available(), 1);
/// handle.reset("key-1")?;
/// assert!(handle.status().keys.iter().all(|k| k.state == KeyState::Active));
/// assert!(handle.reset("key-9").is_err());
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct KeyHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHandle")
            .field("keys", &self.shared.pool.len())
            .finish()
    }
}

impl KeyHandle {
    fn index(&self, label: &str) -> Result<usize, ConfigError> {
        self.shared
            .pool
            .position(label)
            .ok_or_else(|| ConfigError::UnknownKey {
                label: label.to_owned(),
            })
    }

    /// A snapshot of every key.
    pub fn status(&self) -> PoolStatus {
        let pool = &self.shared.pool;
        PoolStatus {
            keys: (0..pool.len()).map(|i| pool.status(i)).collect(),
        }
    }

    /// Makes every key active again and clears error counts (counters are kept).
    pub fn reset_all(&self) {
        for i in 0..self.shared.pool.len() {
            self.shared.pool.reset(i);
        }
    }

    /// Makes one key active again and clears its error count.
    pub fn reset(&self, label: &str) -> Result<(), ConfigError> {
        let i = self.index(label)?;
        self.shared.pool.reset(i);
        Ok(())
    }

    /// Disables one key until it is reset or rotated.
    pub fn disable(&self, label: &str) -> Result<(), ConfigError> {
        let i = self.index(label)?;
        self.shared
            .pool
            .disable(i, Generation::Current, DisableReason::Manual);
        Ok(())
    }

    /// Sets one key aside for `duration`; it comes back by itself.
    pub fn cool_down(&self, label: &str, duration: Duration) -> Result<(), ConfigError> {
        let i = self.index(label)?;
        let pool = &self.shared.pool;
        pool.cool(
            i,
            Generation::Current,
            CooldownReason::Manual,
            duration,
            false,
        );
        Ok(())
    }

    /// Replaces the key behind `label` with a new one, at run time, and makes it active.
    /// Requests already in flight finish with the old key, and what they come to (the
    /// revoked key's 401, its quota) is not held against the new one.
    pub fn rotate(&self, label: &str, new_key: &str) -> Result<(), ConfigError> {
        let i = self.index(label)?;
        let secret = check_secret(label, new_key)?;
        let value = self.shared.credential_value(&secret);
        self.shared.pool.rotate(i, value, &fingerprint(&secret));
        Ok(())
    }

    /// How long until some key is usable: zero if one is now, `None` if all are disabled.
    pub fn next_available_in(&self) -> Option<Duration> {
        self.shared.pool.earliest()
    }
}
