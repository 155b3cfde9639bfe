"""The share of the untrained → centralized gap an algorithm closes, from a `fedsim sweep` folder.

    python scripts/gap_closed.py runs/gate-toy-hard [--algorithm fedavg] [--metrics attr_mean,yesno_acc]

For every test seed s: untrained u_s (the round-0 evaluation of the algorithm's run: the initial
projector of seed s, the same for every algorithm), the algorithm's final score a_s and the tuned
centralized run's c_s; the closed share is (a_s − u_s) / (c_s − u_s). Prints a Markdown table:
one row per seed and the mean over seeds (of the scores, then the share of the means).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _scores(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(round-0 evaluation, final evaluation) of a run folder."""
    first = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("round") == 0 and "eval" in rec:
            first = rec["eval"]
            break
    if first is None:
        raise SystemExit(f"{run_dir}: no round-0 evaluation (eval.at_start was off)")
    final = json.loads((run_dir / "eval.json").read_text())["final"]
    return first, final


def closed_share(untrained: float, algorithm: float, centralized: float) -> float:
    """(a − u) / (c − u); the gap must be positive."""
    if not centralized > untrained:
        raise ValueError(
            f"centralized {centralized} does not beat untrained {untrained}"
        )
    return (algorithm - untrained) / (centralized - untrained)


def table(sweep_dir: Path, algorithm: str, metrics: list[str]) -> str:
    test = sweep_dir / "test"
    seeds = sorted(
        int(p.name.split("-")[1])
        for p in (test / algorithm).glob("seed-*")
        if p.is_dir()
    )
    if not seeds:
        raise SystemExit(f"{test / algorithm}: no finished test runs")
    rows = [
        "| seed | "
        + " | ".join(
            f"{m}: untrained / {algorithm} / centralized / closed" for m in metrics
        )
        + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    sums = {m: [0.0, 0.0, 0.0] for m in metrics}
    for s in seeds:
        u, a = _scores(test / algorithm / f"seed-{s}")
        _, c = _scores(test / "centralized" / f"seed-{s}")
        cells = []
        for m in metrics:
            sums[m][0] += u[m] / len(seeds)
            sums[m][1] += a[m] / len(seeds)
            sums[m][2] += c[m] / len(seeds)
            share = closed_share(u[m], a[m], c[m])
            cells.append(f"{u[m]:.3f} / {a[m]:.3f} / {c[m]:.3f} / {share:.1%}")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    cells = [
        f"{su:.3f} / {sa:.3f} / {sc:.3f} / {closed_share(su, sa, sc):.1%}"
        for su, sa, sc in sums.values()
    ]
    rows.append("| mean | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--algorithm", default="fedavg")
    ap.add_argument("--metrics", default="attr_mean,yesno_acc")
    args = ap.parse_args(argv)
    print(table(args.sweep_dir, args.algorithm, args.metrics.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
