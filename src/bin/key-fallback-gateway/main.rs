//! `key-fallback-gateway` (the crate feature `gateway`): an OpenAI-compatible gateway with key
//! fallback. `cargo install --path . --features gateway` installs it; `cargo run --features
//! gateway --bin key-fallback-gateway -- --fake` runs it from a checkout.
//!
//! It forwards `/openai/v1/*` to an upstream API through `KeyFallbackLayer`, so any
//! OpenAI-compatible client (the official SDKs with `base_url` pointed here, curl) gets key
//! fallback without a change. It also serves the keys' status:
//!
//! ```text
//! ANY  /openai/v1/*            forwarded to <upstream>/openai/v1/* with a key of the pool
//! GET  /keys                   every key's state and counters, as JSON (never a key)
//! POST /keys/reset             every key active again; answers the new status
//! POST /keys/{label}/reset     one key active again
//! GET  /keys/switches          the last switches from one key to the next, as JSON
//! GET  /                       the status page: every route's keys, updating by itself
//! GET  /healthz, /readyz       alive; at least one usable key on every route (503 if not)
//! GET  /metrics                the layer's metrics in Prometheus' text format (never a key)
//! ```
//!
//! The request body is read whole, up to a cap (413 past it), so it can be replayed with the
//! next key. When no key can serve, the answer is `429 Too Many Requests` with `Retry-After`;
//! when the upstream cannot be reached at all, `502 Bad Gateway`. Responses, server-sent event
//! streams included, are streamed back as they arrive.
//!
//! Options (or the environment variable in brackets):
//!
//! ```text
//! --config FILE            routes from a TOML file (GATEWAY_CONFIG), see below
//! --upstream URL           where to forward (UPSTREAM_URL, default https://api.groq.com),
//!                          e.g. http://127.0.0.1:9000
//! UPSTREAM_CA_FILE         PEM roots to trust for an https upstream besides the bundled ones
//! --listen ADDR            where to listen (GATEWAY_LISTEN, default 127.0.0.1:8080)
//! --keys-env PREFIX        the keys' variables: PREFIX, PREFIX_2, … (default GROQ_API_KEY)
//! --max-body BYTES         the largest request body accepted (default 8 MiB)
//! --allowed-host NAME      also serve this Host, `name` or `name:port`; repeatable, replaces
//!                          GATEWAY_ALLOWED_HOSTS (comma-separated). localhost, loopback
//!                          addresses and the listen address are always served
//! --allow-same-site        serve browser requests marked Sec-Fetch-Site: same-site
//!                          (GATEWAY_ALLOW_SAME_SITE=1)
//! --admin-token-env NAME   the variable holding the /keys admin token
//!                          (default GATEWAY_ADMIN_TOKEN)
//! --header-timeout TIME    how long a request head may take to arrive (GATEWAY_HEADER_TIMEOUT,
//!                          default 10s); also how long an idle connection is kept
//! --body-timeout TIME      how long a request body may take to arrive, whole
//!                          (GATEWAY_BODY_TIMEOUT, default 30s)
//! --fake                   forward to the crate's fake Groq API on loopback, with its own
//!                          keys: no key and no network needed
//! --redis URL              share the keys' state with every gateway given the same Redis
//!                          (REDIS_URL), e.g. redis://127.0.0.1:6379/; needs the crate feature
//!                          `redis` (`--features gateway,redis`)
//! --redis-namespace NAME   the keys' namespace in Redis (GATEWAY_REDIS_NAMESPACE, default
//!                          gateway): gateways with one set of keys share one namespace
//! --threads N              threads serving requests (GATEWAY_THREADS, default 1)
//! ```
//!
//! One thread is the default because it is the cheapest: measured against the fake provider
//! on two cores, two threads cost the gateway 30% more CPU per request (0.060 ms against
//! 0.046 ms: the threads wake each other and take work from each other), and one thread
//! forwards well over ten thousand requests a second, far beyond what a pool of rate-limited
//! keys can spend.
//! `--threads 2` or more spreads the work over more cores when it is needed.
//!
//! A `TIME` is a whole number with `ms`, `s` or `m` after it (`250ms`, `10s`, `2m`); a bare
//! number is seconds.
//!
//! # Routes from a file
//!
//! `--config gateway.toml` serves several APIs, each under its own path with its own keys:
//!
//! ```toml
//! listen = "127.0.0.1:8080"          # optional; --listen and GATEWAY_LISTEN win
//!
//! [routes.groq]                      # /groq/chat/completions → https://api.groq.com/openai/v1/chat/completions
//! provider = "groq"                  # a preset: groq, openai, azure_openai, anthropic, gemini,
//!                                    # gemini_query_key, openrouter, mistral, together,
//!                                    # fireworks, deepseek, openai_compatible
//!
//! [routes.anthropic]
//! provider = "anthropic"             # keys from ANTHROPIC_API_KEY, ANTHROPIC_API_KEY_2, …
//! max_attempts = 2
//! wait_for_key = "5s"
//!
//! [routes.azure]
//! provider = "azure_openai"
//! path = "/azure"                    # default: /<route name>
//! keys_env = "AZURE_KEY"             # default: the preset's variables
//! upstream = "https://my-resource.openai.azure.com/openai"   # default: the preset's URL
//! round_robin = true
//! groups = [["AZURE_KEY", "AZURE_KEY_2"]]   # keys that share one limit
//! ```
//!
//! A mistake in the file stops the gateway at start with the file, the line and the problem;
//! the values the file holds are never shown.
//!
//! # Safe to expose
//!
//! Anyone who reaches `/openai/v1/*` spends the keys, so the gateway listens on 127.0.0.1 by
//! default and refuses, before anything is read past the request head or forwarded:
//!
//! - a `Host` it does not serve (`421`, code `host_not_allowed`; `400` for a missing or
//!   malformed one): a DNS-rebinding page (`evil.example` resolving to 127.0.0.1) cannot
//!   read `GET /keys` or call the upstream;
//! - cross-site browser requests (`403`, code `cross_site_request`): `Sec-Fetch-Site:
//!   cross-site` (and `same-site` unless `--allow-same-site`), or an `Origin` whose host is
//!   not served, whatever the method and content type, so a form or `text/plain` `POST`
//!   from another site is refused too. Requests with neither header (curl, the SDKs) pass;
//! - the `/keys` endpoints and `/metrics` without the admin token (`401` with `WWW-Authenticate: Bearer`)
//!   when `GATEWAY_ADMIN_TOKEN` is set, or from a client whose TCP peer address is not
//!   loopback (`403`) when it is not; headers such as `X-Forwarded-For` are not looked at;
//! - a path with a dot segment (`.`, `..`), raw or percent-encoded (`%2e%2e`, `.%2e`,
//!   `%252e`), an encoded slash (`%2f`), a backslash (`\`, `%5c`) or an encoded control
//!   character (`400`, code `invalid_path`): nothing like `/openai/v1/../../admin` reaches the
//!   upstream, whatever it would make of it;
//! - a request head that does not arrive within `--header-timeout` (the connection is
//!   closed), and a body that does not arrive within `--body-timeout` (`408`, code
//!   `request_timeout`, and the connection is closed).
//!
//! Behind a reverse proxy on the same machine every client's peer address is loopback: set
//! `GATEWAY_ADMIN_TOKEN` there, and pass the name the proxy forwards in `Host` with
//! `--allowed-host`. Nothing authenticates `/openai/v1/*` itself: keep the gateway where only
//! its clients reach it.
//!
//! The upstream may be `https://` (rustls with ring, and the bundled Mozilla roots, plus those
//! of `UPSTREAM_CA_FILE` for a private CA) or plain `http://`.

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_key_fallback::{
    BoxError, Exhausted, KeyFallback, KeyFallbackBuilder, KeyFallbackLayer, KeyHandle, KeySet,
    PoolStatus,
};

// `GET /metrics`: a `metrics` recorder that writes Prometheus text.
#[path = "logs.rs"]
pub mod logs;
#[path = "prometheus.rs"]
mod prometheus;

/// mimalloc rather than the system's allocator: a forwarded request allocates about seventy
/// times, and glibc's malloc and free were a fifth of the gateway's own instructions. Built
/// without transparent huge pages (`no_thp`), which doubled the memory an open stream holds
/// (68 KiB against glibc's 34 to 39; 42 KiB without them).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
// `--config FILE`: the routes.
#[path = "config.rs"]
mod config;
pub use config::{parse as parse_config, FileConfig};

/// The listen address unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The keys' variable prefix unless told otherwise.
pub const DEFAULT_KEYS_ENV: &str = "GROQ_API_KEY";
/// Where requests go unless told otherwise: Groq's API (`/openai/v1/*` is its
/// OpenAI-compatible path).
pub const DEFAULT_UPSTREAM: &str = "https://api.groq.com";
/// The largest request body accepted unless told otherwise: chat requests with images or
/// long contexts fit.
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
/// How long a request head may take to arrive unless told otherwise.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive, whole, unless told otherwise: 8 MiB at about
/// 300 KB/s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The variable holding the client tokens (comma-separated) unless told otherwise.
pub const DEFAULT_CLIENT_TOKENS_ENV: &str = "GATEWAY_CLIENT_TOKENS";
/// The variable holding the admin token for the `/keys` endpoints unless told otherwise.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "GATEWAY_ADMIN_TOKEN";
/// How long connecting to the upstream may take before the attempt counts as a transport
/// error (and the request moves on to the next key). There is no limit on the answer
/// itself: a long completion must not be cut and replayed on another key; the client's
/// own timeout bounds it, and dropping the client's request drops the upstream one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`serve`] waits, once told to stop, for answers under way (streams included).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The client the gateway forwards with: hyper-util's, HTTP/1.1 over TLS or plain TCP.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// hyper-util's client for `https://` (rustls with ring; the bundled Mozilla roots and
/// `extra_roots`) and `http://` upstreams, with a connect timeout.
pub fn http_client(extra_roots: &[rustls::pki_types::CertificateDer<'static>]) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        // A root rustls cannot use was refused when the file was read.
        let _ = roots.add(root.clone());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new()).build(https)
}

