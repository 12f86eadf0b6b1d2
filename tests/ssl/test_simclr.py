"""NT-Xent against a hand-computed value; the batched views against torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sslbackdoor.ssl.simclr import (
    AugmentConfig,
    SimCLRModel,
    SimCLRViews,
    color_jitter,
    nt_xent_loss,
    projection_head,
    resized_crop,
)


def test_nt_xent_matches_hand_computed_value() -> None:
    # Pairs (0,2) and (1,3); cosine similarities s01=0, s02=1, s03=-1, s12=0, s13=0, s23=-1.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    e = math.exp
    losses = [math.log(e(-2) + 1 + e(-4)),  # anchor 0: positive 2 (logit 2), negatives 0, -2
              math.log(3),                  # anchor 1: all three logits 0
              math.log(e(-2) + 1 + e(-4)),  # anchor 2 mirrors anchor 0
              math.log(1 + 2 * e(-2))]      # anchor 3: positive 1 (logit 0), negatives -2, -2
    expected = sum(losses) / 4
    assert nt_xent_loss(z, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    # Rows are normalised inside: scaling a row changes nothing.
    assert nt_xent_loss(z * torch.tensor([[3.0], [0.5], [2.0], [7.0]]), 0.5).item() == \
        pytest.approx(expected, abs=1e-6)


def test_nt_xent_anchor_subsets_average_to_the_full_loss() -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    full = nt_xent_loss(z, 0.5)
    halves = [nt_xent_loss(z, 0.5, torch.tensor(rows)) for rows in ([0, 1, 4, 5], [2, 3, 6, 7])]
    assert torch.allclose(full, (halves[0] + halves[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        nt_xent_loss(torch.randn(3, 2))


def test_projection_head_shape() -> None:
    head = projection_head(32)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].bias is None and head(torch.randn(4, 32)).shape == (4, 128)


def test_simclr_model_projects_encoder_features(tiny_encoder: torch.nn.Module) -> None:
    model = SimCLRModel(tiny_encoder, hidden_dim=8, out_dim=4)  # type: ignore[arg-type]
    assert model(torch.rand(3, 3, 16, 16)).shape == (3, 4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_views_shapes_ranges_and_determinism(dtype: torch.dtype) -> None:
    images = torch.randint(0, 256, (10, 3, 28, 28), dtype=torch.uint8)
    if dtype == torch.float32:
        images = images.float() / 255
    views = SimCLRViews(32)
    first = views(images, torch.Generator().manual_seed(1))
    again = views(images, torch.Generator().manual_seed(1))
    other = views(images, torch.Generator().manual_seed(2))
    assert first.shape == (10, 3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_view_params_slice_like_the_batch() -> None:
    images = torch.rand(8, 3, 16, 16)
    views = SimCLRViews(16)
    params = views.sample(8, 16, 16, torch.Generator().manual_seed(3))
    whole = views.apply(images, params)
    assert torch.allclose(views.apply(images[4:], params[4:]), whole[4:], atol=1e-6)


def test_full_crop_is_identity_and_flip_mirrors() -> None:
    images = torch.rand(2, 3, 12, 12)
    box = torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 2)
    out = resized_crop(images, box, torch.tensor([False, True]), 12)
    assert torch.allclose(out[0], images[0], atol=1e-5)
    assert torch.allclose(out[1], images[1].flip(-1), atol=1e-5)


def test_color_jitter_equals_torchvision_per_image() -> None:
    images = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    images[5] = images[5, :1]  # a grey image (hue must leave it unchanged)
    params = SimCLRViews(8).sample(24, 8, 8, torch.Generator().manual_seed(5))
    ours = color_jitter(images, params.factors, params.order, params.jitter)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(24):
        expected = images[i]
        if params.jitter[i]:
            for op in params.order[i].tolist():
                expected = ops[op](expected, float(params.factors[i, op]))
        assert torch.allclose(ours[i], expected, atol=1e-5), i


def test_grayscale_views_have_equal_channels() -> None:
    views = SimCLRViews(8)
    params = views.sample(16, 8, 8, torch.Generator().manual_seed(6))
    out = views.apply(torch.rand(16, 3, 8, 8), params)
    grey = out[params.gray]
    assert params.gray.any()
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_localized_crop_keeps_view_two_near_view_one() -> None:
    views = SimCLRViews(32, AugmentConfig(localized_crop=True))
    params = views.sample_pairs(200, 32, 48, torch.Generator().manual_seed(7))
    first, second = params.boxes[:200], params.boxes[200:]
    top, left, h, w = first.unbind(1)
    region_top = (top - torch.round(0.2 * h)).clamp(min=0)
    region_left = (left - torch.round(0.2 * w)).clamp(min=0)
    assert (second[:, 0] >= region_top).all() and (second[:, 1] >= region_left).all()
    assert (second[:, 0] + second[:, 2] <= (top + h + torch.round(0.2 * h)).clamp(max=32)).all()
    assert (second[:, 1] + second[:, 3] <= (left + w + torch.round(0.2 * w)).clamp(max=48)).all()
    plain = SimCLRViews(32).sample_pairs(200, 32, 48, torch.Generator().manual_seed(7))
    assert torch.equal(plain.boxes[:200], first)  # view 1 is drawn as usual
