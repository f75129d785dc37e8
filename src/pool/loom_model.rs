//! Model check of the key pool's atomics with loom: `scripts/loom.sh`, or
//! `RUSTFLAGS="--cfg tkf_loom" cargo test --release --lib loom_model -- --nocapture`.
//!
//! Under `--cfg tkf_loom` the pool's atomics, its rotation mutex and its credential cell are
//! loom's (`src/sync.rs`), so loom runs each model below once per interleaving of their
//! operations (up to `LOOM_MAX_PREEMPTIONS` preemptions, or each test's own bound when that
//! is not set) and the assertions hold in every one.
//!
//! - The pool's clock is frozen at 0 ms: its epoch is set a day ahead, so `now_ms()` is 0 in
//!   every call. loom needs each run of a model to take the same branches for the same
//!   schedule, which a clock ticking between calls would not give. A cooldown of
//!   `Duration::ZERO` ends at 0 ms and is over at once (a key that may be recovered), one of
//!   an hour is not over in any run (a key that must stay out, and be remembered).
//! - Every operation runs in a spawned thread; the model's main thread only spawns and
//!   joins. With a request of its own on the main thread after the spawns, loom 0.7 explored
//!   far fewer orders (it never ran that request after the spawned threads' cooldowns).
//! - Each model names what its runs came to (`Reached`) and fails unless the interesting
//!   cases were all reached, so that a model that stops exploring them cannot pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use loom::thread;
use tokio::time::Instant;

use super::*;
use crate::keys::KeySet;

const HOUR: Duration = Duration::from_secs(3600);
const HOUR_MS: u64 = 3_600_000;

/// A pool of `n` keys `k0`, `k1`, … in priority order that have all answered (active), its
/// clock frozen at 0 ms; a half-open key is open to all (probing has a model of its own).
fn pool(n: usize) -> Arc<Pool> {
    let p = pool_probing(n, Duration::ZERO);
    for slot in p.slots.iter() {
        slot.state.store(Word::active(0).0, SeqCst);
    }
    p
}

/// A pool of `n` keys not heard from yet (half-open), with this probe wait.
fn pool_probing(n: usize, probe_wait: Duration) -> Arc<Pool> {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let mut p = Pool::new(
        KeySet::new(keys).unwrap().into_keys(),
        |s| Striped::new(false, s),
        false,
        crate::config::Config::default().errors,
        crate::events::Observer::Tracing,
    )
    .with_probing(probe_wait, Duration::from_secs(86_400));
    p.epoch = Instant::now() + Duration::from_secs(86_400);
    assert_eq!(p.now_ms(), 0);
    Arc::new(p)
}

/// What one run of a model came to, in words: one or more cases of those it must reach.
type Reached = Vec<&'static str>;

/// Runs `f` under loom, once per interleaving; then checks that the runs reached each of
/// `must_reach`, and prints how many runs there were and how often each case came up. The
/// bound on preemptions is `LOOM_MAX_PREEMPTIONS` when set, else `bound` (`None`: every
/// interleaving).
fn check(
    name: &str,
    bound: Option<usize>,
    must_reach: &[&'static str],
    f: impl Fn() -> Reached + Sync + Send + 'static,
) {
    let seen = Arc::new(StdMutex::new((
        0usize,
        BTreeMap::<&'static str, usize>::new(),
    )));
    let counted = seen.clone();
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = bound;
    }
    let bound = builder.preemption_bound;
    let started = std::time::Instant::now();
    builder.check(move || {
        let reached = f();
        let mut seen = counted.lock().unwrap();
        seen.0 += 1;
        for case in reached {
            *seen.1.entry(case).or_default() += 1;
        }
    });
    let (runs, cases) = &*seen.lock().unwrap();
    eprintln!(
        "loom_model::{name}: {runs} interleavings, preemption bound {bound:?}, {:.2?}",
        started.elapsed()
    );
    for (case, n) in cases {
        eprintln!("    {n:>7}  {case}");
    }
    for case in must_reach {
        assert!(
            cases.contains_key(case),
            "{name}: no run reached \"{case}\""
        );
    }
}

