"""Safe defaults: no pickle from user paths, safe YAML, a local-only Ray dashboard, a secret
judge key.

* a static scan (AST) of every source file of the package (and ``benchmarks/``) for the
  calls that unpickle, run code or load unsafe YAML;
* the Ray dashboard: off and bound to 127.0.0.1 by default (``connect_ray`` with a fake
  ``ray.init``, no Ray started);
* the judge API key: never in a repr, an error, a log line, the CLI's output or a file;
* weights: pickle files are refused by name, and the code inside them never runs.

Everything here runs in a few seconds: no model is built and no Ray is started.
"""

from __future__ import annotations

import ast
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# -- the static scan -----------------------------------------------------------------

#: Always refused wherever they are named (called, imported or passed around): each one
#: unpickles, unmarshals or evaluates its input.
FORBIDDEN = {
    "pickle.load": "unpickles",
    "pickle.loads": "unpickles",
    "pickle.Unpickler": "unpickles",
    "_pickle.load": "unpickles",
    "_pickle.loads": "unpickles",
    "_pickle.Unpickler": "unpickles",
    "cloudpickle.load": "unpickles",
    "cloudpickle.loads": "unpickles",
    "dill.load": "unpickles",
    "dill.loads": "unpickles",
    "joblib.load": "unpickles",
    "pandas.read_pickle": "unpickles",
    "shelve.open": "unpickles",
    "marshal.load": "unmarshals",
    "marshal.loads": "unmarshals",
    "yaml.load": "yaml.load (use yaml.safe_load)",
    "yaml.load_all": "yaml.load_all (use yaml.safe_load_all)",
    "yaml.full_load": "yaml.full_load (use yaml.safe_load)",
    "yaml.full_load_all": "yaml.full_load_all (use yaml.safe_load_all)",
    "yaml.unsafe_load": "yaml.unsafe_load (use yaml.safe_load)",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all (use yaml.safe_load_all)",
    "yaml.Loader": "an unsafe YAML loader",
    "yaml.FullLoader": "an unsafe YAML loader",
    "yaml.UnsafeLoader": "an unsafe YAML loader",
    "yaml.CLoader": "an unsafe YAML loader",
    "yaml.CFullLoader": "an unsafe YAML loader",
    "yaml.CUnsafeLoader": "an unsafe YAML loader",
    "os.system": "runs a shell",
    "os.popen": "runs a shell",
    "builtins.eval": "evaluates code",
    "builtins.exec": "evaluates code",
}

