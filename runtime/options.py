"""What a user asks for, checked before any model work, with the allowed values, defaults and bounds in one place.

`RunOptions` (how a model runs: attention kernel, weight schemes, memory budgets) carries the same names on `wanrt
generate`, `wanrt export`, `wanrt bench` and `wanrt.load(...)`, and engines record it. `check_request` validates one
generation; the CLI calls it before it loads a model, `WanPipeline.generate` for Python callers. Nothing here imports
torch, so `wanrt --help` and argument errors come back at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

SOLVERS = ("unipc", "euler")
ATTENTION_MODES = ("auto", "sdpa", "fp8", "int8", "int8_fp8pv")  # kernels/attention.py has the kernels
SCHEMES = ("bf16", "fp8", "int8", "w8a16", "nf4")  # DiT block linears: quant/formats.py
TEXT_SCHEMES = ("bf16", "int8", "fp8")  # umT5 block linears, weight-only
# What `attention="auto"` runs per GPU compute capability: the fastest mode whose accuracy was measured acceptable on
# it. On the H100 (sm_90) int8 Q·K with fp8 P·V ran 1.59x cuDNN SDPA at cosine 0.99924 on random inputs, moved the
# 4-step latents of a 1.3B forward by 0.009 against 0.008 for bf16 PyTorch ops (bench/results/attention_h100.md,
# dit_h100.md), and kept the demo model's semantic check (bench/results/options_h100.md). Other GPUs were never
# measured: SDPA there, as on the CPU.
AUTO_ATTENTION = {(9, 0): "int8_fp8pv"}
# Sampling presets: what a step-distilled model (LightX2V's 4-step LoRAs and models, configs/distill/wan21/*_4step_cfg
# .json) runs with. Flags given explicitly win over a preset's.
PRESETS = {"distill4": dict(sample_steps=4, sample_shift=5.0, sample_solver="euler", sample_guide_scale=1.0,
                            denoising_step_list=(1000, 750, 500, 250))}
# Bounds on what is reasonable to ask: past them a request would run for hours or allocate without limit.
MAX_FRAMES = 1001  # Wan2.1 is trained on 81
MAX_SIDE = 4096  # pixels, for checkpoints without a list of sizes
MAX_STEPS = 1000
MAX_GUIDE = 100.0
MAX_SHIFT = 100.0
MAX_SEED = 2**63 - 1
MAX_IMAGE_SIDE = 16384
MAX_PROMPT_CHARS = 100_000


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """'4GiB', '1.5G', '512MiB', '6GB' -> bytes (G and GiB are binary; GB is decimal)."""
    number = str(text).strip().rstrip("BbIiKkMmGg")
    unit = str(text).strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not 0 <= value < 2**62:  # also rejects inf and nan
        raise ValueError(f"expected a size like 4GiB or 512MiB, got {text!r}")
    return int(value)


def parse_lora(spec: str) -> tuple[Path, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, strength)."""
    path, _, strength = str(spec).rpartition(":") if re.search(r":-?[\d.]+$", str(spec)) else (str(spec), "", "1")
    try:
        value = float(strength)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > 100:
        raise ValueError(f"a LoRA's strength must be a finite number (file.safetensors:0.8), got {spec!r}")
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA files are read as safetensors only (file.safetensors[:strength]), got {spec!r}")
    if not Path(path).is_file():
        raise ValueError(f"LoRA file not found: {path}")
    return Path(path), value


CACHE_METHODS = ("none", "magcache", "teacache")  # runtime/cache.py
MAX_CACHE_THRESH = {"magcache": 1.0, "teacache": 2.0}
# Step-distilled models run 4-8 steps, each changing the latents a lot: the references' constants, made for 40-50
# steps, would skip most of them. Such runs cache only when asked (runtime/pipeline.py).
FEW_STEPS = 10


