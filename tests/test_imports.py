"""fedsim's layering, read from the sources with ast (in-function imports included).

algorithms/ never imports Ray, the engine or the CLI; nothing below the CLI imports it; eval/
never imports algorithms/, scenarios/ or the engine; scenarios/ never imports the engine; no
import circle among fedsim's modules. Each rule also fails on a planted violation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.imports import circles, imports, sources, violations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mods() -> dict[str, str]:
    return sources(ROOT)


def test_the_sources_keep_every_rule(mods):
    assert "fedsim.algorithms.fedavg" in mods and "fedsim.eval.pope" in mods
    assert "fedsim.driver" in mods and "fedsim.data.rows" in mods
    assert violations(mods) == []


@pytest.mark.parametrize(
    ("module", "planted", "says"),
    [
        ("fedsim.algorithms.fedavg", "import ray", "algorithms/"),
        (
            "fedsim.algorithms.fedavg",
            "def f():\n    from fedsim.driver import run",
            "algorithms/",
        ),
        ("fedsim.training", "from fedsim.cli import app", "only the CLI"),
        ("fedsim.eval.pope", "from fedsim.scenarios import silos", "eval/"),
        ("fedsim.eval.toy", "from fedsim.algorithms.base import add", "eval/"),
        ("fedsim.eval.suite", "import fedsim.rounds", "eval/"),
        ("fedsim.scenarios.silos", "from fedsim import driver", "scenarios/"),
        ("fedsim.privacy.dp", "import ray", "privacy/"),
        ("fedsim.privacy.secagg", "from fedsim.rounds import cohorts", "privacy/"),
        # A circle through an in-function import: config is imported by the engine.
        ("fedsim.config", "def f():\n    from fedsim.rounds import cohorts", "circle"),
    ],
)
def test_a_planted_violation_is_found(mods, module, planted, says):
    bad = {**mods, module: mods[module] + "\n\n" + planted + "\n"}
    found = violations(bad)
    assert found, planted
    assert any(says in line and module in line for line in found), found


def test_relative_and_package_imports_resolve():
    known = {"fedsim.eval", "fedsim.eval.suite", "fedsim.eval.pope", "fedsim.rounds"}
    src = "from . import suite\nfrom .pope import x\nimport fedsim.rounds as r\n"
    got = {i.target for i in imports("fedsim.eval.toy", src, known)}
    assert got == {"fedsim.eval.suite", "fedsim.eval.pope", "fedsim.rounds"}
    inner = imports("fedsim.eval.toy", "def f():\n    import fedsim.rounds\n", known)
    assert [(i.target, i.in_function) for i in inner] == [("fedsim.rounds", True)]


def test_a_circle_is_shown_as_a_closed_path():
    from fedsim.imports import Import

    edges = [
        Import("a", "b", 1, False),
        Import("b", "c", 1, True),
        Import("c", "a", 1, False),
        Import("c", "d", 1, False),
    ]
    assert circles(edges, {"a", "b", "c", "d"}) == [["a", "b", "c", "a"]]
    assert circles(edges[:2] + edges[3:], {"a", "b", "c", "d"}) == []


def test_no_function_is_over_80_lines(mods):
    """Issue 19's bound on the engine's readability: every function, nested ones included."""
    import ast

    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, src in mods.items()
        for node in ast.walk(ast.parse(src))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
