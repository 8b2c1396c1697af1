"""The Gluon attention kernel (kernels/attention_sm90.py). Gluon does not run under TRITON_INTERPRET=1, so on the CPU
this compiles the kernel for sm_90 (the PTX and the cubin, with Triton's own ptxas and cuobjdump), which catches API
drift and compile errors and checks what its speed rests on: three warpgroups at 168 registers (without spilling on the
GPU image's Triton 3.6, and never inside the key-block loop), wgmmas grouped four to a dot (ptxas serializes every one
when registers run short), no shuffle of P across lanes and no conversion of int8 scores. On an sm_90 GPU it runs
against `attention_quantized_ref` on fresh random inputs, with query and key tails and 1 to 6 key blocks so that the
masked block, the loop, programs whose later warpgroups hold no valid rows and the K/V slot refills all run. Bounds as
in test_kernels_attention.py: the kernel differs from the reference by the rounding of P to e4m3 (< 0.045) and from SDPA
by the quantization as a whole (< 0.08 fp8, < 0.06 int8_fp8pv)."""
import os

import pytest
import torch

from wanrt.kernels import attention as A
from wanrt.kernels import attention_sm90 as G

from sm90_offline import local_memory_in_loops, resource_usage, run_compiled
from test_kernels_attention import REF_BOUND, REL_BOUND, rel_err, scaled_rows

HOPPER_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
MODES = ("fp8", "int8_fp8pv")
GLUON = [A.AttnConfig(64, 128, 4, st, gluon=True) for st in (2, G.STAGES)]

pytestmark = pytest.mark.skipif(not G.available(), reason="this Triton has no Gluon")


