"""Foundation utilities: cameras, Plücker rays, config flags, checkpoints, LR schedule, metrics, logging."""
import dataclasses
import json
import math
import os

import pytest
import torch

from nano4d import utils as U


def _random_c2w(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = U.quat_to_rotmat(torch.randn(n, 4, generator=g, dtype=torch.float64))
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3], T[:, :3, 3] = R, torch.randn(n, 3, generator=g, dtype=torch.float64)
    return T


def test_pose_inverse_round_trip():
    c2w = _random_c2w(8)
    w2c = U.c2w_to_w2c(c2w)
    eye = torch.eye(4, dtype=torch.float64).expand(8, 4, 4)
    torch.testing.assert_close(c2w @ w2c, eye)
    torch.testing.assert_close(U.w2c_to_c2w(w2c), c2w)
    torch.testing.assert_close(w2c, torch.linalg.inv(c2w))


def test_look_at_is_opencv_and_principal_ray_hits_principal_point():
    eye, target = torch.tensor([2.0, -1.0, 0.7]), torch.tensor([0.1, 0.2, -0.1])
    c2w = U.look_at(eye, target)
    R = c2w[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(R) > 0.99                       # right-handed
    K = U.fov_to_K(math.radians(40), 64, 48)
    uv, z = U.project_points(target[None], U.invert_pose(c2w), K)
    torch.testing.assert_close(uv[0], torch.tensor([K[0, 2], K[1, 2]]), atol=1e-4, rtol=0)
    assert z[0] > 0
    # world up appears up in the image (smaller v)
    uv_up, _ = U.project_points((target + torch.tensor([0, 0, 0.2]))[None], U.invert_pose(c2w), K)
    assert uv_up[0, 1] < K[1, 2]
    # looking straight down the up axis does not degenerate
    c2w_down = U.look_at(torch.tensor([0.0, 0.0, 2.0]), torch.zeros(3))
    assert torch.isfinite(c2w_down).all() and torch.linalg.det(c2w_down[:3, :3]) > 0.99


def test_opengl_to_opencv_gives_positive_depth_in_front():
    # An OpenGL camera at z=+3 looking down -z (its -z axis) sees the origin in front of it.
    c2w_gl = torch.eye(4)
    c2w_gl[2, 3] = 3.0
    c2w_cv = U.opengl_to_opencv(c2w_gl)
    K = U.fov_to_K(0.8, 32, 32)
    uv, z = U.project_points(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]]), U.invert_pose(c2w_cv), K)
    assert z[0] == pytest.approx(3.0)
    torch.testing.assert_close(uv[0], torch.tensor([16.0, 16.0]))
    assert uv[1, 1] < 16.0                                   # OpenGL +y (up) lands above centre
    torch.testing.assert_close(U.opencv_to_opengl(c2w_cv), c2w_gl)


def test_intrinsics_conversions():
    K = U.fov_to_K(math.radians(60), 80, 40, fov_x=math.radians(90))
    assert K[0, 0] == pytest.approx(40.0) and K[0, 2] == 40 and K[1, 2] == 20
    assert K[1, 1] == pytest.approx(20 / math.tan(math.radians(30)))
    Kn = U.pixel_to_normalized_K(K, 80, 40)
    assert Kn[0, 0] == pytest.approx(0.5) and Kn[0, 2] == pytest.approx(0.5) and Kn[2, 2] == 1
    torch.testing.assert_close(U.normalized_to_pixel_K(Kn, 80, 40), K)


def test_pixel_centres_and_camera_rays_reproject():
    c2w = U.look_at(torch.tensor([0.0, -2.0, 0.5]), torch.zeros(3))
    K = U.fov_to_K(0.9, 7, 5)
    o, d = U.camera_rays(c2w, K, 5, 7)
    pts = o + 1.7 * d
    uv, _ = U.project_points(pts.reshape(-1, 3), U.invert_pose(c2w), K)
    torch.testing.assert_close(uv.reshape(5, 7, 2), U.pixel_centers(5, 7), atol=1e-4, rtol=0)
    assert U.pixel_centers(5, 7)[0, 0].tolist() == [0.5, 0.5]


def test_plucker_properties():
    c2w = _random_c2w(6).reshape(2, 3, 4, 4)
    K = U.fov_to_K(0.7, 9, 6).double().expand(2, 3, 3, 3)
    pl = U.plucker_rays(c2w, K, 6, 9)
    assert pl.shape == (2, 3, 6, 6, 9)
    d, m = pl[:, :, :3], pl[:, :, 3:]
    torch.testing.assert_close(d.norm(dim=2), torch.ones(2, 3, 6, 9, dtype=torch.float64))
    torch.testing.assert_close((d * m).sum(2), torch.zeros(2, 3, 6, 9, dtype=torch.float64), atol=1e-12, rtol=0)
    # sliding the origin along the ray leaves the moment unchanged
    o = c2w[..., :3, 3][..., :, None, None]
    m2 = torch.linalg.cross((o + 2.5 * d), d, dim=2)
    torch.testing.assert_close(m2, m)


