"""Procedural multi-view objects (GeoLRM / MuM default data), rendered on the CPU, deterministic by seed.

An object (``SDFObject``) is a composition of 1-6 signed-distance primitives (sphere, box, rounded box,
capsule, cylinder, torus, cone, hexagonal prism) with random rotation/translation/size, combined in order
by union, smooth union or subtraction, then uniformly rescaled and centred so that its bounding box
(estimated on a 40^3 grid) spans about [-0.45, 0.45] on its longest axis, inside the object cube
[-0.5, 0.5]^3. Each primitive carries a procedural albedo (solid, checker, stripes, gradient, value noise,
dots) in its local frame, so texture sticks to the surface and is consistent across views. Shading is
Lambertian from one random world-fixed light plus ambient (baked, view independent). World frame: z up;
object cube [-0.5, 0.5]^3.

``render_object`` sphere-traces the SDF (vectorized torch) and returns RGB, alpha, camera z-depth and
world-space normals. ``orbit_cameras`` gives GeoLRM-style cameras: ``ring_views`` (4) at a fixed elevation
and orthogonal azimuths, the rest uniformly random on the sphere (elevation in [-30, 72] deg), all at
``distance`` looking at the origin, OpenCV c2w + pixel K. ``occupancy_grid`` samples the SDF at the cell
centres of an R^3 grid over [-0.5, 0.5]^3, tensor order (Z, Y, X): cell (k, j, i) has centre
(x, y, z) = (-0.5 + (i + .5)/R, -0.5 + (j + .5)/R, -0.5 + (k + .5)/R). ``ProceduralObjects`` is the
dataset (items generated on demand; optional disk cache in the GObjaverse layout).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nano4d.cameras import camera_rays, fov_to_K, look_at, ray_aabb
from nano4d.data.common import (SPLITS, check_background, composite, dataset_background, limit_threads, split_seed,
                                value_noise)
from nano4d.data.gobjaverse import read_gobjaverse_object, write_gobjaverse_object

PRIM_TYPES = ("sphere", "box", "round_box", "capsule", "cylinder", "torus", "cone", "hex_prism")
TEXTURES = ("solid", "checker", "stripes", "gradient", "noise", "dots")
OPS = ("union", "smooth_union", "subtract")
OBJECT_HALF_EXTENT = 0.45  # objects are normalized so that their bounding box fits in [-0.45, 0.45]^3


# ============================================================================ SDF objects


@dataclass
class SDFObject:
    """K primitives, applied in order (primitive 0 is always a plain union with the empty set).

    ``params`` (K, 4) per type: sphere (r), box (bx, by, bz half extents), round_box (bx, by, bz, rounding),
    capsule (half length along local z, r), cylinder (half height along local z, r), torus (R, r in local xy),
    cone (half height along local z, bottom radius, top radius), hex_prism (apothem in xy, half height in z).
    All are exact signed distances (1-Lipschitz), which sphere tracing relies on.
    ``rot`` (K, 3, 3) maps local to world (world = rot @ local + trans)."""
    prim_type: torch.Tensor   # (K,) int64 index into PRIM_TYPES
    params: torch.Tensor      # (K, 4)
    rot: torch.Tensor         # (K, 3, 3)
    trans: torch.Tensor       # (K, 3)
    op: torch.Tensor          # (K,) int64 index into OPS
    smooth: torch.Tensor      # (K,) smooth-union radius
    tex: torch.Tensor         # (K,) int64 index into TEXTURES
    colors: torch.Tensor      # (K, 2, 3) albedo colours in [0, 1]
    tex_freq: torch.Tensor    # (K,) texture frequency (cycles per unit length)
    tex_axis: torch.Tensor    # (K, 3) unit axis for stripes / gradient (local frame)
    tex_seed: torch.Tensor    # (K,) int64 value-noise hash seed
    light_dir: torch.Tensor   # (3,) unit vector towards the light (world)
    ambient: float

    @property
    def num_parts(self) -> int:
        return int(self.prim_type.numel())


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _random_colors(rng) -> np.ndarray:
    h = rng.uniform()
    c0 = _hsv_to_rgb(h, rng.uniform(0.35, 0.9), rng.uniform(0.55, 1.0))
    if rng.uniform() < 0.5:   # contrasting hue
        c1 = _hsv_to_rgb((h + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0))
    else:                     # same hue, different value
        c1 = _hsv_to_rgb(h, rng.uniform(0.2, 0.9), rng.uniform(0.15, 0.45))
    return np.stack([c0, c1])


def _bound_radius(kind: str, p) -> float:
    if kind == "sphere":
        return p[0]
    if kind in ("box", "round_box"):
        return float(np.linalg.norm(p[:3]))
    if kind in ("capsule", "cylinder"):
        return float(math.hypot(p[0], p[1])) + (p[1] if kind == "capsule" else 0.0)
    if kind == "cone":
        return float(math.hypot(p[0], max(p[1], p[2])))
    if kind == "hex_prism":
        return float(math.hypot(p[0] / math.cos(math.pi / 6), p[1]))
    return p[0] + p[1]  # torus


def _random_params(kind: str, rng) -> list:
    s = rng.uniform(0.12, 0.32)
    if kind == "sphere":
        return [s, 0, 0, 0]
    if kind == "box":
        return [s * rng.uniform(0.4, 1.3), s * rng.uniform(0.4, 1.3), s * rng.uniform(0.4, 1.3), 0]
    if kind == "round_box":
        b = [s * rng.uniform(0.5, 1.3) for _ in range(3)]
        return b + [min(b) * rng.uniform(0.15, 0.6)]
    if kind in ("capsule", "cylinder"):
        return [s * rng.uniform(0.6, 1.6), s * rng.uniform(0.3, 0.7), 0, 0]
    if kind == "cone":
        r1 = s * rng.uniform(0.5, 1.0)
        return [s * rng.uniform(0.6, 1.3), r1, r1 * rng.uniform(0.0, 0.6), 0]
    if kind == "hex_prism":
        return [s * rng.uniform(0.5, 1.0), s * rng.uniform(0.3, 1.2), 0, 0]
    R = s * rng.uniform(0.8, 1.3)
    return [R, R * rng.uniform(0.2, 0.45), 0, 0]  # torus


def random_object(seed, max_parts: int = 6) -> SDFObject:
    """A random SDF object, deterministic in ``seed`` (int or np.random.SeedSequence)."""
    rng = np.random.default_rng(seed)
    for _attempt in range(20):
        k = 1 if rng.uniform() < 0.1 else int(rng.integers(2, max_parts + 1))
        prims = []
        for i in range(k):
            kind = PRIM_TYPES[int(rng.integers(len(PRIM_TYPES)))]
            params = _random_params(kind, rng)
            if i == 0:
                op, t = 0, rng.normal(scale=0.03, size=3)
            else:
                op = int(rng.choice(3, p=[0.45, 0.35, 0.2]))
                # attach near an existing part so the object stays in one piece
                anchor = prims[int(rng.integers(i))]
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                reach = anchor["radius"] * rng.uniform(0.6, 1.2) if op != 2 else anchor["radius"] * rng.uniform(0.5, 1.1)
                t = anchor["t"] + direction * reach
                if op == 2:   # subtractors smaller than what they cut
                    params = [v * 0.7 for v in params]
            tex = int(rng.integers(len(TEXTURES)))
            prims.append(dict(kind=PRIM_TYPES.index(kind), params=params, R=_random_rotation(rng), t=np.asarray(t),
                              op=op, smooth=rng.uniform(0.04, 0.12) if op == 1 else 0.0, tex=tex,
                              colors=_random_colors(rng), freq=rng.uniform(3.0, 9.0),
                              axis=rng.normal(size=3), seed=int(rng.integers(1, 2 ** 20)),
                              radius=_bound_radius(kind, params)))
        light = rng.normal(size=3)
        light[2] = abs(light[2]) + 0.5
        obj = SDFObject(
            prim_type=torch.tensor([p["kind"] for p in prims]),
            params=torch.tensor(np.array([p["params"] for p in prims]), dtype=torch.float32),
            rot=torch.tensor(np.stack([p["R"] for p in prims]), dtype=torch.float32),
            trans=torch.tensor(np.stack([p["t"] for p in prims]), dtype=torch.float32),
            op=torch.tensor([p["op"] for p in prims]),
            smooth=torch.tensor([p["smooth"] for p in prims], dtype=torch.float32),
            tex=torch.tensor([p["tex"] for p in prims]),
            colors=torch.tensor(np.stack([p["colors"] for p in prims]), dtype=torch.float32),
            tex_freq=torch.tensor([p["freq"] for p in prims], dtype=torch.float32),
            tex_axis=F.normalize(torch.tensor(np.stack([p["axis"] for p in prims]), dtype=torch.float32), dim=-1),
            tex_seed=torch.tensor([p["seed"] for p in prims]),
            light_dir=F.normalize(torch.tensor(light, dtype=torch.float32), dim=0),
            ambient=float(rng.uniform(0.3, 0.5)),
        )
        # normalize: bounding box of the solid -> centred, largest half extent OBJECT_HALF_EXTENT
        reach = float(max(np.linalg.norm(p["t"]) + p["radius"] for p in prims)) + 0.05
        n = 40
        ax = torch.linspace(-reach, reach, n)
        grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        cell = 2 * reach / (n - 1)
        inside = object_sdf(obj, grid) <= 0.5 * cell
        if int(inside.sum()) < 8:
            continue  # subtraction ate the object: draw again
        pts = grid[inside]
        lo, hi = pts.min(0).values - 0.5 * cell, pts.max(0).values + 0.5 * cell
        centre = 0.5 * (lo + hi)
        s = OBJECT_HALF_EXTENT / float((0.5 * (hi - lo)).max())
        obj.params *= s
        obj.trans = (obj.trans - centre) * s
        obj.smooth *= s
        obj.tex_freq /= s
        return obj
    raise RuntimeError(f"random_object: could not build a non-empty object for seed {seed}")


def _prim_sdf(kind: int, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Signed distance of one primitive at local points q (N, 3)."""
    name = PRIM_TYPES[kind]
    if name == "sphere":
        return q.norm(dim=-1) - p[0]
    if name in ("box", "round_box"):
        r = p[3] if name == "round_box" else 0.0
        d = q.abs() - (p[:3] - r)
        return d.clamp_min(0).norm(dim=-1) + d.max(-1).values.clamp_max(0) - r
    if name == "capsule":
        z = q[:, 2].clamp(-p[0], p[0])
        return torch.stack([q[:, 0], q[:, 1], q[:, 2] - z], -1).norm(dim=-1) - p[1]
    if name == "cylinder":
        d = torch.stack([q[:, :2].norm(dim=-1) - p[1], q[:, 2].abs() - p[0]], -1)
        return d.clamp_min(0).norm(dim=-1) + d.max(-1).values.clamp_max(0)
    if name == "cone":   # capped cone along z: half height h, radius r1 at z = -h, r2 at z = +h
        h, r1, r2 = p[0], p[1], p[2]
        qx, qy = q[:, :2].norm(dim=-1), q[:, 2]
        ca = torch.stack([qx - torch.minimum(qx, torch.where(qy < 0, r1, r2)), qy.abs() - h], -1)
        k1 = torch.stack([r2, h])
        k2 = torch.stack([r2 - r1, 2 * h])
        qq = torch.stack([qx, qy], -1)
        f = (((k1 - qq) * k2).sum(-1) / (k2 * k2).sum()).clamp(0, 1)
        cb = qq - k1 + k2 * f[:, None]
        sign = torch.where((cb[:, 0] < 0) & (ca[:, 1] < 0), -1.0, 1.0)
        return sign * torch.minimum((ca * ca).sum(-1), (cb * cb).sum(-1)).sqrt()
    if name == "hex_prism":   # hexagon in xy with apothem a, half height h along z
        a, h = p[0], p[1]
        kx, ky, kz = -0.8660254037844386, 0.5, 0.5773502691896258
        x, y, z = q.abs().unbind(-1)
        m = 2 * (kx * x + ky * y).clamp_max(0)
        x, y = x - m * kx, y - m * ky
        lx = x - x.clamp(-kz * a, kz * a)
        dx = torch.stack([lx, y - a], -1).norm(dim=-1) * torch.sign(y - a)
        d = torch.stack([dx, z - h], -1)
        return d.max(-1).values.clamp_max(0) + d.clamp_min(0).norm(dim=-1)
    # torus
    return torch.stack([q[:, :2].norm(dim=-1) - p[0], q[:, 2]], -1).norm(dim=-1) - p[1]


