//! Feature `redis`: [`RedisStore`], key state shared by every replica through Redis.
//!
//! One task per store does all the I/O, off the request path: it subscribes to the
//! namespace's channel, loads what is stored, applies both (through [`Merge`]), and sends what
//! this process learns (from its [`Outbox`]) through Lua scripts that number each message
//! (`INCR`), store it with a deadline (`PXAT`) and publish it in one step. When Redis is away
//! the task says so once, keeps what this process learns for later, and reconnects with
//! backoff; requests read only the pool.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_core::Stream;
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::{AsyncConnectionConfig, Client, Script};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};

use crate::driver::Shared;
use crate::share::{unix_ms, Applied, Kind, Merge, Message, Outbox, Queue, TAG};
#[cfg(test)]
use crate::status::CooldownReason;

/// Messages from the channel applied in a row at most before what is queued here is sent.
const MAX_STREAK: usize = 64;

/// Messages kept at most for a pool not attached yet.
const MAX_WAITING: usize = 100_000;

/// The longest a disable or reset is kept in Redis (and any entry's deadline from now).
const MAX_HOLD: Duration = Duration::from_secs(365 * 86_400);

/// A session that lasted this long without error counts as sharing again, even if it had
/// nothing to write.
const STABLE: Duration = Duration::from_secs(10);

/// While Redis is away, how long the task lets local updates gather before it takes them:
/// requests in a burst then wake it once per `COALESCE`, not once each. (While Redis is
/// there, what gathers during one round trip goes in the next.)
const COALESCE: Duration = Duration::from_millis(1);

/// Key state shared through Redis by every replica that uses the same keys: cooldowns (with
/// their reason, wall-clock deadline and bucket), disables, resets from any replica's
/// [`KeyHandle`](crate::KeyHandle), and each request sent and window reported (so that the
/// replicas spend a provider's window of requests together). Given to
/// [`KeyFallbackBuilder::shared_state`](crate::KeyFallbackBuilder::shared_state).
///
/// - **Pushed**: what one replica learns reaches the others over pub/sub within
///   milliseconds, and is stored until it ends (`PXAT`), so that a replica that starts or
///   restarts loads what is current before its first request.
/// - **Never in the way**: requests read local state only. Redis down at start or mid-run,
///   slow, or answering garbage costs sharing, nothing else: one `warn` event says sharing
///   stopped, the store reconnects with backoff, and on its return replicas converge.
/// - **Monotone**: a cooldown from elsewhere never shortens one here (nor lasts beyond this
///   pool's `max_cooldown`); a reset clears only what is older than itself, in the order Redis
///   numbers them (`INCR`), so replicas that race end in one state.
/// - **No secrets**: keys are matched by fingerprint; only fingerprints, labels, reasons,
///   buckets and deadlines reach Redis. A password goes in the URL (`redis://:pw@host/`),
///   TLS with `rediss://` (feature `redis-tls`).
///
/// Keys live under `tower-key-fallback:{namespace}:`, and the channel is
/// `tower-key-fallback:{namespace}`. Use one namespace per set of keys.
///
/// ```no_run
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, RedisStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/", "groq").await?;
/// let layer = KeyFallbackLayer::builder(KeySet::from_env("GROQ_API_KEY")?)
///     .shared_state(store)
///     .build();
/// # let _ = layer; Ok(()) }
/// ```
pub struct RedisStore {
    inner: Arc<Inner>,
    queue: Arc<Queue>,
    origin: u64,
    attached: bool,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Never attached: nothing will feed the task, which ends. Attached, the pool's
        // outbox ends it when the pool goes.
        if !self.attached {
            self.queue.close();
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.inner.names.prefix)
            .finish_non_exhaustive()
    }
}

