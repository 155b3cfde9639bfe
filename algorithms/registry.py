"""The algorithm registry: ``@register`` fills it; entry points extend it."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from fedsim.configtools import ConfigError, from_dict

_REGISTRY: dict[str, type] = {}
_BUILTINS = (
    "fedsim.algorithms.fedavg",
    "fedsim.algorithms.centralized",
    "fedsim.algorithms.fedcmp",
    "fedsim.algorithms.fedavgm",
    "fedsim.algorithms.fedprox",
    "fedsim.algorithms.fedopt",
    "fedsim.algorithms.scaffold",
    "fedsim.algorithms.fednova",
    "fedsim.algorithms.fedexp",
    "fedsim.algorithms.local",
)
_loaded = False
T = TypeVar("T", bound=type)


class AlgorithmError(ConfigError):
    """An unknown algorithm or a bad algorithm parameter."""


def register(
    name: str,
    *,
    paper: str,
    pooled: bool = False,
    personal: bool = False,
    ablation_of: str | None = None,
    presummable: bool = False,
    reads_updates: str | None = None,
) -> Callable[[T], T]:
    """Class decorator: register a frozen dataclass algorithm under ``name``.

    ``paper`` is shown by ``fedsim algorithms list``; ``pooled`` marks algorithms that train on the
    pooled data of all clients (the centralized upper bound, run with Ray Train); ``personal``
    marks algorithms whose clients keep their own projector (kept in the client-state store and
    evaluated one by one); ``ablation_of`` marks a variant of another algorithm with one part
    switched off (left out of ``fedsim compare --algorithms all``); ``presummable`` marks
    algorithms whose server half depends on the updates only through Σ_k p_k Δ_k
    (``fedavg_delta``), so workers may pre-sum their clients' updates (the FedAvg family);
    ``reads_updates`` says why a server half needs each client's update (or more than the
    sum), which is why it cannot run under client-level DP or secure aggregation (a subclass
    inherits its base's reason).
    """

    def wrap(cls: T) -> T:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"algorithm {name!r}: {cls.__name__} must be a dataclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"algorithm {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})"
            )
        cls.name = name  # type: ignore[attr-defined]
        cls.paper = paper  # type: ignore[attr-defined]
        cls.pooled = pooled  # type: ignore[attr-defined]
        cls.personal = personal  # type: ignore[attr-defined]
        cls.ablation_of = ablation_of  # type: ignore[attr-defined]
        cls.presummable = presummable  # type: ignore[attr-defined]
        cls.reads_updates = reads_updates or getattr(cls, "reads_updates", None)  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTINS:
        importlib.import_module(module)
    for ep in entry_points(group="fedsim.algorithms"):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not break fedsim; say which one
            raise AlgorithmError(
                f"algorithm plug-in {ep.name!r} ({ep.value}): failed to load: {e}"
            ) from None


def available() -> dict[str, type]:
    """Registered algorithms by name, sorted."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def comparable() -> list[str]:
    """What ``--algorithms all`` means: every registered algorithm except ablation variants."""
    return [
        n for n, cls in available().items() if not getattr(cls, "ablation_of", None)
    ]


def get_algorithm_class(name: str) -> type:
    algos = available()
    if name not in algos:
        raise AlgorithmError(
            f"algorithm.name: unknown algorithm {name!r} (known: {', '.join(algos)})"
        )
    return algos[name]


def build_algorithm(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """An algorithm instance with its parameters validated (errors name ``algorithm.<param>``)."""
    cls = get_algorithm_class(name)
    return from_dict(cls, dict(params or {}), prefix="algorithm")


def parameters(cls: type) -> dict[str, Any]:
    """An algorithm's parameters and their defaults."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out
