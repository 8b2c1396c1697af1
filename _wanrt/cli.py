"""`wanrt` command line. Flag names follow the official generate.py where one exists."""
from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from pathlib import Path

from wanrt.runtime.options import (ATTENTION_MODES, FEW_STEPS, PRESETS, SCHEMES, SOLVERS, TEXT_SCHEMES,
                                   RunOptions, parse_bytes)

def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_options(args: argparse.Namespace, **override) -> RunOptions:
    names = ("attention", "scheme", "text_scheme", "vram_budget", "ram_budget", "cache")
    given = {n: getattr(args, n, None) for n in names} | {"loras": tuple(getattr(args, "lora", None) or ())}
    return RunOptions(**given | override)


def add_run_options(p: argparse.ArgumentParser, engine_default: str = "default: the engine's, else ") -> None:
    """The RunOptions flags, with the same names as wanrt.load(...)'s keywords and the engine manifest's."""
    p.add_argument("--attention", choices=ATTENTION_MODES, help=f"self-attention kernel ({engine_default}auto: "
                   "int8 Q·K with fp8 P·V on an H100, measured 1.6x SDPA at the same quality; SDPA on other GPUs)")
    p.add_argument("--scheme", choices=SCHEMES, help="DiT block weights (default: as stored; a checkpoint's bf16 "
                   "blocks are quantized as they load): fp8, int8 (w8a8 GEMMs), w8a16 (int8 weights)")
    p.add_argument("--text-scheme", dest="text_scheme", choices=TEXT_SCHEMES, help="umT5 block weights, "
                   "weight-only (default: as stored): int8 or fp8 halve its memory")
    add_lora_option(p)
    add_cache_option(p, engine_default)


def add_cache_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--cache", metavar="none|magcache[:THRESH[:K]]|teacache[:THRESH]", help="step caching: steps "
                   "that reuse the DiT blocks' last residual, decided before any GPU work and shown by --plan "
                   f"({default}none; magcache alone takes the references' settings: 0.12:4 for T2V-1.3B, 0.24:6 "
                   "for the 14B models; a model without published ratios needs `wanrt calibrate-cache` first; runs "
                   f"of {FEW_STEPS} steps or fewer, such as --preset distill4, ignore an engine's recorded cache)")


def add_lora_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", help="a LoRA (diffusers/PEFT, musubi/kohya "
                   "or ComfyUI/official keys) merged into the DiT before quantization (beside an engine's quantized "
                   "linears, as a low-rank side path); repeat for several")


def _generate(args: argparse.Namespace) -> None:
    """Every check that needs no model runs first: the output path, the device, the engine's files and the weights'
    shapes (from file headers), the request and the image; only then are weights read."""
    from wanrt.runtime.atomic import check_output_file
    from wanrt.runtime.options import check_image, check_request

    check_output_file(args.out, ".mp4")
    options = run_options(args)
    from wanrt.runtime.pipeline import DEMO_MODEL, WanPipeline, open_source, resolve_device

    device = resolve_device(args.device)
    if args.engine is not None:
        from wanrt.runtime.engine import is_engine

        if not is_engine(args.engine):
            raise ValueError(f"{args.engine} is not an engine (no manifest.json): `wanrt export` writes one")
        args.model = args.engine
    if args.model is None:
        args.model = DEMO_MODEL
        print("no --model: the embedded demo model (coloured shapes moving, 64x64, 17 frames)")
    request = dict(size=args.size, frame_num=args.frame_num, sample_steps=args.sample_steps,
                   sample_shift=args.sample_shift, sample_guide_scale=args.sample_guide_scale,
                   sample_solver=args.sample_solver, base_seed=args.base_seed,
                   denoising_step_list=args.denoising_step_list, preset=args.preset)
    start = time.perf_counter()
    print(f"opening {args.model}", flush=True)
    source = open_source(args.model, args.trust_engine)
    if args.image is not None:
        check_image(args.image)
    check_request(source.variant, image=args.image, prompt=args.prompt, neg_prompt=args.neg_prompt, **request)
    print("loading the weights", flush=True)
    pipe = WanPipeline(source, device, options=options, request=dict(image=args.image, **request))
    if args.plan:
        print(pipe.describe_plan(image=args.image, **request))
        return
    video = pipe.generate(args.prompt, image=args.image, neg_prompt=args.neg_prompt, **request)
    print(f"writing {args.out}", flush=True)
    out = video.save(args.out)
    f, h, w, _ = video.frames.shape
    print(f"wrote {out} ({f} frames, {w}x{h}, {video.fps} fps, seed {video.seed}) in {time.perf_counter() - start:.1f} s")


