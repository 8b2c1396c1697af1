"""The Wan2.1 diffusion transformer (T2V and I2V).

Parameters carry the official `WanModel` names, so an official checkpoint loads with `strict=True`. The computation is
written as functions of plain tensors: `block_forward(x, e0, context, rope, w, cfg)` takes one block's weights as a flat
dict, so a streamer or a compiled graph can feed it whichever buffer holds block i.

Numerics follow the official code: timestep embedding, modulation, norms, RoPE and the residual stream in fp32; GEMMs
and attention in the blocks' compute dtype (bf16 on the GPU, fp32 in parity tests), or through the quantized scheme
that `cfg.quant` names. On GPUs the norms, modulation, residual updates and RoPE run as fused Triton kernels.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.attention import QK_DTYPE, QuantizedQ, attention, quantizes_query
from ..kernels.norm_modulate import norm_modulate
from ..kernels.qk_norm_rope import qk_norm_rope
from ..quant import qdq
from ..quant.formats import SCHEME_INFO
from ..quant.linear import quantized_linear
from .config import DiTConfig

Weights = dict[str, torch.Tensor]
FFN_TOKENS = 4096  # tokens per feed-forward piece: GEMMs of 4096 rows ran within ~5% of full size (H100 profile)


# ----------------------------------------------------------------------------------------------------------- rope
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head given to time, height, width (44, 42, 42 for head_dim 128), as the official code."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=8)
def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu",
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim // 2] fp32 for a (frames, height, width) token grid, tokens ordered f, h, w.

    Angles are built in float64 as the official complex tables (`rope_params`), then rounded once to fp32.
    """
    angles = []
    for axis, (n, d) in enumerate(zip(grid, rope_split(head_dim))):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        a = torch.outer(torch.arange(n, dtype=torch.float64), freqs)  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, d // 2))
    a = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)
    return a.cos().float().to(device), a.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, H, D] fp32 by the angles of cos/sin [L, D/2], computed
    in fp32 and written straight into a `dtype` result (default x's): no stacked fp32 copy."""
    xr, xi = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    real, imag = out.unflatten(-1, (-1, 2)).unbind(-1)
    real.copy_(xr * cos - xi * sin)
    imag.copy_(xr * sin + xi * cos)
    return out


# ------------------------------------------------------------------------------------------------------- the block
def linear(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], w: Weights, name: str, cfg: DiTConfig | None = None,
           gelu: bool = False) -> torch.Tensor:
    """x @ W.T + b (then tanh-GELU if asked) in the weight's dtype, or through the quantized GEMM when the block's
    weights carry a `weight_scale` (cfg.quant names the scheme). x may come pre-quantized as (q, per-token scale)."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    weight_scale = w.get(f"{name}.weight_scale")
    if weight_scale is not None:
        down = w.get(f"{name}.lora_down")
        x, x_scale = x if isinstance(x, tuple) else (x, None)
        y = quantized_linear(x, weight, weight_scale, bias, cfg.quant, gelu and down is None, x_scale)
        if down is None:
            return y
        # A LoRA beside quantized weights (runtime/lora.py side_factors): y += (x @ down^T) @ up^T, from the 16-bit
        # activations; quantized ones (exact in 16 bits) take their per-token scale after the rank-r product, so no
        # dequantized copy of x is made.
        low = F.linear(x.to(y.dtype), down.to(y.dtype))
        low = (low if x_scale is None else low * x_scale.unsqueeze(-1).to(y.dtype)).flatten(0, -2)
        y = torch.addmm(y.flatten(0, -2), low, w[f"{name}.lora_up"].to(y.dtype).T).unflatten(0, x.shape[:-1])
        return torch.ops.aten.gelu_(y, approximate="tanh") if gelu else y
    y = F.linear(x.to(weight.dtype), weight, bias)
    return torch.ops.aten.gelu_(y, approximate="tanh") if gelu else y  # in place: the FFN hidden state once


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Official `WanRMSNorm`: normalised in fp32 (the GPU kernel accumulates in fp32 without an fp32 copy of x),
    rounded to x's dtype, then scaled by the fp32 weight: an fp32 result."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight.float()


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def spans(length: int, chunk: int | None) -> list[slice]:
    """Token ranges of at most `chunk` tokens (one range when chunk is None)."""
    chunk = chunk or length
    return [slice(i, min(i + chunk, length)) for i in range(0, length, chunk)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return layer_norm(x, eps) * (1 + scale) + shift


def qk(h: torch.Tensor | tuple[torch.Tensor, torch.Tensor], w: Weights, attn: str, proj: str,
       rope: tuple[torch.Tensor, torch.Tensor] | None, cfg: DiTConfig,
       attention_mode: str = "sdpa") -> torch.Tensor | QuantizedQ:
    """Query or key: projection, RMSNorm over the whole width in fp32, RoPE if given; [B, L, H, D] in the weight
    dtype (one fused pass after the GEMM on GPUs). A query for an `attention_mode` that runs a quantized kernel comes
    quantized in the form that kernel reads (a QuantizedQ), so the attention skips its pass over Q."""
    name = f"{attn}.{proj}"
    cos, sin = rope if rope is not None else (None, None)
    y = linear(h, w, name, cfg)
    quantized = quantizes_query(attention_mode, y)
    return qk_norm_rope(y, w[f"{attn}.norm_{proj}.weight"], cfg.eps, cfg.num_heads, cos, sin,
                        out_dtype=QK_DTYPE[attention_mode] if quantized else compute_dtype(w),
                        for_attention=quantized)


def heads(y: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    return y.unflatten(-1, (cfg.num_heads, cfg.head_dim))


def compute_dtype(w: Weights) -> torch.dtype:
    """The dtype of activations between ops: the block's bias dtype (bf16 on GPUs, also for quantized weights)."""
    return w["self_attn.v.bias"].dtype


