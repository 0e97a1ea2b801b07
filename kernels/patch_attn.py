"""Masked patch attention with segment ids (FlashAttention-2 style, forward + backward).

Math. For each batch b and head h, with q, k, v of shape (N, D) and segment ids s (N,):

    allowed[i, j] = (s[i] == s[j]) and (s[j] >= 0)
    S = scale * q @ k^T                (scale defaults to D ** -0.5)
    P = softmax over j of S, restricted to allowed[i, :]
    O[i] = sum_j P[i, j] v[j]          (O[i] = 0 when row i has no allowed key, i.e. s[i] < 0)

``segment_ids=None`` means one segment (plain softmax attention). Frame-wise attention = id is the view
index; global attention = one id per sample; ragged batches = -1 on padding tokens. A padding row
gets a zero output and passes/receives exactly zero gradient (never uninitialized memory).

Layouts: q, k, v (B, H, N, D), any strides (views of a packed qkv tensor work; see the copies below);
segment_ids (B, N), any integer dtype (int32 / int64 read as they are). Output (B, H, N, D), contiguous,
dtype of q. Differentiable in q, k, v (not in segment_ids, not in scale).

Kernels. The forward streams key blocks with the online softmax (running max m and sum l, in base 2
with log2(e) folded into the scale), accumulates in fp32 and saves the log-sum-exp per row.
The backward recomputes P from the LSE: a preprocess kernel forms delta = rowsum(dO * O), one kernel
per key block accumulates dK, dV over query blocks, one kernel per query block accumulates dQ over key
blocks (no atomics: the backward is deterministic). No N x N matrix is ever stored.
Block skipping: a tiny pre-pass kernel gives each block its min/max non-negative id; a query block
visits only the key-block range [lo, hi) whose id ranges can meet its own. With contiguous segments
that range is tight (frame-wise over V views costs ~1/V of global); with interleaved ids the range is
wider but the per-element mask keeps the result exact. The pre-pass also finds, inside [lo, hi), the run
[flo, fhi) of blocks that hold only the one id of a padding-free row block: those tiles run a second loop
with no segment mask, no padding masks and no id loads (about half the SASS of a masked tile on sm_90;
frame-wise attention over whole views is mostly such tiles). Without ids nothing is pre-computed.

Non-finite values. With segment ids the kernels read copies made by one elementwise pass each: the
forward a q and a k in which a token row with any non-finite entry (of q; of k or v) is all NaN, and a v
with non-finite entries zeroed, so a NaN score reaches only the pairs the mask keeps (masked scores are
replaced by -inf) and P @ V never forms 0 * NaN; the backward reads zeroed copies of q, k, v and dO, and
carries the NaN of a row (non-finite O or dO) in its LSE, so P is NaN exactly on the pairs that row
attends. Result: a non-finite q / k / v / dO entry makes NaN the outputs and gradients of the rows and
keys of its own segment that are linked to it, and nothing else changes, bit for bit (padding tokens are
never read at all). Without ids every row attends every key, so NaN anywhere reaches everything, as the
math says. The copies cost 3 reads + 3 writes of (B, H, N, D) per forward (4 + 4 per backward), small
next to the O(N^2 D) attention; views of a packed qkv tensor need no copy on the no-ids path.

Limits: fp32, bf16, fp16 (fp32 accumulation), fp64 (fp64 accumulation; a verification dtype,
used by gradcheck). Head dim 1 <= D <= 256, padded internally by masked loads to the next tile
width of 16/32/64/128/256 (the caller never pads). fp32 inputs use exact fp32 dots
(``input_precision="ieee"``), not TF32: accurate, but no tensor cores on the GPU (use bf16/fp16 for
speed). The LSE is stored in fp32, so at extreme logits (|scale * q.k| ~ 100+) fp32 gradients carry
a relative error ~|lse| * 2^-24, as in any FlashAttention-style backward. Non-finite inputs are not
rejected (that costs a device sync): they propagate as described above, on both paths. The backward runs
7 block matmuls per tile
pair (FlashAttention-2 runs 5 by accumulating dQ with atomics in the dK/dV sweep); the separate dQ sweep
keeps it deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import (acc_dtype, check_index_range, check_same_device, check_tensor, interpreting, launch,
                             next_pow2, tl_dtype, tracing, use_triton)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _patch_attn_ranges_kernel(seg_ptr, range_ptr, N, n_rblocks, n_cblocks, stride_sb, stride_sn,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
                              SEG64: tl.constexpr):
    """Block-skipping pre-pass. One program per (b, row block) stores four int32:
    [lo, hi): the column blocks whose non-negative id range [min, max] meets the row block's (lo == hi: none);
    [flo, fhi) inside it: column blocks whose every id equals the one id of the whole row block (no padding,
    nothing past N on either side), so the tile needs no per-element mask; empty (flo == fhi == lo) unless
    those blocks are contiguous."""
    big = 2**62 if SEG64 else 2147483647
    pid = tl.program_id(0).to(tl.int64)
    r = pid % n_rblocks
    b = pid // n_rblocks
    seg_ptr += b * stride_sb
    offs = r * BLOCK_R + tl.arange(0, BLOCK_R)
    ids = tl.load(seg_ptr + offs * stride_sn, mask=offs < N, other=-1)
    rmin = tl.min(tl.where(ids >= 0, ids, big), 0)
    rmax = tl.max(tl.where(ids >= 0, ids, -1), 0)
    r_one = (tl.min(ids, 0) == rmax) & (rmax >= 0)        # one id on every row (rows past N read as -1)
    lo = tl.zeros([], dtype=tl.int32) + n_cblocks
    hi = tl.zeros([], dtype=tl.int32)
    flo = tl.zeros([], dtype=tl.int32) + n_cblocks
    fhi = tl.zeros([], dtype=tl.int32)
    nfull = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_cblocks, CHUNK):
        cblk = c0 + tl.arange(0, CHUNK)
        offs_c = cblk[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        cid = tl.load(seg_ptr + offs_c * stride_sn, mask=offs_c < N, other=-1)
        cmin = tl.min(tl.where(cid >= 0, cid, big), 1)
        cmax = tl.max(tl.where(cid >= 0, cid, -1), 1)
        meet = (cmin <= rmax) & (cmax >= rmin) & (cblk < n_cblocks)
        lo = tl.minimum(lo, tl.min(tl.where(meet, cblk, n_cblocks), 0))
        hi = tl.maximum(hi, tl.max(tl.where(meet, cblk + 1, 0), 0))
        full = (tl.min(cid, 1) == rmax) & (tl.max(cid, 1) == rmax) & r_one & (cblk < n_cblocks)
        flo = tl.minimum(flo, tl.min(tl.where(full, cblk, n_cblocks), 0))
        fhi = tl.maximum(fhi, tl.max(tl.where(full, cblk + 1, 0), 0))
        nfull += tl.sum(full.to(tl.int32), 0)
    lo = tl.minimum(lo, hi)
    run = (nfull > 0) & (nfull == fhi - flo)               # the full blocks form one contiguous run
    tl.store(range_ptr + pid * 4, lo)
    tl.store(range_ptr + pid * 4 + 1, hi)
    tl.store(range_ptr + pid * 4 + 2, tl.where(run, flo, lo))
    tl.store(range_ptr + pid * 4 + 3, tl.where(run, fhi, lo))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, ACC: tl.constexpr):
    """a @ b accumulated in ACC; IEEE: exact fp32 products (fp32 inputs), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, out_dtype=ACC)


