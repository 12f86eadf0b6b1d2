"""Neural Cleanse: the MAD anomaly index by hand, and detection of a BadNets classifier.

What is and is not asserted about the clean twin: Neural Cleanse's index is scale-free, so
for a clean model it is a random variable whose tail crosses 2 fairly often (for 10
exchangeable label norms, about 20–35% of the time by simulation). On this tiny digits
model the clean twin's index ranged 1.5–2.7 over 3 training × 2 inversion seeds, so "not
flagged" has no margin here and is not asserted; what is robust — and asserted — is that
the clean twin has no small trigger: its smallest reversed trigger is several times larger
than the backdoored model's, and the target label is unremarkable in it.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslbackdoor.defenses.inversion import InversionConfig
from sslbackdoor.defenses.neural_cleanse import (
    NeuralCleanseConfig,
    NeuralCleanseResult,
    NeuralCleanseSchedule,
    accuracy_and_asr,
    anomaly_indices,
    median,
    neural_cleanse,
)

from .conftest import CPU, TARGET, BadNetsModels, Digits, one_thread

CONFIG = NeuralCleanseConfig(inversion=InversionConfig(steps=80, batches_per_step=4),
                             max_images=500)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert float(median(torch.tensor([4.0, 1.0, 3.0, 2.0]))) == 2.5
    assert float(median(torch.tensor([5.0, 1.0, 3.0]))) == 3.0


def test_anomaly_index_odd_count_by_hand() -> None:
    # median 5; |n − 5| = 4,3,0,1,5 → median 3 → MAD = 1.4826·3 = 4.4478.
    # index of 1: 4/4.4478 = 0.8993; of 2: 3/4.4478 = 0.6745; at/above the median: 0.
    index = anomaly_indices(torch.tensor([1.0, 2.0, 5.0, 6.0, 10.0]))
    expected = [4 / 4.4478, 3 / 4.4478, 0.0, 0.0, 0.0]
    assert index.tolist() == pytest.approx(expected, rel=1e-6)


def test_anomaly_index_even_count_by_hand() -> None:
    # sorted 1,8,9,10,11,12: median (9+10)/2 = 9.5; |n − 9.5| = 8.5,1.5,0.5,0.5,1.5,2.5
    # → sorted 0.5,0.5,1.5,1.5,2.5,8.5 → median 1.5 → MAD = 2.2239; index of 1: 8.5/2.2239.
    index = anomaly_indices(torch.tensor([10.0, 1.0, 8.0, 9.0, 11.0, 12.0]))
    assert float(index[1]) == pytest.approx(8.5 / (1.4826 * 1.5), rel=1e-6)
    assert float(index[1]) == pytest.approx(3.8221, abs=1e-4)
    assert float(index[2]) == pytest.approx(1.5 / 2.2239, rel=1e-4)
    assert index[[0, 4, 5]].tolist() == [0.0, 0.0, 0.0]


def test_anomaly_index_with_zero_mad_is_infinite_for_a_smaller_norm() -> None:
    index = anomaly_indices(torch.tensor([1.0, 5.0, 5.0, 5.0, 5.0]))
    assert math.isinf(float(index[0])) and float(index[1:].abs().sum()) == 0.0


def test_cost_schedule_follows_the_reference() -> None:
    schedule = NeuralCleanseSchedule(init_cost=1e-3, patience=5, early_stop_patience=25)
    for _ in range(4):
        schedule.update(True)
    assert schedule.cost == 0.0  # not yet `patience` successes
    schedule.update(True)
    assert schedule.cost == 1e-3
    for _ in range(5):
        schedule.update(True)
    assert schedule.cost == 2e-3
    for _ in range(5):
        schedule.update(False)
    assert schedule.cost == pytest.approx(2e-3 / 2 ** 1.5)
    assert not schedule.should_stop(24, True) and schedule.should_stop(25, True)


@pytest.fixture(scope="module")
def scans(badnets: BadNetsModels, digits: Digits) -> dict[str, NeuralCleanseResult]:
    with one_thread():
        return {name: neural_cleanse(model, digits.train_images, 10, CONFIG, CPU, seed=0)
                for name, model in (("backdoored", badnets.backdoored),
                                    ("clean", badnets.clean))}


def test_the_badnets_model_really_is_backdoored(badnets: BadNetsModels, digits: Digits) -> None:
    scores = accuracy_and_asr(badnets.backdoored, digits.test_images, digits.test_labels, CPU,
                              badnets.trigger, TARGET)
    assert scores["accuracy"] > 0.85 and scores["asr"] > 0.95


def test_neural_cleanse_flags_the_badnets_model_at_its_target(
        scans: dict[str, NeuralCleanseResult]) -> None:
    result = scans["backdoored"]
    assert result.flagged and result.min_label == TARGET
    # The real trigger is a 3×3 patch (‖m‖₁ = 9); natural triggers of this model are ≥ 25.
    assert result.triggers[TARGET].l1_norm <= 1.5 * 9


def test_the_clean_twin_has_no_small_trigger(scans: dict[str, NeuralCleanseResult]) -> None:
    clean, backdoored = scans["clean"], scans["backdoored"]
    smallest_clean = min(t.l1_norm for t in clean.triggers)
    assert smallest_clean > 2.5 * backdoored.triggers[TARGET].l1_norm
    assert clean.anomaly_index[TARGET] < 2.0
