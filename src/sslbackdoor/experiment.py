"""Run a BadEncoder experiment end to end: attack → evaluate → results.json + report.

Writes into the output folder:
  config.yaml                    the fully resolved config (re-runnable with `sslbackdoor run`)
  attack_state.safetensors       the attack's per-epoch checkpoint (for --resume)
  attack_state.trajectory        hash of the attack that checkpoint belongs to
  backdoored_encoder.safetensors the backdoored encoder
  results.json                   metrics, provenance, timings (schema: docs/results-schema.md)
  similarity_cdf.png, report.md  the paper's Fig. 4 analogue and the report
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sslbackdoor.attacks.badencoder import AttackResult, AttackTarget, BadEncoderAttack
from sslbackdoor.config import ExperimentConfig, dump_config
from sslbackdoor.data.datasets import dataset_labels, load_dataset
from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.evaluate import (
    TaskData,
    check_target_class,
    evaluate_encoder,
    load_task,
)
from sslbackdoor.downstream.features import encode
from sslbackdoor.downstream.zeroshot import (
    evaluate_zero_shot,
    templates_for,
    zero_shot_class_names,
    zero_shot_weights,
)
from sslbackdoor.engine import (
    atomic_write_text,
    environment,
    prepare_module,
    resolve_device,
    seed_everything,
)
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder, save_encoder
from sslbackdoor.models.encoders import Encoder
from sslbackdoor.progress import log
from sslbackdoor.run_lock import output_lock
from sslbackdoor.runners import register_kind

RESULTS_SCHEMA = "sslbackdoor.results/1"


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def measure(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)


def config_hash(config: ExperimentConfig) -> str:
    return hashlib.sha256(dump_config(config).encode()).hexdigest()[:16]


def load_shadow(config: ExperimentConfig) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """All shadow images (uint8 [N,3,S,S]) and one provenance entry per source."""
    from sslbackdoor.data.sources import load_sources

    return load_sources(config.shadow, config.image_size, data_root=config.data_root,
                        seed=config.seed, download=config.download)


def load_references(config: ExperimentConfig, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """`count` seeded images of the target class from the configured reference source."""
    target = config.targets[index]
    spec = target.references
    label = spec.label if spec.label is not None else target.target_class
    dataset = load_dataset(spec.dataset, spec.split, image_size=config.image_size,
                           root=spec.root or config.data_root, download=config.download)
    members = torch.nonzero(dataset_labels(dataset) == label).flatten()
    if members.numel() < spec.count:
        raise UserInputError(f"targets.{index}.references: {spec.dataset}/{spec.split} has "
                             f"{members.numel()} images of class {label}, {spec.count} requested")
    generator = torch.Generator().manual_seed(config.seed + 7919 * index)
    chosen = members[torch.randperm(members.numel(), generator=generator)[:spec.count]].sort().values
    images = torch.stack([dataset[int(i)][0] for i in chosen])
    return images, {"dataset": spec.dataset, "split": spec.split, "label": label,
                            "indices": chosen.tolist(), "source": dataset.provenance}


def similarity_to_references(encoder: Encoder, triggered: torch.Tensor, references: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
    """Cosine similarity [N] of triggered-input features to the mean reference feature."""
    reference = torch.nn.functional.normalize(encode(encoder, references, device).mean(0), dim=0)
    return (triggered @ reference).cpu()


@dataclass
class PreparedAttack:
    """Everything the attack stage needs, loaded once."""

    clean: Encoder
    targets: list[AttackTarget]
    shadow: torch.Tensor
    provenance: dict[str, Any]


def prepare_attack(config: ExperimentConfig, tasks: dict[str, TaskData] | None = None) -> PreparedAttack:
    """Load the clean encoder, shadow set, triggers and references; validate targets."""
    clean = load_encoder(config.encoder.weights, config.encoder.arch)
    targets, reference_provenance = [], []
    for index, target in enumerate(config.targets):
        classes = (tasks[target.task].classes if tasks and target.task in tasks
                   else list(load_dataset(target.task, "test", image_size=config.image_size,
                                          root=config.data_root,
                                          download=config.download).classes))
        check_target_class(target.task, classes, target.target_class)
        references, provenance = load_references(config, index)
        reference_provenance.append(provenance)
        trigger = Trigger.from_spec(target.trigger, config.image_size)
        targets.append(AttackTarget(f"{target.task}:{classes[target.target_class]}", trigger,
                                    references))
    shadow, shadow_provenance = load_shadow(config)
    provenance = {"encoder": encoder_provenance(config.encoder.weights, config.encoder.arch),
                  "shadow": shadow_provenance, "references": reference_provenance}
    return PreparedAttack(clean, targets, shadow, provenance)


@dataclass
class AttackStage:
    prepared: PreparedAttack
    attack: BadEncoderAttack
    result: AttackResult
    encoder_path: Path
    encoder_sha256: str


def run_attack_stage(config: ExperimentConfig, out_dir: Path, resume: bool = False,
                     prepared: PreparedAttack | None = None) -> AttackStage:
    """Attack and save `backdoored_encoder.safetensors` (checkpointing every epoch)."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    prepared = prepared or prepare_attack(config)
    out_dir = Path(out_dir)
    log(f"BadEncoder: {len(prepared.targets)} target(s), {prepared.shadow.shape[0]} shadow "
        f"images, {config.attack.epochs} epochs on {device}")
    attack = BadEncoderAttack(prepared.clean, prepared.targets, config.attack, device,
                              seed=config.seed)
    with output_lock(out_dir):
        checkpoint = out_dir / "attack_state.safetensors"
        check_attack_checkpoint(config, checkpoint, resume)
        result = attack.run(prepared.shadow, checkpoint=checkpoint, resume=resume)
        path = out_dir / "backdoored_encoder.safetensors"
        sha = save_encoder(result.encoder, path, {"config_hash": config_hash(config),
                                                  "targets": [t.name for t in prepared.targets],
                                                  "image_size": str(config.image_size)})
    return AttackStage(prepared, attack, result, path, sha)


