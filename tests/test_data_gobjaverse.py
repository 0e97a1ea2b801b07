"""nano4d.data.gobjaverse: the GObjaverse layout (write/read, camera JSON, EXR, dataset, errors, occupancy)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nano4d.cameras import invert_pose, look_at, project_points
from nano4d.data import gobjaverse as G
from nano4d.data.common import DataError
from nano4d.data.objects import ProceduralObjects, object_sdf, orbit_cameras


def test_gobjaverse_roundtrip(tmp_path):
    ds = ProceduralObjects(num_objects=1, num_views=3, res=(12, 16), occ_res=8, num_surface_points=16)
    it = ds[0]
    rgba = torch.cat([it["images"], it["alphas"]], 1).permute(0, 2, 3, 1)
    K = it["K"].clone()
    K[1, 0, 2] += 1.5                                            # off-centre principal point survives
    G.write_gobjaverse_object(str(tmp_path), "obj_a", rgba, it["c2w"], K, depth=it["depths"][:, 0],
                              normal=it["normals"].permute(0, 2, 3, 1), occupancy=it["occupancy"],
                              surface_points=it["surface_points"])
    G.write_gobjaverse_object(str(tmp_path), "obj_b", rgba, it["c2w"], K, depth=it["depths"][:, 0], depth_format="png16")
    r = G.read_gobjaverse_object(str(tmp_path / "obj_a"))
    assert r["view_ids"] == [0, 1, 2]
    assert torch.allclose(r["c2w"], it["c2w"], atol=1e-6) and torch.allclose(r["K"], K, atol=1e-5)
    assert (r["images"] * r["alphas"] - it["images"] * it["alphas"]).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(r["alphas"], it["alphas"])
    assert torch.equal(r["depths"], it["depths"]) and torch.equal(r["normals"], it["normals"])
    assert torch.equal(r["occupancy"], it["occupancy"]) and torch.equal(r["surface_points"], it["surface_points"])
    b = G.read_gobjaverse_object(str(tmp_path / "obj_b"), views=[2])
    assert (b["depths"] - it["depths"][2:]).abs().max() <= 0.5e-4 + 1e-6
    # the JSON alone (x, y, z, origin, fovs; no nano4d 'K') gives the same camera for a centred K
    js = json.loads((tmp_path / "obj_a" / "00000" / "00000.json").read_text())
    c2w0, K0 = G.gobjaverse_camera({k: js[k] for k in ("x", "y", "z", "origin", "x_fov", "y_fov")}, 16, 12)
    assert torch.allclose(c2w0, it["c2w"][0], atol=1e-6) and torch.allclose(K0, it["K"][0], atol=1e-4)
    pts = it["surface_points"][:5]
    assert torch.allclose(project_points(pts, invert_pose(r["c2w"]), r["K"])[0],
                          project_points(pts, invert_pose(it["c2w"]), K)[0], atol=1e-3)


def test_gobjaverse_nd_exr(tmp_path):
    """GObjaverse's <view>_nd.exr (normal xyz in Unity axes + depth) is read when an EXR reader exists, with
    GeoLRM's cleaning: depth nearer than camera distance - sqrt(3)/2 is invalid, dilated 3x3, set to 0."""
    OpenEXR = pytest.importorskip("OpenEXR")
    if not hasattr(OpenEXR, "File"):
        pytest.skip("needs the openexr 3.x API to write the fixture")
    obj = _write_tiny_object(tmp_path, "e", 1)
    os.remove(os.path.join(obj, "00000", "00000_depth.npy"))
    g = np.random.default_rng(0)
    nd = g.normal(size=(6, 8, 4)).astype(np.float32)
    nd[..., 3] = g.uniform(1.5, 2.5, size=(6, 8))               # camera distance 2: valid depths
    nd[1, 6, 3] = 0.5                                            # in front of the object cube: invalid
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGBA": nd}).write(os.path.join(obj, "00000", "00000_nd.exr"))
    r = G.read_gobjaverse_object(obj)
    alpha = r["alphas"][0, 0].numpy()
    bad = np.zeros((6, 8), bool)
    bad[0:3, 5:8] = True                                          # the invalid pixel, dilated
    assert (alpha == 0).any() and np.allclose(r["depths"][0, 0].numpy(), nd[..., 3] * (alpha > 0) * ~bad)
    n = r["normals"][0].permute(1, 2, 0).numpy()           # unity2blender: (x, y, z) -> (-z, -x, y)
    assert np.allclose(n, np.stack([-nd[..., 2], -nd[..., 0], nd[..., 1]], -1))
    with open(os.path.join(obj, "00000", "00000_nd.exr"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match=r"00000_nd\.exr: unreadable EXR"):
        G.read_gobjaverse_object(obj)


def test_clean_exr_depth():
    d = np.full((5, 6), 2.0, np.float32)
    d[2, 3], d[4, 0] = 1.0, np.nan
    out = G.clean_exr_depth(d, 2.0)
    bad = np.zeros((5, 6), bool)
    bad[1:4, 2:5] = bad[3:5, 0:2] = True
    assert np.array_equal(out == 0, bad) and np.all(out[~bad] == 2.0)


def test_dataset_object_list_failures_and_occupancy(tmp_path, caplog):
    """The official object list (a JSON list of "<shard>/<id>", or an object keyed by them), 40-view objects,
    occupancy from GeoLRM's pts.npy, and failing objects logged by name, replaced, and fatal above the limit."""
    for name in ("0/a", "0/b", "1/c", "1/d"):
        _write_tiny_object(tmp_path / "objs" / os.path.dirname(name), os.path.basename(name), 40 if name == "0/a" else 6)
    (tmp_path / "list.json").write_text(json.dumps(["0/a", "0/b", "1/c", "1/d"]))
    (tmp_path / "keyed.json").write_text(json.dumps({"1/c": 1, "0/a": 2}))
    ds = G.GObjaverseDataset(str(tmp_path / "objs"), num_views=6, object_ids=str(tmp_path / "list.json"))
    assert ds.object_ids == ["0/a", "0/b", "1/c", "1/d"] and ds.names.dtype.kind == "S"
    a = ds[0]
    assert a["object_id"] == "0/a" and ((a["view_ids"][:4] - a["view_ids"][0]) % 24).tolist() == [0, 6, 12, 18]
    assert G.GObjaverseDataset(str(tmp_path / "objs"), object_ids=str(tmp_path / "keyed.json")).object_ids == ["0/a", "1/c"]
    idx = np.array([[0, 0, 0], [127, 64, 3]], np.uint8)
    os.makedirs(tmp_path / "occ" / "0" / "b")
    np.save(tmp_path / "occ" / "0" / "b" / "pts.npy", idx)
    occ = G.GObjaverseDataset(str(tmp_path / "objs"), num_views=6, object_ids=["0/b"], occ_res=8,
                              occ_root=str(tmp_path / "occ"))[0]["occupancy"]
    assert occ.shape == (8, 8, 8) and occ.sum() == 2 and occ[0, 0, 0] == 1 and occ[0, 4, 7] == 1
    occ_d = G.GObjaverseDataset(str(tmp_path / "objs"), num_views=6, object_ids=["0/b"], occ_res=8)[0]["occupancy"]
    assert occ_d.shape == (8, 8, 8)                              # binned from the views' depth instead
    os.remove(tmp_path / "objs" / "0" / "b" / "00002" / "00002.json")
    ds = G.GObjaverseDataset(str(tmp_path / "objs"), num_views=6, random_views=False,
                             object_ids=str(tmp_path / "list.json"), max_failures=0.25)
    with caplog.at_level("WARNING", logger="nano4d.data"):
        it = ds[1]
    assert it["object_id"] == "1/c" and ds.failures == ["0/b"] and "0/b failed to read" in caplog.text
    os.remove(tmp_path / "objs" / "1" / "d" / "00000" / "00000.png")
    with pytest.raises(DataError, match=r"2 of 4 objects failed to read in this process, more than max_failures=0.25"):
        ds[3]


def test_gobjaverse_json_convention():
    """GObjaverse JSON: x, y, z = camera right, down, forward in world (OpenCV); fovs in radians."""
    meta = {"x": [1, 0, 0], "y": [0, 0, -1], "z": [0, 1, 0], "origin": [0, -2, 0],
            "x_fov": math.radians(60), "y_fov": math.radians(60)}
    c2w, K = G.gobjaverse_camera(meta, 64, 64)
    uv, z = project_points(torch.tensor([[0.0, 0, 0], [0, 0, 0.5], [0.5, 0, 0]]), invert_pose(c2w), K)
    assert torch.allclose(uv[0], torch.tensor([32.0, 32.0])) and torch.allclose(z, torch.full((3,), 2.0))
    assert uv[1, 1] < 32 and torch.isclose(uv[1, 0], torch.tensor(32.0))        # world up is image up
    assert uv[2, 0] > 32                                                          # world +x is image right
    assert torch.allclose(c2w, look_at(torch.tensor([0.0, -2, 0]), torch.zeros(3)), atol=1e-6)
    assert math.isclose(K[0, 0].item(), 32 / math.tan(math.radians(30)), rel_tol=1e-6)


def _write_tiny_object(root, name, n_views, hw=(6, 8)):
    H, W = hw
    c2w, K = orbit_cameras(n_views, (H, W), seed=0, ring_views=min(n_views, 24))
    g = torch.Generator().manual_seed(n_views)
    rgba = torch.rand(n_views, H, W, 4, generator=g)
    rgba[..., 3] = (0.1 + 0.9 * rgba[..., 3]) * (torch.arange(W) % 3 != 0)    # some alpha = 0 pixels
    return G.write_gobjaverse_object(str(root), name, rgba, c2w, K, depth=torch.rand(n_views, H, W, generator=g))


def test_gobjaverse_dataset_views_and_resize(tmp_path):
    _write_tiny_object(tmp_path, "a", 26)
    _write_tiny_object(tmp_path, "b", 6)
    ds = G.GObjaverseDataset(str(tmp_path), num_views=6, res=(3, 4), background="random", seed=1)
    assert len(ds) == 2
    a = ds[0]
    ring = a["view_ids"][:4]
    assert ((ring - ring[0]) % 24).tolist() == [0, 6, 12, 18] and ring.max() < 24
    assert len(set(a["view_ids"].tolist())) == 6
    assert a["images"].shape == (6, 3, 3, 4) and a["depths"].shape == (6, 1, 3, 4)
    b = ds[1]
    assert b["view_ids"][:4].tolist() == [0, 1, 2, 3]
    full = G.read_gobjaverse_object(str(tmp_path / "b"))
    assert torch.allclose(b["K"][0, :2], full["K"][0, :2] / 2, atol=1e-5)
    assert torch.equal(ds[0]["view_ids"], a["view_ids"])       # deterministic
    ds.set_epoch(3)
    assert any(not torch.equal(ds[0]["view_ids"], a["view_ids"]) for _ in range(1))
    with pytest.raises(DataError, match="needs 7 views"):
        G.GObjaverseDataset(str(tmp_path), num_views=7)[1]


def test_gobjaverse_malformed(tmp_path):
    obj = _write_tiny_object(tmp_path, "x", 3)
    os.remove(os.path.join(obj, "00001", "00001.png"))
    with pytest.raises(DataError, match=r"00001\.png: missing"):
        G.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "y", 2)
    with open(os.path.join(obj, "00001", "00001.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=r"00001\.json: bad JSON"):
        G.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "z", 2)
    js = os.path.join(obj, "00000", "00000.json")
    meta = json.load(open(js))
    del meta["origin"]
    json.dump(meta, open(js, "w"))
    with pytest.raises(DataError, match=r"00000\.json: missing field 'origin'"):
        G.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "w", 2)
    Image.fromarray(np.zeros((5, 5, 4), np.uint8)).save(os.path.join(obj, "00001", "00001.png"))
    with pytest.raises(DataError, match=r"00001\.png: image is 5x5 but"):
        G.read_gobjaverse_object(obj)
    obj = _write_tiny_object(tmp_path, "v", 2)
    np.save(os.path.join(obj, "00001", "00001_depth.npy"), np.zeros((3, 3), np.float32))
    with pytest.raises(DataError, match=r"00001: depth is 3x3"):
        G.read_gobjaverse_object(obj)
    for key, value, msg in (("width", "wide", "field 'width' must be an integer, got 'wide'"),
                            ("height", 6.5, "field 'height' must be an integer, got 6.5"),
                            ("x_fov", "60deg", "field 'x_fov' must be a finite number, got '60deg'"),
                            ("origin", [0, "a", 1], "field 'origin' must be 3 finite numbers"),
                            ("K", [[1, 0], [0, 1]], "field 'K' must be 3x3 finite numbers")):
        obj = _write_tiny_object(tmp_path, "u", 2)
        js = os.path.join(obj, "00001", "00001.json")
        meta = json.load(open(js))
        meta[key] = value
        if key == "x_fov":
            del meta["K"]
        json.dump(meta, open(js, "w"))
        with pytest.raises(DataError, match=r"u/00001/00001\.json: " + msg.replace("[", r"\[")):
            G.read_gobjaverse_object(obj)
    os.makedirs(tmp_path / "not_an_object")
    with pytest.raises(DataError, match="not_an_object: not an object folder"):
        G.GObjaverseDataset(str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        G.read_gobjaverse_object(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"empty: no object folders"):
        G.GObjaverseDataset(str(tmp_path / "empty"))
    (tmp_path / "list.json").write_text('["a", 1]')
    with pytest.raises(DataError, match=r"list\.json: the object list must be a JSON list"):
        G.GObjaverseDataset(str(tmp_path), object_ids=str(tmp_path / "list.json"))


def test_occupancy_from_points_layout_and_bounds():
    R = 4
    pts = torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5], [0.1, -0.3, 0.4], [0.6, 0.0, 0.0], [0.0, 0.0, -0.51]])
    occ = G.occupancy_from_points(pts, R)
    assert occ.shape == (R, R, R) and occ.sum() == 3                   # the two outside points are ignored
    # (Z, Y, X) order: x = 0.1 -> i = 2, y = -0.3 -> j = 0, z = 0.4 -> k = 3; the upper face counts in the last cell
    assert occ[0, 0, 0] == 1 and occ[3, 3, 3] == 1 and occ[3, 0, 2] == 1
    occ2 = G.occupancy_from_points(torch.tensor([[0.0, 0.0, 0.0]]), 2, lo=-1.0, hi=1.0)
    assert occ2[1, 1, 1] == 1 and occ2.sum() == 1


def test_occupancy_from_depth_matches_the_surface():
    """Back-projected foreground depth lands on the object's surface, in the cells that the SDF says the
    surface crosses."""
    ds = ProceduralObjects(1, num_views=6, res=32, occ_res=16, occ_mode="surface", num_surface_points=0)
    it = ds[0]
    pts = G.depth_points(it["depths"], it["c2w"], it["K"], it["alphas"] > 0.5)
    assert pts.shape[0] == int((it["alphas"] > 0.5).sum())
    sdf = object_sdf(ds.get_object(0), pts)
    assert sdf.abs().max() < 2e-3                                         # points on the surface
    occ = G.occupancy_from_depth(it["depths"], it["alphas"], it["c2w"], it["K"], 16).bool()
    surface = it["occupancy"].bool()
    assert occ.sum() > 0.3 * surface.sum() and (occ & surface).sum() >= 0.98 * occ.sum()
