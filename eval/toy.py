"""Toy evaluation on held-out synthetic scenes.

Two tasks, both generated (greedy) and parsed from text, as benchmark answers are:

* caption attribute accuracy: the caption generated for the image is parsed into count, size,
  colour, shape and position; each attribute is right when it equals the scene's; ``attr_mean`` is
  the mean over the five, ``caption_exact`` the share of captions equal to the reference.
* yes/no accuracy (POPE-style): the scene's balanced question; the answer is read with POPE's
  rule (first sentence, commas dropped, split on spaces; "No", "not" or "no" among the words means
  no, anything else yes). Accuracy, F1 with yes as positive, and the yes ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsim.data.synthetic import (
    COLOURS,
    COUNT_WORDS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
)
from fedsim.eval.generation import GenerationBackend, HFBackend
from fedsim.models.backbone import Backbone

ATTRIBUTES = ("count", "size", "colour", "shape", "position")
_COUNT_BY_WORD = {w: n for n, w in COUNT_WORDS.items()}
_SHAPE_BY_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def parse_caption(text: str) -> dict[str, object]:
    """Attributes named in a caption; an attribute not found (or named twice, differently) is None.

    ``"two small red triangles at the top left"`` → count 2, size small, colour red, shape
    triangle, position "top left". Word order is not scored: the count word opens the caption,
    or follows its position when the caption opens with it (``"at the top left two small red
    triangles"``, the silo styles of ``fedsim.data.synthetic.CAPTION_STYLES``); the other
    attributes are read wherever they stand.
    """
    words = text.lower().replace(",", " ").replace(".", " ").split()
    # "at the <pos1> <pos2> <count> ...": the styles that open with the position.
    lead = 4 if words[:2] == ["at", "the"] and len(words) > 4 else 0

    def unique(values: list[object]) -> object:
        return values[0] if len(set(values)) == 1 else None

    out: dict[str, object] = {
        "count": _COUNT_BY_WORD.get(words[lead]) if words else None,
        "size": unique([w for w in words if w in SIZES]),
        "colour": unique([w for w in words if w in COLOURS]),
        "shape": unique([_SHAPE_BY_WORD[w] for w in words if w in _SHAPE_BY_WORD]),
        "position": None,
    }
    for i in range(len(words) - 1):
        pair = f"{words[i]} {words[i + 1]}"
        if pair in POSITIONS:
            out["position"] = pair if out["position"] in (None, pair) else None
            break
    return out


def pope_answer(text: str) -> str:
    """POPE's evaluate.py rule: ``"no"`` if No/not/no is a word of the first sentence, else ``"yes"``."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def caption_scores(
    predictions: Sequence[str], references: Sequence[dict[str, object]]
) -> dict[str, float]:
    """Per-attribute accuracy, their mean, and exact-caption rate."""
    n = len(predictions)
    if n == 0 or n != len(references):
        raise ValueError(
            f"caption_scores: {n} predictions for {len(references)} references"
        )
    hits = dict.fromkeys(ATTRIBUTES, 0)
    exact = 0
    for pred, ref in zip(predictions, references):
        parsed = parse_caption(pred)
        for a in ATTRIBUTES:
            hits[a] += parsed[a] == ref[a]
        exact += pred.strip() == ref["caption"]
    scores = {f"attr_{a}": hits[a] / n for a in ATTRIBUTES}
    scores["attr_mean"] = sum(scores[f"attr_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)
    scores["caption_exact"] = exact / n
    return scores


def yesno_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics: accuracy, precision, recall, F1 (yes = positive) and yes ratio."""
    answers = [pope_answer(p) for p in predictions]
    tp = sum(a == "yes" and y == "yes" for a, y in zip(answers, labels))
    fp = sum(a == "yes" and y == "no" for a, y in zip(answers, labels))
    fn = sum(a == "no" and y == "yes" for a, y in zip(answers, labels))
    tn = sum(a == "no" and y == "no" for a, y in zip(answers, labels))
    n = len(answers)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "yesno_acc": (tp + tn) / n,
        "yesno_precision": precision,
        "yesno_recall": recall,
        "yesno_f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


def evaluate_toy(
    backend: GenerationBackend,
    dataset: object,
    caption_prompt: str,
    qa_prompt: str,
    max_new_tokens: int = 12,
    pixels: Any = None,
) -> dict[str, float]:
    """Caption and yes/no scores of ``backend`` on every scene of ``dataset``.

    ``dataset`` is a ``datasets.Dataset`` of scenes or a mapping of its columns; ``pixels``, the
    scenes' processed images when the caller keeps them (the Evaluator does).
    """
    rows = dataset if isinstance(dataset, dict) else dataset[:]  # type: ignore[index]
    images = rows["image"]
    refs = [
        {"caption": c, "count": n, "size": s, "colour": col, "shape": sh, "position": p}
        for c, n, s, col, sh, p in zip(
            rows["caption"],
            rows["count"],
            rows["size"],
            rows["colour"],
            rows["shape"],
            rows["position"],
        )
    ]
    captions = backend.generate(
        images, [caption_prompt] * len(images), max_new_tokens, pixels
    )
    answers = backend.generate(
        images, [qa_prompt.format(question=q) for q in rows["question"]], 3, pixels
    )
    return {**caption_scores(captions, refs), **yesno_scores(answers, rows["answer"])}


def score_toy_warmup(backbone: Backbone, columns: dict[str, list]) -> dict[str, float]:
    """The toy recipe's scores of its joint warm-up model (``fedsim.models.toy.ToyScore``).

    :func:`evaluate_toy` on the probe scenes ``columns``, greedy, 100 prompts per generate call
    (as the shipped reference was built: the build's gates and extensions read these scores).
    """
    return evaluate_toy(
        HFBackend(backbone, 100), columns, backbone.caption_prompt, backbone.qa_prompt
    )
