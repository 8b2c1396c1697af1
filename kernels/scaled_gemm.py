"""Scaled 8-bit GEMMs for quantized linears: one Triton kernel family, three modes.

    out[m, n] = act( (sum_k A[m, k] * B[n, k]) * a_scale[m] * b_scale[n] + bias[n] )

with act the identity or tanh-GELU, 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = y * sigmoid(2 sqrt(2/pi) (...)).
B is stored like an nn.Linear weight, [N, K] with K contiguous: the K-major operand layout that Hopper's fp8/int8
wgmma reads from shared memory, so no transpose is ever materialised.

  mode    A [M, K]               B [N, K]        accumulation                 a_scale
  fp8     float8_e4m3fn          float8_e4m3fn   fp32 (tensor cores)           per row (dynamic, kernels.quantize)
  int8    int8                   int8            int32, exact                  per row (dynamic, kernels.quantize)
  w8a16   bf16 (or fp16)         int8            fp32 after B -> bf16          none (a_scale is None)

The w8a16 conversion is exact (|q| <= 127 fits bf16's 8-bit significand) and the per-output-channel b_scale factors
out of the K sum, so it is applied once in the epilogue together with the per-row a_scale. The epilogue works in
fp32 and rounds once into the output dtype (bf16, or fp32 for tests).

Launch shape: BLOCK_M x BLOCK_N output tiles over a BLOCK_K K-loop, software-pipelined over `num_stages` shared-memory
buffers, tiles visited in grouped order (GROUP_M row-tiles share each sweep over the column tiles, so a wave of
programs re-reads A rows and B columns from L2). PERSISTENT launches one program per SM that walks the tiles with a
flattened loop, so the next tile's loads are in flight during this tile's epilogue. Block configs are chosen ahead
of time (CONFIGS, filled from bench/gemm_bench.py sweeps on an H100), never autotuned at run time.

M, N and K tails are handled: rows and columns past the end are clamped to row/column 0 for the loads (always in
bounds, no load masks) and masked at the store; the K loop is masked only when K is not a multiple of BLOCK_K.

TMA (fp8 and int8, sm_90+) loads the A and B tiles through host-built tensor descriptors instead of pointer loads:
the TMA unit zero-fills rows, columns and K past the end, so nothing is clamped or masked but the store.
On an H100 TMA won every 8-bit shape of the table (CONFIGS). Triton's automatic warp specialization of these loops
(`tl.range(..., warp_specialize=True)`) compiled on sm_90 but gained nothing (bench/results/gemm_h100_tma_sweep.md).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .dispatch import ADA, AMPERE, HOPPER, capability, has_triton, use_triton

MODES = ("fp8", "int8", "w8a16")
MIN_CAPABILITY = {"fp8": ADA, "int8": AMPERE, "w8a16": AMPERE}
SMALL_M = 1024  # at or below this many rows (the 512-token text context) the table's large tiles leave SMs idle


class UnsupportedGemmError(RuntimeError):
    """The GPU lacks what a mode needs (fp8 tensor cores need sm_89+); `quant.formats.resolve_scheme` picks a scheme
    that runs before any GEMM is launched."""


# ------------------------------------------------------------------------------------------------------- configs
def block_config(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8,
                 persistent: bool = False, tma: bool = False) -> dict:
    """A launch config: BLOCK_M x BLOCK_N tiles, BLOCK_K steps, GROUP_M, num_warps, num_stages, PERSISTENT, TMA
    (descriptor loads)."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages,
                PERSISTENT=persistent, TMA=tma)


