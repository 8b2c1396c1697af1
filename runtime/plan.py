"""The memory planner: from shapes and a VRAM budget alone, before any GPU work, decide per phase what stays on the
GPU, how many blocks stream through how many slots, how many tokens are processed at once and how large the VAE tiles
are; or refuse, naming the smallest budget that would fit.

Peak of a phase = weights on the GPU (resident parts + resident blocks + ring slots) + the largest set of live
activations + a fixed workspace margin (cuBLAS / cuDNN workspaces). Activations are not modelled by hand: the phase's
own code runs once on the meta device under a dispatch mode that adds up every tensor it creates and frees
(`trace_peak`), so the estimate follows the code as it changes. A plan must leave the allocator some slack (`usable`).

Preference order (DESIGN.md lists resident blocks first; measurements put overlap and chunk size first, because the
ring hides the copies and small chunks cost time): every block resident; a ring of at least two slots; larger token
chunks; more resident blocks; a deeper ring. The encoders, which read each block once, prefer a ring of two slots.
VAE tiles: the least recomputed overlap, then the larger tile.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from ..quant.formats import quantize_block, quantize_text_block
from .clip import CLIPVision
from .cache import HOST_CHUNK
from .config import Variant
from .dit import WanDiT, rope_tables
from .stream import BlockLayout
from .text import UMT5Encoder
from .vae import CausalCache, WanVAE, tile_overlap, tile_spans

GiB = 2**30
MiB = 2**20
UNLIMITED = 2**62  # the budget of a device without a memory limit to plan for (the CPU)
WORKSPACE = 48 * MiB  # cuBLAS workspaces (one per stream) + cuDNN/SDPA scratch + allocator rounding


def usable(budget: int) -> int:
    """The part of a budget a plan may fill: the caching allocator holds freed blocks it cannot reuse for the next
    request's size (measured 70-140 MiB at 1 GiB on an H100 with expandable segments), so keep 1/16 + 32 MiB free."""
    return budget - budget // 16 - 32 * MiB


# The VAE's causal caches outlive each frame's transients, and the caching allocator cannot always fit the next
# frame's tensors into the holes they leave: in whole generations on an H100 a decode's max reserved memory was
# 1.21-1.25x its max allocated (the DiT's: 1.01-1.02x). Its phases are priced at what the allocator will reserve.
VAE_ALLOCATOR_OVERHEAD = 1.2
CHUNKS = (None, 16384, 8192, 4096, 2048)  # tokens per chunk, largest first (None: all at once)
ONE_PASS = ("text", "clip")  # phases that read each block once per generation
SLOTS = (4, 3, 2, 1)  # ring depth, deepest first