/// A [`RedisStore`] could not be made: what is wrong, never the URL (it may hold a
/// password).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The Redis URL could not be used.
    Url {
        /// Why.
        reason: &'static str,
    },
    /// The namespace could not be used.
    Namespace {
        /// Why.
        reason: &'static str,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Url { reason } => write!(f, "the Redis URL cannot be used: {reason}"),
            StoreError::Namespace { reason } => {
                write!(f, "the Redis namespace cannot be used: {reason}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// Options of a [`RedisStore`], from [`RedisStore::builder`]. Its `Debug` leaves out the URL,
/// which may hold a password.
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    namespace: String,
    opts: Options,
    /// PEM roots to trust instead of the bundled web roots (feature `redis-tls`).
    roots: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
struct Options {
    start_timeout: Duration,
    command_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    hold: Duration,
    ping_every: Duration,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("namespace", &self.namespace)
            .field("options", &self.opts)
            .field("tls_root_certificates", &self.roots.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// How long [`connect`](Self::connect) waits for the first load of the stored state
    /// (default 2 s). Past it, `connect` returns and the state is applied when it comes.
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.opts.start_timeout = d;
        self
    }

    /// How long one Redis command may take before the connection counts as lost (default
    /// 1 s).
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.opts.command_timeout = d;
        self
    }

    /// The wait before the first reconnection, doubled after each failure up to `max`
    /// (defaults 100 ms and 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.opts.reconnect_min = min;
        self.opts.reconnect_max = max.max(min);
        self
    }

    /// How long a disable and a reset are kept in Redis (default 24 h, at most a year): a
    /// key disabled for an invalid key is not tried by a replica that starts within that
    /// time.
    pub fn hold(mut self, d: Duration) -> Self {
        self.opts.hold = d.min(MAX_HOLD);
        self
    }

    /// Trusts these root certificates (PEM) for `rediss://` instead of the bundled web
    /// roots: for a Redis whose certificate a private CA signed (feature `redis-tls`).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots = Some(pem.into());
        self
    }

    /// Checks the URL and namespace, starts the store's task, and waits (at most the start
    /// timeout) for the stored state. Redis being unreachable is no error: the store warns
    /// once and keeps trying in the background.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let names = Names::new(&self.namespace)?;
        let client = open(&self.url, self.roots)?;
        let queue = Arc::new(Queue::default());
        let origin = origin();
        let inner = Arc::new(Inner {
            core: Mutex::new(Core {
                merge: Merge::new(origin),
                ..Core::default()
            }),
            names,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = Task {
            inner: inner.clone(),
            client,
            queue: queue.clone(),
            opts: self.opts,
            origin,
            ready: Some(ready_tx),
        };
        tokio::spawn(task.run());
        let _ = timeout(self.opts.start_timeout, ready_rx).await;
        Ok(RedisStore {
            inner,
            queue,
            origin,
            attached: false,
        })
    }
}

impl RedisStore {
    /// Connects with the default options: see [`RedisStoreBuilder::connect`].
    pub async fn connect(url: &str, namespace: &str) -> Result<RedisStore, StoreError> {
        RedisStore::builder(url, namespace).connect().await
    }

    /// A store to configure, then [`connect`](RedisStoreBuilder::connect).
    pub fn builder(url: &str, namespace: &str) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.to_owned(),
            namespace: namespace.to_owned(),
            roots: None,
            opts: Options {
                start_timeout: Duration::from_secs(2),
                command_timeout: Duration::from_secs(1),
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(5),
                hold: Duration::from_secs(86_400),
                ping_every: Duration::from_secs(5),
            },
        }
    }

    /// The pool's side: the observer that feeds the store.
    pub(crate) fn outbox(&self) -> Arc<Outbox> {
        Arc::new(Outbox::new(self.queue.clone(), self.origin))
    }

    /// Binds the store to its pool and applies what it loaded so far, before the pool's
    /// first request.
    pub(crate) fn attach(mut self, shared: &Arc<Shared>) {
        self.attached = true;
        let mut core = lock(&self.inner.core);
        core.target = Some(Arc::downgrade(shared));
        let waiting = std::mem::take(&mut core.waiting);
        let Core { merge, .. } = &mut *core;
        let queued = self.queue.peek_local();
        for m in &waiting {
            merge.apply_queued(&shared.pool, m, &queued);
        }
    }
}

