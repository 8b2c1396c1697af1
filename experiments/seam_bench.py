"""Seams of tiled VAE decoding, by how neighbouring tiles are blended (CPU, fp32; runs in about a minute).

    python -m experiments.seam_bench --out bench/results/seams_cpu

Two tiles side by side over an 8 x 40 latent frame (2 latent frames) of the full-size Wan2.1 VAE with random
weights (initialised as bench/stream_bench.py's VAE rows). For each overlap (latents both tiles decode), two ways of
combining them over it: a linear ramp across the whole overlap (diffusers' way, and ours before) and ours now (each
tile drops the part next to its own edge, the middle TILE_BLEND latents are cross-faded; `tile_blend_weights`).
Reported: PSNR against the untiled decode within the 24 latents around the seam, mean over seeds. The overlap is
what costs time (it is decoded twice), so compare rows of equal overlap.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from wanrt.bench.common import psnr, write_report
from wanrt.bench.peers import random_wan21_vaes
from wanrt.runtime.vae import TILE_BLEND, TILE_OVERLAP, WanVAE, tile_blend_weights

T, H, W = 2, 8, 40  # latent frames, rows, columns
BAND = 12  # latents either side of the seam that the PSNR covers


def linear_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """The linear ramp across each whole overlap (the scheme measured against)."""
    out = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones((stop - start) * scale)
        up = (spans[i - 1][1] - start) * scale if i > 0 else 0
        down = (stop - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        if up:
            w[:up] = (torch.arange(up) + 0.5) / up
        if down:
            w[w.numel() - down:] = (torch.arange(down, 0, -1) - 0.5) / down
        out.append(w)
    return out


@torch.no_grad()
def seam_psnr(vae: WanVAE, seed: int, overlaps: list[int]) -> dict:
    z = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(seed))
    mean, inv_std = vae._latent_stats(z)
    mids = vae._middle_of_clip(z / inv_std + mean, torch.float32)

    def decode(c0: int, c1: int) -> torch.Tensor:
        dst = torch.empty(1, 3, 1 + 4 * (T - 1), H * 8, (c1 - c0) * 8)
        vae._decode_tile(mids[..., c0:c1], dst, None, 0, 0, torch.float32, z.device, from_middle=True)
        return dst

    full, mid = decode(0, W), W // 2
    band = slice((mid - BAND) * 8, (mid + BAND) * 8)
    out = {}
    for overlap in overlaps:
        spans = [(0, mid + overlap - overlap // 2), (mid - overlap // 2, W)]
        tiles = [decode(*s) for s in spans]
        for scheme, weights in (("linear ramp", linear_weights(spans, 8)), ("ours", tile_blend_weights(spans, 8))):
            video = torch.zeros_like(full)
            for (c0, c1), tile, w in zip(spans, tiles, weights):
                video[..., c0 * 8:c1 * 8] += tile * w
            out[f"{overlap}/{scheme}"] = psnr(video.clamp(-1, 1)[..., band], full.clamp(-1, 1)[..., band])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/seams_cpu")
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    vae, overlaps = random_wan21_vaes()[1], [2, 4, 6, 8]
    runs = [seam_psnr(vae, seed, overlaps) for seed in range(args.seeds)]
    rows = [{"overlap_latents": o, "scheme": s, "psnr_db": round(statistics.mean(r[f"{o}/{s}"] for r in runs), 2)}
            for o in overlaps for s in ("linear ramp", "ours")]
    report = {"frame_latents": [T, H, W], "band_latents": 2 * BAND, "seeds": args.seeds, "tile_overlap": TILE_OVERLAP,
              "tile_blend": TILE_BLEND, "rows": rows}
    lines = [f"# Tiled VAE decode seams (CPU, fp32, full-size Wan2.1 VAE, random weights, {args.seeds} seeds)", "",
             f"PSNR against the untiled decode within {2 * BAND} latents around the seam of two tiles. Overlap: "
             f"latents both tiles decode. Ours: each tile drops the part of the overlap next to its edge and the "
             f"middle {TILE_BLEND} latents are cross-faded (the default overlap is {TILE_OVERLAP}). Reproduce: "
             "`python -m experiments.seam_bench`.", "", "| overlap (latents) | linear ramp (dB) | ours (dB) |",
             "|---|---|---|"]
    for o in overlaps:
        lin, ours = (next(r["psnr_db"] for r in rows if r["overlap_latents"] == o and r["scheme"] == s)
                     for s in ("linear ramp", "ours"))
        lines.append(f"| {o} | {lin} | {ours} |")
    write_report(report, Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
