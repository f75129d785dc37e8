//! The key pool: per-key state in atomics and key selection over a bitmap.
//!
//! Each key's state is one `AtomicU64` (tag, reason, the credential's generation and the
//! deadline in milliseconds since the pool's epoch), so a state change is a single
//! compare-and-swap and a snapshot is never torn. An attempt records its outcome against the
//! generation of the credential it was sent with: once a key is rotated, what its old
//! credential earns (the revoked key's 401, its quota 429) no longer matches and is dropped. A bitmap holds one bit per key "believed usable"; choosing a key is "the first set
//! bit at or after a position", so 1,000 keys are 16 words to look at, not 1,000 slots. The
//! bitmap is a hint: the chosen key's state word is checked, and a stale bit is mended. The
//! earliest cooldown deadline is kept in one more atomic; the first request that finds it
//! passed restores the keys that recovered (a rare scan, not one per request).
//!
//! No lock is taken on the request path. Time is `tokio::time::Instant`, so a paused tokio
//! clock drives cooldowns in tests.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_utils::CachePadded;
use tokio::time::Instant;

use crate::budget::{ms, Claim, Lane, Lanes, Ticket, OVERFLOW};
use crate::capacity::{Report, Window};
use crate::config::{ErrorPolicy, Outcome};
use crate::events::{KeyEvent, Observer};
use crate::keys::{Key, Striped};
use crate::status::{
    BucketStatus, CooldownReason, DisableReason, KeyRecord, KeyState, KeyStatus, Probing,
    RecordedState, SharedLimit,
};
// std's and arc-swap's; loom's in the model check (`scripts/loom.sh`).
use crate::sync::{ArcCell, ArcGuard, AtomicU32, AtomicU64, AtomicUsize, Mutex};

const TAG_ACTIVE: u64 = 0;
const TAG_COOLING: u64 = 1;
const TAG_DISABLED: u64 = 2;
/// Half-open: usable, but until an answer says how the key stands, one request at a time
/// (the probe) is sent with it. The deadline field holds when the probe went (ms + 1), or 0
/// while no probe is out; the reason field, the cooldown it came out of (`NOT_HEARD`: none).
const TAG_PROBING: u64 = 3;
/// The reason code of a half-open key the pool has not heard from (at start, after a reset
/// or a rotation).
const NOT_HEARD: u64 = 31;
const CAPPED: u64 = 1 << 7;
const GEN_BITS: u32 = 12;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const DEADLINE_SHIFT: u32 = 20;
/// Deadlines are milliseconds since the pool's epoch in 44 bits: more than 500 years.
const DEADLINE_MAX: u64 = (1 << (64 - DEADLINE_SHIFT)) - 1;
const NO_DEADLINE: u64 = u64::MAX;

/// One key's state, packed: bits 0-1 tag, 2-6 reason, 7 "the provider's wait was capped",
/// 8-19 the credential's generation (mod 4096), 20-63 deadline (ms; for a half-open key,
/// when its probe went).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Word(u64);

impl Word {
    fn active(generation: u64) -> Word {
        Word(TAG_ACTIVE | (generation & GEN_MASK) << 8)
    }
    fn cooling(reason: CooldownReason, until_ms: u64, capped: bool, generation: u64) -> Word {
        Word(
            TAG_COOLING
                | (reason.code() << 2)
                | if capped { CAPPED } else { 0 }
                | (generation & GEN_MASK) << 8
                | (until_ms.min(DEADLINE_MAX) << DEADLINE_SHIFT),
        )
    }
    /// Half-open after `reason` (a cooldown's code, or `NOT_HEARD`), with the probe out since
    /// `out - 1` ms, or no probe out (`out == 0`).
    fn probing(reason: u64, out: u64, generation: u64) -> Word {
        Word(
            TAG_PROBING
                | (reason & 0b1_1111) << 2
                | (generation & GEN_MASK) << 8
                | (out.min(DEADLINE_MAX) << DEADLINE_SHIFT),
        )
    }
    fn disabled(reason: DisableReason, generation: u64) -> Word {
        Word(TAG_DISABLED | (reason.code() << 2) | (generation & GEN_MASK) << 8)
    }
    fn tag(self) -> u64 {
        self.0 & 0b11
    }
    fn reason(self) -> u64 {
        (self.0 >> 2) & 0b1_1111
    }
    fn capped(self) -> bool {
        self.0 & CAPPED != 0
    }
    fn generation(self) -> u64 {
        (self.0 >> 8) & GEN_MASK
    }
    fn until(self) -> u64 {
        self.0 >> DEADLINE_SHIFT
    }
    /// Usable now: active, or cooling with a deadline already passed.
    fn usable(self, now_ms: u64) -> bool {
        match self.tag() {
            TAG_ACTIVE | TAG_PROBING => true,
            TAG_COOLING => self.until() <= now_ms,
            _ => false,
        }
    }
    /// For a half-open key: the cooldown it came out of (`None`: not heard from yet).
    fn after(self) -> Option<CooldownReason> {
        (self.reason() != NOT_HEARD).then(|| CooldownReason::from_code(self.reason()))
    }
}

/// What the key-level check of a key offered by the bitmap says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Took {
    /// Not usable now.
    No,
    /// Usable.
    Open,
    /// Half-open: this request is its probe. The probe is held on this key (the key itself,
    /// or its group's first key: keys that share a limit share one probe), by the state word
    /// it set there.
    Probe(usize, u64),
}

/// A key `pick` chose for one attempt: its claim on the lane's budget and, when the attempt
/// probes a half-open key, the probe's state word (given back by [`Pool::end_probe`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pick {
    pub(crate) key: usize,
    pub(crate) ticket: Ticket,
    pub(crate) probe: Option<Probe>,
}

/// A probe a request holds: the key that holds it and the state word it set there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    holder: u32,
    word: std::num::NonZeroU64,
}

impl Probe {
    fn new(holder: usize, word: u64) -> Probe {
        Probe {
            holder: holder as u32,
            // A half-open key's word has its tag set: never zero.
            word: std::num::NonZeroU64::new(word).unwrap_or(std::num::NonZeroU64::MAX),
        }
    }
    #[cfg(all(test, tkf_loom))]
    pub(crate) fn word(self) -> u64 {
        self.word.get()
    }
}

/// When the soonest key can serve again, and when the soonest probe out (if one is) lets
/// others use its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Soonest {
    pub(crate) at_ms: u64,
    pub(crate) probe_ms: Option<u64>,
}

/// Which credential of a key an outcome belongs to: the one an attempt was sent with, or
/// whichever is current (for changes made through the handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Generation {
    Of(u32),
    Current,
}

impl Generation {
    fn matches(self, word: Word) -> bool {
        match self {
            Generation::Of(g) => u64::from(g) & GEN_MASK == word.generation(),
            Generation::Current => true,
        }
    }
}

