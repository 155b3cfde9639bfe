"""Predicted cost of a client task, in tokens: what push scheduling sorts the cohort by.

A task's forward/backward cost grows with the tokens its examples put through the LM: each row's
image tokens (the encoder's feature count, the same for every row) plus the text it trains on —
the caption, or the question and answer when the task's private draw made the row a question
(:func:`fedsim.training.task_flags`, the same draw the worker makes). Tokens come from the
backbone's own tokenizer; only the rows of the round's cohort are read and tokenised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.models.backbone import _image_seq_length
from fedsim.training import task_flags


def _image_tokens(backbone_path: str) -> int:
    from transformers import AutoConfig, LlavaConfig

    cfg = AutoConfig.from_pretrained(backbone_path)
    if isinstance(cfg, LlavaConfig):
        return _image_seq_length(cfg)
    vision = getattr(
        cfg, "vision_config", cfg
    )  # a vision encoder folder (vision + LM pair)
    return (vision.image_size // vision.patch_size) ** 2


class TokenCost:
    """``cost(client, round, seed, rows)`` → predicted tokens of that task."""

    def __init__(self, model: Any, train_path: Path, qa_fraction: float) -> None:
        import datasets
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model.lm_path or model.backbone_path
        )
        self.image_tokens = _image_tokens(model.backbone_path)
        ds = datasets.load_from_disk(str(train_path))
        self.text = ds.select_columns(
            [c for c in ("caption", "question", "answer") if c in ds.column_names]
        )
        self.qa = "question" in self.text.column_names
        self.qa_fraction = qa_fraction

    def __call__(self, client: int, rnd: int, seed: int, rows: np.ndarray) -> int:
        if len(rows) == 0:
            return 0
        data = self.text[[int(r) for r in rows]]
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
