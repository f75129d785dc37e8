//! Affinity: requests that carry the same value (a conversation or user id) go to the same
//! key while it is usable, which keeps a provider's per-key prompt cache warm.
//!
//! Keys are ranked for a value by rendezvous (highest random weight) hashing: each key's
//! score is a hash of the value and the key's label, and the request starts its scan at
//! the usable key that scores highest. Adding or losing a key therefore moves only the
//! values that key ranks first for; every other value stays where it was. Labels, not
//! keys, are hashed, so a rotated key keeps its values.

/// A request extension: requests with equal values go to the same key while it is usable.
///
/// ```
/// use tower_key_fallback::Affinity;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Affinity::new("conversation-42"));
/// assert_eq!(Affinity::new("conversation-42"), Affinity::new(b"conversation-42"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Affinity(u64);

impl Affinity {
    /// The affinity of a value: its bytes hashed (64-bit FNV-1a), the same in every process
    /// and release.
    pub fn new(value: impl AsRef<[u8]>) -> Affinity {
        Affinity(hash(value.as_ref()))
    }

    /// An affinity from a hash the caller already has.
    pub fn from_hash(hash: u64) -> Affinity {
        Affinity(hash)
    }

    /// The value's hash.
    pub fn hash(self) -> u64 {
        self.0
    }
}

/// 64-bit FNV-1a: defined, stable and quick for short ids.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A key's score for a value: the two hashes mixed (SplitMix64's finalizer), so that scores
/// of one value over different keys are independent.
pub(crate) fn score(value: u64, key: u64) -> u64 {
    let mut z = value ^ key.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_values() {
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn values_spread_over_keys() {
        let keys: Vec<u64> = (0..4)
            .map(|i| hash(format!("KEY_{i}").as_bytes()))
            .collect();
        let mut counts = [0usize; 4];
        for v in 0..4000 {
            let value = hash(format!("user-{v}").as_bytes());
            let best = (0..4).max_by_key(|&k| score(value, keys[k])).unwrap();
            counts[best] += 1;
        }
        // Each key ranks first for about a quarter of the values.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
