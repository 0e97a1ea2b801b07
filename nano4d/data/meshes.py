"""Textured mesh collections -> multi-view renders in the GObjaverse layout (GeoLRM / MuM training data).

    python -m nano4d.data.meshes render-meshes --src DIR --out DIR [--views 40] [--res 256] [--split 0.1]
    python -m nano4d.data.meshes prepare-sweethome3d --out DIR        # Debian's 820 CC0/CC-BY furniture models

Loading: every ``*.obj`` under ``--src`` with its ``mtllib`` materials (``Kd`` colour, ``map_Kd`` texture,
``d``/``Tr`` opacity); polygons are fan-triangulated, negative indices resolved. Each object is then moved
into the nano4d world frame (z up; OBJ files are y up by convention, ``--up y``) and normalized: the
bounding box is centred at the origin and uniformly scaled so that its longest side is 1, i.e. the object
fits in [-0.5, 0.5]^3 (the GObjaverse object cube).

Cameras (OpenCV c2w, pixel K, all looking at the origin, world z up; see ``gobjaverse_cameras``):
views 0..min(N,24)-1 on an orbit at ``elevation`` (20 deg) with equal azimuth steps (15 deg for 24 views,
GeoLRM picks 0/6/12/18 from it), then one top and one bottom view, then random views (elevation in
[-30, 72] deg, deterministic per object id and seed). Vertical field of view 39.6 deg, distance 2.0.

Rendering: pybullet's TinyRenderer (CPU, headless; ``pip install nano4d[render]``). Exactness: it samples
pixel (row i, col j) at (u, v) = (j, i + 1) of the projection; we pass a principal point shifted by
(-0.5, +0.5) px so that samples fall on nano4d's pixel centres (j + .5, i + .5) (tested against projected
geometry). Depth is converted from the OpenGL depth buffer to camera z-depth (OpenCV z; 0 = background).
TinyRenderer culls back faces and takes one texture per shape, so every face is added with both windings
(flipped normals on the back copy) and every (material, chunk of <= 20k faces) becomes its own shape.
Anti-aliasing: ``ssaa`` (odd) x ``ssaa`` samples per pixel; colour and alpha are averaged (straight, i.e.
un-premultiplied colour), while depth is taken from the sample at the pixel centre (exact, no edge mixing).
Shading: ambient 0.6 + diffuse 0.4 from a light at the camera (no shadows, no specular), so colours stay
close to the albedo. Not supported: transparency (materials with d < 1 render opaque; d < 0.05 skipped),
normal/bump maps, per-vertex colours.

Output per object (``nano4d.data.gobjaverse.write_gobjaverse_object``): ``<out>/<obj_id>/<view:05d>/<view:05d>.png``
(RGBA), ``<view>.json`` (GObjaverse camera + exact K), ``<view>_depth.npy``, plus ``surface_points.npy``
(area-uniform samples of the normalized mesh: the ground truth for Chamfer / F-score) and
``occupancy.npy`` (32^3, (Z, Y, X), cells over [-0.5, 0.5]^3 crossed by the surface samples), and
``render.json`` (source path, normalization, settings). ``<out>/split.json`` = {"train": [...], "val":
[...]} (val = a deterministic ``--split`` fraction by hash of the object id) and the same lists as
``<out>/train.json`` / ``<out>/val.json`` (``GObjaverseDataset(out, object_ids=out + "/train.json")``), ``<out>/failures.json``
(objects that failed, with the reason), ``<out>/preview.png``. Re-running skips finished objects.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nano4d.cameras import fov_to_K, look_at
from nano4d.data.gobjaverse import occupancy_from_points, read_gobjaverse_object, write_gobjaverse_object
from nano4d.files import atomic_write, save_image_grid

__all__ = ["Material", "Mesh", "MeshError", "load_obj", "parse_mtl", "normalize_mesh", "y_up_to_z_up",
           "sample_surface", "gobjaverse_cameras", "PyBulletRenderer", "find_meshes",
           "object_id_for", "render_collection", "prepare_sweethome3d", "main"]

RENDER_EXTRA_MSG = ("the mesh renderer needs pybullet (CPU TinyRenderer): pip install 'nano4d[render]' "
                    "(or pip install pybullet==3.2.7)")


class MeshError(ValueError):
    """A mesh or material file that cannot be used; the message names the file and the problem."""


# ============================================================================ OBJ / MTL loading


@dataclass
class Material:
    name: str
    kd: tuple = (0.8, 0.8, 0.8)
    texture: str | None = None          # resolved path of map_Kd, None when absent or not found
    opacity: float = 1.0
    warnings: list = field(default_factory=list)


@dataclass
class Mesh:
    """Triangle mesh: vertices (V, 3) float64, faces (F, 3) int64, per-corner uvs (F, 3, 2) float64 (NaN where
    the face has no texture coordinates), face_material (F,) int64 into ``materials``, per-corner normals
    (F, 3, 3) float64 from the OBJ's ``vn`` (NaN where absent: such faces are shaded flat)."""
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    face_material: np.ndarray
    materials: list
    path: str = ""
    warnings: list = field(default_factory=list)
    normals: np.ndarray | None = None

    def replace(self, **kw) -> "Mesh":
        d = dict(vertices=self.vertices, faces=self.faces, uvs=self.uvs, face_material=self.face_material,
                 materials=self.materials, path=self.path, warnings=self.warnings, normals=self.normals)
        d.update(kw)
        return Mesh(**d)

    def bounds(self):
        used = self.vertices[np.unique(self.faces)] if len(self.faces) else self.vertices
        return used.min(0), used.max(0)


