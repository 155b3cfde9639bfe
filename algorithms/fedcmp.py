"""Fed-CMP: Canonical Reliability-Aware Aggregation (CRA) + Orthogonality-Preserved Momentum (OPM).

Xiong et al., "A Step Toward Federated Pretraining of Multimodal Large Language Models", 2026,
arXiv 2603.26786. Only the paper's abstract is public; it names the two parts and the Fed-MA task.
The equations below are fedsim's formalisation of that abstract (docs/explanation/fedcmp.md),
grounded in published methods: truncated Tucker-2 / HOSVD of the stacked client deltas
(De Lathauwer et al. 2000), orthogonal-Procrustes gauge fixing (Schönemann 1966), leave-one-out
agreement and shrinkage (FedPA, arXiv 2010.05273; positive-part James–Stein), TIES-style sign
election (arXiv 2306.01708), the optimal hard threshold for singular values (Gavish & Donoho
2014), momentum transported between bases by projection, optionally Stiefel momentum with QR
retraction (Absil et al. 2008).

Per weight matrix (``[m, n]``; biases take the reliability-weighted mean), round t, clients k with
p_k = n_k / Σ n and Δ_k = W_k − W_t; defaults first, options (the attributes of :class:`FedCMP`)
in brackets:

1. Û, V̂: top-r left / right singular vectors of [√p_1 Δ_1, …, √p_K Δ_K] and of its vertical stack,
   i.e. top eigenvectors of G_U = Σ p_k Δ_k Δ_kᵀ and G_V = Σ p_k Δ_kᵀ Δ_k (fp32; exact eigh when
   small, a seeded randomized range finder otherwise: never the m × K·n stack). r is capped by
   the stacked deltas' numerical rank on each side [``rank_rule: gavish-donoho``: the singular
   values above the optimal hard threshold; ``energy``: the smallest rank holding that share].
2. Gauge: U_t = Û · polar(Ûᵀ U_{t−1}), V_t likewise (first round: U_t = Û). It carries the
   momentum between rounds; it never changes the round's own step.
3. C_k = Ûᵀ Δ_k V̂ in the round's own basis [``coefficient_basis: gauge``: in U_t, V_t];
   residual E_k = Δ_k − Û C_k V̂ᵀ (only Σ w_k E_k is ever formed).
4. Reliability [``reliability``]: client weights w_k ∝ p_k exp(a_k / τ), a_k = cos(C_k,
   Σ_{j≠k} p_j C_j); per coordinate μ = Σ w_k C_k, s² = Σ w_k (C_k − μ)², K_eff = 1 / Σ w_k²,
   ρ = max(0, 1 − ŝ² / μ²) with ŝ² = s² Σw² / (1 − Σw²) [``shrinkage: wiener``:
   μ² / (μ² + s²/K_eff)]; C̄ = ρ ⊙ μ
   [``sign``: the mean of the clients agreeing with each coefficient's elected sign;
   ``compensate``: C̄ rescaled to the norm of Σ p_k C_k]. The residual is shrunk by its own
   reliability [``residual: keep | drop``].
5. m̃ = (U_tᵀ U_{t−1}) m_{t−1} (V_{t−1}ᵀ V_t); m_t = β m̃ + (1 − β) C̄ (in U_t's gauge);
   m̂ = m_t / (1 − β^t) [``momentum_scale: lr``: on C̄ / ā_t, stepped by ā_t].
6. W_{t+1} = W_t + η (U_t m̂ V_tᵀ + λ_res Σ w_k E_k).

``fedcmp-v1`` is the first formalisation (gauge basis, wiener shrinkage, residual kept whole);
docs/explanation/fedcmp.md, "Revisions", gives the measurement behind each change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    LocalTraining,
    ServerDefaults,
    Weights,
    check_updates,
    global_norm,
    sample_weights,
    sorted_updates,
    sum_squares,
    weighted_sum,
)
from fedsim.algorithms.fednova import LRMassUpload, uploaded_lr_masses
from fedsim.algorithms.registry import register
from fedsim.algorithms.srht import BlockSRHT, srht_rows

Tensor = torch.Tensor
_EPS = 1e-12
# Above this many multiply-adds for forming G_U / G_V exactly, use the randomized range finder.
_EXACT_LIMIT = 2e9


# ---------------------------------------------------------------------------------------------
# Step 1: canonical basis


@dataclass(frozen=True)
class Basis:
    """Top-r eigenvectors of a client-delta Gram operator and what they capture."""

    vectors: Tensor  # [dim, r], orthonormal columns
    eigenvalues: Tensor  # [r], descending (σ² of the stacked deltas)
    total: float  # trace of the operator: Σ p_k ‖Δ_k‖²_F
    #: Every eigenvalue, descending, when computed exactly; None from the range finder.
    spectrum: Tensor | None = None
    #: Eigenvalues at or below this are the rounding of low-precision products
    #: (:func:`low_precision_floor`), not directions of the deltas; 0 for float32 products.
    floor: float = 0.0


def _gram_apply(
    deltas: Sequence[Tensor], p: Sequence[float], x: Tensor, side: str
) -> Tensor:
    """Σ_k p_k Δ_k Δ_kᵀ x (side "left") or Σ_k p_k Δ_kᵀ Δ_k x (side "right"), summed in fp32;
    the products in the deltas' dtype (``x`` is cast to it; a no-op for fp32 deltas)."""
    out = torch.zeros_like(x)
    xs = x.to(deltas[0].dtype)
    for d, pk in zip(deltas, p):
        if side == "left":
            out.add_(d @ (d.T @ xs), alpha=pk)
        else:
            out.add_(d.T @ (d @ xs), alpha=pk)
    return out


#: bfloat16's unit roundoff (8 significant bits, round to nearest) and float32's.
_U_BF16 = 2.0**-8
_U_FP32 = 2.0**-24


