"""Fed-CMP (fedsim's formalisation, FEDCMP.md): each listed property is a test, plus the steps.

Tolerances, and why they hold on any CPU. Everything here is float32 on matrices of at most
80 × 60 with O(1) entries (randn). QR, SVD and symmetric eigensolvers are backward stable: the
computed factors are exact for a matrix within c·n·u·‖A‖ of the input (u = 2⁻²⁴ ≈ 6e-8, n ≤ 80,
c a small constant; Higham §19, Golub & Van Loan §8.1), so orthonormality (‖UᵀU − I‖) and
reconstructions are off by ~n·u ≈ 5e-6 at most: atol/rtol 1e-5. Where a result goes through an
eigen-subspace (projectors UUᵀ, a rank-r reconstruction, the randomized range finder on exactly
rank-3 data, a basis whose sign flips) the error is divided by the eigen-gap, which these inputs
keep O(1) (random data, well-separated top-r): 1e-4. The hand-computed cases (reliability,
momentum) chain fewer than ten float32 operations on exact small numbers: well inside the 1e-5 /
default tolerances. A wrong formula moves these results by O(1).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms import ClientUpdate, build_algorithm
from fedsim.algorithms.fedavg import fedavg_delta
from fedsim.algorithms.fedcmp import (
    client_reliability,
    coordinate_reliability,
    gauge_fix,
    polar,
    qf,
    stiefel_step,
    top_eigenvectors,
    transport,
)


def make_updates(deltas, sizes):
    return [
        ClientUpdate(client_id=i, delta=d, num_samples=n, loss=0.0, steps=1)
        for i, (d, n) in enumerate(zip(deltas, sizes))
    ]


def random_round(seed, k=5, m=12, n=9, shared_rank=3, noise=0.1):
    """Client deltas sharing a low-rank direction plus client noise; a bias too."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, shared_rank, generator=g) @ torch.randn(
        shared_rank, n, generator=g
    )
    out = []
    for _ in range(k):
        out.append(
            {
                "l.weight": base + noise * torch.randn(m, n, generator=g),
                "l.bias": torch.randn(m, generator=g),
            }
        )
    sizes = [int(x) for x in torch.randint(1, 50, (k,), generator=g)]
    return out, sizes


W0 = {"l.weight": torch.zeros(12, 9), "l.bias": torch.zeros(12)}


# Property 1: FedAvg special case -------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 9, 256])
@pytest.mark.parametrize("reliability", ["none"])
def test_reduces_to_fedavg(rank, reliability):
    algo = build_algorithm(
        "fedcmp", {"rank": rank, "reliability": reliability, "momentum": 0.0}
    )
    state = algo.init_state(W0)
    weights = dict(W0)
    for rnd in (1, 2, 3):  # several rounds: the basis state must not matter with β = 0
        deltas, sizes = random_round(rnd)
        ups = make_updates(deltas, sizes)
        res = algo.aggregate(weights, ups, state, rnd)
        expected = {k: weights[k] + v for k, v in fedavg_delta(ups).items()}
        for k in weights:
            torch.testing.assert_close(
                res.weights[k], expected[k], rtol=1e-5, atol=1e-5
            )
        weights, state = res.weights, res.state


def test_infinite_temperature_and_no_coordinate_shrinkage_is_fedavg():
    algo = build_algorithm(
        "fedcmp",
        {"rank": 4, "reliability": "client", "temperature": 1e12, "momentum": 0.0},
    )
    deltas, sizes = random_round(7)
    ups = make_updates(deltas, sizes)
    res = algo.aggregate(W0, ups, algo.init_state(W0), 1)
    expected = fedavg_delta(ups)
    for k in W0:
        torch.testing.assert_close(res.weights[k], expected[k], rtol=1e-5, atol=1e-5)


# Property 2: identical clients ----------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), rank=st.integers(1, 12))
def test_identical_clients_give_their_delta(seed, k, rank):
    g = torch.Generator().manual_seed(seed)
    delta = {
        "l.weight": torch.randn(12, 9, generator=g),
        "l.bias": torch.randn(12, generator=g),
    }
    algo = build_algorithm("fedcmp", {"rank": rank, "momentum": 0.0})
    ups = make_updates([delta] * k, [3] * k)
    res = algo.aggregate(W0, ups, algo.init_state(W0), 1)
    for key in W0:
        torch.testing.assert_close(res.weights[key], delta[key], rtol=1e-4, atol=1e-4)


