//! `serde::Serialize` for the status types (feature `serde`).
//!
//! Derived on flat views: a key's state is three fields of the key, not a nested enum, so the
//! JSON stays flat and stable.
//!
//! ```json
//! {"keys":[{"label":"GROQ_API_KEY","fingerprint":"fp:dac15746d9bd6510","state":"cooling_down",
//!   "reason":"rate_limited","remaining_ms":5321,"cooldown_capped":false,"requests":12,"successes":10,"errors":2,
//!   "rate_limited":2,"consecutive_errors":0,"available":false}],"available":2}
//! ```
//!
//! Every field is always present: `reason` is `null` for an active key, `remaining_ms` is
//! `null` unless the key is cooling down. A key itself is never serialized, only its label
//! and fingerprint.

use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::status::{KeyState, KeyStatus, PoolStatus};

/// Milliseconds, rounded up: a key that is still cooling never shows 0.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A state as its three fields: `{"state":"cooling_down","reason":"rate_limited",
/// "remaining_ms":5321}`; `state` is `active`, `cooling_down` or `disabled`.
#[derive(Serialize)]
struct StateView {
    state: &'static str,
    reason: Option<&'static str>,
    remaining_ms: Option<u64>,
}

impl From<&KeyState> for StateView {
    fn from(state: &KeyState) -> Self {
        let (state, reason, remaining_ms) = match state {
            KeyState::Active => ("active", None, None),
            KeyState::CoolingDown { remaining, reason } => (
                "cooling_down",
                Some(reason.as_str()),
                Some(millis(*remaining)),
            ),
            KeyState::Disabled { reason } => ("disabled", Some(reason.as_str()), None),
        };
        StateView {
            state,
            reason,
            remaining_ms,
        }
    }
}

/// A key: the label, the fingerprint, the state's three fields, whether the cooldown was
/// capped, the counters and `available`.
#[derive(Serialize)]
struct KeyView<'a> {
    label: &'a str,
    fingerprint: &'a str,
    #[serde(flatten)]
    state: StateView,
    cooldown_capped: bool,
    requests: u64,
    successes: u64,
    errors: u64,
    rate_limited: u64,
    consecutive_errors: u32,
    available: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    buckets: Vec<BucketView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probing: Option<ProbingView>,
}

/// A half-open key: `{"after":"rate_limited","probe_in_flight":true}` (`after` is `null`
/// for a key not heard from yet).
#[derive(Serialize)]
struct ProbingView {
    after: Option<&'static str>,
    probe_in_flight: bool,
}

/// A key's standing in one bucket; present only for buckets the key has served or reported
/// in, so a pool that uses no budgets shows the same JSON as before.
#[derive(Serialize)]
struct BucketView<'a> {
    bucket: Option<&'a str>,
    requests_remaining: Option<u64>,
    requests_reset_ms: Option<u64>,
    tokens_remaining: Option<u64>,
    tokens_reset_ms: Option<u64>,
    in_flight: u64,
    passed_over_ms: Option<u64>,
}

/// `{"keys":[…],"available":2}`: every key in priority order, and how many are usable.
#[derive(Serialize)]
struct PoolView<'a> {
    keys: &'a [KeyStatus],
    available: usize,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    shared_limits: Vec<SharedView<'a>>,
    #[serde(skip_serializing_if = "is_zero")]
    waiting: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Keys that share one limit: `{"keys":["A","B"],"declared":true}`.
