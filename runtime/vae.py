"""Wan-VAE (Wan2.1): causal 3D conv autoencoder, 8x spatial and 4x temporal compression, 16 latent channels.

Parameter names equal the keys of the official `Wan2.1_VAE.pth`, so that file loads with `strict=True`;
`vae_from_diffusers` renames a diffusers `AutoencoderKLWan` state dict to those keys.

Video is processed in time chunks (encode: 1, 4, 4, ... frames; decode: one latent frame) and every causal conv
carries its last input frames to the next chunk in an explicit `CausalCache`. This bounds activation memory by one
chunk and gives the same result as running the whole clip at once. Numerics follow the official code (fp32).

Spatial tiling (`tile=` on `encode`/`decode`) bounds it further, by one tile: as in diffusers, each tile runs the whole
causal time loop with its own cache, which is dropped when the tile is done, and tiles are cross-faded in the middle
of their overlaps (see TILE_OVERLAP) straight into one preallocated output. `compute_dtype=torch.bfloat16` runs the convolutions and
activations in bf16 (weights cast on the fly if stored in fp32); RMS norm statistics and the output stay fp32.
"""
from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanrt.runtime.config import VAEConfig


@dataclass
class CausalCache:
    """Frames carried between time chunks: one slot per cached op, visited in the same order on every chunk.

    A slot holds the last input frames of its op (at most 2, [B, C, <=2, H, W]); None means "no history" and
    reads as zero padding. A fresh cache starts a new clip.
    """
    slots: list[torch.Tensor | None] = field(default_factory=list)
    idx: int = 0  # the next op's slot within the current chunk
    first: bool = True  # the current chunk is the clip's first

    def roll(self, x: torch.Tensor, keep: int) -> torch.Tensor | None:
        """Return the current op's saved frames (None if none) and save the last `keep` frames of [saved, x]."""
        prev = self.slots[self.idx] if self.idx < len(self.slots) else None
        t = x.shape[2]
        if t >= keep or prev is None:
            tail = x[:, :, -keep:].clone()  # clone: a view would keep the whole chunk alive
        else:
            tail = torch.cat([prev[:, :, t - keep:], x], 2)
        self._store(tail)
        return prev

    def skip(self) -> None:
        """Keep the current op's slot empty (the op did not run on this chunk)."""
        self._store(None)

    def advance(self) -> None:
        """Finish a chunk: the next one starts again at the first slot."""
        assert self.idx == len(self.slots), f"chunk visited {self.idx} of {len(self.slots)} cache slots"
        self.idx = 0
        self.first = False

    def _store(self, value: torch.Tensor | None) -> None:
        if self.idx == len(self.slots):
            self.slots.append(value)
        else:
            self.slots[self.idx] = value
        self.idx += 1