def low_precision_floor(
    ell: int, inner: int, total: float, q_error: float | None = None
) -> float:
    """The largest eigenvalue rounding can give a direction the deltas do not have, when the
    projections P_k = Q_Uᵀ Δ_k are bfloat16 products (inputs rounded to bf16, fp32 sums, the
    output rounded to bf16) and ``total`` = Σ p_k ‖Δ_k‖²_F.

    With u = 2⁻⁸ and Q̃ = Q + E_Q the rounded basis: ‖E_Qᵀ Δ‖_F ≤ ‖E_Q‖₂ ‖Δ‖_F, where
    ``q_error`` = ‖E_Q‖₂ as measured (≈ u / √3 (1 + √(ℓ/m)) for random roundings; without it
    the worst case ‖E_Q‖_F ≤ u √ℓ); Δ̃ = Δ + E, ‖Q̃ᵀ E‖_F ≤ (1 + ‖E_Q‖₂) u ‖Δ‖_F; the fp32 sum
    over ``inner`` terms adds ≤ γ ‖|Q̃|ᵀ|Δ̃|‖_F ≤ γ √ℓ ‖Δ‖_F (γ = inner · 2⁻²⁴); the output's
    rounding ≤ u ‖P̃‖_F; the right basis rounds Sᵀ P̃ to bf16 once more (≤ u ‖Δ‖_F). So
    ‖P̃_k − P_k‖_F ≤ ε ‖Δ_k‖_F with ε = ‖E_Q‖₂ (1 + u) + γ √ℓ + 3u (first order). For a unit v
    with P_kᵀ v = 0 for every k (a direction no delta has), the Rayleigh quotient of
    Σ p_k P̃_k P̃_kᵀ is Σ p_k ‖(P̃_k − P_k)ᵀ v‖² ≤ ε² · total, so by Courant–Fischer every
    eigenvalue past the deltas' rank is at most that (second order: with the measured ‖E_Q‖₂
    ≈ 3.5·10⁻⁴ of the total energy at ℓ = 266 and 4096-wide deltas; 7·10⁻³ from the worst
    case).
    The 1.1 covers the dropped higher-order terms. Directions below the floor may be real;
    they are not kept because nothing here can tell them from rounding."""
    if q_error is None:
        q_error = _U_BF16 * math.sqrt(ell)
    eps = q_error * (1 + _U_BF16) + inner * _U_FP32 * math.sqrt(ell) + 3 * _U_BF16
    return 1.1 * eps * eps * total


