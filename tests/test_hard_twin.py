"""Hard twins: noisy silos and caption styles (fedsim.scenarios.silos), and their presets.

What is held here: the noisy set and the noisy rows are keyed by (seed, client, row) alone and
come in the configured shares; a noisy caption is wrong in every attribute and still well formed;
a styled caption names the same attributes in another word order, in words the toy tokenizer
has; with the transforms off (every shipped preset but toy-hard) training reads the dataset's
own bytes; the centralized run's pooled stream trains on the text the clients train on; bad
values are one-line errors; and toy-hard runs end to end.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from fedsim.config import DataConfig, load_config
from fedsim.configtools import ConfigError
from fedsim.data.synthetic import (
    CAPTION_ATTRIBUTES,
    CAPTION_STYLES,
    COLOURS,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_text,
    read_caption,
)
from fedsim.scenarios import presets
from fedsim.scenarios.partition import power_law_sizes
from fedsim.scenarios.silos import (
    STYLE_STREAM,
    CaptionTransform,
    caption_transform,
    client_styles,
    noisy_set,
    size_order,
    wrong_attributes,
)

#: Every attribute combination the scene vocabulary allows: 4 × 2 × 6 × 4 × 4 = 768.
ALL_ATTRS = [
    dict(count=c, size=s, colour=k, shape=h, position=p)
    for c, s, k, h, p in itertools.product(
        COUNT_WORDS, SIZES, COLOURS, SHAPES, POSITIONS
    )
]
SPEC = DataConfig().scene  # the scenes every toy preset trains on
VALUES = {
    "count": tuple(SPEC.counts),
    "size": tuple(SPEC.sizes),
    "colour": tuple(SPEC.colours),
    "shape": tuple(SPEC.shapes),
    "position": tuple(SPEC.positions),
}
#: A small toy-hard: its transforms on 20 clients, half of them noisy, over 2 000 scenes.
SMALL_HARD = [
    "data.num_scenes=2000",
    "scenario.num_clients=20",
    "scenario.cohort_size=2",
    "scenario.noisy_clients=0.5",
    "rounds=3",
    "train.local_steps=2",
    "train.batch_size=4",
]


def _sizes(shards):
    return [len(s) for s in shards]


def _equal_shards(cfg):
    """Ten rows a client: the transforms' on/off does not depend on the sizes."""
    return [np.arange(10 * k, 10 * k + 10) for k in range(cfg.scenario.num_clients)]


def _small_hard_sizes():
    """SMALL_HARD's client sizes: the power-law sizes its partition gives 2 000 rows."""
    return power_law_sizes(2000, 20, 1.0, seed=0)


def _transform(noisy, q, styles=(0,) * 10, seed=0) -> CaptionTransform:
    return CaptionTransform(
        seed=seed,
        noisy=frozenset(noisy),
        caption_noise=q,
        styles=tuple(styles),
        values=VALUES,
    )


@pytest.fixture(scope="module")
def scenes(cache_dir):
    """The 2 000 training scenes of tests/small_runs.py (cached), as a row reader."""
    from fedsim.data.rows import RowReader
    from fedsim.data.scenes_dataset import ensure_scenes
    from fedsim.prepare import DATA_SEED, TRAIN_STREAM

    path = ensure_scenes(cache_dir, SPEC, DATA_SEED, TRAIN_STREAM, 2000)
    return path, RowReader.open(str(path))


# --- the noisy set and the noisy rows ------------------------------------------------------------


def _size_cases():
    """Client sizes of several shapes: equal, power-law (toy-hard's 1/r), random integers."""
    rng = np.random.default_rng(11)
    yield np.full(20, 50)
    yield power_law_sizes(40_000, 100, 1.0, seed=0)
    yield power_law_sizes(2_000, 20, 1.0, seed=3)
    yield power_law_sizes(9_999, 37, 2.0, seed=1)
    for k in (7, 50, 1000):
        yield rng.integers(1, 500, size=k)


def _band_bound(sizes, m):
    """Half the largest gap between neighbouring sizes inside one of the m size bands."""
    desc = np.sort(np.asarray(sizes))[::-1]
    return (
        max(
            (float(np.max(-np.diff(band))) if len(band) > 1 else 0.0)
            for band in np.array_split(desc, m)
        )
        / 2
    )


