"""A third-party algorithm package: installed, found through the entry point, run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parent / "plugin_demo"

# The median's hand computation: three clients, two coordinates (and a second key).
CHECK = """
import torch
from fedsim.algorithms import ClientUpdate, build_algorithm
algo = build_algorithm("fedmedian", {"server_lr": 0.5})
w = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]])}
deltas = [([3.0, -1.0], 2.0), ([1.0, 5.0], -4.0), ([2.0, 0.0], 1.0)]
ups = [ClientUpdate(c, {"a": torch.tensor(d), "b": torch.tensor([[e]])}, 10, 0.0, 1)
       for c, (d, e) in enumerate(deltas)]
out = algo.aggregate(w, ups, {}, 1).weights
# medians: a -> [2, 0], b -> 1; W + 0.5 * median
assert torch.equal(out["a"], torch.tensor([2.0, 1.0])), out
assert torch.equal(out["b"], torch.tensor([[0.5]])), out
print("median ok")
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """Install the plug-in package (pip, from its source tree) into a private folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
    )
    assert list(target.glob("fedsim_plugin_demo-*.dist-info/entry_points.txt"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(target), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _fedsim(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )


def test_plugin_is_listed_and_its_server_half_is_a_pure_function(plugin_env):
    listed = _fedsim(["algorithms", "list"], plugin_env)
    assert listed.returncode == 0, listed.stderr
    assert "fedmedian" in listed.stdout and "1803.01498" in listed.stdout
    check = subprocess.run(
        [sys.executable, "-c", CHECK], env=plugin_env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    # Without the package, the name is unknown and the error says which names exist.
    bare = _fedsim(["run", "--set", "algorithm.name=fedmedian"], dict(os.environ))
    assert bare.returncode == 2
    assert "unknown algorithm 'fedmedian'" in bare.stderr + bare.stdout


@pytest.mark.slow
def test_plugin_runs_end_to_end(plugin_env, toy_path, cache_dir, tmp_path):
    out = tmp_path / "run"
    sets = [
        "algorithm.name=fedmedian",
        "algorithm.server_lr=0.5",
        "data.num_scenes=1000",
        "data.eval_scenes=20",
        "rounds=2",
        "eval_every=0",
        "eval.at_start=false",
        "train.local_steps=2",
        "train.batch_size=4",
        "scenario.cohort_size=3",
        f"cache_dir={cache_dir}",
    ]
    args = ["run", "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    done = _fedsim(args, plugin_env)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["rejected"] == [] and r["update_norm"] > 0 for r in records)
    config = (out / "config.yaml").read_text()
    assert "fedmedian" in config
    assert (out / "final" / "projector.safetensors").exists()
