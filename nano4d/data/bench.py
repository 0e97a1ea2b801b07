"""Data-loading throughput: items/s of one worker process for each dataset, to size ``--num_workers``.

    python -m nano4d.data.bench [--items 8] [--tiny] [--gobjaverse ROOT] [--nuscenes ROOT] [--sequences ROOT]

Without a ROOT a small tree is written to a temporary folder from procedural data (same layout, small
images), so the numbers show the reader's cost at those sizes; pass a real root to measure real files. Each row
reads ``--items`` items in this process (one thread, like a DataLoader worker) after one warm-up item. A
training step needing B items every t seconds needs about B / (t x items/s) workers.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from nano4d.data.driving import ProceduralDriving
from nano4d.data.gobjaverse import GObjaverseDataset, write_gobjaverse_object
from nano4d.data.nuscenes import NuScenesDataset, write_nuscenes
from nano4d.data.objects import ProceduralObjects
from nano4d.data.rig import RigDataset, write_rig
from nano4d.data.sequences import ImageSequenceFolder
from nano4d.files import save_image_grid


def _shape(item) -> str:
    return "x".join(str(s) for s in item["images"].shape)


def measure(ds, n: int, index=lambda i: i) -> tuple[float, str]:
    """(items/s, image shape) of reading ``n`` items after one warm-up item, in this process."""
    shape = _shape(ds[index(0)])
    t0 = time.perf_counter()
    for k in range(n):
        ds[index((k + 1) % len(ds))]
    return n / (time.perf_counter() - t0), shape


def build(tmp: str, tiny: bool) -> dict:
    """Small trees of every on-disk format under ``tmp``, from procedural data."""
    res, dres = (32, (24, 40)) if tiny else (128, (96, 176))
    objs = ProceduralObjects(4, num_views=8 if tiny else 24, res=res, occ_res=0, num_surface_points=0)
    for i in range(len(objs)):
        it = objs[i]
        rgba = torch.cat([it["images"], it["alphas"]], 1).permute(0, 2, 3, 1)
        write_gobjaverse_object(os.path.join(tmp, "gobjaverse"), f"{i:05d}", rgba, it["c2w"], it["K"],
                                depth=it["depths"][:, 0])
        for v in range(len(rgba)):
            save_image_grid(os.path.join(tmp, "sequences", f"seq{i}", f"{v:03d}.png"), [it["images"][v:v + 1]], pad=0)
    drive = ProceduralDriving(2, num_frames=4, res=dres, lidar_azimuths=64 if tiny else 256, frame_dt=1 / 12)
    samples = [drive[0], drive[1]]
    write_rig(os.path.join(tmp, "rig"), samples[0])
    write_nuscenes(os.path.join(tmp, "nuscenes"), samples, key_every=1)
    return dict(gobjaverse=os.path.join(tmp, "gobjaverse"), sequences=os.path.join(tmp, "sequences"),
                rig=os.path.join(tmp, "rig"), nuscenes=os.path.join(tmp, "nuscenes"), dres=dres, res=res)


def run(items: int = 8, tiny: bool = False, gobjaverse=None, nuscenes=None, sequences=None, out=print) -> list:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = build(tmp, tiny)
        res, dres = t["res"], t["dres"]
        cases = [
            ("ProceduralObjects", ProceduralObjects(1000, num_views=8, res=res, occ_res=32, num_surface_points=0), None),
            ("ProceduralDriving", ProceduralDriving(1000, num_frames=3, res=dres, lidar_azimuths=64 if tiny else 256), None),
            ("GObjaverseDataset" + ("" if gobjaverse else " (written)"),
             GObjaverseDataset(gobjaverse or t["gobjaverse"], num_views=8, res=res), None),
            ("ImageSequenceFolder" + ("" if sequences else " (written)"),
             ImageSequenceFolder(sequences or t["sequences"], views=(2, 8), res=res), lambda i: (i, 8)),
            ("RigDataset (written)", RigDataset(t["rig"], num_frames=3), None),
            ("NuScenesDataset" + ("" if nuscenes else " (written)"),
             NuScenesDataset(nuscenes or t["nuscenes"], split="train" if nuscenes else "all", num_frames=3), None),
        ]
        out(f"{'dataset':34s} {'images per item':>18s} {'items/s':>9s} {'s/item':>8s}")
        for name, ds, index in cases:
            n = items if "Procedural" not in name else max(1, items // 4)
            ips, shape = measure(ds, n, index or (lambda i: i))
            rows.append((name, shape, ips))
            out(f"{name:34s} {shape:>18s} {ips:9.2f} {1 / ips:8.3f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nano4d.data.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8, help="items read per dataset (procedural ones read a quarter)")
    ap.add_argument("--tiny", action="store_true", help="small images (a quick smoke run)")
    ap.add_argument("--gobjaverse", default=None, help="a GObjaverse-layout root to measure instead of a written one")
    ap.add_argument("--nuscenes", default=None, help="a nuScenes root (v1.0-mini) to measure instead of a written one")
    ap.add_argument("--sequences", default=None, help="an image-sequence root to measure instead of a written one")
    a = ap.parse_args(argv)
    run(a.items, a.tiny, a.gobjaverse, a.nuscenes, a.sequences)


if __name__ == "__main__":
    main()
