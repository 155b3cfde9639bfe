"""One-pass client data streams that resume where the client last stopped.

A client's shard is read in a private order (a permutation keyed by (seed, client, pass)); its
cursor (pass, position) is all the state kept between rounds, so memory does not grow with the
number of logical clients beyond two integers each. LLaVA's stage 1 reads its data once; if a client
is sampled more often than its shard lasts, its stream starts a new pass in a fresh order and the
pass count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDER_STREAM = 7003  # generator purpose id: per-pass sample order


@dataclass(frozen=True)
class Cursor:
    """Where a client's stream stands: ``passes`` completed, ``position`` in the current pass."""

    passes: int = 0
    position: int = 0


def pass_order(
    shard: np.ndarray, seed: int, client_id: int, pass_index: int
) -> np.ndarray:
    """The shard's rows in the order of pass ``pass_index``."""
    rng = np.random.default_rng([seed, ORDER_STREAM, client_id, pass_index])
    return shard[rng.permutation(len(shard))]


def take(
    shard: np.ndarray, cursor: Cursor, n: int, seed: int, client_id: int
) -> tuple[np.ndarray, Cursor]:
    """The next ``n`` rows of the client's stream and the advanced cursor."""
    if len(shard) == 0:
        raise ValueError(f"client {client_id}: empty data shard")
    out: list[np.ndarray] = []
    passes, position = cursor.passes, cursor.position
    need = n
    while need > 0:
        order = pass_order(shard, seed, client_id, passes)
        chunk = order[position : position + need]
        out.append(chunk)
        need -= len(chunk)
        position += len(chunk)
        if position >= len(shard):
            passes, position = passes + 1, 0
    return np.concatenate(out), Cursor(passes, position)
