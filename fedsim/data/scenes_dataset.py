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
from typing import Any

import numpy as np
from PIL import Image

from fedsim.data.synthetic import SceneSpec, iter_scenes

#: The scene attributes stored as columns of their own.
ATTRIBUTES = ("shape", "colour", "size", "position", "count", "background", "style")
#: The columns, in order; their ``datasets`` types are :func:`features` (imported on use: a
#: run whose scenes are cached never imports ``datasets``, nor pandas with it).
COLUMNS = ("image", "caption", "question", "answer", *ATTRIBUTES, "scene_id")


def features() -> Any:
    """The scenes' ``datasets.Features``."""
    import datasets

    string = datasets.Value("string")
    types = {
        "image": datasets.Image(),
        "count": datasets.Value("int32"),
        "scene_id": datasets.Value("int64"),
    }
    return datasets.Features({c: types.get(c, string) for c in COLUMNS})


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
    cols: dict[str, list[object]] = {name: [] for name in COLUMNS}
    for scene, img in iter_scenes(spec, seed, stream, range(lo, hi)):
        cols["image"].append({"bytes": _png(img), "path": None})
        cols["caption"].append(scene.caption)
        cols["question"].append(scene.question)
        cols["answer"].append(scene.answer)
        for attr in ATTRIBUTES:
            cols[attr].append(getattr(scene, attr))
        cols["scene_id"].append(scene.scene_id)
    return cols


def generate_scenes(
    spec: SceneSpec, seed: int, stream: int, num_scenes: int, num_proc: int = 1
) -> Any:
    """Generate ``num_scenes`` scenes of ``stream`` in memory (chunks in ``num_proc`` processes):
    a ``datasets.Dataset``."""
    import datasets

    bounds = [(lo, min(lo + _CHUNK, num_scenes)) for lo in range(0, num_scenes, _CHUNK)]
    jobs = [(spec, seed, stream, lo, hi) for lo, hi in bounds]
    if num_proc > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_proc) as pool:
            parts = list(pool.map(_rows, jobs))
    else:
        parts = [_rows(job) for job in jobs]
    feats = features()
    shards = [datasets.Dataset.from_dict(p, features=feats) for p in parts]
    if not shards:
        return datasets.Dataset.from_dict({k: [] for k in COLUMNS}, features=feats)
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
    path = Path(cache_dir) / "scenes" / scenes_key(spec, seed, stream, num_scenes)
    if not (path / "dataset_info.json").exists():
        import datasets

        datasets.disable_progress_bars()
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
