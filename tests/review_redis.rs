//! Review of feature `redis`: each test here shows a bug (it fails on 958aee4). Same style
//! as `tests/redis.rs`: a real `redis-server` on a free loopback port, replicas are pools in
//! this process.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use redis_server::{RedisServer, Warnings, Watch};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower_key_fallback::{
    KeyFallbackLayer, KeyHandle, KeySet, KeyState, RedisStore, TracingEvents,
};

const KEYS: [&str; 3] = ["gsk_review1", "gsk_review2", "gsk_review3"];
const WAIT: Duration = Duration::from_secs(10);

struct Replica {
    handle: KeyHandle,
    events: UnboundedReceiver<String>,
}

impl Replica {
    async fn start(url: &str, namespace: &str) -> Replica {
        let store = RedisStore::builder(url, namespace)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .command_timeout(Duration::from_millis(500))
            .connect()
            .await
            .expect("store");
        Replica::with_store(store)
    }

    fn with_store(store: RedisStore) -> Replica {
        let (tx, events) = unbounded_channel();
        let layer = KeyFallbackLayer::builder(KeySet::new(KEYS).unwrap())
            .events((TracingEvents, Watch(tx)))
            .max_cooldown(Duration::from_secs(3600))
            .shared_state(store)
            .build();
        Replica {
            handle: layer.handle(),
            events,
        }
    }

