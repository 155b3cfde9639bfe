"""``fedsim bench``: speed and memory of the simulator, each against a baseline measured in the same run.

Sections (each a table; all numbers in ``bench.json``):

- **local training** — the same client workload (``clients`` clients × ``steps`` local steps of
  ``batch`` examples on the toy data) done three ways on one process: (a) fedsim's resident
  backbone, one client at a time (a projector swap per client); (b) the resident backbone with
  cohort batching (the clients in one forward/backward pass per step); (c) the way peer
  simulators do it: a fresh model built for every client task (Flower's simulation builds the
  ClientApp's model per task, as its FlowerTune LLM examples do). Client updates per second and
  ratios to (a); the projector swap time against the local step time.
- **aggregation** — each algorithm's server half (pure functions over name → tensor dicts) against
  the cohort size, at the backbone's projector size.
- **memory** — ``fedsim run`` once per logical client count (own process, own local Ray), peak
  resident memory of every fedsim process and the ratio to the smallest count.
- **secagg** — a securely aggregated round's bytes per client and client/server seconds
  against the cohort size, at the projector's size (:mod:`fedsim.bench_secagg`).
- **startup**, **memory-run** — a default ``fedsim run``: process start → first client task,
  phase by phase; the summed peak resident memory of all its processes
  (:mod:`fedsim.bench_startup`).
- **aggregation-limit** — FedAvg against the memory-bandwidth bound measured in the same run
  (the fused weighted sum and the ATen path), Fed-CMP's ratio to FedAvg with float32 and
  bfloat16 products and with the block SRHT first pass, the products' floor at this machine's
  matmul rate, and the sketch's accuracy with either first-pass map, at the toy's and at LLaVA-1.5-7B's projector size (:mod:`fedsim.bench_aggregation`).
- **real-shape** — resident vs fresh-per-task, swap share, memory per worker, cohort gain and
  per-layer FLOPs/bytes on the LLaVA-1.5-7B-shaped skeleton (:mod:`fedsim.bench_real`).

Timings are medians of ``repeats`` measurements after a warm-up; wall-clock numbers are never
asserted in tests, only reported here.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedsim.algorithms.base import ClientUpdate, LocalTraining
from fedsim.algorithms.fednova import lr_mass_upload
from fedsim.algorithms.registry import build_algorithm, comparable
from fedsim.bench_common import (
    BenchSettings,
    client_tasks,
    max_relative,
    median_seconds,
    swap_seconds,
    training_ways,
)
from fedsim.bench_startup import run_command
from fedsim.config import Config
from fedsim.data.rows import RowReader
from fedsim.models.backbone import init_projector, load_backbone
from fedsim.prepare import prepare, train_settings
from fedsim.runio import check_writable


@dataclass
class BenchResult:
    settings: dict[str, Any]
    machine: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    aggregation: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    secagg: dict[str, Any] = field(default_factory=dict)
    startup: dict[str, Any] = field(default_factory=dict)
    memory_run: dict[str, Any] = field(default_factory=dict)
    aggregation_limit: dict[str, Any] = field(default_factory=dict)
    real_shape: dict[str, Any] = field(default_factory=dict)


SECTIONS = (
    "training",
    "aggregation",
    "memory",
    "secagg",
    "startup",
    "memory-run",
    "aggregation-limit",
    "real-shape",
)


def _machine(device: str) -> dict[str, Any]:
    import os
    import platform

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_training(cfg: Config, s: BenchSettings, console: Console) -> dict[str, Any]:
    """Resident one at a time vs cohort batching vs a fresh model per task."""

    torch.set_num_threads(s.threads)
    # CUDA: TF32 convolutions (cuDNN's default) and matmuls round to 10-bit mantissas; cuDNN
    # picks algorithms by batch size, so results then depend on the batch at the 1e-3 level.
    torch.backends.cudnn.allow_tf32 = s.tf32
    torch.backends.cuda.matmul.allow_tf32 = s.tf32
    prep = prepare(cfg)
    spec = prep.model
    dtype = getattr(torch, spec.dtype)

    def load() -> Any:
        return load_backbone(
            spec.backbone_path,
            lm=spec.lm_path,
            projector=spec.projector,
            device=s.device,
            dtype=dtype,
        )

    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    backbone = load()
    reader = RowReader.open(str(prep.train_path), prep.pixel_path)
    tasks = client_tasks(prep.shards, s, cfg.seed)
    w0 = init_projector(backbone, cfg.seed)
    local = LocalTraining()
    # the config's optimizer, clipping, loss and caption transforms, as a run has
    settings = train_settings(cfg, prep.shards)
    one_at_a_time, cohort, fresh_per_task = training_ways(
        load, backbone, reader, tasks, w0, local, settings
    )
    console.print(
        f"[bold]local training[/bold]: {s.clients} clients × {s.steps} steps × batch {s.batch}"
    )
    seconds = {
        "resident, one client at a time": median_seconds(
            one_at_a_time, s.repeats, sync
        ),
        "resident, cohort batching": median_seconds(cohort, s.repeats, sync),
        "fresh model per client task (peer simulators)": median_seconds(
            fresh_per_task, max(1, s.repeats - 1), sync
        ),
    }
    # How close cohort batching comes to one at a time (float32 summation order only: with
    # SGD within γ_n of the delta, see tests/test_cohort.py; AdamW has no such bound), next to
    # how close one at a time comes to itself (GPU kernels need not be deterministic).
    a = one_at_a_time()
    rel = max_relative(a, cohort())
    repeat = max_relative(a, one_at_a_time())
    swap_s = swap_seconds(backbone, cfg.seed + 1, s.repeats, sync)
    return _training_record(s, seconds, rel, repeat, swap_s, w0)


def _training_record(
    s: BenchSettings,
    seconds: dict[str, float],
    rel: float,
    repeat: float,
    swap_s: float,
    w0: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The training section of ``bench.json``: each way's time, rate and speed-up over one
    at a time, the differences between ways, and the swap against one local step."""
    step_s = seconds["resident, one client at a time"] / (s.clients * s.steps)
    base = seconds["resident, one client at a time"]
    rows = {
        name: {
            "seconds": sec,
            "client_updates_per_s": s.clients / sec,
            "speedup_vs_one_at_a_time": base / sec,
        }
        for name, sec in seconds.items()
    }
    return {
        "workload": {"clients": s.clients, "steps": s.steps, "batch": s.batch},
        "ways": rows,
        "cohort_max_relative_difference": rel,
        "repeat_max_relative_difference": repeat,
        "tf32": s.tf32 and s.device.startswith("cuda"),
        "swap_seconds": swap_s,
        "local_step_seconds": step_s,
        "swap_share_of_step": swap_s / step_s,
        "projector_params": sum(v.numel() for v in w0.values()),
    }


