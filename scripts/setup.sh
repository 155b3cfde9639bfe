#!/usr/bin/env bash
# Create .venv if missing and install fedsim into it, editable, with its test tools, the docs site
# (mkdocs) and the trackers (tensorboard, mlflow-skinny) that tests/test_docs.py and
# tests/test_tracking.py use: the `dev` extra of pyproject.toml.
# No GPU: torch==2.13.0 (the CPU wheel these machines hold locally) goes in first, so nothing pulls a
# multi-GB CUDA build. With an NVIDIA GPU: the normal torch build. Re-runs are no-ops until
# pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.fedsim-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import fedsim.algorithms" 2>/dev/null; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
  pip install "torch>=2.6"
else
  echo "[setup] no GPU: installing the CPU build torch==2.13.0 first"
  pip install "torch==2.13.0"
fi
echo "[setup] installing fedsim (editable) and its dependencies"
pip install -e ".[dev]"
.venv/bin/python -c "import torch, fedsim.algorithms, fedsim.scenarios, fedsim.eval; print('[setup] ok: torch', torch.__version__)"
echo "$want" > "$stamp"