/// Spawns a loom thread that runs `f` on the pool.
fn spawn<T: Send + 'static>(
    p: &Arc<Pool>,
    f: impl FnOnce(&Pool) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let p = p.clone();
    thread::spawn(move || f(&p))
}

/// One request's first attempt: a key from a fresh scan, its credential, and the outcome
/// recorded against that credential's generation. Returns the key, if there was one.
fn request(p: &Pool, outcome: Outcome) -> Option<usize> {
    let mut cur = p.cursor();
    let i = p.pick(&mut cur, &p.lanes.default, None)?.key;
    let generation = p.begin(i).generation();
    p.record(i, generation, outcome, None);
    Some(i)
}

/// What holds once every thread has finished, whatever the interleaving was:
/// - a key's bit is set exactly when its state word is active (`sync_bit`'s promise);
/// - no cooling key is forgotten: `next_deadline` is not after any cooling key's deadline,
///   so the scan that restores it will run;
/// - a new request's scan then finds exactly the keys that are usable now, in order.
fn assert_settled(p: &Pool) {
    let now = p.now_ms();
    let next = p.next_deadline.load(SeqCst);
    let mut usable = Vec::new();
    for i in 0..p.len() {
        let w = p.slots[i].word();
        let bit = (p.usable[i / 64].load(SeqCst) >> (i % 64)) & 1 == 1;
        assert_eq!(
            bit,
            w.tag() == TAG_ACTIVE || w.tag() == TAG_PROBING,
            "key {i}: bit {bit} disagrees with its state {w:?}"
        );
        if w.tag() == TAG_COOLING {
            assert!(
                next <= w.until(),
                "key {i} cools until {} ms but the next scan is at {next} ms: never recovered",
                w.until()
            );
        }
        if w.usable(now) {
            usable.push(i);
        }
    }
    let mut cur = p.cursor();
    let found: Vec<usize> =
        std::iter::from_fn(|| p.pick(&mut cur, &p.lanes.default, None).map(|p| p.key)).collect();
    assert_eq!(
        found, usable,
        "a new scan missed a usable key or took another"
    );
}

/// claim → cool → scan, two keys, three threads. Two requests are answered with rate
/// limits, one that is over at once (`ZERO`) and one of an hour, while a third request picks
/// a key: a `pick` can claim the scan of `maybe_recover` and restore the first key, or
/// `claim` can recover it from a stale bit, while the other cooldowns land. Afterwards the
/// pool is settled (`assert_settled`) and the hour's key is still out.
#[test]
fn claim_cool_scan() {
    check(
        "claim_cool_scan",
        Some(4),
        &[
            "the hour went to key 0",
            "the hour went to key 1",
            "the third request took key 0",
            "the third request took key 1",
            "the third request found no key (a cooldown not yet in next_deadline)",
            "the zero cooldown was over before the end",
            "the zero cooldown was left to the last scan",
        ],
        || {
            let p = pool(2);
            let zero = Outcome::Cool(CooldownReason::RateLimited, Duration::ZERO, false);
            let hour = Outcome::Cool(CooldownReason::QuotaExhausted, HOUR, false);
            let t1 = spawn(&p, move |p| request(p, zero));
            let t2 = spawn(&p, move |p| request(p, hour));
            let t3 = spawn(&p, |p| {
                p.pick(&mut p.cursor(), &p.lanes.default, None)
                    .map(|p| p.key)
            });
            // Only one key is ever out for long, so the first two always had one.
            let zero_key = t1.join().unwrap().expect("a key for the first request");
            let hour_key = t2.join().unwrap().expect("a key for the second request");
            let third = t3.join().unwrap();
            let mut reached = vec![
                ["the hour went to key 0", "the hour went to key 1"][hour_key],
                match third {
                    Some(0) => "the third request took key 0",
                    Some(_) => "the third request took key 1",
                    None => "the third request found no key (a cooldown not yet in next_deadline)",
                },
            ];
            if zero_key != hour_key {
                reached.push(if p.slots[zero_key].word().tag() == TAG_COOLING {
                    "the zero cooldown was left to the last scan"
                } else {
                    "the zero cooldown was over before the end"
                });
            }
            let w = p.slots[hour_key].word();
            assert_eq!(
                (w.tag(), w.until()),
                (TAG_COOLING, HOUR_MS),
                "key {hour_key}'s hour"
            );
            assert_settled(&p);
            reached
        },
    );
}

