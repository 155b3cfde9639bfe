"""Benchmark registry, data layout, and prompt rendering.

Data layout under ``--data-root`` follows LLaVA-1.5's ``playground/data/eval`` (its
``docs/Evaluation.md``), so a folder prepared for LLaVA's own scripts works as is:

============  =====================================  ======================================
benchmark     questions                              images
============  =====================================  ======================================
pope          ``pope/coco/`` (coco_pope_*.json)       ``pope/val2014/``
mme           ``MME/eval_tool/Your_Results/`` sheets  ``MME/MME_Benchmark_release_version/``
mmbench       ``mmbench/mmbench_dev_20230712.tsv``    (base64 inside the TSV)
seed          ``seed_bench/SEED-Bench.json``          ``seed_bench/SEED-Bench-image/``
mmvp          ``MMVP/Questions.csv``                  ``MMVP/MMVP Images/``
mmvet         ``mm-vet/mm-vet.json``                  ``mm-vet/images/``
llava_bench   ``llava-bench-in-the-wild/`` (3 jsonl)  ``llava-bench-in-the-wild/images/``
============  =====================================  ======================================

Prompts: real LLaVA-1.5 backbones get the ``vicuna_v1`` conversation LLaVA-1.5 was evaluated
with (``SYSTEM USER: <image>\\n{prompt} ASSISTANT:``). The toy backbone's LM knows two
instructions only, its caption and its yes/no question: yes/no benchmarks (POPE, MME) ask the
question through its question template, multiple-choice ones (MMBench, MMVP, SEED) through its
caption template, and the official rule-based option matching reads the option named in the
caption (a toy suite item's options are attribute words; see :mod:`fedsim.eval.toy_suite`).
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any

from fedsim.eval.benchmark import Benchmark, BenchmarkError, Question

MODULES = {
    "pope": "fedsim.eval.pope",
    "mme": "fedsim.eval.mme",
    "mmbench": "fedsim.eval.mmbench",
    "seed": "fedsim.eval.seed",
    "mmvp": "fedsim.eval.mmvp",
    "mmvet": "fedsim.eval.mmvet",
    "llava_bench": "fedsim.eval.llava_bench",
}
ALIASES = {
    "seed-bench": "seed",
    "seedbench": "seed",
    "mm-vet": "mmvet",
    "llava-bench": "llava_bench",
    "llavabench": "llava_bench",
}

LAYOUT: dict[str, tuple[str, str | None]] = {
    "pope": ("pope/coco", "pope/val2014"),
    "mme": ("MME/eval_tool/Your_Results", "MME/MME_Benchmark_release_version"),
    "mmbench": ("mmbench/mmbench_dev_20230712.tsv", None),
    "seed": ("seed_bench/SEED-Bench.json", "seed_bench/SEED-Bench-image"),
    "mmvp": ("MMVP/Questions.csv", "MMVP/MMVP Images"),
    "mmvet": ("mm-vet/mm-vet.json", "mm-vet"),
    "llava_bench": ("llava-bench-in-the-wild", "llava-bench-in-the-wild"),
}

YES_NO = frozenset({"pope", "mme"})
TOY_SUITE = ("pope", "mme", "mmbench", "mmvp")  # what fedsim.eval.toy_suite writes

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def canonical(name: str) -> str:
    """The registry name of ``name`` (case and common spellings forgiven)."""
    key = name.strip().lower().replace(" ", "")
    key = ALIASES.get(key, key)
    if key not in MODULES:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(MODULES)}")
    return key


def get(name: str) -> Benchmark:
    """The :class:`Benchmark` object of ``name``."""
    return importlib.import_module(MODULES[canonical(name)]).BENCHMARK


def locate(name: str, data_root: Path) -> tuple[Path, Path | None]:
    """Question file (or folder) and image root of ``name`` under ``data_root``."""
    questions, images = LAYOUT[canonical(name)]
    qpath = Path(data_root) / questions
    if not qpath.exists():
        raise BenchmarkError(
            f"{canonical(name)}: {qpath} not found (expected layout under --data-root: "
            f"{questions})"
        )
    return qpath, (Path(data_root) / images if images else None)


def render_prompt(backbone: Any, bench: str, question: Question) -> str:
    """The full text prompt for ``backbone``: its conversation template around the question."""
    if backbone.manifest.get("kind") == "toy":
        if canonical(bench) in YES_NO:
            # The question itself (up to its "?"), without the answer instruction.
            text = question.text.split("?")[0].strip() + " ?"
            return backbone.qa_prompt.format(question=text)
        return backbone.caption_prompt
    image = "<image>\n" if question.image is not None else ""
    return f"{VICUNA_SYSTEM} USER: {image}{question.text} ASSISTANT:"


def load_image(image: str | bytes | None) -> Any:
    """A PIL RGB image from a path or encoded bytes (None stays None)."""
    if image is None:
        return None
    from PIL import Image

    try:
        if isinstance(image, bytes):
            return Image.open(io.BytesIO(image)).convert("RGB")
        return Image.open(image).convert("RGB")
    except (OSError, ValueError) as e:
        where = image if isinstance(image, str) else "an embedded image"
        raise BenchmarkError(f"{where}: cannot be decoded ({e})") from None
