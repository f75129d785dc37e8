//! Errors: bad configuration, and no key able to serve a request.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};

use crate::body::ExhaustedBody;

/// An error from a boxed service stack, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A key set or key could not be used. The message names the variable or position and what
/// to do; it never contains a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// No key at all. `var` is the environment prefix looked for, if any.
    NoKeys {
        /// The variable prefix that was searched, for [`KeySet::from_env`](crate::KeySet::from_env).
        var: Option<String>,
    },
    /// A key is empty (or only white space).
    Empty {
        /// The variable or position (`key #2`).
        name: String,
    },
    /// A key holds characters that cannot be sent in an HTTP header.
    InvalidValue {
        /// The variable or position.
        name: String,
    },
    /// A key is wrapped in quotes that were kept as part of its value (`docker --env-file`
    /// and systemd `Environment=` lines keep them): the provider would reject it.
    Quoted {
        /// The variable or position.
        name: String,
    },
    /// An environment variable's value is not valid Unicode.
    NotUnicode {
        /// The variable.
        name: String,
    },
    /// The same key was given twice.
    Duplicate {
        /// The variable or position of the second one.
        name: String,
        /// The variable or position of the first one.
        first: String,
    },
    /// No key has this label.
    UnknownKey {
        /// The label asked for.
        label: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoKeys { var: Some(var) } => write!(
                f,
                "no API key found: set {var} (and {var}_2, {var}_3, … for more keys) in the environment"
            ),
            ConfigError::NoKeys { var: None } => {
                write!(f, "no API key given: pass at least one key")
            }
            ConfigError::Empty { name } => {
                write!(f, "{name} is set but empty: give it a value or remove it")
            }
            ConfigError::InvalidValue { name } => write!(
                f,
                "{name} holds characters that cannot be sent in an HTTP header (spaces, quotes, control or non-ASCII characters): check it was copied whole and unquoted"
            ),
            ConfigError::Quoted { name } => write!(
                f,
                "{name} is wrapped in quotes that are part of its value (docker --env-file and systemd Environment= keep them): set it without the quotes"
            ),
            ConfigError::NotUnicode { name } => {
                write!(f, "{name} is not valid Unicode: set it to the key as issued")
            }
            ConfigError::Duplicate { name, first } => {
                write!(f, "{name} is the same key as {first}: remove the duplicate")
            }
            ConfigError::UnknownKey { label } => {
                write!(f, "no key is labelled {label:?}: use a label from status()")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// No key could serve the request: every key was tried or is cooling down or disabled.
///
/// The service's error is a [`BoxError`]; downcast it to find this:
///
/// ```
/// # use tower_key_fallback::{BoxError, Exhausted};
/// fn wait_hint(err: &BoxError) -> Option<std::time::Duration> {
///     err.downcast_ref::<Exhausted>().and_then(Exhausted::retry_after)
/// }
/// ```
///
/// It carries the last upstream response, when one was received, with every byte of its
/// body, so nothing the provider said is lost.
pub struct Exhausted {
    pub(crate) retry_after: Option<Duration>,
    pub(crate) attempts: u32,
    pub(crate) keys: usize,
    pub(crate) last_response: Option<Response<ExhaustedBody>>,
    pub(crate) last_error: Option<BoxError>,
}

impl Exhausted {
    /// How long until a key becomes usable again: `None` when every key is disabled (only a
    /// reset or rotation helps), zero when a key recovered meanwhile.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// How many upstream calls this request made (zero when no key was usable at all).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The status of the last upstream response, if one was received.
    pub fn last_status(&self) -> Option<StatusCode> {
        self.last_response.as_ref().map(Response::status)
    }

    /// The headers of the last upstream response, if one was received.
    pub fn last_headers(&self) -> Option<&HeaderMap> {
        self.last_response.as_ref().map(Response::headers)
    }

    /// The last upstream call's error (a timeout, a connection error), when the last attempt
    /// failed that way rather than with a response.
    pub fn last_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.last_error.as_deref()
    }

    /// Takes the last upstream response, with its whole body, if one was received.
    pub fn take_last_response(&mut self) -> Option<Response<ExhaustedBody>> {
        self.last_response.take()
    }
}

impl fmt::Debug for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exhausted")
            .field("retry_after", &self.retry_after)
            .field("attempts", &self.attempts)
            .field("keys", &self.keys)
            .field("last_status", &self.last_status())
            .field("last_error", &self.last_error)
            .finish()
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no API key could serve the request ({} keys", self.keys)?;
        if self.attempts > 0 {
            write!(f, ", {} attempts", self.attempts)?;
        }
        if let Some(status) = self.last_status() {
            write!(f, ", last status {}", status.as_u16())?;
        }
        if let Some(error) = &self.last_error {
            write!(f, ", last error: {error}")?;
        }
        write!(f, "): ")?;
        match self.retry_after {
            Some(d) if d.is_zero() => write!(f, "a key is usable again now"),
            Some(d) => write!(f, "the next key is usable in {:.1}s", d.as_secs_f64()),
            None => write!(f, "every key is disabled; reset or rotate them"),
        }
    }
}

impl std::error::Error for Exhausted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.last_error
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}
