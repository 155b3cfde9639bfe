"""A run survives interruption: SIGKILL and --resume, a killed worker, a removed node.

Each interrupted run is compared with one uninterrupted run of the same config (module fixture
``baseline``): the final projector must be the same bits. The config has SCAFFOLD (server
control variate + per-client c_i in the client-state store), so a resume that lost any piece of
state (server state, client states, cursors) would end elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from small_runs import NO_EVAL, SMALL, cli_run_args, small_run

from fedsim.runio import load_weights

ROUNDS = 6
RUN = [
    *NO_EVAL,
    f"rounds={ROUNDS}",
    "train.local_steps=4",
    "train.cohort_batch=2",
    "ray.workers=2",
    "algorithm.name=scaffold",
    "checkpoint_every=1",
]
TIMING = ("wall_seconds", "client_seconds_max")


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rounds(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _without_timing(records: list[dict], *extra: str) -> list[dict]:
    drop = (*TIMING, *extra)
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout=300.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"run exited ({proc.returncode}) before {path} appeared"
            )
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.01)


def _round_logged(metrics: Path, rnd: int) -> bool:
    if not metrics.exists():
        return False
    return any(
        json.loads(x).get("round") == rnd
        for x in metrics.read_text().splitlines()
        if x.endswith("}")
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, toy_path, cache_dir, ray_session):
    out = tmp_path_factory.mktemp("reliability") / "baseline"
    return small_run(out, cache_dir, *RUN)


def _start(args: list[str]) -> subprocess.Popen:
    """``args`` in a session of its own, so that what a killed driver leaves (Ray's agents)
    can be cleaned up by process group afterwards."""
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
        # A job started in the background by a non-interactive shell (as CI may run the
        # tests) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        # handler: give the driver Ctrl-C back, as a terminal would.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of the run's process group (started by :func:`_start`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _interrupt(proc: subprocess.Popen, when: Path, sig: int) -> str:
    """Send ``sig`` to the driver once ``when`` exists; its stderr."""
    try:
        _wait_for(when, proc)
        os.kill(proc.pid, sig)
        return proc.communicate(timeout=120)[1]
    finally:
        _kill_group(proc)


@pytest.mark.slow
def test_ctrl_c_then_sigkill_then_resume_gives_the_bits_of_an_uninterrupted_run(
    tmp_path, baseline, cache_dir
):
    out = tmp_path / "interrupted"
    resume = [sys.executable, "-m", "fedsim.cli", "run", "--no-progress", "--resume"]
    # Ctrl-C after round 1's checkpoint: a clean stop, one line saying how to go on.
    proc = _start(cli_run_args(out, cache_dir, *RUN))
    err = _interrupt(
        proc, out / "checkpoints" / "round-000001" / "state.json", signal.SIGINT
    )
    assert proc.returncode == 130
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("interrupted; go on from round-")
    assert lines[-1].endswith(f"fedsim run --resume {out}")
    assert not (out / "final").exists()
    # Resumed, then SIGKILL of the driver alone once round 3's checkpoint is written.
    proc = _start([*resume, str(out)])
    _interrupt(
        proc, out / "checkpoints" / "round-000003" / "state.json", signal.SIGKILL
    )
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    # Resumed again, to the end.
    done = subprocess.run(
        [*resume, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _same_bits(baseline.weights, load_weights(out / "final" / "projector.safetensors"))
    # The rounds, as logged, are those of the uninterrupted run (timings aside).
    assert _without_timing(_rounds(out)) == _without_timing(_rounds(baseline.out_dir))
    resumes = [json.loads(x) for x in (out / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 2
    assert (
        resumes[0]["resumed_after_round"] >= 1
        and resumes[1]["resumed_after_round"] >= 3
    )
    # checkpoint_keep (2): only the newest two are left.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"round-{ROUNDS - 1:06d}", f"round-{ROUNDS:06d}"]


def _left_in_group(pgid: int, timeout: float = 30.0) -> list[str]:
    """The processes still in the run's process group after ``timeout`` s (Ray's servers,
    agents and workers are all in it: the run was started in a session of its own)."""
    import psutil

    t0 = time.monotonic()
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.info["pid"]) == pgid:
                    left.append(" ".join(p.info["cmdline"] or [])[:120])
            except (ProcessLookupError, psutil.Error):
                pass
        if not left or time.monotonic() - t0 > timeout:
            return left
        time.sleep(0.2)


def test_sigterm_as_interrupt_raises_keyboard_interrupt_and_restores_the_handler():
    """In a fresh interpreter: SIGTERM inside the block is a KeyboardInterrupt; after it the
    handler is what it was (the default: the process would end)."""
    code = textwrap.dedent(
        """
        import os, signal
        from fedsim.raystart import sigterm_as_interrupt
        try:
            with sigterm_as_interrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["interrupted", "True"], done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["scaffold", "centralized"])
