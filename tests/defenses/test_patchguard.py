"""PatchGuard: window size, robust masking and certification on hand-built local logits."""

from __future__ import annotations

import pytest
import torch

from sslbackdoor.defenses.patchguard import (
    PatchGuardConfig,
    certify,
    evaluate_patchguard,
    robust_masking,
    window_masks,
    window_size,
)

from .conftest import CPU, Digits, tiny_encoder


def logits(class0: torch.Tensor, class1: torch.Tensor) -> torch.Tensor:
    """Two classes' local logits [X,Y] each → one image's local logits [1,X,Y,2]."""
    return torch.stack([class0, class1], dim=-1)[None]


@pytest.mark.parametrize(("patch", "field", "stride", "expected"),
                         [(10, 16, 8, 4), (1, 1, 1, 1), (5, 9, 4, 4), (32, 8, 8, 5), (2, 3, 4, 1)])
def test_window_size_is_ceil_of_p_plus_r_minus_1_over_s(patch: int, field: int, stride: int,
                                                        expected: int) -> None:
    assert window_size(patch, field, stride) == expected


def test_window_masks_enumerate_every_position_and_clip_to_the_map() -> None:
    masks = window_masks(4, 4, 2)
    assert masks.shape == (9, 4, 4)
    assert bool((masks.sum(dim=(1, 2)) == 4).all())
    assert window_masks(3, 3, 5).shape == (1, 3, 3)  # a window larger than the map


def test_robust_masking_removes_the_largest_window_of_each_class() -> None:
    # Class 1 has one huge local logit (a patch) and wins the plain sum 20 to 16; masking
    # removes its 2×2 window (all of its 20) and class 0's best window (4 of its 16).
    class1 = torch.zeros(4, 4)
    class1[0, 0] = 20.0
    class1[3, 3] = -7.0  # negative evidence is clipped to 0, not subtracted
    masked, prediction = robust_masking(logits(torch.ones(4, 4), class1), window=2)
    assert masked[0].tolist() == [12.0, 0.0]
    assert int(prediction[0]) == 0


def test_threshold_keeps_a_window_whose_share_is_small() -> None:
    # Class 0's largest window holds 4/16 = 25% of its evidence: removed at T=0, kept at T=0.3.
    local = logits(torch.ones(4, 4), torch.zeros(4, 4))
    assert robust_masking(local, 2, threshold=0.0)[0][0, 0] == 12.0
    assert robust_masking(local, 2, threshold=0.3)[0][0, 0] == 16.0


def test_certified_when_true_evidence_is_spread_and_the_other_class_is_weak() -> None:
    # For every patch window P: L_0 = 12 (outside P) − 4 (largest other window) = 8,
    # U_1 = 0.6 · 12 = 7.2 < 8 → certified.
    local = logits(torch.ones(4, 4), torch.full((4, 4), 0.6))
    assert certify(local, torch.tensor([0]), window=2).tolist() == [True]


def test_not_certified_when_a_patch_could_lift_the_other_class_above_the_bound() -> None:
    # Same, with class 1 at 0.7: U_1 = 8.4 > L_0 = 8, although the clean masked prediction
    # (12 vs 8.4) is still correct.
    local = logits(torch.ones(4, 4), torch.full((4, 4), 0.7))
    assert int(robust_masking(local, 2)[1][0]) == 0
    assert certify(local, torch.tensor([0]), window=2).tolist() == [False]


def test_nothing_is_certified_when_the_window_covers_the_whole_map() -> None:
    local = logits(torch.ones(3, 3), torch.zeros(3, 3))
    assert certify(local, torch.tensor([0]), window=3).tolist() == [False]


def test_a_wrong_clean_prediction_is_never_certified() -> None:
    local = logits(torch.ones(4, 4), torch.zeros(4, 4))
    assert certify(local, torch.tensor([1]), window=2).tolist() == [False]


def test_certified_images_resist_every_patch_we_try() -> None:
    """Soundness: for certified images, no patch (any values in one window) flips masking."""
    generator = torch.Generator().manual_seed(0)
    local = torch.rand(200, 5, 5, 3, generator=generator) * torch.tensor([1.0, 0.6, 0.6])
    labels = torch.zeros(200, dtype=torch.long)
    certified = certify(local, labels, window=2)
    assert 0 < int(certified.sum()) < 200  # the check below must have cases to bite on
    masks = window_masks(5, 5, 2).bool()  # [16,5,5]
    images = local[certified]  # [K,5,5,3]
    attacked = images[:, None, None].repeat(1, masks.shape[0], 3, 1, 1, 1)  # [K,16,3,5,5,3]
    for strength_index, strength in enumerate((0.5, 3.0, 100.0)):
        patch = torch.tensor([0.0, strength, strength])
        view = attacked[:, :, strength_index]
        view[:, masks] = patch  # worst case: true class erased, others boosted in the window
    predictions = robust_masking(attacked.flatten(0, 2), 2)[1]
    assert bool((predictions == 0).all())


def test_evaluate_patchguard_on_a_tiny_encoder_reports_consistent_numbers(digits: Digits) -> None:
    config = PatchGuardConfig(receptive_field=8, stride=4, patch_size=3)
    result = evaluate_patchguard(tiny_encoder(0), digits.train_images[:300],
                                 digits.train_labels[:300], digits.test_images[:100],
                                 digits.test_labels[:100], 10, config, CPU)
    assert result.grid == 3 and result.window == 3
    # With w = 3 ≥ X = 3 the window covers the whole map: nothing can be certified.
    assert result.certified_accuracy == 0.0
    assert 0.0 <= result.clean_accuracy <= 1.0
