"""The demo model's semantic check with step caching (CPU or GPU), and each setting's frames against the uncached
video of the same seed (PSNR). The demo model's MagCache ratios are its own calibration (runtime/demo_model/
magcache.json, `wanrt calibrate-cache`); TeaCache has no coefficients for it.

    python -m experiments.demo_cache --out bench/results/demo_cache_cpu
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import wanrt
from training.synthetic import evaluate
from wanrt.bench.common import psnr, write_report

SETTINGS = {"none": ({}, None), "magcache (its defaults: 0.24, K 6)": ({}, "magcache"),
            "magcache 0.12, K 2": ({}, "magcache:0.12:2"), "magcache 0.12, K 4": ({}, "magcache:0.12:4"),
            "50 steps, none": ({"steps": 50}, None), "50 steps, magcache (0.24, K 6)": ({"steps": 50}, "magcache"),
            "50 steps, magcache 0.12, K 4": ({"steps": 50}, "magcache:0.12:4")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_cache_cpu"))
    a = p.parse_args()
    pipe = wanrt.load()
    rows, uncached = [], {}
    for name, (kw, cache) in SETTINGS.items():
        pipe.cache = cache
        frames: dict[int, np.ndarray] = {}
        r = evaluate(pipe, frames=frames, **kw)
        key = kw.get("steps")
        if cache is None:
            uncached[key] = frames
        schedule = pipe.step_schedule
        rows.append({"setting": name, "pass_rate": r["pass_rate"],
                     "failed_seeds": [x["seed"] for x in r["results"] if not x["ok"]],
                     "dit_passes": f"{schedule.computed} of {schedule.passes}" if schedule else "all",
                     "psnr_vs_uncached_db": None if cache is None else round(float(np.mean(
                         [psnr(torch.from_numpy(f).float(), torch.from_numpy(uncached[key][s]).float(), 255.0)
                          for s, f in frames.items()])), 2)})
        print(rows[-1], flush=True)
    device = str(pipe.device) if pipe.device.type == "cpu" else torch.cuda.get_device_name()
    md = [f"# Demo model with step caching ({device})", "", "20 fixed prompts and seeds (64x64, 17 frames, guidance "
          f"{pipe.variant.sample_guide_scale:g}, 20 steps unless said). PSNR: mean over the seeds of the frames "
          "against the uncached video of the same seed and steps. Reproduce: `python -m experiments.demo_cache`.", "",
          "| setting | DiT passes run | pass rate | failed seeds | PSNR vs uncached (dB) |", "|---|---|---|---|---|"]
    md += [f"| {r['setting']} | {r['dit_passes']} | {r['pass_rate']:.0%} | {r['failed_seeds']} | "
           f"{'-' if r['psnr_vs_uncached_db'] is None else r['psnr_vs_uncached_db']} |" for r in rows]
    write_report({"device": device, "rows": rows}, a.out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
