"""The pixel cache holds the image processor's own output and changes no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.algorithms.base import LocalTraining
from fedsim.data import pixel_cache
from fedsim.data.collate import pixel_values
from fedsim.data.rows import RowReader
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec
from fedsim.models.backbone import init_projector
from fedsim.training import ClientTask, TrainSettings, train_client

SPEC = SceneSpec(styles=("filled", "outline"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return ensure_scenes(tmp_path_factory.mktemp("scenes"), SPEC, 0, 5, 300)


def test_cache_equals_the_processor_image_by_image(toy, scenes, tmp_path):
    import datasets

    path = pixel_cache.ensure_pixel_cache(tmp_path, scenes, toy.image_processor)
    assert path is not None and path.exists()
    ds = datasets.load_from_disk(str(scenes))
    store = pixel_cache.PixelStore(path)
    assert len(store) == len(ds)
    for rows in ([0], [5, 17, 299], list(range(100, 140))):
        expected = pixel_values(toy, ds[rows]["image"])
        assert torch.equal(store[rows], expected)
    # A second call finds the file instead of building it again.
    before = path.stat().st_mtime_ns
    assert pixel_cache.ensure_pixel_cache(tmp_path, scenes, toy.image_processor) == path
    assert path.stat().st_mtime_ns == before


def test_cache_is_keyed_by_processor_and_respects_mode(
    toy, scenes, tmp_path, monkeypatch
):
    import copy

    other = copy.deepcopy(toy.image_processor)
    other.image_mean = [0.4, 0.4, 0.4]
    a = pixel_cache.cache_path(tmp_path, scenes, toy.image_processor)
    b = pixel_cache.cache_path(tmp_path, scenes, other)
    assert a != b
    assert pixel_cache.ensure_pixel_cache(tmp_path, scenes, other, "off") is None
    monkeypatch.setattr(pixel_cache, "AUTO_MAX_BYTES", 1000)
    assert pixel_cache.ensure_pixel_cache(tmp_path, scenes, other, "auto") is None
    assert pixel_cache.ensure_pixel_cache(tmp_path, scenes, other, "on") == b


def test_interrupted_build_leaves_nothing(toy, scenes, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pixel_cache.process

    def failing(processor, images):
        calls["n"] += 1
        if calls["n"] == 2:  # the first is the shape probe; fail inside the build loop
            raise KeyboardInterrupt
        return real(processor, images)

    monkeypatch.setattr(pixel_cache, "process", failing)
    with pytest.raises(KeyboardInterrupt):
        pixel_cache.ensure_pixel_cache(tmp_path, scenes, toy.image_processor)
    assert list((tmp_path / "pixels").iterdir()) == []


def test_training_with_and_without_the_cache_is_bit_identical(toy, scenes, tmp_path):
    path = pixel_cache.ensure_pixel_cache(tmp_path, scenes, toy.image_processor)
    task = ClientTask(4, 1, 0, np.arange(40, 72), tuple([1e-3] * 4), 8, {})
    _same_training_with_and_without(toy, scenes, path, task)


def _same_training_with_and_without(toy, dataset, pixel_path, task) -> None:
    """One client's delta reading pixels per step and from the cache: the same bits."""
    w0 = init_projector(toy, 3)
    deltas = []
    for pixels in (None, str(pixel_path)):
        reader = RowReader.open(str(dataset), pixels)
        res = train_client(toy, reader, task, w0, {}, LocalTraining(), TrainSettings())
        deltas.append(res.update.delta)
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def _corpus(tmp_path, scenes, n: int, broken: int | None = None):
    """A stored corpus (images as {bytes, path} structs) of the first ``n`` scenes' PNGs."""
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedsim.data.loaders import CorpusSpec, build_corpus

    ds = datasets.load_from_disk(str(scenes)).select(range(n))
    images = []
    for i, im in enumerate(ds["image"]):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = b"not a png" if i == broken else buf.getvalue()
        images.append({"bytes": data, "path": f"scene-{i}.png"})
    table = pa.table({"image": images, "caption": ds["caption"]})
    pq.write_table(table, tmp_path / "c.parquet")
    spec = CorpusSpec(format="parquet", path=str(tmp_path / "c.parquet"))
    build_corpus([spec], tmp_path / "corpus")
    return tmp_path / "corpus"


def test_pixel_cache_on_a_corpus_equals_decoding_per_step(toy, scenes, tmp_path):
    corpus = _corpus(tmp_path, scenes, 24)
    path = pixel_cache.ensure_pixel_cache(tmp_path, corpus, toy.image_processor, "on")
    assert path is not None
    task = ClientTask(4, 1, 0, np.arange(0, 16), tuple([1e-3] * 2), 8, {})
    _same_training_with_and_without(toy, corpus, path, task)


def test_a_corpus_image_that_does_not_decode_keeps_the_per_step_path(
    toy, scenes, tmp_path
):
    corpus = _corpus(tmp_path, scenes, 12, broken=7)
    assert (
        pixel_cache.ensure_pixel_cache(tmp_path, corpus, toy.image_processor, "on")
        is None
    )
    assert not list((tmp_path / "pixels").glob("*"))  # no partial file left


@pytest.mark.parametrize("word, mode", [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_unquoted_on_and_off_in_yaml(tmp_path, word, mode):
    """YAML 1.1 reads unquoted on/off as booleans; the config takes the word back."""
    from fedsim.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  pixel_cache: {word}\n")
    assert load_config(str(path)).data.pixel_cache == mode
    assert load_config(None, [f"data.pixel_cache={word}"]).data.pixel_cache == mode
