"""The client-state store: per-client tensors the driver keeps between rounds (``load/save``).

Actors stay stateless apart from their resident backbone; whatever a client must remember between
the rounds it takes part in (SCAFFOLD's c_i, a persistent optimiser state, a personal algorithm's
own projector) lives here, in the driver's memory, and goes into every round checkpoint
(``snapshot``/``restore``). Its size is the per-client state times the clients that have one.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


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
