"""CLIP vision tower: parity with transformers' CLIPVisionModel, official-key loading, preprocessing."""
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from wanrt.runtime.clip import (BLOCK_KEYS, CLIP_MEAN, CLIP_STD, CLIPVision, clip_block, clip_from_hf,
                                clip_from_official, preprocess)
from wanrt.runtime.config import VARIANTS

CFG = VARIANTS["tiny-i2v"].clip


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.dim * cfg.mlp_ratio, num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers, image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
        layer_norm_eps=cfg.eps, attn_implementation="eager")
    model = CLIPVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm weights/biases too, so a swapped norm shows up
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2))
    return model


def _random_model(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = CLIPVision(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def test_parity_with_transformers():
    assert CFG.use_layers == CFG.num_layers - 1
    hf = _hf_model(CFG)
    ours = CLIPVision(CFG).eval()
    ours.load_state_dict(clip_from_hf(hf.state_dict(), CFG), strict=True)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    hs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hs) == CFG.num_layers + 1  # hs[0] = after pre_layrnorm, hs[i] = after i blocks
    ref = hs[CFG.use_layers]
    assert torch.equal(ref, hs[-2])  # diffusers' Wan I2V pipeline index is the same tensor
    out = ours(pixels)
    assert out.shape == (2, CFG.num_tokens, CFG.dim) and out.dtype == torch.float32
    err = _rel_err(out, ref)
    print(f"max rel err vs hidden_states[-2]: {err:.2e}")
    assert err <= 1e-5
    assert _rel_err(out, hs[-1]) > 1e-2  # not the last layer by accident


@torch.no_grad()
def test_hf_with_vision_model_prefix_and_projection():
    hf = _hf_model(CFG)
    sd = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    sd["visual_projection.weight"] = torch.randn(16, CFG.dim)
    assert clip_from_hf(sd, CFG).keys() == clip_from_hf(hf.state_dict(), CFG).keys()


def test_hf_unknown_and_missing_keys():
    sd = dict(_hf_model(CFG).state_dict())
    with pytest.raises(ValueError, match="encoder.layers.0.self_attn.bogus"):
        clip_from_hf({**sd, "encoder.layers.0.self_attn.bogus": torch.zeros(1)}, CFG)
    del sd["encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"transformer\.1\.mlp\.0\.weight"):
        clip_from_hf(sd, CFG)


def _fake_official(cfg, seed=0):
    """What models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth looks like, at tiny size."""
    ours = _random_model(cfg, seed).state_dict()
    sd = {"visual." + k: v for k, v in ours.items()}
    for n in range(cfg.use_layers, cfg.num_layers):  # the unused last block(s)
        for k in BLOCK_KEYS:
            sd[f"visual.transformer.{n}.{k}"] = torch.randn_like(ours[f"transformer.0.{k}"])
    sd["visual.post_norm.weight"] = torch.ones(cfg.dim)
    sd["visual.post_norm.bias"] = torch.zeros(cfg.dim)
    sd["visual.head"] = torch.randn(cfg.dim, 24)
    sd["textual.token_embedding.weight"] = torch.randn(50, 16)
    sd["textual.blocks.0.attn.q.weight"] = torch.randn(16, 16)
    sd["textual.head.0.weight"] = torch.randn(20, 16)
    sd["log_scale"] = torch.tensor(2.6593)
    return ours, sd


@torch.no_grad()
def test_official_keys_load_strict():
    ours, sd = _fake_official(CFG)
    converted = clip_from_official(sd, CFG)
    assert converted.keys() == ours.keys()
    assert all(converted[k] is sd["visual." + k] for k in converted)  # no copies
    with torch.device("meta"):
        model = CLIPVision(CFG)
    model.load_state_dict(converted, strict=True, assign=True)
    ref = CLIPVision(CFG).eval()
    ref.load_state_dict(ours)
    pixels = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    assert torch.equal(model.eval()(pixels), ref(pixels))


def test_official_unknown_missing_and_shape_errors():
    _, sd = _fake_official(CFG)
    with pytest.raises(ValueError, match=r"transformer\.7\.norm1\.weight"):  # beyond num_layers
        clip_from_official({**sd, "visual.transformer.7.norm1.weight": torch.ones(CFG.dim)}, CFG)
    with pytest.raises(ValueError, match=r"visual_extra"):
        clip_from_official({**sd, "visual.visual_extra": torch.ones(1)}, CFG)
    with pytest.raises(ValueError, match=r"missing keys \['pos_embedding'\]"):
        clip_from_official({k: v for k, v in sd.items() if k != "visual.pos_embedding"}, CFG)
    with pytest.raises(ValueError, match=r"transformer\.0\.attn\.to_qkv\.weight"):
        clip_from_official({**sd, "visual.transformer.0.attn.to_qkv.weight": torch.ones(CFG.dim, CFG.dim)}, CFG)


@torch.no_grad()
def test_bf16_runs_in_weight_dtype():
    pixels = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    ref = _random_model(CFG)(pixels)
    out = _random_model(CFG, dtype=torch.bfloat16)(pixels)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 5e-2


def test_block_compiles_fullgraph():
    model = _random_model(CFG)
    x = torch.randn(2, CFG.num_tokens, CFG.dim)
    w = model.block_weights(0)
    assert tuple(w) == BLOCK_KEYS
    compiled = torch.compile(clip_block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, CFG.num_heads, CFG.eps), clip_block(x, w, CFG.num_heads, CFG.eps))


def test_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="expected pixels"):
        _random_model(CFG)(torch.randn(1, 3, CFG.image_size + 1, CFG.image_size))


