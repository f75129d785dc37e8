//! Key state shared between processes, without I/O: the messages replicas exchange, the
//! outbox the pool's events feed, and how a process merges what the others learned.
//!
//! A store (feature `redis`: [`RedisStore`](crate::RedisStore)) orders every message by a
//! sequence number it gives out, and every replica applies the messages in that order, its own
//! included. So the replicas end in one state:
//! - a cooldown or a disable merges as [`KeyHandle::import`](crate::KeyHandle::import) does: the
//!   later deadline wins, never beyond this pool's `max_cooldown`, and a disable beats a
//!   cooldown;
//! - a reset clears what is older than itself (a lower sequence number) and nothing newer: a
//!   message older than a reset already applied is dropped, and what this process learned
//!   but the store has not yet numbered (`pending`) is applied again after the reset.
//!
//! Nothing here holds a key: keys are named by fingerprint and label.

#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::events::{KeyEvent, KeyEvents};
use crate::pool::Pool;
use crate::status::{CooldownReason, DisableReason, RecordedState};

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The key is set aside until `until`.
    Cool(CooldownReason),
    /// The key is set aside in `bucket` until `until`.
    Bucket(CooldownReason),
    /// The key is disabled until reset.
    Disable(DisableReason),
    /// The key was reset.
    Reset,
    /// Every key was reset.
    ResetAll,
    /// Requests went out with the key (in `bucket`, if any), as many as `remaining` says:
    /// as many fewer left in the window.
    Spent,
    /// An answer reported the key's window (in `bucket`, if any): `remaining` left until
    /// `until`, of `limit`.
    Window,
}

/// One thing a replica learned or did. `seq` is 0 until the store numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) seq: u64,
    pub(crate) kind: Kind,
    /// Milliseconds since the Unix epoch; 0 where the kind has no deadline.
    pub(crate) until_ms: u64,
    /// The process that sent it.
    pub(crate) origin: u64,
    /// The key's fingerprint; empty for [`Kind::ResetAll`].
    pub(crate) fingerprint: String,
    /// The key's label where it was sent, for logs.
    pub(crate) label: String,
    pub(crate) capped: bool,
    /// For [`Kind::Window`]: requests left, and the limit (0: not said); for
    /// [`Kind::Spent`], how many requests went.
    pub(crate) remaining: u64,
    pub(crate) limit: u64,
    /// The bucket, for [`Kind::Bucket`] (and, where the request named one, the budget kinds).
    pub(crate) bucket: Option<String>,
}

/// The version tag every stored and published message starts with.
pub(crate) const TAG: &str = "tkf1";
/// Bucket names and labels longer than this are refused: no message makes a replica hold
/// much.
const MAX_NAME: usize = 256;

impl Kind {
    fn code(self) -> (char, &'static str) {
        match self {
            Kind::Cool(r) => ('c', r.as_str()),
            Kind::Bucket(r) => ('b', r.as_str()),
            Kind::Disable(r) => ('d', r.as_str()),
            Kind::Reset => ('r', "-"),
            Kind::ResetAll => ('a', "-"),
            Kind::Spent => ('s', "-"),
            Kind::Window => ('w', "-"),
        }
    }

    fn parse(kind: &str, reason: &str) -> Option<Kind> {
        let cooldown = || {
            (0..5)
                .map(CooldownReason::from_code)
                .find(|r| r.as_str() == reason)
        };
        let disable = || {
            (0..2)
                .map(DisableReason::from_code)
                .find(|r| r.as_str() == reason)
        };
        match kind {
            "c" => cooldown().map(Kind::Cool),
            "b" => cooldown().map(Kind::Bucket),
            "d" => disable().map(Kind::Disable),
            "r" => Some(Kind::Reset),
            "a" => Some(Kind::ResetAll),
            "s" => Some(Kind::Spent),
            "w" => Some(Kind::Window),
            _ => None,
        }
    }

    /// Whether the message is about one bucket of a key.
    pub(crate) fn is_bucket(self) -> bool {
        matches!(self, Kind::Bucket(_))
    }

    /// Whether the message is about a window's count: published, never stored or numbered,
    /// and dropped while the store is away (the next answer reports again).
    pub(crate) fn is_budget(self) -> bool {
        matches!(self, Kind::Spent | Kind::Window)
    }
}

/// `%`, space and control characters as `%XX`, so that a field is one word; `-` alone
/// stands for no value (so a lone `-` is written `%2D`), and `%` alone for an empty one.
fn escape(out: &mut String, s: Option<&str>) {
    match s {
        None => out.push('-'),
        Some("-") => out.push_str("%2D"),
        Some("") => out.push('%'),
        Some(s) => {
            for c in s.chars() {
                if c == '%' || c == ' ' || c.is_control() {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "%{b:02X}");
                    }
                } else {
                    out.push(c);
                }
            }
        }
    }
}

/// Reads a field [`escape`] wrote; anything it would not have written (a raw control
/// character, lowercase hex, an escape it leaves alone) is refused, so that what reads
/// writes back the same.
fn unescape(s: &str) -> Option<Option<String>> {
    if s.len() > 3 * MAX_NAME {
        return None;
    }
    let value = match s {
        "-" => return Some(None),
        "%" => String::new(),
        _ => {
            let bytes = s.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = s.get(i + 1..i + 3)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).ok()?
        }
    };
    let mut again = String::with_capacity(s.len());
    escape(&mut again, Some(&value));
    (value.len() <= MAX_NAME && again == s).then_some(Some(value))
}

