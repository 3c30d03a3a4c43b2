"""The folder formats shared by cut.py, vlad.py and metrics.py.

Everything on disk is the MVTec AD layout, so generated data, real benchmarks and predictions are read by one
reader (see DESIGN.md, "The one folder format"):

    ROOT/<category>/train/good/*.png                       normal images
    ROOT/<category>/test/good/*.png                        normal test images
    ROOT/<category>/test/<defect>/*.png                    anomalous images
    ROOT/<category>/ground_truth/<defect>/<stem>_mask.png  masks, 8-bit grayscale, same size as the image

This module holds: image and mask IO that survives real files, atomic writes, the MVTec reader, the VisA
converter, k-shot selection, 8-connected region labelling of masks, sharding across processes and the two
pictures people look at (a heat-map overlay and a contact sheet).

    python data.py info ROOT                 per-category counts, to check a download at a glance
    python data.py k-shot ROOT CATEGORY K    the K normal images chosen for --seed (as vlad.py chooses them)
    python data.py visa-to-mvtec SRC DST     convert VisA's own layout into the MVTec layout
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 127  # binarize: a mask pixel is anomalous when its 8-bit value is above this (0/255 masks)


class DataError(Exception):
    """Bad input on disk: the message is one sentence that names the file and says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Reading images and masks
# ---------------------------------------------------------------------------------------------------------


def _open(path) -> Image.Image:
    """Open and fully decode an image, so a truncated file fails here and names itself."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file.")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot read the image ({error}); is the file corrupt or truncated?") from None


def load_image(path) -> Image.Image:
    """Any image file (RGB, RGBA, L, LA, P, I;16, CMYK; PNG, JPEG, TIFF, ...) as an 8-bit RGB image."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the used range to 8 bits instead of clipping everything to white.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, not the undefined colour stored under them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_mask(path, size: tuple[int, int] | None = None, binarize: bool = True) -> np.ndarray:
    """A mask as float32 (H, W) in [0, 1].

    binarize=True: 1 where the 8-bit value is above 127 (real 0/255 masks; VisA's 0/1..255 are converted to
    0/255 by `visa_to_mvtec`). binarize=False: value / 255, the anomaly probability of CUT's soft masks.
    size=(W, H) resizes: nearest neighbour when binarized, bilinear when soft.
    """
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((values > 0).astype(np.uint8) * 255, "L")
    gray = image.convert("L")
    if size is not None and gray.size != tuple(size):
        gray = gray.resize(tuple(size), Image.NEAREST if binarize else Image.BILINEAR)
    values = np.asarray(gray, dtype=np.uint8)
    if binarize:
        return (values > MASK_THRESHOLD).astype(np.float32)
    return values.astype(np.float32) / 255.0


def list_folders(folder) -> list[Path]:
    """The sub-folders of one folder, sorted by name; hidden ones (.ipynb_checkpoints, .git) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files of one folder (not recursive), sorted by name: the one listing every reader of dataset
    and prediction folders uses. Hidden files are skipped: among them the temporary file of an interrupted
    atomic write (.NAME.XXXXXXXX.tmp.png), which is not an image of the dataset."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------
# Atomic writes: a temporary name in the same folder, then os.replace, so a reader (or a re-run) never sees a
# half-written file under the final name.
# ---------------------------------------------------------------------------------------------------------


def _umask_from_proc() -> int | None:
    """The umask as Linux (>= 4.7) reports it in /proc/self/status, without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    # os.umask can only be read by setting it: process-global, and racy if another thread creates a file
    # meanwhile. Done once, at import, where /proc cannot tell.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_by_setting() if _umask_from_proc() is None else None


def current_umask() -> int:
    """The process's umask: read now where /proc can tell, else as it was when this module was imported."""
    umask = _umask_from_proc()
    return _UMASK_AT_IMPORT if umask is None else umask


TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]*)?$")  # .NAME.XXXXXXXX.tmp.SUFFIX: atomic_path's
_SWEPT: set[str] = set()  # folders whose dead temporaries this process has removed (once per folder)


