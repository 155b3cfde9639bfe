"""The Ray worker-process setup hook quiets Ray Train's loggers without importing anything."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_setup_hook_quiets_ray_train_without_importing_it():
    """It runs in every Ray worker before any task: importing ray.train there (and pandas with
    it) cost each worker ~90 MB and ~0.5 s. The loggers it sets are the ones the modules use:
    by module name, and by file path for the context module (``logging.getLogger(__file__)``)."""
    code = textwrap.dedent(
        """
        import importlib.util, logging, sys
        from fedsim.raylog import QUIET, quiet_ray_train
        quiet_ray_train()
        loaded = [m for m in ("ray.train", "pandas") if m in sys.modules]
        assert not loaded, loaded
        for name in QUIET:
            assert logging.getLogger(name).level == logging.ERROR
            origin = importlib.util.find_spec(name).origin  # imports ray.train: checked last
            assert logging.getLogger(origin).level == logging.ERROR, origin
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
