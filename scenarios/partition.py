"""Partitioners: pure, seeded functions from a dataset's size (and metadata) to client shards.

A partition is a list of int64 row-index arrays, one per client, that are disjoint and cover the
rows given. It depends only on its arguments (never on worker count or order of calls).
"""

from __future__ import annotations

import numpy as np

PARTITION_STREAM = 7001  # generator purpose id: partitioning


def iid(num_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the rows with a generator keyed by ``seed`` and split into near-equal shards.

    Shard sizes differ by at most one; client k gets the k-th slice of the permutation.
    """
    if num_clients <= 0:
        raise ValueError(f"scenario.num_clients: must be > 0, got {num_clients}")
    if num_rows < num_clients:
        raise ValueError(
            f"scenario.num_clients: {num_clients} clients but only {num_rows} training rows; "
            "every client needs at least one"
        )
    perm = np.random.default_rng([seed, PARTITION_STREAM]).permutation(num_rows)
    return [
        np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)
    ]
