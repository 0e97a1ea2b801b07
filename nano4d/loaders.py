"""Loaders and writers for real multi-view formats (GeoLRM, MuM): the GObjaverse object layout and folders of
image sequences. Split out of ``nano4d.data``, which keeps the procedural objects and the shared helpers
(``DataError``, ``split_seed``, ``composite``...) that this module uses.

``write_gobjaverse_object`` / ``read_gobjaverse_object`` / ``GObjaverseDataset``: objects in the GObjaverse
layout (real GObjaverse, ``nano4d.meshes`` renders, or a ``ProceduralObjects`` cache); ``gobjaverse_camera``
converts its camera JSON to an OpenCV c2w + pixel K. ``ImageSequenceFolder``: unposed frames for MuM.
The nuScenes-style rig JSON (``write_rig``, ``read_rig``, ``RigDataset``) lives in ``nano4d.rig``.

Every loader raises ``DataError`` (a ``ValueError``) naming the offending file; nothing is skipped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nano4d.data import DataError, _background_rgb, _rng, composite, split_seed
from nano4d.utils import fov_to_K


# ============================================================================ GObjaverse layout
# <root>/<obj_id>/<view:05d>/<view:05d>.png     RGBA, 8-bit, straight alpha
# <root>/<obj_id>/<view:05d>/<view:05d>.json    {"x", "y", "z", "origin", "x_fov", "y_fov", ...}
# depth: <view>_nd.exr (GObjaverse: normal xyz + depth in the last channel; needs an EXR reader) or nano4d's
#        <view>_depth.npy (float32 (H, W) z-depth, 0 = background) or <view>_depth.png (uint16, times
#        json["depth_png_scale"] metres per unit); nano4d extras: <view>_normal.npy (H, W, 3) world normals,
#        <obj_id>/occupancy.npy (R, R, R) uint8 (Z, Y, X), <obj_id>/surface_points.npy (P, 3) float32.
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
    """GObjaverse camera JSON dict -> (c2w (4, 4) OpenCV, K (3, 3) pixels); see the layout notes above."""
    try:
        c2w = torch.eye(4, dtype=torch.float64)
        for j, key in enumerate(("x", "y", "z", "origin")):
            v = torch.tensor(meta[key], dtype=torch.float64)
            if v.shape != (3,):
                raise DataError(f"{path}: field {key!r} must be 3 numbers, got {meta[key]!r}")
            c2w[:3, j] = v
        if "K" in meta:
            K = torch.tensor(meta["K"], dtype=torch.float64)
            if K.shape != (3, 3):
                raise DataError(f"{path}: field 'K' must be 3x3")
        else:
            K = fov_to_K(float(meta["y_fov"]), width, height, fov_x=float(meta["x_fov"])).double()
    except KeyError as e:
        raise DataError(f"{path}: missing camera field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed camera field ({e})") from None
    if not torch.isfinite(c2w).all() or not torch.isfinite(K).all():
        raise DataError(f"{path}: non-finite camera values")
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
    from PIL import Image
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


def _read_view(vd: str, v: int):
    from PIL import Image
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
    try:
        with open(js) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{js}: bad JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{js}: expected a JSON object")
    H, W = rgba.shape[:2]
    if "width" in meta and (int(meta["width"]), int(meta["height"])) != (W, H):
        raise DataError(f"{png}: image is {W}x{H} but {js} says {meta['width']}x{meta['height']}")
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
            raise DataError(f"{js}: 'depth_png_scale' is required next to {base}_depth.png")
        with Image.open(base + "_depth.png") as im:
            depth = np.asarray(im).astype(np.float32) * float(meta["depth_png_scale"])
    elif os.path.isfile(base + "_nd.exr"):
        nd = _read_exr(base + "_nd.exr")
        if nd.ndim != 3 or nd.shape[-1] < 4:
            raise DataError(f"{base}_nd.exr: expected 4 channels (normal xyz, depth), got shape {nd.shape}")
        depth = nd[..., 3]
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


class GObjaverseDataset(Dataset):
    """Objects stored in the GObjaverse layout (real GObjaverse, ``nano4d.meshes`` renders, or a
    ``ProceduralObjects`` cache), returning the same keys as ``ProceduralObjects`` where available:
    images (V, 3, H, W) composited on ``background``, alphas, c2w, K, background, view_ids (V,) int64, and
    depths / normals / occupancy / surface_points when the files exist.

    ``object_ids``: list of object folders relative to ``root`` (e.g. GObjaverse's "<shard>/<id>") or a JSON
    file holding such a list; default: every non-hidden sub-folder of ``root`` (each must hold view folders).
    View choice (``num_views`` V): objects with >= 24 views are read as a 24-view orbit (views 0..23, as in
    GObjaverse and nano4d.meshes): 4 orbit views 90 deg apart from a random start, then random other views;
    smaller objects: the first ``ring_views`` views (ProceduralObjects' ring), then random others.
    ``random_views=False`` takes views 0..V-1. Randomness is deterministic in (seed, index, epoch);
    call ``set_epoch`` to vary it. ``res``: resize to (H, W) (int = square) with K scaled."""

    def __init__(self, root: str, num_views: int = 8, res=None, background="white", seed: int = 0,
                 object_ids=None, ring_views: int = 4, random_views: bool = True):
        if not os.path.isdir(root):
            raise DataError(f"{root}: GObjaverse root folder not found")
        self.root, self.num_views, self.seed, self.ring_views, self.random_views = root, num_views, seed, ring_views, random_views
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.background, self.epoch = background, 0
        if not (isinstance(background, str) and background == "random"):
            _background_rgb(background)
        if isinstance(object_ids, str):
            try:
                with open(object_ids) as f:
                    object_ids = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{object_ids}: cannot read the object list ({e})") from None
            if not isinstance(object_ids, list):
                raise DataError("object list JSON must be a list of folder names")
        if object_ids is None:
            object_ids = sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
            for n in object_ids:
                if not any(v.isdigit() for v in os.listdir(os.path.join(root, n))):
                    raise DataError(f"{os.path.join(root, n)}: not an object folder (no <view:05d>/ inside); "
                                    "pass object_ids to choose the objects explicitly")
        if not object_ids:
            raise DataError(f"{root}: no objects found")
        self.object_ids = [str(o) for o in object_ids]

    def __len__(self) -> int:
        return len(self.object_ids)

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
        obj_dir = os.path.join(self.root, self.object_ids[i])
        s = split_seed(self.seed + 7919 * self.epoch, "train", i)
        rng = _rng(s)
        try:
            views = self.choose_views(list_views(obj_dir), rng)
        except DataError as e:
            raise DataError(f"{obj_dir}: {e}") if not str(e).startswith(obj_dir) else e
        r = read_gobjaverse_object(obj_dir, views)
        if self.res is not None:
            r = _resize_views(r, self.res)
        bg = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32) \
            if isinstance(self.background, str) and self.background == "random" else _background_rgb(self.background)
        item = dict(images=composite(r["images"], r["alphas"], bg), alphas=r["alphas"], c2w=r["c2w"], K=r["K"],
                    background=bg, view_ids=torch.tensor(views))
        for k in ("depths", "normals", "occupancy", "surface_points"):
            if r.get(k) is not None:
                item[k] = r[k]
        return item


# ============================================================================ image-sequence folders

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _load_rgb(path: str, res) -> torch.Tensor:
    """Image file -> (3, H, W) float in [0, 1], resized so it covers res (H, W) and centre-cropped."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if res is not None:
                H, W = res
                s = max(H / im.height, W / im.width)
                w, h = max(W, round(im.width * s)), max(H, round(im.height * s))
                im = im.resize((w, h), Image.BICUBIC)
                left, top = (w - W) // 2, (h - H) // 2
                im = im.crop((left, top, left + W, top + H))
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255


class ImageSequenceFolder(Dataset):
    """Unposed multi-view data for MuM: ``<root>/<sequence>/*.{png,jpg,jpeg}`` (video frames or photos of
    one scene; sorted by file name). Item i: dict(images (V, 3, H, W) in [0, 1], sequence (str)), V drawn
    uniformly in ``views`` = (min, max) (capped by the sequence length), frames drawn without replacement
    and returned in file order. Index with ``(i, V)`` to force V (e.g. one V per batch, as MuM's dynamic
    batches do). Images are resized to cover ``res`` (int = square, None = keep; then all images of a
    sequence must share one size) and centre-cropped. Deterministic in (seed, index, epoch); ``set_epoch``
    varies it. Every sequence must hold >= views[0] images; anything unreadable raises DataError."""

    def __init__(self, root: str, views=(2, 12), res=224, seed: int = 0, exts=IMAGE_EXTS):
        if not os.path.isdir(root):
            raise DataError(f"{root}: image-sequence root folder not found")
        lo, hi = views
        if not 1 <= lo <= hi:
            raise ValueError(f"views must be (min, max) with 1 <= min <= max, got {views}")
        self.root, self.views, self.seed, self.epoch = root, (int(lo), int(hi)), seed, 0
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.sequences, self.frames = [], []
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if name.startswith(".") or not os.path.isdir(d):
                continue
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(tuple(exts)))
            if len(files) < lo:
                raise DataError(f"{d}: {len(files)} images, fewer than the minimum of {lo} views per sequence")
            self.sequences.append(name)
            self.frames.append([os.path.join(d, f) for f in files])
        if not self.sequences:
            raise DataError(f"{root}: no sequence folders with images ({', '.join(exts)})")

    def __len__(self) -> int:
        return len(self.sequences)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index) -> dict:
        i, V = index if isinstance(index, tuple) else (index, None)
        files = self.frames[i]
        rng = _rng(split_seed(self.seed + 7919 * self.epoch, "train", i))
        if V is None:
            V = int(rng.integers(self.views[0], self.views[1] + 1))
        V = min(V, len(files))
        pick = sorted(rng.choice(len(files), size=V, replace=False).tolist())
        imgs = [_load_rgb(files[j], self.res) for j in pick]
        for j, im in zip(pick, imgs):
            if im.shape != imgs[0].shape:
                raise DataError(f"{files[j]}: size {im.shape[2]}x{im.shape[1]} differs from {files[pick[0]]} "
                                f"({imgs[0].shape[2]}x{imgs[0].shape[1]}); pass res= to resize")
        return dict(images=torch.stack(imgs), sequence=self.sequences[i])
