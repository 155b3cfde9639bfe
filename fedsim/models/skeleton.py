"""A LLaVA-1.5-7B-shaped skeleton backbone, randomly initialised and built locally.

LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744)
joins CLIP ViT-L/14-336 to Vicuna-7B with an ``mlp2x_gelu`` projector. The skeleton keeps every
*width* of that model and as few *layers* as a 2-core CPU can afford, so that every real-size
code path runs without a download:

- vision tower: CLIP ViT-L/14 at 336 px (hidden 1024, 16 heads, MLP 4096, patch 14 → 24 × 24 =
  576 patch tokens), ``vision_feature_layer`` −2 and the ``default`` strategy (CLS dropped), as
  LLaVA-1.5 selects its features; ``vision_layers`` of its 24 layers (default 2, so that −2 is
  still an inner layer);
- LM: Vicuna-7B's Llama shape (hidden 4096, MLP 11008, 32 heads, vocabulary 32 000);
  ``lm_layers`` of its 32 layers (default 1);
- projector: ``mlp2x_gelu`` 1024 → 4096 → 4096 (21 M parameters, transformers'
  ``LlavaMultiModalProjector``);
- a word-level tokenizer with 32 000 entries: the toy's words (so the synthetic scenes' captions
  and questions are real tokens) then ``<extra_i>`` fillers up to Vicuna's vocabulary size, and a
  ``CLIPImageProcessor`` with a 336 crop and CLIP's normalisation.

Weights are random (seeded): the skeleton learns nothing and is not meant to. It exists to run
576 image tokens, a 4096-wide projector, bf16 weights and a 32 000-way LM head through training,
Fed-CMP's truncation, checkpoints, export and evaluation, and to measure per-layer costs that
extrapolate to the full 24 + 32 layers (``fedsim bench --sections real-shape``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from fedsim.data.scenes_dataset import spec_to_dict
from fedsim.data.synthetic import COUNT_WORDS, SceneSpec
from fedsim.machine import machine_info
from fedsim.models.toy import (
    CAPTION_PROMPT,
    IMAGE_TOKEN,
    QA_PROMPT,
    build_tokenizer,
    vocabulary,
)
from fedsim.runio import default_cache_dir

SKELETON_NAME = "llava-1.5-shape"
RECIPE_VERSION = 1
#: CLIP's image normalisation (openai/clip-vit-large-patch14-336's preprocessor_config.json).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class SkeletonError(ValueError):
    """A skeleton recipe that cannot be built (bad dtype or layer counts)."""


@dataclass(frozen=True, kw_only=True)
class SkeletonConfig:
    """The skeleton's shape; its hash (with the dtype) names the cache folder.

    Attributes
    ----------
    dtype:
        ``bf16`` or ``fp32``: the dtype the weights are stored in.
    lm_layers, vision_layers:
        How many of Vicuna-7B's 32 decoder layers and CLIP ViT-L's 24 encoder layers to keep.
    seed:
        Seed of the random initialisation.
    """

    dtype: str = "bf16"
    lm_layers: int = 1
    vision_layers: int = 2
    seed: int = 0
    # CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336)
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    vision_feature_layer: int = -2
    # Vicuna-7B v1.5 (a Llama-2-7B)
    lm_hidden: int = 4096
    lm_intermediate: int = 11008
    lm_heads: int = 32
    vocab_size: int = 32000
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SkeletonError(
                f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}"
            )
        if self.lm_layers < 1:
            raise SkeletonError(f"skeleton lm_layers {self.lm_layers}: must be >= 1")
        # Feature layer −2 must name a layer's output, not the embeddings.
        if self.vision_layers < -self.vision_feature_layer:
            raise SkeletonError(
                f"skeleton vision_layers {self.vision_layers}: vision_feature_layer "
                f"{self.vision_feature_layer} needs at least {-self.vision_feature_layer}"
            )

    @property
    def image_tokens(self) -> int:
        """Patch tokens per image (CLS dropped by the ``default`` strategy): 576 at 336/14."""
        return (self.image_size // self.patch_size) ** 2

    def key(self) -> str:
        payload = {**dataclasses.asdict(self), "recipe": RECIPE_VERSION}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
        return f"{self.dtype}-{digest.hexdigest()[:10]}"


def skeleton_vocabulary(size: int) -> list[str]:
    """The toy's words (special tokens first, ``<image>`` among them) padded with fillers."""
    words = vocabulary()
    if len(words) > size:
        raise SkeletonError(f"vocab_size {size}: the toy words alone need {len(words)}")
    return words + [f"<extra_{i}>" for i in range(size - len(words))]


