"""Write synthetic scenes in the real corpus formats, so that they go through the real loaders.

``export_scenes(dataset, out, format)`` writes the scenes as LLaVA-Pretrain LCS-558K (a JSON list
of conversation records + ``images/``), COCO captions (``captions.json`` + ``instances.json`` +
``images/``; the categories are the shapes, their supercategory the colour) or Parquet (image
bytes + caption + attributes). Tests build their fixture files with it, and the toy presets can
run through ``data.corpora`` exactly as real data does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LCS_PROMPT = "Render a clear and concise summary of the photo.\n<image>"


def _write_images(ds: Any, root: Path) -> list[str]:
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    names = []
    for i, entry in enumerate(raw["image"]):
        name = f"{i // 1000:05d}/{i:09d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(entry["bytes"])
        names.append(name)
    return names


def export_scenes(ds: Any, out: Path, format: str) -> dict[str, str]:
    """Write ``ds`` (a scenes dataset) to ``out`` in ``format``; returns the files to point at."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if format == "lcs558k":
        names = _write_images(ds, out / "images")
        records = [
            {
                "id": f"{i:09d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": LCS_PROMPT},
                    {"from": "gpt", "value": caption},
                ],
                "source": f"{bg}+{style}",
            }
            for i, (name, caption, bg, style) in enumerate(
                zip(names, ds["caption"], ds["background"], ds["style"])
            )
        ]
        path = out / "blip_laion_cc_sbu_558k.json"
        path.write_text(json.dumps(records))
        return {"path": str(path), "image_root": str(out / "images")}
    if format == "coco":
        names = _write_images(ds, out / "images")
        shapes = sorted(set(ds["shape"]))
        cat_id = {s: i + 1 for i, s in enumerate(shapes)}
        images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
        captions = {
            "images": images,
            "annotations": [
                {"id": 10 * (i + 1), "image_id": i + 1, "caption": c}
                for i, c in enumerate(ds["caption"])
            ],
        }
        instances = {
            "images": images,
            "categories": [
                {"id": cat_id[s], "name": s, "supercategory": "shape"} for s in shapes
            ],
            "annotations": [
                {"id": 100 * (i + 1) + j, "image_id": i + 1, "category_id": cat_id[s]}
                for i, (s, n) in enumerate(zip(ds["shape"], ds["count"]))
                for j in range(n)
            ],
        }
        (out / "captions.json").write_text(json.dumps(captions))
        (out / "instances.json").write_text(json.dumps(instances))
        return {
            "path": str(out / "captions.json"),
            "image_root": str(out / "images"),
            "instances": str(out / "instances.json"),
        }
    if format == "parquet":
        path = out / "scenes.parquet"
        ds.to_parquet(str(path))
        return {"path": str(path)}
    raise ValueError(f"export_scenes: unknown format {format!r}")
