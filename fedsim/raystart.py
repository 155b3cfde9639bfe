"""Starting or joining Ray, and stopping a run on SIGTERM as on Ctrl-C.

:func:`connect_ray` starts a private local Ray (loopback only, :func:`loopback_only`) or joins the
cluster ``ray.address`` names; it runs after every check of a run's inputs (bad input never
starts Ray). :func:`sigterm_as_interrupt` makes SIGTERM stop a run the way Ctrl-C does once Ray
is up; :func:`joined_ray` is both for a block, with the shutdown of a Ray it started. This
module imports nothing heavy (Ray and the config only).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType

from fedsim.config import Config
from fedsim.configtools import ConfigError

__all__ = ["connect_ray", "joined_ray", "loopback_only", "sigterm_as_interrupt"]


def connect_ray(cfg: Config) -> bool:
    """Start or join Ray; returns True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    # Every worker process of the run first quiets Ray Train's per-report chatter.
    env = {"worker_process_setup_hook": "fedsim.raylog.quiet_ray_train"}
    if cfg.ray.address:
        try:
            ray.init(
                address=cfg.ray.address,
                logging_level=logging.WARNING,
                log_to_driver=True,
                runtime_env=env,
            )
        except ConnectionError as e:
            # Something accepted the connection (resources.check_address) but is not a
            # Ray cluster; Ray gives up after its own bounded retries (about 20 s).
            raise ConfigError(f"ray.address {cfg.ray.address!r}: {e}") from None
    else:
        # A private local cluster: "local", never RAY_ADDRESS or Ray's current-cluster file
        # (joining a cluster is only ever explicit), and on loopback (see loopback_only).
        with loopback_only():
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=cfg.ray.dashboard,
                dashboard_host=cfg.ray.dashboard_host,
                logging_level=logging.ERROR,
                log_to_driver=True,
                runtime_env=env,
                # No idle workers started ahead for this driver: fedsim's actors ask for
                # the job's runtime env and start their own processes (Ray's prestarted ones
                # sat idle, ~80 MB each, one per CPU).
                _system_config={"prestart_worker_first_driver": False},
            )
    return True


# Ray 2.60 switch for its single-machine mode (the macOS / Windows default).
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_only() -> Iterator[None]:
    """Let the local Ray bind its servers to 127.0.0.1 instead of the machine's address.

    Ray binds GCS, the raylet, every worker's gRPC server and its agents to the node IP, which
    on Linux is the outward address (or all interfaces). In its single-machine mode the node IP
    is 127.0.0.1, and every one of them binds there (``ss -ltnp`` during a run;
    docs/explanation/safe-defaults.md). The driver reads the switch at import time (``ray_constants``), the processes
    Ray starts read it from the environment: both are set for the length of ``ray.init`` only.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_SINGLE_MACHINE)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = saved_env


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a scheduler's preemption, `timeout`, `kill`) stops the run as Ctrl-C does:
    # it unwinds, stops the actors and Ray, and says how to go on.
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt on the main thread (a no-op on any
    other thread); the previous handler is restored on leaving.

    Enter it after ``ray.init``: Ray's core worker, created there, installs a C++ failure
    handler for SIGTERM that aborts the process (exit 134, a stack dump, nothing unwound, no
    word on how to go on); a Python handler installed after it replaces it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        yield
    finally:
        # None: the handler before was installed outside Python (nothing to restore).
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def joined_ray(cfg: Config) -> Iterator[bool]:
    """:func:`connect_ray` for the length of the block (yields whether it started Ray). A Ray
    started here is shut down on leaving, and meanwhile SIGTERM stops the block as Ctrl-C does
    (:func:`sigterm_as_interrupt`); a Ray joined (already running) is left as it is."""
    started = connect_ray(cfg)
    try:
        with sigterm_as_interrupt() if started else nullcontext():
            yield started
    finally:
        if started:
            import ray

            ray.shutdown()
