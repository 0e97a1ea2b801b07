"""NeuS SDF volume rendering over a feature voxel grid (fused ray marching, forward + backward).

For every ray (o, d) and sorted sample distances t_0 <= ... <= t_{S-1}:

    p_k   = o + t_k * d                                   (volume frame, [-1, 1]^3)
    v_k   = trilinear(volume, p_k)                        (grid_sample: align_corners=True, zero padding)
    sdf_k = v_k[0],  f_k = v_k[1:]                        (channel 0 is the signed distance)
    Phi_k = sigmoid(inv_s * sdf_k)
    a_i   = clamp((Phi_i - Phi_{i+1} + 1e-5) / (Phi_i + 1e-5), 0, 1)       sections i = 0 .. S-2
    T_i   = prod_{j<i} (1 - a_j),   w_i = T_i * a_i * [T_i >= 1e-4]      (early stop)
    features = sum_i w_i (f_i + f_{i+1}) / 2,  depth = sum_i w_i (t_i + t_{i+1}) / 2,  opacity = sum_i w_i

Layouts: ``volume`` (B, C, Z, Y, X) with C >= 1 (C - 1 feature channels); ``origins``, ``dirs`` (B, R, 3);
``t_vals`` (B, R, S), S >= 2, sorted ascending along S (equal neighbours allowed: zero-length sections);
``inv_s`` a scalar tensor (NeuS sharpness s, positive, ~20 at init). Outputs ``features`` (B, R, C-1),
``depth`` (B, R), ``opacity`` (B, R). A point (x, y, z) indexes the (X, Y, Z) dims like ``F.grid_sample``;
index i <-> -1 + 2i/(N-1). ``dirs`` need not be unit: t is in units of |d|.

Zero padding means a ray leaving the box sees the SDF drop to 0, i.e. a false surface on the box boundary:
callers should clip t to the ray-box intersection. Coordinates are clamped to [-5, 5] and non-finite ones
replaced by -5 (both always outside the box, so nothing changes for finite points while NaN/Inf rays never
index out of bounds); NaN in the volume propagates to the rays that read it.

Early stop: section i contributes only while T_i >= 1e-4; the kernel stops marching there, and forward,
backward and the reference use the same rule (the mask itself is not differentiated).

Differentiable w.r.t. volume, origins, dirs, t_vals and inv_s. The Triton backward recomputes samples
back to front: dL/da_i = T_i (u_i - A_i) with u_i = <g_feat, f_mid> + g_depth t_mid + g_opac the section's
upstream value and A_i the "rendering from i+1 on" recursion A_{i-1} = a_i u_i + (1 - a_i) A_i (no
total-minus-prefix cancellation). T_i is rebuilt from the saved T of the last marched section as
T_{i+1} / (1 - a_i), a division that only happens where section i+1 was marched, i.e. 1 - a_i >= 1e-4 / T_i,
so a = 1 exactly gives exact, finite gradients. Memory: the forward keeps its outputs plus two per-ray
scalars (sections marched, T of the last one); no per-sample tensor is ever stored, the backward's extra
memory is the fp32 gradient buffers (volume-sized, and (B, R, S) for t_vals).

dtypes: volume fp32 / bf16 / fp16 / fp64, rays fp32 / fp64 (or low precision); arithmetic in fp32
(fp64 when any input is fp64); outputs in the promoted dtype of volume, origins, dirs and t_vals.
Volume gradients are accumulated with fp32 atomics (so volume grads are not bitwise deterministic).
Limits: C - 1 <= 256 feature channels; every tensor below 2^31 elements.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, acc_dtype, check_index_range, check_same_device, check_tensor,
                             interpreting, launch, tl_dtype, tracing, use_triton)

EPS_ALPHA = 1e-5      # NeuS' epsilon in the alpha formula
T_STOP = 1e-4         # early-stop transmittance threshold
COORD_LIM = 5.0       # sample coordinates are clamped to [-COORD_LIM, COORD_LIM] (always outside the box)
MAX_FEATURES = 256


# ============================================================================ Triton kernels
# The kernels read the caller's (B, C, Z, Y, X) volume in place through its strides (no copy per call):
# a corner's offset is b * stride_b + z * stride_z + y * stride_y + x * stride_x, the SDF is channel 0 and
# feature c sits at + (1 + c) * stride_c. Channels-last storage (stride_c == 1, torch.channels_last_3d)
# makes a corner's features one contiguous row: coalesced loads and atomics. The volume gradient is
# accumulated with atomics into a buffer with the same strides. Features are processed in chunks of BLOCK_F channels: the forward grid has one program per (ray block,
# chunk) (the alpha pass is redone per chunk; one chunk for C <= 33), the backward loops over chunks.

@triton.jit
def _axis(p, n, stride, CDT: tl.constexpr):
    """One axis of the trilinear stencil for normalized coordinate p on an axis of n voxels:
    (offset of the low / high neighbour, their in-bounds flags, their weights, d index / d p).
    Coordinates are clamped to [-5, 5] and NaN mapped to -5 (always outside), so indices stay small."""
    inr = tl.abs(p) <= 5.0
    p = tl.where(inr, p, tl.where(p > 5.0, 5.0, -5.0))
    scale = 0.5 * (n - 1).to(CDT)
    i = (p + 1.0) * scale
    i0f = tl.floor(i)
    fr = i - i0f
    i0 = i0f.to(tl.int32)
    return (i0 * stride, i0 * stride + stride, (i0 >= 0) & (i0 < n), (i0 >= -1) & (i0 < n - 1),
            1.0 - fr, fr, tl.where(inr, scale, 0.0))


@triton.jit
def _sample_fwd(sdf_ptr, fv_ptr, vb, px, py, pz, X, Y, Z, sx, sy, sz, sc, offs_f, mask_r, mask_f,
                CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Trilinear SDF (BLOCK_R,) and one feature chunk (BLOCK_R, BLOCK_F) at p."""
    ox0, ox1, vx0, vx1, wx0, wx1, _sx = _axis(px, X, sx, CDT)
    oy0, oy1, vy0, vy1, wy0, wy1, _sy = _axis(py, Y, sy, CDT)
    oz0, oz1, vz0, vz1, wz0, wz1, _sz = _axis(pz, Z, sz, CDT)
    sdf = tl.zeros([BLOCK_R], dtype=CDT)
    feat = tl.zeros([BLOCK_R, BLOCK_F], dtype=CDT)
    for c in tl.static_range(8):
        ok = mask_r & (vx1 if c & 1 else vx0) & (vy1 if c & 2 else vy0) & (vz1 if c & 4 else vz0)
        off = vb + (ox1 if c & 1 else ox0) + (oy1 if c & 2 else oy0) + (oz1 if c & 4 else oz0)
        w = (wx1 if c & 1 else wx0) * (wy1 if c & 2 else wy0) * (wz1 if c & 4 else wz0)
        v0 = tl.load(sdf_ptr + off, mask=ok, other=0.0).to(CDT)
        fv = tl.load(fv_ptr + off[:, None] + offs_f[None, :] * sc, mask=ok[:, None] & mask_f[None, :],
                     other=0.0).to(CDT)
        sdf += w * v0
        feat += w[:, None] * fv
    return sdf, feat


