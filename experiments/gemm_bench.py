"""Quantized GEMM benchmark on the GPU at the Wan2.1 linear shapes (M tokens x K in -> N out, 480p: M = 32760).

Our fp8 / int8 / w8a16 Triton kernels against cuBLAS bf16, torch._scaled_mm and the quantization libraries:

    python -m experiments.gemm_bench --out bench/results/gemm_h100 [--shapes 0,1] [--no-sweep] [--peers ...]

For each shape and each of our modes a small sweep over block configs runs first (every candidate is checked for
NaNs and accuracy, then timed); the winner is timed again with the per-token activation quantization included, and
the winners are printed as CONFIGS lines for kernels/scaled_gemm.py. Times: triton.testing.do_bench medians (ms,
L2 flushed between calls), random data (activations N(0, 1), weights N(0, 1/K), bias N(0, 0.02^2)). Relative
errors are ||y - y_bf16|| / ||y_bf16|| against the bf16 F.linear output. Any peer may fail (missing library,
unsupported GPU, out of resources): its error goes in the report and the run goes on. The report is rewritten
after each shape. A full run compiles some 40 kernel variants (cached by Triton between runs) and times ~50
candidates per shape: split it with --shapes to stay under a time limit.
"""
from __future__ import annotations

import argparse
import gc
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanrt.bench.common import gpu_info, rel_err, write_report
from wanrt.kernels.dispatch import capability
from wanrt.kernels.quantize import quantize_rows_triton, quantize_weight
from wanrt.kernels.scaled_gemm import block_config, pick_config, scaled_mm_reference, scaled_mm_triton

SHAPES = [  # (M, K, N): 1.3B ffn.0, ffn.2, attention; 14B ffn.0, ffn.2, attention
    (32760, 1536, 8960), (32760, 8960, 1536), (32760, 1536, 1536),
    (32760, 5120, 13824), (32760, 13824, 5120), (32760, 5120, 5120),
]
PEERS = ("bf16", "producer", "scaled_mm", "fp8", "int8", "w8a16", "bnb", "quanto", "torchao")


# Hopper candidates: 8-bit operands (fp8, int8) and w8a16 (bf16 A: half the K per byte of shared memory).
C = block_config
SWEEP_8BIT = [C(128, 256, 128, 8, 3), C(128, 256, 128, 8, 4), C(256, 128, 128, 8, 3),
              # TMA descriptor loads (sm_90+): TMA won every 8-bit shape on the H100, 9 of 12 as persistent kernels
              C(128, 256, 128, 8, 4, tma=True), C(256, 128, 128, 8, 4, tma=True),
              C(128, 256, 128, 8, 3, persistent=True, tma=True), C(256, 128, 128, 8, 3, persistent=True, tma=True),
              C(128, 256, 128, 8, 4, persistent=True, tma=True), C(256, 128, 128, 8, 4, persistent=True, tma=True)]
SWEEP_W8A16 = [C(128, 256, 64, 8, 3), C(128, 256, 64, 8, 4), C(128, 128, 64, 8, 4), C(128, 128, 64, 4, 4),
               C(64, 256, 64, 4, 4), C(128, 128, 128, 8, 3), C(128, 256, 64, 8, 3, persistent=True)]


def bench(fn: Callable[[], torch.Tensor], warmup: int, rep: int) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cfg_name(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"g{cfg['GROUP_M']}{' persistent' if cfg.get('PERSISTENT') else ''}"
            f"{' tma' if cfg.get('TMA') else ''}"
            f"{' imprecise<=' + str(cfg['MAX_IMPRECISE_ACC']) if cfg.get('MAX_IMPRECISE_ACC') else ''}")


