"""Partitions, cohorts and one-pass streams: pure functions of their keys."""

import numpy as np
import pytest

from fedsim.data.streams import Cursor, pass_order, take
from fedsim.scenarios.participation import uniform_cohort
from fedsim.scenarios.partition import iid


def test_iid_is_a_partition_and_deterministic():
    shards = iid(1003, 20, seed=4)
    rows = np.concatenate(shards)
    assert sorted(rows.tolist()) == list(range(1003))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    again = iid(1003, 20, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, iid(1003, 20, seed=5)))


def test_iid_rejects_more_clients_than_rows():
    with pytest.raises(ValueError, match="num_clients"):
        iid(5, 6, seed=0)


def test_cohort_is_keyed_by_round_only():
    a = uniform_cohort(100, 10, seed=1, server_round=7)
    assert a == sorted(set(a)) and len(a) == 10
    assert a == uniform_cohort(100, 10, seed=1, server_round=7)
    assert a != uniform_cohort(100, 10, seed=1, server_round=8)


def test_stream_resumes_and_wraps_to_a_new_pass():
    shard = np.arange(100, 110)
    first, cur = take(shard, Cursor(), 4, seed=0, client_id=3)
    second, cur = take(shard, cur, 4, seed=0, client_id=3)
    third, cur = take(shard, cur, 4, seed=0, client_id=3)
    order0 = pass_order(shard, 0, 3, 0)
    order1 = pass_order(shard, 0, 3, 1)
    assert np.array_equal(np.concatenate([first, second]), order0[:8])
    assert np.array_equal(third, np.concatenate([order0[8:], order1[:2]]))
    assert cur == Cursor(passes=1, position=2)
    # One pass reads every row exactly once.
    assert sorted(order0.tolist()) == shard.tolist()


def test_empty_shard_names_the_client():
    with pytest.raises(ValueError, match="client 7"):
        take(np.array([], dtype=np.int64), Cursor(), 1, seed=0, client_id=7)


def test_dirichlet_is_a_partition_skewed_by_alpha():
    from fedsim.scenarios.partition import dirichlet

    labels = np.random.default_rng(0).integers(0, 4, 4000)
    shards = dirichlet(labels, 20, 0.1, seed=3)
    rows = np.concatenate(shards)
    assert sorted(rows.tolist()) == list(range(4000))
    assert all(len(s) > 0 for s in shards)
    again = dirichlet(labels, 20, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))

    def mean_top_share(parts):
        # Share of each client's rows that belong to its most common label.
        return np.mean(
            [np.bincount(labels[s], minlength=4).max() / len(s) for s in parts]
        )

    skewed = mean_top_share(shards)
    mild = mean_top_share(dirichlet(labels, 20, 100.0, seed=3))
    assert skewed > 0.8  # α = 0.1: clients are dominated by one label
    assert mild < 0.4  # α = 100: close to the IID share of 1/4


def test_dirichlet_bad_alpha():
    from fedsim.scenarios.partition import dirichlet

    with pytest.raises(ValueError, match="dirichlet_alpha"):
        dirichlet(np.zeros(10), 2, 0.0, seed=0)


def test_by_domain_gives_each_client_one_domain():
    from fedsim.scenarios.partition import by_domain

    domains = np.random.default_rng(1).choice(["a", "b", "c"], 3000)
    shards = by_domain(domains, 7, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(3000))
    kinds = [set(domains[s].tolist()) for s in shards]
    assert all(len(k) == 1 for k in kinds)
    # Round-robin: clients 0, 3, 6 hold "a"; 1, 4 hold "b"; 2, 5 hold "c".
    assert [k.pop() for k in kinds] == ["a", "b", "c", "a", "b", "c", "a"]
    with pytest.raises(ValueError, match="each domain needs a client"):
        by_domain(domains, 2, seed=0)


