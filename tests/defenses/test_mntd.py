"""MNTD: ROC AUC by hand, jumbo triggers, and a tiny end-to-end meta-classifier."""

from __future__ import annotations

import pytest
import torch

from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.defenses.mntd import (
    MNTDConfig,
    accuracy_at,
    median_threshold,
    roc_auc,
    run_mntd,
)
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
    scores, labels = torch.tensor(result.heldout_scores), torch.tensor(result.heldout_labels)
    assert result.median_threshold == median_threshold(scores)
    assert result.accuracy_at_median == accuracy_at(scores, labels, result.median_threshold)
    summary = result.summary()
    assert summary["heldout_auc"] == result.auc
    assert summary["heldout_accuracy_at_median"] == result.accuracy_at_median
    assert summary["heldout_median_threshold"] == result.median_threshold


def test_the_official_threshold_is_the_median_score() -> None:
    """The MNTD reference code's threshold='half': numpy's median of the evaluated scores
    (the mean of the middle two for an even count), verdict `score > threshold`."""
    scores = torch.tensor([0.9, 0.1, 0.3, 0.6])
    assert median_threshold(scores) == pytest.approx(0.45)
    assert median_threshold(torch.tensor([0.2, 0.7, 0.4])) == pytest.approx(0.4)
    labels = torch.tensor([1, 0, 1, 0])
    assert accuracy_at(scores, labels, 0.45) == 0.5  # 0.9 right, 0.1 right, 0.3 and 0.6 wrong
    assert accuracy_at(scores, labels, 0.5) == 0.5
    # all scores above 0.5: at 0.5 every encoder is "trojaned"; the median splits them
    high = torch.tensor([0.61, 0.62, 0.71, 0.72])
    assert accuracy_at(high, torch.tensor([0, 0, 1, 1]), 0.5) == 0.5
    assert accuracy_at(high, torch.tensor([0, 0, 1, 1]), median_threshold(high)) == 1.0
    assert roc_auc(high, torch.tensor([0, 0, 1, 1])) == 1.0
    with pytest.raises(ValueError):
        accuracy_at(torch.tensor([]), torch.tensor([]), 0.5)
    with pytest.raises(ValueError):
        median_threshold(torch.tensor([]))
