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
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use http::uri::{Scheme, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_key_fallback::{
    BoxError, KeyFallback, KeyFallbackBuilder, KeyFallbackLayer, KeyHandle, KeySet,
};

// The gateway's parts, one file each (`#[path]`: `tests/gateway.rs` compiles this file as a
// module of its own).
// The command line and its environment.
#[path = "cli.rs"]
mod cli;
// `--config FILE`: the routes.
#[path = "config.rs"]
mod config;
// Who may ask what: the Host/Origin rules, client and admin tokens, path checks.
#[path = "guard.rs"]
mod guard;
// `/openai/v1/*`: the upstream URL, the headers, the request id, the forwarding itself.
#[path = "forward.rs"]
mod forward;
// The gateway's own endpoints: the status page, `/keys`, `/metrics`, health.
#[path = "admin.rs"]
mod admin;
// `GET /metrics`: a `metrics` recorder that writes Prometheus text.
#[path = "prometheus.rs"]
mod prometheus;
// Log lines written in batches.
#[path = "logs.rs"]
pub mod logs;

pub use admin::metrics_events;
pub use cli::{Command, Config, LogFormat};
pub use config::{parse as parse_config, FileConfig};
pub use forward::{parse_upstream, upstream_uri};
pub use guard::{unsafe_path, Admin, AdminToken, AllowedHosts, Clients};

use admin::{
    healthz, keys, not_found, page, page_script, page_style, readyz, reset_all, reset_one,
    switches, SwitchLog,
};
use cli::USAGE;
use guard::{check_request, Guard};

/// mimalloc rather than the system's allocator: a forwarded request allocates about seventy
/// times, and glibc's malloc and free were a fifth of the gateway's own instructions. Built
/// without transparent huge pages (`no_thp`), which doubled the memory an open stream holds
/// (68 KiB against glibc's 34 to 39; 42 KiB without them).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The target of the log lines written by the gateway's parts ([`forward`], [`guard`],
/// [`admin`]): the binary's own name, as when they were one file.
const LOG_TARGET: &str = "key_fallback_gateway";

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
/// [`Exhausted`](tower_key_fallback::Exhausted) itself, as a 429 with `Retry-After`, or as a 502 when the upstream could not
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
            any(forward::forward).with_state(served),
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
    let guard = Arc::new(Guard::new(settings));
    router
        .route("/keys", get(keys))
        .route("/keys/reset", post(reset_all))
        .route("/keys/{label}/reset", post(reset_one))
        .route("/metrics", get(admin::metrics))
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
        .with_timer(logs::LineTime)
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
