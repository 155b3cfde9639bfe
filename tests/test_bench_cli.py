"""`fedsim bench`: its numbers are consistent with each other, and bad flags are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sections", "speed"], "--sections"),
        (["--clients", "0"], "--clients"),
        (["--cohort-sizes", "10,x"], "--cohort-sizes"),
        (["--device", "tpu"], "--device"),
        (["--memory-clients", "10,100", "--memory-cohort", "20"], "--memory-cohort"),
        (["--agg-limit-sizes", "13b"], "--agg-limit-sizes"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, needle):
    r = _bench(*args, "--out", str(tmp_path / "b"))
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "b").exists()  # nothing written before the flags are checked


@pytest.mark.slow
def test_training_and_aggregation_sections(tmp_path, toy_path, cache_dir):
    from fedsim.algorithms.registry import comparable

    r = _bench(
        "--sections",
        "training,aggregation",
        "--clients",
        "3",
        "--steps",
        "2",
        "--batch",
        "4",
        "--repeats",
        "1",
        "--cohort-sizes",
        "4,8",
        "--set",
        "data.num_scenes=2000",
        "--set",
        "train.optimizer=sgd",
        "--set",
        f"cache_dir={cache_dir}",
        "--out",
        str(tmp_path / "b"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    t = out["training"]
    ways = t["ways"]
    base = ways["resident, one client at a time"]["seconds"]
    assert len(ways) == 3
    for w in ways.values():
        assert w["speedup_vs_one_at_a_time"] == pytest.approx(base / w["seconds"])
        assert w["client_updates_per_s"] == pytest.approx(3 / w["seconds"])
    # fp32 on CPU with plain SGD: cohort batching changes the deltas by float32 summation order
    # only, at most γ_n < 3e-3 of the largest entry (the argument in tests/test_cohort.py).
    assert t["cohort_max_relative_difference"] <= 3e-3
    assert t["repeat_max_relative_difference"] == 0.0
    assert t["swap_share_of_step"] == pytest.approx(
        t["swap_seconds"] / t["local_step_seconds"]
    )
    assert t["local_step_seconds"] == pytest.approx(base / (3 * 2))
    agg = out["aggregation"]["seconds"]
    assert set(agg) == set(comparable()) - {"centralized"}
    assert all(set(row) == {"4", "8"} and min(row.values()) > 0 for row in agg.values())
    assert "local training" in r.stdout and "server aggregation" in r.stdout
