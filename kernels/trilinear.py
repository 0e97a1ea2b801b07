"""Trilinear sampling of a 3-D feature volume at arbitrary points, differentiable twice.

For every batch b, point n and channel c:

    out[b, n, c] = sum_{corners k}  w_k(p) * volume[b, c, z_k, y_k, x_k]
    u = (x + 1) / 2 * (X - 1)   (likewise v from y over Y, s from z over Z)   index space, align_corners=True
    w_k = (1 - fu or fu) * (1 - fv or fv) * (1 - fs or fs),  fu = u - floor(u), corners at floor / floor + 1

i.e. ``F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)`` on a 5-D
volume: index i of an axis with N voxels sits at -1 + 2i / (N - 1); corners outside the volume contribute
zero. A point (x, y, z) indexes the (X, Y, Z) dims, as in grid_sample. An axis of size 1 samples its only
voxel for every coordinate (grid_sample's align_corners=True convention), with zero derivative.

Derivatives. d out / d p is the usual piecewise-bilinear gradient (right-sided at the kinks, i.e. where u,
v or s is an integer). Because w_k is linear in each coordinate separately, the second derivative of out
w.r.t. p has a zero diagonal and non-zero mixed terms (d^2 w / dx dy = dw_x/dx * dw_y/dy * w_z), and the
gradient w.r.t. p is linear in the volume. The op is registered with a differentiable backward
(``nano4d::trilinear_backward``, whose own backward is ``nano4d::trilinear_backward2``), so
``torch.autograd.grad(out, points, create_graph=True)`` can be trained through: the gradient of an SDF
sampled from the volume (NeuS normals, eikonal terms) gets gradients w.r.t. the volume and the points.
Third derivatives through the Triton op are not supported (the reference has no such limit).

Layouts
    volume   (B, C, Z, Y, X)     any strides (the kernel reads a channels-last copy)
    points   (B, N, 3)           (x, y, z) normalized to [-1, 1] over (X, Y, Z)
    output   (B, N, C)           channels last: one row of features per point, in volume's dtype

Non-finite points: a point with a NaN or +-Inf coordinate contributes exactly zero and gets zero gradient.
Finite coordinates are clamped to [-5, 5] first (exact: beyond that no corner is inside, for any N >= 2),
so indices stay small. NaN/Inf in ``volume`` propagate to the points that read them.

dtypes: volume fp32 / bf16 / fp16 / fp64, points fp32 / bf16 / fp16 / fp64 (use fp32: bf16 coordinates
have 8 mantissa bits). Arithmetic is fp32 (fp64 if any input is fp64). grad_volume takes volume's dtype and
grad_points points' dtype. Volume gradients are accumulated with relaxed fp32 atomics into a channels-last
buffer, so they are deterministic only up to summation order. Any C (channels run in chunks of <= 32 per
program; the kernels' channels-last copy pads C to a multiple of 8, and C is compiled in), any N; offsets
are int64. Each call makes a channels-last copy of the volume (none if it already is channels-last with
C a multiple of 8).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, check_same_device, check_tensor, interpreting, next_pow2,
                             use_triton)

COORD_LIM = 5.0     # finite coordinates are clamped to [-COORD_LIM, COORD_LIM] (outside the box for N >= 2)
MAX_BLOCK_C = 32    # channels per inner chunk


# ============================================================================ Triton kernels
# Inside the kernels the volume is channels-last (B, Z, Y, X, CP) contiguous, CP = C rounded up to a multiple
# of 8 (zero padding): one corner is one contiguous, 16-byte aligned row, so corner loads and gradient atomics
# vectorize for any C. Voxel offset lin = ((b * Z + z) * Y + y) * X + x; channel c lives at lin * CP + c.
# C and CP are compile-time constants (one compile per channel count).

@triton.jit
def _axis(p, n, ACC: tl.constexpr):
    """One axis: (low index, fraction, low / high corner in bounds, d index / d p) for coordinate p on an
    axis of n voxels. p must be finite here (the caller masks non-finite points)."""
    p = tl.minimum(tl.maximum(p, -5.0), 5.0)
    scale = 0.5 * (n - 1).to(ACC)
    u = (p + 1.0) * scale
    u0 = tl.floor(u)
    i0 = u0.to(tl.int32)
    return i0, u - u0, (i0 >= 0) & (i0 < n), (i0 >= -1) & (i0 < n - 1), scale


@triton.jit
def _load_points(pts_ptr, row, mask_n, ACC: tl.constexpr):
    """(x, y, z) of BLOCK_N points and a mask of the valid (in range, all-finite) ones; invalid -> 0."""
    px = tl.load(pts_ptr + 3 * row, mask=mask_n, other=0.0).to(ACC)
    py = tl.load(pts_ptr + 3 * row + 1, mask=mask_n, other=0.0).to(ACC)
    pz = tl.load(pts_ptr + 3 * row + 2, mask=mask_n, other=0.0).to(ACC)
    # |p| < inf is False for NaN and +-Inf
    ok = mask_n & (tl.abs(px) < float("inf")) & (tl.abs(py) < float("inf")) & (tl.abs(pz) < float("inf"))
    return tl.where(ok, px, 0.0), tl.where(ok, py, 0.0), tl.where(ok, pz, 0.0), ok


@triton.jit
def _trilinear_fwd_kernel(
    vol_ptr, pts_ptr, out_ptr,
    N, Z, Y, X, n_blocks,
    C: tl.constexpr, CP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)                                        # int32 division, then int64 offsets
    b = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = b * N + offs_n
    px, py, pz, ok = _load_points(pts_ptr, row, offs_n < N, ACC)
    x0, fx, vx0, vx1, _sx = _axis(px, X, ACC)
    y0, fy, vy0, vy1, _sy = _axis(py, Y, ACC)
    z0, fz, vz0, vz1, _sz = _axis(pz, Z, ACC)
    base = ((b * Z + z0) * Y + y0) * X + x0                       # int64 offset of the low corner
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = (offs_c < C)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        for k in tl.static_range(8):
            inb = ok & (vx1 if k & 1 else vx0) & (vy1 if k & 2 else vy0) & (vz1 if k & 4 else vz0)
            lin = base + (1 if k & 1 else 0) + (X if k & 2 else 0) + (X * Y if k & 4 else 0)
            w = (fx if k & 1 else 1.0 - fx) * (fy if k & 2 else 1.0 - fy) * (fz if k & 4 else 1.0 - fz)
            v = tl.load(vol_ptr + lin[:, None] * CP + offs_c[None, :], mask=inb[:, None] & mc, other=0.0)
            acc += w[:, None] * v.to(ACC)
        tl.store(out_ptr + row[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_n < N)[:, None] & mc)


@triton.jit
def _trilinear_bwd_kernel(
    vol_ptr, pts_ptr, g_ptr, gvol_ptr, gpts_ptr,
    N, Z, Y, X, n_blocks,
    C: tl.constexpr, CP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """grad_volume[corner] += w * g (atomics into a channels-last accumulator);
    grad_points = sum_corners dw/dp * <g, volume[corner]> (one owner per point)."""
    pid = tl.program_id(0)                                        # int32 division, then int64 offsets
    b = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = b * N + offs_n
    mask_n = offs_n < N
    px, py, pz, ok = _load_points(pts_ptr, row, mask_n, ACC)
    x0, fx, vx0, vx1, sx = _axis(px, X, ACC)
    y0, fy, vy0, vy1, sy = _axis(py, Y, ACC)
    z0, fz, vz0, vz1, sz = _axis(pz, Z, ACC)
    base = ((b * Z + z0) * Y + y0) * X + x0
    gx = tl.zeros([BLOCK_N], dtype=ACC)
    gy = tl.zeros([BLOCK_N], dtype=ACC)
    gz = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = (offs_c < C)[None, :]
        g = tl.load(g_ptr + row[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mc, other=0.0).to(ACC)
        for k in tl.static_range(8):
            inb = ok & (vx1 if k & 1 else vx0) & (vy1 if k & 2 else vy0) & (vz1 if k & 4 else vz0)
            lin = base + (1 if k & 1 else 0) + (X if k & 2 else 0) + (X * Y if k & 4 else 0)
            wx = fx if k & 1 else 1.0 - fx
            wy = fy if k & 2 else 1.0 - fy
            wz = fz if k & 4 else 1.0 - fz
            m2 = inb[:, None] & mc
            v = tl.load(vol_ptr + lin[:, None] * CP + offs_c[None, :], mask=m2, other=0.0).to(ACC)
            gv = tl.sum(g * v, axis=1)
            # d w / d x = +-1 (high / low corner) * wy * wz, times d index / d x (applied at the end)
            gx += (gv if k & 1 else -gv) * wy * wz
            gy += (gv if k & 2 else -gv) * wx * wz
            gz += (gv if k & 4 else -gv) * wx * wy
            tl.atomic_add(gvol_ptr + lin[:, None] * CP + offs_c[None, :], (wx * wy * wz)[:, None] * g, mask=m2,
                          sem="relaxed")
    out = gpts_ptr.dtype.element_ty
    tl.store(gpts_ptr + 3 * row, (gx * sx).to(out), mask=mask_n)
    tl.store(gpts_ptr + 3 * row + 1, (gy * sy).to(out), mask=mask_n)
    tl.store(gpts_ptr + 3 * row + 2, (gz * sz).to(out), mask=mask_n)


@triton.jit
def _trilinear_bwd2_kernel(
    vol_ptr, pts_ptr, g_ptr, ggv_ptr, ggp_ptr,
    ggout_ptr, gvol_ptr, gpts_ptr,
    N, Z, Y, X, n_blocks,
    HAS_GGV: tl.constexpr, HAS_GGP: tl.constexpr,
    C: tl.constexpr, CP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Backward of the backward. The first backward maps (g, volume, p) to
    gV[corner] = w(p) g and gP = sum_corners dw/dp <g, volume[corner]>. Given the upstream gradients
    ggV (volume-shaped, channels-last) and ggP (B, N, 3), with q = ggP and u_k = <q, dw_k/dp>:
        d/dg       = sum_k w_k ggV[k] + u_k volume[k]               -> ggout  (B, N, C)
        d/dvolume  = scatter of u_k g to corner k                    -> gvol   (atomics, only if HAS_GGP)
        d/dp_j     = sum_k dw_k/dp_j <g, ggV[k]> + (H_k q)_j <g, volume[k]>   -> gpts
    H_k is the Hessian of w_k: zero diagonal, H_k[x, y] = dw_x/dx * dw_y/dy * w_z (likewise xz, yz)."""
    pid = tl.program_id(0)                                        # int32 division, then int64 offsets
    b = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = b * N + offs_n
    mask_n = offs_n < N
    px, py, pz, ok = _load_points(pts_ptr, row, mask_n, ACC)
    x0, fx, vx0, vx1, sx = _axis(px, X, ACC)
    y0, fy, vy0, vy1, sy = _axis(py, Y, ACC)
    z0, fz, vz0, vz1, sz = _axis(pz, Z, ACC)
    base = ((b * Z + z0) * Y + y0) * X + x0
    if HAS_GGP:   # q scaled to index units: d/dp = scale * d/du, so every q_j carries one scale factor
        qx = tl.load(ggp_ptr + 3 * row, mask=mask_n, other=0.0).to(ACC) * sx
        qy = tl.load(ggp_ptr + 3 * row + 1, mask=mask_n, other=0.0).to(ACC) * sy
        qz = tl.load(ggp_ptr + 3 * row + 2, mask=mask_n, other=0.0).to(ACC) * sz
    gx = tl.zeros([BLOCK_N], dtype=ACC)
    gy = tl.zeros([BLOCK_N], dtype=ACC)
    gz = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = (offs_c < C)[None, :]
        g = tl.load(g_ptr + row[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mc, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        for k in tl.static_range(8):
            inb = ok & (vx1 if k & 1 else vx0) & (vy1 if k & 2 else vy0) & (vz1 if k & 4 else vz0)
            lin = base + (1 if k & 1 else 0) + (X if k & 2 else 0) + (X * Y if k & 4 else 0)
            m2 = inb[:, None] & mc
            wx = fx if k & 1 else 1.0 - fx
            wy = fy if k & 2 else 1.0 - fy
            wz = fz if k & 4 else 1.0 - fz
            # index-space derivatives of w_k: the high corner's weight rises, the low one's falls
            ex = 1.0 if k & 1 else -1.0
            ey = 1.0 if k & 2 else -1.0
            ez = 1.0 if k & 4 else -1.0
            if HAS_GGV:
                q = tl.load(ggv_ptr + lin[:, None] * CP + offs_c[None, :], mask=m2, other=0.0).to(ACC)
                acc += (wx * wy * wz)[:, None] * q
                gq = tl.sum(g * q, axis=1)
                gx += ex * wy * wz * gq
                gy += ey * wx * wz * gq
                gz += ez * wx * wy * gq
            if HAS_GGP:
                v = tl.load(vol_ptr + lin[:, None] * CP + offs_c[None, :], mask=m2, other=0.0).to(ACC)
                u = ex * wy * wz * qx + ey * wx * wz * qy + ez * wx * wy * qz
                acc += u[:, None] * v
                gv = tl.sum(g * v, axis=1)
                gx += (ex * ey * wz * qy + ex * ez * wy * qz) * gv
                gy += (ex * ey * wz * qx + ey * ez * wx * qz) * gv
                gz += (ex * ez * wy * qx + ey * ez * wx * qy) * gv
                tl.atomic_add(gvol_ptr + lin[:, None] * CP + offs_c[None, :], u[:, None] * g, mask=m2,
                              sem="relaxed")
        tl.store(ggout_ptr + row[:, None] * C + offs_c[None, :], acc.to(ggout_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mc)
    out = gpts_ptr.dtype.element_ty
    tl.store(gpts_ptr + 3 * row, (gx * sx).to(out), mask=mask_n)
    tl.store(gpts_ptr + 3 * row + 1, (gy * sy).to(out), mask=mask_n)
    tl.store(gpts_ptr + 3 * row + 2, (gz * sz).to(out), mask=mask_n)


# ============================================================================ reference

def trilinear_ref(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch trilinear sampling by an explicit gather of the 8 corners (the CPU path).

    Differentiable to any order through autograd. Index / weight math runs in points' dtype promoted
    to at least fp32; the gathered values keep volume's dtype; the output is cast to volume's dtype.
    """
    B, C, Z, Y, X = volume.shape
    N = points.shape[1]
    cdt = torch.promote_types(points.dtype, torch.float32)
    p = points.to(cdt)
    valid = torch.isfinite(p).all(-1, keepdim=True)                               # (B, N, 1)
    p = torch.where(valid, p, torch.zeros_like(p)).clamp(-COORD_LIM, COORD_LIM)
    flat = volume.permute(0, 2, 3, 4, 1).reshape(B, Z * Y * X, C)                 # channels-last rows
    lows, fracs, sizes = [], [], (X, Y, Z)
    for a, n in enumerate(sizes):
        u = (p[..., a] + 1) * (0.5 * (n - 1))                                     # index coordinate
        lo = torch.floor(u)
        lows.append(lo.long())
        fracs.append(u - lo)                                                      # floor has zero gradient
    out = None
    for k in range(8):
        bits = (k & 1, (k >> 1) & 1, (k >> 2) & 1)
        w = valid[..., 0].to(cdt)
        inside = torch.ones_like(w, dtype=torch.bool)
        idx = torch.zeros_like(lows[0])
        stride = 1
        for a, n in enumerate(sizes):
            i = lows[a] + bits[a]
            w = w * (fracs[a] if bits[a] else 1 - fracs[a])
            inside = inside & (i >= 0) & (i < n)
            idx = idx + i.clamp(0, n - 1) * stride
            stride *= n
        vals = torch.gather(flat, 1, idx.unsqueeze(-1).expand(B, N, C))         # (B, N, C)
        term = (w * inside)[..., None] * vals
        out = term if out is None else out + term
    return out.to(volume.dtype)


# ============================================================================ validation + launchers

def _check_inputs(volume, points):
    """Validate shapes / dtypes / devices; raise ValueError naming the argument. Returns (B, C, Z, Y, X, N)."""
    check_tensor("volume", volume, ndim=5, dtypes=FLOAT_DTYPES)
    B, C, Z, Y, X = volume.shape
    if min(Z, Y, X) < 1:
        raise ValueError(f"volume: spatial dims (Z, Y, X) must be >= 1, got {tuple(volume.shape)}")
    check_tensor("points", points, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("points", points, shape=(B, None, 3))
    check_same_device(volume=volume, points=points)
    return B, C, Z, Y, X, points.shape[1]


def _acc(*tensors):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


# GPU tile (points x channels per program) by kernel and the largest BLOCK_N: the backward keeps two tiles
# live and the double backward three or four, so they take smaller tiles (sized so that no kernel spills
# registers, checked with ptxas at C = 32 and 100 in the tests).
_TILE = {"fwd": 2048, "bwd": 1024, "bwd2": 1024, "bwd2_both": 512}
_MAX_BLOCK_N = {"fwd": 128, "bwd": 64, "bwd2": 32, "bwd2_both": 16}


def _block_sizes(C: int, N: int, interpret: bool | None = None, kind: str = "fwd"):
    """(BLOCK_N, BLOCK_C, num_warps) for kernel ``kind``. GPU: tiles of _TILE[kind] elements.
    Interpreter: few, big programs (each program costs ~0.4 ms of Python there)."""
    interpret = interpreting() if interpret is None else interpret
    block_c = min(MAX_BLOCK_C, max(2, next_pow2(C)))
    if interpret:
        return max(16, min(256, next_pow2(N))), block_c, 4
    return max(16, min(_MAX_BLOCK_N[kind], _TILE[kind] // block_c)), block_c, 4


def _padded(C: int) -> int:
    """Channel stride of the kernels' channels-last buffers: C rounded up to a multiple of 8."""
    return -(-C // 8) * 8


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, Y, X) -> contiguous (B, Z, Y, X, CP), zero-padded channels (no copy if t already is
    channels-last with C == CP)."""
    B, C, Z, Y, X = t.shape
    cl = t.permute(0, 2, 3, 4, 1)
    if _padded(C) == C:
        return cl.contiguous()
    out = t.new_zeros(B, Z, Y, X, _padded(C))
    out[..., :C] = cl
    return out


def _grad_buffer(volume, acc):
    B, C, Z, Y, X = volume.shape
    return torch.zeros(B, Z, Y, X, _padded(C), device=volume.device,
                       dtype=torch.float64 if acc == tl.float64 else torch.float32)


def _from_grad_buffer(buf, volume):
    return buf[..., :volume.shape[1]].permute(0, 4, 1, 2, 3).to(volume.dtype).contiguous()


def _trilinear_fwd(volume, points):
    B, C, Z, Y, X, N = _check_inputs(volume, points)
    out = volume.new_empty(B, N, C)
    if out.numel() == 0:
        return out
    block_n, block_c, warps = _block_sizes(C, N, kind="fwd")
    nb = triton.cdiv(N, block_n)
    _trilinear_fwd_kernel[(B * nb,)](
        _channels_last(volume), points.contiguous(), out, N, Z, Y, X, nb,
        C=C, CP=_padded(C), BLOCK_N=block_n, BLOCK_C=block_c, ACC=_acc(volume, points), num_warps=warps)
    return out


def _trilinear_bwd(grad_out, volume, points):
    B, C, Z, Y, X, N = _check_inputs(volume, points)
    check_tensor("grad_out", grad_out, shape=(B, N, C), dtypes=FLOAT_DTYPES, device=volume.device)
    acc = _acc(volume, points, grad_out)
    gvol = _grad_buffer(volume, acc)
    gpts = torch.zeros_like(points, memory_format=torch.contiguous_format)
    if grad_out.numel() > 0:
        block_n, block_c, warps = _block_sizes(C, N, kind="bwd")
        nb = triton.cdiv(N, block_n)
        _trilinear_bwd_kernel[(B * nb,)](
            _channels_last(volume), points.contiguous(), grad_out.contiguous(), gvol, gpts,
            N, Z, Y, X, nb, C=C, CP=_padded(C), BLOCK_N=block_n, BLOCK_C=block_c, ACC=acc, num_warps=warps)
    return _from_grad_buffer(gvol, volume), gpts


def _trilinear_bwd2(grad_out, volume, points, gg_volume, gg_points):
    B, C, Z, Y, X, N = _check_inputs(volume, points)
    check_tensor("grad_out", grad_out, shape=(B, N, C), dtypes=FLOAT_DTYPES, device=volume.device)
    if gg_volume is not None:
        check_tensor("gg_volume", gg_volume, shape=tuple(volume.shape), dtypes=FLOAT_DTYPES, device=volume.device)
    if gg_points is not None:
        check_tensor("gg_points", gg_points, shape=tuple(points.shape), dtypes=FLOAT_DTYPES, device=volume.device)
    acc = _acc(volume, points, grad_out, gg_volume, gg_points)
    gg_out = torch.zeros(B, N, C, device=volume.device, dtype=grad_out.dtype)
    gvol = _grad_buffer(volume, acc)
    gpts = torch.zeros_like(points, memory_format=torch.contiguous_format)
    if grad_out.numel() > 0 and (gg_volume is not None or gg_points is not None):
        both = gg_volume is not None and gg_points is not None
        block_n, block_c, warps = _block_sizes(C, N, kind="bwd2_both" if both else "bwd2")
        nb = triton.cdiv(N, block_n)
        pts = points.contiguous()
        _trilinear_bwd2_kernel[(B * nb,)](
            _channels_last(volume), pts, grad_out.contiguous(),
            _channels_last(gg_volume) if gg_volume is not None else gvol,         # dummy pointer if absent
            gg_points.contiguous() if gg_points is not None else pts,
            gg_out, gvol, gpts, N, Z, Y, X, nb,
            HAS_GGV=gg_volume is not None, HAS_GGP=gg_points is not None,
            C=C, CP=_padded(C), BLOCK_N=block_n, BLOCK_C=block_c, ACC=acc, num_warps=warps)
    return gg_out, _from_grad_buffer(gvol, volume), gpts


# ============================================================================ registration

@torch.library.custom_op("nano4d::trilinear", mutates_args=())
def _trilinear_op(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return _trilinear_fwd(volume, points)


@_trilinear_op.register_fake
def _(volume, points):
    return volume.new_empty(volume.shape[0], points.shape[1], volume.shape[1])


@torch.library.custom_op("nano4d::trilinear_backward", mutates_args=())
def _trilinear_backward_op(grad_out: torch.Tensor, volume: torch.Tensor,
                           points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _trilinear_bwd(grad_out, volume, points)


@_trilinear_backward_op.register_fake
def _(grad_out, volume, points):
    return (torch.empty_like(volume, memory_format=torch.contiguous_format),
            torch.empty_like(points, memory_format=torch.contiguous_format))


@torch.library.custom_op("nano4d::trilinear_backward2", mutates_args=())
def _trilinear_backward2_op(grad_out: torch.Tensor, volume: torch.Tensor, points: torch.Tensor,
                            gg_volume: Optional[torch.Tensor], gg_points: Optional[torch.Tensor],
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _trilinear_bwd2(grad_out, volume, points, gg_volume, gg_points)


@_trilinear_backward2_op.register_fake
def _(grad_out, volume, points, gg_volume, gg_points):
    return (torch.empty_like(grad_out, memory_format=torch.contiguous_format),
            torch.empty_like(volume, memory_format=torch.contiguous_format),
            torch.empty_like(points, memory_format=torch.contiguous_format))


def _setup_fwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_fwd(ctx, grad):
    volume, points = ctx.saved_tensors
    return torch.ops.nano4d.trilinear_backward(grad.contiguous(), volume, points)


def _setup_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)   # an unused output (typically grad_volume under autograd.grad) stays None


def _backward_bwd(ctx, gg_volume, gg_points):
    grad_out, volume, points = ctx.saved_tensors
    if gg_volume is None and gg_points is None:
        return None, None, None
    return torch.ops.nano4d.trilinear_backward2(
        grad_out, volume, points,
        None if gg_volume is None else gg_volume.contiguous(),
        None if gg_points is None else gg_points.contiguous())


_trilinear_op.register_autograd(_backward_fwd, setup_context=_setup_fwd)
_trilinear_backward_op.register_autograd(_backward_bwd, setup_context=_setup_bwd)


# ============================================================================ public op

def trilinear(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (B, N, C) of ``volume`` (B, C, Z, Y, X) at ``points`` (B, N, 3) in [-1, 1].

    CUDA tensors run the Triton kernel (``torch.ops.nano4d.trilinear``, twice differentiable); CPU tensors
    run ``trilinear_ref`` unless ``NANO4D_FORCE_TRITON=1`` (then the kernel runs in the interpreter).
    Raises ``ValueError`` naming the argument on bad shapes / dtypes / devices.
    """
    if use_triton(volume, points):
        check_tensor("volume", volume)
        check_tensor("points", points)
        _check_inputs(volume, points)
        return torch.ops.nano4d.trilinear(volume, points)
    _check_inputs(volume, points)
    return trilinear_ref(volume, points)