/// The roots of a PEM file (`UPSTREAM_CA_FILE`), checked to be usable; the error names the
/// variable and the file.
pub fn read_roots(path: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("UPSTREAM_CA_FILE {path:?}: not a PEM file of certificates: {e}"))?;
    let mut store = rustls::RootCertStore::empty();
    let (_, refused) = store.add_parsable_certificates(roots.iter().cloned());
    if roots.is_empty() || refused > 0 {
        return Err(format!(
            "UPSTREAM_CA_FILE {path:?}: holds no usable CA certificate"
        ));
    }
    Ok(roots)
}

/// The gateway's limits and protections: everything [`app`] and [`serve`] need besides the
/// upstream and the keys. [`Settings::default`] is the command line's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The largest request body accepted (413 past it).
    pub max_body: usize,
    /// How long a client may take to send a request head, counted from when the gateway
    /// starts waiting for one; an idle keep-alive connection is waiting for its next head,
    /// so it is closed after this too. Applied by [`serve`].
    pub header_timeout: Duration,
    /// How long a client may take to send a request body, whole (408 past it).
    pub body_timeout: Duration,
    /// The `Host` values served (421 for others), and the only hosts accepted in `Origin`.
    pub allowed_hosts: AllowedHosts,
    /// Serve browser requests marked `Sec-Fetch-Site: same-site` (refused unless set).
    pub allow_same_site: bool,
    /// Who may use the `/keys` endpoints.
    pub admin: Admin,
    /// Who may use `/openai/v1/*`.
    pub clients: Clients,
    /// Roots trusted for an `https://` upstream besides the bundled ones.
    pub upstream_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body: DEFAULT_MAX_BODY,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            allowed_hosts: AllowedHosts::loopback(),
            allow_same_site: false,
            admin: Admin::LoopbackOnly,
            clients: Clients::LoopbackOnly,
            upstream_roots: Vec::new(),
        }
    }
}

/// The hosts the gateway answers for, in `Host` and in `Origin`: `localhost` and every
/// loopback IP address (`127.0.0.1`, `[::1]`, …) with any port, always, and those added with
/// [`allow`](AllowedHosts::allow) or [`allow_listen_addr`](AllowedHosts::allow_listen_addr).
/// Names are compared without regard to case; nothing else (`0.0.0.0`, `localhost.`,
/// `foo.localhost`) is served unless added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    extra: Vec<HostPattern>,
}

/// One added host, with the port it must come with (`None`: any).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPattern {
    host: HostName,
    port: Option<u16>,
}

/// A host as written in `Host` or `Origin`: a name (lowercase) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostName::Name(name) => f.write_str(name),
            HostName::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            HostName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl AllowedHosts {
    /// `localhost` and the loopback addresses only.
    pub fn loopback() -> Self {
        AllowedHosts::default()
    }

    /// Also serves `entry`: a name (`gateway.example.com`), an IPv4 address, or an IPv6
    /// address (in brackets or bare), optionally with `:port`. Without a port any port is
    /// served; with one, only that port (a `Host` without a port is port 80).
    pub fn allow(&mut self, entry: &str) -> Result<(), String> {
        let entry = entry.trim();
        if entry.contains("://") || entry.contains('/') {
            return Err(format!(
                "allowed host {entry:?} is a URL: give the host alone, e.g. gateway.example.com \
                 or gateway.example.com:8443"
            ));
        }
        let (host, port) = match entry.parse::<Ipv6Addr>() {
            Ok(ip) => (HostName::Ip(IpAddr::V6(ip)), None),
            Err(_) => parse_host(entry).ok_or_else(|| {
                format!(
                    "allowed host {entry:?} is not a host name, an IP address or either with \
                     :port"
                )
            })?,
        };
        let pattern = HostPattern {
            host: canonical(host),
            port,
        };
        if !self.extra.contains(&pattern) {
            self.extra.push(pattern);
        }
        Ok(())
    }

    /// Also serves the IP address the gateway listens on, with any port. Nothing is added
    /// for a loopback address (always served) or the unspecified one (`0.0.0.0`, `[::]`),
    /// which names no host: clients then come with names given to [`allow`](Self::allow).
    pub fn allow_listen_addr(&mut self, addr: SocketAddr) {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || ip.is_loopback() {
            return;
        }
        let pattern = HostPattern {
            host: canonical(HostName::Ip(addr.ip())),
            port: None,
        };
        if !self.extra.contains(&pattern) {
            self.extra.push(pattern);
        }
    }

    /// Whether a `Host` header value (`name` or `name:port`) is served. A malformed value
    /// is not.
    pub fn allows(&self, host: &str) -> bool {
        parse_host(host).is_some_and(|(host, port)| self.allows_parsed(&host, port, 80))
    }

    fn allows_parsed(&self, host: &HostName, port: Option<u16>, default_port: u16) -> bool {
        let host = canonical(host.clone());
        match &host {
            HostName::Name(name) if name == "localhost" => return true,
            HostName::Ip(ip) if ip.is_loopback() => return true,
            _ => {}
        }
        let port = port.unwrap_or(default_port);
        self.extra
            .iter()
            .any(|p| p.host == host && p.port.is_none_or(|p| p == port))
    }

    /// What is served, for the startup line: `localhost, loopback addresses, …`.
    pub fn describe(&self) -> String {
        let mut out = String::from("localhost, loopback addresses");
        for p in &self.extra {
            out.push_str(", ");
            out.push_str(&p.host.to_string());
            if let Some(port) = p.port {
                out.push_str(&format!(":{port}"));
            }
        }
        out
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so `[::ffff:127.0.0.1]` is `127.0.0.1`.
fn canonical(host: HostName) -> HostName {
    match host {
        HostName::Ip(ip) => HostName::Ip(ip.to_canonical()),
        name => name,
    }
}

/// `name`, `name:port`, `1.2.3.4[:port]` or `[v6][:port]`, as in a `Host` header; `None` when
/// it is none of these (a user part, a path, characters no host name has).
fn parse_host(s: &str) -> Option<(HostName, Option<u16>)> {
    let port = |p: &str| -> Option<u16> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(port(p.strip_prefix(':')?)?),
        };
        return Some((HostName::Ip(IpAddr::V6(ip)), port));
    }
    let (host, port) = match s.split_once(':') {
        Some((host, p)) => (host, Some(port(p)?)),
        None => (s, None),
    };
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some((HostName::Ip(IpAddr::V4(ip)), port));
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['.', '-'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    name_ok.then(|| (HostName::Name(host.to_ascii_lowercase()), port))
}

/// Who may use `GET /keys`, `POST /keys/reset` and `POST /keys/{label}/reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Admin {
    /// No token is set: only clients whose TCP peer address is loopback (as [`serve`] records
    /// it; without a recorded address, nobody).
    #[default]
    LoopbackOnly,
    /// Every client, loopback ones too, must send `Authorization: Bearer <token>`.
    Token(AdminToken),
}

/// The admin token. It is never shown (`Debug` prints `AdminToken(..)`) and is compared in
/// time that does not depend on where a guess goes wrong.
#[derive(Clone)]
pub struct AdminToken(Box<[u8]>);

impl AdminToken {
    /// The token in `value`, surrounding whitespace trimmed. It must be non-empty and visible
    /// ASCII (it comes back in a header). The error never holds the value.
    pub fn new(value: &str) -> Result<AdminToken, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("the admin token is empty: set a token or unset the variable".to_owned());
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the admin token must be visible ASCII with no spaces: it is sent \
                        in an Authorization header"
                    .to_owned(),
            );
        }
        Ok(AdminToken(value.as_bytes().into()))
    }

    /// Whether `candidate` is the token. Every byte of the token is looked at whatever the
    /// candidate, so the time taken tells nothing of how much of a guess was right.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let mut diff = self.0.len() ^ candidate.len();
        for (i, byte) in self.0.iter().enumerate() {
            diff |= usize::from(byte ^ candidate.get(i).copied().unwrap_or(0));
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl PartialEq for AdminToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for AdminToken {}

/// Who may use `/openai/v1/*`, and so spend the keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Clients {
    /// No client token is set: only clients whose TCP peer address is loopback.
    #[default]
    LoopbackOnly,
    /// Every client must send `Authorization: Bearer <token>` with one of these, the
    /// gateway's own tokens (never a provider's key, which the gateway adds itself).
    Tokens(Vec<AdminToken>),
}

