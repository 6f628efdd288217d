#!/usr/bin/env bash
# The sweep engine's checks on this machine (docs/sweeps.md, "Measured"), one process at a time:
#   1. the small WISE-table sweep serially, then with Ray on 2 workers (compare the summaries and the wall times);
#   2. with Ray, a worker killed by its PID WKILL_AT s in (default 150): the sweep still finishes;
#   3. with Ray, the driver killed DKILL_AT s in (default 200), then the same sweep run again: only unfinished chunks run.
# Usage: bash scripts/sweep_check.sh [OUT]   (default /tmp/sweep-check); then python scripts/sweep_compare.py OUT
# SKIP_SERIAL=1 keeps OUT/serial from an earlier call; SKIP_CLEAN=1 leaves out the plain Ray run (check 1's time then
# comes from the worker-kill run, one retried chunk included).
set -u
cd "$(dirname "$0")/.."
Y=${SWEEP:-examples/sweeps/wise-table-small.yaml}
OUT=${1:-/tmp/sweep-check}
T=(--threads "${THREADS:-1}")  # one torch thread per worker and in the serial run: equal bits, no oversubscription
log() { echo "$*" | tee -a "$OUT/times"; }
if [ "${SKIP_SERIAL:-0}" = "1" ] && [ -f "$OUT/serial/sweep.json" ]; then  # keep a serial run made before
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name serial ! -name serial.log ! -name times -exec rm -rf {} +
else
  rm -rf "$OUT"; mkdir -p "$OUT"
  s=$(date +%s); lmedit sweep $Y "${T[@]}" --out "$OUT/serial" --no-progress > "$OUT/serial.log" 2>&1
  log "serial rc=$? wall=$(( $(date +%s) - s ))"
fi
if [ "${SKIP_CLEAN:-0}" != "1" ]; then  # SKIP_CLEAN=1: no separate Ray run (the worker-kill run's wall time is then the Ray time)
  s=$(date +%s); lmedit sweep $Y "${T[@]}" --engine ray --workers 2 --out "$OUT/ray" --no-progress > "$OUT/ray.log" 2>&1
  log "ray rc=$? wall=$(( $(date +%s) - s ))"
fi
s=$(date +%s)
lmedit sweep $Y "${T[@]}" --engine ray --workers 2 --out "$OUT/wkill" --no-progress > "$OUT/wkill.log" 2>&1 &
driver=$!
sleep ${WKILL_AT:-150}; w=$(pgrep -f "ray::ChunkWorker" | head -1)
log "wkill: killing worker pid $w at $(( $(date +%s) - s )) s: $(ps -o args= -p "$w")"; kill -9 "$w"
wait $driver; log "wkill rc=$? wall=$(( $(date +%s) - s ))"
s=$(date +%s)
setsid lmedit sweep $Y "${T[@]}" --engine ray --workers 2 --out "$OUT/dkill" --no-progress > "$OUT/dkill1.log" 2>&1 &
driver=$!
sleep ${DKILL_AT:-200}; log "dkill: killing driver pid $driver at $(( $(date +%s) - s )) s"; kill -9 $driver
sleep 3; pkill -9 -f "ray::"; ray stop --force > /dev/null 2>&1; sleep 2
cp -r "$OUT/dkill" "$OUT/dkill_snapshot"
s=$(date +%s); lmedit sweep $Y "${T[@]}" --engine ray --workers 2 --out "$OUT/dkill" --no-progress > "$OUT/dkill2.log" 2>&1
log "rerun rc=$? wall=$(( $(date +%s) - s ))"
