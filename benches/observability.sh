#!/usr/bin/env bash
# Instructions per message of the whole bus (benches/observability.rs) with nothing installed,
# with a Prometheus recorder, and with the recorder plus an OpenTelemetry tracer provider (every
# trace, one in ten, one in a hundred), counted by callgrind: wall-clock rates of the bench move
# by ±20% on a busy 2-core machine; instruction counts repeat. Each setting runs one round of N
# and of 2N messages; the difference over N is the cost per message, without the set-up. Not
# counted: the Prometheus recorder's clock calibration (quanta's `Clock::new`, inclusive), a loop
# that runs for a set time: its count moved by 1 million between runs (±1,000 a message at
# N = 5,000; the rest of a run repeats within 0.1%).
#
#   benches/observability.sh          BUSBAR_BENCH_MESSAGES=N (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
n=${BUSBAR_BENCH_MESSAGES:-5000}
cargo bench --bench observability --no-run >/dev/null 2>&1
bin=$(ls -t target/release/deps/observability-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
total() { # total <setting> <messages>: instructions, less the clock's calibration
  rm -f "$out"/cg.*
  env BUSBAR_BENCH_OBSERVE="$1" BUSBAR_BENCH_MESSAGES="$2" BUSBAR_BENCH_ROUNDS=1 valgrind --tool=callgrind \
    --callgrind-out-file="$out/cg.%p" "$bin" --bench >/dev/null 2>"$out/log"
  callgrind_annotate --inclusive=yes "$out"/cg.* 2>/dev/null | awk '
    / PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
    /quanta::Clock::new / && !clock { gsub(",", "", $1); clock = $1 }
    END { print total - clock }'
}
printf '| %-14s | %16s | %11s |\n' setting "instructions/msg" "against off"
printf '|---|---|---|\n'
off=0
for setting in off metrics metrics+traces metrics+traces-1/10 metrics+traces-1/100; do
  per=$((($(total "$setting" $((2 * n))) - $(total "$setting" "$n")) / n))
  ((off)) || off=$per
  printf '| %-14s | %16d | %11s |\n' "$setting" "$per" "$(awk -v a="$off" -v b="$per" 'BEGIN { printf "%.3f", a / b }')"
done
