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
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedsim.config import Config, config_to_yaml_data
from fedsim.configtools import ConfigError
from fedsim.data.streams import Cursor
from fedsim.runio import (
    MetricsLog,
    RunError,
    file_sha256,
    load_weights,
    save_weights,
    weights_digest,
    write_json,
    write_text,
)

if TYPE_CHECKING:
    from rich.console import Console

Weights = dict[str, torch.Tensor]
FORMAT = 1
PREFIX = "round-"


WEIGHT_FILES = (
    "projector.safetensors",
    "server_state.safetensors",
    "clients.safetensors",
)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, or from another config)."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are not what was written (unreadable, cut short, altered)."""


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
    """A digest of what fixes the result: the resolved config minus where it runs.

    Left out: ``cache_dir`` (where inputs are cached), ``ray.*`` (where the actors run) and
    ``tracking.*`` (where records are streamed besides metrics.jsonl), all free to change on
    resume; but ``ray.threads_per_worker`` stays in, as torch's thread count changes float
    reduction order and so the bits.
    """
    free = ("ray", "cache_dir", "tracking")
    data = {k: v for k, v in config_yaml.items() if k not in free}
    ray = config_yaml.get("ray") or {}
    if "threads_per_worker" in ray:
        data["ray.threads_per_worker"] = ray["threads_per_worker"]
    return _sha256_json(data)


# Config fields added after checkpoints were first written, with the value that reproduces the
# earlier behaviour: a run checkpointed before a field existed resumes when it is at that value.
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("scenario", "noisy_clients"): 0.0,
    ("scenario", "caption_noise"): 0.0,
    ("scenario", "caption_styles"): 1,
    ("data", "eval_split"): "test",
    ("train", "diagnostics"): False,
}


def _without_added(config_yaml: dict[str, Any]) -> dict[str, Any] | None:
    """``config_yaml`` as a version without :data:`ADDED_FIELDS` wrote it, or None when one of
    them is not at its earlier value (then no earlier version could have written it)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config_yaml.items()}
    for (section, name), value in ADDED_FIELDS.items():
        part = out.get(section)
        if not isinstance(part, dict) or name not in part:
            continue
        if part[name] != value:
            return None
        del part[name]
    return out


def accepted_digests(config_yaml: dict[str, Any]) -> set[str]:
    """The digest; the one checkpoints written before it took ``cache_dir`` out; and both of
    those as written before the :data:`ADDED_FIELDS` existed (when they are at their defaults)."""
    out = set()
    for data in (config_yaml, _without_added(config_yaml)):
        if data is None:
            continue
        legacy = {k: v for k, v in data.items() if k not in ("ray", "tracking")}
        out |= {config_digest(data), _sha256_json(legacy)}
    return out


def _sha256_json(data: Any) -> str:
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
        # state.json last: a folder without it is never taken for a checkpoint. It records
        # each file's SHA-256, so that a resume notices a file altered or cut short.
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
                "files": {f: file_sha256(tmp / f) for f in WEIGHT_FILES},
                "weights_digest": weights_digest(state.weights),
            },
        )
        _fsync_dir(tmp)
        if final.exists():  # the same round again (a resumed run): replace it
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        _discard(old)
    return final


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint folder: renamed to a temporary name first (atomic), then deleted.

    A kill in the middle of the deletion then leaves a ``.round-*.tmp-*`` folder, which
    :func:`remove_temp_leftovers` takes away on resume, never a half-deleted ``round-*`` folder
    without its state.json that nothing would list or remove again.
    """
    doomed = checkpoint.parent / f".{checkpoint.name}.tmp-old-{os.getpid()}"
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(
    path: Path, digest: str | Collection[str] | None = None
) -> RoundState:
    """The state saved in checkpoint folder ``path``, verified before anything is used.

    ``digest``: the config digest (or the digests) the checkpoint must carry. Files that are not
    what was written raise :class:`DamagedCheckpoint`; another config, :class:`CheckpointError`.
    """
    path = Path(path)
    meta = _read_state(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: format {meta.get('format')!r}, expected {FORMAT}"
        )
    wanted = {digest} if isinstance(digest, str) else digest
    if wanted is not None and meta.get("config_digest") not in wanted:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: written by another config than the run's config.yaml"
        )
    _verify_files(path, meta.get("files"))
    try:
        tensors = {f: load_weights(path / f) for f in WEIGHT_FILES}
        clients: dict[int, Weights] = {}
        for key, value in tensors["clients.safetensors"].items():
            cid, name = key.split("/", 1)
            clients.setdefault(int(cid), {})[name] = value
        state = RoundState(
            round=int(meta["round"]),
            weights=tensors["projector.safetensors"],
            server_state=tensors["server_state.safetensors"],
            clients=clients,
            cursors=[Cursor(int(p), int(q)) for p, q in meta["cursors"]],
            sim_clock=float(meta["sim_clock"]),
            final_eval=dict(meta["final_eval"]),
            metrics_lines=int(meta["metrics_lines"]),
        )
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {str(path)!r}: {e}") from None
    if path.name != f"{PREFIX}{state.round:06d}":
        raise DamagedCheckpoint(
            f"checkpoint {str(path)!r}: state.json says round {state.round}"
        )
    return state


