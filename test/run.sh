#!/usr/bin/env bash
# The test command (npm test): installs what the tests need, then runs the unit tests and the
# lab-backed tests (real pulumi CLI, real S3 server, qemu test hosts booted here).
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_SUMMARY_FILE; TEST_SUMMARY_FILE=$(mktemp)
trap 'rm -f "$TEST_SUMMARY_FILE"' EXIT
t_all=$SECONDS
phase() { # phase NAME COMMAND...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  local rc=0
  "$@" || rc=$?
  echo "=== $name: $((SECONDS - t0)) s (exit $rc)"
  return $rc
}
summary() {
  awk '{p+=$1; f+=$2; s+=$3} END {printf "\nall tests: %d passed, %d failed, %d skipped\n", p, f, s}' "$TEST_SUMMARY_FILE"
}

phase "npm dependencies" bash -c '[ -x node_modules/.bin/mocha ] && [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund'
phase "toolchain (pulumi, rustic, versitygw, qemu)" bash lab/toolchain.sh all
phase "lab guest image" bash lab/image.sh
phase "build" npm run --silent build
phase "typecheck" npx tsc -p tsconfig.check.json
rc=0
phase "unit tests" npx mocha --config test/.mocharc.unit.json || rc=$?
# The lab files run in two parallel shards, each on a lab of its own (DBOXED_TEST_SHARDS=1: one lab).
phase "lab tests" node --import tsx test/lab-shards.ts || rc=$?
summary
echo "total: $((SECONDS - t_all)) s"
exit $rc