def attack_trajectory(config: ExperimentConfig) -> str:
    """Hash of what the attack's weights depend on, epochs and device aside (a resumed run
    may train longer, or elsewhere)."""
    settings = config.model_dump(mode="json", include={"seed", "image_size", "encoder",
                                                       "shadow", "targets", "attack"})
    settings["attack"].pop("epochs", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_attack_checkpoint(config: ExperimentConfig, checkpoint: Path, resume: bool) -> None:
    """Refuse to --resume from another attack's checkpoint (it would silently continue that
    attack); then record this attack's trajectory beside the checkpoint."""
    record = checkpoint.with_name("attack_state.trajectory")
    expected = attack_trajectory(config)
    if resume and checkpoint.is_file() and record.is_file() and \
            record.read_text(encoding="utf-8").strip() != expected:
        raise UserInputError(f"{checkpoint} was written by a different attack (encoder, "
                             f"shadow, targets, trigger, seed or attack settings differ); use a "
                             f"new --out folder or run without --resume")
    if not resume:  # a fresh start: an old checkpoint must not be resumed under this record
        checkpoint.unlink(missing_ok=True)
    atomic_write_text(record, expected + "\n")


def load_tasks(config: ExperimentConfig) -> dict[str, TaskData]:
    return {spec.dataset: load_task(spec.dataset, config.image_size,
                                    root=spec.root or config.data_root,
                                    train_limit=spec.train_limit or config.downstream.train_limit,
                                    test_limit=spec.test_limit or config.downstream.test_limit,
                                    seed=config.seed, download=config.download)
            for spec in config.all_tasks()}


def run_badencoder_experiment(config: ExperimentConfig, out_dir: Path,
                              resume: bool = False) -> dict[str, Any]:
    """The full pipeline; returns the results dict also written to results.json.

    Every input is loaded and validated before anything is written to `out_dir`.
    """
    timings = Timings()
    device = resolve_device(config.device)
    # Before anything draws random numbers: a randomly initialised encoder (weights: null)
    # would otherwise differ between two runs of one config.
    seed_everything(config.seed)
    started = time.perf_counter()
    tasks = load_tasks(config)
    prepared = prepare_attack(config, tasks)
    zero_shot_plan = prepare_zero_shot(config, tasks, device)  # None unless zero_shot is set
    timings.measure("load_data", started)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    started = time.perf_counter()
    stage = run_attack_stage(config, out_dir, resume, prepared)
    timings.measure("attack", started)

    started = time.perf_counter()
    task_results, similarities = evaluate_all(config, tasks, stage.prepared.targets,
                                              stage.attack.clean, stage.result.encoder, device)
    zero_shot = zero_shot_for_experiment(config, zero_shot_plan, tasks, stage.prepared.targets,
                                         stage.attack.clean, stage.result.encoder, device)
    timings.measure("evaluate", started)

    results = {
        "schema": RESULTS_SCHEMA,
        "name": config.name,
        "kind": config.kind,
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "tasks": task_results,
        "attack": {"history": stage.result.history,
                   "seconds": round(stage.result.seconds, 2),
                   "shadow_images_per_second": round(stage.result.shadow_images_per_second, 2),
                   "backdoored_encoder": {"file": stage.encoder_path.name,
                                          "sha256": stage.encoder_sha256}},
        "provenance": {**stage.prepared.provenance,
                       "tasks": {name: task.provenance for name, task in tasks.items()}},
        "environment": environment(device),
        "timings_s": timings.seconds,
    }
    if zero_shot is not None:
        results["zero_shot"] = zero_shot
    write_outputs(out_dir, results, similarities)
    return results


def evaluate_all(config: ExperimentConfig, tasks: dict[str, TaskData],
                 targets: list[AttackTarget], clean: Encoder, backdoored: Encoder,
                 device: torch.device) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """CA/BA/ASR-B/ASR for every task; similarity samples for every target."""
    results: list[dict[str, Any]] = []
    similarities: dict[str, dict[str, list[float]]] = {}
    precision = config.attack.precision
    target_of = {t.task: (i, t) for i, t in enumerate(config.targets)}
    for name, task in tasks.items():
        index, spec = target_of.get(name, (None, None))
        trigger = targets[index].trigger if index is not None else None
        target_class = spec.target_class if spec is not None else None
        log(f"evaluating {name} ({len(task.train_labels)} train / {len(task.test_labels)} test)")
        kwargs = {"seed": config.seed, "trigger": trigger, "target_class": target_class,
                  "precision": precision}
        before = evaluate_encoder(clean, task, config.downstream.probe, device, **kwargs)  # type: ignore[arg-type]
        after = evaluate_encoder(backdoored, task, config.downstream.probe, device, **kwargs)  # type: ignore[arg-type]
        entry: dict[str, Any] = {"task": name, "target_class": target_class,
                                 "target_name": task.classes[target_class] if target_class is not None else None,
                                 "ca": before.accuracy, "ba": after.accuracy,
                                 "asr_b": before.asr, "asr": after.asr,
                                 "asr_b_all": before.asr_all, "asr_all": after.asr_all,
                                 "train_size": len(task.train_labels),
                                 "test_size": len(task.test_labels)}
        results.append(entry)
        if index is not None and before.triggered_features is not None and after.triggered_features is not None:
            references = targets[index].references
            similarities[name] = {
                "clean": similarity_to_references(clean, before.triggered_features, references, device).tolist(),
                "backdoored": similarity_to_references(backdoored, after.triggered_features, references, device).tolist(),
            }
        log(f"  {name}: CA={entry['ca']:.4f} BA={entry['ba']:.4f}" +
            (f" ASR-B={entry['asr_b']:.4f} ASR={entry['asr']:.4f}" if entry["asr"] is not None else ""))
    return results, similarities


@dataclass
class ZeroShotPlan:
    """Text classifiers [C,D] (CPU) per task, computed before the attack so that a bad
    weights file fails fast and the text tower's memory is freed during the attack."""

    weights: dict[str, torch.Tensor]
    templates: dict[str, list[str]]
    provenance: dict[str, str]


def prepare_zero_shot(config: ExperimentConfig, tasks: dict[str, TaskData],
                      device: torch.device) -> ZeroShotPlan | None:
    """Load the CLIP text tower and build every zero-shot task's classifier (None if unset)."""
    spec = config.downstream.zero_shot
    if spec is None:
        return None
    from sslbackdoor.models.clip import load_clip

    bundle = load_clip(config.encoder.arch, spec.clip_weights or config.encoder.weights)
    bundle.model.to(device)
    plan = ZeroShotPlan({}, {}, bundle.provenance)
    for name in spec.tasks or list(tasks):
        plan.templates[name] = templates_for(name, spec.templates)
        names = zero_shot_class_names(name, tasks[name].classes)
        plan.weights[name] = zero_shot_weights(bundle, names, plan.templates[name]).cpu()
    return plan


def zero_shot_for_experiment(config: ExperimentConfig, plan: ZeroShotPlan | None,
                             tasks: dict[str, TaskData], targets: list[AttackTarget],
                             clean: Encoder, backdoored: Encoder,
                             device: torch.device) -> list[dict[str, Any]] | None:
    """One results entry per zero-shot task (None when the config asks for none)."""
    if plan is None:
        return None
    target_of = {t.task: (i, t.target_class) for i, t in enumerate(config.targets)}
    entries = []
    for name, weights in plan.weights.items():
        task = tasks[name]
        index, target_class = target_of.get(name, (None, None))
        scores = evaluate_zero_shot(
            clean, backdoored, weights, task.test_images, task.test_labels, device,
            trigger=targets[index].trigger if index is not None else None,
            target_class=target_class, precision=config.attack.precision)
        entries.append({"task": name, "target_class": target_class,
                        "target_name": (task.classes[target_class]
                                        if target_class is not None else None),
                        **scores, "templates": plan.templates[name],
                        "test_size": len(task.test_labels)})
        log(f"  {name} zero-shot: " + " ".join(f"{k.upper()}={v:.4f}"
                                               for k, v in scores.items() if v is not None))
    return entries


def write_outputs(out_dir: Path, results: dict[str, Any],
                  similarities: dict[str, dict[str, list[float]]]) -> None:
    from sslbackdoor.report import plot_similarity_cdfs, render_report

    if similarities:
        plot_similarity_cdfs(similarities, out_dir / "similarity_cdf.png")
        results["figures"] = {"similarity_cdf": "similarity_cdf.png"}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_report(results))


