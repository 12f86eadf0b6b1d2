"""The BadEncoder experiment's configuration: pydantic models, YAML in, fully resolved YAML out.

Every field is validated on load and a bad one is reported in one line naming its path
(`attack.lr: Input should be greater than 0`). `--set a.b=value` overrides any field.
The plumbing (YAML, overrides, scales, error lines) is `sslbackdoor.config_io`; `DataSource`
is the data layer's (`sslbackdoor.data.sources`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from sslbackdoor.attacks.badencoder import BadEncoderConfig
from sslbackdoor.config_io import (
    Strict,
    dump_config,
    format_validation_error,
    merged_config,
    parse_overrides,
    read_yaml,
    select_scale,
)
from sslbackdoor.data.sources import DataSource
from sslbackdoor.data.triggers import TriggerSpec
from sslbackdoor.downstream.probe import ProbeConfig
from sslbackdoor.errors import UserInputError

# The plumbing and DataSource are re-exported so that callers importing them from here keep working.
__all__ = ["DataSource", "DownstreamSpec", "EncoderSpec", "ExperimentConfig", "ReferenceSpec", "Strict",
           "TargetSpec", "TaskSpec", "ZeroShotSpec", "dump_config", "format_validation_error", "load_config",
           "merged_config", "parse_overrides", "read_yaml", "select_scale"]


class EncoderSpec(Strict):
    arch: str = Field(..., description="registered encoder, e.g. torchvision:mobilenet_v2")
    weights: str | None = Field("imagenet", description="'imagenet', a checkpoint path, or null")


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


def load_config(source: dict[str, Any] | Path, overrides: list[str] | None = None,
                label: str | None = None) -> ExperimentConfig:
    """Validate a BadEncoder config dict or YAML file (plus `--set` overrides)."""
    merged = merged_config(source, overrides)
    label = label or (str(source) if isinstance(source, Path) else "config")
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise UserInputError(format_validation_error(exc, label)) from None
