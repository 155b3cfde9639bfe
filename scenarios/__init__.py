"""Scenarios: presets (YAML run configs), partitioners and participation models (``fedsim.scenarios``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedsim.configtools import ConfigError


def presets() -> dict[str, Path]:
    """Preset name → YAML file shipped in this package."""
    root = resources.files("fedsim.scenarios")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; a one-line error lists the known presets otherwise."""
    known = presets()
    if name not in known:
        raise ConfigError(
            f"--config {name!r}: neither a file nor a known scenario preset (known: {', '.join(known)})"
        )
    return known[name]
