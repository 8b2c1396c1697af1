"""Text-to-video and image-to-video generation: one function for both tasks, following the official
`WanT2V.generate` / `WanI2V.generate` step by step (separate cond/uncond DiT calls, UniPC, VAE decode)."""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..kernels.attention import check_mode
from ..kernels.dispatch import has_triton
from ..quant.formats import (dequantize_block, is_quantized, quantize_block, quantize_text_block, resolve_scheme,
                             same_storage)
from .checkpoint import Checkpoint, open_checkpoint
from .clip import CLIPVision, preprocess
from .config import VARIANTS
from .dit import WanDiT, keeps_fp32, pad_context
from .engine import COMPILED_KINDS, CompiledBlock, is_engine, open_engine, variant_from_json
from .cache import Residual, check_cache, magnitude_ratio, step_schedule
from .lora import merge_loras, read_lora, side_factors, side_rank
from .options import AUTO_ATTENTION, Request, RunOptions, check_image, check_request, parse_cache, parse_size
from .plan import UNLIMITED, Plan, PhasePlan, PlanError, make_plan, plan_phase
from .sampler import cfg, default_neg_prompt, default_shift, make_solver
from .stream import PinnedStore, make_store, make_streamer, split_blocks
from .text import Tokenizer, UMT5Encoder, encode_text
from .vae import WanVAE
from .video import to_uint8_frames, write_mp4

FPS = 16
PHASE_LINES = {"text": "encoding the prompts", "clip": "encoding the image", "encode": "encoding the image latents",
               "decode": "decoding the video"}
# A Wan2.1-architecture model of our own, trained on procedural shape videos (training/train_demo.py); what `wanrt
# generate` and `wanrt.load()` run when given no model. docs/demo-model.md says how it was trained and how it does.
DEMO_MODEL = Path(__file__).with_name("demo_model")


class GenerationError(RuntimeError):
    """A generation that cannot give a valid video (out of GPU memory, non-finite latents); the message says why."""


@dataclass
class Video:
    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: int = FPS
    seed: int = 0

    def save(self, path: str | Path) -> Path:
        return write_mp4(self.frames, path, fps=self.fps)


def load_image(image, max_pixels: int) -> torch.Tensor:
    """A path or PIL image -> [3, H, W] float in [-1, 1]. An image of more than 4x `max_pixels` (the pixels the
    request will use) is first shrunk by an integer factor in PIL, so a huge photo never becomes a float copy of its
    full size; smaller ones go through unchanged, as the official code takes them."""
    from PIL import Image, UnidentifiedImageError

    check_image(image)
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    factor = math.ceil(math.sqrt(image.width * image.height / (4 * max_pixels)))
    if factor > 1:
        image = image.reduce(factor)
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)


