"""The benchmark interface: load the official question files, build prompts, score answers.

Every benchmark module (``pope``, ``mme``, ``mmbench``, ``seed``, ``mmvp``, ``mmvet``,
``llava_bench``) exposes one :class:`Benchmark`. Loading gives :class:`Question` objects whose
``text`` is the LLaVA-1.5 prompt of the question (the benchmark's suffix included, the
conversation template not: the backbone wraps it). Generation writes answers in LLaVA's
answer-file format (:mod:`fedsim.eval.answers`); scoring reads them back, so a predictions file
made by any other tool scores the same way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedsim.configtools import read_user_text

# LLaVA-1.5's evaluation prompts (llava/eval/*, scripts/v1_5/eval/*).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names the file and the field."""


def open_text(path: Path, newline: str | None = None) -> io.StringIO:
    """A question or answer file as a text stream (``newline`` as for :func:`open`).

    Decoded whole by :func:`fedsim.configtools.read_user_text`: a file that is not UTF-8 is a
    BenchmarkError naming it, not a UnicodeDecodeError in the middle of a loop.
    """

    return io.StringIO(read_user_text(path, error=BenchmarkError), newline=newline)


def read_text(path: Path) -> str:
    """A question or answer file's text (see :func:`open_text`)."""
    return open_text(path).read()


@dataclass(frozen=True)
class Question:
    """One generation request and what scoring needs to judge its answer.

    Attributes
    ----------
    question_id:
        The id the official answer files use (an int or a string, as in the source file).
    image:
        Where the image comes from: a file path, raw encoded bytes (MMBench's base64 column,
        lmms-eval Parquet), or None for a text-only question.
    text:
        The prompt: the question, the options where there are any, and the benchmark's
        LLaVA-1.5 answer instruction.
    meta:
        Everything scoring needs: the gold answer, category, split, pair index, ...
    """

    question_id: int | str
    image: str | bytes | None
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)


class Benchmark(Protocol):
    """What every benchmark module provides."""

    name: str
    #: Answers are scored by an LLM judge (needs an OpenAI-compatible endpoint).
    judged: bool
    #: Generation length LLaVA-1.5 uses for this benchmark.
    max_new_tokens: int

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from the official file (or folder, or lmms-eval Parquet) at ``questions``;
        relative image paths resolve against ``data_root``."""
        ...

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """The official metrics of ``predictions`` (question_id → answer text)."""
        ...


def question_id(value: Any, where: str) -> int | str:
    """A ``question_id`` read from a user's JSON: an integer or a string, as LLaVA writes it.

    A list, object, float or boolean is an error opening with ``where`` (file and line),
    before it can reach a dict lookup as an unhashable or ambiguous key.
    """
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise BenchmarkError(
        f"{where}: question_id {value!r} is not an integer or a string"
    )


def check_answered(
    name: str, questions: Sequence[Question], predictions: Mapping[int | str, str]
) -> None:
    """Raise when there is nothing to score or a question has no prediction."""
    if not questions:
        raise BenchmarkError(f"{name}: no questions to score")
    for q in questions:  # any loader, any format: ids must be usable as keys
        question_id(q.question_id, f"{name} (a question)")
    missing = [q.question_id for q in questions if q.question_id not in predictions]
    if missing:
        raise BenchmarkError(
            f"{name}: {len(missing)} of {len(questions)} questions have no prediction "
            f"(first: {missing[0]!r})"
        )


def string_cell(
    row: Mapping[str, Any], key: str, where: str, cell: str = "column"
) -> str:
    """``row[key]`` when it is a string; otherwise an error opening with ``where`` (the
    file and line or row) that calls the cell a ``cell`` ("column", or "field")."""
    value = row.get(key)
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: {cell} {key!r} is {value!r}, not a string")
    return value
