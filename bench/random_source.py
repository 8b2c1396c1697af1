"""A stand-in for a Checkpoint holding random full-size weights in memory, so GPU benchmarks of whole generations need
neither a download nor a multi-GB disk round trip. Weights are drawn on the GPU, in each tensor's inference dtype."""
from __future__ import annotations

import tempfile
from functools import cached_property
from pathlib import Path

import torch

from wanrt.bench.common import random_state
from wanrt.testing.tiny_tokenizer import RANDOM_VOCAB, write_tiny_tokenizer
from wanrt.runtime.config import get_variant


class RandomSource:
    """Each model's weights are drawn once and kept, so a pipeline and the peers compared with it share them."""
    layout = "random"

    def __init__(self, variant: str, dtype: torch.dtype = torch.bfloat16):
        self.variant = get_variant(variant)
        self.dtype = dtype
        self.root = Path(tempfile.mkdtemp(prefix="wanrt-random-"))
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def task(self) -> str:
        return self.variant.task

    @cached_property
    def tokenizer_dir(self) -> Path:
        return write_tiny_tokenizer(self.root / "tokenizer", RANDOM_VOCAB)

    def _random(self, cls, cfg, dtype) -> dict[str, torch.Tensor]:
        if cls.__name__ not in self._states:
            with torch.device("meta"):
                model = cls(cfg)
            model = model.to_inference_dtype(dtype) if hasattr(model, "to_inference_dtype") else model.to(dtype)
            self._states[cls.__name__] = random_state(model, device="cuda" if torch.cuda.is_available() else "cpu")
        return self._states[cls.__name__]

    def dit_state(self, mmap: bool = False):
        from wanrt.runtime.dit import WanDiT

        return self._random(WanDiT, self.variant.dit, self.dtype)

    def text_state(self, mmap: bool = False):
        from wanrt.runtime.text import UMT5Encoder

        return self._random(UMT5Encoder, self.variant.text, self.dtype)

    def vae_state(self):
        from wanrt.runtime.vae import WanVAE

        return self._random(WanVAE, self.variant.vae, torch.float32)

    def clip_state(self):
        from wanrt.runtime.clip import CLIPVision

        return self._random(CLIPVision, self.variant.clip, self.dtype)
