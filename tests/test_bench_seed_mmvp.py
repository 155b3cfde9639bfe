"""SEED-Bench (LLaVA's exact-letter rule) and MMVP (pair accuracy) on hand-made files.

Tolerances: expected scores are ratios of small counts (2/3, 125.0, ...) and the scorer computes
the same ratios in float64; both differ by a few float64 ulps (~1e-16 relative), so
pytest.approx's default rel 1e-6 cannot fail on rounding, and a miscounted answer moves a score by
at least 1/(number of questions) ≥ 1e-2.
"""

import json

import pytest

from fedsim.eval.benchmark import OPTION_LETTER, BenchmarkError
from fedsim.eval.mmvp import BENCHMARK as MMVP
from fedsim.eval.mmvp import parse_options
from fedsim.eval.seed import BENCHMARK as SEED


def _seed_question(qid, type_id, answer, data_type="image"):
    return {
        "answer": answer,
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": f"{qid}_x.jpg" if data_type == "image" else f"{qid}.mp4",
        "data_type": data_type,
        "question": "How many towels are in the image?",
        "question_id": str(qid),
        "question_type_id": type_id,
    }


def _seed_file(tmp_path, questions):
    path = tmp_path / "SEED-Bench.json"
    types = {"Scene Understanding": 1, "Instance Counting": 5, "Action Recognition": 10}
    path.write_text(json.dumps({"question_type": types, "questions": questions}))
    return path


def test_seed_prompt_and_score(tmp_path):
    path = _seed_file(
        tmp_path,
        [
            _seed_question(101, 1, "A"),
            _seed_question(102, 1, "B"),
            _seed_question(103, 5, "C"),
            _seed_question(104, 1, "D"),
            _seed_question(900, 10, "A", data_type="video"),  # not loaded
        ],
    )
    qs = SEED.load(path, data_root=tmp_path / "SEED-Bench-image")
    assert [q.question_id for q in qs] == [101, 102, 103, 104]
    assert qs[0].text == (
        "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
        f"{OPTION_LETTER}"
    )
    assert qs[0].image == str(tmp_path / "SEED-Bench-image" / "101_x.jpg")
    preds = {
        101: "A",  # right
        102: "B.",  # wrong: convert_seed_for_submission.py compares exactly
        103: "C",  # right
        104: "D",  # right
    }
    s = SEED.score(qs, preds)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["question_types"] == {
        "Scene Understanding": pytest.approx(2 / 3),
        "Instance Counting": 1.0,
    }
    assert list(s["question_types"]) == ["Scene Understanding", "Instance Counting"]


def test_seed_answer_file_ids(tmp_path):
    path = _seed_file(
        tmp_path, [_seed_question(101, 1, "A"), _seed_question(102, 5, "B")]
    )
    qs = SEED.load(path)
    assert qs[0].image == "101_x.jpg"
    answers = tmp_path / "answers.jsonl"
    # One id as LLaVA writes it (int), one as a string: both match.
    answers.write_text(
        '{"question_id": 101, "text": "A"}\n{"question_id": "102", "text": "(B)"}\n'
    )
    preds = SEED.read_predictions(answers, qs)
    assert preds == {101: "A", 102: "(B)"}
    assert SEED.score(qs, preds)["accuracy"] == 0.5


def test_seed_format_errors(tmp_path):
    bad = _seed_question(101, 1, "E")
    with pytest.raises(BenchmarkError, match=r"questions\[0\]: field 'answer' is 'E'"):
        SEED.load(_seed_file(tmp_path, [bad]))
    bad = _seed_question(101, 1, "A")
    del bad["choice_c"]
    with pytest.raises(
        BenchmarkError, match=r"questions\[0\]: field 'choice_c' missing"
    ):
        SEED.load(_seed_file(tmp_path, [bad]))
    with pytest.raises(BenchmarkError, match=r"questions\[0\]: question_type_id 7"):
        SEED.load(_seed_file(tmp_path, [_seed_question(101, 7, "A")]))
    with pytest.raises(BenchmarkError, match="no image questions"):
        SEED.load(_seed_file(tmp_path, [_seed_question(900, 10, "A", "video")]))


MMVP_CSV = (
    "Index,Question,Options,Correct Answer\n"
    "1,Are the butterfly's wings closer to being open or closed?,(a) Open (b) Closed,(a)\n"
    "2,Are the butterfly's wings closer to being open or closed?,(a) Open (b) Closed,(b)\n"
    "3,Is the dog facing left or right?,(a) Left (b) Right,(a)\n"
    "4,Is the dog facing left or right?,(a) Left (b) Right,(b)\n"
    "5,Is the door open or closed?,(a) Open (b) Closed,(a)\n"
    "6,Is the door open or closed?,(a) Open (b) Closed,(b)\n"
)


