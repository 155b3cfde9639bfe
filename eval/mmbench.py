"""MMBench: is your multi-modal model an all-around player? (Liu et al., ECCV 2024,
arXiv:2307.06281).

Single-choice questions in a TSV (``mmbench_dev_20230712.tsv`` and later releases):
``index``, ``question``, ``hint``, options ``A`` … ``D``, ``answer``, ``category``,
``l2-category``, ``split``, ``source``, and the image as base64 (``image``; a value of at
most 64 characters is the ``index`` of the row holding the image, as VLMEvalKit reads
it). Circular evaluation: a question's option-rotated copies are rows ``index + k·10^6``
sharing ``index mod 10^6``; the question counts as right only when every copy is.

Prompt (LLaVA-1.5, ``llava/eval/model_vqa_mmbench.py`` with ``--single-pred-prompt`` as in
``scripts/v1_5/eval/mmbench.sh``): the hint and a line break when there is a hint, the
question, each option as ``\\n<letter>. <text>``, then ``\\n`` and
:data:`~fedsim.eval.benchmark.OPTION_LETTER`. Options are read up to the first empty cell;
empty means what pandas reads as NaN (``""``, ``"nan"``, ``"None"``, ``"NA"``, ``"N/A"``,
``"null"``, ...), since LLaVA and VLMEvalKit both read the TSV with pandas. Generation
length: ``model_vqa_mmbench.py`` fixes ``max_new_tokens=1024``.

Scoring follows VLMEvalKit (open-compass/VLMEvalKit ``vlmeval/utils/matching_util.py``
``can_infer``, ``vlmeval/dataset/utils/multiple_choice.py`` ``mcq_circular_eval`` and
``report_acc``) in its exact-matching mode: the option is extracted by rule, first as a
letter (punctuation ``.()[],:;!*#{}`` turned to spaces, the answer split on whitespace,
exactly one option letter among the words), else as option text (exactly one option's
text, lower-cased, inside the lower-cased answer). The GPT fallback that VLMEvalKit uses
for answers the rule cannot read is not run: such an answer is wrong, and ``unextracted``
counts them.

VLMEvalKit changed these rules twice; :data:`MATCHING_RULES` names each version by the
VLMEvalKit commit whose ``matching_util.py`` it reproduces, and every score records the one
used (``matching``):

- ``a67ace50`` (the default; VLMEvalKit's rules since 2026-06-17, unchanged through e8e78f05):
  commit c3371551 (2025-08-04) accepts the one option letter only among the last four words
  (its first occurrence) and skips the option-text search in an answer longer than twice the
  options' text together; commit a67ace50 then reads ``(correct) answer is X`` (X in A–D,
  ``**`` allowed around it, any case) when the words name no single letter.
- ``aca64dbb`` (VLMEvalKit's rules from 2024 until c3371551; fedsim's before issue 17): a
  letter anywhere among the words, option text in an answer of any length, no pattern. Accuracy is over circular groups, overall, per ``category`` and per
``l2-category`` (and per ``split`` when several are present).

lmms-eval's Parquet release loads too (``lmms-lab/MMBench``, config ``en``:
``en/dev-*.parquet``, ``en/test-*.parquet``; also ``lmms-lab/MMBench_EN``; columns from the
dataset cards and ``lmms_eval/tasks/mmbench/en_utils.py``): ``index`` (int, or a string of
one), ``question``, ``hint``, ``A`` … ``D``, ``answer``, ``category``, ``L2-category``
(``l2-category`` in ``MMBench_EN``), ``split``, ``source``, ``comment`` and ``image``
({bytes, path}); a null cell is empty. The release keeps the TSV's rows, circular copies
(``index + k·10^6``) included, and lmms-eval's ``MMBench_Evaluator.eval_result`` groups
them by ``index mod 10^6`` as here; a file with main rows only gives one-row groups
(plain accuracy), in lmms-eval as here. Point ``questions`` at one split's file or
shards: dev and test in one folder mix answered and unanswered rows.
"""

from __future__ import annotations

import base64
import binascii
import csv
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    OPTION_LETTER,
    BenchmarkError,
    Question,
    check_answered,
    open_text,
    string_cell,
)

#: The option columns LLaVA's model_vqa_mmbench.py reads (MMBench has at most four).
OPTION_LETTERS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000
# pandas.read_csv's default NA strings (keep_default_na): such a cell is NaN to LLaVA and
# VLMEvalKit, so an option or hint spelled like this counts as absent.
_PANDAS_NA = frozenset(
    {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
        "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
        "nan", "null",
    }
)  # fmt: skip
# can_infer_option: answers that refuse are read as "Z" (no option, hence wrong).
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# lmms-lab/MMBench (en) columns; the L2 column is "L2-category" there and "l2-category"
# in lmms-lab/MMBench_EN.
_PARQUET_REQUIRED = ("index", "question", "A", "B", "image")
_PARQUET_OPTIONAL = ("hint", "C", "D", "answer", "category", "split")
_L2_COLUMNS = ("L2-category", "l2-category")