def _object_sdf_parts(obj: SDFObject, points: torch.Tensor):
    """SDF (N,) and the index of the primitive that defines the surface nearest each point (N,)."""
    pts = points.reshape(-1, 3).float()
    d = torch.full((pts.shape[0],), float("inf"))
    part = torch.zeros(pts.shape[0], dtype=torch.int64)
    kinds, ops = obj.prim_type.tolist(), obj.op.tolist()
    for k in range(obj.num_parts):
        q = (pts - obj.trans[k]) @ obj.rot[k]
        dk = _prim_sdf(kinds[k], q, obj.params[k])
        if ops[k] == 0 or k == 0:
            part = torch.where(dk < d, k, part)
            d = torch.minimum(d, dk)
        elif ops[k] == 1:
            kk = obj.smooth[k]
            h = (0.5 + 0.5 * (dk - d) / kk).clamp(0, 1)
            part = torch.where(dk < d, k, part)
            d = torch.lerp(dk, d, h) - kk * h * (1 - h)
        else:
            part = torch.where(-dk > d, k, part)
            d = torch.maximum(d, -dk)
    return d, part


def object_sdf(obj: SDFObject, points: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) at world points (..., 3) -> (...)."""
    return _object_sdf_parts(obj, points)[0].reshape(points.shape[:-1])


def object_albedo(obj: SDFObject, points: torch.Tensor, part: torch.Tensor | None = None) -> torch.Tensor:
    """Albedo (N, 3) at world points (N, 3) on (or near) the surface."""
    if part is None:
        part = _object_sdf_parts(obj, points)[1]
    out = torch.zeros(points.shape[0], 3)
    for k in range(obj.num_parts):
        sel = (part == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        q = (points[sel] - obj.trans[k]) @ obj.rot[k]
        fq, name = q * obj.tex_freq[k], TEXTURES[int(obj.tex[k])]
        if name == "solid":
            w = torch.zeros(sel.numel())
        elif name == "checker":
            w = (torch.floor(fq).long().sum(-1) % 2).float()
        elif name == "stripes":
            w = (0.5 + 2.0 * torch.sin(2 * math.pi * (fq @ obj.tex_axis[k]))).clamp(0, 1)
        elif name == "gradient":
            w = (0.5 + 2.0 * (q @ obj.tex_axis[k])).clamp(0, 1)
        elif name == "noise":
            w = ((value_noise(fq * 0.6, int(obj.tex_seed[k])) - 0.5) * 2.5 + 0.5).clamp(0, 1)
        else:  # dots
            w = ((0.3 - (fq - torch.round(fq)).norm(dim=-1)) * 12).clamp(0, 1)
        out[sel] = torch.lerp(obj.colors[k, 0], obj.colors[k, 1], w[:, None])
    return out


def sdf_normals(obj: SDFObject, points: torch.Tensor, h: float = 5e-4) -> torch.Tensor:
    """Unit outward normals (N, 3) by the tetrahedral finite-difference gradient of the SDF."""
    e = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=torch.float32)
    vals = object_sdf(obj, (points[None] + h * e[:, None]).reshape(-1, 3)).reshape(4, -1)
    return F.normalize((vals[..., None] * e[:, None]).sum(0), dim=-1)


def sphere_trace(obj: SDFObject, o: torch.Tensor, d: torch.Tensor, max_steps: int = 128, eps: float = 4e-4,
                 box: float = 0.5):
    """Sphere-trace rays o, d (N, 3) against the object inside the cube [-box, box]^3.
    Returns hit (N,) bool and t (N,) (ray parameter of the hit, inf on misses)."""
    n = o.shape[0]
    t_near, t_far, _ = ray_aabb(o, d, -box, box)
    t = torch.full((n,), float("inf"))
    hit = torch.zeros(n, dtype=torch.bool)
    idx = ((t_far > t_near) & (t_far > 0)).nonzero().squeeze(1)
    ta, tf = t_near[idx].clamp_min(0), t_far[idx]
    oa, da = o[idx], d[idx]
    for _ in range(max_steps):
        if idx.numel() == 0:
            break
        dist = object_sdf(obj, oa + ta[:, None] * da)
        done = dist < eps
        hit[idx[done]] = True
        t[idx[done]] = ta[done]
        ta = ta + dist.clamp_min(0) * 0.98 + 1e-5
        keep = ~done & (ta < tf)
        idx, ta, tf, oa, da = idx[keep], ta[keep], tf[keep], oa[keep], da[keep]
    return hit, t


def render_object(obj: SDFObject, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
                  background="white", supersample: int = 1, max_steps: int = 128) -> dict:
    """Render views of ``obj``: c2w (V, 4, 4) OpenCV, K (V, 3, 3) pixels (a single (4, 4)/(3, 3) also works).

    Returns a dict of (V, C, H, W) tensors: ``rgb`` (straight colour composited over ``background``; pass
    ``background=None`` to get the un-composited colour, 0 where alpha is 0), ``alpha`` (1 on the surface),
    ``depth`` (camera z-depth, 0 on background), ``normal`` (world-space unit normals, 0 on background).
    ``supersample`` s renders s*s rays per pixel (anti-aliased alpha/colour; depth and normal averaged over
    the hit sub-samples)."""
    single = c2w.dim() == 2
    c2w, K = c2w.reshape(-1, 4, 4).float(), K.reshape(-1, 3, 3).float()
    s = int(supersample)
    Ks = K.clone()
    Ks[:, :2] *= s
    H, W = height * s, width * s
    o, d = camera_rays(c2w, Ks, H, W)                               # (V, H, W, 3)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    hit, t = sphere_trace(obj, o, d, max_steps=max_steps)
    n_rays = o.shape[0]
    rgb, nrm, depth = torch.zeros(n_rays, 3), torch.zeros(n_rays, 3), torch.zeros(n_rays)
    hi = hit.nonzero().squeeze(1)
    if hi.numel():
        p = o[hi] + t[hi, None] * d[hi]
        n = sdf_normals(obj, p)
        part = _object_sdf_parts(obj, p)[1]
        albedo = object_albedo(obj, p, part)
        lam = (n @ obj.light_dir).clamp_min(0)
        fill = 0.25 * (-(n @ obj.light_dir)).clamp_min(0)             # weak bounce light from the other side
        rgb[hi] = (albedo * (obj.ambient + (1 - obj.ambient) * lam + fill * (1 - obj.ambient))[:, None]).clamp(0, 1)
        nrm[hi] = n
        fwd = c2w[:, :3, 2].repeat_interleave(H * W, 0)[hi]
        depth[hi] = t[hi] * (d[hi] * fwd).sum(-1)
    V = c2w.shape[0]
    a = hit.float().reshape(V, 1, H, W)
    rgb = rgb.reshape(V, H, W, 3).permute(0, 3, 1, 2)
    nrm = nrm.reshape(V, H, W, 3).permute(0, 3, 1, 2)
    depth = depth.reshape(V, 1, H, W)
    if s > 1:
        pool = lambda x: F.avg_pool2d(x, s)  # noqa: E731
        a_p = pool(a)
        safe = a_p.clamp_min(1e-8)
        rgb, depth = pool(rgb * a) / safe, pool(depth * a) / safe
        nrm = F.normalize(pool(nrm * a), dim=1)
        a = a_p
    out = dict(rgb=rgb if background is None else composite(rgb, a, background), alpha=a, depth=depth, normal=nrm)
    return {k: v[0] for k, v in out.items()} if single else out


def orbit_cameras(num_views: int, res=64, fov_deg: float = 40.0, distance: float = 2.0,
                  elevation_deg: float = 20.0, azimuth_deg: float | None = None, ring_views: int = 4,
                  seed=0):
    """GeoLRM-like cameras looking at the origin (world z up) -> (c2w (V, 4, 4) OpenCV, K (V, 3, 3) pixels).

    The first ``min(ring_views, num_views)`` views sit on a ring at ``elevation_deg`` with azimuths
    ``azimuth_deg + j * 360 / ring_views`` (``azimuth_deg`` random when None); the rest are uniform on the
    sphere with elevation in [-30, 72] degrees. ``res``: int or (H, W); fov is vertical."""
    rng = np.random.default_rng(seed)
    H, W = (res, res) if isinstance(res, int) else res
    az0 = rng.uniform(0, 360) if azimuth_deg is None else azimuth_deg
    el, az = [], []
    for j in range(num_views):
        if j < ring_views:
            el.append(elevation_deg)
            az.append(az0 + j * 360.0 / ring_views)
        else:
            el.append(math.degrees(math.asin(rng.uniform(-0.5, 0.95))))
            az.append(rng.uniform(0, 360))
    el, az = torch.tensor(el, dtype=torch.float64).deg2rad(), torch.tensor(az, dtype=torch.float64).deg2rad()
    eye = distance * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    c2w = look_at(eye, torch.zeros(3, dtype=torch.float64)).float()
    K = fov_to_K(math.radians(fov_deg), W, H).expand(num_views, 3, 3).clone()
    return c2w, K


def grid_centers(res: int, lo: float = -0.5, hi: float = 0.5, align_corners: bool = False) -> torch.Tensor:
    """(R, R, R, 3) xyz positions of a (Z, Y, X) grid over [lo, hi]^3: cell centres, or with
    ``align_corners`` the R points linspace(lo, hi, R) per axis (GeoLRM's anchor layout)."""
    ax = torch.linspace(lo, hi, res) if align_corners else lo + (torch.arange(res) + 0.5) * (hi - lo) / res
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    return torch.stack([x, y, z], -1)


def occupancy_grid(obj: SDFObject, res: int = 32, mode: str = "solid", align_corners: bool = False) -> torch.Tensor:
    """Occupancy (R, R, R) float 0/1 in (Z, Y, X) order over [-0.5, 0.5]^3 (see ``grid_centers``).
    ``mode="solid"``: 1 where the SDF at the cell centre is <= 0 (inside). ``mode="surface"``: 1 where the
    surface may cross the cell (|SDF| <= half the cell diagonal), like GeoLRM's depth-derived targets."""
    pts = grid_centers(res, align_corners=align_corners)
    d = object_sdf(obj, pts.reshape(-1, 3)).reshape(res, res, res)
    if mode == "solid":
        return (d <= 0).float()
    if mode == "surface":
        return (d.abs() <= 0.5 * math.sqrt(3) / res).float()
    raise ValueError(f"occupancy mode must be 'solid' or 'surface', got {mode!r}")


def sample_surface(obj: SDFObject, n: int, seed=0, tol: float = 1e-3) -> torch.Tensor:
    """``n`` points (n, 3) on the surface (|SDF| < tol), roughly uniform in area: uniform samples in a thin
    band around the surface, projected onto it by Newton steps along the SDF gradient."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    got, band = [], 0.03
    total = 0
    for _ in range(50):
        x = torch.rand(max(4 * n, 4096), 3, generator=g) - 0.5
        x = x[object_sdf(obj, x).abs() < band]
        for _ in range(4):
            x = x - object_sdf(obj, x)[:, None] * sdf_normals(obj, x)
        x = x[object_sdf(obj, x).abs() < tol]
        got.append(x)
        total += x.shape[0]
        if total >= n:
            break
    pts = torch.cat(got)
    if pts.shape[0] < n:
        raise RuntimeError(f"sample_surface: only {pts.shape[0]} of {n} surface points found")
    return pts[torch.randperm(pts.shape[0], generator=g)[:n]]


class ProceduralObjects(Dataset):
    """Procedural multi-view objects rendered on the fly (GeoLRM / MuM default data).

    Item ``i`` of a split is deterministic in (seed, split, i); "train", "val" and "test" draw from disjoint
    seed streams. ``__getitem__`` returns a dict of tensors:
      images (V, 3, H, W) in [0, 1] composited on the background; alphas (V, 1, H, W);
      depths (V, 1, H, W) camera z-depth (0 on background); normals (V, 3, H, W) world frame (0 on background);
      c2w (V, 4, 4) OpenCV; K (V, 3, 3) pixels; occupancy (R, R, R) 0/1 in (Z, Y, X) order at cell centres
      of [-0.5, 0.5]^3 (``occupancy_grid``); surface_points (P, 3); background (3,) the colour used;
      seed () int64 the object seed (``random_object(seed)`` rebuilds the object).
    Views 0..3 are the GeoLRM ring (``elevation_deg``, azimuths 90 deg apart from a random start), the
    rest random on the sphere. ``background``: "white", "random" (one uniform colour per sample) or (r, g, b).
    With ``supersample=1`` alpha is binary, so another background is ``composite(images, alphas, bg)``.
    ``cache_dir``: renders are stored there in the GObjaverse layout (``write_gobjaverse_object``, with
    occupancy and surface points) and always served from there (colour quantized to 8 bits, also on the first
    access, so a resumed run sees the same pixels); occupancy/surface are re-derived when the requested
    resolution differs. ``threads``: torch intra-op threads while rendering (``limit_threads``).
    """

    def __init__(self, num_objects: int = 1000, num_views: int = 8, res=64, seed: int = 0, split: str = "train",
                 occ_res: int = 32, num_surface_points: int = 2048, background="white", fov_deg: float = 40.0,
                 distance: float = 2.0, elevation_deg: float = 20.0, ring_views: int = 4, occ_mode: str = "solid",
                 supersample: int = 1, cache_dir: str | None = None, threads: int | None = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if num_views < 1 or num_objects < 1:
            raise ValueError("num_views and num_objects must be >= 1")
        check_background(background)
        self.num_objects, self.num_views, self.seed, self.split = num_objects, num_views, seed, split
        self.res = (res, res) if isinstance(res, int) else tuple(res)
        self.occ_res, self.num_surface_points, self.background = occ_res, num_surface_points, background
        self.fov_deg, self.distance, self.elevation_deg, self.ring_views = fov_deg, distance, elevation_deg, ring_views
        self.occ_mode, self.supersample, self.cache_dir, self.threads = occ_mode, supersample, cache_dir, threads

    def __len__(self) -> int:
        return self.num_objects

    def object_seed(self, i: int) -> int:
        return split_seed(self.seed, self.split, i)

    def get_object(self, i: int) -> SDFObject:
        return random_object(self.object_seed(i))

    def _render(self, i: int) -> dict:
        s = self.object_seed(i)
        obj = random_object(s)
        c2w, K = orbit_cameras(self.num_views, self.res, self.fov_deg, self.distance, self.elevation_deg,
                               ring_views=self.ring_views, seed=s + 1)
        out = render_object(obj, c2w, K, self.res[0], self.res[1], background=None, supersample=self.supersample)
        return dict(rgb=out["rgb"], alphas=out["alpha"], depths=out["depth"], normals=out["normal"], c2w=c2w, K=K,
                    occupancy=occupancy_grid(obj, self.occ_res, self.occ_mode) if self.occ_res else None,
                    surface_points=sample_surface(obj, self.num_surface_points, s + 2) if self.num_surface_points else None)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_objects:
            raise IndexError(f"index {i} out of range for {self.num_objects} objects")
        s = self.object_seed(i)
        with limit_threads(self.threads):
            d = self._cached(i) if self.cache_dir else self._render(i)
        bg = dataset_background(self.background, s + 3)
        item = dict(images=composite(d["rgb"], d["alphas"], bg), alphas=d["alphas"], depths=d["depths"],
                    normals=d["normals"], c2w=d["c2w"], K=d["K"], background=bg, seed=torch.tensor(s))
        if self.occ_res:
            item["occupancy"] = d["occupancy"]
        if self.num_surface_points:
            item["surface_points"] = d["surface_points"]
        return item

    def _cached(self, i: int) -> dict:
        H, W = self.res
        tag = (f"{self.split}-s{self.seed}-v{self.num_views}-{H}x{W}-f{self.fov_deg:g}-d{self.distance:g}"
               f"-e{self.elevation_deg:g}-r{self.ring_views}-ss{self.supersample}")
        obj_id = f"{i:07d}"
        obj_dir = os.path.join(self.cache_dir, tag, obj_id)
        if not os.path.isfile(os.path.join(obj_dir, "done")):
            d = self._render(i)
            rgba = torch.cat([d["rgb"], d["alphas"]], 1).permute(0, 2, 3, 1)
            write_gobjaverse_object(os.path.join(self.cache_dir, tag), obj_id, rgba, d["c2w"], d["K"],
                                    depth=d["depths"][:, 0], normal=d["normals"].permute(0, 2, 3, 1),
                                    occupancy=d["occupancy"], surface_points=d["surface_points"])
        r = read_gobjaverse_object(obj_dir)           # also right after writing: the first access equals later ones
        d = dict(rgb=r["images"], alphas=r["alphas"], depths=r["depths"], normals=r["normals"], c2w=r["c2w"], K=r["K"],
                 occupancy=r.get("occupancy"), surface_points=r.get("surface_points"))
        s = self.object_seed(i)
        if self.occ_res and (d["occupancy"] is None or d["occupancy"].shape[0] != self.occ_res):
            d["occupancy"] = occupancy_grid(random_object(s), self.occ_res, self.occ_mode)
        if self.num_surface_points and (d["surface_points"] is None or d["surface_points"].shape[0] != self.num_surface_points):
            d["surface_points"] = sample_surface(random_object(s), self.num_surface_points, s + 2)
        return d