_MAP_OPTION_ARGS = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                    "-mm": 2, "-o": 3, "-s": 3, "-t": 3, "-texres": 1, "-type": 1}


def _map_filename(tokens: list) -> str:
    """File name of a ``map_*`` statement after its options (``-s 1 1 1``, ``-o u v w``, ...)."""
    i = 0
    while i < len(tokens) and tokens[i].startswith("-") and tokens[i] in _MAP_OPTION_ARGS:
        n = _MAP_OPTION_ARGS[tokens[i]]
        i += 1
        # -o/-s/-t take 1 to 3 numbers
        taken = 0
        while taken < n and i < len(tokens) and re.fullmatch(r"[-+]?[0-9.eE+-]+|on|off", tokens[i]):
            i += 1
            taken += 1
    return " ".join(tokens[i:])


def _resolve(base_dir: Path, name: str) -> Path | None:
    """Find a file referenced by an OBJ/MTL: as written, by basename, and case-insensitively."""
    name = name.strip().strip('"').replace("\\", "/")
    if not name:
        return None
    for cand in (base_dir / name, base_dir / Path(name).name):
        if cand.is_file():
            return cand
    want = Path(name).name.lower()
    for d in {base_dir, (base_dir / name).parent}:
        if d.is_dir():
            for p in d.iterdir():
                if p.name.lower() == want and p.is_file():
                    return p
    return None


def parse_mtl(path: str | Path) -> dict:
    """{name: Material} from an MTL file. Missing textures are recorded in ``Material.warnings``."""
    path = Path(path)
    mats, cur = {}, None
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise MeshError(f"{path}: cannot read material file ({e})") from None
    for ln, raw in enumerate(text.splitlines(), 1):
        tok = raw.split("#", 1)[0].split()
        if not tok:
            continue
        key = tok[0]
        if key == "newmtl":
            cur = Material(" ".join(tok[1:]))
            mats[cur.name] = cur
        elif cur is None:
            continue
        elif key == "Kd" and len(tok) >= 4:
            try:
                cur.kd = tuple(float(x) for x in tok[1:4])
            except ValueError:
                raise MeshError(f"{path}:{ln}: bad Kd line {raw.strip()!r}") from None
        elif key == "map_Kd":
            name = _map_filename(tok[1:])
            found = _resolve(path.parent, name)
            if found is None:
                cur.warnings.append(f"texture {name!r} of material {cur.name!r} not found next to {path.name}")
            else:
                cur.texture = str(found)
        elif key in ("d", "Tr") and len(tok) >= 2:
            try:
                v = float(tok[-1])
            except ValueError:
                continue
            cur.opacity = v if key == "d" else 1.0 - v
    return mats


