"""Residual update, LayerNorm and modulation in one pass over the fp32 residual stream, written once as the GEMM input.

For one token row x [dim] of batch b (every step optional but the norm):

    x   <- x + residual * gate[b]                       (in place; `x + residual` without a gate)
    h    = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
    h    = h * (1 + scale[b]) + shift[b]
    out  = h rounded to out_dtype, or, for fp8 e4m3 / int8, per-token quantised: (q, s) with s = max|h| / qmax

`norm_modulate_reference` is today's unfused PyTorch and defines the numerics; `norm_modulate_triton` reads x once and
writes x (when updated) and the output once. `norm_modulate` picks one (see kernels/dispatch.py).

The kernels round to the output format on the fp32 bits (`_round_to_format`) before the final cast, so the cast is
exact and the result is the same on a GPU and in the Triton interpreter (whose fp32 -> bf16 cast truncates and whose
fp8 rounding drops the carry into the exponent). `quantize_rows_reference`, `row_settings` and the `@triton.jit`
helpers are shared with the other row kernels (qk_norm_rope).
"""

import torch
import torch.nn.functional as F

from .dispatch import ADA, AMPERE, has_triton, use_triton

# Largest magnitude of each quantised format; per-token scales map a row's max |h| onto it.
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
# A row whose max |h| is below this (an all-zero row) gets scale AMAX_FLOOR / qmax instead of 0: q = 0, no NaN.
AMAX_FLOOR = 1e-12

# Rounding of fp32 to each output format as (low mantissa bits dropped, bound below which the format has a fixed step,
# 1.5 * 2^23 * that step): adding and subtracting the magic number rounds to a multiple of the step, half to even.
FORMATS = {
    torch.float32: (0, 0.0, 0.0),
    torch.bfloat16: (16, 0.0, 0.0),  # fp32's exponent range: the bit rounding also covers subnormals
    torch.float16: (13, 2.0**-14, 1.5 * 2.0**-1),  # subnormal step 2^-24
    torch.float8_e4m3fn: (20, 2.0**-6, 1.5 * 2.0**14),  # subnormal step 2^-9
    torch.int8: (0, 128.0, 1.5 * 2.0**23),  # integers: step 1 over the whole clamped range [-127, 127]
}


def quantize_rows_reference(h: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantisation of h [..., n] (computed in fp32).

    s = max(max_j |h_j|, AMAX_FLOOR) / qmax, one fp32 scale per row [...]; q = h / s clamped to [-qmax, qmax] and
    rounded half to even: explicitly for int8 (qmax 127), by the cast for fp8 e4m3 (qmax 448). Clamping before
    rounding equals rounding before clamping, ±qmax being representable. Dequantise as q * s[..., None].
    """
    qmax = QMAX[dtype]
    h = h.float()
    scale = h.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / qmax
    q = (h / scale[..., None]).clamp(-qmax, qmax)
    if dtype == torch.int8:
        q = q.round()
    return q.to(dtype), scale


def norm_modulate_reference(x: torch.Tensor, eps: float, shift: torch.Tensor | None = None,
                            scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                            gate: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16):
    """x [B, L, dim] (fp32; may be a token slice of a bigger tensor), updated in place when `residual` [B, L, dim] is
    given: x += residual * gate (gate [B, 1, dim] fp32) or x += residual. Then LayerNorm over dim in fp32 with the
    optional affine weight, bias [dim] fp32, then h * (1 + scale) + shift (scale, shift [B, 1, dim] fp32).
    Returns h [B, L, dim] in out_dtype, or (q [B, L, dim], token scale [B, L] fp32) for fp8 e4m3 / int8."""
    if residual is not None:
        if gate is not None:
            x.addcmul_(residual, gate)
        else:
            x.add_(residual)
    h = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale)
    if shift is not None:
        h = h + shift
    if out_dtype in QMAX:
        return quantize_rows_reference(h, out_dtype)
    return h.to(out_dtype)


def row_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel holding a row of n elements in registers (as Liger's calculate_settings)."""
    import triton

    block = triton.next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"a row of {n} elements exceeds the largest fused block, 65536")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def format_args(dtype: torch.dtype, prefix: str = "") -> dict[str, float | int]:
    """The constexpr arguments of `_round_to_format` for rounding to `dtype`, named `{prefix}DROP_BITS` etc."""
    if dtype not in FORMATS:
        raise ValueError(f"unsupported dtype {dtype}")
    return dict(zip((f"{prefix}DROP_BITS", f"{prefix}FIXED_BELOW", f"{prefix}FIXED_MAGIC"), FORMATS[dtype]))


