"""The block SRHT of Fed-CMP's first sketch pass (fedsim.algorithms.srht, ``sketch_map: srht``):
the transform is the Walsh–Hadamard matrix's, the C kernel has the torch reference's bits, and
the sketched Fed-CMP round recovers the exact basis where the deltas have low rank."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.algorithms import build_algorithm, ckernel
from fedsim.algorithms import srht as sr
from fedsim.algorithms.fedcmp import sketch_bases
from tests.test_ckernel import kernel_status

U32 = 2.0**-24  # float32's unit roundoff
HAVE_CC = ckernel.compiler() is not None and not ckernel.x86_without_fma()
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler or no FMA here")


def hadamard(npad: int) -> torch.Tensor:
    """H[i, j] = (−1)^popcount(i & j), float64 (the definition, not the fast transform)."""
    i = torch.arange(npad)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool((bits > 0).any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.to(torch.float64)


@pytest.mark.parametrize("n", [1, 3, 8, 16, 37, 64, 130])
def test_the_transform_is_the_hadamard_matrix(n):
    """Against D, H and R applied as matrices in float64. Every output is a sum of n' terms
    ±x_j reached through a tree of depth t = log₂ n' of single-rounding additions, so its
    error is at most γ_t Σ_j |x_j| with γ_t = t u / (1 − t u) (Higham, §4.2); signs and the
    sampled coordinates are exact."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    block = sr.BlockSRHT.draw(n, 7, g)
    d, o = block.signs(g)
    npad = sr.padded(n)
    xp = torch.zeros(5, npad, dtype=torch.float64)
    xp[:, :n] = x.double() * d.double()
    want = (xp @ hadamard(npad).T)[:, block.idx] * o.double()
    got, sq = sr.srht_rows(x, d, block.idx, o)
    t = max(1, npad.bit_length() - 1)
    gamma = t * U32 / (1 - t * U32)
    bound = gamma * x.double().abs().sum(1, keepdim=True)
    assert bool(((got.double() - want).abs() <= bound).all())
    # ‖x‖² in float64: the squares are exact, n − 1 additions in a fixed order.
    exact = float((x.double() ** 2).sum())
    assert math.isclose(sq, exact, rel_tol=n * 2.0**-52)


def test_the_sampled_coordinates_and_signs():
    g = torch.Generator().manual_seed(0)
    one = sr.BlockSRHT.draw(
        100, 40, g
    )  # n' = 128 ≥ ℓ: distinct coordinates of [0, 128)
    assert one.ell == 40 and len(set(one.idx.tolist())) == 40
    assert 0 <= int(one.idx.min()) and int(one.idx.max()) < 128
    wide = sr.BlockSRHT.draw(
        5, 20, g
    )  # n' = 8 < ℓ: each coordinate ⌈20/8⌉ = 3 times at most
    counts = torch.bincount(wide.idx, minlength=8)
    assert int(counts.max()) <= 3 and int(counts.sum()) == 20
    d, o = one.signs(g)
    assert d.shape == (100,) and o.shape == (40,)
    assert set(d.tolist()) <= {-1.0, 1.0} and set(o.tolist()) <= {-1.0, 1.0}
    # The same generator state draws the same map.
    a = sr.BlockSRHT.draw(100, 40, torch.Generator().manual_seed(3))
    b = sr.BlockSRHT.draw(100, 40, torch.Generator().manual_seed(3))
    assert torch.equal(a.idx, b.idx)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_has_the_reference_bits(threads):
    """Widths around the SIMD vectors, not powers of two, ℓ past n', values over twelve
    orders of magnitude: the kernel's sketch and row sums of squares equal the reference's."""
    if sr.kernel() is None:
        pytest.skip(sr.status())
    g = torch.Generator().manual_seed(11)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, n, ell in (
            (1, 2, 3),
            (7, 15, 4),
            (33, 17, 40),
            (64, 512, 70),
            (5, 2048, 9),
        ):
            scale = 10.0 ** torch.randint(-6, 7, (m, 1), generator=g).float()
            x = torch.randn(m, n, generator=g) * scale
            block = sr.BlockSRHT.draw(n, ell, g)
            d, o = block.signs(g)
            got, sq = sr.srht_rows(x, d, block.idx, o)
            assert torch.equal(got, sr.srht_rows_torch(x, d, block.idx, o))
            assert sq == math.fsum(sr.row_squares_torch(x).tolist())
    finally:
        torch.set_num_threads(old)


@needs_cc
def test_the_probe_refuses_a_kernel_that_rounds_differently(tmp_path, monkeypatch):
    """A kernel that scales its input by 1 + 2⁻²³ before the transform (one more rounding per
    element): the probe must see it on its random data; the real kernel passes."""
    src = sr.SOURCE.read_text().replace(
        "t[j] = row[j] * signs[j];", "t[j] = row[j] * signs[j] * 1.00000012f;"
    )
    assert src != sr.SOURCE.read_text()
    wrong = tmp_path / "hadamard_wrong.c"
    wrong.write_text(src)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    flags = ckernel.flags()
    assert sr._probe(sr._load(ckernel.build(wrong, ckernel.compiler(), flags))) is False
    assert sr._probe(sr._load(ckernel.build(sr.SOURCE, ckernel.compiler(), flags)))


def test_the_torch_reference_runs_when_asked_or_without_a_compiler(tmp_path):
    off = kernel_status(tmp_path, "srht", FEDSIM_SRHT_KERNEL="0")
    assert off == "torch: off (FEDSIM_SRHT_KERNEL=0)"
    missing = kernel_status(tmp_path, "srht", CC="/no/such/cc")
    assert missing == "torch: no C compiler ($CC, cc, gcc)"
    assert not (tmp_path / "cache" / "kernels").exists()