/// One key: read-mostly fields first, then what every request writes, each on its own lines.
pub(crate) struct Slot {
    pub(crate) label: Arc<str>,
    /// The label's hash, for affinity (rendezvous hashing): stable across rotations.
    label_hash: u64,
    state: AtomicU64,
    /// The credential: replaced whole by a rotation, read without a lock.
    cred: ArcCell<Cred>,
    /// On cache lines of its own, so that the counters every request writes do not slow
    /// down readers of the fields around them.
    counters: CachePadded<Counters>,
}

struct Counters {
    requests: AtomicU64,
    successes: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    consecutive: AtomicU32,
    window_start_ms: AtomicU64,
    /// The length of the key's last cooldown (ms), which a failed probe doubles.
    last_cool_ms: AtomicU64,
}

/// One credential of a key. The header value's bytes are zeroed once the last request that
/// carries them is dropped.
pub(crate) struct Cred {
    pub(crate) value: Striped,
    pub(crate) fingerprint: Arc<str>,
    generation: u64,
}

impl Cred {
    /// The generation an attempt sent with this credential records its outcome against.
    pub(crate) fn generation(&self) -> Generation {
        Generation::Of(self.generation as u32)
    }
}

impl Slot {
    pub(crate) fn fingerprint(&self) -> Arc<str> {
        self.cred.load().fingerprint.clone()
    }
    fn word(&self) -> Word {
        Word(self.state.load(SeqCst))
    }
}

/// A position in the scan over keys for one request: each key is visited at most once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cursor {
    start: u32,
    offset: u32,
    /// A key this scan passes over (`u32::MAX`: none): one that just failed the request
    /// with an error that did not set it aside. (32 bits each: a driver is moved a few times
    /// per request, and a small one is moved in registers.)
    avoid: u32,
}

impl Cursor {
    /// Makes the scan pass over key `i`.
    pub(crate) fn avoid(&mut self, i: usize) {
        self.avoid = u32::try_from(i).unwrap_or(u32::MAX);
    }

    /// Makes this scan pass over the key `other` passes over.
    pub(crate) fn avoid_as(&mut self, other: &Cursor) {
        self.avoid = other.avoid;
    }

    /// A scan over every key, from the first.
    fn all() -> Cursor {
        Cursor {
            start: 0,
            offset: 0,
            avoid: u32::MAX,
        }
    }

    /// A scan with nothing left in it.
    pub(crate) fn empty() -> Cursor {
        Cursor {
            start: 0,
            offset: u32::MAX,
            avoid: u32::MAX,
        }
    }
}

