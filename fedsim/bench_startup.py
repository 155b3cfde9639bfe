"""``fedsim bench --sections startup,memory-run``: how long a default run takes to reach its
first client task, and how much memory all of its processes hold.

Both sections start ``fedsim run`` with no arguments (the embedded toy default, toy-iid with
FedAvg) in a process of its own, with the caches it needs already built (a warm-up run first),
and watch its whole process tree:

- **startup** — process start (just before ``Popen``) → the first client task a
  BackboneWorker begins. The run writes marks as it goes (:mod:`fedsim.startup`): the CLI's
  imports, the backbone resolved, the data ready (scenes, partition, the pixel-cache check),
  ``ray.init``, the workers constructed with their backbones loaded, the untrained projector's
  evaluation, the first task. The run is stopped (Ctrl-C, as a user would) once the first task
  has begun; median of ``repeats`` runs per phase.
- **memory-run** — one whole default run, its process tree sampled every ``interval`` seconds:
  every process the run starts, counted once by pid, whatever it is (the driver; Ray's GCS
  server, raylet, log monitor, dashboard agents and runtime-env agent, which the driver starts;
  every Ray worker process, which the raylet starts: the actors and any idle pooled worker).
  Per process its peak resident set size is the kernel's high-water mark (``VmHWM`` in
  ``/proc/<pid>/status``, read at every sample, so a peak between two samples is not missed
  while the process lives; the latest mark counts, since exec starts a new one). A child
  between fork and exec is not sampled: it still shows its parent's command line and memory. Reported: the sum of the per-process peaks (an upper bound on the
  tree's peak: processes need not peak together), the largest sum of current RSS seen in one
  sample, and the per-process list. RSS counts shared pages (libraries, the page cache of
  memory-mapped files) once per process that maps them, as ``ps`` and Flower's comparison do.

Processes not started by the run (another run's Ray, the bench itself) are never counted: only
descendants of the run's own process. Times are reported, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsim.startup import MARKS_ENV

#: Phases of a run's start-up, in order: each is the time from the previous mark to its own.
PHASES = (
    ("cli", "interpreter start, typer and the CLI module"),
    ("imports", "the driver's imports (fedsim.driver and what it pulls in)"),
    (
        "backbone_resolved",
        "config checks, the backbone resolved (toy: found in the cache)",
    ),
    ("data_ready", "scenes, partition and the pixel-cache check"),
    ("ray_init", "ray.init (GCS, raylet, agents)"),
    ("workers_ready", "actors constructed, each BackboneWorker's backbone loaded"),
    (
        "initial_eval",
        "W_0 drawn, the Aggregator, the untrained projector's evaluation sent (it runs "
        "alongside round 1)",
    ),
    ("first_task", "the first client task begins on a worker"),
)


#: Seconds a stopped run has to act on Ctrl-C before it is sent SIGTERM.
STOP_GRACE = 30.0


def role(cmdline: Sequence[str], name: str, is_root: bool) -> str:
    """What a process of a run is, from its command line (Ray names its processes there).

    ``ray::BackboneWorker`` and the other actors set their title to ``ray::<Class>``; an idle
    pooled worker is ``ray::IDLE``; Ray's own servers are named by their executable or script.
    """
    if is_root:
        return "driver"
    if name in ("gcs_server", "raylet"):
        return name
    text = " ".join(cmdline) if cmdline else name
    if text.startswith("ray::"):
        head = text[len("ray::") :].split()[0] if len(text) > 5 else "worker"
        return "ray::" + head.split(".")[0]
    for key, label in (
        ("dashboard/agent.py", "dashboard agent"),
        ("dashboard/dashboard.py", "dashboard"),
        ("log_monitor.py", "log_monitor"),
        ("runtime_env/agent/main.py", "runtime_env agent"),
        ("monitor.py", "monitor"),
        ("default_worker.py", "ray worker (starting)"),
    ):
        if key in text:
            return label
    return name or "other"


def vm_hwm_mb(pid: int) -> float | None:
    """The peak resident set size of process ``pid`` so far (``VmHWM``), MiB; None if gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _before_exec(p: Any) -> bool:
    """True while ``p`` is a child between fork and exec: it still shows its parent's command
    line, and its memory figures are its parent's (a vfork child shares the parent's address
    space; a fork child its pages). Counting such a sample charged the driver's ~380 MB to
    Ray's log monitor, whose own peak after exec is ~80 MB."""
    import psutil

    try:
        parent = p.parent()
        return parent is not None and p.cmdline() == parent.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return True


@dataclass
class ProcessPeak:
    """One process of the run: its role, first command-line words and peak RSS (MiB)."""

    pid: int
    role: str
    command: str
    peak_rss_mb: float = 0.0
    first_seen_s: float = 0.0


