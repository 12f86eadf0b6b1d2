"""The CorruptEncoder comparison as one experiment (`kind: corruptencoder`).

For every poisoning method (none, CorruptEncoder, CorruptEncoder+, SSL-Backdoor,
PoisonedEncoder, CTRL) and every crop policy (standard, localized cropping), pre-train an
encoder (SimCLR or MoCo-v2, `simclr.method`) on the clean set plus that method's poisons,
then train a linear probe on a downstream task whose target class is absent from
pre-training and measure CA and ASR (triggered test inputs: the trigger at a random place
in the central band; inputs of the target class excluded). Every input (data, references,
supports, backgrounds) is loaded and the target checked before anything is written.

Writes into the output folder: inputs/ (the reference, support and background images
used), poisons/<method>/ (images + manifest), encoders/<method>[-localized]/ (each
pre-training run, resumable), results.json and report.md (the table and a "Findings"
section that checks the paper's claims against the measured rows).

Rerunning into the same folder reuses a finished pre-training run only when its
results.json `config_hash` equals the hash of the run that would be trained now; the hash
covers the clean data sources, seed, image size, every pre-training hyper-parameter and a
sha256 of the poisoned images themselves (the pre-training config describes the poisons as
`poisons:METHOD@sha256:DIGEST`, a description rather than a loadable source), so a changed
trigger, layout or ratio is never answered with a stale encoder. Anything else raises a
`UserInputError` before any file of that folder is replaced. `resume` continues unfinished
runs from their last epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.attacks.cli import trigger_patch
from sslbackdoor.attacks.corruptencoder import (
    PoisonConfig,
    PoisonLayout,
    ReferenceObject,
    derive_mask,
    generate_corruptencoder,
    load_reference_objects,
    save_png,
)
from sslbackdoor.attacks.crop_pairs import PairCriteria, expected_attack_pairs
from sslbackdoor.attacks.poisoning_baselines import BaselineConfig, generate_baseline, paste_central
from sslbackdoor.config import DataSource, dump_config
from sslbackdoor.data.datasets import Split, load_dataset
from sslbackdoor.data.sources import load_sources
from sslbackdoor.downstream.features import dataset_tensors, encode
from sslbackdoor.downstream.probe import ProbeConfig, predict, train_probe
from sslbackdoor.engine import atomic_write_text, resolve_device, seed_everything
from sslbackdoor.errors import UserInputError
from sslbackdoor.experiment import environment
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.models.checkpoints import load_encoder
from sslbackdoor.progress import log
from sslbackdoor.runners import register_kind
from sslbackdoor.ssl.pretrain import (
    ContrastiveConfig,
    MonitorConfig,
    PretrainConfig,
    pretrain_hash,
    run_pretrain,
)

Method = Literal["clean", "corruptencoder", "corruptencoder+", "ssl-backdoor",
                 "poisonedencoder", "ctrl"]
ALL_METHODS: list[Method] = ["clean", "corruptencoder", "corruptencoder+", "ssl-backdoor",
                             "poisonedencoder", "ctrl"]
BASELINES: list[Method] = ["ssl-backdoor", "poisonedencoder", "ctrl"]
CORRUPTENCODERS: tuple[Method, ...] = ("corruptencoder", "corruptencoder+")  # object + trigger
METHOD_NAMES = {"clean": "clean", "corruptencoder": "CorruptEncoder",
                "corruptencoder+": "CorruptEncoder+", "ssl-backdoor": "SSL-Backdoor",
                "poisonedencoder": "PoisonedEncoder", "ctrl": "CTRL"}

# CorruptEncoder (CVPR 2024), ImageNet100-A → ImageNet100-B, 0.5% poisons, 3 references.
PAPER_CA_ASR: dict[str, tuple[float, float]] = {
    "clean": (61.2, 0.4), "corruptencoder": (61.6, 92.9), "corruptencoder+": (61.7, 99.5),
    "poisonedencoder": (61.1, 35.5), "ssl-backdoor": (61.3, 14.3)}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassImages(Strict):
    """`count` images of class `label` from a dataset split (never a test split here)."""

    dataset: str
    split: Literal["train", "unlabeled"] = "train"
    label: int = Field(..., ge=0)
    count: int = Field(..., ge=1)
    offset: int = Field(0, ge=0, description="skip the first N images of the class (e.g. "
                                             "to keep supports apart from references)")
    root: str | None = None


class DownstreamTask(Strict):
    dataset: str
    classes: list[int] = Field(..., min_length=2, description="the downstream classes")
    target_class: int = Field(..., ge=0, description="label (in the dataset) of the target")
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    probe: ProbeConfig = ProbeConfig(kind="linear", epochs=100, lr=1e-3, batch_size=256)


class PoisoningExperimentConfig(Strict):
    name: str = "corruptencoder"
    kind: Literal["corruptencoder"] = "corruptencoder"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(32, ge=8)
    data_root: str | None = None
    pretrain_data: list[DataSource] = Field(..., min_length=1)
    simclr: ContrastiveConfig = ContrastiveConfig()
    methods: list[Method] = Field(default_factory=lambda: list(ALL_METHODS))
    localized_crop: list[bool] = Field(default_factory=lambda: [False, True])
    poison_ratio: float = Field(
        0.005, gt=0, le=0.5, description="poisons / clean images (the paper's threat model "
                                         "is ≤ 0.01; larger ratios check the mechanism)")
    support_ratio: float = Field(0.2, ge=0, le=1, description="CorruptEncoder+ support share")
    references: ClassImages | None = Field(
        None, description="target-class images whose masks are derived from their plain "
                          "background (Fashion-MNIST-like); or give reference_folder")
    reference_folder: str | None = Field(
        None, description="folder of NAME.png + NAME_mask.png reference objects (e.g. the "
                          "authors' masked ImageNet references); replaces `references`")
    supports: ClassImages
    backgrounds: DataSource
    background_size: int = Field(96, ge=8)
    trigger_size: int = Field(8, ge=1)
    trigger_pattern: Literal["random", "white", "checkerboard"] = "random"
    layout: PoisonLayout = PoisonLayout()
    downstream: DownstreamTask

    @model_validator(mode="after")
    def _one_reference_source(self) -> PoisoningExperimentConfig:
        if (self.references is None) == (self.reference_folder is None):
            raise ValueError("give exactly one of `references` (class images) and "
                             "`reference_folder` (images with masks)")
        return self

    @model_validator(mode="after")
    def _target_absent_from_pretraining(self) -> PoisoningExperimentConfig:
        check_target(self)  # UserInputError is a ValueError: reported as a config error
        return self


def check_target(config: PoisoningExperimentConfig) -> None:
    """The target must be a downstream class and absent from the pre-training data."""
    task = config.downstream
    if task.target_class not in task.classes:
        raise UserInputError(f"downstream.target_class {task.target_class} is not among "
                             f"downstream.classes {task.classes}")
    for index, source in enumerate(config.pretrain_data):
        if source.dataset != task.dataset:
            continue  # another label space: nothing to compare
        if source.classes is None:
            raise UserInputError(
                f"pretrain_data.{index} uses every class of {source.dataset}, so the target "
                f"class {task.target_class} is among the pre-training classes; list the "
                f"pre-training classes with `classes:` and leave the target out")
        if task.target_class in source.classes:
            raise UserInputError(
                f"downstream.target_class {task.target_class} is among the pre-training "
                f"classes {source.classes} of pretrain_data.{index} ({source.dataset}); the "
                f"attack assumes a target class absent from pre-training")


def class_images(spec: ClassImages, image_size: int | None, data_root: str | None) -> torch.Tensor:
    dataset = load_dataset(spec.dataset, spec.split, image_size=image_size,
                           root=spec.root or data_root)
    images, labels = dataset_tensors(dataset)
    chosen = images[labels == spec.label][spec.offset:spec.offset + spec.count]
    if chosen.shape[0] < spec.count:
        available = int((labels == spec.label).sum())
        raise UserInputError(f"{spec.dataset}/{spec.split} has {available} images of class "
                             f"{spec.label}; {spec.count} after the first {spec.offset} "
                             f"requested")
    return chosen


def write_images(folder: Path, images: torch.Tensor) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        save_png(path, image.permute(1, 2, 0).numpy())
        paths.append(path)
    return paths


@dataclass
class Inputs:
    """The attacker's images, loaded before anything is written: reference objects (with
    their masks), target-class supports and backgrounds (uint8 [N,3,H,W])."""

    references: list[ReferenceObject]
    supports: torch.Tensor
    backgrounds: torch.Tensor


def load_inputs(config: PoisoningExperimentConfig) -> Inputs:
    if config.reference_folder is not None:
        references = load_reference_objects(Path(config.reference_folder))
    else:
        assert config.references is not None  # one of the two, by validation
        images = class_images(config.references, None, config.data_root)
        references = [ReferenceObject(f"{index:05d}.png", array, derive_mask(array))
                      for index, array in enumerate(images.permute(0, 2, 3, 1).numpy())]
    backgrounds, _ = load_sources([config.backgrounds], config.background_size,
                                  data_root=config.data_root, seed=config.seed)
    return Inputs(references, class_images(config.supports, config.image_size,
                                           config.data_root), backgrounds)


def write_inputs(inputs: Inputs, out_dir: Path) -> dict[str, list[Path]]:
    """Reference objects (NAME.png + NAME_mask.png), supports and backgrounds as files
    under out_dir/inputs, as a user of `sslbackdoor poison` has them."""
    folder = out_dir / "inputs"
    if folder.exists():  # poison generation reads whole folders: no earlier files in them
        shutil.rmtree(folder)
    references = []
    for obj in inputs.references:
        stem = Path(obj.name).stem
        save_png(folder / "references" / f"{stem}_mask.png", obj.mask.astype(np.uint8) * 255)
        save_png(folder / "references" / f"{stem}.png", obj.image)
        references.append(folder / "references" / f"{stem}.png")
    return {"references": references,
            "supports": write_images(folder / "supports", inputs.supports),
            "backgrounds": write_images(folder / "backgrounds", inputs.backgrounds)}


def make_poisons(config: PoisoningExperimentConfig, method: Method, count: int,
                 inputs: dict[str, list[Path]], out_dir: Path) -> Path | None:
    """Write `count` poisons of `method` (None for the clean run); returns their folder."""
    if method == "clean":
        return None
    folder = out_dir / "poisons" / method
    if folder.exists():  # a smaller count must not leave earlier poisons behind
        shutil.rmtree(folder)
    trigger = trigger_patch(config.trigger_size, config.trigger_pattern, None, config.seed)
    layout = config.layout.model_copy(update={"output_size": config.image_size})
    if method in CORRUPTENCODERS:
        support_ratio = config.support_ratio if method == "corruptencoder+" else 0.0
        generate_corruptencoder(load_reference_objects(inputs["references"][0].parent),
                                inputs["backgrounds"], trigger,
                                PoisonConfig(count=count, support_ratio=support_ratio,
                                             seed=config.seed, layout=layout),
                                folder, inputs["supports"])
    else:
        generate_baseline(BaselineConfig(method=method, count=count, seed=config.seed,
                                         output_size=config.image_size),
                          folder, target_images=inputs["supports"], trigger=trigger,
                          references=inputs["references"], backgrounds=inputs["backgrounds"])
    return folder / "images"


def load_poisons(config: PoisoningExperimentConfig, poisons: Path | None
                ) -> tuple[torch.Tensor | None, str | None]:
    """The poisoned images as the encoder sees them (uint8 [P,3,S,S]) and their sha256."""
    if poisons is None:
        return None, None
    images, _ = load_sources([DataSource(dataset=f"images:{poisons}", split="train")],
                             config.image_size)
    return images, hashlib.sha256(images.numpy().tobytes()).hexdigest()


def pretrain_config(config: PoisoningExperimentConfig, method: Method, digest: str | None,
                    count: int, localized: bool, name: str) -> PretrainConfig:
    """The pre-training run of one method and crop policy; the poisons enter its data
    list (and so its config hash) as `poisons:METHOD@sha256:DIGEST`."""
    data = [*config.pretrain_data]
    if digest is not None:
        data.append(DataSource(dataset=f"poisons:{method}@sha256:{digest}", split="train",
                               limit=count))
    simclr = config.simclr.model_copy(deep=True)
    simclr.augment = simclr.augment.model_copy(update={"localized_crop": localized})
    return PretrainConfig(name=name, seed=config.seed, device=config.device,
                          image_size=config.image_size, data_root=config.data_root,
                          data=data, simclr=simclr,
                          monitor=MonitorConfig(dataset=config.downstream.dataset,
                                                knn_every=0, bank_limit=2000,
                                                test_limit=1000, probe=None))


def finished_hash(folder: Path) -> str | None:
    """The config_hash of a finished pre-training run in `folder`, None if unfinished."""
    results = folder / "results.json"
    if not (results.is_file() and (folder / "encoder.safetensors").is_file()):
        return None
    try:
        return str(json.loads(results.read_text(encoding="utf-8"))["config_hash"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserInputError(f"{results} is unreadable or has no config_hash; delete "
                             f"{folder} or use a new --out folder") from None


def check_reusable(folder: Path, pretrain: PretrainConfig) -> bool:
    """True if `folder` holds a finished run of exactly `pretrain`; False if unfinished.

    A finished run of another config raises: its encoder must not be reused silently.
    """
    found = finished_hash(folder)
    if found is None:
        return False
    expected = pretrain_hash(pretrain)
    if found != expected:
        raise UserInputError(
            f"{folder} holds a finished pre-training run of another config (config_hash "
            f"{found}, this config: {expected}; data, poisons, seed or hyper-parameters "
            f"differ); use a new --out folder or delete {folder}")
    return True


def pretrain_encoder(pretrain: PretrainConfig, clean: torch.Tensor,
                     poison_images: torch.Tensor | None, out_dir: Path,
                     resume: bool) -> tuple[Path, bool]:
    """Pre-train on clean images plus poisons unless `out_dir` holds exactly this run
    finished already; returns the encoder file and whether it was reused."""
    poisoned = 0 if poison_images is None else poison_images.shape[0]
    if check_reusable(out_dir, pretrain):
        log(f"{out_dir.name}: reusing the finished pre-training run in {out_dir}")
        return out_dir / "encoder.safetensors", True
    log(f"pre-training {out_dir.name}: {clean.shape[0]} clean + {poisoned} poisoned images")
    images = clean if poison_images is None else torch.cat([clean, poison_images])
    run_pretrain(pretrain, out_dir, resume=resume, images=images)
    return out_dir / "encoder.safetensors", False


def downstream_data(config: PoisoningExperimentConfig) -> dict[str, torch.Tensor]:
    """Train/test images and labels of the downstream classes, labels renumbered 0..C-1."""
    task = config.downstream
    out: dict[str, torch.Tensor] = {}
    splits: tuple[tuple[Split, int | None], ...] = (("train", task.train_limit),
                                                    ("test", task.test_limit))
    for split, limit in splits:
        images, labels = dataset_tensors(load_dataset(task.dataset, split,
                                                      image_size=config.image_size,
                                                      root=config.data_root))
        keep = torch.isin(labels, torch.tensor(task.classes))
        images, labels = images[keep][:limit], labels[keep][:limit]
        remap = {c: i for i, c in enumerate(task.classes)}
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = torch.tensor([remap[int(y)] for y in labels])
    return out


def triggered_test_images(images: torch.Tensor, trigger: np.ndarray, seed: int) -> torch.Tensor:
    """The trigger pasted at a random place in the central band of every image."""
    rng = np.random.default_rng(seed)
    stamped = [paste_central(image.permute(1, 2, 0).numpy(), trigger, rng)[0] for image in images]
    return torch.from_numpy(np.stack(stamped)).permute(0, 3, 1, 2).contiguous()


def evaluate(config: PoisoningExperimentConfig, encoder_path: Path, data: dict[str, torch.Tensor],
             triggered: torch.Tensor, device: torch.device) -> dict[str, float]:
    encoder = load_encoder(encoder_path).to(device)
    precision = config.simclr.precision
    train = encode(encoder, data["train_images"], device, precision=precision)
    probe = train_probe(train, data["train_labels"], len(config.downstream.classes),
                        config.downstream.probe, config.seed)
    test_predictions = predict(probe, encode(encoder, data["test_images"], device,
                                             precision=precision))
    triggered_predictions = predict(probe, encode(encoder, triggered, device,
                                                  precision=precision))
    target = config.downstream.classes.index(config.downstream.target_class)
    return {"ca": accuracy(test_predictions, data["test_labels"]),
            "asr": attack_success_rate(triggered_predictions, data["test_labels"], target),
            "asr_all": attack_success_rate(triggered_predictions, data["test_labels"], target,
                                           exclude_target=False)}


def run_name(method: Method, localized: bool) -> str:
    return f"{method}{'-localized' if localized else ''}"


PoisonSets = dict[Method, tuple[torch.Tensor | None, str | None]]


def prepare_poisons(config: PoisoningExperimentConfig, loaded: Inputs, count: int,
                    root: Path) -> tuple[dict[str, list[Path]], PoisonSets]:
    """Write the inputs and every method's poisons under `root`; load the poisons back."""
    inputs = write_inputs(loaded, root)
    poisons: PoisonSets = {}
    for method in config.methods:
        poisons[method] = load_poisons(config, make_poisons(config, method, count, inputs, root))
    return inputs, poisons


