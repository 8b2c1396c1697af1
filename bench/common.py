"""Shared benchmark helpers: timing with CUDA events, memory caps, random full-size weights, reports."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

GiB = 2**30


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown"
    import triton

    return {"gpu": props.name, "memory_gib": round(props.total_memory / GiB, 1), "capability": list(
        torch.cuda.get_device_capability()), "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version()}


def cap_memory(budget: int | None) -> None:
    """Cap the caching allocator at `budget` bytes (None: the whole device) and start peak statistics afresh."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else min(budget / total, 1.0))
    torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    return {"max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}


def time_it(fn, warmup: int = 1, runs: int = 3) -> dict:
    """Median and spread of `runs` timed calls after `warmup` calls, in milliseconds: CUDA events on a GPU,
    the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "runs": runs}


def random_like(t: torch.Tensor, name: str, device: str = "cuda",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Random values of a trained-looking scale for a parameter of this name and shape, drawn on `device` (from
    `generator` if given)."""
    x = torch.randn(t.shape, device=device, dtype=torch.float32, generator=generator)
    if t.ndim >= 2:
        x *= 1 / math.sqrt(math.prod(t.shape[1:]))
    elif name.endswith(("norm.weight", "gamma")) or ".norm" in name or "norm_" in name:
        x = 1 + 0.1 * x
    else:
        x *= 0.02
    return x.to(t.dtype)


def random_state(module: torch.nn.Module, to_cpu: bool = True, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Random weights for every parameter of a (meta) module, in each parameter's dtype, drawn on `device`."""
    out = {}
    for name, p in module.named_parameters():
        t = random_like(p, name, device)
        out[name] = t.cpu() if to_cpu else t
    return out


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename: an interrupted run never leaves a half-written report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict, out: Path, markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown)
