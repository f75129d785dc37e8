//! One request's walk over the keys, as decisions without I/O: the adapters (the tower
//! future, the reqwest middleware) tell the driver what happened (an answer and its verdict,
//! a failed call, whether the request could be copied) and it answers what to do: hand the
//! answer back, replay with the next key, or give up with [`Exhausted`]. Every decision of
//! the per-request path is made here, once.

use std::fmt;

use http::HeaderMap;

use std::sync::Arc;

use crate::answer::Exhausted;
use crate::body::{Buffered, InspectedBody};
use crate::budget::{Lane, Ticket};
use crate::capacity::{Bucket, Report, TokenCost};
use crate::classify::{Classify, ErrorVerdict, Verdict};
use crate::config::{Config, Outcome, Strip};
use crate::error::BoxError;
use crate::events::KeyEvent;
use crate::keys::KeyInUse;
use crate::pool::{Cursor, Generation, Pool};

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
}

/// The last answer of a request that no key could serve.
pub(crate) enum Last {
    Response(Box<http::Response<Buffered>>),
    Error(BoxError),
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
}

impl Driver {
    /// The first key for a request with these extensions (its [`Bucket`] and
    /// [`TokenCost`]), or `None` when no key is usable.
    pub(crate) fn start(shared: &Shared, ext: &http::Extensions) -> Option<Driver> {
        let lane = bucket_lane(shared, ext);
        let cost = ext.get::<TokenCost>().map(|c| c.0);
        let mut cursor = shared.pool.cursor();
        let default = &shared.pool.lanes.default;
        let (key, ticket) =
            shared
                .pool
                .pick(&mut cursor, lane.as_deref().unwrap_or(default), cost)?;
        Some(Driver {
            cursor,
            key,
            generation: Generation::Current,
            count: 0,
            sent_once: false,
            lost_once: false,
            lane,
            cost,
            ticket: Some((ticket, false)),
        })
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
        }
    }

    fn lane<'a>(&'a self, shared: &'a Shared) -> &'a Lane {
        self.lane.as_deref().unwrap_or(&shared.pool.lanes.default)
    }

    /// Ends the attempt's claim on its key's budget, with what the answer reported.
    fn finish(&mut self, shared: &Shared, report: Option<&Report>) {
        if let Some((t, sent)) = self.ticket.take() {
            let lane = self.lane(shared);
            if sent {
                shared
                    .pool
                    .finish(self.key, self.generation, lane, t, report);
            } else {
                shared
                    .pool
                    .lanes
                    .release(lane, self.key, t, shared.pool.now_ms());
            }
        }
    }

    /// For a request dropped before its attempt's answer: gives its claim back.
    pub(crate) fn abandon(&mut self, shared: &Shared) {
        self.finish(shared, None);
    }

    /// Whether another key could still serve after the coming attempt, so that a copy of the
    /// request is worth keeping.
    fn copy_wanted(&self, shared: &Shared) -> bool {
        self.count + 1 < shared.max_attempts
            && shared.pool.has_next(&self.cursor, self.lane(shared))
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
        match self.copy_wanted(shared).then(|| copy(kept)).flatten() {
            Some(copy) => copy,
            None => backup.take().expect("a copy is kept for a replay"),
        }
    }

    /// Puts the current key's credential on the request, replacing any the caller set, and
    /// counts the attempt. With `Credential::None` the key is returned instead, as a
    /// [`KeyInUse`] for the request's extensions, for the inner service to sign with.
    #[must_use]
    pub(crate) fn prepare(&mut self, shared: &Shared, headers: &mut HeaderMap) -> Option<KeyInUse> {
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
        match shared.config.credential_header() {
            Some(name) => {
                headers.insert(name.clone(), cred.value.get().clone());
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
        self.finish(shared, report.as_ref());
        if let Some(outcome) = shared.config.outcome(verdict) {
            let lane = self.lane.as_deref();
            shared.pool.record(self.key, self.generation, outcome, lane);
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
        self.finish(shared, None);
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
            _ => {
                let outcome = Outcome::Error;
                shared.pool.record(self.key, self.generation, outcome, None);
                self.advance(shared, has_copy, "transport_error")
            }
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
        let lane = self.lane.as_deref().unwrap_or(&shared.pool.lanes.default);
        let Some((next, ticket)) = shared.pool.pick(&mut self.cursor, lane, self.cost) else {
            return Step::GiveUp;
        };
        self.ticket = Some((ticket, false));
        shared.pool.events.on_event(&KeyEvent::Switched {
            from: shared.pool.label(self.key),
            to: shared.pool.label(next),
            reason,
        });
        self.key = next;
        Step::Replay
    }

    /// The error when no key could serve the request, with its last answer.
    pub(crate) fn give_up(&self, shared: &Shared, last: Last) -> Exhausted {
        let (last_response, last_error) = match last {
            Last::Response(res) => (Some(res.map(InspectedBody::new)), None),
            Last::Error(err) => (None, Some(err)),
        };
        exhausted(
            shared,
            self.lane(shared),
            self.count,
            last_response,
            last_error,
        )
    }

    /// The error when no key was usable at all, so nothing was sent.
    pub(crate) fn give_up_unsent(shared: &Shared, ext: &http::Extensions) -> Exhausted {
        let lane = bucket_lane(shared, ext);
        let lane = lane.as_deref().unwrap_or(&shared.pool.lanes.default);
        exhausted(shared, lane, 0, None, None)
    }
}

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
    attempts: u32,
    last_response: Option<http::Response<InspectedBody>>,
    last_error: Option<BoxError>,
) -> Exhausted {
    let retry_after = shared.pool.earliest(lane);
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
