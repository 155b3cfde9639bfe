"""FedNova and FedExP against their papers' equations, by hand, and once through the engine.

Tolerances: the hand examples use small dyadic numbers (1, 3, ¼, 2.5, …), so every product,
sum, float64→float32 cast and quotient in them is exact in binary floating point; FedNova's
coefficients are rounded once from exact rationals and are exact here too. Those results are
compared with ``==`` / ``torch.equal``: any rounding at all would be a formula change. Where a
value is not dyadic (a square root, a sum of decimal learning rates), the bound is argued at
the assert.
"""

import math

import pytest
import torch

from fedsim.algorithms import ClientUpdate, build_algorithm
from fedsim.algorithms.fednova import LRMassUpload, nova_coefficients
from fedsim.configtools import ConfigError


def upd(cid, n, lr_mass=None, **delta):
    extras = {}
    if lr_mass is not None:
        extras["lr_mass"] = torch.tensor(lr_mass, dtype=torch.float64)
    return ClientUpdate(
        client_id=cid,
        delta={k: torch.tensor(v, dtype=torch.float32) for k, v in delta.items()},
        num_samples=n,
        loss=0.0,
        steps=1,
        extras=extras,
    )


def step(name, params, w0, updates):
    algo = build_algorithm(name, params)
    weights = {k: torch.tensor(v, dtype=torch.float32) for k, v in w0.items()}
    return algo.aggregate(weights, updates, algo.init_state(weights, 10), 1)


# FedNova: the client half -----------------------------------------------------------------------


def test_lr_mass_upload_is_the_sum_of_the_local_rates():
    local = build_algorithm("fednova").local_training()
    assert isinstance(local, LRMassUpload)
    w = {"w": torch.zeros(2)}
    extras, state = local.finish(w, w, [0.5, 0.25, 0.125], {})
    # a_k = 0.5 + 0.25 + 0.125 = 0.875, exact; nothing kept per client.
    assert state == {}
    assert set(extras) == {"lr_mass"}
    assert extras["lr_mass"].dtype == torch.float64 and extras["lr_mass"].shape == ()
    assert float(extras["lr_mass"]) == 0.875
    # A cosine-like schedule of decimal rates: 3e-3 + 2.25e-3 + 7.5e-4 = 6e-3. Each literal is
    # within 2⁻⁵³ (relative) of its decimal and the sum is rounded once: |error| ≤ 2·2⁻⁵³ of
    # 6e-3, far inside rel 1e-15.
    extras, _ = local.finish(w, w, [3e-3, 2.25e-3, 7.5e-4], {})
    assert float(extras["lr_mass"]) == pytest.approx(6e-3, rel=1e-15, abs=0)
    # No local step: a_k = 0, which the server must refuse (below).
    extras, _ = local.finish(w, w, [], {})
    assert float(extras["lr_mass"]) == 0.0


# FedNova: the server half -----------------------------------------------------------------------


def test_fednova_two_clients_lr_mass_1_and_3_by_hand():
    # n = 1, 3 → p = ¼, ¾;  a = 1, 3;  Δ_0 = [2, −4], Δ_1 = [3, 6].
    # d_0 = Δ_0 / 1 = [2, −4],  d_1 = Δ_1 / 3 = [1, 2]
    # τ_eff = ¼·1 + ¾·3 = 2.5
    # Σ p d = [¼·2 + ¾·1, ¼·(−4) + ¾·2] = [1.25, 0.5]
    # τ_eff Σ p d = [3.125, 1.25]; η_g = 0.5: W_1 = [1, 1] + [1.5625, 0.625]
    ups = [upd(0, 1, 1.0, w=[2.0, -4.0]), upd(1, 3, 3.0, w=[3.0, 6.0])]
    res = step("fednova", {"server_lr": 0.5}, {"w": [1.0, 1.0]}, ups)
    assert torch.equal(res.weights["w"], torch.tensor([2.5625, 1.625]))
    assert res.metrics["tau_eff"] == 2.5
    # ‖[3.125, 1.25]‖² = 9.765625 + 1.5625 = 11.328125 (exact); the square root is correctly
    # rounded and halving is exact, so the metric is this value to the bit.
    assert res.metrics["update_norm"] == math.sqrt(11.328125) * 0.5
    assert res.state == {}
    # FedAvg would step by Σ p Δ = [¼·2 + ¾·3, ¼·(−4) + ¾·6] = [2.75, 3.5]: a different point.
    avg = step("fedavg", {"server_lr": 0.5}, {"w": [1.0, 1.0]}, ups)
    assert torch.equal(avg.weights["w"], torch.tensor([2.375, 2.75]))


