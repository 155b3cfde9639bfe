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
        ({"sketch_dtype": "bfloat16"}, "sketch_dtype"),
        ({"basis": "sketch", "sketch_dtype": "float16"}, "sketch_dtype"),
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


# --- bfloat16 products (``sketch_dtype: bfloat16``) ------------------------------------------

U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, round to nearest
U_FP32 = 2.0**-24


def test_bf16_products_sum_in_fp32_and_round_once():
    """The arithmetic the bf16 sketch's accuracy argument rests on (``low_precision_floor``):
    a bf16 × bf16 product of inner size k is summed in fp32 and rounded to bf16 once. Its
    inputs are exact bf16 values, so the float64 product is exact up to k · 2⁻⁵³; the fp32 sum
    adds at most γ_k (|A| |B|) with γ_k = k u₃₂ / (1 − k u₃₂), the output's rounding
    u (|exact| + that). A sum kept in bf16 would be off by ≈ k · 2⁻⁸ (|A| |B|): 64× the bound at
    k = 4096, the inner size of a 7B projector's delta."""
    g = torch.Generator().manual_seed(0)
    k = 4096
    a = torch.randn(48, k, generator=g).to(torch.bfloat16)
    b = torch.randn(k, 32, generator=g).to(torch.bfloat16)
    got = (a @ b).to(torch.float64)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    exact = a64 @ b64
    mass = a64.abs() @ b64.abs()
    gamma = k * U_FP32 / (1 - k * U_FP32)
    bound = U_BF16 * exact.abs() + (1 + U_BF16) * gamma * mass + k * 2.0**-53 * mass
    assert bool(((got - exact).abs() <= bound).all())
    # And the products do run in bf16 (not silently in fp32): the rounding is visible.
    assert float((got - exact).abs().max()) > 0


@pytest.mark.parametrize("seed", range(6))
def test_bf16_sketch_keeps_no_rank_for_rounding(seed):
    """On deltas of rank r₀ every eigenvalue past r₀ is rounding. Here (12 × 12, r₀ = 6,
    6 clients with Gaussian 6 × 6 mixings) the bf16 products' rounding (≈ u² / 12 of the
    energy per direction, typically) lies above float32's rule (λ_max · dim · 2⁻²³ =
    1.4·10⁻⁶ λ_max): without ``low_precision_floor`` a rank above r₀ was kept in 25 of 30
    seeds. The floor (Courant–Fischer: ≥ every eigenvalue past r₀; ≤ 1.1 ε² · total with
    ε = ‖E_Q‖₂ (1 + u) + 12 · 2⁻²⁴ · √12 + 3u ≤ 0.026 since ‖E_Q‖₂ ≤ ‖E_Q‖_F ≤ u √12, i.e.
    ≤ 7.5·10⁻⁴ of the energy) stays far below the
    smallest true eigenvalue (a 6 × 6 Wishart-like average of 6 Gaussian Grams: ≈ 0.35 of
    the mean eigenvalue, ≈ 0.06 of the energy), so exactly r₀ is kept on both sides."""
    m, n, k, r0 = 12, 12, 6, 6
    g = torch.Generator().manual_seed(seed)
    u0 = torch.linalg.qr(torch.randn(m, r0, generator=g))[0]
    v0 = torch.linalg.qr(torch.randn(n, r0, generator=g))[0]
    ups = [
        ClientUpdate(
            c, {"p.weight": u0 @ torch.randn(r0, r0, generator=g) @ v0.T}, 10, 0.0, 1
        )
        for c in range(k)
    ]
    weights = {"p.weight": torch.zeros(m, n)}
    algo = build_algorithm(
        "fedcmp", {"basis": "sketch", "sketch_dtype": "bfloat16", "rank": 10}
    )
    res = algo.aggregate(weights, ups, algo.init_state(weights), 1)
    assert res.metrics["p.weight/rank"] == r0
    assert res.metrics["p.weight/rank_v"] == r0


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_bf16_sketch_step_is_the_plain_mean_without_reliability(shape):
    """With ``reliability: none`` the step is U μ Vᵀ + (Σ p_k Δ_k − U μ Vᵀ) = Σ p_k Δ_k
    whatever basis and coefficients the bf16 products gave: the coefficients must be the
    projections the residual subtracts. The identity holds up to float32 rounding of the two
    terms (each ≤ ‖Σ p Δ‖ in norm, a few products of inner size ≤ 40: ≲ 40 · 2⁻²⁴ · 3 ≈ 7e-6
    relative), so 1e-5 of the mean's norm; a mismatch between the coefficients and the
    residual moves the step by the truncated part, O(1) here (full-rank noise, rank 4)."""
    m, n = shape
    g = torch.Generator().manual_seed(5)
    ups = [
        ClientUpdate(c, {"p.weight": torch.randn(m, n, generator=g)}, 10 + c, 0.0, 1)
        for c in range(5)
    ]
    weights = {"p.weight": torch.zeros(m, n)}
    algo = build_algorithm(
        "fedcmp",
        {
            "basis": "sketch",
            "sketch_dtype": "bfloat16",
            "rank": 4,
            "reliability": "none",
            "momentum": 0.0,
        },
    )
    res = algo.aggregate(weights, ups, algo.init_state(weights), 1)
    total = sum(u.num_samples for u in ups)
    mean = sum(u.num_samples / total * u.delta["p.weight"].double() for u in ups)
    err = float((res.weights["p.weight"].double() - mean).norm())
    assert err <= 1e-5 * float(mean.norm())
    assert res.metrics["p.weight/rank"] == 4