def compile_for_sm90(mode: str, tail: bool) -> None:
    """Compile the kernel for sm_90 without a GPU and check its registers, spills, wgmma grouping and P's path. Runs
    in a child process: the interpreter (TRITON_INTERPRET=1) replaces every jit function."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.disasm import get_sass

    qdt, gdt = (torch.int8, gl.int8) if mode == "int8_fp8pv" else (torch.float8_e4m3fn, gl.float8e4nv)

    def desc(shape, block, tdt, g):  # host descriptors over CPU tensors: only their types matter here
        return G.TensorDescriptor.from_tensor(torch.empty(shape, dtype=tdt), block,
                                              gl.NVMMASharedLayout.get_default_for(block, g))
    descs = {"q_desc": desc([256, 128], [G.BLOCK_M, 128], qdt, gdt),
             "k_desc": desc([256, 128], [G.BLOCK_N, 128], qdt, gdt),
             "v_desc": desc([128, 256], [128, G.BLOCK_N], torch.float8_e4m3fn, gl.float8e4nv)}
    consts = dict(SCALE_BLOCK=128, P_SHIFT=A.P_LOG2_FP8, STAGES=G.STAGES, HAS_TAIL=tail)
    kern = G._attn_fwd_sm90
    sig = {n: "constexpr" if n in consts else mangle_type(descs[n]) if n in descs
           else "*bf16" if n == "Out" else "*fp32" if n in ("QS", "KS", "VS") else "i32" for n in kern.arg_names}
    aligned = ("QS", "KS", "VS", "Out", "Lk_pad", "stride_ob", "stride_ol", "stride_oh")  # as a launch has
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.arg_names) if n in aligned}
    compiled = triton.compile(GluonASTSource(kern, sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 64), options=dict(num_warps=G.NUM_WARPS,
                                                                             maxnreg=G.MAX_REGS))
    sass = get_sass(compiled.asm["cubin"])
    regs, spill_bytes = resource_usage(compiled.asm["cubin"])
    dots = [line for line in sass.splitlines() if "GMMA" in line]
    assert dots, "no wgmma in the kernel"
    assert regs <= G.MAX_REGS
    # Triton 3.6's ptxas (the GPU image) fits it without spilling; 3.9's spills a few registers around the loop
    if triton.__version__.startswith("3.6"):
        assert spill_bytes == 0, f"{spill_bytes} bytes spilled"
    assert local_memory_in_loops(sass) == 0, "registers spill in the key-block loop"
    # each dot is 4 wgmmas (K = 128 in steps of 32); only the last of a group waits for the ones before it
    assert sum("gsb0" in line for line in dots) * 4 <= len(dots), "ptxas serialized the wgmmas"
    assert "SHFL.IDX" not in sass, "P is shuffled across lanes before the P·V dot (see the P·V key order)"
    assert "I2FP.F32.S32" not in sass, "int8 scores are converted one by one (see INT8_SCORE_BASE_BITS)"


@pytest.mark.skipif(HOPPER_GPU, reason="the GPU tests below run the kernel itself")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail", [False, True], ids=["whole", "tail"])
def test_compiles_for_sm90(mode, tail):
    run_compiled(f"import test_attention_sm90 as t; t.compile_for_sm90({mode!r}, {tail})")


@pytest.mark.parametrize("mode", MODES)
def test_default_config_falls_back_where_gluon_cannot_run(mode):
    hopper = A.default_config(mode, 128, (9, 0))
    assert A.default_config(mode, 64, (9, 0)) == A.TRITON_FP8_PV_SM90
    assert A.default_config(mode, 128, (10, 0)) == A.TRITON_FP8_PV_SM90
    assert A.default_config(mode, 128, (9, 0), block=64) == A.TRITON_FP8_PV_SM90
    assert A.default_config(mode, 128, None) == A.TRITON_FP8_PV_SM90
    assert hopper.gluon == (os.environ.get("TRITON_INTERPRET", "0") != "1")


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Lq, Lk", [(64, 128), (100, 77), (130, 256), (200, 300), (64, 640), (333, 517),
                                    (500, 700)])
@pytest.mark.parametrize("cfg", GLUON, ids=lambda c: c.describe())
def test_matches_reference(mode, Lq, Lk, cfg):
    q, k, v = (torch.randn(2, L, 3, 128, device="cuda").to(torch.bfloat16) for L in (Lq, Lk, Lk))
    out = torch.full((2, Lq, 3 * 128), float("nan"), dtype=torch.bfloat16, device="cuda")  # every row written
    got = A.attention_quantized(q, k, v, mode, cfg, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    ref = A.attention_quantized_ref(q, k, v, mode)
    sdpa = A.attention_reference(q.float(), k.float(), v.float())
    assert rel_err(got, ref) < REF_BOUND[mode], rel_err(got, ref)
    assert rel_err(got, sdpa) < REL_BOUND[mode], rel_err(got, sdpa)


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("mode", MODES)
def test_query_rows_of_different_magnitudes(mode):
    """Per-token Q scales, read by each warpgroup for its own rows (333 queries: three programs, the last partly
    empty)."""
    q, k, v = (torch.randn(1, L, 2, 128, device="cuda").to(torch.bfloat16) for L in (333, 517, 517))
    q = scaled_rows(q)
    got = A.attention_quantized(q, k, v, mode, GLUON[-1])
    assert rel_err(got, A.attention_quantized_ref(q, k, v, mode)) < REF_BOUND[mode]


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("mode", MODES)
def test_query_quantized_by_its_producer(mode):
    """The DiT's path at Wan's head size: Q from qk_norm_rope, quantized per token and head, through `attention`
    (the table's kernel), against SDPA on the bf16 q the same norm gives."""
    from wanrt.kernels.qk_norm_rope import qk_norm_rope

    L, H = 300, 3
    y = (3 * torch.randn(1, L, H * 128, device="cuda")).to(torch.bfloat16)
    weight = 1 + 0.2 * torch.randn(H * 128, device="cuda")
    angles = torch.rand(L, 64, device="cuda") * 6.3
    cos, sin = angles.cos(), angles.sin()
    k, v = (torch.randn(1, L, H, 128, device="cuda").to(torch.bfloat16) for _ in range(2))
    assert A.quantizes_query(mode, y)
    qq = qk_norm_rope(y, weight, 1e-6, H, cos, sin, A.QK_DTYPE[mode], for_attention=True)
    got = A.attention(qq, k, v, mode)
    q = qk_norm_rope(y, weight, 1e-6, H, cos, sin)
    assert rel_err(got, A.attention(q, k, v, mode)) < REL_BOUND[mode] / 2  # q's bf16 rounding apart (fp8: 0.027)
    assert rel_err(got, A.attention_reference(q.float(), k.float(), v.float())) < REL_BOUND[mode]


def sink_and_tail(Lq: int, Lk: int, device: str = "cuda"):
    """q, k, v [1, L, 1, 128] where one key (the last, in the partial key block the kernel takes first) outscores
    the rest by 16 in base 2, P = 256 against 2^-8, while the 32,768 others together carry half its weight; its
    value is -1 and theirs +1, so the output is about -1/3 in every channel. A large early weight and a long light
    tail, whose small per-block shares an accumulator of few bits (Hopper's fp8 wgmma keeps ~14) would truncate
    against the large sum; carrying the output through it across key blocks gave relative errors of 0.15-0.42 on a
    1.3B forward."""
    c = A.LOG2E / 128 ** 0.5
    a = (16 / c) ** 0.5  # q . k_sink = a^2: 16 in base 2
    q = torch.zeros(1, Lq, 1, 128, device=device)
    q[..., 0] = a
    k = torch.zeros(1, Lk, 1, 128, device=device)
    k[:, -1, :, 0] = a
    v = torch.ones(1, Lk, 1, 128, device=device)
    v[:, -1] = -1.0
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("mode", MODES)
def test_large_early_weight_and_a_long_light_tail(mode):
    q, k, v = sink_and_tail(192, 32768 + 77)
    got = A.attention_quantized(q, k, v, mode, GLUON[-1]).float()
    want = A.attention_reference(q.float(), k.float(), v.float())
    assert rel_err(got, A.attention_quantized_ref(q, k, v, mode)) < REF_BOUND[mode]
    assert (got - want).abs().max() < 0.02, (got.flatten()[:4], want.flatten()[:4])


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
def test_int8_dots_at_their_extremes():
    """Every channel of q, and of the smoothed k of the keys alike in sign to it, quantizes to 127: their int8 dots
    are 127^2 * 128 ~ 2^21, the edge of the range INT8_SCORE_BASE_BITS must hold exactly. The other keys score
    ~33 lower in base 2, so the softmax weighs the first alone, evenly, and the output is their mean value (up to
    V's rounding to e4m3, which the reference shares)."""
    Lq, Lk = 192, 1000
    q = torch.ones(1, Lq, 1, 128, device="cuda")
    sign = torch.where(torch.arange(Lk, device="cuda") % 3 == 0, 1.0, -1.0)
    k = sign[None, :, None, None].expand(1, Lk, 1, 128).contiguous()
    v = torch.randn(1, Lk, 1, 128, device="cuda")
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    got = A.attention_quantized(q, k, v, "int8_fp8pv", GLUON[-1]).float()
    assert rel_err(got, A.attention_quantized_ref(q, k, v, "int8_fp8pv")) < 0.01
    want = v[0, sign > 0, 0].float().mean(0)
    assert (got[0] - want).abs().max() < 0.01, (got[0, 0, :4], want[:4])


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
def test_rejects_what_it_cannot_run():
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(3))
    with pytest.raises(ValueError, match="head_dim 128"):
        A.attention_quantized(q, k, v, "fp8", GLUON[0])
    with pytest.raises(ValueError, match="fp8 P·V"):
        A.attention_quantized(*(t.repeat(1, 1, 1, 2) for t in (q, k, v)), "fp8_bf16pv", GLUON[0])
