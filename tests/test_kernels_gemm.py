"""The scaled GEMM kernel (Triton; on the CPU through TRITON_INTERPRET=1, set in conftest) against its PyTorch
reference, on fresh random inputs each run, for every mode, flag and tail case; and the dispatcher's choices."""
import math

import pytest
import torch

from wanrt.kernels import scaled_gemm
from wanrt.kernels.quantize import quantize_rows_reference, quantize_rows_triton, quantize_weight
from wanrt.kernels.scaled_gemm import (CONFIGS, MODES, UnsupportedGemmError, gemm_mode, pick_config, scaled_mm,
                                       scaled_mm_reference, scaled_mm_triton)

# tl.sigmoid is 1 / (1 + exp(-z)): exp overflows to inf for very negative GELU inputs, which gives the right 0 on the
# GPU and in numpy, but numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Small tiles: the interpreter runs every program in Python. M=70, N=48, K=96 leave tails in all three dims.
SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
ACT_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def operands(mode: str, lead: tuple[int, ...], N: int, K: int, triton_quant: bool = False):
    """Random (a, b, a_scale, b_scale) for a mode: activations with per-row magnitudes spread over 100x, weights of
    nn.Linear scale, both quantized as the runtime does."""
    x = torch.randn(*lead, K) * torch.logspace(-1, 1, math.prod(lead)).view(*lead, 1)
    b, b_scale = quantize_weight(torch.randn(N, K) / K**0.5, torch.float8_e4m3fn if mode == "fp8" else torch.int8)
    if mode == "w8a16":
        return x.to(torch.bfloat16), b, None, b_scale
    quant = quantize_rows_triton if triton_quant else quantize_rows_reference
    a, a_scale = quant(x, ACT_DTYPE[mode])
    return a, b, a_scale, b_scale


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Every element finite and within rtol (relative to the element, plus rtol * max|ref| absolute for values near
    zero); on failure, report the worst elements."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.double(), ref.double()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN outputs (unwritten or bad elements)"
    err = (out - ref).abs()
    bound = rtol * ref.abs() + rtol * ref.abs().max() * 1e-2
    bad = err > bound
    if bad.any():
        worst = torch.topk((err / bound).flatten(), min(5, int(bad.sum()))).indices
        rows = [(tuple(int(i) for i in torch.unravel_index(j, out.shape)), out.flatten()[j].item(),
                 ref.flatten()[j].item()) for j in worst]
        raise AssertionError(f"{int(bad.sum())}/{out.numel()} mismatches; worst (index, out, ref): {rows}")


