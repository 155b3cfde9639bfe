"""``fedsim sweep``: a fair tuning protocol, then the tuned comparison with paired CIs.

A method comparison says little when each method runs at one default. The protocol:

1. **Equal budget.** Every algorithm entry of the spec declares a grid over config keys (client
   LR ``train.lr``, server LR ``algorithm.server_lr``, momentum, its own parameters). Each gets
   the same number of configurations, ``budget``: a grid larger than that is sub-sampled
   (random search over the grid, Bergstra & Bengio 2012, keyed by the entry's name so it is the
   same every time); a smaller one is an error, never a silently smaller budget.
2. **Selection on validation only.** Every configuration runs with each ``select_seeds`` seed on
   the *validation* split (``data.eval_split: validation``: held-out scenes of their own
   generator stream, independent of the test scenes) and without the benchmark suite; the one
   with the best mean final ``metric`` wins (ties: the first in grid order). The test scenes are
   not generated, read or scored in this phase (a test checks it).
3. **Test.** The selected configuration of each entry runs with every ``test_seeds`` seed on the
   test split. Reported: mean ± std over seeds, and the paired difference against ``reference``
   (same seed: same cohorts, same data, same initial projector) with a 95 % confidence interval
   from Student's t with n − 1 degrees of freedom.

Runs are ordinary run folders (``OUT/select/<entry>/<point>/seed-<s>``,
``OUT/test/<entry>/seed-<s>``); finished ones are reused and interrupted ones resumed as in
``fedsim compare``, so rerunning the same spec reproduces its own selection from the stored
validation scores without training anything. Outputs: ``selection.csv`` (every configuration's
validation scores, the winners marked), ``sweep.md`` / ``sweep.csv`` (test table, paired
differences, the selected settings, what each phase cost) and ``sweep.png``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedsim.compare import (
    METRICS,
    Comparison,
    check_compare_dir,
    fmt_mean_std,
    plot_comparison,
    run_lanes,
    run_progress,
    schedule_runs,
    split_pooled,
)
from fedsim.config import Config, load_config
from fedsim.configtools import ConfigError, read_user_text, safe_load
from fedsim.prepare import check_inputs
from fedsim.raystart import joined_ray
from fedsim.resources import check_before_ray
from fedsim.runio import MetricsLog, RunLock, write_text

# Student's t quantile t_{0.975, df} for df = 1..30 (two-sided 95 %); beyond, the normal 1.96
# is within 0.04 of it. Standard table values (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

_SPEC_KEYS = {
    "config",
    "set",
    "budget",
    "select_seeds",
    "test_seeds",
    "metric",
    "reference",
    "algorithms",
}
_ENTRY_KEYS = {"algorithm", "params", "grid"}


def t975(df: int) -> float:
    """t_{0.975, df}: the half-width factor of a two-sided 95 % interval."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two seeds")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_ci(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95 % t-interval of paired differences (n ≥ 2)."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    half = t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a registered algorithm, fixed parameters and a grid."""

    label: str
    algorithm: str
    params: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self, budget: int) -> list[dict[str, Any]]:
        """``budget`` grid points: all of them in grid order, or a keyed random subset."""
        keys = list(self.grid)
        full = [
            dict(zip(keys, values)) for values in itertools.product(*self.grid.values())
        ]
        if len(full) == budget:
            return full
        # Keyed by the entry's label only: the same subset on every machine and every rerun.
        digest = int.from_bytes(self.label.encode(), "little") % (2**63)
        rng = np.random.default_rng([digest, len(full), budget])
        picked = sorted(rng.choice(len(full), size=budget, replace=False).tolist())
        return [full[i] for i in picked]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec (see the module docstring and ``fedsim sweep --help``)."""

    source: str
    config: str | None
    overrides: tuple[str, ...]
    budget: int
    select_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    metric: str
    reference: str
    entries: tuple[Entry, ...]


def _value(v: Any) -> str:
    """A ``--set`` value: JSON is YAML, so numbers, booleans, strings and lists parse back."""
    return json.dumps(v)


def _seeds(raw: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw)
    ):
        raise ConfigError(
            f"{where}: expected a non-empty list of integer seeds, got {raw!r}"
        )
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{where}: a seed is listed twice ({raw!r})")
    return tuple(raw)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every error is one line naming the file and the field."""
    p = Path(path)
    name = f"sweep spec {str(p)!r}"
    data = _read_spec(p, name)
    budget = data.get("budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"{name}: budget: expected an integer >= 1, got {budget!r}")
    overrides = data.get("set", [])
    if not isinstance(overrides, list) or not all(
        isinstance(s, str) for s in overrides
    ):
        raise ConfigError(f"{name}: set: expected a list of 'key=value' strings")
    algos = data.get("algorithms")
    if not isinstance(algos, dict) or not algos:
        raise ConfigError(f"{name}: algorithms: expected a mapping of entries")
    entries = [
        _entry(f"{name}: algorithms.{label}", label, body, budget)
        for label, body in algos.items()
    ]
    metric = data.get("metric", "attr_mean")
    if metric not in {k for k, _ in METRICS}:
        raise ConfigError(
            f"{name}: metric: {metric!r} is not one of {[k for k, _ in METRICS]}"
        )
    reference = data.get("reference", entries[0].label)
    if reference not in {e.label for e in entries}:
        raise ConfigError(f"{name}: reference: {reference!r} is not an entry label")
    return SweepSpec(
        str(p),
        _spec_config(data.get("config"), p, name),
        tuple(overrides),
        budget,
        _seeds(data.get("select_seeds", [0]), f"{name}: select_seeds"),
        _seeds(data.get("test_seeds", [0, 1, 2, 3, 4]), f"{name}: test_seeds"),
        metric,
        reference,
        tuple(entries),
    )


def _read_spec(p: Path, name: str) -> dict[str, Any]:
    """The spec file's top-level mapping, its fields all known ones."""
    try:
        text = read_user_text(p, "sweep spec")
    except OSError as e:
        raise ConfigError(f"{name}: cannot read ({e.strerror})") from None
    try:
        data = safe_load(text)
    except Exception:
        raise ConfigError(f"{name}: not valid YAML (or uses anchors/aliases)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: top level must be a mapping")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{name}: unknown field(s) {unknown} (known: {sorted(_SPEC_KEYS)})"
        )
    return data


