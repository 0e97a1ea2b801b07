"""nuScenes read from its own schema (``v1.0-mini`` / ``v1.0-trainval``), for MIM4D; and a writer of that schema.

Tree: ``<root>/<version>/{scene,sample,sample_data,calibrated_sensor,ego_pose,sensor,log,...}.json`` (lists of
records keyed by ``token``), images ``<root>/samples/CAM_*/*.jpg`` (key frames, 2 Hz) and
``<root>/sweeps/CAM_*/*.jpg`` (the camera sweeps in between, 12 Hz), LiDAR ``<root>/samples/LIDAR_TOP/*.pcd.bin``
(float32 (N, 5): x, y, z in the LiDAR frame, intensity, ring). ``calibrated_sensor`` holds sensor -> ego
(``rotation`` (w, x, y, z), ``translation``, ``camera_intrinsic`` in pixels; nuScenes camera axes are OpenCV),
``ego_pose`` ego -> global at each ``sample_data``'s own timestamp; ``sample_data`` records chain per sensor
through ``prev`` / ``next``.

``NuScenesDataset(root, version, split, num_frames=T)``: one item per key frame that has T - 1 previous camera
sweeps on every camera. Frames are chronological (frame T-1 is the key frame; frames T-2, T-3, ... are the
previous 12 Hz camera sweeps, MIM4D's ``cam_sweep_num``). Every image keeps its **own** ego pose and
calibration: ``cam2ego_frames`` (T, C, 4, 4) = ego2world[t]^-1 @ ego_pose(image) @ calib(image), exact;
``cam2ego`` (C, 4, 4) is the key frame's row (what MIM4D's model takes for all frames; the sweeps' rows differ
by the ego motion between the cameras' trigger times, a few cm). The official MIM4D converter instead reuses
the LiDAR sweeps' ego poses for the camera sweeps and the key frame's calibration for all of them.
``ego2world[t]`` is the ego pose of the first camera's image at frame t, with the world origin moved to the key
frame's ego position (``world_origin``, float64, was subtracted) so float32 keeps millimetres.
``lidar`` (T, P, 3): the key frame's LiDAR scan expressed in each frame's ego frame (the world is taken as
static, as MIM4D does when it supervises sweep depth with key-frame points), with ``lidar_mask`` (T, P).
Keys shared with ``ProceduralDriving``: images, K, cam2ego, ego2world, lidar, lidar_mask, lidar2ego,
timestamps, cam_names; extra: cam2ego_frames, cam2world, world_origin, sample_token.

The dataset holds only an index (file names as one byte array, poses as float64 arrays); images and LiDAR are
read in ``__getitem__``. Splits: ``split`` "train" / "val" for v1.0-mini use nuScenes' mini split (8 / 2
scenes); for other versions pass ``scenes=`` (e.g. ``nuscenes.utils.splits.train`` from nuscenes-devkit,
used automatically when it is installed); "all" takes every scene.

``write_nuscenes(root, samples)`` writes driving samples (``ProceduralDriving`` items) as such a tree: every
frame a camera sweep, every ``key_every``-th frame from the last a key frame with its LiDAR, all 13 tables
(annotations empty, one map record) so nuScenes tools can open it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from nano4d.cameras import invert_pose, pose_from_quat_trans, rotmat_to_quat
from nano4d.data.common import DataError, as_array, as_int, field, read_json
from nano4d.files import atomic_write

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LIDAR = "LIDAR_TOP"
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
log = logging.getLogger("nano4d.data")
MINI_SPLITS = {"val": ("scene-0103", "scene-0916"),
               "train": ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077",
                         "scene-1094", "scene-1100")}


def _token(*parts) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


# ============================================================================ writer


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj).encode())


def _pose_record(T: torch.Tensor) -> dict:
    T = T.double()
    return {"rotation": rotmat_to_quat(T[:3, :3]).tolist(), "translation": T[:3, 3].tolist()}


def write_nuscenes(root: str, samples, version: str = "v1.0-mini", key_every: int | None = None,
                   jpeg_quality: int = 95, start_us: int = 1_533_151_603_000_000, scene_names=None) -> str:
    """Write driving samples (each a ``ProceduralDriving`` item: images (T, C, 3, H, W), K (C, 3, 3), cam2ego
    (C, 4, 4), ego2world (T, 4, 4), timestamps (T,) s, cam_names, lidar (T, P, 3) ego frame + lidar_mask +
    lidar2ego) as one nuScenes scene each under ``root`` (tables in ``root/version``). Frame k is a camera
    sweep, or a key frame (a ``sample``, with LiDAR) when (T - 1 - k) is a multiple of ``key_every``
    (default T: only the last frame). ``scene_names``: scene names (default "scene-0000", ...; use nuScenes' names
    to place scenes in its official splits). Returns ``root``."""
    tables = {t: [] for t in TABLES}
    os.makedirs(os.path.join(root, version), exist_ok=True)
    sensors = {}

    def sensor(channel, modality):
        if channel not in sensors:
            sensors[channel] = _token("sensor", channel)
            tables["sensor"].append({"token": sensors[channel], "channel": channel, "modality": modality})
        return sensors[channel]
    for s_idx, s in enumerate(samples):
        T, C = s["images"].shape[:2]
        names = list(s["cam_names"])
        key_every_s = key_every or T
        log_name = f"n000-nano4d-{s_idx:04d}"
        log_token = _token("log", s_idx)
        tables["log"].append({"token": log_token, "logfile": log_name, "vehicle": "nano4d",
                              "date_captured": "2018-08-01", "location": "procedural"})
        calib = {}
        for c, name in enumerate(names):
            calib[name] = _token("calib", s_idx, name)
            rec = {"token": calib[name], "sensor_token": sensor(name, "camera"), **_pose_record(s["cam2ego"][c]),
                   "camera_intrinsic": s["K"][c].double().tolist()}
            tables["calibrated_sensor"].append(rec)
        calib[LIDAR] = _token("calib", s_idx, LIDAR)
        tables["calibrated_sensor"].append({"token": calib[LIDAR], "sensor_token": sensor(LIDAR, "lidar"),
                                            **_pose_record(s["lidar2ego"]), "camera_intrinsic": []})
        keys = [k for k in range(T) if (T - 1 - k) % key_every_s == 0]
        sample_tok = {k: _token("sample", s_idx, k) for k in keys}
        ts = [start_us + s_idx * 100_000_000 + int(round(float(s["timestamps"][k]) * 1e6)) for k in range(T)]
        for j, k in enumerate(keys):
            tables["sample"].append({"token": sample_tok[k], "timestamp": ts[k], "scene_token": _token("scene", s_idx),
                                     "prev": sample_tok[keys[j - 1]] if j else "",
                                     "next": sample_tok[keys[j + 1]] if j + 1 < len(keys) else ""})
        tables["scene"].append({"token": _token("scene", s_idx), "log_token": log_token, "nbr_samples": len(keys),
                                "first_sample_token": sample_tok[keys[0]], "last_sample_token": sample_tok[keys[-1]],
                                "name": scene_names[s_idx] if scene_names else f"scene-{s_idx:04d}",
                                "description": "nano4d procedural street"})
        H, W = s["images"].shape[-2:]
        channels = [(c, name) for c, name in enumerate(names)] + [(None, LIDAR)]
        for c, name in channels:
            chain = [k for k in range(T)] if c is not None else keys
            toks = [_token("sd", s_idx, name, k) for k in chain]
            for j, k in enumerate(chain):
                key = k in sample_tok
                owner = sample_tok[min(q for q in keys if q >= k)]          # sweeps belong to the next sample
                ego_tok = _token("ego", s_idx, name, k)
                tables["ego_pose"].append({"token": ego_tok, "timestamp": ts[k], **_pose_record(s["ego2world"][k])})
                folder = "samples" if key else "sweeps"
                ext = ".jpg" if c is not None else ".pcd.bin"
                rel = f"{folder}/{name}/{log_name}__{name}__{ts[k]}{ext}"
                os.makedirs(os.path.join(root, folder, name), exist_ok=True)
                if c is not None:
                    arr = (s["images"][k, c].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
                    Image.fromarray(arr).save(os.path.join(root, rel), quality=jpeg_quality)
                else:
                    pts = s["lidar"][k][s["lidar_mask"][k]].double()
                    e2l = invert_pose(s["lidar2ego"].double())
                    p = pts @ e2l[:3, :3].T + e2l[:3, 3]
                    rows = np.zeros((p.shape[0], 5), np.float32)
                    rows[:, :3] = p.numpy()
                    rows[:, 4] = np.arange(p.shape[0]) % 32
                    rows.tofile(os.path.join(root, rel))
                tables["sample_data"].append({
                    "token": toks[j], "sample_token": owner, "ego_pose_token": ego_tok,
                    "calibrated_sensor_token": calib[name], "timestamp": ts[k],
                    "fileformat": "jpg" if c is not None else "pcd", "is_key_frame": key,
                    "height": int(H) if c is not None else 0, "width": int(W) if c is not None else 0,
                    "filename": rel, "prev": toks[j - 1] if j else "", "next": toks[j + 1] if j + 1 < len(chain) else ""})
    map_tok = _token("map", 0)
    os.makedirs(os.path.join(root, "maps"), exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(root, "maps", f"{map_tok}.png"))
    tables["map"].append({"token": map_tok, "category": "semantic_prior", "filename": f"maps/{map_tok}.png",
                          "log_tokens": [r["token"] for r in tables["log"]]})
    for name, rows in tables.items():
        _write_json(os.path.join(root, version, f"{name}.json"), rows)
    return root


# ============================================================================ reader


def _table(root: str, version: str, name: str) -> tuple[str, dict]:
    path = os.path.join(root, version, f"{name}.json")
    rows = read_json(path, f"nuScenes table {name!r}")
    if not isinstance(rows, list):
        raise DataError(f"{path}: a nuScenes table must be a JSON list of records")
    out = {}
    for i, r in enumerate(rows):
        out[field(r, "token", f"{path}: [{i}]")] = r
    return path, out


def _pose64(rec: dict, where: str) -> np.ndarray:
    q = as_array(field(rec, "rotation", where), (4,), where, "rotation")
    t = as_array(field(rec, "translation", where), (3,), where, "translation")
    if q.norm() < 1e-8:
        raise DataError(f"{where}: field 'rotation' is degenerate (zero quaternion)")
    return pose_from_quat_trans(q, t).numpy()


def _scene_names(version: str, split: str, scenes):
    if scenes is not None:
        return set(scenes)
    if split == "all":
        return None
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'all' (or pass scenes=), got {split!r}")
    if version == "v1.0-mini":
        return set(MINI_SPLITS[split])
    try:
        from nuscenes.utils import splits
    except ImportError:
        raise ValueError(f"split {split!r} of {version} needs nuScenes' scene lists: pass scenes= (e.g. "
                         "nuscenes.utils.splits.train from nuscenes-devkit) or install nuscenes-devkit") from None
    return set(getattr(splits, split))


class NuScenesDataset(Dataset):
    """Key frames of nuScenes with their previous camera sweeps; see the module docstring for the item keys."""

    def __init__(self, root: str, version: str = "v1.0-mini", split: str = "train", num_frames: int = 3, res=None,
                 max_points: int | None = None, cameras=CAMERAS, scenes=None):
        if not os.path.isdir(os.path.join(root, version)):
            raise DataError(f"{os.path.join(root, version)}: nuScenes table folder not found")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.root, self.version, self.num_frames, self.max_points = root, version, int(num_frames), max_points
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.cam_names = list(cameras)
        wanted = _scene_names(version, split, scenes)
        tab = {n: _table(root, version, n) for n in ("sensor", "calibrated_sensor", "ego_pose", "log", "scene",
                                                      "sample", "sample_data")}
        sd_path, sd = tab["sample_data"]
        cs_path, cs = tab["calibrated_sensor"]
        sensor_path, sensors = tab["sensor"]
        ep_path, ep = tab["ego_pose"]

        def get(table, tok, where, key):
            path, rows = tab[table]
            if tok not in rows:
                raise DataError(f"{where}: field {key!r} refers to token {tok!r}, not found in {path}")
            return rows[tok]
        channel_of_calib = {}
        for tok, r in cs.items():
            channel_of_calib[tok] = field(get("sensor", field(r, "sensor_token", f"{cs_path}: {tok}"),
                                              f"{cs_path}: {tok}", "sensor_token"), "channel", f"{sensor_path}")
        key_sd = {}                                        # (sample token, channel) -> sample_data token
        for tok, r in sd.items():
            where = f"{sd_path}: {tok}"
            if field(r, "is_key_frame", where):
                key_sd[(field(r, "sample_token", where), channel_of_calib.get(field(r, "calibrated_sensor_token", where)))] = tok
        scene_rows = sorted(tab["scene"][1].values(), key=lambda r: r.get("name", ""))
        if wanted is not None:
            missing = wanted - {r.get("name") for r in scene_rows}
            scene_rows = [r for r in scene_rows if r.get("name") in wanted]
            if not scene_rows:
                raise DataError(f"{tab['scene'][0]}: none of the {len(wanted)} scenes of split {split!r} is in this "
                                f"{version} tree (e.g. {sorted(missing)[0]})")
            if missing:
                log.warning("%s: %d of the %d scenes of split %r are not in this tree: %s", tab["scene"][0],
                            len(missing), len(wanted), split, ", ".join(sorted(missing)))
        T, C = self.num_frames, len(self.cam_names)
        files, poses, calibs, Ks, lid_files, lid_poses, lid_calibs, times, tokens = [], [], [], [], [], [], [], [], []
        self.skipped = 0
        for scene in scene_rows:
            where = f"{tab['scene'][0]}: {scene.get('token')}"
            s_tok = field(scene, "first_sample_token", where)
            while s_tok:
                sample = get("sample", s_tok, where, "first_sample_token/next")
                chains = []
                for cam in self.cam_names:
                    tok = key_sd.get((s_tok, cam))
                    if tok is None:
                        raise DataError(f"{sd_path}: sample {s_tok} has no key-frame sample_data for {cam}")
                    chain = [tok]
                    while len(chain) < T and sd[chain[-1]].get("prev"):
                        chain.append(get("sample_data", sd[chain[-1]]["prev"], f"{sd_path}: {chain[-1]}", "prev")["token"])
                    chains.append(chain[::-1])
                lid = key_sd.get((s_tok, LIDAR))
                if min(len(c) for c in chains) < T or lid is None:
                    self.skipped += 1
                else:
                    row_f, row_p, row_c, row_t = [], [], [], []
                    for t in range(T):
                        for c in range(C):
                            r = sd[chains[c][t]]
                            w = f"{sd_path}: {r['token']}"
                            row_f.append(field(r, "filename", w))
                            row_p.append(_pose64(get("ego_pose", field(r, "ego_pose_token", w), w, "ego_pose_token"),
                                                 f"{ep_path}: {r['ego_pose_token']}"))
                            cal = get("calibrated_sensor", field(r, "calibrated_sensor_token", w), w, "calibrated_sensor_token")
                            cw = f"{cs_path}: {r['calibrated_sensor_token']}"
                            row_c.append(_pose64(cal, cw))
                            if t == T - 1:
                                Ks.append(as_array(field(cal, "camera_intrinsic", cw), (3, 3), cw, "camera_intrinsic").numpy())
                            if c == 0:
                                row_t.append(as_int(field(r, "timestamp", w), w, "timestamp"))
                    lr = sd[lid]
                    w = f"{sd_path}: {lid}"
                    lid_files.append(field(lr, "filename", w))
                    lid_poses.append(_pose64(get("ego_pose", field(lr, "ego_pose_token", w), w, "ego_pose_token"), w))
                    lid_calibs.append(_pose64(get("calibrated_sensor", field(lr, "calibrated_sensor_token", w), w,
                                                  "calibrated_sensor_token"), w))
                    files += row_f
                    poses.append(np.stack(row_p))
                    calibs.append(np.stack(row_c))
                    times.append(row_t)
                    tokens.append(s_tok)
                s_tok = sample.get("next", "")
        if not tokens:
            raise DataError(f"{os.path.join(root, version)}: no key frame with {T - 1} previous camera sweeps on "
                            f"every camera in split {split!r} ({self.skipped} skipped)")
        n = len(tokens)
        self.files = np.array(files, dtype=np.bytes_).reshape(n, T, C)
        self.poses = np.stack(poses).reshape(n, T, C, 4, 4)
        self.calibs = np.stack(calibs).reshape(n, T, C, 4, 4)
        self.K = np.stack(Ks).reshape(n, C, 3, 3)
        self.lidar_files = np.array(lid_files, dtype=np.bytes_)
        self.lidar_poses, self.lidar_calibs = np.stack(lid_poses), np.stack(lid_calibs)
        self.times = np.array(times, dtype=np.int64)
        self.tokens = np.array(tokens, dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.tokens)

    def _image(self, rel: str, size) -> torch.Tensor:
        path = os.path.join(self.root, rel)
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"{path}: unreadable image ({e})") from None
        if size is not None and a.shape[:2] != size:
            raise DataError(f"{path}: image is {a.shape[1]}x{a.shape[0]} but other cameras are {size[1]}x{size[0]}")
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255

    def _lidar(self, rel: str) -> np.ndarray:
        path = os.path.join(self.root, rel)
        try:
            raw = np.fromfile(path, dtype=np.float32)
        except OSError as e:
            raise DataError(f"{path}: cannot read LiDAR points ({e})") from None
        if raw.size % 5:
            raise DataError(f"{path}: {raw.size} floats, not a multiple of 5 (x, y, z, intensity, ring)")
        return raw.reshape(-1, 5)[:, :3].astype(np.float64)

    def __getitem__(self, i: int) -> dict:
        T, C = self.num_frames, len(self.cam_names)
        E, S = self.poses[i], self.calibs[i]                                      # (T, C, 4, 4) float64
        origin = E[T - 1, 0, :3, 3].copy()
        ego2world = E[:, 0].copy()
        ego2world[:, :3, 3] -= origin
        Ec = E.copy()
        Ec[..., :3, 3] -= origin
        cam2world = Ec @ S
        cam2ego_frames = np.linalg.inv(ego2world)[:, None] @ cam2world
        size, imgs = None, []
        for t in range(T):
            row = []
            for c in range(C):
                row.append(self._image(self.files[i, t, c].decode(), size))
                size = tuple(row[-1].shape[-2:])
            imgs.append(torch.stack(row))
        images = torch.stack(imgs)
        K = torch.from_numpy(self.K[i]).float()
        H, W = size
        if self.res is not None and self.res != (H, W):
            Ho, Wo = self.res
            images = F.interpolate(images.flatten(0, 1), size=(Ho, Wo), mode="area").view(T, C, 3, Ho, Wo)
            K[:, 0] *= Wo / W
            K[:, 1] *= Ho / H
        L = self.lidar_poses[i].copy()
        L[:3, 3] -= origin
        p = self._lidar(self.lidar_files[i].decode())
        pw = p @ (L @ self.lidar_calibs[i])[:3, :3].T + (L @ self.lidar_calibs[i])[:3, 3]
        P = self.max_points or p.shape[0]
        if p.shape[0] > P:
            g = np.random.default_rng(i)
            pw = pw[np.sort(g.permutation(p.shape[0])[:P])]
        w2e = np.linalg.inv(ego2world)
        lidar = np.zeros((T, P, 3))
        lidar[:, :pw.shape[0]] = pw @ w2e[:, :3, :3].transpose(0, 2, 1) + w2e[:, None, :3, 3]
        mask = torch.zeros(T, P, dtype=torch.bool)
        mask[:, :pw.shape[0]] = True
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
        return dict(images=images, K=K, cam2ego=f32(cam2ego_frames[T - 1]), ego2world=f32(ego2world),
                    lidar=f32(lidar), lidar_mask=mask, lidar2ego=f32(self.lidar_calibs[i]),
                    timestamps=torch.from_numpy((self.times[i] - self.times[i, 0]) * 1e-6).float(),
                    cam_names=list(self.cam_names), cam2ego_frames=f32(cam2ego_frames), cam2world=f32(cam2world),
                    world_origin=torch.from_numpy(origin), sample_token=self.tokens[i].decode())
