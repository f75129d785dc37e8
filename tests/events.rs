//! The events observer sees everything the pool learns, in order; and a pool's state leaves
//! the process with wall-clock deadlines and comes back merged. Mocks on a paused clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tower_key_fallback::{
    CooldownReason, KeyEvent, KeyEvents, KeyFallbackLayer, KeyRecord, KeyState, RecordedState,
    TracingEvents,
};

mod support;
use support::*;

/// Writes each event as one short line.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl KeyEvents for Recorder {
    fn on_event(&self, event: &KeyEvent<'_>) {
        let line = match *event {
            KeyEvent::AttemptStarted { key, attempt } => format!("attempt {key} {attempt}"),
            KeyEvent::Answered { key, status, .. } => format!("answered {key} {status}"),
            KeyEvent::CallFailed { key, verdict, .. } => format!("failed {key} {verdict:?}"),
            KeyEvent::Switched { from, to, reason } => format!("switched {from} {to} {reason}"),
            KeyEvent::CooledDown {
                key,
                reason,
                duration,
                capped,
                ..
            } => format!(
                "cooled {key} {} {}s capped={capped}",
                reason.as_str(),
                duration.as_secs()
            ),
            KeyEvent::Disabled { key, reason, .. } => {
                format!("disabled {key} {}", reason.as_str())
            }
            KeyEvent::Recovered { key, after, .. } => {
                format!("recovered {key} {}", after.as_str())
            }
            KeyEvent::Reset { key, .. } => format!("reset {key}"),
            KeyEvent::Rotated { key, fingerprint } => {
                assert!(fingerprint.starts_with("fp:"));
                format!("rotated {key}")
            }
            KeyEvent::Exhausted { attempts, .. } => format!("exhausted {attempts}"),
            KeyEvent::Probing { key, after } => match after {
                Some(after) => format!("probing {key} after {}", after.as_str()),
                None => format!("probing {key}"),
            },
            KeyEvent::Opened { key, .. } => format!("opened {key}"),
            KeyEvent::ProbeReleased { key } => format!("probe released {key}"),
            KeyEvent::Waiting {
                waiters,
                soonest,
                for_probe,
                ..
            } => format!("waiting {waiters} {}s probe={for_probe}", soonest.as_secs()),
            KeyEvent::Waited { waited, got_key } => {
                format!("waited {}s got_key={got_key}", waited.as_secs())
            }
            // What replicas sharing state count, on every attempt and answer: the redis
            // tests and `share`'s unit tests follow them.
            KeyEvent::Spending { .. } | KeyEvent::WindowReported { .. } => return,
            _ => "other".to_owned(),
        };
        self.0.lock().unwrap().push(line);
    }
}