def _shell(module_cls, config, state: dict, dtype: torch.dtype | None) -> torch.nn.Module:
    """Build on meta and load every non-block tensor (a model whose blocks are streamed keeps them out: its block
    parameters stay on the meta device and are never touched)."""
    with torch.device("meta"):
        model = module_cls(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: a checkpoint of another size than its config says
        raise ValueError(f"{module_cls.__name__} weights do not match its config: {e}") from None
    missing = [k for k in missing if not k.startswith(BLOCK_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{module_cls.__name__} weights do not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to_inference_dtype(dtype) if hasattr(model, "to_inference_dtype") else model.to(dtype)
    return model.eval()


BLOCK_PREFIXES = ("blocks.", "transformer.")  # DiT and umT5 blocks; CLIP blocks


@contextmanager
def on_device(modules, device: torch.device, dtype: torch.dtype | None = None):
    """Give the modules' parameters device copies (in `dtype`, if given) for one phase; the host tensors come back
    afterwards (no copy back). Parameters on the meta device (blocks served by a streamer) are left alone."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.device.type != "meta"]
    home = [p.data for p in params]
    try:  # inside: if a copy runs out of memory, the ones made so far go back too
        for p in params:
            p.data = p.data.to(device, dtype or p.dtype, non_blocking=True)
        yield
    finally:
        for p, data in zip(params, home):
            p.data = data


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere, unknown: assume plenty."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 2**62


class WanPipeline:
    """A checkpoint's models, kept in host RAM (or memory-mapped), and a planner that decides per generation what
    goes onto the GPU. `generate` runs text encoding, denoising and VAE decoding phase by phase, each within the
    VRAM budget."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 options: RunOptions | None = None, vae_dtype: torch.dtype | None = None, request: dict | None = None):
        """`request` (generate's keywords): a generation to plan before any weight is read, refused at once
        (PlanError, naming the smallest budget) if it cannot fit, rather than after loading and quantizing."""
        self.ckpt = ckpt
        self.device = resolve_device(device)
        options = options or RunOptions()
        # bf16 GEMMs on the GPU as the official code; fp32 on the CPU where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vram_budget = default_vram_budget(self.device) if options.vram_budget is None else options.vram_budget
        # The VAE: bf16 on the GPU (faster, half the memory; bench/results/stream_h100.md), fp32 elsewhere and
        # whenever asked, as the official code runs it.
        self.vae_dtype = vae_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.variant = v = resolve_options(ckpt, options, self.device)  # before any weight is read
        self.tokenizer = Tokenizer(ckpt.tokenizer_dir, v.text.text_len)
        self.ram_budget = available_ram() - 2 * 2**30 if options.ram_budget is None else options.ram_budget
        self.phase_stats: dict[str, dict] = {}  # per phase of the last generation: planned and measured peaks, time
        self.block_copy = None  # replaces the streamed blocks' host-to-device copy (benchmarks: a slower link)
        self.loras = []  # the LoRAs applied at load (runtime/lora.py)
        recorded = getattr(ckpt, "manifest", {}).get("options", {})
        self.cache = options.cache if options.cache is not None else recorded.get("cache")  # runtime/cache.py
        self._cache_asked = options.cache is not None  # not an engine's recorded default
        check_cache(self.cache, ckpt.variant)
        self.step_schedule = None  # the last generation's step cache schedule, if one ran
        self._calibration = None  # per-step magnitude ratios while calibrate_cache runs
        if request is not None:
            self.check_fits(**request)

        # Blocks go to pinned RAM while the RAM budget lasts (the DiT first: it is read ~100 times per video), else
        # they stay memory-mapped and are read from disk (or the page cache) as they stream.
        ram = self.ram_budget
        # Blocks stored in another scheme than the one to run are (re)quantized as they come into host memory.
        dit_rest, dit_blocks = split_blocks(self._with_loras(ckpt.dit_state(mmap=True), options.loras),
                                            v.dit.num_layers)
        v = self.variant  # with a LoRA side path's rank, if one runs
        dit_blocks = requantized(dit_blocks, ckpt.variant.dit.quant, v.dit.quant, quantize_block, self.device)
        self.dit = _shell(WanDiT, v.dit, dit_rest, self.dtype)
        self.dit.compiled_block = self._compiled_block()
        self.dit_store, ram = _store(dit_blocks, self._dit_dtype, ram)
        text_rest, text_blocks = split_blocks(ckpt.text_state(mmap=True), v.text.num_layers)
        text_blocks = requantized(text_blocks, ckpt.variant.text.quant, v.text.quant, quantize_text_block,
                                  self.device)
        self.text_encoder = _shell(UMT5Encoder, v.text, text_rest, self.dtype)
        self.text_store, ram = _store(text_blocks, lambda n, t: t.dtype if is_quantized(n, t) else self.dtype, ram)
        self.vae = _shell(WanVAE, v.vae, ckpt.vae_state(), None)  # fp32, as the official code
        self.clip = self.clip_store = None
        if v.clip is not None:
            clip_rest, clip_blocks = split_blocks(ckpt.clip_state(), v.clip.use_layers, prefix="transformer")
            self.clip = _shell(CLIPVision, v.clip, clip_rest, self.dtype)
            self.clip_store, ram = _store(clip_blocks, lambda n, t: self.dtype, ram)

    def _with_loras(self, state: dict, specs: tuple[str, ...]) -> dict:
        """The DiT's weights with the LoRAs: merged before any quantization (a checkpoint's or a bf16 engine's
        weights), or, for an engine that stores quantized blocks, merged where they are 16-bit and run as a low-rank
        side path beside the quantized linears (the variant then records its rank for the planner)."""
        if not specs:
            return state
        self.loras = [read_lora(spec, self.variant.dit) for spec in specs]
        merged = {r["sha256"]: r for r in getattr(self.ckpt, "manifest", {}).get("loras", [])}
        for lora in self.loras:
            if lora.sha256 in merged:
                warnings.warn(f"{lora.path.name} is already merged into this engine (at strength "
                              f"{merged[lora.sha256]['strength']:g}); it is now added a second time", stacklevel=3)
        if self.ckpt.variant.dit.quant == "bf16":
            return merge_loras(state, self.loras)
        rest, side = side_factors(self.loras, self.variant.dit)
        v = self.variant
        self.variant = dataclasses.replace(v, dit=dataclasses.replace(v.dit, lora_rank=side_rank(side)))
        return merge_loras(state, rest) | side

    def _compiled_block(self):
        """An engine's compiled block for this device (none: the eager block runs), unless the DiT was configured
        otherwise since it was compiled (another attention mode or scheme)."""
        manifest = getattr(self.ckpt, "manifest", {})
        if manifest and self.variant.dit != variant_from_json(manifest["variant"]).dit:
            return None
        backends = manifest.get("backends", {})
        for kind in COMPILED_KINDS:
            entry = backends.get(kind)
            if entry is not None and entry["device"] == self.device.type:
                if not self.ckpt.trusted:
                    warnings.warn(f"{self.ckpt.root} was not exported on this machine: running its weights without "
                                  f"its compiled block ({kind}, native code). Pass --trust-engine (trust_engine=True) "
                                  "if you trust whoever built it.", stacklevel=3)
                    return None
                return CompiledBlock(self.ckpt.root, entry, kind, self.variant.dit)
        return None

    def _dit_dtype(self, name: str, t: torch.Tensor) -> torch.dtype:
        """A DiT block tensor's dtype in memory: quantized weights and their scales as stored (an engine's scheme),
        the official fp32 modulation, everything else the compute dtype."""
        if is_quantized(name, t):
            return t.dtype
        return torch.float32 if keeps_fp32(name) else self.dtype

    def plan(self, lat: tuple[int, int, int], steps: int, budget: int | None = None, branches: int = 2,
             cached: bool = False) -> Plan:
        """branches: 2 with classifier-free guidance, 1 at guidance scale 1 (one DiT pass per step); cached: a step
        cache keeps each branch's residual."""
        budget = self.vram_budget if budget is None else budget
        return make_plan(self.variant, lat, steps, budget, self.dtype, self.vae_dtype, branches, cached)

    def check_fits(self, image=None, **request) -> None:
        """Plan this request (generate's keywords) as generate would, raising PlanError if it cannot fit the VRAM
        budget. Reads no weights (a LoRA side path's few MiB are left out until generate plans again)."""
        req, _, lat = self._request(image, **request)
        self.plan(lat, req.sample_steps, branches=self._guidance(req)[1], cached=self._caches(req))

    def latent_shape(self, size: str, frame_num: int, image=None) -> tuple[int, int, int]:
        """(frames, height, width) of the latents; I2V keeps the image's aspect ratio under size's area."""
        v = self.variant
        w, h = parse_size(size)
        st = v.vae.stride
        if image is None:
            return (frame_num - 1) // st[0] + 1, h // st[1], w // st[2]
        return ((frame_num - 1) // st[0] + 1, *i2v_latent_size(image.shape[1:], w * h, st, v.dit.patch_size))

    def _request(self, image=None, **request) -> tuple[Request, torch.Tensor | None, tuple[int, int, int]]:
        """A validated request (check_request's keywords) with the variant's defaults, the image tensor or None, and
        the latent shape."""
        req = check_request(self.variant, image=image, **request)
        w, h = parse_size(req.size)
        img = load_image(image, w * h) if image is not None else None
        return req, img, self.latent_shape(req.size, req.frame_num, img)

    def describe_plan(self, size: str | None = None, frame_num: int | None = None, sample_steps: int | None = None,
                      image=None, **request) -> str:
        """The plan `generate` would follow for this request (generate's keywords), what runs, and where the blocks
        live in host memory."""
        v = self.variant
        req, _, lat = self._request(image, size=size, frame_num=frame_num, sample_steps=sample_steps, **request)
        size, frame_num, steps = req.size, req.frame_num, req.sample_steps
        _, branches = self._guidance(req)
        schedule = self._step_schedule(req, branches, self._solver(req).timesteps)
        stores = ", ".join(f"{name} {'pinned RAM' if isinstance(s, PinnedStore) else 'memory-mapped'}"
                           for name, s in (("DiT", self.dit_store), ("text", self.text_store),
                                           ("CLIP", self.clip_store)) if s is not None)
        return (f"{v.name} {size} x {frame_num} frames, {steps} steps x {branches} DiT pass{'es' * (branches > 1)}, "
                f"latents {lat}\n  runs: attention {v.dit.attention}, DiT blocks {v.dit.quant}"
                f"{f' with a LoRA side path of rank {v.dit.lora_rank}' if v.dit.lora_rank else ''}, text blocks "
                f"{v.text.quant}\n" + self.plan(lat, steps, branches=branches, cached=bool(schedule)).describe()
                + f"\n  host: {stores}" + (f"\n  {schedule.describe()}" if schedule else ""))

    def _solver(self, req: Request):
        """The request's sampler; the shift is the request's, else the official rule for Wan's variants, else the
        model's own (a model of ours carries its training shift)."""
        v = self.variant
        if req.sample_shift is not None:
            shift = req.sample_shift
        else:
            shift = default_shift(v.task, req.size) if v.name in VARIANTS else v.sample_shift
        return make_solver(req.sample_solver, req.sample_steps, shift, req.denoising_step_list)

    def _caches(self, req: Request) -> bool:
        """Whether a step cache runs for this request: one was set, and the run is not few-step or asked for it."""
        return parse_cache(self.cache)[0] != "none" and (self._cache_asked or not req.few_step)

    def _step_schedule(self, req: Request, branches: int, timesteps: torch.Tensor):
        """The step cache's schedule for this request (runtime/cache.py), or None; TeaCache's needs the time
        projections of the timesteps, from the DiT's host weights. A few-step run (a distilled step list, or
        FEW_STEPS steps or fewer) ignores an engine's recorded cache, and warns when the cache was asked for."""
        def time_projection():
            with torch.no_grad():
                return self.dit.embed_time(timesteps.float())[1]
        if not self._caches(req):
            return None
        schedule = step_schedule(self.cache, self.variant, req.size, req.sample_steps, branches, time_projection)
        if req.few_step:
            warnings.warn(f"{schedule.method} on a {req.sample_steps}-step run computes {schedule.computed} of "
                          f"{schedule.passes} DiT passes: its constants describe 40-50-step schedules, where steps "
                          f"change the latents little (--cache none turns it off)", stacklevel=2)
        return schedule

    def _guidance(self, req: Request) -> tuple[float, int]:
        """The guidance scale (the request's, else the model's) and the DiT passes per step it takes: 2 with
        classifier-free guidance, 1 at scale 1 (its result is the conditional prediction alone)."""
        guide = self.variant.sample_guide_scale if req.sample_guide_scale is None else req.sample_guide_scale
        return guide, 1 if guide == 1 else 2

    @torch.no_grad()
    def generate(self, prompt: str, image=None, size: str | None = None, frame_num: int | None = None,
                 sample_steps: int | None = None, sample_shift: float | None = None,
                 sample_guide_scale: float | None = None,
                 sample_solver: str | None = None, base_seed: int = -1, neg_prompt: str = "",
                 progress: bool = True, callback: Callable[[int, int], None] | None = None,
                 denoising_step_list=None, preset: str | None = None) -> Video:
        """One video. Arguments as the official generate.py's flags (sample_solver: unipc by default);
        `denoising_step_list` and `preset` ("distill4") as LightX2V's step-distilled models run; `callback(step,
        steps)` is called after each denoising step (e.g. for a progress bar of your own)."""
        v = self.variant
        req, img, lat = self._request(image, size=size, frame_num=frame_num, sample_steps=sample_steps,
                                      sample_shift=sample_shift, sample_guide_scale=sample_guide_scale,
                                      sample_solver=sample_solver, base_seed=base_seed, prompt=prompt,
                                      neg_prompt=neg_prompt, denoising_step_list=denoising_step_list, preset=preset)
        size, frame_num, steps = req.size, req.frame_num, req.sample_steps
        guide, branches = self._guidance(req)
        solver = self._solver(req)
        schedule = None if self._calibration is not None else self._step_schedule(req, branches, solver.timesteps)
        seed = base_seed if base_seed >= 0 else random.randint(0, 2**31 - 1)
        neg_prompt = neg_prompt or default_neg_prompt(v.task)
        prompts = [prompt, neg_prompt][:branches]  # guidance 1: no unconditional branch, no negative prompt
        cached = schedule is not None or self._calibration is not None  # residuals kept per branch
        plan = self.plan(lat, steps, branches=branches, cached=cached)  # before any GPU work: refuses if it cannot fit
        self.phase_stats = {}
        run = functools.partial(self._run_phase, plan, lat, steps, branches, cached, progress)

        contexts = run("text", self._encode_text, prompts)
        clip_fea = cond = None
        if img is not None:
            clip_fea = run("clip", self._encode_image, img)
            cond = run("encode", self._image_condition, img, frame_num, lat)
        # Noise from a CPU generator: the same seed gives the same video on any device.
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, v.vae.z_dim, *lat, generator=g).to(self.device)
        contexts, temb = run("embed", self._embed, contexts, clip_fea, solver.timesteps)
        del clip_fea
        self.step_schedule = schedule
        latents = run("denoise", self._denoise, latents, cond, contexts, temb, solver, guide, progress, callback,
                      schedule)
        if progress and schedule is not None:
            print(f"denoise: {schedule.summary()} ({schedule.method} {schedule.settings})", flush=True)
        del contexts, temb, cond
        if not torch.isfinite(latents).all():  # one sync per video: never decode and write garbage
            raise GenerationError("the denoised latents hold NaN or inf values; nothing was written (a model or "
                                  "quantization problem: try --scheme bf16 or another attention mode)")
        frames = run("decode", lambda phase, x: to_uint8_frames(self._decode(phase, x)[0]), latents)
        return Video(frames, FPS, seed)

    def calibrate_cache(self, prompt: str, **request) -> list[float]:
        """MagCache's ratios for this model, from one generation (generate's keywords) as the reference calibrates:
        per step after the first and per branch, the mean over tokens of ||r_t|| / ||r_(t-1)|| of the blocks'
        residual r, the branches interleaved (conditional first) after the reference's [1.0, 1.0]. At guidance 1
        the one branch's ratio stands for both."""
        self._calibration = []
        try:
            self.generate(prompt, **request)
            rows = self._calibration
        finally:
            self._calibration = None
        return [1.0, 1.0] + [round(r, 5) for row in rows for r in (row * 2 if len(row) == 1 else row)]

    # -- phases: each takes its PhasePlan first
    def _run_phase(self, plan: Plan, lat, steps, branches: int, cached: bool, progress: bool, name: str, fn, *args):
        """Run one phase under its plan. If the GPU still runs out of memory (another process took some), re-plan
        the phase once for what is free now, then fail with a clear message."""
        if progress and name in PHASE_LINES:  # the denoise phase has its own progress bar
            print(PHASE_LINES[name], flush=True)
        try:
            return self._measured(name, plan.phase(name), fn, *args)
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        smaller = min(plan.budget * 3 // 4, free)
        warnings.warn(f"out of GPU memory in the {name} phase; retrying it with a {smaller / 2**30:.2f} GiB plan",
                      stacklevel=3)
        try:
            phase = plan_phase(name, self.variant, lat, steps, smaller, self.dtype, self.vae_dtype, branches, cached)
            return self._measured(name, phase, fn, *args)
        except (torch.OutOfMemoryError, PlanError) as e:
            raise GenerationError(f"out of GPU memory in the {name} phase even after re-planning for "
                               f"{smaller / 2**30:.2f} GiB; another process may be using the GPU. Free it or pass a "
                               f"smaller --vram-budget.") from e

    def _measured(self, name: str, phase: PhasePlan, fn, *args):
        """fn(phase, *args), recording the phase's planned and measured peaks and its time in `phase_stats`. Cached
        blocks of the previous phase are released first: each phase's shapes differ, so they would only fragment."""
        if self.device.type != "cuda":
            return fn(phase, *args)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn(phase, *args)
        torch.cuda.synchronize(self.device)
        self.phase_stats[name] = {
            "predicted_peak": phase.peak_bytes, "max_allocated": torch.cuda.max_memory_allocated(self.device),
            "max_reserved": torch.cuda.max_memory_reserved(self.device), "seconds": time.perf_counter() - start,
            "plan": phase.describe()}
        return out

    @contextmanager
    def _streamer(self, store, phase: PhasePlan):
        b = phase.blocks
        streamer = make_streamer(store, self.device, b.resident, b.slots, self.block_copy)
        try:
            yield streamer
        finally:
            streamer.close()

    def _encode_text(self, phase: PhasePlan, prompts: list[str]) -> list[torch.Tensor]:
        groups = [prompts] if phase.chunk is None else [[p] for p in prompts]  # together, or one at a time
        with self._streamer(self.text_store, phase) as streamer, on_device([self.text_encoder.norm], self.device):
            out = [o for g in groups for o in encode_text(self.text_encoder, self.tokenizer, g, self.device,
                                                           weights=streamer)]
        return [pad_context([o.to(self.dtype)], self.variant.dit.text_len) for o in out]

    def _encode_image(self, phase: PhasePlan, img: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(img[None].to(self.device), self.variant.clip.image_size).to(self.dtype)
        # the embeddings and pre-norm go to the device; the blocks stream
        with self._streamer(self.clip_store, phase) as streamer, on_device([self.clip], self.device):
            return self.clip(pixels, weights=streamer)

    def _image_condition(self, phase: PhasePlan, img: torch.Tensor, frame_num: int, lat):
        """[1, 4 + z_dim, lat_f, lat_h, lat_w]: the first-frame mask and the VAE latents of (image, zeros...)."""
        st = self.variant.vae.stride
        h, w = lat[1] * st[1], lat[2] * st[2]
        first = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bicubic")[0]
        clip = torch.cat([first[:, None], first.new_zeros(3, frame_num - 1, h, w)], dim=1)
        tile = (phase.tile[0] * st[1], phase.tile[1] * st[2]) if phase.tile else None  # encode tiles in pixels
        with on_device([self.vae.encoder, self.vae.conv1], self.device, self.vae_dtype):
            y = self.vae.encode(clip[None].to(self.device), tile=tile, compute_dtype=self.vae_dtype)
        mask = torch.zeros(1, 4, *lat, device=self.device)
        mask[:, :, 0] = 1  # the first latent frame stands for 4 given frames (the official repeat of frame 0)
        return torch.cat([mask, y.to(mask.dtype)], dim=1)

    def _embed(self, phase: PhasePlan, contexts: list[torch.Tensor], clip_fea, timesteps):
        """The branches' embedded contexts (conditional first) and the whole schedule's time embeddings."""
        dit = self.dit
        parts = [dit.text_embedding, dit.time_embedding, dit.time_projection, getattr(dit, "img_emb", None)]
        with on_device(parts, self.device):
            contexts = [dit.embed_context(c, clip_fea) for c in contexts]
            temb = dit.embed_time(timesteps.to(self.device))
        return contexts, temb

    def _denoise(self, phase: PhasePlan, latents, cond, contexts, temb, solver, guide_scale, progress,
                 callback=None, schedule=None):
        """The sampling loop. With guidance, where blocks stream, the conditional and the unconditional branch run
        each block in turn while it is on the GPU (half the host-to-device traffic of one pass per branch); with
        every block resident they run one after the other (no second residual stream). At guidance 1 there is one
        branch. The plan decides (`phase.shared`). A step cache's schedule says per step and branch whether the
        blocks run or the branch's cached residual is added (runtime/cache.py)."""
        e, e0 = temb
        solver.reset()  # a re-planned retry starts the schedule again
        if self._calibration is not None:
            self._calibration.clear()
        cached = schedule is not None or self._calibration is not None
        residuals = [Residual(phase.host_residuals) for _ in contexts] if cached else None

        def velocities(x, t, runs):
            if phase.shared is not False:
                return self.dit.denoise(x, t, contexts, streamer, phase.chunk, runs, residuals)
            out = []
            for b, c in enumerate(contexts):  # one branch after the other, each with its own cached residual
                out += self.dit.denoise(x, t, [c], streamer, phase.chunk, runs and runs[b : b + 1],
                                        residuals and residuals[b : b + 1])
            return out

        with self._streamer(self.dit_store, phase) as streamer, \
                on_device([self.dit.patch_embedding, self.dit.head], self.device):
            previous = None
            for i in tqdm(range(solver.steps), desc="denoise", unit="step", disable=not progress):
                t = (e[i : i + 1], e0[i : i + 1])
                x = latents if cond is None else torch.cat([latents, cond], dim=1)
                v = velocities(x, t, schedule.runs[i] if schedule is not None else None)
                if self._calibration is not None:  # MagCache's statistic, per branch, from the second step on
                    if previous is not None:
                        self._calibration.append([magnitude_ratio(r.tensor, p) for r, p in zip(residuals, previous)])
                    previous = [r.tensor.clone() for r in residuals]
                latents = solver.step(v[0] if len(v) == 1 else cfg(v[0], v[1], guide_scale), i, latents)
                if callback is not None:
                    callback(i + 1, solver.steps)
        return latents

    def _decode(self, phase: PhasePlan, latents: torch.Tensor) -> torch.Tensor:
        """The video in the VAE dtype: tiled, each tile's frames are blended straight into a host buffer (the planner
        then keeps no video on the GPU); untiled, left on the GPU."""
        out = None
        if phase.tile is not None:
            out = torch.empty(self.vae.decoded_shape(latents.shape), dtype=self.vae_dtype)
        with on_device([self.vae.decoder, self.vae.conv2], self.device, self.vae_dtype):
            return self.vae.decode(latents, tile=phase.tile, out=out)


def _store(blocks: list[dict], dtype_of, ram: int):
    """A host store for the blocks, in RAM if they fit in `ram` bytes; returns it and the RAM left. The blocks match
    their config: open_checkpoint and open_engine checked them (checkpoint.check_weights)."""
    need = sum(t.numel() * dtype_of(k, t).itemsize for b in blocks for k, t in b.items())
    in_ram = need <= ram
    return make_store(blocks, dtype_of, in_ram), ram - need if in_ram else ram


def default_vram_budget(device: torch.device) -> int:
    """Free memory minus a margin for the CUDA context's growth and other processes; unlimited on the CPU."""
    if device.type != "cuda":
        return UNLIMITED
    free, _ = torch.cuda.mem_get_info(device)
    return max(free - 512 * 2**20, 0)


def i2v_latent_size(hw: tuple[int, int], max_area: int, stride, patch) -> tuple[int, int]:
    """Latent (h, w) keeping the image's aspect ratio under max_area pixels, floored to the patch grid (official)."""
    aspect = hw[0] / hw[1]
    lat_h = round(math.sqrt(max_area * aspect) // stride[1] // patch[1] * patch[1])
    lat_w = round(math.sqrt(max_area / aspect) // stride[2] // patch[2] * patch[2])
    return lat_h, lat_w


def load(path: str | Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         vae_dtype: torch.dtype | None = None, trust_engine: bool = False, **options) -> WanPipeline:
    """`wanrt.load(dir)`: open an official or diffusers Wan2.1 checkpoint, or an engine (None: the embedded demo
    model), and build its pipeline. `options` are RunOptions' (attention, scheme, text_scheme, vram_budget,
    ram_budget: the flags of `wanrt generate`). An engine's compiled block runs only if this machine exported it, or
    with trust_engine."""
    options = RunOptions(**options)  # before reading any weights
    device = resolve_device(device)
    return WanPipeline(open_source(DEMO_MODEL if path is None else path, trust_engine), device, dtype, options,
                       vae_dtype)


def open_source(path: str | Path, trust_engine: bool = False):
    """An engine directory (verified first: hashes, format, GPU capability) or a checkpoint directory."""
    return open_engine(path, trust_engine=trust_engine) if is_engine(path) else open_checkpoint(path)


def resolve_options(src, options: RunOptions, device: torch.device):
    """The variant to run: the source's, with the attention mode and weight schemes the options ask for, or an
    engine's recorded ones, or the defaults; checked against this device once, before any weight is read."""
    recorded = getattr(src, "manifest", {}).get("options", {})
    v = src.variant
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    attention = options.attention or recorded.get("attention", "auto")
    if attention == "auto":  # the fastest mode measured to keep quality here; SDPA where none was measured
        attention = AUTO_ATTENTION.get(cap, "sdpa") if has_triton() else "sdpa"
    check_mode(attention, cap)  # an explicit mode this GPU cannot run: one clear line
    scheme, text_scheme = options.scheme or v.dit.quant, options.text_scheme or v.text.quant
    for what, stored, want in (("DiT", v.dit.quant, scheme), ("text", v.text.quant, text_scheme)):
        if stored != "bf16" and not same_storage(stored, want):
            raise ValueError(f"this engine stores {stored} {what} blocks, so it cannot run them as {want}: export "
                             f"the checkpoint again with that scheme, or open the checkpoint itself")
    scheme = resolve_scheme(scheme, device)  # a scheme this GPU cannot run falls back, with a warning saying so
    return dataclasses.replace(v, dit=dataclasses.replace(v.dit, quant=scheme, attention=attention),
                               text=dataclasses.replace(v.text, quant=text_scheme))


def requantized(blocks: list[dict], stored: str, scheme: str, quantize, device: torch.device) -> list[dict]:
    """Blocks stored in one scheme, as `scheme` needs them in host memory: quantized from bf16, or (an engine on a GPU
    that cannot run its scheme) dequantized and quantized for the fallback. One block at a time goes through the
    device, whose kernels quantize many times faster than the CPU's reference."""
    if same_storage(stored, scheme):
        return blocks
    out = []
    for block in blocks:
        block = {k: t.to(device) for k, t in block.items()}
        block = quantize(block if stored == "bf16" else dequantize_block(block), scheme)
        out.append({k: t.cpu() for k, t in block.items()})
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: cuda when available), refused clearly if it cannot be used here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is available to PyTorch here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device
