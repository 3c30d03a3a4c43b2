"""The five numbers of the paper (Sec. 5.1): I-AUC, I-F1, P-AUC, P-F1 and PRO, exact, from scratch in numpy.

    python metrics.py --pred PRED --gt ROOT [--json FILE] [--categories bottle cable ...]
    python metrics.py --summarize RUN1.json RUN2.json ...      mean +- std over runs (few-shot seeds)
    python metrics.py --summarize RUN*.json --paper mvtec:k1   ... with the paper's row and yours - paper

- I-AUC / P-AUC: area under the ROC curve of the image scores / of all pixels. Equal scores form one step of
  the curve (a tie between a normal and an anomalous sample counts one half), never split by sort order.
- I-F1 / P-F1: the maximum over all thresholds of F1 = 2PR / (P + R), a sample being positive when its score
  is >= the threshold.
- PRO: the MVTec AD protocol. Regions are the 8-connected components of each ground-truth mask (labelled from
  scratch by `data.label_regions`). At each threshold, FPR = fraction of all normal pixels of all images above
  it and PRO = mean over all regions of all images of the fraction of the region above it. The PRO-FPR curve,
  with a vertex at every distinct score, is integrated with the trapezoid rule up to FPR 0.3 (interpolated
  there) and divided by 0.3.

Exact and fast: the pixel metrics sort the normal pixels once (a float32 copy, the only full-size one) and
argsort only the anomalous pixels, which are few. P-AUC, P-F1 and the whole PRO curve then follow from counting
normal pixels below each distinct anomalous score (`np.searchsorted`); no threshold grid, no float64 copy of
the pixels, no loop over thresholds.

Prediction tree (written by `vlad.py predict`, read by the CLI):

    PRED/<category>/test/<defect>/<stem>.tiff   float32 anomaly map (PIL mode "F"), one per test image, each at
                                                its own size (images of one category may differ in size)
    PRED/<category>/scores.csv                  header `path,score`; path = `test/<defect>/<stem>.tiff`

JSON written by --json (values are fractions in [0, 1]; null where a metric is undefined):

    {"metrics": ["I-AUC", "I-F1", "P-AUC", "P-F1", "PRO"],
     "categories": {"bottle": {"I-AUC": 0.99, "I-F1": 0.97, "P-AUC": 0.98, "P-F1": 0.71, "PRO": 0.93}, ...},
     "mean": {"I-AUC": ..., ...},       # over the categories where the metric is defined
     "info": {"bottle": {"images": 83, "anomalous": 63, "map_size": [256, 256], "map_sizes": [[256, 256]],
                         "masks_resized": 0, "first_mask_resized": null}, ...},
                                        # map_size: [W, H] when every map has one size, else null
     "pred": "PRED", "gt": "ROOT"}

--summarize --json writes {"runs", "categories", "mean"} with {"mean", "std", "n"} per metric, fractions too; with
--paper, also "paper": the paper's numbers (PAPER below, published in %) and yours - paper, as fractions.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

import data

METRICS = ("I-AUC", "I-F1", "P-AUC", "P-F1", "PRO")  # the column order of the paper's tables
FPR_LIMIT = 0.3  # MVTec AD protocol: the PRO curve is integrated up to a false-positive rate of 30 %
SCORES_CSV = "scores.csv"


# ---------------------------------------------------------------------------------------------------------
# Curves from two sorted score arrays
#
# Every metric below is a function of, for each distinct anomalous score v: how many anomalous scores are
# >= v, and how many normal scores are < v and <= v. Thresholds between two anomalous scores only add false
# positives, so these steps are all the curves need.
# ---------------------------------------------------------------------------------------------------------


class _Steps(NamedTuple):
    """What every curve needs, per distinct anomalous score v_k (ascending, k = 0..m-1)."""

    n_neg: int
    n_pos: int
    first: np.ndarray  # (m,) index of v_k's first occurrence among the sorted anomalous scores
    below: np.ndarray  # (m,) normal scores < v_k
    not_above: np.ndarray  # (m,) normal scores <= v_k


def _steps(negative: np.ndarray, positive: np.ndarray) -> _Steps:
    """negative (n_neg,) and positive (n_pos,) sorted ascending -> their _Steps, by binary search."""
    is_first = np.ones(len(positive), dtype=bool)  # (n_pos,) True where a run of equal scores starts
    is_first[1:] = positive[1:] != positive[:-1]
    first = np.flatnonzero(is_first)
    values = positive[first]
    return _Steps(len(negative), len(positive), first, np.searchsorted(negative, values, side="left"),
                  np.searchsorted(negative, values, side="right"))


def _auroc_steps(steps: _Steps) -> float | None:
    """Mann-Whitney: P(anomalous > normal) + P(tie) / 2, i.e. the area under the ROC curve with ties as one
    diagonal step. None when one class is empty."""
    if steps.n_neg == 0 or steps.n_pos == 0:
        return None
    ties = np.diff(steps.first, append=steps.n_pos)  # (m,) anomalous samples sharing each distinct score
    twice_wins = int(np.dot(ties, steps.below + steps.not_above))  # exact integer count
    return twice_wins / (2 * steps.n_neg * steps.n_pos)


def _max_f1_steps(steps: _Steps) -> float | None:
    """max over thresholds of F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + n_pos). The maximum is at a
    threshold equal to an anomalous score: raising any other threshold to the next anomalous score keeps TP and
    drops false positives. None without anomalous samples."""
    if steps.n_pos == 0:
        return None
    true_positives = steps.n_pos - steps.first  # anomalous scores >= v_k
    false_positives = steps.n_neg - steps.below  # normal scores >= v_k
    return float(np.max(2.0 * true_positives / (true_positives + false_positives + steps.n_pos)))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, from x[0] to x_max; the last segment is cut
    at x_max with y interpolated linearly (as the MVTec AD reference does)."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    x1_cut = np.minimum(x1, x_max)
    width = x1_cut - np.minimum(x0, x_max)  # 0 for segments past x_max and for vertical segments
    slope = np.divide(y1 - y0, x1 - x0, out=np.zeros_like(y0), where=x1 > x0)
    y1_cut = y0 + slope * (x1_cut - x0)
    return float(np.sum(width * (y0 + y1_cut)) / 2.0)


def _au_pro_steps(steps: _Steps, weight: np.ndarray, fpr_limit: float) -> float | None:
    """Normalized area under the PRO-FPR curve up to fpr_limit.

    weight (n_pos,), aligned with the sorted anomalous scores: 1 / (n_regions * size of the pixel's region),
    so PRO(t) = sum of the weights of anomalous pixels >= t, and FPR(t) = (normal pixels >= t) / n_neg.
    Walking the threshold down from +inf, the curve has, per distinct anomalous score v (descending):
      a horizontal run to FPR(just above v) = (normal > v) / n_neg at the previous PRO, then
      one segment to (FPR(v), PRO(v)) = ((normal >= v) / n_neg, PRO(v)) -- diagonal when normals tie with v,
    and ends with a horizontal run to (1, 1). Thresholds at normal scores only add collinear vertices.
    None without both anomalous and normal pixels.
    """
    n_neg = steps.n_neg
    if n_neg == 0 or steps.n_pos == 0:
        return None
    pro = np.cumsum(weight[::-1])[::-1][steps.first]  # (m,) anomalous weight >= v_k
    # From here on the thresholds v descend, as the curve is drawn.
    pro = pro[::-1]
    fpr_above = (n_neg - steps.not_above[::-1]) / n_neg  # normal pixels > v
    fpr_at = (n_neg - steps.below[::-1]) / n_neg  # normal pixels >= v
    pro_before = np.concatenate(([0.0], pro[:-1]))
    x = np.concatenate(([0.0], np.stack([fpr_above, fpr_at], axis=1).ravel(), [1.0]))
    y = np.concatenate(([0.0], np.stack([pro_before, pro], axis=1).ravel(), [pro[-1]]))
    return _area_up_to(x, y, fpr_limit) / fpr_limit


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size")
    negative, positive = scores[~labels], scores[labels]  # copies, sorted in place
    negative.sort()
    positive.sort()
    _check_finite_sorted(negative, positive)
    return negative, positive


def _check_finite_sorted(*sorted_arrays: np.ndarray) -> None:
    # NaN sorts last and -inf / +inf sort to the ends: checking both ends checks every score, at no cost.
    for array in sorted_arrays:
        if len(array) and not (np.isfinite(array[0]) and np.isfinite(array[-1])):
            raise ValueError("scores contain NaN or inf")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exact, ties as one step. scores (N,), labels (N,) 0 normal / 1 anomalous."""
    value = _auroc_steps(_steps(*_split_sorted(scores, labels)))
    if value is None:
        raise ValueError("AUROC is undefined when all labels are one class")
    return value


def max_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """The maximum F1 over all thresholds (positive when score >= threshold). scores (N,), labels (N,)."""
    value = _max_f1_steps(_steps(*_split_sorted(scores, labels)))
    if value is None:
        raise ValueError("F1 is undefined without anomalous samples")
    return value


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def _per_image(anomaly_maps, gt_masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps and masks as two lists of N (H_i, W_i) arrays, masks bool; views of a stack, never a copy of the
    maps. ValueError naming the first image whose map and mask differ in size."""
    if isinstance(anomaly_maps, np.ndarray) and isinstance(gt_masks, np.ndarray):
        if anomaly_maps.shape != gt_masks.shape or anomaly_maps.ndim != 3:
            raise ValueError(f"maps {anomaly_maps.shape} and masks {gt_masks.shape} must both be (N, H, W), or "
                             f"be sequences of N (H_i, W_i) arrays")
        gt_masks = gt_masks if gt_masks.dtype == bool else gt_masks > 0.5
        return list(anomaly_maps), list(gt_masks)
    maps, masks = [np.asarray(m) for m in anomaly_maps], [np.asarray(m) for m in gt_masks]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks; give one mask per map")
    for i, (anomaly_map, mask) in enumerate(zip(maps, masks)):
        if anomaly_map.ndim != 2 or anomaly_map.shape != mask.shape:
            raise ValueError(f"image {i}: map {anomaly_map.shape} and mask {mask.shape} must both be (H, W), "
                             f"the same size")
    return maps, [m if m.dtype == bool else m > 0.5 for m in masks]


def pixel_metrics(anomaly_maps, gt_masks, fpr_limit: float = FPR_LIMIT) -> dict:
    """P-AUC, P-F1 and PRO of a set of maps against binary masks (bool, 0/1 or 0/255), from one sort. Either
    two stacks (N, H, W), or two sequences of N arrays (H_i, W_i) whose sizes may differ from image to image
    (the protocol pools pixels over images and labels regions per image: nothing needs one size). A metric
    that is undefined (no anomalous pixel; no normal pixel for P-AUC and PRO) is None.

    Memory: the maps' normal pixels once (sorted in place), plus a few arrays per anomalous pixel."""
    maps, masks = _per_image(anomaly_maps, gt_masks)
    region, run_length, n_regions = data.regions_of_runs(masks)
    # PRO's weight per anomalous pixel, in raster order: 1 / (n_regions * size of its region).
    region_size = np.bincount(region, weights=run_length, minlength=n_regions)  # (n_regions,)
    pixel_weight = np.repeat(1.0 / (n_regions * region_size[region]), run_length) if n_regions else np.zeros(0)

    dtype = np.result_type(*{m.dtype for m in maps}) if maps else np.float32  # the maps' own (float32)
    positive = np.concatenate([m[k] for m, k in zip(maps, masks)]) if maps else np.zeros(0, dtype)  # (n_pos,)
    order = np.argsort(positive)  # tied scores may come in any order: their weights are summed together
    positive, pixel_weight = positive[order], pixel_weight[order]
    del order
    negative = np.empty(sum(k.size for k in masks) - len(positive), dtype=dtype)  # (n_neg,) the one full copy
    filled = 0
    for anomaly_map, mask in zip(maps, masks):  # image by image, so no full-size temporary besides `negative`
        normal = anomaly_map[~mask]
        negative[filled:filled + len(normal)] = normal
        filled += len(normal)
    negative.sort()
    _check_finite_sorted(negative, positive)
    steps = _steps(negative, positive)
    return {"P-AUC": _auroc_steps(steps), "P-F1": _max_f1_steps(steps),
            "PRO": _au_pro_steps(steps, pixel_weight, fpr_limit)}


def au_pro(anomaly_maps, gt_masks, fpr_limit: float = FPR_LIMIT) -> float:
    """Normalized area under the PRO curve up to fpr_limit (MVTec AD protocol). maps and masks (N, H, W), or
    sequences of N (H_i, W_i) arrays as `pixel_metrics` takes them."""
    value = pixel_metrics(anomaly_maps, gt_masks, fpr_limit)["PRO"]
    if value is None:
        raise ValueError("AU-PRO is undefined without both anomalous and normal pixels")
    return value


def image_metrics(image_scores: np.ndarray, image_labels: np.ndarray) -> dict:
    """I-AUC and I-F1 of image scores (N,) against labels (N,); None where undefined (one class only)."""
    steps = _steps(*_split_sorted(image_scores, image_labels))
    return {"I-AUC": _auroc_steps(steps), "I-F1": _max_f1_steps(steps)}


def evaluate_category(image_scores: np.ndarray, image_labels: np.ndarray, anomaly_maps, gt_masks,
                      fpr_limit: float = FPR_LIMIT) -> dict:
    """The paper's five numbers for one category, as fractions in [0, 1] (None where undefined):
    image scores (N,), image labels (N,), anomaly maps and ground-truth masks (N, H, W), or sequences of N
    (H_i, W_i) arrays for images of different sizes."""
    return {**image_metrics(image_scores, image_labels), **pixel_metrics(anomaly_maps, gt_masks, fpr_limit)}


def mean_over_categories(results: dict[str, dict]) -> dict:
    """Per metric, the mean over the categories where it is defined (None when it is defined nowhere)."""
    mean = {}
    for metric in METRICS:
        values = [r[metric] for r in results.values() if r.get(metric) is not None]
        mean[metric] = float(np.mean(values)) if values else None
    return mean


# ---------------------------------------------------------------------------------------------------------
# Reading a prediction tree against an MVTec-layout ground truth
# ---------------------------------------------------------------------------------------------------------


def read_scores_csv(path: Path) -> dict[str, float]:
    """scores.csv -> {relative tiff path: image score}; DataError naming the file and line on any bad row."""
    if not path.is_file():
        raise data.DataError(f"{path}: missing; the image scores of a category go in scores.csv (path,score).")
    scores: dict[str, float] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's byte-order mark is no header
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["path", "score"]:
            raise data.DataError(f"{path}: the first line must be the header 'path,score'.")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                relative, score = row[0].strip(), float(row[1])
            except (IndexError, ValueError):
                raise data.DataError(f"{path}, line {line}: expected 'path,score', got {','.join(row)!r}.") \
                    from None
            if not math.isfinite(score):
                raise data.DataError(f"{path}, line {line}: the score of {relative} is {score}; scores must be "
                                     f"finite.")
            if relative in scores:
                raise data.DataError(f"{path}, line {line}: {relative} is listed twice.")
            scores[relative] = score
    return scores


def load_category(pred_root: Path, gt_root: Path, category: str):
    """Read one category's predictions and ground truth.

    Returns image scores (N,) float64, labels (N,) int, maps: N float32 (H_i, W_i), masks: N bool (H_i, W_i) of
    the same sizes, and an info dict. Each map keeps its own size (vlad.py writes each at its image's size); a
    mask of another size than its map is resized to it. Every mismatch between the two trees is a DataError
    naming the file."""
    samples = data.read_split(gt_root, category, "test")
    if not samples:
        raise data.DataError(f"{gt_root / category / 'test'}: category {category!r} has no test images.")
    pred_dir = pred_root / category
    expected = {data.prediction_path(s): s for s in samples}  # the prediction of each image
    if len(expected) < len(samples):
        raise data.DataError(f"{gt_root / category / 'test'}: two test images of one defect share a file name "
                             f"stem, so their predictions would share one .tiff; rename one.")
    found = {p.relative_to(pred_dir).as_posix() for defect in data.list_folders(pred_dir / "test")
             for p in data.list_images(defect, (".tiff",))}  # never an interrupted write's hidden temporary
    extra = sorted(found - expected.keys())
    if extra:
        raise data.DataError(f"{pred_dir / extra[0]}: prediction without a ground-truth image in "
                             f"{gt_root / category / 'test'} ({len(extra)} such maps).")
    missing = [relative for relative in expected if relative not in found]
    if missing:
        raise data.DataError(f"{expected[missing[0]].image}: no prediction; expected {pred_dir / missing[0]} "
                             f"({len(missing)} test images without a map).")
    scores_path = pred_dir / SCORES_CSV
    scores = read_scores_csv(scores_path)
    extra = sorted(scores.keys() - expected.keys())
    if extra:
        raise data.DataError(f"{scores_path}: {extra[0]} has no ground-truth image in {gt_root / category} "
                             f"({len(extra)} such rows).")
    missing = [relative for relative in expected if relative not in scores]
    if missing:
        raise data.DataError(f"{scores_path}: no score for {missing[0]} ({len(missing)} test images without a "
                             f"score).")

    maps, masks, resized = [], [], []
    items = list(expected.items())
    try:
        from tqdm import tqdm
        items = tqdm(items, desc=category, unit="img", leave=False, disable=None)  # bar on a terminal only
    except ImportError:
        pass
    for relative, sample in items:
        tiff = pred_dir / relative
        anomaly_map = data.load_tiff(tiff)
        if anomaly_map.ndim != 2:
            raise data.DataError(f"{tiff}: an anomaly map must be one (H, W) channel, got shape "
                                 f"{anomaly_map.shape}.")
        if not np.isfinite(anomaly_map).all():
            raise data.DataError(f"{tiff}: the map contains NaN or inf.")
        maps.append(anomaly_map)  # (H_i, W_i): each map at its own image's size
        map_size = (anomaly_map.shape[1], anomaly_map.shape[0])  # (W, H)
        if sample.mask is None:
            masks.append(np.zeros(anomaly_map.shape, dtype=bool))
            continue
        masks.append(data.load_mask(sample.mask, size=map_size) > 0.5)  # nearest neighbour if sizes differ
        with Image.open(sample.mask) as header:  # reads the header only
            if header.size != map_size:
                resized.append(f"{sample.mask} {header.size[0]}x{header.size[1]} -> {tiff.name} "
                               f"{map_size[0]}x{map_size[1]}")
    labels = np.array([s.label for s in expected.values()])
    image_scores = np.array([scores[relative] for relative in expected])
    sizes = list(dict.fromkeys((m.shape[1], m.shape[0]) for m in maps))  # distinct (W, H), first seen first
    info = {"images": len(samples), "anomalous": int(labels.sum()),
            "map_size": list(sizes[0]) if len(sizes) == 1 else None, "map_sizes": [list(s) for s in sizes],
            "masks_resized": len(resized), "first_mask_resized": resized[0] if resized else None}
    return image_scores, labels, maps, masks, info


def prediction_categories(pred_root: Path) -> list[str]:
    """The categories of a prediction tree: sub-folders holding scores.csv or test/."""
    if not pred_root.is_dir():
        raise data.DataError(f"{pred_root}: no such prediction folder.")
    return [p.name for p in data.list_folders(pred_root) if (p / SCORES_CSV).is_file() or (p / "test").is_dir()]


# ---------------------------------------------------------------------------------------------------------
# The paper's published numbers (arXiv 2406.01078v1), printed beside a reproduction by --summarize --paper
# ---------------------------------------------------------------------------------------------------------

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")  # as `data.py visa-to-mvtec` names them: VisA's own folder names
DATASETS = {"mvtec": ("MVTec AD", MVTEC_CATEGORIES), "visa": ("VisA", VISA_CATEGORIES)}

# setting -> (what was run, where the paper reports it)
PAPER_SETTINGS = {"k1": ("k = 1", "Table 1"), "k2": ("k = 2", "Table 1"), "k4": ("k = 4", "Table 1"),
                  "all": ("full-shot", "Table 2"), "k1-image": ("k = 1 trained with y_img only", "Table 4"),
                  "k1-pixel": ("k = 1 trained with y_pix only", "Table 4")}

# (dataset, setting) -> metric -> (mean, std or None) in %, VLAD trained on CUT's samples: mean ± std over 5
# seeds, except full-shot (one run, no std). Table 4's row "both" is Table 1's k = 1.
PAPER = {key: dict(zip(METRICS, row)) for key, row in {
    #                      I-AUC        I-F1         P-AUC        P-F1         PRO
    ("mvtec", "k1"):       [(94.9, 0.4), (94.7, 0.4), (95.4, 0.2), (57.3, 0.0), (91.9, 0.0)],
    ("mvtec", "k2"):       [(95.8, 0.2), (95.2, 0.2), (96.0, 0.2), (58.8, 0.2), (92.6, 0.1)],
    ("mvtec", "k4"):       [(96.4, 0.1), (95.1, 0.1), (96.2, 0.1), (59.8, 0.1), (93.0, 0.0)],
    ("mvtec", "all"):      [(98.4, None), (96.9, None), (97.4, None), (65.1, None), (94.7, None)],
    ("mvtec", "k1-image"): [(94.0, 0.2), (94.2, 0.3), (95.0, 0.1), (55.8, 0.4), (91.7, 0.1)],
    ("mvtec", "k1-pixel"): [(93.4, 0.6), (93.8, 0.3), (95.4, 0.0), (57.0, 0.2), (92.0, 0.0)],
    ("visa", "k1"):        [(89.7, 0.8), (85.8, 0.5), (97.7, 0.4), (43.2, 0.4), (92.5, 0.1)],
    ("visa", "k2"):        [(91.3, 0.4), (87.2, 0.6), (97.9, 0.4), (44.9, 0.3), (92.7, 0.1)],
    ("visa", "k4"):        [(91.7, 1.0), (87.1, 0.1), (97.8, 0.4), (47.9, 0.2), (93.4, 0.1)],
    ("visa", "all"):       [(95.8, None), (91.9, None), (98.7, None), (58.7, None), (97.7, None)],
    ("visa", "k1-image"):  [(87.3, 0.6), (83.5, 0.5), (97.5, 0.1), (42.1, 1.1), (92.7, 0.3)],
    ("visa", "k1-pixel"):  [(85.7, 1.1), (82.4, 1.0), (97.7, 0.1), (42.8, 1.0), (92.9, 0.2)],
}.items()}

# Per category, where we have the paper's Table 6 (an excerpt: MVTec AD, k = 1), same units.
PAPER_CATEGORIES = {("mvtec", "k1"): {name: dict(zip(METRICS, row)) for name, row in {
    "bottle":     [(98.9, 0.1), (97.9, 0.5), (96.3, 0.0), (71.0, 0.2), (92.7, 0.0)],
    "carpet":     [(100.0, 0.0), (100.0, 0.0), (99.0, 0.0), (75.1, 0.1), (97.5, 0.0)],
    "screw":      [(74.9, 3.1), (87.2, 1.3), (97.8, 0.0), (42.5, 0.3), (92.3, 0.0)],
    "transistor": [(91.4, 2.1), (80.7, 4.4), (79.6, 0.0), (37.1, 0.2), (64.0, 0.2)],
}.items()}}


def parse_paper(text: str) -> tuple[str, str]:
    """'DATASET:SETTING' (e.g. mvtec:k1, visa:all, auto:k1-image) -> (dataset, setting); DataError otherwise."""
    dataset, _, setting = text.partition(":")
    if dataset not in (*DATASETS, "auto") or setting not in PAPER_SETTINGS:
        raise data.DataError(f"--paper {text!r}: expected DATASET:SETTING with DATASET one of "
                             f"{', '.join((*DATASETS, 'auto'))} and SETTING one of {', '.join(PAPER_SETTINGS)}, "
                             f"e.g. mvtec:k1.")
    return dataset, setting


def detect_dataset(categories) -> str | None:
    """The benchmark whose categories these all are ('mvtec' or 'visa'), None when neither's."""
    for dataset, (_, known) in DATASETS.items():
        if set(categories) <= set(known):
            return dataset
    return None


def compare_with_paper(summary: dict, dataset: str, setting: str) -> dict:
    """The paper's rows for (dataset, setting) beside a summary (as `summarize` returns it): for the mean and
    each category the paper lists, the paper's {"mean", "std"} and the difference yours - paper of the means
    (None where yours is undefined). Fractions, as everywhere in this module; PAPER itself is in %."""
    rows = {"mean": (summary["mean"], PAPER[dataset, setting])}
    listed = PAPER_CATEGORIES.get((dataset, setting), {})
    rows.update({name: (summary["categories"][name], listed[name]) for name in summary["categories"] if name in listed})
    comparison = {"dataset": dataset, "setting": setting, "rows": {}}
    for name, (yours, paper) in rows.items():
        comparison["rows"][name] = {
            "paper": {m: {"mean": paper[m][0] / 100, "std": None if paper[m][1] is None else paper[m][1] / 100}
                      for m in METRICS},
            "difference": {m: None if yours[m]["mean"] is None else (100 * yours[m]["mean"] - paper[m][0]) / 100
                           for m in METRICS}}
    return comparison


def paper_notes(comparison: dict, categories) -> list[str]:
    """What the paper's rows are, and when its mean is over other categories than yours."""
    name, known = DATASETS[comparison["dataset"]]
    what, table = PAPER_SETTINGS[comparison["setting"]]
    lines = [f"paper: {name}, {what} (arXiv 2406.01078v1, {table}); X - paper: yours minus the paper's, in points"]
    foreign = [c for c in categories if c not in known]
    if foreign:
        lines.append(f"note: {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not {name} "
                     f"categor{'y' if len(foreign) == 1 else 'ies'}; the paper's mean is over its {len(known)}.")
    elif len(categories) < len(known):
        lines.append(f"note: the paper's mean is over {name}'s {len(known)} categories, yours over "
                     f"{len(categories)} of them.")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def _percent(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def format_table(results: dict[str, dict], mean: dict) -> str:
    """Per-category rows and the mean row, in %, in the paper's column order."""
    width = max([len("category")] + [len(c) for c in results])
    lines = [f"{'category':<{width}}" + "".join(f"{m:>8}" for m in METRICS)]
    for name, row in list(results.items()) + [("mean", mean)]:
        lines.append(f"{name:<{width}}" + "".join(f"{_percent(row[m]):>8}" for m in METRICS))
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    """mean and sample std (ddof=1; 0 for one run) over runs of each category's metrics and of the mean row.
    Categories must be the same in every run."""
    summary: dict = {"categories": {}, "mean": {}}
    for name in runs[0]["categories"]:
        summary["categories"][name] = {m: _mean_std([r["categories"][name][m] for r in runs]) for m in METRICS}
    summary["mean"] = {m: _mean_std([r["mean"][m] for r in runs]) for m in METRICS}
    return summary


def _mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def _summary_cells(summary: dict) -> list[dict]:
    return [row[m] for row in list(summary["categories"].values()) + [summary["mean"]] for m in METRICS]


def _mean_std_cell(cell: dict) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{100 * cell['mean']:.1f}" + ("" if cell["std"] is None else f" ± {100 * cell['std']:.1f}")


def format_summary(summary: dict, comparison: dict | None = None) -> str:
    """The mean ± std table, in %. A cell averaged over fewer runs than the most any cell has is marked (n=k):
    the other runs have no value there (null: one class only). With a comparison (`compare_with_paper`), under
    the mean row: the paper's row ("paper mean") and the difference ("mean - paper", in points), then the same
    for each category the paper lists."""
    most = max(cell["n"] for cell in _summary_cells(summary))
    cells = {name: [_mean_std_cell(row[m]) + (f" (n={row[m]['n']})" if row[m]["n"] < most else "")
                    for m in METRICS]
             for name, row in list(summary["categories"].items()) + [("mean", summary["mean"])]}
    for name, row in (comparison or {"rows": {}})["rows"].items():
        cells[f"paper {name}"] = [_mean_std_cell(row["paper"][m]) for m in METRICS]
        cells[f"{name} - paper"] = ["n/a" if row["difference"][m] is None else f"{100 * row['difference'][m]:+.1f}"
                                    for m in METRICS]
    width = max(len("category"), *(len(name) for name in cells))
    column = max(12, *(len(c) + 2 for values in cells.values() for c in values))
    lines = [f"{'category':<{width}}" + "".join(f"{m:>{column}}" for m in METRICS)]
    lines += [f"{name:<{width}}" + "".join(f"{c:>{column}}" for c in values) for name, values in cells.items()]
    return "\n".join(lines)


def runs_without_values(paths: list, runs: list[dict]) -> list[str]:
    """The files among `paths` whose every value is null: they count in no cell of the summary."""
    return [str(path) for path, run in zip(paths, runs) if not any(
        row[m] is not None for row in list(run["categories"].values()) + [run["mean"]] for m in METRICS)]


def summary_footer(summary: dict, paths: list, runs: list[dict]) -> str:
    """What the numbers of the table average over: the number of runs that have values, never the number of
    files given, and which files have no value at all (left out of every cell)."""
    counts = sorted({cell["n"] for cell in _summary_cells(summary) if cell["n"]})
    if not counts:
        footer = "no run has a defined value (every value is null)"
    elif len(counts) == 1:
        footer = f"mean ± sample std over {counts[0]} run{'s' if counts[0] > 1 else ''}"
    else:
        footer = (f"mean ± sample std over {counts[-1]} runs; a cell marked (n=k) averages k runs, the others "
                  f"have no value there")
    empty = runs_without_values(paths, runs)
    if empty and counts:
        footer += f"; left out, every value null: {', '.join(empty)}"
    return footer


def load_run(path: Path) -> dict:
    """A JSON file written by --json, checked enough that --summarize fails with a message, not a traceback."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise data.DataError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise data.DataError(f"{path}: not a JSON file written by metrics.py --json ({error}).") from None
    ok = isinstance(run, dict) and isinstance(run.get("categories"), dict) and isinstance(run.get("mean"), dict)
    rows = list(run["categories"].values()) + [run["mean"]] if ok else []
    if not ok or not all(isinstance(r, dict) and all(m in r for m in METRICS) for r in rows):
        raise data.DataError(f"{path}: not a JSON file written by metrics.py --json (needs 'categories' and "
                             f"'mean' with {', '.join(METRICS)}).")
    if not all(r[m] is None or (isinstance(r[m], (int, float)) and not isinstance(r[m], bool)
                                and math.isfinite(r[m])) for r in rows for m in METRICS):
        raise data.DataError(f"{path}: not a JSON file written by metrics.py --json (every metric must be a "
                             f"number or null).")
    return run


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def run_evaluation(args) -> None:
    started = time.time()
    pred_root, gt_root = Path(args.pred), Path(args.gt)
    categories = args.categories or prediction_categories(pred_root)
    if not categories:
        raise data.DataError(f"{pred_root}: no category folders (PRED/<category>/scores.csv) inside.")
    known = data.list_categories(gt_root)
    for category in categories:
        if category not in known:
            raise data.DataError(f"{pred_root / category}: no category {category!r} in the ground truth {gt_root} "
                                 f"(it has: {', '.join(known) or 'none'}).")
        if not (pred_root / category).is_dir():
            raise data.DataError(f"{pred_root / category}: no predictions for category {category!r}.")
    results, info, notes = {}, {}, []
    for category in categories:
        scores, labels, maps, masks, info[category] = load_category(pred_root, gt_root, category)
        results[category] = evaluate_category(scores, labels, maps, masks, args.fpr_limit)
        del maps, masks
        if info[category]["masks_resized"]:
            notes.append(f"{category}: {info[category]['masks_resized']} ground-truth masks resized to the size "
                         f"of their map (nearest neighbour), e.g. {info[category]['first_mask_resized']}.")
        if len(info[category]["map_sizes"]) > 1:
            notes.append(f"{category}: maps of {len(info[category]['map_sizes'])} sizes ("
                         + ", ".join(f"{w}x{h}" for w, h in info[category]["map_sizes"][:3])
                         + (", ..." if len(info[category]["map_sizes"]) > 3 else "")
                         + "), pixels pooled over images and regions labelled per image.")
        for kind, group in (("images", METRICS[:2]), ("pixels", METRICS[2:])):
            undefined = [m for m in group if results[category][m] is None]
            if undefined:
                notes.append(f"{category}: {', '.join(undefined)} undefined, the test {kind} are all one class "
                             f"(shown as n/a, null in JSON).")
    mean = mean_over_categories(results)
    if args.json:  # first: the file is the result, and printing may fail (a closed pipe)
        data.save_json({"metrics": list(METRICS), "categories": results, "mean": mean, "info": info,
                        "pred": str(pred_root), "gt": str(gt_root)}, args.json)
    print(format_table(results, mean))
    for note in notes:
        print(f"note: {note}")
    skipped = sorted(set(known) - set(categories))
    if skipped and not args.categories:
        print(f"note: categories of {gt_root} without predictions, not evaluated: {', '.join(skipped)}.")
    images = sum(i["images"] for i in info.values())
    print(f"evaluated {len(categories)} categories, {images} images in {time.time() - started:.1f} s")
    if args.json:
        print(f"wrote {args.json}")


def check_distinct_runs(paths: list, runs: list[dict]) -> None:
    """DataError when one run is given twice: the same file (by resolved path, so a symlink or ./x counts), or
    another file with the same content. Two real runs (other seeds, other predictions) always differ: each
    records its own prediction folder and numbers; an identical file is a copy, and averaging it would weigh
    that run twice and shrink the std."""
    seen_paths, seen_runs = {}, []
    for path, run in zip(paths, runs):
        resolved = Path(path).resolve()
        if resolved in seen_paths:
            raise data.DataError(f"{path}: given twice (the same file as {seen_paths[resolved]}); give each run "
                                 f"once.")
        seen_paths[resolved] = path
        for other_path, other in seen_runs:
            if run == other:
                raise data.DataError(f"{path}: the same content as {other_path}, so the same run twice; give "
                                     f"each run once.")
        seen_runs.append((path, run))


def run_summary(args) -> None:
    if args.json and Path(args.json).resolve() in {Path(p).resolve() for p in args.summarize}:
        raise data.DataError(f"--json {args.json}: is one of the runs to summarize and would be overwritten; "
                             f"choose another file.")
    runs = [load_run(Path(p)) for p in args.summarize]
    check_distinct_runs(args.summarize, runs)
    names = list(runs[0]["categories"])
    for path, run in zip(args.summarize, runs):
        if set(run["categories"]) != set(names):
            raise data.DataError(f"{path}: its categories ({', '.join(run['categories'])}) differ from those of "
                                 f"{args.summarize[0]} ({', '.join(names)}); summarize runs of one benchmark.")
    summary = summarize(runs)
    comparison, notes = None, []
    if args.paper:
        dataset, setting = parse_paper(args.paper)
        if dataset == "auto":
            dataset = detect_dataset(names)
        if dataset is None:
            notes.append(f"paper: no row, the categories ({', '.join(names)}) are neither MVTec AD's nor VisA's; "
                         f"give --paper mvtec:{setting} or visa:{setting} to compare anyway.")
        else:
            comparison = compare_with_paper(summary, dataset, setting)
            notes += paper_notes(comparison, names)
    if args.json:  # first: the file is the result, and printing may fail (a closed pipe)
        data.save_json({"metrics": list(METRICS), "runs": [str(p) for p in args.summarize],
                        "runs_without_values": runs_without_values(args.summarize, runs), **summary,
                        **({"paper": comparison} if comparison else {})}, args.json)
    print(format_summary(summary, comparison))
    print(summary_footer(summary, args.summarize, runs))
    for note in notes:
        print(note)
    if args.json:
        print(f"wrote {args.json}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", help="prediction tree: PRED/<category>/test/<defect>/<stem>.tiff + scores.csv")
    parser.add_argument("--gt", help="MVTec-layout ground-truth root")
    parser.add_argument("--categories", nargs="+", help="evaluate only these (default: every category of PRED)")
    parser.add_argument("--json", help="also write the numbers to this JSON file (fractions in [0, 1])")
    parser.add_argument("--fpr-limit", type=float, default=FPR_LIMIT, help="PRO integration limit (default 0.3)")
    parser.add_argument("--summarize", nargs="+", metavar="RUN.json",
                        help="print mean +- std over the JSON files of several runs instead of evaluating")
    parser.add_argument("--paper", metavar="DATASET:SETTING",
                        help="with --summarize: also the paper's row and yours - paper; DATASET mvtec, visa or auto "
                             "(from the category names), SETTING k1, k2, k4, all, k1-image or k1-pixel (Table 4)")
    args = parser.parse_args(argv)
    if args.paper and not args.summarize:
        parser.error("--paper compares a summary with the paper; give it with --summarize RUN.json ...")
    if args.summarize and (args.pred or args.gt):
        parser.error("--summarize takes JSON files only; do not combine it with --pred/--gt")
    if not args.summarize and not (args.pred and args.gt):
        parser.error("give --pred PRED and --gt ROOT (or --summarize RUN.json ...)")
    if not 0.0 < args.fpr_limit <= 1.0:
        parser.error(f"--fpr-limit must be in (0, 1], got {args.fpr_limit}")
    try:
        if args.paper:  # before any work, like --json
            parse_paper(args.paper)
        if args.json:  # before any work: a typo in the output path costs one sentence, not the evaluation
            data.check_output_file(args.json, "--json")
        run_summary(args) if args.summarize else run_evaluation(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `metrics.py ... | head`: the reader has gone; the JSON is already written. Exit quietly, with the
        # status of a process ended by SIGPIPE (128 + 13) as other command-line tools do, after pointing
        # stdout at /dev/null so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
