"""The DiT block compiled by Inductor at export, with its weights as inputs, so one compiled graph serves every
streamed block and a run generates no code. Two forms:

- "inductor": one AOTInductor package (torch.export + AOTInductor, `.pt2`), loaded and run without Python tracing;
- "compile": torch.compile's cache artifacts (`torch.compiler.save_cache_artifacts`). A run replays them and compiles
  the same graph again; Dynamo traces it (seconds), and Inductor finds its output, kernels and tuning in the cache.
  A fallback for machines where AOTInductor's loader fails. On our H100 (torch 2.11 + CUDA 13.0) it segfaults while
  loading any CUDA package, even one of a single Linear.

Each is compiled for one device and one latent grid (the block's token chunking is Python control flow on the token
count), from the plain-PyTorch block: Inductor generates and fuses its own kernels (Triton on a GPU, C++ on a CPU)
and tunes them here, at export. Inputs take the dtypes the pipeline holds on that device (bf16 weights and context
on a GPU, fp32 on a CPU; the residual stream, time projection, modulation and RoPE tables always fp32). Export
validates the artifact against the eager block in a fresh process, as a run loads it. A loader that kills its
process fails the export with a message, and no engine is written. A "compile" artifact must also load without any
new compilation there.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.checkpoint import _tuples
from wanrt.runtime.config import DiTConfig, Variant
from wanrt.runtime.dit import BlockGraph, keeps_fp32
from wanrt.runtime.engine import load_block_runner

from .onnx_backend import _inputs

ARTIFACT = {"inductor": "compiled/dit_block.pt2", "compile": "compiled/dit_block.inductor_cache"}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error against the eager block


def block_inputs(v: Variant, lat: tuple[int, int, int], block: dict, device: torch.device) -> tuple:
    """Example inputs in the pipeline's dtypes on `device` (what the package is compiled for)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = {k: t.to(torch.float32 if keeps_fp32(k) else dtype) for k, t in block.items()}
    x, e0, context, cos, sin, *ws = _inputs(v, lat, weights)
    ws = [t.to(weights[k].dtype) for k, t in zip(weights, ws)]
    return tuple(t.to(device) for t in (x, e0, context.to(dtype), cos, sin, *ws))


def export_block_inductor(v: Variant, lat: tuple[int, int, int], block: dict[str, torch.Tensor], root: Path,
                          device: torch.device, kind: str = "inductor") -> dict:
    """Compile and write the artifact of `kind` for latents of (frames, height, width) on `device`; return its
    manifest entry."""
    args = block_inputs(v, lat, block, device)
    graph = BlockGraph(v.dit, list(block))
    path = root / ARTIFACT[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), reference_only():
        want = graph(*args)
        if kind == "inductor":
            torch._inductor.aoti_compile_and_package(torch.export.export(graph, args), package_path=str(path))
    with child_spec(kind, path, graph, args, want, device) as spec:
        if kind == "compile":  # in a fresh process too: what this one compiled before must not enter the artifacts
            in_child(spec, "build")
        check = in_child(spec, "check")
    err, limit = check.pop("rel_err"), TOLERANCE[args[2].dtype]
    if not err <= limit:
        raise RuntimeError(f"the compiled block differs from the eager one by {err:.2e} (relative), above {limit}")
    if kind == "compile" and (check["compiled"] or not check["cache_hits"]):
        raise RuntimeError(f"a fresh process compiled the block again instead of loading it from the engine's cache "
                           f"({check}); not writing an engine that compiles at run time")
    return {"file": ARTIFACT[kind], "latents": list(lat), "tokens": int(args[0].shape[1]), "device": device.type,
            "weights": list(block), "dtype": str(args[2].dtype).removeprefix("torch."), "rel_err_vs_eager": err,
            "fresh_process": check, "torch": torch.__version__}


@contextmanager
def child_spec(kind: str, artifact: Path, graph: BlockGraph, args: tuple, want: torch.Tensor, device: torch.device):
    """A temporary spec file for the child processes: the artifact, the graph, and its inputs and expected output."""
    with tempfile.TemporaryDirectory() as tmp:
        io, spec = Path(tmp) / "io.safetensors", Path(tmp) / "spec.json"
        save_file({**{f"arg{i}": a.contiguous().cpu() for i, a in enumerate(args)}, "want": want.contiguous().cpu()},
                  str(io))
        spec.write_text(json.dumps({"kind": kind, "artifact": str(artifact), "io": str(io), "device": device.type,
                                    "cfg": dataclasses.asdict(graph.cfg), "names": graph.names}))
        yield spec


def child_command(spec: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "wanrt.export.inductor_backend", str(spec), mode]


def in_child(spec: Path, mode: str) -> dict:
    """Run `mode` of the spec in a fresh process: "build" writes a "compile" artifact; "check" loads and runs the
    artifact as a run would, returning its relative error against the expected output and how many graphs that
    process took from Inductor's cache or compiled anew."""
    proc = subprocess.run(child_command(spec, mode), capture_output=True, text=True)
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        detail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"the compiled block could not be {'built' if mode == 'build' else 'loaded and run'} in a "
                           f"fresh process ({how}: {detail[0]}); this torch build cannot serve that backend here. "
                           f"Export without it (the eager engine runs the same blocks).")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_in_child(spec_path: str, mode: str) -> None:
    from torch._dynamo.utils import counters

    spec = json.loads(Path(spec_path).read_text())
    tensors = load_file(spec["io"], device=spec["device"])
    want = tensors.pop("want").float()
    args = [tensors[f"arg{i}"] for i in range(len(tensors))]
    cfg, artifact = DiTConfig(**_tuples(spec["cfg"])), Path(spec["artifact"])
    with torch.no_grad():
        if mode == "build":
            with reference_only():
                torch.compile(BlockGraph(cfg, spec["names"]), dynamic=False, fullgraph=True)(*args)
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                raise RuntimeError("torch.compile left no cache artifacts (is Inductor's FX graph cache disabled?)")
            artifact.write_bytes(artifacts[0])
            print("{}")
            return
        got = load_block_runner(spec["kind"], artifact, cfg, spec["names"])(*args).float()
    print(json.dumps({"rel_err": ((got - want).norm() / want.norm()).item(),
                      "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
                      "compiled": counters["inductor"]["fxgraph_cache_miss"]}))


if __name__ == "__main__":  # the child processes: spec file, mode
    _run_in_child(*sys.argv[1:3])