# fp32 output: the kernel and the reference differ only by summation order. bf16 output: the interpreter truncates
# fp32 -> bf16 where the GPU and torch round to nearest, so allow one bf16 ulp.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias, gelu", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(mode, bias, gelu, out_dtype):
    N, K = 48, 96
    a, b, a_scale, b_scale = operands(mode, (70,), N, K)
    bias_t = torch.randn(N).to(torch.bfloat16) if bias else None
    out = scaled_mm_triton(a, b, a_scale, b_scale, bias_t, gelu, out_dtype, config=SMALL)
    assert_matches(out, scaled_mm_reference(a, b, a_scale, b_scale, bias_t, gelu, out_dtype), RTOL[out_dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("persistent", [False, True])
def test_tails_batch_dims_and_full_write(mode, persistent):
    """Batch dims [2, 35, K], K not a multiple of BLOCK_K (masked K loop), several tiles per persistent program;
    the output buffer starts as NaN so any element the kernel skips shows."""
    N, K = 40, 80
    a, b, a_scale, b_scale = operands(mode, (2, 35), N, K)
    bias = torch.randn(N)
    out = torch.full((2, 35, N), float("nan"))
    cfg = dict(SMALL, BLOCK_K=64, PERSISTENT=persistent)
    got = scaled_mm_triton(a, b, a_scale, b_scale, bias, True, torch.float32, config=cfg, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (2, 35, N)
    assert_matches(out, scaled_mm_reference(a, b, a_scale, b_scale, bias, True, torch.float32), RTOL[torch.float32])


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_triton_quantize_then_gemm(mode):
    """The runtime's path: activations quantized by the Triton kernel, then the GEMM, close to the fp32 linear."""
    M, N, K = 64, 64, 128
    x, w = torch.randn(M, K), torch.randn(N, K) / K**0.5
    a, a_scale = quantize_rows_triton(x, ACT_DTYPE[mode])
    b, b_scale = quantize_weight(w, ACT_DTYPE[mode])
    out = scaled_mm_triton(a, b, a_scale, b_scale, out_dtype=torch.float32, config=SMALL)
    ref = x @ w.T
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.06 if mode == "fp8" else 0.02)


def test_default_config_launch():
    """No config override: the launcher's own pick (64x128 tiles for few rows) also gives the reference result."""
    a, b, a_scale, b_scale = operands("int8", (20,), 24, 64)
    out = scaled_mm_triton(a, b, a_scale, b_scale, out_dtype=torch.float32)
    assert_matches(out, scaled_mm_reference(a, b, a_scale, b_scale, out_dtype=torch.float32), RTOL[torch.float32])


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(scaled_gemm, "scaled_mm_triton", no_triton)
    for mode in MODES:
        a, b, a_scale, b_scale = operands(mode, (3, 5), 16, 32)
        bias = torch.randn(16)
        assert torch.equal(scaled_mm(a, b, a_scale, b_scale, bias, True),
                           scaled_mm_reference(a, b, a_scale, b_scale, bias, True))


def test_dispatcher_names_mode_and_capability(monkeypatch):
    """On a GPU too old for the mode (mocked sm_80 for fp8) the error says which mode and which capability."""
    monkeypatch.setattr(scaled_gemm, "capability", lambda device: (8, 0))
    monkeypatch.setattr(scaled_gemm, "has_triton", lambda: True)
    a, b, a_scale, b_scale = operands("fp8", (4,), 16, 32)
    with pytest.raises(UnsupportedGemmError, match=r"'fp8'.*8\.9.*sm_80"):
        scaled_mm(a, b, a_scale, b_scale)


def test_mode_checks():
    a, b, a_scale, b_scale = operands("int8", (4,), 16, 32)
    assert gemm_mode(a, b, a_scale) == "int8"
    with pytest.raises(TypeError):
        gemm_mode(a.float(), b.float(), a_scale)
    with pytest.raises(ValueError):
        gemm_mode(a.to(torch.bfloat16), b, a_scale)  # w8a16 takes no activation scale
    with pytest.raises(ValueError):
        scaled_mm_reference(a, b[:, :16], a_scale, b_scale)


def test_config_table_fits_hopper_shared_memory():
    """Every table entry's pipeline buffers fit the 227 KiB an H100 block may use, and tiles divide the shapes' N
    and K (the Wan widths are multiples of 128), so only M has a tail."""
    for (mode, N, K), cfg in CONFIGS.items():
        a_bytes = 2 if mode == "w8a16" else 1
        stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] * a_bytes + cfg["BLOCK_N"] * cfg["BLOCK_K"]
        assert stage * cfg["num_stages"] <= 227 * 1024, (mode, N, K)
        assert K % cfg["BLOCK_K"] == 0, (mode, N, K)
        assert pick_config(mode, 32760, N, K, (9, 0)) == cfg
    assert pick_config("fp8", 512, 1536, 1536, (9, 0))["BLOCK_M"] == 64  # the text context: small tiles


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("M, N, K", [(70, 48, 80), (64, 64, 64)])
def test_tma_matches_reference(mode, persistent, M, N, K):
    """TMA descriptor loads (zero-filled M, N and K tails: 70 x 48 x 80 over 32-wide blocks; then an aligned
    shape), with and without warp specialization (a compiler hint, ignored by the interpreter), into a NaN-filled
    buffer so any element the kernel skips shows."""
    a, b, a_scale, b_scale = operands(mode, (M,), N, K)
    bias = torch.randn(N)
    out = torch.full((M, N), float("nan"))
    cfg = dict(SMALL, PERSISTENT=persistent, TMA=True)
    scaled_mm_triton(a, b, a_scale, b_scale, bias, True, torch.float32, config=cfg, out=out)
    assert_matches(out, scaled_mm_reference(a, b, a_scale, b_scale, bias, True, torch.float32), RTOL[torch.float32])


def test_tma_checks(monkeypatch):
    """TMA raises a ValueError for w8a16, for rows that are not 16-byte aligned and on GPUs before sm_90."""
    tma = dict(SMALL, TMA=True)
    a, b, a_scale, b_scale = operands("w8a16", (8,), 16, 32)
    with pytest.raises(ValueError, match="w8a16"):
        scaled_mm_triton(a, b, a_scale, b_scale, config=tma)
    a, b, a_scale, b_scale = operands("int8", (8,), 16, 40)  # 40-byte rows
    with pytest.raises(ValueError, match="16-byte"):
        scaled_mm_triton(a, b, a_scale, b_scale, config=tma)
    monkeypatch.setattr(scaled_gemm, "capability", lambda device: (8, 9))
    a, b, a_scale, b_scale = operands("fp8", (8,), 16, 32)
    with pytest.raises(ValueError, match="sm_90"):
        scaled_mm_triton(a, b, a_scale, b_scale, config=tma)


def test_table_tma_config_falls_back_on_unaligned_rows(monkeypatch):
    """A TMA table config (what pick_config gives on Hopper) on rows TMA cannot read runs with pointer loads; only an
    explicit config raises."""
    monkeypatch.setattr(scaled_gemm, "pick_config", lambda *args: dict(SMALL, TMA=True))
    a, b, a_scale, b_scale = operands("int8", (8,), 16, 40)  # 40-byte rows
    got = scaled_mm_triton(a, b, a_scale, b_scale)
    assert_matches(got, scaled_mm_reference(a, b, a_scale, b_scale), RTOL[torch.bfloat16])
