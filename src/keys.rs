//! The key set: keys in priority order, from code or from the environment.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};

use crate::error::ConfigError;

/// One API key with its label. Its `Debug` shows the label and a fingerprint, never the key.
#[derive(Clone)]
pub(crate) struct Key {
    label: String,
    secret: String,
    fingerprint: String,
}

impl Key {
    pub(crate) fn label(&self) -> &str {
        &self.label
    }
    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Keeps one copy of each credential value for the life of the process and returns it.
///
/// Header values made from a `&'static str` are copied without a reference count, which
/// keeps the request path free of writes to shared memory. The cost is that every distinct
/// value ever used (a few dozen bytes per key, per credential style) stays in memory until
/// the process ends, as the keys in its environment do anyway; making layers again with the
/// same keys adds nothing.
pub(crate) fn intern(value: String) -> &'static str {
    static INTERNED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashSet<&'static str>>,
    > = std::sync::OnceLock::new();
    let mut set = INTERNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = set.get(value.as_str()) {
        return existing;
    }
    let leaked: &'static str = Box::leak(value.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// A short, stable, non-reversible tag for a key, for logs and status output.
pub(crate) fn fingerprint(secret: &str) -> String {
    let mut h = DefaultHasher::new();
    secret.hash(&mut h);
    format!("fp:{:08x}", h.finish() as u32)
}

/// Checks one key value; `name` is how errors refer to it ("GROQ_API_KEY_2", "key #2").
pub(crate) fn check_secret(name: &str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ConfigError::Empty {
            name: name.to_owned(),
        });
    }
    // Visible ASCII only: what an HTTP header value can carry without surprises.
    if !value.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ConfigError::InvalidValue {
            name: name.to_owned(),
        });
    }
    Ok(value.to_owned())
}

/// The API keys to use, in priority order, each with a label for logs and status.
///
/// Keys come from code ([`KeySet::new`], labelled `key-1`, `key-2`, …) or from the
/// environment ([`KeySet::from_env`], labelled by variable name). A key set never shows a key:
/// its `Debug` prints labels and fingerprints.
///
/// ```
/// use tower_key_fallback::KeySet;
///
/// let keys = KeySet::new(["gsk_first", "gsk_second"])?;
/// assert_eq!(keys.labels().collect::<Vec<_>>(), ["key-1", "key-2"]);
/// assert!(!format!("{keys:?}").contains("gsk_"));
///
/// let err = KeySet::new(["gsk_a", "gsk_a"]).unwrap_err();
/// assert_eq!(err.to_string(), "key #2 is the same key as key #1: remove the duplicate");
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|k| format!("{} ({})", k.label, k.fingerprint)),
            )
            .finish()
    }
}

impl KeySet {
    /// Keys given in code, in priority order, labelled `key-1`, `key-2`, ….
    ///
    /// Surrounding white space is trimmed. Fails with a [`ConfigError`] when there is no key,
    /// a key is empty, a key cannot be an HTTP header value, or a key is given twice.
    pub fn new<I, K>(keys: I) -> Result<KeySet, ConfigError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        let mut set = KeySet { keys: Vec::new() };
        for (i, k) in keys.into_iter().enumerate() {
            let name = format!("key #{}", i + 1);
            set.push(format!("key-{}", i + 1), &name, k.as_ref())?;
        }
        if set.keys.is_empty() {
            return Err(ConfigError::NoKeys { var: None });
        }
        Ok(set)
    }

    /// Keys from the environment: `PREFIX`, then `PREFIX_1`, `PREFIX_2`, `PREFIX_3`, … in
    /// numeric order, each labelled by its variable name.
    ///
    /// Gaps are allowed (`GROQ_API_KEY` and `GROQ_API_KEY_3` alone are two keys). Fails with a
    /// [`ConfigError`] naming the variable, never its value, when none is set, one is empty,
    /// one is not valid Unicode or cannot be sent in a header, or two hold the same key.
    ///
    /// ```no_run
    /// use tower_key_fallback::KeySet;
    ///
    /// // GROQ_API_KEY=gsk_…, GROQ_API_KEY_2=gsk_…, GROQ_API_KEY_3=gsk_…
    /// let keys = KeySet::from_env("GROQ_API_KEY")?;
    /// # Ok::<(), tower_key_fallback::ConfigError>(())
    /// ```
    pub fn from_env(prefix: &str) -> Result<KeySet, ConfigError> {
        let vars = env_vars(prefix)?;
        Self::from_vars(prefix, vars)
    }

    /// Like [`KeySet::from_env`], over the variables given instead of the process
    /// environment. Variables that do not belong to `prefix` are ignored.
    ///
    /// ```
    /// use tower_key_fallback::KeySet;
    ///
    /// let vars = [("GROQ_API_KEY_2", "gsk_b"), ("GROQ_API_KEY", "gsk_a"), ("HOME", "/root")];
    /// let keys = KeySet::from_vars("GROQ_API_KEY", vars)?;
    /// assert_eq!(keys.labels().collect::<Vec<_>>(), ["GROQ_API_KEY", "GROQ_API_KEY_2"]);
    ///
    /// let err = KeySet::from_vars("GROQ_API_KEY", [("GROQ_API_KEY_2", " ")]).unwrap_err();
    /// assert!(err.to_string().starts_with("GROQ_API_KEY_2 is set but empty"));
    /// # Ok::<(), tower_key_fallback::ConfigError>(())
    /// ```
    pub fn from_vars<I, N, V>(prefix: &str, vars: I) -> Result<KeySet, ConfigError>
    where
        I: IntoIterator<Item = (N, V)>,
        N: AsRef<str>,
        V: AsRef<str>,
    {
        let mut found: Vec<(u64, String, String)> = vars
            .into_iter()
            .filter_map(|(n, v)| {
                let order = numbered(prefix, n.as_ref())?;
                Some((order, n.as_ref().to_owned(), v.as_ref().to_owned()))
            })
            .collect();
        found.sort_by_key(|(order, _, _)| *order);
        let mut set = KeySet { keys: Vec::new() };
        for (_, name, value) in found {
            set.push(name.clone(), &name, &value)?;
        }
        if set.keys.is_empty() {
            return Err(ConfigError::NoKeys {
                var: Some(prefix.to_owned()),
            });
        }
        Ok(set)
    }

    fn push(&mut self, label: String, name: &str, value: &str) -> Result<(), ConfigError> {
        let secret = check_secret(name, value)?;
        if let Some(first) = self.keys.iter().position(|k| k.secret == secret) {
            let first = if self.keys[first].label.starts_with("key-") {
                format!("key #{}", first + 1)
            } else {
                self.keys[first].label.clone()
            };
            return Err(ConfigError::Duplicate {
                name: name.to_owned(),
                first,
            });
        }
        let fingerprint = fingerprint(&secret);
        self.keys.push(Key {
            label,
            secret,
            fingerprint,
        });
        Ok(())
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a key set holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys' labels, in priority order.
    pub fn labels(&self) -> impl Iterator<Item = &str> + '_ {
        self.keys.iter().map(|k| k.label.as_str())
    }

    pub(crate) fn into_keys(self) -> Vec<Key> {
        self.keys
    }
}

