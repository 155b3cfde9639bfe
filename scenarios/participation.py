"""Participation models: which clients take part in a round.

Each draw uses a private generator keyed by (seed, round), so a round's cohort does not depend on
what happened in earlier rounds, on workers, or on a resume.
"""

from __future__ import annotations

import numpy as np

COHORT_STREAM = 7002  # generator purpose id: cohort sampling


def uniform_cohort(
    num_clients: int, cohort_size: int, seed: int, server_round: int
) -> list[int]:
    """``cohort_size`` distinct client ids drawn uniformly, returned sorted."""
    if not 0 < cohort_size <= num_clients:
        raise ValueError(
            f"scenario.cohort_size: {cohort_size} is not in 1..{num_clients}"
        )
    rng = np.random.default_rng([seed, COHORT_STREAM, server_round])
    return sorted(
        int(c) for c in rng.choice(num_clients, size=cohort_size, replace=False)
    )
