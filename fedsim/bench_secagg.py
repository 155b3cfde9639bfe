"""``fedsim bench --sections secagg``: the cost of a securely aggregated round against the
cohort size, at the projector's size (:func:`fedsim.privacy.secagg.secure_sum`, every message
of the protocol; 10 % of the cohort leaves after ShareKeys, so the recovery path is timed too).

Per cohort size: bytes each client sends (keys, encrypted shares, the masked vector, its
shares at unmasking), each client's protocol seconds (key agreement, Shamir, the PRG
expansions of its n − 1 pairwise masks and its self-mask) and the server's (routing, summing,
Shamir reconstruction, the dropped clients' pairwise masks). Timings are reported, never
asserted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.table import Table

from fedsim.privacy.secagg import FixedPoint, secure_sum

LEAVE_FRACTION = 0.1  # clients that leave after ShareKeys, in every measured round


def bench_secagg(dim: int, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Secure-aggregation cost per round for each cohort size (medians of ``repeats``)."""
    rows: dict[str, dict[str, float]] = {}
    for n in sizes:
        t = n // 2 + 1  # fedsim's default threshold
        left = set(range(min(math.floor(LEAVE_FRACTION * n), n - t)))
        rng = np.random.default_rng(n)
        inputs = {i: rng.uniform(-1, 1, dim) for i in range(n)}
        ring = FixedPoint(bound=1.0, ring_bits=64, frac_bits=32)
        runs = [secure_sum(inputs, ring, t, left) for _ in range(repeats)]
        alive = runs[0].survivors
        rows[str(n)] = {
            "threshold": t,
            "left": len(left),
            "client_bytes": max(runs[0].bytes_sent[i] for i in alive),
            "plain_bytes": dim * 4,  # a float32 Δ without secure aggregation
            "client_seconds": statistics.median(r.client_seconds for r in runs),
            "server_seconds": statistics.median(r.server_seconds for r in runs),
        }
    return {"dim": dim, "rows": rows}


def secagg_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"secure aggregation per round against cohort size, {result['dim']:,} "
        "projector parameters (Bonawitz et al. 2017, complete graph, 10 % leave)"
    )
    cols = [
        "clients",
        "t",
        "left",
        "bytes / client",
        "× float32 Δ",
        "client s",
        "server s",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for n, r in result["rows"].items():
        table.add_row(
            n,
            str(r["threshold"]),
            str(r["left"]),
            f"{r['client_bytes']:,}",
            f"{r['client_bytes'] / r['plain_bytes']:.2f}",
            f"{r['client_seconds']:.3f}",
            f"{r['server_seconds']:.3f}",
        )
    return table
