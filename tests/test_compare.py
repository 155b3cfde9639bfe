"""fedsim compare: identical cohorts across algorithms, mean ± std from the runs, reuse."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console

from fedsim.compare import compare

TINY = [
    "data.num_scenes=1000",
    "data.eval_scenes=20",
    "rounds=2",
    "eval_every=0",
    "eval.at_start=false",
    "train.local_steps=1",
    "train.batch_size=4",
    "scenario.cohort_size=3",
    "checkpoint_every=1",
]


@pytest.mark.slow
def test_compare_table_matches_the_runs(tmp_path, toy_path, cache_dir, ray_session):
    out = tmp_path / "cmp"
    sets = [*TINY, f"cache_dir={cache_dir}"]
    quiet = Console(quiet=True)
    # Two lanes of one worker each: the runs must still equal a fresh two-worker run (below).
    compare(["fedavg", "fedcmp"], [0, 1], out, "toy-dirichlet", sets, quiet, False, 2)
    # Same cohorts for both algorithms, seed by seed.
    for seed in (0, 1):
        cohorts = [
            [
                r["clients"]
                for r in map(
                    json.loads,
                    (out / a / f"seed-{seed}" / "metrics.jsonl")
                    .read_text()
                    .splitlines(),
                )
            ]
            for a in ("fedavg", "fedcmp")
        ]
        assert cohorts[0] == cohorts[1]
    # The table is the mean and sample std of the runs' own final evaluations.
    rows = {r["algorithm"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    for algo in ("fedavg", "fedcmp"):
        finals = [
            json.loads((out / algo / f"seed-{s}" / "eval.json").read_text())["final"]
            for s in (0, 1)
        ]
        vals = np.array([f["attr_mean"] for f in finals])
        # comparison.csv holds the mean and std printed to 6 decimals (abs 1e-6 is that
        # rounding); both sides use the same numbers in [0, 1].
        assert float(rows[algo]["attr_mean_mean"]) == pytest.approx(
            vals.mean(), abs=1e-6
        )
        assert float(rows[algo]["attr_mean_std"]) == pytest.approx(
            vals.std(ddof=1), abs=1e-6
        )
    assert (out / "comparison.png").stat().st_size > 0
    # The toy benchmark suite's headline numbers, mean over the runs' own eval.json.
    md = (out / "comparison.md").read_text()
    assert "Toy benchmark suite" in md
    pope = [
        json.loads((out / "fedavg" / f"seed-{s}" / "eval.json").read_text())[
            "benchmarks"
        ]["pope"]["accuracy"]
        for s in (0, 1)
    ]
    suite_table = md[md.index("Toy benchmark suite") :]
    row = next(
        line for line in suite_table.splitlines() if line.startswith("| fedavg |")
    )
    assert f"{np.mean(pope):.3f} ± {np.std(pope, ddof=1):.3f}" in row
    assert "fedcmp" in (out / "comparison.md").read_text()
    # A second call reuses the finished runs instead of running them again.
    before = (out / "fedavg" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    compare(["fedavg", "fedcmp"], [0, 1], out, "toy-dirichlet", sets, quiet, False)
    assert (out / "fedavg" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == before

    # An interrupted run with a checkpoint of the same config is resumed from it (same bits);
    # one without a usable checkpoint is moved aside and run again.
    from fedsim.runio import load_weights

    cut = out / "fedavg" / "seed-1"
    full = load_weights(cut / "final" / "projector.safetensors")
    (cut / "summary.md").unlink()
    (cut / "eval.json").unlink()
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "round-000002")
    gone = out / "fedcmp" / "seed-0"
    (gone / "eval.json").unlink()
    shutil.rmtree(gone / "checkpoints")
    compare(["fedavg", "fedcmp"], [0, 1], out, "toy-dirichlet", sets, quiet, False)
    resumed = load_weights(cut / "final" / "projector.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((cut / "resumes.jsonl").read_text())["resumed_after_round"] == 1
    assert len(list((out / "fedcmp").glob("seed-0.incomplete-*"))) == 1
    assert (gone / "eval.json").exists()

    # Runs on the pool's reused actors give the same bits as a run on fresh ones.
    from fedsim.config import load_config
    from fedsim.driver import run

    cfg = load_config("toy-dirichlet", [*sets, "algorithm.name=fedcmp", "seed=1"])
    fresh = run(cfg, tmp_path / "fresh", console=quiet, show_progress=False)
    reused = load_weights(out / "fedcmp" / "seed-1" / "final" / "projector.safetensors")
    assert all(torch.equal(fresh.weights[k], reused[k]) for k in fresh.weights)


def _finished_run(run_dir, cfg):
    from fedsim.config import config_to_yaml_data
    from fedsim.runio import write_json, write_yaml

    run_dir.mkdir(parents=True)
    write_yaml(run_dir / "config.yaml", config_to_yaml_data(cfg))
    write_json(run_dir / "eval.json", {"final": {"attr_mean": 0.5}})


def test_a_finished_run_is_reused_only_for_its_own_config(tmp_path):
    """Reusing a finished run of another setting would put its score in the table under this
    one's name: an error naming the run folder and the fields that differ."""
    from fedsim.compare import schedule_runs
    from fedsim.config import load_config
    from fedsim.configtools import ConfigError

    quiet = Console(quiet=True)
    cfg = load_config(None, ["train.lr=0.003", "seed=0"])
    run_dir = tmp_path / "fedavg" / "seed-0"
    _finished_run(run_dir, cfg)
    dirs = {"fedavg": {0: run_dir}}

    def schedule(c):
        finals = {"fedavg": {}}
        todo, _ = schedule_runs({("fedavg", 0): c}, dirs, finals, quiet)
        return todo, finals

    # The same config, and the same up to where it runs (cache, Ray workers): reused.
    assert schedule(cfg) == ([], {"fedavg": {0: {"attr_mean": 0.5}}})
    where = load_config(
        None, ["train.lr=0.003", "seed=0", "ray.workers=1", "cache_dir=/x"]
    )
    assert schedule(where)[0] == []
    # Another learning rate: refused, one line, naming the folder and the field.
    other = load_config(None, ["train.lr=0.01", "seed=0"])
    with pytest.raises(ConfigError) as e:
        schedule(other)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(run_dir))
    assert "train.lr 0.003 ≠ 0.01" in msg
    # A config.yaml that is not YAML: one line too, nothing moved or deleted.
    (run_dir / "config.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="cannot read the finished run's config"):
        schedule(cfg)
    assert (run_dir / "eval.json").exists()