    /// Waits (at most `within`) for the observer to report `line`.
    async fn heard_within(&mut self, line: &str, within: Duration) -> bool {
        let wait = async {
            while let Some(got) = self.events.recv().await {
                if got == line {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(within, wait).await.unwrap_or(false)
    }

    async fn heard(&mut self, line: &str) {
        assert!(
            self.heard_within(line, WAIT).await,
            "not heard within {WAIT:?}: {line}"
        );
    }

    fn state(&self, label: &str) -> KeyState {
        self.handle.status().get(label).unwrap().state.clone()
    }

    fn fingerprint(&self, i: usize) -> String {
        self.handle.status().keys[i].fingerprint.clone()
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Redis restarted without its data (no persistence, a failover to an empty replica, a
/// FLUSHALL) starts its `INCR` counter over, but every replica keeps the highest reset
/// number it saw. A replica that applied a `reset_all` (or a key's reset) numbered N
/// drops, as "older than the reset", every message numbered N or less from the new Redis:
/// it stays deaf to the others' cooldowns and disables until the counter passes N again
/// (after days of running, N is large). A replica that starts now does see them: the
/// replicas do not converge.
#[tokio::test]
async fn review_after_redis_restarts_empty_a_replica_that_saw_a_reset_still_hears() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let url = redis.url();
    let mut a = Replica::start(&url, "reborn").await;
    let b = Replica::start(&url, "reborn").await;

    // Some history: a few cooldowns, then a reset_all, all heard by A.
    for label in ["key-1", "key-2", "key-3"] {
        b.handle.cool_down(label, Duration::from_secs(600)).unwrap();
        a.heard(&format!("cooled {label}")).await;
    }
    b.handle.reset_all();
    a.heard("reset key-1").await;

    // Redis comes back empty; both replicas resubscribe.
    redis.kill();
    let redis = RedisServer::start_on(port);
    let channel = "tower-key-fallback:reborn";
    until("both replicas resubscribed", || {
        redis.cli(&["PUBSUB", "NUMSUB", channel]).ends_with('2')
    })
    .await;

    // B learns key-2 is out of quota; Redis stores it (seq 1 of the new counter).
    b.handle
        .cool_down("key-2", Duration::from_secs(600))
        .unwrap();
    let stored = format!("tower-key-fallback:reborn:k:{}", b.fingerprint(1));
    until("B's cooldown stored", || {
        redis.cli(&["EXISTS", &stored]) == "1"
    })
    .await;
    // A replica that starts now knows it...
    let c = Replica::start(&url, "reborn").await;
    assert!(
        matches!(c.state("key-2"), KeyState::CoolingDown { .. }),
        "{:?}",
        c.state("key-2")
    );
    // ...and so must A, which has been connected all along.
    let heard = a.heard_within("cooled key-2", Duration::from_secs(3)).await;
    assert!(
        heard,
        "A never applied B's cooldown (stored as {:?}); A: {:?}, new replica: {:?}",
        redis.cli(&["GET", &stored]),
        a.state("key-2"),
        c.state("key-2")
    );
}

/// Namespaces may not hold `:` (a namespace's keys are `tower-key-fallback:{ns}:…` and its
/// load scans `tower-key-fallback:{ns}:*`, so `team` would load what `team:eu` stored), and
/// namespaces that start alike read nothing of each other.
#[tokio::test]
async fn review_a_namespace_does_not_load_another_namespaces_state() {
    let redis = RedisServer::start();
    let url = redis.url();
    let err = RedisStore::connect(&url, "team:eu").await.unwrap_err();
    assert!(err.to_string().contains("only ASCII letters"), "{err}");
    let eu = Replica::start(&url, "team-eu").await;
    eu.handle
        .cool_down("key-1", Duration::from_secs(600))
        .unwrap();
    eu.handle.disable("key-2").unwrap();
    let stored = format!("tower-key-fallback:team-eu:k:{}", eu.fingerprint(1));
    until("team-eu's disable stored", || {
        redis.cli(&["EXISTS", &stored]) == "1"
    })
    .await;

    // A replica of namespace `team`: nothing was ever shared in it.
    let team = Replica::start(&url, "team").await;
    assert_eq!(team.state("key-1"), KeyState::Active, "key-1 in `team`");
    assert_eq!(team.state("key-2"), KeyState::Active, "key-2 in `team`");
}

/// A Redis that accepts connections, SUBSCRIBE, SCAN and MGET but refuses the scripts'
/// writes (here: a replica after a failover, `READONLY`; also an ACL without scripting).
/// Each session connects, loads, says "sharing resumed", fails on the first pending update,
/// and since it had connected, warns "sharing stopped" again and restarts the backoff at its
/// minimum: a warning and a full reconnect + SCAN every ~reconnect_min, forever, instead of
/// one warning and a backoff that grows to reconnect_max.
#[tokio::test]
async fn review_a_redis_that_refuses_writes_warns_once_and_backs_off() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let redis = RedisServer::start();
    let store = RedisStore::builder(&redis.url(), "readonly")
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let a = Replica::with_store(store);
    // Redis becomes a replica (of a master that is not there): reads are served, writes
    // refused.
    redis.cli(&["REPLICAOF", "127.0.0.1", "1"]);
    let connections_so_far = || -> u64 {
        redis
            .cli(&["INFO", "stats"])
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = connections_so_far();
    a.handle
        .cool_down("key-1", Duration::from_secs(600))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connections = connections_so_far() - before;
    // The warnings are counted through a thread-local subscriber, which can miss some
    // when other tests run in parallel; the connections Redis counted cannot be missed.
    let warned = warnings.count("sharing stopped");
    assert!(
        warned <= 1 && connections <= 20,
        "in 3 s: {warned} warnings \"sharing stopped\", {connections} connections to Redis \
         (backoff 100 ms .. 5 s: a handful of reconnections at most)"
    );
}

/// The builder derives `Debug` with the URL in it: `{:?}` of a builder (a config struct
/// logged at start) prints the Redis password. `StoreError` and `RedisStore`'s `Debug` take
/// care never to show the URL; the builder does not.
#[test]
fn review_the_builder_debug_never_shows_the_password() {
    let builder = RedisStore::builder("redis://:hunter2@127.0.0.1:6379/", "groq");
    let shown = format!("{builder:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// `hold` is not bounded: "keep disables and resets for good" (`Duration::MAX`, or any hold
/// past year ~5138) makes the scripts' `PXAT` / `PX` argument no integer Redis takes. The
/// disable never reaches Redis, stays pending, and every session dies on it: nothing at all
/// is shared any more, the other replica never hears of it.
#[tokio::test]
async fn review_a_long_hold_still_shares_a_disable() {
    let redis = RedisServer::start();
    let url = redis.url();
    let store = RedisStore::builder(&url, "forever")
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .hold(Duration::MAX)
        .connect()
        .await
        .unwrap();
    let a = Replica::with_store(store);
    let mut b = Replica::start(&url, "forever").await;
    a.handle.disable("key-2").unwrap();
    let heard = b
        .heard_within("disabled key-2", Duration::from_secs(3))
        .await;
    assert!(heard, "B never heard A's disable: {:?}", b.state("key-2"));
}
