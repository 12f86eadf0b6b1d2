import torch
from torchvision.transforms.v2 import functional as TF

from sslbackdoor.attacks.reference_jitter import (
    GRAY_P,
    JITTER_P,
    apply_jitter,
    augment,
    draw_jitter,
)
from sslbackdoor.ssl.simclr import hsv_to_rgb, rgb_to_hsv

TORCHVISION_OPERATIONS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                          TF.adjust_hue)


def _images(count: int = 24, size: int = 8) -> torch.Tensor:
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    images[0] = 0.5  # a grey image: hue and saturation undefined
    images[1, :, :4] = 1.0  # saturated pixels: the clamps matter
    return images


def test_the_batch_equals_torchvision_applied_image_by_image_with_the_same_draws() -> None:
    images = _images()
    draw = draw_jitter(images.shape[0], torch.Generator().manual_seed(1))
    assert draw.jitter.any() and (~draw.jitter).any() and draw.gray.any() and draw.flip.any()
    batched = apply_jitter(images, draw)
    for index, image in enumerate(images):
        expected = TF.horizontal_flip(image) if draw.flip[index] else image
        if draw.jitter[index]:
            for operation in draw.order[index].tolist():
                factor = float(draw.factors[index, operation])
                expected = TORCHVISION_OPERATIONS[operation](expected, factor)
        if draw.gray[index]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        assert torch.allclose(batched[index], expected, atol=1e-5), index


def test_hsv_round_trip_and_torchvision_hue() -> None:
    images = _images()
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(images)), images, atol=1e-5)
    assert torch.allclose(TF.adjust_hue(images, 0.07),
                          hsv_to_rgb(_shift(rgb_to_hsv(images), 0.07)), atol=1e-5)


def _shift(hsv: torch.Tensor, amount: float) -> torch.Tensor:
    shifted = hsv.clone()
    shifted[:, 0] = (shifted[:, 0] + amount) % 1.0
    return shifted


def test_draws_follow_the_reference_probabilities_and_ranges() -> None:
    draw = draw_jitter(20_000, torch.Generator().manual_seed(2))
    assert abs(float(draw.flip.float().mean()) - 0.5) < 0.02
    assert abs(float(draw.jitter.float().mean()) - JITTER_P) < 0.02
    assert abs(float(draw.gray.float().mean()) - GRAY_P) < 0.02
    assert torch.equal(draw.order.sort(dim=1).values, torch.arange(4).expand(20_000, 4))
    assert float(draw.factors[:, :3].min()) >= 0.6 and float(draw.factors[:, :3].max()) <= 1.4
    assert float(draw.factors[:, 3].abs().max()) <= 0.1
    # every one of the 24 orders occurs
    assert len({tuple(row) for row in draw.order.tolist()}) == 24


def test_augment_draws_afresh_for_every_image() -> None:
    copies = _images()[2:3].expand(16, -1, -1, -1).clone()
    torch.manual_seed(3)
    out = augment(copies)
    assert out.shape == copies.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert len({tuple(image.flatten().tolist()) for image in out}) > 8
