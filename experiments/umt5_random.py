"""How far umT5 outputs move under small weight perturbations when its weights are random: bf16 and weight-only int8
against fp32, for 2, 6 and 24 layers at reduced width (CPU). Shows why the text encoder's error on random full-size
weights says nothing about a quantization's quality (the demo model's semantic check does).

    python -m experiments.umt5_random --out bench/results/umt5_random_cpu
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wanrt.bench.common import random_state, rel_err, write_report
from wanrt.quant.formats import quantize_text_block
from wanrt.runtime.config import TextConfig
from wanrt.runtime.text import UMT5Encoder


@torch.no_grad()
def run(layers: tuple[int, ...]) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for n in layers:
        cfg = TextConfig(vocab=1000, dim=512, dim_attn=512, dim_ffn=1280, num_heads=8, num_layers=n)
        with torch.device("meta"):
            state = random_state(UMT5Encoder(cfg), device="cpu")
        exact, bf16 = UMT5Encoder(cfg), UMT5Encoder(cfg).to(torch.bfloat16)
        exact.load_state_dict(state)
        bf16.load_state_dict({k: v.bfloat16() for k, v in state.items()})
        ids = torch.randint(0, cfg.vocab, (1, 64))
        mask = torch.ones_like(ids)
        ref = exact(ids, mask)
        blocks = [quantize_text_block(exact.block_weights(i), "int8") for i in range(n)]
        rows.append({"layers": n, "bf16_vs_fp32": rel_err(bf16(ids, mask).float(), ref),
                     "int8_weights_vs_fp32": rel_err(exact(ids, mask, weights=lambda i: blocks[i]), ref)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/umt5_random_cpu"))
    a = p.parse_args()
    rows = run((2, 6, 24))
    md = ["# umT5 with random weights: output error against fp32 (CPU)", "", "Width 512 (8 heads, FFN 1280), random "
          "weights drawn as for the benchmarks, one 64-token prompt. Reproduce: `python -m experiments.umt5_random`.",
          "", "| layers | bf16 vs fp32 | int8 weights (fp32 compute) vs fp32 |", "|---|---|---|"]
    md += [f"| {r['layers']} | {r['bf16_vs_fp32']:.3f} | {r['int8_weights_vs_fp32']:.3f} |" for r in rows]
    write_report({"machine": {"gpu": "CPU", "torch": torch.__version__}, "rows": rows}, a.out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
