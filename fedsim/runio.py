"""The run folder: config, metrics, weights and reports, written so nothing is half-written."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsim.configtools import ConfigError
from fedsim.records import RoundRecord


class RunError(RuntimeError):
    """A run stopped on purpose (e.g. rejected updates under ``validation.on_reject: fail``)."""


class RunDirError(ConfigError):
    """An output folder that cannot be used (not writable, or already holding a run)."""


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_writable(path: Path, flag: str = "--out", folder: bool = True) -> None:
    """Refuse an output ``path`` that could not be written, creating nothing.

    ``folder``: ``path`` is a folder to create or fill (it must not be a file); otherwise a file
    to write (it must not be a folder). The nearest existing folder above must be writable; a
    regular file on the way (``afile/out``) cannot hold anything.
    """
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise RunDirError(f"{flag} {str(p)!r}: exists and is not a folder")
        if not folder and p.is_dir():
            raise RunDirError(f"{flag} {str(p)!r}: is a folder, not a file")
    above = p if folder and p.is_dir() else p.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise RunDirError(
            f"{flag} {str(p)!r}: cannot write there ({str(above)!r} is a file, not a folder)"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise RunDirError(
            f"{flag} {str(p)!r}: cannot write there (no write permission on {str(above)!r})"
        )


def default_cache_dir() -> Path:
    """$FEDSIM_CACHE, else ~/.cache/fedsim."""
    env = os.environ.get("FEDSIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedsim"


def cache_folder(configured: str | Path | None, flag: str = "cache_dir") -> Path:
    """The cache fedsim builds into: ``configured``, else $FEDSIM_CACHE, else ~/.cache/fedsim.

    Checked like an output folder (:func:`check_writable`), naming where the path came from:
    a file named as the cache, or a file on the way to it, is a one-line RunDirError before
    anything is built, instead of a NotADirectoryError deep inside a build.
    """
    if configured:
        path = Path(configured).expanduser()
    else:
        path = default_cache_dir()
        flag = "FEDSIM_CACHE" if os.environ.get("FEDSIM_CACHE") else "the default cache"
    check_writable(path, flag)
    return path


# What a run that failed before its first round leaves: a retry with the same --out takes it.
RESTARTABLE = {"config.yaml"}


def check_run_dir(path: Path) -> None:
    """Refuse an output folder that is a file or holds a run (nothing is overwritten).

    A folder holding only the ``config.yaml`` of a run that stopped before its first round (a
    Ray or cache failure) is taken again: there is nothing in it to lose.
    """
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {str(path)!r}: exists and is not a folder")
    if path.is_dir() and not {p.name for p in path.iterdir()} <= RESTARTABLE:
        raise RunDirError(
            f"--out {str(path)!r}: folder is not empty (it may hold a run); choose a new one"
        )


class RunLock:
    """The one-writer lock of a run folder: ``flock`` on the folder itself, held while open.

    Locking the folder (not a file in it) adds nothing to it, so a refused command leaves the
    folder byte for byte as it was. The kernel drops the lock when the process dies (SIGKILL
    included), so a crashed run never leaves a stale lock behind.
    """

    def __init__(self, path: Path, flag: str) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self.fd)
            os.close(self.fd)
            raise RunDirError(
                f"{flag} {str(path)!r}: in use by another fedsim process"
                + (f" (pid {holder})" if holder else "")
                + "; one writer per run folder"
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file behind ``fd`` (Linux's /proc/locks), if known."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234567 0 EOF"
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
            return int(parts[4])
    return None


def prepare_run_dir(path: Path) -> RunLock:
    """Create ``path`` for a new run and lock it; returns the held :class:`RunLock`.

    ``mkdir`` is the exclusive create: of two runs started into one new folder, one makes it;
    the other finds it and must then win the lock and find it still unused (checked again
    under the lock, as the winner may already have written into it).
    """
    check_run_dir(path)
    try:
        try:
            path.mkdir(parents=True)
        except (
            FileExistsError
        ):  # made by another run a moment ago, or by a failed start
            pass
        lock = RunLock(path, "--out")
    except OSError as e:
        raise RunDirError(
            f"--out {str(path)!r}: cannot write there ({e.strerror})"
        ) from None
    try:
        check_run_dir(path)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        lock.close()
        raise RunDirError(
            f"--out {str(path)!r}: cannot write there ({e.strerror})"
        ) from None
    except BaseException:
        lock.close()
        raise
    return lock


@contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold the file lock ``.<name>.lock`` beside the folder ``final`` (its parent created):
    concurrent builders of one cached folder serialise on it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def folder_swap(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to write into; on a normal exit it replaces
    ``final`` by a rename (readers see the old folder or the whole new one), on an error it is
    removed and ``final`` is left as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            # None, not {}: safetensors writes an unreadable header for no tensors and {}.
            metadata=dict(metadata) if metadata else None,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Projector weights from a safetensors file (never a pickle).

    Anything that is not safetensors is refused with a :class:`ConfigError` naming the
    file; a ``torch.save`` / pickle file (whatever its name) is never unpickled, and the
    error says what it is (from its first bytes).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"weights file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"weights file {str(p)!r} is not a file")
    try:
        return load_file(str(p))
    except SafetensorError as e:
        with open(p, "rb") as f:
            head = f.read(4)
        kind = (
            "is a pickle (torch.save) file, not safetensors"
            if head[:2] == b"PK" or head[:1] == b"\x80"
            else "is not a safetensors file"
        )
        raise ConfigError(
            f"weights file {str(p)!r} {kind} ({e}); fedsim reads weights only from "
            "safetensors and never unpickles them"
        ) from None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (integrity of a file, not identity of its weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors themselves: names in sorted order, dtype, shape and raw bytes.

    Two files holding the same tensors get the same digest whatever their safetensors header
    (its metadata order varies from write to write), so this, not the file's SHA-256, says
    which weights a score file or checkpoint refers to.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        head = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0"
        h.update(head.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed per round."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[RoundRecord]:
        return [json.loads(line) for line in self.read_lines()]

    def read_lines(self) -> list[str]:
        """The complete lines (a line cut short by a crash, without its newline, is left out)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        lines = lines[:-1]  # after the last newline: "" or a line cut short
        return [line for line in lines if line.strip()]
