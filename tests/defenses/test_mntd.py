"""MNTD: ROC AUC by hand, jumbo triggers, and a tiny end-to-end meta-classifier."""

from __future__ import annotations

import pytest
import torch

from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.defenses.mntd import MNTDConfig, roc_auc, run_mntd
from sslbackdoor.defenses.shadow import (
    JumboTriggerConfig,
    ShadowTrainingConfig,
    sample_jumbo_trigger,
)
from sslbackdoor.downstream.features import dataset_tensors

from .conftest import CPU, tiny_encoder


def test_roc_auc_by_hand() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) → 3/4.
    assert roc_auc(torch.tensor([0.9, 0.5, 0.4, 0.1]), torch.tensor([1, 0, 1, 0])) == 0.75


def test_roc_auc_counts_ties_as_half() -> None:
    # positive 0.5 vs negatives 0.5 (tie, ½) and 0.2 (win, 1) → 1.5/2.
    assert roc_auc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == 0.75


def test_roc_auc_extremes_and_bad_input() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_jumbo_triggers_respect_their_distribution() -> None:
    config = JumboTriggerConfig(min_size=2, max_size=5, blend_probability=0.5)
    generator = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(40):
        trigger = sample_jumbo_trigger(16, config, generator)
        covered = int((trigger.mask[0] > 0).sum())
        if covered == 256:  # full-image blend: faint everywhere
            kinds.add("blend")
            assert 0.05 <= float(trigger.mask.max()) <= 0.2
        else:
            kinds.add("patch")
            assert covered in {4, 9, 16, 25}
            assert 0.8 <= float(trigger.mask.max()) <= 1.0
    assert kinds == {"blend", "patch"}


def test_meta_classifier_separates_held_out_trojaned_encoders() -> None:
    """12 shadow encoders train the meta-classifier; 8 unseen ones (4 + 4) are scored."""
    images, _ = dataset_tensors(load_dataset("natural-crops:600", "train", image_size=16))
    config = MNTDConfig(train_models=12, heldout_models=8, meta_epochs=40,
                        shadow=ShadowTrainingConfig(steps=60, lr=3e-3),
                        jumbo=JumboTriggerConfig(min_size=3, max_size=6))
    result = run_mntd(tiny_encoder(0, feature_dim=16), images, config, CPU, seed=0)
    assert result.heldout_labels == [0, 1] * 4
    assert result.auc >= 0.875  # chance is 0.5; at most 2 of the 16 pairs misordered
