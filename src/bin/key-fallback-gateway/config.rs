//! The configuration file (`--config FILE`, `GATEWAY_CONFIG`): routes, each with its provider
//! preset, key variables, upstream and pool options. Every error names the file, the line and
//! the problem, never a value the file holds (a key pasted into the wrong place stays unseen).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use tower_key_fallback::Provider;

/// The file, as read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Where to listen (`--listen` and `GATEWAY_LISTEN` win).
    listen: Option<Spanned<String>>,
    /// The routes, by name: `[routes.groq]`.
    #[serde(default)]
    routes: BTreeMap<String, Spanned<RouteFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    provider: Spanned<String>,
    path: Option<Spanned<String>>,
    keys_env: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    max_attempts: Option<Spanned<u32>>,
    round_robin: Option<bool>,
    wait_for_key: Option<Spanned<String>>,
    groups: Option<Vec<Vec<String>>>,
}

/// One route of the file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// The route's name (`groq`), for `/keys`, `/readyz` and the metrics' `pool` label.
    pub name: String,
    /// The path prefix it serves (`/groq`): `/groq/<rest>` goes to `<upstream>/<rest>`.
    pub path: String,
    /// The preset's name.
    pub provider: String,
    /// The prefix of the key variables (`GROQ_API_KEY`, `GROQ_API_KEY_2`, …).
    pub keys_env: String,
    /// The base URL requests go to.
    pub upstream: String,
    /// The most upstream calls per request.
    pub max_attempts: Option<u32>,
    /// Requests spread over the keys in turn.
    pub round_robin: bool,
    /// How long a request may wait for a key.
    pub wait_for_key: Option<Duration>,
    /// Keys (by label) that share one limit.
    pub groups: Vec<Vec<String>>,
    /// Where in the file it is: `gateway.toml:12`.
    pub at: String,
}

impl RouteConfig {
    /// The route's preset, with its upstream and key variables.
    pub fn provider(&self) -> Provider {
        preset(&self.provider, &self.upstream)
            .expect("checked when read")
            .with_base_url(self.upstream.clone())
            .with_env_prefix(self.keys_env.clone())
    }
}

/// What the file configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// `listen`, with where it is in the file.
    pub listen: Option<(String, String)>,
    /// The routes, in the order of their names.
    pub routes: Vec<RouteConfig>,
}

/// The preset named `name`; `upstream` is the endpoint of those that have no fixed one.
fn preset(name: &str, upstream: &str) -> Option<Provider> {
    Some(match name {
        "groq" => Provider::groq(),
        "openai" => Provider::openai(),
        "azure_openai" => Provider::azure_openai(upstream),
        "anthropic" => Provider::anthropic(),
        "gemini" => Provider::gemini(),
        "gemini_query_key" => Provider::gemini().key_in_query(),
        "openrouter" => Provider::openrouter(),
        "mistral" => Provider::mistral(),
        "together" => Provider::together(),
        "fireworks" => Provider::fireworks(),
        "deepseek" => Provider::deepseek(),
        "openai_compatible" => Provider::openai_compatible(upstream),
        _ => return None,
    })
}

