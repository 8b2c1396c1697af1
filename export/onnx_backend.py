"""The DiT block as one ONNX graph with its weights as inputs (so one graph serves every block), validated against
the PyTorch block with onnxruntime as part of export.

The graph is exported through torch.export (dynamo) for one latent grid: the block's token chunking is Python
control flow on the token count, so the count is a constant of the graph, as it is of a TensorRT plan built from
it. It is exported in fp32 from the plain-PyTorch references (the fused Triton kernels are GPU-only); the engine
records the grid, the input names and the measured error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanrt.kernels.dispatch import reference_only
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


def export_block_onnx(v: Variant, lat: tuple[int, int, int], block: dict[str, torch.Tensor], root: Path) -> dict:
    """Write the block graph for latents of (frames, height, width) under root, validate it, return its manifest
    entry. `block`: one block's tensors as the engine stores them (its scheme's weights)."""
    import onnxruntime as ort

    names = list(block)
    args = _inputs(v, lat, block)
    graph = BlockGraph(v.dit, names)
    path = root / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = ["x", "e0", "context", "rope_cos", "rope_sin", *names]
    with torch.no_grad(), reference_only():
        want = graph(*args).numpy()
        program = torch.export.export(graph, args)
        torch.onnx.export(program, args, str(path), dynamo=True, input_names=input_names, output_names=["x_out"],
                          external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(input_names, args)})[0]
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    if not err <= TOLERANCE:
        raise RuntimeError(f"the ONNX block differs from the PyTorch block by {err:.2e} (relative) under "
                           f"onnxruntime, above {TOLERANCE}; not writing an engine with it")
    return {"file": ONNX_FILE, "latents": list(lat), "tokens": int(args[0].shape[1]), "inputs": input_names,
            "dtype": "float32", "validated_with": f"onnxruntime {ort.__version__}", "rel_err_vs_torch": err}
