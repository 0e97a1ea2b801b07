"""Procedural driving scenes (MIM4D's default data); ``ProceduralDriving`` caches them as rig JSON (``nano4d.data.rig``).

World frame: z up, the street runs along +x; right-hand traffic, so lanes with y < 0 drive towards +x.
A street = asphalt road (lane markings, optional parking lanes, crosswalks), sidewalks with tiles,
building facades with window grids, street lamps, trees, parked cars and moving cars (each lane has its own
speed; cars in opposite lanes drive towards -x), sky with a horizon gradient and distance fog. Everything
is an axis-aligned box, a sphere (tree crowns) or the ground plane z = 0, ray-cast analytically in torch,
with Lambertian sun light, ambient and cast shadows.

Ego frame (nuScenes): x forward, y left, z up, origin on the ground under the rear axle. The ego drives
along its lane with a small lateral weave (so its yaw changes). Six cameras with a nuScenes-like layout
(``CAM_NAMES``), OpenCV axes, ``cam2ego`` (6, 4, 4), pixel ``K`` (6, 3, 3): 70 deg horizontal fov, back
camera 100 deg, square pixels, principal point at the image centre. LiDAR: a spinning 32-beam sensor at
(0, 0, 1.84) in the ego frame (``lidar2ego``, ego axes), elevations -30..+10 deg, ``lidar_azimuths`` columns;
points are returned in the ego frame, padded to a fixed P = 32 * lidar_azimuths with ``lidar_mask`` (hit
within ``lidar_range``).

BEV labels (``bev`` (T, Hb, Wb) int64): 0 other, 1 road (carriageway incl. parking lanes), 2 car,
3 building. Ego-centred grid over x, y in [-bev_range, bev_range] metres (ego frame): cell (iy, ix) has
centre x = -R + (ix + 0.5) * 2R / Wb, y = -R + (iy + 0.5) * 2R / Hb, i.e. the tensor is (Y, X) with
increasing index = increasing coordinate (as ``F.grid_sample`` expects); forward is +ix, left is +iy.
Defaults R = 51.2 m, 128 x 128 (0.8 m cells, MIM4D's pc_range and voxel size).

Frames are chronological: frame k is at time k * frame_dt seconds (``timestamps``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nano4d.cameras import camera_rays, invert_pose, ray_aabb
from nano4d.data.common import SPLITS, limit_threads, split_seed, value_noise
from nano4d.data.rig import load_rig_frames, read_rig, write_rig

CAM_NAMES = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
# (x, y, z) position in the ego frame, yaw (deg, 0 = forward, positive = to the left), horizontal fov (deg)
CAM_LAYOUT = ((1.70, 0.00, 1.55, 0.0, 70.0), (1.55, -0.50, 1.55, -55.0, 70.0), (1.55, 0.50, 1.55, 55.0, 70.0),
              (-0.90, 0.00, 1.55, 180.0, 100.0), (1.05, 0.50, 1.55, 110.0, 70.0), (1.05, -0.50, 1.55, -110.0, 70.0))
LIDAR_HEIGHT = 1.84
BEV_LABELS = ("other", "road", "car", "building")
# box kinds
BUILDING, CAR_BODY, CAR_CABIN, WHEEL, POLE, TRUNK, LAMP = range(7)
LANE_W = 3.5


@dataclass
class StreetWorld:
    """A street: static boxes, cars (boxes moving along x), tree crowns, ground layout, light, ego motion."""
    lo: torch.Tensor          # (M, 3) box min corners at t = 0
    hi: torch.Tensor          # (M, 3) box max corners at t = 0
    kind: torch.Tensor        # (M,) int64 box kind (BUILDING, CAR_BODY, ...)
    color: torch.Tensor       # (M, 3) base colour
    vel: torch.Tensor         # (M,) x velocity m/s (0 for static boxes)
    win: torch.Tensor         # (M, 4) facade windows: floor height, column spacing, window width, height
    spheres: torch.Tensor     # (S, 4) tree crowns: centre xyz, radius
    sphere_color: torch.Tensor  # (S, 3)
    road_half: float          # carriageway half width (lanes + parking)
    lanes: int                # lanes per direction
    parking: float            # parking-lane width (0 = none)
    sidewalk: float           # sidewalk width
    crosswalks: tuple         # x positions of zebra crossings (4 m long)
    center_line: str          # "yellow" (double solid) or "white" (dashed)
    asphalt: float            # asphalt grey level
    sun: torch.Tensor         # (3,) unit vector towards the sun
    ego_y: float              # ego lane centre
    ego_speed: float
    weave: tuple              # lateral weave amplitude (m), angular frequency (rad/s), phase
    seed: int

    def boxes_at(self, t: float):
        shift = torch.zeros_like(self.lo)
        shift[:, 0] = self.vel * t
        return self.lo + shift, self.hi + shift


def ego_pose(world: StreetWorld, t: float) -> torch.Tensor:
    """ego2world (4, 4) at time t."""
    a, w, ph = world.weave
    x = world.ego_speed * t
    y = world.ego_y + a * math.sin(w * t + ph)
    yaw = math.atan2(a * w * math.cos(w * t + ph), world.ego_speed)
    T = torch.eye(4)
    T[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    T[0, 3], T[1, 3] = x, y
    return T


def lidar2ego() -> torch.Tensor:
    """(4, 4) LiDAR -> ego transform of the procedural rig: the sensor at (0, 0, LIDAR_HEIGHT) with ego axes."""
    T = torch.eye(4)
    T[2, 3] = LIDAR_HEIGHT
    return T


def rig_cameras(height: int, width: int):
    """(cam2ego (6, 4, 4), K (6, 3, 3)) for the six-camera rig at the given image size."""
    c2e, Ks = [], []
    for (x, y, z, yaw, fov) in CAM_LAYOUT:
        ps = math.radians(yaw)
        T = torch.eye(4)
        T[:3, 0] = torch.tensor([math.sin(ps), -math.cos(ps), 0.0])   # right
        T[:3, 1] = torch.tensor([0.0, 0.0, -1.0])                     # down
        T[:3, 2] = torch.tensor([math.cos(ps), math.sin(ps), 0.0])    # forward
        T[:3, 3] = torch.tensor([x, y, z])
        f = 0.5 * width / math.tan(math.radians(fov) / 2)
        c2e.append(T)
        Ks.append(torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]]))
    return torch.stack(c2e), torch.stack(Ks)


def _car(rng, x, y, vel, boxes):
    L, Wd = rng.uniform(3.9, 4.9), rng.uniform(1.7, 1.95)
    hb = rng.uniform(1.0, 1.25)
    palette = [(0.75, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.12, 0.12, 0.13), (0.55, 0.57, 0.6),
               (0.9, 0.75, 0.15), (0.2, 0.45, 0.25), (0.95, 0.95, 0.97), (0.45, 0.2, 0.1)]
    col = np.array(palette[int(rng.integers(len(palette)))]) * rng.uniform(0.85, 1.1)
    hx, hy = L / 2, Wd / 2
    boxes.append(((x - hx, y - hy, 0.3), (x + hx, y + hy, hb), CAR_BODY, col, vel))
    cb = x - rng.uniform(0.0, 0.4)
    boxes.append(((cb - L * 0.27, y - hy + 0.1, hb), (cb + L * 0.23, y + hy - 0.1, hb + rng.uniform(0.45, 0.6)),
                  CAR_CABIN, col, vel))
    for ax in (x - hx + 0.75, x + hx - 0.8):
        boxes.append(((ax - 0.34, y - hy - 0.02, 0.0), (ax + 0.34, y + hy + 0.02, 0.66), WHEEL, (0.05, 0.05, 0.05), vel))


def random_street(seed) -> StreetWorld:
    """A random street world, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    lanes = int(rng.integers(1, 3))
    parking = float(rng.choice([0.0, 2.5]))
    road_half = lanes * LANE_W + parking
    sidewalk = rng.uniform(2.5, 4.5)
    ego_lane = int(rng.integers(lanes))
    ego_y = -(ego_lane + 0.5) * LANE_W
    ego_speed = rng.uniform(4.0, 9.0)
    x_lo, x_hi = -90.0, 160.0
    boxes = []   # (lo, hi, kind, colour, vel, win)
    wins = []
    # buildings on both sides
    for side in (-1, 1):
        x = x_lo
        y0 = road_half + sidewalk + rng.uniform(0.0, 1.5)
        while x < x_hi:
            w = rng.uniform(7, 22)
            depth, height = rng.uniform(8, 16), rng.uniform(5, 28)
            y_in = y0 + rng.uniform(0, 2.0)
            ylo, yhi = (y_in, y_in + depth) if side > 0 else (-y_in - depth, -y_in)
            tone = rng.uniform(0.35, 0.85)
            col = np.clip(np.array([tone, tone * rng.uniform(0.8, 1.0), tone * rng.uniform(0.6, 0.95)])
                          + rng.normal(scale=0.05, size=3), 0, 1)
            if rng.uniform() < 0.3:
                col = np.array([0.55, 0.25, 0.18]) * rng.uniform(0.8, 1.2)  # brick
            boxes.append(((x, ylo, 0.0), (x + w, yhi, height), BUILDING, col, 0.0))
            wins.append((rng.uniform(2.8, 3.6), rng.uniform(2.2, 3.8), rng.uniform(0.9, 1.5), rng.uniform(1.1, 1.8)))
            x += w + (0.0 if rng.uniform() < 0.65 else rng.uniform(2, 8))
    n_bld = len(boxes)
    # street lamps and trees on the sidewalks
    spheres, sph_col = [], []
    for side in (-1, 1):
        yl = side * (road_half + 0.6)
        x = x_lo + rng.uniform(0, 20)
        while x < x_hi:
            boxes.append(((x - 0.09, yl - 0.09, 0.0), (x + 0.09, yl + 0.09, 6.5), POLE, (0.25, 0.26, 0.28), 0.0))
            ya, yb = sorted((yl - side * 1.3, yl))                   # arm reaching over the road
            boxes.append(((x - 0.25, ya, 6.3), (x + 0.25, yb, 6.5), LAMP, (0.3, 0.3, 0.32), 0.0))
            x += rng.uniform(18, 30)
        x = x_lo + rng.uniform(0, 15)
        while x < x_hi:
            if rng.uniform() < 0.6:
                yt = side * (road_half + sidewalk * rng.uniform(0.45, 0.75))
                th = rng.uniform(2.0, 3.2)
                boxes.append(((x - 0.16, yt - 0.16, 0.0), (x + 0.16, yt + 0.16, th + 0.5), TRUNK, (0.33, 0.22, 0.12), 0.0))
                r = rng.uniform(1.2, 2.2)
                spheres.append((x, yt, th + r * 0.8, r))
                sph_col.append(np.array([0.18, 0.42, 0.15]) * rng.uniform(0.7, 1.3))
            x += rng.uniform(7, 14)
    # parked cars
    if parking:
        for side in (-1, 1):
            x = x_lo + rng.uniform(0, 8)
            while x < x_hi:
                if rng.uniform() < 0.7:
                    _car(rng, x, side * (road_half - parking / 2 - 0.1), 0.0, boxes)
                x += rng.uniform(5.5, 9.0)
    # moving cars, one speed per lane
    for lane in range(lanes):
        for side in (-1, 1):
            y = side * (lane + 0.5) * LANE_W
            own = side < 0 and lane == ego_lane
            v = ego_speed if own else rng.uniform(3.0, 13.0)
            v = v if side < 0 else -v
            x = x_lo + rng.uniform(0, 15)
            while x < x_hi:
                if not (own and abs(x) < 10.0):
                    _car(rng, x + 0.0, y + rng.uniform(-0.3, 0.3), v, boxes)
                x += rng.uniform(10, 35)
    win = torch.zeros(len(boxes), 4)
    win[:n_bld] = torch.tensor(np.array(wins), dtype=torch.float32)
    sun_el, sun_az = math.radians(rng.uniform(25, 65)), rng.uniform(0, 2 * math.pi)
    crosswalks = tuple(float(c) for c in rng.uniform(x_lo, x_hi, size=int(rng.integers(1, 4))))
    return StreetWorld(
        lo=torch.tensor(np.array([b[0] for b in boxes]), dtype=torch.float32),
        hi=torch.tensor(np.array([b[1] for b in boxes]), dtype=torch.float32),
        kind=torch.tensor([b[2] for b in boxes]),
        color=torch.tensor(np.array([b[3] for b in boxes]), dtype=torch.float32).clamp(0, 1),
        vel=torch.tensor([b[4] for b in boxes], dtype=torch.float32), win=win,
        spheres=torch.tensor(np.array(spheres).reshape(-1, 4), dtype=torch.float32),
        sphere_color=torch.tensor(np.array(sph_col).reshape(-1, 3), dtype=torch.float32).clamp(0, 1),
        road_half=road_half, lanes=lanes, parking=parking, sidewalk=sidewalk, crosswalks=crosswalks,
        center_line=str(rng.choice(["yellow", "white"])), asphalt=float(rng.uniform(0.22, 0.36)),
        sun=torch.tensor([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)]),
        ego_y=ego_y, ego_speed=ego_speed,
        weave=(float(rng.uniform(0.0, 0.35)), float(rng.uniform(0.4, 1.2)), float(rng.uniform(0, 2 * math.pi))),
        seed=int(rng.integers(1, 2 ** 30)))


