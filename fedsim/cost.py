"""Predicted cost of a client task, in tokens: what push scheduling sorts the cohort by.

A task's forward/backward cost grows with the tokens its examples put through the LM: each row's
image tokens (the encoder's feature count, the same for every row) plus the text it trains on —
the caption, or the question and answer when the task's private draw made the row a question
(:func:`fedsim.training.task_flags`, the same draw the worker makes). Tokens come from the
backbone's own tokenizer; only the rows of the round's cohort are read and tokenised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.rows import read_saved_table, take_rows
from fedsim.models.backbone import _image_seq_length, image_tokens
from fedsim.training import task_flags


def _image_tokens(backbone_path: str) -> int:
    """The image tokens of every row: from ``config.json`` itself when it states them (a LLaVA
    config with its vision tower's image and patch size and the feature selection), else from
    transformers' config class (its defaults filled in). Reading the JSON keeps transformers'
    config classes, and the ~60 MB of modules they pull in, out of a run's driver."""
    raw = json.loads((Path(backbone_path) / "config.json").read_text(encoding="utf-8"))
    v = raw.get("vision_config")
    if (
        raw.get("model_type") == "llava"
        and isinstance(v, dict)
        and {"image_size", "patch_size"} <= v.keys()
        and "vision_feature_select_strategy" in raw
    ):
        return image_tokens(
            int(v["image_size"]),
            int(v["patch_size"]),
            raw["vision_feature_select_strategy"],
        )
    from transformers import AutoConfig, LlavaConfig

    cfg = AutoConfig.from_pretrained(backbone_path)
    if isinstance(cfg, LlavaConfig):
        return _image_seq_length(cfg)
    vision = getattr(
        cfg, "vision_config", cfg
    )  # a vision encoder folder (vision + LM pair)
    return (vision.image_size // vision.patch_size) ** 2


#: ``tokenizer_class`` values that name transformers' generic fast tokenizer (``TokenizersBackend``
#: in transformers 5, ``PreTrainedTokenizerFast`` its older name): the class AutoTokenizer picks.
_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer, as ``AutoTokenizer`` loads it. When its
    ``tokenizer_config.json`` names the generic fast tokenizer, that class is loaded directly:
    AutoTokenizer would pick the same class, after loading the model's config (transformers'
    config classes: ~60 MB and ~0.8 s in the driver)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    try:
        named = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    if named in _GENERIC_FAST and (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class TokenCost:
    """``cost(client, round, seed, rows)`` → predicted tokens of that task."""

    def __init__(self, model: Any, train_path: Path, qa_fraction: float) -> None:
        self.tokenizer = _tokenizer(model.lm_path or model.backbone_path)
        self.image_tokens = _image_tokens(model.backbone_path)
        # The text columns, read with pyarrow (no ``datasets``, no pandas in the driver).
        table = read_saved_table(train_path)
        self.text = {
            c: table.column(c)
            for c in ("caption", "question", "answer")
            if c in table.column_names
        }
        self.qa = "question" in self.text
        self.qa_fraction = qa_fraction

    def __call__(self, client: int, rnd: int, seed: int, rows: np.ndarray) -> int:
        if len(rows) == 0:
            return 0
        data = {c: take_rows(col, rows) for c, col in self.text.items()}
        if self.qa:
            flags = task_flags(seed, rnd, client, len(rows), self.qa_fraction)
            texts = [
                f"{q} {a}" if f else c
                for c, q, a, f in zip(
                    data["caption"], data["question"], data["answer"], flags
                )
            ]
        else:
            texts = list(data["caption"])
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return len(rows) * self.image_tokens + sum(len(x) for x in ids)
