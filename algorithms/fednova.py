"""FedNova: normalised averaging of client updates of unequal local work.

Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020, arXiv 2007.07481.

Client k runs its local steps and uploads, besides Δ_k = W_k − W_t, its *learning-rate mass*

    a_k = Σ_s η_s                  (η_s: the learning rate of its local step s)

Server, with p_k = n_k / Σ_j n_j:

    d_k   = Δ_k / a_k              (the normalised update: the progress per unit of lr)
    τ_eff = Σ_k p_k a_k            (the effective local work of the round)
    W_{t+1} = W_t + η_g τ_eff Σ_k p_k d_k

FedAvg weights a client by its data only, so a client that takes more or larger local steps
pulls the average towards its own optimum; the paper shows the fixed point then solves a
different objective from Σ p_k F_k (objective inconsistency). Dividing each update by its local
work removes that bias; τ_eff puts the step back on the scale of the round's average work.

Why the lr mass. In the paper a_k is the l1 norm of the vector that mixes the client's local
gradients into its update, Δ_k = −η G_k a_k; for vanilla SGD with one rate η, a_k = (1, …, 1)
and ‖a_k‖₁ = τ_k, the number of local steps. fedsim's rate follows a schedule (warm-up, cosine)
over global progress, and device tiers with a time budget give clients unequal step counts
that each take the first τ_k rates of the round. Plain SGD with rates η_s gives
Δ_k = −Σ_s η_s g_s = −η̄ G_k a_k with a_{k,s} = η_s / η̄ for any common scale η̄, so
‖a_k‖₁ = (Σ_s η_s) / η̄. The scale cancels between τ_eff = Σ p_k ‖a_k‖₁ and d_k = Δ_k / ‖a_k‖₁,
so the rule is the same with a_k = Σ_s η_s and no η̄ at all: the lr mass is exactly the paper's
normaliser for SGD with a per-step schedule, and reduces to η τ_k for a constant rate.

With AdamW (fedsim's default local optimiser) the update is not G_k a_k: an Adam step moves
each coordinate by about η_s (m̂/√v̂ is of order one, and decoupled weight decay adds η_s λ w),
so Σ_s η_s is still the client's step budget, approximately; normalising by it removes the
bias from unequal numbers of steps and unequal rates, but not the paper's exact guarantee.

With equal steps and equal rates every a_k is the same a, τ_eff = a, and the step is
η_g Σ_k p_k Δ_k: FedAvg exactly. fedsim computes each coefficient c_k = p_k τ_eff / a_k in
exact rational arithmetic and rounds it once, so equal lr masses give c_k = p_k to the bit and
the same weights as FedAvg. Not presummable: the server needs each client's a_k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    LocalTraining,
    ServerDefaults,
    Weights,
    add,
    check_positive,
    check_updates,
    global_norm,
    sorted_updates,
    weighted_sum,
)
from fedsim.algorithms.registry import register

#: The extras key of the uploaded lr mass a_k (a 0-d float64 tensor).
LR_MASS = "lr_mass"


def lr_mass(lrs: Sequence[float]) -> float:
    """a_k = Σ_s η_s over a client's local steps (correctly rounded, any order)."""
    return math.fsum(float(lr) for lr in lrs)


def lr_mass_upload(lrs: Sequence[float]) -> Weights:
    """The extras entry that carries a_k: ``{"lr_mass": 0-d float64 tensor}``.

    float64 so the server sees a_k as the client computed it (float32 would round it at 2⁻²⁴
    relative and break FedNova = FedAvg to the bit for equal lr masses).
    """
    return {LR_MASS: torch.tensor(lr_mass(lrs), dtype=torch.float64)}


class LRMassUpload(LocalTraining):
    """Client half that uploads the lr mass a_k = Σ_s η_s; local training is unchanged.

    Reusable: an algorithm that needs a_k with its own client half can merge
    :func:`lr_mass_upload` into its extras, and read them back with :func:`uploaded_lr_masses`.
    """

    def finish(
        self,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        ctx: dict[str, Any],
    ) -> tuple[Weights, Weights]:
        return lr_mass_upload(lrs), {}


def uploaded_lr_masses(updates: Sequence[ClientUpdate], algorithm: str) -> list[float]:
    """Each update's a_k, in the order of ``updates``; missing or ≤ 0 is an error naming it.

    A client with a_k = 0 took no steps (or only steps at rate 0): its Δ_k / a_k is undefined,
    and dividing would put NaN or Inf into the global weights.
    """
    out = []
    for u in updates:
        t = u.extras.get(LR_MASS)
        if t is None:
            raise ValueError(
                f"{algorithm}: client {u.client_id} uploaded no {LR_MASS} (the sum of its "
                "local learning rates, sent by the LRMassUpload client half)"
            )
        if t.numel() != 1:
            raise ValueError(
                f"{algorithm}: client {u.client_id}: {LR_MASS} must be one number, "
                f"got shape {list(t.shape)}"
            )
        a = float(t.reshape(()).item())
        if not (math.isfinite(a) and a > 0):
            raise ValueError(
                f"{algorithm}: client {u.client_id} has learning-rate mass a_k = {a} "
                f"({u.steps} local steps); it must be > 0: a client that took no step "
                "cannot be normalised by its local work"
            )
        out.append(a)
    return out


def nova_coefficients(
    num_samples: Sequence[int], lr_masses: Sequence[float]
) -> tuple[list[float], float]:
    """c_k = p_k τ_eff / a_k for each client, and τ_eff = Σ_k p_k a_k.

    Computed in exact rationals (every float is one) and rounded once each: the coefficients
    do not depend on the clients' order, and equal a_k give c_k = n_k / Σ n exactly, FedAvg's
    p_k (Python's n / N is the correctly rounded quotient too).
    """
    total = sum(num_samples)
    if total <= 0:
        raise ValueError("aggregate: the updates hold no samples")
    masses = [Fraction(a) for a in lr_masses]
    tau = sum((n * a for n, a in zip(num_samples, masses)), Fraction(0)) / total
    coeffs = [float(Fraction(n, total) * tau / a) for n, a in zip(num_samples, masses)]
    return coeffs, float(tau)


@register(
    "fednova",
    paper="Wang et al. 2020, arXiv 2007.07481",
    reads_updates="it divides each Δ_k by the client's own learning-rate mass a_k",
)
@dataclass(frozen=True, kw_only=True)
class FedNova(ServerDefaults):
    """Normalised averaging: each Δ_k divided by its lr mass, the mean rescaled by τ_eff.

    Attributes
    ----------
    server_lr:
        η_g, the server step on τ_eff Σ_k p_k d_k (1.0 = the paper's FedNova).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        check_positive(server_lr=self.server_lr)

    def local_training(self) -> LocalTraining:
        return LRMassUpload()

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        ordered = sorted_updates(updates)
        check_updates(weights, ordered)
        masses = uploaded_lr_masses(ordered, "fednova")
        coeffs, tau_eff = nova_coefficients([u.num_samples for u in ordered], masses)
        # τ_eff Σ_k p_k Δ_k / a_k = Σ_k c_k Δ_k, accumulated in float64 in client-id order.
        step = weighted_sum([u.delta for u in ordered], coeffs)
        metrics = {
            "update_norm": global_norm(step) * self.server_lr,
            "tau_eff": tau_eff,
        }
        return AggregateResult(add(weights, step, self.server_lr), {}, metrics)
