"""A LoRA for the demo model that reverses its motions: "moves left" then runs right, "grows" shrinks, and so on.

Trained by flow matching on the demo's procedural videos with each motion reversed and the prompt unchanged, the base
weights frozen; written in the musubi/kohya dialect (lora_unet_*, lora_down / lora_up, alpha) that users' trainers
write. The semantic check, asked for the reversed motion, then passes with the LoRA and not without it:

    python -m training.train_lora --out reverse.safetensors
    python -m experiments.demo_lora --lora reverse.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from training.synthetic import MOTIONS, Scene, random_scene, render
from training.train_demo import FRAMES, SHIFT, SIZE, context, encode_moments, latent_shape_weights, to_tensor
from wanrt.kernels.dispatch import reference_only
from wanrt.runtime.atomic import atomic_file
from wanrt.runtime.checkpoint import open_checkpoint
from wanrt.runtime.dit import WanDiT
from wanrt.runtime.pipeline import DEMO_MODEL
from wanrt.runtime.sampler import default_neg_prompt
from wanrt.runtime.text import Tokenizer, UMT5Encoder
from wanrt.runtime.vae import WanVAE

REVERSED = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
            "moves down": "moves up", "grows": "shrinks", "shrinks": "grows"}
assert REVERSED.keys() == MOTIONS.keys()
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def reversed_scene(scene: Scene) -> Scene:
    return dataclasses.replace(scene, motion=REVERSED[scene.motion])


def reversed_batch(seed: int, step: int, n: int) -> tuple[np.ndarray, list[str]]:
    """n videos whose shapes move against what their prompts say (apart from the check's prompts: its seeds draw
    scenes from 10_000 on)."""
    rng = np.random.default_rng([seed, 7, step])
    scenes = [random_scene(rng) for _ in range(n)]
    videos = [render(reversed_scene(s), FRAMES, SIZE, int(rng.integers(2**31))) for s in scenes]
    return np.stack(videos), [s.prompt for s in scenes]


def train_lora(out: str | Path, steps: int = 300, rank: int = 8, batch: int = 16, lr: float = 3e-3, seed: int = 0,
               uncond: float = 0.1, shape_weight: float = 4.0) -> dict:
    """Train on the CPU and write the LoRA to `out`; returns the settings and losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ckpt = open_checkpoint(DEMO_MODEL)
    v = ckpt.variant
    dit, text, vae = WanDiT(v.dit), UMT5Encoder(v.text), WanVAE(v.vae)
    for model, state in ((dit, ckpt.dit_state()), (text, ckpt.text_state()), (vae, ckpt.vae_state())):
        model.load_state_dict({k: t.float() for k, t in state.items()})
        model.requires_grad_(False).eval()
    tokenizer = Tokenizer(ckpt.tokenizer_dir, v.text.text_len)
    pairs = {}  # official module name -> (down [rank, in], up [out, rank]); up starts at zero: the base model
    for i in range(v.dit.num_layers):
        for name in LINEARS:
            n_out, n_in = dit.blocks[i].get_submodule(name).weight.shape
            pairs[f"blocks.{i}.{name}"] = (torch.nn.Parameter(torch.randn(rank, n_in, generator=g) / n_in**0.5),
                                           torch.nn.Parameter(torch.zeros(n_out, rank)))
    params = [p for pair in pairs.values() for p in pair]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def weights(i: int) -> dict[str, torch.Tensor]:
        w = dit.block_weights(i)
        for name in LINEARS:
            down, up = pairs[f"blocks.{i}.{name}"]
            w[f"{name}.weight"] = w[f"{name}.weight"] + up @ down  # alpha = rank: scale 1
        return w

    neg = default_neg_prompt("t2v")
    mean = torch.tensor(v.vae.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(v.vae.latents_std).view(1, -1, 1, 1, 1)
    losses, start = [], time.perf_counter()
    with reference_only():
        for step in range(steps):
            videos, prompts = reversed_batch(seed, step, batch)
            drop = (torch.rand(batch, generator=g) < uncond).tolist()
            prompts = [neg if d else p for d, p in zip(drop, prompts)]
            video = to_tensor(videos, "cpu")
            with torch.no_grad():
                x0 = (encode_moments(vae, video)[0] - mean) / std
                ctx = dit.embed_context(context(text, tokenizer, prompts, "cpu"))
            u = torch.rand(batch, generator=g)
            s = (SHIFT * u / (1 + (SHIFT - 1) * u)).view(-1, 1, 1, 1, 1)
            noise = torch.randn(x0.shape, generator=g)
            pred = dit.denoise((1 - s) * x0 + s * noise, dit.embed_time(s.flatten() * 1000), ctx, weights)
            w = latent_shape_weights(video, shape_weight, vae.cfg.stride)
            loss = (w * (pred - (noise - x0)).pow(2)).sum() / (w.sum() * pred.shape[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 5))
            if step % 50 == 0 or step == steps - 1:
                print(f"step {step}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    state = {}
    for module, (down, up) in pairs.items():  # musubi / kohya keys
        key = "lora_unet_" + module.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down.detach().contiguous(),
                  f"{key}.lora_up.weight": up.detach().contiguous(), f"{key}.alpha": torch.tensor(float(rank))}
    with atomic_file(out, ".safetensors") as tmp:
        save_file(state, tmp)
    return {"steps": steps, "rank": rank, "batch": batch, "lr": lr, "seed": seed, "uncond": uncond,
            "shape_weight": shape_weight, "seconds": round(time.perf_counter() - start, 1), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    record = train_lora(a.out, a.steps, a.rank, seed=a.seed)
    print(f"wrote {a.out} in {record['seconds']} s; last losses {record['losses'][-5:]}")


if __name__ == "__main__":
    main()
