#!/usr/bin/env bash
# Model check of the key pool's atomics with loom (src/pool/loom_model.rs): every
# interleaving of the models' threads, within each model's preemption bound.
#
#   scripts/loom.sh                  # every model
#   scripts/loom.sh rotation         # the models whose name contains "rotation"
#   LOOM_MAX_PREEMPTIONS=5 scripts/loom.sh claim_cool_scan
#
# LOOM_MAX_PREEMPTIONS, when set, overrides every model's own bound. Unset, the bounds are
# the models' own: claim_cool_scan and reset_racing_a_cool 4, the two-thread models none
# (every interleaving). Each model prints how many interleavings it ran and which of its
# cases they reached, and fails when a case was never reached.
#
# The cfg is `tkf_loom`, not `loom`: tokio and others have `cfg(loom)` code of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

# A target directory of its own: the cfg changes every crate's flags, and would otherwise
# throw away the normal build's artefacts.
export CARGO_TARGET_DIR="${LOOM_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/loom}"
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }--cfg tkf_loom"
export CARGO_INCREMENTAL=0

# The dev profile, with this crate, loom and its coroutines optimised: the models run about
# as fast as in release, and the dependencies (tests build every dev-dependency) build
# about twice as fast. Overflow checks and debug assertions stay on.
profile=(
  --config 'profile.loom.inherits="dev"'
  --config 'profile.loom.debug=false'
  --config 'profile.loom.package.tower-key-fallback.opt-level=3'
  --config 'profile.loom.package.loom.opt-level=3'
  --config 'profile.loom.package.generator.opt-level=3'
  --profile loom
)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
started=$SECONDS
cargo test "${profile[@]}" --lib "loom_model::${1:-}" -- --nocapture 2>&1 | tee "$log"
if ! grep -q ' interleavings, preemption bound ' "$log"; then
  echo "loom.sh: no model ran (filter: '${1:-}')" >&2
  exit 1
fi
echo "loom.sh: done in $((SECONDS - started)) s (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