# Hopper (sm_90) configs for the Wan2.1 linears above SMALL_M tokens, keyed (mode, N, K) = (mode, out, in features).
# 1.3B: dim 1536, ffn 8960; 14B: dim 5120, ffn 13824. 8-bit operands: 128x256 or 256x128 tiles, 8 warps (two consumer
# warpgroups), K steps of 128, 3-4 stages of 48 KiB. w8a16 reads bf16 A, so BLOCK_K halves for the same bytes.
# All are sweep winners of `python -m wanrt.bench.gemm_bench` on an H100 (bench/results/gemm_h100_shapes.md): TMA loads
# won every 8-bit shape, 9 of 12 as persistent kernels.
CONFIGS: dict[tuple[str, int, int], dict] = {
    ("fp8", 8960, 1536): block_config(128, 256, 128, 8, 3, persistent=True, tma=True),  # 0.7977 ms, 1130 TFLOP/s
    ("fp8", 1536, 8960): block_config(128, 256, 128, 8, 3, persistent=True, tma=True),  # 0.6591 ms, 1368 TFLOP/s
    ("fp8", 1536, 1536): block_config(128, 256, 128, 8, 4, persistent=True, tma=True),  # 0.1360 ms, 1137 TFLOP/s
    ("fp8", 13824, 5120): block_config(256, 128, 128, 8, 4, persistent=True, tma=True),  # 3.5222 ms, 1317 TFLOP/s
    ("fp8", 5120, 13824): block_config(128, 256, 128, 8, 4, tma=True),  # 3.4350 ms, 1350 TFLOP/s
    ("fp8", 5120, 5120): block_config(128, 256, 128, 8, 4, persistent=True, tma=True),  # 1.2290 ms, 1398 TFLOP/s
    ("int8", 8960, 1536): block_config(128, 256, 128, 8, 4, persistent=True, tma=True),  # 0.8474 ms, 1064 TFLOP/s
    ("int8", 1536, 8960): block_config(128, 256, 128, 8, 4, persistent=True, tma=True),  # 0.6875 ms, 1312 TFLOP/s
    ("int8", 1536, 1536): block_config(256, 128, 128, 8, 4, persistent=True, tma=True),  # 0.1546 ms, 1000 TFLOP/s
    ("int8", 13824, 5120): block_config(128, 256, 128, 8, 3, persistent=True, tma=True),  # 3.8264 ms, 1212 TFLOP/s
    ("int8", 5120, 13824): block_config(128, 256, 128, 8, 4, tma=True),  # 3.6753 ms, 1262 TFLOP/s
    ("int8", 5120, 5120): block_config(128, 256, 128, 8, 4, tma=True),  # 1.4082 ms, 1220 TFLOP/s
    ("w8a16", 8960, 1536): block_config(128, 128, 64, 4, 4),  # 2.0270 ms, 445 TFLOP/s
    ("w8a16", 1536, 8960): block_config(128, 128, 64, 4, 4),  # 1.9207 ms, 470 TFLOP/s
    ("w8a16", 1536, 1536): block_config(128, 128, 64, 4, 4),  # 0.3367 ms, 459 TFLOP/s
    ("w8a16", 13824, 5120): block_config(128, 128, 64, 4, 4),  # 9.8205 ms, 472 TFLOP/s
    ("w8a16", 5120, 13824): block_config(128, 128, 64, 4, 4),  # 9.8291 ms, 472 TFLOP/s
    ("w8a16", 5120, 5120): block_config(128, 128, 64, 4, 4),  # 3.6704 ms, 468 TFLOP/s
}


def default_config(mode: str, M: int, N: int, K: int, capability: tuple[int, int] | None = None) -> dict:
    """A config for shapes outside the table. Hopper has 227 KiB of shared memory per block, sm_80 163 KiB and
    sm_86/89 99 KiB, so off Hopper the tiles shrink to 128x128 with 64-wide K steps (32 KiB a stage for 8-bit)."""
    hopper = capability is None or capability >= HOPPER
    if M <= SMALL_M:  # few rows: smaller tiles for more programs
        return block_config(64, 128, 128 if mode != "w8a16" and hopper else 64, 4, 4)
    if mode == "w8a16":
        return block_config(128, 256, 64, 8, 3) if hopper else block_config(128, 128, 64, 8, 3)
    return block_config(128, 256, 128, 8, 3) if hopper else block_config(128, 128, 64, 8, 4)


def pick_config(mode: str, M: int, N: int, K: int, capability: tuple[int, int] | None = None) -> dict:
    """The table's config for (mode, N, K) on Hopper at M > SMALL_M, else `default_config`."""
    if M > SMALL_M and (capability is None or capability >= HOPPER) and (mode, N, K) in CONFIGS:
        return dict(CONFIGS[mode, N, K])
    return default_config(mode, M, N, K, capability)


# -------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: consecutive tiles walk GROUP_M row-tiles down before stepping to the next column-tile."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _operand_rows(pid_m, pid_n, M, N, stride_am, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 row offsets of this tile's A rows and B rows (= output columns), past-the-end ones clamped to 0 so
    the K loop loads without masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
    offs_n = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    return offs_m.to(tl.int64) * stride_am, offs_n.to(tl.int64) * stride_bn


