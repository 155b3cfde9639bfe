"""Reading training rows: text columns from the Arrow dataset, pixels from the cache or the images.

Workers hold one :class:`RowReader` for the whole run. With a pixel cache
(:mod:`fedsim.data.pixel_cache`) the image column is never decoded during training: the rows'
``pixel_values`` are a slice of the memory-mapped cache. Without one, each image is decoded on its
own (embedded bytes, or the file at its path) and run through the backbone's image processor; an
image that cannot be decoded is handled by the ``bad_images`` policy: ``skip`` leaves its row out of
the batch (and counts it), ``fail`` raises :class:`fedsim.data.loaders.DataError` with its path.
Both paths give the same tensors for the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.data.collate import pixel_values
from fedsim.data.feature_store import FeatureStore
from fedsim.data.images import decode_image
from fedsim.data.loaders import DataError
from fedsim.data.pixel_cache import PixelStore


class RowReader:
    """``read(rows, backbone)`` → (the kept rows' non-image columns, their pixels, kept).

    With a feature cache the "pixels" are the rows' cached vision features (see
    :mod:`fedsim.data.feature_cache`); training then runs :class:`CachedVisionTower`.
    """

    def __init__(
        self,
        dataset: Any,
        pixel_path: str | None = None,
        bad_images: str = "skip",
        feature_path: str | None = None,
    ) -> None:
        import datasets

        self.pixels = PixelStore(pixel_path) if pixel_path else None
        #: Cached vision features: ``read`` then returns them in place of pixel values.
        self.features = FeatureStore(feature_path) if feature_path else None
        if self.features is not None and len(self.features) != len(dataset):
            raise ValueError(
                f"feature cache {feature_path}: {len(self.features)} rows for a dataset of {len(dataset)}"
            )
        if self.pixels is not None and len(self.pixels) != len(dataset):
            raise ValueError(
                f"pixel cache {pixel_path}: {len(self.pixels)} rows for a dataset of {len(dataset)}"
            )
        self.bad_images = bad_images
        self.text = dataset.select_columns(
            [c for c in dataset.column_names if c != "image"]
        )
        images = dataset.select_columns(["image"])
        if isinstance(images.features["image"], datasets.Image):
            images = images.cast_column("image", datasets.Image(decode=False))
        self.images = images
        self.length = len(dataset)

    @classmethod
    def open(
        cls,
        dataset_path: str,
        pixel_path: str | None = None,
        bad_images: str = "skip",
        feature_path: str | None = None,
    ) -> RowReader:
        import datasets

        return cls(
            datasets.load_from_disk(dataset_path), pixel_path, bad_images, feature_path
        )

    def __len__(self) -> int:
        return self.length

    def read(
        self, rows: Sequence[int] | np.ndarray, backbone: Any
    ) -> tuple[dict[str, list[Any]], torch.Tensor | None, list[int]]:
        """The rows' columns and pixels, and the positions (in ``rows``) that were kept."""
        ids = [int(r) for r in rows]
        if self.features is not None:
            feats = self.features[ids].to(backbone.model.dtype)
            return self.text[ids], feats, list(range(len(ids)))
        if self.pixels is not None:
            pixels = self.pixels[ids].to(backbone.model.dtype)
            return self.text[ids], pixels, list(range(len(ids)))
        kept, decoded = [], []
        for pos, (i, entry) in enumerate(zip(ids, self.images[ids]["image"])):
            try:
                decoded.append(decode_image(entry))
                kept.append(pos)
            except Exception as e:  # PIL raises several types for a broken file
                where = entry.get("path") or f"row {i} (embedded bytes)"
                if self.bad_images == "fail":
                    raise DataError(f"image {where}: cannot be decoded ({e})") from None
        data = self.text[[ids[p] for p in kept]] if kept else {}
        pixels = pixel_values(backbone, decoded) if decoded else None
        return data, pixels, kept
