"""Every test of the toolkit, offline, on tiny models built in the test.

    python -m pytest -q test_all.py

Sections: data.py, metrics.py, cut.py, vlad.py, the end-to-end chain. No test downloads anything: Stable
Diffusion and CLIP are built from small configs, saved to a temporary folder and loaded back through the same
loading code a user runs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

torch.set_num_threads(1)  # two spinning OpenMP threads on a shared 2-core machine can be 50x slower

HERE = Path(__file__).resolve().parent


def run_cli(*args, cwd=None, env=None):
    """Run one of the toolkit's command lines in a subprocess, as a user would."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or HERE, env=full_env,
                          capture_output=True, text=True, timeout=600)


# =========================================================================================================
# data.py: image and mask IO, atomic writes, the MVTec reader, VisA conversion, k-shot selection
# =========================================================================================================


def data_write_mvtec_tree(root: Path) -> dict:
    """A tiny MVTec-layout tree with two categories; returns what the reader must find."""
    rng = np.random.default_rng(0)
    expected = {}
    for category, defects in (("bottle", {"broken": 2, "crack": 1}), ("wood_grain", {"hole": 1})):
        base = root / category
        for i in range(3):
            data.save_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), base / "train/good" / f"{i:03d}.png")
        for i in range(2):
            data.save_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), base / "test/good" / f"{i:03d}.png")
        masks = {}
        for defect, count in defects.items():
            for i in range(count):
                data.save_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                                base / "test" / defect / f"{i:03d}.png")
                mask = np.zeros((16, 16), np.uint8)
                mask[i: i + 4, 2:7] = 255
                data.save_image(mask, base / "ground_truth" / defect / f"{i:03d}_mask.png")
                masks[(defect, f"{i:03d}")] = mask > 0
        expected[category] = {"defects": defects, "masks": masks}
    return expected


def test_reader_returns_exact_samples_and_masks_of_mvtec_tree(tmp_path):
    expected = data_write_mvtec_tree(tmp_path)
    assert data.list_categories(tmp_path) == ["bottle", "wood_grain"]
    train = data.read_split(tmp_path, "bottle", "train")
    assert [s.image.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.mask is None and s.defect == "good" for s in train)
    test = data.read_split(tmp_path, "bottle", "test")
    assert [(s.defect, s.image.name, s.label) for s in test] == [
        ("good", "000.png", 0), ("good", "001.png", 0),
        ("broken", "000.png", 1), ("broken", "001.png", 1), ("crack", "000.png", 1)]
    for sample in test[2:]:
        assert sample.mask == tmp_path / "bottle/ground_truth" / sample.defect / f"{sample.image.stem}_mask.png"
        mask = data.load_mask(sample.mask)
        assert mask.dtype == np.float32
        np.testing.assert_array_equal(mask, expected["bottle"]["masks"][(sample.defect, sample.image.stem)])


def test_reader_rejects_defect_image_without_mask(tmp_path):
    data_write_mvtec_tree(tmp_path)
    (tmp_path / "bottle/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(data.DataError, match=r"crack/000.png.*mask.*missing"):
        data.read_split(tmp_path, "bottle", "test")


def test_reader_names_known_categories_for_unknown_one(tmp_path):
    data_write_mvtec_tree(tmp_path)
    with pytest.raises(data.DataError, match="unknown category 'cable'.*bottle, wood_grain"):
        data.read_split(tmp_path, "cable", "test")


def test_info_cli_prints_counts_per_category(tmp_path):
    data_write_mvtec_tree(tmp_path)
    result = run_cli("data.py", "info", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    bottle = next(line for line in lines if line.startswith("bottle"))
    assert bottle.split()[:5] == ["bottle", "3", "2", "3", "3"]
    assert "broken 2, crack 1" in bottle


def test_soft_mask_keeps_probabilities_and_binary_mask_thresholds(tmp_path):
    values = np.array([[0, 64, 128, 255]], np.uint8)
    data.save_image(values, tmp_path / "m.png")
    np.testing.assert_allclose(data.load_mask(tmp_path / "m.png", binarize=False), values / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.load_mask(tmp_path / "m.png"), [[0, 0, 1, 1]])
    soft = np.array([[0.0, 0.25, 0.5, 1.0]])
    data.save_mask(soft, tmp_path / "s.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s.png")), [[0, 64, 128, 255]])


def test_mask_resize_uses_nearest_for_binary_masks(tmp_path):
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 255
    data.save_image(mask, tmp_path / "m.png")
    resized = data.load_mask(tmp_path / "m.png", size=(8, 8))
    assert set(np.unique(resized)) == {0.0, 1.0}
    assert resized[:4, :4].all() and not resized[4:].any()


def data_encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "CMYK"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 10, 3), dtype=np.uint8))
    image = {"P": lambda: rgb.convert("P"), "I;16": lambda: Image.fromarray(
        (np.asarray(rgb.convert("L"), np.uint16) * 257))}.get(mode, lambda: rgb.convert(mode))()
    suffix = ".jpg" if mode == "CMYK" else ".png"
    if mode in ("CMYK",):
        (tmp_path / f"x{suffix}").write_bytes(data_encode(image, "JPEG"))
    else:
        image.save(tmp_path / f"x{suffix}")
    loaded = data.load_image(tmp_path / f"x{suffix}")
    assert loaded.mode == "RGB" and loaded.size == (10, 8)
    if mode == "I;16":  # 16-bit gray scaled to 8 bits, not clipped to white
        np.testing.assert_allclose(np.asarray(loaded)[..., 0], np.asarray(rgb.convert("L")), atol=1)


