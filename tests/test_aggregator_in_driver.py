"""``ray.aggregator_in_driver``: the Aggregator inside the driver process gives the actor's bits.

The in-driver Aggregator saves a process (~0.4 GB on a small machine). It must not change a
run: the same server half, on the threads the actor would have (Ray gives an actor asking for
no CPU ``OMP_NUM_THREADS=1``), over copies of its inputs, as an actor receives them.
"""

from __future__ import annotations

import pytest
import torch

from fedsim.aggregator import Aggregator, InDriver, actor_threads
from fedsim.algorithms import ClientUpdate
from fedsim.bench import synthetic_updates
from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.pool import aggregator_in_driver

WEIGHTS = {"l.weight": torch.zeros(64, 48), "l.bias": torch.zeros(64)}


def _round(name: str, rnd: int) -> list[ClientUpdate]:
    # unsorted client ids: the Aggregator sorts
    return synthetic_updates(
        name, WEIGHTS, (4, 1, 7, 2), torch.Generator().manual_seed(rnd)
    )


@pytest.mark.parametrize(
    "mode, cpus, overrides, expected",
    [
        ("auto", 2, [], True),
        ("auto", 4, [], True),
        ("auto", 8, [], False),  # a big machine: an actor of its own
        ("auto", 2, ["ray.address=ray://head:10001"], False),  # a cluster
        ("auto", 2, ["ray.aggregator_gpus=1"], False),  # a GPU: an actor that holds it
        ("on", 64, [], True),
        ("off", 2, [], False),
    ],
)
def test_where_the_aggregator_lives(mode, cpus, overrides, expected):
    cfg = load_config(None, [f"ray.aggregator_in_driver={mode}", *overrides])
    assert aggregator_in_driver(cfg, cpus) is expected


def test_on_with_a_gpu_is_refused_naming_the_field():
    cfg = load_config(None, ["ray.aggregator_in_driver=on", "ray.aggregator_gpus=1"])
    with pytest.raises(ConfigError, match=r"^ray\.aggregator_in_driver: on needs"):
        aggregator_in_driver(cfg, 2)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="aggregator_in_driver"):
        load_config(None, ["ray.aggregator_in_driver=maybe"])


@pytest.mark.parametrize(
    "name, params",
    [
        ("fedadam", {}),  # server state: two moments
        ("scaffold", {}),  # client extras and control variates
        ("fedcmp", {"rank": 8}),  # basis, reliability, momentum on the basis
    ],
)
def test_in_driver_gives_the_actors_bits(ray_session, name, params, monkeypatch):
    """Three rounds through an Aggregator actor (as a run starts it: no CPU asked) and through
    InDriver, with the driver on 2 threads: the same weights, metrics and server state, bit
    for bit; the driver's inputs untouched and its thread count restored."""
    import ray

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    actor = ray.remote(num_cpus=0)(Aggregator).remote(name, params, WEIGHTS, 10)
    local = InDriver(name, params, WEIGHTS, 10)
    torch.set_num_threads(2)
    w_actor = w_local = WEIGHTS
    try:
        for h in (actor, local):
            ray.get(h.reset.remote(name, params, WEIGHTS, 10, None, "continue", True))
        for rnd in (1, 2, 3):
            ups = _round(name, rnd)
            before = [{k: v.clone() for k, v in u.delta.items()} for u in ups]
            w_actor, m_actor = ray.get(actor.aggregate.remote(w_actor, ups, rnd))
            w_local, m_local = ray.get(local.aggregate.remote(w_local, ups, rnd))
            for k in WEIGHTS:
                assert torch.equal(w_actor[k], w_local[k]), (rnd, k)
            assert m_actor == m_local
            for u, b in zip(ups, before, strict=True):
                assert all(torch.equal(u.delta[k], b[k]) for k in b)
        s_actor = ray.get(actor.server_state.remote())
        s_local = ray.get(local.server_state.remote())
        assert s_actor.keys() == s_local.keys() and s_actor
        assert all(torch.equal(s_actor[k], s_local[k]) for k in s_actor)
        assert torch.get_num_threads() == 2
    finally:
        ray.kill(actor)


def test_threads_follow_omp_num_threads_as_an_actors_do(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert actor_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert actor_threads() == 3


def test_an_error_is_the_aggregators_own_raised_at_the_call(ray_session):
    """The actor's exception comes back wrapped at ray.get; in the driver it is raised by the
    call itself, unwrapped (the driver shows a bad input's one line either way)."""
    from fedsim.algorithms.registry import AlgorithmError

    local = InDriver("fedavg", {}, WEIGHTS, 10)
    with pytest.raises(
        AlgorithmError, match="^algorithm.name: unknown algorithm 'nope'"
    ):
        local.reset.remote("nope", {}, WEIGHTS, 10)
