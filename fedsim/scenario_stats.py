"""``fedsim scenarios show``: per-client statistics of a scenario's partition, as a table and a PNG.

The partition is computed exactly as a run computes it (same config, same seed), on the scenario's
training data, without starting Ray or loading a model. Scenarios with caption transforms
(``fedsim.scenarios.silos``) also list which clients are noisy silos and each client's caption
style, and say in words what the transforms do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from fedsim.config import Config
from fedsim.prepare import check_inputs, partition, training_data
from fedsim.scenarios.silos import caption_transform, describe

DOMAIN = "background+style"  # the synthetic scenes' visual domain
#: Keys looked for in the data, in this order, for the views of a split.
VIEW_KEYS = (DOMAIN, "shape", "source", "supercategory", "dataset")
#: Values drawn and listed one by one per view; the rest are summed as "other".
TOP = 9


@dataclass
class View:
    """Rows per client over one key: the ``TOP`` most common values, then "other".

    ``counts`` holds every value (for the entropy and the number held); plots and the table
    use :meth:`top`, so their size does not grow with the number of values (2 000 web hosts
    in LCS-558K's metadata).
    """

    key: str
    values: list[str]  # by total count, most common first
    counts: np.ndarray  # [clients, values]

    def top(self, k: int = TOP) -> tuple[list[str], np.ndarray]:
        """The ``k`` most common values and, when there are more, "other" (their sum)."""
        if len(self.values) <= k + 1:
            return self.values, self.counts
        rest = self.counts[:, k:].sum(1, keepdims=True)
        names = [*self.values[:k], f"other ({len(self.values) - k})"]
        return names, np.concatenate([self.counts[:, :k], rest], axis=1)

    def entropy_bits(self) -> np.ndarray:
        """Per client: the entropy of its rows over this key's values, in bits."""
        n = self.counts.sum(1, keepdims=True)
        p = self.counts / np.maximum(n, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log2(p), 0.0).sum(1)


@dataclass
class ScenarioStats:
    """Rows per client, and their distribution over up to two keys of the data."""

    name: str
    sizes: np.ndarray  # [clients]
    views: list[View]
    #: Noisy silos (client ids) and each client's caption style, when the scenario has them.
    noisy: frozenset[int] = frozenset()
    styles: tuple[int, ...] | None = None
    #: One line per caption transform that is on (``fedsim.scenarios.silos.describe``).
    silos: tuple[str, ...] = ()


def _codes(ds, key: str) -> tuple[list[str], np.ndarray]:
    """Each row's value of ``key`` (columns joined by "+") as an integer code, vectorised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = [pc.cast(ds.data.column(c), pa.string()) for c in key.split("+")]
    joined = cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, "+")
    encoded = pc.dictionary_encode(pc.fill_null(joined, "")).combine_chunks()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(
        zero_copy_only=False
    )


def _view(ds, key: str, client_of_row: np.ndarray, k: int) -> View:
    """Counts per (client, value) in one bincount over all rows, values sorted by total."""
    values, codes = _codes(ds, key)
    v = len(values)
    kept = client_of_row >= 0
    flat = client_of_row[kept].astype(np.int64) * v + codes[kept]
    counts = np.bincount(flat, minlength=k * v).reshape(k, v)
    order = np.argsort(-counts.sum(0), kind="stable")
    return View(key, [values[i] for i in order], counts[:, order])


def view_keys(cfg: Config, columns: list[str]) -> list[str]:
    """What to count: the split's own key when the split uses one, then the first other key
    the data has. An IID split uses no label, and the data need not have one (LCS-558K)."""
    has = [k for k in VIEW_KEYS if all(c in columns for c in k.split("+"))]
    own = [cfg.scenario.label] if cfg.scenario.partition != "iid" else []
    return (own + [k for k in has if k not in own])[:2]


def scenario_stats(cfg: Config) -> ScenarioStats:
    """Partition the scenario's training data and count rows per client and view key."""
    import datasets

    check_inputs(cfg, model=False)  # the partition needs the data only
    path = training_data(cfg)
    shards = partition(cfg, path)
    ds = datasets.load_from_disk(str(path))
    client_of_row = np.full(len(ds), -1, dtype=np.int64)
    for k, rows in enumerate(shards):
        client_of_row[rows] = k
    views = [
        _view(ds, key, client_of_row, len(shards))
        for key in view_keys(cfg, ds.column_names)
    ]
    # A key with one value everywhere (one corpus's "dataset") says nothing about the split.
    views = [v for v in views if len(v.values) > 1 or v.key == cfg.scenario.label]
    sizes = np.array([len(rows) for rows in shards], dtype=np.int64)
    t = caption_transform(cfg, sizes)
    return ScenarioStats(
        cfg.scenario.name,
        sizes,
        views,
        noisy=t.noisy if t is not None else frozenset(),
        styles=t.styles if t is not None and cfg.scenario.caption_styles > 1 else None,
        silos=tuple(describe(cfg, sizes)),
    )


def stats_table(stats: ScenarioStats) -> Table:
    """One row per client: samples, then per view its top value (share), values held and
    entropy in bits (0: one value only; log2 of the values held: evenly spread)."""
    table = Table(title=f"{stats.name}: {len(stats.sizes)} clients")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for v in stats.views:
        table.add_column(f"top {v.key} (share)")
        table.add_column(f"{v.key}s held", justify="right")
        table.add_column("entropy (bits)", justify="right")
    if stats.noisy:
        table.add_column("noisy")
    if stats.styles is not None:
        table.add_column("caption style", justify="right")
    entropies = [v.entropy_bits() for v in stats.views]
    for k, n in enumerate(stats.sizes):
        cells = [str(k), str(int(n))]
        for v, h in zip(stats.views, entropies):
            c = v.counts[k]
            top = int(c.argmax())
            cells += [
                f"{v.values[top]} ({c[top] / max(n, 1):.2f})",
                str(int((c > 0).sum())),
                f"{h[k]:.2f}",
            ]
        if stats.noisy:
            cells.append("yes" if k in stats.noisy else "")
        if stats.styles is not None:
            cells.append(str(stats.styles[k]))
        table.add_row(*cells)
    return table


def plot_stats(stats: ScenarioStats, path: Path) -> Path:
    """A panel per view: stacked bars of each client's rows over the ``TOP`` most common values
    and "other", a bar per client (clients on the x axis, so any number fits one figure
    width), the legend outside the panel; beside it, each client's entropy over all values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    k = len(stats.sizes)
    x = np.arange(k)
    rows = max(len(stats.views), 1)
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(14, 3.6 * rows + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 1]},
    )
    for (ax, ax_h), view in zip(axes, stats.views):
        names, counts = view.top()
        colours = [plt.get_cmap("tab10")(j) for j in range(len(names))]
        if names[-1].startswith("other ("):
            colours[-1] = (
                0.75,
                0.75,
                0.75,
                1.0,
            )  # the tail in grey, not a tenth colour
        bottom = np.zeros(k)
        width = 0.8 if k <= 60 else 1.0  # many clients: bars touch, no gaps to hide
        for j, name in enumerate(names):
            ax.bar(
                x,
                counts[:, j],
                bottom=bottom,
                width=width,
                color=colours[j],
                label=name[:28],
                linewidth=0,
            )
            bottom += counts[:, j]
        ax.set_title(f"rows per client by {view.key} ({len(view.values)} values)")
        ax.set_xlabel("client")
        ax.set_ylabel("training rows")
        ax.set_xlim(-0.5, k - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(
            fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False
        )
        ax.grid(axis="y", alpha=0.3)
        ax_h.hist(view.entropy_bits(), bins=min(30, max(k, 1)), color="tab:blue")
        ax_h.axvline(
            np.log2(max(len(view.values), 1)),
            color="grey",
            ls="--",
            lw=1,
            label="all values equally",
        )
        ax_h.set_title(f"entropy per client over {view.key}", fontsize=9)
        ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_h.set_xlabel("bits")
        ax_h.set_ylabel("clients")
        ax_h.legend(fontsize=7, frameon=False)
    if not stats.views:
        axes[0][0].bar(x, stats.sizes, color="tab:blue")
        axes[0][0].set_title("rows per client")
    title = f"{stats.name}: partition of {int(stats.sizes.sum())} rows over {k} clients"
    if stats.noisy:
        title += f"; {len(stats.noisy)} noisy silos"
    if stats.styles is not None:
        title += f"; {max(stats.styles) + 1} caption styles"
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
