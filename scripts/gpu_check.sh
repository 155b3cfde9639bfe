#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, in at most ten minutes, one command sets up
# what it needs and measures (fedsim/gpu_check.py says what each part does):
#   machine, roofline (bf16 GEMM rate, copy bandwidth, one Vicuna-7B and one CLIP-L/336 layer
#   timed), cohort (fedsim bench --sections training --device cuda), aggregation (FedAvg and
#   Fed-CMP at LLaVA-1.5-7B projector size on cuda), vllm (vLLM vs hf on the toy suite, then a
#   projector swapped into the live engine) -> one JSON (default runs/gpu-check/gpu-check.json).
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run       # anywhere: the plan and the checks, no workload
#   bash scripts/gpu_check.sh --device cpu    # anywhere: every part at toy sizes on the CPU
#   bash scripts/gpu_check.sh --fetch-wheels  # here, with network: wheels for a bare GPU image
#
# Set-up (skipped by --dry-run and --python): a venv, .venv-gpu, over the machine's own Python
# (a .pth names its site-packages: its CUDA torch, transformers, safetensors, pyarrow, rich), the
# wheels in .whl/ if any (the device image lacks datasets, dill and multiprocess: --fetch-wheels
# downloads them here for Python 3.12, and the folder travels with the working tree), and fedsim
# itself (editable, no dependencies, no index). vLLM pins its own CUDA torch and transformers:
# it never enters .venv (the CPU set-up) nor .venv-gpu; give the check an interpreter that has
# vLLM 0.33 and fedsim with --vllm-python PY. Without one the vllm part is skipped with one line.
# A part that lacks a module or a GPU is skipped with the reason in the JSON; the others run.
# Every other flag goes to `python -m fedsim.gpu_check` (--parts, --out, --work-dir, --budget,
# --device, --vllm-python; --python PY skips the set-up and uses PY).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
BASE=${GPU_CHECK_BASE_PYTHON:-python3}
PY=""
DRY=0
FETCH=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python)
      [ $# -ge 2 ] || { echo "error: --python needs an interpreter" >&2; exit 2; }
      PY=$2; shift 2 ;;
    --python=*) PY=${1#--python=}; shift ;;
    --dry-run) DRY=1; PASS+=("$1"); shift ;;
    --fetch-wheels) FETCH=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ "$FETCH" = 1 ]; then
  # Versions of this machine's CPU set-up (.venv), for CPython 3.12 on manylinux x86-64.
  WHEELS=(datasets dill multiprocess)
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    v=$(.venv/bin/python -c "from importlib.metadata import version; print(version('$w'))") \
      || { echo "error: .venv has no $w to take the version from" >&2; exit 2; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w==$v" \
      || { echo "error: pip could not download $w==$v" >&2; exit 2; }
  done
  ls .whl
  exit 0
fi

if [ -n "$PY" ]; then
  command -v "$PY" >/dev/null || { echo "error: --python $PY: no such interpreter" >&2; exit 2; }
elif [ "$DRY" = 1 ]; then
  # No set-up in a dry run: the venv if it is there, else the CPU set-up's, else python3.
  for c in "$VENV/bin/python" .venv/bin/python "$BASE"; do
    if command -v "$c" >/dev/null; then PY=$c; break; fi
  done
  [ -x "$VENV/bin/python" ] || echo "[gpu-check] set-up (not run): $BASE -m venv $VENV over $BASE's site-packages; wheels from .whl/; pip install --no-deps -e ."
else
  command -v "$BASE" >/dev/null || { echo "error: $BASE: no Python to build $VENV from" >&2; exit 2; }
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[gpu-check] creating $VENV over $BASE's packages"
    "$BASE" -m venv --without-pip "$VENV" || { echo "error: could not create $VENV" >&2; exit 2; }
    # $BASE may itself be a venv (the GPU image's python3 is /opt/torch/.venv): a venv made
    # from it would see the base installation's packages, not its own. A .pth file names
    # $BASE's site-packages folders, whatever kind of interpreter it is.
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # (addsitedir: their own .pth files are read too)
    "$BASE" -c "import site; print(''.join(f'import site; site.addsitedir({p!r})\n' for p in site.getsitepackages()))" > "$SITE/zz-gpu-check-base.pth" \
      || { echo "error: $BASE does not list its site-packages" >&2; exit 2; }
  fi
  # $BASE's pip, installing into the venv (pip >= 22.3); no index: nothing is downloaded.
  PIP=("$BASE" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --disable-pip-version-check)
  if compgen -G ".whl/*.whl" >/dev/null; then
    "${PIP[@]}" .whl/*.whl || { echo "error: the wheels in .whl/ did not install" >&2; exit 2; }
  fi
  if ! "$VENV/bin/python" -c "import fedsim.gpu_check" 2>/dev/null; then
    "${PIP[@]}" --no-build-isolation -e . \
      || { echo "error: fedsim did not install into $VENV (setuptools missing?)" >&2; exit 2; }
  fi
  PY=$VENV/bin/python
fi
# One start of the interpreter: torch and fedsim importable, or one line saying which is not.
"$PY" -c "
import importlib.util, sys
for m in ('torch', 'fedsim.gpu_check'):
    if importlib.util.find_spec(m.split('.')[0]) is None or importlib.util.find_spec(m) is None:
        sys.exit(f'error: $PY cannot import {m} (torch: the machine\\'s own; fedsim: pip install --no-deps -e .)')
" || exit 2
exec "$PY" -m fedsim.gpu_check "${PASS[@]}"
