"""The ``fedsim`` command line (typer). Bad input is a one-line error and exit code 2."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

# Before transformers is imported anywhere (Ray workers inherit the environment).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before Ray is imported (its log deduplicator reads it then): Ray Train's controller logs, at
# error level from its C++ core, that its PreemptionWatcher actor has constructor arguments in
# the object store and may restart (ray-project/ray#53727): harmless for fedsim, which never
# relies on that actor's restarts, and printed once per centralized run. Ray's own switch
# (RAY_DEDUP_LOGS_SKIP_REGEX) drops that line only; a value the user set is kept.
os.environ.setdefault(
    "RAY_DEDUP_LOGS_SKIP_REGEX", r"class name: 'PreemptionWatcher'.*max_restarts > 0"
)

from fedsim.configtools import ConfigError  # noqa: E402
from fedsim.startup import mark  # noqa: E402

app = typer.Typer(
    help="fedsim: simulate federated pre-training (modality alignment) of multimodal LLMs on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
backbones_app = typer.Typer(
    help="Build and inspect frozen backbones.", no_args_is_help=True
)
algorithms_app = typer.Typer(help="Federated algorithms.", no_args_is_help=True)
scenarios_app = typer.Typer(help="Scenario presets.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
app.add_typer(algorithms_app, name="algorithms")
app.add_typer(scenarios_app, name="scenarios")
from fedsim.cli_eval import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    """One line on stderr (the message printed as it is, never read as markup), exit code 2."""
    from rich.markup import escape

    err_console.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            "-c",
            help="YAML file or scenario preset name (default: toy-iid).",
        ),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            "-s",
            help="Override a config field: key.sub=value (YAML value). Repeatable.",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Run folder (default: runs/<timestamp>/)."),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-w", help="BackboneWorker actors (ray.workers)."),
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option(
            "--address", help="Join an existing Ray cluster: 'auto' or ray://host:port."
        ),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="No live progress display.")
    ] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            "--resume",
            help="Go on with the interrupted run in this folder from its newest checkpoint "
            "(its own config.yaml; --set may change only cache_dir and ray.* but "
            "ray.threads_per_worker). Without a checkpoint it starts again from round 1.",
        ),
    ] = None,
) -> None:
    """Train the projector federatedly and evaluate it; writes config, metrics, weights and reports."""
    mark("cli")
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.config import load_config
    from fedsim.runio import default_run_dir

    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"ray.workers={workers}")
    if address is not None:
        overrides.append(f"ray.address={address}")
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.driver import run as run_driver
    from fedsim.models.backbone import BackboneError
    from fedsim.runio import RunError

    mark("imports")
    if resume is not None:
        if config is not None or (out is not None and out != resume):
            _fail(
                "--resume takes the run's own config.yaml and folder: drop --config/--out"
            )
        _resume(resume, overrides, not no_progress)
        return
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
        return
    out = out or default_run_dir()
    try:
        run_driver(cfg, out, console=console, show_progress=not no_progress)
    except (ConfigError, BackboneError, RunError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _interrupted(out)


def _resume(run_dir: Path, overrides: list[str], show_progress: bool) -> None:
    """``fedsim run --resume``: go on with the run in ``run_dir`` from its newest checkpoint."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.driver import resume_run
    from fedsim.models.backbone import BackboneError
    from fedsim.runio import RunError

    try:
        resume_run(run_dir, overrides, console, show_progress=show_progress)
    except (ConfigError, BackboneError, RunError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _interrupted(run_dir)


def _interrupted(run_dir: Path) -> None:
    """Ctrl-C: one line saying where the run stands and how to go on; exit code 130."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    where = (
        f"; go on from {found.name} with: fedsim run --resume {run_dir}"
        if found
        else "; no checkpoint yet"
    )
    err_console.print(f"interrupted{where}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=130)


@app.command()
def compare(
    algorithms: Annotated[
        str,
        typer.Option(
            "--algorithms",
            "-a",
            help="Comma-separated algorithm names, or 'all' (every algorithm but ablations).",
        ),
    ],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    config: Annotated[
        Optional[str],
        typer.Option("--config", "-c", help="YAML file or scenario preset name."),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Config override key=value (all runs)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Comparison folder.")] = Path(
        "runs/compare"
    ),
    lanes: Annotated[
        Optional[int],
        typer.Option(
            "--lanes",
            help="Runs at a time, each on its own one-worker actor pool (default 1).",
        ),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="No live progress display.")
    ] = False,
) -> None:
    """Run several algorithms on the same scenario and seeds; write a mean ± std table and plots."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.algorithms.registry import comparable
    from fedsim.compare import compare as run_compare
    from fedsim.models.backbone import BackboneError

    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    if names == ["all"]:
        names = comparable()
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers")
        return
    if not names or not seed_list:
        _fail("--algorithms and --seeds must each name at least one")
    if len(set(names)) != len(names):
        _fail(f"--algorithms {algorithms!r}: an algorithm is named twice")
    try:
        run_compare(
            names,
            seed_list,
            out,
            config,
            list(set_ or []),
            console,
            not no_progress,
            lanes,
        )
    except (ConfigError, BackboneError) as e:
        _fail(str(e))


@app.command()
def sweep(
    spec: Annotated[
        Path,
        typer.Argument(
            help="Sweep spec (YAML): config, set, budget, select_seeds, test_seeds, metric, "
            "reference, algorithms: {label: {algorithm, params, grid}}."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder.")] = Path(
        "runs/sweep"
    ),
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="No live progress display.")
    ] = False,
) -> None:
    """Tune every algorithm with the same budget on the validation split, then compare the
    selected settings over the test seeds: mean ± std, paired 95 % CIs, plots."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.models.backbone import BackboneError
    from fedsim.sweep import load_spec
    from fedsim.sweep import sweep as run_sweep

    try:
        run_sweep(load_spec(spec), out, console, not no_progress)
    except (ConfigError, BackboneError) as e:
        _fail(str(e))


@app.command()
def plot(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders to draw, one line each.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "curves.png"
    ),
    labels: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated line labels (default: folder names)."),
    ] = None,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
) -> None:
    """Plot training loss and held-out metrics against the round for one or more runs."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.plots import plot_runs

    for r in runs:
        if not (r / "metrics.jsonl").exists():
            _fail(f"plot: {str(r)!r} has no metrics.jsonl (not a run folder)")
    try:
        path = plot_runs(runs, out, labels.split(",") if labels else None, title)
    except ValueError as e:
        _fail(str(e))
        return
    console.print(f"wrote {path}")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        _fail(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


def _bench_sections(text: str) -> tuple[str, ...]:
    """``--sections``: some of the bench sections, comma-separated."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.bench import SECTIONS

    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in chosen if x not in SECTIONS]
    if bad or not chosen:
        _fail(f"--sections {text!r}: use some of {', '.join(SECTIONS)}")
    return chosen


def _agg_limit_sizes(text: str) -> tuple[str, ...]:
    """``--agg-limit-sizes``: some of toy, 7b."""
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    if not chosen or any(x not in ("toy", "7b") for x in chosen):
        _fail(f"--agg-limit-sizes {text!r}: use toy, 7b or toy,7b")
    return chosen


def _check_positive(**flags: int) -> None:
    """Each flag (``memory_cohort`` is ``--memory-cohort``) at least 1, checked in order."""
    for name, value in flags.items():
        if value < 1:
            _fail(f"--{name.replace('_', '-')} {value}: must be >= 1")


def _check_bench(s: Any) -> None:
    """The bench flags that depend on each other (one-line errors, exit code 2)."""
    if s.device != "cpu" and not s.device.startswith("cuda"):
        _fail(f"--device {s.device!r}: use cpu or cuda")
    if "memory" in s.sections and s.memory_cohort > min(s.memory_clients):
        _fail(
            f"--memory-cohort {s.memory_cohort}: more than the smallest --memory-clients "
            f"({min(s.memory_clients)})"
        )


@dataclass(frozen=True)
class BenchFlags:
    """``fedsim bench``'s flags as typed (strings for the comma-separated lists)."""

    sections: str
    clients: int
    steps: int
    batch: int
    repeats: int
    device: str
    threads: int
    tf32: bool
    cohort_sizes: str
    memory_clients: str
    memory_cohort: int
    memory_rounds: int
    secagg_sizes: str
    agg_limit_clients: int
    agg_limit_sizes: str
    agg_limit_power: bool


def _bench_settings(settings_type: Any, f: BenchFlags) -> Any:
    """``fedsim bench``'s flags checked and parsed into its settings."""
    sections = _bench_sections(f.sections)
    _check_positive(
        clients=f.clients,
        steps=f.steps,
        batch=f.batch,
        repeats=f.repeats,
        threads=f.threads,
        memory_cohort=f.memory_cohort,
        memory_rounds=f.memory_rounds,
        agg_limit_clients=f.agg_limit_clients,
    )
    settings = settings_type(
        clients=f.clients,
        steps=f.steps,
        batch=f.batch,
        repeats=f.repeats,
        device=f.device,
        threads=f.threads,
        tf32=f.tf32,
        cohort_sizes=_ints("--cohort-sizes", f.cohort_sizes),
        memory_clients=_ints("--memory-clients", f.memory_clients),
        memory_cohort=f.memory_cohort,
        memory_rounds=f.memory_rounds,
        secagg_sizes=_ints("--secagg-sizes", f.secagg_sizes),
        agg_limit_clients=f.agg_limit_clients,
        agg_limit_sizes=_agg_limit_sizes(f.agg_limit_sizes),
        agg_limit_power=f.agg_limit_power,
        sections=sections,
    )
    _check_bench(settings)
    return settings


_SECTIONS_HELP = (
    "Comma-separated: training, aggregation, memory, secagg, startup, memory-run, "
    "aggregation-limit, real-shape."
)


@app.command()
def bench(
    config: Annotated[
        Optional[str],
        typer.Option("--config", "-c", help="YAML file or scenario preset name."),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Config override key=value."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for bench.json.")
    ] = Path("runs/bench"),
    sections: Annotated[
        str,
        typer.Option(help=_SECTIONS_HELP),
    ] = "training,aggregation,memory",
    clients: Annotated[
        int, typer.Option(help="Training: clients in the workload (one cohort).")
    ] = 5,
    steps: Annotated[int, typer.Option(help="Training: local steps per client.")] = 8,
    batch: Annotated[int, typer.Option(help="Training: examples per local step.")] = 4,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
    device: Annotated[
        str, typer.Option(help="Training: cpu or cuda (the backbone's device).")
    ] = "cpu",
    threads: Annotated[int, typer.Option(help="Training: torch threads.")] = 1,
    tf32: Annotated[
        bool,
        typer.Option(help="Training on CUDA: allow TF32 convolutions and matmuls."),
    ] = True,
    cohort_sizes: Annotated[
        str, typer.Option(help="Aggregation: comma-separated cohort sizes.")
    ] = "10,50,100,500",
    memory_clients: Annotated[
        str, typer.Option(help="Memory: comma-separated logical client counts.")
    ] = "10,100,1000",
    memory_cohort: Annotated[int, typer.Option(help="Memory: clients per round.")] = 10,
    memory_rounds: Annotated[int, typer.Option(help="Memory: rounds per run.")] = 3,
    secagg_sizes: Annotated[
        str, typer.Option(help="Secure aggregation: comma-separated cohort sizes.")
    ] = "5,10,20,40",
    agg_limit_clients: Annotated[
        int, typer.Option(help="Aggregation limit: client deltas per round.")
    ] = 50,
    agg_limit_sizes: Annotated[
        str, typer.Option(help="Aggregation limit: toy, 7b or toy,7b.")
    ] = "toy,7b",
    agg_limit_power: Annotated[
        bool,
        typer.Option(
            help="Aggregation limit: also time Fed-CMP's default basis at 7b."
        ),
    ] = False,
) -> None:
    """Measure client updates/s, swap time, aggregation time and memory; ratios to baselines."""
    flags = BenchFlags(
        sections=sections,
        clients=clients,
        steps=steps,
        batch=batch,
        repeats=repeats,
        device=device,
        threads=threads,
        tf32=tf32,
        cohort_sizes=cohort_sizes,
        memory_clients=memory_clients,
        memory_cohort=memory_cohort,
        memory_rounds=memory_rounds,
        secagg_sizes=secagg_sizes,
        agg_limit_clients=agg_limit_clients,
        agg_limit_sizes=agg_limit_sizes,
        agg_limit_power=agg_limit_power,
    )
    _run_bench(config, list(set_ or []), out, flags)


