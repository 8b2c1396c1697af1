"""The demo model's semantic check under every engine scheme, memory plan and attention kernel (on a GPU; on the
CPU every scheme and mode runs through the PyTorch references).

    python -m experiments.demo_check [--model DIR] [--schemes bf16,fp8] [--text-schemes bf16,int8]
                                     [--attention auto,sdpa] [--settings default,smallest,streamed,slots,chunks,text,tiles]
                                     --out DIR

The demo model (the shipped one, or a checkpoint written by `python -m training.train_demo`) is exported once
per DiT scheme and text scheme; each engine generates the 20 fixed prompts and seeds of `training.synthetic.evaluate`
(the bf16 engine with each attention mode this GPU supports, "auto" included, the others with auto), planned for the
default VRAM budget and for the smallest
budget the planner accepts (the budgets that exist: for this tiny model both keep everything resident). As
diagnostics, `--settings` can also force the streaming paths only large models take (blocks through two slots,
chunked tokens, one prompt at a time, tiled decode), all at once ("streamed") or one alone. A row passes at >= 90% of
its videos.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import torch

from wanrt.bench.common import gpu_info, write_report
from wanrt.export.engine import export_engine
from training.synthetic import evaluate
from wanrt.kernels.attention import MIN_CAPABILITY
from wanrt.quant.formats import SCHEMES
from wanrt.runtime.engine import open_engine
from wanrt.runtime.options import TEXT_SCHEMES, RunOptions
from wanrt.runtime.pipeline import DEMO_MODEL, WanPipeline
from wanrt.runtime.plan import PhasePlan, Plan, PlanError

PASS_RATE = 0.9
ATTENTION = ("auto", "sdpa", "fp8", "int8", "int8_fp8pv")
LAT, STEPS = (5, 8, 8), 20  # 64x64, 17 frames


PATHS = ("slots", "chunks", "text", "tiles")
# a setting: the streaming paths it forces ("streamed": all; one path alone tells which of them changes the result)
SETTINGS = {"default": (), "smallest": (), "streamed": PATHS, **{path: (path,) for path in PATHS}}


def smallest_budget(pipe: WanPipeline) -> int:
    """The least VRAM (bytes) the planner accepts for the check's generations: what its refusal of 1 byte names."""
    try:
        pipe.plan(LAT, STEPS, budget=1)
    except PlanError as e:
        return e.needed
    return 1


def forced_streaming(plan: Plan, paths: tuple[str, ...] = PATHS) -> Plan:
    """The plan with the streaming paths a full-size model takes under a small budget, which the tiny model never
    needs (it fits any): every block streamed through two slots ("slots"), 32-token chunks ("chunks"), one prompt
    encoded at a time ("text"), 4x4-latent decode tiles ("tiles")."""
    def force(p: PhasePlan) -> PhasePlan:
        if "slots" in paths and p.blocks is not None:
            p = dataclasses.replace(p, blocks=dataclasses.replace(p.blocks, resident=0, slots=2))
        if ("text" in paths and p.name == "text") or ("chunks" in paths and p.name == "denoise"):
            p = dataclasses.replace(p, chunk=1 if p.name == "text" else 32)
        if "tiles" in paths and p.name == "decode":
            p = dataclasses.replace(p, tile=(4, 4))
        return p

    return dataclasses.replace(plan, phases=tuple(force(p) for p in plan.phases))


def run(model: Path, out: Path, schemes: tuple[str, ...] = SCHEMES, settings: tuple[str, ...] = ("default", "smallest"),
        attention_modes: tuple[str, ...] = ATTENTION, text_schemes: tuple[str, ...] = ("bf16",)) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs every mode through the references
    cap = torch.cuda.get_device_capability() if device == "cuda" else (99, 0)
    attention = [a for a in attention_modes if cap >= MIN_CAPABILITY.get(a, (0, 0))]
    machine = gpu_info() if device == "cuda" else {"gpu": "CPU", "torch": torch.__version__}
    report = {"machine": machine, "model": str(model.name), "pass_rate_needed": PASS_RATE, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, text_scheme in itertools.product(schemes, text_schemes):
            engine = open_engine(export_engine(model, Path(tmp) / f"{scheme}-{text_scheme}", scheme, progress=False,
                                               text_scheme=text_scheme))
            for mode in attention if scheme == "bf16" else ("auto",):  # every kernel with bf16 weights
                for setting in settings:
                    pipe = WanPipeline(engine, device=device, options=RunOptions(attention=mode))
                    if setting == "smallest":
                        pipe.vram_budget = smallest_budget(pipe)
                    if SETTINGS[setting]:
                        plan = pipe.plan
                        pipe.plan = lambda *a, plan=plan, paths=SETTINGS[setting], **k: forced_streaming(
                            plan(*a, **k), paths)
                    start = time.perf_counter()
                    result = evaluate(pipe)
                    report["rows"].append({
                        "scheme": scheme, "text_scheme": text_scheme, "attention": pipe.variant.dit.attention,
                        "asked": mode, "setting": setting, "vram_budget": pipe.vram_budget,
                        "plan": pipe.plan(LAT, STEPS).phase("denoise").describe(),
                        "pass_rate": result["pass_rate"], "seconds": round(time.perf_counter() - start, 1),
                        "failures": [r for r in result["results"] if not r["ok"]]})
                    print(scheme, text_scheme, mode, setting, result["pass_rate"], flush=True)
                    write_report(report, out, markdown(report))
    return report


def markdown(report: dict) -> str:
    g = report["machine"]
    lines = [f"# Demo model semantic check: {g['gpu']} (torch {g['torch']})", "",
             "20 fixed prompts and seeds per row (64x64, 17 frames, 20 steps); a row passes at >= 90%. "
             "Reproduce: `python -m experiments.demo_check`.", "",
             "| DiT scheme | text scheme | attention (asked) | plan | pass rate | s | denoise phase |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        mark = "" if r["pass_rate"] >= PASS_RATE else " (below 90%)"
        budget = f" ({r['vram_budget'] / 2**20:,.0f} MiB)" if r.get("vram_budget", 2**62) < 2**62 else ""
        lines.append(f"| {r['scheme']} | {r.get('text_scheme', 'bf16')} | {r['attention']} ({r.get('asked', '')}) | "
                     f"{r['setting']}{budget} | {r['pass_rate']:.0%}{mark} | {r['seconds']} | {r['plan']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEMO_MODEL, help="a demo model (default: the shipped one)")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="engine schemes to check (split a run over calls)")
    p.add_argument("--settings", default="default,smallest", help=f"plans to check, of {', '.join(SETTINGS)}")
    p.add_argument("--attention", default=",".join(ATTENTION), help="attention kernels of the bf16 engine")
    p.add_argument("--text-schemes", default="bf16", help=f"umT5 schemes to check, of {', '.join(TEXT_SCHEMES)}")
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_check"))
    a = p.parse_args()
    if unknown := set(a.settings.split(",")) - set(SETTINGS):
        p.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    report = run(a.model, a.out, tuple(a.schemes.split(",")), tuple(a.settings.split(",")),
                 tuple(a.attention.split(",")), tuple(a.text_schemes.split(",")))
    print(markdown(report))
    failed = [r for r in report["rows"] if r["pass_rate"] < PASS_RATE]
    raise SystemExit(f"{len(failed)} rows below {PASS_RATE:.0%}" if failed else 0)


if __name__ == "__main__":
    main()
