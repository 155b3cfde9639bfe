"""FedAvgM: federated averaging with server momentum.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019, arXiv 1909.06335.

Server: v_t = β v_{t−1} + Δ̄_t, W_{t+1} = W_t + η v_t, with Δ̄_t = Σ_k p_k Δ_k the FedAvg delta and
v_0 = 0. Client: plain local training. β = 0 is FedAvg with server step η.

Defaults β = 0.9, η = 0.1: the paper compares momentum settings at a fixed *effective* learning
rate η / (1 − β); η = 1 − β keeps that at 1, FedAvg's step, so switching momentum on changes the
averaging of updates over rounds, not the step size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    ServerDefaults,
    Weights,
    add,
    check_fraction,
    check_positive,
    check_updates,
    global_norm,
)
from fedsim.algorithms.fedavg import fedavg_delta
from fedsim.algorithms.registry import register


def momentum_step(velocity: Weights, mean_delta: Weights, momentum: float) -> Weights:
    """v_t = β v_{t−1} + Δ̄_t per key (v_{t−1} = 0 where absent)."""
    return {
        k: momentum * velocity[k] + d if k in velocity else d.clone()
        for k, d in mean_delta.items()
    }


@register("fedavgm", paper="Hsu et al. 2019, arXiv 1909.06335", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedAvgM(ServerDefaults):
    """FedAvg with server momentum.

    Attributes
    ----------
    momentum:
        β, the server momentum.
    server_lr:
        η, the server step on the momentum buffer.
    """

    momentum: float = 0.9
    server_lr: float = 0.1

    def __post_init__(self) -> None:
        check_fraction(momentum=self.momentum)
        check_positive(server_lr=self.server_lr)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        check_updates(weights, updates)
        velocity = {k[2:]: v for k, v in state.items() if k.startswith("v/")}
        v = momentum_step(velocity, fedavg_delta(updates), self.momentum)
        new = add(weights, v, self.server_lr)
        step = global_norm(v) * self.server_lr
        return AggregateResult(
            new, {f"v/{k}": t.contiguous() for k, t in v.items()}, {"update_norm": step}
        )
