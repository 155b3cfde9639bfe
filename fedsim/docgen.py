"""The generated pages of the documentation site: config, CLI, metrics and benchmark references.

The site's Markdown pages hold markers, ``<!-- fedsim:NAME -->``, which :func:`render` replaces
with tables made from the code itself when ``mkdocs build`` runs (``scripts/mkdocs_hooks.py``):
the config reference from the typed dataclass fields of :class:`fedsim.config.Config` and their
numpy-style docstrings, the CLI reference from the typer app, the ``metrics.jsonl`` schema from
:mod:`fedsim.records`, and the benchmark figures from the ``bench.json`` files in ``docs/bench/``.
Nothing in these pages is typed by hand, so they cannot drift from the code (``tests/test_docs.py``).
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsim.config import Config
from fedsim.records import reference_markdown

MARKER = re.compile(r"<!-- fedsim:([a-z]+) -->")


def render(markdown: str, generators: dict[str, Callable[[], str]]) -> str:
    """``markdown`` with every ``<!-- fedsim:NAME -->`` replaced by ``generators[NAME]()``.

    An unknown name is an error naming it, so a typo in a page fails the (strict) build.
    """

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in generators:
            raise KeyError(
                f"docs marker fedsim:{name}: unknown (known: {sorted(generators)})"
            )
        return generators[name]()

    return MARKER.sub(one, markdown)


def default_generators(
    bench_dir: Path, cli: Any = None
) -> dict[str, Callable[[], str]]:
    """The generators of the site: ``cli`` is the click command of the typer app, or None."""
    gens: dict[str, Callable[[], str]] = {
        "metrics": reference_markdown,
        "config": config_reference,
        "bench": lambda: bench_reference(bench_dir),
        "benchsummary": lambda: bench_summary(bench_dir),
    }
    if cli is not None:
        gens["cli"] = lambda: cli_reference(cli)
    return gens


# --- the config reference -------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name → its description in the class docstring's numpy ``Attributes`` section.

    An entry may name several fields (``shapes, colours, sizes:``); they share its text.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.split("Attributes\n----------\n", 1)
    if len(lines) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in lines[1].splitlines():
        head = re.fullmatch(r"([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*):\s*", line)
        if head:
            names = head.group(1).split(", ")
            for n in names:
                out[n] = ""
        elif line.startswith(" ") and names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def _summary(cls: type) -> str:
    """The class docstring before its ``Attributes`` section, as one paragraph per block."""
    doc = inspect.getdoc(cls) or ""
    text = doc.split("Attributes\n----------", 1)[0].strip()
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def _nested(hint: Any) -> type | None:
    """The config dataclass inside a field's type (``SceneSpec``, ``tuple[CorpusSpec, ...]``)."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def config_sections(
    cls: type = Config, prefix: str = ""
) -> Iterator[tuple[str, type, list[dataclasses.Field[Any]]]]:
    """(dotted section name, dataclass, its fields) for the config and every nested section."""
    hints = typing.get_type_hints(cls)
    yield prefix, cls, list(dataclasses.fields(cls))
    for f in dataclasses.fields(cls):
        inner = _nested(hints[f.name])
        if inner is not None:
            many = typing.get_origin(hints[f.name]) is tuple
            yield from config_sections(
                inner, f"{prefix}{f.name}{'[]' if many else ''}."
            )


def section_doc(cls: type, name: str) -> str:
    """A nested section's description: the first line of its class docstring."""
    inner = _nested(typing.get_type_hints(cls)[name])
    return _summary(inner).split("\n")[0] if inner is not None else ""


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section below)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _code(text: str) -> str:
    """Inline code that survives a Markdown table cell (a ``|`` inside a code span would not)."""
    return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"


def _cell(text: str) -> str:
    """A table cell: docstring code spans (``x`` or `x`) as HTML code, other pipes escaped."""
    parts = re.split(r"``(.+?)``|`([^`]+)`", text)
    out = []
    for i, part in enumerate(parts):
        if part is None:
            continue
        out.append(_code(part) if i % 3 else part.replace("|", "\\|"))
    return "".join(out)


