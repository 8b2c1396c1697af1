"""NF4 weights through bitsandbytes: 4-bit NormalFloat codes in blocks of 64 weights, each block with an fp32 absmax.
The smallest footprint of the schemes (about 0.56 byte per weight against 1 for int8 and 2 for bf16), at an error
int8 and fp8 never reach (bench/results/options_h100.md).

Stored flat like the other schemes: {"weight": uint8 [N, K/2] (two codes a byte, bitsandbytes' packing, rows whole
because K is a multiple of 64), "weight_scale": fp32 [N, K/64] (the blocks' absmax)}. The linear dequantizes the
weight to the activations' dtype in bitsandbytes' kernel and runs a 16-bit GEMM, as bitsandbytes itself does for more
than one row of activations: it saves memory, never time. On meta tensors (the planner's traces) both steps only
allocate, so the dequantized weight is priced like any activation.
"""
from __future__ import annotations

import torch

BLOCK = 64


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise ValueError("the nf4 scheme needs bitsandbytes: pip install bitsandbytes") from None
    return F


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """An nn.Linear weight [N, K] -> {"weight": uint8 [N, K/2], "weight_scale": fp32 [N, K/64]}."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"nf4 needs input widths that are multiples of {BLOCK}, got {k}")
    if weight.is_meta:
        return {"weight": torch.empty(n, k // 2, dtype=torch.uint8, device="meta"),
                "weight_scale": torch.empty(n, k // BLOCK, device="meta")}
    q, state = _bnb().quantize_4bit(weight.contiguous(), blocksize=BLOCK, quant_type="nf4")
    return {"weight": q.view(n, k // 2), "weight_scale": state.absmax.float().view(n, k // BLOCK)}


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, K/2] and fp32 [N, K/64] -> the weight [N, K] in `dtype`."""
    n, k = q.shape[0], q.shape[1] * 2
    if q.is_meta:
        return torch.empty(n, k, dtype=dtype, device="meta")
    F = _bnb()
    state = F.QuantState(absmax=scale.reshape(-1).float(), shape=torch.Size((n, k)), blocksize=BLOCK,
                         code=F.get_4bit_type("nf4", q.device), quant_type="nf4", dtype=dtype)
    return F.dequantize_4bit(q.reshape(-1, 1), state)