def build_skeleton_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``size`` entries (the toy's words + fillers)."""
    return build_tokenizer(skeleton_vocabulary(size))


def skeleton_llava_config(cfg: SkeletonConfig, image_token_id: int) -> LlavaConfig:
    """LLaVA-1.5-7B's config (``llava-hf/llava-1.5-7b-hf``) with fewer layers."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_attention_heads=cfg.vision_heads,
        num_hidden_layers=cfg.vision_layers,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=cfg.lm_hidden,
        intermediate_size=cfg.lm_intermediate,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_heads,
        num_hidden_layers=cfg.lm_layers,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=cfg.vision_feature_layer,
        image_seq_length=cfg.image_tokens,
        tie_word_embeddings=False,
        multimodal_projector_bias=True,
    )


def skeleton_processor(
    tokenizer: PreTrainedTokenizerFast, cfg: SkeletonConfig
) -> LlavaProcessor:
    """CLIPImageProcessor (resize shortest edge to 336, centre crop 336, CLIP mean/std)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def skeleton_path(cfg: SkeletonConfig, cache_dir: Path | None = None) -> Path:
    return (
        (cache_dir or default_cache_dir())
        / "backbones"
        / f"{SKELETON_NAME}-{cfg.key()}"
    )


def build_skeleton(
    cfg: SkeletonConfig | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or find in the cache) the skeleton checkpoint folder and return it.

    The folder is an ordinary HF LLaVA checkpoint (``config.json``, ``model.safetensors`` in
    ``cfg.dtype``, processor files) plus ``fedsim.json``; written under a temporary name and
    renamed, concurrent builders serialise on a file lock.
    """
    cfg = cfg or SkeletonConfig()
    final = skeleton_path(cfg, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "fedsim.json").exists() and not force:
            return final
        return _build(cfg, final)


def _build(cfg: SkeletonConfig, final: Path) -> Path:
    t0 = time.perf_counter()
    tokenizer = build_skeleton_tokenizer(cfg.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lcfg = skeleton_llava_config(cfg, image_id)
    torch.manual_seed(cfg.seed)
    # Initialised in fp32 (transformers' normal(0, 0.02) rule), then cast: the bf16 build is
    # the fp32 build rounded to nearest, not another draw.
    model = LlavaForConditionalGeneration(lcfg).to(DTYPES[cfg.dtype]).eval()
    processor = skeleton_processor(tokenizer, cfg)
    counts = {
        "vision_tower": _numel(model.model.vision_tower),
        "projector": _numel(model.model.multi_modal_projector),
        "language_model": _numel(model.model.language_model),
        "lm_head": _numel(model.lm_head),
    }
    # Every word the toy scenes use is in the vocabulary: any scene (all counts) fits.
    scene = SceneSpec(counts=tuple(COUNT_WORDS))
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        manifest = {
            "kind": SKELETON_NAME,
            "recipe": {**dataclasses.asdict(cfg), "scene": spec_to_dict(scene)},
            "key": cfg.key(),
            "caption_prompt": f"{IMAGE_TOKEN} {CAPTION_PROMPT}",
            "qa_prompt": f"{IMAGE_TOKEN} {QA_PROMPT}",
            "parameters": counts,
            "image_tokens": cfg.image_tokens,
            "note": "random weights: runs every real-size code path, learns nothing",
            "seconds": round(time.perf_counter() - t0, 1),
            "versions": {"torch": torch.__version__},
            "machine": machine_info(),
        }
        (tmp / "fedsim.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_for_cli(
    cache_dir: Path | None, force: bool, seed: int | None, dtype: str | None
) -> list[str]:
    """``fedsim backbones build llava-1.5-shape``: build (or find) it; the lines to print."""
    from fedsim.runio import cache_folder

    cfg = SkeletonConfig(dtype=dtype or "bf16", seed=0 if seed is None else seed)
    path = build_skeleton(cfg, cache_folder(cache_dir, "--cache-dir"), force=force)
    manifest = json.loads((path / "fedsim.json").read_text())
    counts = manifest["parameters"]
    return [
        f"{SKELETON_NAME} skeleton ({cfg.dtype}, {cfg.lm_layers} LM layer(s), "
        f"{cfg.vision_layers} vision layers, random weights): {path}",
        "  parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
        f"  image tokens: {manifest['image_tokens']}, vocabulary: {cfg.vocab_size}",
        f"  run on it with --set model.backbone={path}"
        + (" --set model.dtype=bfloat16" if cfg.dtype == "bf16" else ""),
    ]
