"""Secure aggregation in a round: what a client uploads, and what the server makes of the sum.

The protocol is :mod:`fedsim.privacy.secagg`'s; this module fixes the vector each client puts
into it and reads the unmasked sum back:

* without DP (FedAvg's weights p_k = n_k / Σ n): client k uploads [n_k Δ_k, n_k]; the server
  gets [Σ n_k Δ_k, Σ n_k] and divides. Entries are bounded by n_max · ``validation.
  max_update_norm`` (updates above the bound are rejected on the worker, never encoded), with
  n_max = local steps × batch size, a public bound on n_k.
* central DP: client k uploads clip_C(Δ_k) (entries ≤ C); the server adds N(0, (z_Δ C)²) to the
  unmasked sum and divides by the fixed m (:mod:`fedsim.privacy.dp`).
* local (distributed) DP: client k uploads clip_C(Δ_k) + N(0, (z_Δ C)² / t); the server divides
  the sum by m. Entries are bounded by C (1 + 10 z_Δ / √t): a draw beyond 10 std (probability
  ≈ 1.5e-23 per entry) is refused on the worker, not clamped.

The decoded sum is within s · 2^−(f+1) of the float sum of s uploads (the encoding's
rounding), before the server's division.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedsim.algorithms.base import validate_update
from fedsim.configtools import ConfigError
from fedsim.privacy.dp import add_local_noise, clip_update, noised_mean
from fedsim.privacy.plan import PrivacyPlan, check_secure
from fedsim.privacy.secagg import FixedPoint, SecAggClient, SecAggError

Weights = dict[str, torch.Tensor]

SECAGG_DROPOUT_STREAM = 7014  # generator purpose id: leaving after ShareKeys
NOISE_RANGE = 10.0  # local noise: entries beyond this many std are refused, not clamped
MAX_FRAC_BITS = 40


@dataclass(frozen=True)
class SecurePlan:
    """How a run uses secure aggregation (public: every client and the server know it).

    Attributes
    ----------
    ring:
        The fixed-point encoding into Z_{2^k}.
    threshold:
        t: fewer surviving clients fail the round.
    cohort:
        m, the most clients a round has (the ring is sized for it).
    weighted:
        FedAvg's p_k (no DP): upload [n_k Δ_k, n_k].
    mechanism:
        ``none``, ``central`` or ``local`` (privacy.mechanism).
    clip:
        C (DP only).
    local_noise:
        Each client's noise std over C (local: z_Δ / √t; 0 otherwise).
    dropout:
        Probability that a client leaves after ShareKeys.
    """

    ring: FixedPoint
    threshold: int
    cohort: int
    weighted: bool
    mechanism: str
    clip: float
    local_noise: float
    dropout: float


def _frac_bits(cohort: int, bound: float, ring_bits: int) -> int:
    """The most fraction bits (≤ 40) with cohort · bound · 2^f < 2^(k−1)."""
    room = ring_bits - 1 - math.log2(cohort * bound)
    return min(MAX_FRAC_BITS, math.floor(room) - 1)


def plan_secure(cfg: Any, privacy: PrivacyPlan | None) -> SecurePlan | None:
    """The run's secure-aggregation plan (None when off); one-line ConfigErrors."""
    pc = cfg.privacy
    if not pc.secure_aggregation:
        return None
    t = check_secure(cfg)
    sc = cfg.scenario
    # the most clients a round can hold: a Poisson cohort is only cohort_size on average
    m = sc.num_clients if sc.participation == "poisson" else sc.cohort_size
    local = 0.0
    if privacy is None:
        max_norm = cfg.validation.max_update_norm
        n_max = cfg.train.local_steps * cfg.train.batch_size
        bound = n_max * max(max_norm, 1.0)  # also covers the n_k entry
    else:
        if pc.mechanism == "local":
            local = privacy.update_noise / math.sqrt(t)
        bound = privacy.clip * (1 + NOISE_RANGE * local)
    f = pc.frac_bits if pc.frac_bits is not None else _frac_bits(m, bound, pc.ring_bits)
    if f < 8:
        raise ConfigError(
            f"privacy.ring_bits: {pc.ring_bits} bits leave {f} fraction bits for {m} "
            f"clients of bound {bound:g}; use 64"
        )
    ring = FixedPoint(bound=bound, ring_bits=pc.ring_bits, frac_bits=f)
    try:
        ring.check_capacity(m)
    except SecAggError as e:
        raise ConfigError(f"privacy.frac_bits: {e}") from None
    return SecurePlan(
        ring, t, m, privacy is None, pc.mechanism, pc.clip, local, pc.secagg_dropout
    )


