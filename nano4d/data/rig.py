"""nuScenes-style rig JSON for multi-camera driving data (MIM4D), and LiDAR -> per-camera depth maps.

``write_rig`` stores a driving sample (a ``ProceduralDriving`` item or any dict with its keys) as PNG / .npy
files plus one JSON, ``read_rig`` parses and validates such a JSON, ``load_rig_frames`` loads frames of it
back into the ``ProceduralDriving`` keys, and ``RigDataset`` serves windows of consecutive frames from one or
more rig files. Malformed files raise ``DataError`` naming the file and the field. ``lidar_to_depths``
projects ego-frame LiDAR points into sparse z-depth maps of each camera (MIM4D's depth supervision).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from PIL import Image

from nano4d.cameras import invert_pose, pose_from_quat_trans, project_points, rotmat_to_quat
from nano4d.data.common import DataError, as_array, as_float, as_int, field, read_json
from nano4d.files import atomic_write


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
    ego frame with lidar_mask (T, P) and lidar2ego (4, 4), timestamps (T,) seconds) as PNGs / .npy files + a
    rig JSON under ``root``. LiDAR points are stored in the LiDAR frame (``lidar2ego`` 4x4: the argument, else
    the sample's). Returns the JSON path."""
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
        lidar2ego = sample.get("lidar2ego") if lidar2ego is None else lidar2ego
        if lidar2ego is None:
            raise ValueError("the sample has LiDAR points but no lidar2ego (pass lidar2ego= or add the key)")
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
    return atomic_write(path, json.dumps(rig, indent=1).encode())


def _pose(d: dict, prefix: str, where: str) -> torch.Tensor:
    q = as_array(field(d, prefix + "_rotation", where), (4,), where, prefix + "_rotation")
    t = as_array(field(d, prefix + "_translation", where), (3,), where, prefix + "_translation")
    if q.norm() < 1e-8:
        raise DataError(f"{where}: field {prefix + '_rotation'!r} is degenerate (zero quaternion)")
    return pose_from_quat_trans(q, t).float()


def _path(d: dict, key: str, where: str) -> str:
    v = field(d, key, where)
    if not isinstance(v, str) or not v:
        raise DataError(f"{where}: field {key!r} must be a relative file path, got {v!r}")
    return v


def read_rig(path: str) -> dict:
    """Parse and validate a rig JSON -> dict(cam_names, width, height, K (C, 3, 3), cam2ego (C, 4, 4),
    ego2world (F, 4, 4), timestamps (F,) seconds, image_paths [F][C], depth_paths [F][C] or None,
    lidar_paths [F] or None, lidar2ego (4, 4) or None). Every referenced file must exist. Errors name the
    file and the field (e.g. "rig.json: cameras[2]: field 'height' must be an integer, got 'tall'")."""
    rig = read_json(path, "rig JSON")
    if not isinstance(rig, dict) or rig.get("format") != RIG_FORMAT:
        raise DataError(f"{path}: not a {RIG_FORMAT} file (field 'format' must be {RIG_FORMAT!r})")
    base = os.path.dirname(os.path.abspath(path))
    cams = field(rig, "cameras", path)
    if not isinstance(cams, list) or not cams:
        raise DataError(f"{path}: field 'cameras' must be a non-empty list")
    names, Ks, c2e, sizes = [], [], [], set()
    for j, c in enumerate(cams):
        where = f"{path}: cameras[{j}]"
        name = field(c, "name", where)
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field 'name' must be a non-empty string, got {name!r}")
        names.append(name)
        Ks.append(as_array(field(c, "cam_intrinsic", where), (3, 3), where, "cam_intrinsic").float())
        c2e.append(_pose(c, "sensor2ego", where))
        sizes.add((as_int(field(c, "height", where), where, "height"), as_int(field(c, "width", where), where, "width")))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate camera names {names}")
    if len(sizes) != 1:
        raise DataError(f"{path}: cameras have different image sizes {sorted(sizes)}; nano4d needs one size")
    frames = field(rig, "frames", path)
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{path}: field 'frames' must be a non-empty list")
    lidar2ego = _pose(rig["lidar"], "sensor2ego", f"{path}: lidar") if "lidar" in rig else None
    e2w, ts, img_p, dep_p, lid_p, bev_p = [], [], [], [], [], []

    def fpath(rel, where):
        p = os.path.join(base, rel)
        if not os.path.isfile(p):
            raise DataError(f"{p}: missing (referenced by {where})")
        return p
    for k, fr in enumerate(frames):
        where = f"{path}: frames[{k}]"
        e2w.append(_pose(fr, "ego2global", where))
        ts.append(as_float(field(fr, "timestamp", where), where, "timestamp") * 1e-6)
        cd = field(fr, "cams", where)
        row, drow = [], []
        for n in names:
            entry = field(cd, n, f"{where}.cams")
            w = f"{where}.cams.{n}"
            row.append(fpath(_path(entry, "data_path", w), w))
            drow.append(fpath(_path(entry, "depth_path", w), w) if "depth_path" in entry else None)
        img_p.append(row)
        dep_p.append(drow)
        lid_p.append(fpath(_path(fr, "lidar_path", where), where) if "lidar_path" in fr else None)
        bev_p.append(fpath(_path(fr, "bev_path", where), where) if "bev_path" in fr else None)
        if k and ts[-1] <= ts[-2]:
            raise DataError(f"{where}: field 'timestamp' must increase from frame to frame")
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
    subsampled, deterministically in ``seed``), with lidar2ego). ``res`` (H, W) resizes images (area), depths
    (nearest), K."""
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
        out["lidar"], out["lidar_mask"], out["lidar2ego"] = lidar, mask, rig["lidar2ego"]
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
            if not found:
                raise DataError(f"{paths}: no rig JSON files (*.json) found in this folder")
            paths = found
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


def lidar_to_depths(lidar: torch.Tensor, mask: torch.Tensor, K: torch.Tensor, cam2ego: torch.Tensor, H: int, W: int):
    """Sparse per-camera z-depth maps (T, N, 1, H, W) from ego-frame LiDAR points (T, P, 3) with ``mask``
    (T, P): each point lands in the pixel containing its projection (K (N, 3, 3) pixels, cam2ego (N, 4, 4)
    OpenCV); points closer than 0.1 m or outside the image are dropped; where several land in one pixel the
    nearest wins. 0 = no LiDAR return."""
    T, N = lidar.shape[0], K.shape[0]
    out = torch.zeros(T, N, H * W)
    ego2cam = torch.linalg.inv(cam2ego)
    for t in range(T):
        p = lidar[t][mask[t]]
        for n in range(N):
            uv, z = project_points(p, ego2cam[n], K[n], eps=1e-6)
            ok = (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            idx = uv[ok, 1].long() * W + uv[ok, 0].long()
            order = torch.argsort(z[ok], descending=True)                # write far first, near last
            out[t, n, idx[order]] = z[ok][order]
    return out.view(T, N, 1, H, W)
