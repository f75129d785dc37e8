//! One request's walk over the keys, as decisions without I/O: the adapters (the tower
//! future, the reqwest middleware) tell the driver what happened (an answer and its verdict,
//! a failed call, whether the request could be copied) and it answers what to do: hand the
//! answer back, replay with the next key, or give up with [`Exhausted`]. Every decision of
//! the per-request path is made here, once.

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;

use crate::affinity::Affinity;
use crate::answer::Exhausted;
use crate::body::{Buffered, InspectedBody};
use crate::budget::{Lane, Ticket};
use crate::capacity::{Bucket, Report, TokenCost};
use crate::classify::{Classify, ErrorVerdict, Verdict};
use crate::config::{Config, Outcome, Strip};
use crate::error::BoxError;
use crate::events::KeyEvent;
use crate::keys::KeyInUse;
use crate::pool::{Cursor, Generation, Pick, Pool, Probe};

/// What every service made by one layer shares: the pool, the classifier and the
/// configuration. Aligned so that the `Arc`'s reference counts, written by every request,
/// sit on another cache line.
#[repr(align(128))]
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    pub(crate) classifier: Box<dyn Classify>,
    pub(crate) config: Config,
    /// The caller's credentials to remove from every attempt.
    pub(crate) strip: Strip,
    /// The most upstream calls one request may make.
    pub(crate) max_attempts: u32,
    /// Where the handle's resets go to be shared (feature `redis`).
    #[cfg(feature = "redis")]
    pub(crate) outbox: Option<Arc<crate::share::Outbox>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// A request as an adapter sends it, for [`Driver::prepare`] to put the key on.
pub(crate) trait Outgoing {
    fn headers_mut(&mut self) -> &mut HeaderMap;
    /// Replaces every query parameter `name` with `name=value` (`value` percent-encoded), or
    /// with `None` removes them.
    fn set_query_param(&mut self, name: &str, value: Option<&str>);
}

impl<B> Outgoing for http::Request<B> {
    fn headers_mut(&mut self) -> &mut HeaderMap {
        http::Request::headers_mut(self)
    }

    fn set_query_param(&mut self, name: &str, value: Option<&str>) {
        let uri = self.uri();
        let Some(query) = crate::config::query_with(uri.query(), name, value) else {
            return;
        };
        let mut parts = uri.clone().into_parts();
        let path = parts.path_and_query.as_ref().map_or("/", |p| p.path());
        let pq = match query.is_empty() {
            true => path.to_owned(),
            false => format!("{path}?{query}"),
        };
        // The path was valid, the query is made of its valid pairs and an encoded pair.
        if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *self.uri_mut() = uri;
            }
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Hand the answer (or the error) back to the caller as it is.
    HandBack,
    /// Send the request again, with the key the driver moved to: ready the service, then
    /// take the request from [`Driver::next_request`].
    Replay,
    /// No key is left: give up with [`Driver::give_up`], carrying the answer or error.
    GiveUp,
    /// No key can serve now, but one can soon: wait in turn (the `wait` module), which
    /// ends in `Replay` (with the key the driver moved to) or `GiveUp`.
    Wait,
}

/// How a request starts.
#[derive(Debug)]
pub(crate) enum Started {
    /// With a key: send it.
    Send(Driver),
    /// No key now, one soon: wait in turn, then send.
    Wait(Driver),
    /// No key is usable, and none will be soon.
    Unsent(Box<Exhausted>),
}

/// The last answer of a request that no key could serve.
pub(crate) enum Last {
    Response(Box<http::Response<Buffered>>),
    Error(BoxError),
    /// None kept (dropped when a wait began).
    None,
}

/// The keys one request has used and may still use.
#[derive(Debug)]
pub(crate) struct Driver {
    cursor: Cursor,
    key: usize,
    generation: Generation,
    count: u32,
    sent_once: bool,
    lost_once: bool,
    /// The request's bucket (`None`: the default lane) and token cost.
    lane: Option<Arc<Lane>>,
    cost: Option<u64>,
    /// The claim `pick` took on `key`'s budget, and whether its attempt was sent: ended
    /// when the attempt's answer or failure is recorded, or by `abandon`.
    ticket: Option<(Ticket, bool)>,
    /// The probe this attempt holds on a half-open key (the key that holds it, and the state
    /// word it set there), ended with the attempt.
    probe: Option<Probe>,
    /// The request's [`Affinity`], if it carries one.
    affinity: Option<u64>,
    /// The limits of this request's waiting, from its first wait (boxed: only a request that
    /// waits pays for them).
    limits: Option<Box<Limits>>,
}