def block_forward(x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  w: Weights, cfg: DiTConfig, chunk: int | None = None) -> torch.Tensor:
    """One Wan block, updating the residual stream x in place and returning it.

    x [B, L, dim] fp32; e0 [B, 6, dim] fp32 time projection; context [B, Lc, dim] embedded text (I2V: image tokens
    first); rope: cos, sin [L, head_dim/2] fp32; w: this block's weights (official names without `blocks.N.`).
    `chunk` bounds the tokens processed at once. Self-attention keys and values of every token come first; then
    everything else is token-local, so each chunk of queries runs the rest of the block (self-attention, cross-attention,
    feed-forward) before the next chunk: the only full-length tensors are x, k and v, and the result equals one chunk.
    Each residual update is fused with the norm that reads the updated x (`norm_modulate(..., residual=, gate=)`).
    """
    assert x.dtype == torch.float32 and e0.dtype == torch.float32
    if ("self_attn.q.weight_scale" in w) != (cfg.quant != "bf16"):
        raise ValueError(f"the block's weights do not match quant={cfg.quant!r}: quantize them with "
                         "wanrt.quant.formats.quantize_block, or set the config's quant to the weights' scheme")
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (w["modulation"].float() + e0).chunk(6, dim=1)
    cos, sin = rope
    dtype = compute_dtype(w)
    # what the norms hand the GEMMs: fp8/int8 schemes quantized (in a Q/DQ graph the linears quantize themselves)
    act = dtype if qdq.active() else SCHEME_INFO[cfg.quant].activation_dtype or dtype
    eps = cfg.eps
    parts = spans(x.shape[1], chunk)

    k = x.new_empty(*x.shape[:2], cfg.num_heads, cfg.head_dim, dtype=dtype)
    v = torch.empty_like(k)
    for s in parts:
        h = norm_modulate(x[:, s], eps, shift_sa, scale_sa, out_dtype=act)
        k[:, s] = qk(h, w, "self_attn", "k", (cos[s], sin[s]), cfg)
        v[:, s] = heads(linear(h, w, "self_attn.v", cfg), cfg)
        del h

    # Cross-attention keys and values of the context, once per block (no modulation, no gate there).
    text = context[:, -cfg.text_len:]
    ck, cv = qk(text, w, "cross_attn", "k", None, cfg), heads(linear(text, w, "cross_attn.v", cfg), cfg)
    if cfg.model_type == "i2v":
        image = context[:, :-cfg.text_len]
        ck_img = qk(image, w, "cross_attn", "k_img", None, cfg)
        cv_img = heads(linear(image, w, "cross_attn.v_img", cfg), cfg)
    norm3 = w["norm3.weight"].float(), w["norm3.bias"].float()

    for s in parts:
        h = norm_modulate(x[:, s], eps, shift_sa, scale_sa, out_dtype=act)
        y = attention(qk(h, w, "self_attn", "q", (cos[s], sin[s]), cfg, cfg.attention), k, v, cfg.attention)
        y = linear(y, w, "self_attn.o", cfg)
        x = _writable(x)
        h = norm_modulate(x[:, s], eps, weight=norm3[0], bias=norm3[1], residual=y, gate=gate_sa, out_dtype=act)
        q = qk(h, w, "cross_attn", "q", None, cfg)
        y = attention(q, ck, cv)  # 512 (+257) keys: SDPA
        if cfg.model_type == "i2v":
            y = y + attention(q, ck_img, cv_img)
        y = linear(y, w, "cross_attn.o", cfg)
        x = _writable(x)
        h = norm_modulate(x[:, s], eps, shift_ff, scale_ff, residual=y, out_dtype=act)
        del y, q
        # Feed-forward in pieces of FFN_TOKENS: its [tokens, ffn_dim] hidden state is the block's largest activation,
        # and splitting it costs almost nothing, so larger chunks fit the same budget.
        x = _writable(x)
        xs = x[:, s]
        for f in spans(xs.shape[1], FFN_TOKENS):
            hidden = linear(token_slice(h, f), w, "ffn.0", cfg, gelu=True)
            xs[:, f].addcmul_(linear(hidden, w, "ffn.2", cfg), gate_ff)
            del hidden
    return x


