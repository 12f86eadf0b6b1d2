import pytest
import torch

from sslbackdoor.metrics import accuracy, attack_success_rate, empirical_cdf


def test_accuracy() -> None:
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75


def test_asr_excludes_target_class_by_default_and_counts_all_when_asked() -> None:
    predictions = torch.tensor([3, 3, 0, 3, 3])
    labels = torch.tensor([3, 1, 2, 0, 1])
    # Excluding the one input whose label is the target: 3 of the 4 others hit the target.
    assert attack_success_rate(predictions, labels, target=3) == 0.75
    assert attack_success_rate(predictions, labels, target=3,
                               exclude_target=False) == pytest.approx(0.8)


def test_asr_with_only_target_class_inputs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no test input outside target class"):
        attack_success_rate(torch.tensor([1]), torch.tensor([1]), target=1)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy(torch.tensor([1, 2]), torch.tensor([1]))


def test_empirical_cdf() -> None:
    values, fractions = empirical_cdf(torch.tensor([0.5, -1.0, 0.25, 1.0]))
    assert values.tolist() == [-1.0, 0.25, 0.5, 1.0]
    assert fractions.tolist() == [0.25, 0.5, 0.75, 1.0]
