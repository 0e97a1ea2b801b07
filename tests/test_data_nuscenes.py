"""nano4d.data.nuscenes: a tree written in the nuScenes schema from procedural scenes reads back consistently."""
import json
import os

import numpy as np
import pytest
import torch

from nano4d.cameras import invert_pose, project_points
from nano4d.data import nuscenes as N
from nano4d.data.common import DataError
from nano4d.data.driving import ProceduralDriving


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    ds = ProceduralDriving(2, num_frames=4, res=(24, 40), lidar_azimuths=48, bev_res=16, frame_dt=1 / 12)
    samples = [ds[0], ds[1]]
    root = str(tmp_path_factory.mktemp("nusc"))
    N.write_nuscenes(root, samples, key_every=2)             # frames 1 and 3 are key frames, 0 and 2 sweeps
    return root, samples


def test_written_tree_has_the_schema(tree):
    root, _ = tree
    v = os.path.join(root, "v1.0-mini")
    assert sorted(f[:-5] for f in os.listdir(v)) == sorted(N.TABLES)
    sd = json.load(open(os.path.join(v, "sample_data.json")))
    keys = [r for r in sd if r["is_key_frame"]]
    assert len(keys) == 2 * 2 * 7 and len(sd) == 2 * (4 * 6 + 2)         # 6 cameras x 4 frames + 2 LiDAR key frames
    assert all(r["filename"].startswith("samples/") == r["is_key_frame"] for r in sd)
    assert all(os.path.isfile(os.path.join(root, r["filename"])) for r in sd)
    cal = json.load(open(os.path.join(v, "calibrated_sensor.json")))
    assert all(len(c["rotation"]) == 4 and len(c["translation"]) == 3 for c in cal)
    scene = json.load(open(os.path.join(v, "scene.json")))
    assert [s["nbr_samples"] for s in scene] == [2, 2] and [s["name"] for s in scene] == ["scene-0000", "scene-0001"]


def test_read_back_cameras_poses_and_lidar(tree):
    root, samples = tree
    ds = N.NuScenesDataset(root, split="all", num_frames=3)
    assert len(ds) == 2 and ds.skipped == 2                    # the first key frame of each scene lacks 2 sweeps
    for i, s in enumerate(samples):
        r = ds[i]
        assert r["images"].shape == (3, 6, 3, 24, 40) and r["cam_names"] == list(N.CAMERAS)
        assert (r["images"] - s["images"][1:]).abs().mean() < 0.03             # JPEG
        torch.testing.assert_close(r["K"], s["K"], atol=1e-4, rtol=0)
        torch.testing.assert_close(r["cam2ego"], s["cam2ego"], atol=1e-4, rtol=0)
        torch.testing.assert_close(r["cam2ego_frames"], s["cam2ego"].expand(3, 6, 4, 4), atol=1e-4, rtol=0)
        torch.testing.assert_close(r["timestamps"], s["timestamps"][1:] - s["timestamps"][1], atol=1e-5, rtol=0)
        e = s["ego2world"][1:].double()
        rel = lambda x: invert_pose(x[-1:]) @ x  # noqa: E731
        torch.testing.assert_close(rel(r["ego2world"].double()), rel(e), atol=1e-4, rtol=0)
        torch.testing.assert_close(r["world_origin"], e[-1, :3, 3], atol=1e-4, rtol=0)
        m = s["lidar_mask"][3]
        key_pts = s["lidar"][3][m].double()
        assert int(r["lidar_mask"][2].sum()) == key_pts.shape[0]
        torch.testing.assert_close(r["lidar"][2][: key_pts.shape[0]].double(), key_pts, atol=1e-4, rtol=0)
        # the key scan, projected into every camera of every frame, lands where the procedural poses put it
        world = key_pts @ e[-1, :3, :3].T + e[-1, :3, 3]
        for t in range(3):
            for c in range(6):
                ref_c2w = e[t] @ s["cam2ego"][c].double()
                uv0, z0 = project_points(world, invert_pose(ref_c2w), s["K"][c].double())
                pe = r["lidar"][t][: key_pts.shape[0]].double()
                uv1, z1 = project_points(pe, invert_pose(r["cam2ego_frames"][t, c].double()), r["K"][c].double())
                ok = (z0 > 1.0) & (uv0.abs() < 200).all(-1)
                torch.testing.assert_close(z1[ok], z0[ok], atol=1e-4, rtol=0)
                torch.testing.assert_close(uv1[ok], uv0[ok], atol=1e-3, rtol=1e-5)
    small = N.NuScenesDataset(root, split="all", num_frames=2, res=(12, 20), max_points=50)
    assert len(small) == 4 and small[0]["images"].shape == (2, 6, 3, 12, 20) and small[0]["lidar"].shape == (2, 50, 3)
    torch.testing.assert_close(small[0]["K"][:, :2], samples[0]["K"][:, :2] / 2, atol=1e-4, rtol=0)


def test_nuscenes_errors_name_file_and_field(tree, tmp_path):
    root, samples = tree
    with pytest.raises(DataError, match="nuScenes table folder not found"):
        N.NuScenesDataset(str(tmp_path), version="v1.0-mini")
    with pytest.raises(DataError, match=r"none of the 2 scenes of split 'val' is in this v1.0-mini tree"):
        N.NuScenesDataset(root, split="val")
    if not _has_devkit():
        with pytest.raises(ValueError, match="pass scenes="):
            N._scene_names("v1.0-trainval", "train", None)
    assert len(N.NuScenesDataset(root, scenes=["scene-0001"], num_frames=1)) == 2
    bad = str(tmp_path / "bad")
    N.write_nuscenes(bad, samples[:1])
    p = os.path.join(bad, "v1.0-mini", "calibrated_sensor.json")
    cal = json.load(open(p))
    cal[0]["camera_intrinsic"] = "[[1, 0, 0], [0, 1, 0], [0, 0, 1]]"
    json.dump(cal, open(p, "w"))
    with pytest.raises(DataError, match=r"calibrated_sensor\.json: [0-9a-f]+: field 'camera_intrinsic' must be 3x3"):
        N.NuScenesDataset(bad, split="all")
    lid = [f for f in os.listdir(os.path.join(bad, "samples", "LIDAR_TOP"))][0]
    with open(os.path.join(bad, "samples", "LIDAR_TOP", lid), "ab") as f:
        f.write(np.zeros(2, np.float32).tobytes())
    cal[0]["camera_intrinsic"] = samples[0]["K"][0].tolist()
    json.dump(cal, open(p, "w"))
    with pytest.raises(DataError, match=r"pcd\.bin: .* not a multiple of 5"):
        N.NuScenesDataset(bad, split="all")[0]


def _has_devkit():
    try:
        import nuscenes  # noqa: F401
        return True
    except ImportError:
        return False
