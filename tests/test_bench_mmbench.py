"""MMBench: VLMEvalKit's rule-based option extraction and circular evaluation.

Tolerances: expected scores are ratios of small counts (2/3, 125.0, ...) and the scorer computes
the same ratios in float64; both differ by a few float64 ulps (~1e-16 relative), so
pytest.approx's default rel 1e-6 cannot fail on rounding, and a miscounted answer moves a score by
at least 1/(number of questions) ≥ 1e-2.
"""

import base64
import csv
import io

import pytest

from fedsim.eval.benchmark import OPTION_LETTER, BenchmarkError
from fedsim.eval.mmbench import BENCHMARK as MMB
from fedsim.eval.mmbench import MATCHING_RULES, can_infer

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("The answer is B", "B"),
        ("(B) dog", "B"),
        ("B: dog", "B"),
        ("dog", "B"),  # option text only
        ("It is a Dog.", "B"),  # text match is case-insensitive
        ("A or B", False),  # two letters: ambiguous
        ("cat or dog", False),  # two option texts: ambiguous
        ("b", False),  # a lower-case letter is not a letter match, nor an option text
        ("elephant", False),
        ("Z", "Z"),  # "none of the options"
        ("Cannot determine the answer", "Z"),  # a refusal
        ("E", False),  # not an option
    ],
)
def test_can_infer(answer, expected):
    for rules in MATCHING_RULES:  # cases on which both rule versions agree
        assert can_infer(answer, CHOICES, rules) == expected, rules


# Where VLMEvalKit's two rule versions part. Expected values: the official
# vlmeval/utils/matching_util.py can_infer at commit aca64dbb (before c3371551) and at
# a67ace50, run on these answers (they also agreed with fedsim's can_infer on 20 000
# random answers built from letters, option texts and "answer is" phrases).
@pytest.mark.parametrize(
    "answer, old, new",
    [
        # c3371551: the one letter must be among the last four words ...
        ("B is right because the dog in the picture is big", "B", False),
        ("B. dog, since the animal barks and has four legs and a tail", "B", False),
        ("I think it is B", "B", "B"),
        # ... and option text is not searched in an answer over twice the options' text.
        (
            "I can see a dog sitting on the grass next to the fence in the garden",
            "B",
            False,
        ),
        ("A dog", "A", "A"),
        # a67ace50: "(correct) answer is X" when the words name no single letter.
        ("The answer is B, not A", False, "B"),
        ("The correct answer is **C**.", "C", "C"),
    ],
)
def test_the_two_rule_versions(answer, old, new):
    assert can_infer(answer, CHOICES, "aca64dbb") == old
    assert can_infer(answer, CHOICES, "a67ace50") == new
    assert can_infer(answer, CHOICES) == new  # the default: VLMEvalKit's current rules


def test_scores_record_the_rules_and_unknown_rules_are_refused(tmp_path):
    qs = MMB.load(_write(tmp_path / "mmb.tsv", _rows()))
    preds = {q.question_id: "The answer is B, not A" for q in qs}
    assert MMB.score(qs, preds)["matching"] == "vlmevalkit@a67ace50"
    assert (
        MMB.score(qs, preds, matching="aca64dbb")["matching"] == "vlmevalkit@aca64dbb"
    )
    # Every answer reads as B under a67ace50, none under aca64dbb.
    assert MMB.score(qs, preds, matching="aca64dbb")["unextracted"] == len(qs)
    assert MMB.score(qs, preds)["unextracted"] == 0
    with pytest.raises(BenchmarkError, match="--matching: 'latest' is not one of"):
        MMB.score(qs, preds, matching="latest")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category"]
HEADER += ["l2-category", "split", "image"]


