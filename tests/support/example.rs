//! An example's or the crate's binary, for the tests that run one (`tests/demo.rs`,
//! `tests/quickstart.rs`, `tests/gateway.rs`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The example `name`, built next to the test binaries, in this test's profile and with the
/// features this test was built with. `cargo test` builds the examples and `cargo test --test
/// x` does not, so it is built here (a no-op when it is up to date).
pub fn example_binary(name: &str) -> PathBuf {
    build("--example", name)
}

/// The crate's binary `name` (`key-fallback-gateway`), built as [`example_binary`] builds an
/// example.
pub fn binary(name: &str) -> PathBuf {
    build("--bin", name)
}

fn build(kind: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let dir = if kind == "--example" {
        profile_dir.join("examples")
    } else {
        profile_dir.to_path_buf()
    };
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    // Another set of features would rebuild the crate and replace the binary with one that
    // lacks them.
    let features: Vec<&str> = [
        ("hyper", cfg!(feature = "hyper")),
        ("testing", cfg!(feature = "testing")),
        ("serde", cfg!(feature = "serde")),
        ("dotenv", cfg!(feature = "dotenv")),
        ("reqwest-middleware", cfg!(feature = "reqwest-middleware")),
        ("retry", cfg!(feature = "retry")),
        ("redis", cfg!(feature = "redis")),
        ("redis-tls", cfg!(feature = "redis-tls")),
        ("metrics", cfg!(feature = "metrics")),
        ("async-openai", cfg!(feature = "async-openai")),
        ("gateway", cfg!(feature = "gateway")),
        ("metrics", cfg!(feature = "metrics")),
    ]
    .into_iter()
    .filter_map(|(feature, on)| on.then_some(feature))
    .collect();
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", kind, name, "--features", &features.join(",")])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    // Without what cargo set for this test binary (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …):
    // build scripts that watch those variables (ring's does) would see them change between
    // this build and the next `cargo test`, and each would rebuild what the other built.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        let set_by_cargo = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| var.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*var);
        if set_by_cargo {
            build.env_remove(&*var);
        }
    }
    let status = build.status().unwrap();
    assert!(status.success(), "cargo build {kind} {name}: {status}");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}