def test_quaternion_round_trip_and_pose():
    q = torch.randn(20, 4, dtype=torch.float64)
    R = U.quat_to_rotmat(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(20, 3, 3))
    q2 = U.rotmat_to_quat(R)
    qn = torch.nn.functional.normalize(q, dim=-1) * torch.sign(q[:, :1])
    torch.testing.assert_close(q2, qn)
    # 90 degrees about z maps x to y
    qz = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])
    T = U.pose_from_quat_trans(qz, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(T @ torch.tensor([1.0, 0, 0, 1]), torch.tensor([1.0, 3.0, 3.0, 1.0]), atol=1e-6, rtol=0)


@dataclasses.dataclass
class _Train:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    amp: bool = True
    res: tuple = (64, 64)


@dataclasses.dataclass
class _Model:
    dim: int = 8
    depth: int = 2
    drop: float = 0.0


def test_parse_config_flags_and_presets():
    presets = {"tiny": _Model(dim=16), "big": _Model(dim=512, depth=24)}
    tr, mo = U.parse_config(_Train, _Model, presets, argv=["--lr", "0.5", "--amp", "false", "--res", "32,48",
                                                          "--preset", "big", "--model.depth", "3"])
    assert tr == _Train(lr=0.5, steps=10, name="run", amp=False, res=(32, 48))
    assert mo == _Model(dim=512, depth=3)
    tr, mo = U.parse_config(_Train, _Model, presets, argv=[])
    assert mo == _Model(dim=16) and tr == _Train()
    assert U.parse_config(_Train, argv=["--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        U.parse_config(_Train, argv=["--steps", "seven"])
    d = U.config_to_dict(tr, model=mo)
    assert json.loads(json.dumps(d))["model"]["dim"] == 16


def test_lr_schedule():
    lrs = [U.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_resume_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    cfg = {"dim": 4, "name": "x"}
    U.save_checkpoint(str(tmp_path), model, cfg, opt, step=17, extra={"epoch": 2, "pos": 5})
    expected_next = torch.rand(3)  # RNG stream right after the save
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    step, extra = U.load_resume(str(tmp_path), model2, opt2, expect_config=cfg)
    assert step == 17 and extra == {"epoch": 2, "pos": 5}
    torch.testing.assert_close(torch.rand(3), expected_next)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # weights-only load works, and the config travels with the weights
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 17
    _, stored = U.load_weights(str(tmp_path / "model.safetensors"))
    assert stored == cfg
    with pytest.raises(ValueError, match="config mismatch: dim: checkpoint=4 vs run=8"):
        U.load_resume(str(tmp_path), model2, opt2, expect_config={"dim": 8})
    assert U.load_resume(str(tmp_path / "empty"), model2) == (0, {})


def test_atomic_write_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    U.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 1})
    before = (tmp_path / "w.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)  # fail after the temp file was partly written
    with torch.no_grad():
        model.weight += 1
    with pytest.raises(OSError, match="disk full"):
        U.save_weights(str(tmp_path / "w.safetensors"), model, {"v": 2})
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind


def test_psnr_ssim_known_values():
    a = torch.rand(2, 3, 32, 32)
    assert torch.isinf(U.psnr(a, a)).all()
    torch.testing.assert_close(U.ssim(a, a), torch.ones(2))
    b = (a + 0.1).clamp(max=2.0)  # constant offset 0.1 -> MSE 0.01 -> PSNR 20 dB
    torch.testing.assert_close(U.psnr(a, b), torch.full((2,), 20.0))
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    s = U.ssim(a, noisy)
    assert (s < 0.9).all() and (s > 0).all()
    assert (U.ssim(a, (a + 0.05 * torch.randn_like(a)).clamp(0, 1)) > s).all()
    # the luminance-only term for constant images: mean 0.5 vs 0.6
    c1 = 0.01 ** 2
    x, y = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.6)
    expect = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert U.ssim(x, y).item() == pytest.approx(expect, rel=1e-5)


def test_progress_logger_lines_and_jsonl(tmp_path, capsys):
    log = U.ProgressLogger(str(tmp_path), total_steps=6, interval=3)
    for s in range(6):
        log.log(s, {"loss": 1.0 / (s + 1), "mse": 0.5}, lr=1e-3, grad_norm=0.7, items=4)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("step      3/6 | loss") and "eta" in out[0] and "img/s" in out[0]
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in recs] == [3, 6]
    assert recs[0]["loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert recs[1]["eta_s"] == 0


def test_save_image_grid(tmp_path):
    from PIL import Image
    p = U.save_image_grid(str(tmp_path / "g.png"), [torch.rand(3, 3, 8, 10), torch.rand(2, 1, 6, 6)])
    im = Image.open(p)
    assert im.size == (2 + 3 * 12, 2 + 2 * 10) and im.mode == "RGB"
