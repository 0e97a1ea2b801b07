"""3D Gaussian splatting: EWA projection, 16x16 tile binning, front-to-back rasterization (fwd + bwd).

Math (per scene b, view v, Gaussian n; reference: ``kernels/_splat_ref.py``):
  Σ = R(q) S² R(q)ᵀ with q = quats/|quats| (w,x,y,z), S = diag(scales);  p = W·mean + t  (viewmat = [W t]).
  Σ₂ = J W Σ Wᵀ Jᵀ + eps2d·I,  J = [[fx/z, 0, −fx·x/z²], [0, fy/z, −fy·y/z²]]  (EWA; K's skew is ignored)
  mean2d = (fx·x/z + cx, fy·y/z + cy),  depth = z,  conic = (a, b, c) = upper triangle of Σ₂⁻¹,
  radius = ceil(3·sqrt(λ_max(Σ₂))) (capped at 2²⁴). det Σ₂ and λ_max are evaluated on Σ₂ / max(Σ₂ diagonal),
  det as |rows of J W R S crossed|² + eps2d·(trace − eps2d) (no overflow, no cancellation), so any finite
  Σ₂ works (fp32 scales of 1e10 draw over the whole image, as fp64 does); the limit is a finite Σ₂ in
  the compute dtype (fp32: entries of J W R S below ~1e19), beyond it the kernel and the reference both
  cull the Gaussian.  radius = 0 (culled; means2d/conics/depths = 0) when
  z ∉ [near, far], det Σ₂ ≤ 0, the square [u±r]×[v±r] misses the image, or any input of the Gaussian
  (mean, quat, scale, opacity, colour) is NaN/Inf or the quaternion is zero: bad Gaussians are culled,
  never read out of bounds. NaN/Inf in viewmats, Ks or background raise ValueError.
  Tiles: a Gaussian reaches the pixels of tiles floor((u−r)/16)..floor((u+r)/16) (same in y).
  Per pixel (u, v) = (j + 0.5, i + 0.5), Gaussians of its tile front to back (by depth, ties by index):
  σ = ½(a dx² + c dy²) + b dx dy (d = pixel − mean2d),  α = min(0.99, o·e^{−σ}), skipped if α < 1/255;
  the pixel stops before a Gaussian that would bring T = Π(1 − α) below 1e-4.
  colour = Σ wᵢ cᵢ + T·background,  alpha = 1 − T,  depth = Σ wᵢ zᵢ,  wᵢ = αᵢ Tᵢ (depth not normalized).

Layouts: means (B,N,3) world, quats (B,N,4), scales (B,N,3) (activated, > 0), opacities (B,N) (activated),
colors (B,N,C) any C ≥ 1, viewmats (B,V,4,4) world→camera OpenCV, Ks (B,V,3,3) pixels, background
(B,V,C) or None (zeros). Outputs: colors (B,V,H,W,C), alphas (B,V,H,W,1), depths (B,V,H,W,1).
Differentiable w.r.t. means, quats, scales, opacities, colors, background (all three outputs, depth
included → means). viewmats and Ks get no gradient on the kernel path (the reference gives them one).
Dtypes: if means is fp64 everything is computed and returned in fp64 (for gradcheck); otherwise in fp32
(fp16/bf16 inputs are upcast). Notes: near-plane culling uses the centre depth only; opacities are not
range-checked (o < 1/255 never contributes, o > 1 is clamped through α ≤ 0.99); culled Gaussians get zero
gradients; the kernel backward uses atomics, so gradients are reproducible only up to fp32 rounding.

Kernels (CUDA, or the interpreter with NANO4D_FORCE_TRITON=1): projection fwd/bwd (one program per
block of Gaussians of one view); binning in torch (registered op ``nano4d::bin_gaussians``: a stable depth
argsort per view, tile intersections emitted in that order, one stable sort of 32-bit tile ids, tile
ranges by searchsorted); rasterization fwd (one program and one warp per 16x16 tile and scene·view for
C <= 4 channels; the tile's Gaussians one at a time front to back as gsplat does: α by the hardware
exp2, T by a product, colours by C multiply-adds per pixel, an early exit every 32 Gaussians once the
tile is done) and bwd (back to front from the saved final T and last-contributor count, T recovered by
dividing by 1 − α; per-Gaussian gradients summed over the tile in registers/shuffles, then one relaxed
fp32/fp64 atomic per Gaussian and quantity). Registered ops: ``nano4d::project_gaussians`` (+
``_backward``), ``nano4d::bin_gaussians``, ``nano4d::rasterize_gaussians`` (+ ``_backward``; it takes
the projected Gaussians and the tile lists). Limits: intersections and B·V·tiles < 2³¹ (checked,
ValueError). Device->host reads per ``rasterize_gaussians`` call: see its docstring (none with
``validate=False, max_intersections=...``).
CPU tensors use the reference ``rasterize_gaussians_ref`` (kernels/_splat_ref.py): by default its exact
pair-pruned form (cost O(contributing pixel-Gaussian pairs)); ``dense=True`` gives the literal
every-pixel × every-Gaussian oracle. Limits and CPU timings in that file's docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, acc_dtype, check_finite, check_index_range, check_same_device,
                             check_tensor, interpreting, launch, next_pow2, tl_dtype, tracing, use_triton)
from kernels._splat_ref import (project_gaussians_ref, rasterize_from_projection_ref,  # noqa: F401
                                rasterize_gaussians_ref)

TILE = 16
_ALPHA_MIN = 1.0 / 255.0
_ALPHA_MAX = 0.99
_T_MIN = 1e-4
_RADIUS_MAX = 16777216.0  # 2**24


# ============================================================================ Triton kernels


@triton.jit
def _fin(x):
    return (x - x) == 0  # False for NaN and ±Inf


@triton.jit
def _splat_project_fwd_kernel(means_ptr, quats_ptr, scales_ptr, view_ptr, k_ptr,
                              m2d_ptr, con_ptr, dep_ptr, rad_ptr,
                              N, V, W, H, near, far, eps2d,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program per (block of Gaussians, scene·view). Inputs contiguous: means/scales (B,N,3),
    quats (B,N,4), viewmats (B,V,4,4), Ks (B,V,3,3); outputs (B,V,N,·)."""
    bv = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = n < N
    gi = (bv // V) * N + n
    mx = tl.load(means_ptr + gi * 3 + 0, mask=msk, other=0).to(ACC)
    my = tl.load(means_ptr + gi * 3 + 1, mask=msk, other=0).to(ACC)
    mz = tl.load(means_ptr + gi * 3 + 2, mask=msk, other=0).to(ACC)
    qw = tl.load(quats_ptr + gi * 4 + 0, mask=msk, other=1).to(ACC)
    qx = tl.load(quats_ptr + gi * 4 + 1, mask=msk, other=0).to(ACC)
    qy = tl.load(quats_ptr + gi * 4 + 2, mask=msk, other=0).to(ACC)
    qz = tl.load(quats_ptr + gi * 4 + 3, mask=msk, other=0).to(ACC)
    sx = tl.load(scales_ptr + gi * 3 + 0, mask=msk, other=1).to(ACC)
    sy = tl.load(scales_ptr + gi * 3 + 1, mask=msk, other=1).to(ACC)
    sz = tl.load(scales_ptr + gi * 3 + 2, mask=msk, other=1).to(ACC)
    qq = qw * qw + qx * qx + qy * qy + qz * qz
    fin = (_fin(mx) & _fin(my) & _fin(mz) & _fin(qq) & (qq > 0) & _fin(sx) & _fin(sy) & _fin(sz))
    mx, my, mz = tl.where(fin, mx, 0.0), tl.where(fin, my, 0.0), tl.where(fin, mz, 0.0)
    sx, sy, sz = tl.where(fin, sx, 1.0), tl.where(fin, sy, 1.0), tl.where(fin, sz, 1.0)
    rq = 1.0 / tl.sqrt(tl.where(fin, qq, 1.0))
    w, x, y, z = tl.where(fin, qw * rq, 1.0), tl.where(fin, qx * rq, 0.0), tl.where(fin, qy * rq, 0.0), tl.where(fin, qz * rq, 0.0)
    r00, r01, r02 = 1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)
    r10, r11, r12 = 2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)
    r20, r21, r22 = 2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)
    vp = view_ptr + bv * 16
    w00, w01, w02, t0 = tl.load(vp + 0).to(ACC), tl.load(vp + 1).to(ACC), tl.load(vp + 2).to(ACC), tl.load(vp + 3).to(ACC)
    w10, w11, w12, t1 = tl.load(vp + 4).to(ACC), tl.load(vp + 5).to(ACC), tl.load(vp + 6).to(ACC), tl.load(vp + 7).to(ACC)
    w20, w21, w22, t2 = tl.load(vp + 8).to(ACC), tl.load(vp + 9).to(ACC), tl.load(vp + 10).to(ACC), tl.load(vp + 11).to(ACC)
    kp = k_ptr + bv * 9
    fx, cx, fy, cy = tl.load(kp + 0).to(ACC), tl.load(kp + 2).to(ACC), tl.load(kp + 4).to(ACC), tl.load(kp + 5).to(ACC)
    # Mc = W R diag(s)
    m00, m01, m02 = (w00 * r00 + w01 * r10 + w02 * r20) * sx, (w00 * r01 + w01 * r11 + w02 * r21) * sy, (w00 * r02 + w01 * r12 + w02 * r22) * sz
    m10, m11, m12 = (w10 * r00 + w11 * r10 + w12 * r20) * sx, (w10 * r01 + w11 * r11 + w12 * r21) * sy, (w10 * r02 + w11 * r12 + w12 * r22) * sz
    m20, m21, m22 = (w20 * r00 + w21 * r10 + w22 * r20) * sx, (w20 * r01 + w21 * r11 + w22 * r21) * sy, (w20 * r02 + w21 * r12 + w22 * r22) * sz
    px = w00 * mx + w01 * my + w02 * mz + t0
    py = w10 * mx + w11 * my + w12 * mz + t1
    pz = w20 * mx + w21 * my + w22 * mz + t2
    in_depth = (pz >= near) & (pz <= far)
    rz = 1.0 / tl.where(in_depth, pz, 1.0)
    j00, j02, j11, j12 = fx * rz, -fx * px * rz * rz, fy * rz, -fy * py * rz * rz
    a0, a1, a2 = j00 * m00 + j02 * m20, j00 * m01 + j02 * m21, j00 * m02 + j02 * m22   # rows of J Mc
    b0, b1, b2 = j11 * m10 + j12 * m20, j11 * m11 + j12 * m21, j11 * m12 + j12 * m22
    ca = a0 * a0 + a1 * a1 + a2 * a2 + eps2d
    cb = a0 * b0 + a1 * b1 + a2 * b2
    cc = b0 * b0 + b1 * b1 + b2 * b2 + eps2d
    # Σ₂ / sc with sc = max(Σ₂ diagonal), det(Σ₂ / sc) = (|a × b|² + eps2d (ca + cc − eps2d)) / sc²: no overflow
    # for any finite Σ₂ (fp32 scales of 1e10 overflow ca·cc) and no cancellation for needle-thin Gaussians
    sc = tl.maximum(ca, cc)
    rs = 1.0 / tl.where(sc > 0, sc, 1.0)
    na, nb, nc = ca * rs, cb * rs, cc * rs
    x0, x1, x2 = (a1 * b2 - a2 * b1) * rs, (a2 * b0 - a0 * b2) * rs, (a0 * b1 - a1 * b0) * rs
    det = x0 * x0 + x1 * x1 + x2 * x2 + eps2d * rs * (na + nc - eps2d * rs)
    okd = det > 0
    idet = 1.0 / tl.where(okd, det * sc, 1.0)
    u, v = fx * px * rz + cx, fy * py * rz + cy
    mid = 0.5 * (na + nc)
    lam = sc * (mid + tl.sqrt(tl.maximum(mid * mid - det, 0.0)))
    r = tl.ceil(tl.minimum(3.0 * tl.sqrt(tl.maximum(lam, 0.0)), 16777216.0))
    valid = (msk & fin & in_depth & okd & (u + r > 0) & (u - r < W) & (v + r > 0) & (v - r < H)
             & _fin(u) & _fin(v) & _fin(r) & _fin(nc * idet) & _fin(nb * idet) & _fin(na * idet))
    o = bv * N + n
    tl.store(m2d_ptr + o * 2 + 0, tl.where(valid, u, 0.0), mask=msk)
    tl.store(m2d_ptr + o * 2 + 1, tl.where(valid, v, 0.0), mask=msk)
    tl.store(con_ptr + o * 3 + 0, tl.where(valid, nc * idet, 0.0), mask=msk)
    tl.store(con_ptr + o * 3 + 1, tl.where(valid, -nb * idet, 0.0), mask=msk)
    tl.store(con_ptr + o * 3 + 2, tl.where(valid, na * idet, 0.0), mask=msk)
    tl.store(dep_ptr + o, tl.where(valid, pz, 0.0), mask=msk)
    tl.store(rad_ptr + o, tl.where(valid, r, 0.0).to(tl.int32), mask=msk)


