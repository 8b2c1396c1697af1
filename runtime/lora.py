"""LoRA files for the Wan2.1 DiT, in the dialects users have, merged into the weights as they are loaded.

Dialects (shared/reference/feature-gaps.md, section 2), each mapped to the official parameter names:
  diffusers / PEFT    transformer.blocks.0.attn1.to_q.lora_A.weight, lora_B.weight, lora_B.bias; alpha from the
                      file's `lora_adapter_metadata` if present, else alpha = rank (PEFT's default as diffusers loads it)
  musubi / kohya      lora_unet_blocks_0_self_attn_q.lora_down.weight, lora_up.weight, .alpha
  official names      [diffusion_model.]blocks.0.self_attn.q.lora_A.weight / lora_B.weight, or lora_down / lora_up
                      + .alpha (ComfyUI, diffusion-pipe, LightX2V, kijai); extras .diff (a full weight delta, e.g. of
                      a norm), .diff_b (a bias delta), blocks.N.diff_m or blocks.N.modulation.diff (a modulation
                      delta)
  their other spellings raw PEFT (base_model.model. ... .lora_A.default.weight), DiffSynth (pipe.dit.), LyCORIS
                      (lycoris_blocks_0_...), diffusers names without their transformer. prefix
A low-rank pair adds strength * alpha / rank * (up @ down) to its linear's weight. Keys that map to nothing in the
model are one error naming them, never dropped. Files are read with safetensors only.

Merging happens on the checkpoint's bf16 weights before any quantization (merge-then-quantize, as LightX2V), as the
DiT's weights come into host memory or into an engine, so every kernel and the block streaming see ordinary weights
and a LoRA costs nothing per step. An engine whose linears are already quantized cannot take a merge without losing
the LoRA in the rounding: there the low-rank pairs become a side path (`side_factors`: y += (x @ down^T) @ up^T after
the quantized GEMM, runtime/dit.py `linear`), and only biases, norms and modulation are merged.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..quant.formats import QUANTIZED_LINEARS
from .checkpoint import CheckpointError
from .config import DiTConfig
from .dit import WanDiT, dit_from_diffusers
from .engine import sha256
from .options import parse_lora


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied; the message names the file and the keys."""


@dataclass(frozen=True)
class Lora:
    path: Path
    strength: float
    sha256: str
    deltas: dict[str, list[tuple]]  # official parameter name -> terms: (delta, scale) or (up, down, scale)


@functools.lru_cache(maxsize=8)
def _linears(cfg: DiTConfig) -> dict[str, tuple[int, int]]:
    """Every linear of the DiT: official name (blocks.0.self_attn.q) -> weight shape (out, in)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# Spellings of the same dialects by other tools (feature-gaps.md 2.1 "variants"): raw PEFT state dicts
# (base_model.model. ... .default.), DiffSynth (pipe.dit.), LyCORIS's LoRA (lycoris_ for lora_unet_).
_PREFIXES = ("base_model.model.", "pipe.dit.")
_DIFFUSERS_MARKERS = ("attn1.", "attn2.", "ffn.net.", "condition_embedder.", "proj_out", "scale_shift_table")


def _normalized(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    key = key.replace(".default.", ".").replace(".default_0.", ".")  # a PEFT adapter's name
    if key.startswith("lycoris_"):
        key = "lora_unet_" + key.removeprefix("lycoris_")
    if not key.startswith(("transformer.", "lora_unet_", "diffusion_model.")) and any(
            m in key for m in _DIFFUSERS_MARKERS):
        key = "transformer." + key  # diffusers names without the pipeline's component prefix
    return key


def _official_module(key: str, musubi: dict[str, str]) -> tuple[str, str] | None:
    """A LoRA key -> (official module or parameter path, component), e.g. ('blocks.0.self_attn.q', 'lora_A.weight')."""
    key = _normalized(key)
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_down.weight", "lora_up.weight", "alpha",
                   "diff_b", "diff_m", "diff"):
        if key.endswith("." + suffix):
            module = key[: -len(suffix)].rstrip(".")
            break
    else:
        return None
    if module.startswith("lora_unet_"):  # musubi / kohya
        name = musubi.get(module.removeprefix("lora_unet_").replace("__", "_"))
        return (name, suffix) if name else None
    if module.startswith("transformer."):  # diffusers / PEFT
        name = next(iter(dit_from_diffusers({module.removeprefix("transformer.") + ".weight": 0})), None)
        return (name.removesuffix(".weight"), suffix) if name else None
    return module.removeprefix("diffusion_model."), suffix


def read_lora(spec: str, cfg: DiTConfig) -> Lora:
    """Read and check a LoRA file against a DiT config: every key maps to a parameter of that model."""
    path, strength = parse_lora(spec)
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"cannot read LoRA {path}: {e}") from None
    alpha_meta = _metadata_alpha(meta)
    musubi = {name.replace(".", "_"): name for name in _linears(cfg)}  # blocks_0_self_attn_q -> blocks.0.self_attn.q
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        mapped = _official_module(key, musubi)
        if mapped is None:
            unknown.append(key)
            continue
        parts.setdefault(mapped[0], {})[mapped[1]] = t
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys match no part of a Wan2.1 DiT, e.g. {sorted(unknown)[:3]}")
    if not parts:
        raise LoraError(f"{path} holds no LoRA weights")
    deltas: dict[str, list] = {}
    for module, p in parts.items():
        down, up = p.get("lora_A.weight", p.get("lora_down.weight")), p.get("lora_B.weight", p.get("lora_up.weight"))
        if (down is None) != (up is None):
            raise LoraError(f"{path}: {module} has only one of its two low-rank matrices")
        scale = 1.0
        if down is not None:
            rank = down.shape[0]
            scale = (float(p["alpha"]) if "alpha" in p else alpha_meta or rank) / rank
            deltas.setdefault(f"{module}.weight", []).append((up, down, scale))
        for component, param, term_scale in (("lora_B.bias", "bias", scale), ("diff", "weight", 1.0),
                                             ("diff_b", "bias", 1.0), ("diff_m", "modulation", 1.0)):
            if component in p:  # PEFT scales lora_B's bias with its matrices; the full deltas are added as they are
                target = module if module.endswith("modulation") else f"{module}.{param}"  # KJ's modulation.diff
                deltas.setdefault(target, []).append((p[component], term_scale))
    return Lora(path, strength, sha256(path), deltas)


def _metadata_alpha(meta: dict) -> float | None:
    """diffusers' save_lora_weights may record the PEFT adapter's config (`lora_adapter_metadata`, keys prefixed by
    the component: transformer.lora_alpha, transformer.r)."""
    try:
        config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return None
    found = {k.rpartition(".")[2]: v for k, v in config.items()} if isinstance(config, dict) else {}
    if found.get("use_rslora") or found.get("use_dora"):
        raise LoraError("rsLoRA and DoRA adapters are not supported (their scaling and magnitudes differ from LoRA's)")
    return float(found["lora_alpha"]) if isinstance(found.get("lora_alpha"), (int, float)) else None


def merge_loras(state: dict[str, torch.Tensor], loras: list[Lora]) -> dict[str, torch.Tensor]:
    """The DiT state dict (official names) with every LoRA added: W + strength * (scale * up @ down, or a full
    delta), summed in fp32 and rounded once to W's dtype. A new dict; the tensors it does not touch are shared."""
    out = dict(state)
    for name in sorted({n for lora in loras for n in lora.deltas}):
        if name not in out:
            raise LoraError(f"{[l.path.name for l in loras if name in l.deltas][0]}: {name} is not a parameter of "
                            f"this model (a LoRA for another Wan model or task?)")
        w = out[name]
        total = w.float().clone()
        for lora in loras:
            for term in lora.deltas.get(name, ()):
                delta = term[1] * term[0].float() if len(term) == 2 else term[2] * (term[0].float() @ term[1].float())
                if delta.numel() != total.numel():
                    raise LoraError(f"{lora.path.name}: its delta for {name} has shape {tuple(delta.shape)}, the model's "
                                    f"is {tuple(w.shape)}: a LoRA for another model size")
                total += lora.strength * delta.reshape(total.shape)
        out[name] = total.to(w.dtype)
    return out