def _mmvp(tmp_path, text=MMVP_CSV):
    (tmp_path / "MMVP Images").mkdir(exist_ok=True)
    path = tmp_path / "Questions.csv"
    path.write_text(text)
    return path


def test_mmvp_prompt_and_images(tmp_path):
    qs = MMVP.load(_mmvp(tmp_path))
    assert [q.question_id for q in qs] == [1, 2, 3, 4, 5, 6]
    assert qs[0].text == (
        "Are the butterfly's wings closer to being open or closed?\nA. Open\nB. Closed\n"
        f"{OPTION_LETTER}"
    )
    assert qs[0].image == str(tmp_path / "MMVP Images" / "1.jpg")
    assert [q.meta["pair"] for q in qs] == [0, 0, 1, 1, 2, 2]
    assert [q.meta["answer"] for q in qs] == ["A", "B"] * 3
    # data_root may also be the image folder itself.
    again = MMVP.load(tmp_path / "Questions.csv", data_root=tmp_path / "MMVP Images")
    assert again[5].image == str(tmp_path / "MMVP Images" / "6.jpg")


def test_mmvp_pair_accuracy(tmp_path):
    qs = MMVP.load(_mmvp(tmp_path))
    preds = {
        1: "A",  # right
        2: "B.",  # right: pair 1 right
        3: "A",  # right
        4: "A",  # wrong: pair 2 wrong
        5: "Open",  # option text: A, right
        6: "(b)",  # lower-case letter: not read, wrong; pair 3 wrong
    }
    s = MMVP.score(qs, preds)
    assert s["pair_accuracy"] == pytest.approx(1 / 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["unextracted"] == 1
    # An incomplete pair (question 3 without 4) is left out of pair accuracy.
    s = MMVP.score(qs[:3], preds)
    assert s["pair_accuracy"] == 1.0
    assert s["accuracy"] == 1.0


def test_mmvp_matching_rules_are_chosen_and_recorded(tmp_path):
    """VLMEvalKit's two rule versions (fedsim.eval.mmbench) on MMVP's pairs: a letter early in
    a long answer counts only under aca64dbb; "the answer is X" only under a67ace50."""
    qs = MMVP.load(_mmvp(tmp_path))
    preds = {
        1: "A is what I see, the wings spread wide open in the sun",  # right under old only
        2: "The answer is B, not A",  # right under new only
        3: "A",
        4: "B",
        5: "A",
        6: "B",
    }
    old = MMVP.score(qs, preds, matching="aca64dbb")
    new = MMVP.score(qs, preds)
    assert (
        old["matching"] == "vlmevalkit@aca64dbb"
        and new["matching"] == "vlmevalkit@a67ace50"
    )
    # Pair 1 is right under neither (one of its two answers is unread each time).
    assert old["pair_accuracy"] == new["pair_accuracy"] == pytest.approx(2 / 3)
    assert old["accuracy"] == new["accuracy"] == pytest.approx(5 / 6)
    assert old["unextracted"] == new["unextracted"] == 1


def test_mmvp_options_and_errors(tmp_path):
    assert parse_options("(a) Open (b) Closed") == ["Open", "Closed"]
    assert parse_options("(a) Yes, (partly) (b) No") == ["Yes, (partly)", "No"]
    with pytest.raises(ValueError):
        parse_options("Open or Closed")
    bad = MMVP_CSV.replace("(a) Left (b) Right,(b)", "(a) Left (b) Right,(c)")
    with pytest.raises(
        BenchmarkError, match=r"Questions\.csv:5: field 'Correct Answer'"
    ):
        MMVP.load(_mmvp(tmp_path, bad))
    bad = MMVP_CSV.replace("3,Is the dog", "x,Is the dog")
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:4: field 'Index'"):
        MMVP.load(_mmvp(tmp_path, bad))
    bad = MMVP_CSV.replace("(a) Left (b) Right,(a)", "Left or Right,(a)")
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:4: field 'Options'"):
        MMVP.load(_mmvp(tmp_path, bad))
    with pytest.raises(BenchmarkError, match="column 'Correct Answer' missing"):
        MMVP.load(_mmvp(tmp_path, "Index,Question,Options\n1,q,(a) x (b) y\n"))
