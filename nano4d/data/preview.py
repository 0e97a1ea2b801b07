"""Preview PNGs of the procedural data: ``python -m nano4d.data.preview --out runs/preview`` writes
objects.png (rows: objects; views 0-3 are the ring), objects_geometry.png (alpha, depth, normals of the
first object) and driving.png (rows: frames; columns: the 6 cameras; then depths and BEV labels with LiDAR).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from nano4d.data.driving import ProceduralDriving
from nano4d.data.objects import ProceduralObjects
from nano4d.files import colorize, save_image_grid


_BEV_COLORS = torch.tensor([[0.85, 0.85, 0.85], [0.35, 0.35, 0.38], [0.9, 0.2, 0.15], [0.3, 0.45, 0.8]])


def _colorize_depth(d: torch.Tensor, near: float) -> torch.Tensor:
    """(N, 1, H, W) depth -> (N, 3, H, W) disparity near / depth in turbo colours (clamped to 1), black where 0."""
    return colorize(torch.where(d > 0, near / d.clamp_min(1e-6), float("nan")).clamp(max=1), 0.0, 1.0)


def bev_image(bev: torch.Tensor, lidar: torch.Tensor | None = None, mask=None, bev_range: float = 51.2) -> torch.Tensor:
    """(3, Hb, Wb) picture of BEV labels (forward = up, left = left), LiDAR points overlaid in white."""
    img = _BEV_COLORS[bev].permute(2, 0, 1).clone()                 # (3, Y, X)
    if lidar is not None:
        Hb, Wb = bev.shape
        p = lidar[mask] if mask is not None else lidar
        ix = ((p[:, 0] + bev_range) / (2 * bev_range) * Wb).long()
        iy = ((p[:, 1] + bev_range) / (2 * bev_range) * Hb).long()
        ok = (ix >= 0) & (ix < Wb) & (iy >= 0) & (iy < Hb) & (p[:, 2] > 0.3)
        img[:, iy[ok], ix[ok]] = 1.0
    return img.flip(1).flip(2).transpose(1, 2).flip(2)              # x up, y left


def preview(out_dir: str, num_objects: int = 6, num_views: int = 8, res: int = 96, seed: int = 0,
            driving_res=(96, 176)) -> list[str]:
    """Write objects.png (rows: objects; views 0-3 are the ring) plus objects_geometry.png (alpha, depth,
    normals of the first object) and driving.png (rows: frames; columns: the 6 cameras; then depths and
    BEV labels with LiDAR). Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    ds = ProceduralObjects(num_objects, num_views, res, seed=seed)
    t0 = time.time()
    items = [ds[i] for i in range(num_objects)]
    t_obj = (time.time() - t0) / num_objects
    paths = [save_image_grid(os.path.join(out_dir, "objects.png"), [it["images"] for it in items])]
    it = items[0]
    paths.append(save_image_grid(os.path.join(out_dir, "objects_geometry.png"), [
        it["images"], it["alphas"], _colorize_depth(it["depths"], 1.4), it["normals"] * 0.5 + 0.5 * it["alphas"]],
        labels=["rgb", "alpha", "disparity", "normals"]))
    dd = ProceduralDriving(4, res=driving_res, seed=seed)
    t0 = time.time()
    s = dd[0]
    t_drv = time.time() - t0
    rows = [s["images"][k] for k in range(s["images"].shape[0])]
    rows += [_colorize_depth(s["depths"][k], 3.0) for k in range(s["images"].shape[0])]
    rows.append(torch.stack([F.interpolate(bev_image(s["bev"][k], s["lidar"][k], s["lidar_mask"][k])[None],
                                           size=driving_res, mode="nearest")[0] for k in range(s["bev"].shape[0])]))
    T = s["images"].shape[0]
    paths.append(save_image_grid(os.path.join(out_dir, "driving.png"), rows,
                                 labels=[f"rgb t{k}" for k in range(T)] + [f"disp t{k}" for k in range(T)] + ["BEV"]))
    print(f"objects: {t_obj:.2f} s/sample ({num_views} views at {res}^2); driving: {t_drv:.2f} s/sample "
          f"(6 cams x {s['images'].shape[0]} frames at {driving_res[0]}x{driving_res[1]}); wrote {', '.join(paths)}")
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nano4d.data.preview", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/preview", help="output folder for the PNGs")
    ap.add_argument("--objects", type=int, default=6, help="number of procedural objects (rows of objects.png)")
    ap.add_argument("--views", type=int, default=8, help="views per object")
    ap.add_argument("--res", type=int, default=96, help="object image size (pixels, square)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # many small ops: one thread is fastest, and much faster on a busy machine
    preview(a.out, a.objects, a.views, a.res, a.seed)


if __name__ == "__main__":
    main()