@dataclass
class TreeSampler:
    """Samples the process tree under one root pid: per-process peak RSS, and the summed RSS."""

    root: int
    t0: float
    procs: dict[tuple[int, float], ProcessPeak] = field(default_factory=dict)
    max_sum_rss_mb: float = 0.0
    samples: int = 0

    def sample(self) -> None:
        import psutil

        try:
            top = psutil.Process(self.root)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0.0
        for p in tree:
            try:
                if p.pid != self.root and _before_exec(p):
                    continue
                with p.oneshot():
                    cmdline = p.cmdline()
                    if not cmdline and p.pid != self.root:
                        continue  # exiting (its memory is being freed): kept as last seen
                    rss = p.memory_info().rss / 2**20
                    key = (p.pid, p.create_time())  # a reused pid is another process
                    if key not in self.procs:
                        self.procs[key] = ProcessPeak(
                            p.pid,
                            role(cmdline, p.name(), p.pid == self.root),
                            " ".join(cmdline[:3])[:120],
                            first_seen_s=time.time() - self.t0,
                        )
                    rec = self.procs[key]
                    if not rec.role.startswith("ray::") or rec.role == "ray::IDLE":
                        # a Ray worker retitles itself once it runs an actor (ray::<Class>)
                        rec.role = role(cmdline, p.name(), p.pid == self.root)
                        rec.command = " ".join(cmdline)[:160]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            hwm = vm_hwm_mb(p.pid)
            # The latest high-water mark, not the largest ever read: exec starts a new
            # address space whose mark starts again from zero (see _before_exec).
            rec.peak_rss_mb = (
                max(rss, hwm) if hwm is not None else max(rec.peak_rss_mb, rss)
            )
            total += rss
        self.max_sum_rss_mb = max(self.max_sum_rss_mb, total)
        self.samples += 1

    def summary(self) -> dict[str, Any]:
        procs = sorted(self.procs.values(), key=lambda r: -r.peak_rss_mb)
        return summarize(procs, self.max_sum_rss_mb, self.samples)


def summarize(
    procs: Iterable[ProcessPeak], max_sum_rss_mb: float, samples: int
) -> dict[str, Any]:
    """The memory-run record: every process counted once, the sum of their peaks, by role."""
    rows: list[dict[str, Any]] = [
        {
            "pid": p.pid,
            "role": p.role,
            "command": p.command,
            "peak_rss_mb": round(p.peak_rss_mb, 1),
        }
        for p in procs
    ]
    by_role: dict[str, float] = {}
    for r in rows:
        by_role[r["role"]] = by_role.get(r["role"], 0.0) + r["peak_rss_mb"]
    return {
        "processes": rows,
        "process_count": len(rows),
        "sum_of_peaks_mb": round(sum(r["peak_rss_mb"] for r in rows), 1),
        "max_sum_rss_mb": round(max_sum_rss_mb, 1),
        "by_role_mb": {k: round(v, 1) for k, v in sorted(by_role.items())},
        "samples": samples,
    }


def read_marks(path: Path) -> dict[str, float]:
    """The first time each mark was written (a mark several processes write: the earliest)."""
    out: dict[str, float] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed process
        name, t = rec.get("mark"), rec.get("t")
        if isinstance(name, str) and isinstance(t, (int, float)):
            out[name] = min(out.get(name, t), t)
    return out


def phase_seconds(marks: Mapping[str, float], t0: float) -> dict[str, float]:
    """Seconds of each phase in :data:`PHASES` (from the previous mark seen), and ``total``."""
    out: dict[str, float] = {}
    prev = t0
    for name, _ in PHASES:
        if name in marks:
            out[name] = marks[name] - prev
            prev = marks[name]
    if "first_task" in marks:
        out["total"] = marks["first_task"] - t0
    return out


