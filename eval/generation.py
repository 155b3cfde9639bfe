"""Generation backends behind one interface.

``hf``: transformers ``generate`` on the resident LLaVA model, greedy, batched with left padding,
on CPU or GPU. ``vllm``: a vLLM engine on an exported checkpoint (:mod:`fedsim.export`), whose
projector is replaced in place through ``collective_rpc`` (no engine restart per projector).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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


# ---------------------------------------------------------------------------------------------
# vLLM: one engine for a whole evaluation run; new projectors swap in place.


class ProjectorWorkerExtension:
    """Methods vLLM adds to each of its GPU/CPU workers (``worker_extension_cls``).

    ``self.model_runner.model`` is vLLM's ``LlavaForConditionalGeneration``; its ``load_weights``
    takes HF tensor names and maps them itself, so the projector's four tensors load in place
    without touching the rest of the model.
    """

    def fedsim_load_projector(self, weights: dict[str, torch.Tensor]) -> float:
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        model.load_weights(
            (f"multi_modal_projector.{k}", v.to(device)) for k, v in weights.items()
        )
        return self.fedsim_projector_checksum()

    def fedsim_projector_checksum(self) -> float:
        model = self.model_runner.model  # type: ignore[attr-defined]
        total = 0.0
        for name, p in model.named_parameters():
            if "multi_modal_projector" in name:
                total += float(p.detach().double().sum())
        return total


def projector_checksum(weights: Mapping[str, torch.Tensor]) -> float:
    """The sum of every projector entry (what :class:`ProjectorWorkerExtension` reports)."""
    return float(sum(v.detach().double().sum() for v in weights.values()))


class VLLMBackend:
    """Greedy decoding with a vLLM engine loaded from an exported LLaVA checkpoint.

    vLLM is an optional dependency (``pip install fedsim[vllm]`` on a GPU machine, or the
    community CPU build in its own environment); it is imported here, never at module import.
    """

    def __init__(self, checkpoint: str, **engine_args: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                f"eval.backend vllm: vllm is not importable here ({e}); install the "
                "vllm extra on a GPU machine, or use --backend hf"
            ) from None
        self.llm = LLM(
            model=checkpoint,
            worker_extension_cls=f"{__name__}.ProjectorWorkerExtension",
            limit_mm_per_prompt={"image": 1},
            **engine_args,
        )

    def load_projector(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Swap a projector into every worker in place and check that it took effect."""
        cpu = {k: v.detach().to("cpu") for k, v in weights.items()}
        sums = self.llm.collective_rpc("fedsim_load_projector", args=(cpu,))
        expected = projector_checksum(cpu)
        for s in sums:
            # Checksums agree up to the engine dtype's rounding of each entry.
            if abs(s - expected) > 1e-2 * max(1.0, abs(expected)):
                raise RuntimeError(
                    f"vllm: the projector did not take effect (worker sum {s}, sent {expected})"
                )
        # Cached image embeddings (and KV blocks of image tokens) came from the old projector.
        engine = self.llm.llm_engine
        for name in ("reset_encoder_cache", "reset_mm_cache"):
            if hasattr(engine, name):
                getattr(engine, name)()
        self.llm.reset_prefix_cache()

    def generate(
        self,
        images: Sequence[object],
        prompts: Sequence[str],
        max_new_tokens: int,
        pixels: torch.Tensor | None = None,
    ) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        requests = [
            {"prompt": p, "multi_modal_data": {"image": im}} if im is not None else p
            for p, im in zip(prompts, images)
        ]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]
