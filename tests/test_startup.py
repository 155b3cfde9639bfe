"""Start-up and memory of a run (issue 20, item 5): what ``fedsim bench --sections
startup,memory-run`` counts, the marks it times, and the lazy imports and sharing that make a
default run start fast and small. Wall-clock values are never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fedsim.bench_startup import (
    PHASES,
    ProcessPeak,
    TreeSampler,
    phase_seconds,
    read_marks,
    role,
    summarize,
)

MIB = 2**20


def test_roles_come_from_the_executable_and_ray_titles():
    # A Ray worker's arguments name the raylet (--raylet-name): that must not make it one.
    worker_args = ["python", "default_worker.py", "--raylet-name=/tmp/ray/raylet"]
    assert role(worker_args, "python", False) == "ray worker (starting)"
    assert role(["ray::BackboneWorker.train"], "ray::BackboneWo", False) == (
        "ray::BackboneWorker"
    )
    assert role(["ray::IDLE"], "ray::IDLE", False) == "ray::IDLE"
    assert role(["/x/raylet", "--gcs-address=1"], "raylet", False) == "raylet"
    assert role(["/x/gcs_server", "--raylet"], "gcs_server", False) == "gcs_server"
    assert role(["python", "-u", "/r/dashboard/agent.py"], "python", False) == (
        "dashboard agent"
    )
    assert role(["python", "-m", "fedsim.cli", "run"], "python", True) == "driver"


def test_summary_counts_each_process_once_and_sums_the_peaks():
    procs = [
        ProcessPeak(10, "driver", "python -m fedsim.cli", 400.0),
        ProcessPeak(11, "ray::BackboneWorker", "ray::BackboneWorker", 500.0),
        ProcessPeak(12, "ray::BackboneWorker", "ray::BackboneWorker", 480.5),
        ProcessPeak(13, "raylet", "raylet", 30.0),
    ]
    s = summarize(procs, max_sum_rss_mb=1300.0, samples=7)
    assert s["process_count"] == 4
    assert s["sum_of_peaks_mb"] == 400.0 + 500.0 + 480.5 + 30.0
    assert s["by_role_mb"] == {
        "driver": 400.0,
        "ray::BackboneWorker": 980.5,
        "raylet": 30.0,
    }
    assert [p["pid"] for p in s["processes"]] == [10, 11, 12, 13]


# A parent that starts a child holding 64 MiB (pages written, so resident), then both wait.
_TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import time; b = b'\\\\x01' * (64 * 2**20); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(30)
    """
)


def _sample_tree(script: str, samples: int) -> tuple[subprocess.Popen, int, dict]:
    """Start ``script`` (it prints its child's pid once the child is set up), sample its tree
    ``samples`` times, kill both; the root, the child's pid and the sampler's summary."""
    root = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        child = int(root.stdout.readline())
        sampler = TreeSampler(root.pid, time.time())
        for _ in range(samples):
            sampler.sample()
        return root, child, sampler.summary()
    finally:
        root.kill()
        root.wait()
        if child is not None:
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass


def test_sampler_counts_the_run_tree_only_with_its_peaks():
    """Every process under the root is counted (the child with its 64 MiB), the sampling
    process itself is not; a peak is the kernel's high-water mark."""
    root, child, s = _sample_tree(_TREE, 3)
    pids = {p["pid"]: p for p in s["processes"]}
    assert set(pids) == {root.pid, child}
    assert os.getpid() not in pids
    assert pids[root.pid]["role"] == "driver"
    # the child wrote 64 MiB: its peak RSS holds at least that
    assert pids[child]["peak_rss_mb"] >= 64
    assert s["sum_of_peaks_mb"] == pytest.approx(
        sum(p["peak_rss_mb"] for p in s["processes"]), abs=0.1 * len(pids)
    )  # each row is rounded to 0.1 MiB


