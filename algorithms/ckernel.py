"""Small C kernels compiled on first use with the machine's C compiler (``$CC``, else ``cc`` or
``gcc``) into ``$FEDSIM_CACHE/kernels`` (default ``~/.cache/fedsim/kernels``), named by the hash
of the source, the flags and the compiler, written atomically (workers may race to build one).

Each kernel's module (:mod:`fedsim.algorithms.fused_sums`, :mod:`fedsim.algorithms.srht`)
probes the built library against its torch reference before it uses it, and keeps the torch
path where the bits differ, where there is no compiler, or where the build fails.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def flags() -> list[str]:
    """The compiler flags: the instruction sets this CPU reports, named one by one (never
    ``-march=native``: the flags are part of the cached library's name, so nodes of different
    CPUs sharing a cache each build their own), no fast-math, no contraction."""
    out = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off"]
    have = cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= have:
        out += ["-mavx2", "-mfma"]
        if {"avx512f", "avx512vl"} <= have:
            out += ["-mavx512f", "-mavx512vl"]
    return out


def compiler() -> str | None:
    """``$CC`` when set (and only it: a named compiler that is missing is not replaced by
    another), else ``cc`` or ``gcc`` from the PATH."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def x86_without_fma() -> bool:
    """An x86 CPU that does not report AVX2 and FMA (or whose flags cannot be read)."""
    x86 = platform.machine() in ("x86_64", "AMD64", "i386", "i686")
    return x86 and not {"avx2", "fma"} <= cpu_flags()


def build(source: Path, cc: str, cflags: list[str]) -> Path:
    """The shared library of ``source`` in the kernel cache, built when it is not there yet.
    Raises OSError with the compiler's last line when the build fails."""
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        source.read_bytes() + repr((cflags, version, platform.machine())).encode()
    ).hexdigest()[:16]
    from fedsim.runio import default_cache_dir

    folder = default_cache_dir() / "kernels"
    lib = folder / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *cflags, "-o", tmp, str(source), "-lm"],
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


K = TypeVar("K")


def prepare(
    env: str,
    build_with: Callable[[str, list[str]], Path],
    load: Callable[[Path], K],
    probe: Callable[[K], bool],
    reference: str,
) -> tuple[K | None, str, str | None, list[str]]:
    """(the kernel, or None and why not; the compiler; its flags): off when ``$env`` is 0, no
    compiler, an x86 without AVX2/FMA, a failed build (with OpenMP first, then without: a
    compiler with no OpenMP gives a kernel for Python threads), or bits that differ from
    ``reference``'s in ``probe``."""
    cc, cflags = compiler(), flags()
    if os.environ.get(env, "1") == "0":
        return None, f"off ({env}=0)", cc, cflags
    if cc is None:
        return None, "no C compiler ($CC, cc, gcc)", cc, cflags
    if x86_without_fma():
        return None, "this CPU reports no AVX2/FMA", cc, cflags
    try:
        fn = load(build_with(cc, [*cflags, "-fopenmp"]))
    except OSError:
        try:
            fn = load(build_with(cc, cflags))
        except OSError as e:
            return None, f"build failed: {e}", cc, cflags
    if not probe(fn):
        return None, f"its bits differ from {reference}'s here", cc, cflags
    return fn, "", cc, cflags


def describe(
    fn: object, cc: str | None, cflags: list[str], why: str, used: str, other: str
) -> str:
    """A kernel's status line: ``used (compiler, instruction-set flags, threads)`` when ``fn``
    is one, else ``other: why``."""
    if fn is None:
        return f"{other}: {why}"
    isa = " ".join(f for f in cflags if f.startswith("-m")) or "no SIMD flags"
    threads = "OpenMP" if getattr(fn, "openmp", False) else "Python threads"
    return f"{used} ({Path(cc or '').name}, {isa}, {threads})"


class Lazy(Generic[K]):
    """A kernel built, loaded and probed on first use (once per process, thread-safe), with
    its status line (:func:`prepare`, :func:`describe`)."""

    def __init__(
        self,
        env: str,
        build_with: Callable[[str, list[str]], Path],
        load: Callable[[Path], K],
        probe: Callable[[K], bool],
        names: tuple[str, str, str],
    ) -> None:
        self._args = (env, build_with, load, probe)
        self._names = (
            names  # (the reference's name, the kernel's label, the fallback's)
        )
        self._lock = threading.Lock()
        self._done = False
        self._fn: K | None = None
        self._line = ""

    def kernel(self) -> K | None:
        with self._lock:
            if not self._done:
                reference, used, other = self._names
                fn, why, cc, cflags = prepare(*self._args, reference)
                self._fn, self._done = fn, True
                self._line = describe(fn, cc, cflags, why, used, other)
            return self._fn

    def status(self) -> str:
        self.kernel()
        return self._line


def on_threads(share: Callable[[int, int], int], bounds: list[int]) -> bool:
    """``share(lo, hi)`` for consecutive ``bounds``, one Python thread each (the caller's for
    the first; a ctypes call releases the GIL): for a kernel built without OpenMP. True when
    every share returned 0."""
    failed = [0] * (len(bounds) - 1)

    def run(i: int) -> None:
        failed[i] = share(bounds[i], bounds[i + 1])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(1, len(failed))]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    return not any(failed)
