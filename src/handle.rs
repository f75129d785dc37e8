//! The handle: status snapshots, reset and rotation at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::Shared;
use crate::error::ConfigError;
use crate::keys::{check_secret, fingerprint};
use crate::pool::Generation;
use crate::status::{CooldownReason, DisableReason, PoolStatus};

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
        let value = self.shared.config.credential_value(&secret);
        self.shared.pool.rotate(i, value, &fingerprint(&secret));
        Ok(())
    }

    /// How long until some key is usable: zero if one is now, `None` if all are disabled.
    pub fn next_available_in(&self) -> Option<Duration> {
        self.shared.pool.earliest()
    }
}