#[tokio::test(start_paused = true)]
async fn the_observer_sees_every_step_in_order() {
    let events = Recorder::default();
    let layer = KeyFallbackLayer::builder(keys(2))
        .events((TracingEvents, events.clone()))
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    exchange(
        &mut svc,
        &mut handle,
        vec![
            ("gsk_key1", response(429, &[("retry-after", "9")], GROQ_429)),
            ("gsk_key2", response(200, &[], "")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        events.take(),
        [
            // Neither key has been heard from: each is probed once, and opens when it serves.
            "probing key-1",
            "attempt key-1 1",
            "answered key-1 429",
            "cooled key-1 rate_limited 9s capped=false",
            "probing key-2",
            "switched key-1 key-2 rate_limited",
            "attempt key-2 2",
            "answered key-2 200",
            "opened key-2",
        ]
    );

    // A dead key, then no key left.
    let err = exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key2", response(401, &[], INVALID_401))],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no API key could serve"));
    assert_eq!(
        events.take(),
        [
            "attempt key-2 1",
            "answered key-2 401",
            "disabled key-2 invalid_key",
            "exhausted 1",
        ]
    );

    // Recovery, reset, rotation.
    tokio::time::advance(Duration::from_secs(10)).await;
    exchange(
        &mut svc,
        &mut handle,
        vec![("gsk_key1", response(200, &[], ""))],
    )
    .await
    .unwrap();
    assert_eq!(
        events.take(),
        [
            "recovered key-1 rate_limited",
            "probing key-1 after rate_limited",
            "attempt key-1 1",
            "answered key-1 200",
            "opened key-1",
        ],
        "the first request after the deadline probes the key, and its success opens it"
    );
    keys.reset("key-2").unwrap();
    keys.rotate("key-1", "gsk_new").unwrap();
    assert_eq!(events.take(), ["reset key-2", "rotated key-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_pools_state_leaves_with_wall_clock_deadlines_and_merges_back() {
    let here = KeyFallbackLayer::new(keys(3)).handle();
    let there = KeyFallbackLayer::new(keys(3)).handle();
    there.cool_down("key-1", Duration::from_secs(30)).unwrap();
    there.disable("key-2").unwrap();
    let records = there.export();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].fingerprint, there.status().keys[0].fingerprint);
    let RecordedState::CoolingDown { until, reason, .. } = records[0].state else {
        panic!("{:?}", records[0]);
    };
    assert_eq!(reason, CooldownReason::Manual);
    // The deadline is a wall-clock instant about 30 s from now.
    let left = until.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(29) && left <= Duration::from_secs(30),
        "{left:?}"
    );

    let changed: Vec<bool> = records.iter().map(|r| here.import(r)).collect();
    assert_eq!(changed, [true, true, false]);
    let status = here.status();
    assert!(matches!(
        status.keys[0].state,
        KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(29)
    ));
    assert!(matches!(status.keys[1].state, KeyState::Disabled { .. }));
    assert_eq!(status.keys[2].state, KeyState::Active);

    // Merging is monotone: the same records again change nothing, a shorter cooldown never
    // shortens a longer one, and an unknown fingerprint is ignored.
    assert!(records.iter().all(|r| !here.import(r)));
    here.cool_down("key-3", Duration::from_secs(3600)).unwrap();
    let short = KeyRecord::new(
        "key-3",
        &here.status().keys[2].fingerprint,
        RecordedState::CoolingDown {
            reason: CooldownReason::RateLimited,
            until: SystemTime::now() + Duration::from_secs(5),
            capped: false,
        },
    );
    assert!(!here.import(&short));
    assert!(matches!(
        here.status().keys[2].state,
        KeyState::CoolingDown { remaining, .. } if remaining > Duration::from_secs(3500)
    ));
    let stranger = KeyRecord::new("key-1", "fp:0000000000000000", records[1].state);
    assert!(!here.import(&stranger));

    // Driven by tokio's clock: after the deadline the imported cooldown is over.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(here.status().keys[0].state, KeyState::Active);
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_a_key_is_told_when_it_begins_and_ends() {
    use tower::{Service, ServiceExt};
    let events = Recorder::default();
    let layer = KeyFallbackLayer::builder(keys(1))
        .wait_for_key(Duration::from_secs(30))
        .events(events.clone())
        .build();
    let (mut svc, mut handle, keys) = setup(layer);
    handle.allow(10);
    keys.cool_down("key-1", Duration::from_secs(4)).unwrap();
    events.take();
    // Readiness is pending until the key is back; a clone called without it waits inside.
    let mut clone = svc.clone();
    let call = tokio::spawn(async move { clone.call(request()).await });
    let (_, reply) = next(&mut handle).await;
    reply.send_response(response(200, &[], "{}"));
    call.await.unwrap().unwrap();
    let seen = events.take();
    assert_eq!(seen[0], "waiting 1 4s probe=false", "{seen:?}");
    assert!(
        seen.contains(&"waited 4s got_key=true".to_owned()),
        "{seen:?}"
    );
    svc.ready().await.unwrap();
}
