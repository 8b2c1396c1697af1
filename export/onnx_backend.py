"""The DiT block as one ONNX graph with its weights as inputs (so one graph serves every block), validated against
the PyTorch block with onnxruntime as part of export.

The graph is exported through torch.export (dynamo) for one latent grid: the block's token chunking is Python
control flow on the token count, so the count is a constant of the graph, as it is of a TensorRT plan built from
it. It is exported in fp32 from the plain-PyTorch references (the fused Triton kernels are GPU-only); the engine
records the grid, the input names and the measured error (of the block's update to the residual stream). For the
fp8 / int8 / w8a16 schemes the block's linears take their Q/DQ form (quant/qdq.py): the weight inputs stay fp8 / int8
with their per-channel scales, and the graph quantizes activations per token with QuantizeLinear / DequantizeLinear
nodes. Such a graph is checked against the same Q/DQ arithmetic in PyTorch (<= 1e-3), and its distance from the
runtime's quantized block (whose GEMMs round to bf16) is recorded beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanrt.kernels.dispatch import reference_only
from wanrt.quant.qdq import OPSET, qdq_graph
from wanrt.runtime.config import Variant
from wanrt.runtime.dit import BlockGraph, rope_tables

ONNX_FILE = "compiled/dit_block.onnx"
TOLERANCE = 1e-3  # relative error of onnxruntime (fp32) against the PyTorch block


def _inputs(v: Variant, lat: tuple[int, int, int], block: dict, seed: int = 0) -> tuple:
    cfg = v.dit
    pt, ph, pw = cfg.patch_size
    grid = (lat[0] // pt, lat[1] // ph, lat[2] // pw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, grid[0] * grid[1] * grid[2], cfg.dim, generator=g)
    e0 = torch.randn(1, 6, cfg.dim, generator=g) * 0.1
    ctx_len = cfg.text_len + (cfg.image_tokens if cfg.model_type == "i2v" else 0)
    context = torch.randn(1, ctx_len, cfg.dim, generator=g)
    cos, sin = rope_tables(cfg.head_dim, grid)
    return (x, e0, context, cos, sin, *(t.float() if t.is_floating_point() and t.dtype.itemsize > 1 else t
                                        for t in block.values()))


def _feed(t: torch.Tensor):
    """An onnxruntime input: numpy, or an OrtValue for float8 (numpy has no such dtype)."""
    if t.dtype == torch.float8_e4m3fn:
        import onnx
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(),
                                                                onnx.TensorProto.FLOAT8E4M3FN)
    return t.numpy()


def _rel_err(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> float:
    """Relative error of the block's update to the residual stream (x_out - x): x itself would hide it."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - x))


def export_block_onnx(v: Variant, lat: tuple[int, int, int], block: dict[str, torch.Tensor], root: Path) -> dict:
    """Write the block graph for latents of (frames, height, width) under root, validate it, return its manifest
    entry. `block`: one block's tensors as the engine stores them (its scheme's weights; v.dit.quant names it)."""
    import onnxruntime as ort

    names = list(block)
    args = _inputs(v, lat, block)
    graph = BlockGraph(v.dit, names)
    path = root / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = ["x", "e0", "context", "rope_cos", "rope_sin", *names]
    quantized = v.dit.quant != "bf16"
    with torch.no_grad(), reference_only():
        with qdq_graph():  # no effect on a bf16 block
            want = graph(*args).numpy()
            torch.onnx.export(graph, args, str(path), dynamo=True, opset_version=OPSET, input_names=input_names,
                              output_names=["x_out"], external_data=False, verbose=False)
        runtime_block = graph(*args).float().numpy() if quantized else want
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: _feed(a) for n, a in zip(input_names, args)})[0]
    x = args[0].numpy()
    err = _rel_err(got, want, x)
    if not err <= TOLERANCE:
        raise RuntimeError(f"the ONNX block differs from the PyTorch block by {err:.2e} (relative) under "
                           f"onnxruntime, above {TOLERANCE}; not writing an engine with it")
    entry = {"file": ONNX_FILE, "latents": list(lat), "tokens": int(args[0].shape[1]), "inputs": input_names,
             "dtype": "float32", "opset": OPSET, "validated_with": f"onnxruntime {ort.__version__}",
             "rel_err_vs_torch": err}
    if quantized:
        entry.update(quantization=f"{v.dit.quant}: Q/DQ nodes, per-channel weight scales"
                                  + (", per-token activation scales" if v.dit.quant != "w8a16" else ""),
                     rel_err_vs_runtime_block=_rel_err(got, runtime_block, x))
    return entry
