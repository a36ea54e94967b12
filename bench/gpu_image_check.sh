#!/usr/bin/env bash
# The lent GPU machine's software, on a CPU: Python 3.12, torch 2.11 (its CUDA build, run on the CPU), Triton 3.6,
# transformers 5.x with Hugging Face's `kernels`, peft, pytest-benchmark, nvidia-ml-py, numpy, safetensors, tqdm,
# and no diffusers. Builds that environment in a venv from the package index (once; later runs reuse it), installs
# the project as the GPU machine does, then checks what runs there:
#
#   bash bench/gpu_image_check.sh [--venv DIR] [--out DIR] [--rebuild]
#
#   GPU_IMAGE_VENV=DIR or --venv DIR   the venv (default ~/.cache/pixart_fast/gpu-image-venv), reused when it
#                                      holds the packages below
#   OUT=DIR or --out DIR               the logs (default /tmp/pixart_gpu_image_check-DATE)
#   --rebuild                          remove the venv and build it again
#   PYTHON312=...                      the interpreter the venv is made from (default python3.12 on PATH, else
#                                      ~/.pyenv/versions/3.12.*/bin/python)
#
# Steps: the project's install (pip install --no-deps --no-build-isolation -e .), `python -m pixart_fast.train
# --help`, the graph-break test, the kernel tests through Triton's interpreter, the rest of tests/ (diffusers'
# tests skip), the ahead-of-time compile report (python -m pixart_fast.kernels.aot) and the GPU check's dry run
# (bench/gpu_check.sh --dry-run). Ends with one line per step and the versions; exit status 0 when every step
# passed, else 1.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GPU_IMAGE_VENV:-$HOME/.cache/pixart_fast/gpu-image-venv}"
OUT_DIR="${OUT:-}"
REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="${2:?--venv needs a folder}"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT_DIR="${1#*=}" ;;
    --rebuild) REBUILD=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-/tmp/pixart_gpu_image_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

# The GPU image's packages (no diffusers); pillow, matplotlib and came-pytorch are the project's other dependencies.
PACKAGES=("torch==2.11.*" "triton==3.6.*" "transformers>=5.25,<6" kernels peft pytest pytest-benchmark nvidia-ml-py
          numpy safetensors tqdm pillow matplotlib came-pytorch)
PY="$VENV/bin/python"
MARK="$VENV/.gpu-image-packages"

STEPS=()
say() { echo "[gpu_image_check $SECONDS s] $*"; }
# step NAME LOGFILE CMD...: runs CMD with its output in LOGFILE; records the status, time and its last line.
step() {
  local name="$1" log="$OUT_DIR/$2" t0=$SECONDS rc
  shift 2
  say "$name: $*"
  "$@" >"$log" 2>&1
  rc=$?
  local status=passed
  [ "$rc" = 0 ] || status="FAILED (exit $rc)"
  STEPS+=("$(printf '%-14s %-16s %5d s  %s' "$name" "$status" $((SECONDS - t0)) "$(tail -n 1 "$log" | cut -c1-110)")")
  say "$name: $status"
  return "$rc"
}

build() {
  if [ "$REBUILD" = 1 ]; then rm -rf "$VENV"; fi
  if [ -x "$PY" ] && [ -f "$MARK" ] && [ "$(cat "$MARK")" = "${PACKAGES[*]}" ]; then
    echo "reusing $VENV"
    return 0
  fi
  local base="" candidate
  for candidate in ${PYTHON312:-python3.12 $(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null)}; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      base="$candidate"
      break
    fi
  done
  [ -n "$base" ] || { echo "no Python 3.12 found: set PYTHON312"; return 1; }
  [ -x "$PY" ] || "$base" -m venv "$VENV" || return 1
  "$PY" -m pip install --upgrade pip && "$PY" -m pip install "${PACKAGES[@]}" || return 1
  echo "${PACKAGES[*]}" >"$MARK"
  echo "built $VENV"
}

environment() {
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform

for name in ("torch", "triton", "transformers", "kernels", "peft", "numpy", "safetensors", "pytest"):
    print(f"{name} {md.version(name)}")
print(f"python {platform.python_version()}")
try:
    import diffusers  # noqa: F401
except ImportError:
    print("diffusers: not installed, as on the GPU machine")
else:
    raise SystemExit(f"diffusers {diffusers.__version__} is installed: the GPU machine has none")
EOF
}

# pytest's counts: "N passed, M skipped in T s"; the skip reasons counted below the summary.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)
KERNEL_TESTS=(tests/test_modulate.py tests/test_cross_attn.py tests/test_patchify.py tests/test_kernel_dtypes.py
              tests/test_kernel_grids.py)
REST=()
for f in "${KERNEL_TESTS[@]}" tests/test_graph_breaks.py; do REST+=(--ignore "$f"); done

aot_report() {
  env -u TRITON_INTERPRET "$PY" -m pixart_fast.kernels.aot --json "$OUT_DIR/aot.json" || return
  "$PY" - "$OUT_DIR/aot.json" <<'EOF'
import json, sys

rows = json.load(open(sys.argv[1]))["compiles"]
spills = sum(1 for r in rows if r.get("spill_bytes"))
print(f"{len(rows)} compilations, {spills} with spills")
EOF
}

say "out $OUT_DIR; venv $VENV"
if step build build.log build; then
  step environment environment.log environment
  step install install.log "$PY" -m pip install --no-deps --no-build-isolation -e .
  step "train --help" train_help.log "$PY" -m pixart_fast.train --help
  step graph-breaks graph_breaks.log "${PYTEST[@]}" tests/test_graph_breaks.py
  step kernel-tests kernel_tests.log "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
  step tests tests.log "${PYTEST[@]}" --continue-on-collection-errors tests "${REST[@]}"
  step aot aot.log aot_report
  step gpu-check-dry gpu_check_dry.log env PYTHON="$PY" bash bench/gpu_check.sh --dry-run --out "$OUT_DIR/gpu_check"
fi

echo
echo "== GPU image check: $OUT_DIR (logs), $SECONDS s =="
printf '%s\n' "${STEPS[@]}"
[ -f "$OUT_DIR/environment.log" ] && sed 's/^/  /' "$OUT_DIR/environment.log"
for log in graph_breaks kernel_tests tests; do
  [ -f "$OUT_DIR/$log.log" ] || continue
  grep '^SKIPPED' "$OUT_DIR/$log.log" | sed -E 's/^SKIPPED \[([0-9]+)\] [^:]+:[0-9]+: /\1 /' |
    awk -v f="$log" '{ n = $1; $1 = ""; count[$0] += n } END { for (r in count) printf "  %s skipped:%s (%d)\n", f, r, count[r] }'
done
for s in "${STEPS[@]}"; do
  case "$s" in *FAILED*) exit 1 ;; esac
done
[ "${#STEPS[@]}" -gt 1 ] || exit 1