def _export(args: argparse.Namespace) -> None:
    if args.verify:
        from wanrt.runtime.engine import open_engine

        engine = open_engine(args.verify)
        m = engine.manifest
        trust = "exported on this machine (trusted)" if engine.trusted else "not exported here: its compiled " \
            "blocks, if any, run only with --trust-engine"
        print(f"{args.verify}: ok ({len(m['files'])} files verified, weights match the configs; {engine.variant.name}, "
              f"DiT blocks {m['schemes']['dit_blocks']}, wanrt {m['wanrt_version']}, format {m['format_version']}; "
              f"{trust})")
        return
    if args.model is None or args.out is None:
        raise ValueError("export needs --model CKPT_DIR and --out ENGINE_DIR (or --verify ENGINE_DIR)")
    from wanrt.export.engine import export_engine

    start = time.perf_counter()
    latents = None
    if args.size:
        from wanrt.runtime.options import MAX_FRAMES, check_int, parse_size

        w, h = parse_size(args.size)
        check_int("frame_num", args.frame_num, 1, MAX_FRAMES)
        latents = ((args.frame_num - 1) // 4 + 1, h // 8, w // 8)
    backends = tuple(b for b in (args.backends or "").split(",") if b)
    print(f"exporting {args.model} to {args.out} ({args.scheme})", flush=True)
    out = export_engine(args.model, args.out, args.scheme, progress=True, backends=backends, latents=latents,
                        overwrite=args.overwrite, text_scheme=args.text_scheme, attention=args.attention,
                        loras=tuple(args.lora or ()), cache=args.cache)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(f"wrote engine {out} ({args.scheme}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")


def _calibrate_cache(args: argparse.Namespace) -> None:
    """One generation recording MagCache's ratios, written beside the checkpoint's config (magcache.json)."""
    import json

    from wanrt.runtime.atomic import atomic_file
    from wanrt.runtime.checkpoint import CALIBRATION, open_checkpoint
    from wanrt.runtime.engine import is_engine
    from wanrt.runtime.pipeline import WanPipeline, resolve_device

    if is_engine(args.model):
        raise ValueError("calibrate the checkpoint, then export it: an engine records the checkpoint's ratios and "
                         "holds no file its manifest does not list")
    out = Path(args.model) / CALIBRATION
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to calibrate again")
    pipe = WanPipeline(open_checkpoint(args.model), resolve_device(args.device))
    request = dict(size=args.size, frame_num=args.frame_num, sample_steps=args.sample_steps, base_seed=args.base_seed)
    print(f"calibrating MagCache on {args.model}: one generation, '{args.prompt}'", flush=True)
    ratios = pipe.calibrate_cache(args.prompt, **request)
    record = {"ratios": ratios, "steps": len(ratios) // 2, "prompt": args.prompt, "base_seed": args.base_seed,
              "variant": pipe.variant.name}
    with atomic_file(out, ".json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({len(ratios) // 2} steps); `--cache magcache` now uses it, and engines exported from here "
          "record it")


def _random_checkpoint(args: argparse.Namespace) -> None:
    from wanrt.runtime.atomic import check_output_dir

    check_output_dir(args.out, overwrite=False, ours=lambda p: False)  # before making any weights
    from wanrt.runtime.config import get_variant
    from wanrt.testing.random_checkpoint import write_random_checkpoint

    get_variant(args.variant)
    out = write_random_checkpoint(args.out, args.variant, layout=args.layout, seed=args.seed)
    print(f"wrote a random-weight {args.variant} checkpoint ({args.layout} layout) to {out}")


def parse_budgets(text: str) -> list[int | None]:
    """'1GiB,4GiB,resident' -> [2**30, 4 * 2**30, None] (None: no cap)."""
    return [None if b.strip() == "resident" else _size(b) for b in text.split(",") if b.strip()]


def _bench(args: argparse.Namespace) -> None:
    from wanrt.bench.matrix import run_bench

    if args.peers is None:
        args.peers = importlib.util.find_spec("diffusers") is not None
    for mode in args.attention:  # one clear line for a bad option, before any model work
        run_options(args, attention=mode)
    report = run_bench(args)
    print(f"wrote {args.out}.json and {args.out}.md ({len(report['rows'])} rows"
          + (f", plots {', '.join(report['plots'])}" if report.get("plots") else "") + ")")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanrt", description="Run Wan2.1 video generation in little VRAM.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-video or image-to-video to an mp4")
    g.add_argument("--model", help="official or diffusers Wan2.1 checkpoint directory, or an engine (default: the "
                                   "embedded demo model)")
    g.add_argument("--engine", help="an engine directory written by `wanrt export` (verified before use)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--neg_prompt", default="", help="negative prompt (default: the official one)")
    g.add_argument("--image", help="conditioning image for i2v checkpoints")
    g.add_argument("--size", help="width*height, e.g. 832*480 (default: the variant's first size)")
    g.add_argument("--frame_num", type=int, help="number of frames, 4n+1 (default: the model's, 81 for Wan2.1)")
    g.add_argument("--sample_steps", type=int, help="default: 50 for t2v, 40 for i2v")
    g.add_argument("--sample_shift", type=float, help="default: 5.0 (3.0 for i2v at 480p)")
    g.add_argument("--sample_guide_scale", type=float, help="default: the model's (5.0 for Wan2.1)")
    g.add_argument("--sample_solver", choices=SOLVERS, help="default: unipc (euler with a denoising_step_list)")
    g.add_argument("--denoising_step_list", help="timesteps of a step-distilled model, e.g. 1000,750,500,250 (LightX2V)")
    g.add_argument("--preset", choices=tuple(PRESETS), help="sampling settings in one flag; distill4: LightX2V's 4-step "
                   "schedule (steps 1000,750,500,250, shift 5, euler, guidance 1) for step-distilled LoRAs and models")
    g.add_argument("--base_seed", type=int, default=-1, help="-1 picks a random seed")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_run_options(g)
    g.add_argument("--vram-budget", type=_size, help="GPU memory to plan for, e.g. 4GiB (default: free memory "
                   "minus 512 MiB); a budget too small for any plan is refused with the minimum that would fit")
    g.add_argument("--ram-budget", type=_size, help="host RAM for pinned weights, e.g. 16GiB (default: "
                   "available RAM minus 2 GiB); blocks beyond it are streamed from memory-mapped files")
    g.add_argument("--plan", action="store_true", help="print the memory plan and exit without generating")
    g.add_argument("--trust-engine", action="store_true", help="run an engine's compiled blocks (native code) even "
                   "though it was not exported on this machine; only for engines from someone you trust")
    g.add_argument("--out", default="video.mp4", help="output .mp4 (written atomically)")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="latency and memory per phase and VRAM budget, with peers in the same run")
    b.add_argument("--variant", default="t2v-1.3B", help="with random weights (no --model); default t2v-1.3B")
    b.add_argument("--model", help="a checkpoint or engine directory instead of random weights (an engine's scheme "
                   "is benchmarked as exported)")
    b.add_argument("--size", help="width*height (default: the variant's first size)")
    b.add_argument("--frame_num", type=int, default=81)
    b.add_argument("--steps", type=int, default=4, help="denoising steps of the whole-generation rows")
    b.add_argument("--sample_guide_scale", type=float, default=5.0, help="wanrt's guidance (1: one DiT pass per "
                   "step); diffusers is measured with 5")
    b.add_argument("--budgets", type=parse_budgets, default=parse_budgets("1GiB,2GiB,4GiB,resident"),
                   help="comma-separated VRAM budgets; 'resident' = no cap (default: 1GiB,2GiB,4GiB,resident)")
    b.add_argument("--attention", type=lambda s: s.split(","), default=["auto"],
                   help=f"comma-separated attention modes ({', '.join(ATTENTION_MODES)}): one set of rows each "
                   "(default: auto)")
    b.add_argument("--scheme", choices=SCHEMES, help="DiT block weights (default: as stored)")
    b.add_argument("--text-scheme", dest="text_scheme", choices=TEXT_SCHEMES, help="umT5 block weights (default: "
                   "as stored)")
    add_lora_option(b)
    add_cache_option(b, "")
    b.add_argument("--runs", type=int, default=3, help="timed calls per phase (median and spread)")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="measure diffusers beside wanrt (default: when diffusers is installed)")
    b.add_argument("--link-gbps", type=float, help="emulate a slower host link, e.g. 23 for desktop PCIe 4.0 x16")
    b.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="PNG plots (matplotlib)")
    b.add_argument("--prompt", default="a red circle moves right on a blue background")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--out", default="bench/results/bench", help="report path without suffix (.json, .md, .png)")
    b.set_defaults(func=_bench)

    e = sub.add_parser("export", help="write an engine: quantized, sharded per block, hashed")
    e.add_argument("--model", help="official or diffusers Wan2.1 checkpoint directory")
    e.add_argument("--out", help="engine directory to write: new or empty (written atomically at the end)")
    e.add_argument("--overwrite", action="store_true", help="replace an engine already at --out (only an engine "
                   "folder that wanrt wrote, holding nothing else, is ever replaced)")
    e.add_argument("--scheme", choices=SCHEMES, default="bf16", help="DiT block weights: bf16 (as in the checkpoint, "
                   "the default), fp8, int8 (w8a8 GEMMs), w8a16 (int8 weights)")
    e.add_argument("--text-scheme", dest="text_scheme", choices=TEXT_SCHEMES, default="bf16", help="umT5 block "
                   "weights, weight-only: bf16 (default), int8 or fp8 (half its size)")
    e.add_argument("--attention", choices=ATTENTION_MODES, default="auto", help="the attention mode the engine "
                   "runs with unless `generate --attention` says otherwise (default: auto)")
    add_lora_option(e)
    add_cache_option(e, "recorded as the engine's default; ")
    e.add_argument("--backends", help="compiled block graphs, comma-separated: inductor (AOTInductor package), "
                   "compile (torch.compile's cache, for where AOTInductor's loader fails), onnx (validated with "
                   "onnxruntime), tensorrt (needs NVIDIA's TensorRT and a GPU)")
    e.add_argument("--size", help="width*height the block graphs are compiled for (default: the variant's first)")
    e.add_argument("--frame_num", type=int, default=81, help="frames the block graphs are compiled for")
    e.add_argument("--verify", metavar="ENGINE_DIR", help="check an engine's files against its manifest and exit")
    e.set_defaults(func=_export)

    c = sub.add_parser("calibrate-cache", help="record MagCache's step ratios for a checkpoint without published ones")
    c.add_argument("--model", required=True, help="official or diffusers checkpoint directory (magcache.json is "
                   "written there)")
    c.add_argument("--prompt", default="a red circle moves right on a blue background")
    c.add_argument("--size", help="width*height (default: the variant's first size)")
    c.add_argument("--frame_num", type=int)
    c.add_argument("--sample_steps", type=int, help="default: the model's; other step counts are resampled")
    c.add_argument("--base_seed", type=int, default=0)
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier calibration")
    c.set_defaults(func=_calibrate_cache)

    r = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (tests and demos, no download)")
    r.add_argument("--variant", default="tiny-t2v", help="tiny-t2v, tiny-i2v, t2v-1.3B, t2v-14B or i2v-14B")
    r.add_argument("--layout", choices=("official", "diffusers"), default="official",
                   help="official (default: the released files and dtypes, each tensor drawn as it is written, so a "
                   "full-size model needs ~12 GB of RAM, for umT5's file) or diffusers (built through diffusers' "
                   "and transformers' own classes, in fp32: RAM for the whole model; needs the test extra)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="a new or empty folder")
    r.set_defaults(func=_random_checkpoint)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary output is cleaned up on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # after the subcommand: reports record how they were made
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except ValueError as e:  # user errors (bad flags, input, checkpoints, outputs) get one line, not a traceback
        print(f"wanrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"wanrt: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; nothing was written",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        from wanrt.runtime.pipeline import GenerationError

        if not isinstance(e, (GenerationError, OSError)):
            raise
        print(f"wanrt: error: {e}", file=sys.stderr)  # a run that failed, not a bug: one line too
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