@triton.jit
def _splat_project_bwd_kernel(means_ptr, quats_ptr, scales_ptr, view_ptr, k_ptr, rad_ptr,
                              gm2d_ptr, gcon_ptr, gdep_ptr, gmeans_ptr, gquats_ptr, gscales_ptr,
                              N, V, eps2d,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Chain rule of the projection for the Gaussians with radius > 0; per-view grads (B,V,N,·)."""
    bv = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = n < N
    o = bv * N + n
    valid = msk & (tl.load(rad_ptr + o, mask=msk, other=0) > 0)
    gi = (bv // V) * N + n
    mx = tl.load(means_ptr + gi * 3 + 0, mask=valid, other=0).to(ACC)
    my = tl.load(means_ptr + gi * 3 + 1, mask=valid, other=0).to(ACC)
    mz = tl.load(means_ptr + gi * 3 + 2, mask=valid, other=0).to(ACC)
    qw = tl.load(quats_ptr + gi * 4 + 0, mask=valid, other=1).to(ACC)
    qx = tl.load(quats_ptr + gi * 4 + 1, mask=valid, other=0).to(ACC)
    qy = tl.load(quats_ptr + gi * 4 + 2, mask=valid, other=0).to(ACC)
    qz = tl.load(quats_ptr + gi * 4 + 3, mask=valid, other=0).to(ACC)
    sx = tl.load(scales_ptr + gi * 3 + 0, mask=valid, other=1).to(ACC)
    sy = tl.load(scales_ptr + gi * 3 + 1, mask=valid, other=1).to(ACC)
    sz = tl.load(scales_ptr + gi * 3 + 2, mask=valid, other=1).to(ACC)
    rq = 1.0 / tl.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    w, x, y, z = qw * rq, qx * rq, qy * rq, qz * rq
    r00, r01, r02 = 1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)
    r10, r11, r12 = 2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)
    r20, r21, r22 = 2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)
    vp = view_ptr + bv * 16
    w00, w01, w02, t0 = tl.load(vp + 0).to(ACC), tl.load(vp + 1).to(ACC), tl.load(vp + 2).to(ACC), tl.load(vp + 3).to(ACC)
    w10, w11, w12, t1 = tl.load(vp + 4).to(ACC), tl.load(vp + 5).to(ACC), tl.load(vp + 6).to(ACC), tl.load(vp + 7).to(ACC)
    w20, w21, w22, t2 = tl.load(vp + 8).to(ACC), tl.load(vp + 9).to(ACC), tl.load(vp + 10).to(ACC), tl.load(vp + 11).to(ACC)
    kp = k_ptr + bv * 9
    fx, fy = tl.load(kp + 0).to(ACC), tl.load(kp + 4).to(ACC)
    p00, p01, p02 = w00 * r00 + w01 * r10 + w02 * r20, w00 * r01 + w01 * r11 + w02 * r21, w00 * r02 + w01 * r12 + w02 * r22
    p10, p11, p12 = w10 * r00 + w11 * r10 + w12 * r20, w10 * r01 + w11 * r11 + w12 * r21, w10 * r02 + w11 * r12 + w12 * r22
    p20, p21, p22 = w20 * r00 + w21 * r10 + w22 * r20, w20 * r01 + w21 * r11 + w22 * r21, w20 * r02 + w21 * r12 + w22 * r22
    m00, m01, m02 = p00 * sx, p01 * sy, p02 * sz
    m10, m11, m12 = p10 * sx, p11 * sy, p12 * sz
    m20, m21, m22 = p20 * sx, p21 * sy, p22 * sz
    px = w00 * mx + w01 * my + w02 * mz + t0
    py = w10 * mx + w11 * my + w12 * mz + t1
    pz = w20 * mx + w21 * my + w22 * mz + t2
    rz = 1.0 / tl.where(valid, pz, 1.0)
    j00, j02, j11, j12 = fx * rz, -fx * px * rz * rz, fy * rz, -fy * py * rz * rz
    a0, a1, a2 = j00 * m00 + j02 * m20, j00 * m01 + j02 * m21, j00 * m02 + j02 * m22
    b0, b1, b2 = j11 * m10 + j12 * m20, j11 * m11 + j12 * m21, j11 * m12 + j12 * m22
    ca = a0 * a0 + a1 * a1 + a2 * a2 + eps2d
    cb = a0 * b0 + a1 * b1 + a2 * b2
    cc = b0 * b0 + b1 * b1 + b2 * b2 + eps2d
    sc = tl.maximum(ca, cc)                      # det(Σ₂ / sc) as in the forward
    rs = 1.0 / tl.where(valid, sc, 1.0)
    na, nb, nc = ca * rs, cb * rs, cc * rs
    x0, x1, x2 = (a1 * b2 - a2 * b1) * rs, (a2 * b0 - a0 * b2) * rs, (a0 * b1 - a1 * b0) * rs
    qd = 1.0 / tl.where(valid, (x0 * x0 + x1 * x1 + x2 * x2 + eps2d * rs * (na + nc - eps2d * rs)) * sc, 1.0)
    id2 = qd * qd
    # incoming grads
    gu = tl.load(gm2d_ptr + o * 2 + 0, mask=valid, other=0).to(ACC)
    gv = tl.load(gm2d_ptr + o * 2 + 1, mask=valid, other=0).to(ACC)
    gA = tl.load(gcon_ptr + o * 3 + 0, mask=valid, other=0).to(ACC)
    gB = tl.load(gcon_ptr + o * 3 + 1, mask=valid, other=0).to(ACC)
    gC = tl.load(gcon_ptr + o * 3 + 2, mask=valid, other=0).to(ACC)
    gz = tl.load(gdep_ptr + o, mask=valid, other=0).to(ACC)
    # conic = (c, -b, a) / det  ->  grads of the 2D covariance entries a=ca, b=cb, c=cc
    ga = (-gA * nc * nc + gB * nb * nc - gC * nb * nb) * id2
    gb = (2 * gA * nb * nc - gB * (na * nc + nb * nb) + 2 * gC * na * nb) * id2
    gc = (-gA * nb * nb + gB * na * nb - gC * na * na) * id2
    ga0, ga1, ga2 = 2 * ga * a0 + gb * b0, 2 * ga * a1 + gb * b1, 2 * ga * a2 + gb * b2
    gb0, gb1, gb2 = gb * a0 + 2 * gc * b0, gb * a1 + 2 * gc * b1, gb * a2 + 2 * gc * b2
    # rows of J Mc -> Mc and J
    gm00, gm01, gm02 = j00 * ga0, j00 * ga1, j00 * ga2
    gm10, gm11, gm12 = j11 * gb0, j11 * gb1, j11 * gb2
    gm20, gm21, gm22 = j02 * ga0 + j12 * gb0, j02 * ga1 + j12 * gb1, j02 * ga2 + j12 * gb2
    gj00 = ga0 * m00 + ga1 * m01 + ga2 * m02
    gj02 = ga0 * m20 + ga1 * m21 + ga2 * m22
    gj11 = gb0 * m10 + gb1 * m11 + gb2 * m12
    gj12 = gb0 * m20 + gb1 * m21 + gb2 * m22
    # Mc = P diag(s), P = W R
    gsx = gm00 * p00 + gm10 * p10 + gm20 * p20
    gsy = gm01 * p01 + gm11 * p11 + gm21 * p21
    gsz = gm02 * p02 + gm12 * p12 + gm22 * p22
    gp00, gp01, gp02 = gm00 * sx, gm01 * sy, gm02 * sz
    gp10, gp11, gp12 = gm10 * sx, gm11 * sy, gm12 * sz
    gp20, gp21, gp22 = gm20 * sx, gm21 * sy, gm22 * sz
    g00, g01, g02 = w00 * gp00 + w10 * gp10 + w20 * gp20, w00 * gp01 + w10 * gp11 + w20 * gp21, w00 * gp02 + w10 * gp12 + w20 * gp22
    g10, g11, g12 = w01 * gp00 + w11 * gp10 + w21 * gp20, w01 * gp01 + w11 * gp11 + w21 * gp21, w01 * gp02 + w11 * gp12 + w21 * gp22
    g20, g21, g22 = w02 * gp00 + w12 * gp10 + w22 * gp20, w02 * gp01 + w12 * gp11 + w22 * gp21, w02 * gp02 + w12 * gp12 + w22 * gp22
    gw = 2 * (-z * g01 + y * g02 + z * g10 - x * g12 - y * g20 + x * g21)
    gx = 2 * (y * g01 + z * g02 + y * g10 - w * g12 + z * g20 + w * g21) - 4 * x * (g11 + g22)
    gy = 2 * (x * g01 + w * g02 + x * g10 + z * g12 - w * g20 + z * g21) - 4 * y * (g00 + g22)
    gzq = 2 * (-w * g01 + x * g02 + w * g10 + y * g12 + x * g20 + y * g21) - 4 * z * (g00 + g11)
    dq = w * gw + x * gx + y * gy + z * gzq
    gqw, gqx, gqy, gqz = (gw - w * dq) * rq, (gx - x * dq) * rq, (gy - y * dq) * rq, (gzq - z * dq) * rq
    # camera-space position: J entries, mean2d, depth
    rz2 = rz * rz
    gpx = -gj02 * fx * rz2 + gu * fx * rz
    gpy = -gj12 * fy * rz2 + gv * fy * rz
    gpz = (-gj00 * fx * rz2 + gj02 * 2 * fx * px * rz2 * rz - gj11 * fy * rz2 + gj12 * 2 * fy * py * rz2 * rz
           - gu * fx * px * rz2 - gv * fy * py * rz2 + gz)
    gmx = w00 * gpx + w10 * gpy + w20 * gpz
    gmy = w01 * gpx + w11 * gpy + w21 * gpz
    gmz = w02 * gpx + w12 * gpy + w22 * gpz
    tl.store(gmeans_ptr + o * 3 + 0, tl.where(valid, gmx, 0.0), mask=msk)
    tl.store(gmeans_ptr + o * 3 + 1, tl.where(valid, gmy, 0.0), mask=msk)
    tl.store(gmeans_ptr + o * 3 + 2, tl.where(valid, gmz, 0.0), mask=msk)
    tl.store(gquats_ptr + o * 4 + 0, tl.where(valid, gqw, 0.0), mask=msk)
    tl.store(gquats_ptr + o * 4 + 1, tl.where(valid, gqx, 0.0), mask=msk)
    tl.store(gquats_ptr + o * 4 + 2, tl.where(valid, gqy, 0.0), mask=msk)
    tl.store(gquats_ptr + o * 4 + 3, tl.where(valid, gqz, 0.0), mask=msk)
    tl.store(gscales_ptr + o * 3 + 0, tl.where(valid, gsx, 0.0), mask=msk)
    tl.store(gscales_ptr + o * 3 + 1, tl.where(valid, gsy, 0.0), mask=msk)
    tl.store(gscales_ptr + o * 3 + 2, tl.where(valid, gsz, 0.0), mask=msk)


@triton.jit
def _tile_pixels(pid, TW, NT, H, W, TILE: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr):
    """The R tiles pid·R .. pid·R+R−1 of one image as (R, TILE²) pixel rows/columns (i, j), their pixel
    centres and an inside-the-image mask, and the tile ids (R,) with their validity."""
    t = pid * R + tl.arange(0, R)
    tok = t < NT
    p = tl.arange(0, TILE * TILE)
    i = ((t // TW) * TILE)[:, None] + (p // TILE)[None, :]
    j = ((t % TW) * TILE)[:, None] + (p % TILE)[None, :]
    inside = tok[:, None] & (i < H) & (j < W)
    return t, tok, i, j, inside, j.to(ACC) + 0.5, i.to(ACC) + 0.5


# Sum / max reductions as tl.reduce with Triton's own combine functions: the same code as tl.sum / tl.max
# on the GPU, but the interpreter maps them straight to numpy instead of interpreting a nested jit call
# (~1 ms each, in loops that run once per Gaussian).
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


@triton.jit
def _gaussian_at_pixels(ids_ptr, m2d_ptr, con_ptr, dep_ptr, opa_ptr, k, ok, bv, b, N, pxf, pyf, ACC: tl.constexpr):
    """Gaussian ids[k] of each tile (k and ok: (R,)) of view bv at the tiles' pixels ((R, TILE²)): its
    index in the view, conic (a, b, c), depth and opacity ((R,) each), and per pixel dx, dy, e^{−σ}, the
    unclamped and the clamped α, and "α ≥ 1/255 and σ ≥ 0 and ok". Forward and backward run this same
    code, so both see bit-identical α and tests. σ is evaluated as −σ·log2(e) for the hardware exp2."""
    nl2e: tl.constexpr = -1.4426950408889634
    gid = tl.load(ids_ptr + k, mask=ok, other=0).to(tl.int64)
    gb = bv * N + gid
    mx = tl.load(m2d_ptr + gb * 2 + 0, mask=ok, other=0).to(ACC)
    my = tl.load(m2d_ptr + gb * 2 + 1, mask=ok, other=0).to(ACC)
    ca = tl.load(con_ptr + gb * 3 + 0, mask=ok, other=0).to(ACC)
    cb = tl.load(con_ptr + gb * 3 + 1, mask=ok, other=0).to(ACC)
    cc = tl.load(con_ptr + gb * 3 + 2, mask=ok, other=0).to(ACC)
    zz = tl.load(dep_ptr + gb, mask=ok, other=0).to(ACC)
    op = tl.load(opa_ptr + b * N + gid, mask=ok, other=0).to(ACC)
    ha, hb, hc = (ca * (0.5 * nl2e))[:, None], (cb * nl2e)[:, None], (cc * (0.5 * nl2e))[:, None]
    dx = pxf - mx[:, None]
    dy = pyf - my[:, None]
    ns = dx * (ha * dx + hb * dy) + hc * dy * dy
    ex = tl.exp2(ns)
    araw = op[:, None] * ex
    al = tl.minimum(araw, 0.99)
    return gid, ca, cb, cc, zz, op, dx, dy, ex, araw, al, (al >= 1.0 / 255.0) & (ns <= 0) & ok[:, None]


@triton.jit
def _splat_raster_fwd_kernel(m2d_ptr, con_ptr, dep_ptr, opa_ptr, col_ptr, bg_ptr, off_ptr, ids_ptr,
                             out_c_ptr, out_a_ptr, out_d_ptr, out_t_ptr, last_ptr,
                             N, V, C, H, W, TW, NT,
                             TILE: tl.constexpr, R: tl.constexpr, CB: tl.constexpr, CHUNK: tl.constexpr,
                             ACC: tl.constexpr):
    """One program per (R tiles, scene·view, channel block); R = 1 on the GPU (more under the interpreter,
    where each loop step costs the same for 1 or 64 tiles). Each tile's Gaussians one at a time, front
    to back (T updated by a product, colours by CB multiply-adds per pixel); every CHUNK Gaussians the
    program exits once every pixel is done. Writes T and the last contributor (count from the range
    start) for the backward."""
    bv = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    b = bv // V
    t, tok, i, j, inside, pxf, pyf = _tile_pixels(tl.program_id(0), TW, NT, H, W, TILE, R, ACC)
    start = tl.load(off_ptr + bv * NT + t, mask=tok, other=0)
    end = tl.load(off_ptr + bv * NT + t + 1, mask=tok, other=0)
    cs = pid_c * CB + tl.arange(0, CB)
    cmask = cs < C
    T = tl.full([R, TILE * TILE], 1.0, ACC)
    acc = tl.zeros([R, CB, TILE * TILE], ACC)        # channels before pixels: a thread keeps whole pixels
    accd = tl.zeros([R, TILE * TILE], ACC)
    last = tl.zeros([R, TILE * TILE], tl.int32)
    done = ~inside
    n = tl.reduce(end - start, 0, _MAX)
    k0 = 0
    alive = k0 < n
    while alive:
        for k in range(k0, tl.minimum(k0 + CHUNK, n)):
            ok = k < end - start
            gid, ca, cb, cc, zz, op, dx, dy, ex, araw, al, vis = _gaussian_at_pixels(
                ids_ptr, m2d_ptr, con_ptr, dep_ptr, opa_ptr, start + k, ok, bv, b, N, pxf, pyf, ACC)
            keep = vis & ~done
            tn = T * (1.0 - al)
            full = keep & (tn < 1e-4)                  # would bring T below 1e-4: the pixel stops before it
            use = keep & ~full
            done = done | full
            w = tl.where(use, al * T, 0.0)
            col = tl.load(col_ptr + ((b * N + gid) * C)[:, None] + cs[None, :], mask=ok[:, None] & cmask[None, :],
                          other=0).to(ACC)
            acc += col[:, :, None] * w[:, None, :]
            accd += w * zz[:, None]
            T = tl.where(use, tn, T)
            last = tl.where(use, k + 1, last)
        k0 += CHUNK
        alive = (k0 < n) & (tl.reduce(tl.reduce((~done).to(tl.int32), 1, _MAX), 0, _MAX) > 0)
    pix = (bv * H + i) * W + j
    bg = tl.load(bg_ptr + bv * C + cs, mask=cmask, other=0).to(ACC)
    tl.store(out_c_ptr + pix[:, None, :] * C + cs[None, :, None], acc + bg[None, :, None] * T[:, None, :],
             mask=inside[:, None, :] & cmask[None, :, None])
    if pid_c == 0:
        tl.store(out_a_ptr + pix, 1.0 - T, mask=inside)
        tl.store(out_d_ptr + pix, accd, mask=inside)
        tl.store(out_t_ptr + pix, T, mask=inside)
        tl.store(last_ptr + pix, last, mask=inside)


@triton.jit
def _splat_raster_bwd_kernel(m2d_ptr, con_ptr, dep_ptr, opa_ptr, col_ptr, bg_ptr, off_ptr, ids_ptr,
                             t_ptr, last_ptr, gc_ptr, ga_ptr, gd_ptr,
                             gm2d_ptr, gcon_ptr, gdep_ptr, gopa_ptr, gcol_ptr,
                             N, V, C, H, W, TW, NT,
                             TILE: tl.constexpr, R: tl.constexpr, CB: tl.constexpr, ONE_CB: tl.constexpr,
                             ACC: tl.constexpr):
    """One program per (R tiles, scene·view): each tile's Gaussians one at a time, back to front from
    the tile's last contributor. T before each Gaussian is recovered from the saved final T by dividing
    by (1 − α); per-Gaussian gradients are summed over the tile's pixels inside the program and added
    with one relaxed atomic per Gaussian and quantity. gc is channel-major (B·V, C, H, W). ONE_CB: all C
    channels fit one block (the pixels' colour gradients then stay in registers)."""
    bv = tl.program_id(1).to(tl.int64)
    b = bv // V
    t, tok, i, j, inside, pxf, pyf = _tile_pixels(tl.program_id(0), TW, NT, H, W, TILE, R, ACC)
    pix = (bv * H + i) * W + j
    pl = (i * W + j)[:, None, :]                     # pixel within its image, (R, 1, TILE²)
    start = tl.load(off_ptr + bv * NT + t, mask=tok, other=0)
    T = tl.load(t_ptr + pix, mask=inside, other=1).to(ACC)
    lst = tl.load(last_ptr + pix, mask=inside, other=0)
    g_a = tl.load(ga_ptr + pix, mask=inside, other=0).to(ACC)
    g_d = tl.load(gd_ptr + pix, mask=inside, other=0).to(ACC)
    cs = tl.arange(0, CB)
    gcbg = tl.zeros([R, TILE * TILE], ACC)
    for c0 in range(0, C, CB):
        cm = (c0 + cs) < C
        gcc = tl.load(gc_ptr + ((bv * C + c0 + cs) * H * W)[None, :, None] + pl,
                      mask=inside[:, None, :] & cm[None, :, None], other=0).to(ACC)
        bg = tl.load(bg_ptr + bv * C + c0 + cs, mask=cm, other=0).to(ACC)
        gcbg += tl.reduce(gcc * bg[None, :, None], 1, _SUM)
    gc0 = tl.load(gc_ptr + ((bv * C + cs) * H * W)[None, :, None] + pl,
                  mask=inside[:, None, :] & (cs < C)[None, :, None], other=0).to(ACC)   # used when ONE_CB
    behind = T * (gcbg - g_a)     # Σ_{k>i} w_k (gC·c_k + gD z_k) + T_N (gC·bg − gA)
    nt = tl.reduce(lst, 1, _MAX)           # (R,) Gaussians to walk back per tile
    for kk in range(0, tl.reduce(nt, 0, _MAX)):
        ok = kk < nt
        k = nt - 1 - kk
        gid, ca, cb, cc, zz, op, dx, dy, ex, araw, al, vis = _gaussian_at_pixels(
            ids_ptr, m2d_ptr, con_ptr, dep_ptr, opa_ptr, start + k, ok, bv, b, N, pxf, pyf, ACC)
        keep = vis & (k[:, None] < lst)
        al = tl.where(keep, al, 0.0)
        ra = 1.0 / (1.0 - al)
        T = T * ra                                          # T before this Gaussian
        w = al * T
        cb_ = (b * N + gid) * C
        if ONE_CB:
            cm = ok[:, None] & (cs < C)[None, :]
            col = tl.load(col_ptr + cb_[:, None] + cs[None, :], mask=cm, other=0).to(ACC)
            s = tl.reduce(gc0 * col[:, :, None], 1, _SUM)
            tl.atomic_add(gcol_ptr + cb_[:, None] + cs[None, :], tl.reduce(gc0 * w[:, None, :], 2, _SUM), mask=cm,
                          sem="relaxed")
        else:
            s = tl.zeros([R, TILE * TILE], ACC)
            for c0 in range(0, C, CB):
                cm = ok[:, None] & ((c0 + cs) < C)[None, :]
                col = tl.load(col_ptr + cb_[:, None] + (c0 + cs)[None, :], mask=cm, other=0).to(ACC)
                gcc = tl.load(gc_ptr + ((bv * C + c0 + cs) * H * W)[None, :, None] + pl,
                              mask=inside[:, None, :] & cm[:, :, None], other=0).to(ACC)
                s += tl.reduce(gcc * col[:, :, None], 1, _SUM)
                tl.atomic_add(gcol_ptr + cb_[:, None] + (c0 + cs)[None, :], tl.reduce(gcc * w[:, None, :], 2, _SUM),
                              mask=cm, sem="relaxed")
        s += g_d * zz[:, None]
        q = tl.where(keep & (araw <= 0.99), (T * s - behind * ra) * ex, 0.0)   # dL/dα · ∂α/∂o
        behind += w * s
        qx = q * dx
        qy = q * dy
        sq, sx, sy = tl.reduce(q, 1, _SUM), tl.reduce(qx, 1, _SUM), tl.reduce(qy, 1, _SUM)
        sxx, sxy, syy = tl.reduce(qx * dx, 1, _SUM), tl.reduce(qx * dy, 1, _SUM), tl.reduce(qy * dy, 1, _SUM)
        gb = bv * N + gid
        tl.atomic_add(gm2d_ptr + gb * 2 + 0, op * (ca * sx + cb * sy), mask=ok, sem="relaxed")
        tl.atomic_add(gm2d_ptr + gb * 2 + 1, op * (cb * sx + cc * sy), mask=ok, sem="relaxed")
        tl.atomic_add(gcon_ptr + gb * 3 + 0, -0.5 * op * sxx, mask=ok, sem="relaxed")
        tl.atomic_add(gcon_ptr + gb * 3 + 1, -op * sxy, mask=ok, sem="relaxed")
        tl.atomic_add(gcon_ptr + gb * 3 + 2, -0.5 * op * syy, mask=ok, sem="relaxed")
        tl.atomic_add(gdep_ptr + gb, tl.reduce(w * g_d, 1, _SUM), mask=ok, sem="relaxed")
        tl.atomic_add(gopa_ptr + b * N + gid, sq, mask=ok, sem="relaxed")


# ============================================================================ validation


def _check_scalars(width, height, near, far, eps2d):
    for name, val in (("width", width), ("height", height)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"{name}: expected an int, got {type(val).__name__}")
        if val <= 0:
            raise ValueError(f"{name}: must be > 0 (zero-area images are not supported), got {val}")
    for name, val in (("near", near), ("far", far), ("eps2d", eps2d)):
        if not isinstance(val, (int, float)) or val != val or abs(val) == float("inf"):
            raise ValueError(f"{name}: expected a finite number, got {val!r}")
    if near <= 0:
        raise ValueError(f"near: must be > 0, got {near}")
    if far <= near:
        raise ValueError(f"far: must be > near ({near}), got {far}")
    if eps2d < 0:
        raise ValueError(f"eps2d: must be >= 0, got {eps2d}")


def _validate(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d,
              opacities=None, colors=None, background=None, values: bool = True):
    """Check shapes/dtypes/devices, and with ``values`` (not while torch.compile traces) NaN/Inf in
    viewmats, Ks and background; return (B, V, N, C, compute dtype)."""
    values = values and not tracing()
    check_tensor("means", means, ndim=3, dtypes=FLOAT_DTYPES)
    B, N = means.shape[0], means.shape[1]
    if means.shape[2] != 3:
        raise ValueError(f"means: expected shape (B, N, 3), got {tuple(means.shape)}")
    if B == 0:
        raise ValueError("means: batch size B must be >= 1")
    check_tensor("quats", quats, dtypes=FLOAT_DTYPES, shape=(B, N, 4))
    check_tensor("scales", scales, dtypes=FLOAT_DTYPES, shape=(B, N, 3))
    check_tensor("viewmats", viewmats, ndim=4, dtypes=FLOAT_DTYPES)
    V = viewmats.shape[1]
    check_tensor("viewmats", viewmats, shape=(B, None, 4, 4))
    if V == 0:
        raise ValueError("viewmats: number of views V must be >= 1")
    check_tensor("Ks", Ks, dtypes=FLOAT_DTYPES, shape=(B, V, 3, 3))
    C = 0
    named = dict(means=means, quats=quats, scales=scales, viewmats=viewmats, Ks=Ks)
    if opacities is not None:
        check_tensor("opacities", opacities, dtypes=FLOAT_DTYPES, shape=(B, N))
        check_tensor("colors", colors, ndim=3, dtypes=FLOAT_DTYPES)
        C = colors.shape[2]
        check_tensor("colors", colors, shape=(B, N, None))
        if C == 0:
            raise ValueError("colors: need at least one channel (C >= 1)")
        named.update(opacities=opacities, colors=colors)
        if background is not None:
            check_tensor("background", background, dtypes=FLOAT_DTYPES, shape=(B, V, C))
            if values:
                check_finite("background", background)
            named["background"] = background
    check_same_device(**named)
    _check_scalars(width, height, near, far, eps2d)
    if values:
        check_finite("viewmats", viewmats)
        check_finite("Ks", Ks)
    dt = acc_dtype(means)
    return B, V, N, C, dt


# ============================================================================ launchers


def _proj_block(n: int) -> int:
    return 1024 if interpreting() else 256


def _raster_blocks(C: int):
    """(CB channels per block, num_warps) of the rasterizer: CB = next_pow2(C) up to 32 (more channels take
    more channel blocks in the forward, a channel loop in the backward); warps so that each thread holds
    at most 32 accumulators (8 pixels x 4 channels at C <= 4, one warp per 16x16 tile)."""
    CB = min(32, next_pow2(C))
    return CB, max(1, CB // 4)


def _tiles_per_program(n_tiles: int) -> int:
    """1 on the GPU; under the interpreter up to 64 tiles per program (its cost is per loop step)."""
    return min(64, next_pow2(n_tiles)) if interpreting() else 1


_CHUNK = 32   # forward: Gaussians between two "is every pixel of the tile done?" checks


def _project_fwd(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d):
    B, N = means.shape[:2]
    V = viewmats.shape[1]
    dt, dev = means.dtype, means.device
    means, quats, scales, viewmats, Ks = (t.contiguous() for t in (means, quats, scales, viewmats, Ks))
    m2d = torch.empty(B, V, N, 2, dtype=dt, device=dev)
    con = torch.empty(B, V, N, 3, dtype=dt, device=dev)
    dep = torch.empty(B, V, N, dtype=dt, device=dev)
    rad = torch.empty(B, V, N, dtype=torch.int32, device=dev)
    if N == 0:
        return m2d, con, dep, rad
    BLOCK = _proj_block(N)
    launch(
        _splat_project_fwd_kernel, (triton.cdiv(N, BLOCK), B * V),
        means, quats, scales, viewmats, Ks, m2d, con, dep, rad, N, V, width, height,
        float(near), float(far), float(eps2d), BLOCK=BLOCK, ACC=tl_dtype(dt))
    return m2d, con, dep, rad


def _project_bwd(means, quats, scales, viewmats, Ks, radii, g_m2d, g_con, g_dep, eps2d):
    B, N = means.shape[:2]
    V = viewmats.shape[1]
    dt, dev = means.dtype, means.device
    g_means = torch.zeros(B, V, N, 3, dtype=dt, device=dev)
    g_quats = torch.zeros(B, V, N, 4, dtype=dt, device=dev)
    g_scales = torch.zeros(B, V, N, 3, dtype=dt, device=dev)
    if N > 0:
        BLOCK = _proj_block(N)
        launch(
            _splat_project_bwd_kernel, (triton.cdiv(N, BLOCK), B * V),
            means.contiguous(), quats.contiguous(), scales.contiguous(), viewmats.contiguous(), Ks.contiguous(),
            radii.contiguous(), g_m2d.contiguous(), g_con.contiguous(), g_dep.contiguous(),
            g_means, g_quats, g_scales, N, V, float(eps2d), BLOCK=BLOCK, ACC=tl_dtype(dt))
    return g_means.sum(1), g_quats.sum(1), g_scales.sum(1)


def _bin_gaussians(means2d, depths, radii, width: int, height: int, capacity: int = -1):
    """Per (scene·view, tile) lists of the Gaussians whose 3σ square overlaps the tile, front to back.

    Returns offsets (B·V·tiles + 1,) int32, ids (M,) int32 (Gaussian index n within its view) and
    overflow (a 0-dim bool tensor): the list of flat tile t = (b·V + v)·tiles + ty·TW + tx is
    ids[offsets[t]:offsets[t+1]]. Gaussians are put in depth order per view first (a stable argsort, so
    equal depths keep the index order) and their tile intersections emitted in that order; one stable
    sort of the 32-bit tile ids then groups them by tile without disturbing the depth order.
    capacity < 0: M is the exact intersection count (one device->host read) and overflow is False;
    capacity >= 0: M = capacity (no host read; intersections past it are dropped, overflow says so).
    Raises ValueError (before any large allocation) when an index would overflow int32.
    """
    B, V, N = radii.shape
    dev = means2d.device
    TW, TH = triton.cdiv(width, TILE), triton.cdiv(height, TILE)
    NT = TW * TH
    check_index_range("tiles (B * V * tiles_x * tiles_y)", B * V * NT)
    order = torch.argsort(depths, dim=-1, stable=True)                       # (B, V, N) front to back
    m = torch.gather(means2d, 2, order[..., None].expand(B, V, N, 2))
    r = torch.gather(radii, 2, order)
    lo = torch.floor((m - r[..., None].to(m.dtype)) / TILE)
    hi = torch.floor((m + r[..., None].to(m.dtype)) / TILE)
    tx0 = lo[..., 0].clamp(0, TW - 1).to(torch.int32).reshape(-1)
    ty0 = lo[..., 1].clamp(0, TH - 1).to(torch.int32).reshape(-1)
    nx = (hi[..., 0].clamp(0, TW - 1).to(torch.int32).reshape(-1) - tx0 + 1)
    ny = (hi[..., 1].clamp(0, TH - 1).to(torch.int32).reshape(-1) - ty0 + 1)
    cnt = torch.where(r.reshape(-1) > 0, nx * ny, 0)                      # tiles per Gaussian (<= NT)
    cum = torch.cumsum(cnt, 0)                                             # int64
    total = cum[-1] if cum.numel() else torch.zeros((), dtype=torch.int64, device=dev)
    if capacity < 0:
        M = int(total)
        check_index_range("intersections (Gaussian x tile pairs)", M)
    else:
        M = check_index_range("max_intersections", capacity)
    j = torch.arange(M, device=dev)
    g = torch.searchsorted(cum, j, right=True).clamp(max=max(B * V * N - 1, 0))   # owner (bv, depth slot)
    k = (j - (cum - cnt)[g]).to(torch.int32)                               # its k-th tile
    nxg = nx[g].clamp(min=1)
    tile = (g // max(N, 1)).to(torch.int32) * NT + (ty0[g] + k // nxg) * TW + tx0[g] + k % nxg
    tile = torch.where(j < total, tile, B * V * NT)                          # unused capacity sorts last
    keys, perm = torch.sort(tile, stable=True)
    ids = order.reshape(-1)[g[perm]].to(torch.int32)
    offsets = torch.searchsorted(keys, torch.arange(B * V * NT + 1, dtype=torch.int32, device=dev),
                                 out_int32=True)
    return offsets, ids, total > M


def _rasterize_fwd(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height):
    B, V, N = depths.shape
    C = colors.shape[-1]
    dt, dev = means2d.dtype, means2d.device
    H, W = height, width
    out_c = torch.empty(B, V, H, W, C, dtype=dt, device=dev)
    out_a = torch.empty(B, V, H, W, 1, dtype=dt, device=dev)
    out_d = torch.empty(B, V, H, W, 1, dtype=dt, device=dev)
    out_t = torch.empty(B, V, H, W, dtype=dt, device=dev)
    last = torch.empty(B, V, H, W, dtype=torch.int32, device=dev)
    TW, TH = triton.cdiv(W, TILE), triton.cdiv(H, TILE)
    CB, nw = _raster_blocks(C)
    R = _tiles_per_program(TW * TH)
    launch(
        _splat_raster_fwd_kernel, (triton.cdiv(TW * TH, R), B * V, triton.cdiv(C, CB)),
        means2d.contiguous(), conics.contiguous(), depths.contiguous(), opacities.contiguous(),
        colors.contiguous(), background.contiguous(), offsets, ids, out_c, out_a, out_d, out_t, last,
        N, V, C, H, W, TW, TW * TH, TILE=TILE, R=R, CB=CB, CHUNK=_CHUNK, ACC=tl_dtype(dt), num_warps=nw)
    return out_c, out_a, out_d, out_t, last


def _rasterize_bwd(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height,
                   out_t, last, g_c, g_a, g_d):
    B, V, N = depths.shape
    C = colors.shape[-1]
    dt, dev = means2d.dtype, means2d.device
    H, W = height, width
    g_m2d = torch.zeros(B, V, N, 2, dtype=dt, device=dev)
    g_con = torch.zeros(B, V, N, 3, dtype=dt, device=dev)
    g_dep = torch.zeros(B, V, N, dtype=dt, device=dev)
    g_opa = torch.zeros(B, N, dtype=dt, device=dev)
    g_col = torch.zeros(B, N, C, dtype=dt, device=dev)
    TW, TH = triton.cdiv(W, TILE), triton.cdiv(H, TILE)
    CB, nw = _raster_blocks(C)
    R = _tiles_per_program(TW * TH)
    launch(
        _splat_raster_bwd_kernel, (triton.cdiv(TW * TH, R), B * V),
        means2d.contiguous(), conics.contiguous(), depths.contiguous(), opacities.contiguous(),
        colors.contiguous(), background.contiguous(), offsets, ids, out_t, last,
        g_c.permute(0, 1, 4, 2, 3).contiguous(), g_a.contiguous(), g_d.contiguous(), g_m2d, g_con, g_dep, g_opa, g_col,
        N, V, C, H, W, TW, TW * TH, TILE=TILE, R=R, CB=CB, ONE_CB=C <= CB, ACC=tl_dtype(dt), num_warps=nw)
    g_bg = (out_t[..., None] * g_c).sum((2, 3))
    return g_m2d, g_con, g_dep, g_opa, g_col, g_bg


# ============================================================================ registered ops


@torch.library.custom_op("nano4d::project_gaussians", mutates_args=())
def _project_op(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, viewmats: torch.Tensor,
                Ks: torch.Tensor, width: int, height: int, near: float, far: float, eps2d: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _project_fwd(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d)


@_project_op.register_fake
def _(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d):
    B, N, V = means.shape[0], means.shape[1], viewmats.shape[1]
    return (means.new_empty(B, V, N, 2), means.new_empty(B, V, N, 3), means.new_empty(B, V, N),
            means.new_empty(B, V, N, dtype=torch.int32))


def _project_setup(ctx, inputs, output):
    means, quats, scales, viewmats, Ks, width, height, near, far, eps2d = inputs
    ctx.save_for_backward(means, quats, scales, viewmats, Ks, output[3])
    ctx.eps2d = eps2d
    ctx.mark_non_differentiable(output[3])


def _project_backward(ctx, g_m2d, g_con, g_dep, g_rad):
    means, quats, scales, viewmats, Ks, radii = ctx.saved_tensors
    B, N, V = means.shape[0], means.shape[1], viewmats.shape[1]
    z = lambda *s: torch.zeros(*s, dtype=means.dtype, device=means.device)  # noqa: E731
    g_m2d = z(B, V, N, 2) if g_m2d is None else g_m2d
    g_con = z(B, V, N, 3) if g_con is None else g_con
    g_dep = z(B, V, N) if g_dep is None else g_dep
    gm, gq, gs = torch.ops.nano4d.project_gaussians_backward(means, quats, scales, viewmats, Ks, radii, g_m2d, g_con,
                                                    g_dep, ctx.eps2d)
    return gm, gq, gs, None, None, None, None, None, None, None


@torch.library.custom_op("nano4d::project_gaussians_backward", mutates_args=())
def _project_bwd_op(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, viewmats: torch.Tensor,
                    Ks: torch.Tensor, radii: torch.Tensor, g_m2d: torch.Tensor, g_con: torch.Tensor,
                    g_dep: torch.Tensor, eps2d: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _project_bwd(means, quats, scales, viewmats, Ks, radii, g_m2d, g_con, g_dep, eps2d)


@_project_bwd_op.register_fake
def _(means, quats, scales, viewmats, Ks, radii, g_m2d, g_con, g_dep, eps2d):
    return torch.empty_like(means), torch.empty_like(quats), torch.empty_like(scales)


_project_op.register_autograd(_project_backward, setup_context=_project_setup)


@torch.library.custom_op("nano4d::rasterize_gaussians", mutates_args=())
def _raster_op(means2d: torch.Tensor, conics: torch.Tensor, depths: torch.Tensor, opacities: torch.Tensor,
               colors: torch.Tensor, background: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
               width: int, height: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rasterize_fwd(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height)


@_raster_op.register_fake
def _(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height):
    B, V = depths.shape[:2]
    C = colors.shape[-1]
    e = means2d.new_empty
    return (e(B, V, height, width, C), e(B, V, height, width, 1), e(B, V, height, width, 1),
            e(B, V, height, width), e(B, V, height, width, dtype=torch.int32))


def _raster_setup(ctx, inputs, output):
    means2d, conics, depths, opacities, colors, background, offsets, ids, width, height = inputs
    ctx.save_for_backward(means2d, conics, depths, opacities, colors, background, offsets, ids, output[3], output[4])
    ctx.size = (width, height)
    ctx.mark_non_differentiable(output[3], output[4])


def _raster_backward(ctx, g_c, g_a, g_d, g_t, g_last):
    means2d, conics, depths, opacities, colors, background, offsets, ids, out_t, last = ctx.saved_tensors
    width, height = ctx.size
    B, V = depths.shape[:2]
    C = colors.shape[-1]
    z = lambda *s: torch.zeros(*s, dtype=means2d.dtype, device=means2d.device)  # noqa: E731
    g_c = z(B, V, height, width, C) if g_c is None else g_c
    g_a = z(B, V, height, width, 1) if g_a is None else g_a
    g_d = z(B, V, height, width, 1) if g_d is None else g_d
    grads = torch.ops.nano4d.rasterize_gaussians_backward(means2d, conics, depths, opacities, colors, background, offsets,
                                                 ids, width, height, out_t, last, g_c, g_a, g_d)
    return (*grads, None, None, None, None)


@torch.library.custom_op("nano4d::rasterize_gaussians_backward", mutates_args=())
def _raster_bwd_op(means2d: torch.Tensor, conics: torch.Tensor, depths: torch.Tensor, opacities: torch.Tensor,
                   colors: torch.Tensor, background: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
                   width: int, height: int, out_t: torch.Tensor, last: torch.Tensor, g_c: torch.Tensor,
                   g_a: torch.Tensor, g_d: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rasterize_bwd(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height,
                          out_t, last, g_c, g_a, g_d)


@_raster_bwd_op.register_fake
def _(means2d, conics, depths, opacities, colors, background, offsets, ids, width, height, out_t, last, g_c, g_a,
      g_d):
    return tuple(torch.empty_like(t) for t in (means2d, conics, depths, opacities, colors, background))


_raster_op.register_autograd(_raster_backward, setup_context=_raster_setup)


@torch.library.custom_op("nano4d::bin_gaussians", mutates_args=())
def _bin_op(means2d: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor, width: int, height: int,
            capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bin_gaussians(means2d, depths, radii, width, height, capacity)


@_bin_op.register_fake
def _(means2d, depths, radii, width, height, capacity):
    B, V = radii.shape[:2]
    NT = triton.cdiv(width, TILE) * triton.cdiv(height, TILE)
    M = capacity if capacity >= 0 else torch.library.get_ctx().new_dynamic_size()
    return radii.new_empty(B * V * NT + 1), radii.new_empty(M), radii.new_empty((), dtype=torch.bool)


# ============================================================================ public API


def project_gaussians(means, quats, scales, viewmats, Ks, width: int, height: int, near: float = 0.01,
                      far: float = 1e10, eps2d: float = 0.3, validate: bool = True):
    """EWA-project B scenes of N Gaussians into V views each.

    Returns means2d (B,V,N,2), conics (B,V,N,3), depths (B,V,N) in the compute dtype and radii (B,V,N)
    int32 (0 = culled). Differentiable w.r.t. means, quats, scales. ``validate=False`` skips the checks
    that read values (NaN/Inf in viewmats and Ks: device->host reads); shapes, dtypes and devices are
    always checked.
    """
    B, V, N, _, dt = _validate(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d,
                               values=validate)
    args = [t.to(dt) for t in (means, quats, scales, viewmats, Ks)]
    if use_triton(means):
        return torch.ops.nano4d.project_gaussians(*args, width, height, float(near), float(far), float(eps2d))
    return project_gaussians_ref(*args, width, height, near, far, eps2d)


def rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                        near: float = 0.01, far: float = 1e10, background=None, eps2d: float = 0.3,
                        validate: bool = True, max_intersections: int | None = None):
    """Render B scenes of N Gaussians into V views each (layouts and math: module docstring).

    Returns colors (B,V,H,W,C), alphas (B,V,H,W,1), depths (B,V,H,W,1) (accumulated depth Σ wᵢzᵢ;
    expected depth = depths / alphas).

    Device->host reads: ``validate=True`` checks viewmats, Ks and background for NaN/Inf (3 reads;
    skipped with ``validate=False`` and while torch.compile traces); the Triton path reads the number of
    tile intersections once to size its lists, unless ``max_intersections`` is given: then the lists
    have that fixed size, the call makes no device->host read at all (CUDA-graph capturable), and if the
    scene has more intersections than that every output is NaN (never a silently partial image).
    """
    B, V, N, C, dt = _validate(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d,
                               opacities, colors, background, values=validate)
    if max_intersections is not None and (isinstance(max_intersections, bool) or not isinstance(max_intersections, int)
                                          or max_intersections < 0):
        raise ValueError(f"max_intersections: expected an int >= 0 or None, got {max_intersections!r}")
    if background is None:
        background = torch.zeros(B, V, C, dtype=dt, device=means.device)
    means, quats, scales, opacities, colors, viewmats, Ks = (
        t.to(dt) for t in (means, quats, scales, opacities, colors, viewmats, Ks))
    background = background.to(dt)
    if not use_triton(means):
        return rasterize_gaussians_ref(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                       near, far, background, eps2d)
    TW, TH = triton.cdiv(width, TILE), triton.cdiv(height, TILE)
    check_index_range("tiles (B * V * tiles_x * tiles_y)", B * V * TW * TH)
    check_index_range("pixels (B * V * height * width)", B * V * height * width)
    m2d, con, dep, rad = torch.ops.nano4d.project_gaussians(means, quats, scales, viewmats, Ks, width, height,
                                                            float(near), float(far), float(eps2d))
    ok = torch.isfinite(opacities) & torch.isfinite(colors).all(-1)      # bad opacity/colour -> culled
    rad = torch.where(ok[:, None], rad, torch.zeros_like(rad))
    opacities = torch.where(ok, opacities, torch.zeros_like(opacities))
    colors = torch.where(ok[..., None], colors, torch.zeros_like(colors))
    cap = -1 if max_intersections is None else max_intersections
    with torch.no_grad():
        offsets, ids, overflow = torch.ops.nano4d.bin_gaussians(m2d.detach(), dep.detach(), rad, width, height, cap)
    out = torch.ops.nano4d.rasterize_gaussians(m2d, con, dep, opacities, colors, background, offsets, ids,
                                               width, height)
    if cap >= 0:
        nan = torch.where(overflow, float("nan"), 0.0).to(dt)
        return out[0] + nan, out[1] + nan, out[2] + nan
    return out[0], out[1], out[2]


splat = rasterize_gaussians   # the file's op under the file's name (kernels/<op>.py skeleton)

__all__ = ["project_gaussians", "rasterize_gaussians", "project_gaussians_ref", "rasterize_gaussians_ref"]
