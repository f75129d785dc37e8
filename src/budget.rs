//! Budgets: per key (or group of keys that share a limit) and per bucket, what the provider
//! last reported as remaining, less what was sent since; and cooldowns that hold in one
//! bucket only. The pool asks a lane whether a key may take a request, and tells it what
//! the answer reported.
//!
//! - **Sent since the report.** Each (owner, lane) numbers its requests (a ticket, from one
//!   `fetch_add`). A report is the provider's `remaining` as seen by the request with ticket
//!   `t`; the requests with later tickets were sent since, so `remaining - (ticket - t)` is
//!   what a new request may still count on. A report replaces the current one only when its
//!   request was sent later (answers come back out of order), or once the current one is past
//!   its reset.
//! - **Passed over as a cooling key is.** A lane has its own bitmap of keys; a spent budget
//!   or a bucket cooldown clears the key's bit until the reset, or until an answer reports
//!   more. Selection ANDs it with the pool's bitmap, so a pass over spent keys is a pass over
//!   words, not keys.
//! - **Unknown budgets.** Until a key has reported, its budget is a prior: the limit it or
//!   any other key in the lane last reported, counted against its requests in flight. A
//!   prior is soft: a key over it is taken only when no key is within its budget.
//! - **Declared limits** start a window of their own at the first request and whenever the
//!   last report or window is past its reset; a report from the provider replaces them.

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::capacity::{Limits, Report, Window};
use crate::sync::{ArcCell, AtomicU64, AtomicUsize, Mutex};

/// `remaining` of no report.
const UNKNOWN: u64 = u32::MAX as u64;
/// How long a report without a reset time holds.
const DEFAULT_RESET: Duration = Duration::from_secs(60);
/// How long a report whose reset is zero holds: "resets now" (`0s`, a time rounded down, a
/// clock a moment ahead of the provider's) beside a count that is not whole again says the
/// window has not quite ended; a report that held for no time would let every request in
/// flight through on the strength of a limit the window no longer has.
const ZERO_RESET: Duration = Duration::from_secs(1);
/// Named buckets kept at most; requests for others share one overflow lane.
pub(crate) const MAX_BUCKETS: usize = 64;
/// The overflow lane's name in a status.
pub(crate) const OVERFLOW: &str = "(other buckets)";

fn pack(remaining: u64, ticket: u64) -> u64 {
    (remaining.min(UNKNOWN) << 32) | (ticket & 0xffff_ffff)
}
fn unpack(word: u64) -> (u64, u64) {
    (word >> 32, word & 0xffff_ffff)
}
/// Requests sent after the one with ticket `reporter`, up to and including `ticket`.
fn since(ticket: u64, reporter: u64) -> u64 {
    (ticket.wrapping_sub(reporter)) & 0xffff_ffff
}

/// [`since`] for a count that cannot be negative: a `ticket` behind `reporter` (claims given
/// back since) is none.
fn sent_since(ticket: u64, reporter: u64) -> u64 {
    match since(ticket, reporter) {
        n if n >= 1 << 31 => 0,
        n => n,
    }
}

/// One dimension's report: remaining and the reporter's base, reset (ms), limit.
///
/// Readers take no lock. Writers (a report, a declared window) take `writing`, which is held
/// for a few stores once per answer and never on the way to choosing a key, and store the
/// reset before the word: a reader that sees a new word sees its reset, and one that sees the
/// old word with a new reset holds the old report a moment longer.
struct Dim {
    word: AtomicU64,
    reset: AtomicU64,
    limit: AtomicU64,
    /// The current report's reset was the provider's own (not a default, not capped).
    asserted: AtomicU64,
    /// When the current report was taken (ms).
    at: AtomicU64,
    /// The current word is a declared window (`declare`), not a provider's report.
    declared: AtomicU64,
    writing: Mutex<()>,
}

impl Dim {
    fn new() -> Dim {
        Dim {
            word: AtomicU64::new(pack(UNKNOWN, 0)),
            reset: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            asserted: AtomicU64::new(0),
            at: AtomicU64::new(0),
            declared: AtomicU64::new(0),
            writing: Mutex::new(()),
        }
    }

    /// The current report's remaining and base, if it has not reset by `now`.
    fn current(&self, now: u64) -> Option<(u64, u64)> {
        self.current_lazy(&Now::new(|| now))
    }

    fn current_lazy(&self, now: &Now<impl Fn() -> u64>) -> Option<(u64, u64)> {
        let (remaining, base) = unpack(self.word.load(SeqCst));
        (remaining != UNKNOWN && self.reset.load(SeqCst) > now.get()).then_some((remaining, base))
    }

