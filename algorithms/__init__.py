"""Federated algorithms: a registry of server + client halves (``fedsim.algorithms``).

Each module holds one algorithm, both halves, as a frozen dataclass registered with
``@register("name", paper=...)``. Third-party packages add theirs through the entry-point group
``fedsim.algorithms`` (each entry point names a module or a class; importing it registers).
"""

from __future__ import annotations

from fedsim.algorithms.base import (
    AggregateResult,
    Algorithm,
    ClientUpdate,
    LocalTraining,
    Weights,
)
from fedsim.algorithms.registry import (
    AlgorithmError,
    available,
    build_algorithm,
    get_algorithm_class,
    register,
)

__all__ = [
    "AggregateResult",
    "Algorithm",
    "AlgorithmError",
    "ClientUpdate",
    "LocalTraining",
    "Weights",
    "available",
    "build_algorithm",
    "get_algorithm_class",
    "register",
]
