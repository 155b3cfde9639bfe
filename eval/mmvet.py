"""MM-Vet: integrated vision-language capabilities, graded by an LLM (arXiv:2308.02490).

Source: ``yuweihao/MM-Vet``. ``mm-vet.json`` maps ``"v1_0"`` … ``"v1_217"`` to
``{"imagename", "capability": [...], "question", "answer"}``; images live in
``images/<imagename>``. Capabilities: ``rec`` (recognition), ``ocr``, ``know``
(knowledge), ``gen`` (language generation), ``spat`` (spatial awareness), ``math``.

Prompt (LLaVA-1.5, ``haotian-liu/LLaVA`` ``scripts/v1_5/eval/mmvet.sh`` →
``llava/eval/model_vqa.py``): the question as is, no answer instruction; up to 1024 new
tokens. LLaVA's answer file keeps the integer ids of ``llava-mm-vet.jsonl`` and
``scripts/convert_mmvet_for_eval.py`` turns them back into ``"v1_<id>"`` keys; both id
forms are read here.

Grading follows ``yuweihao/MM-Vet`` ``mm-vet_evaluator.py`` (the script form of
``mm-vet_evaluator.ipynb``):

* the few-shot prompt :data:`GRADER_PROMPT`, verbatim, then one table row
  ``question | ground truth | prediction | `` with ``<AND>`` / ``<OR>`` padded by
  spaces, sent as the only (user) message, ``max_tokens=3``, ``temperature=0``;
* the grade is ``float(reply.split(" ")[0].strip())`` and must lie in [0, 1];
  otherwise the row is sent again with ``"\\nPredict the correctness of the answer
  (digit): "`` appended, at the same temperature, which then rises by 0.5; after
  five such re-asks the grade is 0.0 (the official loop, six requests at most);
* a capability's score is the mean grade of the questions that need it, ×100; a
  capability integration's (the exact set of capabilities a question needs) likewise;
  ``total`` is the mean over all questions ×100; all rounded to one decimal.

The official script averages ``--num_run`` gradings (1 by default; 5 in the paper);
this module grades once.

lmms-eval's Parquet release loads too (``lmms-lab/MMVet``, ``data/test-*.parquet``;
columns from ``lmms_eval/tasks/mmvet/utils.py``): ``question_id`` (the ``"v1_<n>"`` key),
``question``, ``answer``, ``capability`` (comma-separated, ``"ocr,math"``; lmms-eval splits
it on ``","``), ``image`` ({bytes, path}), and ``image_source`` (the image name, unused).
The prompt stays LLaVA-1.5's, the question alone (lmms-eval's yaml prepends a "think step
by step" instruction).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import read_answers
from fedsim.eval.benchmark import (
    BenchmarkError,
    Question,
    check_answered,
    open_text,
    read_text,
)
from fedsim.eval.judge import Judge, JudgeConfig, require_judge

# yuweihao/MM-Vet, mm-vet_evaluator.py: `prompt`, verbatim (it ends with a newline).
GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501

#: Appended to the row when a grade could not be parsed (mm-vet_evaluator.py).
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

#: The official grader's settings (mm-vet_evaluator.py).
GRADER_MAX_TOKENS = 3
GRADER_TEMPERATURE = 0.0
TEMPERATURE_STEP = 0.5
MAX_TRIES = 5

#: The six capabilities, in the paper's order (names of capability integrations
#: follow it, e.g. ``rec_know_gen``).
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

_V1_KEY = re.compile(r"v1_(\d+)")
_PARQUET_COLUMNS = ("question_id", "question", "answer", "capability", "image")


def grader_row(question: str, answer: str, prediction: str) -> str:
    """The grader's request: the few-shot prompt and this question's table row.

    ``question | ground truth | prediction | `` with ``<AND>`` / ``<OR>`` padded by a
    space on each side, as ``mm-vet_evaluator.py`` builds it.
    """
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return GRADER_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def parse_grade(content: str | None) -> float | None:
    """The grade in a reply (first space-separated token, a float in [0, 1]), or None.

    Unlike the official ``float()`` check, ``nan`` is refused (it passes both range
    comparisons there and would poison every mean).
    """
    if content is None:
        return None
    try:
        grade = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return grade if 0.0 <= grade <= 1.0 else None


@dataclass(frozen=True)
class Grade:
    """One question's grade: ``score`` in [0, 1], the last reply, and how many requests
    it took (``tries`` > :data:`MAX_TRIES` means no reply parsed and the score is 0)."""

    score: float
    content: str | None
    tries: int
    model: str


def grade(
    judge: Judge,
    question: str,
    answer: str,
    prediction: str,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Grade:
    """Grade one prediction the way ``mm-vet_evaluator.py`` does (see module docstring).

    ``temperature`` / ``max_tokens`` default to the judge config's, then to the
    official 0.0 / 3. The temperature is capped at 2.0, the API's maximum.
    """
    cfg = judge.config
    if temperature is None:
        temperature = GRADER_TEMPERATURE if cfg.temperature is None else cfg.temperature
    if max_tokens is None:
        max_tokens = GRADER_MAX_TOKENS if cfg.max_tokens is None else cfg.max_tokens
    row = grader_row(question, answer, prediction)
    reply = judge.chat([{"role": "user", "content": row}], temperature, max_tokens)
    tries = 1
    # The official loop: parse; on failure re-ask with the suffix at the current
    # temperature, then raise it; after the fifth re-ask give 0.0 unparsed.
    while (score := parse_grade(reply.content)) is None:
        reply = judge.chat(
            [{"role": "user", "content": row + RETRY_SUFFIX}],
            min(temperature, 2.0),
            max_tokens,
        )
        tries += 1
        temperature += TEMPERATURE_STEP
        if tries > MAX_TRIES:
            score = 0.0
            break
    return Grade(score=score, content=reply.content, tries=tries, model=reply.model)


def summarize(
    capabilities: Sequence[Sequence[str]],
    scores: Sequence[float],
    decimal_places: int = 1,
) -> dict[str, Any]:
    """Capability, capability-integration and total scores (×100) from per-question
    grades, as ``export_result`` in ``mm-vet_evaluator.py`` computes them."""
    if len(capabilities) != len(scores) or not scores:
        raise ValueError("summarize: need one capability list per score, and some")
    cap_sum: defaultdict[str, float] = defaultdict(float)
    cap_n: Counter[str] = Counter()
    int_sum: defaultdict[str, float] = defaultdict(float)
    int_n: Counter[str] = Counter()
    for caps, s in zip(capabilities, scores):
        # The official script keys integrations by "_".join(set(caps)), whose order
        # depends on string hashing; the paper's order makes the names stable.
        names = _ordered(set(caps))
        for c in names:
            cap_sum[c] += s
            cap_n[c] += 1
        key = "_".join(names)
        int_sum[key] += s
        int_n[key] += 1

    def pct(total: float, n: int) -> float:
        return round(total / n * 100, decimal_places)

    out: dict[str, Any] = {"total": pct(sum(scores), len(scores))}
    for c in _ordered(cap_n):
        out[c] = pct(cap_sum[c], cap_n[c])
    # Most frequent integration first, as the official table orders its columns.
    ints = sorted(int_n, key=lambda k: -int_n[k])
    out["integration"] = {k: pct(int_sum[k], int_n[k]) for k in ints}
    return out


def _question_id(key: str, where: str, seen: set[int | str]) -> int | str:
    """The id of question ``key``: the integer of a ``v1_<n>`` key (LLaVA's ids), any
    other key as is; an id in ``seen`` is an error, a new one joins it."""
    m = _V1_KEY.fullmatch(key)
    qid: int | str = int(m.group(1)) if m else key
    if qid in seen:
        raise BenchmarkError(f"{where}: question id {qid!r} appears twice")
    seen.add(qid)
    return qid


def _is_capabilities(caps: object) -> bool:
    """A non-empty list of strings."""
    return (
        isinstance(caps, list) and bool(caps) and all(isinstance(c, str) for c in caps)
    )


def _question(
    qid: int | str,
    key: str,
    image: str | bytes,
    question: str,
    answer: str,
    caps: Sequence[str],
) -> Question:
    """Question ``qid`` (``key`` in the official file): the prompt is the question
    alone, LLaVA-1.5's; the meta is what grading needs."""
    return Question(
        question_id=qid,
        image=image,
        text=question,
        meta={
            "key": key,
            "capability": tuple(caps),
            "question": question,
            "answer": answer,
        },
    )


class MMVet:
    """MM-Vet v1 (218 questions; official JSON or lmms-eval's Parquet), graded by an
    LLM judge."""

    name = "mmvet"
    judged = True
    max_new_tokens = 1024

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from ``mm-vet.json`` (or the folder holding it).

        Images resolve to ``data_root/images/<imagename>``; ``data_root`` defaults to
        the folder of ``mm-vet.json``. ``question_id`` is the integer of a ``v1_<n>``
        key (LLaVA's ``llava-mm-vet.jsonl`` ids), any other key as is. A ``.parquet``
        file, or a folder of ``.parquet`` shards without ``mm-vet.json``, is read as
        lmms-eval's release (images inside).
        """
        path = Path(questions)
        shards = parquet.parquet_files(path)
        if shards and not (path / "mm-vet.json").is_file():
            return self._load_parquet(shards)
        if path.is_dir():
            path = path / "mm-vet.json"
        if not path.is_file():
            raise BenchmarkError(f"{path}: MM-Vet question file not found")
        root = Path(data_root) if data_root is not None else path.parent
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg})"
            ) from None
        if not isinstance(data, dict) or not data:
            raise BenchmarkError(
                f"{path}: expected a JSON object of questions keyed 'v1_<n>'"
            )
        out: list[Question] = []
        seen: set[int | str] = set()
        for key, rec in data.items():
            where = f"{path}:{_line_of(text, key)}: {key!r}"
            if not isinstance(rec, dict):
                raise BenchmarkError(f"{where}: not an object")
            for field_name in ("imagename", "question", "answer"):
                if not isinstance(rec.get(field_name), str):
                    raise BenchmarkError(
                        f"{where}: field '{field_name}' missing or not a string"
                    )
            caps = rec.get("capability")
            if not _is_capabilities(caps):
                raise BenchmarkError(
                    f"{where}: field 'capability' must be a non-empty list of strings"
                )
            qid = _question_id(key, where, seen)
            image = str(root / "images" / rec["imagename"])
            out.append(_question(qid, key, image, rec["question"], rec["answer"], caps))
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        out: list[Question] = []
        seen: set[int | str] = set()
        for path, n, row in parquet.iter_rows(files, _PARQUET_COLUMNS):
            where = f"{path}: row {n}"
            raw = row["question_id"]
            if isinstance(raw, int) and not isinstance(raw, bool):
                key = f"v1_{raw}"
            else:
                key = parquet.string(row, "question_id", path, n)
            qid = _question_id(key, where, seen)
            question = parquet.string(row, "question", path, n)
            answer = parquet.string(row, "answer", path, n)
            caps = row["capability"]
            if isinstance(caps, str):
                caps = [c.strip() for c in caps.split(",") if c.strip()]
            if not _is_capabilities(caps):
                raise BenchmarkError(
                    f"{where}: column 'capability' is {row['capability']!r}, not "
                    "comma-separated capabilities"
                )
            image = parquet.image_bytes(row["image"], path, n)
            out.append(_question(qid, key, image, question, answer, caps))
        if not out:
            raise BenchmarkError(f"{files[0]}: no rows")
        return out

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """Predictions keyed by question id, from a LLaVA answer file (JSON lines, ids
        ``0`` or ``"v1_0"``) or an MM-Vet results file (one object ``{"v1_0": text}``,
        what ``convert_mmvet_for_eval.py`` writes and the official grader reads)."""
        path = Path(path)
        raw = _results_file(path)
        answers: Mapping[int | str, str] = (
            raw if raw is not None else read_answers(path)
        )
        lookup: dict[int | str, int | str] = {}
        for q in questions:
            lookup[q.question_id] = q.question_id
            lookup[str(q.question_id)] = q.question_id
            lookup[q.meta["key"]] = q.question_id
        out: dict[int | str, str] = {}
        for k, text in answers.items():
            qid = lookup.get(k, k)
            if qid in out:
                raise BenchmarkError(f"{path}: question {k!r} answered twice")
            out[qid] = text
        return out

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        judge: JudgeConfig | Mapping[str, Any] | None = None,
        details: bool = False,
        decimal_places: int = 1,
        **_: Any,
    ) -> dict[str, Any]:
        """MM-Vet scores of ``predictions`` graded by ``judge``.

        Parameters
        ----------
        questions, predictions:
            From :meth:`load` and :meth:`read_predictions` (question id → answer).
        judge:
            The judge endpoint; without one this raises
            :class:`~fedsim.eval.judge.JudgeNotConfigured`.
        details:
            Also return each question's grade (``grades``: id, score, reply, tries).
        decimal_places:
            Rounding of the reported percentages (the official default, 1).

        Returns
        -------
        dict
            ``total``, one entry per capability, ``integration`` (capability set →
            score), ``judge_model``, ``n``, ``regraded`` (questions whose first reply
            did not parse) and ``unparsed`` (questions graded 0.0 because no reply
            parsed).
        """
        client = require_judge(judge, self.name)
        check_answered(self.name, questions, predictions)

        def one(q: Question) -> Grade:
            return grade(
                client, q.meta["question"], q.meta["answer"], predictions[q.question_id]
            )

        grades = client.map(one, questions)
        out = summarize(
            [q.meta["capability"] for q in questions],
            [g.score for g in grades],
            decimal_places=decimal_places,
        )
        out["judge_model"] = client.model
        out["n"] = len(questions)
        out["regraded"] = sum(g.tries > 1 for g in grades)
        out["unparsed"] = sum(g.tries > MAX_TRIES for g in grades)
        if details:
            out["grades"] = [
                {
                    "question_id": q.question_id,
                    "key": q.meta["key"],
                    "score": g.score,
                    "content": g.content,
                    "tries": g.tries,
                    "judge_model": g.model,
                }
                for q, g in zip(questions, grades)
            ]
        return out


def _ordered(caps: Any) -> list[str]:
    """Capabilities in the paper's order, unknown ones after it, sorted."""
    known = [c for c in CAPABILITIES if c in caps]
    return known + sorted(c for c in caps if c not in CAPABILITIES)


def _line_of(text: str, key: str) -> int:
    """1-based line of ``"key":`` in a JSON text (the line of the object's start)."""
    i = text.find(json.dumps(key))
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def _results_file(path: Path) -> dict[int | str, str] | None:
    """An MM-Vet results object ``{"v1_0": "text", ...}``, or None for other files."""
    if not path.is_file():
        return None
    with open_text(path) as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return None
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError:
        return None  # JSON lines: one object a line
    if not isinstance(data, dict) or "question_id" in data:
        return None
    for k, v in data.items():
        if not isinstance(v, str):
            raise BenchmarkError(f"{path}: {k!r}: the answer is not a string")
    return dict(data)


BENCHMARK = MMVet()