pub(crate) struct Pool {
    slots: Box<[Slot]>,
    /// Rotations of one pool are made one at a time, so generations never race.
    rotating: Mutex<()>,
    usable: Box<[AtomicU64]>,
    next_deadline: AtomicU64,
    round_robin: Option<AtomicUsize>,
    /// The pool's start on tokio's clock, and the wall clock then: deadlines are kept as
    /// milliseconds since `epoch`, and shown as wall-clock instants from `epoch_wall`.
    epoch: Instant,
    epoch_wall: SystemTime,
    /// Where what the pool learns is told.
    pub(crate) events: Observer,
    policy: ErrorPolicy,
    /// Budgets and bucket cooldowns, and which keys share a limit.
    pub(crate) lanes: Lanes,
    /// How long a probe has the key to itself before others may use the key too (ms).
    probe_wait_ms: u64,
    max_cooldown_ms: u64,
    /// Requests waiting for a key, and the signal that one may have become usable.
    pub(crate) waiting: AtomicUsize,
    pub(crate) changed: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field(
                "keys",
                &self.slots.iter().map(|s| &*s.label).collect::<Vec<_>>(),
            )
            .field("round_robin", &self.round_robin.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(
        keys: Vec<Key>,
        make_value: impl Fn(&str) -> Striped,
        round_robin: bool,
        policy: ErrorPolicy,
        events: Observer,
    ) -> Pool {
        let n = keys.len();
        let slots: Box<[Slot]> = keys
            .into_iter()
            .map(|k| Slot {
                cred: ArcCell::from_pointee(Cred {
                    value: make_value(k.secret()),
                    fingerprint: k.fingerprint().into(),
                    generation: 0,
                }),
                label_hash: crate::affinity::hash(k.label().as_bytes()),
                label: k.label().into(),
                state: AtomicU64::new(Word::probing(NOT_HEARD, 0, 0).0),
                counters: CachePadded::new(Counters {
                    requests: AtomicU64::new(0),
                    successes: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    rate_limited: AtomicU64::new(0),
                    consecutive: AtomicU32::new(0),
                    window_start_ms: AtomicU64::new(0),
                    last_cool_ms: AtomicU64::new(0),
                }),
            })
            .collect();
        let words = n.div_ceil(64);
        let usable: Box<[AtomicU64]> = (0..words)
            .map(|w| {
                let bits = (n - w * 64).min(64);
                AtomicU64::new(if bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                })
            })
            .collect();
        Pool {
            slots,
            rotating: Mutex::new(()),
            usable,
            next_deadline: AtomicU64::new(NO_DEADLINE),
            round_robin: round_robin.then(|| AtomicUsize::new(0)),
            epoch: Instant::now(),
            epoch_wall: SystemTime::now(),
            events,
            policy,
            lanes: Lanes::new(
                n,
                &[],
                vec![Default::default(); n],
                Duration::from_secs(86_400),
            ),
            probe_wait_ms: 1000,
            max_cooldown_ms: 86_400_000,
            waiting: AtomicUsize::new(0),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The same pool with this probe wait and cap on cooldowns.
    pub(crate) fn with_probing(mut self, probe_wait: Duration, max_cooldown: Duration) -> Pool {
        self.probe_wait_ms = ms(probe_wait);
        self.lanes.probe_wait = ms(probe_wait);
        self.max_cooldown_ms = ms(max_cooldown);
        self
    }

    /// How long a probe has a half-open key to itself (ms).
    pub(crate) fn probe_wait_ms(&self) -> u64 {
        self.probe_wait_ms
    }

    /// An instant on tokio's clock, from milliseconds since the epoch.
    pub(crate) fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Wakes the requests waiting for a key, if any: something that may make one usable
    /// happened (an answer, a probe's end, a reset). One load when nobody waits.
    #[inline]
    pub(crate) fn changed(&self) {
        if self.waiting.load(SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// The same pool with these lanes (groups and declared limits).
    pub(crate) fn with_lanes(mut self, lanes: Lanes) -> Pool {
        self.lanes = lanes;
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn label(&self, i: usize) -> &str {
        &self.slots[i].label
    }

    pub(crate) fn label_arc(&self, i: usize) -> Arc<str> {
        self.slots[i].label.clone()
    }

    pub(crate) fn position(&self, label: &str) -> Option<usize> {
        self.slots.iter().position(|s| &*s.label == label)
    }

    pub(crate) fn now_ms(&self) -> u64 {
        let ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        u64::try_from(ms).unwrap_or(DEADLINE_MAX).min(DEADLINE_MAX)
    }

    /// A deadline in milliseconds since the epoch, on the wall clock.
    pub(crate) fn wall(&self, ms: u64) -> SystemTime {
        self.epoch_wall + Duration::from_millis(ms)
    }

    /// A wall-clock instant in milliseconds since the epoch (zero if before it).
    pub(crate) fn ms_of_wall(&self, at: SystemTime) -> u64 {
        let ms = at
            .duration_since(self.epoch_wall)
            .map_or(0, |d| d.as_millis());
        u64::try_from(ms).unwrap_or(DEADLINE_MAX).min(DEADLINE_MAX)
    }

    fn deadline(&self, now_ms: u64, d: Duration) -> u64 {
        // Round up, so a key is never usable before the provider's reset.
        let ms = d.as_nanos().div_ceil(1_000_000);
        now_ms
            .saturating_add(u64::try_from(ms).unwrap_or(DEADLINE_MAX))
            .min(DEADLINE_MAX)
    }

    /// Where a new request starts its scan: the first key (priority order) or the next one
    /// in turn (round robin).
    pub(crate) fn cursor(&self) -> Cursor {
        let start = match &self.round_robin {
            Some(rr) => rr.fetch_add(1, SeqCst) % self.slots.len(),
            None => 0,
        };
        Cursor {
            start: start as u32,
            offset: 0,
            avoid: u32::MAX,
        }
    }

    /// Restores keys whose cooldown has passed, if the earliest deadline is behind us. Cheap
    /// when nothing is cooling: one atomic load, and no clock read.
    #[inline]
    fn maybe_recover(&self) {
        let deadline = self.next_deadline.load(SeqCst);
        if deadline == NO_DEADLINE {
            return;
        }
        let now = self.now_ms();
        if now < deadline {
            return;
        }
        // Claim the scan; whoever loses the race leaves it to the winner.
        if self
            .next_deadline
            .compare_exchange(deadline, NO_DEADLINE, SeqCst, SeqCst)
            .is_err()
        {
            return;
        }
        let mut soonest = NO_DEADLINE;
        for i in 0..self.slots.len() {
            let w = self.slots[i].word();
            if w.tag() != TAG_COOLING {
                continue;
            }
            if w.until() <= now {
                self.recover(i, w, now);
            } else {
                soonest = soonest.min(w.until());
            }
        }
        self.next_deadline.fetch_min(soonest, SeqCst);
    }

    /// Moves a key whose cooldown has passed to half-open: usable, one probe at a time.
    /// Returns whether it is usable.
    fn recover(&self, i: usize, seen: Word, now: u64) -> bool {
        let slot = &self.slots[i];
        let half_open = Word::probing(seen.reason(), 0, seen.generation());
        if slot
            .state
            .compare_exchange(seen.0, half_open.0, SeqCst, SeqCst)
            .is_ok()
        {
            slot.counters.consecutive.store(0, SeqCst);
            self.events.on_event(&KeyEvent::Recovered {
                key: &slot.label,
                fingerprint: &slot.fingerprint(),
                after: CooldownReason::from_code(seen.reason()),
            });
        }
        self.sync_bit(i);
        slot.word().usable(now)
    }

    /// Makes key `i`'s bit agree with its state word, whatever raced with us.
    fn sync_bit(&self, i: usize) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        loop {
            let w = self.slots[i].word();
            if w.tag() == TAG_ACTIVE || w.tag() == TAG_PROBING {
                self.usable[word].fetch_or(bit, SeqCst);
            } else {
                self.usable[word].fetch_and(!bit, SeqCst);
            }
            if self.slots[i].word() == w {
                return;
            }
        }
    }

    /// The first key believed usable in `lo..hi`.
    fn find_in(&self, lo: usize, hi: usize, lane: &Lane) -> Option<usize> {
        let mut i = lo;
        while i < hi {
            let w = i / 64;
            let bits = self.usable[w].load(SeqCst) & lane.word(w) & (u64::MAX << (i % 64));
            if bits != 0 {
                let found = w * 64 + bits.trailing_zeros() as usize;
                return (found < hi).then_some(found);
            }
            i = (w + 1) * 64;
        }
        None
    }

    /// Takes the next usable key in this request's scan, each key at most once, with room
    /// in `lane` for a request of `cost` tokens. A key over its prior only (see
    /// `crate::budget`) is taken when no key in the scan is within its budget. A half-open key
    /// whose probe is out is passed over (until the probe has had it for the probe wait).
    pub(crate) fn pick(&self, cur: &mut Cursor, lane: &Lane, cost: Option<u64>) -> Option<Pick> {
        let mut offset = cur.offset as usize;
        let found = self.pick_from(
            cur.start as usize,
            &mut offset,
            cur.avoid as usize,
            lane,
            cost,
        );
        cur.offset = u32::try_from(offset).unwrap_or(u32::MAX);
        found
    }

    fn pick_from(
        &self,
        start: usize,
        offset: &mut usize,
        avoid: usize,
        lane: &Lane,
        cost: Option<u64>,
    ) -> Option<Pick> {
        self.maybe_recover();
        self.lanes.maybe_recover(lane, || self.now_ms());
        let n = self.slots.len();
        let mut soft = None;
        while *offset < n {
            let real = (start + *offset) % n;
            let end = if real >= start { n } else { start };
            match self.find_in(real, end, lane) {
                Some(i) => {
                    *offset += i - real + 1;
                    if i == avoid {
                        continue;
                    }
                    let took = self.claim(i);
                    if took == Took::No {
                        continue;
                    }
                    match self.lanes.claim(lane, i, cost, true, || self.now_ms()) {
                        Claim::Yes(ticket) => return Some(self.picked(i, ticket, took)),
                        Claim::Soft => soft = soft.or(Some((i, *offset))),
                        Claim::Skip => {}
                        Claim::Block => self.lanes.sync(lane, self.lanes.owner(i), self.now_ms()),
                    }
                    // Not taken after all: a probe taken for it is given back.
                    if let Took::Probe(t, word) = took {
                        self.free_probe(t, word);
                    }
                }
                None => *offset += end - real,
            }
        }
        let (i, at) = soft?;
        let took = self.claim(i);
        if took == Took::No {
            return None;
        }
        match self.lanes.claim(lane, i, cost, false, || self.now_ms()) {
            Claim::Yes(ticket) => {
                *offset = at;
                Some(self.picked(i, ticket, took))
            }
            _ => {
                if let Took::Probe(t, word) = took {
                    self.free_probe(t, word);
                }
                None
            }
        }
    }

    #[inline]
    fn picked(&self, i: usize, ticket: Ticket, took: Took) -> Pick {
        let probe = match took {
            Took::Probe(t, word) => {
                self.events.on_event(&KeyEvent::Probing {
                    key: &self.slots[i].label,
                    after: Word(word).after(),
                });
                Some(Probe::new(t, word))
            }
            _ => None,
        };
        Pick {
            key: i,
            ticket,
            probe,
        }
    }

    /// A scan for a request with this affinity: it starts at the usable key that ranks
    /// highest for the value (rendezvous hashing), so that the value lands on the same key
    /// while that key is usable, and losing a key moves only the values it ranked first for.
    pub(crate) fn cursor_for(&self, affinity: u64, lane: &Lane) -> Cursor {
        self.maybe_recover();
        self.lanes.maybe_recover(lane, || self.now_ms());
        let mut best: Option<(u64, usize)> = None;
        for w in 0..self.usable.len() {
            let mut bits = self.usable[w].load(SeqCst) & lane.word(w);
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let score = crate::affinity::score(affinity, self.slots[i].label_hash);
                if best.is_none_or(|(b, _)| score > b) {
                    best = Some((score, i));
                }
            }
        }
        match best {
            Some((_, start)) => Cursor {
                start: start as u32,
                offset: 0,
                avoid: u32::MAX,
            },
            None => self.cursor(),
        }
    }

    /// Ends an attempt that `pick` let through, with what its answer reported (`opened`: it
    /// showed the key serving).
    /// A report of a credential rotated out since (`generation`) is dropped, as its outcome is.
    pub(crate) fn finish(
        &self,
        i: usize,
        generation: Generation,
        lane: &Lane,
        t: Ticket,
        report: Option<&Report>,
        opened: bool,
    ) {
        let report = report.filter(|_| generation.matches(self.slots[i].word()));
        if let Some(other) = self
            .lanes
            .finish(lane, i, t, report, opened, || self.now_ms())
        {
            self.events.on_event(&KeyEvent::SharedLimit {
                key: &self.slots[i].label,
                with: &self.slots[other].label,
            });
        }
        let window = report.map(|r| r.requests);
        let shared = shared_bucket(lane);
        if let (Some(bucket), Some((remaining, reset))) =
            (shared, window.and_then(|w| w.remaining.zip(w.reset)))
        {
            let slot = &self.slots[i];
            let cred = slot.cred.load();
            self.events.on_event(&KeyEvent::WindowReported {
                key: &slot.label,
                fingerprint: &cred.fingerprint,
                bucket,
                remaining,
                limit: window.and_then(|w| w.limit),
                resets: self.wall(self.now_ms().saturating_add(ms(reset))),
            });
        }
    }

    /// An attempt with key `i` in `lane` goes out with `cred` (what [`begin`](Self::begin)
    /// gave it): told to the observer, for replicas to count it against the provider's
    /// window.
    pub(crate) fn sending(&self, i: usize, lane: &Lane, cred: &Cred) {
        if let Some(bucket) = shared_bucket(lane) {
            self.events.on_event(&KeyEvent::Spending {
                key: &self.slots[i].label,
                fingerprint: &cred.fingerprint,
                bucket,
            });
        }
    }

    /// `n` requests sent with key `i` in `bucket` by another replica, counted against the
    /// window this pool knows there.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn spent_elsewhere(&self, i: usize, bucket: Option<&str>, n: u64) {
        if let Some(lane) = self.shared_lane(bucket) {
            self.lanes.spent_elsewhere(&lane, i, n, self.now_ms());
        }
    }

    /// A window of key `i` in `bucket` that another replica's answer reported, taken as a
    /// report of this pool's own would be (within a window, the one leaving less wins).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn reported_elsewhere(
        &self,
        i: usize,
        bucket: Option<&str>,
        remaining: u64,
        limit: Option<u64>,
        resets: SystemTime,
    ) {
        let now = self.now_ms();
        let left = self.ms_of_wall(resets).saturating_sub(now);
        if left == 0 {
            return;
        }
        if let Some(lane) = self.shared_lane(bucket) {
            let window = Window {
                limit,
                remaining: Some(remaining),
                reset: Some(Duration::from_millis(left)),
            };
            self.lanes.reported_elsewhere(&lane, i, &window, now);
            self.changed();
        }
    }

    /// The lane of a bucket named by another replica (`None`: the default lane); never the
    /// overflow lane, which holds different buckets in each process.
    fn shared_lane(&self, bucket: Option<&str>) -> Option<Arc<Lane>> {
        let lane = match bucket {
            None => self.lanes.default.clone(),
            Some(b) => self.lanes.lane(b, || self.now_ms()),
        };
        (lane.name.as_deref() != Some(OVERFLOW)).then_some(lane)
    }

    /// When no key can serve a request that names no bucket now, but one can within `max`:
    /// that key's time (ms). `None` when a key can serve now, or none will within `max`.
    pub(crate) fn blocked_until(&self, max: Duration) -> Option<u64> {
        let lane = &self.lanes.default;
        self.maybe_recover();
        self.lanes.maybe_recover(lane, || self.now_ms());
        if self.has_next(&Cursor::all(), lane) {
            return None;
        }
        let soonest = self.soonest(lane, None)?;
        let now = self.now_ms();
        (soonest.at_ms > now && soonest.at_ms - now <= ms(max)).then_some(soonest.at_ms)
    }

    /// Whether the scan has a key believed usable left, without moving it.
    pub(crate) fn has_next(&self, cur: &Cursor, lane: &Lane) -> bool {
        let n = self.slots.len();
        let (start, mut offset) = (cur.start as usize, cur.offset as usize);
        while offset < n {
            let real = (start + offset) % n;
            let end = if real >= start { n } else { start };
            if self.find_in(real, end, lane).is_some() {
                return true;
            }
            offset += end - real;
        }
        false
    }

    /// Checks a key the bitmap offered; mends the bit if it was stale. A half-open key gives
    /// its probe to the first request that asks (a compare-and-swap), and is passed over while
    /// the probe is out, until the probe has had it for the probe wait.
    #[inline]
    fn claim(&self, i: usize) -> Took {
        let w = self.slots[i].word();
        if w.tag() == TAG_ACTIVE {
            return Took::Open;
        }
        self.claim_slow(i, w)
    }

    fn claim_slow(&self, i: usize, mut w: Word) -> Took {
        loop {
            match w.tag() {
                TAG_ACTIVE => return Took::Open,
                TAG_PROBING => return self.take_probe(self.probe_holder(i), i),
                TAG_COOLING => {
                    let now = self.now_ms();
                    if w.until() > now || !self.recover(i, w, now) {
                        self.sync_bit(i);
                        return Took::No;
                    }
                    w = self.slots[i].word();
                }
                _ => {
                    self.sync_bit(i);
                    return Took::No;
                }
            }
        }
    }

    /// The key that holds half-open key `i`'s probe: keys that share one limit share one
    /// probe, held by the group's first key while it is half-open or open (then the limit
    /// has served). A first key set aside on its own (disabled, cooled by hand) leaves each
    /// key its own.
    fn probe_holder(&self, i: usize) -> usize {
        let o = self.lanes.owner(i);
        if o == i {
            return i;
        }
        let w = self.slots[o].word();
        let w = match w.tag() {
            TAG_COOLING if w.until() <= self.now_ms() => {
                self.recover(o, w, self.now_ms());
                self.slots[o].word()
            }
            _ => w,
        };
        match w.tag() {
            TAG_ACTIVE | TAG_PROBING => o,
            _ => i,
        }
    }

    /// Takes the probe held by key `t` for a request to key `i`: the first request takes it
    /// (a compare-and-swap); others pass the key over while it is out, until the probe has
    /// had it for the probe wait. A holder that is open lets every request through.
    fn take_probe(&self, t: usize, i: usize) -> Took {
        let mut w = self.slots[t].word();
        loop {
            match w.tag() {
                TAG_PROBING => {}
                TAG_ACTIVE if t != i => return Took::Open,
                _ => return Took::No,
            }
            let now = self.now_ms();
            if w.until() != 0 {
                let since = w.until() - 1;
                let open = now.saturating_sub(since) >= self.probe_wait_ms;
                return if open { Took::Open } else { Took::No };
            }
            let probe = Word::probing(w.reason(), now + 1, w.generation());
            match self.slots[t]
                .state
                .compare_exchange(w.0, probe.0, SeqCst, SeqCst)
            {
                Ok(_) => return Took::Probe(t, probe.0),
                Err(actual) => w = Word(actual),
            }
        }
    }

    /// Ends a probe (its state word `word`) after its outcome was recorded: if the outcome
    /// left the key half-open (an answer that settles nothing, a failed call, a dropped
    /// request), the next request may probe it.
    pub(crate) fn end_probe(&self, probe: Probe) {
        let i = probe.holder as usize;
        if self.free_probe(i, probe.word.get()) {
            self.events.on_event(&KeyEvent::ProbeReleased {
                key: &self.slots[i].label,
            });
        }
    }

    /// Frees key `i`'s probe if its word is still `word` (this probe's own): a probe taken but
    /// not sent, or ended. Wakes the waiters, which may take it now. Returns whether it was
    /// freed.
    fn free_probe(&self, i: usize, word: u64) -> bool {
        let w = Word(word);
        let free = Word::probing(w.reason(), 0, w.generation());
        let freed = self.slots[i]
            .state
            .compare_exchange(word, free.0, SeqCst, SeqCst)
            .is_ok();
        self.changed();
        freed
    }

    /// Opens a half-open key after a success.
    fn open(&self, i: usize, mut seen: Word) {
        let slot = &self.slots[i];
        let generation = seen.generation();
        while seen.tag() == TAG_PROBING && seen.generation() == generation {
            let active = Word::active(generation);
            match slot
                .state
                .compare_exchange(seen.0, active.0, SeqCst, SeqCst)
            {
                Ok(_) => {
                    slot.counters.last_cool_ms.store(0, SeqCst);
                    self.events.on_event(&KeyEvent::Opened {
                        key: &slot.label,
                        fingerprint: &slot.fingerprint(),
                        after: seen.after(),
                    });
                    self.changed();
                    return;
                }
                Err(actual) => seen = Word(actual),
            }
        }
    }

    /// The credential for an attempt with key `i`, and counts the attempt. The guard is
    /// cheap to take (no reference count is written) and meant to be dropped at once.
    pub(crate) fn begin(&self, i: usize) -> ArcGuard<Cred> {
        let slot = &self.slots[i];
        slot.counters.requests.fetch_add(1, SeqCst);
        slot.cred.load()
    }

    /// Records what an attempt with key `i`, sent with credential `generation`, came to.
    /// Outcomes of a credential that has since been rotated out are dropped.
    pub(crate) fn record(
        &self,
        i: usize,
        generation: Generation,
        outcome: Outcome,
        lane: Option<&Lane>,
    ) {
        let slot = &self.slots[i];
        let seen = slot.word();
        if !generation.matches(seen) {
            tracing::debug!(key = %slot.label, "outcome of a rotated-out credential dropped");
            return;
        }
        match outcome {
            Outcome::Success => {
                slot.counters.successes.fetch_add(1, SeqCst);
                if slot.counters.consecutive.load(SeqCst) != 0 {
                    slot.counters.consecutive.store(0, SeqCst);
                }
                if seen.tag() == TAG_PROBING {
                    // The limit served: every key that shares it is open too.
                    for &k in self.lanes.members(i) {
                        let w = if k == i { seen } else { self.slots[k].word() };
                        self.open(k, w);
                    }
                }
            }
            Outcome::Cool(reason, d, capped) => {
                let refused = matches!(
                    reason,
                    CooldownReason::RateLimited | CooldownReason::QuotaExhausted
                );
                // A bucket's limit holds in that bucket: the key serves the others. The key's
                // own limit, or its organization's quota, holds for every bucket.
                let in_lane = lane.filter(|_| reason != CooldownReason::QuotaExhausted);
                let now = self.now_ms();
                // Refused right out of a cooldown that was itself a refusal: the provider's
                // window had not ended (a clock skew, a reset rounded down). The key waits at
                // least twice as long as it last did, up to `max_cooldown`.
                let d = if refused {
                    let last = match in_lane {
                        Some(lane) => self.lanes.last_refusal(lane, i, now),
                        None => match seen.after() {
                            Some(CooldownReason::RateLimited | CooldownReason::QuotaExhausted)
                                if seen.tag() == TAG_PROBING =>
                            {
                                slot.counters.last_cool_ms.load(SeqCst)
                            }
                            _ => 0,
                        },
                    };
                    d.max(Duration::from_millis(
                        last.saturating_mul(2).min(self.max_cooldown_ms),
                    ))
                } else {
                    d
                };
                if refused {
                    slot.counters.rate_limited.fetch_add(1, SeqCst);
                }
                if reason != CooldownReason::Drained {
                    slot.counters.errors.fetch_add(1, SeqCst);
                } else {
                    slot.counters.successes.fetch_add(1, SeqCst);
                }
                let until = self.deadline(now, d);
                match in_lane {
                    Some(lane) => {
                        self.lanes.cool(lane, i, until, now, refused);
                        if let Some(Some(bucket)) = shared_bucket(lane) {
                            self.events.on_event(&KeyEvent::BucketCooledDown {
                                key: &slot.label,
                                fingerprint: &slot.fingerprint(),
                                bucket,
                                reason,
                                duration: Duration::from_millis(until.saturating_sub(now)),
                                until: self.wall(until),
                            });
                        }
                    }
                    None => {
                        for &k in self.lanes.members(i) {
                            let g = if k == i {
                                generation
                            } else {
                                Generation::Current
                            };
                            self.cool_until(k, g, reason, until, capped);
                        }
                        // What a refused probe backs off from: the cooldown the key has now (a
                        // later one already set is kept); a drained window is no refusal.
                        let kept = slot.word();
                        let len = if refused && kept.tag() == TAG_COOLING {
                            kept.until().saturating_sub(now)
                        } else {
                            0
                        };
                        slot.counters.last_cool_ms.store(len, SeqCst);
                    }
                }
            }
            Outcome::Disable(reason) => {
                slot.counters.errors.fetch_add(1, SeqCst);
                self.disable(i, generation, reason);
            }
            Outcome::Error => {
                slot.counters.errors.fetch_add(1, SeqCst);
                let now = self.now_ms();
                let window =
                    u64::try_from(self.policy.reset_interval.as_millis()).unwrap_or(u64::MAX);
                let start = slot.counters.window_start_ms.load(SeqCst);
                if now.saturating_sub(start) >= window {
                    // Old errors age out: a new counting window starts.
                    slot.counters.window_start_ms.store(now, SeqCst);
                    slot.counters.consecutive.store(0, SeqCst);
                }
                let count = slot.counters.consecutive.fetch_add(1, SeqCst) + 1;
                if count >= self.policy.threshold {
                    slot.counters.consecutive.store(0, SeqCst);
                    let d = self.policy.cooldown;
                    self.cool(i, generation, CooldownReason::Errors, d, false);
                }
            }
        }
    }

    /// Cools key `i` until `d` from now. A later deadline already set is kept, a disabled key
    /// stays disabled, and a credential rotated out since (`generation`) changes nothing.
    pub(crate) fn cool(
        &self,
        i: usize,
        generation: Generation,
        reason: CooldownReason,
        d: Duration,
        capped: bool,
    ) {
        let now = self.now_ms();
        self.cool_until(i, generation, reason, self.deadline(now, d), capped);
    }

    /// Cools key `i` until `until` (ms since the epoch); returns whether its state changed.
    fn cool_until(
        &self,
        i: usize,
        generation: Generation,
        reason: CooldownReason,
        until: u64,
        capped: bool,
    ) -> bool {
        let slot = &self.slots[i];
        let now = self.now_ms();
        let mut changed = false;
        let mut cur = slot.word();
        loop {
            let keep = !generation.matches(cur)
                || match cur.tag() {
                    TAG_DISABLED => true,
                    TAG_COOLING => cur.until() >= until,
                    _ => false,
                };
            if keep {
                break;
            }
            let new = Word::cooling(reason, until, capped, cur.generation());
            match slot.state.compare_exchange(cur.0, new.0, SeqCst, SeqCst) {
                Ok(_) => {
                    self.events.on_event(&KeyEvent::CooledDown {
                        key: &slot.label,
                        fingerprint: &slot.fingerprint(),
                        reason,
                        duration: Duration::from_millis(until.saturating_sub(now)),
                        until: self.wall(until),
                        capped,
                    });
                    changed = true;
                    break;
                }
                Err(actual) => cur = Word(actual),
            }
        }
        self.sync_bit(i);
        self.next_deadline
            .fetch_min(slot.word().until().max(until), SeqCst);
        changed
    }

    /// Disables key `i` until it is reset or rotated, unless its credential `generation`
    /// was rotated out since.
    pub(crate) fn disable(&self, i: usize, generation: Generation, reason: DisableReason) {
        let slot = &self.slots[i];
        let mut cur = slot.word();
        loop {
            if !generation.matches(cur) {
                return;
            }
            let new = Word::disabled(reason, cur.generation());
            match slot.state.compare_exchange(cur.0, new.0, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(actual) => cur = Word(actual),
            }
        }
        if cur.tag() != TAG_DISABLED {
            self.events.on_event(&KeyEvent::Disabled {
                key: &slot.label,
                fingerprint: &slot.fingerprint(),
                reason,
            });
        }
        self.sync_bit(i);
    }

    /// Makes key `i` active again and clears its error count.
    pub(crate) fn reset(&self, i: usize) {
        let slot = &self.slots[i];
        let mut cur = slot.word();
        // Not heard from since: half-open, as at start. A key already not heard from keeps
        // its word, and with it a probe in flight (which settles it): a fresh word would let
        // a second probe take an identical one, which the first's end would then free.
        let fresh = |w: Word| Word::probing(NOT_HEARD, 0, w.generation());
        loop {
            if cur.tag() == TAG_PROBING && cur.reason() == NOT_HEARD {
                break;
            }
            match slot
                .state
                .compare_exchange(cur.0, fresh(cur).0, SeqCst, SeqCst)
            {
                Ok(_) => break,
                Err(actual) => cur = Word(actual),
            }
        }
        slot.counters.consecutive.store(0, SeqCst);
        slot.counters.last_cool_ms.store(0, SeqCst);
        self.lanes.reset(i, self.now_ms());
        if cur.tag() == TAG_COOLING || cur.tag() == TAG_DISABLED {
            self.events.on_event(&KeyEvent::Reset {
                key: &slot.label,
                fingerprint: &slot.fingerprint(),
            });
        }
        self.sync_bit(i);
        self.changed();
    }

    /// Replaces key `i`'s credential and makes it half-open under a new generation. Requests in
    /// flight finish with the old credential; what they come to is dropped.
    pub(crate) fn rotate(&self, i: usize, value: Striped, fingerprint: &str) {
        let slot = &self.slots[i];
        let _one_at_a_time = self.rotating.lock().unwrap_or_else(|e| e.into_inner());
        let generation = (slot.cred.load().generation + 1) & GEN_MASK;
        slot.cred.store(Arc::new(Cred {
            value,
            fingerprint: fingerprint.into(),
            generation,
        }));
        // The old credential's outcomes match no more from here on. A swap rather than a
        // store: the same instruction on x86-64, and loom then orders it after an outcome's
        // compare-exchange it raced with (loom can let a plain store and a concurrent
        // compare-exchange both be "last", which no processor does).
        slot.state
            .swap(Word::probing(NOT_HEARD, 0, generation).0, SeqCst);
        slot.counters.consecutive.store(0, SeqCst);
        slot.counters.last_cool_ms.store(0, SeqCst);
        // What the old credential's answers said of its budgets is not the new one's, unless
        // the key shares a group's limit, which the group's other keys still report.
        if self.lanes.members(i).len() == 1 {
            self.lanes.reset(i, self.now_ms());
        }
        self.events.on_event(&KeyEvent::Rotated {
            key: &slot.label,
            fingerprint,
        });
        self.sync_bit(i);
        self.changed();
    }

    /// Time until the earliest cooling key is usable again; `None` when no key is cooling
    /// (all disabled), zero when one is usable now.
    pub(crate) fn earliest(&self, lane: &Lane, cost: Option<u64>) -> Option<Duration> {
        let now = self.now_ms();
        self.soonest(lane, cost)
            .map(|s| Duration::from_millis(s.at_ms.saturating_sub(now)))
    }

    /// When the soonest key can take a request in `lane` (ms), and when the soonest probe
    /// out lets others use its key; `None` when every key is disabled.
    pub(crate) fn soonest(&self, lane: &Lane, cost: Option<u64>) -> Option<Soonest> {
        let now = self.now_ms();
        let mut best: Option<Soonest> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let w = slot.word();
            let (mut at, mut probe) = match w.tag() {
                TAG_ACTIVE => (now, None),
                TAG_COOLING => (w.until().max(now), None),
                TAG_PROBING if w.until() == 0 => (now, None),
                TAG_PROBING => {
                    let open = (w.until() - 1).saturating_add(self.probe_wait_ms);
                    (open.max(now), (open > now).then_some(open))
                }
                _ => continue,
            };
            if let Some((lane_at, lane_probe)) = self.lanes.ready_at(lane, i, now, cost) {
                // The bucket holds the key longer than its probe does: what the key waits
                // for is the bucket (its probe, or its time).
                if lane_at > at {
                    probe = lane_probe.then_some(lane_at);
                    at = lane_at;
                }
            }
            let b = best.get_or_insert(Soonest {
                at_ms: at,
                probe_ms: probe,
            });
            b.at_ms = b.at_ms.min(at);
            b.probe_ms = match (b.probe_ms, probe) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        best
    }

    /// Key `i`'s state as it can leave the process: wall-clock deadlines, the stable
    /// fingerprint.
    pub(crate) fn export(&self, i: usize) -> KeyRecord {
        let slot = &self.slots[i];
        let w = slot.word();
        let state = match w.tag() {
            TAG_COOLING if w.until() > self.now_ms() => RecordedState::CoolingDown {
                reason: CooldownReason::from_code(w.reason()),
                until: self.wall(w.until()),
                capped: w.capped(),
            },
            TAG_DISABLED => RecordedState::Disabled {
                reason: DisableReason::from_code(w.reason()),
            },
            _ => RecordedState::Active,
        };
        KeyRecord::new(&slot.label, &slot.fingerprint(), state)
    }

    /// Key `i`'s current fingerprint.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn fingerprint(&self, i: usize) -> Arc<str> {
        self.slots[i].fingerprint()
    }

