#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time, one after the other, and reports for each
# the executions, the final coverage (cov = edges, ft = features) and whether it crashed.
#
#   scripts/fuzz.sh                      # every target, SECONDS_PER_TARGET (600) each
#   SECONDS_PER_TARGET=60 scripts/fuzz.sh dotenv header_parsers
#   scripts/fuzz.sh classify_body -- -max_len=8192     # after `--`: more libFuzzer flags
#
# Each target starts from its hand-written seeds (fuzz/seeds/<target>, committed) and the
# corpus of earlier runs (fuzz/corpus/<target>, not committed); new inputs go to the latter.
# A crash, a timeout (an input over TIMEOUT_SECONDS, default 10) or an out-of-memory is
# written to fuzz/artifacts/<target>/ and makes the script exit 1 once every target has run.
# Inputs of a second or more are logged as slow units; the slowest is in the summary.
# Each run's libFuzzer output is kept in fuzz/artifacts/<target>/last-run.log.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-600}
TIMEOUT_SECONDS=${TIMEOUT_SECONDS:-10}

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cat >&2 <<'EOF'
scripts/fuzz.sh: `cargo +nightly fuzz` is not available. Install it with

    rustup toolchain install nightly   # if `cargo +nightly` itself is missing
    cargo install cargo-fuzz

and run this script again.
EOF
  exit 2
fi

targets=()
extra=()
while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    extra=("$@")
    break
  fi
  targets+=("$1")
  shift
done
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

# Optimised, with debug assertions and overflow checks (a wrapped integer is a finding too).
build=(-O -a)
(cd fuzz && cargo +nightly fuzz build "${build[@]}")

summary=()
failed=0
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  seeds=fuzz/seeds/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  [[ -d $seeds ]] || { echo "no seeds in $seeds" >&2; exit 2; }
  log=$artifacts/last-run.log
  before=$(find "$artifacts" -type f ! -name '*.log' | sort)
  echo "==> $t: ${SECONDS_PER_TARGET}s (log: $log)"
  status=0
  (cd fuzz && cargo +nightly fuzz run "${build[@]}" "$t" "../$corpus" "../$seeds" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT_SECONDS" \
    -report_slow_units=1 -print_final_stats=1 "${extra[@]}") >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  slowest=$(sed -n 's/^stat::slowest_unit_time_sec: *//p' "$log" | tail -n1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n1)
  new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f ! -name '*.log' | sort) | grep . || true)
  if ((status != 0)) || [[ -n $new ]]; then
    failed=1
    verdict="FOUND (exit $status): ${new:-see $log}"
    grep -E '^(==[0-9]+==ERROR|thread .* panicked|.*deadly signal|.*timeout after|.*out-of-memory)' "$log" | head -n3 || true
    echo "    reproduce: cd fuzz && cargo +nightly fuzz run -O -a $t <artifact>"
    echo "    minimise:  cd fuzz && cargo +nightly fuzz tmin -O -a $t <artifact>"
  else
    verdict="no crash"
  fi
  line="$t: ${SECONDS_PER_TARGET}s, ${execs:-?} executions (${speed:-?}/s), cov ${cov:-?} ft ${ft:-?}, corpus ${corp:-?}, slowest unit ${slowest:-?}s, peak RSS ${rss:-?} MB: $verdict"
  echo "    $line"
  summary+=("$line")
done

echo
echo "==> summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
