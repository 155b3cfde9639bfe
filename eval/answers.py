"""LLaVA's answer-file format: one JSON object a line with ``question_id`` and ``text``.

``llava/eval/model_vqa_loader.py`` writes ``question_id``, ``prompt``, ``text``, ``answer_id``,
``model_id`` and ``metadata``; every official converter reads ``question_id`` and ``text`` only,
and so does :func:`read_answers`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fedsim.eval.benchmark import BenchmarkError, open_text, question_id


def iter_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: {what} file not found")
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(
                    f"{path}:{n}: not a JSON object ({e.msg})"
                ) from None
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{path}:{n}: not a JSON object")
            yield n, rec


def read_answers(path: Path) -> dict[int | str, str]:
    """question_id → answer text; a malformed line is an error naming the file and line."""
    path = Path(path)
    out: dict[int | str, str] = {}
    for n, rec in iter_jsonl(path, "predictions"):
        if "question_id" not in rec or "text" not in rec:
            raise BenchmarkError(
                f"{path}:{n}: an answer needs 'question_id' and 'text'"
            )
        qid = question_id(rec["question_id"], f"{path}:{n}")
        if qid in out:
            raise BenchmarkError(f"{path}:{n}: question_id {qid!r} answered twice")
        out[qid] = str(rec["text"])
    return out


def write_answers(
    path: Path,
    answers: Iterable[tuple[int | str, str, str]],
    model_id: str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``(question_id, prompt, text)`` triples as a LLaVA answer file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, (qid, prompt, text) in enumerate(answers):
                rec = {
                    "question_id": qid,
                    "prompt": prompt,
                    "text": text,
                    "answer_id": f"{model_id}-{i}",
                    "model_id": model_id,
                    "metadata": dict(metadata or {}),
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
