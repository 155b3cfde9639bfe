"""The cached vision features on disk, memory-mapped (what workers read; built by
:mod:`fedsim.data.feature_cache`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

COLUMN = "features"  # the Arrow column of the flattened [T, D] features of each row


class FeatureStore:
    """The memory-mapped cache: ``store[ids]`` → ``[len(ids), T, D]`` float32."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        source = pa.memory_map(self.path, "r")
        table = pa.ipc.open_file(source).read_all()
        meta = table.schema.metadata or {}
        self.tokens = int(meta[b"tokens"])
        self.dim = int(meta[b"dim"])
        column = table.column(COLUMN).combine_chunks()
        flat = column.values.to_numpy(zero_copy_only=True)
        self.array = flat.reshape(len(table), self.tokens, self.dim)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, ids: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[ids]))
