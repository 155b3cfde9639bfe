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

lmms-eval's Parquet release loads too (``lmms-lab/SEED-Bench``, ``data/test-*.parquet``;
columns from ``lmms_eval/tasks/seedbench/utils.py`` and the dataset card): the JSON's
fields as columns (``question_id``, ``question``, ``choice_a`` … ``choice_d``, ``answer``,
``data_id``, ``data_type``, ``question_type_id``) and ``image``, a list of {bytes, path}
(one image for an image question, the frames for a video one). Only image rows are read
(video frames are never decoded). The release has no ``question_type`` name table;
lmms-eval reports only ``seed_image``/``seed_video``/``seed_all`` and never needs one. The
names here are :data:`QUESTION_TYPES`, SEED-Bench.json's table, fixed for v1. Scoring
stays LLaVA's exact letter (lmms-eval keeps the first character of a longer answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    OPTION_LETTER,
    BenchmarkError,
    Question,
    check_answered,
    read_text,
)

_FIELDS = ("question_id", "question", "answer", "data_id", "question_type_id")
_CHOICES = (("A", "choice_a"), ("B", "choice_b"), ("C", "choice_c"), ("D", "choice_d"))
_PARQUET_COLUMNS = (
    "question_id",
    "question",
    "answer",
    "question_type_id",
    "data_type",
    *(c for _, c in _CHOICES),
    "image",
)

#: SEED-Bench.json's ``question_type`` table (id → name), for the Parquet release, which
#: has the ids only.
QUESTION_TYPES = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}


def _question_id(raw: object) -> int | str:
    """The id as LLaVA's question file has it: an int when the string is one."""
    try:
        return int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(raw)


def _question(
    rec: Mapping[str, Any],
    where: str,
    seen: set[int | str],
    cell: str,
    type_id: Any,
    types: Mapping[int, str],
    wrong_type: str,
    image: Callable[[], str | bytes],
) -> Question:
    """One image question (JSON record or Parquet row): LLaVA's prompt and the meta.

    ``where`` opens the errors, which call a column a ``cell``; ``seen`` collects the
    ids; ``types`` names the question types, and ``wrong_type`` is the error when
    ``type_id`` is not one of them; ``image`` gives the image once the row is checked.
    """
    if rec["answer"] not in ("A", "B", "C", "D"):
        raise BenchmarkError(f"{where}: {cell} 'answer' is {rec['answer']!r}, not A-D")
    if type_id not in types:
        raise BenchmarkError(f"{where}: {wrong_type}")
    qid = _question_id(rec["question_id"])
    if qid in seen:
        raise BenchmarkError(f"{where}: question_id {qid!r} repeated")
    seen.add(qid)
    text = rec["question"]
    for letter, key in _CHOICES:
        text += f"\n{letter}. {rec[key]}"
    return Question(
        question_id=qid,
        image=image(),
        text=f"{text}\n{OPTION_LETTER}",
        meta={
            "answer": rec["answer"],
            "question_type_id": type_id,
            "question_type": types[type_id],
        },
    )


def _image_path(data_id: object, data_root: Path | None) -> str:
    """The JSON's ``data_id``, joined to ``data_root`` when there is one."""
    image = str(data_id)
    return str(Path(data_root) / image) if data_root else image


def _parquet_image(images: Any, path: Path, n: int) -> bytes:
    """The one image of a ``Sequence(Image)`` cell (an image question has exactly one)."""
    if not isinstance(images, list):
        images = [images]
    if len(images) != 1:
        raise BenchmarkError(
            f"{path}: row {n}: column 'image' holds {len(images)} images, not 1"
        )
    return parquet.image_bytes(images[0], path, n)


class SeedBench:
    """SEED-Bench (v1), image questions; official JSON or lmms-eval's Parquet."""

    name = "seed"
    judged = False
    max_new_tokens = 128

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Image questions from ``SEED-Bench.json``; ``data_root`` holds the images.

        Or from a ``.parquet`` file or a folder of ``.parquet`` shards (lmms-eval's
        release, images inside; ``data_root`` is not used).
        """
        path = Path(questions)
        shards = parquet.parquet_files(path)
        if shards:
            return self._load_parquet(shards)
        if not path.is_file():
            raise BenchmarkError(
                f"{path}: SEED-Bench JSON (or .parquet file or folder of shards) not "
                "found"
            )
        try:
            data = json.loads(read_text(path))
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
            type_id = rec["question_type_id"]
            wrong_type = f"question_type_id {type_id!r} not in 'question_type'"
            image = partial(_image_path, rec["data_id"], data_root)
            out.append(
                _question(
                    rec, where, seen, "field", type_id, type_names, wrong_type, image
                )
            )
        if not out:
            raise BenchmarkError(f"{path}: no image questions")
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        out = []
        seen: set[int | str] = set()
        rows = parquet.iter_rows(
            files, _PARQUET_COLUMNS, keep=lambda r: r["data_type"] == "image"
        )
        for path, n, row in rows:
            where = f"{path}: row {n}"
            for column in ("question", "answer", *(c for _, c in _CHOICES)):
                parquet.string(row, column, path, n)
            try:
                type_id = int(row["question_type_id"])
            except (TypeError, ValueError):
                type_id = -1
            wrong_type = (
                f"column 'question_type_id' is {row['question_type_id']!r}, not a "
                "SEED-Bench v1 type (1-12)"
            )
            image = partial(_parquet_image, row["image"], path, n)
            out.append(
                _question(
                    row,
                    where,
                    seen,
                    "column",
                    type_id,
                    QUESTION_TYPES,
                    wrong_type,
                    image,
                )
            )
        if not out:
            raise BenchmarkError(f"{files[0]}: no image questions")
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
