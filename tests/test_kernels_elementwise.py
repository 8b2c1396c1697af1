"""The row kernels (norm_modulate, qk_norm_rope) against their PyTorch references, on fresh random inputs each run.

Without a GPU the Triton launchers run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small. Widths are
not powers of two (dim 96, heads of 48) so the masked tail of every block is exercised.

Tolerances. fp32 outputs: the kernels sum in another order and use rsqrt, a few fp32 ulps apart: 1e-5 relative and
absolute. bf16 outputs: both sides round the same fp32 value half to even, so they differ only where those fp32 values
straddle a rounding boundary, by one bf16 ulp <= 2^-7 of the value; and at most 1% of elements may differ at all (a
truncating or otherwise wrong rounding differs in about half of them). Quantised outputs: scales within 1e-5 (max |h|
of two fp32 h's a few ulps apart); codes within one step, at most 1% differing; dequantised q * s within the format's
rounding error of the fp32 reference h: s / 2 for int8, 2^-4 relative (3 mantissa bits) plus half the subnormal step
2^-9 * s for fp8 e4m3. qk_norm_rope of bf16 y rounds twice (F.rms_norm returns bf16): where the two sides' rstd,
a few fp32 ulps apart, straddle that intermediate rounding (rare), a value moves by one bf16 ulp of itself or, through
RoPE, of its pair partner: up to 2^-6 of the row's max |value| ("upstream"), added to every bound.
"""
import pytest
import torch

pytest.importorskip("triton")

from wanrt.kernels import norm_modulate as nm  # noqa: E402
from wanrt.kernels import qk_norm_rope as qr  # noqa: E402
from wanrt.runtime.dit import apply_rope, layer_norm, modulate, rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
B, L, DIM, HEADS = 2, 23, 96, 2  # head_dim 48: neither dim nor head_dim is a power of two
FP8, INT8 = torch.float8_e4m3fn, torch.int8
OUT_DTYPES = [torch.float32, torch.bfloat16, FP8, INT8]


def token_slice(length):
    """The token chunk s of x[:, s] in a longer sequence."""
    return slice(5, 5 + length)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_within(a, b, bound, what):
    """|a - b| <= bound everywhere (bound broadcasts); a NaN in a fails. Reports the worst element."""
    excess = ((a - b).abs() - bound).nan_to_num(nan=float("inf")).flatten()
    i = excess.argmax()
    assert excess[i] <= 0, f"{what}: {a.flatten()[i]} vs {b.flatten()[i]} at flat index {i}, {excess[i]} over bound"


def assert_matches(out, ref, ref_fp32=None, upstream=0.0):
    """out, ref: the kernel's and the reference's results in one dtype, or (q, scale) pairs; ref_fp32: the
    reference's unrounded fp32 result, bounding the quantisation error (quantised outputs only). upstream: an error
    both sides may carry before the last rounding, relative to the token row's max |value| (see the module doc)."""
    if not isinstance(ref, tuple):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        out_f, ref_f = out.float().flatten(2), ref.float().flatten(2)
        slack = upstream * ref_f.abs().amax(-1, keepdim=True)
        tol = 1e-5 if ref.dtype == torch.float32 else 2**-7
        assert_within(out_f, ref_f, tol * ref_f.abs() + slack + 1e-5, f"{ref.dtype} output")
        if ref.dtype != torch.float32:
            assert (out_f != ref_f).float().mean() <= 0.01
        return
    (q, s), (q_ref, s_ref) = out, ref
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and s.shape == s_ref.shape == q.shape[:2]
    assert s.dtype == torch.float32 and (s > 0).all()
    assert_within(s, s_ref, (1e-5 + upstream) * s_ref, "token scales")
    int8 = q.dtype == INT8
    qmax = nm.QMAX[q.dtype]
    q, q_ref, h, s = q.float().flatten(2), q_ref.float().flatten(2), ref_fp32.flatten(2), s[..., None]
    assert (q != q_ref).float().mean() <= 0.01
    if int8:  # one step, one more where upstream errors move a value
        assert_within(q, q_ref, 1 + upstream * qmax, "int8 codes")
        assert_within(q * s, h, (0.5 * (1 + 1e-4) + upstream * qmax) * s + 1e-6, "int8 dequantised")
    else:  # one fp8 step: 2^-3 relative, 2^-9 among subnormals
        assert_within(q, q_ref, 2**-3 * q_ref.abs() + 2**-9 + upstream * qmax, "fp8 codes")
        assert_within(q * s, h, 2**-4 * h.abs() + (2**-10 * (1 + 1e-4) + upstream * qmax) * s + 1e-6,
                      "fp8 dequantised")


