"""Checkpoint readers: the official Wan2.1 layout and the diffusers layout, mapped to one canonical naming (the
official state-dict keys). Nothing is ever unpickled: `.pth` files go through `torch.load(weights_only=True)`.

Official layout (Wan-AI/Wan2.1-T2V-1.3B):
    config.json                                   DiT config (`_class_name: WanModel`)
    diffusion_pytorch_model.safetensors           or `...safetensors.index.json` + shards; or a DiT quantized by
                                                  optimum-quanto to qint8 (Wan2GP's `*_quanto_*int8.safetensors`
                                                  under this name): read as our int8 scheme
    Wan2.1_VAE.pth                                (a `.safetensors` of the same stem is accepted too)
    models_t5_umt5-xxl-enc-bf16.pth
    google/umt5-xxl/                              tokenizer folder
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   (I2V only)
  Non-standard sizes (the tiny test and demo models) add a `"wanrt": {"vae": {...}, "text": {...}, "clip": {...}}`
  section to config.json; a real checkpoint has none and gets the full-size configs.

Diffusers layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
image_encoder/ (I2V), each with its config.json and safetensors (single file or index + shards).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..quant.formats import QUANTIZED_LINEARS
from .clip import CLIPVision, clip_from_hf, clip_from_official
from .config import VARIANTS, CLIPConfig, DiTConfig, TextConfig, Variant, VAEConfig
from .dit import WanDiT, dit_from_diffusers
from .text import UMT5Encoder, text_from_hf
from .vae import vae_from_diffusers

OFFICIAL_FILES = {
    "dit": "diffusion_pytorch_model.safetensors",
    "vae": "Wan2.1_VAE.pth",
    "text": "models_t5_umt5-xxl-enc-bf16.pth",
    "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "tokenizer": "google/umt5-xxl",
}
DIFFUSERS_DIRS = {"dit": "transformer", "vae": "vae", "text": "text_encoder", "clip": "image_encoder",
                  "tokenizer": "tokenizer"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not a Wan2.1 layout; the message names the file."""


# ------------------------------------------------------------------------------------------------------ tensor files
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as tensors that are views of a memory map: nothing is read until used, and the OS can drop
    the pages again under memory pressure (for streaming when RAM is short)."""
    header, offset = safetensors_header(path)
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=offset)  # copy-on-write: writable for torch, never written
    out = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        out[name] = torch.from_numpy(data[begin:end]).view(_ST_DTYPES[t["dtype"]]).view(t["shape"])
    return out


def load_tensors(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read one .safetensors or .pth file to CPU tensors, never unpickling arbitrary objects. With mmap, safetensors
    come back as views of a memory map (`.pth` files are always memory-mapped by torch.load)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        if path.suffix == ".safetensors":
            return mmap_safetensors(path) if mmap else load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only refused an object that is not a tensor
        raise CheckpointError(f"refusing {path}: it holds pickled Python objects, not only tensors") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, KeyError, json.JSONDecodeError,
            struct.error) as e:  # truncated or corrupt
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def load_sharded(folder: Path, stem: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """`stem.safetensors`, or `stem.safetensors.index.json` naming its shards."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_tensors(single, mmap)
    if not index.is_file():
        raise CheckpointError(f"checkpoint file missing: {single} (nor an index {index.name})")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map of tensor names to shard files")
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_tensors(inside(folder, shard, index), mmap))
    return state


def inside(root: Path, rel, listed_in: Path) -> Path:
    """root / rel for a relative path that a file lists, refused if it could lead out of root (absolute, `..`)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(f"{listed_in} lists {rel!r}: only paths inside {root} are allowed")
    return root / rel


def read_json(path: Path) -> dict:
    """A JSON object from a file; anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(out).__name__}")
    return out


def _first_existing(folder: Path, name: str) -> Path:
    """The official file name, or the same stem as .safetensors (how wanrt writes its own small models)."""
    path = folder / name
    alt = path.with_suffix(".safetensors")
    return alt if not path.exists() and alt.exists() else path