def bench_aggregation(
    cfg: Config, s: BenchSettings, console: Console
) -> dict[str, Any]:
    """Server-half time of every registered algorithm against the cohort size."""
    weights = _projector(cfg)
    out: dict[str, dict[str, float]] = {}
    # centralized aggregates its one pooled update only; every other algorithm takes a cohort.
    names = [n for n in comparable() if n != "centralized"]
    console.print(
        f"[bold]aggregation[/bold]: {', '.join(names)} at cohort sizes {list(s.cohort_sizes)}"
    )
    for name in names:
        algo = build_algorithm(name)
        out[name] = {}
        for size in s.cohort_sizes:
            g = torch.Generator().manual_seed(size)
            updates = synthetic_updates(name, weights, range(size), g)
            state = algo.init_state(weights, max(s.cohort_sizes))

            agg = functools.partial(algo.aggregate, weights, updates, state, 1)
            out[name][str(size)] = median_seconds(agg, s.repeats, lambda: None)
    return {
        "projector_params": sum(v.numel() for v in weights.values()),
        "seconds": out,
    }


def _projector(cfg: Config) -> dict[str, torch.Tensor]:
    """W_0 of the config's backbone (its projector's names and sizes)."""
    prep = prepare(cfg)
    backbone = load_backbone(
        prep.model.backbone_path, lm=prep.model.lm_path, projector=prep.model.projector
    )
    return init_projector(backbone, cfg.seed)


