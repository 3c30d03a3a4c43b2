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
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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

        Tokens are the raw block outputs (before the final LayerNorm), class token dropped."""
        output = self.model.visual.forward_intermediates(
            pixels.to(self.device, self.dtype), indices=[s - 1 for s in self.stages],
            normalize_intermediates=False, output_fmt="NLC")
        tokens = torch.stack(output["image_intermediates"], dim=1)  # (B, L, N, width)
        return tokens, output["image_features"]

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


@torch.no_grad()
def collect_memory_bank(backbone: Backbone, vlad: VLAD, images: list, batch_size: int = 8,
                        dtype: torch.dtype = torch.float32, progress: bool = False) -> list[torch.Tensor]:
    """Eq. 9's B_i: the adapted patch tokens of the k normal images, L x (k * N, C) in `dtype`.

    The bank is allocated once at its final size and filled batch by batch, so its peak is the bank itself plus
    one batch: the raw tokens of all k images (full-shot ViT-L: 400 x 4 x 1369 x 1024) and a second copy of
    the bank (the parts before a concatenation) never exist. fp16 halves it; the search still accumulates in
    fp32 (`nearest_neighbour_distance`)."""
    bank = None
    for start in tqdm(range(0, len(images), batch_size), desc="memory bank", unit="batch", disable=not progress):
        chunk = images[start:start + batch_size]
        pixels = torch.stack([backbone.preprocess(data.load_image(p)) for p in chunk])
        features = vlad.patch_features(backbone.encode_images(pixels)[0])  # L x (b, N, C), float32
        if bank is None:
            n_tokens, channels = features[0].shape[1:]
            bank = [torch.empty(len(images) * n_tokens, channels, dtype=dtype, device=features[0].device)
                    for _ in features]
        rows = slice(start * n_tokens, (start + len(chunk)) * n_tokens)
        for stage, stage_features in zip(bank, features):
            stage[rows] = stage_features.reshape(-1, channels).to(dtype)
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


def load_target(sample: data.Sample, image_size: int) -> np.ndarray:
    """y_pix at the input size as uint8, 255 x the probability: the soft mask's own 8-bit values (resized
    bilinearly by PIL, which rounds to 8 bits), zeros for a normal image. Stored as it is read, a quarter of
    float32, and exact: every cache mode trains on the same y_pix."""
    if sample.mask is None:
        return np.zeros((image_size, image_size), np.uint8)
    mask = data.load_mask(sample.mask, size=(image_size, image_size), binarize=False)
    return np.rint(mask * 255).astype(np.uint8)


def compute_entries(backbone: Backbone, samples: list[data.Sample]) -> dict[str, torch.Tensor]:
    """Everything one batch of images contributes to training: tokens (B, L, N, width) and embedding (B, C) in
    the backbone's dtype on CPU, y_pix (B, S, S) uint8 (255 x the probability) and y_img (B,) float32."""
    pixels = torch.stack([backbone.preprocess(data.load_image(s.image)) for s in samples])
    tokens, embedding = backbone.encode_images(pixels)
    return {"tokens": tokens.cpu(), "embedding": embedding.cpu(),
            "y_pix": torch.from_numpy(np.stack([load_target(s, backbone.image_size) for s in samples])),
            "y_img": torch.tensor([float(s.label) for s in samples])}


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
    are written atomically, so an interrupted run keeps what it finished, shards (or two runs) can fill it in
    parallel, and a reader never sees half a file; an entry that cannot be read is computed again.
    mode 'memory': kept in RAM; mode 'none': recomputed for every batch (the slow reference the cache must agree
    with). `computed` and `reused` count this process's work."""

    def __init__(self, backbone: Backbone, samples: list[data.Sample], mode: str = "disk", folder=None,
                 batch_size: int = 8):
        if mode not in ("disk", "memory", "none"):
            raise ValueError(f"cache mode must be disk, memory or none, got {mode!r}")
        self.backbone, self.samples, self.mode, self.batch_size = backbone, samples, mode, batch_size
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.computed = self.reused = 0
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

    def _store(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Compute the entries of these images, write them (disk) or keep them (memory), and return them."""
        entries = compute_entries(self.backbone, [self.samples[i] for i in indices])
        rows = []
        for row, index in enumerate(indices):
            entry = {name: value[row].contiguous() for name, value in entries.items()}
            if self.mode == "disk":
                data.save_bytes(safetensors.torch.save(entry), self._file(index))
            elif self.mode == "memory":
                self.memory[index] = entry
            rows.append(entry)
        self.computed += len(indices)
        return rows

    def fill(self, rank: int = 0, world: int = 1, progress: bool = True) -> None:
        """Compute the missing entries of this rank's shard."""
        if self.mode == "none":
            return
        indices = data.shard_jobs(list(range(len(self.samples))), rank, world)
        if self.mode == "disk":
            missing = [i for i in indices if not self._file(i).is_file()]
        else:
            missing = [i for i in indices if i not in self.memory]
        self.reused += len(indices) - len(missing)
        bar = tqdm(total=len(missing), desc="caching backbone tokens", unit="img", disable=not progress)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            self._store(batch)
            bar.update(len(batch))
        bar.close()

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        """One disk entry; computed again when it is missing or unreadable (a copy cut short, a full disk)."""
        path = self._file(index)
        try:
            entry = load_file(str(path))
            if tuple(sorted(entry)) != ENTRY_NAMES or entry["tokens"].shape[0] != len(self.backbone.stages):
                raise ValueError(f"holds {sorted(entry)}")
            return entry
        except Exception as error:  # safetensors raises its own error types, OSError, ValueError, ...
            if path.exists():
                print(f"warning: {path}: unreadable token cache entry ({str(error)[:80]}); computing it again",
                      file=sys.stderr)
            return self._store([index])[0]

    def evict(self, indices) -> int:
        """Delete the disk entries of these images (a generated set no later run trains on); returns how many.
        A run still reading one of them computes it again, so this is safe while others use the folder."""
        removed = 0
        for index in indices if self.mode == "disk" else ():
            try:
                self._file(index).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def get(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The stacked entries of the given training images, y_pix as float32 probabilities."""
        if self.mode == "none":
            rows = self._store(indices)
        elif self.mode == "memory":
            rows = [self.memory[i] if i in self.memory else self._store([i])[0] for i in indices]
        else:
            rows = [self._read(i) for i in indices]
        batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        batch["y_pix"] = batch["y_pix"].float() / 255.0
        return batch


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
        raise DataError(f"{path}: cannot read the training state ({error}); start again without --resume.") from None
    return config, tensors, metadata


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
          terms: str = "both", cache_dir=None, report=None, evict=()) -> VLAD | None:
    """Train the adapters on `samples`, checkpointing RUN after every epoch; returns the trained VLAD (None on
    a rank that only fills its share of the token cache). `report(TokenCache)` is called once it is filled;
    `evict` (indices into samples) are deleted from the disk cache once the last epoch is saved."""
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
    if (run / STATE_FILE).is_file() and not resume:
        raise DataError(f"{run}: already holds a checkpoint; pass --resume to continue it or choose another --out.")
    saved_state, log = None, []
    if resume and (run / STATE_FILE).is_file():
        saved, tensors, metadata = load_train_state(run)
        changed = [k for k in config if saved.get(k) != config[k]]
        if changed:
            raise DataError(f"{run / STATE_FILE}: was trained with other settings ({', '.join(changed)}); "
                            f"resume with the same flags or choose another --out.")
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
                evicted = [samples[i] for i in evict]
                TokenCache(backbone, evicted, cache, cache_dir, extract_batch).evict(range(len(evicted)))
            return vlad

    token_cache = TokenCache(backbone, samples, cache, cache_dir, extract_batch)
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
    steps = math.ceil(len(samples) / batch_size)
    for epoch in range(start_epoch, epochs):
        started, total, count = time.time(), 0.0, 0
        lr_used = optimizer.param_groups[0]["lr"]  # the scheduler steps after the epoch: log what it used
        order = epoch_order(len(samples), seed, epoch)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for step in bar:
            indices = order[step * batch_size:(step + 1) * batch_size]
            batch = {k: v.to(backbone.device) for k, v in token_cache.get(indices).items()}
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
    token_cache.evict(evict)
    return vlad


# ---------------------------------------------------------------------------------------------------------
# Prediction: k-shot memory bank per category, maps, scores, overlays
# ---------------------------------------------------------------------------------------------------------


def score_parts(category_out: Path) -> dict[str, float]:
    """Every image score recorded by any shard: {path relative to PRED/<category>: score}."""
    scores = {}
    for part in sorted((category_out / "scores_parts").glob("*.jsonl")):
        for record in data.read_jsonl(part):
            scores[record["path"]] = record["score"]
    return scores


def merge_scores(category_out: Path, expected: list[str]) -> bool:
    """Write scores.csv once every test image has a score (whichever shard finishes last writes it)."""
    scores = score_parts(category_out)
    if any(path not in scores for path in expected):
        return False
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score"])
    for path in sorted(expected):
        writer.writerow([path, repr(float(scores[path]))])
    target = category_out / "scores.csv"
    if not target.is_file() or target.read_text() != buffer.getvalue():  # a re-run that found all done writes nothing
        data.save_text(buffer.getvalue(), target)
    return True


def predict_category(backbone: Backbone, vlad: VLAD, root, category: str, k: int | None, seed: int, out,
                     rank: int = 0, world: int = 1, batch_size: int = 8, chunk: int = NN_CHUNK,
                     progress: bool = True, provenance: dict | None = None,
                     bank_dtype: torch.dtype = torch.float32) -> dict:
    """Anomaly maps, scores and overlays for one category's test split; returns a small summary.
    `provenance` (checkpoint, epoch) is recorded in k_shot.json, so a re-run into the same --out with another
    checkpoint or selection is refused instead of mixing two detectors' outputs."""
    root, out = Path(root), Path(out)
    category_out = out / category
    test = data.read_split(root, category, "test")
    if not test:
        raise DataError(f"{root / category}/test: no test images; add them or remove the category folder.")
    chosen = data.k_shot_images(root, category, k, seed)
    k = len(chosen)
    record = {"k": k, "seed": seed, "images": [p.relative_to(root / category).as_posix() for p in chosen],
              **(provenance or {})}
    k_shot_file = category_out / "k_shot.json"
    if k_shot_file.is_file():
        previous = json.loads(k_shot_file.read_text(encoding="utf-8"))
        if {key: previous.get(key) for key in record} != record:
            raise DataError(f"{k_shot_file}: was written with k={previous.get('k')}, seed={previous.get('seed')}, "
                            f"checkpoint {previous.get('checkpoint')} (epoch {previous.get('epoch')}); choose another "
                            f"--out for k={k}, seed={seed} with this checkpoint.")
    else:
        data.save_json(record, k_shot_file)

    relative = {s.image: data.prediction_path(s) for s in test}
    if len(set(relative.values())) < len(relative):
        raise DataError(f"{root / category}/test: two test images of one defect share a file name stem, so their "
                        f"anomaly maps would share one .tiff; rename one.")
    done = score_parts(category_out)
    jobs = [s for s in data.shard_jobs(test, rank, world) if relative[s.image] not in done]
    # Text features and the bank only when images are left: a re-run of a finished prediction costs nothing
    text = backbone.text_features(category).to(backbone.device) if jobs else None
    memory_bank = None
    if k > 0 and jobs:  # every rank builds the whole bank (k images) itself
        memory_bank = collect_memory_bank(backbone, vlad, chosen, batch_size, bank_dtype)
    # The overlay's colour scale is fixed per detector, so one colour is one score in every overlay: each stage
    # adds at most 1 to M_VL, and M_VV's distance is saturated at 1 (cosine 0) per stage.
    full_scale = len(backbone.stages) * (2 if memory_bank is not None else 1)

    part = category_out / "scores_parts" / f"shard-{rank}-of-{world}.jsonl"
    bar = tqdm(total=len(jobs), desc=f"{category} (k={k})", unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = [data.load_image(s.image) for s in batch]
        tokens, embedding = backbone.encode_images(torch.stack([backbone.preprocess(im) for im in images]))
        anomaly_map, score = vlad.detect(tokens, embedding, text.expand(len(batch), -1, -1), backbone.image_size,
                                         memory_bank, chunk)
        for sample, image, map_s, score_s in zip(batch, images, anomaly_map, score):
            width, height = image.size  # maps are written at the image's own size, like its ground truth
            full = F.interpolate(map_s[None, None].float(), size=(height, width), mode="bilinear",
                                 align_corners=False)[0, 0].cpu().numpy()
            data.save_tiff(full, category_out / relative[sample.image])
            heat = np.clip(full / full_scale, 0.0, 1.0)
            data.save_image(data.overlay(np.asarray(image), heat),
                            category_out / "overlay" / sample.defect / f"{sample.image.stem}.png")
            data.append_jsonl({"path": relative[sample.image], "score": float(score_s)}, part)
        bar.update(len(batch))
    bar.close()
    complete = merge_scores(category_out, list(relative.values()))
    return {"category": category, "k": k, "images": len(jobs), "scores_csv": complete}


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


def positive_int(text: str) -> int:
    """argparse type of batch and chunk sizes: 0 would divide by zero or never advance a loop."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


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
    for root in args.data + args.aux:
        if not Path(root).is_dir():
            raise DataError(f"{root}: no such dataset folder.")
    data.check_output_folder(args.out)  # before the model loads: a typo costs one sentence
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache == "disk":
        data.check_output_folder(cache_dir, "--cache-dir")
    samples = training_samples(args.data, args.aux)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    backbone = Backbone(args.model, args.pretrained, args.image_size, args.stages, device, precision)
    started = time.time()
    state_file = Path(args.out) / STATE_FILE
    done_before = int(load_train_state(Path(args.out))[2]["epoch"]) if args.resume and state_file.is_file() else 0

    def report(cache: TokenCache) -> None:
        if cache.mode == "disk":
            print(f"token cache {cache.folder}: {cache.computed} computed, {cache.reused} reused", flush=True)

    extra = {"data": [str(Path(r).resolve()) for r in args.data], "aux": [str(Path(r).resolve()) for r in args.aux]}
    vlad = train(backbone, samples, args.out, args.epochs, args.batch_size, args.lr, args.seed, args.omega,
                 args.focal_gamma, args.focal_alpha, args.dice_beta, args.cache, args.extract_batch, args.resume,
                 rank, world, progress=not args.quiet, extra_config=extra, terms=args.loss, cache_dir=cache_dir,
                 report=report, evict=range(len(training_samples(args.data, []))) if args.evict_data_tokens else ())
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
    log = data.read_jsonl(Path(args.out) / LOG_FILE)
    last = f", last loss {log[-1]['loss']:.4f}" if log else ""
    print(f"trained VLAD on {len(samples)} images for {args.epochs} epochs in {time.time() - started:.1f} s{last}; "
          f"wrote {Path(args.out) / ADAPTERS_FILE}, {CONFIG_FILE}, {STATE_FILE} and {LOG_FILE}")
    return 0


def command_predict(args) -> int:
    rank, world = data.resolve_shard(args.shard)
    k = data.parse_k_shot(args.k_shot)
    if not Path(args.data).is_dir():
        raise DataError(f"{args.data}: no such dataset folder.")
    data.check_output_folder(args.out)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    backbone, vlad, config = load_detector(args.ckpt, args.model, args.pretrained, device, precision)
    bank_dtype = BANK_DTYPES[args.bank_dtype] if args.bank_dtype != "auto" else \
        (torch.float32 if backbone.dtype == torch.float32 else backbone.dtype)
    categories = args.category or data.list_categories(args.data)
    if not categories:
        raise DataError(f"{args.data}: no category folders with train/ or test/ inside.")
    started, summaries = time.time(), []
    for category in categories:
        summaries.append(predict_category(backbone, vlad, args.data, category, k, args.seed, args.out, rank, world,
                                          args.batch_size, args.chunk, progress=not args.quiet,
                                          provenance={"checkpoint": str(Path(args.ckpt).resolve()),
                                                      "epoch": config.get("epoch"),
                                                      "backbone": config["backbone"]},
                                          bank_dtype=bank_dtype))
    images = sum(s["images"] for s in summaries)
    waiting = [s["category"] for s in summaries if not s["scores_csv"]]
    categories = f"{len(summaries)} categor{'y' if len(summaries) == 1 else 'ies'}"
    print(f"wrote {images} anomaly maps of {categories} to {args.out} in "
          f"{time.time() - started:.1f} s (k-shot {args.k_shot}, seed {args.seed}, epoch {config.get('epoch')})"
          + (f"; scores.csv waits for the other shards in {', '.join(waiting)}" if waiting else ""))
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

    train_parser = commands.add_parser("train", help="train the adapters on generated (and auxiliary) folders")
    train_parser.add_argument("--data", action="append", required=True, type=Path,
                              help="MVTec-layout root: test split (soft masks) + train/good; repeatable")
    train_parser.add_argument("--aux", action="append", default=[], type=Path,
                              help="auxiliary MVTec-layout root: its test split only; repeatable")
    train_parser.add_argument("--out", required=True, type=Path, help="run folder for checkpoint and log")
    backbone_flags(train_parser, defaults=True)
    train_parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input side (default 518: 37 x 37 patches of 14)")
    train_parser.add_argument("--stages", default=None, type=stage_list,
                              help="distinct 1-based blocks, e.g. 6,12,18,24 (default: quarter depths)")
    train_parser.add_argument("--epochs", type=int, default=EPOCHS, help="(default 200)")
    train_parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="(default 16)")
    train_parser.add_argument("--lr", type=float, default=LR, help="Adam learning rate (default 1e-4)")
    train_parser.add_argument("--omega", type=float, default=OMEGA, help="Eq. 7 pixel-loss weight (default 6)")
    train_parser.add_argument("--loss", default="both", choices=LOSS_TERMS,
                              help="loss terms: both (Eq. 7), image (y_img only) or pixel (y_pix only); Table 4")
    train_parser.add_argument("--focal-gamma", type=float, default=FOCAL_GAMMA, help="(default 2)")
    train_parser.add_argument("--focal-alpha", type=float, default=FOCAL_ALPHA, help="(default 0.25)")
    train_parser.add_argument("--dice-beta", type=float, default=DICE_BETA, help="Eq. 6 beta (default 1)")
    train_parser.add_argument("--seed", type=int, default=SEED, help="adapter init and shuffle (default 0)")
    train_parser.add_argument("--cache", default="disk", choices=["disk", "memory", "none"],
                              help="where the frozen backbone's tokens live (none: recompute every batch)")
    train_parser.add_argument("--cache-dir", default=None, type=Path,
                              help="the disk cache, keyed by content and shareable by every run "
                                   "(default $XDG_CACHE_HOME/vlad/tokens or ~/.cache/vlad/tokens)")
    train_parser.add_argument("--evict-data-tokens", action="store_true",
                              help="once trained, delete the cache entries of the --data images (a generated set "
                                   "one run trains on); the --aux entries stay for the next run")
    train_parser.add_argument("--extract-batch", type=positive_int, default=8, help="images per backbone forward")
    train_parser.add_argument("--resume", action="store_true", help="continue RUN from its last epoch")

    predict_parser = commands.add_parser("predict", help="anomaly maps and scores for a dataset's test split")
    predict_parser.add_argument("--ckpt", required=True, type=Path, help="run folder written by train")
    predict_parser.add_argument("--data", required=True, type=Path, help="MVTec-layout root to evaluate")
    predict_parser.add_argument("--k-shot", default="0", help="normal images for the memory bank: 0, k or all")
    predict_parser.add_argument("--seed", type=int, default=SEED, help="which k normal images (data.select_k_shot)")
    predict_parser.add_argument("--out", required=True, type=Path, help="prediction root (MVTec layout)")
    predict_parser.add_argument("--category", action="append", default=None, help="only these; repeatable")
    predict_parser.add_argument("--batch-size", type=positive_int, default=8)
    predict_parser.add_argument("--chunk", type=positive_int, default=NN_CHUNK, help="rows per nearest-neighbour block")
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
