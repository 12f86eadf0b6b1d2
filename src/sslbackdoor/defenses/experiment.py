"""Experiment kind `defenses`: the BadEncoder paper's Section VI, all four defenses at once.

Against a clean encoder and a BadEncoder-backdoored one (a given checkpoint, or one this
run makes with `BadEncoderAttack` on the clean encoder) it runs

* Neural Cleanse on each encoder's downstream classifier (encoder + MLP), then unlearning;
* DECREE on each encoder alone (defender's unlabeled shadow images);
* MNTD: shadow encoders derived from the clean encoder, a meta-classifier, both scored;
* PatchGuard: robust masking on local encoder features (clean / certified accuracy, ASR);

and writes results.json and report.md (one table next to the paper's figures: anomaly
indices 1.94 / 1.34 / 1.25, MNTD 0.52, PatchGuard certified accuracy 0 with ASR 46–60%).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.attacks.badencoder import BadEncoderConfig
from sslbackdoor.config import DataSource, EncoderSpec, ReferenceSpec, dump_config
from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.defenses.decree import DecreeConfig, decree_scan, save_png, write_decree_outputs
from sslbackdoor.defenses.mntd import MNTDConfig, meta_score, run_mntd
from sslbackdoor.defenses.neural_cleanse import (
    EncoderClassifier,
    NeuralCleanseConfig,
    accuracy_and_asr,
    neural_cleanse,
    unlearn,
)
from sslbackdoor.defenses.patchguard import PatchGuardConfig, evaluate_patchguard
from sslbackdoor.downstream.evaluate import TaskData, check_target_class, load_task
from sslbackdoor.downstream.features import dataset_tensors, encode
from sslbackdoor.downstream.probe import ProbeConfig, train_probe
from sslbackdoor.engine import atomic_write_text, resolve_device, seed_everything
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder
from sslbackdoor.models.encoders import Encoder
from sslbackdoor.progress import log
from sslbackdoor.runners import register_kind

RESULTS_SCHEMA = "sslbackdoor.defenses/1"
PAPER_SOURCE = "BadEncoder (Jia, Liu, Gong, IEEE S&P 2022), Section VI"
PAPER_NC_ANOMALY_INDICES = (1.94, 1.34, 1.25)  # three downstream classifiers, all < 2
PAPER_MNTD_ACCURACY = 0.52
PAPER_PATCHGUARD_CERTIFIED = 0.0
PAPER_PATCHGUARD_ASR = (0.46, 0.60)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttackSpec(Strict):
    """How to make the backdoored encoder when no checkpoint is given."""

    shadow: list[DataSource] = Field(..., min_length=1)
    references: ReferenceSpec
    config: BadEncoderConfig = BadEncoderConfig(epochs=5, batch_size=64, lr=0.01)


class DefensesConfig(Strict):
    name: str = "defenses"
    kind: Literal["defenses"] = "defenses"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(32, ge=8)
    data_root: str | None = None
    download: bool = False
    encoder: EncoderSpec = Field(..., description="the clean encoder")
    backdoored_encoder: str | None = Field(
        None, description="checkpoint of the backdoored encoder; null: run `attack`")
    attack: AttackSpec | None = None
    task: str = Field("mnist-5k", description="downstream task the backdoor targets")
    target_class: int = Field(1, ge=0)
    trigger: TriggerSpec = TriggerSpec(size=10)
    train_limit: int | None = Field(2000, ge=1)
    test_limit: int | None = Field(1000, ge=1)
    probe: ProbeConfig = ProbeConfig(epochs=40, lr=5e-4)
    defender_shadow: DataSource = DataSource(dataset="natural-crops", split="unlabeled",
                                             limit=500)
    neural_cleanse: NeuralCleanseConfig = NeuralCleanseConfig()
    mitigate: bool = True
    decree: DecreeConfig = DecreeConfig()
    mntd: MNTDConfig = MNTDConfig()
    patchguard: PatchGuardConfig = PatchGuardConfig()

    @model_validator(mode="after")
    def _needs_a_backdoor(self) -> DefensesConfig:
        if self.backdoored_encoder is None and self.attack is None:
            raise ValueError("give `backdoored_encoder: PATH` or an `attack:` section")
        return self


def downstream_classifier(encoder: Encoder, task: TaskData, probe: ProbeConfig,
                          device: torch.device, seed: int) -> EncoderClassifier:
    """The victim's classifier: an MLP trained on the frozen encoder's normalised features."""
    features = encode(encoder, task.train_images, device, precision="fp32")
    head = train_probe(features, task.train_labels, len(task.classes), probe, seed)
    return EncoderClassifier(encoder, head).eval()


def neural_cleanse_on_task(encoder: Encoder, task: TaskData, config: NeuralCleanseConfig,
                           probe: ProbeConfig, device: torch.device, *, seed: int,
                           trigger_size: int = 10, target_class: int | None = None,
                           trigger: Trigger | None = None, mitigate: bool = False,
                           out_dir: Path | None = None) -> dict[str, Any]:
    """Neural Cleanse on `encoder`'s downstream classifier, optionally with unlearning."""
    image_size = int(task.train_images.shape[-1])
    if target_class is not None:
        check_target_class(task.name, task.classes, target_class)
        trigger = trigger or Trigger.from_spec(TriggerSpec(size=trigger_size), image_size)
    classifier = downstream_classifier(encoder, task, probe, device, seed)
    before = accuracy_and_asr(classifier, task.test_images, task.test_labels, device, trigger,
                              target_class)
    result = neural_cleanse(classifier, task.train_images, len(task.classes), config, device,
                            seed=seed, labels=task.train_labels)
    summary = {**result.summary(), "before": before}
    reversed_trigger = result.triggers[result.min_label]
    if out_dir is not None:
        save_png(reversed_trigger.mask.expand(3, -1, -1), Path(out_dir) / "nc_mask.png")
        save_png(reversed_trigger.mask * reversed_trigger.pattern, Path(out_dir) / "nc_trigger.png")
    if mitigate:
        repaired = unlearn(classifier, task.train_images, task.train_labels, reversed_trigger,
                           config.unlearn, device, seed)
        summary["mitigation"] = accuracy_and_asr(repaired, task.test_images, task.test_labels,
                                                 device, trigger, target_class)
    return summary


