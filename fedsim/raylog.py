"""Ray worker-process setup: keep Ray Train's per-step chatter out of the driver's console.

Installed as the job's ``worker_process_setup_hook`` (:func:`fedsim.prepare.connect_ray`), so it
runs in every Ray worker process of the run before any task. Two loggers are raised to ERROR:
the one that logs every ``ray.train.report`` call at INFO ("Reporting training result N ..."),
and the placement-group cleaner's, which warns every second that the State API is unavailable
when Ray runs without its dashboard (fedsim's local default). Errors still show.
"""

from __future__ import annotations

import logging

QUIET = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.execution.context",
)


def quiet_ray_train() -> None:
    """Raise the chatty Ray Train loggers to ERROR in this process."""
    import importlib.util

    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
        # ray.train.v2's context module names its logger after its file path.
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(logging.ERROR)
