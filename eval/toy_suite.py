"""A toy benchmark suite in the official file formats, from held-out synthetic scenes.

The suite is written under the same layout as LLaVA-1.5's evaluation data
(:mod:`fedsim.eval.suite`), so the official loaders and scorers read it unchanged:

* POPE: ``pope/coco/coco_pope_{random,popular,adversarial}.json`` (one JSON object a line:
  ``question_id``, ``image``, ``text``, ``label``), images in ``pope/val2014/``. Per image three
  "yes" questions (the shape, the colour, both) and three "no" ones; the absent object is drawn
  at random (random), is the most frequent absent value over the suite (popular), or keeps the
  scene's other attribute (adversarial: "is there a red circle ?" for a red triangle), the three
  ways POPE draws its negatives.
* MME: two subtasks of yes/no pairs per image, ``existence`` (shape) and ``color``, as
  ``image \\t question \\t answer`` sheets in ``MME/eval_tool/Your_Results/`` with the images in
  ``MME/MME_Benchmark_release_version/<subtask>/``; each image has one Yes and one No question,
  so MME's acc+ is meaningful.
* MMBench: ``mmbench/mmbench_dev_20230712.tsv`` with base64 PNGs, one question per attribute
  (colour, shape, size, position) whose options are attribute words; the circular variants
  (options rotated) are rows ``index + k·10^6``.
* MMVP: ``MMVP/Questions.csv`` and ``MMVP/MMVP Images/<Index>.jpg``: pairs of images that differ
  in one attribute (colour or shape), asked the same two-option question.

The toy LM answers yes/no questions and captions only, so multiple-choice items are answered
through its caption and read by the official rule-based option matching (an option's text found
in the answer). Questions use the toy vocabulary ("is there a red object ?").
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedsim.data.scenes_dataset import spec_to_dict
from fedsim.data.synthetic import COLOURS, SceneSpec, render, sample_scene

TOY_BENCH_STREAM = 11  # held out: training uses 1, evaluation 2, the toy build 101-104
SUITE_VERSION = 1
MMVP_PAIRS_OF = ("colour", "shape")
#: MMBench/MMVP matching rules for the toy suite (fedsim.eval.mmbench.MATCHING_RULES): the toy
#: LM answers a multiple-choice item with a caption, longer than twice the options' text, and
#: VLMEvalKit's rules since c3371551 (a67ace50) never search option text in so long an answer,
#: so every toy MMVP answer would be unread (pair accuracy 0 for any projector). The rules
#: before (aca64dbb) read the caption; the scores record which rules they used.
TOY_MATCHING = "aca64dbb"


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _question(kind: str, colour: str, shape: str) -> str:
    if kind == "shape":
        return f"is there a {shape} ?"
    if kind == "colour":
        return f"is there a {colour} object ?"
    return f"is there a {colour} {shape} ?"


def suite_key(spec: SceneSpec, seed: int, images: int) -> str:
    payload = json.dumps(
        {"spec": spec_to_dict(spec), "seed": seed, "n": images, "v": SUITE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_toy_suite(
    cache_dir: Path, spec: SceneSpec, seed: int = 0, images: int = 60
) -> Path:
    """The suite's folder in ``cache_dir`` (written once, atomically)."""
    path = Path(cache_dir) / "toy-bench" / suite_key(spec, seed, images)
    if (path / "suite.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        write_toy_suite(tmp, spec, seed, images)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            if not (path / "suite.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_toy_suite(root: Path, spec: SceneSpec, seed: int, images: int) -> None:
    """Write every benchmark of the suite under ``root``."""
    rng = np.random.default_rng([seed, TOY_BENCH_STREAM, 0])
    scenes = [sample_scene(spec, seed, TOY_BENCH_STREAM, i) for i in range(images)]
    pixels = [render(s, spec, seed, TOY_BENCH_STREAM) for s in scenes]
    _pope(root, spec, scenes, pixels, rng)
    _mme(root, spec, scenes, pixels, rng)
    _mmbench(root, spec, scenes, pixels, rng)
    _mmvp(root, spec, scenes, seed, rng)
    (root / "suite.json").write_text(
        json.dumps(
            {
                "spec": spec_to_dict(spec),
                "seed": seed,
                "images": images,
                "version": SUITE_VERSION,
            },
            indent=2,
        )
    )


def _pope(root, spec, scenes, pixels, rng) -> None:
    img_dir = root / "pope" / "val2014"
    img_dir.mkdir(parents=True)
    names = []
    for s, img in zip(scenes, pixels):
        name = f"toy_val_{s.scene_id:06d}.png"
        (img_dir / name).write_bytes(_png(img))
        names.append(name)
    shape_freq = Counter(s.shape for s in scenes)
    colour_freq = Counter(s.colour for s in scenes)

    def popular(freq: Counter, values, present: str) -> str:
        ranked = sorted(values, key=lambda v: (-freq[v], v))
        return next(v for v in ranked if v != present)

    out = root / "pope" / "coco"
    out.mkdir(parents=True)
    for split in ("random", "popular", "adversarial"):
        qid = 0
        lines = []
        for s, name in zip(scenes, names):
            items = [(k, s.colour, s.shape, "yes") for k in ("shape", "colour", "both")]
            others_c = [c for c in spec.colours if c != s.colour]
            others_s = [x for x in spec.shapes if x != s.shape]
            if split == "random":
                nc = others_c[rng.integers(len(others_c))]
                ns = others_s[rng.integers(len(others_s))]
                neg_both = (nc, ns)
            elif split == "popular":
                nc = popular(colour_freq, spec.colours, s.colour)
                ns = popular(shape_freq, spec.shapes, s.shape)
                neg_both = (nc, ns)
            else:  # adversarial: the absent object shares the scene's other attribute
                nc = others_c[rng.integers(len(others_c))]
                ns = others_s[rng.integers(len(others_s))]
                neg_both = (nc, s.shape) if rng.random() < 0.5 else (s.colour, ns)
            items += [
                ("shape", s.colour, ns, "no"),
                ("colour", nc, s.shape, "no"),
                ("both", neg_both[0], neg_both[1], "no"),
            ]
            for kind, c, sh, label in items:
                qid += 1
                lines.append(
                    json.dumps(
                        {
                            "question_id": qid,
                            "image": name,
                            "text": _question(kind, c, sh),
                            "label": label,
                        }
                    )
                )
        (out / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")


def _mme(root, spec, scenes, pixels, rng) -> None:
    sheets = root / "MME" / "eval_tool" / "Your_Results"
    sheets.mkdir(parents=True)
    for subtask, kind in (("existence", "shape"), ("color", "colour")):
        img_dir = root / "MME" / "MME_Benchmark_release_version" / subtask
        img_dir.mkdir(parents=True)
        rows = []
        for s, img in zip(scenes, pixels):
            name = f"{s.scene_id:06d}.png"
            (img_dir / name).write_bytes(_png(img))
            if kind == "shape":
                others = [x for x in spec.shapes if x != s.shape]
                yes_q = _question("shape", s.colour, s.shape)
                no_q = _question("shape", s.colour, others[rng.integers(len(others))])
            else:
                others = [c for c in spec.colours if c != s.colour]
                yes_q = _question("colour", s.colour, s.shape)
                no_q = _question("colour", others[rng.integers(len(others))], s.shape)
            rows.append(f"{name}\t{yes_q} Please answer yes or no.\tYes")
            rows.append(f"{name}\t{no_q} Please answer yes or no.\tNo")
        (sheets / f"{subtask}.txt").write_text("\n".join(rows) + "\n")


MMB_QUESTIONS = {
    "colour": "what colour is the object ?",
    "shape": "what shape is the object ?",
    "size": "what size is the object ?",
    "position": "where is the object ?",
}


def _mmbench(root, spec, scenes, pixels, rng) -> None:
    pools = {
        "colour": list(spec.colours),
        "shape": list(spec.shapes),
        "size": list(spec.sizes),
        "position": list(spec.positions),
    }
    out = root / "mmbench"
    out.mkdir(parents=True)
    header = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "l2-category",
        "split",
        "image",
    ]
    rows = []
    for i, (s, img) in enumerate(zip(scenes, pixels)):
        cat = ("colour", "shape", "size", "position")[i % 4]
        truth = {
            "colour": s.colour,
            "shape": s.shape,
            "size": s.size,
            "position": s.position,
        }[cat]
        wrong = [v for v in pools[cat] if v != truth]
        order = rng.permutation(len(wrong))[:3]
        options = [truth] + [wrong[j] for j in order]
        options = [options[j] for j in rng.permutation(len(options))]
        b64 = base64.b64encode(_png(img)).decode()
        # Circular passes: the options rotated, one row each (index + k·10^6).
        for k in range(len(options)):
            rot = options[k:] + options[:k]
            letters = "ABCD"[: len(rot)]
            row = {
                "index": i + k * 1_000_000,
                "question": MMB_QUESTIONS[cat],
                "hint": "",
                "answer": letters[rot.index(truth)],
                "category": f"attribute_{cat}",
                "l2-category": "attribute_recognition",
                "split": "dev",
                "image": b64,
            }
            for L in "ABCD":
                row[L] = rot["ABCD".index(L)] if L in letters else ""
            rows.append(row)
    with open(out / "mmbench_dev_20230712.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def _mmvp(root, spec, scenes, seed, rng) -> None:
    img_dir = root / "MMVP" / "MMVP Images"
    img_dir.mkdir(parents=True)
    rows = []
    index = 0
    for i, s in enumerate(scenes):
        attr = MMVP_PAIRS_OF[i % 2]
        if attr == "colour":
            others = [c for c in spec.colours if c != s.colour]
            other = others[rng.integers(len(others))]
            a = replace(s, rgb=tuple(np.asarray(COLOURS[s.colour]) / 255.0))
            b = replace(s, colour=other, rgb=tuple(np.asarray(COLOURS[other]) / 255.0))
            values = (s.colour, other)
            question = MMB_QUESTIONS["colour"]
        else:
            others = [x for x in spec.shapes if x != s.shape]
            other = others[rng.integers(len(others))]
            a, b = s, replace(s, shape=other)
            values = (s.shape, other)
            question = MMB_QUESTIONS["shape"]
        flip = rng.random() < 0.5
        opts = (values[1], values[0]) if flip else values
        options = f"(a) {opts[0]} (b) {opts[1]}"
        for scene, truth in ((a, values[0]), (b, values[1])):
            index += 1
            (img_dir / f"{index}.jpg").write_bytes(
                _jpg(render(scene, spec, seed, TOY_BENCH_STREAM))
            )
            answer = "(a)" if opts[0] == truth else "(b)"
            rows.append([index, question, options, answer])
    with open(root / "MMVP" / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerows(rows)
