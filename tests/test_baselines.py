"""Baselines against their papers' equations on tiny tensors, two rounds each (server state).

Tolerances: the expected values are exact small numbers computed in float64; the algorithms run in
float32 on one- or two-entry tensors, chaining fewer than ten roundings of ≤ 2⁻²⁴ each (FedOpt's
square root included), so pytest.approx's default rel 1e-6 (≈ 17 float32 ulps) holds on any
IEEE machine; a wrong formula moves them by ≥ 1e-2.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms import ClientUpdate, build_algorithm
from fedsim.algorithms.fedprox import proximal_term
from fedsim.algorithms.registry import available


def upd(cid, n, extras=None, **delta):
    return ClientUpdate(
        client_id=cid,
        delta={k: torch.tensor(v, dtype=torch.float32) for k, v in delta.items()},
        num_samples=n,
        loss=0.0,
        steps=1,
        extras={
            k: torch.tensor(v, dtype=torch.float32) for k, v in (extras or {}).items()
        },
    )


def two_rounds(name, params, rounds, w0=0.0, num_clients=None):
    algo = build_algorithm(name, params)
    weights = {"w": torch.tensor([w0])}
    state = algo.init_state(weights, num_clients)
    out = []
    for t, ups in enumerate(rounds, start=1):
        res = algo.aggregate(weights, ups, state, t)
        weights, state = res.weights, res.state
        out.append(float(weights["w"]))
    return out, state


# FedAvgM -----------------------------------------------------------------------------------------


def test_fedavgm_by_hand():
    # β = 0.5, η = 1: v1 = 2 → w1 = 2; v2 = 0.5·2 + 4 = 5 → w2 = 7.
    ws, state = two_rounds(
        "fedavgm",
        {"momentum": 0.5, "server_lr": 1.0},
        [[upd(0, 1, w=[2.0])], [upd(1, 1, w=[3.0]), upd(2, 1, w=[5.0])]],
    )
    assert ws == pytest.approx([2.0, 7.0])
    assert float(state["v/w"]) == pytest.approx(5.0)


def test_fedavgm_beta_zero_and_fedprox_mu_zero_are_fedavg():
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    algos = {
        "fedavg": build_algorithm("fedavg"),
        "fedavgm": build_algorithm("fedavgm", {"momentum": 0.0, "server_lr": 1.0}),
        "fedprox": build_algorithm("fedprox", {"mu": 0.0}),
    }
    states = {k: a.init_state(weights) for k, a in algos.items()}
    current = {k: dict(weights) for k in algos}
    for rnd in (1, 2, 3):
        ups = [
            ClientUpdate(
                i,
                {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)},
                1 + i,
                0.0,
                1,
            )
            for i in range(4)
        ]
        for k, a in algos.items():
            res = a.aggregate(current[k], ups, states[k], rnd)
            current[k], states[k] = res.weights, res.state
    for k in ("fedavgm", "fedprox"):
        for key in weights:
            assert torch.equal(current[k][key], current["fedavg"][key]), (k, key)
    # The client half of FedProx with μ = 0 adds nothing to the loss either.
    assert (
        algos["fedprox"]
        .local_training()
        .loss_term({"w": torch.ones(1)}, {"w": torch.zeros(1)}, {})
        is None
    )


# FedProx -----------------------------------------------------------------------------------------


def test_proximal_term_value_and_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    start = torch.tensor([0.0, 1.0])
    term = proximal_term({"w": w}, {"w": start}, mu=0.5)
    # μ/2 ‖w − w_t‖² = 0.25 · (1 + 1) = 0.5; gradient μ (w − w_t) = [0.5, 0.5].
    assert term.item() == pytest.approx(0.5)
    term.backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 0.5]))


# FedOpt -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, v1, v2",
    [
        # v0 = τ² = 0.25; Δ1 = 2, Δ2 = 1; β2 = 0.5.
        ("fedadagrad", 0.25 + 4.0, 0.25 + 4.0 + 1.0),
        ("fedyogi", 0.25 + 0.5 * 4.0, 2.25 - 0.5 * 1.0),  # sign(v − Δ²): −1 then +1
        ("fedadam", 0.5 * 0.25 + 0.5 * 4.0, 0.5 * 2.125 + 0.5 * 1.0),
    ],
)
def test_fedopt_by_hand(name, v1, v2):
    params = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.5}
    ws, state = two_rounds(name, params, [[upd(0, 1, w=[2.0])], [upd(1, 1, w=[1.0])]])
    m1 = 0.5 * 2.0  # m1 = β1·0 + (1 − β1)·2
    m2 = 0.5 * m1 + 0.5 * 1.0
    w1 = m1 / (math.sqrt(v1) + 0.5)
    w2 = w1 + m2 / (math.sqrt(v2) + 0.5)
    assert ws == pytest.approx([w1, w2], rel=1e-6)
    assert float(state["v/w"]) == pytest.approx(v2)
    assert float(state["m/w"]) == pytest.approx(m2)


# SCAFFOLD -----------------------------------------------------------------------------------------


def test_scaffold_control_variates_two_rounds_by_hand():
    algo = build_algorithm("scaffold", {"option": "II"})
    local = algo.local_training()
    x = {"w": torch.tensor([1.0])}
    state = algo.init_state(x, num_clients=4)
    client_states = {}

    def client(cid, x, y, lrs):
        ctx = local.prepare(client_states.get(cid, {}), algo.server_payload(state))
        extras, new_state = local.finish(x, {"w": torch.tensor([y])}, lrs, ctx)
        client_states[cid] = new_state
        return ClientUpdate(
            cid, {"w": torch.tensor([y]) - x["w"]}, 10, 0.0, len(lrs), extras
        )

    # Round 1, c = 0: c_0⁺ = (1 − 0.6)/0.2 = 2, c_1⁺ = (1 − 1.2)/0.2 = −1.
    ups = [client(0, x, 0.6, [0.1, 0.1]), client(1, x, 1.2, [0.1, 0.1])]
    assert float(client_states[0]["c/w"]) == pytest.approx(2.0)
    assert float(client_states[1]["c/w"]) == pytest.approx(-1.0)
    res = algo.aggregate(x, ups, state, 1)
    x, state = res.weights, res.state
    # x = 1 + (−0.4 + 0.2)/2 = 0.9; c = 0 + (2 − 1)/4 = 0.25
    assert float(x["w"]) == pytest.approx(0.9)
    assert float(state["c/w"]) == pytest.approx(0.25)

    # Round 2: client 0 again (c_0 = 2), client 2 new (c_2 = 0).
    ctx = local.prepare(client_states[0], algo.server_payload(state))
    assert float(ctx["correction"]["w"]) == pytest.approx(0.25 - 2.0)  # c − c_i
    ups = [client(0, x, 0.5, [0.1, 0.1]), client(2, x, 1.0, [0.1, 0.1])]
    # c_0⁺ = 2 − 0.25 + 0.4/0.2 = 3.75; c_2⁺ = 0 − 0.25 + (−0.1)/0.2 = −0.75
    assert float(client_states[0]["c/w"]) == pytest.approx(3.75)
    assert float(client_states[2]["c/w"]) == pytest.approx(-0.75)
    res = algo.aggregate(x, ups, state, 2)
    # c = 0.25 + (1.75 − 0.75)/4 = 0.5; x = 0.9 + (−0.4 + 0.1)/2 = 0.75
    assert float(res.state["c/w"]) == pytest.approx(0.5)
    assert float(res.weights["w"]) == pytest.approx(0.75)


def test_scaffold_option_one_control_variates_two_rounds_by_hand():
    algo = build_algorithm("scaffold")  # option I is the default
    local = algo.local_training()
    x = {"w": torch.tensor([1.0])}
    state = algo.init_state(x, num_clients=2)
    client_states: dict[int, dict] = {}

    def client(cid, grads, y):
        # Local steps: each gets its raw gradient, then the correction (c − c_i).
        ctx = local.prepare(client_states.get(cid, {}), algo.server_payload(state))
        p = torch.nn.Parameter(x["w"].clone())
        seen = []
        for g in grads:
            p.grad = torch.tensor([g])
            local.correct_gradients({"w": p}, ctx)
            seen.append(float(p.grad))
        extras, client_states[cid] = local.finish(
            x, {"w": torch.tensor([y])}, [0.1] * len(grads), ctx
        )
        update = ClientUpdate(
            cid, {"w": torch.tensor([y]) - x["w"]}, 10, 0.0, len(grads), extras
        )
        return update, seen

    # Round 1 (c = c_i = 0): c_i⁺ = the first step's raw gradient, whatever the path after it.
    (u0, seen0), (u1, _) = client(0, [4.0, 9.0], 0.5), client(1, [-2.0, 7.0], 1.1)
    assert seen0 == [4.0, 9.0]  # no correction yet
    assert (
        float(client_states[0]["c/w"]) == 4.0 and float(client_states[1]["c/w"]) == -2.0
    )
    res = algo.aggregate(x, [u0, u1], state, 1)
    x, state = res.weights, res.state
    assert float(state["c/w"]) == pytest.approx(
        (4.0 - 2.0) / 2
    )  # c = 0 + (1/N) Σ Δc_i = 1
    # Round 2, client 0 (c_0 = 4, c = 1): steps see g − 4 + 1; c_0⁺ = its new first gradient.
    ((u0, seen0),) = [client(0, [3.0, 5.0], 0.7)]
    assert seen0 == [0.0, 2.0]
    assert float(client_states[0]["c/w"]) == 3.0
    assert float(u0.extras["dc/w"]) == -1.0  # Δc_0 = 3 − 4
    res = algo.aggregate(x, [u0], state, 2)
    assert float(res.state["c/w"]) == pytest.approx(1.0 + (-1.0) / 2)


def test_scaffold_gradient_correction():
    local = build_algorithm("scaffold").local_training()
    ctx = local.prepare({"c/w": torch.tensor([2.0])}, {"c/w": torch.tensor([0.5])})
    p = torch.nn.Parameter(torch.tensor([0.0]))
    p.grad = torch.tensor([1.0])
    local.correct_gradients({"w": p}, ctx)
    assert float(p.grad) == pytest.approx(1.0 - 2.0 + 0.5)  # g − c_i + c


# Contracts every federated algorithm obeys ----------------------------------------------------------

FEDERATED = [n for n, cls in available().items() if not cls.pooled]


@pytest.mark.parametrize("name", FEDERATED)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), perm=st.permutations(range(4)))
def test_client_order_does_not_matter(name, seed, perm):
    g = torch.Generator().manual_seed(seed)
    weights = {
        "l.weight": torch.randn(6, 5, generator=g),
        "l.bias": torch.randn(6, generator=g),
    }
    ups = []
    for i in range(4):
        delta = {
            "l.weight": torch.randn(6, 5, generator=g),
            "l.bias": torch.randn(6, generator=g),
        }
        extras = (
            {f"dc/{k}": torch.randn_like(v) for k, v in delta.items()}
            if name == "scaffold"
            else {}
        )
        if name == "fednova":  # unequal lr masses a_k, so the order could matter
            extras = {"lr_mass": torch.tensor(0.1 * (i + 1), dtype=torch.float64)}
        ups.append(ClientUpdate(i, delta, 5 + i, 0.0, 1, extras))
    algo = build_algorithm(name, {"rank": 3} if name.startswith("fedcmp") else {})
    a = algo.aggregate(weights, ups, algo.init_state(weights, 10), 1)
    b = algo.aggregate(weights, [ups[i] for i in perm], algo.init_state(weights, 10), 1)
    for k in weights:
        assert torch.equal(a.weights[k], b.weights[k])


@pytest.mark.parametrize("name", FEDERATED)
def test_mismatched_keys_raise_naming_the_client(name):
    algo = build_algorithm(name)
    weights = {"w": torch.zeros(2, 2)}
    bad = ClientUpdate(7, {"v": torch.zeros(2, 2)}, 1, 0.0, 1)
    with pytest.raises(ValueError, match="client 7"):
        algo.aggregate(weights, [bad], algo.init_state(weights, 10), 1)


def test_algorithms_list_shows_every_registered_algorithm():
    from typer.testing import CliRunner

    from fedsim.cli import app

    out = CliRunner().invoke(app, ["algorithms", "list"], terminal_width=200).output
    for name, cls in available().items():
        assert name in out
        assert cls.paper.split()[0] in out  # the first author (rich may wrap the rest)


def test_every_registered_algorithm_keeps_the_protocol():
    """What the round loops call on every algorithm: the capabilities as class attributes and
    every method of ``Algorithm`` (a missing ``evaluate_round`` broke SCAFFOLD's runs)."""
    from fedsim.algorithms.base import Algorithm
    from fedsim.algorithms.registry import available, build_algorithm

    for name in available():
        algo = build_algorithm(name)
        assert isinstance(algo, Algorithm), name
        for flag in ("pooled", "personal", "presummable"):
            assert isinstance(getattr(type(algo), flag), bool), (name, flag)
        assert algo.evaluate_round(True, False) in (True, False)