#: ``from_pretrained`` on these loads no weights (configs, tokenizers, processors).
NO_WEIGHTS = ("Config", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → dotted origin for every import of the module (``np`` → ``numpy``)."""
    names: dict[str, str] = {"eval": "builtins.eval", "exec": "builtins.exec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a Name / Attribute chain, its head resolved through the imports."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = aliases.get(node.id, node.id)
    return ".".join([head, *reversed(parts)])


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def scan_source(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every unsafe construct of one module."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                name = f"{node.module}.{a.name}"
                if name in FORBIDDEN:
                    hit(node, f"imports {name}: {FORBIDDEN[name]}")
        elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(
            getattr(node, "ctx", None), ast.Load
        ):
            if isinstance(node, ast.Name) and node.id not in ("eval", "exec"):
                continue  # imported names are reported at their import
            name = _dotted(node, aliases)
            if name in FORBIDDEN:
                hit(node, f"{name}: {FORBIDDEN[name]}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "trust_remote_code"
                    and not _is_false(value)
                ):
                    hit(node, "trust_remote_code set (must be absent or False)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            hit(node, "torch.load without weights_only=True")
        if name == "numpy.load":
            value = _kw(node, "allow_pickle")
            if value is not None and not _is_false(value):
                hit(node, f"{name} with allow_pickle (unpickles)")
        value = _kw(node, "trust_remote_code")
        if value is not None and not _is_false(value):
            hit(node, "trust_remote_code set (must be absent or False)")
        value = _kw(node, "shell")
        if value is not None and not _is_false(value):
            hit(node, "shell=True (runs a shell)")
        if name.endswith(".from_pretrained"):
            owner = name.rsplit(".", 2)[-2]
            if not owner.endswith(NO_WEIGHTS) and not _is_true(
                _kw(node, "use_safetensors")
            ):
                hit(node, f"{name} without use_safetensors=True (may unpickle)")
    return found


def _source_dirs() -> list[Path]:
    """The package's folders as pyproject maps them, and benchmarks/ and scripts/."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the layout as pyproject.toml has it today
        dirs = {"fedsim", "algorithms", "eval", "scenarios"}
    else:
        data = tomllib.loads((ROOT / "pyproject.toml").read_text())
        dirs = set(data["tool"]["setuptools"]["package-dir"].values())
        assert {"fedsim", "algorithms", "eval", "scenarios"} <= dirs
    return sorted(ROOT / d for d in dirs | {"benchmarks", "scripts"})


def test_scanner_catches_every_unsafe_pattern() -> None:
    bad = """
import pickle, yaml, subprocess, os
import numpy as np
import torch as T
from pickle import loads as L
from transformers import AutoModel, AutoTokenizer
T.load(p)
T.load(p, weights_only=False)
pickle.load(f)
yaml.load(s, Loader=yaml.FullLoader)
yaml.unsafe_load(s)
yaml.full_load(s)
np.load(p, allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
AutoModel.from_pretrained(p)
subprocess.run(cmd, shell=True)
os.system(cmd)
eval(text)
args = {"trust_remote_code": True}
"""
    found = scan_source(bad, "bad.py")
    lines = sorted({int(f.split(":")[1]) for f in found})
    # Every line but the plain module imports (2-4) and the transformers import (6).
    assert lines == [5, *range(7, 20)], found
    for needle in (
        "bad.py:7: torch.load without weights_only=True",
        "bad.py:8: torch.load without weights_only=True",
        "bad.py:5: imports pickle.loads",
        "bad.py:9: pickle.load",
        "bad.py:10: yaml.load",
        "bad.py:10: yaml.FullLoader",
        "bad.py:11: yaml.unsafe_load",
        "bad.py:12: yaml.full_load",
        "bad.py:13: numpy.load with allow_pickle",
        "bad.py:14: trust_remote_code",
        "bad.py:15: transformers.AutoModel.from_pretrained without use_safetensors",
        "bad.py:16: shell=True",
        "bad.py:17: os.system",
        "bad.py:18: builtins.eval",
        "bad.py:19: trust_remote_code",
    ):
        assert any(f.startswith(needle) for f in found), (needle, found)

    good = """
import torch, yaml, subprocess
import numpy as np
from transformers import AutoModel, AutoTokenizer, AutoConfig
torch.load(p, weights_only=True)
yaml.safe_load(s)
yaml.safe_load_all(s)
yaml.safe_dump(d)
np.load(p, mmap_mode="r")
np.load(p, allow_pickle=False)
AutoModel.from_pretrained(p, use_safetensors=True)
AutoTokenizer.from_pretrained(p)
AutoConfig.from_pretrained(p, trust_remote_code=False)
subprocess.run([sys.executable, "-m", "x"], check=True)
model.eval()
"""
    assert scan_source(good, "good.py") == []


def test_no_unsafe_loading_anywhere_in_the_source() -> None:
    files = [
        f
        for d in _source_dirs()
        if d.is_dir()
        for f in sorted(d.rglob("*.py"))
        if "__pycache__" not in f.parts
    ]
    # Not vacuous: the whole package is there (fedsim/, algorithms/, eval/, ...).
    assert len(files) > 40, [str(f) for f in files]
    assert ROOT / "fedsim" / "runio.py" in files
    assert ROOT / "eval" / "judge.py" in files
    found: list[str] = []
    for f in files:
        found += scan_source(f.read_text(), str(f.relative_to(ROOT)))
    assert not found, "unsafe loading or execution:\n" + "\n".join(found)


# -- YAML ----------------------------------------------------------------------------


def test_config_yaml_is_safe_loaded(tmp_path: Path) -> None:
    """A config whose YAML asks for a Python object is refused; the object is never built."""
    from fedsim.config import load_config
    from fedsim.configtools import ConfigError

    marker = tmp_path / "yaml-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"seed: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(config))
    assert not marker.exists()