def load_obj(path: str | Path) -> Mesh:
    """Parse a Wavefront OBJ (+ its MTL files and textures) into a triangle :class:`Mesh`.
    Raises :class:`MeshError` naming the file when it cannot be read or has no faces."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise MeshError(f"{path}: cannot read ({e})") from None
    verts, tcs, nrms, faces, fuv, fnrm, fmat = [], [], [], [], [], [], []
    materials, mat_index, cur = [], {}, 0
    library, warnings = {}, []
    default = Material("__default__")
    materials.append(default)
    lines = text.replace("\\\n", " ").splitlines()
    for ln, raw in enumerate(lines, 1):
        if not raw or raw[0] == "#":
            continue
        tok = raw.split()
        if not tok:
            continue
        key = tok[0]
        try:
            if key == "v":
                verts.append((float(tok[1]), float(tok[2]), float(tok[3])))
            elif key == "vt":
                tcs.append((float(tok[1]), float(tok[2]) if len(tok) > 2 else 0.0))
            elif key == "vn":
                nrms.append((float(tok[1]), float(tok[2]), float(tok[3])))
            elif key == "f":
                corners = []
                for c in tok[1:]:
                    parts = c.split("/")
                    vi = int(parts[0])
                    vi = vi - 1 if vi > 0 else len(verts) + vi
                    ti = ni = -1
                    if len(parts) > 1 and parts[1]:
                        ti = int(parts[1])
                        ti = ti - 1 if ti > 0 else len(tcs) + ti
                    if len(parts) > 2 and parts[2]:
                        ni = int(parts[2])
                        ni = ni - 1 if ni > 0 else len(nrms) + ni
                    corners.append((vi, ti, ni))
                for k in range(1, len(corners) - 1):
                    tri = (corners[0], corners[k], corners[k + 1])
                    faces.append(tuple(c[0] for c in tri))
                    fuv.append(tuple(c[1] for c in tri))
                    fnrm.append(tuple(c[2] for c in tri))
                    fmat.append(cur)
            elif key == "mtllib":
                rest = raw.split(None, 1)[1].strip() if len(tok) > 1 else ""
                names = [rest] if _resolve(path.parent, rest) else tok[1:]
                for name in names:
                    mp = _resolve(path.parent, name)
                    if mp is None:
                        warnings.append(f"material library {name!r} not found next to {path.name}")
                        continue
                    library.update(parse_mtl(mp))
            elif key == "usemtl":
                name = raw.split(None, 1)[1].strip() if len(tok) > 1 else ""
                if name not in mat_index:
                    if name in library:
                        m = library[name]
                    else:
                        m = Material(name)
                        warnings.append(f"material {name!r} not defined in the material libraries")
                    mat_index[name] = len(materials)
                    materials.append(m)
                cur = mat_index[name]
        except (ValueError, IndexError):
            raise MeshError(f"{path}:{ln}: malformed line {raw.strip()[:80]!r}") from None
    if not faces:
        raise MeshError(f"{path}: no faces")
    V = np.asarray(verts, dtype=np.float64).reshape(-1, 3)
    Fi = np.asarray(faces, dtype=np.int64)
    if Fi.min() < 0 or Fi.max() >= len(V):
        raise MeshError(f"{path}: face vertex index out of range (have {len(V)} vertices)")
    T = np.asarray(tcs, dtype=np.float64).reshape(-1, 2)
    Ti = np.asarray(fuv, dtype=np.int64)
    if (Ti >= len(T)).any() or (Ti < -1).any():
        raise MeshError(f"{path}: texture coordinate index out of range (have {len(T)})")
    Nt = np.asarray(nrms, dtype=np.float64).reshape(-1, 3)
    Ni = np.asarray(fnrm, dtype=np.int64)
    bad_n = (Ni >= len(Nt)) | (Ni < -1)
    if bad_n.any():                        # normals are optional: shade those faces flat instead of failing
        warnings.append(f"{bad_n.any(1).sum()} face(s) with normal indices out of range (have {len(Nt)}): shaded flat")
        Ni = np.where(bad_n.any(1, keepdims=True), -1, Ni)
    normals = np.full(Ni.shape + (3,), np.nan)
    okn = (Ni >= 0).all(1)                                                     # all three corners or flat
    if okn.any():
        nn = Nt[Ni[okn]]
        ln = np.linalg.norm(nn, axis=-1, keepdims=True)
        good = (ln[..., 0] > 0).all(1) & np.isfinite(nn).all((1, 2))
        nn = np.where(good[:, None, None], nn / np.where(ln > 0, ln, 1), np.nan)
        normals[okn] = nn
    uvs = np.full(Ti.shape + (2,), np.nan)
    ok = Ti >= 0
    if len(T):
        uvs[ok] = T[Ti[ok]]
    if not np.isfinite(V[np.unique(Fi)]).all():
        raise MeshError(f"{path}: non-finite vertex coordinates")
    for m in materials:
        warnings.extend(m.warnings)
    return Mesh(V, Fi, uvs, np.asarray(fmat, dtype=np.int64), materials, str(path), warnings, normals)


def y_up_to_z_up(mesh: Mesh) -> Mesh:
    """Rotate +90 deg about x: OBJ's y-up convention -> nano4d's z-up world ((x, y, z) -> (x, -z, y))."""
    rot = lambda v: np.stack([v[..., 0], -v[..., 2], v[..., 1]], -1)  # noqa: E731
    return mesh.replace(vertices=rot(mesh.vertices), normals=None if mesh.normals is None else rot(mesh.normals))


def normalize_mesh(mesh: Mesh, half_extent: float = 0.5):
    """Centre the bounding box (of referenced vertices) at the origin and scale uniformly so that its longest
    side is 2 * half_extent. Returns (mesh, scale, offset) with new = (old - offset) * scale."""
    lo, hi = mesh.bounds()
    ext = float((hi - lo).max())
    if not ext > 0:
        raise MeshError(f"{mesh.path}: degenerate mesh (zero-size bounding box)")
    offset = (lo + hi) / 2
    scale = 2 * half_extent / ext
    return mesh.replace(vertices=(mesh.vertices - offset) * scale), scale, offset


def sample_surface(mesh: Mesh, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points (n, 3) uniformly distributed over the mesh surface area (float32)."""
    rng = np.random.default_rng(seed)
    tri = mesh.vertices[mesh.faces]                                            # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not area.sum() > 0:
        raise MeshError(f"{mesh.path}: zero surface area")
    f = rng.choice(len(tri), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)                              # uniform barycentrics
    return (w[:, :, None] * tri[f]).sum(1).astype(np.float32)


# ============================================================================ cameras