class PlanError(ValueError):
    """The budget cannot hold even the smallest plan; the message names the budget that would (`needed`)."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


class _PeakTracker(TorchDispatchMode):
    """Adds up the bytes of every storage created inside the mode and subtracts them when freed; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._outside: set[int] = set()  # storages made before the trace (weights, inputs): views of them cost nothing

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._sizes and key not in self._outside:
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def _note_input(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._sizes and key not in self._outside:
            self._outside.add(key)
            weakref.finalize(storage, self._outside.discard, key)  # its address may be reused by a new storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tree_map_only(torch.Tensor, self._note_input, (args, kwargs))
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


class _FusedKernels(TorchFunctionMode):
    """On the meta device some ops decompose into steps with temporaries the GPU's fused kernels never make: SDPA
    would materialise [L, L] scores (the GPU keeps its output and a per-row log-sum-exp), RMSNorm an fp32 copy of its
    input. Model the GPU kernels: their outputs only, plus the convolutions' workspace."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            # An arbitrary additive mask (umT5's position bias) rules out the flash kernels and the math fallback
            # runs, which upcasts half-precision inputs to fp32 (allow_fp16_bf16_reduction_math_sdp is off by
            # default): fp32 copies of q, k, v and the mask, then the scores and the masked scores (seen on an
            # H100: bmm, add and softmax in fp32). Counting two score matrices in the input dtype left the text
            # phase 70 MiB short of its measured peak, enough to run out of memory under a 1 GiB cap.
            mask = (kwargs or {}).get("attn_mask")
            up = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            scores = [t.new_empty(t.shape, dtype=up) for t in (q, k, v, mask)] if mask is not None else []
            scores += [q.new_empty(*q.shape[:-1], k.shape[-2], dtype=up) for _ in range(2 if mask is not None else 0)]
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            del lse, scores
            return out
        if func is F.rms_norm:
            return torch.empty_like(args[0])
        if func in (F.conv2d, F.conv3d):
            # cuDNN's workspace, taken from the caching allocator while input and output are live: up to about
            # one input's size for the VAE's 3x3x3 convs (a tiled decode planned without it ran out of memory at
            # 1 GiB on an H100, 50 MiB short).
            out = func(*args, **(kwargs or {}))
            workspace = torch.empty_like(args[0])
            del workspace
            return out
        return func(*args, **(kwargs or {}))


def trace_peak(fn, *args, **kwargs) -> int:
    """Peak bytes of the tensors `fn` allocates while it runs (inputs excluded). Call it with meta tensors."""
    with torch.no_grad(), _PeakTracker() as tracker, _FusedKernels():
        out = fn(*args, **kwargs)
        del out
    return tracker.peak


def meta_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


# ----------------------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class StreamPlan:
    """Blocks of one model: `resident` stay on the GPU, the rest rotate through `slots` buffers."""
    num_blocks: int
    block_bytes: int
    resident: int
    slots: int

    @property
    def streamed(self) -> bool:
        return self.resident < self.num_blocks

    @property
    def weight_bytes(self) -> int:
        return (self.resident + (self.slots if self.streamed else 0)) * self.block_bytes


@dataclass(frozen=True)
class PhasePlan:
    name: str
    fixed_bytes: int  # resident non-block weights and the phase's persistent inputs/outputs
    activation_bytes: int
    blocks: StreamPlan | None = None
    chunk: int | None = None
    tile: tuple[int, int] | None = None
    shared: bool | None = None  # denoise with guidance: both branches run each block while it is on the GPU
    host_residuals: bool = False  # denoise with a step cache: the cached residuals wait in pinned host RAM

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.activation_bytes + (self.blocks.weight_bytes if self.blocks else 0) + WORKSPACE

    def describe(self) -> str:
        parts = [f"{self.name:8s} peak {fmt(self.peak_bytes)}"]
        if self.blocks:
            b = self.blocks
            parts.append("all blocks resident" if not b.streamed else
                         f"{b.resident}/{b.num_blocks} blocks resident, {b.num_blocks - b.resident} streamed "
                         f"through {b.slots} slots of {b.block_bytes / MiB:.0f} MiB")
        if self.name == "denoise":
            parts.append(f"tokens per chunk {self.chunk or 'all'}")
            if self.shared is not None:
                parts.append("CFG branches share each block" if self.shared else "one pass per CFG branch")
            if self.host_residuals:
                parts.append("cached residuals in pinned host RAM")
        if self.name == "text":
            parts.append("prompts encoded together" if self.chunk is None else "one prompt at a time")
        if self.name in ("decode", "encode"):
            parts.append(f"tile {self.tile[0]}x{self.tile[1]} latents" if self.tile else "untiled")
        parts.append(f"activations {fmt(self.activation_bytes)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    budget: int
    phases: tuple[PhasePlan, ...]

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.name == name)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def describe(self) -> str:
        budget = "no VRAM budget (CPU)" if self.budget >= UNLIMITED else f"VRAM budget {fmt(self.budget)}"
        lines = [f"{budget}, planned peak {fmt(self.peak_bytes)}"]
        return "\n".join(lines + ["  " + p.describe() for p in self.phases])


def choose(candidates, budget: int, price=lambda plan: plan) -> PhasePlan:
    """The first candidate (they come in preference order) that fits, each priced by `price` only when reached; else
    PlanError naming the minimum."""
    candidates = list(candidates)
    for candidate in candidates:
        plan = price(candidate)
        if plan.peak_bytes <= usable(budget):
            return plan
    smallest = min(map(price, candidates), key=lambda p: p.peak_bytes)
    raise PlanError(f"[{smallest.describe()}]", needed=budget_for(smallest.peak_bytes))


class LazyPeaks(Mapping):
    """Activation peaks by key, each traced (`trace(key)`) when first read: the planner reads them in preference
    order and stops at the first plan that fits, so a roomy budget traces one candidate."""

    def __init__(self, keys, trace):
        self._keys, self._trace, self._peaks = tuple(keys), trace, {}

    def __getitem__(self, key) -> int:
        if key not in self._peaks:
            self._peaks[key] = self._trace(key)
        return self._peaks[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def budget_for(peak: int) -> int:
    """The smallest budget whose usable part holds `peak` (the inverse of `usable`)."""
    budget = -(-(peak + 32 * MiB) * 16 // 15)
    while usable(budget) < peak:  # integer rounding of budget // 16
        budget += 1
    return budget


def stream_options(num_blocks: int, block_bytes: int) -> list[StreamPlan]:
    return [StreamPlan(num_blocks, block_bytes, num_blocks, 0)] + [
        StreamPlan(num_blocks, block_bytes, r, s) for r in range(num_blocks) for s in SLOTS if s <= num_blocks - r]


def best_phase(name: str, budget: int, fixed: int, blocks: list[StreamPlan] | None, activations: Mapping,
               host_fixed: int | None = None) -> PhasePlan:
    """Pick the blocks' placement and the token chunk (keys of `activations`: a chunk, None = all tokens at once,
    or for the guided denoise phase (chunk, shared)); with `host_fixed` (a step cache), also whether the cached
    residuals wait in host RAM, the phase then holding `host_fixed` instead of `fixed`. Activations are read only
    for the candidates reached (`LazyPeaks`).

    Preference: copies that overlap compute (every block resident, or a ring of at least two slots: one slot
    serialises them); then the cached residuals on the GPU (host RAM moves them each step); then every block
    resident (then the branches run one after the other: no second residual stream); then CFG branches sharing
    each streamed block (half the copies); then larger chunks (fewer, larger kernels); then more resident blocks
    (less PCIe traffic, which the ring already hides); then a deeper ring (it only helps links slower than the
    compute).

    The encoders (ONE_PASS) read each block once per generation: keeping blocks resident saves no copy there, it
    only copies them all before the first computes. So they prefer the prompts together (one pass), then the fewest
    block bytes on the GPU that still overlap copies with compute: a ring of two slots."""

    def key(c: PhasePlan):
        b = c.blocks
        streamed = bool(b and b.streamed)
        unwanted_sharing = bool(c.shared) != streamed  # shared only pays when blocks stream
        return (streamed and b.slots < 2, c.host_residuals, streamed, unwanted_sharing, -(c.chunk or float("inf")),
                -(b.resident if b else 0), -(b.slots if b else 0))

    def one_pass_key(c: PhasePlan):
        return c.blocks.streamed and c.blocks.slots < 2, c.chunk is not None, c.blocks.weight_bytes

    keys = {(k if isinstance(k, tuple) else (k, None)): k for k in activations}
    held = {False: fixed} if host_fixed is None else {False: fixed, True: host_fixed}
    candidates = [PhasePlan(name, held[host], 0, b, chunk, shared=shared, host_residuals=host)
                  for b in (blocks or [None]) for chunk, shared in keys for host in held]
    return choose(sorted(candidates, key=one_pass_key if name in ONE_PASS else key), budget,
                  lambda c: dataclasses.replace(c, activation_bytes=activations[keys[c.chunk, c.shared]]))


# ------------------------------------------------------------------------------------------------ model phases
def _one_block_model(cls, cfg, dtype: torch.dtype):
    """A one-block copy of the model on the meta device: every block is alike, so one shows a block's peak."""
    with torch.device("meta"):
        model = cls(dataclasses.replace(cfg, num_layers=1))
    return model.to_inference_dtype(dtype) if hasattr(model, "to_inference_dtype") else model.to(dtype)


