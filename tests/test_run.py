"""End-to-end runs on local Ray: outputs, determinism across worker counts, memory, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_runs import NO_EVAL, small_run
from small_runs import SMALL as BASE

from fedsim.config import load_config
from fedsim.runio import load_weights

SMALL = [*BASE, "eval_every=1"]


def _run(tmp_path: Path, name: str, extra: list[str], cache_dir: Path):
    return small_run(tmp_path / name, cache_dir, "eval_every=1", *extra)


@pytest.mark.slow
def test_run_outputs_and_bit_identical_across_workers(
    tmp_path, toy_path, cache_dir, ray_session
):
    one = _run(tmp_path, "w1", ["ray.workers=1"], cache_dir)
    two = _run(tmp_path, "w2", ["ray.workers=2"], cache_dir)
    w1 = load_weights(tmp_path / "w1" / "final" / "projector.safetensors")
    w2 = load_weights(tmp_path / "w2" / "final" / "projector.safetensors")
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k  # bit-identical
    assert all(torch.equal(w1[k], one.weights[k]) for k in w1)

    out = tmp_path / "w1"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "summary.md",
        "resources.json",
    ):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    for r in lines[1:]:
        assert r["num_clients"] == 4 and len(r["clients"]) == 4
        assert r["samples"] == 4 * 2 * 4  # cohort × local steps × batch
        assert r["rejected"] == [] and r["loss"] > 0 and "eval" in r
    evals = json.loads((out / "eval.json").read_text())
    assert evals["final"] == lines[-1]["eval"] and evals["initial"] == lines[0]["eval"]
    # The projector moved; the weights differ from W_0 (which round 0 evaluated).
    assert one.history[1]["update_norm"] > 0
    # Resolved config reloads to the same config.
    assert load_config(str(out / "config.yaml")) == load_config(
        None, [*SMALL, f"cache_dir={cache_dir}", "ray.workers=1"]
    )
    assert two.final_eval.keys() == one.final_eval.keys()
    # What the run was computed on, and on which frozen bits (the shipped toy, by digest).
    from fedsim.machine import machine_info
    from fedsim.models.toy_reference import reference_digest

    machine = json.loads((out / "resources.json").read_text())["machine"]
    assert machine == json.loads(json.dumps(machine_info()))
    assert {"cpu", "cores", "torch", "torch_cpu_capability", "blas"} <= set(machine)
    summary = (out / "summary.md").read_text()
    assert f"- machine: {machine['cpu']} ({machine['cores']} cores)" in summary
    assert reference_digest()[:16] in summary


@pytest.mark.slow
def test_same_seed_same_bits_other_seed_other_bits(
    tmp_path, toy_path, cache_dir, ray_session
):
    a = _run(
        tmp_path, "a", ["rounds=1", "eval_every=0", "eval.at_start=false"], cache_dir
    )
    b = _run(
        tmp_path, "b", ["rounds=1", "eval_every=0", "eval.at_start=false"], cache_dir
    )
    c = _run(
        tmp_path,
        "c",
        ["rounds=1", "eval_every=0", "eval.at_start=false", "seed=1"],
        cache_dir,
    )
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)
    # Two bit-identical runs name their weights by the same digest in every score file (a
    # digest of the tensors, not of the safetensors file, whose header order may vary).
    from fedsim.runio import weights_digest

    def digests(run: str) -> set[str]:
        files = sorted((tmp_path / run / "eval").glob("*/scores.json"))
        assert files, f"{run}: no score files"
        return {json.loads(f.read_text())["projector_digest"] for f in files}

    assert digests("a") == digests("b") == {weights_digest(a.weights)}
    assert digests("c") == {weights_digest(c.weights)} != digests("a")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = _cli("run", "--set", "train.lr=abc", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0] and "'abc'" in lines[0]
    assert not (tmp_path / "x").exists()  # nothing started


def test_cli_refuses_a_folder_holding_a_run(tmp_path, cache_dir):
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    r = _cli(
        "run",
        "--set",
        f"cache_dir={cache_dir}",
        "--set",
        "model.backbone=/nonexistent",
        "--out",
        str(tmp_path / "new"),
    )
    assert r.returncode == 2 and "model.backbone" in r.stderr
    assert not (tmp_path / "new").exists()
    r = _cli("run", "--set", f"cache_dir={cache_dir}", "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'  # untouched


def _peak_total(run_dir: Path) -> float:
    peaks = json.loads((run_dir / "resources.json").read_text())["peak_rss_mb"]
    return sum(peaks.values())


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_logical_clients(tmp_path, toy_path, cache_dir):
    """200 logical clients cost within 10 % of 20 (driver + workers + aggregator + evaluator).

    Each run is its own process with its own Ray, so every peak is that run's own.
    """
    common = [
        *SMALL,
        "data.num_scenes=4000",
        "rounds=3",
        "eval_every=0",
        "eval.at_start=false",
        f"cache_dir={cache_dir}",
    ]
    peaks = {}
    for n in (20, 200):
        out = tmp_path / f"c{n}"
        sets = [x for s in [*common, f"scenario.num_clients={n}"] for x in ("--set", s)]
        r = _cli("run", *sets, "--out", str(out), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[n] = _peak_total(out)
    assert peaks[200] <= 1.10 * peaks[20], peaks


@pytest.mark.slow
def test_cohort_batching_same_groups_whatever_the_workers(
    tmp_path, toy_path, cache_dir, ray_session
):
    """Groups of 2 of SCAFFOLD's 4 clients (client-state store in play), on 1 and 2 workers:
    bit-identical; one client at a time: equal up to float32 rounding.

    The bound (argued, see tests/test_cohort.py): with plain SGD each step moves the weights by
    η·g with ‖g‖₂ ≤ grad_clip = 1, and cohort batching changes g only by float32 summation order,
    at most γ_n < 3e-3 of it; over the run's rounds × local_steps = 4 steps at η ≤ 3e-3 the
    weights differ by at most 4·3e-3·3e-3 ≈ 4e-5, doubled for SCAFFOLD's correction c − c_i (built
    from the same deltas). AdamW is not used here: it has no rounding bound."""
    common = ["algorithm.name=scaffold", "train.optimizer=sgd", *NO_EVAL]
    runs = {
        (cb, w): _run(
            tmp_path,
            f"cb{cb}w{w}",
            [*common, f"train.cohort_batch={cb}", f"ray.workers={w}"],
            cache_dir,
        )
        for cb, w in ((2, 1), (2, 2), (1, 2))
    }
    a, b, one = runs[(2, 1)].weights, runs[(2, 2)].weights, runs[(1, 2)].weights
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert float((a[k] - one[k]).abs().max()) <= 2 * 4 * 3e-3 * 3e-3, k
    for r in runs[(2, 2)].history[1:]:
        # Two cohorts of two: the round's clients by predicted tokens (most first), then id.
        tokens = {int(c): n for c, n in r["predicted_tokens"].items()}
        assert sorted(tokens) == sorted(r["clients"])
        order = sorted(tokens, key=lambda c: (-tokens[c], c))
        assert r["cohorts"] == [order[:2], order[2:]]
    for r in runs[(1, 2)].history[1:]:
        assert len(r["cohorts"]) == 4 and all(len(g) == 1 for g in r["cohorts"])
