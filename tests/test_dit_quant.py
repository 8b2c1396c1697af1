"""The DiT with quantized block linears (quant/formats.py schemes) or a quantized attention mode against its
unquantized self, on the CPU references: batch 2, token chunks, T2V and I2V. Bounds fit each format's rounding (fp8
e4m3: 3 mantissa bits)."""
import dataclasses

import pytest
import torch

from wanrt.kernels import attention as A
from wanrt.quant.formats import quantize_block
from wanrt.runtime import dit
from wanrt.runtime.config import get_variant
from wanrt.runtime.dit import WanDiT


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def velocity(model, blocks, cfg, inputs, chunk):
    x, t, ctx, clip = inputs
    with torch.no_grad():
        model.cfg = cfg
        return model.denoise(x, model.embed_time(t), model.embed_context(ctx, clip), lambda i: blocks[i], chunk)


@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
@pytest.mark.parametrize("scheme, bound", [("fp8", 0.08), ("int8", 0.02), ("w8a16", 0.012)])
def test_quantized_schemes_stay_close_to_the_unquantized_model(variant, scheme, bound):
    cfg = get_variant(variant).dit
    model = WanDiT(cfg).eval()
    blocks = [model.block_weights(i) for i in range(cfg.num_layers)]
    inputs = (torch.randn(2, cfg.in_dim, 3, 8, 12), torch.tensor([937.0, 500.0]),
              torch.randn(2, cfg.text_len, cfg.text_dim),
              torch.randn(2, cfg.image_tokens, cfg.image_dim) if cfg.model_type == "i2v" else None)
    want = velocity(model, blocks, cfg, inputs, None)
    qcfg = dataclasses.replace(cfg, quant=scheme)
    qblocks = [quantize_block({k: v.detach() for k, v in b.items()}, scheme) for b in blocks]
    got = velocity(model, qblocks, qcfg, inputs, 7)  # chunked too: 7 tokens at a time
    err = rel_err(got, want)
    print(f"{variant} {scheme}: velocity relative error {err:.4f}")
    assert got.isfinite().all() and 0 < err < bound


def test_weights_that_do_not_match_the_scheme_are_refused():
    cfg = get_variant("tiny-t2v").dit
    model = WanDiT(cfg).eval()
    blocks = [model.block_weights(i) for i in range(cfg.num_layers)]
    inputs = (torch.randn(1, cfg.in_dim, 3, 8, 12), torch.tensor([937.0]), torch.randn(1, cfg.text_len, cfg.text_dim),
              None)
    with pytest.raises(ValueError, match="do not match quant='fp8'"):
        velocity(model, blocks, dataclasses.replace(cfg, quant="fp8"), inputs, None)
    with pytest.raises(ValueError, match="quant must be one of"):
        dataclasses.replace(cfg, quant="fp4")


@pytest.mark.parametrize("mode", ["fp8", "int8_fp8pv"])
def test_kernel_attention_takes_the_query_quantized_by_its_norm(monkeypatch, mode):
    """A kernel attention mode's plumbing, run on the CPU: the self-attention query of every token chunk comes from
    qk_norm_rope already quantized (a QuantizedQ, so the attention skips its pass over Q), and the block stays close
    to the SDPA block. `attention` would take SDPA off CUDA, so the test stands in what it runs on a GPU (where it
    runs on the GPU's kernels)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dataclasses.replace(get_variant("tiny-t2v").dit, dim=128, num_heads=2)  # head_dim 64: a kernel's size
    torch.manual_seed(torch.seed() % 2**31)
    w = {k: v.to(device, torch.bfloat16) for k, v in WanDiT(cfg).block_weights(0).items()}  # the kernels take bf16 v
    xs, e0 = torch.randn(1, 40, cfg.dim, device=device), torch.randn(1, 6, cfg.dim, device=device) * 0.1
    ctx = torch.randn(1, cfg.text_len, cfg.dim, device=device)
    rope = tuple(t.to(device) for t in dit.rope_tables(cfg.head_dim, (2, 4, 5)))
    with torch.no_grad():
        want = dit.block_forward(xs.clone(), e0, ctx, rope, w, cfg) - xs
    queries = []

    def kernel_attention(q, k, v, mode="sdpa"):
        if mode == "sdpa":
            return A.attention_reference(q, k, v)
        queries.append(q)
        return A.attention_quantized(q, k, v, mode, A.AttnConfig(32, 32, 4, 2))

    monkeypatch.setattr(dit, "quantizes_query", lambda m, x: m != "sdpa")
    monkeypatch.setattr(dit, "attention", kernel_attention)
    with torch.no_grad():
        got = dit.block_forward(xs.clone(), e0, ctx, rope, w, dataclasses.replace(cfg, attention=mode), chunk=16) - xs
    assert len(queries) == 3 and all(isinstance(q, A.QuantizedQ) for q in queries)
    assert [q.q.shape for q in queries] == [(1, 16, 2, 64), (1, 16, 2, 64), (1, 8, 2, 64)]
    assert all(q.q.dtype == A.QK_DTYPE[mode] and q.scale.shape == q.q.shape[:3] for q in queries)
    assert rel_err(got, want) < 0.02  # measured 0.005-0.008
