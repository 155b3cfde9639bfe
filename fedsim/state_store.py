"""Client-state stores: per-client tensors kept by the driver between rounds (``load/save``).

Actors stay stateless apart from their resident backbone; whatever a client must remember between
the rounds it takes part in (SCAFFOLD's c_i, a persistent optimiser state) lives here, in memory or
on disk as one safetensors file per client, so that hundreds of clients fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from fedsim.runio import load_weights, save_weights

Tensors = dict[str, torch.Tensor]


class ClientStateStore(Protocol):
    def load(self, client_id: int) -> Tensors: ...

    def save(self, client_id: int, state: Tensors) -> None: ...


class MemoryStore:
    """Client states in a dict (tensors copied in and out)."""

    def __init__(self) -> None:
        self._states: dict[int, Tensors] = {}

    def load(self, client_id: int) -> Tensors:
        return {k: v.clone() for k, v in self._states.get(client_id, {}).items()}

    def save(self, client_id: int, state: Tensors) -> None:
        if state:
            self._states[client_id] = {k: v.detach().clone() for k, v in state.items()}
        else:
            self._states.pop(client_id, None)

    def snapshot(self) -> dict[int, Tensors]:
        """Every client's state (for a round checkpoint); tensors are shared, not copied."""
        return dict(self._states)

    def restore(self, states: dict[int, Tensors]) -> None:
        """Replace the whole store with ``states`` (from a round checkpoint)."""
        self._states = {}
        for cid, state in states.items():
            self.save(cid, state)


class DiskStore:
    """Client states as ``<root>/client-<id>.safetensors``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.root / f"client-{client_id:07d}.safetensors"

    def load(self, client_id: int) -> Tensors:
        path = self._path(client_id)
        return load_weights(path) if path.exists() else {}

    def save(self, client_id: int, state: Tensors) -> None:
        path = self._path(client_id)
        if state:
            save_weights(path, state)
        elif path.exists():
            path.unlink()
