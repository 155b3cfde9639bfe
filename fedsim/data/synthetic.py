"""Synthetic scenes: the embedded default data of fedsim.

Each scene is a small RGB image holding one kind of object (a shape with a colour and a size) drawn
``count`` times in one cell of a 2 × 2 grid, over a background. Every scene comes with a caption
("two small red triangles at the top left") and a POPE-style yes/no question ("is there a red
triangle ?" → "yes"/"no", balanced). Backgrounds (plain, noise, gradient) and rendering styles
(filled, outline; colour jitter) are drawn from per-client mixtures, so scenarios can give clients
different visual domains.

Scene ``i`` of stream ``stream`` depends only on ``(seed, stream, i)``: a private NumPy generator is
keyed by that triple, so a dataset can be generated in any number of chunks or processes and gives
the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
# RGB in [0, 255]; chosen to stay distinct under jitter and against the dark backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 200, 70),
    "blue": (60, 100, 240),
    "yellow": (235, 220, 50),
    "purple": (165, 70, 215),
    "orange": (245, 140, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
# Context words used in the LM's in-context pre-training ("one" instead of the article "a").
COUNT_CONTEXT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")
STYLES: tuple[str, ...] = ("filled", "outline")
# POPE-style question kinds: about the shape ("is there a circle ?"), the colour ("is there a red
# object ?"), or both ("is there a red circle ?").
QUESTION_KINDS: tuple[str, ...] = ("shape", "colour", "both")

# Caption styles (``scenario.caption_styles``, see fedsim.scenarios.silos): word orders of the
# same caption. Slots: {count} ("a", "two"...), {size}, {colour}, {noun} (singular for a count of
# one, plural otherwise) and {position} ("top left"...). Style 0 is ``Scene.caption``. Each style
# holds every slot once plus "at the", so a styled caption has exactly the canonical caption's
# words, only reordered: every word is in the toy tokenizer and the token count is unchanged
# (fedsim.cost's predicted costs hold for styled rows too).
CAPTION_STYLES: tuple[str, ...] = (
    "{count} {size} {colour} {noun} at the {position}",  # two small red triangles at the top left
    "at the {position} {count} {size} {colour} {noun}",  # at the top left two small red triangles
    "{count} {colour} {size} {noun} at the {position}",  # two red small triangles at the top left
    "at the {position} {count} {colour} {size} {noun}",  # at the top left two red small triangles
)
#: The attributes a caption names, in the order the noise transform redraws them.
CAPTION_ATTRIBUTES: tuple[str, ...] = ("count", "size", "colour", "shape", "position")

# Object radius in pixels at image size 32, for one object; groups are drawn smaller to fit a cell.
_RADIUS_32 = {"small": 3.0, "large": 5.2}
_GROUP_SCALE = {1: 1.0, 2: 0.68, 3: 0.55, 4: 0.55}
_SUPERSAMPLE = 3


@dataclass(frozen=True, kw_only=True)
class SceneSpec:
    """What scenes may contain and how they are drawn.

    Attributes
    ----------
    image_size:
        Side of the square image in pixels (a multiple of 2).
    shapes, colours, sizes, positions, counts:
        The attribute values scenes are drawn from, uniformly.
    backgrounds, styles:
        The visual domain: background kinds and rendering styles drawn uniformly per scene.
    question_kinds:
        Kinds of yes/no question drawn uniformly per scene (see ``QUESTION_KINDS``).
    colour_jitter:
        Standard deviation of a per-scene multiplicative jitter of the object colour.
    """

    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    counts: tuple[int, ...] = (1, 2)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    styles: tuple[str, ...] = ("filled",)
    question_kinds: tuple[str, ...] = QUESTION_KINDS
    colour_jitter: float = 0.08

    def __post_init__(self) -> None:
        checks: list[tuple[str, Sequence[object], Sequence[object]]] = [
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, tuple(COLOURS)),
            ("sizes", self.sizes, SIZES),
            ("positions", self.positions, POSITIONS),
            ("counts", self.counts, tuple(COUNT_WORDS)),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
            ("styles", self.styles, STYLES),
            ("question_kinds", self.question_kinds, QUESTION_KINDS),
        ]
        for name, values, allowed in checks:
            if not values:
                raise ValueError(f"scene spec: {name} must not be empty")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(
                    f"scene spec: {name} has unknown value {bad[0]!r} (allowed: {list(allowed)})"
                )
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(
                f"scene spec: image_size must be an even number >= 16, got {self.image_size}"
            )
        if not 0.0 <= self.colour_jitter <= 0.5:
            raise ValueError(
                f"scene spec: colour_jitter must be in [0, 0.5], got {self.colour_jitter}"
            )


@dataclass(frozen=True)
class Scene:
    """The attributes of one scene; ``render`` draws it, ``caption``/``question`` describe it."""

    scene_id: int
    shape: str
    colour: str
    size: str
    position: str
    count: int
    background: str
    style: str
    # Drawing parameters (sampled with the attributes so that the scene is fully determined).
    centres: tuple[tuple[float, float], ...] = field(repr=False)
    rgb: tuple[float, float, float] = field(repr=False)
    bg_params: tuple[float, ...] = field(repr=False)
    question_kind: str = "both"
    question_colour: str = ""
    question_shape: str = ""

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} at the {self.position}"

    @property
    def question(self) -> str:
        if self.question_kind == "shape":
            return f"is there a {self.question_shape} ?"
        if self.question_kind == "colour":
            return f"is there a {self.question_colour} object ?"
        return f"is there a {self.question_colour} {self.question_shape} ?"

    @property
    def answer(self) -> str:
        colour_ok = self.question_kind == "shape" or self.question_colour == self.colour
        shape_ok = self.question_kind == "colour" or self.question_shape == self.shape
        return "yes" if colour_ok and shape_ok else "no"

    def context_words(self, rng: np.random.Generator) -> list[str]:
        """The scene's attribute words, shuffled: the text stand-in for an image."""
        words = [COUNT_CONTEXT_WORDS[self.count], self.size, self.colour, self.shape]
        words += self.position.split()
        rng.shuffle(words)
        return words


