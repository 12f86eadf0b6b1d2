import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.fft import dctn

from sslbackdoor.attacks.corruptencoder import (
    PoisonConfig,
    PoisonLayout,
    derive_mask,
    generate_corruptencoder,
    load_reference_objects,
)
from sslbackdoor.attacks.poisoning_baselines import (
    RGB_TO_YUV,
    BaselineConfig,
    ctrl_trigger,
    generate_baseline,
)
from sslbackdoor.cli import main
from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl.simclr import crop_boxes, localized_boxes


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    refs = tmp_path / "refs"
    for i in range(3):  # a coloured ellipse-ish blob on a plain grey background
        image = np.full((60, 50, 3), 128, dtype=np.uint8)
        image[10:50, 12 + i:38 + i] = (200, 30 + 40 * i, 60)
        write_png(refs / f"obj{i}.png", image)
    mask = np.zeros((60, 50), dtype=np.uint8)
    mask[10:50, 12:38] = 255
    write_png(refs / "obj0_mask.png", mask)  # one explicit mask; the others are derived
    backgrounds = tmp_path / "bg"
    for i in range(4):
        write_png(backgrounds / f"bg{i}.png",
                  rng.integers(0, 256, (40 + 10 * i, 90, 3), dtype=np.uint8))
    return {"refs": refs, "bg": backgrounds, "out": tmp_path / "out"}


def test_derived_mask_finds_the_object_on_a_plain_background() -> None:
    image = np.full((20, 20, 3), 10, dtype=np.uint8)
    image[5:15, 4:9] = 250
    mask = derive_mask(image)
    assert mask.sum() == 50 and mask[5:15, 4:9].all()
    with pytest.raises(UserInputError, match="supply a mask file"):
        derive_mask(np.zeros((8, 8, 3), dtype=np.uint8))


def test_poison_layout_follows_the_paper(folders: dict[str, Path]) -> None:
    layout = PoisonLayout()
    config = PoisonConfig(count=40, seed=3, layout=layout)
    trigger = np.full((8, 8, 3), 255, dtype=np.uint8)
    records = generate_corruptencoder(load_reference_objects(folders["refs"]),
                                      sorted(folders["bg"].iterdir()), trigger, config,
                                      folders["out"])
    sides = set()
    for record in records:
        image = np.asarray(Image.open(folders["out"] / "images" / record.file))
        height, width = image.shape[:2]
        x, _, w, h = record.object_box
        tx, ty, size, _ = record.trigger_box
        assert h == height and width == round(layout.area_ratio * w)  # object spans the height
        margin = layout.object_margin * width
        assert (x <= margin) if record.side == "left" else (width - (x + w) <= margin)
        gap = layout.trigger_gap * width
        assert (tx >= x + w + gap - 1) if record.side == "left" else (tx + size <= x - gap + 1)
        assert 0.25 * height - 1 <= ty <= 0.75 * height - size + 1
        assert (image[ty:ty + size, tx:tx + size] == 255).all()  # opaque trigger
        sides.add(record.side)
    assert sides == {"left", "right"}
    manifest = json.loads((folders["out"] / "manifest.json").read_text())
    assert manifest["method"] == "corruptencoder" and manifest["count"] == 40


def test_poisons_are_reproducible_from_the_seed(folders: dict[str, Path], tmp_path: Path) -> None:
    trigger = np.zeros((6, 6, 3), dtype=np.uint8)
    objects = load_reference_objects(folders["refs"])
    backgrounds = sorted(folders["bg"].iterdir())
    for out in ("a", "b"):
        generate_corruptencoder(objects, backgrounds, trigger, PoisonConfig(count=5, seed=9),
                                tmp_path / out)
    for i in range(5):
        name = f"images/poison_{i:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_corruptencoder_plus_mixes_in_support_poisons(folders: dict[str, Path]) -> None:
    config = PoisonConfig(count=10, support_ratio=0.2, seed=1)
    records = generate_corruptencoder(load_reference_objects(folders["refs"]),
                                      sorted(folders["bg"].iterdir()),
                                      np.zeros((6, 6, 3), dtype=np.uint8), config, folders["out"],
                                      supports=sorted(folders["refs"].glob("obj*.png")))
    kinds = [r.kind for r in records]
    assert kinds.count("support") == 2 and kinds.count("corruptencoder") == 8
    support = records[kinds.index("support")]
    image = np.asarray(Image.open(folders["out"] / "images" / support.file))
    assert support.trigger_box is None and image.shape[1] == 2 * 50


