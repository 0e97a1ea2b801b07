"""The GObjaverse object layout (GeoLRM's training data): reader, writer, dataset, and occupancy from depth.

``write_gobjaverse_object`` / ``read_gobjaverse_object`` / ``GObjaverseDataset``: objects in the GObjaverse
layout (real GObjaverse, ``nano4d.data.meshes`` renders, or a ``ProceduralObjects`` cache);
``gobjaverse_camera`` converts its camera JSON to an OpenCV c2w + pixel K. ``occupancy_from_points`` /
``occupancy_from_depth`` voxelize surface samples or back-projected depth maps into the (Z, Y, X) occupancy
grid GeoLRM supervises (the one grid-binning function of the project).

Every reader raises ``DataError`` (a ``ValueError``) naming the offending file and field; nothing is skipped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from nano4d.cameras import camera_rays, fov_to_K
from nano4d.data.common import (DataError, as_array, as_float, as_int, background_rgb, check_background, composite,
                                field, read_json, rng, split_seed)


# ============================================================================ GObjaverse layout
# <root>/<obj_id>/<view:05d>/<view:05d>.png     RGBA, 8-bit, straight alpha
# <root>/<obj_id>/<view:05d>/<view:05d>.json    {"x", "y", "z", "origin", "x_fov", "y_fov", ...}
# depth: <view>_nd.exr (GObjaverse: normal xyz + depth in the last channel; needs an EXR reader) or nano4d's
#        <view>_depth.npy (float32 (H, W) z-depth, 0 = background) or <view>_depth.png (uint16, times
#        json["depth_png_scale"] metres per unit); nano4d extras: <view>_normal.npy (H, W, 3) world normals,
#        <obj_id>/occupancy.npy (R, R, R) uint8 (Z, Y, X), <obj_id>/surface_points.npy (P, 3) float32.
# GObjaverse proper: <root>/<shard>/<id>/... with 40 views (0..23 the orbit), the object list a JSON list of
# "<shard>/<id>" names (gobjaverse_280k.json), occupancy targets (GeoLRM's create_occ_gts) as
# <occ_root>/<shard>/<id>/pts.npy: uint8 (N, 3) x, y, z cell indices round((p + 0.5) * 128) clamped to [0, 127].
# EXR depth is cleaned as GeoLRM's loader does: values nearer than (camera distance - sqrt(3)/2) cannot be on
# the object and are invalid, the invalid mask is dilated by one pixel (3x3; edges are unreliable), and
# invalid depth becomes 0.
# Camera convention: GObjaverse's "x", "y", "z" are the world-frame directions of the camera's right, down
# and forward axes (OpenCV), "origin" its centre, so c2w = [x | y | z | origin] is an OpenCV c2w (GeoLRM's
# loader reads it so and right-multiplies diag(1, -1, -1, 1) to get Blender/OpenGL; nano4d keeps OpenCV).
# x_fov / y_fov are full angles in radians with the principal point at the image centre, so
# fx = W / (2 tan(x_fov / 2)), cx = W / 2 (and likewise for y). nano4d's writer also stores the exact pixel
# K under "K" (used when present, e.g. for an off-centre principal point).


def _camera_json(c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> dict:
    c2w, K = c2w.double(), K.double()
    return {"x": c2w[:3, 0].tolist(), "y": c2w[:3, 1].tolist(), "z": c2w[:3, 2].tolist(),
            "origin": c2w[:3, 3].tolist(),
            "x_fov": 2 * math.atan(width / (2 * float(K[0, 0]))), "y_fov": 2 * math.atan(height / (2 * float(K[1, 1]))),
            "K": K.tolist(), "width": int(width), "height": int(height)}


def gobjaverse_camera(meta: dict, width: int, height: int, path: str = "<json>"):
    """GObjaverse camera JSON dict -> (c2w (4, 4) OpenCV, K (3, 3) pixels); see the layout notes above.
    DataError naming ``path`` and the field for a missing or malformed field."""
    c2w = torch.eye(4, dtype=torch.float64)
    for j, key in enumerate(("x", "y", "z", "origin")):
        c2w[:3, j] = as_array(field(meta, key, path), (3,), path, key)
    if "K" in meta:
        K = as_array(meta["K"], (3, 3), path, "K")
    else:
        fov_x, fov_y = (as_float(field(meta, k, path), path, k) for k in ("x_fov", "y_fov"))
        for k, v in (("x_fov", fov_x), ("y_fov", fov_y)):
            if not 0 < v < math.pi:
                raise DataError(f"{path}: field {k!r} must be a field of view in (0, pi) radians, got {v!r}")
        K = fov_to_K(fov_y, width, height, fov_x=fov_x).double()
    return c2w.float(), K.float()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.cpu().numpy()
    return (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def write_gobjaverse_object(root: str, obj_id: str, rgba, c2w, K, depth=None, normal=None, occupancy=None,
                            surface_points=None, depth_format: str = "npy", depth_png_scale: float = 1e-4) -> str:
    """Write one object in the GObjaverse layout. rgba (V, H, W, 4) float in [0, 1] (straight alpha) or uint8;
    c2w (V, 4, 4) OpenCV; K (V, 3, 3) pixels; depth (V, H, W) z-depth or None; normal (V, H, W, 3) or None;
    occupancy (R, R, R) and surface_points (P, 3) optional. ``depth_format``: "npy" or "png16" (uint16 with
    ``depth_png_scale`` metres per unit). Writes to a temporary folder, then renames it into place
    (readers never see a half-written object). Returns the object folder."""
    rgba = torch.as_tensor(rgba)
    V, H, W = rgba.shape[:3]
    if rgba.dim() != 4 or rgba.shape[-1] != 4:
        raise ValueError(f"rgba must be (V, H, W, 4), got {tuple(rgba.shape)}")
    if tuple(c2w.shape) != (V, 4, 4) or tuple(K.shape) != (V, 3, 3):
        raise ValueError(f"c2w must be ({V}, 4, 4) and K ({V}, 3, 3), got {tuple(c2w.shape)} and {tuple(K.shape)}")
    if depth is not None and tuple(depth.shape) != (V, H, W):
        raise ValueError(f"depth must be ({V}, {H}, {W}), got {tuple(depth.shape)}")
    if depth_format not in ("npy", "png16"):
        raise ValueError(f"depth_format must be 'npy' or 'png16', got {depth_format!r}")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, str(obj_id))
    tmp = tempfile.mkdtemp(prefix=f".{obj_id}.tmp", dir=root)
    rgba8 = _to_uint8(rgba)
    for v in range(V):
        vd = os.path.join(tmp, f"{v:05d}")
        os.makedirs(vd)
        Image.fromarray(rgba8[v], mode="RGBA").save(os.path.join(vd, f"{v:05d}.png"))
        meta = _camera_json(c2w[v], K[v], W, H)
        if depth is not None:
            dv = depth[v].detach().float().cpu().numpy()
            if depth_format == "npy":
                np.save(os.path.join(vd, f"{v:05d}_depth.npy"), dv.astype(np.float32))
            else:
                q = np.round(dv / depth_png_scale)
                if q.max(initial=0) > 65535:
                    raise ValueError(f"depth {dv.max():.3f} overflows uint16 at depth_png_scale {depth_png_scale}")
                Image.fromarray(q.astype(np.uint16)).save(os.path.join(vd, f"{v:05d}_depth.png"))
                meta["depth_png_scale"] = depth_png_scale
        if normal is not None:
            np.save(os.path.join(vd, f"{v:05d}_normal.npy"), normal[v].detach().float().cpu().numpy().astype(np.float32))
        with open(os.path.join(vd, f"{v:05d}.json"), "w") as f:
            json.dump(meta, f)
    if occupancy is not None:
        np.save(os.path.join(tmp, "occupancy.npy"), (torch.as_tensor(occupancy) > 0.5).to(torch.uint8).cpu().numpy())
    if surface_points is not None:
        np.save(os.path.join(tmp, "surface_points.npy"), torch.as_tensor(surface_points).float().cpu().numpy())
    open(os.path.join(tmp, "done"), "w").close()
    if os.path.isdir(final):
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:          # another worker won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_exr(path: str) -> np.ndarray:
    """(H, W, C) float32 from an OpenEXR file (channels R, G, B, A first, then the rest by name), via the
    ``openexr`` package (3.x API, or the legacy one) or OpenCV, whichever is installed."""
    errors = []
    try:
        import OpenEXR
        try:
            if hasattr(OpenEXR, "File"):
                ch = {k: np.asarray(v.pixels, dtype=np.float32)
                      for k, v in OpenEXR.File(path, separate_channels=True).channels().items()}
            else:
                import Imath
                f = OpenEXR.InputFile(path)
                dw = f.header()["dataWindow"]
                w, h = dw.max.x - dw.min.x + 1, dw.max.y - dw.min.y + 1
                pt = Imath.PixelType(Imath.PixelType.FLOAT)
                ch = {c: np.frombuffer(f.channel(c, pt), np.float32).reshape(h, w) for c in f.header()["channels"]}
        except Exception as e:
            raise DataError(f"{path}: unreadable EXR ({e})") from None
        order = [c for c in ("R", "G", "B", "A") if c in ch] + sorted(c for c in ch if c not in ("R", "G", "B", "A"))
        return np.stack([ch[c] for c in order], -1)
    except ImportError as e:
        errors.append(str(e))
    try:
        os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
        import cv2
        a = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if a is None:
            raise DataError(f"{path}: OpenCV could not read this EXR file")
        a = a.astype(np.float32)
        return a[..., [2, 1, 0] + list(range(3, a.shape[-1]))] if a.ndim == 3 and a.shape[-1] >= 3 else a
    except ImportError as e:
        errors.append(str(e))
    raise DataError(f"{path}: reading GObjaverse depth/normal EXR needs an EXR reader "
                    f"(pip install openexr, or opencv-python); none found ({'; '.join(errors)})")


NEAR_SLACK = 0.867       # sqrt(3) / 2: the object cube's half diagonal


def _dilate3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a (H, W) bool mask."""
    p = np.pad(mask, 1)
    H, W = mask.shape
    return np.any([p[i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=0)


def clean_exr_depth(depth: np.ndarray, camera_distance: float) -> np.ndarray:
    """GObjaverse EXR depth -> depth with 0 where invalid: nearer than ``camera_distance - sqrt(3)/2`` (in front
    of the object cube) or non-finite, dilated by one pixel."""
    bad = ~np.isfinite(depth) | (np.nan_to_num(depth, nan=0.0) < camera_distance - NEAR_SLACK)
    return np.where(_dilate3(bad), 0.0, np.nan_to_num(depth, nan=0.0)).astype(np.float32)


def _read_view(vd: str, v: int):
    png, js = os.path.join(vd, f"{v:05d}.png"), os.path.join(vd, f"{v:05d}.json")
    for p in (png, js):
        if not os.path.isfile(p):
            raise DataError(f"{p}: missing (every view needs <view>.png and <view>.json)")
    try:
        with Image.open(png) as im:
            im.load()
            if im.mode not in ("RGBA", "RGB", "LA", "L", "P"):
                raise DataError(f"{png}: unsupported image mode {im.mode}")
            rgba = np.asarray(im.convert("RGBA"))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{png}: unreadable image ({e})") from None
    meta = read_json(js, "camera JSON")
    if not isinstance(meta, dict):
        raise DataError(f"{js}: expected a JSON object")
    H, W = rgba.shape[:2]
    if "width" in meta or "height" in meta:
        w, h = (as_int(field(meta, k, js), js, k) for k in ("width", "height"))
        if (w, h) != (W, H):
            raise DataError(f"{png}: image is {W}x{H} but {js} says width {w}, height {h}")
    c2w, K = gobjaverse_camera(meta, W, H, js)
    depth = normal = None
    base = os.path.join(vd, f"{v:05d}")
    if os.path.isfile(base + "_depth.npy"):
        try:
            depth = np.load(base + "_depth.npy")
        except Exception as e:
            raise DataError(f"{base}_depth.npy: unreadable ({e})") from None
    elif os.path.isfile(base + "_depth.png"):
        if "depth_png_scale" not in meta:
            raise DataError(f"{js}: field 'depth_png_scale' is required next to {base}_depth.png")
        scale = as_float(meta["depth_png_scale"], js, "depth_png_scale")
        with Image.open(base + "_depth.png") as im:
            depth = np.asarray(im).astype(np.float32) * scale
    elif os.path.isfile(base + "_nd.exr"):
        nd = _read_exr(base + "_nd.exr")
        if nd.ndim != 3 or nd.shape[-1] < 4:
            raise DataError(f"{base}_nd.exr: expected 4 channels (normal xyz, depth), got shape {nd.shape}")
        depth = clean_exr_depth(nd[..., 3], float(c2w[:3, 3].norm()))
        # GObjaverse stores normals in Unity axes; GeoLRM's unity2blender: (x, y, z) -> (-z, -x, y).
        # Taken from GeoLRM's loader, not verified here against real GObjaverse files.
        normal = np.stack([-nd[..., 2], -nd[..., 0], nd[..., 1]], -1)
    if depth is not None and depth.shape[:2] != (H, W):
        raise DataError(f"{base}: depth is {depth.shape[1]}x{depth.shape[0]} but the image is {W}x{H}")
    if os.path.isfile(base + "_normal.npy"):
        normal = np.load(base + "_normal.npy")
        if normal.shape != (H, W, 3):
            raise DataError(f"{base}_normal.npy: shape {normal.shape}, expected ({H}, {W}, 3)")
    return rgba, c2w, K, depth, normal


def list_views(obj_dir: str) -> list[int]:
    if not os.path.isdir(obj_dir):
        raise DataError(f"{obj_dir}: object folder not found")
    views = sorted(int(n) for n in os.listdir(obj_dir) if n.isdigit() and os.path.isdir(os.path.join(obj_dir, n)))
    if not views:
        raise DataError(f"{obj_dir}: no view folders (<view:05d>/) found")
    return views


def list_objects(root: str) -> list[str]:
    """Sorted names of the object folders under ``root`` (every non-hidden sub-folder, each of which must
    hold view folders); DataError naming ``root`` when it is missing or holds no objects."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: GObjaverse root folder not found")
    names = sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
    if not names:
        raise DataError(f"{root}: no object folders (<obj_id>/<view:05d>/) in this folder")
    for n in names:
        if not any(v.isdigit() for v in os.listdir(os.path.join(root, n))):
            raise DataError(f"{os.path.join(root, n)}: not an object folder (no <view:05d>/ inside); "
                            "pass object_ids to choose the objects explicitly")
    return names


def read_gobjaverse_object(obj_dir: str, views=None) -> dict:
    """Read an object folder in the GObjaverse layout (all views, or the given view ids).

    Returns: images (V, 3, H, W) straight colour in [0, 1], alphas (V, 1, H, W), c2w (V, 4, 4) OpenCV,
    K (V, 3, 3) pixels, depths (V, 1, H, W) or None, normals (V, 3, H, W) or None, view_ids (list), and
    occupancy / surface_points when the nano4d extras exist. Raises DataError naming the bad file."""
    ids = list_views(obj_dir) if views is None else [int(v) for v in views]
    rgbas, c2ws, Ks, depths, normals = [], [], [], [], []
    for v in ids:
        rgba, c2w, K, depth, normal = _read_view(os.path.join(obj_dir, f"{v:05d}"), v)
        if rgbas and rgba.shape != rgbas[0].shape:
            raise DataError(f"{os.path.join(obj_dir, f'{v:05d}', f'{v:05d}.png')}: size {rgba.shape[1]}x{rgba.shape[0]} "
                            f"differs from view {ids[0]} ({rgbas[0].shape[1]}x{rgbas[0].shape[0]})")
        rgbas.append(rgba), c2ws.append(c2w), Ks.append(K), depths.append(depth), normals.append(normal)
    rgba = torch.from_numpy(np.stack(rgbas)).float().div(255).permute(0, 3, 1, 2)
    out = dict(images=rgba[:, :3].contiguous(), alphas=rgba[:, 3:].contiguous(), c2w=torch.stack(c2ws),
               K=torch.stack(Ks), view_ids=ids, depths=None, normals=None)
    if all(d is not None for d in depths):
        # z-depth, 0 where alpha is 0 (GObjaverse EXRs may hold far values there)
        out["depths"] = torch.from_numpy(np.stack(depths)).float()[:, None] * (out["alphas"] > 0)
    elif any(d is not None for d in depths):
        miss = ids[[d is None for d in depths].index(True)]
        raise DataError(f"{os.path.join(obj_dir, f'{miss:05d}')}: depth missing for this view while others have it")
    if all(n is not None for n in normals):
        out["normals"] = torch.from_numpy(np.stack(normals)).float().permute(0, 3, 1, 2).contiguous()
    for name in ("occupancy", "surface_points"):
        p = os.path.join(obj_dir, name + ".npy")
        if os.path.isfile(p):
            try:
                out[name] = torch.from_numpy(np.load(p)).float()
            except Exception as e:
                raise DataError(f"{p}: unreadable ({e})") from None
    return out


def _resize_views(out: dict, res) -> dict:
    """Resize the view tensors of a read object to res (H, W): colour/alpha by area (premultiplied), depth
    and normals by alpha-weighted area, K scaled (pixel-edge coordinates scale exactly)."""
    H0, W0 = out["images"].shape[-2:]
    H, W = res
    if (H, W) == (H0, W0):
        return out
    rs = lambda x: F.interpolate(x, size=(H, W), mode="area")  # noqa: E731
    a = rs(out["alphas"])
    safe = a.clamp_min(1e-6)
    out["images"] = (rs(out["images"] * out["alphas"]) / safe).clamp(0, 1)
    hard = (out["alphas"] > 0.5).float()
    wsum = rs(hard).clamp_min(1e-6)
    if out.get("depths") is not None:
        out["depths"] = rs(out["depths"] * hard) / wsum * (rs(hard) > 0.5)
    if out.get("normals") is not None:
        out["normals"] = F.normalize(rs(out["normals"] * hard), dim=1) * (rs(hard) > 0.5)
    out["alphas"] = a
    K = out["K"].clone()
    K[:, 0] *= W / W0
    K[:, 1] *= H / H0
    out["K"] = K
    return out


def occupancy_from_points(points: torch.Tensor, res: int, lo: float = -0.5, hi: float = 0.5) -> torch.Tensor:
    """Occupancy (R, R, R) float 0/1 in (Z, Y, X) order over the cube [lo, hi]^3: 1 where a cell holds at
    least one of the points (N, 3). Cell (k, j, i) spans x in lo + [i, i + 1) (hi - lo) / R (likewise y, z);
    a point on the upper face counts in the last cell, points outside the cube are ignored."""
    p = torch.as_tensor(points).reshape(-1, 3).double()
    inside = ((p >= lo) & (p <= hi)).all(-1)
    i = ((p[inside] - lo) * (res / (hi - lo))).floor().long().clamp(0, res - 1)
    occ = torch.zeros(res ** 3)
    occ[(i[:, 2] * res + i[:, 1]) * res + i[:, 0]] = 1
    return occ.view(res, res, res)


def occupancy_from_indices(idx, res: int, grid: int = 128) -> torch.Tensor:
    """Occupancy (R, R, R) (Z, Y, X) from integer cell indices (N, 3) (x, y, z) of a ``grid``^3 grid, e.g. GeoLRM's
    pts.npy (grid 128). Index i of the fine grid maps to cell i * R // grid; GeoLRM's indices are rounded, not
    floored, so they sit half a fine cell off nano4d's floor binning (at R = 128 a surface point may land one
    cell over)."""
    i = torch.as_tensor(np.asarray(idx), dtype=torch.int64).reshape(-1, 3)
    if i.numel() and (i.min() < 0 or i.max() >= grid):
        raise ValueError(f"cell indices must lie in [0, {grid}), got [{int(i.min())}, {int(i.max())}]")
    i = i * res // grid
    occ = torch.zeros(res ** 3)
    occ[(i[:, 2] * res + i[:, 1]) * res + i[:, 0]] = 1
    return occ.view(res, res, res)


def depth_points(depths: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """World points (N, 3) of z-depth maps (V, 1, H, W) (pixel centres, OpenCV c2w (V, 4, 4), pixel K (V, 3, 3));
    pixels with depth <= 0 or ``mask`` (V, 1, H, W) false are skipped."""
    o, d = camera_rays(c2w, K, *depths.shape[-2:])                         # (V, H, W, 3), unit d
    z_per_t = (d * c2w[:, None, None, :3, 2]).sum(-1)                       # z-depth per unit ray length
    m = depths[:, 0] > 0
    if mask is not None:
        m = m & mask[:, 0].bool()
    return o[m] + d[m] * (depths[:, 0][m] / z_per_t[m])[:, None]


def occupancy_from_depth(depths, alphas, c2w, K, res: int) -> torch.Tensor:
    """Surface occupancy (R, R, R) (Z, Y, X) over [-0.5, 0.5]^3 from z-depth maps (V, 1, H, W) and alphas
    (V, 1, H, W): the foreground pixels (alpha > 0.5) back-projected and binned (as GeoLRM's GT tool)."""
    return occupancy_from_points(depth_points(depths, c2w, K, alphas > 0.5), res)


log = logging.getLogger("nano4d.data")


class GObjaverseDataset(Dataset):
    """Objects stored in the GObjaverse layout (real GObjaverse, ``nano4d.data.meshes`` renders, or a
    ``ProceduralObjects`` cache), read from disk one item at a time; returns the keys of ``ProceduralObjects``
    where available: images (V, 3, H, W) composited on ``background``, alphas, c2w, K, background, view_ids (V,)
    int64, object_id (str), and depths / normals / occupancy / surface_points when the files exist.

    ``object_ids``: object folders relative to ``root`` (GObjaverse's "<shard>/<id>"), as a list or a JSON file
    holding a list (or an object whose keys are the names, read sorted), e.g. ``gobjaverse_280k.json``;
    default: every non-hidden sub-folder of ``root`` (each must hold view folders). Only the names are kept
    (one byte array), so the dataset is an index; every item reads its views in ``__getitem__``.
    View choice (``num_views`` V): objects with >= 24 views are read as GObjaverse's 24-view orbit (views
    0..23 of the 40): 4 orbit views 90 deg apart from a random start (GeoLRM's [0, 6, 12, 18] + offset), then
    random other views of all the object's views; smaller objects: the first ``ring_views`` views
    (ProceduralObjects' ring), then random others. ``random_views=False`` takes views 0..V-1. Randomness is
    deterministic in (seed, index, epoch); ``set_epoch`` varies it. ``res``: resize to (H, W) with K scaled.
    ``background``: "white", "black", (r, g, b) or "random" (one uniform colour per item; GeoLRM's targets).
    ``occ_res``: also return ``occupancy`` at that resolution: the object's occupancy.npy when it has that
    size, else ``<occ_root>/<object_id>/pts.npy`` (GeoLRM's 128^3 indices) when ``occ_root`` is given, else
    binned from the depth of the views read (partial when they do not see the whole surface).
    An object that fails to read (missing / malformed file) is logged by name on the ``nano4d.data`` logger,
    counted in ``failures`` (names, this process) and replaced by the next object; when more than
    ``max_failures`` x len(dataset) objects failed in this process, ``DataError`` stops the run."""

    def __init__(self, root: str, num_views: int = 8, res=None, background="white", seed: int = 0,
                 object_ids=None, ring_views: int = 4, random_views: bool = True, occ_res: int | None = None,
                 occ_root: str | None = None, max_failures: float = 0.01):
        if not os.path.isdir(root):
            raise DataError(f"{root}: GObjaverse root folder not found")
        self.root, self.num_views, self.seed, self.ring_views, self.random_views = root, num_views, seed, ring_views, random_views
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.background, self.epoch = background, 0
        self.occ_res, self.occ_root, self.max_failures, self.failures = occ_res, occ_root, float(max_failures), []
        check_background(background)
        if isinstance(object_ids, str):
            path, object_ids = object_ids, read_json(object_ids, "object list")
            if isinstance(object_ids, dict):
                object_ids = sorted(object_ids)
            if not isinstance(object_ids, list) or not all(isinstance(o, str) for o in object_ids):
                raise DataError(f"{path}: the object list must be a JSON list of folder names (or an object keyed by them)")
        if object_ids is None:
            object_ids = list_objects(root)
        if not object_ids:
            raise DataError(f"{root}: no objects found")
        self.names = np.array([str(o) for o in object_ids], dtype=np.bytes_)

    @property
    def object_ids(self) -> list[str]:
        return [n.decode() for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def choose_views(self, available: list[int], rng) -> list[int]:
        V, n = self.num_views, len(available)
        if V > n:
            raise DataError(f"needs {V} views but only {n} exist")
        if not self.random_views:
            return available[:V]
        if n >= 24 and all(v in available for v in range(24)):
            r = int(rng.integers(24))
            ring = [(r + 6 * j) % 24 for j in range(min(4, V))]
        else:
            ring = available[:min(self.ring_views, V)]
        rest = [v for v in available if v not in ring]
        return ring + [rest[j] for j in rng.permutation(len(rest))[:V - len(ring)]]

    def __getitem__(self, i: int) -> dict:
        n = len(self.names)
        for k in range(n):
            j = (i + k) % n
            try:
                return self._item(j)
            except DataError as e:
                name = self.names[j].decode()
                self.failures.append(name)
                log.warning("GObjaverse object %s failed to read (%d failures in this process): %s",
                            name, len(self.failures), e)
                if len(self.failures) > self.max_failures * n:
                    raise DataError(f"{self.root}: {len(self.failures)} of {n} objects failed to read in this process, "
                                    f"more than max_failures={self.max_failures:g} of them; last: {e}") from None
        raise DataError(f"{self.root}: every object failed to read")

    def _item(self, i: int) -> dict:
        name = self.names[i].decode()
        obj_dir = os.path.join(self.root, name)
        s = split_seed(self.seed + 7919 * self.epoch, "train", i)
        g = rng(s)
        try:
            views = self.choose_views(list_views(obj_dir), g)
        except DataError as e:
            raise DataError(f"{obj_dir}: {e}") if not str(e).startswith(obj_dir) else e
        r = read_gobjaverse_object(obj_dir, views)
        full_depths = r.get("depths")
        full = (r["alphas"], r["c2w"], r["K"])
        if self.res is not None:
            r = _resize_views(r, self.res)
        bg = torch.tensor(g.uniform(0, 1, 3), dtype=torch.float32) \
            if isinstance(self.background, str) and self.background == "random" else background_rgb(self.background)
        item = dict(images=composite(r["images"], r["alphas"], bg), alphas=r["alphas"], c2w=r["c2w"], K=r["K"],
                    background=bg, view_ids=torch.tensor(views), object_id=name)
        for k in ("depths", "normals", "occupancy", "surface_points"):
            if r.get(k) is not None:
                item[k] = r[k]
        if self.occ_res and (item.get("occupancy") is None or item["occupancy"].shape[0] != self.occ_res):
            pts = os.path.join(self.occ_root, name, "pts.npy") if self.occ_root else None
            if pts is not None:
                try:
                    idx = np.load(pts)
                except Exception as e:
                    raise DataError(f"{pts}: unreadable occupancy indices ({e})") from None
                if idx.ndim != 2 or idx.shape[1] != 3:
                    raise DataError(f"{pts}: occupancy indices must be (N, 3), got {idx.shape}")
                item["occupancy"] = occupancy_from_indices(idx.astype(np.int64), self.occ_res)
            elif full_depths is not None:
                item["occupancy"] = occupancy_from_depth(full_depths, *full, self.occ_res)
            else:
                raise DataError(f"{obj_dir}: occ_res={self.occ_res} needs occupancy.npy, occ_root pts.npy or depth maps")
        return item
