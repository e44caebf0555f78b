#!/bin/bash
# dboxed-volume: the host side of a volume, run by its systemd units and by the provider.
#   dboxed-volume attach ID   make the volume's block device available (loop + VG activation)
#   dboxed-volume detach ID   release it again (after the mount unit is stopped)
#   dboxed-volume backup ID   crash-consistent backup: lvm2 snapshot -> rustic -> S3, retention
#   dboxed-volume maintain ID repository prune and check, when due and this host takes their lease
#   dboxed-volume prune-now ID     a repository prune at once, under its lease (after a delete's forget)
#   dboxed-volume check-lease ID   exit 0 only if this host still holds the volume's lease
#   dboxed-volume renew ID    move the lease's expiry on (only while this host holds it)
# Per-volume settings come from /etc/dboxed-volumes/ID/volume.env (written by the provider,
# every value quoted); the repository secrets sit in the root-only rustic profile next to it.
set -euo pipefail
umask 077
AGENT_VERSION=6
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

die() {
  echo "dboxed-volume: $*" >&2
  [ -n "${STATE_DIR:-}" ] && [ -d "$STATE_DIR" ] && printf '%s\n' "$*" > "$STATE_DIR/last-error"
  exit 1
}

# said FILE: the last lines of a tool's stderr that say something, on one line (rustic ends an
# error with a backtrace notice and headings such as "Some additional details ...").
said() {
  { grep -v -i -E -e 'backtrace' -e '^[[:space:]]*$' -e '^(Some additional details|Message:|Context:|Caused by:)' \
      -e 'had a problem and crashed|^We have generated a report|^We take privacy seriously|^Thank you kindly|^- (Homepage|Repository|Authors):|^To submit the crash report' \
      -e ': line [0-9]+: +[0-9]+ (Aborted|Killed|Segmentation fault)' "$1" || true; } \
    | tail -n 3 | tr '\n' ' ' | cut -c1-1500
}

# race FILE: whether a failed rustic run's stderr shows the repository changing under it, not
# damage. rustic reads the index, then snapshots, trees and packs, while other volumes back up,
# forget and (on another host) prune: a snapshot saved after the index was read has trees the run
# cannot find ("... not found in index"); a snapshot forgotten, or an index file or pack that a
# prune replaced, after it was listed answers 404 (NoSuchKey). All were seen in the soak test. A
# new run reads a fresh index and listing, so such a race does not repeat; damage does. rustic
# check logs each finding as an [ERROR] line and fails at the end: a run that also found anything
# else (a hash mismatch, a missing pack) is not a race, and is reported at once.
# One crash of rustic itself counts too: rustic_core's check (0.13.0, src/index.rs:312) does not
# join the threads that read trees, waits 100 ms for them to let go of the index, then panics
# "index still in use"; a host busy with other volumes' backups misses that window (seen in the
# soak). It happens before any pack data is read: nothing was checked wrongly, a new run checks.
RACE='not found in index|NoSuchKey|status: 404|rustic crashed: index still in use'
race() {
  grep -qiE "$RACE" "$1" || return 1
  ! grep -E '^\[ERROR\]' "$1" | grep -qviE "$RACE|Error reading file"
}

# step DESCRIPTION STDOUT_FILE COMMAND...: runs COMMAND; on failure dies with its last stderr lines.
step() {
  local desc=$1 out=$2; shift 2
  local err; err=$(mktemp)
  # The backup lock's descriptor (9) is not passed on: lvm2 warns of every descriptor it inherits.
  if ! "$@" > "$out" 2> "$err" 9>&-; then
    cat "$err" >&2
    local tail_; tail_=$(said "$err")
    rm -f "$err"
    die "$desc failed: $tail_"
  fi
  cat "$err" >&2
  rm -f "$err"
}

load() {
  local id=$1
  [[ "$id" =~ ^[a-z0-9][a-z0-9-]{0,39}$ ]] || die "invalid volume id: $id"
  [ -r "/etc/dboxed-volumes/$id/volume.env" ] || die "volume $id is not configured on this host"
  # shellcheck disable=SC1090
  . "/etc/dboxed-volumes/$id/volume.env"
  MAINT_CACHE="$STATE_DIR/maint-" # maint_known_not_due's records, per volume
}

loop_device() { losetup -j "$IMAGE" -n -O NAME 2>/dev/null | head -n1; }

attach() {
  load "$1"
  if [ "$OWN_VG" = 1 ]; then
    [ -f "$IMAGE" ] || die "backing image $IMAGE is missing"
    local dev; dev=$(loop_device)
    [ -n "$dev" ] || dev=$(losetup -f --show "$IMAGE")
    vgchange -q -ay "$VG" >/dev/null
  else
    lvchange -q -ay "$VG/$LV" >/dev/null
  fi
  [ -b "$DEVICE" ] || die "device $DEVICE did not appear"
}

detach() {
  load "$1"
  mountpoint -q "$MOUNT_PATH" && die "$MOUNT_PATH is still mounted"
  if [ "$OWN_VG" = 1 ]; then
    vgs "$VG" >/dev/null 2>&1 && vgchange -q -an "$VG" >/dev/null
    # Bounded: a deferred detach (autoclear) returns 0 while the device is still listed.
    local dev i
    for i in $(seq 1 30); do
      dev=$(loop_device)
      [ -n "$dev" ] || break
      losetup -d "$dev" 2>/dev/null || true
      sleep 0.2
    done
    [ -z "$(loop_device)" ] || echo "dboxed-volume: the loop device of $IMAGE is still attached (in use?)" >&2
  else
    lvs "$VG/$LV" >/dev/null 2>&1 && lvchange -q -an "$VG/$LV" >/dev/null
  fi
  return 0
}

remove_snapshot() {
  if mountpoint -q "$SNAP_MNT" 2>/dev/null; then umount "$SNAP_MNT" || umount -l "$SNAP_MNT"; fi
  if lvs "$VG/$SNAP_LV" >/dev/null 2>&1 9>&-; then lvremove -q -f -y "$VG/$SNAP_LV" >/dev/null 9>&-; fi
}