def test_sigterm_stops_a_run_as_ctrl_c_does_and_leaves_no_process(
    tmp_path, cache_dir, algorithm
):
    """SIGTERM (a scheduler's preemption, ``timeout``, ``kill``): the run unwinds, stops its
    actors and its Ray, and says how to go on — not Ray's C++ abort (exit 134, a stack dump).
    A centralized run's Ray Train worker group (2 workers) stops between rounds: it used to
    train to the last round while the interrupted driver waited for it."""
    out = tmp_path / "terminated"
    rounds = 40
    extra = [*RUN, f"algorithm.name={algorithm}", f"rounds={rounds}"]
    proc = _start(cli_run_args(out, cache_dir, *extra))
    try:
        _wait_for(out / "checkpoints" / "round-000001" / "state.json", proc)
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
        left = _left_in_group(proc.pid)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "SIGTERM received" not in err, err[-3000:]
    # Ray Train's harmless PreemptionWatcher line is filtered (fedsim.cli).
    assert "PreemptionWatcher" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("interrupted; go on from round-")
    assert lines[-1].endswith(f"fedsim run --resume {out}")
    assert left == [], left
    assert not (out / "final").exists()
    assert max(r["round"] for r in _rounds(out)) < rounds


@pytest.mark.slow
def test_killed_worker_mid_run_same_projector_and_retries_counted(
    tmp_path, baseline, cache_dir, ray_session
):
    import ray

    from fedsim.pool import ActorPool

    out = tmp_path / "worker-killed"
    pool = ActorPool()
    killed: list[int] = []

    def kill_when_round_1_is_logged() -> None:
        while not _round_logged(out / "metrics.jsonl", 1):
            time.sleep(0.005)
        victim = pool._workers[0]
        killed.append(1)
        ray.kill(victim, no_restart=True)

    killer = threading.Thread(target=kill_when_round_1_is_logged, daemon=True)
    killer.start()
    try:
        from rich.console import Console

        from fedsim.config import load_config
        from fedsim.driver import run

        cfg = load_config(None, [*SMALL, f"cache_dir={cache_dir}", *RUN])
        result = run(
            cfg, out, console=Console(quiet=True), show_progress=False, pool=pool
        )
    finally:
        pool.close()
    killer.join(timeout=5)
    assert killed
    _same_bits(baseline.weights, result.weights)
    records = [r for r in _rounds(out) if r["round"] > 0]
    assert sum(r["retries"] for r in records) >= 1
    assert [r["workers_lost"] for r in records if "workers_lost" in r] == [[0]]
    # Apart from the retry counts, the log is the uninterrupted run's.
    assert _without_timing(_rounds(out), "retries", "workers_lost") == _without_timing(
        _rounds(baseline.out_dir), "retries"
    )


NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console
    from fedsim.config import load_config
    from fedsim.driver import run

    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}}
    )
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    removed = []

    def remove_after_round_1():
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and any(
            json.loads(x).get("round") == 1
            for x in metrics.read_text().splitlines() if x.endswith("}")
        )):
            time.sleep(0.005)
        cluster.remove_node(second, allow_graceful=False)
        removed.append(time.time())

    threading.Thread(target=remove_after_round_1, daemon=True).start()
    try:
        run(load_config(None, overrides), out, console=Console(quiet=True),
            show_progress=False)
        assert removed, "the node was not removed during the run"
        (out.parent / "removed.json").write_text(json.dumps({"node": second.node_id}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_removed_node_mid_run_same_projector(tmp_path, baseline, cache_dir):
    out = tmp_path / "node-removed"
    overrides = [
        *SMALL,
        *RUN,
        f"cache_dir={cache_dir}",
        "ray.placement=spread",
        "ray.evaluator_resources={head: 0.01}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", NODE_SCRIPT, str(out), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    removed = json.loads((tmp_path / "removed.json").read_text())["node"]
    _same_bits(baseline.weights, load_weights(out / "final" / "projector.safetensors"))
    records = [r for r in _rounds(out) if r["round"] > 0]
    lost = [r["workers_lost"] for r in records if "workers_lost" in r]
    # The worker on the removed node was lost once, and its groups were sent again.
    assert len(lost) == 1 and len(lost[0]) == 1
    assert sum(r["retries"] for r in records) >= 1
    # The workers alive at the end (a replacement may still be loading) and the aggregator
    # are on the node that stayed.
    nodes = json.loads((out / "resources.json").read_text())["nodes"]
    placed = [v for k, v in nodes.items() if k.startswith("worker")]
    assert placed and removed not in placed and nodes["aggregator"] != removed


def _cut_back(full: Path, cut: Path, keep_round: int, rounds: int) -> None:
    """``cut``: a copy of the finished run ``full`` as a crash after round ``keep_round``'s
    checkpoint leaves it (later checkpoints never written, later rounds logged, a line cut
    short, no final outputs)."""
    import shutil

    shutil.copytree(full, cut)
    for name in ("summary.md", "eval.json", "resources.json", "curves.png"):
        (cut / name).unlink(missing_ok=True)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "eval", ignore_errors=True)
    for r in range(keep_round + 1, rounds + 1):
        shutil.rmtree(cut / "checkpoints" / f"round-{r:06d}", ignore_errors=True)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "loss": 0.1')


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedcmp", "local"])
def test_server_state_and_personal_projectors_survive_a_resume(
    tmp_path, toy_path, cache_dir, ray_session, algorithm
):
    """Fed-CMP (bases and momentum in the server state, evaluation between rounds) and local
    (every client's own projector in the client-state store): resumed = uninterrupted, the
    per-round diagnostics included."""
    from rich.console import Console

    from fedsim.driver import resume_run

    extra = [
        "eval.benchmarks=[]",
        "eval_every=2",
        "rounds=3",
        f"algorithm.name={algorithm}",
        "checkpoint_every=1",
        "checkpoint_keep=3",
        # The oscillation diagnostic needs the previous step: it must come back from the
        # checkpoint's server state for the rounds to match.
        "train.diagnostics=true",
    ]
    full = small_run(tmp_path / "full", cache_dir, *extra)
    _cut_back(full.out_dir, tmp_path / "cut", 1, 3)
    resumed = resume_run(
        tmp_path / "cut", console=Console(quiet=True), show_progress=False
    )
    final = "client_projectors" if algorithm == "local" else "projector"
    _same_bits(
        load_weights(full.out_dir / "final" / f"{final}.safetensors"),
        load_weights(tmp_path / "cut" / "final" / f"{final}.safetensors"),
    )
    assert resumed.final_eval == full.final_eval
    assert _without_timing(_rounds(tmp_path / "cut")) == _without_timing(
        _rounds(full.out_dir)
    )


@pytest.mark.slow
def test_centralized_run_resumes_from_its_checkpoint(
    tmp_path, toy_path, cache_dir, ray_session
):
    """Ray Train's pooled run: rank 0 ships its state at checkpoints; resume = same bits."""

    from fedsim.driver import resume_run

    extra = [
        *NO_EVAL,
        "rounds=4",
        "algorithm.name=centralized",
        "ray.workers=1",
        "checkpoint_every=1",
        "checkpoint_keep=4",
    ]
    full = small_run(tmp_path / "full", cache_dir, *extra)
    cut = tmp_path / "cut"
    _cut_back(full.out_dir, cut, 2, 4)
    from rich.console import Console

    resumed = resume_run(cut, console=Console(quiet=True), show_progress=False)
    _same_bits(full.weights, resumed.weights)
    assert _without_timing(_rounds(cut)) == _without_timing(_rounds(full.out_dir))
    log = json.loads((cut / "resumes.jsonl").read_text())
    assert log["resumed_after_round"] == 2 and log["dropped_rounds"] == [3, 4]
