"""`wanrt bench`: latency and memory of each phase of a generation, per VRAM budget and attention mode, with peers
measured in the same run on the same weights and inputs.

Phases, each timed separately (warm-up, then the median and spread of --runs calls; CUDA events on a GPU):
  text          umT5 encode of the prompt and the negative prompt
  denoise_step  one denoising step with classifier-free guidance (two DiT forwards and the solver update)
  decode        VAE decode of the whole clip
  generate      the whole generation (text, --steps denoising steps, decode), timed once
Memory per phase: the caching allocator's max reserved and allocated, the device-level used memory (sampled, so it
includes the CUDA context and library workspaces) and the process's peak resident host memory (sampled).

Weights are random (no download) unless --model names a checkpoint; the report (JSON, schema in bench/report.py,
and markdown) is rewritten after every row, so an interrupted run (Ctrl-C) keeps the rows finished so far.
"""
from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from wanrt.bench.common import GiB, psnr, rel_err, write_report
from wanrt.bench.link import LinkEmulator, h2d_rate
from wanrt.bench.memwatch import PeakWatch
from wanrt.bench.report import markdown, plots, validate
from wanrt.bench.roofline import measured_peaks, phase_flops, roofline
from wanrt.runtime.options import RunOptions
from wanrt.runtime.pipeline import WanPipeline, default_vram_budget, on_device
from wanrt.runtime.plan import PlanError
from wanrt.runtime.sampler import cfg, default_neg_prompt, default_shift, make_solver

SCHEMA = "wanrt-bench/1"
GUIDE = 5.0


def machine_info(device: torch.device) -> dict:
    info = {"device": device.type, "gpu": None, "memory_gib": None, "capability": None, "driver": None,
            "torch": torch.__version__, "triton": None, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        from wanrt.bench.common import gpu_info

        g = gpu_info()
        info.update(gpu=g["gpu"], memory_gib=g["memory_gib"], capability=g["capability"], driver=g["driver"])
    return info


def measure(fn, device: torch.device, warmup: int, runs: int) -> tuple[object, dict]:
    """(fn's last result, timing and peak-memory stats over `runs` calls after `warmup` calls)."""
    cuda = device.type == "cuda"
    if cuda:  # the previous phase's cached blocks are not this phase's (the pipeline releases them too)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    with PeakWatch(device) as watch:
        for _ in range(runs):
            out = None  # the previous result is freed before the next call, as in a real loop
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
    stats = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
             "max_ms": round(max(times), 2), "runs": runs,
             "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3) if cuda else None,
             "max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3) if cuda else None,
             **watch.as_gib()}
    return out, stats


