"""MIM4D model: masking, voxel projection, metric warp, batch independence, parameter counts, training."""
import ast
import math
import os
import subprocess
import sys

import pytest
import torch

from nano4d import mim4d as M
from nano4d import cameras as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # Model-level tests run the kernels' pure-torch references (the kernels have their own tests);
    # test_forward_through_triton_kernels runs the Triton path.
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")


def small_cfg(**kw):
    base = dict(img_size=(64, 96), depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), fpn_dim=8, depth_bins=8,
                pc_range=(-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), grid=(8, 8, 2), vox_dim=8, short_dim=16,
                long_dim=8, field_hidden=8, render_feat=4, rays_per_cam=8, num_uniform=8, num_importance=4,
                num_cams=2, num_frames=3)
    base.update(kw)
    return M.MIM4DConfig(**base)


def rig(B, N, T, H, W, speed=1.5):
    """A toy surround rig: N cameras around the ego z axis, ego driving along world x."""
    K = torch.tensor([[W * 0.8, 0, W / 2], [0, W * 0.8, H / 2], [0, 0, 1.0]]).expand(B, N, 3, 3).clone()
    cams = []
    for i in range(N):
        yaw = i * 2 * math.pi / N
        R = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1.0]])
        T4 = torch.eye(4)
        T4[:3, :3] = R @ torch.tensor([[0, 0, 1.0], [-1, 0, 0], [0, -1, 0]])   # OpenCV cam axes in ego
        T4[:3, 3] = torch.tensor([0.0, 0.0, 1.5])
        cams.append(T4)
    cam2ego = torch.stack(cams).expand(B, N, 4, 4).clone()
    e2w = torch.eye(4).repeat(B, T, 1, 1)
    e2w[:, :, 0, 3] = torch.arange(T).float() * speed
    return K, cam2ego, e2w


