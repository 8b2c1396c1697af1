"""A frame strip (PNG) of one video from the embedded demo model, for the README, with the semantic check's verdict:

    python -m experiments.demo_strip --out bench/results/demo_strip.png
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import wanrt
from training.synthetic import check, parse_prompt

PROMPT = "a red circle moves right on a blue background"  # the Makefile's demo prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--every", type=int, default=2, help="one frame in this many")
    a = p.parse_args()
    frames = wanrt.load(device="cpu").generate(a.prompt, base_seed=a.seed, progress=False).frames
    ok, why = check(frames, *parse_prompt(a.prompt))
    strip = np.concatenate(list(frames[::a.every]), axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(a.out)
    print(f"wrote {a.out}: {a.prompt!r}, seed {a.seed}; check {'passed' if ok else 'failed'} ({why})")


if __name__ == "__main__":
    main()
