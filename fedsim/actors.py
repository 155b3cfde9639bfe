"""Ray actors: BackboneWorker (resident frozen backbone), Aggregator (server half), Evaluator.

The classes are plain Python; the driver turns them into actors at run time with
``ray.remote(num_cpus=..., num_gpus=...)(cls)`` from the config (so tests can also call them
directly). Each actor loads what it needs once in ``__init__`` and never per client.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import (
    ClientUpdate,
    PartialSum,
    Weights,
    check_same_keys,
    combine_partial_sums,
    global_norm,
    partial_sum,
)
from fedsim.algorithms.diagnostics import round_diagnostics, step_diagnostics, step_of
from fedsim.training import ClientResult, ClientTask, TrainSettings, train_cohort


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def node_id() -> str:
    """The Ray node this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


@dataclass(frozen=True)
class ModelSpec:
    """How a worker finds and places the backbone (paths resolved by the driver)."""

    backbone_path: str
    lm_path: str | None
    projector: str
    dtype: str
    device: str


def _load(spec: ModelSpec, threads: int) -> Any:
    from fedsim.models.backbone import load_backbone

    torch.set_num_threads(threads)
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_backbone(
        spec.backbone_path,
        lm=spec.lm_path,
        projector=spec.projector,
        device=device,
        dtype=getattr(torch, spec.dtype),
    )


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
        _quiet()
        from fedsim.data.rows import RowReader

        self.backbone = _load(spec, threads)
        self.rows = RowReader.open(dataset_path, pixel_path, bad_images, feature_path)
        self._algorithms: dict[tuple[str, str], Any] = {}

    def ready(self) -> dict[str, float]:
        return {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()

    def init_projector(self, seed: int) -> Weights:
        """Fresh projector weights W_0 drawn from a generator keyed by ``seed``."""
        from fedsim.models.backbone import init_projector

        return init_projector(self.backbone, seed)

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


def validate_update(
    update: ClientUpdate,
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` must be rejected (wrong keys/shapes, NaN/Inf, no samples, ‖Δ‖₂ above
    ``max_norm``), or None."""
    try:
        check_same_keys(reference, update.delta, f"client {update.client_id}")
    except ValueError as e:
        return str(e)
    for k, v in update.delta.items():
        if not torch.isfinite(v).all():
            return f"client {update.client_id}: non-finite values (NaN/Inf) in {k}"
    for k, v in update.extras.items():
        if not torch.isfinite(v).all():
            return (
                f"client {update.client_id}: non-finite values (NaN/Inf) in extras {k}"
            )
    if update.num_samples <= 0:
        return f"client {update.client_id}: no samples"
    if max_norm is not None:
        norm = global_norm(update.delta)
        if norm > max_norm:
            return (
                f"client {update.client_id}: update norm {norm:.4g} exceeds "
                f"validation.max_update_norm {max_norm:g}"
            )
    return None


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


# Server-state keys that hold the previous global step (diagnostics), not the algorithm's state.
_PREVIOUS = "diagnostics/previous_step/"


class Aggregator:
    """Runs the algorithm's server half over each round's updates; keeps its server state."""

    def __init__(
        self,
        algorithm: str,
        params: Mapping[str, Any],
        weights: Weights,
        num_clients: int | None = None,
    ) -> None:
        self.reset(algorithm, params, weights, num_clients)

    def reset(
        self,
        algorithm: str,
        params: Mapping[str, Any],
        weights: Weights,
        num_clients: int | None = None,
        max_norm: float | None = None,
        on_reject: str = "continue",
        diagnostics: bool = False,
    ) -> None:
        """Start over for a new run: a fresh algorithm instance and its initial server state."""
        self.algorithm = build_algorithm(algorithm, params)
        self.state = self.algorithm.init_state(weights, num_clients)
        self.max_norm = max_norm
        self.on_reject = on_reject
        self.diagnostics = diagnostics
        # ΔW_{t−1} for the oscillation diagnostic; saved with the server state so that a resumed
        # run reports the same values.
        self.previous_step: Weights | None = None

    def _policy(
        self, weights: Weights, rejected: Sequence[dict[str, Any]], any_accepted: bool
    ) -> dict[str, Any] | None:
        """The round's metrics when it must not aggregate (nothing accepted, or skip_round)."""
        metrics: dict[str, Any] = {
            "rejected": sorted(rejected, key=lambda r: r["client_id"])
        }
        if not any_accepted:
            metrics["update_norm"] = 0.0
            metrics["action"] = "no accepted update: W_t kept"
            return metrics
        if rejected and self.on_reject == "skip_round":
            metrics["update_norm"] = 0.0
            metrics["action"] = "skip_round: W_t and server state kept"
            return metrics
        return None

    def payload(self) -> Weights:
        return self.algorithm.server_payload(self.state)

    def server_state(self) -> Weights:
        """The algorithm's server state (momentum, bases, ...), saved with the run.

        With diagnostics on, the previous global step rides along under ``diagnostics/``.
        """
        out = {k: v.contiguous() for k, v in self.state.items()}
        if self.previous_step is not None:
            out.update(
                {_PREVIOUS + k: v.contiguous() for k, v in self.previous_step.items()}
            )
        return out

    def load_state(self, state: Weights) -> None:
        """Continue from a checkpoint's server state (after :meth:`reset`)."""
        self.state = {
            k: v.clone() for k, v in state.items() if not k.startswith(_PREVIOUS)
        }
        previous = {
            k[len(_PREVIOUS) :]: v.clone()
            for k, v in state.items()
            if k.startswith(_PREVIOUS)
        }
        self.previous_step = previous or None

    def _diagnose(
        self,
        weights: Weights,
        new: Weights,
        updates: Sequence[ClientUpdate] | None,
        metrics: dict[str, Any],
    ) -> None:
        """Add ``metrics["diagnostics"]`` (when on) and remember this round's global step."""
        if not self.diagnostics:
            return
        step = step_of(new, weights)
        if updates:
            metrics["diagnostics"] = round_diagnostics(
                updates, step, self.previous_step
            )
        elif self.previous_step is not None:
            # Pre-summed rounds: only the global step is seen, not the clients'.
            metrics["diagnostics"] = step_diagnostics(step, self.previous_step)
        self.previous_step = step

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], server_round: int
    ) -> tuple[Weights, dict[str, Any]]:
        """Validate, sort by client id, aggregate. Rejected updates are reported, never averaged."""
        accepted, rejected = [], []
        for u in sorted(updates, key=lambda u: u.client_id):
            reason = validate_update(u, weights, self.max_norm)
            if reason is None:
                accepted.append(u)
            else:
                rejected.append({"client_id": u.client_id, "reason": reason})
        stop = self._policy(weights, rejected, bool(accepted))
        if stop is not None:
            return dict(weights), stop
        metrics: dict[str, Any] = {"rejected": rejected}
        result = self.algorithm.aggregate(weights, accepted, self.state, server_round)
        self.state = result.state
        metrics.update(result.metrics)
        metrics.setdefault(
            "update_norm",
            global_norm({k: result.weights[k] - weights[k] for k in weights}),
        )
        self._diagnose(weights, result.weights, accepted, metrics)
        return result.weights, metrics

    def aggregate_partials(
        self,
        weights: Weights,
        parts: Sequence[PartialSum],
        rejected: Sequence[dict[str, Any]],
        server_round: int,
    ) -> tuple[Weights, dict[str, Any]]:
        """The server half over pre-summed groups (presummable algorithms only)."""
        stop = self._policy(weights, rejected, bool(parts))
        if stop is not None:
            return dict(weights), stop
        metrics: dict[str, Any] = {
            "rejected": sorted(rejected, key=lambda r: r["client_id"])
        }
        update = combine_partial_sums(parts)
        reason = validate_update(update, weights)
        if reason is not None:  # cannot happen for validated, finite parts
            raise ValueError(f"round {server_round}: combined partial sums: {reason}")
        result = self.algorithm.aggregate(weights, [update], self.state, server_round)
        self.state = result.state
        metrics.update(result.metrics)
        metrics.setdefault(
            "update_norm",
            global_norm({k: result.weights[k] - weights[k] for k in weights}),
        )
        self._diagnose(weights, result.weights, None, metrics)
        return result.weights, metrics

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()


def _answer_benchmark(backend: Any, backbone: Any, bench: str, root: str) -> list[str]:
    """Greedy answers from ``backend`` (projector already in place) to benchmark
    ``bench`` of the suite at ``root``, ``backend.batch_size`` questions at a time."""
    from pathlib import Path

    from fedsim.eval.run import generate_answers
    from fedsim.eval.suite import get, locate

    questions = get(bench).load(*locate(bench, Path(root)))
    return generate_answers(backend, backbone, bench, questions, backend.batch_size)


class Evaluator:
    """Holds a backbone for generation and the held-out scenes; scores any projector it is sent."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset_path: str,
        threads: int,
        batch_size: int,
        max_new_tokens: int,
    ) -> None:
        _quiet()
        import datasets

        from fedsim.data.collate import pixel_values
        from fedsim.eval.generation import HFBackend

        self.backbone = _load(spec, threads)
        # The held-out scenes, decoded and processed once (not at every evaluation) when
        # their pixels stay small; the same tensors the image processor gives per call.
        self.rows = datasets.load_from_disk(dataset_path)[:]
        first = pixel_values(self.backbone, self.rows["image"][:1])
        small = (
            first.numel() * first.element_size() * len(self.rows["image"])
            <= 256 * 2**20
        )
        self.pixels = pixel_values(self.backbone, self.rows["image"]) if small else None
        self.backend = HFBackend(self.backbone, batch_size)
        self.max_new_tokens = max_new_tokens

    def init_projector(self, seed: int) -> Weights:
        """W_0 for ``seed``, the same as a BackboneWorker draws (for runs without workers)."""
        from fedsim.models.backbone import init_projector

        return init_projector(self.backbone, seed)

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from fedsim.eval.toy import evaluate_toy
        from fedsim.models.backbone import set_projector_

        set_projector_(self.backbone, weights)
        return evaluate_toy(
            self.backend,
            self.rows,
            self.backbone.caption_prompt,
            self.backbone.qa_prompt,
            self.max_new_tokens,
            self.pixels,
        )

    def answer_benchmark(
        self, weights: Mapping[str, torch.Tensor], bench: str, root: str
    ) -> list[str]:
        """Greedy answers of ``weights`` to benchmark ``bench`` of the suite at ``root``."""
        from fedsim.models.backbone import set_projector_

        set_projector_(self.backbone, weights)
        return _answer_benchmark(self.backend, self.backbone, bench, root)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()


class VLLMEvaluator:
    """The Evaluator with a vLLM engine (``eval.backend: vllm``).

    The backbone is written once as a LLaVA checkpoint (:func:`fedsim.export.write_checkpoint`)
    and served by one vLLM engine for the whole run; every projector the driver sends is swapped
    into the live engine (:meth:`fedsim.eval.generation.VLLMBackend.load_projector`, which checks
    that it took effect). The transformers model is dropped after the export: only the projector
    module (to draw W_0) and the prompt templates stay.
    """

    def __init__(
        self,
        spec: ModelSpec,
        dataset_path: str,
        threads: int,
        batch_size: int,
        max_new_tokens: int,
        engine_args: Mapping[str, Any],
    ) -> None:
        _quiet()
        import copy
        import tempfile
        from pathlib import Path
        from types import SimpleNamespace

        import datasets

        from fedsim.eval.generation import VLLMBackend
        from fedsim.export import write_checkpoint

        cpu = ModelSpec(
            spec.backbone_path, spec.lm_path, spec.projector, spec.dtype, "cpu"
        )
        backbone = _load(cpu, threads)
        self._dir = tempfile.TemporaryDirectory(prefix="fedsim-vllm-")
        ckpt = write_checkpoint(
            backbone, Path(self._dir.name) / "ckpt", {"purpose": "vLLM evaluator"}
        )
        # What the prompts and W_0 need, without the transformers model.
        self.backbone = SimpleNamespace(
            projector=copy.deepcopy(backbone.projector),
            manifest=dict(backbone.manifest),
            caption_prompt=backbone.caption_prompt,
            qa_prompt=backbone.qa_prompt,
        )
        del backbone
        self.backend = VLLMBackend(str(ckpt), dtype=spec.dtype, **dict(engine_args))
        self.backend.batch_size = batch_size
        self.rows = datasets.load_from_disk(dataset_path)[:]
        self.max_new_tokens = max_new_tokens

    def init_projector(self, seed: int) -> Weights:
        from fedsim.models.backbone import init_projector

        return init_projector(self.backbone, seed)  # type: ignore[arg-type]

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from fedsim.eval.toy import evaluate_toy

        self.backend.load_projector(weights)
        return evaluate_toy(
            self.backend,
            self.rows,
            self.backbone.caption_prompt,
            self.backbone.qa_prompt,
            self.max_new_tokens,
        )

    def answer_benchmark(
        self, weights: Mapping[str, torch.Tensor], bench: str, root: str
    ) -> list[str]:
        self.backend.load_projector(weights)
        return _answer_benchmark(self.backend, self.backbone, bench, root)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()
