"""The Aggregator's device: ``ray.aggregator_gpus`` is validated and checked against the nodes,
and every server half creates its tensors on the device of its inputs.

CUDA cannot run here; device-following is checked on the CPU by making every tensor that a
server half creates *without* naming a device land on the ``meta`` device
(``torch.set_default_device``): such a tensor meets the CPU inputs in an operation and raises,
or reaches the outputs and is caught below. Code that passes creates its tensors from its
inputs' device (or names the CPU for a draw and moves it), so it follows a CUDA input alike.
"""

from __future__ import annotations

import pytest
import torch

import fedsim.algorithms.fedcmp as fedcmp_module
from fedsim.aggregator import Aggregator
from fedsim.algorithms import ClientUpdate
from fedsim.algorithms.base import partial_sum
from fedsim.algorithms.registry import comparable, get_algorithm_class
from fedsim.bench import synthetic_updates
from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.resources import infeasible

WEIGHTS = {"l.weight": torch.zeros(40, 30), "l.bias": torch.zeros(40)}
CASES = [
    (name, {})
    for name in comparable()
    if name != "centralized"  # one pooled client: its own test below
] + [
    ("fedcmp", {"basis": "sketch"}),
    # The randomized range finder (forced below with _EXACT_LIMIT = 0).
    ("fedcmp", {"rank": 4, "oversample": 2}),
    ("centralized", {}),
]


def _updates(name: str, count: int) -> list[ClientUpdate]:
    return synthetic_updates(
        name, WEIGHTS, range(count), torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("name, params", CASES)
def test_server_halves_create_no_tensor_off_their_inputs_device(
    name, params, monkeypatch
):
    monkeypatch.setattr(fedcmp_module, "_EXACT_LIMIT", 0)
    ups = _updates(name, 1 if name == "centralized" else 4)
    agg = Aggregator(name, params, WEIGHTS, 10)
    agg.reset(name, params, WEIGHTS, 10, diagnostics=True)
    torch.set_default_device("meta")
    try:
        for rnd in (1, 2):  # round 2: carried state (momentum, bases, moments)
            new, _ = agg.aggregate(WEIGHTS, ups, rnd)
            if get_algorithm_class(name).presummable:
                new, _ = agg.aggregate_partials(WEIGHTS, [partial_sum(ups)], [], rnd)
        state, payload = agg.server_state(), agg.payload()
    finally:
        torch.set_default_device("cpu")
    for tree in (new, state, payload):
        off = [k for k, v in tree.items() if v.device.type != "cpu"]
        assert not off, f"{name}: tensors off the inputs' device: {off}"


@pytest.mark.parametrize("value", ["-0.5", "2"])
def test_aggregator_gpus_out_of_range_is_refused_naming_the_field(value):
    with pytest.raises(
        ConfigError, match=r"^ray\.aggregator_gpus: must be in \[0, 1\]"
    ):
        load_config(None, [f"ray.aggregator_gpus={value}"])


def test_an_aggregator_gpu_no_node_has_is_refused():
    cfg = load_config(None, ["ray.aggregator_gpus=1"])
    problem = infeasible(cfg, [{"CPU": 2.0}])
    assert problem is not None
    assert problem.startswith("ray.aggregator_gpus: each Aggregator asks for 1 GPU")
    assert "\n" not in problem
    # A GPU elsewhere does not help: the Aggregator runs on the driver's node.
    here = {"CPU": 2.0}
    problem = infeasible(cfg, [here, {"CPU": 8.0, "GPU": 1.0}], here)
    assert problem is not None and "the driver's node has" in problem
    assert infeasible(cfg, [{"CPU": 2.0, "GPU": 1.0}], {"CPU": 2.0, "GPU": 1.0}) is None
    # No GPU asked: the default needs nothing of the driver's node.
    assert infeasible(load_config(None), [{"CPU": 1.0}], {"CPU": 1.0}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_aggregator_without_cuda_fails_naming_the_field():
    with pytest.raises(RuntimeError, match="^ray.aggregator_gpus: "):
        Aggregator("fedavg", {}, WEIGHTS, 10).reset(
            "fedavg", {}, WEIGHTS, 10, device="cuda"
        )