def test_ctrl_adds_the_magnitude_to_the_chosen_dct_coefficients() -> None:
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    poisoned = ctrl_trigger(image, magnitude=30.0, window=32, positions=[(15, 15), (31, 31)])
    yuv = poisoned.astype(np.float64) @ RGB_TO_YUV.T
    base = image.astype(np.float64) @ RGB_TO_YUV.T
    for channel in (1, 2):
        delta = dctn(yuv[:, :, channel], norm="ortho") - dctn(base[:, :, channel], norm="ortho")
        assert delta[15, 15] == pytest.approx(30.0, abs=3.0)  # uint8 rounding
        assert delta[31, 31] == pytest.approx(30.0, abs=3.0)
        assert abs(delta[3, 7]) < 3.0
    assert np.abs(poisoned.astype(int) - 128).max() <= 12  # invisible-ish


def test_ssl_backdoor_and_poisonedencoder_baselines(folders: dict[str, Path], tmp_path: Path) -> None:
    trigger = np.full((8, 8, 3), 255, dtype=np.uint8)
    refs = sorted(folders["refs"].glob("obj?.png"))
    ssl = generate_baseline(BaselineConfig(method="ssl-backdoor", count=4), tmp_path / "ssl",
                            target_images=refs, trigger=trigger)
    for record in ssl:
        image = np.asarray(Image.open(tmp_path / "ssl" / "images" / record.file))
        x, y, s, _ = record.trigger_box
        assert (image[y:y + s, x:x + s] == 255).all()
        assert 60 // 4 <= y <= 3 * 60 // 4 - s and 50 // 4 <= x <= 3 * 50 // 4 - s
    pe = generate_baseline(BaselineConfig(method="poisonedencoder", count=2), tmp_path / "pe",
                           target_images=[], trigger=trigger, references=refs,
                           backgrounds=sorted(folders["bg"].iterdir()))
    assert np.asarray(Image.open(tmp_path / "pe" / "images" / pe[0].file)).shape == (60, 100, 3)


def test_localized_crop_keeps_view_two_near_view_one() -> None:
    generator = torch.Generator().manual_seed(0)
    first = crop_boxes(200, 64, 128, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    second = localized_boxes(first, 64, 128, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    for (t1, l1, h1, w1), (t2, l2, h2, w2) in zip(first.tolist(), second.tolist(), strict=True):
        assert t2 >= max(0, t1 - round(0.2 * h1)) and l2 >= max(0, l1 - round(0.2 * w1))
        assert t2 + h2 <= min(64, t1 + h1 + round(0.2 * h1))
        assert l2 + w2 <= min(128, l1 + w1 + round(0.2 * w1))


def test_poison_cli_writes_and_rejects_bad_input(folders: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    main(["poison", "corruptencoder", "--references", str(folders["refs"]), "--backgrounds",
          str(folders["bg"]), "--ratio", "0.005", "--pretrain-size", "1000", "--trigger-size",
          "8", "--out", str(folders["out"])])
    assert len(list((folders["out"] / "images").iterdir())) == 5
    with pytest.raises(SystemExit) as info:
        main(["poison", "corruptencoder", "--references", str(folders["refs"] / "nope"),
              "--backgrounds", str(folders["bg"]), "--count", "2", "--out", "x"])
    assert info.value.code == 2
    assert "references folder not found" in capsys.readouterr().err
