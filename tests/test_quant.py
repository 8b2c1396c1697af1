"""Per-row quantization (Triton kernel, interpreted on the CPU, against its reference and against error bounds),
the scheme table, block quantization, fallbacks and the accuracy of each scheme's linear."""
import warnings

import pytest
import torch

from wanrt.kernels import quantize
from wanrt.kernels.quantize import (QMAX, quantize_rows, quantize_rows_reference, quantize_rows_triton,
                                    quantize_weight)
from wanrt.quant import formats
from wanrt.quant.formats import (QUANTIZED_LINEARS, SCHEMES, dequantize_block, quantize_block,
                                 quantize_linear_weight, resolve_scheme, scheme_supported)
from wanrt.quant.linear import linear_error_report, quantized_linear, relative_error

DTYPES = [torch.float8_e4m3fn, torch.int8]


def rows(shape, dtype=torch.float32) -> torch.Tensor:
    """Random rows with magnitudes over four decades, one all-zero row and one with a lone outlier."""
    x = torch.randn(shape) * torch.logspace(-2, 2, shape[0])[:, None]
    x[1] = 0
    x[2, 3] = 1e3
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, block_k", [((33, 96), None), ((9, 300), None), ((9, 300), 64)])
def test_triton_quantize_bit_exact(dtype, x_dtype, shape, block_k):
    """Kernel == reference, bit for bit, in one pass and in the two-pass (K > block) form."""
    x = rows(shape, x_dtype)
    q, s = quantize_rows_triton(x, dtype, block_k=block_k)
    qr, sr = quantize_rows_reference(x, dtype)
    assert torch.equal(s, sr) and same_bits(q, qr)


def test_triton_fp8_rounding_ties_and_subnormals():
    """Every e4m3 value, every midpoint between neighbours (ties to even) and its fp32 neighbours: scale is exactly
    1 (the row max is 448), so the kernel's rounding is checked directly against torch's conversion."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([-0.0, 448.0])])[None]
    q, s = quantize_rows_triton(x, torch.float8_e4m3fn)
    qr, _ = quantize_rows_reference(x, torch.float8_e4m3fn)
    assert s.item() == 1.0 and same_bits(q, qr)


def test_triton_int8_rounds_half_to_even():
    x = torch.cat([torch.arange(-126, 127) + 0.5, torch.tensor([127.0])])[None]  # scale exactly 1
    q, s = quantize_rows_triton(x, torch.int8)
    assert s.item() == 1.0 and torch.equal(q, torch.round(x).to(torch.int8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_bounds(dtype):
    """x - q * s within half a quantization step: s / 2 for int8; for e4m3, 2^-4 relative (3 mantissa bits) or half
    the subnormal spacing 2^-9 s. Zero rows: finite scale, zero q. Leading batch dims keep their shape."""
    x = rows((16, 256))
    q, s = quantize_rows_reference(x.view(4, 4, 256), dtype)
    assert q.shape == (4, 4, 256) and s.shape == (4, 4) and s.dtype == torch.float32
    q, s = q.view(16, 256), s.view(16)
    assert torch.isfinite(s).all() and (s > 0).all() and (q[1].float() == 0).all()
    err = (x - q.float() * s[:, None]).abs()
    if dtype == torch.int8:
        bound = s[:, None] / 2
    else:
        bound = torch.maximum(x.abs() * 2**-4, s[:, None] * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (q.float().abs().amax(1)[s > 0] <= QMAX[dtype]).all()
    # on Gaussian rows the whole-tensor relative error is about 2.5e-2 (fp8) and 7e-3 (int8)
    g = torch.randn(64, 1024)
    gq, gs = quantize_rows_reference(g, dtype)
    assert relative_error(gq.float() * gs[:, None], g) < (0.035 if dtype == torch.float8_e4m3fn else 0.01)


def test_quantize_weight_per_channel():
    w = torch.randn(24, 40) * torch.logspace(-3, 0, 24)[:, None]
    q, s = quantize_weight(w, torch.int8)
    assert q.shape == w.shape and s.shape == (24,)
    assert torch.allclose(q.float().abs().amax(1), torch.full((24,), 127.0))
    assert relative_error(q.float() * s[:, None], w) < 0.01


def test_quantize_rows_dispatch_on_cpu(monkeypatch):
    monkeypatch.setattr(quantize, "quantize_rows_triton", lambda *a, **k: pytest.fail("Triton on the CPU"))
    x = torch.randn(5, 64)
    q, s = quantize_rows(x, torch.int8)
    assert torch.equal(q, quantize_rows_reference(x, torch.int8)[0])


# ----------------------------------------------------------------------------------------------------- formats
def block_weights(dim=64, ffn=96, i2v=True) -> dict[str, torch.Tensor]:
    """A block's weights under the official names (tiny widths)."""
    w = {"modulation": torch.randn(1, 6, dim), "norm3.weight": torch.randn(dim), "norm3.bias": torch.randn(dim)}
    for attn in ("self_attn", "cross_attn"):
        for p in ("q", "k", "v", "o") + (("k_img", "v_img") if attn == "cross_attn" and i2v else ()):
            w[f"{attn}.{p}.weight"] = torch.randn(dim, dim).to(torch.bfloat16)
            w[f"{attn}.{p}.bias"] = torch.randn(dim).to(torch.bfloat16)
        w[f"{attn}.norm_q.weight"], w[f"{attn}.norm_k.weight"] = torch.randn(dim), torch.randn(dim)
    w["ffn.0.weight"], w["ffn.0.bias"] = torch.randn(ffn, dim).to(torch.bfloat16), torch.randn(ffn)
    w["ffn.2.weight"], w["ffn.2.bias"] = torch.randn(dim, ffn).to(torch.bfloat16), torch.randn(dim)
    return w