    fn write(&self) -> crate::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a report. `base` is how many requests had ended when it came (this one not
    /// yet): every request sent beyond that is taken as not counted in it, those still in
    /// flight included, since the provider may have seen them after this one. Within a
    /// window the report that leaves less wins, so an answer that comes back late never
    /// raises the budget again: for requests, counting what was sent since each report
    /// (`by_base`); for tokens, whose costs in flight are reserved apart, the lower count.
    /// A report whose window ends more than a second sooner replaces the current one too (a
    /// broken answer's long reset does not outlive correct ones). Past its reset, or with
    /// none, the report is taken as it is. The reset is capped at `cap` (`max_cooldown`).
    fn apply(&self, w: &Window, base: u64, by_base: bool, now: u64, cap: Duration) -> bool {
        let Some(remaining) = w.remaining else {
            return false;
        };
        let _one = self.write();
        if let Some(limit) = w.limit {
            self.limit.store(limit, SeqCst);
        }
        let given = match w.reset {
            None => DEFAULT_RESET,
            Some(d) if d.is_zero() => ZERO_RESET,
            Some(d) => d,
        };
        let reset = now.saturating_add(ms(given.min(cap)));
        let (r0, b0) = unpack(self.word.load(SeqCst));
        let reset0 = self.reset.load(SeqCst);
        let stale = r0 == UNKNOWN || reset0 <= now;
        // What each leaves for a later request: `remaining - (ticket - base)`.
        let ahead = since(base, b0);
        let tighter = match (by_base, ahead < 1 << 31) {
            (false, _) => remaining < r0,
            (true, true) => remaining.saturating_add(ahead) < r0,
            (true, false) => remaining < r0.saturating_add(since(b0, base)),
        };
        let sooner = reset.saturating_add(1000) < reset0;
        if !stale && !tighter && !sooner {
            return false;
        }
        let asserted = w.reset.is_some_and(|d| d <= cap);
        self.asserted.store(u64::from(asserted), SeqCst);
        self.at.store(now, SeqCst);
        self.declared.store(0, SeqCst);
        self.reset.store(reset, SeqCst);
        self.word.store(pack(remaining, base), SeqCst);
        true
    }

    /// Starts a declared window when no report is current. Its base is the count of ended
    /// requests, as a report's is, so requests in flight count against it.
    fn declare(&self, declared: Option<(u64, Duration)>, done: u64, now: u64) {
        let Some((n, window)) = declared else {
            return;
        };
        if self.current(now).is_some() {
            return;
        }
        let _one = self.write();
        if self.current(now).is_some() {
            return;
        }
        self.asserted.store(0, SeqCst);
        self.declared.store(1, SeqCst);
        self.reset.store(now.saturating_add(ms(window)), SeqCst);
        self.word.store(pack(n, done.wrapping_sub(1)), SeqCst);
        self.limit.fetch_max(n, SeqCst);
    }
}

/// The pool's clock, read at most once per call and only when a budget needs it (a request
/// to a key that has never reported reads no clock).
pub(crate) struct Now<F: Fn() -> u64>(F, std::cell::Cell<Option<u64>>);

impl<F: Fn() -> u64> Now<F> {
    pub(crate) fn new(f: F) -> Now<F> {
        Now(f, std::cell::Cell::new(None))
    }
    pub(crate) fn get(&self) -> u64 {
        match self.1.get() {
            Some(ms) => ms,
            None => {
                let ms = (self.0)();
                self.1.set(Some(ms));
                ms
            }
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

/// What one owner (a key, or the first key of a group) has in one lane.
struct Budget {
    sent: AtomicU64,
    done: AtomicU64,
    requests: Dim,
    tokens: Dim,
    /// Token costs of the requests in flight.
    reserved: AtomicU64,
    /// A cooldown in this lane only (ms since the pool's epoch).
    until: AtomicU64,
    /// After that cooldown, the lane is half-open for the owner: `HALF_OPEN` (a probe may
    /// go), the time its probe went (ms + 2), or 0 (open).
    probe: AtomicU64,
    /// The length of the last cooldown in this lane (ms), which a failed probe doubles.
    last_cool: AtomicU64,
    /// When the window a report (or a declared limit) said was spent ends: the first claim
    /// from then on makes the lane half-open.
    spent_until: AtomicU64,
    /// Requests that ended with a report from their answer; `done` less this is those that
    /// ended with none (dropped by their client, failed, answered without rate-limit
    /// headers). Such a request counts as ended in the next report's base, yet the provider
    /// may count it after that report (see `Lanes::spent_by_others`).
    reported: AtomicU64,
    /// How many had ended with no report when the current requests report was taken, and
    /// when the one before it was.
    quiet_at: AtomicU64,
    quiet_before: AtomicU64,
}

/// `Budget::probe` of a half-open lane whose probe has not gone.
const HALF_OPEN: u64 = 1;

impl Budget {
    fn new() -> Budget {
        Budget {
            sent: AtomicU64::new(0),
            done: AtomicU64::new(0),
            requests: Dim::new(),
            tokens: Dim::new(),
            reserved: AtomicU64::new(0),
            until: AtomicU64::new(0),
            probe: AtomicU64::new(0),
            last_cool: AtomicU64::new(0),
            spent_until: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            quiet_at: AtomicU64::new(0),
            quiet_before: AtomicU64::new(0),
        }
    }

    /// Until when the owner can take no request in this lane, if it cannot now.
    fn blocked_until(&self, now: u64) -> Option<u64> {
        let until = self.until.load(SeqCst);
        if until > now {
            return Some(until);
        }
        if let Some((remaining, reporter)) = self.requests.current(now) {
            let sent = sent_since(self.sent.load(SeqCst).wrapping_sub(1), reporter);
            if sent >= remaining {
                return Some(self.requests.reset.load(SeqCst));
            }
        }
        match self.tokens.current(now) {
            Some((0, _)) => Some(self.tokens.reset.load(SeqCst)),
            _ => None,
        }
    }
}

/// A request's place in a lane: its ticket and reserved cost, handed back when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// The request's number in its (owner, lane), mod 2^32 as reports keep it.
    ticket: u32,
    /// Its reserved token cost, at most `u32::MAX`.
    cost: u32,
    /// When it probes the lane after a cooldown there: the probe's value in
    /// `Budget::probe`, which only this probe's end may change (0: not a probe).
    probe: u64,
}

/// What a lane says to a key for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Taken: send it.
    Yes(Ticket),
    /// Over its prior only: take it if no key is within its budget.
    Soft,
    /// Not for this request (its cost does not fit); other requests may fit.
    Skip,
    /// Not for any request until its budget's reset or cooldown ends.
    Block,
}

/// The budgets and bucket cooldowns of every key for one bucket (or for requests that name
/// none: the default lane).
pub(crate) struct Lane {
    pub(crate) name: Option<Arc<str>>,
    bits: Box<[AtomicU64]>,
    budgets: Box<[CachePadded<Budget>]>,
    next_deadline: AtomicU64,
    /// The largest requests limit any key reported here: the prior of keys that have not.
    seen_limit: AtomicU64,
    /// Requests waiting for a key in this lane, served in turn.
    pub(crate) waiters: Waiters,
}

/// A lane's queue of requests waiting for a key: the head waits for the pool to change or a
/// key's deadline, the others for their turn (tokio's mutex is fair, so first come, first
/// served; a waiter dropped leaves the queue).
#[derive(Default)]
pub(crate) struct Waiters {
    pub(crate) turn: tokio::sync::Mutex<()>,
    pub(crate) count: AtomicUsize,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("name", &self.name).finish()
    }
}

impl Lane {
    fn new(name: Option<Arc<str>>, n: usize) -> Lane {
        Lane {
            name,
            bits: (0..n.div_ceil(64))
                .map(|w| {
                    let bits = (n - w * 64).min(64);
                    AtomicU64::new(if bits == 64 {
                        u64::MAX
                    } else {
                        (1 << bits) - 1
                    })
                })
                .collect(),
            budgets: (0..n).map(|_| CachePadded::new(Budget::new())).collect(),
            next_deadline: AtomicU64::new(u64::MAX),
            seen_limit: AtomicU64::new(0),
            waiters: Waiters::default(),
        }
    }

