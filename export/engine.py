"""`wanrt export`: an official or diffusers checkpoint -> an engine directory (layout in runtime/engine.py).

The DiT's blocks are quantized per the scheme (quant/formats.py); everything else is stored as the checkpoint holds it,
so a bf16 engine generates exactly what its checkpoint does. The engine is built in a temporary folder next to the
destination and renamed into place only when complete: an interrupted export leaves no half-written engine, and
running it again starts over. An existing folder is only replaced with `overwrite`, and only if it is an engine of
ours. Weights and configs are safetensors and JSON; compiled blocks are native code, which runs only where it is
trusted (runtime/trust.py).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import wanrt
from wanrt.quant.formats import QUANTIZED_LINEARS, quantize_block, quantize_text_block
from wanrt.quant.linear import linear_error_report
from wanrt.runtime.atomic import atomic_dir, check_output_dir
from wanrt.runtime.checkpoint import open_checkpoint
from wanrt.runtime.engine import FORMAT, FORMAT_VERSION, MANIFEST, is_own_engine, sha256_all, variant_to_json
from wanrt.runtime.lora import lora_record, merge_loras, read_lora
from wanrt.runtime.options import RunOptions
from wanrt.runtime.stream import split_blocks
from wanrt.runtime.trust import manifest_digest, record_trust


FIDELITY_TOKENS = 256  # random activations per linear for the recorded error (cheap on a CPU at full width)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _write_blocks(part: str, state: dict, num_blocks: int, root: Path, prefix: str = "blocks",
                  transform=None, bar=None) -> None:
    rest, blocks = split_blocks(state, num_blocks, prefix)
    _save(rest, root / part / "resident.safetensors")
    for i, block in enumerate(blocks):
        _save(transform(block) if transform else block, root / part / f"block_{i:02d}.safetensors")
        if bar is not None:
            bar.update(1)


def fidelity(blocks: list[dict], scheme: str, seed: int = 0) -> dict:
    """Relative error of each quantized linear of the first and last block against bf16, on random inputs."""
    if scheme == "bf16":
        return {"scheme": "bf16", "note": "weights as in the checkpoint: exact"}
    g = torch.Generator().manual_seed(seed)
    report = {}
    for i in sorted({0, len(blocks) - 1}):
        for name in QUANTIZED_LINEARS:
            w = blocks[i].get(f"{name}.weight")
            if w is None:
                continue
            x = torch.randn(FIDELITY_TOKENS, w.shape[1], generator=g)
            report[f"blocks.{i}.{name}"] = round(linear_error_report(w.float(), blocks[i].get(f"{name}.bias"), x,
                                                                     scheme, gelu=name == "ffn.0"), 5)
    return {"scheme": scheme, "per_linear_rel_err_vs_bf16": report, "inputs": f"random, {FIDELITY_TOKENS} tokens",
            "max": max(report.values())}


BACKENDS = ("inductor", "compile", "onnx", "tensorrt")


def export_engine(model: str | Path, out: str | Path, scheme: str = "bf16", progress: bool = True,
                  backends: tuple[str, ...] = (), latents: tuple[int, int, int] | None = None,
                  overwrite: bool = False, text_scheme: str = "bf16", attention: str = "auto",
                  loras: tuple[str, ...] = (), cache: str | None = None) -> Path:
    """Write the engine of checkpoint `model` to `out`: a new or empty folder, or with `overwrite` an engine written
    before (runtime/atomic.py). `scheme` quantizes the DiT's blocks, `text_scheme` umT5's (weight-only); `attention`
    and `cache` are recorded as the engine's defaults (RunOptions); `loras` are merged into the DiT before it is
    quantized and recorded with their sha256. `backends` adds compiled block graphs for latents of (frames, height,
    width) (default: the variant's first size, 81 frames). The engine is recorded as trusted here."""
    RunOptions(attention=attention, scheme=scheme, text_scheme=text_scheme, cache=cache)  # one line for a bad value
    if unknown := set(backends) - set(BACKENDS):
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    if "tensorrt" in backends:
        from .tensorrt_backend import require

        require()  # before any work
        if "onnx" not in backends:
            backends = ("onnx", *backends)  # TensorRT builds from the ONNX graph
    if scheme != "bf16" and (bf16_only := [b for b in backends if b != "onnx" or scheme == "nf4"]):
        raise ValueError(f"the {', '.join(bf16_only)} backend(s) export bf16 engines for now (fp8, int8 and w8a16 "
                         "have a Q/DQ graph through --backends onnx; nf4 none): use --scheme bf16 with them")
    out = check_output_dir(out, overwrite, is_own_engine)  # before reading the checkpoint
    ckpt = open_checkpoint(model)
    v = ckpt.variant
    merged = [read_lora(spec, v.dit) for spec in loras]
    start = time.perf_counter()
    with atomic_dir(out, overwrite, is_own_engine) as tmp:
        n = v.dit.num_layers + v.text.num_layers + 3
        with tqdm(total=n, desc=f"export {scheme}/{text_scheme}", unit="file", disable=not progress) as bar:
            dit = merge_loras(ckpt.dit_state(), merged) if merged else ckpt.dit_state()
            _, dit_blocks = split_blocks(dit, v.dit.num_layers)
            _write_blocks("dit", dit, v.dit.num_layers, tmp, transform=lambda b: quantize_block(b, scheme), bar=bar)
            report = fidelity(dit_blocks, scheme)
            compiled = _compile(_with_quant(v, scheme), backends, latents, quantize_block(dit_blocks[0], scheme), tmp)
            del dit, dit_blocks
            _write_blocks("text", ckpt.text_state(), v.text.num_layers, tmp,
                          transform=lambda b: quantize_text_block(b, text_scheme), bar=bar)
            _save(ckpt.vae_state(), tmp / "vae" / "vae.safetensors")
            bar.update(1)
            if v.clip is not None:
                _save(ckpt.clip_state(), tmp / "clip" / "clip.safetensors")
            bar.update(1)
            shutil.copytree(ckpt.tokenizer_dir, tmp / "tokenizer")
            bar.update(1)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): {"sha256": h, "bytes": p.stat().st_size}
                 for p, h in zip(paths, sha256_all(paths))}
        variant = variant_to_json(_with_quant(v, scheme, text_scheme))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "wanrt_version": wanrt.__version__,
            "variant": variant, "source": {"path": str(Path(model).name), "layout": ckpt.layout},
            "schemes": {"dit_blocks": scheme, "dit_resident": "as in the checkpoint", "text_blocks": text_scheme,
                        "text_resident": "as in the checkpoint", "vae": "as in the checkpoint"},
            "options": {"attention": attention, "scheme": scheme, "text_scheme": text_scheme, "cache": cache},
            "loras": lora_record(merged),
            "backends": compiled.pop("backends"), "fidelity": report, **compiled,
            "files": files, "export_seconds": round(time.perf_counter() - start, 2)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        digest = manifest_digest(tmp / MANIFEST)
    record_trust(digest, out)
    return out


