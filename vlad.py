"""VLAD: a CLIP-based multi-class anomaly detector trained only on generated anomalies (CUT paper, Sec. 4.2, A.2).

A frozen open_clip ViT gives patch tokens at four stages and an image embedding. Small linear adapters map the
patch tokens into the joint image-text space, where they are compared with two text features per category
("normal" and "abnormal" prompt ensembles, Eq. 8) and, when k normal images are given, with a memory bank of
their adapted patch tokens (Eq. 9). The adapters are trained with focal, BCE and adapted-Dice losses (Eq. 6-7)
on the folders `cut.py` writes.

    python vlad.py train   --data GEN [--data GEN2 ...] [--aux AUX ...] --out RUN
    python vlad.py predict --ckpt RUN --data ROOT --k-shot 4 --seed 0 --out PRED

The backbone never changes and nothing is augmented, so its tokens are computed once per training image and
cached on disk, in one folder keyed by content that every run shares (--cache-dir, ~/.cache/vlad/tokens by
default); the epochs then cost only the adapters.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import html
import io
import json
import math
import os
import string
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
import safetensors.torch
from safetensors.torch import load_file
from safetensors import safe_open
from tqdm import tqdm

import data
from data import DataError

# ---------------------------------------------------------------------------------------------------------
# Defaults (DESIGN.md, "VLAD: the detector")
# ---------------------------------------------------------------------------------------------------------

MODEL = "ViT-L-14-quickgelu"  # the plain ViT-L-14 config would run OpenAI's weights with the wrong activation
PRETRAINED = "openai"
IMAGE_SIZE = 518  # 37 x 37 patches of 14; the paper's 512 is not a multiple of 14
LOGIT_SCALE = 100.0
LR = 1e-4  # A.2: Adam, cosine annealing over 200 epochs, batch 16
EPOCHS = 200
BATCH_SIZE = 16
OMEGA = 6.0  # Eq. 7
LOSS_TERMS = ("both", "image", "pixel")  # Table 4 ablation: train with y_img and y_pix, y_img only, y_pix only
FOCAL_GAMMA = 2.0
FOCAL_ALPHA = 0.25  # Lin et al.; the paper does not give alpha
DICE_BETA = 1.0  # Eq. 6
NN_CHUNK = 4096  # rows per block of the exact nearest-neighbour search: memory is NN_CHUNK^2 floats at most
SEED = 0

# WinCLIP's state words (reused by APRIL-GAN and AnomalyGPT); {} is the category name.
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = [
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.", "a black and white photo of the {}.",
    "a black and white photo of a {}.", "a low resolution photo of the {}.", "a low resolution photo of a {}.",
    "a good photo of the {}.", "a good photo of a {}.", "a bad photo of the {}.", "a bad photo of a {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
]


# ---------------------------------------------------------------------------------------------------------
# The frozen backbone: open_clip ViT, patch tokens at quarter depths, prompt-ensemble text features
# ---------------------------------------------------------------------------------------------------------


def default_stages(depth: int) -> list[int]:
    """Blocks at quarter depths, 1-based: 6, 12, 18, 24 for ViT-L's 24 blocks."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})


def prompt_sentences(category: str) -> tuple[list[str], list[str]]:
    """Every state word x template sentence for one category: (normal sentences, abnormal sentences)."""
    name = category.replace("_", " ")
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def ensemble_text_features(sentence_features: torch.Tensor) -> torch.Tensor:
    """(n_sentences, C) -> (C,): normalize each sentence, average, normalize again."""
    return F.normalize(F.normalize(sentence_features, dim=-1).mean(dim=0), dim=-1)


def preprocess(image: Image.Image, image_size: int, mean, std) -> torch.Tensor:
    """PIL RGB image -> (3, S, S) float tensor. The whole image is resized (no center crop as in open_clip's
    transform), so the anomaly map covers every pixel, defects at the border included."""
    image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _load_failure_reason(message: str) -> str:
    """open_clip's long error texts, shortened to what the user can act on."""
    if "not found in built-ins" in message:
        return "unknown model name (open_clip.list_models() lists the known ones)"
    if "not a known tag or valid file path" in message:
        return "unknown pretrained tag and no such weights file (open_clip.list_pretrained() lists the tags)"
    if "Failed to download" in message or "download" in message.lower():
        return "its weights are neither in the Hugging Face cache nor downloadable (no network?)"
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return first_line[:160]


class Backbone:
    """A frozen open_clip ViT: patch tokens of the chosen blocks, the CLIP image embedding, and per-category
    text features (computed once, then cached).

    `model_name` is any open_clip name (`ViT-L-14-quickgelu`) with `pretrained` a tag (`openai`) or a weights
    file, or `local-dir:/path` to a folder holding open_clip_config.json + open_clip_model.safetensors (then
    `pretrained` is ignored). The positional embedding is interpolated to `image_size` by open_clip.
    """

    def __init__(self, model_name: str, pretrained: str | None, image_size: int, stages: list[int] | None = None,
                 device: str = "cpu", precision: str = "fp32"):
        import open_clip  # imported here so the pure functions above work without it

        if model_name.startswith(("local-dir:", "hf-hub:")):
            pretrained = None  # the folder or Hub repo holds the weights; open_clip ignores `pretrained` then
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained or None, precision=precision,
                                           device=device, force_image_size=image_size)
        except Exception as error:  # open_clip raises RuntimeError, ValueError, OSError, HF errors, ...
            raise DataError(f"cannot load the open_clip model {model_name!r} with pretrained {pretrained!r}: "
                            f"{_load_failure_reason(str(error))}.") from None
        visual = model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise DataError(f"{model_name}: VLAD needs an open_clip ViT image tower, not {type(visual).__name__}.")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        if pretrained and Path(pretrained).is_file():  # a weights file: recorded absolute, so predict finds it anywhere
            pretrained = str(Path(pretrained).resolve())
        self.model_name, self.pretrained, self.image_size = model_name, pretrained, image_size
        self.device, self.precision = torch.device(device), precision
        self.dtype = visual.conv1.weight.dtype  # the compute dtype: open_clip keeps some parameters in fp32
        self.depth = len(visual.transformer.resblocks)
        self.width = visual.transformer.width
        self.embed_dim = visual.output_dim
        self.patch_size = visual.patch_size[0]
        self.stages = list(stages) if stages else default_stages(self.depth)
        if not all(1 <= s <= self.depth for s in self.stages):
            raise DataError(f"stages {self.stages} must lie in 1..{self.depth}, the blocks of {model_name}.")
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        self.mean, self.std = tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"])
        self._text_cache: dict[str, torch.Tensor] = {}
        self._identity: dict | None = None

    def identity(self) -> dict:
        """What the backbone computes, whatever it is called: a hash of its weights and the kinds of its modules
        (QuickGELU and GELU give equal weights different outputs). Two names for one model (a Hub tag and a
        local copy) have one identity; other weights or another activation have another.

        The weights are hashed rounded to fp16, which is what open_clip's fp16 load rounds them to, so fp32 and
        fp16 loads of one model agree; a bf16 load is hashed at bf16 and agrees only with bf16 loads."""
        if self._identity is None:
            rounding = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
                digest.update(tensor.detach().to(rounding).cpu().contiguous().view(torch.int16).numpy().tobytes())
            kinds = sorted({type(m).__name__.replace("LayerNormFp32", "LayerNorm") for m in self.model.modules()})
            self._identity = {"weights_sha256": digest.hexdigest(), "rounding": str(rounding).split(".")[-1],
                              "modules": hashlib.sha256(",".join(kinds).encode()).hexdigest()[:16]}
        return self._identity

    def signature(self) -> dict:
        """What the tokens depend on: a cache entry written under another signature is never read."""
        return {**self.identity(), "image_size": self.image_size, "stages": self.stages,
                "precision": self.precision, "mean": self.mean, "std": self.std}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> patch tokens (B, L, N, width) and image embedding (B, embed_dim), backbone dtype.

        Tokens are the raw block outputs (before the final LayerNorm), class token dropped. Each image goes
        through the ViT alone: batched kernels round differently for other batch sizes (the embedding by about
        1e-6 in fp32), and an image's outputs must be a function of the image, whatever shared its batch: the
        token cache is keyed by the image alone, and a resumed, sharded or otherwise batched run gives the same
        bits. One image is already a full-size matrix product (1,370 tokens at ViT-L / 518 px)."""
        tokens, embeddings = [], []
        for image in pixels:
            output = self.model.visual.forward_intermediates(
                image[None].to(self.device, self.dtype), indices=[s - 1 for s in self.stages],
                normalize_intermediates=False, output_fmt="NLC")
            tokens.append(torch.stack(output["image_intermediates"], dim=1))  # (1, L, N, width)
            embeddings.append(output["image_features"])
        return torch.cat(tokens), torch.cat(embeddings)

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor:
        """(2, embed_dim) float32: row 0 normal, row 1 abnormal; computed once per category."""
        if category not in self._text_cache:
            rows = []
            for sentences in prompt_sentences(category):
                tokens = self.tokenizer(sentences).to(self.device)
                rows.append(ensemble_text_features(self.model.encode_text(tokens).float()))
            self._text_cache[category] = torch.stack(rows).cpu()
        return self._text_cache[category]


# ---------------------------------------------------------------------------------------------------------
# Eq. 8 and Eq. 9 on tensors
# ---------------------------------------------------------------------------------------------------------


def _grid_side(n_tokens: int) -> int:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid")
    return side


def vision_language_logits(patch_features: list[torch.Tensor], text_features: torch.Tensor, image_size: int,
                           logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Eq. 8, pixel level, per stage, before the softmax: the {normal, abnormal} logits, upsampled.

    patch_features: L tensors (B, N, C), L2-normalized; text_features: (B, 2, C) (each image its category's).
    Returns (B, L, 2, S, S). Upsampling is linear, so it commutes with taking the logit gap."""
    stages = []
    for features in patch_features:
        batch, n_tokens, _ = features.shape
        side = _grid_side(n_tokens)
        logits = logit_scale * torch.einsum("bnc,bkc->bkn", features, text_features)  # (B, 2, N)
        stages.append(F.interpolate(logits.reshape(batch, 2, side, side), size=(image_size, image_size),
                                    mode="bilinear", align_corners=False))
    return torch.stack(stages, dim=1)


