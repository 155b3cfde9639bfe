"""Local training only: every client trains its own projector and never communicates.

The lower bound of federated training (and the usual "local" baseline of personalisation papers):
client k starts from the shared initialisation W_0 and, each round it is sampled, continues from
its own projector W_k on its own data. Nothing is aggregated; the global weights stay W_0. The
driver keeps each W_k in the client-state store and reports the *mean over all clients of each
client's evaluation* (a client never sampled is evaluated at W_0).

Evaluating N personal projectors costs N evaluations, so by default the per-client mean is computed
after the last round only (and at round 0, where every client holds W_0); ``eval_all_rounds``
evaluates at every ``eval_every`` round too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    ServerDefaults,
    Weights,
    check_updates,
    global_norm,
    sorted_updates,
)
from fedsim.algorithms.registry import register


@register(
    "local",
    paper="every client alone, no communication (lower bound)",
    personal=True,
)
@dataclass(frozen=True, kw_only=True)
class Local(ServerDefaults):
    """Per-client projectors, never aggregated.

    Attributes
    ----------
    eval_all_rounds:
        Evaluate every client's projector at every ``eval_every`` round (N evaluations each);
        by default only after the last round.
    """

    eval_all_rounds: bool = False

    def evaluate_round(self, due: bool, last: bool) -> bool:
        """N evaluations a time: after the last round, or on schedule with ``eval_all_rounds``."""
        return last or (due and self.eval_all_rounds)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        """The global weights are unchanged; reports the mean client step norm."""
        ordered = sorted_updates(updates)
        check_updates(weights, ordered)
        norms = [global_norm(u.delta) for u in ordered]
        return AggregateResult(
            dict(weights),
            {},
            {"update_norm": 0.0, "client_update_norm_mean": sum(norms) / len(norms)},
        )
