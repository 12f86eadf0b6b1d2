"""How many CorruptEncoder positive pairs a pre-training run actually sees.

Two kinds of positive pair can tie the trigger to the reference object:

* "split" pairs, the paper's analysis: one view covers the trigger without the object, the
  other covers the object without the trigger. Localized cropping is built to remove them.
* "nested" pairs: one view covers the trigger without the object, the other covers both.
  They pull the trigger alone toward the trigger-and-object view; localized cropping, whose
  second view lies inside the first, still draws them (PoisonedEncoder's poisons rely on
  the same kind of pair).

Given the poisons' boxes from their manifest and the pre-training crop policy, this samples
the very crop boxes pre-training draws from each poison at its native size
(`SimCLRViews.sample_pairs`, localized cropping included) and estimates, for each kind, the
probability that one poison's two views form such a pair and the expected number over a
run (Σ over poisons × epochs). Too few pairs of either kind means nothing for the encoder
to learn the trigger from, whatever the number of poisons suggests.

`view_trigger_scale` is the diagnostic of trigger *size*: the side of the trigger in the
training views that hold it, divided by its side on a test image (the protocol trigger on
an S×S test input). The official pipeline (a 40 px trigger on canvases of about 684×300,
views RandomResizedCrop(224, scale 0.2–1), tests with the 40 px trigger at 224 px) gives
about 0.5–1.1 (`official_view_trigger_scale`); a pipeline that squashed poisons to the
training size before cropping gives well above 1: the encoder then learns a trigger larger
than any test input shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from sslbackdoor.attacks.corruptencoder import read_manifest
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
    """Object and trigger boxes of P poisons, in pixels of the image pre-training crops
    (float [P,4] rows (x, y, width, height)), and those images' heights and widths (float
    [P]; None: S×S images, S the view size)."""

    objects: torch.Tensor
    triggers: torch.Tensor
    heights: torch.Tensor | None = None
    widths: torch.Tensor | None = None

    def sizes(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.triggers.shape[0]
        if self.heights is None or self.widths is None:
            return torch.full((count,), float(image_size)), torch.full((count,), float(image_size))
        return self.heights, self.widths


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
    heights, widths = poisons.sizes(image_size)
    chunks = [_chunk_probabilities(poisons.objects[start:start + chunk],
                                   poisons.triggers[start:start + chunk],
                                   (heights[start:start + chunk], widths[start:start + chunk]),
                                   views, samples, generator, criteria)
              for start in range(0, poisons.objects.shape[0], chunk)]
    return {kind: torch.cat([probabilities[kind] for probabilities in chunks])
            for kind in PAIR_PREFIXES}


def _chunk_probabilities(objects: torch.Tensor, triggers: torch.Tensor,
                         sizes: tuple[torch.Tensor, torch.Tensor], views: SimCLRViews,
                         samples: int, generator: torch.Generator,
                         criteria: PairCriteria) -> dict[PairKind, torch.Tensor]:
    count = objects.shape[0]
    heights, widths = (s.repeat_interleave(samples) for s in sizes)
    boxes = views.sample_pairs(count * samples, heights, widths, generator).boxes
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


def manifest_boxes(poison_folder: Path) -> PoisonBoxes:
    """Boxes of the triggered CorruptEncoder poisons in a `sslbackdoor poison` folder
    (manifest.json and images/), in pixels of each poison at its native size, with those
    sizes. Poisons without an object box (supports, baselines) are left out."""
    return _boxes(poison_folder, need_object=True)


def manifest_triggers(poison_folder: Path) -> PoisonBoxes:
    """Like `manifest_boxes` for every poison with a trigger box (baselines included);
    `objects` repeats the trigger boxes where a poison has no object."""
    return _boxes(poison_folder, need_object=False)


def _boxes(poison_folder: Path, need_object: bool) -> PoisonBoxes:
    objects, triggers, heights, widths = [], [], [], []
    for record in read_manifest(poison_folder):
        trigger = record.get("trigger_box")
        box = record.get("object_box") or (None if need_object else trigger)
        if box is None or trigger is None:
            continue
        with Image.open(record["path"]) as image:
            width, height = image.size
        objects.append(torch.tensor(box, dtype=torch.float32))
        triggers.append(torch.tensor(trigger, dtype=torch.float32))
        heights.append(float(height))
        widths.append(float(width))
    if not objects:
        return PoisonBoxes(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))
    return PoisonBoxes(torch.stack(objects), torch.stack(triggers), torch.tensor(heights),
                       torch.tensor(widths))


def expected_attack_pairs(poison_folder: Path, image_size: int, augment: AugmentConfig,
                          epochs: int, seed: int = 0) -> dict[str, float]:
    """The triggered poisons counted and, for split pairs (`probability`, `expected_pairs`)
    and nested ones (`nested_probability`, `expected_nested_pairs`), the mean per-poison
    probability and the expected number over `epochs` (one pair per poison per epoch)."""
    boxes = manifest_boxes(poison_folder)
    counts: dict[str, float] = {"triggered_poisons": int(boxes.objects.shape[0])}
    probabilities = (attack_pair_probabilities(boxes, image_size, augment, seed=seed)
                     if boxes.objects.shape[0] else dict.fromkeys(PAIR_PREFIXES, torch.zeros(1)))
    for kind, prefix in PAIR_PREFIXES.items():
        counts[f"{prefix}probability"] = round(float(probabilities[kind].mean()), 6)
        counts[f"expected_{prefix}pairs"] = round(float(probabilities[kind].sum()) * epochs, 1)
    return counts


def view_trigger_scale(poisons: PoisonBoxes, image_size: int, test_trigger: int,
                       augment: AugmentConfig, samples: int = 2048, seed: int = 0,
                       trigger_in: float = 0.9) -> dict[str, float]:
    """Quantiles (p10, median, p90) of the trigger's side in the training views that hold
    at least `trigger_in` of it, divided by `test_trigger` (its side on an S×S test image),
    and the share of views that hold it. A view of an h×w crop shows a t-px trigger at
    t·S/√(h·w) px (the geometric mean of its two axes' scales)."""
    count = poisons.triggers.shape[0]
    if count == 0:
        return {"views_with_trigger": 0.0}
    generator = torch.Generator().manual_seed(seed)
    heights, widths = (s.repeat_interleave(samples) for s in poisons.sizes(image_size))
    views = SimCLRViews(image_size, augment).sample_pairs(count * samples, heights, widths,
                                                          generator).boxes  # both views
    triggers = poisons.triggers.repeat_interleave(samples, 0).repeat(2, 1)
    covered = coverage(triggers, views[:, None, :])[:, 0] >= trigger_in
    side = triggers[:, 2:].prod(1).sqrt() * image_size / views[:, 2:].prod(1).sqrt()
    scale = side[covered] / test_trigger
    if scale.numel() == 0:
        return {"views_with_trigger": 0.0}
    quantiles = torch.quantile(scale, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"p10": round(quantiles[0], 3), "median": round(quantiles[1], 3),
            "p90": round(quantiles[2], 3),
            "views_with_trigger": round(float(covered.float().mean()), 4)}


# The official pipeline's parameters (the spec; the interop measurement of the official
# generator): median canvas 684×300, a 40 px trigger, object on one side (W/2 wide), views
# RandomResizedCrop(224, scale 0.2–1), the 40 px trigger on 224 px test images.
OFFICIAL_CANVAS = (300, 684)
OFFICIAL_TRIGGER = 40
OFFICIAL_VIEW = 224


def official_view_trigger_scale(samples: int = 256, poisons: int = 64, seed: int = 0
                                ) -> dict[str, float]:
    """`view_trigger_scale` of the official pipeline, from official-layout poisons drawn
    with the official generator's geometry (`corruptencoder.trigger_position`)."""
    import numpy as np

    from sslbackdoor.attacks.corruptencoder import PoisonLayout, trigger_position

    height, width = OFFICIAL_CANVAS
    layout, rng = PoisonLayout(), np.random.default_rng(seed)
    triggers, objects = [], []
    for index in range(poisons):
        side = "left" if index % 2 else "right"
        x = 0 if side == "left" else width - width // 2
        tx, ty = trigger_position(x, width // 2, side, width, height, OFFICIAL_TRIGGER, layout, rng)
        triggers.append([tx, ty, OFFICIAL_TRIGGER, OFFICIAL_TRIGGER])
        objects.append([x, 0, width // 2, height])
    boxes = PoisonBoxes(torch.tensor(objects, dtype=torch.float32),
                        torch.tensor(triggers, dtype=torch.float32),
                        torch.full((poisons,), float(height)), torch.full((poisons,), float(width)))
    augment = AugmentConfig(crop_scale=(0.2, 1.0))
    return view_trigger_scale(boxes, OFFICIAL_VIEW, OFFICIAL_TRIGGER, augment, samples, seed)
