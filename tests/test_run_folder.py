"""One writer per run folder, and what a default run listens on.

The lock: ``fedsim.runio.RunLock`` (flock on the folder) taken by ``prepare_run_dir`` after an
exclusive ``mkdir``. Two processes started into one new folder: exactly one gets it. A live
run's folder is refused to a second ``run`` and to ``--resume``, naming the holder's pid.

The network: a default ``fedsim run`` (``ray.address`` null) in a subprocess, with RAY_ADDRESS
pointing nowhere; every TCP socket its processes listen on is checked against the table of docs/explanation/safe-defaults.md
of listening sockets (between ``<!-- listening:start -->`` and ``<!-- listening:end -->``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lock_holder import hold
from small_runs import NO_EVAL, SMALL, cli_run_args

from fedsim.runio import RunDirError, RunLock, check_run_dir, prepare_run_dir

LISTEN_PAGE = (
    Path(__file__).resolve().parents[1] / "docs" / "explanation" / "safe-defaults.md"
)

# A child that waits for the go file, then tries to become the run folder's writer.
CONTENDER = """
import sys, time
from pathlib import Path
from fedsim.runio import RunDirError, prepare_run_dir
out, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    lock = prepare_run_dir(out)
except RunDirError as e:
    print("refused", e, flush=True)
    sys.exit(0)
(out / "config.yaml").write_text("rounds: 1\\n")  # what a run writes first
(out / "metrics.jsonl").write_text('{"round": 0}\\n')
print("writer", flush=True)
time.sleep(1.0)
lock.close()
"""


def test_two_runs_into_one_new_folder_exactly_one_writes(tmp_path):
    out, go = tmp_path / "runs" / "same", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(out), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(2.0)  # both interpreters up and polling
    go.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert [o.split()[0] for o in outs] == ["refused", "writer"], outs
    # The loser lost at the lock or found the winner's files: either way it wrote nothing.
    assert re.search(r"in use by another fedsim process|folder is not empty", outs[0])
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    child = hold(tmp_path)
    try:
        with pytest.raises(
            RunDirError, match=rf"in use by another .*pid {child.pid}\)"
        ):
            RunLock(tmp_path, "--out")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    RunLock(tmp_path, "--out").close()  # the holder is gone: so is its lock


def test_a_start_that_failed_before_its_first_round_is_taken_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("rounds: 1\n")  # all a failed start leaves
    prepare_run_dir(out).close()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')  # but a run that ran is kept
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir(out)


@pytest.mark.slow
def test_a_ray_failure_leaves_no_folder_behind(
    tmp_path, toy_path, cache_dir, monkeypatch
):
    """Ray starts before a new run's folder is made: its failure leaves nothing to retry past."""
    import ray
    from rich.console import Console

    from fedsim.config import load_config
    from fedsim.driver import run

    def no_ray(*args, **kwargs):
        raise ConnectionError("Ray could not start")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    cfg = load_config(None, [*SMALL, *NO_EVAL, f"cache_dir={cache_dir}"])
    with pytest.raises(ConnectionError):
        run(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)
    assert not (tmp_path / "run").exists()


# --- a default run: one writer, and what listens where ------------------------------------------

LISTEN_START, LISTEN_END = "<!-- listening:start -->", "<!-- listening:end -->"


