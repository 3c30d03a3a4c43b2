"""CUT: controllable, universal, training-free visual anomaly generation (paper Sec. 4.1).

A frozen Stable Diffusion turns a normal product photo plus a prompt ("a photo of a bottle that is damaged")
into an anomalous photo and a soft anomaly mask, with no training:

    normal image --VAE--> z_0 --noise to the gamma start--> z_t
    for each remaining DDIM step t:
        record the cross-attention of the anomaly word at P x P            (Eq. 3)
        push that attention up inside the foreground mask by a gradient
        step on z_t, refined at a few steps, with a step size that shrinks
        as attention localizes, until it is localized (early stop)          (Eq. 4, Eq. 5)
        denoise the optimized z_t with classifier-free guidance
    decode -> anomalous image; last step's attention map -> soft mask y_pix

Read top to bottom: defaults, small pure functions (one per equation or step), the attention recorder,
the generator class, then the CLI. The core functions take tensors/arrays, never paths.

    python cut.py --image bottle.png --prompt "a photo of a {cls} that is damaged" --category bottle --n 4
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

import data

# ----------------------------------------------------------------------------------------------------------
# Defaults (paper Sec. 4.1 / A.1 unless marked "ours")

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the original runwayml id is gone from the Hub
STEPS = 200                                 # A.1: T = 200 DDIM steps
GAMMA = 0.25                                # A.1: strength; denoise only the last int(gamma * T) steps
GUIDANCE = 7.5                              # classifier-free guidance scale
SIZE = 512                                  # SD 1.5's native resolution
LAMBDA = 10.0                               # Eq. 5: base step size lambda
THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}    # iterative refinement targets of max(A^j * mask), as in A&E
MAX_ITERS = 20                              # refinement iterations cap
EARLY_STOP_AFTER = 10                       # early stopping is considered only after the first 10 steps
EARLY_STOP_WINDOW = (10, 50)                # 10 < n_t < 50 at P = 16, scaled by (P / 16)^2
SOFTMAX_SCALE = 100.0                       # Eq. 3: temperature of the token softmax (Attend-and-Excite)
GAUSSIAN_SIGMA = 0.5                        # Eq. 3: 3 x 3 Gaussian smoothing
MIN_FOREGROUND, MAX_FOREGROUND = 0.01, 0.99  # outside this coverage the foreground mask falls back to all
# Step 3's rule (ours: the paper says only "simple binary thresholding"; see foreground_mask)
ANALYSIS_PIXELS = 160 * 160                 # the rule runs at this resolution, whatever the photo's size or --size
WINDOW = 1 / 16                             # appearance is compared between windows of 1/16 of the side
STEP = np.array([0.5, 0.05, 0.05, 0.7])     # an edge: brightness x1.65 (log), chroma 0.05, fine texture x2 (log)
NATURAL_STEP = 3                            # ... and 3 x the photo's median step (a speckled surface's own)
SPECK = 0.002                               # parts under 0.2% of the image are specks
MINOR_PART = 0.1                            # parts under 10% of the largest are clutter (glare, a reflection)
STROKE, STROKE_SURVIVAL = 0.03, 0.4         # a part of which < 40% survives an erosion by 3% of the side: a stroke
OPENING = 0.01                              # a background-like region >= 1% of the image stays open (a nut's centre)
CLOSING = 0.02                              # closing radius / side: seals chips and cracks at the rim
LOSS_SCALE = 2.0 ** 16                      # fp16 UNet: initial loss scale, AMP GradScaler's default
LOSS_SCALE_GROWTH = 10                      # ours: x2 after 10 finite gradients in a row (GradScaler: 2000 steps,
                                            # more than a sample's 107 updates at most)
PREVIEW_SAMPLES = 8                         # ours: rows (samples) shown in preview.png
PREVIEW_KEY = "cut-preview"                 # preview.png's text chunk: the samples it shows
PASTE_RADIUS = 0.02                         # ours: --paste dilates and feathers by 2% of the photo's longer side


class CutError(Exception):
    """Bad input for a user to fix; the CLI prints it as one sentence and exits with code 2."""


# ----------------------------------------------------------------------------------------------------------
# Step 2: prompt and anomaly word


def fill_prompt(prompt: str, category: str) -> str:
    """`{cls}` -> the category name with `_` as spaces ("metal_nut" -> "metal nut")."""
    return prompt.replace("{cls}", category.replace("_", " "))


def default_word(prompt: str) -> str:
    """The prompt's last word, punctuation stripped ("... that is damaged." -> "damaged")."""
    words = re.findall(r"[A-Za-z0-9'-]+", prompt)
    if not words:
        raise CutError(f"the prompt {prompt!r} has no word to use as the anomaly word; pass --word")
    return words[-1]


def word_token_indices(tokenizer, prompt: str, word: str, max_length: int = 77) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with start and end tokens) and the positions of all BPE sub-tokens of `word`.

    A word that occurs more than once is taken at its last occurrence (ours: the anomaly word usually ends
    the prompt). CutError if the word is absent or the prompt is longer than the text encoder's context.
    """
    ids = tokenizer(prompt, truncation=False).input_ids  # [<|startoftext|>, ..., <|endoftext|>]
    limit = max_length
    if len(ids) > limit:
        raise CutError(f"the prompt {prompt!r} is {len(ids)} tokens long but the text encoder takes at most "
                       f"{limit}; shorten it")
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise CutError(f"the anomaly word {word!r} is empty after tokenization; pass another --word")
    for start in range(len(ids) - len(word_ids), 0, -1):
        if ids[start:start + len(word_ids)] == word_ids:
            return ids, list(range(start, start + len(word_ids)))
    raise CutError(f"the anomaly word {word!r} does not occur in the prompt {prompt!r}; pass --word with a "
                   f"word of the prompt")


# ----------------------------------------------------------------------------------------------------------
# Step 3: foreground mask ("simple binary thresholding", made right on real photos)


def box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1) x (2r+1) window of an (H, W, ...) array, edges replicated (an integral image)."""
    n = 2 * radius + 1
    padded = np.pad(values, [(radius + 1, radius), (radius + 1, radius)] + [(0, 0)] * (values.ndim - 2), mode="edge")
    table = padded.cumsum(0).cumsum(1)
    return (table[n:, n:] - table[:-n, n:] - table[n:, :-n] + table[:-n, :-n]) / n ** 2


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by a (2r+1) x (2r+1) square: the window holds a pixel of it."""
    return box_mean(mask.astype(np.float64), radius) > 0.5 / (2 * radius + 1) ** 2


def erode(mask: np.ndarray, radius: int, beyond: bool) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square; `beyond` is what lies past the frame (True: a part cut by the frame
    continues there and the frame erodes nothing; False: the frame erodes like the background)."""
    return ~dilate(~np.pad(mask, 1, constant_values=beyond), radius)[1:-1, 1:-1]


def analysis_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) float64 of about ANALYSIS_PIXELS pixels at the photo's aspect ratio."""
    H, W = image.shape[:2]
    scale = math.sqrt(ANALYSIS_PIXELS / (H * W))
    size = (max(8, round(W * scale)), max(8, round(H * scale)))
    return np.asarray(Image.fromarray(image[..., :3]).resize(size, Image.BOX), dtype=np.float64)


