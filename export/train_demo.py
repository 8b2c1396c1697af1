"""Train the embedded demo model on procedural shape videos (export/synthetic.py), reproducibly from a seed:

    python -m wanrt.export.train_demo --out DIR [--device cuda] [--vae-steps N] [--dit-steps N]

Stage 1 trains the Wan-VAE (our WanVAE at small width) as a VAE: reconstruction plus a small KL term, through the same
causal chunked encode and decode the runtime uses. Its latent mean and std over training videos become the config's
latents_mean/std, as Wan's are. Stage 2 trains the umT5 encoder and the DiT together with flow matching
(x_t = (1 - s) x0 + s e, target e - x0, t = 1000 s, s shifted as at inference), the prompt replaced by the default
negative prompt 10% of the time so classifier-free guidance works. Everything runs through the plain-PyTorch
references (the fused kernels have no backward). The result is an official-layout checkpoint (config.json with the
small configs, weights, tokenizer) with train_log.json: the settings and every step's loss.

Status: tested for a few steps on the CPU (tests/test_train_demo.py); the shipped model's training run, on a GPU, is
still to be done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.config import Variant, get_variant
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.sampler import default_neg_prompt
from wanrt.runtime.text import Tokenizer, UMT5Encoder
from wanrt.runtime.vae import CausalCache, WanVAE

from .random_checkpoint import write_official
from .synthetic import random_scene, render
from .tiny_tokenizer import write_tiny_tokenizer

FRAMES, SIZE = 17, 64
SHIFT = 3.0  # the timestep shift of training (the same at inference keeps the noise levels the model saw)


def demo_variant(dim: int = 128, layers: int = 4, vae_dim: int = 16, text_dim: int = 64) -> Variant:
    """The demo model: Wan2.1's architecture at small width and depth, prompts of up to 64 tokens (the default negative prompt fits)."""
    base = get_variant("tiny-t2v")
    dit = dataclasses.replace(base.dit, dim=dim, ffn_dim=4 * dim, num_heads=dim // 32, num_layers=layers,
                              text_dim=text_dim, text_len=64)
    text = dataclasses.replace(base.text, dim=text_dim, dim_attn=text_dim, dim_ffn=2 * text_dim, num_heads=2,
                               num_layers=2, text_len=64)
    vae = dataclasses.replace(base.vae, dim=vae_dim)
    return dataclasses.replace(base, name="demo-t2v", dit=dit, text=text, vae=vae, sizes=(f"{SIZE}*{SIZE}",),
                               sample_steps=20, sample_shift=SHIFT)


def batch(rng: np.random.Generator, n: int, device) -> tuple[torch.Tensor, list[str]]:
    """n videos [n, 3, F, H, W] in [-1, 1] and their prompts."""
    scenes = [random_scene(rng) for _ in range(n)]
    videos = np.stack([render(s, FRAMES, SIZE, int(rng.integers(2**31))) for s in scenes])
    x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)
    return x.to(device), [s.prompt for s in scenes]


def encode_moments(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) through the runtime's causal chunks: frames 1, 4, 4, ... in, one latent frame out each."""
    cache = CausalCache()
    chunks = [video[:, :, :1]] + [video[:, :, i:i + 4] for i in range(1, video.shape[2], 4)]
    return vae.conv1(torch.cat([vae.encode_step(c, cache) for c in chunks], 2)).chunk(2, dim=1)


def decode(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    cache = CausalCache()
    return torch.cat([vae.decode_step(z[:, :, i:i + 1], cache) for i in range(z.shape[2])], 2)


def train_vae(vae: WanVAE, steps: int, rng, device, log: list, batch_size: int = 8, lr: float = 2e-3) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in range(steps):
        video, _ = batch(rng, batch_size, device)
        mu, logvar = encode_moments(vae, video)
        recon = decode(vae, mu + torch.randn_like(mu) * (0.5 * logvar).exp())
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(recon, video) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"stage": "vae", "step": step, "loss": round(loss.item(), 5), "kl": round(kl.item(), 4)})