fn lock(m: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random enough id for this process's messages.
fn origin() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(unix_ms(SystemTime::now()).into());
    h.write_u32(std::process::id());
    h.finish()
}

fn open(url: &str, roots: Option<Vec<u8>>) -> Result<Client, StoreError> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis") => {}
        Some("rediss") if cfg!(feature = "redis-tls") => {}
        Some("rediss") => {
            return Err(StoreError::Url {
                reason: "rediss:// needs the crate feature `redis-tls`",
            })
        }
        _ => {
            return Err(StoreError::Url {
                reason: "it must start with redis:// or rediss://",
            })
        }
    }
    let unread = || StoreError::Url {
        reason: "it is not of the form redis://[user:password@]host[:port][/db]",
    };
    #[cfg(feature = "redis-tls")]
    {
        // redis-rs builds its TLS configuration from rustls' process-wide provider: ring,
        // unless the program chose one (then this changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(pem) = roots {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            return Client::build_with_tls(url, certs).map_err(|_| unread());
        }
    }
    #[cfg(not(feature = "redis-tls"))]
    let _ = roots;
    Client::open(url).map_err(|_| unread())
}

/// The namespace's keys and channel.
#[derive(Debug)]
struct Names {
    /// `tower-key-fallback:{namespace}`: the channel, and the keys' prefix.
    prefix: String,
}

impl Names {
    fn new(namespace: &str) -> Result<Names, StoreError> {
        if namespace.is_empty() || namespace.len() > 128 {
            return Err(StoreError::Namespace {
                reason: "it must have 1 to 128 characters",
            });
        }
        // No `:`: it separates the namespace from its keys' names, so `a` and `a:b` would
        // read each other's keys.
        if !namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./@".contains(&b))
        {
            return Err(StoreError::Namespace {
                reason: "it may hold only ASCII letters, digits and - _ . / @",
            });
        }
        Ok(Names {
            prefix: format!("tower-key-fallback:{namespace}"),
        })
    }

    fn seq(&self) -> String {
        format!("{}:seq", self.prefix)
    }

    /// The data set's name: made by the first replica to find none, gone with the data.
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// Where a message lives: a key's cooldown or disable, a bucket's cooldown, a key's
    /// last reset, the last `reset_all`.
    fn entry(&self, m: &Message) -> String {
        match (m.kind, &m.bucket) {
            (Kind::Bucket(_), Some(b)) => {
                let mut out = format!("{}:b:{}:", self.prefix, m.fingerprint);
                for byte in b.bytes() {
                    out.push_str(&format!("{byte:02x}"));
                }
                out
            }
            (Kind::Reset, _) => format!("{}:r:{}", self.prefix, m.fingerprint),
            (Kind::ResetAll, _) => format!("{}:a", self.prefix),
            _ => format!("{}:k:{}", self.prefix, m.fingerprint),
        }
    }
}

/// Stores a cooldown or a disable unless Redis holds a stronger one (a disable, or a later
/// end), numbering and publishing it in the same step. Returns its number, 0 when it was
/// not stronger.
const UPDATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind, untl = string.match(ARGV[1], '^(%a) (%d+)')
local expire = tonumber(ARGV[2])
if expire <= now then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ck, cu = string.match(cur, '^tkf1 %d+ (%a) (%d+)')
  if ck == 'd' then return 0 end
  if ck and kind ~= 'd' and tonumber(cu) >= tonumber(untl) then return 0 end
end
local seq = redis.call('INCR', KEYS[2])
local msg = 'tkf1 ' .. seq .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], msg, 'PXAT', expire)
redis.call('PUBLISH', ARGV[3], msg)
return seq
";