def _cast(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A weight in the dtype of the activation it meets (no copy when they agree, as on the official fp32 path)."""
    return p if p is None or p.dtype == x.dtype else p.to(x.dtype)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding all goes in front (2*pad_t frames, none behind), so output frame t sees
    only input frames <= t. With a cache, the previous chunk's last frames replace that much zero padding.

    Runs in the input's dtype. The spatial zero padding is left to the convolution itself, so a cached call costs
    one copy of its input (the concatenation with the cached frames) rather than two (concatenation, then padding).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        super().__init__(in_dim, out_dim, kernel, stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.front = 2 * pt  # causal frames in front
        self.pad_hw = (ph, pw)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H', W']; with `cache`, takes and advances this conv's slot."""
        if self.front:
            prev = cache.roll(x, self.front) if cache is not None else None
            if prev is None:
                x = F.pad(x, (0, 0, 0, 0, self.front, 0))
            else:
                missing = self.front - prev.shape[2]  # 1 on the clip's second chunk: the first had 1 frame
                parts = [prev, x] if not missing else [torch.zeros_like(prev[:, :, :missing]), prev, x]
                x = torch.cat(parts, 2)
        return F.conv3d(x, _cast(self.weight, x), _cast(self.bias, x), self.stride, (0, *self.pad_hw))


class Conv2d(nn.Conv2d):
    """nn.Conv2d that runs in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class RMSNorm(nn.Module):
    """Official `RMS_norm`: x / max(||x||_2, 1e-12) over channels (dim 1) * sqrt(C) * gamma.

    gamma: [C, 1, 1, 1] for video [B, C, T, H, W]; [C, 1, 1] for images [N, C, H, W] (`images=True`).
    fp32 x: the official expression. bf16/fp16 x: the same value, x * rsqrt(mean_C(x^2)) * gamma, as one fused
    `F.rms_norm` that accumulates in fp32 (the official code makes fp32 copies of x, tripling this op's memory
    traffic); it runs over the innermost dim, which is C for the channels-last activations of that path. Its eps
    (1e-12 on the mean square) only matters where the official 1e-12 clamp on the norm would.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            gamma = self.gamma.reshape(-1).to(x.dtype)
            return F.rms_norm(x.movedim(1, -1), gamma.shape, gamma, eps=1e-12).movedim(-1, 1)
        return (F.normalize(x.float(), dim=1) * self.scale * self.gamma).type_as(x)


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> CausalConv3d 3^3 -> RMSNorm -> SiLU -> CausalConv3d 3^3, plus a 1^3 conv shortcut if
    in_dim != out_dim. [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices follow the official nn.Sequential (1, 4: SiLU; 5: Dropout(0)); only 0, 2, 3, 6 hold weights.
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1)])
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        r = self.residual
        # One expression, so the first conv's output is freed once normalised (peak: x, h, the second conv's
        # input and output); SiLU in place on the norms' fresh outputs.
        h = F.silu(r[3](r[2](F.silu(r[0](x), inplace=True), cache)), inplace=True)
        return r[6](h, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with residual. [B, C, T, H, W] in/out."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [BT, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).transpose(1, 2)


class _NearestUp2x(nn.Module):
    """2x nearest-exact upsampling of [N, C, H, W]. The official code interpolates bf16 in fp32; nearest only copies
    values, so interpolating in x's dtype gives the same bits without the 4x-sized fp32 temporary."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Per-frame 2x spatial resampling, optionally with 2x temporal resampling through a cached time_conv.

    - downsample2d: [B, C, T, H, W] -> [B, C, T, H/2, W/2] (ZeroPad right/bottom by 1, Conv2d 3x3 stride 2).
    - downsample3d: then time_conv (3,1,1) stride 2 over [last frame of previous chunk, chunk]; the clip's first
      chunk (1 frame) skips it, so 1 + 4k frames give 1 + 2k.
    - upsample2d:   [B, C, T, H, W] -> [B, C/2, T, 2H, 2W] (nearest-exact 2x, Conv2d 3x3).
    - upsample3d:   first time_conv C -> 2C, interleaved into 2T frames; the clip's first chunk skips it, so
      1 + k frames give 1 + 2k.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_NearestUp2x(), Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"mode must be upsample2d, upsample3d, downsample2d or downsample3d, got {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if cache.first:
                cache.skip()  # keeps slot order fixed; the next chunk then starts time_conv from zero padding
            else:
                x = self.time_conv(x, cache)  # [B, 2C, T, H, W]: channel halves are the two output frames
                cl = x.is_contiguous(memory_format=torch.channels_last_3d)  # and stays so
                y = torch.empty((b, c, 2 * t, h, w), dtype=x.dtype, device=x.device,
                                memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
                y[:, :, 0::2], y[:, :, 1::2] = x[:, :c], x[:, c:]
                x, t = y, 2 * t
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            prev = cache.roll(x, 1)
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


class Middle(nn.ModuleList):
    """[ResidualBlock, AttentionBlock, ResidualBlock] at the lowest resolution (official `middle`)."""

    def __init__(self, dim: int):
        super().__init__([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self[2](self[1](self[0](x, cache)), cache)


class Head(nn.ModuleList):
    """RMSNorm -> SiLU -> CausalConv3d 3^3 (official `head`; index 1 is the SiLU)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__([RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1)])

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self[2](F.silu(self[0](x), inplace=True), cache)


