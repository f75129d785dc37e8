//! The key set: keys in priority order, from code or from the environment; their
//! fingerprints; and the header values made from them.
//!
//! Key material is held in buffers that are zeroed when the last copy is dropped: the key
//! set's own, and the header values put on requests (which share one buffer per key through
//! a reference count). A key rotated out is gone from memory once the last request that
//! carries it has finished; what the HTTP client copied into its own write buffers is the
//! client's.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::ConfigError;

/// One API key with its label. Its `Debug` shows the label and a fingerprint, never the key.
#[derive(Clone)]
pub(crate) struct Key {
    label: String,
    secret: Zeroizing<String>,
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

/// The bytes of a header value that holds a key, zeroed when the last `Bytes` over them is
/// dropped. Aligned so that the reference count `Bytes` keeps beside them has a cache line of
/// its own.
#[repr(align(128))]
struct SecretBuf(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The header value that carries `secret`: `Bearer <secret>` when `bearer`, else the key
/// alone. It is marked sensitive, so `Debug` and HTTP/2 HPACK never expose it. Cloning it
/// shares the one zeroing buffer (a reference count), so no copy of the key is made per
/// request.
pub(crate) fn header_value(bearer: bool, secret: &str) -> HeaderValue {
    let mut text = Zeroizing::new(Vec::with_capacity(secret.len() + 7));
    if bearer {
        text.extend_from_slice(b"Bearer ");
    }
    text.extend_from_slice(secret.as_bytes());
    // Keys were checked to be visible ASCII when they were given, which is what a header
    // value accepts; anything else would be a bug, answered with an empty value.
    let mut value = HeaderValue::from_maybe_shared(Bytes::from_owner(SecretBuf(text)))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// A key's header value in one copy per core (at most 8), each with its own reference
/// count: a request clones the copy of its thread, so putting the key on requests from
/// several threads writes no memory that another thread writes too.
pub(crate) struct Striped(Box<[HeaderValue]>);

impl Striped {
    pub(crate) fn new(bearer: bool, secret: &str) -> Striped {
        static COPIES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let copies = *COPIES
            .get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)));
        Striped((0..copies).map(|_| header_value(bearer, secret)).collect())
    }

    /// The copy for this thread.
    pub(crate) fn get(&self) -> &HeaderValue {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        &self.0[STRIPE.with(|s| *s) % self.0.len()]
    }
}

/// The key an attempt is sent with, handed to the inner service as a request extension when
/// the layer is built with [`Credential::None`](crate::Credential::None), so that a service
/// which signs requests itself uses the key the pool chose (and whose state the answer
/// updates).
///
/// Its `Debug` shows the label and fingerprint; the key itself only through
/// [`KeyInUse::secret`].
///
/// ```
/// use tower_key_fallback::KeyInUse;
///
/// fn sign(req: &mut http::Request<String>) {
///     let key = req.extensions().get::<KeyInUse>().expect("set by KeyFallback").clone();
///     let value = http::HeaderValue::from_str(&format!("Key {}", key.secret())).unwrap();
///     req.headers_mut().insert("x-custom-auth", value);
/// }
/// ```
#[derive(Clone)]
pub struct KeyInUse {
    pub(crate) label: std::sync::Arc<str>,
    pub(crate) fingerprint: std::sync::Arc<str>,
    pub(crate) value: HeaderValue,
}

impl KeyInUse {
    /// The key's label (`GROQ_API_KEY_2`, `key-2`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The key's fingerprint (`fp:` and 16 hex digits of its SHA-256).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key itself. Keep it out of logs.
    pub fn secret(&self) -> &str {
        self.value.to_str().unwrap_or_default()
    }
}

impl fmt::Debug for KeyInUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyInUse")
            .field("label", &self.label)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A key's SHA-256 digest.
fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A key's fingerprint: `fp:` and the first 8 bytes of the SHA-256 of the key, in lowercase
/// hex. It is the same in every process, on every machine and in every release, so it can be
/// published (status pages, logs) and matched across processes; it cannot be turned back
/// into the key. `printf %s "$GROQ_API_KEY" | sha256sum | cut -c1-16` gives the same hex.
pub(crate) fn fingerprint(secret: &str) -> String {
    fingerprint_of(&digest(secret))
}

