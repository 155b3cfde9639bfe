"""PNG plots of runs: training loss and held-out toy metrics against the round."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.runio import MetricsLog, check_writable


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use: a run's driver needs
    it only for the report after the rounds (~30 MB and ~0.15 s it need not hold meanwhile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PANELS = [
    ("loss", "training loss (mean over clients)", False),
    ("attr_mean", "caption attribute accuracy (mean of 5)", True),
    ("yesno_acc", "yes/no accuracy (POPE-style)", True),
]


def distinct_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` colours that tell the lines apart: tab10 up to 10, tab20 up to 20 (a sweep of 17
    entries repeated tab10's colours: centralized and fedexp were both blue), then evenly
    spaced on turbo."""
    plt = pyplot()
    if n <= 10:
        return list(plt.get_cmap("tab10").colors[:n])
    if n <= 20:
        return list(plt.get_cmap("tab20").colors[:n])
    cmap = plt.get_cmap("turbo")
    return [cmap(i / (n - 1)) for i in range(n)]


def _plot_runs(
    run_dirs: Sequence[Path],
    out: Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One figure, three panels (loss, attribute accuracy, yes/no accuracy), a line per run."""
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"plot: {len(run_dirs)} runs but {len(labels)} labels")
    check_writable(Path(out), "--out", folder=False)  # before any drawing
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 4.0))
    colours = distinct_colours(len(run_dirs))
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        records = MetricsLog(Path(run_dir) / "metrics.jsonl").read()
        if not records:
            raise ValueError(f"plot: {run_dir}/metrics.jsonl holds no rounds")
        for ax, (key, _, is_eval) in zip(axes, PANELS):
            if is_eval:
                pts = [(r["round"], r["eval"][key]) for r in records if "eval" in r]
            else:
                pts = [(r["round"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs,
                    ys,
                    marker="o" if is_eval else None,
                    ms=4,
                    color=colours[i],
                    label=label,
                )
    for ax, (_, name, is_eval) in zip(axes, PANELS):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if is_eval:
            ax.set_ylim(0, 1.02)
    axes[-1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# pyplot keeps global state: runs finishing at once in `fedsim compare`'s lanes draw in turn.
PLOT_LOCK = threading.Lock()


def plot_runs(
    run_dirs: Sequence[Path],
    out: Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One figure, three panels (loss, attribute accuracy, yes/no accuracy), a line per run."""
    with PLOT_LOCK:
        return _plot_runs(run_dirs, out, labels, title)
