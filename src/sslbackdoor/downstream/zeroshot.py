"""Zero-shot CLIP classifiers: CA, BA, ASR-B and ASR without training any classifier.

A class's text embedding is the mean of its L2-normalised prompt embeddings, renormalised;
the default prompts and class names are the BadEncoder reference code's (zero_shot.py,
datasets/*_dataset.py): "A photo of a {}" ("A traffic sign photo of a {}" for GTSRB), no
final period, GTSRB classes named as there ("Priority road sign", "Stop sign", …), SVHN's
"zero".."nine". An image is assigned the
class whose embedding has the highest cosine similarity with its image feature. The clean
and the backdoored image encoders share the same (untouched) text tower, as in the
BadEncoder paper's CLIP case study.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.evaluate import TaskData, check_target_class
from sslbackdoor.downstream.features import encode
from sslbackdoor.errors import UserInputError
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.models.encoders import Encoder
from sslbackdoor.progress import log

if TYPE_CHECKING:
    from sslbackdoor.attacks.badencoder import AttackTarget
    from sslbackdoor.config import ExperimentConfig
    from sslbackdoor.models.clip import ClipBundle

# Verbatim from the reference code, which ends its prompts without a period.
DEFAULT_TEMPLATES = ("A photo of a {}",)
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {"gtsrb": ("A traffic sign photo of a {}",)}
# The reference code's GTSRB class names (datasets/gtsrb_dataset.py), capitals and "sign"
# included: CLIP's text tower is case-sensitive, so other spellings give other classifiers.
GTSRB_ZERO_SHOT_CLASSES = (
    "Speed limit 20km/h", "Speed limit 30km/h", "Speed limit 50km/h", "Speed limit 60km/h",
    "Speed limit 70km/h", "Speed limit 80km/h", "End of speed limit 80km/h",
    "Speed limit 100km/h", "Speed limit 120km/h", "No passing sign",
    "No passing for vehicles over 3.5 metric tons", "Right-of-way at the next intersection",
    "Priority road sign", "Yield sign", "Stop sign", "No vehicles sign",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve",
    "Bumpy road", "Slippery road", "Road narrows on the right", "Road work",
    "Traffic signals", "Pedestrians crossing", "Children crossing", "Bicycles crossing",
    "Beware of ice or snow", "Wild animals crossing", "End of all speed and passing limits",
    "Turn right ahead", "Turn left ahead", "Ahead only", "Go straight or right",
    "Go straight or left", "Keep right", "Keep left", "Roundabout mandatory",
    "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT_BATCH = 256


def normalise_templates(templates: Sequence[str]) -> list[str]:
    """Templates with `{}` (or `{class}`) marking the class name; bad ones → UserInputError."""
    result = []
    for template in templates:
        text = template.replace("{class}", "{}")
        if "{}" not in text:
            raise UserInputError(f"prompt template {template!r} has no {{}} for the class "
                                 f"name; e.g. 'A photo of a {{}}'")
        result.append(text)
    return result


def templates_for(dataset: str, templates: Sequence[str] | None = None) -> list[str]:
    """The user's templates if any, else the dataset's default prompts."""
    if templates:
        return normalise_templates(templates)
    return list(DATASET_TEMPLATES.get(dataset, DEFAULT_TEMPLATES))


def zero_shot_class_names(dataset: str, classes: Sequence[str]) -> list[str]:
    """Names to put in the prompts for `dataset`, whose label names are `classes`.

    Digit datasets (svhn, mnist, mnist-5k, opencv-digits, sklearn-digits, or any with
    labels "0".."9") → "zero".."nine" (CLIP reads words better than digits); GTSRB → the
    reference code's 43 sign names (`GTSRB_ZERO_SHOT_CLASSES`); any other dataset → its own
    class names.
    """
    if list(classes) == [str(digit) for digit in range(10)]:
        return list(DIGIT_WORDS)
    if dataset == "gtsrb":
        return list(GTSRB_ZERO_SHOT_CLASSES)
    return [str(name) for name in classes]


def fill_template(template: str, name: str) -> str:
    # str.replace, not str.format: class names and templates may contain other braces.
    return template.replace("{}", name)


@torch.no_grad()
def zero_shot_weights(bundle: ClipBundle, class_names: Sequence[str],
                      templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot classifier [C,D]: per class, the renormalised mean of its T normalised
    prompt embeddings (on the text model's device, float32)."""
    if not class_names or not templates:
        raise UserInputError("zero-shot classification needs at least one class and template")
    prompts = [fill_template(t, name) for name in class_names for t in templates]
    features = torch.cat([bundle.encode_text(prompts[i:i + TEXT_BATCH])
                          for i in range(0, len(prompts), TEXT_BATCH)])
    per_prompt = F.normalize(features, dim=1).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=1)