    pub(crate) fn word(&self, w: usize) -> u64 {
        self.bits[w].load(SeqCst)
    }

    /// Whether the lane holds nothing worth keeping: no request in flight, no current
    /// report, no cooldown.
    fn idle(&self, now: u64) -> bool {
        self.waiters.count.load(SeqCst) == 0
            && self.budgets.iter().all(|b| {
                b.sent.load(SeqCst) == b.done.load(SeqCst)
                    && b.until.load(SeqCst) <= now
                    && b.requests.current(now).is_none()
                    && b.tokens.current(now).is_none()
            })
    }
}

/// Every lane, and who owns whose budget.
pub(crate) struct Lanes {
    pub(crate) default: Arc<Lane>,
    /// Where requests for buckets past `MAX_BUCKETS` go: one lane for all of them, so that a
    /// table filled by made-up names never merges real models into the default lane.
    overflow: Arc<Lane>,
    named: ArcCell<HashMap<Arc<str>, Arc<Lane>>>,
    adding: Mutex<()>,
    /// Key → the key whose budget it counts against (itself, or its group's first key).
    owner: Box<[usize]>,
    /// Owner → the keys that count against it.
    members: Box<[Box<[usize]>]>,
    declared: Box<[Limits]>,
    /// The longest a report's reset is believed (`max_cooldown`).
    max_wait: Duration,
    /// How long a lane's probe has the key to itself (ms).
    pub(crate) probe_wait: u64,
    /// Pairs of keys seen spending one limit, and how often; and those told.
    pairs: Mutex<Sightings>,
}

/// Pairs of keys (by index) seen spending one limit, how often; and the pairs told.
type Sightings = (HashMap<(usize, usize), u32>, Vec<(usize, usize)>);

/// How often two keys must be seen spending one limit before the pool says so: the first
/// report of a key's window already spent beyond its own requests in flight, while the other
/// key's window of the same limit is current, is strong enough.
const SHARED_SEEN: u32 = 1;

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("buckets", &self.named.load().len())
            .finish()
    }
}

