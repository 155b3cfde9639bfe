"""Coordinate-wise median aggregation (Yin, Chen, Ramchandran & Bartlett 2018, arXiv 1803.01498).

A complete fedsim algorithm outside fedsim: the server half is a pure function over
name → tensor dicts; local training is unchanged (ServerDefaults). Registered through the
``fedsim.algorithms`` entry point in this package's pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.algorithms import AggregateResult, ClientUpdate, Weights, register
from fedsim.algorithms.base import (
    ServerDefaults,
    add,
    check_positive,
    check_updates,
    global_norm,
    sorted_updates,
)


def median_delta(updates: Sequence[ClientUpdate]) -> Weights:
    """Per coordinate, the median of the clients' deltas (the lower middle value for even K)."""
    ordered = sorted_updates(updates)
    return {
        k: torch.stack([u.delta[k] for u in ordered]).median(dim=0).values
        for k in ordered[0].delta
    }


@register("fedmedian", paper="Yin et al. 2018, arXiv 1803.01498")
@dataclass(frozen=True, kw_only=True)
class FedMedian(ServerDefaults):
    """W_{t+1} = W_t + η · median_k Δ_k, coordinate by coordinate."""

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
        step = median_delta(updates)
        return AggregateResult(
            add(weights, step, self.server_lr),
            {},
            {"update_norm": global_norm(step) * self.server_lr},
        )
