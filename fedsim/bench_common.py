"""What ``fedsim bench``'s sections share: the settings, the median timer, the client tasks,
the three ways of training them (resident one at a time, cohort, fresh model per task), the
projector swap timer and the relative difference between two ways' updates.

Both :mod:`fedsim.bench` (toy) and :mod:`fedsim.bench_real` (LLaVA-1.5-shaped skeleton) import
these, so neither imports the other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.models.backbone import init_projector, set_projector_
from fedsim.training import ClientTask, train_client, train_cohort


@dataclass(frozen=True)
class BenchSettings:
    """What ``fedsim bench`` measures (CLI flags)."""

    clients: int = 5
    steps: int = 8
    batch: int = 4
    repeats: int = 3
    device: str = "cpu"
    threads: int = 1
    tf32: bool = True
    cohort_sizes: tuple[int, ...] = (10, 50, 100, 500)
    memory_clients: tuple[int, ...] = (10, 100, 1000)
    memory_cohort: int = 10
    memory_rounds: int = 3
    secagg_sizes: tuple[int, ...] = (5, 10, 20, 40)
    agg_limit_clients: int = 50
    agg_limit_sizes: tuple[str, ...] = ("toy", "7b")
    agg_limit_power: bool = False
    sections: tuple[str, ...] = ("training", "aggregation", "memory")


def median_seconds(
    fn: Callable[[], Any], repeats: int, sync: Callable[[], None]
) -> float:
    fn()  # warm-up (allocations, kernels, caches)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def client_tasks(
    shards: Sequence[np.ndarray], s: BenchSettings, seed: int
) -> list[Any]:

    n = s.steps * s.batch
    lrs = tuple([1e-3] * s.steps)
    out = []
    for cid in range(s.clients):
        shard = shards[cid % len(shards)]
        rows = np.resize(shard, n)  # the shard's first rows (repeated if it is small)
        out.append(ClientTask(cid, 1, seed, rows, lrs, s.batch, {}))
    return out


def training_ways(
    load: Callable[[], Any],
    backbone: Any,
    reader: Any,
    tasks: Sequence[Any],
    w0: dict[str, torch.Tensor],
    local: Any,
    settings: Any,
) -> tuple[Callable[[], list[Any]], ...]:
    """The three ways of training ``tasks`` from ``w0``: resident one client at a time,
    resident with cohort batching, and a fresh model (``load()``) per client task."""

    def one_at_a_time() -> list[Any]:
        return [
            train_client(backbone, reader, t, w0, {}, local, settings) for t in tasks
        ]

    def cohort() -> list[Any]:
        return train_cohort(
            backbone, reader, tasks, [w0] * len(tasks), {}, local, settings
        )

    def fresh_per_task() -> list[Any]:
        out = []
        for t in tasks:
            model = load()  # what a peer simulator's client task does first
            out.append(train_client(model, reader, t, w0, {}, local, settings))
            del model
        return out

    return one_at_a_time, cohort, fresh_per_task


def swap_seconds(
    backbone: Any, seed: int, repeats: int, sync: Callable[[], None]
) -> float:
    """Median seconds of one projector swap (a projector drawn with ``seed`` copied into the
    resident parameters)."""

    other = init_projector(backbone, seed)

    def swap() -> None:
        for _ in range(100):
            set_projector_(backbone, other)

    return median_seconds(swap, repeats, sync) / 100


def max_relative(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Largest |Δa − Δb| / max|Δa| over clients and tensors."""
    return max(
        float((x.update.delta[k] - y.update.delta[k]).abs().max())
        / max(float(x.update.delta[k].abs().max()), 1e-30)
        for x, y in zip(a, b)
        for k in x.update.delta
    )