/// Numbers a reset, deletes what it clears (the keys matching `ARGV[4]` and `KEYS[3]`),
/// keeps it as a marker for replicas that were away, and publishes it; once per `ARGV[5]`
/// (the sender's id for it), so that a reset sent again after its answer was lost does not
/// clear what others set since.
const RESET: &str = r"
if not redis.call('SET', ARGV[5], '1', 'NX', 'PX', ARGV[2]) then return 0 end
local seq = redis.call('INCR', KEYS[2])
local msg = 'tkf1 ' .. seq .. ' ' .. ARGV[1]
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local cursor = '0'
local rounds = 0
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[4], 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do redis.call('DEL', k) end
  rounds = rounds + 1
until cursor == '0' or rounds > 100000
redis.call('SET', KEYS[1], msg, 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], msg)
return seq
";

#[derive(Debug)]
struct Inner {
    core: Mutex<Core>,
    names: Names,
}

/// The merge and its pool, behind one lock that the store's task and `attach` share; the
/// request path never takes it.
#[derive(Debug, Default)]
struct Core {
    /// The pool, once attached; a store whose pool is gone stops.
    target: Option<Weak<Shared>>,
    /// What came before the pool was attached, in order.
    waiting: Vec<Message>,
    merge: Merge,
}

impl Core {
    /// Applies a numbered message, or keeps it for `attach` (window counts excepted: they
    /// would count against no window yet). `false`: the pool is gone.
    fn apply(&mut self, m: Message, queue: &Queue) -> bool {
        match &self.target {
            None => {
                if !m.kind.is_budget() && self.waiting.len() < MAX_WAITING {
                    self.waiting.push(m);
                }
                true
            }
            Some(weak) => match weak.upgrade() {
                Some(shared) => {
                    // What a reset must not clear: local updates still in the queue.
                    let queued = match m.kind {
                        Kind::Reset | Kind::ResetAll => queue.peek_local(),
                        _ => Vec::new(),
                    };
                    if self.merge.apply_queued(&shared.pool, &m, &queued) == Applied::Changed {
                        tracing::debug!(
                            key = %m.label,
                            fingerprint = %m.fingerprint,
                            seq = m.seq,
                            "shared key state applied"
                        );
                    }
                    true
                }
                None => false,
            },
        }
    }
}

/// Why a session with Redis ended.
enum End {
    /// The pool is gone: the task stops.
    Done,
    /// Redis is unreachable, slow or made no sense.
    Lost(String),
}

impl<E: fmt::Display> From<E> for Lost {
    fn from(e: E) -> Lost {
        Lost(e.to_string())
    }
}

struct Lost(String);

struct Task {
    inner: Arc<Inner>,
    client: Client,
    queue: Arc<Queue>,
    opts: Options,
    origin: u64,
    ready: Option<oneshot::Sender<()>>,
}

impl Task {
    async fn run(mut self) {
        let addr = self.client.get_connection_info().addr().to_string();
        let mut backoff = self.opts.reconnect_min;
        let mut sharing = true;
        loop {
            let served = match self.session(&mut sharing, &addr).await {
                End::Done => return,
                End::Lost(why) => why,
            };
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(());
            }
            if sharing {
                tracing::warn!(
                    redis = %addr,
                    error = %served,
                    "shared key state: Redis unreachable; sharing stopped, requests go on with this process's key state"
                );
                sharing = false;
                backoff = self.opts.reconnect_min;
            } else {
                tracing::debug!(redis = %addr, error = %served, "shared key state: reconnection failed");
            }
            // Wait out the backoff, keeping what the pool learns meanwhile.
            let wake = sleep(backoff + jitter(backoff, self.origin));
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    items = self.queue.next(self.origin) => match items {
                        Some(items) => {
                            self.keep(items);
                            sleep(COALESCE).await;
                        }
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(self.opts.reconnect_max);
        }
    }

