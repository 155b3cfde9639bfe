"""Scenario presets: the toy twins run end to end; partitions depend on (config, seed) only."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from fedsim.config import load_config

TWINS = ["toy-iid", "toy-dirichlet", "toy-domain", "toy-mixed"]
TINY = [
    "data.num_scenes=1200",
    "data.eval_scenes=20",
    "rounds=2",
    "eval_every=0",
    "eval.at_start=false",
    "train.local_steps=1",
    "train.batch_size=4",
    "scenario.cohort_size=4",
]


def test_partitions_are_identical_for_a_seed_and_independent_of_workers(cache_dir):
    from fedsim.data.scenes_dataset import ensure_scenes
    from fedsim.prepare import DATA_SEED, TRAIN_STREAM, partition

    for name in TWINS:
        base = [*TINY, f"cache_dir={cache_dir}"]
        cfgs = [
            load_config(name, [*base, "ray.workers=1"]),
            load_config(name, [*base, "ray.workers=2"]),
            load_config(name, [*base, "seed=1"]),
        ]
        path = ensure_scenes(
            cache_dir, cfgs[0].data.scene, DATA_SEED, TRAIN_STREAM, 1200
        )
        a, b, c = (partition(cfg, path) for cfg in cfgs)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
        assert sorted(np.concatenate(a).tolist()) == list(range(1200)), name
        assert all(len(x) > 0 for x in a), name
        assert not all(np.array_equal(x, y) for x, y in zip(a, c)), name


def test_toy_mixed_has_power_law_sizes_and_mixed_domains(cache_dir):
    from fedsim.scenario_stats import scenario_stats

    s = scenario_stats(load_config("toy-mixed", [f"cache_dir={cache_dir}"]))
    sizes = np.sort(s.sizes)[::-1]
    assert sizes[0] > 10 * sizes[-1]  # n ∝ 1/r over 20 ranks: largest ≈ 20× smallest
    held = (s.views[0].counts > 0).sum(1)
    assert np.median(held) >= 3  # Dirichlet(1.0): most clients mix several domains


@pytest.mark.slow
def test_every_toy_twin_runs_with_fedavg_and_fedcmp(
    tmp_path, toy_path, cache_dir, ray_session
):
    from fedsim.compare import compare

    quiet = Console(quiet=True)
    for name in TWINS:
        out = tmp_path / name
        result = compare(
            ["fedavg", "fedcmp"],
            [0],
            out,
            name,
            [*TINY, f"cache_dir={cache_dir}"],
            quiet,
            False,
        )
        for algo in ("fedavg", "fedcmp"):
            final = result.finals[algo][0]
            assert 0.0 <= final["attr_mean"] <= 1.0, (name, algo)
            assert (out / algo / "seed-0" / "final" / "projector.safetensors").exists()


@pytest.mark.slow
def test_heterogeneous_participation_end_to_end(
    tmp_path, toy_path, cache_dir, ray_session
):
    """Tiers with a time budget, dropout and a deadline shape who trains and for how long."""
    from fedsim.driver import run
    from fedsim.scenarios.participation import assign_tiers

    cfg = load_config(
        "toy-iid",
        [
            *TINY,
            f"cache_dir={cache_dir}",
            "rounds=3",
            "train.local_steps=4",
            "scenario.cohort_size=8",
            "scenario.dropout=0.25",
            "scenario.tier_speeds=[1.0, 0.25]",
            "scenario.tier_shares=[0.5, 0.5]",
            "scenario.tier_upload_mbps=[100.0, 100.0]",
            "scenario.step_seconds=0.1",
            "scenario.time_budget=0.2",
        ],
    )
    r = run(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)
    tiers = assign_tiers(20, (0.5, 0.5), cfg.seed)
    clock = 0.0
    for rec in r.history:
        assert set(rec["clients"]) == set(rec["sampled"]) - set(rec["dropped"])
        steps = {int(c): n for c, n in rec["local_steps"].items()}
        # budget 0.2 s: fast tier ⌊0.2·1/0.1⌋ = 2 steps, slow tier max(1, ⌊0.05⌋) = 1 step
        assert steps == {c: (2 if tiers[c] == 0 else 1) for c in rec["clients"]}
        assert rec["samples"] == 4 * sum(steps.values())
        clock += rec["sim_seconds"]
        # Both are rounded to 1e-6 when written: each round's rounding adds ≤ 5e-7 to the
        # running sum of 2 rounds, so they differ by ≤ 2e-6 < abs 1e-5.
        assert rec["sim_clock"] == pytest.approx(clock, abs=1e-5)
