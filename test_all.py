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
import dataclasses
import errno
import gzip
import html.parser
import io
import json
import math
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage  # independent references only: the toolkit itself never imports scipy or sklearn
from sklearn.metrics import precision_recall_curve, roc_auc_score

import cut
import data
import metrics
import vlad

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


def test_reader_skips_the_temporary_file_of_a_killed_write(tmp_path):
    data_write_mvtec_tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with data.atomic_path(tmp_path / "bottle/test/crack/001.png") as temporary:
            raise KeyboardInterrupt  # only to learn the temporary name atomic_path uses
    temporary.write_bytes(b"half an image")  # what kill -9 mid-write leaves: it never reaches the cleanup
    assert temporary.name.startswith(".001.png.") and temporary.suffix == ".png"
    assert [(s.defect, s.image.name) for s in data.read_split(tmp_path, "bottle", "test")][2:] == [
        ("broken", "000.png"), ("broken", "001.png"), ("crack", "000.png")]


WRITER = """
import os, sys, time
sys.path.insert(0, {here!r})
import data
with data.atomic_path({target!r}) as temporary:
    temporary.write_bytes(b"half a file")
    print(temporary, flush=True)
    {then}
"""


def start_writer(target, then):
    """A process midway through an atomic write of `target`; its first output line is the temporary's path."""
    code = WRITER.format(here=str(HERE), target=str(target), then=then)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                               text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_dead_writers_temporary_is_removed_by_the_next_write_and_a_live_writers_is_not(tmp_path):
    live, live_temporary = start_writer(tmp_path / "b.png", "sys.stdin.readline()")  # waits mid-write
    dead, dead_temporary = start_writer(tmp_path / "a.png", "os.kill(os.getpid(), 9)")
    dead.wait(timeout=60)
    assert dead.returncode == -9 and dead_temporary.is_file() and live_temporary.is_file()
    assert data.is_temporary(dead_temporary) and data.is_temporary(live_temporary)
    data.save_text("x", tmp_path / "c.txt")  # the first write into the folder sweeps it
    assert not dead_temporary.exists()
    assert live_temporary.is_file()  # its writer holds the lock: a concurrent run's file is never touched
    live.communicate("go\n", timeout=60)
    assert live.returncode == 0 and (tmp_path / "b.png").read_bytes() == b"half a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "c.txt"]
    # the sweep of a whole tree, as a CLI does at start over its output folder
    deeper = tmp_path / "x" / "y"
    dead, dead_temporary = start_writer(deeper / "d.tiff", "os.kill(os.getpid(), 9)")
    dead.wait(timeout=60)
    assert data.remove_dead_temporaries(tmp_path, recursive=True) == 1 and not dead_temporary.exists()


