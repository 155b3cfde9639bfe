"""ε(δ) of client-level DP-FedAvg with Google's ``dp_accounting`` (RDP and PLD accountants).

No accountant is written here: each round is one sampled Gaussian mechanism, described as a
``dp_accounting`` event and composed by the library's accountant.

Which amplification applies to which participation model:

* ``poisson`` — every client joins a round independently with q = m / N (m the expected cohort
  size): ``PoissonSampledDpEvent``, add-or-remove-one neighbours, sensitivity C, noise
  multiplier z. The RDP accountant (Mironov, Talwar, Zhang 2019, arXiv 1908.10530) and the PLD
  accountant (Koskela et al.; Doroshenko et al. 2022, arXiv 2207.04380) both handle it.
* ``fixed`` — a cohort of exactly m of N clients drawn uniformly without replacement
  (fedsim's ``scenario.participation: uniform``): ``SampledWithoutReplacementDpEvent``, which
  ``dp_accounting`` supports in its RDP accountant only, under replace-one neighbours (N is
  public; Wang, Balle, Kasiviswanathan 2019, arXiv 1808.00087, Thm 27). Replacing one client
  moves the clipped sum by up to 2C, so the event's noise multiplier is z / 2. Dropout,
  deadlines and device time budgets remove clients by rules independent of their data
  (keyed by seed, round and client): conditioned on who is removed, a removed client's
  contribution is replaced by zero, which maps neighbours to neighbours, so the ε of the
  undropped cohort holds (conservatively).
* ``none`` — no amplification: every round counts as full participation (q = 1), Gaussian
  with multiplier z under add-or-remove-one. Used for participation models with no standard
  amplification result (size-weighted sampling, availability traces), only on request
  (``privacy.accounting: no_amplification``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import dp_accounting

Sampling = Literal["poisson", "fixed", "none"]
AccountantName = Literal["rdp", "pld"]


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be accounted for (one line, naming the field)."""


def _lib() -> ModuleType:
    """``dp_accounting``, imported on first use: the optional extra fedsim[privacy] (it
    brings SciPy: ~70 MB and a few tenths of a second that a run without privacy never pays).
    """
    try:
        import dp_accounting
        import dp_accounting.pld.pld_privacy_accountant
        import dp_accounting.rdp.rdp_privacy_accountant
    except ImportError:  # pragma: no cover - exercised only where the extra is missing
        raise PrivacyConfigError(
            "privacy.mechanism: needs the dp-accounting package: pip install 'fedsim[privacy]'"
        ) from None
    return dp_accounting


@dataclass(frozen=True)
class Participation:
    """How a round's clients are drawn, as the accountant sees it.

    Attributes
    ----------
    sampling:
        ``poisson``, ``fixed`` or ``none`` (module docstring).
    num_clients:
        N, the population.
    cohort_size:
        m: the expected cohort (Poisson) or the exact one (fixed).
    """

    sampling: Sampling
    num_clients: int
    cohort_size: int

    def __post_init__(self) -> None:
        if not 0 < self.cohort_size <= self.num_clients:
            raise PrivacyConfigError(
                f"scenario.cohort_size: {self.cohort_size} is not in 1..{self.num_clients}"
            )

    @property
    def q(self) -> float:
        """The sampling rate m / N (1 without amplification)."""
        return 1.0 if self.sampling == "none" else self.cohort_size / self.num_clients


def round_event(z: float, part: Participation) -> Any:
    """One round's DpEvent: the Gaussian sum (multiplier z) under ``part``'s sampling."""
    dp_event = _lib().dp_event
    if part.sampling == "poisson":
        return dp_event.PoissonSampledDpEvent(part.q, dp_event.GaussianDpEvent(z))
    if part.sampling == "fixed":
        # replace-one: sensitivity 2C, so the std zC is (z/2) sensitivities.
        return dp_event.SampledWithoutReplacementDpEvent(
            part.num_clients, part.cohort_size, dp_event.GaussianDpEvent(z / 2)
        )
    return dp_event.GaussianDpEvent(z)


def make_accountant(
    name: AccountantName, part: Participation
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant for ``part``; PLD has no fixed-size sampling (refused)."""
    lib = _lib()
    rdp_privacy_accountant = lib.rdp.rdp_privacy_accountant
    rel = lib.NeighboringRelation
    if part.sampling == "fixed":
        if name != "rdp":
            raise PrivacyConfigError(
                "privacy.accountant: dp_accounting's PLD accountant has no fixed-size "
                "(without replacement) sampling; use rdp, or poisson participation"
            )
        return rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=rel.REPLACE_ONE
        )
    if name == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if name == "pld":
        return lib.pld.pld_privacy_accountant.PLDAccountant()
    raise PrivacyConfigError(f"privacy.accountant: {name!r} is not rdp or pld")


def epsilon(
    z: float,
    part: Participation,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """ε(δ) after ``rounds`` rounds of noise multiplier z (math.inf when z = 0: no noise)."""
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"privacy.delta: must be in (0, 1), got {delta!r}")
    if not z >= 0 or not math.isfinite(z):
        raise PrivacyConfigError(
            f"privacy.noise_multiplier: must be finite and >= 0, got {z!r}"
        )
    if rounds <= 0:
        return 0.0
    if z == 0:
        return math.inf
    acc = make_accountant(accountant, part)
    acc.compose(_lib().dp_event.SelfComposedDpEvent(round_event(z, part), rounds))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    part: Participation,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """The smallest z (to ``rel_tol``) with ε(δ) ≤ ``target_epsilon`` after ``rounds``.

    Bisection over the accountant (ε falls as z grows); the upper end is returned, so the
    guarantee holds: ``epsilon(z, ...) <= target_epsilon``.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise PrivacyConfigError(
            f"privacy.target_epsilon: must be a finite number > 0, got {target_epsilon!r}"
        )
    hi = 1.0
    while epsilon(hi, part, rounds, delta, accountant) > target_epsilon:
        hi *= 2
        if hi > 2**20:
            raise PrivacyConfigError(
                f"privacy.target_epsilon: {target_epsilon:g} is out of reach "
                f"(z > {2**20} still gives more)"
            )
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if epsilon(mid, part, rounds, delta, accountant) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