class BlockGraph(nn.Module):
    """block_forward with a fixed signature for compilers: activations first, then the block's tensors in `names`
    order (weights as inputs, so one compiled graph serves every block). x is copied, not updated in place."""

    def __init__(self, cfg: DiTConfig, names: list[str]):
        super().__init__()
        self.cfg, self.names = cfg, names

    def forward(self, x, e0, context, cos, sin, *weights):
        return block_forward(x.clone(), e0, context, (cos, sin), dict(zip(self.names, weights)), self.cfg)


def _writable(x: torch.Tensor) -> torch.Tensor:
    """x, to be updated in place; under autograd (training) a copy, since backward still needs the old values."""
    return x.clone() if torch.is_grad_enabled() and x.requires_grad else x


def token_slice(h: torch.Tensor | tuple[torch.Tensor, torch.Tensor], f: slice):
    """Tokens f of an activation, or of a quantized one with its per-token scales."""
    return (h[0][:, f], h[1][:, f]) if isinstance(h, tuple) else h[:, f]


# ---------------------------------------------------------------------------------------------- embeddings & head
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32: [cos, sin] of t * 10000^(-k / (dim/2)), computed in float64 as official."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    a = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([a.cos(), a.sin()], dim=1).float()


class _Params(nn.Module):
    """A container that only names parameters; the computation lives in the functions above."""

    def __init__(self, **children: nn.Module | nn.Parameter):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def _norm_weight(dim: int) -> nn.Module:
    return _Params(weight=nn.Parameter(torch.ones(dim)))


def _attention_params(dim: int, image: bool) -> nn.Module:
    p = dict(q=nn.Linear(dim, dim), k=nn.Linear(dim, dim), v=nn.Linear(dim, dim), o=nn.Linear(dim, dim),
             norm_q=_norm_weight(dim), norm_k=_norm_weight(dim))
    if image:
        p.update(k_img=nn.Linear(dim, dim), v_img=nn.Linear(dim, dim), norm_k_img=_norm_weight(dim))
    return _Params(**p)


