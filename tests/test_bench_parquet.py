"""lmms-eval's Parquet releases: small fixtures in each dataset's schema, written with
pyarrow, load into the same Questions as the official files and score by hand.

Schemas (columns, dtypes) follow the lmms-lab dataset cards and lmms-eval's task code
(``lmms_eval/tasks/<task>/utils.py``); images are tiny PNGs in the ``datasets`` Image
struct ``{bytes, path}``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from fedsim.eval import llava_bench, mmvet
from fedsim.eval.benchmark import OPTION_LETTER, SHORT_ANSWER, BenchmarkError
from fedsim.eval.judge import Judge, JudgeConfig, JudgeReply
from fedsim.eval.llava_bench import BENCHMARK as LLAVA_BENCH
from fedsim.eval.mmbench import BENCHMARK as MMBENCH
from fedsim.eval.mme import BENCHMARK as MME
from fedsim.eval.mme import write_sheets
from fedsim.eval.mmvet import BENCHMARK as MMVET
from fedsim.eval.mmvp import BENCHMARK as MMVP
from fedsim.eval.seed import BENCHMARK as SEED

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(shade: int) -> bytes:
    """A 2x2 grey PNG, distinct per ``shade``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (2, 2), shade).save(buf, format="PNG")
    return buf.getvalue()


def images(pngs: list[bytes], names: list[str] | None = None) -> Any:
    names = names or [None] * len(pngs)
    return pa.array([{"bytes": b, "path": n} for b, n in zip(pngs, names)], type=IMAGE)


