"""Quantized linear layers over the kernels: y = act(x @ W^T + b) with W stored as in quant.formats.

  fp8 / int8   x is quantized per token (kernels.quantize, one fp32 scale per row), then one scaled GEMM:
               y = (q_x @ q_W^T) * s_x[:, None] * s_W[None, :] + b
  w8a16        y = (x @ q_W^T) * s_W[None, :] + b, with q_W upcast to bf16 inside the GEMM
  nf4          y = x @ dequantize(q_W)^T + b: bitsandbytes' dequantization, then a bf16 GEMM (quant/nf4.py)
  bf16         F.linear

The optional tanh-GELU runs in the GEMM epilogue (the FFN's first linear). Outputs are bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wanrt.kernels.quantize import quantize_rows
from wanrt.kernels.scaled_gemm import scaled_mm

from . import qdq
from .formats import SCHEME_INFO, dequantize_linear_weight, quantize_linear_weight


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                     bias: torch.Tensor | None, scheme: str, gelu: bool = False,
                     x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or fp32; or, with `x_scale` [...], already quantized to the scheme's activation dtype by
    a producer that fuses the quantization) -> bf16 [..., N]."""
    if scheme not in SCHEME_INFO:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    if scheme == "bf16":
        y = F.linear(x.to(weight.dtype), weight, bias.to(weight.dtype) if bias is not None else None)
        return F.gelu(y, approximate="tanh") if gelu else y
    if weight_scale is None:
        raise ValueError(f"scheme {scheme!r} needs the weight's per-channel weight_scale")
    if scheme == "nf4":  # bf16 activations; the weight dequantized in bitsandbytes' kernel for one 16-bit GEMM
        if x_scale is not None:
            raise ValueError("nf4 takes 16-bit activations, not quantized ones")
        dtype = torch.bfloat16 if x.is_cuda else x.dtype  # fp32 on the CPU, as every reference runs there
        y = F.linear(x.to(dtype), dequantize_linear_weight(weight, weight_scale, dtype),
                     bias.to(dtype) if bias is not None else None)
        return F.gelu(y, approximate="tanh") if gelu else y
    if qdq.active():  # an ONNX graph in Q/DQ form (quant/qdq.py)
        if x_scale is not None:
            raise ValueError("in a Q/DQ graph each linear quantizes its own activations")
        return qdq.qdq_linear(x, weight, weight_scale, bias, scheme, gelu)
    act = SCHEME_INFO[scheme].activation_dtype
    if act is None:  # w8a16
        if x_scale is not None:
            raise ValueError("w8a16 takes bf16 activations, not quantized ones")
        return scaled_mm(x.to(torch.bfloat16), weight, None, weight_scale, bias, gelu)
    if x_scale is None:
        x, x_scale = quantize_rows(x, act)
    elif x.dtype != act:
        raise TypeError(f"scheme {scheme!r}: a pre-quantized x must be {act}, got {x.dtype}")
    return scaled_mm(x, weight, x_scale, weight_scale, bias, gelu)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), computed in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def linear_error_report(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, scheme: str,
                        gelu: bool = False) -> float:
    """Relative error of the `scheme` linear against bf16 F.linear (+ tanh-GELU when `gelu`) on the same inputs."""
    weight = weight.to(torch.bfloat16)  # the bf16 model is the reference; quantize what it holds
    bf16_bias = bias.to(torch.bfloat16) if bias is not None else None
    ref = F.linear(x.to(torch.bfloat16), weight, bf16_bias)
    if gelu:
        ref = F.gelu(ref, approximate="tanh")
    q = quantize_linear_weight(weight, scheme)
    out = quantized_linear(x, q["weight"], q.get("weight_scale"), bias, scheme, gelu)
    return relative_error(out, ref)
