//! Feature `redis`: key state shared through a real `redis-server` (started here on a free
//! loopback port, stopped by its PID). Replicas are pools in this process, each with its own
//! store and connections, in front of one in-process fake provider.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/tls.rs"]
mod tls;

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use redis_server::{free_port, RedisServer, Warnings, Watch};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower::{Layer, Service, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider};
use tower_key_fallback::{
    CooldownReason, DisableReason, KeyFallback, KeyFallbackLayer, KeyHandle, KeySet, KeyState,
    RecordedState, RedisStore, TracingEvents,
};

const KEYS: [&str; 3] = ["gsk_share1", "gsk_share2", "gsk_share3"];
const WAIT: Duration = Duration::from_secs(10);

struct Replica {
    service: KeyFallback<FakeProvider>,
    handle: KeyHandle,
    events: UnboundedReceiver<String>,
}

impl Replica {
    async fn start(url: &str, namespace: &str, provider: &FakeProvider) -> Replica {
        let store = RedisStore::builder(url, namespace)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .command_timeout(Duration::from_millis(500))
            .connect()
            .await
            .expect("store");
        Replica::with_store(store, provider)
    }

    fn with_store(store: RedisStore, provider: &FakeProvider) -> Replica {
        let (tx, events) = unbounded_channel();
        let layer = KeyFallbackLayer::builder(KeySet::new(KEYS).unwrap())
            .events((TracingEvents, Watch(tx)))
            .max_cooldown(Duration::from_secs(3600))
            .shared_state(store)
            .build();
        let handle = layer.handle();
        Replica {
            service: layer.layer(provider.clone()),
            handle,
            events,
        }
    }

    /// One chat request; its status.
    async fn chat(&mut self) -> u16 {
        let body = r#"{"model":"llama-3.1-8b-instant","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = Request::post("http://fake.test/openai/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let svc = ServiceExt::<Request<Full<Bytes>>>::ready(&mut self.service)
            .await
            .unwrap();
        match svc.call(req).await {
            Ok(res) => {
                let status = res.status().as_u16();
                let _ = res.into_body().collect().await;
                status
            }
            Err(_) => 0,
        }
    }

    /// Waits (at most `WAIT`) for the observer to report `line`.
    async fn heard(&mut self, line: &str) {
        let wait = async {
            while let Some(got) = self.events.recv().await {
                if got == line {
                    return;
                }
            }
            panic!("events closed");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("not heard within {WAIT:?}: {line}"));
    }

    fn state(&self, label: &str) -> KeyState {
        self.handle.status().get(label).unwrap().state.clone()
    }
}

fn provider(behaviors: [Behavior; 3]) -> FakeProvider {
    let mut b = FakeProvider::builder();
    for (key, behavior) in KEYS.iter().zip(behaviors) {
        b = b.key(*key, behavior);
    }
    b.build()
}

/// A key's cooldown, with its wall-clock end, as the handle exports it.
fn cooling_until(handle: &KeyHandle, label: &str) -> Option<(CooldownReason, SystemTime)> {
    let record = handle.export().into_iter().find(|r| r.label == label)?;
    match record.state {
        RecordedState::CoolingDown { reason, until, .. } => Some((reason, until)),
        _ => None,
    }
}

fn close(a: SystemTime, b: SystemTime) -> bool {
    let (a, b) = (
        a.duration_since(UNIX_EPOCH).unwrap(),
        b.duration_since(UNIX_EPOCH).unwrap(),
    );
    a.max(b) - a.min(b) < Duration::from_millis(5)
}

