"""Configuration: typed loading, one-line errors naming key and value, overrides, presets."""

import pytest

from fedsim.config import Config, config_to_yaml_data, load_config
from fedsim.configtools import ConfigError, apply_overrides, from_dict


def test_defaults_are_the_toy_iid_preset():
    cfg = load_config("toy-iid")
    assert cfg == load_config(None)
    assert (
        cfg.scenario.num_clients >= 20
    )  # the foundation's "20 or more logical clients"
    assert cfg.algorithm.name == "fedavg"


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("foo=1", "foo", None),
        ("train.lr=abc", "train.lr", "'abc'"),
        ("train.batch_size=1.5", "train.batch_size", "1.5"),
        ("model.dtype=float31", "model.dtype", "'float31'"),
        ("scenario.cohort_size=50", "scenario.cohort_size", "50"),
        ("rounds=0", "rounds", "0"),
        ("algorithm.name=fedavgg", "algorithm.name", "'fedavgg'"),
        ("algorithm.bogus=1", "algorithm.bogus", None),
        ("data.scene.colours=[pink]", "data.scene", "'pink'"),
        ("ray.workers=true", "ray.workers", "True"),
    ],
)
def test_bad_values_name_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert "\n" not in message
    assert key in message
    if value is not None:
        assert value in message


def test_set_parses_yaml_values_and_nests():
    data = apply_overrides(
        {},
        [
            "train.lr=0.01",
            "scenario.name=x",
            "data.scene.counts=[1]",
            "ray.address=null",
        ],
    )
    assert data == {
        "train": {"lr": 0.01},
        "scenario": {"name": "x"},
        "data": {"scene": {"counts": [1]}},
        "ray": {"address": None},
    }
    cfg = from_dict(Config, {"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_algorithm_params_sit_beside_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  name: fedavg\n  server_lr: 0.5\n")
    cfg = load_config(str(path))
    assert cfg.algorithm.params == {"server_lr": 0.5}
    assert config_to_yaml_data(cfg)["algorithm"] == {"name": "fedavg", "server_lr": 0.5}


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = load_config(
        None, ["seed=3", "train.local_steps=2", "algorithm.server_lr=0.7"]
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_yaml_data(cfg)))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "content, fragment",
    [("a: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "top level must be a mapping")],
)
def test_bad_config_files(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        load_config(str(path))


def test_missing_config_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="known scenario preset"):
        load_config("no-such-preset")


def _float_fields(cls, prefix=""):
    """(dotted key, a YAML value holding one float) for every float field, nested ones too."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, key + ".")
        elif tp is float or args == [float]:
            yield key, lambda x: x
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is float:
            yield f"{key}[0]", lambda x: [x]
        elif typing.get_origin(tp) is dict and typing.get_args(tp)[1] is float:
            yield f"{key}.r", lambda x: {"r": x}


FLOAT_FIELDS = list(_float_fields(Config))


def test_the_walk_finds_the_float_fields_the_issue_names():
    keys = {k for k, _ in FLOAT_FIELDS}
    assert {
        "train.lr",
        "scenario.time_budget",
        "scenario.dirichlet_alpha",
        "scenario.quantity_skew",
        "scenario.tier_speeds[0]",
        "ray.worker_resources.r",
        "data.scene.colour_jitter",
    } <= keys


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_refuses_nan_and_inf(bad):
    """One check for all float fields (configtools._finite), nested and algorithm ones too."""
    for key, wrap in FLOAT_FIELDS:
        data: dict = {}
        parts = key.split("[")[0].split(".")
        if key.endswith(".r"):
            parts = parts[:-1]
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = wrap(bad)
        with pytest.raises(ConfigError, match="must be a finite number") as e:
            from_dict(Config, data)
        assert str(e.value).startswith(key), (key, str(e.value))


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999"])
def test_yaml_spellings_of_nan_and_inf_are_refused(text):
    from fedsim.algorithms import available, build_algorithm
    from fedsim.algorithms.registry import get_algorithm_class, parameters

    with pytest.raises(ConfigError, match=r"scenario.time_budget: must be a finite"):
        load_config(None, [f"scenario.time_budget={text}"])
    # Algorithm parameters go through the same layer.
    checked = 0
    for name in available():
        for param, default in parameters(get_algorithm_class(name)).items():
            if isinstance(default, float):
                with pytest.raises(ConfigError, match=f"algorithm.{param}: must be"):
                    load_config(
                        None, [f"algorithm.name={name}", f"algorithm.{param}={text}"]
                    )
                checked += 1
    assert checked >= 5
    assert build_algorithm("fedprox", {"mu": 0.5})


def _keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")


@pytest.mark.parametrize(
    "value", ["5", "[1, 2]", "{a: 1}", "[{a: 1}]", "[[1]]", "x", "true", ".nan"]
)
def test_any_value_of_the_wrong_shape_anywhere_is_a_config_error(value):
    """Every key of the config (and the algorithm's), given values of every YAML shape: each
    ends as a valid config or a one-line ConfigError, never another exception."""
    keys = [*_keys(Config), "algorithm.params", "algorithm.mu", "algorithm.params.mu"]
    for key in keys:
        for before in ([], ["algorithm.name=fedprox"]):
            try:
                load_config(None, [*before, f"{key}={value}"])
            except ConfigError as e:
                assert str(e) and "\n" not in str(e), (key, e)