def test_a_full_disk_is_one_sentence_naming_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    data.save_bytes(b"old", tmp_path / "entry.bin")
    real_write = Path.write_bytes

    def write_half_then_fail(self, blob):
        real_write(self, blob[:len(blob) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(data.DataError) as error:
        data.save_bytes(b"x" * 5000, tmp_path / "entry.bin")
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: the disk is full (5,000 bytes needed") and message.count(". ") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"] and (tmp_path / "entry.bin").read_bytes() == b"old"
    assert data.disk_full_error(tmp_path, ValueError("Error while serializing: No space left on device")) is not None
    assert data.disk_full_error(tmp_path, OSError(errno.EACCES, "Permission denied")) is None


def small_disk_command(folder: Path, kilobytes: int, *command, fill: bool = False) -> list[str]:
    """`command` run with `folder` on a tmpfs of that size, in a private mount namespace (no root needed where
    user namespaces are allowed); `fill` first fills it with a file named filler. Afterwards every file left in
    the folder is listed, one per line."""
    filler = 'dd if=/dev/zero of="$0/filler" bs=1k 2>/dev/null; ' if fill else ""
    script = (f'mount -t tmpfs -o size={kilobytes}k none "$0" || exit 99; {filler}"$@"; rc=$?; '
              f'find "$0" -type f | sort; exit $rc')
    return ["unshare", "-rm", "sh", "-c", script, str(folder), *map(str, command)]


def run_on_a_small_disk(folder: Path, kilobytes: int, *args, fill: bool = False):
    """Run `python ARGS` (a toolkit CLI or -c code) with `folder` on a tiny tmpfs; see small_disk_command."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(small_disk_command(folder, kilobytes, sys.executable, *args, fill=fill), cwd=HERE,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    if result.returncode == 99:
        pytest.skip("this machine cannot mount a small tmpfs in a user namespace (unshare -rm)")
    return result


@pytest.mark.parametrize("write", ["data.save_bytes(b'x' * 200_000, disk + '/big.bin')",
                                   "data.save_image(noise, disk + '/big.png')",  # PIL ignores a short write
                                   "data.save_tiff(noise[..., 0] / 255, disk + '/big.tiff')"])
def test_a_real_full_disk_is_one_sentence_and_leaves_no_file(tmp_path, write):
    code = ("import sys; sys.path.insert(0, '.'); import data, numpy\ndisk = sys.argv[1]\n"
            "noise = numpy.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=numpy.uint8)\n"
            f"try:\n    {write}\n"
            "except data.DataError as error:\n    print(error, file=sys.stderr); sys.exit(2)")
    result = run_on_a_small_disk(tmp_path / "disk", 64, "-c", code, tmp_path / "disk")
    assert result.returncode == 2, result.stderr
    assert re.match(rf"{re.escape(str(tmp_path / 'disk'))}: the disk is full \([\d,]+ bytes needed, 0 bytes free\)",
                    result.stderr), result.stderr
    assert result.stdout == ""  # no file at all is left on the full disk: neither a temporary nor a cut-short one


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


def data_visa_rows(root: Path) -> list[list[str]]:
    with open(root / "split_csv/1cls.csv", newline="") as handle:
        return list(csv.reader(handle))  # line n of the file is rows[n - 1]


def data_save_visa_rows(root: Path, rows: list[list[str]]) -> None:
    with open(root / "split_csv/1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def data_tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def data_visa_row_edit(line: int, column: int, value: str):
    def edit(rows):
        rows[line - 1][column] = value
    return edit


@pytest.mark.parametrize("edit, line, fragment", [
    # Line 9 is pcb1's normal test image: the lines above it are good, so a row-by-row converter writes them.
    (data_visa_row_edit(9, 2, "Normal"), 9, "label 'Normal' is neither 'normal' nor 'anomaly'"),
    (lambda rows: rows[7].pop(), 8, "4 fields where the header has 5 (object,split,label,image,mask)"),
    (data_visa_row_edit(10, 1, "val"), 10, "unknown split 'val'"),
    (data_visa_row_edit(11, 4, "pcb1/Data/Masks/Anomaly/404.png"), 11, "mask "),
    (data_visa_row_edit(11, 4, ""), 11, "anomalous image pcb1/Data/Images/Anomaly/001.JPG has no mask"),
    (data_visa_row_edit(9, 3, "pcb1/Data/Images/Normal/404.JPG"), 9, "image "),
    (data_visa_row_edit(11, 3, "pcb1/Data/Images/Anomaly/000.JPG"), 11, "as line 10 does"),
    (data_visa_row_edit(9, 0, "../pcb1"), 9, "object '../pcb1' is not a category name"),
    (None, 3, "not UTF-8 text"),
], ids=["label-typo", "short-row", "unknown-split", "mask-not-found", "no-mask", "image-not-found", "duplicate",
        "object-not-a-name", "binary-csv"])
def test_visa_conversion_checks_the_whole_csv_before_writing_anything(tmp_path, capsys, edit, line, fragment):
    source, target = tmp_path / "visa", tmp_path / "mvtec"
    data_write_visa_tree(source)
    table = source / "split_csv/1cls.csv"
    if edit is None:  # a binary file where the csv should be: valid text for two lines, then not UTF-8
        table.write_bytes(b"object,split,label,image,mask\ncandle,train,normal,a.JPG,\n\xff\xd8\xff\xe0\x00JFIF")
    else:
        rows = data_visa_rows(source)
        edit(rows)
        data_save_visa_rows(source, rows)
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {table}, line {line}: ") and fragment in error, error
    assert len(error.strip().splitlines()) == 1
    assert not target.exists()  # nothing written


def test_visa_reconversion_after_a_corrected_csv_equals_a_fresh_conversion(tmp_path, capsys):
    source = tmp_path / "visa"
    data_write_visa_tree(source)
    distinct = np.zeros((12, 12), np.uint8)
    distinct[6:9, 1:4] = 1
    Image.fromarray(distinct).save(source / "candle/Data/Masks/Anomaly/001.png")
    correct = data_visa_rows(source)
    wrong = [list(row) for row in correct]
    wrong[3][1] = "train"  # candle's normal test image 0002 in train
    wrong[4][4] = correct[5][4]  # candle's anomaly 000 with the mask of 001
    wrong[6][0] = "pcb"  # a typo in the object of pcb1's first image
    data_save_visa_rows(source, wrong)
    target = tmp_path / "mvtec"
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 0
    assert (target / "candle/train/good/0002.png").is_file() and (target / "pcb/train/good/0000.png").is_file()
    (target / "candle/test/bad/.001.png.k2x9_AB7.tmp.png").write_bytes(b"half an image")  # a killed write
    (target / "candle/train/good/my_extra_photo.png").write_bytes(b"the user's own")
    capsys.readouterr()

    data_save_visa_rows(source, correct)
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 0
    out = capsys.readouterr().out
    assert data.main(["visa-to-mvtec", str(source), str(tmp_path / "fresh")]) == 0
    assert (target / "candle/train/good/my_extra_photo.png").read_bytes() == b"the user's own"  # never removed
    (target / "candle/train/good/my_extra_photo.png").unlink()
    assert data_tree_files(target) == data_tree_files(tmp_path / "fresh")  # masks, images, manifest: all equal
    assert "2 removed that the csv no longer lists" in out  # what the first run wrote; the dead temporary too
    assert [row["category"] for row in data.describe(target)] == ["candle", "pcb1"]
    capsys.readouterr()
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 0  # a third run has nothing to do
    assert "0 files written, 14 kept from a previous run" in capsys.readouterr().out


def test_visa_conversion_refuses_a_folder_of_other_files_and_keeps_them(tmp_path, capsys):
    source, target = tmp_path / "visa", tmp_path / "mine"
    data_write_visa_tree(source)
    (target / "candle/train/good").mkdir(parents=True)
    (target / "candle/train/good/my_photo.png").write_bytes(b"mine")
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 2
    error = capsys.readouterr().err
    assert error == (f"error: DST {target}: holds files that visa-to-mvtec did not write (no visa_to_mvtec.jsonl); "
                     f"convert into a new or empty folder.\n")
    assert data_tree_files(target) == {"candle/train/good/my_photo.png": b"mine"}
    (target / "candle/train/good/my_photo.png").unlink()
    assert data.main(["visa-to-mvtec", str(source), str(target)]) == 0  # empty folders are fine


def test_visa_conversion_resumes_an_interrupted_first_run_into_its_own_folder(tmp_path):
    source, target = tmp_path / "visa", tmp_path / "mvtec"
    data_write_visa_tree(source)
    code = ("import sys, data\nreal = data.save_image\ncalls = []\n"
            "def dying(image, path):\n    calls.append(path)\n    real(image, path)\n"
            "    if len(calls) == 3: import os; os.kill(os.getpid(), 9)\n"
            "data.save_image = dying\ndata.main(['visa-to-mvtec', sys.argv[1], sys.argv[2]])")
    killed = subprocess.run([sys.executable, "-c", code, source, target], cwd=HERE, capture_output=True)
    assert killed.returncode == -9 and len([p for p in target.rglob("*.png")]) == 3
    assert run_cli("data.py", "visa-to-mvtec", source, target).returncode == 0  # its manifest says it is ours
    assert run_cli("data.py", "visa-to-mvtec", source, tmp_path / "fresh").returncode == 0
    assert data_tree_files(target) == data_tree_files(tmp_path / "fresh")


def test_visa_conversion_refuses_a_target_it_cannot_write_before_converting(tmp_path, capsys):
    source = tmp_path / "visa"
    data_write_visa_tree(source)
    (tmp_path / "plain_file").write_text("x")
    for target, message in (
            (tmp_path / "plain_file", f"DST {tmp_path / 'plain_file'}: is a file, not a folder; choose a folder."),
            (tmp_path / "plain_file/out", f"DST {tmp_path / 'plain_file/out'}: {tmp_path / 'plain_file'} is a "
                                          f"file, so the folder cannot be created; choose another."),
            (Path("/proc/nope"), "DST /proc/nope: cannot write in /proc")):
        assert data.main(["visa-to-mvtec", str(source), str(target)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {message}") and len(error.strip().splitlines()) == 1, error
    assert (tmp_path / "plain_file").read_text() == "x"


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


def test_k_shot_cli_prints_the_same_images_as_select_k_shot(tmp_path):
    data_write_mvtec_tree(tmp_path)
    normals = [s.image for s in data.read_split(tmp_path, "bottle", "train")]
    result = run_cli("data.py", "k-shot", tmp_path, "bottle", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(p) for p in data.select_k_shot(normals, 2, seed=7)]
    assert run_cli("data.py", "k-shot", tmp_path, "bottle", "all").stdout.split() == [str(p) for p in normals]
    result = run_cli("data.py", "k-shot", tmp_path, "bottle", "9")
    assert result.returncode == 2 and "k-shot 9" in result.stderr


def test_categories_cli_prints_one_name_a_line_with_spaces_kept(tmp_path):
    for category in ("metal nut", "bottle"):
        data.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / category / "train/good/000.png")
    result = run_cli("data.py", "categories", tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines() == ["bottle", "metal nut"]
    result = run_cli("data.py", "categories", tmp_path / "bottle")
    assert result.returncode == 2 and "no category folders" in result.stderr


def data_write_generated(out: Path, category: str, sources: list[Path], seeds) -> None:
    """cut.py's output for `sources` (one distinct image per sample), its meta lines in a shuffled order."""
    records = []
    for source in sources:
        data.save_image(data.load_image(source), out / category / "train/good" / f"{source.stem}.png")
        for seed in seeds:
            name = f"{source.stem}_{seed}"
            data.save_image(np.full((8, 8, 3), seed, np.uint8), out / category / "test/damaged" / f"{name}.png")
            data.save_mask(np.eye(8), data.mask_path(out, category, "damaged", name))
            records.append({"image": f"test/damaged/{name}.png", "mask": f"ground_truth/damaged/{name}_mask.png",
                            "source": str(source), "seed": seed})
    for record in reversed(records):
        data.append_jsonl(record, out / category / "meta.jsonl")


def test_link_samples_links_the_n_lowest_seeds_of_the_given_images_only_and_refuses_too_few(tmp_path):
    data_write_mvtec_tree(tmp_path / "data")
    normals = sorted(s.image for s in data.read_split(tmp_path / "data", "bottle", "train"))
    pool = tmp_path / "pool"
    data_write_generated(pool, "bottle", normals, seeds=(0, 1, 2))
    target = tmp_path / "k1" / "generated"
    assert data.link_samples(pool, target, [normals[1]], 2) == 2
    assert run_cli("data.py", "link-samples", pool, target, "--n", "2", "--image", normals[1]).returncode == 0
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    stem = normals[1].stem
    assert files == ["bottle/ground_truth/damaged/" + f"{stem}_{i}_mask.png" for i in (0, 1)] + \
        ["bottle/meta.jsonl"] + [f"bottle/test/damaged/{stem}_{i}.png" for i in (0, 1)] + [f"bottle/train/good/{stem}.png"]
    for link in (p for p in target.rglob("*") if p.is_symlink()):   # relative: OUT can be moved whole
        assert not os.path.isabs(os.readlink(link))
        assert link.resolve() == (pool / link.relative_to(target)).resolve()
    assert [(s.defect, s.image.name, s.label) for s in data.read_split(target, "bottle", "test")] == \
        [("damaged", f"{stem}_{i}.png", 1) for i in (0, 1)]
    assert [r["seed"] for r in data.read_jsonl(target / "bottle/meta.jsonl")] == [0, 1]
    result = run_cli("data.py", "link-samples", pool, tmp_path / "k4", "--n", "4", "--image", normals[0])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {pool}: holds 3 samples of {normals[0]}, not the 4 asked for; generate them first (cut.py --n 4)."]
    assert not (tmp_path / "k4").exists()


def test_settings_refuse_a_changed_value_naming_both_values_and_write_nothing(tmp_path):
    first, second = tmp_path / "seed0", tmp_path / "k1_seed0"
    assert run_cli("data.py", "settings", "--stage", first, "N_FEW=100", "PROMPT=a {cls}").returncode == 0
    assert json.loads((first / "settings.json").read_text()) == {"N_FEW": "100", "PROMPT": "a {cls}"}
    result = run_cli("data.py", "settings", "--stage", second, "N_FEW=50", "--stage", first, "N_FEW=50",
                     "PROMPT=a {cls}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: N_FEW='50' differs from N_FEW='100' in {first / 'settings.json'}, with which {first} was made; "
        f"set N_FEW back to continue it, or choose another output folder."]
    assert not second.exists()                                  # the other folder's record is not written either
    assert run_cli("data.py", "settings", "--stage", first, "N_FEW=100", "CUT_ARGS=").returncode == 2  # not recorded
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "generated").mkdir()                   # results of a version that recorded nothing
    result = run_cli("data.py", "settings", "--stage", tmp_path / "old", "N_FEW=100")
    assert result.returncode == 2 and "holds results but no settings.json" in result.stderr


# =========================================================================================================
# metrics.py: every metric against an independent reference (sklearn; an AU-PRO written here with
# scipy.ndimage.label and a loop over thresholds, following the MVTec AD protocol), hand-computed cases, and
# the CLI through subprocess.
# =========================================================================================================


def metrics_reference_max_f1(scores, labels):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def metrics_reference_trapezoid(x, y, x_max):
    """The MVTec AD evaluation code's trapezoid(): cut at x_max, y interpolated between the neighbours."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def metrics_reference_au_pro(maps, masks, fpr_limit=0.3):
    """MVTec AD protocol, written plainly: 8-connected regions by scipy, every distinct score a threshold,
    FPR over all normal pixels of all images, PRO = mean over all regions of all images. maps and masks: a
    stack (N, H, W) or N images (H_i, W_i) of any sizes."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(m) > 0.5 for m in masks]
    region_scores = []
    for anomaly_map, mask in zip(maps, masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        region_scores += [anomaly_map[labelled == r] for r in range(1, n + 1)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(float(np.mean(normal >= threshold)))
        pros.append(float(np.mean([np.mean(scores >= threshold) for scores in region_scores])))
    fprs.append(1.0)
    pros.append(1.0)
    return metrics_reference_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def metrics_random_masks(rng, n, height, width, kind):
    """(n, H, W) bool masks of one kind; the first image is always left normal (all-normal images)."""
    if kind == "noise":  # many small regions, single pixels, diagonal contacts, long snakes
        masks = rng.random((n, height, width)) < 0.3
    elif kind == "single_pixels":
        masks = np.zeros((n, height, width), dtype=bool)
        masks[:, ::3, ::3] = rng.random((n, (height + 2) // 3, (width + 2) // 3)) < 0.5
    elif kind == "diagonal":  # chains touching only at corners: one region under 8-connectivity
        masks = np.zeros((n, height, width), dtype=bool)
        for i in range(n):
            start = rng.integers(0, width)
            for row in range(height):
                masks[i, row, (start + row) % width] = True
    else:  # "blobs": several rectangles per image
        masks = np.zeros((n, height, width), dtype=bool)
        for i in range(n):
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, height - 2), rng.integers(0, width - 2)
                masks[i, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    masks[0] = False
    return masks


def metrics_random_maps(rng, masks, levels):
    """Scores on `levels` distinct values (heavy ties), anomalous pixels higher on average; levels=1: constant."""
    scores = rng.integers(0, levels, masks.shape) + rng.integers(0, max(levels // 2, 1), masks.shape) * masks
    return (scores / max(levels, 1)).astype(np.float32)


# --- auroc and max_f1 -------------------------------------------------------------------------------------


def test_auroc_hand_computed_counts_a_tie_as_one_half():
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: wins 1 + 1 + 1, the 0.5-0.5 tie 1/2 -> 3.5 / 4
    assert metrics.auroc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([0, 1, 0, 1])) == 0.875
    assert metrics.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_max_f1_hand_computed_is_best_threshold_and_keeps_ties_together():
    # threshold 0.7: TP 2, FP 1, FN 0 -> F1 = 4 / 5 (threshold 0.9 gives 2/3)
    assert metrics.max_f1(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0])) == 0.8
    # a tie cannot be split: the only threshold admits both -> TP 1, FP 1 -> 2/3
    assert metrics.max_f1(np.array([0.5, 0.5]), np.array([1, 0])) == 2 / 3


@pytest.mark.parametrize("levels", [1, 2, 5, 1000])
def test_auroc_and_max_f1_match_sklearn_with_heavy_ties(levels):
    rng = np.random.default_rng(levels)
    for trial in range(20):
        n = int(rng.integers(2, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = (rng.integers(0, levels, n) + labels * rng.integers(0, 2, n)).astype(np.float64)
        assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert metrics.max_f1(scores, labels) == pytest.approx(metrics_reference_max_f1(scores, labels), abs=1e-12)


def test_auroc_of_constant_scores_is_one_half():
    assert metrics.auroc(np.full(10, 0.3), np.arange(10) % 2) == 0.5


def test_auroc_undefined_for_one_class_and_rejects_nan():
    with pytest.raises(ValueError, match="one class"):
        metrics.auroc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.max_f1(np.array([-np.inf, 0.2]), np.array([0, 1]))


# --- regions ------------------------------------------------------------------------------------------------


def test_label_regions_joins_diagonal_neighbours_hand_computed():
    mask = np.array([[1, 0, 0, 1, 1],
                     [0, 1, 0, 0, 0],
                     [0, 0, 1, 0, 1],
                     [1, 0, 0, 0, 1],
                     [1, 1, 0, 1, 0]])
    expected = np.array([[1, 0, 0, 2, 2],
                         [0, 1, 0, 0, 0],
                         [0, 0, 1, 0, 3],
                         [4, 0, 0, 0, 3],
                         [4, 4, 0, 3, 0]])
    labels, n = data.label_regions(mask)
    assert n == 4
    np.testing.assert_array_equal(labels, expected)


def metrics_assert_labels_equal_scipy(masks: np.ndarray) -> None:
    labels, n = data.label_regions(masks)
    offset = 0
    for mask, ours in zip(masks, labels):
        theirs, count = ndimage.label(mask, structure=np.ones((3, 3)))
        # Both number the regions in raster order; ours count on across the stack.
        np.testing.assert_array_equal(np.where(ours > 0, ours - offset, 0), theirs)
        offset += count
    assert n == offset


@pytest.mark.parametrize("kind", ["noise", "single_pixels", "diagonal", "blobs"])
def test_label_regions_equals_scipy_8_connectivity_per_image(kind):
    metrics_assert_labels_equal_scipy(metrics_random_masks(np.random.default_rng(1), 6, 23, 17, kind))


def test_label_regions_equals_scipy_near_the_percolation_threshold():
    # Density 0.45 is just above 8-connected site percolation (~0.41): huge, branching regions.
    metrics_assert_labels_equal_scipy(np.random.default_rng(5).random((10, 64, 48)) < 0.45)


def test_label_regions_finds_one_region_in_a_long_serpentine():
    # Rows joined at alternating ends: one region whose runs chain through the whole image.
    mask = np.zeros((41, 41), dtype=bool)
    mask[::2] = True
    for row in range(1, 41, 2):
        mask[row, -1 if row % 4 == 1 else 0] = True
    labels, n = data.label_regions(mask)
    assert n == 1
    np.testing.assert_array_equal(labels, ndimage.label(mask, structure=np.ones((3, 3)))[0])


# --- AU-PRO and the one-sort pixel metrics ----------------------------------------------------------------


def test_au_pro_hand_computed_averages_regions_and_draws_ties_diagonally():
    # One row: region A = pixels 0-2 (size 3), normal pixel 3, region B = pixel 4 (size 1), normal pixel 5.
    maps = np.array([[[0.9, 0.2, 0.2, 0.6, 0.6, 0.1]]], dtype=np.float32)
    masks = np.array([[[1, 1, 1, 0, 1, 0]]], dtype=bool)
    # t = 0.9: FPR 0, PRO (1/3 + 0) / 2 = 1/6.  t = 0.6 (a normal and an anomalous pixel tie): FPR 1/2,
    # PRO (1/3 + 1) / 2 = 2/3, one diagonal segment.  At FPR 0.3 the segment is at 1/6 + 0.3 = 7/15.
    # Area = 0.3 * (1/6 + 7/15) / 2 = 0.095, / 0.3 = 19/60.
    assert metrics.au_pro(maps, masks) == pytest.approx(19 / 60, abs=1e-15)
    assert metrics_reference_au_pro(maps, masks) == pytest.approx(19 / 60, abs=1e-15)


def test_au_pro_of_constant_maps_is_the_diagonal():
    # Every pixel ties: the curve is one segment (0, 0) -> (1, 1); area to 0.3 is 0.045, / 0.3 = 0.15.
    masks = metrics_random_masks(np.random.default_rng(0), 3, 8, 8, "blobs")
    result = metrics.pixel_metrics(np.full(masks.shape, 0.7, dtype=np.float32), masks)
    assert result["PRO"] == pytest.approx(0.15, abs=1e-15)
    assert result["P-AUC"] == 0.5
    assert result["P-F1"] == pytest.approx(2 * masks.sum() / (masks.size + masks.sum()), abs=1e-15)


@pytest.mark.parametrize("kind", ["noise", "single_pixels", "diagonal", "blobs"])
@pytest.mark.parametrize("levels", [1, 3, 20, 100000])
def test_pixel_metrics_match_sklearn_and_reference_au_pro(kind, levels):
    rng = np.random.default_rng(levels)
    masks = metrics_random_masks(rng, 5, 12, 14, kind)
    maps = metrics_random_maps(rng, masks, levels)
    maps_before = maps.copy()
    result = metrics.pixel_metrics(maps, masks)
    np.testing.assert_array_equal(maps, maps_before)  # sorted copies, never the caller's maps
    assert result["P-AUC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert result["P-F1"] == pytest.approx(metrics_reference_max_f1(maps.ravel(), masks.ravel()), abs=1e-6)
    assert result["PRO"] == pytest.approx(metrics_reference_au_pro(maps, masks), abs=1e-6)
    assert metrics.au_pro(maps, masks) == result["PRO"]


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 0.5, 1.0])
def test_au_pro_matches_reference_at_other_fpr_limits(fpr_limit):
    rng = np.random.default_rng(7)
    masks = metrics_random_masks(rng, 4, 10, 10, "blobs")
    maps = metrics_random_maps(rng, masks, 6)
    assert metrics.au_pro(maps, masks, fpr_limit) == pytest.approx(
        metrics_reference_au_pro(maps, masks, fpr_limit), abs=1e-6)


def test_au_pro_hits_a_vertex_exactly_at_the_limit():
    # 10 normal pixels with distinct scores, so FPR steps by 0.1 and 0.3 is a vertex of the curve.
    maps = np.array([[[0.95, 0.05, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.75]]], dtype=np.float32)
    masks = np.array([[[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]], dtype=bool)
    assert metrics.au_pro(maps, masks) == pytest.approx(metrics_reference_au_pro(maps, masks), abs=1e-12)


def test_pixel_metrics_undefined_without_anomalous_pixels_and_reject_inf():
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    result = metrics.pixel_metrics(maps, np.zeros((2, 4, 4), dtype=bool))
    assert result == {"P-AUC": None, "P-F1": None, "PRO": None}
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1:3, 1:3] = True
    maps[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.pixel_metrics(maps, masks)


def test_image_metrics_of_one_class_leave_auroc_undefined_but_f1_defined():
    assert metrics.image_metrics(np.array([0.2, 0.4]), np.array([1, 1])) == {"I-AUC": None, "I-F1": 1.0}
    assert metrics.image_metrics(np.array([0.2, 0.4]), np.array([0, 0])) == {"I-AUC": None, "I-F1": None}


def test_evaluate_category_returns_the_five_numbers_of_the_references():
    rng = np.random.default_rng(3)
    masks = metrics_random_masks(rng, 8, 9, 11, "blobs")
    maps = metrics_random_maps(rng, masks, 7)
    labels = masks.reshape(8, -1).any(axis=1).astype(int)
    scores = maps.reshape(8, -1).max(axis=1)
    result = metrics.evaluate_category(scores, labels, maps, masks)
    assert list(result) == list(metrics.METRICS)
    assert result["I-AUC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["I-F1"] == pytest.approx(metrics_reference_max_f1(scores, labels), abs=1e-12)
    assert result["PRO"] == pytest.approx(metrics_reference_au_pro(maps, masks), abs=1e-6)


def metrics_images_of_mixed_sizes(seed: int = 0):
    """Maps and masks of 3 to 5 sizes, in a list, the first image normal, each mask of one kind of
    metrics_random_masks (noise, diagonal chains, blobs), scores with ties."""
    rng = np.random.default_rng(seed)
    sizes = [(12, 14), (7, 19), (20, 6), (12, 14), (1, 9), (15, 15), (9, 1)]
    maps, masks = [], []
    for i, (height, width) in enumerate(sizes):
        mask = metrics_random_masks(rng, 2, height, width, ("noise", "diagonal", "blobs")[i % 3])[1]
        masks.append(mask if i else np.zeros_like(mask))
        maps.append(metrics_random_maps(rng, mask[None], 20)[0])
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_of_images_of_different_sizes_match_the_references_on_pooled_pixels(seed):
    maps, masks = metrics_images_of_mixed_sizes(seed)
    pixels = np.concatenate([m.ravel() for m in maps])  # the protocol pools the pixels of all images
    labels = np.concatenate([k.ravel() for k in masks])
    result = metrics.pixel_metrics(maps, masks)
    assert result["P-AUC"] == pytest.approx(roc_auc_score(labels, pixels), abs=1e-12)
    assert result["P-F1"] == pytest.approx(metrics_reference_max_f1(pixels, labels), abs=1e-12)
    assert result["PRO"] == pytest.approx(metrics_reference_au_pro(maps, masks), abs=1e-9)  # regions per image
    assert metrics.au_pro(maps, masks) == result["PRO"]
    scores, image_labels = np.array([m.max() for m in maps]), np.array([int(k.any()) for k in masks])
    assert metrics.evaluate_category(scores, image_labels, maps, masks) == {
        **metrics.image_metrics(scores, image_labels), **result}


def test_pixel_metrics_of_a_list_equal_those_of_the_stack_and_name_the_image_whose_sizes_differ():
    rng = np.random.default_rng(4)
    masks = metrics_random_masks(rng, 6, 11, 13, "noise")
    maps = metrics_random_maps(rng, masks, 50)
    assert metrics.pixel_metrics(list(maps), list(masks)) == metrics.pixel_metrics(maps, masks)
    bad_masks = list(masks)
    bad_masks[3] = masks[3][:, :-1]
    with pytest.raises(ValueError, match=r"image 3: map \(11, 13\) and mask \(11, 12\)"):
        metrics.pixel_metrics(list(maps), bad_masks)
    with pytest.raises(ValueError, match="6 maps but 5 masks"):
        metrics.pixel_metrics(list(maps), list(masks)[:5])


# --- CLI ----------------------------------------------------------------------------------------------------


def metrics_write_trees(root: Path, categories=("widget", "gadget"), size=16, mask_size=16, seed=0):
    """A tiny MVTec-layout GT tree and a matching prediction tree. Returns (gt, pred, expected numbers)."""
    rng = np.random.default_rng(seed)
    gt, pred = root / "gt", root / "pred"
    expected = {}
    for category in categories:
        rows, scores_all, labels_all, maps_all, masks_all = [], [], [], [], []
        for defect, count in (("good", 3), ("crack", 3), ("hole", 2)):
            for i in range(count):
                stem = f"{i:03d}"
                data.save_image(rng.integers(0, 255, (mask_size, mask_size, 3), dtype=np.uint8),
                                gt / category / "test" / defect / f"{stem}.png")
                mask = np.zeros((mask_size, mask_size))
                if defect != "good":
                    y, x = rng.integers(0, mask_size - 4, 2)
                    mask[y:y + 4, x:x + 3] = 1
                    data.save_mask(mask, data.mask_path(gt, category, defect, stem))
                factor = mask_size // size
                # Nearest neighbour as PIL does it: the source pixel under the centre of each target pixel.
                small_mask = mask[factor // 2::factor, factor // 2::factor] > 0.5
                anomaly_map = (rng.random((size, size)) + 0.5 * small_mask).astype(np.float32)
                data.save_tiff(anomaly_map, pred / category / "test" / defect / f"{stem}.tiff")
                score = float(anomaly_map.max())
                rows.append(f"test/{defect}/{stem}.tiff,{score!r}")
                scores_all.append(score)
                labels_all.append(int(defect != "good"))
                maps_all.append(anomaly_map)
                masks_all.append(small_mask)
        data.save_text("path,score\n" + "\n".join(rows) + "\n", pred / category / "scores.csv")
        expected[category] = metrics.evaluate_category(np.array(scores_all), np.array(labels_all),
                                                       np.stack(maps_all), np.stack(masks_all))
    return gt, pred, expected


def test_cli_prints_the_table_and_writes_json_equal_to_the_functions(tmp_path):
    gt, pred, expected = metrics_write_trees(tmp_path)
    result = run_cli("metrics.py", "--pred", pred, "--gt", gt, "--json", tmp_path / "run.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["category", *metrics.METRICS]
    assert [line.split()[0] for line in lines[1:4]] == ["gadget", "widget", "mean"]
    widget = lines[2].split()
    assert widget[1:] == [f"{100 * expected['widget'][m]:.1f}" for m in metrics.METRICS]
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["metrics"] == list(metrics.METRICS)
    for category in ("widget", "gadget"):
        for m in metrics.METRICS:
            assert written["categories"][category][m] == pytest.approx(expected[category][m], abs=1e-12)
    assert written["mean"]["PRO"] == pytest.approx((expected["widget"]["PRO"] + expected["gadget"]["PRO"]) / 2)
    assert written["info"]["widget"] == {"images": 8, "anomalous": 5, "map_size": [16, 16], "map_sizes": [[16, 16]],
                                         "masks_resized": 0, "first_mask_resized": None}
    assert "resized" not in result.stdout


def test_cli_skips_an_interrupted_writes_temporaries_and_hidden_folders_and_reads_a_bom_csv(tmp_path):
    gt, pred, expected = metrics_write_trees(tmp_path, categories=("widget",))
    crack = pred / "widget/test/crack"
    (crack / ".000.tiff.k2x9ab_z.tmp.tiff").write_bytes((crack / "000.tiff").read_bytes()[:100])  # kill -9
    for root in (pred, gt):  # a notebook's or a file manager's hidden folders
        (root / "widget/test/.ipynb_checkpoints").mkdir()
        (root / ".Trash-1000/test").mkdir(parents=True)
    scores = pred / "widget/scores.csv"
    scores.write_bytes(b"\xef\xbb\xbf" + scores.read_bytes().replace(b"\n", b"\r\n"))  # saved by a spreadsheet
    result = run_cli("metrics.py", "--pred", pred, "--gt", gt, "--json", tmp_path / "run.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "run.json").read_text())
    assert list(written["categories"]) == ["widget"]
    for m in metrics.METRICS:
        assert written["categories"]["widget"][m] == pytest.approx(expected["widget"][m], abs=1e-12)


def test_cli_json_on_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    disk = tmp_path / "disk"
    result = run_on_a_small_disk(disk, 16, "metrics.py", "--pred", pred, "--gt", gt, "--json", disk / "run.json",
                                 fill=True)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and re.match(rf"error: {re.escape(str(disk))}: the disk is full \([\d,]+ bytes needed, "
                                        rf"0 bytes free\)", error[0]), error
    assert result.stdout.splitlines() == [str(disk / "filler")]  # no json, no temporary


def test_cli_resizes_masks_to_the_map_size_and_says_so(tmp_path):
    gt, pred, expected = metrics_write_trees(tmp_path, categories=("widget",), size=8, mask_size=16)
    result = run_cli("metrics.py", "--pred", pred, "--gt", gt, "--json", tmp_path / "run.json")
    assert result.returncode == 0, result.stderr
    assert (f"widget: 5 ground-truth masks resized to the size of their map (nearest neighbour), e.g. "
            f"{data.mask_path(gt, 'widget', 'crack', '000')} 16x16 -> 000.tiff 8x8.") in result.stdout
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["info"]["widget"]["masks_resized"] == 5
    assert written["categories"]["widget"]["PRO"] == pytest.approx(expected["widget"]["PRO"], abs=1e-12)


def test_cli_one_class_category_prints_na_and_stores_null(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    # Keep only the good images of 'gadget': every label is 0.
    gt2, pred2, _ = metrics_write_trees(tmp_path / "b", categories=("gadget",))
    for tree in (gt2, pred2):
        for defect in ("crack", "hole"):
            for path in sorted((tree / "gadget" / "test" / defect).iterdir()):
                path.unlink()
            (tree / "gadget" / "test" / defect).rmdir()
    csv_path = pred2 / "gadget" / "scores.csv"
    csv_path.write_text("\n".join(line for line in csv_path.read_text().splitlines() if "good" in line or
                                  line.startswith("path")) + "\n")
    for tree, other in ((gt2, gt), (pred2, pred)):
        (tree / "gadget").rename(other / "gadget")
    result = run_cli("metrics.py", "--pred", pred, "--gt", gt, "--json", tmp_path / "run.json")
    assert result.returncode == 0, result.stderr
    gadget = next(line for line in result.stdout.splitlines() if line.startswith("gadget")).split()
    assert gadget[1:] == ["n/a"] * 5
    assert "gadget: I-AUC, I-F1 undefined, the test images are all one class" in result.stdout
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["categories"]["gadget"] == {m: None for m in metrics.METRICS}
    assert written["mean"] == written["categories"]["widget"]  # the mean skips undefined values


def test_cli_summarize_prints_mean_and_std_over_runs(tmp_path):
    runs = []
    for seed, value in enumerate([0.8, 0.9]):
        run = {"metrics": list(metrics.METRICS),
               "categories": {"widget": {m: value for m in metrics.METRICS}},
               "mean": {m: value for m in metrics.METRICS}}
        runs.append(tmp_path / f"run{seed}.json")
        data.save_json(run, runs[-1])
    result = run_cli("metrics.py", "--summarize", *runs, "--json", tmp_path / "summary.json")
    assert result.returncode == 0, result.stderr
    widget = next(line for line in result.stdout.splitlines() if line.startswith("widget"))
    assert widget.split()[1:4] == ["85.0", "±", "7.1"]  # sample std of {80, 90} = 7.07
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean"]["PRO"]["mean"] == pytest.approx(0.85)
    assert summary["mean"]["PRO"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert summary["categories"]["widget"]["I-AUC"]["n"] == 2


def metrics_save_run(path: Path, values: dict) -> Path:
    """A run JSON as --json writes it, one category 'widget' whose values are also the mean row."""
    data.save_json({"metrics": list(metrics.METRICS), "categories": {"widget": dict(values)}, "mean": dict(values),
                    "pred": str(path.with_suffix(""))}, path)
    return path


def test_cli_summarize_counts_the_runs_it_averages_not_the_files_given(tmp_path, capsys):
    runs = [metrics_save_run(tmp_path / "a.json", {m: 0.8 for m in metrics.METRICS}),
            metrics_save_run(tmp_path / "b.json", {m: 0.9 for m in metrics.METRICS}),
            metrics_save_run(tmp_path / "c.json", {m: None for m in metrics.METRICS}),  # e.g. one class only
            metrics_save_run(tmp_path / "d.json", {**{m: 0.7 for m in metrics.METRICS}, "PRO": None})]
    assert metrics.main(["--summarize", *map(str, runs), "--json", str(tmp_path / "summary.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    widget = lines[1].split()
    assert widget[1:4] == ["80.0", "±", "10.0"]  # I-AUC over a, b, d: mean 0.8, sample std 0.1
    assert widget[-4:] == ["85.0", "±", "7.1", "(n=2)"]  # PRO over a and b only
    assert lines[3] == (f"mean ± sample std over 3 runs; a cell marked (n=k) averages k runs, the others have no "
                        f"value there; left out, every value null: {runs[2]}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["categories"]["widget"]["PRO"] == {"mean": pytest.approx(0.85), "std": pytest.approx(
        np.std([0.8, 0.9], ddof=1)), "n": 2}
    assert summary["runs_without_values"] == [str(runs[2])]
    assert metrics.main(["--summarize", str(runs[0]), str(runs[1])]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "mean ± sample std over 2 runs"


def test_cli_summarize_refuses_a_run_given_twice_by_path_or_by_content(tmp_path, capsys):
    a = metrics_save_run(tmp_path / "a.json", {m: 0.8 for m in metrics.METRICS})
    b = metrics_save_run(tmp_path / "b.json", {m: 0.9 for m in metrics.METRICS})
    (tmp_path / "sub").mkdir()
    for twice, message in (
            ([a, b, tmp_path / "sub" / ".." / "a.json"], f"error: {tmp_path / 'sub' / '..' / 'a.json'}: given "
                                                          f"twice (the same file as {a}); give each run once."),
            ([a, b, shutil.copy(b, tmp_path / "copy.json")], f"error: {tmp_path / 'copy.json'}: the same content "
                                                              f"as {b}, so the same run twice; give each run once.")):
        assert metrics.main(["--summarize", *map(str, twice), "--json", str(tmp_path / "s.json")]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == message and captured.out == ""
        assert not (tmp_path / "s.json").exists()


def metrics_assert_bad_input(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in result.stderr


def test_cli_rejects_a_prediction_without_ground_truth(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    data.save_tiff(np.zeros((16, 16)), pred / "widget" / "test" / "crack" / "099.tiff")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "099.tiff", "without a ground-truth image")


def test_cli_rejects_a_ground_truth_image_without_prediction(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    (pred / "widget" / "test" / "hole" / "001.tiff").unlink()
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "hole/001.png", "no prediction")


def test_cli_rejects_scores_csv_that_misses_or_adds_an_image(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    csv_path = pred / "widget" / "scores.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "scores.csv", "no score for test/hole/001.tiff")
    csv_path.write_text("\n".join(lines + ["test/hole/007.tiff,0.5"]) + "\n")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "test/hole/007.tiff has no ground-truth")


def test_cli_rejects_nan_in_a_map_and_in_scores_csv(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    bad_map = np.zeros((16, 16), dtype=np.float32)
    bad_map[3, 3] = np.nan
    data.save_tiff(bad_map, pred / "widget" / "test" / "crack" / "000.tiff")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "crack/000.tiff", "NaN or inf")
    gt, pred, _ = metrics_write_trees(tmp_path / "second", categories=("widget",))
    csv_path = pred / "widget" / "scores.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = "test/good/001.tiff,nan"
    csv_path.write_text("\n".join(lines) + "\n")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "scores.csv, line 3", "finite")


def test_cli_scores_a_category_of_three_image_sizes_as_the_references_do(tmp_path, capsys):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    rng = np.random.default_rng(9)
    # good/000 (the first map, which a one-size check would take as the size of all) and hole/000 differ.
    for defect, stem, (height, width) in (("good", "000", (10, 14)), ("hole", "000", (12, 20))):
        data.save_image(rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
                        gt / "widget/test" / defect / f"{stem}.png")
        mask = np.zeros((height, width))
        if defect == "hole":
            mask[3:8, 5:9] = 1
            mask[9:, 15] = 1
            data.save_mask(mask, data.mask_path(gt, "widget", defect, stem))
        data.save_tiff(rng.random((height, width)) + 0.5 * mask, pred / "widget/test" / defect / f"{stem}.tiff")
    # crack/001's mask at twice its map's size: resized to the map by nearest neighbour, and named in a note.
    crack_mask = data.load_mask(data.mask_path(gt, "widget", "crack", "001")) > 0.5
    data.save_mask(np.kron(crack_mask, np.ones((2, 2))), data.mask_path(gt, "widget", "crack", "001"))

    assert metrics.main(["--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert "widget: maps of 3 sizes (14x10, 16x16, 20x12)" in out
    assert f"widget: 1 ground-truth masks resized to the size of their map (nearest neighbour), e.g. " \
           f"{data.mask_path(gt, 'widget', 'crack', '001')} 32x32 -> 001.tiff 16x16." in out
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["info"]["widget"]["map_size"] is None
    assert written["info"]["widget"]["map_sizes"] == [[14, 10], [16, 16], [20, 12]]

    samples = data.read_split(gt, "widget", "test")
    maps = [data.load_tiff(pred / "widget" / data.prediction_path(s)) for s in samples]
    masks = [np.zeros(m.shape, bool) if s.mask is None else
             crack_mask if s.mask == data.mask_path(gt, "widget", "crack", "001") else data.load_mask(s.mask) > 0.5
             for s, m in zip(samples, maps)]
    assert [m.shape for m in masks] == [m.shape for m in maps]
    pixels, labels = np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() for k in masks])
    scores = metrics.read_scores_csv(pred / "widget/scores.csv")
    image_scores = [scores[data.prediction_path(s)] for s in samples]
    reference = {"I-AUC": roc_auc_score([s.label for s in samples], image_scores),
                 "P-AUC": roc_auc_score(labels, pixels), "P-F1": metrics_reference_max_f1(pixels, labels),
                 "PRO": metrics_reference_au_pro(maps, masks)}
    for metric, value in reference.items():
        assert written["categories"]["widget"][metric] == pytest.approx(value, abs=1e-9), metric


def test_cli_json_path_that_cannot_be_written_is_one_sentence_before_evaluating(tmp_path, capsys, monkeypatch):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    run = metrics_save_run(tmp_path / "a.json", {m: 0.8 for m in metrics.METRICS})
    (tmp_path / "plain_file").write_text("x")
    (tmp_path / "folder").mkdir()
    evaluated = []
    monkeypatch.setattr(metrics, "load_category", lambda *args: evaluated.append(args))
    monkeypatch.setattr(metrics, "load_run", lambda *args: evaluated.append(args))
    for json_path, reason in ((Path("/proc/nope/run.json"), "its folder /proc/nope: cannot write in /proc"),
                              (tmp_path / "plain_file/run.json", f"its folder {tmp_path / 'plain_file'}: is a file"),
                              (tmp_path / "plain_file/sub/run.json",
                               f"its folder {tmp_path / 'plain_file/sub'}: {tmp_path / 'plain_file'} is a file, so"),
                              (tmp_path / "folder", "is a folder; give a file name.")):
        for command in (["--pred", str(pred), "--gt", str(gt)], ["--summarize", str(run)]):
            assert metrics.main([*command, "--json", str(json_path)]) == 2
            captured = capsys.readouterr()
            assert captured.err.startswith(f"error: --json {json_path}: {reason}"), captured.err
            assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""
    assert evaluated == []  # refused before any work
    monkeypatch.undo()
    assert metrics.main(["--summarize", str(run), "--json", str(run)]) == 2
    assert "is one of the runs to summarize" in capsys.readouterr().err
    assert json.loads(run.read_text())["mean"]["PRO"] == 0.8


def test_cli_into_a_closed_pipe_writes_the_json_and_exits_quietly(tmp_path):
    gt, pred, expected = metrics_write_trees(tmp_path, categories=("widget",))
    # The read end is closed before metrics.py prints anything (as `| head` does once it has its lines).
    command = [sys.executable, "metrics.py", "--pred", pred, "--gt", gt, "--json", tmp_path / "r.json"]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141 and stderr == ""  # no traceback, no "Exception ignored"
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["categories"]["widget"]["PRO"] == pytest.approx(expected["widget"]["PRO"], abs=1e-12)


def test_cli_rejects_a_category_missing_from_the_ground_truth(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget",))
    (pred / "widget").rename(pred / "gizmo")
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt), "gizmo", "ground truth")


def test_cli_rejects_a_requested_category_without_predictions(tmp_path):
    gt, pred, _ = metrics_write_trees(tmp_path, categories=("widget", "gadget"))
    for path in sorted((pred / "gadget").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (pred / "gadget").rmdir()
    metrics_assert_bad_input(run_cli("metrics.py", "--pred", pred, "--gt", gt, "--categories", "widget", "gadget"),
                             "gadget", "no predictions")
    result = run_cli("metrics.py", "--pred", pred, "--gt", gt)  # by default only the predicted categories, with a note
    assert result.returncode == 0, result.stderr
    assert "without predictions, not evaluated: gadget" in result.stdout


def test_cli_summarize_rejects_runs_of_different_categories_and_bad_json(tmp_path):
    for name, category in (("a.json", "widget"), ("b.json", "gadget")):
        data.save_json({"categories": {category: {m: 0.5 for m in metrics.METRICS}},
                        "mean": {m: 0.5 for m in metrics.METRICS}}, tmp_path / name)
    metrics_assert_bad_input(run_cli("metrics.py", "--summarize", tmp_path / "a.json", tmp_path / "b.json"),
                             "b.json", "differ")
    (tmp_path / "c.json").write_text("{not json")
    metrics_assert_bad_input(run_cli("metrics.py", "--summarize", tmp_path / "c.json"), "c.json")


def metrics_save_runs(folder: Path, categories, seeds=(0, 1)) -> list[Path]:
    """Run JSONs as --json writes them, random values (fractions) per category and their mean row."""
    rng = np.random.default_rng(7)
    paths = []
    for seed in seeds:
        rows = {name: {m: float(rng.uniform(0.5, 1.0)) for m in metrics.METRICS} for name in categories}
        mean = {m: float(np.mean([row[m] for row in rows.values()])) for m in metrics.METRICS}
        paths.append(folder / f"run{seed}.json")
        data.save_json({"metrics": list(metrics.METRICS), "categories": rows, "mean": mean, "pred": str(seed)},
                       paths[-1])
    return paths


def metrics_row(lines: list[str], name: str) -> list[str]:
    """The cells of the table row called `name` (a name may hold spaces: 'paper mean', 'mean - paper')."""
    row = next(line for line in lines if line.startswith(name + "  "))
    return re.split(r"\s{2,}", row[len(name):].strip())


def test_cli_summarize_prints_the_papers_row_and_yours_minus_the_papers_under_the_mean(tmp_path, capsys):
    runs = metrics_save_runs(tmp_path, ("bottle", "screw", "zipper"))
    inputs = [json.loads(p.read_text()) for p in runs]
    assert metrics.main(["--summarize", *map(str, runs), "--paper", "auto:k1", "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("  ")[0] for line in lines[1:8]]
    assert names == ["bottle", "screw", "zipper", "mean", "paper mean", "mean - paper", "paper bottle"]
    for name, paper in (("mean", metrics.PAPER["mvtec", "k1"]),                 # Table 1
                        ("bottle", metrics.PAPER_CATEGORIES["mvtec", "k1"]["bottle"]),   # Table 6
                        ("screw", metrics.PAPER_CATEGORIES["mvtec", "k1"]["screw"])):
        yours = [np.mean([(run["mean"] if name == "mean" else run["categories"][name])[m] for run in inputs])
                 for m in metrics.METRICS]
        assert metrics_row(lines, f"paper {name}") == [f"{mean:.1f} ± {std:.1f}" for mean, std in paper.values()]
        assert metrics_row(lines, f"{name} - paper") == [f"{100 * y - published:+.1f}"
                                                         for y, (published, _) in zip(yours, paper.values())]
    assert not any(line.startswith("paper zipper") for line in lines)          # not in the Table 6 excerpt
    assert "paper: MVTec AD, k = 1 (arXiv 2406.01078v1, Table 1)" in lines[-3]
    assert lines[-2] == "note: the paper's mean is over MVTec AD's 15 categories, yours over 3 of them."
    comparison = json.loads((tmp_path / "s.json").read_text())["paper"]       # fractions, like the rest
    assert comparison["rows"]["mean"]["difference"]["PRO"] == pytest.approx(
        np.mean([run["mean"]["PRO"] for run in inputs]) - 0.919)

    visa = tmp_path / "visa"
    visa.mkdir()
    runs = metrics_save_runs(visa, ("candle", "pcb1"))
    assert metrics.main(["--summarize", *map(str, runs), "--paper", "visa:all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert metrics_row(lines, "paper mean") == ["95.8", "91.9", "98.7", "58.7", "97.7"]  # Table 2: no std
    assert "paper: VisA, full-shot (arXiv 2406.01078v1, Table 2)" in lines[-2]


def test_cli_summarize_of_categories_of_no_known_dataset_prints_no_paper_row_and_says_so(tmp_path, capsys):
    runs = metrics_save_runs(tmp_path, ("cookie", "bottle"))
    assert metrics.main(["--summarize", *map(str, runs), "--paper", "auto:k2", "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["cookie", "bottle", "mean"]
    assert lines[4] == "mean ± sample std over 2 runs" and lines[6] == f"wrote {tmp_path / 's.json'}"
    assert lines[5] == ("paper: no row, the categories (cookie, bottle) are neither MVTec AD's nor VisA's; give "
                         "--paper mvtec:k2 or visa:k2 to compare anyway.")
    assert "paper" not in json.loads((tmp_path / "s.json").read_text())


@pytest.mark.parametrize("value", ["mvtec", "mvtec:k3", "imagenet:k1", "auto:", "MVTec:k1"])
def test_cli_summarize_rejects_a_bad_paper_value_in_one_line_with_exit_2(tmp_path, capsys, value):
    runs = metrics_save_runs(tmp_path, ("bottle",))
    assert metrics.main(["--summarize", *map(str, runs), "--paper", value, "--json", str(tmp_path / "s.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"error: --paper {value!r}: expected DATASET:SETTING with DATASET one of mvtec, visa, auto and SETTING one "
        f"of k1, k2, k4, all, k1-image, k1-pixel, e.g. mvtec:k1.\n")
    assert not (tmp_path / "s.json").exists()


CUT_SIZE = 64                       # pixels; with the factor-2 VAE the 16x16 attention grid of SD at 512
CUT_PROMPT = "a photo of a {cls} that is damaged"
CUT_FAST = dict(steps=20, gamma=0.5, thresholds={0: 0.05, 5: 0.5}, max_iters=3, early_stop_after=3)


# =========================================================================================================
# cut.py: the tiny Stable Diffusion builder (also used by the cut benchmark and the end-to-end test)
# =========================================================================================================


def cut_write_clip_tokenizer(folder: Path) -> None:
    """A real CLIPTokenizer with Stable Diffusion's exact vocabulary, from open_clip's bundled BPE file."""
    import open_clip.tokenizer

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


def build_tiny_sd(folder, vae_factor: int = 2) -> Path:
    """Save a tiny random-weight StableDiffusionPipeline (SD 1.5 topology, SD's tokenizer) to `folder`.

    vae_factor 2: VAE with 2 blocks, so a 64x64 image has a 32x32 latent and 16x16 cross-attention maps (the
    grid SD 1.5 has at 512). vae_factor 8: the 4-block VAE topology of SD itself.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    blocks = {2: 2, 8: 4}[vae_factor]
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64)[:blocks], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1, norm_num_groups=16, sample_size=CUT_SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=32))
    with tempfile.TemporaryDirectory() as source:
        cut_write_clip_tokenizer(Path(source))
        tokenizer = CLIPTokenizer(str(Path(source) / "vocab.json"), str(Path(source) / "merges.txt"),
                                  model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cut_tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), vae_factor=2)


@pytest.fixture(scope="session")
def cut_tiny_sd8(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd8"), vae_factor=8)


# =========================================================================================================
# cut.py: helpers
# =========================================================================================================


def cut_object_image(size: int = CUT_SIZE, seed: int = 0) -> np.ndarray:
    """A bright textured square on a dark background: (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 25, np.uint8)
    lo, hi = size // 4, 3 * size // 4
    image[lo:hi, lo:hi] = 180 + rng.integers(0, 60, (hi - lo, hi - lo, 3), dtype=np.uint8)
    return image


def cut_object_mask(size: int = CUT_SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    return mask


@pytest.fixture(scope="session")
def cut_pipe(cut_tiny_sd):
    return cut.load_pipeline(str(cut_tiny_sd), "cpu", torch.float32)


def cut_generator(pipe, size: int = CUT_SIZE, **overrides) -> "cut.CUT":
    return cut.CUT(pipe, cut.CutSettings(size=size, **{**CUT_FAST, **overrides}))


def cut_generate(generator, seeds=(0,), image_seed: int = 0, word: str = "damaged"):
    size = generator.settings.size
    images = [cut_object_image(size, image_seed)] * len(seeds)
    return generator.generate(images, [cut_object_mask(size)] * len(seeds), list(seeds),
                              cut.fill_prompt(CUT_PROMPT, "bottle"), word)


def cut_cli_args(model, out, *extra):
    return ["--prompt", CUT_PROMPT, "--model", model, "--out", out, "--size", CUT_SIZE, "--steps", 20,
            "--gamma", 0.5, "--thresholds", "0:0.05,5:0.5", "--max-iters", 3, *extra]


def cut_quick_args(model, out, *extra):
    """The CLI with 2 denoising steps per sample: for tests about files, not about the optimization."""
    return [str(a) for a in ["--prompt", CUT_PROMPT, "--model", model, "--out", out, "--size", CUT_SIZE,
                             "--steps", 4, "--gamma", 0.5, "--thresholds", "", "--max-iters", 1, *extra]]


def cut_tree(out: Path) -> dict[str, bytes]:
    """Every output file under out (but meta.jsonl, preview.png and the hidden lock files) -> its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("meta.jsonl", "preview.png") and not p.name.startswith(".")}


def cut_meta(out: Path, category: str = "bottle") -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in data.read_jsonl(out / category / "meta.jsonl")]


def cut_oracle_attention(pipe, z: torch.Tensor, t, cond: torch.Tensor, resolution: int = 16) -> torch.Tensor:
    """The conditional cross-attention A_t (P, P, 77) at z (1, 4, h, w), recorded by diffusers' own
    Attend-and-Excite code (its AttentionStore and processors, over the whole UNet forward): an independent
    reference for cut.py's recorder. z must require grad (A&E stores only then); the result keeps the graph."""
    from diffusers import StableDiffusionAttendAndExcitePipeline
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import \
        pipeline_stable_diffusion_attend_and_excite as attend_and_excite

    excite = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items()
                                                       if k != "image_encoder"})
    originals = pipe.unet.attn_processors
    excite.attention_store = attend_and_excite.AttentionStore((resolution, resolution))
    excite.register_attention_control()
    try:
        pipe.unet(pipe.scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond)
        return excite.attention_store.aggregate_attention(from_where=("up", "down", "mid"))
    finally:
        pipe.unet.set_attn_processor(dict(originals))


def cut_oracle_loss(pipe, z, t, cond, token_indices, mask_attn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4's L_att = 1 - max(A^j * mask) from the oracle attention (A&E's own recording) -> (loss, A^j (P, P))."""
    A_t = cut_oracle_attention(pipe, z, t, cond)[None]
    anomaly_map = cut.anomaly_attention_map(A_t, token_indices, A_t.shape[-1] - 1)[0]   # SD 1.x: tokens 1..75
    return 1.0 - (anomaly_map * mask_attn).max(), anomaly_map


def cut_steer(pipe, gain: float = 5.0):
    """Sharpen every cross-attention of a tiny random UNet (queries and keys x gain): its attention then depends
    strongly on the latent, so the optimization has a large, predictable effect, as with trained weights."""
    from diffusers.models.attention_processor import Attention

    with torch.no_grad():
        for module in pipe.unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                module.to_q.weight.mul_(gain)
                module.to_k.weight.mul_(gain)
    return pipe


@pytest.fixture(scope="session")
def cut_steered_pipe(cut_tiny_sd):
    return cut_steer(cut.load_pipeline(str(cut_tiny_sd), "cpu", torch.float32))


def cut_record_steps(generator, monkeypatch) -> list[dict]:
    """Record, for every denoising step of `generator`, the latent before and after the optimization and the
    latent, timestep and conditional anomaly map of the denoising step, by wrapping its two methods."""
    steps, optimize, denoise = [], generator.optimize, generator.denoise

    def recording_optimize(recorder, z, i, *args, **kwargs):
        out = optimize(recorder, z, i, *args, **kwargs)
        steps.append({"i": i, "z_before": z.detach().clone(), "z_after": out.detach().clone()})
        return out

    def recording_denoise(recorder, z_t, t, *args, **kwargs):
        z_next, anomaly_map = denoise(recorder, z_t, t, *args, **kwargs)
        if not steps or "map" in steps[-1]:
            steps.append({})                                # optimize=False: no optimization record
        steps[-1].update(z_denoised=z_t.detach().clone(), t=t, map=anomaly_map.detach().clone())
        return z_next, anomaly_map

    monkeypatch.setattr(generator, "optimize", recording_optimize)
    monkeypatch.setattr(generator, "denoise", recording_denoise)
    return steps


# =========================================================================================================
# cut.py: the pure pieces (step 2, step 3, Eq. 3 to 5, early stopping)
# =========================================================================================================


def cut_photo_like(kind: str, size=(256, 256), seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """A synthetic photo of a surface or of objects with sensor noise: (H, W, 3) uint8 and, for objects, their
    true solid region (H, W) bool (None for surfaces). size = (H, W)."""
    rng = np.random.default_rng(seed)
    H, W = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[:H, :W] / np.array([H, W], dtype=np.float64)[:, None, None]   # in [0, 1)

    def smooth(cells, amplitude):
        coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize((W, H), Image.BICUBIC)) * amplitude

    def ellipse(cy, cx, ry, rx):
        return (yy - cy) ** 2 / ry ** 2 + (xx - cx) ** 2 / rx ** 2 < 1

    def chips(region, colour):                                      # a cookie's dark chocolate chips
        for _ in range(10):
            cy, cx = yy[region].mean() + rng.uniform(-0.2, 0.2), xx[region].mean() + rng.uniform(-0.2, 0.2)
            colour[ellipse(cy, cx, 0.02, 0.03) & region] = 50

    noise = rng.normal(0, 6, (H, W))
    grain = 1 + smooth(64, 0.06) + rng.normal(0, 0.05, (H, W))     # a tile's fine texture, under the light
    region = None
    rgb = None
    if kind == "leather":                                               # smooth unimodal surface
        gray = 120 + smooth(12, 25) + noise
    elif kind == "carpet":                                              # fine fibres
        gray = 128 + smooth(48, 30) + 2.5 * noise
    elif kind == "asphalt":                                             # grain, one class percolates
        gray = 100 + 4 * noise + smooth(30, 10)
    elif kind == "wood":                                                # grain stripes across the frame
        gray = 140 + 30 * np.sin(xx * 57 + smooth(6, 2)) + noise
    elif kind == "tile":                                                # bright tile with dark speckle
        gray = 190 + noise
        for _ in range(150):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.005, 0.015)]
            gray[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 60
    elif kind == "tile_under_a_gradient":                               # a magnetic tile lit from the right
        gray = 170 * grain * (0.45 + 0.75 * xx) + rng.normal(0, 3, (H, W))
    elif kind == "tile_half_in_shade":                                  # the left 45% in shade, soft penumbra
        gray = 180 * grain * (0.45 + 0.55 / (1 + np.exp(-(xx - 0.45) / 0.02))) + rng.normal(0, 3, (H, W))
    elif kind in ("cookie", "cookie_dark_background_bright"):          # a disc with dark chips and a crack
        region = ellipse(0.5, 0.48, 0.33, 0.33)
        gray = 45 + noise
        gray[region] = 190 + rng.normal(0, 10, region.sum())
        chips(region, gray)
        gray[(np.abs(yy - 0.4 * xx - 0.3) < 0.006) & region] = 50
        if kind == "cookie_dark_background_bright":
            gray = 255 - gray                                           # dark object on a bright background
    elif kind == "metal_nut":                                           # a ring whose centre shows the background
        r = np.hypot(yy - 0.5, xx - 0.5)
        region = (r < 0.37) & (r > 0.14)
        gray = 20 + noise
        gray[region] = 170 + rng.normal(0, 15, region.sum())
    elif kind == "transistor":                                          # dark body, legs cut by the bottom border
        region = np.zeros((H, W), bool)
        region[int(0.25 * H):int(0.6 * H), int(0.3 * W):int(0.7 * W)] = True
        for x0 in (0.35, 0.48, 0.61):
            region[int(0.6 * H):, int(x0 * W):int((x0 + 0.04) * W)] = True
        gray = 200 + noise
        gray[region] = 45 + rng.normal(0, 6, region.sum())
    elif kind == "capsules":                                            # four instances of one product
        region = np.zeros((H, W), bool)
        for cy, cx in ((0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)):
            region |= ellipse(cy, cx, 0.08, 0.17)
        gray = 30 + noise
        gray[region] = 180 + noise[region]
    elif kind in ("cookie_on_a_speckled_tray", "two_cookies_one_cut_by_the_frame", "tan_object_on_gray_tray",
                  "cookie_below_the_trays_rim"):
        level = 120 if kind == "tan_object_on_gray_tray" else 75
        rgb = np.empty((H, W, 3))
        rgb[:] = (level, level, level - 4)                              # a gray tray, a little cool
        rgb += rng.normal(0, 5, (H, W))[..., None]
        if kind == "cookie_on_a_speckled_tray":
            speck = rng.random((H, W)) < 0.04                           # flour and crumbs, under uneven light
            rgb[speck] += rng.uniform(40, 110, (speck.sum(), 1))
            rgb *= (0.8 + 0.35 * xx)[..., None]
        region = ellipse(0.5, 0.45, 0.3, 0.3)
        if kind == "two_cookies_one_cut_by_the_frame":
            region = ellipse(0.45, 0.32, 0.24, 0.24) | ellipse(0.6, 0.95, 0.24, 0.24)
        if kind == "cookie_below_the_trays_rim":                        # a bright metal rim along the top, 6%
            rgb[yy < 0.06] = (205, 210, 220)
            rgb[(yy >= 0.06) & (yy < 0.08)] = 20                        # and its shadow
            region = ellipse(0.55, 0.5, 0.3, 0.3)
        if kind == "tan_object_on_gray_tray":                           # tan (150, 116, 70): gray level 120 too
            rgb[region] = np.array([150, 116, 70]) + rng.normal(0, 5, (region.sum(), 1))
        else:
            rgb[region] = np.array([205, 160, 105]) * (1 + rng.normal(0, 0.05, (region.sum(), 1)))
            chips(region, rgb)
    else:
        raise ValueError(kind)
    if rgb is None:
        rgb = np.repeat(gray[..., None], 3, axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8), region


def cut_holes(mask: np.ndarray) -> int:
    """Holes of a 0/1 mask, by scipy (independent of cut.py): background regions not touching the border."""
    return int((ndimage.binary_fill_holes(mask > 0) & ~(mask > 0)).sum())


def cut_corners_are_background(mask: np.ndarray, side: int = 8) -> bool:
    return all(mask[rows, cols].max() == 0 for rows in (slice(0, side), slice(-side, None))
               for cols in (slice(0, side), slice(-side, None)))


def cut_iou(mask: np.ndarray, region: np.ndarray) -> float:
    return float((mask.astype(bool) & region).sum() / (mask.astype(bool) | region).sum())


CUT_SURFACES = ["leather", "carpet", "asphalt", "wood", "tile", "tile_under_a_gradient", "tile_half_in_shade"]


@pytest.mark.parametrize("kind", CUT_SURFACES)
def test_foreground_of_a_surface_is_the_whole_image_also_under_uneven_light(kind, tmp_path):
    image, _ = cut_photo_like(kind)
    mask, info = cut.foreground_mask(image)
    assert mask.min() == 1 and info["rule"].startswith("surface") and info["warning"] is None, info
    if kind.startswith("tile_"):                               # the light varies by 2x or more across the frame
        gray = image[..., 0].astype(float)
        assert gray[:, -30:].mean() / gray[:, :30].mean() > 1.9
    path = tmp_path / f"{kind}.jpg"                           # the same surface as a grayscale JPEG, 320 x 200
    Image.fromarray(image[..., 0], mode="L").resize((320, 200)).save(path, quality=90)
    photo = np.asarray(data.load_image(path))
    assert cut.foreground_mask(photo)[0].min() == 1


def test_foreground_of_the_example_circuit_board_is_the_whole_image():
    board = np.asarray(data.load_image(HERE / "examples/pcb_1.jpg"))   # binarised traces cut by every side
    mask, info = cut.foreground_mask(board)
    assert mask.min() == 1 and info["rule"] == "surface: a pattern cut by the frame"


@pytest.mark.parametrize("kind", ["cookie", "cookie_dark_background_bright", "transistor", "capsules",
                                  "cookie_on_a_speckled_tray", "two_cookies_one_cut_by_the_frame",
                                  "tan_object_on_gray_tray", "cookie_below_the_trays_rim"])
def test_foreground_of_objects_is_solid_with_dark_details_filled_and_background_out(kind, tmp_path):
    image, region = cut_photo_like(kind)
    mask, info = cut.foreground_mask(image)
    assert info["rule"] == "object" and info["coverage"] == pytest.approx(mask.mean(), abs=1e-4)
    assert cut_holes(mask) == 0 and cut_corners_are_background(mask)
    assert cut_iou(mask, region) > 0.95, cut_iou(mask, region)  # the true solid objects, chips and cracks included
    labels, n = ndimage.label(region)
    assert all(cut_iou(mask * (labels == i), labels == i) > 0.9 for i in range(1, n + 1))  # every object
    if kind == "tan_object_on_gray_tray":                      # the same brightness: only the colour tells
        gray = image.astype(float) @ [0.299, 0.587, 0.114]
        assert abs(gray[region].mean() - gray[~region].mean()) < 2
    path = tmp_path / "object16.png"                          # a grayscale photo as a 16-bit file: the same mask
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(path)
    if kind in ("cookie", "transistor", "capsules"):
        assert Image.open(path).mode.startswith("I")
        np.testing.assert_array_equal(cut.foreground_mask(np.asarray(data.load_image(path)))[0], mask)


def test_foreground_of_a_metal_nut_keeps_the_hole_that_shows_the_background():
    image, region = cut_photo_like("metal_nut")
    mask, info = cut.foreground_mask(image)
    hole = ndimage.binary_fill_holes(region) & ~region          # the true opening in the middle
    assert info["rule"] == "object" and cut_corners_are_background(mask)
    assert mask[hole].mean() < 0.05 and cut_holes(mask) == pytest.approx(hole.sum(), rel=0.05)   # open, to a pixel
    assert cut_iou(mask, region) > 0.95


@pytest.mark.parametrize("name", ["cookie_1.png", "cookie_2.png"])
def test_foreground_of_the_example_cookies_is_the_solid_cookie_off_the_tray_and_its_rim(name):
    image = np.asarray(data.load_image(HERE / "examples" / name))    # 384 x 512, a tray with a bright rim on top
    mask, info = cut.foreground_mask(image)
    assert mask.shape == (512, 384) and info["rule"] == "object" and 0.27 < info["coverage"] < 0.31
    assert cut_holes(mask) == 0 and cut_corners_are_background(mask)
    assert mask[:40].max() == 0                                 # the tray's rim along the top is left out
    labels, n = ndimage.label(mask)
    assert n == 1                                               # one cookie


def test_foreground_is_computed_at_one_analysis_resolution_whatever_the_photo_or_output_size():
    image, region = cut_photo_like("two_cookies_one_cut_by_the_frame", size=(240, 320))
    large = np.asarray(Image.fromarray(image).resize((1280, 960), Image.BICUBIC))   # the same scene, 4x the side
    small, info = cut.foreground_mask(image, size=(64, 48))
    big, big_info = cut.foreground_mask(large, size=(64, 48))
    assert small.shape == (48, 64) and info["rule"] == big_info["rule"] == "object"
    assert np.mean(small != big) < 0.01                         # one rule, whatever the photo's resolution
    full = cut.foreground_mask(image)[0]                        # and output sizes are resizes of one mask
    assert cut_iou(full, region) > 0.95
    assert np.mean((np.asarray(Image.fromarray(full).resize((64, 48), Image.BILINEAR)) > 0.5) != small) < 0.02


def test_foreground_of_a_flat_image_is_a_surface_and_of_a_speck_falls_back_with_a_warning():
    mask, info = cut.foreground_mask(np.full((32, 32, 3), 90, np.uint8))
    assert mask.min() == 1 and info["rule"].startswith("surface") and info["warning"] is None
    tiny = np.full((200, 200, 3), 40, np.uint8)
    tiny[100:112, 100:112] = 220                                # 0.36% of the image: no speck, yet too small
    mask, info = cut.foreground_mask(tiny)
    assert mask.min() == 1 and "whole image" in info["warning"] and info["rule"].startswith("whole image")


def test_downsample_mask_is_area_average_above_half():
    mask = torch.zeros(8, 8)
    mask[:4, :3] = 1                                         # 2x2 cells: full, half (not > 0.5), empty
    assert cut.downsample_mask(mask, (4, 4)).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert cut.downsample_mask(mask, (2, 4)).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]   # 4x2 cells, (h, w)


def test_word_tokens_cover_all_sub_tokens_and_bad_prompts_are_errors(cut_pipe):
    tokenizer = cut_pipe.tokenizer
    prompt = cut.fill_prompt("a photo of a {cls} that is discolored", "metal_nut")
    assert prompt == "a photo of a metal nut that is discolored"
    ids, indices = cut.word_token_indices(tokenizer, prompt, "discolored")
    assert len(indices) == 3 and ids[indices[0]:indices[-1] + 1] == [2475, 549, 736] and indices[-1] == len(ids) - 2
    assert cut.default_word("a photo of a bottle that is damaged.") == "damaged"
    with pytest.raises(cut.CutError, match="does not occur"):
        cut.word_token_indices(tokenizer, prompt, "scratched")
    with pytest.raises(cut.CutError, match="at most 77"):
        cut.word_token_indices(tokenizer, "a photo " * 40 + "damaged", "damaged")


@pytest.mark.filterwarnings("ignore:torch.meshgrid")             # inside diffusers' GaussianSmoothing
def test_eq3_equals_diffusers_attend_and_excite_smoothing_and_max_per_token(monkeypatch):
    from diffusers import StableDiffusionAttendAndExcitePipeline
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import \
        pipeline_stable_diffusion_attend_and_excite as attend_and_excite

    smoothed_by_diffusers = []
    forward = attend_and_excite.GaussianSmoothing.forward

    def recording_forward(self, input):                     # the smoothed map A&E takes the max of
        output = forward(self, input)
        smoothed_by_diffusers.append(output[0, 0].clone())
        return output

    monkeypatch.setattr(attend_and_excite.GaussianSmoothing, "forward", recording_forward)
    generator = torch.Generator().manual_seed(0)
    A_t = (3 * torch.rand(2, 16, 16, 77, generator=generator)).softmax(-1)   # (B, P, P, N), sums to 1 over N
    indices = [5, 6, 7]
    for softmax_end, sliced in ((76, A_t), (9, A_t[..., :10])):   # SD 1.x: tokens 1..75; SD 2.x: up to the end
        ours = cut.token_attention_maps(A_t, indices, softmax_end)                 # (B, J, P, P)
        for b in range(2):
            smoothed_by_diffusers.clear()                    # SD 2.x: A&E's normalize_eot = slice before the end
            maxima = StableDiffusionAttendAndExcitePipeline._compute_max_attention_per_index(
                sliced[b].clone(), indices)
            torch.testing.assert_close(ours[b], torch.stack(smoothed_by_diffusers), atol=1e-6, rtol=0)
            torch.testing.assert_close(ours[b].flatten(1).amax(1), torch.stack(maxima), atol=1e-6, rtol=0)
        torch.testing.assert_close(cut.anomaly_attention_map(A_t, indices, softmax_end), ours.amax(dim=1))
    assert cut.gaussian_kernel()[1, 1] == pytest.approx((1 + 2 / math.e) ** -2)   # A&E's, not exp(-d^2 / 2s^2)


def test_eq3_softmax_range_follows_the_tokenizer_as_attend_and_excite_does(cut_pipe):
    tokenizer = cut_pipe.tokenizer                           # SD 1.x: pads with <|endoftext|>
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert cut.text_softmax_end(tokenizer, 9, 77) == 76       # positions 1..75: end token and padding included
    sd2 = type("SD2Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 49407})()   # SD 2.x pads with "!"
    assert cut.text_softmax_end(sd2, 9, 77) == 8              # positions 1..7: the prompt's words only
    trace = cut_generate(cut_generator(cut_pipe, optimize=False))[0].trace
    assert trace["softmax_tokens"] == [1, 75]


def test_eq5_step_size_and_localized_pixels():
    anomaly_map = torch.zeros(1, 4, 4)
    anomaly_map[0, :2, :3] = 1.0                             # 6 pixels above the mean
    assert cut.localized_pixels(anomaly_map).tolist() == [6]
    assert cut.step_size(10.0, 1 / 200, 50, 30, 120) == pytest.approx(10 * (1 + 50 / 200) * 30 / 120)


def test_early_stop_triggers_exactly_when_the_rule_says_on_a_constructed_trace():
    trace = [120, 60, 30, 25, 60, 70, 80, 90, 100, 45, 51, 50, 49, 20]   # n_t per step at P = 16
    stops = [i for i, n in enumerate(trace) if cut.should_stop_early(i, n, 16 * 16)]
    assert stops[0] == 12                                    # 30, 25 and 45 come before step 10; 50 is not < 50
    assert cut.early_stop_window(8 * 8) == (2.5, 12.5)      # bounds scale with the attention pixels / 256
    assert cut.should_stop_early(10, 12, 64) and not cut.should_stop_early(10, 13, 64)
    assert cut.early_stop_window(18 * 14) == (10 * 252 / 256, 50 * 252 / 256)   # a 4:3 photo's grid


def test_early_stop_in_the_generator_follows_the_rule(cut_pipe, monkeypatch):
    # n_t per step, constructed; with early_stop_after=3, step 3 (30) is the first index >= 3 inside (10, 50)
    trace = iter([100, 30, 100, 30, 100, 30, 30, 30, 30, 30])
    monkeypatch.setattr(cut, "localized_pixels", lambda m: torch.full((len(m),), next(trace), dtype=torch.long))
    result = cut_generate(cut_generator(cut_pipe))[0]
    assert result.trace["early_stop_step"] == 3
    assert result.trace["n_t"] == [100, 30, 100] and len(result.trace["alpha_t"]) == 3
    assert len(result.trace["masked_max"]) == 10             # the remaining steps are still denoised


def test_early_stop_in_the_generator_scales_its_window_by_a_non_square_grids_pixels(cut_pipe, monkeypatch):
    # a 48 x 80 working size: a 12 x 20 grid of 240 pixels, window (9.375, 46.875); n_t = 10 is inside it, while
    # the square grid's (10, 50) would not stop
    monkeypatch.setattr(cut, "localized_pixels", lambda m: torch.full((len(m),), 10, dtype=torch.long))
    image = np.asarray(Image.fromarray(cut_object_image()).resize((80, 48)))
    result = cut_generator(cut_pipe).generate([image], [np.ones((48, 80), np.float32)], [0],
                                              cut.fill_prompt(CUT_PROMPT, "bottle"), "damaged")[0]
    assert result.trace["attn_grid"] == [12, 20] and result.trace["early_stop_step"] == 3


# =========================================================================================================
# cut.py: attention capture and the mechanism, measured on the tiny pipelines
# =========================================================================================================


@pytest.mark.parametrize("vae_factor, size", [(2, 64), (8, 128)])
def test_recording_processor_matches_default_attention_and_records_maps_that_sum_to_one(
        vae_factor, size, cut_tiny_sd, cut_tiny_sd8):
    pipe = cut.load_pipeline(str(cut_tiny_sd if vae_factor == 2 else cut_tiny_sd8), "cpu", torch.float32)
    generator = cut.CUT(pipe, cut.CutSettings(size=size))
    unet, P = pipe.unet, generator.P
    assert P == {2: 16, 8: 8}[vae_factor]
    torch.manual_seed(0)
    z = torch.randn(2, 4, size // vae_factor, size // vae_factor)
    text = torch.randn(2, 77, 32)
    before = unet.attn_processors
    assert {type(p).__name__ for p in before.values()} <= {"AttnProcessor2_0", "AttnProcessor"}
    with torch.no_grad():
        expected = unet(z, 500, encoder_hidden_states=text).sample
        with cut.recording_attention(unet, generator.layer_names, (P, P)) as recorder:
            during = unet.attn_processors
            got = unet(z, 500, encoder_hidden_states=text).sample
            A_t = recorder.pop()
            assert len(generator.layer_names) >= 1
    assert all((during[n] is recorder) == (n in generator.layer_names) for n in before)
    assert all(during[n] is before[n] for n in before if n not in generator.layer_names)
    assert all(unet.attn_processors[n] is before[n] for n in before)       # restored, the same objects
    assert torch.allclose(got, expected, atol=1e-5)
    assert A_t.shape == (2, P, P, 77)
    assert torch.allclose(A_t.sum(-1), torch.ones(2, P, P), atol=1e-5)


def test_recording_processors_are_restored_after_an_error(cut_pipe):
    unet = cut_pipe.unet
    before = unet.attn_processors
    names = cut_generator(cut_pipe).layer_names
    with pytest.raises(RuntimeError, match="boom"):
        with cut.recording_attention(unet, names, (16, 16)):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_recorded_attention_and_its_map_equal_diffusers_attend_and_excite_recording(cut_pipe):
    generator = cut_generator(cut_pipe)
    prompt = cut.fill_prompt(CUT_PROMPT, "bottle")
    ids, indices = generator.prompt_tokens(prompt, "damaged")
    cond = generator.encode_text(prompt)
    t = generator.timesteps()[0]
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    expected = cut_oracle_attention(cut_pipe, z, t, cond)                     # (P, P, 77), whole UNet forward
    with cut.recording_attention(cut_pipe.unet, generator.layer_names, (16, 16)) as recorder:
        anomaly_map = generator.attention_forward(recorder, z, t, cond, indices, 76)   # stops at the last layer
        with torch.no_grad():
            cut_pipe.unet(cut_pipe.scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond)
        torch.testing.assert_close(recorder.pop()[0], expected.detach(), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(anomaly_map, cut.anomaly_attention_map(expected[None], indices, 76), atol=1e-7,
                               rtol=1e-5)


@pytest.mark.parametrize("height, width", [(64, 64), (48, 88)])     # a square photo and a 11:6 one
def test_generation_without_optimization_equals_diffusers_img2img(cut_pipe, monkeypatch, height, width):
    from diffusers import StableDiffusionImg2ImgPipeline

    # gamma 0.29 of 20 steps: diffusers runs int(5.8) = 5 denoising steps (round would give 6)
    generator = cut_generator(cut_pipe, optimize=False, steps=20, gamma=0.29, guidance=7.5)
    latents, decode = [], cut_pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        latents.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(cut_pipe.vae, "decode", recording_decode)
    image = np.asarray(Image.fromarray(cut_object_image()).resize((width, height)))
    result = generator.generate([image], [np.ones((height, width), np.float32)], [3],
                                cut.fill_prompt(CUT_PROMPT, "bottle"), "damaged")[0]
    assert len(result.trace["masked_max"]) == 5 and result.image.shape == (height, width, 3)
    assert result.trace["attn_grid"] == [height // 4, width // 4]       # factor-2 VAE, then the 1/2 level
    img2img = StableDiffusionImg2ImgPipeline(**{k: v for k, v in cut_pipe.components.items() if k != "image_encoder"})
    img2img.set_progress_bar_config(disable=True)
    reference = img2img(cut.fill_prompt(CUT_PROMPT, "bottle"), image=Image.fromarray(image), strength=0.29,
                        num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                        output_type="np").images[0]
    ours_latent = latents[0] * cut_pipe.vae.config.scaling_factor
    theirs_latent = latents[-1] * cut_pipe.vae.config.scaling_factor          # img2img decodes through it too
    torch.testing.assert_close(ours_latent, theirs_latent, atol=1e-5, rtol=1e-5)
    assert np.abs(result.image.astype(int) - np.round(reference * 255).astype(int)).max() <= 1


def cut_half_mask(side: str, size: int = CUT_SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[:, :size // 2] = 1
    return mask if side == "left" else 1 - mask


def test_optimization_raises_the_masked_attention_far_above_plain_denoising(cut_steered_pipe):
    optimized = cut_generate(cut_generator(cut_steered_pipe, early_stop_after=100))[0].trace
    plain = cut_generate(cut_generator(cut_steered_pipe, optimize=False))[0].trace
    assert len(optimized["iterations"]) == 10 and min(optimized["iterations"]) >= 1 and plain["iterations"] == []
    gain = np.array(optimized["masked_max"]) - np.array(plain["masked_max"])
    assert gain.min() > 0.03 and gain[1:].mean() > 0.15, gain   # a plain run's max(A * mask): 0.06 to 0.25


def test_every_update_of_generate_is_eq4_and_eq5_with_an_independent_gradient(cut_steered_pipe, monkeypatch):
    """Through generate, one update per step: z_after = z_before - alpha_t grad(L_att) * mask_latent, with L_att
    from diffusers' own attention recording, alpha_t from Eq. 5 on that map, and the latent outside the
    foreground untouched. The foreground leaves out where the word's attention peaks, so the mask in L_att
    matters too."""
    pipe = cut_steered_pipe
    prompt = cut.fill_prompt(CUT_PROMPT, "bottle")
    for side in ("left", "right"):
        generator = cut_generator(pipe, thresholds={}, early_stop_after=100, lam=10.0, delta=0.05)
        steps = cut_record_steps(generator, monkeypatch)
        foreground = cut_half_mask(side)
        trace = generator.generate([cut_object_image()], [foreground], [0], prompt, "damaged")[0].trace
        ids, indices = generator.prompt_tokens(prompt, "damaged")
        cond, timesteps = generator.encode_text(prompt), generator.timesteps()
        mask_attn = cut.downsample_mask(torch.from_numpy(foreground), (16, 16))
        mask_latent = cut.downsample_mask(torch.from_numpy(foreground), (32, 32))
        z_0 = steps[0]["z_before"][:1].requires_grad_(True)
        _, unmasked_map = cut_oracle_loss(pipe, z_0, timesteps[0], cond, indices, torch.ones(16, 16))
        peak = divmod(int(unmasked_map.argmax()), 16)
        if mask_attn[peak] == 0:
            break                                             # the global peak lies outside the foreground
    else:
        pytest.fail("the attention peaks inside both halves")
    K, n_start = len(timesteps), None
    for step in steps[:4]:
        i = step["i"]
        z = step["z_before"][:1].clone().requires_grad_(True)
        loss, anomaly_map = cut_oracle_loss(pipe, z, timesteps[i], cond, indices, mask_attn)
        grad = torch.autograd.grad(loss, z)[0]
        n_t = int((anomaly_map > anomaly_map.mean()).sum())   # Eq. 5's n_t on the independent map
        n_start = n_t if i == 0 else n_start
        alpha_t = 10.0 * (1 + 0.05 * (K - i)) * n_t / n_start
        assert trace["n_t"][i] == n_t and trace["alpha_t"][i] == pytest.approx(alpha_t)
        assert trace["grad_norm"][i] == [pytest.approx(float(grad.norm()), rel=1e-4)]
        expected = step["z_before"] - alpha_t * grad * mask_latent
        torch.testing.assert_close(step["z_after"], expected, atol=1e-5, rtol=1e-4)
        moved = (step["z_after"] - step["z_before"]).abs().amax(dim=1)[0]        # (32, 32)
        assert moved[mask_latent == 0].max() == 0             # the background never moves
        assert (moved[mask_latent == 1] > 0).float().mean() > 0.9 and moved.max() > 1e-3, moved.max()


def test_soft_mask_is_the_last_steps_conditional_map_upsampled_unstretched_and_masked(cut_steered_pipe, monkeypatch):
    generator = cut_generator(cut_steered_pipe)
    steps = cut_record_steps(generator, monkeypatch)
    result = cut_generate(generator)[0]
    prompt = cut.fill_prompt(CUT_PROMPT, "bottle")
    ids, indices = generator.prompt_tokens(prompt, "damaged")
    cond = generator.encode_text(prompt)

    def expected_mask(step):                                  # from diffusers' recording of that step's latent
        z = step["z_denoised"][:1].clone().requires_grad_(True)
        anomaly_map = cut_oracle_loss(cut_steered_pipe, z, step["t"], cond, indices, torch.ones(16, 16))[1]
        up = vlad_bilinear(anomaly_map.detach().double().numpy()[None], CUT_SIZE)[0]
        return np.clip(up, 0, 1) * cut_object_mask()          # probabilities as they are: no division by the max

    assert len(steps) == 10
    np.testing.assert_allclose(result.mask, expected_mask(steps[-1]), atol=1e-6)
    assert np.abs(result.mask - expected_mask(steps[0])).max() > 0.01   # not the first step's map
    assert 0.05 < result.mask.max() < 0.95                    # a probability, not stretched to 1


@pytest.fixture(scope="session")
def cut_steered_half_pipes(cut_tiny_sd):
    """The steered tiny pipeline in bf16 and in fp16, on the CPU."""
    return {dtype: cut_steer(cut.load_pipeline(str(cut_tiny_sd), "cpu", dtype))
            for dtype in (torch.bfloat16, torch.float16)}


def cut_first_gradient(pipe, loss_scale: float) -> tuple[torch.Tensor, float]:
    """grad(L_att, z_t) at the first denoising step of a fixed latent, as optimize() computes it, and the loss
    scale it ended at."""
    generator = cut_generator(pipe)
    prompt = cut.fill_prompt(CUT_PROMPT, "bottle")
    ids, indices = generator.prompt_tokens(prompt, "damaged")
    cond = generator.encode_text(prompt)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    mask_attn = cut.downsample_mask(torch.from_numpy(cut_object_mask()), (16, 16))[None]
    states = [{"loss_scale": loss_scale, "finite_run": 0}]
    with cut.recording_attention(pipe.unet, generator.layer_names, (16, 16)) as recorder:
        _, grad = generator.scaled_gradient(recorder, z, [0], states, generator.timesteps()[0], cond, indices, 76,
                                            mask_attn)
    return grad, states[0]["loss_scale"]


def cut_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fp16_and_bf16_updates_match_fp32_within_2_and_10_percent(cut_steered_pipe, cut_steered_half_pipes):
    reference, _ = cut_first_gradient(cut_steered_pipe, 1.0)
    for dtype, tolerance in ((torch.float16, 0.02), (torch.bfloat16, 0.1)):   # 11 and 8 bits of mantissa
        pipe = cut_steered_half_pipes[dtype]
        grad, scale = cut_first_gradient(pipe, cut.LOSS_SCALE if dtype == torch.float16 else 1.0)
        relative = float((grad - reference).norm() / reference.norm())
        assert grad.dtype == torch.float32 and relative < tolerance and cut_cosine(grad, reference) > 0.995, \
            (dtype, relative)


def test_fp16_loss_scaling_keeps_gradients_that_would_underflow(cut_steered_pipe, cut_steered_half_pipes,
                                                                monkeypatch):
    weak = 2.0 ** -20                                          # a loss this small underflows in an fp16 backward
    monkeypatch.setattr(cut, "attention_loss", lambda m, mask: weak * (1.0 - cut.masked_max(m, mask)))
    reference, _ = cut_first_gradient(cut_steered_pipe, 1.0)
    fp16 = cut_steered_half_pipes[torch.float16]
    scaled, scale = cut_first_gradient(fp16, cut.LOSS_SCALE)
    unscaled, _ = cut_first_gradient(fp16, 1.0)
    assert scale == cut.LOSS_SCALE and float((scaled - reference).norm() / reference.norm()) < 0.02
    assert float((unscaled - reference).norm() / reference.norm()) > 0.5    # without it: mostly lost
    assert (unscaled == 0).float().mean() > 0.5 > (scaled == 0).float().mean()


def test_fp16_overflow_halves_the_loss_scale_and_recomputes_the_gradient(cut_steered_pipe, cut_steered_half_pipes,
                                                                         monkeypatch):
    strong = 2.0 ** 12                                         # x the initial 2^16 scale: beyond fp16's 65504
    monkeypatch.setattr(cut, "attention_loss", lambda m, mask: strong * (1.0 - cut.masked_max(m, mask)))
    reference, _ = cut_first_gradient(cut_steered_pipe, 1.0)
    grad, scale = cut_first_gradient(cut_steered_half_pipes[torch.float16], cut.LOSS_SCALE)
    assert 1.0 <= scale < cut.LOSS_SCALE and grad.isfinite().all()
    assert float((grad - reference).norm() / reference.norm()) < 0.02


def test_a_non_finite_gradient_is_skipped_counted_and_warned_about_once(cut_pipe, monkeypatch):
    generator = cut_generator(cut_pipe)
    steps = cut_record_steps(generator, monkeypatch)
    calls, attention_loss = [], cut.attention_loss

    def poisoned_loss(anomaly_map, mask):                      # the 2nd and 4th gradients are NaN
        calls.append(1)
        loss = attention_loss(anomaly_map, mask)
        return loss * float("nan") if len(calls) in (2, 4) else loss

    monkeypatch.setattr(cut, "attention_loss", poisoned_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = cut_generate(generator)[0].trace
    assert trace["skipped_updates"] == 2
    assert sum(norm is None for norms in trace["grad_norm"] for norm in norms) == 2
    assert sum(len(norms) for norms in trace["grad_norm"]) == sum(trace["iterations"])
    assert all(step["z_after"].isfinite().all() for step in steps if "z_after" in step)
    assert [str(w.message) for w in caught if "non-finite" in str(w.message)] == [
        "a non-finite attention gradient was skipped (meta.jsonl counts them in skipped_updates); if this recurs, "
        "try --dtype bf16 or fp32"]
    skipped = [(i, k) for i, norms in enumerate(trace["grad_norm"]) for k, norm in enumerate(norms) if norm is None]
    i, k = skipped[0]
    if k == 0 and trace["iterations"][i] == 1:                 # that step's only update: the latent did not move
        assert torch.equal(steps[i]["z_after"], steps[i]["z_before"])


def test_a_non_finite_gradient_ends_the_refinement_of_its_sample_at_that_step(cut_pipe, monkeypatch):
    generator = cut_generator(cut_pipe)                        # refinement at steps 0 (0.05) and 5 (0.5), cap 3
    calls, attention_loss = [], cut.attention_loss

    def poisoned_loss(anomaly_map, mask):                      # the first gradient of step 0 is NaN
        calls.append(1)
        loss = attention_loss(anomaly_map, mask)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(cut, "attention_loss", poisoned_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = cut_generate(generator)[0].trace
    assert trace["iterations"][0] == 1 and trace["grad_norm"][0] == [None] and trace["skipped_updates"] == 1
    assert trace["iterations"][5] == 3                         # unpoisoned, step 5 refines to its cap


def test_fp16_loss_scale_grows_back_after_a_run_of_finite_gradients_up_to_its_start(cut_steered_half_pipes,
                                                                                    monkeypatch):
    generator = cut_generator(cut_steered_half_pipes[torch.float16])
    overflows = iter([True] + [False] * 40)                    # the first gradient overflows, no other does

    def gradient(recorder, z_t, t, cond, token_indices, softmax_end, mask_attn, loss_scale):
        grad = torch.full_like(z_t, float("inf") if next(overflows) else 1.0)
        return torch.zeros(len(z_t), 16, 16), grad

    monkeypatch.setattr(generator, "attention_gradient", gradient)
    states, scales = [{"loss_scale": cut.LOSS_SCALE, "finite_run": 0}], []
    for _ in range(25):
        generator.scaled_gradient(None, torch.zeros(1, 4, 32, 32), [0], states, 0, None, [5], 76, torch.ones(1, 16, 16))
        scales.append(states[0]["loss_scale"])
    growth = cut.LOSS_SCALE_GROWTH
    assert scales == [cut.LOSS_SCALE / 2] * (growth - 1) + [cut.LOSS_SCALE] * (25 - growth + 1)   # never above 2^16


def test_alpha_t_follows_eq5_on_a_recorded_trace(cut_pipe):
    settings = dict(lam=7.0, delta=0.02)
    trace = cut_generate(cut_generator(cut_pipe, **settings))[0].trace
    K = round(0.5 * 20)
    assert len(trace["alpha_t"]) == len(trace["n_t"]) >= 3
    assert trace["n_start"] == trace["n_t"][0]
    for i, (n_t, alpha_t) in enumerate(zip(trace["n_t"], trace["alpha_t"])):
        assert alpha_t == pytest.approx(7.0 * (1 + 0.02 * (K - i)) * n_t / trace["n_start"])


def test_refinement_iterates_to_the_threshold_or_the_cap(cut_pipe):
    trace = cut_generate(cut_generator(cut_pipe, thresholds={0: 0.99, 2: 0.0}, max_iters=4))[0].trace
    assert trace["iterations"][0] == 4                       # 0.99 is out of reach: the cap
    assert trace["iterations"][1] == 1 and trace["iterations"][2] == 1   # elsewhere and when reached: one


# =========================================================================================================
# cut.py: reproducibility, batching, both VAE topologies
# =========================================================================================================


def test_same_seed_gives_byte_identical_outputs_and_different_seeds_differ(cut_pipe, tmp_path):
    generator = cut_generator(cut_pipe)
    first, second = cut_generate(generator)[0], cut_generate(generator)[0]
    other = cut_generate(generator, seeds=(1,))[0]
    for name, result in (("a", first), ("b", second), ("c", other)):
        data.save_image(result.image, tmp_path / f"{name}.png")
        data.save_mask(result.mask, tmp_path / f"{name}_mask.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a_mask.png").read_bytes() == (tmp_path / "b_mask.png").read_bytes()
    assert first.trace == second.trace
    assert not np.array_equal(first.image, other.image)


def test_batch_of_three_keeps_the_readmes_promise_against_single_samples(cut_pipe, monkeypatch):
    """The README's promise for --batch: the same samples up to the float rounding of batched kernels (the
    decoded latents within 1e-4), at most one gray level in at most 0.1% of the pixels, the same 8-bit mask to
    one level and the same path through the optimization."""
    generator = cut_generator(cut_pipe, steps=10, thresholds={0: 0.05, 2: 0.5})      # 5 steps, 2 refined
    latents, decode = [], cut_pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        latents.extend(z.detach().clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(cut_pipe.vae, "decode", recording_decode)
    images = [cut_object_image(seed=i) for i in range(3)]
    prompt = cut.fill_prompt(CUT_PROMPT, "bottle")
    batched = generator.generate(images, [cut_object_mask()] * 3, [0, 1, 2], prompt, "damaged")
    single = [generator.generate([images[i]], [cut_object_mask()], [i], prompt, "damaged")[0] for i in range(3)]
    for i, (b, s) in enumerate(zip(batched, single)):
        torch.testing.assert_close(latents[i], latents[3 + i], atol=1e-4, rtol=0)
        differ = np.abs(b.image.astype(int) - s.image.astype(int))
        assert differ.max() <= 1 and (differ > 0).mean() <= 0.001
        assert np.abs(np.round(255 * b.mask) - np.round(255 * s.mask)).max() <= 1
        assert b.trace["iterations"] == s.trace["iterations"] and b.trace["early_stop_step"] == s.trace["early_stop_step"]


def test_factor8_vae_topology_generates_image_and_soft_mask(cut_tiny_sd8):
    pipe = cut.load_pipeline(str(cut_tiny_sd8), "cpu", torch.float32)
    result = cut_generate(cut.CUT(pipe, cut.CutSettings(size=128, **CUT_FAST)))[0]
    assert result.image.shape == (128, 128, 3) and result.image.dtype == np.uint8
    assert result.mask.shape == (128, 128) and 0 < result.mask.max() < 1
    assert result.mask[cut_object_mask(128) == 0].max() == 0          # y_pix lives inside the foreground
    assert result.trace["attn_res"] == 8 and result.trace["attn_grid"] == [8, 8]



# =========================================================================================================
# cut.py: the CLI (MVTec-layout output, meta.jsonl, resume, shards, bad input)
# =========================================================================================================


@pytest.fixture()
def cut_normal_folder(tmp_path) -> Path:
    folder = tmp_path / "mvtec" / "bottle" / "train" / "good"
    for i in range(2):
        data.save_image(cut_object_image(80, seed=i), folder / f"{i:03d}.png")
    return folder


def test_cli_writes_the_mvtec_layout_meta_and_preview(cut_tiny_sd, cut_normal_folder, tmp_path):
    out = tmp_path / "out"
    assert cut.main(["--images", str(cut_normal_folder), *map(str, cut_cli_args(cut_tiny_sd, out, "--n", 2))]) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name[0] != ".")
    assert names == ["bottle/ground_truth/damaged/000_0_mask.png", "bottle/ground_truth/damaged/000_1_mask.png",
                     "bottle/ground_truth/damaged/001_0_mask.png", "bottle/ground_truth/damaged/001_1_mask.png",
                     "bottle/meta.jsonl", "bottle/preview.png",
                     "bottle/test/damaged/000_0.png", "bottle/test/damaged/000_1.png",
                     "bottle/test/damaged/001_0.png", "bottle/test/damaged/001_1.png",
                     "bottle/train/good/000.png", "bottle/train/good/001.png"]
    samples = data.read_split(out, "bottle", "test")          # the output is a readable MVTec category
    assert [s.defect for s in samples] == ["damaged"] * 4
    mask = data.load_mask(samples[0].mask, binarize=False)
    assert mask.shape == (80, 80) and 0 < mask.max() <= 1 and len(np.unique(mask)) > 2   # soft, the photo's size
    assert Image.open(samples[0].image).size == (80, 80)      # 80 x 80 photos, worked at 64 x 64
    meta = data.read_jsonl(out / "bottle" / "meta.jsonl")
    assert len(meta) == 4 and {(Path(m["source"]).name, m["seed"]) for m in meta} == \
        {("000.png", 0), ("000.png", 1), ("001.png", 0), ("001.png", 1)}
    record = meta[0]
    assert record["prompt"] == "a photo of a bottle that is damaged" and record["word"] == "damaged"
    assert record["token_ids"][record["token_indices"][0]] == 13568 and record["steps"] == 20
    for key in ("n_t", "alpha_t", "iterations", "grad_norm", "masked_max", "early_stop_step", "early_stop_n_t",
                "skipped_updates", "loss_scale", "softmax_tokens", "final_masked_max", "seconds", "lambda", "delta",
                "gamma", "guidance", "thresholds", "max_iters", "attn_res", "mask_warning", "foreground_rule",
                "foreground_coverage", "source_sha256", "output_size", "paste", "paste_radius"):
        assert key in record
    assert record["photo_size"] == [80, 80] and record["working_size"] == [64, 64] and record["attn_grid"] == [16, 16]
    assert record["foreground_rule"] == "object" and record["foreground_coverage"] == pytest.approx(0.25, abs=0.02)
    assert [len(norms) for norms in record["grad_norm"]] == record["iterations"]
    assert record["skipped_updates"] == 0 and record["loss_scale"] is None     # fp32: no loss scaling
    assert {p.name for p in (out / "bottle").iterdir() if p.name[0] == "."} == {".cut.lock"}
    assert np.array_equal(np.asarray(data.load_image(out / "bottle/train/good/000.png")),
                          np.asarray(data.load_image(cut_normal_folder / "000.png")))


def test_cli_resumes_an_interrupted_run_to_exactly_the_full_set(cut_tiny_sd, cut_normal_folder, tmp_path,
                                                                 monkeypatch, capsys):
    args = ["--images", str(cut_normal_folder), "--n", "2"]
    reference = tmp_path / "reference"
    assert cut.main(args + cut_quick_args(cut_tiny_sd, reference)) == 0
    out = tmp_path / "out"
    real_save_mask, calls = data.save_mask, []

    def interrupt_on_third(mask, path):                       # killed mid-sample: image written, mask not
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save_mask(mask, path)

    monkeypatch.setattr(data, "save_mask", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        cut.main(args + cut_quick_args(cut_tiny_sd, out))
    monkeypatch.setattr(data, "save_mask", real_save_mask)
    assert len(data.read_jsonl(out / "bottle" / "meta.jsonl")) == 2
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary left behind
    assert cut.main(args + cut_quick_args(cut_tiny_sd, out)) == 0
    assert cut_tree(out) == cut_tree(reference)
    meta = cut_meta(out)
    assert len(meta) == 4 and len({m["image"] for m in meta}) == 4
    assert sorted(meta, key=lambda m: m["image"]) == sorted(cut_meta(reference), key=lambda m: m["image"])
    # complete: nothing to do; the model is not even loaded, and no file (the preview included) is rewritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr(cut, "load_pipeline", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    assert cut.main(args + cut_quick_args(cut_tiny_sd, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert len(data.read_jsonl(out / "bottle" / "meta.jsonl")) == 4
    # the same folder with other settings is refused, not silently skipped or mixed
    assert cut.main(args + cut_quick_args(cut_tiny_sd, out, "--guidance", 3)) == 2
    assert "generated with other settings (guidance)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_two_shards_together_equal_one_process(cut_tiny_sd, cut_normal_folder, tmp_path, monkeypatch):
    args = ["--images", str(cut_normal_folder), "--n", "3"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cut.main(args + cut_quick_args(cut_tiny_sd, single)) == 0
    assert cut.main(args + ["--shard", "1/2"] + cut_quick_args(cut_tiny_sd, sharded)) == 0
    monkeypatch.setenv("RANK", "0")                            # rank 0 as torchrun would launch it
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cut.main(args + cut_quick_args(cut_tiny_sd, sharded)) == 0
    assert cut_tree(sharded) == cut_tree(single)
    key = lambda m: m["image"]  # noqa: E731
    assert sorted(cut_meta(sharded), key=key) == sorted(cut_meta(single), key=key)


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "word not in prompt", "prompt too long",
                                  "empty mask", "unknown model", "out is a file", "out below a file",
                                  "out not writable", "category leaves out", "absolute category",
                                  "word is a parent folder", "stem is a parent folder", "paste at the working size"])
def test_cli_bad_input_is_one_sentence_exit_2_and_writes_nothing(case, cut_tiny_sd, tmp_path, capsys):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    args = cut_cli_args(cut_tiny_sd, out, "--image", image)
    if case == "missing image":
        args[args.index(image)] = tmp_path / "nope.png"
    elif case == "corrupt image":
        (tmp_path / "corrupt.png").write_bytes(image.read_bytes()[:60])
        args[args.index(image)] = tmp_path / "corrupt.png"
    elif case == "word not in prompt":
        args += ["--word", "scratched"]
    elif case == "prompt too long":
        args[1] = "a photo of a {cls} " * 20 + "that is damaged"
    elif case == "empty mask":
        data.save_mask(np.zeros((CUT_SIZE, CUT_SIZE)), tmp_path / "empty.png")
        args += ["--mask", tmp_path / "empty.png"]
    elif case == "unknown model":
        args[3] = tmp_path / "no_such_model"
    elif case == "out is a file":
        out = args[5] = image
    elif case == "out below a file":
        out = args[5] = image / "out"
    elif case == "out not writable":                           # root may write anywhere, but not into /proc
        out = args[5] = Path("/proc/cut_out")
    elif case == "category leaves out":                        # out/../evil would be tmp_path/evil
        args += ["--category", "../evil"]
    elif case == "absolute category":
        args += ["--category", tmp_path / "evil"]
    elif case == "word is a parent folder":
        args[1] = "a photo of a {cls} that is .."
        args += ["--word", ".."]
    elif case == "stem is a parent folder":                    # "...png": the stem ".."
        data.save_image(cut_object_image(), tmp_path / "...png")
        args[args.index(image)] = tmp_path / "...png"
    elif case == "paste at the working size":
        args += ["--paste", "--output-size", "working"]
    before = sorted(tmp_path.rglob("*"))
    if case == "missing image":                                # once as a user runs it: the script, no traceback
        result = run_cli("cut.py", *args)
        returncode, stderr = result.returncode, result.stderr
    else:
        returncode, stderr = cut.main(list(map(str, args))), capsys.readouterr().err
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cut.py: error: ") and "Traceback" not in stderr
    assert lines[0].count(". ") == 0                            # one sentence
    assert sorted(tmp_path.rglob("*")) == before                # nothing written anywhere
    if case == "unknown model":
        assert "could not be loaded" in lines[0] and "--model" in lines[0] and "valid local path" in lines[0]
    if case.startswith("out"):
        assert f"--out {out}" in lines[0]
    if "parent folder" in case or "category" in case:
        assert "cannot be a folder or file name inside --out" in lines[0]


def test_cli_records_the_foreground_fallback_warning_and_honours_no_mask(cut_tiny_sd, tmp_path):
    speck = tmp_path / "speck.png"
    image = np.full((200, 200, 3), 40, np.uint8)
    image[100:112, 100:112] = 220                               # an object of 0.36% of the photo: too small
    data.save_image(image, speck)
    out = tmp_path / "out"
    assert cut.main(["--image", str(speck), "--category", "bottle", *cut_quick_args(cut_tiny_sd, out)]) == 0
    record = data.read_jsonl(out / "bottle" / "meta.jsonl")[0]
    assert record["foreground"] == "auto" and "whole image" in record["mask_warning"]
    image = tmp_path / "object.png"
    data.save_image(cut_object_image(), image)
    assert cut.main(["--image", str(image), "--category", "bottle", "--no-mask",
                     *cut_quick_args(cut_tiny_sd, out)]) == 0
    record = [r for r in data.read_jsonl(out / "bottle" / "meta.jsonl") if r["source"] == str(image)][0]
    assert record["foreground"] == "none" and record["mask_warning"] is None
    mask = data.load_mask(out / "bottle" / record["mask"], binarize=False)
    assert mask[cut_object_mask() == 0].max() > 0                 # no foreground restriction


def test_ddim_never_clips_the_latent_and_keeps_v_prediction_of_a_config_without_clip_sample(cut_tiny_sd, tmp_path):
    model = tmp_path / "sd_euler_v"
    shutil.copytree(cut_tiny_sd, model)
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({   # as SD 2.x ships, no clip_sample
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "steps_offset": 1}))
    scheduler = cut.load_pipeline(str(model), "cpu", torch.float32).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.clip_sample is False
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[-1]                                           # alpha_bar near 1
    z_0 = scheduler.step(torch.zeros(1, 4, 2, 2), t, torch.full((1, 4, 2, 2), 5.0)).pred_original_sample
    expected = scheduler.alphas_cumprod[t] ** 0.5 * 5.0                   # v = 0: z_0 = sqrt(alpha_bar) z_t
    assert torch.allclose(z_0, torch.full_like(z_0, float(expected))) and z_0.max() > 1   # not clamped to 1


def test_batch_over_interleaved_categories_generates_every_job_exactly_once(cut_tiny_sd, tmp_path):
    root = tmp_path / "mvtec"
    sources = [root / "bottle/train/good/000.png", root / "cable/train/good/000.png",
               root / "bottle/train/good/001.png"]                       # categories interleaved
    for i, path in enumerate(sources):
        data.save_image(cut_object_image(CUT_SIZE, seed=i), path)
    out = tmp_path / "out"
    images = [arg for path in sources for arg in ("--image", str(path))]
    assert cut.main(images + ["--batch", "3", *cut_quick_args(cut_tiny_sd, out)]) == 0
    bottle, cable = data.read_jsonl(out / "bottle/meta.jsonl"), data.read_jsonl(out / "cable/meta.jsonl")
    assert sorted(r["image"] for r in bottle) == ["test/damaged/000_0.png", "test/damaged/001_0.png"]
    assert [r["image"] for r in cable] == ["test/damaged/000_0.png"]
    assert cable[0]["prompt"] == "a photo of a cable that is damaged" and cable[0]["source"] == str(sources[1])
    assert (out / "cable/test/damaged/000_0.png").is_file()
    assert (out / "cable/ground_truth/damaged/000_0_mask.png").is_file()


def test_gamma_leaving_no_denoising_step_is_one_sentence_and_writes_nothing(cut_tiny_sd, tmp_path, capsys):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    args = ["--image", str(image), *map(str, cut_cli_args(cut_tiny_sd, out)), "--gamma", "0.01"]   # int(0.2) = 0
    assert cut.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cut.py: error: --gamma 0.01") and ". " not in lines[0]
    assert not out.exists()


def test_an_image_given_twice_is_generated_once(cut_tiny_sd, tmp_path):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    assert cut.main(["--image", str(image), "--image", str(image), *cut_quick_args(cut_tiny_sd, out)]) == 0
    meta = data.read_jsonl(out / "bottle/meta.jsonl")
    assert [r["image"] for r in meta] == ["test/damaged/bottle_0.png"]
    assert np.asarray(data.load_image(out / "bottle/test/damaged/bottle_0.png")).shape == (CUT_SIZE, CUT_SIZE, 3)


def test_resume_refuses_another_attention_resolution_or_early_stop_window(cut_tiny_sd, tmp_path, capsys):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    args = ["--image", str(image), *map(str, cut_cli_args(cut_tiny_sd, out))]
    assert cut.main(args) == 0                                       # auto: P = 16
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cut.main(args + ["--attn-res", "16", "--early-stop-window", "10,50"]) == 0   # the same settings
    # (the tiny UNet has only the 16 grid: the resume check names the mismatch before the model is even loaded)
    for extra, name in ((["--attn-res", "8"], "attn_res"), (["--early-stop-window", "5,40"], "early_stop_window")):
        capsys.readouterr()
        assert cut.main(args + extra) == 2
        assert f"generated with other settings ({name})" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_soft_mask_covers_a_full_frame_product_and_only_the_solid_object_of_an_object_photo(cut_tiny_sd, tmp_path):
    out = tmp_path / "out"
    for name in ("pcb_1.jpg", "cookie_1.png"):
        assert cut.main(["--image", str(HERE / "examples" / name), *cut_quick_args(cut_tiny_sd, out, "--size", 128)]) == 0
    board = data.load_mask(out / "pcb_1/ground_truth/damaged/pcb_1_0_mask.png", binarize=False)
    cookie = data.load_mask(out / "cookie_1/ground_truth/damaged/cookie_1_0_mask.png", binarize=False)
    assert (board > 0).mean() >= 0.9
    assert cut_corners_are_background(cookie, 12) and cut_holes(cookie > 0) == 0 and 0.2 < (cookie > 0).mean() < 0.4
    rules = {r["category"]: r["foreground_rule"] for name in ("pcb_1", "cookie_1")
             for r in data.read_jsonl(out / name / "meta.jsonl")}
    assert rules == {"pcb_1": "surface: a pattern cut by the frame", "cookie_1": "object"}


def test_cli_refuses_to_write_a_category_another_run_is_writing(cut_tiny_sd, tmp_path, monkeypatch, capsys):
    import fcntl

    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    (out / "bottle").mkdir(parents=True)
    args = ["--image", str(image), *cut_quick_args(cut_tiny_sd, out, "--n", 2)]
    load_pipeline = cut.load_pipeline
    monkeypatch.setattr(cut, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model of a refused run"))
    with open(out / "bottle/.cut.lock", "a") as other_run:        # an unsharded run at work
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cut.main(args) == 2
        assert "another run is writing" in capsys.readouterr().err
        assert cut.main(args + ["--shard", "1/2"]) == 2            # nor may a shard
    monkeypatch.setattr(cut, "load_pipeline", load_pipeline)
    with open(out / "bottle/.cut.lock", "a") as shard_0, open(out / "bottle/.cut-shard-0-of-2.lock", "a") as own:
        fcntl.flock(shard_0, fcntl.LOCK_SH | fcntl.LOCK_NB)       # shard 0/2 at work
        fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cut.main(args) == 2                                 # an unsharded run would redo its samples
        assert cut.main(args + ["--shard", "0/2"]) == 2            # the same shard twice
        assert cut.main(args + ["--shard", "1/2"]) == 0            # the other shard works beside it
    assert [r["seed"] for r in data.read_jsonl(out / "bottle/meta.jsonl")] == [1]
    with open(out / "bottle/.cut.lock", "a") as after:             # released when the run ended
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cli_tidies_duplicated_and_torn_meta_lines_and_regenerates_the_torn_sample(cut_tiny_sd, tmp_path):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    args = ["--image", str(image), *cut_quick_args(cut_tiny_sd, out, "--n", 3)]
    assert cut.main(args) == 0
    meta = out / "bottle/meta.jsonl"
    lines = meta.read_text().splitlines()
    original = (out / "bottle/test/damaged/bottle_2.png").read_bytes()
    # an overlapping run wrote sample 0 twice, and a kill tore sample 2's line in half
    meta.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n" + lines[2][:len(lines[2]) // 2])
    assert len(cut.latest_records(meta)) == 2 and not cut.meta_is_tidy(meta)
    assert cut.main(args) == 0
    records = data.read_jsonl(meta)
    assert len(meta.read_text().splitlines()) == 3 and sorted(r["seed"] for r in records) == [0, 1, 2]
    assert (out / "bottle/test/damaged/bottle_2.png").read_bytes() == original     # regenerated, identical
    before = meta.stat().st_mtime_ns
    assert cut.main(args) == 0 and meta.stat().st_mtime_ns == before               # tidy: not rewritten


def test_append_jsonl_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "log.jsonl"
    data.append_jsonl({"a": 1}, path)
    with open(path, "a") as handle:
        handle.write('{"b": ')                                   # a kill in the middle of a write
    data.append_jsonl({"c": 3}, path)
    assert data.read_jsonl(path) == [{"a": 1}, {"c": 3}]
    assert path.read_text().splitlines() == ['{"a":1}', '{"b": ', '{"c":3}']


def test_cli_refuses_a_sample_name_taken_by_another_normal_image(cut_tiny_sd, tmp_path, capsys):
    first, second = tmp_path / "a/bottle.png", tmp_path / "b/bottle.png"
    data.save_image(cut_object_image(seed=0), first)
    data.save_image(cut_object_image(seed=1), second)
    out = tmp_path / "out"
    assert cut.main(["--image", str(first), "--category", "bottle", *cut_quick_args(cut_tiny_sd, out)]) == 0
    before = cut_tree(out)
    assert cut.main(["--image", str(second), "--category", "bottle", *cut_quick_args(cut_tiny_sd, out)]) == 2
    assert "another image named like" in capsys.readouterr().err and cut_tree(out) == before


def test_cli_starts_at_once_however_large_n_is(cut_tiny_sd, tmp_path, monkeypatch):
    import tracemalloc

    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)

    def first_batch(self, images, foregrounds, seeds, prompt, word):
        raise KeyboardInterrupt(seeds)                          # stop the run at its first sample

    monkeypatch.setattr(cut.CUT, "generate", first_batch)
    tracemalloc.start()
    with pytest.raises(KeyboardInterrupt) as stopped:
        cut.main(["--image", str(image), *cut_quick_args(cut_tiny_sd, tmp_path / "out", "--n", 10 ** 7)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stopped.value.args == ([0],) and peak < 100 * 2 ** 20, peak   # a list of 10^7 jobs: over 1 GB


def test_cli_uses_a_given_mask_file_and_a_chosen_word(cut_tiny_sd, tmp_path):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    region = cut_half_mask("left")
    data.save_mask(region, tmp_path / "region.png")
    out = tmp_path / "out"
    prompt = "a photo of a {cls} with a scratch that is damaged"
    assert cut.main(["--image", str(image), "--mask", str(tmp_path / "region.png"), "--word", "scratch",
                     *cut_quick_args(cut_tiny_sd, out)[2:], "--prompt", prompt]) == 0
    record = data.read_jsonl(out / "bottle/meta.jsonl")[0]
    assert record["word"] == "scratch" and record["image"] == "test/scratch/bottle_0.png"
    assert record["foreground"] == str(tmp_path / "region.png") and record["foreground_rule"] == "--mask"
    assert record["foreground_coverage"] == 0.5
    scratch = cut_pipe_tokenizer_ids(cut_tiny_sd, "scratch")
    assert [record["token_ids"][i] for i in record["token_indices"]] == scratch
    soft = data.load_mask(out / "bottle/ground_truth/scratch/bottle_0_mask.png", binarize=False)
    assert soft[region == 0].max() == 0 and soft[region == 1].min() > 0   # y_pix only inside the given mask


def cut_pipe_tokenizer_ids(model: Path, word: str) -> list[int]:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(model / "tokenizer"))(word, add_special_tokens=False).input_ids


def test_cli_defaults_are_the_papers(capsys):
    args = cut.build_parser().parse_args(["--image", "x.png", "--prompt", "a photo of a {cls} that is damaged"])
    assert (args.steps, args.gamma, args.guidance, args.lam, args.max_iters, args.size) == (200, 0.25, 7.5, 10, 20, 512)
    assert cut.parse_thresholds(args.thresholds) == {0: 0.05, 10: 0.5, 20: 0.8}
    assert args.early_stop_after == 10 and args.early_stop_window == "10,50" and args.attn_res == "auto"
    assert args.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and args.n == 1 and args.delta is None
    settings = cut.CutSettings()
    assert settings.delta == 1 / 200 and settings.denoising_steps() == 50
    with pytest.raises(SystemExit):
        cut.build_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(A.1: 200)", "(A.1: 0.25)", "(7.5)", "lambda (10)", "(0:0.05,10:0.5,20:0.8)", "(20)",
                  "(default 512)", "(10)"):
        assert shown in help_text, shown


def test_preview_shows_one_row_per_sample_normal_generated_overlay_first_eight(cut_tiny_sd, tmp_path):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    assert cut.main(["--image", str(image), *cut_quick_args(cut_tiny_sd, out, "--n", 9)]) == 0
    sheet = np.asarray(Image.open(out / "bottle/preview.png").convert("RGB"))
    cell, pad, top = 256, 4, 20                                 # data.contact_sheet's layout
    assert sheet.shape == (top + 8 * (cell + pad) + pad, 3 * (cell + pad) + pad, 3)   # 8 of the 9 samples

    def tile(row, column):
        y, x = top + pad + row * (cell + pad), pad + column * (cell + pad)
        return sheet[y:y + cell, x:x + cell].astype(int)

    def resized(array):
        return np.asarray(Image.fromarray(array).resize((cell, cell))).astype(int)

    normal = np.asarray(data.load_image(out / "bottle/train/good/bottle.png"))
    for seed in (0, 7):                                          # rows are the samples by seed
        generated = np.asarray(data.load_image(out / f"bottle/test/damaged/bottle_{seed}.png"))
        soft = data.load_mask(out / f"bottle/ground_truth/damaged/bottle_{seed}_mask.png", binarize=False)
        assert np.array_equal(tile(seed, 0), resized(normal))
        assert np.array_equal(tile(seed, 1), resized(generated))
        assert np.array_equal(tile(seed, 2), resized(data.overlay(generated, soft)))
    assert not np.array_equal(tile(0, 1), tile(7, 1))


def test_working_size_keeps_the_aspect_ratio_at_about_s_squared_pixels_and_a_square_photo_at_s():
    assert cut.working_size(512, 512, 512, 64) == (512, 512) and cut.working_size(1024, 1024, 512, 64) == (512, 512)
    assert cut.working_size(1600, 1200, 512, 64) == (576, 448)          # 4:3, 0.98 x 512^2 pixels
    assert cut.working_size(500, 1260, 512, 64) == (320, 832)           # KolektorSDD's commutators, 1.02 x
    assert cut.working_size(20000, 100, 512, 64) == (7232, 64)          # at least one multiple per side
    for W, H in ((640, 480), (333, 777), (1280, 200)):                   # every side a multiple, nearest to S^2
        w, h = cut.working_size(W, H, 512, 64)
        assert w % 64 == 0 and h % 64 == 0
        best = min(((a, b) for a in range(64, 2048, 64) for b in range(64, 2048, 64)),   # brute force: the
                   key=lambda ab: abs(math.log(ab[0] / ab[1] * H / W)) + abs(math.log(ab[0] * ab[1] / 512 ** 2)))
        assert abs(math.log(w * h / 512 ** 2)) <= abs(math.log(best[0] * best[1] / 512 ** 2)) + 0.2
        assert abs(w / h - W / H) / (W / H) < 0.2


def test_cli_writes_a_non_square_photo_at_its_size_with_the_expected_grid_whatever_the_size(cut_tiny_sd, tmp_path):
    out = tmp_path / "out"
    cookie = HERE / "examples/cookie_1.png"                             # 384 x 512
    assert cut.main(["--image", str(cookie), *cut_quick_args(cut_tiny_sd, out)]) == 0
    record = data.read_jsonl(out / "cookie_1/meta.jsonl")[0]
    # 64^2 pixels at 3:4 in multiples of 4 (factor-2 VAE, two UNet levels): 56 x 72; attention at 1/4: 18 x 14
    assert record["photo_size"] == [384, 512] and record["working_size"] == [56, 72]
    assert record["attn_grid"] == [18, 14] and record["attn_res"] == 16
    assert record["early_stop_window"] == [10 * 252 / 256, 50 * 252 / 256]      # scaled by the attention pixels
    assert Image.open(out / "cookie_1/test/damaged/cookie_1_0.png").size == (384, 512)
    assert data.load_mask(out / "cookie_1/ground_truth/damaged/cookie_1_0_mask.png").shape == (512, 384)
    small = tmp_path / "small"                                          # --size 32: another working size, the
    assert cut.main(["--image", str(cookie), *cut_quick_args(cut_tiny_sd, small, "--size", 32,    # same foreground
                                                             "--output-size", "working")]) == 0
    other = data.read_jsonl(small / "cookie_1/meta.jsonl")[0]
    assert other["working_size"] == [28, 36] and other["attn_grid"] == [9, 7]
    assert Image.open(small / "cookie_1/test/damaged/cookie_1_0.png").size == (28, 36)
    assert (other["foreground_rule"], other["foreground_coverage"]) == ("object", record["foreground_coverage"])
    assert Image.open(small / "cookie_1/train/good/cookie_1.png").size == (384, 512)   # the normal photo as it is


def test_cli_soft_mask_is_the_attention_probability_and_a_failed_sample_stays_faint_and_framed(cut_tiny_sd, tmp_path,
                                                                                                 capsys):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out, opened = tmp_path / "out", tmp_path / "opened"
    args = ["--image", str(image), "--no-mask"]
    assert cut.main(args + cut_quick_args(cut_tiny_sd, out, "--thresholds", "0:0.5")) == 0      # 2 steps
    assert "0 of 1 localized (early stop), 1 ended below the last refinement threshold 0.5" in capsys.readouterr().out
    record = data.read_jsonl(out / "bottle/meta.jsonl")[0]
    mask = data.load_mask(out / "bottle/ground_truth/damaged/bottle_0_mask.png", binarize=False)
    final = record["final_masked_max"]                                 # the random model's attention stays low
    assert final < 0.1 and mask.max() < 0.1                            # a faint label, not stretched to 1
    # the max of a bilinear upsampling of the 16 x 16 map lies within a cell of its grid max, then 8-bit rounding
    assert final - 0.35 * (final - min(record["masked_max"])) - 1 / 255 <= mask.max() <= final + 0.5 / 255
    # the window opened to (-1, 1000): the sample localizes at the first step the rule allows (1), framed green
    # (without refinement thresholds no sample can end below one)
    assert cut.main(args + cut_quick_args(cut_tiny_sd, opened, "--early-stop-window=-1,1000",
                                          "--early-stop-after", 1)) == 0
    assert "1 of 1 localized (early stop)\n" in capsys.readouterr().out
    assert data.read_jsonl(opened / "bottle/meta.jsonl")[0]["early_stop_step"] == 1
    frames = {}
    for name, folder in (("weak", out), ("localized", opened)):
        sheet = np.asarray(Image.open(folder / "bottle/preview.png").convert("RGB"))
        frames[name] = tuple(sheet[20 + 4 + 128, 4 + 2 * 260 + 1])     # the overlay tile's left frame
    assert frames == {"weak": (220, 0, 0), "localized": (0, 170, 0)}


def test_cli_paste_keeps_the_original_outside_its_alpha_blends_inside_and_resumes_identically(cut_tiny_sd, tmp_path,
                                                                                             monkeypatch):
    photo = tmp_path / "bottle.png"
    pixels = np.full((60, 100, 3), 30, np.uint8)                       # 100 x 60: an object on a dark ground
    pixels[15:45, 30:70] = 200 + np.random.default_rng(0).integers(0, 40, (30, 40, 3), dtype=np.uint8)
    data.save_image(pixels, photo)
    args = ["--image", str(photo), "--n", "2"]
    plain, pasted, resumed = tmp_path / "plain", tmp_path / "pasted", tmp_path / "resumed"
    assert cut.main(args + cut_quick_args(cut_tiny_sd, plain)) == 0
    assert cut.main(args + cut_quick_args(cut_tiny_sd, pasted, "--paste")) == 0
    record = data.read_jsonl(pasted / "bottle/meta.jsonl")[0]
    radius = round(0.02 * 100)
    assert record["paste"] is True and record["paste_radius"] == radius == 2
    for seed in (0, 1):
        mask = f"bottle/ground_truth/damaged/bottle_{seed}_mask.png"
        assert (pasted / mask).read_bytes() == (plain / mask).read_bytes()          # the same label
        generated = np.asarray(data.load_image(plain / f"bottle/test/damaged/bottle_{seed}.png")).astype(float)
        output = np.asarray(data.load_image(pasted / f"bottle/test/damaged/bottle_{seed}.png")).astype(int)
        support = np.asarray(Image.open(plain / mask)) > 0                          # where the label is not 0
        square = np.ones((2 * radius + 1, 2 * radius + 1), bool)                    # scipy, independently:
        alpha = ndimage.uniform_filter(ndimage.binary_dilation(support, square).astype(float), 2 * radius + 1,
                                       mode="nearest")[..., None]
        outside = alpha[..., 0] < 1e-9
        assert outside.mean() > 0.3 and np.array_equal(output[outside], pixels[outside])   # the original's bytes
        assert np.array_equal(output[support], generated[support].astype(int))          # the generated pixels
        np.testing.assert_allclose(output, alpha * generated + (1 - alpha) * pixels, atol=0.5 + 1e-6)
    real_save_mask, calls = data.save_mask, []

    def interrupt_on_second(mask, path):                       # killed after the first sample's image
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save_mask(mask, path)

    monkeypatch.setattr(data, "save_mask", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        cut.main(args + cut_quick_args(cut_tiny_sd, resumed, "--paste"))
    monkeypatch.setattr(data, "save_mask", real_save_mask)
    assert cut.main(args + cut_quick_args(cut_tiny_sd, resumed, "--paste")) == 0
    assert cut_tree(resumed) == cut_tree(pasted)


def test_cli_a_relative_path_from_another_folder_is_another_photo_and_a_genuine_resume_works(cut_tiny_sd, tmp_path,
                                                                                             monkeypatch, capsys):
    bottle, cookie = tmp_path / "a" / "bottle.png", tmp_path / "b" / "bottle.png"
    data.save_image(cut_object_image(seed=0), bottle)
    data.save_image(cut_object_image(seed=1), cookie)                   # another photo, the same relative path
    out = tmp_path / "out"
    args = ["--image", "bottle.png", "--category", "bottle", *cut_quick_args(cut_tiny_sd, out, "--n", 2)]
    monkeypatch.chdir(tmp_path / "a")
    assert cut.main(args) == 0
    assert data.read_jsonl(out / "bottle/meta.jsonl")[0]["source"] == str(bottle.resolve())
    before = cut_tree(out)
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert cut.main(args) == 2                                          # never "already complete"
    assert "another image named like bottle.png (its bytes differ)" in capsys.readouterr().err
    assert cut_tree(out) == before
    monkeypatch.setattr(cut, "load_pipeline", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    genuine = ["--image", "../a/bottle.png", *args[2:]]                 # the same photo from another folder
    assert cut.main(genuine) == 0 and "skipped 2 already complete" in capsys.readouterr().out
    model = Path(cut_tiny_sd)                                           # the model spelled otherwise: the same one
    for spelling in (f"{model}/", os.path.relpath(model) + "/."):
        assert cut.main(genuine[:-len(cut_quick_args(cut_tiny_sd, out))] + cut_quick_args(spelling, out, "--n", 2)) == 0
        assert "skipped 2 already complete" in capsys.readouterr().out


def test_cli_preview_staleness_is_decided_by_the_samples_it_shows_not_by_dates(cut_tiny_sd, tmp_path):
    image = tmp_path / "bottle.png"
    data.save_image(cut_object_image(), image)
    out = tmp_path / "out"
    args = ["--image", str(image), *cut_quick_args(cut_tiny_sd, out, "--n", 3)]
    assert cut.main(args + ["--shard", "0/2"]) == 0                     # seeds 0 and 2; rank 0 draws the preview
    assert cut.main(args + ["--shard", "1/2"]) == 0                     # seed 1, after the preview was drawn
    preview, meta = out / "bottle/preview.png", out / "bottle/meta.jsonl"
    os.utime(preview, ns=(meta.stat().st_mtime_ns + 10 ** 9,) * 2)      # the preview is the newer file
    assert json.loads(Image.open(preview).text["cut-preview"]) == ["test/damaged/bottle_0.png",
                                                                   "test/damaged/bottle_2.png"]
    assert cut.main(args) == 0
    assert json.loads(Image.open(preview).text["cut-preview"]) == [f"test/damaged/bottle_{s}.png" for s in range(3)]
    assert np.asarray(Image.open(preview)).shape[0] == 20 + 3 * 260 + 4                     # three rows
    before = preview.stat().st_mtime_ns
    assert cut.main(args) == 0 and preview.stat().st_mtime_ns == before                      # up to date: kept


def test_loading_stable_diffusion_prints_no_warning_to_act_on(cut_tiny_sd, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut.load_pipeline(str(cut_tiny_sd), "cpu", torch.float32)
    err = capfd.readouterr().err
    assert "accelerate" not in err and "low_cpu_mem_usage" not in err
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning, UserWarning))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_sentence_for_cut_and_vlad(tmp_path):
    for script, args in (("cut.py", ["--image", HERE / "examples/cookie_1.png", "--prompt", "a cookie that is cracked"]),
                         ("vlad.py", ["predict", "--ckpt", tmp_path, "--data", tmp_path])):
        result = run_cli(script, *args, "--device", "cuda", "--out", tmp_path / "out")
        assert result.returncode == 2 and "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# =========================================================================================================
# vlad.py: losses, Eq. 8 / Eq. 9 against independent computations, training, caching, resume, prediction
# =========================================================================================================

VLAD_TINY_SIZE = 112  # input size of the tests: 7 x 7 patches of 16 (the tiny model is saved at 64 px, so the
#                       positional embedding is interpolated on load, as for ViT-L at 518)


def build_tiny_clip(folder, width: int = 64, embed_dim: int = 32, layers: int = 4, seed: int = 0) -> str:
    """A random-weight open_clip ViT (vision width 64, 4 blocks, patch 16; text width 32, 1 block) saved as
    open_clip_config.json + open_clip_model.safetensors; returns the `local-dir:` model name that loads it
    through open_clip.create_model, the same path a user's model takes."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": layers, "width": width, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": preprocess_cfg}))
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def vlad_tiny_clip(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def vlad_make_synthetic_dataset(root, categories=("texture",), n_train: int = 4, n_good: int = 2, n_bad: int = 6,
                                size=(VLAD_TINY_SIZE, VLAD_TINY_SIZE), soft: bool = False, seed: int = 0):
    """An MVTec-layout tree of smooth gray textures; anomalies are bright or dark discs pasted on them, their
    masks beside them (soft: a probability falling off towards the rim, like CUT's; else 0/255)."""
    rng = np.random.default_rng(seed)
    width, height = size
    root = Path(root)

    def texture():
        coarse = rng.normal(0, 1, (6, 6)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC))
        gray = 128 + 18 * smooth + rng.normal(0, 4, (height, width))
        return np.repeat(gray[..., None], 3, axis=2)

    for category in categories:
        for i in range(n_train):
            data.save_image(np.clip(texture(), 0, 255).astype(np.uint8),
                            root / category / "train/good" / f"{i:03d}.png")
        for i in range(n_good):
            data.save_image(np.clip(texture(), 0, 255).astype(np.uint8), root / category / "test/good" / f"{i:03d}.png")
        for i in range(n_bad):
            defect = "bright" if i % 2 == 0 else "dark"
            image = texture()
            radius = rng.uniform(0.12, 0.2) * min(width, height)
            cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
            yy, xx = np.mgrid[:height, :width]
            distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
            disc = distance <= 1
            image[disc] = 235 if defect == "bright" else 20
            mask = np.clip(1.3 - distance, 0, 1) * disc if soft else disc.astype(np.float64)
            data.save_image(np.clip(image, 0, 255).astype(np.uint8), root / category / "test" / defect / f"{i:03d}.png")
            data.save_mask(mask, data.mask_path(root, category, defect, f"{i:03d}"))
    return root


def vlad_train_args(model: str, gen: Path, out: Path, *extra) -> list[str]:
    """A train command line; the token cache is the folder `tokens` beside OUT (never the user's ~/.cache).
    Images are decoded in the main process (starting worker processes costs ~0.2 s per loader on 2 busy cores);
    the tests of the loader pass --workers 2 in `extra`, which wins."""
    return ["train", "--data", str(gen), "--out", str(out), "--model", model, "--image-size", str(VLAD_TINY_SIZE),
            "--batch-size", "4", "--quiet", "--cache-dir", str(Path(out).parent / "tokens"), "--workers", "0",
            *map(str, extra)]


def vlad_logits(probability: torch.Tensor, dim: int) -> torch.Tensor:
    """Two-state logits {normal, abnormal} whose softmax gives `probability` as the abnormal state."""
    return torch.stack([torch.zeros_like(probability), torch.log(probability / (1 - probability))], dim=dim)


def vlad_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Independent bilinear upsampling with half-pixel centres (align_corners=False), (C, h, w) -> (C, S, S)."""
    channels, h, w = grid.shape
    out = np.zeros((channels, size, size))
    for y in range(size):
        sy = max((y + 0.5) * h / size - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(size):
            sx = max((x + 0.5) * w / size - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, y, x] = ((1 - fy) * ((1 - fx) * grid[:, y0, x0] + fx * grid[:, y0, x1])
                            + fy * ((1 - fx) * grid[:, y1, x0] + fx * grid[:, y1, x1]))
    return out


# Adam's first update is lr * m / sqrt(v) = lr * sign(g), so each step moves every weight that has a gradient by
# about lr: at the default lr 1e-4, one step is ~1e-4. Measured below, the smallest tensor's max |w - w0|: 1 step
# -> 1.0e-4, 1 epoch of 2 steps -> 2.0e-4, 2 epochs of 2 steps (cosine lr 1e-4, 5e-5) -> 2.7e-4, 4 epochs of 2
# steps -> 4.1e-4. Half a step is the margin of "it trained"; a removed optimizer step gives exactly 0.
VLAD_MOVED = 5e-5


def vlad_untrained_weights(model: str, gen: Path, out: Path, *extra) -> dict[str, torch.Tensor]:
    """The adapters `train` starts from, as `--epochs 0` writes them (the same seed gives the same init)."""
    assert vlad.main(vlad_train_args(model, gen, out, "--cache", "none", *extra, "--epochs", "0")) == 0
    return load_file(str(out / "vlad.safetensors"))


def vlad_assert_moved(weights: dict, initial: dict, names=None, margin: float = VLAD_MOVED) -> None:
    """Each named tensor (default: all) moved from its initialization: max |w - w0| > margin."""
    shifts = {name: (weights[name] - initial[name]).abs().max().item() for name in names or initial}
    assert min(shifts.values()) > margin, shifts


def test_focal_loss_equals_hand_computed_value():
    probability, target = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0])
    # -alpha_t (1 - p_t)^2 log p_t with alpha_t = 0.25 for positives, 0.75 for negatives
    expected = (-0.25 * 0.1 ** 2 * math.log(0.9) - 0.75 * 0.2 ** 2 * math.log(0.8)
                - 0.75 * 0.6 ** 2 * math.log(0.4)) / 3
    logits = vlad_logits(probability, dim=-1)
    assert vlad.focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    expected_gamma0_alpha_half = (-0.5 * math.log(0.9) - 0.5 * math.log(0.8) - 0.5 * math.log(0.4)) / 3
    assert vlad.focal_loss(logits, target, gamma=0.0, alpha=0.5).item() == pytest.approx(
        expected_gamma0_alpha_half, rel=1e-6)


def test_bce_with_soft_targets_equals_hand_computed_value():
    probability = torch.tensor([[[0.8, 0.3], [0.5, 0.1]]])
    target = torch.tensor([[[1.0, 0.5], [0.0, 0.2]]])
    expected = -(math.log(0.8) + (0.5 * math.log(0.3) + 0.5 * math.log(0.7)) + math.log(0.5)
                 + (0.2 * math.log(0.1) + 0.8 * math.log(0.9))) / 4
    assert vlad.bce_loss(vlad_logits(probability, dim=1), target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_adapted_dice_equals_hand_computed_value_for_each_beta(beta):
    probability = torch.tensor([[[0.8, 0.3], [0.5, 0.1]], [[0.2, 0.0], [0.0, 0.2]]])
    target = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    dice_1 = (2 * (0.8 + 0.15) + 1) / (1.5 + 1.7 + 1)  # image 1: sum yp 0.95, sum y 1.5, sum p 1.7
    dice_2 = 1 / (0.4 + 1)  # image 2: empty mask, sum p 0.4
    expected = ((1 - dice_1 / (dice_1 + beta)) + (1 - dice_2 / (dice_2 + beta))) / 2
    assert vlad.dice_loss(probability, target, beta).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_is_focal_plus_omega_times_stage_sum_of_bce_and_dice():
    s_vl, y_img = torch.tensor([0.7]), torch.tensor([1.0])
    stage_1 = torch.tensor([[[0.8, 0.3], [0.5, 0.1]]])
    stage_2 = torch.tensor([[[0.6, 0.6], [0.2, 0.4]]])
    y_pix = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])

    def bce(p, y):
        return -sum(yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for pi, yi in zip(p, y)) / len(p)

    def dice_loss(p, y, beta=1.0):
        dice = (2 * sum(pi * yi for pi, yi in zip(p, y)) + 1) / (sum(y) + sum(p) + 1)
        return 1 - dice / (dice + beta)

    y = [1.0, 0.5, 0.0, 0.0]
    focal = -0.25 * 0.3 ** 2 * math.log(0.7)
    expected = focal + 6 * (bce([0.8, 0.3, 0.5, 0.1], y) + dice_loss([0.8, 0.3, 0.5, 0.1], y)
                            + bce([0.6, 0.6, 0.2, 0.4], y) + dice_loss([0.6, 0.6, 0.2, 0.4], y))
    stages = vlad_logits(torch.stack([stage_1, stage_2], dim=1), dim=2)  # (B, L, 2, S, S)
    s_vl = vlad_logits(s_vl, dim=-1)
    total = vlad.vlad_loss(s_vl, y_img, stages, y_pix)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # Table 4 ablation: y_img only is the focal term, y_pix only the weighted pixel terms
    assert vlad.vlad_loss(s_vl, y_img, stages, y_pix, terms="image").item() == pytest.approx(focal, rel=1e-6)
    assert vlad.vlad_loss(s_vl, y_img, stages, y_pix, terms="pixel").item() == pytest.approx(expected - focal,
                                                                                              rel=1e-6)


def test_losses_from_logits_equal_the_probability_formulas_and_keep_their_gradient_when_saturated():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 2, generator=generator, dtype=torch.float64) * 4  # gaps within about +-16
    target = (torch.rand(64, generator=generator) > 0.5).double()
    p = logits.softmax(dim=-1)[:, 1]
    p_t = target * p + (1 - target) * (1 - p)
    alpha_t = target * 0.25 + (1 - target) * 0.75
    focal_from_p = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t.clamp_min(1e-12))).mean()
    assert vlad.focal_loss(logits, target).item() == pytest.approx(focal_from_p.item(), abs=1e-6)
    pixel_logits = torch.randn(2, 2, 5, 5, generator=generator, dtype=torch.float64) * 4
    y_pix = torch.rand(2, 5, 5, generator=generator, dtype=torch.float64)
    q = pixel_logits.softmax(dim=1)[:, 1]
    bce_from_p = -(y_pix * torch.log(q.clamp_min(1e-12)) + (1 - y_pix) * torch.log((1 - q).clamp_min(1e-12))).mean()
    assert vlad.bce_loss(pixel_logits, y_pix).item() == pytest.approx(bce_from_p.item(), abs=1e-6)

    # A normal image (and pixel) scored abnormal with a logit gap of 40, in float32 as training runs: the
    # probability is exactly 1.0, so a loss on clamped probabilities has gradient 0. From the logits it is exact.
    gap = 40.0
    sigmoid = 1 / (1 + math.exp(-gap))
    softplus = gap + math.log1p(math.exp(-gap))
    for loss_of, expected in (
            # BCE, y = 0: loss = softplus(d), d loss / d d = sigmoid(d)
            (lambda x: vlad.bce_loss(x.reshape(1, 2, 1, 1), torch.zeros(1, 1, 1)), sigmoid),
            # focal, y = 0: loss = (1 - alpha) s^2 softplus(d) with s = sigmoid(d)
            (lambda x: vlad.focal_loss(x.reshape(1, 2), torch.zeros(1)),
             0.75 * (2 * sigmoid * sigmoid * (1 - sigmoid) * softplus + sigmoid ** 3))):
        two_logits = torch.tensor([0.0, gap], requires_grad=True)
        loss_of(two_logits).backward()
        gradient = two_logits.grad[1].item()  # d loss / d (abnormal logit) = d loss / d gap
        assert math.isfinite(gradient) and gradient == pytest.approx(expected, rel=1e-5) and gradient > 0.5
        assert two_logits.grad[0].item() == pytest.approx(-expected, rel=1e-5)
    saturated = torch.tensor([0.0, gap], requires_grad=True)
    probability = saturated.softmax(dim=0)[1]
    assert probability.item() == 1.0  # what the clamped formula would see
    (-torch.log((1 - probability).clamp_min(1e-12))).backward()
    assert saturated.grad.abs().max().item() == 0.0


def test_stages_are_quarter_depths_and_prompts_cover_every_state_and_template():
    assert vlad.default_stages(24) == [6, 12, 18, 24]
    assert vlad.default_stages(12) == [3, 6, 9, 12]
    assert vlad.default_stages(4) == [1, 2, 3, 4]
    normal, abnormal = vlad.prompt_sentences("metal_nut")
    assert len(vlad.TEMPLATES) == 35
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert "a photo of a flawless metal nut." in normal and "a photo of a damaged metal nut." in abnormal


def test_vision_language_map_and_score_equal_independent_eq8():
    generator = torch.Generator().manual_seed(0)
    batch, side, channels, size = 2, 3, 8, 7
    patch = [torch.nn.functional.normalize(torch.randn(batch, side * side, channels, generator=generator), dim=-1)
             for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(batch, 2, channels, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, channels, generator=generator), dim=-1)
    stage_maps = vlad.vision_language_maps(patch, text, size).double().numpy()
    score = vlad.vision_language_score(image, text).double().numpy()
    for b in range(batch):
        t = text[b].double().numpy()
        m_vl = np.zeros((size, size))
        for features in patch:
            logits = 100.0 * features[b].double().numpy() @ t.T  # (N, 2)
            up = vlad_bilinear(logits.T.reshape(2, side, side), size)
            m_vl += np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1]))
        np.testing.assert_allclose(stage_maps[b].sum(0), m_vl, atol=1e-5)
        logits = 100.0 * image[b].double().numpy() @ t.T
        np.testing.assert_allclose(score[b], np.exp(logits[1]) / np.exp(logits).sum(), atol=1e-6)


def test_vision_vision_map_equals_brute_force_eq9_and_chunked_equals_unchunked():
    generator = torch.Generator().manual_seed(1)
    batch, side, channels, size = 2, 4, 6, 9
    patch = [torch.nn.functional.normalize(torch.randn(batch, side * side, channels, generator=generator), dim=-1)
             for _ in range(3)]
    bank = [torch.nn.functional.normalize(torch.randn(37, channels, generator=generator), dim=-1) for _ in range(3)]
    m_vv = vlad.vision_vision_map(patch, bank, size, chunk=5).double().numpy()
    unchunked = vlad.vision_vision_map(patch, bank, size, chunk=10_000).double().numpy()
    np.testing.assert_allclose(m_vv, unchunked, atol=1e-6, rtol=0)  # same maxima; only matmul blocking differs
    for b in range(batch):
        distance = np.zeros(side * side)
        for features, memory in zip(patch, bank):
            f, m = features[b].double().numpy(), memory.double().numpy()
            for n in range(side * side):  # brute force: every query against every bank entry
                distance[n] += 1 - max(float(f[n] @ m[j]) for j in range(len(m)))
        np.testing.assert_allclose(m_vv[b], vlad_bilinear(distance.reshape(1, side, side), size)[0], atol=1e-5)
    tokens = torch.randn(batch, 3, side * side, channels, generator=generator)
    detector = vlad.VLAD(channels, channels, 3)
    bank_of_self = [features.reshape(-1, channels) for features in detector.patch_features(tokens)]
    text = torch.nn.functional.normalize(torch.randn(batch, 2, channels, generator=generator), dim=-1)
    embedding = torch.randn(batch, channels, generator=generator)
    anomaly_map, score = detector.detect(tokens, embedding, text, size, bank_of_self, chunk=7)
    zero_shot_map, zero_shot_score = detector.detect(tokens, embedding, text, size)
    # the images are in their own memory bank: M_VV = 0, so the fused outputs equal the zero-shot ones
    torch.testing.assert_close(anomaly_map, zero_shot_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(score, zero_shot_score, atol=1e-5, rtol=0)


def test_detect_with_a_bank_of_other_images_adds_m_vv_to_the_map_and_its_max_to_the_score():
    generator = torch.Generator().manual_seed(2)
    batch, n_stages, side, width, channels, size = 2, 3, 4, 10, 6, 9
    torch.manual_seed(2)
    detector = vlad.VLAD(width, channels, n_stages)
    weights = {k: v.double().numpy() for k, v in detector.state_dict().items()}
    tokens = torch.randn(batch, n_stages, side * side, width, generator=generator)
    embedding = torch.randn(batch, channels, generator=generator)
    text = torch.nn.functional.normalize(torch.randn(batch, 2, channels, generator=generator), dim=-1)
    # the adapted patch tokens of other images (random unit vectors), 20 per stage
    bank = [torch.nn.functional.normalize(torch.randn(20, channels, generator=generator), dim=-1)
            for _ in range(n_stages)]
    anomaly_map, score = detector.detect(tokens, embedding, text, size, bank, chunk=7)
    zero_shot_map, zero_shot_score = detector.detect(tokens, embedding, text, size)
    for b in range(batch):
        t = text[b].double().numpy()
        m_vl, distance = np.zeros((size, size)), np.zeros(side * side)
        for i in range(n_stages):
            f = tokens[b, i].double().numpy() @ weights[f"patch_adapters.{i}.weight"].T \
                + weights[f"patch_adapters.{i}.bias"]
            f /= np.linalg.norm(f, axis=1, keepdims=True)
            up = vlad_bilinear((100.0 * f @ t.T).T.reshape(2, side, side), size)
            m_vl += np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1]))
            m = bank[i].double().numpy()
            for n in range(side * side):
                distance[n] += 1 - max(float(f[n] @ m[j]) for j in range(len(m)))
        m_vv = vlad_bilinear(distance.reshape(1, side, side), size)[0]
        e = embedding[b].double().numpy()
        image = weights["image_adapter.weight"] @ (e / np.linalg.norm(e)) + weights["image_adapter.bias"]
        logits = 100.0 * (image / np.linalg.norm(image)) @ t.T
        s_vl = np.exp(logits[1]) / np.exp(logits).sum()
        assert m_vv.min() > 0.05  # far from every bank entry: the fusion rule matters
        np.testing.assert_allclose(zero_shot_map[b].double().numpy(), m_vl, atol=1e-5)
        np.testing.assert_allclose(zero_shot_score[b].item(), s_vl, atol=1e-6)
        np.testing.assert_allclose(anomaly_map[b].double().numpy(), m_vl + m_vv, atol=1e-5)  # M = M_VL + M_VV
        np.testing.assert_allclose(score[b].item(), s_vl + m_vv.max(), atol=1e-5)  # S = S_VL + max M_VV


def test_untrained_vlad_image_score_equals_zero_shot_clip_abnormal_probability(vlad_tiny_clip, tmp_path):
    import open_clip

    root = vlad_make_synthetic_dataset(tmp_path / "ds", n_train=0, n_good=1, n_bad=2)
    paths = [s.image for s in data.read_split(root, "texture", "test")]
    backbone = vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE)
    detector = vlad.VLAD(backbone.width, backbone.embed_dim, len(backbone.stages))
    pixels = torch.stack([backbone.preprocess(data.load_image(p)) for p in paths])
    tokens, embedding = backbone.encode_images(pixels)
    text = backbone.text_features("texture")
    _, image_logits = detector(tokens, embedding, text.expand(len(paths), -1, -1), VLAD_TINY_SIZE)
    s_vl = image_logits.softmax(dim=-1)[:, 1]

    # zero-shot CLIP, computed from the open_clip model's own encode_image / encode_text
    clip = backbone.model
    tokenizer = open_clip.get_tokenizer(vlad_tiny_clip)
    states = []
    for sentences in vlad.prompt_sentences("texture"):
        features = clip.encode_text(tokenizer(sentences), normalize=True).mean(dim=0)
        states.append(features / features.norm())
    image_features = clip.encode_image(pixels, normalize=True)
    expected = (100.0 * image_features @ torch.stack(states).T).softmax(dim=-1)[:, 1]
    torch.testing.assert_close(s_vl, expected, atol=1e-5, rtol=1e-5)
    assert len(backbone.stages) == 4 and tokens.shape == (3, 4, 49, 64)


@pytest.fixture(scope="session")
def vlad_trained_run(vlad_tiny_clip, tmp_path_factory):
    """A tiny VLAD trained for 12 epochs on a generated-like folder (soft masks); its held-out evaluation set."""
    base = tmp_path_factory.mktemp("vlad_run")
    gen = vlad_make_synthetic_dataset(base / "gen", n_train=4, n_good=0, n_bad=12, soft=True, seed=1)
    held_out = vlad_make_synthetic_dataset(base / "heldout", n_train=3, n_good=3, n_bad=6, size=(120, 100), seed=2)
    run = base / "run"
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "12", "--lr", "1e-3")) == 0
    return {"run": run, "gen": gen, "held_out": held_out, "base": base}


def vlad_pixel_auroc(pred: Path, gt: Path, json_file: Path) -> float:
    assert metrics.main(["--pred", str(pred), "--gt", str(gt), "--json", str(json_file)]) == 0
    return json.loads(json_file.read_text())["mean"]["P-AUC"]


def vlad_reference_detection(model: str, run: Path, root: Path, category: str, bank_images: list) -> dict:
    """Eq. 8, Eq. 9 and the fusion recomputed image by image in float64 from the backbone's raw outputs and the
    weights in RUN/vlad.safetensors, without vlad.VLAD. -> {tiff path relative to PRED/<category>:
    (M_VL, M_VV, S_VL, S_VV)}: maps at the image's own size as predict writes them, S_VV the max of M_VV at the
    input size; M_VV None and S_VV 0 without bank images."""
    backbone = vlad.Backbone(model, None, VLAD_TINY_SIZE)
    weights = {k: v.double() for k, v in load_file(str(run / "vlad.safetensors")).items()}
    text = backbone.text_features(category).double()  # (2, C): normal, abnormal
    size = VLAD_TINY_SIZE

    def upsample(grid: torch.Tensor, shape) -> torch.Tensor:  # (h, w) -> shape, half-pixel centres
        return torch.nn.functional.interpolate(grid[None, None], size=shape, mode="bilinear",
                                               align_corners=False)[0, 0]

    def encode(path) -> tuple[list[torch.Tensor], torch.Tensor]:  # -> L x (N, C) unit F_patch_i, (C,) embedding
        tokens, embedding = backbone.encode_images(backbone.preprocess(data.load_image(path))[None])
        features = []
        for i in range(len(backbone.stages)):
            f = tokens[0, i].double() @ weights[f"patch_adapters.{i}.weight"].T + weights[f"patch_adapters.{i}.bias"]
            features.append(f / f.norm(dim=1, keepdim=True))
        return features, embedding[0].double()

    bank = [encode(path)[0] for path in bank_images]
    reference = {}
    for sample in data.read_split(root, category, "test"):
        width, height = data.load_image(sample.image).size
        features, embedding = encode(sample.image)
        side = math.isqrt(features[0].shape[0])
        m_vl = torch.zeros(size, size, dtype=torch.float64)
        distance = torch.zeros(side * side, dtype=torch.float64)
        for i, f in enumerate(features):
            logits = 100.0 * f @ text.T  # (N, 2)
            up = torch.stack([upsample(logits[:, state].reshape(side, side), (size, size)) for state in (0, 1)])
            m_vl += up.softmax(dim=0)[1]
            if bank:  # nearest neighbour over every token of every bank image
                nearest = torch.stack([(f @ image_bank[i].T).max(dim=1).values for image_bank in bank])
                distance += 1 - nearest.max(dim=0).values
        m_vv = upsample(distance.reshape(side, side), (size, size)) if bank else None
        image = weights["image_adapter.weight"] @ (embedding / embedding.norm()) + weights["image_adapter.bias"]
        s_vl = (100.0 * (image / image.norm()) @ text.T).softmax(dim=0)[1].item()
        reference[data.prediction_path(sample)] = (
            upsample(m_vl, (height, width)).numpy(), None if m_vv is None else upsample(m_vv, (height, width)).numpy(),
            s_vl, 0.0 if m_vv is None else m_vv.max().item())
    return reference


def vlad_read_scores(csv_file: Path) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(csv_file.read_text())))
    assert rows[0] == ["path", "score"]
    return {path: float(score) for path, score in rows[1:]}


def test_training_lowers_loss_and_raises_held_out_pixel_auroc(vlad_trained_run, tmp_path):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    log = data.read_jsonl(run / "log.jsonl")
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    # epoch 0 of the same run = untrained adapters: a second run with --epochs 0 writes exactly that checkpoint
    untrained = tmp_path / "untrained"
    assert vlad.main(vlad_train_args(
        json.loads((run / "config.json").read_text())["model"], vlad_trained_run["gen"], untrained,
        "--epochs", "0")) == 0
    for name, ckpt in (("before", untrained), ("after", run)):
        assert vlad.main(["predict", "--ckpt", str(ckpt), "--data", str(held_out), "--k-shot", "0",
                          "--out", str(tmp_path / name), "--quiet"]) == 0
    before = vlad_pixel_auroc(tmp_path / "before", held_out, tmp_path / "before.json")
    after = vlad_pixel_auroc(tmp_path / "after", held_out, tmp_path / "after.json")
    assert after > before + 0.1 and after > 0.8, (before, after)


def test_predict_writes_maps_at_image_size_scores_overlays_and_k_shot_record(vlad_trained_run, tmp_path):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    pred = tmp_path / "pred"
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "2", "--seed", "3",
                      "--out", str(pred), "--quiet"]) == 0
    test = data.read_split(held_out, "texture", "test")
    record = json.loads((pred / "texture/k_shot.json").read_text())
    normals = [s.image for s in data.read_split(held_out, "texture", "train")]
    assert record["k"] == 2 and record["seed"] == 3 and record["epoch"] == 12 and record["checkpoint"] == str(run)
    assert record["images"] == [f"train/good/{p.name}" for p in data.select_k_shot(normals, 2, 3)]
    rows = (pred / "texture/scores.csv").read_text().splitlines()
    assert rows[0] == "path,score" and len(rows) == 1 + len(test)
    expected_paths = sorted(f"test/{s.defect}/{s.image.stem}.tiff" for s in test)
    assert [r.split(",")[0] for r in rows[1:]] == expected_paths
    for sample in test:
        anomaly_map = data.load_tiff(pred / "texture/test" / sample.defect / f"{sample.image.stem}.tiff")
        assert anomaly_map.shape == (100, 120) and anomaly_map.dtype == np.float32
        assert Image.open(pred / "texture/overlay" / sample.defect / f"{sample.image.stem}.png").size == (120, 100)
    # k = all: the bank holds every train/good image; a second run on the same --out with another k is refused
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "all",
                      "--out", str(tmp_path / "full"), "--quiet"]) == 0
    assert json.loads((tmp_path / "full/texture/k_shot.json").read_text())["k"] == 3
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "1",
                      "--out", str(pred), "--quiet"]) == 2


def test_few_shot_maps_and_scores_equal_independent_fusion_with_a_bank_of_other_images(vlad_trained_run, tmp_path):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    pred = tmp_path / "pred"
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "2", "--seed", "1",
                      "--out", str(pred), "--quiet"]) == 0
    bank_images = [held_out / "texture" / p for p in json.loads((pred / "texture/k_shot.json").read_text())["images"]]
    assert len(bank_images) == 2 and all(p.parent == held_out / "texture/train/good" for p in bank_images)
    model = json.loads((run / "config.json").read_text())["model"]
    reference = vlad_reference_detection(model, run, held_out, "texture", bank_images)
    scores = vlad_read_scores(pred / "texture/scores.csv")
    assert sorted(scores) == sorted(reference) and len(scores) == 9
    for path, (m_vl, m_vv, s_vl, s_vv) in reference.items():
        # the bank holds other images, so M_VV is clearly non-zero and not flat: a wrong fusion rule shows
        assert s_vv > 0.05 and m_vv.max() - m_vv.mean() > 0.01, (path, s_vv)
        np.testing.assert_allclose(data.load_tiff(pred / "texture" / path), m_vl + m_vv, atol=1e-4, rtol=0)
        assert scores[path] == pytest.approx(s_vl + s_vv, abs=1e-4), path


def vlad_count_encoded_images(monkeypatch) -> list[int]:
    """The batch sizes of every backbone forward from now on, in order (a list the test reads)."""
    sizes = []
    encode_images = vlad.Backbone.encode_images

    def counting_encode_images(backbone, pixels):
        sizes.append(pixels.shape[0])
        return encode_images(backbone, pixels)

    monkeypatch.setattr(vlad.Backbone, "encode_images", counting_encode_images)
    return sizes


def test_zero_shot_prediction_encodes_only_the_test_images_and_writes_m_vl_alone(vlad_trained_run, tmp_path,
                                                                                  monkeypatch):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    encoded = vlad_count_encoded_images(monkeypatch)
    common = ["predict", "--ckpt", str(run), "--data", str(held_out), "--quiet"]
    assert vlad.main(common + ["--k-shot", "0", "--out", str(tmp_path / "zero")]) == 0
    assert sum(encoded) == 9  # the 9 test images, no bank image
    encoded.clear()
    assert vlad.main(common + ["--k-shot", "2", "--out", str(tmp_path / "two")]) == 0
    assert sum(encoded) == 9 + 2  # the count does see a bank when there is one
    monkeypatch.undo()
    assert json.loads((tmp_path / "zero/texture/k_shot.json").read_text())["images"] == []
    model = json.loads((run / "config.json").read_text())["model"]
    reference = vlad_reference_detection(model, run, held_out, "texture", [])
    scores = vlad_read_scores(tmp_path / "zero/texture/scores.csv")
    assert sorted(scores) == sorted(reference)
    for path, (m_vl, _, s_vl, _) in reference.items():
        np.testing.assert_allclose(data.load_tiff(tmp_path / "zero/texture" / path), m_vl, atol=1e-4, rtol=0)
        assert scores[path] == pytest.approx(s_vl, abs=1e-4), path


def test_sharded_prediction_equals_unsharded_and_last_shard_writes_scores(vlad_trained_run, tmp_path):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    common = ["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "1", "--quiet"]
    assert vlad.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert vlad.main(common + ["--out", str(tmp_path / "two"), "--shard", "0/2"]) == 0
    assert not (tmp_path / "two/texture/scores.csv").exists()
    assert vlad.main(common + ["--out", str(tmp_path / "two"), "--shard", "1/2"]) == 0
    assert (tmp_path / "one/texture/scores.csv").read_text() == (tmp_path / "two/texture/scores.csv").read_text()
    tiffs = sorted((tmp_path / "one/texture/test").rglob("*.tiff"))
    assert len(tiffs) == 9
    for tiff in tiffs:  # the same bits: each image is encoded and scored alone, whichever shard takes it
        assert tiff.read_bytes() == (tmp_path / "two" / tiff.relative_to(tmp_path / "one")).read_bytes()
    # a re-run finds every image done and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.tiff")}
    assert vlad.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.tiff")} == before


def test_checkpoint_is_safetensors_and_json_and_matches_config(vlad_trained_run):
    run = vlad_trained_run["run"]
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
        "config.json", "log.jsonl", "train_state.safetensors", "vlad.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["epoch"] == 12 and config["stages"] == [1, 2, 3, 4] and config["image_size"] == VLAD_TINY_SIZE
    adapters = load_file(str(run / "vlad.safetensors"))
    assert adapters["patch_adapters.0.weight"].shape == (config["embed_dim"], config["width"])
    assert adapters["image_adapter.weight"].shape == (32, 32)


def vlad_count_loader_workers(monkeypatch) -> list[int]:
    """The num_workers of every DataLoader vlad.py makes from now on, in order."""
    workers, make_loader = [], torch.utils.data.DataLoader

    def counting_loader(*args, **kwargs):
        workers.append(kwargs["num_workers"])
        return make_loader(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", counting_loader)
    return workers


def test_image_batches_are_the_same_tensors_in_order_for_every_worker_count_and_never_hold_the_backbone(
        vlad_tiny_clip, tmp_path, monkeypatch):
    root = vlad_make_synthetic_dataset(tmp_path / "data", n_train=0, n_good=2, n_bad=3, size=(120, 100), soft=True)
    samples = data.read_split(root, "texture", "test")
    backbone = vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE)
    dataset = vlad.ImageDataset([s.image for s in samples], VLAD_TINY_SIZE, backbone.mean, backbone.std,
                                masks=[s.mask for s in samples], originals=True)
    assert len(pickle.dumps(dataset)) < 10_000  # what a spawned worker receives: paths and numbers, no model
    batches = [[4, 0], [2], [1, 3]]  # any order the caller asks for, e.g. an epoch's shuffle
    workers = vlad_count_loader_workers(monkeypatch)
    for count in (0, 2):
        received = list(vlad.image_batches(dataset, batches, count))
        assert len(received) == 3
        for indices, batch in zip(batches, received):
            for row, index in enumerate(indices):  # the image read here, in this process, by the backbone's own code
                image = data.load_image(samples[index].image)
                assert torch.equal(batch["pixels"][row], backbone.preprocess(image))
                assert torch.equal(batch["image"][row], torch.from_numpy(np.array(image)))
                mask = samples[index].mask
                expected = np.zeros((VLAD_TINY_SIZE,) * 2) if mask is None else \
                    np.rint(data.load_mask(mask, (VLAD_TINY_SIZE,) * 2, binarize=False) * 255)
                assert np.array_equal(batch["y_pix"][row].numpy(), expected) and batch["y_pix"].dtype == torch.uint8
    assert workers == [0, 2]  # the second pass did decode in two worker processes


def test_every_cache_mode_and_worker_count_trains_the_same_weights_bit_for_bit(vlad_tiny_clip, tmp_path, monkeypatch):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=4, soft=True)
    workers = vlad_count_loader_workers(monkeypatch)
    for cache, count in (("disk", 0), ("memory", 2), ("none", 2)):
        assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / cache, "--epochs", "2", "--cache", cache,
                                         "--extract-batch", "3", "--workers", count)) == 0
    # disk and memory fill 6 images in 2 batches; none decodes each epoch's 2 batches of 4 again, in workers
    assert workers == [0, 2, 2, 2]
    assert len(list((tmp_path / "tokens").rglob("*.safetensors"))) == 6  # only the disk run writes a cache
    uncached = load_file(str(tmp_path / "none/vlad.safetensors"))
    for cache in ("disk", "memory"):
        cached = load_file(str(tmp_path / cache / "vlad.safetensors"))
        assert all(torch.equal(cached[name], uncached[name]) for name in cached), cache
    vlad_assert_moved(uncached, vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init"))  # equal, not idle


def test_a_cache_fill_killed_midway_and_run_again_writes_the_entries_of_an_uninterrupted_one(vlad_tiny_clip, tmp_path,
                                                                                             monkeypatch, capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=4, soft=True)
    straight, killed = tmp_path / "straight", tmp_path / "killed"  # each with its own cache folder, tokens/
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, straight / "run", "--epochs", "1", "--extract-batch", "6",
                                     "--workers", "0")) == 0
    save_bytes, saved = data.save_bytes, []

    def killed_at_the_third_entry(blob, path):
        if Path(path).suffix == ".safetensors" and "tokens" in Path(path).parts:
            saved.append(path)
            if len(saved) == 3:
                raise KeyboardInterrupt
        save_bytes(blob, path)

    monkeypatch.setattr(data, "save_bytes", killed_at_the_third_entry)
    argv = vlad_train_args(vlad_tiny_clip, gen, killed / "run", "--epochs", "1", "--extract-batch", "2",
                           "--workers", "2")
    with pytest.raises(KeyboardInterrupt):
        vlad.main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    assert vlad.main(argv) == 0  # the same command again: 2 entries kept, the other 4 computed in other batches
    assert vlad_cache_line(capsys) == (4, 2, 0)
    entries = sorted(p.relative_to(straight / "tokens") for p in (straight / "tokens").rglob("*.safetensors"))
    assert len(entries) == 6
    assert sorted(p.relative_to(killed / "tokens") for p in (killed / "tokens").rglob("*.safetensors")) == entries
    for entry in entries:
        assert (straight / "tokens" / entry).read_bytes() == (killed / "tokens" / entry).read_bytes(), entry
    trained = [load_file(str(folder / "run/vlad.safetensors")) for folder in (straight, killed)]
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])


def test_an_unreadable_image_decoded_in_a_worker_is_one_sentence_naming_it(vlad_trained_run, vlad_tiny_clip, tmp_path,
                                                                            capfd):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=3)
    broken = gen / "texture/test/dark/001.png"  # the third of 4 batches of one image: a worker decodes it
    broken.write_bytes(broken.read_bytes()[:60])
    held_out = tmp_path / "held_out"
    shutil.copytree(vlad_trained_run["held_out"], held_out)
    truncated = held_out / "texture/test/dark/003.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    capfd.readouterr()
    train = vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "1", "--extract-batch", "1",
                            "--workers", "2")
    predict = ["predict", "--ckpt", str(vlad_trained_run["run"]), "--data", str(held_out), "--k-shot", "1",
               "--out", str(tmp_path / "pred"), "--batch-size", "2", "--workers", "2", "--quiet"]
    for argv, name in ((train, broken), (predict, truncated)):
        assert vlad.main(argv) == 2
        error = capfd.readouterr().err  # the file descriptor: a worker's own output would show here too
        assert error.startswith(f"error: {name}: cannot read the image") and "corrupt or truncated" in error, error
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error and "worker" not in error
    assert not (tmp_path / "run").exists()  # training never started: no checkpoint, config or log


def test_sharded_token_caching_fills_disjoint_halves_then_a_plain_run_trains_on_them(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=5, soft=True)
    cache = tmp_path / "tokens"
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "1", "--shard", "0/2")) == 0
    assert len(list(cache.rglob("*.safetensors"))) == 4 and not (tmp_path / "run/vlad.safetensors").exists()
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "1", "--shard", "1/2")) == 0
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert len(written) == 7
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "1")) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == written  # nothing recomputed
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "plain", "--epochs", "1", "--cache", "none")) == 0
    sharded = load_file(str(tmp_path / "run/vlad.safetensors"))
    plain = load_file(str(tmp_path / "plain/vlad.safetensors"))
    assert all(torch.equal(sharded[name], plain[name]) for name in plain)  # each image is encoded alone
    vlad_assert_moved(plain, vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init"))


def test_resumed_training_equals_uninterrupted_training(vlad_tiny_clip, tmp_path, monkeypatch):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=5, soft=True)
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "straight", "--epochs", "4")) == 0

    write_derived_files = vlad.write_derived_files

    def killed_between_the_state_and_the_files_after_epoch_2(run, adapters, config, log):
        if config["epoch"] == 2:
            raise KeyboardInterrupt  # the state of epoch 2 is on disk, vlad.safetensors/config/log still at 1
        write_derived_files(run, adapters, config, log)

    monkeypatch.setattr(vlad, "write_derived_files", killed_between_the_state_and_the_files_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "4"))
    monkeypatch.setattr(vlad, "write_derived_files", write_derived_files)
    assert json.loads((tmp_path / "resumed/config.json").read_text())["epoch"] == 1
    assert len(data.read_jsonl(tmp_path / "resumed/log.jsonl")) == 1
    after_epoch_2 = {k[len("vlad."):]: v for k, v in load_file(str(tmp_path / "resumed/train_state.safetensors")).items()
                     if k.startswith("vlad.")}
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "4")) == 2  # no --resume
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "4", "--resume",
                                     "--lr", "0.5")) == 2  # other settings than the run it continues
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "4", "--resume")) == 0
    straight = load_file(str(tmp_path / "straight/train_state.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/train_state.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    straight_log, resumed_log = (data.read_jsonl(tmp_path / f"{run}/log.jsonl") for run in ("straight", "resumed"))
    assert [(r["epoch"], r["loss"], r["lr"]) for r in straight_log] == \
        [(r["epoch"], r["loss"], r["lr"]) for r in resumed_log]  # the line of epoch 2 is not lost
    assert [r["lr"] for r in straight_log] == pytest.approx(  # the rate each epoch used: cosine from lr
        [vlad.LR * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)], rel=1e-9)
    assert json.loads((tmp_path / "resumed/config.json").read_text())["epoch"] == 4
    vlad_assert_moved(load_file(str(tmp_path / "straight/vlad.safetensors")),
                      vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init"))
    # the resumed epochs 3-4 trained too; they run at the cosine tail (lr 5e-5, 1.5e-5): measured 5.8e-5 and more
    vlad_assert_moved(load_file(str(tmp_path / "resumed/vlad.safetensors")), after_epoch_2, margin=2e-5)
    # resuming a finished run does no work: nothing in the run folder is rewritten
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")}
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "4", "--resume")) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")} == before


def vlad_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_an_unreadable_training_state_names_restart_which_moves_the_run_aside_and_trains_afresh(vlad_tiny_clip,
                                                                                                 tmp_path, capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=2, soft=True)
    run = tmp_path / "run"
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1")) == 0
    state = run / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])  # a copy that broke off
    before = vlad_files(run)
    capsys.readouterr()
    for flags in (["--resume"], []):  # neither way is a dead end: both say what to run
        assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1", *flags)) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
        assert "--restart" in error and f"moves its files to {run / 'old-1'} and trains from scratch" in error
        assert ("in place of --resume" in error) == bool(flags)
    assert vlad_files(run) == before  # a refusal changes nothing
    with pytest.raises(SystemExit) as exit_info:
        vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--resume", "--restart"))
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err

    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1", "--restart")) == 0
    assert f"--restart: moved the previous run's files to {run / 'old-1'};" in capsys.readouterr().out
    assert vlad_files(run / "old-1") == before  # moved, not deleted
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "fresh", "--epochs", "1")) == 0
    assert vlad_files(run).keys() == vlad_files(tmp_path / "fresh").keys()
    restarted, fresh = (load_file(str(folder / "train_state.safetensors")) for folder in (run, tmp_path / "fresh"))
    assert restarted.keys() == fresh.keys() and all(torch.equal(restarted[k], fresh[k]) for k in fresh)
    initial = vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init")
    vlad_assert_moved({k: v for k, v in restarted.items() if k.startswith("vlad.")},
                      {f"vlad.{k}": v for k, v in initial.items()})
    capsys.readouterr()
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1", "--resume", "--lr", "0.5")) == 2
    error = capsys.readouterr().err  # other settings: the same way out, to the next free folder
    assert "other settings (lr)" in error and f"--restart in place of --resume (which moves its files to " \
        f"{run / 'old-2'}" in error


def test_train_and_predict_remove_the_temporaries_of_dead_writers_from_the_folders_they_write(vlad_tiny_clip,
                                                                                               tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=2, soft=True)
    run, pred, tokens = tmp_path / "run", tmp_path / "pred", tmp_path / "tokens"
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1")) == 0
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(gen), "--out", str(pred), "--quiet"]) == 0
    entry = next(tokens.rglob("*.safetensors"))
    # what kill -9 leaves mid-write: a temporary nobody holds a lock on, in folders a finished re-run never writes
    dead = [run / ".train_state.safetensors.k1lled_0.tmp.safetensors",
            entry.parent / f".{entry.name}.k1lled_0.tmp.safetensors",
            pred / "texture/test/bright/.000.tiff.k1lled_0.tmp.tiff",
            pred / "texture/overlay/dark/.001.png.k1lled_0.tmp.png"]
    for path in dead:
        path.write_bytes(b"half a file")
        assert data.is_temporary(path)

    def files():
        return {path: path.stat().st_mtime_ns for folder in (run, pred, tokens) for path in folder.rglob("*")
                if path.is_file()}

    finished = {path: mtime for path, mtime in files().items() if path not in dead}
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, run, "--epochs", "1", "--resume")) == 0
    assert not any(path.exists() for path in dead[:2]) and all(path.exists() for path in dead[2:])
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(gen), "--out", str(pred), "--quiet"]) == 0
    assert not any(path.exists() for path in dead)
    assert files() == finished  # and nothing else was touched


VLAD_ON_A_SMALL_DISK = """
import contextlib, io, json, shutil, sys
sys.path.insert(0, {here!r})
from pathlib import Path
import data, vlad
disk = Path({disk!r})
readers = {{".safetensors": lambda p: vlad.load_file(str(p)), ".tiff": data.load_tiff, ".png": data.load_image,
            ".json": lambda p: json.loads(p.read_text()), ".jsonl": data.read_jsonl}}
for free_kilobytes, argv in {cases!r}:  # one process (one import of torch) for every case
    ballast = disk / "ballast"
    ballast.write_bytes(b"0" * (shutil.disk_usage(disk).free - free_kilobytes * 1024))
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        code = vlad.main(argv)
    files = {{}}
    for path in sorted(disk.rglob("*")):  # what is left on the full disk, each file read back
        if path.is_file() and path != ballast:
            try:
                files[str(path)] = "temporary" if data.is_temporary(path) else "whole"
                readers[path.suffix](path)
            except Exception:
                files[str(path)] = "broken"
    print(json.dumps({{"code": code, "error": error.getvalue(), "files": files}}))
    for path in disk.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
"""


def vlad_on_a_small_disk(disk: Path, cases: list[tuple[int, list]]) -> list[dict]:
    """Each `vlad.main(argv)` with `disk` on a tmpfs that has `free_kilobytes` free, one after another in one
    process: [{code, error (stderr), files: {file left on the disk: whole|broken|temporary}}]."""
    cases = [(free, [str(a) for a in argv]) for free, argv in cases]
    code = VLAD_ON_A_SMALL_DISK.format(here=str(HERE), disk=str(disk), cases=cases)
    result = run_on_a_small_disk(disk, 512, "-c", code)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_a_full_disk_under_the_token_cache_the_run_or_the_predictions_is_one_sentence_and_leaves_only_whole_files(
        vlad_trained_run, vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=3, soft=True)
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "0")) == 0
    entry_bytes = {p.stat().st_size for p in (tmp_path / "tokens").rglob("*.safetensors")}
    assert len(entry_bytes) == 1  # every entry of the tiny model has the same size: 63 kB
    state_bytes = (tmp_path / "run/train_state.safetensors").stat().st_size  # 39 kB at epoch 0
    disk = tmp_path / "disk"
    cases = [  # the cache fills the disk after one entry; not even the run's first checkpoint fits; two maps fit
        (100, vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run2", "--epochs", "1", "--cache-dir", disk / "tokens")),
        (24, vlad_train_args(vlad_tiny_clip, gen, disk / "run", "--epochs", "1", "--cache-dir", tmp_path / "tokens")),
        (120, ["predict", "--ckpt", vlad_trained_run["run"], "--data", vlad_trained_run["held_out"], "--k-shot", "1",
               "--out", disk / "pred", "--quiet", "--batch-size", "2"])]
    cache, run, pred = vlad_on_a_small_disk(disk, cases)
    for result, folder, needed in ((cache, disk / "tokens", entry_bytes.pop()), (run, disk / "run", state_bytes),
                                   (pred, disk / "pred/texture", None)):
        error = result["error"]
        assert result["code"] == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
        assert re.match(rf"error: {re.escape(str(folder))}\S*: the disk is full \(", error), error
        assert f"({needed:,} bytes needed" in error if needed else " bytes needed, " in error, error
        assert "temporary" not in result["files"].values()
    assert list(cache["files"].values()) == ["whole"] and run["files"] == {}
    assert sum(p.endswith(".tiff") for p in pred["files"]) >= 1
    assert str(disk / "pred/texture/k_shot.json") in pred["files"]
    assert set(pred["files"].values()) == {"whole"}, pred["files"]  # every map, overlay and score line left is whole


def vlad_cache_counts(stdout: str) -> tuple[int, int, int]:
    """(computed, reused, unreadable) from the one line `vlad.py train` prints about the token cache."""
    found = re.findall(r"token cache .*: (\d+) computed, (\d+) reused, (\d+) unreadable \(computed again\)$",
                       stdout, re.MULTILINE)
    assert len(found) == 1, stdout
    return tuple(int(n) for n in found[0])


def vlad_cache_line(capsys, errors: list | None = None) -> tuple[int, int, int]:
    """`vlad_cache_counts` of what `vlad.py train` printed since the last call; its stderr to `errors`."""
    captured = capsys.readouterr()
    if errors is not None:
        errors.append(captured.err)
    return vlad_cache_counts(captured.out)


def test_token_cache_is_shared_by_runs_and_keyed_by_the_image_content(vlad_tiny_clip, tmp_path, capsys,
                                                                      monkeypatch):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=3, soft=True)
    cache = tmp_path / "tokens"

    errors = []

    def train(root, out, *extra):
        assert vlad.main(vlad_train_args(vlad_tiny_clip, root, tmp_path / out, "--epochs", "1", *extra)) == 0
        return vlad_cache_line(capsys, errors)

    assert train(gen, "first") == (5, 0, 0)
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == 5 and all(e.parent.name == e.name[:2] for e in entries)
    entry = load_file(str(next(e for e in entries if load_file(str(e))["y_img"].item() == 1.0)))
    assert entry["y_pix"].dtype == torch.uint8 and entry["y_pix"].shape == (VLAD_TINY_SIZE, VLAD_TINY_SIZE)
    assert 0 < entry["y_pix"].float().max().item() <= 255

    copy = tmp_path / "copy"  # the same images elsewhere (another run's folder, a copied dataset): all reused
    shutil.copytree(gen, copy)
    assert train(copy, "second") == (0, 5, 0)
    assert sorted(cache.rglob("*.safetensors")) == entries
    torch.testing.assert_close(load_file(str(tmp_path / "second/vlad.safetensors")),
                               load_file(str(tmp_path / "first/vlad.safetensors")), atol=0, rtol=0)

    changed = copy / "texture/test/bright/000.png"  # one image edited in place, its size unchanged: recomputed
    pixels = np.asarray(data.load_image(changed)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    data.save_image(pixels, changed)
    assert train(copy, "third") == (1, 4, 0)
    assert train(copy, "fourth", "--stages", "1,3") == (5, 0, 0)  # another backbone signature: nothing shared

    for entry in entries[:2]:  # entries cut short (a copy that broke off): found when listed, not when read
        entry.write_bytes(entry.read_bytes()[:100])
    encoded = vlad_count_encoded_images(monkeypatch)
    assert train(gen, "fifth") == (0, 3, 2)
    assert encoded == [2] and "warning" not in errors[-1]  # computed again together, before training
    assert all(load_file(str(entry))["tokens"].shape[0] == 4 for entry in entries[:2])  # written again, whole
    torch.testing.assert_close(load_file(str(tmp_path / "fifth/vlad.safetensors")),  # recomputed in another
                               load_file(str(tmp_path / "first/vlad.safetensors")), atol=0, rtol=0)  # batch: the same


def test_entries_another_run_evicts_during_training_are_computed_again_together(vlad_tiny_clip, tmp_path,
                                                                                 monkeypatch, capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=5, soft=True)
    cache = tmp_path / "tokens"
    fill = vlad.TokenCache.fill

    def fill_then_another_run_evicts_five(token_cache, *args, **kwargs):
        fill(token_cache, *args, **kwargs)
        for entry in sorted(cache.rglob("*.safetensors"))[:5]:
            entry.unlink()  # what another run's --evict-tokens does to the images it shares with this one

    monkeypatch.setattr(vlad.TokenCache, "fill", fill_then_another_run_evicts_five)
    encoded = vlad_count_encoded_images(monkeypatch)
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "2",
                                     "--extract-batch", "4")) == 0
    out = capsys.readouterr().out
    assert vlad_cache_counts(out) == (7, 0, 0)
    assert encoded == [4, 3, 4, 1]  # the fill's two batches; then the five evicted entries, which two training
    #                                 batches of 4 and 3 need, in batches of 4 when the first is missed, once
    assert "5 entries deleted by another run's eviction during training were computed again" in out
    assert len(list(cache.rglob("*.safetensors"))) == 7
    monkeypatch.undo()
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "plain", "--epochs", "2", "--cache", "none")) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "run/vlad.safetensors")),  # each image encoded alone:
                               load_file(str(tmp_path / "plain/vlad.safetensors")), atol=0, rtol=0)  # the same bits


VLAD_TRAIN_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
from pathlib import Path
import vlad

encode_images, fill = vlad.Backbone.encode_images, vlad.TokenCache.fill


def slow_encode_images(backbone, pixels):  # a backbone slow enough that runs started together overlap
    time.sleep({seconds_per_forward})
    return encode_images(backbone, pixels)


def fill_together(cache, *args, **kwargs):  # every child enters the fill within milliseconds of the others
    Path({meet!r}, str(os.getpid())).touch()
    while len(os.listdir({meet!r})) < {children}:
        time.sleep(0.01)
    return fill(cache, *args, **kwargs)


vlad.Backbone.encode_images, vlad.TokenCache.fill = slow_encode_images, fill_together
write_bytes, entries_written = Path.write_bytes, []


def write_bytes_then_die(path, blob):  # kill -9 midway through the atomic write of entry number `kill_at`
    if path.name.endswith(".tmp.safetensors") and "tokens" in path.parts:
        entries_written.append(path)
        if len(entries_written) == {kill_at}:
            write_bytes(path, blob[:len(blob) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return write_bytes(path, blob)


Path.write_bytes = write_bytes_then_die
sys.exit(vlad.main({argv!r}))
"""


def vlad_start_trains(tmp_path: Path, argvs: list[list], seconds_per_forward: float = 0.0,
                      kill_at: int = 0) -> list[subprocess.Popen]:
    """`vlad.py train` processes that enter the token cache's fill together (optionally with a slow backbone,
    or killed with SIGKILL halfway through writing their `kill_at`-th entry)."""
    meet = tmp_path / f"meet{len(list(tmp_path.glob('meet*')))}"
    meet.mkdir()
    children = []
    for argv in argvs:
        code = VLAD_TRAIN_CHILD.format(here=str(HERE), argv=[str(a) for a in argv], meet=str(meet),
                                       children=len(argvs), seconds_per_forward=seconds_per_forward, kill_at=kill_at)
        children.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1")))
    return children


def vlad_left_in(*folders: Path) -> list[str]:
    """Every hidden file (a temporary or a claim) left in these trees."""
    return sorted(p.name for folder in folders for p in folder.rglob(".*") if p.is_file())


def test_two_concurrent_trains_sharing_a_token_cache_compute_each_entry_once(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=8, soft=True)
    argvs = [vlad_train_args(vlad_tiny_clip, gen, tmp_path / run, "--epochs", "1", "--extract-batch", "2")
             for run in ("a", "b")]
    children = vlad_start_trains(tmp_path, argvs, 0.3)
    outputs = [child.communicate(timeout=600) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    (computed_a, reused_a, _), (computed_b, reused_b, _) = (vlad_cache_counts(out) for out, _ in outputs)
    assert computed_a + computed_b == 10  # each of the 10 images once, by one of them
    assert computed_a > 0 and computed_b > 0  # they did overlap: each computed what the other had not claimed
    assert computed_a + reused_a == computed_b + reused_b == 10  # and waited for the other's
    assert len(list((tmp_path / "tokens").rglob("*.safetensors"))) == 10 and vlad_left_in(tmp_path / "tokens") == []
    weights_a, weights_b = (load_file(str(tmp_path / run / "vlad.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_train_killed_while_filling_the_cache_leaves_nothing_behind_the_next_run_which_equals_an_uninterrupted_one(
        vlad_tiny_clip, tmp_path, capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=4, soft=True)
    argv = vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "2", "--extract-batch", "2")
    [child] = vlad_start_trains(tmp_path, [argv], kill_at=3)  # in the second batch's first write
    child.communicate(timeout=600)
    assert child.returncode == -signal.SIGKILL
    left = vlad_left_in(tmp_path / "tokens")
    assert len(left) == 3 and all(data.is_temporary(name) for name in left)  # half an entry, two dead claims
    assert len(list((tmp_path / "tokens").rglob("[!.]*.safetensors"))) == 2
    assert vlad.main(argv) == 0  # the same command again
    assert vlad_cache_counts(capsys.readouterr().out) == (4, 2, 0)
    assert vlad_left_in(tmp_path / "tokens", tmp_path / "run") == []
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "straight", "--epochs", "2", "--cache-dir",
                                     tmp_path / "other_tokens")) == 0
    resumed, straight = (load_file(str(tmp_path / run / "train_state.safetensors")) for run in ("run", "straight"))
    torch.testing.assert_close(resumed, straight, atol=0, rtol=0)  # the README's promise: the same bits


def test_evicting_a_runs_generated_tokens_keeps_the_auxiliary_ones_for_the_next_run(vlad_tiny_clip, tmp_path,
                                                                                     capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=2, soft=True)
    aux = vlad_make_synthetic_dataset(tmp_path / "aux", categories=("tile",), n_train=2, n_good=1, n_bad=1, seed=4)
    argv = vlad_train_args(vlad_tiny_clip, gen, tmp_path / "first", "--epochs", "1", "--aux", aux,
                           "--evict-tokens", gen)
    assert vlad.main(argv) == 0
    assert vlad_cache_line(capsys) == (5, 0, 0)
    remaining = sorted(p.name for p in (tmp_path / "tokens").rglob("*.safetensors"))
    assert len(remaining) == 2  # the two auxiliary test images; the three generated ones are gone
    second = vlad_train_args(vlad_tiny_clip, gen, tmp_path / "second", "--epochs", "1", "--aux", aux)
    assert vlad.main(second) == 0
    assert vlad_cache_line(capsys) == (3, 2, 0)
    torch.testing.assert_close(load_file(str(tmp_path / "second/vlad.safetensors")),
                               load_file(str(tmp_path / "first/vlad.safetensors")), atol=0, rtol=0)


def test_token_cache_defaults_to_the_user_cache_folder_outside_the_run(vlad_tiny_clip, tmp_path, monkeypatch, capsys):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    argv = vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "0")
    argv = argv[:argv.index("--cache-dir")] + argv[argv.index("--cache-dir") + 2:]
    assert vlad.main(argv) == 0
    assert vlad_cache_line(capsys) == (2, 0, 0)
    assert len(list((tmp_path / "xdg/vlad/tokens").rglob("*.safetensors"))) == 2
    assert not list((tmp_path / "run").rglob("*.safetensors.*")) and not (tmp_path / "run/token_cache").exists()
    assert (tmp_path / "run/log.jsonl").read_text() == ""  # --epochs 0: the log it names exists, and is empty
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert vlad.default_cache_dir() == Path.home() / ".cache/vlad/tokens"


@pytest.fixture(scope="session")
def vlad_tiny_backbone(vlad_tiny_clip) -> "vlad.Backbone":
    return vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE)


def vlad_fill(backbone, samples: list, folder: Path) -> tuple[int, int]:
    """(computed, reused) of filling a disk token cache with these samples."""
    cache = vlad.TokenCache(backbone, samples, "disk", folder)
    cache.fill(progress=False)
    return cache.computed, cache.reused


@pytest.mark.parametrize("component", ["image bytes", "mask bytes", "label", "backbone weights", "stage list",
                                       "input size", "precision"])
def test_token_cache_misses_when_one_component_of_its_key_changes_alone(component, vlad_tiny_clip, vlad_tiny_backbone,
                                                                        tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=2, soft=True)
    samples = vlad.training_samples([gen], [])                 # one normal image, two anomalous with soft masks
    folder = tmp_path / "tokens"
    assert vlad_fill(vlad_tiny_backbone, samples, folder) == (3, 0)
    assert vlad_fill(vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE), samples, folder) == (0, 3)  # the same: hits
    normal = next(i for i, sample in enumerate(samples) if sample.label == 0)
    anomalous = next(sample for sample in samples if sample.label == 1)
    backbone, misses = vlad_tiny_backbone, 1
    if component == "image bytes":                            # one pixel; same path, size and mask
        pixels = np.asarray(data.load_image(anomalous.image)).copy()
        pixels[0, 0] = 255 - pixels[0, 0]
        data.save_image(pixels, anomalous.image)
    elif component == "mask bytes":                           # one pixel; same image
        mask = data.load_mask(anomalous.mask, binarize=False)
        mask[0, 0] = 1 - mask[0, 0]
        data.save_mask(mask, anomalous.mask)
    elif component == "label":                                # the normal image's bytes, no mask, labelled 1
        samples = [dataclasses.replace(s, label=1) if i == normal else s for i, s in enumerate(samples)]
    else:
        backbone, misses = {
            "backbone weights": lambda: vlad.Backbone(build_tiny_clip(tmp_path / "clip", seed=1), None, VLAD_TINY_SIZE),
            "stage list": lambda: vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE, stages=[2, 4]),
            "input size": lambda: vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE - 16),
            "precision": lambda: vlad.Backbone(vlad_tiny_clip, None, VLAD_TINY_SIZE, precision="fp16"),
        }[component](), 3
        if component == "input size":  # the positional embedding is interpolated to the size, so the weights hash
            backbone._identity = vlad_tiny_backbone.identity()  # differs too: held equal, the size alone must miss
        same = {"weights": backbone.identity() == vlad_tiny_backbone.identity(),   # fp16 hashes as fp32 does
                "stages": backbone.stages == vlad_tiny_backbone.stages,
                "size": backbone.image_size == vlad_tiny_backbone.image_size,
                "precision": backbone.precision == vlad_tiny_backbone.precision}
        assert [name for name, equal in same.items() if not equal] == \
            [{"backbone weights": "weights", "stage list": "stages", "input size": "size"}.get(component, component)]
    assert vlad_fill(backbone, samples, folder) == (misses, 3 - misses)
    assert len(list(folder.rglob("*.safetensors"))) == 3 + misses   # the old entries stay for their own key


def test_each_epoch_sees_another_order_of_the_samples_and_a_resumed_run_the_same_orders(vlad_tiny_clip, tmp_path,
                                                                                        monkeypatch):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=4, soft=True)  # 6 images
    images = sorted(str(s.image) for s in vlad.training_samples([gen], []))
    batches, feed = [], vlad.TokenCache.batches

    def recording_batches(self, index_lists):                 # what each training step is fed, in order
        for indices, batch in zip(index_lists, feed(self, index_lists)):
            batches.append([str(self.samples[i].image) for i in indices])
            yield batch

    def orders() -> list[list[str]]:                          # batch size 4: two steps per epoch
        return [batches[step] + batches[step + 1] for step in range(0, len(batches), 2)]

    monkeypatch.setattr(vlad.TokenCache, "batches", recording_batches)
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "straight", "--epochs", "3")) == 0
    straight = orders()
    assert len(straight) == 3 and all(sorted(order) == images for order in straight)  # each image once an epoch
    assert len({tuple(order) for order in straight}) == 3                             # in another order each epoch

    write_derived_files = vlad.write_derived_files

    def killed_after_epoch_1(run, adapters, config, log):
        write_derived_files(run, adapters, config, log)
        if config["epoch"] == 1:
            raise KeyboardInterrupt

    batches.clear()
    monkeypatch.setattr(vlad, "write_derived_files", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "3"))
    monkeypatch.setattr(vlad, "write_derived_files", write_derived_files)
    assert len(batches) == 2
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "resumed", "--epochs", "3", "--resume")) == 0
    assert orders() == straight                               # epochs 2 and 3 as if never interrupted


def test_fp16_memory_bank_searches_in_float32_and_matches_the_float32_bank(vlad_trained_run, tmp_path):
    generator = torch.Generator().manual_seed(3)
    queries = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=-1).half()
    expected = 1 - (queries.double() @ bank.double().T).max(dim=1).values  # exact, on the fp16-stored bank
    found = vlad.nearest_neighbour_distance(queries, bank, chunk=64)
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.double(), expected, atol=1e-6, rtol=0)

    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    common = ["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "all", "--quiet"]
    for dtype in ("fp32", "fp16"):
        assert vlad.main(common + ["--out", str(tmp_path / dtype), "--bank-dtype", dtype]) == 0
    tiffs = sorted((tmp_path / "fp32/texture/test").rglob("*.tiff"))
    assert len(tiffs) == 9
    for tiff in tiffs:
        half = data.load_tiff(tmp_path / "fp16" / tiff.relative_to(tmp_path / "fp32"))
        np.testing.assert_allclose(half, data.load_tiff(tiff), atol=5e-3)  # fp16 rounding of the bank only


def test_same_seed_gives_same_weights_and_other_seed_differs(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=3, soft=True)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / name, "--epochs", "1", "--seed", seed)) == 0
    a, b, c = (load_file(str(tmp_path / n / "vlad.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["patch_adapters.0.weight"], c["patch_adapters.0.weight"])
    vlad_assert_moved(a, vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init", "--seed", 0))


def test_loss_image_trains_only_the_image_adapter_and_loss_pixel_only_the_patch_adapters(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=4, soft=True)
    initial = vlad_untrained_weights(vlad_tiny_clip, gen, tmp_path / "init")
    assert torch.equal(initial["image_adapter.weight"], torch.eye(32)) and not initial["image_adapter.bias"].any()
    image_names = ["image_adapter.weight", "image_adapter.bias"]
    patch_names = [name for name in initial if name.startswith("patch_adapters.")]
    assert len(patch_names) == 8  # 4 stages x (weight, bias)
    trained = {}
    for terms in ("image", "pixel"):
        assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / terms, "--epochs", "2", "--loss", terms)) == 0
        trained[terms] = load_file(str(tmp_path / terms / "vlad.safetensors"))
        assert json.loads((tmp_path / terms / "config.json").read_text())["loss_terms"] == terms
    # y_img only: the patch adapters get no gradient and keep their init exactly; the image adapter learns
    assert all(torch.equal(trained["image"][name], initial[name]) for name in patch_names)
    vlad_assert_moved(trained["image"], initial, image_names)
    # y_pix only: the image adapter stays the identity (zero-shot CLIP's score); the patch adapters learn
    assert all(torch.equal(trained["pixel"][name], initial[name]) for name in image_names)
    vlad_assert_moved(trained["pixel"], initial, patch_names)


def test_aux_root_contributes_only_its_test_split_and_its_train_images_are_never_read(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=2, n_good=0, n_bad=3, soft=True)
    aux = vlad_make_synthetic_dataset(tmp_path / "aux", n_train=3, n_good=1, n_bad=2, seed=5)
    for normal in (aux / "texture/train/good").iterdir():  # reading any of them would be a "corrupt image" error
        normal.write_bytes(b"not a png")
    assert vlad.main(vlad_train_args(vlad_tiny_clip, aux, tmp_path / "aux_as_data", "--epochs", "1")) == 2
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--aux", aux, "--epochs", "1")) == 0
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["aux"] == [str(aux.resolve())]
    assert config["n_samples"] == (3 + 2) + (1 + 2)  # gen: test + train/good; aux: test (good and defects) only
    assert len(list((tmp_path / "tokens").rglob("*.safetensors"))) == 8
    without_aux = tmp_path / "without_aux"
    assert vlad.main(vlad_train_args(vlad_tiny_clip, gen, without_aux, "--epochs", "1")) == 0
    assert json.loads((without_aux / "config.json").read_text())["n_samples"] == 5
    # the aux test images reach training: the weights differ from those of a run without them
    trained, alone = load_file(str(tmp_path / "run/vlad.safetensors")), load_file(str(without_aux / "vlad.safetensors"))
    assert not torch.equal(trained["patch_adapters.0.weight"], alone["patch_adapters.0.weight"])


def test_predict_rejects_checkpoint_of_another_backbone(vlad_trained_run, tmp_path):
    other = build_tiny_clip(tmp_path / "wider", width=48)
    result = run_cli("vlad.py", "predict", "--ckpt", vlad_trained_run["run"], "--data", vlad_trained_run["held_out"],
                          "--out", tmp_path / "pred", "--model", other)
    assert result.returncode == 2
    assert "width 64" in result.stderr and "width 48" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_predict_rejects_k_larger_than_normals_and_empty_category(vlad_trained_run, tmp_path):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    for bad in ("-1", "few"):
        assert vlad.main(["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", bad,
                          "--out", str(tmp_path / "p"), "--quiet"]) == 2
    result = run_cli("vlad.py", "predict", "--ckpt", run, "--data", held_out, "--k-shot", "9", "--out", tmp_path / "p")
    assert result.returncode == 2 and "--k-shot 9" in result.stderr and "3 there are" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    (empty / "hollow/test").mkdir(parents=True)
    result = run_cli("vlad.py", "predict", "--ckpt", run, "--data", empty, "--out", tmp_path / "q")
    assert result.returncode == 2 and "hollow" in result.stderr and "no test images" in result.stderr
    result = run_cli("vlad.py", "train", "--data", empty, "--out", tmp_path / "r", "--model", "local-dir:" + str(tmp_path))
    assert result.returncode == 2 and "hollow" in result.stderr and "Traceback" not in result.stderr
    clash = vlad_make_synthetic_dataset(tmp_path / "clash", n_train=1, n_good=1, n_bad=1)
    data.save_image(np.asarray(data.load_image(clash / "texture/test/good/000.png")), clash / "texture/test/good/000.jpg")
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(clash), "--out", str(tmp_path / "t"),
                      "--quiet"]) == 2                   # 000.png and 000.jpg would share one 000.tiff
    no_normals = vlad_make_synthetic_dataset(tmp_path / "no_normals", n_train=0, n_good=1, n_bad=1)
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(no_normals), "--k-shot", "all",
                      "--out", str(tmp_path / "s"), "--quiet"]) == 2   # full-shot never silently turns zero-shot
    assert not (tmp_path / "s").exists()


def test_corrupt_image_and_unknown_model_are_one_clear_message(vlad_tiny_clip, tmp_path):
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=2)
    broken = gen / "texture/train/good/000.png"
    broken.write_bytes(broken.read_bytes()[:60])
    result = run_cli("vlad.py", *vlad_train_args(vlad_tiny_clip, gen, tmp_path / "run", "--epochs", "1"))
    assert result.returncode == 2 and "000.png" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("vlad.py", "train", "--data", gen, "--out", tmp_path / "run2", "--model", "ViT-Nope-1")
    assert result.returncode == 2 and "ViT-Nope-1" in result.stderr and "Traceback" not in result.stderr


def vlad_review_named_tiny_clip(tmp_path, name: str) -> tuple[str, str, str]:
    """The tiny CLIP registered under a plain open_clip model name (as ViT-L-14-quickgelu is), with two different
    weights files: -> (name, weights_a, weights_b)."""
    import open_clip

    folder_a = tmp_path / "clip_a"
    build_tiny_clip(folder_a, seed=0)
    build_tiny_clip(tmp_path / "clip_b", seed=1)
    model_cfg = json.loads((folder_a / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "configs")
    return name, str(folder_a / "open_clip_model.safetensors"), str(tmp_path / "clip_b/open_clip_model.safetensors")


def test_predict_backbone_flags_never_fall_back_to_random_weights(tmp_path):
    name, weights_a, weights_b = vlad_review_named_tiny_clip(tmp_path, "vlad-review-tiny")
    gen = vlad_make_synthetic_dataset(tmp_path / "gen", n_train=1, n_good=0, n_bad=1)
    run = tmp_path / "run"
    assert vlad.main(vlad_train_args(name, gen, run, "--pretrained", weights_a, "--epochs", "0")) == 0
    expected_a = load_file(weights_a)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"

    def backbone_weight(**flags):
        backbone, _, _ = vlad.load_detector(run, **flags)
        return backbone.model.state_dict()[key]

    # --model alone (the same name, e.g. to be explicit) keeps the checkpoint's weights instead of random ones
    torch.testing.assert_close(backbone_weight(model=name), expected_a[key], atol=0, rtol=0)
    torch.testing.assert_close(backbone_weight(), expected_a[key], atol=0, rtol=0)
    # --pretrained alone (the weights moved to another file) is used, not silently ignored
    moved = tmp_path / "moved" / "weights.safetensors"
    moved.parent.mkdir()
    shutil.copy(weights_a, moved)
    torch.testing.assert_close(backbone_weight(pretrained=str(moved)), expected_a[key], atol=0, rtol=0)
    # ... and other weights of the same shape are refused, not used to change every score
    with pytest.raises(data.DataError, match="other weights"):
        backbone_weight(pretrained=weights_b)


def test_half_precision_backbones_run_and_fp16_keeps_the_identity_of_fp32(vlad_trained_run, tmp_path, capsys):
    # open_clip keeps some parameters (class embedding, LayerNorms) in fp32: the compute dtype is the layers'
    model = json.loads((vlad_trained_run["run"] / "config.json").read_text())["model"]
    pixels = torch.randn(2, 3, VLAD_TINY_SIZE, VLAD_TINY_SIZE, generator=torch.Generator().manual_seed(0))
    full = vlad.Backbone(model, None, VLAD_TINY_SIZE)
    tokens, embedding = full.encode_images(pixels)
    for precision, dtype, tolerance in (("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)):
        half = vlad.Backbone(model, None, VLAD_TINY_SIZE, precision=precision)
        half_tokens, half_embedding = half.encode_images(pixels)
        assert half.dtype == half_tokens.dtype == half_embedding.dtype == dtype
        assert (half_tokens.float() - tokens).abs().max() < tolerance * tokens.abs().max()
        assert (half.identity() == full.identity()) == (precision == "fp16")  # fp16 rounds as the hash does
    common = ["predict", "--ckpt", str(vlad_trained_run["run"]), "--data", str(vlad_trained_run["held_out"]),
              "--k-shot", "1", "--quiet"]
    assert vlad.main(common + ["--out", str(tmp_path / "fp32")]) == 0
    assert vlad.main(common + ["--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 0
    for tiff in sorted((tmp_path / "fp32/texture/test").rglob("*.tiff")):
        np.testing.assert_allclose(data.load_tiff(tmp_path / "fp16" / tiff.relative_to(tmp_path / "fp32")),
                                   data.load_tiff(tiff), atol=0.05)
    capsys.readouterr()
    assert vlad.main(common + ["--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 2
    error = capsys.readouterr().err
    assert "predict with --precision fp16 or fp32" in error and len(error.strip().splitlines()) == 1


def test_predict_refuses_a_backbone_of_the_same_shape_with_other_weights_or_activation(vlad_trained_run, tmp_path,
                                                                                        capsys):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    trained_on = json.loads((run / "config.json").read_text())["model"]
    folder = Path(trained_on[len("local-dir:"):])
    copy = tmp_path / "copy"  # the same model in another folder: accepted, and it scores identically
    shutil.copytree(folder, copy)
    other_seed = build_tiny_clip(tmp_path / "other_seed", seed=5)
    gelu = tmp_path / "gelu"  # the same weights with GELU instead of QuickGELU
    shutil.copytree(folder, gelu)
    config = json.loads((gelu / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = False
    (gelu / "open_clip_config.json").write_text(json.dumps(config))
    common = ["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "1", "--quiet"]
    for model, what in ((other_seed, "other weights"), (f"local-dir:{gelu}", "other layers")):
        assert vlad.main(common + ["--out", str(tmp_path / "refused"), "--model", model]) == 2
        error = capsys.readouterr().err
        assert what in error and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
        assert not (tmp_path / "refused").exists()
    assert vlad.main(common + ["--out", str(tmp_path / "a")]) == 0
    assert vlad.main(common + ["--out", str(tmp_path / "b"), "--model", f"local-dir:{copy}"]) == 0
    assert (tmp_path / "a/texture/scores.csv").read_text() == (tmp_path / "b/texture/scores.csv").read_text()
    # the overlay's colour scale counts M_VV (at most 1 per stage) beside M_VL: 2 x 4 stages with a bank
    for tiff in sorted((tmp_path / "a/texture/test").rglob("*.tiff")):
        relative = tiff.relative_to(tmp_path / "a/texture/test")
        image = np.asarray(data.load_image(held_out / "texture/test" / relative.with_suffix(".png")))
        expected = data.overlay(image, np.clip(data.load_tiff(tiff) / 8.0, 0.0, 1.0))
        shown = np.asarray(data.load_image(tmp_path / "a/texture/overlay" / relative.with_suffix(".png")))
        np.testing.assert_array_equal(shown, expected)
    recorded = json.loads((tmp_path / "a/texture/k_shot.json").read_text())["backbone"]
    assert recorded == json.loads((run / "config.json").read_text())["backbone"]
    assert len(recorded["weights_sha256"]) == 64


def test_memory_bank_is_built_batch_by_batch_and_predictions_are_the_same_bits_for_any_batch_size_or_workers(
        vlad_trained_run, tmp_path, monkeypatch):
    run, held_out = vlad_trained_run["run"], vlad_trained_run["held_out"]
    common = ["predict", "--ckpt", str(run), "--data", str(held_out), "--k-shot", "all", "--quiet"]
    assert vlad.main(common + ["--out", str(tmp_path / "one_batch"), "--batch-size", "8", "--workers", "0"]) == 0

    seen = vlad_count_encoded_images(monkeypatch)
    workers = vlad_count_loader_workers(monkeypatch)
    assert vlad.main(common + ["--out", str(tmp_path / "batches"), "--batch-size", "2", "--workers", "2"]) == 0
    assert seen[:2] == [2, 1]  # 3 normal images: never the raw tokens of all k at once
    assert workers == [2, 2]  # the bank's 2 batches and the 5 batches of test images were decoded in workers
    tiffs = sorted((tmp_path / "one_batch/texture/test").rglob("*.tiff"))
    assert len(tiffs) == 9
    for tiff in tiffs:
        assert tiff.read_bytes() == (tmp_path / "batches" / tiff.relative_to(tmp_path / "one_batch")).read_bytes()
    for name in ("scores.csv", *(str(p.relative_to(tmp_path / "one_batch/texture"))
                                 for p in (tmp_path / "one_batch/texture/overlay").rglob("*.png"))):
        one, other = (tmp_path / "one_batch/texture" / name), (tmp_path / "batches/texture" / name)
        assert one.read_bytes() == other.read_bytes(), name


def test_memory_bank_rows_of_an_image_do_not_depend_on_its_batch_at_vit_l_width(tmp_path):
    # The tiny CLIP's 64-wide adapters round alike in any batch; 1024-wide tokens (ViT-L's) do not (measured here:
    # 4e-8 between a batch of 2 and single images, from 256 channels up), so the bank adapts image by image.
    class WideBackbone:  # 4 stages x 256 tokens x 1024 channels per image, a function of the image alone
        image_size, mean, std = 28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

        def encode_images(self, pixels):
            tokens = [torch.randn(1, 4, 256, 1024, generator=torch.Generator().manual_seed(
                hash(tuple(image[0, 0].tolist())) % 2 ** 31)) for image in pixels]
            return torch.cat(tokens), torch.zeros(len(pixels), 768)

    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        data.save_image(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), images[-1])
    backbone, adapters = WideBackbone(), vlad.VLAD(1024, 768, 4)
    banks = [vlad.collect_memory_bank(backbone, adapters, images, batch_size) for batch_size in (3, 1)]
    for i, image in enumerate(images):  # image i's rows: its own adapted tokens, computed here alone
        pixels = vlad.preprocess(data.load_image(image), 28, backbone.mean, backbone.std)[None]
        expected = adapters.patch_features(backbone.encode_images(pixels)[0])
        for stage in range(4):
            for bank in banks:
                assert torch.equal(bank[stage][i * 256:(i + 1) * 256], expected[stage][0]), (i, stage)


def test_vlad_out_that_is_a_file_is_one_sentence_before_any_model_loads(vlad_trained_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    missing_model = "local-dir:" + str(tmp_path / "no_model")  # would fail to load: the --out check comes first
    for argv in (vlad_train_args(missing_model, vlad_trained_run["gen"], taken),
                 vlad_train_args(missing_model, vlad_trained_run["gen"], tmp_path / "run") + ["--cache-dir", str(taken)],
                 ["predict", "--ckpt", str(vlad_trained_run["run"]), "--data", str(vlad_trained_run["held_out"]),
                  "--out", str(taken / "pred")]):
        assert vlad.main(argv) == 2
        error = capsys.readouterr().err
        assert "is a file" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error
        assert "open_clip" not in error
    assert taken.read_text() == "a file" and not (tmp_path / "run").exists()


def test_bad_stages_sizes_and_worker_counts_are_one_clear_message_without_traceback(vlad_trained_run, tmp_path, capsys):
    gen = vlad_trained_run["gen"]
    for stages, complaint in (("1,x", "block numbers joined by commas"), ("2,2", "each block once")):
        with pytest.raises(SystemExit) as exit_info:  # at parse time: before a model loads or a cache fills
            vlad.main(vlad_train_args("local-dir:" + str(tmp_path), gen, tmp_path / "run", "--stages", stages))
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"--stages: {complaint}" in error.replace("argument --stages", "--stages") and \
            repr(stages) in error and "Traceback" not in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "tokens").exists()
    for argv in (vlad_train_args("local-dir:" + str(tmp_path), gen, tmp_path / "run", "--batch-size", "0"),
                 vlad_train_args("local-dir:" + str(tmp_path), gen, tmp_path / "run", "--extract-batch", "0"),
                 ["predict", "--ckpt", str(vlad_trained_run["run"]), "--data", str(vlad_trained_run["held_out"]),
                  "--out", str(tmp_path / "pred"), "--chunk", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            vlad.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "at least 1" in error and "Traceback" not in error
    for argv in (vlad_train_args("local-dir:" + str(tmp_path), gen, tmp_path / "run", "--workers", "-1"),
                 ["predict", "--ckpt", str(vlad_trained_run["run"]), "--data", str(vlad_trained_run["held_out"]),
                  "--out", str(tmp_path / "pred"), "--workers", "-2"]):
        with pytest.raises(SystemExit) as exit_info:
            vlad.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "--workers: expected a whole number of at least 0" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()


# --- predict --images (photos of one's own) and index.html --------------------------------------------------

VLAD_PHOTO_MAP_SIZE = 100
# (file, source cookie, size, grayscale, upside down): JPEG photos of other shapes than the detector's input
VLAD_PHOTOS = (("cookie_wide.jpg", 1, (200, 150), False, False), ("cookie_small.jpg", 2, (96, 128), False, False),
               ("cookie_gray.jpg", 1, (160, 90), True, False), ("cookie_cracked.jpg", 2, (150, 200), False, False),
               ("cookie <b>&\"odd' #1.jpg", 1, (120, 160), False, True))


def vlad_save_photo(path: Path, cookie: int, size, gray: bool = False, flip: bool = False, crack=None) -> None:
    photo = data.load_image(HERE / "examples" / f"cookie_{cookie}.png").resize(size, Image.LANCZOS)
    photo = photo.transpose(Image.FLIP_TOP_BOTTOM) if flip else photo
    if crack is not None:
        pixels = np.asarray(photo).copy()
        pixels[crack > 0] = 25
        photo = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    (photo.convert("L") if gray else photo).save(path, quality=90)


class VladPage(html.parser.HTMLParser):
    """The parts of index.html a test checks: every card's fields, every linked file, the header's text."""

    def __init__(self, text: str):
        super().__init__()
        self.cards, self.links, self.header, self.card_tags = [], [], [], set()
        self.field, self.in_card, self.in_header = None, False, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.in_card = True
            self.cards.append({"rank": "", "score": "", "name": "", "label": "", "href": None, "src": None})
        elif tag == "header":
            self.in_header = True
        if self.in_card:
            self.card_tags.add(tag)
            self.field = attrs.get("class", "").split(" ")[0] if tag == "span" else self.field
            for key in ("href", "src"):
                if key in attrs:
                    self.cards[-1][key] = attrs[key]
        self.links += [attrs[key] for key in ("href", "src") if key in attrs]

    def handle_endtag(self, tag):
        self.field = None if tag == "span" else self.field
        self.in_card = self.in_card and tag != "figure"
        self.in_header = self.in_header and tag != "header"

    def handle_data(self, text):
        if self.in_card and self.field in ("rank", "score", "name", "label"):
            self.cards[-1][self.field] += text
        elif self.in_header:
            self.header.append(text)


@pytest.fixture(scope="session")
def vlad_photo_runs(vlad_trained_run, tmp_path_factory):
    """Real JPEG photos of other sizes than the detector's input, one grayscale, one cracked, one with markup in
    its name, scored twice by the tiny trained detector at --map-size 100 against two references: as a folder
    of photos (--images, decoded and resized in 2 DataLoader workers), and as an MVTec-layout category holding
    the same files (--data, in the main process)."""
    base = tmp_path_factory.mktemp("vlad_photos")
    crack = np.zeros((200, 150))
    crack[90:98, 30:120] = 1
    for name, cookie, size, gray, flip in VLAD_PHOTOS:
        vlad_save_photo(base / "line" / name, cookie, size, gray, flip, crack=crack if "cracked" in name else None)
    vlad_save_photo(base / "later/cookie_tiny.jpg", 2, (60, 40), flip=True)  # smaller than --map-size: as it is
    vlad_save_photo(base / "refs/good_1.jpg", 1, (120, 160))
    vlad_save_photo(base / "refs/good_2.jpg", 2, (150, 200), flip=True)
    run = vlad_trained_run["run"]
    assert vlad.main(["predict", "--ckpt", str(run), "--images", str(base / "line"), "--images",
                      str(base / "later/cookie_tiny.jpg"), "--object", "cookie", "--normals", str(base / "refs"),
                      "--map-size", str(VLAD_PHOTO_MAP_SIZE), "--out", str(base / "out"), "--quiet", "--workers", "2",
                      "--batch-size", "4"]) == 0
    bench = base / "bench/cookie"
    for photo in sorted((base / "line").iterdir()) + [base / "later/cookie_tiny.jpg"]:
        target = bench / "test" / ("crack" if "cracked" in photo.name else "good") / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    data.save_mask(crack, data.mask_path(base / "bench", "cookie", "crack", "cookie_cracked"))
    shutil.copytree(base / "refs", bench / "train/good")
    assert vlad.main(["predict", "--ckpt", str(run), "--data", str(base / "bench"), "--k-shot", "all",
                      "--map-size", str(VLAD_PHOTO_MAP_SIZE), "--out", str(base / "pred"), "--quiet", "--workers",
                      "0"]) == 0
    return {"base": base, "out": base / "out", "pred": base / "pred/cookie", "run": run}


def test_predict_images_scores_jpeg_photos_at_their_aspect_ratio_as_the_benchmark_mode_does(vlad_photo_runs,
                                                                                          tmp_path, capsys):
    base, out, pred = vlad_photo_runs["base"], vlad_photo_runs["out"], vlad_photo_runs["pred"]
    # long side 100, short side in proportion (rounded); a photo under 100 px keeps its size
    expected = {"cookie_wide": (100, 75), "cookie_small": (75, 100), "cookie_gray": (100, 56),
                "cookie_cracked": (75, 100), "cookie <b>&\"odd' #1": (75, 100), "cookie_tiny": (60, 40)}
    assert sorted(p.stem for p in (out / "maps").iterdir()) == sorted(expected)
    rows = list(csv.reader(io.StringIO((out / "scores.csv").read_text())))
    assert rows[0] == ["path", "score", "image"] and len(rows) == 1 + len(expected)
    images = {Path(image).stem: Path(image) for _, _, image in rows[1:]}
    assert images["cookie_tiny"] == (base / "later/cookie_tiny.jpg").resolve()
    assert images["cookie_wide"] == (base / "line/cookie_wide.jpg").resolve()
    scores = {Path(path).stem: float(score) for path, score, _ in rows[1:]}
    bench_scores = {Path(path).stem: score for path, score in vlad_read_scores(pred / "scores.csv").items()}
    for stem, (width, height) in expected.items():
        anomaly_map = data.load_tiff(out / "maps" / f"{stem}.tiff")
        assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32, stem
        assert Image.open(out / "overlay" / f"{stem}.png").size == (width, height), stem
        # the same photos in the MVTec layout, scored by the benchmark mode (tested against Eq. 8 and 9 above):
        # the same bits, whatever decoded them
        defect = "crack" if "cracked" in stem else "good"
        np.testing.assert_array_equal(anomaly_map, data.load_tiff(pred / "test" / defect / f"{stem}.tiff"))
        assert (out / "overlay" / f"{stem}.png").read_bytes() == \
            (pred / "overlay" / defect / f"{stem}.png").read_bytes(), stem
        assert scores[stem] == bench_scores[stem], stem
    assert len(set(scores.values())) == len(scores)  # six different photos, six different scores
    record = json.loads((out / "k_shot.json").read_text())
    assert record["k"] == 2 and record["object"] == "cookie" and record["map_size"] == VLAD_PHOTO_MAP_SIZE
    assert record["images"] == [str((base / "refs" / name).resolve()) for name in ("good_1.jpg", "good_2.jpg")]
    # without --normals: zero-shot, and the output says so
    capsys.readouterr()
    assert vlad.main(["predict", "--ckpt", str(vlad_photo_runs["run"]), "--images", str(base / "later"),
                      "--object", "cookie", "--out", str(tmp_path / "zero"), "--quiet", "--workers", "0"]) == 0
    assert "zero-shot" in capsys.readouterr().out
    assert json.loads((tmp_path / "zero/k_shot.json").read_text())["k"] == 0
    assert data.load_tiff(tmp_path / "zero/maps/cookie_tiny.tiff").shape == (40, 60)  # default --map-size 1024


def vlad_parse_index(folder: Path) -> VladPage:
    page = VladPage((folder / "index.html").read_text(encoding="utf-8"))
    for link in page.links:  # relative links to files that exist
        parts = urllib.parse.urlsplit(link)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), link
        assert (folder / urllib.parse.unquote(parts.path)).is_file(), link
    return page


def test_index_pages_show_every_image_once_in_score_order_with_existing_files_and_escaped_names(vlad_photo_runs):
    out, pred = vlad_photo_runs["out"], vlad_photo_runs["pred"]
    page = vlad_parse_index(out)
    assert page.card_tags == {"figure", "a", "img", "figcaption", "span", "br"}  # the name's <b> stayed text
    scores = {Path(image).name: float(score) for _, score, image in
              list(csv.reader(io.StringIO((out / "scores.csv").read_text())))[1:]}
    assert [card["name"] for card in page.cards] == sorted(scores, key=lambda name: -scores[name])
    assert [card["rank"] for card in page.cards] == [f"#{i}" for i in range(1, len(scores) + 1)]
    for card in page.cards:
        assert float(card["score"]) == pytest.approx(scores[card["name"]], abs=1e-4)
        assert card["href"] == card["src"] and urllib.parse.unquote(card["src"]) == \
            f"overlay/{Path(card['name']).stem}.png"
    header = " ".join(page.header)
    assert str(vlad_photo_runs["run"]) in header and "epoch 12" in header and "Made" in header
    assert "k = 2" in header and "good_1.jpg, good_2.jpg" in header
    # the benchmark mode's page: the ground-truth label of each image and the I-AUC of its labels and scores
    page = vlad_parse_index(pred)
    bench_scores = vlad_read_scores(pred / "scores.csv")
    labels = {Path(path).stem: path.split("/")[1] for path in bench_scores}
    assert [Path(card["name"]).stem for card in page.cards] == \
        sorted(labels, key=lambda stem: -bench_scores[f"test/{labels[stem]}/{stem}.tiff"])
    assert all(card["label"] == labels[Path(card["name"]).stem] for card in page.cards)
    auroc = roc_auc_score([label != "good" for label in labels.values()],
                          [bench_scores[f"test/{label}/{stem}.tiff"] for stem, label in labels.items()])
    assert f"I-AUC of these scores and labels: {100 * auroc:.1f} %" in " ".join(page.header)


def test_predict_bad_input_is_one_sentence_exit_2_and_writes_nothing(vlad_photo_runs, tmp_path, capsys):
    base, run = vlad_photo_runs["base"], vlad_photo_runs["run"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.jpg").write_text("not a photo")
    (tmp_path / "other").mkdir()
    shutil.copy(base / "later/cookie_tiny.jpg", tmp_path / "other/cookie_wide.jpg")  # another photo, the same stem
    shutil.copy(base / "line/cookie_wide.jpg", tmp_path / "copy_of_wide.jpg")  # the same photo, another name
    line, refs, bench = str(base / "line"), str(base / "refs"), str(base / "bench")
    photos = ["--images", line, "--object", "cookie"]
    for argv, fragments in (
            (["--images", str(tmp_path / "empty"), "--object", "cookie"], ["no image files found"]),
            (photos + ["--images", str(tmp_path / "notes.jpg")], ["notes.jpg", "cannot read the image"]),
            (photos + ["--images", str(tmp_path / "other")], [f"{line}/cookie_wide.jpg and "
                                                             f"{tmp_path}/other/cookie_wide.jpg", "share the name"]),
            (photos + ["--normals", f"{line}/cookie_wide.jpg"], ["both a photo to score and a normal reference"]),
            (photos + ["--normals", str(tmp_path / "copy_of_wide.jpg")], ["cookie_wide.jpg is both", "copy_of"]),
            (["--images", line, "--normals", refs], ["--images needs --object"]),
            (photos + ["--normals", refs, "--k-shot", "3"], ["--k-shot 3", "the 2 given"]),
            (["--data", bench, "--normals", refs], ["--normals applies to --images only"]),
            (["--images", line, "--category", "cookie", "--object", "cookie"], ["--category applies to --data"]),
            (["--data", bench, "--category", "../cookie"], ["'../cookie'", "inside --out"]),
            (["--data", bench, "--category", str(base / "bench/cookie")], ["inside --out"])):
        assert vlad.main(["predict", "--ckpt", str(run), "--out", str(tmp_path / "out"), "--quiet", *argv]) == 2
        error = capsys.readouterr().err
        assert all(fragment in error for fragment in fragments), (argv, error)
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
        assert not (tmp_path / "out").exists() and not (base / "out_of_bounds").exists()


def test_resuming_a_prediction_with_a_checkpoint_retrained_under_the_same_path_is_refused(vlad_trained_run,
                                                                                         tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(vlad_trained_run["run"], checkpoint)
    common = ["predict", "--ckpt", str(checkpoint), "--data", str(vlad_trained_run["held_out"]), "--k-shot", "1",
              "--out", str(tmp_path / "pred"), "--quiet", "--workers", "0"]
    assert vlad.main(common + ["--shard", "0/2"]) == 0
    original = (checkpoint / "vlad.safetensors").read_bytes()
    with safe_open(str(checkpoint / "vlad.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()  # the same epoch and config: only the weights tell the two apart
    weights = load_file(str(checkpoint / "vlad.safetensors"))
    weights["image_adapter.bias"] += 0.01
    save_file(weights, str(checkpoint / "vlad.safetensors"), metadata=metadata)
    capsys.readouterr()
    assert vlad.main(common + ["--shard", "1/2"]) == 2
    error = capsys.readouterr().err
    assert "adapters_sha256" in error and "retrained" in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "pred/texture/scores_parts/shard-1-of-2.jsonl").exists()
    (checkpoint / "vlad.safetensors").write_bytes(original)  # the detector the first half was made with
    assert vlad.main(common + ["--shard", "1/2"]) == 0
    assert len(vlad_read_scores(tmp_path / "pred/texture/scores.csv")) == 9


def test_predict_checks_every_category_before_writing_and_a_failed_start_never_blocks_another_k(vlad_trained_run,
                                                                                               tmp_path, capsys):
    run = vlad_trained_run["run"]

    def predict(root, *extra):
        capsys.readouterr()
        code = vlad.main(["predict", "--ckpt", str(run), "--data", str(root), "--out", str(tmp_path / "out"),
                          "--quiet", "--workers", "0", *extra])
        return code, capsys.readouterr().err

    root = vlad_make_synthetic_dataset(tmp_path / "root", categories=("alpha", "beta"), n_train=2, n_good=1, n_bad=1)
    broken = root / "beta/test/good/000.png"
    pixels = broken.read_bytes()
    broken.write_text("not an image")  # the second category's: found before the first is predicted
    code, error = predict(root)
    assert code == 2 and str(broken) in error and not (tmp_path / "out").exists()
    broken.write_bytes(pixels)
    hollow = root / "beta/test"
    shutil.move(hollow, tmp_path / "beta_test")
    hollow.mkdir()
    code, error = predict(root)
    assert code == 2 and "beta/test: no test images" in error and not (tmp_path / "out").exists()
    shutil.rmtree(hollow)
    shutil.move(tmp_path / "beta_test", hollow)
    # an image whose header reads but whose pixels are cut short is found when it is decoded: the start fails,
    # and once it is repaired another --k-shot into the same --out is accepted (nothing was predicted)
    cut_short = root / "alpha/test/good/000.png"
    pixels = cut_short.read_bytes()
    cut_short.write_bytes(pixels[:len(pixels) * 2 // 3])
    data.check_image(cut_short)
    code, error = predict(root, "--k-shot", "1")
    assert code == 2 and str(cut_short) in error and not vlad.score_parts(tmp_path / "out/alpha")
    cut_short.write_bytes(pixels)
    assert predict(root, "--k-shot", "2")[0] == 0
    assert json.loads((tmp_path / "out/alpha/k_shot.json").read_text())["k"] == 2
    assert predict(root, "--k-shot", "1")[0] == 2  # now it holds predictions: another k is refused


def test_train_numbers_are_checked_at_parse_time_in_one_sentence(tmp_path, capsys):
    missing_model = "local-dir:" + str(tmp_path / "no_model")  # never reached: the parser refuses first
    for flag, value, complaint in (("--epochs", "-1", "whole number of at least 0"), ("--epochs", "2.5", "whole"),
                                   ("--lr", "nan", "above 0"), ("--lr", "-1", "above 0"), ("--lr", "inf", "finite"),
                                   ("--lr", "0", "above 0"), ("--omega", "-0.5", "at least 0"),
                                   ("--focal-gamma", "nan", "at least 0"), ("--focal-alpha", "1.5", "at most 1"),
                                   ("--dice-beta", "0", "above 0"), ("--image-size", "0", "at least 1"),
                                   ("--seed", "-3", "at least 0")):
        with pytest.raises(SystemExit) as exit_info:
            vlad.main(vlad_train_args(missing_model, tmp_path / "gen", tmp_path / "run", flag, value))
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in error and complaint in error and repr(value) in error and "Traceback" not in error, error
    assert not (tmp_path / "run").exists() and not (tmp_path / "tokens").exists()
    # the boundaries themselves are values a user may mean: --epochs 0 (the untrained detector), --omega 0 (no
    # pixel terms), alpha 0 and 1
    assert vlad.number(int, 0)("0") == 0 and vlad.number(float, 0)("0") == 0.0
    assert vlad.number(float, 0, 1)("1") == 1.0 and vlad.number(float, 0, above=True)("1e-9") == 1e-9


# =========================================================================================================
# The paper's protocol end to end: reproduce.sh chains cut.py -> vlad.py train -> predict -> metrics.py
# through folders only, as subprocesses, on tiny models; one category is real photos (examples/)
# =========================================================================================================


def e2e_cookie_category(root: Path, size=(96, 128)) -> None:
    """A category of real photos: the two example cookies as normal images, one flipped as a normal test image,
    and one with a dark crack drawn across it, its mask beside it."""
    cookies = [data.load_image(HERE / "examples" / f"cookie_{i}.png").resize(size, Image.LANCZOS) for i in (1, 2)]
    for i, cookie in enumerate(cookies):
        data.save_image(cookie, root / "cookie/train/good" / f"{i:03d}.png")
    data.save_image(cookies[1].transpose(Image.FLIP_LEFT_RIGHT), root / "cookie/test/good/000.png")
    cracked = np.asarray(cookies[0]).copy()
    crack = np.zeros(cracked.shape[:2])
    crack[60:64, 25:70] = 1
    cracked[crack > 0] = 25
    data.save_image(cracked, root / "cookie/test/crack/000.png")
    data.save_mask(crack, data.mask_path(root, "cookie", "crack", "000"))


def e2e_files(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


E2E_TOKEN_CACHE_LINE = re.compile(r"^token cache (.+): (\d+) computed, (\d+) reused, 0 unreadable \(computed again\)$",
                                  re.MULTILINE)


def e2e_token_cache_lines(stdout: str) -> list[tuple[Path, int, int]]:
    """`vlad.py train`'s line per call: (cache folder, images whose tokens were computed, images reused)."""
    return [(Path(folder), int(computed), int(reused)) for folder, computed, reused in
            E2E_TOKEN_CACHE_LINE.findall(stdout)]


def e2e_test_images(root: Path) -> int:
    return sum(len(data.read_split(root, c, "test")) for c in data.list_categories(root))


def e2e_summary_rows(summary: str) -> dict[str, list[float]]:
    """The numbers of each row of a summary table that holds mean ± std cells."""
    rows = {}
    for line in summary.splitlines():
        cells = re.findall(r"(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)", line)
        if cells:
            rows.setdefault(line.split("  ")[0], [float(v) for cell in cells for v in cell])
    return rows


def test_reproduce_sh_shares_generation_across_k_refuses_changed_settings_and_summarizes_the_seeds_asked_for(
        cut_tiny_sd, vlad_tiny_clip, tmp_path):
    dataset = vlad_make_synthetic_dataset(tmp_path / "data", categories=("rough texture",), n_train=2, n_good=1,
                                          n_bad=1)                           # a category name with a space
    e2e_cookie_category(dataset)
    categories = ["cookie", "rough texture"]
    aux = vlad_make_synthetic_dataset(tmp_path / "aux", categories=("tile",), n_train=0, n_good=1, n_bad=2, seed=3)
    n_aux = e2e_test_images(aux)
    out = tmp_path / "out"
    cache = out / "token_cache"
    env = dict(os.environ, SEEDS="0", N_FEW="1", N_FULL="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               CUT_ARGS=f"--model {cut_tiny_sd} --size {CUT_SIZE} --steps 10 --gamma 0.5 --thresholds 0:0.05,2:0.5 "
                        f"--max-iters 2 --device cpu",
               TRAIN_ARGS=f"--model {vlad_tiny_clip} --image-size {VLAD_TINY_SIZE} --epochs 1 --batch-size 4 "
                          f"--device cpu --quiet",
               PREDICT_ARGS="--device cpu --quiet")
    both = dict(env, SHOTS="1 2 all")                                   # Table 1 (k = 1, 2) and Table 2
    image = dict(env, SHOTS="1", LOSS="image", DATASET="mvtec", EVICT_TOKENS="0")  # Table 4, y_img only

    def reproduce(settings: dict, status: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", str(HERE / "reproduce.sh"), str(dataset), str(aux), str(out)], env=settings,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    first = reproduce(both).stdout
    # One generation for the seed: N_FEW x 2 samples per category (the k = 1 image is one of k = 2's), not x 3;
    # then full-shot's own.
    assert [int(n) for n in re.findall(r"cut\.py: wrote (\d+) samples?", first)] == [2 * 2, 2 * 2], first
    pool = out / "seed0" / "generated"
    for category in categories:
        assert len(data.read_split(pool, category, "test")) == 2 and len(data.read_jsonl(pool / category / "meta.jsonl")) == 2
    train_good = {c: sorted(s.image for s in data.read_split(dataset, c, "train")) for c in categories}
    for k in ("1", "2", "all"):
        shot = out / f"k{k}_seed0"                  # what every LOSS shares: the k normals and their samples
        assert sorted(p.name for p in shot.iterdir()) == \
            ["generated", "loss-both", "normals_cookie.txt", "normals_rough texture.txt", "settings.json"]
        for category in categories:
            normals = (shot / f"normals_{category}.txt").read_text().splitlines()   # absolute: found from anywhere
            assert normals == [str(p.resolve()) for p in (train_good[category] if k == "all"
                                                           else data.select_k_shot(train_good[category], int(k), 0))]
            generated = shot / "generated" / category   # a complete training set of exactly the k images' samples
            assert [p.name for p in data.list_images(generated / "train/good")] == [Path(n).name for n in normals]
            samples = data.read_split(shot / "generated", category, "test")
            assert [(s.defect, s.image.name) for s in samples] == [("damaged", f"{Path(n).stem}_0.png") for n in normals]
            assert [Path(r["source"]).name for r in data.read_jsonl(generated / "meta.jsonl")] == \
                [Path(n).name for n in normals]
            files = [p for p in generated.rglob("*") if p.is_file()]
            if k == "all":                          # generated into the run's own folder, byte for byte as the seed's
                assert not any(p.is_symlink() for p in files)
                for sample in samples:
                    assert sample.image.read_bytes() == (pool / category / "test/damaged" / sample.image.name).read_bytes()
            else:                                   # links into the seed's samples, nothing else
                assert all(p.is_symlink() and pool in p.resolve().parents for p in files if p.name != "meta.jsonl")
            predictions = shot / "loss-both" / "predictions" / category
            tests = data.read_split(dataset, category, "test")
            assert len(list(predictions.rglob("*.tiff"))) == len(tests)
            assert (predictions / "scores.csv").read_text().count("\n") == len(tests) + 1
            assert json.loads((predictions / "k_shot.json").read_text())["images"] == \
                [Path(n).relative_to((dataset / category).resolve()).as_posix() for n in normals]  # the same normals
        n_normals = 2 if k == "all" else int(k)     # per category; N_FEW = N_FULL = 1 sample each
        config = json.loads((shot / "loss-both" / "model" / "config.json").read_text())
        assert config["n_samples"] == len(categories) * n_normals * 2 + n_aux   # trained on its own k images only
        result = json.loads((shot / "loss-both" / "metrics.json").read_text())
        assert all(math.isfinite(result["categories"][c][m]) for c in categories for m in metrics.METRICS)
        summary = (out / f"summary_k{k}_loss-both_seeds-0.txt").read_text()
        assert summary.splitlines()[0].startswith(f"k={k}, loss both, seeds 0: ")
        rows = e2e_summary_rows(summary)
        assert list(rows) == ["cookie", "rough texture", "mean"]
        assert all(len(values) == 10 and all(map(math.isfinite, values)) for values in rows.values()), summary
        assert summary.splitlines()[-1].startswith("paper: no row, the categories (cookie, rough texture) are neither")

    # One token cache: k = 2 reuses what k = 1 cached (its image, its sample and the auxiliary ones), so nothing
    # was evicted before the seed's last k; after it the seed's samples left, and full-shot computed its own.
    lines = e2e_token_cache_lines(first)
    assert [folder.resolve() for folder, _, _ in lines] == [cache.resolve()] * 3, first
    assert [(computed, reused) for _, computed, reused in lines] == [(4 + n_aux, 0), (4, 4 + n_aux), (8, n_aux)]
    assert len(list(cache.rglob("*.safetensors"))) == n_aux   # EVICT_TOKENS=1: the auxiliary entries stay

    # A changed N_FEW on this OUT: one sentence naming the setting and both values, before any work.
    before = e2e_files(out)
    refused = reproduce(dict(env, SHOTS="1", N_FEW="2"), status=2)
    assert refused.stderr.strip().splitlines() == [
        f"error: N_FEW='2' differs from N_FEW='1' in {out / 'k1_seed0' / 'settings.json'}, with which "
        f"{out / 'k1_seed0'} was made; set N_FEW back to continue it, or choose another output folder."]
    assert e2e_files(out) == before

    # Table 4 with another LOSS: the same samples, nothing generated; MVTec AD's row beside it.
    shared = {**e2e_files(out / "seed0"), **e2e_files(out / "k1_seed0" / "generated"),
              **e2e_files(out / "k1_seed0" / "loss-both")}
    second = reproduce(image).stdout
    assert "cut.py: wrote 0 samples, skipped 2 already complete" in second
    assert {**e2e_files(out / "seed0"), **e2e_files(out / "k1_seed0" / "generated"),
            **e2e_files(out / "k1_seed0" / "loss-both")} == shared
    assert [(computed, reused) for _, computed, reused in e2e_token_cache_lines(second)] == [(4, n_aux)]
    assert len(list(cache.rglob("*.safetensors"))) == 4 + n_aux   # EVICT_TOKENS=0: kept
    run = out / "k1_seed0" / "loss-image"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model", "predictions", "settings.json"]
    assert not (out / "kall_seed0" / "loss-image").exists() and not (out / "k2_seed0" / "loss-image").exists()
    yours = json.loads((run / "metrics.json").read_text())["mean"]          # one seed: the summary's mean
    lines = (out / "summary_k1_loss-image_seeds-0.txt").read_text().splitlines()
    paper = metrics.PAPER["mvtec", "k1-image"]
    assert metrics_row(lines, "paper mean") == [f"{mean:.1f} ± {std:.1f}" for mean, std in paper.values()]
    assert metrics_row(lines, "mean - paper") == [f"{100 * yours[m] - paper[m][0]:+.1f}" for m in metrics.METRICS]
    assert "paper: MVTec AD, k = 1 trained with y_img only (arXiv 2406.01078v1, Table 4)" in lines[-2]

    # A run of seed 7 left in OUT by an earlier call, with other numbers; then the same command again: nothing
    # generated, trained, predicted or written anywhere in OUT, and the summary still averages seed 0 alone.
    shutil.copytree(out / "k1_seed0", out / "k1_seed7", symlinks=True)
    other = json.loads((out / "k1_seed7/loss-image/metrics.json").read_text())
    other["mean"] = {m: value / 2 for m, value in other["mean"].items()}
    other["categories"] = {c: {m: v / 2 for m, v in values.items()} for c, values in other["categories"].items()}
    (out / "k1_seed7/loss-image/metrics.json").write_text(json.dumps(other))
    summaries = {p.name: p.read_text() for p in out.glob("summary_*.txt")}
    assert len(summaries) == 4
    before = e2e_files(out)
    third = reproduce(image).stdout
    assert e2e_files(out) == before
    assert {p.name: p.read_text() for p in out.glob("summary_*.txt")} == summaries
    assert "== seed=0: the runs of k = 1 with loss image are finished" in third    # no model even loaded
    assert "cut.py" not in third and "vlad.py" not in third and not e2e_token_cache_lines(third)
    assert "mean ± sample std over 1 run" in summaries["summary_k1_loss-image_seeds-0.txt"]
