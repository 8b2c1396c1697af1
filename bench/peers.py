"""Peers run in the same process as wanrt, on the same weights and inputs: diffusers' WanTransformer3DModel
(resident; group offloading block-level and leaf-level, with streams) for one denoise step with CFG, and
AutoencoderKLWan (untiled and tiled) for the decode. Each returns its output for comparison with ours."""
from __future__ import annotations

import torch

from wanrt.runtime.config import Variant
from wanrt.runtime.dit import dit_from_diffusers
from wanrt.runtime.vae import _module_rules, _official_key

# setting -> apply_group_offloading kwargs (None: resident). Offloading needs a GPU.
DIT_SETTINGS = {
    "resident": None,
    "group offload (block, stream)": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True),
    "group offload (leaf, stream)": dict(offload_type="leaf_level", use_stream=True),
}
VAE_SETTINGS = ("untiled", "tiled")


def diffusers_dit(v: Variant, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """WanTransformer3DModel with our official-layout weights, cast as from_pretrained(torch_dtype=dtype) does."""
    from diffusers import WanTransformer3DModel

    cfg = v.dit
    model = WanTransformer3DModel(  # on the CPU, not meta: its rotary tables are buffers outside the state dict
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps)
    names = dit_from_diffusers({k: k for k in model.state_dict()})  # official name -> diffusers name
    model.load_state_dict({dk: state[ok].cpu() for ok, dk in names.items()}, assign=True)
    keep = tuple(model._keep_in_fp32_modules)
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    return model.eval()


def dit_step(model, offload: dict | None, device: torch.device):
    """Place the model for one setting; returns step(x, t, context, context_null, guide) -> velocity after CFG."""
    if offload is None:
        model.to(device)
    else:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(model, onload_device=device, **offload)

    def step(x, t, context, context_null, guide_scale):
        cond = model(x, t, context, return_dict=False)[0]
        uncond = model(x, t, context_null, return_dict=False)[0]
        return uncond.float() + guide_scale * (cond.float() - uncond.float())
    return step


def pipeline_generate(dit, vae, shift: float, device: torch.device):
    """diffusers' WanPipeline of these two models, resident, handed the prompt embeddings (its text encoder is not
    counted): generate(context, context_null, width, height, frames, steps, guide) -> video [B, 3, F, H, W]."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=dit.to(device), vae=vae.to(device),
                       scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def generate(context, context_null, width, height, frames, steps, guide):
        return pipe(prompt_embeds=context, negative_prompt_embeds=context_null, height=height, width=width,
                    num_frames=frames, num_inference_steps=steps, guidance_scale=guide, output_type="pt",
                    generator=torch.Generator(device).manual_seed(0)).frames
    return generate


def diffusers_vae(v: Variant, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """AutoencoderKLWan with our official-layout VAE weights."""
    from diffusers import AutoencoderKLWan

    cfg = v.vae
    model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                             num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample),
                             attn_scales=[], latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))
    rules = _module_rules(cfg.num_res_blocks)
    model.load_state_dict({dk: state[_official_key(dk, rules)] for dk in model.state_dict()})
    return model.to(dtype).eval()


def vae_decode(model, tiled: bool, v: Variant):
    """decode(normalised latents) -> video in [-1, 1], as diffusers' WanPipeline calls it."""
    if tiled:
        model.enable_tiling()
    else:
        model.disable_tiling()
    dtype = next(model.parameters()).dtype

    def decode(latents: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(v.vae.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(v.vae.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return model.decode((latents * std + mean).to(dtype), return_dict=False)[0].clamp(-1, 1)
    return decode


def random_wan21_vaes():
    """diffusers' AutoencoderKLWan as it initialises itself (seed 0; RMS-norm gains drawn around 1 so they matter)
    and our WanVAE with the same weights: (diffusers, ours), both on the CPU in fp32."""
    from diffusers import AutoencoderKLWan

    from wanrt.runtime.config import get_variant
    from wanrt.runtime.vae import WanVAE, vae_from_diffusers

    v = get_variant("t2v-1.3B")
    torch.manual_seed(0)
    ref = AutoencoderKLWan().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    ours = WanVAE(v.vae)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), v.vae))
    return ref, ours.eval()