def cap(device: torch.device, budget: int | None) -> None:
    """Cap the caching allocator at `budget` bytes (None: no cap), with its cached blocks released first."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else min(budget / total, 1.0), device)


def setting_name(budget: int | None) -> str:
    if budget is None:
        return "resident"
    return f"{budget / GiB:g} GiB" if budget >= GiB else f"{budget / 2**20:g} MiB"


class Bench:
    def __init__(self, args, source, device: torch.device):
        self.args, self.source, self.device = args, source, device
        self.out = Path(args.out)
        v = source.variant
        if v.task != "t2v":
            raise ValueError(f"wanrt bench measures text-to-video variants; {v.name} is {v.task}")
        self.size = args.size or v.sizes[0]
        w, h = (int(n) for n in self.size.split("*"))
        st = v.vae.stride
        self.lat = ((args.frame_num - 1) // st[0] + 1, h // st[1], w // st[2])
        self.report = {
            "schema": SCHEMA, "command": " ".join(["wanrt bench", *args.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "interrupted": False,
            "machine": machine_info(device),
            "config": {"variant": v.name, "size": self.size, "frame_num": args.frame_num, "latents": list(self.lat),
                       "steps_whole": args.steps, "runs": args.runs, "warmup": args.warmup,
                       "link_gbps": args.link_gbps, "prompt": args.prompt,
                       "sample_guide_scale": args.sample_guide_scale, "cache": args.cache,
                       "loras": list(args.lora or ())},
            "rows": [], "link": None, "peaks": None}
        self.branches = 1 if args.sample_guide_scale == 1 else 2  # guidance 1: one DiT pass per step
        self.link = LinkEmulator(args.link_gbps, device) if args.link_gbps else None
        if device.type == "cuda":
            self.report["peaks"] = {**measured_peaks(device), "h2d_gbps": round(h2d_rate(device) / 1e9, 1)}
        self.flops = phase_flops(v, self.lat) if self.report["peaks"] else {}  # only the roofline (GPU) uses them
        self.reference: dict[str, torch.Tensor] = {}  # wanrt's outputs that the peers are compared with

    # -- output
    def save(self) -> None:
        validate(self.report)
        write_report(self.report, self.out, markdown(self.report, [Path(p) for p in self.report.get("plots", ())]))

    def progress(self, text: str) -> None:
        print(f"[wanrt bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def add(self, row: dict) -> None:
        self.report["rows"].append(row)
        self.save()

    # -- wanrt rows
    def pipeline(self, attention: str) -> WanPipeline:
        a = self.args
        options = RunOptions(attention=attention, scheme=a.scheme, text_scheme=a.text_scheme,
                             loras=tuple(a.lora or ()), cache=a.cache)
        pipe = WanPipeline(self.source, device=self.device, options=options)
        pipe.block_copy = self.link
        return pipe

    def inputs(self, pipe: WanPipeline) -> dict:
        """The fixed noise every row and peer starts from, and a one-step solver with its first timestep."""
        g = torch.Generator().manual_seed(0)
        solver = make_solver("unipc", 1, default_shift(pipe.variant.task, self.size))
        return {"latents": torch.randn(1, pipe.variant.vae.z_dim, *self.lat, generator=g).to(self.device),
                "solver": solver, "t": solver.timesteps[:1].to(self.device)}

    def wanrt_row(self, pipe: WanPipeline, attention: str, budget: int | None) -> dict:
        a, dev = self.args, self.device
        row = {"engine": "wanrt", "setting": setting_name(budget), "budget_gib": None if budget is None else budget / GiB,
               "scheme": pipe.variant.dit.quant, "text_scheme": pipe.variant.text.quant,
               "attention": pipe.variant.dit.attention, "guide_scale": a.sample_guide_scale, "backend": "eager",
               "phases": {}, "error": None}
        pipe.vram_budget = default_vram_budget(dev) if budget is None else budget
        try:
            plan = pipe.plan(self.lat, a.steps, branches=self.branches)
        except PlanError as e:
            row["error"] = str(e)
            return row
        cap(dev, budget)
        x = self.inputs(pipe)
        prompts = [a.prompt, default_neg_prompt(pipe.variant.task)][: self.branches]
        phases, streamed = row["phases"], self.streamed_bytes(plan)
        rate = self.link.rate if self.link else (self.report["peaks"] or {}).get("h2d_gbps", 0) * 1e9

        def record(name: str, stats: dict) -> None:
            phase = plan.phase(name if name != "denoise_step" else "denoise")
            stats.update(predicted_gib=round(phase.peak_bytes / GiB, 3), plan=phase.describe().strip())
            if self.report["peaks"] and rate:
                stats["roofline"] = roofline(self.flops[name], streamed[name], self.report["peaks"], rate)
            phases[name] = stats

        self.progress(f"wanrt {row['setting']}, attention {row['attention']}: text")
        contexts, stats = measure(lambda: pipe._encode_text(plan.phase("text"), prompts), dev, a.warmup, a.runs)
        record("text", stats)
        emb = pipe._embed(plan.phase("embed"), contexts, None, x["solver"].timesteps)
        denoise = plan.phase("denoise")
        step = lambda: pipe._denoise(denoise, x["latents"], None, *emb, x["solver"], a.sample_guide_scale, False)
        self.progress(f"wanrt {row['setting']}: one denoise step, guidance {a.sample_guide_scale:g}")
        with self.recording_link(denoise):
            _, stats = measure(step, dev, a.warmup, a.runs)
        record("denoise_step", stats)
        self.progress(f"wanrt {row['setting']}: decode")
        video, stats = measure(lambda: pipe._decode(plan.phase("decode"), x["latents"]).cpu(), dev, a.warmup, a.runs)
        record("decode", stats)
        if budget is None and not self.reference and self.branches == 2:  # peers compare with the first resident row
            self.reference = {"context": contexts[0], "context_null": contexts[1], "video": video, "t": x["t"],
                              "latents": x["latents"], "velocity": self.velocity(pipe, plan, emb, x)}
        del video, emb
        self.progress(f"wanrt {row['setting']}: whole generation, {a.steps} steps")
        _, stats = measure(lambda: pipe.generate(a.prompt, size=self.size, frame_num=a.frame_num, sample_steps=a.steps,
                                                 sample_guide_scale=a.sample_guide_scale, base_seed=0,
                                                 progress=False), dev, 0, 1)
        stats["phase_stats"] = {name: {"predicted_gib": round(s["predicted_peak"] / GiB, 3),
                                       "max_reserved_gib": round(s["max_reserved"] / GiB, 3),
                                       "seconds": round(s["seconds"], 3)} for name, s in pipe.phase_stats.items()}
        phases["generate"] = stats
        cap(dev, None)
        return row

    def streamed_bytes(self, plan) -> dict[str, int]:
        """Weight bytes each phase moves over the host link: text one pass (two when the prompts go one at a time),
        a denoise step one (both CFG branches run each block while it is on the GPU), decode none."""
        def per_pass(name: str) -> int:
            b = plan.phase(name).blocks
            return (b.num_blocks - b.resident) * b.block_bytes if b and b.streamed else 0
        text_passes = 1 if plan.phase("text").chunk is None else 2
        return {"text": text_passes * per_pass("text"), "denoise_step": per_pass("denoise"), "decode": 0}

    @contextmanager
    def recording_link(self, denoise_phase):
        """Record the emulated link's copies during the first streamed denoise step of the run (for the check)."""
        b = denoise_phase.blocks
        if self.link is None or self.report["link"] is not None or not (b and b.streamed):
            yield
            return
        self.link.record, self.link.events = True, []
        try:
            yield
        finally:
            self.link.record = False
        self.report["link"] = self.link.check()

    def velocity(self, pipe: WanPipeline, plan, emb, x) -> torch.Tensor:
        """wanrt's guided velocity for the fixed inputs at the first timestep (what a peer's step is compared with)."""
        phase = plan.phase("denoise")
        contexts, (e, e0) = emb
        t = (e[:1], e0[:1])
        with pipe._streamer(pipe.dit_store, phase) as s, \
                on_device([pipe.dit.patch_embedding, pipe.dit.head], self.device):
            cond, uncond = pipe.dit.denoise(x["latents"], t, contexts, s, phase.chunk)
        return cfg(cond, uncond, GUIDE)

    # -- peers
    def peer_rows(self, v) -> None:
        from wanrt.bench import peers

        ref, dev, a = self.reference, self.device, self.args
        if not ref:
            self.progress("peers skipped: they are compared with the resident wanrt row, which did not run")
            return
        state = self.source.dit_state()
        x = ref["latents"].to(pipe_dtype(dev))
        for setting, offload in peers.DIT_SETTINGS.items():
            if offload is not None and dev.type != "cuda":
                continue
            self.progress(f"diffusers DiT, {setting}: one denoise step with CFG")
            row = self.blank_row("diffusers", f"DiT {setting}")
            model = peers.diffusers_dit(v, state, pipe_dtype(dev))
            cap(dev, None)  # releases what the previous setting cached, so each peak is its own
            step = peers.dit_step(model, offload, dev)
            out, stats = measure(lambda: step(x, ref["t"], ref["context"], ref["context_null"], GUIDE), dev,
                                 a.warmup, a.runs)
            stats["rel_err_vs_wanrt"] = rel_err(out.float(), ref["velocity"].float())
            row["phases"]["denoise_step"] = stats
            del model, step, out
            gc.collect()
            self.add(row)
        vae = peers.diffusers_vae(v, self.source.vae_state(), pipe_dtype(dev)).to(dev)
        cap(dev, None)
        for setting in peers.VAE_SETTINGS:
            self.progress(f"diffusers VAE, {setting}: decode")
            row = self.blank_row("diffusers", f"VAE {setting}")
            decode = peers.vae_decode(vae, setting == "tiled", v)
            out, stats = measure(lambda: decode(ref["latents"]), dev, a.warmup, a.runs)
            stats["psnr_vs_wanrt_db"] = round(psnr(out.float().cpu(), ref["video"].float()), 2)
            stats["rel_err_vs_wanrt"] = rel_err(out.float().cpu(), ref["video"].float())
            row["phases"]["decode"] = stats
            del out
            self.add(row)
        self.progress(f"diffusers WanPipeline, resident: whole generation, {a.steps} steps")
        row = self.blank_row("diffusers", "pipeline resident")
        model = peers.diffusers_dit(v, state, pipe_dtype(dev))
        cap(dev, None)
        generate = peers.pipeline_generate(model, vae, default_shift(v.task, self.size), dev)
        w, h = (int(n) for n in self.size.split("*"))
        _, stats = measure(lambda: generate(ref["context"], ref["context_null"], w, h, a.frame_num, a.steps, GUIDE),
                           dev, 0, 1)
        row["phases"]["generate"] = stats
        del model, generate
        gc.collect()
        self.add(row)

    def guarded_row(self, pipe, attention: str, budget: int | None) -> dict:
        """The row, or on running out of memory the same row with the error (a broken budget is a result too)."""
        try:
            return self.wanrt_row(pipe, attention, budget)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # the pipeline's own give-up is a RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "out of GPU memory" not in str(e):
                raise
            cap(self.device, None)
            row = self.blank_row("wanrt", setting_name(budget))
            row.update(budget_gib=None if budget is None else budget / GiB, attention=attention,
                       error=f"out of memory: {str(e).splitlines()[0]}")
            return row

    @staticmethod
    def blank_row(engine: str, setting: str) -> dict:
        return {"engine": engine, "setting": setting, "budget_gib": None, "scheme": "bf16", "attention": "sdpa",
                "backend": "eager", "phases": {}, "error": None}

    # -- the run
    @torch.no_grad()  # the phases are called directly, outside generate's no_grad
    def run(self) -> dict:
        a = self.args
        budgets = sorted(a.budgets, key=lambda b: b is not None)  # resident first: the peers compare with it
        try:
            for attention in a.attention:
                pipe = self.pipeline(attention)
                for budget in budgets:
                    self.add(self.guarded_row(pipe, attention, budget))
                del pipe
            if a.peers:
                self.peer_rows(self.source.variant)
        except KeyboardInterrupt:
            self.report["interrupted"] = True
            self.save()
            raise
        if a.plots:
            try:
                self.report["plots"] = [str(p) for p in plots(self.report, self.out)]
            except Exception as e:  # a plotting problem must not lose the measurements
                self.progress(f"plots failed ({e!r}); render them later with python -m wanrt.bench.report")
        self.save()
        return self.report


def pipe_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_bench(args) -> dict:
    """Entry point of `wanrt bench` (flags in runtime/cli.py)."""
    from wanrt.bench.random_source import RandomSource
    from wanrt.runtime.pipeline import open_source

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # the allocator's cap needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    source = open_source(args.model) if args.model else RandomSource(args.variant, pipe_dtype(device))
    return Bench(args, source, device).run()