def _block_params(cfg: DiTConfig) -> nn.Module:
    dim = cfg.dim
    return _Params(
        modulation=nn.Parameter(torch.randn(1, 6, dim) / dim**0.5),
        self_attn=_attention_params(dim, image=False),
        cross_attn=_attention_params(dim, image=cfg.model_type == "i2v"),
        norm3=nn.LayerNorm(dim, eps=cfg.eps),
        ffn=nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)))


# Parameters that stay fp32 whatever the compute dtype: the official code runs them under fp32 autocast.
FP32_PARAMS = ("modulation", "norm", "time_embedding", "time_projection", "head.head")


def keeps_fp32(name: str) -> bool:
    return any(part in name for part in FP32_PARAMS)


class WanDiT(nn.Module):
    """Wan2.1 DiT with official parameter names. Build on the meta device and load with `assign=True` to avoid
    allocating twice; `to_inference_dtype` then casts the GEMM weights only."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.compiled_block = None  # an engine's compiled block graph (runtime/engine.py CompiledBlock), if any
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(_block_params(cfg) for _ in range(cfg.num_layers))
        out = cfg.out_dim * math.prod(cfg.patch_size)
        self.head = _Params(modulation=nn.Parameter(torch.randn(1, 2, dim) / dim**0.5), head=nn.Linear(dim, out))
        if cfg.model_type == "i2v":
            self.img_emb = _Params(proj=nn.Sequential(
                nn.LayerNorm(cfg.image_dim), nn.Linear(cfg.image_dim, cfg.image_dim), nn.GELU(),
                nn.Linear(cfg.image_dim, dim), nn.LayerNorm(dim)))

    def to_inference_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast GEMM weights to `dtype`; modulation, norms, time embedding and head stay fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def block_weights(self, i: int) -> Weights:
        return dict(self.blocks[i].named_parameters())

    # -- stages: context once per generation, then one call per denoising step
    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        """context [B, text_len, text_dim] (zero-padded text encoder output), clip_fea [B, 257, 1280] (I2V)
        -> [B, (257 +) text_len, dim] in the compute dtype."""
        cfg = self.cfg
        if context.shape[1] != cfg.text_len:
            raise ValueError(f"context must be padded to {cfg.text_len} tokens, got {context.shape[1]}")
        w = dict(self.text_embedding.named_parameters())
        ctx = linear(F.gelu(linear(context, w, "0"), approximate="tanh"), w, "2")
        if cfg.model_type == "i2v":
            if clip_fea is None:
                raise ValueError("the i2v model needs clip_fea, the CLIP features of the conditioning image")
            p = self.img_emb.proj
            h = F.layer_norm(clip_fea.float(), (cfg.image_dim,), p[0].weight.float(), p[0].bias.float(), p[0].eps)
            w = dict(p.named_parameters())
            h = linear(F.gelu(linear(h, w, "1")), w, "3")
            h = F.layer_norm(h.float(), (cfg.dim,), p[4].weight.float(), p[4].bias.float(), p[4].eps)
            ctx = torch.cat([h.to(ctx.dtype), ctx], dim=1)
        return ctx

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [S] timesteps -> e [S, dim], e0 [S, 6, dim], fp32. A whole schedule can be embedded at once."""
        w = {k: v.float() for k, v in self.time_embedding.named_parameters()}
        e = linear(F.silu(linear(sinusoidal_embedding(self.cfg.freq_dim, t), w, "0")), w, "2")
        e0 = F.linear(F.silu(e), self.time_projection[1].weight.float(), self.time_projection[1].bias.float())
        return e, e0.unflatten(1, (6, self.cfg.dim))

    def denoise(self, x: torch.Tensor, time: tuple[torch.Tensor, torch.Tensor],
                context: torch.Tensor | list[torch.Tensor], weights: Callable[[int], Weights] | None = None,
                chunk: int | None = None, runs: tuple[bool, ...] | None = None,
                residuals: list | None = None) -> torch.Tensor | list[torch.Tensor]:
        """x [B, in_dim, F, H, W] latents; time: (e, e0) from `embed_time`; context from `embed_context`, or a list of
        them (the branches of classifier-free guidance): each block is then fetched once and run on every branch's
        residual stream in turn, exactly as separate calls would, and a list of velocities comes back.
        `weights(i)` supplies block i's tensors (default: this module's own; a streamer passes its GPU slots);
        `chunk` bounds the tokens processed at once. Returns the velocity [B, out_dim, F, H, W] in fp32.

        Step caching (runtime/cache.py): `residuals` holds per branch a `Residual`, what the blocks added to the
        residual stream the last time they ran (x_out - x_in), updated here; a branch whose `runs` entry is False
        adds it instead of running the blocks, and a step where no branch runs fetches no block."""
        cfg = self.cfg
        contexts = context if isinstance(context, list) else [context]
        weights = weights or self.block_weights
        e, e0 = time
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        pe = self.patch_embedding
        tokens = F.conv3d(x.to(pe.weight.dtype), pe.weight, pe.bias, stride=cfg.patch_size)
        # [B, L, dim], the fp32 residual stream, token-major so every chunk x[:, s] is one contiguous block
        x = tokens.new_empty(tokens.shape[0], tokens[0, 0].numel(), cfg.dim, dtype=torch.float32)
        x.copy_(tokens.flatten(2).transpose(1, 2))
        del tokens
        streams = [x] + [x.clone() for _ in contexts[1:]]
        if runs is not None and residuals is None:
            raise ValueError("denoise: skipping branches (runs) needs their cached residuals")
        run = [b for b in range(len(streams)) if runs is None or runs[b]]
        for b in run if residuals is not None else ():  # x_in, made the residual below
            residuals[b].start(streams[b])
        rope = rope_tables(cfg.head_dim, grid, x.device)
        block = self.compiled_block if self.compiled_block and self.compiled_block.fits(x.shape[1], chunk) \
            else block_forward
        for i in range(cfg.num_layers if run else 0):
            w = weights(i)
            for b in run:
                streams[b] = block(streams[b], e0, contexts[b], rope, w, cfg, chunk)
        for b in range(len(streams) if residuals is not None else 0):
            if b in run:
                residuals[b].finish(streams[b])
            else:
                streams[b] = residuals[b].add_to(streams[b])
        shift, scale = (self.head.modulation.float() + e[:, None]).chunk(2, dim=1)
        head_w, head_b = self.head.head.weight.float(), self.head.head.bias.float()
        out = [unpatchify(torch.cat([F.linear(modulate(s[:, t], shift, scale, cfg.eps), head_w, head_b)
                                     for t in spans(s.shape[1], chunk)], dim=1), grid, cfg) for s in streams]
        return out if isinstance(context, list) else out[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, self.embed_time(t), self.embed_context(context, clip_fea))


