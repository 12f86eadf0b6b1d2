"""NT-Xent against a hand-computed value; the batched views against torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from sslbackdoor.data.native import NativeImages
from sslbackdoor.ssl.simclr import (
    AugmentConfig,
    SimCLRModel,
    SimCLRViews,
    color_jitter,
    crop_boxes,
    gaussian_blur,
    native_resized_crop,
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


def _inside_enlarged(inner: torch.Tensor, outer: torch.Tensor, height: int,
                     width: int) -> torch.Tensor:
    """Whether each inner box lies inside its outer box enlarged by floor(0.2·size)."""
    top, left, h, w = outer.unbind(1)
    region_top = (top - torch.floor(0.2 * h)).clamp(min=0)
    region_left = (left - torch.floor(0.2 * w)).clamp(min=0)
    return ((inner[:, 0] >= region_top) & (inner[:, 1] >= region_left)
            & (inner[:, 0] + inner[:, 2] <= (top + h + torch.floor(0.2 * h)).clamp(max=height))
            & (inner[:, 1] + inner[:, 3] <= (left + w + torch.floor(0.2 * w)).clamp(max=width)))


def test_localized_crop_keeps_one_view_near_the_other_with_the_official_minimum_area() -> None:
    views = SimCLRViews(32, AugmentConfig(localized_crop=True, crop_scale=(0.2, 1.0)))
    params = views.sample_pairs(400, 32, 48, torch.Generator().manual_seed(7))
    first, second = params.boxes[:400], params.boxes[400:]
    forward = _inside_enlarged(second, first, 32, 48)
    backward = _inside_enlarged(first, second, 32, 48)
    assert (forward | backward).all()
    # The two views swap places at random, as the official loader's query and key do.
    assert 100 < int(forward.sum()) < 400 and 100 < int(backward.sum()) < 400
    # Every view is at least the official minimum area (0.2 of the image) or the fallback
    # copy of view 1's size.
    area = params.boxes[:, 2] * params.boxes[:, 3]
    same_size = (first[:, 2:] == second[:, 2:]).all(1).repeat(2)
    assert ((area >= 0.2 * 32 * 48 - 2 * (32 + 48)) | same_size).all()


def test_crop_boxes_draw_from_each_image_own_size() -> None:
    heights, widths = torch.tensor([20.0, 64.0, 30.0]), torch.tensor([90.0, 64.0, 12.0])
    boxes = crop_boxes(3, heights, widths, (0.2, 1.0), (3 / 4, 4 / 3),
                       torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    # One size for all images gives exactly the boxes drawn with an int size.
    same = crop_boxes(5, torch.full((5,), 28.0), torch.full((5,), 28.0), (0.08, 1.0),
                      (3 / 4, 4 / 3), torch.Generator().manual_seed(2))
    assert torch.equal(same, crop_boxes(5, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3),
                                        torch.Generator().manual_seed(2)))


def test_native_views_equal_tensor_views_for_equal_sized_images() -> None:
    images = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)
    views = SimCLRViews(32)
    params = views.sample(6, 28, 28, torch.Generator().manual_seed(3))
    native = views.apply(NativeImages.of([images]), params)
    assert torch.allclose(native, views.apply(images, params), atol=1e-5)


def test_a_shrinking_native_crop_is_box_filtered_and_a_growing_one_bilinear() -> None:
    wide = torch.randint(0, 256, (3, 40, 100), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    images = NativeImages.of([[small, wide]])
    # A 2× shrink of a 32×64 crop: every view pixel is the mean of its 2×2 cell.
    boxes = torch.tensor([[2.0, 3.0, 10.0, 12.0], [4.0, 30.0, 32.0, 32.0]])
    out = native_resized_crop(images, boxes, torch.tensor([False, True]), 16)
    cell_means = F.avg_pool2d(wide[None, :, 4:36, 30:62].float() / 255, 2)[0]
    assert torch.allclose(out[1], cell_means.flip(-1), atol=1e-5)
    grown = resized_crop(small[None].float() / 255, boxes[:1], torch.tensor([False]), 16)
    assert torch.allclose(out[0], grown[0], atol=1e-5)


def test_gaussian_blur_keeps_unblurred_views_and_matches_a_torchvision_kernel() -> None:
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    out = gaussian_blur(images, torch.tensor([0.0, 1.5]))
    assert torch.equal(out[0], images[0])
    expected = TF.gaussian_blur(images[1], [11, 11], [1.5, 1.5])  # radius ceil(3σ)
    inner = (slice(None), slice(5, -5), slice(5, -5))  # edges: replicate vs reflect padding
    assert torch.allclose(out[1][inner], expected[inner], atol=1e-5)


def test_blur_is_drawn_only_when_configured_and_left_out_of_the_dump() -> None:
    plain = SimCLRViews(8).sample(16, 8, 8, torch.Generator().manual_seed(5))
    assert plain.blur is None
    assert "blur_p" not in AugmentConfig().model_dump(mode="json")
    plus = SimCLRViews(8, AugmentConfig(blur_p=0.5)).sample(400, 8, 8,
                                                            torch.Generator().manual_seed(5))
    assert plus.blur is not None and 120 < int((plus.blur > 0).sum()) < 280
    assert (plus.blur[plus.blur > 0] >= 0.1).all() and (plus.blur <= 2.0).all()
    assert AugmentConfig(blur_p=0.5).model_dump(mode="json")["blur_p"] == 0.5


def test_head_without_batch_norm_is_moco_v2s() -> None:
    head = projection_head(32, 32, 16, batch_norm=False)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None
