"""Random-weight checkpoints in the real layouts, so tests and the demo need no download.

- official layout: our own modules' parameter names (the official ones), in the released files and dtypes
  (`diffusion_pytorch_model.safetensors`, sharded past 10 GB as the 14B's; `.pth` files read back through
  `torch.load(weights_only=True)`), each tensor drawn as it is written, so a 14B checkpoint needs no 14B of RAM.
- diffusers layout: diffusers' and transformers' own classes, written with their `save_pretrained`.
`convert_to_official` rewrites any checkpoint we can read in the official layout, so both layouts can carry identical
weights. Every writer builds in a temporary folder and renames it at the end: no half-written checkpoint is left.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanrt.bench.common import random_like
from wanrt.runtime.atomic import atomic_dir
from wanrt.runtime.checkpoint import OFFICIAL_FILES, open_checkpoint
from wanrt.runtime.config import CLIPConfig, TextConfig, Variant, VAEConfig, get_variant

from .tiny_tokenizer import RANDOM_VOCAB, write_tiny_tokenizer


# The released files' dtypes (shared/reference/wan21.md): DiT fp32, umT5 bf16, VAE fp32, CLIP fp16.
FILE_DTYPES = {"dit": torch.float32, "text": torch.bfloat16, "vae": torch.float32, "clip": torch.float16}
# The 14B DiT ships in six shards of about 10 GB, the 1.3B one as a single file: past this size, shards.
SHARD_BYTES = 10 * 2**30


class RandomState(Mapping):
    """One model's random weights (official names, the released dtype), each tensor drawn when it is read from a seed
    of its own: the same values in any order, and a multi-GB model is written piece by piece, never held whole."""

    def __init__(self, module_cls, cfg, dtype: torch.dtype, seed: int):
        with torch.device("meta"):
            self._meta = {k: t.to(dtype) for k, t in module_cls(cfg).state_dict().items()}
        self._seed = seed

    def __getitem__(self, name: str) -> torch.Tensor:
        # one 32-bit seed per tensor: the CPU generator keeps only 32 bits of a larger one
        g = torch.Generator().manual_seed(zlib.crc32(f"{self._seed}/{name}".encode()))
        return random_like(self._meta[name], name, "cpu", g)

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def numel(self) -> int:
        return sum(t.numel() for t in self._meta.values())


def random_states(variant: Variant, seed: int) -> dict[str, RandomState]:
    """Random weights of every component, official names, drawn as they are written."""
    from wanrt.runtime.clip import CLIPVision
    from wanrt.runtime.dit import WanDiT
    from wanrt.runtime.text import UMT5Encoder
    from wanrt.runtime.vae import WanVAE

    parts = {"dit": (WanDiT, variant.dit), "vae": (WanVAE, variant.vae), "text": (UMT5Encoder, variant.text)}
    if variant.clip is not None:
        parts["clip"] = (CLIPVision, variant.clip)
    return {part: RandomState(cls, cfg, FILE_DTYPES[part], seed * 8 + i)
            for i, (part, (cls, cfg)) in enumerate(parts.items())}


def save_sharded(state: Mapping[str, torch.Tensor], folder: Path, file: str, max_bytes: int = SHARD_BYTES) -> None:
    """`file` (a .safetensors name) as one file, or, past `max_bytes`, as shards `stem-0000i-of-0000n.safetensors`
    with the index `file.index.json` that the releases and diffusers use. One shard is in memory at a time."""
    stem = file.removesuffix(".safetensors")
    written = []  # (temporary path, names, bytes)
    for group in _groups(state, max_bytes):
        path = folder / f"{stem}.part{len(written)}"
        save_file(group, path)
        written.append((path, list(group), sum(t.nbytes for t in group.values())))
        del group
    if len(written) == 1:
        written[0][0].rename(folder / file)
        return
    weight_map = {}
    for i, (path, names, _) in enumerate(written, 1):
        shard = f"{stem}-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": sum(n for *_, n in written)}, "weight_map": weight_map}
    (folder / f"{file}.index.json").write_text(json.dumps(index, indent=2))


def _groups(state: Mapping[str, torch.Tensor], max_bytes: int):
    """The tensors of `state` in order, in groups of at most max_bytes (a larger tensor alone)."""
    group, size = {}, 0
    for name in state:
        t = state[name].contiguous()
        if group and size + t.nbytes > max_bytes:
            yield group
            group, size = {}, 0
        group[name] = t
        size += t.nbytes
    yield group


def write_official(out: str | Path, variant: Variant, states: dict[str, Mapping[str, torch.Tensor]],
                   tokenizer_dir: Path | None = None, safetensors: bool = False) -> Path:
    """Write `states` (official names) in the official Wan2.1 file layout; with `safetensors`, the VAE and text
    encoder too are safetensors files of the official stems (what the readers accept from small models of ours), and
    the variant's name, sizes and sampling defaults go into config.json."""
    with atomic_dir(out) as tmp:
        config = {"_class_name": "WanModel", **_jsonable(dataclasses.asdict(variant.dit))}
        extra = {name: _jsonable(dataclasses.asdict(cfg)) for name, cfg, default in
                 (("vae", variant.vae, VAEConfig()), ("text", variant.text, TextConfig()),
                  ("clip", variant.clip, CLIPConfig())) if cfg is not None and cfg != default}
        if safetensors:
            extra["variant"] = {"name": variant.name, "sizes": list(variant.sizes),
                                "sample_steps": variant.sample_steps, "sample_shift": variant.sample_shift,
                                "sample_guide_scale": variant.sample_guide_scale, "frame_num": variant.frame_num}
        if extra:
            config["wanrt"] = extra  # only non-standard (tiny) models need this; real checkpoints have none
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_sharded(states["dit"], tmp, OFFICIAL_FILES["dit"])
        for part in ("vae", "text"):
            if safetensors:
                save_file(_contiguous(states[part]), tmp / Path(OFFICIAL_FILES[part]).with_suffix(".safetensors"))
            else:
                torch.save(dict(states[part].items()), tmp / OFFICIAL_FILES[part])
        if "clip" in states:  # the official file holds the whole CLIP model; its vision tower sits under `visual.`
            torch.save({f"visual.{k}": v for k, v in states["clip"].items()}, tmp / OFFICIAL_FILES["clip"])
        tok = tmp / OFFICIAL_FILES["tokenizer"]
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tok)
        else:
            write_tiny_tokenizer(tok, min(variant.text.vocab, RANDOM_VOCAB))
    return Path(out)


