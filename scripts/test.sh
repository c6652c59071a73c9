#!/usr/bin/env bash
# The whole test suite: starts the local brokers the tests need, then runs every test
# (unit, integration, conformance and doc tests) across the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

# The services the current test suite talks to (the memory transport needs none).
BROKERS=(rabbitmq kafka kafka-secured sqs kafka-durable postgres redis)
if ((${#BROKERS[@]})); then
  bash scripts/local-brokers.sh "${BROKERS[@]}"
fi

cargo test --workspace --all-features --locked "$@"