def write(path: Path, columns: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def fake_judge(monkeypatch: pytest.MonkeyPatch):
    """Judge requests answered by ``reply(user_content)``; the requests are recorded."""
    sent: list[dict[str, Any]] = []
    script: dict[str, Any] = {}

    def post(self: Judge, body: bytes) -> JudgeReply:
        request = json.loads(body)
        sent.append(request)
        return JudgeReply(script["reply"](request["messages"][-1]["content"]), "m")

    monkeypatch.setattr(Judge, "_post", post)
    config = JudgeConfig(
        base_url="http://judge.test/v1", model="judge-m", retries=0, workers=1
    )
    return config, script, sent


# -- MME (lmms-lab/MME) ---------------------------------------------------------------

YN = "Please answer yes or no."


def test_mme(tmp_path):
    shots = [png(i) for i in range(6)]
    # An image's two questions may straddle shards; subtasks come in any order.
    write(
        tmp_path / "data" / "test-00000-of-00002.parquet",
        {
            "question_id": ["code_reasoning/0020.png"] * 2 + ["existence/6040.jpg"],
            "image": images(shots[:3]),
            "question": [
                f"Is a python code shown in the picture? {YN}",
                f"Is a c++ code shown in the picture? {YN}",
                f"Is there a train in this image? {YN}",
            ],
            "answer": ["Yes", "No", "Yes"],
            "category": ["code_reasoning", "code_reasoning", "existence"],
        },
    )
    write(
        tmp_path / "data" / "test-00001-of-00002.parquet",
        {
            "question_id": ["existence/6040.jpg"] + ["existence/18150.jpg"] * 2,
            "image": images(shots[3:]),
            "question": [
                f"Is there a bed in this image? {YN}",
                f"Is there a dog in this image? {YN}",
                f"Is there a cat in this image? {YN}",
            ],
            "answer": ["No", "Yes", "No"],
            "category": ["existence"] * 3,
        },
    )
    qs = MME.load(tmp_path / "data")
    assert [q.question_id for q in qs] == [
        "existence/6040.jpg/0",
        "existence/6040.jpg/1",
        "existence/18150.jpg/0",
        "existence/18150.jpg/1",
        "code_reasoning/0020.png/0",
        "code_reasoning/0020.png/1",
    ]
    assert [q.image for q in qs] == [shots[2], shots[3], shots[4], shots[5], *shots[:2]]
    assert qs[0].text == f"Is there a train in this image?\n{SHORT_ANSWER}"
    assert qs[1].meta == {
        "subtask": "existence",
        "image_name": "6040.jpg",
        "question": f"Is there a bed in this image? {YN}",
        "answer": "No",
        "pair": 0,
    }
    assert [q.meta["pair"] for q in qs] == [0, 0, 1, 1, 0, 0]

    preds = dict(zip([q.question_id for q in qs], ["Yes", "No", "Yes", "Yes"]))
    preds |= {"code_reasoning/0020.png/0": "No", "code_reasoning/0020.png/1": "No"}
    s = MME.score(qs, preds)
    # existence: acc 3/4, acc+ 1/2 → 125; code_reasoning: acc 1/2, acc+ 0 → 50.
    assert s["subtasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert s["perception"] == 125.0 and s["cognition"] == 50.0
    # The filled sheets keep an image's two lines adjacent, as calculation.py needs.
    write_sheets(qs, preds, tmp_path / "sheets")
    lines = (tmp_path / "sheets" / "existence.txt").read_text().splitlines()
    assert lines[:2] == [
        f"6040.jpg\tIs there a train in this image? {YN}\tYes\tYes",
        f"6040.jpg\tIs there a bed in this image? {YN}\tNo\tNo",
    ]

    lone = write(
        tmp_path / "lone.parquet",
        {
            "question_id": ["count/1.jpg", "count/2.jpg", "count/2.jpg"],
            "image": images(shots[:3]),
            "question": ["Are there two dogs?"] * 3,
            "answer": ["Yes", "No", "Yes"],
            "category": ["count"] * 3,
        },
    )
    with pytest.raises(
        BenchmarkError, match=r"lone\.parquet: row 0: column 'question_id' .*one q"
    ):
        MME.load(lone)


# -- MMBench (lmms-lab/MMBench, en) ----------------------------------------------------


def mmbench_columns(shots: list[bytes]) -> dict[str, Any]:
    return {
        "index": ["1", "1000001", "2"],  # string in lmms-lab/MMBench en
        "question": ["What is the main object?"] * 2 + ["Which season is it?"],
        "hint": [None, None, "The sky is clear."],
        "A": ["cat", "dog", "summer"],
        "B": ["dog", "bird", "winter"],
        "C": ["bird", "cat", None],
        "D": [None, None, None],
        "answer": ["A", "C", "B"],
        "category": ["attribute_recognition"] * 2 + ["image_season"],
        "image": images(shots),
        "source": ["x"] * 3,
        "L2-category": ["finegrained_perception"] * 2 + ["coarse_perception"],
        "comment": [None] * 3,
        "split": ["dev"] * 3,
    }


def test_mmbench(tmp_path):
    shots = [png(10), png(11), png(12)]
    path = write(tmp_path / "en" / "dev-00000-of-00001.parquet", mmbench_columns(shots))
    qs = MMBENCH.load(path)
    assert [q.question_id for q in qs] == [1, 1000001, 2]
    assert [q.image for q in qs] == shots
    assert qs[0].text == (
        f"What is the main object?\nA. cat\nB. dog\nC. bird\n{OPTION_LETTER}"
    )
    assert qs[2].text == (
        f"The sky is clear.\nWhich season is it?\nA. summer\nB. winter\n{OPTION_LETTER}"
    )
    assert qs[1].meta == {
        "answer": "C",
        "options": {"A": "dog", "B": "bird", "C": "cat"},
        "group": 1,
        "category": "attribute_recognition",
        "l2_category": "finegrained_perception",
        "split": "dev",
    }
    # Group 1 right in both rotations; question 2 wrong.
    s = MMBENCH.score(qs, {1: "A", 1000001: "C. cat", 2: "A"})
    assert s["overall"] == 0.5
    assert s["categories"] == {"attribute_recognition": 1.0, "image_season": 0.0}
    assert s["l2_categories"] == {
        "coarse_perception": 0.0,
        "finegrained_perception": 1.0,
    }
    assert s["unextracted"] == 0
    # Rotation wrong → the whole group is wrong.
    assert MMBENCH.score(qs, {1: "A", 1000001: "A", 2: "B"})["overall"] == 0.5

    bad = mmbench_columns(shots)
    bad["answer"] = ["A", "E", "B"]
    with pytest.raises(
        BenchmarkError, match=r"bad\.parquet: row 1: column 'answer' is 'E'"
    ):
        MMBENCH.load(write(tmp_path / "bad.parquet", bad))


# -- SEED-Bench (lmms-lab/SEED-Bench) --------------------------------------------------

FRAME = pa.list_(IMAGE)


def seed_columns(shots: list[bytes], type_ids: list[int]) -> dict[str, Any]:
    return {
        "answer": ["A", "C", "B"],
        "choice_a": ["a tree", "one", "one"],
        "choice_b": ["a car", "two", "two"],
        "choice_c": ["a dog", "three", "three"],
        "choice_d": ["a cat", "four", "four"],
        "data_id": ["1454426_2591111986", "v/clip.mp4", "4567_123"],
        "data_type": ["image", "video", "image"],
        "question": [
            "What is in the picture?",
            "How many times does he jump?",
            "How many words are written?",
        ],
        "question_id": ["101669", "v_7", "3004"],
        "question_type_id": type_ids,
        # Sequence(Image): one image, or a video's frames.
        "image": pa.array(
            [
                [{"bytes": shots[0], "path": None}],
                [{"bytes": s, "path": None} for s in shots[1:4]],
                [{"bytes": shots[4], "path": None}],
            ],
            type=FRAME,
        ),
    }


def test_seed(tmp_path):
    shots = [png(20 + i) for i in range(5)]
    path = write(tmp_path / "test.parquet", seed_columns(shots, [1, 10, 9]))
    qs = SEED.load(path)
    assert [q.question_id for q in qs] == [101669, 3004]  # the video row is skipped
    assert [q.image for q in qs] == [shots[0], shots[4]]
    assert qs[1].text == (
        "How many words are written?\nA. one\nB. two\nC. three\nD. four\n"
        f"{OPTION_LETTER}"
    )
    assert qs[1].meta == {
        "answer": "B",
        "question_type_id": 9,
        "question_type": "Text Understanding",
    }
    s = SEED.score(qs, {101669: "A", 3004: "B."})  # exact letter only
    assert s == {
        "accuracy": 0.5,
        "question_types": {"Scene Understanding": 1.0, "Text Understanding": 0.0},
    }

    bad = write(tmp_path / "bad.parquet", seed_columns(shots, [1, 10, 13]))
    with pytest.raises(
        BenchmarkError, match=r"bad\.parquet: row 2: column 'question_type_id' is 13"
    ):
        SEED.load(bad)


# -- MMVP (lmms-lab-eval/MMVP) ---------------------------------------------------------


def test_mmvp(tmp_path):
    shots = [png(30 + i) for i in range(4)]
    columns = {
        "Index": [1, 2, 3, 4],
        "Question": [
            "Are the butterfly's wings closer to being open or closed?",
            "Are the butterfly's wings closer to being open or closed?",
            "Is the dog facing left or right?",
            "Is the dog facing left or right?",
        ],
        "Options": ["(a) Open (b) Closed"] * 2 + ["(a) Left (b) Right"] * 2,
        "Correct Answer": ["(a)", "(b)", "(a)", "(b)"],
        "image": images(shots),
    }
    write(tmp_path / "data" / "train-00000-of-00001.parquet", columns)
    qs = MMVP.load(tmp_path / "data")
    assert [q.question_id for q in qs] == [1, 2, 3, 4]
    assert [q.image for q in qs] == shots
    assert qs[2].text == (
        f"Is the dog facing left or right?\nA. Left\nB. Right\n{OPTION_LETTER}"
    )
    assert qs[3].meta == {
        "answer": "B",
        "options": {"A": "Left", "B": "Right"},
        "pair": 1,
    }
    s = MMVP.score(qs, {1: "A", 2: "(B)", 3: "B", 4: "Right"})
    assert s == {
        "pair_accuracy": 0.5,
        "accuracy": 0.75,
        "unextracted": 0,
        "matching": "vlmevalkit@a67ace50",
    }

    # The spellings lmms-eval also reads: lower-case names, options as a list.
    alt = write(
        tmp_path / "alt.parquet",
        {
            "index": [1],
            "question": ["Open or closed?"],
            "options": pa.array([["Open", "Closed"]]),
            "answer": ["(b)"],
            "image": images(shots[:1]),
        },
    )
    (q,) = MMVP.load(alt)
    assert q.text == f"Open or closed?\nA. Open\nB. Closed\n{OPTION_LETTER}"
    assert q.meta["answer"] == "B"

    columns["Correct Answer"] = ["(a)", "(c)", "(a)", "(b)"]
    with pytest.raises(
        BenchmarkError, match=r"bad\.parquet: row 1: column 'Correct Answer' is '\(c\)'"
    ):
        MMVP.load(write(tmp_path / "bad.parquet", columns))


# -- MM-Vet (lmms-lab/MMVet) -----------------------------------------------------------


def mmvet_columns(shots: list[bytes], caps: list[str]) -> dict[str, Any]:
    return {
        "question_id": ["v1_0", "v1_1"],
        "image": images(shots, ["v1_0.png", "v1_1.png"]),
        "question": ["What animal is this?", "What is written on the sign?"],
        "answer": ["cat<OR>kitten", "STOP"],
        "image_source": ["v1_0.png", "v1_1.png"],
        "capability": caps,
    }


def test_mmvet(tmp_path, fake_judge):
    config, script, sent = fake_judge
    shots = [png(40), png(41)]
    write(tmp_path / "data" / "test.parquet", mmvet_columns(shots, ["rec,know", "ocr"]))
    qs = MMVET.load(tmp_path / "data")
    assert [q.question_id for q in qs] == [0, 1]
    assert [q.image for q in qs] == shots
    assert qs[0].text == "What animal is this?"
    assert qs[0].meta == {
        "key": "v1_0",
        "capability": ("rec", "know"),
        "question": "What animal is this?",
        "answer": "cat<OR>kitten",
    }
    # Both id spellings of the official results files find the questions.
    preds_file = tmp_path / "results.json"
    preds_file.write_text(json.dumps({"v1_0": "a kitten", "v1_1": "STOP"}))
    preds = MMVET.read_predictions(preds_file, qs)
    assert preds == {0: "a kitten", 1: "STOP"}

    script["reply"] = lambda content: "0.5" if "a kitten" in content else "1.0"
    s = MMVET.score(qs, preds, judge=config)
    assert s["total"] == 75.0
    assert (s["rec"], s["know"], s["ocr"]) == (50.0, 50.0, 100.0)
    assert s["integration"] == {"rec_know": 50.0, "ocr": 100.0}
    row = sent[0]["messages"][0]["content"].splitlines()[-1]
    assert (
        row
        == mmvet.grader_row(
            "What animal is this?", "cat<OR>kitten", "a kitten"
        ).splitlines()[-1]
    )
    assert "cat <OR> kitten" in row

    bad = write(tmp_path / "bad.parquet", mmvet_columns(shots, ["rec", ""]))
    with pytest.raises(
        BenchmarkError, match=r"bad\.parquet: row 1: column 'capability' is ''"
    ):
        MMVET.load(bad)


# -- LLaVA-Bench (lmms-lab/llava-bench-in-the-wild) ------------------------------------


def llava_columns(shots: list[bytes], categories: list[str]) -> dict[str, Any]:
    return {
        "question_id": ["0", "1", "2"],
        "question": [
            "What is the name of this dish?",
            "Describe this photo in detail.",
            "Why might this be a good lunch?",
        ],
        "image_id": ["001.jpg", "001.jpg", "002.jpg"],
        "image": images(shots),
        "caption": ["A bowl of ramen.", "A bowl of ramen.", "A salad on a table."],
        "gpt_answer": ["Ramen.", "A bowl of ramen with egg.", "It is light."],
        "category": categories,
    }


def test_llava_bench(tmp_path, fake_judge):
    config, script, sent = fake_judge
    shots = [png(50), png(51), png(52)]
    path = write(
        tmp_path / "train-00000-of-00001.parquet",
        llava_columns(shots, ["conv", "detail", "complex"]),
    )
    qs = LLAVA_BENCH.load(path)
    assert [q.question_id for q in qs] == [0, 1, 2]  # the official int ids
    assert [q.image for q in qs] == shots
    assert qs[1].text == "Describe this photo in detail."
    assert qs[2].meta == {
        "category": "complex",
        "question": "Why might this be a good lunch?",
        "caption": "A salad on a table.",
        "reference": "It is light.",
    }

    replies = {"P0": "8 6", "P1": "9 9\nboth fine", "P2": "7 7"}
    script["reply"] = lambda content: next(
        r for p, r in replies.items() if f"[Assistant 2]\n{p}\n" in content
    )
    s = LLAVA_BENCH.score(qs, {0: "P0", 1: "P1", 2: "P2"}, judge=config)
    # gpt4 mean 8.0, model mean round(22/3, 3) = 7.333 → 91.7; per category one review.
    assert (s["all"], s["all_gpt4_mean"], s["all_model_mean"]) == (91.7, 8.0, 7.333)
    assert (s["conv"], s["detail"], s["complex"]) == (75.0, 100.0, 100.0)
    content = sent[0]["messages"][1]["content"]
    assert content == llava_bench.review_content(
        "A bowl of ramen.", "What is the name of this dish?", "Ramen.", "P0", "conv"
    )

    bad = write(
        tmp_path / "bad.parquet", llava_columns(shots, ["conv", "chat", "conv"])
    )
    with pytest.raises(
        BenchmarkError, match=r"bad\.parquet: row 1: column 'category' is 'chat'"
    ):
        LLAVA_BENCH.load(bad)


# -- shared reading errors -------------------------------------------------------------


def test_unreadable_and_missing_columns(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(BenchmarkError, match=r"junk\.parquet: not a readable Parquet"):
        SEED.load(junk)
    shots = [png(60), png(61)]
    cols = mmvet_columns(shots, ["rec", "ocr"])
    del cols["capability"]
    with pytest.raises(
        BenchmarkError, match=r"nocap\.parquet: Parquet column\(s\) \['capability'\]"
    ):
        MMVET.load(write(tmp_path / "nocap.parquet", cols))
    cols = mmvet_columns(shots, ["rec", "ocr"])
    cols["image"] = images([shots[0], b""])
    with pytest.raises(
        BenchmarkError, match=r"noimg\.parquet: row 1: column 'image' holds no image"
    ):
        MMVET.load(write(tmp_path / "noimg.parquet", cols))
