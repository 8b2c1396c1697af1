"""Dynamic per-row (per-token) symmetric quantization to fp8 e4m3 or int8, and per-output-channel weight quantization.

For a row x_i of K values and qmax = 448 (float8_e4m3fn) or 127 (int8):

    s_i = max_k |x_ik| / qmax          (s_i = 1 when the row is all zeros, so every scale is finite and non-zero)
    q_ik = R(clamp(x_ik * (1 / s_i), -qmax, qmax))        x_ik ~= q_ik * s_i

with R rounding to nearest, ties to even: onto the e4m3 grid for fp8, onto the integers for int8. Scales are fp32.
The two per-row divisions are IEEE-rounded in the kernel (`tl.math.div_rn`; plain `/` is approximate on NVIDIA
GPUs) and each element takes one multiply by 1 / s_i, so the Triton kernel and the PyTorch reference give
bit-identical q and s. (The clamp between that multiply and the rounding's add keeps them from fusing into an FMA.)

`quantize_rows` runs at every linear with activation quantization (fp8/int8 schemes); `quantize_weight` runs once,
at export time, and has only the PyTorch form.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton
from .dispatch import ADA, AMPERE, use_triton

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
MIN_CAPABILITY = {torch.float8_e4m3fn: ADA, torch.int8: AMPERE}  # Triton has no e4m3 conversions before sm_89
MAX_ONE_PASS_K = 16384  # rows up to this many (padded) values are held in registers: one read of x


def _check(x: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in QMAX:
        raise ValueError(f"quantize to torch.float8_e4m3fn or torch.int8, not {dtype}")
    if not x.is_floating_point() or x.dtype.itemsize < 2:
        raise TypeError(f"quantize a bf16/fp16/fp32 tensor, not {x.dtype}")
    if x.ndim < 1:
        raise ValueError("quantize a tensor of rows [..., K]")


def _quantize_reference(x: torch.Tensor, dtype: torch.dtype, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of x over `dim`, one fp32 scale per slice (the definition above)."""
    qmax = QMAX[dtype]
    x = x.float()
    amax = x.abs().amax(dim=dim, keepdim=True)
    scale = amax / torch.full_like(amax, qmax)  # a tensor divisor: CUDA divides by a Python scalar as * (1 / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (x * (1.0 / scale)).clamp(-qmax, qmax)
    q = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)  # torch.round: half to even
    return q, scale.squeeze(dim)


def quantize_rows_reference(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] of `dtype`, scale fp32 [...]) with x ~= q * scale[..., None]. Plain PyTorch."""
    _check(x, dtype)
    return _quantize_reference(x, dtype, -1)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear weight [N, K] -> (q [N, K] of `dtype`, scale fp32 [N]): one scale per output channel, so that
    x @ W^T = (x @ q^T) * scale[None, :] with the scale applied after the K sum (in the GEMM epilogue)."""
    if w.ndim != 2:
        raise ValueError(f"quantize_weight takes an [N, K] weight, got shape {tuple(w.shape)}")
    _check(w, dtype)
    q, scale = _quantize_reference(w, dtype, 1)
    return q.contiguous(), scale.contiguous()


@triton.jit
def _round_half_even(y):
    # Adding then subtracting 1.5 * 2^23 leaves fp32 no fraction bits, so the add rounds to the nearest integer,
    # ties to even (exact for |y| < 2^22). Portable: no libdevice call, so the interpreter runs it too.
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 y (|y| <= 448) to the nearest float8_e4m3fn value, ties to even, staying in fp32.

    The hardware conversion does the same; rounding first makes the final `.to(tl.float8e4nv)` exact, which keeps
    the Triton interpreter (whose fp8 conversion rounds ties away from zero) bit-identical to the GPU and to torch.
    """
    # Normal e4m3 numbers (|y| >= 2^-6) keep 3 of fp32's 23 mantissa bits: round away the low 20 bits, to even.
    # Integer adds on the bit pattern round the magnitude whatever the sign; a carry moves into the exponent.
    bits = y.to(tl.int32, bitcast=True)
    negative = bits < 0  # the sign bit, so -0.0 stays -0.0
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormals are the multiples of 2^-9 below 2^-6: 1.5 * 2^14 has an ulp of 2^-9. Rounded on |y| so that
    # tiny negatives give -0 like the hardware.
    subnormal = (tl.abs(y) + 24576.0) - 24576.0
    subnormal = tl.where(negative, -subnormal, subnormal)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                          QMAX: tl.constexpr, IS_INT8: tl.constexpr, ONE_PASS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_M rows per program. ONE_PASS (constexpr, so the `if` blocks are optimized out): the whole row fits in
    one BLOCK_K tile, read once and kept in registers; otherwise a first loop finds the row maxima and a second
    reads the row again (from L2) to quantize it."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm

    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))

    scale = tl.math.div_rn(amax, tl.full([BLOCK_M], QMAX, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + rows, scale, mask=row_mask)
    inv_scale = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)[:, None]

    if ONE_PASS:
        y = x * inv_scale
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if IS_INT8:
            q = _round_half_even(y).to(tl.int8)
        else:
            q = _round_to_e4m3(y).to(tl.float8e4nv)
        tl.store(q_rows + cols[None, :], q, mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = x * inv_scale
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            if IS_INT8:
                q = _round_half_even(y).to(tl.int8)
            else:
                q = _round_to_e4m3(y).to(tl.float8e4nv)
            tl.store(q_rows + k0 + cols[None, :], q, mask=mask)


def quantize_rows_triton(x: torch.Tensor, dtype: torch.dtype,
                         block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton form of `quantize_rows_reference`. `block_k` (a power of two) forces the K tile, and so the
    two-pass path when it is below K (tests); by default rows of up to MAX_ONE_PASS_K values take one pass."""
    _check(x, dtype)
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), device=x.device, dtype=dtype)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0 or K == 0 or x.is_meta:
        return q.view(*lead, K), scale.fill_(1.0).view(lead)
    full = triton.next_power_of_2(K)
    block_k = block_k or (full if full <= MAX_ONE_PASS_K else 4096)
    block_m = max(1, min(16, 8192 // block_k))
    num_warps = max(4, min(16, block_m * block_k // 1024))
    _quantize_rows_kernel[(triton.cdiv(M, block_m),)](
        x2, q, scale, M, K, x2.stride(0), q.stride(0),
        QMAX=QMAX[dtype], IS_INT8=dtype == torch.int8, ONE_PASS=block_k >= K,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return q.view(*lead, K), scale.view(lead)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization: the Triton kernel on a GPU that has the conversions (fp8: sm_89+, int8: sm_80+),
    the PyTorch reference elsewhere (same bits)."""
    _check(x, dtype)
    if use_triton(x, MIN_CAPABILITY[dtype]):
        return quantize_rows_triton(x, dtype)
    return quantize_rows_reference(x, dtype)
