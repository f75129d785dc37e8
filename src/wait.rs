//! Waiting for a key, in turn: when no key can serve a request now but one can soon (a
//! probe's answer, or with `wait_for_key` a cooldown or a budget that ends within it), the
//! request waits instead of failing with `Exhausted`.
//!
//! Each lane (bucket) has a queue. Tokio's mutex is fair, so waiters get their turn first
//! come, first served; the head looks for a key each time the pool changes (an answer, a
//! probe's end, a reset) or the soonest key's time comes, until it has one or its limit
//! passes. Dropping a waiting request takes it out of the queue (the mutex's lock future
//! and guard are cancel-safe), and it holds no claim on a key while it waits.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::task::Poll;

use tokio::time::Instant;

use crate::driver::{Driver, Shared, Step};
use crate::events::KeyEvent;
use crate::sync::AtomicUsize;

/// Counts a waiter in its lane and in the pool while it lives.
struct Counted<'a>(&'a AtomicUsize, &'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(lane: &'a AtomicUsize, pool: &'a AtomicUsize) -> (Counted<'a>, usize) {
        pool.fetch_add(1, SeqCst);
        let n = lane.fetch_add(1, SeqCst) + 1;
        (Counted(lane, pool), n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
        self.1.fetch_sub(1, SeqCst);
    }
}

/// Waits in the request's lane until its driver has a key (`Step::Replay`) or must give up
/// (`Step::GiveUp`).
pub(crate) async fn wait(shared: Arc<Shared>, mut driver: Driver) -> (Driver, Step) {
    let pool = &shared.pool;
    let lane = driver.lane_arc(&shared);
    let started = Instant::now();
    let (_counted, waiters) = Counted::new(&lane.waiters.count, &pool.waiting);
    if let Some(soonest) = pool.soonest(&lane, None) {
        pool.events.on_event(&KeyEvent::Waiting {
            bucket: lane.name.as_deref(),
            waiters,
            soonest: std::time::Duration::from_millis(soonest.at_ms.saturating_sub(pool.now_ms())),
            for_probe: soonest.probe_ms.is_some(),
        });
    }
    let _turn = lane.waiters.turn.lock().await;
    let step = loop {
        // Listening before looking: a change between the look and the sleep still wakes.
        let mut changed = pin!(pool.changed.notified());
        changed.as_mut().enable();
        match driver.after_wait(&shared) {
            Step::Wait => {}
            step => break step,
        }
        let mut sleep = pin!(tokio::time::sleep_until(
            pool.instant(driver.wake_at(&shared))
        ));
        poll_fn(|cx| {
            if changed.as_mut().poll(cx).is_ready() || sleep.as_mut().poll(cx).is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    };
    pool.events.on_event(&KeyEvent::Waited {
        waited: started.elapsed(),
        got_key: step == Step::Replay,
    });
    (driver, step)
}
