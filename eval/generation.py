"""Generation backends behind one interface.

``hf``: transformers ``generate`` on the resident LLaVA model, greedy, batched with left padding,
on CPU or GPU. (The vLLM backend arrives with the benchmark suite; it implements the same
:class:`GenerationBackend` protocol.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from fedsim.data.collate import generation_batch
from fedsim.models.backbone import Backbone


class GenerationBackend(Protocol):
    def generate(
        self,
        images: Sequence[object],
        prompts: Sequence[str],
        max_new_tokens: int,
        pixels: torch.Tensor | None = None,
    ) -> list[str]: ...


class HFBackend:
    """Greedy decoding with ``LlavaForConditionalGeneration.generate``."""

    def __init__(self, backbone: Backbone, batch_size: int = 64) -> None:
        self.backbone = backbone
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[object],
        prompts: Sequence[str],
        max_new_tokens: int,
        pixels: torch.Tensor | None = None,
    ) -> list[str]:
        """Greedy answers; ``pixels`` (processed images, e.g. cached) replaces ``images``."""
        bb = self.backbone
        device = next(bb.model.parameters()).device
        tok = bb.tokenizer
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = generation_batch(
                bb,
                images[i : i + self.batch_size],
                prompts[i : i + self.batch_size],
                pixels[i : i + self.batch_size] if pixels is not None else None,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = bb.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(
                t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)
            )
        return out
