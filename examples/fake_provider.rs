//! `cargo run --example fake_provider`: the crate's fake Groq API as a process of its own, on
//! 127.0.0.1 and a port the system picks, until it is killed. `scripts/gateway-load.py` runs
//! it in front of the gateway, so each process's CPU time can be read apart.
//!
//! ```text
//! fake_provider [--stream-interval-ms N] [KEY ...]
//! ```
//!
//! Every key given (`gsk_fake_load` if none) serves every request (`Behavior::Ok`).
//! `--stream-interval-ms` is the pause between two events of a streamed answer (5 ms by
//! default; a stream has 9 events). Once it listens it prints one line,
//! `fake provider: listening on http://ADDR`, and then nothing more; it stops only when killed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tower_key_fallback::testing::{Behavior, FakeProvider};

#[tokio::main]
async fn main() -> ExitCode {
    let mut keys = Vec::new();
    let mut interval = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--stream-interval-ms" {
            match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(ms) => interval = Some(Duration::from_millis(ms)),
                None => {
                    eprintln!("fake provider: --stream-interval-ms needs a number of ms");
                    return ExitCode::from(2);
                }
            }
        } else if arg.starts_with("--") {
            eprintln!("fake provider: unknown option {arg:?}");
            return ExitCode::from(2);
        } else {
            keys.push(arg);
        }
    }
    if keys.is_empty() {
        keys.push("gsk_fake_load".to_owned());
    }
    let mut builder = FakeProvider::builder();
    for key in keys {
        builder = builder.key(key, Behavior::Ok);
    }
    if let Some(interval) = interval {
        builder = builder.stream_interval(interval);
    }
    let provider = builder.build();
    let server = match provider.serve_ephemeral().await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("fake provider: cannot listen: {err}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "fake provider: listening on http://{}", server.addr());
    let _ = out.flush();
    // Serves until the process is killed.
    std::future::pending::<()>().await;
    drop(server);
    ExitCode::SUCCESS
}
