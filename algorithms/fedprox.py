"""FedProx: FedAvg with a proximal term in the local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020, arXiv 1812.06127.

Client: minimise F_k(w) + μ/2 ‖w − w_t‖² (over the projector parameters, w_t the round's global
weights). Server: FedAvg. μ = 0 is FedAvg. Default μ = 0.01, the middle of the paper's grid
{0.001, 0.01, 0.1, 1}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    LocalTraining,
    ServerDefaults,
    Weights,
    check_positive,
)
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.registry import register


def proximal_term(
    params: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """μ/2 Σ ‖w − w_t‖² over the keys of ``params`` (differentiable in ``params``)."""
    total = sum(((p - start[k].to(p.dtype)) ** 2).sum() for k, p in params.items())
    return 0.5 * mu * total  # type: ignore[return-value]


class ProximalTraining(LocalTraining):
    """Adds the proximal term to every local step's loss."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def loss_term(
        self,
        params: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        ctx: dict[str, Any],
    ) -> torch.Tensor | None:
        return proximal_term(params, start, self.mu) if self.mu > 0 else None


@register("fedprox", paper="Li et al. 2020, arXiv 1812.06127", presummable=True)
@dataclass(frozen=True, kw_only=True)
class FedProx(ServerDefaults):
    """FedAvg aggregation; local loss + μ/2 ‖w − w_t‖².

    Attributes
    ----------
    mu:
        μ, the proximal coefficient.
    server_lr:
        η, the server step (1.0 = FedAvg's).
    """

    mu: float = 0.01
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")
        check_positive(server_lr=self.server_lr)

    def local_training(self) -> LocalTraining:
        return ProximalTraining(self.mu)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        return FedAvg(server_lr=self.server_lr).aggregate(
            weights, updates, state, server_round
        )