/// The process environment's variables that belong to `prefix`.
pub(crate) fn env_vars(prefix: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if numbered(prefix, name).is_none() {
            continue;
        }
        match value.into_string() {
            Ok(v) => vars.push((name.to_owned(), v)),
            Err(_) => {
                return Err(ConfigError::NotUnicode {
                    name: name.to_owned(),
                })
            }
        }
    }
    Ok(vars)
}

/// The sort position of `name` among `prefix`'s variables: `PREFIX` is 0, `PREFIX_N` is N.
pub(crate) fn numbered(prefix: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix('_')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_order_is_numeric_with_gaps() {
        let vars = [
            ("GROQ_API_KEY_10", "k10"),
            ("GROQ_API_KEY_2", "k2"),
            ("GROQ_API_KEY", "k0"),
            ("GROQ_API_KEY_X", "nope"),
            ("GROQ_API_KEYS", "nope"),
            ("OTHER", "nope"),
        ];
        let set = KeySet::from_vars("GROQ_API_KEY", vars).unwrap();
        let labels: Vec<_> = set.labels().collect();
        assert_eq!(
            labels,
            ["GROQ_API_KEY", "GROQ_API_KEY_2", "GROQ_API_KEY_10"]
        );
        let secrets: Vec<_> = set.keys.iter().map(|k| k.secret.as_str()).collect();
        assert_eq!(secrets, ["k0", "k2", "k10"]);
    }

    #[test]
    fn errors_name_the_variable_never_the_value() {
        let secret = "gsk_supersecret";
        let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
            (vec![], "no API key found: set GROQ_API_KEY"),
            (
                vec![("GROQ_API_KEY", "  ".into())],
                "GROQ_API_KEY is set but empty",
            ),
            (
                vec![("GROQ_API_KEY_2", format!("{secret}\u{7}"))],
                "GROQ_API_KEY_2 holds characters",
            ),
            (
                vec![
                    ("GROQ_API_KEY", secret.into()),
                    ("GROQ_API_KEY_3", secret.into()),
                ],
                "GROQ_API_KEY_3 is the same key as GROQ_API_KEY",
            ),
        ];
        for (vars, want) in cases {
            let err = KeySet::from_vars("GROQ_API_KEY", vars).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with(want), "{msg}");
            assert!(!msg.contains(secret), "{msg}");
            assert!(!format!("{err:?}").contains(secret));
        }
    }

    #[test]
    fn new_labels_and_checks() {
        let set = KeySet::new([" a ", "b"]).unwrap();
        assert_eq!(set.keys[0].secret, "a");
        assert_eq!(set.labels().collect::<Vec<_>>(), ["key-1", "key-2"]);
        let empty: [&str; 0] = [];
        assert!(KeySet::new(empty)
            .unwrap_err()
            .to_string()
            .starts_with("no API key given"));
        assert_eq!(
            KeySet::new(["a", ""]).unwrap_err().to_string(),
            "key #2 is set but empty: give it a value or remove it"
        );
        assert!(KeySet::new(["a b"])
            .unwrap_err()
            .to_string()
            .starts_with("key #1 holds characters"));
    }

    #[test]
    fn fingerprints_are_stable_and_short() {
        assert_eq!(fingerprint("x"), fingerprint("x"));
        assert_ne!(fingerprint("x"), fingerprint("y"));
        assert_eq!(fingerprint("gsk_abc").len(), 11);
    }
}
