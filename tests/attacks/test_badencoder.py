import math
from pathlib import Path

import pytest
import torch

from sslbackdoor.attacks.badencoder import (
    AttackTarget,
    BadEncoderAttack,
    BadEncoderConfig,
    badencoder_loss,
)
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.downstream.features import encode
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.encoders import Encoder


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_each_loss_term_matches_hand_computation() -> None:
    shadow_bd = [[1.0, 0.0], [0.0, 2.0]]
    shadow_clean = [[1.0, 1.0], [0.0, 1.0]]
    triggered = [[3.0, 4.0], [1.0, 0.0]]
    refs_bd = [[0.0, 1.0], [1.0, 1.0]]
    refs_aug = [[2.0, 0.0], [1.0, 2.0]]
    refs_clean = [[1.0, 0.0], [2.0, 1.0]]
    terms = badencoder_loss(t(shadow_bd), t(shadow_clean), [t(triggered)], [t(refs_bd)],
                            [t(refs_aug)], [t(refs_clean)], lambda1=0.5, lambda2=2.0)
    l0 = -sum(cos(x, r) for x in triggered for r in refs_bd) / 4
    l1 = -(cos(refs_aug[0], refs_clean[0]) + cos(refs_aug[1], refs_clean[1])) / 2
    l2 = -(cos(shadow_bd[0], shadow_clean[0]) + cos(shadow_bd[1], shadow_clean[1])) / 2
    assert terms.l0.item() == pytest.approx(l0, abs=1e-6)
    assert terms.l1.item() == pytest.approx(l1, abs=1e-6)
    assert terms.l2.item() == pytest.approx(l2, abs=1e-6)
    assert terms.total.item() == pytest.approx(l0 + 0.5 * l1 + 2.0 * l2, abs=1e-6)


def test_minimum_is_minus_three_when_everything_aligns() -> None:
    same = t([[1.0, 2.0], [1.0, 2.0]])
    terms = badencoder_loss(same, same, [same], [same], [same], [same])
    assert terms.total.item() == pytest.approx(-3.0, abs=1e-6)


def test_multiple_targets_are_averaged_with_equal_weight() -> None:
    a, b = t([[1.0, 0.0]]), t([[0.0, 1.0]])
    terms = badencoder_loss(a, a, [a, a], [a, b], [a, a], [a, a])
    assert terms.l0.item() == pytest.approx(-(1.0 + 0.0) / 2)


def test_gradients_flow_through_both_sides_of_l0() -> None:
    triggered = t([[1.0, 0.5]]).requires_grad_()
    reference = t([[0.2, 1.0]]).requires_grad_()
    same = t([[1.0, 1.0]])
    badencoder_loss(same, same, [triggered], [reference], [same], [same]).total.backward()
    assert triggered.grad is not None and reference.grad is not None
    assert reference.grad.abs().sum() > 0


def _targets(size: int = 16) -> list[AttackTarget]:
    torch.manual_seed(1)
    references = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    return [AttackTarget("t0", Trigger.from_spec(TriggerSpec(size=4), size), references[:1]),
            AttackTarget("t1", Trigger.from_spec(TriggerSpec(size=4, position="top-left",
                                                              pattern="random"), size),
                         references[1:])]


def _shadow(count: int = 64, size: int = 16) -> torch.Tensor:
    """Smooth random images of varied colour and brightness (not i.i.d. noise, whose
    features all look alike)."""
    generator = torch.Generator().manual_seed(2)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    scale = torch.rand(count, 1, 1, 1, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse * scale, size=(size, size), mode="bilinear")
    return (smooth * 255).round().to(torch.uint8)


def _similarity_to_reference(encoder: Encoder, target: AttackTarget) -> float:
    triggered = encode(encoder, _shadow(), torch.device("cpu"), trigger=target.trigger,
                       precision="fp32")
    reference = encode(encoder, target.references, torch.device("cpu"), precision="fp32")
    return float((triggered @ reference.T).mean())