def is_none(value: object) -> bool:
    """LLaVA's ``is_none`` on a cell as pandas reads it (NaN, or "nan"/"none")."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    text = str(value)
    return text in _PANDAS_NA or text.lower() in ("nan", "none")


#: VLMEvalKit's option-matching rules, by the commit whose matching_util.py they reproduce
#: (see the module docstring); the first is the default.
MATCHING_RULES = ("a67ace50", "aca64dbb")
DEFAULT_RULES = MATCHING_RULES[0]
# a67ace50's _VERBOSE_ANSWER_RE, verbatim: "The correct answer is **B**", "The answer is C."
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def matching_label(rules: str) -> str:
    """What a score file records: ``vlmevalkit@<commit>``; unknown rules are an error."""
    if rules not in MATCHING_RULES:
        raise BenchmarkError(
            f"--matching: {rules!r} is not one of {', '.join(MATCHING_RULES)} "
            "(VLMEvalKit commits)"
        )
    return f"vlmevalkit@{rules}"


def can_infer_option(
    answer: str, choices: Mapping[str, str], rules: str = DEFAULT_RULES
) -> str | bool:
    """The option letter named in ``answer``, ``"Z"`` for a refusal, else False.

    VLMEvalKit's ``can_infer_option``: punctuation becomes spaces, and the answer names an
    option when exactly one of the option letters is one of its words (``a67ace50``: and
    its first occurrence is among the last four words, else an "answer is X" phrase).
    """
    if "Failed to obtain answer via API" in answer:
        return False
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    text = answer
    for c in ".()[],:;!*#{}":
        text = text.replace(c, " ")
    words = text.split()
    named = [ch for ch in choices if ch in words]
    # (VLMEvalKit's VERBOSE-only "A might be a quantifier" check is off by default.)
    if len(named) == 1:
        if rules == "aca64dbb" or words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    if rules == "aca64dbb":
        return False
    m = _ANSWER_IS.search(answer)
    return m.group(1).upper() if m and m.group(1).upper() in choices else False


def can_infer_text(
    answer: str, choices: Mapping[str, str], rules: str = DEFAULT_RULES
) -> str | bool:
    """The option whose text (lower-cased) is in ``answer``, when exactly one is
    (``a67ace50``: not looked for in an answer longer than twice all options' text)."""
    answer = answer.lower()
    if rules != "aca64dbb" and len(answer) > 2 * sum(
        len(str(v)) for v in choices.values()
    ):
        return False
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(
    answer: object, choices: Mapping[str, str], rules: str = DEFAULT_RULES
) -> str | bool:
    """VLMEvalKit's rule-based option extraction: by letter, else by option text."""
    answer = str(answer)
    # VLMEvalKit's can_infer_text lower-cases the choices dict in place; use a copy.
    choices = dict(choices)
    return can_infer_option(answer, choices, rules) or can_infer_text(
        answer, choices, rules
    )


class MMBench:
    """MMBench (English or Chinese TSV, or lmms-eval's Parquet) with circular evaluation."""

    name = "mmbench"
    judged = False
    max_new_tokens = 1024

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from the TSV; images decoded from base64 to encoded bytes. Or from a
        ``.parquet`` file or a folder of ``.parquet`` shards (lmms-eval's release).

        ``data_root`` is not used: the images are inside the TSV (or Parquet).
        """
        path = Path(questions)
        shards = parquet.parquet_files(path)
        if shards:
            return self._load_parquet(shards)
        if not path.is_file():
            raise BenchmarkError(
                f"{path}: MMBench TSV (or .parquet file or folder of shards) not found"
            )
        csv.field_size_limit(sys.maxsize)
        with open_text(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            for col in ("index", "question", "image", "A", "B"):
                if col not in header:
                    raise BenchmarkError(
                        f"{path}: column {col!r} missing from the header"
                    )
            # line_num: the (last) file line of the row, quoted line breaks included.
            rows = [(reader.line_num, row) for row in reader]
        images = {row["index"]: row["image"] for _, row in rows if row.get("image")}
        out = []
        seen: set[int] = set()
        for n, row in rows:
            where = f"{path}:{n}"
            if None in row or any(v is None for v in row.values()):
                raise BenchmarkError(
                    f"{where}: {len(header)} columns in the header, not on this row"
                )
            image = partial(_tsv_image, row, images, where)
            out.append(_question(row, where, seen, image, cell="field"))
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        l2 = parquet.first_column(_L2_COLUMNS, files)
        out = []
        seen: set[int] = set()
        rows = parquet.iter_rows(files, _PARQUET_REQUIRED, (*_PARQUET_OPTIONAL, l2))
        for path, n, row in rows:
            image = partial(parquet.image_bytes, row["image"], path, n)
            where = f"{path}: row {n}"
            out.append(_question(row, where, seen, image, l2=l2, min_options=2))
        if not out:
            raise BenchmarkError(f"{files[0]}: no rows")
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """Circular accuracy: overall, per category, per l2-category (per split).

        A group counts when its main row (``index < 10^6``) is among ``questions``; all its
        given rows must be answered with the right option. ``matching``: one of
        :data:`MATCHING_RULES` (recorded in the result).
        """
        rules = options.get("matching") or DEFAULT_RULES
        label = matching_label(rules)
        check_answered(self.name, questions, predictions)
        for q in questions:
            if q.meta["answer"] is None:
                raise BenchmarkError(
                    f"mmbench: question {q.question_id} has no answer (a test split?)"
                )
        groups: dict[int, list[Question]] = {}
        for q in questions:
            groups.setdefault(q.meta["group"], []).append(q)
        unextracted = 0
        hit: dict[int, bool] = {}
        for g, members in groups.items():
            ok = True
            for q in members:
                opt = can_infer(predictions[q.question_id], q.meta["options"], rules)
                unextracted += opt is False
                ok &= opt == q.meta["answer"]
            hit[g] = ok
        # VLMEvalKit reports the main rows (index == index mod 10^6), one per group.
        mains = [q for q in questions if q.question_id == q.meta["group"]]
        if not mains:
            raise BenchmarkError(
                "mmbench: no main row (index < 10^6) among the questions"
            )
        out: dict[str, Any] = {
            "overall": _mean(hit[q.meta["group"]] for q in mains),
            "categories": _by(mains, hit, "category"),
            "l2_categories": _by(mains, hit, "l2_category"),
            "unextracted": unextracted,
            "matching": label,
        }
        if len({q.meta["split"] for q in mains}) > 1:
            out["splits"] = _by(mains, hit, "split")
        return out

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """A LLaVA answer file (``question_id`` = the TSV ``index``)."""
        return read_answers(path)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _by(mains: Sequence[Question], hit: Mapping[int, bool], key: str) -> dict:
    names = sorted({q.meta[key] for q in mains if q.meta[key] is not None})
    return {
        name: _mean(hit[q.meta["group"]] for q in mains if q.meta[key] == name)
        for name in names
    }


def _question(
    row: Mapping[str, Any],
    where: str,
    seen: set[int],
    image: Callable[[], bytes],
    cell: str = "column",
    l2: str = "l2-category",
    min_options: int = 0,
) -> Question:
    """One row (TSV or Parquet) as a question: LLaVA's prompt and what scoring needs.

    ``where`` opens the errors (``file:line``, ``file: row n``), which call a column a
    ``cell``; ``image`` gives the encoded image once the other cells are checked;
    ``seen`` collects the indices; ``l2`` spells the l2-category column; fewer than
    ``min_options`` options is an error.
    """
    try:
        index = int(row["index"])
    except (TypeError, ValueError):
        raise BenchmarkError(
            f"{where}: {cell} 'index' is {row['index']!r}, not an integer"
        ) from None
    if index in seen:
        raise BenchmarkError(f"{where}: index {index} repeated")
    seen.add(index)
    # A null (Parquet) cell is NaN to pandas, so is_none treats it as absent, as LLaVA
    # and lmms-eval (pd.notna) do.
    options = {}
    for letter in OPTION_LETTERS:
        if is_none(row.get(letter)):
            break  # LLaVA's get_options stops at the first missing option
        options[letter] = str(row[letter])
    if len(options) < min_options:
        raise BenchmarkError(
            f"{where}: {cell} {OPTION_LETTERS[len(options)]!r} is empty"
        )
    answer = row.get("answer")
    if not is_none(answer) and answer not in options:
        raise BenchmarkError(
            f"{where}: {cell} 'answer' is {answer!r}, not one of the options "
            f"{''.join(options)}"
        )
    question = string_cell(row, "question", where, cell)
    hint = row.get("hint")
    if not is_none(hint):
        question = f"{hint}\n{question}"
    for letter, option in options.items():
        question += f"\n{letter}. {option}"
    return Question(
        question_id=index,
        image=image(),
        text=f"{question}\n{OPTION_LETTER}",
        meta={
            "answer": None if is_none(answer) else answer,
            "options": options,
            "group": index % CIRCULAR_STRIDE,
            "category": row.get("category"),
            "l2_category": row.get(l2),
            "split": row.get("split"),
        },
    )


def _tsv_image(row: Mapping[str, str], images: Mapping[str, str], where: str) -> bytes:
    """The row's base64 image decoded; a value of at most 64 characters is the index of
    the row holding the image."""
    image = row["image"]
    if len(image) <= 64:  # a reference to the row holding the image
        image = images.get(image, "")
        if len(image) <= 64:
            raise BenchmarkError(
                f"{where}: field 'image' refers to index {row['image']!r}, "
                "which holds no image"
            )
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise BenchmarkError(f"{where}: field 'image' is not base64") from None


BENCHMARK = MMBench()
