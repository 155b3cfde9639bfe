"""FedOpt: adaptive server optimisers FedAdagrad, FedYogi and FedAdam.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive Federated
Optimization", ICLR 2021, arXiv 2003.00295 (Algorithm 2).

With Δ_t = Σ_k p_k Δ_k (fedsim's clients all train the same number of samples per round, so this
is the paper's plain mean), m_0 = 0 and v_0 = τ²:

    m_t = β1 m_{t−1} + (1 − β1) Δ_t
    v_t = v_{t−1} + Δ_t²                                     (FedAdagrad)
    v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)      (FedYogi)
    v_t = β2 v_{t−1} + (1 − β2) Δ_t²                         (FedAdam)
    W_{t+1} = W_t + η m_t / (√v_t + τ)

No bias correction, as in the paper (Flower's FedAdam adds one; this does not).

Defaults: β1 = 0.9, β2 = 0.99, τ = 1e-3 (the paper's and Flower's), η = 3e-3. The per-coordinate
server step is at most η in steady state (|m|/(√v + τ) < 1); the toy's FedAvg moves a projector
coordinate by ≈2e-3 per round, so η = 3e-3 keeps FedOpt's step of that order. The paper tunes η
per task on a log grid; Flower's default η = 0.1 would be ~30× FedAvg's step on this projector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    ServerDefaults,
    Weights,
    check_fraction,
    check_positive,
    check_updates,
    global_norm,
)
from fedsim.algorithms.fedavg import fedavg_delta
from fedsim.algorithms.registry import register

Variant = Literal["adagrad", "yogi", "adam"]


def second_moment(
    v: torch.Tensor, delta: torch.Tensor, variant: Variant, beta2: float
) -> torch.Tensor:
    """v_t from v_{t−1} and Δ_t for the three FedOpt variants."""
    sq = delta * delta
    if variant == "adagrad":
        return v + sq
    if variant == "yogi":
        return v - (1 - beta2) * sq * torch.sign(v - sq)
    if variant == "adam":
        return beta2 * v + (1 - beta2) * sq
    raise ValueError(f"unknown FedOpt variant {variant!r}")


def fedopt_step(
    weights: Weights,
    mean_delta: Weights,
    state: Weights,
    variant: Variant,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Weights, Weights]:
    """One server step: new weights and new state (``m/<key>``, ``v/<key>``)."""
    new, new_state = {}, {}
    for k, d in mean_delta.items():
        m_prev = state.get(f"m/{k}", torch.zeros_like(d))
        v_prev = state.get(f"v/{k}", torch.full_like(d, tau * tau))
        m = beta1 * m_prev + (1 - beta1) * d
        v = second_moment(v_prev, d, variant, beta2)
        new[k] = weights[k].to(torch.float32) + server_lr * m / (torch.sqrt(v) + tau)
        new_state[f"m/{k}"], new_state[f"v/{k}"] = m.contiguous(), v.contiguous()
    return new, new_state


@dataclass(frozen=True, kw_only=True)
class _FedOpt(ServerDefaults):
    """Shared body of the three FedOpt variants (each registers with its own ``variant``).

    Attributes
    ----------
    server_lr:
        η, the server learning rate.
    beta1, beta2:
        β1 (first moment) and β2 (second moment; unused by FedAdagrad).
    tau:
        τ, the adaptivity: added to √v, and v_0 = τ².
    """

    variant: ClassVar[Variant]
    server_lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_positive(server_lr=self.server_lr, tau=self.tau)
        check_fraction(beta1=self.beta1, beta2=self.beta2)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        check_updates(weights, updates)
        new, new_state = fedopt_step(
            weights,
            fedavg_delta(updates),
            state,
            self.variant,
            self.server_lr,
            self.beta1,
            self.beta2,
            self.tau,
        )
        norm = global_norm({k: new[k] - weights[k] for k in weights})
        return AggregateResult(new, new_state, {"update_norm": norm})


@register("fedadagrad", paper="Reddi et al. 2021, arXiv 2003.00295", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedAdagrad(_FedOpt):
    """FedOpt with the Adagrad second moment."""

    variant: ClassVar[Variant] = "adagrad"


@register("fedyogi", paper="Reddi et al. 2021, arXiv 2003.00295", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedYogi(_FedOpt):
    """FedOpt with the Yogi second moment."""

    variant: ClassVar[Variant] = "yogi"


@register("fedadam", paper="Reddi et al. 2021, arXiv 2003.00295", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedAdam(_FedOpt):
    """FedOpt with the Adam second moment."""

    variant: ClassVar[Variant] = "adam"
