"""The FedAvg family's float64 weighted sum in one pass over the clients' float32 tensors.

:func:`fedsim.algorithms.base.accumulate` sums Σ_k c_k · float64(T_k) in client order, one
multiply-add per client and element. ATen does it in two operations per client and block (the
float32 → float64 copy, then ``add_`` with ``alpha``): 2.7–3.2× the memory-bandwidth bound at
LLaVA-1.5-7B projector size with 50 clients. :file:`fma_accumulate.c` does the same arithmetic —
``fma(c_k, (double) x_k[i], a_i)`` for k in order — in one loop that keeps a float64 tile in the
cache while every client's tensor streams through it once, four clients per sweep of the tile
(the same chain of fused multiply-adds per element, a quarter of the tile's loads and stores),
on the OpenMP threads torch has loaded where the compiler has OpenMP (:mod:`ckernel`).

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
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from fedsim.algorithms import ckernel

SOURCE = Path(__file__).with_name("fma_accumulate.c")
_TILE = 32768  # the C file's TILE: the probe's sizes straddle it

_lock = threading.Lock()
_state: dict[str, object] = {}


_compiler = ckernel.compiler
_x86_without_fma = ckernel.x86_without_fma


_flags = ckernel.flags


def _build(cc: str, flags: list[str]) -> Path:
    return ckernel.build(SOURCE, cc, flags)


Kernel = Callable[..., int]


def _load(lib: Path) -> Kernel:
    so = ctypes.CDLL(str(lib))  # CDLL: the GIL is released in calls
    fn = so.fedsim_fma_accumulate
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    if so.fedsim_fma_openmp():
        par = so.fedsim_fma_accumulate_threads
        par.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
        par.argtypes += [ctypes.c_void_p, ctypes.c_int]
        par.restype = ctypes.c_int
        fn.parallel = par  # type: ignore[attr-defined]
        fn.openmp = True  # type: ignore[attr-defined]
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


_lazy = ckernel.Lazy(
    "FEDSIM_FUSED_SUMS",
    _build,
    _load,
    _probe,
    ("ATen", "fused", "ATen"),
)


def kernel() -> Kernel | None:
    """The fused kernel once built, loaded and probed in this process; None where fedsim keeps
    the ATen path (:func:`status` says why)."""
    return _lazy.kernel()


def status() -> str:
    """Which path the float64 weighted sums take in this process, and why."""
    return _lazy.status()


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
    par = getattr(fn, "parallel", None)
    if par is not None:
        # Built with OpenMP: the shares on torch's OpenMP threads (its workers spin for a
        # while after each parallel op and would compete with threads of our own).
        if par(a, ptrs, coeffs, len(xs), n, o, threads):
            raise MemoryError("fused weighted sum: no memory for a 256 KiB tile")
        return
    tiles = -(-n // _TILE)
    parts = max(1, min(threads, tiles))
    bounds = [min(n, (tiles * i // parts) * _TILE) for i in range(parts)] + [n]

    if not ckernel.on_threads(
        lambda lo, hi: fn(a, ptrs, coeffs, len(xs), lo, hi, o), bounds
    ):
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
