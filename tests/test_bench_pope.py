"""POPE: eval_pope.py's answer rule on tricky wording, hand-computed metrics, real files.

Tolerances: expected scores are ratios of small counts (2/3, 125.0, ...) and the scorer computes
the same ratios in float64; both differ by a few float64 ulps (~1e-16 relative), so
pytest.approx's default rel 1e-6 cannot fail on rounding, and a miscounted answer moves a score by
at least 1/(number of questions) ≥ 1e-2.
"""

import json
import math
from pathlib import Path

import pytest

from fedsim.eval.benchmark import SHORT_ANSWER, BenchmarkError, Question
from fedsim.eval.pope import BENCHMARK as POPE
from fedsim.eval.pope import pope_answer

REAL = Path("/work/shared/benchmarks/pope")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No, there is not.", "no"),
        ("NO", "yes"),  # case-sensitive: only "No", "not" and "no" are words of no
        ("Yes. No.", "yes"),  # the first sentence only
        ("not sure", "no"),
        ("Yes", "yes"),
        ("No.", "no"),
        ("There is a dog, not a cat", "no"),
        ("Nope", "yes"),  # a word, not a prefix
        ("yes,no", "yes"),  # commas are dropped, not split on: one word "yesno"
        ("3.5 no", "yes"),  # the first "." ends the first sentence: "3"
        ("no\nthere is none", "yes"),  # split on spaces only: "no\nthere" is one word
        ("", "yes"),
    ],
)
def test_answer_rule(text, expected):
    assert pope_answer(text) == expected


def _q(qid, label, split="random"):
    return Question(qid, None, "q", {"label": label, "split": split})


def test_metrics_hand_computed():
    qs = [
        _q(1, "yes"),
        _q(2, "yes"),
        _q(3, "no"),
        _q(4, "no"),
        _q(5, "no"),
        _q(6, "yes"),
    ]
    preds = {
        1: "Yes, there is a dog.",  # yes, label yes: TP
        2: "No, there is not.",  # no, label yes: FN
        3: "NO",  # yes (case-sensitive rule), label no: FP
        4: "There is no cat.",  # no, label no: TN
        5: "not sure",  # no: TN
        6: "Yes. No.",  # yes: TP
        99: "ignored",  # an id not asked is ignored
    }
    s = POPE.score(qs, preds)
    # TP=2, FN=1, FP=1, TN=2
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 6)
    assert "splits" not in s


def test_splits_and_zero_division():
    qs = [
        _q("r/1", "yes"),
        _q("r/2", "no"),
        _q("a/1", "yes", "adv"),
        _q("a/2", "no", "adv"),
    ]
    preds = {"r/1": "yes", "r/2": "yes", "a/1": "no", "a/2": "no"}
    s = POPE.score(qs, preds)
    assert s["accuracy"] == pytest.approx(2 / 4)
    assert s["precision"] == pytest.approx(1 / 2)  # TP=1 (r/1), FP=1 (r/2)
    assert s["recall"] == pytest.approx(1 / 2)  # FN=1 (a/1)
    assert s["yes_ratio"] == pytest.approx(2 / 4)
    assert set(s["splits"]) == {"random", "adv"}
    r = s["splits"]["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (
        0.5,
        0.5,
        1,
        1,
    )
    assert r["f1"] == pytest.approx(2 / 3)
    a = s["splits"]["adv"]
    # No "yes" at all: eval_pope.py would divide by zero; precision and F1 are NaN.
    assert math.isnan(a["precision"]) and math.isnan(a["f1"])
    assert (a["accuracy"], a["recall"], a["yes_ratio"]) == (0.5, 0, 0)


def test_missing_prediction_is_an_error():
    with pytest.raises(BenchmarkError, match="1 of 2 questions have no prediction"):
        POPE.score([_q(1, "yes"), _q(2, "no")], {1: "yes"})


