"""The round loops: federated (:class:`FederatedRun`) and centralized (:func:`run_pooled`).

A federated round, in the phases :meth:`FederatedRun.run` names: **plan** (the cohort S_t from a
generator keyed by (seed, round); each client's next rows from its one-pass stream; its steps
under its device tier), **train** (tasks by predicted cost, cut into cohorts, sent to the
BackboneWorker actors, largest first, to whichever frees; each returns Δ_k, or a partial sum
Σ n_k Δ_k for the FedAvg family), **aggregate** (the Aggregator actor validates the updates and
applies the algorithm in sorted client-id order), **commit** (clients' new states into the
client-state store), **record** (one line of ``metrics.jsonl``), **evaluate** (every
``eval_every`` rounds and after the last) and **checkpoint** (every ``checkpoint_every``).
Results depend on (config, seed) only.

Which projector a client starts from is the one difference between the algorithms here:
:class:`SharedModel` (everyone starts from W_t) and :class:`PersonalModels` (each client goes on
from its own, the local-only baseline). The centralized upper bound trains the pooled data with
Ray Train (:mod:`fedsim.pooled`); :func:`run_pooled` is its driver side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from rich.console import Console
from rich.progress import Progress

from fedsim.aggregator import InDriver
from fedsim.algorithms.base import PartialSum, add
from fedsim.checkpoint import (
    RoundState,
    check_restored,
    config_digest,
    cut_metrics,
    save_checkpoint,
)
from fedsim.config import Config, config_to_yaml_data
from fedsim.cost import TokenCost
from fedsim.data.streams import Cursor, take
from fedsim.dispatch import DispatchStats, WorkerSet, WorkersLost, dispatch
from fedsim.evaluate import toy_benchmarks
from fedsim.machine import peak_rss_mb
from fedsim.pool import ActorPool, aggregator_in_driver
from fedsim.pooled import pooled_plan
from fedsim.prepare import (
    Prepared,
    eval_due,
    participation_spec,
    round_lrs,
    train_settings,
)
from fedsim.privacy.plan import plan_privacy, record_epsilon
from fedsim.privacy.secure import plan_secure
from fedsim.records import RoundRecord
from fedsim.report import RunResult, corpus_summary, loss_text, write_results
from fedsim.runio import MetricsLog, RunError, save_weights
from fedsim.scenarios.participation import RoundPlan, plan_round
from fedsim.secure_round import SecureRound, close_round, open_round
from fedsim.startup import mark
from fedsim.state_store import MemoryStore
from fedsim.training import ClientResult, ClientTask

Weights = dict[str, torch.Tensor]

IN_FLIGHT = (
    2  # tasks queued per worker: one running, one waiting (hides the call latency)
)


@dataclass
class RunContext:
    """What a round loop runs with: the config, its prepared inputs, the run folder's log, the
    console and progress display, and the actor pool."""

    cfg: Config
    prep: Prepared
    out_dir: Path
    metrics: MetricsLog
    progress: Progress
    console: Console
    pool: ActorPool

    @cached_property
    def digest(self) -> str:
        """The config digest every checkpoint of the run carries (the config does not change
        during a run: computed once)."""
        return config_digest(config_to_yaml_data(self.cfg))


@dataclass
class Logbook:
    """The run's evaluations and round records so far (in memory; also in ``metrics.jsonl``)."""

    history: list[RoundRecord] = field(default_factory=list)
    initial_eval: dict[str, float] | None = None
    final_eval: dict[str, float] = field(default_factory=dict)

    def append(self, ctx: RunContext, record: RoundRecord) -> None:
        ctx.metrics.append(record)
        self.history.append(record)


def initial_eval(ctx: RunContext, weights: Weights, book: Logbook) -> None:
    """The untrained projector's evaluation, logged as round 0 (when ``eval.at_start``)."""
    log_initial_eval(ctx, submit_initial_eval(ctx, weights), book)


