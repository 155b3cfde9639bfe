"""``fedsim compare``: several algorithms on the same scenario and seeds, as a paper's table.

Every (algorithm, seed) pair is one ordinary run in ``OUT/<algorithm>/seed-<seed>/``. Client
sampling depends only on (seed, round), so all algorithms see the same cohorts and the same data.
A pair whose run folder already holds a finished run (``eval.json``) is reused, and an interrupted
run with a checkpoint of the same config is resumed from it, so an interrupted comparison
continues where it stopped. Outputs: ``comparison.md`` and ``comparison.csv`` (mean ±
std over seeds of the final evaluation, one row per algorithm) and ``comparison.png`` (training
loss and evaluation metrics against the round, a line per algorithm with a ±std band over seeds).
"""

from __future__ import annotations

import csv
import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedsim.algorithms import build_algorithm
from fedsim.checkpoint import accepted_digests, config_digest, find_checkpoint
from fedsim.config import Config, config_to_yaml_data, load_config
from fedsim.configtools import ConfigError, safe_load
from fedsim.driver import run
from fedsim.eval.run import headline
from fedsim.plots import PANELS, distinct_colours
from fedsim.pool import ActorPool
from fedsim.prepare import check_inputs
from fedsim.raystart import joined_ray
from fedsim.resources import check_before_ray
from fedsim.runio import (
    MetricsLog,
    RunDirError,
    RunError,
    RunLock,
    check_writable,
    write_text,
)
from fedsim.tracking import grouped

METRICS = [
    ("attr_mean", "attr. acc."),
    ("caption_exact", "exact captions"),
    ("yesno_acc", "yes/no acc."),
    ("yesno_f1", "yes/no F1"),
    ("attr_count", "count"),
    ("attr_size", "size"),
    ("attr_colour", "colour"),
    ("attr_shape", "shape"),
    ("attr_position", "position"),
]


