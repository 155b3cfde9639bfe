"""A run's setup before Ray's work: its inputs checked, data and client shards.

Everything here is decided by the config alone (and the data it names): the backbone spec, the
training rows on disk and the held-out scenes, each client's shard, the participation spec and
the per-step learning rates. :func:`prepare` does it all before Ray starts, so bad input fails
before anything is written (Ray itself is started or joined by :mod:`fedsim.raystart`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.config import Config, is_toy
from fedsim.configtools import ConfigError
from fedsim.data.loaders import ensure_corpus, missing_files
from fedsim.data.pixel_cache import (
    ensure_pixel_cache,
    known_pixel_cache,
    remember_pixel_cache,
)
from fedsim.data.rows import read_saved_table
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.models.backbone import load_image_processor
from fedsim.models.spec import (
    ModelSpec,
    check_scene_fits_backbone,
    read_manifest,
    resolve_backbone,
)
from fedsim.runio import cache_folder
from fedsim.scenarios.participation import ParticipationSpec, plan_round
from fedsim.scenarios.partition import (
    by_domain,
    dirichlet,
    dirichlet_sized,
    iid,
    power_law_sizes,
    quantity,
)
from fedsim.scenarios.silos import caption_transform
from fedsim.schedule import lr_at
from fedsim.startup import mark
from fedsim.training import TrainSettings

# The synthetic dataset is fixed (the run seed drives partition, sampling and training, not the
# data); its streams differ from those the toy build pre-trains on.
DATA_SEED = 0

TRAIN_STREAM = 1

EVAL_STREAM = 2  # the test split: what runs report

VALIDATION_STREAM = 3  # the validation split: what `fedsim sweep` selects on


def eval_stream(cfg: Config) -> int:
    """The generator stream of the run's held-out scenes (``data.eval_split``)."""
    return VALIDATION_STREAM if cfg.data.eval_split == "validation" else EVAL_STREAM


@dataclass
class Prepared:
    """Resolved inputs of a run: backbone spec, dataset folders and client shards."""

    model: ModelSpec
    train_path: Path
    eval_path: Path
    shards: list[np.ndarray]
    pixel_path: str | None = None
    feature_path: str | None = None


def cache_root(cfg: Config) -> Path:
    """``cfg.cache_dir`` or the default cache, checked (see :func:`fedsim.runio.cache_folder`)."""
    return cache_folder(cfg.cache_dir)


def missing_inputs(cfg: Config, model: bool = True) -> list[str]:
    """Every input path the config names that does not exist (backbone, LM, corpus files);
    ``model=False``: the data's only (``scenarios show`` loads no model)."""

    out = []
    if (
        model
        and not is_toy(cfg.model.backbone)
        and not Path(cfg.model.backbone).expanduser().exists()
    ):
        out.append(f"model.backbone {cfg.model.backbone!r}")
    if model and cfg.model.lm and not Path(cfg.model.lm).expanduser().exists():
        out.append(f"model.lm {cfg.model.lm!r}")
    return out + missing_files(getattr(cfg.data, "corpora", ()))


def check_inputs(cfg: Config, model: bool = True) -> None:
    """One error listing every missing input, before anything is written."""
    cache_root(cfg)  # a file where the cache folder should be
    missing = missing_inputs(cfg, model)
    if missing:
        raise ConfigError(
            f"missing input{'s' if len(missing) > 1 else ''} for scenario "
            f"{cfg.scenario.name!r}: " + "; ".join(missing)
        )