def test_preprocess_shape_and_range():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 50, 70) * 2 - 1
    out = preprocess(images, CFG.image_size)
    assert out.shape == (2, 3, CFG.image_size, CFG.image_size) and out.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    unit = out * std + mean  # back to [0, 1] space
    overshoot = (1.375 ** 2 - 1) / 2  # 2-D bicubic (a=-0.75) weights sum to at most 1.375**2 in absolute value
    assert unit.min() >= -overshoot - 1e-5 and unit.max() <= 1 + overshoot + 1e-5
    assert 0.3 < unit.mean() < 0.7
    # Order of ops as in W: resize in [-1, 1], then to [0, 1], then mean/std.
    resized = F.interpolate(images, size=(CFG.image_size,) * 2, mode="bicubic", align_corners=False)
    ref = (resized * 0.5 + 0.5 - mean) / std
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # A constant image maps to an exact constant per channel.
    const = preprocess(torch.full((1, 3, 30, 40), 0.2), CFG.image_size)
    torch.testing.assert_close(const, ((0.6 - mean) / std).expand_as(const))


def test_preprocess_non_square_no_crop():
    # 40x80 image, dark, with bright 8x8 markers in the top-left and bottom-right corners: a center crop would lose
    # both; a plain resize keeps them in the output corners.
    image = -torch.ones(1, 3, 40, 80)
    image[..., :8, :8] = 1
    image[..., -8:, -8:] = 1
    out = preprocess(image, 28)
    mean, std = torch.tensor(CLIP_MEAN).view(3), torch.tensor(CLIP_STD).view(3)
    bright, dark = (1 - mean) / std, (0 - mean) / std
    torch.testing.assert_close(out[0, :, 0, 0], bright)
    torch.testing.assert_close(out[0, :, -1, -1], bright)
    torch.testing.assert_close(out[0, :, 0, -1], dark)
    torch.testing.assert_close(out[0, :, -1, 0], dark)
    torch.testing.assert_close(out[0, :, 14, 14], dark)


def test_preprocess_rejects_bad_shape():
    with pytest.raises(ValueError, match="expected images"):
        preprocess(torch.zeros(3, 32, 32))