def is_temporary(path) -> bool:
    """True for the temporary file of an atomic write (finished or dead), which is never part of a dataset."""
    return bool(TEMPORARY.match(Path(path).name))


def disk_full_error(folder, error: BaseException, needed: int | None = None) -> DataError | None:
    """The one sentence for a full disk (or quota), or None when `error` is something else. safetensors and
    others wrap the OS error in their own type, so the message is checked too."""
    if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) \
            and "No space left on device" not in str(error):
        return None
    try:
        free = f", {shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = ""
    need = f"{needed:,} bytes needed" if needed is not None else "more space needed"
    return DataError(f"{folder}: the disk is full ({need}{free}); free some space and run the same command "
                     f"again: finished files are kept and nothing half-written was left.")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise disk_full_error(folder, error) or error


def remove_dead_temporaries(folder, recursive: bool = False) -> int:
    """Remove the temporaries that dead writers (a kill -9, a crash, a power cut) left in `folder`; returns how
    many. A live writer holds an exclusive flock on its temporary until the rename, and the kernel drops it when
    the writer dies: a temporary this process can lock belongs to nobody. A folder that cannot be written is
    left as it is."""
    folder = Path(folder)
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder) if folder.is_dir() else [])]
    removed = 0
    for parent, _, names in walk:
        for name in names:
            path = Path(parent) / name
            if not TEMPORARY.match(name):
                continue
            try:
                handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue  # gone meanwhile (renamed by its writer), a link, or unreadable
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(handle).st_ino == os.stat(path).st_ino:
                    os.unlink(path)
                    removed += 1
            except OSError:  # locked by a live writer, renamed meanwhile, or a read-only folder
                pass
            finally:
                os.close(handle)
    return removed


def _locked_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary beside `path`, flock-ed by this process. A sweeper that removed it between its creation
    and the lock (it looked dead for those microseconds) is noticed by the inode check, and we start again."""
    while True:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(name).st_ino == os.fstat(handle).st_ino:
                return handle, Path(name)
        except FileNotFoundError:
            pass
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path, size: int | None = None):
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed.

    The writer holds a lock on the temporary until the rename, so a later run can tell a dead writer's leftover
    from a live one's file: the first write into a folder removes the dead ones (`remove_dead_temporaries`).
    A full disk is a DataError naming the folder (`size`, when the caller knows it, is the bytes needed).
    The file gets the mode a plain open() would give a new file, 0666 & ~umask (mkstemp creates it 0600,
    which would keep colleagues on a shared machine from reading a generated dataset). Write into the yielded
    path in place (open it, or save to it): a writer that renames its own file onto it would drop the lock."""
    path = Path(path)
    _make_folder(path.parent)
    if str(path.parent) not in _SWEPT:
        remove_dead_temporaries(path.parent)
        _SWEPT.add(str(path.parent))
    try:
        handle, temporary = _locked_temporary(path)
    except OSError as error:
        raise disk_full_error(path.parent, error, size) or error
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        full = disk_full_error(path.parent, error, size)
        if full is not None:
            raise full from None
        raise
    finally:
        os.close(handle)


def check_output_folder(path, flag: str = "--out") -> None:
    """DataError unless `path` is a folder this process can write in, or one it can create. Checked before any
    long work (a model load, a token cache), so a typo costs one sentence; it creates nothing (the probe file
    is removed at once), and it asks the file system itself, so it is right for root and read-only mounts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: is a file, not a folder; choose a folder.")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists is where the folder would be created
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{flag} {path}: {existing} is a file, so the folder cannot be created; choose another.")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
    except OSError as error:
        raise DataError(f"{flag} {path}: cannot write in {existing} ({error.strerror or error}); choose a folder "
                        f"you can write to.") from None
    os.close(handle)
    os.unlink(probe)


def check_output_file(path, flag: str) -> None:
    """DataError unless `path` can be written as a file: not a folder, in a folder this process can write in or
    create (`check_output_folder`). Checked before the work whose result it will hold, so a typo costs one
    sentence, not the work; it creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{flag} {path}: is a folder; give a file name.")
    check_output_folder(path.parent, f"{flag} {path}: its folder")