#[tokio::test]
async fn what_one_replica_learns_the_other_knows() {
    let redis = RedisServer::start();
    let provider = provider([Behavior::QuotaExhausted, Behavior::InvalidKey, Behavior::Ok]);
    let mut a = Replica::start(&redis.url(), "learns", &provider).await;
    let mut b = Replica::start(&redis.url(), "learns", &provider).await;

    // A learns from the provider: key-1's quota is spent, key-2 is invalid.
    assert_eq!(a.chat().await, 200);
    b.heard("cooled key-1").await;
    b.heard("disabled key-2").await;
    let (reason, until) = cooling_until(&b.handle, "key-1").expect("key-1 cooling on B");
    assert_eq!(reason, CooldownReason::QuotaExhausted);
    let (_, here) = cooling_until(&a.handle, "key-1").unwrap();
    assert!(
        close(until, here),
        "B's deadline is A's: {until:?} vs {here:?}"
    );
    assert_eq!(
        b.state("key-2"),
        KeyState::Disabled {
            reason: DisableReason::InvalidKey
        }
    );

    // B spends nothing on them.
    let before = provider.stats();
    assert_eq!(b.chat().await, 200);
    let after = provider.stats();
    assert_eq!(after.key(KEYS[0]).requests, before.key(KEYS[0]).requests);
    assert_eq!(after.key(KEYS[1]).requests, before.key(KEYS[1]).requests);
    assert_eq!(
        after.key(KEYS[2]).requests,
        before.key(KEYS[2]).requests + 1
    );

    // Nothing in Redis holds a key.
    let stored = redis.cli(&["--no-raw", "KEYS", "*"]);
    let values = redis.cli(&["EVAL", "local o = {} for _, k in ipairs(redis.call('KEYS', '*')) do if redis.call('TYPE', k).ok == 'string' then table.insert(o, redis.call('GET', k)) end end return o", "0"]);
    for key in KEYS {
        assert!(
            !stored.contains(key) && !values.contains(key),
            "a key reached Redis"
        );
    }
    assert!(
        values.contains("fp:"),
        "fingerprints are what is stored: {values}"
    );
}

#[tokio::test]
async fn a_reset_on_one_replica_is_seen_by_the_other() {
    let redis = RedisServer::start();
    let provider = provider([Behavior::Ok, Behavior::Ok, Behavior::Ok]);
    let mut a = Replica::start(&redis.url(), "reset", &provider).await;
    let mut b = Replica::start(&redis.url(), "reset", &provider).await;

    a.handle
        .cool_down("key-1", Duration::from_secs(600))
        .unwrap();
    a.handle.disable("key-2").unwrap();
    b.heard("cooled key-1").await;
    b.heard("disabled key-2").await;

    // B resets key-1: A lets it go too.
    b.handle.reset("key-1").unwrap();
    a.heard("reset key-1").await;
    assert!(cooling_until(&a.handle, "key-1").is_none());
    assert!(matches!(a.state("key-2"), KeyState::Disabled { .. }));

    // A key active on B but cooling on A: B's reset still reaches A.
    a.handle
        .cool_down("key-3", Duration::from_secs(600))
        .unwrap();
    b.heard("cooled key-3").await;
    b.handle.reset_all();
    a.heard("reset key-2").await;
    a.heard("reset key-3").await;
    for label in ["key-1", "key-2", "key-3"] {
        assert!(
            matches!(a.state(label), KeyState::Active),
            "{label} on A: {:?}",
            a.state(label)
        );
    }
    // And Redis forgot them: a replica that starts now sees every key active.
    let c = Replica::start(&redis.url(), "reset", &provider).await;
    for label in ["key-1", "key-2", "key-3"] {
        assert_eq!(c.state(label), KeyState::Active, "{label} on a new replica");
    }
}

