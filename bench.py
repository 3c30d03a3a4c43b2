"""Benchmarks, measured as ratios against a reference run in the same process or run, never as timed tests.

    python bench.py metrics        exact P-AUC/P-F1/PRO on an MVTec AD-sized case vs sklearn and one np.sort
    python bench.py cut [--full]   one CUT sample vs plain img2img and Attend-and-Excite (tiny SD on CPU;
                                   --full: SD 1.5's topology with random weights, 512x512 fp16, CUDA)
    python bench.py cut --full --device cpu [--photo 1600x1200]   SD 1.5's topology in fp32 on the CPU: a few
                                   timed steps at the working size of a square (or that) photo, and the seconds
                                   per sample extrapolated from them
    python bench.py vlad           image loading with 0 and N DataLoader workers (--loader: only that); one
                                   epoch with and without the token cache; encoding one by one vs batched;
                                   prediction images/s (k = 4); the memory bank's peak memory (--bank: only that)
    python bench.py vlad --protocol  reproduce.sh's shared token cache and generation shared across k: samples,
                                   unique entries and peak, measured at small scale, then MVTec AD's at ViT-L
    python bench.py vlad --eq8     Eq. 8's two orders (softmax then upsample, or the reverse) on trained tiny VLADs
    python bench.py vlad --predict-io  predict's work per 1024 px test image besides the backbone, and
                                   a token-cache read: why predict does not read the cache

metrics: 1,725 maps of 256x256 float32 (MVTec AD's test set: 1,258 anomalous images), blob-shaped masks,
seed 0; peak memory by tracemalloc (the most numpy allocated during the call, above what was there before).
The same maps cropped to three sizes (256x256, 256x192, 224x256 in turn) and given as a list time the path of
categories whose images differ in size.
cut: each method runs in its own process (so peak memory is its own), one warm-up, then the timed run:
  plain img2img         diffusers' StableDiffusionImg2ImgPipeline, strength gamma: the floor
  CUT, no optimization  cut.CUT with optimize=False: recording only, the cost of the attention capture
  CUT                   cut.CUT.generate at the paper's defaults (T = 200, gamma = 0.25: 50 denoising steps);
                        with random weights the attention never localizes: no early stop, the worst case
  CUT, early stop at 10 the same with the early-stop window opened so that it fires at step 10, the earliest
                        the rule allows: the best case
  Attend-and-Excite     diffusers' StableDiffusionAttendAndExcitePipeline, as many denoising steps as CUT
  CUT, 4:3 photo        CUT on a 4:3 photo at its working size (about the same pixels as the square), against
                        the square CUT: the cost of keeping the photo's shape
vlad: ViT-B-16 with random weights at 224 px on CPU (and ViT-L-14-quickgelu at 518 px fp16 where CUDA is).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import hashlib
import io
import logging
import math
import multiprocessing
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import metrics
import vlad

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned benchmark processes import cut from here


# =========================================================================================================
# metrics
# =========================================================================================================

BENCH_METRICS_IMAGES = 1725
BENCH_METRICS_ANOMALOUS = 1258
BENCH_METRICS_SIZE = 256


def bench_metrics_case(seed: int = 0):
    """maps (N, S, S) float32, masks (N, S, S) bool with 1-3 irregular blobs on anomalous images, image scores
    (N,) and labels (N,)."""
    rng = np.random.default_rng(seed)
    n, size = BENCH_METRICS_IMAGES, BENCH_METRICS_SIZE
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(BENCH_METRICS_ANOMALOUS):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(20, size - 20, 2)
            radius = rng.uniform(3, 30)
            lobes, phase, depth = rng.integers(2, 6), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4)
            angle = np.arctan2(yy - cy, xx - cx)
            boundary = radius * (1 + depth * np.sin(lobes * angle + phase))  # a wobbly blob
            masks[i] |= np.hypot(yy - cy, xx - cx) <= boundary
    maps = rng.random((n, size, size), dtype=np.float32)
    maps += 0.6 * masks  # anomalous pixels score higher, with overlap
    labels = (masks.reshape(n, -1).any(axis=1)).astype(int)
    scores = maps.reshape(n, -1).max(axis=1).astype(np.float64) + 0.3 * rng.standard_normal(n)
    return maps, masks, scores, labels


def bench_metrics_measure(function, *args):
    """(result, seconds, peak bytes allocated above the start) of one call."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return result, seconds, peak


def bench_metrics() -> None:
    from sklearn.metrics import roc_auc_score

    maps, masks, scores, labels = bench_metrics_case()
    maps_bytes = maps.nbytes
    print(f"case: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} float32 ({maps_bytes / 2**20:.0f} MiB), "
          f"{int(masks.sum()):,} anomalous of {masks.size:,} pixels, "
          f"{data.label_regions(masks[:BENCH_METRICS_ANOMALOUS])[1]} regions")

    _, t_sort, m_sort = bench_metrics_measure(np.sort, maps.ravel())
    pixel, t_pixel, m_pixel = bench_metrics_measure(metrics.pixel_metrics, maps, masks)
    image, t_image, _ = bench_metrics_measure(metrics.image_metrics, scores, labels)
    p_auc, t_auc, m_auc = bench_metrics_measure(metrics.auroc, maps, masks)
    _, t_label, m_label = bench_metrics_measure(data.label_regions, masks)
    start = time.perf_counter()
    sklearn_auc = roc_auc_score(masks.ravel(), maps.ravel())
    t_sklearn = time.perf_counter() - start

    sizes = [(256, 256), (256, 192), (224, 256)]  # crops: views, so the list costs no memory of its own
    mixed_maps = [maps[i, :sizes[i % 3][0], :sizes[i % 3][1]] for i in range(len(maps))]
    mixed_masks = [masks[i, :sizes[i % 3][0], :sizes[i % 3][1]] for i in range(len(masks))]
    mixed_pixels = np.concatenate([m.ravel() for m in mixed_maps])
    mixed_bytes = mixed_pixels.nbytes
    _, t_mixed_sort, _ = bench_metrics_measure(np.sort, mixed_pixels)
    del mixed_pixels
    _, t_mixed, m_mixed = bench_metrics_measure(metrics.pixel_metrics, mixed_maps, mixed_masks)

    mib = 2**20
    print(f"five metrics:            {t_pixel + t_image:7.2f} s   "
          + "  ".join(f"{k} {100 * v:.2f}" for k, v in {**image, **pixel}.items()))
    print(f"  P-AUC + P-F1 + PRO:    {t_pixel:7.2f} s   peak {m_pixel / mib:6.0f} MiB "
          f"= {m_pixel / maps_bytes:.2f}x the maps (target < 4x)   = {t_pixel / t_sort:.2f}x the sort")
    print(f"  the same, 3 sizes:     {t_mixed:7.2f} s   peak {m_mixed / mib:6.0f} MiB "
          f"= {m_mixed / mixed_bytes:.2f}x the maps                  = {t_mixed / t_mixed_sort:.2f}x the sort "
          f"of its pixels ({t_mixed_sort:.2f} s)")
    print(f"  I-AUC + I-F1:          {t_image:7.4f} s")
    print(f"  (region labelling:     {t_label:7.2f} s   peak {m_label / mib:6.0f} MiB, output labels included)")
    print(f"P-AUC alone:             {t_auc:7.2f} s   peak {m_auc / mib:6.0f} MiB   = {t_auc / t_sort:.2f}x the sort "
          f"(target < 3x)")
    print(f"np.sort of all pixels:   {t_sort:7.2f} s   peak {m_sort / mib:6.0f} MiB   (floor for an exact AUROC)")
    print(f"sklearn roc_auc_score:   {t_sklearn:7.2f} s   P-AUC {100 * sklearn_auc:.4f} "
          f"(ours {100 * p_auc:.4f}, |diff| {abs(sklearn_auc - p_auc):.1e})")
    print(f"P-AUC + P-F1 + PRO / sklearn: {t_pixel / t_sklearn:.3f} (target < 0.2)")