/// A cooldown is never shortened: two rate limits for the same key land concurrently, one
/// of a second and one of an hour (its wait capped). Whatever the order, the key cools for
/// the hour, with that cooldown's reason and capped bit, and both are counted.
#[test]
fn a_cooldown_is_never_shortened() {
    check(
        "a_cooldown_is_never_shortened",
        None,
        &[
            "next scan at the second's end",
            "next scan at the hour's end",
        ],
        || {
            let p = pool(2);
            let second = Duration::from_secs(1);
            let short = Outcome::Cool(CooldownReason::RateLimited, second, false);
            let long = Outcome::Cool(CooldownReason::QuotaExhausted, HOUR, true);
            let a = spawn(&p, move |p| p.record(0, Generation::Of(0), short, None));
            let b = spawn(&p, move |p| p.record(0, Generation::Of(0), long, None));
            a.join().unwrap();
            b.join().unwrap();
            let w = p.slots[0].word();
            assert_eq!(w.tag(), TAG_COOLING);
            assert_eq!(w.until(), HOUR_MS, "the hour's cooldown was shortened");
            assert_eq!(w.reason(), CooldownReason::QuotaExhausted.code());
            assert!(w.capped());
            assert_eq!(p.status(0).rate_limited, 2);
            let next = p.next_deadline.load(SeqCst);
            assert_settled(&p);
            match next {
                1000 => vec!["next scan at the second's end"],
                HOUR_MS => vec!["next scan at the hour's end"],
                other => panic!("next scan at {other} ms"),
            }
        },
    );
}

/// Rotation racing a request: one thread runs a request (pick → begin → the provider's 401,
/// `Disable(InvalidKey)` recorded against the generation it was sent with), another rotates
/// key 0 to a new credential.
/// - `begin` hands out the old credential with generation 0 or the new one with 1, never a
///   mix of the two;
/// - the old credential's 401 never disables the new one: if the request was sent with
///   generation 0, the key ends active under generation 1;
/// - if it was sent with the new credential, the disable may apply (or be dropped, when it
///   lands between the rotation's two stores);
/// - either way the rotation is complete: the cell holds generation 1 and so does the state;
///   and the pool is settled.
#[test]
fn rotation_racing_a_request() {
    check(
        "rotation_racing_a_request",
        None,
        &[
            "sent with the old credential",
            "sent with the new credential, disabled",
            "sent with the new credential, outcome dropped",
        ],
        || {
            let p = pool(2);
            let req = spawn(&p, |p| {
                let i = p
                    .pick(&mut p.cursor(), &p.lanes.default, None)
                    .map(|p| p.key)
                    .expect("both keys are active");
                let cred = p.begin(i);
                let seen = (i, cred.value.get().clone(), cred.generation());
                drop(cred);
                p.record(i, seen.2, Outcome::Disable(DisableReason::InvalidKey), None);
                seen
            });
            let rot = spawn(&p, |p| p.rotate(0, Striped::new(false, "new"), "fp:new"));
            rot.join().unwrap();
            let (i, value, generation) = req.join().unwrap();
            assert_eq!(i, 0, "key 0 is active until the request's own disable");
            match generation {
                Generation::Of(0) => assert_eq!(value, "k0", "generation 0 with the new value"),
                Generation::Of(1) => assert_eq!(value, "new", "generation 1 with the old value"),
                other => panic!("begin gave {other:?}"),
            }
            let w = p.slots[0].word();
            let cred = p.slots[0].cred.load();
            assert_eq!(
                (cred.generation, cred.value.get().as_bytes()),
                (1, &b"new"[..])
            );
            assert_eq!(w.generation(), 1, "{w:?}");
            // A rotated key is half-open: not heard from under its new credential.
            let fresh = Word::probing(NOT_HEARD, 0, 1);
            let reached = if generation == Generation::Of(0) {
                assert_eq!(w, fresh, "the old key's 401 disabled the new key");
                "sent with the old credential"
            } else if w == Word::disabled(DisableReason::InvalidKey, 1) {
                "sent with the new credential, disabled"
            } else {
                assert_eq!(w, fresh);
                "sent with the new credential, outcome dropped"
            };
            assert_settled(&p);
            vec![reached]
        },
    );
}

