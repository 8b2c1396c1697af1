"""`triton` and `triton.language` when Triton is installed. Without it (a CPU-only install: Triton comes with the test
extra and with CUDA builds of PyTorch), a stand-in whose `jit` leaves functions as they are, so every kernel module
still imports; the dispatchers then never launch a kernel (`dispatch.has_triton`)."""
try:
    import triton
    import triton.language as tl
except ImportError:
    import types

    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = None
