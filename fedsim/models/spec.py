"""Where a run's backbone comes from and how every process loads it (no Ray).

The driver resolves ``model.backbone`` once (:func:`resolve_backbone`: the shipped toy, verified
by SHA-256; the toy rebuilt from its recipe; or a local path, checked) into a :class:`ModelSpec`
of plain strings; workers, the Evaluator, Ray Train ranks, the feature cache and the exporter
each turn that spec into a loaded backbone with :func:`load_model`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.config import Config
from fedsim.configtools import ConfigError
from fedsim.models.backbone import check_backbone_source, load_backbone
from fedsim.models.toy_reference import ReferenceError, reference_toy_backbone
from fedsim.runio import RunError, cache_folder


@dataclass(frozen=True)
class ModelSpec:
    """How a process finds and places the backbone (paths resolved by the driver)."""

    backbone_path: str
    lm_path: str | None
    projector: str
    dtype: str
    device: str


def quiet_hf() -> None:
    """transformers and datasets without their info logs and progress bars (in every actor).

    ``datasets`` is not imported for it (workers and the Evaluator read rows with pyarrow):
    its progress bars are off through the variable it reads at import, or now if loaded."""
    import sys

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def load_model(spec: ModelSpec, threads: int) -> Any:
    """The backbone of ``spec`` on its device (``auto``: CUDA when there is one), with
    ``threads`` torch intra-op threads in this process."""
    torch.set_num_threads(threads)
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_backbone(
        spec.backbone_path,
        lm=spec.lm_path,
        projector=spec.projector,
        device=device,
        dtype=getattr(torch, spec.dtype),
    )


def resolve_backbone(
    cfg: Config, report: Callable[[str, int, int, float], None] | None = None
) -> ModelSpec:
    """The shipped toy (verified), the toy rebuilt from its recipe, or a checked local path."""
    if cfg.model.backbone == "toy":
        path = toy_reference_path()
    elif cfg.model.backbone == "toy-recipe":
        # The recipe scores its warm-up with the toy evaluation (eval/ is passed in, never
        # imported by the recipe: models/toy.py stays below eval/). Imported here: the
        # recipe needs transformers' model classes, which a run's driver never loads.
        from fedsim.eval.toy import score_toy_warmup
        from fedsim.models.toy import ToyBuildError, build_toy_backbone

        try:
            path = build_toy_backbone(
                cache_dir=cache_folder(cfg.cache_dir),
                report=report,
                score=score_toy_warmup,
            )
        except ToyBuildError as e:
            raise RunError(str(e)) from None
    else:
        path = Path(cfg.model.backbone).expanduser()
        if not path.exists():
            raise ConfigError(f"model.backbone: path {str(path)!r} does not exist")
        if cfg.model.lm is not None and not Path(cfg.model.lm).expanduser().exists():
            raise ConfigError(f"model.lm: path {cfg.model.lm!r} does not exist")
    lm = str(Path(cfg.model.lm).expanduser()) if cfg.model.lm else None
    return ModelSpec(
        str(path), lm, cfg.model.projector, cfg.model.dtype, cfg.model.device
    )


def toy_reference_path() -> Path:
    """The reference toy backbone shipped with fedsim, every file checked by its SHA-256."""
    try:
        return reference_toy_backbone()
    except ReferenceError as e:
        raise ConfigError(f"model.backbone: {e}") from None


def read_manifest(model: ModelSpec) -> dict[str, Any]:
    """The backbone's ``fedsim.json`` (what fedsim built it from), empty for other backbones."""
    path = Path(model.backbone_path) / "fedsim.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_scene_fits_backbone(cfg: Config, manifest: dict[str, Any]) -> None:
    """The toy LM only knows the words of its recipe: data.scene must stay inside it."""
    recipe = manifest.get("recipe", {}).get("scene")
    if not recipe:
        return
    for name in ("shapes", "colours", "sizes", "positions", "counts"):
        allowed = recipe.get(name, [])
        for value in getattr(cfg.data.scene, name):
            if value not in allowed:
                raise ConfigError(
                    f"data.scene.{name}: {value!r} is unknown to the backbone (it was pre-trained on {allowed})"
                )


def check_backbone(cfg: Config) -> None:
    """The backbone's files (the shipped toy: its SHA-256s) and the scene against its recipe.

    Before anything is written; a toy-recipe backbone not built yet is checked once built.
    """
    if cfg.model.backbone == "toy-recipe":
        from fedsim.models.toy import ToyBuildConfig, toy_backbone_path

        built = toy_backbone_path(ToyBuildConfig(), cache_folder(cfg.cache_dir))
        if (built / "fedsim.json").exists():
            check_scene_fits_backbone(
                cfg, json.loads((built / "fedsim.json").read_text())
            )
    else:
        spec = resolve_backbone(cfg)
        if cfg.model.backbone != "toy":
            # The shipped toy is checked file by file against its SHA-256s (resolve_backbone):
            # a known LLaVA checkpoint, so transformers' config classes are not loaded for it
            # (~60 MB and ~0.8 s of imports in the driver).
            check_backbone_source(spec.backbone_path, spec.lm_path)
        check_scene_fits_backbone(cfg, read_manifest(spec))