# ------------------------------------------------------------------------------------------------------ checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint: its configs and where each component lives. Tensors are read on demand."""
    root: Path
    layout: str  # "official" or "diffusers"
    variant: Variant

    @property
    def task(self) -> str:
        return self.variant.task

    def _path(self, component: str) -> Path:
        if self.layout == "official":
            return _first_existing(self.root, OFFICIAL_FILES[component])
        return self.root / DIFFUSERS_DIRS[component]

    @property
    def tokenizer_dir(self) -> Path:
        path = self._path("tokenizer")
        if not path.is_dir():
            raise CheckpointError(f"tokenizer folder missing: {path}")
        return path

    def dit_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        if self.layout == "official":
            state = load_sharded(self.root, "diffusion_pytorch_model", mmap)
            state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
            return from_quanto(state) if self.variant.dit.quant != "bf16" else state
        return dit_from_diffusers(load_sharded(self._path("dit"), "diffusion_pytorch_model", mmap))

    def vae_state(self) -> dict[str, torch.Tensor]:
        if self.layout == "official":
            return load_tensors(self._path("vae"))
        return vae_from_diffusers(load_sharded(self._path("vae"), "diffusion_pytorch_model"), self.variant.vae)

    def text_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        if self.layout == "official":
            return load_tensors(self._path("text"), mmap)
        return text_from_hf(load_sharded(self._path("text"), "model", mmap))

    def clip_state(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        if self.variant.clip is None:
            raise CheckpointError(f"{self.root} is a {self.task} checkpoint and has no CLIP image encoder")
        if self.layout == "official":
            return clip_from_official(load_tensors(self._path("clip"), mmap), self.variant.clip)
        return clip_from_hf(load_sharded(self._path("clip"), "model", mmap), self.variant.clip)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Locate a checkpoint directory and read its configs; tensors are read later, component by component."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    if (root / "model_index.json").is_file():
        layout, read_variant, config = "diffusers", _diffusers_variant, root / "transformer" / "config.json"
    elif (root / "config.json").is_file():
        layout, read_variant, config = "official", _official_variant, root / "config.json"
    else:
        raise CheckpointError(f"{root} is neither an official Wan2.1 checkpoint (config.json) nor a diffusers one "
                              "(model_index.json)")
    try:
        ckpt = Checkpoint(root, layout, with_calibration(root, read_variant(root)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config} (or a config beside it) is malformed: {type(e).__name__}: {e}") from None
    check_weights(ckpt)
    return ckpt


CALIBRATION = "magcache.json"  # a checkpoint's calibrated MagCache ratios (`wanrt calibrate-cache`)


def with_calibration(root: Path, v: Variant) -> Variant:
    """The variant with the MagCache ratios calibrated for this checkpoint, if it has them."""
    if not (root / CALIBRATION).is_file():
        return v
    ratios = read_json(root / CALIBRATION).get("ratios")
    if not isinstance(ratios, list) or len(ratios) < 4 or len(ratios) % 2 or \
            not all(isinstance(r, (int, float)) and 0 < r < 100 for r in ratios):
        raise CheckpointError(f"{root / CALIBRATION}: 'ratios' must be an even-length list of positive numbers")
    return dataclasses.replace(v, mag_ratios=tuple(float(r) for r in ratios))


def stored_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight a stored tensor holds: nf4 packs two 4-bit codes a byte (quant/nf4.py)."""
    return (t.shape[0], t.shape[1] * 2) if t.dtype == torch.uint8 and t.ndim == 2 else tuple(t.shape)


def check_weights(src) -> None:
    """Every model's weights match its config, tensor for tensor and shape for shape, before anything is built or
    allocated: the tensors come from memory maps, so only file headers are read (the VAE is checked as it loads).
    Quantized weights keep their shapes (nf4's packed ones: stored_shape) and add a `weight_scale` each."""
    v = src.variant
    parts = [("DiT", WanDiT, v.dit, src.dit_state(mmap=True)), ("text encoder", UMT5Encoder, v.text,
                                                                 src.text_state(mmap=True))]
    if v.clip is not None:
        parts.append(("CLIP image encoder", CLIPVision, v.clip, src.clip_state(mmap=True)))
    for name, module, cfg, state in parts:
        with torch.device("meta"):
            want = {k: tuple(t.shape) for k, t in module(cfg).state_dict().items()}
        got = {k: stored_shape(t) for k, t in state.items() if not k.endswith(".weight_scale")}
        missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = sorted(f"{k} {got[k]} (config: {want[k]})" for k in want.keys() & got.keys() if want[k] != got[k])
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{src.root}: the {name} weights do not match its config ({cfg.num_layers} layers): "
                + "; ".join(f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys))


def _named_variant(dit: DiTConfig, vae: VAEConfig, text: TextConfig, clip: CLIPConfig | None) -> Variant:
    """The named variant with these configs (so its sizes and defaults apply), else a custom one."""
    for v in VARIANTS.values():
        if (v.dit, v.vae, v.text, v.clip) == (dit, vae, text, clip):
            return v
    base = VARIANTS["i2v-14B" if dit.model_type == "i2v" else "t2v-14B"]
    return dataclasses.replace(base, name="custom", dit=dit, vae=vae, text=text, clip=clip, sizes=())


def _official_variant(root: Path) -> Variant:
    cfg = read_json(root / "config.json")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    try:
        dit = DiTConfig(**_tuples({k: v for k, v in cfg.items() if k in fields}))
        extra = cfg.get("wanrt", {})
        vae = VAEConfig(**_tuples(extra.get("vae", {})))
        text = TextConfig(**extra.get("text", {}))
        clip = CLIPConfig(**extra.get("clip", {})) if dit.model_type == "i2v" else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{root / 'config.json'}: {e}") from None
    v = _named_variant(dit, vae, text, clip)
    if any(k.endswith(".weight._data") for k in _dit_keys(root)):  # optimum-quanto's qint8, as Wan2GP ships DiTs
        v = dataclasses.replace(v, dit=dataclasses.replace(v.dit, quant="int8"))
    own = extra.get("variant")  # a small model of our own names itself and its sizes and defaults
    if v.name == "custom" and own:
        v = dataclasses.replace(v, name=own["name"], sizes=tuple(own["sizes"]), sample_steps=own["sample_steps"],
                                sample_shift=own["sample_shift"],
                                sample_guide_scale=own.get("sample_guide_scale", v.sample_guide_scale),
                                frame_num=own.get("frame_num", v.frame_num))
    return v


def _dit_keys(root: Path) -> list[str]:
    """The official DiT file's tensor names, from its safetensors header or its index (no tensor is read)."""
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return list(read_json(index).get("weight_map", {}))
    path = root / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        return []  # dit_state names the missing file
    try:
        return list(safetensors_header(path)[0])
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"cannot read the header of {path}: {e}") from None


def from_quanto(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiT quantized by optimum-quanto (`X.weight._data` int8 [N, K], `X.weight._scale` [N, 1]: per output channel,
    symmetric; Wan2GP's `*_quanto_*int8.safetensors`) -> our int8 scheme, which stores the same numbers: the block
    linears keep their int8 weights with `X.weight_scale` fp32 [N]; the few linears outside the blocks are
    dequantized. Quanto's activation scales (unused by weight-only files) are dropped; other quanto types refused."""
    out = {}
    for key, t in state.items():
        if key.endswith((".input_scale", ".output_scale", ".weight._scale")):
            continue
        if not key.endswith(".weight._data"):
            out[key] = t
            continue
        name = key.removesuffix(".weight._data")
        scale = state.get(f"{name}.weight._scale")
        if t.dtype != torch.int8 or t.ndim != 2 or scale is None or tuple(scale.shape) != (t.shape[0], 1):
            raise CheckpointError(f"{name}: only optimum-quanto qint8 weights with one scale per output channel can "
                                  f"be read, got {t.dtype} {tuple(t.shape)} with scale "
                                  f"{None if scale is None else tuple(scale.shape)}")
        head, _, linear = name.partition(".")
        if head == "blocks" and linear.partition(".")[2] in QUANTIZED_LINEARS:
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = t, scale.reshape(-1).float()
        else:
            out[f"{name}.weight"] = (t.float() * scale.float()).to(scale.dtype)
    return out


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _diffusers_variant(root: Path) -> Variant:
    t = read_json(root / "transformer" / "config.json")
    i2v = t.get("image_dim") is not None
    dit = DiTConfig(
        model_type="i2v" if i2v else "t2v", in_dim=t["in_channels"], dim=t["num_attention_heads"] * t["attention_head_dim"],
        ffn_dim=t["ffn_dim"], num_heads=t["num_attention_heads"], num_layers=t["num_layers"],
        out_dim=t["out_channels"], freq_dim=t["freq_dim"], text_dim=t["text_dim"], patch_size=tuple(t["patch_size"]),
        eps=t["eps"], **({"image_dim": t["image_dim"]} if i2v else {}))
    v = read_json(root / "vae" / "config.json")
    vae = VAEConfig(dim=v["base_dim"], z_dim=v["z_dim"], dim_mult=tuple(v["dim_mult"]),
                    num_res_blocks=v["num_res_blocks"], temperal_downsample=tuple(v["temperal_downsample"]),
                    latents_mean=tuple(v["latents_mean"]), latents_std=tuple(v["latents_std"]))
    e = read_json(root / "text_encoder" / "config.json")
    text = TextConfig(vocab=e["vocab_size"], dim=e["d_model"], dim_attn=e["d_kv"] * e["num_heads"], dim_ffn=e["d_ff"],
                      num_heads=e["num_heads"], num_layers=e["num_layers"],
                      num_buckets=e["relative_attention_num_buckets"],
                      max_distance=e["relative_attention_max_distance"], eps=e["layer_norm_epsilon"])
    clip = None
    if i2v:
        c = read_json(root / "image_encoder" / "config.json")
        c = c.get("vision_config", c)
        clip = CLIPConfig(image_size=c["image_size"], patch_size=c["patch_size"], dim=c["hidden_size"],
                          mlp_ratio=c["intermediate_size"] // c["hidden_size"], num_heads=c["num_attention_heads"],
                          num_layers=c["num_hidden_layers"], use_layers=c["num_hidden_layers"] - 1,
                          eps=c["layer_norm_eps"])
        dit = dataclasses.replace(dit, image_tokens=clip.num_tokens)
    return _named_variant(dit, vae, text, clip)