    /// Connects, subscribes, loads, then serves until the connection is lost or the pool
    /// is gone.
    async fn session(&mut self, sharing: &mut bool, addr: &str) -> End {
        let t = self.opts.command_timeout;
        let names = &self.inner.names;
        let connected = async {
            let pubsub = timeout(t, self.client.get_async_pubsub()).await??;
            let (mut sink, stream) = pubsub.split();
            timeout(t, sink.subscribe(&names.prefix)).await??;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t));
            let mut con = timeout(
                t,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await??;
            let stored = timeout(t * 4, load(&mut con, names, self.origin)).await??;
            Ok::<_, Lost>((sink, stream, con, stored))
        };
        let (_sink, mut stream, mut con, stored) = match connected.await {
            Ok(c) => c,
            Err(Lost(why)) => return End::Lost(why),
        };
        {
            let mut core = lock(&self.inner.core);
            core.merge.rebase(&stored.epoch, stored.seq);
            for m in stored.messages {
                if !core.apply(m, &self.queue) {
                    return End::Done;
                }
            }
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
        // Sharing is back once Redis took a write, or served this session a while: a Redis
        // that reads but refuses writes (a replica after a failover, an ACL) is no return,
        // and its reconnections keep backing off without another warning.
        let started = tokio::time::Instant::now();
        let prove = |sharing: &mut bool| {
            if !*sharing {
                tracing::info!(redis = %addr, "shared key state: Redis reachable again; sharing resumed");
                *sharing = true;
            }
        };
        let scripts = (Script::new(UPDATE), Script::new(RESET));
        // What this process learned while away, then what it learns from now on.
        let now = unix_ms(SystemTime::now());
        let pending = lock(&self.inner.core).merge.pending(now);
        for (id, m) in pending {
            if let Err(Lost(why)) = self.send(&mut con, &scripts, id, &m).await {
                return End::Lost(why);
            }
            prove(sharing);
        }
        let mut garbled = false;
        let mut streak = 0;
        let mut ping = tokio::time::interval(self.opts.ping_every);
        ping.reset();
        loop {
            // What others learned is applied first, as soon as it comes: a replica's next
            // choice of key should see it. A busy channel (others' counts) still does not
            // hold back what this process sends: after `MAX_STREAK` messages in a row, what
            // is queued goes.
            if streak >= MAX_STREAK {
                streak = 0;
                let items = self.queue.take(self.origin);
                if !items.is_empty() {
                    if let Err(Lost(why)) = self.send_all(&mut con, &scripts, items).await {
                        return End::Lost(why);
                    }
                    prove(sharing);
                }
            }
            tokio::select! {
                biased;
                msg = next(&mut stream) => {
                    streak += 1;
                    let Some(msg) = msg else {
                        return End::Lost("the subscription ended".into());
                    };
                    match Message::parse(msg.get_payload_bytes()) {
                        Some(m) => {
                            let alive = lock(&self.inner.core).apply(m, &self.queue);
                            if !alive {
                                return End::Done;
                            }
                        }
                        None if !garbled => {
                            garbled = true;
                            tracing::warn!(redis = %addr, "shared key state: an unreadable message on the channel was ignored");
                        }
                        None => {}
                    }
                }
                items = self.queue.next(self.origin) => {
                    streak = 0;
                    let Some(items) = items else { return End::Done };
                    if let Err(Lost(why)) = self.send_all(&mut con, &scripts, items).await {
                        return End::Lost(why);
                    }
                    prove(sharing);
                }
                _ = ping.tick() => {
                    let pong: Result<Result<String, _>, _> =
                        timeout(t, redis::cmd("PING").query_async(&mut con)).await;
                    match pong {
                        Ok(Ok(_)) if started.elapsed() >= STABLE => prove(sharing),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return End::Lost(e.to_string()),
                        Err(e) => return End::Lost(e.to_string()),
                    }
                }
            }
        }
    }

    /// Keeps local updates for the next session; a window's count is worth nothing later
    /// (the next answer reports again), so counts are dropped.
    fn keep(&self, items: impl IntoIterator<Item = Message>) {
        let mut core = lock(&self.inner.core);
        for m in items.into_iter().filter(|m| !m.kind.is_budget()) {
            core.merge.local(m);
        }
    }

