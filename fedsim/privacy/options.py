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
        ``none``; ``central``: the server clips each update to ``clip`` and adds
        N(0, (zC)²) to the sum (the server is trusted with individual updates).
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
    """

    mechanism: Literal["none", "central"] = "none"
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