def parse_cache(spec: str | None) -> tuple[str, float | None, int | None]:
    """'none', 'magcache[:THRESH[:K]]' or 'teacache[:THRESH]' -> (method, threshold or None, K or None); None means
    none. Unset values take the model's defaults (runtime/cache.py)."""
    parts = str(spec or "none").split(":")
    method = check_choice("cache", parts[0], CACHE_METHODS)
    most = {"none": 1, "magcache": 3, "teacache": 2}[method]
    if len(parts) > most:
        raise ValueError(f"cache must be none, magcache[:THRESH[:K]] or teacache[:THRESH], got {spec!r}")
    thresh = k = None
    try:
        if len(parts) > 1:
            thresh = check_float(f"the {method} threshold", float(parts[1]), 0.0, MAX_CACHE_THRESH[method], True)
        if len(parts) > 2:
            k = check_int("magcache's K (most steps reused in a row)", int(parts[2]), 1, MAX_STEPS)
    except ValueError as e:
        raise ValueError(f"cache {spec!r}: {e}" if "must" in str(e) else
                         f"cache must be none, magcache[:THRESH[:K]] or teacache[:THRESH], got {spec!r}") from None
    return method, thresh, k


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """How a model runs. None means: what the engine recorded (`wanrt export` writes these too), else the default.

    attention    auto | sdpa | fp8 | int8 | int8_fp8pv; default auto (AUTO_ATTENTION: the fastest mode measured to
                 keep quality on this GPU, SDPA elsewhere). A quantized mode this GPU cannot run is refused.
    scheme       DiT block weights: bf16 | fp8 | int8 | w8a16 | nf4; default: as stored (bf16 for a checkpoint, whose
                 blocks are then quantized as they are loaded into host memory; an engine's own scheme).
    text_scheme  umT5 block weights, weight-only: bf16 | int8 | fp8; default: as stored.
    vram_budget, ram_budget   bytes or a size such as "4GiB"; default: free GPU memory minus 512 MiB, available
                 RAM minus 2 GiB.
    loras        LoRA files, "file.safetensors[:strength]", merged into the DiT's weights as they load, or run
                 beside an engine's quantized linears as a low-rank side path (runtime/lora.py).
    cache        step caching: none | magcache[:THRESH[:K]] | teacache[:THRESH]; default none (runtime/cache.py).
    """
    attention: str | None = None
    scheme: str | None = None
    text_scheme: str | None = None
    vram_budget: int | str | None = None
    ram_budget: int | str | None = None
    loras: tuple[str, ...] = ()
    cache: str | None = None

    def __post_init__(self):
        parse_cache(self.cache)  # an unknown method or a threshold out of range: one line
        if isinstance(self.loras, str):
            raise ValueError("loras must be a list of 'file.safetensors[:strength]', not one string")
        object.__setattr__(self, "loras", tuple(str(spec) for spec in self.loras))
        for spec in self.loras:
            parse_lora(spec)  # a missing file or a bad strength: one line before any model work
        for name, choices in (("attention", ATTENTION_MODES), ("scheme", SCHEMES), ("text_scheme", TEXT_SCHEMES)):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), choices)
        for name in ("vram_budget", "ram_budget"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse_bytes(value))
            elif value is not None:
                check_int(name, value, 0, 2**62)


@dataclass(frozen=True)
class Request:
    """A validated generation request; None for shift and guidance means the model's default."""
    size: str
    frame_num: int
    sample_steps: int
    sample_shift: float | None
    sample_guide_scale: float | None
    sample_solver: str
    base_seed: int
    denoising_step_list: tuple[int, ...] | None = None

    @property
    def few_step(self) -> bool:
        """A distilled step list, or FEW_STEPS steps or fewer: step caches' constants do not describe such runs."""
        return self.denoising_step_list is not None or self.sample_steps <= FEW_STEPS


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' (the official --size format) -> (W, H)."""
    try:
        w, h = (int(s) for s in str(size).split("*"))
    except ValueError:
        raise ValueError(f"size must look like 832*480 (width*height), got {size!r}") from None
    return w, h