def _run_bench(
    config: str | None, sets: list[str], out: Path, flags: BenchFlags
) -> None:
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.bench import BenchSettings, run_bench
    from fedsim.config import load_config
    from fedsim.models.backbone import BackboneError

    settings = _bench_settings(BenchSettings, flags)
    try:
        run_bench(load_config(config, sets), settings, out, sets, console)
    except (ConfigError, BackboneError) as e:
        _fail(str(e))


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Argument(help="New folder for the LLaVA checkpoint.")],
    projector: Annotated[
        Optional[Path],
        typer.Option(
            "--projector",
            help="A projector file to export instead of the run's final one.",
        ),
    ] = None,
    client: Annotated[
        Optional[int],
        typer.Option("--client", help="A `local` run: export this client's projector."),
    ] = None,
) -> None:
    """Write the run's backbone with its projector as an HF LLaVA checkpoint (transformers, vLLM)."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.export import ExportError, export_checkpoint
    from fedsim.models.backbone import BackboneError

    try:
        path = export_checkpoint(run_dir, out, projector=projector, client=client)
    except (ExportError, ConfigError, BackboneError) as e:
        _fail(str(e))
        return
    console.print(
        f"wrote {path}: LlavaForConditionalGeneration.from_pretrained and `vllm serve` load it"
    )


def _build_toy(cache_dir: Optional[Path], force: bool, seed: Optional[int]) -> None:
    """``fedsim backbones build toy``: build from the recipe, print its metrics and gates and
    whether the weights are the shipped reference's bits."""
    # Imported on use: keeps `fedsim` start-up fast.
    import json

    import torch

    from fedsim.eval.toy import score_toy_warmup
    from fedsim.models.toy import ToyBuildConfig, ToyBuildError, build_toy_backbone
    from fedsim.models.toy_reference import REFERENCE_DIR
    from fedsim.progress import build_reporter, make_progress
    from fedsim.runio import cache_folder, file_sha256

    try:
        cache_dir = cache_folder(cache_dir, "--cache-dir")
    except ConfigError as e:
        _fail(str(e))
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with make_progress(console) as progress:
            cfg = ToyBuildConfig() if seed is None else ToyBuildConfig(seed=seed)
            path = build_toy_backbone(
                cfg,
                cache_dir=cache_dir,
                report=build_reporter(progress),
                force=force,
                score=score_toy_warmup,
            )
    except ToyBuildError as e:
        _fail(str(e))
        return
    manifest = json.loads((path / "fedsim.json").read_text())
    console.print(f"toy backbone (recipe, seed {cfg.seed}): {path}")
    for k, v in manifest.get("metrics", {}).items():
        console.print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    for k, gate in manifest.get("gates", {}).items():
        if isinstance(gate, dict) and "min" in gate:
            console.print(f"  gate {k}: {gate['value']:.3f} >= {gate['min']} passed")
    same = (
        file_sha256(path / "model.safetensors")
        == file_sha256(REFERENCE_DIR / "model.safetensors")
        if (REFERENCE_DIR / "model.safetensors").is_file()
        else False
    )
    console.print(
        "  weights: the same bits as the shipped reference"
        if same
        else "  weights: differ from the shipped reference (another seed, or this CPU's "
        "rounding); run on it with --set model.backbone=" + str(path)
    )


