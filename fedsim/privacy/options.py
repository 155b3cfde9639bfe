"""The ``privacy`` section of the run config (kept free of torch and dp_accounting, so that
``fedsim.config`` stays quick to import; the checks against the rest of the run are in
:mod:`fedsim.privacy.plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedsim.configtools import ConfigError


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Client-level differential privacy (``privacy.*``); off by default.

    Attributes
    ----------
    mechanism:
        ``none``; ``central``: each update is clipped to ``clip`` and the server adds
        N(0, (zC)²) to the sum (without secure aggregation the server clips, and is trusted
        with individual updates; with it the clients clip and the server sees only the sum);
        ``local``: each client clips and adds its share N(0, (zC)²/t) of the noise before
        secure aggregation (t = ``secagg_threshold``; needs ``secure_aggregation``).
    clip:
        C, the ℓ2 bound of a client's whole projector delta (the initial C when adaptive).
    noise_multiplier:
        z, the noise std over C. Set it or ``target_epsilon``, not both.
    target_epsilon:
        Choose z before the run so that ε(δ) after ``rounds`` rounds is at most this.
    delta:
        δ of the reported (ε, δ); keep it below 1 / ``scenario.num_clients``.
    accountant:
        ``rdp`` or ``pld`` (dp_accounting); fixed-size cohorts need ``rdp``.
    accounting:
        ``amplified``: amplification by sampling where the participation model has it
        (uniform cohorts: sampling without replacement); ``no_amplification``: every round
        counts as full participation (the only way to run size-weighted sampling or
        availability traces under DP).
    adaptive_clip:
        Adapt C toward the ``target_quantile`` of update norms (Andrew et al. 2021).
    target_quantile:
        γ, the fraction of clients whose update should fall under C.
    clip_lr:
        η_C, the geometric step of C.
    count_noise:
        σ_b, the std of the noise on the count of clipped clients; null = m / 20 (the paper's
        suggestion, m the cohort size). Must exceed z / 2.
    secure_aggregation:
        Sum the updates with secure aggregation (Bonawitz et al. 2017): workers mask each
        client's fixed-point update, the aggregator sees masked vectors and the sum only.
    secagg_threshold:
        t, the fewest clients whose masked inputs unmask a round; null = ⌊m/2⌋ + 1. Fewer
        survivors fail the round (``validation.on_reject`` decides what the run does).
    secagg_dropout:
        Probability that a cohort client leaves after sharing its keys and before uploading
        (the case the protocol's recovery exists for), keyed by (seed, round, client).
    ring_bits:
        k of the ring Z_{2^k}: 32 or 64.
    frac_bits:
        f, fraction bits of the fixed-point encoding (resolution 2^−f); null = the most that
        fits the cohort's sum in the ring, at most 40.
    """

    mechanism: Literal["none", "central", "local"] = "none"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"
    accounting: Literal["amplified", "no_amplification"] = "amplified"
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    secure_aggregation: bool = False
    secagg_threshold: int | None = None
    secagg_dropout: float = 0.0
    ring_bits: int = 64
    frac_bits: int | None = None

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"privacy.clip: must be > 0, got {self.clip!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta!r}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(
                f"privacy.noise_multiplier: must be >= 0, got {self.noise_multiplier!r}"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(
                f"privacy.target_epsilon: must be > 0, got {self.target_epsilon!r}"
            )
        if not 0 <= self.target_quantile <= 1:
            raise ConfigError(
                f"privacy.target_quantile: must be in [0, 1], got {self.target_quantile!r}"
            )
        if not self.clip_lr > 0:
            raise ConfigError(f"privacy.clip_lr: must be > 0, got {self.clip_lr!r}")
        if self.count_noise is not None and not self.count_noise > 0:
            raise ConfigError(
                f"privacy.count_noise: must be > 0, got {self.count_noise!r}"
            )
        if not 0 <= self.secagg_dropout < 1:
            raise ConfigError(
                f"privacy.secagg_dropout: must be in [0, 1), got {self.secagg_dropout!r}"
            )
        if self.ring_bits not in (32, 64):
            raise ConfigError(
                f"privacy.ring_bits: must be 32 or 64, got {self.ring_bits!r}"
            )
        if self.frac_bits is not None and not 0 <= self.frac_bits < self.ring_bits - 1:
            raise ConfigError(
                f"privacy.frac_bits: must be in 0..{self.ring_bits - 2}, got {self.frac_bits!r}"
            )
        if self.mechanism == "local" and not self.secure_aggregation:
            raise ConfigError(
                "privacy.mechanism: local noise is for use under secure aggregation; set "
                "privacy.secure_aggregation=true (or use central)"
            )
        self._check_mechanism()

    def _check_mechanism(self) -> None:
        noise_set = self.noise_multiplier is not None
        target_set = self.target_epsilon is not None
        if self.mechanism == "none":
            for name, on in (
                ("noise_multiplier", noise_set),
                ("target_epsilon", target_set),
                ("adaptive_clip", self.adaptive_clip),
            ):
                if on:
                    raise ConfigError(
                        f"privacy.{name}: set, but privacy.mechanism is none"
                    )
        elif noise_set == target_set:
            raise ConfigError(
                "privacy.noise_multiplier: set exactly one of it and "
                "privacy.target_epsilon"
            )
