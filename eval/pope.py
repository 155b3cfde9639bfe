"""POPE: polling-based object probing for object hallucination (Li et al., EMNLP 2023,
arXiv:2305.10355).

Questions are "Is there a <object> in the image?" on COCO val2014 images, half with the
object present ("yes") and half absent ("no"); the absent object is drawn at random, among
the most frequent COCO objects (popular) or among objects that co-occur with the image's
(adversarial), one file per way: ``coco_pope_{random,popular,adversarial}.json``
(RUCAIBox/POPE ``output/coco/``), one JSON object a line with ``question_id``, ``image``,
``text`` and ``label``.

Prompt (LLaVA-1.5, ``scripts/v1_5/eval/pope.sh`` and its ``llava_pope_test.jsonl``): the
question, a line break, and :data:`~fedsim.eval.benchmark.SHORT_ANSWER`. Generation length:
``llava/eval/model_vqa_loader.py``'s default, 128 new tokens.

Scoring follows ``llava/eval/eval_pope.py`` (haotian-liu/LLaVA; the same rule as
RUCAIBox/POPE ``evaluate.py``) word for word: keep the text before the first ``.``, drop
commas, split on single spaces; the answer is "no" when ``"No"``, ``"not"`` or ``"no"`` is
one of the words and "yes" otherwise. The rule is case-sensitive, so ``"NO"`` reads as
"yes". Accuracy, precision, recall and F1 take "yes" as the positive class; ``yes_ratio`` is
the share of "yes" predictions. LLaVA scores each split on its own; :meth:`Pope.score`
returns the same metrics over all given questions and, when several splits are present,
per split. Where LLaVA divides by zero (no "yes" prediction: precision; precision + recall
= 0: F1), the metric is NaN.

lmms-eval's Parquet release (``lmms-lab/POPE``: ``id``, ``question_id``, ``question``,
``answer``, ``image_source``, ``image`` {bytes, path}, ``category``; lmms-eval
``lmms_eval/tasks/pope/``) loads too; its ``category`` is the split. Its own scorer is not
the official one (an exact "yes"/"no" match, and a yes ratio of the labels), so scoring
stays the rule above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    SHORT_ANSWER,
    BenchmarkError,
    Question,
    check_answered,
    open_text,
    question_id,
)

SPLITS = ("random", "popular", "adversarial")
_FILE_PREFIX = "coco_pope_"
_PARQUET_COLUMNS = ("question_id", "question", "answer", "image", "category")


def pope_answer(text: str) -> str:
    """``"yes"`` or ``"no"`` by ``eval_pope.py``'s rule.

    The text before the first ``.`` (all of it when there is none), commas removed, split on
    single spaces; ``"No"``, ``"not"`` or ``"no"`` among the words → ``"no"``.

    Examples
    --------
    >>> pope_answer("No, there is not.")
    'no'
    >>> pope_answer("NO")  # case-sensitive, as in the official script
    'yes'
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and the yes ratio.

    Parameters
    ----------
    preds, labels:
        ``"yes"``/``"no"`` per question; as in ``eval_pope.py`` a label other than ``"no"``
        counts as yes.
    """
    n = len(preds)
    if n == 0 or n != len(labels):
        raise BenchmarkError(f"pope: {n} predictions for {len(labels)} labels")
    tp = sum(p == "yes" and g != "no" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = n - tp - fp - tn
    # eval_pope.py raises ZeroDivisionError here; NaN keeps the other metrics readable.
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision + recall > 0  # False for NaN too
        else math.nan
    )
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


class Pope:
    """POPE (COCO): the three official question files, or lmms-eval's Parquet release."""

    name = "pope"
    judged = False
    max_new_tokens = 128

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from a ``coco_pope_*.json`` file, a folder of them, or Parquet.

        Parameters
        ----------
        questions:
            One JSON-lines file (question ids kept as they are), a folder holding
            ``coco_pope_{random,popular,adversarial}.json`` (ids become
            ``"<split>/<question_id>"``: each file numbers its questions from 1), a
            ``.parquet`` file, or a folder of ``.parquet`` shards (ids
            ``"<category>/<question_id>"``).
        data_root:
            The COCO val2014 image folder; image file names are joined to it.
        """
        path = Path(questions)
        if path.is_dir():
            files = [path / f"{_FILE_PREFIX}{s}.json" for s in SPLITS]
            files = [f for f in files if f.is_file()]
            if files:
                out: list[Question] = []
                for f in files:
                    out += self._load_json(f, data_root, prefix=True)
                return out
            shards = parquet.parquet_files(path)
            if shards:
                return [q for s in shards for q in self._load_parquet(s)]
            raise BenchmarkError(
                f"{path}: no coco_pope_{{random,popular,adversarial}}.json or .parquet "
                "files in this folder"
            )
        if not path.is_file():
            raise BenchmarkError(f"{path}: POPE question file not found")
        if path.suffix == ".parquet":
            return self._load_parquet(path)
        return self._load_json(path, data_root, prefix=False)

    def _load_json(
        self, path: Path, data_root: Path | None, prefix: bool
    ) -> list[Question]:
        stem = path.stem
        split = stem[len(_FILE_PREFIX) :] if stem.startswith(_FILE_PREFIX) else stem
        out = []
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise BenchmarkError(f"{path}:{n}: not a JSON object")
                for key in ("question_id", "image", "text", "label"):
                    if key not in rec:
                        raise BenchmarkError(f"{path}:{n}: field {key!r} missing")
                label = rec["label"]
                if label not in ("yes", "no"):
                    raise BenchmarkError(
                        f"{path}:{n}: field 'label' is {label!r}, not 'yes' or 'no'"
                    )
                image = str(rec["image"])
                qid = question_id(rec["question_id"], f"{path}:{n}")
                out.append(
                    _question(
                        f"{split}/{qid}" if prefix else qid,
                        str(Path(data_root) / image) if data_root else image,
                        rec["text"],
                        label,
                        split,
                        {"image_name": image},
                    )
                )
        _check_unique(out, path)
        return out

    def _load_parquet(self, path: Path) -> list[Question]:
        out = []
        for _, n, row in parquet.iter_rows([path], _PARQUET_COLUMNS):
            label = str(row["answer"]).strip().lower()
            if label not in ("yes", "no"):
                raise BenchmarkError(
                    f"{path}: row {n}: column 'answer' is {row['answer']!r}, "
                    "not yes or no"
                )
            image = parquet.image_bytes(row["image"], path, n)
            split = str(row["category"])
            qid = f"{split}/{row['question_id']}"
            out.append(_question(qid, image, row["question"], label, split))
        _check_unique(out, path)
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """Accuracy, precision, recall, F1 and yes ratio; per split too when several.

        Every question needs a prediction (a missing one is an error, not a guess);
        predictions for other ids are ignored.
        """
        check_answered(self.name, questions, predictions)
        preds = [pope_answer(predictions[q.question_id]) for q in questions]
        labels = [q.meta["label"] for q in questions]
        out: dict[str, Any] = binary_metrics(preds, labels)
        splits = list(dict.fromkeys(q.meta["split"] for q in questions))
        if len(splits) > 1:
            out["splits"] = {
                s: binary_metrics(
                    [p for p, q in zip(preds, questions) if q.meta["split"] == s],
                    [g for g, q in zip(labels, questions) if q.meta["split"] == s],
                )
                for s in splits
            }
        return out

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """A LLaVA answer file (``question_id``, ``text`` a line)."""
        return read_answers(path)


def _question(
    qid: int | str,
    image: str | bytes,
    question: str,
    label: str,
    split: str,
    meta: Mapping[str, Any] | None = None,
) -> Question:
    """Question ``qid``: the question and LLaVA's short-answer instruction; ``meta``
    adds to the label and split."""
    return Question(
        question_id=qid,
        image=image,
        text=f"{question}\n{SHORT_ANSWER}",
        meta={"label": label, "split": split, **(meta or {})},
    )


def _check_unique(questions: Sequence[Question], path: Path) -> None:
    seen: set[int | str] = set()
    for q in questions:
        if q.question_id in seen:
            raise BenchmarkError(f"{path}: question_id {q.question_id!r} repeated")
        seen.add(q.question_id)


BENCHMARK = Pope()
