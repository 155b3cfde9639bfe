"""Pixel cache: the backbone's image processor applied once per dataset, kept as a memory-mapped array.

A training step otherwise decodes its images (PNG) and runs the image processor on them — on the
toy backbone a fifth of the step on CPU, repeated for every pass over the data, in every worker.
With the cache, ``pixel_values`` of any rows are a slice of one ``.npy`` file that all workers map
from the page cache. The values are the processor's own output, computed image by image, so a run
gives the same bits with and without the cache (tests/test_pixel_cache.py).

The file is keyed by the dataset's fingerprint and the processor's configuration, written under a
temporary name and renamed, so an interrupted build leaves nothing half-written. ``auto`` (the
default of ``data.pixel_cache``) builds it only when it stays under ``AUTO_MAX_BYTES``: real
image–text corpora at 336 px are far larger than their JPEGs and keep the per-step path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.images import decode_image

AUTO_MAX_BYTES = 4 * 1024**3
_BATCH = 512


def _fingerprint(dataset_path: Path) -> str:
    """The saved dataset's identity: its Arrow files' fingerprint (``state.json``), else its path."""
    state = Path(dataset_path) / "state.json"
    if state.exists():
        data = json.loads(state.read_text())
        return str(data.get("_fingerprint")) + json.dumps(
            data.get("_data_files"), sort_keys=True
        )
    return str(Path(dataset_path).resolve())


def cache_path(cache_dir: Path, dataset_path: Path, image_processor: Any) -> Path:
    """Where the pixel cache of this dataset under this processor lives."""
    proc = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    key = hashlib.sha256(
        (_fingerprint(dataset_path) + "\n" + proc).encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / "pixels" / f"{key}.npy"


def process(image_processor: Any, images: Sequence[Any]) -> np.ndarray:
    """The processor's ``pixel_values`` for ``images`` as float32 ``[B, C, H, W]``.

    ``images``: PIL images (generated scenes, an Image feature) or the ``{bytes, path}``
    structs stored corpora keep, decoded here exactly as training decodes them
    (:func:`fedsim.data.images.decode_image`), so both paths give the same pixels.
    """

    images = [decode_image(x) if isinstance(x, dict) else x for x in images]
    out = image_processor(list(images), return_tensors="pt")["pixel_values"]
    return out.to(torch.float32).numpy()


def ensure_pixel_cache(
    cache_dir: Path,
    dataset_path: Path,
    image_processor: Any,
    mode: str = "auto",
    report: Callable[[str, int, int, float], None] | None = None,
) -> Path | None:
    """The cache file for ``dataset_path`` (built if missing), or None when ``mode`` says not to."""
    if mode == "off":
        return None
    import datasets

    path = cache_path(cache_dir, dataset_path, image_processor)
    if path.exists():
        return path
    ds = datasets.load_from_disk(str(dataset_path)).select_columns(["image"])
    n = len(ds)
    if n == 0:
        return None
    try:
        first = process(image_processor, [ds[0]["image"]])
    except Exception:  # PIL raises several types for a broken file
        return None  # training decodes per step, where data.bad_images applies
    nbytes = n * first[0].nbytes
    if mode == "auto" and nbytes > AUTO_MAX_BYTES:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(n, *first.shape[1:])
        )
        for lo in range(0, n, _BATCH):
            hi = min(lo + _BATCH, n)
            try:
                arr[lo:hi] = process(image_processor, ds[lo:hi]["image"])
            except Exception:  # an image that does not decode: see above
                return None  # (the finally below removes the partial file)
            if report is not None:
                report("pixel cache", hi, n, 0.0)
        arr.flush()
        del arr
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class PixelStore:
    """Read-only access to a pixel cache: ``store[rows]`` → ``[len(rows), C, H, W]`` tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(rows)]))