def _compile(v, backends: tuple[str, ...], latents, block: dict, root: Path) -> dict:
    """The backends' artifacts for one block graph, and the GPU capability they are tied to (None: any)."""
    out = {"backends": {}, "gpu_capability": None}
    if not backends:
        return out
    if latents is None:
        w, h = (int(n) for n in v.sizes[0].split("*")) if v.sizes else (832, 480)
        st = v.vae.stride
        latents = ((81 - 1) // st[0] + 1, h // st[1], w // st[2])
    if inductor_kinds := [k for k in ("inductor", "compile") if k in backends]:
        from .inductor_backend import export_block_inductor

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for kind in inductor_kinds:
            out["backends"][kind] = export_block_inductor(v, latents, block, root, device, kind)
        if device.type == "cuda":
            out["gpu_capability"] = list(torch.cuda.get_device_capability())
    if "onnx" in backends:
        from .onnx_backend import export_block_onnx

        out["backends"]["onnx"] = export_block_onnx(v, latents, block, root)
    if "tensorrt" in backends:
        from .tensorrt_backend import build_plan

        out["backends"]["tensorrt"], out["gpu_capability"] = build_plan(root, out["backends"]["onnx"])
    return out


def _with_quant(v, scheme: str, text_scheme: str = "bf16"):
    return dataclasses.replace(v, dit=dataclasses.replace(v.dit, quant=scheme),
                               text=dataclasses.replace(v.text, quant=text_scheme))
