"""3D Gaussian splatting: EWA projection, 16x16 tile binning, front-to-back rasterization (fwd + bwd).

Math (per scene b, view v, Gaussian n; reference: ``kernels/_splat_ref.py``):
  Σ = R(q) S² R(q)ᵀ with q = quats/|quats| (w,x,y,z), S = diag(scales);  p = W·mean + t  (viewmat = [W t]).
  Σ₂ = J W Σ Wᵀ Jᵀ + eps2d·I,  J = [[fx/z, 0, −fx·x/z²], [0, fy/z, −fy·y/z²]]  (EWA; K's skew is ignored)
  mean2d = (fx·x/z + cx, fy·y/z + cy),  depth = z,  conic = (a, b, c) = upper triangle of Σ₂⁻¹,
  radius = ceil(3·sqrt(λ_max(Σ₂))) (capped at 2²⁴).  radius = 0 (culled; means2d/conics/depths = 0) when
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
Dtypes: fp64 inputs compute in fp64 (for gradcheck); everything else is computed and returned in fp32.

Kernels (CUDA, or the interpreter with NANO4D_FORCE_TRITON=1): projection fwd/bwd (one program per
block of Gaussians of one view); binning in torch (intersection emission with repeat_interleave, one
stable torch.sort of 64-bit keys [scene·view·tile | depth rank], tile ranges by searchsorted);
rasterization fwd (one program per (tile, scene·view, channel block), chunks of G Gaussians: α for G×256
pixels, transmittance by a log-space cumsum, colours by tl.dot, early exit when every pixel is done) and
bwd (back to front from the saved final T and last-contributor count; per-Gaussian gradients reduced
over the tile, then fp32/fp64 atomics). Limits: intersections and B·V·tiles < 2³¹ (checked, ValueError).
CPU tensors use the reference (limits in its docstring).
"""
from __future__ import annotations

import torch

from kernels._common import FLOAT_DTYPES, check_finite, check_same_device, check_tensor, use_triton
from kernels._splat_ref import (project_gaussians_ref, rasterize_from_projection_ref,  # noqa: F401
                                rasterize_gaussians_ref)

TILE = 16


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
              opacities=None, colors=None, background=None):
    """Check shapes/dtypes/devices; return (B, V, N, C, compute dtype)."""
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
            check_finite("background", background)
            named["background"] = background
    check_same_device(**named)
    _check_scalars(width, height, near, far, eps2d)
    check_finite("viewmats", viewmats)
    check_finite("Ks", Ks)
    dt = torch.float64 if means.dtype == torch.float64 else torch.float32
    return B, V, N, C, dt


# ============================================================================ public API


def project_gaussians(means, quats, scales, viewmats, Ks, width: int, height: int, near: float = 0.01,
                      far: float = 1e10, eps2d: float = 0.3):
    """EWA-project B scenes of N Gaussians into V views each.

    Returns means2d (B,V,N,2), conics (B,V,N,3), depths (B,V,N) in the compute dtype and radii (B,V,N)
    int32 (0 = culled). Differentiable w.r.t. means, quats, scales.
    """
    B, V, N, _, dt = _validate(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d)
    args = [t.to(dt) for t in (means, quats, scales, viewmats, Ks)]
    return project_gaussians_ref(*args, width, height, near, far, eps2d)


def rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                        near: float = 0.01, far: float = 1e10, background=None, eps2d: float = 0.3):
    """Render B scenes of N Gaussians into V views each (layouts and math: module docstring).

    Returns colors (B,V,H,W,C), alphas (B,V,H,W,1), depths (B,V,H,W,1) (accumulated depth Σ wᵢzᵢ;
    expected depth = depths / alphas).
    """
    B, V, N, C, dt = _validate(means, quats, scales, viewmats, Ks, width, height, near, far, eps2d,
                               opacities, colors, background)
    if background is None:
        background = torch.zeros(B, V, C, dtype=dt, device=means.device)
    args = [t.to(dt) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    return rasterize_gaussians_ref(*args, width, height, near, far, background.to(dt), eps2d)


__all__ = ["project_gaussians", "rasterize_gaussians", "project_gaussians_ref", "rasterize_gaussians_ref"]