def _rows():
    b64 = base64.b64encode(_png()).decode()
    rows = []
    # Question 0 and 1: four circular passes each (options rotated, index + k·10^6).
    for g, (options, truth, cat) in enumerate(
        [
            (["cat", "dog", "bird", "fish"], "dog", "animals"),
            (["red", "green", "blue", "black"], "blue", "colours"),
        ]
    ):
        for k in range(4):
            rot = options[k:] + options[:k]
            rows.append(
                {
                    "index": g + k * 1_000_000,
                    "question": "What is shown?",
                    "hint": "nan",  # pandas NaN: no hint
                    **dict(zip("ABCD", rot)),
                    "answer": "ABCD"[rot.index(truth)],
                    "category": cat,
                    "l2-category": "perception",
                    "split": "dev",
                    "image": b64 if k == 0 else str(g),  # later passes refer to row g
                }
            )
    # Question 2: three options, a hint, one pass only.
    rows.append(
        {
            "index": 2,
            "question": "Which season?",
            "hint": "Look at the trees.",
            "A": "winter",
            "B": "summer",
            "C": "autumn",
            "D": "",
            "answer": "C",
            "category": "animals",
            "l2-category": "reasoning",
            "split": "dev",
            "image": b64,
        }
    )
    return rows


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def test_load_prompt_and_images(tmp_path):
    qs = MMB.load(_write(tmp_path / "mmb.tsv", _rows()))
    assert [q.question_id for q in qs][:5] == [0, 1_000_000, 2_000_000, 3_000_000, 1]
    q0 = qs[0]
    assert q0.text == (
        f"What is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n{OPTION_LETTER}"
    )
    assert q0.image == _png()
    assert qs[1].image == _png()  # the reference "0" resolves to row 0's image
    assert qs[1].text.startswith("What is shown?\nA. dog\nB. bird\nC. fish\nD. cat\n")
    assert qs[1].meta["answer"] == "A" and qs[1].meta["group"] == 0
    q2 = qs[-1]
    assert q2.text == (
        "Look at the trees.\nWhich season?\nA. winter\nB. summer\nC. autumn\n"
        f"{OPTION_LETTER}"
    )
    assert q2.meta["options"] == {"A": "winter", "B": "summer", "C": "autumn"}


def test_circular_evaluation(tmp_path):
    qs = MMB.load(_write(tmp_path / "mmb.tsv", _rows()))
    by_id = {q.question_id: q for q in qs}
    preds = {}
    # Question 0: right in all four passes, in four different wordings.
    preds[0] = "B"  # dog is B
    preds[1_000_000] = "A."  # dog is A
    preds[2_000_000] = "The answer is D"  # dog is D
    preds[3_000_000] = "dog"  # option text; dog is C
    # Question 1: right in 3 of 4 passes -> wrong.
    for k in range(4):
        preds[1 + k * 1_000_000] = by_id[1 + k * 1_000_000].meta["answer"]
    preds[3_000_001] = "A or B"  # ambiguous: unextracted
    # Question 2: one pass, right.
    preds[2] = "(C) autumn"
    s = MMB.score(qs, preds)
    assert s["overall"] == pytest.approx(2 / 3)
    assert s["categories"] == {"animals": 1.0, "colours": 0.0}
    assert s["l2_categories"] == {"perception": 0.5, "reasoning": 1.0}
    assert s["unextracted"] == 1
    assert "splits" not in s

    # Every pass wrong for question 0 leaves only question 2 right.
    preds[0] = "C"
    s = MMB.score(qs, preds)
    assert s["overall"] == pytest.approx(1 / 3)


def test_groups_need_their_main_row(tmp_path):
    qs = MMB.load(_write(tmp_path / "mmb.tsv", _rows()))
    # Without row 0, group 0's other passes are not reported (VLMEvalKit's data_main).
    sub = [q for q in qs if q.question_id != 0]
    preds = {q.question_id: q.meta["answer"] for q in sub}
    s = MMB.score(sub, preds)
    assert s["overall"] == 1.0
    assert s["categories"] == {"animals": 1.0, "colours": 1.0}


def test_format_errors(tmp_path):
    rows = _rows()
    rows[0]["answer"] = "E"
    with pytest.raises(BenchmarkError, match=r"mmb\.tsv:2: field 'answer' is 'E'"):
        MMB.load(_write(tmp_path / "mmb.tsv", rows))
    rows = _rows()
    rows[2]["index"] = "two"
    with pytest.raises(BenchmarkError, match=r"mmb\.tsv:4: field 'index'"):
        MMB.load(_write(tmp_path / "mmb.tsv", rows))
    rows = _rows()
    rows[-1]["image"] = "%" * 100
    with pytest.raises(
        BenchmarkError, match=r"mmb\.tsv:10: field 'image' is not base64"
    ):
        MMB.load(_write(tmp_path / "mmb.tsv", rows))
    rows = _rows()
    rows[1]["image"] = "77"
    with pytest.raises(BenchmarkError, match=r"mmb\.tsv:3: field 'image' refers to"):
        MMB.load(_write(tmp_path / "mmb.tsv", rows))
    header = [h for h in HEADER if h != "question"]
    rows = [{k: v for k, v in r.items() if k != "question"} for r in _rows()]
    with pytest.raises(BenchmarkError, match="column 'question' missing"):
        MMB.load(_write(tmp_path / "mmb.tsv", rows, header))
    qs = MMB.load(_write(tmp_path / "mmb.tsv", _rows()))
    with pytest.raises(BenchmarkError, match="no prediction"):
        MMB.score(qs, {0: "B"})