def cfg_code(cfg: dict) -> str:
    """The config as it reads in kernels/scaled_gemm.py CONFIGS."""
    code = (f"block_config({cfg['BLOCK_M']}, {cfg['BLOCK_N']}, {cfg['BLOCK_K']}, {cfg['num_warps']}, "
            f"{cfg['num_stages']}, group={cfg['GROUP_M']}, persistent={bool(cfg.get('PERSISTENT'))}"
            f"{', tma=True' if cfg.get('TMA') else ''})")
    if cfg.get("MAX_IMPRECISE_ACC"):
        code = f"dict({code}, MAX_IMPRECISE_ACC={cfg['MAX_IMPRECISE_ACC']})"
    return code


class Shape:
    """Inputs of one shape and the bf16 reference output; each peer is measured through `run`."""

    def __init__(self, M: int, K: int, N: int, warmup: int, rep: int, device: str = "cuda"):
        self.M, self.K, self.N, self.warmup, self.rep = M, K, N, warmup, rep
        self.x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        self.w = (torch.randn(N, K, device=device) / K**0.5).to(torch.bfloat16)
        self.bias = (torch.randn(N, device=device) * 0.02).to(torch.bfloat16)
        self.ref = F.linear(self.x, self.w, self.bias)
        self.rows: list[dict] = []  # the report table
        self.sweep: list[dict] = []  # every config tried (JSON only)

    def tflops(self, ms: float) -> float:
        return 2 * self.M * self.N * self.K / (ms * 1e-3) / 1e12

    def run(self, name: str, make: Callable[[], Callable[[], torch.Tensor]], note: str = "",
            ref: torch.Tensor | None = None, record: bool = True, compare: bool = True,
            exact: torch.Tensor | None = None) -> dict:
        """make() builds the peer (quantizes weights...) and returns the timed call; errors are recorded.
        compare=False: the call is not a linear (activation quantization alone), only time it. `exact`: the fp32
        result for the same quantized operands (scaled_mm_reference), giving the kernel's own error."""
        row = {"name": name, "note": note}
        try:
            fn = make()
            y = fn()
            sync()
            row["nan"] = bool(y.isnan().any()) if y.is_floating_point() else False
            if compare:
                if y.shape != self.ref.shape:
                    raise RuntimeError(f"output shape {tuple(y.shape)}, expected {tuple(self.ref.shape)}")
                row["rel_err"] = rel_err(y.float(), (self.ref if ref is None else ref).float())
            if exact is not None:
                row["kernel_err"] = rel_err(y.float(), exact)
            del y
            ms = bench(fn, self.warmup, self.rep)
            row.update(ms=round(ms, 4), tflops=round(self.tflops(ms), 1))
        except Exception as e:  # noqa: BLE001 - one failing peer must not stop the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"   {name}: FAILED {row['error']}", flush=True)
        else:
            err = f", rel err {row['rel_err']:.2e}" if compare else ""
            print(f"   {name}: {row['ms']:.4f} ms{err}{', NaN!' if row['nan'] else ''} {note}", flush=True)
        if not compare:
            row.pop("tflops", None)
        (self.rows if record else self.sweep).append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row