#[tokio::test]
async fn racing_cooldowns_end_in_one_state() {
    let redis = RedisServer::start();
    let provider = provider([Behavior::Ok, Behavior::Ok, Behavior::Ok]);
    let mut a = Replica::start(&redis.url(), "race", &provider).await;
    let mut b = Replica::start(&redis.url(), "race", &provider).await;

    // Both replicas set cooldowns of key-1 at once, each its own deadlines; the longest of
    // all is B's 400 s.
    let (ha, hb) = (a.handle.clone(), b.handle.clone());
    let ta = tokio::spawn(async move {
        for s in [300u64, 100, 350, 200] {
            ha.cool_down("key-1", Duration::from_secs(s)).unwrap();
            tokio::task::yield_now().await;
        }
    });
    let tb = tokio::spawn(async move {
        for s in [150u64, 400, 50, 250] {
            hb.cool_down("key-1", Duration::from_secs(s)).unwrap();
            tokio::task::yield_now().await;
        }
    });
    ta.await.unwrap();
    tb.await.unwrap();
    // A reset from A, then a cooldown from B once B has it: the cooldown stands everywhere.
    a.handle
        .cool_down("key-2", Duration::from_secs(30))
        .unwrap();
    b.heard("cooled key-2").await;
    a.handle.reset("key-2").unwrap();
    b.heard("reset key-2").await;
    b.handle
        .cool_down("key-2", Duration::from_secs(120))
        .unwrap();
    a.heard("cooled key-2").await;
    // A reset and a cooldown at once: whichever Redis numbers last wins, on both.
    a.handle
        .cool_down("key-3", Duration::from_secs(30))
        .unwrap();
    b.heard("cooled key-3").await;
    a.handle.reset("key-3").unwrap();
    b.handle
        .cool_down("key-3", Duration::from_secs(60))
        .unwrap();

    let want = cooling_until(&b.handle, "key-1").unwrap().1;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (sa, sb) = (a.handle.status(), b.handle.status());
        let same = ["key-1", "key-2", "key-3"].iter().all(|label| {
            match (
                cooling_until(&a.handle, label),
                cooling_until(&b.handle, label),
            ) {
                (Some((_, u)), Some((_, v))) => close(u, v),
                (None, None) => sa.get(label).unwrap().state == sb.get(label).unwrap().state,
                _ => false,
            }
        });
        if same && cooling_until(&a.handle, "key-1").is_some_and(|(_, u)| close(u, want)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas did not converge: {sa:?} vs {sb:?}"
        );
        let _ = a.events.try_recv();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let longest = SystemTime::now() + Duration::from_secs(400);
    assert!(
        want <= longest && longest.duration_since(want).unwrap() < Duration::from_secs(5),
        "the longest cooldown won"
    );
    assert!(
        cooling_until(&a.handle, "key-2").is_some(),
        "the cooldown after the reset stands"
    );
    // Redis holds the same: key-1's stored deadline is the longest.
    let fp = a.handle.status().keys[0].fingerprint.clone();
    let stored = redis.cli(&["GET", &format!("tower-key-fallback:race:k:{fp}")]);
    let until_ms: u64 = stored.split(' ').nth(3).unwrap().parse().unwrap();
    assert!(
        close(UNIX_EPOCH + Duration::from_millis(until_ms), want),
        "{stored}"
    );
}

