"""The C kernels' shared build (fedsim.algorithms.ckernel): every instruction-set path of each
kernel, with and without OpenMP, gives its reference's bits where this CPU can run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.algorithms import ckernel, fused_sums, srht

HAVE_CC = ckernel.compiler() is not None and not ckernel.x86_without_fma()
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler or no FMA here")

BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off"]
ISA = {
    "scalar": ([], set()),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
    "avx512": (
        ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl"],
        {"avx2", "fma", "avx512f", "avx512vl"},
    ),
}


def kernel_status(tmp_path: Path, module: str, **env: str) -> str:
    """``fedsim.algorithms.<module>.status()`` in a fresh process with its own kernel cache."""
    probe = (
        f"import json, fedsim.algorithms.{module} as m; print(json.dumps(m.status()))"
    )
    full = {**os.environ, "FEDSIM_CACHE": str(tmp_path / "cache"), **env}
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=full
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_cc
@pytest.mark.parametrize("module", [fused_sums, srht], ids=["fused_sums", "srht"])
@pytest.mark.parametrize("isa", sorted(ISA))
@pytest.mark.parametrize("openmp", [False, True])
def test_every_instruction_set_build_has_the_reference_bits(
    tmp_path, monkeypatch, module, isa, openmp
):
    """Plain C, AVX2 (the SRHT's 8-lane permutes) and AVX-512 (16-lane permutes, radix-4
    stages; the fused sum as the compiler vectorizes it), each with and without OpenMP: a
    machine only ever builds one of them, so the others are built and probed here (ATen's bits
    for the fused sum, the torch reference's for the SRHT) where this CPU can run them."""
    extra, needs = ISA[isa]
    if not needs <= ckernel.cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - ckernel.cpu_flags())}")
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    flags = [*BASE_FLAGS, *extra, *(["-fopenmp"] if openmp else [])]
    try:
        fn = module._load(ckernel.build(module.SOURCE, ckernel.compiler(), flags))
    except OSError as e:  # a compiler without OpenMP
        pytest.skip(f"build failed: {e}")
    assert getattr(fn, "openmp", False) == openmp
    assert module._probe(fn)
