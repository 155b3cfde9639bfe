"""An LCS-558K-layout corpus of any size: the conversations JSON, the metadata JSON, the images.

Laid out as LLaVA-Pretrain ships it (``blip_laion_cc_sbu_558k.json``, ``..._meta.json`` with each
image's original ``url``, ``images/<5 digits>/<9 digits>.jpg``), with ``hosts`` web hosts drawn
with Zipf-like frequencies (a long tail, as real LCS-558K has). Every image of a folder is a hard link to
one small JPEG, so 558 128 of them cost inodes, not disk. ``python tests/lcs_layout.py DIR [N [H]]``
writes one (the scale test of ``fedsim scenarios show`` in the README uses N = 558128, H = 2000).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def write_lcs_layout(root: Path, n: int, hosts: int, seed: int = 0) -> Path:
    """Write the corpus under ``root``; returns ``root``."""
    from PIL import Image

    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    one = root / "one.jpg"
    Image.new("RGB", (8, 8), (120, 30, 200)).save(one)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, hosts + 1)  # Zipf(1): a few big hosts, a long tail
    host_of = rng.choice(hosts, size=n, p=weights / weights.sum())
    records, meta = [], []
    for i in range(n):
        rel = f"{i // 10000:05d}/{i:09d}.jpg"
        target = images / rel
        if (
            i % 10000 == 0
        ):  # a folder of 10 000, as LLaVA-Pretrain's; links per file < 65 000
            target.parent.mkdir(exist_ok=True)
            first = target
            if not target.exists():
                shutil.copyfile(one, target)
        elif not target.exists():
            os.link(first, target)
        records.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"a picture number {i}"},
                ],
            }
        )
        meta.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "url": f"https://www.host{host_of[i]}.example/img/{i}.jpg",
                "blip_caption": f"a picture number {i}",
            }
        )
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    (root / "blip_laion_cc_sbu_558k_meta.json").write_text(json.dumps(meta))
    return root


def corpus_override(root: Path) -> str:
    """``--set`` value of ``data.corpora`` for the corpus (with the source key, as
    ``lcs558k-source`` has it)."""
    return (
        f"data.corpora=[{{format: lcs558k, path: {root}/blip_laion_cc_sbu_558k.json, "
        f"image_root: {root}/images, meta: {root}/blip_laion_cc_sbu_558k_meta.json, "
        "domain_key: url, domain_regex: 'https?://(?:www\\.)?([^/:]+)'}]"
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 558128
    h = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    write_lcs_layout(out, n, h)
    print(corpus_override(out))
