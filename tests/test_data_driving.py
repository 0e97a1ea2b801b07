"""nano4d.data.driving: procedural street scenes (cameras, LiDAR, BEV labels, ego motion, cache)."""

import pytest
import torch

from nano4d.cameras import camera_rays, invert_pose, project_points
from nano4d.data import driving as R
from nano4d.data.common import split_seed


@pytest.fixture(scope="module")
def drive_sample():
    ds = R.ProceduralDriving(3, num_frames=3, res=(32, 56), lidar_azimuths=96, bev_res=64, frame_dt=1.0)
    return ds, ds[1]


def test_driving_shapes_and_determinism(drive_sample):
    ds, s = drive_sample
    shapes = dict(images=(3, 6, 3, 32, 56), depths=(3, 6, 1, 32, 56), K=(6, 3, 3), cam2ego=(6, 4, 4),
                  ego2world=(3, 4, 4), lidar=(3, 32 * 96, 3), lidar_mask=(3, 32 * 96), bev=(3, 64, 64))
    for k, sh in shapes.items():
        assert tuple(s[k].shape) == sh, k
    assert s["bev"].dtype == torch.int64 and s["lidar_mask"].dtype == torch.bool
    assert s["cam_names"] == list(R.CAM_NAMES)
    assert set(s["bev"].unique().tolist()) == {0, 1, 2, 3}
    assert s["images"].min() >= 0 and s["images"].max() <= 1 and (s["depths"] >= 0).all()
    assert 0.3 < s["lidar_mask"].float().mean() <= 1
    assert (s["lidar"][s["lidar_mask"]].norm(dim=-1) < 75).all()
    again = R.ProceduralDriving(3, num_frames=3, res=(32, 56), lidar_azimuths=96, bev_res=64, frame_dt=1.0)[1]
    for k in shapes:
        assert torch.equal(again[k], s[k]), k
    assert not torch.equal(ds[2]["images"], s["images"])
    val = R.ProceduralDriving(3, split="val")
    assert not {ds.scene_seed(i) for i in range(20)} & {val.scene_seed(i) for i in range(20)}


def test_street_worlds_are_well_formed():
    for seed in range(12):
        w = R.random_street(seed)
        assert (w.hi > w.lo).all(), f"inverted box in street {seed}"
        cars = (w.kind == R.CAR_BODY).nonzero().squeeze(1)
        lo, hi = w.boxes_at(0.0)
        # no moving car overlaps the ego's start position, and the ego lane is on the +x side (y < 0)
        ego = torch.tensor([0.0, w.ego_y])
        assert not (((lo[cars, :2] - 1.0) <= ego) & (ego <= (hi[cars, :2] + 1.0))).all(-1).any()
        assert -w.road_half < w.ego_y < 0 and (w.vel[w.vel != 0] != 0).any()
        assert (w.spheres[:, 3] > 0).all()


def test_rig_geometry():
    c2e, K = R.rig_cameras(90, 160)
    fwd = c2e[:, :3, 2]
    assert torch.allclose(fwd[0], torch.tensor([1.0, 0, 0]))                        # CAM_FRONT looks along +x
    assert torch.allclose(fwd[3], torch.tensor([-1.0, 0, 0]), atol=1e-6)            # CAM_BACK along -x
    assert fwd[2, 1] > 0.5 and fwd[1, 1] < -0.5                                      # FRONT_LEFT is +y (left)
    assert torch.allclose(c2e[:, :3, 1], torch.tensor([0.0, 0, -1]).expand(6, 3))   # image down = ego down
    assert (torch.linalg.det(c2e[:, :3, :3]) > 0.999).all()
    hfov = 2 * torch.rad2deg(torch.atan(80 / K[:, 0, 0]))
    assert torch.allclose(hfov[[0, 1, 2, 4, 5]], torch.full((5,), 70.0), atol=1e-3) and hfov[3] > 90


