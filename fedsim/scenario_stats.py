"""``fedsim scenarios show``: per-client statistics of a scenario's partition, as a table and a PNG.

The partition is computed exactly as a run computes it (same config, same seed), on the scenario's
training data, without starting Ray or loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from fedsim.config import Config

DOMAIN = "background+style"  # the synthetic scenes' visual domain


@dataclass
class ScenarioStats:
    """Rows per client and their distribution over ``label`` and over a second key ``other``."""

    name: str
    label: str
    other: str
    label_values: list[str]
    label_counts: np.ndarray  # [clients, label values]
    domain_values: list[str]
    domain_counts: np.ndarray  # [clients, domains]

    @property
    def sizes(self) -> np.ndarray:
        return self.label_counts.sum(1)


def _counts(keys: np.ndarray, shards: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
    values = sorted(set(keys.tolist()))
    index = {v: i for i, v in enumerate(values)}
    out = np.zeros((len(shards), len(values)), dtype=np.int64)
    for k, rows in enumerate(shards):
        ids, n = np.unique([index[v] for v in keys[rows]], return_counts=True)
        out[k, ids] = n
    return values, out


def scenario_stats(cfg: Config) -> ScenarioStats:
    """Partition the scenario's training data and count rows per client, label and domain."""
    import datasets

    from fedsim.driver import check_inputs, partition, training_data

    check_inputs(cfg)
    path = training_data(cfg)
    shards = partition(cfg, path)
    ds = datasets.load_from_disk(str(path))

    def keys(columns: list[str]) -> np.ndarray:
        cols = [ds.data.column(c).to_pylist() for c in columns]
        return np.array(["+".join(map(str, v)) for v in zip(*cols)])

    label_values, label_counts = _counts(keys(cfg.scenario.label.split("+")), shards)
    # The second view: the first of these keys the data has that the scenario does not split by.
    other = next(
        (
            key
            for key in (DOMAIN, "shape", "source", "supercategory", "dataset")
            if key != cfg.scenario.label
            and all(c in ds.column_names for c in key.split("+"))
        ),
        cfg.scenario.label,
    )
    domain_values, domain_counts = _counts(keys(other.split("+")), shards)
    return ScenarioStats(
        cfg.scenario.name,
        cfg.scenario.label,
        other,
        label_values,
        label_counts,
        domain_values,
        domain_counts,
    )


def stats_table(stats: ScenarioStats) -> Table:
    """One row per client: samples, share of its most common label, labels held, domains held."""
    table = Table(title=f"{stats.name}: {len(stats.sizes)} clients")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    table.add_column(f"top {stats.label} (share)")
    table.add_column(f"{stats.label} values held", justify="right")
    table.add_column(f"top {stats.other} (share)")
    table.add_column(f"{stats.other} values held", justify="right")
    for k, n in enumerate(stats.sizes):
        lc, dc = stats.label_counts[k], stats.domain_counts[k]
        table.add_row(
            str(k),
            str(int(n)),
            f"{stats.label_values[int(lc.argmax())]} ({lc.max() / n:.2f})",
            str(int((lc > 0).sum())),
            f"{stats.domain_values[int(dc.argmax())]} ({dc.max() / n:.2f})",
            str(int((dc > 0).sum())),
        )
    return table


def plot_stats(stats: ScenarioStats, path: Path) -> Path:
    """Two panels of stacked bars, a bar per client: rows by label value, rows by domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(stats.sizes)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.28 * k + 2.2), sharey=True)
    panels = [
        (stats.label_values, stats.label_counts, stats.label),
        (stats.domain_values, stats.domain_counts, stats.other),
    ]
    for ax, (values, counts, what) in zip(axes, panels):
        cmap = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
        left = np.zeros(k)
        for j, v in enumerate(values):
            ax.barh(
                np.arange(k), counts[:, j], left=left, color=cmap(j % cmap.N), label=v
            )
            left += counts[:, j]
        ax.set_xlabel("training rows")
        ax.set_title(f"rows per client by {what}")
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(values) > 6 else 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_ylabel("client")
    axes[0].set_yticks(np.arange(k))
    axes[0].invert_yaxis()
    fig.suptitle(f"{stats.name}: partition of {int(stats.sizes.sum())} rows")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