def test_marks_are_written_once_per_process_and_read_earliest(tmp_path, monkeypatch):
    from fedsim import startup

    path = tmp_path / "marks.jsonl"
    startup.mark("cli")  # no variable: nothing written anywhere
    monkeypatch.setenv(startup.MARKS_ENV, str(path))
    monkeypatch.setattr(startup, "_seen", set())
    startup.mark("first_task")
    startup.mark("first_task")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["pid"] == os.getpid()
    # Two workers mark their first task: the earliest counts; a cut line is skipped.
    path.write_text(
        '{"mark": "cli", "t": 101.0, "pid": 1}\n'
        '{"mark": "first_task", "t": 109.0, "pid": 2}\n'
        '{"mark": "first_task", "t": 108.5, "pid": 3}\n'
        '{"mark": "ray_in'
    )
    marks = read_marks(path)
    assert marks == {"cli": 101.0, "first_task": 108.5}
    phases = phase_seconds(marks, t0=100.0)
    # phases missing from the marks are skipped: first_task counts from the last seen one
    assert phases == {"cli": 1.0, "first_task": 7.5, "total": 8.5}
    assert [p for p, _ in PHASES][-1] == "first_task"


def test_driver_side_modules_import_no_model_code():
    """The driver and the Aggregator never build a model: importing them loads neither
    transformers' model/processing modules nor the toy recipe (seconds and ~0.1 GB each),
    nor dp_accounting and SciPy while no run asks for privacy (~70 MB)."""
    code = textwrap.dedent(
        """
        import sys
        import fedsim.cli, fedsim.driver, fedsim.aggregator, fedsim.bench_startup
        heavy = [m for m in ("transformers.modeling_utils", "transformers.processing_utils",
                 "transformers.image_processing_utils", "fedsim.models.toy",
                 "dp_accounting", "scipy") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


#: What a run's driver and a worker's row reads must not load (transformers' config classes
#: pull in torch.distributed.tensor and SymPy; pyarrow's ``take`` pulls in pandas).
RUN_HEAVY = (
    "datasets",
    "pandas",
    "matplotlib",
    "transformers.utils.type_validators",
    "transformers.modeling_utils",
    "torch.distributed.tensor",
    "sympy",
    "fedsim.models.toy",
)


@pytest.mark.slow
def test_a_run_s_driver_and_row_reads_load_no_heavy_modules(tmp_path, cache_dir):
    """A whole (small) run, driven in a fresh interpreter with its caches already built,
    then a worker's row reads and the cost model's: none of RUN_HEAVY is imported (before
    the report draws curves.png with matplotlib, after Ray has stopped). Each cost the driver
    ~60 MB and a worker ~60 MB (pandas) when they were."""
    from small_runs import SMALL

    from fedsim.config import load_config
    from fedsim.eval.toy_suite import ensure_toy_suite
    from fedsim.prepare import cache_root, prepare

    sets = [*SMALL, f"cache_dir={cache_dir}", "rounds=1"]
    cfg = load_config(None, sets)
    prep = prepare(cfg)  # scenes and the pixel cache built here, not in the child
    ensure_toy_suite(cache_root(cfg), cfg.data.scene, images=cfg.eval.suite_images)
    code = textwrap.dedent(
        f"""
        import sys
        from rich.console import Console
        from fedsim.config import load_config
        from fedsim.cost import TokenCost
        from fedsim.data.rows import RowReader
        from fedsim.driver import run
        from fedsim.models.spec import resolve_backbone

        cfg = load_config(None, {sets!r})
        run(cfg, {str(tmp_path / "run")!r}, console=Console(quiet=True),
            show_progress=False, plot=False)
        reader = RowReader.open({str(prep.train_path)!r}, {prep.pixel_path!r})
        assert len(reader.columns([0, 5, 7])["caption"]) == 3
        TokenCost(resolve_backbone(cfg), {str(prep.train_path)!r}, 0.3)(1, 1, 0, [0, 5])
        print("heavy:" + ",".join(m for m in {RUN_HEAVY!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy:", done.stdout[-3000:]


def test_pixel_cache_index_finds_a_cache_only_for_the_same_inputs(tmp_path):
    from fedsim.data.pixel_cache import known_pixel_cache, remember_pixel_cache

    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_text('{"_fingerprint": "abc", "_data_files": []}')
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "processor_config.json").write_text('{"size": 32}')
    cache = tmp_path / "cache"
    (cache / "pixels").mkdir(parents=True)
    assert known_pixel_cache(cache, data, [backbone, None]) is None
    npy = cache / "pixels" / "0123.npy"
    npy.write_bytes(b"x")
    remember_pixel_cache(cache, data, [backbone, None], npy)
    assert known_pixel_cache(cache, data, [backbone, None]) == npy
    # another processor configuration: unknown (the processor is asked again)
    (backbone / "processor_config.json").write_text('{"size": 64}')
    assert known_pixel_cache(cache, data, [backbone, None]) is None
    (backbone / "processor_config.json").write_text('{"size": 32}')
    # another dataset: unknown; a recorded file that is gone: unknown
    (data / "state.json").write_text('{"_fingerprint": "abd", "_data_files": []}')
    assert known_pixel_cache(cache, data, [backbone, None]) is None
    (data / "state.json").write_text('{"_fingerprint": "abc", "_data_files": []}')
    npy.unlink()
    assert known_pixel_cache(cache, data, [backbone, None]) is None


@pytest.mark.parametrize(
    ("sets", "cpus", "shared"),
    [
        ([], 2, True),
        ([], 4, True),
        ([], 16, False),
        (["ray.address=auto"], 2, False),
        (["ray.evaluator_gpus=1"], 2, False),
        (["ray.evaluator_resources={head: 1}"], 2, False),
        (["ray.evaluator_on_worker=off"], 2, False),
        (["ray.evaluator_on_worker=on"], 64, True),
    ],
)
def test_evaluator_shares_a_worker_on_small_machines(sets, cpus, shared):
    from fedsim.config import load_config
    from fedsim.pool import evaluator_on_worker

    assert evaluator_on_worker(load_config(None, sets), cpus) is shared


def test_evaluator_on_worker_on_refuses_an_evaluator_placement():
    from fedsim.config import load_config
    from fedsim.configtools import ConfigError
    from fedsim.pool import evaluator_on_worker

    cfg = load_config(None, ["ray.evaluator_on_worker=on", "ray.evaluator_gpus=1"])
    with pytest.raises(ConfigError, match="ray.evaluator_on_worker"):
        evaluator_on_worker(cfg, 2)


@pytest.mark.slow
def test_evaluator_on_worker_gives_the_same_bits(tmp_path, cache_dir, ray_session):
    """The Evaluator inside worker 0 or on its own: the same projector bits and the same
    evaluations (the worker trains on its own thread count between evaluations)."""
    from fedsim.runio import load_weights, weights_digest
    from tests.small_runs import small_run

    evals = {}
    digests = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        small_run(
            out,
            cache_dir,
            "eval_every=1",
            "eval.benchmarks=[]",
            f"ray.evaluator_on_worker={mode}",
        )
        digests[mode] = weights_digest(
            load_weights(out / "final" / "projector.safetensors")
        )
        lines = (out / "metrics.jsonl").read_text().splitlines()
        evals[mode] = [json.loads(x).get("eval") for x in lines]
        peaks = json.loads((out / "resources.json").read_text())["peak_rss_mb"]
        assert ("evaluator" in peaks) is (mode == "off")
    assert digests["on"] == digests["off"]
    assert evals["on"] == evals["off"] and evals["on"][0] is not None


# A parent holding 128 MiB that forks a child which never execs: until it would, the child
# shows the parent's command line and its 128 MiB (shared, copy-on-write).
_FORK = textwrap.dedent(
    """
    import os, sys, time
    b = b'\\x01' * (128 * 2**20)
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    print(pid, flush=True)
    time.sleep(30)
    """
)


def test_sampler_skips_a_child_before_exec():
    """A forked child that has not exec'd yet is its parent's image: counting it would charge
    the parent's pages twice (what made Ray's log monitor look like 384 MB)."""
    root, _, s = _sample_tree(_FORK, 2)
    assert [p["pid"] for p in s["processes"]] == [root.pid]
    assert s["processes"][0]["peak_rss_mb"] >= 128
    # one process counted: the largest summed sample is the parent's own RSS, not twice it
    assert s["max_sum_rss_mb"] <= s["processes"][0]["peak_rss_mb"]