def appearance(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(h, w, 3) -> colour (h, w, 3): log brightness and two chroma, which shading leaves unchanged; regional
    (h, w, 4): their means over a window of WINDOW x the side, and its fine texture (log RMS of the brightness
    minus its 3 x 3 mean, which shading leaves unchanged too); and the window's radius."""
    gray = rgb @ [0.299, 0.587, 0.114]
    total = rgb.sum(axis=-1) + 48.0                                   # + 48: dark pixels have no reliable hue
    colour = np.stack([np.log(gray + 16.0), (rgb[..., 0] - rgb[..., 1]) / total,
                       (rgb[..., 0] + rgb[..., 1] - 2 * rgb[..., 2]) / total], axis=-1)
    radius = max(1, round(WINDOW * math.sqrt(gray.size) / 2))
    detail = colour[..., 0] - box_mean(colour[..., 0], 1)
    texture = np.log(np.sqrt(box_mean(detail ** 2, radius).clip(0)) + 0.003)
    return colour, np.concatenate([box_mean(colour, radius), texture[..., None]], axis=-1), radius


def window_steps(regional: np.ndarray, radius: int) -> np.ndarray:
    """|difference| of each regional feature between the two windows beside a pixel, the larger of the
    horizontal and vertical pair: (h, w, C) -> (h, w, C). An edge steps; a gradient of light barely does."""
    h, w = regional.shape[:2]
    padded = np.pad(regional, [(radius, radius), (radius, radius), (0, 0)], mode="edge")
    across = np.abs(padded[radius:radius + h, 2 * radius:] - padded[radius:radius + h, :w])
    down = np.abs(padded[2 * radius:, radius:radius + w] - padded[:h, radius:radius + w])
    return np.maximum(across, down)


def local_mean(values: np.ndarray, where: np.ndarray, radius: int) -> np.ndarray:
    """Mean of values (h, w, C) over the `where` pixels near each pixel (the whole `where` set where none is
    within radius): the local background under uneven light."""
    weight = box_mean(where.astype(np.float64), radius)[..., None]
    near = box_mean(values * where[..., None], radius) / np.maximum(weight, 1e-12)
    return np.where(weight > 0, near, values[where].mean(axis=0))


def region_means(labels: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """Mean of values (h, w, C) over each of the regions 0..n of `labels`: (n + 1, C)."""
    count = np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1)
    return np.stack([np.bincount(labels.ravel(), weights=values[..., c].ravel(), minlength=n + 1) / count
                     for c in range(values.shape[-1])], axis=-1)


def foreground_mask(image: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Step 3: the foreground of an (H, W, 3) uint8 photo -> ((h, w) float32 0/1 at size = (w, h), default
    (W, H); info).

    The background is a region that touches the frame, is uniform in colour and fine texture, and differs from
    the rest; the rest is the object, or objects, cut by the frame or not, made solid. Shading alone is no
    background: a surface under uneven light gets the whole image. Computed at a fixed analysis resolution:
    1. Edges: a step in brightness, chroma or fine texture between neighbouring windows, larger than STEP and
       than the photo's own surface shows (NATURAL_STEP x its median step). Light changes slowly: no edge.
    2. Background: the uniform regions between edges that touch the frame with the chroma and fine texture of
       the one holding most of the frame (brighter or darker: shade). None -> the whole image.
    3. Outline: a pixel closer in colour to the local background than to the object's inside joins the
       background; a region of 1% or more cut off from it that looks like it is an opening (a nut's centre).
    4. Objects: the parts that are no speck, no clutter (under 10% of the largest) and differ from the local
       background. None -> the whole image (a texture, a surface in shade). If most of them are strokes cut by
       the frame (traces of a circuit board), the photo is a pattern -> the whole image; other strokes cut by
       the frame (a tray's rim) are dropped.
    5. Solid: a closing seals chips and cracks at the rim and every hole is filled (dark details inside an
       object are where anomalies appear), but the background and openings.
    A mask covering under 1% or over 99% falls back to the whole image, with a warning.
    info: {"rule": which case fired, "coverage": fraction of the image, "warning": str or None}.
    """
    rgb = analysis_image(image)
    colour, regional, r = appearance(rgb)
    h, w = colour.shape[:2]
    frame = np.zeros((h, w), bool)
    frame[0] = frame[-1] = frame[:, 0] = frame[:, -1] = True
    W, H = size or (image.shape[1], image.shape[0])

    def result(mask: np.ndarray | None, rule: str):
        full = np.ones((H, W), bool) if mask is None else \
            np.asarray(Image.fromarray(mask.astype(np.float32)).resize((W, H), Image.BILINEAR)) > 0.5
        warning = None
        if mask is not None and not MIN_FOREGROUND <= full.mean() <= MAX_FOREGROUND:
            warning = f"foreground mask covers {full.mean():.1%} of the image, outside [1%, 99%]; using the whole image"
            full, rule = np.ones((H, W), bool), "whole image: object too small or too large"
        return full.astype(np.float32), {"rule": rule, "coverage": round(float(full.mean()), 4), "warning": warning}

    # 1. Edges
    steps = window_steps(regional, r)
    tolerance = np.maximum(STEP, NATURAL_STEP * np.median(steps.reshape(-1, 4), axis=0))
    regions, n = data.label_regions((steps <= tolerance).all(axis=-1))
    # 2. Background
    at_frame = np.bincount(regions[frame], minlength=n + 1)
    at_frame[0] = 0
    if not at_frame.any():
        return result(None, "surface: no uniform region at the frame")
    looks = region_means(regions, n, regional)
    shade_of_main = (np.abs(looks - looks[at_frame.argmax()])[:, 1:] < tolerance[1:]).all(axis=1)
    uniform = (shade_of_main & (at_frame > 0))[regions]
    if uniform.all():
        return result(None, "surface: nothing differs from the background")
    # 3. Outline and openings
    inside = ~uniform & ~dilate(uniform, 2 * r)
    object_colour = local_mean(colour, inside if inside.any() else ~uniform, 6 * r)
    to_background = (np.abs(colour - local_mean(colour, uniform, 6 * r)) / STEP[:3]).max(axis=-1)   # (h, w)
    to_object = (np.abs(colour - object_colour) / STEP[:3]).max(axis=-1)
    grown, k = data.label_regions(uniform | (to_background < to_object))
    alike = region_means(grown, k, (to_background < 0.5)[..., None].astype(np.float64))[:, 0]
    size = np.bincount(grown.ravel(), minlength=k + 1)
    background_ids = (size >= OPENING * h * w) & (alike > 0.5)
    background_ids[grown[uniform]] = True
    background_ids[0] = False
    background = background_ids[grown]
    # 4. Objects
    parts, m = data.label_regions(~background)
    size = np.bincount(parts.ravel(), minlength=m + 1)
    size[0] = 0
    gap = np.abs(regional - local_mean(regional, uniform, 6 * r)) / tolerance    # (h, w, 4) from the background
    differs = region_means(parts, m, gap).max(axis=1) >= 1
    kept = (size >= SPECK * h * w) & (size >= MINOR_PART * size.max()) & differs
    kept[0] = False
    if not kept.any():
        return result(None, "surface: nothing differs from the background")
    cut_by_frame = np.zeros(m + 1, bool)
    cut_by_frame[parts[frame]] = True
    thick = erode(parts > 0, max(1, round(STROKE * math.sqrt(h * w))), beyond=False)  # a stroke along the frame
    survival = region_means(parts, m, thick[..., None].astype(np.float64))[:, 0]             # is thin too
    strokes = kept & cut_by_frame & (survival < STROKE_SURVIVAL)
    if size[strokes].sum() > 0.5 * size[kept].sum():
        return result(None, "surface: a pattern cut by the frame")
    kept &= ~strokes
    # 5. Solid
    radius = max(1, round(CLOSING * max(h, w)))
    closed = erode(dilate(kept[parts], radius), radius, beyond=True)
    holes, n_holes = data.label_regions(~closed)
    stays_open = np.zeros(n_holes + 1, bool)
    stays_open[holes[background & ~closed]] = True
    stays_open[0] = False
    return result(~stays_open[holes], "object")


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) 0/1 -> (h, w) 0/1: area average, then > 0.5."""
    area = F.interpolate(mask[None, None].float(), size=tuple(size), mode="area")
    return (area[0, 0] > 0.5).float()


# ----------------------------------------------------------------------------------------------------------
# Eq. 3 to 5 and early stopping: pure functions on tensors


def gaussian_kernel(sigma: float = GAUSSIAN_SIGMA, size: int = 3) -> torch.Tensor:
    """(size, size) Attend-and-Excite's smoothing kernel: per axis exp(-((d - mean) / (2 sigma))^2), normalized.

    This is A&E's formula, not the textbook exp(-d^2 / (2 sigma^2)): at sigma 0.5 its centre weight is 0.33
    instead of 0.62. The paper's thresholds and early-stop window were tuned on A&E's maps, so we keep it."""
    d = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((d / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def text_softmax_end(tokenizer, n_prompt_tokens: int, context: int) -> int:
    """Eq. 3's softmax runs over token positions 1 .. end - 1; this returns `end`, as Attend-and-Excite chooses it.

    SD 1.x (its tokenizer pads with <|endoftext|>): end = context - 1, so the softmax covers positions 1 .. 75 of
    the 77-token sequence, the end token and the padding included, only the start token and the last position
    dropped. SD 2.x (it pads with "!"): end = the end token's position, the prompt's own words only (A&E's
    `normalize_eot`, which its authors set for SD 2.1)."""
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        return context - 1
    return n_prompt_tokens - 1


def token_attention_maps(A_t: torch.Tensor, token_indices: list[int], softmax_end: int,
                         sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Eq. 3 per sub-token: scale by 100, softmax over token positions 1 .. softmax_end - 1 (the start token, which
    soaks up most attention, is dropped), then A&E's 3 x 3 Gaussian with reflect padding.

    A_t: (B, P_h, P_w, N) attention probabilities averaged over heads and layers (they sum to 1 over N tokens).
    token_indices: positions of the word's sub-tokens in the prompt. Returns (B, J, P_h, P_w)."""
    text = torch.softmax(SOFTMAX_SCALE * A_t[..., 1:softmax_end].float(), dim=-1)  # (B, P_h, P_w, softmax_end - 1)
    word = text[..., [j - 1 for j in token_indices]].permute(0, 3, 1, 2)           # (B, J, P_h, P_w)
    B, J, P_h, P_w = word.shape
    kernel = gaussian_kernel(sigma).to(word.device)[None, None]                    # (1, 1, 3, 3)
    padded = F.pad(word.reshape(B * J, 1, P_h, P_w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel).reshape(B, J, P_h, P_w)


def anomaly_attention_map(A_t: torch.Tensor, token_indices: list[int], softmax_end: int,
                          sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Eq. 3: the anomaly word's smoothed cross-attention map A^j, (B, P_h, P_w, N) -> (B, P_h, P_w): the per-pixel max
    over the word's sub-tokens (ours: A&E optimizes single tokens; a word split into several BPE tokens is as
    present as its most attended piece)."""
    return token_attention_maps(A_t, token_indices, softmax_end, sigma).amax(dim=1)


def masked_max(anomaly_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max(A^j * mask) per sample: (B, P_h, P_w), (B, P_h, P_w) or (P_h, P_w) -> (B,)."""
    return (anomaly_map * mask).flatten(1).amax(dim=1)


def attention_loss(anomaly_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 4: L_att = 1 - max(A^j * mask), per sample (B,)."""
    return 1.0 - masked_max(anomaly_map, mask)


def latent_update(z_t: torch.Tensor, grad: torch.Tensor, alpha_t: torch.Tensor,
                  mask_latent: torch.Tensor) -> torch.Tensor:
    """Eq. 4: z_t <- z_t - alpha_t * grad(L_att, z_t) * mask_latent.

    z_t, grad: (B, 4, h, w); alpha_t: (B,); mask_latent: (B, 1, h, w) 0/1, so z_t moves only inside it.
    """
    return z_t - alpha_t.view(-1, 1, 1, 1) * grad * mask_latent


def localized_pixels(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Eq. 5: n_t = number of pixels of the smoothed map above its mean. (B, P_h, P_w) -> (B,) long."""
    mean = anomaly_map.flatten(1).mean(dim=1).view(-1, 1, 1)
    return (anomaly_map > mean).flatten(1).sum(dim=1)


def step_size(lam: float, delta: float, t: int, n_t: float, n_start: float) -> float:
    """Eq. 5: localization-aware step size alpha_t = lambda * (1 + Delta * t) * n_t / n_start.

    t is the number of denoising steps still to run (the current one included), so alpha_t shrinks as
    denoising proceeds and as the attention localizes (n_t falls below n_start).
    """
    return lam * (1.0 + delta * t) * n_t / max(n_start, 1)


def early_stop_window(pixels: int, window: tuple[float, float] = EARLY_STOP_WINDOW) -> tuple[float, float]:
    """The window of n_t, (10, 50) for the 16 x 16 = 256 attention pixels of SD at 512, scaled by the number of
    attention pixels P_h * P_w."""
    scale = pixels / 256
    return window[0] * scale, window[1] * scale


def should_stop_early(step: int, n_t: int, pixels: int, after: int = EARLY_STOP_AFTER,
                      window: tuple[float, float] = EARLY_STOP_WINDOW) -> bool:
    """Early stopping: at step index >= `after` (0-based), stop for good the first time low < n_t < high."""
    low, high = early_stop_window(pixels, window)
    return step >= after and low < n_t < high


def coarse_mask(anomaly_map: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Step 10: y_pix = upsample(A^j) * foreground, clipped to [0, 1] and not stretched: the anomaly word's
    attention probability ("probability-aware"). (P_h, P_w), (H, W) -> (H, W)."""
    H, W = foreground.shape
    up = F.interpolate(anomaly_map[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return up.clamp(0, 1) * foreground


# ----------------------------------------------------------------------------------------------------------
# Step 4: attention capture with a diffusers attention processor


class AttentionCaptured(Exception):
    """Raised by the recorder to end a forward pass once every recorded layer has run (see `stop_after`)."""


class AttentionRecorder:
    """Cross-attention processor that computes attention explicitly and keeps its probabilities.

    It is the computation of diffusers' AttnProcessor, plus one line that stores the probabilities averaged
    over heads, (B, P_h * P_w, N) per layer, with their autograd graph when gradients are enabled.
    With `stop_after` = k it raises AttentionCaptured after the k-th recorded layer: the optimization
    forward needs only the maps, not the noise prediction, so the UNet's high-resolution decoder blocks
    after the last P x P layer are skipped (ours: same maps and gradients, fewer FLOPs).
    """

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid                           # (P_h, P_w), the query grid of the recorded layers
        self.probs: list[torch.Tensor] = []        # one (B, P_h * P_w, N) per recorded layer and forward
        self.stop_after: int | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, query_length, _ = hidden_states.shape
        if query_length != self.grid[0] * self.grid[1]:
            raise RuntimeError(f"attention recorder for {self.grid[0]}x{self.grid[1]} got {query_length} queries")
        key_length = query_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))   # (B*heads, L, d)

        probs = attn.get_attention_scores(query, key, attention_mask)                # (B*heads, P_h*P_w, N)
        self.probs.append(probs.view(batch_size, attn.heads, *probs.shape[1:]).mean(dim=1))
        if self.stop_after is not None and len(self.probs) >= self.stop_after:
            raise AttentionCaptured

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))                # linear proj, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def pop(self) -> torch.Tensor:
        """A_t: the recorded probabilities averaged over layers, (B, P_h, P_w, N); clears the store."""
        if not self.probs:
            raise RuntimeError("no cross-attention was recorded")
        stacked = torch.stack(self.probs).float().mean(dim=0)                        # (B, P_h * P_w, N)
        self.probs = []
        return stacked.view(stacked.shape[0], *self.grid, stacked.shape[-1])


def cross_attention_layers(unet) -> dict[int, list[str]]:
    """UNet level -> processor names of its cross-attention layers; level l runs at the latent grid / 2^l.

    In UNet2DConditionModel every down block but the last halves the grid after its attentions, and the
    up blocks mirror them: down_blocks.i and up_blocks.(n-1-i) run at level i, the mid block at the coarsest.
    """
    from diffusers.models.attention_processor import Attention

    levels = len(unet.config.block_out_channels)
    layers: dict[int, list[str]] = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        block, _, rest = name.partition(".")
        if block == "down_blocks":
            level = int(rest.split(".")[0])
        elif block == "up_blocks":
            level = levels - 1 - int(rest.split(".")[0])
        else:                                                    # mid_block
            level = levels - 1
        layers.setdefault(level, []).append(f"{name}.processor")
    return layers


def choose_attention_level(levels: list[int], latent_size: int, requested: int | None) -> int:
    """The level whose grid side at the square working size, P = latent_size / 2^level, is `requested`, else the
    one closest to latent_size / 4 (P = 16 for SD at 512)."""
    sides = {latent_size // 2 ** level: level for level in levels}
    if requested is not None:
        if requested not in sides:
            raise CutError(f"--attn-res {requested} is not a cross-attention resolution of this UNet at this "
                           f"--size; choose one of {sorted(sides)}")
        return sides[requested]
    return sides[min(sorted(sides, reverse=True), key=lambda side: abs(side - latent_size / 4))]


def working_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """Step 11: the photo's working size (w, h): about size x size pixels at its aspect ratio, each side the
    nearest multiple of `multiple` (what the VAE and the UNet's levels divide), at least one multiple. A square
    photo works at size x size."""
    scale = size / math.sqrt(width * height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


@contextmanager
def recording_attention(unet, layer_names: list[str], grid: tuple[int, int]):
    """Install an AttentionRecorder for the (P_h, P_w) query grid on `layer_names` only; every processor is
    restored afterwards, also on error. Yields the recorder."""
    originals = unet.attn_processors                         # name -> processor object, kept as they are
    recorder = AttentionRecorder(grid)
    unet.set_attn_processor({name: recorder if name in layer_names else processor
                             for name, processor in originals.items()})
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(originals))


# ----------------------------------------------------------------------------------------------------------
# The generator


@dataclass
class CutSettings:
    steps: int = STEPS
    gamma: float = GAMMA
    guidance: float = GUIDANCE
    lam: float = LAMBDA
    delta: float | None = None                   # Eq. 5: Delta; None -> 1 / steps
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    max_iters: int = MAX_ITERS
    attn_res: int | None = None                  # P at the square working size; None -> auto
    size: int = SIZE                             # S: working sizes have about S x S pixels
    optimize: bool = True                        # False: plain img2img with the same recording (a baseline)
    early_stop_after: int = EARLY_STOP_AFTER
    early_stop_window: tuple[float, float] = EARLY_STOP_WINDOW   # at 16 x 16 attention pixels

    def __post_init__(self):
        if self.delta is None:
            self.delta = 1.0 / self.steps

    def denoising_steps(self) -> int:
        """Step 1: K = int(gamma * T), the DDIM steps actually run, as diffusers' img2img computes it for strength
        gamma (so the plain img2img baseline runs exactly the same steps)."""
        K = min(int(self.gamma * self.steps), self.steps)
        if K < 1:
            raise CutError(f"--gamma {self.gamma} with --steps {self.steps} leaves no step to denoise; raise either")
        return K


@dataclass
class CutResult:
    image: np.ndarray                            # (h, w, 3) uint8 at the working size
    mask: np.ndarray                             # (h, w) float32 in [0, 1], the soft y_pix at the working size
    anomaly_map: torch.Tensor                    # (P_h, P_w) the last step's smoothed A^j, for y_pix at other sizes
    trace: dict                                  # per-step n_t, alpha_t, iterations, masked max, early stop


def first_sentence(error: Exception, limit: int = 200) -> str:
    """The type and first sentence of an exception's message, for a one-sentence CLI error."""
    text = str(error).strip().splitlines()[0].strip() if str(error).strip() else ""
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """Any SD 1.x/2.x diffusers folder or Hub id -> StableDiffusionPipeline on `device`, DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
    except Exception as error:  # diffusers raises OSError, ValueError, HFValidationError, ... for bad models
        raise CutError(f"the model {model!r} could not be loaded or downloaded ({first_sentence(error)}); pass "
                       f"--model with a local Stable Diffusion 1.x/2.x diffusers folder (one containing "
                       f"model_index.json)") from None
    # clip_sample: DDIM's default (True) clamps the predicted latent z_0 to [-1, 1], wrong for SD latents; a
    # model whose scheduler config omits it (PNDM or Euler configs, say) would otherwise get it silently
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class CUT:
    """The generator: a frozen StableDiffusionPipeline plus CutSettings -> anomalous images and soft masks."""

    def __init__(self, pipe, settings: CutSettings | None = None):
        self.pipe, self.settings = pipe, settings or CutSettings()
        self.unet, self.vae = pipe.unet, pipe.vae
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.requires_grad_(False)      # frozen: gradients flow to the latent only (less memory)
        self.device = self.unet.device
        self.context = pipe.text_encoder.config.max_position_embeddings       # 77 for SD 1.x/2.x
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        S = self.settings.size
        self.multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if S % self.multiple:
            raise CutError(f"--size {S} must be a multiple of {self.multiple} for this model")
        layers = cross_attention_layers(self.unet)
        self.level = choose_attention_level(list(layers), S // self.vae_factor, self.settings.attn_res)
        self.P = S // self.vae_factor // 2 ** self.level      # the grid side at the square working size
        self.layer_names = layers[self.level]
        self.warned_non_finite = False

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """Step 11: (w, h) of a width x height photo, about S x S pixels (`working_size`)."""
        return working_size(width, height, self.settings.size, self.multiple)

    def attention_grid(self, height: int, width: int) -> tuple[int, int]:
        """(P_h, P_w) of a working size: 16 x 16 for a square photo with SD at 512."""
        return height // self.vae_factor // 2 ** self.level, width // self.vae_factor // 2 ** self.level

    # -- prompt --------------------------------------------------------------------------------------------

    def prompt_tokens(self, prompt: str, word: str) -> tuple[list[int], list[int]]:
        return word_token_indices(self.pipe.tokenizer, prompt, word, self.context)

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """(1, 77, D) text embedding, padded to the encoder's context as SD does."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(prompt, padding="max_length", max_length=self.context, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0].to(self.unet.dtype)

    # -- the per-step pieces -------------------------------------------------------------------------------

    def timesteps(self) -> torch.Tensor:
        """Step 1: the last K = int(gamma * T) of T DDIM timesteps (img2img with strength gamma)."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.settings.steps, device=self.device)
        K = self.settings.denoising_steps()
        return scheduler.timesteps[len(scheduler.timesteps) - K:]

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, h, w, 3) uint8 -> (B, 4, h / f, w / f) fp32 latents z_0, one VAE sample per seed."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        x = x.to(self.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        eps = torch.cat([torch.randn(dist.mean[:1].shape, generator=g) for g in generators])  # seeded on CPU
        z_0 = dist.mean.float() + dist.std.float() * eps.to(self.device)
        return z_0 * self.vae.config.scaling_factor

    def attention_forward(self, recorder, z_t: torch.Tensor, t, cond: torch.Tensor, token_indices,
                          softmax_end: int) -> torch.Tensor:
        """Conditional UNet forward on z_t (grad kept if enabled) -> smoothed anomaly map A^j (B, P_h, P_w).

        The forward ends at the last recorded layer: its noise prediction would be thrown away."""
        recorder.stop_after = len(self.layer_names)
        z_in = self.pipe.scheduler.scale_model_input(z_t, t).to(self.unet.dtype)
        try:
            self.unet(z_in, t, encoder_hidden_states=cond.expand(len(z_t), -1, -1))
        except AttentionCaptured:
            pass
        finally:
            recorder.stop_after = None
        return anomaly_attention_map(recorder.pop(), token_indices, softmax_end)

    def attention_gradient(self, recorder, z_t: torch.Tensor, t, cond, token_indices, softmax_end: int,
                           mask_attn: torch.Tensor, loss_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A^j (B, P_h, P_w) at z_t (B, 4, h, w) and grad(L_att, z_t) (B, 4, h, w) fp32, L_att of Eq. 4.

        loss_scale (B,): as AMP's GradScaler does for a half-precision model, each sample's loss is multiplied by
        its scale before the backward pass, so that small gradients do not underflow to 0 in fp16, and the
        gradient is divided by it after. The scale is a power of two, so both steps are exact."""
        with torch.enable_grad():
            z_leaf = z_t.detach().requires_grad_(True)
            anomaly_map = self.attention_forward(recorder, z_leaf, t, cond, token_indices, softmax_end)
            loss = attention_loss(anomaly_map, mask_attn)                              # (B,) Eq. 4
            grad = torch.autograd.grad((loss * loss_scale).sum(), z_leaf)[0]
        return anomaly_map.detach(), grad / loss_scale.view(-1, 1, 1, 1)

    def scaled_gradient(self, recorder, z_t: torch.Tensor, rows: list[int], states: list[dict], t, cond,
                        token_indices, softmax_end: int, mask_attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`attention_gradient` of the samples `rows` at their own loss scales (z_t, mask_attn: those rows).

        A finite loss whose gradient is inf or NaN at a scale above 1 overflowed the half-precision range: the
        sample's scale halves and its gradient is computed again (ours: GradScaler would skip the step; here a
        skipped update would change the sample, and the exact power-of-two scaling makes the retried gradient the
        one an unscaled fp32 backward pass would give). As GradScaler does, the scale doubles again after
        LOSS_SCALE_GROWTH finite gradients in a row, up to its initial 2^16, so a late small gradient does not
        underflow at a scale an early large one forced down."""
        def scales(ks):
            return torch.tensor([states[rows[k]]["loss_scale"] for k in ks], device=z_t.device)

        anomaly_map, grad = self.attention_gradient(recorder, z_t, t, cond, token_indices, softmax_end, mask_attn,
                                                    scales(range(len(rows))))
        while True:
            overflow = [k for k in range(len(rows)) if states[rows[k]]["loss_scale"] > 1
                        and anomaly_map[k].isfinite().all() and not grad[k].isfinite().all()]
            if not overflow:
                break
            for k in overflow:
                states[rows[k]]["loss_scale"] /= 2
                states[rows[k]]["finite_run"] = 0
            grad[overflow] = self.attention_gradient(recorder, z_t[overflow], t, cond, token_indices, softmax_end,
                                                     mask_attn[overflow], scales(overflow))[1]
        if self.unet.dtype == torch.float16:
            for k, b in enumerate(rows):
                state = states[b]
                state["finite_run"] = state["finite_run"] + 1 if grad[k].isfinite().all() else 0
                if state["finite_run"] == LOSS_SCALE_GROWTH and state["loss_scale"] < LOSS_SCALE:
                    state["loss_scale"], state["finite_run"] = state["loss_scale"] * 2, 0
        return anomaly_map, grad

    def apply_update(self, z: torch.Tensor, grad: torch.Tensor, rows: list[int], states: list[dict],
                     mask_latent: torch.Tensor) -> list[int]:
        """Eq. 4's update, in place, on the samples `rows` of z (B, 4, h, w); grad: theirs (R, 4, h, w). Returns
        the rows that were updated.

        A non-finite gradient never reaches the latent: that update is skipped, counted and warned about."""
        finite = []
        for k, b in enumerate(rows):
            state = states[b]
            state["iterations"][-1] += 1
            norm = float(grad[k].norm())
            state["grad_norm"][-1].append(norm if math.isfinite(norm) else None)
            if math.isfinite(norm):
                finite.append(k)
            else:
                state["skipped_updates"] += 1
                if not self.warned_non_finite:          # once per generator: the count is in every meta line
                    self.warned_non_finite = True
                    warnings.warn("a non-finite attention gradient was skipped (meta.jsonl counts them in "
                                  "skipped_updates); if this recurs, try --dtype bf16 or fp32", RuntimeWarning)
        if finite:
            updated = [rows[k] for k in finite]
            alpha_t = torch.tensor([states[b]["alpha_t"][-1] for b in updated], device=z.device)
            z[updated] = latent_update(z[updated], grad[finite], alpha_t, mask_latent[updated])
        return [rows[k] for k in finite]

    @torch.no_grad()
    def denoise(self, recorder, z_t: torch.Tensor, t, cond, uncond, token_indices, softmax_end: int):
        """Classifier-free guidance step z_t -> z_{t-1}; also the conditional anomaly map (B, P_h, P_w)."""
        B = len(z_t)
        z_in = self.pipe.scheduler.scale_model_input(torch.cat([z_t, z_t]), t).to(self.unet.dtype)
        emb = torch.cat([uncond.expand(B, -1, -1), cond.expand(B, -1, -1)])
        eps = self.unet(z_in, t, encoder_hidden_states=emb).sample.float()
        anomaly_map = anomaly_attention_map(recorder.pop()[B:], token_indices, softmax_end)  # conditional half
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + self.settings.guidance * (eps_cond - eps_uncond)
        return self.pipe.scheduler.step(eps, t, z_t).prev_sample.float(), anomaly_map

    def optimize(self, recorder, z: torch.Tensor, i: int, remaining: int, t, states: list[dict], cond,
                 token_indices, softmax_end: int, mask_attn: torch.Tensor, mask_latent: torch.Tensor) -> torch.Tensor:
        """Sec. 4.1's latent optimization at denoising step i, for the samples that have not stopped early:

            A^j at z_t (Eq. 3);  n_t (Eq. 5);  stop for good when 10 < n_t < 50 (early stopping, after step 10)
            alpha_t = lambda (1 + Delta t) n_t / n_start                                       (Eq. 5)
            z_t <- z_t - alpha_t grad(L_att) * mask_latent,  L_att = 1 - max(A^j * mask)     (Eq. 4)
            at a refinement step: repeat the update until max(A^j * mask) >= the step's threshold or max_iters;
            a sample whose gradient is not finite stops refining at this step (the same one would come again)

        `remaining` is Eq. 5's t: the number of denoising steps still to run, the current one included.
        z: (B, 4, h, w) fp32; mask_attn: (B, P_h, P_w); mask_latent: (B, 1, h, w). Returns the updated z.
        Samples are independent in the UNet, so the gradient of the summed losses is each sample's own.
        """
        s = self.settings
        z = z.detach().clone()
        rows = [b for b, state in enumerate(states) if state["early_stop_step"] is None]
        if not rows:
            return z
        anomaly_map, grad = self.scaled_gradient(recorder, z[rows], rows, states, t, cond, token_indices,
                                                 softmax_end, mask_attn[rows])
        optimizing = []
        for k, b in enumerate(rows):                       # Eq. 5 and early stopping, on this step's map
            state, n_t = states[b], int(localized_pixels(anomaly_map[k:k + 1]))
            if i == 0:
                state["n_start"] = n_t
            if should_stop_early(i, n_t, anomaly_map[k].numel(), s.early_stop_after, s.early_stop_window):
                state["early_stop_step"], state["early_stop_n_t"] = i, n_t     # no update now nor later
                continue
            state["n_t"].append(n_t)
            state["alpha_t"].append(step_size(s.lam, s.delta, remaining, n_t, state["n_start"]))
            state["iterations"].append(0)
            state["grad_norm"].append([])
            optimizing.append(k)
        rows, grad = [rows[k] for k in optimizing], grad[optimizing]

        threshold = s.thresholds.get(i)                    # None: one update at this step
        while rows:
            updated = self.apply_update(z, grad, rows, states, mask_latent)                   # Eq. 4
            if threshold is None:
                break
            rows = [b for b in updated if states[b]["iterations"][-1] < s.max_iters]       # the cap
            if not rows:
                break
            anomaly_map, grad = self.scaled_gradient(recorder, z[rows], rows, states, t, cond, token_indices,
                                                     softmax_end, mask_attn[rows])
            below = (masked_max(anomaly_map, mask_attn[rows]) < threshold).tolist()        # target not reached
            rows, grad = [b for b, go in zip(rows, below) if go], grad[[k for k, go in enumerate(below) if go]]
        return z

    # -- one batch of samples ------------------------------------------------------------------------------

    def generate(self, images: list[np.ndarray], foregrounds: list[np.ndarray], seeds: list[int],
                 prompt: str, word: str) -> list[CutResult]:
        """B normal images (h, w, 3) uint8 at one working size (`working_size`), foreground masks (h, w) 0/1,
        seeds -> B CutResults.

        Every sample has its own torch.Generator and its own loss scale, so a sample's output does not depend on
        its batch-mates (up to float rounding of batched kernels).
        """
        s = self.settings
        h, w = images[0].shape[:2]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"a working size must be a multiple of {self.multiple}, got {w} x {h}")
        grid = self.attention_grid(h, w)
        ids, token_indices = self.prompt_tokens(prompt, word)
        softmax_end = text_softmax_end(self.pipe.tokenizer, len(ids), self.context)
        cond, uncond = self.encode_text(prompt), self.encode_text("")
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        B = len(images)

        foreground = torch.from_numpy(np.stack(foregrounds)).float().to(self.device)      # (B, h, w)
        mask_attn = torch.stack([downsample_mask(m, grid) for m in foreground])           # (B, P_h, P_w)
        latent_grid = (h // self.vae_factor, w // self.vae_factor)
        mask_latent = torch.stack([downsample_mask(m, latent_grid) for m in foreground])[:, None]
        timesteps = self.timesteps()
        K = len(timesteps)
        loss_scale = LOSS_SCALE if self.unet.dtype == torch.float16 else 1.0   # bf16 and fp32 need none
        states = [{"n_start": None, "n_t": [], "alpha_t": [], "iterations": [], "grad_norm": [], "masked_max": [],
                   "early_stop_step": None, "early_stop_n_t": None, "skipped_updates": 0, "loss_scale": loss_scale,
                   "finite_run": 0}
                  for _ in range(B)]

        # Step 1: noise z_0 to the first of the last K timesteps
        z_0 = self.encode_images(np.stack(images), generators)                            # (B, 4, h, w)
        noise = torch.cat([torch.randn(z_0[:1].shape, generator=g) for g in generators]).to(self.device)
        z = self.pipe.scheduler.add_noise(z_0, noise, timesteps[:1]).float()

        with recording_attention(self.unet, self.layer_names, grid) as recorder:
            for i, t in enumerate(timesteps):
                if s.optimize:                      # False: a baseline with the same recording, no update
                    z = self.optimize(recorder, z, i, K - i, t, states, cond, token_indices, softmax_end,
                                      mask_attn, mask_latent)
                z, anomaly_map = self.denoise(recorder, z, t, cond, uncond, token_indices, softmax_end)
                for b, value in enumerate(masked_max(anomaly_map, mask_attn).tolist()):
                    states[b]["masked_max"].append(value)
        with torch.no_grad():
            decoded = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

        results = []
        for b, state in enumerate(states):
            y_pix = coarse_mask(anomaly_map[b], foreground[b]).cpu().numpy().astype(np.float32)   # step 10
            trace = {"token_ids": ids, "token_indices": token_indices, "softmax_tokens": [1, softmax_end - 1],
                     "attn_res": self.P, "attn_grid": list(grid), **{key: state[key] for key in (
                         "n_start", "n_t", "alpha_t", "iterations", "grad_norm", "masked_max", "early_stop_step",
                         "early_stop_n_t", "skipped_updates")},
                     "loss_scale": state["loss_scale"] if s.optimize and loss_scale != 1.0 else None,
                     "final_masked_max": state["masked_max"][-1]}
            results.append(CutResult(pixels[b], y_pix, anomaly_map[b].cpu(), trace))
        return results


# ----------------------------------------------------------------------------------------------------------
# CLI: paths, jobs, resume, sharding and writing live here


@dataclass(frozen=True)
class Job:
    source: Path            # the normal image
    category: str
    seed: int


def parse_thresholds(text: str) -> dict[int, float]:
    """ "0:0.05,10:0.5,20:0.8" -> {0: 0.05, 10: 0.5, 20: 0.8}; "" -> {} (no refinement)."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(step): float(value) for step, value in pairs}
    except ValueError:
        raise CutError(f"--thresholds {text!r}: expected step:value pairs such as 0:0.05,10:0.5,20:0.8") from None


def category_of(path: Path, images_dir: Path | None) -> str:
    """ROOT/<category>/train/good/x.png -> category; else the --images folder's name, else the file stem."""
    parts = path.resolve().parts
    if len(parts) >= 4 and parts[-2] == "good" and parts[-3] in ("train", "test"):
        return parts[-4]
    return images_dir.resolve().name if images_dir is not None else path.stem


def folder_name(text: str) -> str:
    """A word or category as a folder name ("metal nut" -> "metal_nut")."""
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("_") or "anomaly"


def sample_paths(out: Path, category: str, word: str, stem: str, seed: int) -> tuple[Path, Path]:
    """OUT/<category>/test/<word>/<stem>_<seed>.png and its ground_truth/<word>/<stem>_<seed>_mask.png."""
    name = f"{stem}_{seed}"
    return (out / category / "test" / word / f"{name}.png",
            data.mask_path(out, category, word, name))


def resolve_device(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    """cuda (torchrun: cuda:LOCAL_RANK, one GPU per rank) if available, else cpu; fp16 on CUDA, fp32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CutError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if device == "cuda":                                 # under torchrun, one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise CutError("--dtype fp16 is not supported on the CPU; use fp32 (default) or bf16")
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def check_path_part(what: str, value: str) -> str:
    """A category, anomaly-word folder or file stem becomes one name under --out: CutError if it could leave it."""
    if value in ("", ".", "..") or any(sep and sep in value for sep in ("/", "\\", os.sep, os.altsep)):
        raise CutError(f"{what} {value!r} cannot be a folder or file name inside --out; choose a name without "
                       f"'/', '\\' or '..'")
    return value


def model_identity(model: str) -> str:
    """A local model folder as its resolved path (models/sd/ and models/sd are one model), a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: a source photo's identity, wherever it is and whatever it is called."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Photo:
    """One normal photo, ready for the generator: its pixels, its working-size copy and both foregrounds."""
    pixels: np.ndarray                  # (H, W, 3) uint8, the photo as it is
    working: np.ndarray                 # (h, w, 3) uint8 at the working size (Lanczos, as diffusers resizes)
    foreground: np.ndarray              # (H, W) 0/1: the label's
    foreground_working: np.ndarray      # (h, w) 0/1: the loss's
    info: dict                          # the foreground's rule, coverage and warning


def prepare_photo(path: Path, generator: CUT, args: argparse.Namespace) -> Photo:
    """Step 11 and step 3 for one photo: its working size and its foreground (--no-mask, --mask or the rule)."""
    image = data.load_image(path)
    (W, H), (w, h) = image.size, generator.working_size(*image.size)
    pixels, working = np.asarray(image), np.asarray(image.resize((w, h), Image.LANCZOS))
    if args.no_mask:
        return Photo(pixels, working, np.ones((H, W), np.float32), np.ones((h, w), np.float32),
                     {"rule": "whole image (--no-mask)", "coverage": 1.0, "warning": None})
    if args.mask is not None:                           # at each size from the file, nearest neighbour
        foreground = data.load_mask(args.mask, size=(W, H))
        return Photo(pixels, working, foreground, data.load_mask(args.mask, size=(w, h)),
                     {"rule": "--mask", "coverage": round(float(foreground.mean()), 4), "warning": None})
    foreground, info = foreground_mask(pixels)
    foreground_working = downsample_mask(torch.from_numpy(foreground), (h, w)).numpy()
    grid = generator.attention_grid(h, w)
    if info["warning"] is None and downsample_mask(torch.from_numpy(foreground_working), grid).sum() == 0:
        info = {"rule": "whole image: object vanishes at the attention resolution", "coverage": 1.0,
                "warning": f"foreground mask vanishes at {grid[0]}x{grid[1]}; using the whole image"}
        foreground, foreground_working = np.ones((H, W), np.float32), np.ones((h, w), np.float32)
    return Photo(pixels, working, foreground, foreground_working, info)


def paste(original: np.ndarray, generated: np.ndarray, y_pix: np.ndarray, radius: int) -> np.ndarray:
    """--paste: the original photo (H, W, 3) uint8 with the generated one (H, W, 3) blended in through alpha, the
    support of y_pix (its pixels that are not 0 in 8 bits) dilated by `radius` and feathered over `radius` more
    (a box average): 1 on the support, 0 from 2 x radius beyond it, where the original's bytes are kept."""
    support = y_pix >= 0.5 / 255
    alpha = box_mean(dilate(support, radius).astype(np.float64), radius)[..., None]   # (H, W, 1) in [0, 1]
    blended = np.round(alpha * generated + (1.0 - alpha) * original).clip(0, 255).astype(np.uint8)
    return np.where(alpha > 0, blended, original)


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3) at size = (W, H), Lanczos; unchanged when it is already that size."""
    if image.shape[1::-1] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def last_threshold(thresholds: dict) -> float | None:
    """The target of the last refinement step (0.8 at 20 by default); None without refinement."""
    return thresholds[max(thresholds)] if thresholds else None


def preview_records(out: Path, category: str) -> list[dict]:
    """The samples preview.png shows: the first PREVIEW_SAMPLES complete ones by (source, seed)."""
    folder = out / category
    shown = []
    for record in sorted(latest_records(folder / "meta.jsonl").values(), key=lambda r: (r["source"], r["seed"])):
        normal = folder / "train" / "good" / f"{Path(record['source']).stem}.png"
        if (folder / record["image"]).is_file() and (folder / record["mask"]).is_file() and normal.is_file():
            shown.append(record)
        if len(shown) == PREVIEW_SAMPLES:
            break
    return shown


def preview_is_stale(out: Path, category: str) -> bool:
    """preview.png does not show the samples it should (by content: the names it records, not its date)."""
    preview = out / category / "preview.png"
    expected = [record["image"] for record in preview_records(out, category)]
    if not expected:
        return False
    try:
        with Image.open(preview) as image:
            return json.loads(image.text.get(PREVIEW_KEY, "null")) != expected
    except (OSError, ValueError, SyntaxError):                 # missing or unreadable: draw it again
        return True


def preview_tile(image: np.ndarray, cell: int = 256) -> Image.Image:
    """A photo of any shape letterboxed into a cell x cell tile, white around it."""
    return ImageOps.pad(Image.fromarray(image), (cell, cell), color=(255, 255, 255))


def write_preview(out: Path, category: str, thresholds: dict) -> Path | None:
    """OUT/<category>/preview.png: one row per sample (normal | generated | mask overlay on the fixed scale
    [0, 1]), first samples. The overlay is framed green when the sample localized (early stop) and red when its
    attention ended below the last refinement threshold, with its final masked max written on it."""
    records = preview_records(out, category)
    if not records:
        return None
    folder, target = out / category, last_threshold(thresholds)
    rows = []
    for record in records:
        generated = np.asarray(data.load_image(folder / record["image"]))
        overlay = preview_tile(data.overlay(generated, data.load_mask(folder / record["mask"], binarize=False)))
        weak = target is not None and record["final_masked_max"] < target
        if record["early_stop_step"] is not None or weak:
            draw = ImageDraw.Draw(overlay)
            draw.rectangle([0, 0, 255, 255], outline=(220, 0, 0) if weak else (0, 170, 0), width=4)
            draw.text((8, 8), f"max {record['final_masked_max']:.2f}", fill=(220, 0, 0) if weak else (0, 170, 0))
        normal = np.asarray(data.load_image(folder / "train" / "good" / f"{Path(record['source']).stem}.png"))
        rows.append([np.asarray(preview_tile(normal)), np.asarray(preview_tile(generated)), np.asarray(overlay)])
    sheet = data.contact_sheet(rows, labels=["normal", "generated", "mask overlay"])
    shown = PngImagePlugin.PngInfo()
    shown.add_text(PREVIEW_KEY, json.dumps([record["image"] for record in records]))
    encoded = io.BytesIO()
    Image.fromarray(sheet).save(encoded, format="PNG", pnginfo=shown)
    data.save_bytes(encoded.getvalue(), folder / "preview.png")
    return folder / "preview.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CUT: turn normal images into anomalous ones with soft masks (MVTec layout output).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", action="append", type=Path, help="a normal image (repeatable)")
    source.add_argument("--images", type=Path, help="a folder of normal images, e.g. ROOT/bottle/train/good")
    parser.add_argument("--prompt", required=True, help='e.g. "a photo of a {cls} that is damaged"')
    parser.add_argument("--word", help="the anomaly word of the prompt (default: its last word)")
    parser.add_argument("--category", help="category folder name (default: from an MVTec path, else the "
                                           "--images folder name, else the image's file stem)")
    parser.add_argument("--n", type=int, default=1, help="samples per image, seeds seed .. seed+n-1 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("generated"), help="output root (default generated/)")
    parser.add_argument("--model", default=MODEL, help="Hub id or local SD 1.x/2.x diffusers folder")
    parser.add_argument("--size", type=int, default=SIZE,
                        help="S: each photo works at about S x S pixels, at its own aspect ratio (default 512)")
    parser.add_argument("--output-size", choices=("photo", "working"), default="photo",
                        help="write images and masks at the photo's size (default) or at the working size")
    parser.add_argument("--paste", action="store_true",
                        help="blend the anomaly into the full-resolution original; elsewhere its bytes are kept")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="UNet/VAE/text weights (default fp16 on CUDA, fp32 on CPU); latents stay fp32")
    parser.add_argument("--shard", help="i/n: run every n-th job starting at i (default: torchrun's env)")
    parser.add_argument("--batch", type=int, default=1, help="samples denoised together (default 1)")
    parser.add_argument("--steps", type=int, default=STEPS, help="T, DDIM steps (A.1: 200)")
    parser.add_argument("--gamma", type=float, default=GAMMA, help="img2img strength (A.1: 0.25)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale (7.5)")
    parser.add_argument("--lambda", dest="lam", metavar="LAMBDA", type=float, default=LAMBDA, help="Eq. 5 lambda (10)")
    parser.add_argument("--delta", type=float, default=None, help="Eq. 5 Delta (default 1 / steps)")
    parser.add_argument("--thresholds", default=",".join(f"{k}:{v}" for k, v in THRESHOLDS.items()), help="refinement step:target pairs (0:0.05,10:0.5,20:0.8)")
    parser.add_argument("--max-iters", type=int, default=MAX_ITERS, help="refinement iterations cap (20)")
    parser.add_argument("--early-stop-after", type=int, default=EARLY_STOP_AFTER,
                        help="early stopping starts at this step index (10)")
    parser.add_argument("--early-stop-window", default=",".join(f"{v:g}" for v in EARLY_STOP_WINDOW),
                        help="low,high: stop when low < n_t < high (at 16 x 16; scaled by P_h P_w / 256)")
    parser.add_argument("--attn-res", default="auto",
                        help="P, the attention grid side of a square photo (auto: 16 for SD at 512)")
    fg = parser.add_mutually_exclusive_group()
    fg.add_argument("--mask", type=Path, help="foreground mask file for every image (instead of the rule)")
    fg.add_argument("--no-mask", action="store_true", help="optimize attention over the whole image")
    return parser


class JobList:
    """Every sample of a run, job j = (image j // n, seed seed + j % n), built on demand: a run of a billion
    samples costs no memory up front. Job j belongs to the shard j % world."""

    def __init__(self, sources: list[Path], categories: dict[Path, str], n: int, seed: int):
        self.sources, self.categories, self.n, self.seed = sources, categories, n, seed
        self.position = {(categories[path], path.stem): i for i, path in enumerate(sources)}

    def __len__(self) -> int:
        return len(self.sources) * self.n

    def __getitem__(self, j: int) -> Job:
        i, k = divmod(j, self.n)
        source = self.sources[i]
        return Job(source, self.categories[source], self.seed + k)

    def find(self, category: str, stem: str, seed) -> int | None:
        """The job that writes `stem`'s sample of `seed` in `category`, or None if this run has none."""
        i = self.position.get((category, stem))
        if i is None or not isinstance(seed, int) or not 0 <= seed - self.seed < self.n:
            return None
        return i * self.n + seed - self.seed


def batches(jobs: Iterable[Job], size: int, key=lambda job: job.category) -> Iterator[list[Job]]:
    """Consecutive jobs of one key (a category and a working size), at most `size` of them per batch."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) == size or key(job) != key(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def latest_records(meta: Path) -> dict[str, dict]:
    """meta.jsonl -> {image: its last record}; torn lines (a kill mid-write) are ignored."""
    return {record["image"]: record for record in data.read_jsonl(meta) if "image" in record}


def meta_is_tidy(meta: Path) -> bool:
    """meta.jsonl holds exactly one complete line per sample: no torn line, no duplicate (or no file at all)."""
    if not meta.is_file():
        return True
    lines = [line for line in meta.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return len(lines) == len(latest_records(meta))


def compact_meta(meta: Path) -> None:
    """Rewrite an untidy meta.jsonl atomically with one line per sample (its last), dropping the torn and
    duplicated lines that a kill or an overlapping run left; a tidy one is not touched."""
    if not meta_is_tidy(meta):
        records = latest_records(meta).values()
        data.save_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records), meta)


@contextmanager
def category_locks(out: Path, categories: Iterable[str], rank: int, world: int, create: bool = True):
    """Advisory locks (fcntl.flock: released when the process ends, kill -9 included) on each output category.

    An unsharded run holds OUT/<category>/.cut.lock exclusively; a shard holds it shared and its own
    .cut-shard-<i>-of-<n>.lock exclusively. So no two runs write one category at once, except the shards of a
    split, which never write the same sample. CutError if another run holds one. create=False only probes the
    locks that exist (before the model loads, so a second run stops at once in the usual case)."""
    try:
        import fcntl
    except ImportError:                                  # no flock (Windows): no protection, as before
        yield
        return
    with ExitStack() as stack:
        for category in sorted(set(categories)):
            folder = out / category
            wanted = [(".cut.lock", fcntl.LOCK_EX if world == 1 else fcntl.LOCK_SH)]
            if world > 1:
                wanted.append((f".cut-shard-{rank}-of-{world}.lock", fcntl.LOCK_EX))
            for name, mode in wanted:
                if not create and not (folder / name).is_file():
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                handle = stack.enter_context(open(folder / name, "a"))
                try:
                    fcntl.flock(handle, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    who = "another run" if world == 1 else f"another run or another shard {rank}/{world}"
                    raise CutError(f"{who} is writing {folder} now ({folder / name} is locked); wait for it to "
                                   f"finish, or choose another --out") from None
        yield


def finished_jobs(out: Path, jobs: JobList, mine: range, prompts: dict, same: dict, settings: CutSettings,
                  digests: dict[Path, str]) -> set[int]:
    """The jobs of this shard whose image, mask and meta line exist (from the meta records, not a walk over
    every job). CutError if one was made with other settings or from another photo of the same name (by the
    bytes: a relative path may name another photo from another folder): never mix two settings in one folder,
    nor skip what was asked for. `digests` caches each source's sha256."""
    finished = set()
    for category in sorted(set(jobs.categories.values())):
        prompt, word = prompts[category]
        for record in latest_records(out / category / "meta.jsonl").values():
            j = jobs.find(category, Path(str(record.get("source", ""))).stem, record.get("seed"))
            if j is None or j not in mine:
                continue
            job = jobs[j]
            image_path, mask_file = sample_paths(out, category, folder_name(word), job.source.stem, job.seed)
            if record["image"] != image_path.relative_to(out / category).as_posix():
                continue                                 # a sample of another anomaly word
            if not (image_path.is_file() and mask_file.is_file()):
                continue
            if job.source not in digests:
                digests[job.source] = file_digest(job.source)
            if record.get("source_sha256", digests[job.source]) != digests[job.source]:
                raise CutError(f"{image_path} was generated from {record['source']}, another image named like "
                               f"{job.source} (its bytes differ); rename one, or choose another --out")
            changed = [key for key, value in {**same, "prompt": prompt, "word": word}.items()
                       if record.get(key) != value]
            if "source_sha256" not in record:            # made by an older cut.py, which did not record it
                changed.append("source_sha256")
            if settings.attn_res not in (None, record.get("attn_res")):
                changed.append("attn_res")
            grid = record.get("attn_grid") or [0, 0]     # the grid it used, and its window scaled to that grid
            window = early_stop_window(grid[0] * grid[1], settings.early_stop_window)
            if record.get("early_stop_window") != list(window):
                changed.append("early_stop_window")
            if changed:
                raise CutError(f"{image_path} was generated with other settings ({', '.join(changed)}); re-run with "
                               f"the same flags to resume, or choose another --out")
            finished.add(j)
    return finished


def run(args: argparse.Namespace) -> dict:
    """Validate everything, then generate the missing samples of this shard. Returns a summary."""
    started = time.time()
    for name in ("n", "batch", "steps", "size", "max_iters"):
        if getattr(args, name) < 1:
            raise CutError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.gamma <= 1:
        raise CutError(f"--gamma must be in (0, 1], got {args.gamma}")
    if args.paste and args.output_size == "working":
        raise CutError("--paste writes into the photo at its own size; drop --output-size working or --paste")
    thresholds = parse_thresholds(args.thresholds)
    try:
        low, high = (float(v) for v in args.early_stop_window.split(","))
    except ValueError:
        raise CutError(f"--early-stop-window {args.early_stop_window!r}: expected low,high such as 10,50") from None
    attn_res = None if args.attn_res == "auto" else args.attn_res
    if attn_res is not None and not attn_res.isdigit():
        raise CutError(f"--attn-res must be 'auto' or a whole number, got {args.attn_res!r}")
    if args.category is not None:
        check_path_part("--category", args.category)
    data.check_output_folder(args.out, "--out")         # a file or a read-only place: one sentence, before any load

    # Inputs: every image must decode before anything is written
    if args.images is not None:
        if not args.images.is_dir():
            raise CutError(f"--images {args.images}: no such folder")
        sources = data.list_images(args.images)
        if not sources:
            raise CutError(f"--images {args.images}: the folder holds no image files")
    else:
        sources = list(dict.fromkeys(args.image))      # an image given twice is one image
    categories, sizes = {}, {}
    for path in sources:
        sizes[path] = data.load_image(path).size        # (W, H)
        categories[path] = check_path_part("category", args.category or category_of(path, args.images))
        check_path_part("the file name stem of", path.stem)
    stems = {}
    for path, category in categories.items():
        if stems.setdefault((category, path.stem), path) != path:
            raise CutError(f"{path} and {stems[(category, path.stem)]} have the same file name stem in category "
                           f"{category!r}; rename one or pass them in separate runs with different --category")
    sources.sort(key=lambda path: categories[path])    # stable: one category's jobs are contiguous, for --batch
    if args.mask is not None:
        coverage = data.load_mask(args.mask).mean()
        if coverage < MIN_FOREGROUND:
            raise CutError(f"--mask {args.mask} has {coverage:.2%} foreground, under 1%; draw the region where "
                           f"anomalies may appear in white")
    rank, world = data.resolve_shard(args.shard)

    device, dtype = resolve_device(args.device, args.dtype)
    settings = CutSettings(steps=args.steps, gamma=args.gamma, guidance=args.guidance, lam=args.lam,
                           delta=args.delta, thresholds=thresholds, max_iters=args.max_iters,
                           attn_res=int(attn_res) if attn_res else None, size=args.size,
                           early_stop_after=args.early_stop_after, early_stop_window=(low, high))
    settings.denoising_steps()                          # CutError if --gamma leaves no step, before any load or write
    prompts = {}
    for category in sorted(set(categories.values())):
        prompt = fill_prompt(args.prompt, category)
        prompts[category] = (prompt, args.word or default_word(prompt))
        check_path_part("the anomaly word's folder", folder_name(prompts[category][1]))

    jobs = JobList(sources, categories, args.n, args.seed)
    mine = range(rank, len(jobs), world)                # data.shard_jobs' split, without listing the jobs
    # What a finished sample must have been made with to count as done (device and dtype may change on resume)
    same = {"model": model_identity(args.model), "size": args.size, "steps": settings.steps, "gamma": settings.gamma,
            "guidance": settings.guidance, "lambda": settings.lam, "delta": settings.delta,
            "thresholds": {str(k): v for k, v in settings.thresholds.items()}, "max_iters": settings.max_iters,
            "early_stop_after": settings.early_stop_after, "output_size": args.output_size, "paste": args.paste,
            "foreground": "none" if args.no_mask else str(args.mask.resolve()) if args.mask else "auto"}
    metas = [args.out / c / "meta.jsonl" for c in prompts]
    digests: dict[Path, str] = {}
    finished = finished_jobs(args.out, jobs, mine, prompts, same, settings, digests)
    pending = any(j not in finished for j in mine)      # stops at the first job left to do
    untidy = world == 1 and not all(meta_is_tidy(meta) for meta in metas)
    generator = None
    if pending:  # a finished run (a re-run of reproduce.sh, say) does not even load the model
        with category_locks(args.out, prompts, rank, world, create=False):
            pass                                        # another run writing here: say so before a model load
        generator = CUT(load_pipeline(args.model, device, dtype), settings)
        for W, H in sorted(set(sizes.values())) if args.mask is not None else ():
            w, h = generator.working_size(W, H)
            grid = generator.attention_grid(h, w)
            if downsample_mask(torch.from_numpy(data.load_mask(args.mask, size=(w, h))), grid).sum() == 0:
                raise CutError(f"--mask {args.mask} vanishes at the {grid[0]}x{grid[1]} attention resolution of a "
                               f"{W} x {H} photo; use a larger region")
        for prompt, word in prompts.values():
            generator.prompt_tokens(prompt, word)       # CutError if absent or too long, before any write

    from tqdm import tqdm

    written, localized, weak = 0, 0, 0
    target = last_threshold(thresholds)
    with category_locks(args.out, prompts, rank, world) if pending or untidy else nullcontext():
        if world == 1:                                  # the exclusive holder tidies what kills and overlaps left
            for meta in metas:
                compact_meta(meta)
        if pending:                                     # another run may have finished jobs while the model loaded
            finished = finished_jobs(args.out, jobs, mine, prompts, same, settings, digests)
        for i, source in enumerate(sources):            # the rank holding an image's first seed copies it
            normal_copy = args.out / categories[source] / "train" / "good" / f"{source.stem}.png"
            if i * args.n in mine and not normal_copy.is_file():
                data.save_image(data.load_image(source), normal_copy)

        todo = (jobs[j] for j in mine if j not in finished)
        progress = tqdm(total=len(mine) - len(finished), desc=f"cut {rank}/{world}" if world > 1 else "cut",
                        unit="sample", disable=generator is None)
        photos: dict[Path, Photo] = {}                  # the photos of the current batch (an image's seeds are
        for batch in batches(todo, args.batch,          # adjacent jobs: each is decoded, resized and masked once)
                             key=lambda job: (job.category, generator.working_size(*sizes[job.source]))):
            category = batch[0].category
            prompt, word = prompts[category]
            photos = {source: photos.get(source) for source in dict.fromkeys(job.source for job in batch)}
            for source, photo in photos.items():
                if photo is None:
                    photos[source] = photo = prepare_photo(source, generator, args)
                    if photo.info["warning"]:
                        tqdm.write(f"{source}: {photo.info['warning']}", file=sys.stderr)
            batch_started = time.time()
            results = generator.generate([photos[job.source].working for job in batch],
                                         [photos[job.source].foreground_working for job in batch],
                                         [job.seed for job in batch], prompt, word)
            seconds = (time.time() - batch_started) / len(batch)
            for job, result in zip(batch, results):
                photo = photos[job.source]
                image, y_pix = result.image, result.mask                          # the working size
                if args.output_size == "photo":                                   # the photo's own size
                    image = resized(image, sizes[job.source])
                    y_pix = coarse_mask(result.anomaly_map, torch.from_numpy(photo.foreground)).numpy()
                radius = round(PASTE_RADIUS * max(sizes[job.source])) if args.paste else None
                if args.paste:
                    image = paste(photo.pixels, image, y_pix, radius)
                image_path, mask_file = sample_paths(args.out, category, folder_name(word), job.source.stem, job.seed)
                data.save_image(image, image_path)
                data.save_mask(y_pix, mask_file)
                if job.source not in digests:
                    digests[job.source] = file_digest(job.source)
                grid = result.trace["attn_grid"]
                record = {
                    "image": image_path.relative_to(args.out / category).as_posix(),
                    "mask": mask_file.relative_to(args.out / category).as_posix(),
                    "source": str(job.source.resolve()), "source_sha256": digests[job.source],
                    "category": category, "prompt": prompt, "word": word, "seed": job.seed, "label": 1,
                    "device": device, "dtype": str(dtype)[6:], **same, "paste_radius": radius,
                    "photo_size": list(sizes[job.source]), "working_size": list(photo.working.shape[1::-1]),
                    "early_stop_window": list(early_stop_window(grid[0] * grid[1], settings.early_stop_window)),
                    "foreground_rule": photo.info["rule"], "foreground_coverage": photo.info["coverage"],
                    "mask_warning": photo.info["warning"], **result.trace, "seconds": round(seconds, 3),
                }
                data.append_jsonl(record, args.out / category / "meta.jsonl")   # last: marks the sample complete
                written += 1
                localized += result.trace["early_stop_step"] is not None
                weak += target is not None and result.trace["final_masked_max"] < target
                progress.update(1)
        progress.close()

        previews = []
        if rank == 0:  # one writer; a later run (e.g. the resume after all shards) refreshes a stale one
            previews = [p for p in (write_preview(args.out, c, thresholds) for c in sorted(prompts)
                                    if preview_is_stale(args.out, c)) if p is not None]
    return {"written": written, "skipped": len(finished), "localized": localized, "weak": weak, "target": target,
            "jobs": len(jobs), "rank": rank, "world": world, "out": args.out, "previews": previews,
            "seconds": time.time() - started}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        summary = run(args)
    except (CutError, data.DataError) as error:
        print(f"cut.py: error: {error}", file=sys.stderr)
        return 2
    shard = f" (shard {summary['rank']}/{summary['world']} of {summary['jobs']} jobs)" if summary["world"] > 1 else ""
    plural = "" if summary["written"] == 1 else "s"
    outcome = ""
    if summary["written"]:
        outcome = f"\n  {summary['localized']} of {summary['written']} localized (early stop)"
        if summary["target"] is not None:
            outcome += (f", {summary['weak']} ended below the last refinement threshold {summary['target']:g}"
                        + (" (framed red in the preview)" if summary["weak"] else ""))
    print(f"cut.py: wrote {summary['written']} sample{plural}, skipped {summary['skipped']} already complete{shard}, "
          f"under {summary['out']}/ in {summary['seconds']:.1f} s" + outcome
          + "".join(f"\n  preview: {p}" for p in summary["previews"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