def test_driving_lidar_agrees_with_camera_depth(drive_sample):
    """LiDAR points (ego frame) moved to each camera with ego2world/cam2ego/K land on pixels whose rendered
    z-depth equals their own depth (cameras and LiDAR see the same world through the documented frames)."""
    _, s = drive_sample
    H, W = 32, 56
    good = total = 0
    for k in range(3):
        p = s["lidar"][k][s["lidar_mask"][k]]
        pw = p @ s["ego2world"][k, :3, :3].T + s["ego2world"][k, :3, 3]
        for c in range(6):
            c2w = s["ego2world"][k] @ s["cam2ego"][c]
            uv, z = project_points(pw, invert_pose(c2w), s["K"][c])
            ok = (z > 1) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            dep = s["depths"][k, c, 0, uv[ok, 1].long(), uv[ok, 0].long()]
            rel = (dep - z[ok]).abs() / z[ok]
            good += int((rel < 0.05).sum())
            total += int(ok.sum())
    assert total > 1000 and good / total > 0.8, (good, total)


def test_driving_depth_backprojects_above_ground(drive_sample):
    _, s = drive_sample
    k, c = 0, 0
    c2w = s["ego2world"][k] @ s["cam2ego"][c]
    d = s["depths"][k, c, 0]
    i, j = (d > 0).nonzero().unbind(1)
    z = d[i, j]
    cam = torch.stack([(j + 0.5 - s["K"][c, 0, 2]) / s["K"][c, 0, 0] * z, (i + 0.5 - s["K"][c, 1, 2]) / s["K"][c, 1, 1] * z, z], -1)
    X = cam @ c2w[:3, :3].T + c2w[:3, 3]
    assert X[:, 2].min() > -1e-3                                # nothing below the ground plane
    assert ((X[:, 2].abs() < 1e-3) & (i > 25)).sum() > 0.5 * (i > 25).sum()   # the lower image is mostly ground
    sky = (d == 0)
    assert sky[:8].float().mean() > sky[-8:].float().mean()      # sky is at the top


def test_ego_heading_follows_motion():
    w = R.random_street(split_seed(0, "train", 4))
    assert w.weave[0] > 0.05
    for t in (0.3, 1.1, 2.7):
        v = R.ego_pose(w, t + 1e-3)[:3, 3] - R.ego_pose(w, t - 1e-3)[:3, 3]
        fwd = R.ego_pose(w, t)[:3, 0]
        assert torch.allclose(fwd, v / v.norm(), atol=1e-3)
        assert torch.allclose(R.ego_pose(w, t)[:3, 2], torch.tensor([0.0, 0, 1]))


def test_bev_labels_agree_with_lidar_and_world(drive_sample):
    """BEV is ego-centred: LiDAR points (ego frame) 0.5-1 m above the ground fall on car/building cells, ground
    points never do; road cells are exactly the carriageway |y_world| < road_half."""
    ds, s = drive_sample
    w = R.random_street(ds.scene_seed(1))
    cell = 2 * 51.2 / 64
    for k in range(3):
        p = s["lidar"][k][s["lidar_mask"][k]]
        fine = R.bev_labels(w, ds.start_time_of(1) + k * ds.frame_dt, s["ego2world"][k], 25.6, 256)
        ray = torch.nn.functional.normalize(p - torch.tensor([0.0, 0.0, R.LIDAR_HEIGHT]), dim=-1)
        q = p + 0.3 * ray                                         # just behind the hit surface
        ix, iy = ((q[:, 0] + 25.6) / 0.2).long(), ((q[:, 1] + 25.6) / 0.2).long()
        inside = (ix >= 0) & (ix < 256) & (iy >= 0) & (iy < 256)
        lab = fine[iy.clamp(0, 255), ix.clamp(0, 255)]
        mid = inside & (p[:, 2] > 0.5) & (p[:, 2] < 1.0)
        assert mid.sum() > 20 and torch.isin(lab[mid], torch.tensor([2, 3])).float().mean() > 0.8
        ground = inside & (p[:, 2].abs() < 0.02)
        assert torch.isin(lab[ground], torch.tensor([0, 1])).float().mean() > 0.98
        assert torch.equal(R.bev_labels(w, ds.start_time_of(1) + k * ds.frame_dt, s["ego2world"][k], 51.2, 64), s["bev"][k])
        c = -51.2 + (torch.arange(64) + 0.5) * cell
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        pw = torch.stack([gx, gy, torch.zeros_like(gx)], -1) @ s["ego2world"][k, :3, :3].T + s["ego2world"][k, :3, 3]
        free = s["bev"][k] <= 1
        assert torch.equal(s["bev"][k][free] == 1, pw[..., 1].abs()[free] < w.road_half)


