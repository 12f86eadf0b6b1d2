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


def _square_object_folder(tmp_path: Path, bar: tuple[int, int]) -> tuple[Path, Path]:
    """One reference: a red bar of bar = (height, width) on grey, and dark backgrounds."""
    refs, backgrounds = tmp_path / "square_refs", tmp_path / "square_bg"
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    image[8:8 + bar[0], 9:9 + bar[1]] = (230, 20, 20)
    write_png(refs / "bar.png", image)
    rng = np.random.default_rng(1)
    for i in range(3):  # dark backgrounds without red, so the bar is found by colour
        write_png(backgrounds / f"bg{i}.png", rng.integers(0, 60, (50, 70, 3), dtype=np.uint8))
    return refs, backgrounds


def _red_box(image: np.ndarray) -> tuple[int, int, int, int]:
    red = (image[:, :, 0] > 150) & (image[:, :, 1] < 90) & (image[:, :, 2] < 90)
    rows, cols = np.flatnonzero(red.any(1)), np.flatnonzero(red.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("bar", [(24, 12), (16, 16)])
def test_square_canvas_keeps_object_and_trigger_undistorted(tmp_path: Path,
                                                            bar: tuple[int, int]) -> None:
    """Objects resized to 48 px tall: the 2:1 bar is 24 wide, side max(2·24, 48) = 48 and
    it spans the height; the square one is 48 wide, side 96, and sits at some height.
    Either way the 32 px output shows it at its own aspect, the trigger in the free half."""
    refs, backgrounds = _square_object_folder(tmp_path, bar)
    aspect = bar[0] / bar[1]
    trigger = np.full((6, 6, 3), 255, dtype=np.uint8)
    trigger[::2, ::2] = (0, 0, 255)  # a pattern to find exactly
    layout = PoisonLayout(canvas="square", object_height=48, mask_blur=0, output_size=32)
    records = generate_corruptencoder(load_reference_objects(refs), sorted(backgrounds.iterdir()),
                                      trigger, PoisonConfig(count=12, seed=5, layout=layout),
                                      tmp_path / "out")
    sides, tops = set(), set()
    for record in records:
        image = np.asarray(Image.open(tmp_path / "out" / "images" / record.file))
        assert image.shape == (32, 32, 3)
        assert record.object_box is not None and record.trigger_box is not None
        x, y, w, h = record.object_box
        assert h / w == pytest.approx(aspect, abs=0.15)  # the manifest box is not squashed
        bx, by, bw, bh = _red_box(image)  # nor is the object in the pixels
        assert bh / bw == pytest.approx(aspect, abs=0.25)
        assert abs(bx - x) <= 1 and abs(by - y) <= 1 and abs(bw - w) <= 1 and abs(bh - h) <= 1
        tx, ty, size, _ = record.trigger_box
        assert (image[ty:ty + size, tx:tx + size] == trigger).all()  # square, opaque
        free = (16, 32) if record.side == "left" else (0, 16)  # the half without the object
        assert free[0] <= tx and tx + size <= free[1]
        assert tx >= x + w or tx + size <= x  # beside the object, never on it
        sides.add(record.side)
        tops.add(y)
    assert sides == {"left", "right"}
    assert (tops == {0}) == (aspect == 2)  # full height, or a random height in the square


def test_paper_canvas_squashes_what_the_square_canvas_keeps(tmp_path: Path) -> None:
    """Why `canvas: square`: a 24 × 24 object on the paper's canvas (24 tall, 48 wide)
    resized to 32 × 32 becomes twice as tall as wide; on the square canvas it stays square."""
    refs = tmp_path / "sq_refs"
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    image[8:32, 8:32] = (230, 20, 20)  # a 24 × 24 square object
    write_png(refs / "square.png", image)
    backgrounds = tmp_path / "sq_bg"
    write_png(backgrounds / "bg.png", np.zeros((60, 120, 3), dtype=np.uint8))
    trigger = np.full((4, 4, 3), 255, dtype=np.uint8)
    shapes = {}
    for canvas in ("object-height", "square"):
        layout = PoisonLayout(canvas=canvas, object_height=24, mask_blur=0, output_size=32)
        generate_corruptencoder(load_reference_objects(refs), [backgrounds / "bg.png"], trigger,
                                PoisonConfig(count=1, seed=0, layout=layout), tmp_path / canvas)
        poisoned = np.asarray(Image.open(tmp_path / canvas / "images" / "poison_00000.png"))
        _, _, w, h = _red_box(poisoned)
        shapes[canvas] = h / w
    assert shapes["square"] == pytest.approx(1.0, abs=0.1)
    assert shapes["object-height"] == pytest.approx(2.0, abs=0.2)


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
    main(["poison", "corruptencoder", "--references", str(folders["refs"]), "--backgrounds",
          str(folders["bg"]), "--count", "3", "--trigger-size", "8", "--canvas", "square",
          "--out", str(folders["out"] / "square")])
    manifest = json.loads((folders["out"] / "square" / "manifest.json").read_text())
    assert manifest["config"]["layout"]["canvas"] == "square"
    for record in manifest["poisons"]:
        height, width = np.asarray(Image.open(folders["out"] / "square" / "images" /
                                              record["file"])).shape[:2]
        assert height == width
    with pytest.raises(SystemExit) as info:
        main(["poison", "corruptencoder", "--references", str(folders["refs"]), "--backgrounds",
              str(folders["bg"]), "--count", "2", "--canvas", "round", "--out", "x"])
    assert info.value.code == 2
    assert "--canvas 'round'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["poison", "corruptencoder", "--references", str(folders["refs"] / "nope"),
              "--backgrounds", str(folders["bg"]), "--count", "2", "--out", "x"])
    assert info.value.code == 2
    assert "references folder not found" in capsys.readouterr().err
