"""The rich progress display shared by the CLI commands."""

from __future__ import annotations

import time
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
    """A ``report(stage, step, total, loss)`` callback: one bar per toy-backbone build stage.

    Where the bars cannot show (stdout not a terminal: CI logs, ``make run > log``; or the
    display turned off) each stage also prints a plain line when it starts and when it ends.
    """
    tasks: dict[str, TaskID] = {}
    lines = plain_stage_lines(progress.console) if _no_live(progress) else None

    def report(stage: str, step: int, total: int, loss: float) -> None:
        if lines is not None:
            lines(stage, step, total, loss)
        if stage not in tasks:
            label = stage if stage == "pixel cache" else f"toy backbone: {stage}"
            tasks[stage] = progress.add_task(label, total=total, info="")
        info = "" if stage == "pixel cache" else f"loss {loss:.3f}"
        progress.update(tasks[stage], completed=step, info=info)

    return report


def _no_live(progress: Progress) -> bool:
    return not progress.console.is_terminal or progress.disable


def plain_stage_lines(console: Console) -> Callable[[str, int, int, float], None]:
    """A ``report`` callback printing one line as each stage starts and one as it ends."""
    started: dict[str, float] = {}

    def line(stage: str, step: int, total: int, loss: float) -> None:
        label = stage if stage == "pixel cache" else f"toy backbone: {stage}"
        unit = "images" if stage == "pixel cache" else "steps"
        if stage not in started:
            started[stage] = time.perf_counter()
            console.print(
                f"{label}: started ({total} {unit})", markup=False, highlight=False
            )
        if step >= total:
            took = time.perf_counter() - started[stage]
            done = f"{label}: done ({step}/{total} {unit}, {took:.0f} s"
            done += ")" if stage == "pixel cache" else f", loss {loss:.3f})"
            console.print(done, markup=False, highlight=False)

    return line