def test_real_files_folder():
    qs = POPE.load(REAL, data_root=Path("/coco/val2014"))
    assert len(qs) == 9000
    for split in ("random", "popular", "adversarial"):
        part = [q for q in qs if q.meta["split"] == split]
        assert len(part) == 3000
        assert sum(q.meta["label"] == "yes" for q in part) == 1500
    first = qs[0]
    assert first.question_id == "random/1"
    assert first.text == f"Is there a snowboard in the image?\n{SHORT_ANSWER}"
    assert first.image == "/coco/val2014/COCO_val2014_000000310196.jpg"
    assert first.meta["label"] == "yes"
    assert len({q.question_id for q in qs}) == 9000

    perfect = {q.question_id: q.meta["label"].capitalize() + "." for q in qs}
    s = POPE.score(qs, perfect)
    assert (s["accuracy"], s["precision"], s["recall"], s["f1"]) == (1, 1, 1, 1)
    assert s["yes_ratio"] == 0.5
    assert set(s["splits"]) == {"random", "popular", "adversarial"}

    always_yes = POPE.score(qs, {q.question_id: "Yes" for q in qs})
    assert always_yes["accuracy"] == 0.5 and always_yes["precision"] == 0.5
    assert always_yes["recall"] == 1 and always_yes["yes_ratio"] == 1
    assert always_yes["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_real_single_file_keeps_ids(tmp_path):
    qs = POPE.load(REAL / "coco_pope_adversarial.json")
    assert len(qs) == 3000 and qs[0].question_id == 1
    assert qs[0].image == "COCO_val2014_000000310196.jpg"  # relative without data_root
    assert {q.meta["split"] for q in qs} == {"adversarial"}
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": q.question_id, "text": "No"}) + "\n" for q in qs
        )
    )
    preds = POPE.read_predictions(answers, qs)
    s = POPE.score(qs, preds)
    assert s["accuracy"] == 0.5 and s["yes_ratio"] == 0 and s["recall"] == 0


def test_lmms_eval_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": ["0", "1"],
            "question_id": ["1", "1"],
            "question": [
                "Is there a dog in the image?",
                "Is there a cat in the image?",
            ],
            "answer": ["yes", "No"],
            "image_source": ["COCO_val2014_1", "COCO_val2014_1"],
            "image": pa.array(
                [
                    {"bytes": b"\x89PNG1", "path": None},
                    {"bytes": b"\x89PNG2", "path": None},
                ],
                type=image_type,
            ),
            "category": ["adversarial", "popular"],
        }
    )
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    qs = POPE.load(tmp_path)  # a folder of shards
    assert [q.question_id for q in qs] == ["adversarial/1", "popular/1"]
    assert qs[0].image == b"\x89PNG1"
    assert qs[1].text == f"Is there a cat in the image?\n{SHORT_ANSWER}"
    assert [q.meta["label"] for q in qs] == ["yes", "no"]
    s = POPE.score(qs, {"adversarial/1": "Yes", "popular/1": "No"})
    assert s["accuracy"] == 1 and set(s["splits"]) == {"adversarial", "popular"}

    pq.write_table(table.drop(["answer"]), tmp_path / "bad.parquet")
    with pytest.raises(BenchmarkError, match=r"bad\.parquet.*'answer'"):
        POPE.load(tmp_path / "bad.parquet")


def test_format_errors(tmp_path):
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "yes"}\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there?", "label": "maybe"}\n'
    )
    with pytest.raises(
        BenchmarkError, match=r"coco_pope_random\.json:2: field 'label'"
    ):
        POPE.load(bad)
    bad.write_text('{"question_id": 1, "image": "a.jpg", "label": "yes"}\n')
    with pytest.raises(BenchmarkError, match=r":1: field 'text' missing"):
        POPE.load(bad)
    bad.write_text("{not json\n")
    with pytest.raises(BenchmarkError, match=r":1: not JSON"):
        POPE.load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match="no coco_pope_"):
        POPE.load(empty)
