"""Image decoding shared by corpus building, the pixel cache and the row reader."""

from __future__ import annotations

import io
from typing import Any


def decode_image(entry: dict[str, Any]) -> Any:
    """A PIL image from a ``datasets.Image`` storage entry, as ``datasets`` decodes it."""
    from PIL import Image

    if entry.get("bytes"):
        image = Image.open(io.BytesIO(entry["bytes"]))
    elif entry.get("path"):
        image = Image.open(entry["path"])
    else:
        raise OSError("no bytes and no path")
    image.load()
    return image
