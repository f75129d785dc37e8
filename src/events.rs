//! What the pool and the driver learn, as events for an observer: the seam for logs,
//! metrics and a shared store. [`TracingEvents`], the default, writes them to `tracing`.

use std::time::{Duration, SystemTime};

use crate::classify::{ErrorVerdict, Verdict};
use crate::status::{CooldownReason, DisableReason};

/// One thing the layer did or learned. Keys are named by label and fingerprint, never by
/// the key itself.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum KeyEvent<'a> {
    /// An upstream call is about to be made with `key`; `attempt` counts from 1.
    AttemptStarted {
        /// The key's label.
        key: &'a str,
        /// Which attempt of the request this is.
        attempt: u32,
    },
    /// An upstream call with `key` was answered, and classified.
    Answered {
        /// The key's label.
        key: &'a str,
        /// The answer's status.
        status: u16,
        /// What the answer means for the key.
        verdict: Verdict,
    },
    /// An upstream call with `key` failed without an answer.
    CallFailed {
        /// The key's label.
        key: &'a str,
        /// The error.
        error: &'a (dyn std::error::Error + 'static),
        /// What it means for the key.
        verdict: ErrorVerdict,
    },
    /// The request moves from one key to the next.
    Switched {
        /// The key that failed.
        from: &'a str,
        /// The key tried next.
        to: &'a str,
        /// Why: `rate_limited`, `quota_exhausted`, `invalid_key`, `server_error`,
        /// `transport_error`, `connection_lost`.
        reason: &'static str,
    },
    /// A key was set aside until `until`.
    CooledDown {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// Why.
        reason: CooldownReason,
        /// For how long from now.
        duration: Duration,
        /// Until when, on the wall clock.
        until: SystemTime,
        /// Whether the provider asked for longer and the wait was capped at `max_cooldown`.
        capped: bool,
    },
    /// A key was set aside in one bucket (a model's own limit, say) until `until`; it serves
    /// the other buckets.
    BucketCooledDown {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// The bucket.
        bucket: &'a str,
        /// Why.
        reason: CooldownReason,
        /// For how long from now.
        duration: Duration,
        /// Until when, on the wall clock.
        until: SystemTime,
    },
    /// A request goes out with `key`: what replicas sharing state count against their view
    /// of the provider's window. (Not told for requests in the overflow bucket, whose
    /// buckets differ between processes.)
    Spending {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// The bucket, if the request named one.
        bucket: Option<&'a str>,
    },
    /// An answer with `key` reported the provider's window of requests.
    WindowReported {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// The bucket, if the request named one.
        bucket: Option<&'a str>,
        /// Requests left in the window.
        remaining: u64,
        /// The window's limit, if the answer said.
        limit: Option<u64>,
        /// When the window ends, on the wall clock.
        resets: SystemTime,
    },
    /// A key was disabled until reset or rotated.
    Disabled {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// Why.
        reason: DisableReason,
    },
    /// A key's cooldown passed and it is back, half-open: the next request probes it
    /// ([`KeyEvent::Probing`]) and the others follow once it serves ([`KeyEvent::Opened`]).
    Recovered {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// Why it had been set aside.
        after: CooldownReason,
    },
    /// A request probes a half-open key: the others pass the key over (or wait, for at most
    /// the probe wait) until it answers.
    Probing {
        /// The key's label.
        key: &'a str,
        /// The cooldown the key came out of; `None`: not heard from yet (at start, after a
        /// reset or a rotation).
        after: Option<CooldownReason>,
    },
    /// A half-open key served: it is fully in service again.
    Opened {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
        /// The cooldown it had come out of; `None`: it had not been heard from.
        after: Option<CooldownReason>,
    },
    /// A probe ended without settling how the key stands (a server error, a failed call, a
    /// dropped request): the next request probes the key again.
    ProbeReleased {
        /// The key's label.
        key: &'a str,
    },
    /// No key can serve a request now but one can soon: the request waits its turn.
    Waiting {
        /// The request's bucket, if it named one.
        bucket: Option<&'a str>,
        /// Requests waiting in that bucket, this one included.
        waiters: usize,
        /// How long until the soonest key can serve, as the pool sees it now.
        soonest: Duration,
        /// Whether the wait is for a probe's answer (else for a cooldown or a budget).
        for_probe: bool,
    },
    /// A request's wait ended.
    Waited {
        /// How long it waited.
        waited: Duration,
        /// Whether it got a key (else it gives up, with `Exhausted`).
        got_key: bool,
    },
    /// A key was made active again by a reset.
    Reset {
        /// The key's label.
        key: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
    },
    /// A key was replaced at run time; `fingerprint` is the new key's.
    Rotated {
        /// The key's label.
        key: &'a str,
        /// The new key's fingerprint.
        fingerprint: &'a str,
    },
    /// Two keys were seen spending one limit: the provider's remaining count of one moved
    /// with the other's requests (keys of one organization). Told once per pair.
    SharedLimit {
        /// The key that reported the other's spending.
        key: &'a str,
        /// The key whose requests it counted.
        with: &'a str,
    },
    /// No key could serve a request.
    Exhausted {
        /// How many keys the pool has.
        keys: usize,
        /// How many upstream calls the request made (zero: no key was usable).
        attempts: u32,
        /// How long until a key is usable again (`None`: every key is disabled).
        retry_after: Option<Duration>,
    },
}

