"""The ``privacy`` section of a run config, its checks against the rest of the run, and the
resolved plan the round loop follows (z, the accountant's participation model, m).

What the guarantee covers. Client-level (ε, δ)-DP of the sequence of global projectors
W_1 … W_T (and everything computed from them), with a client's whole local dataset as the
unit (McMahan et al. 2018, arXiv 1710.06963). It composes with any server half that reads the
round's updates only through their (noised) mean: the FedAvg family (``presummable``: FedAvg,
FedAvgM, FedProx, FedAdagrad, FedYogi, FedAdam) post-processes it. Algorithms that read each
client's update (Fed-CMP's canonical basis and reliability weights, SCAFFOLD's control
variates, FedNova's learning-rate masses, FedExP's per-client norms) are refused, naming the
reason they carry (``reads_updates``); so are the local-only and centralized baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedsim.configtools import ConfigError
from fedsim.privacy.accounting import (
    AccountantName,
    Participation,
    PrivacyConfigError,
    Sampling,
    epsilon,
    make_accountant,
    noise_for_epsilon,
)
from fedsim.privacy.dp import update_noise_multiplier
from fedsim.privacy.options import PrivacyConfig


def sampling_of(scenario: Any, accounting: str) -> Sampling:
    """The accountant's sampling for a scenario's participation model (or ConfigError)."""
    if accounting == "no_amplification":
        return "none"
    if scenario.participation == "size_weighted":
        raise ConfigError(
            "scenario.participation: size_weighted sampling has no standard privacy "
            "amplification; set privacy.accounting=no_amplification"
        )
    if scenario.availability != "always":
        raise ConfigError(
            f"scenario.availability: {scenario.availability} traces have no standard "
            "privacy amplification; set privacy.accounting=no_amplification"
        )
    if scenario.participation == "poisson":
        return "poisson"
    # uniform: a fixed-size cohort without replacement (dropout and deadlines only remove).
    return "fixed"


def check_algorithm(cls: type, under: str = "privacy.mechanism") -> None:
    """Refuse an algorithm whose server half reads more than the sum of the updates."""
    name = getattr(cls, "name", cls.__name__)
    pooled = getattr(cls, "pooled", False)
    if pooled or getattr(cls, "personal", False):
        kind = "trains on pooled data" if pooled else "keeps per-client models"
        raise ConfigError(
            f"algorithm.name: {name} {kind}; {under} covers federated averaging of "
            "updates only"
        )
    if not getattr(cls, "presummable", False):
        why = getattr(cls, "reads_updates", None) or (
            "its server half is not declared to read the updates only through their sum"
        )
        raise ConfigError(f"algorithm.name: {name} cannot run under {under}: {why}")


def check_secure(cfg: Any) -> int:
    """The secure-aggregation checks that need no ring: returns the threshold t."""
    pc, m = cfg.privacy, cfg.scenario.cohort_size
    t = pc.secagg_threshold if pc.secagg_threshold is not None else m // 2 + 1
    if not m // 2 < t <= m:
        raise ConfigError(
            f"privacy.secagg_threshold: must be in {m // 2 + 1}..{m} (more than half of "
            f"the cohort of {m}), got {t}"
        )
    if pc.adaptive_clip:
        raise ConfigError(
            "privacy.adaptive_clip: not available under secure aggregation (the ring's "
            "range would have to follow C)"
        )
    if pc.mechanism == "none" and cfg.validation.max_update_norm is None:
        raise ConfigError(
            "validation.max_update_norm: secure aggregation needs a bound on updates to "
            "size its ring; set it"
        )
    return t


@dataclass(frozen=True)
class PrivacyPlan:
    """What the round loop and the aggregator follow.

    ``noise_multiplier`` is the z the accountant is given (the combined one under adaptive
    clipping); ``update_noise`` is z_Δ, the one added to the sum; ``denominator`` is m.
    """

    clip: float
    noise_multiplier: float
    update_noise: float
    denominator: float
    delta: float
    accountant: AccountantName
    participation: Participation
    adaptive_clip: bool
    target_quantile: float
    clip_lr: float
    count_noise: float
    chosen_for: float | None  # target ε when z was calibrated
    mechanism: str = "central"

    def epsilon_after(self, rounds: int) -> float:
        """ε(δ) after ``rounds`` rounds (math.inf when z = 0)."""
        return epsilon(
            self.noise_multiplier,
            self.participation,
            rounds,
            self.delta,
            self.accountant,
        )

    def describe(self, rounds: int) -> str:
        """One line for the console and summary.md."""
        p = self.participation
        how = {
            "fixed": f"fixed-size sampling m={p.cohort_size} of N={p.num_clients}",
            "poisson": f"Poisson sampling q={p.q:g}",
            "none": "no amplification",
        }[p.sampling]
        z = f"noise multiplier z={self.noise_multiplier:.4g}"
        if self.chosen_for is not None:
            z += f" (chosen for ε={self.chosen_for:g})"
        eps = self.epsilon_after(rounds)
        return (
            f"privacy: {self.mechanism} DP, clip C={self.clip:g}"
            f"{' (adaptive)' if self.adaptive_clip else ''}, {z}; ε={eps:.4g} at "
            f"δ={self.delta:g} after {rounds} rounds ({self.accountant}, {how})"
        )


def check_privacy(cfg: Any, algorithm_cls: type) -> Participation | None:
    """Every check of the privacy section against the run (one-line ConfigErrors naming the
    field); the accountant's participation model, or None when privacy is off. Cheap: no
    calibration (``fedsim.config.load_config`` calls it)."""
    pc: PrivacyConfig = cfg.privacy
    if pc.mechanism == "none" and not pc.secure_aggregation:
        return None
    under = "privacy.mechanism" if pc.mechanism != "none" else "secure aggregation"
    check_algorithm(algorithm_cls, under)
    if cfg.train.presum:
        raise ConfigError(
            f"train.presum: {under} replaces the workers' partial sums; set "
            "train.presum=false"
        )
    if pc.mechanism != "none" and cfg.validation.on_reject == "skip_round":
        raise ConfigError(
            "validation.on_reject: skip_round would keep W_t exactly when an update is "
            "rejected, which the noise does not cover; use continue or fail"
        )
    if pc.secure_aggregation:
        check_secure(cfg)
    if pc.mechanism == "none":
        return None
    sc = cfg.scenario
    try:
        part = Participation(
            sampling_of(sc, pc.accounting), sc.num_clients, sc.cohort_size
        )
        make_accountant(pc.accountant, part)  # refuses pld with fixed-size cohorts
    except PrivacyConfigError as e:
        raise ConfigError(str(e)) from None
    if pc.adaptive_clip:
        z = pc.noise_multiplier if pc.noise_multiplier is not None else 0.0
        try:
            update_noise_multiplier(z, pc.count_noise or sc.cohort_size / 20)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return part


def plan_privacy(cfg: Any, algorithm_cls: type) -> PrivacyPlan | None:
    """The run's privacy plan (None when off), after :func:`check_privacy`.

    With ``target_epsilon`` z is chosen here, by bisection over the accountant.
    """
    part = check_privacy(cfg, algorithm_cls)
    if part is None:
        return None
    pc: PrivacyConfig = cfg.privacy
    z = pc.noise_multiplier
    count_noise = pc.count_noise or cfg.scenario.cohort_size / 20
    try:
        if z is None:
            assert pc.target_epsilon is not None
            z = noise_for_epsilon(
                pc.target_epsilon, part, cfg.rounds, pc.delta, pc.accountant
            )
        z_update = update_noise_multiplier(z, count_noise) if pc.adaptive_clip else z
    except ValueError as e:  # PrivacyConfigError included
        raise ConfigError(str(e)) from None
    return PrivacyPlan(
        clip=pc.clip,
        noise_multiplier=z,
        update_noise=z_update,
        denominator=float(cfg.scenario.cohort_size),
        delta=pc.delta,
        accountant=pc.accountant,
        participation=part,
        adaptive_clip=pc.adaptive_clip,
        target_quantile=pc.target_quantile,
        clip_lr=pc.clip_lr,
        count_noise=count_noise,
        chosen_for=pc.target_epsilon,
        mechanism=pc.mechanism,
    )


def record_epsilon(value: float) -> float | str:
    """ε as metrics.jsonl holds it: a number, or the string ``"inf"`` (JSON has no ∞)."""
    return value if math.isfinite(value) else "inf"
