"""Experiment configuration: pydantic models, YAML in, fully resolved YAML out.

Every field is validated on load and a bad one is reported in one line naming its path
(`attack.lr: Input should be greater than 0`). `--set a.b=value` overrides any field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sslbackdoor.attacks.badencoder import BadEncoderConfig
from sslbackdoor.data.triggers import TriggerSpec
from sslbackdoor.downstream.probe import ProbeConfig
from sslbackdoor.errors import UserInputError, first_line


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncoderSpec(Strict):
    arch: str = Field(..., description="registered encoder, e.g. torchvision:mobilenet_v2")
    weights: str | None = Field("imagenet", description="'imagenet', a checkpoint path, or null")


class DataSource(Strict):
    dataset: str
    split: Literal["train", "test", "unlabeled"] = "train"
    limit: int | None = Field(None, ge=1)
    classes: list[int] | None = Field(None, description="keep only these labels")
    root: str | None = None


class ReferenceSpec(Strict):
    """Where reference inputs of the target class come from (never a task's test set)."""

    dataset: str
    split: Literal["train", "test", "unlabeled"] = "train"
    count: int = Field(1, ge=1)
    label: int | None = Field(None, ge=0, description="class index in this dataset "
                                                      "(default: the target class)")
    root: str | None = None


class TargetSpec(Strict):
    task: str = Field(..., description="downstream dataset whose class is targeted")
    target_class: int = Field(..., ge=0)
    trigger: TriggerSpec = TriggerSpec()
    references: ReferenceSpec


class TaskSpec(Strict):
    dataset: str
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    root: str | None = None


class ZeroShotSpec(Strict):
    """Zero-shot CLIP classifiers (text tower of the CLIP encoder) evaluated after the attack."""

    templates: list[str] = Field(default_factory=list,
                                 description="prompts with {} for the class name; empty: "
                                             "'A photo of a {}.' ('A traffic sign photo "
                                             "of a {}.' for gtsrb)")
    tasks: list[str] = Field(default_factory=list,
                             description="evaluated tasks to classify zero-shot; empty: all")
    clip_weights: str | None = Field(None, description="full CLIP weights file or open_clip "
                                                       "tag for the text tower "
                                                       "(default: encoder.weights)")

    @model_validator(mode="after")
    def _templates_have_placeholders(self) -> ZeroShotSpec:
        from sslbackdoor.downstream.zeroshot import normalise_templates

        normalise_templates(self.templates)  # UserInputError is a ValueError: reported here
        return self


class DownstreamSpec(Strict):
    tasks: list[TaskSpec] = Field(default_factory=list,
                                  description="extra tasks; every target task is evaluated")
    probe: ProbeConfig = ProbeConfig()
    train_limit: int | None = Field(None, ge=1, description="default per-task train subset")
    test_limit: int | None = Field(None, ge=1, description="default per-task test subset")
    zero_shot: ZeroShotSpec | None = Field(None, description="also classify zero-shot with "
                                                             "the CLIP text tower (clip: only)")


class ExperimentConfig(Strict):
    """A BadEncoder experiment: attack a clean encoder, then evaluate every task."""

    name: str = "badencoder"
    kind: Literal["badencoder"] = "badencoder"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(32, ge=8, description="side of every image the encoder sees")
    data_root: str | None = Field(None, description="default root of datasets ($SSLBACKDOOR_DATA)")
    download: bool = Field(False, description="let torchvision download missing datasets")
    encoder: EncoderSpec
    shadow: list[DataSource] = Field(..., min_length=1)
    targets: list[TargetSpec] = Field(..., min_length=1)
    attack: BadEncoderConfig = BadEncoderConfig()
    downstream: DownstreamSpec = DownstreamSpec()

    @model_validator(mode="after")
    def _shadow_disjoint_from_tests(self) -> ExperimentConfig:
        test_sets = {t.dataset for t in self.all_tasks()}
        for source in self.shadow:
            if source.split == "test" and source.dataset in test_sets:
                raise ValueError(f"shadow source {source.dataset}/test is a downstream test "
                                 f"set; use its train or unlabeled split")
        for target in self.targets:
            if target.references.split == "test" and target.references.dataset == target.task:
                raise ValueError(f"references for {target.task} come from its own test set; "
                                 f"take them from its train split or another source")
        return self

    @model_validator(mode="after")
    def _zero_shot_needs_clip(self) -> ExperimentConfig:
        spec = self.downstream.zero_shot
        if spec is None:
            return self
        if not self.encoder.arch.startswith("clip:"):
            raise ValueError(f"downstream.zero_shot needs a CLIP encoder (encoder.arch "
                             f"clip:ARCH, e.g. clip:RN50), not {self.encoder.arch!r}")
        evaluated = [t.dataset for t in self.all_tasks()]
        unknown = [name for name in spec.tasks if name not in evaluated]
        if unknown:
            raise ValueError(f"downstream.zero_shot.tasks {unknown} are not evaluated; "
                             f"valid: {', '.join(evaluated)} (or add them to downstream.tasks)")
        return self

    def all_tasks(self) -> list[TaskSpec]:
        """Target tasks first (in order), then any extra tasks, without repeats."""
        seen: dict[str, TaskSpec] = {}
        for task in self.downstream.tasks:
            seen.setdefault(task.dataset, task)
        ordered = [seen.get(t.task, TaskSpec(dataset=t.task)) for t in self.targets]
        names = [t.dataset for t in ordered]
        ordered = [t for i, t in enumerate(ordered) if t.dataset not in names[:i]]
        return ordered + [t for t in self.downstream.tasks if t.dataset not in names]


def format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{source}: {location}: {first['msg']}{extra}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` strings → nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. attack.epochs=5")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"--set {item!r}: an earlier --set gave {part!r} a value, "
                                     f"so it has no fields to set")
        try:
            node[parts[-1]] = load_yaml_text(raw)
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {item!r}: the value is not a YAML scalar or list "
                                 f"({_yaml_problem(exc)})") from None
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(merged.get(key), list) and isinstance(value, dict):
            merged[key] = _merge_list(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_list(items: list[Any], override: dict[str, Any]) -> list[Any]:
    """`targets.0.target_class=3` indexes into lists."""
    items = list(items)
    for index, value in override.items():
        if not index.isdigit() or int(index) >= len(items):
            raise UserInputError(f"--set: list index {index!r} is out of range 0..{len(items) - 1}")
        position = int(index)
        items[position] = (deep_merge(items[position], value) if isinstance(value, dict)
                           and isinstance(items[position], dict) else value)
    return items


def merged_config(source: dict[str, Any] | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A config dict or YAML file with `--set KEY=VALUE` overrides applied (not validated)."""
    raw = read_yaml(source) if isinstance(source, Path) else source
    return deep_merge(raw, parse_overrides(overrides or []))


def select_scale(raw: dict[str, Any], scale: str | None, label: str = "config") -> dict[str, Any]:
    """Merge the `scales: {NAME: {...overrides}}` block named `scale` (default: small)
    over the rest of a config; a config without `scales` is returned unchanged."""
    scales = raw.get("scales")
    if scales is None:
        if scale is not None:
            raise UserInputError(f"--scale {scale}: {label} has no `scales` block")
        return raw
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise UserInputError(f"{label}: `scales` must map names to override mappings")
    name = scale or "small"
    if name not in scales:
        raise UserInputError(f"--scale {name}: {label} has scales {', '.join(scales)}")
    base = {k: v for k, v in raw.items() if k != "scales"}
    return deep_merge(base, scales[name])


def load_config(source: dict[str, Any] | Path, overrides: list[str] | None = None,
                label: str | None = None) -> ExperimentConfig:
    """Validate a BadEncoder config dict or YAML file (plus `--set` overrides)."""
    merged = merged_config(source, overrides)
    label = label or (str(source) if isinstance(source, Path) else "config")
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise UserInputError(format_validation_error(exc, label)) from None


MAX_CONFIG_BYTES = 1 << 20  # shipped experiments are ~2 KB


class NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`, `<<: *name`) as it meets them.

    Config files never need them, and a few nested aliases ("billion laughs") stand for
    billions of nodes once a config is merged, validated or written back out.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in config files; "
                            f"write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml_text(text: str) -> Any:
    """YAML text → Python objects, without aliases (see `NoAliasLoader`)."""
    return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: builds no arbitrary objects


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserInputError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                                 f"a config file is a few KB of YAML")
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid YAML ({_yaml_problem(exc)})") from None
    except OSError as exc:
        raise UserInputError(f"cannot read config file {path} ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a YAML mapping at the top level")
    return data


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's messages span lines (problem, then position); one line holding both."""
    return " ".join(str(exc).split())[:200]


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
