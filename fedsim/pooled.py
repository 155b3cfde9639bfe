"""Centralized training, the pooled-data upper bound, with Ray Train's TorchTrainer.

The scenario's client shards are pooled into one stream. Each "round" trains as many optimiser
steps of ``batch_size`` rows as a federated round takes on average (``cohort_size ×
local_steps`` unless dropout, stragglers or a time budget take steps away: the samples of one
federated round, ``fedsim.prepare.federated_steps``) with one
optimiser whose state persists for the whole run, on the same learning-rate schedule, so that
curves line up round for round with the federated algorithms.

Data parallel over ``ray.workers`` Ray Train workers (one per GPU on a GPU cluster): every step's
global batch is split across the workers (rank r takes rows r, r+W, ...), gradients are averaged
with ``torch.distributed.all_reduce`` before clipping and the optimiser step, so every worker holds
the same projector. The task of each row (caption or question) is drawn for the whole global batch
before the split, so one worker and several train on the same examples. Rank 0 sends each round's
record to the driver through a Ray queue (the driver writes metrics.jsonl and shows progress),
asks the Evaluator actor for the evaluation rounds, and sends the final projector with the last
record, from which the driver saves ``final/projector.safetensors``.

The worker group is a service: it trains one plan after another from a queue until it is closed,
so ``fedsim compare`` pays Ray Train's start-up (new processes, imports, process group, about 30 s
on 2 cores) once for all its seeds rather than once per run.
"""

from __future__ import annotations

import queue as queue_mod
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import LocalTraining, Weights
from fedsim.checkpoint import RoundState
from fedsim.config import Config
from fedsim.data.rows import RowReader
from fedsim.data.streams import Cursor, take
from fedsim.machine import peak_rss_mb
from fedsim.models.spec import ModelSpec, load_model, quiet_hf
from fedsim.prepare import (
    Prepared,
    eval_due,
    federated_steps,
    round_lrs,
    train_settings,
)
from fedsim.scenarios.silos import row_owners
from fedsim.training import ClientTask, TrainSettings, task_flags, train_client

POOLED_CLIENT = 0  # the generator key of the pooled stream


@dataclass(frozen=True)
class PooledPlan:
    """Everything the Ray Train workers need (sent once, in ``train_loop_config``)."""

    model: ModelSpec
    train_path: str
    pixel_path: str | None
    bad_images: str
    feature_path: str | None
    rows: np.ndarray
    w0: dict[str, torch.Tensor]
    algorithm: str
    params: Mapping[str, Any]
    seed: int
    rounds: int
    steps: int
    batch_size: int
    lrs: tuple[tuple[float, ...], ...]
    settings: TrainSettings
    threads: int
    eval_rounds: frozenset[int]
    #: Send the training state to the driver every this many rounds (a round checkpoint).
    checkpoint_every: int = 0
    #: The round checkpoint to go on from (the pooled stream is its client 0).
    start: RoundState | None = None
    #: The client owning each dataset row (``fedsim.scenarios.silos.row_owners``) when the
    #: scenario transforms captions per client; None otherwise.
    row_owner: np.ndarray | None = None


def pooled_plan(
    cfg: Config,
    prep: Prepared,
    w0: dict[str, torch.Tensor],
    start: RoundState | None = None,
) -> PooledPlan:
    """What the centralized run's Ray Train workers train: every client's rows pooled.

    Under caption transforms the plan carries each row's owner, so that the pooled stream
    trains on the very text the clients train on (``fedsim.pooled.pooled_task``).
    """
    steps = federated_steps(cfg, prep.shards, w0)
    settings = train_settings(cfg, prep.shards)
    rows = np.concatenate(prep.shards)
    return PooledPlan(
        model=prep.model,
        train_path=str(prep.train_path),
        pixel_path=prep.pixel_path,
        bad_images=cfg.data.bad_images,
        feature_path=prep.feature_path,
        rows=rows,
        w0=w0,
        algorithm=cfg.algorithm.name,
        params=dict(cfg.algorithm.params),
        seed=cfg.seed,
        rounds=cfg.rounds,
        steps=steps,
        batch_size=cfg.train.batch_size,
        lrs=tuple(round_lrs(cfg, r, steps) for r in range(1, cfg.rounds + 1)),
        settings=settings,
        threads=cfg.ray.threads_per_worker,
        eval_rounds=frozenset(r for r in range(1, cfg.rounds + 1) if eval_due(cfg, r)),
        checkpoint_every=cfg.checkpoint_every,
        start=start,
        row_owner=(
            row_owners(prep.shards, int(rows.max()) + 1)
            if settings.captions is not None
            else None
        ),
    )


