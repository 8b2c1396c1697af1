"""Quantized attention (kernels/attention.py): the Triton kernels run on the CPU under TRITON_INTERPRET=1 (conftest sets
it when there is no CUDA). Fresh random inputs every run (no fixed seed); small shapes with query and key tails, small
tiles (BLOCK_M = BLOCK_N = 32) and 32-token K scale blocks so that every path (full key blocks, tail block, several
scale blocks per head, query rows past Lq) runs in a few seconds.

Tolerances, as ||out - ref|| / ||ref|| against fp32 SDPA on the same bf16 inputs. e4m3 keeps 3 mantissa bits: every
rounding is off by up to 2^-4 relative (about 2.5% rms), and the errors of q, k, P and v add in quadrature; int8 with a
scale per token (Q) or block (K) is about 3x finer on Gaussian inputs. Measured over 12 runs with Q's per-token scales
(D = 64 and 128, Lq = 70, Lk = 45): fp8 0.043-0.050, int8_fp8pv 0.031-0.035, fp8_bf16pv 0.031-0.038, int8
0.009-0.011. Bounds have ~1.5x margin; cosine similarity must exceed 0.99 in every mode (measured >= 0.9988). Against
`attention_quantized_ref` (same quantized inputs, exact softmax) the kernel differs only by the rounding of P: < 0.045
with fp8 P (measured <= 0.021), < 0.01 with 16-bit P (measured ~0.002). On a CUDA machine the same tests run compiled
on the GPU (modes and TMA it lacks skipped).
"""
import dataclasses

import pytest
import torch

from wanrt.kernels import attention as A
from wanrt.runtime import dit

REL_BOUND = {"fp8": 0.08, "int8_fp8pv": 0.06, "fp8_bf16pv": 0.06, "int8": 0.025}
REF_BOUND = {"fp8": 0.045, "int8_fp8pv": 0.045, "fp8_bf16pv": 0.01, "int8": 0.01}
QUANT_MODES = tuple(REL_BOUND)
SMALL = A.AttnConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
BLOCK = 32  # tokens per Q/K scale in these tests (the runtime uses 128)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unsupported(mode: str, tma: bool = False) -> None:
    """On a GPU, skip what it cannot run; the interpreter runs everything."""
    cap = torch.cuda.get_device_capability() if DEVICE == "cuda" else None
    if cap is not None and (cap < A.MIN_CAPABILITY[mode] or (tma and cap < (9, 0))):
        pytest.skip(f"{mode}{' with TMA' if tma else ''} needs a newer GPU than {cap}")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    a, b = got.double().flatten(), want.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def worst(got: torch.Tensor, want: torch.Tensor, n: int = 5) -> str:
    """The n largest |got - want| with their [b, token, channel] index, plus the NaN count, for failure messages."""
    diff = (got.double() - want.double()).abs()
    nan = int(torch.isnan(got).sum())
    top = diff.nan_to_num(float("inf")).flatten().topk(min(n, diff.numel()))
    rows = [f"{tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape))}: got {got.flatten()[i].item():.4g} "
            f"want {want.flatten()[i].item():.4g}" for i in top.indices.tolist()]
    return f"NaN: {nan}; worst: " + "; ".join(rows)


def inputs(B: int, Lq: int, Lk: int, H: int, D: int, key_bias: float = 0.0, dtype=torch.bfloat16):
    q = torch.randn(B, Lq, H, D, device=DEVICE)
    k = torch.randn(B, Lk, H, D, device=DEVICE) + key_bias * torch.randn(D, device=DEVICE)  # per-channel key offset
    v = torch.randn(B, Lk, H, D, device=DEVICE)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check(got: torch.Tensor, q, k, v, mode: str) -> None:
    want = A.attention_reference(q.float(), k.float(), v.float())
    assert not torch.isnan(got).any(), worst(got, want)
    err, cos = rel_err(got, want), cosine(got, want)
    assert err < REL_BOUND[mode] and cos > 0.99, f"{mode}: rel {err:.4f}, cos {cos:.5f}; {worst(got, want)}"