write_status() { # write_status STATUS SNAPSHOT_ID MESSAGE
  local now; now=$EPOCHSECONDS
  local final_req=""; [ "${FINAL:-0}" = 1 ] && final_req=$REQUEST
  local msg; msg=$(printf '%s' "$3" | tr -c 'A-Za-z0-9 .,:;_/()=+@-' ' ' | cut -c1-500)
  local last_ok=${LAST_OK:-0}
  [ "$1" = ok ] && last_ok=$now
  # finalRequest: the provider's nonce, set only when this run read the volume after it became
  # read-only for a final backup; snapshotAt: when the data backed up was frozen.
  printf '{"volumeId":"%s","status":"%s","startedAt":%s,"finishedAt":%s,"snapshotId":"%s","lastSuccessAt":%s,"message":"%s","agentVersion":%s,"finalRequest":"%s","snapshotAt":%s,"steps":"%s"}\n' \
    "$VOLUME_ID" "$1" "$STARTED" "$now" "$2" "$last_ok" "$msg" "$AGENT_VERSION" "$final_req" "${SNAPSHOT_AT:-0}" "${STEPS:-}" > "$STATE_DIR/status.json.tmp"
  mv -f "$STATE_DIR/status.json.tmp" "$STATE_DIR/status.json"
  chmod 0644 "$STATE_DIR/status.json"
  install -d -m 0755 "$METRICS_DIR"
  local ok=0; [ "$1" = ok ] && ok=1
  {
    echo "# HELP dboxed_volume_backup_success 1 if the last backup of the volume succeeded."
    echo "# TYPE dboxed_volume_backup_success gauge"
    echo "dboxed_volume_backup_success{volume=\"$VOLUME_ID\"} $ok"
    echo "# HELP dboxed_volume_backup_last_run_timestamp_seconds When the last backup attempt finished."
    echo "# TYPE dboxed_volume_backup_last_run_timestamp_seconds gauge"
    echo "dboxed_volume_backup_last_run_timestamp_seconds{volume=\"$VOLUME_ID\"} $now"
    echo "# HELP dboxed_volume_backup_last_success_timestamp_seconds When the last successful backup finished."
    echo "# TYPE dboxed_volume_backup_last_success_timestamp_seconds gauge"
    echo "dboxed_volume_backup_last_success_timestamp_seconds{volume=\"$VOLUME_ID\"} $last_ok"
    echo "# HELP dboxed_volume_backup_duration_seconds Duration of the last backup attempt."
    echo "# TYPE dboxed_volume_backup_duration_seconds gauge"
    echo "dboxed_volume_backup_duration_seconds{volume=\"$VOLUME_ID\"} $((now - STARTED))"
  } > "$METRICS_DIR/dboxed_volume_$VOLUME_ID.prom.tmp"
  chmod 0644 "$METRICS_DIR/dboxed_volume_$VOLUME_ID.prom.tmp"
  mv -f "$METRICS_DIR/dboxed_volume_$VOLUME_ID.prom.tmp" "$METRICS_DIR/dboxed_volume_$VOLUME_ID.prom"
}

# etag_of HEADERS: the ETag of a response whose headers curl saved with -D (empty when none).
etag_of() { [ -e "$1" ] || return 0; tr -d '\r' < "$1" | sed -n 's/^[Ee][Tt][Aa][Gg]: *//p' | tail -n1; }

# Fencing: a host backs up only while the volume's lease in S3 carries the token it was given.
# A move hands the lease to the new host with a new token, so a stale old host is refused.
check_lease() {
  [ -n "${LEASE_URL:-}" ] || die "volume $VOLUME_ID has no lease settings: run pulumi up to update the host"
  local out code
  out=$(mktemp)
  code=$(curl -sS -m 60 --retry 2 -o "$out" -w '%{http_code}' -H "x-amz-content-sha256: $EMPTY_SHA256" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$LEASE_URL" 2>&1) || { rm -f "$out"; die "cannot read the lease of $VOLUME_ID: $code"; }
  if [ "$code" != 200 ]; then rm -f "$out"; die "the lease of $VOLUME_ID cannot be read (HTTP $code): refusing to back up"; fi
  if ! grep -q "\"token\": *\"$LEASE_TOKEN\"" "$out"; then
    rm -f "$out"
    die "this host no longer holds volume $VOLUME_ID (its lease was handed to another host): refusing to back up"
  fi
  rm -f "$out"
}

# Renewal: the holder moves the lease's expiry on (a compare-and-swap on its ETag), so that
# `force` elsewhere can tell a live holder from a dead one. Only with this host's token: a host
# whose lease was handed on or taken cannot renew it. Also the check before every backup.
renew_lease() {
  [ -n "${LEASE_URL:-}" ] || die "volume $VOLUME_ID has no lease settings: run pulumi up to update the host"
  local dir code etag attempt t_req off
  dir=$(mktemp -d)
  for attempt in 1 2 3 4; do
    t_req=$EPOCHSECONDS
    code=$(curl -sS -m 60 --retry 2 -D "$dir/h" -o "$dir/b" -w '%{http_code}' -H "x-amz-content-sha256: $EMPTY_SHA256" \
      --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$LEASE_URL" 2>&1) || { rm -rf "$dir"; die "cannot read the lease of $VOLUME_ID: $code"; }
    if [ "$code" != 200 ]; then rm -rf "$dir"; die "the lease of $VOLUME_ID cannot be read (HTTP $code): refusing to back up"; fi
    if ! grep -q "\"token\": *\"$LEASE_TOKEN\"" "$dir/b"; then
      rm -rf "$dir"
      die "this host no longer holds volume $VOLUME_ID (its lease was handed to another host): refusing to back up"
    fi
    # A lease without expiry (written by an older provider) gets one at the provider's next write.
    if [ -z "${LEASE_SECONDS:-}" ] || ! grep -q '^  "expiresAt": [0-9]*,\{0,1\}$' "$dir/b"; then rm -rf "$dir"; return 0; fi
    etag=$(etag_of "$dir/h")
    [ -n "$etag" ] || { rm -rf "$dir"; die "the lease of $VOLUME_ID came without an ETag: cannot renew it"; }
    # On the S3 server's clock (its Date header), as the provider reckons it: a host whose clock is
    # off neither looks dead to force elsewhere nor holds the lease longer than it should.
    off=$(srv_offset "$dir/h" "$t_req"); SRV_OFF=$off
    sed "s/^  \"expiresAt\": [0-9]*/  \"expiresAt\": $(( $EPOCHSECONDS + off + LEASE_SECONDS ))/" "$dir/b" > "$dir/n"
    code=$(curl -sS -m 60 -o /dev/null -w '%{http_code}' -X PUT --data-binary "@$dir/n" -H "Content-Type: application/json" \
      -H "If-Match: $etag" -H "x-amz-content-sha256: $(sha256sum < "$dir/n" | cut -c1-64)" \
      --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$LEASE_URL" 2>&1) || code="($code)"
    case "$code" in
      200) rm -rf "$dir"; return 0 ;;
      412|409) sleep "$attempt" ;; # changed meanwhile (the provider during a move): read it again
      *) rm -rf "$dir"; die "cannot renew the lease of $VOLUME_ID: HTTP $code" ;;
    esac
  done
  rm -rf "$dir"
  die "cannot renew the lease of $VOLUME_ID: it kept changing"
}

# An lvm2 snapshot whose copy-on-write space ran out is invalid: lv_attr's 5th character is I
# (or snap_percent reached 100). Fails closed: a snapshot that cannot be inspected is not valid.
snapshot_valid() {
  local out; out=$(lvs --noheadings --reportformat json -o lv_attr,snap_percent "$VG/$SNAP_LV" 2>/dev/null 9>&-) || return 1
  local attr pct
  attr=$(printf '%s' "$out" | grep -o '"lv_attr":"[^"]*"' | cut -d'"' -f4)
  pct=$(printf '%s' "$out" | grep -o '"snap_percent":"[^"]*"' | cut -d'"' -f4)
  [ -n "$attr" ] || return 1
  [ "${attr:4:1}" = I ] && return 1
  [ "${pct%%.*}" = 100 ] && return 1
  return 0
}

# Forgets the snapshots listed in discard (read from invalid lvm2 snapshots); keeps the list if that fails.
forget_discarded() {
  [ -s "$STATE_DIR/discard" ] || return 0
  # shellcheck disable=SC2046
  if rustic_ forget $(sort -u "$STATE_DIR/discard" | grep -x '[0-9a-f]\{64\}') >&2; then rm -f "$STATE_DIR/discard"; fi
}

