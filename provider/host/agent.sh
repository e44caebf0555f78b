#!/bin/bash
# dboxed-volume: the host side of a volume, run by its systemd units and by the provider.
#   dboxed-volume attach ID   make the volume's block device available (loop + VG activation)
#   dboxed-volume detach ID   release it again (after the mount unit is stopped)
#   dboxed-volume backup ID   crash-consistent backup: lvm2 snapshot -> rustic -> S3, retention
#   dboxed-volume check-lease ID   exit 0 only if this host still holds the volume's lease
#   dboxed-volume renew ID    move the lease's expiry on (only while this host holds it)
# Per-volume settings come from /etc/dboxed-volumes/ID/volume.env (written by the provider,
# every value quoted); the repository secrets sit in the root-only rustic profile next to it.
set -euo pipefail
umask 077
AGENT_VERSION=4
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

die() {
  echo "dboxed-volume: $*" >&2
  [ -n "${STATE_DIR:-}" ] && [ -d "$STATE_DIR" ] && printf '%s\n' "$*" > "$STATE_DIR/last-error"
  exit 1
}

# step DESCRIPTION STDOUT_FILE COMMAND...: runs COMMAND; on failure dies with its last stderr lines.
step() {
  local desc=$1 out=$2; shift 2
  local err; err=$(mktemp)
  if ! "$@" > "$out" 2> "$err"; then
    cat "$err" >&2
    local tail_; tail_=$(tail -n 3 "$err" | tr '\n' ' ')
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
    local dev
    while dev=$(loop_device) && [ -n "$dev" ]; do losetup -d "$dev"; done
  else
    lvs "$VG/$LV" >/dev/null 2>&1 && lvchange -q -an "$VG/$LV" >/dev/null
  fi
  return 0
}

remove_snapshot() {
  if mountpoint -q "$SNAP_MNT" 2>/dev/null; then umount "$SNAP_MNT" || umount -l "$SNAP_MNT"; fi
  if lvs "$VG/$SNAP_LV" >/dev/null 2>&1; then lvremove -q -f -y "$VG/$SNAP_LV" >/dev/null; fi
}

