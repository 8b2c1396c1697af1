"""Our DiT against diffusers' WanTransformer3DModel on identical random weights (fp32, tiny configs)."""
import pytest
import torch

from wanrt.runtime.config import get_variant
from wanrt.runtime.dit import WanDiT, apply_rope, dit_from_diffusers, rope_split, rope_tables

diffusers = pytest.importorskip("diffusers")


def diffusers_dit(cfg, seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    i2v = cfg.model_type == "i2v"
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps,
        image_dim=cfg.image_dim if i2v else None, added_kv_proj_dim=cfg.dim if i2v else None)
    with torch.no_grad():  # every parameter random, norms and biases included, so a swapped name cannot hide
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == cfg.dim else 0.0))
    return model.eval()


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
def test_dit_matches_diffusers(variant):
    cfg = get_variant(variant).dit
    ref = diffusers_dit(cfg, seed=torch.seed() % 2**31)
    ours = WanDiT(cfg)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()), strict=True)
    x = torch.randn(1, cfg.in_dim, 3, 8, 12)
    t = torch.tensor([937.0])
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    clip = torch.randn(1, cfg.image_tokens, cfg.image_dim) if cfg.model_type == "i2v" else None
    with torch.no_grad():
        want = ref(x, t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
        got = ours(x, t, context, clip)
    assert got.shape == want.shape == (1, cfg.out_dim, 3, 8, 12)
    assert max_rel_err(got, want) <= 1e-5


def rope_official(x, grid, head_dim):
    """Transcription of the official complex float64 rope_apply for one sample: x [L, H, D]."""
    def rope_params(max_len, dim, theta=10000):
        freqs = torch.outer(torch.arange(max_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
        return torch.polar(torch.ones_like(freqs), freqs)
    dt, dh, dw = rope_split(head_dim)
    freqs = torch.cat([rope_params(1024, dt), rope_params(1024, dh), rope_params(1024, dw)], dim=1)
    c = head_dim // 2
    f, h, w = grid
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat([ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(x.shape[0], x.shape[1], -1, 2))
    return torch.view_as_real(xc * table).flatten(2).float()


@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
def test_token_chunks_give_the_same_velocity(variant):
    cfg = get_variant(variant).dit
    model = WanDiT(cfg).eval()
    x, t = torch.randn(1, cfg.in_dim, 3, 6, 10), torch.tensor([321.0])
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    clip = torch.randn(1, cfg.image_tokens, cfg.image_dim) if cfg.model_type == "i2v" else None
    with torch.no_grad():
        ctx, time = model.embed_context(context, clip), model.embed_time(t)
        whole = model.denoise(x, time, ctx)
        for chunk in (1, 7, 16, 44):  # 45 tokens: ragged last chunks too
            torch.testing.assert_close(model.denoise(x, time, ctx, chunk=chunk), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim,grid", [(128, (3, 5, 7)), (16, (2, 4, 6))])
def test_rope_matches_official_float64(head_dim, grid):
    x = torch.randn(1, grid[0] * grid[1] * grid[2], 2, head_dim)
    got = apply_rope(x, *rope_tables(head_dim, grid))
    want = rope_official(x[0], grid, head_dim)
    assert max_rel_err(got[0], want) <= 1e-6


def test_block_compiles_without_graph_breaks():
    cfg = get_variant("tiny-t2v").dit
    model = WanDiT(cfg)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4)
    with torch.no_grad():
        want = model(x, torch.tensor([500.0]), torch.randn(1, cfg.text_len, cfg.text_dim))
    from wanrt.runtime.dit import block_forward
    torch._dynamo.reset()
    compiled = torch.compile(block_forward, fullgraph=True, backend="eager")
    ctx = torch.randn(1, cfg.text_len, cfg.dim)
    xs = torch.randn(1, 8, cfg.dim)
    e0 = torch.randn(1, 6, cfg.dim)
    rope = rope_tables(cfg.head_dim, (2, 2, 2))
    with torch.no_grad():
        a = compiled(xs.clone(), e0, ctx, rope, model.block_weights(0), cfg)
        b = block_forward(xs.clone(), e0, ctx, rope, model.block_weights(0), cfg)
    torch.testing.assert_close(a, b)
    assert want.shape == x.shape


def test_gradients_flow_through_the_block_for_training():
    """The residual stream is updated in place; under autograd the block copies it first, so backward works and
    matches a finite difference (the demo model is trained through this code)."""
    from wanrt.kernels.dispatch import reference_only

    cfg = get_variant("tiny-t2v").dit
    torch.manual_seed(0)
    model = WanDiT(cfg)
    x, t = torch.randn(2, cfg.in_dim, 2, 4, 4), torch.tensor([300.0, 700.0])
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)
    p = dict(model.named_parameters())["blocks.0.ffn.0.weight"]
    with reference_only():
        (model(x, t, ctx) ** 2).mean().backward()
        eps = 1e-2
        with torch.no_grad():
            p[3, 5] += eps
            up = (model(x, t, ctx) ** 2).mean()
            p[3, 5] -= 2 * eps
            down = (model(x, t, ctx) ** 2).mean()
    assert abs(p.grad[3, 5].item() - (up - down).item() / (2 * eps)) < 0.02 * abs(p.grad[3, 5].item()) + 1e-7