def config_reference() -> str:
    """Every field of every config dataclass: one table per section, in declaration order."""
    parts = []
    for prefix, cls, fields in config_sections():
        docs = field_docs(cls)
        title = prefix.rstrip(".") or "top level"
        parts += [f"## `{title}`" if prefix else "## Top level", ""]
        parts += [f"`{cls.__module__}.{cls.__name__}`: {_summary(cls)}", ""]
        parts += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for f in fields:
            kind = (
                f.type
                if isinstance(f.type, str)
                else getattr(f.type, "__name__", str(f.type))
            )
            text = docs.get(f.name) or section_doc(cls, f.name)
            row = (
                f"`{prefix}{f.name}`",
                _code(kind),
                _cell(_default(f)),
                _cell(text) or "–",
            )
            parts.append("| " + " | ".join(row) + " |")
        parts.append("")
    return "\n".join(parts)


# --- the CLI reference ----------------------------------------------------------------------


def _commands(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(full command line name, click command) for ``cmd`` and its sub-commands, depth first."""
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name in sorted(subs):
        yield from _commands(subs[name], f"{path} {name}")


def _param_row(p: Any) -> str:
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    if p.param_type_name == "argument":
        names = f"`{(p.metavar or p.name).upper()}` (argument)"
    default = p.default if p.default not in (None, (), []) else ""
    if callable(default):
        default = ""
    default_s = f"`{default}`" if default != "" else ("required" if p.required else "")
    help_text = " ".join((getattr(p, "help", None) or "").split())
    ann = p.type_descriptor.annotation if hasattr(p, "type_descriptor") else p.type
    kind = getattr(ann, "__name__", None) if not typing.get_args(ann) else None
    kind = (
        "flag"
        if getattr(p, "is_flag", False)
        else (kind or str(ann).replace("typing.", ""))
    )
    return f"| {names} | {_code(kind)} | {_cell(default_s)} | {_cell(help_text)} |"


def cli_reference(root: Any, name: str = "fedsim") -> str:
    """Every command of the click command ``root`` (typer's ``get_command(app)``) with its
    options: the help text, then one row per parameter (names, type, default, help)."""
    parts = []
    for path, cmd in _commands(root, name):
        parts += [f"## `{path}`", ""]
        if cmd.help:
            parts += [inspect.cleandoc(cmd.help), ""]
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            parts += ["| option | type | default | help |", "|---|---|---|---|"]
            parts += [_param_row(p) for p in params]
            parts.append("")
    return "\n".join(parts)


# --- the benchmark pages --------------------------------------------------------------------


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}".replace(",", " ")


def _bench_training(t: dict[str, Any]) -> list[str]:
    w = t["workload"]
    rows = [
        f"Workload: {w['clients']} clients × {w['steps']} local steps × batch {w['batch']}.",
        "",
        "| way | seconds | client updates/s | vs one at a time |",
        "|---|---:|---:|---:|",
    ]
    for way, r in t["ways"].items():
        rows.append(
            f"| {way} | {r['seconds']:.3f} | {r['client_updates_per_s']:.1f} | "
            f"{r['speedup_vs_one_at_a_time']:.2f}× |"
        )
    rows += [
        "",
        f"Projector swap {t['swap_seconds'] * 1e3:.2f} ms against a local step of "
        f"{t['local_step_seconds'] * 1e3:.1f} ms ({t['swap_share_of_step'] * 100:.2f} %); "
        f"cohort deltas against one at a time, max relative difference "
        f"{t['cohort_max_relative_difference']:.2g}; TF32 {'on' if t.get('tf32', True) else 'off'}.",
        "",
    ]
    return rows


def _bench_aggregation(a: dict[str, Any]) -> list[str]:
    seconds = a["seconds"]
    sizes = sorted({int(n) for per in seconds.values() for n in per})
    rows = [
        f"Aggregation, ms per round (projector of {_fmt(a['projector_params'], 0)} parameters):",
        "",
        "| algorithm | " + " | ".join(f"{n} clients" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for algo in sorted(seconds):
        cells = [_fmt(seconds[algo][str(n)] * 1e3) for n in sizes]
        rows.append(f"| {algo} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def _bench_memory(m: dict[str, Any]) -> list[str]:
    peaks = m["peak_rss_mb"]
    procs = list(next(iter(peaks.values())))
    rows = [
        f"Peak resident memory (MiB), {m['cohort']} clients a round × {m['rounds']} rounds:",
        "",
        "| logical clients | " + " | ".join(procs) + " | total | ratio | seconds |",
        "|---:|" + "---:|" * (len(procs) + 3),
    ]
    for n, per in peaks.items():
        cells = [_fmt(per[p], 0) for p in procs]
        rows.append(
            f"| {n} | " + " | ".join(cells) + f" | {_fmt(sum(per.values()), 0)} | "
            f"{m['total_ratio'][n]:.3f} | {m['seconds'][n]:.0f} |"
        )
    return [*rows, ""]


def bench_reference(folder: Path) -> str:
    """One section per ``bench.json`` in ``folder``: its machine, then its training,
    aggregation and memory tables (whichever sections the file holds)."""
    parts = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if "machine" not in data:  # not a bench.json (e.g. device notes a page cites)
            continue
        mach = data["machine"]
        where = mach.get("gpu") or f"{mach['cpus']} CPU cores"
        parts += [f"## `{path.name}`", ""]
        parts += [f"{where}, torch {mach['torch']}, Python {mach['python']}.", ""]
        if data.get("training"):
            parts += _bench_training(data["training"])
        if data.get("aggregation"):
            parts += _bench_aggregation(data["aggregation"])
        if data.get("memory"):
            parts += _bench_memory(data["memory"])
    return "\n".join(parts)


def bench_summary(folder: Path) -> str:
    """The headline table: one column per ``bench.json`` with a training section."""
    cols = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("training"):
            cols.append((path.stem, data["machine"], data["training"]))
    rows = [
        "| | " + " | ".join(f"`{name}`" for name, _, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]

    def row(label: str, cell: Callable[[dict[str, Any], dict[str, Any]], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(m, t) for _, m, t in cols) + " |")

    def ways(t: dict[str, Any]) -> list[dict[str, Any]]:
        return list(t["ways"].values())  # one at a time, cohort batching, fresh model

    row(
        "machine",
        lambda m, t: (
            f"{m.get('gpu') or str(m['cpus']) + ' CPU cores'}, torch {m['torch']}"
        ),
    )
    row(
        "workload",
        lambda m, t: "{clients} clients × {steps} steps × batch {batch}".format(
            **t["workload"]
        ),
    )
    row(
        "cohort batching vs one client at a time",
        lambda m, t: (
            f"**{ways(t)[1]['speedup_vs_one_at_a_time']:.2f}×** "
            f"({ways(t)[0]['client_updates_per_s']:.1f} → {ways(t)[1]['client_updates_per_s']:.1f}"
            " client updates/s)"
        ),
    )
    row(
        "resident backbone vs a fresh model per task",
        lambda m, t: (
            f"**{ways(t)[0]['client_updates_per_s'] / ways(t)[2]['client_updates_per_s']:.2f}×** "
            f"({ways(t)[2]['client_updates_per_s']:.1f} → {ways(t)[0]['client_updates_per_s']:.1f})"
        ),
    )
    row(
        "projector swap, share of a local step",
        lambda m, t: (
            f"**{t['swap_share_of_step'] * 100:.2f} %** ({t['swap_seconds'] * 1e3:.2f} ms"
            f" of {t['local_step_seconds'] * 1e3:.1f} ms)"
        ),
    )
    row(
        "cohort deltas vs one at a time (max relative)",
        lambda m, t: f"{t['cohort_max_relative_difference']:.2g}",
    )
    row("TF32", lambda m, t: "on" if t.get("tf32", True) else "off")
    return "\n".join(rows)
