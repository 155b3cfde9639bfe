"""Stream a run's round records to experiment trackers: TensorBoard, MLflow, W&B (offline).

``metrics.jsonl`` stays the source of truth. :class:`TrackedLog` is the run's metrics log with
trackers behind it: every record it appends (both round loops write through it) also goes, as
scalars, to each backend of ``tracking.backends``; :meth:`Trackers.finish` adds the resolved
config and the final files (projector, server state, curves, summary). A tracker that fails
(server unreachable, disk full, a bug) gives one :class:`TrackingWarning` and is dropped; the
run goes on with the same bits. On ``--resume`` TensorBoard's ``purge_step`` drops the steps
the crashed process wrote after the checkpoint, and MLflow continues the same run (its id is
kept in ``<run>/tracking/mlflow-run.json``), skipping the steps it already holds.

``fedsim compare`` wraps its runs in :func:`grouped`: every run's MLflow run then goes to one
experiment named after the comparison (a file store in the comparison's folder by default),
tagged with its algorithm and seed; ``tensorboard --logdir <comparison>`` shows every run.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from fedsim.config import Config, config_to_yaml_data
from fedsim.runio import MetricsLog

# Record keys that are not scalars of the round (lists or maps over clients, text).
_NOT_SCALARS = frozenset(
    "round clients cohorts predicted_tokens local_steps corpus workers_lost action".split()
)
_FINAL_FILES = (
    "final/projector.safetensors",
    "final/client_projectors.safetensors",
    "final/server_state.safetensors",
    "curves.png",
    "summary.md",
    "eval.json",
    "config.yaml",
)


class TrackingWarning(UserWarning):
    """A tracker failed and was dropped; metrics.jsonl holds every round regardless."""


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The round's numbers, flattened: ``loss``, ``eval/attr_mean``, ``diagnostics/drift``…

    ``rejected`` counts the rejected updates; per-client lists and maps are left out.
    """
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                out[prefix] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    for key, value in record.items():
        if key == "rejected":
            out["rejected"] = float(len(value or []))
        elif key not in _NOT_SCALARS:
            walk(key, value)
    # MLflow's allowed characters; TensorBoard takes these as they are.
    return {re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in out.items()}


def params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat ``section.field`` → text (MLflow params, TB hparams)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("", config_to_yaml_data(cfg))
    return out


@dataclass(frozen=True)
class Group:
    """The comparison a run belongs to: its folder (and the experiment's name)."""

    folder: Path

    @property
    def experiment(self) -> str:
        return f"fedsim compare {self.folder.resolve().name}"


_GROUP: Group | None = (
    None  # a module global, not a contextvar: compare's lanes are threads
)


@contextmanager
def grouped(folder: Path) -> Iterator[None]:
    """Runs inside go to one tracker experiment named after ``folder`` (``fedsim compare``)."""
    global _GROUP
    before, _GROUP = _GROUP, Group(Path(folder))
    try:
        yield
    finally:
        _GROUP = before


