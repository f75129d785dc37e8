//! The README's Quickstart is `examples/quickstart.rs`, word for word, and run without a key
//! it fails with the error's message (not its `Debug` form). `scripts/quickstart.sh` builds it
//! pasted into a new project, as CI does.

use std::process::Command;

#[path = "support/example.rs"]
mod example;

/// The README's first ```rust block after "## Quickstart".
fn readme_main() -> String {
    let readme = include_str!("../README.md");
    let quickstart = &readme[readme.find("## Quickstart").unwrap()..];
    let start = quickstart.find("```rust,no_run\n").unwrap() + "```rust,no_run\n".len();
    let end = start + quickstart[start..].find("\n```\n").unwrap() + 1;
    quickstart[start..end].to_owned()
}

#[test]
fn the_readme_quickstart_is_the_example() {
    assert_eq!(readme_main(), include_str!("../examples/quickstart.rs"));
}

#[test]
fn without_a_key_it_prints_the_message_and_exits_1() {
    let bin = example::example_binary("quickstart");
    let mut cmd = Command::new(&bin);
    for (name, _) in std::env::vars() {
        if name.starts_with("GROQ_API_KEY") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: no API key found: set GROQ_API_KEY (and GROQ_API_KEY_2"),
        "{stderr}"
    );
    assert!(!stderr.contains("NoKeys"), "{stderr}");
}