@triton.jit
def _mma_step(acc, a_ptrs, b_ptrs, k_left, EVEN_K: tl.constexpr, UPCAST_B: tl.constexpr, INT_ACC: tl.constexpr,
              DOT_FP32: tl.constexpr, BLOCK_K: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr):
    """acc += A tile [BLOCK_M, BLOCK_K] @ B tile [BLOCK_K, BLOCK_N] (B read K-major). Constexpr flags, so the `if`
    blocks are optimized out: EVEN_K drops the K mask; UPCAST_B converts int8 B to A's dtype (w8a16); INT_ACC
    accumulates in int32; DOT_FP32 multiplies in fp32 (the Triton interpreter's tl.dot reads bf16 as raw bits).
    MAX_IMPRECISE_ACC (fp8 on sm_90): None keeps Triton's default, the tensor cores' fast reduced-precision
    accumulation over the whole K (as cuBLAS use_fast_accum); a value <= BLOCK_K adds the partial sums into the fp32
    accumulator every that many K, as DeepSeek-V3's fp8 GEMMs do, at the cost of registers and some speed."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    return _dot(acc, a, b, UPCAST_B, INT_ACC, DOT_FP32, MAX_IMPRECISE_ACC)


@triton.jit
def _tma_step(acc, a_desc, b_desc, off_m, off_n, k, INT_ACC: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr):
    """acc += A[off_m:, k:] @ B[off_n:, k:]^T, one tile each through TMA descriptors, which zero-fill rows, columns
    and K past the end (8-bit modes only, so no UPCAST_B or DOT_FP32). B is [BLOCK_N, BLOCK_K]: its transpose is a
    shared-memory view, the K-major operand wgmma reads."""
    a = a_desc.load([off_m, k])
    b = b_desc.load([off_n, k])
    return _dot(acc, a, b.T, False, INT_ACC, False, MAX_IMPRECISE_ACC)


@triton.jit
def _dot(acc, a, b, UPCAST_B: tl.constexpr, INT_ACC: tl.constexpr, DOT_FP32: tl.constexpr,
         MAX_IMPRECISE_ACC: tl.constexpr):
    """acc += a [BLOCK_M, BLOCK_K] @ b [BLOCK_K, BLOCK_N] (flags as in `_mma_step`)."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif UPCAST_B:
        acc = tl.dot(a, b.to(a.dtype), acc)
    elif INT_ACC:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
    return acc


