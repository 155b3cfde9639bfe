"""MME: a comprehensive evaluation benchmark for multimodal LLMs (Fu et al., 2023,
arXiv:2306.13394).

Fourteen subtasks of yes/no questions, two per image (one "Yes", one "No"): ten of
perception, four of cognition. The question files are the answer-sheet templates of the
MME eval_tool (BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation,
``tools/eval_tool.zip``, ``Your_Results/<subtask>.txt``: ``image \\t question \\t answer``
lines, the two questions of an image on consecutive lines). Images are in the MME release,
``MME_Benchmark_release_version/<subtask>/images/<image>`` for artwork, celebrity,
landmark, posters and scene, ``<subtask>/<image>`` for the others (the layout LLaVA's
``convert_answer_to_mme.py`` reads).

Prompt (LLaVA-1.5, ``scripts/v1_5/eval/mme.sh`` and its ``llava_mme.jsonl``): the
question with its "Please answer yes or no." removed, a line break, and
:data:`~fedsim.eval.benchmark.SHORT_ANSWER` (``convert_answer_to_mme.py`` strips that
suffix and puts "Please answer yes or no." back to find the sheet line; lmms-eval logs the
same prompt for LLaVA). Generation length: ``model_vqa_loader.py``'s default, 128.

Scoring reproduces the eval_tool's ``calculation.py``: the response is lower-cased; exactly
"yes" or "no" is that answer, else "yes" within its first four characters is yes, else "no"
within them is no, else "other" (wrong). Per subtask, acc is over questions, acc+ over
images whose two questions are both right, and the score is (acc + acc+)·100; perception
and cognition are the sums over their subtasks (over those present, when the questions are
a subset). ``calculation.py`` reads a sheet line by splitting on tabs and skips a line that
does not give exactly four fields, so a response containing a tab drops out of acc (both
numerator and denominator) and its image cannot count for acc+; :meth:`Mme.score` does the
same.

Question ids are ``"<subtask>/<image>/<k>"``, k = 0, 1 the question's place among its
image's two (LLaVA's own ids, ``<subtask>/<image path>``, are shared by both questions).

lmms-eval's Parquet release loads too (``lmms-lab/MME``, ``data/test-*.parquet``; columns
from its dataset card and ``lmms_eval/tasks/mme/utils.py``): ``question_id`` (the image,
``"<subtask>/<file name>"``, shared by its two questions), ``question`` (with "Please
answer yes or no."), ``answer`` ("Yes"/"No"), ``category`` (the subtask), ``image``
({bytes, path}). The two rows of an image become ``k`` = 0, 1 in row order (lmms-eval
pairs them by ``question_id`` too), so ids match the sheets' when the release keeps the
sheets' question order; rows are put in subtask order with an image's two questions
adjacent, as :func:`write_sheets` needs. Scoring stays ``calculation.py``'s (lmms-eval's
``parse_pred_ans`` also drops periods and reads a lone "y"/"n").
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    SHORT_ANSWER,
    BenchmarkError,
    Question,
    check_answered,
    open_text,
)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
SUBTASKS = PERCEPTION + COGNITION
# Subtasks whose images sit in an images/ subfolder of the MME release.
_IMAGES_SUBFOLDER = frozenset({"artwork", "celebrity", "landmark", "posters", "scene"})
_YES_NO_SUFFIX = "Please answer yes or no."
# lmms-lab/MME's columns (dataset card; lmms_eval/tasks/mme/utils.py).
_PARQUET_COLUMNS = ("question_id", "question", "answer", "category", "image")


def mme_answer(response: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` by ``calculation.py``'s ``parse_pred_ans``.

    Examples
    --------
    >>> mme_answer("Yes."), mme_answer("Ye"), mme_answer("NOT sure")
    ('yes', 'other', 'no')
    """
    pred = response.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def llava_prompt(question: str) -> str:
    """LLaVA-1.5's MME prompt: the yes/no instruction replaced by the short-answer one."""
    return f"{question.replace(_YES_NO_SUFFIX, '').rstrip()}\n{SHORT_ANSWER}"


def _question(
    subtask: str,
    image_name: str,
    k: int,
    pair: int,
    image: str | bytes,
    question: str,
    answer: str,
    prompt: str | None = None,
) -> Question:
    """Question ``k`` (0 or 1) of image ``image_name``, the ``pair``-th image of
    ``subtask``; ``prompt`` is the question as asked (default ``question``)."""
    return Question(
        question_id=f"{subtask}/{image_name}/{k}",
        image=image,
        text=llava_prompt(question if prompt is None else prompt),
        meta={
            "subtask": subtask,
            "image_name": image_name,
            "question": question,
            "answer": answer,
            "pair": pair,
        },
    )


