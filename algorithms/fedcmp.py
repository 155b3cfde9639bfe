"""Fed-CMP: Canonical Reliability-Aware Aggregation (CRA) + Orthogonality-Preserved Momentum (OPM).

Xiong et al., "A Step Toward Federated Pretraining of Multimodal Large Language Models", 2026,
arXiv 2603.26786. Only the paper's abstract is public; it names the two parts and the Fed-MA task.
The equations here are fedsim's formalisation of that abstract (shared/FEDCMP.md in the design
notes; README section "Fed-CMP"), grounded in published methods: truncated Tucker-2 / HOSVD of the
stacked client deltas (De Lathauwer et al. 2000), orthogonal-Procrustes gauge fixing (Schönemann
1966), leave-one-out agreement and inverse-variance shrinkage (FedPA, arXiv 2010.05273), momentum
transported between bases by projection, optionally Stiefel momentum with QR retraction (Absil et
al. 2008).

Per weight matrix (``[m, n]``; biases take the reliability-weighted mean), round t, clients k with
p_k = n_k / Σ n and Δ_k = W_k − W_t:

1. Û, V̂: top-r left / right singular vectors of [√p_1 Δ_1, …, √p_K Δ_K] and of its vertical stack,
   i.e. top eigenvectors of G_U = Σ p_k Δ_k Δ_kᵀ and G_V = Σ p_k Δ_kᵀ Δ_k (fp32; exact eigh when
   small, a seeded randomized range finder otherwise: never the m × K·n stack).
2. Gauge: U_t = Û · polar(Ûᵀ U_{t−1}), V_t likewise (first round: U_t = Û).
3. C_k = U_tᵀ Δ_k V_t; residual E_k = Δ_k − U_t C_k V_tᵀ (only Σ w_k E_k is ever formed).
4. a_k = cos(C_k, Σ_{j≠k} p_j C_j); w_k ∝ p_k exp(a_k / τ).
   μ = Σ w_k C_k, s² = Σ w_k (C_k − μ)², K_eff = 1 / Σ w_k², ρ = μ² / (μ² + s²/K_eff + ε);
   C̄ = ρ ⊙ μ.
5. m̃ = (U_tᵀ U_{t−1}) m_{t−1} (V_{t−1}ᵀ V_t); m_t = β m̃ + (1 − β) C̄; m̂ = m_t / (1 − β^t).
6. W_{t+1} = W_t + η (U_t m̂ V_tᵀ + λ_res Σ w_k E_k).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    ServerDefaults,
    Weights,
    check_updates,
    global_norm,
    sample_weights,
    sorted_updates,
)
from fedsim.algorithms.registry import register

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


def _gram_apply(
    deltas: Sequence[Tensor], p: Sequence[float], x: Tensor, side: str
) -> Tensor:
    """Σ_k p_k Δ_k Δ_kᵀ x (side "left") or Σ_k p_k Δ_kᵀ Δ_k x (side "right"), fp32."""
    out = torch.zeros_like(x)
    for d, pk in zip(deltas, p):
        if side == "left":
            out.add_(d @ (d.T @ x), alpha=pk)
        else:
            out.add_(d.T @ (d @ x), alpha=pk)
    return out


def top_eigenvectors(
    deltas: Sequence[Tensor],
    p: Sequence[float],
    r: int,
    side: Literal["left", "right"],
    generator: torch.Generator | None = None,
    oversample: int = 10,
    power_iters: int = 2,
) -> Basis:
    """Top-``r`` eigenpairs of G = Σ p_k Δ_k Δ_kᵀ (left) or Σ p_k Δ_kᵀ Δ_k (right).

    Exact (``eigh`` of the ``dim × dim`` Gram matrix) when that is cheap; otherwise a randomized
    range finder with ``power_iters`` power iterations on the operator (Halko, Martinsson & Tropp
    2011), which keeps extra memory at O(dim · (r + oversample)).
    """
    m, n = deltas[0].shape
    dim, other = (m, n) if side == "left" else (n, m)
    total = float(sum(pk * float(d.pow(2).sum()) for d, pk in zip(deltas, p)))
    r = max(1, min(r, dim))
    ell = min(dim, r + oversample)
    # Exact when small: the dim × dim Gram is then no bigger than the O(dim · ell) sketches.
    if len(deltas) * dim * dim * other <= _EXACT_LIMIT or dim <= 2 * ell:
        g = torch.zeros(dim, dim, dtype=torch.float32)
        for d, pk in zip(deltas, p):
            g.add_(d @ d.T if side == "left" else d.T @ d, alpha=pk)
        vals, vecs = torch.linalg.eigh(g)  # ascending
        vals, vecs = vals.flip(0)[:r], vecs.flip(1)[:, :r]
    else:
        omega = torch.randn(dim, ell, generator=generator, dtype=torch.float32)
        y = _gram_apply(deltas, p, omega, side)
        for _ in range(power_iters):
            q, _ = torch.linalg.qr(y)
            y = _gram_apply(deltas, p, q, side)
        q, _ = torch.linalg.qr(y)  # [dim, ell]
        b = q.T @ _gram_apply(deltas, p, q, side)  # [ell, ell]
        vals, small = torch.linalg.eigh((b + b.T) / 2)
        vals, small = vals.flip(0)[:r], small.flip(1)[:, :r]
        vecs = q @ small
    return Basis(vecs.contiguous(), vals.clamp_min(0.0), total)


def choose_rank(left: Basis, right: Basis, rank: int, energy: float) -> int:
    """``rank`` capped by the dimensions; with ``energy`` < 1, the smallest rank holding that share
    of the spectrum on both sides (never more than ``rank``)."""
    r = min(rank, left.vectors.shape[1], right.vectors.shape[1])
    if energy >= 1.0:
        return r

    def needed(b: Basis) -> int:
        if b.total <= 0:
            return 1
        cum = torch.cumsum(b.eigenvalues, 0) / b.total
        hit = torch.nonzero(cum >= energy - 1e-7)
        return int(hit[0]) + 1 if len(hit) else b.vectors.shape[1]

    return max(1, min(r, max(needed(left), needed(right))))


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


def coordinate_reliability(c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """μ = Σ w_k C_k and ρ = μ² / (μ² + s²/K_eff + ε), element-wise (inverse-variance shrinkage)."""
    w64 = w.to(torch.float64)
    c64 = c.to(torch.float64)
    mu = torch.einsum("k,kij->ij", w64, c64)
    var = torch.einsum("k,kij->ij", w64, (c64 - mu) ** 2)
    k_eff = 1.0 / float((w64**2).sum())
    mu2 = mu**2
    eps = _EPS * float(mu2.mean()) + 1e-30
    rho = mu2 / (mu2 + var / k_eff + eps)
    return mu.to(torch.float32), rho.to(torch.float32)


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
    "fedcmp", paper="Xiong et al. 2026, arXiv 2603.26786 (fedsim's formalisation)"
)
@dataclass(frozen=True, kw_only=True)
class FedCMP(ServerDefaults):
    """Fed-CMP: canonical reliability-aware aggregation with orthogonality-preserved momentum.

    Attributes
    ----------
    rank:
        r, the canonical rank per matrix, capped by min(m, n).
    energy:
        With a value below 1, the smallest rank holding this share of the spectrum (≤ rank).
    temperature:
        τ of the client weights w_k ∝ p_k exp(a_k / τ); large τ → plain p-weighting.
    reliability:
        ``both``, ``client`` (w_k only), ``coordinate`` (ρ only, w = p) or ``none``.
    residual_weight:
        λ_res, the share of the off-basis residual Σ w_k E_k kept (0 drops it).
    momentum:
        β of the canonical momentum (0: no momentum, CRA only).
    server_lr:
        η, the server step.
    stiefel_momentum:
        Also move the basis itself with Stiefel momentum (ablation).
    stiefel_beta, stiefel_alpha:
        β_U and α of the Stiefel momentum.
    power_iters, oversample:
        Randomized range finder settings (used for large matrices only).
    """

    rank: int = 256
    energy: float = 1.0
    temperature: float = 1.0
    reliability: Literal["both", "client", "coordinate", "none"] = "both"
    residual_weight: float = 1.0
    momentum: float = 0.9
    server_lr: float = 1.0
    stiefel_momentum: bool = False
    stiefel_beta: float = 0.5
    stiefel_alpha: float = 1.0
    power_iters: int = 2
    oversample: int = 10

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

    # -- plug-in interface ------------------------------------------------------------------

    def init_state(self, weights: Weights, num_clients: int | None = None) -> Weights:
        return {"round": torch.zeros((), dtype=torch.int64)}

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
        new_state: Weights = {"round": torch.tensor(int(state.get("round", 0)) + 1)}
        new: Weights = {}
        metrics: dict[str, float] = {}
        client_w: dict[str, Tensor] = {}
        matrices = [k for k in weights if weights[k].dim() == 2]
        for key in matrices:
            deltas = [u.delta[key].to(torch.float32) for u in ordered]
            step, w, st, diag = self.matrix_step(deltas, p, state, key, server_round)
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
            w = client_w.get(layer, torch.tensor(p, dtype=torch.float32))
            mean = sum(
                float(wk) * u.delta[key].to(torch.float64) for wk, u in zip(w, ordered)
            )
            new[key] = weights[key].to(torch.float32) + self.server_lr * mean.to(
                torch.float32
            )
        metrics["update_norm"] = global_norm({k: new[k] - weights[k] for k in weights})
        return AggregateResult(new, new_state, metrics)

    # -- one weight matrix --------------------------------------------------------------------

    def matrix_step(
        self,
        deltas: Sequence[Tensor],
        p: Sequence[float],
        state: Weights,
        key: str,
        server_round: int,
    ) -> tuple[Tensor, Tensor, Weights, dict[str, float]]:
        """The update of one ``[m, n]`` matrix: (step, client weights, new state, diagnostics)."""
        m, n = deltas[0].shape
        gen = torch.Generator().manual_seed(_matrix_seed(key, server_round))
        cap = min(self.rank, m, n)
        find: Callable[[str], Basis] = lambda side: top_eigenvectors(  # noqa: E731
            deltas, p, cap, side, gen, self.oversample, self.power_iters
        )
        left, right = find("left"), find("right")
        r = choose_rank(left, right, self.rank, self.energy)
        # Contiguous copies: the state must hold the same bits whether it stays in memory or
        # goes through a checkpoint (BLAS results differ between strided and dense inputs).
        u_hat = left.vectors[:, :r].contiguous()
        v_hat = right.vectors[:, :r].contiguous()
        u_prev, v_prev = state.get(f"U/{key}"), state.get(f"V/{key}")
        u = gauge_fix(u_hat, u_prev)
        v = gauge_fix(v_hat, v_prev)
        new_state: Weights = {}
        if self.stiefel_momentum and u_prev is not None and u_prev.shape == u.shape:
            u, vel_u = stiefel_step(
                u_prev, u, state.get(f"MU/{key}"), self.stiefel_beta, self.stiefel_alpha
            )
            new_state[f"MU/{key}"] = vel_u
        if self.stiefel_momentum and v_prev is not None and v_prev.shape == v.shape:
            v, vel_v = stiefel_step(
                v_prev, v, state.get(f"MV/{key}"), self.stiefel_beta, self.stiefel_alpha
            )
            new_state[f"MV/{key}"] = vel_v

        c = coefficients(deltas, u, v)  # [K, r, r]
        pt = torch.tensor(p, dtype=torch.float32)
        if self.reliability in ("both", "client"):
            agree, w = client_reliability(c, pt, self.temperature)
        else:
            agree, w = client_reliability(c, pt, math.inf)[0], pt
        mu, rho = coordinate_reliability(c, w)
        if self.reliability in ("both", "coordinate"):
            fused = rho * mu
        else:
            fused = mu

        # Σ w_k E_k = Σ w_k Δ_k − U μ Vᵀ: only the weighted sum of deltas is formed.
        weighted = torch.zeros(m, n, dtype=torch.float64)
        for d, wk in zip(deltas, w.tolist()):
            weighted.add_(d.to(torch.float64), alpha=wk)
        residual = weighted.to(torch.float32) - u @ mu @ v.T

        t = int(state.get(f"t/{key}", torch.tensor(0))) + 1
        m_prev = state.get(f"m/{key}")
        if self.momentum > 0 and m_prev is not None and u_prev is not None:
            carried = transport(m_prev, u, u_prev, v, v_prev)  # type: ignore[arg-type]
            mom = self.momentum * carried + (1 - self.momentum) * fused
        else:
            t = 1
            mom = (1 - self.momentum) * fused
        m_hat = mom / (1 - self.momentum**t)
        shared = u @ m_hat @ v.T
        res = self.residual_weight * residual
        step = self.server_lr * (shared + res)
        new_state.update(
            {f"U/{key}": u, f"V/{key}": v, f"m/{key}": mom, f"t/{key}": torch.tensor(t)}
        )
        # Dense copies: the state must hold the same bits in memory as through a checkpoint
        # (QR returns column-major factors, and BLAS results differ with the memory layout).
        new_state = {k: x.contiguous() for k, x in new_state.items()}

        energy = (
            float(left.eigenvalues[:r].sum()) / left.total if left.total > 0 else 1.0
        )
        step_norm = float(step.norm())
        diag = {
            "rank": float(r),
            "energy": energy,
            "w_min": float(w.min()),
            "w_mean": float(w.mean()),
            "w_max": float(w.max()),
            "agreement_mean": float(agree.mean()),
            "rho_mean": float(rho.mean()),
            "residual_share": float(res.norm() * self.server_lr) / step_norm
            if step_norm > 0
            else 0.0,
        }
        if u_prev is not None:
            k = min(u.shape[1], u_prev.shape[1])
            diag["basis_drift_u"] = float((u.T @ u_prev).norm()) / math.sqrt(k)
            diag["basis_drift_v"] = float((v.T @ v_prev).norm()) / math.sqrt(k)  # type: ignore[union-attr]
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
