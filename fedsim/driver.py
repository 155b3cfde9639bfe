"""The round loop, written once: sample a cohort, push client tasks to workers, aggregate, evaluate.

Data flow of a round: the cohort S_t is drawn with a generator keyed by (seed, round); each client's
next rows come from its one-pass stream; tasks are sorted by predicted cost and pushed to the
BackboneWorker actors (greedy, least-loaded first); each returns Δ_k and small stats; the Aggregator
actor validates the updates and applies the algorithm in sorted client-id order; every
``eval_every`` rounds the Evaluator scores the new projector. Results depend on (config, seed) only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedsim.actors import ModelSpec, peak_rss_mb
from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import PartialSum, add
from fedsim.checkpoint import (
    DamagedCheckpoint,
    RoundState,
    accepted_digests,
    checkpoint_dirs,
    config_digest,
    latest_checkpoint,
    load_checkpoint,
    remove_temp_leftovers,
    save_checkpoint,
)
from fedsim.config import Config, config_to_yaml_data, is_toy
from fedsim.configtools import ConfigError
from fedsim.cost import TokenCost
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.streams import Cursor, take
from fedsim.dispatch import WorkerSet, WorkersLost, dispatch
from fedsim.eval.toy import ATTRIBUTES
from fedsim.machine import machine_info, machine_line
from fedsim.pool import ActorPool
from fedsim.progress import build_reporter, make_progress
from fedsim.resources import check_before_ray, check_feasible
from fedsim.runio import (
    MetricsLog,
    RunLock,
    check_run_dir,
    check_writable,
    prepare_run_dir,
    save_weights,
    weights_digest,
    write_json,
    write_text,
    write_yaml,
)
from fedsim.scenarios.participation import ParticipationSpec, plan_round
from fedsim.scenarios.partition import (
    by_domain,
    dirichlet,
    dirichlet_sized,
    iid,
    power_law_sizes,
    quantity,
)
from fedsim.scenarios.silos import caption_transform, row_owners
from fedsim.scenarios.silos import describe as describe_silos
from fedsim.schedule import lr_at
from fedsim.state_store import MemoryStore
from fedsim.training import ClientResult, ClientTask, TrainSettings

if TYPE_CHECKING:
    from fedsim.pooled import PooledPlan

# The synthetic dataset is fixed (the run seed drives partition, sampling and training, not the
# data); its streams differ from those the toy build pre-trains on.
DATA_SEED = 0
TRAIN_STREAM = 1
EVAL_STREAM = 2  # the test split: what runs report
VALIDATION_STREAM = 3  # the validation split: what `fedsim sweep` selects on


def eval_stream(cfg: Config) -> int:
    """The generator stream of the run's held-out scenes (``data.eval_split``)."""
    return VALIDATION_STREAM if cfg.data.eval_split == "validation" else EVAL_STREAM


# Metrics shown in the final table, with their labels.
HEADLINE = [
    ("attr_mean", "caption attribute accuracy (mean of 5)"),
    *[(f"attr_{a}", f"  {a}") for a in ATTRIBUTES],
    ("caption_exact", "exact captions"),
    ("yesno_acc", "yes/no accuracy (POPE-style)"),
    ("yesno_f1", "yes/no F1"),
    ("yes_ratio", "yes ratio"),
]


@dataclass
class RunResult:
    """What a finished run leaves, in memory (everything is also in ``out_dir``)."""

    out_dir: Path
    weights: dict[str, torch.Tensor]
    initial_eval: dict[str, float] | None
    final_eval: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Prepared:
    """Resolved inputs of a run: backbone spec, dataset folders and client shards."""

    model: ModelSpec
    train_path: Path
    eval_path: Path
    shards: list[np.ndarray]
    pixel_path: str | None = None
    feature_path: str | None = None


class RunError(RuntimeError):
    """A run stopped on purpose (e.g. rejected updates under ``validation.on_reject: fail``)."""


def cache_root(cfg: Config) -> Path:
    """``cfg.cache_dir`` or the default cache, checked (see :func:`fedsim.runio.cache_folder`)."""
    from fedsim.runio import cache_folder

    return cache_folder(cfg.cache_dir)


def missing_inputs(cfg: Config, model: bool = True) -> list[str]:
    """Every input path the config names that does not exist (backbone, LM, corpus files);
    ``model=False``: the data's only (``scenarios show`` loads no model)."""
    from fedsim.data.loaders import missing_files

    out = []
    if (
        model
        and not is_toy(cfg.model.backbone)
        and not Path(cfg.model.backbone).expanduser().exists()
    ):
        out.append(f"model.backbone {cfg.model.backbone!r}")
    if model and cfg.model.lm and not Path(cfg.model.lm).expanduser().exists():
        out.append(f"model.lm {cfg.model.lm!r}")
    return out + missing_files(getattr(cfg.data, "corpora", ()))


def check_inputs(cfg: Config, model: bool = True) -> None:
    """One error listing every missing input, before anything is written."""
    cache_root(cfg)  # a file where the cache folder should be
    missing = missing_inputs(cfg, model)
    if missing:
        raise ConfigError(
            f"missing input{'s' if len(missing) > 1 else ''} for scenario "
            f"{cfg.scenario.name!r}: " + "; ".join(missing)
        )


def resolve_backbone(
    cfg: Config, report: Callable[[str, int, int, float], None] | None = None
) -> ModelSpec:
    """The shipped toy (verified), the toy rebuilt from its recipe, or a checked local path."""
    if cfg.model.backbone == "toy":
        path = toy_reference_path()
    elif cfg.model.backbone == "toy-recipe":
        from fedsim.models.toy import ToyBuildError, build_toy_backbone

        try:
            path = build_toy_backbone(cache_dir=cache_root(cfg), report=report)
        except ToyBuildError as e:
            raise RunError(str(e)) from None
    else:
        path = Path(cfg.model.backbone).expanduser()
        if not path.exists():
            raise ConfigError(f"model.backbone: path {str(path)!r} does not exist")
        if cfg.model.lm is not None and not Path(cfg.model.lm).expanduser().exists():
            raise ConfigError(f"model.lm: path {cfg.model.lm!r} does not exist")
    lm = str(Path(cfg.model.lm).expanduser()) if cfg.model.lm else None
    return ModelSpec(
        str(path), lm, cfg.model.projector, cfg.model.dtype, cfg.model.device
    )


