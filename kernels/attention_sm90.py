"""Hopper (sm_90) attention kernel in Gluon for the fp8 P·V modes ('fp8', 'int8_fp8pv'): three warpgroups of 64 query
rows share every K/V tile of one program. The table entry of both modes on sm_90 (`AttnConfig(..., gluon=True)`); on
the H100 it beats the Triton kernel at the self-attention shapes (bench/results/attention_h100.md; the CONFIGS comment
in `wanrt.kernels.attention` has the figures).

Same math, inputs and output as `_attn_fwd_kernel` in `wanrt.kernels.attention` (its docstring has the formulas, the
layouts and the P·V key order); that Triton kernel stays the fallback and the one the CPU tests run under
TRITON_INTERPRET=1, which cannot run Gluon. This one is compiled for sm_90 in the CPU tests and checked against the
PyTorch reference on the GPU (`tests/test_attention_sm90.py`).

Why three warpgroups in one program: the Triton kernel already runs three 64-row programs per SM (12 warps, 168
registers each), but each loads its own K and V tiles and Triton fences every TMA refill with a CTA-wide barrier.
Here one program holds the three warpgroups (64,512 of the SM's 65,536 registers, so there is no room for a producer
warp): K/V tiles stream through a ring of STAGES shared-memory slots, each warpgroup signals an mbarrier when it has
read a slot, and the last warpgroup refills the slot once all three have. L2 traffic for K and V drops to a third and
no warpgroup waits at a barrier for another, so one's softmax runs while another's dots do. Keeping a dot in flight
across the softmax (FlashAttention-3's intra-warpgroup pipelining) needs more than 168 registers: ptxas then
serializes every wgmma (measured: slower).

What each key block costs beyond its two dots is issue slots on the warpgroup's critical path, so two of them moved:
- P's row sums come from the tensor core: the e4m3 P that enters P·V is also multiplied by a 128 x 8 tile of ones in
  shared memory (a 64x8 wgmma beside P·V's, on the same registers). That replaces 64 FADDs per thread and block (the
  loop runs 14% fewer instructions) and makes l the sum of exactly the rounded P that P·V weighs.
- int8 scores need no conversion: the QK wgmma starts from the bits of 1.5 * 2^23 (INT8_SCORE_BASE_BITS) instead of
  zero, and since a 128-channel int8 dot stays within +-2^21, each int32 sum read as fp32 is exactly 1.5 * 2^23 + dot.
  The base is the same for every score of a block, so it only moves the row's shift (`_softmax_step`). That replaces
  64 I2F per thread and block between the wgmma and the row max by 64 moves ahead of the wgmma.
Each key block's P·V (and row sums) start from zero in the wgmma and are added in fp32 after the alpha rescale, as in
the Triton kernel: Hopper's fp8 wgmma keeps only ~14 bits of what it accumulates, and carrying the output through it
across all key blocks gave relative errors of 0.15-0.42 against SDPA on the q, k, v of a 1.3B forward in a dit_bench
run (0.002-0.013 with the sum in fp32: bench/results/dit_h100.md).
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6
except ImportError:  # no Triton, or one without Gluon: callers fall back to the Triton kernel
    gluon = None

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 128, 4  # per warpgroup: 64 query rows, 128-key blocks, 4 warps
WARPGROUPS = 3  # per program: 3 x 64 rows (the warp_specialize list in _attn_fwd_sm90 spells out three)
STAGES = 4  # K/V slots, 32 KiB each at D = 128 (H100 sweeps of 2-5 put 4 and 5 within run-to-run noise; a power of two
# keeps the slot and phase of a step to a mask and a shift)
MAX_REGS = 168  # per thread: 3 warpgroups x 128 threads x 168 = 64,512 of 65,536
ROWSUM_N = 8  # columns of the ones tile that gives P's row sums (the narrowest wgmma)
INT8_SCORE_BASE_BITS = 0x4B400000  # int8 QK: the dot's wgmma starts from these bits (module docstring)
INT8_SCORE_BASE = 12582912.0  # = 1.5 * 2^23, what they read as in fp32


def available() -> bool:
    return gluon is not None


def supports(head_dim: int, block: int) -> bool:
    """Whether this kernel runs K scale blocks of `block` tokens at `head_dim` (and Gluon is there)."""
    return available() and head_dim == 128 and block % BLOCK_N == 0


if gluon is not None:
    _WARPGROUPS = gl.constexpr(WARPGROUPS)
    _MAX_REGS = gl.constexpr(MAX_REGS)
    _ROWSUM_N = gl.constexpr(ROWSUM_N)
    _INT8_SCORE_BASE_BITS = gl.constexpr(INT8_SCORE_BASE_BITS)
    _INT8_SCORE_BASE = gl.constexpr(INT8_SCORE_BASE)

    @gluon.constexpr_function
    def _wgmma_layout(n):
        """The accumulator layout of a 64 x n wgmma over the warpgroup's 4 warps."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 32])

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr):
        """P (fp32, score layout) -> e4m3 in the A-operand layout of the P·V wgmma, keys relabelled into the P·V key
        order of `wanrt.kernels.attention` (a renaming of registers, no shuffle across lanes)."""
        M: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        p = gl.reshape(gl.permute(gl.reshape(p, [M, N // 16, 2, 4, 2]), [0, 1, 3, 2, 4]), [M, N])
        return gl.convert_layout(p.to(gl.float8e4nv), p_layout)

    @gluon.jit
    def _softmax_step(s, scale, m_i, keys_left, P_SHIFT: gl.constexpr, MASK: gl.constexpr,
                      S_BASE: gl.constexpr):
        """Online-softmax update for one key block of fp32 scores `s` (S_BASE + the raw dot products) and the rows'
        scales `scale` (Q's per token times the block's K scale): returns P = 2^(S - m' + P_SHIFT) in fp32, the new
        row max m' and the rescale factor alpha = 2^(m - m')."""
        if MASK:  # keys past Lk (zero padding) score -inf; the key index is built here, not held across the loop
            offs_n = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
            s = gl.where(offs_n[None, :] < keys_left, s * scale[:, None], float("-inf"))
            m_blk = gl.max(s, 1)
        else:  # scale > 0: max(s * scale) = max(s) * scale, and the scale folds into one FMA per score
            m_blk = gl.max(s, 1) * scale
        if S_BASE != 0.0:  # the base shifts every score of the block alike: it goes into the per-row shift
            base = scale * S_BASE
            m_new = gl.maximum(m_i, m_blk - base)
            row_shift = m_new + (base - P_SHIFT)
        else:
            m_new = gl.maximum(m_i, m_blk)
            row_shift = m_new - P_SHIFT
        if MASK:
            p = gl.exp2(s - row_shift[:, None])
        else:
            p = gl.exp2(s * scale[:, None] - row_shift[:, None])
        return p, m_new, gl.exp2(m_i - m_new)

    @gluon.jit
    def _scores(q_smem, k_tile, s_init):
        """The raw dot products Q K^T of one key block in fp32, plus INT8_SCORE_BASE for int8 Q and K (s_init
        holds its bits: module docstring); e4m3 dots start from zero (use_acc=False, s_init unread)."""
        if s_init.dtype == gl.int32:
            s = warpgroup_mma(q_smem, k_tile, s_init, use_acc=True, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,)).to(gl.float32, bitcast=True)
        else:
            s = warpgroup_mma(q_smem, k_tile, s_init, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
        return s

    @gluon.jit
    def _key_block(i, n, HAS_TAIL: gl.constexpr):
        """The key block a warpgroup takes at step i: the partial last block first (its masked step then runs
        before the accumulator is live; after the loop it left ptxas too few registers and every wgmma serialized),
        then the full blocks in order. (Written without `%`: a remainder by the runtime n cost ~25 instructions a
        step.)"""
        j = i
        if HAS_TAIL:
            if i == 0:
                j = n - 1
            else:
                j = i - 1
        return j

    @gluon.jit
    def _load_kv(kv, i, n, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr):
        """TMA loads of step i's K and V^T tiles into slot i % STAGES."""
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_row, v_row = kv
        st = i % STAGES
        blk = _key_block(i, n, HAS_TAIL)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        tma_load(k_desc, [k_row + blk * k_desc.block_type.shape[0], 0], k_ready.index(st), k_smem.index(st))
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        tma_load(v_desc, [v_row, blk * v_desc.block_type.shape[1]], v_ready.index(st), v_smem.index(st))

    @gluon.jit
    def _step(i, n, Lk, acc, m_i, l_i, qs, KS, q_smem, kv, kv_empty, ones_smem, inits, SCALE_BLOCK: gl.constexpr,
              P_SHIFT: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr, LOADER: gl.constexpr,
              HAS_TAIL: gl.constexpr):
        """Step i of one warpgroup, on key block j = _key_block(i): S = Q K_j^T, the softmax step, then P V_j and P's
        row sums (P times a tile of ones) from zero in the wgmma, added to acc and l in fp32 after the alpha rescale.
        Then the warpgroup releases slot i % STAGES; the LOADER (the last warpgroup) refills it with step i + STAGES's
        block once all three have. `inits` are the wgmmas' starting accumulators (S, P V, row sums)."""
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_row, v_row = kv
        s_init, zero_o, zero_l = inits
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        S_BASE: gl.constexpr = _INT8_SCORE_BASE if s_init.dtype == gl.int32 else 0.0
        j = _key_block(i, n, HAS_TAIL)
        st = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(k_ready.index(st), phase)
        s = _scores(q_smem, k_smem.index(st).permute((1, 0)), s_init)
        p, m_i, alpha = _softmax_step(s, qs * gl.load(KS + (j * BLOCK_N) // SCALE_BLOCK), m_i, Lk - j * BLOCK_N,
                                      P_SHIFT, MASK, S_BASE)
        p8 = _p_operand(p, gl.DotOperandLayout(operand_index=0, parent=zero_o.type.layout, k_width=4))
        mbarrier.wait(v_ready.index(st), phase)
        pv = warpgroup_mma(p8, v_smem.index(st).permute((1, 0)), zero_o, use_acc=False, is_async=True)
        p8 = gl.convert_layout(p8, gl.DotOperandLayout(operand_index=0, parent=zero_l.type.layout, k_width=4))
        ps = warpgroup_mma(p8, ones_smem.permute((1, 0)), zero_l, use_acc=False, is_async=True)  # same registers
        pv, ps = warpgroup_mma_wait(0, deps=(pv, ps))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, zero_o.type.layout))[:, None] + pv
        l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, zero_l.type.layout))[:, None] + ps
        mbarrier.arrive(kv_empty.index(st), count=1)
        if LOADER:
            if i + STAGES < n:
                mbarrier.wait(kv_empty.index(st), phase)
                _load_kv(kv, i + STAGES, n, STAGES, HAS_TAIL)
        return acc, m_i, l_i

    @gluon.jit
    def _warpgroup(WG: gl.constexpr, q_desc, q_smem, q_bar, kv, kv_empty, ones_smem, QS, KS, VS, Out, row0, b, h,
                   bh, H, Lq, Lk, Lk_pad, stride_ob, stride_ol, stride_oh, SCALE_BLOCK: gl.constexpr,
                   P_SHIFT: gl.constexpr, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr):
        """Query rows row0 .. row0 + 63 of head (b, h) against every key block; warpgroup WG of the program."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = kv[0].block_type.shape[0]
        ROWSUM_N: gl.constexpr = ones_smem.shape[0]
        s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
        o_layout: gl.constexpr = _wgmma_layout(D)
        l_layout: gl.constexpr = _wgmma_layout(ROWSUM_N)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        LOADER: gl.constexpr = WG == _WARPGROUPS - 1
        q_smem = q_smem.index(WG)
        q_bar = q_bar.index(WG)
        n = (Lk + BLOCK_N - 1) // BLOCK_N

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [b * Lq + row0, h * D], q_bar, q_smem)  # rows past Lq (the next batch's, or zeros): not stored
        if LOADER:
            for i in gl.static_range(STAGES):
                if i < n:
                    _load_kv(kv, i, n, STAGES, HAS_TAIL)
        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        qs = gl.load(QS + (b * Lq + rows) * H + h, mask=rows < Lq, other=0.0)  # per token and head; past Lq: 0
        KS = KS + bh * (Lk_pad // SCALE_BLOCK)
        if q_desc.dtype == gl.int8:
            s_init = gl.full([BLOCK_M, BLOCK_N], _INT8_SCORE_BASE_BITS, gl.int32, s_layout)
        else:  # unread (use_acc=False)
            s_init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        inits = (s_init, gl.zeros([BLOCK_M, D], gl.float32, o_layout),  # (zeros: ptxas gives RZ)
                 gl.zeros([BLOCK_M, ROWSUM_N], gl.float32, l_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M, ROWSUM_N], gl.float32, l_layout)  # every column holds the row sum
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)

        mbarrier.wait(q_bar, 0)
        if HAS_TAIL:
            acc, m_i, l_i = _step(0, n, Lk, acc, m_i, l_i, qs, KS, q_smem, kv, kv_empty, ones_smem, inits,
                                  SCALE_BLOCK, P_SHIFT, STAGES, True, LOADER, HAS_TAIL)
        START: gl.constexpr = 1 if HAS_TAIL else 0
        for i in range(START, n):
            acc, m_i, l_i = _step(i, n, Lk, acc, m_i, l_i, qs, KS, q_smem, kv, kv_empty, ones_smem, inits,
                                  SCALE_BLOCK, P_SHIFT, STAGES, False, LOADER, HAS_TAIL)

        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offs_m = row0 + gl.arange(0, BLOCK_M, layout=o_rows)
        inv_l = gl.convert_layout(1.0 / gl.max(l_i, 1), o_rows)
        acc = acc * inv_l[:, None] * gl.load(VS + bh * D + offs_d)[None, :]
        o_ptrs = Out + b.to(gl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        gl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)

    @gluon.jit
    def _attn_fwd_sm90(q_desc, k_desc, v_desc, QS, KS, VS, Out, Lq, Lk, Lk_pad, H, stride_ob, stride_ol,
                       stride_oh, SCALE_BLOCK: gl.constexpr, P_SHIFT: gl.constexpr, STAGES: gl.constexpr,
                       HAS_TAIL: gl.constexpr):
        """One program = WARPGROUPS x 64 queries of one head. q_desc: quantized Q as 2-D [B*Lq, H*D]; k_desc: K as
        2-D [B*H*Lk_pad, D]; v_desc: e4m3 V^T as [B*H*D, Lk_pad]; QS: Q's scales [B, Lq, H]; KS: K's per-block
        scales; VS: per-channel V scales [B, H, D]; Out [B, Lq, H*D]. The first warpgroup runs in the program's own
        warps, the others as warp-specialized workers."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        pid_m = gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
        bh = b * H + h
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [_WARPGROUPS, BLOCK_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [_WARPGROUPS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(_WARPGROUPS):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=_WARPGROUPS)  # released by every warpgroup

        # e4m3 ones written as their bits (0x38): with Triton 3.6 an fp32 1.0 splat cast to e4m3 filled only two of
        # each register's four bytes (the row sums came out about half)
        ones = gl.full([_ROWSUM_N, BLOCK_N], 0x38, gl.int8, gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))
        ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [_ROWSUM_N, BLOCK_N],
                                              gl.NVMMASharedLayout.get_default_for([_ROWSUM_N, BLOCK_N],
                                                                                  gl.float8e4nv),
                                              ones.to(gl.float8e4nv, bitcast=True))
        fence_async_shared()  # the wgmmas read it through the async proxy
        kv = (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, bh * Lk_pad, bh * D)
        row0 = pid_m * _WARPGROUPS * BLOCK_M
        gl.warp_specialize([
            (_warpgroup, (0, q_desc, q_smem, q_bar, kv, kv_empty, ones_smem, QS, KS, VS, Out, row0, b, h, bh, H, Lq,
                          Lk, Lk_pad, stride_ob, stride_ol, stride_oh, SCALE_BLOCK, P_SHIFT, STAGES,
                          HAS_TAIL)),
            (_warpgroup, (1, q_desc, q_smem, q_bar, kv, kv_empty, ones_smem, QS, KS, VS, Out, row0 + BLOCK_M, b, h,
                          bh, H, Lq, Lk, Lk_pad, stride_ob, stride_ol, stride_oh, SCALE_BLOCK, P_SHIFT, STAGES,
                          HAS_TAIL)),
            (_warpgroup, (2, q_desc, q_smem, q_bar, kv, kv_empty, ones_smem, QS, KS, VS, Out, row0 + 2 * BLOCK_M, b,
                          h, bh, H, Lq, Lk, Lk_pad, stride_ob, stride_ol, stride_oh, SCALE_BLOCK, P_SHIFT,
                          STAGES, HAS_TAIL)),
        ], [4, 4], [_MAX_REGS, _MAX_REGS])


