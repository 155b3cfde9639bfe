"""The run configuration of ``fedsim run``: typed, frozen, validated at construction.

Layers, later winning: these defaults (the toy IID scenario) ← a YAML file or scenario preset
(``--config``) ← ``--set key=value`` overrides. The resolved config is written to the run folder as
``config.yaml`` and is, with the seed, all a run's results depend on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedsim.configtools import (
    ConfigError,
    apply_overrides,
    from_dict,
    merge,
    read_yaml,
    to_dict,
)
from fedsim.data.loaders import CorpusSpec
from fedsim.data.synthetic import CAPTION_STYLES, SceneSpec
from fedsim.eval.benchmark import BenchmarkError
from fedsim.eval.suite import TOY_SUITE, canonical
from fedsim.privacy.options import PrivacyConfig
from fedsim.scenarios import preset_path

#: Names of the embedded toy backbones: the shipped reference and the one rebuilt from its recipe.
TOY_BACKBONES = ("toy", "toy-recipe")


def is_toy(backbone: str) -> bool:
    """Whether ``model.backbone`` names an embedded toy backbone (not a path)."""
    return backbone in TOY_BACKBONES


def _positive(section: str, **values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The frozen backbone and the trainable projector.

    Attributes
    ----------
    backbone:
        ``toy`` (fedsim's reference toy backbone, shipped in the package and checked by SHA-256:
        the same bits on every machine), ``toy-recipe`` (the same recipe built on this machine
        and cached: ``fedsim backbones build toy``), a local HF LLaVA checkpoint folder, or a
        vision encoder folder when ``lm`` is set.
    lm:
        A causal LM folder to pair with the vision encoder in ``backbone``.
    projector:
        ``mlp2x_gelu`` (LLaVA-1.5), ``linear`` or ``mlp{N}x_gelu``.
    dtype:
        Weights and activations of the frozen parts; the projector update is always fp32.
    device:
        ``auto`` (CUDA when the worker has a GPU), ``cpu`` or ``cuda``.
    """

    backbone: str = "toy"
    lm: str | None = None
    projector: str = "mlp2x_gelu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ConfigError("model.backbone: must not be empty")
        if not re.fullmatch(r"linear|mlp[1-9][0-9]*x_gelu", self.projector):
            raise ConfigError(
                f"model.projector: {self.projector!r} is not linear or mlp<N>x_gelu (N >= 1)"
            )
        if self.lm is not None and is_toy(self.backbone):
            raise ConfigError(
                f"model.lm: pairs with a vision encoder folder in model.backbone, not with {self.backbone!r}"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The embedded synthetic data (real datasets come with scenarios).

    Attributes
    ----------
    num_scenes:
        Training scenes shared out among the clients (one pass over the run, see train).
    eval_scenes:
        Held-out scenes for evaluation (a separate generator stream).
    eval_split:
        Which held-out scenes the run is evaluated on: ``test`` (the reported split) or
        ``validation`` (scenes of another generator stream, independent of the test scenes:
        what ``fedsim sweep`` selects hyper-parameters on, so the test split is never read
        during selection).
    qa_fraction:
        Share of training examples that are yes/no questions instead of captions.
    scene:
        What scenes contain; must stay within what the backbone was pre-trained on.
    corpora:
        Train on image–text corpora read from disk instead of generated scenes: a list of
        ``{format: lcs558k|coco|parquet|hf, path, image_root, ...}`` (fields:
        ``fedsim.data.loaders.CorpusSpec``); several corpora are concatenated, with a
        ``dataset`` column naming each row's corpus. Held-out evaluation stays on the
        synthetic scenes.
    bad_images:
        A missing or undecodable image: ``skip`` the row (counted: ``missing_images`` in the
        corpus, ``bad_images`` per round in metrics.jsonl) or ``fail`` with its path.
    pixel_cache:
        Run the image processor once per dataset and read pixel values from a memory-mapped
        cache during training (same results, faster steps): ``auto`` when the cache stays under
        4 GiB, ``on`` always, ``off`` never.
    feature_cache:
        Run the frozen vision encoder once over the training data (Ray Data batch inference)
        and keep its features as Arrow; training then skips the encoder. Same results; off by
        default (real encoders' features are large: 576 × 1024 values an image for CLIP-L/336).
    """

    num_scenes: int = 40000
    eval_scenes: int = 500
    eval_split: Literal["test", "validation"] = "test"
    qa_fraction: float = 0.3
    scene: SceneSpec = field(
        default_factory=lambda: SceneSpec(styles=("filled", "outline"))
    )
    pixel_cache: Literal["auto", "on", "off"] = "auto"
    feature_cache: bool = False
    corpora: tuple[CorpusSpec, ...] = ()
    bad_images: Literal["skip", "fail"] = "skip"

    def __post_init__(self) -> None:
        _positive("data", num_scenes=self.num_scenes, eval_scenes=self.eval_scenes)
        if not 0.0 <= self.qa_fraction <= 1.0:
            raise ConfigError(
                f"data.qa_fraction: must be in [0, 1], got {self.qa_fraction!r}"
            )


@dataclass(frozen=True, kw_only=True)
class ScenarioConfig:
    """How data is split among logical clients and who takes part in each round.

    Attributes
    ----------
    name:
        The scenario's name (a preset in fedsim.scenarios, or your own).
    num_clients:
        Logical clients (data silos).
    partition:
        ``iid``: a seeded shuffle split into equal shards; ``dirichlet``: label skew, each
        label's rows split among clients in Dirichlet(``dirichlet_alpha``) proportions;
        ``domain``: feature skew, each client holds one value of ``label`` only.
    label:
        The dataset column(s) ``dirichlet`` and ``domain`` split by (``shape``, ``background``;
        ``background+style`` joins columns into one key).
    dirichlet_alpha:
        α of the label skew (small: few labels per client).
    quantity_skew:
        Power-law exponent of the client sizes (n_k ∝ r_k^−a over seeded ranks r); 0 = equal
        sizes. Composes with every partition: ``iid`` contents, label skew with those sizes, or
        power-law sizes within each domain.
    participation:
        ``uniform``: each round samples ``cohort_size`` clients uniformly without replacement;
        ``size_weighted``: with probability ∝ the client's number of rows (successive draws);
        ``poisson``: each client independently with q = ``cohort_size`` / ``num_clients``
        (a cohort of ``cohort_size`` on average; what DP's Poisson accounting assumes).
    cohort_size:
        Clients per round (|S_t|), or all online clients when fewer are online.
    availability:
        ``always``, or ``diurnal``: client k is online ``diurnal_on`` of every
        ``diurnal_period``-round day at its own seeded phase; only online clients are sampled.
    diurnal_period, diurnal_on:
        ``diurnal`` availability: the length of a client's day in rounds, and the share of it
        the client is online.
    dropout:
        Probability that a sampled client drops out of the round (keyed by seed, round, client).
    tier_speeds, tier_shares, tier_upload_mbps:
        Device tiers: relative compute speed, share of the clients (seeded assignment) and
        upload bandwidth of each tier.
    step_seconds:
        Simulated compute time of one local step at speed 1.
    time_budget:
        Seconds of compute per round: a client runs min(local_steps, ⌊budget · speed /
        step_seconds⌋) steps (at least one). Null: every client runs ``local_steps``.
    deadline:
        Seconds after which the server stops waiting: slower clients (compute + upload) are
        stragglers, dropped from the round. Null: no deadline. Each round's simulated time
        (the slowest reporting client, or the deadline) is ``sim_seconds`` in metrics.jsonl.
    noisy_clients:
        Low-quality silos: the share of clients that are noisy; 0 = none. round(share ×
        ``num_clients``) clients, one from each band of clients by size, picked so that the
        noisy silos hold ≈ share of the rows on every seed (``fedsim.scenarios.silos.
        noisy_set``). Synthetic scenes only.
    caption_noise:
        Share of each noisy client's rows (each row drawn on its own, keyed by seed, client
        and row) whose caption is replaced by a wrong but well-formed one (count, size,
        colour, shape and position all redrawn to values other than the scene's) and whose
        yes/no answer is flipped.
    caption_styles:
        Silo styles: number of caption styles among the clients (1 = off). Styles are dealt
        largest client first, each to the style holding the fewest rows so far, so every style
        holds ≈ 1/styles of the rows (``fedsim.scenarios.silos.client_styles``); style 0 is
        the canonical caption, the others reorder its words
        (``fedsim.data.synthetic.CAPTION_STYLES``).
        Synthetic scenes only. The transforms change what clients train on, never the
        evaluation data (``fedsim.scenarios.silos``).
    """

    name: str = "toy-iid"
    num_clients: int = 20
    partition: Literal["iid", "dirichlet", "domain"] = "iid"
    label: str = "shape"
    dirichlet_alpha: float = 0.3
    quantity_skew: float = 0.0
    participation: Literal["uniform", "size_weighted", "poisson"] = "uniform"
    cohort_size: int = 10
    availability: Literal["always", "diurnal"] = "always"
    diurnal_period: int = 24
    diurnal_on: float = 0.5
    dropout: float = 0.0
    tier_speeds: tuple[float, ...] = (1.0,)
    tier_shares: tuple[float, ...] = (1.0,)
    tier_upload_mbps: tuple[float, ...] = (100.0,)
    step_seconds: float = 0.05
    time_budget: float | None = None
    deadline: float | None = None
    noisy_clients: float = 0.0
    caption_noise: float = 0.0
    caption_styles: int = 1

    def __post_init__(self) -> None:
        _positive(
            "scenario", num_clients=self.num_clients, cohort_size=self.cohort_size
        )
        for name in ("noisy_clients", "caption_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"scenario.{name}: must be in [0, 1], got {value!r}")
        if not 1 <= self.caption_styles <= len(CAPTION_STYLES):
            raise ConfigError(
                f"scenario.caption_styles: must be in 1..{len(CAPTION_STYLES)} (the styles of "
                f"fedsim.data.synthetic.CAPTION_STYLES), got {self.caption_styles!r}"
            )
        _positive(
            "scenario",
            diurnal_period=self.diurnal_period,
            diurnal_on=self.diurnal_on,
            step_seconds=self.step_seconds,
            **{f"tier_speeds[{i}]": v for i, v in enumerate(self.tier_speeds)},
            **{
                f"tier_upload_mbps[{i}]": v for i, v in enumerate(self.tier_upload_mbps)
            },
        )
        if self.time_budget is not None:
            _positive("scenario", time_budget=self.time_budget)
        if self.deadline is not None:
            _positive("scenario", deadline=self.deadline)
        if self.diurnal_on > 1:
            raise ConfigError(
                f"scenario.diurnal_on: must be in (0, 1], got {self.diurnal_on!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"scenario.dropout: must be in [0, 1), got {self.dropout!r}"
            )
        n = len(self.tier_speeds)
        if not n or len(self.tier_shares) != n or len(self.tier_upload_mbps) != n:
            raise ConfigError(
                "scenario.tier_speeds, tier_shares, tier_upload_mbps: need one value per tier "
                f"(got {n}, {len(self.tier_shares)}, {len(self.tier_upload_mbps)})"
            )
        if any(v < 0 for v in self.tier_shares) or sum(self.tier_shares) <= 0:
            raise ConfigError(
                f"scenario.tier_shares: must be >= 0 with a positive sum, got {list(self.tier_shares)}"
            )
        if self.quantity_skew < 0:
            raise ConfigError(
                f"scenario.quantity_skew: must be >= 0, got {self.quantity_skew!r}"
            )
        if self.cohort_size > self.num_clients:
            raise ConfigError(
                f"scenario.cohort_size: {self.cohort_size} is more than scenario.num_clients ({self.num_clients})"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training of the projector on each client.

    Attributes
    ----------
    local_steps:
        Optimiser steps per client per round (k).
    batch_size:
        Examples per local step.
    lr:
        Peak learning rate. The schedule runs over global progress (round and local step), not
        per round, as LLaVA's stage-1 recipe runs over its one epoch.
    warmup:
        Share of the run spent in linear warm-up.
    schedule:
        ``cosine`` (to zero after warm-up) or ``constant`` (after warm-up).
    optimizer:
        ``adamw`` (fresh state per client per round) or ``sgd``.
    weight_decay:
        Decoupled weight decay (AdamW) or L2 (SGD).
    grad_clip:
        Max global gradient norm per step; null for none.
    loss:
        ``per_example``: mean over examples of each example's token mean, so a one-word answer
        weighs as much as a caption; ``token_mean``: HF's mean over all target tokens.
    cohort_batch:
        Clients of a round trained together in one forward/backward pass of the frozen
        backbone (each with its own projector, optimiser and steps; 1 = one client at a time).
        The round's clients, ordered by predicted cost, are cut into groups of this size
        whatever the number of workers, so results do not depend on the workers. Memory grows
        with ``cohort_batch × batch_size`` examples per pass: lower it for large backbones.
    presum:
        For algorithms of the FedAvg family (``presummable``), a worker validates its group's
        updates and sends back one partial sum Σ n_k Δ_k (float64) instead of a Δ per client;
        the result equals aggregating the clients' own updates up to float64 summation order,
        which flips the last float32 bit of about 1 % of the mean's entries (and so changes a
        run's bits). Off by default: on one machine nothing crosses a network; turn it on for
        multi-node runs with large projectors.
    diagnostics:
        Measure each round's client updates on the server (:mod:`fedsim.algorithms.diagnostics`:
        oscillation of successive global steps, pairwise conflict and sign disagreement of the
        client deltas, client drift, effective rank and the energy a rank-¼ basis keeps) into the
        round record's ``diagnostics``. Costs one K × K Gram of the deltas and one Gram of each
        matrix's smaller side a round; with ``presum`` only the oscillation is seen.
    """

    local_steps: int = 8
    batch_size: int = 16
    lr: float = 3e-3
    warmup: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    loss: Literal["per_example", "token_mean"] = "per_example"
    cohort_batch: int = 5
    presum: bool = False
    diagnostics: bool = False

    def __post_init__(self) -> None:
        _positive(
            "train",
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            cohort_batch=self.cohort_batch,
        )
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"train.warmup: must be in [0, 1), got {self.warmup!r}")
        if self.weight_decay < 0:
            raise ConfigError(
                f"train.weight_decay: must be >= 0, got {self.weight_decay!r}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(
                f"train.grad_clip: must be > 0 or null, got {self.grad_clip!r}"
            )


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """The server algorithm: its registered name and its own hyper-parameters.

    In YAML the parameters sit beside the name (``algorithm: {name: fedavgm, momentum: 0.9}``);
    the algorithm's dataclass validates them.

    Attributes
    ----------
    name:
        A registered algorithm (``fedsim algorithms list``; plug-ins through entry points).
    params:
        The algorithm's own parameters, by name (``--set algorithm.<param>=<value>``).
    """

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """What happens to client updates that must not be aggregated.

    Every update is checked before aggregation: keys and shapes against the global projector,
    NaN/Inf in Δ or in what the algorithm uploads besides it, no samples, and (when set) a global
    L2 norm above ``max_update_norm``. A rejected update is logged with its client id and reason
    in ``metrics.jsonl`` and never averaged in; its client's state and own projector stay as
    they were.

    Attributes
    ----------
    max_update_norm:
        Reject an update whose ‖Δ‖₂ (all tensors together) exceeds this; null for no bound.
    on_reject:
        What the round does when an update is rejected: ``continue`` (aggregate the others),
        ``skip_round`` (keep W_t and the server state this round) or ``fail`` (stop the run
        after writing the round's record, exit code 2).
    """

    max_update_norm: float | None = None
    on_reject: Literal["continue", "skip_round", "fail"] = "continue"

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(
                f"validation.max_update_norm: must be > 0 or null, got {self.max_update_norm!r}"
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Toy evaluation with the transformers generation backend.

    Attributes
    ----------
    at_start:
        Also evaluate the initial (untrained) projector, as round 0.
    batch_size:
        Scenes per generate call.
    max_new_tokens:
        Generation budget for a caption.
    threads:
        Torch threads of the evaluator; null = all CPUs of the machine.
    benchmarks:
        Benchmarks of the toy suite (:mod:`fedsim.eval.toy_suite`: POPE, MME, MMBench and MMVP
        in their official formats, scored by the official rules) answered with the final
        projector, on the toy backbone; ``[]`` for none. Other backbones: ``fedsim eval run``.
    suite_images:
        Held-out scenes the toy suite is built from.
    backend:
        ``hf`` (transformers generate in the Evaluator actor) or ``vllm``: the Evaluator keeps
        one vLLM engine for the whole run and swaps each projector into it in place.
    vllm_python:
        Python executable of a separate environment with vLLM (and fedsim, ray) installed; the
        vLLM Evaluator runs there (Ray ``runtime_env`` ``py_executable``). Null: this one.
    vllm_gpus:
        GPUs the vLLM Evaluator reserves (0 on CPU builds of vLLM).
    vllm_args:
        Extra ``vllm.LLM`` engine arguments (``gpu_memory_utilization``, ``max_model_len``, ...).
    """

    at_start: bool = True
    batch_size: int = 100
    max_new_tokens: int = 12
    threads: int | None = None
    benchmarks: tuple[str, ...] = ("pope", "mme", "mmbench", "mmvp")
    suite_images: int = 40
    backend: Literal["hf", "vllm"] = "hf"
    vllm_python: str | None = None
    vllm_gpus: float = 0.0
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(
            "eval", batch_size=self.batch_size, max_new_tokens=self.max_new_tokens
        )
        if self.threads is not None:
            _positive("eval", threads=self.threads)
        _positive("eval", suite_images=self.suite_images)
        if self.vllm_gpus < 0:
            raise ConfigError(f"eval.vllm_gpus: must be >= 0, got {self.vllm_gpus!r}")
        if self.vllm_python is not None and not Path(self.vllm_python).exists():
            raise ConfigError(
                f"eval.vllm_python: {self.vllm_python!r} does not exist (a Python executable "
                "of an environment with vLLM)"
            )

        for name in self.benchmarks:
            try:
                key = canonical(name)
            except BenchmarkError as e:
                raise ConfigError(f"eval.benchmarks: {e}") from None
            if key not in TOY_SUITE:
                raise ConfigError(
                    f"eval.benchmarks: {name!r} has no toy version (the toy suite has "
                    f"{', '.join(TOY_SUITE)}); score it with `fedsim eval run`"
                )


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where and how the Ray actors run.

    Attributes
    ----------
    address:
        null: start a local Ray; ``auto`` or ``ray://host:port``: join an existing cluster.
    workers:
        BackboneWorker actors, each holding one resident copy of the frozen backbone.
    worker_cpus, worker_gpus:
        Ray resources reserved per worker (fractions allowed).
    threads_per_worker:
        Torch intra-op threads per worker. Part of the result: keep it fixed to compare runs bit
        for bit (results do not depend on ``workers``).
    placement:
        ``pack`` (Ray's default: fill a node before the next) or ``spread`` (workers over as
        many nodes as possible).
    worker_resources:
        Custom Ray resources each worker asks for (e.g. ``{gpu_pool: 1}`` to keep workers on
        the nodes started with that resource).
    evaluator_cpus, evaluator_gpus, evaluator_resources:
        What the (transformers) Evaluator reserves, e.g. ``evaluator_gpus: 1`` for a GPU of
        its own or ``evaluator_resources: {fedsim_evaluator: 1}`` for a labelled node. The vLLM
        Evaluator reserves ``eval.vllm_gpus``.
    aggregator_gpus:
        GPUs the Aggregator actor reserves (0: it runs on the CPU; at most 1, it uses one
        device). With a GPU, each round's updates are moved there once, the algorithm's server
        half and its state stay there, and only the new weights (and the server state, for a
        checkpoint) come back to the host. The Aggregator runs on the driver's node, so that
        node must have the GPU; a request no node can meet is refused before any actor starts.
    dashboard:
        Start the Ray dashboard (local Ray only), bound to ``dashboard_host``.
    dashboard_host:
        The interface the dashboard listens on (loopback unless you change it).
    task_retries:
        How often one group of client tasks is sent again after the worker (or node) running it
        died; each retry goes to a live worker, and a replacement worker is started. A group's
        result depends only on its tasks, so retries do not change the run's result.
    evaluator_on_worker:
        Where a federated run's (transformers) Evaluator lives. ``on``: inside BackboneWorker 0,
        which then also evaluates between its client tasks: one process less (each holds its
        own torch, transformers and data, ~0.5 GB, and starts in seconds on a small machine).
        ``off``: an actor of its own. ``auto`` (the default): ``on`` on a small machine — a
        local Ray on at most 4 CPUs, the Evaluator asking for no CPU, GPU or custom resource
        of its own — else ``off``. The evaluation loads its own copy of the backbone and runs
        with ``eval.threads`` threads, training with ``ray.threads_per_worker``, as on separate
        actors: the results are the same bits either way. Centralized runs and the vLLM
        backend always use an Evaluator of their own.
    aggregator_in_driver:
        Where a federated run's Aggregator lives. ``on``: inside the driver process, which
        already holds torch and the round's updates: one process less (~0.4 GB). ``off``: an
        actor of its own, on the driver's node. ``auto`` (the default): ``on`` on a small
        machine — a local Ray on at most 4 CPUs, ``aggregator_gpus`` 0 — else ``off``. Either
        way the server half runs on the threads an actor gets (``OMP_NUM_THREADS``, else 1)
        and gets copies of its inputs: the results are the same bits.
    """

    address: str | None = None
    workers: int = 2
    worker_cpus: float = 0.5
    worker_gpus: float = 0.0
    threads_per_worker: int = 1
    placement: Literal["pack", "spread"] = "pack"
    worker_resources: dict[str, float] = field(default_factory=dict)
    evaluator_cpus: float = 0.0
    evaluator_gpus: float = 0.0
    evaluator_resources: dict[str, float] = field(default_factory=dict)
    aggregator_gpus: float = 0.0
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    task_retries: int = 3
    evaluator_on_worker: Literal["auto", "on", "off"] = "auto"
    aggregator_in_driver: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        _positive(
            "ray", workers=self.workers, threads_per_worker=self.threads_per_worker
        )
        if self.task_retries < 0:
            raise ConfigError(
                f"ray.task_retries: must be >= 0, got {self.task_retries!r}"
            )
        if self.worker_cpus < 0 or self.worker_gpus < 0:
            raise ConfigError("ray.worker_cpus / ray.worker_gpus: must be >= 0")
        if self.evaluator_cpus < 0 or self.evaluator_gpus < 0:
            raise ConfigError("ray.evaluator_cpus / ray.evaluator_gpus: must be >= 0")
        if not 0.0 <= self.aggregator_gpus <= 1.0:
            raise ConfigError(
                f"ray.aggregator_gpus: must be in [0, 1] (the Aggregator uses one device), "
                f"got {self.aggregator_gpus!r}"
            )
        for name in ("worker_resources", "evaluator_resources"):
            for k, v in getattr(self, name).items():
                if not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(
                        f"ray.{name}.{k}: must be a number >= 0, got {v!r}"
                    )


#: The tracker backends ``tracking.backends`` may name, and the package each needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where each round's record is streamed besides ``metrics.jsonl`` (fedsim.tracking).

    Trackers never change a run: ``metrics.jsonl`` stays the source of truth, a tracker that
    fails gives one warning and the run goes on without it, and ``tracking.*`` may change on
    ``--resume``.

    Attributes
    ----------
    backends:
        Trackers to stream to: ``tensorboard`` (event files in ``<run>/tracking/tensorboard``),
        ``mlflow`` (one MLflow run per fedsim run), ``wandb`` (Weights & Biases, offline, in
        ``<run>/tracking/wandb``); empty = none. Each is an optional extra:
        ``pip install fedsim[tensorboard]``, ``fedsim[mlflow]``, ``fedsim[wandb]``.
    mlflow_uri:
        MLflow tracking URI (``http://host:5000``, ``https://…`` or ``file:/path``); null = a
        local file store in ``<run>/tracking/mlruns`` (``fedsim compare``: in the comparison's
        folder, one experiment for all its runs).
    """

    backends: tuple[str, ...] = ()
    mlflow_uri: str | None = None

    def __post_init__(self) -> None:
        import importlib.util

        for i, name in enumerate(self.backends):
            if name in self.backends[:i]:
                raise ConfigError(f"tracking.backends: {name!r} is listed twice")
            if name not in TRACKERS:
                raise ConfigError(
                    f"tracking.backends: {name!r} is not one of {', '.join(TRACKERS)}"
                )
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise ConfigError(
                    f"tracking.backends: {name!r} needs its package: "
                    f"pip install 'fedsim[{name}]'"
                )
        uri = self.mlflow_uri
        if uri is not None and not re.match(r"(https?://[^/\s]+|file:)", uri):
            raise ConfigError(
                f"tracking.mlflow_uri: {uri!r} is not an http(s):// or file: URI"
            )


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run.

    Attributes
    ----------
    seed:
        Every random draw comes from a private generator keyed by (seed, round, client, purpose).
    rounds:
        Federated rounds (T).
    eval_every:
        Evaluate every this many rounds (and after the last); 0 = only at the end.
    cache_dir:
        Where built backbones and datasets are cached; null = $FEDSIM_CACHE or ~/.cache/fedsim.
    checkpoint_every:
        Write a round checkpoint (global projector, server state, client states, data cursors,
        simulated clock) to ``<run>/checkpoints/round-<r>/`` every this many rounds; 0 = none.
        ``fedsim run --resume <run>`` continues from the newest one to the same bits.
    checkpoint_keep:
        Keep the newest this many checkpoints (older ones are removed after a new one is in
        place).
    """

    seed: int = 0
    rounds: int = 25
    eval_every: int = 5
    cache_dir: str | None = None
    checkpoint_every: int = 5
    checkpoint_keep: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"rounds: must be > 0, got {self.rounds!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: must be >= 0, got {self.eval_every!r}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"checkpoint_every: must be >= 0, got {self.checkpoint_every!r}"
            )
        if self.checkpoint_keep < 1:
            raise ConfigError(
                f"checkpoint_keep: must be >= 1, got {self.checkpoint_keep!r}"
            )
        sc = self.scenario
        if self.data.corpora and (sc.noisy_clients > 0 or sc.caption_styles > 1):
            field = "noisy_clients" if sc.noisy_clients > 0 else "caption_styles"
            raise ConfigError(
                f"scenario.{field}: caption transforms need the synthetic scenes' attribute "
                "columns; data.corpora is set"
            )


def _normalise_algorithm(data: dict[str, Any]) -> dict[str, Any]:
    """``algorithm: {name: x, k: v}`` → ``{name: x, params: {k: v}}`` (params validated later)."""
    algo = data.get("algorithm")
    if isinstance(algo, dict):
        params = algo.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"algorithm.params: {params!r} is not a mapping")
        params = dict(params)
        params.update({k: v for k, v in algo.items() if k not in ("name", "params")})
        data["algorithm"] = {"name": algo.get("name", "fedavg"), "params": params}
    return data


def resolve_config_source(source: str | None) -> dict[str, Any]:
    """The YAML data of ``--config``: a file path, or the name of a preset in fedsim.scenarios."""
    if source is None:
        return {}
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_yaml(path)

    return read_yaml(preset_path(source))


def load_config(
    source: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults ← ``source`` (file or preset name) ← ``overrides`` → a validated :class:`Config`.

    The algorithm's own parameters are checked against its registered dataclass here too, so
    every field is validated before any work starts.
    """
    data = merge({}, resolve_config_source(source))
    data = apply_overrides(data, list(overrides or []))
    data = _normalise_algorithm(data)
    cfg = from_dict(Config, data)
    # Imported here, not at the top: the algorithms load torch (about 2 s), which the CLI's
    # start-up (`fedsim --help`, `fedsim scenarios list`) must not pay.
    from fedsim.algorithms import build_algorithm
    from fedsim.privacy.plan import check_privacy

    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    check_privacy(cfg, type(algorithm))
    return cfg


def config_to_yaml_data(cfg: Config) -> dict[str, Any]:
    """The resolved config as YAML data, algorithm parameters beside its name."""
    data = to_dict(cfg)
    algo = data.pop("algorithm")
    data["algorithm"] = {"name": algo["name"], **algo["params"]}
    return data
