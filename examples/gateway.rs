//! `cargo run --example gateway`: an OpenAI-compatible gateway with key fallback.
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
//! --upstream URL     where to forward (UPSTREAM_URL), e.g. http://127.0.0.1:9000
//! --listen ADDR      where to listen (GATEWAY_LISTEN, default 127.0.0.1:8080)
//! --keys-env PREFIX  the keys' variables: PREFIX, PREFIX_2, … (default GROQ_API_KEY)
//! --max-body BYTES   the largest request body accepted (default 8 MiB)
//! --fake             forward to the crate's fake Groq API on loopback, with its own keys:
//!                    no key and no network needed
//! ```
//!
//! The example speaks plain HTTP to the upstream: it uses hyper-util's `HttpConnector` so it
//! builds with no TLS stack. To reach `https://api.groq.com` build the client in
//! [`http_client`] with an HTTPS connector (hyper-rustls or hyper-tls), or put a local
//! TLS-originating proxy in between. An `https://` upstream is refused at startup.
//!
//! It listens on 127.0.0.1 by default: anyone who can reach the gateway can spend the keys.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;
use tower_key_fallback::{
    BoxError, Exhausted, KeyFallback, KeyFallbackLayer, KeyHandle, KeySet, PoolStatus,
};

/// The listen address unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The keys' variable prefix unless told otherwise.
pub const DEFAULT_KEYS_ENV: &str = "GROQ_API_KEY";
/// The largest request body accepted unless told otherwise: chat requests with images or
/// long contexts fit.
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
/// How long connecting to the upstream may take before the attempt counts as a transport
/// error (and the request moves on to the next key). There is no limit on the answer
/// itself: a long completion must not be cut and replayed on another key; the client's
/// own timeout bounds it, and dropping the client's request drops the upstream one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client the gateway forwards with: hyper-util's, plain HTTP/1.1.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// hyper-util's client over plain HTTP, with a connect timeout.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// What every request handler shares.
#[derive(Clone)]
struct Gateway {
    service: KeyFallback<HttpClient>,
    handle: KeyHandle,
    upstream: Uri,
    body_cap: usize,
}

