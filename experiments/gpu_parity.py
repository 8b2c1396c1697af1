"""Full-size parity with diffusers on the GPU, on identical random weights (issue: faithful Wan2.1).

    python -m experiments.gpu_parity --out bench/results/gpu_parity.json

- DiT: t2v-1.3B config, bf16, one forward at 480p x 81 frames (latents [1, 16, 21, 60, 104] = 32,760 tokens), ours vs
  diffusers' WanTransformer3DModel (bf16, its fp32-kept modules in fp32). Both are also compared with a float32
  diffusers forward (TF32 off) to show which side of the difference is closer to exact arithmetic.
- VAE: full width (base_dim 96) in fp32 (as the official code runs it), encode of a 9-frame 480x832 clip and decode of
  its 3 latent frames, ours vs diffusers' AutoencoderKLWan.
Errors are ||ours - ref|| / ||ref|| (and max |diff| / max |ref|). Pass mark: <= 2e-2.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from wanrt.runtime.config import get_variant

TOL = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double(), b.double()
    return {"norm_rel": ((a - b).norm() / b.norm()).item(), "max_rel": ((a - b).abs().max() / b.abs().max()).item()}


def dit_parity(device: str, variant: str = "t2v-1.3B", latent_shape=(21, 60, 104)) -> dict:
    from diffusers import WanTransformer3DModel

    from wanrt.runtime.dit import WanDiT, dit_from_diffusers

    cfg = get_variant(variant).dit
    torch.manual_seed(0)
    ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                in_channels=cfg.in_dim, out_channels=cfg.out_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim).eval()
    ours = WanDiT(cfg)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()), strict=True)
    ours = ours.to_inference_dtype(torch.bfloat16).to(device)

    x = torch.randn(1, cfg.in_dim, *latent_shape, device=device)
    t = torch.tensor([999.0 * 0.8], device=device)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    out: dict = {"input": list(x.shape), "tokens": latent_shape[0] * latent_shape[1] * latent_shape[2] // 4}
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        exact = ref.to(device)(x, t, context, return_dict=False)[0].float().cpu()
        keep = tuple(ref._keep_in_fp32_modules)
        for name, p in ref.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(torch.bfloat16)
        ref_bf16 = ref(x.bfloat16(), t, context.bfloat16(), return_dict=False)[0].float().cpu()
        got = ours(x, t, context.bfloat16()).float().cpu()
    out["ours_vs_diffusers_bf16"] = rel_err(got, ref_bf16)
    out["ours_bf16_vs_fp32"] = rel_err(got, exact)
    out["diffusers_bf16_vs_fp32"] = rel_err(ref_bf16, exact)
    out["pass"] = out["ours_vs_diffusers_bf16"]["norm_rel"] <= TOL
    return out


def vae_parity(device: str, variant: str = "t2v-1.3B", video_shape=(9, 480, 832)) -> dict:
    from diffusers import AutoencoderKLWan

    from wanrt.runtime.vae import WanVAE, vae_from_diffusers

    cfg = get_variant(variant).vae
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample)).eval()
    with torch.no_grad():  # default init leaves RMS gammas at 1; randomise them so a mapping slip shows
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    ours = WanVAE(cfg)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True)
    ref, ours = ref.to(device), ours.to(device)
    mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
    video = torch.rand(1, 3, *video_shape, device=device) * 2 - 1
    out: dict = {"video": list(video.shape)}
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        z_ref = ref.encode(video).latent_dist.mean
        z = ours.encode(video)
        out["encode"] = rel_err(z * std + mean, z_ref)
        dec_ref = ref.decode(z_ref, return_dict=False)[0]
        dec = ours.decode((z_ref - mean) / std)
        out["decode"] = rel_err(dec, dec_ref)
        out["decoded_shape"] = list(dec.shape)
    out["pass"] = max(out["encode"]["norm_rel"], out["decode"]["norm_rel"]) <= TOL
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu_parity.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_parity needs a CUDA GPU")
    import diffusers

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version(), "tolerance": TOL}
    report["dit_t2v_1.3B_480p_81f"] = dit_parity("cuda")
    torch.cuda.empty_cache()
    report["vae_full_width_9f_480x832"] = vae_parity("cuda")
    text = json.dumps(report, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
