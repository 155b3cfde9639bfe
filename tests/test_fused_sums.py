"""The fused float64 weighted sum (fedsim.algorithms.fused_sums): built once per machine into
the cache, used only where its bits equal ATen's, and the ATen path wherever it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsim.algorithms import fused_sums as fs
from tests.test_ckernel import kernel_status

HAVE_CC = fs._compiler() is not None and not fs._x86_without_fma()
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler or no FMA here")


def _status(tmp_path: Path, **env: str) -> str:
    return kernel_status(tmp_path, "fused_sums", **env)


def test_the_aten_path_stays_when_asked_or_without_a_compiler(tmp_path):
    assert _status(tmp_path, FEDSIM_FUSED_SUMS="0") == "ATen: off (FEDSIM_FUSED_SUMS=0)"
    # A named compiler that is missing is not replaced by another one.
    got = _status(tmp_path, CC="/no/such/cc")
    assert got == "ATen: no C compiler ($CC, cc, gcc)"
    assert not (tmp_path / "cache" / "kernels").exists()


@needs_cc
def test_built_once_into_the_cache_and_reused(tmp_path):
    assert _status(tmp_path).startswith("fused (")
    libs = list((tmp_path / "cache" / "kernels").glob("fma_accumulate-*.so"))
    assert len(libs) == 1
    before = libs[0].stat().st_mtime_ns
    assert _status(tmp_path).startswith("fused (")
    assert libs[0].stat().st_mtime_ns == before  # loaded, not rebuilt
    assert not list((tmp_path / "cache" / "kernels").glob("*.tmp"))


@needs_cc
def test_the_probe_refuses_a_kernel_that_rounds_differently(tmp_path, monkeypatch):
    """Two roundings (a + c·x) where ATen fuses them into one: the probe must see the
    difference on its random data and keep ATen; the real kernel passes the same probe."""
    src = fs.SOURCE.read_text().replace(
        "fma(c, (double) x[i], a[i])", "a[i] + c * (double) x[i]"
    )
    assert src != fs.SOURCE.read_text()
    wrong = tmp_path / "wrong.c"
    wrong.write_text(src)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fs, "SOURCE", wrong)
    bad = fs._load(fs._build(fs._compiler(), fs._flags()))
    assert fs._probe(bad) is False
    monkeypatch.undo()
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    assert fs._probe(fs._load(fs._build(fs._compiler(), fs._flags()))) is True


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_sums_are_aten_s_bits(threads):
    """From zero into float32 and into a float64 accumulator, sizes around a tile with odd
    tails, every client's coefficient different: the same bits as ATen's per-client add_."""
    if fs.kernel() is None:
        pytest.skip(fs.status())
    g = torch.Generator().manual_seed(7)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 4099, fs._TILE - 1, 2 * fs._TILE + 3):
            xs = [torch.randn(n, generator=g) for _ in range(7)]
            cs = [float(c) for c in torch.rand(7, generator=g, dtype=torch.float64)]
            ref = torch.zeros(n, dtype=torch.float64)
            for x, c in zip(xs, cs):
                ref.add_(x.to(torch.float64), alpha=c)
            out = torch.empty(n, dtype=torch.float32)
            assert fs.fused_sum(xs, cs, out=out)
            assert torch.equal(out, ref.to(torch.float32))
            acc = torch.randn(n, generator=g, dtype=torch.float64)
            want = acc.clone()
            for x, c in zip(xs, cs):
                want.add_(x.to(torch.float64), alpha=c)
            assert fs.fused_sum(xs, cs, acc=acc)
            assert torch.equal(acc, want)
    finally:
        torch.set_num_threads(old)


def test_fused_sum_declines_what_it_does_not_handle():
    x = torch.ones(10)
    assert not fs.fused_sum([x.double()], [1.0], out=torch.empty(10))  # float64 inputs
    assert not fs.fused_sum([x], [1.0], out=torch.empty(10, dtype=torch.float64))
    assert not fs.fused_sum([x, torch.ones(11)], [1.0, 1.0], out=torch.empty(10))
    assert not fs.fused_sum([x], [1.0])  # neither acc nor out
    column = torch.ones(4, 4)[:, 0]  # a strided view
    assert not fs.fused_sum([column], [1.0], out=torch.empty(4))


def test_aten_only_turns_the_fused_path_off_inside_its_block():
    xs, out = [torch.ones(8)], torch.empty(8)
    with fs.aten_only():
        assert not fs.fused_sum(xs, [0.5], out=out)
    if fs.kernel() is not None:
        assert fs.fused_sum(xs, [0.5], out=out)
        assert torch.equal(out, torch.full((8,), 0.5))
