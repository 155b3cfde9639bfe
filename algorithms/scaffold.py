"""SCAFFOLD: stochastic controlled averaging with control variates.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, arXiv 1910.06378 (Algorithm 1, option II).

Client i with server control variate c and its own c_i (0 before its first round): every local
step uses the corrected gradient g(y) − c_i + c; afterwards c_i⁺ is, with ``option``
    "I":  c_i⁺ = g_i(x), the client's gradient at the server model x
    "II": c_i⁺ = c_i − c + (x − y_i) / (Σ_s η_s)   (Σ_s η_s = K η_l for a constant rate)
and it uploads Δy_i = y_i − x and Δc_i = c_i⁺ − c_i, keeping c_i⁺ in the client-state store.
Server: x ← x + η_g Σ_i p_i Δy_i,  c ← c + (1/N) Σ_{i∈S} Δc_i  (N = all clients).

Option I's g_i(x) is estimated on the minibatch of the first local step — the one step taken at x,
so it costs nothing extra (the paper evaluates it on the client's data at x). It is the default:
option II's (x − y)/Σ η estimates a gradient only for plain local SGD; under AdamW (fedsim's
default optimiser) a step moves each coordinate by ≈ η, so that quotient is of order 0.1–1 per
coordinate, far above the gradients it should correct, and training breaks down
(docs/tutorials/comparing-algorithms.md, the all-algorithms table). Option II with ``train.optimizer=sgd`` is the paper's cheaper variant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedsim.algorithms.base import (
    AggregateResult,
    ClientUpdate,
    LocalTraining,
    ServerDefaults,
    Weights,
    add,
    check_positive,
    check_same_keys,
    check_updates,
    global_norm,
    sample_weights,
    sorted_updates,
    weighted_sum,
)
from fedsim.algorithms.registry import register


def client_control_update(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    lr_sum: float,
) -> Weights:
    """Option II: c_i⁺ = c_i − c + (x − y_i) / Σ η."""
    if lr_sum <= 0:
        raise ValueError(
            f"scaffold: the local learning rates sum to {lr_sum}; need > 0"
        )
    return {k: c_i[k] - c[k] + (start[k] - end[k]) / lr_sum for k in start}


def server_control_update(
    c: Mapping[str, torch.Tensor],
    delta_cs: Sequence[Mapping[str, torch.Tensor]],
    num_clients: int,
) -> Weights:
    """c ← c + (1/N) Σ_{i∈S} Δc_i (summed in the given order, float64)."""
    total = weighted_sum(list(delta_cs), [1.0 / num_clients] * len(delta_cs))
    return {k: c[k] + total[k] for k in c}


class ScaffoldTraining(LocalTraining):
    """Gradient correction with (c − c_i); c_i⁺ kept per client, Δc_i uploaded."""

    def __init__(self, option: str = "I") -> None:
        self.option = option

    def prepare(
        self,
        client_state: Mapping[str, torch.Tensor],
        payload: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        c = {k[2:]: v for k, v in payload.items() if k.startswith("c/")}
        c_i = {k: client_state.get(f"c/{k}", torch.zeros_like(v)) for k, v in c.items()}
        return {
            "c": c,
            "c_i": c_i,
            "correction": {k: c[k] - c_i[k] for k in c},
            "g0": None,
        }

    def correct_gradients(
        self, params: Mapping[str, torch.nn.Parameter], ctx: dict[str, Any]
    ) -> None:
        if ctx["g0"] is None:  # the first step's gradient, at the server model x
            ctx["g0"] = {
                k: p.grad.detach().to(torch.float32).clone()
                for k, p in params.items()
                if p.grad is not None
            }
        for k, p in params.items():
            if p.grad is not None:
                p.grad.add_(ctx["correction"][k].to(p.grad.dtype))

    def finish(
        self,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        ctx: dict[str, Any],
    ) -> tuple[Weights, Weights]:
        if self.option == "I" and ctx["g0"] is not None:
            c_new = {k: ctx["g0"].get(k, ctx["c_i"][k]) for k in ctx["c_i"]}
        else:
            c_new = client_control_update(
                ctx["c_i"], ctx["c"], start, end, float(sum(lrs))
            )
        extras = {f"dc/{k}": c_new[k] - ctx["c_i"][k] for k in c_new}
        return extras, {f"c/{k}": v for k, v in c_new.items()}


@register(
    "scaffold",
    paper="Karimireddy et al. 2020, arXiv 1910.06378",
    reads_updates="each client uploads its control-variate change Δc_i beside Δ_i and "
    "keeps c_i, so the server reads two unclipped per-client quantities",
)
@dataclass(frozen=True, kw_only=True)
class Scaffold(ServerDefaults):
    """SCAFFOLD.

    Attributes
    ----------
    server_lr:
        η_g, the global step on the averaged delta.
    option:
        The client control variate: ``I`` (its gradient at the server model) or ``II``
        (from the local progress; sound for local SGD only).
    """

    server_lr: float = 1.0
    option: Literal["I", "II"] = "I"

    def __post_init__(self) -> None:
        check_positive(server_lr=self.server_lr)
        if self.option not in ("I", "II"):
            raise ValueError(f"option must be I or II, got {self.option!r}")

    def init_state(self, weights: Weights, num_clients: int | None = None) -> Weights:
        if not num_clients or num_clients < 1:
            raise ValueError("scaffold: needs the number of clients N")
        state = {
            f"c/{k}": torch.zeros_like(v, dtype=torch.float32)
            for k, v in weights.items()
        }
        state["num_clients"] = torch.tensor(int(num_clients))
        return state

    def server_payload(self, state: Weights) -> Weights:
        return {k: v for k, v in state.items() if k.startswith("c/")}

    def local_training(self) -> LocalTraining:
        return ScaffoldTraining(self.option)

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult:
        ordered = sorted_updates(updates)
        check_updates(weights, ordered)
        delta_cs = [{k[3:]: v for k, v in u.extras.items()} for u in ordered]
        for u, dc in zip(ordered, delta_cs):
            check_same_keys(weights, dc, f"client {u.client_id} Δc")
        mean_delta = weighted_sum([u.delta for u in ordered], sample_weights(ordered))
        c = {k[2:]: v for k, v in state.items() if k.startswith("c/")}
        c_new = server_control_update(c, delta_cs, int(state["num_clients"]))
        new_state: Weights = {f"c/{k}": v.contiguous() for k, v in c_new.items()}
        new_state["num_clients"] = state["num_clients"]
        metrics = {
            "update_norm": global_norm(mean_delta) * self.server_lr,
            "control_norm": global_norm(c_new),
        }
        return AggregateResult(
            add(weights, mean_delta, self.server_lr), new_state, metrics
        )
