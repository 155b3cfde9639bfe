"""``fedsim scenarios show`` on an LCS-558K-layout corpus: IID without a label, long tails.

At small scale (3 000 rows over 60 web hosts, a Zipf tail): the counts are checked against the
shards themselves, the "other" column against what the top values leave, the entropies against
their definition, and the PNG's size against a fixed figure (it does not grow with the number of
hosts or clients). The README's scale check runs the same command on 558 128 rows over 2 000 hosts.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedsim.config import load_config

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lcs_layout import corpus_override, write_lcs_layout  # noqa: E402

N, HOSTS, CLIENTS = 3000, 60, 12


@pytest.fixture(scope="module")
def lcs(tmp_path_factory):
    return write_lcs_layout(tmp_path_factory.mktemp("lcs"), N, HOSTS)


def _cfg(preset, lcs, cache, *extra):
    sets = [
        corpus_override(lcs),
        f"cache_dir={cache}",
        f"scenario.num_clients={CLIENTS}",
    ]
    return load_config(preset, [*sets, "scenario.cohort_size=4", *extra])


def test_iid_split_of_a_corpus_without_the_label_column(lcs, tmp_path):
    """lcs558k-iid: its label (shape, the default) is no column of LCS-558K and is not used."""
    from fedsim.prepare import partition, training_data
    from fedsim.scenario_stats import TOP, scenario_stats

    cfg = _cfg("lcs558k-iid", lcs, tmp_path)
    stats = scenario_stats(cfg)
    shards = partition(cfg, training_data(cfg))
    assert stats.sizes.tolist() == [len(s) for s in shards]
    # One corpus: its "dataset" column has one value and is no view.
    assert [v.key for v in stats.views] == ["source"]
    source = stats.views[0]
    assert len(source.values) == HOSTS
    assert source.counts.sum(1).tolist() == stats.sizes.tolist()
    # Most common host first: the Zipf head (host0) holds the largest total.
    totals = source.counts.sum(0)
    assert source.values[0] == "host0.example" and np.all(np.diff(totals) <= 0)
    names, top = source.top()
    assert len(names) == TOP + 1 and names[-1] == f"other ({HOSTS - TOP})"
    np.testing.assert_array_equal(top[:, :TOP], source.counts[:, :TOP])
    np.testing.assert_array_equal(top[:, TOP], stats.sizes - top[:, :TOP].sum(1))
    # Entropy by its definition, for one client (exact up to float64 rounding: rel 1e-12).
    c = source.counts[3][source.counts[3] > 0] / stats.sizes[3]
    assert source.entropy_bits()[3] == pytest.approx(-(c * np.log2(c)).sum(), rel=1e-12)
    # IID: every client holds most hosts, against 1 host for a client of a pure domain split.
    assert np.all(source.entropy_bits() > 0.8 * np.log2(HOSTS) - 1)


def test_source_split_counts_by_its_own_label(lcs, tmp_path):
    from fedsim.scenario_stats import scenario_stats

    stats = scenario_stats(_cfg("lcs558k-source", lcs, tmp_path))
    assert stats.views[0].key == "source"
    # Dirichlet(0.1) over hosts: far fewer hosts per client than the IID split's.
    held = (stats.views[0].counts > 0).sum(1)
    assert np.median(held) < HOSTS / 2


def test_cli_table_and_png_do_not_grow_with_the_hosts(lcs, tmp_path, capsys):
    from PIL import Image

    from fedsim.cli import app

    png = tmp_path / "lcs.png"
    for preset in ("lcs558k-iid", "lcs558k-source"):
        args = [
            "scenarios",
            "show",
            preset,
            "--out",
            str(png),
            "--set",
            corpus_override(lcs),
            "--set",
            f"cache_dir={tmp_path}",
            "--set",
            f"scenario.num_clients={CLIENTS}",
            "--set",
            "scenario.cohort_size=4",
        ]
        app(args, standalone_mode=False)
        out = capsys.readouterr().out
        assert f"{CLIENTS} clients" in out and f"wrote {png}" in out
        with Image.open(
            png
        ) as im:  # 14 in × (3.6 in for the one view + 0.8) at 100 dpi
            assert im.size == (1400, 360 + 80)
