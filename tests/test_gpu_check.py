"""scripts/gpu_check.sh on a machine without a GPU: the dry run passes and says what it would
skip, bad flags are one-line errors, and a part that fails or overruns its cap is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.gpu_check import PARTS, run_one

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(SCRIPT), "--python", sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_dry_run_passes_without_a_gpu_and_names_what_it_would_skip(tmp_path):
    out = tmp_path / "check" / "gpu-check.json"
    r = _check("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["settings"]["dry_run"] is True
    assert list(record["plan"]) == list(PARTS)
    assert record["parts"] == {}  # no workload ran
    # Only the plan's JSON is written: no part's folder, log or data cache.
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpu-check.json"]
    assert record["plan"]["vllm"]["command"][6] == str(
        out.parent / "gpu-check-work" / "vllm.json"
    )
    assert Path(record["files"]["toy_backbone"]).is_dir()
    for name, p in record["plan"].items():
        assert p["command"][1:4] == ["-m", "fedsim.gpu_check", "--part"]
        assert p["command"][4] == name and "--device" in p["command"]
        assert p["cap_s"] > 0
    assert sum(p["cap_s"] for p in record["plan"].values()) <= 570
    if not torch.cuda.is_available():
        for name in ("roofline", "cohort", "aggregation", "vllm"):
            assert "no CUDA device" in record["plan"][name]["would_skip"]
        assert record["plan"]["machine"]["would_skip"] is None
    try:
        import vllm  # noqa: F401
    except Exception:
        assert "lacks vllm" in record["plan"]["vllm"]["would_skip"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--parts", "machine,speed"], "--parts"),
        (["--device", "tpu"], "--device"),
        (["--budget", "0"], "--budget"),
        (["--vllm-python", "/no/such/python"], "--vllm-python"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, needle):
    out = tmp_path / "check" / "gpu-check.json"
    r = _check("--dry-run", "--out", str(out), *args)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0]
    assert not out.parent.exists()  # nothing written before the flags are checked


def test_an_interpreter_without_torch_is_one_line(tmp_path):
    bare = "/usr/bin/python3"  # the system's interpreter, where it has no torch
    probe = subprocess.run([bare, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare} has torch here")
    r = subprocess.run(
        ["bash", str(SCRIPT), "--python", bare, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot import torch" in lines[0]


def test_a_part_that_fails_or_overruns_is_recorded_with_its_reason(tmp_path):
    def cmd(code: str) -> list[str]:
        return [sys.executable, "-c", code, "--part-out", str(tmp_path / "p.json")]

    failed = run_one(cmd("raise SystemExit('vllm is missing here')"), 30, tmp_path, "a")
    assert failed["status"] == "failed" and failed["error"] == "vllm is missing here"
    slow = run_one(cmd("import time; time.sleep(60)"), 1, tmp_path, "b")
    assert slow["status"] == "timeout" and slow["cap_s"] == 1
    assert failed["log_tail"][-1] == "vllm is missing here"
    assert slow["seconds"] < 30  # stopped at the cap, not after the minute
    ok = run_one(
        cmd("import json, sys; open(sys.argv[2], 'w').write(json.dumps({'gpu': 'x'}))"),
        30,
        tmp_path,
        "c",
    )
    assert ok["status"] == "ok" and ok["gpu"] == "x"
    assert (tmp_path / "a.log").read_text().strip().endswith("vllm is missing here")


def test_the_documented_parts_and_caps_are_the_scripts():
    import re

    from fedsim.gpu_check import CAPS

    page = (ROOT / "docs" / "benchmarks" / "index.md").read_text()
    rows = re.findall(r"^\| `([a-z]+)` \| .* \| (\d+) s \|$", page, re.M)
    assert {name: int(cap) for name, cap in rows} == CAPS
    assert list(CAPS) == list(PARTS)


@pytest.mark.slow
def test_the_aggregation_part_runs_every_variant_on_the_cpu():
    """``--device cpu``: 2 clients at rank 8 at the 7B projector's shapes, every row in its own
    process; each ratio is the quotient of the rows' own second-round times."""
    import argparse

    from fedsim.gpu_check import AGG_VARIANTS, part_aggregation

    out = part_aggregation(argparse.Namespace(device="cpu"))
    assert out["clients"] == 2 and out["rank"] == 8
    assert set(out["rows"]) == set(AGG_VARIANTS)
    for name, (algo, params) in AGG_VARIANTS.items():
        row = out["rows"][name]
        assert row["algorithm"] == algo, row
        assert {k: row["params"][k] for k in params} == params
        assert out["ratios_to_fedavg"][name] == pytest.approx(
            row["seconds_round2"] / out["rows"]["fedavg"]["seconds_round2"]
        )
    # At rank 8 the sketch keeps the shared rank-16 part's top 8 directions in both precisions
    # and with either first-pass map.
    for name in ("fedcmp_sketch", "fedcmp_sketch_bf16", "fedcmp_sketch_srht_bf16"):
        assert out["rows"][name]["metrics_round2"]["linear_2.weight/rank"] == 8