# Property 3: client order ------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), perm_seed=st.integers(0, 10_000))
def test_client_order_does_not_matter(seed, perm_seed):
    algo = build_algorithm("fedcmp", {"rank": 4})
    deltas, sizes = random_round(seed)
    ups = make_updates(deltas, sizes)
    perm = torch.randperm(len(ups), generator=torch.Generator().manual_seed(perm_seed))
    a = algo.aggregate(W0, ups, algo.init_state(W0), 1)
    b = algo.aggregate(W0, [ups[i] for i in perm], algo.init_state(W0), 1)
    for k in W0:
        assert torch.equal(a.weights[k], b.weights[k])


# Property 4: orthonormal bases; SVD sign flips change nothing ------------------------------------


def test_bases_stay_orthonormal_every_round():
    algo = build_algorithm("fedcmp", {"rank": 5, "stiefel_momentum": False})
    state, weights = algo.init_state(W0), dict(W0)
    for rnd in range(1, 6):
        deltas, sizes = random_round(100 + rnd)
        res = algo.aggregate(weights, make_updates(deltas, sizes), state, rnd)
        weights, state = res.weights, res.state
        for side in ("U", "V"):
            b = state[f"{side}/l.weight"]
            torch.testing.assert_close(
                b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0
            )


def test_stiefel_momentum_keeps_bases_orthonormal():
    algo = build_algorithm("fedcmp", {"rank": 4, "stiefel_momentum": True})
    state, weights = algo.init_state(W0), dict(W0)
    for rnd in range(1, 6):
        deltas, sizes = random_round(200 + rnd)
        res = algo.aggregate(weights, make_updates(deltas, sizes), state, rnd)
        weights, state = res.weights, res.state
        u = state["U/l.weight"]
        torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    assert "MU/l.weight" in state


def test_sign_flips_of_the_basis_change_nothing():
    """Flip signs of columns of last round's basis and of this round's: the update is the same."""
    algo = build_algorithm("fedcmp", {"rank": 3, "momentum": 0.9})
    deltas1, sizes1 = random_round(11)
    r1 = algo.aggregate(W0, make_updates(deltas1, sizes1), algo.init_state(W0), 1)
    flipped = dict(r1.state)
    s_u = torch.tensor([1.0, -1.0, -1.0])
    s_v = torch.tensor([-1.0, 1.0, -1.0])
    flipped["U/l.weight"] = r1.state["U/l.weight"] * s_u
    flipped["V/l.weight"] = r1.state["V/l.weight"] * s_v
    # The momentum is expressed in the basis, so it flips with it.
    flipped["m/l.weight"] = s_u[:, None] * r1.state["m/l.weight"] * s_v[None, :]
    deltas2, sizes2 = random_round(12)
    a = algo.aggregate(r1.weights, make_updates(deltas2, sizes2), r1.state, 2)
    b = algo.aggregate(r1.weights, make_updates(deltas2, sizes2), flipped, 2)
    for k in W0:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-4, atol=1e-5)


def test_gauge_fix_undoes_a_rotation():
    g = torch.Generator().manual_seed(0)
    u_prev = torch.linalg.qr(torch.randn(10, 3, generator=g))[0]
    rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    torch.testing.assert_close(
        gauge_fix(u_prev @ rot, u_prev), u_prev, atol=1e-5, rtol=0
    )
    # Different rank: still orthonormal.
    u4 = torch.linalg.qr(torch.randn(10, 4, generator=g))[0]
    fixed = gauge_fix(u4, u_prev)
    torch.testing.assert_close(fixed.T @ fixed, torch.eye(4), atol=1e-5, rtol=0)


def test_polar_and_qf():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(polar(a), torch.eye(2))
    q = qf(torch.tensor([[-1.0, 0.0], [0.0, -2.0], [0.0, 0.0]]))
    torch.testing.assert_close(q.T @ q, torch.eye(2))
    assert (
        q[0, 0] == -1.0 and q[1, 1] == -1.0
    )  # diag(R) >= 0 ⇒ Q keeps A's column signs


# Property 5: outlier ----------------------------------------------------------------------------