@backbones_app.command("build")
def backbones_build(
    kind: Annotated[
        str,
        typer.Argument(
            help="Which backbone to build: 'toy' (from its recipe) or 'llava-1.5-shape' "
            "(LLaVA-1.5-7B's widths, few layers, random weights)."
        ),
    ] = "toy",
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Cache folder (default: $FEDSIM_CACHE or ~/.cache/fedsim)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when cached.")
    ] = False,
    seed: Annotated[
        Optional[int],
        typer.Option(help="The recipe's seed (default: 2, the shipped reference's)."),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(help="llava-1.5-shape: weights stored as bf16 (default) or fp32."),
    ] = None,
) -> None:
    """Build the toy backbone from its recipe into the cache and check its skill gates.

    Runs use the shipped reference (``model.backbone: toy``); a build from the recipe is used
    with ``model.backbone: toy-recipe`` (the default seed) or by its folder's path.
    """
    if kind == "llava-1.5-shape":
        from fedsim.models.skeleton import SkeletonError, build_for_cli

        try:
            for line in build_for_cli(cache_dir, force, seed, dtype):
                console.print(line, markup=False, soft_wrap=True)
        except (SkeletonError, ConfigError) as e:
            _fail(str(e))
        return
    if kind != "toy":
        _fail(
            f"backbones build: unknown backbone {kind!r} (known: toy, llava-1.5-shape)"
        )
    if dtype is not None:
        _fail("--dtype: only for llava-1.5-shape (the toy is built in fp32)")
    _build_toy(cache_dir, force, seed)