def _entry(where: str, label: Any, body: Any, budget: int) -> Entry:
    """One ``algorithms`` entry, its grid checked: hyper-parameters only, and at least
    ``budget`` configurations (every algorithm gets the same number)."""
    body = body or {}
    if not isinstance(body, dict) or set(body) - _ENTRY_KEYS:
        raise ConfigError(
            f"{where}: expected a mapping with {sorted(_ENTRY_KEYS)}, got {body!r}"
        )
    grid = body.get("grid") or {}
    if not isinstance(grid, dict) or not all(
        isinstance(v, list) and v for v in grid.values()
    ):
        raise ConfigError(f"{where}.grid: expected key: [values, ...] lists")
    for key in grid:
        if key in ("seed", "algorithm.name") or key.startswith("data.eval_split"):
            raise ConfigError(
                f"{where}.grid: {key!r} is set by the sweep itself, not a hyper-parameter"
            )
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params: expected a mapping")
    entry = Entry(str(label), str(body.get("algorithm", label)), params, grid)
    size = math.prod(len(v) for v in grid.values())
    if size < budget:
        raise ConfigError(
            f"{where}.grid: {size} configuration(s), fewer than budget {budget}: every "
            "algorithm gets the same number of configurations"
        )
    return entry


def _spec_config(config: Any, p: Path, name: str) -> str | None:
    """The spec's ``config``: a preset name, or a YAML path (relative: to the spec's folder
    when the file is there)."""
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{name}: config: expected a preset name or YAML path")
    if (
        isinstance(config, str)
        and not Path(config).is_absolute()
        and Path(config).suffix
    ):
        # A relative YAML path is relative to the spec's folder, so specs travel with it.
        near = p.parent / config
        config = str(near) if near.exists() else config
    return config