/// When a request's waiting must end (ms on the pool's clock).
#[derive(Debug, Default)]
struct Limits {
    /// For a cooldown or budget: `wait_for_key` from its first such wait.
    key: Option<u64>,
    /// For probes' answers: the probe wait from its first such wait.
    probe: Option<u64>,
}

impl Driver {
    /// How a request with these extensions (its [`Bucket`], [`TokenCost`] and
    /// [`Affinity`]) starts: with a key, waiting for one, or unsent.
    pub(crate) fn start(shared: &Shared, ext: &http::Extensions) -> Started {
        let mut driver = Driver::done();
        driver.lane = bucket_lane(shared, ext);
        driver.cost = ext.get::<TokenCost>().map(|c| c.0);
        driver.affinity = ext.get::<Affinity>().map(|a| a.hash());
        driver.cursor = driver.new_cursor(shared);
        // A request a key can serve now goes now; only one that must wait joins the queue
        // (and is served in turn there), so that no request is held behind another whose
        // bucket or token cost no key can take yet.
        if driver.pick(shared) {
            return Started::Send(driver);
        }
        if driver.should_wait(shared) {
            return Started::Wait(driver);
        }
        let lane = driver.lane(shared);
        Started::Unsent(Box::new(exhausted(
            shared,
            lane,
            driver.cost,
            0,
            None,
            None,
        )))
    }

    /// A driver with nothing left to do: what an inspection leaves in its place.
    pub(crate) fn done() -> Driver {
        Driver {
            cursor: Cursor::empty(),
            key: 0,
            generation: Generation::Current,
            count: 0,
            sent_once: false,
            lost_once: false,
            lane: None,
            cost: None,
            ticket: None,
            probe: None,
            affinity: None,
            limits: None,
        }
    }

    /// A scan over every key: from the key the request's affinity ranks first among the
    /// usable ones, else where the pool's order starts.
    fn new_cursor(&self, shared: &Shared) -> Cursor {
        match self.affinity {
            Some(value) => shared.pool.cursor_for(value, self.lane(shared)),
            None => shared.pool.cursor(),
        }
    }

    /// Moves to the next key of the scan that can take the request; false when none can.
    fn pick(&mut self, shared: &Shared) -> bool {
        let lane: &Lane = match &self.lane {
            Some(lane) => lane,
            None => &shared.pool.lanes.default,
        };
        match shared.pool.pick(&mut self.cursor, lane, self.cost) {
            Some(Pick { key, ticket, probe }) => {
                self.key = key;
                self.ticket = Some((ticket, false));
                self.probe = probe;
                true
            }
            None => false,
        }
    }

    /// When the scan is over but a key can serve now (one it passed over while another
    /// request probed it, whose probe has ended since): a new scan, once per attempt.
    fn rescan(&mut self, shared: &Shared) -> bool {
        let now = shared.pool.now_ms();
        match shared.pool.soonest(self.lane(shared), self.cost) {
            Some(soonest) if soonest.at_ms <= now => self.new_scan(shared),
            _ => false,
        }
    }

    /// A new scan over every key but the one the request avoids (a key that failed it with
    /// an error that did not set it aside); takes the first that can serve.
    fn new_scan(&mut self, shared: &Shared) -> bool {
        let mut cursor = self.new_cursor(shared);
        cursor.avoid_as(&self.cursor);
        self.cursor = cursor;
        self.pick(shared)
    }

    /// With no key able to serve now: whether to wait for one. A request waits for probes'
    /// answers (for at most the probe wait in all), and, with
    /// [`wait_for_key`](crate::KeyFallbackBuilder::wait_for_key), for a key whose cooldown
    /// or budget ends within it (counted from its first wait); never when every key is
    /// disabled.
    fn should_wait(&mut self, shared: &Shared) -> bool {
        let pool = &shared.pool;
        let Some(soonest) = pool.soonest(self.lane(shared), self.cost) else {
            return false;
        };
        let now = pool.now_ms();
        if soonest.probe_ms.is_some() {
            let limits = self.limits.get_or_insert_with(Default::default);
            let limit = *limits
                .probe
                .get_or_insert(now.saturating_add(pool.probe_wait_ms()));
            if now < limit {
                return true;
            }
        }
        let Some(max) = shared.config.wait_for_key else {
            return false;
        };
        let limits = self.limits.get_or_insert_with(Default::default);
        let limit = *limits
            .key
            .get_or_insert(now.saturating_add(crate::budget::ms(max)));
        now < limit && soonest.at_ms <= limit
    }

