#!/usr/bin/env bash
# Instructions per message of each hot-path stage (benches/hot_path.rs), counted by callgrind,
# which counts instructions, not time, so the figures repeat whatever else the machine does.
# Each stage runs with N and 2N messages, and once more each with only its set-up (which also
# grows with N): the difference of the differences, over N, is the measured part alone.
#
#   benches/instructions.sh [stage ...]      default: encode decode spi publish consume bus-1 bus-8
#   BUSBAR_BENCH_MESSAGES=N (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
n=${BUSBAR_BENCH_MESSAGES:-5000}
stages=("$@")
((${#stages[@]})) || stages=(encode decode spi publish consume bus-1 bus-8)
cargo bench --bench hot_path --no-run >/dev/null 2>&1
bin=$(ls -t target/release/deps/hot_path-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
total() { # total <stage> <messages> [setup-only]
  env BUSBAR_BENCH_STAGE="$1" BUSBAR_BENCH_MESSAGES="$2" ${3:+BUSBAR_BENCH_SETUP_ONLY=1} valgrind --tool=callgrind \
    --callgrind-out-file="$out/cg.%p" "$bin" >/dev/null 2>"$out/log"
  grep -o 'Collected : [0-9]*' "$out/log" | grep -o '[0-9]*$'
}
printf '| %-8s | %14s |\n' stage "instructions/msg"
printf '|---|---|\n'
for stage in "${stages[@]}"; do
  one=$(total "$stage" "$n")
  two=$(total "$stage" $((2 * n)))
  setup_one=$(total "$stage" "$n" setup)
  setup_two=$(total "$stage" $((2 * n)) setup)
  printf '| %-8s | %14d |\n' "$stage" $((((two - one) - (setup_two - setup_one)) / n))
done
