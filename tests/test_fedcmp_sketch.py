"""Fed-CMP's two-pass basis (``basis: sketch``) against the exact decomposition.

When the stacked client deltas have rank r₀ ≤ r (every Δ_k = U₀ M_k V₀ᵀ), the range sketch holds
span(U₀) exactly (Gaussian Ω: with probability 1), the Rayleigh–Ritz step then returns G_U's
eigenvectors and the projected right Gram is G_V itself, so the sketched round must equal the
exact one (``eigh`` of the Gram matrices at these sizes) up to the rounding of two fp32 routes.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms import ClientUpdate, build_algorithm
from fedsim.algorithms.fedcmp import sketch_bases


def low_rank_round(seed, m, n, k, r0):
    g = torch.Generator().manual_seed(seed)
    u0 = torch.linalg.qr(torch.randn(m, r0, generator=g))[0]
    v0 = torch.linalg.qr(torch.randn(n, r0, generator=g))[0]
    # Singular values 1, 0.85, 0.7, …: σ² gaps ≥ 0.14 (relative to σ²_max = 1), see below.
    sig = torch.tensor([1.0 - 0.15 * i for i in range(r0)])
    ups = []
    for c in range(k):
        mk = torch.diag(sig) + 0.01 * torch.randn(r0, r0, generator=g)
        ups.append(
            ClientUpdate(
                c,
                {
                    "p.weight": u0 @ mk @ v0.T,
                    "p.bias": 0.01 * torch.randn(m, generator=g),
                },
                5 + 3 * c,
                0.0,
                1,
            )
        )
    weights = {"p.weight": torch.zeros(m, n), "p.bias": torch.zeros(m)}
    return weights, ups, u0


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(12, 40),
    n=st.integers(12, 40),
    k=st.integers(2, 6),
    r0=st.integers(1, 5),
    reliability=st.sampled_from(["both", "none", "client"]),
)
def test_sketch_equals_the_exact_basis_on_low_rank_deltas(
    seed, m, n, k, r0, reliability
):
    weights, ups, _ = low_rank_round(seed, m, n, k, r0)
    steps = {}
    for basis in ("power", "sketch"):
        algo = build_algorithm(
            "fedcmp", {"basis": basis, "rank": 8, "reliability": reliability}
        )
        res = algo.aggregate(weights, ups, algo.init_state(weights), 1)
        steps[basis] = res.weights["p.weight"]
        assert res.metrics["p.weight/rank"] == r0  # capped at the numerical rank
    # Tolerance: both routes compute G_U's and G_V's eigenvectors in fp32. Davis–Kahan with
    # the rounding of the Gram products as the perturbation (‖E‖ ≲ K · max(m, n) · u · λ_max,
    # u = 2⁻²⁴, at most 6 · 40 · 6e-8 ≈ 1.4e-5) over the σ² gap (≥ 0.14 − 2 · 0.01 · 3 of
    # mixing, ≥ 0.08) bounds each vector's error by ≈ 2e-4; the fusion (cosines, positive-part
    # shrinkage) is Lipschitz with constant ≤ 2 on the step, so 1e-3 of the step's norm holds
    # with margin while a wrong basis (an axis lost or mixed) moves the step by O(1).
    err = float((steps["sketch"] - steps["power"]).norm())
    assert err <= 1e-3 * float(steps["power"].norm())


def test_sketch_basis_is_orthonormal_and_spans_the_deltas():
    weights, ups, u0 = low_rank_round(3, 60, 30, 5, 4)
    deltas = [u.delta["p.weight"] for u in ups]
    p = [u.num_samples / sum(x.num_samples for x in ups) for u in ups]
    sk = sketch_bases(deltas, p, 4, torch.Generator().manual_seed(0), 10, 2)
    u = sk.left.vectors
    # Orthonormal to fp32 rounding of a QR and an eigh (≈ dim · u ≈ 60 · 6e-8).
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    # Principal angles with span(U₀): cosines = singular values of U₀ᵀ Û, all 1.
    cos = torch.linalg.svdvals(u0.T @ u)
    torch.testing.assert_close(cos, torch.ones(4), atol=1e-5, rtol=0)
    # ‖Δ_k‖² in float64 blocks against the direct sum (same float64 squares, order only).
    for d, sq in zip(deltas, sk.sq):
        assert math.isclose(sq, float(d.double().pow(2).sum()), rel_tol=1e-12)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"basis": "svd"}, "basis"),
        ({"basis": "sketch", "rank_rule": "gavish-donoho"}, "gavish-donoho"),
        (
            {
                "basis": "sketch",
                "stiefel_momentum": True,
                "coefficient_basis": "gauge",
            },
            "stiefel_momentum",
        ),
    ],
)
def test_sketch_options_are_validated(params, field):
    with pytest.raises(ValueError, match=field):
        build_algorithm("fedcmp", params)