def _corners(lo, hi):
    """(M, 8, 3) box corners."""
    sel = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.bool)
    return torch.where(sel[None], hi[:, None], lo[:, None])


def _box_bins(a0, a1, b0, b1, full, grid):
    """Box -> covered bins of a 2-D grid. a0/a1/b0/b1 (M,) plane-coordinate extents, full (M,) boxes that
    cover every bin. grid = (a_min, b_min, cell_a, cell_b, na, nb, bin_offset). Returns (box_idx, bin_idx)."""
    amin, bmin, ca, cb, na, nb, off = grid
    ia0 = ((a0 - amin) / ca).floor().clamp(0, na - 1).long()
    ia1 = ((a1 - amin) / ca).floor().clamp(0, na - 1).long()
    ib0 = ((b0 - bmin) / cb).floor().clamp(0, nb - 1).long()
    ib1 = ((b1 - bmin) / cb).floor().clamp(0, nb - 1).long()
    outside = (a1 < amin) | (a0 > amin + na * ca) | (b1 < bmin) | (b0 > bmin + nb * cb)
    ia0, ib0 = torch.where(full, 0, ia0), torch.where(full, 0, ib0)
    ia1, ib1 = torch.where(full, na - 1, ia1), torch.where(full, nb - 1, ib1)
    wa, wb = ia1 - ia0 + 1, ib1 - ib0 + 1
    cnt = torch.where(outside & ~full, 0, wa * wb)
    box = torch.repeat_interleave(torch.arange(len(cnt)), cnt)
    local = torch.arange(int(cnt.sum())) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    return box, off + (ib0[box] + local // wa[box]) * na + ia0[box] + local % wa[box]


def _slab(o, d, lo, hi):
    tn, tf, axis = ray_aabb(o, d, lo, hi, eps=1e-9)
    return torch.where((tf >= tn) & (tn > 1e-4), tn, torch.full_like(tn, float("inf"))), axis


def _sphere_hit(o, d, sph):
    oc = o - sph[:, :3]
    b = (oc * d).sum(-1)
    disc = b * b - (oc * oc).sum(-1) + sph[:, 3] ** 2
    ts = -b - disc.clamp_min(0).sqrt()
    return torch.where((disc > 0) & (ts > 1e-4), ts, torch.full_like(ts, float("inf")))


def _cast_pairs(o, d, ray_bin, prim_idx, bin_idx, nbins: int, hit_fn):
    """Nearest primitive hit per ray, testing only the primitives registered in the ray's bin:
    ``hit_fn(o_pairs, d_pairs, prim_pairs)`` -> t per (ray, primitive) pair. Returns t (N,), index (N,)."""
    N = o.shape[0]
    t = torch.full((N,), float("inf"))
    ib = torch.zeros(N, dtype=torch.int64)
    if prim_idx.numel() == 0 or N == 0:
        return t, ib
    order = torch.argsort(bin_idx, stable=True)
    sprim = prim_idx[order]
    counts = torch.bincount(bin_idx, minlength=nbins)
    starts = torch.cumsum(counts, 0) - counts
    cnt = counts[ray_bin]
    pr = torch.repeat_interleave(torch.arange(N), cnt)
    local = torch.arange(int(cnt.sum())) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    pb = sprim[starts[ray_bin][pr] + local]
    tp = hit_fn(o[pr], d[pr], pb)
    t = t.scatter_reduce(0, pr, tp, reduce="amin")
    win = torch.isfinite(tp) & (tp == t[pr])
    ib = ib.scatter_reduce(0, pr[win], pb[win], reduce="amax")
    return t, ib


def _all_bins(n):
    return torch.arange(n), torch.zeros(n, dtype=torch.int64)


def _cast(o, d, lo, hi, spheres, far: float, ray_bin=None, box_bins=None, sphere_bins=None, nbins=1, ground=True):
    """Nearest hit of rays o, d (N, 3) (unit d) with boxes lo/hi (M, 3), spheres (S, 4) and the ground z = 0.
    ``box_bins`` / ``sphere_bins`` = (prim_idx, bin_idx) restrict the tests to primitives registered in the
    ray's bin ``ray_bin`` (N,); without bins every ray tests everything. Returns t (N,) (inf = no hit within
    far), what (N,) (0 ground, 1 box, 2 sphere, -1 none), index (N,) (box or sphere), normal (N, 3)."""
    N = o.shape[0]
    if ray_bin is None:
        ray_bin, box_bins, sphere_bins, nbins = torch.zeros(N, dtype=torch.int64), _all_bins(lo.shape[0]), \
            _all_bins(spheres.shape[0]), 1
    t = torch.full((N,), float("inf"))
    what = torch.full((N,), -1, dtype=torch.int64)
    idx = torch.zeros(N, dtype=torch.int64)
    nrm = torch.zeros(N, 3)
    if ground:
        tg = torch.where(d[:, 2] < -1e-6, -o[:, 2] / d[:, 2].clamp_max(-1e-6), torch.full_like(t, float("inf")))
        sel = tg < far
        t = torch.where(sel, tg, t)
        what[sel] = 0
        nrm[sel] = torch.tensor([0.0, 0.0, 1.0])
    tb, ib = _cast_pairs(o, d, ray_bin, *box_bins, nbins, lambda oo, dd, pp: _slab(oo, dd, lo[pp], hi[pp])[0])
    sel = (tb < t) & (tb < far)
    t = torch.where(sel, tb, t)
    what[sel], idx[sel] = 1, ib[sel]
    if sel.any():
        s = sel.nonzero().squeeze(1)
        _, ax = _slab(o[s], d[s], lo[ib[s]], hi[ib[s]])
        nrm[s] = torch.zeros(len(s), 3).scatter_(1, ax[:, None], -torch.sign(d[s].gather(1, ax[:, None])))
    if spheres.shape[0]:
        ts, isp = _cast_pairs(o, d, ray_bin, *sphere_bins, nbins, lambda oo, dd, pp: _sphere_hit(oo, dd, spheres[pp]))
        sel = (ts < t) & (ts < far)
        t = torch.where(sel, ts, t)
        what[sel], idx[sel] = 2, isp[sel]
        p = o[sel] + ts[sel, None] * d[sel]
        nrm[sel] = F.normalize(p - spheres[isp[sel], :3], dim=-1)
    return t, what, idx, nrm


def _pinhole_bins(lo, hi, w2c, extent, tiles, offset, near=0.05):
    """Register boxes in the tiles of a pinhole's normalized image plane (a, b) = (x/z, y/z) over
    extent = (a_min, a_max, b_min, b_max) split into tiles = (na, nb). Boxes crossing the near plane cover
    all tiles; boxes fully behind it none."""
    c = _corners(lo, hi) @ w2c[:3, :3].T + w2c[:3, 3]
    z = c[..., 2]
    behind = (z < near).all(-1)
    full = (z < near).any(-1) & ~behind
    a, b = c[..., 0] / z.clamp_min(near), c[..., 1] / z.clamp_min(near)
    amin, amax, bmin, bmax = extent
    na, nb = tiles
    keep = (~behind).nonzero().squeeze(1)
    box, bins = _box_bins(a.min(-1).values[keep], a.max(-1).values[keep], b.min(-1).values[keep],
                          b.max(-1).values[keep], full[keep],
                          (amin, bmin, (amax - amin) / na, (bmax - bmin) / nb, na, nb, offset))
    return keep[box], bins


def _ray_tiles(o, d, w2c, extent, tiles, offset):
    dc = d @ w2c[:3, :3].T
    a, b = dc[:, 0] / dc[:, 2].clamp_min(1e-6), dc[:, 1] / dc[:, 2].clamp_min(1e-6)
    amin, amax, bmin, bmax = extent
    na, nb = tiles
    ia = ((a - amin) / ((amax - amin) / na)).floor().clamp(0, na - 1).long()
    ib = ((b - bmin) / ((bmax - bmin) / nb)).floor().clamp(0, nb - 1).long()
    return offset + ib * na + ia


def _hash2(a, b, c) -> torch.Tensor:
    h = (a * 73856093) ^ (b * 19349663) ^ (c * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).float() / 65535.0


def _ground_albedo(world: StreetWorld, p: torch.Tensor) -> torch.Tensor:
    x, y = p[:, 0], p[:, 1]
    ay = y.abs()
    n = value_noise(torch.stack([x * 0.7, y * 0.7, torch.zeros_like(x)], -1), world.seed, octaves=2)
    col = (0.42 + 0.2 * n)[:, None] * torch.tensor([0.55, 0.75, 0.35])                # grass / verge
    side = (ay >= world.road_half) & (ay < world.road_half + world.sidewalk)
    tiles = ((torch.remainder(x, 1.2) < 0.05) | (torch.remainder(ay - world.road_half, 1.2) < 0.05)).float()
    curb = (ay < world.road_half + 0.25).float()
    sw = (0.62 + 0.08 * n - 0.12 * tiles + 0.12 * curb)[:, None] * torch.ones(3)
    col = torch.where(side[:, None], sw, col)
    road = ay < world.road_half
    asph = (world.asphalt + 0.07 * (n - 0.5))[:, None] * torch.tensor([1.0, 1.0, 1.03])
    white = torch.zeros_like(x, dtype=torch.bool)
    dash = torch.remainder(x, 9.0) < 3.0
    for k in range(1, world.lanes):                                                   # lane dividers
        white |= ((ay - k * LANE_W).abs() < 0.08) & dash
    edge = world.lanes * LANE_W
    white |= ((ay - edge).abs() < 0.1) & (world.parking > 0 or True)                 # carriageway edge
    yellow = torch.zeros_like(white)
    if world.center_line == "yellow":
        yellow = ((ay - 0.18).abs() < 0.07)
    else:
        white |= (ay < 0.08) & dash
    for cx in world.crosswalks:
        zebra = (x > cx) & (x < cx + 4.0) & (torch.remainder(y, 1.2) < 0.6) & (ay < edge)
        white |= zebra
    asph = torch.where(white[:, None], torch.tensor([0.85, 0.85, 0.82]), asph)
    asph = torch.where(yellow[:, None], torch.tensor([0.85, 0.68, 0.15]), asph)
    return torch.where(road[:, None], asph, col)


def _box_albedo(world: StreetWorld, p: torch.Tensor, bi: torch.Tensor, nrm: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    kind = world.kind[bi]
    col = world.color[bi].clone()
    # building facades: window grid (not on the ground floor's lower part), darker roofs
    bld = kind == BUILDING
    if bld.any():
        s = bld.nonzero().squeeze(1)
        q, n, w = p[s], nrm[s], world.win[bi[s]]
        u = torch.where(n[:, 0].abs() > 0.5, q[:, 1] - lo[bi[s], 1], q[:, 0] - lo[bi[s], 0])
        z = q[:, 2]
        fu, fz = torch.remainder(u, w[:, 1]), torch.remainder(z, w[:, 0])
        inwin = (fu > 0.5 * (w[:, 1] - w[:, 2])) & (fu < 0.5 * (w[:, 1] + w[:, 2])) \
            & (fz > 0.5 * (w[:, 0] - w[:, 3])) & (fz < 0.5 * (w[:, 0] + w[:, 3])) & (z > 2.2) & (n[:, 2].abs() < 0.5)
        cell = _hash2(bi[s], torch.floor(u / w[:, 1]).long(), torch.floor(z / w[:, 0]).long())
        glass = torch.stack([0.12 + 0.1 * cell, 0.15 + 0.12 * cell, 0.2 + 0.15 * cell], -1)
        lit = (cell > 0.93)[:, None]
        glass = torch.where(lit, torch.tensor([0.9, 0.8, 0.5]), glass)
        shop = (z < 2.2) & (z > 0.4) & (fu > 0.3) & (fu < w[:, 1] - 0.3) & (n[:, 2].abs() < 0.5)
        c = col[s]
        c = torch.where(inwin[:, None], glass, c)
        c = torch.where(shop[:, None], c * 0.45, c)
        c = torch.where((n[:, 2] > 0.5)[:, None], c * 0.6, c)
        col[s] = c
    cab = (kind == CAR_CABIN) & (nrm[:, 2] < 0.5)
    col[cab] = torch.tensor([0.1, 0.12, 0.15])
    return col


def _sphere_boxes(spheres):
    return spheres[:, :3] - spheres[:, 3:], spheres[:, :3] + spheres[:, 3:]


def _sun_shadow(world: StreetWorld, p, lo, hi, cell: float = 1.5):
    """(N,) bool: is the sun blocked from points p (N, 3)? Rays towards the sun are binned on a grid in the
    plane perpendicular to the sun direction (boxes and crowns registered by their projected extent)."""
    sun = world.sun
    e1 = F.normalize(torch.linalg.cross(sun, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    e2 = torch.linalg.cross(sun, e1)
    P = torch.stack([e1, e2], 1)                                       # (3, 2)
    pa = p @ P
    amin, bmin = pa.min(0).values - cell
    amax, bmax = pa.max(0).values + cell
    na, nb = int(((amax - amin) / cell).ceil()), int(((bmax - bmin) / cell).ceil())
    grid = (float(amin), float(bmin), cell, cell, na, nb, 0)

    def reg(l, h):
        c = _corners(l, h) @ P
        return _box_bins(c[..., 0].min(-1).values, c[..., 0].max(-1).values, c[..., 1].min(-1).values,
                         c[..., 1].max(-1).values, torch.zeros(l.shape[0], dtype=torch.bool), grid)
    ray_bin = ((pa[:, 1] - bmin) / cell).floor().clamp(0, nb - 1).long() * na + \
        ((pa[:, 0] - amin) / cell).floor().clamp(0, na - 1).long()
    o = p
    d = sun.expand_as(p)
    ts, what, _, _ = _cast(o, d, lo, hi, world.spheres, 500.0, ray_bin, reg(lo, hi),
                           reg(*_sphere_boxes(world.spheres)), na * nb, ground=False)
    return what >= 0


def shade(world: StreetWorld, o, d, t, what, idx, nrm, lo, hi, shadows: bool = True, shadow_range: float = 90.0):
    """RGB (N, 3) of cast rays: albedo x (ambient + sun x visibility), sky for misses, distance fog."""
    N = o.shape[0]
    hitm = what >= 0
    p = o + torch.where(hitm, t, torch.zeros_like(t))[:, None] * d
    alb = torch.zeros(N, 3)
    g = (what == 0).nonzero().squeeze(1)
    alb[g] = _ground_albedo(world, p[g])
    b = (what == 1).nonzero().squeeze(1)
    alb[b] = _box_albedo(world, p[b], idx[b], nrm[b], lo)
    s = (what == 2).nonzero().squeeze(1)
    if s.numel():
        leaf = value_noise(p[s] * 2.5, world.seed + 7, octaves=2)
        alb[s] = world.sphere_color[idx[s]] * (0.6 + 0.8 * leaf)[:, None]
    lam = (nrm @ world.sun).clamp_min(0)
    if shadows:
        sel = (hitm & (lam > 0) & (t < shadow_range)).nonzero().squeeze(1)
        if sel.numel():
            blocked = _sun_shadow(world, p[sel] + nrm[sel] * 1e-3, lo, hi)
            lam[sel] = torch.where(blocked, torch.zeros_like(lam[sel]), lam[sel])
    rgb = alb * (0.45 + 0.65 * lam)[:, None]
    up = d[:, 2].clamp(0, 1)[:, None]
    horizon = torch.tensor([0.82, 0.87, 0.93])
    sky = horizon * (1 - up) + torch.tensor([0.35, 0.55, 0.85]) * up
    fog = 1 - torch.exp(-torch.where(hitm, t, torch.zeros_like(t)) / 220.0)
    rgb = rgb * (1 - fog[:, None]) + horizon * fog[:, None]
    return torch.where(hitm[:, None], rgb, sky).clamp(0, 1)


def render_cameras(world: StreetWorld, t: float, c2w: torch.Tensor, K: torch.Tensor, H: int, W: int,
                   far: float = 150.0, shadows: bool = True, tile: int = 8):
    """RGB (C, 3, H, W) and z-depth (C, 1, H, W) (0 = nothing within ``far``) of C cameras at time t.
    Rays are binned by image tile; each box / crown is registered in the tiles its projection covers."""
    C = c2w.shape[0]
    lo, hi = world.boxes_at(t)
    slo, shi = _sphere_boxes(world.spheres)
    na, nb = -(-W // tile), -(-H // tile)
    o, d = camera_rays(c2w, K, H, W)
    o, d = o.reshape(C, -1, 3), d.reshape(C, -1, 3)
    ray_bin, bb, sb = [], ([], []), ([], [])
    for c in range(C):
        w2c = invert_pose(c2w[c])
        ext = (-float(K[c, 0, 2]) / float(K[c, 0, 0]), (W - float(K[c, 0, 2])) / float(K[c, 0, 0]),
               -float(K[c, 1, 2]) / float(K[c, 1, 1]), (H - float(K[c, 1, 2])) / float(K[c, 1, 1]))
        ray_bin.append(_ray_tiles(o[c], d[c], w2c, ext, (na, nb), c * na * nb))
        for lst, (l, h) in ((bb, (lo, hi)), (sb, (slo, shi))):
            pi, bi = _pinhole_bins(l, h, w2c, ext, (na, nb), c * na * nb)
            lst[0].append(pi), lst[1].append(bi)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    cat = lambda x: (torch.cat(x[0]), torch.cat(x[1]))  # noqa: E731
    tt, what, idx, nrm = _cast(o, d, lo, hi, world.spheres, far, torch.cat(ray_bin), cat(bb), cat(sb), C * na * nb)
    rgb = shade(world, o, d, tt, what, idx, nrm, lo, hi, shadows)
    fwd = c2w[:, :3, 2].repeat_interleave(H * W, 0)
    z = torch.where(what >= 0, tt * (d * fwd).sum(-1), torch.zeros_like(tt))
    return rgb.reshape(C, H, W, 3).permute(0, 3, 1, 2).contiguous(), z.reshape(C, 1, H, W)


def lidar_scan(world: StreetWorld, t: float, ego2world: torch.Tensor, azimuths: int = 256, beams: int = 32,
               max_range: float = 70.0, min_range: float = 1.0):
    """Ray-cast LiDAR at time t -> points (P, 3) in the ego frame and mask (P,), P = beams * azimuths
    (row-major: beam, then azimuth from +x towards +y). Rays are binned in six 60-degree sectors."""
    el = torch.linspace(math.radians(-30.0), math.radians(10.0), beams)
    az = torch.arange(azimuths) * (2 * math.pi / azimuths)
    el, az = torch.meshgrid(el, az, indexing="ij")
    d_ego = torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1).reshape(-1, 3)
    o_ego = torch.tensor([0.0, 0.0, LIDAR_HEIGHT]).expand_as(d_ego)
    R, tr = ego2world[:3, :3], ego2world[:3, 3]
    o, d = o_ego @ R.T + tr, d_ego @ R.T
    lo, hi = world.boxes_at(t)
    slo, shi = _sphere_boxes(world.spheres)
    sector = torch.remainder(((az.reshape(-1) + math.pi / 6) / (math.pi / 3)).floor().long(), 6)
    m = 1.0 / math.cos(math.pi / 6)
    ext = (-math.tan(math.pi / 6) - 0.01, math.tan(math.pi / 6) + 0.01, -math.tan(math.radians(10)) * m - 0.01,
           math.tan(math.radians(30)) * m + 0.01)
    tiles = (8, 8)
    ray_bin = torch.zeros(o.shape[0], dtype=torch.int64)
    bb, sb = ([], []), ([], [])
    for k in range(6):
        yaw = k * math.pi / 3
        c2e = torch.eye(4)
        c2e[:3, 0] = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
        c2e[:3, 1] = torch.tensor([0.0, 0.0, -1.0])
        c2e[:3, 2] = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        c2e[2, 3] = LIDAR_HEIGHT
        w2c = invert_pose(ego2world @ c2e)
        sel = (sector == k).nonzero().squeeze(1)
        ray_bin[sel] = _ray_tiles(o[sel], d[sel], w2c, ext, tiles, k * 64)
        for lst, (l, h) in ((bb, (lo, hi)), (sb, (slo, shi))):
            pi, bi = _pinhole_bins(l, h, w2c, ext, tiles, k * 64)
            lst[0].append(pi), lst[1].append(bi)
    cat = lambda x: (torch.cat(x[0]), torch.cat(x[1]))  # noqa: E731
    tt, what, _, _ = _cast(o, d, lo, hi, world.spheres, max_range, ray_bin, cat(bb), cat(sb), 6 * 64)
    mask = (what >= 0) & (tt >= min_range)
    pts = torch.where(mask[:, None], o_ego + tt.nan_to_num(0, posinf=0)[:, None] * d_ego, torch.zeros_like(d_ego))
    return pts, mask


def bev_labels(world: StreetWorld, t: float, ego2world: torch.Tensor, bev_range: float = 51.2, bev_res=128) -> torch.Tensor:
    """(Hb, Wb) int64 BEV labels on the ego-centred grid (see the module docstring)."""
    Hb, Wb = (bev_res, bev_res) if isinstance(bev_res, int) else bev_res
    ys = -bev_range + (torch.arange(Hb) + 0.5) * (2 * bev_range / Hb)
    xs = -bev_range + (torch.arange(Wb) + 0.5) * (2 * bev_range / Wb)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pe = torch.stack([gx, gy, torch.zeros_like(gx)], -1).reshape(-1, 3)
    pw = pe @ ego2world[:3, :3].T + ego2world[:3, 3]
    lab = torch.zeros(pw.shape[0], dtype=torch.int64)
    lab[pw[:, 1].abs() < world.road_half] = 1
    lo, hi = world.boxes_at(t)
    for kind, value in ((BUILDING, 3), (CAR_BODY, 2)):
        sel = (world.kind == kind).nonzero().squeeze(1)
        inside = ((pw[:, None, :2] >= lo[None, sel, :2]) & (pw[:, None, :2] <= hi[None, sel, :2])).all(-1).any(-1)
        lab[inside] = value
    return lab.reshape(Hb, Wb)


class ProceduralDriving(Dataset):
    """Procedural street scenes seen by a 6-camera rig over T frames (MIM4D's default data).

    Item ``i`` is deterministic in (seed, split, i); splits use disjoint seed streams. Returns a dict:
      images (T, 6, 3, H, W) in [0, 1]; depths (T, 6, 1, H, W) camera z-depth (0 = sky / beyond ``far``);
      K (6, 3, 3) pixels; cam2ego (6, 4, 4) OpenCV camera -> ego; ego2world (T, 4, 4);
      lidar (T, P, 3) ego-frame points with lidar_mask (T, P) bool (P = 32 * lidar_azimuths, padded with 0);
      lidar2ego (4, 4) the LiDAR's mounting (``lidar2ego()``);
      bev (T, Hb, Wb) int64 labels (0 other, 1 road, 2 car, 3 building) on the ego-centred grid described in
      the module docstring; timestamps (T,) seconds since the first frame (k * frame_dt); cam_names (list of 6 str);
      seed () int64 (``random_street(seed)`` rebuilds the world).
    Cars in other lanes move at their own lane speeds (the opposite direction moves towards -x), so frames
    differ by more than ego motion. The first frame is at a random time in ``start_time`` seconds.
    ``threads``: torch intra-op threads while rendering (``nano4d.data.common.limit_threads``). ``cache_dir``: scenes
    are written there as rig JSON (+ PNG / .npy) on first use and always served from there, also on the first
    access (images quantized to 8 bit; LiDAR points compacted to the front of the padded array)."""

    def __init__(self, num_scenes: int = 1000, num_frames: int = 3, res=(96, 176), seed: int = 0, split: str = "train",
                 frame_dt: float = 0.5, lidar_azimuths: int = 256, lidar_range: float = 70.0, bev_range: float = 51.2,
                 bev_res=128, far: float = 150.0, shadows: bool = True, start_time: tuple = (0.0, 4.0),
                 threads: int | None = 1, cache_dir: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if num_frames < 1 or num_scenes < 1:
            raise ValueError("num_frames and num_scenes must be >= 1")
        self.num_scenes, self.num_frames, self.seed, self.split = num_scenes, num_frames, seed, split
        self.res = (res, res) if isinstance(res, int) else tuple(res)
        self.frame_dt, self.lidar_azimuths, self.lidar_range = frame_dt, lidar_azimuths, lidar_range
        self.bev_range, self.bev_res, self.far, self.shadows, self.start_time = bev_range, bev_res, far, shadows, start_time
        self.threads, self.cache_dir = threads, cache_dir

    def __len__(self) -> int:
        return self.num_scenes

    def scene_seed(self, i: int) -> int:
        return split_seed(self.seed, self.split, i)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_scenes:
            raise IndexError(f"index {i} out of range for {self.num_scenes} scenes")
        with limit_threads(self.threads):
            if not self.cache_dir:
                return self._make(i)
            H, W = self.res
            tag = (f"{self.split}-s{self.seed}-T{self.num_frames}-{H}x{W}-dt{self.frame_dt:g}-az{self.lidar_azimuths}"
                   f"-lr{self.lidar_range:g}-bev{self.bev_range:g}x{self.bev_res}-far{self.far:g}-sh{int(self.shadows)}"
                   f"-st{self.start_time[0]:g},{self.start_time[1]:g}")
            path = os.path.join(self.cache_dir, tag, f"{i:07d}", "rig.json")
            if not os.path.isfile(path):                # the JSON is written last (atomically): complete or absent
                write_rig(os.path.dirname(path), self._make(i))
            s = load_rig_frames(read_rig(path), list(range(self.num_frames)), max_points=32 * self.lidar_azimuths)
            s["seed"] = torch.tensor(self.scene_seed(i))
            return s

    def start_time_of(self, i: int) -> float:
        """Scene time (s) of item i's first frame (``random_street(scene_seed(i)).boxes_at(t)`` etc.)."""
        return float(np.random.default_rng(self.scene_seed(i) + 1).uniform(*self.start_time))

    def _make(self, i: int) -> dict:
        s = self.scene_seed(i)
        world = random_street(s)
        t0 = self.start_time_of(i)
        H, W = self.res
        cam2ego, K = rig_cameras(H, W)
        T = self.num_frames
        imgs, deps, poses, pts, masks, bevs = [], [], [], [], [], []
        for k in range(T):
            t = t0 + k * self.frame_dt
            e2w = ego_pose(world, t)
            c2w = e2w @ cam2ego
            rgb, dep = render_cameras(world, t, c2w, K, H, W, self.far, self.shadows)
            imgs.append(rgb)
            deps.append(dep)
            p, m = lidar_scan(world, t, e2w, self.lidar_azimuths, max_range=self.lidar_range)
            poses.append(e2w), pts.append(p), masks.append(m)
            bevs.append(bev_labels(world, t, e2w, self.bev_range, self.bev_res))
        return dict(images=torch.stack(imgs), depths=torch.stack(deps), K=K, cam2ego=cam2ego,
                    ego2world=torch.stack(poses), lidar=torch.stack(pts), lidar_mask=torch.stack(masks), lidar2ego=lidar2ego(),
                    bev=torch.stack(bevs), timestamps=torch.tensor([k * self.frame_dt for k in range(T)]),
                    cam_names=list(CAM_NAMES), seed=torch.tensor(s))
