//! The command line, with the environment as fallback ([`Command::parse`]): every flag and
//! variable, checked at start, and the usage text.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Uri;

use super::config::FileConfig;
use super::forward::parse_upstream;
use super::guard::{Admin, AdminToken, AllowedHosts, Clients};
use super::{
    config, read_roots, Settings, DEFAULT_ADMIN_TOKEN_ENV, DEFAULT_BODY_TIMEOUT,
    DEFAULT_CLIENT_TOKENS_ENV, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEYS_ENV, DEFAULT_LISTEN,
    DEFAULT_MAX_BODY, DEFAULT_UPSTREAM,
};

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
/// batches ([`logs`](super::logs)).
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
    /// What [`app`](super::app) and [`serve`](super::serve) are given.
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
pub(crate) fn parse_duration(what: &str, value: &str) -> Result<Duration, String> {
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
