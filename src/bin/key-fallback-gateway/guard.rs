//! Who may ask what, decided on every request head before it is routed ([`check_request`]):
//! the hosts served in `Host` and `Origin` ([`AllowedHosts`]), cross-site browser requests,
//! the client tokens of the forwarded routes ([`Clients`]), the admin token of `/keys` and
//! `/metrics` ([`Admin`]), and paths that could mean something else upstream
//! ([`unsafe_path`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::header::{HeaderMap, HeaderValue};
use http::uri::Uri;
use http::{header, StatusCode};

use super::forward::error;
use super::{Settings, LOG_TARGET};

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
    /// No token is set: only clients whose TCP peer address is loopback (as [`serve`](super::serve) records
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

/// The checks made on every request head before it is routed: see [`check_request`].
pub(crate) struct Guard {
    hosts: AllowedHosts,
    allow_same_site: bool,
    admin: Admin,
    clients: Clients,
}

impl Guard {
    /// The checks `settings` ask for.
    pub(crate) fn new(settings: &Settings) -> Guard {
        Guard {
            hosts: settings.allowed_hosts.clone(),
            allow_same_site: settings.allow_same_site,
            admin: settings.admin.clone(),
            clients: settings.clients.clone(),
        }
    }
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
pub(crate) async fn check_request(
    State(guard): State<Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
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
                target: LOG_TARGET,
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

/// Whether the client's TCP peer, as [`serve`](super::serve) recorded it, is a loopback address (without a
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