@pytest.mark.parametrize("m, n", [(60, 30), (30, 60), (40, 100)])
def test_srht_sketch_spans_low_rank_deltas(m, n):
    """Deltas Δ_k = U₀ M_k V₀ᵀ of rank 4: Y = A Ω has rank 4 unless the block SRHT maps the
    row space V₀ (continuous, random) onto a lower rank — a set of measure zero — so
    span(Q_U) ⊇ span(U₀) and the Ritz basis is U₀'s: principal-angle cosines 1 up to the
    rounding of a QR and an eigh (≈ dim · u)."""
    g = torch.Generator().manual_seed(m * n)
    u0 = torch.linalg.qr(torch.randn(m, 4, generator=g))[0]
    v0 = torch.linalg.qr(torch.randn(n, 4, generator=g))[0]
    deltas = [u0 @ torch.randn(4, 4, generator=g) @ v0.T for _ in range(5)]
    p = [0.1, 0.2, 0.3, 0.15, 0.25]
    sk = sketch_bases(
        deltas, p, 4, torch.Generator().manual_seed(0), 10, 2, sketch_map="srht"
    )
    cos_u = torch.linalg.svdvals(u0.T @ sk.left.vectors)
    cos_v = torch.linalg.svdvals(v0.T @ sk.right.vectors)
    torch.testing.assert_close(cos_u, torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(cos_v, torch.ones(4), atol=1e-5, rtol=0)
    for d, sq in zip(deltas, sk.sq):
        assert math.isclose(sq, float(d.double().pow(2).sum()), rel_tol=1e-12)


def test_srht_round_equals_the_gaussian_round_on_low_rank_deltas():
    """Both maps capture span(U₀) exactly here, so both float32 rounds are the exact round up
    to the rounding of two routes: Davis–Kahan as in test_fedcmp_sketch (≲ 2e-4 of a basis
    vector over these gaps, the fusion Lipschitz ≤ 2), 1e-3 of the step."""
    from tests.test_fedcmp_sketch import low_rank_round

    weights, ups, _ = low_rank_round(7, 40, 36, 5, 4)
    steps = {}
    for sketch_map in ("gaussian", "srht"):
        params = {"basis": "sketch", "rank": 8, "sketch_map": sketch_map}
        algo = build_algorithm("fedcmp", params)
        res = algo.aggregate(weights, ups, algo.init_state(weights), 1)
        assert res.metrics["p.weight/rank"] == 4
        steps[sketch_map] = res.weights["p.weight"]
    err = float((steps["srht"] - steps["gaussian"]).norm())
    assert err <= 1e-3 * float(steps["gaussian"].norm())


def test_srht_with_bf16_products_keeps_the_rank_and_the_mean():
    """bfloat16 products: the ranks kept and the step's consistency, from the arithmetic.

    Rank: with ε the worst case of ``low_precision_floor`` (‖E_Q‖₂ ≤ u√ℓ, u = 2⁻⁸, ℓ = 18,
    inner size 40), each rounded projection is within ε‖Δ_k‖_F, so the Ritz matrix moves by
    at most (2ε + ε²)·total in norm (total = Σ p_k ‖Δ_k‖²) and, by Weyl, its 4th eigenvalue
    stays above λ₄ − (2ε + ε²)·total; past the deltas' rank every eigenvalue is below the
    floor 1.1 ε²·total (Courant–Fischer). λ₄, from the float64 Gram, clears both here (checked
    first), so exactly 4 directions are kept on each side. Mean: with ``reliability: none`` the
    step is U μ Vᵀ + (Σ p_k Δ_k − U μ Vᵀ) whatever basis the rounding gave, so it equals the
    plain mean up to float32 rounding of the two terms (inner sizes ≤ 40: ≲ 40 · 2⁻²⁴ · 3 ≈
    7e-6 relative), 1e-5."""
    from tests.test_fedcmp_sketch import low_rank_round

    weights, ups, _ = low_rank_round(7, 40, 36, 5, 4)
    total_n = sum(u.num_samples for u in ups)
    p = [u.num_samples / total_n for u in ups]
    deltas = [u.delta["p.weight"].double() for u in ups]
    gram = sum(pk * d @ d.T for pk, d in zip(p, deltas))
    lam4 = float(torch.linalg.eigvalsh(gram).flip(0)[3])
    total = sum(pk * float(d.pow(2).sum()) for pk, d in zip(p, deltas))
    u, ell = 2.0**-8, 18
    eps = u * math.sqrt(ell) * (1 + u) + 40 * U32 * math.sqrt(ell) + 3 * u
    assert lam4 - (2 * eps + eps**2) * total > 1.1 * eps**2 * total
    algo = build_algorithm(
        "fedcmp",
        {
            "basis": "sketch",
            "rank": 8,
            "sketch_dtype": "bfloat16",
            "sketch_map": "srht",
            "reliability": "none",
            "momentum": 0.0,
        },
    )
    res = algo.aggregate(weights, ups, algo.init_state(weights), 1)
    assert res.metrics["p.weight/rank"] == 4
    assert res.metrics["p.weight/rank_v"] == 4
    mean = sum(pk * d for pk, d in zip(p, deltas))
    err = float((res.weights["p.weight"].double() - mean).norm())
    assert err <= 1e-5 * float(mean.norm())


@pytest.mark.parametrize(
    "params",
    [{"sketch_map": "srht"}, {"basis": "sketch", "sketch_map": "fjlt"}],
)
def test_sketch_map_is_validated(params):
    with pytest.raises(ValueError, match="sketch_map"):
        build_algorithm("fedcmp", params)
