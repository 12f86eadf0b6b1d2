"""The CorruptEncoder comparison as one experiment (`kind: corruptencoder`).

For every poisoning method (none, CorruptEncoder, CorruptEncoder+, SSL-Backdoor,
PoisonedEncoder, CTRL) and every crop policy (standard, localized cropping), pre-train an
encoder (SimCLR or MoCo-v2, `simclr.method`) on the clean set plus that method's poisons,
then train a linear probe on a downstream task whose target class is absent from
pre-training and measure CA and ASR (inputs of the target class excluded) under the
method's own trigger: the patch at a random place in the central band, or CTRL's frequency
trigger; patch rows are also measured with the patch enlarged (`triggered_inputs`). Every
input (data, references, supports, backgrounds) is loaded and the target checked before
anything is written.

Scale is kept as the official pipeline keeps it: clean images and poisons stay at their
native size and aspect, each view is a random crop of the native image resized to
`image_size` (`data.native`); test images are Resize(image_size·256/224) + CenterCrop
(no squash) with the trigger pasted after at its protocol size. Every row with a patch
trigger reports `view_trigger_scale`: the trigger's side in its training views over its
side on a test image, beside the official pipeline's value.

Writes into the output folder: inputs/ (the reference, support and background images
used), poisons/<method>/ (images + manifest), encoders/<method>[-localized]/ (each
pre-training run, resumable), results.json and report.md (`poisoning_report`).

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
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.attacks.corruptencoder import (
    PoisonConfig,
    PoisonLayout,
    ReferenceObject,
    derive_mask,
    generate_corruptencoder,
    load_reference_objects,
    read_manifest,
    save_png,
    trigger_patch,
)
from sslbackdoor.attacks.crop_pairs import (
    expected_attack_pairs,
    manifest_triggers,
    official_view_trigger_scale,
    view_trigger_scale,
)
from sslbackdoor.attacks.poisoning_baselines import BaselineConfig, generate_baseline
from sslbackdoor.attacks.poisoning_report import method_label, render_poisoning_report
from sslbackdoor.attacks.triggered_inputs import (
    TriggeredTestSets,
    trigger_kind,
    triggered_test_sets,
)
from sslbackdoor.config import DataSource, dump_config
from sslbackdoor.data.datasets import Split
from sslbackdoor.data.native import (
    NativeImages,
    load_native_labelled,
    load_native_sources,
    pick,
    read_native,
    resize_center_crop,
)
from sslbackdoor.data.sources import load_sources
from sslbackdoor.downstream.evaluate import check_split_leakage, check_two_splits
from sslbackdoor.downstream.features import encode
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
CORRUPTENCODERS: tuple[Method, ...] = ("corruptencoder", "corruptencoder+")  # object + trigger


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
    probe: ProbeConfig = ProbeConfig(kind="eval-linear", epochs=40, lr=0.01, batch_size=256,
                                     weight_decay=1e-4)


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
    support_images: int = Field(5, ge=1, description="CorruptEncoder+'s support images: the "
                                                     "first N supports (5 in the official code)")
    backgrounds: DataSource
    random_images: DataSource | None = Field(
        None, description="the random images PoisonedEncoder triggers and pairs with a "
                          "reference (default: the backgrounds); loaded at background_size")
    background_size: int = Field(96, ge=8)
    trigger_size: int = Field(8, ge=1)
    trigger_pattern: Literal["official", "random", "white", "checkerboard"] = "random"
    trigger_image: str | None = Field(None, description="the official trigger_10.png (default: "
                                                        "$SSLBACKDOOR_DATA/corruptencoder/"
                                                        "triggers/trigger_10.png)")
    enlarged_trigger_scales: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=lambda: [2, 3],
        description="diagnostic: ASR also measured with the test trigger enlarged k× (same "
                    "pattern), which tells a weak backdoor from none")
    layout: PoisonLayout = PoisonLayout()
    downstream: DownstreamTask

    @model_validator(mode="after")
    def _one_reference_source(self) -> PoisoningExperimentConfig:
        if (self.references is None) == (self.reference_folder is None):
            raise ValueError("give exactly one of `references` (class images) and "
                             "`reference_folder` (images with masks)")
        return self

    @model_validator(mode="after")
    def _enlarged_triggers_fit(self) -> PoisoningExperimentConfig:
        too_large = [k for k in self.enlarged_trigger_scales
                     if k * self.trigger_size > self.image_size]
        if too_large:
            largest = self.image_size // self.trigger_size
            raise ValueError(f"enlarged_trigger_scales {too_large}: a {self.trigger_size} px "
                             f"trigger enlarged that much exceeds the {self.image_size} px "
                             f"image; the largest scale is {largest}")
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


def class_images(spec: ClassImages, data_root: str | None) -> list[torch.Tensor]:
    """`spec.count` images of class `spec.label` at their native sizes, uint8 [3,h,w]."""
    images, labels = load_native_labelled(spec.dataset, spec.split, root=spec.root or data_root)
    members = torch.nonzero(labels == spec.label).flatten()
    chosen = members[spec.offset:spec.offset + spec.count]
    if chosen.numel() < spec.count:
        raise UserInputError(f"{spec.dataset}/{spec.split} has {members.numel()} images of class "
                             f"{spec.label}; {spec.count} after the first {spec.offset} "
                             f"requested")
    return list(pick(images, chosen))


def write_images(folder: Path, images: torch.Tensor | list[torch.Tensor]) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        save_png(path, image.permute(1, 2, 0).numpy())
        paths.append(path)
    return paths


@dataclass
class Inputs:
    """The attacker's images, loaded before anything is written: reference objects (with
    their masks), target-class supports, backgrounds and PoisonedEncoder's random images
    (uint8 [3,h,w] at native size, or [N,3,H,W] at background_size; the random images are
    the backgrounds themselves unless configured apart)."""

    references: list[ReferenceObject]
    supports: list[torch.Tensor]
    backgrounds: torch.Tensor
    random_images: torch.Tensor


def load_inputs(config: PoisoningExperimentConfig) -> Inputs:
    if config.reference_folder is not None:
        references = load_reference_objects(Path(config.reference_folder))
    else:
        assert config.references is not None  # one of the two, by validation
        references = [ReferenceObject(f"{index:05d}.png", array, derive_mask(array))
                      for index, array in enumerate(image.permute(1, 2, 0).numpy() for image in
                                                    class_images(config.references,
                                                                 config.data_root))]
    backgrounds, _ = load_sources([config.backgrounds], config.background_size,
                                  data_root=config.data_root, seed=config.seed)
    random_images = backgrounds
    if config.random_images is not None:
        random_images, _ = load_sources([config.random_images], config.background_size,
                                        data_root=config.data_root, seed=config.seed)
    return Inputs(references, class_images(config.supports, config.data_root), backgrounds,
                  random_images)


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
    backgrounds = write_images(folder / "backgrounds", inputs.backgrounds)
    return {"references": references,
            "supports": write_images(folder / "supports", inputs.supports),
            "backgrounds": backgrounds,
            "random-images": backgrounds if inputs.random_images is inputs.backgrounds
            else write_images(folder / "random-images", inputs.random_images)}


def make_poisons(config: PoisoningExperimentConfig, method: Method, count: int,
                 inputs: dict[str, list[Path]], out_dir: Path) -> Path | None:
    """Write `count` poisons of `method` (None for the clean run); returns their folder."""
    if method == "clean":
        return None
    folder = out_dir / "poisons" / method
    if folder.exists():  # a smaller count must not leave earlier poisons behind
        shutil.rmtree(folder)
    trigger = experiment_trigger(config)
    if method in CORRUPTENCODERS:
        support_ratio = config.support_ratio if method == "corruptencoder+" else 0.0
        generate_corruptencoder(load_reference_objects(inputs["references"][0].parent),
                                inputs["backgrounds"], trigger,
                                PoisonConfig(count=count, support_ratio=support_ratio,
                                             seed=config.seed, layout=config.layout),
                                folder, inputs["supports"][:config.support_images])
    else:
        generate_baseline(baseline_settings(config, method, count), folder,
                          target_images=inputs["supports"], trigger=trigger,
                          references=inputs["references"], backgrounds=inputs["random-images"])
    return folder / "images"


def baseline_settings(config: PoisoningExperimentConfig, method: Method,
                      count: int) -> BaselineConfig:
    """How a baseline's poisons are made; CTRL's triggered test inputs reuse its settings."""
    return BaselineConfig(method=method, count=count, seed=config.seed)


def experiment_trigger(config: PoisoningExperimentConfig) -> np.ndarray:
    """The patch trigger of every patch method and of the triggered test inputs."""
    image = Path(config.trigger_image) if config.trigger_image else None
    return trigger_patch(config.trigger_size, config.trigger_pattern, image, config.seed)


def load_poisons(poisons: Path | None) -> tuple[list[torch.Tensor] | None, str | None]:
    """The poisoned images as written, at their native sizes (uint8 [3,h,w], manifest
    order), and a sha256 of their sizes and pixels."""
    if poisons is None:
        return None, None
    images = [read_native(record["path"]) for record in read_manifest(poisons.parent)]
    digest = hashlib.sha256()
    for image in images:
        digest.update(np.asarray(image.shape, dtype=np.int64).tobytes())
        digest.update(image.numpy().tobytes())
    return images, digest.hexdigest()


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


def pretrain_encoder(pretrain: PretrainConfig, clean: NativeImages,
                     poison_images: list[torch.Tensor] | None, out_dir: Path,
                     resume: bool) -> tuple[Path, bool]:
    """Pre-train on clean images plus poisons, all at native size, unless `out_dir` holds
    exactly this run finished already; returns the encoder file and whether it was reused."""
    poisoned = 0 if poison_images is None else len(poison_images)
    if check_reusable(out_dir, pretrain):
        log(f"{out_dir.name}: reusing the finished pre-training run in {out_dir}")
        return out_dir / "encoder.safetensors", True
    log(f"pre-training {out_dir.name}: {len(clean)} clean + {poisoned} poisoned images")
    images = clean if poison_images is None else NativeImages.of([clean, poison_images])
    run_pretrain(pretrain, out_dir, resume=resume, images=images)
    return out_dir / "encoder.safetensors", False


def downstream_data(config: PoisoningExperimentConfig) -> dict[str, torch.Tensor]:
    """Train/test images of the downstream classes as the official evaluation sees them
    (Resize + CenterCrop of the native image, uint8 [N,3,S,S]) and their labels,
    renumbered 0..C-1."""
    task = config.downstream
    check_two_splits(task.dataset)
    out: dict[str, torch.Tensor] = {}
    splits: tuple[tuple[Split, int | None], ...] = (("train", task.train_limit),
                                                    ("test", task.test_limit))
    for split, limit in splits:
        images, labels = load_native_labelled(task.dataset, split, root=config.data_root)
        keep = torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten()[:limit]
        remap = {c: i for i, c in enumerate(task.classes)}
        out[f"{split}_images"] = resize_center_crop(pick(images, keep), config.image_size)
        out[f"{split}_labels"] = torch.tensor([remap[int(y)] for y in labels[keep]])
    check_split_leakage(f"downstream.dataset {task.dataset}", out["train_images"], out["test_images"])
    return out


def triggered_test_inputs(config: PoisoningExperimentConfig,
                          images: torch.Tensor) -> TriggeredTestSets:
    """The triggered test inputs every method of this experiment is attacked with."""
    ctrl = baseline_settings(config, "ctrl", 1) if "ctrl" in config.methods else None
    return triggered_test_sets(images, experiment_trigger(config),
                               config.enlarged_trigger_scales, ctrl, config.seed + 1)


def evaluate(config: PoisoningExperimentConfig, encoder_path: Path, method: Method,
             data: dict[str, torch.Tensor], triggered: TriggeredTestSets,
             device: torch.device) -> dict[str, Any]:
    """CA, and ASR under the method's own trigger (`asr`; `asr_all` counts target-class
    inputs too). Patch-trigger rows add `asr_enlarged` (trigger px → ASR); the clean row
    adds `asr_ctrl`, the level a CTRL encoder's ASR is compared with."""
    encoder = load_encoder(encoder_path).to(device)
    precision = config.simclr.precision
    train = encode(encoder, data["train_images"], device, precision=precision)
    probe = train_probe(train, data["train_labels"], len(config.downstream.classes),
                        config.downstream.probe, config.seed)
    target = config.downstream.classes.index(config.downstream.target_class)

    def predictions(images: torch.Tensor) -> torch.Tensor:
        return predict(probe, encode(encoder, images, device, precision=precision))

    def asr(images: torch.Tensor, exclude_target: bool = True) -> float:
        return attack_success_rate(predictions(images), data["test_labels"], target,
                                   exclude_target=exclude_target)

    own, kind = triggered.for_method(method), trigger_kind(method)
    scores: dict[str, Any] = {
        "ca": accuracy(predictions(data["test_images"]), data["test_labels"]),
        "trigger": kind, "asr": asr(own), "asr_all": asr(own, exclude_target=False)}
    if kind == "patch":
        scores["asr_enlarged"] = {str(px): asr(images)
                                  for px, images in triggered.enlarged.items()}
    if method == "clean" and triggered.ctrl is not None:
        scores["asr_ctrl"] = asr(triggered.ctrl)
    return scores


