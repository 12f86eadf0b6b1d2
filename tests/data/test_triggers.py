import numpy as np
import pytest
import torch

from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.errors import UserInputError
from tests.conftest import FIXTURES

REFERENCE_TRIGGER = FIXTURES / "badencoder" / "trigger_pt_white_21_10_ap_replace.npz"


def test_default_spec_is_the_reference_trigger_position() -> None:
    trigger = Trigger.from_spec(TriggerSpec(size=10, position="bottom-right", margin=1), 32)
    rows = torch.nonzero(trigger.mask[0].sum(1)).flatten()
    cols = torch.nonzero(trigger.mask[0].sum(0)).flatten()
    assert (rows.min().item(), rows.max().item()) == (21, 30)
    assert (cols.min().item(), cols.max().item()) == (21, 30)
    assert trigger.mask.sum().item() == 100


def test_matches_reference_code_trigger_file_on_uint8_pixels() -> None:
    ours = Trigger.from_spec(TriggerSpec(size=10, margin=1), 32)
    theirs = Trigger.from_reference_npz(REFERENCE_TRIGGER)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with np.load(REFERENCE_TRIGGER) as data:
        t, tm = data["t"][0], data["tm"][0]
    expected = images.permute(0, 2, 3, 1).numpy() * tm + t  # the reference code's x·tm + t
    expected_t = torch.from_numpy(expected).permute(0, 3, 1, 2).to(torch.uint8)
    assert torch.equal(theirs.apply_uint8(images), expected_t)
    assert torch.equal(ours.apply_uint8(images), expected_t)


def test_blend_mixes_with_alpha() -> None:
    trigger = Trigger.from_spec(TriggerSpec(size=2, position="top-left", margin=0,
                                            mode="blend", alpha=0.25), 4)
    images = torch.full((1, 3, 4, 4), 0.4)
    stamped = trigger.apply(images)
    assert torch.allclose(stamped[0, :, 0, 0], torch.full((3,), 0.75 * 0.4 + 0.25))
    assert torch.allclose(stamped[0, :, 3, 3], torch.full((3,), 0.4))


def test_random_pattern_is_seeded_and_positions_differ() -> None:
    a = Trigger.from_spec(TriggerSpec(size=4, pattern="random", seed=3), 16)
    b = Trigger.from_spec(TriggerSpec(size=4, pattern="random", seed=3), 16)
    c = Trigger.from_spec(TriggerSpec(size=4, pattern="random", seed=3, position="top-left"), 16)
    assert torch.equal(a.pattern, b.pattern)
    assert not torch.equal(a.mask, c.mask)


def test_trigger_larger_than_image_is_rejected_with_valid_range() -> None:
    with pytest.raises(UserInputError, match=r"larger than the 32×32 image; valid sizes are 1..32"):
        Trigger.from_spec(TriggerSpec(size=40), 32)


def test_trigger_for_other_image_size_is_rejected() -> None:
    trigger = Trigger.from_spec(TriggerSpec(size=4), 16)
    with pytest.raises(UserInputError, match="16×16"):
        trigger.apply(torch.zeros(1, 3, 32, 32))


def test_image_pattern_is_read_and_resized(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "pattern.png"
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(path)
    trigger = Trigger.from_spec(TriggerSpec(size=4, pattern="image", image=path), 16)
    assert trigger.pattern.max().item() == 1.0
    with pytest.raises(UserInputError, match="cannot read trigger image"):
        Trigger.from_spec(TriggerSpec(size=4, pattern="image", image=tmp_path / "none.png"), 16)


def test_bad_reference_npz_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, t=np.zeros((1, 32, 32, 3)))
    with pytest.raises(UserInputError, match="keys 't' and 'tm'"):
        Trigger.from_reference_npz(path)


def test_a_trigger_image_claiming_gigapixels_is_one_line(tmp_path) -> None:
    from tests.data.test_images import png_header

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(UserInputError, match=r"cannot read trigger image .*megapixels") as info:
        Trigger.from_spec(TriggerSpec(size=4, pattern="image", image=path), 16)
    assert "\n" not in str(info.value)
