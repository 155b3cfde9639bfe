"""SEED-Bench: benchmarking multimodal LLMs with generative comprehension (Li et al., 2023,
arXiv:2307.16125).

``SEED-Bench.json`` (AILab-CVC/SEED-Bench): ``{"question_type": {name: id}, "questions":
[...]}``, each question with ``question_id``, ``question``, ``choice_a`` … ``choice_d``,
``answer`` (a letter), ``data_id``, ``data_type`` and ``question_type_id``. Only the image
questions (``data_type == "image"``, evaluation dimensions 1-9) are loaded, as LLaVA-1.5
reports; the image is ``data_root/<data_id>`` (LLaVA's ``seed_bench/SEED-Bench-image``).

Prompt (LLaVA-1.5, ``scripts/v1_5/eval/seed.sh`` and its ``llava-seed-bench.jsonl``): the
question, the four options as ``\\nA. <choice_a>`` … ``\\nD. <choice_d>``, then ``\\n`` and
:data:`~fedsim.eval.benchmark.OPTION_LETTER`. Generation length: ``model_vqa_loader.py``'s
default, 128.

Scoring is LLaVA's ``scripts/convert_seed_for_submission.py`` (the official SEED-Bench
``eval.py`` ranks option likelihoods instead, which a generated answer has not): an answer
is right only when its text equals the answer letter exactly, so ``"A."`` or ``"(A)"`` is
wrong (LLaVA's generation strips whitespace before this comparison, and so does fedsim's).
Accuracy per question type and overall, both over questions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    OPTION_LETTER,
    BenchmarkError,
    Question,
    check_answered,
)

_FIELDS = ("question_id", "question", "answer", "data_id", "question_type_id")
_CHOICES = (("A", "choice_a"), ("B", "choice_b"), ("C", "choice_c"), ("D", "choice_d"))


def _question_id(raw: object) -> int | str:
    """The id as LLaVA's question file has it: an int when the string is one."""
    try:
        return int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(raw)


class SeedBench:
    """SEED-Bench (v1), image questions."""

    name = "seed"
    judged = False
    max_new_tokens = 128

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Image questions from ``SEED-Bench.json``; ``data_root`` holds the images."""
        path = Path(questions)
        if not path.is_file():
            raise BenchmarkError(f"{path}: SEED-Bench JSON not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise BenchmarkError(f"{path}: expected an object with a 'questions' list")
        types = data.get("question_type")
        if not isinstance(types, dict):
            raise BenchmarkError(f"{path}: field 'question_type' (name → id) missing")
        type_names = {int(i): name for name, i in types.items()}
        out = []
        seen: set[int | str] = set()
        for n, rec in enumerate(data["questions"]):
            where = f"{path}: questions[{n}]"
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{where}: not an object")
            if rec.get("data_type") != "image":
                continue  # video questions (dimensions 10-12)
            for key in _FIELDS + tuple(c for _, c in _CHOICES):
                if key not in rec:
                    raise BenchmarkError(f"{where}: field {key!r} missing")
            if rec["answer"] not in ("A", "B", "C", "D"):
                raise BenchmarkError(
                    f"{where}: field 'answer' is {rec['answer']!r}, not A-D"
                )
            type_id = rec["question_type_id"]
            if type_id not in type_names:
                raise BenchmarkError(
                    f"{where}: question_type_id {type_id!r} not in 'question_type'"
                )
            qid = _question_id(rec["question_id"])
            if qid in seen:
                raise BenchmarkError(f"{where}: question_id {qid!r} repeated")
            seen.add(qid)
            text = rec["question"]
            for letter, key in _CHOICES:
                text += f"\n{letter}. {rec[key]}"
            image = str(rec["data_id"])
            out.append(
                Question(
                    question_id=qid,
                    image=str(Path(data_root) / image) if data_root else image,
                    text=f"{text}\n{OPTION_LETTER}",
                    meta={
                        "answer": rec["answer"],
                        "question_type_id": type_id,
                        "question_type": type_names[type_id],
                    },
                )
            )
        if not out:
            raise BenchmarkError(f"{path}: no image questions")
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """Exact-letter accuracy overall and per question type (by name, in id order)."""
        check_answered(self.name, questions, predictions)
        counts: dict[int, list[int]] = {}  # type id → [right, total]
        names: dict[int, str] = {}
        for q in questions:
            t = q.meta["question_type_id"]
            names[t] = q.meta["question_type"]
            c = counts.setdefault(t, [0, 0])
            c[0] += predictions[q.question_id] == q.meta["answer"]
            c[1] += 1
        right = sum(c[0] for c in counts.values())
        return {
            "accuracy": right / len(questions),
            "question_types": {
                names[t]: counts[t][0] / counts[t][1] for t in sorted(counts)
            },
        }

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """A LLaVA answer file; string ids that are integers become ints, as LLaVA's
        converter tries ``int(question_id)``."""
        return {_question_id(k): v for k, v in read_answers(path).items()}


BENCHMARK = SeedBench()