def test_fednova_equals_fedavg_with_equal_lr_masses():
    # Equal a_k = a: τ_eff = a and τ_eff Σ p_k Δ_k / a = Σ p_k Δ_k, FedAvg's step. FedNova rounds
    # each coefficient p_k τ_eff / a_k once from exact rationals, so it is p_k to the bit and the
    # weights are FedAvg's bits, also for a non-dyadic a (a cosine schedule's sum). With these
    # n_k = 1, 3, 9 and a, the float formula (n_k/N)·τ_eff/a_k misses p_k by an ulp (float64;
    # too little to show in the float32 weights, hence the coefficients are checked too).
    a = 3e-3 + 2.9e-3 + 2.6e-3
    coeffs, tau = nova_coefficients([1, 3, 9], [a, a, a])
    assert coeffs == [1 / 13, 3 / 13, 9 / 13] and tau == a
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    for server_lr in (1.0, 0.7):
        nova = build_algorithm("fednova", {"server_lr": server_lr})
        avg = build_algorithm("fedavg", {"server_lr": server_lr})
        w_nova, w_avg = dict(weights), dict(weights)
        for rnd in (1, 2, 3):
            ups = [
                ClientUpdate(
                    i,
                    {
                        "w": torch.randn(3, 2, generator=g),
                        "b": torch.randn(3, generator=g),
                    },
                    3**i,
                    0.0,
                    3,
                    {"lr_mass": torch.tensor(a, dtype=torch.float64)},
                )
                for i in range(3)
            ]
            w_nova = nova.aggregate(w_nova, ups, {}, rnd).weights
            w_avg = avg.aggregate(w_avg, ups, {}, rnd).weights
        for k in weights:
            assert torch.equal(w_nova[k], w_avg[k]), (server_lr, k)


def test_fednova_refuses_a_client_without_local_work():
    w0 = {"w": [0.0]}
    ok = upd(2, 5, 0.5, w=[1.0])
    # a_k = 0 (no steps): Δ_k / a_k would be NaN or Inf; the error names the client.
    with pytest.raises(ValueError, match=r"fednova: client 7 has learning-rate mass"):
        step("fednova", {}, w0, [ok, upd(7, 5, 0.0, w=[0.0])])
    # The real client half with no steps uploads a_k = 0: the same error.
    extras, _ = LRMassUpload().finish({}, {}, [], {})
    none = ClientUpdate(7, {"w": torch.tensor([0.0])}, 5, 0.0, 0, extras)
    with pytest.raises(ValueError, match=r"client 7 has learning-rate mass a_k = 0.0"):
        step("fednova", {}, w0, [ok, none])
    # An update without the upload (another algorithm's client half) names the client too.
    with pytest.raises(ValueError, match=r"fednova: client 4 uploaded no lr_mass"):
        step("fednova", {}, w0, [ok, upd(4, 5, None, w=[1.0])])


# FedExP -----------------------------------------------------------------------------------------


def test_fedexp_two_orthogonal_deltas_take_fedavgs_step():
    # p = ½, ½; Δ_0 = [1, 0], Δ_1 = [0, 1]: Σ p ‖Δ‖² = 1, Δ̄ = [½, ½], ‖Δ̄‖² = ½.
    # η = 1 / (2 (½ + ε)) = 1 / (1 + 2ε): 1 / (2·½) = 1 at ε = 0, just below 1 for ε > 0,
    # so the max gives exactly 1 (ε = 1/16 here: 1 / 1.125).
    res = step(
        "fedexp",
        {"epsilon": 0.0625},
        {"w": [0.0, 0.0]},
        [upd(0, 4, w=[1.0, 0.0]), upd(1, 4, w=[0.0, 1.0])],
    )
    assert res.metrics["server_lr_t"] == 1.0
    assert torch.equal(res.weights["w"], torch.tensor([0.5, 0.5]))