impl Lanes {
    /// `groups` lists keys (by index) that share one limit; `declared` is per key (a group
    /// takes its first key's).
    pub(crate) fn new(
        n: usize,
        groups: &[Vec<usize>],
        declared: Vec<Limits>,
        max_wait: Duration,
    ) -> Lanes {
        let mut owner: Vec<usize> = (0..n).collect();
        for group in groups {
            if let Some(&first) = group.iter().min() {
                for &k in group {
                    owner[k] = first;
                }
            }
        }
        let members = (0..n)
            .map(|o| (0..n).filter(|&k| owner[k] == o).collect())
            .collect();
        Lanes {
            default: Arc::new(Lane::new(None, n)),
            overflow: Arc::new(Lane::new(Some(OVERFLOW.into()), n)),
            named: ArcCell::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            owner: owner.into(),
            members,
            declared: declared.into(),
            max_wait,
            probe_wait: 1000,
            pairs: Mutex::new((HashMap::new(), Vec::new())),
        }
    }

    pub(crate) fn owner(&self, key: usize) -> usize {
        self.owner[key]
    }

    /// The keys that share key `key`'s limit, itself included.
    pub(crate) fn members(&self, key: usize) -> &[usize] {
        &self.members[self.owner[key]]
    }

    /// The lane of a bucket, made at its first request. With `MAX_BUCKETS` kept, an idle one
    /// (nothing in flight, no current report, no cooldown: nothing to forget) makes room;
    /// when none is idle the request goes to the overflow lane.
    pub(crate) fn lane(&self, bucket: &str, now: impl Fn() -> u64) -> Arc<Lane> {
        if let Some(lane) = self.named.load().get(bucket) {
            return lane.clone();
        }
        let _one = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.named.load();
        if let Some(lane) = map.get(bucket) {
            return lane.clone();
        }
        let mut next: HashMap<Arc<str>, Arc<Lane>> = HashMap::clone(&map);
        if next.len() >= MAX_BUCKETS {
            let now = now();
            let idle = next
                .iter()
                .find(|(_, lane)| lane.idle(now))
                .map(|(name, _)| name.clone());
            match idle {
                Some(name) => next.remove(&name),
                None => return self.overflow.clone(),
            };
        }
        let name: Arc<str> = bucket.into();
        let lane = Arc::new(Lane::new(Some(name.clone()), self.owner.len()));
        next.insert(name, lane.clone());
        self.named.store(Arc::new(next));
        lane
    }

    /// Requests waiting for a key, in every lane.
    pub(crate) fn waiting(&self) -> usize {
        let named = self.named.load();
        (named.values().chain([&self.default, &self.overflow]))
            .map(|lane| lane.waiters.count.load(SeqCst))
            .sum()
    }

    /// The named lanes, by name, then the overflow lane.
    pub(crate) fn named(&self) -> Vec<Arc<Lane>> {
        let mut lanes: Vec<_> = self.named.load().values().cloned().collect();
        lanes.sort_by(|a, b| a.name.cmp(&b.name));
        lanes.push(self.overflow.clone());
        lanes
    }