    /// After a wait's turn or wake-up: a new scan over every key (one tried before may be
    /// usable again). `Replay` with a key, `Wait` again, or `GiveUp`.
    pub(crate) fn after_wait(&mut self, shared: &Shared) -> Step {
        if self.count >= shared.max_attempts {
            return Step::GiveUp;
        }
        let from = self.count.checked_sub(1).map(|_| self.key);
        if self.new_scan(shared) {
            if let Some(from) = from {
                shared.pool.events.on_event(&KeyEvent::Switched {
                    from: shared.pool.label(from),
                    to: shared.pool.label(self.key),
                    reason: "waited",
                });
            }
            return Step::Replay;
        }
        if self.should_wait(shared) {
            Step::Wait
        } else {
            Step::GiveUp
        }
    }

    /// When the head of the wait queue should look again (ms on the pool's clock): the
    /// soonest key's time, at least a moment from now, within the request's limit.
    pub(crate) fn wake_at(&self, shared: &Shared) -> u64 {
        let pool = &shared.pool;
        let now = pool.now_ms();
        let limit = (self.limits.as_ref())
            .and_then(|l| l.key.max(l.probe))
            .unwrap_or(now + RECHECK_MS);
        let Some(soonest) = pool.soonest(self.lane(shared), self.cost) else {
            return limit;
        };
        // Due now but not taken (a token cost that does not fit yet, a claim that raced):
        // look again when the pool changes, or in a moment.
        let at = match soonest.at_ms {
            at if at <= now => now + RECHECK_MS,
            at => at,
        };
        at.min(soonest.probe_ms.unwrap_or(u64::MAX)).min(limit)
    }

    /// The request's lane, to wait in.
    pub(crate) fn lane_arc(&self, shared: &Shared) -> Arc<Lane> {
        match &self.lane {
            Some(lane) => lane.clone(),
            None => shared.pool.lanes.default.clone(),
        }
    }

    fn lane<'a>(&'a self, shared: &'a Shared) -> &'a Lane {
        self.lane.as_deref().unwrap_or(&shared.pool.lanes.default)
    }

    /// Ends the attempt: records its outcome on the key, then ends its claim on the key's
    /// budget with what the answer reported (`opened`: the answer showed the key serving),
    /// then its probe, if it held one. In that order, so that no other request sees the
    /// budget or the probe free before the verdict is in.
    fn settle(
        &mut self,
        shared: &Shared,
        report: Option<&Report>,
        outcome: Option<Outcome>,
        opened: bool,
    ) {
        let pool = &shared.pool;
        if let Some(outcome) = outcome {
            pool.record(self.key, self.generation, outcome, self.lane.as_deref());
        }
        if let Some((t, sent)) = self.ticket.take() {
            let lane = self.lane(shared);
            if sent {
                pool.finish(self.key, self.generation, lane, t, report, opened);
            } else {
                pool.lanes.release(lane, self.key, t, pool.now_ms());
            }
        }
        match self.probe.take() {
            Some(probe) => pool.end_probe(probe),
            None => pool.changed(),
        }
    }

    /// For a request dropped before its attempt's answer: gives its claim and probe back.
    pub(crate) fn abandon(&mut self, shared: &Shared) {
        if self.ticket.is_some() || self.probe.is_some() {
            self.settle(shared, None, None, false);
        }
    }

    /// Whether another key could still serve after the coming attempt (or, with
    /// `wait_for_key`, a key that is set aside now), so that a copy of the request is worth
    /// keeping.
    fn copy_wanted(&self, shared: &Shared) -> bool {
        self.count + 1 < shared.max_attempts
            && (shared.config.wait_for_key.is_some()
                || shared.pool.has_next(&self.cursor, self.lane(shared)))
    }

