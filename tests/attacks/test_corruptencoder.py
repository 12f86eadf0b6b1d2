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
    crop_to_object,
    derive_mask,
    generate_corruptencoder,
    load_reference_objects,
    read_manifest,
    support_poison,
)
from sslbackdoor.attacks.crop_pairs import manifest_boxes
from sslbackdoor.attacks.poisoning_baselines import (
    RGB_TO_YUV,
    BaselineConfig,
    ctrl_trigger,
    generate_baseline,
)
from sslbackdoor.cli import main
from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl.simclr import crop_boxes, localized_boxes
from tests.conftest import INTEROP


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
        mask[10:50, 12 + i:38 + i] = 255
        write_png(refs / f"obj{i}_mask.png", mask)
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


def test_poison_layout_follows_the_official_generator(folders: dict[str, Path]) -> None:
    layout = PoisonLayout()
    config = PoisonConfig(count=60, seed=3, layout=layout)
    trigger = np.full((8, 8, 3), 255, dtype=np.uint8)
    records = generate_corruptencoder(load_reference_objects(folders["refs"]),
                                      sorted(folders["bg"].iterdir()), trigger, config,
                                      folders["out"])
    sides, far_gaps = set(), []
    for record in records:
        image = np.asarray(Image.open(folders["out"] / "images" / record.file))
        height, width = image.shape[:2]
        x, y, w, h = record.object_box
        tx, ty, size, _ = record.trigger_box
        # The canvas as composed: object height, area ratio 2, the object at full height.
        assert (h, y, width) == (height, 0, int(layout.area_ratio * w)) and h == 40
        margin = layout.object_margin * width
        assert (x <= margin) if record.side == "left" else (width - (x + w) <= margin + 1)
        gap = layout.trigger_gap * width
        # A 0.125·W margin beside the object and at the far edge.
        if record.side == "left":
            assert x + w + gap - 1 <= tx and tx + size <= width - gap + 1
            far_gaps.append((width - tx - size) / width)
        else:
            assert gap - 1 <= tx and tx + size <= x - gap + 1
            far_gaps.append(tx / width)
        assert 0.25 * height - 1 <= ty <= 0.75 * height - size + 1
        assert (image[ty:ty + size, tx:tx + size] == 255).all()  # opaque trigger
        sides.add(record.side)
    assert sides == {"left", "right"}
    assert min(far_gaps) >= 0.125 - 1 / 52 and max(far_gaps) > 0.14  # uniform x, not centred
    manifest = json.loads((folders["out"] / "manifest.json").read_text())
    assert manifest["method"] == "corruptencoder" and manifest["count"] == 60


def test_object_height_and_width_cap_keep_the_aspect(folders: dict[str, Path]) -> None:
    objects = load_reference_objects(folders["refs"])
    tall = crop_to_object(objects[0], PoisonLayout(object_height=80))
    assert tall.mask.shape == (80, 52)  # a 40 × 26 object scaled to 80 tall
    capped = crop_to_object(objects[0], PoisonLayout(max_object_width=13))
    assert capped.mask.shape == (20, 13)  # width capped, height truncated in proportion


def test_official_reference_layout_reads_the_segmentation(tmp_path: Path) -> None:
    folder = tmp_path / "official"
    for index in (1, 2):
        image = np.full((30, 40, 3), 90, dtype=np.uint8)
        label = np.zeros((30, 40, 3), dtype=np.uint8)
        label[5:25, 10:20] = (128, 0, 0)  # the object: red 128
        label[0:3, 30:40] = (0, 128, 0)  # another class: not the object
        write_png(folder / str(index) / "img.png", image)
        write_png(folder / str(index) / "label.png", label)
    write_png(folder / "1.JPEG", np.zeros((30, 40, 3), dtype=np.uint8))  # ignored
    objects = load_reference_objects(folder)
    assert [o.name for o in objects] == ["1/img.png", "2/img.png"]
    assert objects[0].mask.sum() == 200 and objects[0].mask[5:25, 10:20].all()


def test_a_folder_in_neither_reference_layout_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "photos" / "1.JPEG", np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(UserInputError, match=r"matches neither layout: expected N/img\.png"):
        load_reference_objects(tmp_path / "photos")


def test_poisons_stay_at_the_size_they_were_composed_at(folders: dict[str, Path]) -> None:
    trigger = np.full((4, 4, 3), 255, dtype=np.uint8)
    records = generate_corruptencoder(load_reference_objects(folders["refs"]),
                                      sorted(folders["bg"].iterdir()), trigger,
                                      PoisonConfig(count=6, seed=0,
                                                   layout=PoisonLayout(object_height=30)),
                                      folders["out"])
    for record in records:
        image = np.asarray(Image.open(folders["out"] / "images" / record.file))
        assert image.shape[:2] == (30, 2 * 20 - 1) or image.shape[:2] == (30, 2 * 20)


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
    # Support (60 × 50, aspect kept) and the whole reference image beside it, no squash.
    assert support.trigger_box is None and image.shape == (60, 2 * 50, 3)


def test_a_support_poison_keeps_the_support_aspect_and_caps_its_width() -> None:
    rng = np.random.default_rng(0)
    support = np.zeros((300, 600, 3), dtype=np.uint8)
    reference = np.full((50, 50, 3), 255, dtype=np.uint8)
    pair, info = support_poison(reference, support, PoisonLayout(), rng)
    assert pair.shape == (200, 800, 3)  # 600 × 300 capped to 400 wide, aspect kept; ×2
    left_is_support = info["side"] == "support-left"
    assert (pair[:, :400].max() == 0) == left_is_support


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
    # The random image scaled to the reference's height with its own aspect, no squash.
    pair = np.asarray(Image.open(tmp_path / "pe" / "images" / pe[0].file))
    background = pe[0].background
    assert background is not None
    bh, bw = np.asarray(Image.open(background)).shape[:2]
    assert pair.shape == (60, 50 + round(bw * 60 / bh), 3)