/// The gateway's routes, forwarding to `upstream` (`http://host:port`, optionally with a path
/// prefix) through `layer`, with request bodies of at most `body_cap` bytes.
///
/// Build the layer without `exhausted_response`: the gateway answers
/// [`Exhausted`] itself, as a 429 with `Retry-After`, or as a 502 when the upstream could not
/// be reached at all.
///
/// # Panics
///
/// If `upstream` is not an `http://` URL with a host ([`parse_upstream`] checks one).
pub fn app(upstream: Uri, layer: KeyFallbackLayer, body_cap: usize) -> Router {
    assert!(
        upstream.scheme() == Some(&Scheme::HTTP) && upstream.authority().is_some(),
        "the upstream must be an http:// URL with a host, not {upstream}"
    );
    let handle = layer.handle();
    let gateway = Gateway {
        service: tower::Layer::layer(&layer, http_client()),
        handle,
        upstream,
        body_cap,
    };
    Router::new()
        .route("/openai/v1/{*rest}", any(forward))
        .route("/keys", get(keys))
        .route("/keys/reset", post(reset_all))
        .route("/keys/{label}/reset", post(reset_one))
        .fallback(not_found)
        .with_state(gateway)
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
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "UPSTREAM_URL {url:?} is https: this example speaks plain HTTP upstream (it has \
                 no TLS stack). Build `http_client()` with an HTTPS connector such as \
                 hyper-rustls, or forward through a local TLS-originating proxy"
            ))
        }
        _ => {
            return Err(format!(
                "UPSTREAM_URL {url:?} must start with http://, e.g. http://127.0.0.1:9000"
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(format!("UPSTREAM_URL {url:?} has no host"));
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
    let path = PathAndQuery::try_from(format!("{prefix}{path_and_query}"))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = upstream.scheme().cloned();
    parts.authority = upstream.authority().cloned();
    parts.path_and_query = Some(path);
    Ok(Uri::from_parts(parts)?)
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Copies `from` without hop-by-hop headers (and those `Connection` names), and without the
/// ones in `also`.
fn copy_headers(from: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        let n = name.as_str();
        if name == header::TRANSFER_ENCODING
            || HOP_BY_HOP.contains(&n)
            || named.iter().any(|t| t == n)
            || also.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
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

/// `POST|GET|… /openai/v1/*`: buffers the body, forwards it through the layer and streams the
/// answer back.
async fn forward(State(gw): State<Gateway>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    // The path is logged, the query not: it may hold anything.
    let path = parts.uri.path().to_owned();

    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > gw.body_cap as u64) {
        return too_large(gw.body_cap);
    }
    let body = match Limited::new(body, gw.body_cap).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(gw.body_cap)
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "The request body could not be read.",
                "invalid_request_error",
                "body_read_error",
            )
        }
    };

    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let Ok(uri) = upstream_uri(&gw.upstream, path_and_query) else {
        return error(
            StatusCode::BAD_REQUEST,
            "The request path cannot be forwarded.",
            "invalid_request_error",
            "invalid_path",
        );
    };
    let mut upstream_req = http::Request::new(Full::new(body));
    *upstream_req.method_mut() = parts.method.clone();
    *upstream_req.uri_mut() = uri;
    *upstream_req.version_mut() = Version::HTTP_11;
    // The client's own `Authorization` is copied like any header; the layer replaces it
    // with a key's.
    *upstream_req.headers_mut() = copy_headers(&parts.headers, &request_headers_set_here());

    let response = match gw.service.clone().oneshot(upstream_req).await {
        Ok(res) => {
            let (head, body) = res.into_parts();
            let mut out = Response::new(Body::new(body));
            *out.status_mut() = head.status;
            *out.headers_mut() = copy_headers(&head.headers, &[]);
            out
        }
        Err(err) => match err.downcast::<Exhausted>() {
            Ok(exhausted) => no_key(&exhausted),
            Err(err) => bad_gateway(&*err),
        },
    };
    // Logged when the head is back; a stream may go on for a while after.
    tracing::info!(
        method = %parts.method,
        path = %path,
        status = response.status().as_u16(),
        head_ms = started.elapsed().as_millis() as u64,
        "forwarded"
    );
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

fn too_large(cap: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("The request body is larger than the gateway's limit of {cap} bytes."),
        "invalid_request_error",
        "request_too_large",
    )
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

fn status(handle: &KeyHandle) -> Response {
    let status: PoolStatus = handle.status();
    // `Serialize` comes with the crate's feature `serde`.
    json(
        StatusCode::OK,
        serde_json::to_vec(&status).expect("a status serializes"),
    )
}

/// `GET /keys`.
async fn keys(State(gw): State<Gateway>) -> Response {
    status(&gw.handle)
}

/// `POST /keys/reset`.
async fn reset_all(State(gw): State<Gateway>) -> Response {
    gw.handle.reset_all();
    status(&gw.handle)
}

/// `POST /keys/{label}/reset`.
async fn reset_one(State(gw): State<Gateway>, Path(label): Path<String>) -> Response {
    match gw.handle.reset(&label) {
        Ok(()) => status(&gw.handle),
        // What was asked is not echoed: it might be a key pasted by mistake.
        Err(_) => error(
            StatusCode::NOT_FOUND,
            "No key has this label; GET /keys lists them.",
            "invalid_request_error",
            "unknown_key",
        ),
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Unknown path. The gateway serves /openai/v1/*, GET /keys, POST /keys/reset and POST /keys/{label}/reset.",
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
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the gateway.
    Run(Config),
    /// Print the usage.
    Help,
}

/// The usage, for `--help` and errors.
pub const USAGE: &str = "\
usage: cargo run --example gateway -- [options]

Forwards /openai/v1/* to the upstream with key fallback; GET /keys shows the keys,
POST /keys/reset resets them.

  --upstream URL     where to forward, plain http (UPSTREAM_URL), e.g. http://127.0.0.1:9000
  --listen ADDR      where to listen (GATEWAY_LISTEN, default 127.0.0.1:8080)
  --keys-env PREFIX  read keys from PREFIX, PREFIX_2, ... (default GROQ_API_KEY)
  --max-body BYTES   the largest request body accepted (default 8388608)
  --fake             forward to a fake Groq API on loopback with its own keys (no key needed)";

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
                "--upstream" => upstream = Some(value("a URL such as http://127.0.0.1:9000")?),
                "--keys-env" => keys_env = Some(value("a variable name such as GROQ_API_KEY")?),
                "--max-body" => max_body = Some(value("a number of bytes")?),
                "--fake" => fake = true,
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| format!("the listen address {listen:?} is not an IP:port"))?;
        let max_body = match max_body {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("--max-body {n:?} is not a positive number of bytes"))?,
            None => DEFAULT_MAX_BODY,
        };
        let upstream = match (fake, upstream) {
            (true, _) => None,
            (false, Some(url)) => Some(parse_upstream(&url)?),
            (false, None) => {
                return Err("no upstream: set UPSTREAM_URL (or pass --upstream), e.g. \
                            UPSTREAM_URL=http://127.0.0.1:9000, or try --fake"
                    .to_owned())
            }
        };
        Ok(Command::Run(Config {
            listen,
            upstream,
            keys_env: keys_env.unwrap_or_else(|| DEFAULT_KEYS_ENV.to_owned()),
            max_body,
            fake,
        }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Command::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Run(config)) => config,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "gateway: {err}");
            ExitCode::from(1)
        }
    }
}

/// Starts the gateway and serves until the process is stopped.
async fn run(config: Config) -> Result<(), BoxError> {
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
    let layer = KeyFallbackLayer::new(keys);
    let app = app(upstream.clone(), layer, config.max_body);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let what = if config.fake {
        " (the fake Groq API)"
    } else {
        ""
    };
    // Errors are ignored: the gateway keeps serving if nobody reads its output.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "gateway: forwarding /openai/v1/* to {}{what} with {} keys: {}",
        upstream.to_string().trim_end_matches('/'),
        labels.len(),
        labels.join(", ")
    );
    if !addr.ip().is_loopback() {
        let _ = writeln!(
            out,
            "gateway: warning: {addr} is not loopback; anyone who reaches it spends your keys"
        );
    }
    let _ = writeln!(
        out,
        "gateway: listening on http://{addr} (keys: GET /keys, POST /keys/reset)"
    );
    axum::serve(listener, app).await?;
    Ok(())
}