def synthetic_updates(
    name: str,
    weights: dict[str, torch.Tensor],
    clients: Iterable[int],
    g: torch.Generator,
) -> list[ClientUpdate]:
    """One round's uploads for ``name``'s server half: Gaussian deltas of scale 1e-3 (a local
    step's size), client ``c`` with 100 + c samples and 8 local steps, drawn from ``g`` in the
    order given, with what the algorithm's client half adds to Δ."""
    return [
        ClientUpdate(
            client_id=c,
            delta={
                k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in weights.items()
            },
            num_samples=100 + c,
            loss=1.0,
            steps=8,
            extras=_extras(name, weights, g),
        )
        for c in clients
    ]


def _extras(
    name: str, weights: dict[str, torch.Tensor], g: torch.Generator
) -> dict[str, torch.Tensor]:
    """What an algorithm's client half uploads besides Δ (SCAFFOLD: Δc_i; FedNova: a_k)."""
    if name == "fednova":
        return lr_mass_upload([1e-3] * 8)  # the 8 steps of the updates above
    if name == "scaffold":
        return {
            f"dc/{k}": 1e-3 * torch.randn(v.shape, generator=g)
            for k, v in weights.items()
        }
    return {}


def bench_memory(
    s: BenchSettings, sets: Sequence[str], out: Path, console: Console
) -> dict[str, Any]:
    """``fedsim run`` per logical client count; peak resident memory of each process."""
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for n in s.memory_clients:
        run_dir = out / f"memory-clients-{n}"
        overrides = [
            f"scenario.num_clients={n}",
            f"scenario.cohort_size={s.memory_cohort}",
            f"rounds={s.memory_rounds}",
            "eval_every=0",
            "eval.at_start=false",
            "eval.benchmarks=[]",
            *sets,
        ]
        cmd = run_command(run_dir, overrides)
        console.print(
            f"[bold]memory[/bold]: fedsim run with {n} logical clients ({s.memory_cohort} a round, {s.memory_rounds} rounds)"
        )
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise RuntimeError(
                f"bench memory: fedsim run with {n} clients failed: {tail}"
            )
        seconds[str(n)] = time.perf_counter() - t0
        results[str(n)] = json.loads((run_dir / "resources.json").read_text())[
            "peak_rss_mb"
        ]
    base = sum(results[str(s.memory_clients[0])].values())
    return {
        "cohort": s.memory_cohort,
        "rounds": s.memory_rounds,
        "peak_rss_mb": results,
        "total_ratio": {n: sum(v.values()) / base for n, v in results.items()},
        "seconds": seconds,
    }


