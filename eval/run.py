"""``fedsim eval run``: generate a run's benchmark answers and score them.

For each benchmark: load the official question file (:mod:`fedsim.eval.suite` gives the layout),
render the prompts for the run's backbone, generate greedily with the chosen backend, write the
answers in LLaVA's answer-file format (``RUN_DIR/eval/<bench>/answers.jsonl``; MME also as filled
official sheets), score them with the benchmark's official rules and write ``scores.json``.
Everything a score depends on is stored beside it: the projector file and its SHA-256, the
backend, the number of questions, a question limit when one was set, and the judge model for
judged benchmarks.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsim.eval import suite
from fedsim.eval.answers import write_answers
from fedsim.eval.benchmark import BenchmarkError, Question
from fedsim.eval.mme import COGNITION as MME_COGNITION
from fedsim.runio import weights_digest

Progress = Callable[[str, int, int], None]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


# The toy LM's answers are a caption (at most 9 words) or yes/no: the official budgets (128,
# 1024 tokens) would only let a batch run on past its end.
TOY_MAX_NEW_TOKENS = 12


def max_new_tokens(backbone: Any, bench: str) -> int:
    """The benchmark's LLaVA-1.5 generation budget (the toy LM's own for the toy backbone)."""
    if backbone.manifest.get("kind") == "toy":
        return TOY_MAX_NEW_TOKENS
    return int(suite.get(bench).max_new_tokens)


def generate_answers(
    backend: Any,
    backbone: Any,
    bench: str,
    questions: Sequence[Question],
    batch_size: int,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers of ``backend`` to ``questions``, in order."""
    out: list[str] = []
    for lo, hi in _chunks(len(questions), batch_size):
        chunk = questions[lo:hi]
        images = [suite.load_image(q.image) for q in chunk]
        prompts = [suite.render_prompt(backbone, bench, q) for q in chunk]
        out.extend(backend.generate(images, prompts, max_new_tokens(backbone, bench)))
        if progress is not None:
            progress(bench, hi, len(questions))
    return out


def save_and_score(
    bench: str,
    questions: Sequence[Question],
    answers: Sequence[str],
    prompts: Sequence[str],
    out: Path,
    model_id: str,
    meta: dict[str, Any],
    judge: Any = None,
    matching: str | None = None,
) -> dict[str, Any]:
    """Write ``answers`` (LLaVA answer file; MME also sheets), score them, write scores.json."""
    benchmark = suite.get(bench)
    write_answers(
        out / "answers.jsonl",
        ((q.question_id, p, a) for q, p, a in zip(questions, prompts, answers)),
        model_id,
    )
    predictions = {q.question_id: a for q, a in zip(questions, answers)}
    if hasattr(benchmark, "write_sheets"):
        benchmark.write_sheets(questions, predictions, out / "sheets")
    options = {"judge": judge} if benchmark.judged else {}
    if matching:  # MMBench/MMVP's rule version; the others take no such option
        options["matching"] = matching
    scores = benchmark.score(questions, predictions, **options)
    record = {
        "benchmark": suite.canonical(bench),
        "scores": scores,
        "questions": len(questions),
        **meta,
    }
    (out / "scores.json").write_text(json.dumps(record, indent=2))
    return scores


BACKENDS = ("hf", "vllm")


def benchmark_names(benchmarks: Sequence[str]) -> list[str]:
    """Canonical names of ``--benchmarks``; an unknown or empty list is an error naming it."""
    names = []
    for b in benchmarks:
        try:
            names.append(suite.canonical(b))
        except BenchmarkError as e:
            raise BenchmarkError(f"--benchmarks: {e}") from None
    if not names:
        raise BenchmarkError("--benchmarks: name at least one benchmark")
    return names


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
    from fedsim.config import load_config
    from fedsim.driver import resolve_backbone
    from fedsim.export import ExportError, check_fits, run_projector

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
    from fedsim.actors import _load
    from fedsim.config import load_config
    from fedsim.driver import resolve_backbone
    from fedsim.export import export_checkpoint
    from fedsim.models.backbone import set_projector_

    run_dir = Path(run_dir)
    # Every input is checked before any generation starts, and before the backbone loads.
    names, weights, source = check_request(
        run_dir, benchmarks, backend, limit, judge, projector, client
    )
    located = {b: suite.locate(b, data_root) for b in names}
    cfg = load_config(str(run_dir / "config.yaml"))
    backbone = _load(resolve_backbone(cfg), torch.get_num_threads())
    set_projector_(backbone, weights)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if backend == "hf":
        from fedsim.eval.generation import HFBackend

        engine: Any = HFBackend(backbone, batch_size)
    elif backend == "vllm":
        from fedsim.eval.generation import VLLMBackend

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


HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "pope": (("accuracy", "accuracy"), ("f1", "F1"), ("yes_ratio", "yes ratio")),
    "mme": (("perception", "perception"), ("cognition", "cognition")),
    "mmbench": (("overall", "circular accuracy"),),
    "seed": (("accuracy", "accuracy"),),
    "mmvp": (("pair_accuracy", "pair accuracy"), ("accuracy", "accuracy")),
    "mmvet": (("total", "total"),),
    "llava_bench": (("all", "relative score"),),
}


def headline(bench: str, scores: dict[str, Any]) -> list[tuple[str, float]]:
    """The numbers a paper's table shows for ``bench``: (label, value) pairs.

    MME's cognition is left out when no cognition subtask was scored (the toy suite has none).
    """
    b = suite.canonical(bench)
    out = []
    for key, label in HEADLINES[b]:
        if key not in scores:
            continue
        if (
            b == "mme"
            and key == "cognition"
            and not any(t in scores.get("subtasks", {}) for t in MME_COGNITION)
        ):
            continue
        out.append((label, float(scores[key])))
    return out