def run_command(out_dir: Path, sets: Sequence[str]) -> list[str]:
    """``fedsim run --no-progress -o out_dir --set …`` in this interpreter: how every bench
    section starts a whole run in a process of its own."""
    cmd = [
        sys.executable,
        "-m",
        "fedsim.cli",
        "run",
        "--no-progress",
        "-o",
        str(out_dir),
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def watch_run(
    out_dir: Path,
    sets: Sequence[str] = (),
    interval: float = 0.1,
    stop_at_first_task: bool = False,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Start ``fedsim run`` (default config plus ``sets``) and watch it to its end.

    Returns its marks (seconds from process start), its memory record and its exit code.
    ``stop_at_first_task``: send Ctrl-C (SIGINT) once a worker has begun its first client task.
    """
    marks_file = Path(tempfile.mkstemp(prefix="fedsim-marks-", suffix=".jsonl")[1])
    env = {**os.environ, MARKS_ENV: str(marks_file)}
    log = open(out_dir.parent / f"{out_dir.name}.log", "w", encoding="utf-8")
    t0 = time.time()
    proc = subprocess.Popen(
        run_command(out_dir, sets), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    sampler = TreeSampler(proc.pid, t0)
    stopped: float | None = None  # when Ctrl-C was sent
    # A driver busy in a Ray call may not act on Ctrl-C for long (seen on a loaded machine):
    # after STOP_GRACE seconds it gets SIGTERM (Ray's processes are ended below either way).
    try:
        while proc.poll() is None:
            sampler.sample()
            if time.time() - t0 > timeout:
                proc.send_signal(signal.SIGINT)
                raise RuntimeError(f"bench: fedsim run did not end in {timeout:g} s")
            if stop_at_first_task and stopped is None:
                if "first_task" in read_marks(marks_file):
                    proc.send_signal(signal.SIGINT)
                    stopped = time.time()
            elif stopped is not None and time.time() - stopped > STOP_GRACE:
                proc.terminate()
            time.sleep(interval)
        proc.wait()
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
        _stop_leftovers(sampler)
    marks = read_marks(marks_file)
    marks_file.unlink(missing_ok=True)
    if proc.returncode != 0 and stopped is None:
        tail = (out_dir.parent / f"{out_dir.name}.log").read_text().strip().splitlines()
        raise RuntimeError(
            f"bench: fedsim run exited with {proc.returncode}: {tail[-1:] or ''}"
        )
    return {
        "marks_s": {
            k: round(v - t0, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])
        },
        "phases_s": {k: round(v, 3) for k, v in phase_seconds(marks, t0).items()},
        "memory": sampler.summary(),
        "returncode": proc.returncode,
        "wall_s": round(time.time() - t0, 3),
    }


def _stop_leftovers(sampler: TreeSampler) -> None:
    """End any process of the watched run still alive after its driver exited (ours only:
    the pids and start times the sampler saw under the run's root)."""
    import psutil

    alive = []
    for (pid, created), _ in sampler.procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=10)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def load_average() -> list[float]:
    """``os.getloadavg()``: the machine's 1, 5 and 15 minute load (times inflate with it)."""
    return [round(x, 2) for x in os.getloadavg()]


def bench_startup(repeats: int, out: Path, console: Any) -> dict[str, Any]:
    """Process start → first client task of a default ``fedsim run``, per phase (medians of
    ``repeats`` runs after one warm-up run that builds or finds the caches)."""
    out.mkdir(parents=True, exist_ok=True)
    console.print("[bold]startup[/bold]: fedsim run (default) to its first client task")
    load_before = load_average()
    watch_run(out / "startup-warmup", stop_at_first_task=True)
    runs = [
        watch_run(out / f"startup-{k}", stop_at_first_task=True) for k in range(repeats)
    ]
    phases = [name for name, _ in PHASES] + ["total"]
    median = {
        p: round(statistics.median(r["phases_s"][p] for r in runs), 3)
        for p in phases
        if all(p in r["phases_s"] for r in runs)
    }
    return {
        "command": "fedsim run (no arguments: toy-iid, FedAvg)",
        "phases": {name: about for name, about in PHASES},
        "median_s": median,
        "runs": [{"phases_s": r["phases_s"], "marks_s": r["marks_s"]} for r in runs],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def bench_memory_run(out: Path, console: Any, interval: float = 0.1) -> dict[str, Any]:
    """Every process of one whole default ``fedsim run``: its peak RSS, their sum."""
    console.print(
        "[bold]memory-run[/bold]: fedsim run (default), every process sampled"
    )
    load_before = load_average()
    r = watch_run(out / "memory-run", interval=interval)
    return {
        "command": "fedsim run (no arguments: toy-iid, FedAvg)",
        "interval_s": interval,
        **r["memory"],
        "run_wall_s": r["wall_s"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def startup_table(s: Mapping[str, Any]) -> Table:
    table = Table(title="start-up of a default run: process start → first client task")
    table.add_column("phase")
    table.add_column("seconds (median)", justify="right")
    table.add_column("what")
    for name, about in s["phases"].items():
        if name in s["median_s"]:
            table.add_row(name, f"{s['median_s'][name]:.2f}", about)
    table.add_row("total", f"{s['median_s'].get('total', float('nan')):.2f}", "")
    table.caption = (
        f"load average {s['load_average_before']} → {s['load_average_after']}"
    )
    return table


def memory_run_table(m: Mapping[str, Any]) -> Table:
    table = Table(title="peak resident memory of every process of a default run (MiB)")
    table.add_column("process")
    table.add_column("pid", justify="right")
    table.add_column("peak RSS", justify="right")
    for p in m["processes"]:
        table.add_row(p["role"], str(p["pid"]), f"{p['peak_rss_mb']:.0f}")
    table.add_row("sum of the peaks", "", f"{m['sum_of_peaks_mb']:.0f}")
    table.add_row("largest sum in one sample", "", f"{m['max_sum_rss_mb']:.0f}")
    table.caption = (
        f"{m['process_count']} processes, {m['samples']} samples; "
        f"load average {m['load_average_before']} → {m['load_average_after']}"
    )
    return table
