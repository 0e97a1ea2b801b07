"""nano4d.data.rig: rig JSON write/read, field errors, LiDAR -> depth maps."""
import json

import pytest
import torch

from nano4d.data import driving as R
from nano4d.data import rig as RJ
from nano4d.data.common import DataError


@pytest.fixture(scope="module")
def drive_sample():
    ds = R.ProceduralDriving(3, num_frames=3, res=(32, 56), lidar_azimuths=96, bev_res=64, frame_dt=1.0)
    return ds, ds[1]


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
        with pytest.raises(DataError, match=match):
            RJ.load_rig_frames(RJ.read_rig(str(p)), [0])
    bad(lambda r: r["cameras"][2].pop("cam_intrinsic"), r"bad\.json: cameras\[2\]: missing field 'cam_intrinsic'")
    bad(lambda r: r["frames"][0].__setitem__("ego2global_rotation", [0, 0, 0, 0]), "degenerate")
    bad(lambda r: r["frames"][0]["cams"]["CAM_BACK"].__setitem__("data_path", "nope.png"), r"nope\.png: missing")
    bad(lambda r: r.__setitem__("format", "other"), "not a nano4d-rig file")
    bad(lambda r: r["cameras"][0].__setitem__("width", 99), "different image sizes")
    bad(lambda r: [c.__setitem__("width", 99) for c in r["cameras"]], r"CAM_FRONT\.png: image is 56x32 but the rig says 99x32")
    bad(lambda r: r["cameras"][1].__setitem__("cam_intrinsic", "[[1,0,0],[0,1,0],[0,0,1]]"),
        r"bad\.json: cameras\[1\]: field 'cam_intrinsic' must be 3x3 finite numbers")
    bad(lambda r: r["cameras"][0].__setitem__("height", "32"), r"bad\.json: cameras\[0\]: field 'height' must be an integer, got '32'")
    bad(lambda r: r["frames"][0].__setitem__("timestamp", "0"), r"bad\.json: frames\[0\]: field 'timestamp' must be a finite number, got '0'")
    bad(lambda r: r["frames"][0].__setitem__("ego2global_translation", [0, 0]),
        r"bad\.json: frames\[0\]: field 'ego2global_translation' must be 3 finite numbers")
    bad(lambda r: r["frames"][0]["cams"]["CAM_FRONT"].__setitem__("data_path", 7), r"cams\.CAM_FRONT: field 'data_path' must be a relative file path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no rig JSON files"):
        RJ.RigDataset(str(tmp_path / "empty"))
    (tmp_path / "a" / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json: bad JSON"):
        RJ.read_rig(str(tmp_path / "a" / "broken.json"))


def test_lidar_to_depths_matches_rendered_depth(drive_sample):
    """LiDAR points projected into each camera give sparse depth maps that agree with the rendered depth at
    the same pixels (both see the same world), nearest return winning; points behind a camera are dropped."""
    _, s = drive_sample
    H, W = s["images"].shape[-2:]
    d = RJ.lidar_to_depths(s["lidar"], s["lidar_mask"], s["K"], s["cam2ego"], H, W)
    assert d.shape == s["depths"].shape and (d >= 0).all()
    hit = (d > 0) & (s["depths"] > 0)
    assert hit.sum() > 200
    rel = ((d - s["depths"]).abs() / s["depths"].clamp_min(1e-3))[hit]
    assert rel.median() < 0.02 and (rel < 0.1).float().mean() > 0.9     # coarse pixels: grazing ground, edges
    # a hand-made case: two points on one pixel of CAM_FRONT (nearest wins), one behind the camera
    c2e, K = s["cam2ego"][:1], s["K"][:1]
    o = c2e[0, :3, 3]
    pts = torch.stack([o + torch.tensor([5.0, 0, 0]), o + torch.tensor([9.0, 0, 0]), o - torch.tensor([5.0, 0, 0])])
    one = RJ.lidar_to_depths(pts[None], torch.ones(1, 3, dtype=torch.bool), K, c2e, H, W)[0, 0, 0]
    assert one[H // 2, W // 2] == 5.0 and (one > 0).sum() == 1