@algorithms_app.command("list")
def algorithms_list() -> None:
    """Registered algorithms: name, paper, parameters."""
    # Imported on use: keeps `fedsim` start-up fast.
    from rich.table import Table

    from fedsim.algorithms.registry import available, parameters

    table = Table()
    table.add_column("name")
    table.add_column("paper")
    table.add_column("kind")
    table.add_column("parameters (defaults)")
    for name, cls in available().items():
        params = ", ".join(f"{k}={v}" for k, v in parameters(cls).items()) or "–"
        kind = (
            "pooled (Ray Train)"
            if cls.pooled
            else "per-client models"
            if cls.personal
            else f"ablation of {cls.ablation_of}"
            if cls.ablation_of
            else "federated"
        )
        table.add_row(name, cls.paper, kind, params)
    console.print(table)


@scenarios_app.command("list")
def scenarios_list() -> None:
    """Scenario presets shipped with fedsim: clients, partition, and what each one is."""
    # Imported on use: keeps `fedsim` start-up fast.
    from rich.table import Table

    from fedsim.configtools import read_yaml
    from fedsim.scenarios import presets

    table = Table()
    for col in ("name", "clients", "partition", "data", "what"):
        table.add_column(col)
    for name, path in presets().items():
        raw = read_yaml(path)
        sc = raw.get("scenario", {})
        part = sc.get("partition", "iid")
        if part != "iid":
            part += f" over {sc.get('label', 'shape')}"
        if sc.get("dirichlet_alpha") is not None and sc.get("partition") == "dirichlet":
            part += f" (α={sc['dirichlet_alpha']})"
        if sc.get("quantity_skew"):
            part += f", power-law sizes (a={sc['quantity_skew']})"
        if sc.get("noisy_clients") and sc.get("caption_noise"):
            part += f"; {sc['noisy_clients']:.0%} noisy silos ({sc['caption_noise']:.0%} of rows)"
        if (sc.get("caption_styles") or 1) > 1:
            part += f"; {sc['caption_styles']} caption styles"
        corpora = raw.get("data", {}).get("corpora") or []
        data = " + ".join(c.get("format", "?") for c in corpora) or "synthetic scenes"
        lines = [
            line.lstrip("# ").strip()
            for line in path.read_text().splitlines()
            if line.startswith("#")
        ]
        what = lines[0].split(":", 1)[-1].strip() if lines else ""  # the summary line
        table.add_row(name, str(sc.get("num_clients", "?")), part, data, what)
    console.print(table)


