//! The gateway's own endpoints: the status page (`/`, updating itself from `/keys` and
//! `/keys/switches`), `/keys` and its resets, `/metrics` (Prometheus), `/healthz`, `/readyz`,
//! and the answer to an unknown path.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use http::header::HeaderValue;
use http::{header, StatusCode};
use tower_key_fallback::PoolStatus;

use super::forward::{error, json};
use super::{prometheus, Gateway, LOG_TARGET};

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
            tracing::warn!(target: LOG_TARGET, "another metrics recorder is installed; GET /metrics shows none");
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
pub(crate) async fn metrics(State(gw): State<Gateway>) -> Response {
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

pub(crate) async fn page() -> Response {
    static_file("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn page_script() -> Response {
    static_file("text/javascript; charset=utf-8", PAGE_SCRIPT)
}

pub(crate) async fn page_style() -> Response {
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
pub(crate) async fn switches() -> Response {
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
pub(crate) async fn healthz() -> Response {
    json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// `GET /readyz`: at least one key of every route can serve now (`200`), or some route has
/// none (`503`).
pub(crate) async fn readyz(State(gw): State<Gateway>) -> Response {
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
pub(crate) async fn keys(State(gw): State<Gateway>) -> Response {
    status(&gw)
}

/// `POST /keys/reset`: every key of every route.
pub(crate) async fn reset_all(State(gw): State<Gateway>) -> Response {
    for route in gw.routes.iter() {
        route.handle.reset_all();
    }
    status(&gw)
}

/// `POST /keys/{label}/reset`: the key of that label, whichever route has it.
pub(crate) async fn reset_one(State(gw): State<Gateway>, Path(label): Path<String>) -> Response {
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

pub(crate) async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Unknown path. The gateway serves its routes (/openai/v1/* by default), GET / (the status page), GET /keys, GET /keys/switches, POST /keys/reset, POST /keys/{label}/reset, GET /metrics, GET /healthz and GET /readyz.",
        "invalid_request_error",
        "unknown_url",
    )
}
