"""Loading frozen backbones and handling the trainable projector.

One code path for every backbone: a local HF LLaVA checkpoint folder (the toy backbone that fedsim
builds is one), or a vision encoder + causal LM pair assembled into a
``LlavaForConditionalGeneration``. Only ``model.multi_modal_projector`` is trainable; its weights
travel between driver, workers and aggregator as a ``dict[str, Tensor]`` keyed by the projector's own
state-dict names (``linear_1.weight``, ...), and are swapped into a resident model by an in-place copy.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# transformers is a lazy module: its model classes load on first use, not here
# (the driver imports this module for its checks and never builds a model).
import transformers

Weights = dict[str, torch.Tensor]

# LLaVA-1.5 stage-1 ("plain") template and its VQA suffix, used when a checkpoint has no fedsim.json.
PLAIN_CAPTION_PROMPT = "<image>\n"
PLAIN_QA_PROMPT = (
    "<image>\n{question}\nAnswer the question using a single word or phrase."
)
_PROJECTOR_RE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


class BackboneError(ValueError):
    """A backbone that cannot be loaded or does not fit the projector asked for."""


#: Weight files that are pickles (``torch.save``): fedsim never loads them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(path: Path, option: str) -> None:
    """Refuse a checkpoint folder whose weights are not safetensors.

    A ``pytorch_model.bin`` (or any ``torch.save`` file) is a pickle, and unpickling runs
    whatever code the file names; fedsim loads model weights from safetensors only (and
    passes ``use_safetensors=True`` to transformers, so it never falls back to a pickle).
    """
    if not path.is_dir():
        raise BackboneError(f"{option}: {str(path)!r} is not a checkpoint folder")
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        # The header only (the tensors stay on disk): a truncated or foreign file is named
        # here, before any worker tries to load it.
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            raise BackboneError(
                f"{option}: {str(f)!r} is not a readable safetensors file ({_first_line(e)})"
            ) from None
    if files:
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    found = f" (it holds {', '.join(pickled)}: pickle files)" if pickled else ""
    raise BackboneError(
        f"{option}: {str(path)!r} has no safetensors weights{found}; fedsim loads model "
        "weights only from *.safetensors, never from pickle-based files, which can run "
        "code when loaded. Convert the checkpoint with a tool you trust (transformers' "
        "save_pretrained writes safetensors)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_backbone_source(source: str | Path, lm: str | Path | None = None) -> None:
    """Check ``model.backbone`` (and ``model.lm``) from their files alone, loading nothing.

    A LLaVA checkpoint folder (``config.json`` of a LLaVA model, safetensors weights), or with
    ``lm`` a vision encoder folder and a causal LM folder. Each problem is a one-line
    :class:`BackboneError` naming the field and the path.
    """
    checks = [("model.backbone", Path(source))]
    if lm is not None:
        checks.append(("model.lm", Path(lm)))
    for option, path in checks:
        if not path.exists():
            raise BackboneError(f"{option}: path {str(path)!r} does not exist")
        if not path.is_dir():
            raise BackboneError(
                f"{option}: {str(path)!r} is a file, not a checkpoint folder"
            )
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"{option}: {str(path)!r} has no config.json (not an HF checkpoint)"
            )
        try:
            cfg = transformers.AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise BackboneError(
                f"{option}: {str(path)!r}: config.json cannot be read ({_first_line(e)})"
            ) from None
        if lm is None and not isinstance(cfg, transformers.LlavaConfig):
            raise BackboneError(
                f"model.backbone: {str(path)!r} is a {type(cfg).__name__}, not a LLaVA checkpoint; "
                "give a vision encoder and model.lm to pair it with a language model"
            )
        require_safetensors(path, option)


@dataclass
class Backbone:
    """A resident LLaVA model with frozen encoder and LM, and what is needed to feed it."""

    model: transformers.LlavaForConditionalGeneration
    tokenizer: transformers.PreTrainedTokenizerBase
    image_processor: object
    caption_prompt: str
    qa_prompt: str
    image_seq_length: int
    image_token_id: int
    source: str
    manifest: dict
    #: Token ids by text, filled by ``fedsim.data.collate.encode_prompt``.
    token_cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector


def _freeze(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".multi_modal_projector." in f".{name}")


def image_tokens(image_size: int, patch_size: int, select_strategy: str) -> int:
    """Image tokens a LLaVA model puts into the LM: one per patch, plus the CLS feature when
    ``vision_feature_select_strategy`` is ``full``."""
    return (image_size // patch_size) ** 2 + (1 if select_strategy == "full" else 0)


def _image_seq_length(cfg: transformers.LlavaConfig) -> int:
    v = cfg.vision_config
    return image_tokens(v.image_size, v.patch_size, cfg.vision_feature_select_strategy)


def build_projector(kind: str, d_in: int, d_out: int) -> torch.nn.Module:
    """The projector factory of LLaVA (``linear`` or ``mlp{N}x_gelu``).

    ``mlp2x_gelu`` is transformers' own ``LlavaMultiModalProjector`` layout (``linear_1``, ``act``,
    ``linear_2``); other kinds keep the same naming (``linear_1`` ... ``linear_N``).
    """
    m = _PROJECTOR_RE.match(kind)
    if not m:
        raise BackboneError(
            f"model.projector: unknown projector {kind!r} (use linear or mlp<N>x_gelu)"
        )
    depth = 1 if kind == "linear" else int(m.group(2))
    if depth < 1:
        raise BackboneError(f"model.projector: {kind!r} needs at least one layer")
    layers: list[tuple[str, torch.nn.Module]] = [
        ("linear_1", torch.nn.Linear(d_in, d_out))
    ]
    for i in range(2, depth + 1):
        layers.append((f"act_{i - 1}" if depth > 2 else "act", torch.nn.GELU()))
        layers.append((f"linear_{i}", torch.nn.Linear(d_out, d_out)))
    return torch.nn.Sequential(OrderedDict(layers))


def load_backbone(
    source: str | Path,
    *,
    lm: str | Path | None = None,
    projector: str = "mlp2x_gelu",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Load a frozen LLaVA backbone from a local checkpoint folder, or a vision + LM pair.

    Parameters
    ----------
    source:
        A LLaVA checkpoint folder; or, when ``lm`` is given, a vision encoder folder.
    lm:
        A causal LM folder to pair with the vision encoder ``source``.
    projector:
        ``mlp2x_gelu`` (LLaVA-1.5, transformers' native layout), ``linear`` or ``mlp{N}x_gelu``.
    """
    path = Path(source)
    if not path.exists():
        raise BackboneError(f"model.backbone: path {str(path)!r} does not exist")
    if lm is None:
        if not (path / "config.json").exists():
            raise BackboneError(
                f"model.backbone: {str(path)!r} has no config.json (not an HF checkpoint)"
            )
        cfg = transformers.AutoConfig.from_pretrained(path)
        if not isinstance(cfg, transformers.LlavaConfig):
            raise BackboneError(
                f"model.backbone: {str(path)!r} is a {type(cfg).__name__}, not a LLaVA checkpoint; "
                "give a vision encoder and model.lm to pair it with a language model"
            )
        require_safetensors(path, "model.backbone")
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, use_safetensors=True
        )
        processor = transformers.AutoProcessor.from_pretrained(path)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
    else:
        model, tokenizer, image_processor = _assemble_pair(path, Path(lm), dtype)
    manifest_path = path / "fedsim.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if lm is not None and (path.parent / "fedsim.json").exists():
        manifest = json.loads((path.parent / "fedsim.json").read_text())
    if projector != "mlp2x_gelu":
        v_dim = model.config.vision_config.hidden_size
        t_dim = model.config.text_config.hidden_size
        model.model.multi_modal_projector = build_projector(projector, v_dim, t_dim).to(
            dtype
        )
    else:
        build_projector(projector, 1, 1)  # validates the name only
    model.to(device)
    model.eval()
    _freeze(model)
    image_token_id = model.config.image_token_id
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        caption_prompt=manifest.get("caption_prompt", PLAIN_CAPTION_PROMPT),
        qa_prompt=manifest.get("qa_prompt", PLAIN_QA_PROMPT),
        image_seq_length=_image_seq_length(model.config),
        image_token_id=image_token_id,
        source=str(path),
        manifest=manifest,
    )


