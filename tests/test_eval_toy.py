"""Toy evaluation: caption parsing and POPE's answer rule, against hand-worked cases.

Tolerances: expected scores are ratios of small counts (2/3, 125.0, ...) and the scorer computes
the same ratios in float64; both differ by a few float64 ulps (~1e-16 relative), so
pytest.approx's default rel 1e-6 cannot fail on rounding, and a miscounted answer moves a score by
at least 1/(number of questions) ≥ 1e-2.
"""

import pytest

from fedsim.eval.toy import caption_scores, parse_caption, pope_answer, yesno_scores


def test_parse_caption():
    assert parse_caption("two small red triangles at the top left") == {
        "count": 2,
        "size": "small",
        "colour": "red",
        "shape": "triangle",
        "position": "top left",
    }
    p = parse_caption("a large blue circle at the bottom right")
    assert (p["count"], p["shape"], p["position"]) == (1, "circle", "bottom right")
    # Contradictions and gaps are wrong, not guessed.
    q = parse_caption("a red blue square at the")
    assert q["colour"] is None and q["position"] is None and q["size"] is None
    assert parse_caption("")["count"] is None
    # The silo styles open with the position: the count word follows it; order is not scored.
    assert parse_caption("at the top left two red small triangles") == parse_caption(
        "two small red triangles at the top left"
    )
    assert parse_caption("at the top left")["count"] is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No, there is not.", "no"),
        ("NO", "yes"),  # POPE's rule is case-sensitive: only "No", "no" and "not" count
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("yes", "yes"),
        ("no", "no"),
        ("There is not a dog", "no"),
        ("I do not know.", "no"),
        ("Nope", "yes"),
        ("no, yes", "no"),
        ("", "yes"),
    ],
)
def test_pope_rule(text, expected):
    assert pope_answer(text) == expected


def test_yesno_scores_by_hand():
    preds = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "yes", "no", "yes"]
    s = yesno_scores(preds, labels)
    # TP=2 FP=1 FN=1 TN=1
    assert s["yesno_acc"] == pytest.approx(3 / 5)
    assert s["yesno_precision"] == pytest.approx(2 / 3)
    assert s["yesno_recall"] == pytest.approx(2 / 3)
    assert s["yesno_f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)


def test_caption_scores_by_hand():
    refs = [
        {
            "caption": "a small red circle at the top left",
            "count": 1,
            "size": "small",
            "colour": "red",
            "shape": "circle",
            "position": "top left",
        },
        {
            "caption": "two large blue squares at the bottom right",
            "count": 2,
            "size": "large",
            "colour": "blue",
            "shape": "square",
            "position": "bottom right",
        },
    ]
    preds = [
        "a small red circle at the top left",
        "two large green squares at the top right",
    ]
    s = caption_scores(preds, refs)
    assert s["attr_count"] == 1.0 and s["attr_size"] == 1.0 and s["attr_shape"] == 1.0
    assert s["attr_colour"] == 0.5 and s["attr_position"] == 0.5
    assert s["attr_mean"] == pytest.approx((1 + 1 + 1 + 0.5 + 0.5) / 5)
    assert s["caption_exact"] == 0.5
