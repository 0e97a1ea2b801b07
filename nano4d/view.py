"""Look at results in the browser: ``python -m nano4d.view PATH`` serves an interactive page (viser).

    python -m nano4d.view runs/geolrm/infer.ply            # one set of Gaussians
    python -m nano4d.view runs/geolrm                       # every .ply of a run, cameras, preview PNGs
    python -m nano4d.view runs/mim4d --port 8080            # MIM4D previews (rendered vs ground truth)

``PATH`` is a 3DGS ``.ply`` or a run directory. Shown:
- every ``*.ply`` as Gaussian splats (``nano4d.ply.load_ply``: activated means, quaternions, scales, opacities, DC
  colour; the covariance is R S S^T R^T);
- every ``*.cameras.npz`` (written with :func:`save_cameras`: the input views of a reconstruction, or a rig) as
  camera frustums in OpenCV axes with their images;
- every ``*.png`` of a run directory (previews: inputs | renders | targets | alpha | depth for GeoLRM, rendered
  depth/RGB next to ground truth and the warp-only baseline for MIM4D) as image panels in the side bar.

viser is an optional extra (``pip install 'nano4d[view]'``); nothing else in nano4d imports it.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time

import numpy as np
import torch
from PIL import Image

from nano4d.cameras import quat_to_rotmat, rotmat_to_quat
from nano4d.files import atomic_write
from nano4d.ply import load_ply


def save_cameras(path: str, images, c2w, K) -> str:
    """Write the cameras a viewer shows as frustums: ``images`` (V, 3, H, W) float in [0, 1] or (V, H, W, 3)
    uint8, ``c2w`` (V, 4, 4) OpenCV axes, ``K`` (V, 3, 3) in pixels -> ``path`` (``*.cameras.npz``)."""
    if not path.endswith(".cameras.npz"):
        raise ValueError(f"save_cameras: path must end with '.cameras.npz', got {path!r}")
    im = torch.as_tensor(images).detach().cpu()
    if im.dtype != torch.uint8:
        im = (im.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if im.shape[-1] != 3:
            im = im.permute(0, 2, 3, 1)
    c2w, K = (torch.as_tensor(x).detach().cpu().double().numpy() for x in (c2w, K))
    if im.ndim != 4 or im.shape[-1] != 3 or c2w.shape != (len(im), 4, 4) or K.shape != (len(im), 3, 3):
        raise ValueError(f"save_cameras: expected images (V, H, W, 3), c2w (V, 4, 4), K (V, 3, 3); got "
                         f"{tuple(im.shape)}, {c2w.shape}, {K.shape}")

    def write(f):
        np.savez_compressed(f, images=im.contiguous().numpy(), c2w=c2w, K=K)
    atomic_write(path, write)
    return path


def load_cameras(path: str) -> dict:
    """Read a ``*.cameras.npz`` written by :func:`save_cameras` -> {images (V, H, W, 3) uint8, c2w, K}."""
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in ("images", "c2w", "K")}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a cameras file written by nano4d.view.save_cameras ({e})") from e
    return out


def gaussian_arrays(g: dict) -> dict:
    """Activated Gaussians (``load_ply`` dict) -> the float32 numpy arrays viser takes: centers (M, 3),
    covariances (M, 3, 3) = R diag(s^2) R^T, rgbs (M, 3) clipped to [0, 1], opacities (M, 1)."""
    R = quat_to_rotmat(g["quats"].double())                               # (M, 3, 3)
    s2 = g["scales"].double() ** 2                                        # (M, 3)
    cov = (R * s2[:, None, :]) @ R.transpose(1, 2)
    return {"centers": g["means"].float().numpy(), "covariances": cov.float().numpy(),
            "rgbs": g["rgb"].clamp(0, 1).float().numpy(), "opacities": g["opacities"].reshape(-1, 1).float().numpy()}


def collect(path: str) -> dict:
    """What ``PATH`` holds for the viewer: {"ply": [...], "cameras": [...], "images": [...]} (sorted paths)."""
    if os.path.isfile(path):
        if not path.endswith(".ply"):
            raise ValueError(f"nano4d.view: {path} is neither a .ply file nor a run directory")
        stem = path[:-4]
        cams = [stem + ".cameras.npz"] if os.path.exists(stem + ".cameras.npz") else []
        return {"ply": [path], "cameras": cams, "images": []}
    if not os.path.isdir(path):
        raise ValueError(f"nano4d.view: {path} does not exist")
    found = {k: sorted(glob.glob(os.path.join(path, pat)))
             for k, pat in (("ply", "*.ply"), ("cameras", "*.cameras.npz"), ("images", "*.png"))}
    if not any(found.values()):
        raise ValueError(f"nano4d.view: {path} holds no .ply, .cameras.npz or .png file to show")
    return found


def build_scene(server, items: dict, frustum_scale: float = 0.15) -> dict:
    """Add everything in ``items`` (from :func:`collect`) to a running ``viser.ViserServer``. Returns counts and
    the bounding sphere (centre, radius) of what was added, for the initial camera."""
    pts, counts = [], {"gaussians": 0, "cameras": 0, "images": 0}
    for i, p in enumerate(items["ply"]):
        a = gaussian_arrays(load_ply(p))
        server.scene.add_gaussian_splats(f"/gaussians/{i}_{os.path.basename(p)}", **a)
        counts["gaussians"] += len(a["centers"])
        pts.append(a["centers"])
    for i, p in enumerate(items["cameras"]):
        cams = load_cameras(p)
        for v, (im, T, K) in enumerate(zip(cams["images"], cams["c2w"], cams["K"])):
            H, W = im.shape[:2]
            q = rotmat_to_quat(torch.from_numpy(T[:3, :3])).numpy()     # (w, x, y, z), OpenCV camera axes
            server.scene.add_camera_frustum(f"/cameras/{i}/{v}", fov=2 * math.atan2(H / 2, K[1, 1]), aspect=W / H,
                                            scale=frustum_scale, image=im, wxyz=q, position=T[:3, 3])
            pts.append(T[None, :3, 3])
            counts["cameras"] += 1
    for p in items["images"]:
        server.gui.add_image(np.asarray(Image.open(p).convert("RGB")), label=os.path.basename(p))
        counts["images"] += 1
    if pts:
        allp = np.concatenate(pts).astype(np.float64)
        allp = allp[np.isfinite(allp).all(1)]
        centre = np.median(allp, 0) if len(allp) else np.zeros(3)
        radius = float(np.percentile(np.linalg.norm(allp - centre, axis=1), 95)) if len(allp) else 1.0
    else:
        centre, radius = np.zeros(3), 1.0
    return {**counts, "centre": centre, "radius": max(radius, 1e-3)}


def serve(path: str, host: str = "127.0.0.1", port: int = 8080, up: str = "+z", seconds: float = 0.0) -> None:
    """Serve the viewer for ``path`` until interrupted (or for ``seconds`` if > 0)."""
    try:
        import viser
    except ImportError as e:  # optional extra
        raise SystemExit("nano4d.view needs viser: pip install 'nano4d[view]'") from e
    items = collect(path)
    server = viser.ViserServer(host=host, port=port, verbose=False)
    server.scene.set_up_direction(up)
    info = build_scene(server, items)
    c, r = info["centre"], info["radius"]
    upv = {"+z": (0, 0, 1), "-z": (0, 0, -1), "+y": (0, 1, 0), "-y": (0, -1, 0)}.get(up, (0, 0, 1))
    server.initial_camera.look_at = c
    server.initial_camera.position = c + 2.5 * r * (np.array([1.0, -1.0, 0.0]) / math.sqrt(2) + 0.5 * np.array(upv))
    print(f"nano4d.view: {info['gaussians']} Gaussians, {info['cameras']} cameras, {info['images']} images "
          f"-> http://{host}:{server.get_port()}", flush=True)
    t0 = time.time()
    try:
        while seconds <= 0 or time.time() - t0 < seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nano4d.view", allow_abbrev=False,
                                description="Serve an interactive browser view of a .ply or a run directory.")
    p.add_argument("path", help="a 3DGS .ply file or a run directory (its .ply, .cameras.npz and .png files)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to reach it from elsewhere)")
    p.add_argument("--port", type=int, default=8080, help="HTTP/websocket port")
    p.add_argument("--up", default="+z", choices=["+z", "-z", "+y", "-y"], help="world up axis of the scene")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    a = p.parse_args(argv)
    try:
        serve(a.path, a.host, a.port, a.up, a.seconds)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
