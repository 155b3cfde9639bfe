"""Image decoding shared by corpus building, the pixel cache, the row reader and the Evaluator."""

from __future__ import annotations

import io
from typing import Any

#: What :func:`decode_image` does, in the keys of every cache of decoded pixels or features:
#: a change of decoding is a different cache. "exif-transpose": EXIF orientation applied (as
#: ``datasets.Image`` decodes since datasets 2.x); before it, pixels were stored as read.
DECODE = "exif-transpose"


def decode_image(entry: dict[str, Any]) -> Any:
    """A PIL image from a ``datasets.Image`` storage entry, as ``datasets`` decodes it:
    opened from the bytes (else the path), loaded, and turned upright by its EXIF
    orientation tag when it has one (``datasets.features.Image.decode_example``)."""
    from PIL import Image, ImageOps

    if entry.get("bytes"):
        image = Image.open(io.BytesIO(entry["bytes"]))
    elif entry.get("path"):
        image = Image.open(entry["path"])
    else:
        raise OSError("no bytes and no path")
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image
