"""The round-record schema: README's metrics reference is the schema's, unknown keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.records import FIELDS, RoundRecord, check_record, reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_key_is_described_and_nothing_else():
    assert list(FIELDS) == list(RoundRecord.__annotations__)


def test_the_readme_reference_is_the_schema():
    assert reference_markdown() in README.read_text(), (
        "README's metrics reference differs from fedsim.records: paste "
        "`python -c 'from fedsim.records import reference_markdown as r; print(r())'`"
    )


def test_an_undeclared_key_is_refused_by_name():
    check_record({"round": 3, "loss": None, "eval": {"attr_mean": 0.5}})
    with pytest.raises(
        ValueError, match="line 4: keys not in RoundRecord: lost, tokens"
    ):
        check_record({"round": 3, "tokens": 5, "lost": 1}, "line 4")
