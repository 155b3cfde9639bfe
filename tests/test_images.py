"""Training, the pixel cache and the Evaluator decode an image exactly as ``datasets`` does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fedsim.data.images import decode_image


def _jpeg(orientation: int | None) -> bytes:
    """A 40 × 20 JPEG whose left half is black and right half white, with an EXIF
    orientation tag (6: the viewer turns it 90° clockwise) or none."""
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, 20:] = 255
    img = Image.fromarray(a)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[Image.ExifTags.Base.Orientation] = orientation
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
def test_decode_matches_datasets_image_feature(orientation):
    import datasets

    entry = {"bytes": _jpeg(orientation), "path": None}
    ours = decode_image(entry)
    theirs = datasets.Image().decode_example(entry)
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_an_exif_rotated_photo_is_turned_upright():
    """Orientation 6 stores the picture turned 90° anticlockwise: decoded, the 40 × 20
    image is 20 × 40 (width × height), as a viewer and ``datasets`` show it."""
    img = decode_image({"bytes": _jpeg(6), "path": None})
    assert img.size == (20, 40)
    raw = Image.open(io.BytesIO(_jpeg(6)))
    assert raw.size == (40, 20)  # what decoding without the tag gave before


def test_a_change_of_decoding_is_a_different_cache(tmp_path, monkeypatch):
    """Pixel and feature caches built under another decoding are never reused."""
    from types import SimpleNamespace

    from fedsim.data import pixel_cache

    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_text('{"_fingerprint": "abc", "_data_files": []}')
    proc = SimpleNamespace(to_dict=lambda: {"size": 32})
    before = pixel_cache.cache_path(tmp_path, data, proc)
    key_before = pixel_cache._source_key(data, [])
    monkeypatch.setattr(pixel_cache, "DECODE", "stored-as-read")
    assert pixel_cache.cache_path(tmp_path, data, proc) != before
    assert pixel_cache._source_key(data, []) != key_before