def save_bytes(blob: bytes, path) -> None:
    """Write bytes atomically (e.g. `safetensors.torch.save(tensors, metadata)`: written here, in place, so the
    writer's lock holds until the rename and a full disk names the bytes needed)."""
    with atomic_path(path, size=len(blob)) as temporary:
        temporary.write_bytes(blob)


def _encoded(image: Image.Image, **options) -> bytes:
    """The file's bytes, encoded in memory: PIL's encoders ignore a short write (a full disk), so an image saved
    straight to a file can be cut short without an error; Python's own write raises."""
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def save_image(image, path) -> None:
    """Save a PIL image or a uint8 array ((H, W) or (H, W, 3)) atomically; the format follows the suffix."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    save_bytes(_encoded(image, format=fmt), path)


def save_mask(mask: np.ndarray, path) -> None:
    """Save a (H, W) mask in [0, 1] as an 8-bit grayscale PNG: pixel = round(255 * probability)."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim != 2 or not np.isfinite(mask).all():
        raise ValueError(f"{path}: a mask must be a finite (H, W) array, got shape {mask.shape}")
    save_image(np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8), path)


def save_tiff(array: np.ndarray, path) -> None:
    """Save a (H, W) float map as a float32 TIFF (PIL mode "F"): exact values, readable by any TIFF reader."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{path}: an anomaly map must be (H, W), got shape {array.shape}")
    save_bytes(_encoded(Image.fromarray(np.ascontiguousarray(array), mode="F"), format="TIFF"), path)


def load_tiff(path) -> np.ndarray:
    """A float32 (H, W) anomaly map written by `save_tiff`."""
    image = _open(path)
    return np.asarray(image, dtype=np.float32).copy()


def save_text(text: str, path) -> None:
    save_bytes(text.encode("utf-8"), path)


def save_json(obj, path) -> None:
    save_text(json.dumps(obj, indent=2) + "\n", path)


def append_jsonl(obj, path) -> None:
    """Append one JSON line. A single small O_APPEND write is atomic on POSIX, so concurrent writers
    (shards) never interleave, and fsync makes the line survive a crash right after it. After a torn last line
    the record starts on a line of its own. The mode is a plain open()'s (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")
    handle = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # & ~umask, as open() does
    try:
        size = os.fstat(handle).st_size
        if size and os.pread(handle, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn last line (a kill mid-write) ends here, instead of eating this record
        if os.write(handle, line) != len(line):  # only a full disk writes part of a small line
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(handle)
    except OSError as error:  # the torn line a full disk may leave is ignored by read_jsonl, like a kill's
        raise disk_full_error(path.parent, error, len(line)) or error
    finally:
        os.close(handle)


def read_jsonl(path) -> list[dict]:
    """All complete lines of a JSON-lines file; [] when it does not exist. A torn last line (a crash mid-write)
    is ignored: it was never acknowledged."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------------------------------------------------
# The MVTec AD layout
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None  # None for good images: their mask is empty
    category: str
    defect: str  # 'good' for normal images
    label: int  # 0 good, 1 anomalous


def list_categories(root) -> list[str]:
    """The categories of an MVTec-layout root: sorted sub-folders holding a train/ or test/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder.")
    return [p.name for p in list_folders(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def mask_path(root, category: str, defect: str, stem: str) -> Path:
    return Path(root) / category / "ground_truth" / defect / f"{stem}_mask.png"


def prediction_path(sample: Sample) -> str:
    """Where a test image's anomaly map lies in a prediction tree, relative to PRED/<category>: the name both
    vlad.py writes and metrics.py reads (also the path column of scores.csv)."""
    return f"test/{sample.defect}/{sample.image.stem}.tiff"


def read_split(root, category: str, split: str) -> list[Sample]:
    """Every image of ROOT/<category>/<split>/<defect>/, good first, then defects by name.

    A defect image must have its mask: a missing one is an error, never a silent empty mask.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    categories = list_categories(root)
    if category not in categories:
        known = ", ".join(categories) or "none"
        raise DataError(f"{root}: unknown category {category!r} (categories found: {known}).")
    split_dir = root / category / split
    defects = sorted((p.name for p in list_folders(split_dir)), key=lambda d: (d != "good", d))
    samples = []
    for defect in defects:
        for image in list_images(split_dir / defect):
            if defect == "good":
                samples.append(Sample(image, None, category, defect, 0))
                continue
            mask = mask_path(root, category, defect, image.stem)
            if not mask.is_file():
                raise DataError(f"{image}: its mask {mask} is missing; every defect image needs one.")
            samples.append(Sample(image, mask, category, defect, 1))
    return samples


def select_k_shot(images: list[Path], k: int, seed: int) -> list[Path]:
    """k of the given normal images, without replacement, the same for the same seed on every machine."""
    images = sorted(Path(p) for p in images)  # independent of the order the caller listed them in
    if k < 0:
        raise DataError(f"k-shot must be at least 0, got {k}.")
    if k > len(images):
        where = images[0].parent if images else "the normal folder"
        raise DataError(f"{where}: k-shot {k} asks for more normal images than the {len(images)} there are.")
    return sorted(random.Random(seed).sample(images, k))


def parse_k_shot(text: str) -> int | None:
    """A --k-shot value: 'all' -> None (full-shot), else a whole number >= 0 (0 = zero-shot)."""
    if text == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise DataError(f"--k-shot {text!r}: expected 0 (zero-shot), a positive number, or 'all'.")
    return k


def k_shot_images(root, category: str, k: int | None, seed: int) -> list[Path]:
    """The k normal images of ROOT/<category>/train/good for a seed (None: all of them, full-shot).

    The one place both reproduce.sh (through `python data.py k-shot`) and vlad.py predict choose them, so the
    images CUT is conditioned on are the ones in VLAD's memory bank."""
    normals = [sample.image for sample in read_split(root, category, "train") if sample.label == 0]
    where = Path(root) / category / "train/good"
    if k is None and not normals:
        raise DataError(f"{where}: --k-shot all needs normal images and there are none; add them, or use "
                        f"--k-shot 0 for zero-shot.")
    k = len(normals) if k is None else k
    if k > len(normals):
        raise DataError(f"{where}: --k-shot {k} asks for more normal images than the {len(normals)} there are.")
    return select_k_shot(normals, k, seed)


# ---------------------------------------------------------------------------------------------------------
# VisA -> MVTec
# ---------------------------------------------------------------------------------------------------------


VISA_TABLE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_DEFECTS = {"normal": "good", "anomaly": "bad"}  # VisA's label, spelled as VisA writes it -> our folder
VISA_MANIFEST = "visa_to_mvtec.jsonl"  # in TARGET: which VisA file (path, size, mtime) each output came from


@dataclass(frozen=True)
class _VisaJob:
    """One output file of the conversion and the VisA file it is made from."""

    line: int  # of 1cls.csv, for messages
    source: Path
    target: str  # relative to TARGET, posix
    is_mask: bool


def _read_visa_rows(table: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped value}) of every non-empty row of 1cls.csv. DataError naming the line for a
    file that is not a UTF-8 text CSV, a missing column, or a row with too few or too many fields."""
    raw = table.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (a csv saved by a spreadsheet) is not part of the header
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{table}, line {line}: not UTF-8 text; SRC/{VISA_TABLE} must be VisA's csv.") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise DataError(f"{table}, line {line}: a NUL byte, so a binary file; SRC/{VISA_TABLE} must be VisA's csv.")
    reader = csv.reader(text.splitlines(keepends=True))
    rows = []
    try:
        header = [column.strip() for column in next(reader, [])]
        missing = [column for column in VISA_COLUMNS if column not in header]
        if missing:
            raise DataError(f"{table}, line 1: the header lacks the column(s) {', '.join(missing)}; expected "
                            f"{','.join(VISA_COLUMNS)}.")
        for row in reader:
            if not any(field.strip() for field in row):
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{table}, line {reader.line_num}: {len(row)} fields where the header has "
                                f"{len(header)} ({','.join(header)}).")
            rows.append((reader.line_num, {column: field.strip() for column, field in zip(header, row)}))
    except csv.Error as error:
        raise DataError(f"{table}, line {reader.line_num}: not a valid csv row ({error}).") from None
    if not rows:
        raise DataError(f"{table}: no rows below the header; SRC/{VISA_TABLE} must list VisA's images.")
    return rows


def _plan_visa(source: Path, table: Path) -> tuple[list[_VisaJob], dict[str, dict[str, int]]]:
    """Every row of 1cls.csv checked before anything is written -> the files to write, in csv order, and the
    per-category counts. DataError naming the csv line of the first bad row."""
    jobs: list[_VisaJob] = []
    counts: dict[str, dict[str, int]] = {}
    written_by: dict[str, int] = {}  # target -> csv line, so two rows never write one file
    for line, row in _read_visa_rows(table):
        where = f"{table}, line {line}"
        category, split, label = row["object"], row["split"], row["label"]
        if not category or category in (".", "..") or "/" in category or "\\" in category:
            raise DataError(f"{where}: object {category!r} is not a category name (a folder name).")
        if split not in ("train", "test"):
            raise DataError(f"{where}: unknown split {split!r}; VisA's splits are 'train' and 'test'.")
        if label not in VISA_DEFECTS:
            raise DataError(f"{where}: label {label!r} is neither 'normal' nor 'anomaly' (VisA's spelling, "
                            f"lower case).")
        defect = VISA_DEFECTS[label]
        if not row["image"]:
            raise DataError(f"{where}: the image column is empty.")
        image = source / row["image"]
        if not image.is_file():
            raise DataError(f"{where}: image {image} not found.")
        stem = Path(row["image"]).stem
        row_jobs = [_VisaJob(line, image, f"{category}/{split}/{defect}/{stem}.png", False)]
        if defect == "bad":
            if not row["mask"]:
                raise DataError(f"{where}: anomalous image {row['image']} has no mask (the mask column is empty).")
            mask = source / row["mask"]
            if not mask.is_file():
                raise DataError(f"{where}: mask {mask} of anomalous image {row['image']} not found.")
            row_jobs.append(_VisaJob(line, mask, mask_path(Path(), category, defect, stem).as_posix(), True))
        for job in row_jobs:
            if job.target in written_by:
                raise DataError(f"{where}: it would write {job.target}, as line {written_by[job.target]} does; "
                                f"two rows cannot share an object, split, label and file stem.")
            written_by[job.target] = line
        jobs += row_jobs
        key = f"{split}/{defect}"
        counts.setdefault(category, {}).setdefault(key, 0)
        counts[category][key] += 1
    return jobs, counts


def _inside(root: Path, relative: str) -> bool:
    """True when ROOT/relative is a file path strictly inside ROOT (no '..', not absolute)."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts


def _source_identity(path: Path) -> dict:
    """What a manifest line records of a VisA file: its resolved path, size and modification time."""
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _remove_stale_outputs(target: Path, written_before: set[str], wanted: set[str]) -> list[str]:
    """Remove what a previous conversion wrote (its manifest lists it) and this one does not write now (an image
    the csv no longer lists, or lists under another split, label or category), then the folders this empties.
    Nothing else is ever removed: a file of the user's own in TARGET stays. Returns the removed files, relative
    to TARGET."""
    removed = []
    for relative in sorted(written_before - wanted):
        file = target / relative
        if file.is_file():
            file.unlink()
            removed.append(relative)
            for folder in file.parents:  # train/good, train, the category: up to TARGET itself
                if folder == target or any(folder.iterdir()):
                    break
                folder.rmdir()
    return removed


def visa_to_mvtec(source, target, progress: bool = True) -> dict:
    """Convert VisA's own layout (split_csv/1cls.csv listing object,split,label,image,mask with paths relative
    to SOURCE) into the MVTec layout under TARGET. Masks (0 background, 1..255 anomaly) become 0/255 PNGs.
    Anomalous images all go to test/bad, as in the common VisA->MVTec conversion.

    The whole csv is checked first (fields, labels, splits, that every image and every anomalous row's mask
    exists, that no two rows write one file), so a bad row writes nothing. A re-run converges to what a fresh
    conversion of the current csv gives: a file is kept only when TARGET/visa_to_mvtec.jsonl says it was made
    from the same VisA file (path, size, mtime), the rest is rewritten, and files a previous conversion wrote
    that the csv no longer lists (under another split, label or category) are removed. Only those: the manifest
    says what the conversion wrote, a TARGET that holds files without one is refused, and a file of the user's
    own added later is never touched.

    Returns {"counts": per category {split/defect: images}, "written": files, "kept": files, "removed": files}.
    """
    source, target = Path(source), Path(target)
    table = source / VISA_TABLE
    if not table.is_file():
        raise DataError(f"{table}: not found; SRC must be the VisA root that holds {VISA_TABLE}.")
    check_output_folder(target, "DST")
    manifest = target / VISA_MANIFEST
    if target.is_dir() and not manifest.is_file() and any(p.is_file() for p in target.rglob("*")):
        raise DataError(f"DST {target}: holds files that visa-to-mvtec did not write (no {VISA_MANIFEST}); "
                        f"convert into a new or empty folder.")
    jobs, counts = _plan_visa(source, table)

    done = {record.get("target"): record for record in read_jsonl(manifest) if isinstance(record, dict)}
    ours = {t for t in done if isinstance(t, str) and _inside(target, t)}  # a manifest is data: trust no path
    removed = _remove_stale_outputs(target, ours, {job.target for job in jobs})
    if not manifest.is_file():
        save_text("", manifest)  # before the first image: an interrupted first conversion is still ours
    elif target.is_dir():
        remove_dead_temporaries(target, recursive=True)  # an interrupted run's half-written files
    try:
        from tqdm import tqdm
        jobs_iter = tqdm(jobs, desc="visa-to-mvtec", unit="file", disable=None if progress else True)
    except ImportError:  # tqdm is a dependency of the other modules; data.py alone works without it
        jobs_iter = jobs
    written = kept = 0
    records = []
    for job in jobs_iter:
        identity = {"target": job.target, **_source_identity(job.source)}
        records.append(identity)
        output = target / job.target
        if output.is_file() and done.get(job.target) == identity:
            kept += 1
            continue
        try:
            if job.is_mask:
                values = np.asarray(_open(job.source).convert("L"))
                save_image(((values > 0) * 255).astype(np.uint8), output)
            else:
                save_image(load_image(job.source), output)
        except DataError as error:
            raise DataError(f"{table}, line {job.line}: {error}") from None
        append_jsonl(identity, manifest)  # after the file: a kill in between only costs a rewrite
        written += 1
    save_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records), manifest)  # compacted
    return {"counts": counts, "written": written, "kept": kept, "removed": removed}


