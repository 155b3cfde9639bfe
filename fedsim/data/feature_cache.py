"""Cached vision features: the frozen encoder run once per dataset with Ray Data, kept as Arrow.

The vision encoder is frozen in stage 1, so the features it gives an image never change. With
``data.feature_cache: true`` the driver runs the encoder over every training row once, as Ray Data
batch inference (:class:`FeatureEncoder` actors over ``ray.data.range``), and writes the selected
hidden states (``vision_feature_layer``, ``vision_feature_select_strategy``, exactly what
transformers' ``get_image_features`` hands the projector) to one Arrow IPC file. Workers then
memory-map it, and during training :class:`CachedVisionTower` stands in for the encoder: it
returns the cached features where the encoder's hidden states would be, so the rest of the
LLaVA forward (placeholder merge, LM) is transformers' own. Results equal those without the
cache (tests/test_feature_cache.py); the file is keyed by the dataset, the backbone and the
feature selection, written under a temporary name and renamed.

Off by default: the features of real backbones are large (576 × 1024 values an image for
LLaVA-1.5's CLIP-L/336) and only pay off when an image is read in many rounds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.feature_store import COLUMN
from fedsim.data.images import DECODE
from fedsim.data.pixel_cache import _fingerprint
from fedsim.data.rows import RowReader
from fedsim.models.spec import load_model, quiet_hf

BATCH = 256


class FeatureCacheError(ValueError):
    """A backbone or dataset the feature cache cannot serve."""


def feature_selection(model: Any) -> tuple[int, str]:
    """(layer, strategy) of the LLaVA config; a list of layers is not supported."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise FeatureCacheError(
            f"data.feature_cache: vision_feature_layer {layer!r} (several layers) is not supported"
        )
    return layer, cfg.vision_feature_select_strategy


def cache_path(
    cache_dir: Path, dataset_path: Path, backbone_id: str, model: Any
) -> Path:
    """Where the features of this dataset under this backbone and selection live."""
    layer, strategy = feature_selection(model)
    key = hashlib.sha256(
        "\n".join(
            [
                _fingerprint(Path(dataset_path)),
                backbone_id,
                str(layer),
                strategy,
                DECODE,
            ]
        ).encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / "features" / f"{key}.arrow"


def backbone_id(backbone_path: str, lm_path: str | None) -> str:
    """The backbone's identity: its folder(s) and their config and weight file sizes."""
    parts = []
    for p in filter(None, [backbone_path, lm_path]):
        root = Path(p).resolve()
        files = sorted(
            f"{f.name}:{f.stat().st_size}"
            for f in root.iterdir()
            if f.suffix in (".json", ".safetensors", ".bin")
        )
        parts.append(f"{root}|{','.join(files)}")
    return "||".join(parts)


def encoder_features(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """What ``get_image_features`` hands the projector for ``pixels``: ``[B, T, D]``.

    Runs transformers' own ``get_image_features`` with the projector bypassed, so the layer and
    strategy are applied exactly as in training.
    """
    llava = backbone.model.model
    layer, strategy = feature_selection(backbone.model)
    projector = llava.multi_modal_projector
    llava.multi_modal_projector = torch.nn.Identity()
    try:
        with torch.no_grad():
            out = llava.get_image_features(
                pixel_values=pixels.to(next(llava.parameters()).device),
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
            )
    finally:
        llava.multi_modal_projector = projector
    return torch.stack(list(out.pooler_output)).to(torch.float32).cpu()


class FeatureEncoder:
    """Ray Data batch-inference callable: row ids → their vision features (one backbone)."""

    def __init__(
        self, spec: Any, dataset_path: str, pixel_path: str | None, threads: int
    ) -> None:

        quiet_hf()
        self.backbone = load_model(spec, threads)
        self.reader = RowReader.open(dataset_path, pixel_path, "fail")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        _, pixels, _ = self.reader.read(ids, self.backbone)
        feats = encoder_features(self.backbone, pixels)
        return {"id": ids, COLUMN: feats.reshape(len(ids), -1).numpy()}


def build_feature_cache(
    path: Path,
    spec: Any,
    dataset_path: Path,
    pixel_path: str | None,
    rows: int,
    shape: tuple[int, int],
    threads: int = 1,
) -> Path:
    """Run the encoder over ``rows`` rows with Ray Data and write the Arrow file at ``path``."""
    import logging

    import pyarrow as pa
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.range(rows).map_batches(
        FeatureEncoder,
        fn_constructor_args=(spec, str(dataset_path), pixel_path, threads),
        batch_size=BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    width = shape[0] * shape[1]
    schema = pa.schema(
        [
            ("id", pa.int64()),
            (COLUMN, pa.list_(pa.float32(), width)),
        ],
        metadata={"tokens": str(shape[0]), "dim": str(shape[1])},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    expected = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
                ids = np.asarray(batch["id"], dtype=np.int64)
                if not np.array_equal(ids, np.arange(expected, expected + len(ids))):
                    raise RuntimeError(
                        "feature cache: Ray Data returned rows out of order"
                    )
                expected += len(ids)
                flat = np.ascontiguousarray(batch[COLUMN], dtype=np.float32).reshape(-1)
                values = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
                writer.write_batch(
                    pa.record_batch([pa.array(ids), values], schema=schema)
                )
        if expected != rows:
            raise RuntimeError(
                f"feature cache: {expected} rows written, expected {rows}"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_feature_cache(
    cache_dir: Path,
    spec: Any,
    dataset_path: Path,
    pixel_path: str | None,
) -> Path:
    """The feature cache of this dataset under this backbone, built once (needs Ray running)."""
    probe = load_model(spec, 1)
    path = cache_path(
        cache_dir,
        dataset_path,
        backbone_id(spec.backbone_path, spec.lm_path),
        probe.model,
    )
    if path.exists():
        return path

    reader = RowReader.open(str(dataset_path), pixel_path, "fail")
    _, pixels, _ = reader.read([0], probe)
    shape = tuple(encoder_features(probe, pixels).shape[1:])
    del probe
    return build_feature_cache(
        path,
        spec,
        dataset_path,
        pixel_path,
        len(reader),
        (int(shape[0]), int(shape[1])),
    )


class CachedVisionTower(torch.nn.Module):
    """Stands in for the frozen encoder: its "pixel values" are cached features ``[B, T, D]``.

    It returns them at every hidden-state index (``get_image_features`` picks one); with the
    ``default`` strategy, which drops the CLS position, a placeholder row is put first.
    """

    def __init__(self, num_layers: int, strategy: str) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.strategy = strategy

    def forward(self, features: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.strategy == "default":
            features = torch.cat([features[:, :1], features], dim=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            hidden_states=tuple([features] * (self.num_layers + 1)),
        )


def cached_tower(model: Any) -> CachedVisionTower:
    _, strategy = feature_selection(model)
    layers = model.config.vision_config.num_hidden_layers
    return CachedVisionTower(layers, strategy)