def unpatchify(out: torch.Tensor, grid: tuple[int, int, int], cfg: DiTConfig) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] tokens (each laid out pt, ph, pw, C) -> [B, C, F*pt, H*ph, W*pw]."""
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    out = out.view(out.shape[0], f, h, w, pt, ph, pw, cfg.out_dim)
    return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], cfg.out_dim, f * pt, h * ph, w * pw)


def pad_context(context: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """Zero-pad trimmed text-encoder outputs [L_i, D] to [B, text_len, D], as the official WanModel does."""
    out = context[0].new_zeros(len(context), text_len, context[0].shape[-1])
    for i, c in enumerate(context):
        out[i, : c.shape[0]] = c[:text_len]
    return out


# ------------------------------------------------------------------------------------------- diffusers key mapping
_DIFFUSERS_RENAMES = [  # applied in order with str.replace; the inverse of diffusers' convert_wan_to_diffusers.py
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".scale_shift_table", ".modulation"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."),
    ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    (".norm2.", ".norm3."),  # diffusers' norm2 is the cross-attention norm, official norm3
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]
_DIFFUSERS_IGNORED = ("norm_added_q",)


def dit_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel state dict -> official WanModel names."""
    out = {}
    for key, value in state.items():
        if any(s in key for s in _DIFFUSERS_IGNORED):
            continue
        name = "head.modulation" if key == "scale_shift_table" else key
        for old, new in _DIFFUSERS_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    return out
