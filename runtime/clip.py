"""CLIP ViT-H/14 vision tower for Wan2.1 I2V (official `wan/modules/clip.py`, `CLIPModel.visual`).

The I2V DiT conditions on the hidden states after the first `use_layers` (31 of 32) transformer blocks, with no
post-norm: [B, 257, 1280]. Only those blocks are built; the last block, `post_norm` and `head` are never used, so the
converters drop them.

Parameter names are the official ones with the `visual.` prefix stripped:
    patch_embedding.weight                 [dim, 3, p, p]  (no bias: the official tower is pre-norm)
    cls_embedding                          [1, 1, dim]
    pos_embedding                          [1, num_tokens, dim]
    pre_norm.{weight,bias}                 [dim]
    transformer.N.norm1.{weight,bias}      [dim]
    transformer.N.attn.to_qkv.{weight,bias} [3*dim, dim] / [3*dim]   rows: q, k, v; each (heads, head_dim)
    transformer.N.attn.proj.{weight,bias}  [dim, dim] / [dim]
    transformer.N.norm2.{weight,bias}      [dim]
    transformer.N.mlp.0.{weight,bias}      [dim*mlp_ratio, dim] / [dim*mlp_ratio]
    transformer.N.mlp.2.{weight,bias}      [dim, dim*mlp_ratio] / [dim]
for N < use_layers. `clip_from_official` turns `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (the whole
XLM-R CLIP) into this dict; `clip_from_hf` does the same for a transformers `CLIPVisionModel` state dict.

Numerics: GEMMs, attention and the residual stream run in the weights' dtype (the official code runs the tower under
fp16 autocast); LayerNorms compute in fp32 and cast back, as the official `LayerNorm` does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CLIPConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.to_qkv.weight", "attn.to_qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm computed in fp32, returned in x's dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).type_as(x)


def clip_block(x: torch.Tensor, w: dict[str, torch.Tensor], num_heads: int, eps: float) -> torch.Tensor:
    """One pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)), with exact-erf GELU.

    x: [B, L, dim] in the weights' dtype. w: the block's tensors under `BLOCK_KEYS` (names relative to
    `transformer.N.`). A pure function of its inputs so a streamer can hand in weights it has just moved.
    """
    b, s, c = x.shape
    h = _layer_norm(x, w["norm1.weight"], w["norm1.bias"], eps)
    qkv = F.linear(h, w["attn.to_qkv.weight"], w["attn.to_qkv.bias"])
    q, k, v = qkv.view(b, s, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
    a = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim), as flash_attention in W
    a = a.transpose(1, 2).reshape(b, s, c)
    x = x + F.linear(a, w["attn.proj.weight"], w["attn.proj.bias"])
    h = _layer_norm(x, w["norm2.weight"], w["norm2.bias"], eps)
    h = F.gelu(F.linear(h, w["mlp.0.weight"], w["mlp.0.bias"]))
    return x + F.linear(h, w["mlp.2.weight"], w["mlp.2.bias"])


class _AttnWeights(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _BlockWeights(nn.Module):
    """Holds one block's parameters under the official names; the math is `clip_block`."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _AttnWeights(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))


