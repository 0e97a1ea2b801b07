"""nuScenes-style rig JSON for multi-camera driving data (MIM4D): ``write_rig`` stores a driving sample (a
``ProceduralDriving`` item or any dict with its keys) as PNG / .npy files plus one JSON, ``read_rig`` parses and
validates such a JSON, ``load_rig_frames`` loads frames of it back into the ``ProceduralDriving`` keys, and
``RigDataset`` serves windows of consecutive frames from one or more rig files. Malformed files raise
``nano4d.data.DataError`` naming the file. Split out of ``nano4d.driving`` (which uses it for its disk cache).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nano4d.data import DataError
from nano4d.driving import LIDAR_HEIGHT
from nano4d.utils import invert_pose, pose_from_quat_trans, rotmat_to_quat


# ============================================================================ rig JSON (nuScenes-style)
# {"format": "nano4d-rig", "version": 1,
#  "cameras": [{"name", "width", "height", "cam_intrinsic": 3x3 pixels,
#               "sensor2ego_rotation": [w, x, y, z], "sensor2ego_translation": [x, y, z]}, ...],
#  "lidar": {"sensor2ego_rotation", "sensor2ego_translation"}                       (optional)
#  "frames": [{"timestamp": microseconds (int), "ego2global_rotation", "ego2global_translation",
#              "cams": {name: {"data_path": image, "depth_path": float32 .npy z-depth (optional)}},
#              "lidar_path": float32 .npy (N, >=3) points in the LiDAR frame (optional),
#              "bev_path": uint8 .npy (Hb, Wb) BEV labels (nano4d extra, optional)}, ...]}
# Paths are relative to the JSON's folder. Field names follow nuScenes / mmdet3d info files; camera axes
# are OpenCV (as nuScenes' sensor frames); rotations are (w, x, y, z) quaternions.

RIG_FORMAT = "nano4d-rig"


def write_rig(root: str, sample: dict, name: str = "rig.json", lidar2ego=None) -> str:
    """Write a driving sample (a ``ProceduralDriving`` item or any dict with images (T, C, 3, H, W), K (C, 3, 3),
    cam2ego (C, 4, 4), ego2world (T, 4, 4), cam_names; optional depths (T, C, 1, H, W), lidar (T, P, 3) in the
    ego frame with lidar_mask (T, P), timestamps (T,) seconds) as PNGs / .npy files + a rig JSON under
    ``root``. LiDAR points are stored in the LiDAR frame (``lidar2ego`` 4x4, default a sensor at
    (0, 0, LIDAR_HEIGHT) with ego axes). Returns the JSON path."""
    from PIL import Image
    imgs = sample["images"]
    T, C, _, H, W = imgs.shape
    names = list(sample["cam_names"])
    if len(names) != C:
        raise ValueError(f"{len(names)} camera names for {C} cameras")
    os.makedirs(root, exist_ok=True)
    cams = []
    for c in range(C):
        cams.append({"name": names[c], "width": int(W), "height": int(H), "cam_intrinsic": sample["K"][c].tolist(),
                     "sensor2ego_rotation": rotmat_to_quat(sample["cam2ego"][c, :3, :3].double()).tolist(),
                     "sensor2ego_translation": sample["cam2ego"][c, :3, 3].tolist()})
    rig = {"format": RIG_FORMAT, "version": 1, "cameras": cams, "frames": []}
    has_lidar = sample.get("lidar") is not None
    if has_lidar:
        if lidar2ego is None:
            lidar2ego = torch.eye(4)
            lidar2ego[2, 3] = LIDAR_HEIGHT
        rig["lidar"] = {"sensor2ego_rotation": rotmat_to_quat(lidar2ego[:3, :3].double()).tolist(),
                        "sensor2ego_translation": lidar2ego[:3, 3].tolist()}
        ego2lidar = invert_pose(lidar2ego.float())
    ts = sample.get("timestamps")
    for k in range(T):
        fd = f"frames/{k:04d}"
        os.makedirs(os.path.join(root, fd), exist_ok=True)
        fr = {"timestamp": int(round(float(ts[k]) * 1e6)) if ts is not None else k * 500000,
              "ego2global_rotation": rotmat_to_quat(sample["ego2world"][k, :3, :3].double()).tolist(),
              "ego2global_translation": sample["ego2world"][k, :3, 3].tolist(), "cams": {}}
        for c in range(C):
            rel = f"{fd}/{names[c]}.png"
            arr = (imgs[k, c].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(os.path.join(root, rel))
            fr["cams"][names[c]] = {"data_path": rel}
            if sample.get("depths") is not None:
                drel = f"{fd}/{names[c]}_depth.npy"
                np.save(os.path.join(root, drel), sample["depths"][k, c, 0].float().numpy())
                fr["cams"][names[c]]["depth_path"] = drel
        if has_lidar:
            pts = sample["lidar"][k]
            if sample.get("lidar_mask") is not None:
                pts = pts[sample["lidar_mask"][k]]
            pts = pts @ ego2lidar[:3, :3].T + ego2lidar[:3, 3]
            lrel = f"{fd}/lidar.npy"
            np.save(os.path.join(root, lrel), pts.float().numpy())
            fr["lidar_path"] = lrel
        if sample.get("bev") is not None:
            brel = f"{fd}/bev.npy"
            np.save(os.path.join(root, brel), sample["bev"][k].to(torch.uint8).numpy())
            fr["bev_path"] = brel
        rig["frames"].append(fr)
    path = os.path.join(root, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rig, f, indent=1)
    os.replace(tmp, path)
    return path


def _req(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{where}: missing field {key!r}")
    return d[key]


def _pose(d: dict, prefix: str, where: str) -> torch.Tensor:
    q = torch.tensor(_req(d, prefix + "_rotation", where), dtype=torch.float64)
    t = torch.tensor(_req(d, prefix + "_translation", where), dtype=torch.float64)
    if q.shape != (4,) or t.shape != (3,):
        raise DataError(f"{where}: {prefix}_rotation must be 4 numbers (w, x, y, z) and {prefix}_translation 3")
    if not (torch.isfinite(q).all() and torch.isfinite(t).all()) or q.norm() < 1e-8:
        raise DataError(f"{where}: {prefix} pose is degenerate or non-finite")
    return pose_from_quat_trans(q, t).float()


def read_rig(path: str) -> dict:
    """Parse and validate a rig JSON -> dict(cam_names, width, height, K (C, 3, 3), cam2ego (C, 4, 4),
    ego2world (F, 4, 4), timestamps (F,) seconds, image_paths [F][C], depth_paths [F][C] or None,
    lidar_paths [F] or None, lidar2ego (4, 4) or None). Every referenced file must exist."""
    try:
        with open(path) as f:
            rig = json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot open rig JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: bad JSON ({e})") from None
    if not isinstance(rig, dict) or rig.get("format") != RIG_FORMAT:
        raise DataError(f"{path}: not a {RIG_FORMAT} file (field 'format' must be {RIG_FORMAT!r})")
    base = os.path.dirname(os.path.abspath(path))
    cams = _req(rig, "cameras", path)
    if not isinstance(cams, list) or not cams:
        raise DataError(f"{path}: 'cameras' must be a non-empty list")
    names, Ks, c2e, sizes = [], [], [], set()
    for j, c in enumerate(cams):
        where = f"{path}: cameras[{j}]"
        names.append(str(_req(c, "name", where)))
        K = torch.tensor(_req(c, "cam_intrinsic", where), dtype=torch.float32)
        if K.shape != (3, 3) or not torch.isfinite(K).all():
            raise DataError(f"{where}: cam_intrinsic must be a finite 3x3 matrix")
        Ks.append(K)
        c2e.append(_pose(c, "sensor2ego", where))
        sizes.add((int(_req(c, "height", where)), int(_req(c, "width", where))))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate camera names {names}")
    if len(sizes) != 1:
        raise DataError(f"{path}: cameras have different image sizes {sorted(sizes)}; nano4d needs one size")
    frames = _req(rig, "frames", path)
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{path}: 'frames' must be a non-empty list")
    lidar2ego = _pose(rig["lidar"], "sensor2ego", f"{path}: lidar") if "lidar" in rig else None
    e2w, ts, img_p, dep_p, lid_p, bev_p = [], [], [], [], [], []

    def fpath(rel, where):
        p = os.path.join(base, str(rel))
        if not os.path.isfile(p):
            raise DataError(f"{p}: missing (referenced by {where})")
        return p
    for k, fr in enumerate(frames):
        where = f"{path}: frames[{k}]"
        e2w.append(_pose(fr, "ego2global", where))
        ts.append(float(_req(fr, "timestamp", where)) * 1e-6)
        cd = _req(fr, "cams", where)
        row, drow = [], []
        for n in names:
            entry = _req(cd, n, f"{where}.cams")
            row.append(fpath(_req(entry, "data_path", f"{where}.cams.{n}"), f"{where}.cams.{n}"))
            drow.append(fpath(entry["depth_path"], f"{where}.cams.{n}") if "depth_path" in entry else None)
        img_p.append(row)
        dep_p.append(drow)
        lid_p.append(fpath(fr["lidar_path"], where) if "lidar_path" in fr else None)
        bev_p.append(fpath(fr["bev_path"], where) if "bev_path" in fr else None)
        if k and ts[-1] <= ts[-2]:
            raise DataError(f"{where}: timestamps must increase")
    has_d = [d is not None for row in dep_p for d in row]
    if any(has_d) and not all(has_d):
        raise DataError(f"{path}: depth_path given for some cameras/frames but not all")
    if any(p is not None for p in lid_p) and not all(p is not None for p in lid_p):
        raise DataError(f"{path}: lidar_path given for some frames but not all")
    if lid_p[0] is not None and lidar2ego is None:
        raise DataError(f"{path}: frames have lidar_path but the 'lidar' calibration is missing")
    H, W = sizes.pop()
    return dict(cam_names=names, height=H, width=W, K=torch.stack(Ks), cam2ego=torch.stack(c2e),
                ego2world=torch.stack(e2w), timestamps=torch.tensor(ts, dtype=torch.float64),
                image_paths=img_p, depth_paths=dep_p if all(has_d) else None,
                lidar_paths=lid_p if lid_p[0] is not None else None, lidar2ego=lidar2ego,
                bev_paths=bev_p if all(b is not None for b in bev_p) else None)


def load_rig_frames(rig: dict, frame_ids, res=None, max_points: int | None = None, seed: int = 0) -> dict:
    """Load frames of a parsed rig -> the ``ProceduralDriving`` keys (images, K, cam2ego, ego2world,
    timestamps relative to the first loaded frame, cam_names; depths and bev if present; lidar (T, P, 3) ego-frame
    points + lidar_mask if present, padded to the largest scan or to ``max_points`` (longer scans are
    subsampled, deterministically in ``seed``)). ``res`` (H, W) resizes images (area), depths (nearest), K."""
    from PIL import Image
    H, W = rig["height"], rig["width"]
    Ho, Wo = (H, W) if res is None else ((res, res) if isinstance(res, int) else tuple(res))
    imgs, deps, scans = [], [], []
    for k in frame_ids:
        row, drow = [], []
        for c, p in enumerate(rig["image_paths"][k]):
            try:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise DataError(f"{p}: unreadable image ({e})") from None
            if a.shape[:2] != (H, W):
                raise DataError(f"{p}: image is {a.shape[1]}x{a.shape[0]} but the rig says {W}x{H}")
            row.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255)
            if rig["depth_paths"] is not None:
                dp = rig["depth_paths"][k][c]
                try:
                    dm = np.load(dp)
                except Exception as e:
                    raise DataError(f"{dp}: unreadable depth ({e})") from None
                if dm.shape != (H, W):
                    raise DataError(f"{dp}: depth shape {dm.shape}, expected ({H}, {W})")
                drow.append(torch.from_numpy(np.asarray(dm, dtype=np.float32))[None])
        imgs.append(torch.stack(row))
        if drow:
            deps.append(torch.stack(drow))
        if rig["lidar_paths"] is not None:
            lp = rig["lidar_paths"][k]
            try:
                pts = np.load(lp)
            except Exception as e:
                raise DataError(f"{lp}: unreadable LiDAR points ({e})") from None
            if pts.ndim != 2 or pts.shape[1] < 3:
                raise DataError(f"{lp}: LiDAR points must be (N, >=3), got {pts.shape}")
            p = torch.from_numpy(np.asarray(pts[:, :3], dtype=np.float32))
            L = rig["lidar2ego"]
            scans.append(p @ L[:3, :3].T + L[:3, 3])
    if rig.get("bev_paths") is not None:
        bevs = []
        for k in frame_ids:
            bp = rig["bev_paths"][k]
            try:
                bevs.append(torch.from_numpy(np.load(bp).astype(np.int64)))
            except Exception as e:
                raise DataError(f"{bp}: unreadable BEV labels ({e})") from None
    out = dict(images=torch.stack(imgs), K=rig["K"].clone(), cam2ego=rig["cam2ego"], cam_names=list(rig["cam_names"]),
               ego2world=rig["ego2world"][list(frame_ids)],
               timestamps=(rig["timestamps"][list(frame_ids)] - rig["timestamps"][frame_ids[0]]).float())
    if deps:
        out["depths"] = torch.stack(deps)
    if rig.get("bev_paths") is not None:
        out["bev"] = torch.stack(bevs)
    if (Ho, Wo) != (H, W):
        T, C = out["images"].shape[:2]
        out["images"] = F.interpolate(out["images"].flatten(0, 1), size=(Ho, Wo), mode="area").view(T, C, 3, Ho, Wo)
        if deps:
            out["depths"] = F.interpolate(out["depths"].flatten(0, 1), size=(Ho, Wo), mode="nearest").view(T, C, 1, Ho, Wo)
        out["K"][:, 0] *= Wo / W
        out["K"][:, 1] *= Ho / H
    if scans:
        P = max_points or max(s.shape[0] for s in scans)
        g = torch.Generator().manual_seed(seed)
        lidar, mask = torch.zeros(len(scans), P, 3), torch.zeros(len(scans), P, dtype=torch.bool)
        for k, s in enumerate(scans):
            if s.shape[0] > P:
                s = s[torch.randperm(s.shape[0], generator=g)[:P]]
            lidar[k, :s.shape[0]], mask[k, :s.shape[0]] = s, True
        out["lidar"], out["lidar_mask"] = lidar, mask
    return out


class RigDataset(Dataset):
    """Windows of ``num_frames`` consecutive frames (step ``stride`` between windows) from one or more rig
    JSON files (a path, a list of paths, or a folder searched recursively for ``*.json`` rig files).
    Items carry the ``ProceduralDriving`` keys that the files provide (``bev`` only for nano4d-written rigs)."""

    def __init__(self, paths, num_frames: int = 3, stride: int = 1, res=None, max_points: int | None = None):
        if isinstance(paths, str) and os.path.isdir(paths):
            found = []
            for dp, _, fs in sorted(os.walk(paths)):
                found += [os.path.join(dp, f) for f in sorted(fs) if f.endswith(".json")]
            paths = found
            if not paths:
                raise DataError("no rig JSON files found in the folder")
        elif isinstance(paths, str):
            paths = [paths]
        self.rigs = [read_rig(p) for p in paths]
        self.paths, self.num_frames, self.res, self.max_points = list(paths), num_frames, res, max_points
        self.windows = []
        for r, (p, rig) in enumerate(zip(self.paths, self.rigs)):
            n = len(rig["image_paths"])
            if n < num_frames:
                raise DataError(f"{p}: {n} frames, fewer than num_frames={num_frames}")
            self.windows += [(r, s) for s in range(0, n - num_frames + 1, stride)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        r, s = self.windows[i]
        return load_rig_frames(self.rigs[r], list(range(s, s + self.num_frames)), self.res, self.max_points, seed=i)