    /// A copy of the first request for a replay, made by `copy` when another key could still
    /// serve. A body that cannot be copied makes the request one that is sent once.
    pub(crate) fn first_copy<R>(
        &mut self,
        shared: &Shared,
        req: &R,
        copy: impl FnOnce(&R) -> Option<R>,
    ) -> Option<R> {
        if !self.copy_wanted(shared) {
            return None;
        }
        let kept = copy(req);
        if kept.is_none() {
            self.sent_once = true;
            tracing::debug!(
                "request body cannot be replayed: sent once, without fallback to other keys"
            );
        }
        kept
    }

    /// The request for a replay: a copy of `backup` if yet another key could follow, else
    /// `backup` itself.
    pub(crate) fn next_request<R>(
        &mut self,
        shared: &Shared,
        backup: &mut Option<R>,
        copy: impl FnOnce(&R) -> Option<R>,
    ) -> R {
        let kept = backup.as_ref().expect("a copy is kept for a replay");
        let wanted = self.copy_wanted(shared);
        match wanted.then(|| copy(kept)).flatten() {
            Some(copy) => copy,
            None => {
                // The first attempt, after a wait: as `first_copy`, a body that cannot be
                // copied makes the request one that is sent once.
                if wanted && self.count == 0 {
                    self.sent_once = true;
                }
                backup.take().expect("a copy is kept for a replay")
            }
        }
    }

    /// Puts the current key's credential on the request, replacing any the caller set, and
    /// counts the attempt. With `Credential::None` the key is returned instead, as a
    /// [`KeyInUse`] for the request's extensions, for the inner service to sign with.
    #[must_use]
    pub(crate) fn prepare(&mut self, shared: &Shared, req: &mut impl Outgoing) -> Option<KeyInUse> {
        let headers = req.headers_mut();
        let cred = shared.pool.begin(self.key);
        if let Some((_, sent)) = &mut self.ticket {
            *sent = true;
        }
        self.generation = cred.generation();
        shared.strip.apply(headers);
        self.count += 1;
        shared.pool.events.on_event(&KeyEvent::AttemptStarted {
            key: shared.pool.label(self.key),
            attempt: self.count,
        });
        shared.pool.sending(self.key, self.lane(shared), &cred);
        if let Some(name) = shared.config.credential_header() {
            headers.insert(name.clone(), cred.value.get().clone());
            if let Some(param) = &shared.config.strip_query {
                req.set_query_param(param, None);
            }
            return None;
        }
        match shared.config.credential_query() {
            Some(name) => {
                // Percent-encoded when it was made: visible ASCII.
                let value = cred.value.get().to_str().unwrap_or_default();
                req.set_query_param(name, Some(value));
                None
            }
            None => Some(KeyInUse {
                label: shared.pool.label_arc(self.key),
                fingerprint: cred.fingerprint.clone(),
                value: cred.value.get().clone(),
            }),
        }
    }

    /// Records an answer's verdict on the current key.
    pub(crate) fn record(
        &mut self,
        shared: &Shared,
        status: u16,
        headers: &HeaderMap,
        verdict: Verdict,
    ) {
        shared.pool.events.on_event(&KeyEvent::Answered {
            key: shared.pool.label(self.key),
            status,
            verdict,
        });
        let report = Report::from_headers(headers).map(|r| Report {
            refused: status == 429,
            ..r
        });
        let outcome = shared.config.outcome(verdict);
        let opened = matches!(verdict, Verdict::Success | Verdict::Drained { .. });
        self.settle(shared, report.as_ref(), outcome, opened);
        if outcome == Some(Outcome::Error) {
            self.cursor.avoid(self.key);
        }
    }

    /// An answer came, with this verdict: records it and decides. `has_copy` tells whether
    /// a copy of the request is at hand to replay.
    pub(crate) fn on_answer(
        &mut self,
        shared: &Shared,
        status: u16,
        headers: &HeaderMap,
        verdict: Verdict,
        has_copy: bool,
    ) -> Step {
        self.record(shared, status, headers, verdict);
        if !verdict.is_key_fault() {
            return Step::HandBack;
        }
        self.advance(shared, has_copy, verdict_name(verdict))
    }

