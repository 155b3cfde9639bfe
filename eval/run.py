"""Answer a benchmark and score it: the generation and scoring half of ``fedsim eval run``.

The command itself (a run's config, backbone and projector, the vLLM export) is the engine's:
:func:`fedsim.evaluate.evaluate_run`. For each benchmark it loads the official question file
(:mod:`fedsim.eval.suite` gives the layout), renders the prompts for the run's backbone, generates
greedily with the chosen backend, writes the answers in LLaVA's answer-file format
(``RUN_DIR/eval/<bench>/answers.jsonl``; MME also as filled official sheets), scores them with
the benchmark's official rules and writes ``scores.json``. Everything a score depends on is
stored beside it: the projector file and its SHA-256, the backend, the number of questions, a
question limit when one was set, and the judge model for judged benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.eval import suite
from fedsim.eval.answers import write_answers
from fedsim.eval.benchmark import BenchmarkError, Question
from fedsim.eval.mme import COGNITION as MME_COGNITION

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
