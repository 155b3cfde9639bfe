"""The rich progress display shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


def make_progress(console: Console, disable: bool = False) -> Progress:
    """Description, bar, n/total, a free ``info`` field, elapsed time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
    )


def build_reporter(progress: Progress) -> Callable[[str, int, int, float], None]:
    """A ``report(stage, step, total, loss)`` callback: one bar per toy-backbone build stage."""
    tasks: dict[str, TaskID] = {}

    def report(stage: str, step: int, total: int, loss: float) -> None:
        if stage not in tasks:
            label = stage if stage == "pixel cache" else f"toy backbone: {stage}"
            tasks[stage] = progress.add_task(label, total=total, info="")
        info = "" if stage == "pixel cache" else f"loss {loss:.3f}"
        progress.update(tasks[stage], completed=step, info=info)

    return report
