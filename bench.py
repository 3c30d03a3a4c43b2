"""Benchmarks, measured as ratios against a reference run in the same process or run, never as timed tests.

    python bench.py metrics        exact P-AUC/P-F1/PRO on an MVTec AD-sized case vs sklearn and one np.sort
    python bench.py cut [--full]   one CUT sample vs plain img2img and Attend-and-Excite (tiny SD on CPU;
                                   --full: SD 1.5's topology with random weights, 512x512 fp16, CUDA)
    python bench.py cut --full --device cpu [--photo 1600x1200]   SD 1.5's topology in fp32 on the CPU: a few
                                   timed steps at the working size of a square (or that) photo, and the seconds
                                   per sample extrapolated from them
    python bench.py vlad           one epoch with and without the token cache; prediction images/s (k = 4);
                                   the memory bank's peak memory (--bank: only that)
    python bench.py vlad --protocol  reproduce.sh's shared token cache: bytes per entry, the protocol's total

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
import logging
import multiprocessing
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

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
        epoch = {}
        for cache in ("disk", "none"):
            vlad.train(backbone, samples, folder / f"run_{cache}", epochs=1, cache=cache, progress=False,
                       cache_dir=folder / "tokens")
            epoch[cache] = data.read_jsonl(folder / f"run_{cache}/log.jsonl")[0]["seconds"]
        print(f"{model} @ {image_size} px, {device} {precision}, {len(samples)} images, batch {vlad.BATCH_SIZE}:")
        print(f"  text features of one category:   {text_seconds:8.2f} s  (once, then cached)")
        print(f"  filling the token cache:         {fill_seconds:8.2f} s  (once per run)")
        print(f"  one epoch with cached tokens:    {epoch['disk']:8.2f} s")
        print(f"  one epoch without the cache:     {epoch['none']:8.2f} s  "
              f"({epoch['none'] / epoch['disk']:.0f}x slower)")

        detector = vlad.VLAD(backbone.width, backbone.embed_dim, len(backbone.stages)).to(backbone.device)
        predict_root = vlad_bench_dataset(folder / "predict", n_predict, image_size, seed=1)
        for k in (0, 4):
            started = time.perf_counter()
            vlad.predict_category(backbone, detector, predict_root, "texture", k, 0, folder / f"pred_{k}",
                                  progress=False)
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


def vlad_protocol_counts(train_good: dict[str, int], aux_test: int, n_few: int = 100, n_full: int = 5,
                         shots=(1, 2, 4), seeds: int = 5) -> dict[str, int]:
    """Training images per run of reproduce.sh and the unique images its shared cache holds: few-shot runs
    train on k normals + k x n_few generated per category; the full-shot run on every normal + n_full each;
    every run on the auxiliary test split, which the shared cache holds once."""
    few = {k: sum(k * (1 + n_few) for _ in train_good) for k in shots}
    full = sum(n * (1 + n_full) for n in train_good.values())
    per_run_total = sum(few[k] * seeds for k in shots) + full
    runs = len(shots) * seeds + 1
    return {"runs": runs, "generated": per_run_total, "aux": aux_test,
            "entries_per_run_cache": per_run_total + runs * aux_test, "unique": per_run_total + aux_test}


MVTEC_TRAIN_GOOD = {"bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391,
                    "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60,
                    "transistor": 213, "wood": 247, "zipper": 240}  # 3,629
VISA_TEST = 2162  # the auxiliary set for MVTec AD: VisA's test split (962 normal, 1,200 anomalous)


def bench_vlad_protocol() -> None:
    """reproduce.sh's token cache, scaled: the protocol's runs (k = 1, 2, 4 x 5 seeds + full-shot) on a tree
    with 3 categories of 6 normals, 2 generated per normal and 12 auxiliary test images, filled through
    TokenCache into one shared folder, as reproduce.sh runs it. Then the same arithmetic at ViT-L-14 / 518 px
    with MVTec AD's counts, from the bytes of one real entry of that shape."""
    from test_all import vlad_make_synthetic_dataset

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        backbone = vlad.Backbone(vlad_bench_tiny_clip(folder / "clip", embed_dim=32), None, 112)
        categories, normals, n_few, n_full = ("a", "b", "c"), 6, 2, 1
        aux = vlad_make_synthetic_dataset(folder / "aux", ("tile",), n_train=0, n_good=4, n_bad=8, seed=99)
        aux_samples = vlad.training_samples([], [aux])
        cache = folder / "tokens"
        started, runs, per_run_entries = time.perf_counter(), 0, 0
        for k, seeds, n in [(1, 5, n_few), (2, 5, n_few), (4, 5, n_few), (normals, 1, n_full)]:
            for seed in range(seeds):  # every run generates its own images: distinct content
                generated = vlad_make_synthetic_dataset(folder / f"gen_k{k}_s{seed}", categories, n_train=k,
                                                        n_good=0, n_bad=k * n, seed=1000 * k + seed, soft=True)
                samples = vlad.training_samples([generated], [aux])
                vlad.TokenCache(backbone, samples, "disk", cache).fill(progress=False)
                runs, per_run_entries = runs + 1, per_run_entries + len(samples)
        seconds = time.perf_counter() - started
        files = list(cache.rglob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        counts = vlad_protocol_counts({c: normals for c in categories}, len(aux_samples), n_few, n_full)
        assert counts["runs"] == runs and len(files) == counts["unique"], (len(files), counts)
        per_image = files[0].stat().st_size  # every entry has the same shapes, masked or not
        print(f"vlad protocol, scaled: {runs} runs, {per_run_entries} training images in all, {len(files)} unique "
              f"in the shared cache ({counts['aux']} auxiliary images once, not {runs} times); filled in {seconds:.1f} s")
        print(f"  tiny backbone ({len(backbone.stages)} x 49 x {backbone.width} fp32 + y_pix 112 x 112 uint8): "
              f"{per_image / 1e3:.1f} kB per entry; cache {total / 1e6:.2f} MB = "
              f"{total / (len(files) * per_image):.3f}x unique x per-entry")

        side, n_tokens = 518, (518 // 14) ** 2
        entry = {"tokens": torch.zeros(4, n_tokens, 1024, dtype=torch.float16),
                 "embedding": torch.zeros(768, dtype=torch.float16),
                 "y_pix": torch.zeros(side, side, dtype=torch.uint8), "y_img": torch.zeros(())}
        from safetensors.torch import save_file
        save_file(entry, str(folder / "vit_l.safetensors"))
        vit_l = (folder / "vit_l.safetensors").stat().st_size
    old = 4 * n_tokens * 1024 * 2 + 768 * 2 + side * side * 4 + 4  # fp16 tokens + float32 y_pix, per run
    mvtec = vlad_protocol_counts(MVTEC_TRAIN_GOOD, VISA_TEST)
    print(f"  ViT-L-14 @ 518 px fp16: {vit_l:,} bytes per entry (before: {old:,}, y_pix in float32)")
    print(f"  MVTec AD with VisA auxiliary, {mvtec['runs']} runs: {mvtec['generated']:,} generated + normal training "
          f"images, {mvtec['aux']:,} auxiliary")
    print(f"    shared cache: {mvtec['unique']:,} unique entries x {vit_l / 1e6:.2f} MB = {mvtec['unique'] * vit_l / 1e9:,.0f} GB")
    print(f"    before (a cache per run): {mvtec['entries_per_run_cache']:,} entries x {old / 1e6:.2f} MB = "
          f"{mvtec['entries_per_run_cache'] * old / 1e9:,.0f} GB")
    largest = max(sum(k * 101 for _ in MVTEC_TRAIN_GOOD) for k in (1, 2, 4))
    full = sum(n * 6 for n in MVTEC_TRAIN_GOOD.values())
    print(f"    with --evict-data-tokens (reproduce.sh's default), the most on disk at once is the largest run: "
          f"full-shot {full + VISA_TEST:,} entries = {(full + VISA_TEST) * vit_l / 1e9:,.0f} GB "
          f"(k = 4: {largest + VISA_TEST:,} entries = {(largest + VISA_TEST) * vit_l / 1e9:,.0f} GB)")


def bench_vlad(protocol: bool = False, bank: bool = False) -> None:
    if protocol:
        bench_vlad_protocol()
        return
    if bank:
        bench_vlad_memory_bank()
        return
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random, which is the point here
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
        bench_vlad(protocol=args.protocol, bank=args.bank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
