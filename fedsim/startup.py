"""Start-up marks: when a run reaches each phase before its first client task.

``fedsim bench --sections startup`` (:mod:`fedsim.bench_startup`) starts ``fedsim run`` with
``FEDSIM_STARTUP_MARKS`` naming a file; every process of the run that reaches a phase appends
one line ``{"mark": name, "t": unix time, "pid": pid}`` to it. Ray's worker processes inherit
the variable from the driver (the local Ray's raylet is started from the driver's
environment), so the workers' first client task is marked by the worker itself. Without the
variable :func:`mark` does nothing. This module imports nothing heavy: it is imported first.
"""

from __future__ import annotations

import json
import os
import time

#: The environment variable naming the marks file.
MARKS_ENV = "FEDSIM_STARTUP_MARKS"

_seen: set[str] = set()


def mark(name: str, once: bool = True) -> None:
    """Append the mark ``name`` (this process, now) to the marks file, if one is named.

    ``once``: only the first call per process and name writes (e.g. the first client task).
    """
    path = os.environ.get(MARKS_ENV)
    if not path or (once and name in _seen):
        return
    _seen.add(name)
    line = json.dumps({"mark": name, "t": time.time(), "pid": os.getpid()})
    # One write of one short line in append mode: lines of concurrent processes do not mix.
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
