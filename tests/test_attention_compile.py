"""The Triton attention kernel (kernels/attention.py) compiled for sm_90 without a GPU, with its Hopper config for the
fp8 P·V modes (`TRITON_FP8_PV_SM90`: TMA loads, 64 query rows per program; their table entry where the Gluon kernel
cannot run). Two properties its H100 speed rests on, read from the SASS and the cubin's resource usage
(Triton's own ptxas and cuobjdump):
- P reaches the P·V dot without a shuffle across lanes (no SHFL.IDX): the P·V key order of the quantized V makes the
  QK accumulator's registers the A operand as they are (`pv_key_order`). Without it each key block costs 16 SHFL.IDX.
- at most 168 registers per thread, so that three programs (12 warps) share an SM: with 176 they fit two, measured
  ~10% slower on the H100.
Runs in a child process: the interpreter (TRITON_INTERPRET=1, set by conftest without a GPU) replaces jit functions."""
import pytest

from wanrt.kernels import attention as A

from sm90_offline import resource_usage, run_compiled

MAX_REGS = 168  # 65,536 registers per SM / (3 programs x 128 threads), in the allocation unit of 8


def compile_for_sm90(mode: str) -> tuple[str, int]:
    """(SASS, registers per thread) of the kernel for this mode with the Hopper Triton config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.disasm import get_sass

    cfg = A.TRITON_FP8_PV_SM90
    qk = {"fp8": "fp8e4nv", "int8_fp8pv": "i8"}[mode]
    consts = dict(D=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SCALE_BLOCK=A.SCALE_BLOCK, P_SHIFT=A.P_LOG2_FP8,
                  PV_FP8=True, TMA=cfg.tma, HAS_TAIL=False, LOOKAHEAD=cfg.lookahead, INTERPRET=False)
    descs = {"Q": f"tensordesc<{qk}[{cfg.block_m}, 128]>", "K": f"tensordesc<{qk}[{cfg.block_n}, 128]>",
             "V": f"tensordesc<fp8e4nv[128, {cfg.block_n}]>"}
    kern = A._attn_fwd_kernel
    sig = {n: "constexpr" if n in consts else descs.get(n) or ("*bf16" if n == "Out" else "*fp32" if n in
           ("QS", "KS", "VS") else "i32") for n in kern.arg_names}
    aligned = ("QS", "KS", "VS", "Out", "Lk_pad", "stride_ob", "stride_ol", "stride_oh")  # as a launch has
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.arg_names) if n in aligned}
    compiled = triton.compile(ASTSource(kern, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return get_sass(compiled.asm["cubin"]), resource_usage(compiled.asm["cubin"])[0]


def check_sm90(mode: str) -> None:
    sass, regs = compile_for_sm90(mode)
    assert "QGMMA" in sass or "IGMMA" in sass, "no wgmma in the kernel"
    assert "SHFL.IDX" not in sass, "P is shuffled across lanes before the P·V dot"
    assert regs <= MAX_REGS, f"{regs} registers per thread: fewer than three programs fit an SM"


@pytest.mark.parametrize("mode", A.FP8_PV_MODES)
def test_fp8_pv_kernel_for_sm90(mode):
    pytest.importorskip("triton")
    run_compiled(f"import test_attention_compile as t; t.check_sm90({mode!r})")