def backdoored_encoder(config: DefensesConfig, out_dir: Path,
                       resume: bool = False) -> tuple[Encoder, dict[str, Any]]:
    """The given backdoored checkpoint, or one made now by BadEncoder on the clean encoder
    (checkpointed every epoch in `out_dir/attack`; with `resume`, continued from there)."""
    if config.backdoored_encoder is not None:
        path = Path(config.backdoored_encoder)
        return load_encoder(path, None), encoder_provenance(path, None)
    assert config.attack is not None  # the validator guarantees one of the two
    from sslbackdoor.config import ExperimentConfig
    from sslbackdoor.experiment import run_attack_stage

    attack_config = ExperimentConfig.model_validate({
        "name": f"{config.name}-attack", "seed": config.seed, "device": config.device,
        "image_size": config.image_size, "data_root": config.data_root,
        "encoder": config.encoder.model_dump(),
        "shadow": [s.model_dump() for s in config.attack.shadow],
        "targets": [{"task": config.task, "target_class": config.target_class,
                     "trigger": config.trigger.model_dump(),
                     "references": config.attack.references.model_dump()}],
        "attack": config.attack.config.model_dump()})
    stage = run_attack_stage(attack_config, out_dir / "attack", resume=resume)
    return (load_encoder(stage.encoder_path, None),
            encoder_provenance(stage.encoder_path, None))


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 1)