    /// The key whose current credential has this fingerprint.
    pub(crate) fn by_fingerprint(&self, fingerprint: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| *s.cred.load().fingerprint == *fingerprint)
    }

    /// Merges a state learned elsewhere into key `i`: a cooldown that ends later than the
    /// local one, or a disable. A cooldown is never shortened, nor held beyond `max_cooldown`
    /// from now, and "active" changes nothing (only a reset makes a key active). Returns
    /// whether the key's state changed.
    pub(crate) fn import(&self, i: usize, state: &RecordedState) -> bool {
        match *state {
            RecordedState::CoolingDown {
                reason,
                until,
                capped,
            } => {
                let now = self.now_ms();
                let until = self
                    .ms_of_wall(until)
                    .min(now.saturating_add(self.max_cooldown_ms));
                until > now && self.cool_until(i, Generation::Current, reason, until, capped)
            }
            RecordedState::Disabled { reason } => {
                let before = self.slots[i].word().tag();
                self.disable(i, Generation::Current, reason);
                before != TAG_DISABLED
            }
            _ => false,
        }
    }

    /// Merges a bucket cooldown learned elsewhere into key `i`: the key is passed over in
    /// `bucket` until `until` (a later end already set is kept), at most `max_cooldown` from
    /// now. Returns whether it is cooling there now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn import_bucket(&self, i: usize, bucket: &str, until: SystemTime) -> bool {
        let now = self.now_ms();
        let until = self
            .ms_of_wall(until)
            .min(now.saturating_add(self.max_cooldown_ms));
        if until <= now {
            return false;
        }
        let Some(lane) = self.shared_lane(Some(bucket)) else {
            return false;
        };
        self.lanes.cool(&lane, i, until, now, false);
        self.changed();
        true
    }

    /// Key `i`'s budgets: the default lane's, then each named lane's, where it has one.
    fn bucket_status(&self, i: usize, now: u64) -> Vec<BucketStatus> {
        let named = self.lanes.named();
        std::iter::once(&self.lanes.default)
            .chain(named.iter())
            .filter_map(|lane| {
                let v = self.lanes.view(lane, i, now);
                let shown = v.requests.is_some()
                    || v.tokens.is_some()
                    || v.in_flight > 0
                    || v.blocked_ms > 0;
                let ms = Duration::from_millis;
                shown.then(|| BucketStatus {
                    bucket: lane.name.as_deref().map(str::to_owned),
                    requests_remaining: v.requests.map(|(n, reset)| (n, ms(reset))),
                    tokens_remaining: v.tokens.map(|(n, reset)| (n, ms(reset))),
                    in_flight: v.in_flight,
                    passed_over_for: (v.blocked_ms > 0).then(|| ms(v.blocked_ms)),
                })
            })
            .collect()
    }

    /// The keys that share a limit, by label: declared groups, then pairs noticed.
    pub(crate) fn shared_limits(&self) -> Vec<SharedLimit> {
        let labels = |keys: &[usize]| -> Vec<String> {
            keys.iter()
                .map(|&k| self.slots[k].label.to_string())
                .collect()
        };
        let declared = self
            .lanes
            .groups()
            .map(|g| SharedLimit::new(labels(g), true));
        let noticed = (self.lanes.noticed().into_iter())
            .map(|(a, b)| SharedLimit::new(labels(&[a, b]), false));
        declared.chain(noticed).collect()
    }

    pub(crate) fn status(&self, i: usize) -> KeyStatus {
        let slot = &self.slots[i];
        let now = self.now_ms();
        let w = slot.word();
        let state = match w.tag() {
            TAG_COOLING if w.until() > now => KeyState::CoolingDown {
                remaining: Duration::from_millis(w.until() - now),
                reason: CooldownReason::from_code(w.reason()),
            },
            TAG_DISABLED => KeyState::Disabled {
                reason: DisableReason::from_code(w.reason()),
            },
            _ => KeyState::Active,
        };
        let window = u64::try_from(self.policy.reset_interval.as_millis()).unwrap_or(u64::MAX);
        let consecutive =
            if now.saturating_sub(slot.counters.window_start_ms.load(SeqCst)) >= window {
                0
            } else {
                slot.counters.consecutive.load(SeqCst)
            };
        let capped = matches!(state, KeyState::CoolingDown { .. }) && w.capped();
        let probing = (w.tag() == TAG_PROBING).then(|| Probing {
            after: w.after(),
            probe_in_flight: w.until() != 0,
        });
        KeyStatus {
            probing,
            label: slot.label.to_string(),
            fingerprint: slot.fingerprint().to_string(),
            cooldown_capped: capped,
            state,
            requests: slot.counters.requests.load(SeqCst),
            successes: slot.counters.successes.load(SeqCst),
            errors: slot.counters.errors.load(SeqCst),
            rate_limited: slot.counters.rate_limited.load(SeqCst),
            consecutive_errors: consecutive,
            buckets: self.bucket_status(i, now),
        }
    }
}