def load_image_processor(source: str | Path, lm: str | Path | None = None) -> object:
    """The image processor :func:`load_backbone` gives the same arguments (without the model)."""
    check_backbone_source(source, lm)
    if lm is None:
        return transformers.AutoProcessor.from_pretrained(source).image_processor
    return transformers.AutoImageProcessor.from_pretrained(source)


def _assemble_pair(
    vision_path: Path, lm_path: Path, dtype: torch.dtype
) -> tuple[
    transformers.LlavaForConditionalGeneration,
    transformers.PreTrainedTokenizerBase,
    object,
]:
    """Assemble a vision encoder folder and a causal LM folder into one LLaVA model."""
    if not lm_path.exists():
        raise BackboneError(f"model.lm: path {str(lm_path)!r} does not exist")
    require_safetensors(vision_path, "model.backbone")
    require_safetensors(lm_path, "model.lm")
    vision = transformers.AutoModel.from_pretrained(
        vision_path, dtype=dtype, use_safetensors=True
    )
    lm = transformers.AutoModelForCausalLM.from_pretrained(
        lm_path, dtype=dtype, use_safetensors=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(vision_path)
    image_token = "<image>"
    if image_token not in tokenizer.get_vocab():
        raise BackboneError(
            f"model.lm: the tokenizer in {str(lm_path)!r} has no {image_token!r} token; add it before pairing"
        )
    model = assemble_llava(vision, lm, tokenizer.convert_tokens_to_ids(image_token))
    return model.to(dtype), tokenizer, image_processor


def assemble_llava(
    vision: Any,
    lm: Any,
    image_token_id: int,
    projector_act: str = "gelu",
) -> transformers.LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration holding ``vision`` (a CLIP vision model) and ``lm`` (a
    causal LM), projector freshly initialised: how a vision + LM pair and the toy are assembled.

    Uses every patch and CLS (strategy "full") from the last encoder layer (-1): the toy encoder was
    pre-trained with exactly that many layers, and CLS carries its attribute summary.
    """
    lcfg = transformers.LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act=projector_act,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(vision.config.image_size // vision.config.patch_size) ** 2
        + 1,
        tie_word_embeddings=False,
        multimodal_projector_bias=True,
    )
    model = transformers.LlavaForConditionalGeneration(lcfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Projector weights as name → tensor dicts


def get_projector(backbone: Backbone) -> Weights:
    """A detached fp32 copy of the projector weights."""
    return {
        k: v.detach().to(torch.float32).clone()
        for k, v in backbone.projector.state_dict().items()
    }


def set_projector_(backbone: Backbone, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the resident projector in place (no reallocation)."""
    check_projector_shapes(backbone, weights, where="projector")
    params = dict(backbone.projector.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def check_projector_shapes(
    backbone: Backbone, weights: Mapping[str, torch.Tensor], where: str
) -> None:
    """Raise a one-line error when ``weights`` does not fit this backbone's projector."""
    expected = {k: tuple(v.shape) for k, v in backbone.projector.named_parameters()}
    compare_projector_shapes(expected, weights, where)


def compare_projector_shapes(
    expected: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, torch.Tensor],
    where: str,
) -> None:
    """Raise a one-line error when ``weights`` do not have the ``expected`` names and shapes."""
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise BackboneError(
            f"{where}: keys do not fit the backbone's projector (missing {missing}, unexpected {extra})"
        )
    for k, shape in expected.items():
        if got[k] != shape:
            raise BackboneError(
                f"{where}: {k} has shape {list(got[k])}, the backbone's projector needs {list(shape)}"
            )


def expected_projector_shapes(
    source: str | Path, lm: str | Path | None = None, projector: str = "mlp2x_gelu"
) -> dict[str, tuple[int, ...]] | None:
    """The projector's parameter shapes, read from the backbone's ``config.json`` files only.

    Nothing is loaded (the projector is built on the meta device), so a projector file can be
    checked against the backbone before the model is. None when the configs cannot be read
    (:func:`load_backbone` then reports the reason, and :func:`set_projector_` checks shapes).
    """
    try:
        if lm is None:
            cfg = transformers.AutoConfig.from_pretrained(source)
            if not isinstance(cfg, transformers.LlavaConfig):
                return None
            v_dim = cfg.vision_config.hidden_size
            t_dim = cfg.text_config.hidden_size
        else:
            vcfg = transformers.AutoConfig.from_pretrained(source)
            v_dim = getattr(vcfg, "vision_config", vcfg).hidden_size
            t_dim = (
                transformers.AutoConfig.from_pretrained(lm)
                .get_text_config()
                .hidden_size
            )
        with torch.device("meta"):
            if projector == "mlp2x_gelu" and lm is None:
                from transformers.models.llava.modeling_llava import (
                    LlavaMultiModalProjector,
                )

                module: torch.nn.Module = LlavaMultiModalProjector(cfg)
            else:
                module = build_projector(projector, v_dim, t_dim)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return {k: tuple(v.shape) for k, v in module.named_parameters()}


def check_projector_fits(
    weights: Mapping[str, torch.Tensor],
    where: str,
    source: str | Path,
    lm: str | Path | None = None,
    projector: str = "mlp2x_gelu",
) -> None:
    """Check ``weights`` against the backbone's projector from its configs, before loading it."""
    expected = expected_projector_shapes(source, lm, projector)
    if expected is not None:
        compare_projector_shapes(expected, weights, where)


def init_projector(backbone: Backbone, seed: int) -> Weights:
    """Freshly initialised projector weights from a private generator keyed by ``seed``.

    nn.Linear's default rule: weight and bias uniform in ±1/√fan_in.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: Weights = {}
    for name, p in sorted(backbone.projector.named_parameters()):
        layer = name.rsplit(".", 1)[0]
        fan_in = dict(backbone.projector.named_parameters())[f"{layer}.weight"].shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = (
            torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1
        ) * bound
    return out
