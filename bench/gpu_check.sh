#!/usr/bin/env bash
# The one-shot GPU check (bench/gpu_check.py says what it measures; docs/gpu-day.md is the procedure): install the
# project, then run every GPU measurement into one folder, in at most 7 minutes, without network.
#
#   bash bench/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR] [gpu_check.py options: --parts, --compile-mode,
#                            --part-limit]
#
#   OUT=DIR or --out DIR    where everything goes (default /tmp/pixart_gpu_check-DATE)
#   WHEELS=DIR or --wheels DIR
#                           a folder of wheels for what the machine lacks (diffusers and what it needs,
#                           nvidia-ml-py): pip install --no-index --find-links DIR. Without it, a machine without
#                           diffusers skips the diffusers comparisons, saying so.
#   --dry-run               the same code on the CPU at tiny shapes, no install step (well under a minute): proves
#                           every code path before GPU time is spent.
#   PYTHON=...              the interpreter (default python3); PIP=... the pip command (default "$PYTHON -m pip")
#   GPU_CHECK_BUDGET_S      no item starts after this many seconds (default 390)
#   GPU_CHECK_LIMIT_S       the whole run, install included, ends by this many seconds (default 420)
#
# Writes to the folder: gpu_check.json (everything), summary.md (its first line: whether the GPU ran),
# gpu_check.log (the run's output), install.log (pip's output). Exit status: 0 when the check ran, to its end or
# to the limit (parts may have failed: the JSON says which); 3 when no usable CUDA was found (the JSON and
# summary.md say why); 4 when CUDA worked but nothing was measured; 1 when no gpu_check.json was written; else
# gpu_check.py's status. Killed at the limit, the JSON still names the part that was running and for how long.
set -u
T0=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY=0
WHEELS_DIR="${WHEELS:-}"
OUT_DIR="${OUT:-}"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS_DIR="${2:?--wheels needs a folder}"; shift ;;
    --wheels=*) WHEELS_DIR="${1#*=}" ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT_DIR="${1#*=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) PASS+=("$1") ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-/tmp/pixart_gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # relative folders are the caller's
if [ -n "$WHEELS_DIR" ] && [ -d "$WHEELS_DIR" ]; then WHEELS_DIR="$(cd "$WHEELS_DIR" && pwd)"; fi
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
PIP="${PIP:-$PY -m pip}"
BUDGET="${GPU_CHECK_BUDGET_S:-390}"
LIMIT="${GPU_CHECK_LIMIT_S:-420}"

# No network, no hub, and never Triton's interpreter (it cannot run the modulate backward's loop on Triton 3.6,
# and times nothing useful anyway).
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

LOG="$OUT_DIR/gpu_check.log"
INSTALL_LOG="$OUT_DIR/install.log"
: >"$LOG"
: >"$INSTALL_LOG"
say() { echo "[gpu_check.sh $(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
say "out $OUT_DIR; python $PY; dry run $DRY; wheels ${WHEELS_DIR:-none}"

importable() { "$PY" -c "import $1" >/dev/null 2>&1; }

# Install: the project (editable, no dependencies, no index), then what the machine lacks from the wheel folder.
if [ "$DRY" = 1 ]; then
  PROJECT_STATUS="skipped: dry run (no pip)"
  DIFFUSERS_STATUS="skipped: dry run (no pip)"
  echo "dry run: no pip install" >>"$INSTALL_LOG"
else
  echo "\$ $PIP install --no-deps --no-build-isolation --no-index -e $ROOT" >>"$INSTALL_LOG"
  if $PIP install --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$INSTALL_LOG" 2>&1; then
    PROJECT_STATUS="ok: pip install --no-deps --no-build-isolation --no-index -e ."
  else
    PROJECT_STATUS="failed (see install.log): gpu_check.py imports the project from the checkout instead"
  fi
  DIFFUSERS_STATUS=""
  for pair in diffusers:diffusers pynvml:nvidia-ml-py; do
    module="${pair%%:*}"; package="${pair#*:}"
    if importable "$module"; then
      status="already importable"
    elif [ -z "$WHEELS_DIR" ]; then
      status="missing, and no wheel folder given (WHEELS=DIR or --wheels DIR)"
    elif [ ! -d "$WHEELS_DIR" ]; then
      status="missing, and the wheel folder $WHEELS_DIR does not exist"
    else
      echo "\$ $PIP install --no-index --find-links $WHEELS_DIR $package" >>"$INSTALL_LOG"
      if $PIP install --no-index --find-links "$WHEELS_DIR" "$package" >>"$INSTALL_LOG" 2>&1; then
        status="installed from $WHEELS_DIR"
      else
        status="failed to install from $WHEELS_DIR (see install.log)"
      fi
    fi
    say "$package: $status"
    if [ "$module" = diffusers ]; then DIFFUSERS_STATUS="$status"; else NVML_STATUS="$status"; fi
  done
  DIFFUSERS_STATUS="$DIFFUSERS_STATUS; nvidia-ml-py: $NVML_STATUS"
fi
say "project: $PROJECT_STATUS"

ARGS=(bench/gpu_check.py --out "$OUT_DIR" --t0 "$T0" --budget "$BUDGET" --limit "$((LIMIT - 12))"
      --install-project "$PROJECT_STATUS" --install-diffusers "$DIFFUSERS_STATUS")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
ARGS+=("${PASS[@]+"${PASS[@]}"}")

LEFT=$((LIMIT - ($(date +%s) - T0) - 5))
[ "$LEFT" -lt 10 ] && LEFT=10
if command -v timeout >/dev/null 2>&1; then
  timeout -k 3 "$LEFT" "$PY" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
else
  "$PY" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
fi
if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
  say "killed at the hard limit ($LIMIT s)"
  "$PY" bench/gpu_check.py --out "$OUT_DIR" --finalize "killed by gpu_check.sh at the hard limit of $LIMIT s" \
    >>"$LOG" 2>&1 && RC=0
fi
[ -f "$OUT_DIR/summary.md" ] && say "$(head -n 1 "$OUT_DIR/summary.md")"
if [ ! -f "$OUT_DIR/gpu_check.json" ]; then
  say "FAILED: no gpu_check.json (python exit status $RC); see $LOG"
  exit 1
fi
if [ "$RC" != 0 ]; then
  say "FAILED: gpu_check.py stopped with exit status $RC; what it finished is in $OUT_DIR/gpu_check.json"
  exit "$RC"
fi
say "done: $OUT_DIR/gpu_check.json, $OUT_DIR/summary.md"