# -- the Ray dashboard ---------------------------------------------------------------


def _captured_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Make ``connect_ray`` think no Ray runs and record what it would start."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    # connect_ray sets these with setdefault: pin them so the test leaves no trace.
    for var, default in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
    ):
        monkeypatch.setenv(var, os.environ.get(var, default))
    return calls


def test_ray_dashboard_is_off_and_local_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsim.config import RayConfig, load_config
    from fedsim.raystart import connect_ray

    assert RayConfig().dashboard is False
    assert RayConfig().dashboard_host == "127.0.0.1"
    cfg = load_config(None)
    assert cfg.ray.dashboard is False and cfg.ray.dashboard_host == "127.0.0.1"

    calls = _captured_init(monkeypatch)
    assert connect_ray(cfg) is True
    assert len(calls) == 1
    # Off, and even Ray's minimal API server (which runs without the dashboard)
    # binds to the loopback address only.
    assert calls[0]["include_dashboard"] is False
    assert calls[0]["dashboard_host"] == "127.0.0.1"

    calls.clear()
    assert connect_ray(load_config(None, ["ray.dashboard=true"])) is True
    assert calls[0]["include_dashboard"] is True
    assert calls[0]["dashboard_host"] == "127.0.0.1"

    # Exposed only when asked for.
    calls.clear()
    connect_ray(load_config(None, ["ray.dashboard=true", "ray.dashboard_host=0.0.0.0"]))
    assert calls[0]["dashboard_host"] == "0.0.0.0"