def test_scheme_table():
    assert set(formats.SCHEME_INFO) == set(SCHEMES)
    info = formats.SCHEME_INFO
    assert info["fp8"].weight_dtype == info["fp8"].activation_dtype == torch.float8_e4m3fn
    assert info["int8"].activation_dtype == torch.int8 and info["w8a16"].activation_dtype is None
    assert info["fp8"].min_capability == (8, 9) and info["w8a16"].min_capability == (8, 0)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "w8a16"])
@pytest.mark.parametrize("i2v", [False, True])
def test_quantize_block(scheme, i2v):
    w = block_weights(i2v=i2v)
    q = quantize_block(w, scheme)
    linears = [n for n in QUANTIZED_LINEARS if f"{n}.weight" in w]
    assert len(linears) == (12 if i2v else 10)
    assert set(q) == set(w) | {f"{n}.weight_scale" for n in linears}
    for key, t in w.items():  # everything but the linear weights is the very same tensor
        if not any(key == f"{n}.weight" for n in linears):
            assert q[key] is t, key
    dtype = formats.SCHEME_INFO[scheme].weight_dtype
    for n in linears:
        assert q[f"{n}.weight"].dtype == dtype and q[f"{n}.weight"].shape == w[f"{n}.weight"].shape
        assert q[f"{n}.weight_scale"].dtype == torch.float32
        assert q[f"{n}.weight_scale"].shape == (w[f"{n}.weight"].shape[0],)
    assert w["ffn.0.weight"].dtype == torch.bfloat16  # the input dict is untouched
    back = dequantize_block(q)
    assert set(back) == set(w)
    assert relative_error(back["ffn.0.weight"], w["ffn.0.weight"]) < (0.04 if scheme == "fp8" else 0.01)
    assert quantize_block(w, "bf16") == w
    with pytest.raises(ValueError):
        quantize_block(q, scheme)