def vision_language_maps(patch_features: list[torch.Tensor], text_features: torch.Tensor, image_size: int,
                         logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Eq. 8, pixel level: the abnormal probability per stage, (B, L, S, S); M_VL is its sum over stages."""
    return vision_language_logits(patch_features, text_features, image_size, logit_scale).softmax(dim=2)[:, :, 1]


def vision_language_score_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                                 logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Eq. 8, image level, before the softmax: 100 * F_image . F_text^T. (B, C), (B, 2, C) -> (B, 2)."""
    return logit_scale * torch.einsum("bc,bkc->bk", image_features, text_features)


def vision_language_score(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Eq. 8, image level: S_VL = softmax(100 * F_image . F_text^T)[abnormal]. (B, C), (B, 2, C) -> (B,)."""
    return vision_language_score_logits(image_features, text_features, logit_scale).softmax(dim=-1)[:, 1]


def nearest_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = NN_CHUNK) -> torch.Tensor:
    """1 - max cosine similarity of each query to the bank, exact, in chunk x chunk blocks, in float32 whatever
    the bank's dtype (an fp16 similarity near 1 would be rounded to 5e-4, the size of a normal patch's distance).

    queries (Q, C) and bank (M, C) are L2-normalized. Returns (Q,) float32."""
    queries = queries.float()
    best = torch.full((queries.shape[0],), -math.inf, dtype=torch.float32, device=queries.device)
    for q0 in range(0, queries.shape[0], chunk):
        block = queries[q0:q0 + chunk]
        for b0 in range(0, bank.shape[0], chunk):
            similarity = block @ bank[b0:b0 + chunk].float().T  # (q, m)
            best[q0:q0 + chunk] = torch.maximum(best[q0:q0 + chunk], similarity.max(dim=1).values)
    return 1.0 - best


def vision_vision_map(patch_features: list[torch.Tensor], memory_bank: list[torch.Tensor], image_size: int,
                      chunk: int = NN_CHUNK) -> torch.Tensor:
    """Eq. 9: M_VV = Upsample(sum_i (1 - max cos(F_patch_i, B_i))). L x (B, N, C), L x (M_i, C) -> (B, S, S).
    S_VV is its max per image."""
    total = None
    for features, bank in zip(patch_features, memory_bank):
        batch, n_tokens, channels = features.shape
        side = _grid_side(n_tokens)
        distance = nearest_neighbour_distance(features.reshape(-1, channels), bank, chunk)
        distance = distance.reshape(batch, 1, side, side)
        total = distance if total is None else total + distance
    return F.interpolate(total, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# Eq. 6-7: the losses. Focal and BCE from the two-state logits (log_softmax), Dice on probabilities (Eq. 6)
# ---------------------------------------------------------------------------------------------------------
# At logit scale 100 a confident mistake saturates a probability: a logit gap of 17 already rounds p to 1.0 in
# float32, so log(1 - p) would need a clamp and its gradient would be 0. log_softmax keeps it exact (about 1).


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA,
               alpha: float = FOCAL_ALPHA) -> torch.Tensor:
    """Binary focal loss, mean over the batch: -alpha_t (1 - p_t)^gamma log p_t.
    logits (B, 2) = {normal, abnormal}, target (B,) in {0, 1} -> scalar."""
    log_p = logits.log_softmax(dim=-1)
    log_p_t = target * log_p[:, 1] + (1 - target) * log_p[:, 0]
    alpha_t = target * alpha + (1 - target) * (1 - alpha)
    return (-alpha_t * (1 - log_p_t.exp()) ** gamma * log_p_t).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with soft targets y_pix in [0, 1], mean over all pixels.
    logits (B, 2, H, W) = {normal, abnormal}, target (B, H, W) -> scalar."""
    log_p = logits.log_softmax(dim=1)
    return -(target * log_p[:, 1] + (1 - target) * log_p[:, 0]).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor, beta: float = DICE_BETA) -> torch.Tensor:
    """Eq. 6, adapted Dice: Dice = (2 sum y p + 1) / (sum y + sum p + 1) per image, L = 1 - Dice / (Dice + beta),
    mean over images. (B, H, W), (B, H, W) -> scalar. The +1 makes an empty mask (a normal image) well
    defined: its Dice is 1 / (sum p + 1), so it pushes p to 0."""
    dims = tuple(range(1, probability.ndim))
    dice = (2 * (target * probability).sum(dims) + 1) / (target.sum(dims) + probability.sum(dims) + 1)
    return (1 - dice / (dice + beta)).mean()


def vlad_loss(image_logits: torch.Tensor, y_img: torch.Tensor, stage_logits: torch.Tensor, y_pix: torch.Tensor,
              omega: float = OMEGA, gamma: float = FOCAL_GAMMA, alpha: float = FOCAL_ALPHA,
              beta: float = DICE_BETA, terms: str = "both") -> torch.Tensor:
    """Eq. 7: L = Focal(y_img, S_VL) + omega * sum_i (BCE(y_pix, p_i) + L_Dice(y_pix, p_i)).
    image_logits (B, 2), y_img (B,), stage_logits (B, L, 2, S, S), y_pix (B, S, S).
    terms: 'both' is Eq. 7; 'image' keeps only the focal term, 'pixel' only the pixel terms (Table 4)."""
    if terms not in LOSS_TERMS:
        raise ValueError(f"terms must be one of {LOSS_TERMS}, got {terms!r}")
    image = focal_loss(image_logits, y_img, gamma, alpha)
    if terms == "image":
        return image
    pixel = sum(bce_loss(stage_logits[:, i], y_pix) + dice_loss(stage_logits[:, i].softmax(dim=1)[:, 1], y_pix, beta)
                for i in range(stage_logits.shape[1]))
    return omega * pixel if terms == "pixel" else image + omega * pixel


# ---------------------------------------------------------------------------------------------------------
# The trainable part: patch adapters and the image adapter
# ---------------------------------------------------------------------------------------------------------


class VLAD(nn.Module):
    """Adapters on top of the frozen backbone's outputs; every input is a tensor, no image or path."""

    def __init__(self, width: int, embed_dim: int, n_stages: int):
        super().__init__()
        self.patch_adapters = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(n_stages))
        self.image_adapter = nn.Linear(embed_dim, embed_dim)
        with torch.no_grad():  # identity: an untrained VLAD scores images exactly as zero-shot CLIP does
            self.image_adapter.weight.copy_(torch.eye(embed_dim))
            self.image_adapter.bias.zero_()

    def patch_features(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, L, N, width) -> L x (B, N, C), L2-normalized: F_patch_i."""
        tokens = tokens.float()
        return [F.normalize(adapter(tokens[:, i]), dim=-1) for i, adapter in enumerate(self.patch_adapters)]

    def image_features(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, C) CLIP image embedding -> (B, C) L2-normalized F_image."""
        return F.normalize(self.image_adapter(F.normalize(embedding.float(), dim=-1)), dim=-1)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor, text_features: torch.Tensor,
                image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> per-stage pixel logits (B, L, 2, S, S) and image logits (B, 2), what the losses take."""
        stage_logits = vision_language_logits(self.patch_features(tokens), text_features, image_size)
        return stage_logits, vision_language_score_logits(self.image_features(embedding), text_features)

    @torch.no_grad()
    def detect(self, tokens: torch.Tensor, embedding: torch.Tensor, text_features: torch.Tensor, image_size: int,
               memory_bank: list[torch.Tensor] | None = None, chunk: int = NN_CHUNK
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion: M = M_VL + M_VV (B, S, S) and S = S_VL + S_VV (B,); VL only (zero-shot) without a bank."""
        patch_features = self.patch_features(tokens)
        anomaly_map = vision_language_maps(patch_features, text_features, image_size).sum(dim=1)  # M_VL
        score = vision_language_score(self.image_features(embedding), text_features)  # S_VL
        if memory_bank is not None:
            m_vv = vision_vision_map(patch_features, memory_bank, image_size, chunk)
            anomaly_map = anomaly_map + m_vv
            score = score + m_vv.flatten(1).max(dim=1).values  # S_VV = max M_VV
        return anomaly_map, score


# ---------------------------------------------------------------------------------------------------------
# Loading images: decoded in torch DataLoader worker processes while the backbone computes
# ---------------------------------------------------------------------------------------------------------
# Reading, converting and resizing one 1024 x 1024 PNG takes over 100 ms of a CPU core (bench.py vlad --loader),
# the time of dozens of ViT-L forwards on a GPU, so every path that reads images (the token cache's fill,
# --cache none, the memory bank, predict) gets them from `image_batches`, decoded by worker processes.


def default_workers() -> int:
    """--workers: min(8, the CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


def load_target(mask, image_size: int) -> np.ndarray:
    """y_pix at the input size as uint8, 255 x the probability: the soft mask's own 8-bit values (resized
    bilinearly by PIL, which rounds to 8 bits), zeros for a normal image (mask None). Stored as it is read, a
    quarter of float32, and exact: every cache mode trains on the same y_pix."""
    if mask is None:
        return np.zeros((image_size, image_size), np.uint8)
    probability = data.load_mask(mask, size=(image_size, image_size), binarize=False)
    return np.rint(probability * 255).astype(np.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Images decoded and preprocessed wherever the DataLoader asks (a worker process, or this one).

    It holds paths and numbers only, never the backbone, so a worker process stays small (also when workers are
    spawned, not forked). Item i: {"pixels": (3, S, S) float32}, plus "y_pix": (S, S) uint8 when `masks` are
    given (one per image, None for a normal image), plus "image": (H, W, 3) uint8 when `originals`, at the size
    predict writes its map and overlay: the image's own, or its aspect ratio with the long side at most
    `map_size` (resized here, so a 12 MP photo never crosses to the main process whole). An image that cannot
    be read gives
    {"error": its DataError's sentence}: raised in a worker, the DataError would reach the main process
    wrapped in the worker's traceback."""

    def __init__(self, images: list, image_size: int, mean, std, masks: list | None = None,
                 originals: bool = False, map_size: int | None = None):
        self.images, self.image_size, self.mean, self.std = list(images), image_size, mean, std
        self.masks, self.originals, self.map_size = masks, originals, map_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        try:
            image = data.load_image(self.images[index])
            item = {"pixels": preprocess(image, self.image_size, self.mean, self.std)}
            if self.masks is not None:
                item["y_pix"] = torch.from_numpy(load_target(self.masks[index], self.image_size))
        except DataError as error:
            return {"error": str(error)}
        if self.originals:
            size = map_shape(image.size, self.map_size)
            item["image"] = torch.from_numpy(np.array(image if image.size == size else
                                                      image.resize(size, Image.BICUBIC)))
        return item