def gobjaverse_cameras(num_views: int = 40, res=256, fov_deg: float = 39.6, distance: float = 2.0,
                       elevation_deg: float = 20.0, orbit: int = 24, seed: int = 0):
    """(c2w (V, 4, 4) OpenCV, K (V, 3, 3) pixels) looking at the origin, world z up: views 0..min(V, orbit)-1
    on a ring at ``elevation_deg`` (azimuth step 360/min(V, orbit), starting at 0), then top and bottom, then
    random views with elevation in [-30, 72] deg (deterministic in ``seed``). ``res``: int or (H, W)."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    H, W = (res, res) if isinstance(res, int) else res
    rng = np.random.default_rng(seed)
    ring = min(num_views, orbit)
    el = [elevation_deg] * ring
    az = [j * 360.0 / ring for j in range(ring)]
    for j in range(ring, num_views):
        if j == ring:
            el.append(90.0), az.append(0.0)
        elif j == ring + 1:
            el.append(-90.0), az.append(0.0)
        else:
            el.append(math.degrees(math.asin(rng.uniform(-0.5, 0.95)))), az.append(rng.uniform(0, 360))
    el_r = torch.tensor(el, dtype=torch.float64).deg2rad()
    az_r = torch.tensor(az, dtype=torch.float64).deg2rad()
    eye = distance * torch.stack([el_r.cos() * az_r.cos(), el_r.cos() * az_r.sin(), el_r.sin()], -1)
    # exact top/bottom: cos(90 deg) is not 0 in floating point; look_at handles looking along the up axis
    eye[el_r.abs() > math.radians(89.999), :2] = 0
    c2w = look_at(eye, torch.zeros(3, dtype=torch.float64))
    K = fov_to_K(math.radians(fov_deg), W, H).double().expand(num_views, 3, 3).clone()
    return c2w, K


# ============================================================================ renderer


class PyBulletRenderer:
    """Renders a :class:`Mesh` with pybullet's TinyRenderer in a private ``p.DIRECT`` client."""

    MAX_FACES_PER_SHAPE = 20000   # x2 windings x3 unwelded corners = 120k vertices (pybullet limit 131072)

    def __init__(self, ambient: float = 0.6, diffuse: float = 0.4, max_texture: int = 1024):
        try:
            import pybullet
        except ImportError:
            raise RuntimeError(RENDER_EXTRA_MSG) from None
        self.p = pybullet
        self.cid = pybullet.connect(pybullet.DIRECT)
        self.ambient, self.diffuse, self.max_texture = ambient, diffuse, max_texture
        self._tmp = tempfile.mkdtemp(prefix="nano4d_tex_")
        self.bodies, self.center, self.radius = [], np.zeros(3), 1.0
        self.warnings = []

    def close(self):
        if getattr(self, "cid", None) is not None:
            try:
                self.p.disconnect(physicsClientId=self.cid)
            except Exception:
                pass
            self.cid = None
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self):
        self.close()

    def _texture(self, path: str) -> int | None:
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if max(im.size) > self.max_texture:
                    s = self.max_texture / max(im.size)
                    im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BILINEAR)
                out = os.path.join(self._tmp, f"t{len(os.listdir(self._tmp))}.png")
                im.save(out, compress_level=1)
        except Exception as e:
            self.warnings.append(f"texture {path}: unreadable ({e}); using the material colour")
            return None
        return self.p.loadTexture(out, physicsClientId=self.cid)

    @staticmethod
    def _weld(mesh: Mesh, sel: np.ndarray, face_n: np.ndarray):
        """Shared vertices for faces ``sel``: corners are merged when position index, uv and normal agree
        (OBJ normals where given, else the flat face normal, which merges nothing across faces)."""
        uv = mesh.uvs[sel]
        uv = np.where(np.isfinite(uv), uv, 0.0)
        n = mesh.normals[sel] if mesh.normals is not None else np.full((len(sel), 3, 3), np.nan)
        flat = ~np.isfinite(n).all((1, 2))
        n = np.where(flat[:, None, None], face_n[:, None, :], n)
        vid = mesh.faces[sel].astype(np.float64)
        tag = np.where(flat, sel, -1).astype(np.float64)                       # flat faces never merge
        key = np.concatenate([vid[..., None], uv, n, np.broadcast_to(tag[:, None, None], vid.shape + (1,))], -1)
        uniq, inv = np.unique(key.reshape(-1, 7), axis=0, return_inverse=True)
        verts = mesh.vertices[uniq[:, 0].astype(np.int64)]
        return verts, uniq[:, 3:6], uniq[:, 1:3], inv.reshape(-1, 3)

    def load(self, mesh: Mesh):
        """Replace the scene by ``mesh`` (one shape per material and face chunk, both windings)."""
        p = self.p
        p.resetSimulation(physicsClientId=self.cid)
        self.bodies, self.warnings = [], []
        used = mesh.vertices[np.unique(mesh.faces)]
        self.center = (used.min(0) + used.max(0)) / 2
        self.radius = float(np.linalg.norm(used - self.center, axis=1).max()) + 1e-6
        tri = mesh.vertices[mesh.faces]                                        # (F, 3, 3)
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        fn_len = np.linalg.norm(fn, axis=1, keepdims=True)
        keep = fn_len[:, 0] > 0
        fn = fn / np.maximum(fn_len, 1e-30)
        for mi, mat in enumerate(mesh.materials):
            sel = np.nonzero((mesh.face_material == mi) & keep)[0]
            if len(sel) == 0 or mat.opacity < 0.05:
                continue
            tex = self._texture(mat.texture) if mat.texture else None
            for c0 in range(0, len(sel), self.MAX_FACES_PER_SHAPE):
                s = sel[c0:c0 + self.MAX_FACES_PER_SHAPE]
                verts, norms, uvs, idx = self._weld(mesh, s, fn[s])
                nv = len(verts)
                # front copy, then the back copy: same positions, flipped normals, reversed winding
                idx_all = np.concatenate([idx, idx[:, ::-1] + nv]).reshape(-1)
                gc_was = gc.isenabled()
                gc.disable()                                                   # building big lists: no GC passes
                try:
                    args = dict(vertices=np.concatenate([verts, verts]).tolist(), indices=idx_all.tolist(),
                                uvs=np.concatenate([uvs, uvs]).tolist(), normals=np.concatenate([norms, -norms]).tolist())
                finally:
                    if gc_was:
                        gc.enable()
                vs = p.createVisualShape(p.GEOM_MESH, physicsClientId=self.cid, **args)
                if vs < 0:
                    raise RuntimeError(f"pybullet could not create a shape with {2 * nv} vertices")
                body = p.createMultiBody(baseMass=0, baseVisualShapeIndex=vs, physicsClientId=self.cid)
                if tex is not None:
                    p.changeVisualShape(body, -1, textureUniqueId=tex, rgbaColor=[1, 1, 1, 1],
                                        physicsClientId=self.cid)
                else:
                    kd = [float(np.clip(c, 0, 1)) for c in mat.kd]
                    p.changeVisualShape(body, -1, rgbaColor=kd + [1.0], physicsClientId=self.cid)
                self.bodies.append(body)
        if not self.bodies:
            raise MeshError(f"{mesh.path}: nothing to render (no visible faces)")

    def render(self, c2w, K, height: int, width: int, ssaa: int = 1):
        """RGBA (H, W, 4) float32 (straight alpha) and z-depth (H, W) float32 (0 = background) for an
        OpenCV ``c2w`` (4, 4) and pixel ``K`` (3, 3). ``ssaa``: odd supersampling factor."""
        if ssaa < 1 or ssaa % 2 == 0:
            raise ValueError(f"ssaa must be a positive odd integer, got {ssaa}")
        p = self.p
        c2w = np.asarray(torch.as_tensor(c2w, dtype=torch.float64))
        K = np.asarray(torch.as_tensor(K, dtype=torch.float64))
        Hs, Ws = height * ssaa, width * ssaa
        fx, fy = K[0, 0] * ssaa, K[1, 1] * ssaa
        cx, cy = K[0, 2] * ssaa - 0.5, K[1, 2] * ssaa + 0.5                   # TinyRenderer samples at (j, i+1)
        eye, fwd = c2w[:3, 3], c2w[:3, 2]
        zc = float((self.center - eye) @ fwd)
        near = max(zc - self.radius - 1e-3, 1e-3 * max(self.radius, 1e-3))
        far = max(zc + self.radius + 1e-3, near * 2)
        P = np.zeros((4, 4))
        P[0, 0], P[0, 2] = 2 * fx / Ws, 1 - 2 * cx / Ws
        P[1, 1], P[1, 2] = 2 * fy / Hs, 2 * cy / Hs - 1
        P[2, 2], P[2, 3], P[3, 2] = -(far + near) / (far - near), -2 * far * near / (far - near), -1
        view = np.linalg.inv(c2w @ np.diag([1.0, -1.0, -1.0, 1.0]))            # OpenCV -> OpenGL camera, w2c
        _, _, rgb, dep, seg = p.getCameraImage(
            Ws, Hs, viewMatrix=view.T.reshape(-1).tolist(), projectionMatrix=P.T.reshape(-1).tolist(),
            renderer=p.ER_TINY_RENDERER, lightDirection=(eye - self.center).tolist(), shadow=0,
            lightAmbientCoeff=self.ambient, lightDiffuseCoeff=self.diffuse, lightSpecularCoeff=0.0,
            physicsClientId=self.cid)
        rgb = np.asarray(rgb, dtype=np.float32).reshape(Hs, Ws, 4)[..., :3] / 255.0
        dep = np.asarray(dep, dtype=np.float64).reshape(Hs, Ws)
        cov = (np.asarray(seg).reshape(Hs, Ws) >= 0)
        z = (far * near / (far - dep * (far - near))).astype(np.float32)
        z = np.where(cov, z, 0.0).astype(np.float32)
        covf = cov.astype(np.float32)
        if ssaa > 1:
            blk = lambda a: a.reshape(height, ssaa, width, ssaa, *a.shape[2:]).sum((1, 3))  # noqa: E731
            w = blk(covf)
            rgb = blk(rgb * covf[..., None]) / np.maximum(w, 1e-8)[..., None]
            alpha = w / (ssaa * ssaa)
            z = z[ssaa // 2::ssaa, ssaa // 2::ssaa]
        else:
            alpha = covf
        rgb = np.where(alpha[..., None] > 0, rgb, 0.0)
        return np.concatenate([rgb, alpha[..., None]], -1).astype(np.float32), np.ascontiguousarray(z)


# ============================================================================ collection -> GObjaverse layout


def find_meshes(src: str | Path) -> list:
    """All ``*.obj`` files (any case) under ``src``, sorted."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: not a directory")
    return sorted(p for p in src.rglob("*") if p.suffix.lower() == ".obj" and p.is_file())


def object_id_for(path: Path, src: Path) -> str:
    """Object id from the OBJ's path relative to ``src``: folders joined by '__', the file stem kept only when
    it differs from its folder's name (sweethome3d: ``Catalog/model/model.obj`` -> ``Catalog__model``)."""
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if len(parts) >= 2 and parts[-1].lower() == parts[-2].lower():
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts)).strip("._") or "object"