class Backend(Protocol):
    """One tracker: what :class:`Trackers` calls, each call allowed to raise."""

    name: str

    def log_round(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, run_dir: Path, cfg: Config, final: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in ``<run>/tracking/tensorboard``; the config as hparams, files as text
    and image. ``purge_step``: the first round this process writes (a resume's)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: Config, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = run_dir / "tracking" / "tensorboard"
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)
        if purge_step:
            return  # a resume: the config is in the events of round 0 already
        hp = {k: v for k, v in params(cfg).items() if len(v) <= 256}
        metrics = {"eval/attr_mean": 0.0, "eval/yesno_acc": 0.0, "loss": 0.0}
        events = self.writer.file_writer
        assert events is not None  # made by SummaryWriter.__init__
        for summary in hparams(hp, metrics):
            events.add_summary(summary)
        self.writer.add_text(
            "config", "```\n" + json.dumps(params(cfg), indent=1) + "\n```"
        )

    def log_round(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, run_dir: Path, cfg: Config, final: dict[str, float]) -> None:
        import numpy as np
        from PIL import Image

        step = cfg.rounds
        if (run_dir / "summary.md").is_file():
            self.writer.add_text("summary", (run_dir / "summary.md").read_text(), step)
        if (run_dir / "curves.png").is_file():
            img = np.asarray(Image.open(run_dir / "curves.png").convert("RGB"))
            self.writer.add_image("curves", img, step, dataformats="HWC")
        files = [f for f in _FINAL_FILES if (run_dir / f).is_file()]
        self.writer.add_text(
            "files", "\n".join(f"- {run_dir / f}" for f in files), step
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise OSError when an http(s) tracking server does not accept a connection (MLflow's
    client would retry for minutes)."""
    url = urlparse(uri)
    if url.scheme in ("http", "https"):
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()


class MLflow:
    """One MLflow run per fedsim run (continued on resume), tagged with algorithm and seed."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Config, group: Group | None) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        home = group.folder if group else run_dir
        uri = (
            cfg.tracking.mlflow_uri or (home / "tracking" / "mlruns").resolve().as_uri()
        )
        _reachable(uri)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in "maintenance mode" behind this switch; the
            # store needs no server and no database, which is what a run folder wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.id_file = run_dir / "tracking" / "mlflow-run.json"
        continued, self.done = self._continued(uri)
        self.run_id: str = continued or self._start(
            group.experiment if group else "fedsim", cfg
        )
        if continued is None:
            items = [Param(k, v[:6000]) for k, v in params(cfg).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
            tags = {"fedsim.run_dir": str(run_dir.resolve())}
            tags |= {"comparison": str(group.folder.resolve())} if group else {}
            self.client.log_batch(
                self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
            )

    def _continued(self, uri: str) -> tuple[str | None, int]:
        """The run a previous process of this fedsim run started, and its last logged step."""
        if not self.id_file.is_file():
            return None, -1
        saved = json.loads(self.id_file.read_text())
        if saved.get("uri") != uri:
            return None, -1
        self.client.update_run(saved["run_id"], status="RUNNING")
        history = self.client.get_metric_history(saved["run_id"], "wall_seconds")
        return saved["run_id"], max((m.step for m in history), default=-1)

    def _start(self, experiment: str, cfg: Config) -> str:
        found = self.client.get_experiment_by_name(experiment)
        try:
            exp_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(experiment)
            )
        except Exception:  # another lane of the comparison created it just now
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                raise
            exp_id = found.experiment_id
        tags = {
            "algorithm": cfg.algorithm.name,
            "seed": str(cfg.seed),
            "scenario": cfg.scenario.name,
        }
        name = f"{cfg.algorithm.name}/seed-{cfg.seed}"
        run = self.client.create_run(exp_id, tags=tags, run_name=name)
        self.id_file.parent.mkdir(parents=True, exist_ok=True)
        saved = {"run_id": run.info.run_id, "uri": self.client.tracking_uri}
        self.id_file.write_text(json.dumps(saved))
        return run.info.run_id

    def log_round(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.done:
            return  # logged by the process that crashed: the same values (same bits)
        ms = [Metric(k, v, 0, step) for k, v in values.items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 1000])

    def finish(self, run_dir: Path, cfg: Config, final: dict[str, float]) -> None:
        for rel in _FINAL_FILES:
            path = run_dir / rel
            if path.is_file():
                folder = str(Path(rel).parent) if "/" in rel else None
                self.client.log_artifact(self.run_id, str(path), folder)
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        pass


class WandB:
    """Weights & Biases in offline mode: ``<run>/tracking/wandb/offline-run-*`` (``wandb sync``
    uploads it later). A resume continues the same run id, skipping the steps already logged."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config, group: Group | None) -> None:
        import wandb

        home = run_dir / "tracking"
        home.mkdir(parents=True, exist_ok=True)
        self.id_file = home / "wandb-run.json"
        saved = json.loads(self.id_file.read_text()) if self.id_file.is_file() else {}
        self.done = int(saved.get("last_step", -1))
        quiet = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, disable_git=True
        )
        self.run = wandb.init(
            mode="offline",
            dir=str(home),
            project="fedsim",
            id=saved.get("run_id"),
            resume="allow" if saved else None,
            name=f"{cfg.algorithm.name}/seed-{cfg.seed}",
            group=group.experiment if group else None,
            tags=[cfg.algorithm.name, f"seed-{cfg.seed}", cfg.scenario.name],
            config=params(cfg),
            reinit="create_new",
            settings=quiet,
        )
        self._save(self.done)

    def _save(self, step: int) -> None:
        self.done = step
        self.id_file.write_text(json.dumps({"run_id": self.run.id, "last_step": step}))

    def log_round(self, step: int, values: dict[str, float]) -> None:
        if step <= self.done:
            return
        self.run.log(values, step=step)
        self._save(step)

    def finish(self, run_dir: Path, cfg: Config, final: dict[str, float]) -> None:
        for rel in _FINAL_FILES:
            if (run_dir / rel).is_file():
                self.run.save(str(run_dir / rel), base_path=str(run_dir), policy="now")
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers, opened at the first record (the run folder exists by then)."""

    def __init__(self, cfg: Config, run_dir: Path, purge_step: int | None) -> None:
        self.cfg, self.run_dir, self.purge_step = cfg, Path(run_dir), purge_step
        self.group = _GROUP
        self.backends: list[Backend] | None = None if cfg.tracking.backends else []

    @classmethod
    def for_run(
        cls, cfg: Config, run_dir: Path, restored: Any, resume: bool
    ) -> Trackers:
        """A new run from round 0; a resume from the round after its checkpoint (0 if none)."""
        first = (restored.round + 1 if restored is not None else 0) if resume else None
        return cls(cfg, run_dir, first)

    def _open(self) -> list[Backend]:
        if self.backends is None:
            self.backends = []
            for name in self.cfg.tracking.backends:
                self._call(name, self._start, name)
        return self.backends

    def _start(self, name: str) -> None:
        assert self.backends is not None
        if name == "tensorboard":
            self.backends.append(TensorBoard(self.run_dir, self.cfg, self.purge_step))
        elif name == "mlflow":
            self.backends.append(MLflow(self.run_dir, self.cfg, self.group))
        elif name == "wandb":
            self.backends.append(WandB(self.run_dir, self.cfg, self.group))

    def _call(self, name: str, fn: Any, *args: Any) -> None:
        """``fn(*args)``; on failure, one warning and the backend is dropped."""
        try:
            fn(*args)
        except Exception as e:  # any failure of a tracker must leave the run alone
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(
                f"tracking: {name} failed ({type(e).__name__}: {first[:200]}); the run goes "
                "on without it (metrics.jsonl has every round)",
                TrackingWarning,
                stacklevel=3,
            )
            self.backends = [b for b in self.backends or [] if b.name != name]

    def log(self, record: Mapping[str, Any]) -> None:
        """One round's record (round 0: the untrained projector's evaluation)."""
        values = scalars(record)
        for b in list(self._open()):
            self._call(b.name, b.log_round, int(record["round"]), values)

    def finish(self, final: dict[str, float]) -> None:
        """After the run's report: the final files; then close."""
        for b in list(self._open()):
            self._call(b.name, b.finish, self.run_dir, self.cfg, final)
        self.close()

    def close(self) -> None:
        for b in list(self.backends or []):
            self._call(b.name, b.close)
        self.backends = []


class TrackedLog(MetricsLog):
    """``metrics.jsonl`` first (fsynced), then the trackers."""

    def __init__(self, path: Path, trackers: Trackers) -> None:
        super().__init__(path)
        self.trackers = trackers

    def append(self, record: Mapping[str, Any]) -> None:
        super().append(record)
        self.trackers.log(record)
