"""Silo heterogeneity in the text itself: low-quality silos and caption styles ("hard twins").

Partitions (:mod:`fedsim.scenarios.partition`) decide which scenes a client holds; these two
per-client transforms decide what its captions say, so that silos pull the projector towards
conflicting objectives rather than only towards different labels:

* **noisy silos** (``scenario.noisy_clients``, ``scenario.caption_noise``): a seeded set of
  clients of which each row, with probability ``caption_noise``, trains on a wrong but
  well-formed caption (every attribute redrawn to another value) and on the flipped yes/no
  answer: symmetric label noise, confined to some silos.
* **caption styles** (``scenario.caption_styles``): each client writes its captions in one of the
  word orders of :data:`fedsim.data.synthetic.CAPTION_STYLES` (style 0: the canonical caption the
  frozen toy LM was pre-trained on).

The worker applies them where it reads a client's training rows (``fedsim.training``), keyed by
(seed, client, row) only: so evaluation and the held-out scenes stay canonical, a row reads the
same whichever worker, round or cohort reads it, and the centralized run, which pools the shards,
transforms each row as the client that owns it does. Off (the defaults) nothing is drawn and the
rows are the dataset's own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.data.synthetic import (
    CAPTION_ATTRIBUTES,
    COLOURS,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneSpec,
    caption_text,
)

if TYPE_CHECKING:
    from fedsim.config import Config

NOISY_STREAM = 7008  # generator purpose id: which clients are noisy silos
NOISE_STREAM = 7009  # generator purpose id: per-row noise (whether; wrong values)
STYLE_STREAM = 7010  # generator purpose id: per-client caption style

#: Every value an attribute can take (the fallback when the scene spec allows only one).
_ALL_VALUES: dict[str, tuple[Any, ...]] = {
    "count": tuple(COUNT_WORDS),
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
}
_FLIP = {"yes": "no", "no": "yes"}


def size_order(sizes: Sequence[int], seed: int, stream: int) -> np.ndarray:
    """Client ids by size, largest first; clients of equal size in an order keyed by ``seed``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    tie = np.random.default_rng([seed, stream]).permutation(len(sizes))
    return np.lexsort((tie, -sizes))


def noisy_set(sizes: Sequence[int], share: float, seed: int) -> frozenset[int]:
    """The noisy silos: m = round(share · K) clients, one from each of m size bands.

    The clients, largest first (:func:`size_order`), are cut into m contiguous bands of K/m
    (``np.array_split``). Band by band, the noisy member is the one that brings the noisy
    silos' rows so far closest to the sum of the bands' mean sizes so far (the first such
    member in the seeded order). So the count is exact (realised share off by ≤ 1/(2K)), and
    the noisy rows stay within half the largest gap between neighbouring sizes in a band of
    Σ_b mean(band b) ≈ share × rows (proof: tests/test_hard_twin.py). Drawing the set
    uniformly instead made its row share depend on whether a large client was drawn: under
    power-law sizes 14–44 % of rows across five seeds for share 0.2.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    m = int(np.floor(share * len(sizes) + 0.5))
    if m == 0:
        return frozenset()
    chosen: list[int] = []
    error = 0.0  # noisy rows so far − Σ band means so far
    for band in np.array_split(size_order(sizes, seed, NOISY_STREAM), m):
        s = sizes[band].astype(np.float64)
        after = np.abs(error + s - s.mean())
        pick = int(np.argmin(after))  # first minimum: the seeded order breaks ties
        error += s[pick] - s.mean()
        chosen.append(int(band[pick]))
    return frozenset(chosen)


def client_styles(sizes: Sequence[int], styles: int, seed: int) -> tuple[int, ...]:
    """Each client's caption style, balanced by rows: largest client first, each to the style
    holding the fewest rows so far (lowest style id on a tie).

    Greedy list scheduling: at the end any two styles' rows differ by at most the size of the
    last client given to the fuller one (proof: tests/test_hard_twin.py), so under power-law
    sizes every style holds ≈ 1/styles of the rows, and the largest client writes style 0 (the
    canonical caption) on every seed. Equal sizes: styles dealt round-robin over the seeded
    order, ⌊K / styles⌋ or ⌈K / styles⌉ clients each. Dealing by client count instead gave
    style 0 14–52 % of the rows across five seeds of toy-hard.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    out = np.zeros(len(sizes), dtype=np.int64)
    if styles <= 1:
        return tuple(int(s) for s in out)
    load = np.zeros(styles, dtype=np.int64)
    for k in size_order(sizes, seed, STYLE_STREAM):
        s = int(np.argmin(load))
        out[k] = s
        load[s] += sizes[k]
    return tuple(int(s) for s in out)


def wrong_attributes(
    truth: dict[str, Any], values: dict[str, tuple[Any, ...]], rng: np.random.Generator
) -> dict[str, Any]:
    """Every attribute of ``truth`` redrawn uniformly among ``values`` other than the true one.

    An attribute whose allowed values leave no other (a scene spec with one size, say) is
    redrawn among all the scene vocabulary's values instead, so the caption is still wrong in
    every attribute and still well formed.
    """
    out = {}
    for name in CAPTION_ATTRIBUTES:
        others = [v for v in values[name] if v != truth[name]]
        if not others:
            others = [v for v in _ALL_VALUES[name] if v != truth[name]]
        out[name] = others[int(rng.integers(len(others)))]
    return out


