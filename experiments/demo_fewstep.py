"""The demo model's semantic check with few steps (CPU or GPU): its own schedule, LightX2V's distill4 preset and the
official grid at 4 and 8 steps. The demo model is not step-distilled, so this shows what a preset alone does.

    python -m experiments.demo_fewstep --out bench/results/demo_fewstep_cpu
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import wanrt
from training.synthetic import evaluate
from wanrt.bench.common import write_report

SETTINGS = {"model's own (20 steps, unipc, guidance 2)": {}, "preset distill4 (4 steps, euler, guidance 1)":
            {"preset": "distill4"}, "4 steps, unipc, guidance 2": {"steps": 4}, "8 steps, unipc, guidance 2":
            {"steps": 8}, "preset distill4 with guidance 5": {"preset": "distill4", "guide": 5.0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_fewstep_cpu"))
    a = p.parse_args()
    pipe = wanrt.load()
    rows = []
    for name, kw in SETTINGS.items():
        r = evaluate(pipe, **kw)
        rows.append({"setting": name, "pass_rate": r["pass_rate"], "failed_seeds": [x["seed"] for x in r["results"]
                                                                                     if not x["ok"]]})
        print(rows[-1], flush=True)
    device = str(pipe.device) if pipe.device.type == "cpu" else torch.cuda.get_device_name()
    md = [f"# Demo model, few-step sampling ({device})", "", "20 fixed prompts and seeds (64x64, 17 frames). "
          "Reproduce: `python -m experiments.demo_fewstep`.", "", "| setting | pass rate | failed seeds |", "|---|---|---|"]
    md += [f"| {r['setting']} | {r['pass_rate']:.0%} | {r['failed_seeds']} |" for r in rows]
    write_report({"device": device, "rows": rows}, a.out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
