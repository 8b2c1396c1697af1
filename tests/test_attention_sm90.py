"""The pipelined Gluon attention kernel (kernels/attention_sm90.py). Gluon does not run under TRITON_INTERPRET=1, so on
the CPU this compiles the kernel for sm_90 (the PTX and the cubin, with Triton's own ptxas), which catches API drift
and compile errors; on an sm_90 GPU it runs against `attention_quantized_ref` on fresh random inputs, with query and
key tails and 1 to 5 key blocks so that the prologue, the pipelined loop, the masked last block and the K/V slot
refills all run. Bounds as in test_kernels_attention.py: the kernel differs from the reference by the rounding of P to
e4m3 (< 0.045) and from SDPA by the quantization as a whole (< 0.08 fp8, < 0.06 int8_fp8pv)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wanrt.kernels import attention as A
from wanrt.kernels import attention_sm90 as G

from test_kernels_attention import REF_BOUND, REL_BOUND, rel_err

HOPPER_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
MODES = ("fp8", "int8_fp8pv")
PIPELINED = [A.AttnConfig(64, 128, 4, st, pipelined=True) for st in (2, 3)]

pytestmark = pytest.mark.skipif(not G.available(), reason="this Triton has no Gluon")


def compile_for_sm90(mode: str, tail: bool) -> None:
    """Compile the kernel for sm_90 without a GPU and check that a dot stays in flight across the softmax and that
    registers do not spill. Runs in a child process: the interpreter (TRITON_INTERPRET=1) replaces every jit function."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    qdt, gdt = (torch.int8, gl.int8) if mode == "int8_fp8pv" else (torch.float8_e4m3fn, gl.float8e4nv)

    def desc(shape, block, tdt, g):  # host descriptors over CPU tensors: only their types matter here
        return G.TensorDescriptor.from_tensor(torch.empty(shape, dtype=tdt), block,
                                              gl.NVMMASharedLayout.get_default_for(block, g))
    descs = {"q_desc": desc([256, 128], [G.BLOCK_M, 128], qdt, gdt),
             "k_desc": desc([256, 128], [G.BLOCK_N, 128], qdt, gdt),
             "v_desc": desc([128, 256], [128, G.BLOCK_N], torch.float8_e4m3fn, gl.float8e4nv)}
    consts = dict(D=128, BLOCK_M=G.BLOCK_M, BLOCK_N=G.BLOCK_N, SCALE_BLOCK=128, P_SHIFT=A.P_LOG2_FP8, STAGES=G.STAGES,
                  HAS_TAIL=tail)
    kern = G._attn_fwd_sm90
    sig = {n: "constexpr" if n in consts else mangle_type(descs[n]) if n in descs
           else "*bf16" if n == "Out" else "*fp32" if n in ("QS", "KS", "VS") else "i32" for n in kern.arg_names}
    aligned = ("QS", "KS", "VS", "Out", "Lq_pad", "Lk_pad", "stride_ob", "stride_ol")  # as a launch specializes them
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.arg_names) if n in aligned}
    compiled = triton.compile(GluonASTSource(kern, sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=G.NUM_WARPS))
    from triton.tools.disasm import get_sass

    ptx, sass = compiled.asm["ptx"], get_sass(compiled.asm["cubin"])
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx, "no dot left in flight"
    assert "QGMMA" in sass or "IGMMA" in sass
    assert "SHFL.IDX" not in sass, "P is shuffled across lanes before the P·V dot (see the P·V key order)"
    # The loop holds S, the accumulator and P near the register limit. With Triton 3.6 (the GPU image) no variant
    # spills; a newer ptxas (3.9's) spills a few registers once the masked last block is compiled in too.
    if not tail:
        assert "STL" not in sass and "LDL" not in sass, "registers spill to local memory"


@pytest.mark.skipif(HOPPER_GPU, reason="the GPU tests below run the kernel itself")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail", [False, True], ids=["whole", "tail"])
def test_compiles_for_sm90(mode, tail):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = f"import test_attention_sm90 as t; t.compile_for_sm90({mode!r}, {tail})"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.skipif(not HOPPER_GPU, reason="runs on an sm_90 GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Lq, Lk", [(64, 128), (100, 77), (130, 256), (200, 300), (64, 640), (333, 517)])
@pytest.mark.parametrize("cfg", PIPELINED, ids=lambda c: c.describe())
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
def test_rejects_what_it_cannot_run():
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(3))
    with pytest.raises(ValueError, match="head_dim 128"):
        A.attention_quantized(q, k, v, "fp8", PIPELINED[0])
    with pytest.raises(ValueError, match="fp8 P·V"):
        A.attention_quantized(*(t.repeat(1, 1, 1, 2) for t in (q, k, v)), "fp8_bf16pv", PIPELINED[0])