class _Stages:
    """Finished stages of one run, one JSON file each under `out_dir/stages`, keyed by the
    config's hash: with --resume a stage that finished before an interruption is read back
    instead of recomputed. Every stage re-seeds, so its numbers do not depend on which
    stages ran before it in this process."""

    def __init__(self, config: DefensesConfig, out_dir: Path, resume: bool,
                 encoders: dict[str, Any]) -> None:
        """`encoders`: the provenance (with sha256) of each encoder, so a stage is not reused
        against a checkpoint file that changed under the same path."""
        self.config, self.folder, self.resume = config, out_dir / "stages", resume
        key = dump_config(config) + json.dumps(encoders, sort_keys=True)
        self.hash = hashlib.sha256(key.encode()).hexdigest()[:16]

    def run(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.folder / f"{name}.json"
        if self.resume and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("config_hash") == self.hash:
                log(f"{name}: finished earlier, reused")
                return dict(saved["result"])
        seed_everything(self.config.seed)
        result = compute()
        atomic_write_text(path, json.dumps({"config_hash": self.hash, "result": result},
                                           indent=2))
        return result


def run_defenses_experiment(config: DefensesConfig, out_dir: Path,
                            resume: bool = False) -> dict[str, Any]:
    """Everything in the module docstring; returns the dict written to results.json."""
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    clock = _Clock()
    started = time.perf_counter()
    clean = load_encoder(config.encoder.weights, config.encoder.arch)
    task = load_task(config.task, config.image_size, root=config.data_root,
                     train_limit=config.train_limit, test_limit=config.test_limit,
                     seed=config.seed)
    check_target_class(config.task, task.classes, config.target_class)
    shadow = _defender_shadow(config)
    trigger = Trigger.from_spec(config.trigger, config.image_size)
    clock.lap("load", started)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    started = time.perf_counter()
    backdoored, provenance = backdoored_encoder(config, out_dir, resume)
    clock.lap("attack", started)
    clean_provenance = encoder_provenance(config.encoder.weights, config.encoder.arch)
    # An encoder this run's attack made is fixed by the config (its file's sha256 is not:
    # safetensors writes metadata in a per-process order); a given file is keyed by content.
    made = config.backdoored_encoder is None
    stages = _Stages(config, out_dir, resume, {
        "clean": clean_provenance.get("sha256"),
        "backdoored": "this run's attack" if made else provenance.get("sha256")})
    encoders = {"clean": clean, "backdoored": backdoored}
    per_encoder = {name: _defend_one(name, model, task, shadow, trigger, config, device,
                                     out_dir, clock, stages) for name, model in encoders.items()}
    started = time.perf_counter()
    mntd = stages.run("mntd", lambda: _mntd_stage(clean, encoders, shadow, config, device))
    for name, score in mntd["scores"].items():
        per_encoder[name]["mntd"] = {"score": score,
                                     "flagged": score > config.mntd.score_threshold}
    clock.lap("mntd", started)
    results = {
        "schema": RESULTS_SCHEMA, "name": config.name, "kind": config.kind, "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "encoders": per_encoder, "mntd": mntd["summary"],
        "tasks": [_task_row(config, task, per_encoder)],
        "provenance": {"clean_encoder": clean_provenance,
                       "backdoored_encoder": provenance, "task": task.provenance,
                       "defender_shadow": {"images": int(shadow.shape[0]),
                                           **config.defender_shadow.model_dump()}},
        "environment": {"device": str(device), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        "timings_s": clock.seconds,
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_defenses_report(results))
    return results


def _mntd_stage(clean: Encoder, encoders: dict[str, Encoder], shadow: torch.Tensor,
                config: DefensesConfig, device: torch.device) -> dict[str, Any]:
    log("MNTD: shadow encoders from the clean encoder")
    mntd = run_mntd(clean, shadow, config.mntd, device, seed=config.seed)
    return {"summary": mntd.summary(),
            "scores": {name: meta_score(mntd.meta, model, device)
                       for name, model in encoders.items()}}


def _defender_shadow(config: DefensesConfig) -> torch.Tensor:
    source = config.defender_shadow
    dataset = load_dataset(source.dataset, source.split, image_size=config.image_size,
                           root=source.root or config.data_root, limit=source.limit,
                           seed=config.seed)
    images, _ = dataset_tensors(dataset)
    if images.shape[0] < 2:
        raise UserInputError(f"defender_shadow: {source.dataset} gave {images.shape[0]} images")
    return images


def _defend_one(name: str, encoder: Encoder, task: TaskData, shadow: torch.Tensor,
                trigger: Trigger, config: DefensesConfig, device: torch.device,
                out_dir: Path, clock: _Clock, stages: _Stages) -> dict[str, Any]:
    """Neural Cleanse (+ unlearning), DECREE and PatchGuard against one encoder."""
    folder = out_dir / name

    def nc() -> dict[str, Any]:
        log(f"{name} encoder: Neural Cleanse on its {task.name} classifier")
        return neural_cleanse_on_task(encoder, task, config.neural_cleanse, config.probe, device,
                                      seed=config.seed, target_class=config.target_class,
                                      trigger=trigger, mitigate=config.mitigate, out_dir=folder)

    def decree() -> dict[str, Any]:
        log(f"{name} encoder: DECREE")
        result = decree_scan(encoder, shadow, config.decree, device, seed=config.seed)
        write_decree_outputs(result, shadow, folder / "decree")
        return dict(result.summary())

    def patchguard() -> dict[str, Any]:
        log(f"{name} encoder: PatchGuard")
        return dict(evaluate_patchguard(encoder, task.train_images, task.train_labels,
                                        task.test_images, task.test_labels, len(task.classes),
                                        config.patchguard, device, trigger=trigger,
                                        target=config.target_class, seed=config.seed).summary())

    entry = {}
    for stage, compute in (("neural_cleanse", nc), ("decree", decree), ("patchguard", patchguard)):
        started = time.perf_counter()
        entry[stage] = stages.run(f"{name}-{stage}", compute)
        clock.lap(stage, started)
    return entry


def _task_row(config: DefensesConfig, task: TaskData,
              per_encoder: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CA/BA/ASR-B/ASR without defenses, in the shape the CLI summary prints."""
    clean = per_encoder["clean"]["neural_cleanse"]["before"]
    backdoored = per_encoder["backdoored"]["neural_cleanse"]["before"]
    return {"task": task.name, "target_class": config.target_class,
            "target_name": task.classes[config.target_class],
            "ca": clean["accuracy"], "ba": backdoored["accuracy"],
            "asr_b": clean.get("asr"), "asr": backdoored.get("asr")}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _flag(flagged: bool) -> str:
    return "**flagged**" if flagged else "not flagged"


def render_defenses_report(results: dict[str, Any]) -> str:
    """report.md: the defenses table next to the paper's Section VI figures."""
    enc, config = results["encoders"], results["config"]
    clean, bd = enc["clean"], enc["backdoored"]
    nc_paper = " / ".join(f"{v:.2f}" for v in PAPER_NC_ANOMALY_INDICES)

    def nc(entry: dict[str, Any]) -> str:
        block = entry["neural_cleanse"]
        return (f"{block['min_label_anomaly_index']:.2f} (label {block['min_label']}), "
                f"{_flag(block['flagged'])}{_convergence(block)}")

    def unlearned(entry: dict[str, Any]) -> str:
        after = entry["neural_cleanse"].get("mitigation") or {}
        return f"acc {_pct(after.get('accuracy'))}, ASR {_pct(after.get('asr'))}" if after else "–"

    def pg(entry: dict[str, Any]) -> str:
        block = entry["patchguard"]
        return (f"clean {_pct(block['clean_accuracy'])}, certified "
                f"{_pct(block['certified_accuracy'])}, ASR {_pct(block['asr'])}")

    rows = [
        ["Neural Cleanse: anomaly index (flag > 2)", nc(clean), nc(bd),
         f"{nc_paper} (not detected)"],
        ["Neural Cleanse + unlearning: accuracy, ASR", unlearned(clean), unlearned(bd), "–"],
        [f"DECREE: PL1 (flag < {config['decree']['pl1_threshold']})",
         f"{clean['decree']['pl1']:.4f}, {_flag(clean['decree']['flagged'])}",
         f"{bd['decree']['pl1']:.4f}, {_flag(bd['decree']['flagged'])}",
         "– (DECREE is later work)"],
        ["MNTD: score (flag > 0.5)",
         f"{clean['mntd']['score']:.3f}, {_flag(clean['mntd']['flagged'])}",
         f"{bd['mntd']['score']:.3f}, {_flag(bd['mntd']['flagged'])}",
         "– (its detection accuracy is over many encoders: below)"],
        [f"PatchGuard (patch {bd['patchguard']['patch_size']} px)", pg(clean), pg(bd),
         f"certified {PAPER_PATCHGUARD_CERTIFIED:.0f}, ASR "
         f"{PAPER_PATCHGUARD_ASR[0]:.0%}–{PAPER_PATCHGUARD_ASR[1]:.0%}"],
    ]
    task = results["tasks"][0]
    mntd = results["mntd"]
    lines = [
        f"# {results['name']}: defenses against BadEncoder",
        _scale_line(results),
        "## Without defenses",
        f"Task {task['task']}, target class {task['target_class']} ({task['target_name']}): "
        f"CA {_pct(task['ca'])}, BA {_pct(task['ba'])}, ASR-B {_pct(task['asr_b'])}, "
        f"ASR {_pct(task['asr'])} (ASR excludes target-class inputs).",
        "## Defenses, next to the paper",
        _table(["defense / metric", "clean encoder", "backdoored encoder",
                f"paper ({PAPER_SOURCE})"], rows),
        _mntd_line(mntd),
        "The paper's rows are for CIFAR10/STL10 ResNet18 encoders at full scale; ours differ "
        "in encoder, data and budget (stated above): compare the verdicts, not the digits.",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()),
    ]
    return "\n\n".join(lines) + "\n"


def _convergence(block: dict[str, Any]) -> str:
    """Which labels' inversions converged (stopped by the early-stop rule, not the budget)."""
    converged = block.get("converged")
    if converged is None:  # results from before convergence was recorded
        return ""
    missing = [str(label) for label, done in enumerate(converged) if not done]
    return (f"; {len(converged) - len(missing)} of {len(converged)} labels converged"
            + (f" (not: {', '.join(missing)})" if missing else ""))


def _mntd_line(mntd: dict[str, Any]) -> str:
    """Held-out AUC and, separately, the detection accuracy the paper reports."""
    count = len(mntd["heldout_labels"])
    official = ("" if "heldout_accuracy_at_median" not in mntd else
                f"; detection accuracy {mntd['heldout_accuracy_at_median']:.3f} at the official "
                f"threshold (the median score, {mntd['heldout_median_threshold']:.3f}), the "
                f"quantity of the paper's {PAPER_MNTD_ACCURACY:.2f}")
    return (f"MNTD on {count} held-out shadow encoders: AUC {mntd['heldout_auc']:.3f}{official}; "
            f"accuracy {mntd['heldout_accuracy']:.3f} at the fixed score threshold.")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _scale_line(results: dict[str, Any]) -> str:
    config, env = results["config"], results["environment"]
    encoder = config["encoder"]
    mntd, nc = config["mntd"], config["neural_cleanse"]["inversion"]
    return (f"Scale: encoder `{encoder['arch']}` ({encoder['weights']}), "
            f"{config['image_size']} px, "
            f"task {config['task']} ({config['train_limit']} train / {config['test_limit']} test), "
            f"defender shadow {results['provenance']['defender_shadow']['images']} images; "
            f"Neural Cleanse ≤ {nc['steps']}×{nc['batches_per_step']} batches per label; DECREE ≤ "
            f"{config['decree']['inversion']['steps']} epochs over the shadow set; MNTD {mntd['train_models']} + "
            f"{mntd['heldout_models']} shadow encoders × {mntd['shadow']['steps']} steps; "
            f"PatchGuard r={config['patchguard']['receptive_field']}, "
            f"s={config['patchguard']['stride']}; device {env['device']} "
            f"({env['threads']} threads), torch {env['torch']}; seed {results['seed']}.")


def _run_kind(config: DefensesConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    return run_defenses_experiment(config, out_dir, resume)


register_kind("defenses", DefensesConfig, _run_kind)