class Mme:
    """MME's 14 subtasks from the eval_tool's answer sheets, or lmms-eval's Parquet."""

    name = "mme"
    judged = False
    max_new_tokens = 128

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from a folder of sheets (``<subtask>.txt``; a 4th column is ignored),
        or from lmms-eval's Parquet.

        Parameters
        ----------
        questions:
            The folder of sheets, e.g. ``eval_tool/Your_Results``; a subset of the 14
            subtasks is allowed. Or a ``.parquet`` file, or a folder of ``.parquet``
            shards (read together: an image's two rows may sit in different shards).
        data_root:
            ``MME_Benchmark_release_version``; without it image paths stay relative to it
            (not used for Parquet, which holds the images).
        """
        folder = Path(questions)
        shards = parquet.parquet_files(folder)
        if folder.is_file() and shards:
            return self._load_parquet(shards)
        if not folder.is_dir():
            raise BenchmarkError(f"{folder}: MME sheet folder not found")
        sheets = sorted(folder.glob("*.txt"))
        if not sheets and shards:
            return self._load_parquet(shards)
        if not sheets:
            raise BenchmarkError(
                f"{folder}: no <subtask>.txt sheets (or .parquet shards) in this folder"
            )
        by_name = {p.stem: p for p in sheets}
        unknown = [p.name for p in sheets if p.stem not in SUBTASKS]
        if unknown:
            raise BenchmarkError(
                f"{folder / unknown[0]}: not an MME subtask (known: {', '.join(SUBTASKS)})"
            )
        out: list[Question] = []
        for subtask in SUBTASKS:
            if subtask in by_name:
                out += self._load_sheet(by_name[subtask], subtask, data_root)
        return out

    def _load_sheet(
        self, path: Path, subtask: str, data_root: Path | None
    ) -> list[Question]:
        rows = []
        for n, fields in _sheet_lines(path):
            if len(fields) < 3:
                raise BenchmarkError(
                    f"{path}:{n}: expected 'image<TAB>question<TAB>answer', "
                    f"got {len(fields)} field(s)"
                )
            image, question, answer = fields[0], fields[1], fields[2]
            if answer.lower() not in ("yes", "no"):
                raise BenchmarkError(
                    f"{path}:{n}: answer field is {answer!r}, not Yes or No"
                )
            rows.append((n, image, question, answer))
        # calculation.py pairs consecutive lines as the two questions of one image.
        if len(rows) % 2:
            raise BenchmarkError(
                f"{path}: {len(rows)} lines; MME needs two questions per image"
            )
        folder = _image_folder(subtask, data_root)
        out = []
        for i, (n, image, question, answer) in enumerate(rows):
            if i % 2 and image != rows[i - 1][1]:
                raise BenchmarkError(
                    f"{path}:{n}: image {image!r} differs from the line before's "
                    f"{rows[i - 1][1]!r}; an image's two questions must be consecutive"
                )
            out.append(
                _question(
                    subtask, image, i % 2, i // 2, str(folder / image), question, answer
                )
            )
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        # (subtask, image) → its rows in file order; the pair index counts images per
        # subtask in order of first appearance.
        images: dict[tuple[str, str], list[tuple[Path, int, dict[str, Any]]]] = {}
        for path, n, row in parquet.iter_rows(files, _PARQUET_COLUMNS):
            subtask = parquet.string(row, "category", path, n)
            if subtask not in SUBTASKS:
                raise BenchmarkError(
                    f"{path}: row {n}: column 'category' is {subtask!r}, not an MME "
                    f"subtask (known: {', '.join(SUBTASKS)})"
                )
            answer = parquet.string(row, "answer", path, n)
            if answer.lower() not in ("yes", "no"):
                raise BenchmarkError(
                    f"{path}: row {n}: column 'answer' is {answer!r}, not Yes or No"
                )
            parquet.string(row, "question", path, n)
            qid = parquet.string(row, "question_id", path, n)
            # "<subtask>/<file name>"; the sheets' first column is the file name.
            image = qid.split("/", 1)[1] if "/" in qid else qid
            rows = images.setdefault((subtask, image), [])
            if len(rows) == 2:
                raise BenchmarkError(
                    f"{path}: row {n}: column 'question_id' {qid!r} has a third "
                    "question; MME asks two per image"
                )
            row["image"] = parquet.image_bytes(row["image"], path, n)
            rows.append((path, n, row))
        if not images:
            raise BenchmarkError(f"{files[0]}: no rows")
        out: list[Question] = []
        for subtask in SUBTASKS:
            keys = [key for key in images if key[0] == subtask]
            for pair, key in enumerate(keys):
                rows = images[key]
                if len(rows) != 2:
                    path, n, row = rows[0]
                    raise BenchmarkError(
                        f"{path}: row {n}: column 'question_id' {row['question_id']!r} "
                        "has one question; MME needs two per image"
                    )
                for k, (_, _, row) in enumerate(rows):
                    out.append(
                        _question(
                            subtask,
                            key[1],
                            k,
                            pair,
                            row["image"],
                            row["question"],
                            row["answer"],
                            # lmms-eval's mme_doc_to_text strips the question.
                            prompt=row["question"].strip(),
                        )
                    )
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """acc, acc+ and score per subtask; perception and cognition totals."""
        check_answered(self.name, questions, predictions)
        by_task: dict[str, list[Question]] = {}
        for q in questions:
            by_task.setdefault(q.meta["subtask"], []).append(q)
        subtasks: dict[str, dict[str, float]] = {}
        for task in SUBTASKS:
            if task not in by_task:
                continue
            counted = right = 0
            pairs: dict[int, list[bool]] = {}
            for q in by_task[task]:
                response = predictions[q.question_id]
                ok = pairs.setdefault(q.meta["pair"], [])
                if "\t" in response:
                    # calculation.py cannot unpack this line and skips it.
                    ok.append(False)
                    continue
                hit = mme_answer(response) == q.meta["answer"].lower()
                counted += 1
                right += hit
                ok.append(hit)
            acc = right / counted if counted else math.nan
            # acc+ is over images (pairs), skipped lines included, as img_num is.
            acc_plus = sum(len(v) == 2 and all(v) for v in pairs.values()) / len(pairs)
            subtasks[task] = {
                "acc": acc,
                "acc_plus": acc_plus,
                "score": (acc + acc_plus) * 100,
            }
        return {
            "subtasks": subtasks,
            "perception": sum(
                subtasks[t]["score"] for t in PERCEPTION if t in subtasks
            ),
            "cognition": sum(subtasks[t]["score"] for t in COGNITION if t in subtasks),
        }

    def write_sheets(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        folder: Path,
    ) -> list[Path]:
        """The responses as filled eval_tool sheets (see :func:`write_sheets`)."""
        return write_sheets(questions, predictions, folder)

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """Responses from a LLaVA answer file or from a folder of filled sheets.

        A filled sheet line is ``image \\t question \\t answer \\t response``; it is matched
        to its question by subtask (file name), image stem (LLaVA's converter writes
        ``<stem>.txt`` there) and question text (whitespace-normalised). Fields past the
        fourth are a response that contained tabs: they are joined back, and scoring
        skips such a line as ``calculation.py`` does.
        """
        path = Path(path)
        if not path.is_dir():
            return read_answers(path)
        index: dict[tuple[str, str, str], int | str] = {}
        for q in questions:
            key = (q.meta["subtask"], Path(q.meta["image_name"]).stem, _norm(q))
            index[key] = q.question_id
        subtasks = {q.meta["subtask"] for q in questions}
        out: dict[int | str, str] = {}
        for sheet in sorted(path.glob("*.txt")):
            if sheet.stem not in subtasks:
                continue
            for n, fields in _sheet_lines(sheet):
                if len(fields) < 4:
                    raise BenchmarkError(
                        f"{sheet}:{n}: expected 4 tab-separated fields "
                        f"(image, question, answer, response), got {len(fields)}"
                    )
                key = (sheet.stem, Path(fields[0]).stem, " ".join(fields[1].split()))
                if key not in index:
                    raise BenchmarkError(
                        f"{sheet}:{n}: no loaded question matches image {fields[0]!r} "
                        f"and question {fields[1]!r}"
                    )
                qid = index[key]
                if qid in out:
                    raise BenchmarkError(f"{sheet}:{n}: question answered twice")
                out[qid] = "\t".join(fields[3:])
        if not out:
            raise BenchmarkError(f"{path}: no filled sheet for the loaded subtasks")
        return out


def write_sheets(
    questions: Sequence[Question], predictions: Mapping[int | str, str], folder: Path
) -> list[Path]:
    """Save responses as filled eval_tool sheets, one ``<subtask>.txt`` each.

    What LLaVA's ``convert_answer_to_mme.py`` does: ``image \\t question \\t answer \\t
    response`` lines, the question with its "Please answer yes or no.", in the question
    order (so an image's two lines stay consecutive). Two differences, neither changing a
    score: the first column is the image file name as in the official sheets (LLaVA writes
    ``<stem>.txt``), and line breaks inside a response become spaces, since
    ``calculation.py`` reads one line per question (the answer parse only looks for
    "yes"/"no", which hold no whitespace). Tabs are kept, as LLaVA keeps them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for q in questions:
        if q.question_id not in predictions:
            raise BenchmarkError(f"mme: question {q.question_id!r} has no prediction")
        response = predictions[q.question_id]
        for brk in ("\r\n", "\r", "\n"):
            response = response.replace(brk, " ")
        m = q.meta
        lines.setdefault(m["subtask"], []).append(
            f"{m['image_name']}\t{m['question']}\t{m['answer']}\t{response}\n"
        )
    paths = []
    for subtask, rows in lines.items():
        path = folder / f"{subtask}.txt"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.writelines(rows)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def _sheet_lines(path: Path):
    """(line number, tab-separated fields) of the non-empty lines of a sheet."""
    # Universal newlines, as calculation.py's open().readlines() reads the sheet.
    try:
        with open_text(path) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, line.split("\t")


def _image_folder(subtask: str, data_root: Path | None) -> Path:
    base = Path(data_root) / subtask if data_root else Path(subtask)
    if data_root and (base / "images").is_dir():
        return base / "images"
    if data_root and base.is_dir():
        return base
    return base / "images" if subtask in _IMAGES_SUBFOLDER else base


def _norm(q: Question) -> str:
    return " ".join(q.meta["question"].split())


BENCHMARK = Mme()
