"""A roofline line per phase: the time the phase could take if bound only by arithmetic (FLOPs / the GPU's measured
bf16 matmul rate) or only by the weights it streams over the host link (bytes / the measured or emulated rate).

FLOPs are counted by running the models' own code on the meta device under torch's FlopCounterMode, with the
plain-PyTorch references in place of the fused kernels (whose FLOPs the counter cannot see; they are the same)."""
from __future__ import annotations

import dataclasses
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.config import Variant
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.text import UMT5Encoder
from wanrt.runtime.vae import WanVAE


def measured_peaks(device: torch.device) -> dict:
    """bf16 matmul TFLOP/s (8192^3) and device-memory GB/s (a 1 GiB copy reads and writes it), medians of 3."""
    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul = 2 * 8192**3 / timed(lambda: a @ a)
    buf = torch.empty(2**30, dtype=torch.uint8, device=device)
    out = torch.empty_like(buf)
    hbm = 2 * buf.numel() / timed(lambda: out.copy_(buf))
    return {"matmul_tflops": round(matmul / 1e12, 1), "hbm_gbps": round(hbm / 1e9, 1)}


def _flops(fn, *args) -> int:
    with torch.no_grad(), reference_only(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def _per_block(cls, cfg, run) -> int:
    """FLOPs of a `num_layers`-block model from its 1- and 2-block meta copies (the blocks are alike)."""
    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            model = cls(dataclasses.replace(cfg, num_layers=layers)).to(torch.bfloat16)
        counts.append(_flops(run, model))
    return counts[0] + (cfg.num_layers - 1) * (counts[1] - counts[0])


def phase_flops(v: Variant, lat: tuple[int, int, int]) -> dict[str, int]:
    """FLOPs of the text phase (prompt and negative prompt), one denoise step with CFG (two forwards) and the VAE
    decode of latents of (frames, height, width)."""
    dit, text = dataclasses.replace(v.dit, quant="bf16"), v.text  # a quantized GEMM does the same multiply-adds
    ids = torch.zeros(2, text.text_len, dtype=torch.long, device="meta")
    x = torch.empty(1, dit.in_dim, *lat, device="meta")
    ctx = torch.empty(1, dit.text_len, dit.dim, device="meta", dtype=torch.bfloat16)
    t = (torch.empty(1, dit.dim, device="meta"), torch.empty(1, 6, dit.dim, device="meta"))
    with torch.device("meta"):
        vae = WanVAE(v.vae).to(torch.bfloat16)
    z = torch.empty(1, v.vae.z_dim, *lat, device="meta")
    return {"text": _per_block(UMT5Encoder, text, lambda m: m(ids, torch.ones_like(ids))),
            "denoise_step": 2 * _per_block(WanDiT, dit, lambda m: m.denoise(x, t, ctx, None, None)),
            "decode": _flops(lambda: vae.decode(z, compute_dtype=torch.bfloat16))}


def roofline(flops: int, streamed_bytes: int, peaks: dict, link_bytes_per_s: float) -> dict:
    return {"flops": float(flops), "compute_ms": round(flops / (peaks["matmul_tflops"] * 1e12) * 1e3, 2),
            "streamed_bytes": int(streamed_bytes), "link_ms": round(streamed_bytes / link_bytes_per_s * 1e3, 2)}
