"""Query/key RMSNorm over the whole width and RoPE in one pass after the projection GEMM.

For one token row y [dim] at position l (dim = H * D, pairs p = (2i, 2i+1), j = i mod D/2 the pair's index in its head):

    n    = round_to_y_dtype(y / sqrt(mean(y^2) + eps)) * weight        (as F.rms_norm, then the fp32 weight: fp32)
    out  = (n_2i cos[l, j] - n_2i+1 sin[l, j],  n_2i sin[l, j] + n_2i+1 cos[l, j])   (when cos/sin are given)
    out  rounded to out_dtype, [B, L, H, D]; or, for fp8 e4m3 / int8, (q, per-token scale [B, L]) over the whole row;
         or, with for_attention, the quantized attention's Q (`wanrt.kernels.attention.QuantizedQ`): c·out with one
         scale per token and head (c = log2(e) / sqrt(D)), q [B, L, H, D] and scales [B, L, H]

`qk_norm_rope_reference` is today's PyTorch (`rms_norm` then `apply_rope` in runtime/dit.py) and defines the numerics;
`qk_norm_rope_triton` reads y once and writes the attention input once (for a quantized attention, in the form its
kernel reads, which saves the attention a pass over Q). `qk_norm_rope` picks one.
"""

import torch
import torch.nn.functional as F

from .attention import QuantizedQ, query_multiplier, quantize_q_ref
from .dispatch import ADA, AMPERE, has_triton, use_triton
from .norm_modulate import AMAX_FLOOR, QMAX, format_args, quantize_rows_reference, row_settings


def qk_norm_rope_reference(y: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int,
                           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                           out_dtype: torch.dtype = torch.bfloat16, for_attention: bool = False):
    """y [B, L, dim] projection output (bf16 on the GPU), weight [dim], cos/sin [L, D/2] fp32 or None.
    Returns [B, L, H, D] in out_dtype, or (q [B, L, H, D], token scale [B, L] fp32) for fp8 e4m3 / int8, or with
    for_attention (fp8 e4m3 / int8) the attention's QuantizedQ."""
    n = (F.rms_norm(y, (y.shape[-1],), None, eps) * weight.float()).unflatten(-1, (num_heads, -1))
    if cos is not None:  # apply_rope's arithmetic, in fp32
        re, im = n.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None], sin[:, None]
        n = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    if for_attention:
        return quantize_q_ref(n, out_dtype)
    if out_dtype in QMAX:
        q, token_scale = quantize_rows_reference(n.flatten(2), out_dtype)
        return q.view_as(n), token_scale
    return n.to(out_dtype)