@pytest.mark.parametrize("share", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_noisy_set_has_the_count_and_tracks_the_band_means(share):
    """The count is round(share · K) exactly, and the noisy rows are within half the largest
    within-band gap of Σ_b mean(band b).

    Why the bound holds: let e_b be the noisy rows minus the band means after band b (e_0 = 0).
    Band b's target is t = mean_b − e_{b−1}. If t lies in [min_b, max_b], the member nearest t
    is picked and |e_b| ≤ half the largest gap in band b. If t < min_b, then e_{b−1} > mean_b −
    min_b ≥ 0 and picking min_b gives e_b = e_{b−1} − (mean_b − min_b) ∈ [0, e_{b−1}]; t > max_b
    is the mirror case. So |e_b| ≤ max(|e_{b−1}|, gap_b / 2), and by induction the final error is
    at most the largest half-gap of any band. Sizes are integers: the check is exact arithmetic
    up to float64 sums of ≤ 40 000 (exact)."""
    for sizes in _size_cases():
        k = len(sizes)
        a, b = noisy_set(sizes, share, seed=3), noisy_set(sizes, share, seed=3)
        assert a == b and a <= set(range(k))
        m = int(np.floor(share * k + 0.5))
        assert len(a) == m and abs(len(a) / k - share) <= 1 / (2 * k)
        if m == 0:
            continue
        desc = np.sort(sizes)[::-1]
        target = sum(float(band.mean()) for band in np.array_split(desc, m))
        rows = float(np.asarray(sizes)[sorted(a)].sum())
        assert abs(rows - target) <= _band_bound(sizes, m) + 1e-9


def test_noisy_set_of_equal_sizes_is_a_seeded_draw():
    sizes = np.full(20, 50)
    a = noisy_set(sizes, 0.2, seed=3)
    # Equal sizes: every band is a tie, broken by the seeded order. Another seed giving the
    # same 4-of-20 set: here one band per 5 clients, so probability (1/5)⁴ = 1/625 per seed;
    # six other seeds all giving it: ≤ 625⁻⁶.
    assert {noisy_set(sizes, 0.2, seed=s) for s in range(4, 10)} != {a}


def test_toy_hard_noisy_silos_hold_a_fifth_of_the_rows_on_every_seed():
    """toy-hard's sizes (40 000 rows, 100 clients, n ∝ 1/r): 20 noisy silos holding the same rows
    on every seed (the pick depends on the sorted sizes alone, and those are a function of the
    rank), within the band bound of a fifth of the rows (bands of 5: Σ band means = rows / 5)."""
    totals, sets = set(), set()
    for seed in range(10):
        sizes = power_law_sizes(40_000, 100, 1.0, seed)
        noisy = noisy_set(sizes, 0.2, seed)
        assert len(noisy) == 20
        rows = int(sizes[sorted(noisy)].sum())
        assert abs(rows - 8_000) <= _band_bound(sizes, 20)
        totals.add(rows)
        sets.add(noisy)
    assert len(totals) == 1
    assert len(sets) > 1  # which clients: seeded (the ranks are a permutation)


def _loads(sizes, styles, n):
    return np.bincount(np.asarray(styles), weights=np.asarray(sizes), minlength=n)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_client_styles_balance_rows(n):
    """Greedy list scheduling, largest client first, to the style with the fewest rows.

    Why the bound holds: let j be the last client given to the style that ends fullest. When j
    was placed, that style held the fewest rows, so its rows then were ≤ every other style's
    rows then ≤ their final rows; nothing was added to it after j. So max − min ≤ size(j)."""
    for sizes in _size_cases():
        styles = client_styles(sizes, n, seed=0)
        assert styles == client_styles(sizes, n, seed=0)
        assert set(styles) <= set(range(n))
        load = _loads(sizes, styles, n)
        full = int(np.argmax(load))
        order = size_order(sizes, 0, STYLE_STREAM)
        last = [k for k in order if styles[k] == full][-1]
        assert load.max() - load.min() <= sizes[last]
        assert (
            styles[int(order[0])] == 0
        )  # the largest client writes the canonical caption
    assert set(client_styles(np.full(50, 3), 1, seed=0)) == {0}


def test_client_styles_of_equal_sizes_are_dealt_round_robin_over_a_seeded_order():
    sizes = np.full(100, 40)
    styles = client_styles(sizes, 4, seed=0)
    assert styles != client_styles(sizes, 4, seed=1)
    assert np.bincount(styles).tolist() == [25, 25, 25, 25]
    assert sorted(np.bincount(client_styles(np.full(10, 4), 3, seed=0))) == [3, 3, 4]


def test_toy_hard_styles_hold_a_quarter_of_the_rows_on_every_seed():
    """toy-hard: each style's rows differ from the mean (a quarter) by at most max − min ≤ the
    size of the last client placed on the fullest style (the bound above); under 1/r sizes that
    client is a small one, so the bound is a few hundred rows of 40 000, not the largest
    client's fifth. The loads are the same on every seed (the sorted sizes are)."""
    loads = set()
    for seed in range(10):
        sizes = power_law_sizes(40_000, 100, 1.0, seed)
        styles = client_styles(sizes, 4, seed)
        load = _loads(sizes, styles, 4)
        order = size_order(sizes, seed, STYLE_STREAM)
        last = [k for k in order if styles[k] == int(np.argmax(load))][-1]
        assert (
            sizes[last] < sizes.max() / 10
        )  # not the bound a uniform deal would leave
        assert np.all(np.abs(load - 10_000) <= sizes[last]), load
        loads.add(tuple(load.tolist()))
    assert len(loads) == 1


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_noisy_rows_are_keyed_by_seed_client_row_with_a_binomial_share(q):
    n = 20_000
    t = _transform({3, 8}, q)
    flags = np.array([t.is_noisy(3, r) for r in range(n)])
    # Keyed draws: another transform object, and the rows asked in reverse, give the same.
    again = _transform({3, 8}, q)
    assert [again.is_noisy(3, r) for r in reversed(range(n))] == flags[::-1].tolist()
    # Each row's first uniform from its own generator: the count is Binomial(n, q) with
    # σ = √(n q (1−q)) ≤ √(20 000 / 4) ≈ 71 rows. A 5σ two-sided band fails with probability
    # < 6e-7 per check (normal tail; n q (1−q) ≥ 1 800, so the normal approximation holds),
    # while a share off by 2 % (400 rows > 5σ at every q here) cannot pass.
    sigma = np.sqrt(n * q * (1 - q))
    assert abs(int(flags.sum()) - n * q) <= 5 * sigma
    # The second noisy client draws from other generators: its rows are not the first's.
    other = np.array([t.is_noisy(8, r) for r in range(n)])
    assert abs(int(other.sum()) - n * q) <= 5 * sigma
    assert not np.array_equal(flags, other)
    # A client outside the noisy set never gets a noisy row; another seed, other rows.
    assert not any(t.is_noisy(4, r) for r in range(2000))
    assert [_transform({3}, q, seed=1).is_noisy(3, r) for r in range(200)] != flags[
        :200
    ].tolist()


def test_toy_hard_noisy_rows_come_in_the_configured_shares(scenes):
    """Through the config: toy-hard's noisy silos and rows, over its partition of the data."""
    from fedsim.prepare import partition

    path, _ = scenes
    cfg = load_config("toy-hard", ["data.num_scenes=2000"])
    shards = partition(cfg, path)
    t = caption_transform(cfg, _sizes(shards))
    assert t is not None and len(t.noisy) == 20  # 0.2 × 100 clients exactly
    hits = [t.is_noisy(k, int(r)) for k in sorted(t.noisy) for r in shards[k]]
    n, q = len(hits), cfg.scenario.caption_noise
    # Binomial(n, q) again (n is the noisy silos' rows, a few hundred): within 5σ.
    assert n > 100
    assert abs(sum(hits) - n * q) <= 5 * np.sqrt(n * q * (1 - q))
    clean = [k for k in range(100) if k not in t.noisy]
    assert not any(t.is_noisy(k, int(r)) for k in clean for r in shards[k])


# --- what a noisy or styled caption says ---------------------------------------------------------


def test_noisy_captions_are_wrong_in_every_attribute_and_well_formed(scenes):
    from fedsim.eval.toy import parse_caption

    _, reader = scenes
    ids = list(range(600))
    data = reader.columns(ids)
    styles = [i % len(CAPTION_STYLES) for i in range(20)]
    t = _transform(range(20), 1.0, styles)  # every row of every client is noisy
    owners = [i % 20 for i in ids]
    out = t.apply(data, ids, owners)
    for i, owner in enumerate(owners):
        truth = {a: data[a][i] for a in CAPTION_ATTRIBUTES}
        said = read_caption(out["caption"][i], styles[owner])
        assert said is not None, out["caption"][
            i
        ]  # parses back with its style's grammar
        for a in CAPTION_ATTRIBUTES:
            assert said[a] != truth[a], (a, out["caption"][i], data["caption"][i])
            assert said[a] in VALUES[a]  # a value the scenes can have
        # The evaluation's own parser reads every style the same (word order is not scored).
        assert {a: parse_caption(out["caption"][i])[a] for a in said} == said
        assert out["answer"][i] == {"yes": "no", "no": "yes"}[data["answer"][i]]
        assert out["question"][i] == data["question"][i]
    # Only caption and answer change; the input is not modified.
    assert {k: v for k, v in out.items() if k not in ("caption", "answer")} == {
        k: v for k, v in data.items() if k not in ("caption", "answer")
    }
    assert data == reader.columns(ids)


def test_wrong_attributes_leave_the_spec_when_it_allows_one_value():
    rng = np.random.default_rng(0)
    one = {**VALUES, "size": ("small",), "count": (1,)}  # a spec of one size and count
    for attrs in ALL_ATTRS[::7]:
        wrong = wrong_attributes(attrs, one, rng)
        assert all(wrong[a] != attrs[a] for a in CAPTION_ATTRIBUTES)
        assert read_caption(caption_text(**wrong)) == wrong


def test_styled_captions_carry_the_same_attributes_in_the_same_words(scenes):
    for attrs in ALL_ATTRS:
        texts = [caption_text(**attrs, style=s) for s in range(len(CAPTION_STYLES))]
        assert len(set(texts)) == len(texts)  # every style is another word order
        for s, text in enumerate(texts):
            assert read_caption(text, s) == attrs, text
            assert sorted(text.split()) == sorted(texts[0].split())
            # A caption of one style is not read as another's.
            assert all(
                read_caption(text, o) in (None, attrs)
                for o in range(len(CAPTION_STYLES))
            )
    # Style 0 is the dataset's own caption, byte for byte.
    _, reader = scenes
    data = reader.columns(list(range(2000)))
    for i, caption in enumerate(data["caption"]):
        attrs = {a: data[a][i] for a in CAPTION_ATTRIBUTES}
        assert caption_text(**attrs, style=0) == caption
    assert caption_text(
        count=2, size="small", colour="red", shape="triangle", position="top left"
    ) == ("two small red triangles at the top left")


def test_every_caption_the_transforms_write_tokenizes_without_unknown_tokens(toy_path):
    """How this is checked: every caption a transform can write is ``caption_text(attrs,
    style)`` for some attribute combination of the scene vocabulary (noisy ones too: their
    attributes are redrawn within it). All 768 combinations × 4 styles go through the shipped
    toy backbone's own tokenizer (its tokenizer.json, a word-level vocabulary whose unknown
    token is <unk>): no id may be <unk>, the ids decode back to the caption, and each caption
    has as many tokens as the canonical one (so fedsim.cost's predicted costs still hold)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(toy_path))
    assert tok.unk_token_id is not None
    checked = 0
    for attrs in ALL_ATTRS:
        canonical = tok(caption_text(**attrs), add_special_tokens=False)["input_ids"]
        for s in range(len(CAPTION_STYLES)):
            text = caption_text(**attrs, style=s)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, text
            assert tok.decode(ids) == text
            assert len(ids) == len(canonical) == len(text.split())
            checked += 1
    assert checked == 768 * len(CAPTION_STYLES)


# --- off means untouched -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["scenario.caption_styles=1"],
        ["scenario.noisy_clients=0.3", "scenario.caption_noise=0"],
        ["scenario.noisy_clients=0", "scenario.caption_noise=0.7"],
        [
            "scenario.noisy_clients=0.01",
            "scenario.caption_noise=0.7",
        ],  # 0.2 clients → 0
    ],
)
def test_transforms_off_build_nothing(overrides):
    from fedsim.prepare import train_settings

    cfg = load_config(None, overrides)
    shards = _equal_shards(cfg)
    assert caption_transform(cfg, _sizes(shards)) is None
    assert train_settings(cfg, shards).captions is None


def test_every_existing_preset_reads_the_dataset_bytes(scenes):
    """The presets shipped before hard twins (all but toy-hard) build no transform, so the
    training hook hands back the very rows read; their results cannot change."""
    from fedsim.prepare import train_settings
    from fedsim.training import ClientTask, training_text

    _, reader = scenes
    rows = np.arange(0, 2000, 37)
    data = reader.columns(rows.tolist())
    names = [n for n in presets() if n != "toy-hard"]
    assert {
        "toy-iid",
        "toy-dirichlet",
        "toy-domain",
        "toy-mixed",
        "toy-hard-iid",
    } <= set(names)
    for name in names:
        cfg = load_config(name)
        assert (
            cfg.scenario.noisy_clients,
            cfg.scenario.caption_noise,
            cfg.scenario.caption_styles,
        ) == (0.0, 0.0, 1), name
        settings = train_settings(cfg, _equal_shards(cfg))
        assert settings.captions is None, name
        task = ClientTask(5, 1, cfg.seed, rows, (1e-3,), len(rows))
        assert training_text(data, task, np.arange(len(rows)), settings) is data
    hard = load_config("toy-hard")
    assert caption_transform(hard, _sizes(_equal_shards(hard))) is not None


def test_style_zero_clean_clients_keep_their_rows_and_training_bits(toy, scenes):
    """Under toy-hard's transforms, a clean style-0 client trains on the dataset's bytes and
    to the same bits as with no transform; a styled client, on other text and other bits."""
    from fedsim.algorithms.base import LocalTraining
    from fedsim.models.backbone import init_projector
    from fedsim.training import ClientTask, TrainSettings, train_client, training_text

    _, reader = scenes
    cfg = load_config("toy-hard", SMALL_HARD)
    t = caption_transform(cfg, _small_hard_sizes())
    assert t is not None
    # Style 0 may hold only the largest client (balanced by rows), which may be noisy: the
    # two clients compared are made clean here, the rest of the transform kept.
    plain = t.styles.index(0)
    styled = next(k for k in range(20) if t.styles[k] != 0)
    t = dataclasses.replace(t, noisy=t.noisy - {plain, styled})
    rows = np.arange(100, 112)
    off, on = TrainSettings(optimizer="sgd"), TrainSettings(optimizer="sgd", captions=t)
    data = reader.columns(rows.tolist())
    for k in (plain, styled):
        task = ClientTask(k, 1, 0, rows, (2e-3, 2e-3, 2e-3), 4)
        text = training_text(data, task, np.arange(12), on)
        assert (text is data) == (k == plain)
        if k == styled:
            assert text["caption"] != data["caption"]
            assert text["answer"] == data["answer"]  # styles leave answers alone
    w = init_projector(toy, 1)

    def delta(k, settings):
        task = ClientTask(k, 1, 0, rows, (2e-3, 2e-3, 2e-3), 4)
        res = train_client(toy, reader, task, w, {}, LocalTraining(), settings)
        return res.update.delta

    a, b = delta(plain, off), delta(plain, on)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c, d = delta(styled, off), delta(styled, on)
    assert not all(torch.equal(c[n], d[n]) for n in c)


# --- the centralized run trains on the clients' text ---------------------------------------------


def test_pooled_stream_transforms_each_row_as_its_owner_does(toy_path, scenes):
    from fedsim.data.streams import Cursor, take
    from fedsim.models.spec import ModelSpec
    from fedsim.pooled import POOLED_CLIENT, pooled_plan, pooled_task
    from fedsim.prepare import Prepared, partition, train_settings
    from fedsim.training import ClientTask, training_text

    path, reader = scenes
    cfg = load_config("toy-hard", [*SMALL_HARD, "algorithm.name=centralized"])
    shards = partition(cfg, path)
    owner_of = {int(r): k for k, rows in enumerate(shards) for r in rows}
    model = ModelSpec(str(toy_path), None, "mlp2x_gelu", "float32", "cpu")
    plan = pooled_plan(cfg, Prepared(model, path, path, shards), {})
    assert sorted(plan.rows.tolist()) == sorted(owner_of)
    fed = train_settings(cfg, shards)
    changed = seen = 0
    cursor = Cursor()
    for rnd in range(1, cfg.rounds + 1):
        rows, cursor = take(
            plan.rows, cursor, plan.steps * plan.batch_size, cfg.seed, POOLED_CLIENT
        )
        for world in (1, 2):  # one Ray Train worker, or the batch split over two
            for rank in range(world):
                task = pooled_task(plan, rnd, rows, rank, world, {})
                data = reader.columns(task.rows.tolist())
                pooled = training_text(
                    data, task, np.arange(len(task.rows)), plan.settings
                )
                for i, r in enumerate(task.rows.tolist()):
                    # The federated run: the owning client reads row r in a task of its own.
                    own = ClientTask(owner_of[r], rnd, cfg.seed, np.array([r]), (), 1)
                    one = reader.columns([r])
                    theirs = training_text(one, own, [0], fed)
                    assert pooled["caption"][i] == theirs["caption"][0], (r, rnd)
                    assert pooled["answer"][i] == theirs["answer"][0], (r, rnd)
                    changed += pooled["caption"][i] != data["caption"][i]
                    seen += 1
    # Three quarters of the clients write another style, a half of the rest are noisy:
    # most rows change, so the comparison above is not between untouched rows.
    assert changed > seen / 2


def test_pooled_task_with_owners_trains_to_the_owners_bits(toy, scenes):
    """The worker's hook keys the transform by each row's owner, not by the task's client."""
    from fedsim.algorithms.base import LocalTraining
    from fedsim.models.backbone import init_projector
    from fedsim.training import ClientTask, TrainSettings, train_client

    _, reader = scenes
    t = caption_transform(load_config("toy-hard", SMALL_HARD), _small_hard_sizes())
    assert t is not None
    k = next(k for k in range(1, 20) if k in t.noisy and t.styles[k] != 0)
    rows = np.arange(300, 312)
    flags = np.array([i % 3 == 0 for i in range(12)])  # the same task draw for both
    settings = TrainSettings(optimizer="sgd", captions=t)
    lrs = (2e-3, 2e-3, 2e-3)
    w = init_projector(toy, 2)
    own = ClientTask(k, 1, 0, rows, lrs, 4, qa_flags=flags)
    pooled = ClientTask(0, 1, 0, rows, lrs, 4, qa_flags=flags, owners=np.full(12, k))
    plain = ClientTask(0, 1, 0, rows, lrs, 4, qa_flags=flags)
    a, b, c = (
        train_client(toy, reader, task, w, {}, LocalTraining(), settings).update.delta
        for task in (own, pooled, plain)
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


# --- bad values, inspection, a run -----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, field",
    [
        ("scenario.caption_noise=2", "scenario.caption_noise"),
        ("scenario.caption_noise=-0.1", "scenario.caption_noise"),
        ("scenario.noisy_clients=1.5", "scenario.noisy_clients"),
        ("scenario.noisy_clients=-1", "scenario.noisy_clients"),
        ("scenario.caption_styles=0", "scenario.caption_styles"),
        ("scenario.caption_styles=5", "scenario.caption_styles"),
        ("scenario.caption_styles=2.5", "scenario.caption_styles"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value) and str(e.value).startswith(field)


def test_transforms_refuse_real_corpora():
    corpus = "data.corpora=[{format: parquet, path: /x.parquet}]"
    with pytest.raises(ConfigError, match=r"^scenario.caption_styles: .*data.corpora"):
        load_config(None, [corpus, "scenario.caption_styles=2"])
    with pytest.raises(ConfigError, match=r"^scenario.noisy_clients: .*data.corpora"):
        load_config(
            None, [corpus, "scenario.noisy_clients=0.2", "scenario.caption_noise=0.5"]
        )


def test_cli_run_with_a_bad_caption_noise_is_exit_2_and_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--set",
            "scenario.caption_noise=2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == ["error: scenario.caption_noise: must be in [0, 1], got 2.0"]
    assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing written


def test_scenarios_show_describes_noise_and_styles(tmp_path, cache_dir):
    args = ["--set", "data.num_scenes=2000", "--set", f"cache_dir={cache_dir}"]
    r = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "scenarios", "show", "toy-hard", *args]
        + ["--out", str(tmp_path / "hard.png")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "noisy silos: 20 of 100 clients" in out
    assert "probability 0.5 (scenario.caption_noise)" in out
    assert "caption styles: 4" in out
    example = dict(count=2, size="small", colour="red", shape="triangle")
    clients, shares = [], []
    for s in range(4):
        text = caption_text(**example, position="top left", style=s)
        found = re.search(
            rf"{s}: {re.escape(repr(text))} \((\d+) clients, ([\d.]+)% of rows\)", out
        )
        assert found, out
        clients.append(int(found[1]))
        shares.append(float(found[2]))
    # The numbers are those of the partition's sizes (2 000 rows, 1/r over 100 clients); that
    # they are balanced is the property test's business (test_client_styles_balance_rows).
    sizes = power_law_sizes(2000, 100, 1.0, seed=0)
    styles = client_styles(sizes, 4, seed=0)
    assert clients == np.bincount(styles, minlength=4).tolist()
    want = np.bincount(styles, weights=sizes, minlength=4) / 2000 * 100
    assert shares == [float(f"{x:.1f}") for x in want]
    held = re.search(
        r"20 of 100 clients \(scenario.noisy_clients 0.2\) holding ([\d.]+)%", out
    )
    noisy = sorted(noisy_set(sizes, 0.2, seed=0))
    assert held and float(held[1]) == float(f"{sizes[noisy].sum() / 2000 * 100:.1f}")
    assert "noisy" in r.stdout and "caption style" in r.stdout  # the per-client columns
    assert (tmp_path / "hard.png").exists()


@pytest.mark.slow
def test_toy_hard_runs_federated_and_centralized(
    tmp_path, toy_path, cache_dir, ray_session
):
    from fedsim.driver import run
    from fedsim.scenarios.participation import assign_tiers

    quiet = Console(quiet=True)
    short = ["rounds=2", "eval_every=0", "eval.at_start=false", "eval.benchmarks=[]"]
    # A quarter of the preset's budget and step cap (the preset's 32-step tiers cost 4× the
    # steps; the tier arithmetic is the same).
    quarter = ["train.local_steps=8", "scenario.time_budget=0.2"]
    cfg = load_config("toy-hard", [*short, *quarter, f"cache_dir={cache_dir}"])
    r = run(cfg, tmp_path / "fed", console=quiet, show_progress=False)
    assert [rec["round"] for rec in r.history if "clients" in rec] == [1, 2]
    tiers = assign_tiers(100, cfg.scenario.tier_shares, cfg.seed)
    for rec in r.history:
        if "local_steps" in rec:
            # Budget 0.2 s at 0.05 s a step: speeds 2, 1, 0.5, 0.25 run 8, 4, 2, 1 steps.
            steps = {int(c): n for c, n in rec["local_steps"].items()}
            assert steps == {c: (8, 4, 2, 1)[tiers[c]] for c in steps}
    assert 0.0 <= r.final_eval["attr_mean"] <= 1.0
    summary = (tmp_path / "fed" / "summary.md").read_text()
    assert (
        "noisy silos: 20 of 100 clients" in summary and "caption styles: 4" in summary
    )
    # The centralized upper bound on the same transformed rows (Ray Train, pooled stream).
    small = [*short, *SMALL_HARD[:1], "rounds=1", "train.local_steps=1"]
    cfg = load_config(
        "toy-hard",
        [*small, "train.batch_size=4", "algorithm.name=centralized"]
        + [f"cache_dir={cache_dir}"],
    )
    c = run(cfg, tmp_path / "central", console=quiet, show_progress=False)
    assert c.history[-1]["clients"] == "pooled"


def test_centralized_takes_the_federated_runs_samples():
    """The upper bound trains as many steps per round as the federated cohort does on average.

    toy-hard's four equal tiers (speeds 2, 1, 0.5, 0.25; budget 0.8 s at 0.05 s a step) run
    32, 16, 8 and 4 steps; the default has no budget: cohort_size × local_steps exactly.
    """
    import numpy as np
    import torch

    from fedsim.config import load_config
    from fedsim.prepare import federated_steps

    w0 = {"w": torch.zeros(4, 4)}
    default = load_config(None, [])
    shards = [np.arange(10)] * default.scenario.num_clients
    assert federated_steps(default, shards, w0) == 10 * 8
    hard = load_config("toy-hard", [])
    shards = [np.arange(10)] * hard.scenario.num_clients
    steps = federated_steps(hard, shards, w0)
    # 10 clients a round, 15 steps each on average over the tiers (standard deviation
    # √((17² + 1² + 7² + 11²)/4) ≈ 10.7): a cohort's sum has mean 150 and sd ≤ 10.7·√10 ≈ 34
    # (less without replacement), the mean of 16 rounds sd ≤ 8.5; [107, 193] is more than 5 sd
    # either side (and far from the 320 the budget would ignore).
    assert 107 <= steps <= 193
