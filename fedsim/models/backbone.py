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

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

Weights = dict[str, torch.Tensor]

# LLaVA-1.5 stage-1 ("plain") template and its VQA suffix, used when a checkpoint has no fedsim.json.
PLAIN_CAPTION_PROMPT = "<image>\n"
PLAIN_QA_PROMPT = (
    "<image>\n{question}\nAnswer the question using a single word or phrase."
)
_PROJECTOR_RE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


class BackboneError(ValueError):
    """A backbone that cannot be loaded or does not fit the projector asked for."""


@dataclass
class Backbone:
    """A resident LLaVA model with frozen encoder and LM, and what is needed to feed it."""

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
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


def _image_seq_length(cfg: LlavaConfig) -> int:
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    return patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)


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
        cfg = AutoConfig.from_pretrained(path)
        if not isinstance(cfg, LlavaConfig):
            raise BackboneError(
                f"model.backbone: {str(path)!r} is a {type(cfg).__name__}, not a LLaVA checkpoint; "
                "give a vision encoder and model.lm to pair it with a language model"
            )
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
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
    if lm is None:
        return AutoProcessor.from_pretrained(source).image_processor
    return AutoImageProcessor.from_pretrained(source)


def _assemble_pair(
    vision_path: Path, lm_path: Path, dtype: torch.dtype
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """Assemble a vision encoder folder and a causal LM folder into one LLaVA model."""
    if not lm_path.exists():
        raise BackboneError(f"model.lm: path {str(lm_path)!r} does not exist")
    vision = AutoModel.from_pretrained(vision_path, dtype=dtype)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    image_token = "<image>"
    if image_token not in tokenizer.get_vocab():
        raise BackboneError(
            f"model.lm: the tokenizer in {str(lm_path)!r} has no {image_token!r} token; add it before pairing"
        )
    from fedsim.models.toy import (
        assemble_llava,
    )  # local import: toy imports this module's users

    model = assemble_llava(vision, lm, tokenizer.convert_tokens_to_ids(image_token))
    return model.to(dtype), tokenizer, image_processor


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