# ---------------------------------------------------------------------------------------------------------
# 8-connected regions of masks, labelled from scratch (metrics.py's PRO regions, cut.py's foreground)
#
# A mask row is a list of runs of mask pixels. Two runs in consecutive rows of one image touch
# (8-connectivity) when their column ranges overlap or meet at a corner. The regions are the connected
# components of the graph of touching runs, found with a vectorised union-find.
# ---------------------------------------------------------------------------------------------------------


def _mask_runs(masks):
    """masks: a stack (N, H, W) or a sequence of N masks (H_i, W_i), bool -> run_row (the row's index when the
    rows of all images are stacked, image after image), run_start, run_end (exclusive), each (R,), in raster
    order -- the order of `maps[masks]`, image by image -- and is_last_row (total rows,) bool, True on the last
    row of each image."""
    rows, starts, ends, heights = [], [], [], []
    row_offset = 0
    for mask in masks:  # image by image: as fast as one call on a stack (cache-sized), and sizes may differ
        edges = np.diff(mask, axis=1, prepend=False, append=False)  # (H_i, W_i + 1) True where a run starts/ends
        row, column = np.nonzero(edges)  # raster order: within a row, starts and ends alternate
        rows.append(row[0::2] + row_offset)
        starts.append(column[0::2])
        ends.append(column[1::2])
        heights.append(mask.shape[0])
        row_offset += mask.shape[0]
    is_last_row = np.zeros(row_offset, dtype=bool)
    heights = np.array(heights, dtype=np.int64)
    is_last_row[(np.cumsum(heights) - 1)[heights > 0]] = True
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), is_last_row
    return np.concatenate(rows), np.concatenate(starts), np.concatenate(ends), is_last_row