impl Clients {
    /// The tokens of a comma-separated list (`GATEWAY_CLIENT_TOKENS`); errors name `var`,
    /// never a value.
    pub fn from_list(var: &str, list: &str) -> Result<Clients, String> {
        let tokens = list
            .split(',')
            .filter(|t| !t.trim().is_empty())
            .map(|t| AdminToken::new(t).map_err(|e| format!("{var}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if tokens.is_empty() {
            return Err(format!(
                "{var} is set but holds no token: give tokens or unset it"
            ));
        }
        Ok(Clients::Tokens(tokens))
    }

    /// Whether `token` is one of the tokens (each compared in constant time, all of them).
    fn accepts(tokens: &[AdminToken], token: &[u8]) -> bool {
        tokens.iter().fold(false, |ok, t| t.matches(token) | ok)
    }
}

/// One route as it is served: what `forward` needs.
#[derive(Clone)]
struct Served {
    service: KeyFallback<HttpClient>,
    /// The route's path prefix (`/groq`), which the upstream URL replaces.
    prefix: Arc<str>,
    upstream: Uri,
    body_cap: usize,
    body_timeout: Duration,
}

/// One route's pool, for the admin and health endpoints.
#[derive(Clone)]
struct RoutePool {
    /// `None` for the one route of the command line.
    name: Option<String>,
    handle: KeyHandle,
    metrics: tower_key_fallback::MetricsEvents,
}

/// What the admin and health handlers share: every route's pool.
#[derive(Clone)]
struct Gateway {
    routes: Arc<[RoutePool]>,
}

/// A route to serve: requests under `prefix` go to `upstream` through `layer`.
pub struct Route {
    /// Its name (`groq`): in `/keys`, `/readyz` and the metrics' `pool` label; `None` for the
    /// one route of the command line.
    pub name: Option<String>,
    /// The path prefix (`/groq`; `/openai/v1` for the command line's route): `<prefix>/<rest>`
    /// goes to `<upstream>/<rest>`.
    pub prefix: String,
    /// Where its requests go (`https://api.groq.com/openai/v1`).
    pub upstream: Uri,
    /// Its key pool.
    pub layer: KeyFallbackLayer,
}

/// The gateway's routes, forwarding to `upstream` (`http://host:port`, optionally with a path
/// prefix) through `layer`, behind the checks of `settings` (see the module docs: hosts,
/// cross-site requests, the admin token, paths, body size and time).
///
/// Build the layer without `exhausted_response`: the gateway answers
/// [`Exhausted`] itself, as a 429 with `Retry-After`, or as a 502 when the upstream could not
/// be reached at all.
///
/// Serve it with [`serve`], which also bounds the time a request head may take and records
/// each client's address for the loopback check of [`Admin::LoopbackOnly`]. Served another
/// way, record it with `into_make_service_with_connect_info::<SocketAddr>()`, or the `/keys`
/// endpoints answer nobody without a token.
///
/// # Panics
///
/// If `upstream` is not an `http://` or `https://` URL with a host ([`parse_upstream`]
/// checks one).
pub fn app(upstream: Uri, layer: KeyFallbackLayer, settings: &Settings) -> Router {
    let upstream = with_path(&upstream, "/openai/v1");
    let route = Route {
        name: None,
        prefix: "/openai/v1".to_owned(),
        upstream,
        layer,
    };
    app_routes(vec![route], settings)
}

/// `uri` with `more` after its path.
fn with_path(uri: &Uri, more: &str) -> Uri {
    upstream_uri(uri, more).expect("a valid URL with a valid path after it")
}

/// The gateway's routes (from a configuration file), as [`app`] makes its one.
///
/// # Panics
///
/// If an upstream is not an `http://` or `https://` URL with a host.
pub fn app_routes(routes: Vec<Route>, settings: &Settings) -> Router {
    let client = http_client(&settings.upstream_roots);
    let mut router = Router::new();
    let mut pools = Vec::new();
    for route in routes {
        let upstream = route.upstream;
        assert!(
            (upstream.scheme() == Some(&Scheme::HTTP) || upstream.scheme() == Some(&Scheme::HTTPS))
                && upstream.authority().is_some(),
            "the upstream must be an http:// or https:// URL with a host, not {upstream}"
        );
        let served = Served {
            service: tower::Layer::layer(&route.layer, client.clone()),
            prefix: route.prefix.as_str().into(),
            upstream,
            body_cap: settings.max_body,
            body_timeout: settings.body_timeout,
        };
        // A route of its own rather than a nested router: nesting rewrote every request's
        // URI to strip the prefix, which `forward` does on the string it forwards anyway.
        router = router.route(
            &format!("{}/{{*rest}}", route.prefix),
            any(forward).with_state(served),
        );
        pools.push(RoutePool {
            metrics: metrics_events(route.name.as_deref()),
            name: route.name,
            handle: route.layer.handle(),
        });
    }
    let gateway = Gateway {
        routes: pools.into(),
    };
    let guard = Arc::new(Guard {
        hosts: settings.allowed_hosts.clone(),
        allow_same_site: settings.allow_same_site,
        admin: settings.admin.clone(),
        clients: settings.clients.clone(),
    });
    router
        .route("/keys", get(keys))
        .route("/keys/reset", post(reset_all))
        .route("/keys/{label}/reset", post(reset_one))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/keys/switches", get(switches))
        .route("/", get(page))
        .route("/status.js", get(page_script))
        .route("/status.css", get(page_style))
        .fallback(not_found)
        // After the routes and the fallback: every request goes through it first.
        .layer(axum::middleware::from_fn_with_state(guard, check_request))
        .with_state(gateway)
}

/// Serves `app` on `listener` over HTTP/1.1 until `shutdown` completes: each request head must
/// arrive within `settings.header_timeout` (the connection is closed otherwise), and each
/// request carries its client's address as [`ConnectInfo<SocketAddr>`](ConnectInfo). Once
/// `shutdown` completes, no connection is accepted, idle ones are closed, and answers under
/// way get up to 30 seconds to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &Settings,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let header_timeout = settings.header_timeout;
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(connection) => connection,
            // The client went away between connecting and being accepted.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            // Out of file descriptors, most likely: wait for some to be freed.
            Err(err) => {
                tracing::error!(error = %err, "cannot accept a connection; retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                if err.is_timeout() {
                    tracing::debug!(%peer, "closed: no request head within {header_timeout:?}");
                } else {
                    tracing::debug!(%peer, error = %err, "connection error");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("answers still under way after {SHUTDOWN_GRACE:?}; not waiting longer");
    }
    Ok(())
}

/// The checks made on every request head before it is routed: see [`check_request`].
struct Guard {
    hosts: AllowedHosts,
    allow_same_site: bool,
    admin: Admin,
    clients: Clients,
}

/// Why a request is refused before anything else is done with it.
struct Refusal {
    status: StatusCode,
    message: &'static str,
    kind: &'static str,
    code: &'static str,
    www_authenticate: Option<&'static str>,
}

impl Refusal {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: &'static str,
    ) -> Self {
        Refusal {
            status,
            message,
            kind,
            code,
            www_authenticate: None,
        }
    }

    fn response(&self) -> Response {
        let mut res = error(self.status, self.message, self.kind, self.code);
        if let Some(challenge) = self.www_authenticate {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        // The body, if any, was not read: the connection cannot carry another request.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    }
}

/// Every request, before its route: the host, then the browser's cross-site markers, then the
/// path, then (for `/keys…`) the admin credential. A refusal is answered at once, without
/// reading the body.
async fn check_request(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let checked = guard
        .check_host(&req)
        .and_then(|()| guard.check_cross_site(req.headers()))
        .and_then(|()| check_path(req.uri().path()))
        .and_then(|()| guard.check_admin(&req))
        .and_then(|()| guard.check_client(&req));
    match checked {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(peer)| peer.to_string());
            tracing::warn!(
                method = %req.method(),
                status = refusal.status.as_u16(),
                code = refusal.code,
                peer = peer.as_deref().unwrap_or("unknown"),
                "refused"
            );
            refusal.response()
        }
    }
}

impl Guard {
    /// One `Host`, well formed and served; an absolute-form request target's host too.
    fn check_host(&self, req: &Request) -> Result<(), Refusal> {
        let bad = |code, message| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
            )
        };
        let not_served = Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            "invalid_request_error",
            "host_not_allowed",
            "The Host header names a host this gateway does not serve. It serves localhost \
             and loopback addresses; start it with --allowed-host NAME (or \
             GATEWAY_ALLOWED_HOSTS) to serve another name.",
        );
        const MISSING: &str = "The request has no Host header; the gateway needs one to know \
                               it is meant for it.";
        const SEVERAL: &str = "The request has more than one Host header.";
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(host), None) => host,
            (None, _) => return Err(bad("missing_host", MISSING)),
            (Some(_), Some(_)) => return Err(bad("invalid_host", SEVERAL)),
        };
        let malformed = || bad("invalid_host", "The Host header is not a host[:port].");
        let host = host.to_str().map_err(|_| malformed())?;
        let (name, port) = parse_host(host).ok_or_else(malformed)?;
        if !self.hosts.allows_parsed(&name, port, 80) {
            return Err(not_served);
        }
        if let Some(authority) = req.uri().authority() {
            let (name, port) = parse_host(authority.as_str()).ok_or_else(malformed)?;
            if !self.hosts.allows_parsed(&name, port, 80) {
                return Err(not_served);
            }
        }
        Ok(())
    }

    /// No `Sec-Fetch-Site: cross-site` (nor `same-site` unless allowed), and an `Origin`, when
    /// there is one, on a served host. Requests without these headers (not from a browser)
    /// pass.
    fn check_cross_site(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let refuse = |message| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "cross_site_request",
                message,
            )
        };
        let mut sites = headers.get_all("sec-fetch-site").iter();
        match (sites.next(), sites.next()) {
            (None, _) => {}
            (Some(site), None) => match site.as_bytes() {
                b"same-origin" | b"none" => {}
                b"same-site" if self.allow_same_site => {}
                b"same-site" => {
                    return Err(refuse(
                        "Requests from another origin of the same site are refused \
                         (Sec-Fetch-Site: same-site); start the gateway with \
                         --allow-same-site to serve them.",
                    ))
                }
                b"cross-site" => {
                    return Err(refuse(
                        "Cross-site requests are refused (Sec-Fetch-Site: cross-site): a web \
                         page on another site cannot use the gateway.",
                    ))
                }
                _ => {
                    return Err(refuse(
                        "The Sec-Fetch-Site header has a value the gateway does not know.",
                    ))
                }
            },
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "The request has more than one Sec-Fetch-Site header.",
                ))
            }
        }
        let mut origins = headers.get_all(header::ORIGIN).iter();
        match (origins.next(), origins.next()) {
            (None, _) => Ok(()),
            (Some(origin), None) if self.origin_served(origin) => Ok(()),
            (Some(_), None) => Err(refuse(
                "Cross-origin requests are refused: the Origin header names a host this \
                 gateway does not serve (--allowed-host adds one).",
            )),
            (Some(_), Some(_)) => Err(refuse("The request has more than one Origin header.")),
        }
    }

    /// `scheme://host[:port]` with a served host; `null` and anything else is not.
    fn origin_served(&self, origin: &HeaderValue) -> bool {
        let Ok(uri) = origin.to_str().unwrap_or("").parse::<Uri>() else {
            return false;
        };
        let default_port = match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return false,
        };
        let Some(authority) = uri.authority() else {
            return false;
        };
        parse_host(authority.as_str())
            .is_some_and(|(host, port)| self.hosts.allows_parsed(&host, port, default_port))
    }

    /// For `/keys` and below: the bearer token when one is set, a loopback peer otherwise.
    fn check_admin(&self, req: &Request) -> Result<(), Refusal> {
        let path = req.uri().path();
        if path != "/keys" && !path.starts_with("/keys/") && path != "/metrics" {
            return Ok(());
        }
        match &self.admin {
            Admin::Token(token) => {
                let unauthorized = |challenge, message| Refusal {
                    www_authenticate: Some(challenge),
                    ..Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        "authentication_error",
                        "admin_token_required",
                        message,
                    )
                };
                let Some(credential) = sole_authorization(req) else {
                    return Err(unauthorized(
                        r#"Bearer realm="gateway admin""#,
                        "The admin endpoints (/keys, /metrics) need the gateway's admin token: send \
                         Authorization: Bearer <token>.",
                    ));
                };
                if !token.matches(bearer_token(credential)) {
                    return Err(unauthorized(
                        r#"Bearer realm="gateway admin", error="invalid_token""#,
                        "The Authorization header does not hold the gateway's admin token \
                         (Authorization: Bearer <token>).",
                    ));
                }
                Ok(())
            }
            Admin::LoopbackOnly => loopback_only(
                req,
                "admin_loopback_only",
                "The admin endpoints (/keys, /metrics) answer clients on this machine only while no admin \
                 token is set: set GATEWAY_ADMIN_TOKEN where the gateway runs and send \
                 Authorization: Bearer <token>.",
            ),
        }
    }
}