    /// Whether key `key` may take a request of `cost` tokens in `lane`; `strict` holds it to
    /// its prior too.
    pub(crate) fn claim(
        &self,
        lane: &Lane,
        key: usize,
        cost: Option<u64>,
        strict: bool,
        now: impl Fn() -> u64,
    ) -> Claim {
        let now = Now::new(now);
        let o = self.owner[key];
        let b = &lane.budgets[o];
        // The first claim after a spent window's end turns it into the end of a cooldown, so
        // that the probe below applies (its length is no cooldown to back off from).
        let spent = b.spent_until.load(SeqCst);
        if spent != 0
            && spent <= now.get()
            && b.spent_until
                .compare_exchange(spent, 0, SeqCst, SeqCst)
                .is_ok()
        {
            b.until.fetch_max(spent, SeqCst);
            b.last_cool.store(0, SeqCst);
            b.probe.store(HALF_OPEN, SeqCst);
        }
        let until = b.until.load(SeqCst);
        let mut probe = 0;
        if until != 0 {
            if until > now.get() {
                return Claim::Block;
            }
            // Out of a cooldown in this lane: one request probes it, and the others pass it
            // over until the probe answers or has had it for the probe wait.
            match b.probe.load(SeqCst) {
                0 => {}
                HALF_OPEN => {
                    let out = now.get() + 2;
                    if b.probe
                        .compare_exchange(HALF_OPEN, out, SeqCst, SeqCst)
                        .is_err()
                    {
                        return Claim::Skip;
                    }
                    probe = out;
                }
                out if now.get().saturating_sub(out - 2) < self.probe_wait => return Claim::Skip,
                _ => {}
            }
        }
        let ticket = b.sent.fetch_add(1, SeqCst);
        let undo = || {
            b.sent.fetch_sub(1, SeqCst);
            if probe != 0 {
                let _ = b.probe.compare_exchange(probe, HALF_OPEN, SeqCst, SeqCst);
            }
        };
        let declared = self.declared[o];
        if declared.requests.is_some() {
            b.requests
                .declare(declared.requests, b.done.load(SeqCst), now.get());
        }
        match b.requests.current_lazy(&now) {
            Some((remaining, reporter)) => {
                if sent_since(ticket, reporter) > remaining {
                    undo();
                    return Claim::Block;
                }
            }
            None => {
                let own = b.requests.limit.load(SeqCst);
                let prior = if own > 0 {
                    own
                } else {
                    lane.seen_limit.load(SeqCst)
                };
                let in_flight = ticket.wrapping_sub(b.done.load(SeqCst)) + 1;
                if strict && prior > 0 && in_flight > prior {
                    undo();
                    self.resync(lane, key, now.get());
                    return Claim::Soft;
                }
            }
        }
        let cost = cost.unwrap_or(0).min(u64::from(u32::MAX));
        if cost > 0 {
            if declared.tokens.is_some() {
                b.tokens
                    .declare(declared.tokens, b.done.load(SeqCst), now.get());
            }
            if let Some((remaining, _)) = b.tokens.current_lazy(&now) {
                if remaining == 0 {
                    undo();
                    return Claim::Block;
                }
                // Reserved only if it fits: a cost too large for the key never holds back,
                // even for a moment, the requests that would fit beside it.
                let mut reserved = b.reserved.load(SeqCst);
                loop {
                    if reserved.saturating_add(cost) > remaining {
                        undo();
                        self.resync(lane, key, now.get());
                        return Claim::Skip;
                    }
                    match b
                        .reserved
                        .compare_exchange(reserved, reserved + cost, SeqCst, SeqCst)
                    {
                        Ok(_) => break,
                        Err(actual) => reserved = actual,
                    }
                }
                return Claim::Yes(Ticket {
                    ticket: ticket as u32,
                    cost: cost as u32,
                    probe,
                });
            }
        }
        // No token report: nothing to reserve against (and nothing a client's estimate can
        // hold back from other requests).
        Claim::Yes(Ticket {
            ticket: ticket as u32,
            cost: 0,
            probe,
        })
    }

    /// Ends a request that `claim` let through, with what its answer reported; `opened`
    /// when the answer showed the key serving (a probe's success opens the lane). Returns the
    /// key (owner) newly seen sharing a limit with this one, once per pair.
    pub(crate) fn finish(
        &self,
        lane: &Lane,
        key: usize,
        t: Ticket,
        report: Option<&Report>,
        opened: bool,
        now: impl Fn() -> u64,
    ) -> Option<usize> {
        let o = self.owner[key];
        let b = &lane.budgets[o];
        self.end_probe(b, t, opened);
        // The report is taken before the request counts as done, so that no claim in
        // between sees one request fewer in flight and the report not yet in.
        let found = report.and_then(|r| self.take_report(lane, o, r, now()));
        b.done.fetch_add(1, SeqCst);
        // After `done`, so that `done - reported` is never below the count it stands for.
        if report.is_some() {
            b.reported.fetch_add(1, SeqCst);
        }
        if t.cost > 0 {
            b.reserved.fetch_sub(u64::from(t.cost), SeqCst);
        }
        found
    }

    fn take_report(&self, lane: &Lane, o: usize, report: &Report, now: u64) -> Option<usize> {
        let b = &lane.budgets[o];
        // Before the report replaces the last one: did more go than this key sent?
        let spent_by_others = self.spent_by_others(o, b, &report.requests, report.refused, now);
        let base = b.done.load(SeqCst);
        let cap = self.max_wait;
        let requests_taken = b.requests.apply(&report.requests, base, true, now, cap);
        if requests_taken {
            b.quiet_before.store(b.quiet_at.load(SeqCst), SeqCst);
            b.quiet_at
                .store(base.saturating_sub(b.reported.load(SeqCst)), SeqCst);
        }
        let taken = requests_taken | b.tokens.apply(&report.tokens, base, false, now, cap);
        if let Some(limit) = report.requests.limit {
            lane.seen_limit.fetch_max(limit, SeqCst);
        }
        if taken {
            self.sync(lane, o, now);
        }
        if !spent_by_others {
            return None;
        }
        // Whose requests: the owner that reported last among those whose window is current,
        // of the same limit, with no less left than this one says (one counter, going down).
        // Rare (a key's window spent by others), so a scan.
        let r = report.requests.remaining?;
        let other = (0..self.owner.len())
            .filter(|&k| k != o && self.owner[k] == k)
            .filter_map(|k| {
                let d = &lane.budgets[k].requests;
                let (left, _) = d.current(now)?;
                let same = Some(d.limit.load(SeqCst)) == report.requests.limit && r <= left;
                same.then(|| (d.at.load(SeqCst), k))
            })
            .max()?
            .1;
        self.seen_sharing(o, other)
    }

