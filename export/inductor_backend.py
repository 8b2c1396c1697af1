"""The DiT block as one AOTInductor package (torch.export + AOTInductor, `.pt2`) with its weights as inputs, so one
compiled graph serves every streamed block and a run needs no compilation.

Compiled for one device and one latent grid (the block's token chunking is Python control flow on the token count),
from the plain-PyTorch block: Inductor generates and fuses its own kernels (Triton on a GPU, C++ on a CPU) and
does its tuning here, at export. Inputs take the dtypes the pipeline holds on that device (bf16 weights and context
on a GPU, fp32 on a CPU; the residual stream, time projection, modulation and RoPE tables always fp32). Validated
against the eager block before it is written into the engine, in a fresh process: AOTInductor's package loader can
kill its process outright (on an H100 with torch 2.11 + CUDA 13.0 it segfaults loading any CUDA package, even one
of a single Linear), and an export must then fail with a message, writing no engine.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.config import Variant
from wanrt.runtime.dit import keeps_fp32

from .onnx_backend import _BlockGraph, _inputs

PACKAGE_FILE = "compiled/dit_block.pt2"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error against the eager block


def block_inputs(v: Variant, lat: tuple[int, int, int], block: dict, device: torch.device) -> tuple:
    """Example inputs in the pipeline's dtypes on `device` (what the package is compiled for)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = {k: t.to(torch.float32 if keeps_fp32(k) else dtype) for k, t in block.items()}
    x, e0, context, cos, sin, *ws = _inputs(v, lat, weights)
    ws = [t.to(weights[k].dtype) for k, t in zip(weights, ws)]
    return tuple(t.to(device) for t in (x, e0, context.to(dtype), cos, sin, *ws))


def export_block_inductor(v: Variant, lat: tuple[int, int, int], block: dict[str, torch.Tensor], root: Path,
                          device: torch.device) -> dict:
    """Compile and write the package for latents of (frames, height, width) on `device`; return its manifest entry."""
    args = block_inputs(v, lat, block, device)
    graph = _BlockGraph(v.dit, list(block))
    path = root / PACKAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), reference_only():
        want = graph(*args)
        program = torch.export.export(graph, args)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    err = validate_in_child(path, args, want, device)
    limit = TOLERANCE[args[2].dtype]
    if not err <= limit:
        raise RuntimeError(f"the compiled block differs from the eager one by {err:.2e} (relative), above {limit}")
    return {"file": PACKAGE_FILE, "latents": list(lat), "tokens": int(args[0].shape[1]), "device": device.type,
            "weights": list(block), "dtype": str(args[2].dtype).removeprefix("torch."), "rel_err_vs_eager": err,
            "torch": torch.__version__}


def child_command(package: Path, io: Path, device: torch.device) -> list[str]:
    return [sys.executable, "-m", "wanrt.export.inductor_backend", str(package), str(io), device.type]


def validate_in_child(package: Path, args: tuple, want: torch.Tensor, device: torch.device) -> float:
    """The package's relative error against `want` on `args`, loaded and run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        io = Path(tmp) / "io.safetensors"
        save_file({**{f"arg{i}": a.contiguous().cpu() for i, a in enumerate(args)}, "want": want.contiguous().cpu()},
                  str(io))
        proc = subprocess.run(child_command(package, io, device), capture_output=True, text=True)
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        detail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"AOTInductor could not load and run the compiled block in a fresh process ({how}: "
                           f"{detail[0]}); this torch build cannot serve the inductor backend here. Export without "
                           f"it (the eager engine runs the same blocks).")
    return float(proc.stdout.strip().splitlines()[-1])


def _run_package(package: str, io: str, device: str) -> None:
    tensors = load_file(io, device=device)
    want = tensors.pop("want").float()
    args = [tensors[f"arg{i}"] for i in range(len(tensors))]
    with torch.no_grad():
        got = torch._inductor.aoti_load_package(package)(*args).float()
    print(((got - want).norm() / want.norm()).item())


if __name__ == "__main__":  # the validation's child process: package, inputs-and-expected file, device
    _run_package(*sys.argv[1:4])
