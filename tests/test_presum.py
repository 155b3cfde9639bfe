"""Pre-summed uploads: a worker sends Σ n_k Δ_k of its group instead of each client's Δ.

Expected values come from the algorithms' own rule over the clients' individual updates
(Σ_k p_k Δ_k, McMahan et al. 2017); pre-summing may only change the float64 summation order.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.algorithms.base import (
    ClientUpdate,
    combine_partial_sums,
    partial_sum,
)
from fedsim.algorithms.registry import available, build_algorithm
from fedsim.training import ClientResult
from fedsim.worker import presum

SHAPES = {"linear_1.weight": (6, 4), "linear_1.bias": (6,), "linear_2.weight": (3, 6)}


def _updates(n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            client_id=c,
            delta={
                k: torch.randn(s, generator=g) * 10 ** (c % 3 - 2)
                for k, s in SHAPES.items()
            },
            num_samples=int(torch.randint(1, 200, (1,), generator=g)),
            loss=1.0,
            steps=4,
        )
        for c in range(n)
    ]


def _close(a: dict, b: dict, rtol: float = 1e-6) -> None:
    """Max-norm closeness relative to the largest |a|.

    The bound: both sides form Σ p_k Δ_k in float64 and round it once to float32, so they differ
    by at most 1 ulp (2⁻²⁴ relative, ≈ 6e-8); one or two server steps of a FedAvg-family rule,
    each Lipschitz in its input with a constant of order 1 at these scales, keep that within a few
    ulps. 1e-6 ≈ 17 ulps leaves room for that without hiding a wrong weighting (which moves the
    result by the size of a client's p_k Δ_k, orders of magnitude more).
    """
    for k in a:
        err = float((a[k] - b[k]).abs().max())
        assert err <= rtol * float(a[k].abs().max()), (k, err)


def test_groups_combine_to_the_weighted_mean_of_all_clients():
    ups = _updates(11, 0)
    total = sum(u.num_samples for u in ups)
    # Σ_k (n_k / N) Δ_k computed directly in float64, the definition.
    expected = {
        k: sum(u.delta[k].double() * (u.num_samples / total) for u in ups).float()
        for k in SHAPES
    }
    for groups in (
        [ups],
        [ups[:5], ups[5:]],
        [ups[i : i + 3] for i in range(0, 11, 3)],
    ):
        # Hand the groups over in scrambled order: the result must not depend on it.
        parts = [partial_sum(list(reversed(g))) for g in reversed(groups)]
        combined = combine_partial_sums(parts)
        assert combined.num_samples == total
        _close(expected, combined.delta)
    with pytest.raises(ValueError, match="duplicate client ids"):
        combine_partial_sums([partial_sum(ups[:3]), partial_sum(ups[2:5])])


PRESUMMABLE = sorted(
    n for n, cls in available().items() if getattr(cls, "presummable", False)
)


def test_the_fedavg_family_is_marked_presummable_and_no_other():
    assert PRESUMMABLE == [
        "fedadagrad",
        "fedadam",
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedyogi",
    ]


@pytest.mark.parametrize("name", PRESUMMABLE)
def test_two_rounds_presummed_equal_two_rounds_per_client(name):
    algo = build_algorithm(name)
    g = torch.Generator().manual_seed(5)
    w = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    direct_w, direct_s = dict(w), algo.init_state(w, 11)
    summed_w, summed_s = dict(w), algo.init_state(w, 11)
    for rnd in (1, 2):  # the second round sees the server state of the first
        ups = _updates(9, rnd)
        a = algo.aggregate(direct_w, ups, direct_s, rnd)
        combined = combine_partial_sums([partial_sum(ups[:4]), partial_sum(ups[4:])])
        b = algo.aggregate(summed_w, [combined], summed_s, rnd)
        _close(a.weights, b.weights)
        direct_w, direct_s, summed_w, summed_s = a.weights, a.state, b.weights, b.state
        assert set(a.state) == set(b.state)


def test_worker_rejects_non_finite_updates_by_name_and_sums_the_rest():
    ups = _updates(4, 3)
    bad = dict(ups[2].delta)
    bad["linear_1.bias"] = bad["linear_1.bias"].clone()
    bad["linear_1.bias"][0] = math.nan
    ups[2] = ClientUpdate(2, bad, ups[2].num_samples, 1.0, 4)
    reference = {k: torch.zeros(s) for k, s in SHAPES.items()}
    out = presum([ClientResult(u, {}, 0.1) for u in ups], reference)
    assert [r["client_id"] for r in out.rejected] == [2]
    assert "NaN/Inf" in out.rejected[0]["reason"]
    assert out.partial is not None and out.partial.clients == (0, 1, 3)
    want = partial_sum([ups[0], ups[1], ups[3]])
    for k in SHAPES:
        assert torch.equal(out.partial.weighted[k], want.weighted[k])
    # Per-client results travel without their Δ.
    assert all(r.update.delta == {} for r in out.results)
    assert [r.update.client_id for r in out.results] == [0, 1, 2, 3]


@pytest.mark.slow
def test_runs_with_presummed_groups(tmp_path, toy_path, cache_dir, ray_session):
    """One round of FedAdam with and without pre-summed uploads, on real workers.

    Why one round and how close (the bound is argued, not measured on one machine): within a
    round, pre-summing changes only the float64 summation order of Σ n_k Δ_k, so the float32 mean
    delta d of the two paths differs by at most 1 ulp (the float64 error, ≈ K·2⁻⁵³ of Σ|p_k Δ_k|, is
    2²⁹ times finer). FedAdam's step η·m/(√v + τ) is monotone in d with |∂u/∂d| ≤ η·0.1/(2τ)
    = 0.15 at the defaults, so the steps differ by far less than an ulp of the weights, and the
    float32 sum w + u rounds them to at most 1 ulp apart: |Δw| ≤ 2·2⁻²³·max|w| = 2⁻²¹·max|w|.
    A second round would feed that ulp through local AdamW steps, whose sign-like updates amplify
    it by a data-dependent factor (7.5e-6 relative on one AMD EPYC): no bound holds there, so the
    multi-round equivalence is checked on the pure aggregation above, where it does.
    """
    from small_runs import NO_EVAL, small_run

    base = [
        *NO_EVAL,
        "rounds=1",
        "scenario.cohort_size=6",
        "train.cohort_batch=4",  # groups of 4 and 2
        "algorithm.name=fedadam",
    ]

    def go(name: str, *extra: str):
        return small_run(tmp_path / name, cache_dir, *base, *extra)

    on1 = go("on1", "ray.workers=1", "train.presum=true")
    on2 = go("on2", "ray.workers=2", "train.presum=true")
    off = go("off", "ray.workers=2")  # the default: a delta per client
    for k in on1.weights:
        assert torch.equal(on1.weights[k], on2.weights[k]), k  # groups fixed: same bits
    for k in off.weights:
        err = float((off.weights[k] - on1.weights[k]).abs().max())
        assert err <= 2.0**-21 * float(off.weights[k].abs().max()), (k, err)
    params = sum(v.numel() for v in on1.weights.values())
    assert len(on2.history) == len(off.history) == 2  # round 0 (untrained) and round 1
    for r_on, r_off in zip(on2.history[1:], off.history[1:]):
        assert r_on["presummed_groups"] == 2 and "presummed_groups" not in r_off
        # Two float64 sums come back instead of six float32 deltas.
        assert r_on["upload_mib"] == pytest.approx(2 * 8 * params / 2**20, rel=1e-5)
        assert r_off["upload_mib"] == pytest.approx(6 * 4 * params / 2**20, rel=1e-5)
        # The same six clients trained from the same weights: the same losses, summed in
        # float64 perhaps in another order.
        assert r_on["loss"] == pytest.approx(r_off["loss"], rel=1e-12)
        assert r_on["rejected"] == []