/// An observer of what the layer does, given to
/// [`KeyFallbackBuilder::events`](crate::KeyFallbackBuilder::events). Called on the request
/// path, so it must be quick: hand work that waits (I/O, locks held long) to a task.
///
/// A pair `(A, B)` of observers is an observer that tells both: keep the logs and add your
/// own with `(TracingEvents, Mine)`.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_key_fallback::{KeyEvent, KeyEvents, KeyFallbackLayer, KeySet, TracingEvents};
///
/// #[derive(Default)]
/// struct CountCooldowns(AtomicU64);
///
/// impl KeyEvents for CountCooldowns {
///     fn on_event(&self, event: &KeyEvent<'_>) {
///         if let KeyEvent::CooledDown { .. } = event {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
///
/// let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_a", "gsk_b"])?)
///     .events((TracingEvents, CountCooldowns::default()))
///     .build();
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
pub trait KeyEvents: Send + Sync + 'static {
    /// Called once per event, in the order they happen on one request.
    fn on_event(&self, event: &KeyEvent<'_>);
}

impl<A: KeyEvents, B: KeyEvents> KeyEvents for (A, B) {
    fn on_event(&self, event: &KeyEvent<'_>) {
        self.0.on_event(event);
        self.1.on_event(event);
    }
}

/// The default observer: every event as a `tracing` event, by label and fingerprint.
///
/// `debug` for each attempt and answer, `info` for switches, recoveries, resets and
/// rotations, `warn` for cooldowns, disables, an unreachable upstream and exhaustion.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingEvents;

