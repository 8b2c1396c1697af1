"""Hopper (sm_90) attention kernel in Gluon for the fp8 P·V modes ('fp8', 'int8_fp8pv'), pipelined as
FlashAttention-3 does within one warpgroup: block j-1's P·V dot runs on the tensor cores while block j's softmax runs.
Opt-in (`AttnConfig(..., pipelined=True)`): on the H100 it does not beat the Triton kernel (bench/results/
attention_h100.md: 7.80 against 7.74 ms for fp8 at 1.3B 480p, where the Triton kernel fits three programs per SM
and this one, at ~225 registers, two; 8.57 against 8.19 ms in the run before), so the table keeps the Triton kernel.

Same math, inputs and output as `_attn_fwd_kernel` in `wanrt.kernels.attention` (its docstring has the formulas and
layouts); that Triton kernel stays the default and the one the CPU tests run under TRITON_INTERPRET=1, which cannot run
Gluon. This one is compiled for sm_90 in the CPU tests and checked against the PyTorch reference on the GPU
(`tests/test_attention_sm90.py`).

Why Gluon: Triton's `tl.dot` waits for every wgmma right after issuing it, so each 64-row program runs QK, softmax
and P·V strictly in sequence (the SASS shows `WARPGROUP.DEPBAR.LE gsb0, 0x0` after each dot). Gluon exposes the async
wgmma and its wait:

    S_0 = Q K_0^T;  P_0 = softmax step(S_0)
    for j in 1 .. n-1:
        issue S_j = Q K_j^T;  issue acc = alpha_{j-1} acc + P_{j-1} V_{j-1}
        wait for S_j (P·V may still run);  P_j = softmax step(S_j)      <- overlaps P·V on the tensor cores
        wait for P·V
    acc = alpha_{n-1} acc + P_{n-1} V_{n-1}

What the compilers demand (measured on the SASS): no wgmma may be in flight at the loop's back edge, or ptxas
serializes them all; and P crosses the back edge in fp32, since an 8-bit tensor carried around the loop costs ~200
byte permutes per iteration. P·V accumulates into acc inside the wgmma (FlashAttention-3 does the same): Hopper's fp8
accumulation keeps fewer bits, which moves the output by ~1e-5 in cosine (the table's 0.99854 against 0.99855). K
and V tiles stream through a ring of STAGES shared-memory slots filled by TMA.
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6
except ImportError:  # no Triton, or one without Gluon: callers fall back to the Triton kernel
    gluon = None

# One warpgroup of 64 query rows and 128-key blocks: two programs share an SM. 64-key blocks with registers capped at
# 168, so that three share one, measured slower (attention_h100_sweep_pipelined.md).
BLOCK_M, BLOCK_N, NUM_WARPS, STAGES = 64, 128, 4, 3


def available() -> bool:
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _softmax_step(s, scale, m_i, l_i, keys_left, offs_n, P_SHIFT: gl.constexpr, MASK: gl.constexpr):
        """Online-softmax update for one key block of raw scores `s` (fp32 or int32): returns P = 2^(S - m' +
        P_SHIFT) in fp32, the new row max m', row sum l' and the rescale factor alpha = 2^(m - m')."""
        s = s.to(gl.float32)
        if MASK:  # keys past Lk (zero padding) score -inf
            s = gl.where(offs_n[None, :] < keys_left, s * scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            p = gl.exp2(s - (m_new - P_SHIFT)[:, None])
        else:  # scale > 0: max(s * scale) = max(s) * scale, and the scale folds into one FMA per score
            m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
            p = gl.exp2(s * scale - (m_new - P_SHIFT)[:, None])
        alpha = gl.exp2(m_i - m_new)
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr):
        """P (fp32, score layout) -> e4m3 in the A-operand layout of the P·V wgmma, keys relabelled into the P·V key
        order of `wanrt.kernels.attention` (a renaming of registers, no shuffle across lanes)."""
        M: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        p = gl.reshape(gl.permute(gl.reshape(p, [M, N // 16, 2, 4, 2]), [0, 1, 3, 2, 4]), [M, N])
        return gl.convert_layout(p.to(gl.float8e4nv), p_layout)

    @gluon.jit
    def _load_kv(desc, row, col, bar, smem, pred):
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        tma_load(desc, [row, col], bar, smem, pred=pred)

    @gluon.jit
    def _pipelined_step(j, n, Lk, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row,
                        v_row, KS, qs, zero_s, offs_n, p_layout: gl.constexpr, o_rows: gl.constexpr,
                        BLOCK_N: gl.constexpr, SCALE_BLOCK: gl.constexpr, P_SHIFT: gl.constexpr, STAGES: gl.constexpr,
                        MASK: gl.constexpr):
        """Key block j >= 1, given block j-1's P (fp32) and alpha: issue QK_j and P_{j-1} V_{j-1}, run block j's
        softmax while P·V runs, wait for it. Returns (P_j, acc, m, l, alpha_j). Both dots are issued and waited for
        here: ptxas serializes every wgmma when one is still in flight at the loop's back edge. P crosses the back edge
        in fp32: an 8-bit tensor carried around the loop costs ~200 byte permutes per iteration."""
        st = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_bar.index(st), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p8 = _p_operand(p, p_layout)
        mbarrier.wait(v_bar.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p8, v_smem.index(prev).permute((1, 0)), acc * gl.convert_layout(alpha, o_rows)[:, None],
                            is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))  # QK_j done; P_{j-1} V_{j-1} may still run
        # refills: Triton's shared-memory barrier analysis puts a CTA barrier before each TMA issue, so every warp
        # has passed its wait for the dot that read the slot
        _load_kv(k_desc, k_row + (j + STAGES) * BLOCK_N, 0, k_bar.index(st), k_smem.index(st), j + STAGES < n)
        p, m_i, l_i, alpha_j = _softmax_step(s, qs * gl.load(KS + (j * BLOCK_N) // SCALE_BLOCK), m_i, l_i,
                                             Lk - j * BLOCK_N, offs_n, P_SHIFT, MASK)
        acc = warpgroup_mma_wait(0, deps=(acc,))  # (an 8-bit register operand cannot be a dep; ptxas keeps it live)
        _load_kv(v_desc, v_row, (j - 1 + STAGES) * BLOCK_N, v_bar.index(prev), v_smem.index(prev),
                 j - 1 + STAGES < n)
        return p, acc, m_i, l_i, alpha_j

    @gluon.jit
    def _attn_fwd_sm90(q_desc, k_desc, v_desc, QS, KS, VS, Out, Lq, Lk, Lq_pad, Lk_pad, H, stride_ob, stride_ol,
                       stride_oh, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       SCALE_BLOCK: gl.constexpr, P_SHIFT: gl.constexpr, STAGES: gl.constexpr,
                       HAS_TAIL: gl.constexpr):
        """One program = BLOCK_M queries of one head. q_desc, k_desc: quantized Q, K as 2-D [B*H*L_pad, D]; v_desc:
        e4m3 V^T as [B*H*D, Lk_pad]; QS, KS: per-block scales; VS: per-channel V scales [B, H, D]; Out [B, Lq, H*D]."""
        pid_m = gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
        bh = b * H + h
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])  # scores
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 32])  # output accumulator
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_layout: gl.constexpr = gl.SliceLayout(1, layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_dtype: gl.constexpr = gl.int32 if q_desc.dtype == gl.int8 else gl.float32

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)

        n = (Lk + BLOCK_N - 1) // BLOCK_N
        k_row = bh * Lk_pad
        v_row = bh * D
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [bh * Lq_pad + pid_m * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _load_kv(k_desc, k_row + i * BLOCK_N, 0, k_bar.index(i), k_smem.index(i), i < n)
            _load_kv(v_desc, v_row, i * BLOCK_N, v_bar.index(i), v_smem.index(i), i < n)

        qs = gl.load(QS + bh * (Lq_pad // SCALE_BLOCK) + (pid_m * BLOCK_M) // SCALE_BLOCK)
        KS = KS + bh * (Lk_pad // SCALE_BLOCK)
        offs_n = gl.arange(0, BLOCK_N, layout=col_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], s_dtype, layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        _load_kv(k_desc, k_row + STAGES * BLOCK_N, 0, k_bar.index(0), k_smem.index(0), STAGES < n)
        # with a tail, block 0 takes the masked path, a no-op unless it is also the last block
        p, m_i, l_i, alpha = _softmax_step(s, qs * gl.load(KS), m_i, l_i, Lk, offs_n, P_SHIFT, HAS_TAIL)
        for j in range(1, n - 1):
            p, acc, m_i, l_i, alpha = _pipelined_step(
                j, n, Lk, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row,
                KS, qs, zero_s, offs_n, p_layout, o_rows, BLOCK_N, SCALE_BLOCK, P_SHIFT, STAGES, False)
        if n > 1:
            p, acc, m_i, l_i, alpha = _pipelined_step(
                n - 1, n, Lk, p, acc, m_i, l_i, alpha, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row,
                v_row, KS, qs, zero_s, offs_n, p_layout, o_rows, BLOCK_N, SCALE_BLOCK, P_SHIFT, STAGES, HAS_TAIL)
        last = (n - 1) % STAGES
        mbarrier.wait(v_bar.index(last), ((n - 1) // STAGES) & 1)
        p8 = _p_operand(p, p_layout)
        acc = warpgroup_mma(p8, v_smem.index(last).permute((1, 0)), acc * gl.convert_layout(alpha, o_rows)[:, None],
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))

        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows)
        acc = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None] * gl.load(VS + bh * D + offs_d)[None, :]
        o_ptrs = Out + b.to(gl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        gl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)


def attention_kernel_sm90(qk, v, out, p_shift: float, stages: int = STAGES):
    """Run the Gluon kernel: qk a QuantizedQK (fp8 or int8, scale blocks a multiple of 128 tokens), v a QuantizedV,
    out [B, Lq, H*D] bf16/fp16 (written in place); P is 2^(S - m + p_shift); key blocks stream through `stages` K/V
    slots of shared memory. The caller checks shapes (`wanrt.kernels.attention.attention_kernel`)."""
    B, H, Lq_pad, D = qk.q.shape
    Lk_pad = qk.k.shape[2]
    qdt = gl.int8 if qk.q.dtype == torch.int8 else gl.float8e4nv

    def desc(x, block, dtype):
        return TensorDescriptor.from_tensor(x, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    q_desc = desc(qk.q.view(B * H * Lq_pad, D), [BLOCK_M, D], qdt)
    k_desc = desc(qk.k.view(B * H * Lk_pad, D), [BLOCK_N, D], qdt)
    v_desc = desc(v.v.view(B * H * D, Lk_pad), [D, BLOCK_N], gl.float8e4nv)
    grid = (triton.cdiv(qk.lq, BLOCK_M), H, B)
    _attn_fwd_sm90[grid](q_desc, k_desc, v_desc, qk.q_scale, qk.k_scale, v.scale, out, qk.lq, qk.lk, Lq_pad, Lk_pad,
                         H, out.stride(0), out.stride(1), D, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         SCALE_BLOCK=qk.block, P_SHIFT=p_shift, STAGES=stages, HAS_TAIL=qk.lk % BLOCK_N != 0,
                         num_warps=NUM_WARPS)
    return out
