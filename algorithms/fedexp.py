"""FedExP: FedAvg with an adaptive, extrapolating server step.

Jhunjhunwala, Wang & Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation",
ICLR 2023, arXiv 2301.09604.

With Δ̄ = Σ_k p_k Δ_k (p_k = n_k / Σ_j n_j) the server step of round t is

    η_g^t = max(1, Σ_k p_k ‖Δ_k‖² / (2 (‖Δ̄‖² + ε)))
    W_{t+1} = W_t + η_g^t Δ̄

Client: plain local training. The paper (Algorithm 1) weights the M clients of the round
uniformly, Σ_i ‖Δ_i‖² / (2M (‖Δ̄‖² + ε)) with Δ̄ = (1/M) Σ_i Δ_i; fedsim generalises the
weights to p_k, and p_k = 1/M (equal n_k) is the paper's rule exactly. (The authors' released
code, github.com/Divyansh03/FedExP main.py, already weights both sums by the clients' data
shares.) The rule comes from extrapolation in projection onto convex sets (POCS): when the
client updates disagree, ‖Δ̄‖² is much smaller than their mean square and the server steps
further than the average; when they agree, Σ p_k ‖Δ_k‖² ≈ ‖Δ̄‖², the ratio is about ½ and the
max gives FedAvg's step 1. η_g^t ≥ 1 always; identical updates give exactly 1.

ε keeps the step bounded when Δ̄ ≈ 0 (updates that cancel). Default 1e-3, the value of the
paper's CIFAR-10/100 and CINIC-10 experiments (EMNIST used 0.1), as the authors' code sets it.
That code differs from Algorithm 1 in two ways fedsim does not copy: it adds M ε (not ε) to
‖Δ̄‖², and it decays ε by 0.998² a round along with its local learning rate (0.998 a round;
‖Δ‖² scales with its square). fedsim's ε is a constant: compare it with ‖Δ̄‖², which the
``update_norm`` metric shows (update_norm = η_g^t ‖Δ̄‖). ``max_server_lr`` optionally caps
η_g^t (not in the paper; a guard for runs where the updates nearly cancel).

Evaluation: the paper notes that FedExP's iterates can oscillate and reports the average of
the last two, (W_t + W_{t+1}) / 2, while training continues from W_{t+1}; the authors' code
evaluates that average. fedsim evaluates the weights it trains from, W_{t+1}: the engine has
no hook for a separate evaluation model, so fedsim's FedExP scores are of the last iterate.

Not presummable: η_g^t needs Σ_k p_k ‖Δ_k‖², which a partial sum Σ n_k Δ_k does not carry.
The server half keeps no state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    ServerDefaults,
    Weights,
    add,
    check_positive,
    check_updates,
    sample_weights,
    sorted_updates,
    weighted_sum,
)
from fedsim.algorithms.registry import register


def squared_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖T‖² = Σ over keys of Σ T², in float64, keys in sorted order (as ``global_norm``).

    Not ``global_norm(T) ** 2``: squaring a rounded square root need not give the sum back.
    """
    return sum(
        float(tensors[k].to(torch.float64).pow(2).sum()) for k in sorted(tensors)
    )


def extrapolation_lr(
    sq_norms: Sequence[float],
    weights: Sequence[float],
    mean_sq_norm: float,
    epsilon: float,
    cap: float | None = None,
) -> float:
    """η_g = max(1, Σ_k p_k ‖Δ_k‖² / (2 (‖Δ̄‖² + ε))), then min(cap, ·) when a cap is set.

    ``sq_norms`` are ‖Δ_k‖², ``weights`` p_k (same order), ``mean_sq_norm`` ‖Δ̄‖². float64.
    """
    spread = sum(p * s for p, s in zip(weights, sq_norms))
    lr = max(1.0, spread / (2.0 * (mean_sq_norm + epsilon)))
    return lr if cap is None else min(cap, lr)


@register(
    "fedexp",
    paper="Jhunjhunwala et al. 2023, arXiv 2301.09604",
    reads_updates="its server step η_t reads every client's ‖Δ_k‖²",
)
@dataclass(frozen=True, kw_only=True)
class FedExP(ServerDefaults):
    """FedAvg whose server step η_g^t ≥ 1 grows when the client updates disagree.

    Attributes
    ----------
    epsilon:
        ε, added to ‖Δ̄‖² in the denominator of η_g^t (the paper's ε).
    max_server_lr:
        An optional cap on η_g^t (≥ 1); null (the default) is the paper's uncapped rule.
    """

    epsilon: float = 1e-3
    max_server_lr: float | None = None

    def __post_init__(self) -> None:
        check_positive(epsilon=self.epsilon)
        if self.max_server_lr is not None and not self.max_server_lr >= 1.0:
            raise ValueError(
                f"max_server_lr must be >= 1 (η_g^t is never below 1) or null, "
                f"got {self.max_server_lr}"
            )

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        ordered = sorted_updates(updates)
        check_updates(weights, ordered)
        p = sample_weights(ordered)
        mean_delta = weighted_sum([u.delta for u in ordered], p)  # Δ̄, as FedAvg's
        # ‖Δ_k‖² and ‖Δ̄‖² in float64, each summed in sorted key order.
        sq_norms = [squared_norm(u.delta) for u in ordered]
        mean_sq = squared_norm(mean_delta)
        lr = extrapolation_lr(sq_norms, p, mean_sq, self.epsilon, self.max_server_lr)
        metrics = {"update_norm": math.sqrt(mean_sq) * lr, "server_lr_t": lr}
        return AggregateResult(add(weights, mean_delta, lr), {}, metrics)
