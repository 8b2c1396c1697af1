"""wanrt: a compiled, low-memory runtime for Wan2.1 video generation.

This folder is the top-level `wanrt` module (setuptools maps it; the repo has no `wanrt/` folder so that running from
the repo root never shadows the installed package).
"""
__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, **kwargs):
    """Open an official or diffusers Wan2.1 checkpoint directory or an engine (None: the embedded demo model);
    returns a pipeline whose `generate(...)` returns a `Video` (frames + fps) that can `.save("out.mp4")`. Keyword
    arguments: vram_budget, ram_budget (bytes), vae_dtype."""
    from wanrt.runtime import DEMO_MODEL
    from wanrt.runtime.pipeline import load as _load

    return _load(DEMO_MODEL if path is None else path, device, dtype, **kwargs)
