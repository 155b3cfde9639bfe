"""Secure aggregation inside a federated round: the driver's side of the protocol.

The driver plays the clients' devices for the key rounds (AdvertiseKeys, ShareKeys) and the
unmasking; the BackboneWorkers play them for the masked upload (they hold Δ_k and mask it:
``BackboneWorker.train_secure``); the Aggregator actor is the server (``secagg_*`` methods) and
never receives an update in the clear. Protocol: :mod:`fedsim.privacy.secagg`; what each
client uploads: :mod:`fedsim.privacy.secure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from fedsim.privacy.secagg import ID_BYTES, SecAggClient
from fedsim.privacy.secure import SecurePlan


@dataclass
class SecureRound:
    """One round's protocol state on the driver: each cohort client's keys and shares."""

    plan: SecurePlan
    seed: int
    server_round: int
    clients: dict[int, SecAggClient] = field(default_factory=dict)
    failure: str | None = None

    def for_group(self, group: list[int]) -> tuple:
        """What a worker needs to mask ``group``'s updates."""
        clients = {c: self.clients[c] for c in group}
        return (self.plan, self.seed, self.server_round, clients)


def open_round(
    aggregator: Any, plan: SecurePlan, seed: int, server_round: int, cohort: list[int]
) -> SecureRound:
    """AdvertiseKeys and ShareKeys for the round's cohort (before training)."""
    sr = SecureRound(plan, seed, server_round)
    sr.clients = {c: SecAggClient(c, plan.threshold) for c in cohort}
    if len(cohort) < plan.threshold:
        sr.failure = (
            f"secure aggregation: {len(cohort)} clients in the cohort, fewer than the "
            f"threshold {plan.threshold}"
        )
        return sr
    keys = [c.advertise() for c in sr.clients.values()]
    roster = ray.get(aggregator.secagg_advertise.remote(keys))
    outboxes = {i: c.share_keys(roster) for i, c in sr.clients.items()}
    inboxes = ray.get(aggregator.secagg_route.remote(outboxes))
    for i, c in sr.clients.items():
        c.receive_shares(inboxes[i])
    return sr


def close_round(
    aggregator: Any,
    sr: SecureRound,
    weights_ref: Any,
    masked: dict[int, Any],
    rejected: list[dict[str, Any]],
    left: list[int],
) -> tuple[Any, dict[str, Any]]:
    """MaskedInputCollection and Unmasking: W_{t+1} and the round's metrics (``secagg``:
    survivors, who left after ShareKeys, bytes each client sent, server seconds)."""
    survivors: list[int] = []
    if sr.failure is None:
        got = ray.get(aggregator.secagg_collect.remote(masked))
        if isinstance(got, str):
            sr.failure = got
        else:
            survivors = got
    if sr.failure is not None:
        call = aggregator.keep_round.remote(weights_ref, rejected, sr.failure)
    else:
        responses = {j: sr.clients[j].unmask(survivors) for j in survivors}
        call = aggregator.aggregate_secure.remote(
            weights_ref, responses, rejected, sr.server_round
        )
    weights, metrics = ray.get(call)
    # The masked upload was sent from the worker's copy of the client: count it here.
    sent = {
        c: cl.sent_bytes + (ID_BYTES + masked[c].nbytes if c in masked else 0)
        for c, cl in sr.clients.items()
    }
    metrics["secagg"] = {
        "threshold": sr.plan.threshold,
        "survivors": len(survivors),
        "left_after_keys": sorted(left),
        "failed": sr.failure,
        "bytes_per_client_max": max(sent.values(), default=0),
        "bytes_per_client_mean": round(sum(sent.values()) / max(len(sent), 1), 1),
        **metrics.get("secagg", {}),
    }
    return weights, metrics
