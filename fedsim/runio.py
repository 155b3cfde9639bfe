"""The run folder: config, metrics, weights and reports, written so nothing is half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from fedsim.configtools import ConfigError


class RunDirError(ConfigError):
    """An output folder that cannot be used (not writable, or already holding a run)."""


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_dir(path: Path) -> None:
    """Refuse an output folder that is a file or already holds something (nothing is overwritten)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {str(path)!r}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise RunDirError(
            f"--out {str(path)!r}: folder is not empty (it may hold a run); choose a new one"
        )


def prepare_run_dir(path: Path) -> Path:
    """Create ``path`` for a new run (see :func:`check_run_dir`) and check that it is writable."""
    check_run_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"--out {str(path)!r}: cannot write there ({e.strerror})"
        ) from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_yaml(path: Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_weights(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Projector weights as safetensors, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            tmp,
            metadata=dict(metadata or {}),
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Projector weights from a safetensors file (no pickle)."""
    if not Path(path).exists():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    return load_file(str(path))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed per round."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_lines()]

    def read_lines(self) -> list[str]:
        """The complete lines (a line cut short by a crash, without its newline, is left out)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        lines = lines[:-1]  # after the last newline: "" or a line cut short
        return [line for line in lines if line.strip()]
