"""Attention on the GPU: SDPA (bf16) vs wanrt's quantized attention (Triton; Gluon for the fp8 P·V modes on sm_90) vs
SageAttention (Triton).

    python -m experiments.attention_bench --out bench/results/attention_h100 [--shapes 0,3] [--modes fp8,int8]
                                          [--sweep small|full|ahead|wg1|gluon|none]

Shapes (B, H, Lq, Lk, D): Wan2.1 self-attention at 480p x 81 frames (32,760 tokens) for 1.3B (12 heads) and 14B (40
heads), 1.3B at 720p x 81 frames (75,600 tokens), and 1.3B cross-attention of 32,760 queries to 512 text keys.
Variants per shape (bf16 inputs [B, L, H, D] as the DiT makes them):
  sdpa_flash   F.scaled_dot_product_attention on contiguous [B, H, L, D], flash backend: the baseline (x SDPA column)
  sdpa_cudnn   the same with the cuDNN backend (torch >= 2.10 may prefer it on sm_90)
  sdpa_op      wanrt.runtime.dit.attention as the runtime calls it ([B, L, H, D] views in, [B, L, H*D] out)
  <mode>       wanrt.kernels.attention for each quantized mode: a small config sweep of the kernel alone on
               pre-quantized inputs (winners printed), then the winner with its quantization pass (what `attention`
               costs on 16-bit q, 'total'), and the quantization passes alone (Q, K and V; and Q's share, which
               the DiT saves by taking Q quantized from its producer)
  sageattn     sageattention.sageattn (1.0.6: int8 QK, fp16 P·V, Triton), when importable
Times are medians of triton.testing.do_bench; TFLOP/s = 4 B H Lq Lk D / t. Accuracy is against bf16 SDPA (the default
backend) on two input sets: randn q, k, v ('rand') and the same with a strong per-channel key offset, k += 5 randn(D)
('K bias'), as real keys have. The SDPA backends, each mode's chosen kernel and sageattn also run back to back for
2 s with nvidia-smi's power draw and SM clock sampled meanwhile (`experiments.gpu_power`): the 'Sustained load'
table. For the self-attention shapes, Q's producer (`qk_norm_rope` on the q projection [B, L, H*D], RMSNorm and RoPE)
is timed with a bf16 output and with the quantized Q each QK dtype takes: the 'Q's producer' table sets what the
quantized output adds there against the Q pass it saves. Each variant runs in its own try/except: a failure is
recorded and the run goes on.
Writes <out>/attention_bench.json and .md (after every shape; `_shapes0-3` appended when --shapes picks a subset) and
prints the table. The full run compiles ~60 kernel variants; split it with --shapes to stay within a time limit.
"""
from __future__ import annotations

import argparse
import gc
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from wanrt.bench.common import GiB, gpu_info, write_report
from experiments.gpu_power import sustained
from wanrt.kernels import attention as A
from wanrt.kernels.qk_norm_rope import qk_norm_rope_triton

SHAPES = [  # name, (B, H, Lq, Lk, D)
    ("1.3B 480p self", (1, 12, 32760, 32760, 128)),
    ("14B 480p self", (1, 40, 32760, 32760, 128)),
    ("1.3B 720p self", (1, 12, 75600, 75600, 128)),
    ("1.3B 480p cross (512 text)", (1, 12, 32760, 512, 128)),
]
QUANT_MODES = ("fp8", "fp8_bf16pv", "int8", "int8_fp8pv")
C = A.AttnConfig
SWEEPS = {
    "none": [],
    "small": [C(128, 128, 8, 2), C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 64, 4, 3),
              C(128, 128, 8, 3, tma=True), C(128, 64, 8, 4, tma=True)],
    "full": [C(bm, bn, w, s, tma) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)
             for tma in (False, True) if not (bm == 64 and w == 8)],
    "ahead": [C(128, bn, 8, st, lookahead=la) for bn, st in ((128, 3), (128, 4), (64, 4)) for la in (False, True)],
    # one warpgroup per program, so that two programs share an SM and one's softmax can hide under the other's dots
    "wg1": [C(64, bn, 4, st, lookahead=la) for bn, st in ((128, 2), (128, 3), (128, 4), (64, 4))
            for la in (False, True)]
           + [C(64, 128, 4, 3, tma=True), C(64, 128, 4, 2, tma=True), C(64, 64, 4, 3), C(64, 64, 4, 3, tma=True)],
    # the Gluon kernel (three 64-row warpgroups sharing K/V slots; fp8 P·V modes, other modes report an error and go
    # on) at 2-5 slots, beside the Triton kernel that takes its place where it cannot run
    "gluon": [A.TRITON_FP8_PV_SM90] + [C(64, 128, 4, st, gluon=True) for st in (2, 3, 4, 5)],
}
KEY_BIAS = 5.0