def _block_bytes(block: dict[str, torch.Tensor]) -> int:
    """Bytes of one block as a store packs it, in the dtypes it is held in."""
    return BlockLayout.of_block(block, lambda k, v: v.dtype).nbytes


def denoise_phase(v: Variant, lat: tuple[int, int, int], steps: int, budget: int, dtype: torch.dtype,
                  branches: int = 2, cached: bool = False) -> PhasePlan:
    """The DiT over the schedule; with guidance, both branches (conditional, unconditional) run each block in turn
    while it is on the GPU, each with its own residual stream (traced). With a step cache, each branch keeps the
    blocks' last residual, a residual stream's size, for the whole phase."""
    cfg = v.dit
    acts, block_bytes, shell = _denoise_traces(v, lat, dtype, branches)
    ctx_len = cfg.text_len + (cfg.image_tokens if cfg.model_type == "i2v" else 0)
    tokens = lat[0] * lat[1] * lat[2] // (cfg.patch_size[1] * cfg.patch_size[2])
    latent = 4 * cfg.out_dim * lat[0] * lat[1] * lat[2]
    rope = 2 * tokens * cfg.head_dim // 2 * 4  # cos and sin, cached on the device for the grid
    # the contexts, the schedule's time embeddings, the fp32 latents in, ~10 latent-sized fp32 tensors of the sampler
    # and CFG
    fixed = (shell + branches * ctx_len * cfg.dim * dtype.itemsize + steps * 7 * cfg.dim * 4 + 10 * latent
             + 4 * cfg.in_dim * lat[0] * lat[1] * lat[2] + rope)
    # a step cache's residuals: a residual stream per branch on the GPU, or in host RAM two chunks of one in transit
    on_host = fixed + 2 * min(tokens, HOST_CHUNK) * cfg.dim * 4 if cached else None
    fixed += branches * tokens * cfg.dim * 4 if cached else 0
    return best_phase("denoise", budget, fixed, stream_options(cfg.num_layers, block_bytes), acts, on_host)


