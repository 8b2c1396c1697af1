"""The DiT with quantized block linears (quant/formats.py schemes) against its unquantized self, on the CPU
references: batch 2, token chunks, T2V and I2V. Bounds fit each format's rounding (fp8 e4m3: 3 mantissa bits)."""
import dataclasses

import pytest
import torch

from wanrt.quant.formats import quantize_block
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
