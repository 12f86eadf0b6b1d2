"""The CorruptEncoder comparison as one experiment (`kind: corruptencoder`).

For every poisoning method (none, CorruptEncoder, CorruptEncoder+, SSL-Backdoor,
PoisonedEncoder, CTRL) and every crop policy (standard, localized cropping), pre-train a
SimCLR encoder on the clean set plus that method's poisons, then train a linear probe on a
downstream task whose target class is absent from pre-training and measure CA and ASR
(triggered test inputs: the trigger at a random place in the central band; inputs of the
target class excluded).

Writes into the output folder: inputs/ (the reference, support and background images
used), poisons/<method>/ (images + manifest), encoders/<method>[-localized]/ (each
pre-training run, resumable), results.json and report.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sslbackdoor.attacks.cli import trigger_patch
from sslbackdoor.attacks.corruptencoder import (
    PoisonConfig,
    PoisonLayout,
    generate_corruptencoder,
    load_reference_objects,
    save_png,
)
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
from sslbackdoor.ssl.pretrain import ContrastiveConfig, MonitorConfig, PretrainConfig, run_pretrain

Method = Literal["clean", "corruptencoder", "corruptencoder+", "ssl-backdoor",
                 "poisonedencoder", "ctrl"]
ALL_METHODS: list[Method] = ["clean", "corruptencoder", "corruptencoder+", "ssl-backdoor",
                             "poisonedencoder", "ctrl"]

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
    poison_ratio: float = Field(0.005, gt=0, le=0.05, description="poisons / clean images")
    support_ratio: float = Field(0.2, ge=0, le=1, description="CorruptEncoder+ support share")
    references: ClassImages
    supports: ClassImages
    backgrounds: DataSource
    background_size: int = Field(96, ge=8)
    trigger_size: int = Field(8, ge=1)
    trigger_pattern: Literal["random", "white", "checkerboard"] = "random"
    layout: PoisonLayout = PoisonLayout()
    downstream: DownstreamTask


def class_images(spec: ClassImages, image_size: int | None, data_root: str | None) -> torch.Tensor:
    dataset = load_dataset(spec.dataset, spec.split, image_size=image_size,
                           root=spec.root or data_root)
    images, labels = dataset_tensors(dataset)
    chosen = images[labels == spec.label][:spec.count]
    if chosen.shape[0] < spec.count:
        raise UserInputError(f"{spec.dataset}/{spec.split} has {chosen.shape[0]} images of "
                             f"class {spec.label}, {spec.count} requested")
    return chosen


def write_images(folder: Path, images: torch.Tensor) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        save_png(path, image.permute(1, 2, 0).numpy())
        paths.append(path)
    return paths


def write_inputs(config: PoisoningExperimentConfig, out_dir: Path) -> dict[str, list[Path]]:
    """Reference, support and background images as files, as a user of `poison` has them."""
    inputs = out_dir / "inputs"
    backgrounds, _ = load_sources([config.backgrounds], config.background_size,
                                  data_root=config.data_root, seed=config.seed)
    return {
        "references": write_images(inputs / "references",
                                    class_images(config.references, None, config.data_root)),
        "supports": write_images(inputs / "supports",
                                 class_images(config.supports, config.image_size,
                                              config.data_root)),
        "backgrounds": write_images(inputs / "backgrounds", backgrounds),
    }


def make_poisons(config: PoisoningExperimentConfig, method: Method, count: int,
                 inputs: dict[str, list[Path]], out_dir: Path) -> Path | None:
    """Write `count` poisons of `method` (None for the clean run); returns their folder."""
    if method == "clean":
        return None
    folder = out_dir / "poisons" / method
    trigger = trigger_patch(config.trigger_size, config.trigger_pattern, None, config.seed)
    layout = config.layout.model_copy(update={"output_size": config.image_size})
    if method in ("corruptencoder", "corruptencoder+"):
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


def pretrain_encoder(config: PoisoningExperimentConfig, clean: torch.Tensor,
                     poisons: Path | None, localized: bool, out_dir: Path,
                     resume: bool) -> Path:
    """SimCLR on clean images plus poisons; returns the encoder file."""
    data = [*config.pretrain_data]
    images = clean
    if poisons is not None:
        source = DataSource(dataset=f"images:{poisons}", split="train")
        poison_images, _ = load_sources([source], config.image_size)
        images = torch.cat([clean, poison_images])
        data.append(source)
    simclr = config.simclr.model_copy(deep=True)
    simclr.augment = simclr.augment.model_copy(update={"localized_crop": localized})
    pretrain = PretrainConfig(name=out_dir.name, seed=config.seed, device=config.device,
                              image_size=config.image_size, data_root=config.data_root,
                              data=data, simclr=simclr,
                              monitor=MonitorConfig(dataset=config.downstream.dataset,
                                                    knn_every=0, bank_limit=2000,
                                                    test_limit=1000, probe=None))
    if not (out_dir / "encoder.safetensors").is_file() or resume:
        run_pretrain(pretrain, out_dir, resume=resume, images=images)
    return out_dir / "encoder.safetensors"


def downstream_data(config: PoisoningExperimentConfig) -> dict[str, torch.Tensor]:
    """Train/test images and labels of the downstream classes, labels renumbered 0..C-1."""
    task = config.downstream
    if task.target_class not in task.classes:
        raise UserInputError(f"downstream.target_class {task.target_class} is not among "
                             f"downstream.classes {task.classes}")
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


def run_poisoning_experiment(config: PoisoningExperimentConfig, out_dir: Path,
                             resume: bool = False) -> dict[str, Any]:
    device = resolve_device(config.device)
    seed_everything(config.seed)
    started = time.perf_counter()
    clean, provenance = load_sources(config.pretrain_data, config.image_size,
                                     data_root=config.data_root, seed=config.seed)
    data = downstream_data(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    inputs = write_inputs(config, out_dir)
    count = max(1, round(config.poison_ratio * clean.shape[0]))
    trigger = trigger_patch(config.trigger_size, config.trigger_pattern, None, config.seed)
    triggered = triggered_test_images(data["test_images"], trigger, config.seed + 1)
    rows = []
    for method in config.methods:
        poisons = make_poisons(config, method, count, inputs, out_dir)
        for localized in config.localized_crop:
            run_name = f"{method}{'-localized' if localized else ''}"
            log(f"pre-training {run_name}: {clean.shape[0]} clean + "
                f"{0 if poisons is None else count} poisoned images")
            encoder = pretrain_encoder(config, clean, poisons, localized,
                                       out_dir / "encoders" / run_name, resume)
            scores = evaluate(config, encoder, data, triggered, device)
            log(f"  {run_name}: CA={scores['ca']:.4f} ASR={scores['asr']:.4f}")
            rows.append({"method": method, "localized_crop": localized,
                         "poisons": 0 if poisons is None else count, **scores})
    results = {"schema": "sslbackdoor.corruptencoder/1", "kind": config.kind, "name": config.name,
               "seed": config.seed, "config": config.model_dump(mode="json"), "rows": rows,
               "clean_images": int(clean.shape[0]), "poison_count": count,
               "provenance": {"pretrain": provenance,
                              "inputs": {k: len(v) for k, v in inputs.items()}},
               "environment": environment(device),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_poisoning_report(results))
    return results


def render_poisoning_report(results: dict[str, Any]) -> str:
    from sslbackdoor.report import markdown_table, percent

    config = results["config"]
    rows = []
    for method in config["methods"]:
        cells = [method]
        for localized in config["localized_crop"]:
            row = next(r for r in results["rows"]
                       if r["method"] == method and r["localized_crop"] == localized)
            cells += [percent(row["ca"]), percent(row["asr"])]
        paper = PAPER_CA_ASR.get(method)
        cells += [f"{paper[0]:.1f}", f"{paper[1]:.1f}"] if paper else ["–", "–"]
        rows.append(cells)
    header = ["method"]
    for localized in config["localized_crop"]:
        suffix = " (localized crop)" if localized else ""
        header += [f"CA{suffix}", f"ASR{suffix}"]
    header += ["paper CA", "paper ASR"]
    simclr = config["simclr"]
    scale = (f"Scale: SimCLR `{simclr['arch']}` {simclr['epochs']} epochs (batch "
             f"{simclr['batch_size']}) on {results['clean_images']} clean + "
             f"{results['poison_count']} poisoned images ({100 * config['poison_ratio']:.2f}%), "
             f"{config['image_size']} px; downstream {config['downstream']['dataset']} classes "
             f"{config['downstream']['classes']} (target {config['downstream']['target_class']}, "
             f"absent from pre-training), linear probe; device "
             f"{results['environment']['device']}; {results['seconds']:.0f} s in all. "
             f"Paper: ImageNet100-A → ImageNet100-B, MoCo-v2 ResNet-18, 200 epochs, 0.5% "
             f"poisons, GPUs.")
    return "\n\n".join([
        f"# {results['name']}: CorruptEncoder and baselines (percent)", scale,
        "ASR excludes test inputs of the target class; the trigger is pasted at a random "
        "place in the central band of each test image. Images of every source are resized "
        "to squares by this pipeline; poison canvases are resized before the trigger is "
        "pasted, so the trigger keeps its shape.",
        markdown_table(header, rows)]) + "\n"


register_kind("corruptencoder", PoisoningExperimentConfig,
              lambda config, out, resume: run_poisoning_experiment(config, out, resume))