def _overrides(
    spec: SweepSpec, entry: Entry, point: Mapping[str, Any], seed: int
) -> list[str]:
    return [
        *spec.overrides,
        f"algorithm.name={entry.algorithm}",
        *[f"algorithm.{k}={_value(v)}" for k, v in entry.params.items()],
        *[f"{k}={_value(v)}" for k, v in point.items()],
        f"seed={seed}",
    ]


def grid_edges(entry: Entry, point: Mapping[str, Any]) -> list[str]:
    """The grid axes on whose edge ``point`` sits: for each numeric axis with three or more
    values, "KEY at its smallest (V)" or "KEY at its largest (V)". A selection there may have a
    better setting beyond the grid, which a reader of the table needs to know. An axis of two
    values has no interior (every choice is an end), so it says nothing and is not named."""
    out = []
    for key, values in entry.grid.items():
        nums = [
            v for v in values if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if len(set(nums)) < 3 or key not in point or point[key] not in nums:
            continue
        if point[key] == min(nums):
            out.append(f"{key} at its smallest ({point[key]})")
        elif point[key] == max(nums):
            out.append(f"{key} at its largest ({point[key]})")
    return out


def _describe(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(defaults)"


@dataclass
class SweepResult:
    """What a sweep selected and how the selected settings did on the test split."""

    out_dir: Path
    selection: dict[str, list[tuple[dict[str, Any], list[float]]]]
    chosen: dict[str, int]
    test: Comparison
    seconds: dict[str, float]


def select(scores: Sequence[Sequence[float]]) -> int:
    """The index of the best mean score (first on ties): the selection rule, pure."""
    means = [float(np.mean(s)) for s in scores]
    return int(np.argmax(means))


def sweep(
    spec: SweepSpec,
    out_dir: Path,
    console: Console | None = None,
    show_progress: bool = True,
) -> SweepResult:
    """Run the selection phase, then the test phase, then write the outputs."""

    console = console or Console()
    out_dir = Path(out_dir)
    points = {e.label: e.points(spec.budget) for e in spec.entries}
    select_cfgs, select_dirs = _selection_runs(spec, points, out_dir)
    first = next(iter(select_cfgs.values()))
    check_compare_dir(out_dir)
    for cfg in select_cfgs.values():
        check_inputs(cfg)
    check_before_ray(first)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir, "--out")
    try:
        seconds: dict[str, float] = {}
        with joined_ray(first):  # SIGTERM stops the runs as Ctrl-C does
            t0 = time.perf_counter()
            select_finals = _run_phase(select_cfgs, select_dirs, console, show_progress)
            seconds["selection"] = time.perf_counter() - t0
            selection, chosen = _select_points(spec, points, select_finals, console)
            # The test phase: configs are built only now, from the selection.
            test_cfgs, test_dirs = _test_runs(spec, points, chosen, out_dir)
            t0 = time.perf_counter()
            test_finals = _run_phase(test_cfgs, test_dirs, console, show_progress)
            seconds["test"] = time.perf_counter() - t0
        result = SweepResult(
            out_dir,
            selection,
            chosen,
            Comparison(out_dir, test_finals, test_dirs),
            seconds,
        )
        write_sweep(result, spec, next(iter(test_cfgs.values())))
        console.print(
            f"wrote {out_dir / 'sweep.md'}, sweep.csv, selection.csv, sweep.png"
        )
        return result
    finally:
        lock.close()


def _selection_runs(
    spec: SweepSpec, points: Mapping[str, list[dict[str, Any]]], out_dir: Path
) -> tuple[dict[tuple[str, int], Config], dict[str, dict[int, Path]]]:
    """Configs and folders of the selection phase: every grid point of every entry with
    every ``select_seeds`` seed, on the validation split and without the benchmark suite."""
    select_cfgs: dict[tuple[str, int], Config] = {}
    select_dirs: dict[str, dict[int, Path]] = {}
    for entry in spec.entries:
        for i, point in enumerate(points[entry.label]):
            key = f"{entry.label}/p{i:02d}"
            select_dirs[key] = {}
            for seed in spec.select_seeds:
                select_cfgs[(key, seed)] = load_config(
                    spec.config,
                    [
                        *_overrides(spec, entry, point, seed),
                        "data.eval_split=validation",
                        "eval.benchmarks=[]",
                    ],
                )
                select_dirs[key][seed] = out_dir / "select" / key / f"seed-{seed}"
    return select_cfgs, select_dirs


def _select_points(
    spec: SweepSpec,
    points: Mapping[str, list[dict[str, Any]]],
    select_finals: Mapping[str, Mapping[int, Mapping[str, float]]],
    console: Console,
) -> tuple[dict[str, list[tuple[dict[str, Any], list[float]]]], dict[str, int]]:
    """Each entry's points with their validation ``metric`` per seed, and the index of the
    one :func:`select` picks (printed)."""
    selection: dict[str, list[tuple[dict[str, Any], list[float]]]] = {}
    chosen: dict[str, int] = {}
    for entry in spec.entries:
        rows = []
        for i, point in enumerate(points[entry.label]):
            key = f"{entry.label}/p{i:02d}"
            rows.append(
                (point, [select_finals[key][s][spec.metric] for s in spec.select_seeds])
            )
        selection[entry.label] = rows
        chosen[entry.label] = select([r[1] for r in rows])
        console.print(
            f"{entry.label}: selected {_describe(rows[chosen[entry.label]][0])} "
            f"(validation {spec.metric} "
            f"{np.mean(rows[chosen[entry.label]][1]):.4f})"
        )
    return selection, chosen


def _test_runs(
    spec: SweepSpec,
    points: Mapping[str, list[dict[str, Any]]],
    chosen: Mapping[str, int],
    out_dir: Path,
) -> tuple[dict[tuple[str, int], Config], dict[str, dict[int, Path]]]:
    """Configs and folders of the test phase: each entry's selected point with every
    ``test_seeds`` seed, on the test split."""
    test_cfgs: dict[tuple[str, int], Config] = {}
    test_dirs: dict[str, dict[int, Path]] = {}
    for entry in spec.entries:
        point = points[entry.label][chosen[entry.label]]
        test_dirs[entry.label] = {}
        for seed in spec.test_seeds:
            test_cfgs[(entry.label, seed)] = load_config(
                spec.config, _overrides(spec, entry, point, seed)
            )
            test_dirs[entry.label][seed] = (
                out_dir / "test" / entry.label / f"seed-{seed}"
            )
    return test_cfgs, test_dirs


def _run_phase(
    configs: dict[tuple[str, int], Config],
    run_dirs: dict[str, dict[int, Path]],
    console: Console,
    show_progress: bool,
) -> dict[str, dict[int, dict[str, float]]]:
    """Run (or reuse, or resume) every (key, seed); pooled algorithms first, one at a time."""
    finals: dict[str, dict[int, dict[str, float]]] = {k: {} for k in run_dirs}
    todo, resumes = schedule_runs(configs, run_dirs, finals, console)
    pooled, rest = split_pooled(todo, configs)
    with run_progress(console, show_progress, len(todo)) as bar:
        for jobs in (pooled, rest):
            if jobs:
                run_lanes(jobs, configs, run_dirs, finals, bar, 1, resumes)
    return finals


def write_sweep(result: SweepResult, spec: SweepSpec, cfg: Config) -> None:
    """selection.csv, sweep.csv, sweep.md and sweep.png."""
    out = result.out_dir
    _write_selection_csv(out / "selection.csv", result, spec)
    diffs = _paired_diffs(result, spec)
    _write_test_csv(out / "sweep.csv", result, spec, diffs)
    write_text(out / "sweep.md", "\n".join(_markdown(result, spec, cfg, diffs)))
    plot_sweep(result, spec, diffs, out / "sweep.png", cfg.scenario.name)


# entry → metric → (mean, low, high): the paired difference against the reference, 95 % CI.
Diffs = dict[str, dict[str, tuple[float, float, float]]]


def _write_selection_csv(path: Path, result: SweepResult, spec: SweepSpec) -> None:
    """Every configuration's validation scores, per seed and mean, the winners marked."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["entry", "point", "settings", *[f"seed_{s}" for s in spec.select_seeds],
             f"mean_{spec.metric}", "selected", "grid_edge"]
        )  # fmt: skip
        entries = {e.label: e for e in spec.entries}
        for label, rows in result.selection.items():
            for i, (point, scores) in enumerate(rows):
                writer.writerow(
                    [label, f"p{i:02d}", _describe(point),
                     *[f"{s:.6f}" for s in scores], f"{np.mean(scores):.6f}",
                     int(i == result.chosen[label]),
                     "; ".join(grid_edges(entries[label], point))]
                )  # fmt: skip


def _paired_diffs(result: SweepResult, spec: SweepSpec) -> Diffs:
    """entry → metric → the paired difference against the reference (mean, 95 % CI) on
    the test seeds; empty with fewer than two seeds."""
    seeds = list(spec.test_seeds)
    ref = result.test.finals[spec.reference]
    diffs: Diffs = {}
    if len(seeds) >= 2:
        for label, by_seed in result.test.finals.items():
            if label == spec.reference:
                continue
            diffs[label] = {
                k: paired_ci([by_seed[s][k] - ref[s][k] for s in seeds])
                for k, _ in METRICS[:4]
            }
    return diffs


def _write_test_csv(
    path: Path, result: SweepResult, spec: SweepSpec, diffs: Diffs
) -> None:
    """The test table: each entry's selected settings, mean and std of every metric, and
    the paired differences (blank for the reference)."""
    summary = result.test.summary()
    seeds = list(spec.test_seeds)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["entry", "algorithm", "settings", "seeds",
             *[f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")],
             *[f"{k}_diff_{s}" for k, _ in METRICS[:4] for s in ("mean", "low", "high")]]
        )  # fmt: skip
        for entry in spec.entries:
            row = summary[entry.label]
            point = result.selection[entry.label][result.chosen[entry.label]][0]
            d = diffs.get(entry.label)
            writer.writerow(
                [entry.label, entry.algorithm, _describe(point), len(seeds),
                 *[f"{v:.6f}" for k, _ in METRICS for v in row[k]],
                 *([f"{v:.6f}" for k, _ in METRICS[:4] for v in d[k]] if d
                   else [""] * 12)]
            )  # fmt: skip


def _markdown(
    result: SweepResult, spec: SweepSpec, cfg: Config, diffs: Diffs
) -> list[str]:
    """sweep.md's lines: the protocol and its cost, the test table, the paired differences."""
    summary = result.test.summary()
    seeds = list(spec.test_seeds)
    lines = [
        f"# Tuned comparison on {cfg.scenario.name}",
        "",
        f"Protocol (`fedsim sweep {spec.source}`): {spec.budget} configuration(s) per "
        f"algorithm, selected on the validation split by final `{spec.metric}` (mean over "
        f"seeds {list(spec.select_seeds)}); the selected settings then ran with seeds {seeds} "
        f"on the test split. {cfg.rounds} rounds, {cfg.scenario.num_clients} clients, "
        f"{cfg.scenario.cohort_size} per round. Cost: {_cost_text(result)}.",
        "",
        "| entry | selected settings | validation | "
        + " | ".join(label for _, label in METRICS[:4])
        + " |",
        "|---|---|---:|" + "---:|" * 4,
    ]
    for entry in spec.entries:
        point, scores = result.selection[entry.label][result.chosen[entry.label]]
        row = summary[entry.label]
        lines.append(
            f"| {entry.label} | {_describe({**entry.params, **point})} | "
            f"{np.mean(scores):.3f} | "
            + " | ".join(fmt_mean_std(*row[k]) for k, _ in METRICS[:4])
            + " |"
        )
    edges = [
        f"{entry.label} ({', '.join(on)})"
        for entry in spec.entries
        if (
            on := grid_edges(
                entry, result.selection[entry.label][result.chosen[entry.label]][0]
            )
        )
    ]
    if edges:
        lines += [
            "",
            "Selected on the end of a grid axis of three or more values (a better setting "
            "may lie beyond it): " + "; ".join(edges) + ".",
        ]
    if diffs:
        lines += [
            "",
            f"Paired differences against {spec.reference} (same seed), mean and 95 % "
            f"confidence interval (t, {len(seeds) - 1} d.o.f.); an interval that excludes 0 is "
            "marked with *:",
            "",
            "| entry | " + " | ".join(label for _, label in METRICS[:4]) + " |",
            "|---|" + "---:|" * 4,
        ]
        for label, d in diffs.items():
            cells = []
            for k, _ in METRICS[:4]:
                mean, low, high = d[k]
                star = "*" if low > 0 or high < 0 else ""
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{star}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _diagnostic_lines(result, spec)
    lines += _algorithm_lines(result, spec)
    lines.append("")
    return lines


def rounds_seconds(run_dir: Path) -> float:
    """The wall seconds of a run's rounds and evaluations (``wall_seconds`` of its records):
    counted once per round even when the run was interrupted and resumed, without the
    per-run start-up (Ray actors, data) that the sweep's own clock adds."""
    return sum(
        float(r.get("wall_seconds", 0.0))
        for r in MetricsLog(run_dir / "metrics.jsonl").read()
    )


def _cost_text(result: SweepResult) -> str:
    """What the table cost: the runs' round time per phase, summed over every run whether
    this invocation ran it or reused it, and this invocation's own wall time."""
    select_dirs = [
        d
        for d in sorted((result.out_dir / "select").glob("*/p*/seed-*"))
        if d.name.removeprefix("seed-").isdigit()  # not a folder moved aside
    ]
    phases = {
        "selection": sum(rounds_seconds(d) for d in select_dirs),
        "test": sum(
            rounds_seconds(d)
            for by_seed in result.test.run_dirs.values()
            for d in by_seed.values()
        ),
    }
    runs = len(select_dirs) + sum(len(v) for v in result.test.run_dirs.values())
    here = sum(result.seconds.values())
    return (
        f"{runs} runs; their rounds took {phases['selection']:.0f} s (selection) and "
        f"{phases['test']:.0f} s (test) of wall time on this machine, start-up of each run "
        f"not included; this invocation of the sweep took {here:.0f} s (reused runs cost "
        "it nothing)"
    )


#: The per-round diagnostics sweep.md summarises (``fedsim.algorithms.diagnostics``): key, header.
DIAGNOSTICS = (
    ("step_cos_prev", "cos(step, previous step)"),
    ("client_cos_mean", "client cos"),
    ("client_cos_neg_share", "opposed pairs"),
    ("sign_conflict", "sign conflict"),
    ("drift", "drift"),
    ("client_eff_rank", "eff. rank of deltas"),
)


def run_diagnostics(run_dir: Path) -> dict[str, float]:
    """A run's diagnostics, each the mean over its rounds (the round-0 record has none), and
    its mean ``update_norm``; empty for a run without them (pooled runs, diagnostics off)."""
    sums: dict[str, list[float]] = {}
    for rec in MetricsLog(run_dir / "metrics.jsonl").read():
        diag = rec.get("diagnostics") or {}
        for key, _ in DIAGNOSTICS:
            if key in diag:
                sums.setdefault(key, []).append(float(diag[key]))
        if diag and "update_norm" in rec:
            sums.setdefault("update_norm", []).append(float(rec["update_norm"]))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def run_algorithm_metrics(run_dir: Path) -> dict[str, float]:
    """The server half's own round metrics (``algorithm`` in a round's record), each the mean
    over rounds and over the weight matrices it is reported for (``linear_1.weight/rho_mean``
    and ``linear_2.weight/rho_mean`` → ``rho_mean``); empty when the algorithm records none."""
    sums: dict[str, list[float]] = {}
    for rec in MetricsLog(run_dir / "metrics.jsonl").read():
        for key, value in (rec.get("algorithm") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums.setdefault(key.rsplit("/", 1)[-1], []).append(float(value))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _algorithm_lines(result: SweepResult, spec: SweepSpec) -> list[str]:
    """A line per entry whose server half records metrics of its own (Fed-CMP's reliability,
    rank and residual; FedExP's server step; ...): each the mean over rounds and matrices,
    then over the test seeds."""
    lines = []
    for entry in spec.entries:
        per_seed = [
            run_algorithm_metrics(result.test.run_dirs[entry.label][s])
            for s in spec.test_seeds
        ]
        keys = list(dict.fromkeys(k for d in per_seed for k in d))
        if not keys:
            continue
        shown = ", ".join(
            f"{k} {np.mean([d[k] for d in per_seed if k in d]):.3g}" for k in keys
        )
        lines.append(f"- {entry.label}: {shown}")
    if not lines:
        return []
    return [
        "",
        "The server halves' own round metrics (`algorithm` in `metrics.jsonl`; each the mean "
        "over rounds and weight matrices, then over seeds):",
        "",
        *lines,
    ]


def _diagnostic_lines(result: SweepResult, spec: SweepSpec) -> list[str]:
    """A table of the tuned runs' round diagnostics (mean over rounds, then over the test
    seeds), for the entries whose runs recorded them; none if no run did."""
    rows = []
    for entry in spec.entries:
        per_seed = [
            run_diagnostics(result.test.run_dirs[entry.label][s])
            for s in spec.test_seeds
        ]
        if not any(per_seed):
            continue
        cells = []
        for key in [k for k, _ in DIAGNOSTICS] + ["update_norm"]:
            vals = [d[key] for d in per_seed if key in d]
            cells.append(f"{np.mean(vals):.3f}" if vals else "–")
        rows.append(f"| {entry.label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "Round diagnostics of the tuned test runs (`train.diagnostics`; each the mean over "
        "rounds, then over seeds): oscillation (cosine between successive global steps), "
        "interference (mean pairwise cosine of client deltas, share of opposed pairs, "
        "p-weighted sign conflict), client drift, effective rank of the stacked deltas, and "
        "the global step's norm:",
        "",
        "| entry | " + " | ".join(h for _, h in DIAGNOSTICS) + " | step norm |",
        "|---|" + "---:|" * (len(DIAGNOSTICS) + 1),
        *rows,
    ]


def plot_sweep(
    result: SweepResult,
    spec: SweepSpec,
    diffs: Mapping[str, Mapping[str, tuple[float, float, float]]],
    path: Path,
    title: str,
) -> Path:
    """Curves of the tuned runs (as ``fedsim compare`` draws them) and, with ≥ 2 seeds, the
    paired differences against the reference with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = path.with_name("sweep-curves.png")
    plot_comparison(
        result.test, curves, f"{title}: tuned, seeds {list(spec.test_seeds)}"
    )
    keys = [("attr_mean", "attr. acc."), ("yesno_acc", "yes/no acc.")]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(5.5 * len(keys), 1.8 + 0.45 * max(1, len(diffs)))
    )
    for ax, (key, label) in zip(np.atleast_1d(axes), keys):
        names = list(diffs)
        for i, name in enumerate(names):
            mean, low, high = diffs[name][key]
            colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
            ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="o",
                        color=colour, capsize=3)  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"{label} − {spec.reference} (95 % CI)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{title}: paired differences, seeds {list(spec.test_seeds)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
