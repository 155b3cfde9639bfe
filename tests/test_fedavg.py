"""FedAvg's server rule on hand-computed tensors, and the laws every aggregator obeys."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.aggregator import Aggregator
from fedsim.algorithms import ClientUpdate, build_algorithm
from fedsim.algorithms.base import validate_update, weighted_sum


def upd(cid, n, **delta):
    return ClientUpdate(
        client_id=cid,
        delta={k: torch.tensor(v) for k, v in delta.items()},
        num_samples=n,
        loss=0.0,
        steps=1,
    )


def test_fedavg_two_rounds_by_hand():
    algo = build_algorithm("fedavg")
    w0 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    state = algo.init_state(w0)
    # Round 1: n = 1 and 3, p = 1/4, 3/4. Δ̄ = 0.25*[4, 0] + 0.75*[0, 4] = [1, 3]; b: 0.25*1 + 0.75*(-1) = -0.5
    r1 = algo.aggregate(
        w0,
        [upd(0, 1, w=[4.0, 0.0], b=[1.0]), upd(1, 3, w=[0.0, 4.0], b=[-1.0])],
        state,
        1,
    )
    torch.testing.assert_close(r1.weights["w"], torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(r1.weights["b"], torch.tensor([-0.5]))
    # Round 2 (FedAvg keeps no state): equal n, Δ̄ = mean([2, 2], [0, -2]) = [1, 0]
    r2 = algo.aggregate(
        r1.weights,
        [upd(5, 2, w=[2.0, 2.0], b=[0.0]), upd(2, 2, w=[0.0, -2.0], b=[2.0])],
        r1.state,
        2,
    )
    torch.testing.assert_close(r2.weights["w"], torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(r2.weights["b"], torch.tensor([0.5]))


def test_server_lr_scales_the_step():
    algo = build_algorithm("fedavg", {"server_lr": 0.5})
    r = algo.aggregate({"w": torch.zeros(1)}, [upd(0, 1, w=[2.0])], {}, 1)
    torch.testing.assert_close(r.weights["w"], torch.tensor([1.0]))


finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    deltas=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 100), min_size=6, max_size=6),
    perm_seed=st.integers(0, 1000),
)
def test_order_does_not_matter(deltas, sizes, perm_seed):
    algo = build_algorithm("fedavg")
    w = {"w": torch.zeros(3)}
    ups = [upd(i, sizes[i], w=d) for i, d in enumerate(deltas)]
    perm = torch.randperm(
        len(ups), generator=torch.Generator().manual_seed(perm_seed)
    ).tolist()
    a = algo.aggregate(w, ups, {}, 1).weights["w"]
    b = algo.aggregate(w, [ups[i] for i in perm], {}, 1).weights["w"]
    assert torch.equal(a, b)  # bit for bit: the sum runs in sorted client order


@settings(max_examples=30, deadline=None)
@given(
    delta=st.lists(finite, min_size=4, max_size=4),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
)
def test_identical_updates_give_that_update(delta, sizes):
    algo = build_algorithm("fedavg")
    w = {"w": torch.ones(4)}
    ups = [upd(i, n, w=delta) for i, n in enumerate(sizes)]
    out = algo.aggregate(w, ups, {}, 1).weights["w"]
    # Σ p_k Δ with Σ p_k = 1 in float32: the weighted mean of equal values is Δ up to one
    # rounding per term (≤ 5 terms, ≤ 5·2⁻²⁴|Δ| < 1e-6|Δ|), then 1 + Δ rounds once more (2⁻²⁴
    # of |1 + Δ|); atol 1e-5 covers that second rounding for the |Δ| ≤ 10 hypothesis draws.
    torch.testing.assert_close(
        out, torch.ones(4) + torch.tensor(delta), rtol=1e-6, atol=1e-5
    )


def test_weighted_sum_accumulates_in_float64():
    # 1e8 + 1 - 1e8 is 0 in float32 sequential summation, 1 in float64.
    ts = [
        {"x": torch.tensor([1e8])},
        {"x": torch.tensor([1.0])},
        {"x": torch.tensor([-1e8])},
    ]
    assert weighted_sum(ts, [1.0, 1.0, 1.0])["x"].item() == 1.0


def test_nan_and_bad_shapes_are_rejected_never_averaged():
    w = {"w": torch.zeros(2)}
    good = upd(1, 1, w=[1.0, 1.0])
    nan = upd(2, 1, w=[float("nan"), 0.0])
    inf = upd(3, 1, w=[float("inf"), 0.0])
    wrong = upd(4, 1, w=[1.0, 1.0, 1.0])
    assert validate_update(good, w) is None
    assert "NaN/Inf" in validate_update(nan, w)
    assert "shape" in validate_update(wrong, w)
    agg = Aggregator("fedavg", {}, w)
    new, metrics = agg.aggregate(w, [nan, good, inf, wrong], 1)
    torch.testing.assert_close(new["w"], torch.tensor([1.0, 1.0]))
    assert [r["client_id"] for r in metrics["rejected"]] == [2, 3, 4]


def test_all_rejected_keeps_the_weights():
    w = {"w": torch.ones(2)}
    new, metrics = Aggregator("fedavg", {}, w).aggregate(
        w, [upd(0, 1, w=[float("nan"), 0.0])], 1
    )
    assert torch.equal(new["w"], w["w"]) and len(metrics["rejected"]) == 1
