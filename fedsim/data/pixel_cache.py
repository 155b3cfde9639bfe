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

from fedsim.data.images import DECODE, decode_image

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
        (_fingerprint(dataset_path) + "\n" + proc + "\n" + DECODE).encode()
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
    """Read-only access to a pixel cache: ``store[rows]`` → ``[len(rows), C, H, W]`` tensor.

    Rows are read with ``os.pread`` rather than through a memory map: the bytes are the same,
    but the file's pages stay in the kernel's page cache (shared by every worker, reclaimable)
    instead of being mapped into each worker, where every page a worker ever touched counted
    in its resident memory (the whole 0.5 GB toy cache, once per worker, by the end of a run).
    A read costs one copy of the batch's pixels, which the mapped path made too
    (``np.ascontiguousarray`` of a fancy index).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # The header only (shape, dtype, where the data starts); the map is closed at once.
        header = np.load(self.path, mmap_mode="r")
        self.shape = tuple(int(d) for d in header.shape)
        self.dtype = header.dtype
        self.offset = int(header.offset)
        del header
        self.row_bytes = (
            int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        )
        self.fd: int | None = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        ids = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(ids), -1).view(np.uint8)  # [rows, row_bytes]
        for k, r in enumerate(ids):
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"pixel cache {self.path}: row {r} of {self.shape[0]}")
            at = self.offset + int(r) * self.row_bytes
            got = os.preadv(self.fd, [flat[k]], at)  # type: ignore[arg-type]
            if got != self.row_bytes:
                raise OSError(f"pixel cache {self.path}: short read at row {r}")
        return torch.from_numpy(out)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # a file descriptor does not travel: reopened

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# Finding a built cache without loading the image processor
#
# The cache's name hashes the processor's configuration (``to_dict()``), which needs the
# processor, which needs transformers' processing and model modules (seconds of imports and
# ~0.1 GB in the driver, which loads no model). The index below maps what decides that
# configuration — the backbone's top-level JSON files, byte for byte, and the transformers
# version — and the dataset's fingerprint to the file the processor named last time. A
# different file or version is a different key: the slow path then runs and records it.

INDEX = "index.json"


def _source_key(dataset_path: Path, sources: Sequence[str | Path | None]) -> str:
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update(_fingerprint(dataset_path).encode())
    h.update(version("transformers").encode())
    h.update(DECODE.encode())
    for src in sources:
        if src is None:
            continue
        folder = Path(src)
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def known_pixel_cache(
    cache_dir: Path, dataset_path: Path, sources: Sequence[str | Path | None]
) -> Path | None:
    """The cache file an earlier run's processor named for this dataset and backbone, if it
    is still there (None: unknown, look it up with the processor)."""
    index = Path(cache_dir) / "pixels" / INDEX
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    name = (
        known.get(_source_key(dataset_path, sources))
        if isinstance(known, dict)
        else None
    )
    if not isinstance(name, str) or "/" in name or not name.endswith(".npy"):
        return None
    path = Path(cache_dir) / "pixels" / name
    return path if path.is_file() else None


def remember_pixel_cache(
    cache_dir: Path,
    dataset_path: Path,
    sources: Sequence[str | Path | None],
    path: Path,
) -> None:
    """Record ``path`` as this dataset's cache under this backbone (write-then-rename)."""
    index = Path(cache_dir) / "pixels" / INDEX
    try:
        known = json.loads(index.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known[_source_key(dataset_path, sources)] = Path(path).name
    tmp = index.with_name(f".tmp-{os.getpid()}-{INDEX}")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, index)