def listening_table() -> dict[str, str]:
    """The safe-defaults page's table: process key (first code span) → interface (last column's code span)."""
    block = LISTEN_PAGE.read_text().split(LISTEN_START, 1)[1].split(LISTEN_END, 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        spans = [re.match(r"`([^`]*)`", c) for c in cells]
        if len(cells) >= 3 and spans[0] and spans[-1]:
            rows[spans[0].group(1)] = spans[-1].group(1)
    return rows


def _key(name: str, cmdline: list[str], driver: int, pid: int) -> str:
    """The table's key for a process of the run."""
    text = " ".join(cmdline)
    if pid == driver:
        return "driver"
    if name in ("gcs_server", "raylet"):
        return name
    if "monitor.py" in text:
        return "monitor.py"
    if "dashboard/dashboard.py" in text:
        return "dashboard.py"
    if name.startswith("ray::") and name in (
        "ray::DashboardAgent",
        "ray::RuntimeEnvAgent",
    ):
        return name
    if name.startswith("ray::") or "default_worker.py" in text:
        return "ray::<worker>"
    return f"unknown: {name} {text[:80]}"


def _listening(root: int) -> list[tuple[str, str, int]]:
    """(key, address, port) of every TCP socket that ``root``'s process tree listens on."""
    import psutil

    top = psutil.Process(root)
    procs = {p.pid: p for p in [top, *top.children(recursive=True)]}
    found = []
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            p = procs[c.pid]
            found.append(
                (_key(p.name(), p.cmdline(), root, p.pid), c.laddr.ip, c.laddr.port)
            )
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.slow
def test_default_run_one_writer_loopback_only_and_deaf_to_ray_address(
    tmp_path, toy_path, cache_dir
):
    from rich.console import Console

    from fedsim.config import load_config
    from fedsim.driver import resume_run, run

    out = tmp_path / "run"
    extra = [*NO_EVAL, "rounds=5", "checkpoint_every=1", "train.local_steps=4"]
    # A bogus cluster address in the environment: a default run must start its own Ray.
    env = {**os.environ, "RAY_ADDRESS": "10.255.255.1:6379", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cli_run_args(out, cache_dir, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        while not (out / "checkpoints" / "round-000001" / "state.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 600
            time.sleep(0.05)
        sockets = _listening(proc.pid)
        # A second writer, while the run is live: a new run into its folder, and --resume.
        before = {p: p.read_bytes() for p in [out / "config.yaml"]}
        cfg = load_config(str(out / "config.yaml"))
        quiet = Console(quiet=True)
        with pytest.raises(RunDirError, match="folder is not empty"):
            run(cfg, out, console=quiet, show_progress=False)
        with pytest.raises(RunDirError, match=rf"in use by .*\(pid {proc.pid}\)"):
            resume_run(out, show_progress=False)
        assert {p: p.read_bytes() for p in before} == before
        err = proc.communicate(timeout=600)[1]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err[-3000:]
    # The run was not disturbed: every round logged once, in order.
    rounds = [
        json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 5
    assert not (out / "resumes.jsonl").exists()

    table = listening_table()
    keys = {k for k, _, _ in sockets}
    assert not [k for k in keys if k.startswith("unknown")], sockets
    # Every listener is a kind the table lists; the core servers were seen. (Ray's agents and
    # metrics exporters start asynchronously: on a loaded machine one may not listen yet when
    # round 1's checkpoint appears, so their presence is not required, only their interface.)
    assert keys <= set(table), (sorted(keys), sorted(table))
    assert {"gcs_server", "raylet", "driver", "ray::<worker>"} <= keys, sorted(keys)
    for key, ip, port in sockets:
        assert table[key] == "127.0.0.1", (key, table[key])
        assert _loopback(ip), f"{key} listens on {ip}:{port}"


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_the_run_again(
    tmp_path, toy_path, cache_dir, ray_session
):
    """What a kill before the first checkpoint leaves is resumed from round 1, same folder."""
    from rich.console import Console

    from fedsim.config import config_to_yaml_data, load_config
    from fedsim.driver import resume_run
    from fedsim.runio import write_yaml

    out = tmp_path / "run"
    cfg = load_config(
        None, [*SMALL, *NO_EVAL, "checkpoint_every=0", f"cache_dir={cache_dir}"]
    )
    write_yaml(out / "config.yaml", config_to_yaml_data(cfg))
    (out / "metrics.jsonl").write_text('{"round": 1, "loss": 9.9}\n{"round": 2, "lo')
    (out / "final").mkdir()
    (out / "final" / ".projector.safetensors.ab12cd34").write_bytes(
        b"half"
    )  # a killed write
    console = Console(record=True, width=200)
    result = resume_run(out, console=console, show_progress=False)
    assert "starts again from round 1" in console.export_text()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]  # round 0: eval.at_start
    assert records[1]["loss"] != 9.9  # logged anew
    resumes = json.loads((out / "resumes.jsonl").read_text())
    assert resumes["resumed_after_round"] == 0 and resumes["dropped_rounds"] == [1]
    assert not (out / "final" / ".projector.safetensors.ab12cd34").exists()
    assert (out / "summary.md").exists() and result.history[-1]["round"] == 2


def test_two_exports_into_one_folder_the_second_is_refused(tmp_path, monkeypatch):
    """Export writes under a temporary name and renames: onto a filled folder that fails."""
    from types import SimpleNamespace

    import fedsim.export as export
    from fedsim.export import ExportError, write_checkpoint

    out = tmp_path / "ckpt"

    class Model:
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"ours")
            # Meanwhile another export finished into the same folder.
            out.mkdir(exist_ok=True)
            (out / "model.safetensors").write_bytes(b"theirs")

    monkeypatch.setattr(
        export, "_processor", lambda bb: SimpleNamespace(save_pretrained=lambda f: None)
    )
    monkeypatch.setattr(export, "_rename_safetensors", lambda folder: 0)
    backbone = SimpleNamespace(model=Model(), manifest={})
    with pytest.raises(ExportError, match="written by another process meanwhile"):
        write_checkpoint(backbone, out, {})
    assert (out / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left