    /// Whether a report says the key's window went down by more than its own requests: the
    /// last report's count less the new one, against every request sent since the last
    /// report came, those in flight then included (or, as the first report of a window, the
    /// limit less the count against those in flight). Every one of them, not only those sent
    /// before the request reporting: requests reach the provider in another order than they
    /// were claimed (over other connections), so one claimed later may be counted first.
    fn spent_by_others(&self, o: usize, b: &Budget, w: &Window, refused: bool, now: u64) -> bool {
        // A declared group spends one budget by design.
        let Some(remaining) = w.remaining.filter(|_| self.members[o].len() == 1) else {
            return false;
        };
        // Refused with the window spent, by a key that has not sent the limit in all its
        // life here: others spent it (or another process did before this one started, which
        // the warning's "appear to" allows for).
        let sent_here = b.sent.load(SeqCst);
        if refused && remaining == 0 && w.limit.is_some_and(|limit| sent_here <= limit) {
            return true;
        }
        // A declared window is this process's guess, as a first report's is.
        let current = b
            .requests
            .current(now)
            .filter(|_| b.requests.declared.load(SeqCst) == 0);
        // Requests that ended with no report since the report before the current one: counted
        // as ended in the current one's base, yet perhaps counted by the provider after it.
        let quiet_now = b.done.load(SeqCst).saturating_sub(b.reported.load(SeqCst));
        let quiet = quiet_now.saturating_sub(b.quiet_before.load(SeqCst));
        match current {
            Some((last, reporter)) => {
                // The last ticket claimed: `sent` counts the claims.
                let own = since(sent_here.wrapping_sub(1), reporter);
                own < 1 << 31 && last.saturating_sub(remaining) > own.saturating_add(quiet)
            }
            // The first report of a window: only a new window of the provider's own (the last
            // one ended at the reset the provider gave) already spent beyond what is in
            // flight. A key merely used before this process started, or a window this
            // process guessed, proves nothing.
            None => {
                let provider_window = b.requests.asserted.load(SeqCst) == 1;
                // This request is still counted in flight: its end is counted after this.
                let in_flight = b.sent.load(SeqCst).wrapping_sub(b.done.load(SeqCst));
                let own = in_flight.saturating_add(quiet);
                provider_window
                    && w.limit
                        .is_some_and(|limit| limit.saturating_sub(remaining) > own)
            }
        }
    }

