"""A run from start to end: ``fedsim run`` and ``fedsim run --resume``.

:func:`run` checks the inputs (before anything is written), prepares data and Ray
(:mod:`fedsim.prepare`), creates and locks the run folder, hands the rounds to a loop
(:mod:`fedsim.rounds`: federated, or the centralized upper bound on Ray Train) and reports
(:mod:`fedsim.report`). :func:`resume_run` goes on from a run folder's newest sound checkpoint
(:mod:`fedsim.checkpoint`). Bad input anywhere ends in one line naming the file, field or
client; a run folder is written by one process at a time.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from fedsim.algorithms import build_algorithm
from fedsim.checkpoint import (
    RoundState,
    check_resumable,
    cut_metrics,
    find_checkpoint,
    latest_checkpoint,
)
from fedsim.config import Config, config_to_yaml_data, load_config
from fedsim.configtools import ConfigError
from fedsim.data.feature_cache import ensure_feature_cache
from fedsim.models.backbone import BackboneError
from fedsim.models.spec import check_backbone
from fedsim.pool import ActorPool
from fedsim.prepare import cache_root, check_inputs, prepare, training_data
from fedsim.progress import build_reporter, make_progress
from fedsim.raystart import joined_ray
from fedsim.report import RunResult, corpus_summary, report_run
from fedsim.resources import check_before_ray, check_feasible
from fedsim.rounds import FederatedRun, RunContext, run_pooled
from fedsim.runio import (
    RunError,
    RunLock,
    check_run_dir,
    check_writable,
    prepare_run_dir,
    write_yaml,
)
from fedsim.scenarios.silos import describe as describe_silos
from fedsim.startup import mark
from fedsim.tracking import TrackedLog, Trackers

__all__ = ["RunError", "RunResult", "resume_run", "run"]


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
    trackers = None
    if resume:
        # One writer: lock first, then verify, then change (a live run is never resumed).
        check_resumable(out_dir)
        lock = RunLock(out_dir, "--resume")
    try:
        restored = find_checkpoint(cfg, out_dir, console) if resume else None
        trackers = Trackers.for_run(cfg, out_dir, restored, resume)
        if not resume:
            check_run_dir(out_dir)
            check_writable(out_dir)
            if out_dir.is_dir():  # a run starting there now: refused before any work
                RunLock(out_dir, "--out").close()
        check_backbone(cfg)
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
            trackers,
        )
        # summary.md: still locked
        report_run(cfg, out_dir, console, result, wall, plot, corpus)
        trackers.finish(result.final_eval)
    finally:
        if trackers is not None:
            trackers.close()
        if lock is not None:
            lock.close()
    return result


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
    trackers: Trackers,
) -> tuple[RunResult, float, RunLock | None, dict[str, Any]]:
    """Prepare inputs and Ray, then (a new run) create and lock the folder, then the rounds.

    Everything that can fail on input (partition, corpus, cache, Ray) runs before a new run's
    folder exists; what fails after leaves a folder holding only config.yaml, which a retry
    with the same --out takes again.
    """
    metrics = TrackedLog(out_dir / "metrics.jsonl", trackers)
    t_start = time.perf_counter()
    progress = make_progress(console, disable=not show_progress)
    with progress:
        prep = prepare(cfg, build_reporter(progress))
        with joined_ray(cfg):  # SIGTERM stops the run as Ctrl-C does
            mark("ray_init")
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
                    console.print(
                        "no checkpoint yet: the run starts again from round 1"
                    )
                if cfg.data.feature_cache:
                    progress.console.print(
                        "vision features: cached (Ray Data batch inference)"
                    )
                    found = ensure_feature_cache(
                        cache_root(cfg), prep.model, prep.train_path, prep.pixel_path
                    )
                    prep = replace(prep, feature_path=str(found))
                ctx = RunContext(cfg, prep, out_dir, metrics, progress, console, pool)
                result = _rounds(ctx, algorithm, restored)
            except BaseException:
                if lock is not None:
                    lock.close()
                raise
            finally:
                if own_pool:
                    pool.close()
    wall = time.perf_counter() - t_start
    about = corpus_summary(prep.train_path)
    about["silos"] = describe_silos(cfg, [len(s) for s in prep.shards])
    return result, wall, lock, about


def _rounds(ctx: RunContext, algorithm: Any, restored: RoundState | None) -> RunResult:
    """The run's round loop; a worker's bad input as its one line, a dead actor as an error
    that says where the rounds done are and how to go on."""
    try:
        if algorithm.pooled:
            return run_pooled(ctx, restored)
        return FederatedRun(ctx, algorithm, restored).run()
    except ray.exceptions.RayTaskError as e:
        bad_input = worker_input_error(e)
        if bad_input is None:
            raise  # a bug: keep the worker's traceback
        raise bad_input from None
    except ray.exceptions.RayActorError as e:
        # The Evaluator or the Aggregator died (lost workers are replaced in-round).
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        out_dir = ctx.out_dir
        found = latest_checkpoint(out_dir)
        raise RunError(
            f"an actor of the run died ({lines[-1] if lines else type(e).__name__}); "
            f"the rounds done are in {out_dir / 'metrics.jsonl'}"
            + (f"; go on with: fedsim run --resume {out_dir}" if found else "")
        ) from None


def worker_input_error(e: Exception) -> Exception | None:
    """What to raise for an exception a Ray task re-raised in the driver.

    Bad input a worker finds (an image that no longer decodes under ``bad_images: fail``, a
    checkpoint that does not fit) is a ConfigError or BackboneError there: the driver gets it
    wrapped in a RayTaskError whose text is the worker's whole traceback. Its cause alone is
    the one line to show; None for anything else (a bug, which keeps its traceback).
    """
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (ConfigError, BackboneError)) else None


def resume_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Go on with the interrupted run in ``run_dir`` from its newest checkpoint.

    The run's own ``config.yaml`` is the config; ``overrides`` may change only where it runs
    (``ray.*`` but ``ray.threads_per_worker``), ``tracking.*`` and ``cache_dir``, which do not
    change its result.
    """
    run_dir = Path(run_dir)
    for o in overrides or []:
        key = o.split("=", 1)[0].strip()
        free = key.startswith(("ray.", "tracking.")) or key == "cache_dir"
        if not free or key == "ray.threads_per_worker":
            raise ConfigError(
                f"--resume: --set {key} would change the run; only ray.* (but "
                "ray.threads_per_worker), tracking.* and cache_dir may change on resume"
            )
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--resume {str(run_dir)!r}: not a run folder (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"), overrides)
    return run(cfg, run_dir, console, show_progress, resume=True)
