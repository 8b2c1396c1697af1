"""The quantized kernels checked at the Wan shapes on a GPU: the full-size twin of the CPU tests (which run them on
small shapes under TRITON_INTERPRET=1). Fresh random inputs every run, every output buffer NaN-filled first.

    python -m experiments.kernel_check --out bench/results/kernel_check_h100 [--small]

  activation quantization  quantize_rows_triton against quantize_rows_reference at each GEMM input shape
  GEMMs     scaled_mm_triton with the table's config (what the DiT runs) against an fp32 GEMM of the same quantized
            operands (TF32 off), for fp8, int8 and w8a16 at the six 1.3B and 14B linear shapes of 480p x 81 frames
  attention each quantized mode at (1, 12, 32760, 128) against the kernel's arithmetic in fp32 PyTorch on the same
            quantized inputs, chunked over queries (the reference differs only by the rounding of P)

Bounds (relative norm error): GEMMs 5e-3 (the bf16 output alone rounds at 2^-9); attention 0.045 with fp8 P and 0.01
with 16-bit P, as the CPU tests. `--small` divides the token counts by 64 (a quick run). Exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from wanrt.bench.common import gpu_info, write_report
from experiments.gemm_bench import SHAPES
from wanrt.kernels import attention as A
from wanrt.kernels.quantize import quantize_rows_reference, quantize_rows_triton, quantize_weight
from wanrt.kernels.scaled_gemm import scaled_mm_reference, scaled_mm_triton

GEMM_BOUND = 5e-3
ATTN_BOUND = {"fp8": 0.045, "int8_fp8pv": 0.045, "fp8_bf16pv": 0.01, "int8": 0.01}
ACT = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "w8a16": None}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def nan_filled(shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def compare_quantized(name: str, q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> dict:
    """Kernel against reference quantization. On the CPU (interpreter) they agree bit for bit; compiled, Triton's
    division and reciprocal may differ from torch's by an ulp, which moves a value sitting on a rounding boundary by
    one code. So: scales within 1e-6, and the share of codes that differ (each by one step at most) under 1e-4."""
    scale_err = ((s - s_ref).abs() / s_ref).max().item()
    a, b = q.float(), q_ref.float()
    differ = a != b
    share = differ.float().mean().item()
    # one step: 1 for int8; for e4m3 the gap to the next code, below 2^-3 of the value (3 mantissa bits)
    steps = (a - b).abs()[differ] / b.abs()[differ].clamp_min(1.0) if share else torch.zeros(1)
    ok = scale_err <= 1e-6 and share <= 1e-4 and steps.max().item() <= (1.0 if q.dtype == torch.int8 else 0.13)
    return {"check": name, "ok": bool(ok), "error": share, "scale_err": scale_err, "max_step": steps.max().item()}


def check_gemms(tokens: int) -> list[dict]:
    rows = []
    for _, K, N in SHAPES:
        x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        for mode, act in ACT.items():
            if act is None:
                xq, xs = x, None
            else:
                xq, xs = quantize_rows_triton(x, act)
                rows.append(compare_quantized(f"quantize {mode} [{tokens}, {K}]", xq, xs,
                                              *quantize_rows_reference(x, act)))
                print(rows[-1], flush=True)
            wq, ws = quantize_weight(w, torch.float8_e4m3fn if mode == "fp8" else torch.int8)
            out = nan_filled((tokens, N))
            scaled_mm_triton(xq, wq, xs, ws, bias, out=out)
            want = scaled_mm_reference(xq, wq, xs, ws, bias, out_dtype=torch.float32)
            err = rel_err(out, want)
            ok = not out.isnan().any().item() and err < GEMM_BOUND
            rows.append({"check": f"{mode} GEMM [{tokens}, {K}] -> {N}", "ok": bool(ok), "error": err})
            print(rows[-1], flush=True)
            del out, want
        del x, w
    return rows


def quantized_reference(qk: A.QuantizedQK, v, mode: str, chunk: int = 2048) -> torch.Tensor:
    """`attention_quantized_ref` on already quantized inputs, chunked over queries so the scores fit in memory."""
    q, k = A.dequantize_qk(qk)
    if mode in A.FP8_PV_MODES:
        vv = (v.v.float() * v.scale[..., None])[..., :v.lk].transpose(-1, -2)
    else:
        vv = v.float().transpose(1, 2)
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1] * q.shape[3], device=q.device)
    for i in range(0, q.shape[2], chunk):
        p = torch.softmax((q[:, :, i:i + chunk] @ k.transpose(-1, -2)) / A.LOG2E, dim=-1)
        out[:, i:i + chunk] = (p @ vv).transpose(1, 2).flatten(2)
    return out


def check_attention(tokens: int) -> list[dict]:
    rows = []
    B, H, D = 1, 12, 128
    q, k, v = (torch.randn(B, tokens, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cap = torch.cuda.get_device_capability()
    for mode in ATTN_BOUND:
        if cap < A.MIN_CAPABILITY[mode]:
            continue
        cfg = A.default_config(mode, D, cap)
        qk = A.quantize_qk(q, k, A.QK_DTYPE[mode])
        vv = A.quantize_v(v) if mode in A.FP8_PV_MODES else v
        out = nan_filled((B, tokens, H * D))
        A.attention_kernel(qk, vv, cfg, out=out)
        err = rel_err(out, quantized_reference(qk, vv, mode))
        ok = not out.isnan().any().item() and err < ATTN_BOUND[mode]
        rows.append({"check": f"attention {mode} {cfg.describe()} [{B}, {H}, {tokens}, {D}]", "ok": bool(ok),
                     "error": err})
        print(rows[-1], flush=True)
    return rows


def markdown(report: dict) -> str:
    g = report["machine"]
    lines = [f"# Kernel check at the Wan shapes: {g['gpu']} (torch {g['torch']}, triton {g.get('triton')})", "",
             "Relative errors against each kernel's reference on the same quantized inputs; for the quantization rows "
             "the share of codes that differ from the reference's (bound 1e-4, each by one step at most, scales "
             "within 1e-6). Bounds: GEMMs 5e-3, attention 0.045 (fp8 P) or 0.01. "
             "Reproduce: `python -m experiments.kernel_check`.", "", "| check | relative error | ok |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['error']:.2e} | {'yes' if r['ok'] else '**no**'} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel_check"))
    p.add_argument("--small", action="store_true", help="token counts / 64: a quick run")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_check needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the references are true fp32 GEMMs
    tokens = 32760 // (64 if a.small else 1)
    report = {"machine": gpu_info(), "tokens": tokens, "rows": []}
    with torch.no_grad():
        report["rows"] += check_gemms(tokens)
        report["rows"] += check_attention(tokens)
    write_report(report, a.out, markdown(report))
    print(markdown(report))
    failed = [r["check"] for r in report["rows"] if not r["ok"]]
    raise SystemExit(f"{len(failed)} checks failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
