#!/usr/bin/env bash
# The lab tests with the newest @pulumi/pulumi the npm registry serves, as a user's program would
# have it: the packed package installed next to that SDK (npm shares one copy through the caret
# range), run by the Node.js that SDK requires (Node.js builds are npm packages too).
#   npm run test:sdk-newest                 # the whole lab suite
#   npm run test:sdk-newest -- test/lab/smoke.test.ts test/lab/volume.test.ts
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${DBOXED_LAB_CACHE:-$HOME/.cache/pulumi-dboxed-volumes}
W="$CACHE/sdk-newest"
bash lab/toolchain.sh all
bash lab/image.sh
npm run --silent build
sdk=$(npm view @pulumi/pulumi version)
need=$(npm view "@pulumi/pulumi@$sdk" engines.node)          # e.g. ">=22"
major=$(printf '%s' "$need" | grep -o '[0-9]\+' | head -n1)
rm -rf "$W"; mkdir -p "$W"
tarball=$(npm pack --silent --pack-destination "$W" | tail -n1)
(cd "$W" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "@pulumi/pulumi@$sdk" "node@^$major" "./$tarball")
copies=$(cd "$W" && npm ls @pulumi/pulumi --all --parseable | sort -u | wc -l)
[ "$copies" = 1 ] || { echo "the program has $copies copies of @pulumi/pulumi (the caret range should let npm share one)" >&2; (cd "$W" && npm ls @pulumi/pulumi --all); exit 1; }
export PATH="$W/node_modules/.bin:$PATH"
echo "=== @pulumi/pulumi $(node -p "require('$W/node_modules/@pulumi/pulumi/package.json').version"), Node.js $(node --version) (engines: $need)"
export DBOXED_TEST_PROGRAM_MODULES="$W/node_modules"
if [ $# -gt 0 ]; then
  exec npx mocha --node-option import=tsx --require test/lab/hooks.ts --timeout 1200000 --reporter spec "$@"
fi
exec npx mocha --config test/.mocharc.lab.json
