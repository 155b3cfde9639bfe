"""Resident actors kept across runs: ``fedsim compare`` starts its workers and Evaluator once.

A BackboneWorker holds only its frozen backbone and the memory-mapped data (the projector is set
per task); the Evaluator sets the projector it is sent before every evaluation. Neither keeps
anything from one run to the next, so a run on reused actors gives the same bits as a run on
fresh ones (tests/test_compare.py) and saves their start-up (a process per actor importing torch
and loading the backbone). The untrained projector's evaluation depends only on the backbone, the
evaluation set and the seed, so it is computed once per seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.aggregator import Aggregator, InDriver
from fedsim.config import Config
from fedsim.evaluator import Evaluator, VLLMEvaluator
from fedsim.models.backbone import BackboneError
from fedsim.pooled import PooledTrainer
from fedsim.worker import BackboneWorker

#: The most CPUs a machine has for ``ray.evaluator_on_worker: auto`` to share a worker.
SMALL_MACHINE_CPUS = 4


def evaluator_on_worker(cfg: Config, cpus: int | None = None) -> bool:
    """Whether a federated run of ``cfg`` puts its Evaluator inside BackboneWorker 0
    (``ray.evaluator_on_worker``; ``cpus``: the machine's, default ``os.cpu_count()``).

    ``auto`` shares on a small machine only: a local Ray (no ``ray.address``) on at most
    :data:`SMALL_MACHINE_CPUS` CPUs, the transformers backend, and an Evaluator that asks for
    nothing of its own (CPUs, GPUs, custom resources: a placement asked for is kept).
    """
    from fedsim.configtools import ConfigError

    mode = cfg.ray.evaluator_on_worker
    own = (
        cfg.eval.backend != "hf"
        or cfg.ray.evaluator_cpus > 0
        or cfg.ray.evaluator_gpus > 0
        or bool(cfg.ray.evaluator_resources)
    )
    if mode == "on":
        if own:
            raise ConfigError(
                "ray.evaluator_on_worker: on needs eval.backend hf and no "
                "ray.evaluator_cpus / evaluator_gpus / evaluator_resources"
            )
        return True
    if mode == "off" or own or cfg.ray.address:
        return False
    return (cpus if cpus is not None else os.cpu_count() or 1) <= SMALL_MACHINE_CPUS


def aggregator_in_driver(cfg: Config, cpus: int | None = None) -> bool:
    """Whether a federated run of ``cfg`` runs its Aggregator inside the driver process
    (``ray.aggregator_in_driver``; ``cpus``: the machine's, default ``os.cpu_count()``).

    ``auto``: on a small machine only — a local Ray (no ``ray.address``) on at most
    :data:`SMALL_MACHINE_CPUS` CPUs with the Aggregator on the CPU (``ray.aggregator_gpus``
    0). ``on`` with a GPU for the Aggregator is refused: the driver holds no Ray GPU.
    """
    from fedsim.configtools import ConfigError

    mode = cfg.ray.aggregator_in_driver
    if mode == "on":
        if cfg.ray.aggregator_gpus > 0:
            raise ConfigError(
                "ray.aggregator_in_driver: on needs ray.aggregator_gpus 0 (the driver "
                "holds no Ray GPU; an Aggregator on a GPU is an actor of its own)"
            )
        return True
    if mode == "off" or cfg.ray.aggregator_gpus > 0 or cfg.ray.address:
        return False
    return (cpus if cpus is not None else os.cpu_count() or 1) <= SMALL_MACHINE_CPUS


class _EvaluatorOnWorker:
    """The Evaluator's methods, answered by BackboneWorker 0 (``ray.evaluator_on_worker``).

    Resolved at each call, so that a replaced worker 0 (lost and started again, with the
    Evaluator attached again) answers the calls after it.
    """

    def __init__(self, pool: ActorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool._evaluator_host(), name)


def _fits(cpus: float, gpus: float) -> bool:
    """Whether the Ray cluster has ``cpus`` and ``gpus`` free now."""
    import ray

    free = ray.available_resources()
    return free.get("CPU", 0.0) + 1e-9 >= cpus and free.get("GPU", 0.0) + 1e-9 >= gpus


class ActorPool:
    """Workers and Evaluator for runs that share a backbone, data and placement."""

    def __init__(self) -> None:
        self._workers: list[Any] = []
        self._workers_key: tuple[Any, ...] | None = None
        self._new_worker: Any = None
        self._evaluator: Any = None
        self._evaluator_key: tuple[Any, ...] | None = None
        self._initial: dict[tuple[Any, ...], dict[str, float]] = {}
        self._aggregator: Any = None
        self._aggregator_where: tuple[Any, ...] = ()
        self._trainer: Any = None
        self._trainer_key: tuple[Any, ...] | None = None
        self._trainer_dir: str | None = None
        # ray.evaluator_on_worker: what worker 0 is asked to attach, and what it holds.
        self._shared_args: tuple[Any, ...] | None = None
        self._shared_key: tuple[Any, ...] | None = None
        self._attached: tuple[Any, ...] | None = None
        self._attach_ref: Any = None
        self._active_key: tuple[Any, ...] | None = None
        self._active: Any = None

    def workers(self, cfg: Config, prep: Any) -> list[Any]:
        import ray

        key = (
            prep.model,
            str(prep.train_path),
            prep.pixel_path,
            prep.feature_path,
            cfg.data.bad_images,
            cfg.ray.workers,
            cfg.ray.worker_cpus,
            cfg.ray.worker_gpus,
            cfg.ray.threads_per_worker,
            cfg.ray.placement,
            tuple(sorted(cfg.ray.worker_resources.items())),
        )
        # A federated run next: the centralized worker group (idle now, but its controller
        # polls its health) gives back its processes and resources.
        self._close_trainer()
        if key != self._workers_key:
            self._kill(self._workers)
            self._workers, self._workers_key, self._attached = [], None, None
            cls = ray.remote(
                num_cpus=cfg.ray.worker_cpus,
                num_gpus=cfg.ray.worker_gpus,
                resources=dict(cfg.ray.worker_resources) or None,
                scheduling_strategy="SPREAD"
                if cfg.ray.placement == "spread"
                else "DEFAULT",
            )(BackboneWorker)
            args = (
                prep.model,
                str(prep.train_path),
                cfg.ray.threads_per_worker,
                prep.pixel_path,
                cfg.data.bad_images,
                prep.feature_path,
            )
            self._new_worker = lambda: cls.remote(*args)
            self._workers = [self._new_worker() for _ in range(cfg.ray.workers)]
            self._workers_key = None
            try:
                ray.get([w.ready.remote() for w in self._workers])
            except ray.exceptions.RayActorError as e:
                # Ray's message holds the worker's whole traceback: its last line is the cause.
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                raise BackboneError(
                    f"model.backbone: workers could not load {prep.model.backbone_path!r}: "
                    f"{lines[-1] if lines else type(e).__name__}"
                ) from None
            self._workers_key = key
            self._attach()
        return self._workers

    def replace_worker(self, index: int) -> Any:
        """A new worker in place of worker ``index`` (lost with its process or node).

        The old handle is killed (a no-op when it is dead already); the new one is started with
        the same backbone, data and resources and is returned at once: call ``ready`` on it
        before sending tasks. Ray places it on a node that has room, which need not be the old
        worker's.
        """
        import ray

        try:
            ray.kill(self._workers[index])
        except Exception:  # noqa: BLE001 - already gone, or its node is
            pass
        self._workers[index] = self._new_worker()
        self._workers_key = None  # the next run starts a fresh set
        if index == 0:
            self._attached = None
            self._attach()  # queued before any task the new worker 0 is sent
        return self._workers[index]

    def _attach(self) -> None:
        """Worker 0 holds the Evaluator of ``_shared_args`` (asked once per worker and args;
        the actor runs the call before any later one sent to it)."""
        if self._shared_args is None or not self._workers:
            return
        if self._attached != self._shared_key:
            self._attach_ref = self._workers[0].attach_evaluator.remote(
                *self._shared_args
            )
            self._attached = self._shared_key

    def _evaluator_host(self) -> Any:
        import ray

        self._attach()
        if self._attach_ref is not None:
            ref, self._attach_ref = self._attach_ref, None
            ray.get(ref)  # the Evaluator's own load error, if any, surfaces here
        return self._workers[0]

    @property
    def evaluator_shares_worker(self) -> bool:
        """Whether the Evaluator last handed out is worker 0's (``ray.evaluator_on_worker``)."""
        return isinstance(self._active, _EvaluatorOnWorker)

    def trainer(self, cfg: Config) -> Any:
        """The Ray Train worker group of centralized runs (:class:`fedsim.pooled.PooledTrainer`).

        Kept for consecutive centralized runs with the same placement, so that Ray Train starts
        once; a new placement, or a dead worker group, starts a new one.
        """
        import tempfile

        key = (cfg.ray.workers, cfg.ray.worker_cpus, cfg.ray.worker_gpus)
        if self._trainer is not None and (
            key != self._trainer_key or not self._trainer.alive
        ):
            self._close_trainer()
        if self._trainer is None:
            if not _fits(
                cfg.ray.workers * cfg.ray.worker_cpus,
                cfg.ray.workers * cfg.ray.worker_gpus,
            ):
                self._kill(self._workers)  # the federated workers hold what it needs
                self._workers, self._workers_key, self._attached = [], None, None
            self._trainer_dir = tempfile.mkdtemp(prefix="fedsim-train-")
            self._trainer = PooledTrainer(*key, Path(self._trainer_dir))
            self._trainer_key = key
        return self._trainer

    def _close_trainer(self) -> None:
        import shutil

        if self._trainer is not None:
            try:
                self._trainer.close()
            finally:
                self._trainer, self._trainer_key = None, None
                if self._trainer_dir:
                    shutil.rmtree(self._trainer_dir, ignore_errors=True)
                self._trainer_dir = None

    def evaluator(self, cfg: Config, prep: Any, federated: bool = False) -> Any:
        """The Evaluator for a run of ``cfg``: an actor of its own, or (``federated`` and
        :func:`evaluator_on_worker`) a handle whose calls BackboneWorker 0 answers."""
        import ray

        threads = cfg.eval.threads or os.cpu_count() or 1
        if federated and evaluator_on_worker(cfg):
            key: tuple[Any, ...] = ("on worker", prep.model, str(prep.eval_path))
            key += (threads, cfg.eval.batch_size, cfg.eval.max_new_tokens)
            if key != self._shared_key:
                self._shared_args = (str(prep.eval_path), *key[3:])
                self._shared_key = key
                self._attach()
            if key != self._active_key:
                self._initial.clear()
            self._active_key, self._active = key, _EvaluatorOnWorker(self)
            return self._active
        key = (
            prep.model,
            str(prep.eval_path),
            threads,
            cfg.eval.batch_size,
            cfg.eval.max_new_tokens,
            cfg.eval.backend,
            cfg.eval.vllm_python,
            cfg.eval.vllm_gpus,
            tuple(sorted(cfg.eval.vllm_args.items())),
            cfg.ray.evaluator_cpus,
            cfg.ray.evaluator_gpus,
            tuple(sorted(cfg.ray.evaluator_resources.items())),
        )
        if key != self._evaluator_key:
            self._kill([self._evaluator] if self._evaluator is not None else [])
            args = (prep.model, str(prep.eval_path), *key[2:5])
            if cfg.eval.backend == "vllm":
                # vLLM may live in its own environment (it pins its own torch and
                # transformers): the actor then starts with that interpreter.
                env = (
                    {"py_executable": cfg.eval.vllm_python}
                    if cfg.eval.vllm_python
                    else None
                )
                self._evaluator = ray.remote(
                    num_cpus=cfg.ray.evaluator_cpus,
                    num_gpus=cfg.eval.vllm_gpus,
                    resources=dict(cfg.ray.evaluator_resources) or None,
                    runtime_env=env,
                )(VLLMEvaluator).remote(*args, dict(cfg.eval.vllm_args))
            else:
                self._evaluator = ray.remote(
                    num_cpus=cfg.ray.evaluator_cpus,
                    num_gpus=cfg.ray.evaluator_gpus,
                    resources=dict(cfg.ray.evaluator_resources) or None,
                )(Evaluator).remote(*args)
            self._evaluator_key = key
        if key != self._active_key:
            self._initial.clear()
        self._active_key, self._active = key, self._evaluator
        return self._evaluator

    def aggregator(
        self,
        algorithm: str,
        params: Any,
        weights: Any,
        num_clients: int,
        max_norm: float | None = None,
        on_reject: str = "continue",
        diagnostics: bool = False,
        gpus: float = 0.0,
        in_driver: bool = False,
    ) -> Any:
        """The Aggregator actor, reset to a fresh server state for a new run; with ``gpus``
        (``ray.aggregator_gpus``) > 0 it holds a GPU and aggregates there. ``in_driver``
        (:func:`aggregator_in_driver`): an :class:`~fedsim.aggregator.InDriver` instead,
        called the same way."""
        import ray

        where = ("driver",) if in_driver else ("actor", gpus)
        if self._aggregator is not None and self._aggregator_where != where:
            if not isinstance(self._aggregator, InDriver):
                self._kill([self._aggregator])
            self._aggregator = None
        if self._aggregator is None and in_driver:
            self._aggregator = InDriver(algorithm, params, weights, num_clients)
        elif self._aggregator is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's node: the run ends with that node anyway, so the server state
            # does not depend on any other node staying up.
            here = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
            self._aggregator = ray.remote(
                num_cpus=0, num_gpus=gpus, scheduling_strategy=here
            )(Aggregator).remote(algorithm, params, weights, num_clients)
        self._aggregator_where = where
        ray.get(
            self._aggregator.reset.remote(
                algorithm,
                params,
                weights,
                num_clients,
                max_norm,
                on_reject,
                diagnostics,
                "cuda" if gpus > 0 else "cpu",
            )
        )
        return self._aggregator

    def initial_eval(self, seed: int, weights: Any) -> dict[str, float]:
        """The evaluation of W_0 for ``seed`` (computed by the current Evaluator once)."""
        return self.submit_initial_eval(seed, weights)()

    def submit_initial_eval(
        self, seed: int, weights: Any
    ) -> Callable[[], dict[str, float]]:
        """Start the evaluation of W_0 for ``seed`` (unless the current Evaluator has it
        already) and return what waits for its result: the run goes on meanwhile."""
        import ray

        key = (self._active_key, seed)
        ref = None if key in self._initial else self._active.evaluate.remote(weights)

        def result() -> dict[str, float]:
            if key not in self._initial:
                self._initial[key] = ray.get(ref)
            return dict(self._initial[key])

        return result

    @staticmethod
    def _kill(actors: list[Any]) -> None:
        import ray

        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - dead already (lost worker, removed node)
                pass

    def close(self) -> None:
        self._close_trainer()
        self._kill(self._workers)
        if self._evaluator is not None:
            self._kill([self._evaluator])
        if self._aggregator is not None and not isinstance(self._aggregator, InDriver):
            self._kill([self._aggregator])
        self._aggregator = None
        self._workers, self._evaluator = [], None
        self._workers_key = self._evaluator_key = None
        self._shared_args = self._shared_key = self._attached = None
        self._active_key = self._active = None
        self._initial.clear()
