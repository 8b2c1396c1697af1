"""Model configurations: one frozen dataclass per model, named presets per Wan2.1 variant.

Numbers come from the official configs (Wan-Video/Wan2.1 `wan/configs/`); see shared/reference/wan21.md.
480P and 720P checkpoints of a variant share one config: only weights and the recommended shift differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .options import TEXT_SCHEMES

K = 1024


def check_bounds(cfg, limits: dict[str, int]) -> None:
    """Sizes read from a config file are positive integers under sane limits: a typo or a hostile file must not make
    the loader allocate without bound."""
    for name, hi in limits.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ValueError(f"{type(cfg).__name__}.{name} must be an integer in 1..{hi}, got {v!r}")


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"  # "t2v" or "i2v"
    in_dim: int = 16  # i2v: 16 noise + 4 mask + 16 image latent = 36
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int = 1280  # CLIP feature width feeding img_emb (i2v only)
    image_tokens: int = 257
    # How the blocks compute (an engine records quant and attention). They change speed and rounding, not the model.
    quant: str = "bf16"  # scheme of the block linears: bf16, fp8, int8, w8a16 (quant/formats.py)
    attention: str = "sdpa"  # attention kernel: sdpa or a quantized mode of kernels/attention.py
    lora_rank: int = 0  # rank of a LoRA run beside quantized linears (runtime/lora.py side_factors); 0: none

    def __post_init__(self):
        check_bounds(self, {"in_dim": K, "dim": 64 * K, "ffn_dim": 256 * K, "num_heads": K, "num_layers": 256,
                            "out_dim": K, "freq_dim": 64 * K, "text_dim": 64 * K, "text_len": 64 * K,
                            "image_dim": 64 * K, "image_tokens": 64 * K})
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or not 0 <= self.lora_rank <= 64 * K:
            raise ValueError(f"DiTConfig.lora_rank must be an integer in 0..{64 * K}, got {self.lora_rank!r}")
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        from wanrt.kernels.attention import MODES
        from wanrt.quant.formats import SCHEMES

        if self.quant not in SCHEMES:
            raise ValueError(f"quant must be one of {SCHEMES}, got {self.quant!r}")
        if self.attention not in MODES:
            raise ValueError(f"attention must be one of {MODES}, got {self.attention!r}")
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 8 for the 3D RoPE split")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    # Latent normalisation (official `WanVAE.mean/std`); tiny test VAEs reuse them so the pipeline code path is identical.
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

    def __post_init__(self):
        check_bounds(self, {"dim": 4 * K, "z_dim": K, "num_res_blocks": 64})
        if not 1 <= len(self.dim_mult) <= 8 or len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: dim_mult {self.dim_mult} needs 1..8 levels and temperal_downsample one "
                             f"fewer, got {self.temperal_downsample}")

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression: 4x8x8 for the Wan-VAE."""
        return (2 ** sum(self.temperal_downsample), 2 ** (len(self.dim_mult) - 1), 2 ** (len(self.dim_mult) - 1))


@dataclass(frozen=True)
class TextConfig:
    """umT5 encoder (encoder only, per-layer relative position bias)."""
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    quant: str = "bf16"  # block linears, weight-only: bf16, int8 or fp8 (quant/formats.py TEXT_STORAGE)

    def __post_init__(self):
        if self.quant not in TEXT_SCHEMES:
            raise ValueError(f"text quant must be one of {TEXT_SCHEMES}, got {self.quant!r}")
        check_bounds(self, {"vocab": 4 * K * K, "dim": 64 * K, "dim_attn": 64 * K, "dim_ffn": 256 * K, "num_heads": K,
                            "num_layers": 256, "num_buckets": 4 * K, "max_distance": K * K, "text_len": 64 * K})


@dataclass(frozen=True)
class CLIPConfig:
    """Vision tower of open-clip xlm-roberta-large-vit-huge-14; the output is taken after `use_layers` blocks."""
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32
    use_layers: int = 31
    eps: float = 1e-5

    def __post_init__(self):
        check_bounds(self, {"image_size": 4 * K, "patch_size": K, "dim": 64 * K, "mlp_ratio": 64, "num_heads": K,
                            "num_layers": 256, "use_layers": 256})

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class Variant:
    name: str
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: CLIPConfig | None = None
    sizes: tuple[str, ...] = ("832*480", "480*832")  # "W*H" as in the official --size flag
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_guide_scale: float = 5.0
    frame_num: int = 81
    # MagCache ratios calibrated for this model (conditional and unconditional interleaved per step, as published);
    # empty: the published ones for a Wan2.1 variant (runtime/cache_constants.py), else none
    mag_ratios: tuple[float, ...] = ()

    @property
    def task(self) -> str:
        return self.dit.model_type


_SIZES_14B = ("1280*720", "720*1280", "832*480", "480*832")

VARIANTS: dict[str, Variant] = {
    "t2v-1.3B": Variant("t2v-1.3B", DiTConfig()),
    "t2v-14B": Variant("t2v-14B", DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), sizes=_SIZES_14B),
    "i2v-14B": Variant(
        "i2v-14B", DiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
        clip=CLIPConfig(), sizes=_SIZES_14B, sample_steps=40),
}

# Tiny configs with the exact architecture, for CPU tests and the generated demo checkpoint.
_TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=512)
_TINY_VAE = VAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2))
_TINY_TEXT = TextConfig(vocab=1000, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8,
                        max_distance=16, text_len=512)
_TINY_CLIP = CLIPConfig(image_size=28, patch_size=14, dim=32, num_heads=4, num_layers=3, use_layers=2)
_TINY_SIZES = ("64*64", "64*48", "48*64", "32*32")
VARIANTS["tiny-t2v"] = Variant("tiny-t2v", _TINY_DIT, _TINY_VAE, _TINY_TEXT, sizes=_TINY_SIZES, sample_steps=4)
VARIANTS["tiny-i2v"] = Variant("tiny-i2v", replace(_TINY_DIT, model_type="i2v", in_dim=36, image_dim=32, image_tokens=5),
                               _TINY_VAE, _TINY_TEXT,
                               clip=_TINY_CLIP, sizes=_TINY_SIZES, sample_steps=4)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