@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_kernel_matches_sdpa(mode, D, tma):
    skip_unsupported(mode, tma)
    q, k, v = inputs(1, 70, 45, 2, D)
    out = torch.full((1, 70, 2 * D), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # every row must be written
    got = A.attention_quantized(q, k, v, mode, SMALL if not tma else A.AttnConfig(32, 32, 4, 2, tma=True), out=out,
                                block=BLOCK)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.bfloat16
    check(got, q, k, v, mode)
    want = A.attention_quantized_ref(q, k, v, mode, block=BLOCK)
    assert rel_err(got, want) < REF_BOUND[mode], worst(got, want)


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("B,Lq,Lk,cfg,block", [
    (2, 33, 20, SMALL, BLOCK),                       # keys shorter than one key block: the tail step alone
    (1, 64, 64, SMALL, BLOCK),                       # no tails at all
    (1, 150, 130, A.AttnConfig(64, 64, 4, 2), 128),  # runtime scale block, tiles smaller than it
    (1, 40, 45, SMALL, BLOCK),                       # one full key block and a tail
    (1, 40, 100, A.AttnConfig(32, 32, 4, 2, tma=True), BLOCK),  # three full blocks and a tail, through TMA
], ids=["short-keys-batch2", "no-tails", "scale-block-128", "one-full-block", "three-blocks-tma"])
@pytest.mark.parametrize("lookahead", [False, True], ids=["", "lookahead"])
def test_shapes(mode, B, Lq, Lk, cfg, block, lookahead):
    skip_unsupported(mode, cfg.tma)
    q, k, v = inputs(B, Lq, Lk, 1, 64)
    cfg = dataclasses.replace(cfg, lookahead=lookahead)
    check(A.attention_quantized(q, k, v, mode, cfg, block=block), q, k, v, mode)


def scaled_rows(q: torch.Tensor) -> torch.Tensor:
    """q with token r scaled by 2^(r % 7 - 3), 1/8 to 8: softmax rows from flat to sharp."""
    return (q.float() * 2.0 ** (torch.arange(q.shape[1], device=q.device) % 7 - 3)[None, :, None, None]).to(q.dtype)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_query_rows_of_different_magnitudes(mode):
    """Q's scales are per token: each row keeps its own precision, and a scale read for another row would show."""
    skip_unsupported(mode)
    q, k, v = inputs(1, 70, 45, 2, 64)
    q = scaled_rows(q)
    got = A.attention_quantized(q, k, v, mode, SMALL, block=BLOCK)
    want = A.attention_quantized_ref(q, k, v, mode, block=BLOCK)
    assert rel_err(got, want) < REF_BOUND[mode], worst(got, want)


def test_fp16_values_and_strided_inputs():
    """q, k, v as views of one fused projection (strided tokens), v in fp16: the output follows v's dtype."""
    qkv = torch.randn(1, 45, 3, 2, 64, device=DEVICE).half()
    q, k, v = qkv.unbind(2)
    got = A.attention_quantized(q, k, v, "int8", SMALL, block=BLOCK)
    assert got.dtype == torch.float16
    check(got, q, k, v, "int8")


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_key_offset_invariance(mode):
    """Adding one vector to every key changes nothing: smoothing removes it before quantization (keys in fp32 so the
    offset itself is exact)."""
    skip_unsupported(mode)
    q, k, v = inputs(1, 70, 45, 2, 64, dtype=torch.float32)
    v = v.bfloat16()
    base = A.attention_quantized(q, k, v, mode, SMALL, block=BLOCK)
    shifted = A.attention_quantized(q, k + 5 * torch.randn(64, device=DEVICE), v, mode, SMALL, block=BLOCK)
    assert rel_err(shifted, base) < 5e-3, worst(shifted, base)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_smoothing_keeps_accuracy_with_key_bias(mode):
    """Keys with a per-channel offset 5x their spread: with smoothing the error stays at the unbiased level; without
    it, QK quantization spends its range on the offset (where P·V is 16-bit, the QK error is what is left to see)."""
    skip_unsupported(mode)
    q, k, v = inputs(1, 70, 45, 2, 64, key_bias=5.0)
    smooth = A.attention_quantized(q, k, v, mode, SMALL, block=BLOCK)
    check(smooth, q, k, v, mode)
    if mode in ("fp8_bf16pv", "int8"):
        want = A.attention_reference(q.float(), k.float(), v.float())
        raw = A.attention_quantized(q, k, v, mode, SMALL, block=BLOCK, smooth_k=False)
        assert rel_err(raw, want) > 1.5 * rel_err(smooth, want)


@pytest.mark.parametrize("smooth_k", [True, False])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
def test_quantize_qk_matches_ref(dtype, smooth_k):
    skip_unsupported("fp8" if dtype == torch.float8_e4m3fn else "int8")
    q, k, _ = inputs(1, 70, 45, 2, 128, key_bias=2.0)
    got = A.quantize_qk(q, k, dtype, BLOCK, smooth_k)
    want = A.quantize_qk_ref(q, k, dtype, BLOCK, smooth_k)
    assert got.q_scale.shape == (1, 70, 2) and got.k_scale.shape == (1, 2, 2)  # per token and head; per block of 32
    assert not got.k[:, :, 45:].float().any(), "K's padding rows must be zero"
    for name, shape in (("q", (1, 70, 2, 128)), ("k", (1, 2, 64, 128))):
        x, y = getattr(got, name), getattr(want, name)
        assert x.shape == y.shape == shape and x.dtype == dtype
        # a GPU's torch divides by the scalar qmax as a multiplication by its inverse: within an ulp
        torch.testing.assert_close(getattr(got, f"{name}_scale"), getattr(want, f"{name}_scale"), rtol=3e-7, atol=0)
        # the interpreter matches exactly; a GPU divides approximately, which may move a rare tie by one step
        xf, yf = x.float(), y.float()
        step = 1.0 if dtype == torch.int8 else (yf.abs() / 8).clamp_min(2**-9)
        assert (xf != yf).float().mean() < 5e-3 and ((xf - yf).abs() <= step + 1e-6).all(), worst(xf, yf)
    # dequantized, the values are c·q and k - mean within half a step of the format
    dq, dk = A.dequantize_qk(got)
    c = A.LOG2E / 128**0.5
    k_s = k.float() - (k.float().mean(1, keepdim=True) if smooth_k else 0)
    for deq, exact in ((dq, q.float().transpose(1, 2) * c), (dk, k_s.transpose(1, 2))):
        assert rel_err(deq, exact) < (0.04 if dtype != torch.int8 else 0.02)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_a_query_quantized_by_its_producer_gives_the_same_attention(mode):
    """attention_quantized on a QuantizedQ (what qk_norm_rope hands the DiT's attention) runs the same kernel on the
    same codes as on the q it came from; one of another dtype or shape is refused."""
    skip_unsupported(mode)
    q, k, v = inputs(1, 70, 45, 2, 64)
    qq = A.quantize_q(q, A.QK_DTYPE[mode])
    assert qq.q.shape == (1, 70, 2, 64) and qq.scale.shape == (1, 70, 2)
    got = A.attention_quantized(qq, k, v, mode, SMALL, block=BLOCK)
    assert torch.equal(got, A.attention_quantized(q, k, v, mode, SMALL, block=BLOCK))
    other = torch.int8 if A.QK_DTYPE[mode] != torch.int8 else torch.float8_e4m3fn
    strided = qq.q.transpose(1, 2).contiguous().transpose(1, 2)
    for bad in (A.quantize_q(q, other), A.QuantizedQ(qq.q[:, :60], qq.scale), A.QuantizedQ(strided, qq.scale)):
        with pytest.raises(ValueError, match="a quantized q must be"):
            A.attention_quantized(bad, k, v, mode, SMALL, block=BLOCK)


def test_quantize_v_matches_ref():
    skip_unsupported("fp8")
    _, _, v = inputs(2, 1, 45, 2, 64)
    got, want = A.quantize_v(v, BLOCK), A.quantize_v_ref(v, BLOCK)
    assert got.v.shape == (2, 2, 64, 64) and got.v.dtype == torch.float8_e4m3fn and got.lk == 45
    assert torch.equal(got.scale, want.scale)
    assert (got.v.float() != want.v.float()).float().mean() < 5e-3
    padding = A.pv_key_order(64, got.v.device) >= 45
    assert padding.sum() == 19 and not got.v[..., padding].float().any(), "padding columns must be zero"
    assert rel_err(A.dequantize_v(got), v.float().transpose(1, 2)) < 0.04


def test_dispatch_on_cpu_is_the_reference():
    q, k, v = (x.cpu() for x in inputs(1, 20, 12, 2, 64))
    want = dit.attention(q, k, v)
    assert torch.equal(A.attention_reference(q, k, v), want)
    for mode in A.MODES:
        assert torch.equal(A.attention(q, k, v, mode), want)
        assert not A.quantizes_query(mode, q)  # so the DiT hands it 16-bit q
    with pytest.raises(ValueError, match="must be one of"):
        A.attention(q, k, v, "fp4")
    with pytest.raises(ValueError, match="a quantized q needs a kernel mode and CUDA"):
        A.attention(A.quantize_q_ref(q, torch.int8), k, v, "int8")


def test_capability_errors_name_mode_and_gpu():
    with pytest.raises(ValueError, match=r"'fp8'.*>= 8\.9.*8\.6"):
        A.check_mode("fp8", (8, 6))
    with pytest.raises(ValueError, match=r"'int8_fp8pv'.*8\.0"):
        A.check_mode("int8_fp8pv", (8, 0))
    with pytest.raises(ValueError, match=r"'int8'.*>= 8\.0.*7\.5"):
        A.check_mode("int8", (7, 5))
    A.check_mode("int8", (8, 0))
    A.check_mode("fp8", (8, 9))
    A.check_mode("fp8_bf16pv", (9, 0))
    assert A.default_config("fp8_bf16pv", 128, (9, 0)) == A.CONFIGS["sm90", "fp8_bf16pv"]
    assert A.default_config("int8", 128, (8, 0)) == A.CONFIGS["sm80", "int8"]


def test_bad_configs_and_shapes_raise():
    q, k, v = inputs(1, 40, 40, 1, 64)
    with pytest.raises(ValueError, match="block_n"):
        A.attention_quantized(q, k, v, "fp8", A.AttnConfig(32, 16), block=BLOCK)
    with pytest.raises(ValueError, match="block_m"):
        A.attention_quantized(q, k, v, "fp8", A.AttnConfig(64, 32), block=BLOCK)  # larger than the scale block
    with pytest.raises(ValueError, match="head_dim"):
        A.attention_quantized(*inputs(1, 40, 40, 1, 48), "int8", SMALL, block=BLOCK)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        A.attention_quantized(q, k, v.float(), "int8", SMALL, block=BLOCK)
    with pytest.raises(ValueError, match="agree"):
        A.attention_quantized(q, k[:, :, :, :32], v[:, :, :, :32], "int8", SMALL, block=BLOCK)
    for bad in (8, 48):  # the P·V key order permutes groups of 16 tokens
        with pytest.raises(ValueError, match="power of two >= 16"):
            A.quantize_v(v, bad)


def test_op_under_torch_compile():
    """The custom op traces whole under fullgraph=True (aot_eager: no C++ compiler needed on CPU). Its default tiles
    (128 x 128) are the interpreter's slowest case, so the shapes stay tiny."""
    q, k, v = inputs(1, 20, 12, 1, 64)

    def f(q, k, v):
        return A.quantized_attention_op(q, k, v, "int8", 128, 128, 8, 3, False, True, False) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert got.shape == (1, 20, 64)
    check(got / 2, q, k, v, "int8")

    def g(q8, q_scale, k, v):  # q quantized by its producer
        return A.quantized_attention_op(q8, k, v, "int8", 128, 128, 8, 3, False, True, False, q_scale) * 2

    qq = A.quantize_q(q, torch.int8)
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="aot_eager")(*qq, k, v), got)
