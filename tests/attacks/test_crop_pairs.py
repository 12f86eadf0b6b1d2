"""Trigger/object attack pairs: box coverage, the sampled probability against one computed
by hand, localized cropping, and boxes read from a poison manifest."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslbackdoor.attacks.crop_pairs import (
    PoisonBoxes,
    attack_pair_probability,
    coverage,
    expected_attack_pairs,
    manifest_boxes,
    official_view_trigger_scale,
    view_trigger_scale,
)
from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl.simclr import AugmentConfig

# Object in the left half, an 8 px trigger centred vertically in the right quarter.
LEFT_HALF_OBJECT = torch.tensor([[0.0, 0.0, 16.0, 32.0]])
RIGHT_TRIGGER = torch.tensor([[24.0, 12.0, 8.0, 8.0]])


def test_coverage_is_the_fraction_of_each_box_inside_each_crop() -> None:
    box = torch.tensor([[4.0, 8.0, 8.0, 4.0]])  # x 4..12, y 8..12
    crops = torch.tensor([[[0.0, 0.0, 32.0, 32.0],    # the whole image
                           [8.0, 8.0, 4.0, 4.0],      # its right half
                           [20.0, 20.0, 8.0, 8.0]]])  # elsewhere
    assert coverage(box, crops).tolist() == [[1.0, 0.5, 0.0]]


def test_sampled_probability_matches_the_one_computed_by_hand() -> None:
    # 16×16 crops at 17×17 equally likely positions. The object view must start at
    # left 0 (1/17); the trigger view at left 16 and top 4..12 (9/17²); either order.
    augment = AugmentConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    probability = attack_pair_probability(PoisonBoxes(LEFT_HALF_OBJECT, RIGHT_TRIGGER), 32,
                                          augment, samples=1 << 20)
    assert float(probability[0]) == pytest.approx(2 * 9 / 17 ** 3, rel=0.1)


def test_whole_image_views_and_localized_cropping_leave_no_attack_pair() -> None:
    poisons = PoisonBoxes(LEFT_HALF_OBJECT, RIGHT_TRIGGER)
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert float(attack_pair_probability(poisons, 32, whole)[0]) == 0.0
    standard = float(attack_pair_probability(poisons, 32, AugmentConfig(), samples=1 << 16)[0])
    localized = float(attack_pair_probability(poisons, 32, AugmentConfig(localized_crop=True),
                                              samples=1 << 16)[0])
    assert standard > 0.001
    assert localized < standard / 10


def test_nested_probability_matches_the_one_computed_by_hand() -> None:
    # 16×16 crops at 17×17 positions; object = top-left quadrant, 4 px trigger right of it.
    # The trigger-only view has top 0 and left 15 or 16 (object ≤ 10%): 2/17²; the view
    # holding both has top 0 and left 4..8 (trigger whole, object ≥ 50%): 5/17²; either order.
    augment = AugmentConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    poisons = PoisonBoxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]),
                          torch.tensor([[16.0, 0.0, 4.0, 4.0]]))
    nested = attack_pair_probability(poisons, 32, augment, samples=1 << 21, kind="nested")
    assert float(nested[0]) == pytest.approx(2 * 2 * 5 / 17 ** 4, rel=0.15)


def test_localized_cropping_keeps_nested_pairs_but_not_split_ones() -> None:
    poisons = PoisonBoxes(LEFT_HALF_OBJECT, RIGHT_TRIGGER)
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert float(attack_pair_probability(poisons, 32, whole, kind="nested")[0]) == 0.0
    localized = AugmentConfig(localized_crop=True)
    nested = float(attack_pair_probability(poisons, 32, localized, samples=1 << 16,
                                           kind="nested")[0])
    split = float(attack_pair_probability(poisons, 32, localized, samples=1 << 16)[0])
    assert nested > 10 * split


def _write_poisons(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 32)).save(folder / "images" / name)
    records = [{"file": "a.png", "kind": "corruptencoder", "object_box": [0, 0, 32, 32],
                "trigger_box": [48, 12, 8, 8]},
               {"file": "b.png", "kind": "support", "object_box": None, "trigger_box": None}]
    (folder / "manifest.json").write_text(json.dumps({"poisons": records}))


def test_manifest_boxes_stay_in_native_pixels_with_each_poison_size(tmp_path: Path) -> None:
    _write_poisons(tmp_path)
    boxes = manifest_boxes(tmp_path)  # a 64×32 canvas, cropped as it is
    assert boxes.objects.tolist() == [[0.0, 0.0, 32.0, 32.0]]
    assert boxes.triggers.tolist() == [[48.0, 12.0, 8.0, 8.0]]  # the support is left out
    assert boxes.heights is not None and boxes.widths is not None
    assert boxes.heights.tolist() == [32.0] and boxes.widths.tolist() == [64.0]
    pairs = expected_attack_pairs(tmp_path, 32, AugmentConfig(), epochs=10)
    assert pairs["triggered_poisons"] == 1
    assert pairs["expected_pairs"] == pytest.approx(10 * pairs["probability"], abs=0.1)
    assert pairs["expected_nested_pairs"] == pytest.approx(10 * pairs["nested_probability"],
                                                           abs=0.1)


def test_a_missing_manifest_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"manifest\.json: not a readable poison manifest"):
        manifest_boxes(tmp_path)


def test_view_trigger_scale_of_whole_image_views_is_exact() -> None:
    # Views of the whole 64×64 canvas resized to 32: an 8 px trigger shows at 4 px, half
    # of an 8 px test trigger.
    poisons = PoisonBoxes(LEFT_HALF_OBJECT, RIGHT_TRIGGER, torch.tensor([64.0]),
                          torch.tensor([64.0]))
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    scale = view_trigger_scale(poisons, 32, 8, whole, samples=64)
    assert scale["p10"] == scale["median"] == scale["p90"] == pytest.approx(0.5)
    assert scale["views_with_trigger"] == 1.0


def test_squashing_a_poison_before_cropping_enlarges_the_trigger_in_the_views() -> None:
    """The diagnostic catches the old pipeline: a 64 × 128 canvas resized to 32 × 32 and
    then given the 8 px trigger shows it larger in every view than on a test image; the
    native canvas cropped as it is shows it smaller."""
    native = PoisonBoxes(torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
                         torch.tensor([[96.0, 28.0, 8.0, 8.0]]),
                         torch.tensor([64.0]), torch.tensor([128.0]))
    squashed = PoisonBoxes(torch.tensor([[0.0, 0.0, 16.0, 32.0]]),
                           torch.tensor([[20.0, 12.0, 8.0, 8.0]]))
    augment = AugmentConfig(crop_scale=(0.2, 1.0))
    at_native = view_trigger_scale(native, 32, 8, augment, samples=1024)
    at_square = view_trigger_scale(squashed, 32, 8, augment, samples=1024)
    assert at_native["median"] < 0.8 and at_square["p10"] >= 1.0


def test_the_official_pipeline_shows_the_trigger_at_about_its_test_size() -> None:
    official = official_view_trigger_scale()
    assert 0.5 <= official["p10"] < official["median"] < official["p90"] <= 1.15
    assert 0.75 <= official["median"] <= 0.95