def _heldout(obj_id: str, frac: float) -> bool:
    h = int.from_bytes(hashlib.sha1(obj_id.encode()).digest()[:8], "big") / 2.0 ** 64
    return h < frac


_WORKER_RENDERER = None


def _render_task(task: dict) -> dict:
    """Render one object (runs in a worker process or inline). Returns a status record."""
    global _WORKER_RENDERER
    t0 = time.time()
    rec = {"id": task["id"], "path": task["path"]}
    try:
        mesh = load_obj(task["path"])
        if task["up"] == "y":
            mesh = y_up_to_z_up(mesh)
        mesh, scale, offset = normalize_mesh(mesh)
        if _WORKER_RENDERER is None:
            _WORKER_RENDERER = PyBulletRenderer()
        r = _WORKER_RENDERER
        r.load(mesh)
        seed = int.from_bytes(hashlib.sha1(f"{task['seed']}/{task['id']}".encode()).digest()[:8], "big")
        c2w, K = gobjaverse_cameras(task["views"], task["res"], task["fov"], task["distance"],
                                    task["elevation"], seed=seed)
        rgbas, depths = [], []
        for v in range(task["views"]):
            rgba, depth = r.render(c2w[v], K[v], task["res"], task["res"], ssaa=task["ssaa"])
            rgbas.append(rgba), depths.append(depth)
        pts = sample_surface(mesh, task["points"], seed=seed % (2 ** 32))
        write_gobjaverse_object(task["out"], task["id"], torch.from_numpy(np.stack(rgbas)), c2w.float(), K.float(),
                                depth=torch.from_numpy(np.stack(depths)),
                                occupancy=occupancy_from_points(torch.from_numpy(pts), task["occ_res"]),
                                surface_points=torch.from_numpy(pts))
        meta = {"source": task["path"], "scale": scale, "offset": offset.tolist(), "up": task["up"],
                "views": task["views"], "res": task["res"], "fov_deg": task["fov"], "distance": task["distance"],
                "elevation_deg": task["elevation"], "ssaa": task["ssaa"], "faces": int(len(mesh.faces)),
                "warnings": mesh.warnings + r.warnings}
        atomic_write(os.path.join(task["out"], task["id"], "render.json"), json.dumps(meta, indent=1).encode())
        rec.update(status="ok", warnings=meta["warnings"])
    except Exception as e:  # every failure is reported with its reason, never dropped
        rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
    rec["seconds"] = time.time() - t0
    return rec


