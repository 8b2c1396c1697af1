"""Quantized self/cross-attention for the Wan DiT: FP8 (or INT8) Q per token and smoothed K per block, and FP8 or 16-bit
P·V, in one flash-attention style Triton kernel. Non-causal, no mask; [B, L, H, D] in, [B, Lq, H*D] out (as
`wanrt.runtime.dit.attention`).

Math, per batch b and head h (queries i, keys j, D = head_dim, c = log2(e) / sqrt(D)):

    out_i = sum_j softmax_j(q_i · k_j / sqrt(D)) v_j = sum_j 2^(S_ij - m_i) v_j / sum_j 2^(S_ij - m_i)
    with S_ij = c q_i · k_j and any m_i (the kernel uses the running row max)

- Smoothing: k_j -> k_j - mean_j(k_j) (mean over all tokens, per head and channel) shifts S_ij by c q_i · mean, a
  constant per query that softmax ignores. Real keys carry a large per-channel offset; removing it gives the
  quantizer the whole range for what varies between tokens.
- Quantization of Q and K: Q per token and head, K per block of `block` tokens (default 128) per head, one fp32
  scale each,
      q_hat = round(c q / s_q),            s_q = amax_channels |c q| / QMAX
      k_hat = round((k - mean) / s_k),     s_k = amax_block |k - mean| / QMAX,     QMAX = 448 (e4m3) or 127 (int8)
  rounded half to even, so that S = (q_hat · k_hat^T) s_q s_k in base 2 (the kernel uses exp2; c is folded into q's
  scale). Per-token Q scales let Q's producer quantize it (`qk_norm_rope(..., for_attention=True)` holds one
  token's row, not a block of them), which saves the attention a pass over Q; they are also finer. K needs its mean
  over all tokens first, so it is quantized here.
- Kernel: online softmax over key blocks of BLOCK_N with fp32 row max m, row sum l and accumulator acc:
      S = dot(q_hat, k_hat^T) * s_q * s_k;  m' = max(m, rowmax S);  P = 2^(S - m');  alpha = 2^(m - m')
      l = alpha l + rowsum P;  acc = alpha acc + P·V;  finally out = acc / l.
  Keys past Lk in the last block get S = -inf; query rows past Lq get scale 0 and are not stored.
  With `lookahead`, block j+1's QK dot is issued before block j's softmax (the scores are carried one iteration).
- P·V, by mode:
      'fp8'         V in e4m3 with one scale per head and channel (s_v = amax over tokens |v| / 448). P is computed as
                    2^(S - m' + 8) <= 256, so it uses the e4m3 range, and cast to e4m3; the 2^8 cancels in acc / l and
                    s_v is applied in the epilogue. Each block's fp8 product is added to acc in fp32 (on sm_90 Triton
                    keeps `acc + dot(p, v)` apart for fp8 operands, so Hopper's reduced-precision fp8 accumulation
                    covers one block only).
      'fp8_bf16pv'  fp8 QK; V as given (bf16/fp16) and P cast to V's dtype.
      'int8'        int8 QK (sm_80+); V as given and P cast to V's dtype (the SageAttention-1 recipe).
      'int8_fp8pv'  int8 QK, fp8 P·V as in 'fp8' (sm_89+; SageAttention-2's recipe). int8 and e4m3 dots run at the
                    same rate on sm_89/sm_90, and on Gaussian inputs int8 QK errs about 3x less than e4m3 QK (its 7
                    bits beat e4m3's 3 mantissa bits once the block's scale is set).

Layouts (padding to whole scale blocks lets every K and fp8 V tile load run unmasked):
- quantized q: [B, Lq, H, D] contiguous (as q itself: its producer writes each token's row whole), scales [B, Lq, H]
  fp32. The kernels load a head's Q tile as rows of stride H*D; rows past Lq are not stored.
- quantized k: [B, H, Lk_pad, D] contiguous, Lk_pad = ceil(Lk / block) * block, padded rows are zero; scales
  [B, H, Lk_pad / block] fp32.
- quantized v ('fp8', 'int8_fp8pv'): [B, H, D, Lk_pad] contiguous (V^T: tokens contiguous, as Hopper's fp8 wgmma
  wants its B operand K-major), padded columns zero; scales [B, H, D] fp32. Within each 16 tokens the columns are in
  the P·V key order (`pv_key_order`), not token order.
- P·V key order: a thread holds the scores of keys 8a + 2t + b (+16g) of its rows (the accumulator layout of
  the QK dot, t = lane % 4), while an 8-bit A operand wants keys 4t + i in the same thread. Since P·V sums over keys in
  any order, the kernel relabels P's keys 8a + 2t + b -> 4t + 2a + b (a free reshape and permute of registers) and V
  is stored in that order. Otherwise each key block pays for a shuffle across lanes (16 SHFL, 16 SEL and 16 PRMT per
  thread), and the registers it takes leave room for two 64-row programs per H100 SM instead of three
  (tests/test_attention_compile.py checks both on the sm_90 SASS).
- output: [B, Lq, H*D] in v's dtype, written token-major so the output projection reads it without a transpose.

References: FlashAttention-2 (Dao, 2023); SageAttention 1/2 (Zhang et al., arXiv 2410.02367, 2411.10958) for smoothed
K and per-block scales; Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from wanrt.kernels import attention_sm90
from wanrt.kernels.dispatch import ADA, AMPERE, HOPPER, capability, has_triton
from wanrt.kernels.norm_modulate import AMAX_FLOOR, QMAX, format_args, quantize_rows_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path needs no Triton
    triton = None

MODES = ("sdpa", "fp8", "fp8_bf16pv", "int8", "int8_fp8pv")
MIN_CAPABILITY = {"fp8": ADA, "fp8_bf16pv": ADA, "int8": AMPERE, "int8_fp8pv": ADA}
QK_DTYPE = {"fp8": torch.float8_e4m3fn, "fp8_bf16pv": torch.float8_e4m3fn, "int8": torch.int8,
            "int8_fp8pv": torch.int8}
FP8_PV_MODES = ("fp8", "int8_fp8pv")
HEAD_DIMS = (32, 64, 128, 256)  # powers of two (tl.arange) and multiples of 32 (K of an fp8/int8 dot)
FP8_MAX = QMAX[torch.float8_e4m3fn]
LOG2E = 1.4426950408889634
P_LOG2_FP8 = 8.0  # 'fp8': P = 2^(S - m + 8) <= 256 < 448; exact powers of two keep the cast from overflowing
SCALE_BLOCK = 128  # tokens per K scale
PV_GROUP = 16  # tokens per group of the P·V key order
Q_ROWS = 64  # tokens per program of `quantize_q` (Q's scales are per token: any block works)


# ---------------------------------------------------------------------------------------------------------------------
# Reference


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA in v's dtype: q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H*D] (exactly runtime.dit.attention)."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return y.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch settings of the attention kernel. `tma` loads Q/K/V tiles through host-built tensor
    descriptors (sm_90+) instead of pointer loads. `lookahead` issues the next key block's QK dot before this block's
    softmax (Triton still waits for it at once, so this only reorders). `gluon` runs the Gluon kernel of
    `attention_sm90` instead (sm_90, fp8 P·V modes, D = 128, 64x128 tiles per warpgroup, three warpgroups sharing
    num_stages K/V slots)."""
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = False
    lookahead: bool = False
    gluon: bool = False

    def describe(self) -> str:
        extra = [name for name, on in (("tma", self.tma), ("ahead", self.lookahead), ("gluon", self.gluon)) if on]
        return "/".join([f"BM{self.block_m}/BN{self.block_n}/w{self.num_warps}/s{self.num_stages}", *extra])


