"""``fedsim sweep``: equal budgets, selection on the validation split only, paired CIs.

The statistics are checked by hand (t quantiles are the table's; differences of small integers
are exact in float64); the protocol is checked on a tiny real sweep.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.configtools import ConfigError
from fedsim.sweep import Entry, grid_edges, load_spec, paired_ci, select, t975
from tests.small_runs import SMALL


def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_paired_ci_by_hand():
    # d = (1, 3): mean 2, s = √2, half-width t_{0.975,1} · √2 / √2 = 12.706.
    mean, low, high = paired_ci([1.0, 3.0])
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 12.706, 2.0 + 12.706))
    # d = (1, 2, 3, 4, 5): mean 3, s = √2.5, half = 2.776 · √2.5 / √5 = 2.776 / √2.
    mean, low, high = paired_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert high - mean == pytest.approx(2.776 / math.sqrt(2))
    assert t975(4) == 2.776 and t975(100) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_selection_rule_is_best_mean_first_on_ties():
    assert select([[0.5, 0.7], [0.6, 0.6], [0.2, 0.9]]) == 0  # means 0.6, 0.6, 0.55
    assert select([[0.1], [0.3], [0.2]]) == 1


def test_grid_edges_name_the_axes_a_selection_sits_on_the_end_of():
    e = Entry(
        "fedcmp", "fedcmp", {"rank": 32},
        {"train.lr": [0.001, 0.0005, 0.003], "algorithm.momentum": [0.0, 0.9, 0.5],
         "algorithm.server_lr": [1.0, 2.0], "algorithm.reliability": ["sign", "both", "none"]},
    )  # fmt: skip
    # the grid's order is not its sort order; a two-value axis (no interior) and a text axis
    # are never named
    point = {"train.lr": 0.0005, "algorithm.momentum": 0.9, "algorithm.server_lr": 2.0,
             "algorithm.reliability": "sign"}  # fmt: skip
    assert grid_edges(e, point) == [
        "train.lr at its smallest (0.0005)",
        "algorithm.momentum at its largest (0.9)",
    ]
    assert grid_edges(e, {**point, "train.lr": 0.001, "algorithm.momentum": 0.0}) == [
        "algorithm.momentum at its smallest (0.0)"
    ]
    assert grid_edges(e, {**point, "train.lr": 0.001, "algorithm.momentum": 0.5}) == []


def test_equal_budget_points():
    e = Entry(
        "fedavg", "fedavg", {}, {"train.lr": [1, 2, 3], "algorithm.server_lr": [1, 2]}
    )
    full = e.points(6)
    assert full[0] == {"train.lr": 1, "algorithm.server_lr": 1} and len(full) == 6
    sub = e.points(4)
    assert len(sub) == 4 and all(p in full for p in sub)
    assert len({tuple(p.values()) for p in sub}) == 4
    assert e.points(4) == sub  # keyed: the same subset every time


@pytest.mark.parametrize(
    "text, needle",
    [
        ("budget: 3\nalgorithms:\n  fedavg:\n    grid: {train.lr: [0.1, 0.2]}\n",
         "algorithms.fedavg.grid: 2 configuration(s), fewer than budget 3"),
        ("budget: 1\nbogus: 1\nalgorithms:\n  fedavg: {}\n", "unknown field(s) ['bogus']"),
        ("budget: 0\nalgorithms:\n  fedavg: {}\n", "budget: expected an integer >= 1"),
        ("budget: 1\ntest_seeds: [0, 0]\nalgorithms:\n  fedavg: {}\n",
         "test_seeds: a seed is listed twice"),
        ("budget: 1\nalgorithms:\n  fedavg:\n    grid: {seed: [1]}\n",
         "'seed' is set by the sweep itself"),
        ("budget: 1\nmetric: loss\nalgorithms:\n  fedavg: {}\n", "metric: 'loss' is not"),
        ("budget: 1\nreference: fedprox\nalgorithms:\n  fedavg: {}\n",
         "reference: 'fedprox' is not an entry"),
    ],
)  # fmt: skip
def test_bad_specs_are_one_line_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_spec(_spec(tmp_path, text))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "spec.yaml" in str(err.value)


def test_bad_spec_through_the_cli_exits_2_and_writes_nothing(tmp_path):
    spec = _spec(
        tmp_path, "budget: 2\nalgorithms:\n  fedavg:\n    grid: {train.lr: [0.1]}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "sweep",
            str(spec),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "fewer than budget 2" in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()


def test_sweep_selects_on_validation_only_and_reproduces_its_selection(
    tmp_path, toy_path, cache_dir, ray_session, monkeypatch
):
    """Selection never asks for the test scenes; the test phase does; a rerun trains nothing
    and writes the same selection from the stored validation scores."""
    import fedsim.prepare as prepare
    import fedsim.sweep as sweep_mod

    calls: list[object] = []
    real_scenes, real_phase = prepare.ensure_scenes, sweep_mod._run_phase

    def scenes(cache, scene, seed, stream, n):
        calls.append(stream)
        return real_scenes(cache, scene, seed, stream, n)

    def phase(*args, **kwargs):
        calls.append("phase")
        return real_phase(*args, **kwargs)

    monkeypatch.setattr(prepare, "ensure_scenes", scenes)
    monkeypatch.setattr(sweep_mod, "_run_phase", phase)
    overrides = [*SMALL, f"cache_dir={cache_dir}", "eval_every=0", "eval.benchmarks=[]"]
    spec = _spec(
        tmp_path,
        "set: " + repr(overrides).replace("'", '"') + "\n"
        "budget: 2\nselect_seeds: [0]\ntest_seeds: [0, 1]\n"
        "algorithms:\n"
        "  fedavg:\n    grid: {algorithm.server_lr: [1.0, 2.0]}\n"
        "  fedexp:\n    grid: {train.lr: [0.001, 0.003, 0.01]}\n",
    )
    from rich.console import Console

    out = tmp_path / "out"
    result = sweep_mod.sweep(load_spec(spec), out, Console(quiet=True), False)
    second = calls.index("phase", 1)
    selection_streams = [c for c in calls[:second] if c != "phase"]
    test_streams = [c for c in calls[second:] if c != "phase"]
    assert prepare.EVAL_STREAM not in selection_streams
    assert prepare.VALIDATION_STREAM in selection_streams
    assert prepare.EVAL_STREAM in test_streams
    # Every selection run was evaluated on the validation split, every test run on the test one.
    for cfg in (out / "select").glob("*/*/seed-*/config.yaml"):
        assert "eval_split: validation" in cfg.read_text()
    for cfg in (out / "test").glob("*/seed-*/config.yaml"):
        assert "eval_split: test" in cfg.read_text()
    # The selected point is the best validation mean in selection.csv.
    with open(out / "selection.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for label in ("fedavg", "fedexp"):
        mine = [r for r in rows if r["entry"] == label]
        best = max(
            range(len(mine)), key=lambda i: (float(mine[i]["mean_attr_mean"]), -i)
        )
        assert mine[best]["selected"] == "1" and result.chosen[label] == best
        assert [r["selected"] for r in mine].count("1") == 1
    md = (out / "sweep.md").read_text()
    assert "Paired differences against fedavg" in md
    assert (out / "sweep.png").stat().st_size > 0
    # Rerun: everything is reused, the same selection comes out.
    before = (out / "selection.csv").read_bytes()
    calls.clear()
    again = sweep_mod.sweep(load_spec(spec), out, Console(quiet=True), False)
    assert again.chosen == result.chosen
    assert (out / "selection.csv").read_bytes() == before
    assert [
        c for c in calls if c != "phase"
    ] == []  # no run started, no scenes asked for
    # The cost is the runs' own round time: the same when every run was reused.
    cost = re.compile(
        r"(\d+) runs; their rounds took (\d+) s \(selection\) and (\d+) s"
    )
    first, second = cost.search(md), cost.search((out / "sweep.md").read_text())
    assert (
        first and second and first[1] == "8"
    )  # 2 entries × 2 points × 1 seed + 2 × 2 seeds
    assert first.groups() == second.groups()


def _metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    return run_dir


def test_run_diagnostics_and_round_seconds_are_means_and_sums_of_the_records(tmp_path):
    from fedsim.sweep import rounds_seconds, run_diagnostics

    run = _metrics(
        tmp_path / "a",
        [
            {"round": 0, "wall_seconds": 1.5, "eval": {"attr_mean": 0.3}},
            {"round": 1, "wall_seconds": 2.0, "update_norm": 4.0,
             "diagnostics": {"step_cos_prev": 0.5, "drift": 1.0}},
            {"round": 2, "wall_seconds": 3.0, "update_norm": 2.0,
             "diagnostics": {"step_cos_prev": -0.25, "drift": 3.0, "client_cos_mean": 0.1}},
        ],
    )  # fmt: skip
    assert rounds_seconds(run) == 6.5
    d = run_diagnostics(run)
    assert d == {
        "step_cos_prev": 0.125,
        "drift": 2.0,
        "client_cos_mean": 0.1,
        "update_norm": 3.0,  # rounds with diagnostics only
    }
    # A pooled run (no diagnostics): nothing to summarise.
    plain = _metrics(tmp_path / "b", [{"round": 1, "wall_seconds": 1.0, "loss": 2.0}])
    assert run_diagnostics(plain) == {} and rounds_seconds(plain) == 1.0


def test_algorithm_metrics_are_means_over_rounds_and_matrices(tmp_path):
    from fedsim.sweep import run_algorithm_metrics

    run = _metrics(
        tmp_path / "a",
        [
            {"round": 0, "eval": {"attr_mean": 0.3}},
            {"round": 1, "algorithm": {"l1.weight/rho_mean": 0.5, "l2.weight/rho_mean": 0.25,
                                       "l1.weight/rank": 4.0, "l2.weight/rank": 8.0}},
            {"round": 2, "algorithm": {"l1.weight/rho_mean": 0.125, "l2.weight/rho_mean": 0.125,
                                       "l1.weight/rank": 4.0, "l2.weight/rank": 8.0,
                                       "note": "text is skipped"}},
        ],
    )  # fmt: skip
    # (0.5 + 0.25 + 0.125 + 0.125) / 4 and (4 + 8 + 4 + 8) / 4: exact in binary
    assert run_algorithm_metrics(run) == {"rho_mean": 0.25, "rank": 6.0}
    fedexp = _metrics(tmp_path / "b", [{"round": 1, "algorithm": {"server_lr_t": 2.5}}])
    assert run_algorithm_metrics(fedexp) == {"server_lr_t": 2.5}
    assert run_algorithm_metrics(_metrics(tmp_path / "c", [{"round": 1}])) == {}


def test_every_shipped_sweep_spec_loads():
    """The specs the docs cite (sweeps/**/*.yaml) parse, with their presets and grids."""
    root = Path(__file__).resolve().parents[1] / "sweeps"
    specs = sorted(root.rglob("*.yaml"))
    assert len(specs) >= 5
    for path in specs:
        spec = load_spec(path)
        assert spec.entries and all(e.points(spec.budget) for e in spec.entries), path