def _read_state(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(
            f"checkpoint {str(path)!r}: unreadable state.json ({e})"
        ) from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(
            f"checkpoint {str(path)!r}: state.json is not a mapping"
        )
    return meta


def _verify_files(path: Path, recorded: Any) -> None:
    """Each weight file against the SHA-256 that state.json recorded when it was written.

    Checkpoints written before the checksums were recorded carry none; they are read as they are.
    """
    if recorded is None:
        return
    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(f"checkpoint {str(path)!r}: {name} is missing")
        if file_sha256(f) != recorded.get(name):
            raise DamagedCheckpoint(
                f"checkpoint {str(path)!r}: {name} does not match the SHA-256 recorded "
                "when it was written (altered or cut short)"
            )


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


# mkstemp's name: "." + the file's name + "." + 8 random characters.
_TEMP = re.compile(r"\.[^/]+\.[a-z0-9_]{8}")


def temp_leftovers(run_dir: Path) -> list[Path]:
    """What killed writes leave: ``checkpoints/.round-*.tmp-*`` and atomic-write temporaries.

    :func:`fedsim.runio.atomic_write_bytes` and :func:`fedsim.runio.save_weights` write
    ``.<name>.<8 random characters>`` beside ``<name>`` (e.g. ``final/.projector.safetensors.x1y2z3w4``).
    """
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob(f".{PREFIX}*.tmp-*"))
    for folder in (run_dir, run_dir / "final"):
        if folder.is_dir():
            found += [
                p for p in folder.iterdir() if _TEMP.fullmatch(p.name) and p.is_file()
            ]
    return sorted(found)


def remove_temp_leftovers(run_dir: Path) -> list[Path]:
    """Remove :func:`temp_leftovers` (only while holding the run folder's lock)."""
    found = temp_leftovers(run_dir)
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


# ---------------------------------------------------------------------------------------------
# Resuming: the newest sound checkpoint of an interrupted run, checked, and metrics cut back


def check_resumable(run_dir: Path) -> None:
    """A run folder whose run has not finished (read-only checks, before the lock)."""
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--resume {str(run_dir)!r}: not a run folder (no config.yaml)")
    if (run_dir / "summary.md").exists():
        raise RunError(
            f"--resume {str(run_dir)!r}: the run finished (summary.md is there); nothing to "
            "resume"
        )


def find_checkpoint(
    cfg: Config, run_dir: Path, console: Console | None = None
) -> RoundState | None:
    """The newest sound checkpoint of the interrupted run in ``run_dir``, verified against ``cfg``.

    Reads only. A damaged checkpoint (a file not matching its recorded SHA-256, cut short,
    unreadable) is passed over for the one before it, and ``console`` is told; another
    config's checkpoint, a round beyond ``rounds`` or a ``metrics.jsonl`` that does not match
    are errors. ``None``: no checkpoint was written yet (the run starts again).
    """
    check_resumable(run_dir)
    found = checkpoint_dirs(run_dir)
    if not found:
        return None
    digests = accepted_digests(config_to_yaml_data(cfg))
    damaged: list[str] = []
    for path in reversed(found):
        try:
            restored = load_checkpoint(path, digests)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            continue
        if damaged and console is not None:
            console.print(
                f"passed over {len(damaged)} damaged checkpoint(s) ({damaged[0]}); "
                f"resuming from {path.name}"
            )
        _check_bounds(cfg, run_dir, restored)
        return restored
    raise RunError(
        f"--resume {str(run_dir)!r}: every checkpoint is damaged (newest: {damaged[0]})"
    )


def _check_bounds(cfg: Config, run_dir: Path, restored: RoundState) -> None:
    """The checkpoint's round within the run, and the metrics lines it counts readable."""
    if not 1 <= restored.round <= cfg.rounds:
        raise RunError(
            f"--resume {str(run_dir)!r}: checkpoint of round {restored.round}, the run has "
            f"rounds 1–{cfg.rounds}"
        )
    lines = MetricsLog(run_dir / "metrics.jsonl").read_lines()
    if len(lines) < restored.metrics_lines:
        raise RunError(
            f"--resume {str(run_dir)!r}: metrics.jsonl has {len(lines)} complete lines, the "
            f"checkpoint of round {restored.round} expects {restored.metrics_lines}"
        )
    for i, line in enumerate(lines[: restored.metrics_lines], start=1):
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            raise RunError(
                f"--resume {str(run_dir)!r}: metrics.jsonl line {i} is not a JSON object"
            )


def check_restored(
    restored: RoundState, weights: dict[str, torch.Tensor], clients: int
) -> None:
    """The checkpoint fits this run's projector and clients (before anything is changed)."""
    want = {k: list(v.shape) for k, v in weights.items()}
    got = {k: list(v.shape) for k, v in restored.weights.items()}
    if got != want:
        raise RunError(
            f"checkpoint of round {restored.round}: projector tensors {got}, this run's "
            f"projector has {want}"
        )
    if len(restored.cursors) != clients:
        raise RunError(
            f"checkpoint of round {restored.round}: {len(restored.cursors)} client "
            f"cursors, the config partitions into {clients} clients"
        )


def cut_metrics(run_dir: Path, round_: int, keep: int) -> None:
    """Start a resume's changes: cut ``metrics.jsonl`` back to the checkpoint, log it, tidy up.

    Called only after every check has passed. The rounds after the checkpoint are run again and
    logged anew; which ones were dropped, and when, goes to ``resumes.jsonl``. Temporary files
    of writes that a kill interrupted are removed (the folder is locked: no write is live).
    """
    remove_temp_leftovers(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl")
    lines = log.read_lines()
    dropped = [json.loads(x).get("round") for x in lines[keep:] if _complete(x)]
    write_text(log.path, "".join(x + "\n" for x in lines[:keep]))
    MetricsLog(run_dir / "resumes.jsonl").append(
        {
            "resumed_after_round": round_,
            "dropped_rounds": dropped,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )


def _complete(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