    /// Counts one sighting of `a` and `b` spending one limit; the pair on its `SHARED_SEEN`th.
    fn seen_sharing(&self, a: usize, b: usize) -> Option<usize> {
        let pair = (a.min(b), a.max(b));
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, told) = &mut *pairs;
        let count = seen.entry(pair).or_insert(0);
        *count += 1;
        if *count == SHARED_SEEN && !told.contains(&pair) {
            told.push(pair);
            return Some(b);
        }
        None
    }

    /// The pairs of keys seen spending one limit.
    pub(crate) fn noticed(&self) -> Vec<(usize, usize)> {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The declared groups, each of more than one key.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &[usize]> + '_ {
        self.members.iter().filter(|m| m.len() > 1).map(|m| &**m)
    }

    /// Forgets what key `key`'s owner learned in every lane (its reports and bucket
    /// cooldowns), as a reset of the key does; a declared limit starts a new window.
    pub(crate) fn reset(&self, key: usize, now: u64) {
        let o = self.owner[key];
        let named = self.named();
        for lane in std::iter::once(&self.default).chain(named.iter()) {
            let b = &lane.budgets[o];
            for dim in [&b.requests, &b.tokens] {
                let _one = dim.write();
                dim.word.store(pack(UNKNOWN, 0), SeqCst);
                dim.reset.store(0, SeqCst);
                dim.limit.store(0, SeqCst);
                dim.asserted.store(0, SeqCst);
            }
            b.until.store(0, SeqCst);
            b.probe.store(0, SeqCst);
            b.last_cool.store(0, SeqCst);
            b.spent_until.store(0, SeqCst);
            self.sync(lane, o, now);
        }
    }

    /// Ends a lane's probe: a success opens the lane; anything else that did not cool it
    /// again (a failed call, a dropped request) lets the next request probe.
    fn end_probe(&self, b: &Budget, t: Ticket, opened: bool) {
        if t.probe == 0 {
            return;
        }
        // Only this probe's own value: a probe taken since (after another cooldown) is not
        // this one's to end.
        let next = if opened { 0 } else { HALF_OPEN };
        if b.probe
            .compare_exchange(t.probe, next, SeqCst, SeqCst)
            .is_ok()
            && opened
        {
            b.last_cool.store(0, SeqCst);
        }
    }

    /// For key `key` half-open in `lane` (just out of a cooldown there): the length of that
    /// cooldown if it was a refusal (ms), which a refused probe backs off from; else 0.
    pub(crate) fn last_refusal(&self, lane: &Lane, key: usize, now: u64) -> u64 {
        let b = &lane.budgets[self.owner[key]];
        let until = b.until.load(SeqCst);
        let half_open = until != 0 && until <= now && b.probe.load(SeqCst) != 0;
        if half_open {
            b.last_cool.load(SeqCst)
        } else {
            0
        }
    }

    /// Gives back a claim whose request was never sent.
    pub(crate) fn release(&self, lane: &Lane, key: usize, t: Ticket, now: u64) {
        let b = &lane.budgets[self.owner[key]];
        self.end_probe(b, t, false);
        b.sent.fetch_sub(1, SeqCst);
        if t.cost > 0 {
            b.reserved.fetch_sub(u64::from(t.cost), SeqCst);
        }
        self.resync(lane, key, now);
    }

    /// After a claim was given back: a pick that raced with it may have cleared the key's bit
    /// while the claim still counted, so the bit is made to agree with the budget again.
    fn resync(&self, lane: &Lane, key: usize, now: u64) {
        if lane.bits[key / 64].load(SeqCst) & (1 << (key % 64)) == 0 {
            self.sync(lane, self.owner[key], now);
        }
    }

    /// Cools key `key` (and the keys sharing its limit) in `lane` only, until `until` (ms).
    /// `refused`: a refusal (a 429), which a refused probe backs off from; a drained window is
    /// none.
    pub(crate) fn cool(&self, lane: &Lane, key: usize, until: u64, now: u64, refused: bool) {
        let o = self.owner[key];
        let b = &lane.budgets[o];
        let kept = b.until.fetch_max(until, SeqCst).max(until);
        let len = if refused { kept.saturating_sub(now) } else { 0 };
        b.last_cool.store(len, SeqCst);
        // Out of it, one request probes first.
        b.probe.store(HALF_OPEN, SeqCst);
        self.sync(lane, o, now);
    }

    /// `n` requests another process sent with `key`: counted as sent (and ended) here, so
    /// that the window's current report leaves `n` fewer.
    pub(crate) fn spent_elsewhere(&self, lane: &Lane, key: usize, n: u64, now: u64) {
        let o = self.owner[key];
        let b = &lane.budgets[o];
        let n = n.min(1 << 20);
        b.sent.fetch_add(n, SeqCst);
        b.done.fetch_add(n, SeqCst);
        self.sync(lane, o, now);
    }

    /// A window another process's answer reported for `key`, taken as this pool's own
    /// reports are: within a window, the report that leaves less wins.
    pub(crate) fn reported_elsewhere(&self, lane: &Lane, key: usize, w: &Window, now: u64) {
        let o = self.owner[key];
        let b = &lane.budgets[o];
        // Its base leaves every request in flight here counted against it (the reporter's
        // own answer, in `finish`, leaves out only itself).
        let base = b.done.load(SeqCst).wrapping_sub(1);
        if b.requests.apply(w, base, true, now, self.max_wait) {
            if let Some(limit) = w.limit {
                lane.seen_limit.fetch_max(limit, SeqCst);
            }
            self.sync(lane, o, now);
        }
    }

    /// Makes owner `o`'s keys' bits in `lane` agree with its budget.
    pub(crate) fn sync(&self, lane: &Lane, o: usize, now: u64) {
        let b = &lane.budgets[o];
        let blocked = b.blocked_until(now);
        // A window the provider's count (or a declared limit) says is spent ends as a
        // cooldown does: one request probes it first (see `claim`), so that a reset announced
        // early costs one refusal, not one per request in flight. A block that clears before
        // its end (a claim given back, a report of more) is no window's end.
        match blocked {
            Some(at) if b.until.load(SeqCst) < at => b.spent_until.store(at, SeqCst),
            None if now < b.spent_until.load(SeqCst) => b.spent_until.store(0, SeqCst),
            _ => {}
        }
        for &k in self.members[o].iter() {
            let (w, bit) = (k / 64, 1u64 << (k % 64));
            match blocked {
                Some(_) => lane.bits[w].fetch_and(!bit, SeqCst),
                None => lane.bits[w].fetch_or(bit, SeqCst),
            };
        }
        if let Some(at) = blocked {
            lane.next_deadline.fetch_min(at, SeqCst);
        }
    }

    /// Restores the bits of owners whose block has passed, when the lane's earliest deadline
    /// is behind `now`: one load otherwise.
    pub(crate) fn maybe_recover(&self, lane: &Lane, now: impl Fn() -> u64) {
        let deadline = lane.next_deadline.load(SeqCst);
        if deadline == u64::MAX {
            return;
        }
        let now = now();
        if deadline > now
            || lane
                .next_deadline
                .compare_exchange(deadline, u64::MAX, SeqCst, SeqCst)
                .is_err()
        {
            return;
        }
        for o in 0..self.owner.len() {
            if self.owner[o] == o {
                self.sync(lane, o, now);
            }
        }
    }

    /// When key `key` can take a request in `lane` again (ms), if not now, and whether that
    /// waits on a probe's answer (a probe out in the lane, which others pass over until the
    /// probe wait).
    pub(crate) fn ready_at(
        &self,
        lane: &Lane,
        key: usize,
        now: u64,
        cost: Option<u64>,
    ) -> Option<(u64, bool)> {
        let b = &lane.budgets[self.owner[key]];
        if let Some(at) = b.blocked_until(now) {
            return Some((at, false));
        }
        // A cost that does not fit beside the reservations until the tokens' reset.
        if let (Some(cost), Some((remaining, _))) = (cost.filter(|&c| c > 0), b.tokens.current(now))
        {
            if b.reserved.load(SeqCst).saturating_add(cost) > remaining {
                return Some((b.tokens.reset.load(SeqCst), false));
            }
        }
        let out = b.probe.load(SeqCst);
        if out > HALF_OPEN && b.until.load(SeqCst) != 0 {
            let open = (out - 2).saturating_add(self.probe_wait);
            return (open > now).then_some((open, true));
        }
        None
    }

    /// What a status shows of key `key` in `lane`.
    pub(crate) fn view(&self, lane: &Lane, key: usize, now: u64) -> BudgetView {
        let b = &lane.budgets[self.owner[key]];
        let last = b.sent.load(SeqCst).wrapping_sub(1);
        let left = |d: &Dim, spent: &dyn Fn(u64) -> u64| {
            d.current(now).map(|(remaining, reporter)| {
                let reset = d.reset.load(SeqCst).saturating_sub(now);
                (remaining.saturating_sub(spent(reporter)), reset)
            })
        };
        BudgetView {
            requests: left(&b.requests, &|reporter| sent_since(last, reporter)),
            tokens: left(&b.tokens, &|_| b.reserved.load(SeqCst)),
            in_flight: b.sent.load(SeqCst).wrapping_sub(b.done.load(SeqCst)),
            blocked_ms: b.blocked_until(now).map_or(0, |at| at.saturating_sub(now)),
        }
    }
}