def _is_done(out: Path, obj_id: str, views: int, res: int) -> bool:
    d = out / obj_id
    meta = d / "render.json"
    if not (d / "done").is_file() or not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("views") == views and m.get("res") == res


def _preview(out: Path, ids: list, max_objects: int = 8, max_views: int = 8) -> str | None:
    rows = []
    for obj_id in ids[:max_objects]:
        d = out / obj_id
        views = sorted(int(n) for n in os.listdir(d) if n.isdigit())
        step = max(1, len(views) // max_views)
        o = read_gobjaverse_object(str(d), views=views[::step][:max_views])
        rows.append(o["images"] * o["alphas"] + (1 - o["alphas"]))              # on white
    if not rows:
        return None
    return save_image_grid(str(out / "preview.png"), rows)


def render_collection(src, out, views: int = 40, res: int = 256, split: float = 0.1, fov_deg: float = 39.6,
                      distance: float = 2.0, elevation_deg: float = 20.0, ssaa: int = 3, up: str = "y",
                      seed: int = 0, workers: int = 1, limit: int | None = None, points: int = 20000,
                      occ_res: int = 32, preview: bool = True, log=print) -> dict:
    """Render every OBJ under ``src`` into ``out`` (GObjaverse layout). Returns {"ok": [...ids],
    "skipped": [...], "failed": [{"path", "reason"}], "split": {...}}; see the module docstring."""
    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', got {up!r}")
    if not 0.0 <= split < 1.0:
        raise ValueError(f"split (held-out fraction) must be in [0, 1), got {split}")
    if ssaa < 1 or ssaa % 2 == 0:
        raise ValueError(f"ssaa must be a positive odd integer, got {ssaa}")
    try:
        import pybullet  # noqa: F401
    except ImportError:
        raise RuntimeError(RENDER_EXTRA_MSG) from None
    src, out = Path(src), Path(out)
    paths = find_meshes(src)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"--src {src}: no .obj files found")
    out.mkdir(parents=True, exist_ok=True)
    tasks, seen, skipped, failed, ok = [], {}, [], [], []
    for pth in paths:
        obj_id = object_id_for(pth, src)
        if obj_id in seen:                       # two OBJs mapping to one id: disambiguate deterministically
            obj_id = f"{obj_id}__{hashlib.sha1(str(pth).encode()).hexdigest()[:6]}"
        seen[obj_id] = pth
        if _is_done(out, obj_id, views, res):
            skipped.append(obj_id)
            continue
        tasks.append(dict(id=obj_id, path=str(pth), out=str(out), views=views, res=res, fov=fov_deg,
                          distance=distance, elevation=elevation_deg, ssaa=ssaa, up=up, seed=seed,
                          points=points, occ_res=occ_res))
    log(f"render-meshes: {len(paths)} OBJ files under {src}; {len(skipped)} already rendered, {len(tasks)} to do "
        f"({views} views, {res}x{res}, ssaa {ssaa}, {workers} worker(s))")
    t0 = time.time()
    if workers > 1 and len(tasks) > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_render_task, tasks)
    else:
        pool, results = None, map(_render_task, tasks)
    try:
        for k, rec in enumerate(results, 1):
            el = time.time() - t0
            eta = el / k * (len(tasks) - k)
            if rec["status"] == "ok":
                ok.append(rec["id"])
                msg = f"ok {rec['seconds']:.1f}s" + (f", {len(rec['warnings'])} warning(s)" if rec["warnings"] else "")
            else:
                failed.append({"id": rec["id"], "path": rec["path"], "reason": rec["reason"]})
                msg = f"FAILED: {rec['reason'][:160]}"
            log(f"[{k:>{len(str(len(tasks)))}}/{len(tasks)}] {rec['id']}: {msg}  (elapsed {el:.0f}s, eta {eta:.0f}s)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    done = sorted(set(ok) | set(skipped))
    split_ids = {"train": [i for i in done if not _heldout(i, split)], "val": [i for i in done if _heldout(i, split)]}
    (out / "split.json").write_text(json.dumps(split_ids, indent=1))
    for name, ids in split_ids.items():      # plain lists: GObjaverseDataset(out, object_ids=out/"train.json")
        (out / f"{name}.json").write_text(json.dumps(ids, indent=1))
    (out / "failures.json").write_text(json.dumps(failed, indent=1))
    prev = _preview(out, done) if preview else None
    log(f"render-meshes: {len(ok)} rendered, {len(skipped)} skipped (already done), {len(failed)} failed; "
        f"split.json: {len(split_ids['train'])} train / {len(split_ids['val'])} val"
        + (f"; preview {prev}" if prev else ""))
    if failed:
        log(f"render-meshes: {len(failed)} object(s) failed (also in {out / 'failures.json'}):")
        for f in failed:
            log(f"  {f['path']}: {f['reason']}")
    return {"ok": ok, "skipped": skipped, "failed": failed, "split": split_ids, "preview": prev}


# ============================================================================ sweethome3d-furniture


SWEETHOME3D_CC_CATALOGS = ("BlendSwap-CC-0", "BlendSwap-CC-BY", "KatorLegaz", "Scopia")


def _deb_extract(deb: Path, dest: Path):
    """``dpkg -x`` when available, else a small pure-Python reader of the .deb (ar archive + data.tar.*)."""
    if shutil.which("dpkg"):
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
        return
    import io
    import tarfile
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb}: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise RuntimeError(f"{deb}: no data.tar member")