def collate_images(items: list[dict]) -> dict:
    """One batch: pixels (B, 3, S, S) and y_pix (B, S, S) stacked (by torch's default_collate, which stacks
    into shared memory in a worker, saving a copy), originals a list (their sizes differ); a batch with an
    unreadable image is that image's error."""
    for item in items:
        if "error" in item:
            return item
    batch = {key: torch.utils.data.default_collate([item[key] for item in items])
             for key in ("pixels", "y_pix") if key in items[0]}
    if "image" in items[0]:
        batch["image"] = [item["image"] for item in items]
    return batch


def image_batches(dataset: ImageDataset, batches: list[list[int]], workers: int) -> Iterator[dict]:
    """The batches of `dataset` given by these lists of indices, collated, in this order, decoded by `workers`
    DataLoader processes (0: in this one) while the caller computes on the previous ones.

    Each batch is decoded whole by one worker and the loader keeps their order, so the caller receives the same
    tensors for every worker count. At most 2 batches per worker wait in memory (the DataLoader's prefetch),
    never the dataset. An unreadable image is the DataError naming it, as without workers."""
    workers = min(workers, len(batches)) if len(batches) > 1 else 0  # one batch: a worker would only add its start
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate_images)
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        yield batch


def index_batches(n: int, batch_size: int) -> list[list[int]]:
    """0 .. n-1 in consecutive batches of batch_size (the last one shorter)."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


@torch.no_grad()
def collect_memory_bank(backbone: Backbone, vlad: VLAD, images: list, batch_size: int = 8,
                        dtype: torch.dtype = torch.float32, progress: bool = False,
                        workers: int = 0) -> list[torch.Tensor]:
    """Eq. 9's B_i: the adapted patch tokens of the k normal images, L x (k * N, C) in `dtype`.

    The bank is allocated once at its final size and filled image by image (decoded `batch_size` at a time by
    `workers` DataLoader processes), so its peak is the bank itself plus one batch: the raw tokens of all k
    images (full-shot ViT-L: 400 x 4 x 1369 x 1024) and a second copy of the bank (the parts before a
    concatenation) never exist. fp16 halves it; the search still accumulates in fp32
    (`nearest_neighbour_distance`). Each image is adapted alone, so the bank is the same for any batch size."""
    dataset = ImageDataset(images, backbone.image_size, backbone.mean, backbone.std)
    batches = index_batches(len(images), batch_size)
    bank, row = None, 0
    for batch in tqdm(image_batches(dataset, batches, workers), total=len(batches), desc="memory bank",
                      unit="batch", disable=not progress):
        tokens, _ = backbone.encode_images(batch["pixels"])  # (b, L, N, width)
        for image_tokens in tokens:
            features = vlad.patch_features(image_tokens[None])  # L x (1, N, C), float32
            if bank is None:
                n_tokens, channels = features[0].shape[1:]
                bank = [torch.empty(len(images) * n_tokens, channels, dtype=dtype, device=features[0].device)
                        for _ in features]
            for stage, stage_features in zip(bank, features):
                stage[row * n_tokens:(row + 1) * n_tokens] = stage_features[0].to(dtype)
            row += 1
    return bank


# ---------------------------------------------------------------------------------------------------------
# Training data: samples from MVTec-layout roots, and the token cache
# ---------------------------------------------------------------------------------------------------------


def training_samples(data_roots: list, aux_roots: list) -> list[data.Sample]:
    """Generated roots (--data): test split (anomalies, soft masks) + train/good (normal, empty mask).
    Auxiliary roots (--aux): test split only (real masks), as the paper uses VisA for MVTec and vice versa."""
    samples = []
    for root, splits in [(r, ("test", "train")) for r in data_roots] + [(r, ("test",)) for r in aux_roots]:
        categories = data.list_categories(root)
        if not categories:
            raise DataError(f"{root}: no category folders with train/ or test/ inside.")
        for category in categories:
            found = [s for split in splits for s in data.read_split(root, category, split)
                     if split == "test" or s.label == 0]
            if not found:
                raise DataError(f"{Path(root) / category}: no images in {' or '.join(splits)}/; "
                                f"add images or remove the empty category folder.")
            samples.extend(found)
    return samples


ENTRY_NAMES = ("embedding", "tokens", "y_img", "y_pix")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlad/tokens, else ~/.cache/vlad/tokens: outside every run, so runs share it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlad" / "tokens"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenCache:
    """The frozen backbone's outputs per training image, computed once.

    mode 'disk': one safetensors file per image in `folder`, named by content: the backbone's signature (its
    weights hash, input size, stages, precision) and the bytes of the image and of its mask. So the folder can
    be shared by every run that sees the same image (reproduce.sh's 16 runs all read the auxiliary set's one
    copy), a changed image or backbone is never served a stale entry, and a copied dataset still hits. Entries
    are written atomically (data.save_bytes), so an interrupted run keeps what it finished and a reader never
    sees half a file. Runs and shards fill one folder together: an entry is claimed before it is computed (an
    exclusive flock, which the kernel drops when its process dies), and one that another live run has claimed is
    waited for, never computed twice. Entries are checked when they are listed, so one cut short is computed
    again with the missing ones, in batches; so is every entry another run evicts while this one trains.
    mode 'memory': kept in RAM; mode 'none': recomputed for every batch (the slow reference the cache must agree
    with). Images are decoded `batch_size` at a time by `workers` DataLoader processes. This process's counts:
    `computed`, `reused` (there already, or written meanwhile by another run), `unreadable` (there but cut
    short: computed again) and `evicted` (deleted by another run while this one trained: computed again)."""

    def __init__(self, backbone: Backbone, samples: list[data.Sample], mode: str = "disk", folder=None,
                 batch_size: int = 8, workers: int = 0):
        if mode not in ("disk", "memory", "none"):
            raise ValueError(f"cache mode must be disk, memory or none, got {mode!r}")
        self.backbone, self.samples, self.mode, self.batch_size = backbone, samples, mode, batch_size
        self.workers = workers
        self.images = ImageDataset([s.image for s in samples], backbone.image_size, backbone.mean, backbone.std,
                                   masks=[s.mask for s in samples])
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.computed = self.reused = self.unreadable = self.evicted = 0
        self.keys: list[str] = []
        if mode == "disk":
            signature = json.dumps(backbone.signature(), sort_keys=True)
            self.keys = [self._key(signature, s) for s in samples]

    @staticmethod
    def _key(signature: str, sample: data.Sample) -> str:
        parts = [signature, file_sha256(sample.image), file_sha256(sample.mask) if sample.mask else "-",
                 str(sample.label)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _file(self, index: int) -> Path:
        key = self.keys[index]
        return self.folder / key[:2] / f"{key}.safetensors"  # 256 subfolders: no folder of 100,000 files

    def _state(self, index: int) -> str:
        """'whole', 'missing' or 'unreadable', from the entry's header alone: safetensors refuses a header that
        does not cover the file exactly, so a file cut short is unreadable without reading its tensors."""
        try:
            with safe_open(str(self._file(index)), framework="pt") as handle:
                names = tuple(sorted(handle.keys()))
                stages = handle.get_slice("tokens").get_shape()[0] if "tokens" in names else None
        except FileNotFoundError:
            return "missing"
        except Exception:  # safetensors raises its own error types, OSError, ...
            return "unreadable"
        return "whole" if names == ENTRY_NAMES and stages == len(self.backbone.stages) else "unreadable"

    def _claim_file(self, index: int) -> Path:
        """Named like a temporary of the entry (`data.is_temporary`), so data.py's sweep of dead writers' files
        removes a dead claimer's, and no count of entries counts it."""
        entry = self._file(index)
        return entry.with_name(f".{entry.name}.claiming.tmp")

    def _claim(self, index: int) -> int | None:
        """An exclusive lock on the entry's claim file, held while this process computes the entry; None when
        another live process holds it."""
        path = self._claim_file(index)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.fstat(handle).st_ino == os.stat(path).st_ino:
                        return handle
                except BlockingIOError:
                    os.close(handle)
                    return None
                except FileNotFoundError:
                    pass
                os.close(handle)  # its holder released it (or a sweep removed it) before our lock: claim anew
        except OSError as error:
            raise data.disk_full_error(path.parent, error) or error

    def _release(self, index: int, handle: int) -> None:
        self._claim_file(index).unlink(missing_ok=True)  # while locked: no other process holds this file
        os.close(handle)

    def _wait(self, index: int) -> None:
        """Block until no live process holds the entry's claim: it wrote the entry, or it died."""
        try:
            handle = os.open(self._claim_file(index), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
        finally:
            os.close(handle)

    def _compute(self, batches: list[list[int]], busy: list[int] | None = None
                 ) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
        """Encode these batches of training images, write (disk) or keep (memory) their entries, and yield each
        batch's indices and entries: tokens (L, N, width) and embedding (C,) in the backbone's dtype on CPU,
        y_pix (S, S) uint8 (255 x the probability), y_img () float32. A disk entry is claimed first: one another
        live run is computing goes to `busy` instead, one written since it was listed is left out."""
        for indices, batch in zip(batches, image_batches(self.images, batches, self.workers)):
            claims = {}
            for index in indices if self.mode == "disk" else ():
                handle = self._claim(index)
                if handle is None:
                    busy.append(index)
                elif self._state(index) == "whole":
                    self._release(index, handle)
                else:
                    claims[index] = handle
            rows = [row for row, index in enumerate(indices) if self.mode != "disk" or index in claims]
            entries = []
            try:
                if rows:
                    tokens, embedding = self.backbone.encode_images(batch["pixels"][rows])  # (b, L, N, w), (b, C)
                    for row, image_tokens, image_embedding in zip(rows, tokens, embedding):
                        index = indices[row]
                        entry = {"tokens": image_tokens.cpu(), "embedding": image_embedding.cpu(),
                                 "y_pix": batch["y_pix"][row], "y_img": torch.tensor(float(self.samples[index].label))}
                        if self.mode == "disk":
                            data.save_bytes(safetensors.torch.save(entry), self._file(index))
                        elif self.mode == "memory":
                            self.memory[index] = entry
                        entries.append(entry)
            finally:
                for index, handle in claims.items():
                    self._release(index, handle)
            yield [indices[row] for row in rows], entries

    def _batches(self, indices: list[int]) -> list[list[int]]:
        return [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]

    def _fill_disk(self, todo: list[int], progress: bool) -> set[int]:
        """Compute the disk entries `todo`, in batches; returns those this process computed. An entry another
        live run is computing is waited for; if that run dies without writing it, a later round computes it."""
        mine: set[int] = set()
        bar = tqdm(total=len(todo), desc="caching backbone tokens", unit="img", disable=not progress)
        while todo:
            busy: list[int] = []
            waiting = 0
            batches = self._batches(todo)
            for batch, (indices, _) in zip(batches, self._compute(batches, busy)):
                mine.update(indices)
                bar.update(len(batch) - (len(busy) - waiting))  # those another run computes count once waited for
                waiting = len(busy)
            orphans = []
            for index in busy:
                self._wait(index)
                if self._state(index) == "whole":
                    bar.update(1)
                else:
                    orphans.append(index)  # its run died first: ours to compute
            todo = orphans
        bar.close()
        return mine

    def fill(self, rank: int = 0, world: int = 1, progress: bool = True) -> None:
        """Compute the missing (or unreadable) entries of this rank's shard."""
        if self.mode == "none":
            return
        indices = data.shard_jobs(list(range(len(self.samples))), rank, world)
        if self.mode == "memory":
            missing = [i for i in indices if i not in self.memory]
            bar = tqdm(total=len(missing), desc="caching backbone tokens", unit="img", disable=not progress)
            for computed, _ in self._compute(self._batches(missing)):
                bar.update(len(computed))
            bar.close()
            self.computed, self.reused = self.computed + len(missing), self.reused + len(indices) - len(missing)
            return
        states = {index: self._state(index) for index in indices}
        mine = self._fill_disk([index for index in indices if states[index] != "whole"], progress)
        unreadable = sum(states[index] == "unreadable" for index in mine)
        self.computed, self.unreadable = self.computed + len(mine) - unreadable, self.unreadable + unreadable
        self.reused += len(indices) - len(mine)

    def _read(self, index: int) -> dict[str, torch.Tensor] | None:
        """One disk entry; None when it is gone or unreadable."""
        try:
            entry = load_file(str(self._file(index)))
        except Exception:  # safetensors raises its own error types, OSError, ...
            return None
        if tuple(sorted(entry)) != ENTRY_NAMES or entry["tokens"].shape[0] != len(self.backbone.stages):
            return None
        return entry

    def _read_batch(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The disk entries of one training batch. When one is gone (another run evicted it) or broke, every
        entry that is gone is computed again at once, in batches, not one image at a time as it comes up."""
        entries = [self._read(index) for index in indices]
        if any(entry is None for entry in entries):
            gone = [index for index in range(len(self.samples)) if self._state(index) != "whole"]
            self.evicted += len(self._fill_disk(gone, progress=False))
            entries = [entry if entry is not None else self._read(index) for index, entry in zip(indices, entries)]
            if any(entry is None for entry in entries):
                raise DataError(f"{self._file(indices[entries.index(None)])}: a token cache entry cannot be read "
                                f"even after computing it again; is {self.folder} writable?")
        return entries

    def evict(self, indices) -> int:
        """Delete the disk entries of these images (a generated set no later run trains on); returns how many.
        A run still training on one of them computes it again, so this is safe while others use the folder."""
        removed = 0
        for index in indices if self.mode == "disk" else ():
            try:
                self._file(index).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def batches(self, batches: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        """The stacked entries of each batch of training images, in order, y_pix as float32 probabilities.
        Without a cache, every batch is decoded (ahead, by the workers) and encoded again."""
        if self.mode == "none":
            rows = (entries for _, entries in self._compute(batches))
        elif self.mode == "memory":
            rows = ([self.memory[i] for i in batch] for batch in batches)
        else:
            rows = (self._read_batch(batch) for batch in batches)
        for entries in rows:
            batch = {name: torch.stack([entry[name] for entry in entries]) for name in ENTRY_NAMES}
            batch["y_pix"] = batch["y_pix"].float() / 255.0
            yield batch


# ---------------------------------------------------------------------------------------------------------
# Checkpoints, one consistent unit: RUN/train_state.safetensors holds the adapters, Adam, the scheduler, the
# epoch, the config and the whole log. The files users read are derived from it after it is written:
# vlad.safetensors (the adapters, with the config and epoch in its own metadata, which is what predict reads),
# config.json and log.jsonl. A kill between two writes leaves them one epoch behind, never inconsistent, and
# the next train (resumed or finished) rewrites them from the state. Never pickled.
# ---------------------------------------------------------------------------------------------------------

ADAPTERS_FILE = "vlad.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
LOG_FILE = "log.jsonl"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Adam's per-parameter state as flat tensors, and its param groups (JSON-able)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def write_derived_files(run: Path, adapters: dict[str, torch.Tensor], config: dict, log: list[dict]) -> None:
    """vlad.safetensors, config.json and log.jsonl from one state; each written only if it differs."""
    metadata = {"epoch": str(config["epoch"]), "config": json.dumps(config, sort_keys=True)}
    adapters_file = run / ADAPTERS_FILE
    try:
        with safe_open(str(adapters_file), framework="pt") as handle:
            current = handle.metadata() == metadata
    except Exception:  # missing or unreadable: write it
        current = False
    if not current:
        data.save_bytes(safetensors.torch.save(adapters, metadata=metadata), adapters_file)
    for text, path in ((json.dumps(config, indent=2, sort_keys=True) + "\n", run / CONFIG_FILE),
                       ("".join(json.dumps(record) + "\n" for record in log), run / LOG_FILE)):
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            data.save_text(text, path)


def save_checkpoint(run: Path, vlad: VLAD, optimizer, scheduler, config: dict, log: list[dict]) -> None:
    """The training state first (one atomic file: the unit a resume trusts), then the files derived from it."""
    adapters = {k: v.detach().contiguous() for k, v in vlad.state_dict().items()}
    optimizer_tensors, param_groups = optimizer_to_tensors(optimizer)
    metadata = {"epoch": str(config["epoch"]), "config": json.dumps(config), "log": json.dumps(log),
                "param_groups": json.dumps(param_groups), "scheduler": json.dumps(scheduler.state_dict())}
    tensors = {**{f"vlad.{k}": v for k, v in adapters.items()}, **optimizer_tensors}
    data.save_bytes(safetensors.torch.save(tensors, metadata=metadata), run / STATE_FILE)
    write_derived_files(run, adapters, config, log)


def load_train_state(run: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """-> (config, tensors, metadata) of RUN/train_state.safetensors."""
    path = run / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(metadata["config"])
    except Exception as error:
        raise DataError(f"{path}: cannot read the training state ({str(error)[:120]}); run the same command with "
                        f"--restart in place of --resume, {restart_does(run)}.") from None
    return config, tensors, metadata


def aside_folder(run: Path) -> Path:
    """Where --restart moves a run's files: RUN/old-1, or the next number not taken."""
    number = 1
    while (run / f"old-{number}").exists():
        number += 1
    return run / f"old-{number}"


def restart_does(run: Path) -> str:
    return f"which moves its files to {aside_folder(run)} and trains from scratch"


def move_run_aside(run: Path) -> Path | None:
    """--restart: move the files `train` writes into RUN/old-N, so a run that cannot be resumed (an unreadable
    state, other settings) starts fresh and nothing is deleted; returns the folder, or None if there was nothing."""
    present = [run / name for name in (STATE_FILE, ADAPTERS_FILE, CONFIG_FILE, LOG_FILE) if (run / name).exists()]
    if not present:
        return None
    folder = aside_folder(run)
    folder.mkdir(parents=True)
    for path in present:
        os.replace(path, folder / path.name)
    return folder


def load_detector(run, model: str | None = None, pretrained: str | None = None, device: str = "cpu",
                  precision: str = "fp32") -> tuple[Backbone, VLAD, dict]:
    """The backbone the adapters of RUN were trained on (or the one given, which must compute the same thing:
    a local copy, another precision) with the trained adapters on it; and the config they were saved with."""
    run = Path(run)
    adapters_path = run / ADAPTERS_FILE
    if not adapters_path.is_file():
        raise DataError(f"{run}: no {ADAPTERS_FILE}; pass the --out folder of `vlad.py train`.")
    try:
        with safe_open(str(adapters_path), framework="pt") as handle:
            config = json.loads((handle.metadata() or {})["config"])
            adapters = {key: handle.get_tensor(key) for key in handle.keys()}
        required = ("model", "pretrained", "image_size", "stages", "width", "embed_dim", "backbone")
        missing = [key for key in required if key not in config]
    except Exception as error:
        raise DataError(f"{adapters_path}: cannot read the checkpoint ({str(error)[:120]}); is it complete, and "
                        f"written by this version of `vlad.py train`?") from None
    if missing:
        raise DataError(f"{adapters_path}: its config lacks {', '.join(missing)}; it was not written by this "
                        f"version of `vlad.py train`.")
    model_name = model or config["model"]
    # --pretrained alone (a local weights file) is used; --model alone keeps the recorded tag, never random weights
    pretrained = pretrained if pretrained is not None else config["pretrained"]
    backbone = Backbone(model_name, pretrained, config["image_size"], stages=None, device=device,
                        precision=precision)
    trained = f"{config['model']} with {config['pretrained']!r}"
    if (backbone.width, backbone.embed_dim) != (config["width"], config["embed_dim"]) \
            or max(config["stages"]) > backbone.depth:
        raise DataError(f"{adapters_path}: the adapters were trained on {trained} (width {config['width']}, "
                        f"embedding {config['embed_dim']}, blocks {config['stages']}) but {model_name} has width "
                        f"{backbone.width}, embedding {backbone.embed_dim} and {backbone.depth} blocks; "
                        f"use the backbone the checkpoint was trained with.")
    backbone.stages = list(config["stages"])
    recorded, found = config["backbone"], backbone.identity()
    if recorded["rounding"] != found["rounding"]:
        trained_precision = "bf16" if recorded["rounding"] == "bfloat16" else "fp16 or fp32"
        raise DataError(f"{adapters_path}: trained with a {trained_precision} backbone, whose weights hash cannot be "
                        f"compared with a --precision {precision} one; predict with --precision {trained_precision}.")
    if recorded != found:
        what = "weights" if recorded["weights_sha256"] != found["weights_sha256"] else "layers (e.g. QuickGELU vs GELU)"
        raise DataError(f"{adapters_path}: the adapters were trained on {trained}, but {model_name} with "
                        f"{pretrained!r} has other {what} (weights sha256 {found['weights_sha256'][:12]} instead of "
                        f"{recorded['weights_sha256'][:12]}); every score would silently change, so predict with "
                        f"the backbone the checkpoint was trained with.")
    vlad = VLAD(config["width"], config["embed_dim"], len(config["stages"]))
    try:
        vlad.load_state_dict(adapters)
    except RuntimeError as error:
        raise DataError(f"{adapters_path}: the adapters do not match their config ({str(error)[:120]}).") from None
    return backbone, vlad.to(backbone.device).eval(), config


# ---------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of one epoch, a function of (seed, epoch) only: a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train(backbone: Backbone, samples: list[data.Sample], run, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
          lr: float = LR, seed: int = SEED, omega: float = OMEGA, gamma: float = FOCAL_GAMMA,
          alpha: float = FOCAL_ALPHA, beta: float = DICE_BETA, cache: str = "disk", extract_batch: int = 8,
          resume: bool = False, rank: int = 0, world: int = 1, progress: bool = True, extra_config=None,
          terms: str = "both", cache_dir=None, report=None, evict: list[data.Sample] = (),
          workers: int = 0, restart: bool = False) -> VLAD | None:
    """Train the adapters on `samples`, checkpointing RUN after every epoch; returns the trained VLAD (None on
    a rank that only fills its share of the token cache). `report(TokenCache)` is called once it is filled;
    the disk cache entries of `evict` (training images no later run needs: this run's generated set, or a set
    several runs shared once the last of them is trained) are deleted once the last epoch is saved. `workers`
    DataLoader processes decode the images (0: this process); the weights are the same for every count.
    `restart` trains from scratch over a checkpoint in RUN (the CLI moves it aside first: `move_run_aside`)."""
    run = Path(run)
    config = {
        "model": backbone.model_name, "pretrained": backbone.pretrained, "image_size": backbone.image_size,
        "stages": backbone.stages, "precision": backbone.precision, "backbone": backbone.identity(),
        "width": backbone.width, "embed_dim": backbone.embed_dim,
        "logit_scale": LOGIT_SCALE, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "omega": omega, "focal_gamma": gamma, "focal_alpha": alpha, "dice_beta": beta, "loss_terms": terms,
        "n_samples": len(samples), "samples_sha1": hashlib.sha1(
            "\n".join(f"{Path(s.image).resolve()}|{s.label}" for s in samples).encode()).hexdigest(),
        **(extra_config or {}),
    }
    if (run / STATE_FILE).is_file() and not resume and not restart:
        raise DataError(f"{run}: already holds a checkpoint; pass --resume to continue it, --restart "
                        f"({restart_does(run)}), or choose another --out.")
    saved_state, log = None, []
    if resume and (run / STATE_FILE).is_file():
        saved, tensors, metadata = load_train_state(run)
        changed = [k for k in config if saved.get(k) != config[k]]
        if changed:
            raise DataError(f"{run / STATE_FILE}: was trained with other settings ({', '.join(changed)}); resume "
                            f"with the same flags, pass --restart in place of --resume ({restart_does(run)}), or "
                            f"choose another --out.")
        saved_state, log = (tensors, metadata), json.loads(metadata.get("log", "[]"))

    torch.manual_seed(seed)
    vlad = VLAD(backbone.width, backbone.embed_dim, len(backbone.stages)).to(backbone.device)
    start_epoch = 0
    if saved_state is not None:
        tensors, metadata = saved_state
        vlad.load_state_dict({k[len("vlad."):]: v for k, v in tensors.items() if k.startswith("vlad.")})
        start_epoch = int(metadata["epoch"])
        if start_epoch >= epochs:  # finished: a re-run (e.g. of reproduce.sh) does no work, and repairs the
            #                        derived files if a kill left them behind the state
            write_derived_files(run, {k: v.contiguous() for k, v in vlad.state_dict().items()},
                                {**config, "epoch": start_epoch}, log)
            if evict:  # a kill after the last checkpoint may have kept them; only their files are hashed
                TokenCache(backbone, list(evict), cache, cache_dir, extract_batch).evict(range(len(evict)))
            return vlad

    token_cache = TokenCache(backbone, samples, cache, cache_dir, extract_batch, workers)
    token_cache.fill(rank, world, progress)
    if report is not None:
        report(token_cache)
    if world > 1:
        if not torch.distributed.is_initialized():
            return None  # --shard i/n: this process fills its share of the cache; a later plain run trains
        torch.distributed.barrier()  # torchrun: rank 0 trains once every rank's tokens are on disk
        if rank != 0:
            return None

    optimizer = torch.optim.Adam(vlad.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if saved_state is not None:
        tensors, metadata = saved_state
        optimizer.load_state_dict(optimizer_from_tensors(tensors, json.loads(metadata["param_groups"])))
        scheduler.load_state_dict(json.loads(metadata["scheduler"]))

    # epoch 0 = untrained adapters = zero-shot CLIP; `--epochs 0` gives that detector (and an empty log). A
    # resumed run rewrites the derived files too, in case a kill left them behind the state.
    config["epoch"] = start_epoch
    save_checkpoint(run, vlad, optimizer, scheduler, config, log)

    text_features = {c: backbone.text_features(c).to(backbone.device) for c in sorted({s.category for s in samples})}
    sample_text = torch.stack([text_features[s.category] for s in samples])  # (n, 2, C)
    for epoch in range(start_epoch, epochs):
        started, total, count = time.time(), 0.0, 0
        lr_used = optimizer.param_groups[0]["lr"]  # the scheduler steps after the epoch: log what it used
        order = epoch_order(len(samples), seed, epoch)
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        bar = tqdm(zip(batches, token_cache.batches(batches)), total=len(batches), desc=f"epoch {epoch + 1}/{epochs}",
                   unit="batch", disable=not progress)
        for indices, batch in bar:
            batch = {k: v.to(backbone.device) for k, v in batch.items()}
            stage_logits, image_logits = vlad(batch["tokens"], batch["embedding"], sample_text[indices],
                                              backbone.image_size)
            loss = vlad_loss(image_logits, batch["y_img"], stage_logits, batch["y_pix"], omega, gamma, alpha, beta,
                             terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(indices), count + len(indices)
            bar.set_postfix(loss=f"{total / count:.4f}")
        scheduler.step()
        log.append({"epoch": epoch + 1, "loss": total / count, "lr": lr_used,
                    "seconds": round(time.time() - started, 3)})
        config["epoch"] = epoch + 1
        save_checkpoint(run, vlad, optimizer, scheduler, config, log)  # the log line is part of the state
    if evict:
        TokenCache(backbone, list(evict), cache, cache_dir, extract_batch).evict(range(len(evict)))
    return vlad


# ---------------------------------------------------------------------------------------------------------
# Prediction. What to score is planned and checked first, every category of a benchmark (or the one folder of
# photos of --images) before anything is written; then one loop scores both: the memory bank of the k normal
# references, maps, overlays, scores.csv and index.html, the page that shows them most anomalous first.
# ---------------------------------------------------------------------------------------------------------

MAP_SIZE = 1024  # --images: the long side of maps and overlays (a 12 MP photo's map: 3 MB instead of 48 MB)
K_SHOT_FILE = "k_shot.json"
INDEX_FILE = "index.html"


@dataclass(frozen=True)
class Photo:
    """One image to score and where its outputs go, relative to its prediction folder."""

    image: Path
    map: str  # the float32 map, also scores.csv's path: test/<defect>/<stem>.tiff, or maps/<stem>.tiff
    overlay: str  # overlay/<defect>/<stem>.png, or overlay/<stem>.png
    name: str  # what the page shows: test/<defect>/<file name>, or the photo's file name
    label: str | None  # the benchmark's defect ('good' for a normal image); None for a photo of one's own


@dataclass
class PredictionSet:
    """Everything one prediction folder needs, checked before anything is written."""

    folder: Path  # PRED/<category>, or OUT for --images
    object_name: str  # the object in the prompts: the category (`_` read as a space) or --object
    photos: list[Photo]
    references: list[Path]  # the k normal images of the memory bank; none: zero-shot
    record: dict  # k_shot.json: what the folder's outputs are made with (references, map size, detector)
    map_size: int | None  # long side of maps and overlays; None: each image's own size (the benchmark's masks)
    detector: str = ""  # the checkpoint and backbone, as the page's header names them

    @property
    def labelled(self) -> bool:
        """A benchmark's category, whose folders give each image's ground truth, not photos of one's own."""
        return self.photos[0].label is not None


def output_name(text: str, what: str) -> str:
    """A part of an output path that comes from user input (a category, a defect, a photo's stem): refused when it
    could leave --out or hide its file."""
    if not text or text.startswith(".") or any(c in text for c in "/\\\0"):
        raise DataError(f"{what} {text!r}: cannot name a file or folder inside --out (it is empty, hidden, '..' "
                        f"or holds a path separator); rename it.")
    return text


def plan_category(root, category: str, k: int | None, seed: int, out, map_size: int | None) -> PredictionSet:
    """A benchmark category: its test split (labels from the folders), the k normal images of train/good for the
    seed (None: all of them), maps at each image's own size unless `map_size` is given."""
    root = Path(root)
    output_name(category, "category")
    test = data.read_split(root, category, "test")
    if not test:
        raise DataError(f"{root / category}/test: no test images; add them or remove the category folder.")
    photos = []
    for sample in test:
        output_name(sample.image.stem, f"{sample.image}: the stem")
        data.check_image(sample.image)
        photos.append(Photo(sample.image, data.prediction_path(sample),
                            f"overlay/{sample.defect}/{sample.image.stem}.png",
                            f"test/{sample.defect}/{sample.image.name}", sample.defect))
    clash = duplicate_maps(photos)
    if clash:
        raise DataError(f"{clash[0]} and {clash[1].name}: two test images of one defect share a file name stem, so "
                        f"their anomaly maps would share one .tiff; rename one.")
    chosen = data.k_shot_images(root, category, k, seed)
    for image in chosen:
        data.check_image(image)
    record = {"k": len(chosen), "seed": seed, "images": [p.relative_to(root / category).as_posix() for p in chosen],
              "map_size": map_size}
    return PredictionSet(Path(out) / category, category, photos, chosen, record, map_size)


def duplicate_maps(photos: list[Photo]) -> tuple[Path, Path] | None:
    """The first two images whose maps would share one file, if any."""
    seen: dict[str, Path] = {}
    for photo in photos:
        if seen.setdefault(photo.map, photo.image) != photo.image:
            return seen[photo.map], photo.image
    return None


def list_photos(paths: list, flag: str) -> list[Path]:
    """Files as named, and the images of named folders (not their sub-folders), each file once, in that order."""
    found, seen = [], set()
    for path in map(Path, paths):
        if path.is_dir():
            files = data.list_images(path)
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{flag} {path}: no such file or folder.")
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                found.append(file)
    return found


def plan_photos(images: list, normals: list, k: int | None, seed: int, object_name: str | None, out,
                map_size: int) -> PredictionSet:
    """Photos of one's own (--images), no labels or masks, scored against the normal references (--normals; k of
    them for the seed, None: all; none: zero-shot) as photos of `object_name`. Outputs go to OUT/maps/<stem>.tiff
    and OUT/overlay/<stem>.png, so two photos may not share a stem."""
    if not object_name or not object_name.strip():
        raise DataError("--images needs --object NAME, what the photos show (e.g. --object \"cookie\"): the prompts "
                        "compare each photo with 'a photo of a NAME' and 'a photo of a damaged NAME'.")
    photos = list_photos(images, "--images")
    if not photos:
        raise DataError(f"--images {' '.join(map(str, images))}: no image files found (extensions "
                        f"{', '.join(data.IMAGE_EXTENSIONS)}; sub-folders are not searched).")
    references = list_photos(normals, "--normals")
    if normals and not references:
        raise DataError(f"--normals {' '.join(map(str, normals))}: no image files found; give the photos of good "
                        f"parts, or leave --normals out for zero-shot.")
    by_size: dict[int, list[Path]] = {}
    for reference in references:
        by_size.setdefault(reference.stat().st_size, []).append(reference)
    planned = []
    for image in photos:
        output_name(image.stem, f"{image}: the stem")
        for reference in by_size.get(image.stat().st_size, []):  # a copy has the same size: hash only those
            if image.resolve() == reference.resolve() or file_sha256(image) == file_sha256(reference):
                raise DataError(f"{image} is both a photo to score and a normal reference ({reference}); in the "
                                f"memory bank it would score as normal against itself, so leave it out of one.")
        planned.append(Photo(image, f"maps/{image.stem}.tiff", f"overlay/{image.stem}.png", image.name, None))
    clash = duplicate_maps(planned)
    if clash:
        raise DataError(f"{clash[0]} and {clash[1]} share the name {clash[0].stem!r}, so their maps would share "
                        f"maps/{clash[0].stem}.tiff; rename one, or score them into separate --out folders.")
    for image in photos + references:
        data.check_image(image)
    k = len(references) if k is None else k
    if k > len(references):
        raise DataError(f"--k-shot {k}: asks for more references than the {len(references)} given with --normals.")
    chosen = data.select_k_shot(references, k, seed)
    record = {"k": k, "seed": seed, "images": [str(p.resolve()) for p in chosen], "object": object_name,
              "map_size": map_size}
    return PredictionSet(Path(out), object_name, planned, chosen, record, map_size)


def adapters_sha256(vlad: VLAD) -> str:
    """A hash of the adapters' weights. k_shot.json records it, so a checkpoint retrained under the same path never
    continues another detector's prediction."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vlad.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_record(prediction: PredictionSet) -> None:
    """Refuse to continue a folder whose predictions were made with other references, map size or detector. A
    folder without predictions takes the new record: a start that failed on bad input never blocks another."""
    folder, record = prediction.folder, prediction.record
    if not score_parts(folder):
        return
    k_shot_file = folder / K_SHOT_FILE
    try:
        previous = json.loads(k_shot_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    changed = [key for key in record if previous.get(key) != record[key]]
    if changed:
        now = ", ".join(f"{key} {str(previous.get(key))[:16]!r} there, {str(record[key])[:16]!r} now"
                        for key in changed[:2])
        retrained = " (the checkpoint was retrained)" if "adapters_sha256" in changed else ""
        raise DataError(f"{k_shot_file}: the predictions in {folder} were made with another "
                        f"{', '.join(changed)}{retrained} ({now}); choose another --out, so that no folder mixes two.")


def map_shape(size: tuple[int, int], map_size: int | None) -> tuple[int, int]:
    """(width, height) of an image's map: its own size, or its aspect ratio with the long side at most map_size."""
    width, height = size
    if map_size is None or max(width, height) <= map_size:
        return width, height
    scale = map_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def score_parts(folder: Path) -> dict[str, float]:
    """Every image score recorded by any shard: {map path relative to the prediction folder: score}."""
    scores = {}
    for part in sorted((folder / "scores_parts").glob("*.jsonl")):
        for record in data.read_jsonl(part):
            scores[record["path"]] = record["score"]
    return scores


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """I-AUC for the page: the fraction of (anomalous, normal) pairs ranked right, a tie counting one half (the
    Mann-Whitney statistic, equal to the area under the ROC curve). None with one class only."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    if not len(positive) or not len(negative):
        return None
    pairs = positive[:, None] - negative[None, :]
    return float(((pairs > 0) + 0.5 * (pairs == 0)).mean())


PAGE = string.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header p { margin: .3em 0; }
.legend { display: flex; align-items: center; gap: .5em; margin: .8em 0 1.2em; font-size: 14px; }
.bar { width: 320px; height: 14px; border: 1px solid #888; background: linear-gradient(to right, $stops); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 12px; }
.card { margin: 0; padding: 6px; border: 1px solid #ccc; border-radius: 4px; background: #fafafa; }
.card img { display: block; width: 100%; height: 190px; object-fit: contain; background: #e8e8e8; }
.card figcaption { margin-top: 4px; font-size: 13px; overflow-wrap: anywhere; }
.rank { font-weight: bold; } .score { font-family: monospace; font-size: 14px; }
.label { padding: 0 .3em; border-radius: 3px; color: #fff; background: #b22; } .label.good { background: #282; }
</style></head>
<body>
<header>
<h1>$title</h1>
<p><b>Detector:</b> $detector</p>
<p><b>Normal references:</b> $references</p>
<p><b>Made</b> $made. $summary</p>
<div class="legend"><span>0</span><div class="bar"></div><span>$scale</span>
<span>overlay colour: the anomaly map's value on one fixed scale for every card ($scale_note), blended half and half
over the image</span></div>
</header>
<main class="cards">
$cards
</main>
</body></html>
""")
CARD = string.Template("""<figure class="card"><a href="$overlay"><img src="$overlay" alt="overlay of $name" \
loading="lazy"></a><figcaption><span class="rank">#$rank</span> <span class="score">$score</span>$label<br>
<span class="name">$name</span></figcaption></figure>""")


def write_index(prediction: PredictionSet, scores: dict[str, float], full_scale: int) -> None:
    """PRED/<category>/index.html or OUT/index.html: a static page (no script, no server, relative links) with one
    card per image, most anomalous first, its overlay linked to the full size; a header naming the detector, the
    references and the time, and one colour legend for the overlays' fixed scale."""
    def text(value) -> str:
        return html.escape(str(value), quote=True)

    def label(photo: Photo) -> str:
        kind = "label good" if photo.label == "good" else "label"
        return "" if photo.label is None else f' <span class="{kind}">{text(photo.label)}</span>'

    photos = sorted(prediction.photos, key=lambda p: (-scores[p.map], p.name))
    cards = [CARD.substitute(overlay=text(urllib.parse.quote(photo.overlay)), name=text(photo.name), rank=rank,
                             score=f"{scores[photo.map]:.4f}", label=label(photo))
             for rank, photo in enumerate(photos, start=1)]
    record, k = prediction.record, prediction.record["k"]
    listed = text(", ".join(p if prediction.labelled else Path(p).name for p in record["images"]))
    references = "none: zero-shot, the text prompts alone (k = 0)" if k == 0 else \
        f"k = {k} (seed {record['seed']}): {listed}" if k <= 8 else \
        f"<details><summary>k = {k} (seed {record['seed']})</summary>{listed}</details>"
    summary = f"{len(photos)} photos; their scores are " + ("S_VL + S_VV (Eq. 8, 9)." if k else "S_VL (Eq. 8).")
    if prediction.labelled:
        labels = np.array([p.label != "good" for p in photos], dtype=int)
        auroc = image_auroc(np.array([scores[p.map] for p in photos]), labels)
        summary = (f"{len(photos)} test images, {labels.sum()} anomalous; I-AUC of these scores and labels: "
                   + ("n/a (one class only)" if auroc is None else f"{100 * auroc:.1f} %") + ".")
    stops = ", ".join(f"rgb({', '.join(str(round(255 * c)) for c in data._jet(np.array(v)))}) {100 * v:g}%"
                      for v in np.linspace(0.0, 1.0, 9))  # jet is linear between eighths: the bar is exact
    stages = full_scale // (2 if k else 1)
    page = PAGE.substitute(
        title=text(f"{prediction.object_name}: {len(photos)} {'test images' if prediction.labelled else 'photos'}, "
                   f"most anomalous first"),
        detector=text(prediction.detector), references=references, made=text(time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        summary=text(summary), stops=stops, scale=full_scale,
        scale_note=text(f"{stages} stages of M_VL, at most 1 each" + (", plus as many of M_VV" if k else "")),
        cards="\n".join(cards))
    data.save_text(page, prediction.folder / INDEX_FILE)


def write_scores(prediction: PredictionSet, full_scale: int) -> bool:
    """scores.csv once every image has a score (whichever shard finishes last writes it), and index.html with
    it; False while images are left. A re-run that finds everything done writes nothing."""
    scores = score_parts(prediction.folder)
    if any(photo.map not in scores for photo in prediction.photos):
        return False
    plain = not prediction.labelled  # photos of one's own: which photo it was is a column of its own
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score"] + (["image"] if plain else []))
    for photo in sorted(prediction.photos, key=lambda p: p.map):
        writer.writerow([photo.map, repr(float(scores[photo.map]))] + ([str(photo.image.resolve())] if plain else []))
    target = prediction.folder / "scores.csv"
    changed = not target.is_file() or target.read_text(encoding="utf-8") != buffer.getvalue()
    if changed:
        data.save_text(buffer.getvalue(), target)
    if changed or not (prediction.folder / INDEX_FILE).is_file():
        write_index(prediction, scores, full_scale)
    return True


def write_outputs(folder: Path, photo: Photo, image: np.ndarray, anomaly_map: torch.Tensor, full_scale: int) -> None:
    """One image's outputs: its map, upsampled from the input size (S, S) to the image's (H, W, 3) (already at its
    map size), as a float32 TIFF, and its overlay on the fixed colour scale as a PNG compressed fast (zlib level 1:
    PIL's default level 6 took 3.2x as long on a 1024 x 1024 overlay, `bench.py vlad --predict-io`, for 14% fewer
    bytes)."""
    height, width = image.shape[:2]
    full = F.interpolate(anomaly_map[None, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].cpu().numpy()
    data.save_tiff(full, folder / photo.map)
    png = io.BytesIO()  # encoded in memory: PIL's encoder would not notice a full disk cutting the file short
    Image.fromarray(data.overlay(image, np.clip(full / full_scale, 0.0, 1.0))).save(png, format="PNG",
                                                                                   compress_level=1)
    data.save_bytes(png.getvalue(), folder / photo.overlay)


def predict_set(backbone: Backbone, vlad: VLAD, prediction: PredictionSet, rank: int = 0, world: int = 1,
                batch_size: int = 8, chunk: int = NN_CHUNK, progress: bool = True,
                bank_dtype: torch.dtype = torch.float32, workers: int = 0) -> dict:
    """Maps, overlays and scores of this shard's images that are not done yet, then (once every shard is done)
    scores.csv and index.html. The one loop of both kinds of input; returns a small summary. `workers`
    DataLoader processes decode the images (resized to the map's size there)."""
    folder = prediction.folder
    done = score_parts(folder)
    jobs = [photo for photo in data.shard_jobs(prediction.photos, rank, world) if photo.map not in done]
    record, k_shot_file = json.dumps(prediction.record, indent=2) + "\n", folder / K_SHOT_FILE
    if jobs and (not k_shot_file.is_file() or k_shot_file.read_text(encoding="utf-8") != record):
        data.save_text(record, k_shot_file)  # check_record has accepted it: the provenance of what follows
    # Text features and the bank only when images are left: a re-run of a finished prediction costs nothing
    text = backbone.text_features(prediction.object_name).to(backbone.device) if jobs else None
    memory_bank = None
    if prediction.references and jobs:  # every rank builds the whole bank (k images) itself
        memory_bank = collect_memory_bank(backbone, vlad, prediction.references, batch_size, bank_dtype,
                                          workers=workers)
    # The overlay's colour scale is fixed per detector, so one colour is one value in every overlay: each stage
    # adds at most 1 to M_VL, and M_VV's distance is saturated at 1 (cosine 0) per stage.
    full_scale = len(backbone.stages) * (2 if prediction.references else 1)

    part = folder / "scores_parts" / f"shard-{rank}-of-{world}.jsonl"
    images = ImageDataset([photo.image for photo in jobs], backbone.image_size, backbone.mean, backbone.std,
                          originals=True, map_size=prediction.map_size)
    batches = index_batches(len(jobs), batch_size)
    bar = tqdm(total=len(jobs), desc=f"{prediction.object_name} (k={len(prediction.references)})", unit="img",
               disable=not progress)
    for indices, batch in zip(batches, image_batches(images, batches, workers)):
        tokens, embedding = backbone.encode_images(batch["pixels"])
        for index, image_tokens, image_embedding, image in zip(indices, tokens, embedding, batch["image"]):
            # detected alone, as encoded: the same bits in any batch or shard
            anomaly_map, score = vlad.detect(image_tokens[None], image_embedding[None], text[None],
                                             backbone.image_size, memory_bank, chunk)
            write_outputs(folder, jobs[index], image.numpy(), anomaly_map[0], full_scale)
            data.append_jsonl({"path": jobs[index].map, "score": float(score[0])}, part)  # after its files: done
        bar.update(len(indices))
    bar.close()
    return {"name": prediction.object_name, "k": len(prediction.references), "images": len(jobs),
            "complete": write_scores(prediction, full_scale)}


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> str:
    """cuda (under torchrun: cuda:LOCAL_RANK, one GPU per rank) if available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu.")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else device


def resolve_precision(precision: str, device: str) -> str:
    """'auto': fp16 on CUDA (the frozen backbone does not need more), fp32 on CPU."""
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return precision


def init_distributed(world: int, shard: str | None) -> None:
    """Under torchrun (no --shard), a gloo group lets rank 0 wait for every rank's tokens before training."""
    if world > 1 and not shard and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


def number(convert: type, minimum: float, maximum: float | None = None, above: bool = False):
    """An argparse type: a finite int or float from `minimum` (or above it) to `maximum`. Checked at parse time,
    so `--epochs -1` (which trained nothing), `--lr nan` and `--lr -1` (a traceback mid-run) are one sentence
    before a model loads."""
    what = "a whole number" if convert is int else "a finite number"
    bounds = (f"above {minimum:g}" if above else f"of at least {minimum:g}") + \
        (f" and at most {maximum:g}" if maximum is not None else "")

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if above else value >= minimum)
                and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    return parse


positive_int = number(int, 1)  # batch and chunk sizes, image and map sides: 0 would never advance a loop
SEED_TYPE = number(int, 0, 2**32 - 1)  # torch, numpy and random all take it


def stage_list(text: str) -> list[int]:
    """argparse type of --stages: distinct 1-based block numbers joined by commas."""
    try:
        stages = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"block numbers joined by commas (1-based, e.g. 6,12,18,24) expected, "
                                         f"got {text!r}") from None
    if len(set(stages)) != len(stages):
        raise argparse.ArgumentTypeError(f"each block once, got {text!r}")
    return stages


BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def command_train(args) -> int:
    rank, world = data.resolve_shard(args.shard)
    init_distributed(world, args.shard)
    if args.cache == "memory" and world > 1:
        raise DataError("--cache memory cannot be shared across shards; use --cache disk.")
    for root in args.data + args.aux + args.evict_tokens:
        if not Path(root).is_dir():
            raise DataError(f"{root}: no such dataset folder.")
    data.check_output_folder(args.out)  # before the model loads: a typo costs one sentence
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache == "disk":
        data.check_output_folder(cache_dir, "--cache-dir")
        data.remove_dead_temporaries(cache_dir, recursive=True)  # what killed runs left; live writers' stay
    data.remove_dead_temporaries(args.out)  # the run folder's own files (old-N/ holds moved ones, never temporaries)
    samples = training_samples(args.data, args.aux)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    backbone = Backbone(args.model, args.pretrained, args.image_size, args.stages, device, precision)
    started = time.time()
    state_file = Path(args.out) / STATE_FILE
    if args.restart and rank == 0 and (world == 1 or torch.distributed.is_initialized()):  # the process that trains
        moved = move_run_aside(Path(args.out))
        if moved is not None:
            print(f"--restart: moved the previous run's files to {moved}; training from scratch.", flush=True)
    done_before = int(load_train_state(Path(args.out))[2]["epoch"]) if args.resume and state_file.is_file() else 0

    caches = []

    def report(cache: TokenCache) -> None:
        if cache.mode == "disk":
            caches.append(cache)
            print(f"token cache {cache.folder}: {cache.computed} computed, {cache.reused} reused, "
                  f"{cache.unreadable} unreadable (computed again)", flush=True)

    extra = {"data": [str(Path(r).resolve()) for r in args.data], "aux": [str(Path(r).resolve()) for r in args.aux]}
    vlad = train(backbone, samples, args.out, args.epochs, args.batch_size, args.lr, args.seed, args.omega,
                 args.focal_gamma, args.focal_alpha, args.dice_beta, args.cache, args.extract_batch, args.resume,
                 rank, world, progress=not args.quiet, extra_config=extra, terms=args.loss, cache_dir=cache_dir,
                 report=report, evict=training_samples(args.evict_tokens, []) if args.evict_tokens else [],
                 workers=args.workers, restart=args.restart)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if vlad is None:
        after = "run train again without --shard to train" if args.shard else "rank 0 trains"
        print(f"shard {rank}/{world}: cached the tokens of its {len(data.shard_jobs(samples, rank, world))} images "
              f"in {cache_dir}; {after}.")
        return 0
    if args.resume and done_before >= args.epochs:
        print(f"{args.out}: already trained for {args.epochs} epochs; nothing to do.")
        return 0
    if caches and caches[0].evicted:
        print(f"token cache {cache_dir}: {caches[0].evicted} entries deleted by another run's eviction during "
              f"training were computed again", flush=True)
    log = data.read_jsonl(Path(args.out) / LOG_FILE)
    last = f", last loss {log[-1]['loss']:.4f}" if log else ""
    print(f"trained VLAD on {len(samples)} images for {args.epochs} epochs in {time.time() - started:.1f} s{last}; "
          f"wrote {Path(args.out) / ADAPTERS_FILE}, {CONFIG_FILE}, {STATE_FILE} and {LOG_FILE}")
    return 0


def plan_prediction(args) -> list[PredictionSet]:
    """Every prediction folder of this command, its input checked (images readable, names that stay inside --out,
    the k-shot choice), before a model loads or anything is written."""
    k = data.parse_k_shot(args.k_shot) if args.k_shot is not None else (None if args.images else 0)
    if args.data and (args.object or args.normals):
        raise DataError(f"{'--object' if args.object else '--normals'} applies to --images only: a benchmark (--data) "
                        f"names the object by its category and takes the normal references from train/good.")
    if args.images and args.category:
        raise DataError("--category applies to --data only: --images scores the photos it names.")
    if args.images:
        return [plan_photos(args.images, args.normals or [], k, args.seed, args.object, args.out,
                            args.map_size or MAP_SIZE)]
    if not Path(args.data).is_dir():
        raise DataError(f"{args.data}: no such dataset folder.")
    for category in args.category or []:
        output_name(category, "--category")
    categories = args.category or data.list_categories(args.data)
    if not categories:
        raise DataError(f"{args.data}: no category folders with train/ or test/ inside; for a folder of photos "
                        f"use --images.")
    return [plan_category(args.data, category, k, args.seed, args.out, args.map_size) for category in categories]


def command_predict(args) -> int:
    rank, world = data.resolve_shard(args.shard)
    data.check_output_folder(args.out)
    data.remove_dead_temporaries(args.out, recursive=True)  # what killed runs left; live shards' files stay
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    predictions = plan_prediction(args)
    backbone, vlad, config = load_detector(args.ckpt, args.model, args.pretrained, device, precision)
    bank_dtype = BANK_DTYPES[args.bank_dtype] if args.bank_dtype != "auto" else \
        (torch.float32 if backbone.dtype == torch.float32 else backbone.dtype)
    checkpoint = str(Path(args.ckpt).resolve())
    provenance = {"checkpoint": checkpoint, "epoch": config.get("epoch"), "backbone": config["backbone"],
                  "adapters_sha256": adapters_sha256(vlad)}
    detector = (f"{checkpoint} (epoch {config.get('epoch')}, adapters sha256 {provenance['adapters_sha256'][:12]}); "
                f"backbone {config['model']} with {config['pretrained'] or 'its own weights'} at "
                f"{config['image_size']} px, stages {config['stages']}")
    for prediction in predictions:  # every folder before the first is written: a refusal leaves nothing behind
        prediction.record.update(provenance)
        prediction.detector = detector
        check_record(prediction)
    started, summaries = time.time(), []
    for prediction in predictions:
        summaries.append(predict_set(backbone, vlad, prediction, rank, world, args.batch_size, args.chunk,
                                     progress=not args.quiet, bank_dtype=bank_dtype, workers=args.workers))
    images = sum(s["images"] for s in summaries)
    waiting = [s["name"] for s in summaries if not s["complete"]]
    k = summaries[0]["k"]
    against = "zero-shot (no normal references: the text prompts alone)" if k == 0 else \
        f"against k = {k} normal references (seed {args.seed})"
    if args.images:
        print(f"scored {images} photos of {args.object!r} {against} in {time.time() - started:.1f} s with epoch "
              f"{config.get('epoch')} of {checkpoint}; "
              + (f"scores.csv and {INDEX_FILE} wait for the other shards" if waiting else
                 f"most anomalous first: {Path(args.out) / INDEX_FILE}"))
        return 0
    categories = f"{len(summaries)} categor{'y' if len(summaries) == 1 else 'ies'}"
    print(f"wrote {images} anomaly maps of {categories} to {args.out} in {time.time() - started:.1f} s (k-shot "
          f"{args.k_shot or 0}, seed {args.seed}, epoch {config.get('epoch')}); "
          + (f"scores.csv waits for the other shards in {', '.join(waiting)}" if waiting else
             f"each category's {INDEX_FILE} shows its images, most anomalous first"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def backbone_flags(sub, defaults: bool):
        sub.add_argument("--model", default=MODEL if defaults else None,
                         help="open_clip model name, or local-dir:/folder (open_clip_config.json + weights)")
        sub.add_argument("--pretrained", default=PRETRAINED if defaults else None,
                         help="open_clip pretrained tag or weights file (ignored with local-dir:)")
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        sub.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                         help="of the frozen backbone; auto = fp16 on CUDA, fp32 on CPU")
        sub.add_argument("--shard", default=None, help="i/n: this process's share (default: torchrun's RANK)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--workers", type=number(int, 0), default=default_workers(),
                         help="DataLoader processes that decode images while the backbone computes; the results are "
                              "the same for every count (default min(8, CPUs); 0 = in the main process)")

    train_parser = commands.add_parser("train", help="train the adapters on generated (and auxiliary) folders")
    train_parser.add_argument("--data", action="append", required=True, type=Path,
                              help="MVTec-layout root: test split (soft masks) + train/good; repeatable")
    train_parser.add_argument("--aux", action="append", default=[], type=Path,
                              help="auxiliary MVTec-layout root: its test split only; repeatable")
    train_parser.add_argument("--out", required=True, type=Path, help="run folder for checkpoint and log")
    backbone_flags(train_parser, defaults=True)
    train_parser.add_argument("--image-size", type=positive_int, default=IMAGE_SIZE,
                              help="input side (default 518: 37 x 37 patches of 14)")
    train_parser.add_argument("--stages", default=None, type=stage_list,
                              help="distinct 1-based blocks, e.g. 6,12,18,24 (default: quarter depths)")
    train_parser.add_argument("--epochs", type=number(int, 0), default=EPOCHS,
                              help="(default 200; 0 writes the untrained, zero-shot detector)")
    train_parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="(default 16)")
    train_parser.add_argument("--lr", type=number(float, 0, above=True), default=LR,
                              help="Adam learning rate (default 1e-4)")
    train_parser.add_argument("--omega", type=number(float, 0), default=OMEGA,
                              help="Eq. 7 pixel-loss weight (default 6)")
    train_parser.add_argument("--loss", default="both", choices=LOSS_TERMS,
                              help="loss terms: both (Eq. 7), image (y_img only) or pixel (y_pix only); Table 4")
    train_parser.add_argument("--focal-gamma", type=number(float, 0), default=FOCAL_GAMMA, help="(default 2)")
    train_parser.add_argument("--focal-alpha", type=number(float, 0, 1), default=FOCAL_ALPHA, help="(default 0.25)")
    train_parser.add_argument("--dice-beta", type=number(float, 0, above=True), default=DICE_BETA,
                              help="Eq. 6 beta (default 1)")
    train_parser.add_argument("--seed", type=SEED_TYPE, default=SEED, help="adapter init and shuffle (default 0)")
    train_parser.add_argument("--cache", default="disk", choices=["disk", "memory", "none"],
                              help="where the frozen backbone's tokens live (none: recompute every batch)")
    train_parser.add_argument("--cache-dir", default=None, type=Path,
                              help="the disk cache, keyed by content and shareable by every run "
                                   "(default $XDG_CACHE_HOME/vlad/tokens or ~/.cache/vlad/tokens)")
    train_parser.add_argument("--evict-tokens", action="append", default=[], type=Path, metavar="ROOT",
                              help="once trained, delete the cache entries of ROOT's images, read as --data reads "
                                   "them (a generated set no later run trains on); repeatable")
    train_parser.add_argument("--extract-batch", type=positive_int, default=8,
                              help="images per loading batch when the cache is filled (one worker decodes one batch)")
    start = train_parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue RUN from its last epoch")
    start.add_argument("--restart", action="store_true",
                       help="move RUN's checkpoint files to RUN/old-N and train from scratch (e.g. after an "
                            "unreadable train_state.safetensors)")

    predict_parser = commands.add_parser("predict", help="anomaly maps and scores of a benchmark's test split, or "
                                                         "of a folder of photos (--images)")
    predict_parser.add_argument("--ckpt", required=True, type=Path, help="run folder written by train")
    inputs = predict_parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--data", type=Path, help="MVTec-layout root: every category's test split")
    inputs.add_argument("--images", action="append", type=Path,
                        help="photos to score, files or folders (not their sub-folders); repeatable")
    predict_parser.add_argument("--object", default=None,
                                help="with --images: what the photos show, the object in the prompts")
    predict_parser.add_argument("--normals", action="append", type=Path,
                                help="with --images: photos of good parts for the memory bank, files or folders; "
                                     "repeatable (none: zero-shot)")
    predict_parser.add_argument("--k-shot", default=None,
                                help="normal images for the memory bank: 0, k or all (default: 0 with --data, all "
                                     "--normals with --images)")
    predict_parser.add_argument("--seed", type=SEED_TYPE, default=SEED,
                                help="which k normal images (data.select_k_shot)")
    predict_parser.add_argument("--out", required=True, type=Path,
                                help="prediction root (MVTec layout), or with --images the folder of maps/, "
                                     "overlay/, scores.csv and index.html")
    predict_parser.add_argument("--category", action="append", default=None, help="only these; repeatable")
    predict_parser.add_argument("--map-size", type=positive_int, default=None,
                                help="long side of maps and overlays, at the image's aspect ratio (default: "
                                     f"{MAP_SIZE} with --images, the image's own size with --data)")
    predict_parser.add_argument("--batch-size", type=positive_int, default=8,
                                help="images per loading batch (each is scored alone: no result depends on it)")
    predict_parser.add_argument("--chunk", type=positive_int, default=NN_CHUNK,
                                help="rows per nearest-neighbour block")
    predict_parser.add_argument("--bank-dtype", default="auto", choices=["auto", *BANK_DTYPES],
                                help="memory bank storage; the search accumulates in fp32 (auto: the backbone's "
                                     "dtype, fp16 on CUDA)")
    backbone_flags(predict_parser, defaults=False)

    args = parser.parse_args(argv)
    try:
        return command_train(args) if args.command == "train" else command_predict(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
