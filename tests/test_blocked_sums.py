"""The blocked float64 accumulation of the FedAvg family and the blocked server step
W + η·Δ give the unblocked expressions' bits; the blocked norm is the norm; the allocation-free
finiteness check gives isfinite's answer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms.base import (
    BLOCK,
    ClientUpdate,
    add,
    all_finite,
    combine_partial_sums,
    global_norm,
    partial_sum,
    sum_squares,
    weighted_sum,
)


def naive_weighted_sum(tensors, coeffs):
    """The accumulation as it was written before blocking (one pass per client)."""
    out = {}
    for key in tensors[0]:
        acc = torch.zeros_like(tensors[0][key], dtype=torch.float64)
        for t, c in zip(tensors, coeffs):
            acc.add_(t[key].to(torch.float64), alpha=float(c))
        out[key] = acc.to(torch.float32)
    return out


# Sizes below, at and above one block, with odd tails and a multi-block odd tail.
SIZES = [7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, (257, 1031)]


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_weighted_sum_has_the_unblocked_bits(threads):
    # Elementwise ops in the same per-element order: equality to the bit, no tolerance.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        tensors = [
            {
                str(i): torch.randn(s, generator=g) * 10.0 ** float(c % 7 - 3)
                for i, s in enumerate(SIZES)
            }
            for c in range(7)
        ]
        coeffs = [float(x) for x in torch.rand(7, generator=g)]
        got, want = weighted_sum(tensors, coeffs), naive_weighted_sum(tensors, coeffs)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.7, 3.0])
def test_blocked_server_step_has_the_unblocked_bits(threads, scale):
    # W + η·Δ as written: the product rounded to float32, then the sum; elementwise, so the
    # blocked loop must give these bits exactly (a fused multiply-add would not, for η ≠ 1).
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        w = {str(i): torch.randn(s, generator=g) for i, s in enumerate(SIZES)}
        d = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in w.items()}
        got = add(w, d, scale)
        for k in w:
            assert torch.equal(got[k], w[k] + scale * d[k]), k
    finally:
        torch.set_num_threads(old)


def test_blocked_norm_is_the_norm():
    # Values whose squares and every partial sum are exact in float64 (small integers): any
    # summation order gives √(Σ x²) to the bit, so the blocks must add up to exactly that.
    g = torch.Generator().manual_seed(0)
    sizes = {"a": (3 << 20) + 5, "b": 1000, "c": (BLOCK, 3)}
    t = {
        k: torch.randint(
            -7, 8, s if isinstance(s, tuple) else (s,), generator=g
        ).float()
        for k, s in sizes.items()
    }
    exact = sum(int((v.long() ** 2).sum()) for v in t.values())
    assert global_norm(t) == math.sqrt(exact)
    assert global_norm({"z": torch.zeros(5)}) == 0.0


@pytest.mark.parametrize("n", [1000, (1 << 20) + 1, (3 << 20) + 5])
def test_sum_squares_copy_is_the_conversion_and_leaves_the_sum(n):
    # The fused copy (Fed-CMP's bf16 sketch rounds each delta by the read that sums its
    # squares) must be the plain conversion, element for element, and must not change a bit
    # of the sum; at, below and above one 2²⁰ block with a tail.
    g = torch.Generator().manual_seed(1)
    t = torch.randn(n, generator=g)
    dst = torch.empty(n, dtype=torch.bfloat16)
    assert sum_squares(t, copy_to=dst) == sum_squares(t)
    assert torch.equal(dst, t.to(torch.bfloat16))


def test_presums_have_the_unblocked_bits():
    g = torch.Generator().manual_seed(0)
    ups = [
        ClientUpdate(c, {"w": torch.randn(2 * BLOCK + 5, generator=g)}, 3 + c, 0.0, 1)
        for c in range(5)
    ]
    part = partial_sum(ups)
    acc = torch.zeros(2 * BLOCK + 5, dtype=torch.float64)
    for u in ups:
        acc.add_(u.delta["w"].to(torch.float64), alpha=float(u.num_samples))
    assert torch.equal(part.weighted["w"], acc)
    # Two groups combined: Σ of the groups' float64 sums, divided by Σ n.
    a, b = partial_sum(ups[:2]), partial_sum(ups[2:])
    both = a.weighted["w"].clone().add_(b.weighted["w"])
    mean = combine_partial_sums([b, a]).delta["w"]
    assert torch.equal(mean, (both / (a.samples + b.samples)).to(torch.float32))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3 * BLOCK),
    where=st.floats(0, 1, exclude_max=True),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
)
def test_all_finite_agrees_with_isfinite(n, where, bad):
    t = torch.zeros(n)
    if bad is not None:
        t[int(where * n)] = bad
    assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(t) == (bad is None)