@triton.jit
def _epilogue(acc, pid_m, pid_n, M, N, out_ptr, stride_om, a_scale_ptr, b_scale_ptr, bias_ptr,
              HAS_A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scales, bias and GELU in fp32, one rounding into out's dtype, masked store of the M/N tails."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    y = acc.to(tl.float32)
    if HAS_A_SCALE:
        y = y * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    y = y * tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))  # 2 * sqrt(2 / pi)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                      stride_am, stride_bn, stride_om,
                      HAS_A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                      UPCAST_B: tl.constexpr, INT_ACC: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      TMA: tl.constexpr = False,
                      MAX_IMPRECISE_ACC: tl.constexpr = None):
    """One output tile per program (see the module docstring for the math and the flags). Under TMA, a_ptr and
    b_ptr are tensor descriptors of A [M, K] and B [N, K]."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        for ki in range(0, tl.cdiv(K, BLOCK_K)):
            acc = _tma_step(acc, a_ptr, b_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, ki * BLOCK_K, INT_ACC,
                            MAX_IMPRECISE_ACC)
    else:
        a_rows, b_rows = _operand_rows(pid_m, pid_n, M, N, stride_am, stride_bn, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        b_ptrs = b_ptr + b_rows[None, :] + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K contiguous
        for ki in range(0, tl.cdiv(K, BLOCK_K)):
            acc = _mma_step(acc, a_ptrs, b_ptrs, K - ki * BLOCK_K, EVEN_K, UPCAST_B, INT_ACC, DOT_FP32, BLOCK_K,
                            MAX_IMPRECISE_ACC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    _epilogue(acc, pid_m, pid_n, M, N, out_ptr, stride_om, a_scale_ptr, b_scale_ptr, bias_ptr,
              HAS_A_SCALE, HAS_BIAS, GELU, BLOCK_M, BLOCK_N)


@triton.jit
def _scaled_mm_persistent_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                                 stride_am, stride_bn, stride_om,
                                 HAS_A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                                 UPCAST_B: tl.constexpr, INT_ACC: tl.constexpr, DOT_FP32: tl.constexpr,
                                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                                 TMA: tl.constexpr = False,
                                 MAX_IMPRECISE_ACC: tl.constexpr = None):
    """NUM_SMS programs, each taking every NUM_SMS-th tile in grouped order. The tile and K loops are flattened
    into one pipelined loop (Triton's persistent-matmul tutorial), so loads for the next tile overlap the epilogue.
    The epilogue recomputes its tile from a second counter, as the tutorial does to keep the pipeliner happy.
    Under TMA, a_ptr and b_ptr are tensor descriptors."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    start_pid = tl.program_id(0)
    tile_id_c = start_pid - NUM_SMS
    offs_k = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        if INT_ACC:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TMA:
            for ki in range(k_tiles):
                acc = _tma_step(acc, a_ptr, b_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, ki * BLOCK_K, INT_ACC,
                                MAX_IMPRECISE_ACC)
        else:
            a_rows, b_rows = _operand_rows(pid_m, pid_n, M, N, stride_am, stride_bn, BLOCK_M, BLOCK_N)
            for ki in range(k_tiles):
                a_ptrs = a_ptr + a_rows[:, None] + (ki * BLOCK_K + offs_k)[None, :]
                b_ptrs = b_ptr + b_rows[None, :] + (ki * BLOCK_K + offs_k)[:, None]
                acc = _mma_step(acc, a_ptrs, b_ptrs, K - ki * BLOCK_K, EVEN_K, UPCAST_B, INT_ACC, DOT_FP32,
                                BLOCK_K, MAX_IMPRECISE_ACC)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        _epilogue(acc, pid_m, pid_n, M, N, out_ptr, stride_om, a_scale_ptr, b_scale_ptr, bias_ptr,
                  HAS_A_SCALE, HAS_BIAS, GELU, BLOCK_M, BLOCK_N)


# ------------------------------------------------------------------------------------------------------ launchers
def gemm_mode(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None = None) -> str:
    """'fp8', 'int8' or 'w8a16' from the operand dtypes; raises TypeError for any other pairing."""
    if a.dtype == b.dtype == torch.float8_e4m3fn:
        mode = "fp8"
    elif a.dtype == b.dtype == torch.int8:
        mode = "int8"
    elif a.dtype in (torch.bfloat16, torch.float16) and b.dtype == torch.int8:
        mode = "w8a16"
    else:
        raise TypeError(f"scaled_mm takes fp8 x fp8, int8 x int8 or bf16/fp16 x int8 operands, "
                        f"not {a.dtype} x {b.dtype}")
    if (a_scale is None) != (mode == "w8a16"):
        raise ValueError(f"mode {mode!r}: a_scale must be {'None' if mode == 'w8a16' else 'the per-row scales'}")
    return mode


def _check_shapes(a, b, a_scale, b_scale, bias) -> tuple[int, int, int]:
    K = a.shape[-1]
    M = a.numel() // K if K else 0
    if b.ndim != 2 or b.shape[1] != K:
        raise ValueError(f"b must be [N, K={K}] like an nn.Linear weight, got {tuple(b.shape)}")
    N = b.shape[0]
    if a_scale is not None and a_scale.numel() != M:
        raise ValueError(f"a_scale must hold one scale per row of a ({M}), got {a_scale.numel()}")
    if b_scale.numel() != N:
        raise ValueError(f"b_scale must hold one scale per row of b ({N}), got {b_scale.numel()}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must hold {N} values, got {bias.numel()}")
    return M, N, K


def scaled_mm_reference(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, gelu: bool = False,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain PyTorch: dequantize both operands in fp32, fp32 matmul, fp32 epilogue, one cast. a [..., K]."""
    gemm_mode(a, b, a_scale)
    M, N, K = _check_shapes(a, b, a_scale, b_scale, bias)
    a2 = a.reshape(M, K).float()
    if a_scale is not None:
        a2 = a2 * a_scale.reshape(M, 1).float()
    y = a2 @ (b.float() * b_scale.reshape(N, 1).float()).T
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(out_dtype).view(*a.shape[:-1], N)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None:  # the CPU interpreter: a few "SMs" so tests walk several tiles per program
        return 3
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tma_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def _tma_descriptors(mode: str, a2: torch.Tensor, b: torch.Tensor, cfg: dict):
    """Host-built TMA descriptors of A [M, K] and B [N, K] for a TMA config (as kernels/attention.py builds its own:
    no device-side allocator needed), after checking what TMA needs."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if mode == "w8a16":
        raise ValueError("TMA is implemented for the 8-bit modes (fp8, int8), not w8a16; use TMA=False")
    for name, t in (("a", a2), ("b", b)):
        if not _tma_aligned(t):
            raise ValueError(f"TMA needs {name} with a 16-byte aligned base and row stride (K a multiple of 16 for "
                             f"8-bit operands), got row stride {t.stride(0)}; use TMA=False")
    return (TensorDescriptor.from_tensor(a2, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
            TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], cfg["BLOCK_K"]]))


