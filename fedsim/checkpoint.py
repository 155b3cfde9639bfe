"""Round checkpoints: everything the round loop needs to go on as if it had never stopped.

A checkpoint of round r is a folder ``<run>/checkpoints/round-<r:06d>/`` holding

- ``projector.safetensors``: the global projector W_r;
- ``server_state.safetensors``: the algorithm's server state (momentum, bases, control variate);
- ``clients.safetensors``: the client-state store, keys ``<client id>/<name>`` (SCAFFOLD's c_i,
  a persistent optimiser's moments, a personal algorithm's own projector);
- ``state.json``: the data cursors (pass, position) of every client, the simulated clock, the
  latest evaluation, how many lines of ``metrics.jsonl`` belong to rounds ≤ r, and a digest of
  the config that produced it.

Random draws need no saved state: every generator is keyed by (seed, round, client, purpose), so
round r + 1 draws the same numbers whether or not the run stopped in between. The folder is built
under a temporary name, every file fsynced, then renamed into place (an atomic rename on POSIX),
so a crash mid-write leaves the previous checkpoint as the newest complete one. The newest
``checkpoint_keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.configtools import ConfigError
from fedsim.data.streams import Cursor
from fedsim.runio import load_weights, save_weights, write_json

Weights = dict[str, torch.Tensor]
FORMAT = 1
PREFIX = "round-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, or from another config)."""


@dataclass
class RoundState:
    """The round loop's state after round ``round``."""

    round: int
    weights: Weights
    server_state: Weights
    clients: dict[int, Weights]
    cursors: list[Cursor]
    sim_clock: float
    final_eval: dict[str, float]
    metrics_lines: int


def config_digest(config_yaml: dict[str, Any]) -> str:
    """A digest of the resolved config minus where it runs (``ray``): what fixes the result."""
    data = {k: v for k, v in config_yaml.items() if k != "ray"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first (temporary folders are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(run_dir: Path, state: RoundState, digest: str, keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/round-<r>/``; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.round:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(tmp / "projector.safetensors", state.weights)
        save_weights(tmp / "server_state.safetensors", state.server_state)
        save_weights(
            tmp / "clients.safetensors",
            {
                f"{cid}/{k}": v
                for cid in sorted(state.clients)
                for k, v in state.clients[cid].items()
            },
        )
        # state.json last: a folder without it is never taken for a checkpoint.
        write_json(
            tmp / "state.json",
            {
                "format": FORMAT,
                "round": state.round,
                "config_digest": digest,
                "cursors": [[c.passes, c.position] for c in state.cursors],
                "sim_clock": state.sim_clock,
                "final_eval": state.final_eval,
                "metrics_lines": state.metrics_lines,
            },
        )
        _fsync_dir(tmp)
        if final.exists():  # the same round again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, digest: str | None = None) -> RoundState:
    """The state saved in checkpoint folder ``path`` (checked against the config ``digest``)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: unreadable state.json ({e})"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: format {meta.get('format')!r}, expected {FORMAT}"
        )
    if digest is not None and meta.get("config_digest") != digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: written by another config than the run's config.yaml"
        )
    clients: dict[int, Weights] = {}
    for key, value in load_weights(path / "clients.safetensors").items():
        cid, name = key.split("/", 1)
        clients.setdefault(int(cid), {})[name] = value
    return RoundState(
        round=int(meta["round"]),
        weights=load_weights(path / "projector.safetensors"),
        server_state=load_weights(path / "server_state.safetensors"),
        clients=clients,
        cursors=[Cursor(int(p), int(q)) for p, q in meta["cursors"]],
        sim_clock=float(meta["sim_clock"]),
        final_eval=dict(meta["final_eval"]),
        metrics_lines=int(meta["metrics_lines"]),
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None
