"""Cached vision features (Ray Data batch inference → Arrow) change no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.algorithms.base import LocalTraining
from fedsim.data import feature_cache
from fedsim.data.feature_store import FeatureStore
from fedsim.data.rows import RowReader
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec
from fedsim.models.backbone import init_projector
from fedsim.models.spec import ModelSpec
from fedsim.training import ClientTask, TrainSettings, train_client, train_cohort


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return ensure_scenes(
        tmp_path_factory.mktemp("scenes"), SceneSpec(styles=("filled",)), 0, 5, 300
    )


@pytest.mark.slow
def test_features_equal_the_encoder_and_training_is_unchanged(
    toy, toy_path, scenes, tmp_path, ray_session
):
    spec = ModelSpec(str(toy_path), None, "mlp2x_gelu", "float32", "cpu")
    path = feature_cache.ensure_feature_cache(tmp_path, spec, scenes, None)
    assert path.exists() and path.suffix == ".arrow"
    store = FeatureStore(path)
    plain = RowReader.open(str(scenes))
    assert len(store) == len(plain) == 300
    # The stored features are what transformers' get_image_features gives the projector.
    for rows in ([0], [7, 123, 299], list(range(40, 72))):
        _, pixels, _ = plain.read(rows, toy)
        assert torch.equal(store[rows], feature_cache.encoder_features(toy, pixels))
    # A second call finds the file.
    before = path.stat().st_mtime_ns
    assert feature_cache.ensure_feature_cache(tmp_path, spec, scenes, None) == path
    assert path.stat().st_mtime_ns == before

    cached = RowReader.open(str(scenes), feature_path=str(path))
    w0 = init_projector(toy, 3)
    tower = toy.model.model.vision_tower
    task = ClientTask(4, 1, 0, np.arange(40, 72), tuple([1e-3] * 4), 8, {})
    a = train_client(toy, plain, task, w0, {}, LocalTraining(), TrainSettings())
    b = train_client(toy, cached, task, w0, {}, LocalTraining(), TrainSettings())
    assert toy.model.model.vision_tower is tower  # the encoder is back after training
    for k in a.update.delta:
        assert torch.equal(a.update.delta[k], b.update.delta[k]), k
    assert a.update.loss == b.update.loss
    # And inside a cohort.
    tasks = [task, ClientTask(9, 1, 0, np.arange(100, 124), tuple([1e-3] * 3), 8, {})]
    ca = train_cohort(toy, plain, tasks, [w0, w0], {}, LocalTraining(), TrainSettings())
    cb = train_cohort(
        toy, cached, tasks, [w0, w0], {}, LocalTraining(), TrainSettings()
    )
    for x, y in zip(ca, cb):
        for k in x.update.delta:
            assert torch.equal(x.update.delta[k], y.update.delta[k]), k


def test_default_strategy_drops_a_placeholder_not_a_feature(toy):
    tower = feature_cache.CachedVisionTower(2, "default")
    feats = torch.randn(3, 5, 4)
    out = tower(feats)
    # get_image_features drops position 0 under "default": what remains is the cache.
    assert len(out.hidden_states) == 3
    assert torch.equal(out.hidden_states[-2][:, 1:], feats)
    full = feature_cache.CachedVisionTower(2, "full")(feats)
    assert torch.equal(full.hidden_states[-1], feats)


def test_several_feature_layers_are_refused(toy):
    import copy

    model = copy.copy(toy.model)
    model.config = copy.deepcopy(toy.model.config)
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(feature_cache.FeatureCacheError, match="vision_feature_layer"):
        feature_cache.feature_selection(model)


@pytest.mark.slow
def test_run_with_the_feature_cache_gives_the_same_bits(
    tmp_path, toy_path, cache_dir, ray_session
):
    import json

    from small_runs import NO_EVAL, small_run

    runs = {}
    for flag in ("false", "true"):
        runs[flag] = small_run(
            tmp_path / flag,
            cache_dir,
            *NO_EVAL,
            "algorithm.name=fedprox",
            f"data.feature_cache={flag}",
        )
    for k, v in runs["false"].weights.items():
        assert torch.equal(v, runs["true"].weights[k]), k
    assert list((cache_dir / "features").glob("*.arrow"))
    loss = [
        json.loads(x)["loss"]
        for x in (tmp_path / "true" / "metrics.jsonl").read_text().splitlines()[1:]
    ]
    assert loss == [r["loss"] for r in runs["false"].history[1:]]
