"""Update validation: the norm bound, and what a round does with rejected updates."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from small_runs import NO_EVAL, cli_run_args, small_run

from fedsim.aggregator import Aggregator
from fedsim.algorithms.base import ClientUpdate, validate_update
from fedsim.config import ConfigError, load_config

W = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.5, -0.5]])}


def _update(cid: int, scale: float, n: int = 10) -> ClientUpdate:
    delta = {"a": torch.tensor([scale, 0.0, 0.0]), "b": torch.tensor([[0.0, scale]])}
    return ClientUpdate(cid, delta, n, 1.0, 4)


def test_norm_bound_names_the_client_and_the_field():
    u = _update(7, 3.0)  # ‖Δ‖₂ = √(9 + 9) ≈ 4.243
    reason = validate_update(u, W, max_norm=4.0)
    assert reason is not None
    assert "client 7" in reason and "4.243" in reason
    assert "validation.max_update_norm 4" in reason
    assert validate_update(u, W, max_norm=4.25) is None
    assert validate_update(u, W) is None
    # "1e-9" is a string to YAML 1.1; the config takes it as the number it spells.
    assert (
        load_config(
            None, ["validation.max_update_norm=1e-9"]
        ).validation.max_update_norm
        == 1e-9
    )
    with pytest.raises(ConfigError, match="validation.max_update_norm"):
        load_config(None, ["validation.max_update_norm=0"])
    with pytest.raises(ConfigError, match="on_reject"):
        load_config(None, ["validation.on_reject=ignore"])


def _nan_update(cid: int) -> ClientUpdate:
    u = _update(cid, 1.0)
    u.delta["a"][1] = math.nan
    return u


def test_continue_aggregates_the_accepted_updates_only():
    agg = Aggregator("fedavg", {}, W)
    agg.reset("fedavg", {}, W, None, 5.0, "continue")
    ups = [
        _update(1, 1.0, n=10),
        _nan_update(2),
        _update(3, 2.0, n=30),
        _update(4, 9.0),
    ]
    new, metrics = agg.aggregate(W, ups, 1)
    # FedAvg over clients 1 and 3 (McMahan et al.): W + (10·Δ1 + 30·Δ3) / 40.
    step = (10 * 1.0 + 30 * 2.0) / 40
    # allclose's default (rtol 1e-5, atol 1e-8): the mean of small integers times 0.25/0.75
    # rounds once or twice in float32 (≤ 2⁻²³ relative), far inside it; a wrong weighting or an
    # averaged-in NaN/9.0 client moves it by ≥ 0.1.
    assert torch.allclose(new["a"], W["a"] + torch.tensor([step, 0.0, 0.0]))
    assert torch.allclose(new["b"], W["b"] + torch.tensor([[0.0, step]]))
    assert [r["client_id"] for r in metrics["rejected"]] == [2, 4]
    assert "NaN/Inf" in metrics["rejected"][0]["reason"]
    assert "max_update_norm" in metrics["rejected"][1]["reason"]
    assert "action" not in metrics


def test_skip_round_keeps_weights_and_server_state():
    agg = Aggregator("fedavgm", {"momentum": 0.9}, W)
    agg.reset("fedavgm", {"momentum": 0.9}, W, None, None, "skip_round")
    w1, _ = agg.aggregate(W, [_update(1, 1.0), _update(2, 1.0)], 1)
    state = {k: v.clone() for k, v in agg.state.items()}
    assert state  # momentum buffers exist after a normal round
    w2, metrics = agg.aggregate(w1, [_update(1, 1.0), _nan_update(2)], 2)
    assert all(torch.equal(w1[k], w2[k]) for k in W)
    assert all(torch.equal(state[k], agg.state[k]) for k in state)
    assert metrics["action"].startswith("skip_round")
    assert [r["client_id"] for r in metrics["rejected"]] == [2]


def test_nothing_accepted_keeps_w():
    agg = Aggregator("fedavg", {}, W)
    new, metrics = agg.aggregate(W, [_nan_update(1)], 1)
    assert all(torch.equal(new[k], W[k]) for k in W)
    assert metrics["update_norm"] == 0.0 and "no accepted update" in metrics["action"]


OVER = [*NO_EVAL, "validation.max_update_norm=1e-9"]  # every update is over the bound


@pytest.mark.slow
def test_every_update_over_the_bound_keeps_w0(
    tmp_path, toy_path, cache_dir, ray_session
):
    from fedsim.runio import load_weights

    res = small_run(tmp_path / "r", cache_dir, *OVER)
    w0 = load_weights(tmp_path / "r" / "final" / "projector.safetensors")
    for rec in res.history[1:]:
        assert sorted(r["client_id"] for r in rec["rejected"]) == sorted(rec["clients"])
        assert "no accepted update" in rec["action"]
    # W_0 from the seed, untouched: the final projector is the one round 0 evaluated.
    from fedsim.models.backbone import init_projector, load_backbone

    fresh = init_projector(load_backbone(toy_path), 0)
    assert all(torch.equal(w0[k], fresh[k]) for k in fresh)


@pytest.mark.slow
def test_fail_policy_stops_with_one_line_and_keeps_the_rounds_done(
    tmp_path, toy_path, cache_dir
):
    out = tmp_path / "run"
    cmd = cli_run_args(out, cache_dir, *OVER, "validation.on_reject=fail")
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1
    assert "round 1" in lines[0] and "validation.on_reject is fail" in lines[0]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["round"] for rec in records] == [0, 1]
    assert len(records[1]["rejected"]) == 4
    assert (out / "config.yaml").exists()