fn fingerprint_of(digest: &[u8; 32]) -> String {
    let mut out = String::with_capacity(19);
    out.push_str("fp:");
    for b in &digest[..8] {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// Checks one key value; `name` is how errors refer to it ("GROQ_API_KEY_2", "key #2").
pub(crate) fn check_secret(name: &str, value: &str) -> Result<Zeroizing<String>, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ConfigError::Empty {
            name: name.to_owned(),
        });
    }
    // Quotes kept around the value (`KEY="gsk_…"` in a docker --env-file or a systemd
    // Environment= line): no provider issues keys that start or end with one.
    let quote = |b: u8| matches!(b, b'"' | b'\'' | b'`');
    let bytes = value.as_bytes();
    if quote(bytes[0]) || quote(bytes[bytes.len() - 1]) {
        return Err(ConfigError::Quoted {
            name: name.to_owned(),
        });
    }
    // Visible ASCII only: what an HTTP header value can carry without surprises.
    if !bytes.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(ConfigError::InvalidValue {
            name: name.to_owned(),
        });
    }
    Ok(Zeroizing::new(value.to_owned()))
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
        let mut seen = HashMap::new();
        for (i, k) in keys.into_iter().enumerate() {
            let name = format!("key #{}", i + 1);
            set.push(&mut seen, format!("key-{}", i + 1), &name, k.as_ref())?;
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
        let mut found: Vec<(u64, String, V)> = vars
            .into_iter()
            .filter_map(|(n, v)| {
                let order = numbered(prefix, n.as_ref())?;
                Some((order, n.as_ref().to_owned(), v))
            })
            .collect();
        found.sort_by_key(|(order, _, _)| *order);
        let mut set = KeySet { keys: Vec::new() };
        let mut seen = HashMap::new();
        for (_, name, value) in found {
            set.push(&mut seen, name.clone(), &name, value.as_ref())?;
        }
        if set.keys.is_empty() {
            return Err(ConfigError::NoKeys {
                var: Some(prefix.to_owned()),
            });
        }
        Ok(set)
    }

    /// Adds a key after checking it. `seen` maps the digests of the keys so far to their
    /// positions, so that a duplicate is found in one lookup.
    fn push(
        &mut self,
        seen: &mut HashMap<[u8; 32], usize>,
        label: String,
        name: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let secret = check_secret(name, value)?;
        let digest = digest(&secret);
        if let Some(&first) = seen.get(&digest) {
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
        seen.insert(digest, self.keys.len());
        self.keys.push(Key {
            label,
            secret,
            fingerprint: fingerprint_of(&digest),
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
        let secrets: Vec<_> = set.keys.iter().map(|k| k.secret()).collect();
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
        assert_eq!(set.keys[0].secret(), "a");
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

    /// The fingerprint is defined (SHA-256, first 8 bytes), not whatever std's hasher does
    /// in this release: the values here are `printf %s KEY | sha256sum | cut -c1-16`.
    #[test]
    fn fingerprints_are_truncated_sha256() {
        assert_eq!(fingerprint("gsk_abc"), "fp:dac15746d9bd6510");
        assert_eq!(fingerprint(""), "fp:e3b0c44298fc1c14");
        assert_ne!(fingerprint("x"), fingerprint("y"));
        assert_eq!(fingerprint("gsk_abc").len(), 19);
        let set = KeySet::new(["gsk_abc"]).unwrap();
        assert_eq!(set.keys[0].fingerprint(), "fp:dac15746d9bd6510");
    }

    #[test]
    fn quoted_values_are_refused_naming_the_variable() {
        for value in [
            "\"gsk_secret\"",
            "'gsk_secret'",
            "\"gsk_secret",
            "gsk_secret'",
            "`gsk_secret`",
            " \"gsk_secret\" ",
        ] {
            let err = KeySet::from_vars("GROQ_API_KEY", [("GROQ_API_KEY_2", value)]).unwrap_err();
            assert_eq!(
                err,
                ConfigError::Quoted {
                    name: "GROQ_API_KEY_2".into()
                },
                "{value}"
            );
            let msg = err.to_string();
            assert!(
                msg.starts_with("GROQ_API_KEY_2 is wrapped in quotes"),
                "{msg}"
            );
            assert!(!msg.contains("gsk_secret"), "{msg}");
        }
    }

    #[test]
    fn duplicates_among_many_keys_name_both() {
        let mut keys: Vec<String> = (0..20_000).map(|i| format!("gsk_{i:08}")).collect();
        keys.push("gsk_00012345".into());
        let err = KeySet::new(&keys).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key #20001 is the same key as key #12346: remove the duplicate"
        );
        keys.pop();
        assert_eq!(KeySet::new(&keys).unwrap().len(), 20_000);
    }

    #[test]
    fn header_values_are_sensitive_and_shared() {
        let v = header_value(true, "gsk_abc");
        assert_eq!(v.as_bytes(), b"Bearer gsk_abc");
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("gsk_abc"));
        assert_eq!(header_value(false, "gsk_abc").as_bytes(), b"gsk_abc");
        // A clone points at the same buffer: no copy of the key per request.
        let c = v.clone();
        assert_eq!(c.as_bytes().as_ptr(), v.as_bytes().as_ptr());
        // One copy per core, each on its own lines; a thread always gets the same one.
        let striped = Striped::new(true, "gsk_abc");
        assert!(striped.0.iter().all(|v| v == "Bearer gsk_abc"));
        let mine = striped.get().as_bytes().as_ptr();
        assert_eq!(striped.get().as_bytes().as_ptr(), mine);
        for pair in striped.0.windows(2) {
            let (a, b) = (pair[0].as_bytes().as_ptr(), pair[1].as_bytes().as_ptr());
            assert!((a as usize).abs_diff(b as usize) >= 64);
        }
    }
}
