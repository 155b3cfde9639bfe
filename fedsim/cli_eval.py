"""``fedsim eval score`` and ``fedsim eval run`` (registered on the main typer app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

eval_app = typer.Typer(
    help="Benchmarks: score answer files, or answer and score with a run's projector.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

JudgeURL = Annotated[
    Optional[str],
    typer.Option(
        "--judge-url",
        help="OpenAI-compatible endpoint for MM-Vet / LLaVA-Bench (e.g. http://localhost:8000/v1).",
    ),
]
JudgeModel = Annotated[
    Optional[str], typer.Option("--judge-model", help="Judge model name.")
]
Matching = Annotated[
    str,
    typer.Option(
        "--matching",
        help="MMBench/MMVP option matching: VLMEvalKit's rules as of commit a67ace50 "
        "(default) or aca64dbb (before c3371551); recorded in the scores.",
    ),
]
JudgeKeyEnv = Annotated[
    str,
    typer.Option(
        "--judge-key-env", help="Environment variable holding the judge's API key."
    ),
]
# `eval run`'s longer options.
Benchmarks = Annotated[
    str,
    typer.Option(
        "--benchmarks", "-b", help="Comma-separated: pope,mme,mmbench,seed,mmvp,..."
    ),
]
DataRoot = Annotated[
    str,
    typer.Option(
        "--data-root",
        help="Benchmark data in LLaVA's playground/data/eval layout, or 'toy' for the toy suite.",
    ),
]
RunMatching = Annotated[
    Optional[str],
    typer.Option(
        "--matching",
        help="MMBench/MMVP option matching: VLMEvalKit's rules as of commit a67ace50 "
        "or aca64dbb (before c3371551); default a67ace50, aca64dbb on the toy suite "
        "(its answers are captions); recorded in the scores.",
    ),
]
VllmArgs = Annotated[
    Optional[str],
    typer.Option(
        "--vllm-args",
        help="vllm.LLM engine arguments as a YAML mapping, over the run's eval.vllm_args "
        "(e.g. '{gpu_memory_utilization: 0.15}').",
    ),
]


def _fail(message: str) -> None:
    """One line on stderr (the message is printed as it is, never read as markup), exit 2."""
    from rich.markup import escape

    err_console.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


def _judge(url: str | None, model: str | None, key_env: str) -> Any:
    """A JudgeConfig when both URL and model are given; None otherwise (judged benches fail)."""
    if not url and not model:
        return None
    if not (url and model):
        _fail("--judge-url and --judge-model go together")
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.eval.judge import JudgeConfig

    return JudgeConfig(base_url=url, model=model, api_key_env=key_env)


def flatten(scores: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``a.b`` rows of a nested score dict, in insertion order."""
    rows: list[tuple[str, Any]] = []
    for k, v in scores.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(flatten(v, name + "."))
        else:
            rows.append((name, v))
    return rows


