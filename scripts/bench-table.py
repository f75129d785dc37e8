#!/usr/bin/env python3
"""Prints the README's performance table from criterion's results.

Run after `cargo bench` (or `cargo bench --bench overhead`); reads the median point
estimates in target/criterion/<id>/new/estimates.json. Every ratio is between results of
the same run. Usage: scripts/bench-table.py [target-dir]
"""
import json
import os
import sys

TARGET = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR", "target")
ROOT = os.path.join(TARGET, "criterion")


def result(bench_id, name):
    path = os.path.join(ROOT, *bench_id.split("/"), "new", name)
    with open(path) as f:
        return json.load(f)


def median_ns(bench_id):
    return result(bench_id, "estimates.json")["median"]["point_estimate"]


def elements(bench_id):
    return result(bench_id, "benchmark.json")["throughput"]["Elements"]


def fmt_time(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"


def fmt_thrpt(bench_id, ns):
    return f"{elements(bench_id) / ns * 1e3:.2f} M req/s"


# (benchmark, baseline, kind, target description, check)
ROWS = [
    ("bare", None, "time", "", None),
    ("set_header", "bare", "time", "", None),
    ("limit", "bare", "time", "", None),
    ("tower_retry", "limit", "time", "", None),
    ("key_fallback/happy", "limit", "time", "≤ 1.2", lambda r: r <= 1.2),
    ("key_fallback/happy", "tower_retry", "time", "≤ 1.0", lambda r: r <= 1.0),
    ("key_fallback/one_429", "key_fallback/happy", "time", "≤ 3", lambda r: r <= 3.0),
    ("key_fallback/keys_1000", "key_fallback/happy", "time", "≤ 1.5", lambda r: r <= 1.5),
    ("contention/bare/2", "contention/bare/1", "thrpt", "", None),
    ("contention/limit/2", "contention/limit/1", "thrpt", "", None),
    ("contention/key_fallback/1", None, "thrpt", "", None),
    ("contention/key_fallback/2", "contention/key_fallback/1", "thrpt", "≥ 1.6", lambda r: r >= 1.6),
    ("keyset/20000", "keyset/2000", "time", "≤ 20 (quadratic: ~100)", lambda r: r <= 20.0),
]


def main():
    print("| benchmark | median | ratio | vs | target | met? |")
    print("|---|---:|---:|---|---|---|")
    for name, base, kind, target, check in ROWS:
        try:
            t = median_ns(name)
        except FileNotFoundError:
            print(f"| `{name}` | not run | | | {target} | |")
            continue
        shown = fmt_time(t) if kind == "time" else fmt_thrpt(name, t)
        ratio, vs, met = "", "", ""
        if base:
            try:
                b = median_ns(base)
                if kind == "time":
                    r = t / b
                else:
                    # Throughput over the baseline's throughput.
                    r = (elements(name) / t) / (elements(base) / b)
                ratio = f"{r:.2f}×"
                vs = f"`{base}`"
                if check:
                    met = "yes" if check(r) else "**no**"
            except FileNotFoundError:
                vs = f"`{base}` not run"
        print(f"| `{name}` | {shown} | {ratio} | {vs} | {target} | {met} |")


if __name__ == "__main__":
    main()