const PRESETS: &str = "groq, openai, azure_openai, anthropic, gemini, gemini_query_key, \
                       openrouter, mistral, together, fireworks, deepseek, openai_compatible";

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// `message` with every double-quoted part (where serde puts the values it met) left out.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (quoted, c) {
            (false, '"') => {
                quoted = true;
                out.push_str("\"…");
            }
            (true, '"') => {
                quoted = false;
                out.push('"');
            }
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Reads the configuration in `text` (the contents of the file `name`).
pub fn parse(name: &str, text: &str) -> Result<FileConfig, String> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let message = without_values(e.message().trim());
        match line {
            Some(line) => format!("{name}:{line}: {message}"),
            None => format!("{name}: {message}"),
        }
    })?;
    let at = |offset: usize| format!("{name}:{}", line_of(text, offset));
    let mut routes = Vec::new();
    for (route_name, route) in file.routes {
        let route_at = at(route.span().start);
        let route = route.into_inner();
        if route_name.is_empty()
            || !route_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{route_at}: a route's name is letters, digits, `-` and `_`"
            ));
        }
        let provider_at = at(route.provider.span().start);
        let provider_name = route.provider.into_inner();
        let upstream = route.upstream.map(|u| (at(u.span().start), u.into_inner()));
        let needs_upstream = matches!(provider_name.as_str(), "azure_openai" | "openai_compatible");
        if needs_upstream && upstream.is_none() {
            return Err(format!(
                "{route_at}: route {route_name}: the provider {provider_name} has no fixed \
                 address: set upstream = \"https://…\""
            ));
        }
        let Some(preset) = preset(
            &provider_name,
            upstream.as_ref().map_or("", |(_, u)| u.as_str()),
        ) else {
            return Err(format!(
                "{provider_at}: route {route_name}: unknown provider (one of {PRESETS})"
            ));
        };
        let upstream = match upstream {
            Some((upstream_at, url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(format!(
                        "{upstream_at}: route {route_name}: upstream must start with https:// or \
                         http://"
                    ));
                }
                url.trim_end_matches('/').to_owned()
            }
            None => preset.base_url().to_owned(),
        };
        let path = match route.path {
            Some(p) => {
                let path_at = at(p.span().start);
                let p = p.into_inner();
                let segment_ok = |s: &str| {
                    !s.is_empty()
                        && s != "."
                        && s != ".."
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                };
                if !p.starts_with('/') || !p[1..].split('/').all(segment_ok) {
                    return Err(format!(
                        "{path_at}: route {route_name}: path is `/` and segments of letters, \
                         digits, `-`, `_` and `.` (like /groq or /v1/groq)"
                    ));
                }
                p
            }
            None => format!("/{route_name}"),
        };
        let reserved = ["/keys", "/metrics", "/healthz", "/readyz"];
        if reserved
            .iter()
            .any(|r| path == *r || path.starts_with(&format!("{r}/")))
        {
            return Err(format!(
                "{route_at}: route {route_name}: the path {path} is the gateway's own"
            ));
        }
        let keys_env = match route.keys_env {
            Some(k) => {
                let keys_at = at(k.span().start);
                let k = k.into_inner();
                if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!(
                        "{keys_at}: route {route_name}: keys_env is a variable name (letters, \
                         digits and `_`)"
                    ));
                }
                k
            }
            None => preset.env_prefix().to_owned(),
        };
        let max_attempts = match route.max_attempts {
            Some(n) if *n.get_ref() == 0 => {
                return Err(format!(
                    "{}: route {route_name}: max_attempts is at least 1",
                    at(n.span().start)
                ))
            }
            n => n.map(Spanned::into_inner),
        };
        let wait_for_key = match route.wait_for_key {
            Some(w) => {
                let wait_at = at(w.span().start);
                // The gateway's own reading of a time; its error, which quotes the value, is
                // left out.
                Some(
                    super::cli::parse_duration("wait_for_key", w.get_ref()).map_err(|_| {
                        format!(
                            "{wait_at}: route {route_name}: wait_for_key is a time such as 500ms, \
                         10s or 2m"
                        )
                    })?,
                )
            }
            None => None,
        };
        routes.push(RouteConfig {
            name: route_name,
            path,
            provider: provider_name,
            keys_env,
            upstream,
            max_attempts,
            round_robin: route.round_robin.unwrap_or(false),
            wait_for_key,
            groups: route.groups.unwrap_or_default(),
            at: route_at,
        });
    }
    if routes.is_empty() {
        return Err(format!(
            "{name}: no route: add one, e.g. [routes.groq] with provider = \"groq\""
        ));
    }
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            let nested = |x: &str, y: &str| x == y || y.starts_with(&format!("{x}/"));
            if nested(&a.path, &b.path) || nested(&b.path, &a.path) {
                return Err(format!(
                    "{}: route {} serves {}, which route {} ({}) serves too",
                    b.at, b.name, b.path, a.name, a.at
                ));
            }
        }
    }
    Ok(FileConfig {
        listen: file.listen.map(|l| (at(l.span().start), l.into_inner())),
        routes,
    })
}
