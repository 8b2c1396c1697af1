"""Wan-VAE (Wan2.1): causal 3D conv autoencoder, 8x spatial and 4x temporal compression, 16 latent channels.

Parameter names equal the keys of the official `Wan2.1_VAE.pth`, so that file loads with `strict=True`;
`vae_from_diffusers` renames a diffusers `AutoencoderKLWan` state dict to those keys.

Video is processed in time chunks (encode: 1, 4, 4, ... frames; decode: one latent frame) and every causal conv
carries its last input frames to the next chunk in an explicit `CausalCache`. This bounds activation memory by one
chunk and gives the same result as running the whole clip at once. Numerics follow the official code (fp32).
"""
from __future__ import annotations

import re
from collections.abc import Callable
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


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding all goes in front (2*pad_t frames, none behind), so output frame t sees
    only input frames <= t. With a cache, the previous chunk's last frames replace that much zero padding."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        super().__init__(in_dim, out_dim, kernel, stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_pad = (pw, pw, ph, ph, 2 * pt, 0)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H', W']; with `cache`, takes and advances this conv's slot."""
        *pad_hw, front, _ = self.causal_pad
        if cache is not None and front > 0:
            prev = cache.roll(x, front)
            if prev is not None:
                x = torch.cat([prev, x], 2)
                front -= prev.shape[2]
        if front or any(pad_hw):
            x = F.pad(x, (*pad_hw, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Official `RMS_norm`: x / ||x||_2 over channels (dim 1) * sqrt(C) * gamma, computed in fp32.

    gamma: [C, 1, 1, 1] for video [B, C, T, H, W]; [C, 1, 1] for images [N, C, H, W] (`images=True`).
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](F.silu(r[3](h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with residual. [B, C, T, H, W] in/out."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [BT, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).transpose(1, 2)


class _NearestUp2x(nn.Module):
    """2x nearest-exact upsampling of [N, C, H, W]; interpolated in fp32 as the official code does for bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


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
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
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
                t *= 2
                x = x.view(b, 2, c, t // 2, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t, h, w)
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
        return self[2](F.silu(self[0](x)), cache)


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
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
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
        x = self.middle(self.conv1(x, cache), cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head(x, cache)


class WanVAE(nn.Module):
    """Wan2.1 video VAE. Runs in the dtype of its parameters (fp32 for the official numerics).

    Latents are normalised per channel, (mu - mean) / std with `cfg.latents_mean/std`, as the DiT expects.
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

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """video: [B, 3, F, H, W] in [-1, 1], F = 4n+1, H and W multiples of 8 -> latents mu
        [B, z_dim, (F-1)/4 + 1, H/8, W/8] in the VAE dtype; normalised unless `normalize=False`."""
        st, sh, sw = self.cfg.stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        _, _, f, h, w = video.shape
        if f % st != 1 or h % sh or w % sw:
            raise ValueError(f"video frames must be {st}n+1 and H, W multiples of {sh}; got F={f}, H={h}, W={w}")
        x = video.to(self.conv1.weight.dtype)
        cache = CausalCache()
        chunks = [x[:, :, :1]] + [x[:, :, i:i + st] for i in range(1, f, st)]
        hidden = torch.cat([self.encode_step(c, cache) for c in chunks], 2)
        mu = self.conv1(hidden)[:, :self.cfg.z_dim]  # the other half is log_var, unused at inference
        if not normalize:
            return mu
        mean, inv_std = self._latent_stats(mu)
        return (mu - mean) * inv_std

    def decode_step(self, z_t: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One un-normalised latent frame [B, z_dim, 1, h, w] -> video [B, 3, T, 8h, 8w], unclamped, with T = 1 for
        the clip's first latent frame and 4 after; advances `cache`."""
        x = self.decoder(self.conv2(z_t), cache)
        cache.advance()
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: normalised [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], VAE dtype.

        Decodes one latent frame at a time; the output is allocated once and filled in place."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latents must be [B, {self.cfg.z_dim}, T, h, w], got {tuple(latents.shape)}")
        z = latents.to(self.conv1.weight.dtype)
        mean, inv_std = self._latent_stats(z)
        z = z / inv_std + mean
        b, _, t, h, w = z.shape
        st, sh, sw = self.cfg.stride
        out = z.new_empty(b, 3, 1 + st * (t - 1), h * sh, w * sw)
        cache = CausalCache()
        start = 0
        for i in range(t):
            frames = self.decode_step(z[:, :, i:i + 1], cache).clamp_(-1.0, 1.0)
            out[:, :, start:start + frames.shape[2]] = frames
            start += frames.shape[2]
        assert start == out.shape[2]
        return out


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
