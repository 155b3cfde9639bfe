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
    """Methods vLLM adds to each of its workers (``worker_extension_cls``).

    ``self.model_runner.model`` is vLLM's ``LlavaForConditionalGeneration``. Each projector
    tensor goes into its layer through the parameter's own ``weight_loader`` (tensor-parallel
    shards included) where the parameter still holds its weight; on the CPU backend vLLM has
    packed the weight for its GEMM kernel and emptied the parameter, so the layer gets the new
    weight back and is packed again (``process_weights_after_loading``).
    """

    def fedsim_load_projector(self, weights: dict[str, torch.Tensor]) -> None:
        proj = self.model_runner.model.multi_modal_projector  # type: ignore[attr-defined]
        for layer_name in sorted({k.rsplit(".", 1)[0] for k in weights}):
            layer = proj.get_submodule(layer_name)
            repack = False
            for pname in ("weight", "bias"):
                key = f"{layer_name}.{pname}"
                if key not in weights:
                    continue
                param = getattr(layer, pname)
                new = weights[key].to(device=param.device, dtype=param.dtype)
                if param.numel() == new.numel():
                    loader = getattr(param, "weight_loader", None)
                    if loader is not None:
                        loader(param, new)
                    else:
                        param.data.copy_(new.view_as(param))
                else:  # packed away (CPU backend): restore, then pack again below
                    setattr(
                        layer,
                        pname,
                        torch.nn.Parameter(new.clone(), requires_grad=False),
                    )
                    repack = True
            if repack:
                layer.quant_method.process_weights_after_loading(layer)

    def fedsim_projector_probe(self, x: torch.Tensor) -> torch.Tensor:
        """The projector's output on ``x``: what the engine computes, packed kernels and all."""
        proj = self.model_runner.model.multi_modal_projector  # type: ignore[attr-defined]
        ref = next(p for p in proj.parameters() if p.numel())
        with torch.no_grad():
            return proj(x.to(device=ref.device, dtype=ref.dtype)).float().cpu()


def projector_reference(
    weights: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """LLaVA's ``mlp2x_gelu`` projector applied to ``x`` (float32)."""
    import torch.nn.functional as F

    w = {k: v.float() for k, v in weights.items()}
    hidden = F.gelu(F.linear(x, w["linear_1.weight"], w.get("linear_1.bias")))
    return F.linear(hidden, w["linear_2.weight"], w.get("linear_2.bias"))


class VLLMBackend:
    """Greedy decoding with a vLLM engine loaded from an exported LLaVA checkpoint.

    vLLM is an optional dependency (``pip install fedsim[vllm]`` on a GPU machine, or the
    community CPU build in its own environment); it is imported here, never at module import.
    """

    def __init__(self, checkpoint: str, **engine_args: Any) -> None:
        import os

        # The engine core in this process: no spawned child re-importing the caller's
        # __main__ (a Ray worker's, in the Evaluator actor), and collective_rpc stays local.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
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

    def _bos_text(self) -> str:
        """BOS as text when the tokenizer does not add it itself (the hf path always starts
        with BOS: :func:`fedsim.data.collate.encode_prompt`); empty otherwise."""
        if not hasattr(self, "_bos"):
            tok = self.llm.get_tokenizer()
            ids = tok("x")["input_ids"]
            adds = bool(ids) and ids[0] == tok.bos_token_id
            self._bos = "" if adds or tok.bos_token is None else tok.bos_token
        return self._bos

    def load_projector(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Swap a projector into every worker in place and check that it took effect.

        The check runs the engine's own projector on a fixed random input and compares it with
        :func:`projector_reference`, so it covers the packed kernels, not just the parameters.
        """
        cpu = {k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}
        self.llm.collective_rpc("fedsim_load_projector", args=(cpu,))
        d_in = cpu["linear_1.weight"].shape[1]
        x = torch.randn(4, d_in, generator=torch.Generator().manual_seed(0))
        expected = projector_reference(cpu, x)
        scale = float(expected.abs().max()) or 1.0
        for got in self.llm.collective_rpc("fedsim_projector_probe", args=(x,)):
            err = float((got - expected).abs().max()) / scale
            # fp32 engines agree to ~1e-6; bf16/fp16 ones to their rounding.
            if err > 2e-2:
                raise RuntimeError(
                    f"vllm: the projector did not take effect (relative error {err:.2e})"
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
        bos = self._bos_text()
        requests = [
            {"prompt": bos + p, "multi_modal_data": {"image": im}}
            if im is not None
            else bos + p
            for p, im in zip(prompts, images)
        ]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]