def check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def check_float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] ((lo, hi] with lo_open): nan, inf and huge values would make a black video."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def check_request(variant, size: str | None = None, frame_num: int | None = None, sample_steps: int | None = None,
                  sample_shift: float | None = None, sample_guide_scale: float | None = None,
                  sample_solver: str | None = None, base_seed: int = -1, image=None, prompt: str = "",
                  neg_prompt: str = "", denoising_step_list=None, preset: str | None = None) -> Request:
    """Validate a request against the model's variant (its task, sizes and defaults); returns it with the defaults
    filled in: a preset's first, then the variant's. `image` (a path) is only checked for presence here;
    `check_image` reads its header."""
    if preset is not None:
        given = dict(sample_steps=sample_steps, sample_shift=sample_shift, sample_guide_scale=sample_guide_scale,
                     sample_solver=sample_solver, denoising_step_list=denoising_step_list)
        chosen = {k: v for k, v in PRESETS[check_choice("preset", preset, tuple(PRESETS))].items() if given[k] is None}
        sample_steps, sample_shift, sample_guide_scale, sample_solver, denoising_step_list = (
            chosen.get(k, v) for k, v in given.items())
    sample_solver = sample_solver or "unipc"
    if denoising_step_list is not None:
        denoising_step_list = parse_step_list(denoising_step_list)
        if sample_steps not in (None, len(denoising_step_list)):
            raise ValueError(f"sample_steps {sample_steps} disagrees with the {len(denoising_step_list)} timesteps of "
                             "denoising_step_list")
        sample_steps = len(denoising_step_list)
    size = size or (variant.sizes[0] if variant.sizes else None)
    if size is None:
        raise ValueError("pass size (width*height): this checkpoint has no named variant with default sizes")
    w, h = parse_size(size)
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValueError(f"width and height must be positive multiples of 16 (VAE 8x times patch 2x), got {size}")
    if variant.sizes and size not in variant.sizes:
        raise ValueError(f"size {size} is not supported by {variant.name}; choose one of {', '.join(variant.sizes)}")
    if max(w, h) > MAX_SIDE:
        raise ValueError(f"size {size} is larger than {MAX_SIDE} pixels on a side")
    frame_num = variant.frame_num if frame_num is None else frame_num
    check_int("frame_num", frame_num, 1, MAX_FRAMES)
    if (frame_num - 1) % 4:
        raise ValueError(f"frame_num must be 4n+1 (1, 5, ..., 81), got {frame_num}")
    steps = check_int("sample_steps", variant.sample_steps if sample_steps is None else sample_steps, 1, MAX_STEPS)
    if sample_shift is not None:
        check_float("sample_shift", sample_shift, 0.0, MAX_SHIFT, lo_open=True)
    if sample_guide_scale is not None:
        check_float("sample_guide_scale", sample_guide_scale, 0.0, MAX_GUIDE)
    if sample_solver not in SOLVERS:
        raise ValueError(f"sample_solver must be one of {SOLVERS}, got {sample_solver!r} (the official 'dpm++' is not "
                         "implemented)")
    check_int("base_seed", base_seed, -1, MAX_SEED)
    for name, text in (("prompt", prompt), ("neg_prompt", neg_prompt)):
        if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name} must be a string of at most {MAX_PROMPT_CHARS} characters")
    if variant.task == "i2v" and image is None:
        raise ValueError("this is an image-to-video model: pass --image")
    if variant.task == "t2v" and image is not None:
        raise ValueError("this is a text-to-video model: --image is only for i2v checkpoints")
    if denoising_step_list is not None and sample_solver != "euler":
        raise ValueError("denoising_step_list runs with sample_solver euler (a step-distilled model's sampler)")
    return Request(size, frame_num, steps, sample_shift, sample_guide_scale, sample_solver, base_seed,
                   denoising_step_list)


def parse_step_list(steps) -> tuple[int, ...]:
    """'1000,750,500,250' or a sequence -> decreasing whole timesteps in 1..1000."""
    try:
        out = tuple(int(t) for t in (steps.split(",") if isinstance(steps, str) else steps))
    except (TypeError, ValueError):
        raise ValueError(f"denoising_step_list must look like 1000,750,500,250, got {steps!r}") from None
    if not out or any(not 1 <= t <= 1000 for t in out) or list(out) != sorted(set(out), reverse=True):
        raise ValueError(f"denoising_step_list must be decreasing timesteps in 1..1000, got {list(out)}")
    return out


def check_image(image) -> None:
    """An image path PIL can read, of sane dimensions, checked from its header alone (PIL images pass as they are)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        size = image.size
    else:
        if not Path(image).is_file():
            raise ValueError(f"cannot read image {image}: no such file")
        try:
            with Image.open(image) as f:
                size = f.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    if max(size) > MAX_IMAGE_SIDE or min(size) < 1:
        raise ValueError(f"image {getattr(image, 'filename', image) or 'given'} is {size[0]}x{size[1]}: sides must be "
                         f"1..{MAX_IMAGE_SIDE} pixels")
