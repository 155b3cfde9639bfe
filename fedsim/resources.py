"""Ray resources a run asks for, checked against what the cluster has, and the cluster itself.

Ray waits forever for an actor whose resources no node has (it may be an autoscaler's job to add
one), and retries for minutes when no cluster answers at ``ray.address``. Both are bad input for
fedsim: :func:`check_feasible` compares every actor's request with the nodes (after connecting,
before any actor is created; for a local Ray, before it starts) and :func:`check_address` gives
the address a few seconds to answer. Each failure is a one-line ConfigError naming the field.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence

from fedsim.config import Config
from fedsim.configtools import ConfigError

#: Seconds a cluster address has to accept a connection.
CONNECT_TIMEOUT = 5.0

_EPS = 1e-9  # Ray stores fractional resources in units of 1e-4


def requests(cfg: Config) -> list[tuple[str, dict[str, tuple[str, float]]]]:
    """Each actor kind's request: (actor, {Ray resource: (config field, amount)})."""
    ray = cfg.ray

    def one(
        prefix: str, cpus: float, gpus: tuple[str, float], custom: Mapping[str, float]
    ):
        out = {"CPU": (f"ray.{prefix}_cpus", cpus), "GPU": gpus}
        for name, amount in custom.items():
            out[name] = (f"ray.{prefix}_resources.{name}", float(amount))
        return {k: v for k, v in out.items() if v[1] > 0}

    evaluator_gpus = (
        ("eval.vllm_gpus", cfg.eval.vllm_gpus)
        if cfg.eval.backend == "vllm"
        else ("ray.evaluator_gpus", ray.evaluator_gpus)
    )
    return [
        (
            "worker",
            one(
                "worker",
                ray.worker_cpus,
                ("ray.worker_gpus", ray.worker_gpus),
                ray.worker_resources,
            ),
        ),
        (
            "Evaluator",
            one(
                "evaluator", ray.evaluator_cpus, evaluator_gpus, ray.evaluator_resources
            ),
        ),
        (
            "Aggregator",
            one("aggregator", 0.0, ("ray.aggregator_gpus", ray.aggregator_gpus), {}),
        ),
    ]


def infeasible(
    cfg: Config,
    nodes: Sequence[Mapping[str, float]],
    here: Mapping[str, float] | None = None,
) -> str | None:
    """Why some actor of ``cfg`` fits on no node of ``nodes`` (each a node's total
    resources), or None when every actor fits on at least one node. The Aggregator runs on
    the driver's node: with ``here`` (that node's resources) only that node counts for it."""
    for actor, need in requests(cfg):
        pinned = actor == "Aggregator" and here is not None and bool(need)
        candidates = [here] if pinned and here is not None else list(nodes)
        if any(
            all(n.get(r, 0.0) + _EPS >= a for r, (_, a) in need.items())
            for n in candidates
        ):
            continue
        where = "the driver's node has" if pinned else "no node has"
        for resource, (field, amount) in need.items():
            most = max((n.get(resource, 0.0) for n in candidates), default=0.0)
            if most + _EPS < amount:
                largest = f"it has {most:g}" if pinned else f"the largest has {most:g}"
                return (
                    f"{field}: each {actor} asks for {amount:g} {resource}, but {where} "
                    f"that much ({largest}; {_describe(nodes)})"
                )
        asked = ", ".join(f"{f}={a:g}" for f, a in need.values())
        return f"{asked}: no single node has all of these for one {actor} ({_describe(nodes)})"
    return too_many_workers(cfg, nodes)


def too_many_workers(cfg: Config, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why the ``ray.workers`` BackboneWorkers do not all fit on ``nodes`` at once, or None.

    The run waits for every worker before its first round, so a worker that fits only once
    another has gone waits forever. Each node holds ⌊have / asked⌋ workers for its scarcest
    requested resource; an Evaluator with a request of its own (its own actor, alive the
    whole run) is placed first, on the first node it fits, as Ray's packing would.
    """
    need = dict(requests(cfg))
    worker = need["worker"]
    if not worker:  # asks for nothing: any number fits
        return None
    room = [dict(n) for n in nodes]
    evaluator = need["Evaluator"]
    if evaluator:
        for n in room:
            if all(n.get(r, 0.0) + _EPS >= a for r, (_, a) in evaluator.items()):
                for r, (_, a) in evaluator.items():
                    n[r] = n.get(r, 0.0) - a
                break
    fit = sum(
        min((n.get(r, 0.0) + _EPS) // a for r, (_, a) in worker.items()) for n in room
    )
    if fit >= cfg.ray.workers:
        return None
    asked = ", ".join(f"{a:g} {r}" for r, (_, a) in worker.items())
    besides = " beside the Evaluator" if evaluator else ""
    return (
        f"ray.workers: {cfg.ray.workers} workers must all run at once, each asking for "
        f"{asked}, but the nodes hold {fit:g}{besides} ({_describe(nodes)})"
    )


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs"


def check_local(cfg: Config) -> None:
    """Before a local Ray starts: it will have os.cpu_count() CPUs and no custom resources.

    GPUs are left to :func:`check_feasible` (Ray's own detection decides how many it sees).
    A Ray this process already joined (a test's cluster, ``fedsim compare``) is not started
    here: :func:`check_feasible` checks it.
    """
    import ray

    if cfg.ray.address or ray.is_initialized():
        return
    node = {"CPU": float(os.cpu_count() or 1), "GPU": float("inf")}
    problem = infeasible(cfg, [node])
    if problem:
        raise ConfigError(problem.replace("inf GPUs", "its GPUs"))


def check_feasible(cfg: Config) -> None:
    """After connecting, before any actor is created: every actor fits on some alive node."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [n.get("Resources", {}) for n in alive]
    # The Aggregator is pinned to the driver's node (fedsim.pool).
    me = ray.get_runtime_context().get_node_id()
    here = next((n.get("Resources", {}) for n in alive if n.get("NodeID") == me), None)
    problem = infeasible(cfg, nodes, here)
    if problem:
        raise ConfigError(problem)


def check_address(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """``ray.address`` answers a TCP connection within ``timeout`` seconds.

    ``auto`` is resolved the way ``ray.init`` resolves it (RAY_ADDRESS, then the newest local
    cluster); a stale address left by a killed cluster is caught here too. An open port that
    is not Ray's is beyond this check.
    """
    if not address or address == "local":
        return
    if address.startswith("ray://"):
        hostport: str | None = address[len("ray://") :]
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            hostport = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as e:
            first = (
                str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            )
            raise ConfigError(f"ray.address {address!r}: {first}") from None
        if hostport is None:
            return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        at = f" at {hostport}" if address == "auto" else ""
        raise ConfigError(
            f"ray.address {address!r}: no Ray cluster answers{at} within "
            f"{timeout:g} s ({why})"
        ) from None


def check_before_ray(cfg: Config) -> None:
    """What can be checked before Ray starts or is joined (before a run folder exists).

    A Ray this process has already joined (``fedsim compare``, a test's session) is the one
    the run will use: its nodes are checked now. An address that does not answer is an
    error either way (the config names it).
    """
    import ray

    check_address(cfg.ray.address)
    if ray.is_initialized():
        check_feasible(cfg)
    else:
        check_local(cfg)