impl Guard {
    /// For everything but the gateway's own paths (the routes, and a path nobody serves): one
    /// of the gateway's client tokens when some are set, a loopback peer otherwise.
    fn check_client(&self, req: &Request) -> Result<(), Refusal> {
        if own_path(req.uri().path()) {
            return Ok(());
        }
        match &self.clients {
            Clients::Tokens(tokens) => {
                let token = sole_authorization(req).map_or(&b""[..], bearer_token);
                if !token.is_empty() && Clients::accepts(tokens, token) {
                    return Ok(());
                }
                Err(Refusal {
                    www_authenticate: Some(r#"Bearer realm="gateway""#),
                    ..Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        "authentication_error",
                        "gateway_token_required",
                        "This gateway needs one of its client tokens: send Authorization: Bearer \
                         <token> (your SDK's api_key). A provider's key is not one.",
                    )
                })
            }
            Clients::LoopbackOnly => loopback_only(
                req,
                "clients_loopback_only",
                "This gateway serves clients on this machine only while no client token is \
                 set: set GATEWAY_CLIENT_TOKENS where the gateway runs and send \
                 Authorization: Bearer <token>.",
            ),
        }
    }
}

/// The request's one `Authorization` value; `None` when it has none or several.
fn sole_authorization(req: &Request) -> Option<&[u8]> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.as_bytes()),
        _ => None,
    }
}

/// The token of `Bearer <token>` (the scheme in any case); empty for any other credential.
fn bearer_token(credential: &[u8]) -> &[u8] {
    match credential.iter().position(|b| *b == b' ') {
        Some(at) if credential[..at].eq_ignore_ascii_case(b"bearer") => {
            credential[at + 1..].trim_ascii()
        }
        _ => b"",
    }
}

/// Whether the client's TCP peer, as [`serve`] recorded it, is a loopback address (without a
/// recorded address: no).
fn loopback_peer(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| peer.ip().to_canonical().is_loopback())
}

/// A loopback peer passes; any other gets a `403` with `code` and `message`.
fn loopback_only(req: &Request, code: &'static str, message: &'static str) -> Result<(), Refusal> {
    if loopback_peer(req) {
        return Ok(());
    }
    Err(Refusal::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        code,
        message,
    ))
}

/// The gateway's own paths, guarded by the admin check (`/keys…`, `/metrics`) or open (the
/// status page's files, which hold no data, and the health checks).
fn own_path(path: &str) -> bool {
    matches!(
        path,
        "/" | "/status.js" | "/status.css" | "/healthz" | "/readyz" | "/metrics" | "/keys"
    ) || path.starts_with("/keys/")
}

/// How many times a path segment is percent-decoded in search of a dot segment or a slash:
/// `%25252e` (three encodings of `.`) is found, and deeper is refused as such.
const DECODE_ROUNDS: usize = 3;

/// `Ok` for a path safe to forward; a 400 for one with a dot segment (`.`, `..`, raw or
/// percent-encoded any number of times up to [`DECODE_ROUNDS`], with or without a `;`
/// parameter), an encoded slash, a backslash (raw or encoded) or an encoded control
/// character. Dots inside a segment (`model.v1.json`) are fine.
fn check_path(path: &str) -> Result<(), Refusal> {
    match unsafe_path(path) {
        None => Ok(()),
        Some(message) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_path",
            message,
        )),
    }
}

/// Why `path` must not be forwarded, or `None` when it may: see [`check_path`]. The answer
/// never repeats the path.
pub fn unsafe_path(path: &str) -> Option<&'static str> {
    const DOT_SEGMENT: &str = "The request path has a dot segment (. or .., raw or \
                               percent-encoded); the gateway does not forward it.";
    const ENCODED_SLASH: &str = "The request path has an encoded slash (%2F) inside a \
                                 segment; the gateway does not forward it.";
    const BACKSLASH: &str = "The request path has a backslash (raw or percent-encoded); the \
                             gateway does not forward it.";
    const CONTROL: &str = "The request path has an encoded control character; the gateway \
                           does not forward it.";
    const TOO_DEEP: &str = "The request path is percent-encoded too many times over; the \
                            gateway does not forward it.";
    // Nothing below can refuse a path without a dot, a `%`, a backslash or a control
    // character, which is most paths (`/openai/v1/chat/completions`): one pass settles it.
    if !path
        .bytes()
        .any(|b| matches!(b, b'.' | b'%' | b'\\') || b.is_ascii_control())
    {
        return None;
    }
    for raw in path.split('/') {
        // Borrowed until a round decodes something: most paths have no `%` at all.
        let mut segment = std::borrow::Cow::Borrowed(raw.as_bytes());
        for round in 0..=DECODE_ROUNDS {
            if segment.contains(&b'\\') {
                return Some(BACKSLASH);
            }
            if segment.iter().any(|b| b.is_ascii_control()) {
                return Some(CONTROL);
            }
            if round > 0 && segment.contains(&b'/') {
                return Some(ENCODED_SLASH);
            }
            let name = segment.split(|b| *b == b';').next().unwrap_or(&[]);
            if name == b"." || name == b".." {
                return Some(DOT_SEGMENT);
            }
            match percent_decode(&segment) {
                Some(_) if round == DECODE_ROUNDS => return Some(TOO_DEEP),
                Some(decoded) => segment = std::borrow::Cow::Owned(decoded),
                None => break,
            }
        }
    }
    None
}

/// `bytes` with each `%XX` decoded, or `None` when there is none to decode.
fn percent_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.contains(&b'%') {
        return None;
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digit = |at: usize| bytes.get(at).copied().and_then(hex);
            if let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) {
                out.push(hi << 4 | lo);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// Checks and normalizes an upstream base URL: `http://host[:port][/prefix]`, no query.
///
/// ```text
/// http://127.0.0.1:9000      /openai/v1/models → http://127.0.0.1:9000/openai/v1/models
/// http://proxy:8080/groq/    /openai/v1/models → http://proxy:8080/groq/openai/v1/models
/// ```
pub fn parse_upstream(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|e| format!("UPSTREAM_URL {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "UPSTREAM_URL {url:?} must start with https:// or http://, e.g. \
                 https://api.groq.com"
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("UPSTREAM_URL {url:?} has no host"));
    };
    // `http::Uri` reads the port only when asked: `h:80x` must not pass for a host and port.
    let after_host = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, p)| p);
    if after_host.contains(':') && authority.port_u16().is_none() {
        return Err(format!(
            "UPSTREAM_URL {url:?} has a port that is not a number"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("UPSTREAM_URL {url:?} must not have a query string"));
    }
    Ok(uri)
}

