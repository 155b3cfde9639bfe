"""The bad-input table (docs/reference/bad-inputs.md), row by row.

docs/reference/bad-inputs.md holds the table between ``<!-- bad-inputs:start -->`` and ``<!-- bad-inputs:end -->``:
an id, the command as a user types it (run in a fresh folder, paths relative to it) and the
message fragment they see. Each row is one test: its setup writes the files the command needs,
the command runs in-process (the ``fedsim`` entry point, ``fedsim.cli.main``) and must end with exit
code 2, exactly one line on stderr, ``error: ...`` holding the fragment, nothing on stdout, no
traceback, and the folder byte for byte as it was (nothing written, nothing removed, no output
folder). Ray, loading a backbone and building the toy benchmark suite are trip-wired: every
check happens before any of them.
"""

from __future__ import annotations

import hashlib
import random
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

TABLE_PAGE = (
    Path(__file__).resolve().parents[1] / "docs" / "reference" / "bad-inputs.md"
)
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


@dataclass(frozen=True)
class Row:
    id: str
    command: str
    message: str


def _cell(text: str) -> str:
    """A cell's first code span (what follows it is a note for the reader), else its text."""
    text = text.strip().replace("\\|", "|")
    m = re.match(r"`([^`]*)`", text)
    return m.group(1) if m else text