def check_ram_for_fp32(variant: Variant) -> None:
    """The diffusers layout builds each model whole in fp32: refuse in one line, before building, a variant whose
    largest model (with a quarter more for saving it) does not fit the available RAM, rather than being OOM-killed."""
    from wanrt.runtime.pipeline import available_ram

    need = max(state.numel() for state in random_states(variant, 0).values()) * 5  # 4 bytes, and a quarter more
    if need > available_ram():
        raise ValueError(f"--layout diffusers builds {variant.name}'s models whole in fp32, which needs about "
                         f"{need / 2**30:.0f} GiB of RAM; {available_ram() / 2**30:.0f} GiB is available. "
                         "--layout official writes any size in about 12 GB")


def write_diffusers(out: str | Path, variant: Variant, seed: int) -> Path:
    """Random weights through diffusers' / transformers' own classes and their save_pretrained."""
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    check_ram_for_fp32(variant)
    d, v, t, c = variant.dit, variant.vae, variant.text, variant.clip
    i2v = d.model_type == "i2v"
    torch.manual_seed(seed)
    with atomic_dir(out) as tmp:
        WanTransformer3DModel(
            patch_size=d.patch_size, num_attention_heads=d.num_heads, attention_head_dim=d.head_dim,
            in_channels=d.in_dim, out_channels=d.out_dim, text_dim=d.text_dim, freq_dim=d.freq_dim,
            ffn_dim=d.ffn_dim, num_layers=d.num_layers, eps=d.eps, image_dim=d.image_dim if i2v else None,
            added_kv_proj_dim=d.dim if i2v else None).save_pretrained(tmp / "transformer")
        AutoencoderKLWan(base_dim=v.dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult), num_res_blocks=v.num_res_blocks,
                         attn_scales=[], temperal_downsample=list(v.temperal_downsample),
                         latents_mean=list(v.latents_mean), latents_std=list(v.latents_std)
                         ).save_pretrained(tmp / "vae")
        UMT5EncoderModel(UMT5Config(
            vocab_size=t.vocab, d_model=t.dim, d_kv=t.dim_attn // t.num_heads, d_ff=t.dim_ffn,
            num_layers=t.num_layers, num_heads=t.num_heads, relative_attention_num_buckets=t.num_buckets,
            relative_attention_max_distance=t.max_distance, layer_norm_epsilon=t.eps,
            feed_forward_proj="gated-gelu")).save_pretrained(tmp / "text_encoder")
        write_tiny_tokenizer(tmp / "tokenizer", min(t.vocab, RANDOM_VOCAB))
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
                                ).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
                 "_diffusers_version": diffusers.__version__,
                 "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                 "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                 "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
        if i2v:
            CLIPVisionModel(CLIPVisionConfig(
                hidden_size=c.dim, intermediate_size=c.dim * c.mlp_ratio, num_attention_heads=c.num_heads,
                num_hidden_layers=c.num_layers, image_size=c.image_size, patch_size=c.patch_size,
                layer_norm_eps=c.eps, hidden_act="gelu")).save_pretrained(tmp / "image_encoder")
            index["image_encoder"] = ["transformers", "CLIPVisionModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return Path(out)


def convert_to_official(src: str | Path, out: str | Path) -> Path:
    """Rewrite a checkpoint we can read (either layout) in the official layout, weights unchanged."""
    ckpt = open_checkpoint(src)
    states = {"dit": ckpt.dit_state(), "vae": ckpt.vae_state(), "text": ckpt.text_state()}
    if ckpt.variant.clip is not None:
        states["clip"] = ckpt.clip_state()
    return write_official(out, ckpt.variant, states, tokenizer_dir=ckpt.tokenizer_dir)


def write_random_checkpoint(out: str | Path, variant: str = "tiny-t2v", layout: str = "official", seed: int = 0) -> Path:
    v = get_variant(variant)
    if layout == "official":
        return write_official(out, v, random_states(v, seed))
    if layout == "diffusers":
        return write_diffusers(out, v, seed)
    raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
