"""Triggered test inputs: the patch where the paper tests it, the same pattern enlarged,
and sets that share their test images and their trigger places."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslbackdoor.attacks.triggered_inputs import (
    TriggeredTestSets,
    enlarge_trigger,
    triggered_test_sets,
)


def test_enlarging_repeats_every_pixel() -> None:
    trigger = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    big = enlarge_trigger(trigger, 3)
    assert big.shape == (6, 6, 3)
    assert (big[:3, 3:] == trigger[0, 1]).all() and (big[3:, :3] == trigger[1, 0]).all()


def _changed_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = torch.nonzero((before != after).any(0), as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


def test_each_set_stamps_its_trigger_in_the_central_band_of_the_same_images() -> None:
    images = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    trigger = np.full((4, 4, 3), 255, dtype=np.uint8)
    sets = triggered_test_sets(images, trigger, [2, 3], None, seed=1)
    assert sets.ctrl is None and sorted(sets.enlarged) == [8, 12]
    for size, triggered in [(4, sets.patch), *sets.enlarged.items()]:
        assert triggered.shape == images.shape
        for before, after in zip(images, triggered, strict=True):
            top, left, height, width = _changed_box(before, after)
            assert (height, width) == (size, size)
            assert 8 <= top <= 24 - size and 8 <= left <= 24 - size
    again = triggered_test_sets(images, trigger, [2, 3], None, seed=1)
    assert torch.equal(again.patch, sets.patch)  # places depend on the seed only


def test_ctrl_needs_its_own_set() -> None:
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    sets = TriggeredTestSets(patch=images, enlarged={}, ctrl=None)
    assert sets.for_method("corruptencoder") is images
    with pytest.raises(ValueError, match="no CTRL test set"):
        sets.for_method("ctrl")