PAPER_POISON_EPOCHS = 650 * 200  # ImageNet100-A poisons × MoCo-v2 epochs in the paper


def attack_pairs(config: PoisoningExperimentConfig, method: Method, localized: bool,
                 out_dir: Path) -> dict[str, Any]:
    """For CorruptEncoder(+) runs, how many trigger-view/object-view positive pairs
    pre-training is expected to draw (see `crop_pairs`); nothing for other methods."""
    if method not in CORRUPTENCODERS:
        return {}
    augment = config.simclr.augment.model_copy(update={"localized_crop": localized})
    return {"attack_pairs": expected_attack_pairs(out_dir / "poisons" / method,
                                                  config.image_size, augment,
                                                  config.simclr.epochs, config.seed)}


def poison_count(config: PoisoningExperimentConfig, clean_images: int) -> int:
    """Poisons per method: `poison_ratio` of the clean set, at least one."""
    return max(1, round(config.poison_ratio * clean_images))


def run_poisoning_experiment(config: PoisoningExperimentConfig, out_dir: Path,
                             resume: bool = False) -> dict[str, Any]:
    check_target(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    started = time.perf_counter()
    clean, provenance = load_sources(config.pretrain_data, config.image_size,
                                     data_root=config.data_root, seed=config.seed)
    data = downstream_data(config)
    loaded = load_inputs(config)
    out_dir = Path(out_dir)
    count = poison_count(config, clean.shape[0])
    runs = [(method, localized) for method in config.methods
            for localized in config.localized_crop]
    if any(finished_hash(out_dir / "encoders" / run_name(*run)) is not None for run in runs):
        # Check the finished runs against poisons made in a scratch folder first, so that a
        # mismatch leaves this folder's config, inputs and poisons as they were.
        with tempfile.TemporaryDirectory(prefix="sslbackdoor-poisons-") as scratch:
            _, staged = prepare_poisons(config, loaded, count, Path(scratch))
        for method, localized in runs:
            name = run_name(method, localized)
            check_reusable(out_dir / "encoders" / name,
                           pretrain_config(config, method, staged[method][1], count,
                                           localized, name))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    inputs, poisons = prepare_poisons(config, loaded, count, out_dir)
    trigger = trigger_patch(config.trigger_size, config.trigger_pattern, None, config.seed)
    triggered = triggered_test_images(data["test_images"], trigger, config.seed + 1)
    rows, encoders = [], []
    for method, localized in runs:
        poison_images, digest = poisons[method]
        name = run_name(method, localized)
        folder = out_dir / "encoders" / name
        pretrain = pretrain_config(config, method, digest, count, localized, name)
        encoder, reused = pretrain_encoder(pretrain, clean, poison_images, folder, resume)
        scores = evaluate(config, encoder, data, triggered, device)
        log(f"  {name}: CA={scores['ca']:.4f} ASR={scores['asr']:.4f}")
        rows.append({"method": method, "localized_crop": localized,
                     "poisons": 0 if poison_images is None else count, **scores,
                     **attack_pairs(config, method, localized, out_dir)})
        encoders.append({"run": name, "config_hash": pretrain_hash(pretrain),
                         "poisons_sha256": digest, "reused": reused})
    results = {"schema": "sslbackdoor.corruptencoder/1", "kind": config.kind, "name": config.name,
               "seed": config.seed, "config": config.model_dump(mode="json"), "rows": rows,
               "clean_images": int(clean.shape[0]), "poison_count": count,
               "encoders": encoders,
               "provenance": {"pretrain": provenance,
                              "inputs": {k: len(v) for k, v in inputs.items()}},
               "environment": environment(device),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_poisoning_report(results))
    return results


def _row(rows: list[dict[str, Any]], method: str, localized: bool) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method
                 and bool(r["localized_crop"]) == localized), None)


