#!/usr/bin/env bash
# Installs every tool the lab and the tests need, built from the package registries this
# machine reaches. Each tool is cached outside the repo and reused when present.
# Usage: lab/toolchain.sh [apt|pulumi|rustic|versitygw|all]...
set -euo pipefail

CACHE="${DBOXED_LAB_CACHE:-$HOME/.cache/pulumi-dboxed-volumes}"
BIN="$CACHE/bin"
PULUMI_VERSION="v3.248.0"
RUSTIC_VERSION="0.11.4"
# v1.8.0: its conditional PUTs are atomic (v1.7.0 let several concurrent If-Match writers of one
# ETag win: a lease taken twice; versity/versitygw#2288). The provider refuses such a server.
VERSITYGW_VERSION="v1.8.0"
mkdir -p "$BIN"

step() { # step NAME COMMAND...: run COMMAND, print what and how long
  local name=$1; shift
  local t0=$SECONDS
  echo "[toolchain] $name: start"
  "$@"
  echo "[toolchain] $name: done in $((SECONDS - t0)) s"
}

apt_packages() {
  local pkgs=(qemu-system-x86 qemu-utils debootstrap openssh-client e2fsprogs socat zstd)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then echo "[toolchain] apt: all present"; return; fi
  echo "[toolchain] apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build_pulumi() {
  install_language_host
  if [ -x "$BIN/pulumi" ] && "$BIN/pulumi" version 2>/dev/null | grep -q "${PULUMI_VERSION}"; then
    echo "[toolchain] pulumi: cached $("$BIN/pulumi" version)"; return
  fi
  local w="$CACHE/build/pulumi"
  rm -rf "$w"; mkdir -p "$w"; cd "$w"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  # A throwaway wrapper module: pkg/go.mod has replace directives that `go install` refuses.
  go mod init local/pulumi-build >/dev/null 2>&1
  go get "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi@${PULUMI_VERSION}"
  go get "github.com/pulumi/pulumi/pkg/v3@${PULUMI_VERSION}" "github.com/pulumi/pulumi/sdk/v3@${PULUMI_VERSION}"
  local f="-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=${PULUMI_VERSION}"
  go build -trimpath -tags osusergo,grpcnotrace -ldflags "$f" -o "$BIN/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi
  cd /; rm -rf "$w"
}

# The official Node.js language host module is refused by the Go module proxy here; the lab's
# own host (lab/pulumi-language-nodejs.js, see its header) runs programs with the real SDK runner.
install_language_host() {
  local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  printf '#!/bin/sh\nexec node %s "$@"\n' "$here/pulumi-language-nodejs.js" > "$BIN/pulumi-language-nodejs"
  chmod +x "$BIN/pulumi-language-nodejs"
  # Dynamic providers: @pulumi/pulumi's own launcher, placed next to the CLI where it looks first.
  cat > "$BIN/pulumi-resource-pulumi-nodejs" <<'SH'
#!/bin/sh
PULUMI_DYNAMIC_PROVIDER_SCRIPT_PATH=$(node -e "console.log(require.resolve('@pulumi/pulumi/cmd/dynamic-provider'))")
if [ ! -z "$PULUMI_DYNAMIC_PROVIDER_SCRIPT_PATH" ]; then
    node "$PULUMI_DYNAMIC_PROVIDER_SCRIPT_PATH" $@
fi
SH
  chmod +x "$BIN/pulumi-resource-pulumi-nodejs"
}

build_rustic() {
  if [ -x "$BIN/rustic" ] && "$BIN/rustic" --version 2>/dev/null | grep -q "$RUSTIC_VERSION"; then
    echo "[toolchain] rustic: cached $("$BIN/rustic" --version)"; return
  fi
  # No default features: drops tui, jq, prometheus, otel, webdav; S3 (opendal) stays.
  CARGO_TARGET_DIR="$CACHE/build/cargo-target" \
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --locked --no-default-features rustic-rs --version "$RUSTIC_VERSION" --root "$CACHE/cargo" 
  cp "$CACHE/cargo/bin/rustic" "$BIN/rustic"
  rm -rf "$CACHE/build/cargo-target"
}

build_versitygw() {
  # Its --version says "git"; the version built is recorded next to it.
  if [ -x "$BIN/versitygw" ] && [ "$(cat "$BIN/versitygw.version" 2>/dev/null)" = "$VERSITYGW_VERSION" ]; then
    echo "[toolchain] versitygw: cached $VERSITYGW_VERSION"; return
  fi
  rm -f "$BIN/versitygw.version"
  CGO_ENABLED=0 GOBIN="$BIN" go install "github.com/versity/versitygw/cmd/versitygw@${VERSITYGW_VERSION}"
  echo "$VERSITYGW_VERSION" > "$BIN/versitygw.version"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case "$t" in
    apt) step apt apt_packages ;;
    pulumi) step pulumi build_pulumi ;;
    rustic) step rustic build_rustic ;;
    versitygw) step versitygw build_versitygw ;;
    all) step apt apt_packages; step versitygw build_versitygw; step pulumi build_pulumi; step rustic build_rustic ;;
    *) echo "unknown target: $t" >&2; exit 2 ;;
  esac
done
