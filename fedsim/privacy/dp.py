"""Client-level DP for federated averaging: clip, sum, add Gaussian noise, divide by a constant.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018, arXiv 1710.06963 (DP-FedAvg: the user is the client); adaptive clipping from Andrew,
Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, arXiv 1905.03871.

Symbols: C = ``clip`` (ℓ2 bound of a client's whole projector delta, all tensors jointly),
z = ``noise_multiplier`` (the Gaussian's std over C), m = ``denominator`` (the expected cohort
size, a public constant), γ = ``target_quantile``, η_C = ``clip_lr``, σ_b = ``count_noise``.

Sensitivity. Each client contributes clip_C(Δ_k) = Δ_k · min(1, C / ‖Δ_k‖₂), so adding or
removing one client moves Σ_k clip_C(Δ_k) by at most C in ℓ2 (replacing one: at most 2C).
The release is (Σ_k clip_C(Δ_k) + N(0, (zC)² I)) / m with m fixed before the round: dividing
by a public constant is post-processing, so the mean has sensitivity C / m and noise std
zC / m, the same ratio z. A data-dependent denominator (Σ_k n_k, or p_k = n_k / Σ n) would let
one client change every other client's weight: its sensitivity is not bounded by C, so the
weights here are uniform and the denominator fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Weights = dict[str, torch.Tensor]

NOISE_STREAM = 7011  # generator purpose id: Gaussian noise on the sum (central DP)
LOCAL_NOISE_STREAM = (
    7012  # generator purpose id: each client's own noise (local/distributed)
)
COUNT_NOISE_STREAM = (
    7013  # generator purpose id: noise on the clipped count (adaptive C)
)


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖T‖₂ over all keys jointly, float64, summed in sorted key order."""
    return math.sqrt(
        sum(float(tensors[k].to(torch.float64).pow(2).sum()) for k in sorted(tensors))
    )


def clip_update(
    delta: Mapping[str, torch.Tensor], clip: float
) -> tuple[Weights, float]:
    """(Δ · min(1, C / ‖Δ‖₂) in float64, ‖Δ‖₂): the whole delta scaled jointly.

    One float64 multiply per entry (relative error ≤ 2⁻⁵³), so the result's norm is C up to
    a relative 1e-15 — far below the accountant's precision. Raises ValueError on a
    non-finite delta (NaN/Inf never pass).
    """
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"privacy.clip: must be a finite number > 0, got {clip!r}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("clip_update: the update holds non-finite values (NaN/Inf)")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v.to(torch.float64) * scale for k, v in delta.items()}, norm


def generator(seed: int, stream: int, *keys: int) -> torch.Generator:
    """A torch generator keyed by (seed, stream, keys…), like fedsim's numpy generators."""
    words = np.random.default_rng([seed, stream, *keys]).integers(
        0, 2**63, dtype=np.int64
    )
    return torch.Generator().manual_seed(int(words))


def gaussian_like(
    reference: Mapping[str, torch.Tensor], std: float, gen: torch.Generator
) -> Weights:
    """N(0, std² I) shaped like ``reference`` (float64), keys drawn in sorted order, on
    ``reference``'s device (drawn on the CPU: the same noise on every device)."""
    return {
        k: torch.randn(
            reference[k].shape, generator=gen, dtype=torch.float64, device="cpu"
        ).to(reference[k].device)
        * std
        for k in sorted(reference)
    }


def sum_updates(
    clipped: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor] | None = None,
) -> Weights:
    """Σ_k of float64 tensors per key, in the given order (callers sort by client id); zeros
    shaped like ``reference`` when there is nothing to sum."""
    like = clipped[0] if clipped else reference
    if like is None:
        raise ValueError("sum_updates: nothing to sum and no reference")
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in like.items()}
    for c in clipped:
        for k in out:
            out[k].add_(c[k].to(torch.float64))
    return out


def noised_mean(
    total: Mapping[str, torch.Tensor],
    std: float,
    denominator: float,
    seed: int,
    server_round: int,
) -> Weights:
    """(Σ + N(0, std² I)) / m, float32 — central DP's release (``std`` = z_Δ · C).

    ``denominator`` m is the expected cohort size, fixed before the round (module docstring).
    """
    if not denominator > 0:
        raise ValueError(f"noised_mean: denominator must be > 0, got {denominator}")
    noise = gaussian_like(total, std, generator(seed, NOISE_STREAM, server_round))
    return {
        k: ((v.to(torch.float64) + noise[k]) / denominator).to(torch.float32)
        for k, v in total.items()
    }