# ------------------------------------------------------------------------------------------------- norm_modulate
# name: (x dtype, x is a token slice, shift/scale, weight/bias, residual dtype or None, gate)
NORM_CASES = {
    "plain": (torch.float32, False, False, False, None, False),
    "modulate": (torch.float32, True, True, False, None, False),  # norm1 / k, v, q path
    "norm3_gated": (torch.float32, True, False, True, torch.bfloat16, True),  # x += y * gate_sa; norm3
    "ffn": (torch.float32, True, True, False, torch.float32, False),  # x += cross-attn y; norm2, modulate
    "everything": (torch.float32, True, True, True, torch.bfloat16, True),
    "bf16_x": (torch.bfloat16, False, True, False, None, False),
}


def norm_inputs(case, dim=DIM, length=L):
    x_dtype, sliced, mod, affine, res_dtype, gated = NORM_CASES[case]
    s = token_slice(length)
    x_big = randn(B, length + 13, dim, scale=2.0) + randn(B, length + 13, 1)  # rows with nonzero means
    x_big[0, s.start] = 3.0  # a constant row: LayerNorm gives 0 exactly, so quantisation meets amax 0
    x_big = x_big.to(x_dtype)
    if not sliced:
        x_big, s = x_big[:, s].contiguous(), slice(None)
    kw = {}
    if mod:
        e = randn(B, 6, dim, scale=0.5)  # the block's chunk(6) views: batch stride 6 * dim
        kw.update(shift=e[:, 0:1], scale=e[:, 1:2])
    if affine:
        kw.update(weight=1 + randn(dim, scale=0.2), bias=randn(dim, scale=0.2))
    if res_dtype is not None:
        kw.update(residual=randn(B, length, dim, dtype=res_dtype))
        if gated:
            kw.update(gate=randn(B, 6, dim)[:, 2:3])
    return x_big, s, kw


def run_norm(fn, x_big, s, kw, out_dtype):
    x_big = x_big.clone()
    return fn(x_big[:, s], EPS, **kw, out_dtype=out_dtype), x_big