def test_tiff_and_jpeg_load_and_exif_orientation_is_applied(tmp_path):
    array = np.zeros((6, 10, 3), np.uint8)
    array[:, :5] = 255  # left half white
    Image.fromarray(array).save(tmp_path / "x.tif")
    assert data.load_image(tmp_path / "x.tif").size == (10, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "x.jpg", exif=exif, quality=100)
    shown = np.asarray(data.load_image(tmp_path / "x.jpg"))
    assert shown.shape == (10, 6, 3)
    assert shown[:4].mean() > 200 and shown[-4:].mean() < 50  # the white half is now on top


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    good = data_encode(Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    (tmp_path / "cut_short.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="cut_short.png"):
        data.load_image(tmp_path / "cut_short.png")
    with pytest.raises(data.DataError, match="missing.png: no such image"):
        data.load_image(tmp_path / "missing.png")


def test_float_tiff_round_trips_exact_values(tmp_path):
    values = np.random.default_rng(3).standard_normal((7, 9)).astype(np.float32)
    data.save_tiff(values, tmp_path / "map.tiff")
    np.testing.assert_array_equal(data.load_tiff(tmp_path / "map.tiff"), values)
    assert Image.open(tmp_path / "map.tiff").mode == "F"


def test_interrupted_atomic_write_leaves_no_file_under_final_name(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):
        with data.atomic_path(target) as temporary:
            temporary.write_bytes(b"half an image")
            raise KeyboardInterrupt  # Ctrl-C midway
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    data.save_json({"a": 1}, tmp_path / "x.json")
    with pytest.raises(KeyboardInterrupt):
        with data.atomic_path(tmp_path / "x.json") as temporary:
            temporary.write_text("{")
            raise KeyboardInterrupt
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}  # the old complete file survives


def test_jsonl_reader_ignores_torn_last_line(tmp_path):
    data.append_jsonl({"i": 0}, tmp_path / "m.jsonl")
    data.append_jsonl({"i": 1}, tmp_path / "m.jsonl")
    with open(tmp_path / "m.jsonl", "a") as handle:
        handle.write('{"i": 2, "tru')
    assert data.read_jsonl(tmp_path / "m.jsonl") == [{"i": 0}, {"i": 1}]


def test_k_shot_is_deterministic_per_seed_and_differs_across_seeds(tmp_path):
    images = [tmp_path / f"{i:03d}.png" for i in range(20)]
    first = data.select_k_shot(images, 4, seed=0)
    assert first == data.select_k_shot(list(reversed(images)), 4, seed=0)
    assert len(set(first)) == 4 and set(first) <= set(images)
    picks = {tuple(data.select_k_shot(images, 4, seed=s)) for s in range(5)}
    assert len(picks) == 5
    with pytest.raises(data.DataError, match="k-shot 21 .* 20"):
        data.select_k_shot(images, 21, seed=0)


def test_shards_are_disjoint_and_cover_all_jobs(monkeypatch):
    jobs = list(range(11))
    parts = [data.shard_jobs(jobs, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == jobs
    assert data.resolve_shard("1/3") == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert data.resolve_shard(None) == (2, 4)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(data.DataError):
            data.resolve_shard(bad)


def data_write_visa_tree(root: Path) -> None:
    """A tiny VisA tree in VisA's own layout, with masks stored as 0/1 (as some VisA masks are)."""
    rows = [("object", "split", "label", "image", "mask")]
    rng = np.random.default_rng(4)
    for category in ("candle", "pcb1"):
        for split, label, name in (("train", "normal", "0000"), ("train", "normal", "0001"),
                                   ("test", "normal", "0002"), ("test", "anomaly", "000"),
                                   ("test", "anomaly", "001")):
            folder = "Normal" if label == "normal" else "Anomaly"
            image = f"{category}/Data/Images/{folder}/{name}.JPG"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / image, format="JPEG")
            mask = ""
            if label == "anomaly":
                mask = f"{category}/Data/Masks/Anomaly/{name}.png"
                values = np.zeros((12, 12), np.uint8)
                values[2:5, 3:7] = 1
                (root / mask).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(values).save(root / mask)
            rows.append((category, split, label, image, mask))
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv/1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def test_visa_conversion_gives_mvtec_tree_with_splits_and_binary_masks(tmp_path):
    data_write_visa_tree(tmp_path / "visa")
    result = run_cli("data.py", "visa-to-mvtec", tmp_path / "visa", tmp_path / "mvtec")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "mvtec"
    assert data.list_categories(out) == ["candle", "pcb1"]
    train = data.read_split(out, "candle", "train")
    assert [s.image.name for s in train] == ["0000.png", "0001.png"]
    test = data.read_split(out, "pcb1", "test")
    assert [(s.defect, s.image.name) for s in test] == [("good", "0002.png"), ("bad", "000.png"), ("bad", "001.png")]
    mask = np.asarray(Image.open(test[1].mask))
    assert set(np.unique(mask)) == {0, 255}
    assert mask[2:5, 3:7].all() and mask.sum() == 12 * 255


def test_data_cli_errors_are_one_sentence_and_nonzero(tmp_path):
    result = run_cli("data.py", "info", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such dataset folder."
    result = run_cli("data.py", "visa-to-mvtec", tmp_path, tmp_path / "out")
    assert result.returncode == 2 and "1cls.csv" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_overlay_and_contact_sheet_have_expected_colours_and_size():
    image = np.full((4, 4, 3), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    blended = data.overlay(image, heat, alpha=1.0)
    assert tuple(blended[0, 0]) == (128, 0, 0)  # jet's top end is dark red
    assert tuple(blended[3, 3]) == (0, 0, 128)  # and its bottom dark blue
    sheet = data.contact_sheet([[image, blended], [image]], cell=8)
    assert sheet.shape == (2 * 12 + 4, 2 * 12 + 4, 3)