/// A lane's name as other replicas know it: `Some(None)` for the default lane; `None` for
/// the overflow lane, whose requests name buckets of their own in each process and are not
/// told.
fn shared_bucket(lane: &Lane) -> Option<Option<&str>> {
    match lane.name.as_deref() {
        Some(OVERFLOW) => None,
        name => Some(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeySet;

    fn pool(n: usize, rr: bool) -> Pool {
        let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        let set = KeySet::new(keys).unwrap();
        Pool::new(
            set.into_keys(),
            |s| Striped::new(false, s),
            rr,
            crate::config::Config::default().errors,
            Observer::Tracing,
        )
        // Probes are tested on their own: here every half-open key is open to all.
        .with_probing(Duration::ZERO, Duration::from_secs(86_400))
    }

    fn all(p: &Pool) -> Vec<usize> {
        let mut c = p.cursor();
        std::iter::from_fn(|| p.pick(&mut c, &p.lanes.default, None).map(|p| p.key)).collect()
    }

    #[test]
    fn priority_visits_each_key_once_in_order() {
        let p = pool(130, false);
        assert_eq!(all(&p), (0..130).collect::<Vec<_>>());
    }

    #[test]
    fn round_robin_starts_at_the_next_key_and_wraps() {
        let p = pool(3, true);
        assert_eq!(all(&p), vec![0, 1, 2]);
        assert_eq!(all(&p), vec![1, 2, 0]);
        assert_eq!(all(&p), vec![2, 0, 1]);
        assert_eq!(all(&p), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn cooled_keys_are_skipped_until_their_deadline() {
        let p = pool(200, false);
        for i in 0..199 {
            p.cool(
                i,
                Generation::Current,
                CooldownReason::RateLimited,
                Duration::from_secs(10 + i as u64),
                false,
            );
        }
        assert_eq!(all(&p), vec![199]);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(all(&p), vec![0, 199]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(all(&p), vec![0, 1, 199]);
        assert!(matches!(p.status(0).state, KeyState::Active));
        assert!(matches!(p.status(2).state, KeyState::CoolingDown { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_is_never_shortened() {
        let p = pool(1, false);
        let cool = |reason, secs| {
            p.cool(
                0,
                Generation::Current,
                reason,
                Duration::from_secs(secs),
                false,
            )
        };
        cool(CooldownReason::QuotaExhausted, 3600);
        cool(CooldownReason::RateLimited, 2);
        match p.status(0).state {
            KeyState::CoolingDown { remaining, reason } => {
                assert_eq!(remaining, Duration::from_secs(3600));
                assert_eq!(reason, CooldownReason::QuotaExhausted);
            }
            other => panic!("{other:?}"),
        }
        cool(CooldownReason::RateLimited, 7200);
        assert!(matches!(
            p.status(0).state,
            KeyState::CoolingDown { remaining, .. } if remaining == Duration::from_secs(7200)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_keys_stay_out_until_reset() {
        let p = pool(2, false);
        p.disable(0, Generation::Current, DisableReason::InvalidKey);
        p.cool(
            0,
            Generation::Current,
            CooldownReason::RateLimited,
            Duration::from_secs(1),
            false,
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(all(&p), vec![1]);
        assert_eq!(p.earliest(&p.lanes.default, None), Some(Duration::ZERO));
        p.disable(1, Generation::Current, DisableReason::InvalidKey);
        assert_eq!(p.earliest(&p.lanes.default, None), None);
        p.reset(0);
        assert_eq!(all(&p), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_bits_are_mended() {
        let p = pool(2, false);
        // A bit set for a key that is really cooling is found, checked and cleared.
        p.slots[0].state.store(
            Word::cooling(CooldownReason::RateLimited, 1_000_000, false, 0).0,
            SeqCst,
        );
        assert_eq!(all(&p), vec![1]);
        assert_eq!(p.usable[0].load(SeqCst) & 1, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_a_rotated_out_credential_are_dropped() {
        let p = pool(1, false);
        let old = p.begin(0).generation();
        p.rotate(0, Striped::new(false, "new"), "fp:new");
        let new = p.begin(0);
        assert_eq!(new.value.get(), "new");
        let new = new.generation();
        // The revoked old key's 401 and its quota 429 land after the rotation.
        p.record(0, old, Outcome::Disable(DisableReason::InvalidKey), None);
        let hour = Duration::from_secs(3600);
        p.record(
            0,
            old,
            Outcome::Cool(CooldownReason::QuotaExhausted, hour, false),
            None,
        );
        for _ in 0..5 {
            p.record(0, old, Outcome::Error, None);
        }
        assert_eq!(p.status(0).state, KeyState::Active);
        assert_eq!(p.status(0).consecutive_errors, 0);
        // The new credential's own outcomes count.
        p.record(0, new, Outcome::Disable(DisableReason::InvalidKey), None);
        assert!(matches!(p.status(0).state, KeyState::Disabled { .. }));
    }

    #[test]
    fn words_keep_their_fields_apart() {
        let w = Word::cooling(CooldownReason::Manual, DEADLINE_MAX, true, GEN_MASK);
        assert_eq!(w.tag(), TAG_COOLING);
        assert_eq!(w.reason(), CooldownReason::Manual.code());
        assert!(w.capped());
        assert_eq!(w.generation(), GEN_MASK);
        assert_eq!(w.until(), DEADLINE_MAX);
        let w = Word::cooling(CooldownReason::RateLimited, u64::MAX, false, GEN_MASK + 2);
        assert_eq!(
            (w.until(), w.generation(), w.capped()),
            (DEADLINE_MAX, 1, false)
        );
        assert_eq!(Word::disabled(DisableReason::Manual, 7).generation(), 7);
    }
}

// The model check of the atomics above: `scripts/loom.sh`.
#[cfg(all(test, tkf_loom))]
mod loom_model;
