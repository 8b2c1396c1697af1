"""Text-to-video and image-to-video generation: one function for both tasks, following the official
`WanT2V.generate` / `WanI2V.generate` step by step (separate cond/uncond DiT calls, UniPC, VAE decode)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .clip import CLIPVision, preprocess
from .dit import WanDiT, pad_context
from .sampler import cfg, default_neg_prompt, default_shift, make_solver
from .text import Tokenizer, UMT5Encoder, encode_text
from .vae import WanVAE
from .video import to_uint8_frames, write_mp4

FPS = 16


@dataclass
class Video:
    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: int = FPS
    seed: int = 0

    def save(self, path: str | Path) -> Path:
        return write_mp4(self.frames, path, fps=self.fps)


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' (the official --size format) -> (W, H)."""
    try:
        w, h = (int(s) for s in size.split("*"))
    except ValueError:
        raise ValueError(f"size must look like 832*480 (width*height), got {size!r}") from None
    return w, h


def check_request(ckpt: Checkpoint, size: str, frame_num: int, steps: int, image) -> tuple[int, int]:
    """Validate user arguments before any model work; returns (W, H)."""
    w, h = parse_size(size)
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValueError(f"width and height must be positive multiples of 16 (VAE 8x times patch 2x), got {size}")
    if ckpt.variant.sizes and size not in ckpt.variant.sizes:
        raise ValueError(f"size {size} is not supported by {ckpt.variant.name}; choose one of "
                         f"{', '.join(ckpt.variant.sizes)}")
    if frame_num < 1 or (frame_num - 1) % 4:
        raise ValueError(f"frame_num must be 4n+1 (1, 5, ..., 81), got {frame_num}")
    if steps < 1:
        raise ValueError(f"sample_steps must be >= 1, got {steps}")
    if ckpt.task == "i2v" and image is None:
        raise ValueError("this is an image-to-video model: pass --image")
    if ckpt.task == "t2v" and image is not None:
        raise ValueError("this is a text-to-video model: --image is only for i2v checkpoints")
    return w, h


def load_image(image) -> torch.Tensor:
    """A path or PIL image -> [3, H, W] float in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)


def _build(module_cls, config, state, device, dtype=None):
    with torch.device("meta"):
        model = module_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{module_cls.__name__} weights do not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to_inference_dtype(dtype) if hasattr(model, "to_inference_dtype") else model.to(dtype)
    return model.to(device).eval()


class WanPipeline:
    """Holds a checkpoint's models; `generate` runs text encoding, denoising and VAE decoding."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.ckpt = ckpt
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 GEMMs on the GPU as the official code; fp32 on the CPU where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        v = ckpt.variant
        self.tokenizer = Tokenizer(ckpt.tokenizer_dir, v.text.text_len)
        self.text_encoder = _build(UMT5Encoder, v.text, ckpt.text_state(), self.device, self.dtype)
        self.dit = _build(WanDiT, v.dit, ckpt.dit_state(), self.device, self.dtype)
        self.vae = _build(WanVAE, v.vae, ckpt.vae_state(), self.device)  # fp32, as the official code
        self.clip = None
        if v.clip is not None:
            self.clip = _build(CLIPVision, v.clip, ckpt.clip_state(), self.device, self.dtype)

    @property
    def variant(self):
        return self.ckpt.variant

    @torch.no_grad()
    def generate(self, prompt: str, image=None, size: str | None = None, frame_num: int = 81,
                 sample_steps: int | None = None, sample_shift: float | None = None, sample_guide_scale: float = 5.0,
                 sample_solver: str = "unipc", base_seed: int = -1, neg_prompt: str = "",
                 progress: bool = True) -> Video:
        v = self.variant
        size = size or (v.sizes[0] if v.sizes else None)
        if size is None:
            raise ValueError("pass size (width*height): this checkpoint has no named variant with default sizes")
        steps = sample_steps or v.sample_steps
        w, h = check_request(self.ckpt, size, frame_num, steps, image)
        shift = sample_shift if sample_shift is not None else default_shift(v.task, size)
        seed = base_seed if base_seed >= 0 else random.randint(0, 2**31 - 1)
        neg_prompt = neg_prompt or default_neg_prompt(v.task)

        context, context_null = (self._encode_prompt(p) for p in (prompt, neg_prompt))
        stride = v.vae.stride
        lat_f = (frame_num - 1) // stride[0] + 1
        clip_fea, cond = None, None
        if v.task == "i2v":
            img = load_image(image)
            lat_h, lat_w = i2v_latent_size(img.shape[1:], w * h, stride, v.dit.patch_size)
            clip_fea = self.clip(preprocess(img[None].to(self.device), v.clip.image_size).to(self.dtype))
            cond = self._image_condition(img, frame_num, lat_f, lat_h, lat_w)
        else:
            lat_h, lat_w = h // stride[1], w // stride[2]
        # Noise from a CPU generator: the same seed gives the same video on any device.
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, v.vae.z_dim, lat_f, lat_h, lat_w, generator=g).to(self.device)

        ctx = self.dit.embed_context(context, clip_fea)
        ctx_null = self.dit.embed_context(context_null, clip_fea)
        solver = make_solver(sample_solver, steps, shift)
        e, e0 = self.dit.embed_time(solver.timesteps.to(self.device))  # the whole schedule at once
        for i in tqdm(range(steps), desc="denoise", unit="step", disable=not progress):
            time = (e[i : i + 1], e0[i : i + 1])
            x = latents if cond is None else torch.cat([latents, cond], dim=1)
            v_cond = self.dit.denoise(x, time, ctx)
            v_uncond = self.dit.denoise(x, time, ctx_null)
            latents = solver.step(cfg(v_cond, v_uncond, sample_guide_scale), i, latents)
        video = self.vae.decode(latents.float())[0]
        return Video(to_uint8_frames(video), FPS, seed)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        out = encode_text(self.text_encoder, self.tokenizer, [prompt], self.device)
        return pad_context([o.to(self.dtype) for o in out], self.variant.dit.text_len)

    def _image_condition(self, img: torch.Tensor, frame_num: int, lat_f: int, lat_h: int, lat_w: int):
        """[1, 4 + z_dim, lat_f, lat_h, lat_w]: the first-frame mask and the VAE latents of (image, zeros...)."""
        s = self.variant.vae.stride
        h, w = lat_h * s[1], lat_w * s[2]
        first = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bicubic")[0]
        clip = torch.cat([first[:, None], first.new_zeros(3, frame_num - 1, h, w)], dim=1)
        y = self.vae.encode(clip[None].to(self.device))
        mask = torch.zeros(1, 4, lat_f, lat_h, lat_w, device=self.device)
        mask[:, :, 0] = 1  # the first latent frame stands for 4 given frames (the official repeat of frame 0)
        return torch.cat([mask, y.to(mask.dtype)], dim=1)


def i2v_latent_size(hw: tuple[int, int], max_area: int, stride, patch) -> tuple[int, int]:
    """Latent (h, w) keeping the image's aspect ratio under max_area pixels, floored to the patch grid (official)."""
    aspect = hw[0] / hw[1]
    lat_h = round(math.sqrt(max_area * aspect) // stride[1] // patch[1] * patch[1])
    lat_w = round(math.sqrt(max_area / aspect) // stride[2] // patch[2] * patch[2])
    return lat_h, lat_w


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> WanPipeline:
    """`wanrt.load(checkpoint_dir)`: open an official or diffusers Wan2.1 checkpoint and build its pipeline."""
    return WanPipeline(open_checkpoint(path), device, dtype)