# ---------------------------------------------------------------------------------------------
# Flat vectors keyed like the projector


def flatten(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All tensors as one float64 vector, keys in sorted order."""
    return np.concatenate(
        [
            tensors[k].detach().to(torch.float64).reshape(-1).numpy()
            for k in sorted(tensors)
        ]
    )


def unflatten(vector: np.ndarray, reference: Mapping[str, torch.Tensor]) -> Weights:
    """The inverse of :func:`flatten` for tensors shaped like ``reference`` (float64)."""
    out, at = {}, 0
    for k in sorted(reference):
        n = reference[k].numel()
        out[k] = torch.from_numpy(vector[at : at + n].copy()).reshape(
            reference[k].shape
        )
        at += n
    return out


def client_vector(
    delta: Mapping[str, torch.Tensor],
    num_samples: int,
    plan: SecurePlan,
    seed: int,
    server_round: int,
    client_id: int,
) -> np.ndarray:
    """What client k puts into secure aggregation (module docstring), before encoding."""
    if plan.weighted:
        return np.append(flatten(delta) * num_samples, float(num_samples))
    clipped, _ = clip_update(delta, plan.clip)
    if plan.local_noise > 0:
        clipped = add_local_noise(
            clipped, plan.local_noise * plan.clip, seed, server_round, client_id
        )
    return flatten(clipped)


def leaves_after_keys(
    plan: SecurePlan, seed: int, server_round: int, client_id: int
) -> bool:
    """Whether client k drops out between ShareKeys and its masked upload this round."""
    if plan.dropout == 0:
        return False
    rng = np.random.default_rng([seed, SECAGG_DROPOUT_STREAM, server_round, client_id])
    return bool(rng.random() < plan.dropout)


@dataclass(frozen=True)
class SecureUpload:
    """What a worker sends for a securely aggregated cohort: results without Δ, and each
    uploading client's masked vector (the same fields as a pre-summed upload, plus these)."""

    results: list[Any]
    partial: None
    rejected: list[dict[str, Any]]
    masked: dict[int, np.ndarray]
    left: list[int]


def mask_group(
    results: Sequence[Any],
    clients: Mapping[int, SecAggClient],
    reference: Mapping[str, torch.Tensor],
    plan: SecurePlan,
    seed: int,
    server_round: int,
    max_norm: float | None,
) -> SecureUpload:
    """On the worker: validate, build and mask each client's vector; Δ never leaves unmasked.

    A rejected update (NaN/Inf, shape, over ``max_norm``, out of the ring's range) and a
    client that leaves after ShareKeys both send nothing; the protocol recovers their masks.
    """
    masked, rejected, left = {}, [], []
    for r in sorted(results, key=lambda r: r.update.client_id):
        u = r.update
        reason = validate_update(u, reference, max_norm)
        if reason is None and leaves_after_keys(plan, seed, server_round, u.client_id):
            left.append(u.client_id)
            continue
        if reason is None:
            vec = client_vector(
                u.delta, u.num_samples, plan, seed, server_round, u.client_id
            )
            try:
                masked[u.client_id] = clients[u.client_id].masked_input(
                    plan.ring.encode(vec)
                )
            except ValueError as e:
                reason = f"client {u.client_id}: {e}"
        if reason is not None:
            rejected.append({"client_id": u.client_id, "reason": reason})
    stripped = [replace(r, update=replace(r.update, delta={})) for r in results]
    return SecureUpload(stripped, None, rejected, masked, left)


def secure_mean(
    ring_total: np.ndarray,
    plan: SecurePlan,
    privacy: PrivacyPlan | None,
    reference: Mapping[str, torch.Tensor],
    seed: int,
    server_round: int,
) -> tuple[Weights, int]:
    """(the round's mean update in float32, its sample count) from the unmasked ring sum."""
    total = plan.ring.decode(ring_total)
    if plan.weighted:
        samples = int(round(total[-1]))
        mean = unflatten(total[:-1] / samples, reference)
        return {k: v.to(torch.float32) for k, v in mean.items()}, samples
    assert privacy is not None
    summed = unflatten(total, reference)
    std = privacy.update_noise * plan.clip if plan.mechanism == "central" else 0.0
    return noised_mean(summed, std, privacy.denominator, seed, server_round), 1
