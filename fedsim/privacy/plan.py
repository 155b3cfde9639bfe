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
    # uniform: a fixed-size cohort without replacement (dropout and deadlines only remove).
    return "fixed"


def check_algorithm(cls: type) -> None:
    """Refuse an algorithm whose server half reads more than the sum of the updates."""
    name = getattr(cls, "name", cls.__name__)
    if getattr(cls, "pooled", False) or getattr(cls, "personal", False):
        kind = "trains on pooled data" if cls.pooled else "keeps per-client models"
        raise ConfigError(
            f"algorithm.name: {name} {kind}; client-level DP covers federated averaging "
            "of updates only (privacy.mechanism)"
        )
    if not getattr(cls, "presummable", False):
        why = getattr(cls, "reads_updates", None) or (
            "its server half is not declared to read the updates only through their sum"
        )
        raise ConfigError(
            f"algorithm.name: {name} cannot run under privacy.mechanism: {why}"
        )


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
    accountant: str
    participation: Participation
    adaptive_clip: bool
    target_quantile: float
    clip_lr: float
    count_noise: float
    chosen_for: float | None  # target ε when z was calibrated

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
            f"privacy: central DP, clip C={self.clip:g}"
            f"{' (adaptive)' if self.adaptive_clip else ''}, {z}; ε={eps:.4g} at "
            f"δ={self.delta:g} after {rounds} rounds ({self.accountant}, {how})"
        )


def check_privacy(cfg: Any, algorithm_cls: type) -> Participation | None:
    """Every check of the privacy section against the run (one-line ConfigErrors naming the
    field); the accountant's participation model, or None when privacy is off. Cheap: no
    calibration (``fedsim.config.load_config`` calls it)."""
    pc: PrivacyConfig = cfg.privacy
    if pc.mechanism == "none":
        return None
    check_algorithm(algorithm_cls)
    if cfg.train.presum:
        raise ConfigError(
            "train.presum: under privacy.mechanism=central the server clips each update; "
            "set train.presum=false"
        )
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
    )


def record_epsilon(value: float) -> float | str:
    """ε as metrics.jsonl holds it: a number, or the string ``"inf"`` (JSON has no ∞)."""
    return value if math.isfinite(value) else "inf"