def read_table(path: Path = TABLE_PAGE) -> list[Row]:
    """The rows of the docs' bad-input table (header and separator left out)."""
    text = path.read_text(encoding="utf-8")
    assert START in text and END in text, f"{path.name}: no bad-input table markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    rows = []
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [_cell(c) for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        if cells[0] == "id" or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == 3, f"bad-input table row {line!r}: expected 3 cells"
        rows.append(Row(*cells))
    return rows


ROWS = read_table()


# --- what each row needs in its folder ---------------------------------------------------------


@dataclass
class Sandbox:
    tmp: Path
    toy: Callable[[], Path]  # the toy backbone's folder (built on first use)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def nothing(s: Sandbox) -> None:
    """The command needs no file (and must create none)."""


def broken_yaml(s: Sandbox) -> None:
    _write(s.tmp / "broken.yaml", "rounds: [1, 2\ntrain: {lr: 0.1}\n")


def list_yaml(s: Sandbox) -> None:
    _write(s.tmp / "list.yaml", "- rounds: 2\n- seed: 1\n")


def a_file(s: Sandbox) -> None:
    _write(s.tmp / "notes.txt", "a plain file, not a folder\n")


def old_run(s: Sandbox) -> None:
    """A folder holding an earlier run's outputs (which must survive untouched)."""
    _write(s.tmp / "old-run" / "metrics.jsonl", '{"round": 1, "loss": 2.5}\n')
    _write(s.tmp / "old-run" / "summary.md", "# an earlier run\n")


def _run_folder(s: Sandbox, name: str, weights: dict) -> None:
    from safetensors.torch import save_file

    from fedsim.runio import default_cache_dir

    # The cache_dir fixture's folder (data caches of the run).
    cache = default_cache_dir()
    _write(s.tmp / name / "config.yaml", f"cache_dir: {cache}\nrounds: 1\n")
    (s.tmp / name / "final").mkdir(parents=True)
    save_file(weights, str(s.tmp / name / "final" / "projector.safetensors"))


def my_run(s: Sandbox) -> None:
    """A finished run on the toy backbone whose projector fits it."""
    import torch

    from fedsim.models.backbone import expected_projector_shapes

    shapes = expected_projector_shapes(s.toy())
    assert shapes, "toy backbone config unreadable"
    _run_folder(s, "my-run", {k: torch.zeros(v) for k, v in shapes.items()})


def odd_run(s: Sandbox) -> None:
    """A run folder whose projector has the right names but shapes of another backbone."""
    import torch

    weights = {
        "linear_1.weight": torch.zeros(3, 5),
        "linear_1.bias": torch.zeros(3),
        "linear_2.weight": torch.zeros(3, 3),
        "linear_2.bias": torch.zeros(3),
    }
    _run_folder(s, "odd-run", weights)


def pickle_weights(s: Sandbox) -> None:
    import torch

    my_run(s)
    torch.save({"linear_1.weight": torch.zeros(2, 2)}, s.tmp / "weights.pt")


def noise_weights(s: Sandbox) -> None:
    my_run(s)
    (s.tmp / "noise.safetensors").write_bytes(random.Random(0).randbytes(256))


def pope_questions(s: Sandbox) -> None:
    _write(
        s.tmp / "pope.jsonl",
        '{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"}\n',
    )


def broken_answers(s: Sandbox) -> None:
    pope_questions(s)
    _write(s.tmp / "broken-answers.jsonl", '{"question_id": 1, "text": "yes"\n')


def done_run(s: Sandbox) -> None:
    """A run that finished (config.yaml and summary.md)."""
    _write(s.tmp / "done-run" / "config.yaml", "rounds: 2\n")
    _write(s.tmp / "done-run" / "metrics.jsonl", '{"round": 1}\n{"round": 2}\n')
    _write(s.tmp / "done-run" / "summary.md", "# done\n")


def cut_run(s: Sandbox) -> None:
    """An interrupted run with no checkpoint yet (checkpoint_every=0)."""
    _write(s.tmp / "cut-run" / "config.yaml", "rounds: 2\ncheckpoint_every: 0\n")
    _write(s.tmp / "cut-run" / "metrics.jsonl", '{"round": 1}\n')


def other_run(s: Sandbox) -> None:
    """An interrupted run whose checkpoint was written under another config."""
    import json

    _write(s.tmp / "other-run" / "config.yaml", "rounds: 4\n")
    _write(s.tmp / "other-run" / "metrics.jsonl", '{"round": 1}\n')
    state = {"format": 1, "round": 1, "config_digest": "0" * 64}
    _write(
        s.tmp / "other-run" / "checkpoints" / "round-000001" / "state.json",
        json.dumps(state),
    )


def truncated_backbone(s: Sandbox) -> None:
    """The toy backbone's config files beside weights cut short (a broken download)."""
    import shutil

    toy = s.toy()
    dst = s.tmp / "bad-backbone"
    dst.mkdir()
    for f in toy.iterdir():
        if f.is_file() and f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    (dst / "model.safetensors").write_bytes(
        (toy / "model.safetensors").read_bytes()[:1000]
    )


def latin1_config(s: Sandbox) -> None:
    """A config saved as Latin-1 (an accented name in a comment): not UTF-8."""
    (s.tmp / "latin1.yaml").write_bytes(
        "# run by Andr\xe9\nrounds: 2\n".encode("latin-1")
    )


def latin1_answers(s: Sandbox) -> None:
    pope_questions(s)
    text = '{"question_id": 1, "text": "oui, un chat \xe0 gauche"}\n'
    (s.tmp / "latin1-answers.jsonl").write_bytes(text.encode("latin-1"))


def latin1_questions(s: Sandbox) -> None:
    text = '{"question_id": 1, "image": "a.png", "text": "Caf\xe9?", "label": "yes"}\n'
    (s.tmp / "latin1-pope.jsonl").write_bytes(text.encode("latin-1"))
    _write(s.tmp / "answers.jsonl", '{"question_id": 1, "text": "yes"}\n')


def list_id_answers(s: Sandbox) -> None:
    pope_questions(s)
    _write(s.tmp / "list-answers.jsonl", '{"question_id": [1], "text": "yes"}\n')


def object_id_questions(s: Sandbox) -> None:
    _write(
        s.tmp / "object-pope.jsonl",
        '{"question_id": {"a": 1}, "image": "a.png", "text": "Cat?", "label": "yes"}\n',
    )
    _write(s.tmp / "answers.jsonl", '{"question_id": 1, "text": "yes"}\n')


def fake_parquet(s: Sandbox) -> None:
    _write(s.tmp / "fake.parquet", "image,caption\ncat.jpg,a cat\n")  # a CSV file


def broken_image_parquet(s: Sandbox) -> None:
    """A Parquet corpus whose one image is stored as bytes that are not an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = {"bytes": b"not an image", "path": "cat.jpg"}
    table = pa.table({"image": [image], "caption": ["a cat"]})
    pq.write_table(table, s.tmp / "broken-image.parquet")


def alias_bomb(s: Sandbox) -> None:
    """The 403-byte "billion laughs" of the report (test_safe_defaults.BOMB, padded)."""
    from test_safe_defaults import BOMB

    pad = "unknown_key: " + "x" * (403 - len(BOMB) - len("unknown_key: ") - 1) + "\n"
    _write(s.tmp / "bomb.yaml", BOMB + pad)


#: Child processes holding a run folder's lock; each exits when its stdin closes.
_HOLDERS: list = []


def live_run(s: Sandbox) -> None:
    """A run that has just started: its config.yaml, its lock held by another process."""
    _write(s.tmp / "live-run" / "config.yaml", "rounds: 2\n")
    from lock_holder import hold

    _HOLDERS.append(hold(s.tmp / "live-run"))


def _checkpointed(s: Sandbox, name: str, config: str, state_round: int) -> Path:
    """A run folder with a sound checkpoint (its own config's digest), round 1 in metrics."""
    import torch

    from fedsim.checkpoint import RoundState, config_digest, save_checkpoint
    from fedsim.config import config_to_yaml_data, load_config

    _write(s.tmp / name / "config.yaml", config)
    cfg = load_config(str(s.tmp / name / "config.yaml"))
    state = RoundState(
        round=state_round,
        weights={"linear_1.weight": torch.zeros(2, 2)},
        server_state={},
        clients={},
        cursors=[],
        sim_clock=0.0,
        final_eval={},
        metrics_lines=2,
    )
    save_checkpoint(s.tmp / name, state, config_digest(config_to_yaml_data(cfg)), 2)
    return s.tmp / name


def long_run(s: Sandbox) -> None:
    """A checkpoint of round 5 in a 2-round run (state.json altered, checksums intact)."""
    run = _checkpointed(s, "long-run", "rounds: 2\n", 5)
    _write(run / "metrics.jsonl", '{"round": 0}\n{"round": 1}\n')


def messy_run(s: Sandbox) -> None:
    """An interrupted run whose metrics.jsonl holds a garbage line among the checkpoint's."""
    run = _checkpointed(s, "messy-run", "rounds: 4\n", 1)
    _write(run / "metrics.jsonl", '{"round": 0}\nGARBAGE\n{"round": 2}\n')


def toy_built(s: Sandbox) -> None:
    """The toy backbone in the cache: the run gets as far as partitioning the data."""
    s.toy()


def both(*setups: Callable[[Sandbox], None]) -> Callable[[Sandbox], None]:
    def setup(s: Sandbox) -> None:
        for f in setups:
            f(s)

    return setup


SETUPS: dict[str, Callable[[Sandbox], None]] = {
    "config-missing": nothing,
    "config-not-yaml": broken_yaml,
    "config-not-a-mapping": list_yaml,
    "unknown-field": nothing,
    "unknown-subfield": nothing,
    "wrong-type": nothing,
    "rounds-zero": nothing,
    "lr-negative": nothing,
    "cohort-over-clients": nothing,
    "dp-algorithm": nothing,
    "dp-participation": nothing,
    "dp-noise-unset": nothing,
    "secagg-unbounded": nothing,
    "bad-choice": nothing,
    "unknown-algorithm": nothing,
    "unknown-algorithm-param": nothing,
    "bad-algorithm-param": nothing,
    "unknown-scenario": nothing,
    "set-without-equals": nothing,
    "missing-corpus": nothing,
    "missing-backbone": nothing,
    "out-under-a-file": a_file,
    "out-holds-a-run": old_run,
    "caption-noise": nothing,
    "tracking-unknown-backend": nothing,
    "tracking-uri-not-a-uri": nothing,
    "compare-out-holds-a-run": old_run,
    "compare-out-under-a-file": a_file,
    "compare-bad-seeds": nothing,
    "bench-out-under-a-file": a_file,
    "bench-unknown-section": nothing,
    "plot-not-a-run": a_file,
    "plot-out-under-a-file": both(old_run, a_file),
    "export-not-a-run": nothing,
    "export-projector-missing": my_run,
    "export-projector-pickle": pickle_weights,
    "export-projector-wrong-shape": odd_run,
    "export-out-holds-a-run": both(my_run, old_run),
    "eval-unknown-benchmark": my_run,
    "eval-wrong-shape": odd_run,
    "eval-projector-random-bytes": noise_weights,
    "eval-judge-url-alone": my_run,
    "eval-unknown-backend": my_run,
    "eval-data-root-missing": my_run,
    "eval-vllm-args-not-yaml": my_run,
    "score-unknown-benchmark": nothing,
    "score-answers-missing": pope_questions,
    "score-answers-malformed": broken_answers,
    "scenarios-show-unknown": nothing,
    "backbones-build-unknown": nothing,
    "unknown-option": nothing,
    "option-not-an-integer": nothing,
    "unknown-projector": nothing,
    "resume-not-a-run": nothing,
    "resume-finished": done_run,
    "resume-changes-the-run": cut_run,
    "resume-other-config": other_run,
    "backbone-truncated-weights": truncated_backbone,
    "time-budget-nan": nothing,
    "lr-inf": nothing,
    "dirichlet-alpha-nan": nothing,
    "quantity-skew-nan": nothing,
    "tier-speed-nan": nothing,
    "algorithm-param-inf": nothing,
    "config-not-utf8": latin1_config,
    "score-predictions-not-utf8": latin1_answers,
    "score-questions-not-utf8": latin1_questions,
    "score-question-id-a-list": list_id_answers,
    "score-question-id-an-object": object_id_questions,
    "algorithm-params-not-a-mapping": nothing,
    "list-for-a-section": nothing,
    "cache-dir-a-file": a_file,
    "fedsim-cache-a-file": a_file,
    "backbones-build-cache-a-file": a_file,
    "backbones-build-fedsim-cache-a-file": a_file,
    "corpus-not-parquet": fake_parquet,
    "corpus-bad-image-fail": broken_image_parquet,
    "worker-cpus-infeasible": nothing,
    "worker-resource-infeasible": nothing,
    "workers-do-not-fit": nothing,
    "address-unreachable": nothing,
    "config-alias-bomb": alias_bomb,
    "set-alias": nothing,
    "resume-live-run": live_run,
    "out-live-run": live_run,
    "resume-round-beyond": long_run,
    "resume-garbage-metrics": messy_run,
    "resume-threads": cut_run,
    "dirichlet-alpha-zero": toy_built,
    "label-not-a-column": toy_built,
    "clients-over-rows": toy_built,
}


# --- the checks -----------------------------------------------------------------------------------


class HeavyWork(BaseException):
    """Raised by the trip-wires: a bad input reached work that must come after every check."""


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path → SHA-256 (``dir`` for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def tripwires(monkeypatch):
    import ray

    import fedsim.eval.toy_suite
    import fedsim.models.spec

    def trip(what: str):
        def f(*args, **kwargs):
            raise HeavyWork(f"{what} started before the bad input was reported")

        return f

    monkeypatch.setattr(ray, "init", trip("Ray"))
    # Every process's backbone load goes through spec.load_model → spec.load_backbone.
    monkeypatch.setattr(
        fedsim.models.spec, "load_backbone", trip("loading the backbone")
    )
    monkeypatch.setattr(
        fedsim.eval.toy_suite, "ensure_toy_suite", trip("building the toy suite")
    )


def test_table_has_rows_and_every_row_a_setup():
    ids = [r.id for r in ROWS]
    assert len(ids) >= 15, f"only {len(ids)} rows in the bad-input table"
    assert len(set(ids)) == len(ids), "a row id is used twice"
    assert set(ids) == set(SETUPS), (
        f"rows without a setup: {sorted(set(ids) - set(SETUPS))}; "
        f"setups without a row: {sorted(set(SETUPS) - set(ids))}"
    )
    for r in ROWS:
        assert re.match(r"([A-Z_]+=\S* )*fedsim ", r.command), r
        assert r.message.startswith("error: ") or r.message, r


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch, request, tripwires, capsys):
    from fedsim.cli import main

    work = tmp_path / "work"
    work.mkdir()
    SETUPS[row.id](Sandbox(work, lambda: request.getfixturevalue("toy_path")))
    before = _snapshot(work)
    monkeypatch.chdir(work)
    argv = shlex.split(row.command)
    while re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # VAR=value before the command: its env
        name, value = argv.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert argv[0] == "fedsim"
    # The installed entry point itself (fedsim.cli:main), so that typer's own usage errors
    # (unknown option, a value of the wrong type) go through the same one-line path.
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()

    where = f"{row.command!r}\nstdout: {out!r}\nstderr: {err!r}"
    assert exited.value.code == 2, where
    assert "Traceback" not in out + err, where
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, where
    assert lines[0].startswith("error: "), where
    assert row.message in lines[0], where
    assert out.strip() == "", where
    assert _snapshot(work) == before, f"{where}\nthe folder changed"
