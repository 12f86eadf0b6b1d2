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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.features import encode
from sslbackdoor.errors import UserInputError
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.models.encoders import Encoder

if TYPE_CHECKING:
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
