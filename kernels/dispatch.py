"""Where a Triton kernel may run: CUDA tensors on a GPU of the needed capability, with Triton importable. Everything
else (CPUs, older GPUs, no Triton) takes the plain-PyTorch reference beside each kernel. CPU tests call the Triton
launchers directly under TRITON_INTERPRET=1."""
from __future__ import annotations

import contextlib
import functools

import torch

AMPERE, ADA, HOPPER = (8, 0), (8, 9), (9, 0)
_reference_only = False


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def use_triton(t: torch.Tensor, min_capability: tuple[int, int] = AMPERE) -> bool:
    """True when t lives on a CUDA GPU of at least `min_capability` and Triton imports (and no `reference_only`).
    Meta tensors count as such a GPU: the planner traces the fused kernels' allocations (their outputs only; each
    launcher returns before launching), not the temporaries of the references."""
    if _reference_only or not has_triton():
        return False
    if t.is_meta:
        return True
    cap = capability(t.device)
    return cap is not None and cap >= min_capability


@contextlib.contextmanager
def reference_only():
    """Run the plain-PyTorch references everywhere inside (benchmarks measure what the fused kernels save)."""
    global _reference_only
    saved, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = saved
