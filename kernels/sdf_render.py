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
back to front: dL/da_i = T_i (u_i - A_i) with u_i the section's upstream value and A_i the "rendering
from i+1 on" recursion A_{i-1} = a_i u_i + (1 - a_i) A_i, so it is exact at a = 1 (no division by
1 - a where that can be 0). Memory: the forward keeps its outputs plus two per-ray scalars (number of
sections marched, transmittance of the last one); no per-sample tensor is ever stored.

dtypes: volume fp32 / bf16 / fp16 / fp64, rays fp32 / fp64 (or low precision); arithmetic in fp32
(fp64 when any input is fp64); outputs in the promoted dtype of volume, origins, dirs and t_vals.
Volume gradients are accumulated with fp32 atomics (so volume grads are not bitwise deterministic).
Limits: C - 1 <= 256 feature channels; every tensor below 2^31 elements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, check_index_range, check_same_device, check_tensor, interpreting,
                             next_pow2, use_triton)

EPS_ALPHA = 1e-5      # NeuS' epsilon in the alpha formula
T_STOP = 1e-4         # early-stop transmittance threshold
COORD_LIM = 5.0       # sample coordinates are clamped to [-COORD_LIM, COORD_LIM] (always outside the box)
MAX_FEATURES = 256


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
    pts = torch.where(pts.abs() <= lim, pts, torch.where(pts > lim, lim, -lim))   # NaN -> -lim
    vals = F.grid_sample(volume.to(dt), pts.reshape(B, R, S, 1, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=True)                                      # (B, C, R, S, 1)
    vals = vals[..., 0].permute(0, 2, 3, 1)                                      # (B, R, S, C)
    sdf, feat = vals[..., 0], vals[..., 1:]
    phi = torch.sigmoid(sdf * inv_s.reshape(()).to(dt))
    alpha = ((phi[..., :-1] - phi[..., 1:] + EPS_ALPHA) / (phi[..., :-1] + EPS_ALPHA)).clamp(0.0, 1.0)
    trans = torch.cumprod(1.0 - alpha, dim=-1)
    trans = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)  # exclusive: T_i
    keep = (trans >= T_STOP).detach()
    w = torch.where(keep, trans * alpha, torch.zeros_like(alpha))                  # (B, R, S-1)
    features = (w[..., None] * (feat[:, :, :-1] + feat[:, :, 1:]) * 0.5).sum(2)
    depth = (w * (t[..., :-1] + t[..., 1:]) * 0.5).sum(-1)
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
    p = torch.where(p.abs() <= lim, p, torch.where(p > lim, lim, -lim))
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


# ============================================================================ public op

def _validate_public(volume, origins, dirs, t_vals, inv_s):
    if not isinstance(inv_s, torch.Tensor) and isinstance(inv_s, (int, float)):
        inv_s = torch.tensor(float(inv_s), dtype=torch.float32, device=volume.device)
    _check_inputs(volume, origins, dirs, t_vals, inv_s)
    if t_vals.numel():
        # one host sync: sortedness of t along S (NaN compares false and is allowed through)
        if bool((t_vals[..., 1:] < t_vals[..., :-1]).any()):
            raise ValueError("t_vals: must be sorted ascending along the sample dim (S)")
    return inv_s


def render_sdf(volume: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
               inv_s: torch.Tensor):
    """NeuS volume rendering of an SDF + feature voxel grid; see the module docstring.

    Returns ``features`` (B, R, C-1), ``depth`` (B, R), ``opacity`` (B, R).
    CUDA tensors run the fused Triton kernel; CPU tensors the reference (``NANO4D_FORCE_TRITON=1``: kernel
    through the interpreter). Raises ``ValueError`` naming the argument on bad shapes, dtypes, devices,
    S < 2 or unsorted ``t_vals``.
    """
    inv_s = _validate_public(volume, origins, dirs, t_vals, inv_s)
    return render_sdf_ref(volume, origins, dirs, t_vals, inv_s)
