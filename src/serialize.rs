//! `serde::Serialize` for the status types (feature `serde`).
//!
//! Written by hand rather than derived: the shape is flat and stable (a key's state is
//! three fields of the key, not a nested enum), and the crate gains no proc-macro to build.
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

use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::handle::{CooldownReason, DisableReason, KeyState, KeyStatus, PoolStatus};

/// `rate_limited`, `quota_exhausted`, `limit_reached`, `errors` or `manual`.
impl Serialize for CooldownReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// `invalid_key` or `manual`.
impl Serialize for DisableReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Milliseconds, rounded up: a key that is still cooling never shows 0.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The three fields a state is written as: `state`, `reason`, `remaining_ms`.
fn state_fields(state: &KeyState) -> (&'static str, Option<&'static str>, Option<u64>) {
    match state {
        KeyState::Active => ("active", None, None),
        KeyState::CoolingDown { remaining, reason } => (
            "cooling_down",
            Some(reason.as_str()),
            Some(millis(*remaining)),
        ),
        KeyState::Disabled { reason } => ("disabled", Some(reason.as_str()), None),
    }
}

/// `{"state":"cooling_down","reason":"rate_limited","remaining_ms":5321}`; `state` is
/// `active`, `cooling_down` or `disabled`.
impl Serialize for KeyState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (state, reason, remaining_ms) = state_fields(self);
        let mut s = serializer.serialize_struct("KeyState", 3)?;
        s.serialize_field("state", state)?;
        s.serialize_field("reason", &reason)?;
        s.serialize_field("remaining_ms", &remaining_ms)?;
        s.end()
    }
}

/// The label, the fingerprint, the state's three fields, whether the cooldown was capped,
/// the counters and `available`.
impl Serialize for KeyStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (state, reason, remaining_ms) = state_fields(&self.state);
        let mut s = serializer.serialize_struct("KeyStatus", 12)?;
        s.serialize_field("label", &self.label)?;
        s.serialize_field("fingerprint", &self.fingerprint)?;
        s.serialize_field("state", state)?;
        s.serialize_field("reason", &reason)?;
        s.serialize_field("remaining_ms", &remaining_ms)?;
        s.serialize_field("cooldown_capped", &self.cooldown_capped)?;
        s.serialize_field("requests", &self.requests)?;
        s.serialize_field("successes", &self.successes)?;
        s.serialize_field("errors", &self.errors)?;
        s.serialize_field("rate_limited", &self.rate_limited)?;
        s.serialize_field("consecutive_errors", &self.consecutive_errors)?;
        s.serialize_field("available", &self.is_available())?;
        s.end()
    }
}

/// `{"keys":[…],"available":2}`: every key in priority order, and how many are usable.
impl Serialize for PoolStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("PoolStatus", 2)?;
        s.serialize_field("keys", &self.keys)?;
        s.serialize_field("available", &self.available())?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyFallbackLayer, KeySet};

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
            json(&PoolStatus { keys: Vec::new() }),
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
            (CooldownReason::LimitReached, "limit_reached"),
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
