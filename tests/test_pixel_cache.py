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
    w0 = init_projector(toy, 3)
    task = ClientTask(4, 1, 0, np.arange(40, 72), tuple([1e-3] * 4), 8, {})
    deltas = []
    for reader in (RowReader.open(str(scenes)), RowReader.open(str(scenes), str(path))):
        res = train_client(toy, reader, task, w0, {}, LocalTraining(), TrainSettings())
        deltas.append(res.update.delta)
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
