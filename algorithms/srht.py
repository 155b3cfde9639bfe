"""The block subsampled randomized Hadamard transform (block SRHT) of a matrix's rows.

For Y = Σ_k √p_k Δ_k Ω_k (the range sketch of the horizontal stack [√p_1 Δ_1, …, √p_K Δ_K],
:func:`fedsim.algorithms.fedcmp.sketch_bases`) a Gaussian Ω_k costs 2 m n ℓ FLOPs per client:
at LLaVA-1.5-7B projector size with 50 clients and ℓ = 266, 0.56 TFLOP, 0.69 s of a round at
this CPU's bfloat16 matmul peak, with 0.23 s more to draw the Gaussians. The block SRHT of
Balabanov, Beaupère, Grigori & Lederer ("Block subsampled randomized Hadamard transform for
Nyström approximation on distributed architectures", ICML 2023) is an oblivious subspace
embedding with as many rows as a plain SRHT needs:

    Ω_k = D_k H Rᵀ D̃_k      (n' × ℓ, n' = n padded to a power of two),

D_k and D̃_k diagonal random signs drawn per client, H the n' × n' Walsh–Hadamard matrix and
R the same ℓ sampled coordinates for every client. Δ_k Ω_k takes n' log₂ n' additions per
row (the fast Walsh–Hadamard transform) instead of 2 n ℓ FLOPs — 22× fewer at n = 4096 — and
no Gaussian draws: the sketch becomes a pass at about memory speed.

:func:`srht_rows` runs :file:`hadamard_sketch.c` (compiled on first use, :mod:`ckernel`) when
a probe finds its bits equal to :func:`srht_rows_torch`'s, the reference: each butterfly
rounds once and the stages go in one fixed order, so the two agree bit for bit. Otherwise (no
compiler, an x86 without AVX2/FMA, ``FEDSIM_SRHT_KERNEL=0``, bits that differ) the torch
reference runs — about 100× slower at 4096 × 4096, the same numbers. :func:`status` says which.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedsim.algorithms import ckernel

SOURCE = Path(__file__).with_name("hadamard_sketch.c")


Kernel = Callable[..., int]


def padded(n: int) -> int:
    """The power of two the transform runs on: n' ≥ n."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class BlockSRHT:
    """The shared part of a block SRHT: ``idx`` the ℓ sampled coordinates of [0, n') (int64),
    and the generator the per-client signs come from, in client order."""

    n: int
    idx: Tensor

    @property
    def ell(self) -> int:
        return int(self.idx.numel())

    @staticmethod
    def draw(n: int, ell: int, generator: torch.Generator) -> BlockSRHT:
        """ℓ coordinates of [0, n') without replacement; when ℓ > n' (a sketch wider than one
        client's padded width) consecutive random permutations, each coordinate ⌈ℓ/n'⌉ times
        at most (the per-client output signs tell the copies apart across clients)."""
        npad = padded(n)
        parts, left = [], ell
        while left > 0:
            perm = torch.randperm(npad, generator=generator)
            parts.append(perm[: min(left, npad)])
            left -= npad
        # Sorted within each permutation's share: a sample is a set, and ascending
        # coordinates make the kernel's reads of them sequential.
        return BlockSRHT(n, torch.cat([part.sort().values for part in parts]))

    def signs(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One client's (D_k over n coordinates, D̃_k over ℓ outputs), ±1 float32."""
        d = torch.randint(0, 2, (self.n,), generator=generator).mul_(2).sub_(1)
        o = torch.randint(0, 2, (self.ell,), generator=generator).mul_(2).sub_(1)
        return d.to(torch.float32), o.to(torch.float32)


def row_squares_torch(x: Tensor) -> Tensor:
    """Each row's sum of squares in float64 in the kernel's order: the squares (exact in
    float64) padded with zeros to n', then halved, s[:len] + s[len:] for len = n'/2, …, 1."""
    m, n = x.shape
    s = torch.zeros(m, padded(n), dtype=torch.float64, device=x.device)
    s[:, :n] = x.to(torch.float64).square()
    while s.shape[1] > 1:
        half = s.shape[1] // 2
        s = s[:, :half] + s[:, half:]
    return s[:, 0]


def srht_rows_torch(x: Tensor, signs: Tensor, idx: Tensor, osign: Tensor) -> Tensor:
    """The reference: for each row, t = (x ⊙ signs) padded with zeros to n', the unnormalised
    Walsh–Hadamard transform by butterflies (a, b) → (a + b, a − b) over the strides
    h = 1, 2, …, n'/2 in that order, then t[idx] ⊙ osign. [m, n] float32 → [m, ℓ]."""
    m, n = x.shape
    npad = padded(n)
    t = torch.zeros(m, npad, dtype=torch.float32, device=x.device)
    t[:, :n] = x * signs.to(x.device)
    h = 1
    while h < npad:
        v = t.view(m, npad // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        t = torch.stack((a + b, a - b), dim=2).reshape(m, npad)
        h *= 2
    return t[:, idx.to(x.device)] * osign.to(x.device)


def _load(lib: Path) -> Kernel:
    so = ctypes.CDLL(str(lib))  # CDLL: the GIL is released in calls
    fn = so.fedsim_srht_rows
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 3
    fn.argtypes += [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn.openmp = bool(so.fedsim_srht_openmp())  # type: ignore[attr-defined]
    return fn


def _call(
    fn: Kernel, x: Tensor, signs: Tensor, idx: Tensor, osign: Tensor, threads: int
) -> tuple[Tensor, Tensor]:
    """The kernel over the rows of ``x`` on ``threads`` threads: (the sketch [m, ℓ], the rows'
    sums of squares [m] float64). Built with OpenMP, the kernel's threads are those of the
    OpenMP runtime torch has loaded (its worker threads otherwise spin for a while after each
    matmul and would compete with threads of our own: 2× slower on 2 cores); without, one
    Python thread per share of the rows."""
    m, n = x.shape
    ell = idx.numel()
    y = torch.empty(m, ell, dtype=torch.float32)
    sq = torch.empty(m, dtype=torch.float64)
    idx = idx.to(torch.long).contiguous()
    args = (x.data_ptr(), n, padded(n), signs.data_ptr(), idx.data_ptr())
    tail = (osign.data_ptr(), ell, y.data_ptr(), sq.data_ptr())
    if getattr(fn, "openmp", False):
        if fn(args[0], 0, m, *args[1:], *tail, threads):
            raise MemoryError("block SRHT: no memory for a row buffer")
        return y, sq
    parts = max(1, min(threads, m))
    bounds = [m * i // parts for i in range(parts + 1)]
    if not ckernel.on_threads(
        lambda lo, hi: fn(args[0], lo, hi, *args[1:], *tail, 1), bounds
    ):
        raise MemoryError("block SRHT: no memory for a row buffer")
    return y, sq


def _probe(fn: Kernel) -> bool:
    """The kernel's bits against the reference: widths below, at and past a SIMD vector and
    not powers of two, values over twelve orders of magnitude, ℓ beyond n'."""
    g = torch.Generator().manual_seed(20261201)
    for m, n, ell in ((3, 1, 1), (5, 7, 9), (4, 16, 5), (6, 100, 40), (9, 1024, 266)):
        scale = 10.0 ** torch.randint(-6, 7, (m, 1), generator=g).to(torch.float32)
        x = torch.randn(m, n, generator=g) * scale
        sk = BlockSRHT.draw(n, ell, g)
        d, o = sk.signs(g)
        got, sq = _call(fn, x, d, sk.idx, o, 2)
        want = srht_rows_torch(x, d, sk.idx, o)
        if not (torch.equal(got, want) and torch.equal(sq, row_squares_torch(x))):
            return False
    return True


_lazy = ckernel.Lazy(
    "FEDSIM_SRHT_KERNEL",
    lambda cc, f: ckernel.build(SOURCE, cc, f),
    _load,
    _probe,
    ("the torch reference", "kernel", "torch"),
)


def kernel() -> Kernel | None:
    """The C kernel once built, loaded and probed in this process; None where the torch
    reference runs (:func:`status` says why)."""
    return _lazy.kernel()


def status() -> str:
    """Which path the block SRHT takes in this process, and why."""
    return _lazy.status()


def srht_rows(
    x: Tensor, signs: Tensor, idx: Tensor, osign: Tensor
) -> tuple[Tensor, float]:
    """(:func:`srht_rows_torch`'s sketch, ‖x‖²_F = math.fsum of :func:`row_squares_torch`), by
    the C kernel where it applies (a float32 CPU matrix and a probed kernel; one read of ``x``
    for both), else by the reference."""
    if x.dtype != torch.float32:
        raise TypeError(f"block SRHT: float32 rows expected, got {x.dtype}")
    if x.device.type == "cpu":
        fn = kernel()
        if fn is not None:
            y, sq = _call(
                fn,
                x.contiguous(),
                signs.contiguous(),
                idx,
                osign.contiguous(),
                torch.get_num_threads(),
            )
            return y, math.fsum(sq.tolist())
    y = srht_rows_torch(x, signs, idx, osign)
    return y, math.fsum(row_squares_torch(x).tolist())
