"""How many CorruptEncoder positive pairs a pre-training run actually sees.

Two kinds of positive pair can tie the trigger to the reference object:

* "split" pairs, the paper's analysis: one view covers the trigger without the object, the
  other covers the object without the trigger. Localized cropping is built to remove them.
* "nested" pairs: one view covers the trigger without the object, the other covers both.
  They pull the trigger alone toward the trigger-and-object view; localized cropping, whose
  second view lies inside the first, still draws them (PoisonedEncoder's poisons rely on
  the same kind of pair).

Given the poisons' boxes from their manifest and the pre-training crop policy, this samples
the very crop boxes pre-training draws (`SimCLRViews.sample_pairs`, localized cropping
included) and estimates, for each kind, the probability that one poison's two views form
such a pair and the expected number over a run (Σ over poisons × epochs). Too few pairs of
either kind means nothing for the encoder to learn the trigger from, whatever the number of
poisons suggests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl.simclr import AugmentConfig, SimCLRViews

_PAIRS_PER_CHUNK = 1 << 19  # view pairs sampled at once: bounds memory for many poisons

PairKind = Literal["split", "nested"]
# How each kind's counts are named in `expected_attack_pairs` (split: the paper's names).
PAIR_PREFIXES: dict[PairKind, str] = {"split": "", "nested": "nested_"}


@dataclass(frozen=True)
class PairCriteria:
    """Coverage thresholds (fractions of a box's area inside a crop) of an attack pair:
    the trigger view holds ≥ `trigger_in` of the trigger and ≤ `other_out` of the object;
    the object view holds ≥ `object_in` of the object and, in a split pair, ≤ `other_out`
    of the trigger, in a nested pair ≥ `trigger_in` of it."""

    trigger_in: float = 0.9
    object_in: float = 0.5
    other_out: float = 0.1


@dataclass(frozen=True)
class PoisonBoxes:
    """Object and trigger boxes of P poisons, in pixels of the S×S image pre-training crops:
    float [P,4] rows (x, y, width, height)."""

    objects: torch.Tensor
    triggers: torch.Tensor


def coverage(boxes: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """Fraction of each box's area inside each crop.

    boxes: [P,4] (x, y, width, height); crops: [P,N,4] (top, left, height, width) as
    `crop_boxes` returns them → [P,N] in [0, 1].
    """
    x, y, w, h = (v[:, None] for v in boxes.unbind(1))
    top, left, crop_h, crop_w = crops.unbind(2)
    overlap_w = (torch.minimum(left + crop_w, x + w) - torch.maximum(left, x)).clamp(min=0)
    overlap_h = (torch.minimum(top + crop_h, y + h) - torch.maximum(top, y)).clamp(min=0)
    return overlap_w * overlap_h / (w * h)


def attack_pair_probability(poisons: PoisonBoxes, image_size: int, augment: AugmentConfig,
                            samples: int = 4096, seed: int = 0,
                            criteria: PairCriteria = PairCriteria(),
                            kind: PairKind = "split") -> torch.Tensor:
    """Per-poison probability [P] that its two views form an attack pair of `kind` (either
    order), from `samples` view pairs per poison."""
    return attack_pair_probabilities(poisons, image_size, augment, samples, seed, criteria)[kind]


def attack_pair_probabilities(poisons: PoisonBoxes, image_size: int, augment: AugmentConfig,
                              samples: int = 4096, seed: int = 0,
                              criteria: PairCriteria = PairCriteria()
                              ) -> dict[PairKind, torch.Tensor]:
    """`attack_pair_probability` of both kinds, from one draw of view pairs."""
    generator = torch.Generator().manual_seed(seed)
    views = SimCLRViews(image_size, augment)
    chunk = max(1, _PAIRS_PER_CHUNK // samples)
    chunks = [_chunk_probabilities(poisons.objects[start:start + chunk],
                                   poisons.triggers[start:start + chunk], views, samples,
                                   generator, criteria)
              for start in range(0, poisons.objects.shape[0], chunk)]
    return {kind: torch.cat([probabilities[kind] for probabilities in chunks])
            for kind in PAIR_PREFIXES}


def _chunk_probabilities(objects: torch.Tensor, triggers: torch.Tensor, views: SimCLRViews,
                         samples: int, generator: torch.Generator,
                         criteria: PairCriteria) -> dict[PairKind, torch.Tensor]:
    count, size = objects.shape[0], views.image_size
    boxes = views.sample_pairs(count * samples, size, size, generator).boxes
    first = boxes[: count * samples].reshape(count, samples, 4)
    second = boxes[count * samples:].reshape(count, samples, 4)

    def one_way(trigger_view: torch.Tensor, object_view: torch.Tensor
                ) -> dict[PairKind, torch.Tensor]:
        trigger_alone = ((coverage(triggers, trigger_view) >= criteria.trigger_in)
                         & (coverage(objects, trigger_view) <= criteria.other_out)
                         & (coverage(objects, object_view) >= criteria.object_in))
        trigger_in_object_view = coverage(triggers, object_view)
        return {"split": trigger_alone & (trigger_in_object_view <= criteria.other_out),
                "nested": trigger_alone & (trigger_in_object_view >= criteria.trigger_in)}

    forward, backward = one_way(first, second), one_way(second, first)
    return {kind: (forward[kind] | backward[kind]).float().mean(dim=1) for kind in forward}


def manifest_boxes(poison_folder: Path, image_size: int) -> PoisonBoxes:
    """Boxes of the triggered poisons in a `sslbackdoor poison` folder (manifest.json and
    images/), scaled to the S×S size the pre-training loader resizes every image to.
    Support poisons (no trigger) are left out."""
    manifest_path = poison_folder / "manifest.json"
    try:
        records = json.loads(manifest_path.read_text(encoding="utf-8"))["poisons"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{manifest_path}: not a readable poison manifest ({exc})") from None
    objects, triggers = [], []
    for record in records:
        if record.get("object_box") is None or record.get("trigger_box") is None:
            continue
        with Image.open(poison_folder / "images" / record["file"]) as image:
            width, height = image.size
        scale = torch.tensor([image_size / width, image_size / height] * 2)
        objects.append(torch.tensor(record["object_box"], dtype=torch.float32) * scale)
        triggers.append(torch.tensor(record["trigger_box"], dtype=torch.float32) * scale)
    if not objects:
        return PoisonBoxes(torch.zeros(0, 4), torch.zeros(0, 4))
    return PoisonBoxes(torch.stack(objects), torch.stack(triggers))


def expected_attack_pairs(poison_folder: Path, image_size: int, augment: AugmentConfig,
                          epochs: int, seed: int = 0) -> dict[str, float]:
    """The triggered poisons counted and, for split pairs (`probability`, `expected_pairs`)
    and nested ones (`nested_probability`, `expected_nested_pairs`), the mean per-poison
    probability and the expected number over `epochs` (one pair per poison per epoch)."""
    boxes = manifest_boxes(poison_folder, image_size)
    counts: dict[str, float] = {"triggered_poisons": int(boxes.objects.shape[0])}
    probabilities = (attack_pair_probabilities(boxes, image_size, augment, seed=seed)
                     if boxes.objects.shape[0] else dict.fromkeys(PAIR_PREFIXES, torch.zeros(1)))
    for kind, prefix in PAIR_PREFIXES.items():
        counts[f"{prefix}probability"] = round(float(probabilities[kind].mean()), 6)
        counts[f"expected_{prefix}pairs"] = round(float(probabilities[kind].sum()) * epochs, 1)
    return counts
