"""A child process that holds a run folder's writer lock, as a live run does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def hold(folder: Path) -> subprocess.Popen:
    """Lock ``folder`` in a child (returned once it holds it); it lets go when its stdin closes."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedsim.runio import RunLock; "
            f"lock = RunLock({str(folder)!r}, 'x'); print('held', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "held"
    return child