@functools.lru_cache(maxsize=16)
def _denoise_traces(v: Variant, lat: tuple[int, int, int], dtype: torch.dtype, branches: int):
    """The DiT's activation peaks per (token chunk, shared blocks), one block's bytes as stored and the resident
    non-block weights' bytes: traced at most once per shape, whatever the budget and the step count."""
    cfg = v.dit
    model = _one_block_model(WanDiT, cfg, dtype)
    shell = meta_bytes([*model.patch_embedding.parameters(), *model.head.parameters()])
    ctx_len = cfg.text_len + (cfg.image_tokens if cfg.model_type == "i2v" else 0)
    x = torch.empty(1, cfg.in_dim, *lat, device="meta")
    ctx = torch.empty(1, ctx_len, cfg.dim, device="meta", dtype=dtype)
    time = (torch.empty(1, cfg.dim, device="meta"), torch.empty(1, 6, cfg.dim, device="meta"))
    tokens = lat[0] * lat[1] * lat[2] // (cfg.patch_size[1] * cfg.patch_size[2])
    grid = (lat[0] // cfg.patch_size[0], lat[1] // cfg.patch_size[1], lat[2] // cfg.patch_size[2])
    rope_tables(cfg.head_dim, grid, "meta")  # cached before tracing: priced in the phase's fixed bytes
    block = quantize_block(model.block_weights(0), cfg.quant)  # as an engine of that scheme stores it
    if cfg.lora_rank:  # a LoRA side path: a pair of factors of that rank beside every linear (the most it can be)
        linears = {k.removesuffix(".weight_scale"): t.shape[0] for k, t in block.items() if k.endswith("weight_scale")}
        for name, n in linears.items():
            k = model.blocks[0].get_submodule(name).in_features
            block[f"{name}.lora_down"] = torch.empty(cfg.lora_rank, k, device="meta", dtype=dtype)
            block[f"{name}.lora_up"] = torch.empty(n, cfg.lora_rank, device="meta", dtype=dtype)
    keys = [(c, shared) for c in CHUNKS if c is None or c < tokens
            for shared in ((False, True) if branches > 1 else (None,))]
    acts = LazyPeaks(keys, lambda key: trace_peak(model.denoise, x, time, [ctx] * (branches if key[1] else 1),
                                                  lambda i: block, key[0]))
    return acts, _block_bytes(block), shell


def embed_phase(v: Variant, steps: int, budget: int, dtype: torch.dtype, branches: int = 2) -> PhasePlan:
    """Context and time embeddings, once per generation, with the DiT's non-block weights."""
    cfg = v.dit
    model = _one_block_model(WanDiT, cfg, dtype)
    weights = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    context = torch.empty(1, cfg.text_len, cfg.text_dim, device="meta", dtype=dtype)
    clip = torch.empty(1, cfg.image_tokens, cfg.image_dim, device="meta", dtype=dtype) if v.clip else None
    act = max(trace_peak(model.embed_context, context, clip),
              trace_peak(model.embed_time, torch.empty(steps, device="meta")))
    ctx_len = cfg.text_len + (cfg.image_tokens if v.clip else 0)
    # held through the phase: the text contexts in, the embedded contexts and the schedule's time embeddings out
    held = branches * meta_bytes([context]) + branches * ctx_len * cfg.dim * dtype.itemsize + steps * 7 * cfg.dim * 4
    return best_phase("embed", budget, meta_bytes(weights) + held, None, {None: act})


def text_phase(v: Variant, budget: int, dtype: torch.dtype, branches: int = 2) -> PhasePlan:
    """umT5: the token table stays in host RAM (only the prompt's rows are gathered); blocks stream, as stored
    (weight-only quantized blocks are dequantized one block at a time, traced). With guidance the prompt and the
    negative prompt go through together (chunk None) or, when that does not fit, one at a time (chunk 1: half the
    activations, twice the blocks streamed); without, the prompt alone."""
    cfg = v.text
    model = _one_block_model(UMT5Encoder, cfg, dtype)
    block = quantize_text_block(model.block_weights(0), cfg.quant)

    def trace(chunk):  # the prompts together, or one at a time
        ids = torch.empty(branches if chunk is None else 1, cfg.text_len, dtype=torch.long, device="meta")
        return trace_peak(model.forward, ids, torch.empty_like(ids), lambda i: block)

    acts = LazyPeaks((None, 1)[:branches], trace)
    return best_phase("text", budget, meta_bytes([model.norm.weight]), stream_options(cfg.num_layers,
                      _block_bytes(block)), acts)


def clip_phase(v: Variant, budget: int, dtype: torch.dtype) -> PhasePlan:
    cfg = v.clip
    with torch.device("meta"):
        model = CLIPVision(dataclasses.replace(cfg, num_layers=1, use_layers=1)).to(dtype)
    pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta", dtype=dtype)
    shell = [p for n, p in model.named_parameters() if not n.startswith("transformer.")]
    return best_phase("clip", budget, meta_bytes(shell), stream_options(cfg.use_layers,
                      _block_bytes(model.block_weights(0))),
                      {None: trace_peak(model.forward, pixels)})


def vae_phase(name: str, v: Variant, lat: tuple[int, int, int], budget: int,
              compute_dtype: torch.dtype = torch.float32) -> PhasePlan:
    """Tiled VAE decode (or encode, for I2V), weights and activations in `compute_dtype`. An untiled decode
    assembles the video on the GPU in that dtype (counted); a tiled one blends it into host RAM (the pipeline's
    `_decode`). Encode reads its fp32 input video from the GPU."""
    candidates, activations = _vae_candidates(name, v, lat, compute_dtype)
    return choose(candidates, budget, lambda c: dataclasses.replace(c, activation_bytes=activations[c.tile]))


@functools.lru_cache(maxsize=16)
def _vae_candidates(name: str, v: Variant, lat: tuple[int, int, int], compute_dtype: torch.dtype):
    """Every tiling of the VAE phase in preference order, and their activations (traced when first read, once per
    shape whatever the budget).

    Every tile runs the same code and the causal caches reach their steady size by the third latent frame, so two
    traced tiles of three latent frames give the activation bytes per latent pixel, which then price every tile
    size. Among the tiles that fit, the plan takes the one that recomputes the least overlap (the decode time
    follows the tiled area), then the larger."""
    with torch.device("meta"):
        vae = WanVAE(v.vae).to(compute_dtype)
    part = vae.decoder if name == "decode" else vae.encoder
    size = compute_dtype.itemsize
    fixed = meta_bytes([*part.parameters(), *(vae.conv2 if name == "decode" else vae.conv1).parameters()])
    st = v.vae.stride
    frames = (lat[0] - 1) * st[0] + 1
    video = 3 * frames * lat[1] * st[1] * lat[2] * st[2] * (size if name == "decode" else 4)
    if name == "encode":
        fixed += video

    def traced(th: int, tw: int) -> int:
        f = min(lat[0], 3)
        if name == "decode":
            z = torch.empty(1, v.vae.z_dim, f, th, tw, device="meta")
            out = torch.empty(1, 3, (f - 1) * st[0] + 1, th * st[1], tw * st[2], device="meta", dtype=compute_dtype)
            return trace_peak(vae.decode, z, out=out)
        video = torch.empty(1, 3, (f - 1) * st[0] + 1, th * st[1], tw * st[2], device="meta")
        return trace_peak(vae.encode, video, compute_dtype=compute_dtype)

    def whole_frame() -> int:
        """Several tiles: the frame-wide part (decode: conv1 and the middle block, `WanVAE._middle_of_clip`;
        encode: the middle block and the head, `_encode_high`) runs once on the whole frame, before or after them."""
        f = min(lat[0], 3)
        width = v.vae.z_dim if name == "decode" else v.vae.dim * v.vae.dim_mult[-1]
        x = torch.empty(1, width, f, lat[1], lat[2], device="meta", dtype=compute_dtype)

        def run(x: torch.Tensor) -> None:
            cache = CausalCache()
            for i in range(f):
                frame = x[:, :, i:i + 1]
                vae.decoder.low(vae.conv2(frame), cache) if name == "decode" else vae.encoder.high(frame, cache)
                cache.advance()
        return trace_peak(run, x)

    h, w = lat[1], lat[2]
    small = (min(8, h), min(8, w))
    traced, whole_frame = functools.cache(traced), functools.cache(whole_frame)

    def activation(tile) -> int:
        """Untiled: the whole frame, traced; a tile: priced per latent pixel between a small and the whole frame."""
        b = traced(h, w)
        if tile is None:
            return int(b * VAE_ALLOCATOR_OVERHEAD)
        a = traced(*small)
        per_px = max(b - a, 0) / max(h * w - small[0] * small[1], 1)
        per_tile = a + per_px * (tile[0] * tile[1] - small[0] * small[1])
        return int(max(per_tile, whole_frame()) * VAE_ALLOCATOR_OVERHEAD)

    fitted = (_fitted((th, tw), h, w) for th in range(16, h + 1, 2) for tw in range(16, w + 1, 2))
    tiles = [None, *dict.fromkeys(t for t in fitted if t != (h, w))]
    candidates = sorted((PhasePlan(name, fixed + (video if name == "decode" and t is None else 0), 0, None, None, t)
                         for t in tiles),
                        key=lambda c: (_coverage(c.tile, h, w), -(c.tile[0] * c.tile[1] if c.tile else h * w)))
    return tuple(candidates), LazyPeaks(tiles, activation)


def _fitted(tile: tuple[int, int], h: int, w: int) -> tuple[int, int]:
    """The largest spans of this tile's tiling of an h x w grid (`tile_spans` balances them, so they are often
    smaller than the tile): the tile that decodes the same way, priced by its real size. Falls back to `tile` in
    the rare case where the smaller tile would get a smaller overlap (`tile_overlap`) and so a different tiling."""
    overlap = tile_overlap(tile)
    fitted = tuple(max(b - a for a, b in tile_spans(n, t, overlap)) for n, t in zip((h, w), tile))
    return fitted if tile_overlap(fitted) == overlap else tile


def _coverage(tile, h: int, w: int) -> float:
    """Latent area decoded with this tiling over the frame's area (1.0 untiled; overlaps are decoded twice)."""
    if tile is None:
        return 1.0
    overlap = tile_overlap(tile)
    rows = sum(b - a for a, b in tile_spans(h, tile[0], overlap))
    cols = sum(b - a for a, b in tile_spans(w, tile[1], overlap))
    return rows * cols / (h * w)


def plan_phase(name: str, v: Variant, lat: tuple[int, int, int], steps: int, budget: int,
               dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.bfloat16,
               branches: int = 2, cached: bool = False) -> PhasePlan:
    """One phase's plan; lat = latent (frames, height, width); dtype of the transformers, vae_dtype of the VAE's
    convolutions; branches: 2 with classifier-free guidance, 1 without (guidance scale 1); cached: a step cache
    keeps residuals (runtime/cache.py)."""
    if name == "text":
        return text_phase(v, budget, dtype, branches)
    if name == "clip":
        return clip_phase(v, budget, dtype)
    if name == "embed":
        return embed_phase(v, steps, budget, dtype, branches)
    if name == "denoise":
        return denoise_phase(v, lat, steps, budget, dtype, branches, cached)
    return vae_phase(name, v, lat, budget, vae_dtype)


@functools.lru_cache(maxsize=16)
def make_plan(v: Variant, lat: tuple[int, int, int], steps: int, budget: int, dtype: torch.dtype = torch.bfloat16,
              vae_dtype: torch.dtype = torch.bfloat16, branches: int = 2, cached: bool = False) -> Plan:
    """Plan every phase of one generation with latents of (frames, height, width) under `budget` bytes of VRAM,
    or raise PlanError naming the smallest budget that would fit."""
    names = ["text"] + (["clip", "encode"] if v.task == "i2v" else []) + ["embed", "denoise", "decode"]
    phases, errors = [], []
    for name in names:
        try:
            phases.append(plan_phase(name, v, lat, steps, budget, dtype, vae_dtype, branches, cached))
        except PlanError as e:
            errors.append(e)
    if errors:  # name the budget that fits every phase
        need = max(e.needed for e in errors)
        raise PlanError(f"a VRAM budget of {fmt(budget)} cannot hold this generation: it needs at least {fmt(need)} "
                        f"(--vram-budget {math.ceil(need / MiB)}MiB). Smallest plans of the phases that do not fit: "
                        + " ".join(map(str, errors)), needed=need)
    return Plan(budget, tuple(phases))