def _points(value: float) -> float:
    """A fraction in [0, 1] as percentage points, rounded as the report prints them."""
    return round(100 * float(value), 2)


def poisoning_findings(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's claims checked against measured rows (fractions `ca`, `asr` per
    `method` and `localized_crop`), one Markdown bullet each; claims whose methods are
    missing from the rows are skipped."""
    lines = []

    def verdict(holds: bool) -> str:
        return "**Holds**" if holds else "**Does not hold**"

    attack, clean = _row(rows, "corruptencoder", False), _row(rows, "clean", False)
    baselines = [row for method in BASELINES if (row := _row(rows, method, False))]
    if attack is not None and baselines:
        best = max(baselines, key=lambda r: float(r["asr"]))
        asr, base = _points(attack["asr"]), _points(best["asr"])
        lines.append(
            f"- {verdict(asr >= base + 20)}: CorruptEncoder's ASR is at least 20 points above "
            f"the best baseline's — measured {asr:.2f} vs {base:.2f} "
            f"({METHOD_NAMES[best['method']]}), a margin of {asr - base:+.2f} points "
            f"(paper: 92.9 vs 35.5, PoisonedEncoder).")
    def within(claim: str, metric: str, points: float, attacked: dict[str, Any] | None,
               reference: dict[str, Any] | None, paper: str = "") -> None:
        """A claim that the attacked encoder's metric is within `points` of the clean one's."""
        if attacked is None or reference is None:
            return
        ours, theirs = _points(attacked[metric]), _points(reference[metric])
        lines.append(f"- {verdict(abs(ours - theirs) <= points)}: {claim} — measured "
                     f"{ours:.2f} vs {theirs:.2f} ({ours - theirs:+.2f}{paper}).")

    within("CorruptEncoder's CA is within 1 point of the clean encoder's", "ca", 1,
           attack, clean, "; paper: 61.6 vs 61.2")
    within("with localized cropping CorruptEncoder's ASR is within 5 points of the clean "
           "encoder's (the defense works)", "asr", 5, _row(rows, "corruptencoder", True),
           _row(rows, "clean", True))
    if attack is not None and clean is not None:
        asr, clean_asr = _points(attack["asr"]), _points(clean["asr"])
        if abs(asr - clean_asr) <= 5:
            lines.append(
                f"- **Caveat**: the backdoor was not learned at this scale — CorruptEncoder's "
                f"ASR ({asr:.2f}) is within 5 points of the clean encoder's ({clean_asr:.2f}), "
                f"so a defense that \"holds\" above has nothing to remove.{_pairs_note(attack)}")
    return lines


def _pairs_note(row: dict[str, Any]) -> str:
    pairs = row.get("attack_pairs")
    if pairs is None:
        return ""
    return (f" Pre-training drew an expected {pairs['expected_pairs']:.1f} trigger/object "
            f"positive pairs in all (the section above).")


def method_label(simclr: dict[str, Any]) -> str:
    """SimCLR or MoCo-v2, from the pre-training config's `method` (SimCLR if absent)."""
    return {"moco-v2": "MoCo-v2"}.get(str(simclr.get("method", "simclr")), "SimCLR")


