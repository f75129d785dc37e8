//! The forwarded routes (`/openai/v1/*` and a configuration file's): the upstream URL
//! ([`parse_upstream`], [`upstream_uri`]), the headers that are not forwarded, the request id,
//! the body read within its size and time limits, the request sent through the key pool, and
//! the JSON errors the gateway answers with itself.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{header, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::ServiceExt;
use tower_key_fallback::Exhausted;

use super::{Served, LOG_TARGET};

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
pub(crate) async fn forward(State(gw): State<Served>, req: Request) -> Response {
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
        target: LOG_TARGET,
        request_id = id.to_str().unwrap_or("?"),
        upstream_request_id = upstream_id.as_ref().and_then(|v| v.to_str().ok()),
        method = %method,
        path = %uri.path(),
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
    tracing::warn!(target: LOG_TARGET, error = %message, "upstream unreachable");
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
pub(crate) fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    // A JSON string value prints quoted and escaped.
    let message = serde_json::Value::from(message);
    let body = format!(r#"{{"error":{{"message":{message},"type":"{kind}","code":"{code}"}}}}"#);
    json(status, body.into_bytes())
}

pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