class CLIPVision(nn.Module):
    """ViT-H/14 vision tower truncated after `cfg.use_layers` blocks, no post-norm.

    forward(pixels: [B, 3, S, S] normalised as by `preprocess`, S = cfg.image_size) -> [B, cfg.num_tokens, dim]
    in the weights' dtype. Build on meta and load with `load_state_dict(sd, assign=True, strict=True)`.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if not 1 <= cfg.use_layers <= cfg.num_layers:
            raise ValueError(f"use_layers must be in [1, num_layers={cfg.num_layers}], got {cfg.use_layers}")
        if cfg.image_size % cfg.patch_size or cfg.dim % cfg.num_heads:
            raise ValueError(f"image_size {cfg.image_size} must be divisible by patch_size {cfg.patch_size} and "
                             f"dim {cfg.dim} by num_heads {cfg.num_heads}")
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv2d(3, dim, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=cfg.eps)
        self.transformer = nn.ModuleList(_BlockWeights(dim, dim * cfg.mlp_ratio) for _ in range(cfg.use_layers))

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors keyed by `BLOCK_KEYS`, the input `clip_block` expects."""
        return dict(self.transformer[i].named_parameters())

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + cls + position embeddings, then pre-norm. pixels [B, 3, S, S] -> [B, num_tokens, dim]."""
        cfg = self.cfg
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected pixels [B, 3, {cfg.image_size}, {cfg.image_size}], got {list(pixels.shape)}")
        w = self.patch_embedding.weight
        x = F.conv2d(pixels.to(w.dtype), w, stride=cfg.patch_size).flatten(2).transpose(1, 2)  # [B, L-1, dim]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return _layer_norm(x, self.pre_norm.weight, self.pre_norm.bias, cfg.eps)

    def forward(self, pixels: torch.Tensor, weights=None) -> torch.Tensor:
        """`weights(i)` supplies block i's tensors (default: this module's own; a streamer passes its GPU slots)."""
        weights = weights or self.block_weights
        x = self.embed(pixels)
        for i in range(self.cfg.use_layers):
            x = clip_block(x, weights(i), self.cfg.num_heads, self.cfg.eps)
        return x


def preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Official `CLIPModel.visual` preprocessing.

    images: [B, 3, H, W] in [-1, 1], any H, W. Returns fp32 [B, 3, image_size, image_size]: bicubic resize of the whole
    image (no crop, aspect ratio not kept, align_corners=False, no antialias, no clamp), then to [0, 1], then CLIP
    mean/std. The resize runs before the [0, 1] mapping, as in W; bicubic overshoot is kept.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _expected_shapes(cfg: CLIPConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in CLIPVision(cfg).state_dict().items()}


def _check(out: dict[str, torch.Tensor], unknown: list[str], cfg: CLIPConfig, source: str) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(cfg)
    unknown = unknown + [k for k in out if k not in expected]
    missing = sorted(set(expected) - set(out))
    bad = sorted(f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in out.items()
                 if k in expected and v.shape != expected[k])
    if unknown or missing or bad:
        raise ValueError(f"{source} CLIP state dict does not match {cfg}: unknown keys {sorted(unknown)}, "
                         f"missing keys {missing}, shape mismatches {bad}")
    return out


def _block_index(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix):
        return None
    head = key[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def clip_from_official(state_dict: dict[str, torch.Tensor], cfg: CLIPConfig = CLIPConfig()) -> dict[str, torch.Tensor]:
    """Official XLM-R CLIP state dict -> `CLIPVision` state dict (tensors shared, not copied).

    Keeps `visual.*` minus its prefix. Drops `textual.*`, `log_scale` and any other non-visual key, plus
    `visual.post_norm.*`, `visual.head` and blocks `use_layers..num_layers-1`, which the truncated tower never uses.
    Raises ValueError naming unknown, missing or wrongly shaped keys.
    """
    out = {}
    for key, t in state_dict.items():
        if not key.startswith("visual."):
            continue
        k = key[len("visual."):]
        n = _block_index(k, "transformer.")
        if k.startswith(("post_norm.", "head")) or (n is not None and cfg.use_layers <= n < cfg.num_layers):
            continue
        out[k] = t
    return _check(out, [], cfg, "official")


_HF_BLOCK = {
    "layer_norm1.weight": "norm1.weight", "layer_norm1.bias": "norm1.bias",
    "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
    "layer_norm2.weight": "norm2.weight", "layer_norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
    "mlp.fc2.weight": "mlp.2.weight", "mlp.fc2.bias": "mlp.2.bias",
}
_HF_IGNORED = ("post_layernorm.", "embeddings.position_ids", "visual_projection.", "text_model.", "text_projection.",
               "logit_scale")


def clip_from_hf(state_dict: dict[str, torch.Tensor], cfg: CLIPConfig = CLIPConfig()) -> dict[str, torch.Tensor]:
    """transformers `CLIPVisionModel` (or `...WithProjection` / `CLIPModel`) state dict -> `CLIPVision` state dict.

    Accepts keys with or without the `vision_model.` prefix (checkpoints on the Hub have it; transformers 5's in-memory
    `CLIPVisionModel` does not). q/k/v projections are concatenated into `attn.to_qkv`; class/position embeddings are
    reshaped to [1, 1, dim] / [1, L, dim]. Drops post_layernorm, projections, text weights and layers >= use_layers.
    Raises ValueError naming unknown, missing or wrongly shaped keys.
    """
    sd = {k.removeprefix("vision_model."): v for k, v in state_dict.items()}
    out, unknown, qkv = {}, [], {}
    for k, t in sd.items():
        if k.startswith(_HF_IGNORED):
            continue
        n = _block_index(k, "encoder.layers.")
        if n is not None:
            if cfg.use_layers <= n < cfg.num_layers:
                continue
            rest = k.split(".", 3)[3]
            if rest in _HF_BLOCK:
                out[f"transformer.{n}.{_HF_BLOCK[rest]}"] = t
            elif rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                qkv[(n, rest[len("self_attn.")], rest.rsplit(".", 1)[1])] = t
            else:
                unknown.append(k)
        elif k == "embeddings.class_embedding":
            out["cls_embedding"] = t.reshape(1, 1, -1)
        elif k == "embeddings.patch_embedding.weight":
            out["patch_embedding.weight"] = t
        elif k == "embeddings.position_embedding.weight":
            out["pos_embedding"] = t.unsqueeze(0)
        elif k.startswith("pre_layrnorm."):
            out["pre_norm." + k.split(".", 1)[1]] = t
        else:
            unknown.append(k)
    for n, kind in sorted({(n, kind) for n, _, kind in qkv}):
        parts = [qkv.get((n, p, kind)) for p in "qkv"]
        if all(p is not None for p in parts):
            out[f"transformer.{n}.attn.to_qkv.{kind}"] = torch.cat(parts, dim=0)
        else:
            unknown += [f"encoder.layers.{n}.self_attn.{p}_proj.{kind}" for p, t in zip("qkv", parts) if t is not None]
    return _check(out, unknown, cfg, "transformers")