def render_poisoning_report(results: dict[str, Any]) -> str:
    from sslbackdoor.report import markdown_table, percent

    config = results["config"]
    rows = []
    for method in config["methods"]:
        cells = [method]
        for localized in config["localized_crop"]:
            row = _row(results["rows"], method, localized)
            cells += ["–", "–"] if row is None else [percent(row["ca"]), percent(row["asr"])]
        paper = PAPER_CA_ASR.get(method)
        cells += [f"{paper[0]:.1f}", f"{paper[1]:.1f}"] if paper else ["–", "–"]
        rows.append(cells)
    header = ["method"]
    for localized in config["localized_crop"]:
        suffix = " (localized crop)" if localized else ""
        header += [f"CA{suffix}", f"ASR{suffix}"]
    header += ["paper CA", "paper ASR"]
    simclr = config["simclr"]
    layout = config.get("layout", {})
    epochs = f"{simclr['epochs']} epoch{'' if simclr['epochs'] == 1 else 's'}"
    scale = (f"Scale: {method_label(simclr)} `{simclr['arch']}` {epochs} "
             f"(batch {simclr['batch_size']}) on {results['clean_images']} clean + "
             f"{results['poison_count']} poisoned images ({100 * config['poison_ratio']:.2f}%), "
             f"{config['image_size']} px, {config['trigger_size']} px trigger; downstream "
             f"{config['downstream']['dataset']} classes {config['downstream']['classes']} "
             f"(target {config['downstream']['target_class']}, absent from pre-training), "
             f"linear probe; device {results['environment']['device']}; "
             f"{results['seconds']:.0f} s in all. Paper: ImageNet100-A → ImageNet100-B, "
             f"MoCo-v2 ResNet-18, 200 epochs, 0.5% poisons, GPUs.")
    if layout.get("canvas", "object-height") == "square":
        shapes = ("CorruptEncoder poisons use a square canvas, so resizing them to a square "
                  "distorts neither object nor trigger.")
    else:
        shapes = ("CorruptEncoder poisons use the paper's canvas (object height × area ratio "
                  "× object width), which the resize to a square squashes horizontally; the "
                  "trigger is pasted after the resize, so it keeps its shape.")
    pairs = attack_pairs_section(results["rows"])
    findings = poisoning_findings(results["rows"]) or ["- No claim can be checked: the rows "
                                                       "lack the methods they compare."]
    return "\n\n".join([
        f"# {results['name']}: CorruptEncoder and baselines (percent)", scale,
        "ASR excludes test inputs of the target class; the trigger is pasted at a random "
        "place in the central band of each test image. Images of every source are resized "
        "to squares by this pipeline. " + shapes,
        markdown_table(header, rows), *pairs,
        "## Findings (measured here)",
        "\n".join(findings)]) + "\n"