if has_triton():
    import triton
    import triton.language as tl

    from .norm_modulate import _quantize, _round_to_format, _token_scale

    @triton.jit
    def _qk_norm_rope_kernel(
        Y, stride_yb, stride_yl,  # [B, L, N], last dim contiguous
        W,  # [N]
        COS, SIN, stride_cos, stride_sin,  # [L, HALF_HEAD] fp32, rows of the tokens of Y
        OUT, TOKEN_SCALE,  # [B * L, N] contiguous; [B * L] fp32 when quantised ([B * L, H] with HEAD_SCALES)
        L, N, H, eps,
        HALF_HEAD: tl.constexpr,  # D / 2: constexpr, so `i % HALF_HEAD` is a mask for power-of-two heads
        HAS_ROPE: tl.constexpr,  # constexpr flags, so the `if` blocks are optimised out
        Y_DROP_BITS: tl.constexpr, Y_FIXED_BELOW: tl.constexpr, Y_FIXED_MAGIC: tl.constexpr,  # y's format
        QMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,  # QMAX 0: a plain float output
        HEAD_SCALES: tl.constexpr, MULT: tl.constexpr,  # the attention's Q: MULT * out, quantised per token and head
        DROP_BITS: tl.constexpr, FIXED_BELOW: tl.constexpr, FIXED_MAGIC: tl.constexpr,  # the output's format
        BLOCK: tl.constexpr,  # pairs per row, a power of two >= N / 2
    ):
        """One token row per program, held as its even and odd channels: RoPE mixes exactly those two, so no
        shuffle is needed; both strided loads hit the same cache lines."""
        row = tl.program_id(0).to(tl.int64)  # int64: B * L * N overflows int32 offsets for long videos
        b = row // L
        l = row - b * L
        i = tl.arange(0, BLOCK)
        mask = 2 * i < N
        y = Y + b * stride_yb + l * stride_yl
        # loads convert to fp32 at once: all math is fp32 (and the interpreter mishandles bf16 arithmetic)
        ev = tl.load(y + 2 * i, mask=mask, other=0.0).to(tl.float32)
        od = tl.load(y + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        # IEEE division (Triton's `/` is approximate on GPUs)
        rstd = tl.rsqrt(tl.math.div_rn(tl.sum(ev * ev, axis=0) + tl.sum(od * od, axis=0), N.to(tl.float32)) + eps)
        # F.rms_norm returns y's dtype: round there before the fp32 weight, as the reference does
        ev = _round_to_format(ev * rstd, Y_DROP_BITS, Y_FIXED_BELOW, Y_FIXED_MAGIC)
        od = _round_to_format(od * rstd, Y_DROP_BITS, Y_FIXED_BELOW, Y_FIXED_MAGIC)
        ev = ev * tl.load(W + 2 * i, mask=mask, other=0.0).to(tl.float32)
        od = od * tl.load(W + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:
            j = i % HALF_HEAD
            c = tl.load(COS + l * stride_cos + j, mask=mask, other=0.0)
            s = tl.load(SIN + l * stride_sin + j, mask=mask, other=0.0)
            ev, od = ev * c - od * s, ev * s + od * c

        if HEAD_SCALES:  # row-major [heads, pairs of a head]: one scale per head (BLOCK / HALF_HEAD >= H heads)
            HEADS: tl.constexpr = BLOCK // HALF_HEAD
            ev = tl.reshape(ev * MULT, [HEADS, HALF_HEAD])
            od = tl.reshape(od * MULT, [HEADS, HALF_HEAD])
            hh = tl.arange(0, HEADS)
            s = _token_scale(tl.maximum(tl.max(tl.abs(ev), axis=1), tl.max(tl.abs(od), axis=1)), QMAX, AMAX_FLOOR)
            tl.store(TOKEN_SCALE + row * H + hh, s, mask=hh < H)
            ev = _round_to_format(_quantize(ev, s[:, None], QMAX), DROP_BITS, FIXED_BELOW, FIXED_MAGIC)
            od = _round_to_format(_quantize(od, s[:, None], QMAX), DROP_BITS, FIXED_BELOW, FIXED_MAGIC)
            # the pairs interleaved again: one contiguous row per head, stored in wide pieces
            out = OUT + row * N + hh[:, None] * (2 * HALF_HEAD) + tl.arange(0, 2 * HALF_HEAD)[None, :]
            tl.store(out, tl.interleave(ev, od).to(OUT.dtype.element_ty), mask=(hh < H)[:, None])
        else:
            if QMAX > 0:
                amax = tl.maximum(tl.max(tl.abs(ev), axis=0), tl.max(tl.abs(od), axis=0))  # padding lanes are 0
                s = _token_scale(amax, QMAX, AMAX_FLOOR)
                tl.store(TOKEN_SCALE + row, s)
                ev = _quantize(ev, s, QMAX)
                od = _quantize(od, s, QMAX)
            ev = _round_to_format(ev, DROP_BITS, FIXED_BELOW, FIXED_MAGIC)
            od = _round_to_format(od, DROP_BITS, FIXED_BELOW, FIXED_MAGIC)
            out = OUT + row * N + 2 * i
            tl.store(out, ev.to(OUT.dtype.element_ty), mask=mask)
            tl.store(out + 1, od.to(OUT.dtype.element_ty), mask=mask)


def qk_norm_rope_triton(y: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int,
                        cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16, for_attention: bool = False):
    """`qk_norm_rope_reference` as one Triton kernel; y may be any [B, L, dim] view with a contiguous last dim."""
    B, L, N = y.shape
    D = N // num_heads
    if D * num_heads != N or D % 2:
        raise ValueError(f"dim {N} does not split into {num_heads} heads of an even size")
    if y.stride(-1) != 1:
        y = y.contiguous()
    quantized = out_dtype in QMAX
    if for_attention and (not quantized or D & (D - 1)):
        raise ValueError(f"the attention's Q is fp8 e4m3 or int8 with a power-of-two head_dim, got {out_dtype} and "
                         f"head_dim {D}")
    out = torch.empty(B, L, num_heads, D, dtype=out_dtype, device=y.device)
    token_scale = torch.empty(B, L, *((num_heads,) if for_attention else ()), dtype=torch.float32,
                              device=y.device) if quantized else None
    result = QuantizedQ(out, token_scale) if for_attention else (out, token_scale) if quantized else out
    if B * L == 0 or y.is_meta:
        return result
    if cos is not None:
        if cos.shape != (L, D // 2) or sin.shape != (L, D // 2):
            raise ValueError(f"cos and sin must be [{L}, {D // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        cos, sin = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (cos, sin))
    block, num_warps = row_settings(N // 2)
    _qk_norm_rope_kernel[(B * L,)](
        y, y.stride(0), y.stride(1), weight.contiguous(),
        cos if cos is not None else y, sin if sin is not None else y,
        cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        out, token_scale if quantized else out, L, N, num_heads, float(eps),
        HALF_HEAD=D // 2, HAS_ROPE=cos is not None, **format_args(y.dtype, "Y_"),
        QMAX=QMAX.get(out_dtype, 0.0), AMAX_FLOOR=AMAX_FLOOR, HEAD_SCALES=for_attention,
        MULT=query_multiplier(D), **format_args(out_dtype), BLOCK=block, num_warps=num_warps)
    return result


def qk_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 for_attention: bool = False):
    """The Triton kernel on a capable GPU (Ada or newer for fp8 outputs), else the PyTorch reference."""
    fast = use_triton(y, ADA if out_dtype == torch.float8_e4m3fn else AMPERE)
    fn = qk_norm_rope_triton if fast else qk_norm_rope_reference
    return fn(y, weight, eps, num_heads, cos, sin, out_dtype, for_attention)