def top_eigenvectors(
    deltas: Sequence[Tensor],
    p: Sequence[float],
    r: int,
    side: Literal["left", "right"],
    generator: torch.Generator | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    exact: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Basis:
    """Top-``r`` eigenpairs of G = Σ p_k Δ_k Δ_kᵀ (left) or Σ p_k Δ_kᵀ Δ_k (right).

    Exact (``eigh`` of the ``dim × dim`` Gram matrix) when that is cheap; otherwise a randomized
    range finder with ``power_iters`` power iterations on the operator (Halko, Martinsson & Tropp
    2011), which keeps extra memory at O(dim · (r + oversample)). ``exact`` forces ``eigh`` (a rank
    rule that reads the whole spectrum needs it). ``dtype``: the range finder's products (a copy
    of the deltas in it, summed in fp32); the exact Gram is always formed in fp32 (a Gram whose
    entries were rounded to bf16 would perturb every direction, the null space too, at first
    order).
    """
    m, n = deltas[0].shape
    dim, other = (m, n) if side == "left" else (n, m)
    total = float(sum(pk * float(d.pow(2).sum()) for d, pk in zip(deltas, p)))
    r = max(1, min(r, dim))
    ell = min(dim, r + oversample)
    # Exact when small: the dim × dim Gram is then no bigger than the O(dim · ell) sketches.
    spectrum = None
    if exact or len(deltas) * dim * dim * other <= _EXACT_LIMIT or dim <= 2 * ell:
        g = torch.zeros(dim, dim, dtype=torch.float32, device=deltas[0].device)
        for d, pk in zip(deltas, p):
            g.add_(d @ d.T if side == "left" else d.T @ d, alpha=pk)
        vals, vecs = torch.linalg.eigh(g)  # ascending
        spectrum = vals.flip(0).clamp_min(0.0)
        vals, vecs = vals.flip(0)[:r], vecs.flip(1)[:, :r]
    else:
        # Drawn on the CPU (the same Ω on every device), then moved to the deltas' device.
        omega = torch.randn(
            dim, ell, generator=generator, dtype=torch.float32, device="cpu"
        ).to(deltas[0].device)
        ops = deltas if dtype == torch.float32 else [d.to(dtype) for d in deltas]
        y = _gram_apply(ops, p, omega, side)
        for _ in range(power_iters):
            q, _ = torch.linalg.qr(y)
            y = _gram_apply(ops, p, q, side)
        q, _ = torch.linalg.qr(y)  # [dim, ell]
        b = q.T @ _gram_apply(ops, p, q, side)  # [ell, ell]
        vals, small = torch.linalg.eigh((b + b.T) / 2)
        vals, small = vals.flip(0)[:r], small.flip(1)[:, :r]
        vecs = q @ small
    return Basis(vecs.contiguous(), vals.clamp_min(0.0), total, spectrum)


@dataclass(frozen=True)
class Sketch:
    """The canonical bases of one matrix from :func:`sketch_bases` and what comes with them."""

    left: Basis  # Û = Q_U S_U, Ritz values of G_U in span(Q_U)
    right: Basis  # V̂: top eigenvectors of Σ p_k P_kᵀ P_k, P_k = Ûᵀ Δ_k
    projected: list[Tensor]  # P_k = Ûᵀ Δ_k, [r, n] each (Û's columns above rounding)
    sq: list[float]  # ‖Δ_k‖²_F


def _buffer(d: Tensor, dtype: torch.dtype, buf: Tensor | None) -> Tensor:
    """``buf`` when it has ``d``'s shape, else a new ``dtype`` tensor of it: one buffer reused
    for every client (a fresh 64 MiB tensor per client costs more in page faults than the
    conversion into it: 10 against 2 ms for 4096 × 4096)."""
    if buf is None or buf.shape != d.shape:
        buf = torch.empty(d.shape, dtype=dtype, device=d.device)
    return buf


def _range_sketch(
    deltas: Sequence[Tensor],
    p: Sequence[float],
    ell: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    sketch_map: Literal["gaussian", "srht"] = "gaussian",
) -> tuple[Tensor, list[float]]:
    """Pass 1 of :func:`sketch_bases`: Y = Σ_k √p_k Δ_k Ω_k ([m, ℓ], fp32) and ‖Δ_k‖²_F."""
    m, n = deltas[0].shape
    dev = deltas[0].device
    y = torch.zeros(m, ell, dtype=torch.float32, device=dev)
    sq = []
    if sketch_map == "srht":
        # Ω_k = D_k H Rᵀ D̃_k: the sampled coordinates shared, the signs per client in order;
        # the squares summed by the same read (float64, the kernel's fixed order).
        block = BlockSRHT.draw(n, ell, generator)
        for d, pk in zip(deltas, p):
            signs, osigns = block.signs(generator)
            z, d_sq = srht_rows(d, signs, block.idx, osigns)
            y.add_(z, alpha=math.sqrt(pk))
            sq.append(d_sq)
        return y, sq
    buf = None
    for d, pk in zip(deltas, p):
        # Drawn on the CPU in client order (the same Ω on every device), moved to the device.
        omega = torch.randn(
            n, ell, generator=generator, dtype=torch.float32, device="cpu"
        ).to(dev)
        if dtype != torch.float32:
            # Rounded into the reused buffer by the same read that sums the squares.
            buf = _buffer(d, dtype, buf)
            sq.append(sum_squares(d, copy_to=buf))
            y.add_(buf @ omega.to(dtype), alpha=math.sqrt(pk))
        else:
            y.add_(d @ omega, alpha=math.sqrt(pk))
            sq.append(sum_squares(d))
    return y, sq


def _project(
    deltas: Sequence[Tensor], q_u: Tensor, q_low: Tensor | None
) -> list[Tensor]:
    """Pass 2 of :func:`sketch_bases`: P_k = Q_Uᵀ Δ_k, [ℓ, n] fp32 each; with ``q_low``
    (Q_Uᵀ rounded to a low precision, [ℓ, m]) the products in that precision."""
    if q_low is None:
        return [q_u.T @ d for d in deltas]
    proj, buf = [], None
    for d in deltas:
        buf = _buffer(d, q_low.dtype, buf).copy_(d)
        proj.append((q_low @ buf).to(torch.float32))
    return proj


def sketch_bases(
    deltas: Sequence[Tensor],
    p: Sequence[float],
    rank: int,
    generator: torch.Generator,
    oversample: int = 10,
    power_iters: int = 2,
    dtype: torch.dtype = torch.float32,
    sketch_map: Literal["gaussian", "srht"] = "gaussian",
) -> Sketch:
    """Û and V̂ in two passes over the deltas: a sequentially truncated HOSVD (Vannieuwenhoven,
    Vandebril & Meerbergen, SIAM J. Sci. Comput. 2012) whose first mode comes from a one-pass
    randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1, no power iteration).

    Pass 1 (streaming; each Δ_k can be folded in as it arrives): the sketch
    Y = Σ_k √p_k Δ_k Ω_k (Ω_k ∈ R^{n×ℓ} Gaussian, or with ``sketch_map`` srht the block SRHT
    of :mod:`fedsim.algorithms.srht`; ℓ = r + ``oversample``; Y = A Ω for the horizontal stack
    A = [√p_1 Δ_1, …, √p_K Δ_K]) and ‖Δ_k‖²; Q_U = orth(Y).
    Pass 2: P_k = Q_Uᵀ Δ_k ([ℓ, n]). Û = Q_U S with S the eigenvectors of Σ p_k P_k P_kᵀ
    (Rayleigh–Ritz: the best rank-r basis of G_U = Σ p_k Δ_k Δ_kᵀ inside span(Q_U)).
    V̂: the top eigenvectors of Σ_k p_k P_kᵀ S S ᵀ P_k, i.e. of the right Gram operator of the
    deltas projected onto Û (ST-HOSVD's second mode), from the small P_k only (exact or
    randomized with ``power_iters``, :func:`top_eigenvectors`). The coefficients Ûᵀ Δ_k V̂ then
    follow from P_k without touching the deltas again.

    Against :func:`top_eigenvectors` on each side (2 (2 + q) passes with q power iterations,
    then a pass for the coefficients): 2 passes, each a product with ℓ columns.

    ``dtype`` bfloat16: the products of both passes and of V̂'s range finder take bf16 inputs
    (Δ_k rounded into one reused buffer, Ω drawn in fp32 and rounded: still a valid test
    matrix, Q_U rounded) and sum in fp32, their outputs rounded to bf16; Y, the QR, the Ritz
    Gram, every eigensolver and the norms stay fp32 / float64. Each basis then carries
    :func:`low_precision_floor` so that no rank is kept for rounding alone.
    """
    m, n = deltas[0].shape
    dev = deltas[0].device
    low = dtype != torch.float32
    ell = max(1, min(m, n * len(deltas), rank + oversample))
    y, sq = _range_sketch(deltas, p, ell, generator, dtype, sketch_map)
    q_u, _ = torch.linalg.qr(y)  # [m, ℓ]
    q_low = q_u.T.to(dtype).contiguous() if low else None
    proj = _project(deltas, q_u, q_low)
    total = math.fsum(pk * x for pk, x in zip(p, sq))
    floor = 0.0
    if q_low is not None:
        # ‖E_Q‖₂ of the rounded basis, measured (an [m, ℓ] spectral norm: milliseconds).
        q_error = float(torch.linalg.matrix_norm(q_u - q_low.T.float(), ord=2))
        floor = low_precision_floor(ell, max(m, n), total, q_error)
    b = torch.zeros(ell, ell, dtype=torch.float32, device=dev)
    for pr, pk in zip(proj, p):
        b.add_(pr @ pr.T, alpha=pk)
    vals, small = torch.linalg.eigh((b + b.T) / 2)  # ascending
    vals, small = vals.flip(0).clamp_min(0.0), small.flip(1)
    r_u = max(1, min(rank, ell))
    left = Basis((q_u @ small[:, :r_u]).contiguous(), vals[:r_u], total, floor=floor)
    # Coordinates in Û: P_k ← Sᵀ P_k, [r, n] (ℓ × r × n per client), for the r directions of
    # Û above rounding only: ST-HOSVD truncates a mode before the next is computed, and
    # directions that are rounding (which no rank rule keeps, :func:`numerical_rank`) carry
    # nothing the second mode could use — at 7B size with a rank-16 signal that is 16 rows
    # of 256, and V̂'s range finder runs on them.
    r_keep = min(r_u, numerical_rank(left, m))
    proj = [small[:, :r_keep].T @ pr for pr in proj]
    # V̂'s range finder on one stacked operator Z = [√p_1 P_1; …; √p_K P_K] (Zᵀ Z is the
    # right Gram of the projections): two products per application instead of 2K small
    # ones, and the scaling rounds with the bf16 conversion the products need anyway.
    stacked = torch.cat([pr * math.sqrt(pk) for pr, pk in zip(proj, p)])
    right = top_eigenvectors(
        [stacked],
        [1.0],
        min(rank, n),
        "right",
        generator,
        oversample,
        power_iters,
        dtype=dtype,
    )
    right = Basis(right.vectors, right.eigenvalues, total, floor=floor)
    return Sketch(left, right, proj, sq)


def numerical_rank(b: Basis, dim: int) -> int:
    """Eigenvalues above λ_max · dim · u (u = 2⁻²³, float32's epsilon) and above the basis's
    low-precision ``floor``: the rest is rounding.

    The Gram matrix is formed in float32, so each eigenvalue carries an error of about
    dim · u · λ_max (Weyl's inequality with the rounding of the products as the perturbation);
    directions below that are arbitrary vectors of the null space, and a basis that kept them
    would depend on the solver (two correct implementations differed by 23–83 % of the step).
    """
    lam = b.eigenvalues
    if lam.numel() == 0 or float(lam[0]) <= 0:
        return 1
    tol = float(lam[0]) * dim * float(torch.finfo(torch.float32).eps)
    tol = max(tol, b.floor)
    return max(1, int((lam > tol).sum()))


def gavish_donoho_rank(b: Basis, dim: int, cols: int) -> int:
    """Singular values of the stacked ``dim × cols`` matrix above ω(β) · σ_med.

    Gavish & Donoho, "The Optimal Hard Threshold for Singular Values is 4/√3", IEEE Trans. Inf.
    Theory 2014 (arXiv 1305.5870), unknown noise level: β = min/max of the aspect ratio,
    ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43, σ_med the median of the min(dim, cols) singular values.
    Needs the whole spectrum (``Basis.spectrum``).
    """
    if b.spectrum is None:
        raise ValueError("gavish-donoho needs the exact spectrum")
    count = min(dim, cols)
    sigma = b.spectrum[:count].clamp_min(0.0).sqrt()
    beta = min(dim, cols) / max(dim, cols)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = omega * float(sigma.median())
    return max(1, int((sigma > tau).sum()))


def choose_rank(
    b: Basis, rank: int, energy: float, rule: str = "fixed", cols: int = 0
) -> int:
    """The rank of one side: ``rank`` capped by the side's numerical rank, by the Gavish–Donoho
    threshold (``rule`` ``gavish-donoho``; ``cols`` = K · the other dimension) and, with
    ``energy`` < 1, by the smallest rank holding that share of the spectrum."""
    dim = b.vectors.shape[0]
    r = min(rank, b.vectors.shape[1], numerical_rank(b, dim))
    if rule == "gavish-donoho":
        r = min(r, gavish_donoho_rank(b, dim, cols))
    if energy < 1.0 and b.total > 0:
        cum = torch.cumsum(b.eigenvalues, 0) / b.total
        hit = torch.nonzero(cum >= energy - 1e-7)
        r = min(r, int(hit[0]) + 1 if len(hit) else r)
    return max(1, r)


# ---------------------------------------------------------------------------------------------
# Step 2: gauge fixing


def polar(a: Tensor) -> Tensor:
    """The orthogonal polar factor of a square matrix (closest orthogonal matrix, Procrustes)."""
    u, _, vh = torch.linalg.svd(a)
    return u @ vh


def gauge_fix(new: Tensor, previous: Tensor | None) -> Tensor:
    """Rotate ``new`` ([dim, r]) within its span to best match ``previous`` ([dim, r']).

    U_t = Û · polar(Ûᵀ U_{t−1}). When the rank changed, the r × r' overlap is zero-padded or cut to
    r × r, so the rotation stays orthogonal and U_t stays orthonormal.
    """
    if previous is None:
        return new
    r = new.shape[1]
    overlap = new.T @ previous  # [r, r']
    if overlap.shape[1] < r:
        overlap = torch.cat([overlap, overlap.new_zeros(r, r - overlap.shape[1])], 1)
    return new @ polar(overlap[:, :r])


# ---------------------------------------------------------------------------------------------
# Steps 3-4: coefficients and reliability


def coefficients(deltas: Sequence[Tensor], u: Tensor, v: Tensor) -> Tensor:
    """C_k = Uᵀ Δ_k V for every client, stacked ``[K, r, r]``."""
    return torch.stack([u.T @ d @ v for d in deltas])


def client_reliability(
    c: Tensor, p: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Leave-one-out agreement a_k and weights w_k ∝ p_k exp(a_k / τ), Σ w = 1.

    a_k = cos(C_k, Σ_{j≠k} p_j C_j); a lone client (nothing to agree with) gets a_k = 0.
    """
    flat = c.reshape(c.shape[0], -1).to(torch.float64)
    pw = p.to(torch.float64)
    total = (pw[:, None] * flat).sum(0)
    others = total[None, :] - pw[:, None] * flat  # [K, r·r]
    denom = flat.norm(dim=1) * others.norm(dim=1)
    agree = torch.where(
        denom > _EPS, (flat * others).sum(1) / denom.clamp_min(_EPS), 0.0
    )
    logits = torch.log(pw.clamp_min(1e-300)) + agree / temperature
    w = torch.softmax(logits, 0)
    return agree.to(torch.float32), w.to(torch.float32)


def coordinate_reliability(
    c: Tensor, w: Tensor, shrinkage: str = "wiener"
) -> tuple[Tensor, Tensor]:
    """μ = Σ w_k C_k and the element-wise reliability ρ of μ (inverse-variance shrinkage).

    With s² = Σ w_k (C_k − μ)² and K_eff = 1 / Σ w_k²:

    - ``wiener`` (the original formalisation): ρ = μ² / (μ² + s²/K_eff + ε). μ² already holds the
      noise, so pure noise keeps ρ ≈ 0.4, never 0 (ten pure-noise rounds: mean 0.38).
    - ``unbiased``: ρ = max(0, 1 − ŝ² / μ²), ŝ² = s² Σw² / (1 − Σw²) the unbiased estimate of
      the noise variance of the weighted mean (E s² = σ² (1 − Σw²) for independent client noise
      of variance σ², and the mean's is σ² Σw²): the positive-part James–Stein factor, ≈ 0 on
      noise and 1 on agreement. A lone client (Σw² = 1) has nothing to estimate it from: ρ = 1.
    """
    w64 = w.to(torch.float64)
    c64 = c.to(torch.float64)
    mu = torch.einsum("k,kij->ij", w64, c64)
    var = torch.einsum("k,kij->ij", w64, (c64 - mu) ** 2)
    sum_w2 = float((w64**2).sum())
    mu2 = mu**2
    if shrinkage == "unbiased":
        if sum_w2 >= 1.0 - 1e-12:
            return mu.to(torch.float32), torch.ones_like(mu, dtype=torch.float32)
        noise = var * sum_w2 / (1.0 - sum_w2)
        rho = torch.where(
            mu2 > 0, (1.0 - noise / mu2.clamp_min(1e-300)).clamp_min(0.0), 0.0
        )
        return mu.to(torch.float32), rho.to(torch.float32)
    eps = _EPS * float(mu2.mean()) + 1e-30
    rho = mu2 / (mu2 + var * sum_w2 + eps)
    return mu.to(torch.float32), rho.to(torch.float32)


def sign_fusion(c: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """TIES-style disjoint mean: per coordinate, the elected sign s = sign(Σ p_k C_k) and the
    p-weighted mean of the clients whose C_k has that sign (Yadav et al., "TIES-Merging",
    NeurIPS 2023, arXiv 2306.01708; KnOTS, Stoica et al. 2024, arXiv 2410.19735, applies it in
    an SVD basis shared by the models). Returns (fused, share of p that agreed)."""
    c64 = c.to(torch.float64)
    p64 = p.to(torch.float64)[:, None, None]
    elected = torch.sign((p64 * c64).sum(0))
    agree = (torch.sign(c64) == elected[None]) & (elected[None] != 0)
    mass = (p64 * agree).sum(0)
    fused = torch.where(
        mass > 0, (p64 * c64 * agree).sum(0) / mass.clamp_min(1e-300), 0.0
    )
    return fused.to(torch.float32), mass.to(torch.float32)


def residual_reliability(
    residual_sq: float, client_sq: Sequence[float], w: Sequence[float]
) -> float:
    """The unbiased shrinkage of the weighted residual Ē = Σ w_k E_k, one factor for all of it.

    ``residual_sq`` = ‖Ē‖², ``client_sq`` = ‖E_k‖². The spread is Σ w_k ‖E_k‖² − ‖Ē‖²; as in
    :func:`coordinate_reliability` (``unbiased``), ρ_res = max(0, 1 − spread · Σw² / ((1 − Σw²)
    ‖Ē‖²)); 1 for a lone client, 0 for a zero residual.
    """
    sum_w2 = sum(x * x for x in w)
    if sum_w2 >= 1.0 - 1e-12:
        return 1.0
    if residual_sq <= 0:
        return 0.0
    spread = max(0.0, sum(wk * e for wk, e in zip(w, client_sq)) - residual_sq)
    return max(0.0, 1.0 - spread * sum_w2 / ((1.0 - sum_w2) * residual_sq))


# ---------------------------------------------------------------------------------------------
# Step 5: momentum


def transport(
    m: Tensor, u_new: Tensor, u_old: Tensor, v_new: Tensor, v_old: Tensor
) -> Tensor:
    """m̃ = (U_tᵀ U_{t−1}) m (V_{t−1}ᵀ V_t): carry canonical momentum to the new basis."""
    return (u_new.T @ u_old) @ m @ (v_old.T @ v_new)


def _sym(a: Tensor) -> Tensor:
    return (a + a.T) / 2


def tangent(u: Tensor, x: Tensor) -> Tensor:
    """Projection of ``x`` onto the tangent space of the Stiefel manifold at ``u``."""
    return x - u @ _sym(u.T @ x)


def qf(a: Tensor) -> Tensor:
    """Q factor of a thin QR with signs fixed so that diag(R) ≥ 0 (a retraction)."""
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


def stiefel_step(
    previous: Tensor, target: Tensor, velocity: Tensor | None, beta: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """One Stiefel-momentum step of the basis from ``previous`` toward ``target``.

    ξ = proj_{U_{t−1}}(Ũ − U_{t−1}); M ← β · proj_{U_{t−1}}(M) + ξ; U_t = qf(U_{t−1} + α M).
    """
    xi = tangent(previous, target - previous)
    vel = xi if velocity is None else beta * tangent(previous, velocity) + xi
    return qf(previous + alpha * vel), vel


# ---------------------------------------------------------------------------------------------
# The algorithm


def _matrix_seed(key: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{key}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@register(
    "fedcmp",
    paper="Xiong et al. 2026, arXiv 2603.26786 (fedsim's formalisation)",
    reads_updates="its canonical basis and reliability weights are computed from each "
    "client's update, so one client moves them by more than a clipped contribution",
)
@dataclass(frozen=True, kw_only=True)
class FedCMP(ServerDefaults):
    """Fed-CMP: canonical reliability-aware aggregation with orthogonality-preserved momentum.

    Attributes
    ----------
    rank:
        r, the canonical rank per matrix side, capped by the dimension and by the stacked
        deltas' numerical rank (directions below rounding are never kept).
    rank_rule:
        ``fixed`` (``rank``) or ``gavish-donoho``: the singular values of the stacked deltas
        above the optimal hard threshold for an unknown noise level (≤ ``rank``; exact spectrum).
    energy:
        With a value below 1, the smallest rank holding this share of the spectrum (≤ rank).
    temperature:
        τ of the client weights w_k ∝ p_k exp(a_k / τ); large τ → plain p-weighting.
    reliability:
        ``both``, ``client`` (w_k only), ``coordinate`` (ρ only, w = p), ``sign`` (TIES-style
        disjoint mean of the clients agreeing with the elected sign of each coefficient) or
        ``none`` (no shrinkage anywhere: p-weighted, residual kept whole).
    shrinkage:
        The coordinate (and residual) reliability: ``unbiased`` (positive-part James–Stein,
        ≈ 0 on pure noise) or ``wiener`` (the original μ²/(μ² + s²/K_eff), ≈ 0.4 on noise).
    coefficient_basis:
        Where coefficients are fused: ``round`` (the round's own eigenbasis, so the step does
        not depend on the carried state) or ``gauge`` (the gauge-fixed basis, as originally
        formalised: ρ then changed 13–24 % between carried and fresh state).
    residual:
        The off-basis residual Σ w_k E_k: ``reliability`` (shrunk by its own unbiased factor
        whenever the coefficients are: ``both``, ``coordinate``, ``sign``), ``keep`` (added back
        whole: truncation then removes nothing) or ``drop``.
    residual_weight:
        λ_res, a further factor on the residual.
    compensate:
        Rescale the fused coefficients to the norm of the p-weighted mean Σ p_k C_k, so that
        reliability changes the direction of the step, not its length.
    momentum:
        β of the canonical momentum (0: no momentum, CRA only).
    momentum_scale:
        ``none`` or ``lr``: the momentum averages updates per unit of local learning rate
        (C̄_t / ā_t with ā_t = Σ p_k a_k, a_k the client's learning-rate mass, uploaded) and the
        step is ā_t · m̂_t, so it follows the local schedule instead of replaying early, large
        steps late in a decaying schedule.
    server_lr:
        η, the server step.
    stiefel_momentum:
        Also move the basis itself with Stiefel momentum (ablation).
    stiefel_beta, stiefel_alpha:
        β_U and α of the Stiefel momentum.
    power_iters, oversample:
        Randomized range finder settings (used for large matrices only).
    basis:
        How Û, V̂ are computed: ``power`` (each side's Gram operator, exact when small, else a
        randomized range finder with ``power_iters`` power iterations: 2 (2 + q) passes over
        the deltas per side, then one for the coefficients) or ``sketch`` (two passes in all:
        a one-pass range sketch of the stacked deltas, then their projection onto it, from
        which V̂ and the coefficients follow; :func:`sketch_bases`;
        docs/explanation/fedcmp.md gives its accuracy against the exact decomposition).
    sketch_dtype:
        With ``basis: sketch``, the precision of its products: ``float32`` or ``bfloat16``
        (inputs rounded to bf16, sums in fp32, outputs rounded to bf16; everything else fp32):
        4.4× faster products on CPUs with AVX512-BF16 or AMX and on GPUs, at a measured cost in
        accuracy (docs/explanation/fedcmp.md, "bfloat16 products"); ranks that rounding alone
        could produce are never kept (:func:`low_precision_floor`: at 7B size directions below
        ≈ 0.035 % of the deltas' energy, where float32 keeps those above ≈ 0.05 % of the largest
        eigenvalue — the ``rank`` metric shows what was kept).
    sketch_map:
        With ``basis: sketch``, the test matrices of its first pass: ``gaussian`` (Ω_k drawn
        i.i.d. normal, 2 m n ℓ FLOPs per client) or ``srht`` (the block subsampled randomized
        Hadamard transform Ω_k = D_k H Rᵀ D̃_k, :mod:`fedsim.algorithms.srht`: n' log₂ n'
        additions per row, float32, no draws — at 7B size the first pass at about the speed
        of a read; the same guarantees as a Gaussian map up to logarithmic factors in the
        oversampling, docs/explanation/fedcmp.md, "Block SRHT").
    """

    rank: int = 256
    rank_rule: Literal["fixed", "gavish-donoho"] = "fixed"
    energy: float = 1.0
    temperature: float = 1.0
    reliability: Literal["both", "client", "coordinate", "sign", "none"] = "both"
    shrinkage: Literal["unbiased", "wiener"] = "unbiased"
    coefficient_basis: Literal["round", "gauge"] = "round"
    residual: Literal["reliability", "keep", "drop"] = "reliability"
    residual_weight: float = 1.0
    compensate: bool = False
    momentum: float = 0.9
    momentum_scale: Literal["none", "lr"] = "none"
    server_lr: float = 1.0
    stiefel_momentum: bool = False
    stiefel_beta: float = 0.5
    stiefel_alpha: float = 1.0
    power_iters: int = 2
    oversample: int = 10
    basis: Literal["power", "sketch"] = "power"
    sketch_dtype: Literal["float32", "bfloat16"] = "float32"
    sketch_map: Literal["gaussian", "srht"] = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if self.residual_weight < 0:
            raise ValueError(
                f"residual_weight must be >= 0, got {self.residual_weight}"
            )
        if self.power_iters < 0 or self.oversample < 0:
            raise ValueError("power_iters and oversample must be >= 0")
        if self.basis not in ("power", "sketch"):
            raise ValueError(f"basis must be power or sketch, got {self.basis!r}")
        for field, allowed, why in (
            (
                "sketch_dtype",
                ("float32", "bfloat16"),
                "basis power's range finders run in float32",
            ),
            (
                "sketch_map",
                ("gaussian", "srht"),
                "basis power applies the Gram operators",
            ),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"{field} must be {' or '.join(allowed)}, got {value!r}"
                )
            if value != allowed[0] and self.basis != "sketch":
                raise ValueError(f"{field} {value} needs basis sketch ({why})")
        if self.basis == "sketch" and self.rank_rule == "gavish-donoho":
            raise ValueError(
                "basis sketch: rank_rule gavish-donoho needs the exact spectrum (use basis power)"
            )
        if (
            self.basis == "sketch"
            and self.stiefel_momentum
            and self.coefficient_basis == "gauge"
        ):
            raise ValueError(
                "basis sketch: coefficient_basis gauge with stiefel_momentum needs a pass "
                "over the deltas in the moved basis (use coefficient_basis round)"
            )

    # -- plug-in interface ------------------------------------------------------------------

    def init_state(self, weights: Weights, num_clients: int | None = None) -> Weights:
        return {"round": torch.zeros((), dtype=torch.int64, device="cpu")}

    def local_training(self) -> LocalTraining:
        """Unchanged local training; with ``momentum_scale: lr`` clients upload their lr mass."""
        if self.momentum_scale == "lr":
            return LRMassUpload()
        return LocalTraining()

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        ordered = sorted_updates(updates)
        check_updates(weights, ordered)
        p = sample_weights(ordered)
        lr_mass = None
        if self.momentum_scale == "lr":
            masses = uploaded_lr_masses(ordered, "fedcmp")
            lr_mass = math.fsum(pk * a for pk, a in zip(p, masses))
        new_state: Weights = {
            "round": torch.tensor(int(state.get("round", 0)) + 1, device="cpu")
        }
        new: Weights = {}
        metrics: dict[str, float] = {}
        client_w: dict[str, Tensor] = {}
        matrices = [k for k in weights if weights[k].dim() == 2]
        for key in matrices:
            deltas = [u.delta[key].to(torch.float32) for u in ordered]
            step, w, st, diag = self.matrix_step(
                deltas, p, state, key, server_round, lr_mass
            )
            new[key] = weights[key].to(torch.float32) + step
            new_state.update(st)
            client_w[key] = w
            metrics.update({f"{key}/{k}": v for k, v in diag.items()})
        for key in weights:
            if key in new:
                continue
            # Biases (and any non-matrix tensor): the weighted mean with the weights of the
            # matrix of the same layer, or p when there is none.
            layer = key.rsplit(".", 1)[0] + ".weight"
            w = client_w.get(
                layer,
                torch.tensor(p, dtype=torch.float32, device=weights[key].device),
            )
            mean = sum(
                float(wk) * u.delta[key].to(torch.float64) for wk, u in zip(w, ordered)
            )
            new[key] = weights[key].to(torch.float32) + self.server_lr * mean.to(
                torch.float32
            )
        metrics["update_norm"] = global_norm({k: new[k] - weights[k] for k in weights})
        return AggregateResult(new, new_state, metrics)

    # -- one weight matrix --------------------------------------------------------------------

    def _bases(
        self, deltas: Sequence[Tensor], p: Sequence[float], key: str, server_round: int
    ) -> tuple[Tensor, Tensor, Basis]:
        """Û [m, r_u], V̂ [n, r_v]: the round's own eigenbases at their chosen ranks."""
        m, n = deltas[0].shape
        gen = torch.Generator().manual_seed(_matrix_seed(key, server_round))
        exact = self.rank_rule == "gavish-donoho"
        k = len(deltas)
        chosen = []
        left = None
        for side, dim, other in (("left", m, n), ("right", n, m)):
            basis = top_eigenvectors(
                deltas,
                p,
                min(self.rank, dim),
                side,  # type: ignore[arg-type]
                gen,
                self.oversample,
                self.power_iters,
                exact,
            )
            r = choose_rank(basis, self.rank, self.energy, self.rank_rule, k * other)
            # Contiguous copies: the state must hold the same bits whether it stays in memory
            # or goes through a checkpoint (BLAS results differ between strided and dense).
            chosen.append(basis.vectors[:, :r].contiguous())
            left = basis if left is None else left
        assert left is not None
        return chosen[0], chosen[1], left

    def _sketch(
        self, deltas: Sequence[Tensor], p: Sequence[float], key: str, server_round: int
    ) -> tuple[Tensor, Tensor, Basis, Sketch]:
        """Û, V̂ at their chosen ranks from :func:`sketch_bases` (``basis: sketch``)."""
        m, n = deltas[0].shape
        gen = torch.Generator(device="cpu").manual_seed(_matrix_seed(key, server_round))
        sk = sketch_bases(
            deltas,
            p,
            self.rank,
            gen,
            self.oversample,
            self.power_iters,
            getattr(torch, self.sketch_dtype),
            self.sketch_map,
        )
        k = len(deltas)
        r_u = choose_rank(sk.left, self.rank, self.energy, self.rank_rule, k * n)
        r_v = choose_rank(sk.right, self.rank, self.energy, self.rank_rule, k * m)
        u_hat = sk.left.vectors[:, :r_u].contiguous()
        v_hat = sk.right.vectors[:, :r_v].contiguous()
        return u_hat, v_hat, sk.left, sk

    def _fuse(
        self, c: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, float]]:
        """(fused C̄, client weights w, μ = Σ w_k C_k, agreement a_k, diagnostics)."""
        if self.reliability in ("both", "client"):
            agree, w = client_reliability(c, p, self.temperature)
        else:
            agree, w = client_reliability(c, p, math.inf)[0], p
        mu, rho = coordinate_reliability(c, w, self.shrinkage)
        diag: dict[str, float] = {}
        if self.reliability in ("both", "coordinate"):
            fused = rho * mu
            diag["rho_mean"] = float(rho.mean())
        elif self.reliability == "sign":
            fused, mass = sign_fusion(c, p)
            diag["sign_agreement"] = float(mass.mean())
        else:
            fused = mu
        if self.compensate:
            plain = torch.einsum("k,kij->ij", p, c)
            norm = float(fused.norm())
            if norm > 0:
                fused = fused * (float(plain.norm()) / norm)
        return fused, w, mu, agree, diag

    def _residual(
        self,
        deltas: Sequence[Tensor],
        w: Tensor,
        c: Tensor,
        mu: Tensor,
        u: Tensor,
        v: Tensor,
        sq: Sequence[float] | None = None,
    ) -> tuple[Tensor, float]:
        """λ_res · ρ_res · Σ w_k E_k and ρ_res (E_k = Δ_k − U C_k Vᵀ in the basis of ``c``;
        ``sq``: the ‖Δ_k‖² when already computed)."""
        m, n = deltas[0].shape
        if self.residual == "drop" or self.residual_weight == 0:
            return torch.zeros(m, n, device=u.device), 0.0
        # Σ w_k E_k = Σ w_k Δ_k − U μ Vᵀ: only the weighted sum of deltas is formed (float64,
        # in client order, one read of each Δ_k, rounded once to float32: :func:`weighted_sum`).
        weighted = weighted_sum([{"d": d} for d in deltas], w.tolist())["d"]
        residual = weighted - u @ mu @ v.T
        factor = 1.0
        if self.residual == "reliability" and self.reliability not in (
            "none",
            "client",
        ):
            # ‖E_k‖² = ‖Δ_k‖² − ‖C_k‖²: the projection U Uᵀ Δ V Vᵀ is orthogonal to E_k.
            if sq is None:
                sq = [float(d.to(torch.float64).pow(2).sum()) for d in deltas]
            client_sq = [
                max(0.0, dk - float(ck.pow(2).sum()))
                for dk, ck in zip(sq, c.to(torch.float64))
            ]
            # Squared in place (x · x is what pow(2) computes; the same sum after it): no
            # second float64 tensor of the matrix's size.
            r64 = residual.to(torch.float64)
            sq = float(r64.mul_(r64).sum())
            factor = residual_reliability(sq, client_sq, w.tolist())
        return self.residual_weight * factor * residual, factor

    def _stiefel(
        self,
        basis: Tensor,
        prev: Tensor | None,
        state: Weights,
        name: str,
        new_state: Weights,
    ) -> Tensor:
        """With ``stiefel_momentum``, the basis moved by Stiefel momentum from ``prev`` (its
        velocity kept under ``name``); else ``basis`` unchanged."""
        if not (
            self.stiefel_momentum and prev is not None and prev.shape == basis.shape
        ):
            return basis
        moved, velocity = stiefel_step(
            prev, basis, state.get(name), self.stiefel_beta, self.stiefel_alpha
        )
        new_state[name] = velocity
        return moved

    def _momentum(
        self,
        fused: Tensor,
        state: Weights,
        key: str,
        u: Tensor,
        v: Tensor,
        u_prev: Tensor | None,
        v_prev: Tensor | None,
        lr_mass: float | None,
    ) -> tuple[float, int, Tensor, Tensor]:
        """(scale, t, m_t, m̂_t): the canonical momentum, the previous one transported into this
        round's basis; with ``momentum_scale: lr`` on C̄ / ā_t (scale ā_t)."""
        scale = 1.0
        if self.momentum_scale == "lr":
            if lr_mass is None or not lr_mass > 0:
                raise ValueError(
                    f"fedcmp: momentum_scale lr needs the clients' learning-rate mass, got {lr_mass}"
                )
            scale = lr_mass
        t = int(state.get(f"t/{key}", 0)) + 1
        m_prev = state.get(f"m/{key}")
        if self.momentum > 0 and m_prev is not None and u_prev is not None:
            carried = transport(m_prev, u, u_prev, v, v_prev)  # type: ignore[arg-type]
            mom = self.momentum * carried + (1 - self.momentum) * fused / scale
        else:
            t = 1
            mom = (1 - self.momentum) * fused / scale
        return scale, t, mom, mom / (1 - self.momentum**t)

    def _step_diagnostics(
        self,
        u: Tensor,
        v: Tensor,
        u_prev: Tensor | None,
        v_prev: Tensor | None,
        left: Basis,
        w: Tensor,
        agree: Tensor,
        fuse_diag: dict[str, float],
        res_factor: float,
        res: Tensor,
        step: Tensor,
    ) -> dict[str, float]:
        """One matrix's diagnostics: kept ranks, captured energy, client weights, fusion and
        residual shares, and how far the basis moved since last round."""
        r_u, r_v = u.shape[1], v.shape[1]
        energy = (
            float(left.eigenvalues[:r_u].sum()) / left.total if left.total > 0 else 1.0
        )
        step_norm = float(step.norm())
        diag = {
            "rank": float(r_u),
            "rank_v": float(r_v),
            "energy": energy,
            "w_min": float(w.min()),
            "w_mean": float(w.mean()),
            "w_max": float(w.max()),
            "agreement_mean": float(agree.mean()),
            **fuse_diag,
            "residual_factor": res_factor,
            "residual_share": float(res.norm() * self.server_lr) / step_norm
            if step_norm > 0
            else 0.0,
        }
        if u_prev is not None:
            k = min(u.shape[1], u_prev.shape[1])
            diag["basis_drift_u"] = float((u.T @ u_prev).norm()) / math.sqrt(k)
            diag["basis_drift_v"] = float((v.T @ v_prev).norm()) / math.sqrt(k)  # type: ignore[union-attr]
        return diag

    def matrix_step(
        self,
        deltas: Sequence[Tensor],
        p: Sequence[float],
        state: Weights,
        key: str,
        server_round: int,
        lr_mass: float | None = None,
    ) -> tuple[Tensor, Tensor, Weights, dict[str, float]]:
        """The update of one ``[m, n]`` matrix: (step, client weights, new state, diagnostics).

        ``lr_mass`` is ā_t = Σ p_k a_k (``momentum_scale: lr`` only).
        """
        sketch = None
        if self.basis == "sketch":
            u_hat, v_hat, left, sketch = self._sketch(deltas, p, key, server_round)
        else:
            u_hat, v_hat, left = self._bases(deltas, p, key, server_round)
        u_prev, v_prev = state.get(f"U/{key}"), state.get(f"V/{key}")
        u = gauge_fix(u_hat, u_prev)
        v = gauge_fix(v_hat, v_prev)
        new_state: Weights = {}
        u = self._stiefel(u, u_prev, state, f"MU/{key}", new_state)
        v = self._stiefel(v, v_prev, state, f"MV/{key}", new_state)

        # Fuse in the round's own basis (the eigenbasis: a function of this round's deltas
        # only, up to signs, which no fusion rule here depends on) or in the gauge-fixed one.
        cu, cv = (u_hat, v_hat) if self.coefficient_basis == "round" else (u, v)
        if sketch is None:
            c = coefficients(deltas, cu, cv)  # [K, r_u, r_v]
        else:
            # Ûᵀ Δ_k V̂ from P_k = Ûᵀ Δ_k; in the gauge basis U_t = Û R_U (same span, no
            # Stiefel momentum: refused in __post_init__), C_k = R_Uᵀ (Ûᵀ Δ_k V̂) R_V.
            r_u = u_hat.shape[1]
            c = torch.stack([pr[:r_u] @ v_hat for pr in sketch.projected])
            if self.coefficient_basis == "gauge":
                c = (cu.T @ u_hat) @ c @ (v_hat.T @ cv)
        pt = torch.tensor(p, dtype=torch.float32, device=c.device)
        fused, w, mu, agree, fuse_diag = self._fuse(c, pt)
        res, res_factor = self._residual(
            deltas, w, c, mu, cu, cv, None if sketch is None else sketch.sq
        )
        if self.coefficient_basis == "round":
            # To the gauge-fixed coordinates the momentum lives in (a rotation unless Stiefel
            # momentum moved the span; then the projection onto the new span).
            fused = (u.T @ u_hat) @ fused @ (v_hat.T @ v)

        scale, t, mom, m_hat = self._momentum(
            fused, state, key, u, v, u_prev, v_prev, lr_mass
        )
        shared = u @ (scale * m_hat) @ v.T
        step = self.server_lr * (shared + res)
        new_state.update(
            {
                f"U/{key}": u,
                f"V/{key}": v,
                f"m/{key}": mom,
                f"t/{key}": torch.tensor(t, device="cpu"),
            }
        )
        # Dense copies: the state must hold the same bits in memory as through a checkpoint
        # (QR returns column-major factors, and BLAS results differ with the memory layout).
        new_state = {k: x.contiguous() for k, x in new_state.items()}

        diag = self._step_diagnostics(
            u, v, u_prev, v_prev, left, w, agree, fuse_diag, res_factor, res, step
        )
        return step, w, new_state, diag


@register(
    "fedcmp-cra",
    paper="Xiong et al. 2026, arXiv 2603.26786: CRA only (no momentum)",
    ablation_of="fedcmp",
)
@dataclass(frozen=True, kw_only=True)
class FedCMPCRA(FedCMP):
    """Fed-CMP's canonical reliability-aware aggregation alone (β = 0)."""

    momentum: float = 0.0


@register(
    "fedcmp-opm",
    paper="Xiong et al. 2026, arXiv 2603.26786: OPM with p-weighted fusion",
    ablation_of="fedcmp",
)
@dataclass(frozen=True, kw_only=True)
class FedCMPOPM(FedCMP):
    """Fed-CMP's orthogonality-preserved momentum over plain p-weighted canonical fusion."""

    reliability: Literal["both", "client", "coordinate", "none"] = "none"


@register(
    "fedcmp-v1",
    paper="Xiong et al. 2026, arXiv 2603.26786: fedsim's first formalisation",
    ablation_of="fedcmp",
)
@dataclass(frozen=True, kw_only=True)
class FedCMPV1(FedCMP):
    """The first formalisation: coefficients fused in the gauge-fixed basis,
    Wiener shrinkage, the residual added back whole. Kept to measure what the revisions change;
    only its ill-posed case (a rank above the deltas' numerical rank) is capped, as everywhere."""

    coefficient_basis: Literal["round", "gauge"] = "gauge"
    shrinkage: Literal["unbiased", "wiener"] = "wiener"
    residual: Literal["reliability", "keep", "drop"] = "keep"