/// A status view of one key's budget in one lane: (remaining, ms to reset) per dimension.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BudgetView {
    pub(crate) requests: Option<(u64, u64)>,
    pub(crate) tokens: Option<(u64, u64)>,
    pub(crate) in_flight: u64,
    pub(crate) blocked_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(remaining: u64) -> Report {
        Report {
            requests: Window {
                limit: Some(100),
                remaining: Some(remaining),
                reset: Some(Duration::from_secs(60)),
            },
            ..Report::default()
        }
    }

    fn taken(claim: Claim) -> Ticket {
        match claim {
            Claim::Yes(ticket) => ticket,
            other => panic!("not taken: {other:?}"),
        }
    }

    /// A request that ends without a report (its client dropped it, or its answer carried no
    /// rate-limit headers) may still be counted by the provider after the report that comes
    /// next; the drop it makes in the count after that is this key's own, no one else's.
    #[test]
    fn a_request_ended_without_a_report_is_no_other_keys_spending() {
        let lanes = Lanes::new(
            2,
            &[],
            vec![Limits::default(); 2],
            Duration::from_secs(3600),
        );
        let lane = lanes.default.clone();
        let now = || 1_000;
        // Key 2 reports a window of its own, of the same limit: 99 of 100 left.
        let t = taken(lanes.claim(&lane, 1, None, true, now));
        assert_eq!(
            lanes.finish(&lane, 1, t, Some(&report(99)), true, now),
            None
        );
        // Key 1 sends L, then R. The provider counts L (99 left), then R; R's client drops
        // it before L's answer is in.
        let l = taken(lanes.claim(&lane, 0, None, true, now));
        let r = taken(lanes.claim(&lane, 0, None, true, now));
        assert_eq!(lanes.finish(&lane, 0, r, None, false, now), None);
        assert_eq!(
            lanes.finish(&lane, 0, l, Some(&report(99)), true, now),
            None
        );
        // M: the provider has counted L, R and M.
        let m = taken(lanes.claim(&lane, 0, None, true, now));
        assert_eq!(
            lanes.finish(&lane, 0, m, Some(&report(97)), true, now),
            None
        );
        assert_eq!(lanes.noticed(), []);
    }
}
