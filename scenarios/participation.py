"""Participation models: which clients take part in a round.

Each draw uses a private generator keyed by (seed, round), so a round's cohort does not depend on
what happened in earlier rounds, on workers, or on a resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


def size_weighted_cohort(
    sizes: np.ndarray, cohort_size: int, seed: int, server_round: int
) -> list[int]:
    """``cohort_size`` distinct clients, drawn one after another with probability ∝ n_k.

    Successive sampling without replacement (numpy's ``choice(p=...)``): the first pick is
    exactly ∝ n_k; later picks renormalise over the clients not yet drawn.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if not 0 < cohort_size <= len(sizes):
        raise ValueError(
            f"scenario.cohort_size: {cohort_size} is not in 1..{len(sizes)}"
        )
    rng = np.random.default_rng([seed, COHORT_STREAM, server_round])
    p = sizes / sizes.sum()
    return sorted(
        int(c) for c in rng.choice(len(sizes), size=cohort_size, replace=False, p=p)
    )


def poisson_cohort(
    candidates: np.ndarray, rate: float, seed: int, server_round: int
) -> list[int]:
    """Each candidate joins independently with probability ``rate`` (Poisson sampling, the
    model client-level DP's amplification results assume); the cohort's size varies."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"scenario.cohort_size: sampling rate {rate} is not in (0, 1]")
    rng = np.random.default_rng([seed, COHORT_STREAM, server_round])
    draws = rng.random(len(candidates))
    return sorted(int(c) for c, u in zip(candidates, draws) if u < rate)


AVAILABILITY_STREAM = 7005  # generator purpose id: per-client availability phase
DROPOUT_STREAM = 7006  # generator purpose id: per-round dropout
TIER_STREAM = 7007  # generator purpose id: device tier assignment


def diurnal_available(
    num_clients: int, seed: int, server_round: int, period: int, on_fraction: float
) -> np.ndarray:
    """Which clients are online in ``server_round`` under a diurnal on/off trace.

    Client k has a phase φ_k ~ U[0, 1) keyed by (seed, k) and is online when
    ((round / period) + φ_k) mod 1 < on_fraction: each client is online ``on_fraction`` of a
    ``period``-round day, at its own time of day, so the online population rotates.
    """
    if period <= 0 or not 0.0 < on_fraction <= 1.0:
        raise ValueError(
            "scenario.diurnal_period must be > 0 and scenario.diurnal_on in (0, 1]"
        )
    phase = np.random.default_rng([seed, AVAILABILITY_STREAM]).random(num_clients)
    return ((server_round / period + phase) % 1.0) < on_fraction


def dropped_out(
    clients: list[int], rate: float, seed: int, server_round: int
) -> list[int]:
    """The sampled clients that drop out this round (each independently with ``rate``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"scenario.dropout: must be in [0, 1), got {rate}")
    return [
        c
        for c in clients
        if np.random.default_rng([seed, DROPOUT_STREAM, server_round, c]).random()
        < rate
    ]


def assign_tiers(num_clients: int, shares: tuple[float, ...], seed: int) -> np.ndarray:
    """Device tier of every client: tier i for a ``shares[i]`` fraction (largest remainder)."""
    shares_arr = np.asarray(shares, dtype=np.float64)
    if len(shares_arr) == 0 or (shares_arr < 0).any() or shares_arr.sum() <= 0:
        raise ValueError(
            "scenario.tier_shares: needs non-negative shares with a positive sum"
        )
    raw = shares_arr / shares_arr.sum() * num_clients
    counts = np.floor(raw).astype(np.int64)
    counts[
        np.argsort(-(raw - counts), kind="stable")[: num_clients - counts.sum()]
    ] += 1
    tiers = np.repeat(np.arange(len(shares_arr)), counts)
    return np.random.default_rng([seed, TIER_STREAM]).permutation(tiers)


@dataclass(frozen=True)
class ParticipationSpec:
    """The scenario's participation model: the fields of ``scenario`` in the run config that
    share its names (:meth:`of` copies them)."""

    participation: str = "uniform"  # uniform | size_weighted | poisson
    cohort_size: int = 10
    availability: str = "always"  # always | diurnal
    diurnal_period: int = 24
    diurnal_on: float = 0.5
    dropout: float = 0.0
    tier_speeds: tuple[float, ...] = (1.0,)
    tier_shares: tuple[float, ...] = (1.0,)
    tier_upload_mbps: tuple[float, ...] = (100.0,)
    step_seconds: float = 0.05
    time_budget: float | None = None
    deadline: float | None = None

    @classmethod
    def of(cls, scenario: Any) -> ParticipationSpec:
        """The participation fields of a scenario config (any object with these names)."""
        values = {f.name: getattr(scenario, f.name) for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round, how long, and the simulated clock.

    ``cohort`` are the clients that train and report (sorted); ``steps`` their local steps;
    ``sampled`` the clients drawn before ``dropped`` (random dropout) and ``stragglers`` (past
    the deadline) were removed; ``available`` how many clients were online; ``sim_seconds`` the
    simulated round time: the slowest reporting client's compute plus upload, or the deadline
    when a straggler made the server wait for it.
    """

    cohort: list[int]
    steps: dict[int, int]
    sampled: list[int]
    dropped: list[int]
    stragglers: list[int]
    available: int
    sim_seconds: float


def plan_round(
    spec: ParticipationSpec,
    sizes: np.ndarray,
    local_steps: int,
    upload_bytes: int,
    seed: int,
    server_round: int,
) -> RoundPlan:
    """The round's participants from the participation model: a pure function of its inputs.

    With the defaults (uniform sampling, always online, no dropout, one tier, no budget or
    deadline) the cohort is :func:`uniform_cohort`'s and every client runs ``local_steps``.
    """
    num_clients = len(sizes)
    if spec.availability == "diurnal":
        online = np.flatnonzero(
            diurnal_available(
                num_clients, seed, server_round, spec.diurnal_period, spec.diurnal_on
            )
        )
    else:
        online = np.arange(num_clients)
    k = min(spec.cohort_size, len(online))
    if spec.participation == "poisson":
        q = (
            spec.cohort_size / num_clients
        )  # expected cohort: cohort_size × online share
        sampled = poisson_cohort(online, q, seed, server_round)
    elif k == 0:
        sampled = []
    elif len(online) == num_clients:
        sampled = (
            size_weighted_cohort(sizes, k, seed, server_round)
            if spec.participation == "size_weighted"
            else uniform_cohort(num_clients, k, seed, server_round)
        )
    else:
        rng = np.random.default_rng([seed, COHORT_STREAM, server_round])
        p = None
        if spec.participation == "size_weighted":
            w = np.asarray(sizes, dtype=np.float64)[online]
            p = w / w.sum()
        sampled = sorted(int(c) for c in rng.choice(online, size=k, replace=False, p=p))
    dropped = dropped_out(sampled, spec.dropout, seed, server_round)
    tiers = assign_tiers(num_clients, spec.tier_shares, seed)
    steps: dict[int, int] = {}
    times: dict[int, float] = {}
    for c in sampled:
        if c in dropped:
            continue
        t = int(tiers[c])
        speed = spec.tier_speeds[t]
        n = local_steps
        if spec.time_budget is not None:
            n = int(
                np.clip(
                    np.floor(spec.time_budget * speed / spec.step_seconds),
                    1,
                    local_steps,
                )
            )
        steps[c] = n
        upload = upload_bytes * 8 / (spec.tier_upload_mbps[t] * 1e6)
        times[c] = n * spec.step_seconds / speed + upload
    stragglers = []
    if spec.deadline is not None:
        stragglers = [c for c, t in times.items() if t > spec.deadline]
    cohort = [c for c in sorted(steps) if c not in stragglers]
    sim = max((times[c] for c in cohort), default=0.0)
    if stragglers:
        sim = float(spec.deadline)  # type: ignore[arg-type]
    return RoundPlan(
        cohort=cohort,
        steps={c: steps[c] for c in cohort},
        sampled=sampled,
        dropped=dropped,
        stragglers=stragglers,
        available=int(len(online)),
        sim_seconds=float(sim),
    )