def test_outlier_gets_the_smallest_weight_and_less_pull_than_fedavg():
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(12, 9, generator=g)
    deltas = [
        {
            "l.weight": direction + 0.05 * torch.randn(12, 9, generator=g),
            "l.bias": torch.zeros(12),
        }
        for _ in range(5)
    ]
    outlier = {"l.weight": -6.0 * direction, "l.bias": torch.zeros(12)}
    ups = make_updates([*deltas, outlier], [10] * 6)
    algo = build_algorithm("fedcmp", {"rank": 4, "momentum": 0.0})
    res = algo.aggregate(W0, ups, algo.init_state(W0), 1)
    c = torch.stack(
        [
            res.state["U/l.weight"].T @ d.delta["l.weight"] @ res.state["V/l.weight"]
            for d in ups
        ]
    )
    _, w = client_reliability(c, torch.full((6,), 1 / 6), 1.0)
    assert int(w.argmin()) == 5
    fedavg = fedavg_delta(ups)["l.weight"]
    # Pull toward the outlier: projection of the update on the outlier's direction.
    along = lambda x: float((x * outlier["l.weight"]).sum())  # noqa: E731
    assert along(res.weights["l.weight"]) < along(fedavg)


# Step functions ---------------------------------------------------------------------------------


def test_top_eigenvectors_exact_and_randomized_agree():
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(80, 3, generator=g)  # a column space common to all clients
    deltas = [shared @ torch.randn(3, 60, generator=g) for _ in range(4)]
    p = [0.1, 0.2, 0.3, 0.4]
    exact = top_eigenvectors(deltas, p, 3, "left")
    import fedsim.algorithms.fedcmp as fc

    old = fc._EXACT_LIMIT
    fc._EXACT_LIMIT = 0  # force the randomized path
    try:
        rand = top_eigenvectors(deltas, p, 3, "left", torch.Generator().manual_seed(0))
    finally:
        fc._EXACT_LIMIT = old
    # Same subspace: projectors agree.
    torch.testing.assert_close(
        exact.vectors @ exact.vectors.T,
        rand.vectors @ rand.vectors.T,
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        exact.eigenvalues, rand.eigenvalues, rtol=1e-4, atol=1e-3
    )
    # Left rank 3: the top 3 eigenvalues hold all the energy Σ p ‖Δ‖².
    assert float(exact.eigenvalues.sum()) == pytest.approx(exact.total, rel=1e-4)