    /// Sends what the pool told, in order: runs of window counts as one pipeline of
    /// `PUBLISH`es (one round trip), the rest each through its script. When Redis is lost on
    /// the way, what was not sent is kept.
    async fn send_all(
        &self,
        con: &mut MultiplexedConnection,
        scripts: &(Script, Script),
        items: Vec<Message>,
    ) -> Result<(), Lost> {
        let prefix = &self.inner.names.prefix;
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut counts = redis::pipe();
            let mut n = 0;
            while let Some(m) = items.next_if(|m| m.kind.is_budget()) {
                let line = format!("{TAG} 0 {}", m.body());
                counts.cmd("PUBLISH").arg(prefix).arg(line).ignore();
                n += 1;
            }
            if n > 0 {
                let sent = timeout(self.opts.command_timeout, counts.query_async::<()>(con)).await;
                if let Err(why) = sent.map_err(Lost::from).and_then(|r| r.map_err(Lost::from)) {
                    self.keep(items);
                    return Err(why);
                }
            }
            if let Some(m) = items.next() {
                if let Err(why) = self.local(con, scripts, m).await {
                    self.keep(items);
                    return Err(why);
                }
            }
        }
        Ok(())
    }

    /// Keeps a local update until Redis has it, and sends it.
    async fn local(
        &self,
        con: &mut MultiplexedConnection,
        scripts: &(Script, Script),
        m: Message,
    ) -> Result<(), Lost> {
        let id = {
            let mut core = lock(&self.inner.core);
            let id = core.merge.local(m.clone());
            if std::mem::take(&mut core.merge.dropped) > 0 {
                tracing::warn!(
                    "shared key state: too many updates kept for Redis; the oldest were dropped"
                );
            }
            id
        };
        self.send(con, scripts, id, &m).await
    }

    /// Sends one local update through its script; once Redis answered, it is no longer
    /// pending (its message, if it was stronger, comes back on the channel).
    async fn send(
        &self,
        con: &mut MultiplexedConnection,
        scripts: &(Script, Script),
        id: u64,
        m: &Message,
    ) -> Result<(), Lost> {
        let names = &self.inner.names;
        let now = unix_ms(SystemTime::now());
        let hold = u64::try_from(self.opts.hold.as_millis()).unwrap_or(u64::MAX);
        let body = m.body();
        let call = match m.kind {
            Kind::Reset | Kind::ResetAll => {
                let mut call = scripts.1.prepare_invoke();
                call.key(names.entry(m)).key(names.seq());
                let pattern = match m.kind {
                    Kind::Reset => {
                        call.key(format!("{}:k:{}", names.prefix, m.fingerprint));
                        format!("{}:b:{}:*", names.prefix, m.fingerprint)
                    }
                    _ => format!("{}:[kb]:*", names.prefix),
                };
                let once = format!("{}:once:{:x}:{id}", names.prefix, self.origin);
                call.arg(body)
                    .arg(hold)
                    .arg(&names.prefix)
                    .arg(pattern)
                    .arg(once);
                call
            }
            _ => {
                let mut call = scripts.0.prepare_invoke();
                call.key(names.entry(m)).key(names.seq());
                let latest = now.saturating_add(u64::try_from(MAX_HOLD.as_millis()).unwrap_or(0));
                call.arg(body)
                    .arg(m.expires_at(now, hold).min(latest))
                    .arg(&names.prefix);
                call
            }
        };
        let _seq: u64 = timeout(self.opts.command_timeout, call.invoke_async(con)).await??;
        lock(&self.inner.core).merge.numbered(id);
        Ok(())
    }
}

/// The subscription's next message; `None` once it ended.
async fn next(stream: &mut PubSubStream) -> Option<redis::Msg> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// What Redis holds for the namespace: its messages, oldest first, the data set's name and
/// its counter.
struct Stored {
    messages: Vec<Message>,
    epoch: String,
    seq: u64,
}