def run_evaluate_stage(encoder_path: Path, task_names: list[str], out_dir: Path, *,
                       arch: str | None = None, clean: str | None = None,
                       target_class: int | None = None, trigger_size: int = 10,
                       image_size: int = 32, probe_epochs: int = 500,
                       train_limit: int | None = None, test_limit: int | None = None,
                       seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Evaluate a (suspect) encoder on downstream tasks; with `clean`, also CA and ASR-B.

    The trigger is a white square at the bottom-right (the BadEncoder default) and applies
    to the first task, whose target class is `target_class`.
    """
    from sslbackdoor.data.triggers import TriggerSpec
    from sslbackdoor.downstream.probe import ProbeConfig

    torch_device = resolve_device(device)
    seed_everything(seed)
    suspect = prepare_module(load_encoder(encoder_path, arch), torch_device)
    reference = (prepare_module(load_encoder(clean, arch or suspect.name), torch_device)
                 if clean else None)
    probe = ProbeConfig(epochs=probe_epochs)
    trigger = Trigger.from_spec(TriggerSpec(size=trigger_size), image_size)
    entries = []
    for index, name in enumerate(task_names):
        task = load_task(name, image_size, train_limit=train_limit, test_limit=test_limit,
                         seed=seed)
        targeted = index == 0 and target_class is not None
        if targeted:
            check_target_class(name, task.classes, target_class)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {"seed": seed, "trigger": trigger if targeted else None,
                                  "target_class": target_class if targeted else None}
        after = evaluate_encoder(suspect, task, probe, torch_device, **kwargs)
        before = evaluate_encoder(reference, task, probe, torch_device, **kwargs) if reference else None
        entries.append({"task": name, "target_class": kwargs["target_class"],
                        "ca": before.accuracy if before else None, "ba": after.accuracy,
                        "asr_b": before.asr if before else None, "asr": after.asr,
                        "asr_b_all": before.asr_all if before else None,
                        "asr_all": after.asr_all, "train_size": len(task.train_labels),
                        "test_size": len(task.test_labels), "provenance": task.provenance})
    results = {"schema": RESULTS_SCHEMA, "kind": "evaluate", "seed": seed,
               "encoder": encoder_provenance(encoder_path, arch),
               "clean_encoder": encoder_provenance(clean, arch or suspect.name) if clean else None,
               "tasks": entries, "environment": environment(torch_device)}
    with output_lock(out_dir):
        atomic_write_text(Path(out_dir) / "results.json", json.dumps(results, indent=2))
    return results


def check_inputs(config: ExperimentConfig) -> None:
    """Resolve every dataset an experiment reads (shadow, tasks, references) without
    training: a missing dataset, a target class out of range or too few reference images
    raise UserInputError."""
    def resolve(dataset: str, split: str, root: str | None, limit: int | None) -> Any:
        return load_dataset(dataset, split, image_size=config.image_size,  # type: ignore[arg-type]
                            root=root or config.data_root, limit=limit, seed=config.seed)

    for source in config.shadow:
        resolve(source.dataset, source.split, source.root, source.limit)
    for task in config.all_tasks():
        resolve(task.dataset, "train", task.root, None)
        test = resolve(task.dataset, "test", task.root, None)
        for target in (t for t in config.targets if t.task == task.dataset):
            check_target_class(task.dataset, test.classes, target.target_class)
    for index, target in enumerate(config.targets):
        spec = target.references
        label = spec.label if spec.label is not None else target.target_class
        labels = dataset_labels(resolve(spec.dataset, spec.split, spec.root, None))
        if int(torch.count_nonzero(labels == label)) < spec.count:
            raise UserInputError(f"targets.{index}.references: {spec.dataset}/{spec.split} "
                                 f"has fewer than {spec.count} images of class {label}")


def _dry_run(config: ExperimentConfig) -> list[str]:
    check_inputs(config)
    return [f"attack {config.name}: {config.encoder.arch}, {len(config.targets)} target(s), "
            f"{config.attack.epochs} epochs"]


def _run_kind(config: ExperimentConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    return run_badencoder_experiment(config, out_dir, resume)


register_kind("badencoder", ExperimentConfig, _run_kind, _dry_run)
