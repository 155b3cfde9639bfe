"""The FedAvg family's float64 weighted sum in one pass over the clients' float32 tensors.

:func:`fedsim.algorithms.base.accumulate` sums Σ_k c_k · float64(T_k) in client order, one
multiply-add per client and element. ATen does it in two operations per client and block (the
float32 → float64 copy, then ``add_`` with ``alpha``): 2.7–3.2× the memory-bandwidth bound at
LLaVA-1.5-7B projector size with 50 clients. :file:`fma_accumulate.c` does the same arithmetic —
``fma(c_k, (double) x_k[i], a_i)`` for k in order — in one loop that keeps a float64 tile in the
cache while every client's tensor streams through it once.

The C file is compiled on first use with the machine's C compiler (``$CC``, else ``cc`` or
``gcc``) into ``$FEDSIM_CACHE/kernels`` (default ``~/.cache/fedsim/kernels``), named by the hash
of the source, the flags and the compiler, written atomically (workers may race to build it).
Before it is used, a probe compares its bits with ATen's on tensors with odd tails, from zero
and from a given accumulator: where they differ (a compiler or platform that rounds otherwise),
or where there is no compiler, fedsim keeps the ATen path — the same bits either way, so a run's
results never depend on which path ran. ``FEDSIM_FUSED_SUMS=0`` keeps the ATen path.
:func:`status` says which path is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fma_accumulate.c")
_TILE = 32768  # the C file's TILE: the probe's sizes straddle it

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _flags() -> list[str]:
    """The instruction sets this CPU reports, named one by one (never ``-march=native``: the
    flags are part of the cached library's name, so nodes of different CPUs sharing a cache
    each build their own). AVX-512 against AVX2: 0.17 against 0.21 s for 50 × 21 M elements
    (AMD EPYC, 2 threads)."""
    flags = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off"]
    have = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= have:
        flags += ["-mavx2", "-mfma"]
        if {"avx512f", "avx512vl"} <= have:
            flags += ["-mavx512f", "-mavx512vl"]
    return flags


def _compiler() -> str | None:
    """``$CC`` when set (and only it: a named compiler that is missing is not replaced by
    another), else ``cc`` or ``gcc`` from the PATH."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def _x86_without_fma() -> bool:
    """An x86 CPU that does not report AVX2 and FMA (or whose flags cannot be read): ``fma()``
    would be a slow library call there, so the ATen path stays."""
    x86 = platform.machine() in ("x86_64", "AMD64", "i386", "i686")
    return x86 and not {"avx2", "fma"} <= _cpu_flags()


def _build(cc: str, flags: list[str]) -> Path:
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((flags, version, platform.machine())).encode()
    ).hexdigest()[:16]
    from fedsim.runio import default_cache_dir

    folder = default_cache_dir() / "kernels"
    lib = folder / f"fma_accumulate-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(
                (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
            )
        os.replace(
            tmp, lib
        )  # atomic: a racing worker sees the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


Kernel = Callable[..., int]


def _load(lib: Path) -> Kernel:
    fn = ctypes.CDLL(
        str(lib)
    ).fedsim_fma_accumulate  # CDLL: the GIL is released in calls
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_void_p,
    ]
    fn.restype = ctypes.c_int
    return fn


def _aten(acc: torch.Tensor, xs: Sequence[torch.Tensor], cs: Sequence[float]) -> None:
    for x, c in zip(xs, cs):
        acc.add_(x.to(torch.float64), alpha=c)