@triton.jit
def _sample_bwd(sdf_ptr, fv_ptr, vb, px, py, pz, gf_ptr, offs_r, X, Y, Z, str_x, str_y, str_z, sc, NF, mask_r,
                CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Per ray: sdf, e = <g_feat, f>, d sdf / dp (3) and d e / dp (3), p in normalized units."""
    ox0, ox1, vx0, vx1, wx0, wx1, sx = _axis(px, X, str_x, CDT)
    oy0, oy1, vy0, vy1, wy0, wy1, sy = _axis(py, Y, str_y, CDT)
    oz0, oz1, vz0, vz1, wz0, wz1, sz = _axis(pz, Z, str_z, CDT)
    # values at the 8 corners, combined as v = sum w_c v_c; the derivative along x is the same sum
    # with wx0 -> -1, wx1 -> +1 (likewise y, z); accumulated as bilinear faces to save multiplies
    v = tl.zeros([BLOCK_R], dtype=CDT)
    dvx = tl.zeros([BLOCK_R], dtype=CDT)
    dvy = tl.zeros([BLOCK_R], dtype=CDT)
    dvz = tl.zeros([BLOCK_R], dtype=CDT)
    for c in tl.static_range(8):
        ok = mask_r & (vx1 if c & 1 else vx0) & (vy1 if c & 2 else vy0) & (vz1 if c & 4 else vz0)
        off = vb + (ox1 if c & 1 else ox0) + (oy1 if c & 2 else oy0) + (oz1 if c & 4 else oz0)
        val = tl.load(sdf_ptr + off, mask=ok, other=0.0).to(CDT)
        wx = wx1 if c & 1 else wx0
        wy = wy1 if c & 2 else wy0
        wz = wz1 if c & 4 else wz0
        sgx = 1.0 if c & 1 else -1.0
        sgy = 1.0 if c & 2 else -1.0
        sgz = 1.0 if c & 4 else -1.0
        wyz = wy * wz
        v += wx * wyz * val
        dvx += sgx * wyz * val
        dvy += sgy * wx * wz * val
        dvz += sgz * wx * wy * val
    e = tl.zeros([BLOCK_R], dtype=CDT)
    dex = tl.zeros([BLOCK_R], dtype=CDT)
    dey = tl.zeros([BLOCK_R], dtype=CDT)
    dez = tl.zeros([BLOCK_R], dtype=CDT)
    for f0 in range(0, NF, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < NF
        gfeat = tl.load(gf_ptr + offs_r[:, None] * NF + offs_f[None, :], mask=mask_r[:, None] & mask_f[None, :],
                        other=0.0).to(CDT)
        for c in tl.static_range(8):
            ok = mask_r & (vx1 if c & 1 else vx0) & (vy1 if c & 2 else vy0) & (vz1 if c & 4 else vz0)
            off = vb + (ox1 if c & 1 else ox0) + (oy1 if c & 2 else oy0) + (oz1 if c & 4 else oz0)
            fv = tl.load(fv_ptr + off[:, None] + offs_f[None, :] * sc, mask=ok[:, None] & mask_f[None, :],
                         other=0.0).to(CDT)
            dot = tl.sum(fv * gfeat, axis=1)
            wx = wx1 if c & 1 else wx0
            wy = wy1 if c & 2 else wy0
            wz = wz1 if c & 4 else wz0
            sgx = 1.0 if c & 1 else -1.0
            sgy = 1.0 if c & 2 else -1.0
            sgz = 1.0 if c & 4 else -1.0
            wyz = wy * wz
            e += wx * wyz * dot
            dex += sgx * wyz * dot
            dey += sgy * wx * wz * dot
            dez += sgz * wx * wy * dot
    return v, e, dvx * sx, dvy * sy, dvz * sz, dex * sx, dey * sy, dez * sz


@triton.jit
def _scatter_bwd(gsdf_ptr, gfv_ptr, vb, px, py, pz, gsdf, cf, gf_ptr, offs_r, X, Y, Z, sx, sy, sz, sc, NF, mask_r,
                 CDT: tl.constexpr, BLOCK_F: tl.constexpr):
    """grad[corners] += trilinear weight * (gsdf, cf * g_feat): fp32/fp64 atomics, relaxed ordering (pure
    accumulation; the default acq_rel adds a fence per atomic)."""
    ox0, ox1, vx0, vx1, wx0, wx1, _sx = _axis(px, X, sx, CDT)
    oy0, oy1, vy0, vy1, wy0, wy1, _sy = _axis(py, Y, sy, CDT)
    oz0, oz1, vz0, vz1, wz0, wz1, _sz = _axis(pz, Z, sz, CDT)
    for c in tl.static_range(8):
        ok = mask_r & (vx1 if c & 1 else vx0) & (vy1 if c & 2 else vy0) & (vz1 if c & 4 else vz0)
        off = vb + (ox1 if c & 1 else ox0) + (oy1 if c & 2 else oy0) + (oz1 if c & 4 else oz0)
        w = (wx1 if c & 1 else wx0) * (wy1 if c & 2 else wy0) * (wz1 if c & 4 else wz0)
        tl.atomic_add(gsdf_ptr + off, w * gsdf, mask=ok, sem="relaxed")
    for f0 in range(0, NF, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < NF
        gfeat = tl.load(gf_ptr + offs_r[:, None] * NF + offs_f[None, :], mask=mask_r[:, None] & mask_f[None, :],
                        other=0.0).to(CDT)
        for c in tl.static_range(8):
            ok = mask_r & (vx1 if c & 1 else vx0) & (vy1 if c & 2 else vy0) & (vz1 if c & 4 else vz0)
            off = vb + (ox1 if c & 1 else ox0) + (oy1 if c & 2 else oy0) + (oz1 if c & 4 else oz0)
            w = (wx1 if c & 1 else wx0) * (wy1 if c & 2 else wy0) * (wz1 if c & 4 else wz0)
            tl.atomic_add(gfv_ptr + off[:, None] + offs_f[None, :] * sc, (w * cf)[:, None] * gfeat,
                          mask=ok[:, None] & mask_f[None, :], sem="relaxed")


@triton.jit
def _sdf_render_fwd_kernel(
        vol_ptr, o_ptr, d_ptr, t_ptr, s_ptr,
        feat_ptr, depth_ptr, opac_ptr, nsec_ptr, tlast_ptr,
        NR, R, S, X, Y, Z, NF,
        stride_vb, stride_vc, stride_vz, stride_vy, stride_vx,
        stride_ob, stride_or, stride_oc,
        stride_db, stride_dr, stride_dc,
        stride_tb, stride_tr, stride_ts,
        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, CDT: tl.constexpr):
    pid = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < NR
    b = offs_r // R
    rr = offs_r - b * R
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < NF
    vb = b * stride_vb
    sdf_ptr = vol_ptr
    fv_ptr = vol_ptr + stride_vc          # channel 1: the first feature
    s = tl.load(s_ptr).to(CDT)
    op = o_ptr + b * stride_ob + rr * stride_or
    dp = d_ptr + b * stride_db + rr * stride_dr
    ox = tl.load(op, mask=mask_r, other=0.0).to(CDT)
    oy = tl.load(op + stride_oc, mask=mask_r, other=0.0).to(CDT)
    oz = tl.load(op + 2 * stride_oc, mask=mask_r, other=0.0).to(CDT)
    dx = tl.load(dp, mask=mask_r, other=0.0).to(CDT)
    dy = tl.load(dp + stride_dc, mask=mask_r, other=0.0).to(CDT)
    dz = tl.load(dp + 2 * stride_dc, mask=mask_r, other=0.0).to(CDT)
    tp = t_ptr + b * stride_tb + rr * stride_tr

    t_prev = tl.zeros([BLOCK_R], dtype=CDT)
    f_prev = tl.zeros([BLOCK_R, BLOCK_F], dtype=CDT)
    phi_prev = tl.zeros([BLOCK_R], dtype=CDT)
    trans = tl.full([BLOCK_R], 1.0, CDT)
    t_last = tl.full([BLOCK_R], 1.0, CDT)
    acc_f = tl.zeros([BLOCK_R, BLOCK_F], dtype=CDT)
    acc_d = tl.zeros([BLOCK_R], dtype=CDT)
    acc_o = tl.zeros([BLOCK_R], dtype=CDT)
    nsec = tl.zeros([BLOCK_R], dtype=tl.int32)
    active = mask_r
    k = 0
    n_active = tl.sum(active.to(tl.int32), axis=0)
    while (k < S) & (n_active > 0):
        # point k; for k >= 1 also section k - 1 (points k - 1, k)
        t_cur = tl.load(tp + k * stride_ts, mask=active, other=0.0).to(CDT)
        sdf_cur, f_cur = _sample_fwd(sdf_ptr, fv_ptr, vb, ox + t_cur * dx, oy + t_cur * dy, oz + t_cur * dz,
                                     X, Y, Z, stride_vx, stride_vy, stride_vz, stride_vc, offs_f, active, mask_f,
                                     CDT, BLOCK_R, BLOCK_F)
        phi_cur = tl.sigmoid(s * sdf_cur)
        sec = active & ((nsec * 0 + k) > 0)
        raw = (phi_prev - phi_cur + 1e-5) / (phi_prev + 1e-5)
        alpha = tl.where(raw < 0.0, 0.0, tl.where(raw > 1.0, 1.0, raw))
        w = tl.where(sec, trans * alpha, 0.0)
        acc_f += w[:, None] * (f_prev + f_cur) * 0.5
        acc_d += w * (t_prev + t_cur) * 0.5
        acc_o += w
        t_last = tl.where(sec, trans, t_last)
        nsec = tl.where(sec, k, nsec)
        trans = tl.where(sec, trans * (1.0 - alpha), trans)
        active = active & (trans >= 1e-4)
        t_prev = t_cur
        f_prev = f_cur
        phi_prev = phi_cur
        k += 1
        n_active = tl.sum(active.to(tl.int32), axis=0)

    tl.store(feat_ptr + offs_r[:, None] * NF + offs_f[None, :], acc_f.to(feat_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_f[None, :])
    first = mask_r & ((offs_r * 0 + pid_f) == 0)
    tl.store(depth_ptr + offs_r, acc_d.to(depth_ptr.dtype.element_ty), mask=first)
    tl.store(opac_ptr + offs_r, acc_o.to(opac_ptr.dtype.element_ty), mask=first)
    tl.store(nsec_ptr + offs_r, nsec, mask=first)
    tl.store(tlast_ptr + offs_r, t_last.to(tlast_ptr.dtype.element_ty), mask=first)


@triton.jit
def _sdf_render_bwd_kernel(
        vol_ptr, o_ptr, d_ptr, t_ptr, s_ptr, nsec_ptr, tlast_ptr,
        gfeat_ptr, gdepth_ptr, gopac_ptr,
        gvol_ptr, go_ptr, gd_ptr, gt_ptr, gs_ptr,
        NR, R, S, X, Y, Z, NF,
        stride_vb, stride_vc, stride_vz, stride_vy, stride_vx,
        stride_ob, stride_or, stride_oc,
        stride_db, stride_dr, stride_dc,
        stride_tb, stride_tr, stride_ts,
        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, CDT: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < NR
    b = offs_r // R
    rr = offs_r - b * R
    vb = b * stride_vb
    sdf_ptr = vol_ptr
    fv_ptr = vol_ptr + stride_vc
    gsdf_ptr = gvol_ptr                   # the gradient has the volume's strides
    gfv_ptr = gvol_ptr + stride_vc
    s = tl.load(s_ptr).to(CDT)
    op = o_ptr + b * stride_ob + rr * stride_or
    dp = d_ptr + b * stride_db + rr * stride_dr
    ox = tl.load(op, mask=mask_r, other=0.0).to(CDT)
    oy = tl.load(op + stride_oc, mask=mask_r, other=0.0).to(CDT)
    oz = tl.load(op + 2 * stride_oc, mask=mask_r, other=0.0).to(CDT)
    dx = tl.load(dp, mask=mask_r, other=0.0).to(CDT)
    dy = tl.load(dp + stride_dc, mask=mask_r, other=0.0).to(CDT)
    dz = tl.load(dp + 2 * stride_dc, mask=mask_r, other=0.0).to(CDT)
    tp = t_ptr + b * stride_tb + rr * stride_tr
    gtp = gt_ptr + offs_r * S
    nsec = tl.load(nsec_ptr + offs_r, mask=mask_r, other=0)
    t_last = tl.load(tlast_ptr + offs_r, mask=mask_r, other=1.0).to(CDT)
    g_d = tl.load(gdepth_ptr + offs_r, mask=mask_r, other=0.0).to(CDT)
    g_o = tl.load(gopac_ptr + offs_r, mask=mask_r, other=0.0).to(CDT)
    maxn = tl.max(nsec, axis=0)

    # Back to front over points j = maxn .. 0 (plus one step to finish point 0). Step j samples point j,
    # back-propagates section j (points j, j + 1) and then finishes point j + 1 ("nx"), whose two
    # sections are now both done: scatter to the volume and chain to its position.
    t_nx = tl.zeros([BLOCK_R], dtype=CDT)
    sdf_nx = tl.zeros([BLOCK_R], dtype=CDT)
    phi_nx = tl.zeros([BLOCK_R], dtype=CDT)
    e_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dsx_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dsy_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dsz_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dex_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dey_nx = tl.zeros([BLOCK_R], dtype=CDT)
    dez_nx = tl.zeros([BLOCK_R], dtype=CDT)
    gsdf_nx = tl.zeros([BLOCK_R], dtype=CDT)   # dL/dsdf of nx from the section after it
    c_nx = tl.zeros([BLOCK_R], dtype=CDT)      # nx's total compositing weight (w_{j} + w_{j+1}) / 2
    trans = t_last
    acc_a = tl.zeros([BLOCK_R], dtype=CDT)     # A_j: rendering of the sections after j, restarted at T = 1
    g_s = tl.zeros([BLOCK_R], dtype=CDT)
    gox = tl.zeros([BLOCK_R], dtype=CDT)
    goy = tl.zeros([BLOCK_R], dtype=CDT)
    goz = tl.zeros([BLOCK_R], dtype=CDT)
    gdx = tl.zeros([BLOCK_R], dtype=CDT)
    gdy = tl.zeros([BLOCK_R], dtype=CDT)
    gdz = tl.zeros([BLOCK_R], dtype=CDT)
    for jj in range(0, maxn + 2):
        j = maxn - jj
        jv = nsec * 0 + j                       # j as a vector (scalar & block masks upset the interpreter)
        pm = mask_r & (jv >= 0) & (jv <= nsec)
        sec = mask_r & (jv >= 0) & (jv < nsec)
        t_j = tl.load(tp + tl.maximum(j, 0) * stride_ts, mask=pm, other=0.0).to(CDT)
        sdf_j, e_j, dsx_j, dsy_j, dsz_j, dex_j, dey_j, dez_j = _sample_bwd(
            sdf_ptr, fv_ptr, vb, ox + t_j * dx, oy + t_j * dy, oz + t_j * dz, gfeat_ptr, offs_r, X, Y, Z,
            stride_vx, stride_vy, stride_vz, stride_vc, NF, pm, CDT, BLOCK_R, BLOCK_F)
        phi_j = tl.sigmoid(s * sdf_j)
        raw = (phi_j - phi_nx + 1e-5) / (phi_j + 1e-5)
        alpha = tl.where(raw < 0.0, 0.0, tl.where(raw > 1.0, 1.0, raw))
        in_range = (raw >= 0.0) & (raw <= 1.0)
        # T_j = T_{j+1} / (1 - a_j), and 1 - a_j >= 1e-4 / T_j > 0 whenever section j + 1 was marched
        inner = sec & (j < nsec - 1)
        trans = tl.where(inner, trans / tl.where(inner, 1.0 - alpha, 1.0), tl.where(sec, t_last, trans))
        u = (e_j + e_nx) * 0.5 + g_d * (t_j + t_nx) * 0.5 + g_o
        w = tl.where(sec, trans * alpha, 0.0)
        g_alpha = tl.where(sec & in_range, trans * (u - acc_a), 0.0)
        acc_a = tl.where(sec, alpha * u + (1.0 - alpha) * acc_a, acc_a)
        inv_den = 1.0 / (phi_j + 1e-5)
        g_phi_j = g_alpha * phi_nx * inv_den * inv_den
        g_phi_nx = -g_alpha * inv_den
        dsig_j = phi_j * (1.0 - phi_j)
        dsig_nx = phi_nx * (1.0 - phi_nx)
        gsdf_j = g_phi_j * dsig_j * s
        gsdf_nx += g_phi_nx * dsig_nx * s
        g_s += g_phi_j * dsig_j * sdf_j + g_phi_nx * dsig_nx * sdf_nx
        c_j = w * 0.5
        c_nx += w * 0.5
        # finish point j + 1
        pm_nx = mask_r & (j + 1 <= nsec)
        _scatter_bwd(gsdf_ptr, gfv_ptr, vb, ox + t_nx * dx, oy + t_nx * dy, oz + t_nx * dz, gsdf_nx, c_nx,
                     gfeat_ptr, offs_r, X, Y, Z, stride_vx, stride_vy, stride_vz, stride_vc, NF,
                     pm_nx & ((gsdf_nx != 0.0) | (c_nx != 0.0)), CDT, BLOCK_F)
        gpx = gsdf_nx * dsx_nx + c_nx * dex_nx
        gpy = gsdf_nx * dsy_nx + c_nx * dey_nx
        gpz = gsdf_nx * dsz_nx + c_nx * dez_nx
        gox += tl.where(pm_nx, gpx, 0.0)
        goy += tl.where(pm_nx, gpy, 0.0)
        goz += tl.where(pm_nx, gpz, 0.0)
        gdx += tl.where(pm_nx, t_nx * gpx, 0.0)
        gdy += tl.where(pm_nx, t_nx * gpy, 0.0)
        gdz += tl.where(pm_nx, t_nx * gpz, 0.0)
        g_t = c_nx * g_d + gpx * dx + gpy * dy + gpz * dz
        tl.store(gtp + (j + 1), g_t.to(gt_ptr.dtype.element_ty), mask=pm_nx)
        t_nx = t_j
        sdf_nx = sdf_j
        phi_nx = phi_j
        e_nx = e_j
        dsx_nx = dsx_j
        dsy_nx = dsy_j
        dsz_nx = dsz_j
        dex_nx = dex_j
        dey_nx = dey_j
        dez_nx = dez_j
        gsdf_nx = gsdf_j
        c_nx = c_j

    ety = go_ptr.dtype.element_ty
    tl.store(go_ptr + offs_r * 3, gox.to(ety), mask=mask_r)
    tl.store(go_ptr + offs_r * 3 + 1, goy.to(ety), mask=mask_r)
    tl.store(go_ptr + offs_r * 3 + 2, goz.to(ety), mask=mask_r)
    tl.store(gd_ptr + offs_r * 3, gdx.to(ety), mask=mask_r)
    tl.store(gd_ptr + offs_r * 3 + 1, gdy.to(ety), mask=mask_r)
    tl.store(gd_ptr + offs_r * 3 + 2, gdz.to(ety), mask=mask_r)
    tl.store(gs_ptr + offs_r, g_s.to(gs_ptr.dtype.element_ty), mask=mask_r)


# ============================================================================ reference

def _check_inputs(volume, origins, dirs, t_vals, inv_s):
    check_tensor("volume", volume, ndim=5, dtypes=FLOAT_DTYPES)
    B, C = volume.shape[:2]
    check_tensor("origins", origins, ndim=3, dtypes=FLOAT_DTYPES)
    R = origins.shape[1]
    check_tensor("origins", origins, shape=(B, None, 3))
    check_tensor("dirs", dirs, shape=(B, R, 3), dtypes=FLOAT_DTYPES)
    check_tensor("t_vals", t_vals, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("t_vals", t_vals, shape=(B, R, None))
    if not isinstance(inv_s, torch.Tensor) or inv_s.numel() != 1 or inv_s.dtype not in FLOAT_DTYPES:
        raise ValueError(f"inv_s: expected a floating scalar tensor with one element, got "
                         f"{type(inv_s).__name__}{tuple(getattr(inv_s, 'shape', ()))}")
    check_same_device(volume=volume, origins=origins, dirs=dirs, t_vals=t_vals, inv_s=inv_s)
    if C < 1:
        raise ValueError(f"volume: needs at least 1 channel (the SDF), got shape {tuple(volume.shape)}")
    if C - 1 > MAX_FEATURES:
        raise ValueError(f"volume: at most {MAX_FEATURES + 1} channels supported, got {C}")
    if min(volume.shape[2:]) < 1:
        raise ValueError(f"volume: empty spatial size {tuple(volume.shape)}")
    if t_vals.shape[2] < 2:
        raise ValueError(f"t_vals: needs S >= 2 samples per ray (one section), got S = {t_vals.shape[2]}")
    for name, t in (("volume", volume), ("t_vals", t_vals), ("origins", origins)):
        check_index_range(name, t.numel())
    check_index_range("volume (largest strided offset)", sum((n - 1) * abs(st) for n, st in
                                                             zip(volume.shape, volume.stride())) + 1)
    check_index_range("features", B * R * max(C, 3))
    return B, C, R, t_vals.shape[2]


def _out_dtype(volume, origins, dirs, t_vals):
    dt = volume.dtype
    for t in (origins, dirs, t_vals):
        dt = torch.promote_types(dt, t.dtype)
    return dt


def render_sdf_ref(volume: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
                   inv_s: torch.Tensor):
    """Pure-PyTorch reference (grid_sample + cumprod): returns features (B,R,C-1), depth (B,R), opacity (B,R).

    Memory O(B*R*S*C). Differentiable through autograd (torch.cumprod's backward is exact at a = 1).
    """
    B, C, R, S = _check_inputs(volume, origins, dirs, t_vals, inv_s)
    dt = _out_dtype(volume, origins, dirs, t_vals)
    o, d, t = origins.to(dt), dirs.to(dt), t_vals.to(dt)
    pts = o[:, :, None, :] + t[..., None] * d[:, :, None, :]                      # (B, R, S, 3)
    lim = COORD_LIM
    pts = torch.where(pts.abs() <= lim, pts, torch.where(pts > lim, lim, -lim).to(dt))   # NaN -> -lim
    vals = F.grid_sample(volume.to(dt), pts.reshape(B, R, S, 1, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=True)                                      # (B, C, R, S, 1)
    vals = vals[..., 0].permute(0, 2, 3, 1)                                      # (B, R, S, C)
    sdf, feat = vals[..., 0], vals[..., 1:]
    phi = torch.sigmoid(sdf * inv_s.reshape(()).to(dt))
    alpha = ((phi[..., :-1] - phi[..., 1:] + EPS_ALPHA) / (phi[..., :-1] + EPS_ALPHA)).clamp(0.0, 1.0)
    trans = torch.cumprod(1.0 - alpha, dim=-1)
    trans = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)  # exclusive: T_i
    keep = (trans >= T_STOP).detach()                                             # sections marched
    zero = torch.zeros((), dtype=dt, device=alpha.device)
    w = torch.where(keep, trans * alpha, zero)                                     # (B, R, S-1)
    # sections past the stop are never read (so NaN/Inf there cannot leak in through 0 * inf)
    f_mid = torch.where(keep[..., None], (feat[:, :, :-1] + feat[:, :, 1:]) * 0.5, zero)
    t_mid = torch.where(keep, (t[..., :-1] + t[..., 1:]) * 0.5, zero)
    features = (w[..., None] * f_mid).sum(2)
    depth = (w * t_mid).sum(-1)
    opacity = w.sum(-1)
    return features, depth, opacity


def sdf_gradient_ref(volume_sdf: torch.Tensor, points: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Analytic gradient of the trilinear SDF w.r.t. the point, for the eikonal term.

    ``volume_sdf`` (B, 1, Z, Y, X) or (B, Z, Y, X); ``points`` (B, N, 3) in the normalized frame.
    Returns d sdf / d p (B, N, 3) in normalized units (multiply by 1/voxel-extent for metric units).
    Written from the 8 corners (not autograd through grid_sample, whose backward has no double backward),
    so it is differentiable w.r.t. ``volume_sdf`` (eikonal loss -> grid) and ``points``.
    Same conventions as ``render_sdf``: align_corners=True, zero padding; at a kink the one-sided
    (floor) derivative is used, like grid_sample's. ``create_graph`` is accepted for API symmetry:
    the result is always built from differentiable torch ops.
    """
    if volume_sdf.ndim == 4:
        volume_sdf = volume_sdf[:, None]
    check_tensor("volume_sdf", volume_sdf, ndim=5, dtypes=FLOAT_DTYPES)
    B, _, Z, Y, X = volume_sdf.shape
    if volume_sdf.shape[1] != 1:
        raise ValueError(f"volume_sdf: expected 1 channel, got shape {tuple(volume_sdf.shape)}")
    check_tensor("points", points, ndim=3, shape=(B, None, 3), dtypes=FLOAT_DTYPES)
    check_same_device(volume_sdf=volume_sdf, points=points)
    dt = torch.promote_types(volume_sdf.dtype, points.dtype)
    vol = volume_sdf.to(dt)[:, 0].reshape(B, -1)                                  # (B, Z*Y*X)
    lim = COORD_LIM
    p = points.to(dt)
    p = torch.where(p.abs() <= lim, p, torch.where(p > lim, lim, -lim).to(dt))
    sizes = (X, Y, Z)
    idx, frac, scale = [], [], []
    for a in range(3):
        n = sizes[a]
        i = (p[..., a] + 1) * 0.5 * (n - 1)
        i0 = torch.floor(i)
        idx.append(i0.long())
        frac.append(i - i0)
        scale.append(0.5 * (n - 1))
    grad = [torch.zeros_like(p[..., 0]) for _ in range(3)]
    for c in range(8):
        bits = (c & 1, (c >> 1) & 1, (c >> 2) & 1)
        ci = [idx[a] + bits[a] for a in range(3)]
        valid = torch.ones_like(ci[0], dtype=torch.bool)
        for a in range(3):
            valid &= (ci[a] >= 0) & (ci[a] < sizes[a])
        lin = (ci[2].clamp(0, Z - 1) * Y + ci[1].clamp(0, Y - 1)) * X + ci[0].clamp(0, X - 1)
        v = torch.gather(vol, 1, lin) * valid
        wts = [frac[a] if bits[a] else 1 - frac[a] for a in range(3)]
        dws = [1.0 if bits[a] else -1.0 for a in range(3)]
        grad[0] = grad[0] + v * dws[0] * wts[1] * wts[2]
        grad[1] = grad[1] + v * wts[0] * dws[1] * wts[2]
        grad[2] = grad[2] + v * wts[0] * wts[1] * dws[2]
    return torch.stack([grad[a] * scale[a] for a in range(3)], dim=-1)


# ============================================================================ launchers

BLOCK_F = 32   # feature chunk: MIM4D's 32 features are one chunk


def _pick_blocks(gpu: bool | None = None, bwd: bool = False):
    """(BLOCK_R, BLOCK_F, num_warps): one GPU configuration (32 rays x 32 channels; the backward with 8
    warps: with 4 its ~250 live registers per thread spill); the interpreter (~0.4 ms per program) gets
    bigger ray blocks."""
    gpu = not interpreting() if gpu is None else gpu
    return (32 if gpu else 128), BLOCK_F, (8 if bwd and gpu else 4)


def _volume(volume):
    """The volume as the kernels read it: in place whatever its strides (channels-last
    ``torch.channels_last_3d`` puts a voxel's features side by side, the fast layout), copied only when
    it is not dense (overlapping / gapped views), so that its gradient can share its strides."""
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(volume.shape, volume.stride()) if n != 1):
        if st != expected:
            return volume.contiguous()
        expected *= n
    return volume


def _render_sdf_fwd(volume, origins, dirs, t_vals, inv_s):
    B, C, R, S = _check_inputs(volume, origins, dirs, t_vals, inv_s)
    out_dt = _out_dtype(volume, origins, dirs, t_vals)
    vol = _volume(volume)
    Z, Y, X = vol.shape[2:]
    nf = C - 1
    cdt = acc_dtype(out_dt)
    dev = vol.device
    feat = torch.empty(B, R, max(nf, 1), dtype=out_dt, device=dev)
    depth = torch.empty(B, R, dtype=out_dt, device=dev)
    opac = torch.empty(B, R, dtype=out_dt, device=dev)
    nsec = torch.empty(B, R, dtype=torch.int32, device=dev)
    tlast = torch.empty(B, R, dtype=cdt, device=dev)
    nr = B * R
    if nr > 0:
        BR, BF, nw = _pick_blocks()
        launch(_sdf_render_fwd_kernel, (triton.cdiv(nr, BR), max(1, triton.cdiv(nf, BF))),
               vol, origins, dirs, t_vals, inv_s.reshape(1), feat, depth, opac, nsec, tlast,
               nr, R, S, X, Y, Z, nf,
               *vol.stride(),
               origins.stride(0), origins.stride(1), origins.stride(2),
               dirs.stride(0), dirs.stride(1), dirs.stride(2),
               t_vals.stride(0), t_vals.stride(1), t_vals.stride(2),
               BLOCK_R=BR, BLOCK_F=BF, CDT=tl_dtype(cdt), num_warps=nw)
    return feat[..., :nf], depth, opac, nsec, tlast


def _grad_volume_like(volume, dtype):
    """Zeros with the strides ``_volume(volume)`` has (what the fake kernel promises too)."""
    return torch.zeros_like(_volume(volume), dtype=dtype, memory_format=torch.preserve_format)


def _render_sdf_bwd(g_feat, g_depth, g_opac, volume, origins, dirs, t_vals, inv_s, nsec, tlast):
    B, C, R, S = _check_inputs(volume, origins, dirs, t_vals, inv_s)
    out_dt = _out_dtype(volume, origins, dirs, t_vals)
    vol = _volume(volume)
    Z, Y, X = vol.shape[2:]
    nf = C - 1
    cdt = acc_dtype(out_dt)
    dev = vol.device
    g_vol = _grad_volume_like(vol, cdt)                      # fp32 atomics target (fp64 for fp64)
    g_o = torch.empty(B, R, 3, dtype=cdt, device=dev)
    g_d = torch.empty(B, R, 3, dtype=cdt, device=dev)
    g_t = torch.zeros(B, R, S, dtype=cdt, device=dev)
    g_s = torch.empty(B, R, dtype=cdt, device=dev)
    nr = B * R
    if nr > 0:
        g_feat = g_feat.contiguous() if nf > 0 else torch.zeros(B, R, 1, dtype=cdt, device=dev)
        BR, BF, nw = _pick_blocks(bwd=True)
        launch(_sdf_render_bwd_kernel, (triton.cdiv(nr, BR),),
               vol, origins, dirs, t_vals, inv_s.reshape(1), nsec.contiguous(), tlast.contiguous(),
               g_feat, g_depth.contiguous(), g_opac.contiguous(),
               g_vol, g_o, g_d, g_t, g_s,
               nr, R, S, X, Y, Z, nf,
               *vol.stride(),
               origins.stride(0), origins.stride(1), origins.stride(2),
               dirs.stride(0), dirs.stride(1), dirs.stride(2),
               t_vals.stride(0), t_vals.stride(1), t_vals.stride(2),
               BLOCK_R=BR, BLOCK_F=BF, CDT=tl_dtype(cdt), num_warps=nw)
    return (g_vol if g_vol.dtype == volume.dtype else g_vol.to(volume.dtype), g_o.to(origins.dtype),
            g_d.to(dirs.dtype), g_t.to(t_vals.dtype), g_s.sum().reshape(inv_s.shape).to(inv_s.dtype))


# ============================================================================ registered op

@torch.library.custom_op("nano4d::render_sdf", mutates_args=())
def _render_sdf_op(volume: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
                   inv_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """Returns features, depth, opacity and two per-ray scalars for the backward (sections marched, T_last)."""
    feat, depth, opac, nsec, tlast = _render_sdf_fwd(volume, origins, dirs, t_vals, inv_s)
    return feat.clone() if feat.shape[-1] == 0 else feat, depth, opac, nsec, tlast


@_render_sdf_op.register_fake
def _(volume, origins, dirs, t_vals, inv_s):
    B, C = volume.shape[:2]
    R = origins.shape[1]
    out_dt = _out_dtype(volume, origins, dirs, t_vals)
    cdt = acc_dtype(out_dt)
    return (volume.new_empty((B, R, C - 1), dtype=out_dt), volume.new_empty((B, R), dtype=out_dt),
            volume.new_empty((B, R), dtype=out_dt), volume.new_empty((B, R), dtype=torch.int32),
            volume.new_empty((B, R), dtype=cdt))


@torch.library.custom_op("nano4d::render_sdf_backward", mutates_args=())
def _render_sdf_backward_op(g_feat: torch.Tensor, g_depth: torch.Tensor, g_opac: torch.Tensor,
                            volume: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
                            inv_s: torch.Tensor, nsec: torch.Tensor, tlast: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _render_sdf_bwd(g_feat, g_depth, g_opac, volume, origins, dirs, t_vals, inv_s, nsec, tlast)


@_render_sdf_backward_op.register_fake
def _(g_feat, g_depth, g_opac, volume, origins, dirs, t_vals, inv_s, nsec, tlast):
    return (_grad_volume_like(volume, volume.dtype),
            torch.empty_like(origins, memory_format=torch.contiguous_format),
            torch.empty_like(dirs, memory_format=torch.contiguous_format),
            torch.empty_like(t_vals, memory_format=torch.contiguous_format),
            torch.empty_like(inv_s, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    volume, origins, dirs, t_vals, inv_s = inputs
    ctx.save_for_backward(volume, origins, dirs, t_vals, inv_s, output[3], output[4])
    ctx.set_materialize_grads(False)


def _backward(ctx, g_feat, g_depth, g_opac, _g_nsec, _g_tlast):
    volume, origins, dirs, t_vals, inv_s, nsec, tlast = ctx.saved_tensors
    B, C = volume.shape[:2]
    R = origins.shape[1]
    out_dt = _out_dtype(volume, origins, dirs, t_vals)
    if g_feat is None:
        g_feat = volume.new_zeros((B, R, C - 1), dtype=out_dt)
    if g_depth is None:
        g_depth = volume.new_zeros((B, R), dtype=out_dt)
    if g_opac is None:
        g_opac = volume.new_zeros((B, R), dtype=out_dt)
    gv, go, gd, gt, gs = torch.ops.nano4d.render_sdf_backward(
        g_feat.contiguous(), g_depth.contiguous(), g_opac.contiguous(), volume, origins, dirs, t_vals, inv_s,
        nsec, tlast)
    return gv, go, gd, gt, gs


_render_sdf_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public op

def _validate_public(volume, origins, dirs, t_vals, inv_s, validate=True):
    if not isinstance(inv_s, torch.Tensor) and isinstance(inv_s, (int, float)):
        if not (math.isfinite(inv_s) and inv_s > 0):
            raise ValueError(f"inv_s: must be positive and finite (NeuS sharpness), got {inv_s}")
        inv_s = torch.tensor(float(inv_s), dtype=torch.float32, device=volume.device)
        _check_inputs(volume, origins, dirs, t_vals, inv_s)
        validate = validate and t_vals.numel() > 0
        if validate and not tracing() and bool((t_vals[..., 1:] < t_vals[..., :-1]).any()):
            raise ValueError("t_vals: must be sorted ascending along the sample dim (S)")
        return inv_s
    _check_inputs(volume, origins, dirs, t_vals, inv_s)
    if not validate or tracing():
        return inv_s
    # one host sync for the value checks: t sorted along S (NaN compares false and passes), inv_s in (0, inf)
    unsorted = (t_vals[..., 1:] < t_vals[..., :-1]).any() if t_vals.numel() else torch.zeros((), dtype=torch.bool)
    s = inv_s.reshape(())
    bad = torch.stack([unsorted.to(inv_s.device), ~((s > 0) & torch.isfinite(s))]).tolist()
    if bad[0]:
        raise ValueError("t_vals: must be sorted ascending along the sample dim (S)")
    if bad[1]:
        raise ValueError(f"inv_s: must be positive and finite (NeuS sharpness), got {s.item()}")
    return inv_s


def render_sdf(volume: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
               inv_s, *, validate: bool = True):
    """NeuS volume rendering of an SDF + feature voxel grid; see the module docstring.

    Returns ``features`` (B, R, C-1), ``depth`` (B, R), ``opacity`` (B, R).
    CUDA tensors run the fused Triton kernel; CPU tensors the reference (``NANO4D_FORCE_TRITON=1``: kernel
    through the interpreter). Raises ``ValueError`` naming the argument on bad shapes, dtypes, devices,
    S < 2, unsorted ``t_vals`` or ``inv_s`` not positive and finite. The value checks (sorted t, inv_s)
    cost one device->host copy per call; ``validate=False`` skips them (zero host syncs: the models'
    trusted path, CUDA-graph capturable) and they are skipped while torch.compile traces.
    ``inv_s`` is a one-element tensor (differentiable) or a Python number.
    """
    inv_s = _validate_public(volume, origins, dirs, t_vals, inv_s, validate)
    if use_triton(volume, origins, dirs, t_vals, inv_s):
        feat, depth, opac, _, _ = torch.ops.nano4d.render_sdf(volume, origins, dirs, t_vals, inv_s)
        return feat, depth, opac
    return render_sdf_ref(volume, origins, dirs, t_vals, inv_s)


sdf_render = render_sdf   # the op under its file's name
