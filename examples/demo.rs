//! `cargo run --example demo`: key fallback at work, with no API key and no network.
//!
//! It serves the fake Groq API of `tower_key_fallback::testing` on 127.0.0.1, with three keys
//! that allow 8, 15 and 30 requests per 2-second window, and sends a burst of requests
//! through hyper-util's client wrapped in `KeyFallbackLayer`. While it runs it shows each
//! key's calls, 429s, state and cooldown; at the end, how many requests were served, how
//! often the layer switched keys and how many upstream calls were wasted on 429s.
//!
//! Options (or the environment variable in brackets):
//!
//! ```text
//! --requests N      requests to send (DEMO_REQUESTS, default 120)
//! --concurrency N   requests in flight at once (DEMO_CONCURRENCY, default 6)
//! --window-ms N     the keys' rate-limit window in ms (DEMO_WINDOW_MS, default 2000)
//! --plain           plain lines even on a terminal (as when stdout is not a terminal or
//!                   TERM=dumb); NO_COLOR=1 keeps the live table without colours
//! ```
//!
//! The exit status is 0 only if every request was served.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_fallback::testing::{Behavior, FakeProvider};
use tower_key_fallback::{
    BoxError, CooldownReason, Exhausted, KeyFallbackLayer, KeySet, KeyState, PoolStatus,
};

/// The keys' allowances per window: small, medium, large.
const LIMITS: [u32; 3] = [8, 15, 30];
/// How often the live table is redrawn.
const TICK: Duration = Duration::from_millis(100);
/// Whatever happens, the demo gives up after this long.
const DEADLINE: Duration = Duration::from_secs(60);

/// The body of a response through the layer over hyper-util's client.
type ResBody = tower_key_fallback::KeyFallbackBody<hyper::body::Incoming>;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests to send.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// The keys' rate-limit window.
    pub window: Duration,
    /// The fake provider's latency per answer.
    pub latency: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            requests: 120,
            concurrency: 6,
            window: Duration::from_secs(2),
            latency: Duration::from_millis(25),
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A table redrawn in place (ANSI escapes), with or without colours, for a terminal
    /// `width` columns wide: below 78 columns a narrower table, and no line is ever wider
    /// than the terminal (a wrapped line would break the redraw).
    Live { color: bool, width: usize },
    /// Plain lines: one per key state change, one per second of progress.
    Plain,
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests answered 200 with a whole completion.
    pub served: usize,
    /// Requests not served: failed for good, or unfinished at the deadline.
    pub failed: usize,
    /// Upstream calls the layer made, per its key counters.
    pub upstream_calls: u64,
    /// Upstream calls the fake provider counted.
    pub server_calls: u64,
    /// Times a request was moved to another key.
    pub switches: u64,
    /// Upstream calls that served nothing (429s and other failures).
    pub wasted: u64,
    /// Of those, 429s.
    pub rate_limited: u64,
    /// Times every key was cooling and a request waited for the next one.
    pub waits: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Requests served per key, in key order.
    pub served_per_key: Vec<(String, u64)>,
}

impl Summary {
    /// Whether every request was served.
    pub fn all_served(&self) -> bool {
        self.served == self.requests && self.failed == 0
    }
}

/// Counters the workers share.
#[derive(Default)]
struct Counters {
    next: AtomicUsize,
    served: AtomicUsize,
    failed: AtomicUsize,
    /// Requests (layer calls) that made at least one upstream call.
    answered_calls: AtomicU64,
    waits: AtomicU64,
}