def _probe(fn: Kernel) -> bool:
    """The kernel's bits against ATen's: from an accumulator and from zero, at sizes below,
    across and past a tile with odd tails, values over twelve orders of magnitude."""
    g = torch.Generator().manual_seed(20261130)
    for n in (37, _TILE + 5, 3 * _TILE + 101):
        xs = [
            torch.randn(n, generator=g)
            * 10.0 ** float(torch.randint(-6, 7, (1,), generator=g))
            for _ in range(5)
        ]
        cs = [float(c) for c in torch.rand(5, generator=g, dtype=torch.float64)]
        start = torch.randn(n, generator=g, dtype=torch.float64)
        want = start.clone()
        _aten(want, xs, cs)
        got = start.clone()
        _call(fn, xs, cs, n, acc=got, out=None, threads=2)
        zero = torch.zeros(n, dtype=torch.float64)
        _aten(zero, xs, cs)
        out = torch.empty(n, dtype=torch.float32)
        _call(fn, xs, cs, n, acc=None, out=out, threads=2)
        if not (torch.equal(got, want) and torch.equal(out, zero.to(torch.float32))):
            return False
    return True


def kernel() -> Kernel | None:
    """The fused kernel once built, loaded and probed in this process; None where fedsim keeps
    the ATen path (:func:`status` says why)."""
    with _lock:
        if "kernel" in _state:
            return _state["kernel"]  # type: ignore[return-value]
        fn, why = None, ""
        cc, flags = _compiler(), _flags()
        if os.environ.get("FEDSIM_FUSED_SUMS", "1") == "0":
            why = "off (FEDSIM_FUSED_SUMS=0)"
        elif cc is None:
            why = "no C compiler ($CC, cc, gcc)"
        elif _x86_without_fma():
            why = "this CPU reports no AVX2/FMA"
        else:
            try:
                candidate = _load(_build(cc, flags))
            except OSError as e:
                why = f"build failed: {e}"
            else:
                if _probe(candidate):
                    fn = candidate
                else:
                    why = "its bits differ from ATen's here"
        _state["kernel"] = fn
        _state["status"] = (
            f"fused ({Path(cc or '').name}, {' '.join(flags[3:])})"
            if fn
            else f"ATen: {why}"
        )
        return fn


def status() -> str:
    """Which path the float64 weighted sums take in this process, and why."""
    kernel()
    return str(_state["status"])


def _call(
    fn: Kernel,
    xs: Sequence[torch.Tensor],
    cs: Sequence[float],
    n: int,
    acc: torch.Tensor | None,
    out: torch.Tensor | None,
    threads: int,
) -> None:
    """Run the kernel over [0, n) split into ``threads`` ranges of whole tiles, one Python
    thread each (the call releases the GIL)."""
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    coeffs = (ctypes.c_double * len(cs))(*[float(c) for c in cs])
    a = None if acc is None else acc.data_ptr()
    o = None if out is None else out.data_ptr()
    tiles = -(-n // _TILE)
    parts = max(1, min(threads, tiles))
    bounds = [min(n, (tiles * i // parts) * _TILE) for i in range(parts)] + [n]

    failed = [0] * parts

    def run(i: int) -> None:
        failed[i] = fn(a, ptrs, coeffs, len(xs), bounds[i], bounds[i + 1], o)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(1, parts)]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    if any(failed):
        raise MemoryError("fused weighted sum: no memory for a 256 KiB tile")


@contextmanager
def aten_only() -> Iterator[None]:
    """Inside the block every sum takes the ATen path (the bench times both in one run)."""
    with _lock:
        _state["off"] = True
    try:
        yield
    finally:
        with _lock:
            _state.pop("off", None)


def fused_sum(
    xs: Sequence[torch.Tensor],
    cs: Sequence[float],
    acc: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> bool:
    """Σ_k c_k · float64(x_k) into ``acc`` (flat float64, added to) or from zero into ``out``
    (flat float32), with the fused kernel; False (nothing done) where it does not apply: no
    kernel, tensors not flat contiguous float32 on the CPU, or ``out`` not float32."""
    if not xs or any(
        x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
        for x in xs
    ):
        return False
    n = xs[0].numel()
    if any(x.numel() != n for x in xs):
        return False
    if acc is not None and (acc.dtype != torch.float64 or not acc.is_contiguous()):
        return False
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous()):
        return False
    if (acc is None) == (out is None) or _state.get("off"):
        return False
    fn = kernel()
    if fn is None:
        return False
    _call(fn, xs, cs, n, acc, out, torch.get_num_threads())
    return True