def test_scheme_supported():
    assert scheme_supported("fp8", (9, 0))[0] and scheme_supported("fp8", (8, 9))[0]
    ok, why = scheme_supported("fp8", (8, 0))
    assert not ok and "sm_89" in why and "sm_80" in why
    assert scheme_supported("w8a16", (8, 0))[0] and not scheme_supported("int8", (7, 5))[0]
    assert all(scheme_supported(s, None)[0] for s in SCHEMES)  # CPU: references
    assert scheme_supported("bf16", (7, 0))[0]


def test_resolve_scheme_falls_back_with_a_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(formats, "has_triton", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"'fp8' cannot run here.*sm_80.*Falling back to 'w8a16'"):
        assert resolve_scheme("fp8", "cuda") == "w8a16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_scheme("int8", "cuda") == "int8"
        assert resolve_scheme("fp8", "cpu") == "fp8"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.warns(RuntimeWarning, match="Falling back to 'bf16'"):
        assert resolve_scheme("int8", "cuda") == "bf16"
    with pytest.raises(ValueError):
        resolve_scheme("fp4", "cpu")


# ------------------------------------------------------------------------------------------------------ linears
@pytest.mark.parametrize("scheme, low, high", [("fp8", 0.02, 0.045), ("int8", 0.004, 0.015),
                                               ("w8a16", 0.002, 0.011)])
def test_error_report_ranges(scheme, low, high):
    """Per-linear relative error against bf16 F.linear on Gaussian data with nn.Linear-scaled weights."""
    K, N = 512, 256
    weight, bias, x = torch.randn(N, K) / K**0.5, torch.randn(N) * 0.02, torch.randn(2, 96, K)
    for gelu in (False, True):
        err = linear_error_report(weight, bias, x, scheme, gelu)
        assert low <= err <= high, (scheme, gelu, err)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_prequantized_activations(scheme):
    """A producer that quantized x itself passes (q, x_scale): same result as letting the linear quantize."""
    K, N = 128, 64
    w = quantize_linear_weight(torch.randn(N, K) / K**0.5, scheme)
    x = torch.randn(3, 10, K).to(torch.bfloat16)
    xq, xs = quantize_rows(x, formats.SCHEME_INFO[scheme].activation_dtype)
    y = quantized_linear(x, w["weight"], w["weight_scale"], None, scheme, gelu=True)
    assert y.shape == (3, 10, N) and y.dtype == torch.bfloat16
    assert torch.equal(y, quantized_linear(xq, w["weight"], w["weight_scale"], None, scheme, True, x_scale=xs))
    with pytest.raises(TypeError):
        quantized_linear(x, w["weight"], w["weight_scale"], None, scheme, x_scale=xs)


def test_nf4_is_bitsandbytes_packing_and_its_linear_its_dequantized_gemm():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb

    from wanrt.quant import nf4
    from wanrt.quant.linear import quantized_linear

    torch.manual_seed(0)
    w, x, b = torch.randn(96, 192), torch.randn(5, 192), torch.randn(96)
    q = quantize_linear_weight(w, "nf4")
    assert q["weight"].shape == (96, 96) and q["weight"].dtype == torch.uint8 and q["weight_scale"].shape == (96, 3)
    packed, state = bnb.quantize_4bit(w, blocksize=nf4.BLOCK, quant_type="nf4")
    assert torch.equal(q["weight"].reshape(-1, 1), packed)  # rows whole: the [N, K/2] view is bitsandbytes' layout
    dense = bnb.dequantize_4bit(packed, state)
    assert torch.equal(nf4.dequantize(q["weight"], q["weight_scale"], torch.float32), dense)
    y = quantized_linear(x, q["weight"], q["weight_scale"], b, "nf4", gelu=True)
    assert torch.allclose(y, torch.nn.functional.gelu(x @ dense.T + b, approximate="tanh"), atol=1e-5)
    err = float((dense - w).norm() / w.norm())
    assert 0.05 < err < 0.12  # 4-bit codes: about 9% of a Gaussian weight, far from int8's ~1%
    with pytest.raises(ValueError, match="multiples of 64"):
        quantize_linear_weight(torch.randn(8, 96), "nf4")