# Chosen ahead, no run-time autotuning (H100 sweeps: bench/results/attention_h100_sweep_*.md, kernel alone at 1.3B
# 480p). With fp8 P·V the best Hopper tiles are 64 query rows per program in one warpgroup (4 warps) with TMA loads:
# programs share an SM, so one's softmax runs while another's dots do (8.13 ms int8_fp8pv, 8.54 ms fp8, against 9.86 and
# 9.27 ms for 128 rows in two warpgroups). With V in the P·V key order the kernel fits 168 registers and three programs
# share an SM (fp8 7.74 ms against 8.19 ms with two: attention_h100.md as of commit f9432b7). With 16-bit P·V the larger
# P tile favours 128 rows; int8 QK there gains from `lookahead` (11.47 against 12.34 ms at 4 and 3 stages; 11.64 at 3
# stages). Shared memory per stage at D=128 is 32 KiB (fp8 K + V) or 48 KiB (fp8 K + bf16 V), within sm_90's 227 KiB.
# Ada (99 KiB per block) and Ampere get narrower key blocks and fewer stages. The Gluon kernel (`attention_sm90`: three
# such warpgroups in one program sharing 4 K/V slots) beats it in both fp8 P·V modes at every H100 self-attention shape
# (1.3B 480p: fp8 7.01 against 7.72 ms, int8_fp8pv 7.11 against 7.94 ms; 14B and 720p 10-14% faster: attention_h100.md).
# Where it cannot run, `default_config` takes TRITON_FP8_PV_SM90. Pass `config=` to override (bench sweeps).
TRITON_FP8_PV_SM90 = AttnConfig(64, 128, 4, 2, tma=True)
CONFIGS = {
    ("sm90", "fp8"): AttnConfig(64, 128, 4, attention_sm90.STAGES, gluon=True),
    ("sm90", "fp8_bf16pv"): AttnConfig(128, 128, 8, 3),
    ("sm90", "int8"): AttnConfig(128, 128, 8, 4, lookahead=True),
    ("sm90", "int8_fp8pv"): AttnConfig(64, 128, 4, attention_sm90.STAGES, gluon=True),
    ("sm89", "fp8"): AttnConfig(128, 64, 4, 2),
    ("sm89", "fp8_bf16pv"): AttnConfig(128, 64, 4, 2),
    ("sm89", "int8"): AttnConfig(128, 64, 4, 2),
    ("sm89", "int8_fp8pv"): AttnConfig(128, 64, 4, 2),
    ("sm80", "int8"): AttnConfig(128, 64, 4, 3),
}


def default_config(mode: str, head_dim: int, cap: tuple[int, int] | None = HOPPER,
                   block: int = SCALE_BLOCK) -> AttnConfig:
    """The table entry for this mode on this GPU; head_dim 256 halves the key block to bound registers and memory.
    Where the Gluon kernel cannot run (not sm_90 itself, head_dim other than 128, scale blocks not a multiple of 128
    tokens, no Gluon, the interpreter), its entry gives way to the Triton kernel."""
    arch = "sm90" if cap is None or cap >= HOPPER else "sm89" if cap >= ADA else "sm80"
    cfg = CONFIGS.get((arch, mode)) or CONFIGS["sm89", mode]  # fp8 modes never launch below sm_89
    if cfg.gluon and not (cap == HOPPER and attention_sm90.supports(head_dim, block) and not _interpreting()):
        cfg = TRITON_FP8_PV_SM90
    if head_dim > 128:
        cfg = AttnConfig(cfg.block_m, 64, cfg.num_warps, 2, cfg.tma)
    return cfg


