"""The BackboneWorker actor: one resident frozen backbone that trains any client's cohort.

The classes in :mod:`fedsim.worker`, :mod:`fedsim.aggregator` and :mod:`fedsim.evaluator` are
plain Python; :class:`fedsim.pool.ActorPool` turns them into Ray actors with
``ray.remote(num_cpus=..., num_gpus=...)(cls)`` from the config (so tests can also call them
directly). Each loads what it needs once in ``__init__`` and never per client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import (
    PartialSum,
    Weights,
    partial_sum,
    validate_update,
)
from fedsim.data.rows import RowReader
from fedsim.machine import node_id, peak_rss_mb
from fedsim.models.backbone import init_projector
from fedsim.models.spec import ModelSpec, load_model, quiet_hf
from fedsim.startup import mark
from fedsim.training import ClientResult, ClientTask, TrainSettings, train_cohort


class BackboneWorker:
    """Holds one frozen backbone and the training data (memory-mapped) for the whole run."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset_path: str,
        threads: int,
        pixel_path: str | None = None,
        bad_images: str = "skip",
        feature_path: str | None = None,
    ) -> None:
        quiet_hf()

        self.spec, self.threads = spec, threads
        self.backbone = load_model(spec, threads)
        self.evaluator: Any = (
            None  # attach_evaluator: the Evaluator sharing this process
        )
        self.eval_threads = threads
        self.rows = RowReader.open(dataset_path, pixel_path, bad_images, feature_path)
        mark("worker_loaded")
        self._algorithms: dict[tuple[str, str], Any] = {}

    def ready(self) -> dict[str, float]:
        return {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()

    def init_projector(self, seed: int) -> Weights:
        """Fresh projector weights W_0 drawn from a generator keyed by ``seed``."""

        return init_projector(self.backbone, seed)

    def attach_evaluator(
        self, dataset_path: str, threads: int, batch_size: int, max_new_tokens: int
    ) -> None:
        """Hold an :class:`fedsim.evaluator.Evaluator` in this process too
        (``ray.evaluator_on_worker``): its own copy of the backbone, its own thread count.

        The process's torch thread count is the training one between evaluations, so the
        client tasks run exactly as on a worker without it.
        """
        from fedsim.evaluator import Evaluator

        try:
            self.evaluator = Evaluator(
                self.spec, dataset_path, threads, batch_size, max_new_tokens
            )
            self.eval_threads = threads
        finally:
            torch.set_num_threads(self.threads)

    def _evaluating(self, method: str, *args: Any) -> Any:
        """``self.evaluator.<method>(*args)`` on the evaluation's threads."""
        if self.evaluator is None:
            raise RuntimeError("BackboneWorker: no Evaluator attached")
        torch.set_num_threads(self.eval_threads)
        try:
            return getattr(self.evaluator, method)(*args)
        finally:
            torch.set_num_threads(self.threads)

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The attached Evaluator's :meth:`~fedsim.evaluator.Evaluator.evaluate`."""
        return self._evaluating("evaluate", weights)

    def answer_benchmark(
        self, weights: Mapping[str, torch.Tensor], bench: str, root: str
    ) -> list[str]:
        """The attached Evaluator's :meth:`~fedsim.evaluator.Evaluator.answer_benchmark`."""
        return self._evaluating("answer_benchmark", weights, bench, root)

    def train(
        self,
        tasks: list[ClientTask],
        payload: Mapping[str, torch.Tensor],
        algorithm: str,
        params: Mapping[str, Any],
        settings: TrainSettings,
        *starts: Mapping[str, torch.Tensor],
    ) -> list[ClientResult]:
        """Train a cohort of clients of one round together (``starts[k]``: client k's W)."""
        mark("first_task")
        key = (algorithm, repr(sorted(params.items())))
        if key not in self._algorithms:
            self._algorithms[key] = build_algorithm(algorithm, params)
        local = self._algorithms[key].local_training()
        return train_cohort(
            self.backbone, self.rows, tasks, starts, payload, local, settings
        )

    def train_presummed(
        self,
        tasks: list[ClientTask],
        payload: Mapping[str, torch.Tensor],
        algorithm: str,
        params: Mapping[str, Any],
        settings: TrainSettings,
        *starts: Mapping[str, torch.Tensor],
    ) -> CohortUpload:
        """Train a cohort and send back one partial sum instead of each client's Δ.

        For presummable algorithms (the FedAvg family) only: every client starts from W_t.
        Each update is validated here first (the rejected are named, never summed).
        """
        results = self.train(tasks, payload, algorithm, params, settings, *starts)
        return presum(results, starts[0], settings.max_update_norm)

    def train_secure(
        self,
        tasks: list[ClientTask],
        payload: Mapping[str, torch.Tensor],
        algorithm: str,
        params: Mapping[str, Any],
        settings: TrainSettings,
        secure: Any,
        *starts: Mapping[str, torch.Tensor],
    ) -> Any:
        """Train a cohort and send back each client's masked vector instead of its Δ.

        ``secure`` is (plan, seed, round, each client's protocol state): the worker plays the
        clients' devices (:func:`fedsim.privacy.secure.mask_group`).
        """
        from fedsim.privacy.secure import mask_group

        plan, seed, server_round, clients = secure
        results = self.train(tasks, payload, algorithm, params, settings, *starts)
        return mask_group(
            results,
            clients,
            starts[0],
            plan,
            seed,
            server_round,
            settings.max_update_norm,
        )


@dataclass(frozen=True)
class CohortUpload:
    """What a worker sends for a pre-summed cohort: per-client results without Δ, one sum."""

    results: list[ClientResult]
    partial: PartialSum | None
    rejected: list[dict[str, Any]]


def presum(
    results: Sequence[ClientResult],
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> CohortUpload:
    """Validate each client's update, pre-sum the accepted ones, strip Δ from the results."""
    accepted, rejected = [], []
    for r in sorted(results, key=lambda r: r.update.client_id):
        reason = validate_update(r.update, reference, max_norm)
        if reason is None:
            accepted.append(r.update)
        else:
            rejected.append({"client_id": r.update.client_id, "reason": reason})
    stripped = [replace(r, update=replace(r.update, delta={})) for r in results]
    return CohortUpload(stripped, partial_sum(accepted) if accepted else None, rejected)
