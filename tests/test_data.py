"""Procedural data (objects, driving scenes) and real-format loaders (GObjaverse, image folders, rig JSON)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d import data as D
from nano4d import driving as R
from nano4d import loaders as L
from nano4d import rig as RJ
from nano4d.utils import invert_pose, look_at, project_points


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _box_object(centre=(0.2, 0.0, 0.0), half=(0.2, 0.05, 0.1)) -> D.SDFObject:
    """One axis-aligned box, hand-built (no normalization), solid colour."""
    return D.SDFObject(
        prim_type=torch.tensor([D.PRIM_TYPES.index("box")]), params=torch.tensor([[*half, 0.0]]),
        rot=torch.eye(3)[None], trans=torch.tensor([centre]), op=torch.tensor([0]), smooth=torch.zeros(1),
        tex=torch.tensor([0]), colors=torch.tensor([[[0.8, 0.2, 0.1], [0.0, 0.0, 0.0]]]), tex_freq=torch.ones(1),
        tex_axis=torch.tensor([[1.0, 0.0, 0.0]]), tex_seed=torch.ones(1, dtype=torch.int64),
        light_dir=torch.tensor([0.0, 0.0, 1.0]), ambient=0.4)


# ---------------------------------------------------------------------------------------------- objects


def test_objects_shapes_determinism_and_splits():
    kw = dict(num_objects=4, num_views=5, res=(20, 24), occ_res=8, num_surface_points=64)
    a, b = D.ProceduralObjects(**kw)[1], D.ProceduralObjects(**kw)[1]
    shapes = dict(images=(5, 3, 20, 24), alphas=(5, 1, 20, 24), depths=(5, 1, 20, 24), normals=(5, 3, 20, 24),
                  c2w=(5, 4, 4), K=(5, 3, 3), occupancy=(8, 8, 8), surface_points=(64, 3), background=(3,))
    for k, s in shapes.items():
        assert tuple(a[k].shape) == s, k
        assert a[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), f"{k} not deterministic"
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    bg_px = a["alphas"].expand_as(a["images"]) == 0
    assert (a["images"][bg_px] == 1).all()                      # white background
    assert 0 < a["alphas"].mean() < 1 and 0 < a["occupancy"].mean() < 1
    assert (a["depths"][a["alphas"] == 0] == 0).all() and (a["depths"][a["alphas"] == 1] > 0).all()
    other = D.ProceduralObjects(**kw)[2]
    assert not torch.equal(a["images"], other["images"])
    val = D.ProceduralObjects(split="val", **kw)
    seeds_train = {D.ProceduralObjects(**kw).object_seed(i) for i in range(50)}
    assert not seeds_train & {val.object_seed(i) for i in range(50)}
    batch = next(iter(torch.utils.data.DataLoader(D.ProceduralObjects(**kw), batch_size=2)))
    assert batch["images"].shape == (2, 5, 3, 20, 24) and torch.equal(batch["images"][1], a["images"])
    rnd = D.ProceduralObjects(background="random", **kw)[1]
    bg = rnd["background"].view(3, 1, 1)
    mask = rnd["alphas"] == 0
    assert torch.allclose((rnd["images"] - bg).abs().sum(1, keepdim=True)[mask], torch.zeros(1), atol=1e-6)
    assert torch.equal(rnd["depths"], a["depths"])          # background does not change geometry
    with pytest.raises(ValueError, match="split"):
        D.ProceduralObjects(split="tarin")
    with pytest.raises(ValueError, match="background"):
        D.ProceduralObjects(background="blue")


def test_primitives_are_exact_sdfs():
    """Each primitive: 1-Lipschitz (what sphere tracing needs) with unit gradient almost everywhere."""
    g = torch.Generator().manual_seed(0)
    params = dict(sphere=[0.3, 0, 0, 0], box=[0.3, 0.1, 0.2, 0], round_box=[0.3, 0.15, 0.2, 0.05],
                  capsule=[0.2, 0.1, 0, 0], cylinder=[0.2, 0.15, 0, 0], torus=[0.25, 0.08, 0, 0],
                  cone=[0.25, 0.2, 0.05, 0], hex_prism=[0.2, 0.25, 0, 0])
    assert set(params) == set(D.PRIM_TYPES)
    for name, p in params.items():
        k, p = D.PRIM_TYPES.index(name), torch.tensor(p, dtype=torch.float64)
        x = (torch.rand(3000, 3, generator=g, dtype=torch.float64) - 0.5) * 1.2
        y = x + 0.05 * torch.randn(3000, 3, generator=g, dtype=torch.float64)
        dx, dy = D._prim_sdf(k, x, p), D._prim_sdf(k, y, p)
        assert ((dx - dy).abs() <= (x - y).norm(dim=-1) + 1e-9).all(), name
        assert (dx < 0).any() and (dx > 0).any(), name
        h = 1e-5
        grad = torch.stack([(D._prim_sdf(k, x + h * e, p) - D._prim_sdf(k, x - h * e, p)) / (2 * h)
                            for e in torch.eye(3, dtype=torch.float64)], -1).norm(dim=-1)
        assert ((grad - 1).abs() < 1e-3).float().mean() > 0.97, name


def test_orbit_cameras_ring_and_sphere():
    c2w, K = D.orbit_cameras(7, (30, 40), fov_deg=40.0, distance=2.0, elevation_deg=20.0, seed=3)
    eye = c2w[:, :3, 3]
    assert torch.allclose(eye.norm(dim=-1), torch.full((7,), 2.0), atol=1e-5)
    el = torch.rad2deg(torch.asin(eye[:, 2] / 2.0))
    assert torch.allclose(el[:4], torch.full((4,), 20.0), atol=1e-3)
    az = torch.atan2(eye[:4, 1], eye[:4, 0])
    step = torch.remainder(torch.rad2deg(az[1:] - az[:-1]), 360)
    assert torch.allclose(step, torch.full((3,), 90.0), atol=1e-3)
    uv, z = project_points(torch.zeros(1, 3), invert_pose(c2w), K)        # all look at the origin
    assert torch.allclose(uv, torch.tensor([20.0, 15.0]).expand(7, 1, 2), atol=1e-3)
    assert torch.allclose(z, torch.full((7, 1), 2.0), atol=1e-5)
    assert math.isclose(2 * math.degrees(math.atan(15 / K[0, 1, 1].item())), 40.0, rel_tol=1e-5)
    R_ = c2w[:, :3, :3]
    assert torch.allclose(R_ @ R_.transpose(1, 2), torch.eye(3).expand(7, 3, 3), atol=1e-5)
    assert (torch.linalg.det(R_) > 0).all()


def test_render_depth_backprojects_to_surface_and_same_pixel():
    """A rendered surface pixel p with depth z back-projects to a point on the surface (|SDF| ~ 0) that
    projects to p again with depth z; normals are unit, outward and face the camera."""
    obj = D.random_object(11)
    c2w, K = D.orbit_cameras(3, 32, seed=1)
    out = D.render_object(obj, c2w, K, 32, 32)
    for v in range(3):
        m = out["alpha"][v, 0] > 0
        i, j = m.nonzero().unbind(1)
        z = out["depth"][v, 0, i, j]
        uv = torch.stack([j + 0.5, i + 0.5], -1)
        cam = torch.cat([uv, torch.ones_like(z)[:, None]], -1) @ torch.linalg.inv(K[v]).T * z[:, None]
        X = cam @ c2w[v, :3, :3].T + c2w[v, :3, 3]
        assert D.object_sdf(obj, X).abs().max() < 2e-3
        uv2, z2 = project_points(X, invert_pose(c2w[v]), K[v])
        assert torch.allclose(uv2, uv, atol=1e-3) and torch.allclose(z2, z, atol=1e-4)
        n = out["normal"][v][:, i, j].T
        assert torch.allclose(n.norm(dim=-1), torch.ones(len(n)), atol=1e-4)
        d = torch.nn.functional.normalize(X - c2w[v, :3, 3], dim=-1)
        assert ((n * d).sum(-1) < 0.05).float().mean() > 0.99
        g = D.sdf_normals(obj, X + 0.01 * n)           # outward: SDF grows along n
        assert (D.object_sdf(obj, X + 0.01 * n) > 0).float().mean() > 0.97 and g.shape == n.shape


def test_surface_points_and_sphere_tracing_agree():
    """Rays from a camera towards surface samples never pass through a surface unseen: the traced hit is
    never beyond the sample, and for the visible majority it is the sample itself."""
    obj = D.random_object(5)
    pts = D.sample_surface(obj, 3000, seed=0, tol=2e-4)     # below the tracer's hit threshold (4e-4)
    assert D.object_sdf(obj, pts).abs().max() < 2e-4 and pts.abs().max() <= 0.5
    c2w, _ = D.orbit_cameras(2, 48, seed=2)
    for v in range(2):
        o = c2w[v, :3, 3].expand_as(pts)
        dist = (pts - o).norm(dim=-1)
        hit, t = D.sphere_trace(obj, o, (pts - o) / dist[:, None])
        assert hit.all() and (t <= dist + 2e-3).all()
        assert ((t - dist).abs() < 2e-3).float().mean() > 0.15


def test_occupancy_matches_sdf_sign_and_zyx_layout():
    obj = _box_object()
    occ = D.occupancy_grid(obj, 20)
    cen = D.grid_centers(20)
    x, y, z = cen.unbind(-1)
    inside = ((x - 0.2).abs() <= 0.2) & (y.abs() <= 0.05) & (z.abs() <= 0.1)
    assert torch.equal(occ, inside.float())
    assert torch.allclose(cen[0, 0, :, 0], -0.5 + (torch.arange(20) + 0.5) / 20)      # X varies along the last dim
    nz = occ.nonzero()                                                                 # (k, j, i) = (z, y, x)
    assert nz[:, 2].max() - nz[:, 2].min() > nz[:, 0].max() - nz[:, 0].min() > nz[:, 1].max() - nz[:, 1].min()
    # random object: every occupied cell centre is hidden behind (or on) the rendered surface in every view
    obj = D.random_object(21)
    occ = D.occupancy_grid(obj, 16)
    pts = D.grid_centers(16)[occ > 0]
    assert len(pts) > 5
    sdf = D.object_sdf(obj, D.grid_centers(16).reshape(-1, 3)).reshape(16, 16, 16)
    assert torch.equal(occ > 0, sdf <= 0)
    c2w, K = D.orbit_cameras(3, 40, seed=0)
    for v in range(3):
        o = c2w[v, :3, 3].expand_as(pts)
        dist = (pts - o).norm(dim=-1)
        hit, t = D.sphere_trace(obj, o, (pts - o) / dist[:, None])
        assert hit.all() and (t <= dist + 1e-3).all()
    surf = D.occupancy_grid(obj, 16, mode="surface")
    assert (surf * (sdf.abs() > 0.5 * math.sqrt(3) / 16)).sum() == 0 and surf.sum() > 0
    with pytest.raises(ValueError, match="mode"):
        D.occupancy_grid(obj, 8, mode="hollow")


def test_supersample_and_composite():
    obj = D.random_object(4)
    c2w, K = D.orbit_cameras(1, 16, seed=0)
    a1 = D.render_object(obj, c2w, K, 16, 16, supersample=1)["alpha"]
    a3 = D.render_object(obj, c2w, K, 16, 16, supersample=3)
    frac = ((a3["alpha"] > 0) & (a3["alpha"] < 1)).sum()
    assert frac > 0 and (a3["alpha"] - a1).abs().mean() < 0.1
    rgb = torch.rand(2, 3, 4, 4)
    alpha = torch.rand(2, 1, 4, 4)
    out = D.composite(rgb, alpha, (0.0, 0.5, 1.0))
    assert torch.allclose(out, rgb * alpha + torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1) * (1 - alpha))


def test_objects_cache_roundtrip(tmp_path):
    kw = dict(num_objects=3, num_views=3, res=16, occ_res=8, num_surface_points=32)
    ref = D.ProceduralObjects(**kw)[2]
    ds = D.ProceduralObjects(cache_dir=str(tmp_path), **kw)
    first, second = ds[2], ds[2]                   # render + write, then read back
    for k in ref:
        tol = 1 / 255 + 1e-6 if k == "images" else 1e-6
        assert torch.allclose(first[k].float(), ref[k].float(), atol=tol), k
        assert torch.allclose(second[k].float(), ref[k].float(), atol=tol), k
    assert not [p for p in os.listdir(next(tmp_path.iterdir())) if p.startswith(".")]   # no temp dirs left


# ---------------------------------------------------------------------------------------------- GObjaverse


def test_gobjaverse_roundtrip(tmp_path):
    ds = D.ProceduralObjects(num_objects=1, num_views=3, res=(12, 16), occ_res=8, num_surface_points=16)
    it = ds[0]
    rgba = torch.cat([it["images"], it["alphas"]], 1).permute(0, 2, 3, 1)
    K = it["K"].clone()
    K[1, 0, 2] += 1.5                                            # off-centre principal point survives
    L.write_gobjaverse_object(str(tmp_path), "obj_a", rgba, it["c2w"], K, depth=it["depths"][:, 0],
                              normal=it["normals"].permute(0, 2, 3, 1), occupancy=it["occupancy"],
                              surface_points=it["surface_points"])
    L.write_gobjaverse_object(str(tmp_path), "obj_b", rgba, it["c2w"], K, depth=it["depths"][:, 0], depth_format="png16")
    r = L.read_gobjaverse_object(str(tmp_path / "obj_a"))
    assert r["view_ids"] == [0, 1, 2]
    assert torch.allclose(r["c2w"], it["c2w"], atol=1e-6) and torch.allclose(r["K"], K, atol=1e-5)
    assert (r["images"] * r["alphas"] - it["images"] * it["alphas"]).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(r["alphas"], it["alphas"])
    assert torch.equal(r["depths"], it["depths"]) and torch.equal(r["normals"], it["normals"])
    assert torch.equal(r["occupancy"], it["occupancy"]) and torch.equal(r["surface_points"], it["surface_points"])
    b = L.read_gobjaverse_object(str(tmp_path / "obj_b"), views=[2])
    assert (b["depths"] - it["depths"][2:]).abs().max() <= 0.5e-4 + 1e-6
    # the JSON alone (x, y, z, origin, fovs; no nano4d 'K') gives the same camera for a centred K
    js = json.loads((tmp_path / "obj_a" / "00000" / "00000.json").read_text())
    c2w0, K0 = L.gobjaverse_camera({k: js[k] for k in ("x", "y", "z", "origin", "x_fov", "y_fov")}, 16, 12)
    assert torch.allclose(c2w0, it["c2w"][0], atol=1e-6) and torch.allclose(K0, it["K"][0], atol=1e-4)
    pts = it["surface_points"][:5]
    assert torch.allclose(project_points(pts, invert_pose(r["c2w"]), r["K"])[0],
                          project_points(pts, invert_pose(it["c2w"]), K)[0], atol=1e-3)


def test_gobjaverse_nd_exr(tmp_path):
    """GObjaverse's <view>_nd.exr (normal xyz in Unity axes + depth) is read when an EXR reader exists."""
    OpenEXR = pytest.importorskip("OpenEXR")
    if not hasattr(OpenEXR, "File"):
        pytest.skip("needs the openexr 3.x API to write the fixture")
    obj = _write_tiny_object(tmp_path, "e", 1)
    os.remove(os.path.join(obj, "00000", "00000_depth.npy"))
    nd = np.random.default_rng(0).normal(size=(6, 8, 4)).astype(np.float32)
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGBA": nd}).write(os.path.join(obj, "00000", "00000_nd.exr"))
    r = L.read_gobjaverse_object(obj)
    alpha = r["alphas"][0, 0].numpy()
    assert (alpha == 0).any() and np.allclose(r["depths"][0, 0].numpy(), nd[..., 3] * (alpha > 0))
    n = r["normals"][0].permute(1, 2, 0).numpy()           # unity2blender: (x, y, z) -> (-z, -x, y)
    assert np.allclose(n, np.stack([-nd[..., 2], -nd[..., 0], nd[..., 1]], -1))
    with open(os.path.join(obj, "00000", "00000_nd.exr"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(D.DataError, match=r"00000_nd\.exr: unreadable EXR"):
        L.read_gobjaverse_object(obj)


def test_gobjaverse_json_convention():
    """GObjaverse JSON: x, y, z = camera right, down, forward in world (OpenCV); fovs in radians."""
    meta = {"x": [1, 0, 0], "y": [0, 0, -1], "z": [0, 1, 0], "origin": [0, -2, 0],
            "x_fov": math.radians(60), "y_fov": math.radians(60)}
    c2w, K = L.gobjaverse_camera(meta, 64, 64)
    uv, z = project_points(torch.tensor([[0.0, 0, 0], [0, 0, 0.5], [0.5, 0, 0]]), invert_pose(c2w), K)
    assert torch.allclose(uv[0], torch.tensor([32.0, 32.0])) and torch.allclose(z, torch.full((3,), 2.0))
    assert uv[1, 1] < 32 and torch.isclose(uv[1, 0], torch.tensor(32.0))        # world up is image up
    assert uv[2, 0] > 32                                                          # world +x is image right
    assert torch.allclose(c2w, look_at(torch.tensor([0.0, -2, 0]), torch.zeros(3)), atol=1e-6)
    assert math.isclose(K[0, 0].item(), 32 / math.tan(math.radians(30)), rel_tol=1e-6)


def _write_tiny_object(root, name, n_views, hw=(6, 8)):
    H, W = hw
    c2w, K = D.orbit_cameras(n_views, (H, W), seed=0, ring_views=min(n_views, 24))
    g = torch.Generator().manual_seed(n_views)
    rgba = torch.rand(n_views, H, W, 4, generator=g)
    rgba[..., 3] = (0.1 + 0.9 * rgba[..., 3]) * (torch.arange(W) % 3 != 0)    # some alpha = 0 pixels
    return L.write_gobjaverse_object(str(root), name, rgba, c2w, K, depth=torch.rand(n_views, H, W, generator=g))


def test_gobjaverse_dataset_views_and_resize(tmp_path):
    _write_tiny_object(tmp_path, "a", 26)
    _write_tiny_object(tmp_path, "b", 6)
    ds = L.GObjaverseDataset(str(tmp_path), num_views=6, res=(3, 4), background="random", seed=1)
    assert len(ds) == 2
    a = ds[0]
    ring = a["view_ids"][:4]
    assert ((ring - ring[0]) % 24).tolist() == [0, 6, 12, 18] and ring.max() < 24
    assert len(set(a["view_ids"].tolist())) == 6
    assert a["images"].shape == (6, 3, 3, 4) and a["depths"].shape == (6, 1, 3, 4)
    b = ds[1]
    assert b["view_ids"][:4].tolist() == [0, 1, 2, 3]
    full = L.read_gobjaverse_object(str(tmp_path / "b"))
    assert torch.allclose(b["K"][0, :2], full["K"][0, :2] / 2, atol=1e-5)
    assert torch.equal(ds[0]["view_ids"], a["view_ids"])       # deterministic
    ds.set_epoch(3)
    assert any(not torch.equal(ds[0]["view_ids"], a["view_ids"]) for _ in range(1))
    with pytest.raises(D.DataError, match="needs 7 views"):
        L.GObjaverseDataset(str(tmp_path), num_views=7)[1]


def test_gobjaverse_malformed(tmp_path):
    obj = _write_tiny_object(tmp_path, "x", 3)
    os.remove(os.path.join(obj, "00001", "00001.png"))
    with pytest.raises(D.DataError, match=r"00001\.png: missing"):
        L.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "y", 2)
    with open(os.path.join(obj, "00001", "00001.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(D.DataError, match=r"00001\.json: bad JSON"):
        L.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "z", 2)
    js = os.path.join(obj, "00000", "00000.json")
    meta = json.load(open(js))
    del meta["origin"]
    json.dump(meta, open(js, "w"))
    with pytest.raises(D.DataError, match=r"00000\.json: missing camera field 'origin'"):
        L.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "w", 2)
    Image.fromarray(np.zeros((5, 5, 4), np.uint8)).save(os.path.join(obj, "00001", "00001.png"))
    with pytest.raises(D.DataError, match=r"00001\.png: image is 5x5 but"):
        L.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "v", 2)
    np.save(os.path.join(obj, "00001", "00001_depth.npy"), np.zeros((3, 3), np.float32))
    with pytest.raises(D.DataError, match=r"00001: depth is 3x3"):
        L.read_gobjaverse_object(obj)
    os.makedirs(tmp_path / "not_an_object")
    with pytest.raises(D.DataError, match="not_an_object: not an object folder"):
        L.GObjaverseDataset(str(tmp_path))
    with pytest.raises(D.DataError, match="not found"):
        L.read_gobjaverse_object(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- image folders


def test_image_sequence_folder(tmp_path):
    rng = np.random.default_rng(0)
    for s, n in (("seq_a", 5), ("seq_b", 3)):
        os.makedirs(tmp_path / s)
        for k in range(n):
            ext = "png" if k % 2 else "jpg"
            Image.fromarray(rng.integers(0, 255, (20 + k, 30, 3), dtype=np.uint8)).save(tmp_path / s / f"{k:03d}.{ext}")
    (tmp_path / "seq_b" / "notes.txt").write_text("ignored: not an image")
    ds = L.ImageSequenceFolder(str(tmp_path), views=(2, 4), res=16, seed=0)
    assert len(ds) == 2 and ds.sequences == ["seq_a", "seq_b"]
    for i in range(2):
        it = ds[i]
        V = it["images"].shape[0]
        assert 2 <= V <= 4 and it["images"].shape[1:] == (3, 16, 16)
        assert torch.equal(ds[i]["images"], it["images"])
    assert ds[(0, 5)]["images"].shape[0] == 5 and ds[(1, 5)]["images"].shape[0] == 3   # capped by length
    assert L.ImageSequenceFolder(str(tmp_path), views=(3, 3), res=(8, 12))[(0, 3)]["images"].shape == (3, 3, 8, 12)
    with pytest.raises(D.DataError, match="differs"):
        L.ImageSequenceFolder(str(tmp_path), views=(2, 5), res=None)[(0, 5)]
    with pytest.raises(D.DataError, match="seq_b: 3 images, fewer than the minimum of 4"):
        L.ImageSequenceFolder(str(tmp_path), views=(4, 6))
    (tmp_path / "seq_a" / "999.png").write_bytes(b"not a png")
    with pytest.raises(D.DataError, match=r"999\.png: unreadable image"):
        L.ImageSequenceFolder(str(tmp_path), views=(2, 6))[(0, 6)]


# ---------------------------------------------------------------------------------------------- driving


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
    w = R.random_street(R.split_seed(0, "train", 4))
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
    from nano4d.utils import camera_rays
    o, d = camera_rays(c2w, K, 24, 40)
    lo, hi = w.boxes_at(1.5)
    t, what, idx, _ = R._cast(o.reshape(-1, 3), d.reshape(-1, 3), lo, hi, w.spheres, 150.0)
    z_brute = torch.where(what >= 0, t * (d.reshape(-1, 3) * c2w[:, :3, 2].repeat_interleave(24 * 40, 0)).sum(-1), 0)
    _, z = R.render_cameras(w, 1.5, c2w, K, 24, 40, shadows=False)
    assert torch.allclose(z.flatten(), z_brute, atol=1e-4)


def test_moving_cars_move_in_bev():
    w = R.random_street(R.split_seed(0, "train", 1))
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


def test_rig_json_roundtrip(tmp_path, drive_sample):
    _, s = drive_sample
    path = RJ.write_rig(str(tmp_path / "scene"), s)
    rig = RJ.read_rig(path)
    assert rig["cam_names"] == list(R.CAM_NAMES)
    assert torch.allclose(rig["cam2ego"], s["cam2ego"], atol=1e-6)
    assert torch.allclose(rig["ego2world"], s["ego2world"], atol=1e-5)
    ds = RJ.RigDataset(str(tmp_path), num_frames=2)
    assert len(ds) == 2
    r = ds[1]
    assert (r["images"] - s["images"][1:]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(r["depths"], s["depths"][1:]) and torch.equal(r["K"], s["K"])
    assert torch.allclose(r["ego2world"], s["ego2world"][1:], atol=1e-5)
    assert torch.allclose(r["timestamps"], torch.tensor([0.0, 1.0]))
    for k in range(2):
        a, b = r["lidar"][k][r["lidar_mask"][k]], s["lidar"][k + 1][s["lidar_mask"][k + 1]]
        assert torch.allclose(a, b, atol=1e-5)
    small = RJ.RigDataset(path, num_frames=3, res=(16, 28), max_points=100)[0]
    assert small["images"].shape == (3, 6, 3, 16, 28) and small["lidar"].shape == (3, 100, 3)
    assert torch.allclose(small["K"][:, :2], s["K"][:, :2] / 2)


def test_driving_cache(tmp_path, drive_sample):
    _, s = drive_sample
    kw = dict(num_frames=3, res=(32, 56), lidar_azimuths=96, bev_res=64, frame_dt=1.0, cache_dir=str(tmp_path))
    first = R.ProceduralDriving(3, **kw)[1]
    cached = R.ProceduralDriving(3, **kw)[1]                 # read back from the rig files
    assert len(list(tmp_path.rglob("rig.json"))) == 1
    for k in ("depths", "K", "bev", "timestamps", "seed", "lidar_mask"):
        assert torch.equal(first[k], s[k]) and torch.equal(cached[k].sum(-1) if k == "lidar_mask" else cached[k],
                                                          s[k].sum(-1) if k == "lidar_mask" else s[k]), k
    assert (cached["images"] - s["images"]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(cached["ego2world"], s["ego2world"], atol=1e-5)
    for k in range(3):
        assert torch.allclose(cached["lidar"][k][cached["lidar_mask"][k]], s["lidar"][k][s["lidar_mask"][k]], atol=1e-5)


def test_rig_malformed(tmp_path, drive_sample):
    _, s = drive_sample
    sub = {k: (v[:1] if k in ("images", "depths", "ego2world", "lidar", "lidar_mask", "timestamps") else v) for k, v in s.items()}
    path = RJ.write_rig(str(tmp_path / "a"), sub)
    rig = json.loads(open(path).read())

    def bad(mutate, match):
        r = json.loads(json.dumps(rig))
        mutate(r)
        p = tmp_path / "a" / "bad.json"
        p.write_text(json.dumps(r))
        with pytest.raises(D.DataError, match=match):
            RJ.load_rig_frames(RJ.read_rig(str(p)), [0])
    bad(lambda r: r["cameras"][2].pop("cam_intrinsic"), r"bad\.json: cameras\[2\]: missing field 'cam_intrinsic'")
    bad(lambda r: r["frames"][0].__setitem__("ego2global_rotation", [0, 0, 0, 0]), "degenerate")
    bad(lambda r: r["frames"][0]["cams"]["CAM_BACK"].__setitem__("data_path", "nope.png"), r"nope\.png: missing")
    bad(lambda r: r.__setitem__("format", "other"), "not a nano4d-rig file")
    bad(lambda r: r["cameras"][0].__setitem__("width", 99), "different image sizes")
    bad(lambda r: [c.__setitem__("width", 99) for c in r["cameras"]], r"CAM_FRONT\.png: image is 56x32 but the rig says 99x32")
    (tmp_path / "a" / "broken.json").write_text("{")
    with pytest.raises(D.DataError, match=r"broken\.json: bad JSON"):
        RJ.read_rig(str(tmp_path / "a" / "broken.json"))


def test_preview_cli(tmp_path):
    paths = D.preview(str(tmp_path), num_objects=2, num_views=2, res=16, driving_res=(16, 28))
    for p in paths:
        im = np.asarray(Image.open(p))
        assert im.ndim == 3 and im.std() > 5