/// Everything stored under the namespace. The data set is named first (by whoever finds it
/// unnamed), so that a Redis that lost its data is told apart from one that kept it.
async fn load(con: &mut MultiplexedConnection, names: &Names, origin: u64) -> Result<Stored, Lost> {
    let (epoch, seq): (String, Option<u64>) = redis::pipe()
        .cmd("SET")
        .arg(names.epoch())
        .arg(format!("{origin:x}-{}", unix_ms(SystemTime::now())))
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(names.epoch())
        .cmd("GET")
        .arg(names.seq())
        .query_async(con)
        .await?;
    let seq_now = seq.unwrap_or(0);
    let pattern = format!("{}:*", names.prefix);
    let (seq, epoch_key) = (names.seq(), names.epoch());
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    for _ in 0..100_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        let once = format!("{}:once:", names.prefix);
        keys.extend(
            batch
                .into_iter()
                .filter(|k| *k != seq && *k != epoch_key && !k.starts_with(&once)),
        );
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(chunk).query_async(con).await?;
        out.extend(values.iter().flatten().filter_map(|v| Message::parse(v)));
    }
    // Nothing stored is newer than the counter: what claims to be was not written by a
    // replica.
    out.retain(|m| m.seq <= seq_now);
    out.sort_by_key(|m| m.seq);
    Ok(Stored {
        messages: out,
        epoch,
        seq: seq_now,
    })
}

/// Up to a quarter of `d`, different in each process, so that replicas do not reconnect in
/// step.
fn jitter(d: Duration, origin: u64) -> Duration {
    let quarter = u64::try_from(d.as_millis() / 4).unwrap_or(0).max(1);
    Duration::from_millis(origin.rotate_left(17) % quarter)
}

#[cfg(test)]
#[path = "../tests/support/redis.rs"]
#[allow(unreachable_pub)]
mod redis_server;

#[cfg(test)]
mod tests {
    use super::redis_server;
    use super::*;

    #[tokio::test]
    async fn a_reset_sent_again_clears_nothing_set_since() {
        let redis = redis_server::RedisServer::start();
        let client = Client::open(redis.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let names = Names::new("once").unwrap();
        let fp = "fp:0123456789abcdef";
        let msg = |kind, until_ms| Message {
            seq: 0,
            kind,
            until_ms,
            origin: 1,
            fingerprint: fp.to_owned(),
            label: "key-1".to_owned(),
            capped: false,
            remaining: 0,
            limit: 0,
            bucket: None,
        };
        let reset = msg(Kind::Reset, 0);
        let (reset_script, update_script) = (Script::new(RESET), Script::new(UPDATE));
        let run_reset = |once: &'static str| {
            let mut call = reset_script.prepare_invoke();
            call.key(names.entry(&reset))
                .key(names.seq())
                .key(format!("{}:k:{fp}", names.prefix))
                .arg(reset.body())
                .arg(60_000)
                .arg(&names.prefix)
                .arg(format!("{}:b:{fp}:*", names.prefix))
                .arg(format!("{}:once:1:{once}", names.prefix));
            call
        };
        let first: u64 = run_reset("7").invoke_async(&mut con).await.unwrap();
        assert!(first > 0);
        // Another replica's cooldown, after the reset.
        let cool = msg(
            Kind::Cool(CooldownReason::RateLimited),
            unix_ms(SystemTime::now()) + 60_000,
        );
        let mut call = update_script.prepare_invoke();
        call.key(names.entry(&cool))
            .key(names.seq())
            .arg(cool.body())
            .arg(cool.until_ms)
            .arg(&names.prefix);
        let stored: u64 = call.invoke_async(&mut con).await.unwrap();
        assert!(stored > first);
        // The same reset again (its answer was lost): nothing happens.
        let again: u64 = run_reset("7").invoke_async(&mut con).await.unwrap();
        assert_eq!(again, 0);
        let kept = redis.cli(&["EXISTS", &names.entry(&cool)]);
        assert_eq!(kept, "1", "the cooldown set since the reset is kept");
        // Another reset does clear it.
        let other: u64 = run_reset("8").invoke_async(&mut con).await.unwrap();
        assert!(other > stored);
        assert_eq!(redis.cli(&["EXISTS", &names.entry(&cool)]), "0");
    }
}