/// A reset racing a cooldown and a request: key 0 starts cooling (over at once); the handle
/// resets it while a rate limit of an hour lands for it and another request picks. The key
/// ends half-open and not heard from (the reset came last; the picker may hold its probe) or
/// cooling for the hour (the cooldown came last), and the pool is settled either way.
#[test]
fn reset_racing_a_cool() {
    check(
        "reset_racing_a_cool",
        Some(4),
        &["ends reset (half-open)", "ends cooling for the hour"],
        || {
            let p = pool(2);
            let zero = Duration::ZERO;
            p.cool(
                0,
                Generation::Current,
                CooldownReason::RateLimited,
                zero,
                false,
            );
            let hour = Outcome::Cool(CooldownReason::QuotaExhausted, HOUR, false);
            let cooler = spawn(&p, move |p| p.record(0, Generation::Of(0), hour, None));
            let picker = spawn(&p, |p| {
                p.pick(&mut p.cursor(), &p.lanes.default, None)
                    .map(|p| p.key)
            });
            let resetter = spawn(&p, |p| p.reset(0));
            cooler.join().unwrap();
            resetter.join().unwrap();
            assert!(
                picker.join().unwrap().is_some(),
                "key 1 was active throughout"
            );
            let w = p.slots[0].word();
            let reached = if w.tag() == TAG_PROBING {
                assert_eq!((w.after(), w.generation()), (None, 0), "{w:?}");
                "ends reset (half-open)"
            } else {
                let cooling = Word::cooling(CooldownReason::QuotaExhausted, HOUR_MS, false, 0);
                assert_eq!(w, cooling);
                "ends cooling for the hour"
            };
            assert_settled(&p);
            vec![reached]
        },
    );
}

/// A half-open key's probe is a token: two requests pick the one key at once, with a probe
/// wait, and exactly one of them takes the probe while the other finds no key. Once the
/// probe ends (its answer settled nothing), the next request takes it again.
#[test]
fn one_probe_per_half_open_key() {
    check(
        "one_probe_per_half_open_key",
        None,
        &["the first picker probed", "the second picker probed"],
        || {
            let p = pool_probing(1, Duration::from_secs(1));
            let pick = |p: &Pool| p.pick(&mut p.cursor(), &p.lanes.default, None);
            let a = spawn(&p, move |p| pick(p).map(|x| x.probe.map(|p| p.word())));
            let b = spawn(&p, move |p| pick(p).map(|x| x.probe.map(|p| p.word())));
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            let (winner, reached) = match (a, b) {
                (Some(Some(w)), None) => (w, "the first picker probed"),
                (None, Some(Some(w))) => (w, "the second picker probed"),
                other => panic!("not exactly one probe: {other:?}"),
            };
            assert_eq!(p.slots[0].word().0, winner);
            p.end_probe(Probe::new(0, winner));
            let again = pick(&p).and_then(|x| x.probe);
            assert!(again.is_some(), "the probe was given back");
            assert_settled_bits(&p);
            vec![reached]
        },
    );
}

/// Every key's bit agrees with its state word.
fn assert_settled_bits(p: &Pool) {
    for i in 0..p.len() {
        let w = p.slots[i].word();
        let bit = (p.usable[i / 64].load(SeqCst) >> (i % 64)) & 1 == 1;
        assert_eq!(bit, w.tag() == TAG_ACTIVE || w.tag() == TAG_PROBING);
    }
}
