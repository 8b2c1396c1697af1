"""What an engine costs a desktop user in disk and host RAM, per engine: its files by part (DiT blocks, umT5 blocks,
the rest), and the RAM its loaded pipeline holds (`wanrt.load(engine)`, blocks packed in RAM as the default RAM
budget allows, 16-bit activations as on a GPU). Each engine is loaded in a process of its own, so each RSS is its own.

    wanrt random-checkpoint --variant t2v-1.3B --out CKPT
    wanrt export --model CKPT --out E1 --scheme fp8
    wanrt export --model CKPT --out E2 --scheme fp8 --text-scheme int8
    python -m experiments.engine_ram E1 E2 --out bench/results/engine_ram_cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

GiB = 2**30


def file_bytes(engine: Path) -> dict:
    parts = {"dit blocks": "dit/block_*", "umT5 blocks": "text/block_*"}
    out = {name: sum(p.stat().st_size for p in engine.glob(pattern)) for name, pattern in parts.items()}
    out["total"] = sum(p.stat().st_size for p in engine.rglob("*") if p.is_file())
    out["rest"] = out["total"] - sum(out[name] for name in parts)
    return {k: round(v / GiB, 3) for k, v in out.items()}


def rss() -> dict:
    """This process's resident memory from /proc: anonymous (what it holds) and file-backed (mapped pages)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) * 1024 / GiB, 3) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def load_one(engine: str) -> dict:
    """Run in a child process: load the engine and report its RAM."""
    import torch

    import wanrt
    from wanrt.runtime.stream import PinnedStore

    before = rss()["RssAnon"]
    peak, done = [before], threading.Event()

    def sample():  # the anonymous peak: VmHWM also counts the mapped files' pages
        while not done.wait(0.05):
            peak.append(rss()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    pipe = wanrt.load(engine, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    stores = {name: (round(s.layout.nbytes * len(s) / GiB, 3) if isinstance(s, PinnedStore) else "memory-mapped")
              for name, s in (("dit", pipe.dit_store), ("umT5", pipe.text_store))}
    return {"load_seconds": round(seconds, 1), "blocks in RAM (GiB)": stores, "rss_gib": rss(),
            "anon_before_load_gib": before, "anon_peak_while_loading_gib": max(peak), "variant": pipe.variant.name,
            "options": dict(scheme=pipe.variant.dit.quant, text_scheme=pipe.variant.text.quant)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engines", nargs="+")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.one:
        print(json.dumps(load_one(a.engines[0])))
        return
    rows = []
    for engine in a.engines:
        child = subprocess.run([sys.executable, "-m", "experiments.engine_ram", "--one", engine],
                               capture_output=True, text=True, check=True)
        rows.append({"engine": Path(engine).name, "files_gib": file_bytes(Path(engine)),
                     **json.loads(child.stdout.splitlines()[-1])})
        print(rows[-1], flush=True)
    import torch

    report = {"machine": f"{platform.machine()} CPU, Python {platform.python_version()}, torch {torch.__version__}",
              "command": "python -m experiments.engine_ram "
              + " ".join(Path(e).name for e in a.engines), "rows": rows}
    if a.out:
        from wanrt.bench.common import write_report

        write_report(report, a.out, markdown(report))


def markdown(report: dict) -> str:
    lines = ["| engine | scheme / text scheme | files (GiB) | DiT blocks | umT5 blocks | rest | blocks in RAM (GiB) "
             "| RSS after load (GiB) | of it anonymous | anonymous before load | peak anonymous while loading "
             "| peak RSS while loading |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        f, o, m = r["files_gib"], r["options"], r["rss_gib"]
        ram = ", ".join(f"{k} {v}" for k, v in r["blocks in RAM (GiB)"].items())
        lines.append(f"| {r['engine']} | {o['scheme']} / {o['text_scheme']} | {f['total']} | {f['dit blocks']} | "
                     f"{f['umT5 blocks']} | {f['rest']} | {ram} | {m['VmRSS']} | {m['RssAnon']} | "
                     f"{r['anon_before_load_gib']} | {r['anon_peak_while_loading_gib']} | {m['VmHWM']} |")
    variants = ", ".join(sorted({r["variant"] for r in report["rows"]}))
    return (f"# Engine size and host RAM ({report['machine']})\n\nEngines of {variants} exported from a checkpoint of "
            f"`wanrt random-checkpoint` (the steps: experiments/engine_ram.py). {NOTE}\n\n`{report['command']}`\n\n"
            + "\n".join(lines) + "\n")


NOTE = ("The blocks sit packed in RAM (pinned on a GPU machine) in their stored scheme; the rest (umT5's 2 GiB token "
        "table, the VAE) stays memory-mapped until a phase reads it. 'Anonymous' is what the process holds (sampled "
        "every 50 ms while loading); the peak RSS also counts the engine files' pages mapped while their blocks are "
        "copied out (clean page cache, which the kernel reclaims under pressure).")


if __name__ == "__main__":
    main()