#[derive(Serialize)]
struct SharedView<'a> {
    keys: &'a [String],
    declared: bool,
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for KeyState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StateView::from(self).serialize(serializer)
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for KeyStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        KeyView {
            label: &self.label,
            fingerprint: &self.fingerprint,
            state: StateView::from(&self.state),
            cooldown_capped: self.cooldown_capped,
            requests: self.requests,
            successes: self.successes,
            errors: self.errors,
            rate_limited: self.rate_limited,
            consecutive_errors: self.consecutive_errors,
            available: self.is_available(),
            buckets: self
                .buckets
                .iter()
                .map(|b| BucketView {
                    bucket: b.bucket.as_deref(),
                    requests_remaining: b.requests_remaining.map(|r| r.0),
                    requests_reset_ms: b.requests_remaining.map(|r| millis(r.1)),
                    tokens_remaining: b.tokens_remaining.map(|r| r.0),
                    tokens_reset_ms: b.tokens_remaining.map(|r| millis(r.1)),
                    in_flight: b.in_flight,
                    passed_over_ms: b.passed_over_for.map(millis),
                })
                .collect(),
            probing: self.probing.map(|p| ProbingView {
                after: p.after.map(crate::status::CooldownReason::as_str),
                probe_in_flight: p.probe_in_flight,
            }),
        }
        .serialize(serializer)
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for PoolStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PoolView {
            keys: &self.keys,
            available: self.available(),
            shared_limits: (self.shared_limits.iter())
                .map(|s| SharedView {
                    keys: &s.keys,
                    declared: s.declared,
                })
                .collect(),
            waiting: self.waiting,
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CooldownReason, DisableReason, KeyFallbackLayer, KeySet};

    fn key(label: &str, state: KeyState) -> KeyStatus {
        KeyStatus {
            label: label.to_owned(),
            fingerprint: "fp:dac15746d9bd6510".to_owned(),
            cooldown_capped: matches!(state, KeyState::CoolingDown { .. }),
            state,
            requests: 12,
            successes: 10,
            errors: 2,
            rate_limited: 2,
            consecutive_errors: 0,
            buckets: Vec::new(),
            probing: None,
        }
    }

    fn json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    #[test]
    fn a_pool_as_json() {
        let status = PoolStatus {
            keys: vec![
                key(
                    "GROQ_API_KEY",
                    KeyState::CoolingDown {
                        remaining: Duration::from_millis(5321),
                        reason: CooldownReason::RateLimited,
                    },
                ),
                key("GROQ_API_KEY_2", KeyState::Active),
                key(
                    "GROQ_API_KEY_3",
                    KeyState::Disabled {
                        reason: DisableReason::InvalidKey,
                    },
                ),
            ],
            shared_limits: Vec::new(),
            waiting: 0,
        };
        assert_eq!(
            json(&status),
            concat!(
                r#"{"keys":["#,
                r#"{"label":"GROQ_API_KEY","fingerprint":"fp:dac15746d9bd6510","state":"cooling_down","reason":"rate_limited","remaining_ms":5321,"cooldown_capped":true,"requests":12,"successes":10,"errors":2,"rate_limited":2,"consecutive_errors":0,"available":false},"#,
                r#"{"label":"GROQ_API_KEY_2","fingerprint":"fp:dac15746d9bd6510","state":"active","reason":null,"remaining_ms":null,"cooldown_capped":false,"requests":12,"successes":10,"errors":2,"rate_limited":2,"consecutive_errors":0,"available":true},"#,
                r#"{"label":"GROQ_API_KEY_3","fingerprint":"fp:dac15746d9bd6510","state":"disabled","reason":"invalid_key","remaining_ms":null,"cooldown_capped":false,"requests":12,"successes":10,"errors":2,"rate_limited":2,"consecutive_errors":0,"available":false}"#,
                r#"],"available":1}"#,
            )
        );
        assert_eq!(
            json(&PoolStatus {
                keys: Vec::new(),
                shared_limits: Vec::new(),
                waiting: 0,
            }),
            r#"{"keys":[],"available":0}"#
        );
    }

    #[test]
    fn states_and_reasons() {
        assert_eq!(
            json(&KeyState::Active),
            r#"{"state":"active","reason":null,"remaining_ms":null}"#
        );
        // Rounded up: a key still cooling never shows zero.
        assert_eq!(
            json(&KeyState::CoolingDown {
                remaining: Duration::from_micros(1),
                reason: CooldownReason::Errors,
            }),
            r#"{"state":"cooling_down","reason":"errors","remaining_ms":1}"#
        );
        assert_eq!(
            json(&KeyState::Disabled {
                reason: DisableReason::Manual
            }),
            r#"{"state":"disabled","reason":"manual","remaining_ms":null}"#
        );
        let cooldowns = [
            (CooldownReason::RateLimited, "rate_limited"),
            (CooldownReason::QuotaExhausted, "quota_exhausted"),
            (CooldownReason::Drained, "limit_reached"),
            (CooldownReason::Errors, "errors"),
            (CooldownReason::Manual, "manual"),
        ];
        for (reason, name) in cooldowns {
            assert_eq!(json(&reason), format!("\"{name}\""));
        }
        assert_eq!(json(&DisableReason::InvalidKey), r#""invalid_key""#);
        assert_eq!(json(&DisableReason::Manual), r#""manual""#);
    }

    #[test]
    fn a_live_pool_never_shows_a_key() {
        let layer = KeyFallbackLayer::new(
            KeySet::from_vars(
                "GROQ_API_KEY",
                [
                    ("GROQ_API_KEY", "gsk_secret_one"),
                    ("GROQ_API_KEY_2", "gsk_secret_two"),
                ],
            )
            .unwrap(),
        );
        let handle = layer.handle();
        handle
            .cool_down("GROQ_API_KEY", Duration::from_secs(30))
            .unwrap();
        let text = json(&handle.status());
        assert!(!text.contains("gsk_secret"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["available"], 1);
        let first = &value["keys"][0];
        assert_eq!(first["label"], "GROQ_API_KEY");
        assert_eq!(first["state"], "cooling_down");
        assert_eq!(first["reason"], "manual");
        let remaining = first["remaining_ms"].as_u64().unwrap();
        assert!(remaining > 29_000 && remaining <= 30_000, "{remaining}");
        assert!(first["fingerprint"].as_str().unwrap().starts_with("fp:"));
        assert_eq!(value["keys"][1]["state"], "active");
        assert_eq!(value["keys"][1]["available"], true);
    }
}
