"""Ray worker-process setup: keep Ray Train's per-step chatter out of the driver's console.

Installed as the job's ``worker_process_setup_hook`` (:func:`fedsim.raystart.connect_ray`), so it
runs in every Ray worker process of the run before any task. Two loggers are raised to ERROR:
the one that logs every ``ray.train.report`` call at INFO ("Reporting training result N ..."),
and the placement-group cleaner's, which warns every second that the State API is unavailable
when Ray runs without its dashboard (fedsim's local default). Errors still show.

It also pins ``RAY_ADDRESS`` in the process to the run's own cluster: Ray Train's helpers
(the placement-group cleaner's State API calls) look a cluster up with ``auto``, which, when
two runs each have a local Ray on one machine, finds both and fails with "Found multiple active
Ray instances" (a ConnectionError in that helper actor). With the variable set they ask the
cluster they run in.
"""

from __future__ import annotations

import logging

QUIET = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.execution.context",
)


def quiet_ray_train() -> None:
    """Raise the chatty Ray Train loggers to ERROR in this process; pin ``RAY_ADDRESS``.

    Nothing is imported for it: a logger is configured by name before its module exists, and
    the file path that ray.train.v2's context module names its logger after is computed from
    ``ray``'s own. (Looking the modules up with ``importlib.util.find_spec`` imported
    ``ray.train`` and with it pandas in every worker process: ~90 MB and ~0.5 s each.)
    """
    import os

    import ray

    pin_ray_address()
    root = os.path.dirname(ray.__file__)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
        # ray.train.v2's context module names its logger after its file path.
        path = os.path.join(root, *name.split(".")[1:]) + ".py"
        logging.getLogger(path).setLevel(logging.ERROR)


def pin_ray_address() -> None:
    """``RAY_ADDRESS`` = the GCS address of the cluster this (connected) process runs in."""
    import os

    import ray

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