fn parse_options() -> Result<Option<(Options, bool)>, String> {
    let mut opts = Options::default();
    let mut plain = false;
    let env_num = |name: &str| -> Result<Option<u64>, String> {
        match std::env::var(name) {
            Ok(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{name} must be a number, not {v:?}")),
            Err(_) => Ok(None),
        }
    };
    if let Some(n) = env_num("DEMO_REQUESTS")? {
        opts.requests = n as usize;
    }
    if let Some(n) = env_num("DEMO_CONCURRENCY")? {
        opts.concurrency = n as usize;
    }
    if let Some(n) = env_num("DEMO_WINDOW_MS")? {
        opts.window = Duration::from_millis(n);
    }
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<u64, String> {
            let v = inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs {what}"))?;
            v.parse()
                .map_err(|_| format!("{name} needs {what}, not {v:?}"))
        };
        match name.as_str() {
            "--requests" => opts.requests = value("a number of requests")? as usize,
            "--concurrency" => opts.concurrency = value("a number")? as usize,
            "--window-ms" => opts.window = Duration::from_millis(value("milliseconds")?),
            "--plain" => plain = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if opts.requests == 0 || opts.concurrency == 0 || opts.window.is_zero() {
        return Err("--requests, --concurrency and --window-ms must be at least 1".into());
    }
    Ok(Some((opts, plain)))
}

const HELP: &str = "\
Key fallback over a fake Groq API on 127.0.0.1: no API key, no network.

usage: cargo run --example demo -- [--requests N] [--concurrency N] [--window-ms N] [--plain]

  --requests N      requests to send (DEMO_REQUESTS, default 120)
  --concurrency N   requests in flight at once (DEMO_CONCURRENCY, default 6)
  --window-ms N     the keys' rate-limit window in ms (DEMO_WINDOW_MS, default 2000)
  --plain           plain lines even on a terminal (NO_COLOR=1: no colours)

Exits 0 only if every request was served.";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (opts, plain) = match parse_options() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            // Not println!: it panics when the reader went away (`… --help | head`).
            let _ = writeln!(std::io::stdout(), "{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("demo: {msg}");
            return ExitCode::from(2);
        }
    };
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    let display = if plain || dumb || !std::io::stdout().is_terminal() {
        Display::Plain
    } else {
        Display::Live {
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            width: terminal_width(),
        }
    };
    let mut out = std::io::stdout();
    match run(&opts, display, &mut out).await {
        Ok(summary) if summary.all_served() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("demo: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo: serves the fake provider, sends the burst, shows progress on `out`.
pub async fn run(
    opts: &Options,
    display: Display,
    out: &mut (dyn Write + Send),
) -> Result<Summary, BoxError> {
    // Three keys, each with its own allowance per window.
    let keys: Vec<String> = (1..=LIMITS.len())
        .map(|i| format!("gsk_demo_{i}"))
        .collect();
    let mut builder = FakeProvider::builder().latency(opts.latency);
    for (key, limit) in keys.iter().zip(LIMITS) {
        builder = builder.key(
            key.clone(),
            Behavior::RateLimited {
                requests: limit,
                window: opts.window,
            },
        );
    }
    let provider = builder.build();
    let server = provider.serve_ephemeral().await?;

    let layer = KeyFallbackLayer::new(KeySet::new(&keys)?);
    let handle = layer.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new().layer(layer).service(client);
    let url = server.url("/openai/v1/chat/completions");

    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..opts.concurrency.min(opts.requests) {
        let (svc, url, counters) = (svc.clone(), url.clone(), counters.clone());
        let total = opts.requests;
        workers.spawn(async move {
            loop {
                let i = counters.next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let ok = send(svc.clone(), &url, i, &counters).await;
                let counter = if ok {
                    &counters.served
                } else {
                    &counters.failed
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    let mut view = View::new(opts, display, server.addr().to_string());
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut timed_out = false;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(result) => result?,
            },
            _ = ticker.tick() => {
                if started.elapsed() > DEADLINE {
                    workers.abort_all();
                    timed_out = true;
                    break;
                }
                view.draw(out, &handle.status(), &counters, started.elapsed())?;
            }
        }
    }
    let elapsed = started.elapsed();
    view.draw(out, &handle.status(), &counters, elapsed)?;

    let status = handle.status();
    let served = counters.served.load(Ordering::SeqCst);
    // Requests that failed, or never finished before the deadline.
    let failed = opts.requests - served;
    let upstream_calls: u64 = status.keys.iter().map(|k| k.requests).sum();
    let summary = Summary {
        requests: opts.requests,
        served,
        failed,
        upstream_calls,
        server_calls: provider.stats().total().requests,
        switches: upstream_calls.saturating_sub(counters.answered_calls.load(Ordering::SeqCst)),
        wasted: status.keys.iter().map(|k| k.errors).sum(),
        rate_limited: status.keys.iter().map(|k| k.rate_limited).sum(),
        waits: counters.waits.load(Ordering::SeqCst),
        elapsed,
        served_per_key: status
            .keys
            .iter()
            .map(|k| (k.label.clone(), k.successes))
            .collect(),
    };
    server.shutdown().await;
    view.summary(out, &summary, timed_out)?;
    Ok(summary)
}

/// Sends request `i` until it is served or fails for good. Returns whether it was served.
async fn send<S>(mut svc: S, url: &str, i: usize, counters: &Counters) -> bool
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<ResBody>, Error = BoxError>,
{
    let body = format!(
        r#"{{"model":"llama-3.1-8b-instant","messages":[{{"role":"user","content":"Say hello (request {i})"}}]}}"#
    );
    loop {
        let req = http::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("a valid request");
        let ready = match svc.ready().await {
            Ok(ready) => ready,
            Err(_) => return false,
        };
        match ready.call(req).await {
            Ok(res) => {
                counters.answered_calls.fetch_add(1, Ordering::SeqCst);
                let status = res.status();
                let Ok(body) = res.into_body().collect().await else {
                    return false;
                };
                return status == 200 && body.to_bytes().starts_with(b"{\"id\":\"chatcmpl-");
            }
            Err(err) => {
                let Some(exhausted) = err.downcast_ref::<Exhausted>() else {
                    // Not the layer's "no key": with replayable bodies it never happens.
                    return false;
                };
                if exhausted.attempts() > 0 {
                    counters.answered_calls.fetch_add(1, Ordering::SeqCst);
                }
                // Every key is cooling. With 53 requests per window over three keys and
                // more than that in the burst, this is bound to happen: instead of sizing
                // the burst to avoid it, the request waits until the first key is back
                // (`Exhausted::retry_after`, the provider's own reset time) and goes again.
                // `None` would mean every key is disabled: nothing to wait for.
                match exhausted.retry_after() {
                    Some(wait) => {
                        counters.waits.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(wait + Duration::from_millis(1)).await;
                    }
                    None => return false,
                }
            }
        }
    }
}

/// Draws the live table or the plain lines.
struct View {
    display: Display,
    title: String,
    subtitle: String,
    limits: Vec<String>,
    window: Duration,
    total: usize,
    drawn_lines: usize,
    last_states: Vec<String>,
    last_progress_second: u64,
}

const BAR: usize = 24;

impl View {
    fn new(opts: &Options, display: Display, addr: String) -> View {
        let window = fmt_secs(opts.window);
        View {
            display,
            title: format!("tower-key-fallback demo: a fake Groq API on {addr}"),
            subtitle: format!(
                "{} requests, {} at a time, over {} keys",
                opts.requests,
                opts.concurrency,
                LIMITS.len()
            ),
            limits: LIMITS.iter().map(|l| format!("{l} / {window}")).collect(),
            window: opts.window,
            total: opts.requests,
            drawn_lines: 0,
            last_states: Vec::new(),
            last_progress_second: 0,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        match self.display {
            Display::Live { color: true, .. } => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    fn draw(
        &mut self,
        out: &mut (dyn Write + Send),
        status: &PoolStatus,
        counters: &Counters,
        elapsed: Duration,
    ) -> std::io::Result<()> {
        match self.display {
            Display::Live { width, .. } => self.draw_live(out, status, counters, elapsed, width),
            Display::Plain => self.draw_plain(out, status, counters, elapsed),
        }
    }

    fn draw_live(
        &mut self,
        out: &mut (dyn Write + Send),
        status: &PoolStatus,
        counters: &Counters,
        elapsed: Duration,
        width: usize,
    ) -> std::io::Result<()> {
        // The full table is 77 columns wide; narrower terminals get the key, its calls, 429s,
        // state and time left (44 columns).
        let wide = width >= 78;
        let header = if wide {
            format!(
                "  {:<6} {:>10} {:>6} {:>6} {:>4}  {:<24} {}",
                "KEY", "LIMIT", "CALLS", "SERVED", "429", "STATE", "COOLDOWN"
            )
        } else {
            format!(
                "  {:<6} {:>5} {:>4}  {:<18} {}",
                "KEY", "CALLS", "429", "STATE", "LEFT"
            )
        };
        let mut lines = vec![
            self.paint("1", &self.title),
            self.subtitle.clone(),
            String::new(),
            self.paint("2", &header),
        ];
        for (i, key) in status.keys.iter().enumerate() {
            let (state, color, remaining) = describe(&key.state);
            let cooldown = match remaining {
                Some(left) if wide => {
                    let frac = left.as_secs_f64() / self.window.as_secs_f64().max(1e-3);
                    format!("{} {:>5}", bar(frac.min(1.0), 6), fmt_secs(left))
                }
                Some(left) => format!("{:>5}", fmt_secs(left)),
                None => String::new(),
            };
            lines.push(if wide {
                format!(
                    "  {:<6} {:>10} {:>6} {:>6} {:>4}  {} {}",
                    key.label,
                    self.limits.get(i).map_or("", String::as_str),
                    key.requests,
                    key.successes,
                    key.rate_limited,
                    self.paint(color, &format!("{:<24}", format!("● {state}"))),
                    self.paint("33", &cooldown),
                )
            } else {
                format!(
                    "  {:<6} {:>5} {:>4}  {} {}",
                    key.label,
                    key.requests,
                    key.rate_limited,
                    self.paint(color, &format!("{:<18}", format!("● {state}"))),
                    self.paint("33", &cooldown),
                )
            });
        }
        let served = counters.served.load(Ordering::SeqCst);
        let failed = counters.failed.load(Ordering::SeqCst);
        lines.push(String::new());
        let bar_cells = if wide {
            BAR
        } else {
            BAR.min(width.saturating_sub(30)).max(4)
        };
        let mut progress = format!(
            "  {} {:>3}/{} served  {:>5}",
            self.paint("32", &bar(served as f64 / self.total as f64, bar_cells)),
            served,
            self.total,
            fmt_secs(elapsed),
        );
        if served + failed < self.total && status.available() == 0 {
            let next = status
                .keys
                .iter()
                .filter_map(|k| describe(&k.state).2)
                .min()
                .map_or_else(|| "never".to_owned(), fmt_secs);
            progress.push_str(&self.paint("33", &format!("  all cooling, next {next}")));
        } else {
            let waits = counters.waits.load(Ordering::SeqCst);
            if waits > 0 {
                let _ = write!(progress, "  {waits} waits");
            }
        }
        if failed > 0 {
            progress.push_str(&self.paint("31", &format!("  {failed} failed")));
        }
        lines.push(progress);

        let mut frame = String::new();
        if self.drawn_lines > 0 {
            // Back to the table's first line, then overwrite each line.
            let _ = write!(frame, "\x1b[{}A", self.drawn_lines);
        }
        for line in &lines {
            let _ = writeln!(frame, "\r\x1b[2K{}", fit(line, width.saturating_sub(1)));
        }
        self.drawn_lines = lines.len();
        out.write_all(frame.as_bytes())?;
        out.flush()
    }

    fn draw_plain(
        &mut self,
        out: &mut (dyn Write + Send),
        status: &PoolStatus,
        counters: &Counters,
        elapsed: Duration,
    ) -> std::io::Result<()> {
        let mut text = String::new();
        if self.last_states.is_empty() {
            let _ = writeln!(text, "{}\n{}", self.title, self.subtitle);
            for (i, key) in status.keys.iter().enumerate() {
                let _ = writeln!(
                    text,
                    "  {}: limit {}",
                    key.label,
                    self.limits.get(i).map_or("", String::as_str)
                );
            }
            self.last_states = vec![String::new(); status.keys.len()];
        }
        let stamp = format!("[{:>6}]", fmt_secs(elapsed));
        for (i, key) in status.keys.iter().enumerate() {
            let (state, _, remaining) = describe(&key.state);
            if self.last_states[i] != state {
                let _ = write!(text, "{stamp} {} {state}", key.label);
                if let Some(left) = remaining {
                    let _ = write!(text, " for {}", fmt_secs(left));
                }
                let _ = writeln!(
                    text,
                    " (calls {}, served {}, 429s {})",
                    key.requests, key.successes, key.rate_limited
                );
                self.last_states[i] = state;
            }
        }
        let second = elapsed.as_secs();
        if second > self.last_progress_second {
            self.last_progress_second = second;
            let _ = writeln!(
                text,
                "{stamp} progress: {}/{} served, {} waits for a key",
                counters.served.load(Ordering::SeqCst),
                self.total,
                counters.waits.load(Ordering::SeqCst)
            );
        }
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    fn summary(
        &self,
        out: &mut (dyn Write + Send),
        s: &Summary,
        timed_out: bool,
    ) -> std::io::Result<()> {
        let mut text = String::new();
        let _ = writeln!(text);
        let _ = writeln!(text, "{}", self.paint("1", "Summary"));
        let served = format!("{} / {}", s.served, s.requests);
        let served = if s.all_served() {
            self.paint("32", &served)
        } else {
            self.paint("31", &served)
        };
        let _ = writeln!(text, "  requests served       {served}");
        let _ = writeln!(
            text,
            "  upstream calls        {}  (the fake provider counted {})",
            s.upstream_calls, s.server_calls
        );
        let _ = writeln!(text, "  keys switched         {}", s.switches);
        let _ = writeln!(
            text,
            "  upstream calls wasted {}  ({} answered 429)",
            s.wasted, s.rate_limited
        );
        let _ = writeln!(
            text,
            "  waits for a key       {}  (every key cooling: waited Exhausted::retry_after)",
            s.waits
        );
        let per_key: Vec<String> = s
            .served_per_key
            .iter()
            .map(|(label, n)| format!("{label} {n}"))
            .collect();
        let _ = writeln!(text, "  served per key        {}", per_key.join(", "));
        let _ = writeln!(text, "  elapsed               {}", fmt_secs(s.elapsed));
        if timed_out {
            let _ = writeln!(
                text,
                "{}",
                self.paint("31", &format!("  gave up after {}", fmt_secs(DEADLINE)))
            );
        }
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

/// A key's state in words, its colour, and the cooldown left.
fn describe(state: &KeyState) -> (String, &'static str, Option<Duration>) {
    match state {
        KeyState::Active => ("active".into(), "32", None),
        KeyState::CoolingDown { remaining, reason } => {
            let why = match reason {
                CooldownReason::Drained => "used up",
                CooldownReason::RateLimited => "got 429",
                CooldownReason::QuotaExhausted => "quota",
                CooldownReason::Errors => "errors",
                _ => "manual",
            };
            (format!("cooling ({why})"), "33", Some(*remaining))
        }
        KeyState::Disabled { reason } => (format!("disabled ({})", reason.as_str()), "31", None),
        _ => ("unknown".into(), "0", None),
    }
}

/// `line` cut to `width` visible characters (ANSI escapes take none), colours reset if cut.
pub fn fit(line: &str, width: usize) -> String {
    let mut out = String::with_capacity(line.len());
    let mut visible = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            // An escape runs to its final letter.
            for e in chars.by_ref() {
                out.push(e);
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible == width {
            out.push_str("\x1b[0m");
            break;
        }
        out.push(c);
        visible += 1;
    }
    out
}

/// The visible width of `line` (ANSI escapes take none).
pub fn visible_width(line: &str) -> usize {
    let mut n = 0;
    let mut escape = false;
    for c in line.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, c) if c.is_ascii_alphabetic() => escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// The terminal's width: `COLUMNS`, else what `stty size` says of the terminal, else 80.
fn terminal_width() -> usize {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
    {
        return n;
    }
    std::fs::File::open("/dev/tty")
        .ok()
        .and_then(|tty| {
            std::process::Command::new("stty")
                .arg("size")
                .stdin(tty)
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
        })
        .and_then(|out| {
            let text = String::from_utf8(out.stdout).ok()?;
            text.split_whitespace().nth(1)?.parse().ok()
        })
        .filter(|&n: &usize| n > 0)
        .unwrap_or(80)
}

/// A bar `width` cells wide, filled to `frac` (0 to 1), in eighths of a cell.
fn bar(frac: f64, width: usize) -> String {
    const PARTS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (frac.clamp(0.0, 1.0) * (width * 8) as f64).round() as usize;
    let mut s = String::with_capacity(width * 3 + 2);
    s.push('▕');
    for cell in 0..width {
        let filled = eighths.saturating_sub(cell * 8).min(8);
        s.push(match filled {
            8 => '█',
            n => PARTS[n],
        });
    }
    s.push('▏');
    s
}

/// `1.2s`, `12s`, `250ms`.
fn fmt_secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(10) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}s", d.as_secs())
    }
}