# timing NAME: appends "NAME=seconds" since the last mark to STEPS (status.json, journal).
# Bash's own clocks, not date(1): a process costs a busy host more than the step it times.
timing() {
  local now=${EPOCHREALTIME//[!0-9]/} d
  d=$(( (now - MARK + 50000) / 100000 ))
  [ "$d" -ge 0 ] || d=0 # the clock set back meanwhile
  STEPS="${STEPS:+$STEPS }$1=$((d / 10)).$((d % 10))"
  MARK=$now
}

# crash_cause REPORT: "MESSAGE (FILE:LINE)" from a human-panic report (TOML). The message may be
# huge (the "index still in use" one prints the whole index on one line) and comes before the
# backtrace: only the report's head is read, and each line is cut before any regex sees it.
# TOML writes a string as "...", '...', """...""" or '''...''', a block when it has line breaks.
crash_cause() {
  head -c 65536 "$1" | awk '
    /^cause = / {
      v = substr($0, 9, 300)
      if (v == "\"\"\"" || v == "'"'''"'") { getline v; v = substr(v, 1, 300) }
      else { sub(/^("""|'"'''"'|"|'"'"')/, "", v); sub(/("""|'"'''"'|"|'"'"')$/, "", v) }
      cause = substr(v, 1, 200)
    }
    { l = substr($0, 1, 1000) }
    l ~ /Panic occurred in file .* at line [0-9]+/ {
      w = l; sub(/.*Panic occurred in file /, "", w); sub(/ at line /, ":", w); sub(/[^0-9]*$/, "", w)
      gsub(/'"'"'/, "", w); sub(/.*registry\/src\/[^\/]*\//, "", w); where = w
    }
    END { printf "%s (%s)", cause == "" ? "unknown" : cause, where == "" ? "place unknown" : where }'
}

# rustic_ ARGS...: rustic on the volume's profile. On a panic rustic (human-panic) writes a crash
# report to $TMPDIR and prints only boilerplate: a private TMPDIR lets a crash say what it was (the
# panic's message and place, last on stderr, where said and race read) and leaves no report
# behind. RUST_BACKTRACE or CI in the environment would make human-panic print the report (the
# whole index, for the crash above) instead of writing it.
rustic_() {
  local t rc=0 r tmp=()
  t=$(mktemp -d -t dboxed-rustic.XXXXXX 2>/dev/null) || t=""
  [ -z "$t" ] || tmp=("TMPDIR=$t")
  env -u RUST_BACKTRACE -u CI "${tmp[@]}" NO_COLOR=1 "$RUSTIC" -P "$PROFILE" --no-progress --cache-dir /var/cache/dboxed-volumes/rustic "$@" || rc=$?
  if [ "$rc" != 0 ] && [ -n "$t" ]; then
    for r in "$t"/report-*.toml; do
      if [ -f "$r" ]; then echo "rustic crashed: $(crash_cause "$r")" >&2; fi
    done
  fi
  if [ -n "$t" ]; then rm -rf "$t"; fi
  return "$rc"
}

# Crash-report directories of rustic runs killed (a stopped unit) before they could remove them.
sweep_rustic_tmp() { find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'dboxed-rustic.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true; }

# Backups and the repository's prune never overlap. rustic 0.12.0 "fixes a bug in prune which can
# lead to potential data loss when multiple parallel prune and backup runs are in the game"; the
# newest rustic the package registries carry is 0.11.4 on rustic_core 0.13.0, which predates the
# fix. A backup marks itself running (an object "backup-<volume>.json" next to the maintenance
# leases) before it reads the repository, then reads the prune lease; a prune writes its lease,
# then lists the marks. Each writes before it reads, so of a backup and a prune that start at the
# same moment at least one sees the other and gives way: the backup waits, the prune tries again
# at its next run. A mark lapses after BACKUP_MARK_TTL (a backup's longest run) should its host
# die mid-backup; a clean end, or a stopped run, deletes it.
BACKUP_MARK_TTL=${BACKUP_MARK_TTL:-21600}
s3_delete() { # s3_delete URL: prints the HTTP code (204 or 404 is gone)
  curl -sS -m "${S3_MAX_TIME:-60}" --retry "${S3_RETRY:-2}" -o /dev/null -w '%{http_code}' -X DELETE -H "x-amz-content-sha256: $EMPTY_SHA256" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$1" 2>/dev/null || echo 000
}
s3_put() { # s3_put URL FILE: an unconditional PUT; prints the HTTP code
  curl -sS -m "${S3_MAX_TIME:-60}" --retry "${S3_RETRY:-2}" -o /dev/null -w '%{http_code}' -X PUT --data-binary "@$2" -H "Content-Type: application/json" \
    -H "x-amz-content-sha256: $(sha256sum < "$2" | cut -c1-64)" --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$1" 2>/dev/null || echo 000
}

# backup_gate: waits while a prune holds the repository (at most PRUNE_WAIT_SECONDS), then marks this backup running.
backup_gate() {
  [ -n "${MAINT_URL:-}" ] || return 0
  local url="${MAINT_URL}backup-$VOLUME_ID.json" d code holder waited=0 max=${PRUNE_WAIT_SECONDS:-3600} off=${SRV_OFF:-0}
  d=$(mktemp -d)
  while :; do
    maint_json "$VOLUME_ID@${HOSTNAME:-$(hostname)}" $(( $EPOCHSECONDS + off + BACKUP_MARK_TTL )) 0 0 "" "" "" 0 "" > "$d/m"
    code=$(s3_put "$url" "$d/m")
    [ "$code" = 200 ] || { rm -rf "$d"; die "cannot mark the backup running for the repository's prune (HTTP $code): refusing to back up beside a prune"; }
    BACKUP_MARKED=1
    holder=$(maint_busy prune "$off")
    [ -n "$holder" ] || break
    backup_unmark
    if [ "$waited" -ge "$max" ]; then
      rm -rf "$d"; die "the repository's prune has been running on $holder for over $max s: a backup must not run beside it; the next run tries again"
    fi
    [ "$waited" != 0 ] || echo "waiting for the repository's prune on $holder to end (a backup never runs beside a prune)"
    sleep 5; waited=$((waited + 5))
  done
  [ "$waited" = 0 ] || echo "the prune ended after $waited s"
  rm -rf "$d"
}

backup_unmark() {
  [ "${BACKUP_MARKED:-0}" = 1 ] || return 0
  BACKUP_MARKED=0
  local code; code=$(s3_delete "${MAINT_URL}backup-$VOLUME_ID.json")
  case "$code" in 204|200|404) ;; *) echo "could not remove this backup's running mark (HTTP $code): it lapses in $BACKUP_MARK_TTL s" >&2 ;; esac
}

# backups_running OFFSET: prints the holder of a live backup mark, if any (an unreadable listing counts as one).
# Fails closed: settings without the listing's URL (written before it existed), a listing that
# cannot be read or is cut short, a mark that cannot be read: each counts as a backup running.
backups_running() {
  if [ -z "${MAINT_LIST_URL:-}" ]; then echo "(this volume's settings predate backup marks: run pulumi up)"; return 0; fi
  local d code key holder expires; d=$(mktemp -d)
  code=$(s3_get "$MAINT_LIST_URL" "$d")
  if [ "$code" != 200 ]; then echo "(the backup marks cannot be listed: HTTP $code)"; rm -rf "$d"; return 0; fi
  if grep -q '<IsTruncated>true</IsTruncated>' "$d/b"; then echo "(more backup marks than one listing holds)"; rm -rf "$d"; return 0; fi
  for key in $(grep -o '<Key>[^<]*</Key>' "$d/b" | sed -e 's/^<Key>//' -e 's/<\/Key>$//' | grep -E '/backup-[a-z0-9-]+\.json$' || true); do
    code=$(s3_get "${MAINT_URL}${key##*/}" "$d")
    [ "$code" != 404 ] || continue # ended since the listing
    if [ "$code" != 200 ]; then echo "(backup mark ${key##*/} unreadable: HTTP $code)"; break; fi
    holder=$(mfield holder "$d/b"); expires=$(num "$(mfield expiresAt "$d/b")")
    if [ -n "$holder" ] && [ "$expires" -gt $(( $EPOCHSECONDS + $1 )) ]; then echo "$holder"; break; fi
  done
  rm -rf "$d"
}

# unreadable STDERR SRC MOUNT_PATH: what rustic backup left out because it could not read it (its
# first "[WARN] ignoring error" line, the snapshot's mount shown as the volume's path), or nothing.
unreadable() {
  local line
  line=$(grep -m1 -E '^\[WARN\] ignoring error' "$1" 2>/dev/null) || return 0
  line=${line#\[WARN\] ignoring error}; line=${line#:}; line=${line# }
  line=${line//"$2"/"$3"}
  printf '%s\n' "${line:0:400}"
}

finish_backup() {
  local rc=$1
  trap - EXIT TERM
  set +e
  backup_unmark
  [ "${SNAP_GONE:-0}" = 1 ] || remove_snapshot
  if [ "$rc" -eq 0 ]; then
    echo "steps: $STEPS"
    write_status ok "$SNAPSHOT_ID" "backup ok"
  else
    write_status failed "" "$(cat "$STATE_DIR/last-error" 2>/dev/null || echo "exit code $rc")"
  fi
  exit "$rc"
}

backup() {
  load "$1"
  mkdir -p "$STATE_DIR" "/run/dboxed-volumes/$VOLUME_ID"
  SNAP_MNT="/run/dboxed-volumes/$VOLUME_ID/snapshot"
  STARTED=$EPOCHSECONDS
  MARK=${EPOCHREALTIME//[!0-9]/}; STEPS=""
  SNAPSHOT_ID=""; SNAPSHOT_AT=0; FINAL=0; REQUEST=""
  LAST_OK=$(sed -n 's/.*"lastSuccessAt":\([0-9]*\).*/\1/p' "$STATE_DIR/status.json" 2>/dev/null || true)
  sweep_rustic_tmp
  exec 9>"$STATE_DIR/backup.lock"
  flock -w "${LOCK_WAIT_SECONDS:-900}" 9 || die "another backup of $VOLUME_ID holds the lock"
  rm -f "$STATE_DIR/last-error"
  timing lock
  trap 'finish_backup $?' EXIT
  # systemctl stop (a stopped move, a shutdown): the snapshot is removed and the status written.
  trap 'exit 143' TERM
  renew_lease
  timing lease
  [ -e "$STATE_DIR/initialized" ] || die "volume $VOLUME_ID is not initialised yet (restore pending): refusing to back up"
  mountpoint -q "$MOUNT_PATH" || die "volume $VOLUME_ID is not mounted at $MOUNT_PATH"
  remove_snapshot # leftovers of an interrupted run
  forget_discarded
  # A final backup (move, delete, rebuild): the provider made the filesystem read-only, then
  # wrote a nonce to final-request. Read here, under the lock and before anything is frozen,
  # it proves that this run's data is from after the read-only remount.
  REQUEST=$( { tr -dc 'a-f0-9' < "$STATE_DIR/final-request"; } 2>/dev/null || true)
  FINAL=0
  if [ -n "$REQUEST" ] && findmnt -n -o OPTIONS --mountpoint "$MOUNT_PATH" | tr ',' '\n' | grep -qx ro; then FINAL=1; fi
  if [ "$FINAL" = 0 ] && [ -e "/etc/dboxed-volumes/$VOLUME_ID/fenced" ]; then
    die "volume $VOLUME_ID is fenced for a move (read-only until the move finishes or is undone): no periodic backups"
  fi
  backup_gate
  timing gate
  local src
  if [ "$FINAL" = 1 ]; then
    # Nothing can change a read-only filesystem: back it up directly, no lvm2 snapshot needed.
    SNAPSHOT_AT=$EPOCHSECONDS
    src=$MOUNT_PATH
    echo "final backup of the read-only volume (request $REQUEST)"
  else
    sync -f "$MOUNT_PATH"
    echo "creating snapshot $VG/$SNAP_LV"
    SNAPSHOT_AT=$EPOCHSECONDS
    # lvcreate suspends the origin and freezes the filesystem: the snapshot is crash-consistent.
    if [ "$OWN_VG" = 1 ]; then
      step "lvm snapshot" /dev/null lvcreate -q -s -kn -l 100%FREE -n "$SNAP_LV" "$VG/$LV"
    else
      step "lvm snapshot" /dev/null lvcreate -q -s -kn -L "${SNAPSHOT_BYTES}b" -n "$SNAP_LV" "$VG/$LV"
    fi
    timing snapshot
    mkdir -p "$SNAP_MNT"
    local opts=ro
    [ "$FILESYSTEM" = xfs ] && opts=ro,nouuid
    step "mounting the snapshot" /dev/null mount -t "$FILESYSTEM" -o "$opts" "/dev/$VG/$SNAP_LV" "$SNAP_MNT"
    timing mount
    src=$SNAP_MNT
  fi
  echo "backing up $MOUNT_PATH as host $RUSTIC_HOST"
  local rc err attempt; err=$(mktemp)
  for attempt in 1 2 3; do
    rc=0
    rustic_ backup --json --host "$RUSTIC_HOST" --label "$VOLUME_ID" \
      --tag dboxed-volume --tag "volume-$VOLUME_ID" --as-path / --no-scan -x --group-by host,label,paths "$src" \
      > "$STATE_DIR/last-backup.json" 2> "$err" || rc=$?
    cat "$err" >&2
    # A failed run saved no snapshot (its packs are left for prune): running it again is safe,
    # unless the lvm2 snapshot overflowed meanwhile (reported below).
    [ "$rc" != 0 ] && [ "$attempt" -lt 3 ] && race "$err" || break
    [ "$FINAL" = 1 ] || snapshot_valid || break
    echo "the repository changed while rustic backup read it (another host's prune or forget): trying again (attempt $((attempt + 1)) of 3)" >&2
    sleep $((2 * attempt))
  done
  SNAPSHOT_ID=$(grep -o '"id": *"[0-9a-f]\{64\}"' "$STATE_DIR/last-backup.json" | head -n1 | grep -o '[0-9a-f]\{64\}' || true)
  backup_unmark
  timing rustic
  if [ "$FINAL" = 0 ] && ! snapshot_valid; then
    # The copy-on-write space ran out while rustic read the snapshot: what it read is not the
    # volume's state. Whatever it saved must not become anybody's "latest": it is recorded in
    # discard (forgotten by the next run if this forget fails) and forgotten now.
    [ -z "$SNAPSHOT_ID" ] || echo "$SNAPSHOT_ID" >> "$STATE_DIR/discard"
    forget_discarded
    rm -f "$err"; SNAPSHOT_ID=""
    die "the lvm2 snapshot overflowed: the volume changed by more than its snapshot space ($((SNAPSHOT_BYTES / 1048576)) MiB) while the backup read it; the incomplete snapshot was discarded. Raise snapshotSpace (volumes in a shared volumeGroup) or back up when the volume is quieter"
  fi
  if [ "$rc" != 0 ]; then
    local tail_; tail_=$(said "$err"); rm -f "$err"
    die "rustic backup failed: $tail_"
  fi
  # rustic 0.11 leaves out a file or directory it cannot read (an I/O error, a permission) with a
  # warning and exits 0: such a snapshot is not the volume, and must not become anybody's latest.
  local unread; unread=$(unreadable "$err" "$src" "$MOUNT_PATH")
  if [ -n "$unread" ]; then
    [ -z "$SNAPSHOT_ID" ] || echo "$SNAPSHOT_ID" >> "$STATE_DIR/discard"
    forget_discarded
    rm -f "$err"; SNAPSHOT_ID=""
    die "rustic could not read everything, so the snapshot it saved was incomplete and was discarded: $unread"
  fi
  rm -f "$err"
  [ -n "$SNAPSHOT_ID" ] || die "rustic reported no snapshot id"
  echo "snapshot $SNAPSHOT_ID saved"
  remove_snapshot
  SNAP_GONE=1
  timing release
  if [ "$FINAL" = 1 ]; then
    # A final backup is on the critical path of a move or delete: retention waits for the next run.
    echo "backup of $VOLUME_ID done (final)"
    return 0
  fi
  # Retention from the second backup on this host: the first one (a create's or a restore's)
  # follows snapshots that the previous holder's runs already thinned.
  if [ -e "$STATE_DIR/retention-started" ]; then
    echo "applying retention"
    # forget reads every snapshot file of the repository before it filters: another volume's
    # forget may delete one in between (a 404, seen in the soak test). A fresh listing is past it;
    # with many volumes forgetting every few minutes it may take a few.
    local attempt
    for attempt in 1 2 3 4; do
      if rustic_ forget --filter-host "$RUSTIC_HOST" --group-by host,label,paths \
        --keep-last "$KEEP_LAST" --keep-hourly "$KEEP_HOURLY" --keep-daily "$KEEP_DAILY" \
        --keep-weekly "$KEEP_WEEKLY" --keep-monthly "$KEEP_MONTHLY" --keep-yearly "$KEEP_YEARLY" > /dev/null 2> "$STATE_DIR/forget.err"; then
        cat "$STATE_DIR/forget.err" >&2; rm -f "$STATE_DIR/forget.err"; break
      fi
      cat "$STATE_DIR/forget.err" >&2
      if [ "$attempt" = 4 ] || { [ "$attempt" -ge 2 ] && ! race "$STATE_DIR/forget.err"; }; then
        local tail_; tail_=$(said "$STATE_DIR/forget.err")
        rm -f "$STATE_DIR/forget.err"
        die "rustic forget failed: $tail_"
      fi
      echo "rustic forget failed (another volume's forget deletes snapshots meanwhile?): listing them again (attempt $((attempt + 1)) of 4)" >&2
      sleep $((2 * attempt))
    done
    timing forget
  else
    touch "$STATE_DIR/retention-started"
  fi
  # Repository maintenance runs in a unit of its own, so that a long prune or check never holds
  # this volume's backups (or a move's final backup, which waits for a running backup) back.
  if [ -n "${MAINT_URL:-}" ] && ! { maint_known_not_due prune "$PRUNE_INTERVAL" && maint_known_not_due check "$CHECK_INTERVAL"; }; then
    systemctl start --no-block "dboxed-volume-$VOLUME_ID-maintain.service" 2>/dev/null || true
  fi
  echo "backup of $VOLUME_ID done"
}

# Repository maintenance: prune and check are for the whole repository, run at most once per
# interval by whichever host first takes the task's lease in S3 (a conditional write: If-None-Match
# for a new lease object, If-Match on its ETag after). The holder renews the lease while the task
# runs; a host that dies mid-task blocks it only until the lease expires (MAINT_TTL).
MAINT_TTL=${MAINT_TTL:-300}

# S3_MAX_TIME / S3_RETRY: how long one request may take and how often it is retried (a renewal
# while a task runs must end well before the lease would expire).
s3_get() { # s3_get URL DIR: body in DIR/b, headers in DIR/h; prints the HTTP code
  curl -sS -m "${S3_MAX_TIME:-60}" --retry "${S3_RETRY:-2}" -D "$2/h" -o "$2/b" -w '%{http_code}' -H "x-amz-content-sha256: $EMPTY_SHA256" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$1" 2>/dev/null || echo 000
}

s3_put_cas() { # s3_put_cas URL FILE ETAG DIR: PUT only if the object still has ETAG ("" = absent); its new ETag in DIR/etag
  local cond code
  if [ -n "$3" ]; then cond="If-Match: $3"; else cond="If-None-Match: *"; fi
  code=$(curl -sS -m "${S3_MAX_TIME:-60}" -D "$4/ph" -o /dev/null -w '%{http_code}' -X PUT --data-binary "@$2" -H "Content-Type: application/json" \
    -H "$cond" -H "x-amz-content-sha256: $(sha256sum < "$2" | cut -c1-64)" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$1" 2>/dev/null) || code=000
  etag_of "$4/ph" > "$4/etag"
  echo "$code"
}

# mfield NAME FILE: a field of a maintenance lease (one field per line, as maint_json writes them).
mfield() { sed -n "s/^  \"$1\": \"\{0,1\}\([^\"]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$2" | head -n1 | sed 's/,$//'; }
num() { if [[ "${1:-}" =~ ^[0-9]+$ ]]; then echo "$1"; else echo 0; fi; }
clean() { printf '%s' "$1" | tr -c 'A-Za-z0-9 .,:;_/()=+@%-' ' ' | cut -c1-300; }

maint_json() { # holder expiresAt runs lastRunAt lastResult lastMessage lastHolder lastDurationSeconds lastSubset
  printf '{\n  "holder": "%s",\n  "expiresAt": %s,\n  "runs": %s,\n  "lastRunAt": %s,\n  "lastResult": "%s",\n  "lastMessage": "%s",\n  "lastHolder": "%s",\n  "lastDurationSeconds": %s,\n  "lastSubset": "%s"\n}\n' "$@"
}

maint_metric() { # maint_metric TASK OK DURATION
  local f; f="$METRICS_DIR/dboxed_repository_$1_$(printf '%s' "$REPOSITORY" | sha256sum | cut -c1-12).prom"
  install -d -m 0755 "$METRICS_DIR"
  {
    echo "# HELP dboxed_repository_maintenance_success 1 if the last repository prune or check that this host ran succeeded."
    echo "# TYPE dboxed_repository_maintenance_success gauge"
    echo "dboxed_repository_maintenance_success{task=\"$1\",repository=\"$REPOSITORY\"} $2"
    echo "# HELP dboxed_repository_maintenance_last_run_timestamp_seconds When this host last finished the task."
    echo "# TYPE dboxed_repository_maintenance_last_run_timestamp_seconds gauge"
    echo "dboxed_repository_maintenance_last_run_timestamp_seconds{task=\"$1\",repository=\"$REPOSITORY\"} $EPOCHSECONDS"
    echo "# HELP dboxed_repository_maintenance_duration_seconds How long the task took."
    echo "# TYPE dboxed_repository_maintenance_duration_seconds gauge"
    echo "dboxed_repository_maintenance_duration_seconds{task=\"$1\",repository=\"$REPOSITORY\"} $3"
  } > "$f.tmp"
  chmod 0644 "$f.tmp"
  mv -f "$f.tmp" "$f"
}

# srv_offset HEADERS: the S3 server's clock minus this host's, from a response's Date header
# (every expiry is reckoned on the server's clock, so skewed host clocks cannot share a lease).
# Given the local time taken just before the request, the largest offset the answer allows (the
# Date header is stamped after the request left and truncated to the second): an offset taken
# too small would write expiries already past, a stall after the answer notwithstanding.
srv_offset() { # srv_offset HEADERS LOCAL_TIME_BEFORE_REQUEST
  local d; d=$(tr -d '\r' < "$1" 2>/dev/null | sed -n 's/^[Dd]ate: *//p' | tail -n1)
  # No Date header: no offset (date -d "" would read as today's midnight).
  [ -n "$d" ] || { echo 0; return 0; }
  local t; t=$(date -d "$d" +%s 2>/dev/null) || { echo 0; return 0; }
  echo $(( t - $2 + 1 ))
}

# maint_renew URL ME NOW_OFFSET FIELDS...: one renewal by compare-and-swap on DIR/cur; 0 when
# renewed, 1 when the lease was lost (someone else wrote it), 2 when S3 did not answer.
# maint_busy TASK OFFSET: prints the holder of TASK's lease while it holds (on the server's clock).
maint_busy() {
  local d code holder expires; d=$(mktemp -d)
  code=$(s3_get "$MAINT_URL$1.json" "$d")
  if [ "$code" = 200 ]; then
    holder=$(mfield holder "$d/b"); expires=$(num "$(mfield expiresAt "$d/b")")
    [ -z "$holder" ] || [ "$expires" -le $(( $EPOCHSECONDS + $2 )) ] || echo "$holder"
  elif [ "$code" != 404 ]; then
    echo "(its lease is unreadable: HTTP $code)"
  fi
  rm -rf "$d"
}

maint_renew() {
  local url=$1 dir=$2 off=$3; shift 3
  maint_json "$me" $(( $EPOCHSECONDS + off + MAINT_TTL )) "$@" > "$dir/r/n"
  local c; c=$(s3_put_cas "$url" "$dir/r/n" "$(cat "$dir/cur")" "$dir/r")
  case "$c" in
    200) [ -s "$dir/r/etag" ] || return 2; cp "$dir/r/etag" "$dir/cur"; return 0 ;;
    412|409)
      # Our write may have landed with its answer lost: the lease is still ours if it names us.
      c=$(s3_get "$url" "$dir/r")
      if [ "$c" = 200 ] && [ "$(mfield holder "$dir/r/b")" = "$me" ]; then
        etag_of "$dir/r/h" > "$dir/cur"; return 2
      fi
      [ "$c" = 200 ] && return 1
      return 2 ;;
    *) return 2 ;;
  esac
}

# A task's last run as this host last read it from the task's lease, in MAINT_CACHE<task>.last:
# lastRunAt on this host's clock (a lower bound: the offset is an upper bound), the lease's URL,
# and when it was read. Until lastRunAt + interval the task cannot be due (every run, also a
# failed one, only moves lastRunAt on; a cut-off run leaves it), so a backup neither starts the
# maintenance unit nor reads S3 then: reading and parsing the leases cost a busy host seconds per
# backup. A record is trusted for an hour after it was read (a lease reset by hand, or the clock set
# back, is seen within the hour), not at all when it lies in the future, or is of another repository.
MAINT_CACHE_MAX=${MAINT_CACHE_MAX:-3600}
maint_known_not_due() { # maint_known_not_due TASK INTERVAL
  local f="${MAINT_CACHE:-}$1.last" at url read_at
  [ -n "${MAINT_CACHE:-}" ] || return 1
  [[ "$2" =~ ^[0-9]{1,12}$ ]] || return 1
  [ $((10#$2)) -gt 0 ] || return 0 # a task turned off is never due
  [ -r "$f" ] && read -r at url read_at < "$f" || return 1
  [[ "$at" =~ ^(0|[1-9][0-9]{0,17})$ && "$read_at" =~ ^[1-9][0-9]{0,17}$ ]] && [ "$url" = "$MAINT_URL$1.json" ] || return 1
  [ "$read_at" -le "$EPOCHSECONDS" ] && [ $((EPOCHSECONDS - read_at)) -lt "$MAINT_CACHE_MAX" ] || return 1
  # A last run up to a minute ahead is the offset's rounding up (a slow answer), not a clock set back.
  [ "$at" -le $((EPOCHSECONDS + 60)) ] && [ $((at + 10#$2)) -gt "$EPOCHSECONDS" ]
}

maintain_task() { # maintain_task TASK INTERVAL COMMAND...: runs COMMAND if due and this host takes the lease
  local task=$1 interval=$2; shift 2
  [ "$(num "$interval")" -gt 0 ] || return 0
  local url="$MAINT_URL$task.json" dir code etag now off
  me="$VOLUME_ID@$(hostname)"
  dir=$(mktemp -d)
  local t_req; t_req=$EPOCHSECONDS
  code=$(s3_get "$url" "$dir")
  case "$code" in
    200) etag=$(etag_of "$dir/h") ;;
    404) etag=""; : > "$dir/b" ;;
    *) echo "maintenance $task: cannot read its lease (HTTP $code): skipped" >&2; rm -rf "$dir"; return 0 ;;
  esac
  off=$(srv_offset "$dir/h" "$t_req")
  if [ $(( $EPOCHSECONDS - t_req )) -gt $(( MAINT_TTL / 10 + 2 )) ]; then
    echo "maintenance $task: this host took $(( $EPOCHSECONDS - t_req )) s to read the S3 server's clock: too slow to hold a lease, the next run tries again"
    rm -rf "$dir"; return 0
  fi
  local holder expires runs last_run last_result last_msg last_holder last_dur last_subset
  holder=$(mfield holder "$dir/b"); expires=$(num "$(mfield expiresAt "$dir/b")"); runs=$(num "$(mfield runs "$dir/b")")
  last_run=$(num "$(mfield lastRunAt "$dir/b")"); last_result=$(mfield lastResult "$dir/b"); last_msg=$(mfield lastMessage "$dir/b")
  last_holder=$(mfield lastHolder "$dir/b"); last_dur=$(num "$(mfield lastDurationSeconds "$dir/b")"); last_subset=$(mfield lastSubset "$dir/b")
  now=$(( $EPOCHSECONDS + off ))
  [ -z "${MAINT_CACHE:-}" ] || printf '%s %s %s\n' "$((last_run - off))" "$url" "$t_req" > "$MAINT_CACHE$task.last" || true
  if [ "$expires" -gt "$now" ]; then echo "maintenance $task: $holder runs it (its lease holds for $((expires - now)) s)"; rm -rf "$dir"; return 0; fi
  if [ $((last_run + interval)) -gt "$now" ]; then rm -rf "$dir"; return 0; fi
  runs=$((runs + 1))
  local subset=""
  [ "$task" = check ] && subset="$(( (runs - 1) % CHECK_SUBSETS + 1 ))/$CHECK_SUBSETS"
  local fields=("$runs" "$last_run" "$last_result" "$last_msg" "$last_holder" "$last_dur" "$last_subset")
  # The expiry counts from just before the write, not from the read above: on a busy host minutes
  # may pass in between (seen in the soak), and a lease written already expired excludes nobody.
  local wrote_at; wrote_at=$(( $EPOCHSECONDS + off ))
  maint_json "$me" $((wrote_at + MAINT_TTL)) "${fields[@]}" > "$dir/n"
  code=$(s3_put_cas "$url" "$dir/n" "$etag" "$dir")
  case "$code" in
    200) ;;
    412|409) echo "maintenance $task: another host took it first"; rm -rf "$dir"; return 0 ;;
    *) echo "maintenance $task: cannot take its lease (HTTP $code): skipped" >&2; rm -rf "$dir"; return 0 ;;
  esac
  if [ ! -s "$dir/etag" ]; then
    echo "maintenance $task: S3 answered without an ETag, so the lease cannot be renewed: skipped (it expires in $MAINT_TTL s)" >&2
    rm -rf "$dir"; return 0
  fi
  cp "$dir/etag" "$dir/cur"
  # Prune and check never run at once (a prune deletes packs that a check is reading). Each takes
  # its own lease first, then reads the other's: a check gives way to a prune at once; a prune
  # waits a little for a check to give way or end, then gives way to a check that runs. Of two
  # hosts racing, at least one sees the other's lease (both wrote before they read).
  local other busy waited=0; other=$([ "$task" = prune ] && echo check || echo prune)
  busy=$(maint_busy "$other" "$off")
  while [ -n "$busy" ] && [ "$task" = prune ] && [ "$waited" -lt "${MAINT_YIELD_WAIT:-30}" ]; do
    sleep 2; waited=$((waited + 2))
    busy=$(maint_busy "$other" "$off")
  done
  local why=""
  [ -z "$busy" ] || why="$other runs on $busy: not at the same time"
  mkdir -p "$dir/r"
  if [ -z "$busy" ] && [ "$task" = prune ]; then
    # Backups that run now end, while the prune's lease (which new backups wait for) is held and
    # renewed: the prune gets its window however many volumes back up (bounded by PRUNE_BACKUP_WAIT).
    local bw=0 r2
    busy=$(backups_running "$off")
    while [ -n "$busy" ] && [ "$bw" -lt "${PRUNE_BACKUP_WAIT:-600}" ]; do
      [ "$bw" != 0 ] || echo "maintenance prune: waiting for a backup to end ($busy): a prune never runs beside a backup"
      sleep 5; bw=$((bw + 5))
      if [ $(( $EPOCHSECONDS + off - wrote_at )) -ge $((MAINT_TTL / 3)) ]; then
        local before_r=$EPOCHSECONDS; r2=0
        S3_MAX_TIME=$(( MAINT_TTL / 10 > 2 ? MAINT_TTL / 10 : 2 )) S3_RETRY=0 maint_renew "$url" "$dir" "$off" "${fields[@]}" || r2=$?
        if [ "$r2" != 0 ]; then busy="(its own lease could not be kept while it waited)"; break; fi
        wrote_at=$(( before_r + off ))
      fi
      busy=$(backups_running "$off")
    done
    [ -z "$busy" ] || why="a backup runs ($busy): a prune never runs beside a backup (rustic 0.11's prune), the next run tries again"
  fi
  local holds_until=$((wrote_at + MAINT_TTL))   # on the server's clock: how long the lease surely holds
  # Another host reads this lease as held only until it expires: a run that starts with little of
  # it left (this host slowed down since the write) could overlap the other task's next run.
  local left=$(( holds_until - $EPOCHSECONDS - off ))
  if [ -z "$busy" ] && [ "$left" -lt $((MAINT_TTL / 2)) ]; then
    echo "maintenance $task: this host took $((MAINT_TTL - left)) s to take its lease and read $other's; $left s of it left is too little to start: the next run tries again"
    busy=slow
  elif [ -n "$busy" ]; then
    echo "maintenance $task: $why"
  fi
  if [ -n "$busy" ]; then
    maint_json "" 0 $((runs - 1)) "${fields[@]:1}" > "$dir/n"
    s3_put_cas "$url" "$dir/n" "$(cat "$dir/cur")" "$dir" > /dev/null || true
    rm -rf "$dir"; return 0
  fi
  echo "maintenance $task: run $runs${subset:+ (data part $subset)} by $me, started"
  local err t0 rc=0 lost=""
  err=$(mktemp)
  t0=$EPOCHSECONDS
  # The task yields to everything else on the host; this loop, which keeps its lease, does not
  # (starved, it could let the lease lapse while the task runs).
  ( renice -n 19 -p "$BASHPID" > /dev/null 2>&1 || true; ionice -c 3 -p "$BASHPID" 2>/dev/null || true
    MAINT_SUBSET=$subset "$@" > /dev/null 2> "$err" ) &
  local task_pid=$! last_renew=$((wrote_at - off))   # renewals count from the write
  # The task runs only while the lease surely holds: renewed every third of it, retried while
  # S3 does not answer; lost or about to expire unrenewed, the task is stopped. A renewal takes
  # at most 2 * rt (a PUT, and a GET when its answer was lost): after a failed one the task stops
  # unless another could still end 20 s before the lease expires.
  local rt=$(( MAINT_TTL / 10 )); [ "$rt" -le 20 ] || rt=20; [ "$rt" -ge 2 ] || rt=2
  while kill -0 "$task_pid" 2>/dev/null; do
    sleep 2
    kill -0 "$task_pid" 2>/dev/null || break
    [ $(( $EPOCHSECONDS - last_renew )) -ge $((MAINT_TTL / 3)) ] || continue
    local r=0 before; before=$EPOCHSECONDS
    if [ $(( before + off + 2 * rt )) -ge "$holds_until" ]; then
      # Lapsed unrenewed: another host may have started the other task meanwhile.
      lost="its lease would lapse before a renewal could land (this host was too busy to renew it in time)"
    else
      S3_MAX_TIME=$rt S3_RETRY=0 maint_renew "$url" "$dir" "$off" "${fields[@]}" || r=$?
      if [ "$r" = 0 ] && [ $(( $EPOCHSECONDS + off )) -ge "$holds_until" ]; then
        # Renewed, but only after the lease had lapsed: meanwhile another host may have read it
        # as free and started the other task.
        lost="its lease lapsed before the renewal landed (this host or S3 was too slow)"
      elif [ "$r" = 0 ]; then last_renew=$before; holds_until=$(( before + off + MAINT_TTL )); continue; fi
    fi
    if [ -n "$lost" ]; then :
    elif [ "$r" = 1 ]; then lost="another host wrote its lease"
    elif [ $(( $EPOCHSECONDS + off + 20 + 2 * rt )) -ge "$holds_until" ]; then lost="its lease could not be renewed before it expired"
    else continue; fi
    echo "maintenance $task: $lost: stopping the run" >&2
    pkill -TERM -P "$task_pid" 2>/dev/null || true
    kill -TERM "$task_pid" 2>/dev/null || true
    break
  done
  wait "$task_pid" || rc=$?
  local dur=$(( $EPOCHSECONDS - t0 )) result=ok msg=ok
  if [ -n "$lost" ]; then
    rm -f "$err"; rm -rf "$dir"
    echo "maintenance $task: run $runs stopped after $dur s: $lost" >&2
    return 0
  fi
  if [ "$rc" != 0 ]; then
    result=failed
    msg=$(said "$err")
    [ -n "$msg" ] || msg="exit code $rc"
    cat "$err" >&2
  else
    # What the task said of itself (retries, snapshots left out) reaches the journal, and its
    # "TASK: ok; ..." summary the record.
    grep -E "^$task: " "$err" >&2 || true
    msg=$({ grep -E "^$task: ok; " "$err" || true; } | tail -n1 | sed "s/^$task: //")
    [ -n "$msg" ] || msg=ok
  fi
  rm -f "$err"
  maint_json "" 0 "$runs" $(( $EPOCHSECONDS + off )) "$result" "$(clean "$msg")" "$me" "$dur" "$subset" > "$dir/n"
  code=$(s3_put_cas "$url" "$dir/n" "$(cat "$dir/cur")" "$dir")
  [ "$code" = 200 ] || echo "maintenance $task: its lease changed while it ran (HTTP $code): this run is not recorded" >&2
  maint_metric "$task" "$([ "$result" = ok ] && echo 1 || echo 0)" "$dur"
  rm -rf "$dir"
  if [ "$result" = ok ]; then echo "maintenance $task: run $runs ok in $dur s"; else echo "maintenance $task: run $runs FAILED in $dur s: $msg" >&2; fi
}

# prune and check meet the same races as a backup (see race): tried again, at most 3 times.
retry_race() { # retry_race NAME COMMAND...
  local name=$1 i rc out; shift
  out=$(mktemp -t dboxed-rustic.XXXXXX)
  for i in 1 2 3; do
    rc=0
    "$@" 2> "$out" || rc=$?
    # A check that could not read a snapshot forgotten meanwhile: check_repository reruns without it.
    if [ "$rc" != 0 ] && [ "$name" = check ] && snapshot_gone "$out"; then cat "$out" >&2; rm -f "$out"; return 75; fi
    if [ "$rc" != 0 ] && [ "$i" -lt 3 ] && race "$out"; then
      if grep -q '^rustic crashed: index still in use' "$out"; then
        # The crash comes of a busy host (threads starved past rustic's 100 ms): wait longer.
        echo "$name: rustic crashed on a known rustic_core timing race (index still in use; this host was busy): trying again (attempt $((i + 1)) of 3): $(grep -m1 '^rustic crashed: ' "$out")" >&2
        sleep $((30 * i)); continue
      fi
      echo "$name: the repository changed while $name read it (another volume's backup, forget or prune): trying again (attempt $((i + 1)) of 3): $(said "$out" | cut -c1-300)" >&2
      sleep $((5 * i)); continue
    fi
    cat "$out" >&2; rm -f "$out"
    return "$rc"
  done
}

prune_repository() { retry_race prune rustic_ prune --keep-delete "${KEEP_DELETE}s"; }
# check_repository: rustic check of the snapshots listed when it starts (full ids: rustic reads
# them without listing again). A check first reads every snapshot file (from this host's cache,
# or from S3 those it has not cached), while retention on other volumes forgets snapshots: under
# load that first pass took long enough in the soak test that every attempt met one (a 404,
# before anything was checked). A listed snapshot that answered 404 and is no longer listed was
# forgotten: the check runs again at once without it (at most 20 times). Any other 404 (a
# snapshot still listed, or one this run did not list) is a race or a failed read: retried as
# such (retry_race), then reported. Beyond CHECK_MAX_IDS snapshots (the command line's limit) the
# check lists them itself, as before.
check_repository() {
  local list rc n=0 dropped=""
  list=$(rustic_ list snapshots) || { echo "check: cannot list the repository's snapshots" >&2; return 1; }
  # rustic 0.11.4 prints "SnapshotId(<64 hex>)" per line.
  CHECK_IDS=$(printf '%s\n' "$list" | { grep -oE '\b[0-9a-f]{64}\b' || true; } | tr '\n' ' ')
  local want have
  want=$(printf '%s\n' "$list" | grep -c . || true); have=$(printf '%s' "$CHECK_IDS" | wc -w)
  if [ "$have" != "$want" ] || [ "$have" -gt "${CHECK_MAX_IDS:-10000}" ]; then
    echo "check: $want snapshot(s) listed, $have id(s) read from the listing: rustic lists them itself" >&2
    CHECK_IDS=""
  fi
  while :; do
    rc=0; GONE=""
    # shellcheck disable=SC2086 # ids: 64-hex words only
    retry_race check rustic_ check --read-data --read-data-subset "$MAINT_SUBSET" $CHECK_IDS || rc=$?
    [ "$rc" = 75 ] || break
    if [ "$n" -ge 20 ]; then
      echo "check: 20 snapshots were forgotten under this check; giving up (the next check starts afresh)" >&2
      rc=1; break
    fi
    n=$((n + 1)); dropped="$dropped ${GONE:0:8}"
    CHECK_IDS=${CHECK_IDS/"$GONE "/}
    echo "check: snapshot ${GONE:0:8} was forgotten by another volume's retention after the check listed it: checking the others again without it" >&2
  done
  if [ "$rc" = 0 ] && [ -n "$dropped" ]; then echo "check: ok; left out$dropped (forgotten while the check ran: gone, not damaged)" >&2; fi
  return "$rc"
}

# snapshot_gone FILE: whether a failed check could not read (404) a snapshot it was given
# (CHECK_IDS) that is no longer listed; sets GONE to its id.
snapshot_gone() {
  local id
  id=$(grep -oE 'snapshots/[0-9a-f]{64}' "$1" | head -n1 | cut -d/ -f2)
  [ -n "$id" ] && [[ " ${CHECK_IDS:-}" == *" $id "* ]] && grep -qE 'NotFound|NoSuchKey|status: 404' "$1" || return 1
  local now; now=$(rustic_ list snapshots 2>/dev/null) || return 1
  [[ $now != *"$id"* ]] || return 1
  GONE=$id
}

maintain() {
  load "$1"
  [ -n "${MAINT_URL:-}" ] || { echo "volume $VOLUME_ID has no maintenance settings"; return 0; }
  # One maintenance run per host at a time, whichever volume starts it.
  exec 8>/run/dboxed-volumes-maintenance.lock
  flock -n 8 || { echo "another volume's maintenance runs on this host"; return 0; }
  sweep_rustic_tmp
  maint_known_not_due prune "$PRUNE_INTERVAL" || maintain_task prune "$PRUNE_INTERVAL" prune_repository
  maint_known_not_due check "$CHECK_INTERVAL" || maintain_task check "$CHECK_INTERVAL" check_repository
}

# prune-now: a prune at once (a deleted volume's snapshots were forgotten), under the repository's
# prune lease like any other: never beside another host's prune or check. When another host holds
# it, this one gives way (that run, or the next one due, frees the space).
prune_now() {
  load "$1"
  [ -n "${MAINT_URL:-}" ] || { echo "prune-now: volume $VOLUME_ID has no maintenance settings: the next scheduled prune frees the space"; return 0; }
  exec 8>/run/dboxed-volumes-maintenance.lock
  flock -w 3600 8 || { echo "prune-now: another maintenance run on this host holds its lock: the next scheduled prune frees the space"; return 0; }
  maintain_task prune 1 prune_repository
}

# Sourced (tests of the functions): define, do not dispatch.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
  attach) attach "${2:?volume id}" ;;
  detach) detach "${2:?volume id}" ;;
  backup) backup "${2:?volume id}" ;;
  maintain) maintain "${2:?volume id}" ;;
  prune-now) prune_now "${2:?volume id}" ;;
  check-lease) load "${2:?volume id}"; check_lease; echo "volume $VOLUME_ID: this host holds the lease" ;;
  renew) load "${2:?volume id}"; renew_lease; echo "volume $VOLUME_ID: lease renewed for ${LEASE_SECONDS:-?} s" ;;
  version) echo "$AGENT_VERSION" ;;
  *) die "usage: dboxed-volume attach|detach|backup ID" ;;
esac