def prepare_sweethome3d(out, deb=None, extracted=None, catalogs=SWEETHOME3D_CC_CATALOGS, log=print) -> dict:
    """Unpack Debian's ``sweethome3d-furniture`` catalogs into ``out/<catalog dir>/<model>/<model>.obj`` (+ MTL,
    textures; catalog-level files under ``out/_catalogs/<catalog>/``), ready for ``render-meshes --src out``. Sources, first found: ``extracted`` (a ``dpkg -x``
    tree or any folder holding the ``.sh3f`` files), ``deb`` (the .deb file), else ``apt-get download
    sweethome3d-furniture`` into a temporary folder. ``catalogs``: names (without .sh3f) or None for all
    (the default skips Reallusion, whose licence is not CC). Writes ``out/catalog.json`` (model name,
    category, size in cm, licence per object id) and copies the licence files. Returns {catalog: n_models}."""
    out = Path(out)
    tmp = None
    try:
        if extracted is None:
            tmp = Path(tempfile.mkdtemp(prefix="nano4d_sh3d_"))
            if deb is None:
                if not shutil.which("apt-get"):
                    raise RuntimeError("apt-get not found: pass --deb sweethome3d-furniture_1.8-1_all.deb "
                                       "(from any Debian/Ubuntu mirror) or --extracted DIR")
                log("+ apt-get download sweethome3d-furniture")
                subprocess.run(["apt-get", "download", "sweethome3d-furniture"], cwd=tmp, check=True)
                debs = sorted(tmp.glob("sweethome3d-furniture_*.deb"))
                if not debs:
                    raise RuntimeError("apt-get download produced no sweethome3d-furniture .deb")
                deb = debs[0]
            log(f"+ extracting {deb}")
            _deb_extract(Path(deb), tmp / "root")
            extracted = tmp / "root"
        sh3fs = sorted(Path(extracted).rglob("*.sh3f"))
        if not sh3fs:
            raise FileNotFoundError(f"{extracted}: no .sh3f catalogs found")
        wanted = None if catalogs is None else set(catalogs)
        out.mkdir(parents=True, exist_ok=True)
        root = out.resolve()
        index, counts, licenses = {}, {}, []
        for sh3f in sh3fs:
            cat = sh3f.stem
            if wanted is not None and cat not in wanted:
                log(f"  skipping catalog {cat}")
                continue
            props, n = {}, 0
            with zipfile.ZipFile(sh3f) as z:
                for info in z.infolist():
                    # model folders go to out/ as they are; top-level files (licence, properties) per catalog
                    rel = info.filename if "/" in info.filename.rstrip("/") else f"_catalogs/{cat}/{info.filename}"
                    target = (out / rel).resolve()
                    if root not in target.parents:
                        raise RuntimeError(f"{sh3f}: unsafe member path {info.filename!r}")
                    if info.is_dir():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(info))
                    if info.filename == "PluginFurnitureCatalog.properties":       # the default-language one
                        props.update(_parse_catalog_properties(z.read(info).decode("latin-1")))
                    if Path(info.filename).name.upper().startswith("LICENSE"):
                        licenses.append(rel)
                    if info.filename.lower().endswith(".obj"):
                        oid = object_id_for(out / info.filename, out)
                        index[oid] = dict(catalog=cat, obj=info.filename, **props.get(info.filename, {}))
                        n += 1
            for oid, rec in index.items():      # properties may come after the models in the zip
                if rec["catalog"] == cat:
                    rec.update(props.get(rec["obj"], {}))
            counts[cat] = n
            log(f"  {cat}: {n} OBJ models")
        licenses = sorted(set(licenses))
        (out / "catalog.json").write_text(json.dumps({"objects": index, "license_files": licenses}, indent=1))
        return counts
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _parse_catalog_properties(text: str) -> dict:
    """Sweet Home 3D ``PluginFurnitureCatalog.properties`` -> {model path: {name, category, width, depth,
    height, creator, license}} (keys like ``name#12``, ``model#12=/bread/bread.obj``)."""
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        if "#" not in k:
            continue
        key, num = k.strip().rsplit("#", 1)
        rows.setdefault(num, {})[key] = v.strip().encode("latin-1").decode("unicode_escape", errors="replace")
    out = {}
    for r in rows.values():
        if "model" not in r:
            continue
        rec = {k: r[k] for k in ("name", "category", "creator", "license") if k in r}
        for k in ("width", "depth", "height"):
            if k in r:
                try:
                    rec[k + "_cm"] = float(r[k])
                except ValueError:
                    pass
        out[r["model"].lstrip("/")] = rec
    return out