def scaled_mm_triton(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
                     config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel: a [..., K], b [N, K], a_scale [...] fp32 (None for w8a16), b_scale [N] fp32, bias [N]
    -> [..., N] in out_dtype (or into `out`, a contiguous [..., N] tensor). `config` overrides `pick_config`
    (keys BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; optional PERSISTENT, TMA
    and, for fp8, MAX_IMPRECISE_ACC)."""
    mode = gemm_mode(a, b, a_scale)
    M, N, K = _check_shapes(a, b, a_scale, b_scale, bias)
    lead = a.shape[:-1]
    if out is not None and (out.shape != (*lead, N) or not out.is_contiguous() or out.device != a.device):
        raise ValueError(f"out must be a contiguous {(*lead, N)} tensor on {a.device}")
    if M == 0 or N == 0 or K == 0:  # nothing to launch; the reference gives the (bias/GELU-only) result
        ref = scaled_mm_reference(a, b, a_scale, b_scale, bias, gelu, out_dtype)
        return ref if out is None else out.copy_(ref)
    a2 = a.reshape(M, K)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    out = torch.empty((*lead, N), device=a.device, dtype=out_dtype) if out is None else out
    if a.is_meta:
        return out
    out2 = out.view(M, N)
    b_scale = b_scale.reshape(N).to(torch.float32).contiguous()
    a_scale = a_scale.reshape(M).to(torch.float32).contiguous() if a_scale is not None else None
    bias = bias.reshape(N).contiguous() if bias is not None else None

    cap = capability(a.device)
    cfg = dict(config) if config is not None else pick_config(mode, M, N, K, cap)
    if config is None and cfg.get("TMA") and not (_tma_aligned(a2) and _tma_aligned(b)):
        cfg["TMA"] = False  # a table config on an odd view: pointer loads (an explicit config raises instead)
    if cfg.get("TMA") and cap is not None and cap < HOPPER:
        raise ValueError(f"TMA needs sm_90+; this GPU is sm_{cap[0]}{cap[1]}")
    persistent = cfg.pop("PERSISTENT", False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    flags = dict(HAS_A_SCALE=a_scale is not None, HAS_BIAS=bias is not None, GELU=bool(gelu),
                 UPCAST_B=mode == "w8a16", INT_ACC=mode == "int8", EVEN_K=K % cfg["BLOCK_K"] == 0,
                 DOT_FP32=mode == "w8a16" and os.environ.get("TRITON_INTERPRET") == "1")
    a_arg, b_arg = _tma_descriptors(mode, a2, b, cfg) if cfg.get("TMA") else (a2, b)
    args = (a_arg, b_arg, out2, a_scale if a_scale is not None else b_scale, b_scale,
            bias if bias is not None else b_scale, M, N, K, a2.stride(0), b.stride(0), out2.stride(0))
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if persistent:
        sms = _num_sms(a.device.index if a.device.type == "cuda" else None)
        _scaled_mm_persistent_kernel[(min(sms, tiles),)](*args, **flags, **cfg, NUM_SMS=sms, num_warps=num_warps,
                                                         num_stages=num_stages)
    else:
        _scaled_mm_kernel[(tiles,)](*args, **flags, **cfg, num_warps=num_warps, num_stages=num_stages)
    return out.view(*lead, N)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
              config: dict | None = None) -> torch.Tensor:
    """The Triton kernel on a GPU that has the mode (fp8: sm_89+, int8 and w8a16: sm_80+), the reference on the
    CPU (or a GPU without Triton). Raises UnsupportedGemmError on a GPU too old for the mode."""
    mode = gemm_mode(a, b, a_scale)
    if use_triton(a, MIN_CAPABILITY[mode]):
        return scaled_mm_triton(a, b, a_scale, b_scale, bias, gelu, out_dtype, config)
    cap = capability(a.device)
    if cap is not None and has_triton():
        need = MIN_CAPABILITY[mode]
        raise UnsupportedGemmError(f"scaled_mm mode {mode!r} needs a GPU of compute capability >= "
                                   f"{need[0]}.{need[1]} (sm_{need[0]}{need[1]}); this one is {cap[0]}.{cap[1]} "
                                   f"(sm_{cap[0]}{cap[1]})")
    return scaled_mm_reference(a, b, a_scale, b_scale, bias, gelu, out_dtype)
