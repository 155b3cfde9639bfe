"""Utility against ε from ``scripts/privacy_sweep.sh``'s comparisons.

Reads ``OUT/eps-<ε>/comparison.csv`` (``fedsim compare``'s mean ± std over seeds of the final
held-out evaluation) and draws the final attribute accuracy and yes/no accuracy against ε
(log axis; ε = ∞, the run without noise, at the right edge), writing ``OUT/utility_vs_epsilon.png``
and ``OUT/utility_vs_epsilon.csv``.

    python scripts/plot_privacy_utility.py runs/privacy-utility
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

METRICS = (("attr_mean", "attribute accuracy"), ("yesno_acc", "yes/no accuracy"))


def read(out: Path, algorithm: str = "fedavg") -> list[dict[str, float]]:
    """One row per ε: ε (math.inf for eps-inf) and each metric's mean and std."""
    rows = []
    for folder in sorted(out.glob("eps-*")):
        table = folder / "comparison.csv"
        if not table.exists():
            continue
        tag = folder.name.removeprefix("eps-")
        eps = math.inf if tag == "inf" else float(tag)
        with table.open() as f:
            for r in csv.DictReader(f):
                if r["algorithm"] == algorithm:
                    rows.append(
                        {"epsilon": eps}
                        | {
                            f"{m}_{s}": float(r[f"{m}_{s}"])
                            for m, _ in METRICS
                            for s in ("mean", "std")
                        }
                    )
    return sorted(rows, key=lambda r: r["epsilon"])


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    at_inf = max(finite, default=1.0) * 4  # where ε = ∞ is drawn
    xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else at_inf for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in METRICS:
        ax.errorbar(
            xs,
            [r[f"{key}_mean"] for r in rows],
            yerr=[r[f"{key}_std"] for r in rows],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xticks(xs, [("∞" if x == at_inf else f"{x:g}") for x in xs])
    ax.set_xlabel("ε (δ = 1e-5, after the run's rounds)")
    ax.set_ylabel("final held-out score (mean ± std over seeds)")
    ax.set_title("FedAvg with client-level DP on the toy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(out: Path) -> None:
    rows = read(out)
    if not rows:
        sys.exit(f"{out}: no eps-*/comparison.csv (run scripts/privacy_sweep.sh first)")
    with (out / "utility_vs_epsilon.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "utility_vs_epsilon.png")
    print(f"wrote {out / 'utility_vs_epsilon.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/privacy-utility"))