def run_bench(
    cfg: Config, s: BenchSettings, out: Path, sets: Sequence[str], console: Console
) -> BenchResult:
    """Measure the chosen sections, print their tables, write ``out/bench.json``."""
    for sec in s.sections:
        if sec not in SECTIONS:
            raise ValueError(
                f"--sections: unknown section {sec!r} (use {', '.join(SECTIONS)})"
            )
    check_writable(Path(out), "--out")  # before anything is measured or created
    out.mkdir(parents=True, exist_ok=True)
    result = BenchResult(asdict(s), _machine(s.device))
    if "training" in s.sections:
        result.training = bench_training(cfg, s, console)
        console.print(training_table(result.training))
    if "aggregation" in s.sections:
        result.aggregation = bench_aggregation(cfg, s, console)
        console.print(aggregation_table(result.aggregation))
    if "memory" in s.sections:
        result.memory = bench_memory(s, sets, out, console)
        console.print(memory_table(result.memory))
    if "secagg" in s.sections:
        from fedsim.bench_secagg import bench_secagg, secagg_table

        dim = sum(v.numel() for v in _projector(cfg).values())
        result.secagg = bench_secagg(dim, s.secagg_sizes, s.repeats)
        console.print(secagg_table(result.secagg))
    if "startup" in s.sections or "memory-run" in s.sections:
        from fedsim import bench_startup as bs

        result.machine["load_average"] = bs.load_average()
        if "startup" in s.sections:
            result.startup = bs.bench_startup(s.repeats, out, console)
            console.print(bs.startup_table(result.startup))
        if "memory-run" in s.sections:
            result.memory_run = bs.bench_memory_run(out, console)
            console.print(bs.memory_run_table(result.memory_run))
    if "aggregation-limit" in s.sections:
        from fedsim.bench_aggregation import (
            aggregation_limit_table,
            bench_aggregation_limit,
        )

        toy = {k: tuple(v.shape) for k, v in _projector(cfg).items()}
        result.aggregation_limit = bench_aggregation_limit(
            toy,
            s.agg_limit_clients,
            256,
            s.repeats,
            s.threads,
            s.agg_limit_sizes,
            s.agg_limit_power,
        )
        console.print(aggregation_limit_table(result.aggregation_limit))
    if "real-shape" in s.sections:
        from fedsim.bench_real import bench_real_shape, real_shape_table

        result.real_shape = bench_real_shape(
            cfg.cache_dir, s.repeats, s.threads, out, console
        )
        console.print(real_shape_table(result.real_shape))
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=2))
    tmp.replace(out / "bench.json")
    console.print(f"wrote {out / 'bench.json'}")
    return result


def training_table(t: dict[str, Any]) -> Table:
    w = t["workload"]
    table = Table(
        title=f"local training: {w['clients']} clients × {w['steps']} steps × batch {w['batch']}"
    )
    for col in ("way", "seconds", "client updates / s", "ratio to one at a time"):
        table.add_column(col, justify="right" if col != "way" else "left")
    for name, r in t["ways"].items():
        table.add_row(
            name,
            f"{r['seconds']:.3f}",
            f"{r['client_updates_per_s']:.2f}",
            f"{r['speedup_vs_one_at_a_time']:.2f}×",
        )
    table.caption = (
        f"projector swap {t['swap_seconds'] * 1e3:.3f} ms = {100 * t['swap_share_of_step']:.2f} % "
        f"of a local step ({t['local_step_seconds'] * 1e3:.1f} ms); max relative difference "
        f"of the deltas: cohort vs one at a time {t['cohort_max_relative_difference']:.1e}, "
        f"one at a time run twice {t['repeat_max_relative_difference']:.1e}"
        + ("; TF32 on" if t.get("tf32") else "")
    )
    return table


def aggregation_table(a: dict[str, Any]) -> Table:
    sizes = list(next(iter(a["seconds"].values())))
    table = Table(
        title=f"server aggregation (ms) against cohort size, {a['projector_params']:,} projector parameters"
    )
    table.add_column("algorithm")
    for size in sizes:
        table.add_column(size, justify="right")
    table.add_column(f"ms per client at {sizes[-1]}", justify="right")
    for name, row in a["seconds"].items():
        table.add_row(
            name,
            *[f"{row[size] * 1e3:.2f}" for size in sizes],
            f"{row[sizes[-1]] * 1e3 / int(sizes[-1]):.4f}",
        )
    return table


def memory_table(m: dict[str, Any]) -> Table:
    counts = list(m["peak_rss_mb"])
    roles = list(m["peak_rss_mb"][counts[0]])
    table = Table(
        title=f"peak resident memory (MiB) against logical clients ({m['cohort']} a round, {m['rounds']} rounds)"
    )
    for col in ["clients", *roles, "total", f"ratio to {counts[0]}"]:
        table.add_column(col, justify="right")
    for n in counts:
        v = m["peak_rss_mb"][n]
        table.add_row(
            n,
            *[f"{v[r]:.0f}" for r in roles],
            f"{sum(v.values()):.0f}",
            f"{m['total_ratio'][n]:.3f}",
        )
    return table