def local_noise_std(std: float, min_contributors: int) -> float:
    """Each client's noise std so that the sum of ≥ ``min_contributors`` has std ≥ ``std``.

    Local/distributed DP (noise added on the client, summed under secure aggregation): with
    t = ``min_contributors`` (the secure-aggregation threshold: fewer survivors fail the
    round) each client adds N(0, std² / t); the sum of s ≥ t independent draws has variance
    s · std² / t ≥ std², so the stated z is a lower bound on the realised one.
    """
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    return std / math.sqrt(min_contributors)


def add_local_noise(
    clipped: Mapping[str, torch.Tensor],
    std: float,
    seed: int,
    server_round: int,
    client_id: int,
) -> Weights:
    """A client's clipped update plus its own N(0, std² I), keyed by (seed, round, client)."""
    gen = generator(seed, LOCAL_NOISE_STREAM, server_round, client_id)
    noise = gaussian_like(clipped, std, gen)
    return {k: v.to(torch.float64) + noise[k] for k, v in clipped.items()}


# ---------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update noise that leaves budget for the count.

    Andrew et al. 2021, Theorem 1: releasing the noised sum with z_Δ and the noised count of
    clipped clients with σ_b (sensitivity 1/2 once centred) together is as private as one
    Gaussian with multiplier z. Needs σ_b > z / 2; z = 0 (no noise) gives 0.
    """
    if z == 0:
        return 0.0
    if not count_noise > z / 2:
        raise ValueError(
            f"privacy.count_noise: must exceed noise_multiplier / 2 = {z / 2:g} "
            f"(Andrew et al. 2021, Thm 1), got {count_noise:g}"
        )
    return (z**-2 - (2 * count_noise) ** -2) ** -0.5


@dataclass(frozen=True)
class ClipStep:
    """One adaptive-clipping step: the clip used, the noised fraction b̃, the next clip."""

    clip: float
    fraction: float
    next_clip: float


def adaptive_clip_step(
    norms: Sequence[float],
    clip: float,
    target_quantile: float,
    clip_lr: float,
    count_noise: float,
    denominator: float,
    seed: int,
    server_round: int,
) -> ClipStep:
    """C ← C · exp(−η_C (b̃ − γ)), b̃ = (Σ_k 1[‖Δ_k‖ ≤ C] + N(0, σ_b²)) / m (geometric update).

    ``norms`` are the clients' unclipped ‖Δ_k‖₂ (they never leave the aggregation: only the
    noised count does); m is the same fixed denominator as the mean's.
    """
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(
            f"privacy.target_quantile: must be in [0, 1], got {target_quantile}"
        )
    below = sum(1 for n in norms if n <= clip)
    gen = generator(seed, COUNT_NOISE_STREAM, server_round)
    noise = float(torch.randn((), generator=gen, dtype=torch.float64)) * count_noise
    fraction = (below + noise) / denominator
    return ClipStep(
        clip, fraction, clip * math.exp(-clip_lr * (fraction - target_quantile))
    )


# ---------------------------------------------------------------------------------------------
# One round of central DP, as the server runs it


@dataclass(frozen=True)
class Release:
    """A round's private mean and what may be published about it.

    ``fraction`` is the noised share of clients under C (adaptive clipping only; None else):
    it is part of the accounted release, unlike the clients' own norms, which are never
    reported.
    """

    mean: Weights
    clip: float
    next_clip: float
    fraction: float | None


def central_release(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    *,
    clip: float,
    update_noise: float,
    denominator: float,
    seed: int,
    server_round: int,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    count_noise: float = 0.0,
) -> Release:
    """(Σ_k clip_C(Δ_k) + N(0, (z_Δ C)² I)) / m over ``deltas`` (in client-id order).

    An empty round (nobody sampled, or nothing accepted) still releases the noise over m:
    the mechanism the accountant counts is the same whoever took part.

    With ``adaptive`` the clip also takes one geometric step from the noised count of clients
    under C (:func:`adaptive_clip_step`; γ, η_C, σ_b from the keyword arguments).
    """
    clipped, norms = [], []
    for d in deltas:
        c, n = clip_update(d, clip)
        clipped.append(c)
        norms.append(n)
    mean = noised_mean(
        sum_updates(clipped, reference),
        update_noise * clip,
        denominator,
        seed,
        server_round,
    )
    if not adaptive:
        return Release(mean, clip, clip, None)
    step = adaptive_clip_step(
        norms,
        clip,
        target_quantile,
        clip_lr,
        count_noise,
        denominator,
        seed,
        server_round,
    )
    return Release(mean, clip, step.next_clip, step.fraction)