# ------------------------------------------------------------------------------------------------------ peers
def ours(s: Shape, mode: str, sweep: bool, winners: dict) -> None:
    """Our kernel for one mode: config sweep (GEMM alone, pre-quantized activations), then the winner with the
    activation quantization (and, for the FFN's first linear, the fused GELU)."""
    act = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "w8a16": None}[mode]
    wq, ws = quantize_weight(s.w, torch.float8_e4m3fn if mode == "fp8" else torch.int8)
    if act is None:
        xq, xs = s.x, None
    else:
        xq, xs = quantize_rows_triton(s.x, act)
        s.run(f"{mode} activation quantization alone", lambda: lambda: quantize_rows_triton(s.x, act)[0],
              compare=False)
    table = pick_config(mode, s.M, s.N, s.K, capability(s.x.device))
    candidates = [table] + [c for c in (SWEEP_W8A16 if mode == "w8a16" else SWEEP_8BIT) if c != table] \
        if sweep else [table]
    exact = scaled_mm_reference(xq, wq, xs, ws, s.bias, out_dtype=torch.float32)  # fp32 GEMM, same operands
    best = None
    for cfg in candidates:
        row = s.run(f"ours {mode} GEMM [{cfg_name(cfg)}]",
                    lambda cfg=cfg: lambda: scaled_mm_triton(xq, wq, xs, ws, s.bias, config=cfg),
                    note="table config" if cfg == table else "", record=False, exact=exact)
        ok = "ms" in row and not row["nan"] and row["rel_err"] < 0.1
        if ok and (best is None or row["ms"] < best[1]["ms"]):
            best = (cfg, row)
    if best is None:
        s.rows.append({"name": f"ours {mode}", "error": "every config failed"})
        return
    cfg, row = best
    s.rows.append(dict(row, name=f"ours {mode} GEMM", note=cfg_name(cfg)))
    winners[(mode, s.N, s.K)] = (cfg, row["ms"], row["tflops"])
    if mode == "fp8":  # the cost of promoting the fast fp8 accumulation into fp32 every BLOCK_K (DeepSeek-V3 style)
        precise = dict(block_config(128, 128, 128, 8, 4), MAX_IMPRECISE_ACC=128)
        s.run("ours fp8 GEMM, fp32-promoted accumulation",
              lambda: lambda: scaled_mm_triton(xq, wq, xs, ws, s.bias, config=precise), cfg_name(precise),
              exact=exact)
    del exact

    def linear(gelu: bool = False) -> torch.Tensor:  # the whole quantized linear, as quant.linear runs it
        if act is None:
            return scaled_mm_triton(s.x, wq, None, ws, s.bias, gelu, config=cfg)
        q, scale = quantize_rows_triton(s.x, act)
        return scaled_mm_triton(q, wq, scale, ws, s.bias, gelu, config=cfg)

    if act is not None:
        s.run(f"ours {mode} GEMM + activation quant", lambda: linear, note=cfg_name(cfg))
    if s.N in (8960, 13824):  # the FFN's first linear: GELU in the epilogue, against bf16 F.linear + GELU
        s.run(f"ours {mode} GEMM{' + activation quant' if act is not None else ''} + GELU",
              lambda: lambda: linear(True), cfg_name(cfg), F.gelu(s.ref.float(), approximate="tanh"))


def producer(s: Shape) -> None:
    """In the DiT the activation quantization is fused into the norm that produces the GEMM input (q/k/v, the
    cross-attention query and the FFN's first linear read it). So the in-model cost of a linear is norm + GEMM:
    bf16 (norm -> bf16, cuBLAS) against fp8 (norm -> fp8 with per-token scales, our GEMM)."""
    from wanrt.kernels.norm_modulate import norm_modulate_triton

    x = torch.randn(1, s.M, s.K, device="cuda")  # the fp32 residual stream
    shift, scale = (torch.randn(1, 1, s.K, device="cuda") * 0.1 for _ in range(2))
    h = norm_modulate_triton(x, 1e-6, shift, scale)[0]
    ref = F.linear(h, s.w, s.bias)
    wq, ws = quantize_weight(s.w, torch.float8_e4m3fn)
    cfg = pick_config("fp8", s.M, s.N, s.K, capability(s.x.device))
    s.run("norm -> bf16 alone", lambda: lambda: norm_modulate_triton(x, 1e-6, shift, scale), compare=False)
    s.run("norm -> fp8 alone", lambda: lambda: norm_modulate_triton(x, 1e-6, shift, scale,
                                                                     out_dtype=torch.float8_e4m3fn)[0], compare=False)
    s.run("norm -> bf16, then bf16 F.linear (cuBLAS)",
          lambda: lambda: F.linear(norm_modulate_triton(x, 1e-6, shift, scale)[0], s.w, s.bias), ref=ref)

    def fp8() -> torch.Tensor:
        q, qs = norm_modulate_triton(x, 1e-6, shift, scale, out_dtype=torch.float8_e4m3fn)
        return scaled_mm_triton(q[0], wq, qs[0], ws, s.bias, config=cfg)

    s.run("norm -> fp8 (quantization fused), then ours fp8 GEMM", lambda: fp8, note=cfg_name(cfg), ref=ref)