#[tokio::test]
async fn a_replica_that_starts_loads_what_is_current() {
    let redis = RedisServer::start();
    let provider = provider([Behavior::QuotaExhausted, Behavior::InvalidKey, Behavior::Ok]);
    {
        let mut a = Replica::start(&redis.url(), "restart", &provider).await;
        assert_eq!(a.chat().await, 200);
        // A's store sends what it learned in the background: wait (bounded) until B, which
        // knows only what came through Redis, has both, so Redis holds them when A goes. A
        // request of B's was no wait: a write of A's that took longer (a loaded machine)
        // left Redis empty for C.
        let b = Replica::start(&redis.url(), "restart", &provider).await;
        let deadline = std::time::Instant::now() + WAIT;
        while cooling_until(&b.handle, "key-1").is_none()
            || !matches!(b.state("key-2"), KeyState::Disabled { .. })
        {
            assert!(
                std::time::Instant::now() < deadline,
                "A's state never reached B"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let calls = provider.stats();
    // A new process: it knows before its first request.
    let mut c = Replica::start(&redis.url(), "restart", &provider).await;
    assert!(
        cooling_until(&c.handle, "key-1").is_some(),
        "{:?}",
        c.state("key-1")
    );
    assert!(matches!(c.state("key-2"), KeyState::Disabled { .. }));
    for _ in 0..10 {
        assert_eq!(c.chat().await, 200);
    }
    let after = provider.stats();
    assert_eq!(after.key(KEYS[0]).requests, calls.key(KEYS[0]).requests);
    assert_eq!(after.key(KEYS[1]).requests, calls.key(KEYS[1]).requests);
}

const STOPPED: &str = "sharing stopped";

#[tokio::test]
async fn redis_down_at_start_costs_only_sharing_and_converges_on_return() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let provider = provider([Behavior::QuotaExhausted, Behavior::Ok, Behavior::Ok]);

    // Nothing listens: the store comes up anyway, requests are served, one warning.
    let mut a = Replica::start(&url, "down", &provider).await;
    for _ in 0..5 {
        assert_eq!(a.chat().await, 200);
    }
    assert!(cooling_until(&a.handle, "key-1").is_some());
    tokio::time::sleep(Duration::from_millis(500)).await; // several reconnections fail
    assert_eq!(
        warnings.count(STOPPED),
        1,
        "one warning while Redis stays down"
    );

    // Redis comes: A sends what it learned meanwhile, and a new replica loads it.
    let redis = RedisServer::start_on(port);
    let fp = a.handle.status().keys[0].fingerprint.clone();
    let key = format!("tower-key-fallback:down:k:{fp}");
    let deadline = std::time::Instant::now() + WAIT;
    while redis.cli(&["EXISTS", &key]) != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "A never sent its state"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = Replica::start(&url, "down", &provider).await;
    assert!(cooling_until(&b.handle, "key-1").is_some());
    assert_eq!(warnings.count(STOPPED), 1);
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_run() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let mut redis = RedisServer::start();
    let port = redis.port;
    let provider = provider([Behavior::Ok, Behavior::QuotaExhausted, Behavior::Ok]);
    let mut a = Replica::start(&redis.url(), "killed", &provider).await;
    let mut b = Replica::start(&redis.url(), "killed", &provider).await;
    a.handle
        .cool_down("key-1", Duration::from_secs(600))
        .unwrap();
    b.heard("cooled key-1").await;

    redis.kill();
    // While Redis is gone: requests are served, and A learns key-2's quota is spent.
    for _ in 0..5 {
        assert_eq!(a.chat().await, 200);
    }
    assert!(cooling_until(&a.handle, "key-2").is_some());

    // Redis returns empty (no persistence): both reconnect, A sends what it learned, B hears.
    let redis = RedisServer::start_on(port);
    b.heard("cooled key-2").await;
    assert!(cooling_until(&b.handle, "key-2").is_some());
    assert!(
        cooling_until(&b.handle, "key-1").is_some(),
        "what B knew, it keeps"
    );
    // Each replica said once that sharing stopped.
    assert_eq!(warnings.count(STOPPED), 2, "one warning per replica");
    drop(redis);
}

#[tokio::test]
async fn a_stalled_redis_never_holds_a_request() {
    let redis = RedisServer::start();
    let provider = provider([
        Behavior::QuotaExhausted,
        Behavior::QuotaExhausted,
        Behavior::Ok,
    ]);
    let mut a = Replica::start(&redis.url(), "stalled", &provider).await;
    let mut b = Replica::start(&redis.url(), "stalled", &provider).await;
    // Redis stops answering (SIGSTOP): its sockets stay open, nothing comes back.
    redis.signal("STOP");
    for _ in 0..10 {
        let status = tokio::time::timeout(WAIT, a.chat())
            .await
            .expect("request held");
        assert_eq!(status, 200);
    }
    a.handle.reset("key-1").unwrap();
    a.handle
        .cool_down("key-1", Duration::from_secs(90))
        .unwrap();
    // All served while Redis is still stopped; then it resumes, and B converges.
    redis.signal("CONT");
    b.heard("cooled key-2").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cooling_until(&b.handle, "key-1").is_some_and(|(r, _)| r == CooldownReason::Manual) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            b.state("key-1")
        );
        let _ = b.events.try_recv();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn garbage_and_hostile_messages_change_nothing_they_should_not() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let redis = RedisServer::start();
    let provider = provider([Behavior::Ok, Behavior::Ok, Behavior::Ok]);
    let mut a = Replica::start(&redis.url(), "garbage", &provider).await;
    let b = Replica::start(&redis.url(), "garbage", &provider).await;
    let fp = a.handle.status().keys[0].fingerprint.clone();
    let channel = "tower-key-fallback:garbage";
    let far = SystemTime::now() + Duration::from_secs(100 * 365 * 86_400);
    let far_ms = far.duration_since(UNIX_EPOCH).unwrap().as_millis();
    for junk in [
        "garbage".to_owned(),
        "tkf1 x c 1 0 fp:0 rate_limited 0 0 0 - key-1".to_owned(),
        format!("tkf1 999999 c {far_ms} 0 fp:00000000000000ff rate_limited 0 0 0 - nobody"),
        format!("tkf1 999999 z {far_ms} 0 {fp} rate_limited 0 0 0 - key-1"),
    ] {
        redis.cli(&["PUBLISH", channel, &junk]);
    }
    // A well-formed message asking for a century: held for this pool's max_cooldown (1 h).
    redis.cli(&[
        "PUBLISH",
        channel,
        &format!("tkf1 1000000 c {far_ms} 0 {fp} rate_limited 0 0 0 - key-1"),
    ]);
    a.heard("cooled key-1").await;
    let (_, until) = cooling_until(&a.handle, "key-1").unwrap();
    assert!(until <= SystemTime::now() + Duration::from_secs(3600));
    // Sharing goes on: B's cooldown still reaches A.
    b.handle
        .cool_down("key-2", Duration::from_secs(60))
        .unwrap();
    a.heard("cooled key-2").await;
    assert_eq!(
        warnings.count("unreadable message"),
        2,
        "one warning per replica for the junk"
    );

    // A server that is not Redis: the store comes up, requests are served, one warning.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().take(50).flatten() {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let before = warnings.count(STOPPED);
    let mut c = Replica::start(&format!("redis://127.0.0.1:{port}/"), "garbage", &provider).await;
    assert_eq!(c.chat().await, 200);
    assert_eq!(warnings.count(STOPPED), before + 1);
}

#[tokio::test]
async fn bad_urls_and_namespaces_are_named_never_shown() {
    for (url, ns, want) in [
        ("http://127.0.0.1/", "x", "redis:// or rediss://"),
        ("redis://:hunter2@[::1/", "x", "not of the form"),
        ("redis://127.0.0.1/", "", "1 to 128"),
        ("redis://127.0.0.1/", "a b*", "only ASCII"),
    ] {
        let err = RedisStore::connect(url, ns).await.unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[tokio::test]
async fn a_password_in_the_url_is_used_and_never_shown() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pass"]);
    let provider = provider([Behavior::Ok, Behavior::Ok, Behavior::Ok]);
    let good = format!("redis://:s3cret-pass@127.0.0.1:{}/", redis.port);
    let mut a = Replica::start(&good, "auth", &provider).await;
    let mut b = Replica::start(&good, "auth", &provider).await;
    a.handle
        .cool_down("key-1", Duration::from_secs(60))
        .unwrap();
    b.heard("cooled key-1").await;
    // A wrong password: no sharing, one warning that names neither password.
    let bad = format!("redis://:wrong-pass@127.0.0.1:{}/", redis.port);
    let mut c = Replica::start(&bad, "auth", &provider).await;
    assert_eq!(c.chat().await, 200);
    // The warning comes when the store's first session fails, which `connect` waits for only
    // so long: on a slow machine it may come after the request. Bounded by WAIT.
    let deadline = tokio::time::Instant::now() + WAIT;
    while warnings.count(STOPPED) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(warnings.count(STOPPED), 1);
    let logged = String::from_utf8_lossy(&warnings.0.lock().unwrap()).into_owned();
    assert!(
        !logged.contains("s3cret") && !logged.contains("wrong-pass"),
        "{logged}"
    );
    let _ = &mut a;
}

#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn rediss_urls_speak_tls() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let tls::TestCa { dir, ca, cert, key } = tls::TestCa::make("tls");
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let redis = RedisServer::start_with(&[
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert_s,
        "--tls-key-file",
        &key_s,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{}/", redis.port);
    let pem = std::fs::read(&ca).unwrap();
    let provider = provider([Behavior::Ok, Behavior::Ok, Behavior::Ok]);
    let store = |pem: Vec<u8>| {
        RedisStore::builder(&url, "tls")
            .tls_root_certificates(pem)
            .command_timeout(Duration::from_millis(500))
            .connect()
    };
    let mut a = Replica::with_store(store(pem.clone()).await.unwrap(), &provider);
    let mut b = Replica::with_store(store(pem).await.unwrap(), &provider);
    a.handle
        .cool_down("key-2", Duration::from_secs(60))
        .unwrap();
    b.heard("cooled key-2").await;
    assert_eq!(warnings.count(STOPPED), 0);
    // Without the CA, the bundled web roots do not trust the server: no sharing, one warning.
    let mut c = Replica::start(&url, "tls", &provider).await;
    assert_eq!(c.chat().await, 200);
    assert_eq!(warnings.count(STOPPED), 1);
    let _ = (&mut a, std::fs::remove_dir_all(&dir));
}
