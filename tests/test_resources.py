"""Ray resources and addresses: infeasible requests and unreachable clusters fail in seconds."""

from __future__ import annotations

import socket
import time

import pytest

from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.resources import check_address, infeasible

TWO_NODES = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0, "gpu_pool": 1.0}]


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["ray.worker_cpus=8"], "ray.worker_cpus: each worker asks for 8 CPU"),
        (["ray.worker_gpus=2"], "ray.worker_gpus: each worker asks for 2 GPU"),
        (["ray.worker_resources={tpu: 1}"], "ray.worker_resources.tpu: each worker"),
        (["ray.evaluator_gpus=1.5"], "ray.evaluator_gpus: each Evaluator asks for 1.5"),
        (
            ["eval.backend=vllm", "eval.vllm_gpus=2"],
            "eval.vllm_gpus: each Evaluator asks for 2 GPU",
        ),
        # Each amount exists somewhere, but not together on one node.
        (
            [
                "ray.worker_cpus=3",
                "ray.worker_resources={gpu_pool: 1}",
                "ray.workers=1",
            ],
            None,
        ),
        (["ray.worker_cpus=4", "ray.worker_gpus=1", "ray.workers=1"], None),
        # Each worker fits, but not all of them at once: the run would wait forever.
        (["ray.worker_cpus=4", "ray.worker_gpus=1"], "ray.workers: 2 workers must"),
        (["ray.workers=13"], "ray.workers: 13 workers must all run at once"),
    ],
)
def test_infeasible_names_the_field_and_what_the_nodes_have(sets, fragment):
    problem = infeasible(load_config(None, sets), TWO_NODES)
    if fragment is None:  # feasible: the largest node has all of it
        assert problem is None
    else:
        assert problem is not None and problem.startswith(fragment), problem
        assert "2 nodes, 6 CPUs, 1 GPUs" in problem


def test_a_request_split_over_two_nodes_is_infeasible():
    cfg = load_config(None, ["ray.worker_cpus=3", "ray.worker_gpus=1"])
    nodes = [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}]
    problem = infeasible(cfg, nodes)
    assert problem and problem.startswith("ray.worker_cpus=3, ray.worker_gpus=1:")


def test_defaults_fit_a_one_core_laptop():
    assert infeasible(load_config(None), [{"CPU": 1.0}]) is None


@pytest.mark.parametrize(
    "sets, nodes, fits",
    [
        # ⌊2 / 0.5⌋ + ⌊4 / 0.5⌋ = 12 workers on the two nodes, 13 do not fit.
        (["ray.workers=12"], TWO_NODES, True),
        (["ray.workers=13"], TWO_NODES, False),
        # Packing is per node: 3 × 1.5 CPU on two 2-CPU nodes is 1 + 1, not ⌊4 / 1.5⌋ = 2.
        (["ray.workers=2", "ray.worker_cpus=1.5"], [{"CPU": 2.0}, {"CPU": 2.0}], True),
        (["ray.workers=3", "ray.worker_cpus=1.5"], [{"CPU": 2.0}, {"CPU": 2.0}], False),
        # An Evaluator of its own takes its room first: 1 CPU left for 0.5-CPU workers.
        (["ray.workers=2", "ray.evaluator_cpus=1"], [{"CPU": 2.0}], True),
        (["ray.workers=3", "ray.evaluator_cpus=1"], [{"CPU": 2.0}], False),
        # Workers that ask for nothing: any number.
        (["ray.workers=500", "ray.worker_cpus=0"], [{"CPU": 1.0}], True),
    ],
)
def test_all_workers_must_fit_at_once(sets, nodes, fits):
    problem = infeasible(load_config(None, sets), nodes)
    assert (problem is None) is fits, problem
    if not fits:
        assert problem is not None and problem.startswith("ray.workers: ")


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_within_the_timeout():
    port = _closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="no Ray cluster answers within 1 s"):
            check_address(address, timeout=1.0)
        assert time.monotonic() - t0 < 10  # bounded, not Ray's minutes of retries


def test_an_address_that_answers_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"ray://127.0.0.1:{server.getsockname()[1]}", timeout=1.0)


@pytest.mark.slow
def test_infeasible_on_a_joined_cluster_fails_before_any_actor(
    tmp_path, toy_path, cache_dir, ray_session
):
    """Ray is already joined (no local pre-check): the nodes' resources are checked after
    connecting, and a custom resource no node has is a ConfigError, not an endless wait."""
    from small_runs import NO_EVAL, small_run

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"ray.worker_resources.nope: each worker"):
        small_run(tmp_path / "r", cache_dir, *NO_EVAL, "ray.worker_resources={nope: 1}")
    assert time.monotonic() - t0 < 120  # the data and backbone are prepared first