def test_default_ray_is_private_and_local_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ray.address: null`` is ``address="local"``: RAY_ADDRESS is never followed."""
    import ray
    from ray._private import ray_constants

    from fedsim.config import load_config
    from fedsim.raystart import connect_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.255.255.1:6379")
    seen: list[tuple[Any, bool, str | None]] = []

    def init(*a: Any, **kw: Any) -> None:
        # What Ray reads while it starts: the switch that puts its node IP on loopback.
        seen.append(
            (
                kw.get("address"),
                ray_constants.ENABLE_RAY_CLUSTER,
                os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
            )
        )

    _captured_init(monkeypatch)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    connect_ray(load_config(None))
    assert seen == [("local", False, "0")]
    # Set for ray.init only: a later ray.init(address=...) in this process is untouched.
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ

    seen.clear()
    connect_ray(load_config(None, ["ray.address=auto"]))  # joining is explicit
    assert seen == [("auto", before, None)]


# "Billion laughs": 9 ** 9 strings once the aliases are expanded.
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_is_a_one_line_error_at_once(tmp_path: Path) -> None:
    """A 403-byte "billion laughs" took 65 s and 1.4 GB in merge before it was refused."""
    import time

    from fedsim.config import load_config
    from fedsim.configtools import ConfigError

    bomb = tmp_path / "bomb.yaml"
    pad = "unknown_key: " + "x" * (403 - len(BOMB) - len("unknown_key: ") - 1) + "\n"
    bomb.write_text(
        BOMB + pad
    )  # the 403 bytes of the report, an unknown key at the end
    assert len(bomb.read_bytes()) == 403
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(str(bomb))
    assert time.perf_counter() - t0 < 1.0  # expanded, it takes a minute
    message = str(e.value)
    assert "\n" not in message
    assert "bomb.yaml" in message and "anchors and aliases" in message
    assert "line 1" in message  # the first anchor, before any alias


@pytest.mark.parametrize(
    "text",
    ["a: &x 1\nb: 2\n", "a: 1\nb: *x\n", "base: &b {lr: 0.1}\ntrain:\n  <<: *b\n"],
)
def test_any_anchor_or_alias_is_refused(tmp_path: Path, text: str) -> None:
    from fedsim.config import load_config
    from fedsim.configtools import ConfigError

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(str(tmp_path / "c.yaml"))


def test_set_value_with_an_alias_is_refused() -> None:
    from fedsim.config import load_config
    from fedsim.configtools import ConfigError

    with pytest.raises(ConfigError, match="--set .*anchors and aliases"):
        load_config(None, ["algorithm.params=[&a [1, 2], *a]"])


# -- the judge API key ---------------------------------------------------------------

KEY_ENV = "FEDSIM_TEST_SAFE_DEFAULTS_KEY"
SECRET = "sk-SAFE-DEFAULTS-do-not-leak-5be1c0de"
#: Nothing listens on the discard port: every request is refused at once.
CLOSED = "http://127.0.0.1:9/v1"


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("FEDSIM_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("FEDSIM_JUDGE_MODEL", raising=False)


def _files_holding(root: Path, text: str) -> list[Path]:
    return [
        f for f in root.rglob("*") if f.is_file() and text.encode() in f.read_bytes()
    ]


def test_judge_key_in_no_repr_error_log_or_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_proxy: None,
) -> None:
    """``fedsim eval score mmvet`` against a closed port: the key shows up nowhere."""
    import json

    from typer.testing import CliRunner

    from fedsim.cli import app
    from fedsim.cli_eval import _judge
    from fedsim.configtools import to_dict
    from fedsim.eval import judge as judge_mod

    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.chdir(tmp_path)

    # The config and client exactly as the CLI builds them.
    cfg = _judge(CLOSED, "judge-m", KEY_ENV)
    client = judge_mod.require_judge(cfg, "mmvet")
    for text in (repr(cfg), str(cfg), str(to_dict(cfg)), repr(client), str(client)):
        assert SECRET not in text
    assert SECRET not in repr(vars(client))
    assert cfg.api_key_env == KEY_ENV  # the variable's name, never its value

    # The whole command, retries included (their waits skipped).
    waits: list[float] = []
    init = judge_mod.Judge.__init__
    monkeypatch.setattr(
        judge_mod.Judge,
        "__init__",
        lambda self, config, sleep=None: init(self, config, sleep=waits.append),
    )
    data = tmp_path / "mmvet"
    data.mkdir()
    (data / "mm-vet.json").write_text(
        json.dumps(
            {
                "v1_0": {
                    "imagename": "v1_0.png",
                    "capability": ["rec"],
                    "question": "What animal is this?",
                    "answer": "cat",
                }
            }
        )
    )
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "prompt": "", "text": "a cat"}))
    before = sorted(tmp_path.rglob("*"))
    caplog.set_level(logging.DEBUG)
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "score",
            "mmvet",
            "--questions",
            str(data / "mm-vet.json"),
            "--predictions",
            str(answers),
            "--judge-url",
            CLOSED,
            "--judge-model",
            "judge-m",
            "--judge-key-env",
            KEY_ENV,
        ],
    )
    try:
        out = res.output + res.stderr  # click < 8.2 mixes stderr into output
    except ValueError:
        out = res.output
    assert res.exit_code == 2, (res.exit_code, out, res.exception)
    assert "127.0.0.1:9" in out and "gave up after 6 attempts" in out, out
    assert len(waits) == 5  # it did try: 1 + 5 retries
    assert SECRET not in out
    assert SECRET not in caplog.text
    assert "retry 1/5" in caplog.text  # the retries were logged, key-free
    assert sorted(tmp_path.rglob("*")) == before  # scoring writes no file
    assert _files_holding(tmp_path, SECRET) == []


@pytest.mark.parametrize(
    "raw", [SECRET + "\n", SECRET + "\r\n", " " + SECRET], ids=["lf", "crlf", "space"]
)
def test_judge_key_whitespace_is_stripped(
    raw: str, monkeypatch: pytest.MonkeyPatch, no_proxy: None
) -> None:
    """A key read from a file (trailing newline) is sent without it, so urllib never
    refuses the header with an error that quotes it."""
    from fedsim.eval.judge import Judge, JudgeConfig, JudgeError

    monkeypatch.setenv(KEY_ENV, raw)
    judge = Judge(
        JudgeConfig(
            base_url=CLOSED, model="m", api_key_env=KEY_ENV, retries=0, timeout=2.0
        )
    )
    with pytest.raises(JudgeError) as err:
        judge.chat([{"role": "user", "content": "hi"}], 0.0, 3)
    assert "gave up after 1 attempts" in str(err.value)  # it reached the network
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert err.value.__cause__ is None


@pytest.mark.parametrize(
    "raw",
    [
        SECRET[:10] + "\n" + SECRET[10:],
        SECRET[:10] + "\x01" + SECRET[10:],
        SECRET + "\u00e9",
    ],
    ids=["newline-inside", "control", "non-ascii"],
)
def test_judge_key_no_header_can_carry_is_refused_by_name(
    raw: str, monkeypatch: pytest.MonkeyPatch, no_proxy: None
) -> None:
    from fedsim.eval.judge import Judge, JudgeConfig, JudgeError

    monkeypatch.setenv(KEY_ENV, raw)
    judge = Judge(JudgeConfig(base_url=CLOSED, model="m", api_key_env=KEY_ENV))
    with pytest.raises(JudgeError, match=f"\\${KEY_ENV}") as err:
        judge.chat([{"role": "user", "content": "hi"}], 0.0, 3)
    for part in (SECRET[:10], SECRET[10:]):
        assert part not in str(err.value) and part not in repr(err.value)
    assert err.value.__context__ is None and err.value.__cause__ is None


# -- weights: safetensors only ---------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that code inside a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _write_pickle(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":
        torch.save({"linear_1.weight": torch.zeros(2, 2), "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"linear_1.weight": _Payload(marker)}))


def test_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """The control for the tests below: this payload does run code when unpickled."""
    marker = tmp_path / "ran"
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data)  # noqa: S301 - our own bytes, on purpose
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize(
    "name", ["projector.safetensors", "projector.pt", "pytorch_model.bin"]
)
def test_load_weights_refuses_pickle(tmp_path: Path, name: str, how: str) -> None:
    from fedsim.configtools import ConfigError
    from fedsim.runio import load_weights

    marker = tmp_path / "pickle-ran"
    path = tmp_path / name
    _write_pickle(path, marker, how)
    with pytest.raises(ConfigError) as err:
        load_weights(path)
    message = str(err.value)
    assert str(path) in message and "safetensors" in message
    assert "pickle" in message and "\n" not in message
    assert not marker.exists()


def test_load_weights_still_reads_safetensors(tmp_path: Path) -> None:
    from fedsim.configtools import ConfigError
    from fedsim.runio import load_weights, save_weights

    w = {"linear_1.weight": torch.arange(4.0).reshape(2, 2)}
    save_weights(tmp_path / "p.safetensors", w)
    assert torch.equal(
        load_weights(tmp_path / "p.safetensors")["linear_1.weight"],
        w["linear_1.weight"],
    )
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_weights(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="is not a file"):
        load_weights(tmp_path)


def _tiny_llava_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=8,
        ),
        text_config=LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
        ),
        image_token_id=63,
    )


def test_backbone_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    """A LLaVA folder with ``pytorch_model.bin`` and no safetensors: a clear error, no
    unpickling (transformers is never asked to fall back to the .bin)."""
    from fedsim.models.backbone import BackboneError, load_backbone

    marker = tmp_path / "pickle-ran"
    llava = tmp_path / "llava"
    _tiny_llava_config().save_pretrained(llava)
    _write_pickle(llava / "pytorch_model.bin", marker, "torch.save")
    with pytest.raises(BackboneError) as err:
        load_backbone(llava)
    message = str(err.value)
    assert message.startswith("model.backbone:")
    assert "no safetensors weights" in message and "pytorch_model.bin" in message
    assert not marker.exists()

    # The vision + LM pair: each folder is checked before transformers opens it.
    cfg = _tiny_llava_config()
    vision, lm = tmp_path / "vision", tmp_path / "lm"
    cfg.vision_config.save_pretrained(vision)
    cfg.text_config.save_pretrained(lm)
    _write_pickle(vision / "pytorch_model.bin", marker, "torch.save")
    _write_pickle(lm / "pytorch_model.bin", marker, "torch.save")
    with pytest.raises(BackboneError, match=r"^model\.backbone: .*no safetensors"):
        load_backbone(vision, lm=lm)
    (vision / "pytorch_model.bin").unlink()
    from safetensors.torch import save_file

    save_file({}, str(vision / "model.safetensors"))  # passes the check, never loaded
    with pytest.raises(BackboneError, match=r"^model\.lm: .*pytorch_model\.bin"):
        load_backbone(vision, lm=lm)
    assert not marker.exists()