def flops(shape) -> float:
    B, H, Lq, Lk, D = shape
    return 4.0 * B * H * Lq * Lk * D


def tflops(shape, ms: float) -> float:
    return round(flops(shape) / (ms * 1e-3) / 1e12, 1)


def bench_ms(fn) -> float:
    import triton.testing

    return round(float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), 4)


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = out.flatten().double(), ref.flatten().double()
    cos = (a @ b / (a.norm() * b.norm())).item()
    rel = ((a - b).norm() / b.norm()).item()
    nan = int(torch.isnan(out).sum())
    return {"cos": round(cos, 6), "rel": round(rel, 5), **({"nan": nan} if nan else {})}


def peak_extra_gib(fn) -> float:
    """Memory a call allocates beyond what is live before it (its output included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return round(peak / GiB, 3)


def make_inputs(shape, seed: int):
    B, H, Lq, Lk, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Lq, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(B, Lk, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, Lk, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    bias = (KEY_BIAS * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    return (q, k, v), (q, k + bias, v)


def sdpa_variant(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):  # [B, H, L, D] contiguous, as flash benchmarks quote
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def bhld(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()


def run_sdpa(name, backend, shape, sets, refs) -> dict:
    run = sdpa_variant(backend)
    acc = {}
    for tag, (q, k, v) in sets.items():
        qt, kt, vt = bhld(q), bhld(k), bhld(v)
        acc[tag] = accuracy(run(qt, kt, vt).transpose(1, 2).flatten(2), refs[tag])
        if tag == "rand":
            ms = bench_ms(lambda: run(qt, kt, vt))
            load = sustained(lambda: run(qt, kt, vt))
        del qt, kt, vt
    return {"variant": name, "kernel_ms": ms, "total_ms": ms, "tflops": tflops(shape, ms), "acc": acc,
            "sustained": load}


def run_sdpa_op(shape, sets, refs) -> dict:
    q, k, v = sets["rand"]
    ms = bench_ms(lambda: A.attention_reference(q, k, v))
    return {"variant": "sdpa_op", "kernel_ms": ms, "total_ms": ms, "tflops": tflops(shape, ms),
            "extra_gib": peak_extra_gib(lambda: A.attention_reference(q, k, v)),
            "acc": {tag: accuracy(A.attention_reference(*sets[tag]), refs[tag]) for tag in sets}}


def quantize(q, k, v, mode):
    qk = A.quantize_qk(q, k, A.QK_DTYPE[mode])
    return qk, (A.quantize_v(v) if mode in A.FP8_PV_MODES else v)


def run_mode(mode, shape, sets, refs, sweep: list[A.AttnConfig]) -> dict:
    q, k, v = sets["rand"]
    cap = torch.cuda.get_device_capability()
    A.check_mode(mode, cap)
    default = A.default_config(mode, shape[-1], cap)
    configs = [default] + [c for c in sweep if c != default]
    qk, vv = quantize(q, k, v, mode)
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=v.dtype, device=q.device)
    results, cos = {}, {}
    for cfg in configs:
        try:
            results[cfg.describe()] = bench_ms(lambda: A.attention_kernel(qk, vv, cfg, out=out))
            cos[cfg.describe()] = accuracy(out, refs["rand"])["cos"]  # a fast config must also be right
        except Exception as e:  # a config that does not compile or fit shared memory is skipped
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            results[cfg.describe()] = f"error: {type(e).__name__}: {msg}"
    floor = cos.get(default.describe(), 0.99) - 1e-4  # a winner may not be less accurate than the table's config
    timed = {name: ms for name, ms in results.items() if isinstance(ms, float) and cos[name] >= floor}
    if not timed:
        raise RuntimeError(f"no config ran: {results}")
    best_name = min(timed, key=timed.get)
    best = next(c for c in configs if c.describe() == best_name)
    load = sustained(lambda: A.attention_kernel(qk, vv, best, out=out))
    del qk, vv, out
    kernel_ms = timed[best_name]
    quant_ms = bench_ms(lambda: quantize(q, k, v, mode))
    total_ms = bench_ms(lambda: A.attention_quantized(q, k, v, mode, best))
    quant_q_ms = bench_ms(lambda: A.quantize_q(q, A.QK_DTYPE[mode]))
    acc = {tag: accuracy(A.attention_quantized(*sets[tag], mode, best), refs[tag]) for tag in sets}
    return {"variant": mode, "config": best_name, "default_config": default.describe(),
            "default_kernel_ms": timed.get(default.describe()), "kernel_ms": kernel_ms, "quant_ms": quant_ms,
            "quant_q_ms": quant_q_ms, "total_ms": total_ms, "tflops_kernel": tflops(shape, kernel_ms),
            "tflops": tflops(shape, total_ms),
            "extra_gib": peak_extra_gib(lambda: A.attention_quantized(q, k, v, mode, best)), "acc": acc,
            "sustained": load, "sweep": results, "sweep_cos": cos}


def run_sage(shape, sets, refs) -> dict:
    from sageattention import sageattn

    def run(q, k, v):
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False).flatten(2)
    q, k, v = sets["rand"]
    ms = bench_ms(lambda: run(q, k, v))
    return {"variant": "sageattn", "kernel_ms": ms, "total_ms": ms, "tflops": tflops(shape, ms),
            "sustained": sustained(lambda: run(q, k, v)), "extra_gib": peak_extra_gib(lambda: run(q, k, v)),
            "acc": {tag: accuracy(run(*sets[tag]), refs[tag]) for tag in sets}}


def run_producer(shape, modes) -> dict:
    """Q's producer at this shape: qk_norm_rope's ms with a bf16 output and with each quantized Q the modes take."""
    B, H, Lq, _, D = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    y = torch.randn(B, Lq, H * D, device="cuda", generator=g).bfloat16()
    weight = 1 + 0.2 * torch.randn(H * D, device="cuda", generator=g)
    angles = torch.rand(Lq, D // 2, device="cuda", generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    ms = {"bf16": bench_ms(lambda: qk_norm_rope_triton(y, weight, 1e-6, H, cos, sin))}
    for dtype in dict.fromkeys(A.QK_DTYPE[m] for m in modes):
        ms[str(dtype).removeprefix("torch.")] = bench_ms(
            lambda: qk_norm_rope_triton(y, weight, 1e-6, H, cos, sin, dtype, for_attention=True))
    return ms


def run_shape(name: str, shape, modes, sweep) -> dict:
    from torch.nn.attention import SDPBackend

    print(f"== {name} {shape}", flush=True)
    rand, biased = make_inputs(shape, seed=0)
    sets = {"rand": rand, "kbias": biased}
    refs = {tag: A.attention_reference(*s) for tag, s in sets.items()}
    jobs = [("sdpa_flash", lambda: run_sdpa("sdpa_flash", SDPBackend.FLASH_ATTENTION, shape, sets, refs)),
            ("sdpa_cudnn", lambda: run_sdpa("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, shape, sets, refs)),
            ("sdpa_op", lambda: run_sdpa_op(shape, sets, refs))]
    jobs += [(m, lambda m=m: run_mode(m, shape, sets, refs, sweep)) for m in modes]
    jobs.append(("sageattn", lambda: run_sage(shape, sets, refs)))
    rows = []
    for variant, job in jobs:
        try:
            row = job()
        except Exception as e:  # one failing variant must not stop the run
            traceback.print_exc()
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            row = {"variant": variant, "error": f"{type(e).__name__}: {msg}"}
        rows.append(row)
        print("  " + describe_row(row, rows[0]), flush=True)
        if "sweep" in row:
            ranked = sorted((ms, c) for c, ms in row["sweep"].items() if isinstance(ms, float))
            ranked = ", ".join(f"{c} {ms} (cos {row['sweep_cos'].get(c)})" for ms, c in ranked)
            print(f"    sweep winner {row['config']} {row['kernel_ms']} ms (default {row['default_config']}: "
                  f"{row['default_kernel_ms']} ms); ranked: {ranked}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    section = {"shape": list(shape), "rows": rows}
    if shape[2] == shape[3] and modes:  # self-attention: the DiT's queries come from qk_norm_rope
        try:
            section["producer_ms"] = run_producer(shape, modes)
        except Exception as e:
            traceback.print_exc()
            section["producer_ms"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"  Q's producer: {section['producer_ms']}", flush=True)
    return section


def describe_row(row: dict, base: dict) -> str:
    if "error" in row:
        return f"{row['variant']}: ERROR {row['error']}"
    speed = f" x{base['total_ms'] / row['total_ms']:.2f} vs sdpa_flash" if "total_ms" in base else ""
    acc = " ".join(f"{t}: cos {a['cos']:.5f} rel {a['rel']:.4f}" for t, a in row["acc"].items())
    return f"{row['variant']}: {row['total_ms']} ms, {row['tflops']} TFLOP/s{speed}; {acc}"


def sustained_table(report: dict) -> list[str]:
    """Each variant called back to back for 2 s (kernel alone for the quantized modes), with the power draw and SM
    clock nvidia-smi reported meanwhile; 'capped' = share of samples with the software power cap holding the clock."""
    lines = ["", "## Sustained load", "",
             "Each variant called back to back for 2 s after 1 s of warm-up (`experiments.gpu_power.sustained`; "
             "the quantized modes: kernel alone, table or sweep config as above). W and SM MHz are medians of "
             "nvidia-smi samples every 50 ms; 'capped' is the share of samples in which the driver held the clock "
             "down to stay within the board power limit.", "",
             "| shape | variant | burst ms | sustained ms | x sdpa_cudnn (sustained) | W | SM MHz | capped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, sec in report["shapes"].items():
        rows = [r for r in sec["rows"] if "sustained" in r]
        base = next((r["sustained"]["sustained_ms"] for r in rows if r["variant"] == "sdpa_cudnn"), None)
        for r in rows:
            load = r["sustained"]
            x = f"{base / load['sustained_ms']:.2f}" if base else ""
            lines.append(f"| {name} | {r['variant']} | {r['kernel_ms']} | {load['sustained_ms']} | {x} | "
                         f"{load.get('power_w', '')} | {load.get('sm_mhz', '')} | {load.get('power_capped', '')} |")
    return lines


def producer_table(report: dict) -> list[str]:
    """Per self-attention shape and mode: Q's producer with a bf16 and with a quantized output, the Q pass that the
    quantized output saves the attention, and the net saving."""
    lines = ["", "## Q's producer (qk_norm_rope: RMSNorm and RoPE of the q projection, ms)", "",
             "The DiT's query for a quantized mode comes from qk_norm_rope already quantized as the kernel reads it "
             "(per token and head, softmax scale folded in), so the attention skips its pass over Q ('Q quant'). "
             "Saved = Q quant - (quantized - bf16).", "",
             "| shape | mode | producer, bf16 out | producer, quantized out | Q quant | saved |",
             "|---|---|---|---|---|---|"]
    for name, sec in report["shapes"].items():
        ms = sec.get("producer_ms", {})
        for r in sec["rows"]:
            own = ms.get(str(A.QK_DTYPE.get(r["variant"])).removeprefix("torch."))
            if own is None or "quant_q_ms" not in r or "bf16" not in ms:
                continue
            saved = r["quant_q_ms"] - (own - ms["bf16"])
            lines.append(f"| {name} | {r['variant']} | {ms['bf16']} | {own} | {r['quant_q_ms']} | {saved:.4f} |")
    return lines if len(lines) > 6 else []


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Attention: {m['gpu']} (torch {m['torch']}, triton {m['triton']})", "",
             "bf16 inputs [B, L, H, D], non-causal, head_dim 128. 'kernel' = attention kernel alone on quantized "
             "inputs (best config of the sweep); 'total' = with the quantization pass (what `attention(mode=...)` "
             "costs on 16-bit q; the DiT takes Q quantized from its producer, which saves 'Q quant ms'). TFLOP/s = "
             "4 B H Lq Lk D / total time. Accuracy vs bf16 SDPA: 'rand' = randn inputs, "
             f"'K bias' = keys + {KEY_BIAS} randn(D). Medians of triton.testing.do_bench. "
             "Reproduce: `python -m experiments.attention_bench --out DIR`.", "",
             "| shape | variant | config | kernel ms | quant ms | Q quant ms | total ms | TFLOP/s | x sdpa_flash "
             "| extra GiB | cos rand | rel rand | cos K bias | rel K bias |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, sec in report["shapes"].items():
        base = next((r for r in sec["rows"] if r["variant"] == "sdpa_flash" and "error" not in r), None)
        for r in sec["rows"]:
            if "error" in r:
                lines.append(f"| {name} | {r['variant']} | ERROR: {r['error'][:120]} |" + " |" * 11)
                continue
            a, b = r["acc"].get("rand", {}), r["acc"].get("kbias", {})
            x = f"{base['total_ms'] / r['total_ms']:.2f}" if base else ""
            lines.append(f"| {name} | {r['variant']} | {r.get('config', '')} | {r['kernel_ms']} | "
                         f"{r.get('quant_ms', '')} | {r.get('quant_q_ms', '')} | {r['total_ms']} | "
                         f"{r['tflops']} | {x} | "
                         f"{r.get('extra_gib', '')} | {a.get('cos', '')} | {a.get('rel', '')} | {b.get('cos', '')} | "
                         f"{b.get('rel', '')} |")
    lines += sustained_table(report)
    lines += producer_table(report)
    lines += ["", "## Config sweeps (kernel alone, ms)", ""]
    for name, sec in report["shapes"].items():
        for r in sec["rows"]:
            if "sweep" in r:
                ranked = sorted(r["sweep"].items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9)
                lines.append(f"- {name}, {r['variant']} (default {r['default_config']}): " +
                             ", ".join(f"{c} {ms}" for c, ms in ranked))
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in report["errors"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="directory for attention_bench.json and .md")
    p.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))),
                   help="comma-separated indices into " + "; ".join(f"{i}: {n}" for i, (n, _) in enumerate(SHAPES)))
    p.add_argument("--modes", default=",".join(QUANT_MODES))
    p.add_argument("--sweep", default="small", choices=tuple(SWEEPS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench needs a CUDA GPU")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        A.check_mode(m, None)
    picked = [int(s) for s in args.shapes.split(",") if s]
    suffix = "" if picked == list(range(len(SHAPES))) else "_shapes" + "-".join(map(str, picked))
    out = Path(args.out) / f"attention_bench{suffix}"  # runs split by --shapes keep separate files
    report = {"machine": gpu_info(), "sweep": args.sweep, "modes": modes, "shapes": {}}
    with torch.no_grad():
        for i in picked:
            name, shape = SHAPES[i]
            try:
                report["shapes"][name] = run_shape(name, shape, modes, SWEEPS[args.sweep])
            except Exception as e:  # e.g. out of memory building the inputs: keep the other shapes
                traceback.print_exc()
                report.setdefault("errors", {})[name] = repr(e)
            gc.collect()
            torch.cuda.empty_cache()
            write_report(report, out, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