def check_mode(mode: str, cap: tuple[int, int] | None) -> None:
    """Raise ValueError when `mode` is unknown or needs a newer GPU than `cap` ((major, minor); None: no CUDA)."""
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    if mode == "sdpa" or cap is None:
        return
    need = MIN_CAPABILITY[mode]
    if cap < need:
        raise ValueError(f"attention mode {mode!r} needs a GPU of compute capability >= {need[0]}.{need[1]}, "
                         f"this one is {cap[0]}.{cap[1]}")


# ---------------------------------------------------------------------------------------------------------------------
# Quantization


class QuantizedQ(NamedTuple):
    """Q as the kernels read it: c·q (softmax scale and log2(e) folded in) quantized per token and head."""
    q: torch.Tensor      # [B, Lq, H, D] fp8 e4m3 or int8, contiguous
    scale: torch.Tensor  # [B, Lq, H] fp32


class QuantizedQK(NamedTuple):
    """Quantized Q and smoothed K, K padded to whole scale blocks (layouts: module docstring)."""
    q: torch.Tensor        # [B, Lq, H, D] fp8 e4m3 or int8
    q_scale: torch.Tensor  # [B, Lq, H] fp32, per token and head
    k: torch.Tensor        # [B, H, Lk_pad, D]
    k_scale: torch.Tensor  # [B, H, Lk_pad / block] fp32, per block
    lq: int
    lk: int
    block: int


class QuantizedV(NamedTuple):
    v: torch.Tensor        # [B, H, D, Lk_pad] fp8 e4m3 (V^T)
    scale: torch.Tensor    # [B, H, D] fp32
    lk: int


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in QMAX:
        raise ValueError(f"quantized dtype must be torch.float8_e4m3fn or torch.int8, got {dtype}")


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def query_multiplier(head_dim: int) -> float:
    """c = log2(e) / sqrt(D): the softmax scale in base 2, folded into quantized Q."""
    return LOG2E / math.sqrt(head_dim)


def _key_mean(k: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, D] fp32 mean over tokens."""
    return k.mean(dim=1, dtype=torch.float32).contiguous()


def _value_max(v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, D] fp32 max |v| over tokens (amax and amin: no full-size |v| temporary)."""
    return torch.maximum(v.amax(dim=1), -v.amin(dim=1)).float().clamp_min(1e-20).contiguous()


def quantize_q_ref(q: torch.Tensor, dtype: torch.dtype) -> QuantizedQ:
    """PyTorch twin of `quantize_q` (and of `qk_norm_rope(..., for_attention=True)` on its fp32 result): q
    [B, L, H, D] -> c·q per token and head, `quantize_rows_reference`'s arithmetic."""
    _check_dtype(dtype)
    return QuantizedQ(*quantize_rows_reference(q.float() * query_multiplier(q.shape[-1]), dtype))


