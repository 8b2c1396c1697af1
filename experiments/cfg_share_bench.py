"""Streamed DiT steps with classifier-free guidance: both branches running each block while it is on the GPU, against
one pass per branch and against every block resident; and umT5 with weight-only int8/fp8 blocks: its error against
bf16 and the host memory it takes (a GPU script, random full-size weights).

    python -m experiments.cfg_share_bench [--variant t2v-14B] [--budget 8GiB] [--link-gbps 23] --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from wanrt.bench.common import GiB, gpu_info, rel_err, write_report
from wanrt.bench.link import LinkEmulator
from wanrt.bench.matrix import cap, measure
from wanrt.bench.random_source import RandomSource
from wanrt.runtime.options import RunOptions, parse_bytes, parse_size
from wanrt.runtime.pipeline import WanPipeline, default_vram_budget
from wanrt.runtime.sampler import default_shift, make_solver

PROMPT = "a red fox runs through deep snow at dawn, cinematic"


def denoise_rows(source, args, dev) -> list[dict]:
    pipe = WanPipeline(source, dev, options=RunOptions(attention=args.attention))
    w, h = parse_size(args.size)
    st = pipe.variant.vae.stride
    lat = ((args.frame_num - 1) // st[0] + 1, h // st[1], w // st[2])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.variant.vae.z_dim, *lat, generator=g).to(dev)
    contexts = [torch.randn(1, pipe.variant.dit.text_len, pipe.variant.dit.text_dim, generator=g).to(dev, pipe.dtype)
                for _ in range(2)]
    link = LinkEmulator(args.link_gbps, dev) if args.link_gbps and dev.type == "cuda" else None
    rows, outputs = [], {}
    for name, budget, shared in (("streamed, branches share each block", args.budget, True),
                                 ("streamed, one pass per branch", args.budget, False), ("resident", None, None)):
        pipe.vram_budget = default_vram_budget(dev) if budget is None else budget
        pipe.block_copy = link if budget is not None else None
        plan = pipe.plan(lat, 1)
        phase = plan.phase("denoise")
        if shared is not None:
            phase = dataclasses.replace(phase, shared=shared)
        solver = make_solver("unipc", 1, default_shift("t2v", args.size))
        embedded = pipe._embed(plan.phase("embed"), contexts, None, solver.timesteps)
        cap(dev, budget)
        out, stats = measure(lambda: pipe._denoise(phase, latents, None, *embedded, solver, 5.0, False), dev,
                             args.warmup, args.runs)
        cap(dev, None)
        outputs[name] = out.float().cpu()
        rows.append({"setting": name, "budget_gib": None if budget is None else budget / GiB,
                     "plan": phase.describe(), **stats})
        print(name, stats["median_ms"], "ms", flush=True)
    for row in rows:
        row["rel_err_vs_resident"] = rel_err(outputs[row["setting"]], outputs["resident"])
    base = rows[-1]["median_ms"]
    for row in rows:
        row["vs_resident"] = round(row["median_ms"] / base, 3)
    return rows


def text_rows(source, dev) -> list[dict]:
    rows, exact = [], None
    for scheme in ("bf16", "int8", "fp8"):
        pipe = WanPipeline(source, dev, options=RunOptions(text_scheme=scheme, ram_budget=0))  # no pinned copies
        plan = pipe.plan((21, 60, 104), 1)
        (out,) = pipe._encode_text(plan.phase("text"), [PROMPT])
        store = pipe.text_store
        exact = out.float() if exact is None else exact
        rows.append({"text_scheme": scheme, "host_gib": round(len(store) * store.layout.nbytes / GiB, 3),
                     "rel_err_vs_bf16": rel_err(out.float(), exact)})
        print(rows[-1], flush=True)
        del pipe
    return rows


def markdown(report: dict) -> str:
    g, a = report["machine"], report["args"]
    lines = [f"# CFG branches sharing streamed blocks; weight-only umT5: {g['gpu']} (torch {g['torch']})", "",
             f"{a['variant']}, {a['size']} x {a['frame_num']} frames, random weights, attention {a['attention']}; one "
             f"denoise step with guidance 5 (two DiT branches), host link throttled to {a['link_gbps']} GB/s for the "
             f"streamed rows, budget {a['budget']}. Reproduce: `python -m experiments.cfg_share_bench`.", "",
             "| setting | step (ms) | vs resident | peak reserved (GiB) | rel. err vs resident | plan |",
             "|---|---|---|---|---|---|"]
    for r in report["denoise"]:
        lines.append(f"| {r['setting']} | {r['median_ms']:,.0f} | {r['vs_resident']:.3f} | {r['max_reserved_gib']} | "
                     f"{r['rel_err_vs_resident']:.1e} | {r['plan']} |")
    lines += ["", "umT5-XXL blocks, one 512-token prompt:", "", "| text scheme | blocks in host RAM (GiB) | "
              "output rel. err vs bf16 |", "|---|---|---|"]
    lines += [f"| {r['text_scheme']} | {r['host_gib']} | {r['rel_err_vs_bf16']:.2e} |" for r in report["text"]]
    return "\n".join(lines) + "\n"


@torch.no_grad()  # the phases are called directly, outside generate's no_grad
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="t2v-14B")
    p.add_argument("--size", default="832*480")
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--budget", type=parse_bytes, default=parse_bytes("8GiB"))
    p.add_argument("--link-gbps", type=float, default=23.0)
    p.add_argument("--attention", default="auto")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/cfg_share"))
    a = p.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    source = RandomSource(a.variant)
    report = {"machine": gpu_info() if dev.type == "cuda" else {"gpu": "cpu", "torch": torch.__version__}, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    report["args"]["budget"] = f"{a.budget / GiB:g} GiB"
    report["denoise"] = denoise_rows(source, a, dev)
    report["text"] = text_rows(source, dev)
    write_report(report, a.out, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