/// A fingerprint as the pool writes them: `fp:` and 16 lowercase hex digits.
fn is_fingerprint(s: &str) -> bool {
    s.len() == 19
        && s.starts_with("fp:")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Message {
    /// The message without its sequence number, as a store numbers it:
    /// `kind until origin fingerprint reason capped remaining limit bucket label`.
    pub(crate) fn body(&self) -> String {
        let (kind, reason) = self.kind.code();
        let mut out = String::with_capacity(64 + self.label.len());
        let fp = if self.fingerprint.is_empty() {
            "-"
        } else {
            &self.fingerprint
        };
        let _ = write!(
            out,
            "{kind} {} {:x} {fp} {reason} {} {} {} ",
            self.until_ms,
            self.origin,
            u8::from(self.capped),
            self.remaining,
            self.limit
        );
        escape(&mut out, self.bucket.as_deref());
        out.push(' ');
        escape(&mut out, Some(&self.label));
        out
    }

    /// Reads a stored or published message; `None` for anything else (another version,
    /// garbage, a field out of bounds).
    pub(crate) fn parse(line: &[u8]) -> Option<Message> {
        let line = std::str::from_utf8(line).ok()?;
        let mut f = line.split(' ');
        if f.next()? != TAG {
            return None;
        }
        let seq: u64 = f.next()?.parse().ok()?;
        let kind = f.next()?;
        let until_ms: u64 = f.next()?.parse().ok()?;
        let origin = u64::from_str_radix(f.next()?, 16).ok()?;
        let fingerprint = f.next()?;
        let kind = Kind::parse(kind, f.next()?)?;
        let capped = match f.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let remaining = f.next()?.parse().ok()?;
        let limit = f.next()?.parse().ok()?;
        // Only a window's count goes unnumbered.
        if (seq == 0) != kind.is_budget() {
            return None;
        }
        let bucket = unescape(f.next()?)?;
        let label = unescape(f.next()?)??;
        if f.next().is_some() {
            return None;
        }
        let fingerprint = match kind {
            Kind::ResetAll if fingerprint == "-" => String::new(),
            Kind::ResetAll => return None,
            _ if is_fingerprint(fingerprint) => fingerprint.to_owned(),
            _ => return None,
        };
        if kind.is_bucket() && bucket.is_none()
            || bucket.is_some() && !kind.is_bucket() && !kind.is_budget()
        {
            return None;
        }
        Some(Message {
            seq,
            kind,
            until_ms,
            origin,
            fingerprint,
            label,
            capped,
            remaining,
            limit,
            bucket,
        })
    }

    /// When the message stops mattering, in ms since the epoch: a cooldown at its end, a
    /// disable or a reset `hold_ms` from `now_ms`.
    pub(crate) fn expires_at(&self, now_ms: u64, hold_ms: u64) -> u64 {
        match self.kind {
            Kind::Cool(_) | Kind::Bucket(_) => self.until_ms,
            _ => now_ms.saturating_add(hold_ms),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

thread_local! {
    /// Set while this thread applies what came from the store: the events that causes are
    /// not sent back to it.
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the outbox deaf on this thread.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            APPLYING.with(|a| a.set(false));
        }
    }
    APPLYING.with(|a| a.set(true));
    let _unset = Unset;
    f()
}

/// The key a local update is about, and what it says besides its kind.
#[derive(Default)]
struct Key<'a> {
    label: &'a str,
    fingerprint: &'a str,
    capped: bool,
    remaining: u64,
    limit: u64,
}

/// Window counts kept at most while the store's task is behind; beyond, they are dropped
/// (the next answer reports the window again). Other updates are always kept.
const MAX_QUEUED_COUNTS: usize = 65_536;

/// Local updates on their way to the store's task: a push under a short lock, and a wake-up
/// only when the queue was empty, so that requests in a burst wake the task once. Requests
/// sent are counted by key and bucket rather than queued one by one: a request costs a
/// lookup, not an allocation.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    items: Mutex<Queued>,
    notify: Notify,
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Queued {
    messages: Vec<Message>,
    /// Requests sent since the last take, by fingerprint: the label, the count with no
    /// bucket, and the counts by bucket.
    spent: HashMap<String, (String, u64, HashMap<String, u64>)>,
    /// Whether `spent` counts anything.
    counted: bool,
}

impl Queued {
    fn is_empty(&self) -> bool {
        self.messages.is_empty() && !self.counted
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, m: Message) {
        let was_empty = {
            let mut q = self.lock();
            let was_empty = q.is_empty();
            if m.kind.is_budget() && q.messages.len() >= MAX_QUEUED_COUNTS {
                return;
            }
            q.messages.push(m);
            was_empty
        };
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Counts one request sent with the key `fingerprint` (in `bucket`).
    fn spend(&self, label: &str, fingerprint: &str, bucket: Option<&str>) {
        let was_empty = {
            let mut q = self.lock();
            let was_empty = q.is_empty();
            q.counted = true;
            if !q.spent.contains_key(fingerprint) {
                let fresh = (label.to_owned(), 0, HashMap::new());
                q.spent.insert(fingerprint.to_owned(), fresh);
            }
            let Some(counts) = q.spent.get_mut(fingerprint) else {
                return;
            };
            match bucket {
                None => counts.1 += 1,
                Some(b) => {
                    if let Some(n) = counts.2.get_mut(b) {
                        *n += 1;
                    } else if counts.2.len() < MAX_BUCKET_COUNTS {
                        counts.2.insert(b.to_owned(), 1);
                    }
                }
            }
            was_empty
        };
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// No more updates will come: the task ends once it has taken what is queued.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// The updates queued, once there are some (the counts of requests sent first, as
    /// [`Kind::Spent`] messages, then the rest oldest first); `None` once closed and empty.
    pub(crate) async fn next(&self, origin: u64) -> Option<Vec<Message>> {
        loop {
            let items = self.take(origin);
            if !items.is_empty() {
                return Some(items);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            self.notify.notified().await;
        }
    }

    /// Copies of the updates queued now other than window counts: what a reset applied in
    /// the meantime must not clear.
    pub(crate) fn peek_local(&self) -> Vec<Message> {
        let q = self.lock();
        q.messages
            .iter()
            .filter(|m| !m.kind.is_budget())
            .cloned()
            .collect()
    }

    /// The updates queued now.
    pub(crate) fn take(&self, origin: u64) -> Vec<Message> {
        let mut q = self.lock();
        let mut out = Vec::new();
        if q.counted {
            q.counted = false;
            for (fingerprint, (label, n, buckets)) in q.spent.iter_mut() {
                let counted = |bucket: Option<String>, n: u64| Message {
                    seq: 0,
                    kind: Kind::Spent,
                    until_ms: 0,
                    origin,
                    fingerprint: fingerprint.clone(),
                    label: label.clone(),
                    capped: false,
                    remaining: n,
                    limit: 0,
                    bucket,
                };
                if *n > 0 {
                    out.push(counted(None, std::mem::take(n)));
                }
                for (bucket, n) in buckets.drain().filter(|(_, n)| *n > 0) {
                    out.push(counted(Some(bucket), n));
                }
            }
        }
        out.append(&mut q.messages);
        out
    }
}

/// Buckets counted apart for one key at most; requests for others are not counted.
const MAX_BUCKET_COUNTS: usize = 64;

/// What the pool learns, on its way to the store: an observer in the pool's chain, and the
/// handle's resets. Sending is a push on the [`Queue`]: the request path never waits on the
/// store.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: std::sync::Arc<Queue>,
    origin: u64,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The pool is gone: so is the store's reason to run.
        self.queue.close();
    }
}

impl Outbox {
    pub(crate) fn new(queue: std::sync::Arc<Queue>, origin: u64) -> Outbox {
        Outbox { queue, origin }
    }

    fn send(&self, kind: Kind, until: Option<SystemTime>, key: Key<'_>, bucket: Option<&str>) {
        if APPLYING.with(Cell::get) {
            return;
        }
        self.queue.push(Message {
            seq: 0,
            kind,
            until_ms: until.map_or(0, unix_ms),
            origin: self.origin,
            fingerprint: key.fingerprint.to_owned(),
            label: key.label.to_owned(),
            capped: key.capped,
            remaining: key.remaining,
            limit: key.limit,
            bucket: bucket.map(str::to_owned),
        });
    }

    /// A reset made through the handle, whatever the key's state here: another replica may
    /// hold a cooldown this one does not.
    pub(crate) fn reset(&self, label: &str, fingerprint: &str) {
        let key = Key {
            label,
            fingerprint,
            ..Key::default()
        };
        self.send(Kind::Reset, None, key, None);
    }

    /// `reset_all` made through the handle.
    pub(crate) fn reset_all(&self) {
        let key = Key {
            label: "",
            fingerprint: "",
            ..Key::default()
        };
        self.send(Kind::ResetAll, None, key, None);
    }
}

impl KeyEvents for Outbox {
    fn on_event(&self, event: &KeyEvent<'_>) {
        match *event {
            KeyEvent::CooledDown {
                key: label,
                fingerprint,
                reason,
                until,
                capped,
                ..
            } => {
                let key = Key {
                    label,
                    fingerprint,
                    capped,
                    ..Key::default()
                };
                self.send(Kind::Cool(reason), Some(until), key, None);
            }
            KeyEvent::BucketCooledDown {
                key: label,
                fingerprint,
                bucket,
                reason,
                until,
                ..
            } => {
                let key = Key {
                    label,
                    fingerprint,
                    ..Key::default()
                };
                self.send(Kind::Bucket(reason), Some(until), key, Some(bucket));
            }
            KeyEvent::Spending {
                key: label,
                fingerprint,
                bucket,
            } if !APPLYING.with(Cell::get) => self.queue.spend(label, fingerprint, bucket),
            KeyEvent::WindowReported {
                key: label,
                fingerprint,
                bucket,
                remaining,
                limit,
                resets,
            } => {
                let key = Key {
                    label,
                    fingerprint,
                    remaining,
                    limit: limit.unwrap_or(0),
                    ..Key::default()
                };
                self.send(Kind::Window, Some(resets), key, bucket);
            }
            KeyEvent::Disabled {
                key: label,
                fingerprint,
                reason,
            } => {
                let key = Key {
                    label,
                    fingerprint,
                    ..Key::default()
                };
                self.send(Kind::Disable(reason), None, key, None);
            }
            _ => {}
        }
    }
}

impl KeyEvents for std::sync::Arc<Outbox> {
    fn on_event(&self, event: &KeyEvent<'_>) {
        Outbox::on_event(self, event);
    }
}

/// Local updates kept for the store at most; beyond, the oldest are dropped (and logged).
pub(crate) const MAX_PENDING: usize = 4096;

/// One process's side of the merge: which resets it has applied, and what it learned that
/// the store has not numbered yet.
#[derive(Debug, Default)]
pub(crate) struct Merge {
    /// This process's id: its own window counts, coming back, are not counted twice.
    origin: u64,
    /// The Redis data set the floors below were numbered in.
    epoch: String,
    /// The sequence number of the last `reset_all` applied.
    reset_all: u64,
    /// The sequence number of the last reset applied, by fingerprint (keys of this pool only).
    resets: HashMap<String, u64>,
    /// Local updates not numbered by the store yet, oldest first, with their ids.
    pending: Vec<(u64, Message)>,
    next_id: u64,
    /// Local updates dropped since the last look, for one log line.
    pub(crate) dropped: usize,
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The state of a key changed.
    Changed,
    /// Nothing changed: known already, weaker, or older than a reset.
    Unchanged,
    /// About no key of this pool.
    Foreign,
}

impl Merge {
    /// The merge of the process `origin`.
    pub(crate) fn new(origin: u64) -> Merge {
        Merge {
            origin,
            ..Merge::default()
        }
    }

    /// Takes a local update for the store; returns its id, for [`Merge::numbered`].
    pub(crate) fn local(&mut self, m: Message) -> u64 {
        match m.kind {
            Kind::ResetAll => self.pending.clear(),
            // What the key learned before its reset is cleared by it anyway.
            Kind::Reset => self.pending.retain(|(_, p)| p.fingerprint != m.fingerprint),
            _ => {}
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
            self.dropped += 1;
        }
        self.next_id += 1;
        self.pending.push((self.next_id, m));
        self.next_id
    }

    /// The store numbered update `id` (or found it weaker than what it holds): its own
    /// message, if any, comes back through the channel in order.
    pub(crate) fn numbered(&mut self, id: u64) {
        self.pending.retain(|(i, _)| *i != id);
    }

    /// The updates not numbered yet, oldest first; cooldowns that ended are dropped.
    pub(crate) fn pending(&mut self, now_ms: u64) -> Vec<(u64, Message)> {
        self.pending.retain(|(_, m)| match m.kind {
            Kind::Cool(_) | Kind::Bucket(_) => m.until_ms > now_ms,
            _ => true,
        });
        self.pending.clone()
    }

    /// Applies a numbered message from the store to `pool`.
    #[cfg(test)]
    pub(crate) fn apply(&mut self, pool: &Pool, m: &Message) -> Applied {
        self.apply_queued(pool, m, &[])
    }

    /// Applies a numbered message from the store to `pool`; `queued` are the local updates
    /// not yet taken from the [`Queue`], applied again after a reset as `pending` is.
    pub(crate) fn apply_queued(&mut self, pool: &Pool, m: &Message, queued: &[Message]) -> Applied {
        quietly(|| self.apply_quietly(pool, m, queued))
    }

    /// A new session's start: `epoch` names the Redis data set (a Redis that lost its data
    /// has another), `seq` its counter now. Resets numbered by a data set that is gone order
    /// nothing in the new one, and no reset is newer than the counter (a hostile message's
    /// number holds only until the next session).
    pub(crate) fn rebase(&mut self, epoch: &str, seq: u64) {
        if self.epoch != epoch {
            self.epoch = epoch.to_owned();
            self.reset_all = 0;
            self.resets.clear();
        }
        self.reset_all = self.reset_all.min(seq);
        for s in self.resets.values_mut() {
            *s = (*s).min(seq);
        }
    }

    fn apply_quietly(&mut self, pool: &Pool, m: &Message, queued: &[Message]) -> Applied {
        if m.kind.is_budget() {
            if m.origin == self.origin {
                return Applied::Unchanged;
            }
            let Some(i) = pool.by_fingerprint(&m.fingerprint) else {
                return Applied::Foreign;
            };
            let bucket = m.bucket.as_deref();
            match m.kind {
                Kind::Spent => pool.spent_elsewhere(i, bucket, m.remaining.max(1)),
                _ => pool.reported_elsewhere(
                    i,
                    bucket,
                    m.remaining,
                    (m.limit > 0).then_some(m.limit),
                    UNIX_EPOCH + Duration::from_millis(m.until_ms),
                ),
            }
            return Applied::Changed;
        }
        if m.kind == Kind::ResetAll {
            if m.seq <= self.reset_all {
                return Applied::Unchanged;
            }
            self.reset_all = m.seq;
            self.resets.retain(|_, &mut s| s > m.seq);
            for i in 0..pool.len() {
                if !self.resets.contains_key(&*pool.fingerprint(i)) {
                    pool.reset(i);
                }
            }
            self.replay(pool, None, queued);
            return Applied::Changed;
        }
        let Some(i) = pool.by_fingerprint(&m.fingerprint) else {
            return Applied::Foreign;
        };
        let floor = self
            .resets
            .get(&m.fingerprint)
            .copied()
            .unwrap_or(0)
            .max(self.reset_all);
        if m.seq <= floor {
            return Applied::Unchanged;
        }
        let changed = match m.kind {
            Kind::Reset => {
                self.resets.insert(m.fingerprint.clone(), m.seq);
                pool.reset(i);
                self.replay(pool, Some(&m.fingerprint), queued);
                true
            }
            _ => import(pool, i, m),
        };
        if changed {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }

    /// Applies again, after a reset, what this process learned that the store has not
    /// numbered yet: it comes after the reset in the store's order.
    fn replay(&self, pool: &Pool, fingerprint: Option<&str>, queued: &[Message]) {
        for m in self.pending.iter().map(|(_, m)| m).chain(queued) {
            if fingerprint.is_some_and(|fp| fp != m.fingerprint) {
                continue;
            }
            match m.kind {
                Kind::Reset => {
                    if let Some(i) = pool.by_fingerprint(&m.fingerprint) {
                        pool.reset(i);
                    }
                }
                Kind::ResetAll => (0..pool.len()).for_each(|i| pool.reset(i)),
                Kind::Spent | Kind::Window => {}
                _ => {
                    if let Some(i) = pool.by_fingerprint(&m.fingerprint) {
                        import(pool, i, m);
                    }
                }
            }
        }
    }
}

/// Merges a cooldown or a disable into key `i`.
fn import(pool: &Pool, i: usize, m: &Message) -> bool {
    let until = UNIX_EPOCH + Duration::from_millis(m.until_ms);
    match m.kind {
        Kind::Cool(reason) => pool.import(
            i,
            &RecordedState::CoolingDown {
                reason,
                until,
                capped: m.capped,
            },
        ),
        Kind::Disable(reason) => pool.import(i, &RecordedState::Disabled { reason }),
        Kind::Bucket(_) => m
            .bucket
            .as_deref()
            .is_some_and(|b| pool.import_bucket(i, b, until)),
        _ => false,
    }
}

/// Fuzzing entry: a message read from arbitrary bytes writes back as itself.
#[cfg(fuzzing)]
pub(crate) fn fuzz_message(data: &[u8]) {
    if let Some(m) = Message::parse(data) {
        let again = format!("{TAG} {} {}", m.seq, m.body());
        assert_eq!(Message::parse(again.as_bytes()).as_ref(), Some(&m));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{KeyFallbackLayer, KeyHandle, KeySet, KeyState};

    /// The message as stored and published: `tkf1 seq body`.
    fn line(m: &Message) -> String {
        format!("{TAG} {} {}", m.seq, m.body())
    }

    fn msg(seq: u64, kind: Kind, until_ms: u64, fp: &str) -> Message {
        Message {
            seq,
            kind,
            until_ms,
            origin: 7,
            fingerprint: fp.to_owned(),
            label: "key-1".to_owned(),
            capped: false,
            remaining: 0,
            limit: 0,
            bucket: kind.is_bucket().then(|| "llama-3.1-8b".to_owned()),
        }
    }

    fn now_ms() -> u64 {
        unix_ms(SystemTime::now())
    }

    /// A pool of three keys whose events (those not from the store) reach the queue.
    fn pool() -> (KeyHandle, Vec<String>, Arc<Queue>) {
        let queue = Arc::new(Queue::default());
        let layer = KeyFallbackLayer::builder(KeySet::new(["gsk_a", "gsk_b", "gsk_c"]).unwrap())
            .events(Arc::new(Outbox::new(queue.clone(), 1)))
            .max_cooldown(Duration::from_secs(3600))
            .build();
        let handle = layer.handle();
        let fps = handle
            .status()
            .keys
            .iter()
            .map(|k| k.fingerprint.clone())
            .collect();
        (handle, fps, queue)
    }

    fn cooling(h: &KeyHandle, i: usize) -> Option<u64> {
        match h.export()[i].state {
            RecordedState::CoolingDown { until, .. } => Some(unix_ms(until)),
            _ => None,
        }
    }

    #[test]
    fn messages_read_back_as_written() {
        let fp = "fp:0123456789abcdef";
        let mut odd = msg(
            42,
            Kind::Bucket(CooldownReason::RateLimited),
            1_700_000_000_000,
            fp,
        );
        odd.label = "my key %1\u{7f}é".to_owned();
        odd.bucket = Some("-".to_owned());
        odd.capped = true;
        for m in [
            msg(1, Kind::Cool(CooldownReason::QuotaExhausted), 5, fp),
            msg(2, Kind::Disable(DisableReason::InvalidKey), 0, fp),
            msg(3, Kind::Reset, 0, fp),
            Message {
                fingerprint: String::new(),
                label: String::new(),
                ..msg(4, Kind::ResetAll, 0, "")
            },
            odd,
        ] {
            let line = line(&m);
            assert_eq!(line.split(' ').count(), 12, "{line}");
            assert_eq!(Message::parse(line.as_bytes()), Some(m), "{line}");
        }
    }

    #[test]
    fn anything_else_reads_as_nothing() {
        let fp = "fp:0123456789abcdef";
        let good = line(&msg(9, Kind::Cool(CooldownReason::RateLimited), 5, fp));
        assert!(Message::parse(good.as_bytes()).is_some());
        let long = format!("{} {}", &good[..good.len() - 6], "x".repeat(300));
        for bad in [
            "",
            "garbage",
            &good.replacen("tkf1", "tkf2", 1),
            &good.replacen(" 9 ", " 0 ", 1),
            &good.replacen(fp, "fp:0123", 1),
            &good.replacen(fp, "fp:0123456789ABCDEF", 1),
            &good.replacen(" c ", " b ", 1),
            &good.replacen("rate_limited", "sleepy", 1),
            &format!("{good} extra"),
            &good.replacen("key-1", "key%G1", 1),
            &good.replacen("key-1", "key\u{1}1", 1),
            &good.replacen("key-1", "key%2d1", 1),
            &good.replacen("key-1", "key%411", 1),
            &long,
        ] {
            assert_eq!(Message::parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Message::parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn cooldowns_merge_by_the_later_end_within_max_cooldown() {
        let (h, fps, _rx) = pool();
        let mut merge = Merge::default();
        let (now, pool) = (now_ms(), &h.shared.pool);
        let cool = Kind::Cool(CooldownReason::RateLimited);
        let at = |u| merge_until(&h, 0, u);
        assert_eq!(
            merge.apply(pool, &msg(1, cool, now + 60_000, &fps[0])),
            Applied::Changed
        );
        assert!(at(now + 60_000));
        // Shorter: kept as is. Later: taken. A century: held for max_cooldown (1 h).
        assert_eq!(
            merge.apply(pool, &msg(2, cool, now + 30_000, &fps[0])),
            Applied::Unchanged
        );
        assert!(at(now + 60_000));
        merge.apply(pool, &msg(3, cool, now + 90_000, &fps[0]));
        assert!(at(now + 90_000));
        merge.apply(pool, &msg(4, cool, now + 100 * 365 * 86_400_000, &fps[0]));
        let held = cooling(&h, 0).unwrap();
        assert!(
            held <= now_ms() + 3_600_000 && held >= now + 3_599_000,
            "{held}"
        );
        // A disable beats a cooldown; a cooldown does not undo a disable.
        merge.apply(
            pool,
            &msg(5, Kind::Disable(DisableReason::InvalidKey), 0, &fps[0]),
        );
        merge.apply(pool, &msg(6, cool, now + 3_000_000, &fps[0]));
        assert!(matches!(
            h.status().keys[0].state,
            KeyState::Disabled { .. }
        ));
        // Another pool's key, and an ended cooldown: nothing.
        let other = "fp:00000000000000ff";
        assert_eq!(
            merge.apply(pool, &msg(7, cool, now + 9_000, other)),
            Applied::Foreign
        );
        assert_eq!(
            merge.apply(pool, &msg(8, cool, now - 1, &fps[1])),
            Applied::Unchanged
        );
        assert_eq!(h.status().keys[1].state, KeyState::Active);
    }

    /// Whether key `i` cools until `until`, give or take the pool's clock's rounding.
    fn merge_until(h: &KeyHandle, i: usize, until: u64) -> bool {
        cooling(h, i).is_some_and(|u| u.abs_diff(until) <= 2)
    }

    #[test]
    fn a_reset_clears_what_is_older_and_nothing_newer() {
        let (h, fps, _rx) = pool();
        let mut merge = Merge::default();
        let (now, pool) = (now_ms(), &h.shared.pool);
        let cool = Kind::Cool(CooldownReason::RateLimited);
        merge.apply(pool, &msg(1, cool, now + 60_000, &fps[0]));
        merge.apply(pool, &msg(2, cool, now + 60_000, &fps[1]));
        assert_eq!(
            merge.apply(pool, &msg(5, Kind::Reset, 0, &fps[0])),
            Applied::Changed
        );
        assert_eq!(cooling(&h, 0), None);
        assert!(cooling(&h, 1).is_some(), "another key's state stays");
        // Older than the reset (a snapshot that overlapped the channel): dropped. The same
        // reset again, or an older one: nothing.
        assert_eq!(
            merge.apply(pool, &msg(4, cool, now + 60_000, &fps[0])),
            Applied::Unchanged
        );
        assert_eq!(cooling(&h, 0), None);
        merge.apply(pool, &msg(6, cool, now + 70_000, &fps[0]));
        assert_eq!(
            merge.apply(pool, &msg(5, Kind::Reset, 0, &fps[0])),
            Applied::Unchanged
        );
        assert_eq!(
            merge.apply(pool, &msg(3, Kind::Reset, 0, &fps[0])),
            Applied::Unchanged
        );
        assert!(merge_until(&h, 0, now + 70_000));
        // reset_all: every key, and what is older everywhere.
        let mut all = msg(10, Kind::ResetAll, 0, "");
        all.fingerprint.clear();
        assert_eq!(merge.apply(pool, &all), Applied::Changed);
        assert!((0..3).all(|i| cooling(&h, i).is_none()));
        assert_eq!(
            merge.apply(pool, &msg(9, cool, now + 60_000, &fps[2])),
            Applied::Unchanged
        );
        assert_eq!(merge.apply(pool, &all), Applied::Unchanged);
    }

    #[test]
    fn what_the_store_has_not_numbered_comes_back_after_a_reset() {
        let (h, fps, queue) = pool();
        let mut merge = Merge::default();
        let (now, pool) = (now_ms(), &h.shared.pool);
        let cool = Kind::Cool(CooldownReason::RateLimited);
        merge.apply(pool, &msg(1, cool, now + 60_000, &fps[0]));
        // This process learns key-1 is out of quota; the store has not numbered it yet when
        // another replica's reset (numbered before it) arrives.
        h.cool_down("key-1", Duration::from_secs(600)).unwrap();
        let local = queue
            .take(1)
            .pop()
            .expect("the local cooldown goes to the store");
        let id = merge.local(local);
        merge.apply(pool, &msg(2, Kind::Reset, 0, &fps[0]));
        let kept = cooling(&h, 0).expect("the local cooldown is applied again");
        assert!(kept >= now + 599_000, "{kept}");
        // Once numbered, a later reset clears it.
        merge.numbered(id);
        merge.apply(pool, &msg(3, Kind::Reset, 0, &fps[0]));
        assert_eq!(cooling(&h, 0), None);
    }

    #[test]
    fn what_comes_from_the_store_is_not_sent_back() {
        let (h, fps, queue) = pool();
        let mut merge = Merge::default();
        let pool = &h.shared.pool;
        let cool = Kind::Cool(CooldownReason::RateLimited);
        merge.apply(pool, &msg(1, cool, now_ms() + 60_000, &fps[0]));
        merge.apply(
            pool,
            &msg(2, Kind::Disable(DisableReason::InvalidKey), 0, &fps[1]),
        );
        merge.apply(pool, &msg(3, Kind::Reset, 0, &fps[1]));
        let mut bucket = msg(
            4,
            Kind::Bucket(CooldownReason::RateLimited),
            now_ms() + 9_000,
            &fps[2],
        );
        bucket.bucket = Some("llama".into());
        assert_eq!(merge.apply(pool, &bucket), Applied::Changed);
        assert!(
            queue.take(1).is_empty(),
            "the store's own state went back to it"
        );
        // What this process learns does go.
        h.disable("key-3").unwrap();
        let sent = queue.take(1).pop().unwrap();
        assert_eq!(sent.kind, Kind::Disable(DisableReason::Manual));
        assert_eq!(sent.fingerprint, fps[2]);
        assert_eq!(sent.seq, 0);
    }

    #[test]
    fn pending_updates_stay_bounded_and_a_reset_supersedes_them() {
        let mut merge = Merge::default();
        let fp = "fp:0123456789abcdef";
        let cool = Kind::Cool(CooldownReason::RateLimited);
        let far = now_ms() + 60_000;
        for _ in 0..MAX_PENDING + 10 {
            merge.local(msg(0, cool, far, fp));
        }
        assert_eq!(merge.pending(now_ms()).len(), MAX_PENDING);
        assert_eq!(merge.dropped, 10);
        merge.local(msg(0, Kind::Reset, 0, fp));
        assert_eq!(merge.pending(now_ms()).len(), 1);
        merge.local(msg(0, cool, now_ms() - 1, fp));
        assert_eq!(
            merge.pending(now_ms()).len(),
            1,
            "an ended cooldown is not sent"
        );
    }

    #[test]
    fn another_replicas_requests_count_against_the_window_and_its_own_do_not() {
        let (h, fps, _rx) = pool();
        let mut merge = Merge::new(1);
        let pool = &h.shared.pool;
        let window = |origin, remaining| Message {
            origin,
            remaining,
            limit: 5,
            ..msg(0, Kind::Window, now_ms() + 60_000, &fps[0])
        };
        let spent = |origin| Message {
            origin,
            bucket: None,
            ..msg(0, Kind::Spent, 0, &fps[0])
        };
        let left = |h: &KeyHandle| {
            h.status().keys[0]
                .buckets
                .first()
                .and_then(|b| b.requests_remaining)
                .map(|(n, _)| n)
        };
        // Another replica's answer: 2 left of 5.
        assert_eq!(merge.apply(pool, &window(7, 2)), Applied::Changed);
        assert_eq!(left(&h), Some(2));
        // This process's own requests, coming back from the store: not counted again.
        merge.apply(pool, &spent(1));
        assert_eq!(left(&h), Some(2));
        // Another's: one fewer each; with none left the key is passed over.
        merge.apply(pool, &spent(7));
        assert_eq!(left(&h), Some(1));
        let passed_over = |h: &KeyHandle| h.status().keys[0].buckets[0].passed_over_for.is_some();
        assert!(!passed_over(&h));
        merge.apply(pool, &spent(7));
        assert_eq!(left(&h), Some(0));
        assert!(passed_over(&h), "{:?}", h.status());
        // An older answer that leaves more changes nothing within the window.
        merge.apply(pool, &window(7, 4));
        assert_eq!(left(&h), Some(0));
        // Budget counts go unnumbered; anything else numbered.
        let line = format!("{TAG} 0 {}", spent(7).body());
        assert!(Message::parse(line.as_bytes()).is_some(), "{line}");
        let cool = msg(0, Kind::Cool(CooldownReason::RateLimited), 5, &fps[0]);
        assert_eq!(
            Message::parse(format!("{TAG} 0 {}", cool.body()).as_bytes()),
            None
        );
        assert_eq!(
            Message::parse(format!("{TAG} 3 {}", spent(7).body()).as_bytes()),
            None
        );
    }

    #[test]
    fn requests_sent_are_counted_not_queued_one_by_one() {
        let queue = Queue::default();
        let fp = "fp:0123456789abcdef";
        for _ in 0..3 {
            queue.spend("key-1", fp, None);
        }
        queue.spend("key-1", fp, Some("llama"));
        queue.spend("key-1", fp, Some("llama"));
        queue.push(msg(0, Kind::Disable(DisableReason::Manual), 0, fp));
        let mut got = queue.take(9);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got.pop().unwrap().kind,
            Kind::Disable(DisableReason::Manual)
        );
        got.sort_by_key(|m| m.bucket.clone());
        let counts: Vec<_> = got
            .iter()
            .map(|m| (m.bucket.as_deref(), m.remaining))
            .collect();
        assert_eq!(counts, [(None, 3), (Some("llama"), 2)]);
        assert!(got
            .iter()
            .all(|m| m.kind == Kind::Spent && m.origin == 9 && m.seq == 0));
        // Each line reads back; the next take has nothing new.
        for m in &got {
            let line = format!("{TAG} 0 {}", m.body());
            assert_eq!(Message::parse(line.as_bytes()).as_ref(), Some(m));
        }
        assert!(queue.take(9).is_empty());
    }

    // Review (redis): the per-bucket request counts of a key never forget a bucket, so
    // once 64 buckets were ever used, requests in any other bucket are never counted to the
    // other replicas again, for the life of the process.
    #[test]
    fn review_requests_in_a_new_bucket_are_still_counted_after_64_others() {
        let queue = Queue::default();
        let fp = "fp:0123456789abcdef";
        for b in 0..MAX_BUCKET_COUNTS {
            queue.spend("key-1", fp, Some(&format!("model-{b}")));
        }
        assert_eq!(queue.take(9).len(), MAX_BUCKET_COUNTS);
        // Those models are done with; requests go to another one now.
        queue.spend("key-1", fp, Some("model-new"));
        queue.spend("key-1", fp, Some("model-new"));
        let got = queue.take(9);
        assert!(
            got.iter()
                .any(|m| m.bucket.as_deref() == Some("model-new") && m.remaining == 2),
            "requests in a 65th bucket were never counted: {got:?}"
        );
    }

    // Review (redis): a request in the overflow lane (a 65th bucket while 64 are busy) is
    // sent to the other replicas as a request with no bucket, and they count it against the
    // key's default-lane window, a window it was never part of.
    #[test]
    fn review_an_overflow_request_does_not_count_against_the_default_window_elsewhere() {
        let (h, fps, queue) = pool();
        let p = &h.shared.pool;
        let now = p.now_ms();
        for b in 0..crate::budget::MAX_BUCKETS {
            let lane = p.lanes.lane(&format!("model-{b}"), || now);
            p.lanes.cool(&lane, 1, now + 60_000, now, false);
        }
        let overflow = p.lanes.lane("model-65", || now);
        assert_eq!(overflow.name.as_deref(), Some(crate::budget::OVERFLOW));
        p.sending(0, &overflow, &p.begin(0));
        let sent = queue.take(1);

        // Another replica knows key-1's default window: 2 left of 5.
        let (other, other_fps, _q) = pool();
        assert_eq!(other_fps, fps);
        let mut merge = Merge::new(2);
        let window = Message {
            origin: 7,
            remaining: 2,
            limit: 5,
            ..msg(0, Kind::Window, now_ms() + 60_000, &fps[0])
        };
        merge.apply(&other.shared.pool, &window);
        for m in &sent {
            merge.apply(&other.shared.pool, m);
        }
        let left = other.status().keys[0]
            .buckets
            .first()
            .and_then(|b| b.requests_remaining)
            .map(|(n, _)| n);
        assert_eq!(
            left,
            Some(2),
            "a request for another model counted against the default window: {sent:?}"
        );
    }

    #[test]
    fn a_reset_keeps_what_is_still_queued_for_the_store() {
        let (h, fps, queue) = pool();
        let mut merge = Merge::new(1);
        let pool = &h.shared.pool;
        // Learned here a moment ago: still in the queue, not yet taken by the store's task.
        h.cool_down("key-1", Duration::from_secs(600)).unwrap();
        let queued = queue.peek_local();
        assert_eq!(queued.len(), 1);
        merge.apply_queued(pool, &msg(4, Kind::Reset, 0, &fps[0]), &queued);
        assert!(
            cooling(&h, 0).is_some(),
            "the queued cooldown is applied again"
        );
        // A reset with nothing queued clears it.
        queue.take(1);
        merge.apply_queued(pool, &msg(5, Kind::Reset, 0, &fps[0]), &queue.peek_local());
        assert_eq!(cooling(&h, 0), None);
    }

    #[test]
    fn a_redis_that_lost_its_data_numbers_anew() {
        let (h, fps, _queue) = pool();
        let mut merge = Merge::new(1);
        let pool = &h.shared.pool;
        let cool = Kind::Cool(CooldownReason::RateLimited);
        merge.rebase("first", 0);
        let mut all = msg(900, Kind::ResetAll, 0, "");
        all.fingerprint.clear();
        merge.apply(pool, &all);
        // The same data set: older numbers stay older.
        merge.rebase("first", 950);
        assert_eq!(
            merge.apply(pool, &msg(3, cool, now_ms() + 60_000, &fps[0])),
            Applied::Unchanged
        );
        // Another (Redis came back empty, its counter at 3): numbers start over.
        merge.rebase("second", 3);
        assert_eq!(
            merge.apply(pool, &msg(3, cool, now_ms() + 60_000, &fps[0])),
            Applied::Changed
        );
        // A number beyond the counter (a hostile message) holds only until the next session.
        merge.apply(pool, &msg(u64::MAX, Kind::Reset, 0, &fps[1]));
        merge.rebase("second", 10);
        assert_eq!(
            merge.apply(pool, &msg(11, cool, now_ms() + 60_000, &fps[1])),
            Applied::Changed
        );
    }
}