def attack_pairs_section(rows: list[dict[str, Any]]) -> list[str]:
    """A report section on the trigger/object positive pairs of the CorruptEncoder rows
    (empty when no row has them, e.g. results written before they were counted)."""
    from sslbackdoor.report import markdown_table

    counted = [row for row in rows if "attack_pairs" in row]
    if not counted:
        return []
    criteria = PairCriteria()
    table = [[METHOD_NAMES[row["method"]], "localized" if row["localized_crop"] else "standard",
              str(row["attack_pairs"]["triggered_poisons"]),
              f"{100 * row['attack_pairs']['probability']:.3f}",
              f"{row['attack_pairs']['expected_pairs']:.1f}",
              f"{PAPER_POISON_EPOCHS * row['attack_pairs']['probability']:.0f}"]
             for row in counted]
    return ["## Trigger/object pairs (why ASR is what it is)",
            "CorruptEncoder plants its backdoor only through positive pairs whose one view "
            f"holds the trigger (≥ {criteria.trigger_in:.0%} of it) without the object and "
            f"the other holds the object (≥ {criteria.object_in:.0%}) without the trigger "
            f"(≤ {criteria.other_out:.0%} of the other box each). Sampled "
            "from this run's crop policy and the poisons' boxes: the chance per poison and "
            "epoch, and the expected pairs over the whole run; the last column applies the "
            "same chance to the paper's 650 poisons × 200 epochs.",
            markdown_table(["method", "crop", "triggered poisons", "chance per epoch (%)",
                            "expected pairs (this run)", "at the paper's scale"], table)]


def dry_run(config: PoisoningExperimentConfig) -> list[str]:
    """Load every input (clean set, downstream task, references, supports, backgrounds)
    without writing or training; one line per pre-training run."""
    clean, _ = load_sources(config.pretrain_data, config.image_size,
                            data_root=config.data_root, seed=config.seed)
    data = downstream_data(config)
    inputs = load_inputs(config)
    count = poison_count(config, clean.shape[0])
    lines = [f"inputs: {clean.shape[0]} clean images, {count} poisons per method, "
             f"{len(inputs.references)} references, {inputs.supports.shape[0]} supports, "
             f"{inputs.backgrounds.shape[0]} backgrounds; downstream "
             f"{data['train_labels'].numel()} train / {data['test_labels'].numel()} test"]
    lines += [f"pretrain {run_name(method, localized)}: {method_label(config.simclr.model_dump())} "
              f"{config.simclr.arch}, {config.simclr.epochs} epochs"
              for method in config.methods for localized in config.localized_crop]
    return lines


register_kind("corruptencoder", PoisoningExperimentConfig,
              lambda config, out, resume: run_poisoning_experiment(config, out, resume),
              dry_run)
