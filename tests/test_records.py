"""The round-record schema: the docs' metrics reference is the schema's, unknown keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.docgen import render
from fedsim.records import FIELDS, RoundRecord, check_record, reference_markdown

METRICS_PAGE = (
    Path(__file__).resolve().parent.parent / "docs" / "reference" / "metrics.md"
)


def test_every_key_is_described_and_nothing_else():
    assert list(FIELDS) == list(RoundRecord.__annotations__)


def test_the_docs_reference_is_the_schema():
    # The page holds a marker that the site's build replaces with the schema's own table.
    page = METRICS_PAGE.read_text()
    assert "<!-- fedsim:metrics -->" in page
    rendered = render(page, {"metrics": reference_markdown})
    assert reference_markdown() in rendered


def test_an_undeclared_key_is_refused_by_name():
    check_record({"round": 3, "loss": None, "eval": {"attr_mean": 0.5}})
    with pytest.raises(
        ValueError, match="line 4: keys not in RoundRecord: lost, tokens"
    ):
        check_record({"round": 3, "tokens": 5, "lost": 1}, "line 4")
