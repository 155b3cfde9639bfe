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