class Encoder3d(nn.Module):
    """One time chunk of video [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (mu and log_var stacked)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            for j in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < len(cfg.temperal_downsample):
                layers.append(Resample(d_out, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = Middle(dims[-1])
        self.head = Head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.high(self.low(x, cache), cache)

    def low(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """conv1 and the downsampling stages: only 3x3(x3) convolutions, local like the decoder's `high`."""
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x

    def high(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """The middle block (attention over the whole frame it is given) and the head, at latent resolution."""
        return self.head(self.middle(x, cache), cache)


class Decoder3d(nn.Module):
    """One time chunk of (un-normalised) latents [B, z_dim, T, h, w] -> video [B, 3, T', 8h, 8w], unclamped."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = Middle(dims[0])
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            if i > 0:
                d_in //= 2  # the previous stage's Resample halved the channels
            for j in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < len(temperal_upsample):
                layers.append(Resample(d_out, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = Head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.high(self.low(x, cache), cache)

    def low(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """conv1 and the middle block at latent resolution; its attention spans the whole frame it is given."""
        return self.middle(self.conv1(x, cache), cache)

    def high(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """The upsampling stages and the head: only 3x3(x3) convolutions, so a tile's result differs from the whole
        frame's only near the tile's edges."""
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head(x, cache)


# Seams: at a tile's inner edge its convolutions see zero padding instead of the neighbour's values, so its outermost
# output is wrong, with an error that falls off within a few latents of the edge. Neighbours therefore decode
# TILE_OVERLAP latents in common; each drops the part next to its own edge and only the middle TILE_BLEND latents
# are cross-faded. Near the seam this is 6 dB closer to the untiled output than a linear ramp across the same 6
# latents, and 4 dB closer than a linear ramp across 8 (diffusers' overlap) while decoding less twice
# (bench/results/seams_cpu.md).
TILE_OVERLAP = 6
TILE_BLEND = 2


def tile_overlap(tile: tuple[int, int] | None) -> int:
    """Latents shared by neighbouring tiles: TILE_OVERLAP, or a third of the tile when that is smaller (keeps a
    tile's two overlaps apart, see `tile_spans`)."""
    return min(TILE_OVERLAP, min(tile) // 3) if tile else TILE_OVERLAP


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) spans covering [0, length) in order: the fewest of at most `tile` cells, neighbours sharing
    exactly `overlap` cells, lengths differing by at most one (a thin last tile would cost nearly the launch time of
    a full one for little work). One span when length <= tile. Needs 0 <= 3 * overlap <= tile (checked by the
    callers): then every span is at least 2 * overlap long, so its two overlaps never meet."""
    if length <= tile:
        return [(0, length)]
    n = -(-(length - overlap) // (tile - overlap))  # fewest spans whose union reaches `length`
    total = length + (n - 1) * overlap
    spans, start = [], 0
    for i in range(n):
        size = total // n + (i < total % n)
        spans.append((start, start + size))
        start += size - overlap
    return spans


def decode_tiles(h: int, w: int, tile: tuple[int, int], overlap: int) -> list[tuple[slice, slice]]:
    """(rows, cols) slices of the spatial tiles of an h x w grid, in raster order (the order decode runs them)."""
    return [(slice(*r), slice(*c)) for r in tile_spans(h, tile[0], overlap) for c in tile_spans(w, tile[1], overlap)]


def _fade_out(shared: int, blend: int) -> torch.Tensor:
    """Weights of the earlier of two neighbours over the `shared` cells both computed: 1 up to the cross-fade, a
    smoothstep down to 0 over the middle `blend` cells, then 0 next to its edge (the later neighbour's weights are
    the complement)."""
    blend = min(blend, shared)
    keep = (shared - blend) // 2
    t = (torch.arange(blend) + 0.5) / blend
    return torch.cat([torch.ones(keep), 1 - t * t * (3 - 2 * t), torch.zeros(shared - blend - keep)])


def tile_blend_weights(spans: list[tuple[int, int]], scale: int = 1, blend: int = TILE_BLEND) -> list[torch.Tensor]:
    """Per span of one axis, fp32 weights of length (stop - start) * scale: over each overlap with a neighbour a
    cross-fade of `blend` cells in its middle (`_fade_out`), 0 on the side next to this span's edge and 1 on the
    other; 1 elsewhere. The weights of two neighbours sum to 1 cell by cell, so summing weight * tile over all
    tiles of a frame (weights: the outer product of the two axes') blends the overlaps and leaves the rest
    unchanged. `scale` (8 for decode) refines latent spans to pixels, so the fade is smooth at pixel level."""
    out = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones((stop - start) * scale)
        up = (spans[i - 1][1] - start) * scale if i > 0 else 0
        down = (stop - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        assert up + down <= w.numel(), f"blend ramps overlap in span {i} of {spans}"
        if up:
            w[:up] = 1 - _fade_out(up, blend * scale)
        if down:
            w[w.numel() - down:] = _fade_out(down, blend * scale)
        out.append(w)
    return out


def _to_compute(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the compute dtype. bf16/fp16 also go channels-last (NDHWC): cuDNN's tensor-core convs work in it
    natively (NCDHW costs a layout transform around every conv), the RMS norms become one fused kernel over the
    innermost dim, and the VAE's ops keep that layout (a 1-frame first chunk may drop back to NCDHW in places,
    which costs only speed). fp32 stays NCDHW, as the official code runs."""
    if dtype in (torch.bfloat16, torch.float16):
        return x.to(dtype=dtype, memory_format=torch.channels_last_3d)
    return x.to(dtype)


def _tiles(rows: list[tuple[int, int]], cols: list[tuple[int, int]], scale: tuple[int, int],
           device: torch.device):
    """Yield (row span, col span, weights, top, left) per tile in raster order. Spans are in grid cells; weights
    ([rows, cols] fp32 in output cells = grid cells * scale, None for a tile alone on the frame), `top` and `left`
    (the output rows and columns that earlier tiles already wrote) are in output cells."""
    wr, wc = tile_blend_weights(rows, scale[0]), tile_blend_weights(cols, scale[1])
    alone = len(rows) == len(cols) == 1
    for i, (r0, r1) in enumerate(rows):
        top = (rows[i - 1][1] - r0) * scale[0] if i > 0 else 0
        for j, (c0, c1) in enumerate(cols):
            left = (cols[j - 1][1] - c0) * scale[1] if j > 0 else 0
            w = None if alone else (wr[i][:, None] * wc[j][None, :]).to(device)
            yield (r0, r1), (c0, c1), w, top, left


def _release_cached_blocks(like: torch.Tensor) -> None:
    """Return the caching allocator's free blocks to the device (once per pass of a new shape, not per tile)."""
    if like.is_cuda:
        torch.cuda.empty_cache()


def _blend(dst: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, top: int, left: int) -> None:
    """Add x * w to dst ([..., rows, cols], a view of the output at one tile), computed in fp32 at least.

    Tiles run in raster order, so the first `top` rows and `left` columns of dst already hold the earlier tiles'
    shares and are accumulated into; the rest is written for the first time, so dst may start uninitialised.
    w None (a tile alone on the frame): a plain copy, bit-identical to untiled."""
    x = x.to(dst.device)
    if w is None:
        dst.copy_(x)
        return
    torch.mul(x[..., top:, left:], w[top:, left:], out=dst[..., top:, left:])
    dst[..., :top, :].addcmul_(x[..., :top, :], w[:top])
    dst[..., top:, :left].addcmul_(x[..., top:, :left], w[top:, :left])


class _HostBlender:
    """Blends GPU frames into a video in host RAM on one worker thread (FIFO, so overlapping tiles still add in
    order): each call only queues a copy into pinned memory, and the GPU goes on while the CPU blends."""

    def __init__(self, depth: int = 4):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wanrt-blend")
        self.pending: deque[Future] = deque()
        self.depth = depth  # steps in flight: bounds the pinned staging memory

    def __call__(self, dst: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, top: int, left: int) -> None:
        staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # small, reused by the host allocator
        staged.copy_(x, non_blocking=True)
        copied = torch.cuda.Event(blocking=True)  # the worker sleeps on it rather than spinning a core
        copied.record(torch.cuda.current_stream(x.device))
        self.pending.append(self.pool.submit(self._blend, copied, dst, staged, w, top, left))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    @staticmethod
    def _blend(copied: torch.cuda.Event, dst, staged, w, top, left) -> None:
        copied.synchronize()
        _blend(dst, staged, w, top, left)

    def close(self) -> None:
        """Wait for every queued blend (re-raising its error) and stop the worker."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()


class WanVAE(nn.Module):
    """Wan2.1 video VAE. Runs in the dtype of its parameters (fp32 for the official numerics) unless `compute_dtype`
    says otherwise; bf16 weights (`.to(torch.bfloat16)`) save the per-call weight casts of an fp32 model.

    Latents are normalised per channel, (mu - mean) / std with `cfg.latents_mean/std`, as the DiT expects.

    Decode memory, batch 1, one tile of P = th * tw latents (Wan2.1 widths, dim 96, dim_mult (1, 2, 4, 4)):
    - causal cache: 2 input frames per cached conv, 151,328 values per latent pixel (86,016 of them in the last,
      full-resolution stage: 7 convs x 96 channels x 2 frames x 64 pixels);
    - transient: the last stage's tensors hold 96 ch x 4 frames x 64 px = 24,576 values per latent pixel and a
      residual block keeps about 4.5 of them alive (input, conv input, cached+new frames, output): ~110,600;
    so ~262k values * P, 0.52 MB * P in bf16 (1.05 MB in fp32), plus cuDNN workspace; measured on an H100,
    0.55-0.6 MB * P in bf16. On top come the weights (decoder: 73.3M params) and the output, unless `out` lives
    elsewhere. Encode needs ~0.4 MB * P in bf16 (P: latent pixels of its tile), measured the same way.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(cfg.dim_mult) - 1} entries (one per downsampling "
                             f"stage), got {len(cfg.temperal_downsample)}")
        if not len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={cfg.z_dim} entries, got "
                             f"{len(cfg.latents_mean)} and {len(cfg.latents_std)}")
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std), each [1, z_dim, 1, 1, 1] on like's device and dtype. Built per call, not as buffers,
        so a model built on meta and loaded with assign=True needs nothing else."""
        kw = dict(dtype=like.dtype, device=like.device)
        mean = torch.tensor(self.cfg.latents_mean, **kw).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.cfg.latents_std, **kw).view(1, -1, 1, 1, 1)
        return mean, inv_std

    def encode_step(self, chunk: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One time chunk [B, 3, T, H, W] (T = 1 for the clip's first chunk, else 4) -> encoder features
        [B, 2*z_dim, 1, H/8, W/8]; advances `cache`."""
        h = self.encoder(chunk, cache)
        cache.advance()
        return h

    def _compute_dtype(self, compute_dtype: torch.dtype | None, conv: nn.Module) -> torch.dtype:
        """compute_dtype, or by default the dtype of the side in use (conv1 ends the encoder, conv2 starts the
        decoder: a pipeline may cast only the side it runs)."""
        if compute_dtype is None:
            return conv.weight.dtype
        if not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating dtype (torch.float32, torch.bfloat16, ...), "
                             f"got {compute_dtype}")
        return compute_dtype

    def _tiling(self, tile: tuple[int, int] | None, overlap: int | None, grid: tuple[int, int],
                unit: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Row and column spans over the latent grid; `tile` and `overlap` come in units of 1/unit latent cell,
        overlap None meaning `tile_overlap`'s."""
        if tile is None:
            return [(0, grid[0])], [(0, grid[1])]
        if overlap is None and len(tile) == 2:
            overlap = tile_overlap((tile[0] // unit, tile[1] // unit)) * unit
        if (len(tile) != 2 or min(tile) < 1 or any(v % unit for v in tile) or overlap % unit
                or not 0 <= 3 * overlap <= min(tile)):
            raise ValueError(f"tile must be (height, width), positive multiples of {unit}, and overlap a multiple "
                             f"of {unit} in [0, min(tile) / 3]; got tile={tile}, overlap={overlap}")
        th, tw, ov = tile[0] // unit, tile[1] // unit, overlap // unit
        return tile_spans(grid[0], th, ov), tile_spans(grid[1], tw, ov)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalize: bool = True, tile: tuple[int, int] | None = None,
               overlap: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """video: [B, 3, F, H, W] in [-1, 1], F = 4n+1, H and W multiples of 8 -> latents mu
        [B, z_dim, (F-1)/4 + 1, H/8, W/8] in the VAE dtype; normalised unless `normalize=False`.

        tile: (height, width) of the spatial tiles in PIXELS (multiples of 8), None for the whole frame at once;
        overlap: pixels shared by neighbouring tiles (a multiple of 8, at most min(tile) / 3; default 8 *
        `tile_overlap`), cross-faded in latent space as `tile_blend_weights` says. compute_dtype: dtype of the convolutions and activations, default the
        VAE's (fp32: official numerics)."""
        st, sh, sw = self.cfg.stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        b, _, f, h, w = video.shape
        if f % st != 1 or h % sh or w % sw:
            raise ValueError(f"video frames must be {st}n+1 and H, W multiples of {sh}; got F={f}, H={h}, W={w}")
        cd = self._compute_dtype(compute_dtype, self.conv1)
        rows, cols = self._tiling(tile, overlap, (h // sh, w // sw), sh)
        shape = (b, self.cfg.z_dim, (f - 1) // st + 1, h // sh, w // sw)
        if len(rows) * len(cols) == 1:
            out = self._encode_tile(video, cd).to(self.conv1.weight.dtype)
        else:
            # Several tiles: only the local downsampling stages are tiled; their features are blended over the
            # whole frame (in host RAM), where the middle block's frame-wide attention and the head then run once.
            feats = None
            for (r0, r1), (c0, c1), wgt, top, left in _tiles(rows, cols, (1, 1), torch.device("cpu")):
                x = self._encode_tile(video[:, :, :, r0 * sh:r1 * sh, c0 * sw:c1 * sw], cd, high=False)
                if feats is None:
                    feats = torch.empty((*x.shape[:3], *shape[3:]), dtype=torch.float32)
                _blend(feats[:, :, :, r0:r1, c0:c1], x, wgt, top, left)
                del x
            _release_cached_blocks(video)
            out = self._encode_high(feats, cd, video.device).to(self.conv1.weight.dtype)
        if not normalize:
            return out
        mean, inv_std = self._latent_stats(out)
        return out.sub_(mean).mul_(inv_std)

    def _encode_tile(self, video: torch.Tensor, dtype: torch.dtype, high: bool = True) -> torch.Tensor:
        """mu [B, z_dim, T', h, w] of one spatial tile, through the whole clip with its own cache (freed on return);
        with high=False, the downsampled features [B, C, T', h, w] before the middle block instead."""
        st = self.cfg.stride[0]
        cache = CausalCache()
        chunks = [video[:, :, :1]] + [video[:, :, i:i + st] for i in range(1, video.shape[2], st)]
        if not high:
            feats = []
            for c in chunks:
                feats.append(self.encoder.low(_to_compute(c, dtype), cache))
                cache.advance()
            return torch.cat(feats, 2)
        hidden = torch.cat([self.encode_step(_to_compute(c, dtype), cache) for c in chunks], 2)
        return self.conv1(hidden)[:, :self.cfg.z_dim]  # the other half is log_var, unused at inference

    def _encode_high(self, feats: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """mu [B, z_dim, T', h, w] from whole-frame features [B, C, T', h, w]: the middle block and the head, one
        latent frame at a time with their own cache."""
        cache = CausalCache()
        hidden = []
        for i in range(feats.shape[2]):
            hidden.append(self.encoder.high(_to_compute(feats[:, :, i:i + 1].to(device), dtype), cache))
            cache.advance()
        return self.conv1(torch.cat(hidden, 2))[:, :self.cfg.z_dim]

    def decoded_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, z_dim, T, h, w] latents -> the [B, 3, 4(T-1)+1, 8h, 8w] video they decode to."""
        b, _, t, h, w = latent_shape
        st, sh, sw = self.cfg.stride
        return (b, 3, 1 + st * (t - 1), h * sh, w * sw)

    def decode_step(self, z_t: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One un-normalised latent frame [B, z_dim, 1, h, w] -> video [B, 3, T, 8h, 8w], unclamped, with T = 1 for
        the clip's first latent frame and 4 after; advances `cache`. Runs in z_t's dtype."""
        x = self.decoder(self.conv2(z_t), cache)
        cache.advance()
        return x

    def _middle_of_clip(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The decoder's low part (conv1 and the middle block, whose attention sees the whole frame) over the whole
        frame, one latent frame at a time: [B, C, T, h, w] in `dtype`, kept in host RAM, so the tiles' upsampling
        stages start from the same whole-frame values. Small: C = 384 at latent resolution."""
        cache = CausalCache()
        mids = None
        for i in range(z.shape[2]):
            m = self.decoder.low(self.conv2(_to_compute(z[:, :, i:i + 1], dtype)), cache)
            cache.advance()
            if mids is None:
                mids = torch.empty((m.shape[0], m.shape[1], z.shape[2], *m.shape[3:]), dtype=m.dtype)
            mids[:, :, i:i + 1].copy_(m)
        return mids

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: tuple[int, int] | None = None, overlap: int | None = None,
               compute_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """latents: normalised [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1].

        tile: (height, width) of the spatial tiles in LATENTS, None for the whole frame at once (one tile);
        overlap: latents shared by neighbouring tiles (at most min(tile) / 3; default `tile_overlap`); each tile drops the part next to its
        own edge and the middle TILE_BLEND latents are cross-faded (`tile_blend_weights`).
        With several tiles, conv1 and the middle block (whose attention spans the frame) first run once on the whole
        frame (`_middle_of_clip`, kept in host RAM); then each tile runs the upsampling stages through the whole
        clip, one latent frame at a time, with its own causal cache, and adds its weighted frames straight into the
        output, so peak memory is one tile's cache and activations. An output in host RAM (`out` on the CPU) is
        blended on a worker thread while the GPU decodes on.
        compute_dtype: dtype of the convolutions and activations, default the VAE's (fp32: official numerics);
        torch.bfloat16 is faster on GPUs (bench/results/stream_h100.md) and halves activation memory.
        out: optional preallocated [B, 3, 4(T-1)+1, 8h, 8w] float tensor on any device (e.g. pinned CPU memory, to
        keep the video off the GPU); every element is overwritten. Default: a new one on the latents' device, in
        the VAE dtype. Blending is computed in fp32 (or out's dtype if wider)."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be [B, {self.cfg.z_dim}, T, h, w], got {tuple(latents.shape)}")
        b, _, t, h, w = latents.shape
        st, sh, sw = self.cfg.stride
        shape = self.decoded_shape(latents.shape)
        dtype = self.conv2.weight.dtype
        if out is None:
            out = latents.new_empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or not out.is_floating_point():
            raise ValueError(f"out must be a float tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        cd = self._compute_dtype(compute_dtype, self.conv2)
        rows, cols = self._tiling(tile, overlap, (h, w), 1)
        mean, inv_std = self._latent_stats(latents.float())
        z = (latents.float() / inv_std + mean).to(dtype)  # un-normalised in fp32, then rounded once
        # Several tiles: the middle block's attention is global within a frame, so it runs once on the whole
        # frame and only the local upsampling stages are tiled (seams then come only from their zero padding).
        mids = self._middle_of_clip(z, cd) if len(rows) * len(cols) > 1 else None
        if mids is not None:
            _release_cached_blocks(z)  # the frame-wide pass's blocks do not fit the tiles' shapes
        # GPU frames into a host-RAM video: blended on a worker thread while the GPU decodes on
        blend = _HostBlender() if latents.is_cuda and out.device.type == "cpu" else _blend
        try:
            # No empty_cache between tiles: balanced spans differ by at most one latent, so each tile reuses the
            # blocks the one before freed (measured on an H100: the same reserved peak, and 150 ms less of 2 s).
            for (r0, r1), (c0, c1), wgt, top, left in _tiles(rows, cols, (sh, sw), out.device):
                src = z if mids is None else mids
                self._decode_tile(src[:, :, :, r0:r1, c0:c1], out[:, :, :, r0 * sh:r1 * sh, c0 * sw:c1 * sw], wgt,
                                  top, left, cd, latents.device, blend, from_middle=mids is not None)
        finally:
            if isinstance(blend, _HostBlender):
                blend.close()
        return out

    def _decode_tile(self, z: torch.Tensor, dst: torch.Tensor, w: torch.Tensor | None, top: int, left: int,
                     dtype: torch.dtype, device: torch.device, blend=_blend, from_middle: bool = False) -> None:
        """Decode one spatial tile through the whole clip with its own cache (freed on return), blending each latent
        frame's output frames into dst (the output at this tile) as they come. z: un-normalised latents, or with
        `from_middle` the whole-frame middle block's output at this tile (`_middle_of_clip`, in host RAM)."""
        cache = CausalCache()
        start = 0
        for i in range(z.shape[2]):
            x = _to_compute(z[:, :, i:i + 1].to(device, non_blocking=True), dtype)
            if from_middle:
                frames = self.decoder.high(x, cache)
                cache.advance()
            else:
                frames = self.decode_step(x, cache)
            blend(dst[:, :, start:start + frames.shape[2]], frames.clamp_(-1.0, 1.0), w, top, left)
            start += frames.shape[2]
        assert start == dst.shape[2]


# diffusers AutoencoderKLWan -> official Wan2.1_VAE.pth names. Module-path rules, first match wins; a matched
# prefix is replaced and the rest of the key kept. Indices: `r` = num_res_blocks.
def _module_rules(r: int) -> list[tuple[str, str | Callable[[re.Match], str]]]:
    up_block = r + 2  # official decoder.upsamples holds r+1 residual blocks and one Resample per stage
    return [
        (r"quant_conv", "conv1"),
        (r"post_quant_conv", "conv2"),
        (r"(encoder|decoder)\.conv_in", r"\1.conv1"),
        (r"(encoder|decoder)\.mid_block\.resnets\.0", r"\1.middle.0"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0", r"\1.middle.1"),
        (r"(encoder|decoder)\.mid_block\.resnets\.1", r"\1.middle.2"),
        (r"(encoder|decoder)\.norm_out", r"\1.head.0"),
        (r"(encoder|decoder)\.conv_out", r"\1.head.2"),
        (r"encoder\.down_blocks\.(\d+)", r"encoder.downsamples.\1"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
         lambda m: f"decoder.upsamples.{int(m[1]) * up_block + int(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.upsamples.{int(m[1]) * up_block + r + 1}"),
    ]


# Inside a residual block (the first name after the block path).
_RESNET_RENAMES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                   "conv_shortcut": "shortcut"}


def _official_key(key: str, rules: list) -> str | None:
    for pattern, repl in rules:
        m = re.match(pattern + r"\.(?P<leaf>.+)", key)
        if m:
            block = m.expand(repl) if isinstance(repl, str) else repl(m)
            leaf, _, rest = m["leaf"].partition(".")
            return f"{block}.{_RESNET_RENAMES.get(leaf, leaf)}" + (f".{rest}" if rest else "")
    return None


def vae_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict to official Wan2.1 VAE keys (tensors are not copied).

    cfg: the model's VAEConfig (default: the Wan2.1 VAE); used for block indices and the shape check.
    Raises ValueError naming unknown, missing or mis-shaped keys.
    """
    cfg = cfg or VAEConfig()
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WanVAE(cfg).state_dict().items()}
    rules = _module_rules(cfg.num_res_blocks)
    out, unknown, bad_shape = {}, [], []
    for key, value in state_dict.items():
        name = _official_key(key, rules)
        if name not in expected:
            unknown.append(key)
        elif value.shape != expected[name]:
            bad_shape.append(f"{key} -> {name}: {tuple(value.shape)} != {tuple(expected[name])}")
        else:
            out[name] = value
    missing = sorted(set(expected) - set(out) - {_official_key(k, rules) for k in state_dict})
    if unknown or missing or bad_shape:
        raise ValueError(f"diffusers Wan VAE state dict does not match VAEConfig(dim={cfg.dim}, "
                         f"dim_mult={cfg.dim_mult}, z_dim={cfg.z_dim}): unknown keys {unknown}, "
                         f"missing official keys {missing}, shape mismatches {bad_shape}")
    return out
