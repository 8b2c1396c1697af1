"""Train the embedded demo model on procedural shape videos (export/synthetic.py), reproducibly from a seed:

    python -m training.train_demo --out DIR [--device cuda] [--vae-steps N] [--dit-steps N]
    # or in three processes (each under a time limit), as the shipped model was (bench/results/demo_train_h100.md):
    python -m training.train_demo --out VAE_DIR --dit-steps 0 --decoder-steps 0
    python -m training.train_demo --out DIR --vae-from VAE_DIR --decoder-steps 0
    python -m training.train_demo --out FINAL --dit-from DIR --dit-steps 0

Stage 1 trains the Wan-VAE (our WanVAE at small width) as a VAE: reconstruction plus a small KL term, through the same
causal chunked encode and decode the runtime uses. Its latent mean and std over training videos become the config's
latents_mean/std, as Wan's are. Stage 2 trains the umT5 encoder and the DiT together with flow matching
(x_t = (1 - s) x0 + s e, target e - x0, t = 1000 s, s shifted as at inference), the prompt replaced by the default
negative prompt 10% of the time so classifier-free guidance works. Everything runs through the plain-PyTorch
references (the fused kernels have no backward). The result is an official-layout checkpoint (config.json with the
small configs, weights, tokenizer) with train_log.json: the settings and every step's loss. Stage 3 fine-tunes the
VAE's decoder alone on whole clips: stage 1 trains on short clips (fast), which leaves the causal cache of later chunks
untrained, so their frames decayed into noise. The encoder stays frozen, so the latents the DiT learned stay valid.

Videos are drawn by worker processes, each batch from (seed, stage, step) alone; the stages warm up their learning
rate and decay it on a cosine, and the DiT and text encoder are shipped as their exponential moving averages.
The defaults are the shipped model's settings.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.checkpoint import open_checkpoint
from wanrt.runtime.config import Variant, get_variant
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.sampler import default_neg_prompt
from wanrt.runtime.text import Tokenizer, UMT5Encoder
from wanrt.runtime.vae import CausalCache, WanVAE

from wanrt.testing.random_checkpoint import write_official
from training.synthetic import random_scene, render
from wanrt.testing.tiny_tokenizer import write_tiny_tokenizer

FRAMES, SIZE = 17, 64
VAE_FRAMES = 9
SHIFT = 3.0  # the timestep shift of training (the same at inference keeps the noise levels the model saw)
GUIDE = 2.0  # classifier-free guidance at inference: chosen on seeds 100-199, apart from the check's seeds 0-19


def demo_variant(dim: int = 192, layers: int = 6, vae_dim: int = 16, text_dim: int = 64) -> Variant:
    """The demo model: Wan2.1's architecture at small width and depth, prompts of up to 64 tokens (the default
    negative prompt fits)."""
    base = get_variant("tiny-t2v")
    dit = dataclasses.replace(base.dit, dim=dim, ffn_dim=4 * dim, num_heads=dim // 32, num_layers=layers,
                              text_dim=text_dim, text_len=64)
    text = dataclasses.replace(base.text, dim=text_dim, dim_attn=text_dim, dim_ffn=2 * text_dim, num_heads=2,
                               num_layers=2, text_len=64)
    vae = dataclasses.replace(base.vae, dim=vae_dim)
    return dataclasses.replace(base, name="demo-t2v", dit=dit, text=text, vae=vae, sizes=(f"{SIZE}*{SIZE}",),
                               sample_steps=20, sample_shift=SHIFT, sample_guide_scale=GUIDE,
                               frame_num=FRAMES)


def render_batch(seed: int, stage: str, step: int, n: int) -> tuple[np.ndarray, list[str]]:
    """Batch `step` of a stage: n uint8 videos [n, F, H, W, 3] and their prompts, a pure function of its arguments
    (so worker processes can draw batches in any order and training stays reproducible)."""
    rng = np.random.default_rng([seed, ("vae", "dit", "stats", "decoder").index(stage), step])
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s, FRAMES, SIZE, int(rng.integers(2**31))) for s in scenes]), [s.prompt for s in scenes]


@contextmanager
def batches(seed: int, stage: str, steps: int, n: int, workers: int):
    """The stage's batches in order, drawn ahead by `workers` processes (0: in this process), at most a few per
    worker in flight so memory stays bounded."""
    draw = functools.partial(render_batch, seed, stage, n=n)
    if workers == 0:
        yield map(draw, range(steps))
        return

    def ahead(pool):
        pending = collections.deque(pool.submit(draw, i) for i in range(min(steps, 4 * workers)))
        for i in range(len(pending), steps + len(pending)):
            done = pending.popleft().result()
            if i < steps:
                pending.append(pool.submit(draw, i))
            yield done

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield ahead(pool)


def to_tensor(videos: np.ndarray, device) -> torch.Tensor:
    """uint8 [n, F, H, W, 3] -> [n, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(videos).to(device).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


def encode_moments(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) through the runtime's causal chunks: frames 1, 4, 4, ... in, one latent frame out each."""
    cache = CausalCache()
    chunks = [video[:, :, :1]] + [video[:, :, i:i + 4] for i in range(1, video.shape[2], 4)]
    return vae.conv1(torch.cat([vae.encode_step(c, cache) for c in chunks], 2)).chunk(2, dim=1)


def decode(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    cache = CausalCache()
    return torch.cat([vae.decode_step(z[:, :, i:i + 1], cache) for i in range(z.shape[2])], 2)


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: int = 200) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then a cosine decay to a tenth of the peak rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Progress:
    """Every `every` steps, one line with the mean loss and the rate since the last line (training runs unattended)."""

    def __init__(self, stage: str, steps: int, every: int = 50):
        self.stage, self.steps, self.every, self.last, self.losses = stage, steps, every, time.perf_counter(), []

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            now = time.perf_counter()
            print(f"{self.stage} {step + 1}/{self.steps} loss {np.mean(self.losses):.4f} "
                  f"({len(self.losses) / (now - self.last):.1f} steps/s)", flush=True)
            self.last, self.losses = now, []


def shape_mask(video: torch.Tensor) -> torch.Tensor:
    """Where the shape is, [n, 1, F, H, W] bool: far from its row's median over the clip (the background)."""
    n, c, f, h, w = video.shape
    background = video.permute(0, 1, 3, 2, 4).reshape(n, c, h, f * w).median(-1).values[:, :, None, :, None]
    return (video - background).norm(dim=1, keepdim=True) > 0.2


def shape_weights(video: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """Per-pixel loss weights [n, 1, F, H, W]: `weight` where the shape is, 1 elsewhere. The shape covers a few percent
    of the frame, but its colour is what the prompt names."""
    return 1 + (weight - 1) * shape_mask(video).float()


def latent_shape_weights(video: torch.Tensor, weight: float, stride: tuple[int, int, int]) -> torch.Tensor:
    """shape_weights on the latent grid [n, 1, F', H', W']: `weight` at each latent position that encodes any of the
    shape's pixels (the first frame alone, then `stride` frames x pixels per position), 1 elsewhere."""
    shape = shape_mask(video).float()
    st, sh, sw = stride
    rest = F.max_pool3d(shape[:, :, 1:], stride) if shape.shape[2] > 1 else shape[:, :, :0]
    first = F.max_pool3d(shape[:, :, :1], (1, sh, sw))
    return 1 + (weight - 1) * torch.cat([first, rest], 2)


def train_vae(vae: WanVAE, data, steps: int, device, log: list, stage: str = "vae") -> None:
    """Stage "vae": the whole VAE on the first VAE_FRAMES frames of each video (a first frame and two causal chunks,
    at half the cost of whole clips). Stage "decoder": the decoder alone on whole clips, the encoder frozen. Both with
    the shape's pixels weighted up."""
    whole = stage == "vae"
    params = list(vae.parameters()) if whole else [*vae.conv2.parameters(), *vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3 if whole else 5e-4)
    sched, progress = schedule(opt, steps, warmup=min(200, steps // 5)), Progress(stage, steps)
    for step, (videos, _) in zip(range(steps), data):
        video = to_tensor(videos[:, :VAE_FRAMES] if whole else videos, device)
        with torch.set_grad_enabled(whole):
            mu, logvar = encode_moments(vae, video)
        recon = decode(vae, mu + torch.randn_like(mu) * (0.5 * logvar).exp())
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        weights = shape_weights(video)
        loss = (weights * (recon - video).pow(2)).sum() / (weights.sum() * 3) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({"stage": stage, "step": step, "loss": round(loss.item(), 5), "kl": round(kl.item(), 4)})
        progress(step, log[-1]["loss"])


@torch.no_grad()
def latent_stats(vae: WanVAE, data, device) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of mu over training videos (the config's latents_mean / latents_std)."""
    mu = torch.cat([encode_moments(vae, to_tensor(videos, device))[0] for videos, _ in data])
    mu = mu.transpose(0, 1).flatten(1)
    return (tuple(round(v, 4) for v in mu.mean(1).tolist()),
            tuple(round(v, 4) for v in mu.std(1).clamp_min(1e-3).tolist()))


def context(text: UMT5Encoder, tokenizer: Tokenizer, prompts: list[str], device) -> torch.Tensor:
    """The DiT's context as at inference: the encoder output up to each prompt's end, zeros after."""
    ids, mask = tokenizer(prompts)
    ids, mask = ids.to(device), mask.to(device)
    return text(ids, mask) * mask[..., None]


class EMA:
    """An exponential moving average of parameters (what is shipped: it samples better than the last step's
    weights), with the usual warm-up of its decay so short runs average over what they have."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.999):
        self.params, self.decay, self.steps = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_dit(dit: WanDiT, text: UMT5Encoder, vae: WanVAE, tokenizer: Tokenizer, data, steps: int, device, log: list,
              g: torch.Generator, lr: float = 1e-3, uncond: float = 0.1, shape_weight: float = 1.0) -> None:
    """Flow matching; the EMA weights end up in `dit` and `text`. With `shape_weight` > 1 the latent positions of
    the shape weigh that much more in the loss (the shape is a few percent of the frame; its colour is what the
    prompt names)."""
    params = [*dit.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched, progress, ema = schedule(opt, steps), Progress("dit", steps), EMA(params)
    neg = default_neg_prompt("t2v")
    mean = torch.tensor(vae.cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
    for step, (videos, prompts) in zip(range(steps), data):
        n = len(prompts)
        drop = torch.rand(n, generator=g) < uncond
        prompts = [neg if d else p for d, p in zip(drop.tolist(), prompts)]
        video = to_tensor(videos, device)
        with torch.no_grad():
            # normalised mu: the pipeline's latents
            x0 = (encode_moments(vae, video)[0] - mean) / std
        u = torch.rand(n, generator=g)
        s = (SHIFT * u / (1 + (SHIFT - 1) * u)).to(device).view(-1, 1, 1, 1, 1)  # the inference schedule's shift
        noise = torch.randn(x0.shape, generator=g).to(device)
        v = dit((1 - s) * x0 + s * noise, s.flatten() * 1000, context(text, tokenizer, prompts, device))
        if shape_weight == 1:
            loss = F.mse_loss(v, noise - x0)
        else:
            weights = latent_shape_weights(video, shape_weight, vae.cfg.stride)
            loss = (weights * (v - (noise - x0)).pow(2)).sum() / (weights.sum() * v.shape[1])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        log.append({"stage": "dit", "step": step, "loss": round(loss.item(), 5)})
        progress(step, log[-1]["loss"])
    ema.copy_to_params()


def train(out: str | Path, vae_steps: int, dit_steps: int, seed: int = 0, device: str = "cpu",
          variant: Variant | None = None, batch_size: int = 32, dit_batch_size: int | None = None,
          workers: int = 0, vae_from: str | Path | None = None, decoder_steps: int = 0,
          dit_from: str | Path | None = None, dit_shape_weight: float = 1.0) -> Path:
    """Train the three stages and write the checkpoint to `out` (atomically); returns its path. The result depends on
    the seed, the settings and the device, not on `workers`. The stages can run in separate processes, each within a
    time limit: with `vae_from` (a checkpoint this function wrote, e.g. with dit_steps=0) stage 1 is skipped and its
    VAE and latent statistics are taken from there; with `dit_from` stage 1 is skipped and the VAE, text encoder and
    DiT are taken from there (stage 2 continues training them for `dit_steps`)."""
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True  # the VAE's convolutions see a few fixed shapes
    g = torch.Generator().manual_seed(seed)
    v = variant or demo_variant()
    start = time.perf_counter()
    seconds = {}
    log: list[dict] = []
    out = Path(out)
    tok_dir = write_tiny_tokenizer(out.parent / f".{out.name}.tokenizer", v.text.vocab)
    tokenizer = Tokenizer(tok_dir, v.text.text_len)
    with reference_only():
        if dit_from is not None or vae_from is not None:
            vae, v = _trained_vae(dit_from or vae_from, v, device)
            vae_steps = 0  # stage 1 ran in the earlier process
        else:
            vae = WanVAE(v.vae).to(device)
            with batches(seed, "vae", vae_steps, batch_size, workers) as data:
                train_vae(vae, data, vae_steps, device, log)
            vae.eval()
            with batches(seed, "stats", 8, batch_size, 0) as data:
                mean, std = latent_stats(vae, data, device)
            v = dataclasses.replace(v, vae=dataclasses.replace(v.vae, latents_mean=mean, latents_std=std))
            vae.cfg = v.vae
        seconds["vae"] = round(time.perf_counter() - start, 1)
        dit, text = WanDiT(v.dit).to(device), UMT5Encoder(v.text).to(device)
        if dit_from is not None:
            ckpt = open_checkpoint(dit_from)
            dit.load_state_dict(ckpt.dit_state())
            text.load_state_dict(ckpt.text_state())
        # a continued run (dit_from) starts from trained weights: a lower peak rate keeps it from undoing them
        with batches(seed, "dit", dit_steps, dit_batch_size or batch_size, workers) as data:
            train_dit(dit, text, vae, tokenizer, data, dit_steps, device, log, g, lr=1e-3 if dit_from is None else 3e-4,
                      shape_weight=dit_shape_weight)
        seconds["dit"] = round(time.perf_counter() - start - seconds["vae"], 1)
        with batches(seed, "decoder", decoder_steps, batch_size, workers) as data:
            train_vae(vae, data, decoder_steps, device, log, stage="decoder")
        vae.eval()
        seconds["decoder"] = round(time.perf_counter() - start - seconds["vae"] - seconds["dit"], 1)
    states = {name: {k: t.detach().cpu().contiguous() for k, t in m.state_dict().items()}
              for name, m in (("dit", dit), ("vae", vae), ("text", text))}
    states["dit"] = {k: t.to(torch.bfloat16) for k, t in states["dit"].items()}  # as Wan ships it; halves the file
    path = write_official(out, v, states, tok_dir, safetensors=True)
    shutil.rmtree(tok_dir)  # copied into the checkpoint
    settings = {"seed": seed, "vae_steps": vae_steps, "dit_steps": dit_steps, "batch_size": batch_size,
                "dit_batch_size": dit_batch_size or batch_size, "vae_frames": VAE_FRAMES,
                "decoder_steps": decoder_steps, "dit_shape_weight": dit_shape_weight,
                **{k: None if p is None else Path(p).name for k, p in (("vae_from", vae_from), ("dit_from", dit_from))},
                "frames": FRAMES, "size": SIZE, "shift": SHIFT, "device": device,
                "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
                "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)}, "torch": torch.__version__}
    source = dit_from or vae_from  # the stages run before, in another process: one record of them all
    if source is not None and (Path(source) / "train_log.json").exists():
        before = json.loads((Path(source) / "train_log.json").read_text())
        settings["before"], log = before["settings"], before["log"] + log
    (path / "train_log.json").write_text(json.dumps({"settings": settings, "log": log}, indent=1))
    return path


def _trained_vae(path: str | Path, v: Variant, device) -> tuple[WanVAE, Variant]:
    """The VAE of a checkpoint written by `train`, and `v` with that VAE's config (its latent statistics)."""
    ckpt = open_checkpoint(path)
    if dataclasses.replace(ckpt.variant.vae, latents_mean=v.vae.latents_mean, latents_std=v.vae.latents_std) != v.vae:
        raise ValueError(f"the VAE in {path} is not this variant's ({ckpt.variant.vae} vs {v.vae})")
    vae = WanVAE(ckpt.variant.vae)
    vae.load_state_dict(ckpt.vae_state())
    return vae.to(device).eval(), dataclasses.replace(v, vae=ckpt.variant.vae)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--dit-steps", type=int, default=3600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dit-batch-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decoder-steps", type=int, default=800)
    p.add_argument("--dit-shape-weight", type=float, default=4.0,
                   help="weight of the shape's latent positions in the DiT's loss (1: plain flow matching)")
    p.add_argument("--vae-from", help="a checkpoint of this script whose VAE to keep (stage 1 is skipped)")
    p.add_argument("--dit-from", help="a checkpoint of this script whose VAE, text encoder and DiT to start from "
                                      "(stage 1 skipped; stage 2 continues for --dit-steps, 0 keeps them)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes drawing the videos")
    a = p.parse_args()
    path = train(a.out, a.vae_steps, a.dit_steps, a.seed, a.device, batch_size=a.batch_size,
                 dit_batch_size=a.dit_batch_size, workers=a.workers, vae_from=a.vae_from,
                 decoder_steps=a.decoder_steps, dit_from=a.dit_from, dit_shape_weight=a.dit_shape_weight)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
