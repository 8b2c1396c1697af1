"""A TensorRT plan of the DiT block, built from the engine's ONNX graph through TensorRT's documented Python API
(builder, strongly typed network, ONNX parser, serialized plan).

NOT RUN HERE: TensorRT cannot be installed on our machines (PyPI's packages are stubs pointing to NVIDIA's index),
so this path has never been executed; it is kept small and typed, and fails with a clear message when `tensorrt` is
missing. The plan is tied to the GPU it is built on, which the manifest records.
"""
from __future__ import annotations

from pathlib import Path

import torch

PLAN_FILE = "compiled/dit_block.plan"


def require():
    """The tensorrt module, or a clear error saying why this machine cannot build plans (checked before export)."""
    try:
        import tensorrt
    except ImportError:
        raise ValueError("the tensorrt backend needs NVIDIA's TensorRT Python package (from NVIDIA's package index; "
                         "PyPI's is a stub); it is not installed") from None
    if not torch.cuda.is_available():
        raise ValueError("building a TensorRT plan needs the GPU it will run on; this machine has none")
    return tensorrt


def build_plan(root: Path, onnx: dict) -> tuple[dict, list[int]]:
    """Build root/PLAN_FILE from the ONNX entry of the manifest; return its manifest entry and the capability."""
    trt = require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: the ONNX graph's dtypes are kept as they are, none chosen by the builder
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(root / onnx["file"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx['file']}: {errors}")
    config = builder.create_builder_config()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build a plan for the DiT block (see its log above)")
    path = root / PLAN_FILE
    path.write_bytes(bytes(plan))
    capability = list(torch.cuda.get_device_capability())
    return {"file": PLAN_FILE, "from": onnx["file"], "tensorrt": trt.__version__, "strongly_typed": True}, capability
