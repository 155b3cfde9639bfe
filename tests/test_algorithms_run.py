"""Every algorithm runs end to end through the Ray workers (client hooks, payloads, state)."""

import pytest
import torch
from rich.console import Console

from fedsim.config import load_config
from fedsim.runio import load_weights

TINY = [
    "data.num_scenes=1000",
    "data.eval_scenes=20",
    "rounds=2",
    "eval_every=0",
    "eval.at_start=false",
    "train.local_steps=2",
    "train.batch_size=4",
    "scenario.cohort_size=3",
]


def _run(tmp_path, name, extra, cache_dir):
    from fedsim.driver import run

    cfg = load_config(None, [*TINY, f"cache_dir={cache_dir}", *extra])
    return run(cfg, tmp_path / name, console=Console(quiet=True), show_progress=False)


@pytest.mark.slow
# One per distinct worker path: loss hook (fedprox), payload + client state (scaffold), server
# state (fedadam), diagnostics (fedcmp); server-only variants are in tests/test_baselines.py.
@pytest.mark.parametrize("name", ["fedprox", "fedadam", "scaffold", "fedcmp"])
def test_algorithm_runs(tmp_path, toy_path, cache_dir, ray_session, name):
    extra = ["train.optimizer=sgd", "train.lr=0.05"] if name == "scaffold" else []
    r = _run(tmp_path, name, [f"algorithm.name={name}", *extra], cache_dir)
    for rec in r.history:
        assert rec["rejected"] == []
        assert rec["update_norm"] > 0
    assert all(torch.isfinite(v).all() for v in r.weights.values())
    if name == "scaffold":
        state = load_weights(tmp_path / name / "final" / "server_state.safetensors")
        # The server control variate moved: clients uploaded Δc through the workers.
        assert any(
            float(v.abs().sum()) > 0 for k, v in state.items() if k.startswith("c/")
        )


@pytest.mark.slow
def test_fedprox_mu_zero_equals_fedavg_end_to_end(
    tmp_path, toy_path, cache_dir, ray_session
):
    a = _run(tmp_path, "avg", ["algorithm.name=fedavg"], cache_dir)
    b = _run(
        tmp_path, "prox", ["algorithm.name=fedprox", "algorithm.mu=0.0"], cache_dir
    )
    c = _run(
        tmp_path, "prox1", ["algorithm.name=fedprox", "algorithm.mu=1.0"], cache_dir
    )
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)