def test_binned_ray_casting_matches_brute_force():
    w = R.random_street(123)
    c2e, K = R.rig_cameras(24, 40)
    c2w = R.ego_pose(w, 1.5) @ c2e
    o, d = camera_rays(c2w, K, 24, 40)
    lo, hi = w.boxes_at(1.5)
    t, what, idx, _ = R._cast(o.reshape(-1, 3), d.reshape(-1, 3), lo, hi, w.spheres, 150.0)
    z_brute = torch.where(what >= 0, t * (d.reshape(-1, 3) * c2w[:, :3, 2].repeat_interleave(24 * 40, 0)).sum(-1), 0)
    _, z = R.render_cameras(w, 1.5, c2w, K, 24, 40, shadows=False)
    assert torch.allclose(z.flatten(), z_brute, atol=1e-4)


def test_moving_cars_move_in_bev():
    w = R.random_street(split_seed(0, "train", 1))
    t0, t1 = 0.0, 2.0
    e0, e1 = R.ego_pose(w, t0), R.ego_pose(w, t1)
    moving = ((w.kind == R.CAR_BODY) & (w.vel != 0)).nonzero().squeeze(1)
    assert len(moving) > 0
    lo0, hi0 = w.boxes_at(t0)
    lo1, hi1 = w.boxes_at(t1)
    assert torch.allclose((lo1 - lo0)[moving, 0], w.vel[moving] * (t1 - t0))
    bev0, bev1 = R.bev_labels(w, t0, e0), R.bev_labels(w, t1, e1)

    def label(bev, e2w, p):                                    # BEV label at world xy
        pe = invert_pose(e2w)[:3, :3] @ torch.tensor([p[0], p[1], 0.0]) + invert_pose(e2w)[:3, 3]
        ix, iy = int((pe[0] + 51.2) / 0.8), int((pe[1] + 51.2) / 0.8)
        return int(bev[iy, ix]) if 0 <= ix < 128 and 0 <= iy < 128 else None
    checked = 0
    for m in moving.tolist():
        c0, c1 = 0.5 * (lo0[m] + hi0[m]), 0.5 * (lo1[m] + hi1[m])
        if abs(float(w.vel[m] - w.ego_speed)) * (t1 - t0) < 8 or None in (label(bev0, e0, c0), label(bev1, e1, c1)):
            continue
        others = [o for o in moving.tolist() if o != m]
        free = all(not ((lo1[o, :2] - 0.8 <= c0[:2]) & (c0[:2] <= hi1[o, :2] + 0.8)).all() for o in others)
        assert label(bev0, e0, c0) == 2 and label(bev1, e1, c1) == 2
        if free:
            assert label(bev1, e1, c0) in (1, 0)                   # the car has left its old place
            checked += 1
    assert checked > 0


def test_driving_cache(tmp_path, drive_sample):
    _, s = drive_sample
    kw = dict(num_frames=3, res=(32, 56), lidar_azimuths=96, bev_res=64, frame_dt=1.0, cache_dir=str(tmp_path))
    first = R.ProceduralDriving(3, **kw)[1]
    cached = R.ProceduralDriving(3, **kw)[1]                 # read back from the rig files
    assert len(list(tmp_path.rglob("rig.json"))) == 1
    for k in first:                                           # the first access is served from the cache too
        assert torch.equal(first[k], cached[k]) if torch.is_tensor(first[k]) else first[k] == cached[k], k
    for k in ("depths", "K", "bev", "timestamps", "seed", "lidar_mask"):
        assert torch.equal(cached[k].sum(-1) if k == "lidar_mask" else cached[k],
                           s[k].sum(-1) if k == "lidar_mask" else s[k]), k
    assert (cached["images"] - s["images"]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(cached["ego2world"], s["ego2world"], atol=1e-5)
    for k in range(3):
        assert torch.allclose(cached["lidar"][k][cached["lidar_mask"][k]], s["lidar"][k][s["lidar_mask"][k]], atol=1e-5)
