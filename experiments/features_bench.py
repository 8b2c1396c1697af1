"""Whole generations with the run options a user switches on, on one GPU with random full-size weights, each row
timed after a warm-up generation of its own pipeline (so no row pays for kernel compilation):

  options  20 steps, guidance 5: diffusers' resident WanPipeline (same weights, handed wanrt's prompt embeddings),
           wanrt's defaults, and the fastest weight schemes (fp8 or int8 DiT with int8 umT5; nf4)
  steps50  50 steps, guidance 5, uncached, with MagCache and TeaCache at the references' settings, and the distill4
           preset (4 steps, guidance 1)
  lora     20 steps: a rank-64 LoRA merged into bf16 weights (against the options group's defaults row), and run
           beside the blocks of an fp8 engine (the side path) against that engine without it
  small    50 steps under a 1 GiB budget, uncached and with MagCache (at 1.3B its residuals then wait in host RAM)
  peer     diffusers' resident WanPipeline again (after the other groups: this H100 slows under sustained load)

Each row records its denoise plan and how long planning took (`--plan`: the traces are cached per shape, so only
a row whose options change the model traces anew; the warm-up and the timed generation reuse them). Cached and
few-step rows report their final latents' relative error and their frames' PSNR against their group's uncached
50-step row (random weights: a weak signal of fidelity, stated as such).

    python -m experiments.features_bench --variant t2v-1.3B --groups options,lora,peer \\
        --skip "scheme nf4,rank-64 LoRA merged" --out DIR/opt
    python -m experiments.features_bench --variant t2v-1.3B --groups options,steps50 --out DIR/features_13b
    python -m experiments.features_bench --variant t2v-1.3B --groups lora,small --skip diffusers --out DIR/lora_13b
    python -m experiments.features_bench --variant t2v-14B --groups steps50 --vram-budget 8GiB --link-gbps 23 \\
        --skip teacache,distill4 --out DIR/features_14b
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import shlex
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanrt.bench.common import GiB, gpu_info, psnr, rel_err, write_report
from wanrt.bench.link import LinkEmulator
from wanrt.bench.matrix import cap
from wanrt.bench.random_source import RandomSource
from wanrt.quant.formats import QUANTIZED_LINEARS, quantize_block
from wanrt.runtime.options import RunOptions, parse_bytes, parse_size
from wanrt.runtime.pipeline import WanPipeline
from wanrt.runtime.sampler import default_neg_prompt, default_shift

PROMPT = "a red fox runs through deep snow at dawn, cinematic"
# group -> rows: (label, RunOptions keywords, generate keywords, LoRA rank or 0, prebuilt engine scheme or None)
ROWS = {
    "options": [("defaults", {}, {}, 0, None),
                ("scheme fp8, text int8", {"scheme": "fp8", "text_scheme": "int8"}, {}, 0, None),
                ("scheme int8, text int8", {"scheme": "int8", "text_scheme": "int8"}, {}, 0, None),
                ("scheme nf4", {"scheme": "nf4"}, {}, 0, None)],
    "steps50": [("50 steps, no cache", {}, {"sample_steps": 50}, 0, None),
                ("magcache", {"cache": "magcache"}, {"sample_steps": 50}, 0, None),
                ("distill4", {}, {"preset": "distill4"}, 0, None),
                ("teacache", {"cache": "teacache"}, {"sample_steps": 50}, 0, None)],
    # against the options group's "defaults" row (the same 20 steps without a LoRA)
    "lora": [("rank-64 LoRA merged", {}, {}, 64, None),
             ("fp8 engine, no LoRA", {}, {}, 0, "fp8"),
             ("fp8 engine, rank-64 LoRA as a side path", {}, {}, 64, "fp8")],
    "small": [("50 steps, no cache, 1 GiB budget", {"vram_budget": "1GiB"}, {"sample_steps": 50}, 0, None),
              ("magcache, 1 GiB budget", {"cache": "magcache", "vram_budget": "1GiB"}, {"sample_steps": 50}, 0, None)],
    "peer": [],
}
COMPARED = ("steps50", "small")  # groups whose rows are compared with their first (uncached) row


class Prequantized:
    """What an engine exported with `scheme` hands the pipeline: the source with its DiT blocks stored quantized."""

    def __init__(self, source: RandomSource, scheme: str, device: torch.device):
        self.source, self.scheme = source, scheme
        v = source.variant
        self.variant = dataclasses.replace(v, dit=dataclasses.replace(v.dit, quant=scheme))
        state, self._dit = source.dit_state(), None
        blocks: dict[int, dict] = {}
        for k, t in state.items():
            if k.startswith("blocks."):
                i, name = k.split(".", 2)[1:]
                blocks.setdefault(int(i), {})[name] = t
        out = {k: t for k, t in state.items() if not k.startswith("blocks.")}
        for i, block in blocks.items():
            q = quantize_block({k: t.to(device) for k, t in block.items()}, scheme)
            out |= {f"blocks.{i}.{k}": t.cpu() for k, t in q.items()}
        self._dit = out

    def dit_state(self, mmap: bool = False):
        return self._dit

    def __getattr__(self, name):
        return getattr(self.source, name)


def lora_file(variant, rank: int, path: Path) -> str:
    """A random rank-`rank` LoRA on every block linear, in the musubi dialect."""
    from wanrt.runtime.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(variant.dit)
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(variant.dit.num_layers):
        for name in QUANTIZED_LINEARS:
            try:
                n_out, n_in = model.blocks[i].get_submodule(name).weight.shape
            except AttributeError:
                continue
            key = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).bfloat16()
            state[f"{key}.lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 1e-3).bfloat16()
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, path)
    return str(path)


def timed_generation(pipe: WanPipeline, size: str, frames: int, request: dict, dev) -> tuple[dict, dict]:
    """One generation after the caller's warm-up: its time, per-phase peaks and seconds, the final latents and
    frames."""
    kept = {}
    decode = pipe._decode

    def keep(phase, latents):
        kept["latents"] = latents.float().cpu()
        return decode(phase, latents)

    pipe._decode = keep
    sync(dev)
    start = time.perf_counter()
    video = pipe.generate(PROMPT, size=size, frame_num=frames, base_seed=0, progress=False, **request)
    sync(dev)
    seconds = time.perf_counter() - start
    pipe._decode = decode
    peak = max((s["max_reserved"] for s in pipe.phase_stats.values()), default=0)
    plan = pipe.phase_stats.get("denoise", {}).get("plan")
    stats = {"seconds": round(seconds, 3), "peak_reserved_gib": round(peak / GiB, 3),
             "phases": {n: {"seconds": round(s["seconds"], 3), "max_reserved_gib": round(s["max_reserved"] / GiB, 3)}
                        for n, s in pipe.phase_stats.items()}, "denoise_plan": plan}
    if pipe.step_schedule is not None:
        s = pipe.step_schedule
        stats["cache"] = {"method": s.method, "settings": s.settings, "dit_passes_run": s.computed,
                          "dit_passes": s.passes, "steps": s.step_map}
    return stats, {"latents": kept["latents"], "frames": torch.from_numpy(video.frames).float()}


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def diffusers_row(source, pipe: WanPipeline, size: str, frames: int, steps: int, dev) -> dict:
    """diffusers' resident WanPipeline on the same weights, handed wanrt's prompt embeddings."""
    from wanrt.bench import peers

    w, h = parse_size(size)
    lat = pipe.latent_shape(size, frames)
    plan = pipe.plan(lat, steps)
    with torch.no_grad():
        contexts = pipe._encode_text(plan.phase("text"), [PROMPT, default_neg_prompt("t2v")])
    model = peers.diffusers_dit(source.variant, source.dit_state(), torch.bfloat16)
    vae = peers.diffusers_vae(source.variant, source.vae_state(), torch.bfloat16)
    generate = peers.pipeline_generate(model, vae, default_shift("t2v", size), dev)
    generate(contexts[0], contexts[1], w, h, frames, 2, 5.0)  # warm-up
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    generate(contexts[0], contexts[1], w, h, frames, steps, 5.0)
    sync(dev)
    peak = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else 0
    row = {"label": "diffusers WanPipeline, resident",
           "seconds": round(time.perf_counter() - start, 3), "peak_reserved_gib": round(peak / GiB, 3)}
    del model, vae, generate
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="t2v-1.3B")
    p.add_argument("--size", default="832*480")
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--groups", default="options,steps50,lora")
    p.add_argument("--skip", default="", help="comma-separated row labels to leave out")
    p.add_argument("--vram-budget", type=parse_bytes, help="default: the GPU's free memory")
    p.add_argument("--link-gbps", type=float, help="emulate a slower host link for streamed blocks")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script on a tiny variant")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    dev = torch.device(a.device)
    if dev == torch.device("cuda"):  # the memory cap needs an index
        dev = torch.device("cuda", torch.cuda.current_device())
    source = RandomSource(a.variant)
    link = LinkEmulator(a.link_gbps, dev) if a.link_gbps else None
    report = {"gpu": gpu_info() if dev.type == "cuda" else {"name": "cpu"}, "variant": a.variant, "size": a.size,
              "frame_num": a.frame_num,
              "vram_budget_gib": a.vram_budget and a.vram_budget / GiB, "link_gbps": a.link_gbps,
              "command": "python -m experiments.features_bench " + " ".join(
                  f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(a).items() if v and k != "out"),
              "rows": []}
    skip = set(filter(None, a.skip.split(",")))
    references: dict[str, dict] = {}
    lora = lora_file(source.variant, 64, Path("/tmp/wanrt-lora-r64.safetensors")) if "lora" in a.groups else None
    prequantized = {}
    for group in a.groups.split(","):
        if group in ("options", "peer") and "diffusers" not in skip:
            try:
                row = diffusers_row(source, WanPipeline(source, dev), a.size, a.frame_num, 20, dev)
            except (RuntimeError, ValueError, ImportError) as e:
                row = {"label": "diffusers", "error": f"{type(e).__name__}: {e}"}
            report["rows"].append({**row, "group": group})
            print(report["rows"][-1], flush=True)
        rows = ROWS[group]
        if group == "lora" and "options" not in a.groups:  # its baseline, the options group's defaults row
            rows = [("no LoRA", {}, {}, 0, None), *rows]
        for label, options, request, rank, engine in rows:
            if label in skip:
                continue
            try:
                row = {"group": group, "label": label, "options": options, "request": request, "lora_rank": rank,
                       "engine": engine, **one_row(source, prequantized, options, request, rank, engine, lora, link, a,
                                                   dev, references.get(group))}
            except (RuntimeError, ValueError, ImportError) as e:  # one failed row (e.g. OOM) must not lose the rest
                row = {"group": group, "label": label, "error": f"{type(e).__name__}: {e}"}
            if group in COMPARED and group not in references and "outputs" in row:
                references[group] = row["outputs"]
            row.pop("outputs", None)
            report["rows"].append(row)
            print({k: v for k, v in row.items() if k != "phases"}, flush=True)
            write_report(report, a.out, markdown(report))
            gc.collect()
            if dev.type == "cuda":
                cap(dev, None)
                torch.cuda.empty_cache()
    write_report(report, a.out, markdown(report))


def one_row(source, prequantized: dict, options: dict, request: dict, rank: int, engine: str | None, lora: str | None,
            link, a, dev, reference: dict | None) -> dict:
    """One pipeline with these options, warmed up by a one-step generation, then one timed generation; compared
    with `reference` (the group's uncached outputs) when given. The outputs come back under "outputs"."""
    src = source
    if engine:
        src = prequantized.get(engine) or prequantized.setdefault(engine, Prequantized(source, engine, dev))
    options = {"vram_budget": a.vram_budget, **options}
    pipe = WanPipeline(src, dev, options=RunOptions(**options, loras=(lora,) if rank else ()))
    pipe.block_copy = link
    cap(dev, pipe.vram_budget if options["vram_budget"] else None)
    timed = {"sample_steps": request.get("sample_steps", 20), **request} if "preset" not in request else request
    start = time.perf_counter()
    pipe.describe_plan(size=a.size, frame_num=a.frame_num, **timed)
    plan_seconds = round(time.perf_counter() - start, 3)
    pipe.generate(PROMPT, size=a.size, frame_num=a.frame_num, base_seed=0, progress=False,
                  **{**request, "sample_steps": 1 if "preset" not in request else None})  # warm-up
    stats, outputs = timed_generation(pipe, a.size, a.frame_num, timed, dev)
    row = {"scheme": pipe.variant.dit.quant, "text_scheme": pipe.variant.text.quant,
           "attention": pipe.variant.dit.attention, "lora_side_rank": pipe.variant.dit.lora_rank,
           "plan_seconds": plan_seconds, **stats}
    if reference is not None:
        row["latent_rel_err_vs_uncached"] = round(rel_err(outputs["latents"], reference["latents"]), 4)
        row["psnr_vs_uncached_db"] = round(psnr(outputs["frames"], reference["frames"], 255.0), 2)
    return {**row, "outputs": outputs}


def markdown(report: dict) -> str:
    gpu = report["gpu"]
    budget = f"{report['vram_budget_gib']:g} GiB" if report["vram_budget_gib"] else "the free memory"
    link = f"{report['link_gbps']:g} GB/s (emulated)" if report["link_gbps"] else "native"
    lines = [f"# Run options, whole generations: {report['variant']} {report['size']} x {report['frame_num']} "
             f"({gpu.get('name', gpu)})", "", f"`{report['command']}`; random weights; VRAM budget "
             f"{budget}; host link {link}.", "",
             "| group | row | scheme / text / attention | LoRA side rank | DiT passes run | plan (s) | generate (s) | "
             "denoise (s) | peak reserved (GiB) | latent rel. err | PSNR (dB) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['label']} | failed: {r['error'][:200]} |")
            continue
        cache = r.get("cache")
        passes = f"{cache['dit_passes_run']} of {cache['dit_passes']}" if cache else "all"
        lines.append(
            f"| {r['group']} | {r['label']} | {r.get('scheme', '-')} / {r.get('text_scheme', '-')} / "
            f"{r.get('attention', '-')} | {r.get('lora_side_rank', '-')} | {passes} | {r.get('plan_seconds', '-')} | "
            f"{r['seconds']:.2f} | "
            f"{r.get('phases', {}).get('denoise', {}).get('seconds', '-')} | {r['peak_reserved_gib']:.2f} | "
            f"{r.get('latent_rel_err_vs_uncached', '-')} | {r.get('psnr_vs_uncached_db', '-')} |")
    lines += ["", "Denoise plans:", ""] + [f"- {r['label']}: {r['denoise_plan']}" for r in report["rows"]
                                             if r.get("denoise_plan")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