@triton.jit
def _program_ids(n_blocks, H):
    """(block index, b * H + h, b, h) of this program; grid = n_blocks * B * H, blocks fastest."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // n_blocks
    return pid % n_blocks, pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _load_range(range_ptr, row):
    """One block's [lo, hi) and unmasked run [flo, fhi) from ``_patch_attn_ranges_kernel``."""
    rp = range_ptr + row * 4
    return tl.load(rp), tl.load(rp + 1), tl.load(rp + 2), tl.load(rp + 3)


@triton.jit
def _past_run(t, flo, fhi):
    """The masked loop runs t over [lo, hi - (fhi - flo)): block t, or t shifted past the unmasked run."""
    return t + tl.where(t >= flo, fhi - flo, 0)


@triton.jit
def _patch_attn_sanitize_kernel(x_ptr, w_ptr, y_ptr, N, D, H, n_blocks,
                                stride_xb, stride_xh, stride_xn, stride_xd,
                                stride_wb, stride_wh, stride_wn, stride_wd,
                                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NAN_ROWS: tl.constexpr,
                                HAS_W: tl.constexpr):
    """y (B, H, N, D) contiguous from x. NAN_ROWS False: every non-finite entry of x replaced by 0.
    NAN_ROWS True: a whole token row of NaN where x (or, with HAS_W, w) holds a non-finite entry, else x.
    The forward reads NaN rows for q and k (a NaN score, where allowed, poisons exactly the rows that attend
    it; masked scores are replaced by -inf) and a zeroed v (P @ V never forms 0 * NaN); the backward reads
    zeroed copies of all three (its NaN travels in the LSE)."""
    pid_m, pid_bh, b, h = _program_ids(n_blocks, H)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < N)[:, None] & (offs_d[None, :] < D)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + offs_m[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=msk, other=0.0)
    fin = tl.abs(x) < float("inf")                      # false for +-inf and NaN
    if NAN_ROWS:
        nbad = tl.sum(tl.where(fin, 0, 1), 1)
        if HAS_W:
            w = tl.load(w_ptr + b * stride_wb + h * stride_wh + offs_m[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                        mask=msk, other=0.0)
            nbad += tl.sum(tl.where(tl.abs(w) < float("inf"), 0, 1), 1)
        y = tl.where(nbad[:, None] > 0, float("nan"), x)
    else:
        y = tl.where(fin, x, 0.0)
    tl.store(y_ptr + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, seg_q, jb, k_ptr, v_ptr, segk_ptr, N, qk_scale,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
              BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr, SEG_MASK: tl.constexpr, TAIL: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """One key block of the forward's online softmax. SEG_MASK: per-element segment mask (padding keys are
    not even read); TAIL: only keys past N are masked; neither: a full tile, no mask at all."""
    offs_n = jb * BLOCK_N + offs_n0
    kt_ptrs = k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if SEG_MASK:
        n_in = offs_n < N
        seg_k = tl.load(segk_ptr + offs_n * stride_sn, mask=n_in, other=-1)
        ld_n = n_in & (seg_k >= 0)
        kt = tl.load(kt_ptrs, mask=ld_n[None, :] & d_in[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=ld_n[:, None] & d_in[None, :], other=0.0)
    elif TAIL:
        n_in = offs_n < N
        kt = tl.load(kt_ptrs, mask=n_in[None, :] & d_in[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_in[:, None] & d_in[None, :], other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=d_in[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_in[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = _dot(q, kt, IEEE, ACC)
    s = s * qk_scale
    if SEG_MASK:
        ok = (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] >= 0)
        s = tl.where(ok, s, float("-inf"))
    elif TAIL:    # without ids only keys past N are masked (never a whole block)
        s = tl.where(n_in[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SEG_MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the input dtype before the PV product (as on the GPU, also when upcasting)
    pv = p.to(v_ptr.dtype.element_ty)
    if UPCAST:
        pv = pv.to(tl.float32)
    acc = acc * alpha[:, None] + _dot(pv, v, IEEE, ACC)
    return acc, m_new, l_i


@triton.jit
def _patch_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, seg_ptr, range_ptr, o_ptr, lse_ptr,
        N, D, H, n_mblocks, qk_scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_sb, stride_sn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        ACC: tl.constexpr):
    pid_m, pid_bh, b, h = _program_ids(n_mblocks, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    d_in = offs_d < D

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    seg_ptr += b * stride_sb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if HAS_SEG:
        seg_q = tl.load(seg_ptr + offs_m * stride_sn, mask=m_in, other=-1)
        lo, hi, flo, fhi = _load_range(range_ptr, b * n_mblocks + pid_m)
        # the masked tiles [lo, flo) + [fhi, hi), then the full ones [flo, fhi) without any mask
        for t in range(lo, hi - (fhi - flo)):
            jb = _past_run(t, flo, fhi)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, seg_q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                                      BLOCK_N, True, True, False, UPCAST, IEEE, ACC)
        for jb in range(flo, fhi):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, seg_q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                                      BLOCK_N, True, False, False, UPCAST, IEEE, ACC)
    else:
        for jb in range(0, tl.cdiv(N, BLOCK_N)):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                                      stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                                      BLOCK_N, False, False, not EVEN_N, UPCAST, IEEE, ACC)

    # l >= 1 for a row with any allowed key (its max term is exp2(0)); l == 0 only for empty rows.
    # (Not `l > 0`: a NaN input must give NaN, not a silent zero row.)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # +inf: P == 0 in backward
    o_base = pid_bh * N * D
    tl.store(o_ptr + o_base + offs_m[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_in[:, None] & d_in[None, :])
    tl.store(lse_ptr + pid_bh * N + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=m_in)


@triton.jit
def _patch_attn_bwd_preprocess_kernel(o_ptr, do_ptr, lse_ptr, delta_ptr, dos_ptr, lseb_ptr, N, D, n_mblocks,
                                      stride_dob, stride_doh, stride_don, stride_dod, H,
                                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                                      CLEAN: tl.constexpr):
    """delta = rowsum(dO * O). CLEAN (with segment ids): also a finite copy of dO (contiguous) for the block
    matmuls, delta made finite, and the LSE of the backward = NaN on every row whose dO or O is non-finite, so
    its NaN reaches only the pairs that row attends (P = exp2(s - lse) there; masked pairs stay exact 0)."""
    pid_m, pid_bh, b, h = _program_ids(n_mblocks, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    msk = m_in[:, None] & (offs_d[None, :] < D)
    o = tl.load(o_ptr + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], mask=msk, other=0.0).to(ACC)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=msk, other=0.0)
    if CLEAN:
        fin = tl.abs(do) < float("inf")
        do = tl.where(fin, do, 0.0)
        tl.store(dos_ptr + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], do, mask=msk)
        delta = tl.sum(o * do.to(ACC), 1)
        bad = (tl.sum(tl.where(fin, 0, 1), 1) > 0) | ~(tl.abs(delta) < float("inf"))
        lse = tl.load(lse_ptr + pid_bh * N + offs_m, mask=m_in, other=0.0)
        tl.store(lseb_ptr + pid_bh * N + offs_m, tl.where(bad, float("nan"), lse), mask=m_in)
        delta = tl.where(bad, 0.0, delta)
    else:
        delta = tl.sum(o * do.to(ACC), 1)
    tl.store(delta_ptr + pid_bh * N + offs_m, delta, mask=m_in)


@triton.jit
def _dkdv_tile(dk, dv, k, v, seg_k, n_in, ib, q_ptr, do_ptr, segq_ptr, lse_ptr, delta_ptr, N, qk_scale,
               stride_qn, stride_qd, stride_don, stride_dod, stride_sn, offs_m0, offs_d, d_in,
               BLOCK_M: tl.constexpr, SEG_MASK: tl.constexpr, TAIL: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr, ACC: tl.constexpr):
    """One query block of the dK / dV sweep (masking as in ``_fwd_tile``; TAIL: keys or queries past N)."""
    offs_m = ib * BLOCK_M + offs_m0
    qt_ptrs = q_ptr + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd
    do_ptrs = do_ptr + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    if SEG_MASK or TAIL:
        m_in = offs_m < N
        ld_m = m_in
        if SEG_MASK:   # padding queries (and their upstream gradient) are never read
            seg_q = tl.load(segq_ptr + offs_m * stride_sn, mask=m_in, other=-1)
            ld_m = m_in & (seg_q >= 0)
        qt = tl.load(qt_ptrs, mask=ld_m[None, :] & d_in[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=ld_m[:, None] & d_in[None, :], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_in, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=m_in, other=0.0)
    else:
        qt = tl.load(qt_ptrs, mask=d_in[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=d_in[None, :], other=0.0)
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    if UPCAST:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    st = _dot(k, qt, IEEE, ACC)
    if SEG_MASK:
        ok = (seg_k[:, None] == seg_q[None, :]) & (seg_q[None, :] >= 0)
        pt = tl.exp2(tl.where(ok, st * qk_scale - lse[None, :], float("-inf")))  # P^T, exactly 0 where masked
    elif TAIL:  # keys past N: their rows are never stored, masked only to keep them finite
        pt = tl.exp2(tl.where(n_in[:, None], st * qk_scale - lse[None, :], float("-inf")))
    else:  # (queries past N, if any, have lse = +inf, so P = 0 there)
        pt = tl.exp2(st * qk_scale - lse[None, :])
    ptc = pt.to(do_ptr.dtype.element_ty)
    if UPCAST:
        ptc = ptc.to(tl.float32)
    dv += _dot(ptc, do, IEEE, ACC)
    dpt = _dot(v, tl.trans(do), IEEE, ACC)
    dst = pt * (dpt - delta[None, :])
    dsc = dst.to(q_ptr.dtype.element_ty)
    if UPCAST:
        dsc = dsc.to(tl.float32)
    dk += _dot(dsc, tl.trans(qt), IEEE, ACC)
    return dk, dv


@triton.jit
def _patch_attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, seg_ptr, range_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        N, D, H, n_nblocks, qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_sb, stride_sn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        ACC: tl.constexpr):
    """One program per (b, h, key block): dK, dV summed over the query blocks in its range."""
    pid_n, pid_bh, b, h = _program_ids(n_nblocks, H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < N
    d_in = offs_d < D
    kv_msk = n_in[:, None] & d_in[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_msk, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_msk, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptr += b * stride_qb + h * stride_qh
    do_ptr += b * stride_dob + h * stride_doh
    seg_ptr += b * stride_sb
    lse_ptr += pid_bh * N
    delta_ptr += pid_bh * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    if HAS_SEG:
        seg_k = tl.load(seg_ptr + offs_n * stride_sn, mask=n_in, other=-1)
        lo, hi, flo, fhi = _load_range(range_ptr, b * n_nblocks + pid_n)
        for t in range(lo, hi - (fhi - flo)):
            ib = _past_run(t, flo, fhi)
            dk, dv = _dkdv_tile(dk, dv, k, v, seg_k, n_in, ib, q_ptr, do_ptr, seg_ptr, lse_ptr, delta_ptr, N,
                                qk_scale, stride_qn, stride_qd, stride_don, stride_dod, stride_sn, offs_m0, offs_d,
                                d_in, BLOCK_M, True, False, UPCAST, IEEE, ACC)
        for ib in range(flo, fhi):
            dk, dv = _dkdv_tile(dk, dv, k, v, seg_k, n_in, ib, q_ptr, do_ptr, seg_ptr, lse_ptr, delta_ptr, N,
                                qk_scale, stride_qn, stride_qd, stride_don, stride_dod, stride_sn, offs_m0, offs_d,
                                d_in, BLOCK_M, False, False, UPCAST, IEEE, ACC)
    else:
        for ib in range(0, tl.cdiv(N, BLOCK_M)):
            dk, dv = _dkdv_tile(dk, dv, k, v, n_in, n_in, ib, q_ptr, do_ptr, seg_ptr, lse_ptr, delta_ptr, N,
                                qk_scale, stride_qn, stride_qd, stride_don, stride_dod, stride_sn, offs_m0, offs_d,
                                d_in, BLOCK_M, False, not EVEN_N, UPCAST, IEEE, ACC)
    dk = dk * sm_scale
    base = pid_bh * N * D
    tl.store(dk_ptr + base + offs_n[:, None] * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_msk)
    tl.store(dv_ptr + base + offs_n[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_msk)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, seg_q, jb, k_ptr, v_ptr, segk_ptr, N, qk_scale,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
             BLOCK_N: tl.constexpr, SEG_MASK: tl.constexpr, TAIL: tl.constexpr, UPCAST: tl.constexpr,
             IEEE: tl.constexpr, ACC: tl.constexpr):
    """One key block of the dQ sweep (masking as in ``_fwd_tile``)."""
    offs_n = jb * BLOCK_N + offs_n0
    kt_ptrs = k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vt_ptrs = v_ptr + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    if SEG_MASK or TAIL:
        n_in = offs_n < N
        ld_n = n_in
        if SEG_MASK:   # padding keys are never read
            seg_k = tl.load(segk_ptr + offs_n * stride_sn, mask=n_in, other=-1)
            ld_n = n_in & (seg_k >= 0)
        kt = tl.load(kt_ptrs, mask=ld_n[None, :] & d_in[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=ld_n[None, :] & d_in[:, None], other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=d_in[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=d_in[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = _dot(q, kt, IEEE, ACC)
    dp = _dot(do, vt, IEEE, ACC)
    if SEG_MASK:
        ok = (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] >= 0)
        p = tl.exp2(tl.where(ok, s * qk_scale - lse[:, None], float("-inf")))
    elif TAIL:  # keys past N: mask them (their P = exp2(-lse) could overflow, and inf * 0 = NaN)
        p = tl.exp2(tl.where(n_in[None, :], s * qk_scale - lse[:, None], float("-inf")))
    else:
        p = tl.exp2(s * qk_scale - lse[:, None])
    ds = p * (dp - delta[:, None])
    dsc = ds.to(k_ptr.dtype.element_ty)
    if UPCAST:
        dsc = dsc.to(tl.float32)
    dq += _dot(dsc, tl.trans(kt), IEEE, ACC)
    return dq


@triton.jit
def _patch_attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, seg_ptr, range_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        N, D, H, n_mblocks, qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_sb, stride_sn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        ACC: tl.constexpr):
    """One program per (b, h, query block): dQ summed over the key blocks in its range."""
    pid_m, pid_bh, b, h = _program_ids(n_mblocks, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    d_in = offs_d < D
    q_msk = m_in[:, None] & d_in[None, :]
    ld_msk = q_msk
    seg_ptr += b * stride_sb
    if HAS_SEG:   # padding rows (and their upstream gradient) are never read
        seg_q = tl.load(seg_ptr + offs_m * stride_sn, mask=m_in, other=-1)
        ld_msk = q_msk & (seg_q >= 0)[:, None]
    else:
        seg_q = m_in
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=ld_msk, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=ld_msk, other=0.0)
    lse = tl.load(lse_ptr + pid_bh * N + offs_m, mask=m_in, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh * N + offs_m, mask=m_in, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if HAS_SEG:
        lo, hi, flo, fhi = _load_range(range_ptr, b * n_mblocks + pid_m)
        for t in range(lo, hi - (fhi - flo)):
            jb = _past_run(t, flo, fhi)
            dq = _dq_tile(dq, q, do, lse, delta, seg_q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                          BLOCK_N, True, False, UPCAST, IEEE, ACC)
        for jb in range(flo, fhi):
            dq = _dq_tile(dq, q, do, lse, delta, seg_q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                          BLOCK_N, False, False, UPCAST, IEEE, ACC)
    else:
        for jb in range(0, tl.cdiv(N, BLOCK_N)):
            dq = _dq_tile(dq, q, do, lse, delta, seg_q, jb, k_ptr, v_ptr, seg_ptr, N, qk_scale,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_sn, offs_n0, offs_d, d_in,
                          BLOCK_N, False, not EVEN_N, UPCAST, IEEE, ACC)
    dq = dq * sm_scale
    tl.store(dq_ptr + pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_msk)

# ----------------------------------------------------------------------------- reference

def patch_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        segment_ids: torch.Tensor | None = None, scale: float | None = None,
                        chunk_elems: int = 1 << 26) -> torch.Tensor:
    """Pure-torch masked attention from an explicit boolean mask (the CPU path of the models).

    ``allowed[b, i, j] = (segment_ids[b, i] == segment_ids[b, j]) & (segment_ids[b, j] >= 0)``;
    rows with no allowed key (padding) give zeros and zero gradients. Computed in the input dtype.
    Non-finite values of tokens a row does not attend never reach it (where-selects, finite stand-ins in
    the matmuls); a row attending a token with a non-finite value is NaN.
    Query rows are processed in chunks of at most ``chunk_elems`` score entries, which bounds the
    transient memory (what autograd keeps for backward is one probability matrix, as in any
    differentiable dense attention).
    """
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    if segment_ids is None:
        segment_ids = torch.zeros(B, N, dtype=torch.long, device=q.device)
    seg = segment_ids.to(device=q.device, dtype=torch.long)
    rows = max(1, min(N, chunk_elems // max(1, B * H * N)))
    nan = float("nan")
    kf = _finite_torch(k)
    k_bad = ~torch.isfinite(k).all(-1)                                           # (B, H, N)
    v_bad = ~torch.isfinite(v).all(-1, keepdim=True)                              # (B, H, N, 1)
    vf = _finite_torch(v)
    outs = []
    for i0 in range(0, max(N, 1), rows):  # N == 0: one empty chunk keeps the result in the graph
        sq = seg[:, i0:i0 + rows]
        allowed = (sq[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)  # (B, n, N)
        allowed = allowed[:, None]  # (B, 1, n, N), broadcast over heads
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, n, 1): padding rows
        qc = q[:, :, i0:i0 + rows]
        s = torch.matmul(_finite_torch(qc) * scale, kf.transpose(-1, -2))
        # a non-finite q / k entry makes the scores it touches NaN (as a dot product would); masked pairs
        # are then replaced by where-selects, so tokens a row does not attend never reach it
        s = torch.where((~torch.isfinite(qc).all(-1))[..., None] | k_bad[..., None, :], nan, s)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)  # empty rows: finite dummy
        p = torch.where(allowed, torch.softmax(s, dim=-1), 0.0)   # exact zeros also in a NaN row
        o = _MaskedPV.apply(p, vf, allowed)
        if tracing() or bool(v_bad.any()):   # a row attending a key with a non-finite v is NaN
            links = torch.matmul(allowed.to(v.dtype).expand(B, H, -1, -1), v_bad.to(v.dtype))
            o = torch.where(links > 0, nan, o)
        outs.append(o.masked_fill(empty, 0.0))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _finite_torch(x):
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


class _MaskedPV(torch.autograd.Function):
    """o = p @ v for the reference, with a v-gradient that takes a non-finite upstream gradient of row i only
    into the keys row i attends (autograd's p^T @ dO forms 0 * NaN for every masked pair)."""

    @staticmethod
    def forward(p, v, allowed):
        return torch.matmul(p, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        p, v, allowed = ctx.saved_tensors                                   # (B,H,n,N) (B,H,N,D) (B,1,n,N)
        bad = (~torch.isfinite(g).all(-1, keepdim=True)).to(g.dtype)        # (B, H, n, 1)
        dv = torch.matmul(p.transpose(-1, -2), _finite_torch(g))            # (B, H, N, D)
        links = torch.matmul(allowed.transpose(-1, -2).to(g.dtype), bad)    # (B, H, N, 1)
        dv = torch.where(links > 0, float("nan"), dv)
        dp = torch.matmul(g, v.transpose(-1, -2))    # NaN rows stay whole; the caller's where drops masked pairs
        return dp, dv, None


# ----------------------------------------------------------------------------- launchers

def _head_block(D: int) -> int:
    return max(16, next_pow2(D))


def _fwd_config(block_d: int, dtype: torch.dtype, interp: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, by head-dim bucket and element size.
    Chosen so every bucket fits sm_80's shared memory (checked by the AOT tests). Under the
    interpreter, where each op costs the same whatever its size, fewer and larger blocks are used."""
    if interp:
        return (128, 128, 4, 1)
    if dtype == torch.float64:  # verification dtype: small tiles, fits sm_80 at every head dim
        return (32, 32, 4, 1) if block_d <= 64 else (16, 16, 4, 1)
    wide = dtype == torch.float32
    if block_d <= 64:
        cfg = (64, 64, 4, 3) if wide else (128, 64, 4, 3)
    elif block_d == 128:
        cfg = (64, 32, 4, 2) if wide else (128, 64, 8, 3)
    else:
        cfg = (32, 32, 4, 1) if wide else (64, 64, 8, 2)
    return cfg


def _bwd_config(block_d: int, dtype: torch.dtype, interp: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels.
    Interpreted: unequal blocks on purpose, so key->query and query->key ranges differ."""
    if interp:
        return (64, 128, 4, 1)
    if dtype == torch.float64:
        return (32, 32, 4, 1) if block_d <= 64 else (16, 16, 4, 1)
    wide = dtype == torch.float32
    if block_d <= 64:
        cfg = (32, 64, 4, 2) if wide else (64, 64, 4, 2)
    elif block_d == 128:
        cfg = (32, 32, 4, 1) if wide else (64, 64, 8, 2)
    else:
        cfg = (16, 32, 4, 1) if wide else (32, 32, 4, 1)
    return cfg


def _block_ranges(seg: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """(B, n_row_blocks, 4) int32 [lo, hi, flo, fhi): the column blocks whose id range can meet each row
    block's, and inside them the run of column blocks that hold only the row block's one id (no mask needed).

    The relation is symmetric, so this serves query->key (forward, dQ) and key->query (dK/dV).
    Every block in [lo, hi) is visited; blocks inside that do not meet are masked per element, so
    non-contiguous ids stay exact and contiguous ids get a tight range; [flo, fhi) is empty (== lo) where
    the row block holds more than one id or padding. One launch, O(N^2 / block) int loads (tiny next to the
    attention).
    """
    B, N = seg.shape
    nr, nc = triton.cdiv(N, block_rows), triton.cdiv(N, block_cols)
    rng = torch.empty((B, nr, 4), dtype=torch.int32, device=seg.device)
    if rng.numel():
        chunk = max(1, min(next_pow2(nc), 4096 // block_cols))
        launch(_patch_attn_ranges_kernel, (B * nr,), seg, rng, N, nr, nc, seg.stride(0), seg.stride(1),
               BLOCK_R=block_rows, BLOCK_C=block_cols, CHUNK=chunk, SEG64=seg.dtype == torch.int64)
    return rng


def _sanitize(x, nan_rows=False, w=None):
    """A contiguous copy of x for the kernels: see ``_patch_attn_sanitize_kernel``."""
    B, H, N, D = x.shape
    y = torch.empty((B, H, N, D), dtype=x.dtype, device=x.device)
    block = max(1, min(128, 4096 // _head_block(D)))
    nb = triton.cdiv(N, block)
    w = x if w is None else w
    launch(_patch_attn_sanitize_kernel, (nb * B * H,), x, w, y, N, D, H, nb, *_strides4(x), *_strides4(w),
           BLOCK=block, BLOCK_D=_head_block(D), NAN_ROWS=nan_rows, HAS_W=w is not x)
    return y


def _flags(dtype):
    upcast = interpreting() and dtype == torch.bfloat16  # the interpreter computes bf16 tl.dot wrongly
    ieee = dtype == torch.float32
    return upcast, ieee


def _strides4(t):
    return tuple(t.stride())


def _patch_attn_fwd(q, k, v, segment_ids, scale):
    """Launch the forward; returns (out (B,H,N,D) contiguous, lse (B,H,N) fp32 (fp64 for fp64), base 2).

    With segment ids the kernel reads copies of q, k, v made by one elementwise pass each (NaN rows for q and
    k, zeroed v), so non-finite values reach exactly the rows that attend them."""
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    check_index_range("q", B * H * N * max(D, 1), 2**62)
    block_d = _head_block(D)
    BM, BN, warps, stages = _fwd_config(block_d, q.dtype, interpreting())
    nm = triton.cdiv(N, BM)
    has_seg = segment_ids is not None
    if has_seg:
        seg = segment_ids
        rng = _block_ranges(seg, BM, BN)
        q, k, v = _sanitize(q, nan_rows=True), _sanitize(k, nan_rows=True, w=v), _sanitize(v)
    else:
        seg = rng = torch.empty((1, 4), dtype=torch.int32, device=q.device)   # never read
    upcast, ieee = _flags(q.dtype)
    launch(_patch_attn_fwd_kernel, (nm * B * H,),
        q, k, v, seg, rng, out, lse, N, D, H, nm, float(scale) * LOG2E,
        *_strides4(q), *_strides4(k), *_strides4(v), seg.stride(0), seg.stride(1),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, HAS_SEG=has_seg, EVEN_N=N % BN == 0, UPCAST=upcast, IEEE=ieee,
        ACC=tl_dtype(acc_dtype(q.dtype)), num_warps=warps, num_stages=stages)
    return out, lse


def _patch_attn_bwd(do, q, k, v, out, lse, segment_ids, scale):
    """Launch the backward; returns (dq, dk, dv), each (B,H,N,D) contiguous in q's dtype."""
    B, H, N, D = q.shape
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)   # every element is written by a kernel
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    block_d = _head_block(D)
    acc = tl_dtype(acc_dtype(q.dtype))
    upcast, ieee = _flags(q.dtype)
    has_seg = segment_ids is not None
    BM0 = 64
    nm0 = triton.cdiv(N, BM0)
    delta = torch.empty((B, H, N), dtype=acc_dtype(q.dtype), device=q.device)
    if has_seg:   # finite copies (as in the forward); dO made finite, its NaN rows moved into the LSE
        q, k, v = _sanitize(q), _sanitize(k), _sanitize(v)
        do_s = torch.empty_like(dq)
        lse_b = torch.empty_like(lse)
    else:
        do_s, lse_b = do, lse
    launch(_patch_attn_bwd_preprocess_kernel, (nm0 * B * H,),
        out, do, lse, delta, do_s, lse_b, N, D, nm0, *_strides4(do), H, BLOCK_M=BM0, BLOCK_D=block_d, ACC=acc,
        CLEAN=has_seg)
    do, lse = do_s, lse_b
    BM, BN, warps, stages = _bwd_config(block_d, q.dtype, interpreting())
    assert BN % BM == 0   # EVEN_N (N % BN == 0) then also means no query tail
    nm, nn = triton.cdiv(N, BM), triton.cdiv(N, BN)
    if has_seg:
        seg = segment_ids
        rng_kv = _block_ranges(seg, BN, BM)  # key block -> query blocks
        rng_q = rng_kv if BM == BN else _block_ranges(seg, BM, BN)  # query block -> key blocks
    else:
        seg = rng_kv = rng_q = torch.empty((1, 4), dtype=torch.int32, device=q.device)   # never read
    qk_scale = float(scale) * LOG2E
    common = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), seg.stride(0), seg.stride(1))
    meta = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, HAS_SEG=has_seg, EVEN_N=N % BN == 0, UPCAST=upcast,
                IEEE=ieee, ACC=acc, num_warps=warps, num_stages=stages)  # EVEN_N: no key tail in either kernel
    launch(_patch_attn_bwd_dkdv_kernel, (nn * B * H,),
        q, k, v, seg, rng_kv, do, lse, delta, dk, dv, N, D, H, nn, qk_scale, float(scale), *common, **meta)
    launch(_patch_attn_bwd_dq_kernel, (nm * B * H,),
        q, k, v, seg, rng_q, do, lse, delta, dq, N, D, H, nm, qk_scale, float(scale), *common, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op("nano4d::patch_attention", mutates_args=())
def _patch_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered Triton op: returns (out, lse); ``segment_ids`` None or int32 / int64 (B, N)."""
    return _patch_attn_fwd(q, k, v, segment_ids, scale)


@_patch_attention_op.register_fake
def _(q, k, v, segment_ids, scale):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("nano4d::patch_attention_backward", mutates_args=())
def _patch_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, segment_ids: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _patch_attn_bwd(do, q, k, v, out, lse, segment_ids, scale)


@_patch_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, segment_ids, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_ids, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segment_ids)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segment_ids = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = _patch_attention_bwd_op(grad_out.contiguous(), q, k, v, out, lse, segment_ids, ctx.scale)
    return dq, dk, dv, None, None


_patch_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op

def _validate(q, k, v, segment_ids, scale):
    check_tensor("q", q, ndim=4, dtypes=_DOT_DTYPES)
    B, H, N, D = q.shape
    check_tensor("k", k, shape=(B, H, N, D), dtypes=(q.dtype,))
    check_tensor("v", v, shape=(B, H, N, D), dtypes=(q.dtype,))
    check_same_device(q=q, k=k, v=v)
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D={D} not supported (1 <= D <= {MAX_HEAD_DIM})")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor):
            raise ValueError(f"segment_ids: expected a torch.Tensor or None, got {type(segment_ids).__name__}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids: dtype {segment_ids.dtype} must be an integer type")
        check_tensor("segment_ids", segment_ids, shape=(B, N), device=q.device)
    if scale is not None:
        if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite Python number or None, got {scale!r}")


def patch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """Softmax attention restricted to equal, non-negative segment ids; see the module docstring.

    q, k, v (B, H, N, D) float; segment_ids (B, N) integer or None; returns (B, H, N, D).
    CUDA tensors -> Triton kernels; CPU tensors -> ``patch_attention_ref`` (unless NANO4D_FORCE_TRITON=1).
    """
    _validate(q, k, v, segment_ids, scale)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if not use_triton(q, k, v):
        return patch_attention_ref(q, k, v, segment_ids, scale)
    seg = segment_ids
    if seg is not None and seg.dtype not in (torch.int32, torch.int64):   # the kernels read int32 / int64 ids
        seg = seg.to(torch.int32)
    return _patch_attention_op(q, k, v, seg, scale)[0]


patch_attn = patch_attention   # the op under its file's name
