"""The small run the Ray integration tests start from: 2 rounds on 2 000 scenes, 4 of 20 clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SMALL = [
    "data.num_scenes=2000",
    "data.eval_scenes=40",
    "rounds=2",
    "train.local_steps=2",
    "train.batch_size=4",
    "scenario.num_clients=20",
    "scenario.cohort_size=4",
]
#: No evaluation between rounds and no toy suite: for tests about training only.
NO_EVAL = ["eval_every=0", "eval.benchmarks=[]"]


def small_run(out: Path, cache_dir: Path, *extra: str) -> Any:
    """``fedsim.driver.run`` of SMALL + ``extra`` into ``out`` (quiet, no progress)."""
    from rich.console import Console

    from fedsim.config import load_config
    from fedsim.driver import run
    from fedsim.records import check_record
    from fedsim.runio import MetricsLog

    cfg = load_config(None, [*SMALL, f"cache_dir={cache_dir}", *extra])
    result = run(cfg, out, console=Console(quiet=True), show_progress=False)
    # Every line the run wrote keeps the one record schema (fedsim.records).
    for i, record in enumerate(MetricsLog(Path(out) / "metrics.jsonl").read()):
        check_record(record, f"{out}/metrics.jsonl line {i + 1}")
    return result


def cli_run_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The ``fedsim run`` command line (a new interpreter) of SMALL + ``extra`` into ``out``."""
    import sys

    args = [
        sys.executable,
        "-m",
        "fedsim.cli",
        "run",
        "--no-progress",
        "--out",
        str(out),
    ]
    for s in [*SMALL, f"cache_dir={cache_dir}", *extra]:
        args += ["--set", s]
    return args
