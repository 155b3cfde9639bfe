"""Learning-rate schedules over global progress (LLaVA stage 1: linear warm-up, then cosine to 0)."""

from __future__ import annotations

import math


def lr_at(
    step: int, total: int, base: float, warmup: float = 0.03, kind: str = "cosine"
) -> float:
    """The learning rate of global step ``step`` (0-based) of ``total``.

    Warm-up: ``base · (step + 1) / W`` for the first ``W = max(1, ⌊warmup · total⌋)`` steps (when
    ``warmup > 0``); then ``cosine``: ``base · ½(1 + cos(π · (step − W) / (total − W)))``, or
    ``constant``: ``base``.
    """
    if total <= 0:
        raise ValueError(f"lr schedule: total steps must be > 0, got {total}")
    warm = max(1, int(total * warmup)) if warmup > 0 else 0
    if step < warm:
        return base * (step + 1) / warm
    if kind == "constant":
        return base
    if kind != "cosine":
        raise ValueError(f"train.schedule: unknown schedule {kind!r}")
    progress = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
