//! `cargo run --example demo` finishes on the embedded provider with every request served:
//! its logic run in process, and the built example binary run with a bounded burst.

use std::process::Command;
use std::time::Duration;

// The example itself, so the test runs the demo's own code, not a copy of it.
#[allow(dead_code)]
#[path = "../examples/demo.rs"]
mod demo;
#[path = "support/example.rs"]
mod example;

#[tokio::test]
async fn the_demos_default_run_wastes_at_most_five_calls() {
    let opts = demo::Options::default();
    let mut out = Vec::new();
    let summary = demo::run(&opts, demo::Display::Plain, &mut out)
        .await
        .unwrap();
    println!(
        "demo, 120 requests, 6 in flight: {} wasted upstream calls",
        summary.wasted
    );
    assert!(summary.all_served(), "{summary:#?}");
    assert!(summary.wasted <= 5, "{summary:#?}");
}

#[tokio::test]
async fn the_demo_serves_every_request_of_a_burst_bigger_than_a_window() {
    let opts = demo::Options {
        requests: 70,
        concurrency: 6,
        window: Duration::from_millis(800),
        latency: Duration::from_millis(10),
    };
    let mut out = Vec::new();
    let summary = demo::run(&opts, demo::Display::Plain, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();

    assert!(summary.all_served(), "{summary:#?}\n{text}");
    assert_eq!(summary.served, 70);
    assert_eq!(summary.failed, 0);
    // The keys allow 8 + 15 + 30 = 53 requests a window: 70 need a second window of some
    // key, so the demo went on until one came back, and every key served.
    assert!(summary.elapsed >= opts.window, "{summary:#?}");
    let per_key: Vec<u64> = summary.served_per_key.iter().map(|(_, n)| *n).collect();
    assert_eq!(per_key.len(), 3);
    assert_eq!(per_key.iter().sum::<u64>(), 70);
    assert!(per_key.iter().all(|n| *n > 0), "{per_key:?}");
    let windows = (summary.elapsed.as_secs_f64() / opts.window.as_secs_f64()).floor() as u64 + 1;
    for (served, limit) in per_key.iter().zip([8, 15, 30]) {
        assert!(
            *served <= limit * windows,
            "{per_key:?} in {windows} windows"
        );
    }
    // The layer's counts agree with the server's, and every call is served or a 429.
    assert_eq!(summary.upstream_calls, summary.server_calls);
    assert_eq!(summary.wasted, summary.rate_limited);
    assert_eq!(summary.upstream_calls, 70 + summary.wasted);
    assert!(summary.switches <= summary.wasted);

    // The keys report what they have left, and the pool spends no call on a key that said it
    // is spent: before budgets the demo's default run spent 35 upstream 429s.
    assert!(summary.wasted <= 5, "{summary:#?}");

    // Plain lines, no escape codes, and the summary.
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("key-1 cooling ("), "{text}");
    assert!(text.contains("requests served       70 / 70"), "{text}");
    assert!(
        text.contains(&format!("keys switched         {}", summary.switches)),
        "{text}"
    );
}

#[tokio::test]
async fn the_live_table_redraws_in_place() {
    let opts = demo::Options {
        requests: 20,
        concurrency: 4,
        window: Duration::from_millis(500),
        latency: Duration::from_millis(40),
    };
    let mut out = Vec::new();
    let display = demo::Display::Live {
        color: true,
        width: 80,
    };
    let summary = demo::run(&opts, display, &mut out).await.unwrap();
    assert!(summary.all_served(), "{summary:#?}");
    let text = String::from_utf8(out).unwrap();
    // The table is drawn, then redrawn over itself (cursor up, clear line).
    assert!(text.contains("\x1b[9A"), "{text:?}");
    assert!(text.contains("\r\x1b[2K"), "{text:?}");
    assert!(text.contains("key-3"), "{text:?}");
    assert!(text.contains("20/20 served"), "{text:?}");
}

#[test]
fn the_demo_binary_finishes_and_prints_its_summary() {
    let bin = example::example_binary("demo");
    let out = Command::new(&bin)
        .args(["--requests", "40", "--window-ms", "500"])
        .env_remove("DEMO_REQUESTS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: plain lines.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(stdout.contains("40 requests, 6 at a time"), "{stdout}");
    assert!(stdout.contains("requests served       40 / 40"), "{stdout}");

    // The request count also comes from the environment; bad arguments are refused.
    let out = Command::new(&bin)
        .env("DEMO_REQUESTS", "12")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("requests served       12 / 12"));
    let out = Command::new(&bin).arg("--requests=lots").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The live table fits an 80-column terminal and narrower ones, every frame: no line is as
/// wide as the terminal (a wrapped line would break the redraw in place).
#[tokio::test]
async fn the_live_table_fits_80_columns_and_narrower() {
    let opts = demo::Options {
        requests: 20,
        concurrency: 4,
        window: Duration::from_millis(500),
        latency: Duration::from_millis(40),
    };
    for width in [80, 60, 40] {
        let mut out = Vec::new();
        let display = demo::Display::Live { color: true, width };
        let summary = demo::run(&opts, display, &mut out).await.unwrap();
        assert!(summary.all_served(), "{summary:#?}");
        let text = String::from_utf8(out).unwrap();
        let mut table_lines = 0;
        for line in text.split('\n') {
            // A table line starts with "\r\x1b[2K"; the summary after it is plain text.
            let Some(drawn) = line.strip_prefix("\r\x1b[2K") else {
                continue;
            };
            table_lines += 1;
            let w = demo::visible_width(drawn);
            assert!(w < width, "{w} columns at width {width}: {drawn:?}");
        }
        assert!(table_lines > 9, "{text:?}");
        // The narrow table still names every key and shows the progress.
        assert!(
            text.contains("key-3") && text.contains("served"),
            "{text:?}"
        );
    }
    assert_eq!(demo::fit("\x1b[1mabcdef\x1b[0m", 3), "\x1b[1mabc\x1b[0m");
    assert_eq!(demo::visible_width("\x1b[33m● cooling\x1b[0m"), 9);
}