class AllReduceGradients(LocalTraining):
    """Wraps a client half: after its own gradient change, averages gradients over the workers."""

    def __init__(self, inner: LocalTraining, world: int) -> None:
        self.inner = inner
        self.world = world
        self.collective = True  # every worker must take every step (all-reduce)
        self.persistent_optimizer = inner.persistent_optimizer  # type: ignore[misc]

    def loss_term(
        self,
        params: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        ctx: dict[str, Any],
    ) -> torch.Tensor | None:
        return self.inner.loss_term(params, start, ctx)

    def prepare(
        self,
        client_state: Mapping[str, torch.Tensor],
        payload: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        return self.inner.prepare(client_state, payload)

    def correct_gradients(
        self, params: Mapping[str, torch.nn.Parameter], ctx: dict[str, Any]
    ) -> None:
        import torch.distributed as dist

        self.inner.correct_gradients(params, ctx)
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not grads:
            return
        # One all-reduce per step over a flat buffer (a message per tensor costs ~5 ms each).
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def finish(
        self,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        ctx: dict[str, Any],
    ) -> tuple[Weights, Weights]:
        return self.inner.finish(start, end, lrs, ctx)


def rank_rows(steps: int, batch_size: int, world: int, rank: int) -> np.ndarray:
    """Positions (within a round's ``steps × batch_size`` rows) that worker ``rank`` trains on."""
    if batch_size % world:
        raise ValueError(
            f"train.batch_size: {batch_size} does not split evenly over {world} Ray Train workers (ray.workers)"
        )
    return np.concatenate(
        [
            np.arange(s * batch_size, (s + 1) * batch_size)[rank::world]
            for s in range(steps)
        ]
    )


def pooled_task(
    plan: PooledPlan,
    rnd: int,
    rows: np.ndarray,
    rank: int,
    world: int,
    client_state: Weights,
) -> ClientTask:
    """Rank ``rank``'s share of round ``rnd``'s pooled rows, as a task of the pooled client.

    The task of each row (caption or question) is drawn for the whole global batch before the
    split; so is the owner of each row, which keys its caption transforms exactly as in the
    federated run (the pooled stream trains on the rows the clients train on).
    """
    share = rank_rows(plan.steps, plan.batch_size, world, rank)
    flags = task_flags(
        plan.seed, rnd, POOLED_CLIENT, len(rows), plan.settings.qa_fraction
    )
    owners = plan.row_owner[rows] if plan.row_owner is not None else None
    return ClientTask(
        POOLED_CLIENT,
        rnd,
        plan.seed,
        rows[share],
        plan.lrs[rnd - 1],
        plan.batch_size // world,
        client_state,
        flags[share],
        owners=owners[share] if owners is not None else None,
    )


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (torch.distributed, gloo or nccl)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _halted(halt: Any, rank: int, world: int) -> bool:
    """Whether the driver asked the worker group to stop (rank 0 reads, every rank agrees)."""
    asked = halt.qsize() > 0 if rank == 0 else None
    return bool(_broadcast(asked, world))


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: serves plans from the driver's queue until it sends None.

    The worker group stays up between runs (``fedsim compare`` trains every seed on it), so the
    start-up of Ray Train (processes, imports, process group) is paid once. Rank 0 takes each plan
    from the queue and broadcasts it; the backbone and row reader are loaded once per model and
    dataset and kept.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_hf()
    backbones: dict[tuple[Any, ...], Any] = {}
    readers: dict[tuple[Any, ...], Any] = {}
    while True:
        item = config["plans"].get() if rank == 0 else None
        plan: PooledPlan | None = _broadcast(
            item[0] if item is not None else None, world
        )
        if plan is None:
            return
        evaluator = item[1] if item is not None else None
        _train_plan(
            plan,
            evaluator,
            config["records"],
            rank,
            world,
            backbones,
            readers,
            config["halt"],
        )


def _train_plan(
    plan: PooledPlan,
    evaluator: Any,
    records: Any,
    rank: int,
    world: int,
    backbones: dict[tuple[Any, ...], Any],
    readers: dict[tuple[Any, ...], Any],
    halt: Any,
) -> None:
    """One centralized run, from W_0 and a fresh optimiser, on the resident backbone.

    Before each round rank 0 looks at ``halt`` (a queue the driver writes to when its run is
    interrupted) and every rank follows its answer: the run stops between rounds instead of
    training to its end while the driver waits for the worker group.
    """
    import ray.train

    backbone, reader = _resident(plan, backbones, readers)
    algorithm = build_algorithm(plan.algorithm, plan.params)
    local = algorithm.local_training()
    if world > 1:
        local = AllReduceGradients(local, world)
    # A batch that does not split evenly over the workers fails here, before training.
    rank_rows(plan.steps, plan.batch_size, world, rank)
    at = _Start.of(plan, algorithm)
    weights, state, client_state, cursor = at.weights, at.state, at.client, at.cursor
    for rnd in range(at.round + 1, plan.rounds + 1):
        if _halted(halt, rank, world):
            return
        t0 = time.perf_counter()
        rows, cursor = take(
            plan.rows, cursor, plan.steps * plan.batch_size, plan.seed, POOLED_CLIENT
        )
        task = pooled_task(plan, rnd, rows, rank, world, client_state)
        res = train_client(backbone, reader, task, weights, {}, local, plan.settings)
        client_state = res.client_state
        loss = torch.tensor([res.update.loss], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= world
        update = replace(res.update, num_samples=len(rows), loss=float(loss))
        out = algorithm.aggregate(weights, [update], state, rnd)
        weights, state = out.weights, out.state
        if rank == 0:
            after = _Start(rnd, weights, state, client_state, cursor)
            records.put(
                _rank0_record(plan, after, out.metrics, update, world, evaluator, t0)
            )
        ray.train.report({"seed": plan.seed, "round": rnd, "loss": update.loss})


def _resident(
    plan: PooledPlan,
    backbones: dict[tuple[Any, ...], Any],
    readers: dict[tuple[Any, ...], Any],
) -> tuple[Any, Any]:
    """The plan's backbone and row reader, loaded once and kept while later plans share them."""

    key = (plan.model, plan.threads)
    if key not in backbones:
        backbones.clear()
        backbones[key] = load_model(plan.model, plan.threads)
    rkey = (plan.train_path, plan.pixel_path, plan.bad_images, plan.feature_path)
    if rkey not in readers:
        readers.clear()
        readers[rkey] = RowReader.open(
            plan.train_path, plan.pixel_path, plan.bad_images, plan.feature_path
        )
    return backbones[key], readers[rkey]


@dataclass
class _Start:
    """Where the pooled run stands after round ``round``: projector, server state, the pooled
    client's state and its stream's cursor."""

    round: int
    weights: Weights
    state: Weights
    client: Weights
    cursor: Cursor

    @staticmethod
    def of(plan: PooledPlan, algorithm: Any) -> _Start:
        """W_0 and a fresh state, or the plan's checkpoint. Every rank holds the same weights
        and optimiser state (gradients are all-reduced), so rank 0's, saved at the checkpoint,
        is every rank's."""
        if plan.start is None:
            weights = dict(plan.w0)
            return _Start(0, weights, algorithm.init_state(weights, 1), {}, Cursor())
        st = plan.start  # the pooled stream is client 0 of the checkpoint
        return _Start(
            st.round,
            dict(st.weights),
            dict(st.server_state),
            dict(st.clients.get(0, {})),
            st.cursors[0],
        )


def _rank0_record(
    plan: PooledPlan,
    at: _Start,
    metrics: Mapping[str, Any],
    update: Any,
    world: int,
    evaluator: Any,
    t0: float,
) -> dict[str, Any]:
    """Rank 0's record of round ``at.round`` for the driver: its evaluation when due, the
    training state at checkpoint rounds, the final projector after the last."""
    import ray

    rnd, last = at.round, at.round == plan.rounds
    record: dict[str, Any] = {
        "round": rnd,
        "clients": "pooled",
        "samples": update.num_samples,
        "loss": update.loss,
        "lr": plan.lrs[rnd - 1][0],
        "update_norm": metrics.get("update_norm"),
        "rejected": [],
        "train_workers": world,
        "data_passes_max": at.cursor.passes,
    }
    if rnd in plan.eval_rounds or last:
        record["eval"] = ray.get(evaluator.evaluate.remote(at.weights))
    record["wall_seconds"] = round(time.perf_counter() - t0, 3)
    if plan.checkpoint_every and rnd % plan.checkpoint_every == 0:
        # The driver adds the latest evaluation and the metrics lines it has written.
        record["checkpoint"] = RoundState(
            round=rnd,
            weights={k: v.clone() for k, v in at.weights.items()},
            server_state={k: v.clone() for k, v in at.state.items()},
            clients={0: {k: v.clone() for k, v in at.client.items()}}
            if at.client
            else {},
            cursors=[at.cursor],
            sim_clock=0.0,
            final_eval={},
            metrics_lines=0,
        )
    if last:
        record["peak_rss_mb"] = peak_rss_mb()
        record["final_weights"] = {k: v.clone() for k, v in at.weights.items()}
    return record


class PooledTrainer:
    """A TorchTrainer whose worker group serves one centralized run after another.

    ``fit`` runs in a background thread for the trainer's lifetime; :meth:`train` sends a plan
    and streams its round records back; :meth:`close` ends the worker group. Every run starts from
    its own W_0 with a fresh optimiser, so sharing the group changes no result (test).
    """

    def __init__(
        self, workers: int, worker_cpus: float, worker_gpus: float, storage: Path
    ) -> None:
        from ray.train import LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        self.plans: Queue = Queue(actor_options={"num_cpus": 0})
        self.records: Queue = Queue(actor_options={"num_cpus": 0})
        # Written once, by close(): the plan in progress stops before its next round.
        self.halt: Queue = Queue(actor_options={"num_cpus": 0})
        resources = {"CPU": worker_cpus}
        if worker_gpus:
            resources["GPU"] = worker_gpus
        self._trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "plans": self.plans,
                "records": self.records,
                "halt": self.halt,
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=worker_gpus > 0,
                resources_per_worker=resources,
            ),
            run_config=RunConfig(
                name="centralized",
                storage_path=str(storage.resolve()),
                # Errors only: per-report INFO lines, and the placement-group cleaner's
                # warning each second when the state API (the dashboard) is off.
                logging_config=LoggingConfig(log_level="ERROR"),
            ),
        )
        self._outcome: dict[str, Any] = {}
        #: Round records trained but never read, counted by close() (an interrupted run's
        #: rounds after the halt).
        self.unread_records = 0
        self._thread = threading.Thread(
            target=self._fit, name="ray-train-fit", daemon=True
        )
        self._thread.start()

    def _fit(self) -> None:
        try:
            self._outcome["result"] = self._trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            self._outcome["error"] = e

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def train(
        self, plan: PooledPlan, evaluator: Any, on_record: Any
    ) -> tuple[Weights, float]:
        """Train ``plan``; ``on_record`` gets each round's record as it arrives.

        Returns the final projector and rank 0's peak RSS (MiB).
        """
        self.plans.put((plan, evaluator))
        seen = 0
        while True:
            try:
                record = self.records.get(timeout=0.5)
            except queue_mod.Empty:
                if not self._thread.is_alive():
                    break
                continue
            weights = record.pop("final_weights", None)
            peak = record.pop("peak_rss_mb", 0.0)
            on_record(record)
            seen += 1
            if weights is not None:
                return weights, peak
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        raise RuntimeError(
            f"centralized: Ray Train stopped after {seen} of {plan.rounds} rounds"
        )

    def close(self) -> None:
        """End the worker group: a run still in progress (the driver was interrupted) stops
        before its next round, then the group leaves its loop."""
        import ray

        if self._thread.is_alive():
            self.halt.put(True)
            self.plans.put(None)
            self._thread.join()
        self.unread_records = self.records.qsize()
        for q in (self.plans, self.records, self.halt):
            ray.kill(q.actor)
