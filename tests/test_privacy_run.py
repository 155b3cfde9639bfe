"""Client-level DP in runs: the privacy section's checks, the aggregator's private mean,
ε per round in metrics.jsonl (equal to dp_accounting's), refused combinations on the CLI."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from small_runs import NO_EVAL, SMALL, cli_run_args, small_run

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import ClientUpdate
from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.privacy.plan import plan_privacy

DP = ["privacy.mechanism=central", "privacy.clip=0.05"]


def _cfg(*extra: str):
    return load_config(None, [*SMALL, *extra])


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["algorithm.name=fedcmp"], "algorithm.name: fedcmp cannot run under privacy"),
        (["algorithm.name=fedcmp-cra"], "fedcmp-cra cannot run"),  # inherits the reason
        (["algorithm.name=scaffold"], "scaffold cannot run under privacy.mechanism"),
        (["algorithm.name=fednova"], "learning-rate mass"),
        (["algorithm.name=fedexp"], "‖Δ_k‖²"),
        (["algorithm.name=local"], "local keeps per-client models"),
        (["algorithm.name=centralized"], "centralized trains on pooled data"),
        (["scenario.participation=size_weighted"], "scenario.participation"),
        (["scenario.availability=diurnal"], "scenario.availability"),
        (["privacy.accountant=pld"], "privacy.accountant"),
        (["train.presum=true"], "train.presum"),
        (["privacy.target_epsilon=4"], "set exactly one"),
        (["privacy.adaptive_clip=true", "privacy.count_noise=0.4"], "count_noise"),
    ],
)
def test_refused_combinations_name_the_field(extra, says):
    with pytest.raises(ConfigError, match=None) as e:
        _cfg(*DP, "privacy.noise_multiplier=1.0", *extra)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_privacy_off_refuses_its_knobs_and_allows_everything():
    with pytest.raises(ConfigError, match="privacy.noise_multiplier: set, but"):
        _cfg("privacy.noise_multiplier=1.0")
    assert _cfg("algorithm.name=fedcmp").privacy.mechanism == "none"


def test_no_amplification_lets_traces_run_and_counts_full_participation():
    cfg = _cfg(
        *DP,
        "privacy.noise_multiplier=1.0",
        "scenario.availability=diurnal",
        "privacy.accounting=no_amplification",
    )
    plan = plan_privacy(cfg, type(build_algorithm("fedavg")))
    direct = rdp_privacy_accountant.RdpAccountant().compose(
        dp_event.GaussianDpEvent(1.0), 2
    )
    assert plan.epsilon_after(2) == direct.get_epsilon(1e-5)


def test_target_epsilon_chooses_z_before_the_run():
    cfg = _cfg(*DP, "privacy.target_epsilon=8", "rounds=5")
    plan = plan_privacy(cfg, type(build_algorithm("fedprox")))
    assert plan.epsilon_after(5) <= 8 < plan.epsilon_after(5) * 1.05
    assert "chosen for ε=8" in plan.describe(5)


def _aggregator(plan, algorithm="fedavg"):
    w = {"a": torch.zeros(2), "b": torch.zeros(1)}
    agg = Aggregator(algorithm, {}, w)
    agg.set_privacy(plan, seed=0)
    return agg, w


def test_the_server_step_is_the_clipped_mean_over_the_fixed_denominator():
    """z = 0: (clip(Δ_1) + clip(Δ_2)) / m with m = 4 (the cohort size), by hand."""
    cfg = _cfg(
        "privacy.mechanism=central", "privacy.clip=1.0", "privacy.noise_multiplier=0"
    )
    agg, w = _aggregator(plan_privacy(cfg, type(build_algorithm("fedavg"))))
    u1 = ClientUpdate(
        3, {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}, 9, 0, 1
    )
    u2 = ClientUpdate(
        1, {"a": torch.tensor([0.5, 0.0]), "b": torch.tensor([0.0])}, 1, 0, 1
    )
    new, metrics = agg.aggregate(w, [u1, u2], 1)
    # ‖Δ_1‖ = 5 → (0.6, 0, 0.8); Δ_2 kept; n_k plays no part (uniform weights)
    torch.testing.assert_close(new["a"], torch.tensor([(0.6 + 0.5) / 4, 0.0]))
    torch.testing.assert_close(new["b"], torch.tensor([0.8 / 4]))
    assert metrics["privacy"] == {"clip": 1.0}


def test_the_server_noise_has_std_z_c_over_m():
    """Residual of the private mean around the noiseless one: d = 100 000 draws of
    N(0, (zC/m)²); |s²/σ² − 1| > 5√(2/d) has probability ≈ 6e-7 (5σ of a chi-square)."""
    cfg = _cfg(
        "privacy.mechanism=central", "privacy.clip=2.0", "privacy.noise_multiplier=1.5"
    )
    plan = plan_privacy(cfg, type(build_algorithm("fedavg")))
    d = 100_000
    w = {"a": torch.zeros(d)}
    agg = Aggregator("fedavg", {}, w)
    agg.set_privacy(plan, seed=5)
    delta = {"a": torch.full((d,), 1e-4)}  # ‖Δ‖ = 0.0316 < C: unclipped
    new, _ = agg.aggregate(w, [ClientUpdate(0, delta, 1, 0, 1)], 1)
    resid = (new["a"].double() - 1e-4 / 4).numpy()
    sigma = 1.5 * 2.0 / 4
    assert abs((resid**2).mean() / sigma**2 - 1) <= 5 * math.sqrt(2 / d)


def test_adaptive_clip_moves_and_is_saved_with_the_server_state():
    cfg = _cfg(
        "privacy.mechanism=central",
        "privacy.clip=1.0",
        "privacy.noise_multiplier=0.5",
        "privacy.adaptive_clip=true",
        "privacy.count_noise=1.0",  # the default m / 20 = 0.2 would be under z / 2
    )
    plan = plan_privacy(cfg, type(build_algorithm("fedavg")))
    assert plan.update_noise > plan.noise_multiplier  # z_Δ > z: the count takes a share
    agg, w = _aggregator(plan)
    tiny = ClientUpdate(0, {"a": torch.full((2,), 1e-3), "b": torch.zeros(1)}, 1, 0, 1)
    _, metrics = agg.aggregate(w, [tiny], 1)
    assert "clipped_fraction_noised" in metrics["privacy"]
    state = agg.server_state()
    assert float(state["privacy/clip"][0]) == agg.clip != 1.0
    fresh, _ = _aggregator(plan)
    fresh.load_state(state)
    assert fresh.clip == agg.clip and "privacy/clip" not in fresh.state


@pytest.mark.slow
def test_a_dp_run_logs_the_accountants_epsilon(
    tmp_path, toy_path, cache_dir, ray_session
):
    """2 rounds, 4 of 20 clients (fixed size), z = 1: ε after each round is dp_accounting's
    RDP under replace-one with multiplier z / 2; a run without DP has no ε."""
    res = small_run(
        tmp_path / "dp", cache_dir, *NO_EVAL, *DP, "privacy.noise_multiplier=1.0"
    )
    for rec in res.history:
        if rec.get("round", 0) < 1:
            continue
        acc = rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=NeighboringRelation.REPLACE_ONE
        )
        acc.compose(
            dp_event.SampledWithoutReplacementDpEvent(
                20, 4, dp_event.GaussianDpEvent(0.5)
            ),
            rec["round"],
        )
        assert rec["epsilon"] == acc.get_epsilon(1e-5)
        assert rec["privacy"]["clip"] == 0.05
    summary = (tmp_path / "dp" / "summary.md").read_text()
    assert f"ε = {res.history[-1]['epsilon']}" in summary
    plain = small_run(tmp_path / "plain", cache_dir, *NO_EVAL)
    lines = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    assert lines and all("epsilon" not in json.loads(x) for x in lines)
    assert all("epsilon" not in r for r in plain.history)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["algorithm.name=scaffold"], "scaffold cannot run under privacy"),
        (["scenario.participation=size_weighted"], "scenario.participation"),
    ],
)
def test_refused_on_the_command_line_with_exit_code_2(tmp_path, cache_dir, extra, says):
    args = cli_run_args(
        tmp_path / "out", cache_dir, *DP, "privacy.noise_multiplier=1", *extra
    )
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_poisson_participation_and_its_accounting():
    """scenario.participation=poisson: each of N clients joins with q = m / N (keyed by seed
    and round); the run is accounted with PoissonSampledDpEvent, PLD allowed."""
    import numpy as np
    from dp_accounting.pld import pld_privacy_accountant

    from fedsim.scenarios.participation import ParticipationSpec, plan_round

    spec = ParticipationSpec(participation="poisson", cohort_size=4)
    sizes = np.full(20, 100)
    counts = [len(plan_round(spec, sizes, 2, 0, 0, r).cohort) for r in range(1, 2001)]
    # |S_t| ~ Binomial(20, 0.2): mean 4, std √3.2; the mean of 2000 rounds is within 5 std
    # of 4 (5 · √3.2 / √2000 ≈ 0.2) except with probability ≈ 6e-7
    assert abs(np.mean(counts) - 4) <= 5 * np.sqrt(3.2 / 2000)
    assert plan_round(spec, sizes, 2, 0, 3, 7) == plan_round(spec, sizes, 2, 0, 3, 7)
    cfg = _cfg(
        *DP,
        "privacy.noise_multiplier=1.2",
        "scenario.participation=poisson",
        "privacy.accountant=pld",
    )
    plan = plan_privacy(cfg, type(build_algorithm("fedavg")))
    direct = pld_privacy_accountant.PLDAccountant().compose(
        dp_event.PoissonSampledDpEvent(4 / 20, dp_event.GaussianDpEvent(1.2)), 2
    )
    assert plan.epsilon_after(2) == direct.get_epsilon(1e-5)


def test_an_empty_private_round_still_releases_noise():
    """Nothing accepted (a NaN update): the mechanism still adds N(0, (zC/m)²) to W_t, as
    the accountant assumes; without DP the same round keeps W_t exactly."""
    cfg = _cfg(
        "privacy.mechanism=central", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"
    )
    agg, w = _aggregator(plan_privacy(cfg, type(build_algorithm("fedavg"))))
    bad = ClientUpdate(
        2, {"a": torch.tensor([float("nan"), 0.0]), "b": torch.zeros(1)}, 1, 0, 1
    )
    new, metrics = agg.aggregate(w, [bad], 1)
    assert metrics["rejected"][0]["client_id"] == 2
    assert all(torch.isfinite(v).all() for v in new.values())
    assert not torch.equal(new["a"], w["a"])  # P(a draw is exactly 0) = 0
    plain = Aggregator("fedavg", {}, w)
    kept, m2 = plain.aggregate(w, [bad], 1)
    assert torch.equal(kept["a"], w["a"]) and "action" in m2


def test_skip_round_is_refused_under_dp():
    with pytest.raises(ConfigError, match="validation.on_reject: skip_round"):
        _cfg(*DP, "privacy.noise_multiplier=1", "validation.on_reject=skip_round")
