"""What a finished run reports: summary.md, eval.json, resources.json, curves.png, the console
tables, and :class:`RunResult`, the same in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedsim.config import Config
from fedsim.data.loaders import read_info
from fedsim.eval.run import headline
from fedsim.eval.toy import ATTRIBUTES
from fedsim.machine import machine_info, machine_line
from fedsim.models.toy_reference import reference_digest
from fedsim.plots import plot_runs
from fedsim.prepare import eval_stream
from fedsim.runio import write_json, write_text

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
    table = Table(title="toy benchmark suite (official scorers), final projector")
    for col, justify in (("benchmark", "left"), ("metric", "left"), ("value", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for bench, scores in benchmarks.items():
        for label, value in headline(bench, scores):
            table.add_row(bench, label, f"{value:.3f}")
    return table


def corpus_summary(train_path: Path) -> dict[str, Any]:
    """A built corpus's rows and the images skipped as missing (empty for generated scenes)."""

    info = read_info(train_path)
    keys = ("rows", "missing_images", "missing_examples", "per_dataset")
    return {k: info[k] for k in keys if k in info}


def backbone_line(cfg: Config) -> str:
    """``model.backbone`` as the summary names it (the reference toy with its digest)."""
    if cfg.model.backbone == "toy":
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
            f"- {line}" for line in corpus.get("silos", [])
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


def privacy_lines(history: list[dict[str, Any]]) -> list[str]:
    """summary.md's privacy line: ε(δ) after the last round (runs with privacy on)."""
    last = next((r for r in reversed(history) if "epsilon" in r), None)
    if last is None:
        return []
    p = last["privacy"]
    clip = f", clip C = {p['clip']:.4g}" if "clip" in p else ""
    return [
        f"- client-level DP: ε = {last['epsilon']} at δ = {p['delta']:g} after round "
        f"{last['round']} (noise multiplier z = {p['noise_multiplier']:.4g}{clip}); it "
        "covers the projectors, not the logged training losses"
    ]


def summary_md(
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
        *privacy_lines(result.history),
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


def report_run(
    cfg: Config,
    out_dir: Path,
    console: Console,
    result: RunResult,
    wall: float,
    plot: bool,
    corpus: dict[str, Any],
) -> None:
    """summary.md, curves.png and the tables on the console, once the run is done."""
    write_text(out_dir / "summary.md", summary_md(cfg, result, wall, corpus))
    if plot:
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


def write_results(
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


def loss_text(record: dict[str, Any]) -> str:
    """The round's loss for display ("–" for a round in which no client reported)."""
    return "–" if record.get("loss") is None else f"{record['loss']:.3f}"