def run_name(method: Method, localized: bool) -> str:
    return f"{method}{'-localized' if localized else ''}"


PoisonSets = dict[Method, tuple[list[torch.Tensor] | None, str | None]]


def prepare_poisons(config: PoisoningExperimentConfig, loaded: Inputs, count: int,
                    root: Path) -> tuple[dict[str, list[Path]], PoisonSets]:
    """Write the inputs and every method's poisons under `root`; load the poisons back."""
    inputs = write_inputs(loaded, root)
    poisons: PoisonSets = {}
    for method in config.methods:
        poisons[method] = load_poisons(make_poisons(config, method, count, inputs, root))
    return inputs, poisons


def attack_pairs(config: PoisoningExperimentConfig, method: Method, localized: bool,
                 out_dir: Path) -> dict[str, Any]:
    """For CorruptEncoder(+) runs, how many trigger-view/object-view positive pairs
    pre-training is expected to draw (see `crop_pairs`); for every patch method, the
    trigger's size in its training views over its size on a test image."""
    if method in ("clean", "ctrl"):
        return {}
    augment = config.simclr.augment.model_copy(update={"localized_crop": localized})
    folder = out_dir / "poisons" / method
    scale = {"view_trigger_scale": view_trigger_scale(manifest_triggers(folder),
                                                      config.image_size, config.trigger_size,
                                                      augment, seed=config.seed)}
    if method not in CORRUPTENCODERS:
        return scale
    return {**scale, "attack_pairs": expected_attack_pairs(folder, config.image_size, augment,
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
    clean, provenance = load_native_sources(config.pretrain_data, data_root=config.data_root,
                                            seed=config.seed)
    data = downstream_data(config)
    loaded = load_inputs(config)
    out_dir = Path(out_dir)
    count = poison_count(config, len(clean))
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
    triggered = triggered_test_inputs(config, data["test_images"])
    rows, encoders = [], []
    for method, localized in runs:
        poison_images, digest = poisons[method]
        name = run_name(method, localized)
        folder = out_dir / "encoders" / name
        pretrain = pretrain_config(config, method, digest, count, localized, name)
        encoder, reused = pretrain_encoder(pretrain, clean, poison_images, folder, resume)
        scores = evaluate(config, encoder, method, data, triggered, device)
        log(f"  {name}: CA={scores['ca']:.4f} ASR={scores['asr']:.4f}")
        rows.append({"method": method, "localized_crop": localized,
                     "poisons": 0 if poison_images is None else count, **scores,
                     **attack_pairs(config, method, localized, out_dir)})
        encoders.append({"run": name, "config_hash": pretrain_hash(pretrain),
                         "poisons_sha256": digest, "reused": reused})
    results = {"schema": "sslbackdoor.corruptencoder/1", "kind": config.kind, "name": config.name,
               "seed": config.seed, "config": config.model_dump(mode="json"), "rows": rows,
               "clean_images": len(clean), "poison_count": count,
               "official_view_trigger_scale": official_view_trigger_scale(),
               "encoders": encoders,
               "provenance": {"pretrain": provenance,
                              "inputs": {k: len(v) for k, v in inputs.items()}},
               "environment": environment(device),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_poisoning_report(results))
    return results


def dry_run(config: PoisoningExperimentConfig) -> list[str]:
    """Load every input (clean set, downstream task, references, supports, backgrounds)
    without writing or training; one line per pre-training run."""
    clean, _ = load_native_sources(config.pretrain_data, data_root=config.data_root,
                                   seed=config.seed)
    data = downstream_data(config)
    inputs = load_inputs(config)
    count = poison_count(config, len(clean))
    lines = [f"inputs: {len(clean)} clean images, {count} poisons per method, "
             f"{len(inputs.references)} references, {len(inputs.supports)} supports, "
             f"{inputs.backgrounds.shape[0]} backgrounds, {inputs.random_images.shape[0]} "
             "random images; downstream "
             f"{data['train_labels'].numel()} train / {data['test_labels'].numel()} test"]
    lines += [f"pretrain {run_name(method, localized)}: {method_label(config.simclr.model_dump())} "
              f"{config.simclr.arch}, {config.simclr.epochs} epochs"
              for method in config.methods for localized in config.localized_crop]
    return lines


register_kind("corruptencoder", PoisoningExperimentConfig,
              lambda config, out, resume: run_poisoning_experiment(config, out, resume),
              dry_run)