def zero_shot_predict(image_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Predicted classes [N] (CPU): argmax over C of cosine(image_features [N,D], weights [C,D])."""
    if image_features.shape[1] != weights.shape[1]:
        raise UserInputError(f"image features are {image_features.shape[1]}-d but the text "
                             f"tower gives {weights.shape[1]}-d embeddings; use the text "
                             f"tower of the same CLIP architecture")
    images = F.normalize(image_features.float(), dim=1)
    texts = F.normalize(weights.float().to(images.device), dim=1)
    return (images @ texts.T).argmax(dim=1).cpu()


def _scores(encoder: Encoder, weights: torch.Tensor, images: torch.Tensor,
            labels: torch.Tensor, device: torch.device, trigger: Trigger | None,
            target_class: int | None, precision: str) -> tuple[float, float | None, float | None]:
    """(accuracy, ASR excluding target-class inputs, ASR over all inputs) of one encoder."""
    clean = zero_shot_predict(encode(encoder, images, device, precision=precision), weights)
    if trigger is None or target_class is None:
        return accuracy(clean, labels), None, None
    triggered = zero_shot_predict(encode(encoder, images, device, trigger=trigger,
                                         precision=precision), weights)
    return (accuracy(clean, labels), attack_success_rate(triggered, labels, target_class),
            attack_success_rate(triggered, labels, target_class, exclude_target=False))


def evaluate_zero_shot(clean: Encoder | None, backdoored: Encoder, weights: torch.Tensor,
                       images: torch.Tensor, labels: torch.Tensor, device: torch.device, *,
                       trigger: Trigger | None = None, target_class: int | None = None,
                       precision: str = "bf16") -> dict[str, float | None]:
    """CA, BA, ASR-B and ASR of zero-shot classifiers sharing the text weights [C,D].

    Args:
        clean: the clean image encoder (None: CA and ASR-B are None).
        images: uint8 test images [N,3,S,S]; labels: [N].
        trigger, target_class: the backdoor to measure (None: no ASR).

    Returns:
        ca, ba, asr_b, asr (target-class inputs excluded) and asr_b_all, asr_all (counted).
    """
    labels = labels.cpu()
    after = _scores(backdoored, weights, images, labels, device, trigger, target_class,
                    precision)
    before = (_scores(clean, weights, images, labels, device, trigger, target_class, precision)
              if clean is not None else (None, None, None))
    return {"ca": before[0], "ba": after[0], "asr_b": before[1], "asr": after[1],
            "asr_b_all": before[2], "asr_all": after[2]}


# --- experiments (`downstream.zero_shot` in a badencoder config) -----------------------------

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


# --- `sslbackdoor evaluate --zero-shot` --------------------------------------------------------

def _clip_arch(encoder_path: Path, arch: str | None) -> str:
    if arch is None and encoder_path.suffix == ".safetensors" and encoder_path.is_file():
        from sslbackdoor.models.checkpoints import read_safetensors_metadata

        arch = read_safetensors_metadata(encoder_path).get("encoder")
    if not arch or not arch.startswith("clip:"):
        raise UserInputError(f"--zero-shot needs a CLIP encoder: pass --arch clip:ARCH "
                             f"(e.g. clip:RN50), got {arch!r}")
    return arch


def _load_test_task(name: str, image_size: int, test_limit: int | None,
                    seed: int) -> TaskData:
    from sslbackdoor.data.datasets import load_dataset
    from sslbackdoor.downstream.features import dataset_tensors

    test = load_dataset(name, "test", image_size=image_size, limit=test_limit, seed=seed)
    images, labels = dataset_tensors(test)
    empty = torch.empty(0)
    return TaskData(name, list(test.classes), empty, empty, images, labels,
                    {"test": test.provenance})


def run_zero_shot_stage(encoder_path: Path, task_names: list[str], out_dir: Path, *,
                        arch: str | None = None, clean: str | None = None,
                        clip_weights: str | None = None, templates: Sequence[str] = (),
                        target_class: int | None = None, trigger_size: int = 50,
                        image_size: int = 224, test_limit: int | None = None, seed: int = 0,
                        device: str = "auto") -> dict[str, Any]:
    """Zero-shot CA/BA/ASR-B/ASR of a (suspect) CLIP image encoder; writes results.json.

    The text tower comes from `clip_weights` (default: `clean`), a full CLIP weights file or
    an open_clip tag. The trigger (a white square at the bottom-right) applies to the first
    task, whose target class is `target_class`.
    """
    from sslbackdoor.data.triggers import TriggerSpec
    from sslbackdoor.engine import (
        atomic_write_text,
        prepare_module,
        resolve_device,
        seed_everything,
    )
    from sslbackdoor.experiment import RESULTS_SCHEMA, environment
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder
    from sslbackdoor.models.clip import load_clip
    from sslbackdoor.run_lock import output_lock

    arch = _clip_arch(Path(encoder_path), arch)
    text_source = clip_weights or clean
    if text_source is None:
        raise UserInputError("--zero-shot needs the CLIP text tower: pass --clip-weights "
                             "FILE_OR_TAG (or --clean with the full CLIP weights file)")
    normalise_templates(templates)
    torch_device = resolve_device(device)
    seed_everything(seed)
    bundle = load_clip(arch, text_source)
    suspect = load_encoder(encoder_path, arch)
    if image_size != suspect.default_image_size:
        raise UserInputError(f"{arch} takes {suspect.default_image_size}×"
                             f"{suspect.default_image_size} images; pass --image-size "
                             f"{suspect.default_image_size}")
    # The text source's own image tower is the clean encoder when they are the same file.
    reference = (bundle.image_encoder if clean == text_source
                 else load_encoder(clean, arch) if clean else None)
    bundle.model.to(torch_device)
    suspect = prepare_module(suspect, torch_device)
    if reference is not None:
        reference = prepare_module(reference, torch_device)
    trigger = Trigger.from_spec(TriggerSpec(size=trigger_size), image_size)
    entries = []
    for index, name in enumerate(task_names):
        task = _load_test_task(name, image_size, test_limit, seed)
        targeted = index == 0 and target_class is not None
        if targeted:
            check_target_class(name, task.classes, target_class)  # type: ignore[arg-type]
        used = templates_for(name, templates)
        weights = zero_shot_weights(bundle, zero_shot_class_names(name, task.classes), used)
        scores = evaluate_zero_shot(reference, suspect, weights, task.test_images,
                                    task.test_labels, torch_device,
                                    trigger=trigger if targeted else None,
                                    target_class=target_class if targeted else None)
        entries.append({"task": name, "target_class": target_class if targeted else None,
                        **scores, "templates": used, "test_size": len(task.test_labels),
                        "provenance": task.provenance})
    results = {"schema": RESULTS_SCHEMA, "kind": "evaluate-zero-shot", "seed": seed,
               "encoder": encoder_provenance(encoder_path, arch),
               "clean_encoder": (bundle.provenance if clean == text_source
                                 else encoder_provenance(clean, arch) if clean else None),
               "text_tower": bundle.provenance, "tasks": entries,
               "environment": environment(torch_device)}
    with output_lock(out_dir):
        atomic_write_text(Path(out_dir) / "results.json", json.dumps(results, indent=2))
    return results
