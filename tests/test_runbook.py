"""docs/how-to/runbook-llava-7b.md: every table is what scripts/runbook.py computes from the
architecture, the presets and the JSON files it cites, and the architecture's counts are
LLaVA-1.5-7B's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Building LLaVA-1.5-7B on the meta device and counting its layers imports most of transformers.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runbook():
    spec = importlib.util.spec_from_file_location(
        "runbook", ROOT / "scripts" / "runbook.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def numbers(runbook):
    c = runbook.compute()
    runbook._aggregation(c)
    runbook._eval_seconds(c)
    return c


def test_the_page_holds_the_tables_recomputed_from_the_cited_json(runbook, numbers):
    page = runbook.PAGE.read_text()
    generated = {name: fn(numbers) for name, fn in runbook.TABLES.items()}
    assert runbook.fill(page, generated) == page, "run scripts/runbook.py --write"
    # Every JSON file the page cites is there (or is named as not yet measured).
    for name in ("h200-device-notes.json", "h200-gpu-b16--no-tf32.json"):
        assert f"docs/bench/{name}" in page
        json.loads((ROOT / "docs" / "bench" / name).read_text())
    notes = json.loads((ROOT / "docs" / "bench" / "h200-device-notes.json").read_text())
    assert notes["bf16_matmul_tflops"] == min(notes["bf16_matmul_tflops_readings"])


def test_the_architecture_is_llava_1_5_7b(numbers):
    a = numbers["arch"]
    # mlp2x_gelu 1024 -> 4096 -> 4096, by hand.
    assert a["params"]["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # Llama-2-7B / Vicuna-7B v1.5: 6 738 415 616 parameters (embeddings and head untied).
    assert a["params"]["language_model"] == 6_738_415_616
    # CLIP ViT-L/14 at 336 px: 24 layers of 12·1024² + 13·1024 parameters (attention and MLP
    # of width 4096 with biases, two layer norms), 577 position embeddings, the 14×14 patch
    # convolution without bias, the class embedding and the pre/post layer norms.
    layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 2 * 2 * 1024
    rest = 577 * 1024 + 3 * 14 * 14 * 1024 + 1024 + 2 * 2 * 1024
    assert a["params"]["vision_tower"] == 24 * layer + rest
    # One decoder layer's forward: the matrix products 2·T·(4·4096² + 3·4096·11008) and
    # attention's two products 2·2·T²·4096 (FlopCounterMode counts 2mnk per product).
    T = a["tokens"]["lm"]
    expected = 2 * T * (4 * 4096**2 + 3 * 4096 * 11008) + 4 * T * T * 4096
    assert a["flops"]["lm_layer_fwd"] == expected


def test_the_timed_layers_replace_the_rate_when_the_gpu_check_has_run(runbook, numbers):
    """The gpu check's roofline part (scripts/gpu_check.sh) fills the 'timed layers' column:
    32 LM layers + 24 vision layers at their measured seconds per example, the rest at the
    rate, plus the per-pass floor. Hand arithmetic on round figures."""
    a = numbers["arch"]
    c = {
        **numbers,
        "rate": 1e15,  # 1 PFLOP/s
        "step_floor": 0.01,
        "gpu_check": {
            "parts": {
                "roofline": {
                    "status": "ok",
                    "layers": {
                        "shape": "llava-1.5-7b",
                        "batch": 16,
                        "lm_tokens": a["tokens"]["lm"],
                        "lm_layer": {"seconds": 0.016},
                        "vision_layer": {"seconds": 0.0016},
                    },
                }
            }
        },
    }
    f = a["flops"]
    rest = f["vision_embeddings"] + f["projector_fwd_bwd"] + f["lm_head_fwd_bwd"]
    # per example: (32 × 0.016 + 24 × 0.0016) / 16 = 0.0344 s
    expected = 16 * (0.0344 + rest / 1e15) + 0.01
    # The same few double operations in another order: a few ulps (~1e-16) apart at most.
    assert runbook.measured_pass_seconds(c, 16) == pytest.approx(expected, rel=1e-12)
    # A CPU-fallback file (narrow layers) or a failed part leaves the column unfilled.
    c["gpu_check"]["parts"]["roofline"]["layers"]["shape"] = "narrow (CPU fallback)"
    assert runbook.measured_pass_seconds(c, 16) is None