def test_reliability_by_hand():
    # Two clients agree, one opposes: C as 1x1 matrices.
    c = torch.tensor([[[1.0]], [[1.0]], [[-1.0]]])
    p = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    agree, w = client_reliability(c, p, 1.0)
    # Leave-one-out sums: client 0 sees 0, client 2 sees 2/3: a = [0, 0, -1] → cos(1, 0) := 0.
    torch.testing.assert_close(agree, torch.tensor([0.0, 0.0, -1.0]))
    e = math.exp(-1.0)
    torch.testing.assert_close(w, torch.tensor([1 / (2 + e), 1 / (2 + e), e / (2 + e)]))
    mu, rho = coordinate_reliability(c, w)
    mu_exp = (2 - e) / (2 + e)
    torch.testing.assert_close(mu, torch.tensor([[mu_exp]]))
    wv = torch.tensor([1 / (2 + e), 1 / (2 + e), e / (2 + e)], dtype=torch.float64)
    var = float(
        (wv * (torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64) - mu_exp) ** 2).sum()
    )
    k_eff = 1 / float((wv**2).sum())
    torch.testing.assert_close(
        rho,
        torch.tensor([[mu_exp**2 / (mu_exp**2 + var / k_eff)]]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_momentum_transport_is_identity_on_an_unchanged_basis():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(8, 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(6, 3, generator=g))[0]
    m = torch.randn(3, 3, generator=g)
    torch.testing.assert_close(transport(m, u, u, v, v), m, atol=1e-5, rtol=0)
    # Transport drops directions that leave the space: orthogonal new basis gives zero.
    u_orth = torch.linalg.qr(torch.cat([u, torch.randn(8, 3, generator=g)], 1))[0][
        :, 3:
    ]
    assert float(transport(m, u_orth, u, v, v).abs().max()) < 1e-5


def test_momentum_two_rounds_by_hand_with_a_fixed_basis():
    """Rank-1 clients along the same u vᵀ: the basis does not move, so OPM is scalar EMA."""
    u = torch.zeros(12)
    u[0] = 1.0
    v = torch.zeros(9)
    v[0] = 1.0
    beta = 0.5
    algo = build_algorithm(
        "fedcmp", {"rank": 1, "momentum": beta, "reliability": "none"}
    )
    state, weights = algo.init_state(W0), dict(W0)
    coeffs = [2.0, 4.0]
    expected_w = 0.0
    m = 0.0
    for t, cval in enumerate(coeffs, start=1):
        d = {"l.weight": cval * torch.outer(u, v), "l.bias": torch.zeros(12)}
        res = algo.aggregate(weights, make_updates([d, d], [1, 1]), state, t)
        m = beta * m + (1 - beta) * cval
        expected_w += m / (1 - beta**t)
        torch.testing.assert_close(
            res.weights["l.weight"][0, 0], torch.tensor(expected_w)
        )
        weights, state = res.weights, res.state
    # Round 1: m̂ = 2; round 2: m = 0.5*1 + 0.5*4 = 2.5, m̂ = 2.5 / 0.75 = 3.333…
    assert float(weights["l.weight"][0, 0]) == pytest.approx(2 + 2.5 / 0.75)


def test_stiefel_step_moves_toward_the_target():
    g = torch.Generator().manual_seed(2)
    a = torch.linalg.qr(torch.randn(10, 2, generator=g))[0]
    b = torch.linalg.qr(a + 0.1 * torch.randn(10, 2, generator=g))[0]
    new, vel = stiefel_step(a, b, None, 0.5, 1.0)
    assert float((new - b).norm()) < float((a - b).norm())
    torch.testing.assert_close(new.T @ new, torch.eye(2), atol=1e-5, rtol=0)


# Property 6: ablations are config ----------------------------------------------------------------


def test_registered_ablations():
    full = build_algorithm("fedcmp")
    cra = build_algorithm("fedcmp-cra")
    opm = build_algorithm("fedcmp-opm")
    assert full.momentum == 0.9 and full.reliability == "both"
    assert cra.momentum == 0.0 and cra.reliability == "both"
    assert opm.momentum == 0.9 and opm.reliability == "none"
    deltas, sizes = random_round(9)
    ups = make_updates(deltas, sizes)
    outs = {
        name: build_algorithm(name, {"rank": 4})
        .aggregate(W0, ups, {}, 1)
        .weights["l.weight"]
        for name in ("fedcmp", "fedcmp-cra", "fedcmp-opm")
    }
    # Round 1 with bias correction: momentum alone changes nothing, reliability does.
    torch.testing.assert_close(outs["fedcmp"], outs["fedcmp-cra"])
    assert not torch.allclose(outs["fedcmp"], outs["fedcmp-opm"])


@pytest.mark.parametrize(
    "params, field",
    [
        ({"rank": 0}, "rank"),
        ({"energy": 1.5}, "energy"),
        ({"momentum": 1.0}, "momentum"),
        ({"reliability": "some"}, "reliability"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_parameters(params, field):
    from fedsim.configtools import ConfigError

    with pytest.raises(ConfigError, match=field):
        build_algorithm("fedcmp", params)


def test_server_state_round_trips_through_safetensors(tmp_path):
    """Continuing from a saved and reloaded state gives the same bits as continuing in memory."""
    from fedsim.runio import load_weights, save_weights

    algo = build_algorithm("fedcmp", {"rank": 4, "stiefel_momentum": True})
    state, weights = algo.init_state(W0), dict(W0)
    for rnd in (1, 2):
        deltas, sizes = random_round(300 + rnd)
        res = algo.aggregate(weights, make_updates(deltas, sizes), state, rnd)
        weights, state = res.weights, res.state
    save_weights(tmp_path / "state.safetensors", state)
    reloaded = load_weights(tmp_path / "state.safetensors")
    assert set(reloaded) == set(state)
    deltas, sizes = random_round(303)
    a = algo.aggregate(weights, make_updates(deltas, sizes), state, 3)
    b = algo.aggregate(weights, make_updates(deltas, sizes), reloaded, 3)
    for k in weights:
        assert torch.equal(a.weights[k], b.weights[k])
