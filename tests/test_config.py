from pathlib import Path

import pytest
import yaml

from sslbackdoor.config import dump_config, load_config, parse_overrides
from sslbackdoor.errors import UserInputError

BASE = {
    "encoder": {"arch": "torchvision:mobilenet_v2", "weights": "imagenet"},
    "shadow": [{"dataset": "natural-crops", "split": "unlabeled"}],
    "targets": [{"task": "mnist-5k", "target_class": 1,
                 "references": {"dataset": "opencv-digits"}}],
}


def test_defaults_are_the_reference_codes() -> None:
    config = load_config(BASE)
    assert (config.attack.lr, config.attack.momentum, config.attack.weight_decay) == (1e-3, 0.9, 5e-4)
    assert (config.attack.epochs, config.attack.batch_size) == (200, 256)
    assert (config.attack.lambda1, config.attack.lambda2) == (1.0, 1.0)
    probe = config.downstream.probe
    assert (probe.kind, probe.epochs, probe.lr, probe.batch_size) == ("mlp", 500, 1e-4, 64)
    assert config.targets[0].trigger.size == 10


def test_overrides_reach_nested_fields_and_list_items() -> None:
    config = load_config(BASE, ["attack.epochs=3", "targets.0.target_class=7",
                                "targets.0.trigger.size=5", "image_size=48"])
    assert config.attack.epochs == 3 and config.image_size == 48
    assert config.targets[0].target_class == 7 and config.targets[0].trigger.size == 5


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(BASE, ["attack.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(("override", "message"), [
    ("attack.lr=-1", "attack.lr: Input should be greater than 0"),
    ("attack.epochs=zero", "attack.epochs: Input should be a valid integer"),
    ("attack.optimiser=adam", "attack.optimiser: Extra inputs are not permitted"),
    ("targets.0.target_class=-2", "targets.0.target_class: Input should be greater than"),
    ("targets.0.trigger.position=middle", "targets.0.trigger.position: Input should be"),
])
def test_bad_fields_are_named_in_one_line(override: str, message: str) -> None:
    with pytest.raises(UserInputError) as info:
        load_config(BASE, [override], label="exp.yaml")
    assert str(info.value).startswith(f"exp.yaml: {message}")
    assert "\n" not in str(info.value)


def test_shadow_may_not_be_a_downstream_test_set() -> None:
    bad = {**BASE, "shadow": [{"dataset": "mnist-5k", "split": "test"}]}
    with pytest.raises(UserInputError, match="is a downstream test set"):
        load_config(bad)


def test_references_may_not_come_from_the_tasks_test_set() -> None:
    bad = yaml.safe_load(yaml.safe_dump(BASE))
    bad["targets"][0]["references"] = {"dataset": "mnist-5k", "split": "test"}
    with pytest.raises(UserInputError, match="come from its own test set"):
        load_config(bad)


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        parse_overrides(["attack.epochs"])
    path = tmp_path / "broken.yaml"
    path.write_text("a: [unclosed")
    with pytest.raises(UserInputError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(UserInputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    + ["name: *i"])  # 9^9 ≈ 387 million strings once expanded


@pytest.mark.parametrize("text", [
    BILLION_LAUGHS,
    "base: &base {epochs: 1}\nattack:\n  <<: *base\n",  # a merge key is an alias too
])
def test_yaml_aliases_are_refused_without_expanding(tmp_path: Path, text: str) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=r"aliases \(\*\w+\) are not allowed") as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_oversized_and_unreadable_config_files_are_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(UserInputError, match="larger than 1 MiB"):
        load_config(big)
    with pytest.raises(UserInputError, match="cannot read config file"):
        load_config(tmp_path)  # a folder
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserInputError, match="is not valid YAML"):
        load_config(binary)


@pytest.mark.parametrize(("overrides", "message"), [
    (["attack.lr=[1"], "not a YAML scalar or list"),
    (["name=*x"], "not a YAML scalar or list"),
    (["attack=1", "attack.lr=2"], "has no fields to set"),
])
def test_bad_override_values_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UserInputError, match=message) as info:
        parse_overrides(overrides)
    assert "\n" not in str(info.value)