def test_fedexp_step_by_hand_is_the_papers_rule_for_equal_weights():
    # M = 8 clients, equal n (p = ⅛), Δ_k = 4 e_k in R⁸ (pairwise orthogonal), ε = 2.
    # Paper: Σ_i ‖Δ_i‖² / (2M (‖Δ̄‖² + ε)) = 8·16 / (2·8·(8·(½)² + 2)) = 128 / 64 = 2.
    # fedsim: Σ p ‖Δ‖² = 16, ‖Δ̄‖² = 2: 16 / (2 (2 + 2)) = 2. W_1 = W_0 + 2·[½]*8 = W_0 + 1.
    eye = torch.eye(8)
    ups = [upd(k, 10, w=(4.0 * eye[k]).tolist()) for k in range(8)]
    res = step("fedexp", {"epsilon": 2.0}, {"w": [1.0] * 8}, ups)
    assert res.metrics["server_lr_t"] == 2.0
    assert torch.equal(res.weights["w"], torch.full((8,), 2.0))
    # update_norm = η ‖Δ̄‖ = 2 √2 (a correctly rounded root, doubled exactly).
    assert res.metrics["update_norm"] == 2.0 * math.sqrt(2.0)


def test_fedexp_weights_clients_by_samples_and_the_cap():
    # n = 1, 3 → p = ¼, ¾; Δ_0 = [5], Δ_1 = [−1]; ε = ¼.
    # Δ̄ = 5/4 − 3/4 = ½, ‖Δ̄‖² = ¼; Σ p ‖Δ‖² = 25/4 + 3/4 = 7; η = 7 / (2 (¼ + ¼)) = 7.
    ups = [upd(0, 1, w=[5.0]), upd(1, 3, w=[-1.0])]
    res = step("fedexp", {"epsilon": 0.25}, {"w": [0.0]}, ups)
    assert res.metrics["server_lr_t"] == 7.0
    assert torch.equal(res.weights["w"], torch.tensor([3.5]))
    # The cap: min(1.5, 7) = 1.5 → W_1 = 1.5·½; a cap above 7 changes nothing.
    capped = step("fedexp", {"epsilon": 0.25, "max_server_lr": 1.5}, {"w": [0.0]}, ups)
    assert capped.metrics["server_lr_t"] == 1.5
    assert torch.equal(capped.weights["w"], torch.tensor([0.75]))
    loose = step("fedexp", {"epsilon": 0.25, "max_server_lr": 10.0}, {"w": [0.0]}, ups)
    assert loose.metrics["server_lr_t"] == 7.0


def test_fedexp_identical_deltas_step_exactly_like_fedavg():
    # Identical Δ: Σ p ‖Δ‖² = ‖Δ‖² = ‖Δ̄‖² (up to rounding), so the ratio is about ½ < 1 and the
    # max gives exactly 1: FedExP's weights are FedAvg's (η = 1) bits.
    g = torch.Generator().manual_seed(1)
    weights = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    delta = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    ups = [ClientUpdate(i, dict(delta), 2 + 5 * i, 0.0, 1) for i in range(3)]
    for eps in (1e-9, 1e-3, 10.0):
        exp = build_algorithm("fedexp", {"epsilon": eps}).aggregate(weights, ups, {}, 1)
        avg = build_algorithm("fedavg").aggregate(weights, ups, {}, 1)
        assert exp.metrics["server_lr_t"] == 1.0
        assert all(torch.equal(exp.weights[k], avg.weights[k]) for k in weights)


def test_fedexp_step_is_never_below_one():
    # Σ p ‖Δ_k‖² ≥ ‖Δ̄‖² (Jensen) makes the ratio ≥ ‖Δ̄‖² / (2 (‖Δ̄‖² + ε)), which is below ½;
    # the floor of 1 is the max alone. Random updates of every spread, tiny to large ε.
    g = torch.Generator().manual_seed(2)
    algos = [build_algorithm("fedexp", {"epsilon": e}) for e in (1e-12, 1e-3, 1.0)]
    for trial in range(20):
        scale = 10.0 ** (trial % 5 - 3)
        ups = [
            ClientUpdate(i, {"w": scale * torch.randn(5, generator=g)}, 1 + i, 0.0, 1)
            for i in range(1 + trial % 4)
        ]
        for algo in algos:
            res = algo.aggregate({"w": torch.zeros(5)}, ups, {}, 1)
            assert res.metrics["server_lr_t"] >= 1.0


# Parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, pattern",
    [
        # A value out of range: the config layer prefixes the field's own message.
        ("fednova", {"server_lr": 0.0}, r"^algorithm: server_lr must be > 0"),
        ("fedexp", {"epsilon": 0.0}, r"^algorithm: epsilon must be > 0"),
        ("fedexp", {"epsilon": -1.0}, r"^algorithm: epsilon must be > 0"),
        ("fedexp", {"max_server_lr": 0.5}, r"^algorithm: max_server_lr must be >= 1"),
        # A value of the wrong type: named as a dotted key.
        (
            "fedexp",
            {"epsilon": "small"},
            r"^algorithm\.epsilon: 'small' is not a number",
        ),
        ("fedexp", {"max_server_lr": "x"}, r"^algorithm\.max_server_lr: 'x' is not"),
        ("fednova", {"server_lr": "x"}, r"^algorithm\.server_lr: 'x' is not a number"),
        ("fednova", {"lr": 1.0}, r"^algorithm\.lr: unknown key"),
    ],
)
def test_bad_parameters_name_the_field(name, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_algorithm(name, params)


def test_parameters_from_the_command_line():
    from fedsim.config import load_config

    cfg = load_config(
        None,
        [
            "algorithm.name=fedexp",
            "algorithm.max_server_lr=3",
            "algorithm.epsilon=1e-4",
        ],
    )
    algo = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    assert (algo.max_server_lr, algo.epsilon) == (3.0, 1e-4)
    with pytest.raises(ConfigError, match=r"max_server_lr must be >= 1"):
        load_config(None, ["algorithm.name=fedexp", "algorithm.max_server_lr=0.9"])


# End to end -------------------------------------------------------------------------------------

# Two device tiers under a time budget: fast clients take 2 local steps, slow ones 1
# (⌊2.0·0.5/1.0⌋), so the clients' lr masses differ.
TIERS = [
    "scenario.tier_speeds=[1.0, 0.5]",
    "scenario.tier_shares=[0.5, 0.5]",
    "scenario.tier_upload_mbps=[100.0, 100.0]",
    "scenario.step_seconds=1.0",
    "scenario.time_budget=2.0",
    "scenario.cohort_size=6",
    "eval.benchmarks=[]",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fednova", "fedexp"])
def test_runs_end_to_end(tmp_path, toy_path, cache_dir, ray_session, name):
    from test_algorithms_run import _run

    from fedsim.schedule import lr_at

    r = _run(tmp_path, name, [f"algorithm.name={name}", *TIERS], cache_dir)
    assert all(torch.isfinite(v).all() for v in r.weights.values())
    for rec in r.history:
        assert rec["rejected"] == []
        assert rec["update_norm"] > 0
        steps = {int(c): n for c, n in rec["local_steps"].items()}
        assert set(steps.values()) == {1, 2}  # both tiers train in every round
        if name == "fedexp":
            assert rec["algorithm"]["server_lr_t"] >= 1.0
            continue
        # τ_eff from the uploads that crossed Ray: client k trained 4·s_k rows (batch 4) with
        # the first s_k rates of the round (rounds = 2, local_steps = 2, lr 3e-3, warm-up
        # 0.03, cosine: round 1 [3e-3, 3e-3], round 2 [2.25e-3, 7.5e-4]), so
        # τ_eff = Σ_k s_k a_k / Σ_k s_k. The hand sum rounds ≤ 12 times at 2⁻⁵³ on
        # positive terms: rel 1e-13 is loose; counting steps (a = s·lr₀) instead of the lr
        # mass would be off by ≥ 10 % in round 2.
        rates = [lr_at((rec["round"] - 1) * 2 + s, 4, 3e-3, 0.03) for s in range(2)]
        masses = {c: sum(rates[:s]) for c, s in steps.items()}
        total = sum(steps.values())
        tau = sum(steps[c] * masses[c] for c in steps) / total
        assert rec["algorithm"]["tau_eff"] == pytest.approx(tau, rel=1e-13, abs=0)
