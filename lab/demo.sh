#!/usr/bin/env bash
# The demo command (npm run demo): installs what it needs, builds, and runs lab/demo.ts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x node_modules/.bin/tsx ] || npm ci --no-audit --no-fund
bash lab/toolchain.sh all
bash lab/image.sh
npm run --silent build
exec node --import tsx lab/demo.ts