def toy_reference_path() -> Path:
    """The reference toy backbone shipped with fedsim, every file checked by its SHA-256."""
    from fedsim.models.toy_reference import ReferenceError, reference_toy_backbone

    try:
        return reference_toy_backbone()
    except ReferenceError as e:
        raise ConfigError(f"model.backbone: {e}") from None


def read_manifest(model: ModelSpec) -> dict[str, Any]:
    import json

    path = Path(model.backbone_path) / "fedsim.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_scene_fits_backbone(cfg: Config, manifest: dict[str, Any]) -> None:
    """The toy LM only knows the words of its recipe: data.scene must stay inside it."""
    recipe = manifest.get("recipe", {}).get("scene")
    if not recipe:
        return
    for name in ("shapes", "colours", "sizes", "positions", "counts"):
        allowed = recipe.get(name, [])
        for value in getattr(cfg.data.scene, name):
            if value not in allowed:
                raise ConfigError(
                    f"data.scene.{name}: {value!r} is unknown to the backbone (it was pre-trained on {allowed})"
                )


def training_data(cfg: Config) -> Path:
    """The training rows on disk: the built corpus of ``data.corpora``, or generated scenes."""
    if cfg.data.corpora:
        from fedsim.data.loaders import ensure_corpus

        return ensure_corpus(
            cache_root(cfg), list(cfg.data.corpora), cfg.data.bad_images
        )
    return ensure_scenes(
        cache_root(cfg), cfg.data.scene, DATA_SEED, TRAIN_STREAM, cfg.data.num_scenes
    )


