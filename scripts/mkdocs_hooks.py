"""mkdocs hook: fill the generated reference pages (``<!-- fedsim:NAME -->`` markers).

Named in ``mkdocs.yml`` (``hooks:``), so ``mkdocs build --strict`` needs nothing checked in
beyond the pages themselves; the generators live in :mod:`fedsim.docgen`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedsim.cli import app
from fedsim.docgen import default_generators, render


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the page's markers with the tables generated from the code."""
    bench = Path(config["docs_dir"]) / "bench"
    return render(markdown, default_generators(bench, typer.main.get_command(app)))
