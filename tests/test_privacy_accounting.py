"""ε(δ) from fedsim/privacy/accounting.py against dp_accounting used directly."""

from __future__ import annotations

import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.privacy.accounting import (
    Participation,
    PrivacyConfigError,
    epsilon,
    noise_for_epsilon,
)


def test_poisson_matches_dp_accounting_rdp_and_pld():
    """z = 1.1, q = 10 / 1000, 100 rounds, δ = 1e-5: the library's own accountants."""
    z, n, m, rounds, delta = 1.1, 1000, 10, 100, 1e-5
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(m / n, dp_event.GaussianDpEvent(z)), rounds
    )
    rdp = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)
    pld = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)
    part = Participation("poisson", n, m)
    assert epsilon(z, part, rounds, delta, "rdp") == rdp
    assert epsilon(z, part, rounds, delta, "pld") == pld
    assert 0 < pld < rdp < 10  # PLD is tighter than RDP's conversion


def test_fixed_size_matches_dp_accounting_without_replacement():
    """z = 0.8, m = 10 of N = 100 without replacement, 20 rounds, δ = 1e-6: replace-one
    neighbours, so the sum's sensitivity is 2C and the event's multiplier z / 2."""
    z, n, m, rounds, delta = 0.8, 100, 10, 20, 1e-6
    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_ONE
    )
    acc.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.SampledWithoutReplacementDpEvent(
                n, m, dp_event.GaussianDpEvent(z / 2)
            ),
            rounds,
        )
    )
    assert epsilon(z, Participation("fixed", n, m), rounds, delta) == acc.get_epsilon(
        delta
    )


def test_no_amplification_is_the_plain_gaussian_composed():
    z, rounds, delta = 2.0, 30, 1e-5
    acc = rdp_privacy_accountant.RdpAccountant().compose(
        dp_event.GaussianDpEvent(z), rounds
    )
    part = Participation("none", 50, 5)
    assert part.q == 1.0
    assert epsilon(z, part, rounds, delta) == acc.get_epsilon(delta)
    # Amplification only helps: the same z with Poisson q = 0.1 gives less.
    assert epsilon(z, Participation("poisson", 50, 5), rounds, delta) < epsilon(
        z, part, rounds, delta
    )


@pytest.mark.parametrize("sampling", ["poisson", "fixed", "none"])
def test_no_noise_is_infinite_epsilon(sampling):
    assert epsilon(0.0, Participation(sampling, 100, 10), 5, 1e-5) == math.inf


def test_pld_refuses_fixed_size_sampling():
    with pytest.raises(PrivacyConfigError, match="privacy.accountant"):
        epsilon(1.0, Participation("fixed", 100, 10), 5, 1e-5, "pld")


def test_bad_inputs_name_the_field():
    with pytest.raises(PrivacyConfigError, match="privacy.delta"):
        epsilon(1.0, Participation("poisson", 100, 10), 5, 0.0)
    with pytest.raises(PrivacyConfigError, match="privacy.noise_multiplier"):
        epsilon(math.nan, Participation("poisson", 100, 10), 5, 1e-5)
    with pytest.raises(PrivacyConfigError, match="scenario.cohort_size"):
        Participation("fixed", 10, 11)
    with pytest.raises(PrivacyConfigError, match="privacy.target_epsilon"):
        noise_for_epsilon(math.inf, Participation("poisson", 100, 10), 5, 1e-5)


@pytest.mark.parametrize(
    ("sampling", "accountant"),
    [("poisson", "rdp"), ("fixed", "rdp"), ("poisson", "pld")],
)
def test_calibrated_noise_meets_the_target_and_is_nearly_the_least(
    sampling, accountant
):
    part, rounds, delta, target = Participation(sampling, 200, 20), 25, 1e-5, 4.0
    z = noise_for_epsilon(target, part, rounds, delta, accountant)
    assert epsilon(z, part, rounds, delta, accountant) <= target
    # the bisection stops within 1e-3 · z of the boundary: 1 % less noise is over budget
    assert epsilon(z * 0.99, part, rounds, delta, accountant) > target