def attention_kernel_sm90(qk, v, out, p_shift: float, stages: int = STAGES):
    """Run the Gluon kernel: qk a QuantizedQK (fp8 or int8, scale blocks a multiple of 128 tokens), v a QuantizedV,
    out [B, Lq, H*D] bf16/fp16 (written in place); P is 2^(S - m + p_shift); key blocks stream through `stages` K/V
    slots of shared memory. The caller checks shapes (`wanrt.kernels.attention.attention_kernel`)."""
    B, Lq, H, D = qk.q.shape
    Lk_pad = qk.k.shape[2]
    qdt = gl.int8 if qk.q.dtype == torch.int8 else gl.float8e4nv

    def desc(x, block, dtype):
        return TensorDescriptor.from_tensor(x, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    q_desc = desc(qk.q.view(B * Lq, H * D), [BLOCK_M, D], qdt)
    k_desc = desc(qk.k.view(B * H * Lk_pad, D), [BLOCK_N, D], qdt)
    v_desc = desc(v.v.view(B * H * D, Lk_pad), [D, BLOCK_N], gl.float8e4nv)
    grid = (triton.cdiv(qk.lq, WARPGROUPS * BLOCK_M), H, B)
    _attn_fwd_sm90[grid](q_desc, k_desc, v_desc, qk.q_scale, qk.k_scale, v.scale, out, qk.lq, qk.lk, Lk_pad,
                         H, out.stride(0), out.stride(1), D, SCALE_BLOCK=qk.block, P_SHIFT=p_shift, STAGES=stages,
                         HAS_TAIL=qk.lk % BLOCK_N != 0, num_warps=NUM_WARPS, maxnreg=MAX_REGS)
    return out