def _table(title: str, scores: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in flatten(scores):
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


@eval_app.command("score")
def score(
    bench: Annotated[
        str, typer.Argument(help="pope, mme, mmbench, seed, mmvp, mmvet, llava_bench")
    ],
    questions: Annotated[
        Path,
        typer.Option(
            "--questions", help="The official question file (MME: the sheets folder)."
        ),
    ],
    predictions: Annotated[
        Path,
        typer.Option(
            "--predictions",
            help="LLaVA answer file (JSON lines: question_id, text); MME: also a folder of filled sheets.",
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object.")
    ] = False,
    judge_url: JudgeURL = None,
    judge_model: JudgeModel = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    matching: Matching = "a67ace50",
) -> None:
    """Score an existing predictions file with the benchmark's official rules (no generation)."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.eval import suite
    from fedsim.eval.benchmark import BenchmarkError, check_answered
    from fedsim.eval.judge import JudgeError
    from fedsim.eval.mmbench import matching_label

    try:
        matching_label(matching)  # before any file is read
        benchmark = suite.get(bench)
        qs = benchmark.load(questions, None)
        preds = benchmark.read_predictions(predictions, qs)
        check_answered(str(predictions), qs, preds)
        options: dict[str, Any] = {"matching": matching}
        if benchmark.judged:
            options["judge"] = _judge(judge_url, judge_model, judge_key_env)
            if options["judge"] is None:
                raise BenchmarkError(
                    f"{suite.canonical(bench)}: needs an LLM judge: give --judge-url and "
                    "--judge-model (any OpenAI-compatible endpoint)"
                )
        result = benchmark.score(qs, preds, **options)
    except (BenchmarkError, JudgeError) as e:
        _fail(str(e))
        return
    if as_json:
        print(json.dumps(result))
    else:
        console.print(_table(f"{suite.canonical(bench)}: {predictions}", result))


@eval_app.command("run")
def run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    benchmarks: Benchmarks = "pope,mme,mmbench,mmvp",
    data_root: DataRoot = "toy",
    backend: Annotated[
        str, typer.Option("--backend", help="hf (transformers) or vllm.")
    ] = "hf",
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="First N questions per benchmark.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Prompts per generate call (hf).")
    ] = 32,
    projector: Annotated[
        Optional[Path],
        typer.Option(
            "--projector", help="A projector file instead of the run's final one."
        ),
    ] = None,
    client: Annotated[
        Optional[int], typer.Option("--client", help="A `local` run's client.")
    ] = None,
    judge_url: JudgeURL = None,
    judge_model: JudgeModel = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    matching: RunMatching = None,
    vllm_args: VllmArgs = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object.")
    ] = False,
) -> None:
    """Generate the run's answers to each benchmark, save them, and score them."""
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.config import ConfigError
    from fedsim.eval.benchmark import BenchmarkError
    from fedsim.evaluate import check_request
    from fedsim.export import ExportError
    from fedsim.models.backbone import BackboneError

    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir}: not a run folder (no config.yaml)")
    engine_args = _engine_args(vllm_args)
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.eval.mmbench import DEFAULT_RULES, matching_label
    from fedsim.eval.toy_suite import TOY_MATCHING

    if matching is None:
        matching = TOY_MATCHING if data_root == "toy" else DEFAULT_RULES
    names = [b for b in benchmarks.split(",") if b.strip()]
    try:
        matching_label(matching)
        judge = _judge(judge_url, judge_model, judge_key_env)
        # Names, backend, limit, judge and the projector (its shapes against the backbone's
        # config) before the data root is read or built and before the backbone loads.
        check_request(run_dir, names, backend, limit, judge, projector, client)
        root = _data_root(run_dir, data_root)
        results = _evaluate(
            run_dir,
            names,
            root,
            backend=backend,
            projector=projector,
            client=client,
            limit=limit,
            batch_size=batch_size,
            judge=judge,
            vllm_args=engine_args,
            matching=matching,
        )
    except typer.Exit:  # a RuntimeError too: already reported by _fail
        raise
    except (BenchmarkError, ExportError, ConfigError, BackboneError, RuntimeError) as e:
        _fail(str(e))
        return
    _print_results(run_dir, results, as_json)


def _engine_args(vllm_args: str | None) -> dict[str, Any]:
    """``--vllm-args``: a YAML mapping of vLLM engine arguments (empty when not given)."""
    engine_args: dict[str, Any] = {}
    if vllm_args:
        import yaml

        try:
            engine_args = yaml.safe_load(vllm_args)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            _fail(f"--vllm-args {vllm_args!r}: not valid YAML{where}")
        if not isinstance(engine_args, dict):
            _fail(f"--vllm-args: {vllm_args!r} is not a mapping")
    return engine_args


def _evaluate(
    run_dir: Path, names: list[str], root: Path, **options: Any
) -> dict[str, Any]:
    """``evaluate_run`` with a transient progress bar per benchmark (``options``: its
    keyword arguments but ``progress``)."""
    # Imported on use: keeps `fedsim` start-up fast.
    from rich.progress import Progress

    from fedsim.evaluate import evaluate_run

    with Progress(console=console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def report(bench: str, done: int, total: int) -> None:
            if bench not in tasks:
                tasks[bench] = progress.add_task(bench, total=total)
            progress.update(tasks[bench], completed=done)

        return evaluate_run(run_dir, names, root, progress=report, **options)


def _print_results(run_dir: Path, results: dict[str, Any], as_json: bool) -> None:
    """The scores: one JSON object, or a table per benchmark and where the files are."""
    if as_json:
        print(json.dumps(results))
        return
    for bench, scores in results.items():
        console.print(_table(bench, scores))
    console.print(f"answers and scores in {run_dir / 'eval'}/<benchmark>/")


def _data_root(run_dir: Path, data_root: str) -> Path:
    """``data_root``, or the toy suite (built for the run's scene spec) for ``toy``."""
    if data_root != "toy":
        path = Path(data_root)
        if not path.is_dir():
            _fail(f"--data-root: {path} is not a folder")
        return path
    # Imported on use: keeps `fedsim` start-up fast.
    from fedsim.config import is_toy, load_config
    from fedsim.eval.toy_suite import ensure_toy_suite
    from fedsim.prepare import cache_root

    cfg = load_config(str(run_dir / "config.yaml"))
    if not is_toy(cfg.model.backbone):
        _fail("--data-root toy: the toy suite is for runs on the toy backbone")
    return ensure_toy_suite(
        cache_root(cfg), cfg.data.scene, images=cfg.eval.suite_images
    )
