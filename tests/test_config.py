"""Config layering and errors: unknown keys and bad values name the key and where it was set."""

from pathlib import Path

import pytest

from deepspark.config import ConfigError, config_to_yaml, flatten, load_config, parse_override
from pipelines.config import EtlConfig


@pytest.fixture()
def conf_dir(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "etl.yaml").write_text("image:\n  height: 32\n  width: 32\noutput:\n  name: base\n")
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "etl.yaml").write_text("image:\n  width: 48\n")
    return tmp_path


def test_layers_apply_in_order(conf_dir):
    cfg = load_config(EtlConfig, "etl", ["image.channels=3", "input.seed=5"], "gpu", conf_dir)
    assert (cfg.image.height, cfg.image.width, cfg.image.channels) == (32, 48, 3)
    assert cfg.output.name == "base"
    assert cfg.input.seed == 5
    assert cfg.image.resize_mode == "pad"  # built-in default survives


def test_config_is_frozen(conf_dir):
    from pydantic import ValidationError

    cfg = load_config(EtlConfig, "etl", [], None, conf_dir)
    with pytest.raises(ValidationError, match="frozen_instance"):
        cfg.image.height = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen_instance"):
        cfg.input = cfg.input  # type: ignore[misc]
    assert cfg.image.height == 32


def test_unknown_key_in_file_names_key_and_file(conf_dir):
    (conf_dir / "base" / "etl.yaml").write_text("image:\n  hieght: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(EtlConfig, "etl", [], None, conf_dir)
    assert "image.hieght: unknown key" in str(err.value)
    assert str(conf_dir / "base" / "etl.yaml") in str(err.value)


def test_bad_value_from_command_line_names_key_and_source(conf_dir):
    with pytest.raises(ConfigError) as err:
        load_config(EtlConfig, "etl", ["image.channels=2"], None, conf_dir)
    message = str(err.value)
    assert "image.channels" in message and "command line (image.channels=2)" in message


def test_a_negative_seed_is_refused_naming_the_key():
    from training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"seed.*command line \(seed=-1\)"):
        load_config(TrainConfig, "train", ["seed=-1"])


def test_bad_split_fractions_rejected(conf_dir):
    with pytest.raises(ConfigError, match="input.split_fractions"):
        load_config(EtlConfig, "etl", ["input.split_fractions={train: 0.5, val: 0.1}"], None, conf_dir)


def test_unknown_profile_is_named(conf_dir):
    with pytest.raises(ConfigError, match="profile 'nope'"):
        load_config(EtlConfig, "etl", [], "nope", conf_dir)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("input.glob=*.png") == ("input.glob", "*.png")  # not YAML: kept literally
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("justakey")


def test_resolved_config_round_trips(conf_dir):
    cfg = load_config(EtlConfig, "etl", ["output.name=x"], None, conf_dir)
    import yaml

    again = EtlConfig.model_validate(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg
    assert flatten(cfg)["output.name"] == "x"


def test_project_base_config_is_valid():
    cfg = load_config(EtlConfig, "etl", [], "local")
    assert cfg.spark.master == "local[2]"


def test_command_line_mapping_replaces_the_whole_value(conf_dir):
    cfg = load_config(EtlConfig, "etl", ["input.split_fractions={train: 1.0}"], None, conf_dir)
    assert cfg.input.split_fractions == {"train": 1.0}


def test_profiles_stack_and_all_yaml_applies_to_every_job(conf_dir):
    (conf_dir / "cluster").mkdir()
    (conf_dir / "cluster" / "all.yaml").write_text("spark:\n  master: spark://h:7077\n")
    (conf_dir / "gpu" / "all.yaml").write_text("spark:\n  conf:\n    spark.task.resource.gpu.amount: '1'\n")
    cfg = load_config(EtlConfig, "etl", [], "cluster,gpu", conf_dir)
    assert cfg.spark.master == "spark://h:7077"
    assert cfg.spark.conf == {"spark.task.resource.gpu.amount": "1"}
    assert cfg.image.width == 48  # gpu/etl.yaml still applies


def _leaves(node: object, prefix: tuple[str, ...] = ()):
    """(path, value) of every leaf of a nested mapping (a YAML file's keys)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _lookup(node: object, path: tuple[str, ...]) -> object:
    for key in path:
        assert isinstance(node, dict) and key in node, f"{'.'.join(path)} missing from the loaded config"
        node = node[key]
    return node


@pytest.mark.parametrize("profile", ["local", "standalone", "yarn", "k8s", "gpu", "standalone,gpu",
                                     "text", "audio"])
def test_shipped_profiles_are_valid_and_applied_for_every_job(profile):
    """Every shipped profile loads for every job, and every key its files set is the value the
    loaded config holds (the last profile's file winning), so no profile is silently ignored."""
    import yaml

    from deepspark.config import default_conf_dir
    from inference.config import BatchInferenceConfig
    from training.config import TrainConfig
    from training.selection.config import SelectConfig

    conf = default_conf_dir()
    for job, model in (("etl", EtlConfig), ("train", TrainConfig), ("batch_inference", BatchInferenceConfig),
                       ("select_models", SelectConfig)):
        dumped = load_config(model, job, [], profile).model_dump(mode="json")
        expected: dict[tuple[str, ...], object] = {}
        for name in profile.split(","):
            for path in (conf / name / "all.yaml", conf / name / f"{job}.yaml"):
                if path.is_file():
                    expected.update(_leaves(yaml.safe_load(path.read_text()) or {}))
        assert expected, f"profile {profile} sets nothing for {job}"
        for path, value in expected.items():
            assert _lookup(dumped, path) == value, (profile, job, ".".join(path))