def quantize_k_ref(k: torch.Tensor, dtype: torch.dtype, block: int = SCALE_BLOCK,
                   smooth: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of `quantize_k`: k [B, L, H, D] -> (k - mean per head and channel) [B, H, L_pad, D] with one scale
    per block of `block` tokens [B, H, L_pad / block] (`quantize_rows_reference` over each block)."""
    _check_dtype(dtype)
    B, L, H, D = k.shape
    x = k.float() - _key_mean(k)[:, None] if smooth else k.float()
    x = F.pad(x.transpose(1, 2), (0, 0, 0, _padded(L, block) - L))
    kq, scale = quantize_rows_reference(x.reshape(B, H, -1, block * D), dtype)  # F.pad may return x itself
    return kq.view(B, H, -1, D), scale.contiguous()


def quantize_qk_ref(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, block: int = SCALE_BLOCK,
                    smooth_k: bool = True) -> QuantizedQK:
    """PyTorch twin of `quantize_qk` (same layouts, same arithmetic)."""
    return QuantizedQK(*quantize_q_ref(q, dtype), *quantize_k_ref(k, dtype, block, smooth_k), q.shape[1], k.shape[1],
                       block)


def pv_key_order(n: int, device=None) -> torch.Tensor:
    """The token held by each of n (a multiple of 16) columns of a quantized V^T: column 4t + 2a + b of a group of 16
    holds token 8a + 2t + b (module docstring)."""
    col = torch.arange(n, device=device)
    t, a, b = (col >> 2) & 3, (col >> 1) & 1, col & 1
    return (col & -PV_GROUP) | (a << 3) | (t << 1) | b


def quantize_v_ref(v: torch.Tensor, block: int = SCALE_BLOCK) -> QuantizedV:
    """PyTorch twin of `quantize_v`: [B, L, H, D] -> e4m3 V^T [B, H, D, L_pad] in the P·V key order, with per
    head-and-channel scales."""
    B, L, H, D = v.shape
    vmax = _value_max(v)  # [B, H, D]
    x = (v.float().permute(0, 2, 3, 1) * (vmax.new_tensor(FP8_MAX) / vmax[..., None])).clamp(-FP8_MAX, FP8_MAX)
    x = F.pad(x, (0, _padded(L, block) - L))
    x = x[..., pv_key_order(x.shape[-1], x.device)].to(torch.float8_e4m3fn).contiguous()
    return QuantizedV(x, (vmax / FP8_MAX).contiguous(), L)


def dequantize_v(qv: QuantizedV) -> torch.Tensor:
    """fp32 [B, H, Lk, D] of v as the kernel sees it (token order, padding cut)."""
    x = torch.empty_like(qv.v, dtype=torch.float32)
    x[..., pv_key_order(x.shape[-1], x.device)] = qv.v.float() * qv.scale[..., None]
    return x[..., :qv.lk].transpose(-1, -2)


def dequantize_qk(qk: QuantizedQK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [B, H, L, D] of c·q and (k - mean) as the kernel sees them (padding cut)."""
    q = (qk.q.float() * qk.q_scale[..., None]).transpose(1, 2)
    k = (qk.k.float().unflatten(2, (-1, qk.block)) * qk.k_scale[..., None, None]).flatten(2, 3)[:, :, :qk.lk]
    return q, k


def attention_quantized_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, block: int = SCALE_BLOCK,
                            smooth_k: bool = True) -> torch.Tensor:
    """The kernel's arithmetic in fp32 PyTorch on the dequantized inputs (P itself not rounded): [B, Lq, H*D] fp32."""
    check_mode(mode, None)
    qq, kq = dequantize_qk(quantize_qk_ref(q, k, QK_DTYPE[mode], block, smooth_k))
    if mode in FP8_PV_MODES:
        vv = dequantize_v(quantize_v_ref(v, block))
    else:
        vv = v.float().transpose(1, 2)
    p = torch.softmax((qq @ kq.transpose(-1, -2)) / LOG2E, dim=-1)  # S is in base 2
    return (p @ vv).transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _round_mantissa(x, BITS: tl.constexpr, MIN_EXP: tl.constexpr):
        """x rounded to nearest even on a float grid with BITS mantissa bits and smallest normal 2^MIN_EXP.
        Interpreter only: its float casts truncate, while the GPU's cvt rounds to nearest even; a value already on
        the grid casts exactly."""
        ulp = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(x), 2.0**MIN_EXP))) - BITS)
        y = x / ulp
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # ties to even
        return r * ulp

    @triton.jit
    def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 -> e4m3 / bf16 / other, rounding to nearest also under the interpreter (see _round_mantissa)."""
        if INTERPRET:
            if dtype == tl.float8e4nv:
                x = _round_mantissa(x, 3, -6)
            elif dtype == tl.bfloat16:
                x = _round_mantissa(x, 7, -126)
        return x.to(dtype)

    from wanrt.kernels.norm_modulate import _quantize, _round_to_format, _token_scale

    @triton.jit
    def _quantize_rows_kernel(X, Mean, Out, Scale, L, H, stride_xb, stride_xl, stride_xh, stride_ob, stride_ol,
                              stride_oh, MULT: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                              SMOOTH: tl.constexpr, PER_TOKEN: tl.constexpr, QMAX: tl.constexpr,
                              AMAX_FLOOR: tl.constexpr, DROP_BITS: tl.constexpr, FIXED_BELOW: tl.constexpr,
                              FIXED_MAGIC: tl.constexpr):
        """One block of BLOCK tokens of one head: X [B, L, H, D] (any float) -> Out (strides given), quantized
        with a scale per token (PER_TOKEN, q: Out [B, L, H, D], Scale [B, L, H], rows past L not written) or per
        block (k: Out [B, H, L_pad, D] with zero padding, Scale [B, H, L_pad / BLOCK]); SMOOTH subtracts Mean
        [B, H, D] first, MULT multiplies after (q: log2(e)/sqrt(D)). Arithmetic of `quantize_rows_reference`."""
        blk = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_l = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        valid = offs_l < L
        x = tl.load(X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        if SMOOTH:  # a constexpr, so the `if` is compiled out for Q
            x = tl.where(valid[:, None], x - tl.load(Mean + bh * D + offs_d)[None, :], 0.0)
        x = x * MULT
        if PER_TOKEN:
            scale = _token_scale(tl.max(tl.abs(x), 1), QMAX, AMAX_FLOOR)
            tl.store(Scale + (b * L + offs_l) * H + h, scale, mask=valid)
            x = _quantize(x, scale[:, None], QMAX)
        else:
            scale = _token_scale(tl.max(tl.abs(x)), QMAX, AMAX_FLOOR)
            tl.store(Scale + bh * tl.num_programs(0) + blk, scale)
            x = _quantize(x, scale, QMAX)
        x = _round_to_format(x, DROP_BITS, FIXED_BELOW, FIXED_MAGIC)  # so the cast is exact (interpreter included)
        out = Out + b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :]
        if PER_TOKEN:
            tl.store(out, x.to(Out.dtype.element_ty), mask=valid[:, None])
        else:  # the zero padding too
            tl.store(out, x.to(Out.dtype.element_ty))

    @triton.jit
    def _quantize_v_kernel(V, Vmax, Out, L, L_pad, H, stride_vb, stride_vl, stride_vh, D: tl.constexpr,
                           BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        """One block of BLOCK tokens of one head: V [B, L, H, D] -> e4m3 Out [B, H, D, L_pad] (V^T in the P·V key
        order), scaled by 448 / Vmax [B, H, D] per channel."""
        blk = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_l = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        x = tl.load(V + b * stride_vb + h * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :],
                    mask=offs_l[:, None] < L, other=0.0).to(tl.float32)
        inv = 448.0 / tl.load(Vmax + bh * D + offs_d)
        x = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
        # token 8a + 2t + b of each group of 16 goes to column 4t + 2a + b (pv_key_order)
        col = (offs_l & -16) | (((offs_l >> 1) & 3) << 2) | (((offs_l >> 3) & 1) << 1) | (offs_l & 1)
        tl.store(Out + (bh * D + offs_d)[None, :] * L_pad + col[:, None], _cast(x, tl.float8e4nv, INTERPRET))

    @triton.jit
    def _pv_key_order(p, BLOCK_N: tl.constexpr):
        """P [BLOCK_M, BLOCK_N] with its keys relabelled 8a + 2t + b -> 4t + 2a + b in each group of 16 (module
        docstring): on the GPU a renaming of registers, after which P is already in the 8-bit A-operand layout."""
        p = p.reshape(p.shape[0], BLOCK_N // 16, 2, 4, 2).permute(0, 1, 3, 2, 4)
        return p.reshape(p.shape[0], BLOCK_N)

    @triton.jit
    def _qk_dot(q, K, start_n, k_row, offs_n, offs_d, D: tl.constexpr, TMA: tl.constexpr):
        """Raw scores of one key block: q_hat · k_hat^T, [BLOCK_M, BLOCK_N] fp32 (int32 for int8 operands)."""
        if TMA:
            k = K.load([k_row + start_n, 0])  # [BLOCK_N, D]
        else:
            k = tl.load(K + (start_n + offs_n)[:, None] * D + offs_d[None, :])
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _attn_update(acc, l_i, m_i, qk, qs, V, KS, start_n, Lk, Lk_pad, v_row, b, h, stride_vl,
                     offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                     P_SHIFT: tl.constexpr, PV_FP8: tl.constexpr, TMA: tl.constexpr, MASK: tl.constexpr,
                     INTERPRET: tl.constexpr):
        """The online-softmax step of key block [start_n, start_n + BLOCK_N) given its raw scores `qk`; MASK: keys
        past Lk score -inf."""
        s = qs * tl.load(KS + start_n // SCALE_BLOCK)  # [BLOCK_M]: Q's scales are per token
        qk = qk.to(tl.float32)
        if MASK:
            qk = tl.where((start_n + offs_n)[None, :] < Lk, qk * s[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - (m_new - P_SHIFT)[:, None])
        else:  # s > 0, so max(qk * s) = max(qk) * s and the scale folds into one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * s)
            p = tl.math.exp2(qk * s[:, None] - (m_new - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            if TMA:
                vt = V.load([v_row, start_n])  # [D, BLOCK_N]
            else:
                vt = tl.load(V + offs_d[:, None] * Lk_pad + (start_n + offs_n)[None, :])
            # a separate fp32 add: keeps fp8 accumulation (reduced precision on sm_90) to one block
            p8 = _cast(_pv_key_order(p, BLOCK_N), tl.float8e4nv, INTERPRET)
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
        else:
            if TMA:
                v = V.load([b, start_n, h, 0]).reshape(BLOCK_N, D)  # zero-filled past Lk
            elif MASK:
                v = tl.load(V + (start_n + offs_n)[:, None] * stride_vl + offs_d[None, :],
                            mask=(start_n + offs_n)[:, None] < Lk, other=0.0)
            else:
                v = tl.load(V + (start_n + offs_n)[:, None] * stride_vl + offs_d[None, :])
            if INTERPRET:  # numpy multiplies bf16 (stored as uint16) as integers: widen both operands
                acc = tl.dot(_cast(p, v.dtype, True).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, QS, KS, VS, Out, Lq, Lk, Lk_pad, H, stride_vb, stride_vl, stride_vh,
                         stride_ob, stride_ol, stride_oh, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr, P_SHIFT: tl.constexpr,
                         PV_FP8: tl.constexpr, TMA: tl.constexpr, HAS_TAIL: tl.constexpr, LOOKAHEAD: tl.constexpr,
                         INTERPRET: tl.constexpr):
        """One program = BLOCK_M queries of one head. Q: quantized [B, Lq, H, D], K: quantized [B, H, Lk_pad, D]
        (or their 2-D TMA descriptors: [B*Lq, H*D] and [B*H*Lk_pad, D]); V: e4m3 V^T [B, H, D, Lk_pad] (PV_FP8) or
        the caller's [B, Lk, H, D] (a 4-D descriptor under TMA); QS: Q's scales [B, Lq, H]; KS: K's per-block
        scales; VS: per-channel V scales [B, H, D] (PV_FP8 only); Out: [B, Lq, H*D]."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b32 = tl.program_id(2)
        b = b32.to(tl.int64)
        bh = b * H + h
        bh32 = b32 * H + h  # TMA coordinates are int32
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if TMA:
            q = Q.load([b32 * Lq + pid_m * BLOCK_M, h * D])  # rows past Lq: the next batch's or zeros, not stored
        else:
            q = tl.load(Q + ((b * Lq + offs_m[:, None]) * H + h) * D + offs_d[None, :], mask=offs_m[:, None] < Lq,
                        other=0.0)
        qs = tl.load(QS + (b * Lq + offs_m) * H + h, mask=offs_m < Lq, other=0.0)  # rows past Lq: scores 0
        KS = KS + bh * (Lk_pad // SCALE_BLOCK)
        k_row = bh32 * Lk_pad
        v_row = bh32 * D
        if not TMA:
            K = K + bh * Lk_pad * D
            if PV_FP8:
                V = V + bh * D * Lk_pad
            else:
                V = V + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = (Lk // BLOCK_N) * BLOCK_N
        if LOOKAHEAD:  # the next block's QK dot is issued before this block's softmax, so the two can overlap
            qk = _qk_dot(q, K, 0, k_row, offs_n, offs_d, D, TMA)  # block 0 exists even when n_full = 0 (padding)
            for start_n in range(0, n_full - BLOCK_N, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                qk_next = _qk_dot(q, K, start_n + BLOCK_N, k_row, offs_n, offs_d, D, TMA)
                acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, qs, V, KS, start_n, Lk, Lk_pad, v_row, b32, h,
                                             stride_vl, offs_n, offs_d, D, BLOCK_N, SCALE_BLOCK, P_SHIFT, PV_FP8, TMA,
                                             False, INTERPRET)
                qk = qk_next
            if n_full > 0:
                acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, qs, V, KS, n_full - BLOCK_N, Lk, Lk_pad, v_row, b32,
                                             h, stride_vl, offs_n, offs_d, D, BLOCK_N, SCALE_BLOCK, P_SHIFT, PV_FP8,
                                             TMA, False, INTERPRET)
        else:
            for start_n in range(0, n_full, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                qk = _qk_dot(q, K, start_n, k_row, offs_n, offs_d, D, TMA)
                acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, qs, V, KS, start_n, Lk, Lk_pad, v_row, b32, h,
                                             stride_vl, offs_n, offs_d, D, BLOCK_N, SCALE_BLOCK, P_SHIFT, PV_FP8, TMA,
                                             False, INTERPRET)
        if HAS_TAIL:
            qk = _qk_dot(q, K, n_full, k_row, offs_n, offs_d, D, TMA)
            acc, l_i, m_i = _attn_update(acc, l_i, m_i, qk, qs, V, KS, n_full, Lk, Lk_pad, v_row, b32, h, stride_vl,
                                         offs_n, offs_d, D, BLOCK_N, SCALE_BLOCK, P_SHIFT, PV_FP8, TMA, True,
                                         INTERPRET)
        acc = acc * (1.0 / l_i)[:, None]
        if PV_FP8:
            acc = acc * tl.load(VS + bh * D + offs_d)[None, :]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        tl.store(o_ptrs, _cast(acc, Out.dtype.element_ty, INTERPRET), mask=offs_m[:, None] < Lq)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_block(block: int) -> None:
    if block & (block - 1) or block < PV_GROUP:
        raise ValueError(f"block must be a power of two >= {PV_GROUP}, got {block}")


def _require_triton() -> None:
    if triton is None:
        raise ValueError("the quantized attention kernels need Triton, which is not installed")


def quantize_q(q: torch.Tensor, dtype: torch.dtype) -> QuantizedQ:
    """Triton: q [B, Lq, H, D] (any float dtype) -> c·q quantized per token and head, in q's layout. dtype:
    torch.float8_e4m3fn (sm_89+) or torch.int8 (sm_80+)."""
    _require_triton()
    _check_dtype(dtype)
    q = _last_dim_contiguous(q)
    B, L, H, D = q.shape
    out = torch.empty(B, L, H, D, dtype=dtype, device=q.device)
    scale = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
    _quantize_rows_kernel[(triton.cdiv(L, Q_ROWS), H, B)](
        q, scale, out, scale, L, H, *q.stride()[:3], *out.stride()[:3], MULT=query_multiplier(D), D=D, BLOCK=Q_ROWS,
        SMOOTH=False, PER_TOKEN=True, QMAX=QMAX[dtype], AMAX_FLOOR=AMAX_FLOOR, **format_args(dtype), num_warps=4)
    return QuantizedQ(out, scale)


def quantize_k(k: torch.Tensor, dtype: torch.dtype, block: int = SCALE_BLOCK,
               smooth: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: k [B, Lk, H, D] -> (k_hat [B, H, Lk_pad, D] zero padded, one scale per `block` tokens
    [B, H, Lk_pad / block]); smoothed (its per head-and-channel mean over tokens subtracted) unless smooth=False."""
    _require_triton()
    _check_dtype(dtype)
    _check_block(block)
    k = _last_dim_contiguous(k)
    B, L, H, D = k.shape
    L_pad = _padded(L, block)
    out = torch.empty(B, H, L_pad, D, dtype=dtype, device=k.device)
    scale = torch.empty(B, H, L_pad // block, dtype=torch.float32, device=k.device)
    mean = _key_mean(k) if smooth else None
    _quantize_rows_kernel[(L_pad // block, H, B)](
        k, mean if smooth else scale, out, scale, L, H, *k.stride()[:3], out.stride(0), out.stride(2),
        out.stride(1), MULT=1.0, D=D, BLOCK=block, SMOOTH=smooth, PER_TOKEN=False, QMAX=QMAX[dtype],
        AMAX_FLOOR=AMAX_FLOOR, **format_args(dtype), num_warps=4)
    return out, scale


def quantize_qk(q: torch.Tensor | QuantizedQ, k: torch.Tensor, dtype: torch.dtype, block: int = SCALE_BLOCK,
                smooth_k: bool = True) -> QuantizedQK:
    """Triton: `quantize_q` and `quantize_k` (layouts: module docstring); q may come quantized already (by its
    producer), in `dtype`."""
    if not isinstance(q, QuantizedQ):
        q = quantize_q(q, dtype)
    elif q.q.dtype != dtype or q.q.shape[:3] != q.scale.shape or not q.q.is_contiguous():
        raise ValueError(f"a quantized q must be a contiguous {dtype} [B, Lq, H, D] with scales [B, Lq, H], got "
                         f"{q.q.dtype} {tuple(q.q.shape)} with scales {tuple(q.scale.shape)}")
    return QuantizedQK(*q, *quantize_k(k, dtype, block, smooth_k), q.q.shape[1], k.shape[1], block)


def quantize_v(v: torch.Tensor, block: int = SCALE_BLOCK) -> QuantizedV:
    """Triton: v [B, L, H, D] -> e4m3 V^T [B, H, D, L_pad] (L_pad a multiple of `block`, zero padded; columns in the
    P·V key order, `pv_key_order`) and per head-and-channel fp32 scales [B, H, D]."""
    _require_triton()
    _check_block(block)
    v = _last_dim_contiguous(v)
    B, L, H, D = v.shape
    L_pad = _padded(L, block)
    vmax = _value_max(v)
    out = torch.empty(B, H, D, L_pad, dtype=torch.float8_e4m3fn, device=v.device)
    _quantize_v_kernel[(L_pad // block, H, B)](v, vmax, out, L, L_pad, H, v.stride(0), v.stride(1), v.stride(2), D=D,
                                                BLOCK=block, INTERPRET=_interpreting(), num_warps=4)
    return QuantizedV(out, vmax / FP8_MAX, L)


def _check_config(cfg: AttnConfig, block: int, D: int) -> None:
    if cfg.gluon and (cfg.block_m, cfg.block_n, cfg.num_warps) != (attention_sm90.BLOCK_M, attention_sm90.BLOCK_N,
                                                                   attention_sm90.NUM_WARPS):
        raise ValueError(f"a gluon config has 64x128 tiles and 4 warps, got {cfg.describe()}")
    for name, n, lo in (("block_m", cfg.block_m, 16), ("block_n", cfg.block_n, 32)):
        if n & (n - 1) or n < lo or block % n:
            raise ValueError(f"{name} must be a power of two >= {lo} dividing the scale block {block}, got {n}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {D}")


def attention_kernel(qk: QuantizedQK, v: torch.Tensor | QuantizedV, config: AttnConfig,
                     out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The attention kernel alone on quantized Q/K: `v` is a QuantizedV (fp8 P·V) or the caller's [B, Lk, H, D]
    bf16/fp16 tensor (P cast to its dtype). Returns out [B, Lq, H*D] (written in place when given; else v's dtype, or
    out_dtype for a QuantizedV)."""
    _require_triton()
    B, Lq, H, D = qk.q.shape
    Lk_pad = qk.k.shape[2]
    _check_config(config, qk.block, D)
    pv_fp8 = isinstance(v, QuantizedV)
    if pv_fp8:
        vs = v.scale
        v_arg, strides = v.v, (0, 0, 0)
    else:
        if v.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"v must be bf16 or fp16 for a 16-bit P·V, got {v.dtype}")
        v = _last_dim_contiguous(v)
        if v.shape != (B, qk.lk, H, D):
            raise ValueError(f"v must be [B, Lk, H, D] = {(B, qk.lk, H, D)}, got {tuple(v.shape)}")
        vs, v_arg, strides = qk.q_scale, v, (v.stride(0), v.stride(1), v.stride(2))
        out_dtype = v.dtype
    if out is None:
        out = torch.empty(B, qk.lq, H * D, dtype=out_dtype, device=qk.q.device)
    elif out.shape != (B, qk.lq, H * D) or out.stride(-1) != 1 or out.stride(1) != H * D:
        raise ValueError(f"out must be a [B, Lq, H*D] = {(B, qk.lq, H * D)} tensor with rows of H*D contiguous "
                         f"values, got {tuple(out.shape)} with strides {out.stride()}")
    if config.gluon:
        if not pv_fp8 or not attention_sm90.supports(D, qk.block):
            raise ValueError("the gluon kernel needs fp8 P·V, head_dim 128, scale blocks of a multiple of 128 tokens "
                             "and a Triton with Gluon")
        return attention_sm90.attention_kernel_sm90(qk, v, out, P_LOG2_FP8, config.num_stages)
    q_arg, k_arg = qk.q, qk.k
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        q_arg = TensorDescriptor.from_tensor(qk.q.view(B * Lq, H * D), [config.block_m, D])
        k_arg = TensorDescriptor.from_tensor(qk.k.view(B * H * Lk_pad, D), [config.block_n, D])
        if pv_fp8:
            v_arg = TensorDescriptor.from_tensor(v.v.view(B * H * D, Lk_pad), [D, config.block_n])
        else:
            if v.data_ptr() % 16 or any(s * v.element_size() % 16 for s in v.stride()[:-1]):
                raise ValueError("config.tma needs v with a 16-byte aligned base and strides (TMA); use tma=False")
            v_arg = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, config.block_n, 1, D])
    grid = (triton.cdiv(qk.lq, config.block_m), H, B)
    _attn_fwd_kernel[grid](
        q_arg, k_arg, v_arg, qk.q_scale, qk.k_scale, vs, out, qk.lq, qk.lk, Lk_pad, H, *strides,
        out.stride(0), out.stride(1), D, D=D, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        SCALE_BLOCK=qk.block, P_SHIFT=P_LOG2_FP8 if pv_fp8 else 0.0, PV_FP8=pv_fp8, TMA=config.tma,
        HAS_TAIL=qk.lk % config.block_n != 0, LOOKAHEAD=config.lookahead, INTERPRET=_interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def _query_shape(q: torch.Tensor | QuantizedQ) -> tuple[int, ...]:
    """[B, Lq, H, D] of q, or of the q a QuantizedQ holds."""
    return tuple((q.q if isinstance(q, QuantizedQ) else q).shape)


def _check_inputs(q: torch.Tensor | QuantizedQ, k: torch.Tensor, v: torch.Tensor) -> None:
    shape = _query_shape(q)
    if len(shape) != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention takes q [B, Lq, H, D] and k, v [B, Lk, H, D], got {shape}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if shape[0] != k.shape[0] or shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must agree on B, H and D, got {shape} and {tuple(k.shape)}")
    if shape[1] == 0 or k.shape[1] == 0:
        raise ValueError("attention needs at least one query and one key")


def attention_quantized(q: torch.Tensor | QuantizedQ, k: torch.Tensor, v: torch.Tensor, mode: str,
                        config: AttnConfig | None = None, out: torch.Tensor | None = None, block: int = SCALE_BLOCK,
                        smooth_k: bool = True) -> torch.Tensor:
    """Quantize and run the kernel (no device or capability checks: `attention` does those; CPU tests call this under
    TRITON_INTERPRET=1). q [B, Lq, H, D] or already quantized (a QuantizedQ in the mode's QK dtype), k and v
    [B, Lk, H, D], v bf16/fp16 -> [B, Lq, H*D] in v's dtype."""
    _check_inputs(q, k, v)
    check_mode(mode, None)
    if mode == "sdpa":
        raise ValueError("attention_quantized runs the quantized modes; use attention_reference for 'sdpa'")
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantized attention takes bf16 or fp16 v, got {v.dtype}")
    D = k.shape[-1]
    config = config or default_config(mode, D, capability(k.device), block)
    _check_config(config, block, D)
    qk = quantize_qk(q, k, QK_DTYPE[mode], block, smooth_k)
    vv = quantize_v(v, block) if mode in FP8_PV_MODES else v
    return attention_kernel(qk, vv, config, out=out, out_dtype=v.dtype)


@torch.library.custom_op("wanrt::quantized_attention", mutates_args=())
def quantized_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, block_m: int, block_n: int,
                           num_warps: int, num_stages: int, tma: bool, lookahead: bool, gluon: bool,
                           q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`attention_quantized` (128-token scale blocks) as one opaque op: torch.compile(fullgraph=True) keeps it whole
    in a compiled DiT block instead of tracing the launcher. With q_scale, q is quantized already: QuantizedQ(q,
    q_scale)."""
    if q_scale is not None:
        q = QuantizedQ(q, q_scale)
    return attention_quantized(q, k, v, mode,
                               AttnConfig(block_m, block_n, num_warps, num_stages, tma, lookahead, gluon))


@quantized_attention_op.register_fake
def _(q, k, v, mode, block_m, block_n, num_warps, num_stages, tma, lookahead, gluon, q_scale=None):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]), dtype=v.dtype)


def quantizes_query(mode: str, x: torch.Tensor) -> bool:
    """Whether `attention` in this mode runs a kernel for tensors like x, so that Q's producer should hand it a
    QuantizedQ (`qk_norm_rope(..., for_attention=True)`) rather than 16-bit q. Meta tensors count as CUDA: the planner
    traces the run's allocations."""
    check_mode(mode, None)
    return mode != "sdpa" and has_triton() and (x.is_meta or x.device.type == "cuda")


def attention(q: torch.Tensor | QuantizedQ, k: torch.Tensor, v: torch.Tensor, mode: str = "sdpa",
              config: AttnConfig | None = None) -> torch.Tensor:
    """Non-causal attention, q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H*D] in v's dtype.

    mode: 'sdpa' (PyTorch SDPA), 'fp8' (fp8 QK and P·V, sm_89+), 'fp8_bf16pv' (fp8 QK, 16-bit P·V, sm_89+), 'int8'
    (int8 QK, 16-bit P·V, sm_80+), 'int8_fp8pv' (int8 QK, fp8 P·V, sm_89+). Tensors off CUDA take the SDPA reference
    whatever the mode; on a GPU below the mode's capability this raises ValueError naming both (callers
    check with `check_mode` first). q may come quantized by its producer (a QuantizedQ in the mode's QK dtype, where
    `quantizes_query` says so). config: kernel tiles (default: the CONFIGS entry for this GPU)."""
    check_mode(mode, None)
    prequantized = isinstance(q, QuantizedQ)
    if prequantized and not quantizes_query(mode, k):
        raise ValueError(f"a quantized q needs a kernel mode and CUDA tensors, got mode {mode!r} on {k.device}")
    if k.is_meta and mode != "sdpa":  # the planner's trace: 8-bit copies of q (unless given), k, v, then the output
        copies = [t.new_empty(t.shape, dtype=torch.uint8) for t in (k, v, *(() if prequantized else (q,)))]
        B, Lq, H, D = _query_shape(q)
        out = k.new_empty((B, Lq, H * D), dtype=v.dtype)
        del copies
        return out
    if mode == "sdpa" or k.device.type != "cuda":
        return attention_reference(q, k, v)
    check_mode(mode, capability(k.device))
    if not has_triton():
        raise ValueError(f"attention mode {mode!r} needs Triton, which is not installed")
    c = config or default_config(mode, k.shape[-1], capability(k.device))
    q, q_scale = q if prequantized else (q, None)
    return quantized_attention_op(q, k, v, mode, c.block_m, c.block_n, c.num_warps, c.num_stages, c.tma, c.lookahead,
                                  c.gluon, q_scale)
