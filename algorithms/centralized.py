"""Centralized training on the pooled data of every client: the upper bound of federated training.

Not a federated algorithm: the driver pools the scenario's client shards and trains with Ray
Train's TorchTrainer (``fedsim.pooled``: data parallel over ``ray.workers`` workers, gradients
all-reduced), as many steps per round as a federated round of the scenario takes on average
(``fedsim.prepare.federated_steps``: ``cohort_size × local_steps`` unless dropout, stragglers or a
time budget take steps away; the samples of a federated round) with
one optimiser whose state persists for the whole run, on the same learning-rate schedule. The
server half below applies each round's single update as is, so the same pure interface holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    LocalTraining,
    ServerDefaults,
    Weights,
    add,
    global_norm,
)
from fedsim.algorithms.registry import register


class PooledTraining(LocalTraining):
    """Local training that keeps its optimiser state between rounds."""

    persistent_optimizer: ClassVar[bool] = True


@register("centralized", paper="pooled-data upper bound (no federation)", pooled=True)
@dataclass(frozen=True, kw_only=True)
class Centralized(ServerDefaults):
    """Train on all clients' data as one; no parameters."""

    def local_training(self) -> LocalTraining:
        return PooledTraining()

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        if len(updates) != 1:
            raise ValueError(
                f"centralized: expected the one pooled client, got {len(updates)} updates"
            )
        delta = updates[0].delta
        return AggregateResult(
            add(weights, delta), {}, {"update_norm": global_norm(delta)}
        )