@dataclass
class Comparison:
    """Final evaluation of every (algorithm, seed), and where the runs are."""

    out_dir: Path
    finals: dict[str, dict[int, dict[str, float]]]
    run_dirs: dict[str, dict[int, Path]]

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """algorithm → metric → (mean, std over seeds; std = 0 for one seed)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for algo, by_seed in self.finals.items():
            out[algo] = {}
            for key, _ in METRICS:
                vals = np.array([m[key] for m in by_seed.values()], dtype=float)
                std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                out[algo][key] = (float(vals.mean()), std)
        return out


def _finished(run_dir: Path, cfg: Config) -> dict[str, float] | None:
    """The final evaluation of a finished run of ``cfg`` in ``run_dir``, or None if none is
    there; a finished run of another config is an error (reusing it would put another
    setting's score in the table, silently)."""
    path = run_dir / "eval.json"
    if not path.exists():
        return None
    final = json.loads(path.read_text()).get("final") or None
    if final is not None:
        check_same_config(run_dir, cfg)
    return final


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """A config's YAML mapping as dotted keys (``train.lr``) → values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """Refuse a finished run whose config.yaml is not ``cfg`` up to where it ran (cache_dir,
    ray.*: ``fedsim.checkpoint.config_digest``), naming the fields that differ."""
    stored_path = run_dir / "config.yaml"
    try:
        stored = safe_load(stored_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{stored_path}: cannot read the finished run's config ({type(e).__name__})"
        ) from None
    want = json.loads(
        json.dumps(config_to_yaml_data(cfg))
    )  # tuples as lists, like YAML
    if isinstance(stored, dict) and config_digest(stored) in accepted_digests(want):
        return
    a, b = _flat(stored if isinstance(stored, dict) else {}), _flat(want)
    skip = ("ray.", "cache_dir")
    diff = sorted(
        k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(skip)
    )
    shown = ", ".join(f"{k} {a.get(k, '–')} ≠ {b.get(k, '–')}" for k in diff[:3])
    raise ConfigError(
        f"{run_dir}: holds a finished run of another config ({shown or 'differs'}"
        f"{', …' if len(diff) > 3 else ''}); give another --out, or move that folder away"
    )


def _resumable(run_dir: Path, cfg: Config) -> bool:
    """Whether ``run_dir`` holds an interrupted run of ``cfg`` with a usable checkpoint."""

    if not (run_dir / "config.yaml").exists():
        return False
    try:
        return find_checkpoint(cfg, run_dir) is not None
    except (ConfigError, RunError):
        return False


def check_compare_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that cannot be written or that holds a single run (not a comparison).

    A comparison folder is reused (finished runs are kept, interrupted ones moved aside); a run
    folder (``config.yaml``, ``metrics.jsonl`` at its top) is never written into.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir, "--out")
    for name in ("metrics.jsonl", "config.yaml"):
        if (out_dir / name).exists():
            raise RunDirError(
                f"--out {str(out_dir)!r}: holds a run ({name}), not a comparison; "
                "choose a new folder"
            )


def schedule_runs(
    configs: dict[tuple[str, int], Config],
    run_dirs: dict[str, dict[int, Path]],
    finals: dict[str, dict[int, dict[str, float]]],
    console: Console,
) -> tuple[list[tuple[str, int]], set[tuple[str, int]]]:
    """What is left to run: finished runs fill ``finals`` and are reused, interrupted runs of
    the same config are resumed from their newest checkpoint, and an incomplete folder without
    a usable checkpoint is moved aside (never deleted). Returns (to run, of which resumed)."""
    todo: list[tuple[str, int]] = []
    resumes: set[tuple[str, int]] = set()
    for algo, seed in configs:
        run_dir = run_dirs[algo][seed]
        done = _finished(run_dir, configs[(algo, seed)])
        if done is not None:
            console.print(f"{algo}, seed {seed}: reusing finished run in {run_dir}")
            finals[algo][seed] = done
            continue
        if _resumable(run_dir, configs[(algo, seed)]):
            console.print(
                f"{algo}, seed {seed}: resuming the interrupted run in {run_dir}"
            )
            resumes.add((algo, seed))
            todo.append((algo, seed))
            continue
        if run_dir.exists() and any(run_dir.iterdir()):
            # An interrupted run without a usable checkpoint: keep it aside, never delete
            # what was written.
            aside = run_dir.with_name(f"{run_dir.name}.incomplete-{int(time.time())}")
            shutil.move(str(run_dir), aside)
            console.print(f"[yellow]{run_dir} was incomplete; moved to {aside}")
        todo.append((algo, seed))
    return todo, resumes


def split_pooled(
    jobs: Sequence[tuple[str, int]], configs: dict[tuple[str, int], Config]
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(runs of pooled algorithms — centralized, on Ray Train, run first and one at a time —,
    the other runs), each in the given order."""

    def pooled(j: tuple[str, int]) -> bool:
        algo = build_algorithm(configs[j].algorithm.name, configs[j].algorithm.params)
        return bool(getattr(algo, "pooled", False))

    return [j for j in jobs if pooled(j)], [j for j in jobs if not pooled(j)]


def load_configs(
    config: str | None,
    overrides: Sequence[str],
    pairs: Sequence[tuple[str, int]],
    *extra: str,
) -> dict[tuple[str, int], Config]:
    """The config of every (algorithm, seed) pair, in order: ``config`` with ``overrides``,
    then the pair's algorithm and seed, then ``extra`` overrides."""
    return {
        (algo, seed): load_config(
            config, [*overrides, f"algorithm.name={algo}", f"seed={seed}", *extra]
        )
        for algo, seed in pairs
    }


def compare(
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    config: str | None = None,
    overrides: Sequence[str] = (),
    console: Console | None = None,
    show_progress: bool = True,
    lanes: int | None = None,
) -> Comparison:
    """Run every algorithm with every seed (reusing finished runs) and write the comparison.

    Runs go one at a time on one actor pool by default. With ``lanes`` > 1 they go through
    that many parallel lanes, each with its own pool of one BackboneWorker, Evaluator and
    Aggregator, so that one run's evaluation and writes overlap another's training (worth it
    where those serial phases are long against a round; on 2 CPU cores it was not: 60 s per
    run against 56 s one at a time). A run's result does not depend on its number of workers
    (tested bit for bit), so lanes change wall time only. Centralized runs (Ray Train over
    ``ray.workers`` workers) always go first, one at a time, on one worker group.
    """

    console = console or Console()
    out_dir = Path(out_dir)
    # Validate every config before any run starts.
    pairs = [(algo, seed) for algo in algorithms for seed in seeds]
    configs = load_configs(config, overrides, pairs)
    first = next(iter(configs.values()))
    if lanes is not None and lanes < 1:
        raise ConfigError(f"--lanes: must be >= 1, got {lanes}")
    check_compare_dir(out_dir)
    for cfg in configs.values():
        check_inputs(cfg)  # missing data or backbone: before Ray starts
    check_before_ray(first)  # ray.* may not differ between the runs
    n_lanes = 1 if lanes is None else lanes
    out_dir.mkdir(parents=True, exist_ok=True)
    # One writer per comparison folder (its runs are locked one by one as they run).
    lock = RunLock(out_dir, "--out")
    try:
        finals: dict[str, dict[int, dict[str, float]]] = {a: {} for a in algorithms}
        run_dirs: dict[str, dict[int, Path]] = {a: {} for a in algorithms}
        for algo, seed in configs:
            run_dirs[algo][seed] = out_dir / algo / f"seed-{seed}"
        todo, resumes = schedule_runs(configs, run_dirs, finals, console)
        pooled, laned = split_pooled(todo, configs)
        n_lanes = min(n_lanes, max(len(laned), 1))
        if n_lanes > 1:
            # Each lane has one BackboneWorker (results do not depend on the worker count).
            configs.update(load_configs(config, overrides, laned, "ray.workers=1"))
        with joined_ray(first):  # SIGTERM stops the runs as Ctrl-C does
            # One tracker experiment for the comparison's runs (tagged algorithm, seed).
            with (
                grouped(out_dir),
                run_progress(console, show_progress, len(todo)) as bar,
            ):
                if pooled:
                    run_lanes(pooled, configs, run_dirs, finals, bar, 1, resumes)
                if laned:
                    run_lanes(laned, configs, run_dirs, finals, bar, n_lanes, resumes)
        result = Comparison(out_dir, finals, run_dirs)
        write_outputs(result, configs[(algorithms[0], seeds[0])])
        console.print(result_table(result))
        console.print(
            f"wrote {out_dir / 'comparison.md'}, comparison.csv, comparison.png"
        )
        return result
    finally:
        lock.close()


class RunsBar:
    """Compare's progress: one line per finished run and a bar over all of them."""

    def __init__(self, console: Console, progress: Progress | None, total: int) -> None:
        self.console, self.progress = console, progress
        self.task = progress.add_task("runs", total=total) if progress else None
        self.lock = threading.Lock()

    def done(
        self, algo: str, seed: int, seconds: float, final: dict[str, float]
    ) -> None:
        with self.lock:
            self.console.print(
                f"{algo}, seed {seed}: attr. acc. {final['attr_mean']:.3f}, yes/no "
                f"{final['yesno_acc']:.3f} ({seconds:.0f} s)"
            )
            if self.progress is not None:
                self.progress.update(self.task, advance=1)


@contextmanager
def run_progress(console: Console, show: bool, total: int) -> Iterator[RunsBar]:
    """The bar over ``total`` runs, live when ``show`` (else finished runs' lines only)."""
    if not show:
        yield RunsBar(console, None, total)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        yield RunsBar(console, progress, total)


def _lane(
    jobs: queue.SimpleQueue[tuple[str, int]],
    configs: dict[tuple[str, int], Config],
    run_dirs: dict[str, dict[int, Path]],
    finals: dict[str, dict[int, dict[str, float]]],
    bar: RunsBar,
    stop: threading.Event,
    resumes: set[tuple[str, int]],
) -> None:
    """Take runs from ``jobs`` until it is empty (or ``stop``), on one actor pool; the pairs in
    ``resumes`` go on from their newest checkpoint."""

    pool = ActorPool()
    quiet = Console(quiet=True)
    try:
        while not stop.is_set():
            try:
                algo, seed = jobs.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            result = run(
                configs[(algo, seed)],
                run_dirs[algo][seed],
                quiet,
                False,
                pool,
                plot=False,
                resume=(algo, seed) in resumes,
            )
            finals[algo][seed] = result.final_eval
            bar.done(algo, seed, time.perf_counter() - t0, result.final_eval)
    finally:
        pool.close()


def run_lanes(
    jobs: Sequence[tuple[str, int]],
    configs: dict[tuple[str, int], Config],
    run_dirs: dict[str, dict[int, Path]],
    finals: dict[str, dict[int, dict[str, float]]],
    bar: RunsBar,
    lanes: int,
    resumes: set[tuple[str, int]],
) -> None:
    """Run ``jobs`` on ``lanes`` threads, each taking the next job when it is free.

    The first error stops every lane before its next run and is raised here.
    """
    todo: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    stop = threading.Event()
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            _lane(todo, configs, run_dirs, finals, bar, stop, resumes)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            stop.set()

    threads = [
        threading.Thread(target=lane, name=f"compare-lane-{i}")
        for i in range(max(1, min(lanes, len(jobs))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def fmt_mean_std(mean: float, std: float) -> str:
    """A table cell: ``mean ± std`` to three decimals."""
    return f"{mean:.3f} ± {std:.3f}"


def result_table(result: Comparison) -> Table:
    seeds = sorted(next(iter(result.finals.values())))
    table = Table(title=f"final held-out evaluation, mean ± std over seeds {seeds}")
    table.add_column("algorithm")
    for _, label in METRICS[:4]:
        table.add_column(label, justify="right")
    for algo, row in result.summary().items():
        table.add_row(algo, *[fmt_mean_std(*row[k]) for k, _ in METRICS[:4]])
    return table


def write_outputs(result: Comparison, cfg: Config) -> None:
    summary = result.summary()
    seeds = sorted(next(iter(result.finals.values())))
    out = result.out_dir
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "algorithm",
                "seeds",
                *[f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")],
            ]
        )
        for algo, row in summary.items():
            writer.writerow(
                [algo, len(seeds), *[f"{v:.6f}" for k, _ in METRICS for v in row[k]]]
            )
    lines = [
        f"# {cfg.scenario.name}: {', '.join(summary)}",
        "",
        f"Final held-out toy evaluation after {cfg.rounds} rounds, mean ± std over seeds "
        f"{seeds} ({cfg.scenario.num_clients} clients, {cfg.scenario.cohort_size} per round, "
        f"{cfg.train.local_steps} local steps × batch {cfg.train.batch_size}).",
        "",
        "| algorithm | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    best = {k: max(summary[a][k][0] for a in summary) for k, _ in METRICS}
    for algo, row in summary.items():
        cells = []
        for k, _ in METRICS:
            cell = fmt_mean_std(*row[k])
            cells.append(f"**{cell}**" if math.isclose(row[k][0], best[k]) else cell)
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += benchmark_lines(result)
    lines.append("")
    write_text(out / "comparison.md", "\n".join(lines))
    plot_comparison(
        result, out / "comparison.png", f"{cfg.scenario.name}, seeds {seeds}"
    )


def benchmark_lines(result: Comparison) -> list[str]:
    """Markdown table of the toy benchmark suite's headline numbers (mean ± std over seeds).

    Read from each run's ``eval.json``; algorithms without scores (``local``: no global
    projector) are left out. Empty when no run scored the suite.
    """

    rows: dict[str, dict[str, list[float]]] = {}
    columns: list[str] = []
    for algo, by_seed in result.run_dirs.items():
        for run_dir in by_seed.values():
            path = run_dir / "eval.json"
            benches = (
                json.loads(path.read_text()).get("benchmarks")
                if path.exists()
                else None
            )
            for bench, scores in (benches or {}).items():
                for label, value in headline(bench, scores):
                    col = f"{bench} {label}"
                    if col not in columns:
                        columns.append(col)
                    rows.setdefault(algo, {}).setdefault(col, []).append(value)
    if not rows:
        return []
    lines = [
        "",
        "Toy benchmark suite (official scorers, final projector), mean ± std over seeds:",
        "",
        "| algorithm | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for algo, cols in rows.items():
        cells = []
        for col in columns:
            vals = np.array(cols.get(col, []), dtype=float)
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            cells.append(fmt_mean_std(float(vals.mean()), std) if len(vals) else "–")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return lines


def _series(run_dir: Path, key: str, is_eval: bool) -> dict[int, float]:
    out = {}
    for r in MetricsLog(run_dir / "metrics.jsonl").read():
        if is_eval and "eval" in r:
            out[r["round"]] = r["eval"][key]
        elif not is_eval and r.get(key) is not None:
            out[r["round"]] = r[key]
    return out


#: Up to this many entries a comparison's curves get their ±std bands.
BANDS_UP_TO = 6


def plot_comparison(result: Comparison, path: Path, title: str) -> Path:
    """Loss, attribute accuracy and yes/no accuracy against the round; mean line, ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 4.0))
    colours = distinct_colours(len(result.run_dirs))
    # ±std bands only while they can be told apart; beyond BANDS_UP_TO entries they cover
    # each other (the spread is in the tables and in sweep.png's intervals).
    bands = len(result.run_dirs) <= BANDS_UP_TO
    for i, (algo, by_seed) in enumerate(result.run_dirs.items()):
        for ax, (key, _, is_eval) in zip(axes, PANELS):
            series = [_series(d, key, is_eval) for d in by_seed.values()]
            rounds = sorted(set.intersection(*(set(s) for s in series)))
            if not rounds:
                continue
            vals = np.array([[s[r] for r in rounds] for s in series])
            mean, std = (
                vals.mean(0),
                vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(rounds)),
            )
            c = colours[i]
            # Dashed: only evaluated at the start and the end (``local``'s default).
            style = "--" if is_eval and len(rounds) <= 2 else "-"
            ax.plot(
                rounds,
                mean,
                style,
                color=c,
                label=algo,
                marker="o" if is_eval else None,
                ms=3,
            )
            if bands:
                ax.fill_between(
                    rounds, mean - std, mean + std, color=c, alpha=0.2, lw=0
                )
    for ax, (_, name, _) in zip(axes, PANELS):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="algorithm", frameon=False)
    fig.suptitle(title if bands else f"{title} (mean over seeds; ±std bands left out)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