#: The round-0 evaluation under way: (when it was started, what waits for its result).
PendingEval = tuple[float, Callable[[], dict[str, float]]]


def submit_initial_eval(ctx: RunContext, weights: Weights) -> PendingEval | None:
    """Start the untrained projector's evaluation (when ``eval.at_start``); the run's first
    client tasks go out while it runs (:func:`log_initial_eval` waits for it)."""
    if not ctx.cfg.eval.at_start:
        return None
    return time.perf_counter(), ctx.pool.submit_initial_eval(
        ctx.cfg.seed, ray.put(weights)
    )


def log_initial_eval(
    ctx: RunContext, pending: PendingEval | None, book: Logbook
) -> None:
    """Wait for the round-0 evaluation and log it as round 0 (before any other record)."""
    if pending is None:
        return
    t0, result_of = pending
    result = result_of()
    book.append(
        ctx,
        {
            "round": 0,
            "wall_seconds": round(time.perf_counter() - t0, 3),
            "eval": result,
        },
    )
    book.initial_eval = result
    ctx.console.print(
        f"round 0 (untrained): attr_mean {result['attr_mean']:.3f}, yes/no {result['yesno_acc']:.3f}"
    )


def resumed_logbook(ctx: RunContext, restored: RoundState) -> Logbook:
    """The log of a resumed run: ``metrics.jsonl`` cut back to the checkpoint, then read.

    Called once every check of the checkpoint against the run has passed.
    """
    cut_metrics(ctx.out_dir, restored.round, restored.metrics_lines)
    history = ctx.metrics.read()
    first = next(
        (r["eval"] for r in history if r.get("round") == 0 and "eval" in r), None
    )
    ctx.console.print(f"resumed after round {restored.round} (its checkpoint)")
    return Logbook(history, first, dict(restored.final_eval))


def finish(
    ctx: RunContext,
    book: Logbook,
    weights: Weights,
    resources: dict[str, Any],
    nodes: dict[str, str],
    benchmarks: dict[str, dict[str, Any]],
) -> RunResult:
    """eval.json and resources.json; the run's result in memory."""
    write_results(
        ctx.cfg,
        ctx.out_dir,
        book.initial_eval,
        book.final_eval,
        resources,
        benchmarks,
        nodes,
    )
    return RunResult(
        ctx.out_dir,
        weights,
        book.initial_eval,
        book.final_eval,
        book.history,
        resources,
        benchmarks,
    )


def _meta(cfg: Config) -> dict[str, str]:
    """The metadata a final projector file carries."""
    return {
        "algorithm": cfg.algorithm.name,
        "rounds": str(cfg.rounds),
        "seed": str(cfg.seed),
    }


# ---------------------------------------------------------------------------------------------
# Which projector a client trains from


MODEL = "model/"  # client-state prefix of a personal algorithm's own projector


def personal_model(state: Weights) -> Weights:
    """A personal algorithm's own projector from its client state (empty when never trained)."""
    return {k[len(MODEL) :]: v for k, v in state.items() if k.startswith(MODEL)}


class SharedModel:
    """Every client starts from the global projector W_t; the server's step makes W_{t+1}."""

    personal = False

    def start(self, state: Weights) -> tuple[Weights | None, Weights]:
        """(start projector, None for W_t; the client state to send)."""
        return None, state

    def keep(self, state: Weights, start: Weights | None, delta: Weights) -> Weights:
        """The client state to store after an accepted update."""
        return state


@dataclass
class PersonalModels:
    """Every client goes on from its own projector (W_0 until it first trains), kept in its
    client state under ``model/``; nothing is aggregated into a shared model."""

    w0: Weights
    personal = True

    def start(self, state: Weights) -> tuple[Weights | None, Weights]:
        own = personal_model(state) or self.w0
        return own, {k: v for k, v in state.items() if not k.startswith(MODEL)}

    def keep(self, state: Weights, start: Weights | None, delta: Weights) -> Weights:
        assert start is not None
        own = add(start, delta)
        return {**state, **{MODEL + k: v for k, v in own.items()}}

    def of(self, state: Weights) -> Weights:
        """Client's own projector from its stored state (W_0 when it never trained)."""
        return personal_model(state) or self.w0


