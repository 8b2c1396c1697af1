"""Where a Triton kernel may run: CUDA tensors on a GPU of the needed capability, with Triton importable. Everything
else (CPUs, older GPUs, no Triton) takes the plain-PyTorch reference beside each kernel. CPU tests call the Triton
launchers directly under TRITON_INTERPRET=1."""
from __future__ import annotations

import functools

import torch

AMPERE, ADA, HOPPER = (8, 0), (8, 9), (9, 0)


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
    """True when t lives on a CUDA GPU of at least `min_capability` and Triton imports."""
    cap = capability(t.device)
    return cap is not None and cap >= min_capability and has_triton()
