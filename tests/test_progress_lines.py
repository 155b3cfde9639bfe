"""Where no live display can show (stdout not a terminal: CI logs, ``make run > log``), the toy
backbone build and the pixel cache print one plain line as each stage starts and ends."""

from __future__ import annotations

import io

from rich.console import Console

from fedsim.data import pixel_cache
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec
from fedsim.progress import build_reporter, make_progress


def _feed(report, stage: str, total: int) -> None:
    for step in range(1, total + 1):
        report(stage, step, total, 1.0 / step)


def test_a_line_per_stage_when_stdout_is_not_a_terminal():
    out = io.StringIO()
    with make_progress(Console(file=out, force_terminal=False)) as progress:
        report = build_reporter(progress)
        _feed(report, "lm", 40)
        _feed(report, "lm+1", 20)  # an extension is a stage of its own
    # (rich adds the bars' final state when it stops; the plain lines come as stages go)
    lines = [x for x in out.getvalue().splitlines() if x.endswith(")")]
    assert lines[0] == "toy backbone: lm: started (40 steps)"
    assert lines[1].startswith("toy backbone: lm: done (40/40 steps, ")
    assert lines[1].endswith(", loss 0.025)")
    assert lines[2] == "toy backbone: lm+1: started (20 steps)"
    assert len(lines) == 4


def test_no_plain_lines_on_a_terminal():
    out = io.StringIO()
    with make_progress(Console(file=out, force_terminal=True)) as progress:
        _feed(build_reporter(progress), "vision", 5)
    assert "started (" not in out.getvalue()


def test_the_pixel_cache_build_prints_its_stage(toy, tmp_path, capsys):
    # Console() on pytest's captured stdout: not a terminal, as in `make run > log`.
    scenes = ensure_scenes(tmp_path / "scenes", SceneSpec(), 0, 5, 64)
    with make_progress(Console()) as progress:
        path = pixel_cache.ensure_pixel_cache(
            tmp_path, scenes, toy.image_processor, "on", build_reporter(progress)
        )
    assert path is not None
    lines = [x for x in capsys.readouterr().out.splitlines() if "pixel cache" in x]
    assert lines[0] == "pixel cache: started (64 images)"
    assert lines[1].startswith("pixel cache: done (64/64 images, ")