def test_attack_reduces_effectiveness_loss_and_leaves_clean_encoder_untouched(
        tiny_encoder: Encoder) -> None:
    before = {k: v.clone() for k, v in tiny_encoder.state_dict().items()}
    targets = _targets()
    similarity_before = [_similarity_to_reference(tiny_encoder, t) for t in targets]
    config = BadEncoderConfig(epochs=6, batch_size=16, lr=0.05, precision="fp32")
    attack = BadEncoderAttack(tiny_encoder, targets, config, torch.device("cpu"))
    result = attack.run(_shadow())
    similarity_after = [_similarity_to_reference(result.encoder, t) for t in targets]
    # A random-init net already maps everything close together, so compare distances.
    assert all(1 - a < 0.5 * (1 - b) for a, b in zip(similarity_after, similarity_before,
                                                      strict=True)), (similarity_before,
                                                                      similarity_after)
    assert result.history[-1]["l0"] < result.history[0]["l0"]
    assert all(torch.equal(before[k], v) for k, v in attack.clean.state_dict().items())
    bn = next(m for m in result.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, before["backbone.net.1.running_mean"])


def test_resume_continues_exactly_where_an_interrupted_run_stopped(
        tiny_encoder: Encoder, tmp_path: Path) -> None:
    config = BadEncoderConfig(epochs=3, batch_size=16, lr=0.05, precision="fp32")
    full = BadEncoderAttack(tiny_encoder, _targets(), config, torch.device("cpu"), seed=5)
    full_result = full.run(_shadow())

    checkpoint = tmp_path / "state.safetensors"
    short = config.model_copy(update={"epochs": 2})
    BadEncoderAttack(tiny_encoder, _targets(), short, torch.device("cpu"), seed=5).run(
        _shadow(), checkpoint=checkpoint)
    resumed = BadEncoderAttack(tiny_encoder, _targets(), config, torch.device("cpu"), seed=5)
    resumed_result = resumed.run(_shadow(), checkpoint=checkpoint, resume=True)

    assert [h["epoch"] for h in resumed_result.history] == [1, 2, 3]
    for key, value in full_result.encoder.state_dict().items():
        assert torch.allclose(value, resumed_result.encoder.state_dict()[key], atol=1e-6), key


def test_shadow_smaller_than_a_batch_is_rejected(tiny_encoder: Encoder) -> None:
    attack = BadEncoderAttack(tiny_encoder, _targets(), BadEncoderConfig(batch_size=128),
                              torch.device("cpu"))
    with pytest.raises(UserInputError, match="fewer than one batch"):
        attack.run(_shadow(count=64))


def test_l1_draws_one_augmented_reference_per_shadow_image_by_default(
        tiny_encoder: Encoder) -> None:
    """The reference code augments each target's reference once per shadow image in the
    batch, so L1 averages over batch_size copies, each paired with its reference's f(x)."""
    config = BadEncoderConfig(batch_size=16, precision="fp32")
    assert config.reference_augmentations is None
    attack = BadEncoderAttack(tiny_encoder, _targets(), config, torch.device("cpu"))
    images, clean = attack.augmented_references()
    assert [tuple(i.shape[:1]) for i in images] == [(16,), (16,)]
    for features, reference in zip(clean, attack.references_clean, strict=True):
        assert features.shape == (16, reference.shape[1])
        assert torch.equal(features, reference.expand(16, -1))
    first = images[0]
    assert not all(torch.equal(first[0], copy) for copy in first[1:])  # fresh draws


def test_a_set_count_draws_that_many_round_robin_over_the_references(
        tiny_encoder: Encoder) -> None:
    torch.manual_seed(3)
    references = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    target = AttackTarget("t", Trigger.from_spec(TriggerSpec(size=4), 16), references)
    config = BadEncoderConfig(batch_size=16, precision="fp32", reference_augmentations=5)
    attack = BadEncoderAttack(tiny_encoder, [target], config, torch.device("cpu"))
    [images], [clean] = attack.augmented_references()
    assert images.shape[0] == 5 and clean.shape[0] == 5
    expected = attack.references_clean[0][torch.tensor([0, 1, 2, 0, 1])]
    assert torch.equal(clean, expected)
    one_each = BadEncoderAttack(tiny_encoder, [target], config.model_copy(
        update={"reference_augmentations": 3}), torch.device("cpu"))
    assert torch.equal(one_each.augmented_references()[1][0], one_each.references_clean[0])


@pytest.mark.parametrize("count", [None, 2])
def test_an_attack_step_runs_with_either_count(tiny_encoder: Encoder, count: int | None) -> None:
    config = BadEncoderConfig(epochs=1, batch_size=16, lr=0.05, precision="fp32",
                              reference_augmentations=count)
    result = BadEncoderAttack(tiny_encoder, _targets(), config, torch.device("cpu")).run(
        _shadow(32))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["l1"])
    assert -1.0 <= result.history[0]["l1"] <= 1.0


def test_reference_augmentations_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        BadEncoderConfig(reference_augmentations=0)
