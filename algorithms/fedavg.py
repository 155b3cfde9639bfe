"""FedAvg: federated averaging of client updates.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017, arXiv 1602.05629.

Server: W_{t+1} = W_t + η · Σ_k p_k Δ_k with p_k = n_k / Σ_j n_j and Δ_k = W_k − W_t (η = 1 is
the paper's rule, W_{t+1} = Σ_k p_k W_k). Client: plain local training (no change).
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
    check_positive,
    check_updates,
    global_norm,
    sample_weights,
    sorted_updates,
    weighted_sum,
)
from fedsim.algorithms.registry import register


def fedavg_delta(updates: Sequence[ClientUpdate]) -> Weights:
    """Σ_k p_k Δ_k over ``updates`` in ascending client-id order (float64 accumulation)."""
    ordered = sorted_updates(updates)
    return weighted_sum([u.delta for u in ordered], sample_weights(ordered))


@register("fedavg", paper="McMahan et al. 2017, arXiv 1602.05629", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedAvg(ServerDefaults):
    """Federated averaging.

    Attributes
    ----------
    server_lr:
        η, the server step on the averaged delta (1.0 = the paper's FedAvg).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        check_positive(server_lr=self.server_lr)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        check_updates(weights, updates)
        mean_delta = fedavg_delta(updates)
        new = add(weights, mean_delta, self.server_lr)
        return AggregateResult(
            new, {}, {"update_norm": global_norm(mean_delta) * self.server_lr}
        )