/// The upstream URL for a request's path and query: the upstream's scheme and host, its
/// path prefix, then the request's path and query as they came.
pub fn upstream_uri(upstream: &Uri, path_and_query: &str) -> Result<Uri, http::Error> {
    let prefix = upstream.path().trim_end_matches('/');
    let mut path = String::with_capacity(prefix.len() + path_and_query.len());
    path.push_str(prefix);
    path.push_str(path_and_query);
    let path = PathAndQuery::try_from(path)?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = upstream.scheme().cloned();
    parts.authority = upstream.authority().cloned();
    parts.path_and_query = Some(path);
    Ok(Uri::from_parts(parts)?)
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// Removes from `headers` the hop-by-hop ones (and those their `Connection` names), and the
/// ones in `also`: what is left is forwarded. In place, as a dozen lookups: building a new
/// map of what is kept cost the gateway several times that on every request and answer.
fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    for name in also {
        headers.remove(name);
    }
    // Most messages have none: one look at each name is cheaper than nine removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Request headers the gateway sets itself. `host` and `content-length` follow from the
/// upstream URL and the buffered body. `accept-encoding` is dropped so the upstream answers
/// uncompressed: the layer reads error bodies (`insufficient_quota`, "try again in 9.5s")
/// to decide what happened to the key, and cannot read a gzipped one.
fn request_headers_set_here() -> [HeaderName; 3] {
    [
        header::HOST,
        header::CONTENT_LENGTH,
        header::ACCEPT_ENCODING,
    ]
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the client's `x-request-id` when it sent one that is 1 to 128 visible
/// ASCII characters, else one made here (`gw-` and 24 hex digits, unique in the process).
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(sent) = headers.get(&X_REQUEST_ID) {
        let bytes = sent.as_bytes();
        if (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return sent.clone();
        }
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 40)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // `gw-`, then `start` in 16 hex digits and `n` in 8, written by hand (`format!` took
    // about 1,000 instructions a request here).
    let mut id = *b"gw-000000000000000000000000";
    let digits = (u128::from(start) << 32) | u128::from(n as u32);
    for (i, byte) in id[3..].iter_mut().rev().enumerate() {
        *byte = b"0123456789abcdef"[((digits >> (4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a header value")
}

/// `POST|GET|… /openai/v1/*`: buffers the body, forwards it through the layer and streams the
/// answer back.
async fn forward(State(gw): State<Served>, req: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    // Kept or made, sent upstream, given back, and in the log line.
    let id = request_id(&parts.headers);
    parts.headers.insert(X_REQUEST_ID, id.clone());
    // The path as the client sent it, the route's prefix included (a cheap clone: the URI's
    // bytes are shared).
    let uri = parts.uri.clone();
    let method = parts.method.clone();
    let mut response = forward_parts(&gw, parts, body).await;
    let upstream_id = response.headers().get(&X_REQUEST_ID).cloned();
    if upstream_id.is_none() {
        response.headers_mut().insert(X_REQUEST_ID, id.clone());
    }
    // Logged when the head is back; a stream may go on for a while after. The path is
    // logged, the query not: it may hold anything.
    tracing::info!(
        request_id = id.to_str().unwrap_or("?"),
        upstream_request_id = upstream_id.as_ref().and_then(|v| v.to_str().ok()),
        method = method.as_str(),
        path = uri.path(),
        status = response.status().as_u16(),
        head_ms = started.elapsed().as_millis() as u64,
        "forwarded"
    );
    response
}

/// The forwarding itself: the body read (bounded in size and time), the upstream request
/// made, sent through the layer, and its answer as the client gets it.
async fn forward_parts(gw: &Served, mut parts: http::request::Parts, body: Body) -> Response {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > gw.body_cap as u64) {
        return too_large(gw.body_cap);
    }
    // The whole body within the time allowed: a client that declares a body and sends it
    // slowly, or not at all, holds a connection and a task for no longer than that.
    let read = tokio::time::timeout(gw.body_timeout, Limited::new(body, gw.body_cap).collect());
    let body = match read.await {
        Err(_elapsed) => return request_timeout(gw.body_timeout),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(gw.body_cap)
        }
        Ok(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "The request body could not be read.",
                "invalid_request_error",
                "body_read_error",
            )
        }
    };

    // What follows the route's prefix: its route matched the path, so the path starts so.
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let rest = path_and_query.get(gw.prefix.len()..).unwrap_or("/");
    let Ok(uri) = upstream_uri(&gw.upstream, rest) else {
        return error(
            StatusCode::BAD_REQUEST,
            "The request path cannot be forwarded.",
            "invalid_request_error",
            "invalid_path",
        );
    };
    let mut upstream_req = http::Request::new(Full::new(body.clone()));
    // The request's model is its rate-limit bucket, and its `max_tokens` and length its
    // token cost: the pool passes over a key whose budget for that model cannot take it.
    tower_key_fallback::annotate_openai_json(&mut upstream_req, &body);
    *upstream_req.method_mut() = parts.method.clone();
    *upstream_req.uri_mut() = uri;
    *upstream_req.version_mut() = Version::HTTP_11;
    // The client's own `Authorization` is copied like any header; the layer replaces it
    // with a key's.
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers, &request_headers_set_here());
    *upstream_req.headers_mut() = headers;

    let response = match gw.service.clone().oneshot(upstream_req).await {
        Ok(res) => {
            let (mut head, body) = res.into_parts();
            strip_hop_by_hop(&mut head.headers, &[]);
            let mut out = Response::new(Body::new(body));
            *out.status_mut() = head.status;
            *out.headers_mut() = head.headers;
            out
        }
        Err(err) => match err.downcast::<Exhausted>() {
            Ok(exhausted) => no_key(&exhausted),
            Err(err) => bad_gateway(&*err),
        },
    };
    response
}

/// No key could serve: 429 with `Retry-After` (whole seconds, rounded up) when some key will
/// be usable again, 429 without it when every key is disabled, and 502 when no upstream
/// answer was received at all, only transport errors (the upstream is down or unreachable).
fn no_key(exhausted: &Exhausted) -> Response {
    if exhausted.last_status().is_none() {
        if let Some(source) = std::error::Error::source(exhausted) {
            return bad_gateway(source);
        }
    }
    match exhausted.retry_after() {
        Some(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut res = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "All API keys are rate limited or unavailable. Retry after {secs} seconds."
                ),
                "rate_limit_error",
                "keys_exhausted",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            res
        }
        None => error(
            StatusCode::TOO_MANY_REQUESTS,
            "All API keys are disabled. Reset them with POST /keys/reset once they are fixed.",
            "rate_limit_error",
            "keys_exhausted",
        ),
    }
}

/// The upstream could not be reached: 502, with the error's chain (which never holds a key).
fn bad_gateway(err: &(dyn std::error::Error + 'static)) -> Response {
    let mut message = format!("The upstream API could not be reached: {err}");
    let mut source = err.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    tracing::warn!(error = %message, "upstream unreachable");
    error(
        StatusCode::BAD_GATEWAY,
        &message,
        "api_error",
        "upstream_unreachable",
    )
}

/// The body did not arrive in time: 408, and the connection is closed (what is left of the
/// body is never read).
fn request_timeout(limit: Duration) -> Response {
    let mut res = error(
        StatusCode::REQUEST_TIMEOUT,
        &format!(
            "The request body did not arrive within {limit:?} (the gateway's --body-timeout)."
        ),
        "invalid_request_error",
        "request_timeout",
    );
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

fn too_large(cap: usize) -> Response {
    let mut res = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("The request body is larger than the gateway's limit of {cap} bytes."),
        "invalid_request_error",
        "request_too_large",
    );
    // The rest of the body is not read, so the connection is closed after this answer: say
    // so, or a client may send its next request on it as it closes (and get no answer).
    res.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// An error in the OpenAI shape: `{"error":{"message":…,"type":…,"code":…}}`.
fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    // A JSON string value prints quoted and escaped.
    let message = serde_json::Value::from(message);
    let body = format!(r#"{{"error":{{"message":{message},"type":"{kind}","code":"{code}"}}}}"#);
    json(status, body.into_bytes())
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Every route's status: the pool's status itself for the one route of the command line,
/// `{"routes":{"groq":…,"openai":…}}` for the routes of a configuration file.
fn status(gw: &Gateway) -> Response {
    // `Serialize` comes with the crate's feature `serde`.
    let body = match &*gw.routes {
        [one] if one.name.is_none() => {
            let status: PoolStatus = one.handle.status();
            serde_json::to_vec(&status)
        }
        routes => {
            let by_name: serde_json::Map<String, serde_json::Value> = routes
                .iter()
                .map(|r| {
                    let status = serde_json::to_value(r.handle.status()).expect("serializes");
                    (r.name.clone().unwrap_or_default(), status)
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({ "routes": by_name }))
        }
    };
    json(StatusCode::OK, body.expect("a status serializes"))
}

/// The observer whose metrics `GET /metrics` serves, one per route for the process (`pool`
/// labels the route's, none the command line's): give it to the route's layer, beside
/// `TracingEvents`. The first call installs the gateway's recorder as the process' `metrics`
/// recorder.
pub fn metrics_events(pool: Option<&str>) -> tower_key_fallback::MetricsEvents {
    type Observers = std::collections::HashMap<Option<String>, tower_key_fallback::MetricsEvents>;
    static EVENTS: std::sync::OnceLock<std::sync::Mutex<Observers>> = std::sync::OnceLock::new();
    let observers = EVENTS.get_or_init(|| {
        if !prometheus::install() {
            tracing::warn!("another metrics recorder is installed; GET /metrics shows none");
        }
        std::sync::Mutex::default()
    });
    let mut observers = observers.lock().unwrap_or_else(|e| e.into_inner());
    observers
        .entry(pool.map(str::to_owned))
        .or_insert_with(|| match pool {
            Some(name) => tower_key_fallback::MetricsEvents::new().pool(name),
            None => tower_key_fallback::MetricsEvents::new(),
        })
        .clone()
}

/// `GET /metrics`: every metric in Prometheus' text format, each key's state as it is now.
async fn metrics(State(gw): State<Gateway>) -> Response {
    for route in gw.routes.iter() {
        route.metrics.record_status(&route.handle.status());
    }
    let mut res = Response::new(Body::from(prometheus::render()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus::CONTENT_TYPE),
    );
    res
}

/// The status page (`GET /`): its HTML, script and style, made for `GET /keys` and
/// `GET /keys/switches`, which it reads with the admin token typed into it (none needed on
/// loopback without one). It holds no data itself.
const PAGE: &str = include_str!("page/index.html");
const PAGE_SCRIPT: &str = include_str!("page/status.js");
const PAGE_STYLE: &str = include_str!("page/status.css");

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut res = Response::new(Body::from(body));
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Its own script and style only, and no framing by other sites.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

async fn page() -> Response {
    static_file("text/html; charset=utf-8", PAGE)
}

async fn page_script() -> Response {
    static_file("text/javascript; charset=utf-8", PAGE_SCRIPT)
}

async fn page_style() -> Response {
    static_file("text/css; charset=utf-8", PAGE_STYLE)
}

/// One switch from a key to the next, for the status page.
#[derive(Debug, Clone)]
struct Switch {
    at_ms: u64,
    route: Option<Arc<str>>,
    from: String,
    to: String,
    reason: &'static str,
}

/// The last switches of every route (at most [`SWITCHES_KEPT`]), kept by an observer each
/// route's layer has.
#[derive(Clone)]
pub struct SwitchLog {
    route: Option<Arc<str>>,
}

const SWITCHES_KEPT: usize = 50;

fn switches_kept() -> &'static std::sync::Mutex<std::collections::VecDeque<Switch>> {
    static KEPT: std::sync::OnceLock<std::sync::Mutex<std::collections::VecDeque<Switch>>> =
        std::sync::OnceLock::new();
    KEPT.get_or_init(Default::default)
}

impl SwitchLog {
    /// The observer for the route `route` (`None`: the command line's one).
    pub fn new(route: Option<&str>) -> SwitchLog {
        SwitchLog {
            route: route.map(Arc::from),
        }
    }
}

impl tower_key_fallback::KeyEvents for SwitchLog {
    fn on_event(&self, event: &tower_key_fallback::KeyEvent<'_>) {
        if let tower_key_fallback::KeyEvent::Switched { from, to, reason } = event {
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut kept = switches_kept().lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() == SWITCHES_KEPT {
                kept.pop_back();
            }
            kept.push_front(Switch {
                at_ms,
                route: self.route.clone(),
                from: (*from).to_owned(),
                to: (*to).to_owned(),
                reason,
            });
        }
    }
}

/// `GET /keys/switches`: the last switches, newest first.
async fn switches() -> Response {
    let kept = switches_kept().lock().unwrap_or_else(|e| e.into_inner());
    let list: Vec<serde_json::Value> = kept
        .iter()
        .map(|s| {
            serde_json::json!({
                "at_ms": s.at_ms,
                "route": s.route.as_deref(),
                "from": s.from,
                "to": s.to,
                "reason": s.reason,
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "switches": list }));
    json(StatusCode::OK, body.expect("JSON"))
}

/// `GET /healthz`: the process answers.
async fn healthz() -> Response {
    json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// `GET /readyz`: at least one key of every route can serve now (`200`), or some route has
/// none (`503`).
async fn readyz(State(gw): State<Gateway>) -> Response {
    let usable: Vec<(Option<&str>, usize)> = gw
        .routes
        .iter()
        .map(|r| (r.name.as_deref(), r.handle.status().available()))
        .collect();
    let ready = usable.iter().all(|(_, n)| *n > 0);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = if ready { "ready" } else { "not_ready" };
    let body = match usable.as_slice() {
        [(None, n)] => format!(r#"{{"status":"{word}","usable_keys":{n}}}"#),
        routes => {
            let each: Vec<String> = routes
                .iter()
                .map(|(name, n)| format!(r#""{}":{n}"#, name.unwrap_or("")))
                .collect();
            format!(
                r#"{{"status":"{word}","usable_keys":{{{}}}}}"#,
                each.join(",")
            )
        }
    };
    json(status, body.into_bytes())
}

/// `GET /keys`.
async fn keys(State(gw): State<Gateway>) -> Response {
    status(&gw)
}

/// `POST /keys/reset`: every key of every route.
async fn reset_all(State(gw): State<Gateway>) -> Response {
    for route in gw.routes.iter() {
        route.handle.reset_all();
    }
    status(&gw)
}

/// `POST /keys/{label}/reset`: the key of that label, whichever route has it.
async fn reset_one(State(gw): State<Gateway>, Path(label): Path<String>) -> Response {
    // Every route that has the label (each one tried, not only up to the first).
    let mut reset = false;
    for route in gw.routes.iter() {
        reset |= route.handle.reset(&label).is_ok();
    }
    if reset {
        status(&gw)
    } else {
        // What was asked is not echoed: it might be a key pasted by mistake.
        error(
            StatusCode::NOT_FOUND,
            "No key has this label; GET /keys lists them.",
            "invalid_request_error",
            "unknown_key",
        )
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Unknown path. The gateway serves its routes (/openai/v1/* by default), GET / (the status page), GET /keys, GET /keys/switches, POST /keys/reset, POST /keys/{label}/reset, GET /metrics, GET /healthz and GET /readyz.",
        "invalid_request_error",
        "unknown_url",
    )
}

/// The command line, with the environment as fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to forward; `None` with `--fake`.
    pub upstream: Option<Uri>,
    /// The keys' variable prefix.
    pub keys_env: String,
    /// The largest request body accepted.
    pub max_body: usize,
    /// Serve the fake provider on loopback and forward to it.
    pub fake: bool,
    /// The hosts served besides localhost and loopback addresses (the listen address is
    /// added when the gateway starts).
    pub allowed_hosts: AllowedHosts,
    /// Serve browser requests marked `Sec-Fetch-Site: same-site`.
    pub allow_same_site: bool,
    /// The variable the admin token was looked for in.
    pub admin_token_env: String,
    /// The token from that variable, or loopback clients only.
    pub admin: Admin,
    /// How long a request head may take.
    pub header_timeout: Duration,
    /// How long a request body may take.
    pub body_timeout: Duration,
    /// The Redis URL through which the keys' state is shared (it may hold a password: never
    /// printed).
    pub redis: Option<String>,
    /// The keys' namespace in Redis.
    pub redis_namespace: String,
    /// Roots trusted for an `https://` upstream besides the bundled ones (`UPSTREAM_CA_FILE`).
    pub upstream_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The variable the client tokens were looked for in.
    pub client_tokens_env: String,
    /// Who may use `/openai/v1/*`.
    pub clients: Clients,
    /// How the logs on stderr are written.
    pub log_format: LogFormat,
    /// The least important log lines written (`off` writes none).
    pub log_level: tracing::level_filters::LevelFilter,
    /// The routes of the configuration file (`--config`), instead of the one route of
    /// `UPSTREAM_URL` and `--keys-env`.
    pub file: Option<FileConfig>,
    /// The threads serving requests: 1 runs everything on one thread (tokio's current-thread
    /// runtime), more run tokio's multi-thread runtime with that many workers.
    pub threads: usize,
}

/// How the logs on stderr are written (`--log-format`, `GATEWAY_LOG_FORMAT`); either way in
/// batches ([`logs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

impl LogFormat {
    fn parse(source: &str, value: &str) -> Result<LogFormat, String> {
        match value.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{source}: expected text or json")),
        }
    }
}

impl Config {
    /// What [`app`] and [`serve`] are given.
    pub fn settings(&self) -> Settings {
        Settings {
            max_body: self.max_body,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            allowed_hosts: self.allowed_hosts.clone(),
            allow_same_site: self.allow_same_site,
            admin: self.admin.clone(),
            clients: self.clients.clone(),
            upstream_roots: self.upstream_roots.clone(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the gateway (boxed: a configuration is much larger than `Help`).
    Run(Box<Config>),
    /// Print the usage.
    Help,
}

/// The usage, for `--help` and errors.
pub const USAGE: &str = "\
usage: key-fallback-gateway [options]

Forwards /openai/v1/* to the upstream with key fallback; GET /keys shows the keys,
POST /keys/reset resets them.

  --upstream URL          where to forward (UPSTREAM_URL, default https://api.groq.com)
  UPSTREAM_CA_FILE        PEM roots trusted for an https upstream besides the bundled ones
  --listen ADDR           where to listen (GATEWAY_LISTEN, default 127.0.0.1:8080)
  --keys-env PREFIX       read keys from PREFIX, PREFIX_2, ... (default GROQ_API_KEY)
  --max-body BYTES        the largest request body accepted (default 8388608)
  --allowed-host NAME     also serve requests for this Host (name or name:port; repeatable;
                          replaces GATEWAY_ALLOWED_HOSTS, comma-separated). localhost,
                          loopback addresses and the listen address are always served
  --allow-same-site       serve browser requests marked Sec-Fetch-Site: same-site
                          (GATEWAY_ALLOW_SAME_SITE=1)
  --admin-token-env NAME  the variable with the token for /keys (default GATEWAY_ADMIN_TOKEN);
                          without a token, /keys answers loopback clients only
  --config FILE           the routes from a TOML file (GATEWAY_CONFIG) instead of --upstream
                          and --keys-env: [routes.groq] provider = \"groq\", and per route
                          path, keys_env, upstream, max_attempts, round_robin,
                          wait_for_key, groups
  --log-format FORMAT     text (the default) or json: one JSON object per line
                          (GATEWAY_LOG_FORMAT)
  --log-level LEVEL       off, error, warn, info (the default: a line per request) or debug
                          (GATEWAY_LOG_LEVEL)
  --client-tokens-env NAME
                          the variable with the clients' tokens, comma-separated (default
                          GATEWAY_CLIENT_TOKENS); without one, /openai/v1/* answers loopback
                          clients only
  --header-timeout TIME   how long a request head may take (GATEWAY_HEADER_TIMEOUT, default 10s)
  --body-timeout TIME     how long a request body may take (GATEWAY_BODY_TIMEOUT, default 30s)
  --fake                  forward to a fake Groq API on loopback with its own keys (no key needed)
  --redis URL             share the keys' state with the other gateways on this Redis
                          (REDIS_URL), e.g. redis://127.0.0.1:6379/ (crate feature redis)
  --redis-namespace NAME  the keys' namespace in Redis (GATEWAY_REDIS_NAMESPACE, default gateway)
  --threads N             threads serving requests (GATEWAY_THREADS, default 1: the least CPU
                          per request; more spread the work over more cores)

A TIME is a whole number of ms, s or m, e.g. 250ms, 10s, 2m; a bare number is seconds.";

/// `250ms`, `10s`, `2m`, or `10` (seconds): a positive duration, for `what` in the error.
fn parse_duration(what: &str, value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let invalid = || format!("{what} {value:?} is not a positive duration such as 10s or 250ms");
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, "s"),
    };
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(invalid)?),
        _ => return Err(invalid()),
    };
    if duration.is_zero() {
        return Err(invalid());
    }
    Ok(duration)
}

/// `1`, `true`, `yes` or `on`; `0`, `false`, `no`, `off` or empty.
fn parse_flag(what: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{what} {value:?} is neither 1 nor 0")),
    }
}

impl Command {
    /// Reads the arguments (without the program name), and `env` for what they leave out.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, String> {
        let mut listen = env("GATEWAY_LISTEN");
        let mut upstream = env("UPSTREAM_URL").filter(|u| !u.trim().is_empty());
        let mut keys_env = None;
        let mut max_body = None;
        let mut fake = false;
        let mut hosts_flagged: Vec<String> = Vec::new();
        let mut allow_same_site = match env("GATEWAY_ALLOW_SAME_SITE") {
            Some(v) => parse_flag("GATEWAY_ALLOW_SAME_SITE", &v)?,
            None => false,
        };
        let mut admin_token_env = None;
        let mut client_tokens_env = None;
        let mut config_file = env("GATEWAY_CONFIG").filter(|f| !f.trim().is_empty());
        let log_level_of = |source: &str, value: &str| {
            use tracing::level_filters::LevelFilter;
            match value.trim() {
                "off" => Ok(LevelFilter::OFF),
                "error" => Ok(LevelFilter::ERROR),
                "warn" => Ok(LevelFilter::WARN),
                "info" => Ok(LevelFilter::INFO),
                "debug" => Ok(LevelFilter::DEBUG),
                _ => Err(format!(
                    "{source}: expected off, error, warn, info or debug"
                )),
            }
        };
        let mut log_level = match env("GATEWAY_LOG_LEVEL") {
            Some(v) => log_level_of("GATEWAY_LOG_LEVEL", &v)?,
            None => tracing::level_filters::LevelFilter::INFO,
        };
        let mut log_format = match env("GATEWAY_LOG_FORMAT") {
            Some(v) => LogFormat::parse("GATEWAY_LOG_FORMAT", &v)?,
            None => LogFormat::Text,
        };
        let mut header_timeout = env("GATEWAY_HEADER_TIMEOUT")
            .map(|v| ("GATEWAY_HEADER_TIMEOUT", v))
            .filter(|(_, v)| !v.trim().is_empty());
        let mut body_timeout = env("GATEWAY_BODY_TIMEOUT")
            .map(|v| ("GATEWAY_BODY_TIMEOUT", v))
            .filter(|(_, v)| !v.trim().is_empty());
        let mut redis = env("REDIS_URL").filter(|u| !u.trim().is_empty());
        let mut redis_namespace = env("GATEWAY_REDIS_NAMESPACE").filter(|u| !u.trim().is_empty());
        let mut threads = env("GATEWAY_THREADS")
            .map(|v| ("GATEWAY_THREADS", v))
            .filter(|(_, v)| !v.trim().is_empty());
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |what: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs {what}"))
            };
            match name.as_str() {
                "--help" | "-h" => return Ok(Command::Help),
                "--listen" => listen = Some(value("an address such as 127.0.0.1:8080")?),
                "--upstream" => upstream = Some(value("a URL such as https://api.groq.com")?),
                "--keys-env" => keys_env = Some(value("a variable name such as GROQ_API_KEY")?),
                "--max-body" => max_body = Some(value("a number of bytes")?),
                "--allowed-host" => {
                    hosts_flagged.push(value("a host name such as gateway.example.com")?)
                }
                "--allow-same-site" => allow_same_site = true,
                "--admin-token-env" => {
                    admin_token_env = Some(value("a variable name such as GATEWAY_ADMIN_TOKEN")?)
                }
                "--config" => config_file = Some(value("a file such as gateway.toml")?),
                "--log-level" => {
                    log_level = log_level_of("--log-level", &value("a level such as warn")?)?
                }
                "--log-format" => {
                    log_format = LogFormat::parse("--log-format", &value("text or json")?)?
                }
                "--client-tokens-env" => {
                    client_tokens_env =
                        Some(value("a variable name such as GATEWAY_CLIENT_TOKENS")?)
                }
                "--header-timeout" => {
                    header_timeout = Some(("--header-timeout", value("a time such as 10s")?))
                }
                "--body-timeout" => {
                    body_timeout = Some(("--body-timeout", value("a time such as 30s")?))
                }
                "--fake" => fake = true,
                "--threads" => threads = Some(("--threads", value("a number such as 2")?)),
                "--redis" => redis = Some(value("a URL such as redis://127.0.0.1:6379/")?),
                "--redis-namespace" => {
                    redis_namespace = Some(value("a name such as groq")?);
                }
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        let mut listen_from: Option<String> = None;
        let file = match &config_file {
            Some(path) => {
                if fake || upstream.is_some() || keys_env.is_some() {
                    return Err(format!(
                        "--config {path}: the routes are in the file; leave out --fake, \
                         --upstream (UPSTREAM_URL) and --keys-env"
                    ));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--config {path}: cannot read it: {e}"))?;
                let file = config::parse(path, &text)?;
                // The file's `listen` unless --listen or GATEWAY_LISTEN said.
                if listen.is_none() {
                    if let Some((at, addr)) = &file.listen {
                        listen = Some(addr.clone());
                        listen_from = Some(at.clone());
                    }
                }
                Some(file)
            }
            None => None,
        };
        let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen.parse().map_err(|_| match &listen_from {
            Some(at) => format!("{at}: listen is not an IP:port (like 127.0.0.1:8080)"),
            None => format!("the listen address {listen:?} is not an IP:port"),
        })?;
        let max_body = match max_body {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("--max-body {n:?} is not a positive number of bytes"))?,
            None => DEFAULT_MAX_BODY,
        };
        // The flags replace the variable; either way, empty entries are skipped.
        let hosts: Vec<String> = if hosts_flagged.is_empty() {
            env("GATEWAY_ALLOWED_HOSTS")
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect()
        } else {
            hosts_flagged
        };
        let mut allowed_hosts = AllowedHosts::loopback();
        for host in hosts.iter().filter(|h| !h.trim().is_empty()) {
            allowed_hosts.allow(host)?;
        }
        let timeout = |given: Option<(&str, String)>, default| match given {
            Some((what, value)) => parse_duration(what, &value),
            None => Ok(default),
        };
        let header_timeout = timeout(header_timeout, DEFAULT_HEADER_TIMEOUT)?;
        let threads = match threads {
            Some((what, n)) => n
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| format!("{what} {n:?} is not a number of threads from 1 to 1024"))?,
            None => 1,
        };
        let body_timeout = timeout(body_timeout, DEFAULT_BODY_TIMEOUT)?;
        // The token is read here, from the variable named; errors name the variable, never
        // its value.
        let named = admin_token_env.is_some();
        let admin_token_env = admin_token_env.unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.to_owned());
        let admin = match env(&admin_token_env) {
            Some(value) => Admin::Token(
                AdminToken::new(&value).map_err(|e| format!("{admin_token_env}: {e}"))?,
            ),
            None if named => {
                return Err(format!(
                    "--admin-token-env {admin_token_env}: {admin_token_env} is not set"
                ))
            }
            None => Admin::LoopbackOnly,
        };
        let named = client_tokens_env.is_some();
        let client_tokens_env =
            client_tokens_env.unwrap_or_else(|| DEFAULT_CLIENT_TOKENS_ENV.to_owned());
        let clients = match env(&client_tokens_env) {
            Some(list) => Clients::from_list(&client_tokens_env, &list)?,
            None if named => {
                return Err(format!(
                    "--client-tokens-env {client_tokens_env}: {client_tokens_env} is not set"
                ))
            }
            None => Clients::LoopbackOnly,
        };
        let upstream = match (fake, upstream) {
            (true, _) => None,
            _ if file.is_some() => None,
            (false, Some(url)) => Some(parse_upstream(&url)?),
            (false, None) => Some(parse_upstream(DEFAULT_UPSTREAM)?),
        };
        Ok(Command::Run(Box::new(Config {
            listen,
            upstream,
            keys_env: keys_env.unwrap_or_else(|| DEFAULT_KEYS_ENV.to_owned()),
            max_body,
            fake,
            allowed_hosts,
            allow_same_site,
            admin_token_env,
            admin,
            header_timeout,
            body_timeout,
            redis,
            redis_namespace: redis_namespace.unwrap_or_else(|| "gateway".to_owned()),
            upstream_roots: match env("UPSTREAM_CA_FILE").filter(|f| !f.trim().is_empty()) {
                Some(path) => read_roots(path.trim())?,
                None => Vec::new(),
            },
            client_tokens_env,
            clients,
            log_format,
            log_level,
            file,
            threads,
        })))
    }
}

fn main() -> ExitCode {
    let config = match Command::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Run(config)) => *config,
        // Written without `println!`, which panics when the reader has gone (`| head`).
        Ok(Command::Help) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "gateway: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let batched = logs::BatchedLog::stderr();
    let logs = tracing_subscriber::fmt()
        .with_writer(batched.clone())
        .with_max_level(config.log_level);
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = writeln!(
                std::io::stderr(),
                "gateway: cannot start the runtime: {err}"
            );
            return ExitCode::from(1);
        }
    };
    // On the multi-thread runtime the gateway runs as a task, so that its accept loop runs
    // on a worker too, not on this thread alone.
    let ran = runtime.block_on(async {
        match tokio::spawn(run(config)).await {
            Ok(ran) => ran,
            Err(panicked) => Err(format!("the gateway stopped: {panicked}").into()),
        }
    });
    // The tasks still running (connections past the grace, their logging) end with the
    // runtime; then the last log lines are written.
    runtime.shutdown_timeout(Duration::from_secs(1));
    batched.flush();
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "gateway: {err}");
            ExitCode::from(1)
        }
    }
}

/// Shares the keys' state through Redis: what one gateway learns, the others given the same
/// URL and namespace know within milliseconds. Unreachable Redis is no error (the store warns
/// and keeps trying); a bad URL is, named without its value.
#[cfg(feature = "redis")]
async fn shared_state(
    builder: KeyFallbackBuilder,
    url: &str,
    namespace: &str,
) -> Result<KeyFallbackBuilder, BoxError> {
    let store = tower_key_fallback::RedisStore::connect(url, namespace)
        .await
        .map_err(|e| format!("REDIS_URL / --redis: {e}"))?;
    let _ = writeln!(
        std::io::stdout(),
        "gateway: sharing key state through Redis, namespace {namespace}"
    );
    Ok(builder.shared_state(store))
}

#[cfg(not(feature = "redis"))]
async fn shared_state(
    _: KeyFallbackBuilder,
    _: &str,
    _: &str,
) -> Result<KeyFallbackBuilder, BoxError> {
    Err(
        "REDIS_URL / --redis: this gateway was built without the crate feature `redis`; \
         build it with `cargo install --path . --features gateway,redis`"
            .into(),
    )
}

/// Starts the gateway and serves until the process is stopped.
/// The routes of a configuration file, each with its pool, and a line for the banner each.
async fn file_routes(
    file: &FileConfig,
    config: &Config,
) -> Result<(Vec<Route>, Vec<String>), BoxError> {
    let mut routes = Vec::new();
    let mut lines = Vec::new();
    for r in &file.routes {
        let at = |e: &dyn fmt::Display| format!("{}: route {}: {e}", r.at, r.name);
        // The error names the variable, never its value.
        let keys = KeySet::from_env(&r.keys_env).map_err(|e| at(&e))?;
        let labels: Vec<String> = keys.labels().map(str::to_owned).collect();
        let mut builder = KeyFallbackLayer::builder(keys).provider(r.provider());
        if let Some(n) = r.max_attempts {
            builder = builder.max_attempts(n);
        }
        if r.round_robin {
            builder = builder.round_robin();
        }
        if let Some(wait) = r.wait_for_key {
            builder = builder.wait_for_key(wait);
        }
        for group in &r.groups {
            builder = builder.group(group.iter().cloned());
        }
        let builder = builder.events((
            tower_key_fallback::TracingEvents,
            (metrics_events(Some(&r.name)), SwitchLog::new(Some(&r.name))),
        ));
        let builder = match &config.redis {
            None => builder,
            Some(url) => {
                let namespace = format!("{}.{}", config.redis_namespace, r.name);
                shared_state(builder, url, &namespace).await?
            }
        };
        // What is named is not shown: a key pasted into `groups` stays unseen.
        let layer = builder.try_build().map_err(|_| {
            at(&format!(
                "groups names a label that is not one of the route's keys ({})",
                labels.join(", ")
            ))
        })?;
        let upstream = parse_upstream(&r.upstream).map_err(|_| at(&"upstream is not a URL"))?;
        lines.push(format!(
            "gateway: route {} ({}): {}/* to {} with {} keys: {}",
            r.name,
            r.provider,
            r.path,
            r.upstream,
            labels.len(),
            labels.join(", ")
        ));
        routes.push(Route {
            name: Some(r.name.clone()),
            prefix: r.path.clone(),
            upstream,
            layer,
        });
    }
    Ok((routes, lines))
}

async fn run(config: Config) -> Result<(), BoxError> {
    if let Some(file) = &config.file {
        let (routes, lines) = file_routes(file, &config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let mut settings = config.settings();
        settings.allowed_hosts.allow_listen_addr(addr);
        let app = app_routes(routes, &settings);
        let mut out = std::io::stdout();
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        return announce_and_serve(&config, &settings, listener, app).await;
    }
    // With --fake, a fake Groq API on loopback: key 1 allows 3 requests per 20 s, key 2 all.
    let mut _fake_server = None;
    let (upstream, keys) = match &config.upstream {
        Some(upstream) => {
            // The error names the variable, never its value.
            (upstream.clone(), KeySet::from_env(&config.keys_env)?)
        }
        None => {
            use tower_key_fallback::testing::{Behavior, FakeProvider};
            let provider = FakeProvider::builder()
                .key(
                    "gsk_fake_first",
                    Behavior::RateLimited {
                        requests: 3,
                        window: Duration::from_secs(20),
                    },
                )
                .key("gsk_fake_second", Behavior::Ok)
                .build();
            let server = provider.serve_ephemeral().await?;
            let upstream = parse_upstream(&server.url(""))?;
            _fake_server = Some(server);
            (upstream, KeySet::new(provider.keys())?)
        }
    };
    let labels: Vec<String> = keys.labels().map(str::to_owned).collect();
    let builder = KeyFallbackLayer::builder(keys);
    let builder = builder.events((
        tower_key_fallback::TracingEvents,
        (metrics_events(None), SwitchLog::new(None)),
    ));
    let builder = match &config.redis {
        None => builder,
        Some(url) => shared_state(builder, url, &config.redis_namespace).await?,
    };
    let layer = builder.build();

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut settings = config.settings();
    settings.allowed_hosts.allow_listen_addr(addr);
    let app = app(upstream.clone(), layer, &settings);

    let what = if config.fake {
        " (the fake Groq API)"
    } else {
        ""
    };
    // Errors are ignored: the gateway keeps serving if nobody reads its output.
    let _ = writeln!(
        std::io::stdout(),
        "gateway: forwarding /openai/v1/* to {}{what} with {} keys: {}",
        upstream.to_string().trim_end_matches('/'),
        labels.len(),
        labels.join(", ")
    );
    announce_and_serve(&config, &settings, listener, app).await
}

/// Says what is served, to whom, then serves until stopped.
async fn announce_and_serve(
    config: &Config,
    settings: &Settings,
    listener: TcpListener,
    app: Router,
) -> Result<(), BoxError> {
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout();
    if !addr.ip().is_loopback() {
        let _ = writeln!(
            out,
            "gateway: warning: {addr} is not loopback; anyone who reaches it spends your keys"
        );
    }
    if addr.ip().is_unspecified() {
        let _ = writeln!(
            out,
            "gateway: note: {addr} names no host; clients from elsewhere must use a name or \
             address given with --allowed-host"
        );
    }
    let _ = writeln!(
        out,
        "gateway: serving Host: {} (others get 421; --allowed-host adds one)",
        settings.allowed_hosts.describe()
    );
    // Which admin mode is in force; the token itself is never printed.
    let admin = match &settings.admin {
        Admin::Token(_) => format!(
            "need Authorization: Bearer with the token in {}",
            config.admin_token_env
        ),
        Admin::LoopbackOnly => format!(
            "loopback clients only ({} is not set)",
            config.admin_token_env
        ),
    };
    let _ = writeln!(out, "gateway: admin endpoints /keys: {admin}");
    // Who may spend the keys; the tokens themselves are never printed.
    let clients = match &settings.clients {
        Clients::Tokens(tokens) => format!(
            "need Authorization: Bearer with one of the {} tokens in {}",
            tokens.len(),
            config.client_tokens_env
        ),
        Clients::LoopbackOnly => format!(
            "loopback clients only ({} is not set)",
            config.client_tokens_env
        ),
    };
    let _ = writeln!(out, "gateway: clients of /openai/v1/*: {clients}");
    let _ = writeln!(
        out,
        "gateway: listening on http://{addr} (keys: GET /keys, POST /keys/reset)"
    );
    serve(listener, app, settings, stop_signal()).await?;
    let _ = writeln!(std::io::stdout(), "gateway: stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C: from then on no connection is accepted, and answers under way (streams
/// included) get up to 30 seconds to finish ([`serve`]).
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    let _ = writeln!(
        std::io::stdout(),
        "gateway: stopping: no new connections; answers under way get up to {} s",
        SHUTDOWN_GRACE.as_secs()
    );
}
