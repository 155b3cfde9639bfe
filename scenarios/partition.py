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


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label skew: for each label, split its rows among clients in Dirichlet(α) proportions.

    Small α gives each client few labels; large α approaches IID. The rows of each label are
    shuffled, then cut at the cumulative proportions (Hsu, Qi & Brown 2019, arXiv 1909.06335).
    Every client is guaranteed at least one row: a client left empty takes one row from the
    largest shard, so that no client is silently dropped.
    """
    if num_clients <= 0:
        raise ValueError(f"scenario.num_clients: must be > 0, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"scenario.dirichlet_alpha: must be > 0, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) < num_clients:
        raise ValueError(
            f"scenario.num_clients: {num_clients} clients but only {len(labels)} training rows"
        )
    rng = np.random.default_rng([seed, PARTITION_STREAM, 1])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == value))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(rows)).astype(np.int64)
        for k, chunk in enumerate(np.split(rows, cuts)):
            parts[k].append(chunk)
    shards = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    for k in range(num_clients):
        if len(shards[k]) == 0:
            donor = int(np.argmax([len(s) for s in shards]))
            shards[k], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return shards


def by_domain(domains: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Feature skew: each client holds rows of one domain only.

    Clients are dealt to the domains (sorted) round-robin, so domain d gets ⌈or⌊num_clients /
    #domains⌋ clients, and each domain's rows are shuffled and split evenly among its clients.
    Needs at least as many clients as domains.
    """
    domains = np.asarray(domains)
    values = sorted(set(domains.tolist()))
    if num_clients < len(values):
        raise ValueError(
            f"scenario.num_clients: {num_clients} clients for {len(values)} domains; "
            "each domain needs a client"
        )
    rng = np.random.default_rng([seed, PARTITION_STREAM, 2])
    owners: dict[int, list[int]] = {d: [] for d in range(len(values))}
    for k in range(num_clients):
        owners[k % len(values)].append(k)
    shards: list[np.ndarray] = [np.empty(0, np.int64)] * num_clients
    for d, value in enumerate(values):
        rows = rng.permutation(np.flatnonzero(domains == value))
        if len(rows) < len(owners[d]):
            raise ValueError(
                f"scenario: domain {value!r} has {len(rows)} rows for {len(owners[d])} clients"
            )
        for k, part in zip(owners[d], np.array_split(rows, len(owners[d]))):
            shards[k] = np.sort(part).astype(np.int64)
    return shards
