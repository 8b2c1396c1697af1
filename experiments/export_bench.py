"""Export benchmarks on the GPU: what `wanrt export` costs and what its compiled engine gains (random weights).

    python -m experiments.export_bench --work /tmp/wanrt-export --out bench/results/export_h100 [--backend compile]

Sections (pick with --only; engines stay in --work between runs, so sections can run in separate processes):
  export   writes the checkpoint in the official layout (the released file names and formats: bf16 DiT
           safetensors, umT5 and VAE .pth), then exports it once per scheme: seconds, engine size per part and the
           recorded fidelity. Then the bf16 engine with the compiled block of --backend (inductor: an AOTInductor
           package; compile: torch.compile's cache), compiled for 480p x 81f.
  startup  from process start to the end of the first denoise step (text encoding, embedding, one CFG step), for the
           compiled engine and the eager bf16 engine, each in a fresh process with empty Inductor and Triton caches;
           the files those caches hold afterwards show what was compiled at run time.
  block    one DiT block at 480p x 81f (32,760 tokens): the compiled block against the eager block (our fused
           kernels, as the pipeline runs it) and the plain-PyTorch block, on the same inputs.
Export and load times are with the files in the page cache (the machine has RAM for them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wanrt.bench.common import GiB, gpu_info, rel_err, time_it, write_report
from wanrt.quant.formats import SCHEMES  # nf4 needs bitsandbytes where it runs

PROMPT = "a red circle moves right on a blue background"


def _engine_size(root: Path) -> dict:
    files = json.loads((root / "manifest.json").read_text())["files"]
    parts: dict[str, int] = {}
    for rel, f in files.items():
        part = rel.split("/")[0]
        parts[part] = parts.get(part, 0) + f["bytes"]
    gib = {f"{k}_gib": round(v / GiB, 3) for k, v in parts.items()}
    return {"total_gib": round(sum(parts.values()) / GiB, 3), **gib, **{f"{k}_bytes": v for k, v in parts.items()}}


def bench_export(report: dict, work: Path, device: str, save, variant: str, schemes=SCHEMES) -> None:
    from wanrt.bench.random_source import RandomSource
    from wanrt.export.engine import export_engine
    from wanrt.testing.random_checkpoint import write_official

    out = report["export"] = {**report.get("export", {}), "variant": variant}  # rows of other schemes (--merge) stay
    src = RandomSource(variant)
    start = time.perf_counter()
    states = {"dit": src.dit_state(), "text": src.text_state(), "vae": src.vae_state()}
    ckpt = write_official(work / "checkpoint", src.variant, states, src.tokenizer_dir)
    del states, src
    out["checkpoint"] = {"seconds": round(time.perf_counter() - start, 1), "gib": round(
        sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / GiB, 3)}
    for scheme in dict.fromkeys(("bf16", *schemes)):  # the compiled engine's startup is compared with bf16's
        print(f"export {scheme}", flush=True)
        engine = export_engine(ckpt, work / f"engine_{scheme}", scheme, progress=False)
        m = json.loads((engine / "manifest.json").read_text())
        out[scheme] = {"seconds": m["export_seconds"], **_engine_size(engine),
                       "fidelity_max_rel_err": m["fidelity"].get("max")}
        if scheme != "bf16":  # the disk holds the checkpoint and two bf16 engines, not five engines
            shutil.rmtree(engine)
        save()
    backend = report["backend"]
    print(f"export bf16 + {backend}", flush=True)
    engine = export_engine(ckpt, work / "engine_compiled", "bf16", progress=False, backends=(backend,))
    m = json.loads((engine / "manifest.json").read_text())
    entry = m["backends"][backend]
    out[f"bf16_{backend}"] = {"seconds": m["export_seconds"], **_engine_size(engine), "latents": entry["latents"],
                            "tokens": entry["tokens"], "rel_err_vs_eager": entry["rel_err_vs_eager"],
                            "gpu_capability": m["gpu_capability"]}


def first_step(engine: str, t0: float, out: str, device: str) -> None:
    """(In a fresh process) load `engine` and generate 81 frames at its variant's first size with one step, stopping
    after the denoise step; write the wall-clock marks relative to `t0`, the parent's time just before it started this
    process."""
    marks = {"imported": time.time() - t0}
    from wanrt.runtime.pipeline import load

    pipe = load(engine, device=device)
    marks["loaded"] = time.time() - t0

    class Stop(Exception):
        pass

    denoise = pipe._denoise

    def denoise_then_stop(*args, **kwargs):
        denoise(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        marks["first_step_done"] = time.time() - t0
        raise Stop

    pipe._denoise = denoise_then_stop
    try:
        pipe.generate(PROMPT, frame_num=81, sample_steps=1, base_seed=0, progress=False)  # the variant's size
    except Stop:
        pass
    marks["compiled_block"] = pipe.dit.compiled_block is not None
    from torch._dynamo.utils import counters

    marks["inductor_graphs"] = {"from_cache": counters["inductor"]["fxgraph_cache_hit"],
                                "compiled": counters["inductor"]["fxgraph_cache_miss"]}
    marks["phase_seconds"] = {k: round(s["seconds"], 3) for k, s in pipe.phase_stats.items()}
    Path(out).write_text(json.dumps(marks))


def bench_startup(report: dict, work: Path, device: str, save, runs: int = 2) -> None:
    out = report["startup"] = {}
    for run in range(runs):
        for name in ("compiled", "bf16"):
            with tempfile.TemporaryDirectory() as tmp:
                caches = {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton"}
                t0 = time.time()
                subprocess.run([sys.executable, "-m", "experiments.export_bench", "--first-step",
                                str(work / f"engine_{name}"), "--t0", repr(t0), "--marks", f"{tmp}/marks.json",
                                "--device", device], env={**os.environ, **caches}, check=True)
                marks = json.loads(Path(f"{tmp}/marks.json").read_text())
                marks["compiled_files"] = {k.split("_")[0].lower(): sum(1 for p in Path(d).rglob("*") if p.is_file())
                                           if Path(d).exists() else 0 for k, d in caches.items()}
            out.setdefault(name, []).append({k: round(v, 2) if isinstance(v, float) else v for k, v in marks.items()})


def bench_block(report: dict, work: Path, device: str, save, runs: int = 10) -> None:
    from wanrt.export.inductor_backend import block_inputs
    from wanrt.kernels.dispatch import reference_only
    from wanrt.runtime.checkpoint import load_tensors
    from wanrt.runtime.dit import BlockGraph
    from wanrt.runtime.engine import load_block_runner, open_engine

    engine = open_engine(work / "engine_compiled")
    entry = engine.manifest["backends"][report["backend"]]
    cfg = engine.variant.dit
    block = load_tensors(engine.root / "dit" / "block_00.safetensors")
    args = block_inputs(engine.variant, tuple(entry["latents"]), block, torch.device(device))
    compiled = load_block_runner(report["backend"], engine.root / entry["file"], cfg, entry["weights"])
    graph = BlockGraph(cfg, entry["weights"])  # the eager block on the same inputs (it copies x, as the compiled one)

    def eager():
        return graph(*args)

    def plain():
        with reference_only():
            return eager()

    with torch.no_grad():
        want = eager().float()
        out = report["block"] = {"tokens": entry["tokens"], "latents": entry["latents"], "backend": report["backend"]}
        for name, fn in (("compiled", lambda: compiled(*args)), ("eager_ours", eager), ("eager_plain", plain)):
            out[name] = {**time_it(fn, warmup=3, runs=runs), "rel_err_vs_eager_ours": rel_err(fn().float(), want)}
        for name in ("compiled", "eager_plain"):
            out[f"{name}_over_eager_ours"] = round(out[name]["median_ms"] / out["eager_ours"]["median_ms"], 3)


SECTIONS = {"export": bench_export, "startup": bench_startup, "block": bench_block}


def markdown(report: dict) -> str:
    g = report["machine"]
    lines = [f"# Export benchmarks: {g['gpu']} (torch {g['torch']}, triton {g['triton']})", "",
             "Random weights. Reproduce: `python -m experiments.export_bench` (experiments/export_bench.py "
             "says what each section does). Files are in the page cache.", ""]
    if "export" in report:
        e = report["export"]
        lines += [f"## Export of {e['variant']} per scheme (checkpoint written in {e['checkpoint']['seconds']} s, "
                  f"{e['checkpoint']['gib']} GiB)", "",
                  "| engine | export (s) | size (GiB) | DiT (GiB) | text (GiB) | VAE (GiB) | max per-linear rel. err |",
                  "|---|---|---|---|---|---|---|"]
        for name in (*SCHEMES, "bf16_inductor", "bf16_compile"):
            if name in e:
                r = e[name]
                lines.append(f"| {name} | {r['seconds']} | {r['total_gib']} | {r['dit_gib']} | {r['text_gib']} | "
                             f"{r['vae_gib']} | {r.get('fidelity_max_rel_err') or '-'} |")
        lines.append("")
    if "startup" in report:
        lines += ["## Process start to the end of the first denoise step (first size, 81 frames, resident)", "",
                  "`loaded` includes checking the sha256 of every engine file.", "",
                  "| engine | run | imported (s) | loaded | first step done | text / embed (s) | "
                  "compiled block | Inductor graphs compiled / from cache | files in fresh Inductor / Triton "
                  "caches |", "|---|---|---|---|---|---|---|---|---|"]
        for name, rs in report["startup"].items():
            for i, r in enumerate(rs):
                p = r["phase_seconds"]
                lines.append(f"| {name} | {i + 1} | {r['imported']} | {r['loaded']} | **{r['first_step_done']}** | "
                             f"{p.get('text')} / {p.get('embed')} | {r['compiled_block']} | "
                             f"{r['inductor_graphs']['compiled']} / {r['inductor_graphs']['from_cache']} | "
                             f"{r['compiled_files']['torchinductor']} / {r['compiled_files']['triton']} |")
        lines.append("")
    if "block" in report:
        b = report["block"]
        lines += [f"## One DiT block, {b['tokens']} tokens (CUDA-event medians)", "",
                  "| block | ms | / eager (our fused kernels) | / eager (plain PyTorch) | rel. err vs eager (ours) |",
                  "|---|---|---|---|---|"]
        for name in ("compiled", "eager_ours", "eager_plain"):
            ms = b[name]["median_ms"]
            lines.append(f"| {name} | {ms} | {ms / b['eager_ours']['median_ms']:.3f} | "
                         f"{ms / b['eager_plain']['median_ms']:.3f} | {b[name]['rel_err_vs_eager_ours']:.2e} |")
    for name, error in report.get("errors", {}).items():
        lines += ["", f"**{name} failed:** {error}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/wanrt-export", help="where the checkpoint and engines are written")
    p.add_argument("--out", default="bench/results/export")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--variant", default="t2v-1.3B")
    p.add_argument("--backend", choices=("inductor", "compile"), default="inductor",
                   help="the compiled engine's block: an AOTInductor package, or torch.compile's cache")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="the export section's schemes (bf16 always)")
    p.add_argument("--merge", action="store_true", help="keep the other sections of an existing report at --out")
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script on a tiny variant")
    p.add_argument("--first-step", help=argparse.SUPPRESS)  # the child process of the startup section
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--marks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.first_step:
        return first_step(args.first_step, args.t0, args.marks, args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old = Path(args.out).with_suffix(".json")
    report = json.loads(old.read_text()) if args.merge and old.exists() else {}
    report["backend"] = args.backend
    report.update(machine=gpu_info() if args.device == "cuda" else {"gpu": "CPU", "torch": torch.__version__,
                                                                      "triton": "-"})
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        command = " ".join(["python -m experiments.export_bench", *sys.argv[1:]])
        runs = report.setdefault("runs", {}).get(name, [])  # with --merge: every run behind the section's rows
        report["runs"][name] = [*([runs] if isinstance(runs, dict) else runs), {
            "command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}]
        def save():
            write_report(report, Path(args.out), markdown(report))

        try:
            extra = [args.variant, args.schemes.split(",")] if name == "export" else []
            SECTIONS[name](report, work, args.device, save, *extra)
            report.get("errors", {}).pop(name, None)  # an error of this section's earlier run (--merge)
        except Exception as e:  # keep what the other sections measured; the error is part of the report
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[name] = str(e)
        save()
    print(markdown(report))


if __name__ == "__main__":
    main()