def _touching_runs(run_row, run_start, run_end, is_last_row, stride: int):
    """Pairs (a, b) of runs, b in the row below a in the same image, that are 8-connected. stride: more than
    the widest row (a key row * stride + column then orders runs as raster order does)."""
    start_key = run_row * stride + run_start
    end_key = run_row * stride + run_end
    row_below = (run_row + 1) * stride
    # Run b touches run a when b.end >= a.start and b.start <= a.end (ends exclusive: corners count).
    lo = np.searchsorted(end_key, row_below + run_start, side="left")
    hi = np.searchsorted(start_key, row_below + run_end, side="right")
    hi = np.where(is_last_row[run_row], lo, hi)  # the last row of an image touches nothing below
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(run_row)), count)
    b = np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return a, b


def _union_find(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each node's connected component, for the undirected edges (a, b).

    Each round hooks every root under the smallest root it touches, then compresses paths so that every node
    points at its root. Every tree with an edge to another tree merges each round: O(log n) rounds."""
    parent = np.arange(n_nodes)
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(root_a[differ], root_b[differ]),
                      np.minimum(root_a[differ], root_b[differ]))
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent


def regions_of_runs(masks):
    """masks: a stack (N, H, W) or a sequence of N masks (H_i, W_i) of any sizes, bool -> region id of each run
    (R,) numbered 0.. in raster order (image by image), run lengths (R,), number of regions. Regions never
    cross from one image into the next."""
    run_row, run_start, run_end, is_last_row = _mask_runs(masks)
    stride = max((mask.shape[1] for mask in masks), default=0) + 2
    root = _union_find(len(run_row), *_touching_runs(run_row, run_start, run_end, is_last_row, stride))
    _, region = np.unique(root, return_inverse=True)
    return region, run_end - run_start, int(region.max()) + 1 if len(region) else 0


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected regions of a mask (H, W) or of each mask of a stack (N, H, W), like
    scipy.ndimage.label with a 3x3 structure per image: int32 labels of the same shape, 0 background, regions
    numbered 1..n in raster order (across the whole stack), and n."""
    masks = np.asarray(masks) > 0.5
    stack = masks.reshape((-1,) + masks.shape[-2:])
    region, run_length, n_regions = regions_of_runs(stack)
    labels = np.zeros(stack.shape, dtype=np.int32)
    labels[stack] = np.repeat(region + 1, run_length)
    return labels.reshape(masks.shape), n_regions


# ---------------------------------------------------------------------------------------------------------
# Sharding across processes (torchrun or by hand)
# ---------------------------------------------------------------------------------------------------------


def resolve_shard(shard: str | None = None) -> tuple[int, int]:
    """(rank, world size): from '--shard i/n', else torchrun's RANK and WORLD_SIZE, else (0, 1)."""
    if shard:
        try:
            rank_text, world_text = shard.split("/")
            rank, world = int(rank_text), int(world_text)
        except ValueError:
            raise DataError(f"--shard {shard!r}: expected i/n, e.g. 0/4.") from None
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"shard {rank}/{world}: need 0 <= i < n.")
    return rank, world