if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_format(x, DROP_BITS: tl.constexpr, FIXED_BELOW: tl.constexpr, FIXED_MAGIC: tl.constexpr):
        """fp32 x rounded half to even onto a narrower format, still in fp32 (see FORMATS): a mantissa of 23 -
        DROP_BITS bits, and below FIXED_BELOW a fixed step, rounded by adding and subtracting FIXED_MAGIC (no
        fast-math reassociation in Triton, so the pair is kept). The cast to the format that follows is then exact."""
        r = x
        if DROP_BITS > 0:
            bits = x.to(tl.uint32, bitcast=True)
            # add just under half a unit of the kept last bit, plus that bit: ties go to the even neighbour
            bits = bits + ((1 << (DROP_BITS - 1)) - 1) + ((bits >> DROP_BITS) & 1)
            r = ((bits >> DROP_BITS) << DROP_BITS).to(tl.float32, bitcast=True)
        if FIXED_BELOW > 0:
            r = tl.where(tl.abs(x) < FIXED_BELOW, (x + FIXED_MAGIC) - FIXED_MAGIC, r)
        return r

    @triton.jit
    def _token_scale(amax, QMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
        """max(amax, AMAX_FLOOR) / QMAX; IEEE division (Triton's `/` is approximate) to match the reference."""
        return tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), QMAX)

    @triton.jit
    def _quantize(h, token_scale, QMAX: tl.constexpr):
        """h / s clamped to [-QMAX, QMAX], still fp32; round with `_round_to_format` of the quantised format."""
        return tl.minimum(tl.maximum(h / token_scale, -QMAX), QMAX)

    @triton.jit
    def _norm_modulate_kernel(
        X, stride_xb, stride_xl,  # [B, L, N] fp32, last dim contiguous; updated in place when HAS_RESIDUAL
        R, stride_rb, stride_rl,  # residual [B, L, N], last dim contiguous
        G, SHIFT, SCALE, stride_gb, stride_shb, stride_scb,  # [B, 1, N] per-batch vectors (stride 0: broadcast)
        W, BIAS,  # [N]
        OUT, TOKEN_SCALE,  # [B * L, N] contiguous; [B * L] fp32 when quantised
        L, N, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,  # constexpr flags, so the `if` blocks are optimised out
        QMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,  # QMAX 0: a plain float output
        DROP_BITS: tl.constexpr, FIXED_BELOW: tl.constexpr, FIXED_MAGIC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One token row per program: the whole row sits in registers, so mean and variance take two exact passes
        over registers (no Welford) and x is read from memory once."""
        row = tl.program_id(0).to(tl.int64)  # int64: B * L * N overflows int32 offsets for long videos
        b = row // L
        l = row - b * L
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x_ptrs = X + b * stride_xb + l * stride_xl + cols
        # loads convert to fp32 at once: all math is fp32 (and the interpreter mishandles bf16 arithmetic)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + b * stride_rb + l * stride_rl + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                g = tl.load(G + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.fma(r, g, x)  # one rounding, as torch's addcmul_ (fmadd on CPU, contracted on CUDA)
            else:
                x += r
            tl.store(x_ptrs, x, mask=mask)  # x is fp32 here (checked by the launcher): stored as computed

        # IEEE divisions: Triton's `/` is approximate on GPUs, so a constant row would not centre to exactly 0
        mean = tl.math.div_rn(tl.sum(x, axis=0), N.to(tl.float32))
        xc = tl.where(mask, x - mean, 0.0)  # padding lanes would add mean^2 each to the variance
        rstd = tl.rsqrt(tl.math.div_rn(tl.sum(xc * xc, axis=0), N.to(tl.float32)) + eps)
        h = xc * rstd
        if HAS_WEIGHT:
            h = h * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            h = h * (1.0 + tl.load(SCALE + b * stride_scb + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            h = h + tl.load(SHIFT + b * stride_shb + cols, mask=mask, other=0.0).to(tl.float32)

        if QMAX > 0:
            s = _token_scale(tl.max(tl.where(mask, tl.abs(h), 0.0), axis=0), QMAX, AMAX_FLOOR)
            tl.store(TOKEN_SCALE + row, s)
            h = _quantize(h, s, QMAX)
        h = _round_to_format(h, DROP_BITS, FIXED_BELOW, FIXED_MAGIC)
        tl.store(OUT + row * N + cols, h.to(OUT.dtype.element_ty), mask=mask)


def _per_batch(t: torch.Tensor | None, B: int, N: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [B, 1, N]-broadcastable vector as (tensor, batch stride); a dummy pointer when absent."""
    if t is None:
        return like, 0
    t = t.expand(B, 1, N)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def norm_modulate_triton(x: torch.Tensor, eps: float, shift: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16):
    """`norm_modulate_reference` as one Triton kernel; x may be any [B, L, dim] view with a contiguous last dim."""
    B, L, N = x.shape
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous along its last dimension (it is updated in place)")
    quantized = out_dtype in QMAX
    out = torch.empty(B, L, N, dtype=out_dtype, device=x.device)
    token_scale = torch.empty(B, L, dtype=torch.float32, device=x.device) if quantized else None
    if B * L == 0 or x.is_meta:
        return (out, token_scale) if quantized else out
    if residual is not None:
        if residual.shape != x.shape or x.dtype != torch.float32:
            raise ValueError(f"x must be fp32 and residual of its shape {tuple(x.shape)}, got x {x.dtype}, residual "
                             f"{tuple(residual.shape)}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    r = residual if residual is not None else x
    g, stride_g = _per_batch(gate, B, N, x)
    sh, stride_sh = _per_batch(shift, B, N, x)
    sc, stride_sc = _per_batch(scale, B, N, x)
    block, num_warps = row_settings(N)
    _norm_modulate_kernel[(B * L,)](
        x, x.stride(0), x.stride(1), r, r.stride(0), r.stride(1), g, sh, sc, stride_g, stride_sh, stride_sc,
        weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x,
        out, token_scale if quantized else out, L, N, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        QMAX=QMAX.get(out_dtype, 0.0), AMAX_FLOOR=AMAX_FLOOR, **format_args(out_dtype),
        BLOCK=block, num_warps=num_warps)
    return (out, token_scale) if quantized else out


def norm_modulate(x: torch.Tensor, eps: float, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16):
    """The Triton kernel on a capable GPU (Ada or newer for fp8 outputs), else the PyTorch reference."""
    fast = use_triton(x, ADA if out_dtype == torch.float8_e4m3fn else AMPERE)
    fn = norm_modulate_triton if fast else norm_modulate_reference
    return fn(x, eps, shift, scale, weight, bias, residual, gate, out_dtype)