@pytest.mark.parametrize("case", NORM_CASES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_norm_modulate_matches_reference(case, out_dtype):
    x_big, s, kw = norm_inputs(case)
    out, x_tri = run_norm(nm.norm_modulate_triton, x_big, s, kw, out_dtype)
    ref, x_ref = run_norm(nm.norm_modulate_reference, x_big, s, kw, out_dtype)
    ref_fp32, _ = run_norm(nm.norm_modulate_reference, x_big, s, kw, torch.float32)
    assert_matches(out, ref, ref_fp32)
    # The residual update, in place through the slice: the fma in the kernel rounds once, as torch's addcmul_.
    tol = 0 if DEVICE == "cpu" else 1e-6
    torch.testing.assert_close(x_tri, x_ref, rtol=tol, atol=tol)
    if "residual" not in kw:
        assert x_tri.equal(x_big)
    else:  # the slice updated, tokens outside it untouched
        outside = torch.ones(x_big.shape[1], dtype=torch.bool, device=x_big.device)
        outside[s] = False
        assert x_tri[:, outside].equal(x_big[:, outside])
        assert not x_tri[:, s].equal(x_big[:, s])


def test_norm_modulate_wide_row():
    """A 1.3B-wide row (1536: block 2048, 8 warps) with every option, bf16 out."""
    x_big, s, kw = norm_inputs("everything", dim=1536, length=3)
    out, x_tri = run_norm(nm.norm_modulate_triton, x_big, s, kw, torch.bfloat16)
    ref, x_ref = run_norm(nm.norm_modulate_reference, x_big, s, kw, torch.bfloat16)
    assert_matches(out, ref)
    torch.testing.assert_close(x_tri, x_ref, rtol=1e-6, atol=1e-6)


def test_norm_modulate_reference_is_todays_block():
    """The reference is dit.py's `modulate` / `layer_norm` bit for bit (fp32 residual stream, bf16 GEMM input)."""
    x = randn(B, L, DIM)
    shift, scale = randn(B, 2, DIM).chunk(2, dim=1)
    w, b = randn(DIM), randn(DIM)
    y, gate = randn(B, L, DIM, dtype=torch.bfloat16), randn(B, 1, DIM)
    assert nm.norm_modulate_reference(x, EPS, shift, scale).equal(modulate(x, shift, scale, EPS).bfloat16())
    expected_x = x + y.float() * gate
    h = nm.norm_modulate_reference(x, EPS, weight=w, bias=b, residual=y, gate=gate, out_dtype=torch.float32)
    torch.testing.assert_close(x, expected_x, rtol=1e-6, atol=1e-6)
    assert h.equal(layer_norm(x, EPS, w, b))


def test_quantize_rows_reference():
    h = torch.randn(3, 5, 64) * 4
    h[0, 0] = 0  # all-zero row: finite scale, zero codes
    for dtype, qmax in nm.QMAX.items():
        q, s = nm.quantize_rows_reference(h, dtype)
        assert q.dtype == dtype and s.shape == (3, 5) and s.dtype == torch.float32
        assert q[0, 0].float().abs().max() == 0 and s[0, 0] > 0
        assert q.float().abs().amax(-1)[1:].eq(qmax).all()  # each nonzero row reaches ±qmax
    assert nm.quantize_rows_reference(torch.tensor([[0.5, 1.5, 2.5, 127.0]]), INT8)[0].tolist() == [[0, 2, 2, 127]]


def test_norm_modulate_dispatches_to_reference_on_cpu(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("triton launched for CPU tensors")

    monkeypatch.setattr(nm, "norm_modulate_triton", no_triton)
    x, shift, scale = torch.randn(B, L, DIM), torch.randn(B, 1, DIM), torch.randn(B, 1, DIM)
    for out_dtype in (torch.bfloat16, FP8):
        out = nm.norm_modulate(x, EPS, shift, scale, out_dtype=out_dtype)
        ref = nm.norm_modulate_reference(x, EPS, shift, scale, out_dtype=out_dtype)
        assert all(a.equal(b) for a, b in zip(out, ref)) if isinstance(ref, tuple) else out.equal(ref)


# -------------------------------------------------------------------------------------------------- qk_norm_rope
QK_UPSTREAM = {torch.float32: 0.0, torch.bfloat16: 2**-6}  # the flipped intermediate rounding of bf16 y


def qk_inputs(y_dtype, rope, dim=DIM, heads=HEADS, length=L):
    s = token_slice(length)
    y = randn(B, length + 13, dim, dtype=y_dtype, scale=3.0)[:, s]  # a strided view: gaps between batches
    weight = 1 + randn(dim, scale=0.2)
    if not rope:
        return y, weight, None, None
    angles = torch.rand(length + 13, dim // heads // 2, device=DEVICE) * 6.3
    return y, weight, angles.cos()[s], angles.sin()[s]  # the caller's cos[s], sin[s]


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_qk_norm_rope_matches_reference(out_dtype, y_dtype, rope):
    y, weight, cos, sin = qk_inputs(y_dtype, rope)
    out = qr.qk_norm_rope_triton(y, weight, EPS, HEADS, cos, sin, out_dtype)
    ref = qr.qk_norm_rope_reference(y, weight, EPS, HEADS, cos, sin, out_dtype)
    ref_fp32 = qr.qk_norm_rope_reference(y, weight, EPS, HEADS, cos, sin, torch.float32)
    assert (out[0] if isinstance(out, tuple) else out).shape == (B, L, HEADS, DIM // HEADS)
    assert_matches(out, ref, ref_fp32, upstream=QK_UPSTREAM[y_dtype])


def test_qk_norm_rope_wan_head():
    """Wan's head_dim 128 (64 rotary pairs per head), bf16 in and out."""
    y, weight, cos, sin = qk_inputs(torch.bfloat16, True, dim=256, heads=2, length=4)
    out = qr.qk_norm_rope_triton(y, weight, EPS, 2, cos, sin)
    ref = qr.qk_norm_rope_reference(y, weight, EPS, 2, cos, sin)
    assert_matches(out, ref, upstream=QK_UPSTREAM[torch.bfloat16])


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_dtype", [FP8, INT8], ids=str)
def test_qk_norm_rope_gives_the_attention_its_query(out_dtype, y_dtype):
    """With for_attention: c·out quantized per token and head, [B, L, H, D] with scales [B, L, H]. Three heads of
    32 (the kernel holds four, one masked off)."""
    from wanrt.kernels import attention as A

    y, weight, cos, sin = qk_inputs(y_dtype, True, dim=96, heads=3)
    got = qr.qk_norm_rope_triton(y, weight, EPS, 3, cos, sin, out_dtype, for_attention=True)
    ref = qr.qk_norm_rope_reference(y, weight, EPS, 3, cos, sin, out_dtype, for_attention=True)
    assert isinstance(got, A.QuantizedQ) and got.q.shape == (B, L, 3, 32) and got.scale.shape == (B, L, 3)
    ref_fp32 = qr.qk_norm_rope_reference(y, weight, EPS, 3, cos, sin, torch.float32) * A.query_multiplier(32)
    # each (token, head) is a row of its own: [B, L * H, D] and scales [B, L * H]
    rows = [(x.reshape(B, -1, 32), s.reshape(B, -1)) for x, s in (got, ref)]
    assert_matches(*rows, ref_fp32.reshape(B, -1, 32), upstream=QK_UPSTREAM[y_dtype])
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        qr.qk_norm_rope_triton(y, weight, EPS, 2, cos, sin, out_dtype, for_attention=True)  # heads of 48
    with pytest.raises(ValueError, match="fp8 e4m3 or int8"):
        qr.qk_norm_rope_triton(y, weight, EPS, 3, cos, sin, torch.bfloat16, for_attention=True)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_norm_rope_reference_is_todays_qk(y_dtype):
    """The reference is dit.py's `rms_norm` then `apply_rope` bit for bit."""
    y, weight, cos, sin = qk_inputs(y_dtype, True)
    n = rms_norm(y, weight, EPS).unflatten(-1, (HEADS, -1))
    assert qr.qk_norm_rope_reference(y, weight, EPS, HEADS, cos, sin).equal(apply_rope(n, cos, sin, torch.bfloat16))
    assert qr.qk_norm_rope_reference(y, weight, EPS, HEADS, out_dtype=torch.float32).equal(n)


def test_qk_norm_rope_dispatches_to_reference_on_cpu(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("triton launched for CPU tensors")

    monkeypatch.setattr(qr, "qk_norm_rope_triton", no_triton)
    y, weight = torch.randn(B, L, DIM, dtype=torch.bfloat16), torch.randn(DIM)
    cos, sin = torch.randn(L, DIM // HEADS // 2), torch.randn(L, DIM // HEADS // 2)
    assert qr.qk_norm_rope(y, weight, EPS, HEADS, cos, sin).equal(qr.qk_norm_rope_reference(y, weight, EPS, HEADS,
                                                                                              cos, sin))