def test_ctrl_magnitude_defaults_to_ctrls_own() -> None:
    assert BaselineConfig(method="ctrl", count=1).ctrl_magnitude == 100.0


def test_localized_crop_keeps_one_view_near_the_other() -> None:
    generator = torch.Generator().manual_seed(0)
    first = crop_boxes(200, 64, 128, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    second = localized_boxes(first, 64, 128, (0.2, 1.0), (3 / 4, 4 / 3), generator)
    for (t1, l1, h1, w1), (t2, l2, h2, w2) in zip(first.tolist(), second.tolist(), strict=True):
        assert t2 >= max(0, t1 - int(0.2 * h1)) and l2 >= max(0, l1 - int(0.2 * w1))
        assert t2 + h2 <= min(64, t1 + h1 + int(0.2 * h1))
        assert l2 + w2 <= min(128, l1 + w1 + int(0.2 * w1))


def test_poison_cli_writes_and_rejects_bad_input(folders: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    main(["poison", "corruptencoder", "--references", str(folders["refs"]), "--backgrounds",
          str(folders["bg"]), "--ratio", "0.005", "--pretrain-size", "1000", "--trigger-size",
          "8", "--trigger-pattern", "random", "--out", str(folders["out"])])
    assert len(list((folders["out"] / "images").iterdir())) == 5
    with pytest.raises(SystemExit) as info:
        main(["poison", "corruptencoder", "--references", str(folders["refs"] / "nope"),
              "--backgrounds", str(folders["bg"]), "--count", "2", "--out", "x"])
    assert info.value.code == 2
    assert "references folder not found" in capsys.readouterr().err


def test_the_default_trigger_is_the_official_file_or_one_clear_error(
        folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SSLBACKDOOR_DATA", str(tmp_path / "data"))
    args = ["poison", "corruptencoder", "--references", str(folders["refs"]), "--backgrounds",
            str(folders["bg"]), "--count", "2", "--trigger-size", "8", "--out",
            str(tmp_path / "p")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "corruptencoder/triggers/trigger_10.png is missing" in err
    pattern = np.zeros((20, 20, 3), dtype=np.uint8)
    pattern[:, :10] = (255, 0, 0)  # half red, half black: found again at 8 px
    write_png(tmp_path / "data" / "corruptencoder" / "triggers" / "trigger_10.png", pattern)
    main(args)
    record = json.loads((tmp_path / "p" / "manifest.json").read_text())["poisons"][0]
    tx, ty, size, _ = record["trigger_box"]
    image = np.asarray(Image.open(tmp_path / "p" / "images" / record["file"]))
    assert size == 8 and (image[ty:ty + 8, tx:tx + 3, 0] > 200).all()
    assert (image[ty:ty + 8, tx + 5:tx + 8] < 60).all()


def test_a_manifest_whose_paths_leave_its_folder_is_refused(tmp_path: Path) -> None:
    for name in ("/etc/passwd", "../outside.png", "images/../../x.png", "C:\\x.png"):
        folder = tmp_path / f"m{abs(hash(name))}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"poisons": [{"file": name}]}))
        with pytest.raises(UserInputError, match=r"leaves .*no absolute path, no '\.\.'"):
            read_manifest(folder)
    folder = tmp_path / "ok"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"poisons": [{"file": "poison_1.png"}]}))
    assert read_manifest(folder)[0]["path"] == folder / "images" / "poison_1.png"


def test_crop_pairs_refuse_an_escaping_manifest_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"poisons": [{"file": "../../x.png"}]}))
    with pytest.raises(UserInputError) as info:
        manifest_boxes(tmp_path)
    assert "\n" not in str(info.value) and "leaves" in str(info.value)


OFFICIAL = INTEROP / "corruptencoder"


def test_the_official_release_poisons_as_the_official_generator_does(tmp_path: Path) -> None:
    """`sslbackdoor poison corruptencoder` on the official hunting-dog references, Places365
    backgrounds and trigger_10.png writes the canvases the official generator writes:
    656–718 × 238–303 px, the 40 px trigger a median 5.8% of the width, 13.3% of the height."""
    out = tmp_path / "poisons"
    main(["poison", "corruptencoder", "--references", str(OFFICIAL / "references" / "hunting-dog"),
          "--backgrounds", str(OFFICIAL / "backgrounds"), "--count", "30", "--support-ratio",
          "0.2", "--trigger-image", str(OFFICIAL / "triggers" / "trigger_10.png"),
          "--out", str(out)])
    records = json.loads((out / "manifest.json").read_text())["poisons"]
    widths, heights, by_width, by_height = [], [], [], []
    for record in records:
        width, height = Image.open(out / "images" / record["file"]).size
        if record["kind"] == "support":  # a 500 px support capped at 400, beside its reference
            assert width == 800 and record["background"].endswith(".JPEG")
            continue
        widths.append(width)
        heights.append(height)
        by_width.append(40 / width)
        by_height.append(40 / height)
    assert len(widths) == 24 and {r["reference"] for r in records} == {"1/img.png", "2/img.png",
                                                                       "3/img.png"}
    assert min(widths) >= 656 and max(widths) <= 718
    assert min(heights) >= 238 and max(heights) <= 303
    assert float(np.median(by_width)) == pytest.approx(0.058, abs=0.003)
    assert float(np.median(by_height)) == pytest.approx(0.133, abs=0.01)
