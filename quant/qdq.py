"""The quantized linear in Q/DQ form, for the ONNX graphs of quantized engines.

Inside `qdq_graph()` the DiT's quantized linears compute

    y = DQ(Q(x, s_x), s_x) @ DQ(W_q, s_W)^T + b        s_x = max_k |x_k| / qmax per token (fp8 / int8 schemes)
    y = x @ DQ(W_q, s_W)^T + b                         (w8a16)

with DQ / Q the ONNX DequantizeLinear / QuantizeLinear operators (per-axis scales, zero points 0): while torch.onnx
exports, they are emitted as those nodes, the form in which onnxruntime and TensorRT recognise quantized GEMMs;
otherwise they run as the same arithmetic in PyTorch, which export compares the graph against. The weights stay graph
inputs, as in the bf16 graph. Activations stay in x's dtype between ops (fp32 in the exported graph), where the
runtime's GEMMs round their outputs to bf16.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from wanrt.kernels.quantize import QMAX

from .formats import SCHEME_INFO

OPSET = 21  # float8 Q/DQ needs 19+; 21 is what the export pins
_active = False


def active() -> bool:
    """True inside `qdq_graph()`: linears take the Q/DQ form and the norms hand them unquantized activations."""
    return _active


@contextlib.contextmanager
def qdq_graph():
    global _active
    saved, _active = _active, True
    try:
        yield
    finally:
        _active = saved


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ONNX QuantizeLinear along axis 0: saturate(round_half_even(x / scale)), scale [rows]."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, torch.zeros(scale.shape, dtype=dtype)),
                                       {"axis": 0}, dtype=dtype, shape=x.shape, version=OPSET)
    y = (x / scale[:, None]).clamp(-QMAX[dtype], QMAX[dtype])
    return y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ONNX DequantizeLinear along axis 0: q * scale, in the scale's dtype."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, torch.zeros(scale.shape, dtype=q.dtype)),
                                       {"axis": 0}, dtype=scale.dtype, shape=q.shape, version=OPSET)
    return q.to(scale.dtype) * scale[:, None]


def qdq_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               scheme: str, gelu: bool = False) -> torch.Tensor:
    """The scheme's linear with its quantization as Q/DQ operators; x [..., K] -> [..., N] in x's dtype."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1]).float()
    act = SCHEME_INFO[scheme].activation_dtype
    if act is not None:
        scale = x2.abs().amax(-1) / QMAX[act]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token keeps a finite scale
        x2 = dequantize(quantize(x2, scale, act), scale)
    y = x2 @ dequantize(weight, weight_scale.float()).T
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(dtype).reshape(*x.shape[:-1], -1)
