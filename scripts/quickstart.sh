#!/usr/bin/env bash
# The README's Quickstart as a new user meets it: `cargo new`, the README's [dependencies]
# block (its git dependency pointed at this checkout) and its src/main.rs, pasted as they are;
# then a build, and a run without a key that must fail with the error's message.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR="${QUICKSTART_TARGET_DIR:-$repo/target/quickstart}"

# The first ```toml block and the first ```rust block after "## Quickstart".
block() {
  awk -v fence="$1" '
    /^## Quickstart/ { on = 1; next }
    on && /^## / { exit }
    on && !done && $0 == fence { inside = 1; next }
    inside && /^```$/ { inside = 0; done = 1; next }
    inside { print }
  ' "$repo/README.md"
}

cargo new -q --vcs none --bin "$work/hello-keys"
deps="$(block '```toml')"
main="$(block '```rust,no_run')"
[ -n "$deps" ] || { echo "no [dependencies] block in the README's Quickstart" >&2; exit 1; }
[ -n "$main" ] || { echo "no main.rs block in the README's Quickstart" >&2; exit 1; }
grep -q 'git = "https://github.com/tower-key-fallback/tower-key-fallback"' <<<"$deps" \
  || { echo "the Quickstart's dependency on the crate is not the git one" >&2; exit 1; }
{
  sed -n '1,/^\[dependencies\]/p' "$work/hello-keys/Cargo.toml" | sed '$d'
  sed "s|git = \"https://github.com/tower-key-fallback/tower-key-fallback\"|path = \"$repo\"|" <<<"$deps"
} >"$work/Cargo.toml.new"
mv "$work/Cargo.toml.new" "$work/hello-keys/Cargo.toml"
printf '%s\n' "$main" >"$work/hello-keys/src/main.rs"

cd "$work/hello-keys"
cargo build -q
set +e
out="$(env -u GROQ_API_KEY cargo run -q 2>&1)"
rc=$?
set -e
expected="error: no API key found: set GROQ_API_KEY"
if [ "$rc" != 1 ] || [[ "$out" != "$expected"* ]]; then
  echo "the Quickstart without a key: exit $rc, printed:" >&2
  echo "$out" >&2
  exit 1
fi
echo "quickstart: builds as pasted into a new project; without a key: $out"
