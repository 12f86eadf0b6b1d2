"""`sslbackdoor defend …` and `sslbackdoor scan`: the defenses on the command line.

Heavy imports happen inside the commands so that `sslbackdoor --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sslbackdoor.errors import UserInputError

if TYPE_CHECKING:
    from sslbackdoor.defenses.decree import ScanInputs

defend_app = typer.Typer(no_args_is_help=True,
                         help="Run a defense against a (suspect) encoder.")

EncoderArg = Annotated[Path, typer.Option("--encoder", help="suspect encoder checkpoint")]
ArchOption = Annotated[str | None, typer.Option(
    "--arch", help="architecture (read from .safetensors when absent)")]
TaskOption = Annotated[str, typer.Option("--task", help="downstream dataset")]
OutOption = Annotated[Path, typer.Option("--out", help="output folder")]
ImageSizeOption = Annotated[int, typer.Option("--image-size", help="side of the images")]
TargetOption = Annotated[int | None, typer.Option(
    "--target-class", help="attack target class, to report ASR with the trigger")]
TriggerSizeOption = Annotated[int, typer.Option(
    "--trigger-size", help="side of the white bottom-right trigger used for ASR")]
SeedOption = Annotated[int, typer.Option("--seed")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
TrainLimitOption = Annotated[int | None, typer.Option("--train-limit")]
TestLimitOption = Annotated[int | None, typer.Option("--test-limit")]
DEFAULT_SHADOW = "natural-crops/unlabeled@500"  # unlabeled photos that install offline
PL1_THRESHOLD_DEFAULT = 0.1  # decree.PL1_THRESHOLD, kept here so --help imports no torch


def parse_source(text: str) -> tuple[str, str, int | None]:
    """DATASET[/SPLIT][@LIMIT] → (dataset, split, limit); default split 'train'."""
    name, _, limit = text.partition("@")
    dataset, split = name, "train"
    if "/" in name and not name.startswith(("npz:", "imagefolder:")):
        dataset, _, split = name.rpartition("/")
    if split not in ("train", "test", "unlabeled"):
        raise UserInputError(f"{text!r}: split must be train, test or unlabeled, not {split!r}")
    try:
        return dataset, split, int(limit) if limit else None
    except ValueError:
        raise UserInputError(f"{text!r}: limit {limit!r} is not an integer") from None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from sslbackdoor.engine import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


@defend_app.command("neural-cleanse")
def neural_cleanse_command(
    encoder: EncoderArg, task: TaskOption, out: OutOption, arch: ArchOption = None,
    mitigate: Annotated[str | None, typer.Option(
        "--mitigate", help="'unlearn': fine-tune away the reversed trigger")] = None,
    image_size: ImageSizeOption = 32, target_class: TargetOption = None,
    trigger_size: TriggerSizeOption = 10,
    probe_epochs: Annotated[int, typer.Option("--probe-epochs")] = 40,
    steps: Annotated[int, typer.Option("--steps", help="inversion steps per label")] = 80,
    train_limit: TrainLimitOption = 2000, test_limit: TestLimitOption = 1000,
    seed: SeedOption = 0, device: DeviceOption = "auto",
) -> None:
    """Neural Cleanse on the downstream classifier (encoder + MLP) of a task."""
    from sslbackdoor.defenses.experiment import neural_cleanse_on_task
    from sslbackdoor.defenses.inversion import InversionConfig
    from sslbackdoor.defenses.neural_cleanse import NeuralCleanseConfig
    from sslbackdoor.downstream.evaluate import load_task
    from sslbackdoor.downstream.probe import ProbeConfig
    from sslbackdoor.engine import resolve_device, seed_everything
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder

    if mitigate not in (None, "unlearn"):
        raise UserInputError(f"--mitigate {mitigate!r}: valid: unlearn")
    torch_device = resolve_device(device)
    seed_everything(seed)
    model = load_encoder(encoder, arch)
    data = load_task(task, image_size, train_limit=train_limit, test_limit=test_limit, seed=seed)
    config = NeuralCleanseConfig(inversion=InversionConfig(steps=steps, batches_per_step=4))
    probe = ProbeConfig(epochs=probe_epochs, lr=5e-4)
    summary = neural_cleanse_on_task(model, data, config, probe, torch_device, seed=seed,
                                     trigger_size=trigger_size, target_class=target_class,
                                     mitigate=mitigate == "unlearn", out_dir=out)
    _write_json(out / "neural_cleanse.json",
                {"encoder": encoder_provenance(encoder, arch), "task": task, **summary})
    typer.echo(f"anomaly index {summary['min_label_anomaly_index']:.2f} at label "
               f"{summary['min_label']} (threshold {summary['threshold']}): "
               f"{'FLAGGED' if summary['flagged'] else 'not flagged'}")
    for key, value in summary.get("mitigation", {}).items():
        typer.echo(f"after unlearning: {key} = {value:.4f}")
    typer.echo(f"wrote {out / 'neural_cleanse.json'}")


@defend_app.command("mntd")
def mntd_command(
    encoder: Annotated[list[Path], typer.Option("--encoder", help="suspect(s), repeatable")],
    out: OutOption, arch: ArchOption = None,
    base: Annotated[str, typer.Option(
        "--base", help="clean encoder the shadows derive from: 'imagenet' or a path")] = "imagenet",
    shadow: Annotated[str, typer.Option(
        "--shadow", help="DATASET[/SPLIT][@LIMIT] for shadow training")] = DEFAULT_SHADOW,
    image_size: ImageSizeOption = 32,
    train_models: Annotated[int, typer.Option("--train-models")] = 16,
    heldout_models: Annotated[int, typer.Option("--heldout-models")] = 8,
    shadow_steps: Annotated[int, typer.Option("--shadow-steps")] = 60,
    meta_epochs: Annotated[int, typer.Option("--meta-epochs")] = 60,
    seed: SeedOption = 0, device: DeviceOption = "auto",
) -> None:
    """MNTD: train a meta-classifier on shadow encoders and score the suspect(s)."""
    from sslbackdoor.defenses.mntd import MNTDConfig, meta_score, run_mntd
    from sslbackdoor.defenses.shadow import ShadowTrainingConfig
    from sslbackdoor.engine import resolve_device, seed_everything
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder

    torch_device = resolve_device(device)
    seed_everything(seed)
    suspects = [load_encoder(path, arch) for path in encoder]
    clean_base = load_encoder(base, arch or suspects[0].name)
    images = load_shadow_images(shadow, image_size, seed)
    config = MNTDConfig(train_models=train_models, heldout_models=heldout_models,
                        meta_epochs=meta_epochs, shadow=ShadowTrainingConfig(steps=shadow_steps))
    result = run_mntd(clean_base, images, config, torch_device, seed=seed)
    scored: list[dict[str, Any]] = []
    for path, model in zip(encoder, suspects, strict=True):
        score = meta_score(result.meta, model, torch_device)
        flagged = score > config.score_threshold
        scored.append({"encoder": encoder_provenance(path, arch), "score": score,
                       "flagged": flagged})
        typer.echo(f"{path}: MNTD score {score:.3f} → {'FLAGGED' if flagged else 'not flagged'}")
    typer.echo(f"held-out shadow encoders: AUC {result.auc:.3f}, accuracy {result.accuracy:.3f}")
    _write_json(out / "mntd.json", {"suspects": scored, **result.summary(),
                                    "config": config.model_dump(mode="json")})
    typer.echo(f"wrote {out / 'mntd.json'}")


@defend_app.command("patchguard")
def patchguard_command(
    encoder: EncoderArg, task: TaskOption, out: OutOption, arch: ArchOption = None,
    image_size: ImageSizeOption = 32,
    receptive_field: Annotated[int, typer.Option("--receptive-field")] = 16,
    stride: Annotated[int, typer.Option("--stride")] = 8,
    patch_size: Annotated[int | None, typer.Option(
        "--patch-size", help="adversarial patch side (default: --trigger-size)")] = None,
    target_class: TargetOption = None, trigger_size: TriggerSizeOption = 10,
    train_limit: TrainLimitOption = 2000, test_limit: TestLimitOption = 1000,
    seed: SeedOption = 0, device: DeviceOption = "auto",
) -> None:
    """PatchGuard robust masking on local encoder features: clean/certified accuracy, ASR."""
    from sslbackdoor.data.triggers import Trigger, TriggerSpec
    from sslbackdoor.defenses.patchguard import PatchGuardConfig, evaluate_patchguard
    from sslbackdoor.downstream.evaluate import check_target_class, load_task
    from sslbackdoor.engine import resolve_device, seed_everything
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder

    torch_device = resolve_device(device)
    seed_everything(seed)
    model = load_encoder(encoder, arch)
    data = load_task(task, image_size, train_limit=train_limit, test_limit=test_limit, seed=seed)
    if target_class is not None:
        check_target_class(task, data.classes, target_class)
    config = PatchGuardConfig(receptive_field=receptive_field, stride=stride,
                              patch_size=patch_size or trigger_size)
    trigger = Trigger.from_spec(TriggerSpec(size=trigger_size), image_size)
    result = evaluate_patchguard(model, data.train_images, data.train_labels, data.test_images,
                                 data.test_labels, len(data.classes), config, torch_device,
                                 trigger=trigger if target_class is not None else None,
                                 target=target_class, seed=seed)
    summary = result.summary()
    typer.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in summary.items()))
    _write_json(out / "patchguard.json", {"encoder": encoder_provenance(encoder, arch),
                                          "task": task, **summary,
                                          "config": config.model_dump(mode="json")})
    typer.echo(f"wrote {out / 'patchguard.json'}")


def load_shadow_images(source: str, image_size: int, seed: int) -> Any:
    """uint8 images [N,3,S,S] from a DATASET[/SPLIT][@LIMIT] string."""
    from sslbackdoor.data.datasets import load_dataset
    from sslbackdoor.downstream.features import dataset_tensors

    dataset, split, limit = parse_source(source)
    images, _ = dataset_tensors(load_dataset(dataset, split, image_size=image_size,  # type: ignore[arg-type]
                                             limit=limit, seed=seed))
    return images


def scan(
    encoder: Annotated[Path, typer.Argument(help="suspect encoder checkpoint")],
    shadow: Annotated[str | None, typer.Option(
        "--shadow", help="unlabeled images DATASET[/SPLIT][@LIMIT] (default: a sample of the "
                         "encoder's recorded pre-training data, else natural-crops/train@300)")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/scan"),
    arch: ArchOption = None,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="side of the images (default: the checkpoint's recorded size, "
                             "else 64 for torchvision CNNs, else the architecture's own)")] = None,
    epochs: Annotated[int, typer.Option(
        "--epochs", help="maximum epochs over the shadow images")] = 1000,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="flag when PL1 is below this")] = PL1_THRESHOLD_DEFAULT,
    seed: SeedOption = 0, device: DeviceOption = "auto",
) -> None:
    """DECREE: is ENCODER backdoored? Inverts the smallest trigger that collapses its features."""
    from sslbackdoor.defenses.decree import decree_scan, reference_config, write_decree_outputs
    from sslbackdoor.engine import resolve_device, seed_everything
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder

    if not 0 < threshold < 1:
        raise UserInputError(f"--threshold {threshold}: must be between 0 and 1")
    if epochs < 1:
        raise UserInputError(f"--epochs {epochs}: must be at least 1")
    torch_device = resolve_device(device)
    seed_everything(seed)
    model = load_encoder(encoder, arch)
    inputs = _scan_inputs(encoder, model.name, model.default_image_size, shadow, image_size)
    images = load_shadow_images(inputs.shadow, inputs.image_size, seed)
    typer.echo(f"scanning {model.name} at {inputs.image_size} px ({inputs.size_reason}) on "
               f"{images.shape[0]} shadow images {inputs.shadow} ({inputs.shadow_reason}), "
               f"with the reference DECREE loop's {inputs.loop}-encoder settings")
    config = reference_config(inputs.loop, epochs, pl1_threshold=threshold,
                              max_images=max(2, images.shape[0]))
    result = decree_scan(model, images, config, torch_device, seed=seed)
    write_decree_outputs(result, images, out,
                         extra={"encoder": encoder_provenance(encoder, arch),
                                "shadow": inputs.shadow, "shadow_reason": inputs.shadow_reason,
                                "image_size_reason": inputs.size_reason, "loop": inputs.loop,
                                "config": config.model_dump(mode="json")})
    verdict = "BACKDOORED" if result.flagged else "clean"
    relation = "<" if result.pl1 < threshold else "≥"
    typer.echo(f"PL1 = {result.pl1:.4f} {relation} threshold {threshold} → {verdict}")
    typer.echo(f"wrote {out / 'decree.json'} and the inverted trigger images in {out}")


def _scan_inputs(encoder: Path, arch: str, native_size: int, shadow: str | None,
                 image_size: int | None) -> ScanInputs:
    """The scan's ScanInputs: the user's choices where given, else the checkpoint's."""
    from sslbackdoor.defenses.decree import ScanInputs, scan_inputs
    from sslbackdoor.models.checkpoints import read_safetensors_metadata

    if image_size is not None and image_size < 8:
        raise UserInputError(f"--image-size {image_size}: must be at least 8")
    metadata = read_safetensors_metadata(encoder) if encoder.suffix == ".safetensors" else {}
    chosen = scan_inputs(arch, native_size, metadata)
    return ScanInputs(image_size or chosen.image_size, shadow or chosen.shadow,
                      "--image-size" if image_size else chosen.size_reason,
                      "--shadow" if shadow else chosen.shadow_reason, chosen.loop)