impl KeyEvents for TracingEvents {
    #[inline]
    fn on_event(&self, event: &KeyEvent<'_>) {
        match *event {
            KeyEvent::AttemptStarted { key, attempt } => {
                tracing::debug!(key, attempt, "sending request");
            }
            KeyEvent::Answered {
                key,
                status,
                verdict,
            } => tracing::debug!(key, status, verdict = ?verdict, "upstream answered"),
            KeyEvent::CallFailed {
                key,
                error,
                verdict,
            } => match verdict {
                ErrorVerdict::Unreachable => {
                    tracing::warn!(key, error = %error, "upstream unreachable; no key blamed");
                }
                ErrorVerdict::ConnectionLost => {
                    tracing::debug!(key, error = %error, "connection lost; no key blamed");
                }
                _ => tracing::debug!(key, error = %error, "upstream call failed"),
            },
            KeyEvent::Switched { from, to, reason } => {
                tracing::info!(from, to, reason, "switching API key");
            }
            KeyEvent::CooledDown {
                key,
                fingerprint,
                reason,
                duration,
                capped,
                ..
            } => tracing::warn!(
                key,
                fingerprint,
                reason = reason.as_str(),
                cooldown_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                capped,
                "API key cooling down"
            ),
            KeyEvent::BucketCooledDown {
                key,
                fingerprint,
                bucket,
                reason,
                duration,
                ..
            } => tracing::warn!(
                key,
                fingerprint,
                bucket,
                reason = reason.as_str(),
                cooldown_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                "API key cooling down in one bucket"
            ),
            KeyEvent::Spending { .. } | KeyEvent::WindowReported { .. } => {}
            KeyEvent::Disabled {
                key,
                fingerprint,
                reason,
            } => tracing::warn!(
                key,
                fingerprint,
                reason = reason.as_str(),
                "API key disabled until reset"
            ),
            KeyEvent::Recovered {
                key,
                fingerprint,
                after,
            } => tracing::info!(
                key,
                fingerprint,
                after = after.as_str(),
                "API key recovered from cooldown"
            ),
            KeyEvent::Probing { key, after } => match after {
                Some(after) => tracing::info!(
                    key,
                    after = after.as_str(),
                    "probing API key after its cooldown"
                ),
                None => tracing::debug!(key, "probing API key not heard from yet"),
            },
            KeyEvent::Opened {
                key,
                fingerprint,
                after,
            } => match after {
                Some(after) => tracing::info!(
                    key,
                    fingerprint,
                    after = after.as_str(),
                    "API key back in service"
                ),
                None => tracing::debug!(key, fingerprint, "API key serving"),
            },
            KeyEvent::ProbeReleased { key } => {
                tracing::debug!(key, "probe ended without a verdict; key probed again");
            }
            KeyEvent::Waiting {
                bucket,
                waiters,
                soonest,
                for_probe,
            } => tracing::debug!(
                bucket,
                waiters,
                soonest_ms = u64::try_from(soonest.as_millis()).unwrap_or(u64::MAX),
                for_probe,
                "no API key usable now; waiting"
            ),
            KeyEvent::Waited { waited, got_key } => tracing::debug!(
                waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                got_key,
                "wait for an API key ended"
            ),
            KeyEvent::Reset { key, fingerprint } => {
                tracing::info!(key, fingerprint, "API key reset");
            }
            KeyEvent::Rotated { key, fingerprint } => {
                tracing::info!(key, fingerprint, "API key rotated");
            }
            KeyEvent::SharedLimit { key, with } => tracing::warn!(
                key,
                with,
                "{key} and {with} appear to share one limit: declare them with KeyFallbackBuilder::group (keys of one organization add no capacity)"
            ),
            KeyEvent::Exhausted {
                keys, attempts: 0, ..
            } => tracing::warn!(keys, "no API key is usable; request not sent"),
            KeyEvent::Exhausted {
                keys,
                attempts,
                retry_after,
            } => tracing::warn!(
                keys,
                attempts,
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                "no API key could serve the request"
            ),
        }
    }
}

/// The observer a pool tells: the default, called directly (no virtual call, so the
/// per-request events cost what the `tracing` calls they make cost), or the user's.
pub(crate) enum Observer {
    Tracing,
    Custom(Box<dyn KeyEvents>),
}

impl KeyEvents for Observer {
    #[inline]
    fn on_event(&self, event: &KeyEvent<'_>) {
        Observer::on_event(self, event);
    }
}

impl Observer {
    #[inline]
    pub(crate) fn on_event(&self, event: &KeyEvent<'_>) {
        match self {
            Observer::Tracing => TracingEvents.on_event(event),
            Observer::Custom(events) => events.on_event(event),
        }
    }
}
