"""The documentation site: it builds strictly, a broken link fails it, the generated references
cover the code, the README stays short, and the quick toy commands in the pages run."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim.config as config_module
from fedsim.docgen import (
    bench_reference,
    cli_reference,
    config_reference,
    config_sections,
    field_docs,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Commands of the pages that take seconds on the toy, run as written (first words of a line).
QUICK = (
    "fedsim --help",
    "fedsim run --help",
    "fedsim scenarios list",
    "fedsim algorithms list",
)


def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": f"{BIN}:/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)


def _site_copy(tmp_path: Path) -> Path:
    """What ``mkdocs build`` reads, copied: mkdocs.yml, docs/ and the hook."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", root / "docs")
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "mkdocs_hooks.py", root / "scripts")
    shutil.copy(ROOT / "mkdocs.yml", root)
    return root


def test_the_site_builds_strictly(tmp_path):
    done = _mkdocs(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    # The generated pages hold the code's tables, not the markers.
    config_html = (
        tmp_path / "site" / "reference" / "config" / "index.html"
    ).read_text()
    assert "scenario.tier_speeds" in config_html and "fedsim:" not in config_html
    cli_html = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "fedsim eval score" in cli_html and "--resume" in cli_html
    bench_html = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "h200-gpu-b4--no-tf32" in bench_html


def test_a_broken_link_fails_the_build(tmp_path):
    root = _site_copy(tmp_path)
    page = root / "docs" / "how-to" / "export.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    done = _mkdocs(root, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr


def test_an_unknown_marker_fails_the_build(tmp_path):
    root = _site_copy(tmp_path)
    page = root / "docs" / "reference" / "cli.md"
    page.write_text(page.read_text() + "\n<!-- fedsim:nosuch -->\n")
    assert _mkdocs(root, tmp_path / "site").returncode != 0


def _config_dataclasses() -> list[type]:
    """Every dataclass the config module defines or nests (SceneSpec, CorpusSpec)."""
    found = [
        v
        for v in vars(config_module).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v)
    ]
    assert config_module.Config in found and len(found) >= 10
    return found


def test_the_config_reference_lists_every_field_with_its_doc():
    ref = config_reference()
    listed: dict[str, set[str]] = {}
    section = None
    for line in ref.splitlines():
        head = re.match(r"`fedsim\.[\w.]+\.(\w+)`: ", line)
        if head:
            section = head.group(1)
            listed.setdefault(section, set())
        row = re.match(r"\| `([\w.\[\]]+)` \| .* \| (.*) \|$", line)
        if row and section:
            listed[section].add(row.group(1).rsplit(".", 1)[-1])
            assert row.group(2).strip() not in ("", "–"), (
                f"{row.group(1)}: no description"
            )
    for cls in _config_dataclasses():
        names = {f.name for f in dataclasses.fields(cls)}
        assert listed.get(cls.__name__) == names, cls.__name__


def test_every_config_field_has_a_docstring_entry():
    nested = {prefix for prefix, _, _ in config_sections() if prefix}
    for prefix, cls, fields in config_sections():
        docs = field_docs(cls)
        for f in fields:
            if f"{prefix}{f.name}." in nested or f"{prefix}{f.name}[]." in nested:
                continue  # a section: described by its own class docstring
            assert docs.get(f.name), (
                f"{cls.__name__}.{f.name}: no entry in its docstring"
            )


def test_the_cli_reference_has_every_command():
    import typer

    from fedsim.cli import app

    ref = cli_reference(typer.main.get_command(app))
    for cmd in (
        "run",
        "compare",
        "sweep",
        "bench",
        "plot",
        "export",
        "eval run",
        "eval score",
    ):
        assert f"## `fedsim {cmd}`" in ref, cmd
    for cmd in (
        "backbones build",
        "algorithms list",
        "scenarios list",
        "scenarios show",
    ):
        assert f"## `fedsim {cmd}`" in ref, cmd


def test_the_bench_pages_come_from_every_json_file():
    ref = bench_reference(ROOT / "docs" / "bench")
    for path in (ROOT / "docs" / "bench").glob("*.json"):
        if "machine" in json.loads(path.read_text()):  # bench.json files (not notes)
            assert f"## `{path.name}`" in ref
        else:
            assert path.name not in ref
    assert "| fedcmp | 22.5 | 143.1 | 269.7 | 1 472.9 |" in ref  # cpu-2core.json, in ms


def test_render_replaces_markers_and_refuses_unknown_ones():
    assert render("a <!-- fedsim:x --> b", {"x": lambda: "X"}) == "a X b"
    with pytest.raises(KeyError, match="fedsim:y"):
        render("<!-- fedsim:y -->", {"x": lambda: "X"})


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    assert "make run" in "\n".join(lines) and "make test" in "\n".join(lines)


def _doc_commands() -> list[str]:
    """Every command line of the pages' and the README's bash blocks (continuations joined)."""
    out = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                if line and not line.startswith("#"):
                    out.append(line)
    return out


@pytest.mark.parametrize("prefix", QUICK)
def test_the_quick_documented_commands_run(prefix):
    lines = [c for c in _doc_commands() if c.startswith(prefix)]
    assert lines, f"no page shows `{prefix}`"
    for line in sorted(set(lines)):
        argv = shlex.split(line)
        done = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{line}: {done.stderr[-2000:]}"
        assert done.stdout.strip(), line


def test_every_documented_fedsim_command_exists():
    """`fedsim X [Y] --help` for each command the pages show: no page names a missing one."""
    import typer

    from fedsim.cli import app

    root = typer.main.get_command(app)
    for line in _doc_commands():
        words = shlex.split(line)
        if (
            not words
            or words[0] != "fedsim"
            or len(words) < 2
            or words[1].startswith("-")
        ):
            continue
        cmd = root.commands.get(words[1])
        assert cmd is not None, f"{line}: no command {words[1]!r}"
        if hasattr(cmd, "commands"):
            assert words[2] in cmd.commands, f"{line}: no command {words[1]} {words[2]}"
            cmd = cmd.commands[words[2]]
        known = {"--help"} | {
            o for p in cmd.params for o in [*p.opts, *p.secondary_opts]
        }
        for w in words:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"{line}: no option {w}"
