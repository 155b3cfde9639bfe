"""Participation models: pure functions of (seed, round); rates and clocks from their definitions.

Tolerances: simulated clocks are sums and maxima of a few float64 quotients of round numbers
(exact up to ~1e-16, far inside pytest.approx's rel 1e-6); sampling frequencies are checked
against 4 binomial standard deviations (the chance of a false alarm per client is < 1e-4, and the
draws are seeded, so the outcome is the same on every machine).
"""

import numpy as np
import pytest

from fedsim.scenarios.participation import (
    ParticipationSpec,
    assign_tiers,
    diurnal_available,
    plan_round,
    uniform_cohort,
)

SIZES = np.array([100, 300, 600, 1000, 50, 450, 500, 200, 800, 2000])


def test_defaults_are_uniform_sampling_with_full_local_steps():
    spec = ParticipationSpec(cohort_size=4)
    for rnd in (1, 2, 9):
        plan = plan_round(spec, SIZES, 8, 4_000_000, seed=3, server_round=rnd)
        assert plan.cohort == uniform_cohort(10, 4, 3, rnd) == plan.sampled
        assert plan.steps == {c: 8 for c in plan.cohort}
        # 8 steps × 0.05 s + 4 MB at 100 Mbit/s = 0.4 + 0.32 s
        assert plan.sim_seconds == pytest.approx(0.72)
        assert plan.dropped == plan.stragglers == [] and plan.available == 10


def test_size_weighted_first_pick_is_proportional_to_size():
    spec = ParticipationSpec(participation="size_weighted", cohort_size=1)
    picks = np.array(
        [plan_round(spec, SIZES, 1, 0, 0, r).cohort[0] for r in range(1, 6001)]
    )
    freq = np.bincount(picks, minlength=10) / len(picks)
    p = SIZES / SIZES.sum()
    sigma = np.sqrt(p * (1 - p) / len(picks))
    assert np.all(np.abs(freq - p) < 4 * sigma + 1e-9)


def test_diurnal_clients_are_online_their_share_of_the_day():
    online = np.array([diurnal_available(50, 1, r, 24, 0.25) for r in range(2400)])
    # r/24 mod 1 walks the 24 points j/24 of a day, and a window of length 6/24 holds exactly 6
    # of them whatever the phase: 0.25 exactly over 100 whole days (float64 could move a
    # boundary point only for a phase within ~1e-16 of j/24). atol 0.02 < 1/24 still catches a
    # client online one round a day too many or too few.
    assert np.allclose(online.mean(0), 0.25, atol=0.02)
    # Phases differ: the online population rotates through the day.
    assert len({tuple(np.flatnonzero(o)) for o in online[:24]}) > 12
    spec = ParticipationSpec(availability="diurnal", diurnal_on=0.25, cohort_size=8)
    sizes = np.full(50, 10)
    for r in range(1, 30):
        plan = plan_round(spec, sizes, 2, 0, 1, r)
        now = np.flatnonzero(diurnal_available(50, 1, r, 24, 0.25))
        assert set(plan.cohort) <= set(now.tolist())
        assert len(plan.cohort) == min(8, len(now)) and plan.available == len(now)


def test_dropout_rate_and_dropped_clients_do_not_train():
    spec = ParticipationSpec(cohort_size=10, dropout=0.3)
    plans = [plan_round(spec, SIZES, 2, 0, 5, r) for r in range(1, 801)]
    rate = np.mean([len(p.dropped) / 10 for p in plans])
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 8000)
    assert all(not set(p.dropped) & set(p.cohort) for p in plans)


def test_tiers_time_budget_and_deadline_by_hand():
    tiers = assign_tiers(10, (0.5, 0.5), seed=2)
    assert sorted(np.bincount(tiers).tolist()) == [5, 5]
    base = dict(
        cohort_size=10,
        tier_speeds=(1.0, 0.25),
        tier_shares=(0.5, 0.5),
        tier_upload_mbps=(80.0, 8.0),
        step_seconds=0.1,
    )
    budget = plan_round(
        ParticipationSpec(**base, time_budget=0.5), SIZES, 8, 1_000_000, 2, 1
    )
    for c, n in budget.steps.items():
        # fast: floor(0.5·1/0.1) = 5 steps; slow: floor(0.5·0.25/0.1) = 1 step
        assert n == (5 if tiers[c] == 0 else 1)
    # slow tier: 1 step / 0.25 · 0.1 s + 1 MB at 8 Mbit/s = 0.4 + 1.0 s
    assert budget.sim_seconds == pytest.approx(1.4)
    late = plan_round(
        ParticipationSpec(**base, deadline=1.2), SIZES, 8, 1_000_000, 2, 1
    )
    # fast tier: 8 · 0.1 + 0.1 = 0.9 s (in time); slow: 8 · 0.4 + 1.0 = 4.2 s (stragglers)
    assert late.stragglers == [c for c in range(10) if tiers[c] == 1]
    assert late.cohort == [c for c in range(10) if tiers[c] == 0]
    assert late.sim_seconds == 1.2
