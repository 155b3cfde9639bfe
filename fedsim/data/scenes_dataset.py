"""Synthetic scenes stored as an Arrow / ``datasets`` dataset (memory-mapped from disk).

Columns: ``image`` (``datasets.Image``, PNG bytes), ``caption``, ``question``, ``answer``,
``shape``, ``colour``, ``size``, ``position``, ``count``, ``background``, ``style``, ``scene_id``.
Datasets are cached under a content hash of (spec, seed, stream, number of scenes), built into a
temporary folder and renamed, so an interrupted build leaves nothing half-written behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from fedsim.data.synthetic import SceneSpec, iter_scenes

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "shape": datasets.Value("string"),
        "colour": datasets.Value("string"),
        "size": datasets.Value("string"),
        "position": datasets.Value("string"),
        "count": datasets.Value("int32"),
        "background": datasets.Value("string"),
        "style": datasets.Value("string"),
        "scene_id": datasets.Value("int64"),
    }
)
_CHUNK = 2000


def spec_to_dict(spec: SceneSpec) -> dict[str, object]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(spec).items()
    }


def scenes_key(spec: SceneSpec, seed: int, stream: int, num_scenes: int) -> str:
    """Content hash naming a scene dataset in the cache."""
    payload = json.dumps(
        {
            "spec": spec_to_dict(spec),
            "seed": seed,
            "stream": stream,
            "n": num_scenes,
            "v": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rows(args: tuple[SceneSpec, int, int, int, int]) -> dict[str, list[object]]:
    spec, seed, stream, lo, hi = args
    cols: dict[str, list[object]] = {name: [] for name in FEATURES}
    for scene, img in iter_scenes(spec, seed, stream, range(lo, hi)):
        cols["image"].append({"bytes": _png(img), "path": None})
        cols["caption"].append(scene.caption)
        cols["question"].append(scene.question)
        cols["answer"].append(scene.answer)
        for attr in (
            "shape",
            "colour",
            "size",
            "position",
            "count",
            "background",
            "style",
        ):
            cols[attr].append(getattr(scene, attr))
        cols["scene_id"].append(scene.scene_id)
    return cols


def generate_scenes(
    spec: SceneSpec, seed: int, stream: int, num_scenes: int, num_proc: int = 1
) -> datasets.Dataset:
    """Generate ``num_scenes`` scenes of ``stream`` in memory (chunks in ``num_proc`` processes)."""
    bounds = [(lo, min(lo + _CHUNK, num_scenes)) for lo in range(0, num_scenes, _CHUNK)]
    jobs = [(spec, seed, stream, lo, hi) for lo, hi in bounds]
    if num_proc > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_proc) as pool:
            parts = list(pool.map(_rows, jobs))
    else:
        parts = [_rows(job) for job in jobs]
    shards = [datasets.Dataset.from_dict(p, features=FEATURES) for p in parts]
    if not shards:
        return datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)
    return datasets.concatenate_datasets(shards)


def ensure_scenes(
    cache_dir: Path,
    spec: SceneSpec,
    seed: int,
    stream: int,
    num_scenes: int,
    num_proc: int | None = None,
) -> Path:
    """The folder of the scene dataset for these arguments in ``cache_dir`` (built if missing)."""
    datasets.disable_progress_bars()
    path = Path(cache_dir) / "scenes" / scenes_key(spec, seed, stream, num_scenes)
    if not (path / "dataset_info.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        procs = num_proc if num_proc is not None else min(os.cpu_count() or 1, 4)
        ds = generate_scenes(spec, seed, stream, num_scenes, num_proc=procs)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            ds.save_to_disk(str(tmp))
            try:
                os.rename(tmp, path)
            except OSError:  # another process finished first: keep theirs
                if not (path / "dataset_info.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