@dataclass(frozen=True)
class CaptionTransform:
    """The scenario's caption transforms, as the workers apply them (sent with the settings).

    Attributes
    ----------
    seed:
        The run's seed (with client and row, the key of every draw).
    noisy:
        Client ids of the noisy silos.
    caption_noise:
        Probability that a noisy silo's row is corrupted.
    styles:
        Caption style of each client (index: client id).
    values:
        Attribute values wrong captions are drawn from (the scene spec's).
    """

    seed: int
    noisy: frozenset[int]
    caption_noise: float
    styles: tuple[int, ...]
    values: dict[str, tuple[Any, ...]]

    def _noise(self, client: int, row: int) -> np.random.Generator | None:
        """The row's generator after a draw that made it noisy, or None (the row stays right).

        One generator per (seed, client, row): its first uniform decides, its next draws pick
        the wrong attributes, so a row's fate does not depend on the rows read with it.
        """
        if client not in self.noisy or self.caption_noise <= 0:
            return None
        rng = np.random.default_rng([self.seed, NOISE_STREAM, client, row])
        return rng if rng.random() < self.caption_noise else None

    def is_noisy(self, client: int, row: int) -> bool:
        """Whether ``client`` trains on a wrong caption and answer for dataset row ``row``."""
        return self._noise(client, row) is not None

    def wrong(
        self, client: int, row: int, truth: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The attributes ``client``'s wrong caption of ``row`` names, or None if not noisy."""
        rng = self._noise(client, row)
        return None if rng is None else wrong_attributes(truth, self.values, rng)

    def apply(
        self,
        data: dict[str, list[Any]],
        rows: Sequence[int] | np.ndarray,
        owners: Sequence[int] | np.ndarray,
    ) -> dict[str, list[Any]]:
        """The text columns of ``rows`` (dataset ids) as their ``owners`` train on them.

        ``data`` holds the rows' columns (``caption``, ``answer`` and the attribute columns);
        a new mapping is returned in which only changed cells differ. A row that is neither
        noisy nor styled keeps its caption and answer objects as read.
        """
        captions = list(data["caption"])
        answers = list(data["answer"])
        changed = False
        for i, (row, owner) in enumerate(zip(rows, owners)):
            client, style = int(owner), self.styles[int(owner)]
            rng = self._noise(client, int(row))
            if rng is None and style == 0:
                continue
            truth = {a: data[a][i] for a in CAPTION_ATTRIBUTES}
            attrs = truth if rng is None else wrong_attributes(truth, self.values, rng)
            captions[i] = caption_text(**attrs, style=style)
            if rng is not None:
                answers[i] = _FLIP[answers[i]]
            changed = True
        if not changed:
            return data
        return {**data, "caption": captions, "answer": answers}


def caption_transform(cfg: Config, sizes: Sequence[int]) -> CaptionTransform | None:
    """The run's :class:`CaptionTransform` for clients of ``sizes`` rows, or None when both
    transforms are off.

    Off means no noisy row can occur (``noisy_clients`` or ``caption_noise`` is 0, or the share
    rounds to no client) and one style: then training reads the dataset's rows untouched.
    """
    sc = cfg.scenario
    if len(sizes) != sc.num_clients:
        raise ValueError(f"{len(sizes)} client sizes for {sc.num_clients} clients")
    noisy = noisy_set(sizes, sc.noisy_clients, cfg.seed)
    if sc.caption_noise <= 0:
        noisy = frozenset()
    if not noisy and sc.caption_styles <= 1:
        return None
    spec: SceneSpec = cfg.data.scene
    values = {
        "count": tuple(spec.counts),
        "size": tuple(spec.sizes),
        "colour": tuple(spec.colours),
        "shape": tuple(spec.shapes),
        "position": tuple(spec.positions),
    }
    return CaptionTransform(
        seed=cfg.seed,
        noisy=noisy,
        caption_noise=sc.caption_noise,
        styles=client_styles(sizes, sc.caption_styles, cfg.seed),
        values=values,
    )


def row_owners(shards: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """The client holding each dataset row (−1: none), for the pooled (centralized) stream."""
    owner = np.full(num_rows, -1, dtype=np.int64)
    for k, rows in enumerate(shards):
        owner[rows] = k
    return owner


def _example(style: int) -> str:
    """The README's example caption in caption style ``style``."""
    return caption_text(
        count=2,
        size="small",
        colour="red",
        shape="triangle",
        position="top left",
        style=style,
    )


def describe(cfg: Config, sizes: Sequence[int]) -> list[str]:
    """One line per transform that is on, for ``fedsim scenarios show`` and summary.md."""
    sc = cfg.scenario
    t = caption_transform(cfg, sizes)
    if t is None:
        return []
    sizes = np.asarray(sizes, dtype=np.int64)
    total = max(int(sizes.sum()), 1)
    lines = []
    if t.noisy:
        rows = int(sizes[sorted(t.noisy)].sum())
        lines.append(
            f"noisy silos: {len(t.noisy)} of {sc.num_clients} clients "
            f"(scenario.noisy_clients {sc.noisy_clients:g}) holding {rows / total:.1%} of the "
            f"rows; each of their rows, with probability {sc.caption_noise:g} "
            "(scenario.caption_noise), trains on a wrong caption (count, size, colour, shape "
            "and position all redrawn) and the flipped yes/no answer"
        )
    if sc.caption_styles > 1:
        of = np.asarray(t.styles)
        per = np.bincount(of, minlength=sc.caption_styles)
        rows_per = np.bincount(of, weights=sizes, minlength=sc.caption_styles)
        styles = "; ".join(
            f"{s}: {_example(s)!r} ({int(per[s])} clients, {rows_per[s] / total:.1%} of rows)"
            for s in range(sc.caption_styles)
        )
        lines.append(
            f"caption styles: {sc.caption_styles} (scenario.caption_styles), style 0 "
            f"canonical: {styles}"
        )
    return lines