@scenarios_app.command("show")
def scenarios_show(
    name: Annotated[str, typer.Argument(help="Preset name or YAML file.")],
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Config override key=value."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="PNG to write.")
    ] = None,
) -> None:
    """Per-client statistics of a scenario's partition: a table and a PNG of the heterogeneity,
    with each client's noisy-silo flag and caption style when the scenario transforms captions."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.config import load_config
    from fedsim.runio import check_writable
    from fedsim.scenario_stats import plot_stats, scenario_stats, stats_table

    try:
        cfg = load_config(name, list(set_ or []))
        png = out or Path(f"scenario-{cfg.scenario.name}.png")
        check_writable(png, "--out", folder=False)  # before the statistics are computed
        stats = scenario_stats(cfg)
    except ConfigError as e:
        _fail(str(e))
        return
    console.print(stats_table(stats))
    for line in stats.silos:
        console.print(line, highlight=False, soft_wrap=True)
    png = plot_stats(stats, png)
    console.print(f"wrote {png}")


def main() -> None:
    """The ``fedsim`` entry point: typer's own usage errors are one ``error:`` line too."""
    from rich.markup import escape

    def one_line(message: str) -> None:
        err_console.print(f"error: {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)

    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # unknown option, bad or missing value
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if not message:  # a group called without a command: its help was printed
            sys.exit(2)
        one_line(message)
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        sys.exit(1)
    except ConfigError as e:  # anything that escaped a command's own handling
        one_line(str(e))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