def prepare(
    cfg: Config, report: Callable[[str, int, int, float], None] | None = None
) -> Prepared:
    """Everything a run needs before Ray starts: backbone, data, partition."""
    model = resolve_backbone(cfg, report)
    mark("backbone_resolved")
    check_scene_fits_backbone(cfg, read_manifest(model))
    cache = cache_root(cfg)
    train_path = training_data(cfg)
    eval_path = ensure_scenes(
        cache, cfg.data.scene, DATA_SEED, eval_stream(cfg), cfg.data.eval_scenes
    )
    try:
        shards = partition(cfg, train_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k, shard in enumerate(shards):
        if len(shard) == 0:
            raise ConfigError(
                f"scenario: client {k} has no data under partition {cfg.scenario.partition!r}"
            )
    pixel_path = None
    # auto: generated scenes only (real corpora at full resolution are far larger than 4 GiB).
    if cfg.data.pixel_cache == "on" or (
        cfg.data.pixel_cache == "auto" and not cfg.data.corpora
    ):
        sources = (model.backbone_path, model.lm_path)
        found = known_pixel_cache(cache, train_path, sources)
        if found is None:
            processor = load_image_processor(model.backbone_path, model.lm_path)
            found = ensure_pixel_cache(
                cache, train_path, processor, cfg.data.pixel_cache, report
            )
            if found is not None:
                remember_pixel_cache(cache, train_path, sources, found)
        pixel_path = str(found) if found else None
    mark("data_ready")  # scenes, partition and the pixel-cache check
    return Prepared(model, train_path, eval_path, shards, pixel_path)


def training_data(cfg: Config) -> Path:
    """The training rows on disk: the built corpus of ``data.corpora``, or generated scenes."""
    if cfg.data.corpora:
        return ensure_corpus(
            cache_root(cfg), list(cfg.data.corpora), cfg.data.bad_images
        )
    return ensure_scenes(
        cache_root(cfg), cfg.data.scene, DATA_SEED, TRAIN_STREAM, cfg.data.num_scenes
    )


def partition(cfg: Config, train_path: Path) -> list[np.ndarray]:
    """Client shards (row ids) for the scenario's partitioner, composed with its quantity skew.

    The rows are read with pyarrow (:func:`read_saved_table`, memory-mapped as
    ``datasets.load_from_disk`` maps them): the driver imports no ``datasets`` for it.
    """
    sc = cfg.scenario
    skew = sc.quantity_skew
    table = read_saved_table(train_path)
    rows = table.num_rows
    if sc.partition == "iid":
        if skew > 0:
            return quantity(rows, sc.num_clients, skew, cfg.seed)
        return iid(rows, sc.num_clients, cfg.seed)
    columns = sc.label.split("+")
    for col in columns:
        if col not in table.column_names:
            raise ConfigError(
                f"scenario.label: {col!r} is not a column of the data ({', '.join(table.column_names)})"
            )
    # One key per row; several columns join as "a+b" (e.g. background+style).
    cols = [table.column(c).to_pylist() for c in columns]
    labels = np.array(["+".join(map(str, v)) for v in zip(*cols)])
    if sc.partition == "dirichlet":
        if skew > 0:
            sizes = power_law_sizes(len(labels), sc.num_clients, skew, cfg.seed)
            return dirichlet_sized(labels, sizes, sc.dirichlet_alpha, cfg.seed)
        return dirichlet(labels, sc.num_clients, sc.dirichlet_alpha, cfg.seed)
    return by_domain(labels, sc.num_clients, cfg.seed, skew)


def participation_spec(cfg: Config) -> ParticipationSpec:
    """The scenario's participation model (:meth:`ParticipationSpec.of` its fields)."""
    return ParticipationSpec.of(cfg.scenario)


def train_settings(cfg: Config, shards: Sequence[np.ndarray]) -> TrainSettings:
    """How every client trains: the config's optimizer, clipping and loss, and the caption
    transforms of the scenario's silos (which depend on the clients' sizes)."""
    return TrainSettings(
        optimizer=cfg.train.optimizer,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        loss=cfg.train.loss,
        qa_fraction=cfg.data.qa_fraction,
        max_update_norm=cfg.validation.max_update_norm,
        captions=caption_transform(cfg, [len(s) for s in shards]),
    )


def round_lrs(cfg: Config, rnd: int, steps: int) -> tuple[float, ...]:
    """The learning rate of each of round ``rnd``'s ``steps`` local steps (global schedule)."""
    return tuple(
        lr_at(
            (rnd - 1) * steps + s,
            cfg.rounds * steps,
            cfg.train.lr,
            cfg.train.warmup,
            cfg.train.schedule,
        )
        for s in range(steps)
    )


def eval_due(cfg: Config, rnd: int) -> bool:
    return rnd == cfg.rounds or (cfg.eval_every > 0 and rnd % cfg.eval_every == 0)


def federated_steps(
    cfg: Config, shards: list[np.ndarray], w0: dict[str, torch.Tensor]
) -> int:
    """Local steps a federated run of ``cfg`` takes per round, on average: the centralized run's
    steps per round, so that the upper bound sees the same number of samples.

    Σ over the rounds of each round's cohort's steps (:func:`plan_round`, the same pure function
    the federated run plans with: dropout, stragglers and device tiers under a time budget take
    steps away), divided by the rounds and rounded. Without those it is exactly
    ``cohort_size × local_steps``.
    """
    spec = participation_spec(cfg)
    sizes = np.array([len(s) for s in shards])
    upload = sum(
        v.numel() * 4 for v in w0.values()
    )  # the fp32 delta, as the run uploads
    total = sum(
        sum(
            plan_round(
                spec, sizes, cfg.train.local_steps, upload, cfg.seed, r
            ).steps.values()
        )
        for r in range(1, cfg.rounds + 1)
    )
    return max(1, round(total / cfg.rounds))