def prepare(
    cfg: Config, report: Callable[[str, int, int, float], None] | None = None
) -> Prepared:
    """Everything a run needs before Ray starts: backbone, data, partition."""
    model = resolve_backbone(cfg, report)
    check_scene_fits_backbone(cfg, read_manifest(model))
    cache = cache_root(cfg)
    train_path = training_data(cfg)
    eval_path = ensure_scenes(
        cache, cfg.data.scene, DATA_SEED, eval_stream(cfg), cfg.data.eval_scenes
    )
    try:
        shards = partition(cfg, train_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k, shard in enumerate(shards):
        if len(shard) == 0:
            raise ConfigError(
                f"scenario: client {k} has no data under partition {cfg.scenario.partition!r}"
            )
    pixel_path = None
    # auto: generated scenes only (real corpora at full resolution are far larger than 4 GiB).
    if cfg.data.pixel_cache == "on" or (
        cfg.data.pixel_cache == "auto" and not cfg.data.corpora
    ):
        from fedsim.data.pixel_cache import ensure_pixel_cache
        from fedsim.models.backbone import load_image_processor

        processor = load_image_processor(model.backbone_path, model.lm_path)
        found = ensure_pixel_cache(
            cache, train_path, processor, cfg.data.pixel_cache, report
        )
        pixel_path = str(found) if found else None
    return Prepared(model, train_path, eval_path, shards, pixel_path)


def partition(cfg: Config, train_path: Path) -> list[np.ndarray]:
    """Client shards (row ids) for the scenario's partitioner, composed with its quantity skew."""
    import datasets

    sc = cfg.scenario
    skew = sc.quantity_skew
    ds = datasets.load_from_disk(str(train_path))
    if sc.partition == "iid":
        if skew > 0:
            return quantity(len(ds), sc.num_clients, skew, cfg.seed)
        return iid(len(ds), sc.num_clients, cfg.seed)
    columns = sc.label.split("+")
    for col in columns:
        if col not in ds.column_names:
            raise ConfigError(
                f"scenario.label: {col!r} is not a column of the data ({', '.join(ds.column_names)})"
            )
    # One key per row; several columns join as "a+b" (e.g. background+style).
    cols = [ds.data.column(c).to_pylist() for c in columns]
    labels = np.array(["+".join(map(str, v)) for v in zip(*cols)])
    if sc.partition == "dirichlet":
        if skew > 0:
            sizes = power_law_sizes(len(labels), sc.num_clients, skew, cfg.seed)
            return dirichlet_sized(labels, sizes, sc.dirichlet_alpha, cfg.seed)
        return dirichlet(labels, sc.num_clients, sc.dirichlet_alpha, cfg.seed)
    return by_domain(labels, sc.num_clients, cfg.seed, skew)


MODEL = "model/"  # client-state prefix of a personal algorithm's own projector


def personal_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A personal algorithm's own projector from its client state (empty when never trained)."""
    return {k[len(MODEL) :]: v for k, v in state.items() if k.startswith(MODEL)}


def connect_ray(cfg: Config) -> bool:
    """Start or join Ray; returns True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import logging

    # Every worker process of the run first quiets Ray Train's per-report chatter.
    env = {"worker_process_setup_hook": "fedsim.raylog.quiet_ray_train"}
    if cfg.ray.address:
        try:
            ray.init(
                address=cfg.ray.address,
                logging_level=logging.WARNING,
                log_to_driver=True,
                runtime_env=env,
            )
        except ConnectionError as e:
            # Something accepted the connection (resources.check_address) but is not a
            # Ray cluster; Ray gives up after its own bounded retries (about 20 s).
            raise ConfigError(f"ray.address {cfg.ray.address!r}: {e}") from None
    else:
        # A private local cluster: "local", never RAY_ADDRESS or Ray's current-cluster file
        # (joining a cluster is only ever explicit), and on loopback (see _loopback_only).
        with _loopback_only():
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=cfg.ray.dashboard,
                dashboard_host=cfg.ray.dashboard_host,
                logging_level=logging.ERROR,
                log_to_driver=True,
                runtime_env=env,
            )
    return True


# Ray 2.60 switch for its single-machine mode (the macOS / Windows default).
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Let the local Ray bind its servers to 127.0.0.1 instead of the machine's address.

    Ray binds GCS, the raylet, every worker's gRPC server and its agents to the node IP, which
    on Linux is the outward address (or all interfaces). In its single-machine mode the node IP
    is 127.0.0.1, and every one of them binds there (``ss -ltnp`` during a run; README, *Safe
    defaults*). The driver reads the switch at import time (``ray_constants``), the processes
    Ray starts read it from the environment: both are set for the length of ``ray.init`` only.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_SINGLE_MACHINE)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = saved_env


IN_FLIGHT = (
    2  # tasks queued per worker: one running, one waiting (hides the call latency)
)


def _by_cost(tasks: list[ClientTask]) -> list[ClientTask]:
    """Tasks by predicted cost (tokens, else rows) descending, ties by client id."""
    return sorted(tasks, key=lambda t: (-(t.cost or len(t.rows)), t.client_id))


def _submit(
    worker: Any,
    group: list[ClientTask],
    start_of: dict[int, Any],
    rest: tuple,
    method: str = "train",
) -> Any:
    """Send one cohort to ``worker``; each client's start weights go by reference."""
    call = getattr(worker, method)
    return call.remote(group, *rest, *[start_of[t.client_id] for t in group])


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class _Uploads:
    """What a round's groups sent back: per-client results, partial sums, bytes received."""

    presum: bool
    results: list[ClientResult] = field(default_factory=list)
    parts: list[PartialSum] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # by the workers
    received: int = 0

    def add(self, out: Any) -> list[ClientResult]:
        """Take one group's output; returns its per-client results."""
        if self.presum:
            batch = out.results
            self.rejected.extend(out.rejected)
            if out.partial is not None:
                self.parts.append(out.partial)
                self.received += _nbytes(out.partial.weighted)
        else:
            batch = out
            self.received += sum(
                _nbytes(r.update.delta) + _nbytes(r.update.extras) for r in out
            )
        self.results.extend(batch)
        return batch


def _cohorts(tasks: list[ClientTask], size: int) -> list[list[ClientTask]]:
    """The round's cohorts: tasks by cost (:func:`_by_cost`) cut into groups of ``size``."""
    ordered = _by_cost(tasks)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def results_table(
    initial: dict[str, float] | None, final: dict[str, float], title: str
) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    if initial is not None:
        table.add_column("untrained (round 0)", justify="right")
    table.add_column("final", justify="right")
    for key, label in HEADLINE:
        if key not in final:
            continue
        row = [label]
        if initial is not None:
            row.append(f"{initial[key]:.3f}")
        row.append(f"{final[key]:.3f}")
        table.add_row(*row)
    return table


def benchmarks_table(benchmarks: dict[str, dict[str, Any]]) -> Table:
    """The toy suite's headline numbers (official scorers) as a rich table."""
    from fedsim.eval.run import headline

    table = Table(title="toy benchmark suite (official scorers), final projector")
    for col, justify in (("benchmark", "left"), ("metric", "left"), ("value", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for bench, scores in benchmarks.items():
        for label, value in headline(bench, scores):
            table.add_row(bench, label, f"{value:.3f}")
    return table


def corpus_summary(train_path: Path) -> dict[str, Any]:
    """A built corpus's rows and the images skipped as missing (empty for generated scenes)."""
    from fedsim.data.loaders import read_info

    info = read_info(train_path)
    keys = ("rows", "missing_images", "missing_examples", "per_dataset")
    return {k: info[k] for k in keys if k in info}


def backbone_line(cfg: Config) -> str:
    """``model.backbone`` as the summary names it (the reference toy with its digest)."""
    if cfg.model.backbone == "toy":
        from fedsim.models.toy_reference import reference_digest

        return f"toy (the shipped reference, SHA-256 {reference_digest()[:16]}…)"
    if cfg.model.backbone == "toy-recipe":
        return "toy-recipe (the toy recipe, built on this machine)"
    return cfg.model.backbone


def data_lines(
    cfg: Config, corpus: dict[str, Any], history: list[dict[str, Any]]
) -> list[str]:
    """What the run trained on, for summary.md: the corpora (rows, images missing at build,
    images that failed to decode in training) or the generated scenes."""
    split = f"{cfg.scenario.partition} split"
    if cfg.scenario.partition != "iid":
        split += f" by {cfg.scenario.label}"
    if not cfg.data.corpora:
        return [f"- data: {cfg.data.num_scenes} generated scenes, {split}"] + [
            f"- {line}" for line in describe_silos(cfg)
        ]
    names = [c.name or c.format for c in cfg.data.corpora]
    lines = [
        f"- data: {', '.join(f'{n} ({c.path})' for n, c in zip(names, cfg.data.corpora))}; "
        f"{corpus.get('rows', '?')} rows, {split}"
    ]
    per = corpus.get("per_dataset") or {}
    if len(per) > 1:
        lines.append(
            "- rows per corpus: " + ", ".join(f"{k} {v}" for k, v in per.items())
        )
    missing = corpus.get("missing_images", 0)
    examples = ", ".join(corpus.get("missing_examples", [])[:3])
    lines.append(
        f"- images missing when the corpus was built: {missing} (rows skipped"
        + (f"; e.g. {examples})" if missing else ")")
    )
    bad = sum(int(r.get("bad_images", 0)) for r in history)
    lines.append(f"- images that did not decode in training: {bad} (rows skipped)")
    return lines


def run_title(cfg: Config) -> str:
    """``algorithm on scenario``, naming the corpora when the data is not the scenario's own."""
    if not cfg.data.corpora:
        return f"{cfg.algorithm.name} on {cfg.scenario.name}"
    names = ", ".join(c.name or c.format for c in cfg.data.corpora)
    return f"{cfg.algorithm.name} on {names} ({cfg.scenario.name} scenario settings)"


def _summary_md(
    cfg: Config, result: RunResult, wall: float, corpus: dict[str, Any]
) -> str:
    lines = [
        f"# fedsim run: {run_title(cfg)}",
        "",
        f"- clients: {cfg.scenario.num_clients} logical, {cfg.scenario.cohort_size} per round, "
        f"{cfg.rounds} rounds × {cfg.train.local_steps} local steps × batch {cfg.train.batch_size}",
        f"- seed {cfg.seed}; workers {cfg.ray.workers}; wall time {wall:.1f} s",
        f"- backbone: {backbone_line(cfg)}; projector {cfg.model.projector}",
        f"- machine: {machine_line(machine_info())}",
        f"- held-out evaluation: {cfg.data.eval_split} split ({cfg.data.eval_scenes} scenes, "
        f"stream {eval_stream(cfg)})",
        *data_lines(cfg, corpus, result.history),
        "",
        "| metric | untrained (round 0) | final |",
        "|---|---:|---:|",
    ]
    init = result.initial_eval
    for key, label in HEADLINE:
        if key in result.final_eval:
            a = f"{init[key]:.3f}" if init else "–"
            lines.append(f"| {label.strip()} | {a} | {result.final_eval[key]:.3f} |")
    if result.benchmarks:
        from fedsim.eval.run import headline

        lines += [
            "",
            "Toy benchmark suite, official scorers (final projector; answers in eval/):",
            "",
            "| benchmark | metric | value |",
            "|---|---|---:|",
        ]
        for bench, scores in result.benchmarks.items():
            for label, value in headline(bench, scores):
                lines.append(f"| {bench} | {label} | {value:.3f} |")
    lines += [
        "",
        "Peak resident memory (MiB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in result.resources.items()),
        "",
    ]
    return "\n".join(lines)


def run(
    cfg: Config,
    out_dir: Path,
    console: Console | None = None,
    show_progress: bool = True,
    pool: ActorPool | None = None,
    plot: bool = True,
    resume: bool = False,
) -> RunResult:
    """Run ``cfg`` to the end, writing everything to ``out_dir`` (which must be new or empty).

    ``pool`` lends resident workers and an Evaluator kept across runs (``fedsim compare``); by
    default the run starts its own and stops them at the end. ``plot=False`` skips the run's own
    ``curves.png`` (``fedsim compare`` draws all runs in one figure; ``fedsim plot`` draws any).
    ``resume=True``: ``out_dir`` holds an interrupted run of ``cfg``; go on from its newest
    checkpoint (see :func:`resume_run`).
    """
    console = console or Console()
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    # Cheap checks first, so that bad input leaves nothing behind.
    check_inputs(cfg)
    check_before_ray(cfg)
    out_dir = Path(out_dir)
    lock = None
    if resume:
        # One writer: lock first, then verify, then change (a live run is never resumed).
        _check_resumable(out_dir)
        lock = RunLock(out_dir, "--resume")
    try:
        restored = find_checkpoint(cfg, out_dir, console) if resume else None
        if not resume:
            check_run_dir(out_dir)
            check_writable(out_dir)
            if out_dir.is_dir():  # a run starting there now: refused before any work
                RunLock(out_dir, "--out").close()
        _check_backbone(cfg)
        if cfg.data.corpora:
            # Built (or found in the cache) before the run folder exists and before a
            # toy-recipe build: a corpus file that cannot be read, or a bad image under
            # bad_images: fail, is bad input.
            training_data(cfg)
        result, wall, lock, corpus = _run_locked(
            cfg,
            algorithm,
            out_dir,
            console,
            show_progress,
            pool,
            resume,
            restored,
            lock,
        )
        # summary.md: still locked
        _report(cfg, out_dir, console, result, wall, plot, corpus)
    finally:
        if lock is not None:
            lock.close()
    return result


def _check_backbone(cfg: Config) -> None:
    """The backbone's files (the shipped toy: its SHA-256s) and the scene against its recipe.

    Before anything is written.
    """
    if cfg.model.backbone == "toy-recipe":
        from fedsim.models.toy import ToyBuildConfig, toy_backbone_path

        built = toy_backbone_path(ToyBuildConfig(), cache_root(cfg)) / "fedsim.json"
        if built.exists():
            check_scene_fits_backbone(cfg, json.loads(built.read_text()))
    else:
        from fedsim.models.backbone import check_backbone_source

        spec = resolve_backbone(cfg)
        check_backbone_source(spec.backbone_path, spec.lm_path)
        check_scene_fits_backbone(cfg, read_manifest(spec))


def _run_locked(
    cfg: Config,
    algorithm: Any,
    out_dir: Path,
    console: Console,
    show_progress: bool,
    pool: ActorPool | None,
    resume: bool,
    restored: RoundState | None,
    lock: RunLock | None,
) -> tuple[RunResult, float, RunLock | None, dict[str, Any]]:
    """Prepare inputs and Ray, then (a new run) create and lock the folder, then the rounds.

    Everything that can fail on input (partition, corpus, cache, Ray) runs before a new run's
    folder exists; what fails after leaves a folder holding only config.yaml, which a retry
    with the same --out takes again.
    """
    import ray

    metrics = MetricsLog(out_dir / "metrics.jsonl")
    t_start = time.perf_counter()
    progress = make_progress(console, disable=not show_progress)
    with progress:
        prep = prepare(cfg, build_reporter(progress))
        started_ray = connect_ray(cfg)
        own_pool = pool is None
        pool = pool or ActorPool()
        try:
            # Before any actor (Ray would wait forever for one) and before a new run's folder.
            check_feasible(cfg)
            if lock is None:
                lock = prepare_run_dir(out_dir)
                write_yaml(out_dir / "config.yaml", config_to_yaml_data(cfg))
            elif restored is None:
                # No checkpoint yet: the run starts over in its own folder (same bits).
                cut_metrics(out_dir, 0, 0)
                console.print("no checkpoint yet: the run starts again from round 1")
            if cfg.data.feature_cache:
                from fedsim.data.feature_cache import ensure_feature_cache

                progress.console.print(
                    "vision features: cached (Ray Data batch inference)"
                )
                found = ensure_feature_cache(
                    cache_root(cfg), prep.model, prep.train_path, prep.pixel_path
                )
                prep = replace(prep, feature_path=str(found))
            args = (cfg, algorithm, prep, out_dir, metrics, progress, console, pool)
            loop = _run_pooled if getattr(algorithm, "pooled", False) else _run_rounds
            try:
                result = loop(*args, restored)
            except ray.exceptions.RayTaskError as e:
                bad_input = worker_input_error(e)
                if bad_input is None:
                    raise  # a bug: keep the worker's traceback
                raise bad_input from None
            except ray.exceptions.RayActorError as e:
                # The Evaluator or the Aggregator died (lost workers are replaced in-round).
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                found = latest_checkpoint(out_dir)
                raise RunError(
                    f"an actor of the run died ({lines[-1] if lines else type(e).__name__}); "
                    f"the rounds done are in {out_dir / 'metrics.jsonl'}"
                    + (f"; go on with: fedsim run --resume {out_dir}" if found else "")
                ) from None
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        finally:
            if own_pool:
                pool.close()
            if started_ray:
                ray.shutdown()
    wall = time.perf_counter() - t_start
    return result, wall, lock, corpus_summary(prep.train_path)


def _report(
    cfg: Config,
    out_dir: Path,
    console: Console,
    result: RunResult,
    wall: float,
    plot: bool,
    corpus: dict[str, Any],
) -> None:
    """summary.md, curves.png and the tables on the console, once the run is done."""
    write_text(out_dir / "summary.md", _summary_md(cfg, result, wall, corpus))
    if plot:
        from fedsim.plots import plot_runs

        plot_runs(
            [out_dir],
            out_dir / "curves.png",
            [cfg.algorithm.name],
            run_title(cfg),
        )
    console.print(
        results_table(
            result.initial_eval,
            result.final_eval,
            f"{run_title(cfg)}: held-out toy evaluation",
        )
    )
    if result.benchmarks:
        console.print(benchmarks_table(result.benchmarks))
    console.print(
        f"run folder: {out_dir}  (metrics.jsonl, final/projector.safetensors, eval.json, summary.md"
        + (", curves.png)" if plot else ")")
    )


def worker_input_error(e: Exception) -> Exception | None:
    """What to raise for an exception a Ray task re-raised in the driver.

    Bad input a worker finds (an image that no longer decodes under ``bad_images: fail``, a
    checkpoint that does not fit) is a ConfigError or BackboneError there: the driver gets it
    wrapped in a RayTaskError whose text is the worker's whole traceback. Its cause alone is
    the one line to show; None for anything else (a bug, which keeps its traceback).
    """
    from fedsim.models.backbone import BackboneError

    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (ConfigError, BackboneError)) else None


def _check_resumable(run_dir: Path) -> None:
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
    _check_resumable(run_dir)
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


def resume_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Go on with the interrupted run in ``run_dir`` from its newest checkpoint.

    The run's own ``config.yaml`` is the config; ``overrides`` may change only where it runs
    (``ray.*`` but ``ray.threads_per_worker``) and ``cache_dir``, which do not change its result.
    """
    from fedsim.config import load_config

    run_dir = Path(run_dir)
    for o in overrides or []:
        key = o.split("=", 1)[0].strip()
        free = key.startswith("ray.") or key == "cache_dir"
        if not free or key == "ray.threads_per_worker":
            raise ConfigError(
                f"--resume: --set {key} would change the run; only ray.* (but "
                "ray.threads_per_worker) and cache_dir may change on resume"
            )
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--resume {str(run_dir)!r}: not a run folder (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"), overrides)
    return run(cfg, run_dir, console, show_progress, resume=True)


def _lrs(cfg: Config, rnd: int, steps: int) -> tuple[float, ...]:
    """The learning rate of each of round ``rnd``'s ``steps`` local steps (global schedule)."""
    return tuple(
        lr_at(
            (rnd - 1) * steps + s,
            cfg.rounds * steps,
            cfg.train.lr,
            cfg.train.warmup,
            cfg.train.schedule,
        )
        for s in range(steps)
    )


def _settings(cfg: Config) -> TrainSettings:
    return TrainSettings(
        optimizer=cfg.train.optimizer,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        loss=cfg.train.loss,
        qa_fraction=cfg.data.qa_fraction,
        max_update_norm=cfg.validation.max_update_norm,
        captions=caption_transform(cfg),
    )


def _loss(record: dict[str, Any]) -> str:
    """The round's loss for display ("–" for a round in which no client reported)."""
    return "–" if record.get("loss") is None else f"{record['loss']:.3f}"


def participation_spec(cfg: Config) -> ParticipationSpec:
    sc = cfg.scenario
    return ParticipationSpec(
        sampling=sc.participation,
        cohort_size=sc.cohort_size,
        availability=sc.availability,
        diurnal_period=sc.diurnal_period,
        diurnal_on=sc.diurnal_on,
        dropout=sc.dropout,
        tier_speeds=tuple(sc.tier_speeds),
        tier_shares=tuple(sc.tier_shares),
        tier_upload_mbps=tuple(sc.tier_upload_mbps),
        step_seconds=sc.step_seconds,
        time_budget=sc.time_budget,
        deadline=sc.deadline,
    )


def _eval_due(cfg: Config, rnd: int) -> bool:
    return rnd == cfg.rounds or (cfg.eval_every > 0 and rnd % cfg.eval_every == 0)


def _initial_eval(
    cfg: Config,
    pool: ActorPool,
    weights: dict[str, torch.Tensor],
    metrics: MetricsLog,
    history: list[dict[str, Any]],
    console: Console,
) -> dict[str, float] | None:
    """The untrained projector's evaluation, logged as round 0 (when ``eval.at_start``)."""
    import ray

    if not cfg.eval.at_start:
        return None
    t0 = time.perf_counter()
    result = pool.initial_eval(cfg.seed, ray.put(weights))
    record = {
        "round": 0,
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "eval": result,
    }
    metrics.append(record)
    history.append(record)
    console.print(
        f"round 0 (untrained): attr_mean {result['attr_mean']:.3f}, yes/no {result['yesno_acc']:.3f}"
    )
    return result


def toy_benchmarks(
    cfg: Config, evaluator: Any, weights: dict[str, torch.Tensor], out_dir: Path
) -> dict[str, dict[str, Any]]:
    """The toy suite's benchmarks, answered by the Evaluator, scored by the official rules.

    Answers and scores land in ``out_dir/eval/<bench>/`` as ``fedsim eval run`` writes them.
    """
    import ray

    from fedsim.eval import suite
    from fedsim.eval.run import save_and_score
    from fedsim.eval.toy_suite import TOY_MATCHING, ensure_toy_suite

    if not cfg.eval.benchmarks or not is_toy(cfg.model.backbone):
        return {}
    root = ensure_toy_suite(
        cache_root(cfg), cfg.data.scene, images=cfg.eval.suite_images
    )
    ref = ray.put(weights)
    names = [suite.canonical(b) for b in cfg.eval.benchmarks]
    pending = {b: evaluator.answer_benchmark.remote(ref, b, str(root)) for b in names}
    prompts = _ToyPrompts()
    results: dict[str, dict[str, Any]] = {}
    for b in names:
        questions = suite.get(b).load(*suite.locate(b, root))
        results[b] = save_and_score(
            b,
            questions,
            ray.get(pending[b]),
            [suite.render_prompt(prompts, b, q) for q in questions],
            out_dir / "eval" / b,
            f"fedsim-{cfg.algorithm.name}-seed{cfg.seed}",
            {
                "backend": "hf",
                "data": str(root),
                "round": cfg.rounds,
                "projector_digest": weights_digest(weights),
            },
            matching=TOY_MATCHING,
        )
    return results


class _ToyPrompts:
    """The toy backbone's templates, to record prompts in answer files without loading it."""

    def __init__(self) -> None:
        from fedsim.models.toy import CAPTION_PROMPT, IMAGE_TOKEN, QA_PROMPT

        self.manifest = {"kind": "toy"}
        self.caption_prompt = f"{IMAGE_TOKEN} {CAPTION_PROMPT}"
        self.qa_prompt = f"{IMAGE_TOKEN} {QA_PROMPT}"


def _finish(
    cfg: Config,
    out_dir: Path,
    initial_eval: dict[str, float] | None,
    final_eval: dict[str, float],
    resources: dict[str, Any],
    benchmarks: dict[str, dict[str, Any]] | None = None,
    nodes: dict[str, str] | None = None,
) -> None:
    write_json(
        out_dir / "eval.json",
        {
            "round": cfg.rounds,
            "initial": initial_eval,
            "final": final_eval,
            "benchmarks": benchmarks or {},
        },
    )
    write_json(
        out_dir / "resources.json",
        {"peak_rss_mb": resources, "nodes": nodes or {}, "machine": machine_info()},
    )


def federated_steps(
    cfg: Config, shards: list[np.ndarray], w0: dict[str, torch.Tensor]
) -> int:
    """Local steps a federated run of ``cfg`` takes per round, on average: the centralized run's
    steps per round, so that the upper bound sees the same number of samples.

    Σ over the rounds of each round's cohort's steps (:func:`plan_round`, the same pure function
    the federated run plans with: dropout, stragglers and device tiers under a time budget take
    steps away), divided by the rounds and rounded. Without those it is exactly
    ``cohort_size × local_steps``.
    """
    spec = participation_spec(cfg)
    sizes = np.array([len(s) for s in shards])
    upload = sum(
        v.numel() * 4 for v in w0.values()
    )  # the fp32 delta, as the run uploads
    total = sum(
        sum(
            plan_round(
                spec, sizes, cfg.train.local_steps, upload, cfg.seed, r
            ).steps.values()
        )
        for r in range(1, cfg.rounds + 1)
    )
    return max(1, round(total / cfg.rounds))


def pooled_plan(
    cfg: Config,
    prep: Prepared,
    w0: dict[str, torch.Tensor],
    start: dict[str, Any] | None = None,
) -> PooledPlan:
    """What the centralized run's Ray Train workers train: every client's rows pooled.

    Under caption transforms the plan carries each row's owner, so that the pooled stream
    trains on the very text the clients train on (``fedsim.pooled.pooled_task``).
    """
    from fedsim.pooled import PooledPlan

    steps = federated_steps(cfg, prep.shards, w0)
    settings = _settings(cfg)
    rows = np.concatenate(prep.shards)
    return PooledPlan(
        model=prep.model,
        train_path=str(prep.train_path),
        pixel_path=prep.pixel_path,
        bad_images=cfg.data.bad_images,
        feature_path=prep.feature_path,
        rows=rows,
        w0=w0,
        algorithm=cfg.algorithm.name,
        params=dict(cfg.algorithm.params),
        seed=cfg.seed,
        rounds=cfg.rounds,
        steps=steps,
        batch_size=cfg.train.batch_size,
        lrs=tuple(_lrs(cfg, r, steps) for r in range(1, cfg.rounds + 1)),
        settings=settings,
        threads=cfg.ray.threads_per_worker,
        eval_rounds=frozenset(r for r in range(1, cfg.rounds + 1) if _eval_due(cfg, r)),
        checkpoint_every=cfg.checkpoint_every,
        start=start,
        row_owner=(
            row_owners(prep.shards, int(rows.max()) + 1)
            if settings.captions is not None
            else None
        ),
    )


def _run_pooled(
    cfg: Config,
    algorithm: Any,
    prep: Prepared,
    out_dir: Path,
    metrics: MetricsLog,
    progress: Progress,
    console: Console,
    pool: ActorPool,
    restored: RoundState | None = None,
) -> RunResult:
    """The centralized upper bound: Ray Train's TorchTrainer over the pooled shards.

    Rank 0 sends its training state with every ``checkpoint_every``-th round's record; the
    driver writes the round checkpoint (the pooled stream is client 0 of the client-state store
    and the cursors). A resumed run hands the checkpoint to the workers as the plan's start.
    """
    import ray

    evaluator = pool.evaluator(cfg, prep)
    w0: dict[str, torch.Tensor] = ray.get(evaluator.init_projector.remote(cfg.seed))
    history: list[dict[str, Any]] = []
    final_eval: dict[str, float] = {}
    start = None
    if restored is None:
        initial_eval = _initial_eval(cfg, pool, w0, metrics, history, console)
    else:
        check_restored(restored, w0, 1)  # the pooled stream is one client
        cut_metrics(out_dir, restored.round, restored.metrics_lines)
        history = metrics.read()
        initial_eval = next(
            (r["eval"] for r in history if r.get("round") == 0 and "eval" in r), None
        )
        final_eval = dict(restored.final_eval)
        start = {
            "round": restored.round,
            "weights": restored.weights,
            "server_state": restored.server_state,
            "client_state": restored.clients.get(0, {}),
            "cursor": (restored.cursors[0].passes, restored.cursors[0].position),
        }
        console.print(f"resumed after round {restored.round} (its checkpoint)")
    digest = config_digest(config_to_yaml_data(cfg))
    plan = pooled_plan(cfg, prep, w0, start)
    round_task = progress.add_task(
        "rounds (Ray Train)",
        total=cfg.rounds,
        completed=restored.round if restored else 0,
        info="",
    )

    def on_record(record: dict[str, Any]) -> None:
        nonlocal final_eval
        state = record.pop("checkpoint", None)
        metrics.append(record)
        history.append(record)
        if "eval" in record:
            final_eval = record["eval"]
        if state is not None:
            save_checkpoint(
                out_dir,
                RoundState(
                    round=record["round"],
                    weights=state["weights"],
                    server_state=state["server_state"],
                    clients={0: state["client_state"]} if state["client_state"] else {},
                    cursors=[Cursor(*state["cursor"])],
                    sim_clock=0.0,
                    final_eval=final_eval,
                    metrics_lines=len(history),
                ),
                digest,
                cfg.checkpoint_keep,
            )
        if "eval" in record:
            console.print(
                f"round {record['round']}: loss {record['loss']:.3f}, attr_mean "
                f"{final_eval['attr_mean']:.3f}, yes/no {final_eval['yesno_acc']:.3f}"
            )
        progress.update(round_task, advance=1, info=f"loss {_loss(record)}")

    if restored is not None and restored.round == cfg.rounds:
        # Stopped after the last round's checkpoint: nothing left to train.
        weights, train_peak = restored.weights, 0.0
    else:
        weights, train_peak = pool.trainer(cfg).train(plan, evaluator, on_record)
    meta = {
        "algorithm": cfg.algorithm.name,
        "rounds": str(cfg.rounds),
        "seed": str(cfg.seed),
    }
    save_weights(out_dir / "final" / "projector.safetensors", weights, meta)
    resources = {
        "driver": peak_rss_mb(),
        "train_rank0": train_peak,
        "evaluator": ray.get(evaluator.peak_rss_mb.remote()),
    }
    benchmarks = toy_benchmarks(cfg, evaluator, weights, out_dir)
    nodes = {"evaluator": ray.get(evaluator.node.remote())}
    _finish(cfg, out_dir, initial_eval, final_eval, resources, benchmarks, nodes)
    return RunResult(
        out_dir, weights, initial_eval, final_eval, history, resources, benchmarks
    )


def _run_rounds(
    cfg: Config,
    algorithm: Any,
    prep: Prepared,
    out_dir: Path,
    metrics: MetricsLog,
    progress: Progress,
    console: Console,
    pool: ActorPool,
    restored: RoundState | None = None,
) -> RunResult:
    import ray

    personal = bool(getattr(algorithm, "personal", False))
    evaluator = pool.evaluator(cfg, prep)
    workers = WorkerSet(pool, pool.workers(cfg, prep))
    # W_0 from the run seed (not from the checkpoint's stored projector).
    weights: dict[str, torch.Tensor] = ray.get(
        workers.handles()[0].init_projector.remote(cfg.seed)
    )
    aggregator = pool.aggregator(
        cfg.algorithm.name,
        cfg.algorithm.params,
        weights,
        cfg.scenario.num_clients,
        cfg.validation.max_update_norm,
        cfg.validation.on_reject,
        cfg.train.diagnostics,
    )

    w0 = weights
    shards = prep.shards
    sizes = np.array([len(s) for s in shards])
    participation = participation_spec(cfg)
    upload_bytes = sum(v.numel() * 4 for v in weights.values())  # fp32 delta
    sim_clock = 0.0
    cursors = [Cursor() for _ in shards]
    store = MemoryStore()
    steps = cfg.train.local_steps
    settings = _settings(cfg)
    presum = (
        cfg.train.presum and getattr(algorithm, "presummable", False) and not personal
    )
    method = "train_presummed" if presum else "train"
    cost = TokenCost(prep.model, prep.train_path, cfg.data.qa_fraction)

    def evaluate(ref: Any) -> dict[str, float]:
        return ray.get(evaluator.evaluate.remote(ref))

    w0_eval: dict[str, float] = {}

    def evaluate_clients() -> tuple[dict[str, float], dict[str, float]]:
        """Mean and std over all clients of each client's own projector's evaluation."""
        if not w0_eval:
            w0_eval.update(evaluate(ray.put(w0)))
        models = [personal_model(store.load(c)) for c in range(len(shards))]
        refs = {
            c: evaluator.evaluate.remote(ray.put(m)) for c, m in enumerate(models) if m
        }
        per_client = [
            ray.get(refs[c]) if c in refs else w0_eval for c in range(len(shards))
        ]
        keys = per_client[0].keys()
        vals = {k: np.array([e[k] for e in per_client], dtype=float) for k in keys}
        return (
            {k: float(v.mean()) for k, v in vals.items()},
            {k: float(v.std()) for k, v in vals.items()},
        )

    history: list[dict[str, Any]] = []
    final_eval: dict[str, float] = {}
    first = 1
    if restored is None:
        initial_eval = _initial_eval(cfg, pool, weights, metrics, history, console)
    else:
        # Go on after the checkpoint's round: its weights, server state, client states, cursors
        # and clock. Checked against this run first; only then is metrics.jsonl cut back.
        check_restored(restored, weights, len(shards))
        ray.get(aggregator.load_state.remote(restored.server_state))
        cut_metrics(out_dir, restored.round, restored.metrics_lines)
        weights = restored.weights
        cursors = list(restored.cursors)
        store.restore(restored.clients)
        sim_clock = restored.sim_clock
        final_eval = dict(restored.final_eval)
        history = metrics.read()
        initial_eval = next(
            (r["eval"] for r in history if r.get("round") == 0 and "eval" in r), None
        )
        first = restored.round + 1
        console.print(f"resumed after round {restored.round} (its checkpoint)")
    # At round 0 every client of a personal algorithm holds W_0 too: one evaluation.
    w0_eval.update(initial_eval or {})
    digest = config_digest(config_to_yaml_data(cfg))

    round_task = progress.add_task(
        "rounds", total=cfg.rounds, completed=first - 1, info=""
    )
    client_task = progress.add_task("client tasks", total=1, info="")
    for rnd in range(first, cfg.rounds + 1):
        t0 = time.perf_counter()
        plan = plan_round(participation, sizes, steps, upload_bytes, cfg.seed, rnd)
        cohort = plan.cohort
        lrs = _lrs(cfg, rnd, steps)
        tasks = []
        starts: dict[int, Any] = {}
        for cid in cohort:
            n = plan.steps[cid]
            rows, cursors[cid] = take(
                shards[cid], cursors[cid], n * cfg.train.batch_size, cfg.seed, cid
            )
            state = store.load(cid)
            if personal:
                # The client continues from its own projector (W_0 until it first trains).
                starts[cid] = personal_model(state) or w0
                state = {k: v for k, v in state.items() if not k.startswith(MODEL)}
            tasks.append(
                ClientTask(
                    cid,
                    rnd,
                    cfg.seed,
                    rows,
                    lrs[:n],
                    cfg.train.batch_size,
                    state,
                    cost=cost(cid, rnd, cfg.seed, rows),
                )
            )
        weights_ref = ray.put(weights)
        start_refs = {cid: ray.put(w) for cid, w in starts.items()}
        payload_ref = aggregator.payload.remote()
        # Cohorts: the round's tasks by predicted cost, cut into groups of train.cohort_batch
        # (similar costs share a pass, so little is masked); a group depends on the config
        # alone, never on the workers. fedsim.dispatch sends them largest first to whichever
        # worker frees, and sends a group again when its worker or node is lost.
        # Presummable algorithms (the FedAvg family): each group comes back as one partial
        # sum Σ n_k Δ_k instead of a Δ per client.
        pending = _cohorts(tasks, cfg.train.cohort_batch)
        groups = [[t.client_id for t in g] for g in pending]
        rest = (payload_ref, cfg.algorithm.name, cfg.algorithm.params, settings)
        start_of = {
            t.client_id: start_refs.get(t.client_id, weights_ref) for t in tasks
        }
        progress.update(
            client_task,
            total=len(tasks),
            completed=0,
            description=f"round {rnd} clients",
            info="",
        )
        uploads = _Uploads(presum)

        def on_result(out: Any, uploads: _Uploads = uploads) -> None:
            batch = uploads.add(out)
            progress.update(
                client_task,
                advance=len(batch),
                info=f"client {batch[-1].update.client_id} loss {batch[-1].update.loss:.3f}",
            )

        try:
            sent = dispatch(
                pending,
                partial(_submit, start_of=start_of, rest=rest, method=method),
                workers,
                on_result,
                depth=IN_FLIGHT,
                max_retries=cfg.ray.task_retries,
                label=lambda g: str([t.client_id for t in g]),
            )
        except WorkersLost as e:
            raise RunError(
                f"round {rnd}: {e}; rounds before it are in {out_dir / 'metrics.jsonl'}"
                + (
                    f", the last checkpoint in {out_dir / 'checkpoints'} (fedsim run "
                    f"--resume {out_dir})"
                    if cfg.checkpoint_every
                    else ""
                )
            ) from None
        if sent.lost:
            console.print(
                f"round {rnd}: lost worker(s) {sent.lost}; {sent.retries} client group(s) "
                "sent again"
            )
        results, parts, received = uploads.results, uploads.parts, uploads.received
        worker_rejected = uploads.rejected
        results.sort(key=lambda r: r.update.client_id)
        updates = [r.update for r in results]
        if presum:
            weights, agg = ray.get(
                aggregator.aggregate_partials.remote(
                    weights_ref, parts, worker_rejected, rnd
                )
            )
        else:
            weights, agg = ray.get(
                aggregator.aggregate.remote(weights_ref, updates, rnd)
            )
        # A rejected update changes nothing: neither the client's state nor its own projector.
        rejected = {r["client_id"] for r in agg.get("rejected", [])}
        for res in results:
            cid = res.update.client_id
            if cid in rejected:
                continue
            new_state = dict(res.client_state)
            if personal:
                own = add(starts[cid], res.update.delta)
                new_state.update({MODEL + k: v for k, v in own.items()})
            store.save(cid, new_state)
        samples = sum(u.num_samples for u in updates)
        sim_clock += plan.sim_seconds
        record: dict[str, Any] = {
            "round": rnd,
            "clients": cohort,
            "num_clients": len(cohort),
            "samples": samples,
            "loss": (
                float(sum(u.loss * u.num_samples for u in updates) / samples)
                if samples
                else None
            ),
            "lr": lrs[0],
            "update_norm": agg.get("update_norm"),
            "rejected": agg.get("rejected", []),
            "algorithm": {
                k: v
                for k, v in agg.items()
                if k not in ("update_norm", "rejected", "action", "diagnostics")
            },
            **({"action": agg["action"]} if "action" in agg else {}),
            **({"diagnostics": agg["diagnostics"]} if "diagnostics" in agg else {}),
            "client_seconds_max": max((r.seconds for r in results), default=0.0),
            "cohorts": groups,
            "retries": sent.retries,
            **({"workers_lost": sent.lost} if sent.lost else {}),
            "predicted_tokens": {str(t.client_id): t.cost for t in tasks},
            "upload_mib": round(received / 2**20, 6),
            **({"presummed_groups": len(parts)} if presum else {}),
            "bad_images": sum(r.bad_images for r in results),
            **({"corpus": corpus_summary(prep.train_path)} if rnd == 1 else {}),
            "data_passes_max": max(c.passes for c in cursors),
            "available": plan.available,
            "sampled": plan.sampled,
            "dropped": plan.dropped,
            "stragglers": plan.stragglers,
            "sim_seconds": round(plan.sim_seconds, 6),
            "sim_clock": round(sim_clock, 6),
        }
        if any(n != steps for n in plan.steps.values()):
            record["local_steps"] = {str(c): n for c, n in plan.steps.items()}
        last = rnd == cfg.rounds
        due = _eval_due(cfg, rnd)
        if personal and not (last or getattr(algorithm, "eval_all_rounds", False)):
            due = False
        if due:
            if personal:
                final_eval, record["eval_client_std"] = evaluate_clients()
            else:
                final_eval = evaluate(ray.put(weights))
            record["eval"] = final_eval
            console.print(
                f"round {rnd}: loss {_loss(record)}, attr_mean {final_eval['attr_mean']:.3f}, "
                f"yes/no {final_eval['yesno_acc']:.3f}"
            )
        record["wall_seconds"] = round(time.perf_counter() - t0, 3)
        metrics.append(record)
        history.append(record)
        if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
            save_checkpoint(
                out_dir,
                RoundState(
                    round=rnd,
                    weights=weights,
                    server_state=ray.get(aggregator.server_state.remote()),
                    clients=store.snapshot(),
                    cursors=cursors,
                    sim_clock=sim_clock,
                    final_eval=final_eval,
                    metrics_lines=len(history),
                ),
                digest,
                cfg.checkpoint_keep,
            )
        progress.update(round_task, advance=1, info=f"loss {_loss(record)}")
        if record["rejected"] and cfg.validation.on_reject == "fail":
            first = record["rejected"][0]
            raise RunError(
                f"round {rnd}: {len(record['rejected'])} update(s) rejected "
                f"(clients {[r['client_id'] for r in record['rejected']]}; first: "
                f"{first['reason']}); validation.on_reject is fail — rounds 1–{rnd} are in "
                f"{out_dir / 'metrics.jsonl'}"
            )

    meta = {
        "algorithm": cfg.algorithm.name,
        "rounds": str(cfg.rounds),
        "seed": str(cfg.seed),
    }
    if personal:
        # No global model: every client's own projector, keyed "client-<id>/<name>".
        save_weights(
            out_dir / "final" / "client_projectors.safetensors",
            {
                f"client-{c}/{k}": v.clone()
                for c in range(len(shards))
                for k, v in (personal_model(store.load(c)) or w0).items()
            },
            meta,
        )
    else:
        save_weights(out_dir / "final" / "projector.safetensors", weights, meta)
    server_state = ray.get(aggregator.server_state.remote())
    if server_state:
        save_weights(out_dir / "final" / "server_state.safetensors", server_state)
    resources = {
        "driver": peak_rss_mb(),
        **workers.ask("peak_rss_mb"),
        "aggregator": ray.get(aggregator.peak_rss_mb.remote()),
        "evaluator": ray.get(evaluator.peak_rss_mb.remote()),
    }
    nodes = {
        **workers.ask("node"),
        "aggregator": ray.get(aggregator.node.remote()),
        "evaluator": ray.get(evaluator.node.remote()),
    }
    benchmarks = {} if personal else toy_benchmarks(cfg, evaluator, weights, out_dir)
    _finish(cfg, out_dir, initial_eval, final_eval, resources, benchmarks, nodes)
    return RunResult(
        out_dir, weights, initial_eval, final_eval, history, resources, benchmarks
    )