# =========================================================================================================
# cut
# =========================================================================================================

CUT_BENCH_PROMPT = "a photo of a bottle that is damaged"


def cut_build_full_sd(folder) -> Path:
    """SD 1.5's topology from its published configs (UNet 860M, VAE factor 8, CLIP ViT-L/14 text), random
    weights, saved as a diffusers folder. Only for timing and memory: the images are noise."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from test_all import cut_write_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407))
    with tempfile.TemporaryDirectory() as source:
        cut_write_clip_tokenizer(Path(source))
        tokenizer = CLIPTokenizer(str(Path(source) / "vocab.json"), str(Path(source) / "merges.txt"),
                                  model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def cut_bench_image(height: int, width: int) -> np.ndarray:
    """A bright textured square on a dark ground, (height, width, 3) uint8: an object photo."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 25, np.uint8)
    image[height // 4:3 * height // 4, width // 4:3 * width // 4] = \
        180 + rng.integers(0, 60, (3 * height // 4 - height // 4, 3 * width // 4 - width // 4, 3))
    return image


def _cut_bench_child(method: str, folder: str, size: int, device: str, queue) -> None:
    """Load the pipeline, run `method` once to warm up and once timed; report seconds and peak memory."""
    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    import cut
    from diffusers import StableDiffusionAttendAndExcitePipeline, StableDiffusionImg2ImgPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = cut.load_pipeline(folder, device, dtype)
    settings = cut.CutSettings(size=size)
    K = settings.denoising_steps()
    height, width = size, size
    if method == "cut_4x3":                               # a 4:3 photo at its working size
        width, height = cut.CUT(pipe, settings).working_size(4000, 3000)
    image = cut_bench_image(height, width)
    foreground = cut.foreground_mask(image)[0]

    if method == "img2img":
        from PIL import Image

        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)

        def run():
            img2img(CUT_BENCH_PROMPT, image=Image.fromarray(image), strength=settings.gamma,
                    num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                    generator=torch.Generator().manual_seed(0))
    elif method.startswith("cut"):
        if method == "cut_no_optimization":
            settings.optimize = False
        if method == "cut_early_stop_10":  # the earliest stop the rule allows: a best case beside the worst
            settings.early_stop_window = (-1.0, float("inf"))
        generator = cut.CUT(pipe, settings)
        optimize = generator.optimize

        def timed_optimize(*args, **kwargs):                 # seconds spent in Eq. 4/5 and refinement
            started = time.perf_counter()
            try:
                return optimize(*args, **kwargs)
            finally:
                run.optimize_seconds += time.perf_counter() - started

        generator.optimize = timed_optimize

        def run():
            run.optimize_seconds = 0.0
            trace = generator.generate([image], [foreground], [0], CUT_BENCH_PROMPT, "damaged")[0].trace
            run.trace = dict(trace, optimize_seconds=run.optimize_seconds)
    else:
        excite = StableDiffusionAttendAndExcitePipeline(
            **{k: v for k, v in pipe.components.items() if k != "image_encoder"})
        excite.set_progress_bar_config(disable=True)
        P = cut.CUT(pipe, settings).P
        index = cut.word_token_indices(pipe.tokenizer, CUT_BENCH_PROMPT, "damaged")[1][0]

        def run():
            excite(CUT_BENCH_PROMPT, token_indices=[index], height=size, width=size, num_inference_steps=K,
                   guidance_scale=settings.guidance, attn_res=(P, P), generator=torch.Generator().manual_seed(0))

    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # MiB, whole process
    trace = getattr(run, "trace", None)
    queue.put((seconds, peak, trace))


def bench_cut_full_cpu(photo: tuple[int, int] | None = None, plain_steps: int = 2, updates: int = 2) -> None:
    """SD 1.5's topology (random weights) in fp32 on the CPU, one thread, at the working size of a square photo
    (512 x 512) or of a photo of `photo` = (W, H): a few steps of each kind, timed, then the seconds per sample
    extrapolated from them (a whole sample would take hours). For a photo, its denoising steps alternate with
    the square's in this process, so their ratio holds whatever else the machine is doing."""
    import cut

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = cut_build_full_sd(Path(tmp) / "sd15_random")
        pipe = cut.load_pipeline(str(folder), "cpu", torch.float32)
    generator = cut.CUT(pipe, cut.CutSettings())                      # the paper's defaults: T 200, gamma 0.25
    K = generator.settings.denoising_steps()
    width, height = generator.working_size(*photo) if photo else (generator.settings.size,) * 2
    grid = generator.attention_grid(height, width)
    image = cut_bench_image(height, width)
    foreground = torch.from_numpy(cut.foreground_mask(image)[0])
    ids, indices = generator.prompt_tokens(CUT_BENCH_PROMPT, "damaged")
    softmax_end = cut.text_softmax_end(pipe.tokenizer, len(ids), generator.context)
    cond, uncond = generator.encode_text(CUT_BENCH_PROMPT), generator.encode_text("")
    mask_attn = cut.downsample_mask(foreground, grid)[None]
    timesteps = generator.timesteps()

    def timed(function, repeat):
        started = time.perf_counter()
        for _ in range(repeat):
            result = function()
        return (time.perf_counter() - started) / repeat, result

    encode, z = timed(lambda: generator.encode_images(image[None], [torch.Generator().manual_seed(0)]), 1)
    states = [{"loss_scale": 1.0, "finite_run": 0}]
    with cut.recording_attention(pipe.unet, generator.layer_names, grid) as recorder:
        update, _ = timed(lambda: generator.scaled_gradient(recorder, z, [0], states, timesteps[0], cond, indices,
                                                            softmax_end, mask_attn), updates)

    def denoising_step(latent, attention_grid):
        with cut.recording_attention(pipe.unet, generator.layer_names, attention_grid) as recorder:
            return generator.denoise(recorder, latent, timesteps[0], cond, uncond, indices, softmax_end)

    square = generator.settings.size // generator.vae_factor
    square_z, step, square_step = torch.randn(1, 4, square, square), 0.0, 0.0
    for _ in range(plain_steps):
        step += timed(lambda: denoising_step(z, grid), 1)[0] / plain_steps
        if photo:
            square_step += timed(lambda: denoising_step(square_z, (generator.P, generator.P)), 1)[0] / plain_steps
    with torch.no_grad():
        decode, _ = timed(lambda: generator.vae.decode(z / generator.vae.config.scaling_factor), 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20    # GiB, whole process
    fixed = encode + decode
    s = generator.settings
    most = K + sum(s.max_iters - 1 for i in s.thresholds if i < K)      # every step, refinements at their cap
    least = s.early_stop_after                                          # one update a step until the earliest stop
    best, worst = fixed + K * step + least * update, fixed + K * step + most * update
    shape = f"a {photo[0]} x {photo[1]} photo at " if photo else ""
    print(f"cut benchmark: SD 1.5 topology, random weights, {shape}{width}x{height} (attention {grid[1]}x{grid[0]}), "
          f"fp32, CPU, 1 thread ({plain_steps} plain steps, {updates} updates timed)")
    print(f"  VAE encode + decode:            {fixed:8.1f} s")
    print(f"  one denoising step (CFG, B=2):  {step:8.1f} s"
          + (f"  (the square's, alternated with it: {square_step:.1f} s; {step / square_step:.2f}x)" if photo else ""))
    print(f"  one latent update (Eq. 3-5):    {update:8.1f} s  ({update / step:.2f}x a denoising step)")
    print(f"  one sample, K = {K} steps:        {fixed + K * step:8.0f} s plain img2img")
    print(f"                                  {best:8.0f} s CUT, early stop at step {least} ({least} updates)")
    print(f"                                  {worst:8.0f} s CUT, no early stop, refinements at their cap "
          f"({most} updates)")
    print(f"  peak memory (process RSS):      {peak:8.1f} GiB")


def bench_cut(full: bool = False) -> None:
    """Print seconds per sample, the ratio to plain img2img and peak memory of each method."""
    device = "cuda" if full else "cpu"
    size = 512 if full else 64
    context = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if full:
            folder = cut_build_full_sd(Path(tmp) / "sd15_random")
        else:
            from test_all import build_tiny_sd

            folder = build_tiny_sd(Path(tmp) / "tiny_sd", vae_factor=2)
        for method in ("img2img", "cut_no_optimization", "cut", "cut_early_stop_10", "attend_and_excite", "cut_4x3"):
            queue = context.Queue()
            child = context.Process(target=_cut_bench_child, args=(method, str(folder), size, device, queue))
            child.start()
            child.join()
            if child.exitcode != 0 or queue.empty():
                raise RuntimeError(f"the {method} benchmark process failed (exit code {child.exitcode})")
            results[method] = queue.get()
    floor = results["img2img"][0]
    where = "SD 1.5 topology, random weights, 512x512 fp16, CUDA" if full else \
        "tiny SD, 64x64 (16x16 attention), fp32, CPU, 1 thread"
    print(f"cut benchmark: one sample, T=200, gamma=0.25 (50 denoising steps), {where}")
    unit = "GPU MiB peak allocated" if full else "MiB peak RSS of the process"
    for method, (seconds, peak, _) in results.items():
        print(f"  {method:20s} {seconds:8.2f} s   {seconds / floor:5.2f}x img2img   {peak:9.0f} {unit}")
    print(f"  a 4:3 photo at its working size: {results['cut_4x3'][0] / results['cut'][0]:.2f}x the square CUT "
          f"(attention {'x'.join(map(str, results['cut_4x3'][2]['attn_grid'][::-1]))}, width x height)")
    for method in ("cut", "cut_early_stop_10"):
        trace = results[method][2]
        optimized = sum(1 for count in trace["iterations"] if count > 0)
        print(f"  {method} trace: {optimized} optimized steps, {sum(trace['iterations'])} updates, early stop at "
              f"step {trace['early_stop_step']}, final masked max {trace['final_masked_max']:.3f}, "
              f"{trace['optimize_seconds']:.2f} s of {results[method][0]:.2f} s in the optimization")


# =========================================================================================================
# vlad
# =========================================================================================================


def vlad_bench_dataset(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """Category 'texture': n_images test images (half with a pasted disc and its mask) and 8 train/good."""
    from test_all import vlad_make_synthetic_dataset

    return vlad_make_synthetic_dataset(root, ("texture",), n_train=8, n_good=n_images // 2,
                                       n_bad=n_images - n_images // 2, size=(size, size), seed=seed)


def vlad_encode_one_by_one_vs_batched(backbone, repeats: int = 3) -> tuple[float, float]:
    """Seconds for 8 images through the ViT one by one (Backbone.encode_images, which makes every image's tokens
    independent of its batch) and as one batch of 8 (the same forward, batched): the least of `repeats`, taken
    in turn. On the CPU the process's CPU time, which other jobs on a shared machine do not inflate; on CUDA the
    wall time after a synchronize."""
    pixels = torch.randn(8, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    cuda = backbone.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def batched():
        return backbone.model.visual.forward_intermediates(
            pixels.to(backbone.device, backbone.dtype), indices=[s - 1 for s in backbone.stages],
            normalize_intermediates=False, output_fmt="NLC")

    forwards = (lambda: backbone.encode_images(pixels), batched)
    seconds = [math.inf, math.inf]
    with torch.no_grad():
        for forward in forwards:
            forward()  # warm-up
        for _ in range(repeats):
            for i, forward in enumerate(forwards):
                started = clock()
                forward()
                if cuda:
                    torch.cuda.synchronize()
                seconds[i] = min(seconds[i], clock() - started)
    return seconds[0], seconds[1]


def vlad_bench_one(model: str, image_size: int, device: str, precision: str, n_images: int = 64,
                   n_predict: int = 16) -> None:
    backbone = vlad.Backbone(model, None, image_size, device=device, precision=precision)  # random weights
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        train_root = vlad_bench_dataset(folder / "train", n_images, image_size)
        samples = vlad.training_samples([], [train_root])  # the test split: 64 images
        started = time.perf_counter()
        backbone.text_features("texture")  # 12 states x 35 templates through the text tower, once per category
        text_seconds = time.perf_counter() - started
        started = time.perf_counter()
        vlad.TokenCache(backbone, samples, "disk", folder / "tokens").fill(progress=False)
        fill_seconds = time.perf_counter() - started
        encode = vlad_encode_one_by_one_vs_batched(backbone)
        epoch = {}
        for cache in ("disk", "none"):
            vlad.train(backbone, samples, folder / f"run_{cache}", epochs=1, cache=cache, progress=False,
                       cache_dir=folder / "tokens")
            epoch[cache] = data.read_jsonl(folder / f"run_{cache}/log.jsonl")[0]["seconds"]
        print(f"{model} @ {image_size} px, {device} {precision}, {len(samples)} images, batch {vlad.BATCH_SIZE}:")
        print(f"  text features of one category:   {text_seconds:8.2f} s  (once, then cached)")
        print(f"  filling the token cache:         {fill_seconds:8.2f} s  (once per run)")
        print(f"  8 images through the backbone:   {encode[0]:8.2f} s one by one, as vlad.py does, "
              f"vs {encode[1]:.2f} s as one batch ({encode[0] / encode[1]:.2f}x"
              f"{', CPU time' if device == 'cpu' else ''})")
        print(f"  one epoch with cached tokens:    {epoch['disk']:8.2f} s")
        print(f"  one epoch without the cache:     {epoch['none']:8.2f} s  "
              f"({epoch['none'] / epoch['disk']:.0f}x slower)")

        detector = vlad.VLAD(backbone.width, backbone.embed_dim, len(backbone.stages)).to(backbone.device)
        predict_root = vlad_bench_dataset(folder / "predict", n_predict, image_size, seed=1)
        for k in (0, 4):
            started = time.perf_counter()
            prediction = vlad.plan_category(predict_root, "texture", k, 0, folder / f"pred_{k}", map_size=None)
            vlad.predict_set(backbone, detector, prediction, progress=False)
            seconds = time.perf_counter() - started
            print(f"  prediction, k = {k}:               {n_predict / seconds:8.2f} images/s  "
                  f"({n_predict} images incl. TIFF + overlay writes{' and the 4-image bank' if k else ''})")


def vlad_bench_tiny_clip(folder: Path, embed_dim: int) -> str:
    from test_all import build_tiny_clip

    return build_tiny_clip(folder, embed_dim=embed_dim)


def vlad_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def vlad_bank_peak(method: str, model: str, root: str, queue) -> None:
    """In its own process: the memory bank of every train/good image, built by `method`; reports
    (peak RSS growth during the build, the bank's own bytes), both in MiB."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    backbone = vlad.Backbone(model, None, 224)
    detector = vlad.VLAD(backbone.width, backbone.embed_dim, len(backbone.stages))
    images = [s.image for s in data.read_split(root, "texture", "train")]
    vlad.collect_memory_bank(backbone, detector, images[:8])  # warm-up: allocator, threads, first-call costs
    # The kernel's peak RSS (VmHWM), reset here: ru_maxrss would carry the parent's peak across the spawn
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = vlad_rss_mib()
    if method == "parts":  # before this fix: a list of per-batch parts, then one concatenation
        parts = []
        for start in range(0, len(images), 8):
            pixels = torch.stack([backbone.preprocess(data.load_image(p)) for p in images[start:start + 8]])
            features = detector.patch_features(backbone.encode_images(pixels)[0])
            parts.append([f.reshape(-1, f.shape[-1]) for f in features])
        bank = [torch.cat(stage) for stage in zip(*parts)]
    else:
        bank = vlad.collect_memory_bank(backbone, detector, images, 8, torch.float32)
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
    queue.put((peak - before, sum(b.numel() * b.element_size() for b in bank) / 2 ** 20))


def bench_vlad_memory_bank() -> None:
    """The memory bank's peak memory against its own bytes, on a case where the bank dominates: 400 images
    through a 4-block ViT with a 512-wide embedding at 224 px (196 patches): 4 x 196 x 512 x 4 B = 1.5 MiB
    per image in fp32, 613 MiB for the bank."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = vlad_bench_tiny_clip(folder / "clip", embed_dim=512)
        from test_all import vlad_make_synthetic_dataset
        root = vlad_make_synthetic_dataset(folder / "data", ("texture",), n_train=400, n_good=0, n_bad=0,
                                           size=(224, 224))
        results = {}
        for method in ("parts", "collect"):
            queue = context.Queue()
            child = context.Process(target=vlad_bank_peak, args=(method, model, str(root), queue))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"the memory bank benchmark ({method}) failed, exit code {child.exitcode}")
            results[method] = queue.get()
    print("vlad memory bank: 400 images x 4 stages x 196 patches x 512 channels, fp32, CPU")
    for method, label in (("parts", "parts + torch.cat (before)"), ("collect", "collect_memory_bank")):
        grown, bank = results[method]
        print(f"  {label:28s} peak growth {grown:7.0f} MiB = {grown / bank:.2f}x the bank's {bank:.0f} MiB")


def vlad_protocol_runs(train_good: dict[str, list[str]], n_few: int, n_full: int, shots=(1, 2, 4),
                       seeds=range(5), full_seeds=(0,), shared: bool = True) -> list[tuple[str, set, set]]:
    """reproduce.sh's runs in its order as (folder that generated the samples, the entries the run trains on,
    the entries evicted after it with EVICT_TOKENS=1). An entry is (category, normal image) for the normal image
    itself and (category, normal image, i) for its sample of seed i: CUT's samples depend only on the image, the
    prompt, the settings and i. Seed by seed, one generation serves the union of the k-shot images, each k trains
    on its own k images' N_FEW samples, and the seed's samples leave after its last k; full-shot generates and
    evicts its own. shared=False: as before, every k generated its own samples and evicted them."""
    runs = []
    for seed in seeds:
        chosen = {k: {c: data.select_k_shot([Path(n) for n in names], k, seed) for c, names in train_good.items()}
                  for k in shots}
        pool = {(c, p.name, *i) for k in shots for c, images in chosen[k].items() for p in images
                for i in [()] + [(i,) for i in range(n_few)]}
        for k in shots:
            entries = {(c, p.name, *i) for c, images in chosen[k].items() for p in images
                       for i in [()] + [(i,) for i in range(n_few)]}
            if shared:
                runs.append((f"seed{seed}", entries, pool if k == shots[-1] else set()))
            else:
                runs.append((f"k{k}_seed{seed}", entries, entries))
    for seed in full_seeds:
        entries = {(c, name, *i) for c, names in train_good.items() for name in names
                   for i in [()] + [(i,) for i in range(n_full)]}
        runs.append((f"kall_seed{seed}", entries, entries))
    return runs


def vlad_protocol_totals(runs: list[tuple[str, set, set]], n_aux: int) -> dict[str, int]:
    """Samples generated, training images over all runs, unique cache entries kept without eviction (if sample i
    of a normal image is byte-identical wherever it was generated, and if only the linked ones are; cut.py's copies of a normal image are identical everywhere), and the most entries on disk at once with
    eviction (the auxiliary set stays)."""
    generated, identical, by_folder, cache, peak = {}, set(), set(), set(), 0
    for folder, entries, evicted in runs:
        generated.setdefault(folder, set()).update(e for e in entries if len(e) == 3)
        identical |= entries
        by_folder |= {(folder, *e) if len(e) == 3 else e for e in entries}
        cache |= entries
        peak = max(peak, len(cache))
        cache -= evicted
    return {"generated": sum(map(len, generated.values())), "trained": sum(len(e) + n_aux for _, e, _ in runs),
            "unique_identical": len(identical) + n_aux, "unique_by_folder": len(by_folder) + n_aux,
            "peak_evicting": peak + n_aux}


MVTEC_TRAIN_GOOD = {"bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391,
                    "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60,
                    "transistor": 213, "wood": 247, "zipper": 240}  # 3,629, named 000.png, 001.png, ... in MVTec AD
VISA_TEST = 2162  # the auxiliary set for MVTec AD: VisA's test split (962 normal, 1,200 anomalous)


def vlad_fake_generation(sources: list[Path], out: Path, n: int, salt: str = "") -> None:
    """cut.py's output layout and meta.jsonl for the given normal images, n samples each, whose bytes depend on
    the image and the sample's seed only (as CUT's do), or also on `salt` (samples that differ per folder)."""
    for source in sources:
        category = source.parent.parent.parent.name
        data.save_image(data.load_image(source), out / category / "train/good" / f"{source.stem}.png")
        for seed in range(n):
            rng = np.random.default_rng([seed, *hashlib.sha256(source.read_bytes() + salt.encode()).digest()])
            name = f"{source.stem}_{seed}"
            data.save_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), out / category / "test/damaged" / f"{name}.png")
            data.save_mask(rng.random((32, 32)), data.mask_path(out, category, "damaged", name))
            data.append_jsonl({"image": f"test/damaged/{name}.png", "mask": f"ground_truth/damaged/{name}_mask.png",
                               "source": str(source), "seed": seed}, out / category / "meta.jsonl")


def vlad_protocol_scaled(folder: Path, backbone: vlad.Backbone, normals: dict[str, list[str]], aux: Path,
                         n_few: int, n_full: int, evict: bool, salt: bool) -> tuple[int, int, int]:
    """reproduce.sh's few-shot and full-shot runs on a small tree through the real code (data.link_samples,
    TokenCache), with fake generation; returns (samples generated, the most entries in the shared cache at once,
    entries at the end)."""
    cache, peak = folder / "tokens", 0
    aux_samples = vlad.training_samples([], [aux])

    def entries() -> int:  # not a temporary (.KEY.safetensors.XXXXXXXX.tmp.safetensors ends in .safetensors too)
        return sum(not data.is_temporary(path) for path in cache.rglob("*.safetensors"))

    def train(root: Path, evicted: Path | None) -> None:
        nonlocal peak
        vlad.TokenCache(backbone, vlad.training_samples([root], []) + aux_samples, "disk", cache).fill(progress=False)
        peak = max(peak, entries())
        if evicted is not None and evict:
            gone = vlad.training_samples([evicted], [])
            vlad.TokenCache(backbone, gone, "disk", cache).evict(range(len(gone)))

    data_root = folder / "data"
    for seed in range(5):
        chosen = {k: [data_root / c / "train/good" / p.name for c, names in normals.items()
                      for p in data.select_k_shot([Path(n) for n in names], k, seed)] for k in (1, 2, 4)}
        pool = folder / f"seed{seed}/generated"
        vlad_fake_generation(sorted({p for images in chosen.values() for p in images}), pool, n_few,
                             f"seed{seed}" if salt else "")
        for k in (1, 2, 4):
            data.link_samples(pool, folder / f"k{k}_seed{seed}/generated", chosen[k], n_few)
            train(folder / f"k{k}_seed{seed}/generated", pool if k == 4 else None)
    full = folder / "kall_seed0/generated"
    vlad_fake_generation([data_root / c / "train/good" / n for c, names in normals.items() for n in names], full,
                         n_full, "kall" if salt else "")
    train(full, full)
    generated = sum(len(data.read_jsonl(meta)) for root in [folder / f"seed{seed}/generated" for seed in range(5)]
                    + [full] for meta in root.glob("*/meta.jsonl"))  # the k<K>_seed<S> folders hold links
    return generated, peak, entries()


def bench_vlad_protocol() -> None:
    """reproduce.sh's token cache with generation shared across k: the protocol's runs (k = 1, 2, 4 x 5 seeds +
    full-shot) on a tree of 3 categories of 6 normals, 3 samples per normal few-shot and 1 full-shot, 12
    auxiliary test images, through the real code into one shared folder, measured three ways (evicting; keeping
    all, with sample i of a normal image byte-identical wherever generated, and not). The same
    arithmetic, checked against those counts, then gives MVTec AD's totals at ViT-L-14 / 518 px from the bytes of
    one real entry of that shape."""
    from test_all import vlad_make_synthetic_dataset

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    normals = {c: [f"{i:03d}.png" for i in range(6)] for c in ("a", "b", "c")}
    n_few, n_full = 3, 1
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        backbone = vlad.Backbone(vlad_bench_tiny_clip(folder / "clip", embed_dim=32), None, 112)
        aux = vlad_make_synthetic_dataset(folder / "aux", ("tile",), n_train=0, n_good=4, n_bad=8, seed=99)
        n_aux = len(vlad.training_samples([], [aux]))
        totals = vlad_protocol_totals(vlad_protocol_runs(normals, n_few, n_full), n_aux)
        measured = {}
        for name, evict, salt in (("evicting", True, False), ("identical", False, False), ("by_folder", False, True)):
            case = folder / name
            vlad_make_synthetic_dataset(case / "data", tuple(normals), n_train=6, n_good=0, n_bad=0, size=(32, 32))
            started = time.perf_counter()
            measured[name] = vlad_protocol_scaled(case, backbone, normals, aux, n_few, n_full, evict, salt)
            generated, peak, end = measured[name]
            print(f"vlad protocol, scaled ({name}): {generated} samples generated; cache peak {peak} entries, {end} "
                  f"at the end ({time.perf_counter() - started:.1f} s)")
        expected = {"evicting": (totals["generated"], totals["peak_evicting"], n_aux),
                    "identical": (totals["generated"], *(totals["unique_identical"],) * 2),
                    "by_folder": (totals["generated"], *(totals["unique_by_folder"],) * 2)}
        assert measured == expected, (measured, expected)
        print(f"  = the arithmetic: {totals['generated']} samples, {totals['unique_identical']} unique entries kept "
              f"({totals['unique_by_folder']} if samples differ per folder), {totals['peak_evicting']} at most with "
              f"eviction, {n_aux} after it")

        side, n_tokens = 518, (518 // 14) ** 2
        entry = {"tokens": torch.zeros(4, n_tokens, 1024, dtype=torch.float16),
                 "embedding": torch.zeros(768, dtype=torch.float16),
                 "y_pix": torch.zeros(side, side, dtype=torch.uint8), "y_img": torch.zeros(())}
        from safetensors.torch import save_file
        save_file(entry, str(folder / "vit_l.safetensors"))
        vit_l = (folder / "vit_l.safetensors").stat().st_size

    mvtec = {c: [f"{i:03d}.png" for i in range(n)] for c, n in MVTEC_TRAIN_GOOD.items()}
    shared = vlad_protocol_totals(vlad_protocol_runs(mvtec, 100, 5), VISA_TEST)
    per_k = vlad_protocol_totals(vlad_protocol_runs(mvtec, 100, 5, shared=False), VISA_TEST)

    def gb(entries: int) -> str:
        return f"{entries:,} entries = {entries * vit_l / 1e9:,.0f} GB"

    print(f"  ViT-L-14 @ 518 px fp16: {vit_l:,} bytes per entry")
    print(f"  MVTec AD, 16 runs, VisA's test split auxiliary ({VISA_TEST:,} images): {shared['trained']:,} training "
          f"images over all runs")
    print(f"    samples generated: {shared['generated']:,} (before, each k its own: {per_k['generated']:,})")
    print(f"    kept without eviction: {gb(shared['unique_identical'])} if sample i of a normal image is "
          f"byte-identical wherever generated, {gb(shared['unique_by_folder'])} if not "
          f"(before: {gb(per_k['unique_by_folder'])})")
    print(f"    with eviction (reproduce.sh's default), the most at once: {gb(shared['peak_evicting'])}")


def bench_vlad_predict_io(n_images: int = 8) -> None:
    """Why predict does not read the token cache: per test image of MVTec AD's size (vlad_loader_images' 1024 x
    1024 PNGs), what predict spends besides the backbone, none of which a cache entry replaces (the map and overlay
    are written at the image's size, so it is decoded anyway), against reading one ViT-L-14 / 518 px entry, from
    the page cache and from the disk (its pages dropped with posix_fadvise)."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    png_bytes: dict[int, float] = {}

    def timed(name: str, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - started) * 1000 / n_images
        return result

    def read(path):  # load_file maps the file; touching every byte is what using the entry does
        return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}

    with tempfile.TemporaryDirectory(dir=".") as folder:  # on the disk the user works on, not a RAM-backed /tmp
        folder = Path(folder)
        photos = vlad_loader_images(folder / "images", n_images)[0]
        side, n_tokens = 518, (518 // 14) ** 2
        generator = torch.Generator().manual_seed(0)
        for i, path in enumerate(photos):
            image = timed("decode the PNG (data.load_image)", data.load_image, path)
            timed("sha256 of the file (a cache key)", vlad.file_sha256, path)
            timed("preprocess to 518 x 518", vlad.preprocess, image, side, (0.5,) * 3, (0.5,) * 3)
            grid = torch.rand(side // 14, side // 14, generator=generator)  # as smooth as Eq. 8's maps
            anomaly_map = torch.nn.functional.interpolate(grid[None, None] * 8, size=(side, side), mode="bilinear")
            photo = vlad.Photo(path, f"maps/{i}.tiff", f"overlay/{i}.png", path.name, None)
            timed("map, TIFF and overlay (write_outputs)", vlad.write_outputs, folder, photo, np.asarray(image),
                  anomaly_map[0, 0], 8)
            overlay = Image.open(folder / photo.overlay)
            overlay.load()
            for level, whose in ((1, "predict's"), (6, "PIL's default")):
                png = io.BytesIO()
                timed(f"  its PNG encoding alone, zlib {level} ({whose})", overlay.save, png, "PNG",
                      compress_level=level)
                png_bytes[level] = png_bytes.get(level, 0) + len(png.getvalue()) / n_images
            entry = {"tokens": torch.rand(4, n_tokens, 1024, generator=generator).half(),
                     "embedding": torch.rand(768, generator=generator).half(),
                     "y_pix": torch.zeros(side, side, dtype=torch.uint8), "y_img": torch.zeros(())}
            save_file(entry, str(folder / f"{i}.safetensors"))
        for i in range(n_images):
            timed("read an entry, page cache", read, folder / f"{i}.safetensors")
        for i in range(n_images):
            handle = os.open(folder / f"{i}.safetensors", os.O_RDONLY)
            os.fsync(handle)
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(handle)
            timed("read an entry, disk", read, folder / f"{i}.safetensors")
        entry_bytes = (folder / "0.safetensors").stat().st_size
    print(f"vlad predict, per 1024 x 1024 test image, CPU, one thread ({n_images} images):")
    for name, milliseconds in timings.items():
        print(f"  {name:48s} {milliseconds:8.1f} ms")
    print(f"  overlay PNG size: {png_bytes[1] / 1e6:.2f} MB at zlib 1, {png_bytes[6] / 1e6:.2f} MB at zlib 6")
    kept = sum(v for k, v in timings.items() if not k.startswith(("read", "sha256", " ")))
    print(f"  predict's work that a cache entry cannot replace: {kept:.0f} ms; the entry ({entry_bytes:,} bytes) "
          f"could replace one ViT-L forward")


def vlad_loader_images(folder: Path, n: int, seed: int = 0) -> tuple[list[Path], list[Path], list[Path]]:
    """Photo-like test files from examples/cookie_1.png: n 1024 x 1024 PNGs (an MVTec AD image's size), and n
    512 x 512 generated samples with their soft masks (what cut.py writes). Each is shifted, flipped and given
    sensor-like noise, so the files differ and compress as photos do (about 1.6 MB per 1024 x 1024 PNG)."""
    rng = np.random.default_rng(seed)
    cookie = data.load_image(Path(__file__).resolve().parent / "examples/cookie_1.png")
    photos, samples, masks = [], [], []
    for i in range(n):
        for side, names in ((1024, photos), (512, samples)):
            base = np.asarray(cookie.resize((side, side), Image.BICUBIC), dtype=np.float32)
            base = np.roll(base[:, ::-1] if i % 2 else base, int(rng.integers(side)), axis=1)
            pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
            names.append(folder / f"{side}" / f"{i:03d}.png")
            data.save_image(pixels, names[-1])
        yy, xx = np.mgrid[:512, :512]
        distance = np.hypot(yy - rng.uniform(100, 412), xx - rng.uniform(100, 412)) / 80
        masks.append(folder / "512" / f"{i:03d}_mask.png")
        data.save_mask(np.clip(1.3 - distance, 0, 1) * (distance <= 1), masks[-1])
    return photos, samples, masks


def bench_vlad_loader(n_images: int = 96) -> None:
    """vlad.py's loading alone (decode, RGB, resize to 518, normalize; y_pix from the soft mask) through
    vlad.image_batches, in the main process and in --workers' default number of DataLoader workers, batches of
    8, after one warm-up pass (the files in the page cache, as on a second epoch): images per second and their
    ratio, and the CPU time per image in each case (workers: their own CPU time, counted once they exit), which
    other jobs on a shared machine do not inflate: with N idle cores, N workers decode N x (main's CPU time /
    a worker's) as fast."""
    from open_clip.constants import OPENAI_DATASET_MEAN as mean, OPENAI_DATASET_STD as std  # ViT-L-14's openai

    torch.set_num_threads(1)
    workers = vlad.default_workers()

    def cpu_seconds(who) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    with tempfile.TemporaryDirectory() as folder:
        photos, samples, masks = vlad_loader_images(Path(folder), n_images)
        megabytes = sum(p.stat().st_size for p in photos) / len(photos) / 1e6
        cases = [(f"1024 x 1024 PNG ({megabytes:.1f} MB)", vlad.ImageDataset(photos, vlad.IMAGE_SIZE, mean, std)),
                 ("512 x 512 generated sample + soft mask",
                  vlad.ImageDataset(samples, vlad.IMAGE_SIZE, mean, std, masks=masks))]
        print(f"vlad loading alone (to {vlad.IMAGE_SIZE} px), {n_images} images in batches of 8, "
              f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} before), {workers} workers "
              f"(the default here):")
        for name, dataset in cases:
            batches = vlad.index_batches(len(dataset), 8)
            rate, cpu_ms = {}, {}
            for count in (0, workers):
                list(vlad.image_batches(dataset, batches, count))  # warm-up: page cache, allocator
                who = resource.RUSAGE_CHILDREN if count else resource.RUSAGE_SELF
                started, cpu_started = time.perf_counter(), cpu_seconds(who)
                for _ in vlad.image_batches(dataset, batches, count):
                    pass
                rate[count] = len(dataset) / (time.perf_counter() - started)
                cpu_ms[count] = 1000 * (cpu_seconds(who) - cpu_started) / len(dataset)
            print(f"  {name:40s} {rate[0]:5.1f} images/s with 0 workers, {rate[workers]:5.1f} with {workers} "
                  f"({rate[workers] / rate[0]:.2f}x); CPU per image {cpu_ms[0]:5.1f} ms in the main process, "
                  f"{cpu_ms[workers]:5.1f} ms in a worker ({cpu_ms[workers] / cpu_ms[0]:.2f}x)")


def vlad_eq8_maps(run: Path, held_out: Path, size: int) -> tuple[dict[str, list], list[np.ndarray]]:
    """M_VL of every held-out test image at its own size in both orders of Eq. 8, and the masks."""
    backbone, detector, _ = vlad.load_detector(run)
    text = backbone.text_features("texture")  # (2, C)
    maps, masks = {"paper": [], "vlad.py": []}, []
    for sample in data.read_split(held_out, "texture", "test"):
        image = data.load_image(sample.image)
        tokens, _ = backbone.encode_images(backbone.preprocess(image)[None])
        with torch.no_grad():
            features = detector.patch_features(tokens)  # L x (1, N, C)
        side = int(features[0].shape[1] ** 0.5)
        paper = sum(torch.nn.functional.interpolate(  # softmax per patch, then the probability upsampled
            (100.0 * f[0] @ text.T).softmax(dim=-1)[:, 1].reshape(1, 1, side, side), size=(size, size),
            mode="bilinear", align_corners=False)[0, 0] for f in features)
        ours = vlad.vision_language_maps(features, text[None], size).sum(dim=1)[0]
        for name, anomaly_map in (("paper", paper), ("vlad.py", ours)):
            maps[name].append(torch.nn.functional.interpolate(  # at the image's size, as predict writes it
                anomaly_map[None, None], size=(image.height, image.width), mode="bilinear",
                align_corners=False)[0, 0].numpy())
        masks.append(np.zeros((image.height, image.width)) if sample.mask is None else data.load_mask(sample.mask))
    return maps, masks


def bench_vlad_eq8_order(seeds=(0, 1, 2)) -> None:
    """Eq. 8's two orders on trained tiny VLADs (the tests' 4-block CLIP at 112 px, 7 x 7 patches of 16, trained
    12 epochs on soft-mask anomalies, one run per seed), on 30 held-out images at 120 x 100 as predict writes
    them: the paper's (softmax per patch, then upsample the abnormal probability) against vlad.py's (upsample
    the two logits, then softmax, as APRIL-GAN; the losses need the logits at pixel resolution). M_VL alone
    (zero-shot), where the order is the only difference."""
    from test_all import VLAD_TINY_SIZE, build_tiny_clip, vlad_make_synthetic_dataset

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    size = VLAD_TINY_SIZE
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = build_tiny_clip(folder / "clip")
        gen = vlad_make_synthetic_dataset(folder / "gen", n_train=4, n_good=0, n_bad=12, soft=True, seed=1)
        held_out = vlad_make_synthetic_dataset(folder / "held_out", n_train=0, n_good=10, n_bad=20, size=(120, 100),
                                               seed=2)
        print("Eq. 8's order on trained tiny VLADs, 30 held-out images, M_VL in [0, 4] (4 stages), in %:")
        for seed in seeds:
            run = folder / f"run_{seed}"
            with contextlib.redirect_stdout(io.StringIO()):  # its summary lines are not this benchmark's
                assert vlad.main(["train", "--data", str(gen), "--out", str(run), "--model", model, "--image-size",
                                  str(size), "--epochs", "12", "--lr", "1e-3", "--batch-size", "4", "--seed",
                                  str(seed), "--workers", "0", "--quiet", "--cache-dir", str(folder / "tokens")]) == 0
            maps, masks = vlad_eq8_maps(run, held_out, size)
            difference = np.abs(np.stack(maps["paper"]) - np.stack(maps["vlad.py"]))
            anomalous = np.stack(masks) > 0
            values = {name: metrics.pixel_metrics(maps[name], masks) for name in maps}
            print(f"  seed {seed}: |paper - vlad.py| max {difference.max():.3f}, mean {difference.mean():.4f} "
                  f"({difference[anomalous].mean():.4f} on anomalous pixels, {difference[~anomalous].mean():.4f} on "
                  f"normal ones)")
            for name in maps:
                print(f"    {name:8s} P-AUC {100 * values[name]['P-AUC']:6.2f}  "
                      f"P-F1 {100 * values[name]['P-F1']:6.2f}  PRO {100 * values[name]['PRO']:6.2f}")


def bench_vlad(protocol: bool = False, bank: bool = False, loader: bool = False, eq8: bool = False,
               predict_io: bool = False) -> None:
    if predict_io:
        bench_vlad_predict_io()
        return
    if eq8:
        bench_vlad_eq8_order()
        return
    if protocol:
        bench_vlad_protocol()
        return
    if bank:
        bench_vlad_memory_bank()
        return
    if loader:
        bench_vlad_loader()
        return
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random, which is the point here
    bench_vlad_loader()
    vlad_bench_one("ViT-B-16", 224, "cpu", "fp32")
    if torch.cuda.is_available():
        vlad_bench_one("ViT-L-14-quickgelu", 518, "cuda", "fp16", n_images=64, n_predict=64)
    bench_vlad_memory_bank()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("metrics", help="metrics.py on an MVTec AD-sized case")
    cut_parser = commands.add_parser("cut", help="one CUT sample vs img2img and Attend-and-Excite")
    cut_parser.add_argument("--full", action="store_true", help="SD 1.5 topology at 512x512 (fp16 on CUDA)")
    cut_parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                            help="with --full: cuda (the whole comparison) or cpu (a few steps, extrapolated)")
    cut_parser.add_argument("--photo", help="with --full --device cpu: a photo's WxH, e.g. 1600x1200 (default: square)")
    vlad_parser = commands.add_parser("vlad", help="VLAD epoch with/without token cache, prediction speed, bank")
    vlad_parser.add_argument("--protocol", action="store_true",
                             help="reproduce.sh's shared token cache: bytes per image and the protocol's total")
    vlad_parser.add_argument("--bank", action="store_true", help="only the memory bank's peak memory")
    vlad_parser.add_argument("--loader", action="store_true",
                             help="only image loading: images/s with 0 and the default number of DataLoader workers")
    vlad_parser.add_argument("--eq8", action="store_true",
                             help="Eq. 8's two orders (softmax then upsample, or the reverse) on trained tiny VLADs")
    vlad_parser.add_argument("--predict-io", action="store_true",
                             help="predict's work per image besides the backbone, and a token-cache read")
    args = parser.parse_args(argv)
    if args.command == "metrics":
        bench_metrics()
    elif args.command == "cut":
        if args.full and args.device == "cpu":
            photo = tuple(int(side) for side in args.photo.lower().split("x")) if args.photo else None
            bench_cut_full_cpu(photo)
            return 0
        if args.full and not torch.cuda.is_available():
            print("bench.py: error: --full needs a CUDA GPU; use --full --device cpu for the CPU figures",
                  file=sys.stderr)
            return 2
        bench_cut(full=args.full)
    else:
        bench_vlad(protocol=args.protocol, bank=args.bank, loader=args.loader, eq8=args.eq8,
                   predict_io=args.predict_io)
    return 0


if __name__ == "__main__":
    sys.exit(main())
