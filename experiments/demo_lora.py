"""The demo model with a LoRA of our own that reverses its motions (training/train_lora.py): the semantic check asked
for the prompt's motion and for the reversed one, without the LoRA, merged, and beside an int8 engine's quantized
linears (the side path). CPU or GPU.

    python -m training.train_lora --out reverse.safetensors
    python -m experiments.demo_lora --lora reverse.safetensors --out bench/results/demo_lora_cpu
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import wanrt
from training.synthetic import check, evaluate, parse_prompt
from training.train_lora import REVERSED
from wanrt.bench.common import write_report
from wanrt.export.engine import export_engine
from wanrt.runtime.engine import sha256
from wanrt.runtime.pipeline import DEMO_MODEL


ASKED, FLIPPED = "prompt's motion", "reversed motion"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", required=True)
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_lora_cpu"))
    a = p.parse_args()
    engine = export_engine(DEMO_MODEL, Path(tempfile.mkdtemp()) / "int8", "int8", progress=False)
    settings = {"no LoRA": wanrt.load(), "LoRA merged (bf16 checkpoint)": wanrt.load(loras=[a.lora]),
                "LoRA at strength 0.5, merged": wanrt.load(loras=[f"{a.lora}:0.5"]),
                "int8 engine, no LoRA": wanrt.load(engine),
                "int8 engine, LoRA beside its quantized linears": wanrt.load(engine, loras=[a.lora])}
    rows = []
    for name, pipe in settings.items():
        frames: dict[int, np.ndarray] = {}
        asked = evaluate(pipe, frames=frames)["results"]
        flipped = []
        for r in asked:  # the same videos, checked for the opposite motion
            colour, motion = parse_prompt(r["prompt"])
            flipped.append({"seed": r["seed"], "ok": bool(check(frames[r["seed"]], colour, REVERSED[motion])[0])})
        rows.append({"setting": name, **{label: {"pass_rate": sum(x["ok"] for x in results) / len(results),
                                                 "failed_seeds": [x["seed"] for x in results if not x["ok"]]}
                                         for label, results in ((ASKED, asked), (FLIPPED, flipped))}})
        print(rows[-1], flush=True)
    pipe = next(iter(settings.values()))
    device = str(pipe.device) if pipe.device.type == "cpu" else torch.cuda.get_device_name()
    md = [f"# Demo model with a motion-reversing LoRA ({device})", "",
          f"LoRA: `{Path(a.lora).name}` (sha256 {sha256(Path(a.lora))[:16]}...), trained by `python -m "
          "training.train_lora` (rank 8, musubi keys). 20 fixed prompts and seeds (64x64, 17 frames, the model's own "
          "sampling). Each video is checked twice: does its blob move as the prompt says, and does it move the "
          "opposite way. Reproduce: `python -m experiments.demo_lora --lora FILE`.", "",
          "| setting | passes the prompt's motion | passes the reversed motion |", "|---|---|---|"]
    md += [f"| {r['setting']} | {r[ASKED]['pass_rate']:.0%} | {r[FLIPPED]['pass_rate']:.0%} |" for r in rows]
    write_report({"device": device, "lora_sha256": sha256(Path(a.lora)), "rows": rows}, a.out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
