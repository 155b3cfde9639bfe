"""MMVP: multimodal visual patterns, "Eyes wide shut? Exploring the visual shortcomings of
multimodal LLMs" (Tong et al., CVPR 2024, arXiv:2401.06209).

150 pairs of "CLIP-blind" images, each pair asked the same two-option question with
opposite answers. ``Questions.csv`` (tsb0601/MMVP release): ``Index``, ``Question``,
``Options`` (``"(a) Open (b) Closed"``), ``Correct Answer`` (``"(a)"`` or ``"(b)"``); images
``MMVP Images/<Index>.jpg`` next to it; a pair is indices (1, 2), (3, 4), ...

Prompt: lmms-eval's (``lmms_eval/tasks/mmvp/utils.py`` ``mmvp_doc_to_text`` with the
``_default_template_yaml`` post-prompt): the question, the options as ``\\nA. <text>``,
``\\nB. <text>``, then ``\\n`` and :data:`~fedsim.eval.benchmark.OPTION_LETTER`, i.e. the
LLaVA-1.5 multiple-choice format. MMVP's own ``scripts/evaluate_mllm.py`` asks
``question + " " + options`` with no instruction and leaves the reading to a GPT-4 grader
(``scripts/gpt_grader.py``); LLaVA-1.5 has no MMVP script. Generation length: lmms-eval's
16 new tokens (enough for a letter; MMVP's script allows 1024 for free-form answers).

Scoring: the official grader is an LLM judge; here the answer is read by rule instead,
VLMEvalKit's ``can_infer`` (:func:`fedsim.eval.mmbench.can_infer`: an option letter among
the words, else exactly one option's text in the answer), which VLMEvalKit also applies to
MMVP in exact-matching mode, in the version chosen by ``matching`` (VLMEvalKit commit
a67ace50 by default, aca64dbb the older one: see :mod:`fedsim.eval.mmbench`), which the
scores record. An answer the rule cannot read is wrong (``unextracted`` counts them).
Metrics as MMVP's grader and VLMEvalKit's ``report_acc_MMVP``:
``pair_accuracy``, the share of complete pairs with both questions right (MMVP's headline
number), and ``accuracy`` over questions. The labels are the release's as they are
(lmms-eval swaps the answers of indices 99/100 and 279/280, reported wrong in
tsb0601/MMVP issue 30; that fix is not applied).

lmms-eval's Parquet release loads too: the CSV's columns ``Index``, ``Question``,
``Options``, ``Correct Answer`` plus ``image`` ({bytes, path}); ``index``, ``question``,
``options`` (a string, or a list of option texts) and ``answer`` are read as well, the
spellings ``lmms_eval/tasks/mmvp/utils.py`` accepts. Its dataset is ``MMVP/MMVP``
(``_default_template_yaml``; images only, says the task README, so it fails here on the
missing columns) or ``lmms-lab-eval/MMVP``, which has the 99/100 and 279/280 labels
swapped back at source (task README): labels are taken as the file gives them, so that
release scores those four questions differently from ``Questions.csv``.
"""

from __future__ import annotations

import csv
import re
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
from fedsim.eval.mmbench import DEFAULT_RULES, can_infer, matching_label

_COLUMNS = ("Index", "Question", "Options", "Correct Answer")
_CSV_COLUMNS = {c: c for c in _COLUMNS}
# "(a) text (b) text": a letter in parentheses, then its text up to the next one.
_OPTION = re.compile(
    r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", re.IGNORECASE | re.DOTALL
)
# The release's folder name; evaluate_mllm.py spells it "MMVP Imgaes".
_IMAGE_FOLDERS = ("MMVP Images", "MMVP Imgaes")
# Parquet: each field's column spellings, as lmms_eval/tasks/mmvp/utils.py reads them.
_PARQUET_ALIASES = {
    "Index": ("Index", "index"),
    "Question": ("Question", "question"),
    "Options": ("Options", "options"),
    "Correct Answer": ("Correct Answer", "answer"),
}


def parse_options(options: str) -> list[str]:
    """``"(a) Open (b) Closed"`` → ``["Open", "Closed"]``; letters must run a, b, ...

    Raises
    ------
    ValueError
        When the text is not a run of ``(a) … (b) …`` options.
    """
    found = _OPTION.findall(options.strip())
    letters = [m[0].lower() for m in found]
    if len(found) < 2 or letters != [chr(ord("a") + i) for i in range(len(found))]:
        raise ValueError(f"options {options!r} are not '(a) ... (b) ...'")
    return [m[1] for m in found]