@torch.no_grad()
def latent_stats(vae: WanVAE, rng, device, batches: int = 8) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of mu over training videos (the config's latents_mean / latents_std)."""
    mu = torch.cat([encode_moments(vae, batch(rng, 8, device)[0])[0] for _ in range(batches)])
    mu = mu.transpose(0, 1).flatten(1)
    return (tuple(round(v, 4) for v in mu.mean(1).tolist()),
            tuple(round(v, 4) for v in mu.std(1).clamp_min(1e-3).tolist()))


def context(text: UMT5Encoder, tokenizer: Tokenizer, prompts: list[str], device) -> torch.Tensor:
    """The DiT's context as at inference: the encoder output up to each prompt's end, zeros after."""
    ids, mask = tokenizer(prompts)
    ids, mask = ids.to(device), mask.to(device)
    return text(ids, mask) * mask[..., None]


def train_dit(dit: WanDiT, text: UMT5Encoder, vae: WanVAE, tokenizer: Tokenizer, steps: int, rng, device, log: list,
              batch_size: int = 8, lr: float = 5e-4, uncond: float = 0.1) -> None:
    params = [*dit.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    neg = default_neg_prompt("t2v")
    mean = torch.tensor(vae.cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
    for step in range(steps):
        video, prompts = batch(rng, batch_size, device)
        prompts = [neg if rng.random() < uncond else p for p in prompts]
        with torch.no_grad():
            x0 = (encode_moments(vae, video)[0] - mean) / std  # normalised mu: the pipeline's latents
        u = torch.from_numpy(rng.uniform(0, 1, batch_size)).float().to(device)
        s = (SHIFT * u / (1 + (SHIFT - 1) * u)).view(-1, 1, 1, 1, 1)  # the inference schedule's shift
        noise = torch.randn_like(x0)
        v = dit((1 - s) * x0 + s * noise, s.flatten() * 1000, context(text, tokenizer, prompts, device))
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"stage": "dit", "step": step, "loss": round(loss.item(), 5)})


def train(out: str | Path, vae_steps: int, dit_steps: int, seed: int = 0, device: str = "cpu",
          variant: Variant | None = None) -> Path:
    """Train both stages and write the checkpoint to `out` (atomically); returns its path."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    v = variant or demo_variant()
    start = time.perf_counter()
    log: list[dict] = []
    out = Path(out)
    tok_dir = write_tiny_tokenizer(out.parent / f".{out.name}.tokenizer", v.text.vocab)
    tokenizer = Tokenizer(tok_dir, v.text.text_len)
    with reference_only():
        vae = WanVAE(v.vae).to(device)
        train_vae(vae, vae_steps, rng, device, log)
        vae.eval()
        mean, std = latent_stats(vae, rng, device)
        v = dataclasses.replace(v, vae=dataclasses.replace(v.vae, latents_mean=mean, latents_std=std))
        vae.cfg = v.vae
        dit, text = WanDiT(v.dit).to(device), UMT5Encoder(v.text).to(device)
        train_dit(dit, text, vae, tokenizer, dit_steps, rng, device, log)
    states = {name: {k: t.detach().cpu().contiguous() for k, t in m.state_dict().items()}
              for name, m in (("dit", dit), ("vae", vae), ("text", text))}
    path = write_official(out, v, states, tok_dir, safetensors=True)
    shutil.rmtree(tok_dir)  # copied into the checkpoint
    settings = {"seed": seed, "vae_steps": vae_steps, "dit_steps": dit_steps, "frames": FRAMES, "size": SIZE,
                "shift": SHIFT, "device": device, "seconds": round(time.perf_counter() - start, 1),
                "torch": torch.__version__}
    (path / "train_log.json").write_text(json.dumps({"settings": settings, "log": log}, indent=1))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    print(f"wrote {train(a.out, a.vae_steps, a.dit_steps, a.seed, a.device)}")


if __name__ == "__main__":
    main()