def torch_scaled_mm(s: Shape) -> None:
    """torch._scaled_mm with row-wise scales (cuBLASLt / CUTLASS fp8), with our quantized operands."""
    wq, ws = quantize_weight(s.w, torch.float8_e4m3fn)
    xq, xs = quantize_rows_triton(s.x, torch.float8_e4m3fn)

    def call(xq, xs, bias):
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.view(-1, 1), scale_b=ws.view(1, -1), bias=bias,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    try:
        call(xq, xs, s.bias)
        bias, note = s.bias, "fast accum, bias"
    except Exception:  # noqa: BLE001 - some versions reject bias with row-wise scales
        bias, note = None, "fast accum, no bias (rejected)"
    s.run("torch._scaled_mm fp8 rowwise GEMM", lambda: lambda: call(xq, xs, bias), note)
    s.run("torch._scaled_mm fp8 rowwise + our activation quant",
          lambda: lambda: call(*quantize_rows_triton(s.x, torch.float8_e4m3fn), bias), note)


def _module(s: Shape) -> nn.Module:
    lin = nn.Linear(s.K, s.N, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(s.w)
        lin.bias.copy_(s.bias)
    return nn.Sequential(lin)


def bnb(s: Shape) -> None:
    def int8():
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(s.K, s.N, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(s.w.cpu(), requires_grad=False, has_fp16_weights=False)
        layer.bias = nn.Parameter(s.bias.cpu(), requires_grad=False)
        layer = layer.cuda()  # quantizes here
        return lambda: layer(s.x)

    def nf4():
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(s.K, s.N, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(s.w.cpu(), requires_grad=False, quant_type="nf4")
        layer.bias = nn.Parameter(s.bias.cpu(), requires_grad=False)
        layer = layer.cuda()
        return lambda: layer(s.x)

    s.run("bitsandbytes Linear8bitLt (int8, threshold 0)", int8)
    s.run("bitsandbytes Linear4bit nf4", nf4)


def quanto(s: Shape) -> None:
    def make(kind):
        def build():
            from optimum.quanto import freeze, qfloat8, qint8, quantize

            m = _module(s)
            quantize(m, weights={"qint8": qint8, "qfloat8": qfloat8}[kind])
            freeze(m)
            return lambda: m(s.x)
        return build

    s.run("optimum-quanto qint8 weights", make("qint8"))
    s.run("optimum-quanto qfloat8 weights", make("qfloat8"))


def torchao(s: Shape) -> None:
    def int8_wo():
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            cfg = Int8WeightOnlyConfig()
        except ImportError:
            from torchao.quantization import int8_weight_only
            cfg = int8_weight_only()
        m = _module(s)
        quantize_(m, cfg)
        return lambda: m(s.x)

    def fp8_dyn():
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import PerRow
        except ImportError:
            from torchao.quantization.granularity import PerRow
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
            cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        except ImportError:
            from torchao.quantization import float8_dynamic_activation_float8_weight
            cfg = float8_dynamic_activation_float8_weight(granularity=PerRow())
        m = _module(s)
        quantize_(m, cfg)
        return lambda: m(s.x)

    s.run("torchao int8_weight_only", int8_wo)
    s.run("torchao float8 dynamic act + weight, per row", fp8_dyn)


# ------------------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Quantized GEMMs: {m['gpu']} (torch {m['torch']}, triton {m['triton']})", "",
             "M tokens x K -> N, bias on; do_bench medians; TFLOP/s counts 2MNK; rel err against bf16 F.linear "
             "(+ tanh-GELU for the GELU rows); kernel err against an fp32 GEMM of the same quantized operands. "
             "Reproduce: `python -m experiments.gemm_bench`.", ""]
    for sh in report["shapes"]:
        bf16 = next((r["ms"] for r in sh["rows"] if r["name"] == "bf16 F.linear (cuBLAS)" and "ms" in r), None)
        lines += [f"## M={sh['M']} K={sh['K']} N={sh['N']}", "",
                  "| what | ms | TFLOP/s | vs bf16 | rel err | kernel err | note |", "|---|---|---|---|---|---|---|"]
        for r in sh["rows"]:
            if "ms" in r:
                speed = f"{bf16 / r['ms']:.2f}x" if bf16 and "rel_err" in r else ""
                err = (f"{r['rel_err']:.2e}" if "rel_err" in r else "") + (" NaN!" if r.get("nan") else "")
                tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
                kerr = f"{r['kernel_err']:.1e}" if "kernel_err" in r else ""
                lines.append(f"| {r['name']} | {r['ms']:.4f} | {tf} | {speed} | {err} | {kerr} | {r['note']} |")
            else:
                lines.append(f"| {r['name']} | failed | | | | | {r.get('error', '')} |")
        lines.append("")
    if report.get("winners"):
        lines += ["## Sweep winners (CONFIGS lines for kernels/scaled_gemm.py)", "", "```python"]
        lines += [w["code"] for w in report["winners"]] + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gemm", help="directory for gemm_bench.json and gemm_bench.md")
    p.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))),
                   help=f"comma-separated indices into {SHAPES}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {PEERS}")
    p.add_argument("--no-sweep", action="store_true", help="time only the table config of our kernels")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_bench needs a CUDA GPU")
    peers = args.peers.split(",")
    out = Path(args.out) / "gemm_bench"
    report = {"machine": gpu_info(), "args": vars(args), "shapes": [], "winners": []}
    winners: dict = {}
    for i in map(int, args.shapes.split(",")):
        M, K, N = SHAPES[i]
        print(f"== M={M} K={K} N={N}", flush=True)
        try:
            s = Shape(M, K, N, args.warmup, args.rep)
        except Exception as e:  # noqa: BLE001
            report["shapes"].append({"M": M, "K": K, "N": N, "rows": [{"name": "setup", "error": repr(e)}]})
            continue
        with torch.no_grad():
            for peer in peers:
                try:
                    if peer == "bf16":
                        s.run("bf16 F.linear (cuBLAS)", lambda: lambda: F.linear(s.x, s.w, s.bias))
                    elif peer == "scaled_mm":
                        torch_scaled_mm(s)
                    elif peer == "producer":
                        producer(s)
                    elif peer in ("fp8", "int8", "w8a16"):
                        ours(s, peer, not args.no_sweep, winners)
                    else:
                        {"bnb": bnb, "quanto": quanto, "torchao": torchao}[peer](s)
                except Exception as e:  # noqa: BLE001 - belt and braces: run() already catches
                    traceback.print_exc()
                    s.rows.append({"name": peer, "error": repr(e)})
        report["shapes"].append({"M": M, "K": K, "N": N, "rows": s.rows, "sweep": s.sweep})
        del s
        gc.collect()
        torch.cuda.empty_cache()
        report["winners"] = [
            {"mode": mode, "N": n, "K": k, "config": cfg, "ms": ms, "tflops": tf,
             "code": f"({mode!r}, {n}, {k}): {cfg_code(cfg)},  # {ms:.4f} ms, {tf:.0f} TFLOP/s"}
            for (mode, n, k), (cfg, ms, tf) in winners.items()]
        write_report(report, out, markdown(report))  # after each shape: a crash keeps what finished
    text = markdown(report)
    write_report(report, out, text)
    print(text)
    if report["winners"]:
        print("winners:\n" + "\n".join(w["code"] for w in report["winners"]))


if __name__ == "__main__":
    main()