write_status() { # write_status STATUS SNAPSHOT_ID MESSAGE
  local now; now=$(date +%s)
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
  local dir code etag attempt
  dir=$(mktemp -d)
  for attempt in 1 2 3 4; do
    code=$(curl -sS -m 60 --retry 2 -D "$dir/h" -o "$dir/b" -w '%{http_code}' -H "x-amz-content-sha256: $EMPTY_SHA256" \
      --aws-sigv4 "aws:amz:$S3_REGION:s3" -K "$CURL_CONFIG" "$LEASE_URL" 2>&1) || { rm -rf "$dir"; die "cannot read the lease of $VOLUME_ID: $code"; }
    if [ "$code" != 200 ]; then rm -rf "$dir"; die "the lease of $VOLUME_ID cannot be read (HTTP $code): refusing to back up"; fi
    if ! grep -q "\"token\": *\"$LEASE_TOKEN\"" "$dir/b"; then
      rm -rf "$dir"
      die "this host no longer holds volume $VOLUME_ID (its lease was handed to another host): refusing to back up"
    fi
    # A lease without expiry (written by an older provider) gets one at the provider's next write.
    if [ -z "${LEASE_SECONDS:-}" ] || ! grep -q '^  "expiresAt": [0-9]*,\{0,1\}$' "$dir/b"; then rm -rf "$dir"; return 0; fi
    etag=$(tr -d '\r' < "$dir/h" | sed -n 's/^[Ee][Tt][Aa][Gg]: *//p' | tail -n1)
    [ -n "$etag" ] || { rm -rf "$dir"; die "the lease of $VOLUME_ID came without an ETag: cannot renew it"; }
    sed "s/^  \"expiresAt\": [0-9]*/  \"expiresAt\": $(( $(date +%s) + LEASE_SECONDS ))/" "$dir/b" > "$dir/n"
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
  local out; out=$(lvs --noheadings --reportformat json -o lv_attr,snap_percent "$VG/$SNAP_LV" 2>/dev/null) || return 1
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
timing() {
  local now; now=$(date +%s.%N)
  STEPS="${STEPS:+$STEPS }$1=$(awk -v a="$MARK" -v b="$now" 'BEGIN{printf "%.1f", b-a}')"
  MARK=$now
}

rustic_() { NO_COLOR=1 "$RUSTIC" -P "$PROFILE" --no-progress --cache-dir /var/cache/dboxed-volumes/rustic "$@"; }

finish_backup() {
  local rc=$1
  trap - EXIT
  set +e
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
  STARTED=$(date +%s)
  MARK=$(date +%s.%N); STEPS=""
  SNAPSHOT_ID=""; SNAPSHOT_AT=0; FINAL=0; REQUEST=""
  LAST_OK=$(sed -n 's/.*"lastSuccessAt":\([0-9]*\).*/\1/p' "$STATE_DIR/status.json" 2>/dev/null || true)
  exec 9>"$STATE_DIR/backup.lock"
  flock -w "${LOCK_WAIT_SECONDS:-900}" 9 || die "another backup of $VOLUME_ID holds the lock"
  rm -f "$STATE_DIR/last-error"
  timing lock
  trap 'finish_backup $?' EXIT
  renew_lease
  timing lease
  [ -e "$STATE_DIR/initialized" ] || die "volume $VOLUME_ID is not initialised yet (restore pending): refusing to back up"
  mountpoint -q "$MOUNT_PATH" || die "volume $VOLUME_ID is not mounted at $MOUNT_PATH"
  remove_snapshot # leftovers of an interrupted run
  forget_discarded
  # A final backup (move, delete, rebuild): the provider made the filesystem read-only, then
  # wrote a nonce to final-request. Read here, under the lock and before anything is frozen,
  # it proves that this run's data is from after the read-only remount.
  REQUEST=$(tr -dc 'a-f0-9' < "$STATE_DIR/final-request" 2>/dev/null || true)
  FINAL=0
  if [ -n "$REQUEST" ] && findmnt -n -o OPTIONS --mountpoint "$MOUNT_PATH" | tr ',' '\n' | grep -qx ro; then FINAL=1; fi
  if [ "$FINAL" = 0 ] && [ -e "/etc/dboxed-volumes/$VOLUME_ID/fenced" ]; then
    die "volume $VOLUME_ID is fenced for a move (read-only until the move finishes or is undone): no periodic backups"
  fi
  local src
  if [ "$FINAL" = 1 ]; then
    # Nothing can change a read-only filesystem: back it up directly, no lvm2 snapshot needed.
    SNAPSHOT_AT=$(date +%s)
    src=$MOUNT_PATH
    echo "final backup of the read-only volume (request $REQUEST)"
  else
    sync -f "$MOUNT_PATH"
    echo "creating snapshot $VG/$SNAP_LV"
    SNAPSHOT_AT=$(date +%s)
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
  local rc=0 err; err=$(mktemp)
  rustic_ backup --json --host "$RUSTIC_HOST" --label "$VOLUME_ID" \
    --tag dboxed-volume --tag "volume-$VOLUME_ID" --as-path / --no-scan -x --group-by host,label,paths "$src" \
    > "$STATE_DIR/last-backup.json" 2> "$err" || rc=$?
  cat "$err" >&2
  SNAPSHOT_ID=$(grep -o '"id": *"[0-9a-f]\{64\}"' "$STATE_DIR/last-backup.json" | head -n1 | grep -o '[0-9a-f]\{64\}' || true)
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
    local tail_; tail_=$(tail -n 3 "$err" | tr '\n' ' '); rm -f "$err"
    die "rustic backup failed: $tail_"
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
    step "rustic forget" /dev/null rustic_ forget --filter-host "$RUSTIC_HOST" --group-by host,label,paths \
      --keep-last "$KEEP_LAST" --keep-hourly "$KEEP_HOURLY" --keep-daily "$KEEP_DAILY" \
      --keep-weekly "$KEEP_WEEKLY" --keep-monthly "$KEEP_MONTHLY" --keep-yearly "$KEEP_YEARLY"
    timing forget
  else
    touch "$STATE_DIR/retention-started"
  fi
  # Lock-less prune (packs are only marked; removed a day later), at most once a day per volume,
  # the first a day after the volume came to this host (a new volume has nothing to prune yet).
  if [ ! -e "$STATE_DIR/last-prune" ]; then
    touch "$STATE_DIR/last-prune"
  elif [ -z "$(find "$STATE_DIR/last-prune" -mmin -1440 2>/dev/null)" ]; then
    echo "pruning unused data"
    step "rustic prune" /dev/null rustic_ prune
    touch "$STATE_DIR/last-prune"
    timing prune
  fi
  echo "backup of $VOLUME_ID done"
}

case "${1:-}" in
  attach) attach "${2:?volume id}" ;;
  detach) detach "${2:?volume id}" ;;
  backup) backup "${2:?volume id}" ;;
  check-lease) load "${2:?volume id}"; check_lease; echo "volume $VOLUME_ID: this host holds the lease" ;;
  renew) load "${2:?volume id}"; renew_lease; echo "volume $VOLUME_ID: lease renewed for ${LEASE_SECONDS:-?} s" ;;
  version) echo "$AGENT_VERSION" ;;
  *) die "usage: dboxed-volume attach|detach|backup ID" ;;
esac