def shard_jobs(jobs: list, rank: int, world: int) -> list:
    """Every world-th job starting at rank: shards are disjoint and together are all jobs."""
    return list(jobs)[rank::world]


# ---------------------------------------------------------------------------------------------------------
# Pictures people look at
# ---------------------------------------------------------------------------------------------------------


def _jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map, (H, W) in [0, 1] -> (H, W, 3) in [0, 1]: blue, cyan, yellow, red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue peak positions
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over an image: (H, W, 3) uint8 and (H, W) in [0, 1] -> (H, W, 3) uint8."""
    image = np.asarray(image)
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0)
    if heat.shape != image.shape[:2]:
        heat_image = Image.fromarray(heat.astype(np.float32), mode="F")
        heat = np.asarray(heat_image.resize((image.shape[1], image.shape[0]), Image.BILINEAR), dtype=np.float64)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * 255.0 * _jet(heat)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(rows: list[list[np.ndarray]], cell: int = 256, labels: list[str] | None = None) -> np.ndarray:
    """A grid of uint8 RGB tiles, each resized to cell x cell; optional column labels on a strip at the top."""
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    columns = max(len(row) for row in rows)
    pad = 4
    top = 20 if labels else 0
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, top + len(rows) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels or []):
        draw.text((pad + c * (cell + pad) + 4, 4), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            tile_image = Image.fromarray(np.asarray(tile, dtype=np.uint8)).convert("RGB").resize((cell, cell))
            sheet.paste(tile_image, (pad + c * (cell + pad), top + pad + r * (cell + pad)))
    return np.asarray(sheet)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def describe(root) -> list[dict]:
    """Per-category counts of an MVTec-layout root (what `python data.py info` prints)."""
    rows = []
    for category in list_categories(root):
        train = read_split(root, category, "train")
        test = read_split(root, category, "test")
        defects: dict[str, int] = {}
        for sample in test:
            if sample.label:
                defects[sample.defect] = defects.get(sample.defect, 0) + 1
        rows.append({
            "category": category,
            "train_good": sum(s.label == 0 for s in train),
            "test_good": sum(s.label == 0 for s in test),
            "test_anomalous": sum(defects.values()),
            "masks": sum(s.mask is not None for s in test),
            "defects": defects,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="per-category counts of an MVTec-layout root")
    info.add_argument("root", help="dataset root, e.g. mvtec_anomaly_detection/")
    shots = commands.add_parser("k-shot", help="print the k normal images of a category chosen for a seed")
    shots.add_argument("root", help="MVTec-layout root")
    shots.add_argument("category")
    shots.add_argument("k", help="number of normal images, or 'all'")
    shots.add_argument("--seed", type=int, default=0)
    convert = commands.add_parser("visa-to-mvtec", help="convert VisA's layout into the MVTec layout")
    convert.add_argument("source", help="VisA root (holds split_csv/1cls.csv)")
    convert.add_argument("target", help="output MVTec-layout root")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            rows = describe(args.root)
            if not rows:
                raise DataError(f"{args.root}: no category folders with train/ or test/ inside.")
            print(f"{'category':<16}{'train/good':>11}{'test/good':>10}{'test/anom':>10}{'masks':>7}  defects")
            for row in rows:
                defects = ", ".join(f"{name} {count}" for name, count in row["defects"].items()) or "-"
                print(f"{row['category']:<16}{row['train_good']:>11}{row['test_good']:>10}"
                      f"{row['test_anomalous']:>10}{row['masks']:>7}  {defects}")
        elif args.command == "k-shot":
            print("\n".join(map(str, k_shot_images(args.root, args.category, parse_k_shot(args.k), args.seed))))
        else:
            result = visa_to_mvtec(args.source, args.target)
            total = sum(sum(c.values()) for c in result["counts"].values())
            print(f"converted {total} images of {len(result['counts'])} categories to {args.target}: "
                  f"{result['written']} files written, {result['kept']} kept from a previous run"
                  + (f", {len(result['removed'])} removed that the csv no longer lists (e.g. "
                     f"{result['removed'][0]})" if result["removed"] else ""))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
