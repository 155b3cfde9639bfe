"""Turning image–text examples into LLaVA model inputs.

Training examples are a prompt (holding one ``<image>`` placeholder) and a target (a caption or an
answer). The placeholder expands to ``image_seq_length`` image tokens, as LlavaProcessor does; the
loss covers the target and the closing EOS only (labels are -100 on BOS, image and prompt positions;
the model shifts them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.models.backbone import Backbone


def _expand(backbone: Backbone, ids: list[int]) -> list[int]:
    """Replace each image placeholder id by ``image_seq_length`` copies of it."""
    out: list[int] = []
    for i in ids:
        if i == backbone.image_token_id:
            out.extend([i] * backbone.image_seq_length)
        else:
            out.append(i)
    return out


TOKEN_CACHE_MAX = (
    100_000  # texts remembered per backbone (captions and questions repeat)
)


def encode_prompt(backbone: Backbone, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with BOS first and the image placeholder expanded (memoised)."""
    cached = backbone.token_cache.get(prompt)
    if cached is not None:
        return list(cached)
    tok = backbone.tokenizer
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id, *ids]
    out = _expand(backbone, ids)
    if len(backbone.token_cache) < TOKEN_CACHE_MAX:
        backbone.token_cache[prompt] = tuple(out)
    return out


def pixel_values(backbone: Backbone, images: Sequence[object]) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels through the backbone's own image processor."""
    out = backbone.image_processor(list(images), return_tensors="pt")["pixel_values"]
    return out.to(backbone.model.dtype)


def training_batch(
    backbone: Backbone,
    images: Sequence[object],
    prompts: Sequence[str],
    targets: Sequence[str],
    pixels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids, attention_mask, labels ``[B, L]``, pixel_values.

    ``pixels`` (already processed, e.g. from the pixel cache) replaces processing ``images``.
    """
    tok = backbone.tokenizer
    rows: list[tuple[list[int], int]] = []
    for prompt, target in zip(prompts, targets, strict=True):
        sep = "" if prompt.endswith((" ", "\n")) else " "
        prompt_ids = encode_prompt(backbone, prompt)
        full = encode_prompt(backbone, prompt + sep + target)
        if tok.eos_token_id is not None:
            full = [*full, tok.eos_token_id]
        rows.append((full, len(prompt_ids)))
    width = max(len(r) for r, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n = len(rows)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = t[n_prompt:]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixels
        if pixels is not None
        else pixel_values(backbone, images),
    }


def generation_batch(
    backbone: Backbone,
    images: Sequence[object],
    prompts: Sequence[str],
    pixels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch for ``generate``: input_ids, attention_mask, pixel_values."""
    tok = backbone.tokenizer
    rows = [encode_prompt(backbone, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": pixels
        if pixels is not None
        else pixel_values(backbone, images),
    }