# ---------------------------------------------------------------------------------------------
# The federated loop


def _nbytes(tensors: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Uploads:
    """What a round's groups sent back: per-client results, partial sums, bytes received."""

    presum: bool
    results: list[ClientResult] = field(default_factory=list)
    parts: list[PartialSum] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # by the workers
    received: int = 0
    masked: dict[int, Any] = field(default_factory=dict)  # secure aggregation
    left: list[int] = field(default_factory=list)  # left after ShareKeys

    def add(self, out: Any) -> list[ClientResult]:
        """Take one group's output; returns its per-client results."""
        if self.presum:
            batch = out.results
            self.rejected.extend(out.rejected)
            if out.partial is not None:
                self.parts.append(out.partial)
                self.received += _nbytes(out.partial.weighted)
            for cid, y in getattr(out, "masked", {}).items():  # secure aggregation
                self.masked[cid] = y
                self.received += y.nbytes
            self.left.extend(getattr(out, "left", []))
        else:
            batch = out
            self.received += sum(
                _nbytes(r.update.delta) + _nbytes(r.update.extras) for r in out
            )
        self.results.extend(batch)
        return batch


def cohorts(tasks: list[ClientTask], size: int) -> list[list[ClientTask]]:
    """The round's cohorts: tasks by predicted cost (tokens, else rows) descending, ties by
    client id, cut into groups of ``size`` (similar costs share a pass, so little is masked).

    A group depends on the config alone, never on the workers.
    """
    ordered = sorted(tasks, key=lambda t: (-(t.cost or len(t.rows)), t.client_id))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _submit(
    worker: Any,
    group: list[ClientTask],
    start_of: dict[int, Any],
    rest: tuple,
    presum: bool,
    secure: SecureRound | None = None,
) -> Any:
    """Send one cohort to ``worker``; each client's start weights go by reference."""
    starts = [start_of[t.client_id] for t in group]
    if secure is not None:
        ids = [t.client_id for t in group]
        return worker.train_secure.remote(group, *rest, secure.for_group(ids), *starts)
    call = worker.train_presummed if presum else worker.train
    return call.remote(group, *rest, *starts)


@dataclass
class Planned:
    """A round's plan: the cohort with its steps and clock, the tasks, each step's LR, and the
    start projector of each client that does not start from W_t."""

    plan: RoundPlan
    tasks: list[ClientTask]
    lrs: tuple[float, ...]
    starts: dict[int, Weights]


@dataclass
class Trained:
    """What came back from the workers, and how the round's groups were sent."""

    uploads: Uploads
    groups: list[list[int]]
    sent: DispatchStats
    weights_ref: Any


class FederatedRun:
    """One federated run on a pool of actors, from round 1 or from a checkpoint."""

    def __init__(
        self, ctx: RunContext, algorithm: Any, restored: RoundState | None = None
    ) -> None:
        cfg, prep, pool = ctx.cfg, ctx.prep, ctx.pool
        self.ctx, self.cfg, self.algorithm = ctx, cfg, algorithm
        self.evaluator = pool.evaluator(cfg, prep, federated=True)
        self.workers = WorkerSet(pool, pool.workers(cfg, prep))
        mark("workers_ready")
        # W_0 from the run seed (not from the checkpoint's stored projector).
        self.w0: Weights = ray.get(
            self.workers.handles()[0].init_projector.remote(cfg.seed)
        )
        self.weights = self.w0
        self.aggregator = pool.aggregator(
            cfg.algorithm.name,
            cfg.algorithm.params,
            self.w0,
            cfg.scenario.num_clients,
            cfg.validation.max_update_norm,
            cfg.validation.on_reject,
            cfg.train.diagnostics,
            cfg.ray.aggregator_gpus,
            aggregator_in_driver(cfg),
        )
        # Client-level DP (fedsim.privacy): z chosen here when privacy.target_epsilon is set.
        self.privacy = plan_privacy(cfg, type(algorithm))
        self.secure = plan_secure(cfg, self.privacy)
        ray.get(self.aggregator.set_privacy.remote(self.privacy, cfg.seed, self.secure))
        if self.privacy is not None:
            ctx.console.print(self.privacy.describe(cfg.rounds))
        self.models = PersonalModels(self.w0) if algorithm.personal else SharedModel()
        self.presum = (
            cfg.train.presum and algorithm.presummable and not algorithm.personal
        ) or self.secure is not None  # masked uploads come back like partial sums
        self.sizes = np.array([len(s) for s in prep.shards])
        self.participation = participation_spec(cfg)
        self.upload_bytes = sum(v.numel() * 4 for v in self.w0.values())  # fp32 delta
        self.settings = train_settings(cfg, prep.shards)
        self.cost = TokenCost(prep.model, prep.train_path, cfg.data.qa_fraction)
        self.store = MemoryStore()
        self.cursors = [Cursor() for _ in prep.shards]
        self.sim_clock = 0.0
        self.first = 1
        self.w0_eval: dict[str, float] = {}
        # W_0's evaluation runs alongside round 1's client tasks; its result is logged as
        # round 0 before anything after it (:meth:`log_round_zero`).
        self.pending: PendingEval | None = None
        if restored is None:
            self.book = Logbook()
            self.pending = submit_initial_eval(ctx, self.w0)
            mark("initial_eval")
        else:
            self._restore(restored)

    def log_round_zero(self) -> None:
        """The round-0 evaluation, once, before anything reads it or logs after it. At round 0
        every client of a personal algorithm holds W_0 too: one evaluation for all of them."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            log_initial_eval(self.ctx, pending, self.book)
        self.w0_eval.update(self.book.initial_eval or {})

    def _restore(self, restored: RoundState) -> None:
        """Go on after the checkpoint's round: its weights, server state, client states, cursors
        and clock. Checked against this run first; only then is metrics.jsonl cut back."""
        check_restored(restored, self.w0, len(self.ctx.prep.shards))
        ray.get(self.aggregator.load_state.remote(restored.server_state))
        self.book = resumed_logbook(self.ctx, restored)
        self.weights = restored.weights
        self.cursors = list(restored.cursors)
        self.store.restore(restored.clients)
        self.sim_clock = restored.sim_clock
        self.first = restored.round + 1

    def run(self) -> RunResult:
        """Rounds ``first`` … ``rounds``, each in its phases; then the final files."""
        cfg, progress = self.cfg, self.ctx.progress
        rounds = progress.add_task(
            "rounds", total=cfg.rounds, completed=self.first - 1, info=""
        )
        self.client_bar = progress.add_task("client tasks", total=1, info="")
        for rnd in range(self.first, cfg.rounds + 1):
            t0 = time.perf_counter()
            planned = self.plan(rnd)
            trained = self.train(rnd, planned)
            self.log_round_zero()
            agg = self.aggregate(rnd, trained)
            self.commit(trained, agg, planned.starts)
            record = self.record(rnd, planned, trained, agg)
            self.evaluate(rnd, record)
            record["wall_seconds"] = round(time.perf_counter() - t0, 3)
            self.book.append(self.ctx, record)
            self.checkpoint(rnd)
            progress.update(rounds, advance=1, info=f"loss {loss_text(record)}")
            self.stop_on_rejects(rnd, record)
        return self.finish()

    def plan(self, rnd: int) -> Planned:
        """The cohort and its steps (:func:`plan_round`), and each client's task: its next rows,
        its learning rates and the client state it continues from."""
        cfg = self.cfg
        steps = cfg.train.local_steps
        plan = plan_round(
            self.participation, self.sizes, steps, self.upload_bytes, cfg.seed, rnd
        )
        lrs = round_lrs(cfg, rnd, steps)
        tasks, starts = [], {}
        for cid in plan.cohort:
            n = plan.steps[cid]
            rows, self.cursors[cid] = take(
                self.ctx.prep.shards[cid],
                self.cursors[cid],
                n * cfg.train.batch_size,
                cfg.seed,
                cid,
            )
            start, state = self.models.start(self.store.load(cid))
            if start is not None:
                starts[cid] = start
            cost = self.cost(cid, rnd, cfg.seed, rows)
            tasks.append(
                ClientTask(
                    cid,
                    rnd,
                    cfg.seed,
                    rows,
                    lrs[:n],
                    cfg.train.batch_size,
                    state,
                    cost=cost,
                )
            )
        return Planned(plan, tasks, lrs, starts)

    def train(self, rnd: int, planned: Planned) -> Trained:
        """Cohorts to the workers (:func:`fedsim.dispatch.dispatch`: largest first, to whichever
        worker frees; a group is sent again when its worker or node is lost)."""
        cfg, progress = self.cfg, self.ctx.progress
        weights_ref = ray.put(self.weights)
        start_refs = {cid: ray.put(w) for cid, w in planned.starts.items()}
        start_of = {
            t.client_id: start_refs.get(t.client_id, weights_ref) for t in planned.tasks
        }
        pending = cohorts(planned.tasks, cfg.train.cohort_batch)
        rest = (
            self.aggregator.payload.remote(),
            cfg.algorithm.name,
            cfg.algorithm.params,
            self.settings,
        )
        progress.update(
            self.client_bar,
            total=len(planned.tasks),
            completed=0,
            description=f"round {rnd} clients",
            info="",
        )
        uploads = Uploads(self.presum)
        self.secure_round = (
            None
            if self.secure is None
            else open_round(
                self.aggregator, self.secure, cfg.seed, rnd, planned.plan.cohort
            )
        )

        def on_result(out: Any) -> None:
            batch = uploads.add(out)
            last = batch[-1].update
            progress.update(
                self.client_bar,
                advance=len(batch),
                info=f"client {last.client_id} loss {last.loss:.3f}",
            )

        try:
            sent = dispatch(
                pending,
                partial(
                    _submit,
                    start_of=start_of,
                    rest=rest,
                    presum=self.presum,
                    secure=self.secure_round,
                ),
                self.workers,
                on_result,
                depth=IN_FLIGHT,
                max_retries=cfg.ray.task_retries,
                label=lambda g: str([t.client_id for t in g]),
            )
        except WorkersLost as e:
            raise RunError(f"round {rnd}: {e}; {self._where_rounds_are()}") from None
        if sent.lost:
            self.ctx.console.print(
                f"round {rnd}: lost worker(s) {sent.lost}; {sent.retries} client group(s) "
                "sent again"
            )
        uploads.results.sort(key=lambda r: r.update.client_id)
        groups = [[t.client_id for t in g] for g in pending]
        return Trained(uploads, groups, sent, weights_ref)

    def _where_rounds_are(self) -> str:
        out = self.ctx.out_dir
        where = f"rounds before it are in {out / 'metrics.jsonl'}"
        if self.cfg.checkpoint_every:
            where += (
                f", the last checkpoint in {out / 'checkpoints'} (fedsim run "
                f"--resume {out})"
            )
        return where

    def aggregate(self, rnd: int, trained: Trained) -> dict[str, Any]:
        """The Aggregator's step: W_{t+1} and the algorithm's round metrics."""
        up = trained.uploads
        if self.secure_round is not None:
            self.weights, agg = close_round(
                self.aggregator,
                self.secure_round,
                trained.weights_ref,
                up.masked,
                up.rejected,
                up.left,
            )
            return agg
        if self.presum:
            call = self.aggregator.aggregate_partials.remote(
                trained.weights_ref, up.parts, up.rejected, rnd
            )
        else:
            updates = [r.update for r in up.results]
            call = self.aggregator.aggregate.remote(trained.weights_ref, updates, rnd)
        self.weights, agg = ray.get(call)
        return agg

    def commit(
        self, trained: Trained, agg: dict[str, Any], starts: dict[int, Weights]
    ) -> None:
        """Accepted clients' new states into the store; a rejected update changes nothing
        (neither the client's state nor its own projector)."""
        rejected = {r["client_id"] for r in agg.get("rejected", [])}
        for res in trained.uploads.results:
            cid = res.update.client_id
            if cid in rejected:
                continue
            state = self.models.keep(
                dict(res.client_state), starts.get(cid), res.update.delta
            )
            self.store.save(cid, state)

    def record(
        self, rnd: int, planned: Planned, trained: Trained, agg: dict[str, Any]
    ) -> RoundRecord:
        """The round's line of ``metrics.jsonl`` (:mod:`fedsim.records`)."""
        plan, up = planned.plan, trained.uploads
        updates = [r.update for r in up.results]
        samples = sum(u.num_samples for u in updates)
        loss = (
            sum(u.loss * u.num_samples for u in updates) / samples if samples else None
        )
        self.sim_clock += plan.sim_seconds
        shown = (
            "update_norm",
            "rejected",
            "action",
            "diagnostics",
            "privacy",
            "secagg",
        )
        record: RoundRecord = {
            "round": rnd,
            "clients": plan.cohort,
            "num_clients": len(plan.cohort),
            "samples": samples,
            "loss": None if loss is None else float(loss),
            "lr": planned.lrs[0],
            "update_norm": agg.get("update_norm"),
            "rejected": agg.get("rejected", []),
            "algorithm": {k: v for k, v in agg.items() if k not in shown},
            **{k: agg[k] for k in ("action", "diagnostics", "secagg") if k in agg},
            **self._privacy_fields(rnd, agg),
            "client_seconds_max": max((r.seconds for r in up.results), default=0.0),
            "cohorts": trained.groups,
            "retries": trained.sent.retries,
            **({"workers_lost": trained.sent.lost} if trained.sent.lost else {}),
            "predicted_tokens": {str(t.client_id): t.cost for t in planned.tasks},
            "upload_mib": round(up.received / 2**20, 6),
            **(
                {"presummed_groups": len(up.parts)}
                if self.presum and self.secure is None
                else {}
            ),
            "bad_images": sum(r.bad_images for r in up.results),
            **(
                {"corpus": corpus_summary(self.ctx.prep.train_path)} if rnd == 1 else {}
            ),
            "data_passes_max": max(c.passes for c in self.cursors),
            "available": plan.available,
            "sampled": plan.sampled,
            "dropped": plan.dropped,
            "stragglers": plan.stragglers,
            "sim_seconds": round(plan.sim_seconds, 6),
            "sim_clock": round(self.sim_clock, 6),
        }
        if any(n != self.cfg.train.local_steps for n in plan.steps.values()):
            record["local_steps"] = {str(c): n for c, n in plan.steps.items()}
        return record

    def _privacy_fields(self, rnd: int, agg: dict[str, Any]) -> dict[str, Any]:
        """ε(δ) after this round and the round's published privacy values (DP on only)."""
        if self.privacy is None:
            return {}
        info = {
            "delta": self.privacy.delta,
            "noise_multiplier": self.privacy.noise_multiplier,
            **agg.get("privacy", {}),
        }
        return {
            "epsilon": record_epsilon(self.privacy.epsilon_after(rnd)),
            "privacy": info,
        }

    def evaluate(self, rnd: int, record: RoundRecord) -> None:
        """On the run's schedule as the algorithm keeps it: the global projector, or every
        client's own (mean and spread over clients)."""
        last = rnd == self.cfg.rounds
        if not self.algorithm.evaluate_round(eval_due(self.cfg, rnd), last):
            return
        if self.models.personal:
            self.book.final_eval, record["eval_client_std"] = self._evaluate_clients()
        else:
            self.book.final_eval = self._evaluate(ray.put(self.weights))
        record["eval"] = ev = self.book.final_eval
        self.ctx.console.print(
            f"round {rnd}: loss {loss_text(record)}, attr_mean {ev['attr_mean']:.3f}, "
            f"yes/no {ev['yesno_acc']:.3f}"
        )

    def _evaluate(self, ref: Any) -> dict[str, float]:
        return ray.get(self.evaluator.evaluate.remote(ref))

    def _evaluate_clients(self) -> tuple[dict[str, float], dict[str, float]]:
        """Mean and std over all clients of each client's own projector's evaluation."""
        if not self.w0_eval:
            self.w0_eval.update(self._evaluate(ray.put(self.w0)))
        clients = range(len(self.ctx.prep.shards))
        owns = [personal_model(self.store.load(c)) for c in clients]
        refs = {
            c: self.evaluator.evaluate.remote(ray.put(m))
            for c, m in enumerate(owns)
            if m
        }
        per_client = [ray.get(refs[c]) if c in refs else self.w0_eval for c in clients]
        keys = per_client[0].keys()
        vals = {k: np.array([e[k] for e in per_client], dtype=float) for k in keys}
        return (
            {k: float(v.mean()) for k, v in vals.items()},
            {k: float(v.std()) for k, v in vals.items()},
        )

    def checkpoint(self, rnd: int) -> None:
        """Every ``checkpoint_every`` rounds: everything needed to go on as if never stopped."""
        cfg = self.cfg
        if not (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0):
            return
        state = RoundState(
            round=rnd,
            weights=self.weights,
            server_state=ray.get(self.aggregator.server_state.remote()),
            clients=self.store.snapshot(),
            cursors=self.cursors,
            sim_clock=self.sim_clock,
            final_eval=self.book.final_eval,
            metrics_lines=len(self.book.history),
        )
        save_checkpoint(self.ctx.out_dir, state, self.ctx.digest, cfg.checkpoint_keep)

    def stop_on_rejects(self, rnd: int, record: RoundRecord) -> None:
        """``validation.on_reject: fail``: a rejected update stops the run after its round."""
        rejected = record["rejected"]
        failed = record.get("secagg", {}).get("failed")
        if failed and self.cfg.validation.on_reject == "fail":
            raise RunError(
                f"round {rnd}: {failed}; validation.on_reject is fail — rounds 1–{rnd} "
                f"are in {self.ctx.out_dir / 'metrics.jsonl'}"
            )
        if not rejected or self.cfg.validation.on_reject != "fail":
            return
        raise RunError(
            f"round {rnd}: {len(rejected)} update(s) rejected "
            f"(clients {[r['client_id'] for r in rejected]}; first: "
            f"{rejected[0]['reason']}); validation.on_reject is fail — rounds 1–{rnd} are in "
            f"{self.ctx.out_dir / 'metrics.jsonl'}"
        )

    def finish(self) -> RunResult:
        """The final projector (a personal algorithm: every client's own, keyed
        ``client-<id>/<name>``), the server state, peak memory, the toy suite."""
        self.log_round_zero()  # a run of no rounds, or resumed after its last round
        ctx, cfg = self.ctx, self.cfg
        final = ctx.out_dir / "final"
        if isinstance(self.models, PersonalModels):
            owns = {
                f"client-{c}/{k}": v.clone()
                for c in range(len(ctx.prep.shards))
                for k, v in self.models.of(self.store.load(c)).items()
            }
            save_weights(final / "client_projectors.safetensors", owns, _meta(cfg))
        else:
            save_weights(final / "projector.safetensors", self.weights, _meta(cfg))
        server_state = ray.get(self.aggregator.server_state.remote())
        if server_state:
            save_weights(final / "server_state.safetensors", server_state)
        agg, ev = self.aggregator, self.evaluator
        resources = {"driver": peak_rss_mb(), **self.workers.ask("peak_rss_mb")}
        if not isinstance(agg, InDriver):  # (in the driver: the driver's entry)
            resources["aggregator"] = ray.get(agg.peak_rss_mb.remote())
        nodes = {
            **self.workers.ask("node"),
            "aggregator": ray.get(agg.node.remote()),
        }
        if not ctx.pool.evaluator_shares_worker:
            # (on worker 0, its process is worker0's entry: counted once)
            resources["evaluator"] = ray.get(ev.peak_rss_mb.remote())
            nodes["evaluator"] = ray.get(ev.node.remote())
        benchmarks = (
            {}
            if self.models.personal
            else toy_benchmarks(cfg, ev, self.weights, ctx.out_dir)
        )
        return finish(ctx, self.book, self.weights, resources, nodes, benchmarks)


# ---------------------------------------------------------------------------------------------
# The centralized upper bound


def run_pooled(ctx: RunContext, restored: RoundState | None = None) -> RunResult:
    """The centralized upper bound: Ray Train's TorchTrainer over the pooled shards.

    Rank 0 sends its training state with every ``checkpoint_every``-th round's record; the
    driver writes the round checkpoint (the pooled stream is client 0 of the client-state store
    and the cursors). A resumed run hands the checkpoint to the workers as the plan's start.
    """
    cfg = ctx.cfg
    evaluator = ctx.pool.evaluator(cfg, ctx.prep)
    w0: Weights = ray.get(evaluator.init_projector.remote(cfg.seed))
    start = None
    if restored is None:
        book = Logbook()
        initial_eval(ctx, w0, book)
    else:
        check_restored(restored, w0, 1)  # the pooled stream is one client
        book = resumed_logbook(ctx, restored)
        start = restored
    bar = ctx.progress.add_task(
        "rounds (Ray Train)",
        total=cfg.rounds,
        completed=restored.round if restored else 0,
        info="",
    )
    on_record = partial(_pooled_record, ctx, book, bar)
    if restored is not None and restored.round == cfg.rounds:
        # Stopped after the last round's checkpoint: nothing left to train.
        weights, train_peak = restored.weights, 0.0
    else:
        plan = pooled_plan(cfg, ctx.prep, w0, start)
        weights, train_peak = ctx.pool.trainer(cfg).train(plan, evaluator, on_record)
    save_weights(ctx.out_dir / "final" / "projector.safetensors", weights, _meta(cfg))
    resources = {
        "driver": peak_rss_mb(),
        "train_rank0": train_peak,
        "evaluator": ray.get(evaluator.peak_rss_mb.remote()),
    }
    benchmarks = toy_benchmarks(cfg, evaluator, weights, ctx.out_dir)
    nodes = {"evaluator": ray.get(evaluator.node.remote())}
    return finish(ctx, book, weights, resources, nodes, benchmarks)


def _pooled_record(
    ctx: RunContext, book: Logbook, bar: Any, record: dict[str, Any]
) -> None:
    """One round's record from Ray Train's rank 0: logged, and checkpointed when it carries
    the training state."""
    state = record.pop("checkpoint", None)
    book.append(ctx, record)
    if "eval" in record:
        book.final_eval = record["eval"]
    if state is not None:
        done = replace(
            state, final_eval=book.final_eval, metrics_lines=len(book.history)
        )
        save_checkpoint(ctx.out_dir, done, ctx.digest, ctx.cfg.checkpoint_keep)
    if "eval" in record:
        ev = book.final_eval
        ctx.console.print(
            f"round {record['round']}: loss {record['loss']:.3f}, attr_mean "
            f"{ev['attr_mean']:.3f}, yes/no {ev['yesno_acc']:.3f}"
        )
    ctx.progress.update(bar, advance=1, info=f"loss {loss_text(record)}")
