"""``fedsim export RUN_DIR OUT``: a run's projector inside a plain HF LLaVA checkpoint.

The backbone the run trained on is loaded as the run did (``config.yaml``), the run's projector is
copied into it, and the whole model is written as a LLaVA checkpoint folder: ``config.json``, the
processor (tokenizer + image processor), ``generation_config.json`` and safetensors whose tensor
names follow the llava-hf layout that vLLM's ``LlavaForConditionalGeneration`` loader reads and
that transformers maps back on load:

=================================  ===========================================
in memory (transformers 5)         in the exported file
=================================  ===========================================
``model.language_model.*``         ``language_model.model.*``
``lm_head.*``                      ``language_model.lm_head.*``
``model.vision_tower.*``           ``vision_tower.vision_model.*`` (CLIP)
``model.multi_modal_projector.*``  ``multi_modal_projector.*``
=================================  ===========================================

The folder is written under a temporary name and renamed at the end, so an interrupted export
leaves nothing that looks like a checkpoint. Only the LLaVA projector layout (``mlp2x_gelu``) has
a place in a LLaVA checkpoint; other projector kinds are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedsim.config import ConfigError, load_config
from fedsim.models.backbone import BackboneError, check_projector_fits, set_projector_
from fedsim.models.spec import load_model, resolve_backbone
from fedsim.runio import RunDirError, check_writable, load_weights, weights_digest

PROJECTOR_FILE = Path("final") / "projector.safetensors"
CLIENT_PROJECTORS = Path("final") / "client_projectors.safetensors"


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or option."""


def vllm_key(name: str) -> str:
    """The llava-hf / vLLM tensor name of a transformers-5 LLaVA parameter ``name``."""
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.", "vision_tower."),
    ):
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if name.startswith("vision_tower.") and not name.startswith(
        "vision_tower.vision_model."
    ):
        name = "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def run_projector(
    run_dir: Path, projector: Path | None = None, client: int | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """The projector to export: ``projector`` if given, a ``local`` run's client, or the final one."""
    if projector is not None:
        path = Path(projector)
        if not path.is_file():
            raise ExportError(f"--projector: {path} does not exist")
        return load_weights(path), path
    if client is not None:
        path = run_dir / CLIENT_PROJECTORS
        if not path.is_file():
            raise ExportError(
                f"--client: {path} does not exist (only `local` runs keep per-client projectors)"
            )
        prefix = f"client-{client}/"
        weights = {
            k[len(prefix) :]: v
            for k, v in load_weights(path).items()
            if k.startswith(prefix)
        }
        if not weights:
            raise ExportError(f"--client: {path} has no client {client}")
        return weights, path
    path = run_dir / PROJECTOR_FILE
    if not path.is_file():
        other = run_dir / CLIENT_PROJECTORS
        hint = " (a `local` run: choose one with --client N)" if other.is_file() else ""
        raise ExportError(f"{path}: no final projector{hint}")
    return load_weights(path), path


def check_fits(weights: dict[str, torch.Tensor], source: Path, spec: Any) -> None:
    """Refuse projector ``weights`` (from ``source``) whose shapes do not fit the backbone of
    ``spec`` (a ``ModelSpec``), from its config files alone: nothing is loaded."""

    try:
        check_projector_fits(
            weights, str(source), spec.backbone_path, spec.lm_path, spec.projector
        )
    except BackboneError as e:
        raise ExportError(str(e)) from None


def _processor(backbone: Any) -> Any:
    """The backbone's LlavaProcessor: its own for a LLaVA folder, or assembled for a pair."""
    from transformers import AutoProcessor, LlavaProcessor

    src = Path(backbone.source)
    if (src / "processor_config.json").exists() or (
        src / "preprocessor_config.json"
    ).exists():
        try:
            return AutoProcessor.from_pretrained(src)
        except (OSError, ValueError):
            pass
    cfg = backbone.model.config
    return LlavaProcessor(
        image_processor=backbone.image_processor,
        tokenizer=backbone.tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def _rename_safetensors(folder: Path) -> int:
    """Rewrite every safetensors file of ``folder`` with vLLM's tensor names; returns the count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    count = 0
    index_path = folder / "model.safetensors.index.json"
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            tensors = {vllm_key(k): g.get_tensor(k) for k in g.keys()}
        save_file(tensors, str(f), metadata={"format": "pt"})
        count += len(tensors)
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {vllm_key(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2))
    return count


def write_checkpoint(backbone: Any, out: Path, provenance: dict[str, Any]) -> Path:
    """Write ``backbone`` (with whatever projector it holds) as a LLaVA folder at ``out``.

    ``out`` is written under a temporary name and renamed; ``provenance`` goes to
    ``fedsim.json`` under ``export``, beside the backbone's own manifest (its prompts).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        backbone.model.save_pretrained(tmp)
        _processor(backbone).save_pretrained(tmp)
        _rename_safetensors(tmp)
        manifest = dict(backbone.manifest)
        manifest["export"] = provenance
        (tmp / "fedsim.json").write_text(json.dumps(manifest, indent=2))
        try:
            if out.exists():
                out.rmdir()
            tmp.rename(out)  # fails on a folder another export filled meanwhile
        except OSError:
            raise ExportError(
                f"{out}: written by another process meanwhile; choose a new folder"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(
    run_dir: Path,
    out: Path,
    *,
    projector: Path | None = None,
    client: int | None = None,
) -> Path:
    """Write the run's backbone with its projector to ``out`` (must be new or empty)."""

    run_dir, out = Path(run_dir), Path(out)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{config}: not a run folder (no config.yaml)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    try:
        check_writable(out, "OUT")
    except RunDirError as e:
        raise ExportError(str(e)) from None
    try:
        cfg = load_config(str(config))
    except ConfigError as e:
        raise ExportError(f"{config}: {e}") from None
    if cfg.model.projector != "mlp2x_gelu":
        raise ExportError(
            f"{config}: model.projector {cfg.model.projector!r} has no place in a LLaVA "
            "checkpoint (LlavaMultiModalProjector is mlp2x_gelu)"
        )
    weights, source = run_projector(run_dir, projector, client)
    spec = resolve_backbone(cfg)
    check_fits(weights, source, spec)  # before the backbone is loaded
    backbone = load_model(spec, torch.get_num_threads())
    try:
        set_projector_(backbone, weights)
    except BackboneError as e:
        raise ExportError(f"{source}: {e}") from None
    digest = weights_digest(
        weights
    )  # the tensors', not the file's (see weights_digest)
    return write_checkpoint(
        backbone,
        out,
        {
            "run": str(run_dir.resolve()),
            "algorithm": cfg.algorithm.name,
            "seed": cfg.seed,
            "rounds": cfg.rounds,
            "projector_file": str(source.resolve()),
            "projector_digest": digest,
            "client": client,
        },
    )
