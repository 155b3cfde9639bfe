"""What a result was computed on: CPU, torch build, BLAS and vector unit, library versions.

Bit-identical results hold on one machine; across CPUs the rounding of float training differs
(MKL or OpenBLAS, AVX2 or AVX512 kernels), so every run and every toy build records this.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else platform.machine()


def _blas(config: str) -> str:
    """The BLAS torch was built with, from ``torch.__config__.show()``."""
    found = re.search(r"BLAS_INFO=([^,\s]+)", config)
    return found.group(1) if found else "unknown"


@lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch version, its BLAS and CPU capability, library versions."""
    import numpy
    import torch
    import transformers

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas(torch.__config__.show()),
        "mkl": torch.backends.mkl.is_available(),
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for summaries: ``AMD EPYC (2 cores), torch 2.13.0+cpu, AVX512, BLAS mkl``."""
    return (
        f"{info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"{info['torch_cpu_capability']}, BLAS {info['blas']}"
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def node_id() -> str:
    """The Ray node this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()
