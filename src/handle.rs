//! The handle: status snapshots, reset and rotation at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::driver::Shared;
use crate::error::ConfigError;
use crate::keys::{check_secret, fingerprint};
use crate::pool::Generation;
use crate::status::{CooldownReason, DisableReason, KeyRecord, PoolStatus};

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
            shared_limits: pool.shared_limits(),
            waiting: pool.lanes.waiting(),
        }
    }

    /// Makes every key active again and clears error counts (counters are kept).
    /// With shared state (feature `redis`), every replica resets every key too.
    pub fn reset_all(&self) {
        for i in 0..self.shared.pool.len() {
            self.shared.pool.reset(i);
        }
        #[cfg(feature = "redis")]
        if let Some(outbox) = &self.shared.outbox {
            outbox.reset_all();
        }
    }

    /// Makes one key active again and clears its error count. With shared state (feature
    /// `redis`), every replica resets it too.
    pub fn reset(&self, label: &str) -> Result<(), ConfigError> {
        let i = self.index(label)?;
        self.shared.pool.reset(i);
        #[cfg(feature = "redis")]
        if let Some(outbox) = &self.shared.outbox {
            outbox.reset(label, &self.shared.pool.fingerprint(i));
        }
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

    /// Every key's state as it can leave the process: wall-clock deadlines and stable
    /// fingerprints, never a key. A store shares these between processes;
    /// [`KeyHandle::import`] merges them back.
    pub fn export(&self) -> Vec<KeyRecord> {
        let pool = &self.shared.pool;
        (0..pool.len()).map(|i| pool.export(i)).collect()
    }

    /// Merges a state learned elsewhere (another process's [`KeyHandle::export`]) into the
    /// key with the same fingerprint: a cooldown that ends later than the local one, or a
    /// disable. A cooldown is never shortened, and an `Active` record changes nothing.
    /// Returns whether a key's state changed; a record of no key here changes nothing.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_key_fallback::{KeyFallbackLayer, KeySet, KeyState};
    ///
    /// let here = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b"])?).handle();
    /// let there = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b"])?).handle();
    /// there.cool_down("key-1", Duration::from_secs(60))?;
    /// for record in there.export() {
    ///     here.import(&record);
    /// }
    /// assert!(matches!(here.status().keys[0].state, KeyState::CoolingDown { .. }));
    /// # Ok::<(), tower_key_fallback::ConfigError>(())
    /// ```
    pub fn import(&self, record: &KeyRecord) -> bool {
        let pool = &self.shared.pool;
        pool.by_fingerprint(&record.fingerprint)
            .is_some_and(|i| pool.import(i, &record.state))
    }

    /// How long until some key is usable: zero if one is now, `None` if all are disabled.
    pub fn next_available_in(&self) -> Option<Duration> {
        self.shared
            .pool
            .earliest(&self.shared.pool.lanes.default, None)
    }
}
