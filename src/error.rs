//! Errors: the boxed error of a service stack, and bad configuration.

use std::fmt;

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
