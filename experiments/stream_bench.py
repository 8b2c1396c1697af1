"""Lean-runtime benchmarks on the GPU (random weights, bf16 unless noted; every pair measured in the same run).

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m experiments.stream_bench --out bench/results/stream_h100

Budgets are enforced by capping the caching allocator (torch.cuda.set_per_process_memory_fraction); each row reports
max_memory_reserved and max_memory_allocated. Sections (pick with --only):
  dit13    t2v-1.3B DiT forward at 480p x 81f: ours resident vs streamed under 1 GiB; diffusers resident and with
           block-level group offloading (use_stream=True)
  dit14    t2v-14B DiT forward at 480p x 81f: ours resident vs streamed under 4 GiB
  text     umT5-XXL encode of a 512-token prompt: resident vs streamed under 1.5 GiB
  vae      VAE decode of [1, 16, 21, 60, 104] latents: diffusers untiled and tiled vs ours tiled under 1 GiB (PSNR)
  generate whole t2v-1.3B 480p x 81f generation (text, 4 steps, decode) under 4 GiB: predicted vs measured peaks
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

from wanrt.bench.common import (GiB, cap_memory, gpu_info, peaks, psnr, random_state, rel_err, time_it,
                                write_report)
from wanrt.runtime.config import get_variant
from wanrt.runtime.dit import WanDiT, dit_from_diffusers, keeps_fp32
from wanrt.runtime.plan import PlanError, denoise_phase, text_phase, vae_phase
from wanrt.runtime.stream import make_store, make_streamer, split_blocks

LAT_480P = (21, 60, 104)  # 832x480, 81 frames: 32,760 tokens


def _dit_setup(variant: str, dtype=torch.bfloat16):
    """Random weights for a DiT: a GPU shell (everything but the blocks) and a pinned host store of the blocks."""
    v = get_variant(variant)
    cfg = v.dit
    with torch.device("meta"):
        meta = WanDiT(cfg).to_inference_dtype(dtype)
    state = random_state(meta)
    rest, blocks = split_blocks(state, cfg.num_layers)
    with torch.device("meta"):
        shell = WanDiT(cfg)
    shell.load_state_dict(rest, strict=False, assign=True)
    shell = shell.to_inference_dtype(dtype)
    for name in ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head"):
        getattr(shell, name).to("cuda")
    store = make_store(blocks, lambda n, t: torch.float32 if keeps_fp32(n) else dtype, in_ram=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, cfg.in_dim, *LAT_480P, device="cuda", generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", generator=g).to(dtype)
    ctx = shell.embed_context(text)
    temb = shell.embed_time(torch.tensor([800.0], device="cuda"))
    for name in ("text_embedding", "time_embedding", "time_projection"):  # as the pipeline: off the GPU to denoise
        getattr(shell, name).to("cpu")
    return v, state, shell, store, (x, temb, ctx, text)


def _dit_ours(v, shell, store, inputs, budget: int, runs: int, out: dict) -> tuple[dict, torch.Tensor]:
    x, temb, ctx, _ = inputs
    cap_memory(None)
    resident = make_streamer(store, "cuda", resident=v.dit.num_layers, slots=0)
    torch.cuda.reset_peak_memory_stats()
    out["ours_resident"] = {**time_it(lambda: shell.denoise(x, temb, ctx, resident), runs=runs), **peaks()}
    want = shell.denoise(x, temb, ctx, resident)
    resident.close()
    del resident
    phase = denoise_phase(v, LAT_480P, 1, budget, torch.bfloat16)
    cap_memory(budget)
    streamer = make_streamer(store, "cuda", phase.blocks.resident, phase.blocks.slots)
    out["ours_streamed"] = {**time_it(lambda: shell.denoise(x, temb, ctx, streamer, phase.chunk), runs=runs),
                            **peaks(), "budget_gib": budget / GiB, "plan": phase.describe(),
                            "planned_peak_gib": round(phase.peak_bytes / GiB, 3)}
    got = shell.denoise(x, temb, ctx, streamer, phase.chunk)
    streamer.close()
    cap_memory(None)
    resident = make_streamer(store, "cuda", resident=v.dit.num_layers, slots=0)
    out["ours_resident_same_chunks"] = {  # separates the cost of token chunks from the cost of streaming
        **time_it(lambda: shell.denoise(x, temb, ctx, resident, phase.chunk), runs=runs), **peaks()}
    resident.close()
    out["streamed_vs_resident_rel_err"] = rel_err(got, want)
    out["streamed_over_resident"] = round(out["ours_streamed"]["median_ms"] / out["ours_resident"]["median_ms"], 4)
    return phase, want


def bench_dit13(report: dict, runs: int) -> None:
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import apply_group_offloading

    v, state, shell, store, inputs = _dit_setup("t2v-1.3B")
    out = report["dit13"] = {}
    _, want = _dit_ours(v, shell, store, inputs, 1 * GiB, runs, out)
    cfg = v.dit
    with torch.device("cuda"):
        ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                    in_channels=cfg.in_dim, out_channels=cfg.out_dim, ffn_dim=cfg.ffn_dim,
                                    num_layers=cfg.num_layers, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim)
    names = dit_from_diffusers({k: k for k in ref.state_dict()})  # official name -> diffusers name
    ref.load_state_dict({dk: state[ok] for ok, dk in names.items()})
    keep = tuple(ref._keep_in_fp32_modules)  # as from_pretrained(torch_dtype=bf16) leaves them
    for name, p in ref.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    ref.eval()
    x, text = inputs[0].to(torch.bfloat16), inputs[3]  # the very inputs ours ran on
    t = torch.tensor([800.0], device="cuda")
    with torch.no_grad():
        cap_memory(None)
        ref.to("cuda")
        torch.cuda.reset_peak_memory_stats()
        out["diffusers_resident"] = {**time_it(lambda: ref(x, t, text, return_dict=False), runs=runs), **peaks()}
        out["diffusers_vs_ours_rel_err"] = rel_err(ref(x, t, text, return_dict=False)[0].float(), want)
        ref.to("cpu")
        apply_group_offloading(ref, onload_device=torch.device("cuda"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
        cap_memory(None)
        out["diffusers_group_offload_block_stream"] = {
            **time_it(lambda: ref(x, t, text, return_dict=False), runs=runs), **peaks()}
    del ref, shell, store
    gc.collect()


def bench_dit14(report: dict, runs: int) -> None:
    v, state, shell, store, inputs = _dit_setup("t2v-14B")
    del state
    _dit_ours(v, shell, store, inputs, 4 * GiB, runs, report.setdefault("dit14", {}))
    del shell, store
    gc.collect()


def bench_text(report: dict, runs: int) -> None:
    from wanrt.runtime.text import UMT5Encoder

    v = get_variant("t2v-1.3B")
    cfg = v.text
    with torch.device("meta"):
        meta = UMT5Encoder(cfg).to(torch.bfloat16)
    rest, blocks = split_blocks(random_state(meta), cfg.num_layers)
    with torch.device("meta"):
        enc = UMT5Encoder(cfg)
    enc.load_state_dict(rest, strict=False, assign=True)
    enc.norm.to("cuda")  # the 256k x 4096 token table stays in host RAM; only the prompt's rows move
    store = make_store(blocks, lambda n, t: torch.bfloat16, in_ram=True)
    ids = torch.randint(0, cfg.vocab, (1, cfg.text_len), device="cuda")
    mask = torch.ones_like(ids)
    out = report["text"] = {}
    with torch.no_grad():
        cap_memory(None)
        resident = make_streamer(store, "cuda", cfg.num_layers, 0)
        torch.cuda.reset_peak_memory_stats()
        out["resident"] = {**time_it(lambda: enc(ids, mask, resident), runs=runs), **peaks()}
        want = enc(ids, mask, resident)
        resident.close()
        del resident
        budget = int(1.5 * GiB)
        phase = text_phase(v, budget, torch.bfloat16)
        cap_memory(budget)
        streamer = make_streamer(store, "cuda", phase.blocks.resident, phase.blocks.slots)
        out["streamed"] = {**time_it(lambda: enc(ids, mask, streamer), runs=runs), **peaks(),
                           "budget_gib": 1.5, "plan": phase.describe(),
                           "planned_peak_gib": round(phase.peak_bytes / GiB, 3)}
        out["streamed_vs_resident_rel_err"] = rel_err(enc(ids, mask, streamer), want)
        streamer.close()
    cap_memory(None)


def bench_vae(report: dict, runs: int) -> None:
    from wanrt.bench.peers import random_wan21_vaes

    v = get_variant("t2v-1.3B")
    ref, ours = random_wan21_vaes()
    ref, ours = ref.cuda(), ours.cuda()
    mean = torch.tensor(v.vae.latents_mean, device="cuda").view(1, -1, 1, 1, 1)
    std = torch.tensor(v.vae.latents_std, device="cuda").view(1, -1, 1, 1, 1)
    z = torch.randn(1, 16, *LAT_480P, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = report["vae"] = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            ref.to(dtype)
            name = f"diffusers_untiled_{str(dtype).split('.')[1]}"
            cap_memory(None)
            out[name] = {**time_it(lambda: ref.decode((z * std + mean).to(dtype), return_dict=False), runs=runs),
                         **peaks()}
        ref.enable_tiling()
        cap_memory(None)
        out["diffusers_tiled_bfloat16"] = {
            **time_it(lambda: ref.decode((z * std + mean).to(torch.bfloat16), return_dict=False), runs=runs),
            **peaks()}
        ref.cpu()
        cap_memory(None)
        out["ours_untiled_fp32"] = {**time_it(lambda: ours.decode(z), runs=runs), **peaks()}
        untiled = {torch.float32: ours.decode(z).float().cpu()}
        ours.cpu()
        vae = copy.deepcopy(ours).to(torch.bfloat16).cuda()
        cap_memory(None)
        out["ours_untiled_bfloat16"] = {**time_it(lambda: vae.decode(z), runs=runs), **peaks()}
        untiled[torch.bfloat16] = vae.decode(z).float().cpu()
        del vae
        budget = 1 * GiB
        for dtype in (torch.float32, torch.bfloat16):
            name = f"ours_tiled_{str(dtype).split('.')[1]}"
            vae = copy.deepcopy(ours).to(dtype)  # as the pipeline: the decoder in the dtype it computes in
            vae.decoder.cuda(), vae.conv2.cuda()
            try:
                phase = vae_phase("decode", v, LAT_480P, budget, dtype)
            except PlanError as e:  # fp32 weights and video alone nearly fill 1 GiB
                out[name] = {"refused": str(e)}
                continue
            cap_memory(budget)
            # as the pipeline: a tiled decode blends into host RAM, an untiled one decodes on the GPU
            host = None if phase.tile is None else torch.empty(vae.decoded_shape(z.shape), dtype=dtype)
            decode = lambda: vae.decode(z, tile=phase.tile, out=host)
            out[name] = {**time_it(decode, runs=runs), **peaks(), "budget_gib": 1.0, "plan": phase.describe(),
                         "planned_peak_gib": round(phase.peak_bytes / GiB, 3)}
            tiled = decode().float().cpu()
            # the tiling's own error (same dtype), and that plus bf16 rounding (against the fp32 reference)
            out[name]["psnr_vs_untiled_same_dtype_db"] = round(psnr(tiled, untiled[dtype]), 2)
            out[name]["psnr_vs_untiled_fp32_db"] = round(psnr(tiled, untiled[torch.float32]), 2)
            del vae
        ours.cuda()
        small = z[:, :, :3, :16, :16]
        out["one_tile_covering_frame_identical"] = bool(torch.equal(ours.decode(small, tile=(16, 16)),
                                                                    ours.decode(small)))
    cap_memory(None)


def bench_generate(report: dict, runs: int) -> None:
    from wanrt.bench.random_source import RandomSource
    from wanrt.runtime.pipeline import WanPipeline

    budget = 4 * GiB
    pipe = WanPipeline(RandomSource("t2v-1.3B"), device="cuda", vram_budget=budget)
    cap_memory(budget)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    video = pipe.generate("a red circle moves right on a blue background", size="832*480", frame_num=81,
                          sample_steps=4, base_seed=0, progress=False)
    end.record()
    torch.cuda.synchronize()
    phases = {name: {"predicted_gib": round(s["predicted_peak"] / GiB, 3),
                     "max_allocated_gib": round(s["max_allocated"] / GiB, 3),
                     "max_reserved_gib": round(s["max_reserved"] / GiB, 3),
                     "predicted_over_reserved": round(s["predicted_peak"] / s["max_reserved"], 3),
                     "seconds": round(s["seconds"], 2), "plan": s["plan"]} for name, s in pipe.phase_stats.items()}
    report["generate"] = {"budget_gib": 4.0, "frames": list(video.frames.shape), "total_s": start.elapsed_time(end) / 1e3,
                          "phases": phases, **peaks()}
    cap_memory(None)


SECTIONS = {"dit13": bench_dit13, "dit14": bench_dit14, "text": bench_text, "vae": bench_vae,
            "generate": bench_generate}


def markdown(report: dict) -> str:
    g = report["machine"]
    lines = [f"# Lean runtime benchmarks: {g['gpu']} (torch {g['torch']}, driver {g['driver']})", "",
             "Random weights, bf16, batch 1, 480p x 81 frames. CUDA-event medians after warm-up; budgets enforced by "
             "capping the caching allocator. Reproduce: `python -m experiments.stream_bench`.", "",
             *[f"- {name}: `{r['command']}`, started {r['started']}" for name, r in report.get("runs", {}).items()],
             "", "| what | time (ms) | max reserved (GiB) | max allocated (GiB) | note |", "|---|---|---|---|---|"]

    def row(name, r, note=""):
        lines.append(f"| {name} | {r['median_ms']} | {r['max_reserved_gib']} | {r['max_allocated_gib']} | {note} |")

    if "dit13" in report and "diffusers_group_offload_block_stream" in report["dit13"]:
        d = report["dit13"]
        row("1.3B DiT, ours resident", d["ours_resident"])
        row("1.3B DiT, ours resident, same token chunks", d["ours_resident_same_chunks"])
        row("1.3B DiT, ours streamed, 1 GiB cap", d["ours_streamed"],
            f"{d['streamed_over_resident']}x resident; {d['ours_streamed']['plan']}")
        row("1.3B DiT, diffusers resident", d["diffusers_resident"])
        row("1.3B DiT, diffusers group offload (block, stream)", d["diffusers_group_offload_block_stream"])
    if "ours_streamed" in report.get("dit14", {}):
        d = report["dit14"]
        row("14B DiT, ours resident", d["ours_resident"])
        row("14B DiT, ours resident, same token chunks", d["ours_resident_same_chunks"])
        row("14B DiT, ours streamed, 4 GiB cap", d["ours_streamed"],
            f"{d['streamed_over_resident']}x resident; {d['ours_streamed']['plan']}")
    if "streamed" in report.get("text", {}):
        d = report["text"]
        row("umT5-XXL 512 tokens, resident", d["resident"])
        row("umT5-XXL 512 tokens, streamed, 1.5 GiB cap", d["streamed"], d["streamed"]["plan"])
    if "ours_tiled_bfloat16" in report.get("vae", {}):
        d = report["vae"]
        for name in ("diffusers_untiled_float32", "diffusers_untiled_bfloat16", "diffusers_tiled_bfloat16"):
            row(f"VAE decode, {name.replace('_', ' ')}", d[name])
        row("VAE decode, ours untiled fp32", d["ours_untiled_fp32"])
        if "ours_untiled_bfloat16" in d:
            row("VAE decode, ours untiled bfloat16", d["ours_untiled_bfloat16"])
        for name in ("ours_tiled_float32", "ours_tiled_bfloat16"):
            if "median_ms" in d.get(name, {}):
                same = d[name].get("psnr_vs_untiled_same_dtype_db")
                row(f"VAE decode, {name.replace('_', ' ')}, 1 GiB cap", d[name],
                    (f"PSNR vs ours untiled, same dtype {same} dB; " if same is not None else "")
                    + f"PSNR vs ours untiled fp32 {d[name]['psnr_vs_untiled_fp32_db']} dB; {d[name]['plan']}")
    if "generate" in report:
        d = report["generate"]
        lines += ["", f"## Whole t2v-1.3B generation, 4 steps, 4 GiB cap: {d['total_s']:.1f} s", "",
                  "| phase | predicted (GiB) | max allocated | predicted / allocated | max reserved | "
                  "predicted / reserved | s | plan |", "|---|---|---|---|---|---|---|---|"]
        for name, p in d["phases"].items():
            lines.append(f"| {name} | {p['predicted_gib']} | {p['max_allocated_gib']} | "
                         f"{p['predicted_gib'] / p['max_allocated_gib']:.3f} | {p['max_reserved_gib']} | "
                         f"{p['predicted_over_reserved']} | {p['seconds']} | {p['plan'].split(',', 1)[1].strip()} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/stream")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of an existing report at --out (each section records its run)")
    args = p.parse_args()
    old = Path(args.out).with_suffix(".json")
    report = json.loads(old.read_text()) if args.merge and old.exists() else {}
    report.update(machine=gpu_info())
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        report.setdefault("runs", {})[name] = {"command": " ".join(["python -m experiments.stream_bench", *sys.argv[1:]]),
                                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        try:
            with torch.no_grad():
                SECTIONS[name](report, args.runs)
            report.get("errors", {}).pop(name, None)  # an error of this section's earlier run (--merge)
        except Exception as e:  # keep the other sections' results; the error is part of the report
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[name] = repr(e)
        gc.collect()
        cap_memory(None)
        write_report(report, Path(args.out), markdown(report))  # after each section: a crash keeps what finished
    print(markdown(report))


if __name__ == "__main__":
    main()
