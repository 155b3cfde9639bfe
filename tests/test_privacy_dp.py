"""Client-level DP mechanism (fedsim/privacy/dp.py): clipping bounds every contribution, the
noise has the stated std, adaptive clipping follows Andrew et al. 2021."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from fedsim.privacy.dp import (
    adaptive_clip_step,
    add_local_noise,
    clip_update,
    l2_norm,
    local_noise_std,
    noised_mean,
    sum_updates,
    update_noise_multiplier,
)

# One float64 multiply per entry and a float64 norm: relative error a few 2^-53 (dp.py).
REL = 1e-12

# Adversarial updates: entries up to float32's largest magnitude, or tiny, mixed signs.
magnitudes = st.floats(allow_nan=False, allow_infinity=False, width=32)
shapes = st.sampled_from([(3,), (2, 2), (1,), (4, 1)])


@st.composite
def updates(draw):
    keys = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True))
    out = {}
    for k in sorted(keys):
        shape = draw(shapes)
        n = int(np.prod(shape))
        vals = draw(st.lists(magnitudes, min_size=n, max_size=n))
        out[k] = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    return out


@settings(max_examples=200, deadline=None)
@given(updates(), st.floats(min_value=1e-3, max_value=1e3))
def test_clipping_bounds_the_whole_update_jointly(delta, clip):
    clipped, norm = clip_update(delta, clip)
    assert l2_norm(clipped) <= clip * (1 + REL)
    # The direction is kept: clipped = s · Δ with one s for every tensor.
    s = min(1.0, clip / norm) if norm > 0 else 1.0
    for k, v in delta.items():
        torch.testing.assert_close(clipped[k], v.double() * s, rtol=0, atol=0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(updates(), min_size=2, max_size=5), st.floats(min_value=1e-2, max_value=10)
)
def test_one_client_moves_the_clipped_sum_by_at_most_c(batch, clip):
    """Add/remove sensitivity: Σ with client 0 minus Σ without it has norm ≤ C."""
    keys = set(batch[0])
    same = [
        d
        for d in batch
        if set(d) == keys and all(d[k].shape == batch[0][k].shape for k in keys)
    ]
    clipped = [clip_update(d, clip)[0] for d in same]
    with_all = sum_updates(clipped)
    if len(clipped) == 1:
        diff = with_all
    else:
        without = sum_updates(clipped[1:])
        diff = {k: with_all[k] - without[k] for k in with_all}
    # float64 sums of values ≤ C: rounding ≤ (clients) · 2^-52 · C per entry, far below 1e-9.
    assert l2_norm(diff) <= clip * (1 + 1e-9)


def test_non_finite_updates_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"w": torch.tensor([1.0, float("nan")])}, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"w": torch.tensor([float("inf")])}, 1.0)
    with pytest.raises(ValueError, match="privacy.clip"):
        clip_update({"w": torch.tensor([1.0])}, 0.0)


# Noise std: the sample variance s² of d i.i.d. N(0, σ²) draws has mean σ² and std σ²·√(2/d)
# (chi-square with d degrees of freedom), so |s²/σ² − 1| > 5·√(2/d) has probability ≈ 5.7e-7
# (a two-sided 5σ normal tail; d = 400 000 makes the normal approximation exact to ~1e-3).
D = 400_000
FIVE_SIGMA = 5.0


def _variance_ok(x: np.ndarray, std: float) -> None:
    ratio = float(np.mean(x**2)) / std**2  # zero-mean by construction: E[x²] = σ²
    assert abs(ratio - 1) <= FIVE_SIGMA * math.sqrt(2 / x.size), ratio
    assert abs(float(x.mean())) <= FIVE_SIGMA * std / math.sqrt(x.size)


def test_central_noise_has_the_stated_std():
    zero = {"a": torch.zeros(D // 2, dtype=torch.float64), "b": torch.zeros(D // 2)}
    z, clip, m = 1.3, 0.5, 8.0
    out = noised_mean(zero, z * clip, m, seed=3, server_round=4)
    x = torch.cat([out["a"].double(), out["b"].double()]).numpy()
    _variance_ok(x, z * clip / m)  # the mean's noise: zC / m
    # A different round draws other noise (keyed by (seed, round)); the same round the same.
    again = noised_mean(zero, z * clip, m, seed=3, server_round=4)
    other = noised_mean(zero, z * clip, m, seed=3, server_round=5)
    assert torch.equal(again["a"], out["a"])
    corr = float(np.corrcoef(out["a"].numpy(), other["a"].numpy())[0, 1])
    assert abs(corr) <= FIVE_SIGMA / math.sqrt(D // 2)


def test_local_noise_sums_to_the_stated_std_over_the_threshold():
    """t clients each adding N(0, σ²/t): their sum has std σ (distributed DP)."""
    t, sigma = 16, 0.7
    per = local_noise_std(sigma, t)
    assert per == pytest.approx(sigma / 4)
    zero = {"w": torch.zeros(D // 4, dtype=torch.float64)}
    noises = [add_local_noise(zero, per, 0, 1, c)["w"] for c in range(t)]
    _variance_ok(torch.stack(noises).sum(0).numpy(), sigma)


def test_update_noise_multiplier_is_the_theorem():
    # z = 1, σ_b = 1: z_Δ = (1 − 1/4)^(−1/2) = 2/√3
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(
        2 / math.sqrt(3), rel=1e-15
    )
    # σ_b → ∞ leaves the whole budget to the update: z_Δ → z
    assert update_noise_multiplier(0.9, 1e9) == pytest.approx(0.9, rel=1e-12)
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="count_noise"):
        update_noise_multiplier(1.0, 0.5)


def test_geometric_clip_update_by_hand():
    # No count noise: 3 of 4 norms ≤ C = 1, m = 4 → b̃ = 0.75; C' = exp(−0.2 (0.75 − 0.5))
    step = adaptive_clip_step([0.1, 0.5, 1.0, 2.0], 1.0, 0.5, 0.2, 0.0, 4, 0, 1)
    assert step.fraction == 0.75
    assert step.next_clip == pytest.approx(math.exp(-0.05), rel=1e-15)


def test_adaptive_clip_tracks_the_target_quantile():
    """Norms 1…100 each round, γ = 0.3: C settles near the 30th (within ±8: the noise σ_b = 1
    over m = 100 moves b̃ by 0.01, η_C = 0.2 steps of ≈2 %)."""
    norms = [float(n) for n in range(1, 101)]
    clip = 1.0
    for rnd in range(1, 400):
        clip = adaptive_clip_step(norms, clip, 0.3, 0.2, 1.0, 100, 0, rnd).next_clip
    assert 22 <= clip <= 38, clip
