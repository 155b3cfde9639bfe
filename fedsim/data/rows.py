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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.collate import pixel_values
from fedsim.data.feature_store import FeatureStore
from fedsim.data.images import decode_image
from fedsim.data.loaders import DataError
from fedsim.data.pixel_cache import PixelStore


def read_saved_table(dataset_path: str | Path) -> Any:
    """A dataset folder written by ``datasets.save_to_disk``, as one memory-mapped pyarrow
    Table, read with pyarrow alone: the processes that only read rows (workers, the
    Evaluator) import neither ``datasets`` nor pandas (~90 MB and ~0.6 s each).

    ``state.json`` lists the data files — Arrow IPC streams holding the rows in order
    (``save_to_disk`` writes an indices mapping out) — and the columns its format shows; they
    are memory-mapped as ``datasets.load_from_disk`` maps them.
    """
    import pyarrow as pa

    root = Path(dataset_path)
    state = json.loads((root / "state.json").read_text(encoding="utf-8"))
    tables = [
        pa.ipc.open_stream(pa.memory_map(str(root / f["filename"]))).read_all()
        for f in state["_data_files"]
    ]
    if not tables:
        raise ValueError(f"{root / 'state.json'}: no data files")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    columns = state.get("_format_columns")
    return table.select(columns) if columns else table


def take_rows(column: Any, ids: Sequence[int]) -> list[Any]:
    """``column.take(ids).to_pylist()``, element by element: Arrow's ``take`` kernel imports
    pandas into the process on its first call (~150 modules, ~60 MB resident in every worker
    for good); a step's few dozen rows cost well under a millisecond this way."""
    return [column[int(i)].as_py() for i in ids]


class RowReader:
    """``read(rows, backbone)`` → (the kept rows' non-image columns, their pixels, kept).

    With a feature cache the "pixels" are the rows' cached vision features (see
    :mod:`fedsim.data.feature_cache`); training then runs :class:`CachedVisionTower`.
    """

    def __init__(
        self,
        table: Any,
        pixel_path: str | None = None,
        bad_images: str = "skip",
        feature_path: str | None = None,
    ) -> None:
        #: The rows: a pyarrow Table (memory-mapped when read by :meth:`open`).
        self.table = table
        length = table.num_rows
        self.pixels = PixelStore(pixel_path) if pixel_path else None
        #: Cached vision features: ``read`` then returns them in place of pixel values.
        self.features = FeatureStore(feature_path) if feature_path else None
        if self.features is not None and len(self.features) != length:
            raise ValueError(
                f"feature cache {feature_path}: {len(self.features)} rows for a dataset of {length}"
            )
        if self.pixels is not None and len(self.pixels) != length:
            raise ValueError(
                f"pixel cache {pixel_path}: {len(self.pixels)} rows for a dataset of {length}"
            )
        self.bad_images = bad_images
        self.text_columns = [c for c in table.column_names if c != "image"]
        self.length = length

    @classmethod
    def open(
        cls,
        dataset_path: str,
        pixel_path: str | None = None,
        bad_images: str = "skip",
        feature_path: str | None = None,
    ) -> RowReader:
        """The rows of a dataset folder (``datasets.save_to_disk``), read with pyarrow."""
        return cls(read_saved_table(dataset_path), pixel_path, bad_images, feature_path)

    @classmethod
    def of_dataset(
        cls, dataset: Any, pixel_path: str | None = None, bad_images: str = "skip"
    ) -> RowReader:
        """The rows of a ``datasets.Dataset`` (its indices mapping applied; images as stored)."""
        return cls(dataset.with_format("arrow")[:], pixel_path, bad_images)

    def columns(self, ids: Sequence[int]) -> dict[str, list[Any]]:
        """The non-image columns of rows ``ids``, as Python values."""
        return {
            name: take_rows(self.table.column(name), ids) for name in self.text_columns
        }

    def __len__(self) -> int:
        return self.length

    def read(
        self, rows: Sequence[int] | np.ndarray, backbone: Any
    ) -> tuple[dict[str, list[Any]], torch.Tensor | None, list[int]]:
        """The rows' columns and pixels, and the positions (in ``rows``) that were kept."""
        ids = [int(r) for r in rows]
        if self.features is not None:
            feats = self.features[ids].to(backbone.model.dtype)
            return self.columns(ids), feats, list(range(len(ids)))
        if self.pixels is not None:
            pixels = self.pixels[ids].to(backbone.model.dtype)
            return self.columns(ids), pixels, list(range(len(ids)))
        kept, decoded = [], []
        entries = take_rows(self.table.column("image"), ids)
        for pos, (i, entry) in enumerate(zip(ids, entries)):
            try:
                decoded.append(decode_image(entry))
                kept.append(pos)
            except Exception as e:  # PIL raises several types for a broken file
                where = entry.get("path") or f"row {i} (embedded bytes)"
                if self.bad_images == "fail":
                    raise DataError(f"image {where}: cannot be decoded ({e})") from None
        data = self.columns([ids[p] for p in kept]) if kept else {}
        pixels = pixel_values(backbone, decoded) if decoded else None
        return data, pixels, kept
