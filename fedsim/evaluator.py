"""The Evaluator actors: the held-out toy evaluation and benchmark answers during a run, with
transformers (:class:`Evaluator`) or vLLM (:class:`VLLMEvaluator`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsim.algorithms.base import (
    Weights,
)
from fedsim.data.collate import pixel_values
from fedsim.data.images import decode_image
from fedsim.data.rows import read_saved_table
from fedsim.eval.generation import HFBackend, VLLMBackend
from fedsim.eval.run import generate_answers
from fedsim.eval.suite import get, locate
from fedsim.eval.toy import evaluate_toy
from fedsim.export import write_checkpoint
from fedsim.machine import node_id, peak_rss_mb
from fedsim.models.backbone import init_projector, set_projector_
from fedsim.models.spec import ModelSpec, load_model, quiet_hf


def _answer_benchmark(backend: Any, backbone: Any, bench: str, root: str) -> list[str]:
    """Greedy answers from ``backend`` (projector already in place) to benchmark
    ``bench`` of the suite at ``root``, ``backend.batch_size`` questions at a time."""
    from pathlib import Path

    questions = get(bench).load(*locate(bench, Path(root)))
    return generate_answers(backend, backbone, bench, questions, backend.batch_size)


def held_out_rows(dataset_path: str) -> dict[str, list[Any]]:
    """Every row of the evaluation split, column by column, images decoded — what
    ``datasets.load_from_disk(dataset_path)[:]`` gives, read with pyarrow."""
    rows = read_saved_table(dataset_path).to_pydict()
    if "image" in rows:
        rows["image"] = [decode_image(e) for e in rows["image"]]
    return rows


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
        quiet_hf()
        self.backbone = load_model(spec, threads)
        # The held-out scenes, decoded and processed once (not at every evaluation) when
        # their pixels stay small; the same tensors the image processor gives per call.
        self.rows = held_out_rows(dataset_path)
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

        return init_projector(self.backbone, seed)

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:

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
        quiet_hf()
        import copy
        import tempfile
        from pathlib import Path
        from types import SimpleNamespace

        cpu = ModelSpec(
            spec.backbone_path, spec.lm_path, spec.projector, spec.dtype, "cpu"
        )
        backbone = load_model(cpu, threads)
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
        self.rows = held_out_rows(dataset_path)
        self.max_new_tokens = max_new_tokens

    def init_projector(self, seed: int) -> Weights:

        return init_projector(self.backbone, seed)  # type: ignore[arg-type]

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:

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