def test_power_law_sizes_follow_the_ranks():
    from fedsim.scenarios.partition import power_law_sizes

    sizes = power_law_sizes(10_000, 10, 1.0, seed=2)
    assert sizes.sum() == 10_000 and sizes.min() >= 1
    # n ∝ 1/r: sorted sizes against ranks 1..10, up to integer rounding: each size is rounded
    # to a whole row, so it lies within 1 of its real-valued share (atol 1.0 is that row).
    h = sum(1 / r for r in range(1, 11))
    expected = [1 + (10_000 - 10) / (r * h) for r in range(1, 11)]
    assert np.allclose(sorted(sizes, reverse=True), expected, atol=1.0)
    flat = power_law_sizes(1003, 10, 0.0, seed=2)
    assert flat.max() - flat.min() <= 1 and flat.sum() == 1003
    assert np.array_equal(sizes, power_law_sizes(10_000, 10, 1.0, seed=2))
    with pytest.raises(ValueError, match="quantity_skew"):
        power_law_sizes(100, 10, -1.0, seed=0)


def test_quantity_and_sized_dirichlet_are_partitions_with_those_sizes():
    from fedsim.scenarios.partition import (
        dirichlet_sized,
        power_law_sizes,
        quantity,
    )

    shards = quantity(5000, 12, 1.5, seed=1)
    assert sorted(np.concatenate(shards).tolist()) == list(range(5000))
    assert [len(s) for s in shards] == power_law_sizes(5000, 12, 1.5, 1).tolist()

    labels = np.random.default_rng(1).integers(0, 6, 5000)
    sizes = power_law_sizes(5000, 12, 1.0, seed=1)
    parts = dirichlet_sized(labels, sizes, 0.1, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(5000))
    assert [len(p) for p in parts] == sizes.tolist()
    top = np.mean([np.bincount(labels[p], minlength=6).max() / len(p) for p in parts])
    iid_top = np.mean(
        [np.bincount(labels[p], minlength=6).max() / len(p) for p in shards]
    )
    assert top > iid_top + 0.2  # label skew survives the size constraint
    again = dirichlet_sized(labels, sizes, 0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_domain_with_quantity_skew_keeps_one_domain_per_client():
    from fedsim.scenarios.partition import by_domain

    domains = np.repeat(np.array(["a", "b", "c"]), [900, 600, 300])
    shards = by_domain(domains, 9, seed=0, exponent=1.0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1800))
    assert all(len(set(domains[s])) == 1 for s in shards)
    sizes = sorted(len(s) for s in shards if domains[s[0]] == "a")
    assert sizes[-1] > 2 * sizes[0]  # power law within the domain, not an even split


def _dirichlet_reference(labels, num_clients, alpha, seed):
    """dirichlet() as first written: one pass over the rows per label (slow, obviously right)."""
    from fedsim.scenarios.partition import PARTITION_STREAM

    rng = np.random.default_rng([seed, PARTITION_STREAM, 1])
    parts = [[] for _ in range(num_clients)]
    for value in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == value))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(rows)).astype(np.int64)
        for k, chunk in enumerate(np.split(rows, cuts)):
            parts[k].append(chunk)
    shards = [np.sort(np.concatenate(p)) for p in parts]
    for k in range(num_clients):
        if len(shards[k]) == 0:
            donor = int(np.argmax([len(s) for s in shards]))
            shards[k], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return shards


@pytest.mark.parametrize("kind", ["strings", "ints", "one label", "long tail"])
def test_dirichlet_groups_rows_as_one_pass_per_label_would(kind):
    """The one-sort grouping gives the very shards (same RNG draws, same rows) of a pass per
    label, so runs keep their bits while 2 000 labels no longer cost 2 000 passes."""
    from fedsim.scenarios.partition import dirichlet

    rng = np.random.default_rng(7)
    labels = {
        "strings": rng.choice(["a", "b", "c+d", "Z"], 500),
        "ints": rng.integers(0, 7, 300),
        "one label": np.array(["x"] * 50),
        "long tail": rng.choice([f"h{i}" for i in range(300)], 4000),
    }[kind]
    got = dirichlet(labels, 13, 0.3, 3)
    want = _dirichlet_reference(labels, 13, 0.3, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
