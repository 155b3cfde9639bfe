"""Typed, validated configuration from YAML and ``--set key=value`` overrides.

Configs are frozen keyword-only dataclasses. :func:`from_dict` builds one from plain data, checking
every key and value against the field's annotation, and raises :class:`ConfigError` with a one-line
message naming the dotted key and the bad value. YAML is read with ``safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the value."""


class _NotFinite(ConfigError):
    """A NaN or ±inf float: reported as such even inside ``float | None``."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert YAML types (list → tuple, int → float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted on/off/yes/no as booleans: take the word back.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            for word in words:
                if word in get_args(tp):
                    return word
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _NotFinite:
                raise
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        # dict[str, float] and the like: every value is checked as its own field.
        item = get_args(tp)[1] if len(get_args(tp)) == 2 else Any
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return from_dict(tp, value, prefix=key)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        return _finite(_number(value, key), key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: {value!r} is not a string")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 reads "1e-9" (no dot) as a string; take it as the number it spells.
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    raise ConfigError(f"{key}: {value!r} is not a number")


def _finite(value: float, key: str) -> float:
    """The one check every float field gets: YAML's ``.nan``/``.inf`` parse as floats, and
    ``inf`` overflows from literals such as ``1e999``; no fedsim field gives them a meaning
    (null is how a field says "no bound"), and they would run silently into NaN losses,
    NumPy warnings or empty partitions."""
    if not math.isfinite(value):
        raise _NotFinite(f"{key}: must be a finite number, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{full}: unknown key (known here: {known})")
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready data (tuples → lists) from a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_user_text(
    path: str | Path, what: str = "", error: type[Exception] = ConfigError
) -> str:
    """The text of a file the user handed fedsim, decoded as UTF-8 (a BOM is dropped).

    Every text file fedsim reads from the user goes through here, so that one that is not
    UTF-8 (Latin-1, UTF-16, a binary file under a text name) is one ``error`` naming the file
    and the line of the first bad byte, instead of a UnicodeDecodeError traceback. OSError
    (missing, unreadable) is left to the caller, who knows how to name the input.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        label = f"{what} {str(path)!r}" if what else str(path)
        raise error(
            f"{label}: not UTF-8 text (byte {data[e.start]:#04x} on line {line})"
        ) from None


class YamlAliasError(yaml.YAMLError):
    """A YAML anchor (``&a``) or alias (``*a``): refused before anything expands it."""

    def __init__(self, mark: Any) -> None:
        super().__init__("YAML anchors and aliases are not allowed")
        self.problem_mark = mark


class _NoAliasLoader(yaml.SafeLoader):
    """``safe_load`` that stops at the first anchor or alias.

    Aliases are cheap to parse (the nodes are shared) but every merge or copy expands them: a
    403-byte "billion laughs" config took a minute and 1.4 GB in ``merge`` before its unknown
    key was reported. Configs never need them, so they are refused while composing.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise YamlAliasError(event.start_mark)
        return super().compose_node(parent, index)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` without anchors or aliases (:class:`YamlAliasError`)."""
    # What yaml.safe_load does, with the loader that refuses aliases (no yaml.load anywhere:
    # the source scan of tests/test_safe_defaults.py holds that).
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe_load); a one-line ConfigError names the file otherwise."""
    p = Path(path)
    try:
        text = read_user_text(p, "config file")
    except OSError as e:
        raise ConfigError(
            f"config file {str(p)!r}: cannot read ({e.strerror})"
        ) from None
    try:
        data = safe_load(text)
    except YamlAliasError as e:
        raise ConfigError(
            f"config file {str(p)!r}: YAML anchors and aliases (&name, *name) are not "
            f"allowed (line {e.problem_mark.line + 1}); write the values out"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except YamlAliasError:
            raise ConfigError(
                f"--set {item!r}: YAML anchors and aliases are not allowed"
            ) from None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: values in ``top`` win; mappings merge key by key."""
    out = _deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = _deepcopy(v)
    return out


def _deepcopy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _deepcopy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deepcopy(x) for x in v]
    return v
