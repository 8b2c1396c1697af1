"""wanrt: a compiled, low-memory runtime for Wan2.1 video generation.

This folder is the top-level `wanrt` package (setuptools maps it). Its name is not an importable one that another
distribution could use, and the other top-level folders have no `__init__.py`, so running from the repository root
never shadows an installed package (tests/test_layout.py).
"""
__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, **kwargs):
    """Open an official or diffusers Wan2.1 checkpoint directory or an engine (None: the embedded demo model);
    returns a pipeline whose `generate(...)` returns a `Video` (frames + fps) that can `.save("out.mp4")`. Keyword
    arguments: vram_budget, ram_budget (bytes), vae_dtype."""
    from wanrt.runtime.pipeline import load as _load

    return _load(path, device, dtype, **kwargs)