# ============================================================================ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nano4d.data.meshes", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render-meshes", help="render every OBJ under --src into the GObjaverse layout")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--views", type=int, default=40)
    r.add_argument("--res", type=int, default=256)
    r.add_argument("--split", type=float, default=0.1, help="held-out (val) fraction, by hash of the object id")
    r.add_argument("--fov", type=float, default=39.6, help="vertical field of view, degrees")
    r.add_argument("--distance", type=float, default=2.0, help="camera distance from the origin")
    r.add_argument("--elevation", type=float, default=20.0, help="orbit elevation, degrees")
    r.add_argument("--ssaa", type=int, default=3, help="odd supersampling factor per axis (1 = off)")
    r.add_argument("--up", choices=["y", "z"], default="y", help="up axis of the OBJ files (OBJ convention: y)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--limit", type=int, default=None, help="only the first N OBJ files (sorted)")
    r.add_argument("--points", type=int, default=20000, help="surface samples saved per object (Chamfer GT)")
    r.add_argument("--no-preview", action="store_true")
    s = sub.add_parser("prepare-sweethome3d", help="unpack Debian's sweethome3d-furniture OBJ catalogs")
    s.add_argument("--out", required=True)
    s.add_argument("--deb", default=None, help="a downloaded sweethome3d-furniture_*.deb (default: apt-get download)")
    s.add_argument("--extracted", default=None, help="a folder holding the .sh3f files (e.g. a dpkg -x tree)")
    s.add_argument("--catalogs", default=",".join(SWEETHOME3D_CC_CATALOGS),
                   help="comma-separated catalog names, or 'all' (adds Reallusion: not CC-licensed, check its terms)")
    args = ap.parse_args(argv)
    if args.cmd == "render-meshes":
        try:
            res = render_collection(args.src, args.out, views=args.views, res=args.res, split=args.split,
                                    fov_deg=args.fov, distance=args.distance, elevation_deg=args.elevation,
                                    ssaa=args.ssaa, up=args.up, seed=args.seed, workers=args.workers,
                                    limit=args.limit, points=args.points, preview=not args.no_preview)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            print(f"render-meshes: error: {e}", file=sys.stderr)
            return 2
        return 0 if (res["ok"] or res["skipped"]) else 1
    cats = None if args.catalogs == "all" else [c for c in args.catalogs.split(",") if c]
    counts = prepare_sweethome3d(args.out, deb=args.deb, extracted=args.extracted, catalogs=cats)
    print(f"prepare-sweethome3d: {sum(counts.values())} OBJ models in {args.out}; next:\n"
          f"    python -m nano4d.data.meshes render-meshes --src {args.out} --out <renders> --views 40 --res 256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
