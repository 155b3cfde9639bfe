"""Peak memory of a run against the number of logical clients (same cohort, rounds and samples).

Runs ``fedsim run`` once per client count, each in its own process with its own local Ray, reads
the peak resident memory each fedsim process reports (driver, workers, aggregator, evaluator) and
prints a table with the ratio to the smallest count. Writes the numbers as JSON.

    .venv/bin/python benchmarks/memory_vs_clients.py --clients 20,200 --out runs/bench-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--clients", default="20,200", help="comma-separated logical client counts"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="extra config overrides"
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    results: dict[int, dict[str, float]] = {}
    for n in counts:
        run_dir = args.out / f"clients-{n}"
        sets = [
            f"scenario.num_clients={n}",
            f"rounds={args.rounds}",
            "eval_every=0",
            "eval.at_start=false",
            *args.sets,
        ]
        cmd = [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--no-progress",
            "--out",
            str(run_dir),
        ]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[n] = json.loads((run_dir / "resources.json").read_text())["peak_rss_mb"]
    base = sum(results[counts[0]].values())
    table = Table(title="peak resident memory (MiB) against logical clients")
    roles = list(results[counts[0]])
    for col in ["clients", *roles, "total", f"ratio to {counts[0]}"]:
        table.add_column(col, justify="right")
    for n in counts:
        total = sum(results[n].values())
        table.add_row(
            str(n),
            *[f"{results[n][r]:.0f}" for r in roles],
            f"{total:.0f}",
            f"{total / base:.3f}",
        )
    Console().print(table)
    (args.out / "memory.json").write_text(
        json.dumps({str(k): v for k, v in results.items()}, indent=2)
    )


if __name__ == "__main__":
    main()
