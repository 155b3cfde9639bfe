"""Evaluation as the engine runs it: the toy suite at the end of a run, and ``fedsim eval run``.

:func:`toy_benchmarks` has the run's Evaluator actor answer the toy suite with the final
projector; :func:`evaluate_run` answers any benchmark with a finished run's projector (HF
generate or vLLM). Both score by the benchmarks' official rules and write answers and scores
where ``fedsim eval score`` reads them (:mod:`fedsim.eval.run`: generation and scoring proper).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedsim.config import Config, is_toy, load_config
from fedsim.eval import suite
from fedsim.eval.benchmark import BenchmarkError
from fedsim.eval.generation import HFBackend, VLLMBackend
from fedsim.eval.run import (
    BACKENDS,
    Progress,
    benchmark_names,
    generate_answers,
    save_and_score,
)
from fedsim.eval.toy_suite import TOY_MATCHING, ensure_toy_suite
from fedsim.export import ExportError, check_fits, export_checkpoint, run_projector
from fedsim.models.backbone import set_projector_
from fedsim.models.spec import load_model, resolve_backbone
from fedsim.prepare import cache_root
from fedsim.runio import weights_digest


def toy_benchmarks(
    cfg: Config, evaluator: Any, weights: dict[str, torch.Tensor], out_dir: Path
) -> dict[str, dict[str, Any]]:
    """The toy suite's benchmarks, answered by the Evaluator, scored by the official rules.

    Answers and scores land in ``out_dir/eval/<bench>/`` as ``fedsim eval run`` writes them.
    """
    import ray

    if not cfg.eval.benchmarks or not is_toy(cfg.model.backbone):
        return {}
    root = ensure_toy_suite(
        cache_root(cfg), cfg.data.scene, images=cfg.eval.suite_images
    )
    ref = ray.put(weights)
    names = [suite.canonical(b) for b in cfg.eval.benchmarks]
    pending = {b: evaluator.answer_benchmark.remote(ref, b, str(root)) for b in names}
    prompts = _ToyPrompts()
    results: dict[str, dict[str, Any]] = {}
    for b in names:
        questions = suite.get(b).load(*suite.locate(b, root))
        results[b] = save_and_score(
            b,
            questions,
            ray.get(pending[b]),
            [suite.render_prompt(prompts, b, q) for q in questions],
            out_dir / "eval" / b,
            f"fedsim-{cfg.algorithm.name}-seed{cfg.seed}",
            {
                "backend": "hf",
                "data": str(root),
                "round": cfg.rounds,
                "projector_digest": weights_digest(weights),
            },
            matching=TOY_MATCHING,
        )
    return results


class _ToyPrompts:
    """The toy backbone's templates, to record prompts in answer files without loading it."""

    def __init__(self) -> None:
        # Not from models.toy: it loads transformers' model classes (and torch._dynamo with
        # them, ~65 MB), which a run's driver never needs.
        from fedsim.models.toy_prompts import CAPTION_PROMPT, IMAGE_TOKEN, QA_PROMPT

        self.manifest = {"kind": "toy"}
        self.caption_prompt = f"{IMAGE_TOKEN} {CAPTION_PROMPT}"
        self.qa_prompt = f"{IMAGE_TOKEN} {QA_PROMPT}"


def check_request(
    run_dir: Path,
    benchmarks: Sequence[str],
    backend: str = "hf",
    limit: int | None = None,
    judge: Any = None,
    projector: Path | None = None,
    client: int | None = None,
) -> tuple[list[str], dict[str, torch.Tensor], Path]:
    """Check an ``eval run`` request without loading the backbone or reading benchmark data.

    Benchmark names, backend, limit and judge first; then the projector file: it must be
    safetensors and fit the run's backbone (shapes read from the backbone's config files).
    Returns the canonical benchmark names and the projector weights with their file.
    """
    names = benchmark_names(benchmarks)
    if backend not in BACKENDS:
        raise BenchmarkError(
            f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if limit is not None and limit <= 0:
        raise BenchmarkError(f"--limit: must be > 0, got {limit}")
    for b in names:
        if suite.get(b).judged and judge is None:
            raise BenchmarkError(
                f"{b}: needs an LLM judge: give --judge-url and --judge-model "
                "(any OpenAI-compatible endpoint); the other benchmarks run without one"
            )
    weights, source = run_projector(Path(run_dir), projector, client)
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    try:
        check_fits(weights, source, resolve_backbone(cfg))
    except ExportError as e:
        raise BenchmarkError(str(e)) from None
    return names, weights, source


def evaluate_run(
    run_dir: Path,
    benchmarks: Sequence[str],
    data_root: Path,
    *,
    backend: str = "hf",
    projector: Path | None = None,
    client: int | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    judge: Any = None,
    progress: Progress | None = None,
    vllm_args: dict[str, Any] | None = None,
    matching: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Answer and score ``benchmarks`` with the run's projector; returns bench → scores."""
    run_dir = Path(run_dir)
    # Every input is checked before any generation starts, and before the backbone loads.
    names, weights, source = check_request(
        run_dir, benchmarks, backend, limit, judge, projector, client
    )
    located = {b: suite.locate(b, data_root) for b in names}
    cfg = load_config(str(run_dir / "config.yaml"))
    backbone = load_model(resolve_backbone(cfg), torch.get_num_threads())
    set_projector_(backbone, weights)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if backend == "hf":
        engine: Any = HFBackend(backbone, batch_size)
    elif backend == "vllm":
        tmp = tempfile.TemporaryDirectory(prefix="fedsim-vllm-")
        ckpt = export_checkpoint(
            run_dir, Path(tmp.name) / "ckpt", projector=projector, client=client
        )
        engine = VLLMBackend(
            str(ckpt),
            dtype=cfg.model.dtype,
            **{**cfg.eval.vllm_args, **(vllm_args or {})},
        )
    else:
        raise BenchmarkError(f"--backend: {backend!r} is not one of hf, vllm")
    # The tensors' digest, not the file's: safetensors headers differ between equal weights.
    digest = weights_digest(weights)
    results: dict[str, dict[str, Any]] = {}
    try:
        for b in names:
            benchmark = suite.get(b)
            qpath, images = located[b]
            questions = benchmark.load(qpath, images)
            if limit is not None:
                questions = questions[:limit]
            answers = generate_answers(
                engine, backbone, b, questions, batch_size, progress
            )
            results[b] = save_and_score(
                b,
                questions,
                answers,
                [suite.render_prompt(backbone, b, q) for q in questions],
                run_dir / "eval" / b,
                f"fedsim-{cfg.algorithm.name}-seed{cfg.seed}",
                {
                    "limit": limit,
                    "backend": backend,
                    "projector_file": str(source),
                    "projector_digest": digest,
                    "data": str(qpath),
                },
                judge,
                matching,
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results
