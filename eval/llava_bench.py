"""LLaVA-Bench (In-the-Wild): 60 open questions on 24 images, GPT-4 as the reviewer.

Introduced with LLaVA (Visual Instruction Tuning, arXiv:2304.08485); files from
``liuhaotian/llava-bench-in-the-wild``: ``questions.jsonl`` (``question_id``, ``image``,
``text``, ``category`` ∈ conv / detail / complex), ``context.jsonl`` (one caption per
image), ``answers_gpt4.jsonl`` (the GPT-4 reference answers, LLaVA's answer format),
``images/<image>``.

Prompt (LLaVA-1.5, ``haotian-liu/LLaVA`` ``scripts/v1_5/eval/llavabench.sh`` →
``llava/eval/model_vqa.py``): the question text as is; up to 1024 new tokens.

Review, as ``llava/eval/eval_gpt_review_bench.py`` with ``llava/eval/table/rule.json``:
one request per question with the system message :data:`SYSTEM_PROMPT` and the user
message ``[Context]`` (caption) / ``[Question]`` / ``[Assistant 1]`` (GPT-4's answer) /
``[Assistant 2]`` (the model's) / ``[System]`` (the category's rule, :data:`RULES`),
``temperature=0.2``, ``max_tokens=1024``. :func:`parse_score` reads two numbers from
the first line of the review; a review that does not give exactly two yields
``[-1, -1]``, which the official summary averages in like any other.

Summary, as ``llava/eval/summarize_gpt_review.py``: per category and over all
questions, the mean GPT-4 score and the mean model score (each rounded to three
decimals) and the relative score ``round(model / gpt4 × 100, 1)``, the number LLaVA
reports.

Two departures, both documented where they happen: reference answers are matched to
questions by ``question_id`` (the official script zips the files line by line), and the
released captions are strings, which the official ``'\\n'.join(caption)`` would split
into one character per line; they are sent whole (as lmms-eval and VLMEvalKit do)
unless ``literal_context=True`` asks for the official bytes.

lmms-eval's Parquet release loads too (``lmms-lab/llava-bench-in-the-wild``,
``data/train-*.parquet``; columns from ``lmms_eval/tasks/llava-in-the-wild/utils.py``):
``question_id``, ``question``, ``image_id`` (the image name, unused), ``image`` ({bytes,
path}), ``caption`` (the context; a string or a list of strings, joined by lines as
lmms-eval does), ``gpt_answer`` (the GPT-4 reference) and ``category``. The three files'
contents are in each row, so nothing else is read; a ``question_id`` that is a string of
digits becomes the int the official ``questions.jsonl`` has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.eval import parquet
from fedsim.eval.answers import iter_jsonl, read_answers
from fedsim.eval.benchmark import BenchmarkError, Question, check_answered
from fedsim.eval.judge import Judge, JudgeConfig, require_judge

#: eval_gpt_review_bench.py's system message, verbatim.
SYSTEM_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer."
)

# haotian-liu/LLaVA, llava/eval/table/rule.json: the three llava_bench_* rules, verbatim
# (they share one prompt).
_BENCH_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in "
    "response to the user question displayed above. The user asks the question on "
    "observing an image. For your reference, the visual content in the image is "
    "represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a "
    "higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores "
    "for Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias and ensuring that the order in which the "
    "responses were presented does not affect your judgment."
)
RULES: dict[str, dict[str, str]] = {
    "llava_bench_conv": {"role": "Assistant", "prompt": _BENCH_PROMPT},
    "llava_bench_detail": {"role": "Assistant", "prompt": _BENCH_PROMPT},
    "llava_bench_complex": {"role": "Assistant", "prompt": _BENCH_PROMPT},
}
CATEGORIES = ("conv", "detail", "complex")
_PARQUET_COLUMNS = (
    "question_id",
    "question",
    "image",
    "caption",
    "gpt_answer",
    "category",
)

#: eval_gpt_review_bench.py's settings.
REVIEW_TEMPERATURE = 0.2
REVIEW_MAX_TOKENS = 1024


def review_content(
    context: str, question: str, answer1: str, answer2: str, category: str
) -> str:
    """The reviewer's user message, byte for byte as eval_gpt_review_bench.py builds it.

    ``category`` is the bare one (``conv``); ``answer1`` is GPT-4's reference answer,
    ``answer2`` the model's.
    """
    rule = RULES["llava_bench_" + category]
    role, prompt = rule["role"], rule["prompt"]
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
        f"[System]\n{prompt}\n\n"
    )


def parse_score(review: str | None) -> list[float]:
    """``[gpt4, model]`` from the review's first line, or ``[-1, -1]`` (official rule).

    The first line, commas read as spaces, split on single spaces, must give exactly
    two numbers.
    """
    if review is None:  # the official code fails on None.split and gives the same
        return [-1.0, -1.0]
    pair = review.split("\n")[0].replace(",", " ").split(" ")
    if len(pair) != 2:
        return [-1.0, -1.0]
    try:
        return [float(pair[0]), float(pair[1])]
    except ValueError:
        return [-1.0, -1.0]


def summarize(categories: Sequence[str], tuples: Sequence[Sequence[float]]) -> dict:
    """Relative and absolute scores per category and overall (summarize_gpt_review.py).

    Returns ``{key: relative}`` plus ``{key}_gpt4_mean`` and ``{key}_model_mean`` for
    ``key`` in ``all`` and each category present; a relative score is None where the
    GPT-4 mean is 0.
    """
    groups: dict[str, list[Sequence[float]]] = {"all": list(tuples)}
    for c in CATEGORIES:
        picked = [t for cat, t in zip(categories, tuples) if cat == c]
        if picked:
            groups[c] = picked
    out: dict[str, Any] = {}
    for key, rows in groups.items():
        # np.asarray(v).mean(0) then round(x, 3), as the official summary does.
        gpt4 = round(sum(float(r[0]) for r in rows) / len(rows), 3)
        model = round(sum(float(r[1]) for r in rows) / len(rows), 3)
        out[key] = round(model / gpt4 * 100, 1) if gpt4 else None
        out[f"{key}_gpt4_mean"] = gpt4
        out[f"{key}_model_mean"] = model
    return out


@dataclass(frozen=True)
class Review:
    """One review: the judge's text, the parsed ``[gpt4, model]`` pair, the model that
    answered."""

    content: str | None
    scores: list[float]
    model: str


def review(
    judge: Judge,
    content: str,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Review:
    """One review request (official system message, temperature 0.2, 1024 tokens)."""
    cfg = judge.config
    if temperature is None:
        temperature = REVIEW_TEMPERATURE if cfg.temperature is None else cfg.temperature
    if max_tokens is None:
        max_tokens = REVIEW_MAX_TOKENS if cfg.max_tokens is None else cfg.max_tokens
    reply = judge.chat(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ],
        temperature,
        max_tokens,
    )
    return Review(reply.content, parse_score(reply.content), reply.model)


def _question(
    qid: int | str,
    image: str | bytes,
    question: str,
    category: str,
    caption: str | list[str],
    reference: str,
) -> Question:
    """Question ``qid``: the prompt is the question as is (LLaVA-1.5's); the meta is
    what the review needs (the image's caption, GPT-4's reference answer)."""
    return Question(
        question_id=qid,
        image=image,
        text=question,
        meta={
            "category": category,
            "question": question,
            "caption": caption,
            "reference": reference,
        },
    )


class LLaVABench:
    """LLaVA-Bench (In-the-Wild), reviewed by an LLM judge against GPT-4's answers;
    the official files or lmms-eval's Parquet."""

    name = "llava_bench"
    judged = True
    max_new_tokens = 1024

    def load(self, questions: Path, data_root: Path | None = None) -> list[Question]:
        """Questions from ``questions.jsonl`` (or the folder holding it).

        ``context.jsonl`` and ``answers_gpt4.jsonl`` are read from the same folder;
        images resolve to ``data_root/images/<image>`` (``data_root`` defaults to that
        folder). A ``.parquet`` file, or a folder of ``.parquet`` shards without
        ``questions.jsonl``, is read as lmms-eval's release (images inside).
        """
        path = Path(questions)
        shards = parquet.parquet_files(path)
        if shards and not (path / "questions.jsonl").is_file():
            return self._load_parquet(shards)
        if path.is_dir():
            path = path / "questions.jsonl"
        folder = path.parent
        root = Path(data_root) if data_root is not None else folder
        context_path = folder / "context.jsonl"
        answers_path = folder / "answers_gpt4.jsonl"

        captions: dict[str, Any] = {}
        for n, rec in iter_jsonl(context_path, "LLaVA-Bench context"):
            image, caption = rec.get("image"), rec.get("caption")
            if not isinstance(image, str):
                raise BenchmarkError(
                    f"{context_path}:{n}: field 'image' missing or not a string"
                )
            if not isinstance(caption, str) and not (
                isinstance(caption, list) and all(isinstance(c, str) for c in caption)
            ):
                raise BenchmarkError(
                    f"{context_path}:{n}: field 'caption' must be a string or a list "
                    "of strings"
                )
            captions[image] = caption
        references = read_answers(answers_path)

        out: list[Question] = []
        seen: set[int | str] = set()
        for n, rec in iter_jsonl(path, "LLaVA-Bench question"):
            where = f"{path}:{n}"
            qid = rec.get("question_id")
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise BenchmarkError(f"{where}: field 'question_id' missing or invalid")
            if qid in seen:
                raise BenchmarkError(f"{where}: question_id {qid!r} appears twice")
            seen.add(qid)
            for field_name in ("image", "text", "category"):
                if not isinstance(rec.get(field_name), str):
                    raise BenchmarkError(
                        f"{where}: field '{field_name}' missing or not a string"
                    )
            if rec["category"] not in CATEGORIES:
                raise BenchmarkError(
                    f"{where}: field 'category': {rec['category']!r} is not one of "
                    f"{', '.join(CATEGORIES)}"
                )
            if rec["image"] not in captions:
                raise BenchmarkError(
                    f"{where}: field 'image': {rec['image']!r} has no caption in "
                    f"{context_path}"
                )
            if qid not in references:
                raise BenchmarkError(
                    f"{where}: question_id {qid!r} has no reference answer in "
                    f"{answers_path}"
                )
            out.append(
                _question(
                    qid,
                    str(root / "images" / rec["image"]),
                    rec["text"],
                    rec["category"],
                    captions[rec["image"]],
                    references[qid],
                )
            )
        if not out:
            raise BenchmarkError(f"{path}: no questions")
        return out

    def _load_parquet(self, files: Sequence[Path]) -> list[Question]:
        out: list[Question] = []
        seen: set[int | str] = set()
        for path, n, row in parquet.iter_rows(files, _PARQUET_COLUMNS):
            where = f"{path}: row {n}"
            qid = row["question_id"]
            if isinstance(qid, str) and qid.strip().isdigit():
                qid = int(qid)
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise BenchmarkError(
                    f"{where}: column 'question_id' is {qid!r}, not an id"
                )
            if qid in seen:
                raise BenchmarkError(f"{where}: question_id {qid!r} appears twice")
            seen.add(qid)
            category = parquet.string(row, "category", path, n)
            if category not in CATEGORIES:
                raise BenchmarkError(
                    f"{where}: column 'category' is {category!r}, not one of "
                    f"{', '.join(CATEGORIES)}"
                )
            caption = row["caption"]
            if not isinstance(caption, str) and not (
                isinstance(caption, list) and all(isinstance(c, str) for c in caption)
            ):
                raise BenchmarkError(
                    f"{where}: column 'caption' is {caption!r}, not a string or a "
                    "list of strings"
                )
            question = parquet.string(row, "question", path, n)
            image = parquet.image_bytes(row["image"], path, n)
            reference = parquet.string(row, "gpt_answer", path, n)
            out.append(_question(qid, image, question, category, caption, reference))
        if not out:
            raise BenchmarkError(f"{files[0]}: no rows")
        return out

    def read_predictions(
        self, path: Path, questions: Sequence[Question]
    ) -> dict[int | str, str]:
        """A LLaVA answer file (``question_id``, ``text`` a line)."""
        return read_answers(path)

    def score(
        self,
        questions: Sequence[Question],
        predictions: Mapping[int | str, str],
        judge: JudgeConfig | Mapping[str, Any] | None = None,
        details: bool = False,
        literal_context: bool = False,
        **_: Any,
    ) -> dict[str, Any]:
        """LLaVA-Bench relative scores of ``predictions`` reviewed by ``judge``.

        Parameters
        ----------
        questions, predictions:
            From :meth:`load` and :meth:`read_predictions` (question id → answer).
        judge:
            The judge endpoint; without one this raises
            :class:`~fedsim.eval.judge.JudgeNotConfigured`.
        details:
            Also return each review (``reviews``: id, category, text, pair).
        literal_context:
            Build ``[Context]`` with the official ``'\\n'.join(caption)`` even on a
            string caption (one character per line): the exact official request.

        Returns
        -------
        dict
            ``all``, ``conv``, ``detail``, ``complex`` (relative scores, %), the
            ``*_gpt4_mean`` / ``*_model_mean`` pairs behind them, ``judge_model``,
            ``n`` and ``unparsed`` (reviews scored ``[-1, -1]``).
        """
        client = require_judge(judge, self.name)
        check_answered(self.name, questions, predictions)

        def one(q: Question) -> Review:
            caption = q.meta["caption"]
            if literal_context or not isinstance(caption, str):
                context = "\n".join(caption)
            else:
                context = caption
            content = review_content(
                context,
                q.meta["question"],
                q.meta["reference"],
                predictions[q.question_id],
                q.meta["category"],
            )
            return review(client, content)

        reviews = client.map(one, questions)
        out = summarize(
            [q.meta["category"] for q in questions], [r.scores for r in reviews]
        )
        out["judge_model"] = client.model
        out["n"] = len(questions)
        out["unparsed"] = sum(r.scores == [-1.0, -1.0] for r in reviews)
        if details:
            out["reviews"] = [
                {
                    "question_id": q.question_id,
                    "category": "llava_bench_" + q.meta["category"],
                    "content": r.content,
                    "tuple": r.scores,
                    "judge_model": r.model,
                }
                for q, r in zip(questions, reviews)
            ]
        return out


BENCHMARK = LLaVABench()