def batch_for(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.img_size
    K, c2e, e2w = rig(B, cfg.num_cams, cfg.num_frames, H, W)
    return dict(images=torch.rand(B, cfg.num_frames, cfg.num_cams, 3, H, W, generator=g),
                depths=torch.rand(B, cfg.num_frames, cfg.num_cams, 1, H, W, generator=g) * 10,
                K=K, cam2ego=c2e, ego2world=e2w)


def test_masking_never_leaks():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg)
    x = torch.rand(3, 3, 64, 96)
    keep = model.random_masks(3, (64, 96), torch.Generator().manual_seed(1))
    assert keep.shape == (3, 1, 2, 3)
    assert (keep.flatten(1).sum(1) == 6 - round(0.3 * 6)).all()                # same ratio per image
    pix_keep = torch.nn.functional.interpolate(keep, size=(64, 96))
    x2 = x + (1 - pix_keep) * torch.randn_like(x) * 5                         # change only masked pixels
    outs1, outs2 = model.backbone(x, keep), model.backbone(x2, keep)
    for a, b in zip(outs1, outs2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        k = torch.nn.functional.interpolate(keep, size=a.shape[-2:])
        assert (a * (1 - k)).abs().max() == 0                                 # masked regions stay zero
    # without the mask the same change does leak (so the test can fail)
    ones = torch.ones_like(keep)
    assert not torch.equal(model.backbone(x, ones)[-1], model.backbone(x2, ones)[-1])


def test_voxel_centres_project_like_the_camera_utilities():
    cfg = small_cfg()
    K, c2e, _ = rig(1, 2, 1, 64, 96)
    uv, z = M.project_voxels(cfg, K, c2e)
    pts = M.voxel_centres(cfg).reshape(-1, 3)
    for n in range(2):
        uv_ref, z_ref = C.project_points(pts, C.invert_pose(c2e[0, n]), K[0, n])
        front = z_ref > 0.1
        torch.testing.assert_close(uv[0, n][front], uv_ref[front], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(z[0, n], z_ref, atol=1e-4, rtol=1e-5)
    # centres sit at the middle of their cells, and the renderer maps the first/last centre to -1/+1
    c = M.voxel_centres(cfg)
    assert c[0, 0, 0].tolist() == pytest.approx([-7.0, -7.0, -1.0])
    u = M.metric_to_unit(cfg, torch.stack([c[0, 0, 0], c[-1, -1, -1]]))
    torch.testing.assert_close(u, torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))


def test_metric_warp_moves_a_point_to_the_right_voxel():
    cfg = small_cfg(grid=(8, 8, 2))                                            # 2 m voxels in x/y
    vol = torch.zeros(1, 1, 2, 8, 8)
    vol[0, 0, 1, 4, 5] = 1.0                                                  # source voxel (x=5, y=4, z=1)
    src_pt = M.voxel_centres(cfg)[1, 4, 5]
    # target ego frame = source frame moved 4 m forward (x) and turned 90 degrees left (about z)
    tgt2src = torch.eye(4)
    tgt2src[:3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    tgt2src[:3, 3] = torch.tensor([4.0, 0.0, 0.0])
    src2tgt = torch.linalg.inv(tgt2src)
    out = M.warp_volume(cfg, vol, src2tgt[None])
    tgt_pt = (src2tgt @ torch.cat([src_pt, torch.ones(1)]))[:3]
    idx = torch.nonzero(out[0, 0] > 0.5)
    assert idx.shape[0] == 1
    z, y, x = idx[0].tolist()
    torch.testing.assert_close(M.voxel_centres(cfg)[z, y, x], tgt_pt)
    # the official index warp lands somewhere else (metres read as voxel indices)
    off = M.warp_volume(small_cfg(official_index_warp=True), vol, src2tgt[None])
    assert off[0, 0, z, y, x] < 0.5


def test_batch_of_two_equals_two_batches_of_one():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = M.MIM4D(cfg)
    batch = batch_for(cfg, 2)
    g = torch.Generator().manual_seed(3)
    keep = model.random_masks(2 * cfg.num_frames * cfg.num_cams, cfg.img_size, g)
    rays = [model.sample_rays(batch["depths"][:, t], batch["K"], batch["cam2ego"], g) for t in (0, 2)]
    _, per2, _ = model(batch, k=2, keep=keep, rays=rays, perturb=False)
    n = cfg.num_frames * cfg.num_cams
    for b in range(2):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        _, per1, _ = model(one, k=2, keep=keep[b * n:(b + 1) * n], rays=[[x[b:b + 1] for x in r] for r in rays],
                           perturb=False)
        torch.testing.assert_close(per1[0], per2[b], rtol=1e-4, atol=1e-5)


def test_forward_backward_and_features():
    cfg = small_cfg()
    model = M.MIM4D(cfg)
    batch = batch_for(cfg, 1)
    loss, per, terms = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(terms) == {"rgb_pred", "depth_pred", "rgb_direct", "depth_direct"}
    loss.backward()
    assert model.backbone.down[0][0].weight.grad.abs().sum() > 0               # gradients reach the images side
    assert model.render.log_inv_s.grad is not None
    vols, bev = model.extract_features(batch["images"], batch["K"], batch["cam2ego"])
    assert vols.shape == (1, 3, 8, 2, 8, 8) and bev.shape == (1, 3, 16, 8, 8)


def test_forward_through_triton_kernels(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    cfg = small_cfg(rays_per_cam=4, num_uniform=6, num_importance=2, grid=(6, 6, 2))
    torch.manual_seed(0)
    model = M.MIM4D(cfg)
    batch = batch_for(cfg, 1)
    loss, _, _ = model(batch, generator=torch.Generator().manual_seed(0), perturb=False)
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    ref, _, _ = model(batch, generator=torch.Generator().manual_seed(0), perturb=False)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = M.MIM4D(M.PRESETS["paper"])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 85e6 < n(model.backbone) < 90e6                  # ConvNeXt-B trunk: ~87.6M without its classifier
    assert 1e6 < n(model.decoder) < 30e6
    assert 90e6 < n(model) < 120e6


def test_model_file_imports_only_torch_kernels_and_stdlib():
    path = os.path.join(ROOT, "nano4d", "mim4d.py")
    tree = ast.parse(open(path).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"torch", "kernels", "math", "dataclasses", "__future__"}, mods
    code = ("import importlib.util, sys; sys.modules['nano4d'] = None; "
            f"s = importlib.util.spec_from_file_location('mim4d_alone', {path!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); "
            "print(m.MIM4D.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "MIM4D" in r.stdout, r.stderr


def test_train_script_runs_and_resumes(tmp_path):
    import json

    import train_mim4d
    args = ["--run_dir", str(tmp_path), "--train_scenes", "1", "--val_scenes", "1", "--steps", "2", "--log_every", "1",
            "--eval_every", "2", "--model.img_size", "32,64", "--model.rays_per_cam", "8", "--model.num_uniform", "8",
            "--model.num_importance", "2", "--model.grid", "8,8,2", "--model.depths", "1,1,1,1",
            "--model.dims", "8,16,16,16", "--model.fpn_dim", "8", "--model.short_dim", "16", "--model.long_dim", "8"]
    train_mim4d.main(args)
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert {"pred_absrel", "warp_absrel", "pred_psnr"} <= set(evals[-1]["eval"])
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "resume.pt").exists()
    assert any(p.name.startswith("preview_") for p in tmp_path.iterdir())
    train_mim4d.main(args + ["--steps", "3"])                   # resumes at step 2, trains one more
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert recs[-1]["step"] == 3 and "eval" in recs[-1]