    /// A call failed without an answer: decides as the classifier reads the error. An
    /// unreachable upstream blames no key and is handed back at once; a lost connection
    /// blames no key and is tried once more; anything else counts against the key and moves
    /// on to the next one.
    pub(crate) fn on_error(&mut self, shared: &Shared, error: &BoxError, has_copy: bool) -> Step {
        let verdict = shared.classifier.classify_error(&**error);
        let blamed = !matches!(
            verdict,
            ErrorVerdict::Unreachable | ErrorVerdict::ConnectionLost
        );
        self.settle(shared, None, blamed.then_some(Outcome::Error), false);
        if blamed {
            self.cursor.avoid(self.key);
        }
        shared.pool.events.on_event(&KeyEvent::CallFailed {
            key: shared.pool.label(self.key),
            error: &**error,
            verdict,
        });
        match verdict {
            ErrorVerdict::Unreachable => Step::HandBack,
            ErrorVerdict::ConnectionLost if !self.lost_once => {
                self.lost_once = true;
                match self.advance(shared, has_copy, "connection_lost") {
                    Step::Replay => Step::Replay,
                    _ => Step::HandBack,
                }
            }
            ErrorVerdict::ConnectionLost => Step::HandBack,
            _ => self.advance(shared, has_copy, "transport_error"),
        }
    }

    /// After a key fault: moves to the next usable key, or says why not.
    fn advance(&mut self, shared: &Shared, has_copy: bool, reason: &'static str) -> Step {
        if !has_copy {
            return if self.sent_once {
                Step::HandBack
            } else {
                Step::GiveUp
            };
        }
        if self.count >= shared.max_attempts {
            return Step::GiveUp;
        }
        let from = self.key;
        if !self.pick(shared) && !self.rescan(shared) {
            return if self.should_wait(shared) {
                Step::Wait
            } else {
                Step::GiveUp
            };
        }
        shared.pool.events.on_event(&KeyEvent::Switched {
            from: shared.pool.label(from),
            to: shared.pool.label(self.key),
            reason,
        });
        Step::Replay
    }

    /// The error when no key could serve the request, with its last answer.
    pub(crate) fn give_up(&self, shared: &Shared, last: Last) -> Exhausted {
        let (last_response, last_error) = match last {
            Last::Response(res) => (Some(res.map(InspectedBody::new)), None),
            Last::Error(err) => (None, Some(err)),
            Last::None => (None, None),
        };
        exhausted(
            shared,
            self.lane(shared),
            self.cost,
            self.count,
            last_response,
            last_error,
        )
    }
}

/// A driver held while code that may panic runs (the inner service's `call`, a body's
/// copy): if it unwinds, the driver's claim and probe are given back.
pub(crate) struct Held<'a> {
    shared: &'a Shared,
    driver: Option<Driver>,
}

impl<'a> Held<'a> {
    pub(crate) fn new(shared: &'a Shared, driver: Driver) -> Held<'a> {
        Held {
            shared,
            driver: Some(driver),
        }
    }

    pub(crate) fn get(&mut self) -> &mut Driver {
        self.driver.as_mut().expect("held until released")
    }

    /// The driver, no longer given back on drop.
    pub(crate) fn release(mut self) -> Driver {
        self.driver.take().expect("held until released")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            driver.abandon(self.shared);
        }
    }
}

/// How long the head of a wait queue sleeps when a key is due but was not taken, unless the
/// pool changes first.
const RECHECK_MS: u64 = 50;

/// The lane of the request's [`Bucket`], if it names one (`None`: the default lane).
fn bucket_lane(shared: &Shared, ext: &http::Extensions) -> Option<Arc<Lane>> {
    let bucket = ext.get::<Bucket>()?;
    Some(
        shared
            .pool
            .lanes
            .lane(bucket.name(), || shared.pool.now_ms()),
    )
}

/// The error when no key can serve, after `attempts` upstream calls.
fn exhausted(
    shared: &Shared,
    lane: &Lane,
    cost: Option<u64>,
    attempts: u32,
    last_response: Option<http::Response<InspectedBody>>,
    last_error: Option<BoxError>,
) -> Exhausted {
    let retry_after = shared.pool.earliest(lane, cost);
    shared.pool.events.on_event(&KeyEvent::Exhausted {
        keys: shared.pool.len(),
        attempts,
        retry_after,
    });
    Exhausted {
        retry_after,
        attempts,
        keys: shared.pool.len(),
        last_response,
        last_error,
    }
}

/// A short name for a key-fault verdict, for logs.
fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::RateLimited { .. } => "rate_limited",
        Verdict::QuotaExhausted { .. } => "quota_exhausted",
        Verdict::InvalidKey => "invalid_key",
        Verdict::ServerError => "server_error",
        _ => "other",
    }
}