def side_factors(loras: list[Lora], cfg: DiTConfig) -> tuple[list[Lora], dict[str, torch.Tensor]]:
    """Split the low-rank terms on the blocks' quantized linears out of the LoRAs: (the LoRAs with what can still be
    merged: biases, norms, modulation; the side path's tensors). For each such linear, every LoRA's pair is stacked
    along the rank into `blocks.N.<linear>.lora_down` [R, K] and `lora_up` [N, R] (strength and alpha / rank folded
    into up), in fp32. Every block gets the same linears at the same ranks, zero-padded (zero rows add nothing),
    because all blocks share one layout where they stream."""
    shapes = {f"{name}.weight": shape for name, shape in _linears(cfg).items()
              if name.startswith("blocks.") and name.split(".", 2)[2] in QUANTIZED_LINEARS}
    pairs: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # linear -> (block, down, scaled up)
    rest = []
    for lora in loras:
        kept = {}
        for name, terms in lora.deltas.items():
            if name not in shapes:
                kept[name] = terms
                continue
            for term in terms:
                if len(term) == 2:
                    raise LoraError(f"{lora.path.name}: a full weight delta for {name} cannot be added to quantized "
                                    "weights: merge it before quantizing (wanrt export --lora, or load the checkpoint)")
                up, down, scale = term
                if (up.shape[0], down.shape[1]) != shapes[name] or up.shape[1] != down.shape[0]:
                    raise LoraError(f"{lora.path.name}: its pair for {name} makes a {up.shape[0]}x{down.shape[1]} "
                                    f"delta, the model's is {shapes[name][0]}x{shapes[name][1]}: a LoRA for another "
                                    "model size")
                pairs.setdefault(name.split(".", 2)[2].removesuffix(".weight"), []).append(
                    (int(name.split(".")[1]), down.float(), lora.strength * scale * up.float()))
        rest.append(dataclasses.replace(lora, deltas=kept))
    tensors = {}
    for linear, terms in pairs.items():
        n, k = shapes[f"blocks.{terms[0][0]}.{linear}.weight"]
        per_block = [[t for t in terms if t[0] == i] for i in range(cfg.num_layers)]
        rank = max(sum(d.shape[0] for _, d, _ in mine) for mine in per_block)
        for i, mine in enumerate(per_block):
            down = torch.cat([d for _, d, _ in mine] or [torch.zeros(0, k)])
            up = torch.cat([u for _, _, u in mine] or [torch.zeros(n, 0)], dim=1)
            tensors[f"blocks.{i}.{linear}.lora_down"] = F.pad(down, (0, 0, 0, rank - down.shape[0]))
            tensors[f"blocks.{i}.{linear}.lora_up"] = F.pad(up, (0, rank - up.shape[1]))
    return rest, tensors


def side_rank(tensors: dict[str, torch.Tensor]) -> int:
    """The largest rank of a side path (0: none): what the planner prices for every linear of a block."""
    return max((t.shape[0] for k, t in tensors.items() if k.endswith("lora_down")), default=0)


def lora_record(loras: list[Lora]) -> list[dict]:
    """What an engine records of the LoRAs merged into it."""
    return [{"file": lora.path.name, "sha256": lora.sha256, "strength": lora.strength} for lora in loras]