def caption_text(
    *, count: int, size: str, colour: str, shape: str, position: str, style: int = 0
) -> str:
    """The caption of these attributes in caption style ``style`` (style 0: ``Scene.caption``)."""
    noun = shape if count == 1 else PLURALS[shape]
    return CAPTION_STYLES[style].format(
        count=COUNT_WORDS[count], size=size, colour=colour, noun=noun, position=position
    )


def read_caption(text: str, style: int = 0) -> dict[str, object] | None:
    """The attributes of a well-formed caption of style ``style``, or None.

    The strict inverse of :func:`caption_text`: every word must sit in its slot of the style's
    template, each attribute word must be one of the scene vocabulary's, and the noun must
    agree with the count (singular for "a", plural otherwise). Unlike
    ``fedsim.eval.toy.parse_caption`` (lenient, for generated text) it accepts nothing else.
    """
    slots = CAPTION_STYLES[style].replace("{position}", "{pos1} {pos2}").split()
    words = text.split(" ")
    if len(words) != len(slots):
        return None
    got: dict[str, str] = {}
    for slot, word in zip(slots, words):
        if slot.startswith("{"):
            got[slot[1:-1]] = word
        elif word != slot:
            return None
    count = {w: n for n, w in COUNT_WORDS.items()}.get(got["count"])
    position = f"{got['pos1']} {got['pos2']}"
    singular = {p: s for s, p in PLURALS.items()}
    if count is None or position not in POSITIONS:
        return None
    if got["size"] not in SIZES or got["colour"] not in COLOURS:
        return None
    shape = got["noun"] if count == 1 else singular.get(got["noun"])
    if shape not in SHAPES:
        return None
    return {
        "count": count,
        "size": got["size"],
        "colour": got["colour"],
        "shape": shape,
        "position": position,
    }


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The private generator of scene ``index`` in ``stream`` (keyed, order-independent)."""
    return np.random.default_rng([seed, stream, index])


def sample_scene(spec: SceneSpec, seed: int, stream: int, index: int) -> Scene:
    """Draw scene ``index`` of ``stream``: attributes, placement, colour and the question."""
    rng = scene_rng(seed, stream, index)
    shape = spec.shapes[rng.integers(len(spec.shapes))]
    colour = spec.colours[rng.integers(len(spec.colours))]
    size = spec.sizes[rng.integers(len(spec.sizes))]
    position = spec.positions[rng.integers(len(spec.positions))]
    count = int(spec.counts[rng.integers(len(spec.counts))])
    background = spec.backgrounds[rng.integers(len(spec.backgrounds))]
    style = spec.styles[rng.integers(len(spec.styles))]

    s = spec.image_size
    half = s / 2
    radius = _RADIUS_32[size] * s / 32 * _GROUP_SCALE[count]
    row = 0 if position.startswith("top") else 1
    col = 0 if position.endswith("left") else 1
    x0, y0 = col * half, row * half
    if count == 1:
        slack = max(half / 2 - radius - 1.0, 0.0)
        centres = [
            (
                x0 + half / 2 + rng.uniform(-slack, slack),
                y0 + half / 2 + rng.uniform(-slack, slack),
            )
        ]
    else:
        # Objects go to distinct quarter-cells of the cell, each jittered inside its quarter.
        quarter = half / 2
        slots = rng.permutation(4)[:count]
        slack = max(quarter / 2 - radius - 0.3, 0.0)
        centres = [
            (
                x0 + (slot % 2 + 0.5) * quarter + rng.uniform(-slack, slack),
                y0 + (slot // 2 + 0.5) * quarter + rng.uniform(-slack, slack),
            )
            for slot in sorted(slots.tolist())
        ]
    base = np.asarray(COLOURS[colour], dtype=np.float64) / 255.0
    jitter = 1.0 + spec.colour_jitter * rng.standard_normal(3)
    rgb = tuple(np.clip(base * jitter, 0.0, 1.0).tolist())
    # Background parameters: dark levels so every colour keeps its contrast.
    bg_params = tuple(rng.uniform(0.0, 0.3, size=2).tolist()) + (
        float(rng.uniform(0, math.pi * 2)),
    )

    # Balanced POPE-style question: half true; the false half changes what the question asks
    # about (for "both", the colour or the shape).
    kind = spec.question_kinds[rng.integers(len(spec.question_kinds))]
    q_colour, q_shape = colour, shape
    if rng.random() < 0.5:
        change_colour = kind == "colour" or (kind == "both" and rng.random() < 0.5)
        if (change_colour and len(spec.colours) > 1) or len(spec.shapes) == 1:
            others = [c for c in spec.colours if c != colour]
            q_colour = others[rng.integers(len(others))]
        else:
            others = [c for c in spec.shapes if c != shape]
            q_shape = others[rng.integers(len(others))]
    return Scene(
        scene_id=index,
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        count=count,
        background=background,
        style=style,
        centres=tuple(centres),
        rgb=rgb,  # type: ignore[arg-type]
        bg_params=bg_params,
        question_kind=kind,
        question_colour=q_colour,
        question_shape=q_shape,
    )


def _shape_mask(
    shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float
) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` centred at (cx, cy) on the sample grid (x, y)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.86  # same area as the circle, roughly
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Upward triangle with apex (0, -r) and base at y = 0.8 r, half-width r.
        top, base = -r, 0.8 * r
        inside_y = (dy >= top) & (dy <= base)
        half_width = r * (dy - top) / (base - top)
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = r * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= r)
        )
    raise ValueError(f"unknown shape {shape!r}")


def _grid(x_lo: int, x_hi: int, y_lo: int, y_hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample centres of a pixel box, ``x: [1, w·SS]`` and ``y: [h·SS, 1]``.

    Masks broadcast the two to ``[h·SS, w·SS]``.
    """
    xs = x_lo + (np.arange((x_hi - x_lo) * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = y_lo + (np.arange((y_hi - y_lo) * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    return xs[None, :], ys[:, None]


def render(scene: Scene, spec: SceneSpec, seed: int, stream: int) -> np.ndarray:
    """Draw ``scene`` as an ``[H, W, 3]`` uint8 array (anti-aliased by supersampling)."""
    s = spec.image_size
    radius = _RADIUS_32[scene.size] * s / 32 * _GROUP_SCALE[scene.count]
    # Coverage per pixel, [s, s]; each object is sampled only inside its bounding box.
    alpha = np.zeros((s, s), dtype=np.float64)
    for cx, cy in scene.centres:
        x_lo, x_hi = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, s)
        y_lo, y_hi = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, s)
        x, y = _grid(x_lo, x_hi, y_lo, y_hi)
        mask = np.broadcast_to(
            _shape_mask(scene.shape, x, y, cx, cy, radius), (y.size, x.size)
        )
        if scene.style == "outline":
            mask = mask & ~_shape_mask(
                scene.shape, x, y, cx, cy, max(radius - 1.4, 0.0)
            )
        h, w = y_hi - y_lo, x_hi - x_lo
        cover = mask.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))
        # Objects of a group never overlap, so the maximum is their union's coverage.
        np.maximum(alpha[y_lo:y_hi, x_lo:x_hi], cover, out=alpha[y_lo:y_hi, x_lo:x_hi])

    lo, hi, angle = scene.bg_params
    px = (np.arange(s) + 0.5) / s
    if scene.background == "plain":
        bg = np.full((s, s), lo)
    elif scene.background == "gradient":
        t = np.cos(angle) * px[None, :] + np.sin(angle) * px[:, None]
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        bg = lo + (hi - lo) * t
    else:  # noise: its own generator so the attribute draws stay aligned across backgrounds
        noise_rng = np.random.default_rng([seed, stream, scene.scene_id, 1])
        bg = np.clip(lo + 0.08 * noise_rng.standard_normal((s, s)), 0.0, 0.4)
    bg3 = np.repeat(bg[:, :, None], 3, axis=2)
    img = (
        bg3 * (1.0 - alpha[:, :, None])
        + np.asarray(scene.rgb)[None, None, :] * alpha[:, :, None]
    )
    return np.round(img * 255.0).astype(np.uint8)


def iter_scenes(
    spec: SceneSpec, seed: int, stream: int, indices: Sequence[int] | range
) -> Iterator[tuple[Scene, np.ndarray]]:
    """Yield ``(scene, image)`` for the given indices of ``stream``."""
    for i in indices:
        scene = sample_scene(spec, seed, stream, int(i))
        yield scene, render(scene, spec, seed, stream)