class Mmvp:
    """MMVP's 300 questions (150 image pairs), from the CSV or lmms-eval's Parquet."""

    name = "mmvp"
    judged = False
    max_new_tokens = 16

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from ``Questions.csv``.

        Parameters
        ----------
        questions:
            ``Questions.csv``; or a ``.parquet`` file, or a folder of ``.parquet``
            shards (images inside).
        data_root:
            The image folder, or the folder that holds ``MMVP Images/``; default
            ``MMVP Images/`` next to ``Questions.csv``. Not used for Parquet.
        """
        path = Path(questions)
        shards = parquet.parquet_files(path)
        if shards:
            return self._load_parquet(shards)
        if not path.is_file():
            raise BenchmarkError(f"{path}: MMVP Questions.csv not found")
        images = _image_folder(Path(data_root) if data_root else path.parent)
        if data_root is None and images == path.parent:
            images = path.parent / _IMAGE_FOLDERS[0]
        with open_text(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            for col in _COLUMNS:
                if col not in header:
                    raise BenchmarkError(
                        f"{path}: column {col!r} missing from the header"
                    )
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
        out = []
        seen: set[int] = set()
        for n, row in rows:
            try:
                index = int(row["Index"])
            except (TypeError, ValueError):
                raise BenchmarkError(
                    f"{path}:{n}: field 'Index' is {row['Index']!r}, not an integer"
                ) from None
            if index < 1 or index in seen:
                raise BenchmarkError(f"{path}:{n}: Index {index} repeated or below 1")
            seen.add(index)
            # DictReader's None for a short row's missing cell reads as empty.
            row["Question"] = row["Question"] or ""
            image = partial(str, images / f"{index}.jpg")
            out.append(
                _question(row, f"{path}:{n}", "field", _CSV_COLUMNS, index, image)
            )
        if not out:
            raise BenchmarkError(f"{path}: no questions")
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        col = {
            field: parquet.first_column(names, files)
            for field, names in _PARQUET_ALIASES.items()
        }
        out = []
        seen: set[int] = set()
        for path, n, row in parquet.iter_rows(files, (*col.values(), "image")):
            where = f"{path}: row {n}"
            raw = row[col["Index"]]
            try:
                index = int(raw)
            except (TypeError, ValueError):
                index = 0
            if index < 1 or index in seen:
                raise BenchmarkError(
                    f"{where}: column {col['Index']!r} is {raw!r}: not an integer "
                    "from 1, or repeated"
                )
            seen.add(index)
            image = partial(parquet.image_bytes, row["image"], path, n)
            out.append(_question(row, where, "column", col, index, image))
        if not out:
            raise BenchmarkError(f"{files[0]}: no rows")
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        **options: Any,
    ) -> dict[str, Any]:
        """Pair accuracy (complete pairs only), per-question accuracy, unread answers.

        ``matching``: VLMEvalKit's rule version (:data:`fedsim.eval.mmbench.MATCHING_RULES`),
        recorded in the result.
        """
        rules = options.get("matching") or DEFAULT_RULES
        label = matching_label(rules)
        check_answered(self.name, questions, predictions)
        pairs: dict[int, list[bool]] = {}
        unextracted = 0
        for q in questions:
            opt = can_infer(predictions[q.question_id], q.meta["options"], rules)
            unextracted += opt is False
            pairs.setdefault(q.meta["pair"], []).append(opt == q.meta["answer"])
        hits = [h for v in pairs.values() for h in v]
        complete = [v for v in pairs.values() if len(v) == 2]
        return {
            "pair_accuracy": (
                sum(all(v) for v in complete) / len(complete)
                if complete
                else float("nan")
            ),
            "accuracy": sum(hits) / len(hits),
            "unextracted": unextracted,
            "matching": label,
        }

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """A LLaVA answer file (``question_id`` = ``Index``)."""
        return read_answers(path)


def _question(
    row: Mapping[str, Any],
    where: str,
    cell: str,
    col: Mapping[str, str],
    index: int,
    image: Callable[[], str | bytes],
) -> Question:
    """Question ``index`` from a CSV or Parquet row: the prompt, gold letter, options.

    ``col`` maps the CSV's column names to the row's; ``where`` opens the errors, which
    call a column a ``cell``; ``image`` gives the image once the row is checked.
    """
    raw_options = row[col["Options"]]
    if isinstance(raw_options, list) and len(raw_options) >= 2:
        options = [str(o).strip() for o in raw_options]
    else:
        try:
            options = parse_options(str(raw_options or ""))
        except ValueError as e:
            raise BenchmarkError(f"{where}: {cell} {col['Options']!r}: {e}") from None
    letters = [chr(ord("A") + i) for i in range(len(options))]
    raw_gold = row[col["Correct Answer"]]
    gold = str(raw_gold or "").strip().strip("()").upper()
    if gold not in letters:
        raise BenchmarkError(
            f"{where}: {cell} {col['Correct Answer']!r} is {raw_gold!r}, not "
            f"one of {', '.join(f'({c.lower()})' for c in letters)}"
        )
    text = string_cell(row, col["Question"], where, cell).strip()
    for letter, option in zip(letters, options):
        text += f"\n{letter}. {option}"
    return Question(
        question_id=index,
        image=image(),
        text=f"{text}\n{OPTION_LETTER}",
        meta={
            "answer": gold,
            "options": dict(zip(letters, options)),
            "pair": (index - 1) // 2,
        },
    )


def _image_folder(root: Path) -> Path:
    for name in _IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    return root


BENCHMARK = Mmvp()
